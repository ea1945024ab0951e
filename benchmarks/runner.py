"""Runs the suite: fused_lstm.LSTM against torch.nn.LSTM on the same weights and
inputs, in one process, interleaved, with torch.utils.benchmark. Writes a
terminal table, results.json and speedup.png into --out."""
import argparse
import contextlib
import ctypes
import json
import os
import pickle
import platform
import subprocess
import statistics
import sys
import tempfile
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils import benchmark

import fused_lstm

from .suites import CASES_BY_NAME, MODES, SUITE_PROCESSES, SUITES, Case, lstm_flops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROUNDS = 3  # each implementation is measured in this many interleaved rounds
# Sanity tolerance for "the outputs agree" before timing (the tests hold the tight ones).
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- machine ---

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


# ----------------------------------------------------------------- memory ---

_MALLOC_FIXED = False


def fix_malloc_for_rss():
    """Large frees go back to the OS from here on (glibc mmap threshold fixed at
    64 KiB), so resident memory follows live tensors. Returns False off glibc."""
    global _MALLOC_FIXED
    if not _MALLOC_FIXED:
        try:
            libc = ctypes.CDLL("libc.so.6")
            _MALLOC_FIXED = bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 64 * 1024))
        except OSError:
            _MALLOC_FIXED = False
    return _MALLOC_FIXED


def _proc_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_memory(fn, device):
    """Peak extra memory of one call of fn, in bytes. CUDA: max_memory_allocated
    over what was allocated before. CPU: growth of the resident set's high-water
    mark (VmHWM, reset through /proc/self/clear_refs) over VmRSS before the
    call; this counts everything, BLAS and oneDNN buffers included, and
    fused_lstm's reused buffers, which are released before the call."""
    fn()  # warm: one-time initialisation is not part of the peak
    if device == "cpu":
        torch.ops.fused_lstm.release_cpu_scratch()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not fix_malloc_for_rss():
        return None
    try:
        # Free heap pages back to the OS first: a large allocation is served from a
        # free chunk of the heap when one fits (left by many small frees, e.g. nn.LSTM's
        # or the agreement check's), and then adds nothing to the resident set.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _proc_status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return _proc_status("VmHWM:") - base
    except OSError:
        return None


# ------------------------------------------------------------ the models ---

def make_inputs(case: Case, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.seq_len, case.batch, case.input_size, generator=g).to(device, dtype)
    if not case.packed:
        return x, case.seq_len * case.batch
    lengths = torch.randint(1, case.seq_len + 1, (case.batch,), generator=g)
    lengths[0] = case.seq_len
    lengths = lengths.sort(descending=True).values
    return pack_padded_sequence(x, lengths), int(lengths.sum())


def make_models(case: Case, dtype, device):
    kwargs = dict(input_size=case.input_size, hidden_size=case.hidden_size,
                  num_layers=case.num_layers, bidirectional=case.bidirectional)
    reference = nn.LSTM(**kwargs).to(device, dtype)
    fused = fused_lstm.LSTM(**kwargs).to(device, dtype)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _output(out):
    return out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out


def step_fn(model, x, mode):
    if mode == "forward":
        def fn():
            with torch.no_grad():
                return model(x)
    else:
        def fn():
            model.zero_grad(set_to_none=True)
            out, (h, c) = model(x)
            (_output(out).sum() + h.sum() + c.sum()).backward()
    return fn


def check_agree(reference, fused, x, mode, dtype):
    """Same outputs (and, in train mode, weight gradients) before anything is timed."""
    tol = CHECK_TOL[dtype]
    results = []
    for model in (reference, fused):
        model.zero_grad(set_to_none=True)
        out, (h, c) = model(x)
        got = [_output(out), h, c]
        if mode == "train":
            (_output(out).sum() + h.sum() + c.sum()).backward()
            got += [p.grad for p in model.parameters()]
        results.append([t.detach().float() for t in got])
    for a, e in zip(results[1], results[0]):
        err = (a - e).abs().max().item() / max(1.0, e.abs().max().item())
        if not err <= tol:
            raise RuntimeError(f"fused_lstm and nn.LSTM disagree (scaled error {err:.2e} > {tol})")


# --------------------------------------------------------------- timing ---

def baselines(device):
    """name -> context manager factory under which nn.LSTM runs."""
    if device == "cuda":
        return {"cudnn": contextlib.nullcontext}
    return {"onednn": lambda: _mkldnn(True), "native": lambda: _mkldnn(False)}


