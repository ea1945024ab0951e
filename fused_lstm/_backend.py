"""What fused_lstm runs on this machine (`fused_lstm.backend_info()`; from a shell
`python -m fused_lstm.info`), and the warnings where it runs slower than it could."""
import platform
import re
import warnings

import torch

from ._ops import ops


def _cpu_model_and_flags():
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == (platform.processor() or platform.machine()):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model, flags


def _torch_blas():
    """The BLAS torch was built with (its BLAS_INFO), e.g. 'mkl', 'openblas', or '' if none."""
    match = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return match.group(1) if match else ""


def backend_info():
    """What the CPU (and CUDA) kernels run here, as a dict of strings.

    Keys: ``cpu_model``, ``cpu_flags`` (the SIMD ones: avx2, fma, avx512*), ``torch``,
    ``torch_blas`` (the BLAS torch was built with), ``mkldnn`` (oneDNN in torch, used by
    nn.LSTM), ``cpu_capability`` (the build of fused_lstm's CPU kernels in use: avx512,
    avx2 or default), ``aten_cpu_capability``, ``gemm_setting``, ``gemm_small`` /
    ``gemm_few_rows`` / ``gemm_large`` (what runs each kind of GEMM), ``half_layers``
    (how half and bfloat16 layers run), ``bfloat16_products`` (where bfloat16 layers
    multiply in bfloat16: on AVX512_BF16 CPUs with the avx512 build, fused loops and
    one-step calls, forward and backward, and other layers' backward large GEMMs; on
    other CPUs none, but one-step calls of few rows, forward and backward, read the
    weights as stored), ``float16_products`` (the same for float16 layers: none, but
    one-step calls of few rows read the weights as stored), the tuning rules in force (``fused_forward_min_hidden``,
    ``fused_min_steps``, ``fused_backward_weights``, ``l2_cache_bytes``), ``threads``,
    ``parallel_backend`` and ``cuda_kernels``; in a CUDA build also ``cuda_persistent``
    ("on" or "off": whether CUDA layers run the persistent kernels, see the README).
    """
    model, flags = _cpu_model_and_flags()
    simd = [f for f in flags if f in ("avx", "avx2", "fma", "f16c") or f.startswith("avx512")]
    info = {"cpu_model": model, "cpu_flags": " ".join(sorted(simd)), "torch": torch.__version__,
            "torch_blas": _torch_blas() or "none", "mkldnn": str(torch.backends.mkldnn.is_available())}
    info.update(dict(ops.cpu_info()))
    return info


_WARNED = False


def warn_about_fallbacks():
    """Warns, once per process, where this machine runs a slower path than it could."""
    global _WARNED
    if _WARNED:
        return
    _WARNED = True
    info = backend_info()
    _, flags = _cpu_model_and_flags()
    if info["cpu_capability"] == "default" and "avx2" in flags:
        warnings.warn(
            "fused_lstm: running the portable CPU kernels, not the AVX2/AVX-512 ones this CPU has "
            f"(ATen's CPU capability is {info['aten_cpu_capability']}; ATEN_CPU_CAPABILITY "
            "selects it): expect several times slower layers", stacklevel=3)
    if "torch's BLAS" in info["gemm_large"] and info["torch_blas"] in ("none", ""):
        warnings.warn(
            "fused_lstm: torch was built without an optimised BLAS (no MKL or OpenBLAS): "
            "large GEMMs run ATen's reference kernel, which is slow", stacklevel=3)
