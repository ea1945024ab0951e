"""Build fused_lstm's C++ (and, when available, CUDA) extension: fused_lstm._C.

CUDA kernels are built when torch has CUDA and nvcc is found, or when
FORCE_CUDA=1 (a build machine without a GPU). Otherwise the build is CPU-only.
DEBUG=1 builds without optimisation and with debug symbols. CC and CXX, when
unset, default to the cc and c++ on PATH (see below).
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"
FORCE_CUDA = os.environ.get("FORCE_CUDA", "0") == "1"
WITH_CUDA = FORCE_CUDA or (torch.cuda.is_available() and CUDA_HOME is not None)

# Compile and link with the compiler torch's ABI check inspects (c++ on PATH), not
# the one this Python was built with: on one GPU image that was a g++ which linked
# a static libstdc++ into _C, where every error message holding a number segfaulted.
if os.name == "posix":
    os.environ.setdefault("CXX", "c++")
    os.environ.setdefault("CC", "cc")


def nvidia_wheel_includes():
    """Header folders of torch's nvidia-* wheels (cuBLAS, cuSPARSE, ...), so that a
    CUDA toolkit without those headers can still build against them."""
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted(d for r in roots for d in glob.glob(os.path.join(r, "*", "include")))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cxx_flags = (["-O0", "-g"] if DEBUG else ["-O3"]) + ["-Wno-psabi"]
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    define_macros = []
    if not WITH_CUDA:
        return CppExtension("fused_lstm._C", srcs, extra_compile_args={"cxx": cxx_flags},
                            define_macros=define_macros)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    nvcc_flags = ["-O0", "-g", "-lineinfo"] if DEBUG else ["-O3", "-lineinfo"]
    nvcc_flags += ["--use_fast_math"] if os.environ.get("FUSED_LSTM_FAST_MATH") == "1" else []
    define_macros.append(("FUSED_LSTM_WITH_CUDA", None))
    # cuBLAS itself is loaded with libtorch_cuda, which links it.
    return CUDAExtension("fused_lstm._C", srcs + sources("csrc/cuda/*.cu"),
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                         define_macros=define_macros, include_dirs=nvidia_wheel_includes())


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
