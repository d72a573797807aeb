// CUDA kernels of the closed-form SDCA loss.
//
// Diagonal covariance: one block per labelled pixel reads its row once (in the input dtype, converted to the
// accumulation type on the fly), forms the K linear and quadratic terms, the log-sum-exp and the gradient,
// normalisation included; no temporary of size N x A. Full covariance: pixel tiles; cuBLAS forms Q_t * Sigma_k
// for every class into a [K, T, A] scratch that holds one tile, and one block per row reads both the loss and
// the gradient off those products.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../../common.h"
#include "../../cuda_utils.cuh"
#include "../closed_form_loss.h"

namespace sdca {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTileBudgetBytes = int64_t(1) << 30;

template <typename acc_t>
__device__ void softmax_in_place(acc_t* z, int64_t K) {
  acc_t zmax = z[0];
  for (int64_t k = 1; k < K; ++k) zmax = z[k] > zmax ? z[k] : zmax;
  acc_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += exp(z[k] - zmax);
  const acc_t lse = zmax + log(sum);
  for (int64_t k = 0; k < K; ++k) z[k] = exp(z[k] - lse);
  z[K] = lse;  // the caller reads the log-sum-exp back from here
}

// Shared memory layout: [0, 32) reduction scratch, [32, 32 + K + 1) logits then softmax weights and the lse,
// then one slot for the label's linear term.
template <typename scalar_t, typename acc_t>
__global__ void diag_loss_kernel(const scalar_t* __restrict__ q, const int64_t* __restrict__ rows,
                                 const int64_t* __restrict__ labels, const acc_t* __restrict__ mean,
                                 const acc_t* __restrict__ var, int64_t K, int64_t A, acc_t inv_tau, acc_t inv_tau2,
                                 bool normalize, acc_t* __restrict__ loss, acc_t* __restrict__ grad) {
  extern __shared__ unsigned char smem[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem);
  acc_t* z = scratch + 32;
  acc_t* lin_y = z + K + 1;
  const int64_t r = rows[blockIdx.x];
  const int64_t y = labels[r];
  CUDA_KERNEL_ASSERT(y >= 0 && y < K);
  const scalar_t* qr = q + r * A;

  acc_t d = 1;
  if (normalize) {
    acc_t s = 0;
    for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
      const acc_t v = static_cast<acc_t>(qr[a]);
      s += v * v;
    }
    s = block_sum(s, scratch);
    d = max(sqrt(s), static_cast<acc_t>(kNormEps));
  }
  const acc_t inv_d = acc_t(1) / d;

  for (int64_t k = 0; k < K; ++k) {
    acc_t lin = 0, quad = 0;
    for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
      const acc_t v = static_cast<acc_t>(qr[a]) * inv_d;
      lin += v * mean[k * A + a];
      quad += v * v * var[k * A + a];
    }
    lin = block_sum(lin, scratch);
    quad = block_sum(quad, scratch);
    if (threadIdx.x == 0) {
      z[k] = lin * inv_tau + quad * acc_t(0.5) * inv_tau2;
      if (k == y) *lin_y = lin;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    softmax_in_place(z, K);
    loss[r] = z[K] - *lin_y * inv_tau;
  }
  __syncthreads();
  if (grad == nullptr) return;

  acc_t* gr = grad + r * A;
  acc_t along = 0;
  for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
    const acc_t v = static_cast<acc_t>(qr[a]) * inv_d;
    acc_t g = -mean[y * A + a] * inv_tau;
    for (int64_t k = 0; k < K; ++k) g += z[k] * (mean[k * A + a] * inv_tau + var[k * A + a] * v * inv_tau2);
    gr[a] = g;
    along += g * v;
  }
  if (!normalize) return;
  along = block_sum(along, scratch);
  if (d <= static_cast<acc_t>(kNormEps)) along = 0;  // below eps F.normalize divides by a constant
  for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
    const acc_t v = static_cast<acc_t>(qr[a]) * inv_d;
    gr[a] = (gr[a] - along * v) * inv_d;
  }
}

// One block per row of a tile whose products P[k] = Q_t * Sigma_k are precomputed.
template <typename acc_t>
__global__ void full_loss_kernel(const acc_t* __restrict__ qt, const acc_t* __restrict__ divisor,
                                 const int64_t* __restrict__ y_t, const acc_t* __restrict__ products,
                                 int64_t class_stride, const acc_t* __restrict__ mean, int64_t K, int64_t A,
                                 acc_t inv_tau, acc_t inv_tau2, acc_t* __restrict__ loss, acc_t* __restrict__ grad) {
  extern __shared__ unsigned char smem[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem);
  acc_t* z = scratch + 32;
  acc_t* lin_y = z + K + 1;
  const int64_t i = blockIdx.x;
  const int64_t y = y_t[i];
  CUDA_KERNEL_ASSERT(y >= 0 && y < K);
  const acc_t* qr = qt + i * A;

  for (int64_t k = 0; k < K; ++k) {
    const acc_t* pr = products + k * class_stride + i * A;
    acc_t lin = 0, quad = 0;
    for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
      lin += qr[a] * mean[k * A + a];
      quad += qr[a] * pr[a];
    }
    lin = block_sum(lin, scratch);
    quad = block_sum(quad, scratch);
    if (threadIdx.x == 0) {
      z[k] = lin * inv_tau + quad * acc_t(0.5) * inv_tau2;
      if (k == y) *lin_y = lin;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    softmax_in_place(z, K);
    loss[i] = z[K] - *lin_y * inv_tau;
  }
  __syncthreads();
  if (grad == nullptr) return;

  acc_t* gr = grad + i * A;
  acc_t along = 0;
  for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
    acc_t g = -mean[y * A + a] * inv_tau;
    for (int64_t k = 0; k < K; ++k) g += z[k] * (mean[k * A + a] * inv_tau + products[k * class_stride + i * A + a] * inv_tau2);
    gr[a] = g;
    along += g * qr[a];
  }
  if (divisor == nullptr) return;
  along = block_sum(along, scratch);
  const acc_t d = divisor[i];
  if (d <= static_cast<acc_t>(kNormEps)) along = 0;
  for (int64_t a = threadIdx.x; a < A; a += blockDim.x) gr[a] = (gr[a] - along * qr[a]) / d;
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

