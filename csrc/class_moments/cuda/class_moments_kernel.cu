// CUDA kernel of the per-class batch moments.
//
// Means and diagonal variances: a block owns 32 feature columns and a chunk of rows; each pixel adds its
// value (or centred square) into a per-block [K, 32] float64 accumulator in shared memory, which is flushed
// to the [K, A] result with one atomic per entry. Full covariances: pixels sorted by class, one cuBLAS
// (A x m_k)(m_k x A) product per present class over its centred rows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../../common.h"
#include "../class_moments.h"

namespace sdca {
namespace {

constexpr int kColumns = 32;
constexpr int kRowGroups = 8;
constexpr int64_t kRowsPerBlock = 1024;
constexpr int64_t kMaxSharedClasses = 192;  // 192 x 32 doubles = 48 KiB of shared memory

template <typename scalar_t>
__global__ void class_sums_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels, int64_t N,
                                  int64_t A, int64_t K, int64_t ignore_index, const double* __restrict__ center,
                                  double* __restrict__ out) {
  extern __shared__ double acc[];  // [K, kColumns]
  const int tid = threadIdx.y * kColumns + threadIdx.x;
  for (int64_t j = tid; j < K * kColumns; j += kColumns * kRowGroups) acc[j] = 0.0;
  __syncthreads();
  const int64_t a = blockIdx.x * int64_t(kColumns) + threadIdx.x;
  const int64_t row_end = min(N, (blockIdx.y + 1) * kRowsPerBlock);
  if (a < A) {
    for (int64_t i = blockIdx.y * kRowsPerBlock + threadIdx.y; i < row_end; i += kRowGroups) {
      const int64_t k = labels[i];
      if (k == ignore_index) continue;
      double v = static_cast<double>(x[i * A + a]);
      if (center != nullptr) {
        v -= center[k * A + a];
        v *= v;
      }
      atomicAdd(&acc[k * kColumns + threadIdx.x], v);
    }
  }
  __syncthreads();
  for (int64_t j = tid; j < K * kColumns; j += kColumns * kRowGroups) {
    const int64_t col = blockIdx.x * int64_t(kColumns) + (j % kColumns);
    if (col < A && acc[j] != 0.0) atomicAdd(&out[(j / kColumns) * A + col], acc[j]);
  }
}

// Per-class sums (center == nullptr) or centred sums of squares, float64, [K, A].
at::Tensor class_sums(const at::Tensor& x, const at::Tensor& labels, int64_t K, int64_t ignore_index,
                      const at::Tensor& center) {
  const int64_t N = x.size(0), A = x.size(1);
  at::Tensor out = at::zeros({K, A}, x.options().dtype(at::kDouble));
  if (N == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 block(kColumns, kRowGroups);
  const dim3 grid((A + kColumns - 1) / kColumns, (N + kRowsPerBlock - 1) / kRowsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_sums_cuda", [&] {
    class_sums_kernel<scalar_t><<<grid, block, K * kColumns * sizeof(double), stream>>>(
        x.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), N, A, K, ignore_index,
        center.defined() ? center.data_ptr<double>() : nullptr, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_moments_cuda(const at::Tensor& features,
                                                                   const at::Tensor& labels, int64_t num_classes,
                                                                   bool full, int64_t ignore_index) {
  check_moments_inputs(features, labels, num_classes);
  TORCH_CHECK(features.is_cuda(), "sdca::class_moments (CUDA kernel): features must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t K = num_classes;
  const auto acc = accumulation_type(features.scalar_type());
  const at::Tensor x = features.contiguous();
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  const at::Tensor valid = lab.ne(ignore_index);
  const at::Tensor y = lab.masked_select(valid);
  if (y.numel() > 0) {
    TORCH_CHECK(y.ge(0).all().item<bool>() && y.lt(K).all().item<bool>(), "sdca::class_moments: labels must lie in [0, ",
                K, ") or equal ignore_index ", ignore_index);
  }
  const at::Tensor count = at::bincount(y, {}, K);
  const at::Tensor inv_count = count.clamp_min(1).to(at::kDouble).reciprocal().unsqueeze(1);

  at::Tensor mean64, var64;
  if (K <= kMaxSharedClasses) {
    mean64 = class_sums(x, lab, K, ignore_index, at::Tensor()).mul_(inv_count);
    if (!full) var64 = class_sums(x, lab, K, ignore_index, mean64).mul_(inv_count);
  } else {  // too many classes for the shared-memory accumulator: plain atomics through index_add
    const at::Tensor xv = x.index_select(0, valid.nonzero().flatten()).to(at::kDouble);
    mean64 = at::zeros({K, x.size(1)}, xv.options()).index_add_(0, y, xv).mul_(inv_count);
    if (!full) {
      const at::Tensor centred = xv - mean64.index_select(0, y);
      var64 = at::zeros_like(mean64).index_add_(0, y, centred * centred).mul_(inv_count);
    }
  }
  if (!full) return {count, mean64, var64};
  const at::Tensor mean = mean64.to(acc);

  const int64_t A = x.size(1);
  at::Tensor cov = at::zeros({K, A, A}, mean.options());
  const at::Tensor rows = valid.nonzero().flatten();
  const at::Tensor order = rows.index_select(0, at::argsort(y, /*stable=*/true));
  const at::Tensor count_host = count.cpu();
  const int64_t* counts = count_host.data_ptr<int64_t>();
  int64_t offset = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t m = counts[k];
    if (m == 0) continue;
    at::Tensor xk = x.index_select(0, order.narrow(0, offset, m)).to(acc);
    xk.sub_(mean.select(0, k));
    at::Tensor out = cov.select(0, k);
    at::mm_out(out, xk.t(), xk);
    out.div_(static_cast<double>(m));
    offset += m;
  }
  return {count, mean64, cov};
}

void update_statistics_cuda(at::Tensor& count, at::Tensor& mean, at::Tensor& covariance, const at::Tensor& features,
                            const at::Tensor& labels, int64_t ignore_index) {
  check_update_inputs(count, mean, covariance, features, labels);
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t K = mean.size(0);
  const bool full = covariance.dim() == 3;
  auto [batch_count, batch_mean, batch_cov] = class_moments_cuda(features, labels, K, full, ignore_index);
  // The weights of Eq. 3-4 on the host: K numbers, and the merge below is per class anyway.
  const at::Tensor n = count.cpu(), m = batch_count.cpu();
  const int64_t* np = n.data_ptr<int64_t>();
  const int64_t* mp = m.data_ptr<int64_t>();
  const at::Tensor delta = batch_mean - mean.to(at::kDouble);  // [K, A], float64
  for (int64_t k = 0; k < K; ++k) {
    if (mp[k] == 0) continue;  // classes absent from the batch are left untouched
    const double total = static_cast<double>(np[k] + mp[k]);
    const double a = np[k] / total, b = mp[k] / total;
    const at::Tensor d = delta.select(0, k).to(mean.scalar_type());
    at::Tensor sigma = covariance.select(0, k);
    sigma.mul_(a).add_(batch_cov.select(0, k).to(mean.scalar_type()), b);
    if (full) {
      sigma.addr_(d, d, 1.0, a * b);
    } else {
      sigma.addcmul_(d, d, a * b);
    }
    mean.select(0, k).add_(d, b);
  }
  count.add_(batch_count);
}

TORCH_LIBRARY_IMPL(sdca, CUDA, m) {
  m.impl("class_moments", &class_moments_cuda);
  m.impl("update_statistics", &update_statistics_cuda);
}

}  // namespace sdca
