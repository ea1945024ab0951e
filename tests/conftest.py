"""Fixtures shared by the tests."""
import os

import pytest
import torch

import fused_lstm  # noqa: F401  (registers torch.ops.fused_lstm)

# Under qemu-x86_64 (.ci/run's emulated AVX2-only CPU) nn.LSTM's oneDNN path computes
# wrong float32 results (0.44 off float64 on LSTM(16, 64); ATen's native LSTM and
# fused_lstm agree with float64 to 1e-7), so the reference runs ATen's native LSTM there.
if os.environ.get("FUSED_LSTM_TEST_REFERENCE_WITHOUT_ONEDNN") == "1":
    torch.backends.mkldnn.enabled = False


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

# (cell-kernel build, GEMM setting) pairs that together run every CPU code path:
# each build of the elementwise kernels, our register-blocked GEMMs and ATen's
# (torch's BLAS) for the GEMMs outside the loop, and the fused loops ("small" forces
# them and our per-step GEMM at every size; "aten" is the unfused path). "auto" is
# the default.
_PATHS = [("default", "aten"), ("default", "small"), ("default", "auto"), ("avx2", "small"),
          ("avx2", "auto"), ("avx512", "auto")]
CPU_PATHS = [(c, g) for c, g in _PATHS if c in CPU_CAPABILITIES]
if ("avx512", "auto") not in CPU_PATHS:
    CPU_PATHS.append((CPU_CAPABILITIES[-1], "auto"))


@pytest.fixture(params=CPU_PATHS, ids=[f"{c}-{g}" for c, g in CPU_PATHS])
def cpu_path(request):
    """Runs a test once per CPU code path: (cell-kernel build, GEMM backend)."""
    capability, gemm = request.param
    assert torch.ops.fused_lstm.set_cpu_capability(capability) == capability
    assert torch.ops.fused_lstm.set_cpu_gemm(gemm) == gemm
    yield request.param
    torch.ops.fused_lstm.set_cpu_capability("")
    torch.ops.fused_lstm.set_cpu_gemm("auto")
