"""What a benchmark ran on: the CPU model, threads, torch, and what fused_lstm chose
there (kernel build, GEMM backends, CPU flags), or the GPU."""
import os
import platform

import torch

# Environment variables that change which kernels torch, oneDNN, MKL or fused_lstm run
# (an AVX2 run on an AVX-512 CPU, say): recorded where set, so a result says so.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
              "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS",
              "FUSED_LSTM_CPU_AMX", "FUSED_LSTM_CPU_AVX512_BF16", "FUSED_LSTM_CUDA_PERSISTENT")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device):
    import fused_lstm

    info = {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            # what fused_lstm runs here: its kernel build, GEMM backends, rules, CPU flags
            "fused_lstm": fused_lstm.backend_info(),
            "env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ}}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info
