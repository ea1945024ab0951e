"""ONNX export: torch.onnx.export(model, args, dynamo=True) of models holding fused_lstm
modules gives standard ONNX LSTM nodes, and onnxruntime's outputs match nn.LSTM's, at the
exported sizes and at others (dynamic batch and length). What ONNX cannot express
(projections, PackedSequence) and the legacy exporter raise errors that say so."""
import pytest
import torch
from torch import nn
from torch.export import Dim

import fused_lstm
from testing import assert_close, random_like_weights

ort = pytest.importorskip("onnxruntime", reason="the test install (README) brings onnxruntime")
onnx = pytest.importorskip("onnx", reason="the test install (README) brings onnx")
pytest.importorskip("onnxscript", reason="torch.onnx's exporter needs onnxscript")


class Head(nn.Module):
    """An LSTM and a Linear head on the last step; returns (head, h_n, c_n)."""

    def __init__(self, lstm_cls, **kwargs):
        super().__init__()
        self.lstm = lstm_cls(5, 6, **kwargs)
        self.head = nn.Linear(6 * (2 if self.lstm.bidirectional else 1), 2)

    def forward(self, x, h0=None, c0=None):
        out, (h_n, c_n) = self.lstm(x, None if h0 is None else (h0, c0))
        last = out[:, -1] if self.lstm.batch_first else out[-1]
        return self.head(last), h_n, c_n


def reference(model, kwargs):
    """The same model with nn.LSTM holding the same weights."""
    ref = Head(nn.LSTM, **kwargs).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def export(model, args, tmp_path, dynamic_shapes=None):
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, args, str(path), dynamo=True, dynamic_shapes=dynamic_shapes,
                      verbose=False)
    graph = onnx.load(str(path)).graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*tensors):
        return [torch.from_numpy(a) for a in
                session.run(None, {n: t.numpy() for n, t in zip(names, tensors)})]
    return graph, run


def op_types(graph):
    return [node.op_type for node in graph.node]


CONFIGS = [
    dict(),
    dict(num_layers=2, batch_first=True),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, bidirectional=True, batch_first=True, bias=False),
    dict(num_layers=2, dropout=0.3),  # eval: no dropout, as nn.LSTM
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx"])
def test_onnx_export_matches_nn_lstm(kwargs, with_hx, tmp_path):
    model = Head(fused_lstm.LSTM, **kwargs).eval()
    random_like_weights(model, 0)
    ref = reference(model, kwargs)
    L = model.lstm.num_layers * (2 if model.lstm.bidirectional else 1)
    batch_first = model.lstm.batch_first

    def inputs(T, B):
        x = torch.randn((B, T, 5) if batch_first else (T, B, 5))
        return (x, torch.randn(L, B, 6), torch.randn(L, B, 6)) if with_hx else (x,)

    T, B = Dim("T"), Dim("B")
    dynamic = [{0: B, 1: T} if batch_first else {0: T, 1: B}]
    if with_hx:
        dynamic += [{1: B}, {1: B}]
    torch.manual_seed(0)
    graph, run = export(model, inputs(7, 4), tmp_path, tuple(dynamic))
    types = op_types(graph)
    assert types.count("LSTM") == L, types
    assert all(node.domain in ("", "ai.onnx") for node in graph.node), "a non-standard op"
    for sizes in [(7, 4), (3, 9), (11, 2)]:
        args = inputs(*sizes)
        with torch.no_grad():
            want = ref(*args)
        for name, got, w in zip(["head", "h_n", "c_n"], run(*args), want):
            assert_close(got, w, what=f"{name} at (T, B) = {sizes}")


@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx"])
def test_onnx_export_of_a_cell_matches_nn_cell(with_hx, tmp_path):
    cell = fused_lstm.LSTMCell(5, 6).eval()
    random_like_weights(cell, 1)
    ref = nn.LSTMCell(5, 6).eval()
    ref.load_state_dict(cell.state_dict())

    class Step(nn.Module):
        def __init__(self, cell):
            super().__init__()
            self.cell = cell

        def forward(self, x, h=None, c=None):
            return self.cell(x, None if h is None else (h, c))

    args = (torch.randn(3, 5),) + ((torch.randn(3, 6), torch.randn(3, 6)) if with_hx else ())
    graph, run = export(Step(cell), args, tmp_path)
    assert op_types(graph).count("LSTM") == 1
    with torch.no_grad():
        want = Step(ref)(*args)
    for got, w in zip(run(*args), want):
        assert_close(got, w)


def test_onnx_export_of_unbatched_input(tmp_path):
    lstm = fused_lstm.LSTM(5, 6, num_layers=2).eval()
    ref = nn.LSTM(5, 6, num_layers=2).eval()
    ref.load_state_dict(lstm.state_dict())
    x = torch.randn(4, 5)
    _, run = export(lstm, (x,), tmp_path)
    got = run(x)
    with torch.no_grad():
        out, (h, c) = ref(x)
    for g, w in zip(got, [out, h, c]):
        assert_close(g, w)


def test_onnx_export_of_a_projection_says_it_is_unsupported(tmp_path):
    model = Head(fused_lstm.LSTM, proj_size=3).eval()
    model.head = nn.Linear(3, 2)
    with pytest.raises(Exception, match="proj_size > 0 is not supported"):
        torch.onnx.export(model, (torch.randn(4, 2, 5),), str(tmp_path / "m.onnx"), dynamo=True)


def test_onnx_export_of_packed_input_says_it_is_unsupported(tmp_path):
    lstm = fused_lstm.LSTM(5, 6).eval()

    class Packed(nn.Module):
        def forward(self, data, batch_sizes):
            out, _ = lstm(torch.nn.utils.rnn.PackedSequence(data, batch_sizes))
            return out.data

    with pytest.raises(Exception, match="PackedSequence input is not supported"):
        torch.onnx.export(Packed(), (torch.randn(6, 5), torch.tensor([3, 2, 1])),
                          str(tmp_path / "m.onnx"), dynamo=True)


def test_legacy_onnx_exporter_says_to_use_dynamo(tmp_path):
    lstm = fused_lstm.LSTM(5, 6).eval()
    with pytest.raises(Exception, match=r"dynamo=True"):
        torch.onnx.export(lstm, (torch.randn(4, 2, 5),), str(tmp_path / "m.onnx"), dynamo=False)
