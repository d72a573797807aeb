// CPU kernel of the closed-form SDCA loss.
//
// Diagonal covariance: one fused pass per pixel row. The row is read once (converted to the accumulation
// type, normalised), the K linear and quadratic terms, the log-sum-exp, the softmax weights and the gradient
// are formed with the class vectors (2 x K x A values, resident in L2) and the gradient row is written once.
// No temporary of size N x A exists besides the gradient itself.
//
// Full covariance: pixel tiles. For a tile the products Q_t * Sigma_k of every class are computed once (K
// GEMMs into a [K, T, A] scratch that only ever holds one tile), and the loss and the gradient are both read
// off them in one fused pass per row. Nothing of size N x K x A exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../../common.h"
#include "../../cpu_vec.h"
#include "../closed_form_loss.h"

namespace sdca {
namespace {

constexpr int64_t kTileBudgetBytes = int64_t(64) << 20;
constexpr int64_t kMaxTileRows = 8192;

template <typename acc_t>
struct Params {
  const acc_t* mean;  // [K, A]
  const acc_t* var;   // [K, A] diagonal variances (diagonal case)
  int64_t K, A;
  acc_t inv_tau, inv_tau2;
  bool normalize;
};

// z <- softmax(z) in place; returns the log-sum-exp.
template <typename acc_t>
SDCA_INLINE acc_t softmax_in_place(acc_t* z, int64_t K) {
  acc_t zmax = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < K; ++k) zmax = std::max(zmax, z[k]);
  acc_t sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += std::exp(z[k] - zmax);
  const acc_t lse = zmax + std::log(sum);
  for (int64_t k = 0; k < K; ++k) z[k] = std::exp(z[k] - lse);
  return lse;
}

// Loads a row into `out` in the accumulation type, normalised when asked; returns the divisor used.
template <typename scalar_t, typename acc_t>
SDCA_INLINE acc_t load_row(const scalar_t* __restrict__ row, acc_t* __restrict__ out, int64_t A, bool normalize) {
  acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t a = 0; a < A; ++a) {
    const acc_t v = static_cast<acc_t>(row[a]);
    out[a] = v;
    ss += v * v;
  }
  if (!normalize) return acc_t(1);
  const acc_t d = std::max<acc_t>(std::sqrt(ss), static_cast<acc_t>(kNormEps));
  const acc_t inv = acc_t(1) / d;
#pragma omp simd
  for (int64_t a = 0; a < A; ++a) out[a] *= inv;
  return d;
}

// Normalises a row in place (as F.normalize); returns the divisor.
template <typename acc_t>
SDCA_INLINE acc_t normalize_in_place(acc_t* row, int64_t A) {
  const acc_t d = std::max<acc_t>(std::sqrt(simd_dot(row, row, A)), static_cast<acc_t>(kNormEps));
  const acc_t inv = acc_t(1) / d;
#pragma omp simd
  for (int64_t a = 0; a < A; ++a) row[a] *= inv;
  return d;
}

// Chain rule through q_hat = q / max(|q|, eps): g <- (g - (g . q_hat) q_hat) / d; below eps the divisor is a
// constant and the gradient is only scaled. `along` is g . q_hat, accumulated by the caller.
template <typename acc_t>
SDCA_INLINE void through_normalisation(acc_t* __restrict__ g, const acc_t* __restrict__ qhat, acc_t along, acc_t d,
                                       int64_t A) {
  if (d <= static_cast<acc_t>(kNormEps)) along = 0;
  const acc_t inv = acc_t(1) / d;
#pragma omp simd
  for (int64_t a = 0; a < A; ++a) g[a] = (g[a] - along * qhat[a]) * inv;
}

// Rows [begin, end) of the diagonal case. scratch: 3 * A + K + 1 values.
template <typename scalar_t, typename acc_t>
SDCA_INLINE void diag_rows_impl(const scalar_t* q, const int64_t* labels, int64_t ignore_index, const Params<acc_t>& p,
                                int64_t begin, int64_t end, acc_t* loss, acc_t* grad, acc_t* scratch) {
  const int64_t K = p.K, A = p.A;
  acc_t* qhat = scratch;
  acc_t* wmean = scratch + A;
  acc_t* wvar = scratch + 2 * A;
  acc_t* z = scratch + 3 * A;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t y = labels[r];
    if (y == ignore_index) {
      loss[r] = 0;
      if (grad != nullptr)
        for (int64_t a = 0; a < A; ++a) grad[r * A + a] = 0;
      continue;
    }
    const acc_t d = load_row(q + r * A, qhat, A, p.normalize);
    acc_t lin_y = 0;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* m = p.mean + k * A;
      const acc_t* v = p.var + k * A;
      acc_t lin = 0, quad = 0;
#pragma omp simd reduction(+ : lin, quad)
      for (int64_t a = 0; a < A; ++a) {
        lin += qhat[a] * m[a];
        quad += qhat[a] * qhat[a] * v[a];
      }
      z[k] = lin * p.inv_tau + quad * (acc_t(0.5) * p.inv_tau2);
      if (k == y) lin_y = lin;
    }
    loss[r] = softmax_in_place(z, K) - lin_y * p.inv_tau;
    if (grad == nullptr) continue;
    // dL/dq_hat = sum_k p_k (mu_k / tau + sigma_k * q_hat / tau^2) - mu_y / tau
    for (int64_t a = 0; a < A; ++a) wmean[a] = wvar[a] = 0;
    for (int64_t k = 0; k < K; ++k) {
      simd_axpy(wmean, z[k], p.mean + k * A, A);
      simd_axpy(wvar, z[k], p.var + k * A, A);
    }
    acc_t* g = grad + r * A;
    const acc_t* mu_y = p.mean + y * A;
    acc_t along = 0;
