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
  // The dtype of a 16-bit layer whose weights come as stored (stored_weights_apply;
  // forward_stored_weights below), else Undefined. Its GEMMs multiply x, h_prev and the
  // weights in that dtype: on AVX512_BF16 CPUs bfloat16 by two exact products per
  // vdpbf16ps into float32 sums, at twice float32's rate, elsewhere (and float16) each
  // load widened to float, exact products, float32 sums; each step reads the h before it
  // rounded to that dtype, as nn.LSTM's 16-bit layer does; c and the cell update stay
  // float32. (PERF_LOG.md rows 45, 49, 57, 59.)
  const at::ScalarType stored;
  // small_gemm reads B as [K, N]: the transposed weights, made once per call.
  const at::Tensor w_hh_t, w_hr_t;  // [P, 4H], [H, P], or undefined

  static bool enough_steps(const LayerForwardParams& params) {
    return int64_t(params.steps.size()) >= cpu_tuning().fused_min_steps;
  }
  // Whether the loop runs fused (use_fused_step), from the sizes and steps alone.
  static bool runs_fused(const LayerForwardParams& params) {
    const auto& k = cpu_kernels<scalar_t>();
    const StepGemm<scalar_t> step = StepGemm<scalar_t>::make(
        params.s.B, 4 * params.s.H, params.s.P, enough_steps(params));
    return !params.s.has_proj && k.fused_step != nullptr &&
           use_fused_step(step.small, params.s.H, params.steps.size());
  }
  // Whether a 16-bit layer of these sizes runs with 16-bit operands throughout, so that
  // its weights need no float32 copy (gemm_stored_operands). A bfloat16 layer on a CPU
  // with the bfloat16 kernels (AVX512_BF16): fused, or one step; H even. Else (float16,
  // or no AVX512_BF16: StoredKernels::small_gemm_trans_b, widening its loads) one step of
  // at most tuning.h's *_widening_max_rows rows, where the float32 path widened both
  // weights every call (PERF_LOG.md rows 57, 59, 62): its GEMMs dot products at any
  // weight size (float32's few_rows_* limits weigh them against BLAS on weights as they
  // are, not against a widening copy first). No projection.
  static bool stored_weights_apply(const LayerForwardParams& params) {
    const LayerSizes& s = params.s;
    const at::ScalarType dtype = params.w_ih.scalar_type();
    if (!std::is_same_v<scalar_t, float> || (dtype != at::kBFloat16 && dtype != at::kHalf) ||
        s.has_proj || s.N == 0) {
      return false;
    }
    const bool one_step = params.steps.size() == 1 && cpu_gemm_setting() != GemmSetting::kAten;
    if (dtype == at::kBFloat16 && cpu_kernels<float>().bf16_dot.fused_step != nullptr &&
        s.H % 2 == 0) {
      return runs_fused(params) || one_step;
    }
    const CpuTuning& t = cpu_tuning();
    // (Not where the loop fuses, one step too under set_cpu_gemm("small"): no 16-bit
    // fused step to run it.)
    const int64_t max_rows =
        dtype == at::kHalf ? t.f16_widening_max_rows : t.bf16_widening_max_rows;
    return one_step && !runs_fused(params) && s.B <= max_rows;
  }

  // Whether gemm_stored_operands runs M rows against w [4H, K] as dot products on w in
  // place: few rows (few_rows_dot), or any where no packed 16-bit GEMM serves (float16,
  // bfloat16 without AVX512_BF16 or with H odd: stored_weights_apply bounds the rows).
  bool stored_dot(int64_t M, const at::Tensor& w) const {
    const bool packed =
        stored == at::kBFloat16 && kernels.bf16_dot.input_gemm != nullptr && H % 2 == 0;
    return !packed || few_rows_dot(cpu_tuning(), M, w.nbytes());
  }

  explicit CpuForward(const LayerForwardParams& params)
      : p(params),
        H(p.s.H),
        P(p.s.P),
        // Small step GEMMs read W_hh^T and W_hr^T, copied below once per call.
        recurrent(StepGemm<scalar_t>::make(p.s.B, 4 * H, P, enough_steps(p))),
        projection(StepGemm<scalar_t>::make(p.s.B, P, H, enough_steps(p))),
        fused_step(runs_fused(p)),
        stored(p.w_ih.scalar_type() != c10::CppTypeToScalarType<scalar_t>::value
                   ? p.w_ih.scalar_type()
                   : at::ScalarType::Undefined),
        w_hh_t(recurrent.small && !fused_step && stored == at::ScalarType::Undefined
                   ? p.w_hh.t().contiguous()
                   : at::Tensor()),
        w_hr_t(p.s.has_proj && projection.small ? p.w_hr.t().contiguous() : at::Tensor()) {
    TORCH_INTERNAL_ASSERT(stored == at::ScalarType::Undefined || stored_weights_apply(p),
                          "CpuForward: 16-bit weights where stored_weights_apply is false");
  }

  // f(half_t{}) for the stored dtype's C++ type.
  template <typename F>
  void with_stored_type(const F& f) const {
    if (stored == at::kHalf) {
      f(c10::Half{});
    } else {
      f(c10::BFloat16{});
    }
  }

  // gates [N, 4H] = x [N, I] W_ih^T + (b_ih + b_hh), the bias where the GEMM's tiles start
  // (gemm_bias); with 16-bit operands (`stored`) x and W_ih as stored
  // (gemm_stored_operands), x padded to an even I where it is fed to the packed path.
  // Gates of stream_gates_min_bytes or more go to memory by non-temporal stores.
  void input_gemm(scalar_t* gates) const {
    const bool stream =
        p.s.N * 4 * H * int64_t(sizeof(scalar_t)) >= cpu_tuning().stream_gates_min_bytes;
    std::vector<scalar_t> bias;
    if (p.b_ih.defined()) {
      const scalar_t* b1 = p.b_ih.data_ptr<scalar_t>();
      const scalar_t* b2 = p.b_hh.data_ptr<scalar_t>();
      bias.resize(4 * H);
      for (int64_t k = 0; k < 4 * H; ++k) bias[k] = b1[k] + b2[k];
    }
    const scalar_t* bias_ptr = bias.empty() ? nullptr : bias.data();
    if (stored != at::ScalarType::Undefined) {
      const int64_t N = p.s.N, I = p.s.I;
      const int64_t K = stored_dot(N, p.w_ih) ? I : (I + 1) / 2 * 2;
      at::Tensor x = p.input.to(stored);
      if (K != I) {
        x = at::zeros({N, K}, x.options());
        x.narrow(1, 0, I).copy_(p.input);
      }
      x = x.contiguous();
      with_stored_type([&](auto half) {
        using half_t = decltype(half);
        gemm_stored_operands<half_t>(N, K, x.data_ptr<half_t>(), p.w_ih, bias_ptr, false, gates,
                                     stream);
      });
      return;
    }
    gemm_bias<scalar_t>(true, p.s.N, 4 * H, p.s.I, p.input.data_ptr<scalar_t>(), p.s.I,
                        p.w_ih.data_ptr<scalar_t>(), p.s.I, bias_ptr, gates, 4 * H, stream);
  }

  // g [b, 4H] += h [b, P] W_hh^T; with 16-bit operands (a one-step call: h is h0, a
  // 16-bit value) h rounded to that dtype and W_hh as stored.
  void recurrent_gemm(int64_t b, const scalar_t* h, scalar_t* g) const {
    if (stored != at::ScalarType::Undefined) {
      with_stored_type([&](auto half) {
        using half_t = decltype(half);
        std::vector<half_t> h_round(h, h + b * P);
        gemm_stored_operands<half_t>(b, P, h_round.data(), p.w_hh, nullptr, true, g);
      });
      return;
    }
    recurrent(b, 4 * H, P, h, P, p.w_hh.data_ptr<scalar_t>(), true,
              recurrent.small ? w_hh_t.data_ptr<scalar_t>() : nullptr, true, g, 4 * H);
  }

  // gates [M, 4H] = a [M, K] w^T + bias (bias [4H] or null), or with accumulate +=, a and
  // w [4H, K] (W_ih or W_hh) in half_t as stored, float32 sums: where stored_dot as dot
  // products on w in place (StoredKernels::small_gemm_trans_b), else (bfloat16 on
  // AVX512_BF16 CPUs) through w packed and the packed kernels' input GEMM
  // (bf16_packed_kernels: K even, the caller pads a), with `stream` by non-temporal stores.
  template <typename half_t>
  void gemm_stored_operands(int64_t M, int64_t K, const half_t* a, const at::Tensor& w,
                            const scalar_t* bias, bool accumulate, scalar_t* gates,
                            bool stream = false) const {
    const int64_t k_stored = w.size(1);
    if (stored_dot(M, w)) {
      for (int64_t r = 0; !accumulate && bias != nullptr && r < M; ++r) {
        std::copy_n(bias, 4 * H, gates + r * 4 * H);
      }
      kernels.template stored<half_t>().small_gemm_trans_b(
          M, 4 * H, k_stored, a, K, w.data_ptr<half_t>(), k_stored,
          accumulate || bias != nullptr, gates, 4 * H);
      return;
    }
    TORCH_INTERNAL_ASSERT((std::is_same_v<half_t, c10::BFloat16>) && kernels.bf16_dot.input_gemm,
                          "gemm_stored_operands: no packed GEMM for this dtype and CPU");
    if constexpr (std::is_same_v<half_t, c10::BFloat16>) {
      const Bf16PackedKernels<scalar_t>& bk = bf16_packed_kernels<scalar_t>(M);
      at::Tensor packed = at::empty({bk.packed_size(H, k_stored)}, w.options());
      bk.pack_weights(w.data_ptr<half_t>(), H, k_stored, packed.data_ptr<half_t>());
      bk.input_gemm(M, H, K, a, packed.data_ptr<half_t>(), bias, accumulate, gates, stream);
    }
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

  // The fused loop, where use_fused_step picks it (with bfloat16 operands where `stored`:
  // stored_weights_apply runs no other 16-bit layer fused).
  bool fused(const ForwardBuffers<scalar_t>& buf) const {
    if (!fused_step) return false;
    if (stored == at::kBFloat16) {
      fused_bf16(buf);
      return true;
    }
    const int64_t width = kernels.fused_width;
    at::Tensor w_packed = at::empty({(H + width - 1) / width * width * 4 * H}, p.input.options());
    kernels.pack_fused_weights(p.w_hh.data_ptr<scalar_t>(), H, w_packed.data_ptr<scalar_t>());
    const scalar_t* w_t = w_packed.data_ptr<scalar_t>();
    scalar_t* out = buf.output;
    run_steps(buf, p.w_hh.nbytes(), -1, [&](const Step& step, int64_t row0, int64_t rows,
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
    const Bf16PackedKernels<scalar_t>& bk = bf16_packed_kernels<scalar_t>(p.s.B);
    const auto opts = p.input.options().dtype(at::kBFloat16);
    at::Tensor w_packed = at::empty({bk.packed_size(H, H)}, opts);
    bk.pack_weights(p.w_hh.data_ptr<bf16>(), H, H, w_packed.data_ptr<bf16>());
    at::Tensor out_round = at::empty({p.s.N, H}, opts);
    at::Tensor h0_round =
        at::from_blob(buf.h_state, {p.s.B, H}, p.input.options()).to(at::kBFloat16);
    const bf16* w_t = w_packed.data_ptr<bf16>();
    bf16* rounded = out_round.data_ptr<bf16>();
    const bf16* h0 = h0_round.data_ptr<bf16>();
    const auto [weight_bytes, min_rows] = bf16_loop_split(bk, p.w_hh.nbytes());
    run_steps(buf, weight_bytes, min_rows, [&](const Step& step, int64_t row0, int64_t rows,
                                                  int64_t own_split, int64_t j0, int64_t j1) {
      bk.fused_step(rows, H, rounded + (step.prev_offset + row0) * H, own_split,
                    h0 + (row0 + own_split) * H, w_t, buf.gates + (step.offset + row0) * 4 * H,
                    p.keep_workspace, buf.c_state + row0 * H,
                    buf.cells + step.offset * buf.cells_step + row0 * H,
                    buf.output + (step.offset + row0) * H, rounded + (step.offset + row0) * H,
                    j0, j1);
    });
  }

  // The fused loop's steps, shared between threads (run_fused_loop; `weight_bytes` of
  // packed W_hh, rows split from min_rows a thread, -1 tuning.h's rule): step_fn(step,
  // row0, rows, own_split, j0, j1) runs a thread's rows [row0, row0 + rows) and unit
  // chunks [j0, j1) of a step, whose h_prev comes from the step before for its first
  // own_split rows and from h0 for the rest (rows that start later, in reverse). Then h_n.
  template <typename StepFn>
  void run_steps(const ForwardBuffers<scalar_t>& buf, int64_t weight_bytes, int64_t min_rows,
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
    }, min_rows);
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

namespace {

// The CPU forward ops. A 16-bit layer that runs with 16-bit operands throughout
// (CpuForward::stored_weights_apply) keeps its weights as stored, where
// ReducedPrecisionInFloat widens every argument: x, h0, c0 and the biases are widened,
// the results rounded back, as there. The weights' float32 copies were most of a
// one-step call (PERF_LOG.md rows 49, 57, 59). Every other call goes through
// ReducedPrecisionInFloat (which passes non-16-bit calls straight to the kernel).
template <bool kKeepWorkspace>
std::optional<ForwardResult> forward_stored_weights(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  const at::ScalarType dtype = input.scalar_type();
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return std::nullopt;
  LayerForwardParams p = make_forward_params(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                             w_hr, reverse, kKeepWorkspace);
  if (!CpuForward<float>::stored_weights_apply(p)) return std::nullopt;
  for (at::Tensor* t : {&p.input, &p.h0, &p.c0, &p.b_ih, &p.b_hh}) {
    if (t->defined()) *t = t->to(at::kFloat);
  }
  ForwardResult result = layer_forward<CpuBackend>(p);
  std::apply([dtype](auto&... t) { ((t = t.to(dtype)), ...); }, result);
  return result;
}

ForwardResult lstm_layer_forward_cpu(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  if (auto result = forward_stored_weights<true>(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih,
                                               b_hh, w_hr, reverse)) {
    return *result;
  }
  return ReducedPrecisionInFloat<&lstm_layer_forward_kernel<CpuBackend>>::call(
      input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
}

LayerResult lstm_layer_cpu(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  if (auto result = forward_stored_weights<CpuBackend::kInferenceKeepsWorkspace>(
          input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)) {
    auto& [output, h_n, c_n, gates, cells, hiddens] = *result;
    return {output, h_n, c_n};
  }
  return ReducedPrecisionInFloat<&lstm_layer_kernel<CpuBackend>>::call(
      input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cpu);
  m.impl("lstm_layer", &lstm_layer_cpu);
}

}  // namespace fused_lstm::cpu
