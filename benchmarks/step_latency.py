"""Per-step latency on CUDA: the slope of forward time between T = 1 and T = 1000, for
nn.LSTM (cuDNN) and fused_lstm with its persistent kernels off and on, at one shape per
persistent mode (H = 64: one block; H = 256: a cluster of 8 in float32), batch 8.

    python -m fused_lstm.bench.step_latency [--dtype float32] [--batch 8]

Prints a markdown table (us a step) for benchmarks/PERF_LOG.md; a GPU only.
"""
import argparse

import torch
from torch import nn
from torch.utils import benchmark

import fused_lstm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def forward_ms(model, x):
    with torch.no_grad():
        timer = benchmark.Timer("model(x)", globals={"model": model, "x": x},
                                num_threads=torch.get_num_threads())  # Timer's default: 1
        return timer.blocked_autorange(min_run_time=0.5).median * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_latency: needs a CUDA GPU")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dtype, B = DTYPES[args.dtype], args.batch
    setting = torch.ops.fused_lstm.set_cuda_persistent("")
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, batch {B}, input size = H, "
          "forward, us a step = (t(T=1000) - t(T=1)) / 999")
    print("| H | cuDNN | fused per-step | fused persistent | persistent launches |")
    print("|---|---|---|---|---|")
    try:
        for H in (64, 256):
            reference = nn.LSTM(H, H).to("cuda", dtype)
            fused = fused_lstm.LSTM(H, H).to("cuda", dtype)
            fused.load_state_dict(reference.state_dict())
            row = []
            for model, persistent in ((reference, "off"), (fused, "off"), (fused, "on")):
                torch.ops.fused_lstm.set_cuda_persistent(persistent)
                before = torch.ops.fused_lstm.cuda_persistent_launches()
                t1, t1000 = (forward_ms(model, torch.randn(T, B, H, device="cuda", dtype=dtype))
                             for T in (1, 1000))
                row.append((t1000 - t1) / 999 * 1e3)
                torch.cuda.synchronize()
                launches = torch.ops.fused_lstm.cuda_persistent_launches() - before
            print(f"| {H} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | {launches} |")
    finally:
        torch.ops.fused_lstm.set_cuda_persistent(setting)


if __name__ == "__main__":
    main()
