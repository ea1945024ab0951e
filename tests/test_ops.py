"""The custom ops called directly: gradcheck, opcheck (schema, fake
implementation, autograd registration), torch.compile tracing, and the
TORCH_CHECK errors for bad arguments."""
import itertools
import os

import pytest
import torch

import fused_lstm
from fused_lstm import functional as F
from fused_lstm._ops import ops

I, H, P = 3, 4, 2


def layer_args(dtype=torch.float64, packed=False, bias=True, proj=False, reverse=False, seed=0,
               requires_grad=True):
    """Arguments of lstm_layer_forward for a small random case."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
    batch_sizes = torch.tensor([3, 3, 2, 1] if packed else [3, 3, 3], dtype=torch.long)
    p = P if proj else H
    return dict(
        input=rnd(int(batch_sizes.sum()), I), batch_sizes=batch_sizes,
        h0=rnd(3, p), c0=rnd(3, H), w_ih=rnd(4 * H, I), w_hh=rnd(4 * H, p),
        b_ih=rnd(4 * H) if bias else None, b_hh=rnd(4 * H) if bias else None,
        w_hr=rnd(p, H) if proj else None, reverse=reverse)


VARIANTS = list(itertools.product([False, True], [False, True], [False, True], [False, True]))
VARIANT_IDS = [f"{'packed' if a else 'dense'}-{'bias' if b else 'nobias'}-{'proj' if c else 'noproj'}-"
               f"{'rev' if d else 'fwd'}" for a, b, c, d in VARIANTS]


@pytest.mark.parametrize("op_name", ["lstm_layer", "lstm_layer_forward"])
@pytest.mark.parametrize("packed,bias,proj,reverse", VARIANTS, ids=VARIANT_IDS)
def test_gradcheck_layer_op(packed, bias, proj, reverse, op_name):
    args = layer_args(packed=packed, bias=bias, proj=proj, reverse=reverse)
    names = [n for n, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        kw = dict(args, **dict(zip(names, tensors)))
        out, h_n, c_n, *_ = getattr(ops, op_name)(**kw)
        return out, h_n, c_n

    assert torch.autograd.gradcheck(fn, [args[n] for n in names])


def test_gradcheck_cell():
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    cell = lambda x, h, c, *weights: F.lstm_cell(x, (h, c), *weights)
    assert torch.autograd.gradcheck(cell, (rnd(2, I), rnd(2, H), rnd(2, H), rnd(4 * H, I),
                                           rnd(4 * H, H), rnd(4 * H), rnd(4 * H)))


@pytest.mark.parametrize("op_name", ["lstm_layer", "lstm_layer_forward"])
@pytest.mark.parametrize("packed,bias,proj,reverse", VARIANTS, ids=VARIANT_IDS)
def test_opcheck_forward(packed, bias, proj, reverse, op_name):
    args = layer_args(dtype=torch.float32, packed=packed, bias=bias, proj=proj, reverse=reverse)
    torch.library.opcheck(getattr(ops, op_name), tuple(args.values()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_half_precision_cpu(dtype):
    # 16-bit layers run in float32 inside the CPU kernels (cpu/backend.h): schema, fake
    # tensors and autograd registration hold for the dtype the caller sees.
    for op_name in ("lstm_layer", "lstm_layer_forward"):
        args = layer_args(dtype=dtype, packed=True, proj=True)
        torch.library.opcheck(getattr(ops, op_name), tuple(args.values()))
    for op_name in ("lstm_layer_backward", "lstm_layer_backward_overwrite_gates"):
        torch.library.opcheck(getattr(ops, op_name), backward_args(True, True, dtype=dtype),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("packed,bias,proj,reverse", VARIANTS, ids=VARIANT_IDS)
def test_layer_op_without_grad_matches_forward(packed, bias, proj, reverse):
    args = layer_args(packed=packed, bias=bias, proj=proj, reverse=reverse, requires_grad=False)
    torch.library.opcheck(ops.lstm_layer, tuple(args.values()))
    expected = ops.lstm_layer_forward(**args)[:3]
    for got, e in zip(ops.lstm_layer(**args), expected):
        torch.testing.assert_close(got, e, rtol=0, atol=0)


def stack_args(packed, bias, proj, bidirectional, num_layers=2, seed=0, requires_grad=False):
    """Arguments of lstm_stack: random weights in nn.LSTM's _flat_weights order."""
    g = torch.Generator().manual_seed(seed)
    module = fused_lstm.LSTM(I, H, num_layers=num_layers, bias=bias, bidirectional=bidirectional,
                             proj_size=P if proj else 0, dtype=torch.float64)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
    batch_sizes = torch.tensor([3, 3, 2, 1] if packed else [3, 3, 3], dtype=torch.long)
    LD = num_layers * (2 if bidirectional else 1)
    return dict(input=rnd(int(batch_sizes.sum()), I), batch_sizes=batch_sizes,
                h0=rnd(LD, 3, P if proj else H), c0=rnd(LD, 3, H),
                weights=[rnd(*w.shape) for w in module._flat_weights], has_biases=bias,
                has_proj=proj, num_layers=num_layers, bidirectional=bidirectional)


