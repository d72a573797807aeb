// Shared argument checks and sizing rules for the SDCA kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace sdca {

// Accumulation type: float64 stays float64, everything else (float32, float16, bfloat16) runs in float32.
inline at::ScalarType accumulation_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_labels_tensor(const at::Tensor& labels, int64_t n, const char* op) {
  TORCH_CHECK(labels.dim() == 1, op, ": labels must be 1-D, got shape ", labels.sizes());
  TORCH_CHECK(labels.size(0) == n, op, ": labels has ", labels.size(0), " entries but there are ", n, " pixels");
  TORCH_CHECK(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), op,
              ": labels must be an integer tensor, got ", labels.scalar_type());
}

inline void check_loss_inputs(const at::Tensor& q, const at::Tensor& labels, const at::Tensor& mean,
                              const at::Tensor& cov, double tau) {
  const char* op = "sdca::closed_form_loss";
  TORCH_CHECK(q.dim() == 2, op, ": q must be [N, A], got shape ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be floating point, got ", q.scalar_type());
  check_labels_tensor(labels, q.size(0), op);
  TORCH_CHECK(mean.dim() == 2 && mean.size(1) == q.size(1), op, ": mean must be [K, A] with A = ", q.size(1),
              ", got shape ", mean.sizes());
  const int64_t K = mean.size(0), A = q.size(1);
  const bool full_shape = cov.dim() == 3 && cov.size(0) == K && cov.size(1) == A && cov.size(2) == A;
  const bool diag_shape = cov.dim() == 2 && cov.size(0) == K && cov.size(1) == A;
  TORCH_CHECK(full_shape || diag_shape, op, ": covariance must be [K, A, A] or [K, A] with K = ", K, ", A = ", A,
              ", got shape ", cov.sizes());
  TORCH_CHECK(tau > 0, op, ": tau must be positive, got ", tau);
  TORCH_CHECK(labels.device() == q.device() && mean.device() == q.device() && cov.device() == q.device(), op,
              ": all tensors must be on one device");
}

// Labels must lie in [0, K) or equal ignore_index. On a GPU this is the one host sync the ops make for it: a
// label that reached a kernel unchecked would index out of bounds.
inline void check_label_range(const at::Tensor& labels, int64_t K, int64_t ignore_index, const char* op) {
  if (labels.numel() == 0) return;
  const at::Tensor bad = labels.ne(ignore_index).logical_and_(labels.lt(0).logical_or_(labels.ge(K)));
  if (bad.any().item<bool>()) {
    const int64_t value = labels.masked_select(bad)[0].item<int64_t>();
    TORCH_CHECK(false, op, ": labels must lie in [0, ", K, ") or equal ignore_index ", ignore_index, ", got ", value);
  }
}

// The loss kernels' inputs in the layout they read: contiguous q (its own dtype), int64 labels, and mean and
// covariance converted to the accumulation type.
struct LossInputs {
  at::Tensor q, labels, mean, cov;
  at::ScalarType acc;
  int64_t N, A, K;

  LossInputs(const at::Tensor& q_, const at::Tensor& labels_, const at::Tensor& mean_, const at::Tensor& cov_)
      : q(q_.contiguous()),
        labels(labels_.to(at::kLong).contiguous()),
        acc(accumulation_type(q_.scalar_type())),
        N(q_.size(0)),
        A(q_.size(1)),
        K(mean_.size(0)) {
    mean = mean_.to(acc).contiguous();
    cov = cov_.to(acc).contiguous();
  }
};

// Rows per tile so that the per-tile scratch (`floats_per_row` values of acc type per row) stays within
// `budget_bytes`; at least `min_rows`, at most `n`.
inline int64_t tile_rows(int64_t n, int64_t floats_per_row, int64_t elem_size, int64_t budget_bytes,
                         int64_t min_rows = 16) {
  const int64_t per_row = std::max<int64_t>(1, floats_per_row * elem_size);
  const int64_t rows = std::max<int64_t>(min_rows, budget_bytes / per_row);
  return std::max<int64_t>(1, std::min<int64_t>(n, rows));
}

}  // namespace sdca
