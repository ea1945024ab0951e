"""TorchScript: torch.jit.script and torch.jit.trace of fused_lstm modules and of models
holding them. The scripted code must run the fused ops (not aten::lstm), give nn.LSTM's
outputs and gradients, take Tensor and PackedSequence input, and survive save / load."""
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_lstm
from testing import assert_close, lstm_outputs_and_grads, random_like_weights, random_tensor

CONFIGS = [
    dict(num_layers=2, batch_first=True),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=1, bias=False, proj_size=3),
    dict(num_layers=3, bidirectional=True, batch_first=True, proj_size=4),
]


def pair(I, H, dtype=torch.float64, seed=0, **kwargs):
    ours = fused_lstm.LSTM(I, H, dtype=dtype, **kwargs)
    random_like_weights(ours, seed)
    ref = nn.LSTM(I, H, dtype=dtype, **kwargs)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def graph_text(method):
    # Calls into other methods and functions inlined: the ops the method runs.
    return str(method.inlined_graph)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
@pytest.mark.parametrize("form", ["dense", "packed-unsorted"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx"])
def test_scripted_lstm_matches_nn_lstm(kwargs, form, with_hx):
    ours, ref = pair(5, 6, **kwargs)
    scripted = torch.jit.script(ours)
    # The scripted forwards run the fused stack op.
    assert "fused_lstm::lstm_stack" in graph_text(scripted.forward_tensor)
    assert "fused_lstm::lstm_stack" in graph_text(scripted.forward_packed)
    gen = torch.Generator().manual_seed(1)
    T, B = 7, 4
    x = random_tensor((B, T, 5) if ours.batch_first else (T, B, 5), torch.float64, gen)
    hx = None
    if with_hx:
        D = 2 if ours.bidirectional else 1
        P = ours.proj_size or ours.hidden_size
        hx = (random_tensor((ours.num_layers * D, B, P), torch.float64, gen),
              random_tensor((ours.num_layers * D, B, 6), torch.float64, gen))
    lengths = [7, 3, 5, 2] if form == "packed-unsorted" else None
    args = dict(hx=hx, lengths=lengths, enforce_sorted=False)
    got, got_grads = lstm_outputs_and_grads(scripted, x, **args)
    want, want_grads = lstm_outputs_and_grads(ref, x, **args)
    for name, a, b in zip(["output", "h_n", "c_n"], got, want):
        assert_close(a, b, what=name)
    assert len(got_grads) == len(want_grads)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert_close(a, b, what=f"gradient {i}")


def test_scripted_lstm_gives_packed_output_for_packed_input():
    ours, _ = pair(5, 6, batch_first=True)
    scripted = torch.jit.script(ours)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    out, _ = scripted(pack_padded_sequence(x, [4, 2, 1], batch_first=True))
    assert isinstance(out, PackedSequence)
    out, _ = scripted(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 4, 6)


class Seed(nn.Module):
    """The reference program's model, with the packing inside the scripted code."""

    def __init__(self):
        super().__init__()
        self.lstm = fused_lstm.LSTM(10, 20, num_layers=2, batch_first=True)
        self.head = nn.Linear(20, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        return self.head(y[:, -1])

    @torch.jit.export
    def packed(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(pack_padded_sequence(x, lengths, batch_first=True,
                                                     enforce_sorted=False))
        return self.head(h_n[-1])


def test_script_a_model_holding_the_module():
    torch.manual_seed(0)
    model = Seed()
    scripted = torch.jit.script(model)
    # The model's code calls our TorchScript forwards, by the argument's type.
    assert "forward_tensor" in scripted.code
    assert "forward_packed" in scripted.packed.code
    x = torch.randn(32, 5, 10)
    lengths = torch.tensor([5, 3, 4, 1] * 8)
    for run in (lambda m: m(x), lambda m: m.packed(x, lengths)):
        model.zero_grad()
        want = run(model)
        want.square().sum().backward()
        want_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        got = run(scripted)
        got.square().sum().backward()
        assert_close(got, want, what="output")
        for p, g in zip(model.parameters(), want_grads):
            assert_close(p.grad, g, what="gradient")


def test_scripted_model_saves_and_loads():
    torch.manual_seed(0)
    model = Seed().eval()
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = torch.randn(4, 6, 10)
    assert_close(loaded(x), model(x), what="loaded output")
    assert_close(loaded.packed(x, torch.tensor([6, 2, 3, 1])),
                 model.packed(x, torch.tensor([6, 2, 3, 1])), what="loaded packed output")


def test_scripted_lstm_dropout_between_layers_matches_eager():
    # Training with dropout: the per-layer path, the same random masks as eager.
    ours = fused_lstm.LSTM(5, 6, num_layers=3, dropout=0.5).train()
    scripted = torch.jit.script(ours)
    x = torch.randn(4, 3, 5)
    torch.manual_seed(7)
    want = ours(x)[0]
    torch.manual_seed(7)
    got = scripted(x)[0]
    assert "fused_lstm::lstm_layer" in graph_text(scripted.forward_tensor)
    assert_close(got, want, what="output")


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx"])
def test_scripted_cell_matches_nn_cell(batched, with_hx):
    ours = fused_lstm.LSTMCell(5, 6, dtype=torch.float64)
    random_like_weights(ours, 3)
    ref = nn.LSTMCell(5, 6, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    scripted = torch.jit.script(ours)
    assert "fused_lstm::lstm_layer" in graph_text(scripted.forward)
    gen = torch.Generator().manual_seed(2)
    shape = (3,) if batched else ()
    x = random_tensor(shape + (5,), torch.float64, gen)
    hx = (random_tensor(shape + (6,), torch.float64, gen),
          random_tensor(shape + (6,), torch.float64, gen)) if with_hx else None
    for a, b in zip(scripted(x, hx), ref(x, hx)):
        assert_close(a, b)


def test_trace_runs_the_fused_op_and_generalises_over_sizes():
    torch.manual_seed(0)
    model = Seed()
    x = torch.randn(8, 5, 10)
    with pytest.warns(torch.jit.TracerWarning):  # as nn.LSTM's trace warns
        traced = torch.jit.trace(model, x)
    assert "fused_lstm::lstm_stack" in graph_text(traced.forward)
    # Sizes are read from the input at run time, so other lengths and batches run.
    for shape in [(8, 5, 10), (3, 9, 10), (1, 2, 10)]:
        x = torch.randn(shape)
        assert_close(traced(x), model(x), what=f"traced output at {shape}")
