// A layer, and so a stack, as differentiable ATen ops (ops/recompute.cpp): what a
// backward under create_graph differentiates, so that its gradients can be
// differentiated again (double backward), and what the ops' Autograd kernels run where
// a C++ autograd node cannot serve (torch.func transforms, forward-mode AD;
// ops/autograd.cpp). First-order backward never runs it.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "lstm.h"

namespace fused_lstm {

// The lstm_layer op's arguments, checked as it checks them (input [N, I] rows in the
// layout of batch_sizes, h0 [B, P], c0 [B, H]) -> (output [N, P], h_n [B, P], c_n [B, H]),
// the same math as core/cell_math.h.
LayerResult layer_as_aten_ops(const at::Tensor& input, const at::Tensor& batch_sizes,
                              const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
                              const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                              const std::optional<at::Tensor>& b_hh,
                              const std::optional<at::Tensor>& w_hr, bool reverse);

// The lstm_stack op likewise: every layer and direction through layer_as_aten_ops.
LayerResult stack_as_aten_ops(const StackLayout& layout, const at::Tensor& input,
                              const at::Tensor& batch_sizes, const at::Tensor& h0,
                              const at::Tensor& c0, at::TensorList weights);

// The gradients of `outputs` (weighted by `grads`, zeros where undefined) with respect to
// each of `inputs` that is defined and requires grad, with create_graph; undefined for the
// others. `inputs` may hold undefined tensors.
std::vector<at::Tensor> differentiable_gradients(const std::vector<at::Tensor>& outputs,
                                                 const std::vector<at::Tensor>& grads,
                                                 const std::vector<at::Tensor>& inputs);

}  // namespace fused_lstm
