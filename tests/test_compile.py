"""torch.compile of models holding fused_lstm modules, whole-graph (fullgraph=True, a
graph break fails the test), on the default inductor backend: outputs and gradients equal
eager, and with dynamic=True no recompile for new lengths and batch sizes.

Dynamo refuses every nn.LSTM instance (ours subclass it) unless
torch._dynamo.config.allow_rnn is set: the opt-in the README documents, set here only
inside each test with config.patch."""
import pytest
import torch
import torch._dynamo
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from testing import assert_close


@pytest.fixture(autouse=True, scope="module")
def fresh_inductor_cache(tmp_path_factory):
    # Inductor's on-disk caches are not keyed on ATEN_CPU_CAPABILITY: code compiled in a
    # run on the AVX2 build was reused by .ci/run's ATEN_CPU_CAPABILITY=default pass and
    # failed to compile there ('at::vec' has not been declared; torch 2.13). A cache of
    # this module's own keeps the runs apart.
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor_cache")))
    yield
    mp.undo()


class Seed(nn.Module):
    """The reference program's model: 2-layer LSTM(10, 20), batch_first, a Linear head on
    the last step, or on h_n for a PackedSequence (packed outside the compiled model:
    dynamo does not trace pack_padded_sequence)."""

    def __init__(self):
        super().__init__()
        self.lstm = fused_lstm.LSTM(10, 20, num_layers=2, batch_first=True)
        self.head = nn.Linear(20, 1)

    def forward(self, x):
        if isinstance(x, torch.Tensor):
            y, _ = self.lstm(x)
            return self.head(y[:, -1])
        _, (h_n, _) = self.lstm(x)
        return self.head(h_n[-1])


class Cells(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = fused_lstm.LSTMCell(10, 20)

    def forward(self, x):
        h = c = torch.zeros(x.shape[0], 20)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return h.sum(1, keepdim=True)


def run(model, x, lengths=None):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    inp = x if lengths is None else pack_padded_sequence(x, lengths, batch_first=True,
                                                          enforce_sorted=False)
    out = model(inp)
    out.square().sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in model.parameters()]


def test_fullgraph_needs_the_allow_rnn_opt_in():
    # What the README says: without the opt-in dynamo refuses any nn.LSTM, ours too.
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="Attempted to wrap RNN"):
        torch.compile(Seed(), fullgraph=True)(torch.randn(2, 3, 10))


@pytest.mark.parametrize("model_cls,kind", [(Seed, "dense"), (Seed, "packed"), (Cells, "dense")],
                         ids=["lstm-dense", "lstm-packed-unsorted", "cell"])
def test_compile_fullgraph_matches_eager(model_cls, kind):
    torch.manual_seed(0)
    model = model_cls()
    x = torch.randn(32, 5, 10)
    lengths = torch.randint(1, 6, (32,)) if kind == "packed" else None
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, fullgraph=True)
        got = run(compiled, x, lengths)
    for a, e in zip(got, run(model, x, lengths)):
        assert_close(a, e)


def test_compile_fullgraph_under_cpu_autocast():
    # The CPU autocast rule (functional._cpu_autocast_dtype) reads autocast and oneDNN
    # state inside the graph: whole-graph, bfloat16 results equal to eager's, then float32
    # again once autocast is off (a guard, not the bfloat16 graph replayed).
    torch.manual_seed(0)
    lstm = fused_lstm.LSTM(10, 20, num_layers=2, batch_first=True)
    x = torch.randn(32, 5, 10)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(lstm, fullgraph=True)
        for dtype, autocast in ((torch.bfloat16, True), (torch.float32, False)):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                got, want = compiled(x), lstm(x)
            for a, e in zip([got[0], *got[1]], [want[0], *want[1]]):
                assert a.dtype == dtype and torch.equal(a, e)


def test_compile_dynamic_does_not_recompile():
    torch.manual_seed(0)
    model = Seed()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
        run(compiled, torch.randn(32, 5, 10))
        # New lengths and batch sizes run the graph already compiled. (Batches above 12:
        # inductor's decomposition of the head's matmul guards on batch + 20 > 32.)
        with torch.compiler.set_stance("fail_on_recompile"):
            for batch, steps in [(32, 9), (17, 5), (20, 13)]:
                x = torch.randn(batch, steps, 10)
                for a, e in zip(run(compiled, x), run(model, x)):
                    assert_close(a, e)


def test_torch_export_keeps_the_fused_op_over_dynamic_sizes(tmp_path):
    # torch.export (strict=False, its default, and no allow_rnn needed): the program holds
    # our op, runs at other batch sizes and lengths, and survives save / load.
    torch.manual_seed(0)
    model = fused_lstm.LSTM(5, 6, num_layers=2, batch_first=True, bidirectional=True,
                            proj_size=3).eval()
    dims = ({0: torch.export.Dim("B"), 1: torch.export.Dim("T")},)
    program = torch.export.export(model, (torch.randn(4, 7, 5),), dynamic_shapes=dims)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.fused_lstm.lstm_stack.default in targets, targets
    torch.export.save(program, str(tmp_path / "lstm.pt2"))
    loaded = torch.export.load(str(tmp_path / "lstm.pt2"))
    for shape in [(4, 7, 5), (3, 9, 5), (1, 2, 5)]:
        x = torch.randn(shape)
        with torch.no_grad():
            want, (h, c) = model(x)
        for module in (program.module(), loaded.module()):
            got, (gh, gc) = module(x)
            for a, e in zip([got, gh, gc], [want, h, c]):
                assert_close(a, e)
