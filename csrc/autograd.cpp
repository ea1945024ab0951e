// Autograd for the ops, registered to the Autograd key in C++ so that a call
// costs no Python. The layer forward saves only what its backward reads; the
// layer backward is not itself differentiable and says so when asked.
#include <torch/autograd.h>
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

const auto& forward_op() {
  static const auto op = find_op<ForwardSignature>("fused_lstm::lstm_layer_forward");
  return op;
}

const auto& backward_op() {
  static const auto op = find_op<BackwardSignature>("fused_lstm::lstm_layer_backward");
  return op;
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
      const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
        backward_op().call(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih,
                           w_hh, w_hr, output, gates, cells, hiddens, reverse, need_grad_input);
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
      const std::optional<at::Tensor>& w_hr, bool reverse) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [output, h_n, c_n, gates, cells, hiddens] =
        forward_op().call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
    // Only what backward reads: no forward GEMM is recomputed.
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, w_hr.value_or(at::Tensor()), output,
                            gates, cells, hiddens});
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_bias"] = b_ih.has_value();
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
    auto result = LayerBackward::apply(
        zeros_if_undefined(grads[0], output), zeros_if_undefined(grads[1], h0),
        zeros_if_undefined(grads[2], c0), input, ctx->saved_data["batch_sizes"].toTensor(), h0,
        c0, w_ih, w_hh, w_hr, output, gates, cells, hiddens,
        ctx->saved_data["reverse"].toBool(), need_grad_input);
    const at::Tensor grad_bias = ctx->saved_data["has_bias"].toBool() ? result[5] : at::Tensor();
    // One gradient per forward argument, in order.
    return {need_grad_input ? result[0] : at::Tensor(), at::Tensor(), result[1], result[2],
            result[3], result[4], grad_bias, grad_bias,
            w_hr.has_value() ? result[6] : at::Tensor(), at::Tensor()};
  }
};

ForwardResult lstm_layer_forward_autograd(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  auto r = LayerForward::apply(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

BackwardResult lstm_layer_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input) {
  auto r = LayerBackward::apply(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih,
                                w_hh, w_hr, output, gates, cells, hiddens, reverse,
                                need_grad_input);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_autograd);
  m.impl("lstm_layer_backward", &lstm_layer_backward_autograd);
}

}  // namespace fused_lstm
