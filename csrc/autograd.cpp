// Autograd for the ops, registered to the Autograd key in C++ so that a call
// costs no Python. The layer forward saves only what its backward reads; the
// layer backward is not itself differentiable and says so when asked.
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "lstm.h"

namespace fused_lstm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const auto& layer_op() {
  static const auto op = find_op<LayerSignature>("fused_lstm::lstm_layer");
  return op;
}

const auto& forward_op() {
  static const auto op = find_op<ForwardSignature>("fused_lstm::lstm_layer_forward");
  return op;
}

const auto& backward_op(bool overwrite_gates) {
  static const auto op = find_op<BackwardSignature>("fused_lstm::lstm_layer_backward");
  static const auto overwriting =
      find_op<BackwardSignature>("fused_lstm::lstm_layer_backward_overwrite_gates");
  return overwrite_gates ? overwriting : op;
}

at::Tensor zeros_if_undefined(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

class LayerBackward : public torch::autograd::Function<LayerBackward> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& grad_h_n,
      const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& batch_sizes,
      const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
      const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
      const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input,
      bool overwrite_gates) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
        backward_op(overwrite_gates)
            .call(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr,
                  output, gates, cells, hiddens, reverse, need_grad_input);
    // Below ADInplaceOrView nothing counted the write: a later use of gates saved
    // elsewhere for backward then fails loudly instead of reading gradients.
    if (overwrite_gates) torch::autograd::impl::bump_version(gates);
    return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "fused_lstm: double backward is not supported (the LSTM backward is not itself "
                "differentiable); use torch.nn.LSTM where second derivatives are needed");
  }
};

class LayerForward : public torch::autograd::Function<LayerForward> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& batch_sizes,
      const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
      const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
      const std::optional<at::Tensor>& w_hr, bool reverse, bool private_workspace) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // Gradients that never arrive stay undefined: zeros for the non-differentiable
    // gates, cells and hiddens would cost as much memory as the workspace itself.
    ctx->set_materialize_grads(false);
    auto [output, h_n, c_n, gates, cells, hiddens] =
        forward_op().call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
    // Only what backward reads: no forward GEMM is recomputed.
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, w_hr.value_or(at::Tensor()), output,
                            gates, cells, hiddens});
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_bias"] = b_ih.has_value();
    // Called from lstm_layer, which returns only (output, h_n, c_n): nothing outside
    // can see the workspace.
    ctx->saved_data["private_workspace"] = private_workspace;
    ctx->mark_non_differentiable({gates, cells, hiddens});
    return {output, h_n, c_n, gates, cells, hiddens};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &h0 = saved[1], &c0 = saved[2], &w_ih = saved[3],
                     &w_hh = saved[4], &output = saved[6], &gates = saved[7], &cells = saved[8],
                     &hiddens = saved[9];
    const std::optional<at::Tensor> w_hr =
        saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    const bool need_grad_input = ctx->needs_input_grad(0);
    // A private workspace is read for the last time here unless the graph is kept
    // (retain_graph), so the gate gradients may go over the gates: [N, 4H] less memory
    // at the peak. Not while tracing (torch.compile's functional or fake tensors), where
    // the graphs stay functional.
    const bool traced = gates.key_set().has_any(
        c10::DispatchKeySet({c10::DispatchKey::Functionalize, c10::DispatchKey::Python}));
    const bool overwrite_gates = ctx->saved_data["private_workspace"].toBool() && !traced &&
                                 !torch::autograd::get_current_graph_task_keep_graph();
    auto result = LayerBackward::apply(
        zeros_if_undefined(grads[0], output), zeros_if_undefined(grads[1], h0),
        zeros_if_undefined(grads[2], c0), input, ctx->saved_data["batch_sizes"].toTensor(), h0,
        c0, w_ih, w_hh, w_hr, output, gates, cells, hiddens,
        ctx->saved_data["reverse"].toBool(), need_grad_input, overwrite_gates);
    const at::Tensor grad_bias = ctx->saved_data["has_bias"].toBool() ? result[5] : at::Tensor();
    // One gradient per forward argument, in order.
    return {need_grad_input ? result[0] : at::Tensor(), at::Tensor(), result[1], result[2],
            result[3], result[4], grad_bias, grad_bias,
            w_hr.has_value() ? result[6] : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

ForwardResult lstm_layer_forward_autograd(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  auto r = LayerForward::apply(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                               /*private_workspace=*/false);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

// lstm_layer: the forward with a private workspace when a gradient is needed, else
// the backend's kernel without one.
LayerResult lstm_layer_autograd(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (requires_grad(input) || requires_grad(h0) || requires_grad(c0) ||
                           requires_grad(w_ih) || requires_grad(w_hh) || requires_grad(b_ih) ||
                           requires_grad(b_hh) || requires_grad(w_hr));
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return layer_op().call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
  }
  auto r = LayerForward::apply(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                               /*private_workspace=*/true);
  return {r[0], r[1], r[2]};
}

template <bool kOverwriteGates>
BackwardResult lstm_layer_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input) {
  auto r = LayerBackward::apply(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih,
                                w_hh, w_hr, output, gates, cells, hiddens, reverse,
                                need_grad_input, kOverwriteGates);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_autograd);
  m.impl("lstm_layer", &lstm_layer_autograd);
  m.impl("lstm_layer_backward", &lstm_layer_backward_autograd<false>);
  m.impl("lstm_layer_backward_overwrite_gates", &lstm_layer_backward_autograd<true>);
}

}  // namespace fused_lstm
