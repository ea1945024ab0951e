"""fused_lstm.LSTMCell against torch.nn.LSTMCell with the same weights."""
import itertools

import pytest
import torch
from torch import nn

import fused_lstm
from testing import assert_close, random_like_weights

# Every reference test runs once per CPU code path (conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_path")

CASES = list(itertools.product([torch.float64, torch.float32], [True, False], [True, False],
                               [True, False], [1, 4]))


@pytest.mark.parametrize("dtype,batched,give_hx,bias,batch", CASES,
                         ids=[f"{str(d)[6:]}-{'b' if b else 'unb'}-{'hx' if h else 'nohx'}-"
                              f"{'bias' if bi else 'nobias'}-B{n}" for d, b, h, bi, n in CASES])
def test_cell_matches_nn(dtype, batched, give_hx, bias, batch):
    gen = torch.Generator().manual_seed(batch + 10 * bias + 100 * give_hx)
    ref = nn.LSTMCell(7, 9, bias=bias, dtype=dtype)
    random_like_weights(ref, 5)
    ours = fused_lstm.LSTMCell(7, 9, bias=bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    lead = (batch,) if batched else ()
    x = torch.randn(lead + (7,), generator=gen, dtype=torch.float64).to(dtype)
    hx = tuple(torch.randn(lead + (9,), generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))

    def run(module):
        x_ = x.clone().requires_grad_()
        hx_ = tuple(h.clone().requires_grad_() for h in hx) if give_hx else None
        h, c = module(x_, hx_)
        loss = (h * torch.linspace(-1, 2, h.numel(), dtype=dtype).view(h.shape)).sum() + (c * c).sum()
        leaves = [x_] + (list(hx_) if give_hx else []) + list(module.parameters())
        return (h, c) + torch.autograd.grad(loss, leaves)

    expected = run(ref)
    for a, e in zip(run(ours), expected):
        assert a.shape == e.shape
        assert_close(a, e)
    with torch.no_grad():  # no workspace kept (the inference path)
        for a, e in zip(ours(x, hx if give_hx else None), expected[:2]):
            assert_close(a, e)


def test_cell_sequence_matches_lstm_layer():
    # Stepping the cell over a sequence gives the one-layer LSTM's results.
    cell = fused_lstm.LSTMCell(5, 6, dtype=torch.float64)
    lstm = fused_lstm.LSTM(5, 6, dtype=torch.float64)
    with torch.no_grad():
        for name in ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]:
            getattr(lstm, name + "_l0").copy_(getattr(cell, name))
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    h = c = torch.zeros(2, 6, dtype=torch.float64)
    outs = []
    for t in range(4):
        h, c = cell(x[t], (h, c))
        outs.append(h)
    out, (h_n, c_n) = lstm(x)
    assert_close(torch.stack(outs), out)
    assert_close(h, h_n[0])
    assert_close(c, c_n[0])


@pytest.mark.parametrize("args,error,match", [
    (lambda: (torch.randn(2, 3, 7),), ValueError, "LSTMCell: Expected input to be 1D or 2D, got 3D"),
    (lambda: (torch.randn(2, 5),), RuntimeError, "input has inconsistent input_size: got 5 expected 7"),
    (lambda: (torch.randn(2, 7), (torch.randn(3, 9), torch.randn(2, 9))), RuntimeError,
     "Input batch size 2 doesn't match hidden0 batch size 3"),
    (lambda: (torch.randn(2, 7), (torch.randn(2, 9), torch.randn(2, 8))), RuntimeError,
     "hidden1 has inconsistent hidden_size: got 8, expected 9"),
    (lambda: (torch.randn(2, 7), (torch.randn(1, 2, 9), torch.randn(2, 9))), ValueError,
     r"LSTMCell: Expected hx\[0\] to be 1D or 2D, got 3D"),
    (lambda: (torch.randn(2, 7, dtype=torch.float64),), RuntimeError,
     "expected w_ih to have dtype Double"),
    (lambda: (torch.randn(2, 7), (torch.randn(2, 9, device="meta"), torch.randn(2, 9))), RuntimeError,
     "Input and hidden tensors are not at the same device"),
])
def test_cell_errors(args, error, match):
    cell = fused_lstm.LSTMCell(7, 9)
    with pytest.raises(error, match=match):
        cell(*args())


def test_cell_trains_after_a_call_under_inference_mode():
    # Dense batch_sizes are made once per (steps, batch) and reused
    # (functional._dense_batch_sizes), so one first made under torch.inference_mode is an
    # inference tensor: a cell and an LSTM first called there at a new batch size then
    # train at it, matching nn.
    torch.manual_seed(0)
    for ours, ref, x in ((fused_lstm.LSTMCell(4, 5), nn.LSTMCell(4, 5), torch.randn(13, 4)),
                         (fused_lstm.LSTM(4, 5), nn.LSTM(4, 5), torch.randn(3, 11, 4))):
        ref.load_state_dict(ours.state_dict())
        with torch.inference_mode():
            ours(x)
        for module in (ours, ref):
            out = module(x)
            out = out[0] if isinstance(module, nn.LSTM) else out[0] + out[1]
            out.square().sum().backward()
        for a, e in zip(ours.parameters(), ref.parameters()):
            assert_close(a.grad, e.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_activations_at_extreme_inputs_match_nn(dtype):
    # Gate pre-activations far past the activations' clamps (+-60 .. +-1e30), infinite and
    # NaN, through the one-step cell and a fused layer (H 128, 3 steps): nn's values where
    # those are numbers (saturated gates: 0, 1, +-1), NaN exactly where nn has NaN. The
    # float exp clamps its argument, so NaN must survive the clamp (core/cell_math.h).
    gen = torch.Generator().manual_seed(7)
    H = 128
    x = torch.randn(3, 6, 4, generator=gen, dtype=torch.float64).to(dtype)
    x[0, :, 0] = torch.tensor([60.0, -60.0, 1e30, -1e30, float("inf"), float("-inf")], dtype=dtype)
    x[1, 0, 1] = float("nan")
    x[2, 1, 2] = float("inf")
    for ref, ours in [(nn.LSTMCell(4, H, dtype=dtype), fused_lstm.LSTMCell(4, H, dtype=dtype)),
                      (nn.LSTM(4, H, dtype=dtype), fused_lstm.LSTM(4, H, dtype=dtype))]:
        ours.load_state_dict(ref.state_dict())
        with torch.no_grad():
            if isinstance(ref, nn.LSTMCell):
                got, want = ours(x[0]), ref(x[0])
            else:
                got, want = ours(x)[1], ref(x)[1]
        assert isinstance(ref, nn.LSTMCell) or all(e.isnan().any() for e in want)
        for a, e in zip(got, want):
            assert torch.equal(a.isnan(), e.isnan())
            assert_close(a.nan_to_num(), e.nan_to_num())
