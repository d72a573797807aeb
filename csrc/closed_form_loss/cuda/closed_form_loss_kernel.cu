// CUDA kernels of the closed-form SDCA loss.
//
// Per labelled row v (normalised q), with lin_k = v.mu_k and quad_k = v^T Sigma_k v:
//   z_k = lin_k / tau + quad_k / (2 tau^2),   L = lse_k z_k - lin_y / tau,
//   dL/dv = sum_k w1_k mu_k + sum_k w2_k Sigma_k v,   w1_k = (p_k - [k = y]) / tau,   w2_k = p_k / tau^2,
// and normalisation removes the part along v: dL/dq = (dL/dv - (dL/dv . v) v) / |q|, where
// dL/dv . v = sum_k w1_k lin_k + sum_k w2_k quad_k is known from the forward terms alone. That identity is what
// lets both kernels write each gradient element once, with no second reduction over the row.
//
// Diagonal covariance (K <= 32), `diag_tiled_kernel`: the problem is two skinny products, [N, A] x [A, 2K] for
// the forward terms and [N, 2K] x [2K, A] for the gradient, at 4 K A multiply-adds per row. A block takes 64 rows
// and walks A in chunks of 32 columns, staging the q tile and the mean/variance columns in shared memory (the
// next chunk's loads already in flight in registers); each thread keeps 2 rows x KM classes (forward) or 4 rows x 4
// columns (gradient) in registers, so every staged value is reused across rows or classes instead of re-read
// per pixel. Ignored rows are written as zeros in the same
// pass, so no compaction (and no host sync for it) is needed.
// Diagonal covariance with K > 32, `diag_row_kernel`: one block per row, block reductions per class.
// Full covariance: pixel tiles; cuBLAS forms Q_t Sigma_k for every class into a [K, T, A] scratch holding one
// tile, and `full_row_kernel` reads the loss and the gradient off those products, one block per row.
//
// Host syncs: one per call (the label-range check, so that a bad label is a clear error instead of a device-side
// assert); the full-covariance path adds one (`nonzero`, to size its tiles).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../../common.h"
#include "../../cuda_utils.cuh"
#include "../closed_form_loss.h"

