"""Runs the suite: fused_lstm.LSTM against torch.nn.LSTM on the same weights and
inputs, each case in fresh processes (or all in this one), interleaved, with
torch.utils.benchmark. Writes a terminal table, results.json and speedup.png into --out.
The command line of ``fused-lstm-benchmark`` and ``python -m fused_lstm.benchmark``."""
import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils import benchmark

from .machine import machine
from .measure import (DTYPES, combine_processes, few_cores_warning, implementation_names,
                      matmul_peak, measure_memory, run_case, thread_scaling)
from .memory import fix_malloc_for_rss
from .report import log, plot, print_table
from .suites import CASES_BY_NAME, MODES, SUITE_PROCESSES, SUITES


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fused_lstm.benchmark",
                                description="Benchmark fused_lstm.LSTM against torch.nn.LSTM.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--cases", help="comma-separated case names (default: the suite's); "
                   f"known: {', '.join(CASES_BY_NAME)}")
    p.add_argument("--dtype", help="comma-separated dtypes (default: float32; on CUDA with "
                   "--suite full: float32,bfloat16,float16)")
    p.add_argument("--modes", default=",".join(MODES), help="forward, train, or both")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--min-run-time", type=float, help="seconds of timing per implementation")
    p.add_argument("--out", default="bench_out", help="directory for results.json and speedup.png")
    p.add_argument("--in-process", action="store_true",
                   help="time every case in this process (default: one fresh process per case)")
    p.add_argument("--processes", type=int,
                   help="fresh processes each case is timed in, reporting the median (default: "
                   + ", ".join(f"{n} for --suite {s}" for s, n in SUITE_PROCESSES.items()) + ")")
    # Internal: a child process that times one case (or measures memory) and pickles the result.
    p.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-implementation", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    """Command-line entry point (python -m fused_lstm.benchmark, fused-lstm-benchmark)."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        run(args)
    return 0


def worker(args):
    """In a child process: time the cases given (worker "time"), or measure the peak
    memory of their train mode (worker "memory", with malloc set up for it from the
    start; of --worker-implementation only where given); pickle the records and
    measurements to --worker-out."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cudnn.allow_tf32 = False
    if args.worker == "memory" and args.device == "cpu":
        fix_malloc_for_rss()
    records, measurements = [], []
    for dtype_name in args.dtype.split(","):
        for case_name in args.cases.split(","):
            case, dtype = CASES_BY_NAME[case_name], DTYPES[dtype_name]
            if args.worker == "memory":
                record = {"case": case_name, "dtype": dtype_name, "device": args.device}
                measure_memory(record, args.worker_implementation and [args.worker_implementation])
                records.append(record)
                continue
            for mode in args.modes.split(","):
                log(f"  {case_name} {mode} {dtype_name} ...")
                record, ms = run_case(case, mode, dtype, args.device, args.min_run_time,
                                      torch.get_num_threads())
                log("      speedup " + ", ".join(f"{b} {x:.2f}x" for b, x in record["speedup"].items()))
                records.append(record)
                measurements += ms
    with open(args.worker_out, "wb") as f:
        pickle.dump((records, measurements), f)


def in_child(kind, args, case_names, dtype_names, min_run_time, modes, implementation=None):
    """Runs worker `kind` in a fresh Python process: each case then starts from the same
    state (malloc's heap, oneDNN's caches) whatever ran before it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pickle")
        cmd = [sys.executable, "-m", "fused_lstm.benchmark", "--worker", kind, "--worker-out", out,
               "--device", args.device, "--cases", ",".join(case_names), "--dtype",
               ",".join(dtype_names), "--modes", ",".join(modes), "--min-run-time",
               str(min_run_time), "--threads", str(torch.get_num_threads())]
        if implementation:
            cmd += ["--worker-implementation", implementation]
        # From a neutral folder: in a source checkout, `-m` would import its fused_lstm/.
        subprocess.run(cmd, check=True, cwd=tmp)
        with open(out, "rb") as f:
            return pickle.load(f)