def layer_by_layer(input, batch_sizes, h0, c0, weights, has_biases, has_proj, num_layers,
                   bidirectional):
    """The reference for lstm_stack: one lstm_layer call (and autograd node) per layer and
    direction, as the dropout path of fused_lstm.functional.lstm runs them."""
    directions = 2 if bidirectional else 1
    h_n, c_n, layer_input = [], [], input
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = F.layer_weights(weights, k, has_biases, has_proj)
            out, h, c = ops.lstm_layer(layer_input, batch_sizes, h0[k], c0[k], w_ih, w_hh, b_ih,
                                       b_hh, w_hr, direction == 1)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, -1)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


STACK_VARIANT_IDS = [i.replace("rev", "bidir").replace("fwd", "unidir") for i in VARIANT_IDS]


@pytest.mark.parametrize("packed,bias,proj,bidirectional", VARIANTS, ids=STACK_VARIANT_IDS)
def test_stack_op_matches_layer_by_layer(packed, bias, proj, bidirectional):
    # Inference, and training through one autograd node: the same numbers, gradients
    # included, as the per-layer ops (the same kernels in the same order).
    args = stack_args(packed, bias, proj, bidirectional, requires_grad=True)
    torch.library.opcheck(ops.lstm_stack, tuple(args.values()))
    expected = layer_by_layer(**args)
    with torch.no_grad():
        for a, e in zip(ops.lstm_stack(**args), expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    got = ops.lstm_stack(**args)
    assert "StackNode" in got[0].grad_fn.name()  # one node for the stack
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    wrt = [args["input"], args["h0"], args["c0"], *args["weights"]]
    cotangents = [torch.randn_like(e) for e in expected]
    grads = torch.autograd.grad(got, wrt, cotangents)
    expected_grads = torch.autograd.grad(expected, wrt, cotangents)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("packed,bias,proj,bidirectional", VARIANTS, ids=STACK_VARIANT_IDS)
def test_gradcheck_stack_op(packed, bias, proj, bidirectional):
    args = stack_args(packed, bias, proj, bidirectional, requires_grad=True)
    weights = args.pop("weights")

    def fn(input, h0, c0, *weights):
        return ops.lstm_stack(**dict(args, input=input, h0=h0, c0=c0, weights=list(weights)))

    assert torch.autograd.gradcheck(fn, [args["input"], args["h0"], args["c0"], *weights])


def test_stack_op_gradients_of_what_is_used():
    # Only h_n used; the input and h0 need no gradient: the rest still matches.
    args = stack_args(packed=True, bias=True, proj=False, bidirectional=True, requires_grad=True)
    args["input"].requires_grad_(False)
    args["h0"].requires_grad_(False)
    got = torch.autograd.grad(ops.lstm_stack(**args)[1].sum(), [args["c0"], *args["weights"]])
    expected = torch.autograd.grad(layer_by_layer(**args)[1].sum(), [args["c0"], *args["weights"]])
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-14, atol=1e-14)


def test_stack_op_output_modified_in_place_is_an_error():
    # The last layer's output is saved for backward: changing it must not go unnoticed.
    args = stack_args(packed=False, bias=True, proj=False, bidirectional=False, requires_grad=True)
    out, h_n, c_n = ops.lstm_stack(**args)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + h_n.sum()).backward()


