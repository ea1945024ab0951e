// A layer, and so a stack, recomputed from differentiable ATen ops (ops/recompute.cpp):
// what a backward under create_graph differentiates, so that its gradients can be
// differentiated again (double backward). First-order backward never runs it.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "lstm.h"

namespace fused_lstm {

// input [N, I] rows in the schedule's layout, h0 [B, P], c0 [B, H], weights as for the
// layer ops -> (output [N, P], h_n [B, P], c_n [B, H]), the same math as core/cell_math.h.
LayerResult recompute_layer(const at::Tensor& input, const std::vector<Step>& steps,
                            const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh,
                            const std::optional<at::Tensor>& w_hr);

// The gradients of `outputs` (weighted by `grads`, zeros where undefined) with respect to
// each of `inputs` that is defined and requires grad, with create_graph; undefined for the
// others. `inputs` may hold undefined tensors.
std::vector<at::Tensor> differentiable_gradients(const std::vector<at::Tensor>& outputs,
                                                 const std::vector<at::Tensor>& grads,
                                                 const std::vector<at::Tensor>& inputs);

}  // namespace fused_lstm
