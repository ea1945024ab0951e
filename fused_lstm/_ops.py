"""Loads the compiled ops and registers, for each, its fake (shape-only)
implementation. Schemas live in csrc/ops/schemas.cpp; autograd is registered in C++
(csrc/ops/autograd.cpp), so that a call costs no Python."""
import torch

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.fused_lstm)
except ImportError as e:
    import os
    raise ImportError(
        f"fused_lstm: the compiled extension fused_lstm._C did not load from {os.path.dirname(__file__)} "
        f"({e}). If it is missing there because that is the source checkout (python puts the current "
        "folder first on sys.path), run from another folder; otherwise install with "
        "`pip install --no-build-isolation .`") from e

ops = torch.ops.fused_lstm


def _sizes(input, w_ih, w_hr):
    # (N, H, P): rows over all steps, hidden size, size of h
    hidden = w_ih.shape[0] // 4
    return input.shape[0], hidden, (w_hr.shape[0] if w_hr is not None else hidden)


@torch.library.register_fake("fused_lstm::lstm_layer_forward")
def _lstm_layer_forward_fake(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    N, H, P = _sizes(input, w_ih, w_hr)
    B = h0.shape[0]
    hiddens = input.new_empty((N, H)) if w_hr is not None else input.new_empty((0,))
    return (input.new_empty((N, P)), input.new_empty((B, P)), input.new_empty((B, H)),
            input.new_empty((N, 4 * H)), input.new_empty((N, H)), hiddens)


@torch.library.register_fake("fused_lstm::lstm_layer")
def _lstm_layer_fake(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    N, H, P = _sizes(input, w_ih, w_hr)
    B = h0.shape[0]
    return input.new_empty((N, P)), input.new_empty((B, P)), input.new_empty((B, H))


@torch.library.register_fake("fused_lstm::lstm_layer_backward")
@torch.library.register_fake("fused_lstm::lstm_layer_backward_overwrite_gates")
def _lstm_layer_backward_fake(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0,
                              w_ih, w_hh, w_hr, output, gates, cells, hiddens, reverse,
                              need_grad_input, need_grad_h0=True):
    N, H, P = _sizes(input, w_ih, w_hr)
    grad_input = input.new_empty(input.shape) if need_grad_input else input.new_empty((0,))
    grad_h0 = h0.new_empty(h0.shape) if need_grad_h0 else input.new_empty((0,))
    grad_w_hr = w_hr.new_empty(w_hr.shape) if w_hr is not None else input.new_empty((0,))
    return (grad_input, grad_h0, c0.new_empty(c0.shape),
            w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
            input.new_empty((4 * H,)), grad_w_hr)


@torch.library.register_fake("fused_lstm::lstm_stack")
def _lstm_stack_fake(input, batch_sizes, h0, c0, weights, has_biases, has_proj,
                               num_layers, bidirectional):
    directions = 2 if bidirectional else 1
    return (input.new_empty((input.shape[0], directions * h0.shape[2])), h0.new_empty(h0.shape),
            c0.new_empty(c0.shape))
