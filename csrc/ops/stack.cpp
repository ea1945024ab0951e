// lstm_stack: a stacked, optionally bidirectional LSTM in one op call, so that a
// small model pays the Python and dispatcher cost once, not once per layer and
// direction. This kernel, for every backend (CompositeExplicitAutograd), is the
// inference: each layer and direction is the lstm_layer op. With a gradient the
// Autograd kernel (ops/autograd.cpp) runs lstm_layer_forward per layer instead.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "lstm.h"

namespace fused_lstm {

LayerWeights layer_weights(const StackLayout& layout, at::TensorList weights, int64_t k) {
  const at::Tensor* w = weights.data() + k * layout.per_layer;
  const auto bias = [&](int i) { return layout.has_biases ? std::optional(w[i]) : std::nullopt; };
  return {w[0], w[1], bias(2), bias(3),
          layout.has_proj ? std::optional(w[layout.per_layer - 1]) : std::nullopt};
}

LayerResult run_stack(const StackLayout& layout, const at::Tensor& input, const at::Tensor& h0,
                      const at::Tensor& c0, at::TensorList weights, LayerCall layer_call) {
  std::vector<at::Tensor> h_n, c_n;
  h_n.reserve(layout.num_layers * layout.directions);
  c_n.reserve(layout.num_layers * layout.directions);
  at::Tensor layer_input = input;
  for (int64_t layer = 0; layer < layout.num_layers; ++layer) {
    std::array<at::Tensor, 2> outputs;
    for (int64_t direction = 0; direction < layout.directions; ++direction) {
      const int64_t k = layer * layout.directions + direction;
      auto [output, h, c] =
          layer_call(layer_input, k, layer_weights(layout, weights, k), h0[k], c0[k]);
      outputs[direction] = std::move(output);
      h_n.push_back(std::move(h));
      c_n.push_back(std::move(c));
    }
    layer_input = layout.directions == 1 ? outputs[0] : at::cat({outputs[0], outputs[1]}, -1);
  }
  return {layer_input, at::stack(h_n), at::stack(c_n)};
}

namespace {

// input [N, I] (time-major rows, packed or dense), batch_sizes [T],
// h0 [L*D, B, P], c0 [L*D, B, H] -> output [N, D*P], h_n [L*D, B, P], c_n [L*D, B, H]
LayerResult lstm_stack(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                       const at::Tensor& c0, at::TensorList weights, bool has_biases,
                       bool has_proj, int64_t num_layers, bool bidirectional) {
  static const auto layer_op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("fused_lstm::lstm_layer", "")
                                   .typed<LayerSignature>();
  const StackLayout layout =
      check_stack_args(h0, c0, weights, has_biases, has_proj, num_layers, bidirectional);
  return run_stack(layout, input, h0, c0, weights,
                   [&](const at::Tensor& layer_input, int64_t k, const LayerWeights& w,
                       const at::Tensor& h0_k, const at::Tensor& c0_k) {
                     return layer_op.call(layer_input, batch_sizes, h0_k, c0_k, w.w_ih, w.w_hh,
                                          w.b_ih, w.b_hh, w.w_hr, k % layout.directions == 1);
                   });
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CompositeExplicitAutograd, m) {
  m.impl("lstm_stack", &lstm_stack);
}

}  // namespace fused_lstm
