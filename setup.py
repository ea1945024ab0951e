"""Build fused_lstm's C++ (and, when available, CUDA) extension: fused_lstm._C.

CUDA kernels are built when torch has CUDA and nvcc is found, or when
FORCE_CUDA=1 (a build machine without a GPU). Otherwise the build is CPU-only.
DEBUG=1 builds without optimisation and with debug symbols.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")  # includes are written from here: "cpu/gemm.h"
DEBUG = os.environ.get("DEBUG", "0") == "1"
FORCE_CUDA = os.environ.get("FORCE_CUDA", "0") == "1"
WITH_CUDA = FORCE_CUDA or (torch.cuda.is_available() and CUDA_HOME is not None)


def nvidia_wheel_includes():
    """Header folders of torch's nvidia-* wheels (cuBLAS, cuSPARSE, ...), so that a
    CUDA toolkit without those headers can still build against them."""
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted(d for r in roots for d in glob.glob(os.path.join(r, "*", "include")))


def runtime_libstdcxx():
    """[path] of the libstdc++ this process, and so torch, runs with (Linux), to link
    _C against it first. A compiler that links libstdc++ statically (seen on a GPU
    image: CXX was such a g++) otherwise puts a second copy into _C, whose iostreams
    break on the first error message holding a number (a segfault there)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libstdc++.so" in line})
    except OSError:
        return []
    return paths[:1]


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT)
                  for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def openmp_flags():
    """-fopenmp where torch runs on OpenMP: at::parallel_for is inline, so without it
    our loops run on one thread. The libgomp this links by name is the one torch has
    already loaded, so both share one thread pool."""
    return ["-fopenmp"] if torch.backends.openmp.is_available() and os.name == "posix" else []


def extension():
    cxx_flags = (["-O0", "-g"] if DEBUG else ["-O3"]) + ["-Wno-psabi"] + openmp_flags()
    srcs = sources("csrc/**/*.cpp")
    define_macros = []
    link_args = runtime_libstdcxx() + openmp_flags()
    if not WITH_CUDA:
        return CppExtension("fused_lstm._C", srcs, extra_compile_args={"cxx": cxx_flags},
                            define_macros=define_macros, include_dirs=[CSRC],
                            extra_link_args=link_args)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    nvcc_flags = ["-O0", "-g", "-lineinfo"] if DEBUG else ["-O3", "-lineinfo"]
    nvcc_flags += ["--use_fast_math"] if os.environ.get("FUSED_LSTM_FAST_MATH") == "1" else []
    define_macros.append(("FUSED_LSTM_WITH_CUDA", None))
    # cuBLAS itself is loaded with libtorch_cuda, which links it.
    return CUDAExtension("fused_lstm._C", srcs + sources("csrc/cuda/**/*.cu"),
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                         define_macros=define_macros, include_dirs=[CSRC] + nvidia_wheel_includes(),
                         extra_link_args=link_args)


setup(
    name="fused_lstm",
    version="0.1.0",
    description="Fused LSTM kernels for PyTorch: a drop-in torch.nn.LSTM / LSTMCell",
    # benchmarks/ installs as fused_lstm.bench, so `python -m fused_lstm.benchmark` runs anywhere.
    packages=["fused_lstm", "fused_lstm.bench"],
    package_dir={"fused_lstm.bench": "benchmarks"},
    entry_points={"console_scripts": ["fused-lstm-benchmark = fused_lstm.benchmark:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch"],
)
