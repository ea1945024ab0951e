"""The named shape suites: B batch, T sequence length, I input size, H hidden
size, L layers. Every case is timed in forward (inference, no_grad) and train
(forward + backward) mode. "quick" and "full" time the same shape cases (issue 13's
targets are on "full"); "models" the LSTMs of published models."""
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
    suite: str = "shapes"  # "shapes" (quick, full), "models", or "tiny" (tests only)


CASES = [
    Case("seed", 32, 5, 10, 20, 2, notes="the reference program's shape"),
    Case("stream", 1, 100, 32, 64, notes="streaming inference"),
    Case("small", 8, 256, 64, 128),
    Case("fastrnns", 64, 100, 512, 512, notes="PyTorch's own RNN benchmark default"),
    Case("wide", 16, 50, 256, 1024),
    Case("bidir-2layer", 32, 100, 128, 256, 2, bidirectional=True, notes="bidirectional"),
    Case("packed", 32, 100, 128, 256, packed=True, notes="PackedSequence, variable lengths"),
    Case("decode", 8, 1, 256, 256, 2, notes="one step of a decoding loop (T = 1)"),
    # Published models' LSTMs (suite "models"): the shapes users train, not chosen for us.
    Case("word-lm", 20, 35, 200, 200, 2, suite="models",
         notes="pytorch/examples' word language model, default sizes"),
    Case("word-lm-medium", 20, 35, 650, 650, 2, suite="models",
         notes="Zaremba et al. 2014, medium"),
    Case("char-rnn", 50, 50, 65, 128, 2, suite="models",
         notes="Karpathy's char-rnn defaults, one-hot input"),
    Case("nmt-encoder", 64, 30, 500, 250, 2, bidirectional=True, suite="models",
         notes="OpenNMT-py's default encoder: brnn, 500 units as 2 x 250"),
    Case("speech-encoder", 16, 300, 80, 320, 3, bidirectional=True, suite="models",
         notes="a BiLSTM acoustic encoder: 80 filterbanks, 3 s at 10 ms"),
    Case("forecast", 128, 24, 8, 64, 2, suite="models",
         notes="time-series forecasting: 24 steps of 8 features"),
    # Tiny, for the benchmark's own tests.
    Case("tiny", 2, 3, 4, 5, suite="tiny", notes="smoke test only"),
    Case("tiny-packed", 3, 4, 4, 5, 2, bidirectional=True, packed=True, suite="tiny",
         notes="smoke test only"),
]
CASES_BY_NAME = {c.name: c for c in CASES}

# Suite name -> (cases, seconds of timing per implementation and measurement).
SUITES = {
    "quick": ([c.name for c in CASES if c.suite == "shapes"], 0.3),
    "full": ([c.name for c in CASES if c.suite == "shapes"], 1.5),
    "models": ([c.name for c in CASES if c.suite == "models"], 1.5),
}
# Suite name -> fresh processes each case is timed in (--processes): on a shared VM a
# whole process can run fast or slow, every implementation in it alike, so the full
# suite reports the median over three.
SUITE_PROCESSES = {"quick": 1, "full": 3, "models": 3}
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
