// Per-class count, mean and biased covariance of one batch; see ops.cpp for the contract.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace sdca {

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_moments_cpu(const at::Tensor& features, const at::Tensor& labels,
                                                                 int64_t num_classes, bool full, int64_t ignore_index);

// Merges one batch into running statistics (count [K] int64, mean [K, A], covariance [K, A, A] or [K, A], all
// contiguous, mean and covariance of one floating type) by Eq. 3-4, in place.
void update_statistics_cpu(at::Tensor& count, at::Tensor& mean, at::Tensor& covariance, const at::Tensor& features,
                           const at::Tensor& labels, int64_t ignore_index);

#ifdef WITH_CUDA
void update_statistics_cuda(at::Tensor& count, at::Tensor& mean, at::Tensor& covariance, const at::Tensor& features,
                            const at::Tensor& labels, int64_t ignore_index);
std::tuple<at::Tensor, at::Tensor, at::Tensor> class_moments_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                                  int64_t num_classes, bool full, int64_t ignore_index);
#endif

inline void check_moments_inputs(const at::Tensor& features, const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK(features.dim() == 2, "sdca::class_moments: features must be [N, A], got shape ", features.sizes());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), "sdca::class_moments: features must be floating point");
  TORCH_CHECK(num_classes >= 1, "sdca::class_moments: num_classes must be positive, got ", num_classes);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0),
              "sdca::class_moments: labels must be [N] with N = ", features.size(0), ", got shape ", labels.sizes());
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), false), "sdca::class_moments: labels must be integer");
  TORCH_CHECK(labels.device() == features.device(), "sdca::class_moments: labels and features on different devices");
}

inline void check_update_inputs(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& covariance,
                                const at::Tensor& features, const at::Tensor& labels) {
  const char* op = "sdca::update_statistics";
  TORCH_CHECK(mean.dim() == 2, op, ": mean must be [K, A], got shape ", mean.sizes());
  const int64_t K = mean.size(0), A = mean.size(1);
  check_moments_inputs(features, labels, K);
  TORCH_CHECK(features.size(1) == A, op, ": features have dimension ", features.size(1), ", the statistics ", A);
  TORCH_CHECK(count.dim() == 1 && count.size(0) == K && count.scalar_type() == at::kLong, op,
              ": count must be an int64 tensor of shape [", K, "]");
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, op,
              ": mean must be float32 or float64");
  TORCH_CHECK(covariance.scalar_type() == mean.scalar_type(), op, ": covariance and mean must share a dtype");
  const bool full =
      covariance.dim() == 3 && covariance.size(0) == K && covariance.size(1) == A && covariance.size(2) == A;
  const bool diag = covariance.dim() == 2 && covariance.size(0) == K && covariance.size(1) == A;
  TORCH_CHECK(full || diag, op, ": covariance must be [K, A, A] or [K, A], got shape ", covariance.sizes());
  TORCH_CHECK(count.is_contiguous() && mean.is_contiguous() && covariance.is_contiguous(), op,
              ": the statistics must be contiguous (they are updated in place)");
  TORCH_CHECK(count.device() == features.device() && mean.device() == features.device() &&
                  covariance.device() == features.device(),
              op, ": the statistics and the features must be on one device");
}

}  // namespace sdca