namespace sdca {
namespace {

constexpr int kThreads = 256;  // the one-block-per-row kernels
constexpr int64_t kTileBudgetBytes = int64_t(1) << 30;

// Tiled diagonal kernel: THREADS threads take THREADS / 2 rows; 4 class groups x THREADS / 4 row groups in the
// forward phase (2 rows x KM classes each), 8 column groups x THREADS / 8 row groups in the gradient phase (4 rows
// x 4 columns each). A chunk is 32 columns of A.
constexpr int kTileCols = 32;
constexpr int kStride = kTileCols + 1;  // odd row stride: the rows a warp reads fall in distinct banks
constexpr int kMaxTiledClasses = 32;

// ------------------------------------------------------------------------------------------ shared epilogue
// Turns one row's lin[K] and quad[K] (already for the normalised row) into the loss, returned, and the gradient
// weights, written over them: lin <- w1, quad <- w2; *along <- dL/dv . v. Runs in one thread per row.
template <typename acc_t>
__device__ acc_t row_epilogue(acc_t* lin, acc_t* quad, int64_t K, int64_t y, acc_t inv_tau, acc_t inv_tau2,
                              acc_t* along) {
  acc_t zmax = -INFINITY;
  for (int64_t k = 0; k < K; ++k) zmax = max(zmax, lin[k] * inv_tau + quad[k] * acc_t(0.5) * inv_tau2);
  acc_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += exp(lin[k] * inv_tau + quad[k] * acc_t(0.5) * inv_tau2 - zmax);
  const acc_t lse = zmax + log(sum);
  const acc_t loss = lse - lin[y] * inv_tau;
  acc_t a = 0;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t p = exp(lin[k] * inv_tau + quad[k] * acc_t(0.5) * inv_tau2 - lse);
    const acc_t w1 = (p - (k == y ? acc_t(1) : acc_t(0))) * inv_tau;
    const acc_t w2 = p * inv_tau2;
    a += w1 * lin[k] + w2 * quad[k];
    lin[k] = w1;
    quad[k] = w2;
  }
  *along = a;
  return loss;
}

// What a row is, for the kernels: labelled (0..K-1), ignored, or carrying a label outside [0, K). The host
// check rejects the last before any launch; the kernels still never index with it (NaN instead of a trap).
constexpr int64_t kRowIgnored = -1;
constexpr int64_t kRowBadLabel = -2;

__device__ __forceinline__ int64_t row_class(int64_t label, int64_t K, int64_t ignore_index) {
  if (label == ignore_index) return kRowIgnored;
  return (label >= 0 && label < K) ? label : kRowBadLabel;
}

// ----------------------------------------------------------------------------------- diagonal, tiled (K <= 32)
template <typename acc_t, int KM, int ROWS>
struct TiledLayout {
  static constexpr int kClasses = 4 * KM;  // padded K
  static constexpr int kClassStride = kClasses | 1;
  // Offsets in acc_t elements; y (int64) lives after the last acc_t array, 8-byte aligned.
  static constexpr int q = 0;
  static constexpr int mean = q + ROWS * kStride;
  static constexpr int var = mean + kClasses * kStride;
  static constexpr int w1 = var + kClasses * kStride;
  static constexpr int w2 = w1 + ROWS * kClassStride;
  static constexpr int inv_d = w2 + ROWS * kClassStride;
  static constexpr int along = inv_d + ROWS;
  static constexpr int end = along + ROWS;
  static constexpr size_t y_offset() { return ((end * sizeof(acc_t) + 7) / 8) * 8; }
  static constexpr size_t bytes() { return y_offset() + ROWS * sizeof(int64_t); }
};

// One chunk (ROWS rows x 32 columns of q, the same 32 columns of mean and var) held in registers between its
// global loads and its shared-memory store, so that the next chunk's loads are in flight while this one is used.
// Thread t always holds column t % 32, rows t / 32 + i * (THREADS / 32): one base pointer and a fixed stride, so
// the compiler keeps two addresses live instead of one per element.
template <typename scalar_t, typename acc_t, int KM, int THREADS>
struct Chunk {
  static constexpr int kStep = THREADS / kTileCols;        // rows between a thread's elements
  static constexpr int kQ = (THREADS / 2) / kStep;         // q rows per thread
  static constexpr int kC = (4 * KM + kStep - 1) / kStep;  // class rows per thread
  acc_t q[kQ], m[kC], v[kC];

  __device__ __forceinline__ void load(const scalar_t* __restrict__ qg, const acc_t* __restrict__ mean,
                                       const acc_t* __restrict__ var, int64_t N, int64_t K, int64_t A, int64_t row0,
                                       int64_t a0) {
    const int c = threadIdx.x % kTileCols, r = threadIdx.x / kTileCols;
    const int64_t a = a0 + c;
    const bool col_in = a < A;
    const scalar_t* qp = qg + (row0 + r) * A + a;
#pragma unroll
    for (int i = 0; i < kQ; ++i) {
      q[i] = (col_in && row0 + r + i * kStep < N) ? static_cast<acc_t>(qp[int64_t(i) * kStep * A]) : acc_t(0);
    }
#pragma unroll
    for (int i = 0; i < kC; ++i) {
      const int64_t k = r + i * kStep;
      const bool in = col_in && k < K;
      m[i] = in ? mean[k * A + a] : acc_t(0);
      v[i] = in ? var[k * A + a] : acc_t(0);
    }
  }

