"""Fixtures shared by the tests."""
import pytest
import torch

import fused_lstm  # noqa: F401  (registers torch.ops.fused_lstm)


def _cpu_capabilities():
    """The builds of the CPU cell kernels this machine can run."""
    available = []
    for capability in ("default", "avx2", "avx512"):
        try:
            torch.ops.fused_lstm.set_cpu_capability(capability)
            available.append(capability)
        except RuntimeError:
            pass
    torch.ops.fused_lstm.set_cpu_capability("")
    return available


CPU_CAPABILITIES = _cpu_capabilities()


@pytest.fixture(params=CPU_CAPABILITIES)
def cpu_capability(request):
    """Runs a test once per build of the CPU cell kernels (default, avx2, avx512)."""
    assert torch.ops.fused_lstm.set_cpu_capability(request.param) == request.param
    yield request.param
    torch.ops.fused_lstm.set_cpu_capability("")
