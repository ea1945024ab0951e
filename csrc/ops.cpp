// The op schemas, declared once, and the argument checks every backend shares.
// Kernels register beside these: cpu/lstm_cpu.cpp (CPU), cuda/lstm_cuda.cu (CUDA).
#include <Python.h>
#include <torch/library.h>

#include "cpu/gemm.h"
#include "cpu/cell_kernels.h"
#include "lstm.h"

// Importing fused_lstm._C loads this library, which registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace fused_lstm {

TORCH_LIBRARY(fused_lstm, m) {
  m.def(
      "lstm_layer_forward(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor hiddens)");
  // One layer: (output, h_n, c_n), what fused_lstm.functional calls. The backend
  // kernels run without the workspace (inference). When a gradient is needed its
  // Autograd kernel (autograd.cpp) runs lstm_layer_forward and keeps the workspace to
  // itself, so that a backward which does not keep the graph may overwrite it.
  m.def(
      "lstm_layer(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse) "
      "-> (Tensor output, Tensor h_n, Tensor c_n)");
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? w_hr, Tensor output, Tensor gates, Tensor cells, Tensor hiddens, bool reverse, "
      "bool need_grad_input) -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, "
      "Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr)");
  // The same backward, writing the gate gradients over `gates` (the forward's workspace,
  // [N, 4H]) instead of a buffer of their own: what autograd calls when the graph is not
  // kept, as the workspace is then read for the last time.
  m.def(
      "lstm_layer_backward_overwrite_gates(Tensor grad_output, Tensor grad_h_n, "
      "Tensor grad_c_n, Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? w_hr, Tensor output, Tensor(a!) gates, Tensor cells, "
      "Tensor hiddens, bool reverse, bool need_grad_input) -> (Tensor grad_input, "
      "Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, "
      "Tensor grad_w_hr)");
  // Every layer and direction in one call (stack.cpp), what fused_lstm.LSTM runs:
  // weights in nn.LSTM's _flat_weights order, h0 [L*D, B, P], c0 [L*D, B, H] ->
  // output [N, D*P], h_n [L*D, B, P], c_n [L*D, B, H]. Its backend kernel loops the
  // lstm_layer op (inference); when a gradient is needed its Autograd kernel
  // (autograd.cpp) keeps every layer's workspace in one autograd node.
  m.def(
      "lstm_stack(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, "
      "Tensor[] weights, bool has_biases, bool has_proj, int num_layers, bool bidirectional) "
      "-> (Tensor output, Tensor h_n, Tensor c_n)");
  // Which build of the CPU cell kernels runs: "default", "avx2", "avx512", or
  // "" for the best this CPU supports. Returns the one now in use.
  m.def("set_cpu_capability(str capability) -> str", &cpu::set_cpu_capability);
  // Which GEMM path the CPU kernels take: "auto", "aten" or "small" (cpu/gemm.h).
  m.def("set_cpu_gemm(str backend) -> str", &cpu::set_cpu_gemm);
  // What the CPU kernels run on this machine (cpu/gemm.h), for fused_lstm.backend_info().
  m.def("cpu_info() -> Dict(str, str)", &cpu::cpu_info);
  // Frees the CPU buffers this thread keeps between calls (up to 256 MiB each: the
  // inference gate buffer, and backward's gate gradients and previous h).
  m.def("release_cpu_scratch() -> ()", &cpu::release_scratch);
}

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

}  // namespace

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

StackLayout check_stack_args(const at::Tensor& h0, const at::Tensor& c0, at::TensorList weights,
                             bool has_biases, bool has_proj, int64_t num_layers,
                             bool bidirectional) {
  const StackLayout layout = StackLayout::make(has_biases, has_proj, num_layers, bidirectional);
  const int64_t layer_directions = layout.layer_directions();
  TORCH_CHECK(num_layers > 0, "fused_lstm: expected num_layers > 0, got ", num_layers);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == layout.num_weights(),
              "fused_lstm: expected ", layout.num_weights(), " weights, got ", weights.size());
  for (const auto& [state, name] : {std::pair{&h0, "h0"}, {&c0, "c0"}}) {
    TORCH_CHECK(state->dim() == 3 && state->size(0) == layer_directions, "fused_lstm: expected ",
                name, " of shape [", layer_directions, ", batch, size], got ", state->sizes());
  }
  return layout;
}

LayerWeights layer_weights(const StackLayout& layout, at::TensorList weights, int64_t k) {
  const at::Tensor* w = weights.data() + k * layout.per_layer;
  const auto bias = [&](int i) { return layout.has_biases ? std::optional(w[i]) : std::nullopt; };
  return {w[0], w[1], bias(2), bias(3),
          layout.has_proj ? std::optional(w[layout.per_layer - 1]) : std::nullopt};
}

std::vector<Step> make_schedule(const at::Tensor& batch_sizes, bool reverse) {
  const auto sizes = batch_sizes.contiguous();
  const int64_t* bs = sizes.data_ptr<int64_t>();
  const int64_t T = sizes.numel();
  std::vector<int64_t> offsets(T);
  int64_t offset = 0;
  for (int64_t t = 0; t < T; ++t) {
    offsets[t] = offset;
    offset += bs[t];
  }
  std::vector<Step> steps;
  steps.reserve(T);
  for (int64_t n = 0; n < T; ++n) {
    const int64_t t = reverse ? T - 1 - n : n;
    Step step{bs[t], offsets[t], 0, 0};
    if (n > 0) {
      const int64_t prev_t = reverse ? t + 1 : t - 1;
      step.prev_offset = offsets[prev_t];
      step.prev_batch = std::min(bs[t], bs[prev_t]);
    }
    steps.push_back(step);
  }
  return steps;
}

std::vector<PrevHiddenTerm> prev_hidden_terms(const std::vector<Step>& steps, bool reverse) {
  if (steps.empty()) return {};
  const int64_t B = steps.front().batch;
  for (const Step& s : steps) {
    if (s.batch != B) return {};
  }
  const int64_t N = B * static_cast<int64_t>(steps.size());
  // Forward: step t (rows t*B) began from output step t-1; reverse: from step t+1.
  return {{reverse ? 0 : B, N - B, false, reverse ? B : 0},
          {steps.front().offset, B, true, 0}};
}

}  // namespace fused_lstm