#pragma omp simd reduction(+ : along)
    for (int64_t a = 0; a < A; ++a) {
      const acc_t ga = (wmean[a] - mu_y[a]) * p.inv_tau + qhat[a] * wvar[a] * p.inv_tau2;
      g[a] = ga;
      along += ga * qhat[a];
    }
    if (p.normalize) through_normalisation(g, qhat, along, d, A);
  }
}

// One clone set per input/accumulation type pair (target_clones needs plain functions, not templates).
#define SDCA_DIAG_ROWS(NAME, SCALAR, ACC)                                                                       \
  SDCA_CPU_CLONES void NAME(const SCALAR* q, const int64_t* labels, int64_t ignore_index, const Params<ACC>& p, \
                            int64_t begin, int64_t end, ACC* loss, ACC* grad, ACC* scratch) {                   \
    diag_rows_impl<SCALAR, ACC>(q, labels, ignore_index, p, begin, end, loss, grad, scratch);                   \
  }
SDCA_DIAG_ROWS(diag_rows, float, float)
SDCA_DIAG_ROWS(diag_rows, double, double)
SDCA_DIAG_ROWS(diag_rows, c10::Half, float)
SDCA_DIAG_ROWS(diag_rows, c10::BFloat16, float)
#undef SDCA_DIAG_ROWS

// Tile rows [begin, end) of the full case, given the tile's products P_k = Q_t Sigma_k.
// qt: [t, A] normalised rows; products: [K, class_stride] with row i of class k at k * class_stride + i * A.
template <typename acc_t>
SDCA_INLINE void full_rows_impl(const acc_t* qt, const acc_t* divisor, const int64_t* rows, const int64_t* labels,
                                const acc_t* products, int64_t class_stride, const Params<acc_t>& p, int64_t begin,
                                int64_t end, acc_t* loss, acc_t* grad, acc_t* scratch) {
  const int64_t K = p.K, A = p.A;
  acc_t* z = scratch;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t r = rows[i];
    const int64_t y = labels[r];
    const acc_t* qhat = qt + i * A;
    acc_t lin_y = 0;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t lin = simd_dot(qhat, p.mean + k * A, A);
      const acc_t quad = simd_dot(qhat, products + k * class_stride + i * A, A);
      z[k] = lin * p.inv_tau + quad * (acc_t(0.5) * p.inv_tau2);
      if (k == y) lin_y = lin;
    }
    loss[r] = softmax_in_place(z, K) - lin_y * p.inv_tau;
    if (grad == nullptr) continue;
    // dL/dq_hat = sum_k p_k (mu_k / tau + Sigma_k q_hat / tau^2) - mu_y / tau   (Sigma_k symmetric)
    acc_t* g = grad + r * A;
    const acc_t* mu_y = p.mean + y * A;
#pragma omp simd
    for (int64_t a = 0; a < A; ++a) g[a] = -mu_y[a] * p.inv_tau;
    for (int64_t k = 0; k < K; ++k) {
      simd_axpy(g, z[k] * p.inv_tau, p.mean + k * A, A);
      simd_axpy(g, z[k] * p.inv_tau2, products + k * class_stride + i * A, A);
    }
    if (divisor != nullptr) through_normalisation(g, qhat, simd_dot(g, qhat, A), divisor[i], A);
  }
}

#define SDCA_FULL_ROWS(NAME, ACC)                                                                               \
  SDCA_CPU_CLONES void NAME(const ACC* qt, const ACC* divisor, const int64_t* rows, const int64_t* labels,      \
                            const ACC* products, int64_t class_stride, const Params<ACC>& p, int64_t begin,     \
                            int64_t end, ACC* loss, ACC* grad, ACC* scratch) {                                  \
    full_rows_impl<ACC>(qt, divisor, rows, labels, products, class_stride, p, begin, end, loss, grad, scratch); \
  }
SDCA_FULL_ROWS(full_rows, float)
SDCA_FULL_ROWS(full_rows, double)
#undef SDCA_FULL_ROWS

template <typename scalar_t, typename acc_t>
void diag_loss(const at::Tensor& q, const int64_t* labels, int64_t ignore_index, const Params<acc_t>& p, acc_t* loss,
               acc_t* grad) {
  const scalar_t* qp = q.data_ptr<scalar_t>();
  at::parallel_for(0, q.size(0), 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(3 * p.A + p.K + 1);
    diag_rows(qp, labels, ignore_index, p, begin, end, loss, grad, scratch.data());
  });
}

