"""Fixtures shared by the tests."""
import os

import pytest
import torch

import fused_lstm

# Property-based tests (test_hypothesis.py): "ci" by default, inside CI's budget;
# `pytest --hypothesis-profile=deep` for a longer search. (hypothesis is in the test
# install; where it is missing, as on the GPU machine, test_hypothesis.py skips.)
try:
    from hypothesis import HealthCheck, settings
except ImportError:
    pass
else:
    # "ci" draws the same examples every run (derandomize) and keeps no database; "deep"
    # draws fresh ones.
    settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                              database=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("deep", max_examples=5000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile("ci")

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



def _set_cpu_path(capability, gemm):
    assert torch.ops.fused_lstm.set_cpu_capability(capability) == capability
    assert torch.ops.fused_lstm.set_cpu_gemm(gemm) == gemm


def _reset_cpu_path():
    torch.ops.fused_lstm.set_cpu_capability("")
    torch.ops.fused_lstm.set_cpu_gemm("auto")


@pytest.fixture(params=CPU_PATHS, ids=[f"{c}-{g}" for c, g in CPU_PATHS])
def cpu_path(request):
    """Runs a test once per CPU code path: (cell-kernel build, GEMM backend)."""
    _set_cpu_path(*request.param)
    yield request.param
    _reset_cpu_path()


# Why the CUDA cases skip here, or None where they run.
CUDA_SKIP_REASON = (
    "needs a CUDA device" if not torch.cuda.is_available() else
    "fused_lstm was built without CUDA kernels (no nvcc, or FORCE_CUDA unset)"
    if fused_lstm.backend_info()["cuda_kernels"] != "built" else None)
CUDA_MARKS = [pytest.mark.cuda,
              pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")]

# The devices the shared reference tests run on: every CPU code path, and CUDA.
DEVICES = [pytest.param(("cpu",) + p, id=f"{p[0]}-{p[1]}") for p in CPU_PATHS] + [
    pytest.param(("cuda", None, None), id="cuda", marks=CUDA_MARKS)]


@pytest.fixture(params=DEVICES)
def device(request):
    """Runs a test once per CPU code path and once on CUDA; yields "cpu" or "cuda". On
    CUDA, float32 GEMMs run without TF32, so that float32 is compared as float32."""
    kind, capability, gemm = request.param
    if kind == "cpu":
        _set_cpu_path(capability, gemm)
        yield "cpu"
        _reset_cpu_path()
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield "cuda"
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
