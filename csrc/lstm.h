// What the ops and every backend share: sizes, the step schedule's Step, the params
// structs the backends' kernels take, and the op signatures.
//
// One op call runs one LSTM layer in one direction over a packed sequence:
//   input:       [N, I]  rows of all timesteps, time-major; N = sum(batch_sizes)
//   batch_sizes: [T]     int64 on the CPU, non-increasing (dense input: all B)
//   h0: [B, P], c0: [B, H]; P = proj_size if w_hr is given, else H
//   w_ih: [4H, I], w_hh: [4H, P], b_ih, b_hh: [4H], w_hr: [P, H]; gates i, f, g, o
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include <tuple>
#include <vector>

namespace fused_lstm {

// Sizes of one layer call, read off the validated arguments.
struct LayerSizes {
  int64_t N;  // rows over all timesteps
  int64_t T;  // timesteps
  int64_t B;  // batch (rows of the first step)
  int64_t I;  // input features
  int64_t H;  // hidden size
  int64_t P;  // size of h: proj_size, or H without projection
  bool has_proj;
};

// One timestep, in the order the forward pass runs them.
struct Step {
  int64_t batch;        // rows active at this step
  int64_t offset;       // first row of this step in the [N, .] tensors
  int64_t prev_offset;  // first row of the step run before it (unused at the first)
  int64_t prev_batch;   // rows [0, prev_batch) carry state from that step; the rest start from h0/c0
};

// One layer forward's arguments, checked and made contiguous once (make_forward_params,
// ops/checks.cpp), with its schedule: what every backend's forward takes.
struct LayerForwardParams {
  LayerSizes s;
  std::vector<Step> steps;  // in the order they run (make_schedule)
  bool reverse;
  // Training: the activated gates, the cells and (with a projection) the hiddens are
  // returned for backward; inference: kept only as long as a step needs them.
  bool keep_workspace;
  at::Tensor input;  // [N, I]
  at::Tensor h0;     // [B, P]
  at::Tensor c0;     // [B, H]
  at::Tensor w_ih;   // [4H, I]
  at::Tensor w_hh;   // [4H, P]
  at::Tensor b_ih, b_hh;  // [4H] each, undefined without biases
  at::Tensor w_hr;   // [P, H], undefined without a projection
};

// One layer backward's arguments, likewise (make_backward_params).
struct LayerBackwardParams {
  LayerSizes s;
  std::vector<Step> steps;  // in the forward's order
  bool reverse;
  bool need_grad_input;
  // Whether grad_h0 is wanted. Without it the first step's dL/dh_prev = dgates W_hh is
  // not computed (h0 that needs no gradient: an LSTMCell or decoding step's h, an LSTM's
  // default zeros).
  bool need_grad_h0;
  // The gate gradients go over `gates` (op lstm_layer_backward_overwrite_gates: each
  // step reads its gates before it writes their gradients), else into a buffer.
  bool overwrite_gates;
  at::Tensor grad_output, grad_h_n, grad_c_n;  // [N, P], [B, P], [B, H]
  at::Tensor input, h0, c0, w_ih, w_hh;        // as in LayerForwardParams
  at::Tensor w_hr;                             // [P, H], undefined without a projection
  at::Tensor output;                           // [N, P]
  at::Tensor gates;                            // [N, 4H] activated i, f, g, o
  at::Tensor cells;                            // [N, H] c_t
  at::Tensor hiddens;                          // [N, H] h_t before the projection, or [0]

  // Whether step's dL/dh_prev = dgates W_hh is computed: unless every row of it starts
  // from h0 (the first step) and grad_h0 is not wanted. (Steps where only some rows do,
  // in reverse over packed input, compute them all: a GEMM of fewer rows may round its
  // other rows differently, and the other gradients stay bit for bit the same.)
  bool needs_dh_prev(const Step& step) const { return need_grad_h0 || step.prev_batch > 0; }
};

LayerForwardParams make_forward_params(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool keep_workspace);

LayerBackwardParams make_backward_params(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input,
    bool need_grad_h0, bool overwrite_gates);

// (output [N, P], h_n [B, P], c_n [B, H],
//  gates [N, 4H] activated i, f, g, o, cells [N, H] c_t, hiddens [N, H] h_t before
//  the projection, or [0] without one)
using ForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// (output [N, P], h_n [B, P], c_n [B, H]): the forward without the workspace.
using LayerResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// (grad_input [N, I] or [0] when not needed, grad_h0 [B, P] or [0] when not needed,
//  grad_c0 [B, H],
//  grad_w_ih [4H, I], grad_w_hh [4H, P], grad_bias [4H] (for b_ih and b_hh alike),
//  grad_w_hr [P, H] or [0])
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;

// A stack of layers and directions (op lstm_stack): `weights` in nn.LSTM's
// _flat_weights order, for each layer and direction w_ih, w_hh[, b_ih, b_hh][, w_hr];
// h0 [L*D, B, P], c0 [L*D, B, H].
struct StackLayout {
  int64_t num_layers;
  int64_t directions;  // 2 if bidirectional, else 1
  int64_t per_layer;   // weights per layer and direction
  bool has_biases;
  bool has_proj;

  static StackLayout make(bool has_biases, bool has_proj, int64_t num_layers, bool bidirectional) {
    return {num_layers, bidirectional ? 2 : 1, 2 + (has_biases ? 2 : 0) + (has_proj ? 1 : 0),
            has_biases, has_proj};
  }
  int64_t layer_directions() const { return num_layers * directions; }
  int64_t num_weights() const { return layer_directions() * per_layer; }
};

// The weights of layer-direction k = layer * directions + direction.
struct LayerWeights {
  at::Tensor w_ih, w_hh;
  std::optional<at::Tensor> b_ih, b_hh, w_hr;
};
LayerWeights layer_weights(const StackLayout& layout, at::TensorList weights, int64_t k);

// Runs a stack's layers and directions in order (ops/stack.cpp): per layer-direction k,
// layer_call(layer_input [N, I or D*P], k, weights, h0 [B, P], c0 [B, H]) -> (output, h_n,
// c_n), the reverse direction being k odd when bidirectional. Returns the last layer's
// output [N, D*P] and h_n [L*D, B, P], c_n [L*D, B, H].
using LayerCall = c10::function_ref<LayerResult(const at::Tensor& layer_input, int64_t k,
                                                const LayerWeights& w, const at::Tensor& h0,
                                                const at::Tensor& c0)>;
LayerResult run_stack(const StackLayout& layout, const at::Tensor& input, const at::Tensor& h0,
                      const at::Tensor& c0, at::TensorList weights, LayerCall layer_call);

// Checks what the stack adds to the per-layer checks: the count of weights, h0/c0 [L*D, B, .].
StackLayout check_stack_args(const at::Tensor& h0, const at::Tensor& c0, at::TensorList weights,
                             bool has_biases, bool has_proj, int64_t num_layers,
                             bool bidirectional);

// The op signatures, for typed dispatcher calls (ops/autograd.cpp, ops/autocast.cpp).
using ForwardSignature = ForwardResult(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse);
using LayerSignature = LayerResult(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse);
using StackSignature = LayerResult(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, at::TensorList weights, bool has_biases, bool has_proj,
    int64_t num_layers, bool bidirectional);
using BackwardSignature = BackwardResult(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input,
    bool need_grad_h0);

}  // namespace fused_lstm
