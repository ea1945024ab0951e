// The layer and the stack as differentiable ATen ops (ops/recompute.h).
#include "ops/recompute.h"

#include <torch/autograd.h>

#include <algorithm>
#include <utility>

namespace fused_lstm {

namespace {

// The schedule of batch_sizes, after the layer op's checks. Under a torch.func transform
// every tensor argument of an op arrives wrapped, without storage to read (and a tensor
// made here would be wrapped too): its values then come through item(), which the
// wrapper forwards, into memory of our own.
std::vector<Step> checked_schedule(const at::Tensor& input, const at::Tensor& batch_sizes,
                                   const at::Tensor& h0, const at::Tensor& c0,
                                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                                   const std::optional<at::Tensor>& b_ih,
                                   const std::optional<at::Tensor>& b_hh,
                                   const std::optional<at::Tensor>& w_hr, bool reverse) {
  const auto schedule = [&](const at::Tensor& sizes) {
    return make_forward_params(input, sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                               false)
        .steps;
  };
  if (batch_sizes.has_storage() || batch_sizes.dim() != 1 ||
      batch_sizes.scalar_type() != at::kLong || !batch_sizes.device().is_cpu()) {
    return schedule(batch_sizes);  // (the checks reject any but the first)
  }
  std::vector<int64_t> values(batch_sizes.size(0));
  for (int64_t t = 0; t < batch_sizes.size(0); ++t) values[t] = batch_sizes[t].item<int64_t>();
  return schedule(at::from_blob(values.data(), {batch_sizes.size(0)}, at::kLong));
}

}  // namespace

LayerResult layer_as_aten_ops(const at::Tensor& input, const at::Tensor& batch_sizes,
                              const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                              const std::optional<at::Tensor>& b_hh,
                              const std::optional<at::Tensor>& w_hr, bool reverse) {
  const std::vector<Step> steps =
      checked_schedule(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
  const int64_t B = h0.size(0);
  at::Tensor gates_x = at::matmul(input, w_ih.t());  // [N, 4H]
  if (b_ih.has_value()) gates_x = gates_x + *b_ih + *b_hh;
  // The running state of every row: rows [0, batch) of a step carry on from the step
  // before (or from h0/c0, where they start, in the reverse direction); the others keep
  // theirs (their final state, or h0/c0 until they start).
  at::Tensor h_state = h0, c_state = c0;
  std::vector<std::pair<int64_t, at::Tensor>> outputs;  // (first row, [batch, P])
  for (const Step& step : steps) {
    const int64_t b = step.batch;
    if (b == 0) continue;
    const at::Tensor h_in = h_state.narrow(0, 0, b), c_in = c_state.narrow(0, 0, b);
    const auto g = (gates_x.narrow(0, step.offset, b) + at::matmul(h_in, w_hh.t())).chunk(4, 1);
    const at::Tensor i = g[0].sigmoid(), f = g[1].sigmoid(), gg = g[2].tanh(), o = g[3].sigmoid();
    const at::Tensor c = f * c_in + i * gg;
    at::Tensor h = o * c.tanh();
    if (w_hr.has_value()) h = at::matmul(h, w_hr->t());
    outputs.emplace_back(step.offset, h);
    h_state = b == B ? h : at::cat({h, h_state.narrow(0, b, B - b)});
    c_state = b == B ? c : at::cat({c, c_state.narrow(0, b, B - b)});
  }
  std::sort(outputs.begin(), outputs.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<at::Tensor> rows;
  for (auto& [offset, h] : outputs) rows.push_back(std::move(h));
  at::Tensor output = rows.empty() ? input.new_empty({0, h0.size(1)}) : at::cat(rows);
  return {output, h_state, c_state};
}

LayerResult stack_as_aten_ops(const StackLayout& layout, const at::Tensor& input,
                              const at::Tensor& batch_sizes, const at::Tensor& h0,
                              const at::Tensor& c0, at::TensorList weights) {
  return run_stack(layout, input, h0, c0, weights,
                   [&](const at::Tensor& layer_input, int64_t k, const LayerWeights& w,
                       const at::Tensor& h0_k, const at::Tensor& c0_k) {
                     return layer_as_aten_ops(layer_input, batch_sizes, h0_k, c0_k, w.w_ih,
                                              w.w_hh, w.b_ih, w.b_hh, w.w_hr,
                                              k % layout.directions == 1);
                   });
}

std::vector<at::Tensor> differentiable_gradients(const std::vector<at::Tensor>& outputs,
                                                 const std::vector<at::Tensor>& grads,
                                                 const std::vector<at::Tensor>& inputs) {
  std::vector<at::Tensor> wanted, grad_outputs;
  std::vector<size_t> where;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (inputs[i].defined() && inputs[i].requires_grad()) {
      wanted.push_back(inputs[i]);
      where.push_back(i);
    }
  }
  std::vector<at::Tensor> result(inputs.size());
  // Only the outputs that depend on something requiring grad (with no steps, h_n is h0).
  std::vector<at::Tensor> differentiable;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].requires_grad()) continue;
    differentiable.push_back(outputs[i]);
    grad_outputs.push_back(grads[i].defined() ? grads[i] : at::zeros_like(outputs[i]));
  }
  if (wanted.empty() || differentiable.empty()) return result;
  const auto got = torch::autograd::grad(differentiable, wanted, grad_outputs,
                                         /*retain_graph=*/true, /*create_graph=*/true,
                                         /*allow_unused=*/true);
  for (size_t j = 0; j < where.size(); ++j) result[where[j]] = got[j];
  return result;
}

}  // namespace fused_lstm
