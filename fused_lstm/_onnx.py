"""ONNX export: under ``torch.onnx.export(..., dynamo=True)`` each layer and direction
becomes one standard ONNX ``LSTM`` node (``torch.onnx.ops.symbolic_multi_out``), so the
exported model runs in any ONNX runtime without our ops.

ONNX orders the gates i, o, f, c (torch: i, f, g, o) and takes one bias ``[Wb, Rb]``.
It has no projection, and a PackedSequence has no ONNX form: both raise.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor


@torch.compiler.assume_constant_result
def _in_onnx_export() -> bool:
    # Dynamo folds torch.onnx.is_in_onnx_export to False; the exporter's strict=True
    # capture would then record our op. Run as a constant, it reads the real flag.
    return torch.onnx.is_in_onnx_export()


def exporting() -> bool:
    """Whether torch.onnx.export is tracing this call. torch.onnx.is_in_onnx_export costs
    ~2 us (imports inside it), so it is asked only under torch.export (the exporter
    of ``dynamo=True``) or torch.jit.trace (the legacy one)."""
    return (torch.compiler.is_exporting() or torch.jit.is_tracing()) and _in_onnx_export()


def refuse_packed() -> None:
    raise RuntimeError(
        "fused_lstm: ONNX export of PackedSequence input is not supported: export the "
        "model on padded [T, B, I] input instead")


def _onnx_gates(w: Tensor) -> Tensor:
    # w: [4H, ...] in torch's gate order i, f, g, o -> [1, 4H, ...] in ONNX's i, o, f, c.
    # Slices, not chunk: the exporter folds Slice on the weights into constants, Split not.
    H = w.size(0) // 4
    return torch.cat([w[:H], w[3 * H:], w[H:3 * H]], 0).unsqueeze(0)


def lstm_layer(
    input: Tensor,
    hx: Tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    w_hr: Optional[Tensor],
    batch_sizes: Optional[Tensor],
    reverse: bool,
) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """functional.lstm_layer as one ONNX LSTM node: input [T, B, I], hx ([B, H], [B, H])
    -> output [T, B, H], (h_n [B, H], c_n [B, H])."""
    if w_hr is not None:
        raise RuntimeError(
            "fused_lstm: ONNX export of an LSTM with proj_size > 0 is not supported: "
            "the ONNX LSTM operator has no projection")
    if batch_sizes is not None:
        refuse_packed()
    if torch.jit.is_tracing():
        raise RuntimeError(
            "fused_lstm: ONNX export needs the torch.export-based exporter, "
            "torch.onnx.export(..., dynamo=True) (the default since torch 2.9); the legacy "
            "TorchScript-based exporter (dynamo=False) is not supported")
    h0, c0 = hx
    T, B, H = input.size(0), input.size(1), w_ih.size(0) // 4
    bias = None
    if b_ih is not None and b_hh is not None:
        bias = torch.cat([_onnx_gates(b_ih), _onnx_gates(b_hh)], 1)  # [1, 8H]
    # Inputs X, W, R, B, sequence_lens, initial_h, initial_c; outputs Y [T, 1, B, H],
    # Y_h [1, B, H], Y_c [1, B, H].
    y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        [input, _onnx_gates(w_ih), _onnx_gates(w_hh), bias, None, h0.unsqueeze(0), c0.unsqueeze(0)],
        {"hidden_size": int(H), "direction": "reverse" if reverse else "forward"},
        dtypes=[input.dtype] * 3,
        shapes=[[T, 1, B, H], [1, B, H], [1, B, H]],
    )
    return y.squeeze(1), (y_h.squeeze(0), y_c.squeeze(0))
