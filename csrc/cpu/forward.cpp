// The CPU layer forward: the driver's loop (core/layer_driver.h) over CpuForward's
// step GEMMs and cell pass, or, where the step is small or H large enough
// (use_fused_step), the fused loop: per step the recurrent GEMM and the cell update in
// one pass (kernels/kernels.h), threads sharing it for the whole loop (fused_loop.h).
#include <torch/library.h>

#include "cpu/backend.h"

namespace fused_lstm::cpu {

template <typename scalar_t>
struct CpuForward : CpuLayerBase<scalar_t> {
  using CpuLayerBase<scalar_t>::kernels;
  const LayerForwardParams& p;
  const int64_t H, P;
  const StepGemm<scalar_t> recurrent, projection;
  const bool fused_step;
  // small_gemm reads B as [K, N]: the transposed weights, made once per call.
  const at::Tensor w_hh_t, w_hr_t;  // [P, 4H], [H, P], or undefined
  // A layer called in bfloat16 (ReducedPrecisionInFloat) whose loop runs fused, on a CPU
  // with the bfloat16 kernels (CpuKernels::fused_step_bf16), H even: its GEMMs multiply
  // x, h_prev and the weights as stored, in bfloat16, at twice float32's rate; each step
  // reads the h before it rounded to bfloat16, as nn.LSTM's bfloat16 layer does; sums,
  // c and the cell update stay float32. (PERF_LOG.md row 45.)
  const bool bf16_operands;

  static bool enough_steps(const LayerForwardParams& params) {
    return int64_t(params.steps.size()) >= cpu_tuning().fused_min_steps;
  }

  explicit CpuForward(const LayerForwardParams& params)
      : p(params),
        H(p.s.H),
        P(p.s.P),
        // Small step GEMMs read W_hh^T and W_hr^T, copied below once per call.
        recurrent(StepGemm<scalar_t>::make(p.s.B, 4 * H, P, enough_steps(p))),
        projection(StepGemm<scalar_t>::make(p.s.B, P, H, enough_steps(p))),
        fused_step(!p.s.has_proj && kernels.fused_step != nullptr &&
                   use_fused_step(recurrent.small, H, p.steps.size())),
        w_hh_t(recurrent.small && !fused_step ? p.w_hh.t().contiguous() : at::Tensor()),
        w_hr_t(p.s.has_proj && projection.small ? p.w_hr.t().contiguous() : at::Tensor()),
        bf16_operands(fused_step && reduced_precision_call_dtype == at::kBFloat16 &&
                      kernels.fused_step_bf16 != nullptr && H % 2 == 0 && p.s.N > 0) {}

  // gates [N, 4H] = x [N, I] W_ih^T + (b_ih + b_hh), the bias where the GEMM's tiles start
  // (gemm_bias); with bfloat16 operands (bf16_operands) x and W_ih as stored, x padded
  // to an even I.
  void input_gemm(scalar_t* gates) const {
    std::vector<scalar_t> bias;
    if (p.b_ih.defined()) {
      const scalar_t* b1 = p.b_ih.data_ptr<scalar_t>();
      const scalar_t* b2 = p.b_hh.data_ptr<scalar_t>();
      bias.resize(4 * H);
      for (int64_t k = 0; k < 4 * H; ++k) bias[k] = b1[k] + b2[k];
    }
    const scalar_t* bias_ptr = bias.empty() ? nullptr : bias.data();
    if (bf16_operands) {
      const int64_t I = p.s.I, K = (I + 1) / 2 * 2, width = kernels.fused_width;
      const auto opts = p.input.options().dtype(at::kBFloat16);
      at::Tensor x = I == K ? p.input.to(at::kBFloat16).contiguous() : at::zeros({p.s.N, K}, opts);
      if (I != K) x.narrow(1, 0, I).copy_(p.input);
      at::Tensor w = at::empty({(H + width - 1) / width * width * 4 * K}, opts);
      kernels.pack_fused_weights_bf16(p.w_ih.data_ptr<scalar_t>(), H, I, w.data_ptr<c10::BFloat16>());
      kernels.input_gemm_bf16(p.s.N, H, K, x.data_ptr<c10::BFloat16>(),
                              w.data_ptr<c10::BFloat16>(), bias_ptr, gates);
      return;
    }
    gemm_bias<scalar_t>(true, p.s.N, 4 * H, p.s.I, p.input.data_ptr<scalar_t>(), p.s.I,
                        p.w_ih.data_ptr<scalar_t>(), p.s.I, bias_ptr, gates, 4 * H);
  }

  // g [b, 4H] += h [b, P] W_hh^T
  void recurrent_gemm(int64_t b, const scalar_t* h, scalar_t* g) const {
    recurrent(b, 4 * H, P, h, P, p.w_hh.data_ptr<scalar_t>(), true,
              recurrent.small ? w_hh_t.data_ptr<scalar_t>() : nullptr, true, g, 4 * H);
  }

  void cell_forward(int64_t b, scalar_t* g, scalar_t* c_state, scalar_t* cells, scalar_t* h_out,
                    scalar_t* h_state) const {
    kernels.forward(b, H, g, c_state, cells, h_out, h_state);
  }

  // r [b, P] = h [b, H] W_hr^T
  void projection_gemm(int64_t b, const scalar_t* h, scalar_t* r) const {
    projection(b, P, H, h, H, p.w_hr.data_ptr<scalar_t>(), true,
               projection.small ? w_hr_t.data_ptr<scalar_t>() : nullptr, false, r, P);
  }