template <typename acc_t>
void full_loss(const at::Tensor& q, const at::Tensor& labels, int64_t ignore_index, const at::Tensor& mean,
               const at::Tensor& cov, const Params<acc_t>& p, acc_t* loss, acc_t* grad) {
  const int64_t N = q.size(0), K = p.K, A = p.A;
  const int64_t* lab = labels.data_ptr<int64_t>();
  std::vector<int64_t> valid;
  valid.reserve(N);
  for (int64_t r = 0; r < N; ++r) {
    if (lab[r] != ignore_index) {
      valid.push_back(r);
    } else {
      loss[r] = 0;
      if (grad != nullptr) std::fill(grad + r * A, grad + (r + 1) * A, acc_t(0));
    }
  }
  const int64_t n_valid = static_cast<int64_t>(valid.size());
  if (n_valid == 0) return;
  const at::Tensor valid_idx = at::from_blob(valid.data(), {n_valid}, at::kLong);
  const int64_t rows = std::min(kMaxTileRows, tile_rows(n_valid, (K + 2) * A, sizeof(acc_t), kTileBudgetBytes));
  at::Tensor products = at::empty({K, rows, A}, mean.options());
  for (int64_t start = 0; start < n_valid; start += rows) {
    const int64_t t = std::min(rows, n_valid - start);
    at::Tensor qt = q.index_select(0, valid_idx.narrow(0, start, t)).to(mean.scalar_type()).contiguous();
    std::vector<acc_t> divisor;
    if (p.normalize) {
      divisor.resize(t);
      acc_t* qp = qt.data_ptr<acc_t>();
      at::parallel_for(0, t, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) divisor[i] = normalize_in_place(qp + i * A, A);
      });
    }
    for (int64_t k = 0; k < K; ++k) {
      at::Tensor out = products.select(0, k).narrow(0, 0, t);  // contiguous [t, A]
      at::mm_out(out, qt, cov.select(0, k));
    }
    const acc_t* qtp = qt.data_ptr<acc_t>();
    const acc_t* pp = products.data_ptr<acc_t>();
    const int64_t* tile_rows_ptr = valid.data() + start;
    at::parallel_for(0, t, 4, [&](int64_t b, int64_t e) {
      std::vector<acc_t> scratch(K + 1);
      full_rows(qtp, p.normalize ? divisor.data() : nullptr, tile_rows_ptr, lab, pp, rows * A, p, b, e, loss, grad,
                scratch.data());
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> closed_form_loss_cpu(const at::Tensor& q, const at::Tensor& labels,
                                                        const at::Tensor& mean, const at::Tensor& covariance,
                                                        double tau, bool normalize, int64_t ignore_index,
                                                        bool compute_grad) {
  check_loss_inputs(q, labels, mean, covariance, tau);
  TORCH_CHECK(q.device().is_cpu(), "sdca::closed_form_loss (CPU kernel): q must be a CPU tensor");
  const LossInputs in(q, labels, mean, covariance);
  const int64_t N = in.N, A = in.A, K = in.K;
  const at::Tensor &qc = in.q, &lab = in.labels, &mean_a = in.mean, &cov_a = in.cov;
  {
    const int64_t* l = lab.data_ptr<int64_t>();
    for (int64_t r = 0; r < N; ++r)
      TORCH_CHECK(l[r] == ignore_index || (l[r] >= 0 && l[r] < K), "sdca::closed_form_loss: labels must lie in [0, ", K,
                  ") or equal ignore_index ", ignore_index, ", got ", l[r]);
  }
  // Every row is written by the kernels (ignored rows with zeros), so no zero-fill pass is needed.
  at::Tensor loss = at::empty({N}, mean_a.options());
  at::Tensor grad = compute_grad ? at::empty({N, A}, mean_a.options()) : at::empty({0}, mean_a.options());
  if (N == 0) return {loss, grad};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qc.scalar_type(), "closed_form_loss_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Params<acc_t> p{mean_a.data_ptr<acc_t>(),
                          cov_a.dim() == 2 ? cov_a.data_ptr<acc_t>() : nullptr,
                          K,
                          A,
                          acc_t(1) / acc_t(tau),
                          acc_t(1) / acc_t(tau * tau),
                          normalize};
    acc_t* lp = loss.data_ptr<acc_t>();
    acc_t* gp = compute_grad ? grad.data_ptr<acc_t>() : nullptr;
    if (cov_a.dim() == 3) {
      full_loss<acc_t>(qc, lab, ignore_index, mean_a, cov_a, p, lp, gp);
    } else {
      diag_loss<scalar_t, acc_t>(qc, lab.data_ptr<int64_t>(), ignore_index, p, lp, gp);
    }
  });
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(sdca, CPU, m) { m.impl("closed_form_loss", &closed_form_loss_cpu); }

}  // namespace sdca
