// Per-pixel closed-form SDCA loss (Eq. 14) with its gradient; see ops.cpp for the contract.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace sdca {

std::tuple<at::Tensor, at::Tensor> closed_form_loss_cpu(const at::Tensor& q, const at::Tensor& labels,
                                                        const at::Tensor& mean, const at::Tensor& covariance,
                                                        double tau, bool normalize, int64_t ignore_index,
                                                        bool compute_grad);

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> closed_form_loss_cuda(const at::Tensor& q, const at::Tensor& labels,
                                                         const at::Tensor& mean, const at::Tensor& covariance,
                                                         double tau, bool normalize, int64_t ignore_index,
                                                         bool compute_grad);
#endif

// F.normalize's epsilon: rows with a smaller norm are divided by it instead.
constexpr double kNormEps = 1e-12;

}  // namespace sdca
