// The CPU layer backward: the driver's reverse loop (core/layer_driver.h) over
// CpuBackward's step GEMMs and cell pass, or, where the forward fused its steps, the
// fused backward loop, its work shared the same way (fused_loop.h): per step the cell
// backward of a thread's rows and units, then (after a barrier when threads own
// units: dh needs all of dgates) its rows and units of dh = dgates W_hh, which only it
// reads next step. No BLAS call, no fork/join. A 16-bit layer's one-step backward (and a
// bfloat16 layer's fused one on AVX512_BF16 CPUs) keeps its operands as stored
// (backward_stored_workspace, at the end).
#include <torch/library.h>

#include "cpu/backend.h"

namespace fused_lstm::cpu {

template <typename scalar_t>
struct CpuBackward : CpuLayerBase<scalar_t> {
  using CpuLayerBase<scalar_t>::kernels;
  const LayerBackwardParams& p;
  const int64_t H, P;
  const StepGemm<scalar_t> recurrent, projection;

  // A layer called in bfloat16 on a CPU with the bfloat16 kernels that did not take
  // backward_stored_workspace (below: a projection, a loop not fused): its GEMMs outside
  // the loop may multiply in bfloat16 (gemm below).
  const bool bf16_gemms;

  explicit CpuBackward(const LayerBackwardParams& params)
      : p(params),
        H(p.s.H),
        P(p.s.P),
        recurrent(StepGemm<scalar_t>::make(p.s.B, P, 4 * H)),
        projection(StepGemm<scalar_t>::make(p.s.B, H, P)),
        bf16_gemms(reduced_precision_call_dtype == at::kBFloat16 &&
                   cpu_kernels<float>().bf16_dot.fused_step != nullptr) {}

