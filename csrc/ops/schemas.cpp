// The op schemas, declared once. Kernels register beside them: cpu/forward.cpp and
// cpu/backward.cpp (CPU), cuda/forward.cu and cuda/backward.cu (CUDA), ops/autograd.cpp
// (Autograd), ops/autocast.cpp (AutocastCUDA), ops/stack.cpp (the stack's inference).
#include <Python.h>
#include <torch/library.h>

#include "cpu/gemm.h"
#include "cpu/info.h"
#include "cpu/kernels/kernels.h"
#include "cpu/scratch.h"
#include "cpu/tuning.h"
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
  // Autograd kernel (ops/autograd.cpp) runs lstm_layer_forward and keeps the workspace to
  // itself, so that a backward which does not keep the graph may overwrite it.
  m.def(
      "lstm_layer(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse) "
      "-> (Tensor output, Tensor h_n, Tensor c_n)");
  // One layer's backward (gradient shapes in lstm.h's BackwardResult); grad_input and
  // grad_h0 come back as [0] when need_grad_input / need_grad_h0 say they are not wanted,
  // and the GEMMs only they need are skipped.
  m.def(
      "lstm_layer_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? w_hr, Tensor output, Tensor gates, Tensor cells, Tensor hiddens, bool reverse, "
      "bool need_grad_input, bool need_grad_h0=True) -> (Tensor grad_input, Tensor grad_h0, "
      "Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, Tensor grad_w_hr)");
  // The same backward, writing the gate gradients over `gates` (the forward's workspace,
  // [N, 4H]) instead of a buffer of their own: what autograd calls when the graph is not
  // kept, as the workspace is then read for the last time.
  m.def(
      "lstm_layer_backward_overwrite_gates(Tensor grad_output, Tensor grad_h_n, "
      "Tensor grad_c_n, Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? w_hr, Tensor output, Tensor(a!) gates, Tensor cells, "
      "Tensor hiddens, bool reverse, bool need_grad_input, bool need_grad_h0=True) -> "
      "(Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr)");
  // Every layer and direction in one call (ops/stack.cpp), what fused_lstm.LSTM runs:
  // weights in nn.LSTM's _flat_weights order, h0 [L*D, B, P], c0 [L*D, B, H] ->
  // output [N, D*P], h_n [L*D, B, P], c_n [L*D, B, H]. Its backend kernel loops the
  // lstm_layer op (inference); when a gradient is needed its Autograd kernel
  // (ops/autograd.cpp) keeps every layer's workspace in one autograd node.
  m.def(
      "lstm_stack(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, "
      "Tensor[] weights, bool has_biases, bool has_proj, int num_layers, bool bidirectional) "
      "-> (Tensor output, Tensor h_n, Tensor c_n)");
  // Which build of the CPU cell kernels runs: "default", "avx2", "avx512", or
  // "" for the best this CPU supports. Returns the one now in use.
  m.def("set_cpu_capability(str capability) -> str", &cpu::set_cpu_capability);
  // Which GEMM path the CPU kernels take: "auto", "aten" or "small" (cpu/gemm.h).
  m.def("set_cpu_gemm(str backend) -> str", &cpu::set_cpu_gemm);
  // Sets one dispatch rule of cpu/tuning.h for the capability in use (value -1: its
  // default), for experiments and tests; returns the previous value.
  m.def("set_cpu_tuning(str name, int value) -> int", &cpu::set_cpu_tuning);
  // What the CPU kernels run on this machine (cpu/gemm.h), for fused_lstm.backend_info().
  m.def("cpu_info() -> Dict(str, str)", &cpu::cpu_info);
  // The CPU GEMMs the kernels use (cpu/gemm.h), for tests and benchmarks: op(a) @ op(b)
  // (+ c, or + bias: gemm_bias), op(x) = x^T where trans_x; a: [M, K] ([K, M] with
  // trans_a), b: [K, N] ([N, K] with trans_b), c: [M, N], bias: [N]; stream: C by
  // non-temporal stores where gemm_columns runs it (as the input GEMM's gates; gemm_bias,
  // no c). Runs whichever backend the GEMM setting and tuning.h pick.
  m.def("cpu_gemm(Tensor a, Tensor b, bool trans_a, bool trans_b, Tensor? c=None, "
        "Tensor? bias=None, bool stream=False) -> Tensor");
  // Frees the CPU buffers this thread keeps between calls (up to 256 MiB each: the
  // inference gate buffer, and backward's gate gradients and previous h).
  m.def("release_cpu_scratch() -> ()", &cpu::release_scratch);
  // Whether CUDA layers run the persistent kernels (cuda/persistent.h): "on", "off", or
  // "" to ask. Returns the setting in force. CUDA builds only.
  m.def("set_cuda_persistent(str setting) -> str");
  // Launches of the persistent kernels so far (CUDA builds only).
  m.def("cuda_persistent_launches() -> int");
  // The CUDA persistent kernels' planner and their CPU emulation (core/persistent.h,
  // cpu/persistent_emulation.cpp), for tests. plan: for a layer and device properties,
  // the cluster size, batch slice, shared memory bytes, or why not.
  m.def(
      "persistent_plan(int hidden_size, int proj_size, int batch, int steps, int elem_size, "
      "bool has_proj, int cc_major, int cc_minor, int sm_count, int smem_per_block, "
      "int max_cluster) -> Dict(str, str)");
  // One layer forward (no projection) run by the persistent block program, `cluster`
  // blocks of `threads` threads per slice of `batch_slice` rows.
  m.def(
      "persistent_emulate_forward(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool reverse, int cluster, "
      "int batch_slice, int threads) -> (Tensor output, Tensor h_n, Tensor c_n, "
      "Tensor gates, Tensor cells)");
  // Its backward time loop: the gate gradients and the state gradients.
  m.def(
      "persistent_emulate_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor batch_sizes, Tensor c0, Tensor w_hh, Tensor gates, Tensor cells, bool reverse, "
      "int cluster, int batch_slice, int threads) -> (Tensor dgates, Tensor grad_h0, "
      "Tensor grad_c0)");
}

}  // namespace fused_lstm