  // The fused loop, where use_fused_step picks it (with bfloat16 operands where
  // bf16_operands).
  bool fused(const ForwardBuffers<scalar_t>& buf) const {
    if (!fused_step) return false;
    if (bf16_operands) {
      fused_bf16(buf);
      return true;
    }
    const int64_t width = kernels.fused_width;
    at::Tensor w_packed = at::empty({(H + width - 1) / width * width * 4 * H}, p.input.options());
    kernels.pack_fused_weights(p.w_hh.data_ptr<scalar_t>(), H, w_packed.data_ptr<scalar_t>());
    const scalar_t* w_t = w_packed.data_ptr<scalar_t>();
    scalar_t* out = buf.output;
    run_steps(buf, p.w_hh.nbytes(), [&](const Step& step, int64_t row0, int64_t rows,
                                        int64_t own_split, int64_t j0, int64_t j1) {
      kernels.fused_step(rows, H, out + (step.prev_offset + row0) * H, own_split,
                         buf.h_state + (row0 + own_split) * H, w_t,
                         buf.gates + (step.offset + row0) * 4 * H, p.keep_workspace,
                         buf.c_state + row0 * H,
                         buf.cells + step.offset * buf.cells_step + row0 * H,
                         out + (step.offset + row0) * H, j0, j1);
    });
    return true;
  }

  // The fused loop with bfloat16 operands. out_round: [N, H] the outputs rounded, which
  // the next step reads; h0_round: [B, H] h0.
  void fused_bf16(const ForwardBuffers<scalar_t>& buf) const {
    using bf16 = c10::BFloat16;
    const int64_t width = kernels.fused_width;
    const auto opts = p.input.options().dtype(at::kBFloat16);
    at::Tensor w_packed = at::empty({(H + width - 1) / width * width * 4 * H}, opts);
    kernels.pack_fused_weights_bf16(p.w_hh.data_ptr<scalar_t>(), H, H, w_packed.data_ptr<bf16>());
    at::Tensor out_round = at::empty({p.s.N, H}, opts);
    at::Tensor h0_round =
        at::from_blob(buf.h_state, {p.s.B, H}, p.input.options()).to(at::kBFloat16);
    const bf16* w_t = w_packed.data_ptr<bf16>();
    bf16* rounded = out_round.data_ptr<bf16>();
    const bf16* h0 = h0_round.data_ptr<bf16>();
    run_steps(buf, p.w_hh.nbytes() / 2, [&](const Step& step, int64_t row0, int64_t rows,
                                            int64_t own_split, int64_t j0, int64_t j1) {
      kernels.fused_step_bf16(rows, H, rounded + (step.prev_offset + row0) * H, own_split,
                              h0 + (row0 + own_split) * H, w_t,
                              buf.gates + (step.offset + row0) * 4 * H, p.keep_workspace,
                              buf.c_state + row0 * H,
                              buf.cells + step.offset * buf.cells_step + row0 * H,
                              buf.output + (step.offset + row0) * H,
                              rounded + (step.offset + row0) * H, j0, j1);
    });
  }

  // The fused loop's steps, shared between threads (run_fused_loop; `weight_bytes` of
  // packed W_hh): step_fn(step, row0, rows, own_split, j0, j1) runs a thread's rows
  // [row0, row0 + rows) and unit chunks [j0, j1) of a step, whose h_prev comes from the
  // step before for its first own_split rows and from h0 for the rest (rows that start
  // later, in reverse). Then h_n.
  template <typename StepFn>
  void run_steps(const ForwardBuffers<scalar_t>& buf, int64_t weight_bytes,
                 const StepFn& step_fn) const {
    const auto& steps = p.steps;
    run_fused_loop(steps, p.s.B, H, kernels.fused_width, weight_bytes,
                   [&](int64_t r0, int64_t r1, int64_t j0, int64_t j1, const auto& sync) {
      for (size_t n = 0; n < steps.size(); ++n) {
        const Step& step = steps[n];
        const int64_t row0 = std::min(r0, step.batch), row1 = std::min(r1, step.batch);
        const int64_t split = n == 0 ? 0 : step.prev_batch;
        step_fn(step, row0, row1 - row0, std::max<int64_t>(split - row0, 0), j0, j1);
        sync(n);
      }
    });
    copy_last_hidden(buf);
  }

  // h_n: each row's h at its last step (rows [next batch, batch) end at a step).
  void copy_last_hidden(const ForwardBuffers<scalar_t>& buf) const {
    const auto& steps = p.steps;
    for (size_t n = 0; n < steps.size(); ++n) {
      const int64_t b = steps[n].batch, b_next = n + 1 < steps.size() ? steps[n + 1].batch : 0;
      if (b_next < b) {
        cpu::copy_rows(buf.h_state + b_next * H, buf.output + (steps[n].offset + b_next) * H,
                       b - b_next, H);
      }
    }
  }
};

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_layer_forward",
         &ReducedPrecisionInFloat<&lstm_layer_forward_kernel<CpuBackend>>::call);
  m.impl("lstm_layer", &ReducedPrecisionInFloat<&lstm_layer_kernel<CpuBackend>>::call);
}

}  // namespace fused_lstm::cpu