  __device__ __forceinline__ void store(acc_t* qs, acc_t* ms, acc_t* vs) const {
    const int c = threadIdx.x % kTileCols, r = threadIdx.x / kTileCols;
#pragma unroll
    for (int i = 0; i < kQ; ++i) qs[(r + i * kStep) * kStride + c] = q[i];
#pragma unroll
    for (int i = 0; i < kC; ++i) {
      if (r + i * kStep < 4 * KM) {
        ms[(r + i * kStep) * kStride + c] = m[i];
        vs[(r + i * kStep) * kStride + c] = v[i];
      }
    }
  }
};

template <typename scalar_t, typename acc_t, int KM, int THREADS>
__global__ void __launch_bounds__(THREADS)
    diag_tiled_kernel(const scalar_t* __restrict__ q, const int64_t* __restrict__ labels,
                      const acc_t* __restrict__ mean, const acc_t* __restrict__ var, int64_t N, int64_t K, int64_t A,
                      int64_t ignore_index, acc_t inv_tau, acc_t inv_tau2, bool normalize, acc_t* __restrict__ loss,
                      acc_t* __restrict__ grad) {
  constexpr int ROWS = THREADS / 2;
  using L = TiledLayout<acc_t, KM, ROWS>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  acc_t *qs = smem + L::q, *ms = smem + L::mean, *vs = smem + L::var;
  acc_t *w1s = smem + L::w1, *w2s = smem + L::w2, *inv_ds = smem + L::inv_d, *alongs = smem + L::along;
  int64_t* ys = reinterpret_cast<int64_t*>(smem_raw + L::y_offset());
  const int64_t row0 = int64_t(blockIdx.x) * ROWS;
  const int tid = threadIdx.x;
  Chunk<scalar_t, acc_t, KM, THREADS> chunk;

  // Forward: thread (tx, ty) sums lin and quad for rows ty and ty + ROWS / 2, classes tx * KM .. tx * KM + KM - 1.
  {
    constexpr int kHalf = ROWS / 2;
    const int tx = tid % 4, ty = tid / 4;
    acc_t lin[2][KM], quad[2][KM], ss[2] = {0, 0};
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < KM; ++j) lin[i][j] = quad[i][j] = 0;
    chunk.load(q, mean, var, N, K, A, row0, 0);
    for (int64_t a0 = 0; a0 < A; a0 += kTileCols) {
      chunk.store(qs, ms, vs);
      __syncthreads();
      if (a0 + kTileCols < A) chunk.load(q, mean, var, N, K, A, row0, a0 + kTileCols);
#pragma unroll 2
      for (int c = 0; c < kTileCols; ++c) {
        acc_t v[2], v2[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          v[i] = qs[(ty + kHalf * i) * kStride + c];
          v2[i] = v[i] * v[i];
          ss[i] += v2[i];
        }
#pragma unroll
        for (int j = 0; j < KM; ++j) {
          const acc_t m = ms[(tx * KM + j) * kStride + c], s = vs[(tx * KM + j) * kStride + c];
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            lin[i][j] += v[i] * m;
            quad[i][j] += v2[i] * s;
          }
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = ty + kHalf * i;
      const acc_t d = normalize ? max(sqrt(ss[i]), static_cast<acc_t>(kNormEps)) : acc_t(1);
      const acc_t inv_d = acc_t(1) / d;
#pragma unroll
      for (int j = 0; j < KM; ++j) {
        w1s[r * L::kClassStride + tx * KM + j] = lin[i][j] * inv_d;
        w2s[r * L::kClassStride + tx * KM + j] = quad[i][j] * inv_d * inv_d;
      }
      if (tx == 0) {
        inv_ds[r] = inv_d;
        // Below eps F.normalize divides by a constant, so nothing is projected out.
        alongs[r] = (normalize && d > static_cast<acc_t>(kNormEps)) ? acc_t(1) : acc_t(0);
      }
    }
  }
  __syncthreads();

  // Epilogue: one thread per row.
  if (tid < ROWS) {
    const int64_t row = row0 + tid;
    int64_t y = kRowIgnored;
    if (row < N) {
      y = row_class(labels[row], K, ignore_index);
      acc_t* w1 = w1s + tid * L::kClassStride;
      acc_t* w2 = w2s + tid * L::kClassStride;
      if (y >= 0) {
        acc_t along;
        loss[row] = row_epilogue(w1, w2, K, y, inv_tau, inv_tau2, &along);
        alongs[tid] *= along;
      } else {
        loss[row] = y == kRowIgnored ? acc_t(0) : acc_t(NAN);
      }
    }
    ys[tid] = y;
  }
  __syncthreads();
  if (grad == nullptr) return;

  // Gradient: thread (cx, ry) writes rows ry + ROWS / 4 * i (i < 4) x columns 4 cx .. 4 cx + 3 of each chunk.
  constexpr int kQuarter = ROWS / 4;
  const int cx = tid % 8, ry = tid / 8;
  chunk.load(q, mean, var, N, K, A, row0, 0);
  for (int64_t a0 = 0; a0 < A; a0 += kTileCols) {
    chunk.store(qs, ms, vs);
    __syncthreads();
    if (a0 + kTileCols < A) chunk.load(q, mean, var, N, K, A, row0, a0 + kTileCols);
    acc_t g[4][4], h[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) g[i][c] = h[i][c] = 0;
#pragma unroll 1
    for (int64_t k = 0; k < K; ++k) {
      acc_t m[4], s[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        m[c] = ms[k * kStride + 4 * cx + c];
        s[c] = vs[k * kStride + 4 * cx + c];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = ry + kQuarter * i;
        const acc_t a1 = w1s[r * L::kClassStride + k], a2 = w2s[r * L::kClassStride + k];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          g[i][c] += a1 * m[c];
          h[i][c] += a2 * s[c];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = ry + kQuarter * i;
      const int64_t row = row0 + r;
      if (row >= N) continue;
      const int64_t y = ys[r];
      const acc_t inv_d = inv_ds[r], along = alongs[r];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t a = a0 + 4 * cx + c;
        if (a >= A) continue;
        const acc_t v = qs[r * kStride + 4 * cx + c] * inv_d;
        acc_t out = (g[i][c] + v * h[i][c] - along * v) * inv_d;
        if (y < 0) out = y == kRowIgnored ? acc_t(0) : acc_t(NAN);
        grad[row * A + a] = out;
      }
    }
    __syncthreads();
  }
}

// -------------------------------------------------------------------------------- diagonal, one block per row
// For K > 32. Shared memory: [0, 32) reduction scratch, then lin[K], quad[K], then the row's divisor and along.
template <typename scalar_t, typename acc_t>
__global__ void diag_row_kernel(const scalar_t* __restrict__ q, const int64_t* __restrict__ labels,
                                const acc_t* __restrict__ mean, const acc_t* __restrict__ var, int64_t K, int64_t A,
                                int64_t ignore_index, acc_t inv_tau, acc_t inv_tau2, bool normalize,
                                acc_t* __restrict__ loss, acc_t* __restrict__ grad) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* lin = scratch + 32;
  acc_t* quad = lin + K;
  acc_t* along_s = quad + K;
  const int64_t r = blockIdx.x;
  const int64_t y = row_class(labels[r], K, ignore_index);
  const scalar_t* qr = q + r * A;
  if (y < 0) {  // uniform across the block
    const acc_t fill = y == kRowIgnored ? acc_t(0) : acc_t(NAN);
    if (threadIdx.x == 0) loss[r] = fill;
    if (grad != nullptr)
      for (int64_t a = threadIdx.x; a < A; a += blockDim.x) grad[r * A + a] = fill;
    return;
  }
  acc_t d = 1;
  if (normalize) {
    acc_t s = 0;
    for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
      const acc_t v = static_cast<acc_t>(qr[a]);
      s += v * v;
    }
    d = max(sqrt(block_sum(s, scratch)), static_cast<acc_t>(kNormEps));
  }
  const acc_t inv_d = acc_t(1) / d;
  for (int64_t k = 0; k < K; ++k) {
    acc_t l = 0, qd = 0;
    for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
      const acc_t v = static_cast<acc_t>(qr[a]) * inv_d;
      l += v * mean[k * A + a];
      qd += v * v * var[k * A + a];
    }
    l = block_sum(l, scratch);
    qd = block_sum(qd, scratch);
    if (threadIdx.x == 0) {
      lin[k] = l;
      quad[k] = qd;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t along;
    loss[r] = row_epilogue(lin, quad, K, y, inv_tau, inv_tau2, &along);
    *along_s = (normalize && d > static_cast<acc_t>(kNormEps)) ? along : acc_t(0);
  }
  __syncthreads();
  if (grad == nullptr) return;
  const acc_t along = *along_s;
  for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
    const acc_t v = static_cast<acc_t>(qr[a]) * inv_d;
    acc_t g = 0, h = 0;
    for (int64_t k = 0; k < K; ++k) {
      g += lin[k] * mean[k * A + a];
      h += quad[k] * var[k * A + a];
    }
    grad[r * A + a] = (g + v * h - along * v) * inv_d;
  }
}

