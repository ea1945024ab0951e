"""The reference program trains unchanged with fused_lstm.LSTM swapped in, and
its loss at every step matches the nn.LSTM run from the same weights and data."""
import importlib.util
import pathlib

import pytest
import torch

from testing import TOLERANCES

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "reference_program.py"
_spec = importlib.util.spec_from_file_location("reference_program", _PATH)
reference_program = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_program)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_program_losses_match(dtype):
    data = reference_program.make_data(seed=7, dtype=dtype)
    reference, fused = reference_program.paired_models(seed=7, dtype=dtype)
    ref_losses = reference_program.train(reference, data)
    fused_losses = reference_program.train(fused, data)
    assert len(fused_losses) == reference_program.STEPS == 100
    rtol, atol = TOLERANCES[dtype]
    for step, (a, b) in enumerate(zip(fused_losses, ref_losses)):
        assert abs(a - b) <= atol + rtol * abs(b), f"step {step}: fused {a} vs nn {b}"
    # It trains: the last steps' loss is below the first steps'.
    assert sum(fused_losses[-10:]) < sum(fused_losses[:10])
    # and the trained weights still agree
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


def test_reference_program_step_time_uses_torch_threads(monkeypatch):
    # torch.utils.benchmark.Timer times on 1 thread unless told; the program prints
    # torch's thread count beside its step times, so it must time on that many.
    seen = []

    class Timer:
        def __init__(self, *args, num_threads=1, **kwargs):
            seen.append(num_threads)

        def blocked_autorange(self, **kwargs):
            return type("Measurement", (), {"median": 1e-3})()

    monkeypatch.setattr(reference_program.benchmark, "Timer", Timer)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    data = reference_program.make_data(steps=1, seed=7)
    reference, _ = reference_program.paired_models(seed=7)
    assert reference_program.step_time(reference, data) == 1e-3
    assert seen == [3]
