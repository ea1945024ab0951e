// Autocast for the layer and stack ops, as torch.nn.LSTM has it: under
// torch.autocast("cuda"), floating CUDA arguments run in the autocast dtype.
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "lstm.h"

namespace fused_lstm {
namespace {

// lstm_layer_forward and lstm_layer share their arguments (input, batch_sizes, h0, c0,
// w_ih, w_hh, b_ih?, b_hh?, w_hr?, reverse); one caster serves both.
constexpr char kForwardOp[] = "fused_lstm::lstm_layer_forward";
constexpr char kLayerOp[] = "fused_lstm::lstm_layer";

template <typename Signature, typename Result, const char* kOpName>
Result layer_autocast(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                      const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                      const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                      const std::optional<at::Tensor>& w_hr, bool reverse) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  // cached_cast leaves alone what autocast would not cast (batch_sizes, CPU tensors).
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, at::kCUDA); };
  auto cast_optional = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(cast(*t)) : std::nullopt;
  };
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow(kOpName, "").typed<Signature>();
  return op.call(cast(input), batch_sizes, cast(h0), cast(c0), cast(w_ih), cast(w_hh),
                 cast_optional(b_ih), cast_optional(b_hh), cast_optional(w_hr), reverse);
}

// The stack casts once, before its autograd node: the node then saves and
// differentiates the tensors of the autocast dtype, as the layer ops do.
LayerResult stack_autocast(const at::Tensor& input, const at::Tensor& batch_sizes,
                           const at::Tensor& h0, const at::Tensor& c0, at::TensorList weights,
                           bool has_biases, bool has_proj, int64_t num_layers,
                           bool bidirectional) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKey::AutocastCUDA);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, at::kCUDA); };
  std::vector<at::Tensor> cast_weights;
  cast_weights.reserve(weights.size());
  for (const at::Tensor& w : weights) cast_weights.push_back(cast(w));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fused_lstm::lstm_stack", "")
                             .typed<StackSignature>();
  return op.call(cast(input), batch_sizes, cast(h0), cast(c0), cast_weights, has_biases, has_proj,
                 num_layers, bidirectional);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, AutocastCUDA, m) {
  m.impl("lstm_layer_forward", &layer_autocast<ForwardSignature, ForwardResult, kForwardOp>);
  m.impl("lstm_layer", &layer_autocast<LayerSignature, LayerResult, kLayerOp>);
  m.impl("lstm_stack", &stack_autocast);
}

}  // namespace fused_lstm