// ---------------------------------------------------------------------------------------------- full covariance
// One block per row of a tile whose products P[k] = V_t Sigma_k are precomputed (V_t the normalised rows).
template <typename acc_t>
__global__ void full_row_kernel(const acc_t* __restrict__ vt, const acc_t* __restrict__ divisor,
                                const int64_t* __restrict__ y_t, const acc_t* __restrict__ products,
                                int64_t class_stride, const acc_t* __restrict__ mean, int64_t K, int64_t A,
                                acc_t inv_tau, acc_t inv_tau2, acc_t* __restrict__ loss, acc_t* __restrict__ grad) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* scratch = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* lin = scratch + 32;
  acc_t* quad = lin + K;
  acc_t* along_s = quad + K;
  const int64_t i = blockIdx.x;
  const int64_t y = y_t[i];  // rows of a tile are labelled and checked
  const acc_t* vr = vt + i * A;
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* pr = products + k * class_stride + i * A;
    acc_t l = 0, qd = 0;
    for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
      l += vr[a] * mean[k * A + a];
      qd += vr[a] * pr[a];
    }
    l = block_sum(l, scratch);
    qd = block_sum(qd, scratch);
    if (threadIdx.x == 0) {
      lin[k] = l;
      quad[k] = qd;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t along;
    loss[i] = row_epilogue(lin, quad, K, y, inv_tau, inv_tau2, &along);
    *along_s = (divisor != nullptr && divisor[i] > static_cast<acc_t>(kNormEps)) ? along : acc_t(0);
  }
  __syncthreads();
  if (grad == nullptr) return;
  const acc_t along = *along_s;
  const acc_t inv_d = divisor != nullptr ? acc_t(1) / divisor[i] : acc_t(1);
  for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
    acc_t g = 0;
    for (int64_t k = 0; k < K; ++k) g += lin[k] * mean[k * A + a] + quad[k] * products[k * class_stride + i * A + a];
    grad[i * A + a] = (g - along * vr[a]) * inv_d;
  }
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// Shared memory of the one-block-per-row kernels; they run with the default 48 KiB limit.
size_t row_kernel_bytes(int64_t K, size_t elem) {
  const size_t bytes = (32 + 2 * K + 1) * elem;
  TORCH_CHECK(bytes <= 48 * 1024, "sdca::closed_form_loss (CUDA): ", K,
              " classes need more shared memory than one block has; at most ", (48 * 1024 / elem - 33) / 2,
              " classes are supported");
  return bytes;
}

