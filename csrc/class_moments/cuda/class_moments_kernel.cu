// CUDA kernel of the per-class batch moments, and the Eq. 3-4 merge.
//
// Means and diagonal variances (two passes: sums, then centred squares, as the reference): a block owns 128
// feature columns and a fixed chunk of rows; each thread owns one column and keeps one float64 accumulator per
// class in its own slots of shared memory, so there are no atomics and the order of every addition is fixed.
// Each block writes its [K, 128] partial sums to a [chunks, K, A] buffer, and the chunks are summed in order.
// The result is the same bit for bit from run to run, so torch.use_deterministic_algorithms(True) is honoured.
// Classes are taken in windows of kClassWindow (48 KiB of shared memory); a larger K costs one pass per window.
// Full covariances: pixels sorted by class (stable), one cuBLAS (A x m_k)(m_k x A) product per present class.
//
// Host syncs: one for the label-range check; the full-covariance paths add one (the per-class counts, to cut
// the sorted rows into classes; update_statistics also reads the running counts in the same step).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "../../common.h"
#include "../class_moments.h"

namespace sdca {
namespace {

constexpr int kColumns = 128;          // threads per block, one column each
constexpr int64_t kClassWindow = 48;   // 48 classes x 128 columns x 8 bytes = 48 KiB of shared memory
constexpr int kUnroll = 4;             // rows loaded before they are accumulated (loads in flight)
constexpr int64_t kMaxChunks = 65535;  // gridDim.y
constexpr int64_t kPartialBudgetBytes = int64_t(256) << 20;

// Sums (center == nullptr) or centred squares of column a over rows [chunk * rows, ...) for the classes
// [k0, k0 + kw), into partial[chunk, k, a] (every slot written, absent classes as 0).
template <typename scalar_t>
__global__ void __launch_bounds__(kColumns)
    class_sums_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ labels, int64_t N, int64_t A,
                      int64_t K, int64_t ignore_index, int64_t k0, int64_t kw, int64_t rows_per_chunk,
                      const double* __restrict__ center, double* __restrict__ partial) {
  extern __shared__ double acc[];  // [kw, kColumns]; thread t only ever touches column t
  const int t = threadIdx.x;
  const int64_t a = int64_t(blockIdx.x) * kColumns + t;
  for (int64_t k = 0; k < kw; ++k) acc[k * kColumns + t] = 0.0;
  if (a < A) {
    const int64_t begin = int64_t(blockIdx.y) * rows_per_chunk;
    const int64_t end = min(N, begin + rows_per_chunk);
    for (int64_t i0 = begin; i0 < end; i0 += kUnroll) {
      int64_t k[kUnroll];
      double v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + u;
        const int64_t label = i < end ? labels[i] : ignore_index;
        k[u] = label == ignore_index ? -1 : label - k0;  // ignored and out-of-window rows fall outside [0, kw)
        v[u] = (k[u] >= 0 && k[u] < kw) ? static_cast<double>(x[i * A + a]) : 0.0;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (k[u] < 0 || k[u] >= kw) continue;
        double value = v[u];
        if (center != nullptr) {
          value -= center[(k0 + k[u]) * A + a];
          value *= value;
        }
        acc[k[u] * kColumns + t] += value;
      }
    }
    double* out = partial + int64_t(blockIdx.y) * K * A;
    for (int64_t j = 0; j < kw; ++j) out[(k0 + j) * A + a] = acc[j * kColumns + t];
  }
}

