// The argument checks every backend shares: they raise nn.LSTM-like errors on direct
// op calls (TORCH_CHECK) and fill the params structs the kernels take (lstm.h).
#include <ATen/ATen.h>

#include "core/schedule.h"
#include "lstm.h"

namespace fused_lstm {
namespace {

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "fused_lstm: expected ", name, " of shape ", expected,
              ", got ", t.sizes());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fused_lstm: expected ", name,
              " to have dtype ", input.scalar_type(), " (the input's), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "fused_lstm: expected ", name, " on device ",
              input.device(), " (the input's), got ", t.device());
}

// batch_sizes: [T] int64 on the CPU, non-negative, non-increasing, summing to N.
// (Zeros only arise from a dense batch of 0, which nn.LSTM accepts.)
void check_batch_sizes(const at::Tensor& batch_sizes, int64_t N) {
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong &&
                  batch_sizes.dim() == 1,
              "fused_lstm: expected batch_sizes to be a 1-D int64 CPU tensor, got a ",
              batch_sizes.dim(), "-D ", batch_sizes.scalar_type(), " tensor on ",
              batch_sizes.device());
  TORCH_CHECK(batch_sizes.numel() > 0, "fused_lstm: expected at least one timestep, got 0");
  const auto sizes = batch_sizes.contiguous();
  const int64_t* bs = sizes.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t t = 0; t < sizes.numel(); ++t) {
    TORCH_CHECK(bs[t] >= 0, "fused_lstm: expected non-negative batch_sizes, got ", bs[t],
                " at step ", t);
    TORCH_CHECK(t == 0 || bs[t] <= bs[t - 1],
                "fused_lstm: expected non-increasing batch_sizes, got ", bs[t - 1], " then ",
                bs[t], " at step ", t);
    total += bs[t];
  }
  TORCH_CHECK(total == N, "fused_lstm: batch_sizes sum to ", total, " but input has ", N,
              " rows");
}

LayerSizes check_forward_args(
    const at::Tensor& input, const at::Tensor& batch_sizes,
    const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(input.dim() == 2, "fused_lstm: expected input of shape [N, input_size], got ",
              input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "fused_lstm: expected a floating-point input, got ", input.scalar_type());
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) % 4 == 0 && w_ih.size(0) > 0,
              "fused_lstm: expected w_ih of shape [4 * hidden_size, input_size], got ",
              w_ih.sizes());
  LayerSizes s;
  s.N = input.size(0);
  s.I = input.size(1);
  s.H = w_ih.size(0) / 4;
  s.has_proj = w_hr.has_value();
  if (s.has_proj) {
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(0) > 0 && w_hr->size(0) < s.H,
                "fused_lstm: expected w_hr of shape [proj_size, hidden_size] with "
                "0 < proj_size < hidden_size, got ", w_hr->sizes());
  }
  s.P = s.has_proj ? w_hr->size(0) : s.H;
  check_batch_sizes(batch_sizes, s.N);
  s.T = batch_sizes.size(0);
  s.B = batch_sizes.contiguous().data_ptr<int64_t>()[0];

  check_shape(w_ih, "w_ih", {4 * s.H, s.I});
  check_shape(w_hh, "w_hh", {4 * s.H, s.P});
  check_shape(h0, "h0", {s.B, s.P});
  check_shape(c0, "c0", {s.B, s.H});
  check_like(w_ih, "w_ih", input);
  check_like(w_hh, "w_hh", input);
  check_like(h0, "h0", input);
  check_like(c0, "c0", input);
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "fused_lstm: expected both b_ih and b_hh, or neither");
  if (b_ih.has_value()) {
    check_shape(*b_ih, "b_ih", {4 * s.H});
    check_shape(*b_hh, "b_hh", {4 * s.H});
    check_like(*b_ih, "b_ih", input);
    check_like(*b_hh, "b_hh", input);
  }
  if (s.has_proj) {
    check_shape(*w_hr, "w_hr", {s.P, s.H});
    check_like(*w_hr, "w_hr", input);
  }
  return s;
}