@pytest.mark.parametrize("overrides,match", [
    (dict(weights=[]), "expected 8 weights, got 0"),
    (dict(num_layers=0), "expected num_layers > 0, got 0"),
    (dict(h0=torch.zeros(3, 3, 4, dtype=torch.float64)), "expected h0 of shape \\[2, batch, size\\], got \\[3, 3, 4\\]"),
    (dict(c0=torch.zeros(3, 4, dtype=torch.float64)), "expected c0 of shape \\[2, batch, size\\], got \\[3, 4\\]"),
], ids=["weights", "num_layers", "h0", "c0"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_stack_op_errors(overrides, match, requires_grad):
    args = stack_args(packed=False, bias=True, proj=False, bidirectional=False,
                      requires_grad=requires_grad)
    args.update(overrides)
    with pytest.raises(RuntimeError, match=match):
        ops.lstm_stack(**args)


def test_inference_buffer_reuse_across_sizes():
    # The reused gate buffer grows and shrinks with the calls: results must not depend on
    # what an earlier call left in it.
    results = {}
    for packed, seed in [(False, 1), (True, 2), (False, 1), (True, 2)]:
        args = layer_args(dtype=torch.float32, packed=packed, seed=seed, requires_grad=False)
        out = ops.lstm_layer(**args)
        if seed in results:
            for a, b in zip(out, results[seed]):
                assert torch.equal(a, b)
        results[seed] = out
        for got, e in zip(out, ops.lstm_layer_forward(**args)[:3]):
            assert torch.equal(got, e)


def backward_args(proj, need_grad_input, dtype=torch.float32, need_grad_h0=True):
    args = layer_args(dtype=dtype, packed=True, proj=proj, requires_grad=False)
    out, h_n, c_n, gates, cells, hiddens = ops.lstm_layer_forward(**args)
    return (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), args["input"],
            args["batch_sizes"], args["h0"], args["c0"], args["w_ih"], args["w_hh"], args["w_hr"],
            out, gates, cells, hiddens, args["reverse"], need_grad_input, need_grad_h0)


@pytest.mark.parametrize("op_name", ["lstm_layer_backward", "lstm_layer_backward_overwrite_gates"])
@pytest.mark.parametrize("proj,need_grad_input,need_grad_h0", [(False, True, True), (True, False, False)])
def test_opcheck_backward(proj, need_grad_input, need_grad_h0, op_name):
    torch.library.opcheck(getattr(ops, op_name),
                          backward_args(proj, need_grad_input, need_grad_h0=need_grad_h0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("op_name", ["lstm_layer_backward", "lstm_layer_backward_overwrite_gates"])
@pytest.mark.parametrize("batch_sizes,hidden", [([3], 4), ([3, 3, 3], 4), ([3, 3, 2, 1], 4),
                                                ([9, 9, 7, 4, 1], 40)], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("proj", [False, True], ids=["noproj", "proj"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_backward_without_grad_h0(device, dtype, proj, reverse, batch_sizes, hidden, op_name):
    # need_grad_h0=False (autograd passes it when h0 needs no gradient: an LSTMCell's h, an
    # LSTM's default zeros): grad_h0 comes back as [0], dL/dh_prev is skipped at the first
    # step (every row starts from h0 there; steps where only some do, in reverse over packed
    # input, compute all their rows), and every other gradient is the same, bit for bit, on
    # every path (dense and packed, one step and several, the fused loops, the bfloat16
    # workspace backward where the CPU has it).
    gen = torch.Generator().manual_seed(len(batch_sizes) + hidden)
    rnd = lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)
    bs = torch.tensor(batch_sizes)
    N, B, p = sum(batch_sizes), batch_sizes[0], 3 if proj else hidden
    x, h0, c0 = rnd(N, 5), rnd(B, p), rnd(B, hidden)
    w_ih, w_hh = rnd(4 * hidden, 5), rnd(4 * hidden, p).div(p ** 0.5)
    w_hr = rnd(p, hidden) if proj else None
    out, _, _, gates, cells, hiddens = ops.lstm_layer_forward(x, bs, h0, c0, w_ih, w_hh, None,
                                                              None, w_hr, reverse)
    grads = (rnd(N, p), rnd(B, p), rnd(B, hidden))
    op = getattr(ops, op_name)
    results = [op(*grads, x, bs, h0, c0, w_ih, w_hh, w_hr, out, gates.clone(), cells, hiddens,
                  reverse, True, need_grad_h0=need) for need in (True, False)]
    assert results[0][1].shape == (B, p) and results[1][1].shape == (0,)
    for i in (0, 2, 3, 4, 5, 6):
        assert torch.equal(results[1][i], results[0][i]), f"result {i}"


@pytest.mark.parametrize("proj", [False, True])
def test_backward_overwriting_gates_gives_the_same_gradients(proj):
    args = backward_args(proj, True, dtype=torch.float64)
    gates = args[11]
    expected = ops.lstm_layer_backward(*args)
    assert torch.equal(args[11], gates)  # read only
    got = ops.lstm_layer_backward_overwrite_gates(*args)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)
    # The gates now hold dL/d(pre-activation gates), whose sum over rows is the bias gradient.
    torch.testing.assert_close(gates.sum(0), expected[5], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op_name", ["lstm_layer", "lstm_layer_forward", "lstm_stack"])
def test_backward_keeps_the_workspace_while_the_graph_is_kept(op_name):
    # retain_graph: the second backward reads the same saved gates. Without it, lstm_layer's
    # and lstm_stack's backward write their gate gradients over their private workspace:
    # the same gradients.
    if op_name == "lstm_stack":
        args = stack_args(packed=True, bias=True, proj=False, bidirectional=True, requires_grad=True)
        wrt = [args["weights"][1], args["input"], args["weights"][6], args["c0"]]
    else:
        args = layer_args()
        wrt = [args["w_hh"], args["input"], args["b_ih"], args["c0"]]

    def loss():
        out, h_n, c_n, *_ = getattr(ops, op_name)(**args)
        weights = torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)
        return (out * weights).sum() + h_n.sum() + c_n.sum()

    graph = loss()
    kept = torch.autograd.grad(graph, wrt, retain_graph=True)
    last = torch.autograd.grad(graph, wrt)
    fresh = torch.autograd.grad(loss(), wrt)
    for a, b, c in zip(kept, last, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("op_name", ["lstm_layer", "lstm_stack"])
def test_backward_overwrites_the_private_workspace(op_name):
    # The memory saving itself: without retain_graph, the backward writes the gate gradients
    # over the saved gates of each layer and direction (seen through a pack hook that keeps
    # what it is given).
    if op_name == "lstm_stack":
        args = stack_args(packed=True, bias=True, proj=False, bidirectional=True, requires_grad=True)
        layer_directions = 4
    else:
        args, layer_directions = layer_args(), 1
    kept = []

    def pack(t):
        kept.append((t, t.clone()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, h_n, c_n = getattr(ops, op_name)(**args)
    (out.sum() + h_n.sum()).backward()
    gates_shape = (args["input"].shape[0], 4 * H)
    changed = [not torch.equal(t, before) for t, before in kept if t.shape == gates_shape]
    assert changed == [True] * layer_directions


def test_forward_op_workspace_is_not_overwritten():
    # lstm_layer_forward hands its workspace to the caller: backward must leave it as it was.
    args = layer_args()
    out, h_n, c_n, gates, cells, hiddens = ops.lstm_layer_forward(**args)
    before = gates.clone()
    (out.sum() + h_n.sum()).backward()
    assert torch.equal(gates, before)


def _bad(**overrides):
    args = layer_args(packed=True, proj=True, requires_grad=False)
    args.update(overrides)
    return args


OP_ERRORS = [
    ("input dims", dict(input=torch.randn(9, 3, 1, dtype=torch.float64)), "expected input of shape \\[N, input_size\\]"),
    ("int input", dict(input=torch.ones(9, 3, dtype=torch.long)), "expected a floating-point input"),
    ("w_ih rows", dict(w_ih=torch.randn(15, 3, dtype=torch.float64)), "expected w_ih of shape \\[4 \\* hidden_size"),
    ("w_ih cols", dict(w_ih=torch.randn(16, 2, dtype=torch.float64)), "expected w_ih of shape \\[16, 3\\], got \\[16, 2\\]"),
    ("w_hh", dict(w_hh=torch.randn(16, 4, dtype=torch.float64)), "expected w_hh of shape \\[16, 2\\]"),
    ("h0", dict(h0=torch.randn(2, 2, dtype=torch.float64)), "expected h0 of shape \\[3, 2\\], got \\[2, 2\\]"),
    ("c0", dict(c0=torch.randn(3, 2, dtype=torch.float64)), "expected c0 of shape \\[3, 4\\]"),
    ("bias", dict(b_ih=torch.randn(15, dtype=torch.float64)), "expected b_ih of shape \\[16\\]"),
    ("one bias", dict(b_hh=None), "expected both b_ih and b_hh, or neither"),
    ("w_hr size", dict(w_hr=torch.randn(4, 4, dtype=torch.float64)), "0 < proj_size < hidden_size"),
    ("dtype", dict(h0=torch.randn(3, 2)), "expected h0 to have dtype Double \\(the input's\\), got Float"),
    ("batch_sizes dtype", dict(batch_sizes=torch.tensor([3, 3, 2, 1], dtype=torch.int32)), "1-D int64 CPU tensor"),
    ("batch_sizes empty", dict(batch_sizes=torch.tensor([], dtype=torch.long)), "at least one timestep"),
    ("batch_sizes increasing", dict(batch_sizes=torch.tensor([2, 3, 3, 1])), "non-increasing batch_sizes, got 2 then 3"),
    ("batch_sizes negative", dict(batch_sizes=torch.tensor([3, 3, 2, -1])), "non-negative batch_sizes"),
    ("batch_sizes sum", dict(batch_sizes=torch.tensor([3, 3, 2])), "batch_sizes sum to 8 but input has 9 rows"),
]


@pytest.mark.parametrize("overrides,match", [e[1:] for e in OP_ERRORS], ids=[e[0] for e in OP_ERRORS])
def test_forward_op_errors(overrides, match):
    with pytest.raises(RuntimeError, match=match):
        ops.lstm_layer_forward(**_bad(**overrides))


def test_backward_op_errors():
    args = layer_args(packed=True, requires_grad=False)
    out, h_n, c_n, gates, cells, hiddens = ops.lstm_layer_forward(**args)
    base = [torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), args["input"],
            args["batch_sizes"], args["h0"], args["c0"], args["w_ih"], args["w_hh"], None,
            out, gates, cells, hiddens, False, True]
    for index, bad, match in [(0, out[:-1], "expected grad_output of shape \\[9, 4\\]"),
                              (11, gates[:, :4], "expected gates of shape \\[9, 16\\]"),
                              (13, torch.randn(9, 4, dtype=torch.float64), "expected hiddens of shape \\[0\\]"),
                              (2, c_n.float(), "expected grad_c_n to have dtype Double")]:
        args_bad = list(base)
        args_bad[index] = bad
        with pytest.raises(RuntimeError, match=match):
            ops.lstm_layer_backward(*args_bad)


def test_cpu_capability_switch():
    from conftest import CPU_CAPABILITIES
    assert "default" in CPU_CAPABILITIES
    for capability in CPU_CAPABILITIES:
        assert ops.set_cpu_capability(capability) == capability
    with pytest.raises(RuntimeError, match="unknown CPU capability 'sse9'"):
        ops.set_cpu_capability("sse9")
    best = ops.set_cpu_capability("")
    assert best == CPU_CAPABILITIES[-1]


def test_cpu_gemm_switch():
    for setting in ("auto", "aten", "small"):
        assert ops.set_cpu_gemm(setting) == setting
    for gone in ("blas", "onednn", "cublas"):
        with pytest.raises(RuntimeError, match=f"unknown CPU GEMM setting '{gone}'"):
            ops.set_cpu_gemm(gone)
    ops.set_cpu_gemm("auto")


def test_cpu_tuning_switch():
    # set_cpu_tuning changes a rule of the capability in use and returns the old value;
    # backend_info reads the rules in use; -1 restores the default.
    default = ops.set_cpu_tuning("fused_min_hidden", 77)
    try:
        assert fused_lstm.backend_info()["fused_forward_min_hidden"] == "77"
        assert ops.set_cpu_tuning("fused_min_hidden", -1) == 77
        assert fused_lstm.backend_info()["fused_forward_min_hidden"] == str(default)
        assert ops.set_cpu_tuning("fused_min_hidden", -1) == default
    finally:
        ops.set_cpu_tuning("fused_min_hidden", -1)
    with pytest.raises(RuntimeError, match="unknown rule 'fused_max_hidden'"):
        ops.set_cpu_tuning("fused_max_hidden", 1)
    with pytest.raises(RuntimeError, match="must be >= 0"):
        ops.set_cpu_tuning("fused_min_hidden", -2)


def test_fused_min_hidden_both_sides(cpu_path, request):
    # Both sides of tuning.h's fused_min_hidden on every path (the SIMD builds fuse at any
    # H, the portable build from H 128): the fused loops and the per-step GEMMs at H 40, batch 16
    # (past small_step_max_batch), dense and packed, against nn.LSTM in float64.
    from testing import assert_close, lstm_outputs_and_grads, random_like_weights
    request.addfinalizer(lambda: ops.set_cpu_tuning("fused_min_hidden", -1))
    for min_hidden in (1, 4096):
        ops.set_cpu_tuning("fused_min_hidden", min_hidden)
        ours = fused_lstm.LSTM(24, 40, num_layers=2, dtype=torch.float64)
        random_like_weights(ours, min_hidden)
        ref = torch.nn.LSTM(24, 40, num_layers=2, dtype=torch.float64)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(6, 16, 24, dtype=torch.float64)
        for lengths in (None, [6] * 4 + [5] * 8 + [2] * 4):
            got = lstm_outputs_and_grads(ours, x, lengths=lengths)
            want = lstm_outputs_and_grads(ref, x, lengths=lengths)
            for a, e in zip(got[0] + got[1], want[0] + want[1]):
                assert_close(a, e, torch.float64, f"fused_min_hidden {min_hidden}")


def test_backend_info_says_what_runs():
    from conftest import CPU_CAPABILITIES
    info = fused_lstm.backend_info()
    for key in ("cpu_model", "cpu_flags", "torch_blas", "cpu_capability", "aten_cpu_capability",
                "gemm_setting", "gemm_small", "gemm_few_rows", "gemm_large", "threads",
                "parallel_backend"):
        assert info[key], key
    assert info["threads"] == str(torch.get_num_threads())
    try:
        for capability in CPU_CAPABILITIES:
            ops.set_cpu_capability(capability)
            assert fused_lstm.backend_info()["cpu_capability"] == capability
        ops.set_cpu_gemm("aten")
        aten = fused_lstm.backend_info()
        assert aten["gemm_setting"] == "aten" and "torch's BLAS" in aten["gemm_large"]
        assert "torch's BLAS" in aten["gemm_small"] and "torch's BLAS" in aten["gemm_few_rows"]
    finally:
        ops.set_cpu_capability("")
        ops.set_cpu_gemm("auto")
    assert fused_lstm.backend_info() == info


def _run_python(code, own_capability=False, **env):
    """Runs code in a fresh interpreter, outside the checkout; with own_capability,
    with ATen's own choice of CPU capability unless env names one."""
    import subprocess
    import sys
    base = {k: v for k, v in os.environ.items()
            if not (own_capability and k == "ATEN_CPU_CAPABILITY")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**base, **env}, cwd=os.path.dirname(os.__file__), check=True)


def test_info_command_prints_backend_info():
    out = _run_python("import runpy; runpy.run_module('fused_lstm.info', run_name='__main__')")
    for key, value in fused_lstm.backend_info().items():
        assert f"{key:32s} {value}" in out.stdout
    assert "RuntimeWarning" not in out.stderr


@pytest.mark.skipif("avx2" not in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else True,
                    reason="needs an x86-64 CPU with AVX2 (the warning is for its portable fallback)")
def test_portable_kernels_warn_once():
    out = _run_python("import warnings; warnings.simplefilter('always'); import fused_lstm, torch; "
                      "m = fused_lstm.LSTM(3, 4); m(torch.randn(2, 1, 3)); m(torch.randn(2, 1, 3)); "
                      "print(fused_lstm.backend_info()['cpu_capability'])",
                      own_capability=True, ATEN_CPU_CAPABILITY="default")
    assert out.stdout.split()[-1] == "default"
    assert out.stderr.count("running the portable CPU kernels") == 1
    quiet = _run_python("import warnings; warnings.simplefilter('always'); import fused_lstm",
                        own_capability=True)
    assert "portable CPU kernels" not in quiet.stderr


def test_no_private_symbol_lookups_in_csrc():
    # Every GEMM goes through a supported interface: nothing is looked up by name.
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent / "csrc"
    if not root.is_dir():
        pytest.skip("the source tree is not beside the tests")
    for path in root.rglob("*"):
        if path.suffix in (".cpp", ".h", ".cu", ".cuh"):
            text = path.read_text()
            assert "dlsym" not in text and "dlopen" not in text, path
            assert '"_ZN' not in text, path
