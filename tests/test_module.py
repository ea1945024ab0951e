"""Module behaviour of fused_lstm.LSTM: checkpoints both ways, repr, dtype and
mode changes, dropout, and errors that match torch.nn.LSTM's."""
import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_lstm
from testing import assert_close

CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(proj_size=3, bias=False),
           dict(num_layers=3, batch_first=True, dropout=0.25)]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_same_parameters_as_nn(kwargs):
    ref, ours = nn.LSTM(6, 8, **kwargs), fused_lstm.LSTM(6, 8, **kwargs)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == \
           [(n, p.shape) for n, p in ours.named_parameters()]
    bound = 1 / 8 ** 0.5  # nn's default init: U(-1/sqrt(H), 1/sqrt(H))
    assert all(p.abs().max() <= bound for p in ours.parameters())
    assert repr(ours) == repr(ref)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_checkpoint_loads_both_ways(kwargs):
    x = torch.randn(5, 4, 6)
    ref = nn.LSTM(6, 8, **kwargs).eval()
    ours = fused_lstm.LSTM(6, 8, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    for a, e in zip(ours(x)[0:1] + ours(x)[1], ref(x)[0:1] + ref(x)[1]):
        assert_close(a, e)
    # and back: a fused_lstm checkpoint into nn.LSTM
    ours2, ref2 = fused_lstm.LSTM(6, 8, **kwargs).eval(), nn.LSTM(6, 8, **kwargs).eval()
    ref2.load_state_dict(ours2.state_dict(), strict=True)
    for a, e in zip(ours2(x)[0:1] + ours2(x)[1], ref2(x)[0:1] + ref2(x)[1]):
        assert_close(a, e)


def test_repr_and_flatten_parameters():
    m = fused_lstm.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True, proj_size=2)
    assert m.extra_repr() == nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True,
                                     proj_size=2).extra_repr()
    before = [p.data_ptr() for p in m.parameters()]
    m.flatten_parameters()
    assert [p.data_ptr() for p in m.parameters()] == before


def test_double_half_and_to():
    x = torch.randn(4, 2, 6)
    m = fused_lstm.LSTM(6, 8).double()
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert m(x.double())[0].dtype == torch.float64
    ref = nn.LSTM(6, 8).double()
    ref.load_state_dict(m.state_dict())
    assert_close(m(x.double())[0], ref(x.double())[0])
    m = m.to(torch.float32)
    assert m(x)[0].dtype == torch.float32
    # half/bfloat16 on the CPU: float32 math, half storage; against float64.
    for dtype in (torch.bfloat16, torch.float16):
        h = fused_lstm.LSTM(6, 8).to(dtype)
        exact = nn.LSTM(6, 8, dtype=torch.float64)
        exact.load_state_dict(h.state_dict())
        expected = [exact(x.double())[0]] + list(exact(x.double())[1])
        out, (hn, cn) = h(x.to(dtype))
        assert out.dtype == dtype
        for a, e in zip((out, hn, cn), expected):
            assert_close(a.double(), e, dtype=dtype)
        with torch.no_grad():  # the inference path, with its reused buffer, in this dtype
            out, (hn, cn) = h(x.to(dtype))
        for a, e in zip((out, hn, cn), expected):
            assert_close(a.double(), e, dtype=dtype)


def test_dropout_train_and_eval():
    x = torch.randn(5, 3, 6)
    ref = nn.LSTM(6, 8, num_layers=3, dropout=0.5)
    ours = fused_lstm.LSTM(6, 8, num_layers=3, dropout=0.5)
    ours.load_state_dict(ref.state_dict())
    # Training: the same dropout masks as nn.LSTM under the same seed.
    torch.manual_seed(11)
    expected = ref(x)[0]
    torch.manual_seed(11)
    got = ours(x)[0]
    assert_close(got, expected)
    torch.manual_seed(12)
    assert (ours(x)[0] - got).abs().max() > 1e-3  # a fresh mask changes the output
    # Eval: no dropout, deterministic, equal to nn.LSTM.
    ref.eval(), ours.eval()
    assert_close(ours(x)[0], ref(x)[0])
    assert torch.equal(ours(x)[0], ours(x)[0])


