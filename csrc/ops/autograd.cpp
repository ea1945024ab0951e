// Autograd for the ops, registered to the Autograd key in C++ so that a call
// costs no Python. The layer forward saves only what its backward reads. Under
// create_graph the layer and stack nodes differentiate a recomputation from ATen ops
// instead (ops/recompute.h), so that double backward works; the backward op itself,
// called directly, is not differentiable and says so when asked. Where a C++ node cannot
// serve (torch.func transforms, forward-mode AD) the ops run as ATen ops instead.
#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "core/schedule.h"
#include "lstm.h"
#include "ops/recompute.h"

namespace fused_lstm {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

const auto& layer_op() {
  static const auto op = find_op<LayerSignature>("fused_lstm::lstm_layer");
  return op;
}

const auto& forward_op() {
  static const auto op = find_op<ForwardSignature>("fused_lstm::lstm_layer_forward");
  return op;
}

const auto& backward_op(bool overwrite_gates) {
  static const auto op = find_op<BackwardSignature>("fused_lstm::lstm_layer_backward");
  static const auto overwriting =
      find_op<BackwardSignature>("fused_lstm::lstm_layer_backward_overwrite_gates");
  return overwrite_gates ? overwriting : op;
}

at::Tensor zeros_if_undefined(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad : at::zeros_like(like);
}

// Whether a backward may write the gate gradients over a private workspace (`gates`,
// [N, 4H] less memory at the peak): only when it reads it for the last time, i.e. the
// graph is not kept (retain_graph), and not while tracing (torch.compile's functional
// or fake tensors), where the graphs stay functional.
bool may_overwrite_workspace(const at::Tensor& gates) {
  const bool traced = gates.key_set().has_any(
      c10::DispatchKeySet({c10::DispatchKey::Functionalize, c10::DispatchKey::Python}));
  return !traced && !torch::autograd::get_current_graph_task_keep_graph();
}

// The layer backward op, its gate gradients written over `gates` if overwrite_gates:
// (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr).
variable_list run_layer_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input,
    bool need_grad_h0, bool overwrite_gates) {
  at::AutoDispatchBelowADInplaceOrView guard;
  auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
      backward_op(overwrite_gates)
          .call(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr,
                output, gates, cells, hiddens, reverse, need_grad_input, need_grad_h0);
  // Below ADInplaceOrView nothing counted the write: a later use of gates saved
  // elsewhere for backward then fails loudly instead of reading gradients.
  if (overwrite_gates) torch::autograd::impl::bump_version(gates);
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

// The backward op called directly with grad mode on (its Autograd kernel, below): a
// node whose gradients say, when differentiated, that the op has no derivative. The
// layer and stack nodes' own double backward goes through ops/recompute.h instead.
class LayerBackwardNode : public torch::autograd::Function<LayerBackwardNode> {
 public:
  template <typename... Args>
  static variable_list forward(AutogradContext*, Args&&... args) {
    return run_layer_backward(std::forward<Args>(args)...);
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "fused_lstm: the lstm_layer_backward op is not differentiable; for second "
                "derivatives, differentiate the forward ops (or fused_lstm.LSTM) with "
                "create_graph=True");
  }
};