size_t shared_bytes(int64_t K, size_t elem) { return (32 + K + 2) * elem; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> closed_form_loss_cuda(const at::Tensor& q, const at::Tensor& labels,
                                                         const at::Tensor& mean, const at::Tensor& covariance,
                                                         double tau, bool normalize, int64_t ignore_index,
                                                         bool compute_grad) {
  check_loss_inputs(q, labels, mean, covariance, tau);
  TORCH_CHECK(q.is_cuda(), "sdca::closed_form_loss (CUDA kernel): q must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(q.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const LossInputs in(q, labels, mean, covariance);
  const auto acc = in.acc;
  const int64_t N = in.N, A = in.A, K = in.K;
  const at::Tensor &qc = in.q, &lab = in.labels, &mean_a = in.mean, &cov_a = in.cov;
  at::Tensor loss = at::zeros({N}, mean_a.options());
  at::Tensor grad = compute_grad ? at::zeros({N, A}, mean_a.options()) : at::empty({0}, mean_a.options());
  const at::Tensor valid_idx = lab.ne(ignore_index).nonzero().flatten();
  const int64_t n_valid = valid_idx.numel();
  if (n_valid == 0) return {loss, grad};

  if (cov_a.dim() == 2) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qc.scalar_type(), "closed_form_loss_cuda_diag", [&] {
      using acc_t = acc_type_t<scalar_t>;
      diag_loss_kernel<scalar_t, acc_t><<<n_valid, kThreads, shared_bytes(K, sizeof(acc_t)), stream>>>(
          qc.data_ptr<scalar_t>(), valid_idx.data_ptr<int64_t>(), lab.data_ptr<int64_t>(), mean_a.data_ptr<acc_t>(),
          cov_a.data_ptr<acc_t>(), K, A, acc_t(1) / acc_t(tau), acc_t(1) / acc_t(tau * tau), normalize,
          loss.data_ptr<acc_t>(), compute_grad ? grad.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {loss, grad};
  }

  const int64_t elem = acc == at::kDouble ? 8 : 4;
  const int64_t rows = tile_rows(n_valid, (K + 2) * A, elem, kTileBudgetBytes, 64);
  at::Tensor products = at::empty({K, rows, A}, mean_a.options());
  for (int64_t start = 0; start < n_valid; start += rows) {
    const int64_t t = std::min(rows, n_valid - start);
    const at::Tensor idx = valid_idx.narrow(0, start, t);
    at::Tensor qt = qc.index_select(0, idx).to(acc).contiguous();
    at::Tensor divisor;
    if (normalize) {
      divisor = at::linalg_vector_norm(qt, 2, {1}, false).clamp_min(kNormEps);
      qt.div_(divisor.unsqueeze(1));
    }
    at::Tensor tile_products = products.narrow(1, 0, t);
    for (int64_t k = 0; k < K; ++k) {
      at::Tensor out = tile_products.select(0, k);  // contiguous [t, A]
      at::mm_out(out, qt, cov_a.select(0, k));
    }
    const at::Tensor y_t = lab.index_select(0, idx);
    at::Tensor loss_t = at::empty({t}, mean_a.options());
    at::Tensor grad_t = compute_grad ? at::empty({t, A}, mean_a.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(acc, "closed_form_loss_cuda_full", [&] {
      full_loss_kernel<scalar_t><<<t, kThreads, shared_bytes(K, sizeof(scalar_t)), stream>>>(
          qt.data_ptr<scalar_t>(), normalize ? divisor.data_ptr<scalar_t>() : nullptr, y_t.data_ptr<int64_t>(),
          tile_products.data_ptr<scalar_t>(), tile_products.stride(0), mean_a.data_ptr<scalar_t>(), K, A,
          scalar_t(1) / scalar_t(tau), scalar_t(1) / scalar_t(tau * tau), loss_t.data_ptr<scalar_t>(),
          compute_grad ? grad_t.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    loss.index_copy_(0, idx, loss_t);
    if (compute_grad) grad.index_copy_(0, idx, grad_t);
  }
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(sdca, CUDA, m) { m.impl("closed_form_loss", &closed_form_loss_cuda); }

}  // namespace sdca