DOUBLE_BACKWARD_CASES = {
    "one-layer": dict(),
    "stack-bidir-proj": dict(num_layers=2, bidirectional=True, proj_size=2),
    "no-bias": dict(bias=False),
    "dropout-layer-by-layer": dict(num_layers=2, dropout=0.5),
}


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("kwargs", DOUBLE_BACKWARD_CASES.values(), ids=DOUBLE_BACKWARD_CASES)
def test_double_backward_matches_nn(kwargs, packed):
    # A gradient penalty: d/dtheta of |dL/dx|^2 + |dL/dh0|^2, against nn.LSTM's (CPU).
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, dtype=torch.float64, **kwargs)
    m = fused_lstm.LSTM(3, 4, dtype=torch.float64, **kwargs)
    m.load_state_dict(ref.state_dict())
    LD, P = ref.num_layers * (2 if ref.bidirectional else 1), ref.proj_size or 4
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    hx = (torch.randn(LD, 3, P, dtype=torch.float64), torch.randn(LD, 3, 4, dtype=torch.float64))
    w = torch.randn(5, 3, 2 * P if ref.bidirectional else P, dtype=torch.float64)

    def penalty_grads(module):
        module.zero_grad(set_to_none=True)
        x_ = x.clone().requires_grad_()
        h0 = hx[0].clone().requires_grad_()
        inp = pack_padded_sequence(x_, [5, 3, 2]) if packed else x_
        torch.manual_seed(1)  # the same dropout masks
        out, (h_n, c_n) = module(inp, (h0, hx[1]))
        out = pad_packed_sequence(out)[0] if packed else out
        loss = (out * w).sum() + h_n.sin().sum() + c_n.square().sum()
        gx, gh = torch.autograd.grad(loss, (x_, h0), create_graph=True)
        (gx.square().sum() + gh.square().sum()).backward()
        return [gx.detach(), gh.detach()] + [p.grad for p in module.parameters()]

    got, expected = penalty_grads(m), penalty_grads(ref)
    names = ["dL/dx", "dL/dh0"] + [n for n, _ in ref.named_parameters()]
    for name, a, e in zip(names, got, expected):
        assert a is not None, name
        assert_close(a, e, what=name)


@pytest.mark.parametrize("op", ["stack", "layer"])
def test_gradgradcheck(op):
    # Second derivatives of the stack op (what LSTM runs) and of the layer op (what the
    # dropout path runs), in float64, packed input with a shrinking batch.
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    batch_sizes = torch.tensor([3, 2, 2, 1])
    x, h0, c0 = rnd(8, 3), rnd(2, 3, 2), rnd(2, 3, 4)
    weights = [rnd(16, 3), rnd(16, 2), rnd(16), rnd(16), rnd(2, 4),
               rnd(16, 3), rnd(16, 2), rnd(16), rnd(16), rnd(2, 4)]
    if op == "stack":
        def fn(x, h0, c0, *weights):
            return fused_lstm.ops.lstm_stack(x, batch_sizes, h0, c0, list(weights), True, True, 1,
                                             True)
    else:
        def fn(x, h0, c0, *weights):
            return fused_lstm.ops.lstm_layer(x, batch_sizes, h0[1], c0[1], *weights[5:], True)
    assert torch.autograd.gradgradcheck(fn, (x, h0, c0, *weights))


def test_backward_op_called_directly_is_not_differentiable():
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    bs = torch.tensor([2, 2])
    x, h0, c0, w_ih, w_hh = rnd(4, 3), rnd(2, 4), rnd(2, 4), rnd(16, 3), rnd(16, 4)
    out, h, c, gates, cells, hiddens = fused_lstm.ops.lstm_layer_forward(
        x, bs, h0, c0, w_ih, w_hh, None, None, None, False)
    grad_out = rnd(4, 4).requires_grad_()
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    r = fused_lstm.ops.lstm_layer_backward(grad_out, zeros, zeros, x, bs, h0, c0, w_ih, w_hh,
                                           None, out, gates, cells, hiddens, False, True)
    with pytest.raises(RuntimeError, match="lstm_layer_backward op is not differentiable"):
        r[3].sum().backward()


