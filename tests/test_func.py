"""torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, hessian) and forward-mode AD
(torch.autograd.forward_ad) through fused_lstm modules, as through nn.LSTM: the same
results in float64. A C++ autograd node supports neither, so there the ops run as ATen
ops (ops/recompute.h); these fail without that path ("cannot use C++
torch::autograd::Function with functorch transforms", or a tangent dropped). vmap is
unsupported by nn.LSTM too ("Batching rule not implemented")."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from testing import assert_close, random_like_weights

CONFIGS = [dict(), dict(num_layers=2, bidirectional=True), dict(num_layers=2, proj_size=3),
           dict(batch_first=True, bias=False)]


def pair(cls_ours, cls_ref, *args, **kwargs):
    torch.manual_seed(0)
    ref = cls_ref(*args, **kwargs).double()
    random_like_weights(ref, seed=1)
    ours = cls_ours(*args, **kwargs).double()
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def inputs(batch_first=False, **_):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)  # [T, B, I]
    return x.transpose(0, 1).contiguous() if batch_first else x


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_func_grad_of_parameters(kwargs):
    # The meta-learning pattern: torch.func.grad of a loss over the parameters as a dict.
    ours, ref = pair(fused_lstm.LSTM, nn.LSTM, 5, 4, **kwargs)
    x = inputs(**kwargs)

    def loss(module):
        return lambda params: functional_call(module, params, (x,))[0].square().sum()

    got = grad(loss(ours))(dict(ours.named_parameters()))
    want = grad(loss(ref))(dict(ref.named_parameters()))
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], what=name)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_func_vjp_jacrev_of_input_and_state(kwargs):
    ours, ref = pair(fused_lstm.LSTM, nn.LSTM, 5, 4, **kwargs)
    x = inputs(**kwargs)
    layers = ours.num_layers * (2 if ours.bidirectional else 1)
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(layers, 3, ours.proj_size or 4, generator=g, dtype=torch.float64)
    c0 = torch.randn(layers, 3, 4, generator=g, dtype=torch.float64)

    def run(module):
        return lambda x, h0, c0: torch.cat([t.flatten() for t in
                                            [module(x, (h0, c0))[0], *module(x, (h0, c0))[1]]])

    out, pull = vjp(run(ours), x, h0, c0)
    out_ref, pull_ref = vjp(run(ref), x, h0, c0)
    assert_close(out, out_ref)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, e in zip(pull(weights), pull_ref(weights)):
        assert_close(a, e)
    assert_close(jacrev(run(ours))(x, h0, c0), jacrev(run(ref))(x, h0, c0))


def test_func_forward_mode_and_second_order():
    ours, ref = pair(fused_lstm.LSTM, nn.LSTM, 5, 4, num_layers=2)
    x = inputs()
    tangent = torch.randn_like(x)
    for transform in (lambda f: jvp(f, (x,), (tangent,)), lambda f: jacfwd(f)(x)):
        got = transform(lambda x: ours(x)[0])
        want = transform(lambda x: ref(x)[0])
        for a, e in zip(got if isinstance(got, tuple) else [got],
                        want if isinstance(want, tuple) else [want]):
            assert_close(a, e)
    # hessian of a scalar (forward over reverse), and grad of grad.
    assert_close(hessian(lambda x: ours(x)[0].tanh().sum())(x),
                 hessian(lambda x: ref(x)[0].tanh().sum())(x))
    assert_close(grad(lambda x: grad(lambda y: ours(y)[0].square().sum())(x).sin().sum())(x),
                 grad(lambda x: grad(lambda y: ref(y)[0].square().sum())(x).sin().sum())(x))


@pytest.mark.parametrize("no_grad", [False, True], ids=["grad_mode", "no_grad"])
def test_forward_ad_tangents(no_grad):
    # Tangents on the input and on a weight; under no_grad too, where the op would otherwise
    # take its inference path and return no tangent.
    ours, ref = pair(fused_lstm.LSTM, nn.LSTM, 5, 4, num_layers=2, bidirectional=True)
    x = inputs()
    g = torch.Generator().manual_seed(4)
    x_tangent = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w_tangent = torch.randn(ref.weight_hh_l1.shape, generator=g, dtype=torch.float64)
    results = []
    for module in (ours, ref):
        with fwAD.dual_level(), torch.set_grad_enabled(not no_grad):
            params = dict(module.named_parameters())
            params["weight_hh_l1"] = fwAD.make_dual(params["weight_hh_l1"].detach(), w_tangent)
            out, (h_n, c_n) = functional_call(module, params, (fwAD.make_dual(x, x_tangent),))
            results.append([fwAD.unpack_dual(t) for t in (out, h_n, c_n)])
    for (p, t), (p_ref, t_ref) in zip(*results):
        assert t is not None
        assert_close(p, p_ref)
        assert_close(t, t_ref)


def test_func_through_packed_input_and_dropout_layers():
    # Packed (unsorted) input, and dropout between layers (a layer op a layer, from
    # Python): torch.func.grad equals ordinary autograd of the same module.
    torch.manual_seed(0)
    ours = fused_lstm.LSTM(5, 4, num_layers=3, dropout=0.4, bidirectional=True).double()
    random_like_weights(ours, seed=1)
    x = inputs()
    lengths = torch.tensor([2, 4, 3])

    def loss(params):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h_n, c_n) = functional_call(ours, params, (packed,))
        return out.data.square().sum() + h_n.sum() + c_n.sin().sum()

    params = dict(ours.named_parameters())
    torch.manual_seed(5)
    got = grad(loss)(params)
    torch.manual_seed(5)
    want = torch.autograd.grad(loss(params), list(params.values()))
    for (name, a), e in zip(got.items(), want):
        assert_close(a, e, what=name)


def test_func_grad_of_lstm_cell_and_functional_layer():
    ours, ref = pair(fused_lstm.LSTMCell, nn.LSTMCell, 5, 4)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    h = torch.randn(3, 4, generator=g, dtype=torch.float64)
    c = torch.randn(3, 4, generator=g, dtype=torch.float64)
    cell = lambda m: lambda x, h, c: sum(t.square().sum() for t in m(x, (h, c)))
    for a, e in zip(grad(cell(ours), argnums=(0, 1, 2))(x, h, c),
                    grad(cell(ref), argnums=(0, 1, 2))(x, h, c)):
        assert_close(a, e)
    # fused_lstm.functional.lstm_layer (the lstm_layer op) against its own autograd.
    w_ih, w_hh, b_ih, b_hh = ours.weight_ih, ours.weight_hh, ours.bias_ih, ours.bias_hh
    seq = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    layer = lambda w: fused_lstm.functional.lstm_layer(seq, (h, c), w_ih, w, b_ih, b_hh,
                                                       reverse=True)[0].square().sum()
    w = w_hh.detach().requires_grad_()
    assert_close(grad(layer)(w_hh.detach()), torch.autograd.grad(layer(w), w)[0])


def test_func_keeps_the_ops_checks():
    # Under a transform batch_sizes arrives wrapped (no storage): the op still reads and
    # checks it, and rejects what it rejects without one.
    g = torch.Generator().manual_seed(7)
    data = torch.randn(6, 5, generator=g, dtype=torch.float64)
    h, c = torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    w_ih = torch.randn(16, 5, generator=g, dtype=torch.float64)
    w_hh = torch.randn(16, 4, generator=g, dtype=torch.float64)

    def layer(batch_sizes):
        return lambda w: fused_lstm.functional.lstm_layer(
            data, (h, c), w_ih, w, batch_sizes=batch_sizes)[0].sum()

    w = w_hh.clone().requires_grad_()
    good = torch.tensor([3, 2, 1])
    assert_close(grad(layer(good))(w_hh), torch.autograd.grad(layer(good)(w), w)[0])
    for bad, message in [(torch.tensor([1, 2, 3]), "non-increasing batch_sizes"),
                         (torch.tensor([3, 2, 1], dtype=torch.int32), "1-D int64 CPU tensor"),
                         (torch.tensor([3, 2]), "batch_sizes sum to 5"),
                         (torch.tensor([3, 2, 2]), "batch_sizes sum to 7")]:
        for run in (lambda: grad(layer(bad))(w_hh), lambda: layer(bad)(w)):
            with pytest.raises(RuntimeError, match=message):
                run()


def test_vmap_is_unsupported_like_nn_lstm():
    ours, ref = pair(fused_lstm.LSTM, nn.LSTM, 5, 4)
    xs = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    for module in (ours, ref):
        with pytest.raises(RuntimeError, match="Batching rule not implemented"):
            torch.vmap(lambda x: module(x)[0])(xs)