class LayerNode : public torch::autograd::Function<LayerNode> {
 public:
  static variable_list forward(
      AutogradContext* ctx, const at::Tensor& input, const at::Tensor& batch_sizes,
      const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
      const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
      const std::optional<at::Tensor>& w_hr, bool reverse, bool private_workspace) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // Gradients that never arrive stay undefined: zeros for the non-differentiable
    // gates, cells and hiddens would cost as much memory as the workspace itself.
    ctx->set_materialize_grads(false);
    auto [output, h_n, c_n, gates, cells, hiddens] =
        forward_op().call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
    // Only what backward reads: no forward GEMM is recomputed (the biases only under
    // create_graph).
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, w_hr.value_or(at::Tensor()), output,
                            gates, cells, hiddens, b_ih.value_or(at::Tensor()),
                            b_hh.value_or(at::Tensor())});
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    // Called from lstm_layer, which returns only (output, h_n, c_n): nothing outside
    // can see the workspace.
    ctx->saved_data["private_workspace"] = private_workspace;
    ctx->mark_non_differentiable({gates, cells, hiddens});
    return {output, h_n, c_n, gates, cells, hiddens};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &h0 = saved[1], &c0 = saved[2], &w_ih = saved[3],
                     &w_hh = saved[4], &output = saved[6], &gates = saved[7], &cells = saved[8],
                     &hiddens = saved[9];
    const auto optional = [](const at::Tensor& t) {
      return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
    };
    const std::optional<at::Tensor> w_hr = optional(saved[5]);
    if (at::GradMode::is_enabled()) {
      // create_graph: differentiable gradients (forward arguments 0, 2..8).
      const std::optional<at::Tensor> b_ih = optional(saved[10]), b_hh = optional(saved[11]);
      auto [out, h_n, c_n] = layer_as_aten_ops(
          input, ctx->saved_data["batch_sizes"].toTensor(), h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
          ctx->saved_data["reverse"].toBool());
      auto g = differentiable_gradients({out, h_n, c_n}, {grads[0], grads[1], grads[2]},
                                        {input, h0, c0, w_ih, w_hh, saved[10], saved[11],
                                         saved[5]});
      return {g[0], at::Tensor(), g[1], g[2], g[3], g[4], g[5], g[6], g[7], at::Tensor(),
              at::Tensor()};
    }
    const bool need_grad_input = ctx->needs_input_grad(0);
    const bool need_grad_h0 = ctx->needs_input_grad(2);
    const bool overwrite_gates =
        ctx->saved_data["private_workspace"].toBool() && may_overwrite_workspace(gates);
    auto result = run_layer_backward(
        zeros_if_undefined(grads[0], output), zeros_if_undefined(grads[1], h0),
        zeros_if_undefined(grads[2], c0), input, ctx->saved_data["batch_sizes"].toTensor(), h0,
        c0, w_ih, w_hh, w_hr, output, gates, cells, hiddens,
        ctx->saved_data["reverse"].toBool(), need_grad_input, need_grad_h0, overwrite_gates);
    const at::Tensor grad_bias = saved[10].defined() ? result[5] : at::Tensor();  // b_ih given
    // One gradient per forward argument, in order.
    return {need_grad_input ? result[0] : at::Tensor(), at::Tensor(),
            need_grad_h0 ? result[1] : at::Tensor(), result[2],
            result[3], result[4], grad_bias, grad_bias,
            w_hr.has_value() ? result[6] : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The whole stack (op lstm_stack) as one autograd node: one node, not one per layer
// and direction plus the stack of h_n/c_n and the views between them, which cost more
// than the ops at small shapes (benchmarks/PERF_LOG.md, row 25). Each layer and
// direction runs lstm_layer_forward, its backward lstm_layer_backward, as in
// LayerNode; every workspace is private.
class StackNode : public torch::autograd::Function<StackNode> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& batch_sizes, const at::Tensor& h0,
                               const at::Tensor& c0, at::TensorList weights, bool has_biases,
                               bool has_proj, int64_t num_layers, bool bidirectional) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->set_materialize_grads(false);
    const StackLayout layout =
        check_stack_args(h0, c0, weights, has_biases, has_proj, num_layers, bidirectional);
    // Saved: input, h0, c0, the weights, per layer-direction k (output, gates, cells,
    // hiddens), then the inputs of layers 1..L-1 (see saved_layer in backward).
    std::vector<at::Tensor> to_save{input, h0, c0};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    std::vector<at::Tensor> layer_inputs;
    auto [output, h_n, c_n] = run_stack(
        layout, input, h0, c0, weights,
        [&](const at::Tensor& layer_input, int64_t k, const LayerWeights& w,
            const at::Tensor& h0_k, const at::Tensor& c0_k) -> LayerResult {
          if (k > 0 && k % layout.directions == 0) layer_inputs.push_back(layer_input);
          auto [out, h, c, gates, cells, hiddens] =
              forward_op().call(layer_input, batch_sizes, h0_k, c0_k, w.w_ih, w.w_hh, w.b_ih,
                                w.b_hh, w.w_hr, k % layout.directions == 1);
          to_save.insert(to_save.end(), {out, gates, cells, hiddens});
          return {out, h, c};
        });
    to_save.insert(to_save.end(), layer_inputs.begin(), layer_inputs.end());
    // The last layer's output (one direction) is also this node's output: saved as such.
    ctx->save_for_backward(to_save);
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["has_biases"] = has_biases;
    ctx->saved_data["has_proj"] = has_proj;
    ctx->saved_data["num_layers"] = num_layers;
    ctx->saved_data["bidirectional"] = bidirectional;
    return {output, h_n, c_n};
  }

  // grads: output [N, D*P], h_n [L*D, B, P], c_n [L*D, B, H], each possibly undefined.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const StackLayout layout = StackLayout::make(
        ctx->saved_data["has_biases"].toBool(), ctx->saved_data["has_proj"].toBool(),
        ctx->saved_data["num_layers"].toInt(), ctx->saved_data["bidirectional"].toBool());
    const at::Tensor batch_sizes = ctx->saved_data["batch_sizes"].toTensor();
    const int64_t layer_directions = layout.layer_directions(), num_weights = layout.num_weights();
    const at::Tensor &input = saved[0], &h0 = saved[1], &c0 = saved[2];
    const at::TensorList weights(saved.data() + 3, num_weights);
    // saved_layer(k, 0..3): layer-direction k's output, gates, cells, hiddens.
    const auto saved_layer = [&](int64_t k, int64_t i) -> const at::Tensor& {
      return saved[3 + num_weights + 4 * k + i];
    };
    const auto layer_input = [&](int64_t layer) -> const at::Tensor& {
      return layer == 0 ? input : saved[3 + num_weights + 4 * layer_directions + layer - 1];
    };
    if (at::GradMode::is_enabled()) {
      // create_graph: differentiable gradients of a recomputation, for input, h0, c0
      // and each weight.
      auto [out, h_n, c_n] = stack_as_aten_ops(layout, input, batch_sizes, h0, c0, weights);
      std::vector<at::Tensor> inputs{input, h0, c0};
      inputs.insert(inputs.end(), weights.begin(), weights.end());
      auto g = differentiable_gradients({out, h_n, c_n}, {grads[0], grads[1], grads[2]}, inputs);
      variable_list result{g[0], at::Tensor(), g[1], g[2]};
      result.insert(result.end(), g.begin() + 3, g.end());
      result.resize(result.size() + 4);  // has_biases, has_proj, num_layers, bidirectional
      return result;
    }
    const bool overwrite_gates = may_overwrite_workspace(saved_layer(0, 1));
    const bool need_grad_h0 = ctx->needs_input_grad(2);
    // Nothing here is differentiated: run below autograd.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;

    std::vector<at::Tensor> grad_weights(num_weights), grad_h0(layer_directions),
        grad_c0(layer_directions);
    at::Tensor grad_layer_output = grads[0];  // [N, D*P] of the layer above
    for (int64_t layer = layout.num_layers - 1; layer >= 0; --layer) {
      const bool need_grad_input = layer > 0 || ctx->needs_input_grad(0);
      at::Tensor grad_input;
      for (int64_t direction = 0; direction < layout.directions; ++direction) {
        const int64_t k = layer * layout.directions + direction;
        const LayerWeights w = layer_weights(layout, weights, k);
        const at::Tensor& output = saved_layer(k, 0);
        // (Sizes from the weights: under torch.compile's dynamic shapes, reading one of
        // an activation's would specialize the traced graph on its batch and length.)
        const int64_t P = w.w_hh.size(1);
        const at::Tensor grad_output =
            !grad_layer_output.defined() ? at::zeros_like(output)
            : layout.directions == 1     ? grad_layer_output
                                         : grad_layer_output.narrow(1, direction * P, P);
        const at::Tensor h0_k = h0[k], c0_k = c0[k];
        auto r = run_layer_backward(
            grad_output, grads[1].defined() ? grads[1][k] : at::zeros_like(h0_k),
            grads[2].defined() ? grads[2][k] : at::zeros_like(c0_k), layer_input(layer),
            batch_sizes, h0_k, c0_k, w.w_ih, w.w_hh, w.w_hr, output, saved_layer(k, 1),
            saved_layer(k, 2), saved_layer(k, 3), direction == 1, need_grad_input,
            need_grad_h0, overwrite_gates);
        if (need_grad_input) {
          // Both directions read the same input: their gradients add up (r[0] is ours).
          grad_input = grad_input.defined() ? grad_input.add_(r[0]) : r[0];
        }
        grad_h0[k] = r[1];
        grad_c0[k] = r[2];
        // The weight gradients in the _flat_weights order: w_ih, w_hh[, b_ih, b_hh][, w_hr].
        at::Tensor* g = grad_weights.data() + k * layout.per_layer;
        g[0] = r[3];
        g[1] = r[4];
        if (layout.has_biases) g[2] = g[3] = r[5];
        if (layout.has_proj) g[layout.per_layer - 1] = r[6];
      }
      grad_layer_output = grad_input;
    }
    // One gradient per forward argument, in order (the list of weights one per weight).
    variable_list result{ctx->needs_input_grad(0) ? grad_layer_output : at::Tensor(),
                         at::Tensor(),
                         need_grad_h0 ? at::stack(grad_h0) : at::Tensor(),
                         ctx->needs_input_grad(3) ? at::stack(grad_c0) : at::Tensor()};
    result.insert(result.end(), grad_weights.begin(), grad_weights.end());
    result.resize(result.size() + 4);  // has_biases, has_proj, num_layers, bidirectional
    return result;
  }
};

