"""fused_lstm.convert / revert: every nn.LSTM and nn.LSTMCell of a model swapped in place,
keeping parameters, hooks, parametrizations, mode; unknown subclasses left alone."""
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import fused_lstm
from testing import assert_close


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True)
        self.blocks = nn.ModuleList([nn.LSTM(16, 5, proj_size=3)])
        self.cell = nn.LSTMCell(3, 7)
        self.head = nn.Linear(7, 2)

    def forward(self, x):
        y, _ = self.lstm(self.encoder(x))
        y, _ = self.blocks[0](y.transpose(0, 1))
        h = c = None
        for t in range(y.shape[0]):
            h, c = self.cell(y[t], None if h is None else (h, c))
        return self.head(h)


class Halve(nn.Module):
    def forward(self, w):
        return w * 0.5


def run(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return [out.detach()] + [p.grad.clone() for p in model.parameters()]


def test_convert_swaps_in_place_and_keeps_state():
    torch.manual_seed(0)
    model = Model().double()
    model.train(False)
    parametrize.register_parametrization(model.lstm, "weight_hh_l0", Halve())
    seen = []
    model.lstm.register_forward_hook(lambda m, i, o: seen.append(isinstance(m, fused_lstm.LSTM)))
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    expected = run(model, x)
    params_before = list(model.parameters())
    lstm, cell = model.lstm, model.cell
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    assert fused_lstm.convert(model) is model
    assert model.lstm is lstm and model.cell is cell  # the same objects
    assert type(model.blocks[0]) is fused_lstm.LSTM
    assert type(model.cell) is fused_lstm.LSTMCell
    assert isinstance(model.lstm, fused_lstm.LSTM) and isinstance(model.lstm, nn.LSTM)
    assert parametrize.is_parametrized(model.lstm, "weight_hh_l0")
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    assert not model.training and model.lstm.weight_ih_l0.dtype == torch.float64
    got = run(model, x)
    assert seen == [False, True]  # the hook ran before and after the swap
    for a, e in zip(got, expected):
        assert_close(a, e)
    # The optimizer built before steps the module's parameters.
    before = model.lstm.weight_ih_l0.detach().clone()
    opt.step()
    assert not torch.equal(before, model.lstm.weight_ih_l0)

    # After the parametrization is removed, the module stays fused.
    parametrize.remove_parametrizations(model.lstm, "weight_hh_l0")
    assert type(model.lstm) is fused_lstm.LSTM

    expected = run(model, x)
    assert fused_lstm.revert(model) is model
    assert type(model.lstm) is nn.LSTM and type(model.cell) is nn.LSTMCell
    assert type(model.blocks[0]) is nn.LSTM
    for a, e in zip(run(model, x), expected):
        assert_close(a, e)


def test_convert_the_module_itself_and_revert_a_parametrized_one():
    lstm = nn.LSTM(3, 4)
    parametrize.register_parametrization(lstm, "weight_ih_l0", Halve())
    assert type(fused_lstm.convert(lstm)).__bases__[0] is fused_lstm.LSTM
    x = torch.randn(2, 1, 3)
    out = lstm(x)[0]
    fused_lstm.revert(lstm)
    assert type(lstm).__bases__[0] is nn.LSTM
    assert_close(lstm(x)[0], out.detach())


def test_unknown_subclasses_are_left_alone_with_a_warning():
    class MyLSTM(nn.LSTM):
        pass

    model = nn.Sequential(MyLSTM(3, 4), nn.LSTM(3, 4), fused_lstm.LSTM(3, 4))
    with pytest.warns(UserWarning, match=r"left alone 1 subclass\(es\).*MyLSTM"):
        fused_lstm.convert(model)
    assert type(model[0]) is MyLSTM
    assert type(model[1]) is fused_lstm.LSTM and type(model[2]) is fused_lstm.LSTM
    # Nothing unknown: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_lstm.convert(nn.Sequential(nn.LSTM(3, 4)))