// Per-class sums (center undefined) or centred sums of squares, float64, [K, A]; labels already checked.
at::Tensor class_sums(const at::Tensor& x, const at::Tensor& labels, int64_t K, int64_t ignore_index,
                      const at::Tensor& center) {
  const int64_t N = x.size(0), A = x.size(1);
  if (N == 0 || A == 0) return at::zeros({K, A}, x.options().dtype(at::kDouble));
  const int64_t col_blocks = (A + kColumns - 1) / kColumns;
  TORCH_CHECK(col_blocks <= INT_MAX, "sdca::class_moments (CUDA): ", A, " feature columns exceed the launch limit");
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  // Enough row chunks to give every multiprocessor a few blocks; each chunk at least 256 rows; the partial
  // buffer within its budget; gridDim.y within its limit.
  int64_t chunks = std::max<int64_t>(1, (4 * sms + col_blocks - 1) / col_blocks);
  chunks = std::min(chunks, (N + 255) / 256);
  chunks = std::min(chunks, std::max<int64_t>(1, kPartialBudgetBytes / (K * A * 8)));
  chunks = std::max<int64_t>(1, std::min(chunks, kMaxChunks));
  const int64_t rows_per_chunk = (N + chunks - 1) / chunks;
  chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
  at::Tensor partial = at::empty({chunks, K, A}, x.options().dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t k0 = 0; k0 < K; k0 += kClassWindow) {
    const int64_t kw = std::min(kClassWindow, K - k0);
    const dim3 grid(static_cast<unsigned int>(col_blocks), static_cast<unsigned int>(chunks));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_sums_cuda", [&] {
      class_sums_kernel<scalar_t><<<grid, kColumns, kw * kColumns * sizeof(double), stream>>>(
          x.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), N, A, K, ignore_index, k0, kw, rows_per_chunk,
          center.defined() ? center.data_ptr<double>() : nullptr, partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return partial.sum(0);  // a reduction of fixed shape: deterministic
}

// count [K] without a host sync (bincount on CUDA reads the labels' range back to the host).
at::Tensor class_counts(const at::Tensor& labels, int64_t K, int64_t ignore_index) {
  const at::Tensor y = labels.masked_fill(labels.eq(ignore_index), -1);
  return y.unsqueeze(1).eq(at::arange(K, labels.options())).sum(0);
}

// mean64 [K, A] and, unless `full`, var64 [K, A] of the batch, both float64.
std::pair<at::Tensor, at::Tensor> batch_mean_var(const at::Tensor& x, const at::Tensor& lab, const at::Tensor& count,
                                                 int64_t K, int64_t ignore_index, bool full) {
  const at::Tensor inv_count = count.clamp_min(1).to(at::kDouble).reciprocal().unsqueeze(1);
  at::Tensor mean64 = class_sums(x, lab, K, ignore_index, at::Tensor()).mul_(inv_count);
  at::Tensor var64;
  if (!full) var64 = class_sums(x, lab, K, ignore_index, mean64).mul_(inv_count);
  return {mean64, var64};
}

// Row indices sorted by class, the original order kept inside a class and ignored rows last, where the
// per-class counts never reach.
at::Tensor rows_by_class(const at::Tensor& lab, int64_t K, int64_t ignore_index) {
  return at::argsort(lab.masked_fill(lab.eq(ignore_index), K), /*stable=*/true);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> class_moments_cuda(const at::Tensor& features, const at::Tensor& labels,
                                                                  int64_t num_classes, bool full,
                                                                  int64_t ignore_index) {
  check_moments_inputs(features, labels, num_classes);
  TORCH_CHECK(features.is_cuda(), "sdca::class_moments (CUDA kernel): features must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t K = num_classes, A = features.size(1);
  const auto acc = accumulation_type(features.scalar_type());
  const at::Tensor x = features.contiguous();
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  check_label_range(lab, K, ignore_index, "sdca::class_moments");
  const at::Tensor count = class_counts(lab, K, ignore_index);
  auto [mean64, var64] = batch_mean_var(x, lab, count, K, ignore_index, full);
  if (!full) return {count, mean64, var64};

  const at::Tensor mean = mean64.to(acc);
  at::Tensor cov = at::zeros({K, A, A}, mean.options());
  const at::Tensor order = rows_by_class(lab, K, ignore_index);
  const at::Tensor count_host = count.cpu();  // host sync: where each class's rows end
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
  TORCH_CHECK(features.is_cuda(), "sdca::update_statistics (CUDA kernel): features must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(features.device());
  const int64_t K = mean.size(0);
  const bool full = covariance.dim() == 3;
  const auto state = mean.scalar_type();
  const at::Tensor x = features.contiguous();
  const at::Tensor lab = labels.to(at::kLong).contiguous();
  check_label_range(lab, K, ignore_index, "sdca::update_statistics");
  const at::Tensor m = class_counts(lab, K, ignore_index);
  auto [batch_mean, batch_var] = batch_mean_var(x, lab, m, K, ignore_index, full);

  // Eq. 3-4 weights, a = n / (n + m), b = m / (n + m); a class absent from the batch gets a = 1, b = 0.
  const at::Tensor n64 = count.to(at::kDouble), m64 = m.to(at::kDouble);
  const at::Tensor total = (n64 + m64).clamp_min(1);
  const at::Tensor b = (m64 / total).unsqueeze(1), a = 1.0 - b;  // [K, 1], float64
  const at::Tensor delta = batch_mean - mean.to(at::kDouble);    // [K, A], float64
  if (!full) {
    // Every class at once, on device: var <- a var + b var' + a b d^2, mean <- mean + b d.
    const at::Tensor merged = covariance.to(at::kDouble).mul(a).add_(batch_var.mul(b)).add_(delta.square().mul_(a * b));
    covariance.copy_(merged);
    mean.add_(delta.mul(b).to(state));
    count.add_(m);
    return;
  }
  // Full: class by class, straight into the state (Sigma <- a Sigma + (b / m) Xc^T Xc + a b d d^T), so the only
  // temporaries are one class's centred rows and, when the state is wider than the features, one A x A product.
  const auto acc = accumulation_type(features.scalar_type());
  const at::Tensor order = rows_by_class(lab, K, ignore_index);
  const at::Tensor counts_host = at::stack({m, count}).cpu();  // host sync: batch and running counts at once
  const int64_t* mp = counts_host.data_ptr<int64_t>();
  const int64_t* np = mp + K;
  const at::Tensor batch_mean_acc = batch_mean.to(acc);
  int64_t offset = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t mk = mp[k];
    if (mk == 0) continue;
    const double tot = static_cast<double>(np[k] + mk);
    const double ak = np[k] / tot, bk = mk / tot;
    at::Tensor xk = x.index_select(0, order.narrow(0, offset, mk)).to(acc);
    xk.sub_(batch_mean_acc.select(0, k));
    at::Tensor sigma = covariance.select(0, k);
    sigma.mul_(ak);
    if (acc == state) {
      sigma.addmm_(xk.t(), xk, 1.0, bk / static_cast<double>(mk));
    } else {
      sigma.add_(at::mm(xk.t(), xk).to(state), bk / static_cast<double>(mk));
    }
    const at::Tensor d = delta.select(0, k).to(state);
    sigma.addr_(d, d, 1.0, ak * bk);
    mean.select(0, k).add_(d, bk);
    offset += mk;
  }
  count.add_(m);
}

TORCH_LIBRARY_IMPL(sdca, CUDA, m) {
  m.impl("class_moments", &class_moments_cuda);
  m.impl("update_statistics", &update_statistics_cuda);
}

}  // namespace sdca