ForwardResult lstm_layer_forward_autograd(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  auto r = LayerNode::apply(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                               /*private_workspace=*/false);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

// Whether any of the op's tensor arguments (Tensor, Tensor?, Tensor[]) requires grad, or
// carries a forward-mode tangent (torch.autograd.forward_ad; one level).
bool requires_grad(const at::Tensor& t) { return t.requires_grad(); }
bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
template <typename Pred>
bool any_tensor(Pred pred, const at::Tensor& t) { return pred(t); }
template <typename Pred>
bool any_tensor(Pred pred, const std::optional<at::Tensor>& t) { return t.has_value() && pred(*t); }
template <typename Pred>
bool any_tensor(Pred pred, at::TensorList ts) { return std::any_of(ts.begin(), ts.end(), pred); }
template <typename... Args>
bool any_requires_grad(const Args&... args) {
  return (any_tensor([](const at::Tensor& t) { return requires_grad(t); }, args) || ...);
}
template <typename... Args>
bool any_tangent(const Args&... args) {
  return (any_tensor([](const at::Tensor& t) { return has_tangent(t); }, args) || ...);
}

// Whether a torch.func transform (grad, vjp, jacrev, hessian, ...) would refuse a C++
// autograd Function here: the question Function::apply asks functorch, whose answer is
// an error (its interpreter stack is not in the installed headers).
bool cpp_function_refused() {
  const auto& functorch = at::functorch::functorchTLSAccessor();
  if (!functorch) return false;  // functorch never ran in this thread
  try {
    functorch->checkSupportsCppAutogradFunction();
    return false;
  } catch (const c10::Error&) {
    return true;
  }
}

// Whether the op runs as differentiable ATen ops (ops/recompute.h) instead of a node:
// under a torch.func transform, which refuses C++ autograd Functions, or with a
// forward-mode tangent on an argument, which they do not propagate (and the inference
// path would drop). nn.LSTM supports both through its ATen ops. Slower: says so once.
bool runs_as_aten_ops(bool tangent) {
  if (!tangent && !cpp_function_refused()) return false;
  TORCH_WARN_ONCE(
      "fused_lstm: under torch.func transforms or forward-mode AD the LSTM runs as ATen ops "
      "(a matmul and a few elementwise ops per step), not the fused kernels, as their C++ "
      "autograd supports neither: the same results at ATen's speed");
  return true;
}

// lstm_layer: the forward with a private workspace when a gradient is needed, else
// the backend's kernel without one.
LayerResult lstm_layer_autograd(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  if (runs_as_aten_ops(any_tangent(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))) {
    return layer_as_aten_ops(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
  }
  const bool needs_grad = at::GradMode::is_enabled() &&
                          any_requires_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  if (!needs_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return layer_op().call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
  }
  auto r = LayerNode::apply(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                               /*private_workspace=*/true);
  return {r[0], r[1], r[2]};
}

// lstm_stack: one StackNode when a gradient is needed, else the inference
// kernel (ops/stack.cpp) below autograd.
LayerResult lstm_stack_autograd(const at::Tensor& input, const at::Tensor& batch_sizes,
                                const at::Tensor& h0, const at::Tensor& c0,
                                at::TensorList weights, bool has_biases, bool has_proj,
                                int64_t num_layers, bool bidirectional) {
  if (runs_as_aten_ops(any_tangent(input, h0, c0, weights))) {
    return stack_as_aten_ops(
        check_stack_args(h0, c0, weights, has_biases, has_proj, num_layers, bidirectional), input,
        batch_sizes, h0, c0, weights);
  }
  const bool needs_grad =
      at::GradMode::is_enabled() && any_requires_grad(input, h0, c0, weights);
  if (!needs_grad) {
    static const auto stack_op = find_op<StackSignature>("fused_lstm::lstm_stack");
    at::AutoDispatchBelowADInplaceOrView guard;
    return stack_op.call(input, batch_sizes, h0, c0, weights, has_biases, has_proj, num_layers,
                         bidirectional);
  }
  auto r = StackNode::apply(input, batch_sizes, h0, c0, weights, has_biases, has_proj,
                            num_layers, bidirectional);
  return {r[0], r[1], r[2]};
}

template <bool kOverwriteGates>
BackwardResult lstm_layer_backward_autograd(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input,
    bool need_grad_h0) {
  auto r = LayerBackwardNode::apply(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0,
                                    w_ih, w_hh, w_hr, output, gates, cells, hiddens, reverse,
                                    need_grad_input, need_grad_h0, kOverwriteGates);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_autograd);
  m.impl("lstm_layer", &lstm_layer_autograd);
  m.impl("lstm_stack", &lstm_stack_autograd);
  m.impl("lstm_layer_backward", &lstm_layer_backward_autograd<false>);
  m.impl("lstm_layer_backward_overwrite_gates", &lstm_layer_backward_autograd<true>);
}

}  // namespace fused_lstm
