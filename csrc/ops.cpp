// The one place where the sdca operator schemas are declared. Kernels register themselves per device in
// their own files (TORCH_LIBRARY_IMPL), autograd in closed_form_loss_autograd.cpp; fake kernels are registered
// from Python (sdca/ops/_registrations.py).
#include <torch/library.h>

TORCH_LIBRARY(sdca, m) {
  // Per-pixel closed-form SDCA loss (Eq. 14) and, when compute_grad, its gradient w.r.t. q.
  // Returns (loss [N], grad [N, A] or [0]); both in the accumulation type (float32, or float64 for float64 q).
  // Pixels labelled ignore_index get 0 loss and 0 gradient. With normalize, q is L2-normalised per row first
  // (as F.normalize, eps 1e-12) and the gradient is taken w.r.t. the raw q. Covariances are assumed symmetric.
  m.def(
      "closed_form_loss(Tensor q, Tensor labels, Tensor mean, Tensor covariance, float tau, bool normalize, "
      "int ignore_index, bool compute_grad) -> (Tensor, Tensor)");
  // Count [K] (int64), mean [K, A] and biased covariance ([K, A, A] when full, else [K, A]) of the pixels of each
  // class in one batch; classes without pixels get zeros. Means and diagonal variances are accumulated and
  // returned in float64; a full covariance is the Gram matrix of the centred rows at the accumulation type
  // (float32, or float64 for float64 features), since that product is the whole cost.
  m.def(
      "class_moments(Tensor features, Tensor labels, int num_classes, bool full, int ignore_index) "
      "-> (Tensor, Tensor, Tensor)");
  // Merges one batch into running statistics in place by Eq. 3-4 (exact pooled merge; classes absent from the
  // batch untouched): the batch moments and the merge in one pass per class, with no K x A x A temporary.
  m.def(
      "update_statistics(Tensor(a!) count, Tensor(b!) mean, Tensor(c!) covariance, Tensor features, "
      "Tensor labels, int ignore_index) -> ()");
}
