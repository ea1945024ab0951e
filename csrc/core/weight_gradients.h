// The end of the layer backward, the same on every backend: after the reverse
// time loop has filled dgates, the weight (and input) gradients are single GEMMs
// over all timesteps. Each backend passes its own row-major GEMM
//   gemm(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc)
// and its own copy of contiguous rows, copy_rows(dst, src, rows, cols).
#pragma once

#include <algorithm>
#include <vector>

#include "core/schedule.h"
#include "lstm.h"

namespace fused_lstm {

// The state each step began from, stacked over steps: rows [0, prev_batch) of a
// step come from `per_step` at the step run before it, the rest from `init`.
//   per_step: [N, C], init: [B, C] -> out: [N, C] (the rows of steps [first, last))
template <typename scalar_t, typename CopyRows>
void gather_prev_state(const Step* first, const Step* last, const scalar_t* per_step,
                       const scalar_t* init, int64_t C, scalar_t* out, const CopyRows& copy_rows) {
  for (const Step* step = first; step != last; ++step) {
    const Step& s = *step;
    copy_rows(out + s.offset * C, per_step + s.prev_offset * C, s.prev_batch, C);
    copy_rows(out + (s.offset + s.prev_batch) * C, init + s.prev_batch * C,
              s.batch - s.prev_batch, C);
  }
}

template <typename scalar_t>
struct WeightGradientArgs {
  const scalar_t* dgates;   // [N, 4H] dL/d(pre-activation gates)
  const scalar_t* input;    // [N, I]
  const scalar_t* w_ih;     // [4H, I]
  const scalar_t* output;   // [N, P]
  const scalar_t* h0;       // [B, P]
  scalar_t* h_prev;         // [N, P] scratch, used when prev_terms is empty
  const scalar_t* grad_r;   // [N, P] dL/dr with a projection, else null
  const scalar_t* hiddens;  // [N, H] with a projection, else null
  scalar_t* grad_input;     // [N, I], or null when not needed
  scalar_t* grad_w_ih;      // [4H, I]
  scalar_t* grad_w_hh;      // [4H, P]
  scalar_t* grad_w_hr;      // [P, H] with a projection, else null
};

// grad_input = dgates W_ih, grad_w_ih = dgates^T x, grad_w_hh = dgates^T h_prev
// (read in place from output and h0 where prev_hidden_terms allows, else, or where
// `gather` asks, gathered: one GEMM, for a GEMM that rounds its result, as one in
// bfloat16 does, so that the two terms are not rounded twice), grad_w_hr = dr^T hiddens.
template <typename scalar_t, typename Gemm, typename CopyRows>
void weight_gradients(const LayerSizes& s, const std::vector<Step>& steps, bool reverse,
                      const WeightGradientArgs<scalar_t>& a, const Gemm& gemm,
                      const CopyRows& copy_rows, bool gather = false) {
  const int64_t N = s.N, I = s.I, H = s.H, P = s.P, G = 4 * s.H;
  if (a.grad_input != nullptr) gemm(false, false, N, I, G, a.dgates, G, a.w_ih, I, 0, a.grad_input, I);
  gemm(true, false, G, I, N, a.dgates, G, a.input, I, 0, a.grad_w_ih, I);
  const auto terms = gather ? std::vector<PrevHiddenTerm>() : prev_hidden_terms(steps, reverse);
  if (terms.empty()) {
    gather_prev_state(steps.data(), steps.data() + steps.size(), a.output, a.h0, P, a.h_prev,
                      copy_rows);
    gemm(true, false, G, P, N, a.dgates, G, a.h_prev, P, 0, a.grad_w_hh, P);
  }
  for (size_t i = 0; i < terms.size(); ++i) {
    const PrevHiddenTerm& t = terms[i];
    const scalar_t* src = t.from_h0 ? a.h0 : a.output;
    gemm(true, false, G, P, t.rows, a.dgates + t.dgates_row * G, G, src + t.src_row * P, P,
         i == 0 ? 0 : 1, a.grad_w_hh, P);
  }
  if (a.grad_w_hr != nullptr) gemm(true, false, P, H, N, a.grad_r, P, a.hiddens, H, 0, a.grad_w_hr, H);
}

}  // namespace fused_lstm