LayerSizes check_backward_args(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes,
    const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
    const at::Tensor& hiddens) {
  // b_ih/b_hh do not enter the backward math; the forward checks cover the rest.
  const LayerSizes s = check_forward_args(input, batch_sizes, h0, c0, w_ih, w_hh,
                                          std::nullopt, std::nullopt, w_hr);
  check_shape(grad_output, "grad_output", {s.N, s.P});
  check_shape(grad_h_n, "grad_h_n", {s.B, s.P});
  check_shape(grad_c_n, "grad_c_n", {s.B, s.H});
  check_shape(output, "output", {s.N, s.P});
  check_shape(gates, "gates", {s.N, 4 * s.H});
  check_shape(cells, "cells", {s.N, s.H});
  if (s.has_proj) {
    check_shape(hiddens, "hiddens", {s.N, s.H});
  } else {
    check_shape(hiddens, "hiddens", {0});
  }
  for (const auto& [t, name] : {std::pair{&grad_output, "grad_output"},
                                 {&grad_h_n, "grad_h_n"}, {&grad_c_n, "grad_c_n"},
                                 {&output, "output"}, {&gates, "gates"}, {&cells, "cells"},
                                 {&hiddens, "hiddens"}}) {
    check_like(*t, name, input);
  }
  return s;
}

}  // namespace

LayerForwardParams make_forward_params(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool keep_workspace) {
  LayerForwardParams p;
  p.s = check_forward_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  p.steps = make_schedule(batch_sizes, reverse);
  p.reverse = reverse;
  p.keep_workspace = keep_workspace;
  p.input = input.contiguous();
  p.h0 = h0.contiguous();
  p.c0 = c0.contiguous();
  p.w_ih = w_ih.contiguous();
  p.w_hh = w_hh.contiguous();
  if (b_ih.has_value()) {
    p.b_ih = b_ih->contiguous();
    p.b_hh = b_hh->contiguous();
  }
  if (p.s.has_proj) p.w_hr = w_hr->contiguous();
  return p;
}

LayerBackwardParams make_backward_params(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input,
    bool need_grad_h0, bool overwrite_gates) {
  LayerBackwardParams p;
  p.s = check_backward_args(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih,
                            w_hh, w_hr, output, gates, cells, hiddens);
  p.steps = make_schedule(batch_sizes, reverse);
  p.reverse = reverse;
  p.need_grad_input = need_grad_input;
  p.need_grad_h0 = need_grad_h0;
  p.overwrite_gates = overwrite_gates;
  p.grad_output = grad_output.contiguous();
  p.grad_h_n = grad_h_n.contiguous();
  p.grad_c_n = grad_c_n.contiguous();
  p.input = input.contiguous();
  p.h0 = h0.contiguous();
  p.c0 = c0.contiguous();
  p.w_ih = w_ih.contiguous();
  p.w_hh = w_hh.contiguous();
  if (p.s.has_proj) p.w_hr = w_hr->contiguous();
  p.output = output.contiguous();
  // With overwrite_gates the gradients go over this: `gates` itself, or a contiguous
  // copy of our own.
  p.gates = gates.contiguous();
  p.cells = cells.contiguous();
  p.hiddens = hiddens.contiguous();
  return p;
}

StackLayout check_stack_args(const at::Tensor& h0, const at::Tensor& c0, at::TensorList weights,
                             bool has_biases, bool has_proj, int64_t num_layers,
                             bool bidirectional) {
  const StackLayout layout = StackLayout::make(has_biases, has_proj, num_layers, bidirectional);
  const int64_t layer_directions = layout.layer_directions();
  TORCH_CHECK(num_layers > 0, "fused_lstm: expected num_layers > 0, got ", num_layers);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layout.num_weights(),
              "fused_lstm: expected ", layout.num_weights(), " weights, got ", weights.size());
  for (const auto& [state, name] : {std::pair{&h0, "h0"}, {&c0, "c0"}}) {
    // sym_size: this runs in the Autograd kernel, traced by torch.compile, where size()
    // would specialize the graph on every dimension, the batch too.
    TORCH_CHECK(state->dim() == 3 && state->sym_size(0) == layer_directions,
                "fused_lstm: expected ", name, " of shape [", layer_directions,
                ", batch, size], got ", state->sizes());
  }
  return layout;
}

}  // namespace fused_lstm