@contextlib.contextmanager
def _mkldnn(enabled):
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def time_interleaved(fns, label, sub_label, min_run_time, threads):
    """fns: name -> (fn, context factory). Median seconds per name, measured in
    ROUNDS interleaved rounds and merged."""
    parts = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, (fn, ctx) in fns.items():
            with ctx():
                timer = benchmark.Timer("fn()", globals={"fn": fn}, label=label,
                                        sub_label=sub_label, description=name, num_threads=threads)
                parts[name].append(timer.blocked_autorange(min_run_time=min_run_time / ROUNDS))
    return {name: benchmark.Measurement.merge(ms)[0] for name, ms in parts.items()}


def matmul_peak(dtype, device, threads, min_run_time):
    """FLOP/s of a large square torch.mm of this dtype: the machine's GEMM peak."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = benchmark.Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b},
                        num_threads=threads).blocked_autorange(min_run_time=min_run_time)
    return 2.0 * n ** 3 / t.median


def implementations(case, mode, dtype, device):
    """name -> (step function, context factory) for fused_lstm and each nn.LSTM baseline,
    on one set of weights and inputs, after checking that they agree. Also returns rows."""
    reference, fused = make_models(case, dtype, device)
    x, rows = make_inputs(case, dtype, device)
    ctxs = baselines(device)
    for ctx in ctxs.values():
        with ctx():
            check_agree(reference, fused, x, mode, dtype)
    fns = {"fused": (step_fn(fused, x, mode), contextlib.nullcontext)}
    fns.update({f"nn-{name}": (step_fn(reference, x, mode), ctx) for name, ctx in ctxs.items()})
    return fns, rows


def run_case(case, mode, dtype, device, min_run_time, threads):
    fns, rows = implementations(case, mode, dtype, device)
    label = f"{mode}, {str(dtype)[6:]}, {device}: median time"
    measurements = time_interleaved(fns, label, case.name, min_run_time, threads)
    flops = lstm_flops(case, rows, mode)
    record = {
        "case": case.name, "mode": mode, "dtype": str(dtype)[6:], "device": device,
        "shape": {"B": case.batch, "T": case.seq_len, "I": case.input_size, "H": case.hidden_size,
                  "L": case.num_layers, "bidirectional": case.bidirectional, "packed": case.packed,
                  "rows": rows},
        "flops": flops,
        "median_s": {name: m.median for name, m in measurements.items()},
        "iqr_s": {name: m.iqr for name, m in measurements.items()},
    }
    record["speedup"] = {name[3:]: record["median_s"][name] / record["median_s"]["fused"]
                         for name in record["median_s"] if name.startswith("nn-")}
    record["gflops"] = {name: flops / t / 1e9 for name, t in record["median_s"].items()}
    return record, list(measurements.values())


def combine_processes(runs):
    """The records of one case timed in several processes (a list per process, in the
    same order) -> one list: each time the median over processes, each speedup the
    median of the per-process ratios (both sides of a ratio come from one process),
    and the per-process times kept as process_median_s."""
    if len(runs) == 1:
        return runs[0]
    combined = []
    for same in zip(*runs):
        record = dict(same[0])
        names = record["median_s"]
        record["process_median_s"] = [r["median_s"] for r in same]
        record["median_s"] = {n: statistics.median(r["median_s"][n] for r in same) for n in names}
        record["iqr_s"] = {n: statistics.median(r["iqr_s"][n] for r in same) for n in names}
        record["speedup"] = {b: statistics.median(r["speedup"][b] for r in same)
                             for b in record["speedup"]}
        record["gflops"] = {n: record["flops"] / t / 1e9 for n, t in record["median_s"].items()}
        combined.append(record)
    return combined


def measure_memory(record):
    """Adds peak_memory_bytes (forward + backward) to a record with case, dtype, device."""
    case = CASES_BY_NAME[record["case"]]
    fns, _ = implementations(case, "train", DTYPES[record["dtype"]], record["device"])
    record["peak_memory_bytes"] = {}
    for name, (fn, ctx) in fns.items():
        with ctx():
            record["peak_memory_bytes"][name] = peak_memory(fn, record["device"])


# --------------------------------------------------------------- reports ---

def print_table(records, peak_flops, device):
    base_names = list(baselines(device))
    head = f"{'case':<14}{'mode':<9}{'dtype':<10}{'fused ms':>10}"
    for b in base_names:
        head += f"{b + ' ms':>12}{'vs ' + b:>11}"
    head += f"{'GFLOP/s':>9}{'% peak':>8}{'mem fused/' + base_names[0]:>18}"
    print(head)
    print("-" * len(head))
    for r in records:
        line = f"{r['case']:<14}{r['mode']:<9}{r['dtype']:<10}{r['median_s']['fused'] * 1e3:>10.3f}"
        for b in base_names:
            s = r["speedup"][b]
            line += f"{r['median_s']['nn-' + b] * 1e3:>12.3f}{s:>10.2f}x"
        gf = r["gflops"]["fused"]
        pct = 100.0 * gf * 1e9 / peak_flops[r["dtype"]]
        line += f"{gf:>9.1f}{pct:>7.1f}%"
        mem = r.get("peak_memory_bytes", {})
        if mem.get("fused") and mem.get("nn-" + base_names[0]):
            line += f"{mem['fused'] / 2**20:>9.1f}/{mem['nn-' + base_names[0]] / 2**20:.1f} MB"
        print(line)
    print("speedup = nn.LSTM time / fused_lstm time (>1: fused_lstm is faster; over several "
          "processes, times and speedups are medians of the per-process ones). GFLOP/s and % "
          "of the large-matmul peak are fused_lstm's.")


def plot(records, path, device, title):
    """Writes the speedup chart; returns False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_names = list(baselines(device))
    groups = [f"{r['case']}\n{r['mode']}" + ("" if r["dtype"] == "float32" else f"\n{r['dtype']}")
              for r in records]
    width = 0.8 / len(base_names)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(records)), 4.5))
    for i, b in enumerate(base_names):
        xs = [k + (i - (len(base_names) - 1) / 2) * width for k in range(len(records))]
        vals = [r["speedup"][b] for r in records]
        bars = ax.bar(xs, vals, width, label=f"vs nn.LSTM ({b})")
        for bar, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                        va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(records)))
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_ylabel("speedup (nn.LSTM time / fused_lstm time)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------ main ---

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
    start); pickle the records and measurements to --worker-out."""
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
                measure_memory(record)
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


def in_child(kind, args, case_names, dtype_names, min_run_time, modes):
    """Runs worker `kind` in a fresh Python process: each case then starts from the same
    state (malloc's heap, oneDNN's caches) whatever ran before it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pickle")
        cmd = [sys.executable, "-m", "fused_lstm.benchmark", "--worker", kind, "--worker-out", out,
               "--device", args.device, "--cases", ",".join(case_names), "--dtype",
               ",".join(dtype_names), "--modes", ",".join(modes), "--min-run-time",
               str(min_run_time), "--threads", str(torch.get_num_threads())]
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
        log("peak memory of forward + backward, a process per case ...")
        if args.in_process:
            memory = []
            for dtype_name in dtype_names:
                for case_name in train_cases:
                    memory.append({"case": case_name, "dtype": dtype_name, "device": args.device})
                    measure_memory(memory[-1])
        else:  # each case in a fresh process too: what ran before moved the peak by 2x
            memory = []
            for dtype_name in dtype_names:
                for case_name in train_cases:
                    memory += in_child("memory", args, [case_name], [dtype_name], min_run_time,
                                       modes)[0]
        by_key = {(m["case"], m["dtype"]): m["peak_memory_bytes"] for m in memory}
        for record in records:
            if record["mode"] == "train":
                record["peak_memory_bytes"] = by_key[(record["case"], record["dtype"])]

    compare = benchmark.Compare(measurements)
    compare.trim_significant_figures()
    compare.print()
    print_table(records, peak, args.device)
    info = machine(args.device)
    fl = info["fused_lstm"]
    print(f"machine: {fl['cpu_model']} [{fl['cpu_flags']}], {info['threads']} threads; fused_lstm "
          f"kernels {fl['cpu_capability']}, large GEMMs {fl['gemm_large']}, torch BLAS "
          f"{fl['torch_blas']}")
    result = {"machine": info, "suite": args.suite, "device": args.device,
              "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
              "cudnn_tf32": torch.backends.cudnn.allow_tf32 if args.device == "cuda" else None,
              "memory_measure": ("CUDA: torch.cuda.max_memory_allocated over the start"
                                 if args.device == "cuda" else
                                 "CPU: growth of VmHWM over VmRSS during one forward+backward, "
                                 "glibc mmap threshold fixed at 64 KiB, heap trimmed and "
                                 "fused_lstm's reused buffers released before"),
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
