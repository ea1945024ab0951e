"""Functional API: one LSTM layer in one direction (`lstm_layer`), and the
stack of layers and directions that `fused_lstm.LSTM` runs (`lstm`).

Shapes: T steps, B batch, I input size, H hidden size, P = proj_size or H.
Gate order in every weight is i, f, g, o, as in torch.nn.LSTM.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _ops  # noqa: F401  (registers torch.ops.fused_lstm)
from . import _onnx

__all__ = ["lstm_layer", "lstm", "lstm_cell"]


# batch_sizes of dense input, [T] of B, by (T, B): made once (1.3 us a call, 10% of an
# LSTMCell step at B1 H32), and only in eager code (a trace or graph must compute them
# from the sizes).
_DENSE_BATCH_SIZES: Dict[Tuple[int, int], Tensor] = {}


def _dense_batch_sizes(T: int, B: int) -> Tensor:
    if not torch.jit.is_scripting():
        if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            sizes = _DENSE_BATCH_SIZES.get((T, B))
            if sizes is None:
                if len(_DENSE_BATCH_SIZES) >= 256:
                    _DENSE_BATCH_SIZES.clear()
                sizes = torch.full((T,), B, dtype=torch.long, device="cpu")
                _DENSE_BATCH_SIZES[(T, B)] = sizes
            return sizes
    return torch.full((T,), B, dtype=torch.long, device="cpu")


_HAS_ONEDNN = torch.backends.mkldnn.is_available()  # a constant of the build (dynamo skips the call)


def _cpu_autocast_dtype(input: Tensor, packed: bool, has_proj: bool) -> Optional[torch.dtype]:
    """The dtype a stack runs in under ``torch.autocast("cpu")``, as nn.LSTM's: its
    oneDNN path (dense input, no projection, oneDNN enabled, input neither empty nor
    float64) runs in the autocast dtype; packed input and projections take ATen's
    native path, whose output stays float32 (its GEMMs alone are autocast). None: no
    cast."""
    if input.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return None
    if packed or has_proj or input.dtype == torch.float64 or input.numel() == 0:
        return None
    if not (_HAS_ONEDNN and torch.backends.mkldnn.enabled):
        return None
    return torch.get_autocast_dtype("cpu")


def _autocast_cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Floating tensors but float64, as autocast's own casts.
    return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t


# The flat weight list (nn.LSTM._flat_weights order): for each layer, for each direction,
# w_ih, w_hh[, b_ih, b_hh][, w_hr]. The C++ side reads it through StackLayout (csrc/lstm.h).
def weights_per_layer(has_biases: bool, has_proj: bool) -> int:
    """How many tensors one layer and direction holds in the flat weight list."""
    return 2 + (2 if has_biases else 0) + (1 if has_proj else 0)


def layer_weights(
    weights: List[Tensor], k: int, has_biases: bool, has_proj: bool
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(w_ih, w_hh, b_ih, b_hh, w_hr)`` of layer-direction ``k = layer * D + direction``,
    the absent ones None."""
    n = weights_per_layer(has_biases, has_proj)
    first = k * n
    b_ih: Optional[Tensor] = None
    b_hh: Optional[Tensor] = None
    w_hr: Optional[Tensor] = None
    if has_biases:
        b_ih, b_hh = weights[first + 2], weights[first + 3]
    if has_proj:
        w_hr = weights[first + n - 1]
    return weights[first], weights[first + 1], b_ih, b_hh, w_hr