unsigned int grid_size(int64_t blocks) {
  TORCH_CHECK(blocks <= INT_MAX, "sdca::closed_form_loss (CUDA): ", blocks, " blocks exceed the launch limit");
  return static_cast<unsigned int>(blocks);
}

template <typename scalar_t, typename acc_t, int KM, int THREADS>
void launch_tiled(const at::Tensor& q, const at::Tensor& labels, const at::Tensor& mean, const at::Tensor& var,
                  int64_t ignore_index, double tau, bool normalize, at::Tensor& loss, at::Tensor* grad,
                  cudaStream_t stream) {
  const int64_t N = q.size(0), A = q.size(1), K = mean.size(0);
  constexpr int kRows = THREADS / 2;
  const size_t bytes = TiledLayout<acc_t, KM, kRows>::bytes();
  auto kernel = diag_tiled_kernel<scalar_t, acc_t, KM, THREADS>;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  kernel<<<grid_size((N + kRows - 1) / kRows), THREADS, bytes, stream>>>(
      q.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), N, K, A,
      ignore_index, acc_t(1) / acc_t(tau), acc_t(1) / acc_t(tau * tau), normalize, loss.data_ptr<acc_t>(),
      grad != nullptr ? grad->data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int THREADS>
void launch_tiled_for(int64_t K, const at::Tensor& q, const at::Tensor& labels, const at::Tensor& mean,
                      const at::Tensor& var, int64_t ignore_index, double tau, bool normalize, at::Tensor& loss,
                      at::Tensor* grad, cudaStream_t stream) {
  if (K <= 8) {
    launch_tiled<scalar_t, acc_t, 2, THREADS>(q, labels, mean, var, ignore_index, tau, normalize, loss, grad, stream);
  } else if (K <= 20) {
    launch_tiled<scalar_t, acc_t, 5, THREADS>(q, labels, mean, var, ignore_index, tau, normalize, loss, grad, stream);
  } else {
    launch_tiled<scalar_t, acc_t, 8, THREADS>(q, labels, mean, var, ignore_index, tau, normalize, loss, grad, stream);
  }
}

// SDCA_CUDA_DIAG_KERNEL selects the diagonal kernel, for benchmarks and cross-checks: "tiled128" (the default: 128
// threads, 64-row tiles), "tiled256" (256 threads, 128-row tiles: fewer, larger blocks) or "rows" (one block per
// row: the design the tiled kernel replaced).
std::string diag_kernel_choice() {
  const char* v = std::getenv("SDCA_CUDA_DIAG_KERNEL");
  const std::string choice = v == nullptr || *v == 0 ? "tiled128" : v;
  TORCH_CHECK(choice == "tiled128" || choice == "tiled256" || choice == "rows",
              "SDCA_CUDA_DIAG_KERNEL must be tiled128, tiled256 or rows, got '", choice, "'");
  return choice;
}

void diag_loss(const at::Tensor& q, const at::Tensor& labels, const at::Tensor& mean, const at::Tensor& var,
               int64_t ignore_index, double tau, bool normalize, at::Tensor& loss, at::Tensor* grad,
               cudaStream_t stream) {
  const int64_t N = q.size(0), A = q.size(1), K = mean.size(0);
  const std::string choice = diag_kernel_choice();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "closed_form_loss_cuda_diag", [&] {
    using acc_t = acc_type_t<scalar_t>;
    if (K <= kMaxTiledClasses && choice != "rows") {
      if (choice == "tiled256") {
        launch_tiled_for<scalar_t, acc_t, 256>(K, q, labels, mean, var, ignore_index, tau, normalize, loss, grad,
                                               stream);
      } else {
        launch_tiled_for<scalar_t, acc_t, 128>(K, q, labels, mean, var, ignore_index, tau, normalize, loss, grad,
                                               stream);
      }
      return;
    }
    diag_row_kernel<scalar_t, acc_t><<<grid_size(N), kThreads, row_kernel_bytes(K, sizeof(acc_t)), stream>>>(
        q.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(), mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), K, A,
        ignore_index, acc_t(1) / acc_t(tau), acc_t(1) / acc_t(tau * tau), normalize, loss.data_ptr<acc_t>(),
        grad != nullptr ? grad->data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void full_loss(const at::Tensor& q, const at::Tensor& labels, const at::Tensor& mean, const at::Tensor& cov,
               int64_t ignore_index, double tau, bool normalize, at::Tensor& loss, at::Tensor* grad,
               cudaStream_t stream) {
  const int64_t A = q.size(1), K = mean.size(0);
  const auto acc = mean.scalar_type();
  const size_t smem = row_kernel_bytes(K, acc == at::kDouble ? 8 : 4);
  loss.zero_();
  if (grad != nullptr) grad->zero_();  // rows outside the tiles (ignored ones) stay zero
  const at::Tensor valid_idx = labels.ne(ignore_index).nonzero().flatten();  // host sync: tile sizes
  const int64_t n_valid = valid_idx.numel();
  if (n_valid == 0) return;
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  const int64_t rows = tile_rows(n_valid, (K + 2) * A, elem, kTileBudgetBytes, 64);
  at::Tensor products = at::empty({K, rows, A}, mean.options());
  for (int64_t start = 0; start < n_valid; start += rows) {
    const int64_t t = std::min(rows, n_valid - start);
    const at::Tensor idx = valid_idx.narrow(0, start, t);
    at::Tensor vt = q.index_select(0, idx).to(acc).contiguous();
    at::Tensor divisor;
    if (normalize) {
      divisor = at::linalg_vector_norm(vt, 2, {1}, false).clamp_min(kNormEps);
      vt.div_(divisor.unsqueeze(1));
    }
    at::Tensor tile_products = products.narrow(1, 0, t);
    for (int64_t k = 0; k < K; ++k) {
      at::Tensor out = tile_products.select(0, k);  // contiguous [t, A]
      at::mm_out(out, vt, cov.select(0, k));
    }
    const at::Tensor y_t = labels.index_select(0, idx);
    at::Tensor loss_t = at::empty({t}, mean.options());
    at::Tensor grad_t = grad != nullptr ? at::empty({t, A}, mean.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(acc, "closed_form_loss_cuda_full", [&] {
      full_row_kernel<scalar_t><<<grid_size(t), kThreads, smem, stream>>>(
          vt.data_ptr<scalar_t>(), normalize ? divisor.data_ptr<scalar_t>() : nullptr, y_t.data_ptr<int64_t>(),
          tile_products.data_ptr<scalar_t>(), tile_products.stride(0), mean.data_ptr<scalar_t>(), K, A,
          scalar_t(1) / scalar_t(tau), scalar_t(1) / scalar_t(tau * tau), loss_t.data_ptr<scalar_t>(),
          grad != nullptr ? grad_t.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    loss.index_copy_(0, idx, loss_t);
    if (grad != nullptr) grad->index_copy_(0, idx, grad_t);
  }
}

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
  check_label_range(in.labels, in.K, ignore_index, "sdca::closed_form_loss");  // the one host sync
  // The diagonal kernels write every row (ignored ones as zeros), so no zero-fill pass is needed.
  at::Tensor loss = at::empty({in.N}, in.mean.options());
  at::Tensor grad = compute_grad ? at::empty({in.N, in.A}, in.mean.options()) : at::empty({0}, in.mean.options());
  if (in.N == 0 || in.A == 0) {
    loss.zero_();
    grad.zero_();
    if (in.N > 0 && in.A == 0) {  // every feature is zero: z = 0, loss = log K at labelled rows
      loss.masked_fill_(in.labels.ne(ignore_index), std::log(static_cast<double>(in.K)));
    }
    return {loss, grad};
  }
  if (in.cov.dim() == 2) {
    diag_loss(in.q, in.labels, in.mean, in.cov, ignore_index, tau, normalize, loss, compute_grad ? &grad : nullptr,
              stream);
  } else {
    full_loss(in.q, in.labels, in.mean, in.cov, ignore_index, tau, normalize, loss, compute_grad ? &grad : nullptr,
              stream);
  }
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(sdca, CUDA, m) { m.impl("closed_form_loss", &closed_form_loss_cuda); }

}  // namespace sdca