  // The GEMMs outside the loop (weight_gradients: dx = dgates W_ih, dW_ih = dgates^T x,
  // dW_hh = dgates^T h_prev, dW_hr). For a bfloat16 layer (bf16_gemms), from tuning.h's
  // bf16_gemm_min_macs and outside a parallel region: at::mm in bfloat16 (torch's
  // bfloat16 GEMM, float32 sums; 2.2x float32's rate on an AMD Zen 4), its operands
  // rounded to bfloat16 (x, h and the weights are bfloat16 values already; dgates is
  // rounded, as nn.LSTM's bfloat16 backward rounds it) and its product added in float32.
  // (PERF_LOG.md row 46.)
  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A,
            int64_t lda, const scalar_t* B, int64_t ldb, at::opmath_type<scalar_t> beta,
            scalar_t* C, int64_t ldc) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (bf16_gemms && M * N * K >= cpu_tuning().bf16_gemm_min_macs &&
          !at::in_parallel_region()) {
        // op(X) [rows, cols] of X stored row-major with row stride ld, in bfloat16.
        const auto rounded = [](const float* x, int64_t rows, int64_t cols, int64_t ld,
                                bool trans) {
          at::Tensor t = at::from_blob(const_cast<float*>(x), {trans ? cols : rows, trans ? rows : cols},
                                       {ld, 1}, at::kFloat);
          return (trans ? t.t() : t).to(at::kBFloat16);
        };
        const at::Tensor product =
            at::mm(rounded(A, M, K, lda, trans_a), rounded(B, K, N, ldb, trans_b));
        at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, at::kFloat);
        if (beta == 0) {
          c.copy_(product);
        } else {
          if (beta != 1) c.mul_(beta);
          c.add_(product);
        }
        return;
      }
    }
    CpuLayerBase<scalar_t>::gemm(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }

  // out[e] = a[e] + b[e] over n elements.
  void add(int64_t n, const scalar_t* a, const scalar_t* b, scalar_t* out) const {
    for (int64_t e = 0; e < n; ++e) out[e] = a[e] + b[e];
  }

  // dh [b, H] = dr [b, P] W_hr
  void projection_gemm(int64_t b, const scalar_t* dr, scalar_t* dh) const {
    const scalar_t* w_hr = p.w_hr.data_ptr<scalar_t>();
    projection(b, H, P, dr, P, w_hr, false, w_hr, false, dh, H);
  }

  void cell_backward(int64_t b, const scalar_t* gates, const scalar_t* cells,
                     const scalar_t* c_prev_step, int64_t prev_batch, const scalar_t* c0,
                     const scalar_t* dh, const scalar_t* dh_extra, scalar_t* dc,
                     scalar_t* dgates) const {
    kernels.backward(b, H, gates, cells, c_prev_step, prev_batch, c0, dh, dh_extra, dc, dgates);
  }

  // dh [b, P] = dgates [b, 4H] W_hh
  void recurrent_gemm(int64_t b, const scalar_t* dgates, scalar_t* dh) const {
    const scalar_t* w_hh = p.w_hh.data_ptr<scalar_t>();
    recurrent(b, P, 4 * H, dgates, 4 * H, w_hh, false, w_hh, false, dh, P);
  }

  // The fused loop, where the forward fused its steps (no projection).
  FusedBackward fused(const BackwardBuffers<scalar_t>& buf,
                      const WeightGradientArgs<scalar_t>& args) const {
    if (p.s.has_proj || kernels.gemm_columns == nullptr ||
        !use_fused_step(recurrent.small, H, p.steps.size())) {
      return FusedBackward::kNotRun;
    }
    const auto& steps = p.steps;
    // Threads own runs of fused_width units, read from W_hh packed in column panels
    // (tuning.h's fused_backward_panels) or in place. As whole 64-unit panels, H = 300's
    // 5 went 3 + 2 between two threads: one idled ~40% of each step (PERF_LOG.md row 68).
    const bool panels = cpu_tuning().fused_backward_panels;
    const int64_t width = kernels.fused_width;
    const int64_t panel = kernels.gemm_columns_width;
    const scalar_t* w_hh = p.w_hh.data_ptr<scalar_t>();
    at::Tensor w_panels;  // [ceil(H / panel)][4H][panel]
    if (panels) {
      w_panels = at::empty({(H + panel - 1) / panel * panel * 4 * H}, p.input.options());
      pack_column_panels(w_hh, 4 * H, H, panel, w_panels.data_ptr<scalar_t>());
    }
    const scalar_t* w_panels_p = panels ? w_panels.data_ptr<scalar_t>() : nullptr;
    scalar_t* dh = buf.dh;
    const auto loop = [&](int64_t r0, int64_t r1, int64_t j0, int64_t j1, const auto& sync) {
      const int64_t u0 = j0 * width, u1 = std::min(H, j1 * width);
      for (size_t n = 0; n < steps.size(); ++n) {
        const Step& step = steps[steps.size() - 1 - n];
        const int64_t row0 = std::min(r0, step.batch), row1 = std::min(r1, step.batch);
        scalar_t* dgates_t = buf.dgates + step.offset * 4 * H;
        kernels.backward_block(row0, row1, u0, u1, H, buf.gates + step.offset * 4 * H,
                               buf.cells + step.offset * H, buf.cells + step.prev_offset * H,
                               step.prev_batch, buf.c0, dh, buf.grad_output + step.offset * H,
                               buf.dc, dgates_t);
        sync(n);
        if (!p.needs_dh_prev(step)) continue;
        // dL/dh_prev[rows, u0:u1) = dgates[t][rows] W_hh[:, u0:u1)
        if (panels) {
          // The panels [u0, u1) overlaps, each from where the run begins in it.
          for (int64_t u = u0 / panel * panel; u < u1; u += panel) {
            kernels.gemm_columns(row1 - row0, std::max(u0, u) - u, std::min(u1 - u, panel),
                                 4 * H, dgates_t + row0 * 4 * H, 4 * H, w_panels_p + u * 4 * H,
                                 panel, false, nullptr, dh + row0 * H + u, H, false);
          }
        } else {
          kernels.gemm_columns(row1 - row0, u0, u1, 4 * H, dgates_t + row0 * 4 * H, 4 * H, w_hh,
                               H, false, nullptr, dh + row0 * H, H, false);
        }
      }
    };
    if (CpuBackend::gathers_prev_hidden(p)) {
      weight_gradients_beside_loop(
          p.s, steps, (H + width - 1) / width, args, loop,
          [this](auto... gemm_args) { this->gemm(gemm_args...); },
          [](scalar_t* dst, const scalar_t* src, int64_t rows, int64_t cols) {
            cpu::copy_rows(dst, src, rows, cols);
          });
      return FusedBackward::kLoopAndWeightGradients;
    }
    run_fused_loop(steps, p.s.B, H, width, p.w_hh.nbytes(), loop);
    return FusedBackward::kLoop;
  }
};

