// lstm_stack_inference: a stacked, optionally bidirectional LSTM for inference in
// one op call, so that a small model pays the Python and dispatcher cost once,
// not once per layer and direction. One kernel for every backend
// (CompositeExplicitAutograd): each layer is the lstm_layer op.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "lstm.h"

namespace fused_lstm {
namespace {

// input [N, I] (time-major rows, packed or dense), batch_sizes [T],
// h0 [L*D, B, P], c0 [L*D, B, H] -> output [N, D*P], h_n [L*D, B, P], c_n [L*D, B, H]
LayerResult lstm_stack_inference(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, at::TensorList weights, bool has_biases, bool has_proj,
    int64_t num_layers, bool bidirectional) {
  static const auto layer_op = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("fused_lstm::lstm_layer", "")
                                   .typed<LayerSignature>();
  const int64_t directions = bidirectional ? 2 : 1;
  const int64_t per_layer = 2 + (has_biases ? 2 : 0) + (has_proj ? 1 : 0);
  TORCH_CHECK(num_layers > 0, "fused_lstm: expected num_layers > 0, got ", num_layers);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_layers * directions * per_layer,
              "fused_lstm: expected ", num_layers * directions * per_layer, " weights, got ",
              weights.size());
  for (const auto& [state, name] : {std::pair{&h0, "h0"}, {&c0, "c0"}}) {
    TORCH_CHECK(state->dim() == 3 && state->size(0) == num_layers * directions,
                "fused_lstm: expected ", name, " of shape [", num_layers * directions,
                ", batch, size], got ", state->sizes());
  }
  std::vector<at::Tensor> h_n, c_n;
  h_n.reserve(num_layers * directions);
  c_n.reserve(num_layers * directions);
  at::Tensor layer_input = input;
  for (int64_t layer = 0; layer < num_layers; ++layer) {
    std::array<at::Tensor, 2> outputs;
    for (int64_t direction = 0; direction < directions; ++direction) {
      const int64_t k = layer * directions + direction;
      const at::Tensor* w = weights.data() + k * per_layer;  // w_ih, w_hh[, b_ih, b_hh][, w_hr]
      const auto bias = [&](int i) { return has_biases ? std::optional(w[i]) : std::nullopt; };
      const auto w_hr = has_proj ? std::optional(w[per_layer - 1]) : std::nullopt;
      auto [output, h, c] = layer_op.call(layer_input, batch_sizes, h0[k], c0[k], w[0], w[1],
                                          bias(2), bias(3), w_hr, direction == 1);
      outputs[direction] = std::move(output);
      h_n.push_back(std::move(h));
      c_n.push_back(std::move(c));
    }
    layer_input = directions == 1 ? outputs[0] : at::cat({outputs[0], outputs[1]}, -1);
  }
  return {layer_input, at::stack(h_n), at::stack(c_n)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CompositeExplicitAutograd, m) {
  m.impl("lstm_stack_inference", &lstm_stack_inference);
}

}  // namespace fused_lstm
