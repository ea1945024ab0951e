"""The named shape suite: B batch, T sequence length, I input size, H hidden
size, L layers. Every case is timed in forward (inference, no_grad) and train
(forward + backward) mode."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    seq_len: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    packed: bool = False  # PackedSequence with lengths drawn up to seq_len
    notes: str = ""


CASES = [
    Case("seed", 32, 5, 10, 20, 2, notes="the reference program's shape"),
    Case("stream", 1, 100, 32, 64, notes="streaming inference"),
    Case("small", 8, 256, 64, 128),
    Case("fastrnns", 64, 100, 512, 512, notes="PyTorch's own RNN benchmark default"),
    Case("wide", 16, 50, 256, 1024),
    Case("bidir-2layer", 32, 100, 128, 256, 2, bidirectional=True, notes="bidirectional"),
    Case("packed", 32, 100, 128, 256, packed=True, notes="PackedSequence, variable lengths"),
    Case("decode", 8, 1, 256, 256, 2, notes="one step of a decoding loop (T = 1)"),
    # Tiny, for the benchmark's own tests.
    Case("tiny", 2, 3, 4, 5, notes="smoke test only"),
    Case("tiny-packed", 3, 4, 4, 5, 2, bidirectional=True, packed=True, notes="smoke test only"),
]
CASES_BY_NAME = {c.name: c for c in CASES}

# Suite name -> (cases, seconds of timing per implementation and measurement).
SUITES = {
    "quick": ([c.name for c in CASES if not c.name.startswith("tiny")], 0.3),
    "full": ([c.name for c in CASES if not c.name.startswith("tiny")], 1.5),
}
# Suite name -> fresh processes each case is timed in (--processes): on a shared VM a
# whole process can run fast or slow, every implementation in it alike, so the full
# suite reports the median over three.
SUITE_PROCESSES = {"quick": 1, "full": 3}
MODES = ("forward", "train")


def lstm_flops(case: Case, rows: int, mode: str) -> float:
    """GEMM flops of one call: per layer and direction 2 * rows * 4H * (I_layer + H);
    backward costs twice the forward GEMMs (dx, dW_ih; dh, dW_hh)."""
    directions = 2 if case.bidirectional else 1
    flops = 0.0
    for layer in range(case.num_layers):
        layer_input = case.input_size if layer == 0 else directions * case.hidden_size
        flops += directions * 2.0 * rows * 4 * case.hidden_size * (layer_input + case.hidden_size)
    return flops * (3 if mode == "train" else 1)
