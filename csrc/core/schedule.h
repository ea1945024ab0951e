// The order a layer's steps run in, and the previous-hidden terms of dW_hh.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "core/persistent.h"
#include "lstm.h"

namespace fused_lstm {

// Forward order: t = 0..T-1, or T-1..0 when reverse. The batch can only shrink
// going forward in time, so in reverse it grows and new rows start from h0/c0.
std::vector<Step> make_schedule(const at::Tensor& batch_sizes, bool reverse);

// dW_hh = sum over steps of dgates[t]^T h_prev[t]. Where the batch never changes
// (dense input), h_prev is the output shifted by one step, with h0 for the first
// step run: two GEMMs read it in place, dgates[rows]^T @ (output or h0)[src_row...].
// Returns those terms, or nothing when the batch varies (packed input): then
// h_prev is gathered first (gather_prev_state, core/weight_gradients.h).
struct PrevHiddenTerm {
  int64_t dgates_row;  // first row of dgates
  int64_t rows;
  bool from_h0;        // else from the output
  int64_t src_row;     // first row of the output or h0
};
std::vector<PrevHiddenTerm> prev_hidden_terms(const std::vector<Step>& steps, bool reverse);

// Whether every step runs the same batch (dense input).
bool dense_schedule(const std::vector<Step>& steps);

// The persistent kernels' step table (core/persistent.h): the steps, each with the rows
// going on to the step run after it.
std::vector<persistent::StepInfo> persistent_step_table(const std::vector<Step>& steps);

}  // namespace fused_lstm
