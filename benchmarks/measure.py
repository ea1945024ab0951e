"""One case measured: nn.LSTM and fused_lstm.LSTM on the same weights and inputs, checked
to agree, then timed interleaved with torch.utils.benchmark (and their peak memory)."""
import contextlib
import copy
import statistics

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils import benchmark

import fused_lstm
from fused_lstm.testing import BENCHMARK_AGREEMENT

from .memory import peak_memory
from .suites import CASES_BY_NAME, Case, lstm_flops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROUNDS = 3  # each implementation is measured in this many interleaved rounds


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
    """Same outputs (and, in train mode, weight gradients) before anything is timed. In
    16 bits the reference runs in float64 on the same values: nn.LSTM's own 16-bit
    results can be further from the truth than the bound (ATen's native bfloat16 LSTM
    on the CPU: 9.5e-2 in a bias gradient at B8 H128 T256, against our 2.7e-3)."""
    tol = BENCHMARK_AGREEMENT[dtype]
    reference_x = x
    if dtype in (torch.bfloat16, torch.float16):
        reference, reference_x = copy.deepcopy(reference).double(), x.double()
    results = []
    for model, inp in ((reference, reference_x), (fused, x)):
        model.zero_grad(set_to_none=True)
        out, (h, c) = model(inp)
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
    """FLOP/s of a large square torch.mm of this dtype: the machine's GEMM peak. On the
    CPU a 16-bit dtype's peak is the faster of its own torch.mm and float32's: without
    16-bit GEMM instructions (AVX512_BF16, AMX) torch emulates the 16-bit mm at a small
    fraction of float32's rate, while fused_lstm's 16-bit layers compute in float32
    there, so that mm alone made "% peak" read thousands of percent."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def rate(dt):
        t = benchmark.Timer("torch.mm(a, b)",
                            globals={"torch": torch, "a": a.to(dt), "b": b.to(dt)},
                            num_threads=threads).blocked_autorange(min_run_time=min_run_time)
        return 2.0 * n ** 3 / t.median

    if device == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return max(rate(dtype), rate(torch.float32))
    return rate(dtype)


def thread_scaling(threads, min_run_time):
    """How many times as fast a large float32 torch.mm runs on `threads` CPU threads as on
    one: near `threads` where each thread has a core of its own, near 1 where they share
    one (a VM whose vCPUs at times give one core's worth: sessions 12, 19, 28 and 34 saw
    it), which slows every timing that uses them all."""
    one = matmul_peak(torch.float32, "cpu", 1, min_run_time)
    return matmul_peak(torch.float32, "cpu", threads, min_run_time) / one


def few_cores_warning(scaling, threads):
    """A warning where `threads` threads ran the matmul less than halfway from one
    thread's speed to `threads` times it (thread_scaling), else None."""
    if threads < 2 or scaling >= (1 + threads) / 2:
        return None
    return (f"warning: {threads} threads ran a 2048^3 torch.mm only {scaling:.2f}x as fast as "
            f"one: this machine gave them fewer cores than threads (shared vCPUs or other "
            f"load), and its timings do not stand for this CPU")


def implementation_names(device):
    """The implementations a case is measured on: fused_lstm, then each nn.LSTM baseline."""
    return ["fused"] + [f"nn-{name}" for name in baselines(device)]


def implementations(case, mode, dtype, device, check=True):
    """name -> (step function, context factory) for fused_lstm and each nn.LSTM baseline,
    on one set of weights and inputs, after checking that they agree (with check). Also
    returns rows."""
    reference, fused = make_models(case, dtype, device)
    x, rows = make_inputs(case, dtype, device)
    ctxs = baselines(device)
    for ctx in ctxs.values() if check else ():
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


def measure_memory(record, names=None):
    """Adds peak_memory_bytes[name] (forward + backward) for each implementation named
    (default: all) to a record with case, dtype, device. No agreement check first (the
    timing runs it): on the CPU its float64 reference run leaves malloc's heap in pieces,
    later large buffers land in freed heap chunks that stay resident, and the peak of
    whatever runs next moves with them (the runner measures each implementation in a
    fresh process: PERF_LOG.md row 69)."""
    case = CASES_BY_NAME[record["case"]]
    fns, _ = implementations(case, "train", DTYPES[record["dtype"]], record["device"],
                             check=False)
    peaks = record.setdefault("peak_memory_bytes", {})
    for name in names or fns:
        fn, ctx = fns[name]
        with ctx():
            peaks[name] = peak_memory(fn, record["device"])
