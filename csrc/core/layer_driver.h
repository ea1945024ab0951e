// The one layer driver, for every backend: the input GEMM over all steps, the time
// loop (per step a recurrent GEMM, the cell update, the projection), and in backward
// the reverse loop then the weight-gradient GEMMs (core/weight_gradients.h).
//
// A backend is a type with
//   DeviceGuard                      constructed from the input, held for the call
//   scratch(slot, rows, cols, opts)  a buffer that lives only inside the call
//   gathers_prev_hidden(p)           whether its backward needs h_prev [N, P] gathered
//                                    even for dense input
//   Forward<scalar_t>, Backward<scalar_t>
//                                    one call's state: its GEMMs and cell passes, and
//                                    fused(...), the backend's own loop for the call
//                                    (the CPU's fused loops), which the driver runs
//                                    instead of its loop when it says it ran.
// cpu/backend.h and cuda/backend.cuh define them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "core/schedule.h"
#include "core/weight_gradients.h"
#include "lstm.h"

namespace fused_lstm {

// The buffers a backend may keep between calls (Backend::scratch); the last two are
// the CPU GEMMs' own (an operand gathered transposed, an operand packed in column panels).
enum class Scratch { kGates, kGradGates, kPrevHidden, kGemmOperand, kGemmPanels, kCount };

// Where a forward's steps read and write, in the call's tensors.
template <typename scalar_t>
struct ForwardBuffers {
  scalar_t* gates;      // [N, 4H]: the input part in, activated out
  scalar_t* output;     // [N, P]
  scalar_t* h_state;    // [B, P] the running h: h0 in, h_n out
  scalar_t* c_state;    // [B, H] the running c: c0 in, c_n out
  scalar_t* cells;      // c of step row r at cells + offset * cells_step + r * H:
  int64_t cells_step;   //   [N, H] with step H, or (inference) c_state with step 0
  scalar_t* hiddens;    // with a projection, h before it, likewise ([N, H] or [B, H]);
  int64_t hiddens_step; //   else null
};

// Where a backward's steps read and write.
template <typename scalar_t>
struct BackwardBuffers {
  scalar_t* dgates;             // [N, 4H] dL/d(pre-activation) out
  scalar_t* dh;                 // [B, P] the running dL/dh: grad_h_n in, grad_h0 out
  scalar_t* dc;                 // [B, H] the running dL/dc: grad_c_n in, grad_c0 out
  scalar_t* grad_r;             // [N, P] dL/dr with a projection, else null
  scalar_t* grad_hidden;        // [B, H] dL/dh before the projection, else null
  const scalar_t* grad_output;  // [N, P]
  const scalar_t* gates;        // [N, 4H] activated
  const scalar_t* cells;        // [N, H]
  const scalar_t* c0;           // [B, H]
};

// What a backend's own backward loop did.
enum class FusedBackward {
  kNotRun,                   // the driver runs its loop
  kLoop,                     // the loop ran; the driver computes the weight gradients
  kLoopAndWeightGradients,   // the loop computed the weight gradients beside it, too
};

template <typename Backend>
ForwardResult layer_forward(const LayerForwardParams& p) {
  const auto [N, T, B, I, H, P, has_proj] = p.s;
  const typename Backend::DeviceGuard device_guard(p.input);
  const bool keep = p.keep_workspace;
  const auto opts = p.input.options();
  at::Tensor output = at::empty({N, P}, opts);
  at::Tensor h_n = p.h0.clone();
  at::Tensor c_n = p.c0.clone();
  // Training: gates [N, 4H], cells [N, H], hiddens [N, H] or [0]. Inference: a scratch
  // gate buffer, c written only to c_n, h before the projection in a [B, H] buffer.
  at::Tensor gates = keep ? at::empty({N, 4 * H}, opts)
                          : Backend::scratch(Scratch::kGates, N, 4 * H, opts);
  at::Tensor cells = keep ? at::empty({N, H}, opts) : at::empty({0}, opts);
  at::Tensor hiddens = !has_proj ? at::empty({0}, opts)
                       : keep    ? at::empty({N, H}, opts)
                                 : at::empty({B, H}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "lstm_layer_forward", [&] {
    typename Backend::template Forward<scalar_t> layer(p);
    scalar_t* c_state = c_n.data_ptr<scalar_t>();
    const ForwardBuffers<scalar_t> buf{
        gates.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(),
        c_state, keep ? cells.data_ptr<scalar_t>() : c_state, keep ? H : 0,
        has_proj ? hiddens.data_ptr<scalar_t>() : nullptr, keep ? H : 0};
    // Input GEMM over all steps, bias folded in: gates = x W_ih^T + (b_ih + b_hh).
    layer.input_gemm(buf.gates);
    if (layer.fused(buf)) return;
    for (const Step& step : p.steps) {
      const int64_t b = step.batch;
      if (b == 0) continue;
      scalar_t* g = buf.gates + step.offset * 4 * H;
      layer.recurrent_gemm(b, buf.h_state, g);  // gates[t] += h_state[:b] W_hh^T
      scalar_t* h_t = has_proj ? buf.hiddens + step.offset * buf.hiddens_step
                               : buf.output + step.offset * H;
      layer.cell_forward(b, g, buf.c_state, buf.cells + step.offset * buf.cells_step, h_t,
                         has_proj ? nullptr : buf.h_state);
      if (has_proj) {
        // r_t = h_t W_hr^T: both the output and the next h.
        scalar_t* r_t = buf.output + step.offset * P;
        layer.projection_gemm(b, h_t, r_t);
        layer.copy_rows(buf.h_state, r_t, b, P);
      }
    }
  });
  if (!keep) return {output, h_n, c_n, at::empty({0}, opts), cells, at::empty({0}, opts)};
  return {output, h_n, c_n, gates, cells, hiddens};
}

template <typename Backend>
BackwardResult layer_backward(const LayerBackwardParams& p) {
  const auto [N, T, B, I, H, P, has_proj] = p.s;
  const typename Backend::DeviceGuard device_guard(p.input);
  const auto opts = p.input.options();
  at::Tensor grad_gates = p.overwrite_gates
                              ? p.gates
                              : Backend::scratch(Scratch::kGradGates, N, 4 * H, opts);  // [N, 4H]
  at::Tensor grad_h = p.grad_h_n.clone();  // [B, P]
  at::Tensor grad_c = p.grad_c_n.clone();  // [B, H]
  // [N, P] the h each step began from, gathered where the batch varies (or the backend
  // asks for it).
  at::Tensor h_prev = Backend::gathers_prev_hidden(p) || prev_hidden_terms(p.steps, p.reverse).empty()
                          ? Backend::scratch(Scratch::kPrevHidden, N, P, opts)
                          : at::Tensor();
  at::Tensor grad_r = has_proj ? at::empty({N, P}, opts) : at::Tensor();
  at::Tensor grad_hidden = has_proj ? at::empty({B, H}, opts) : at::Tensor();
  at::Tensor grad_input = at::empty({p.need_grad_input ? N : 0, I}, opts);
  at::Tensor grad_w_ih = at::empty({4 * H, I}, opts);
  at::Tensor grad_w_hh = at::empty({4 * H, P}, opts);
  at::Tensor grad_w_hr = has_proj ? at::empty({P, H}, opts) : at::empty({0}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "lstm_layer_backward", [&] {
    typename Backend::template Backward<scalar_t> layer(p);
    const auto ptr = [](const at::Tensor& t) {
      return t.defined() ? t.data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr);
    };
    const BackwardBuffers<scalar_t> buf{
        ptr(grad_gates), ptr(grad_h), ptr(grad_c), ptr(grad_r), ptr(grad_hidden),
        ptr(p.grad_output), ptr(p.gates), ptr(p.cells), ptr(p.c0)};
    const WeightGradientArgs<scalar_t> args{
        buf.dgates, ptr(p.input), ptr(p.w_ih), ptr(p.output), ptr(p.h0), ptr(h_prev),
        buf.grad_r, has_proj ? ptr(p.hiddens) : nullptr,
        p.need_grad_input ? ptr(grad_input) : nullptr, ptr(grad_w_ih), ptr(grad_w_hh),
        has_proj ? ptr(grad_w_hr) : nullptr};
    const FusedBackward fused = layer.fused(buf, args);
    if (fused == FusedBackward::kNotRun) {
      for (auto it = p.steps.rbegin(); it != p.steps.rend(); ++it) {
        const Step& step = *it;
        const int64_t b = step.batch;
        if (b == 0) continue;
        const scalar_t* go_t = buf.grad_output + step.offset * P;
        const scalar_t* dh_hidden = buf.dh;  // [b, H] dL/dh_t before the projection
        const scalar_t* dh_extra = go_t;
        if (has_proj) {
          // dL/dr_t = running dh + grad_output[t]; back through r_t = h_t W_hr^T.
          scalar_t* dr = buf.grad_r + step.offset * P;
          layer.add(b * P, buf.dh, go_t, dr);
          layer.projection_gemm(b, dr, buf.grad_hidden);
          dh_hidden = buf.grad_hidden;
          dh_extra = nullptr;
        }
        layer.cell_backward(b, buf.gates + step.offset * 4 * H, buf.cells + step.offset * H,
                            buf.cells + step.prev_offset * H, step.prev_batch, buf.c0,
                            dh_hidden, dh_extra, buf.dc, buf.dgates + step.offset * 4 * H);
        // dL/dh_prev = dgates[t] W_hh
        if (p.needs_dh_prev(step)) {
          layer.recurrent_gemm(b, buf.dgates + step.offset * 4 * H, buf.dh);
        }
      }
    }
    if (fused != FusedBackward::kLoopAndWeightGradients) {
      weight_gradients(
          p.s, p.steps, p.reverse, args,
          [&](auto... gemm_args) { layer.gemm(gemm_args...); },
          [&](scalar_t* dst, const scalar_t* src, int64_t rows, int64_t cols) {
            layer.copy_rows(dst, src, rows, cols);
          });
    }
  });
  // Accumulated in float for half/bfloat16 (ATen's sum uses opmath).
  at::Tensor grad_bias = grad_gates.sum(0);
  if (!p.need_grad_input) grad_input = grad_input.view({0});
  if (!p.need_grad_h0) grad_h = at::empty({0}, opts);
  return {grad_input, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

// The layer ops' backend kernels, for TORCH_LIBRARY_IMPL(fused_lstm, <backend key>, m).
// lstm_layer (inference) keeps the workspace only where the backend asks
// (Backend::kInferenceKeepsWorkspace).
template <typename Backend>
ForwardResult lstm_layer_forward_kernel(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  return layer_forward<Backend>(make_forward_params(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih,
                                                    b_hh, w_hr, reverse, true));
}

template <typename Backend>
LayerResult lstm_layer_kernel(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  auto [output, h_n, c_n, gates, cells, hiddens] = layer_forward<Backend>(
      make_forward_params(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                          Backend::kInferenceKeepsWorkspace));
  return {output, h_n, c_n};
}

// Ops lstm_layer_backward and, kOverwriteGates, lstm_layer_backward_overwrite_gates.
template <typename Backend, bool kOverwriteGates>
BackwardResult lstm_layer_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input,
    bool need_grad_h0) {
  return layer_backward<Backend>(make_backward_params(
      grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output,
      gates, cells, hiddens, reverse, need_grad_input, need_grad_h0, kOverwriteGates));
}

}  // namespace fused_lstm
