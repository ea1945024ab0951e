"""The CUDA persistent kernels' partition and planner (csrc/core/persistent.h), on the CPU:
the planner with H200 and A100 properties, and the block programs run by the CPU
emulation (csrc/cpu/persistent_emulation.cpp: one thread group per block, real
barriers) against the CPU layer ops in float64: outputs, final states, the workspace,
and every gradient the time loop feeds. On a GPU the kernels themselves are checked by
test_cuda.py's persistent tests."""
import itertools

import pytest
import torch

import fused_lstm  # noqa: F401  (registers the ops)

ops = torch.ops.fused_lstm

# (cc_major, cc_minor, sm_count, sharedMemPerBlockOptin, largest cluster)
H200 = (9, 0, 132, 232448, 16)
A100 = (8, 0, 108, 166912, 1)


def plan(H, B=32, T=100, elem_size=4, has_proj=False, device=H200, P=None):
    out = ops.persistent_plan(H, H if P is None else P, B, T, elem_size, has_proj, *device)
    return {k: (v if k == "why_not" else int(v)) for k, v in out.items()}


@pytest.mark.parametrize("device", [H200, A100], ids=["H200", "A100"])
@pytest.mark.parametrize("elem_size", [2, 4])
@pytest.mark.parametrize("H", [1, 20, 63, 64, 96, 128, 256, 384, 512, 1024])
def test_plan_fits_and_is_the_smallest_cluster(device, elem_size, H):
    p = plan(H, elem_size=elem_size, device=device)
    if p["cluster"] == 0:
        assert p["why_not"]
        # Not even the largest cluster the device allows holds W_hh.
        return
    assert p["why_not"] == ""
    assert max(p["forward_smem"], p["backward_smem"]) <= device[3]
    assert p["cluster"] <= min(device[4], H) and p["batch_slice"] == 8
    if p["cluster"] > 1:
        # A smaller largest cluster must not fit: the planner picked the smallest.
        smaller = plan(H, elem_size=elem_size, device=device[:4] + (p["cluster"] // 2,))
        assert smaller["cluster"] == 0


def test_plan_covers_the_issue_ranges():
    # Mode A (one block) up to H = 96 in float32 and H = 128 in 16 bits; clusters of up
    # to 16 blocks (sm_90) hold float32 up to H = 384 and 16-bit up to H = 512.
    assert plan(96)["cluster"] == 1 and plan(64, device=A100)["cluster"] == 1
    assert plan(128, elem_size=2)["cluster"] == 1
    assert plan(256)["cluster"] == 8
    assert plan(384)["cluster"] == 16
    assert plan(512, elem_size=2)["cluster"] == 16
    assert plan(1024)["cluster"] == 0
    # No clusters below sm_90: H = 128 float32 does not fit one A100 block.
    assert plan(128, device=A100)["cluster"] == 0


def test_plan_refusals_say_why():
    assert "projection" in plan(20, P=5, has_proj=True)["why_not"]
    assert "float64" in plan(20, elem_size=8)["why_not"]
    assert "sm_80" in plan(20, device=(7, 5, 40, 65536, 1))["why_not"]
    assert plan(20, B=0)["why_not"] and plan(20, T=0)["why_not"]
    # Fewer rows than a slice: one slice of B rows.
    assert plan(20, B=3)["batch_slice"] == 3


def make_layer(H, I, lengths, reverse, dtype=torch.float64, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    T, B = max(lengths), len(lengths)
    batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(T)])
    N = int(batch_sizes.sum())

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    args = dict(input=rand(N, I), batch_sizes=batch_sizes, h0=rand(B, H), c0=rand(B, H),
                w_ih=rand(4 * H, I, scale=H ** -0.5), w_hh=rand(4 * H, H, scale=H ** -0.5),
                b_ih=rand(4 * H) if bias else None, b_hh=rand(4 * H) if bias else None)
    grads = dict(grad_output=rand(N, H), grad_h_n=rand(B, H), grad_c_n=rand(B, H))
    return args, grads


def prev_hidden(output, h0, batch_sizes, reverse):
    """[N, H] the h each row's step began from (the previous step's output or h0)."""
    T = len(batch_sizes)
    offsets = [0] + torch.cumsum(batch_sizes, 0).tolist()
    h_prev = torch.empty_like(output)
    order = range(T - 1, -1, -1) if reverse else range(T)
    prev = None
    for t in order:
        b = int(batch_sizes[t])
        carried = 0 if prev is None else min(b, int(batch_sizes[prev]))
        if carried:
            h_prev[offsets[t]:offsets[t] + carried] = output[offsets[prev]:offsets[prev] + carried]
        h_prev[offsets[t] + carried:offsets[t] + b] = h0[carried:b]
        prev = t
    return h_prev


def emulate(args, grads, reverse, cluster, batch_slice, threads):
    a = args
    out, h_n, c_n, gates, cells = ops.persistent_emulate_forward(
        a["input"], a["batch_sizes"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
        a["b_hh"], reverse, cluster, batch_slice, threads)
    dgates, grad_h0, grad_c0 = ops.persistent_emulate_backward(
        grads["grad_output"], grads["grad_h_n"], grads["grad_c_n"], a["batch_sizes"], a["c0"],
        a["w_hh"], gates, cells, reverse, cluster, batch_slice, threads)
    # The weight gradients from the loop's dgates, as the driver computes them after it.
    h_prev = prev_hidden(out, a["h0"], a["batch_sizes"], reverse)
    grad_input, grad_w_ih = dgates @ a["w_ih"], dgates.t() @ a["input"]
    grad_w_hh, grad_bias = dgates.t() @ h_prev, dgates.sum(0)
    return ([out, h_n, c_n, gates, cells],
            [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias])


def reference(args, grads, reverse):
    a = args
    out, h_n, c_n, gates, cells, hiddens = ops.lstm_layer_forward(
        a["input"], a["batch_sizes"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
        a["b_hh"], None, reverse)
    g = ops.lstm_layer_backward(
        grads["grad_output"], grads["grad_h_n"], grads["grad_c_n"], a["input"], a["batch_sizes"],
        a["h0"], a["c0"], a["w_ih"], a["w_hh"], None, out, gates, cells, hiddens, reverse, True)
    return [out, h_n, c_n, gates, cells], [g[0], g[1], g[2], g[3], g[4], g[5]]


NAMES = ["output", "h_n", "c_n", "gates", "cells", "grad_input", "grad_h0", "grad_c0",
         "grad_w_ih", "grad_w_hh", "grad_bias"]

# (H, lengths, cluster, batch_slice): uneven unit splits (H % cluster != 0), slices that
# leave a short last slice or exceed one register tile (9, 16), a batch of one, packed
# lengths with rows of a single step.
CASES = [
    (1, [4, 4, 4], 1, 8),
    (20, [5, 5, 5], 3, 2),
    (20, [5, 3, 3, 1], 8, 3),
    (20, [6, 6, 4, 1, 1], 16, 1),
    (63, [7] * 9, 4, 8),
    (63, [7, 6, 6, 2, 2, 2, 1, 1, 1], 5, 4),
    (64, [5] * 9, 2, 9),
    (64, [5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 1], 16, 16),
    (96, [3], 1, 8),
    (33, [4] * 33, 8, 8),
]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", CASES, ids=[f"H{c[0]}-B{len(c[1])}-n{c[2]}-s{c[3]}" +
                                             ("-packed" if len(set(c[1])) > 1 else "")
                                             for c in CASES])
def test_emulated_partition_matches_cpu_float64(case, reverse):
    H, lengths, cluster, batch_slice = case
    args, grads = make_layer(H, 5, lengths, reverse, seed=H + cluster)
    got_fwd, got_bwd = emulate(args, grads, reverse, cluster, batch_slice, threads=3)
    exp_fwd, exp_bwd = reference(args, grads, reverse)
    for name, a, e in zip(NAMES, got_fwd + got_bwd, exp_fwd + exp_bwd):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_emulated_partition_without_bias_float32():
    args, grads = make_layer(40, 7, [6, 6, 5, 3, 3, 1], False, dtype=torch.float32, bias=False)
    got_fwd, got_bwd = emulate(args, grads, False, 4, 4, threads=2)
    exp_fwd, exp_bwd = reference(args, grads, False)
    for name, a, e in zip(NAMES, got_fwd + got_bwd, exp_fwd + exp_bwd):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_emulated_results_do_not_depend_on_the_thread_count():
    # Every sum runs in a fixed order (the reduce-scatter in rank order), so the
    # result is bit-identical however the items fall to threads.
    args, grads = make_layer(48, 6, [5, 5, 4, 2, 1], True, dtype=torch.float32, seed=7)
    runs = [emulate(args, grads, True, 6, 3, threads) for threads in (1, 4, 7)]
    for other in runs[1:]:
        for a, b in zip(runs[0][0] + runs[0][1], other[0] + other[1]):
            assert torch.equal(a, b)


def test_emulation_rejects_a_bad_partition():
    args, grads = make_layer(4, 3, [2, 2], False)
    a = args
    call = lambda cluster, batch_slice, threads: ops.persistent_emulate_forward(  # noqa: E731
        a["input"], a["batch_sizes"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
        a["b_hh"], False, cluster, batch_slice, threads)
    for bad in [(0, 1, 1), (5, 1, 1), (17, 1, 1), (1, 0, 1), (1, 1, 0)]:
        with pytest.raises(RuntimeError, match="persistent emulation"):
            call(*bad)