def run(args):
    """Runs the benchmark for parsed arguments; returns what results.json holds."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    suite_cases, min_run_time = SUITES[args.suite]
    min_run_time = args.min_run_time or min_run_time
    processes = args.processes if args.processes is not None else SUITE_PROCESSES[args.suite]
    if processes < 1 or (args.in_process and args.processes not in (None, 1)):
        raise SystemExit("--processes: expected a count >= 1, and 1 with --in-process")
    case_names = args.cases.split(",") if args.cases else suite_cases
    unknown = [c for c in case_names if c not in CASES_BY_NAME]
    if unknown:
        raise SystemExit(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(CASES_BY_NAME)}")
    default_dtypes = "float32,bfloat16,float16" if args.device == "cuda" and args.suite == "full" else "float32"
    dtype_names = (args.dtype or default_dtypes).split(",")
    modes = args.modes.split(",")
    if args.device == "cuda":
        # Same precision on both sides: cuDNN would otherwise run float32 as TF32,
        # while fused_lstm's cuBLAS calls follow torch.backends.cuda.matmul.allow_tf32 (off).
        torch.backends.cudnn.allow_tf32 = False
    os.makedirs(args.out, exist_ok=True)

    started = time.perf_counter()
    # Whether the threads had cores of their own, before the cases and after them.
    scaling = {}

    def check_scaling(when):
        if args.device == "cpu" and threads > 1:
            scaling[when] = thread_scaling(threads, min(1.0, min_run_time * 2))
            warning = few_cores_warning(scaling[when], threads)
            if warning:
                log(f"{warning} ({when} of the run)")

    check_scaling("start")
    peak = {}
    for name in dtype_names:
        log(f"measuring the {name} matmul peak ...")
        peak[name] = matmul_peak(DTYPES[name], args.device, threads, min(1.0, min_run_time * 2))
    records, measurements = [], []
    if args.in_process:
        processes = 1
        jobs = [(c, m, d) for d in dtype_names for c in case_names for m in modes]
        for i, (case_name, mode, dtype_name) in enumerate(jobs, 1):
            log(f"[{i}/{len(jobs)}] {case_name} {mode} {dtype_name} ...")
            record, ms = run_case(CASES_BY_NAME[case_name], mode, DTYPES[dtype_name],
                                  args.device, min_run_time, threads)
            records.append(record)
            measurements += ms
    else:
        groups = [(c, d) for d in dtype_names for c in case_names]
        for i, (case_name, dtype_name) in enumerate(groups, 1):
            log(f"[{i}/{len(groups)}] {case_name} {dtype_name} ({', '.join(modes)}), "
                f"{processes} own process{'es' if processes > 1 else ''} ...")
            runs = [in_child("time", args, [case_name], [dtype_name], min_run_time, modes)
                    for _ in range(processes)]
            records += combine_processes([got for got, _ in runs])
            measurements += benchmark.Measurement.merge([m for _, ms in runs for m in ms])
    # Memory: in separate processes, with malloc set up for it from the start (on the
    # CPU, fix_malloc_for_rss changes malloc for the rest of a process).
    train_cases = [c for c in case_names if "train" in modes]
    if train_cases:
        log("peak memory of forward + backward, a process per case and implementation ...")
        if args.in_process:
            memory = []
            for dtype_name in dtype_names:
                for case_name in train_cases:
                    memory.append({"case": case_name, "dtype": dtype_name, "device": args.device})
                    measure_memory(memory[-1])
        else:
            # Each case and implementation in a fresh process: what ran before in the
            # process moved the peak by up to 2x (PERF_LOG.md row 69).
            memory = []
            for dtype_name in dtype_names:
                for case_name in train_cases:
                    for name in implementation_names(args.device):
                        memory += in_child("memory", args, [case_name], [dtype_name],
                                           min_run_time, modes, name)[0]
        by_key = {}
        for m in memory:
            by_key.setdefault((m["case"], m["dtype"]), {}).update(m["peak_memory_bytes"])
        for record in records:
            if record["mode"] == "train":
                record["peak_memory_bytes"] = by_key[(record["case"], record["dtype"])]

    check_scaling("end")
    compare = benchmark.Compare(measurements)
    compare.trim_significant_figures()
    compare.print()
    print_table(records, peak, args.device)
    info = machine(args.device)
    fl = info["fused_lstm"]
    print(f"machine: {fl['cpu_model']} [{fl['cpu_flags']}], {info['threads']} threads; fused_lstm "
          f"kernels {fl['cpu_capability']}, large GEMMs {fl['gemm_large']}, torch BLAS "
          f"{fl['torch_blas']}")
    if scaling:
        print(f"thread scaling: {threads} threads ran a 2048^3 torch.mm "
              + " and ".join(f"{v:.2f}x as fast as one at the {k}" for k, v in scaling.items()))
        for when, value in scaling.items():
            warning = few_cores_warning(value, threads)
            if warning:
                print(f"{warning} ({when} of the run)")
    if info["env"]:
        print("environment: " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    result = {"machine": info, "suite": args.suite, "device": args.device,
              "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
              "matmul_thread_scaling": scaling or None,
              "cudnn_tf32": torch.backends.cudnn.allow_tf32 if args.device == "cuda" else None,
              "memory_measure": ("CUDA: torch.cuda.max_memory_allocated over the start"
                                 if args.device == "cuda" else
                                 "CPU: growth of VmHWM over VmRSS during one forward+backward, "
                                 "glibc mmap threshold fixed at 64 KiB, heap trimmed and "
                                 "fused_lstm's reused buffers released before; each "
                                 "implementation in a fresh process"),
              "processes": processes,
              "elapsed_s": time.perf_counter() - started, "results": records}
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    png_path = os.path.join(args.out, "speedup.png")
    title = (f"fused_lstm vs nn.LSTM, {args.device} ({info.get('gpu') or info['cpu']}, "
             f"{threads} threads), torch {torch.__version__}")
    wrote = [json_path] + ([png_path] if plot(records, png_path, args.device, title) else [])
    print(f"wrote {' and '.join(wrote)} ({time.perf_counter() - started:.0f} s)")
    return result
