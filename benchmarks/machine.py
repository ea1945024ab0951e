"""What a benchmark ran on: the CPU model, threads, torch, and what fused_lstm chose
there (kernel build, GEMM backends, CPU flags), or the GPU."""
import platform

import torch


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
            "fused_lstm": fused_lstm.backend_info()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info