def lstm_layer(
    input: Tensor,
    hx: Tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    batch_sizes: Optional[Tensor] = None,
    reverse: bool = False,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Runs one LSTM layer in one direction with the fused kernels.

    Args:
        input: ``[T, B, I]`` time-major, or the ``data`` of a PackedSequence,
            ``[N, I]``, when ``batch_sizes`` is given.
        hx: ``(h0 [B, P], c0 [B, H])``.
        w_ih: ``[4H, I]``; w_hh: ``[4H, P]``; b_ih, b_hh: ``[4H]`` or None;
            w_hr: ``[P, H]`` projection, or None.
        batch_sizes: ``[T]`` int64 CPU tensor of a PackedSequence (sorted by
            length), or None for dense input.
        reverse: run from the last step to the first (the reverse direction of
            a bidirectional LSTM).

    Returns:
        ``output`` (``[T, B, P]``, or ``[N, P]`` when packed) and ``(h_n [B, P], c_n [B, H])``.
        Differentiable with respect to input, hx and every weight.
    """
    if not torch.jit.is_scripting():
        if _onnx.exporting():
            return _onnx.lstm_layer(input, hx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse)
    h0, c0 = hx
    data, sizes = input, batch_sizes
    if sizes is None:
        # Dense input runs as packed data whose batch never shrinks: [T * B, I].
        if input.dim() != 3:
            raise ValueError(f"lstm_layer: expected input of shape [T, B, I], got {list(input.shape)}")
        data = input.reshape(input.size(0) * input.size(1), input.size(2))
        sizes = _dense_batch_sizes(input.size(0), input.size(1))
    # Keeps the workspace for backward only when a gradient is needed.
    output, h_n, c_n = torch.ops.fused_lstm.lstm_layer(data, sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                       w_hr, reverse)
    if batch_sizes is None:
        output = output.view(input.size(0), input.size(1), output.size(-1))
    return output, (h_n, c_n)


def lstm_cell(
    input: Tensor,
    hx: Tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One LSTM step: ``input [B, I]``, ``hx = (h [B, H], c [B, H])`` -> ``(h', c')``.
    The same op as a layer, run for a single timestep."""
    if not torch.jit.is_scripting():
        if _onnx.exporting():
            _, (h, c) = lstm_layer(input.unsqueeze(0), hx, w_ih, w_hh, b_ih, b_hh)
            return h, c
    # One step of dense input is its own packed data: [B, I] with batch_sizes [B].
    _, h, c = torch.ops.fused_lstm.lstm_layer(input, _dense_batch_sizes(1, input.size(0)), hx[0],
                                              hx[1], w_ih, w_hh, b_ih, b_hh, None, False)
    return h, c


def lstm(
    input: Tensor,
    hx: Tuple[Tensor, Tensor],
    weights: List[Tensor],
    num_layers: int,
    has_biases: bool = True,
    has_proj: bool = False,
    bidirectional: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    batch_sizes: Optional[Tensor] = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """A stacked, optionally bidirectional LSTM over time-major input.

    Args:
        input: ``[T, B, I]``, or PackedSequence ``data [N, I]`` with ``batch_sizes``.
        hx: ``(h0 [L*D, B, P], c0 [L*D, B, H])``, D = 2 if bidirectional else 1.
        weights: the flat list in ``nn.LSTM._flat_weights`` order: for each layer,
            for each direction, ``w_ih, w_hh[, b_ih, b_hh][, w_hr]``.
        dropout: applied to each layer's output except the last, in training only.

    Returns:
        ``output`` (``[T, B, D*P]`` or ``[N, D*P]``) and ``(h_n [L*D, B, P], c_n [L*D, B, H])``,
        differentiable with respect to input, hx and every weight. Without dropout
        between layers the whole stack is one op call (``lstm_stack``), and one autograd
        node when a gradient is needed; with it, one ``lstm_layer`` call per layer and
        direction. Under ``torch.onnx.export`` it becomes ONNX ``LSTM`` nodes. Under
        ``torch.autocast("cpu")`` dense input without a projection runs in the autocast
        dtype (outputs and states too), as nn.LSTM's oneDNN path does; packed input and
        projections run in the input's dtype.
    """
    directions = 2 if bidirectional else 1
    expected = num_layers * directions * weights_per_layer(has_biases, has_proj)
    if len(weights) != expected:
        raise ValueError(f"lstm: expected {expected} weights, got {len(weights)}")
    h0, c0 = hx
    stacked = not (dropout > 0 and training and num_layers > 1)
    if not torch.jit.is_scripting():
        stacked = stacked and not _onnx.exporting()
        dtype = _cpu_autocast_dtype(input, batch_sizes is not None, has_proj)
        if dtype is not None:
            input, h0, c0 = (_autocast_cast(t, dtype) for t in (input, h0, c0))
            weights = [_autocast_cast(w, dtype) for w in weights]
    if stacked:
        # Every layer and direction in one op call, and with a gradient one autograd node.
        data, sizes = input, batch_sizes
        if sizes is None:
            # Dense input runs as packed data whose batch never shrinks: [T * B, I].
            data = input.reshape(input.size(0) * input.size(1), input.size(2))
            sizes = _dense_batch_sizes(input.size(0), input.size(1))
        output, h_stack, c_stack = torch.ops.fused_lstm.lstm_stack(
            data, sizes, h0, c0, weights, has_biases, has_proj, num_layers, bidirectional)
        if batch_sizes is None:
            output = output.view(input.size(0), input.size(1), output.size(-1))
        return output, (h_stack, c_stack)
    # Layer by layer (dropout between layers; ONNX export).
    h_n: List[Tensor] = []
    c_n: List[Tensor] = []
    layer_input = input
    for layer in range(num_layers):
        outputs: List[Tensor] = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = layer_weights(weights, k, has_biases, has_proj)
            out, (h, c) = lstm_layer(layer_input, (h0[k], c0[k]), w_ih, w_hh, b_ih, b_hh, w_hr,
                                     batch_sizes, direction == 1)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if dropout > 0 and training and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, p=dropout, training=True)
    return layer_input, (torch.stack(h_n), torch.stack(c_n))