namespace {

// The backward of a 16-bit layer (half_t: bfloat16 or float16) of one step (an
// LSTMCell, a decoding loop; not under the "aten" setting) of at most tuning.h's
// widening_backward_max_rows rows (any on AVX512_BF16 CPUs in bfloat16), or of a
// bfloat16 layer whose loop runs fused on a CPU with the bfloat16 kernels: its workspace
// (gates, cells, output), x, grad_output and weights are read as stored, where
// ReducedPrecisionInFloat widens every argument to float32 (those copies were most of a
// 16-bit training step's peak memory, PERF_LOG.md rows 50-51, 58-59). Per step the cell
// backward in float32 from the 16-bit gates and cells, dgates rounded to half_t (as
// nn.LSTM's 16-bit backward rounds them) over the gates where the op may overwrite them,
// then dh = dgates W_hh by bfloat16 products into float32 sums (Bf16PackedKernels'
// gemm_columns, on AMX tiles where the forward's are; threads sharing the loop as the
// float32 one); dh and dc stay float32. Then the weight gradients, single GEMMs of 16-bit
// operands, float32 sums, rounded once: at::mm for
// bfloat16 with AVX512_BF16, else StoredKernels::small_gemm (each load widened; torch's
// bfloat16 GEMM is emulated there, 2-100x slower than its float32 one on an AMD Zen 3).
// Other calls: nullopt.
template <typename half_t>
std::optional<BackwardResult> backward_stored_workspace(const LayerBackwardParams& p) {
  const auto& k = cpu_kernels<float>();
  const StoredKernels<float, half_t>& stored = k.template stored<half_t>();
  const auto [N, T, B, I, H, P, has_proj] = p.s;
  // AVX512_BF16, a bfloat16 layer
  const bool bf16_dot = std::is_same_v<half_t, c10::BFloat16> && k.bf16_dot.gemm_columns != nullptr;
  const bool one_step = p.steps.size() == 1 && cpu_gemm_setting() != GemmSetting::kAten &&
                        (bf16_dot || B <= cpu_tuning().widening_backward_max_rows);
  if (has_proj || N == 0 ||
      !(one_step ||
        (bf16_dot && use_fused_step(StepGemm<float>::make(B, P, 4 * H).small, H, p.steps.size())))) {
    return std::nullopt;
  }
  const int64_t G = 4 * H;
  const auto opts = p.input.options();
  const auto& steps = p.steps;
  at::Tensor dgates = p.overwrite_gates ? p.gates : scratch_buffer(Scratch::kGradGates, N, G, opts);
  at::Tensor dh = p.grad_h_n.to(at::kFloat).contiguous();  // [B, H] running dL/dh
  at::Tensor dc = p.grad_c_n.to(at::kFloat).contiguous();  // [B, H] running dL/dc
  const half_t *gates = p.gates.data_ptr<half_t>(), *cells = p.cells.data_ptr<half_t>();
  const half_t *c0 = p.c0.data_ptr<half_t>(), *grad_output = p.grad_output.data_ptr<half_t>();
  half_t* dg = dgates.data_ptr<half_t>();
  float *dh_p = dh.data_ptr<float>(), *dc_p = dc.data_ptr<float>();
  const auto ptr = [](const at::Tensor& t) {
    return t.defined() && t.numel() > 0 ? t.data_ptr<half_t>() : static_cast<half_t*>(nullptr);
  };
  // C [M, N] (row stride ldc) = op(A) B, all half_t (h_prev gathered: dW_hh one GEMM,
  // not two terms, each rounded).
  const auto gemm = [&](bool trans_a, bool trans_b, int64_t M, int64_t Nc, int64_t K,
                        const half_t* A, int64_t lda, const half_t* Bm, int64_t ldb, float beta,
                        half_t* C, int64_t ldc) {
    TORCH_INTERNAL_ASSERT(beta == 0 && !trans_b, "backward_stored_workspace: an unexpected GEMM");
    if (!bf16_dot) {
      stored.small_gemm(trans_a, M, Nc, K, A, lda, Bm, ldb, C, ldc);
      return;
    }
    at::Tensor a = at::from_blob(const_cast<half_t*>(A), {trans_a ? K : M, trans_a ? M : K},
                                 {lda, 1}, opts);
    at::Tensor c = at::from_blob(C, {M, Nc}, {ldc, 1}, opts);
    at::mm_out(c, trans_a ? a.t() : a,
               at::from_blob(const_cast<half_t*>(Bm), {K, Nc}, {ldb, 1}, opts));
  };
  at::Tensor grad_h0 = p.need_grad_h0 ? at::empty({B, H}, opts) : at::empty({0}, opts);
  if (steps.size() == 1) {
    // One step: no loop to share, and dh_prev is grad_h0 itself: one GEMM on W_hh as
    // stored, where a W_hh pack (the loop's) cost more than the step.
    stored.backward_block(0, B, 0, H, H, gates, cells, cells, 0, c0, dh_p, grad_output, dc_p, dg);
    if (p.need_grad_h0) gemm(false, false, B, H, G, dg, G, ptr(p.w_hh), H, 0, ptr(grad_h0), H);
  } else if constexpr (std::is_same_v<half_t, c10::BFloat16>) {
    using bf16 = c10::BFloat16;
    constexpr int64_t width = kBf16PanelColumns;  // a thread's units, whole panels
    const Bf16PackedKernels<float>& bk = bf16_packed_kernels<float>(B);
    at::Tensor w_pairs = at::empty({bk.columns_packed_size(G, H)}, opts);
    bk.pack_columns(p.w_hh.data_ptr<bf16>(), G, H, w_pairs.data_ptr<bf16>());
    const bf16* w = w_pairs.data_ptr<bf16>();
    const auto [weight_bytes, min_rows] = bf16_loop_split(bk, p.w_hh.nbytes());
    run_fused_loop(steps, B, H, width, weight_bytes,
                   [&](int64_t r0, int64_t r1, int64_t j0, int64_t j1, const auto& sync) {
      const int64_t u0 = j0 * width, u1 = std::min(H, j1 * width);
      for (size_t n = 0; n < steps.size(); ++n) {
        const Step& step = steps[steps.size() - 1 - n];
        const int64_t row0 = std::min(r0, step.batch), row1 = std::min(r1, step.batch);
        bf16* dg_t = dg + step.offset * G;
        stored.backward_block(row0, row1, u0, u1, H, gates + step.offset * G,
                              cells + step.offset * H, cells + step.prev_offset * H,
                              step.prev_batch, c0, dh_p, grad_output + step.offset * H, dc_p,
                              dg_t);
        sync(n);
        if (!p.needs_dh_prev(step)) continue;
        // dL/dh_prev[rows, u0:u1) = dgates[t][rows] W_hh[:, u0:u1)
        bk.gemm_columns(row1 - row0, u0, u1, G, dg_t + row0 * G, G, w, dh_p + row0 * H, H);
      }
    }, min_rows);
    if (p.need_grad_h0) grad_h0.copy_(dh);
  }

  at::Tensor grad_input = at::empty({p.need_grad_input ? N : 0, I}, opts);
  at::Tensor grad_w_ih = at::empty({G, I}, opts), grad_w_hh = at::empty({G, P}, opts);
  at::Tensor h_prev = scratch_buffer(Scratch::kPrevHidden, N, P, opts);  // gathered (below)
  const WeightGradientArgs<half_t> args{
      dg, ptr(p.input), ptr(p.w_ih), ptr(p.output), ptr(p.h0), ptr(h_prev), nullptr, nullptr,
      ptr(grad_input), ptr(grad_w_ih), ptr(grad_w_hh), nullptr};
  const auto copy = [](half_t* dst, const half_t* src, int64_t rows, int64_t cols) {
    copy_rows(dst, src, rows, cols);
  };
  weight_gradients(p.s, steps, p.reverse, args, gemm, copy, /*gather=*/true);
  at::Tensor grad_bias = dgates.sum(0);  // float32 sums, rounded once
  if (!p.need_grad_input) grad_input = grad_input.view({0});
  return BackwardResult{grad_input, grad_h0, dc.to(p.input.scalar_type()), grad_w_ih, grad_w_hh,
                        grad_bias, at::empty({0}, opts)};
}

// Ops lstm_layer_backward and, kOverwriteGates, lstm_layer_backward_overwrite_gates:
// backward_stored_workspace where it applies, else the driver's backward (half and
// bfloat16 through ReducedPrecisionInFloat).
template <bool kOverwriteGates>
BackwardResult lstm_layer_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input,
    bool need_grad_h0) {
  const at::ScalarType dtype = input.scalar_type();
  if (dtype == at::kBFloat16 || dtype == at::kHalf) {
    const LayerBackwardParams p = make_backward_params(
        grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output,
        gates, cells, hiddens, reverse, need_grad_input, need_grad_h0, kOverwriteGates);
    if (auto result = dtype == at::kHalf ? backward_stored_workspace<c10::Half>(p)
                                         : backward_stored_workspace<c10::BFloat16>(p)) {
      return *result;
    }
  }
  return ReducedPrecisionInFloat<&lstm_layer_backward_kernel<CpuBackend, kOverwriteGates>>::call(
      grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output,
      gates, cells, hiddens, reverse, need_grad_input, need_grad_h0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu<false>);
  m.impl("lstm_layer_backward_overwrite_gates", &lstm_layer_backward_cpu<true>);
}

}  // namespace fused_lstm::cpu
