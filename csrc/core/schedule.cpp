// The step schedule of a layer call and the previous-hidden terms of dW_hh
// (core/schedule.h).
#include "core/schedule.h"

#include <algorithm>

namespace fused_lstm {

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
  if (steps.empty() || !dense_schedule(steps)) return {};
  const int64_t B = steps.front().batch;
  const int64_t N = B * static_cast<int64_t>(steps.size());
  // Forward: step t (rows t*B) began from output step t-1; reverse: from step t+1.
  return {{reverse ? 0 : B, N - B, false, reverse ? B : 0},
          {steps.front().offset, B, true, 0}};
}

bool dense_schedule(const std::vector<Step>& steps) {
  return std::all_of(steps.begin(), steps.end(),
                     [&](const Step& s) { return s.batch == steps.front().batch; });
}

std::vector<persistent::StepInfo> persistent_step_table(const std::vector<Step>& steps) {
  std::vector<persistent::StepInfo> table;
  table.reserve(steps.size());
  for (size_t n = 0; n < steps.size(); ++n) {
    const Step& st = steps[n];
    const int64_t next = n + 1 < steps.size() ? steps[n + 1].batch : 0;
    table.push_back({st.offset, st.prev_offset, static_cast<int32_t>(st.batch),
                     static_cast<int32_t>(st.prev_batch),
                     static_cast<int32_t>(std::min(st.batch, next)), 0});
  }
  return table;
}

}  // namespace fused_lstm
