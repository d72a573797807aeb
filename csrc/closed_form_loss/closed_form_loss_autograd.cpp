// Autograd for sdca::closed_form_loss, registered under the Autograd key (one place, for every device).
//
// The forward kernels already produce dL_i/dq_i for every pixel, so the backward is a row scaling of that
// saved gradient. Doing it in C++ rather than in a Python backward lets autograd hand the result straight to
// q.grad instead of copying it once more.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace sdca {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_kernel(const at::Tensor& q, const at::Tensor& labels, const at::Tensor& mean,
                                               const at::Tensor& covariance, double tau, bool normalize,
                                               int64_t ignore_index, bool compute_grad) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sdca::closed_form_loss", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, double, bool, int64_t, bool)>();
  return op.call(q, labels, mean, covariance, tau, normalize, ignore_index, compute_grad);
}

class ClosedFormLoss : public torch::autograd::Function<ClosedFormLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& labels,
                               const at::Tensor& mean, const at::Tensor& covariance, double tau, bool normalize,
                               int64_t ignore_index, bool compute_grad) {
    at::Tensor loss, grad;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, grad) = call_kernel(q, labels, mean, covariance, tau, normalize, ignore_index, compute_grad);
    }
    ctx->save_for_backward({grad});
    ctx->saved_data["q_dtype"] = static_cast<int64_t>(q.scalar_type());
    ctx->mark_non_differentiable({grad});
    // The second output never receives a gradient; without this autograd would build an N x A tensor of
    // zeros for it on every backward.
    ctx->set_materialize_grads(false);
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor grad = ctx->get_saved_variables()[0];
    const at::Tensor& grad_loss = grad_outputs[0];
    at::Tensor grad_q;
    if (grad_loss.defined()) {
      // The gradient is a kernel output, not a function of q that autograd can see: a graph built from it would
      // give a silently wrong second derivative, so double backward is refused instead.
      TORCH_CHECK(!at::GradMode::is_enabled(),
                  "sdca::closed_form_loss does not support double backward (backward with create_graph=True); "
                  "compute this loss under sdca.ops.reference_only() (or SDCA_FORCE_REFERENCE=1) for higher-order "
                  "gradients");
      TORCH_CHECK(grad.sym_numel() > 0,
                  "sdca::closed_form_loss was called with compute_grad=False but a gradient was requested");
      const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["q_dtype"].toInt());
      grad_q = grad.mul(grad_loss.unsqueeze(1).to(grad.scalar_type())).to(dtype);
    }
    return {grad_q, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> closed_form_loss_autograd(const at::Tensor& q, const at::Tensor& labels,
                                                             const at::Tensor& mean, const at::Tensor& covariance,
                                                             double tau, bool normalize, int64_t ignore_index,
                                                             bool compute_grad) {
  auto out = ClosedFormLoss::apply(q, labels, mean, covariance, tau, normalize, ignore_index, compute_grad);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(sdca, Autograd, m) { m.impl("closed_form_loss", &closed_form_loss_autograd); }

}  // namespace sdca
