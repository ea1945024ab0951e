"""CUDA-only checks: against cuDNN in float32 and the half dtypes, streams, NaN-poisoned
memory, 64-bit indexing, autocast and device errors. The reference grids against
nn.LSTM run on CUDA too, from test_lstm.py (conftest.py's DEVICES). Skipped without a
GPU or without a CUDA build."""
import itertools

import pytest
import torch
from torch import nn

import fused_lstm
from testing import (CUDNN_FLOAT32, HALF_VS_FLOAT64, assert_close, lstm_outputs_and_grads,
                     random_like_weights, random_tensor)

from conftest import CUDA_MARKS

pytestmark = CUDA_MARKS


I, H = 6, 8
KINDS = ["dense", "unbatched", "packed_sorted", "packed_unsorted"]


@pytest.fixture(autouse=True)
def exact_float32():
    # cuDNN and cuBLAS may use TF32 for float32; the reference comparisons must not.
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def make_case(dtype, num_layers, bidirectional, batch_first, bias, proj, kind, T=5, B=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(input_size=I, hidden_size=H, num_layers=num_layers, bias=bias,
                  batch_first=batch_first, bidirectional=bidirectional, proj_size=proj)
    module = fused_lstm.LSTM(**kwargs, dtype=torch.float64)
    random_like_weights(module, seed)
    LD, P = num_layers * (2 if bidirectional else 1), proj or H
    if kind == "unbatched":
        x, hx = random_tensor((T, I), dtype, gen), (random_tensor((LD, P), dtype, gen), random_tensor((LD, H), dtype, gen))
    else:
        x = random_tensor((B, T, I) if batch_first else (T, B, I), dtype, gen)
        hx = (random_tensor((LD, B, P), dtype, gen), random_tensor((LD, B, H), dtype, gen))
    lengths = None
    if kind.startswith("packed"):
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[0] = T
        if kind == "packed_sorted":
            lengths = lengths.sort(descending=True).values
    return kwargs, module, x, hx, lengths


GRID = list(itertools.product([1, 2], [False, True], [False, True], [False, True], [0, 3], KINDS))


# cuDNN's own float32 error (seen on an H200, cuDNN 9.19: up to 1.6e-5 of the max
# for dense input without projection) exceeds the float32 tolerance, so float32 is
# held to float64 truth, as on the CPU; cuDNN must agree with us to its own error
# (CUDNN_FLOAT32).


@pytest.mark.parametrize("case", GRID[::3], ids=["-".join(map(str, c)) for c in GRID[::3]])
def test_cuda_matches_cudnn_float32(case):
    layers, bidir, bf, bias, proj, kind = case
    kwargs, module, x, hx, lengths = make_case(torch.float32, layers, bidir, bf, bias, proj, kind, seed=1)
    ours = fused_lstm.LSTM(**kwargs).cuda()
    ours.load_state_dict(module.state_dict())
    cudnn = nn.LSTM(**kwargs).cuda()
    cudnn.load_state_dict(module.state_dict())
    truth = fused_lstm.LSTM(**kwargs, dtype=torch.float64)
    truth.load_state_dict(module.state_dict())
    sorted_ = kind != "packed_unsorted"
    args = (x.cuda(), tuple(h.cuda() for h in hx), lengths, sorted_)
    got_out, got_grads = lstm_outputs_and_grads(ours, *args)
    cudnn_out, cudnn_grads = lstm_outputs_and_grads(cudnn, *args)
    exp_out, exp_grads = lstm_outputs_and_grads(truth, x.double(), tuple(h.double() for h in hx),
                                                lengths, sorted_)
    for a, c, e in zip(got_out + got_grads, cudnn_out + cudnn_grads, exp_out + exp_grads):
        assert a.dtype == torch.float32
        assert_close(a.double().cpu(), e, dtype=torch.float32)
        torch.testing.assert_close(a, c, rtol=CUDNN_FLOAT32[0], atol=CUDNN_FLOAT32[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("proj,kind", [(0, "dense"), (3, "packed_unsorted"), (0, "packed_sorted")])
def test_half_precision_against_float64(dtype, proj, kind):
    kwargs, module, x, hx, lengths = make_case(dtype, 2, True, False, True, proj, kind, seed=2)
    ours = fused_lstm.LSTM(**kwargs).to("cuda", dtype)
    ours.load_state_dict(module.state_dict())
    exact = fused_lstm.LSTM(**kwargs, dtype=torch.float64)
    exact.load_state_dict(ours.state_dict())  # the rounded weights
    sorted_ = kind != "packed_unsorted"
    got_out, got_grads = lstm_outputs_and_grads(ours, x.cuda(), tuple(h.cuda() for h in hx), lengths, sorted_)
    exp_out, exp_grads = lstm_outputs_and_grads(exact, x.double(), tuple(h.double() for h in hx), lengths, sorted_)
    rtol, atol = HALF_VS_FLOAT64[dtype]
    for a, e in zip(got_out + got_grads, exp_out + exp_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double().cpu(), e, rtol=rtol, atol=atol * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_like_nn(dtype):
    # nn.LSTM's CUDA autocast always runs cuDNN in float16 (seen with bfloat16 on
    # torch 2.11); fused_lstm runs in the autocast dtype asked for.
    ours, ref = fused_lstm.LSTM(6, 8, num_layers=2).cuda(), nn.LSTM(6, 8, num_layers=2).cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 6, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out, (h, c) = ours(x)
        ref_out, (ref_h, ref_c) = ref(x)
    assert out.dtype == h.dtype == c.dtype == dtype
    rtol, atol = HALF_VS_FLOAT64[dtype]
    for a, e in ((out, ref_out), (h, ref_h), (c, ref_c)):
        torch.testing.assert_close(a.float(), e.float(), rtol=rtol, atol=atol)
    out.float().sum().backward()
    assert ours.weight_hh_l0.grad.dtype == torch.float32 and ours.weight_hh_l0.grad.abs().sum() > 0


def test_non_default_stream():
    _, module, x, hx, _ = make_case(torch.float32, 2, True, False, True, 0, "dense", T=50, B=16, seed=3)
    module = module.float().cuda()
    x, hx = x.cuda(), tuple(h.cuda() for h in hx)
    expected_out, expected_grads = lstm_outputs_and_grads(module, x, hx)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got_out, got_grads = lstm_outputs_and_grads(module, x, hx)
    torch.cuda.current_stream().wait_stream(stream)
    for a, e in zip(got_out + got_grads, expected_out + expected_grads):
        assert_close(a, e)


def test_every_output_element_is_written():
    # The caching allocator hands out blocks just filled with NaN: any element a
    # kernel failed to write would stay NaN.
    _, module, x, hx, lengths = make_case(torch.float32, 2, True, False, True, 3, "packed_unsorted",
                                          T=7, B=5, seed=4)
    module = module.float().cuda()
    poison = torch.full((64 << 20,), float("nan"), device="cuda")
    del poison
    out, grads = lstm_outputs_and_grads(module, x.cuda(), tuple(h.cuda() for h in hx), lengths, False)
    for t in out + grads:
        assert not t.isnan().any()


@pytest.mark.slow
def test_64bit_indexing():
    # One step whose gate block has more than 2^31 elements (b * 4H > INT32_MAX).
    # Rows of a batch are independent, so two of them are checked against a
    # batch-of-two run.
    B, H, I = 65537, 8192, 8
    dtype = torch.float16
    if torch.cuda.get_device_properties(0).total_memory < 40 << 30:
        pytest.skip("needs about 30 GiB of GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(5)
    w_ih = torch.randn(4 * H, I, device="cuda", dtype=dtype, generator=gen) * 0.05
    w_hh = torch.randn(4 * H, H, device="cuda", dtype=dtype, generator=gen) * 0.01
    x = torch.randn(B, I, device="cuda", dtype=dtype, generator=gen)
    h0 = torch.randn(B, H, device="cuda", dtype=dtype, generator=gen)
    c0 = torch.randn(B, H, device="cuda", dtype=dtype, generator=gen)
    for t in (x, h0, c0, w_hh):
        t.requires_grad_()
    out, (h_n, c_n) = fused_lstm.functional.lstm_layer(x.unsqueeze(0), (h0, c0), w_ih, w_hh)
    (out.float().sum() + c_n.float().sum()).backward()
    rows = torch.tensor([0, B - 1], device="cuda")
    x2, h2, c2 = (t.detach()[rows].clone().requires_grad_() for t in (x, h0, c0))
    out2, (_, c_n2) = fused_lstm.functional.lstm_layer(x2.unsqueeze(0), (h2, c2), w_ih, w_hh)
    (out2.float().sum() + c_n2.float().sum()).backward()
    assert_close(out[0, rows], out2[0], what="output")
    assert_close(c_n[rows], c_n2, what="c_n")
    for a, e in ((x.grad[rows], x2.grad), (h0.grad[rows], h2.grad), (c0.grad[rows], c2.grad)):
        assert_close(a, e, what="gradient")


def test_cell_on_cuda():
    ref = nn.LSTMCell(5, 7).cuda()
    ours = fused_lstm.LSTMCell(5, 7).cuda()
    ours.load_state_dict(ref.state_dict())
    x, h, c = (torch.randn(4, n, device="cuda") for n in (5, 7, 7))
    for a, e in zip(ours(x, (h, c)), ref(x, (h, c))):
        assert_close(a, e)


def test_device_errors():
    m = fused_lstm.LSTM(6, 8).cuda()
    x = torch.randn(5, 3, 6, device="cuda")
    with pytest.raises(RuntimeError, match="Input and hidden tensors are not at the same device"):
        m(x, (torch.zeros(1, 3, 8), torch.zeros(1, 3, 8)))
    with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device"):
        fused_lstm.LSTM(6, 8)(x)
    args = dict(input=torch.randn(6, 6, device="cuda"), batch_sizes=torch.tensor([3, 3]),
                h0=torch.zeros(3, 8), c0=torch.zeros(3, 8, device="cuda"),
                w_ih=torch.randn(32, 6, device="cuda"), w_hh=torch.randn(32, 8, device="cuda"),
                b_ih=None, b_hh=None, w_hr=None, reverse=False)
    with pytest.raises(RuntimeError, match="expected h0 on device cuda:0"):
        torch.ops.fused_lstm.lstm_layer_forward(**args)
    args.update(h0=torch.zeros(3, 8, device="cuda"), batch_sizes=torch.tensor([3, 3], device="cuda"))
    with pytest.raises(RuntimeError, match="1-D int64 CPU tensor"):
        torch.ops.fused_lstm.lstm_layer_forward(**args)


# The persistent kernels (csrc/cuda/persistent.cu), forced on and off, against float64
# truth on the CPU. Their partition is checked on the CPU too (test_persistent.py, by
# emulation); these check the kernels themselves: memory ordering, shared-memory use.

class persistent_setting:
    """Runs a block with the CUDA persistent setting "on" or "off", then restores it."""

    def __init__(self, setting):
        self.setting = setting

    def __enter__(self):
        self.old = torch.ops.fused_lstm.set_cuda_persistent("")
        torch.ops.fused_lstm.set_cuda_persistent(self.setting)

    def __exit__(self, *exc):
        torch.ops.fused_lstm.set_cuda_persistent(self.old)


def persistent_planned(H, B, T, dtype):
    """Whether the planner takes this layer on this GPU (the launches to expect)."""
    props = torch.cuda.get_device_properties(0)
    plan = torch.ops.fused_lstm.persistent_plan(
        H, H, B, T, torch.empty(0, dtype=dtype).element_size(), False, props.major, props.minor,
        props.multi_processor_count, props.shared_memory_per_block_optin,
        16 if props.major >= 9 else 1)
    return plan["cluster"] != "0"


def launches():
    torch.cuda.synchronize()
    return torch.ops.fused_lstm.cuda_persistent_launches()


PERSISTENT_H = [1, 20, 63, 64, 96, 128, 256, 384, 512]
PERSISTENT_B = [1, 3, 8, 9, 33]


@pytest.mark.parametrize("setting", ["on", "off"])
@pytest.mark.parametrize("kind", ["dense", "packed_unsorted"])
@pytest.mark.parametrize("B", PERSISTENT_B)
@pytest.mark.parametrize("H", PERSISTENT_H)
def test_persistent_float32_against_float64(H, B, kind, setting):
    # Bidirectional: the reverse direction too; packed: rows of different lengths.
    T = 6
    kwargs = dict(input_size=5, hidden_size=H, bidirectional=True)
    truth = fused_lstm.LSTM(**kwargs, dtype=torch.float64)
    random_like_weights(truth, H + B)
    with torch.no_grad():
        for p in truth.parameters():
            p.mul_(H ** -0.5)  # keep the gates off saturation at large H
    ours = fused_lstm.LSTM(**kwargs).cuda()
    ours.load_state_dict(truth.state_dict())
    gen = torch.Generator().manual_seed(B)
    x = random_tensor((T, B, 5), torch.float32, gen)
    hx = tuple(random_tensor((2, B, H), torch.float32, gen) for _ in range(2))
    lengths = None
    if kind == "packed_unsorted":
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[-1] = T
    before = launches()
    with persistent_setting(setting):
        got_out, got_grads = lstm_outputs_and_grads(ours, x.cuda(), tuple(h.cuda() for h in hx),
                                                    lengths, False)
    ran = launches() - before
    # Two directions, each a forward and a backward launch.
    assert ran == (4 if setting == "on" and persistent_planned(H, B, T, torch.float32) else 0)
    exp_out, exp_grads = lstm_outputs_and_grads(truth, x.double(), tuple(h.double() for h in hx),
                                                lengths, False)
    for a, e in zip(got_out + got_grads, exp_out + exp_grads):
        assert a.dtype == torch.float32
        assert_close(a.double().cpu(), e, dtype=torch.float32, scaled=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H", [20, 128, 512])
def test_persistent_half_precision_against_float64(dtype, H):
    kwargs, module, x, hx, lengths = make_case(dtype, 1, True, False, True, 0, "packed_unsorted", B=9,
                                               seed=H)
    kwargs["hidden_size"] = H
    ours = fused_lstm.LSTM(**kwargs).to("cuda", dtype)
    exact = fused_lstm.LSTM(**kwargs, dtype=torch.float64)
    exact.load_state_dict(ours.state_dict())  # the rounded weights
    gen = torch.Generator().manual_seed(H)
    hx = tuple(random_tensor((2, 9, H), dtype, gen) for _ in range(2))
    before = launches()
    with persistent_setting("on"):
        got_out, got_grads = lstm_outputs_and_grads(ours, x.cuda(), tuple(h.cuda() for h in hx), lengths, False)
    assert launches() - before == (4 if persistent_planned(H, 9, 5, dtype) else 0)
    exp_out, exp_grads = lstm_outputs_and_grads(exact, x.double(), tuple(h.double() for h in hx), lengths, False)
    rtol, atol = HALF_VS_FLOAT64[dtype]
    for a, e in zip(got_out + got_grads, exp_out + exp_grads):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double().cpu(), e, rtol=rtol, atol=atol * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("H", [64, 256])
def test_persistent_rerun_is_bit_identical(H):
    _, module, x, hx, lengths = make_case(torch.float32, 2, True, False, True, 0, "packed_unsorted",
                                          T=9, B=33, seed=5)
    module = fused_lstm.LSTM(6, H, num_layers=2, bidirectional=True).cuda()
    hx = tuple(torch.randn(4, 33, H, device="cuda") for _ in range(2))
    with persistent_setting("on"):
        first = lstm_outputs_and_grads(module, x.cuda(), hx, lengths, False)
        second = lstm_outputs_and_grads(module, x.cuda(), hx, lengths, False)
    for a, b in zip(first[0] + first[1], second[0] + second[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("setting", ["on", "off"])
def test_cuda_graph_capture_and_replay(setting):
    # A training step captured with torch.cuda.graph, replayed on new data, against the
    # same step run eagerly.
    torch.manual_seed(0)
    model = fused_lstm.LSTM(6, 32, num_layers=2, batch_first=True).cuda()
    static_x = torch.randn(4, 7, 6, device="cuda")

    def step(x):
        out, (h, c) = model(x)
        loss = out.square().sum() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return out, grads

    with persistent_setting(setting):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up off the capture, as torch.cuda.graph asks
                step(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        before = launches()
        with torch.cuda.graph(graph):
            static_out, static_grads = step(static_x)
        # The graph holds the persistent kernels when on: two layers, forward and backward.
        assert launches() - before == (4 if setting == "on" and persistent_planned(32, 4, 7, torch.float32) else 0)
        for seed in (1, 2):
            new_x = torch.randn(4, 7, 6, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            static_x.copy_(new_x)
            graph.replay()
            eager_out, eager_grads = step(new_x)
            assert_close(static_out, eager_out, scaled=True)
            for a, e in zip(static_grads, eager_grads):
                assert_close(a, e, scaled=True)