def test_unsorted_packed_permutes_hidden_like_nn():
    ref, ours = nn.LSTM(6, 8), fused_lstm.LSTM(6, 8)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 4, 6)
    hx = (torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    packed = pack_padded_sequence(x, torch.tensor([2, 5, 1, 3]), enforce_sorted=False)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(packed, hx), ours(packed, hx)
    assert type(o2) is type(o1)
    assert torch.equal(o1.batch_sizes, o2.batch_sizes)
    assert torch.equal(o1.unsorted_indices, o2.unsorted_indices)
    for a, e in ((o2.data, o1.data), (h2, h1), (c2, c1)):
        assert_close(a, e)


def _errors():
    LD = 2  # num_layers=2
    return [
        ("4-D input", lambda: (torch.randn(2, 3, 4, 6),), ValueError,
         "LSTM: Expected input to be 2D or 3D, got 4D instead"),
        ("wrong input size", lambda: (torch.randn(5, 3, 7),), RuntimeError,
         "input.size\\(-1\\) must be equal to input_size. Expected 6, got 7"),
        ("wrong dtype", lambda: (torch.randn(5, 3, 6, dtype=torch.float64),), ValueError,
         "RNN input dtype \\(torch.float64\\) does not match weight dtype \\(torch.float32\\)"),
        ("h0 batch", lambda: (torch.randn(5, 3, 6), (torch.randn(LD, 2, 8), torch.randn(LD, 3, 8))),
         RuntimeError, "Expected hidden\\[0\\] size \\(2, 3, 8\\), got \\[2, 2, 8\\]"),
        ("c0 size", lambda: (torch.randn(5, 3, 6), (torch.randn(LD, 3, 8), torch.randn(LD, 3, 7))),
         RuntimeError, "Expected hidden\\[1\\] size \\(2, 3, 8\\), got \\[2, 3, 7\\]"),
        ("hx dims batched", lambda: (torch.randn(5, 3, 6), (torch.randn(3, 8), torch.randn(3, 8))),
         RuntimeError, "For batched 3-D input, hx and cx should also be 3-D but got \\(2-D, 2-D\\)"),
        ("hx dims unbatched", lambda: (torch.randn(5, 6), (torch.randn(LD, 1, 8), torch.randn(LD, 1, 8))),
         RuntimeError, "For unbatched 2-D input, hx and cx should also be 2-D but got \\(3-D, 3-D\\)"),
        ("empty sequence", lambda: (torch.randn(0, 3, 6),), RuntimeError,
         "Expected sequence length to be larger than 0 in RNN"),
        ("hx device", lambda: (torch.randn(5, 3, 6), (torch.randn(LD, 3, 8, device="meta"),
                                                     torch.randn(LD, 3, 8))),
         RuntimeError, "Input and hidden tensors are not at the same device"),
    ]


@pytest.mark.parametrize("name,args,error,match", _errors(), ids=[e[0] for e in _errors()])
def test_errors_match_nn(name, args, error, match):
    ours = fused_lstm.LSTM(6, 8, num_layers=2)
    with pytest.raises(error, match=match):
        ours(*args())
    if name != "hx device":  # nn.LSTM's own check there comes from its kernels, in other words
        with pytest.raises(error, match=match):
            nn.LSTM(6, 8, num_layers=2)(*args())


def test_parameter_device_mismatch():
    ours = fused_lstm.LSTM(6, 8)
    ours.weight_hh_l0 = nn.Parameter(torch.randn(32, 8, device="meta"))
    with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device"):
        ours(torch.randn(5, 3, 6))


class _Scale(nn.Module):
    def forward(self, w):
        return 0.5 * w


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_parametrized_weight_is_used(grad):
    # A parametrization replaces the registered parameter with a computed one: the
    # module must read the computed weight (and differentiate through it) as nn.LSTM does.
    from torch.nn.utils import parametrize
    ref = nn.LSTM(6, 8, num_layers=2, dtype=torch.float64)
    ours = fused_lstm.LSTM(6, 8, num_layers=2, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    for m in (ref, ours):
        parametrize.register_parametrization(m, "weight_hh_l1", _Scale())
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        got, expected = ours(x), ref(x)
    for a, e in zip((got[0], *got[1]), (expected[0], *expected[1])):
        assert_close(a, e)
    if grad:
        got[0].sum().backward()
        expected[0].sum().backward()
        assert_close(ours.parametrizations.weight_hh_l1.original.grad,
                     ref.parametrizations.weight_hh_l1.original.grad)


def test_activation_checkpointing():
    # torch.utils.checkpoint (non-reentrant: saved-tensor hooks) drops what the stack's
    # node saves and recomputes it in backward: the same gradients as nn.LSTM.
    ref = nn.LSTM(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = fused_lstm.LSTM(5, 7, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.linspace(-1, 1, 14, dtype=torch.float64)

    def grads(module, checkpointed):
        module.zero_grad()
        x.grad = None
        run = lambda inp: module(inp)[0]
        out = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False) if checkpointed else run(x)
        (out * weights).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]

    for a, e in zip(grads(ours, True), grads(ref, False)):
        assert_close(a, e)
