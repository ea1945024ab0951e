"""fused_lstm.LSTM against torch.nn.LSTM with the same weights: outputs, final
states and the gradients of input, h0, c0 and every parameter. The reference grids
run on every device (conftest.py's DEVICES: each CPU code path, and CUDA); the rest
on each CPU code path. CUDA-only checks are in test_cuda.py."""
import itertools
import zlib

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from conftest import CPU_CAPABILITIES
from testing import TOLERANCES, assert_close, lstm_outputs, lstm_outputs_and_grads, random_like_weights


# The tests below the grids run once per CPU code path (conftest.py).
on_each_cpu_path = pytest.mark.usefixtures("cpu_path")

I, H = 6, 8
SHAPES = {"T5-B3": (5, 3), "B1": (4, 1), "T1": (1, 3)}
INPUT_KINDS = ["dense", "unbatched", "packed_sorted", "packed_unsorted"]


def _lengths(T, B, sorted_, gen):
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[torch.randint(0, B, (1,), generator=gen)] = T  # the longest is T
    return lengths.sort(descending=True).values if sorted_ else lengths


def _random(shape, dtype, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def run_and_compare(device, dtype, num_layers, bidirectional, batch_first, bias, proj_size, kind,
                    give_hx, T, B, seed=0):
    """On CUDA the reference is nn.LSTM on the CPU in float64 (cuDNN's own float32 error
    exceeds the float32 tolerance: test_cuda.py), compared at `dtype`'s tolerance."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = dict(input_size=I, hidden_size=H, num_layers=num_layers, bias=bias,
                  batch_first=batch_first, bidirectional=bidirectional, proj_size=proj_size)
    ref = nn.LSTM(**kwargs, dtype=dtype)
    random_like_weights(ref, seed)
    ours = fused_lstm.LSTM(**kwargs, dtype=dtype, device=device)
    ours.load_state_dict(ref.state_dict())
    if device != "cpu":
        ref = ref.double()

    LD, P = num_layers * (2 if bidirectional else 1), proj_size or H
    packed = kind.startswith("packed")
    if kind == "unbatched":
        x = _random((T, I), dtype, gen)
        hx = (_random((LD, P), dtype, gen), _random((LD, H), dtype, gen))
    else:
        x = _random((B, T, I) if batch_first else (T, B, I), dtype, gen)
        hx = (_random((LD, B, P), dtype, gen), _random((LD, B, H), dtype, gen))
    lengths = _lengths(T, B, kind == "packed_sorted", gen) if packed else None

    def inputs(on, as_dtype):
        return (x.to(on, as_dtype),
                tuple(h.to(on, as_dtype) for h in hx) if give_hx else None)

    def run(module, on, as_dtype):
        return lstm_outputs_and_grads(module, *inputs(on, as_dtype), lengths,
                                      enforce_sorted=kind == "packed_sorted", seed=seed)

    def check(a, e, what):
        assert a.device.type == device, f"{what}: on {a.device}, expected {device}"
        assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
        assert_close(a.cpu().to(e.dtype), e, dtype=dtype, what=what)

    ref_dtype = dtype if device == "cpu" else torch.float64
    (ref_out, ref_grads), (our_out, our_grads) = run(ref, "cpu", ref_dtype), run(ours, device, dtype)
    for name, a, e in zip(["output", "h_n", "c_n"], our_out, ref_out):
        check(a, e, name)
    # Inference (no_grad) runs its own op, without the workspace: the same results.
    inference = lstm_outputs(ours, *inputs(device, dtype), lengths,
                             enforce_sorted=kind == "packed_sorted")
    for name, a, e in zip(["output", "h_n", "c_n"], inference, ref_out):
        check(a, e, f"no_grad {name}")
    names = ["input"] + (["h0", "c0"] if give_hx else []) + [n for n, _ in ref.named_parameters()]
    assert len(our_grads) == len(ref_grads) == len(names)
    for name, a, e in zip(names, our_grads, ref_grads):
        check(a, e, f"grad {name}")


GRID = list(itertools.product([1, 2, 3], [False, True], [False, True], [False, True], [0, 3],
                              INPUT_KINDS, [False, True], SHAPES))


def _id(case):
    layers, bidir, bf, bias, proj, kind, hx, shape = case
    return (f"L{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tm'}-"
            f"{'bias' if bias else 'nobias'}-proj{proj}-{kind}-{'hx' if hx else 'nohx'}-{shape}")


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_lstm_matches_nn_float64(device, case):
    layers, bidir, bf, bias, proj, kind, hx, shape = case
    run_and_compare(device, torch.float64, layers, bidir, bf, bias, proj, kind, hx, *SHAPES[shape],
                    seed=zlib.crc32(repr(case).encode()) % 10000)


GRID32 = list(itertools.product([1, 2], [False, True], [False, True], [0, 3], INPUT_KINDS, SHAPES))


@pytest.mark.parametrize("case", GRID32, ids=["-".join(map(str, c)) for c in GRID32])
def test_lstm_matches_nn_float32(device, case):
    layers, bidir, bf, proj, kind, shape = case
    run_and_compare(device, torch.float32, layers, bidir, bf, True, proj, kind, True, *SHAPES[shape],
                    seed=zlib.crc32(repr(case).encode()) % 10000)


def _larger_case_results(module, x):
    x = x.clone().requires_grad_()
    out, (h, c) = module(x)
    loss = out.pow(2).sum() + h.sum() + c.sum()
    return (out, h, c) + torch.autograd.grad(loss, [x] + list(module.parameters()))


@on_each_cpu_path
def test_lstm_larger_shape_float64():
    # Sizes past a few SIMD widths and BLAS blocks, with a ragged hidden size.
    gen = torch.Generator().manual_seed(3)
    ref = nn.LSTM(37, 53, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = fused_lstm.LSTM(37, 53, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = _random((20, 33, 37), torch.float64, gen)
    for a, e in zip(_larger_case_results(ours, x), _larger_case_results(ref, x)):
        assert_close(a, e)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hidden,batch", [(40, 1), (56, 3), (40, 5), (56, 8)])
@on_each_cpu_path
def test_small_batch_gemm_blocks(dtype, hidden, batch):
    # Batches of 1-8 run the per-step GEMMs through small_gemm (cpu_path "small" and
    # "auto"): 4-row blocks, then the rows left over in 8-, 4- and 2-vector column
    # blocks. 4H = 160 and 224 columns (and P = H in backward) hit each block width,
    # full and masked; a packed batch shrinks through every row count.
    gen = torch.Generator().manual_seed(hidden + batch)
    ref = nn.LSTM(7, hidden, dtype=dtype)
    random_like_weights(ref, hidden)
    ours = fused_lstm.LSTM(7, hidden, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = _random((6, batch, 7), dtype, gen)
    for a, e in zip(_larger_case_results(ours, x), _larger_case_results(ref, x)):
        assert_close(a, e)
    lengths = torch.arange(6, 6 - batch, -1).clamp(min=1)
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths)
    for module in (ours, ref):
        module.zero_grad()
    got, expected = ours(packed), ref(packed)
    assert_close(got[0].data, expected[0].data)
    (got[0].data.sum() + got[1][1].sum()).backward()
    (expected[0].data.sum() + expected[1][1].sum()).backward()
    for a, e in zip(ours.parameters(), ref.parameters()):
        assert_close(a.grad, e.grad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@on_each_cpu_path
def test_narrow_gemm_outputs(dtype):
    # GEMMs whose output is narrower than a vector (input_size 5, then 2 * proj_size 8,
    # and proj_size 4 in dW_hh) with 64+ rows: through ATen ("aten") they run into a
    # column-major product added into C (gemm.cpp, narrow_output), else through our
    # kernels with 1 masked vector of columns: dx, dW_ih, and dW_hh accumulated over a
    # packed reverse direction's terms (beta = 1). Random hx, so every term is non-zero.
    gen = torch.Generator().manual_seed(11)
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=4, dtype=dtype)
    ref = nn.LSTM(5, 20, **kwargs)
    random_like_weights(ref, 11)
    ours = fused_lstm.LSTM(5, 20, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = _random((30, 6, 5), dtype, gen)
    hx = (_random((4, 6, 4), dtype, gen), _random((4, 6, 20), dtype, gen))
    for lengths in (None, torch.tensor([30, 12, 29, 1, 17, 30])):
        expected = lstm_outputs_and_grads(ref, x, hx, lengths, enforce_sorted=False)
        got = lstm_outputs_and_grads(ours, x, hx, lengths, enforce_sorted=False)
        for a, e in zip(got[0] + got[1], expected[0] + expected[1]):
            assert_close(a, e)


def _bidirectional_matches_nn(I_, H_, T, batch, lengths, threads, seed, dtype=torch.float64):
    """A bidirectional LSTM on `threads` threads against nn.LSTM, random hx, for each
    of `lengths` (None: dense; else packed with those lengths): outputs, states and
    gradients, and the no_grad path."""
    gen = torch.Generator().manual_seed(seed)
    ref = nn.LSTM(I_, H_, bidirectional=True, dtype=dtype)
    random_like_weights(ref, seed)
    ours = fused_lstm.LSTM(I_, H_, bidirectional=True, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = _random((T, batch, I_), dtype, gen)
    hx = (_random((2, batch, H_), dtype, gen), _random((2, batch, H_), dtype, gen))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for lens in lengths:
            expected = lstm_outputs_and_grads(ref, x, hx, lens)
            got = lstm_outputs_and_grads(ours, x, hx, lens)
            for a, e in zip(got[0] + got[1], expected[0] + expected[1]):
                assert_close(a, e)
            for a, e in zip(lstm_outputs(ours, x, hx, lens), expected[0]):
                assert_close(a, e)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
@on_each_cpu_path
def test_small_batch_threads(threads):
    # At B = 8 and H = 128 the fused forward and backward loops run on 1 thread, on 2
    # that own 4 rows each, or on 3 that split the hidden units with a barrier per step
    # (uneven chunks, more threads than this machine's cores). Bidirectional packed
    # input: the batch shrinks forward and grows in reverse, where rows start from h0
    # mid-sequence.
    lengths = torch.tensor([12, 12, 9, 7, 7, 4, 2, 1])
    _bidirectional_matches_nn(5, 128, 12, 8, [lengths], threads, seed=threads)
    # B5 H100: threads split the units on 2 threads too, in runs of whole vectors over the
    # backward's packed panels of W_hh, the last one partial; runs begin and end inside
    # panels (float64 on AVX-512: 8-unit vectors, 32-unit panels; 2 threads 56 + 44
    # units, 3 threads 40 + 40 + 20). A run's panels read from the run's start, not the
    # panel's, fails here (mutation, session 31).
    _bidirectional_matches_nn(6, 100, 9, 5, [None, torch.tensor([9, 9, 6, 3, 1])], threads,
                              seed=threads + 10)


@pytest.mark.parametrize("threads", [2, 8])
def test_fused_loop_barrier_sleeps_and_is_woken(threads, request):
    # The fused loops' barrier (fused_loop.h's Progress) without its spin: a wait not over
    # within 64 pauses sleeps and must be woken by the last thread to arrive; a lost
    # wake-up hangs here. 8 threads on this machine's cores, as a container's CPU quota
    # or several CPU DDP ranks give them: the units split with a barrier a step, forward
    # and backward; then B3 H24, whose backward loop's second thread waits for its steps.
    request.addfinalizer(lambda: torch.ops.fused_lstm.set_cpu_tuning("barrier_spin_us", -1))
    torch.ops.fused_lstm.set_cpu_tuning("barrier_spin_us", 0)
    lengths = torch.tensor([12, 12, 9, 7, 7, 4, 2, 1])
    _bidirectional_matches_nn(5, 128, 12, 8, [None, lengths], threads, seed=threads)
    _bidirectional_matches_nn(5, 24, 16, 3, [None], threads, seed=threads + 1)


@pytest.mark.parametrize("batch", [10, 13, 64])
@on_each_cpu_path
def test_fused_step_larger_batches(batch):
    # At H >= 128 the forward and backward run fused steps at any batch (cpu_path "auto"
    # and "small"): AVX-512's 6-, 4-, 2- and 1-row tiles per hidden-unit chunk, AVX2's
    # 3- and 2-row (a last 3 + 1 as 2 + 2), dense input and
    # a packed batch shrinking forward and growing in reverse, 2 threads owning blocks of
    # rows balanced by their lengths (W_hh, 0.66 MB, fits the row split's limit).
    gen = torch.Generator().manual_seed(batch + 1000)
    lengths = torch.randint(1, 8, (batch,), generator=gen).sort(descending=True).values
    lengths[0] = 7
    _bidirectional_matches_nn(9, 144, 7, batch, [None, lengths], 2, seed=batch)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [16, 21])
@on_each_cpu_path
def test_weight_gradients_beside_the_loop(T, dtype):
    # A step of 2^16 multiply-adds or fewer (here B3 H24) runs the fused backward loop
    # on one thread; with 2 threads and 16 steps or more the other computes the weight
    # gradients of finished steps in chunks (8 of 2 steps, 7 of 3), the loop's thread
    # taking chunks once done. Dense and packed (a batch shrinking to 1), both
    # directions; then a 2-layer stack whose first layer needs no input gradient.
    lengths = torch.tensor([T, T - 5, 1])
    _bidirectional_matches_nn(5, 24, T, 3, [None, lengths], 2, seed=T, dtype=dtype)
    gen = torch.Generator().manual_seed(T)
    ref = nn.LSTM(5, 24, num_layers=2, dtype=dtype)
    random_like_weights(ref, T)
    ours = fused_lstm.LSTM(5, 24, num_layers=2, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = _random((T, 3, 5), dtype, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for module in (ours, ref):
            module.zero_grad()
            out, (h_n, c_n) = module(x)
            (out * torch.linspace(-1, 1, 24, dtype=dtype)).sum().backward()
        for a, e in zip(ours.parameters(), ref.parameters()):
            assert_close(a.grad, e.grad)
    finally:
        torch.set_num_threads(before)


@on_each_cpu_path
def test_fused_backward_k_slices():
    # Where the forward fuses its steps, the backward loop's dh = dgates W_hh runs
    # gemm_columns over each thread's units (W_hh is too large for the row split), in
    # slices of K = 4H of at most 1024 rows (AVX-512) or 4096 (AVX2, default): H = 1030
    # takes two slices on every build, and its last 6 units a masked column block (on
    # the SIMD builds read from W_hh packed in column panels, the last one 6 wide).
    # Batch 7 and a packed batch shrinking to 1 run 6-, 4- and 1-row blocks.
    lengths = torch.tensor([3, 3, 3, 2, 2, 1, 1])
    _bidirectional_matches_nn(5, 1030, 3, 7, [None, lengths], 2, seed=1030)


def _tensors(nested):
    """The tensors of nested lists and tuples, in order."""
    if isinstance(nested, torch.Tensor):
        yield nested
    else:
        for item in nested:
            yield from _tensors(item)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@on_each_cpu_path
def test_streamed_input_gemm_changes_no_bit(dtype, request):
    # The input GEMM writes gates of tuning.h's stream_gates_min_bytes or more by
    # non-temporal stores (PERF_LOG.md row 63) where our kernels run it: gemm_columns
    # (forced on here; it serves AVX-512 CPUs not made by Intel) and, on AVX512_BF16 CPUs,
    # input_gemm_bf16. Streamed at every size against never: the same outputs, states and
    # gradients, bit for bit; two bidirectional layers (input sizes 64 and 256), dense and
    # packed, with and without a gradient.
    if dtype == torch.bfloat16 and not _bfloat16_kernels_in_use():
        pytest.skip("bfloat16 layers run in float32 here (no AVX512_BF16 kernels): the "
                    "float32 case covers the streamed stores")
    st = torch.ops.fused_lstm.set_cpu_tuning
    request.addfinalizer(lambda: [st(n, -1) for n in ("own_large_gemm", "stream_gates_min_bytes")])
    st("own_large_gemm", 1)
    gen = torch.Generator().manual_seed(128)
    model = fused_lstm.LSTM(64, 128, num_layers=2, bidirectional=True)
    random_like_weights(model, 128)
    model.to(dtype)
    x = _random((20, 16, 64), dtype, gen)
    hx = tuple(_random((4, 16, 128), dtype, gen) for _ in range(2))
    lengths = torch.tensor([20, 20, 19, 17, 16, 13, 11, 10, 9, 8, 7, 5, 4, 3, 2, 1])
    runs = []
    for min_bytes in (1 << 62, 0):
        st("stream_gates_min_bytes", min_bytes)
        runs.append([lstm_outputs_and_grads(model, x, hx, lens) for lens in (None, lengths)] +
                    [lstm_outputs(model, x, hx, lens) for lens in (None, lengths)])
    never, always = (list(_tensors(r)) for r in runs)
    assert len(never) == len(always) > 0
    for a, b in zip(never, always):
        assert torch.equal(a, b)


@on_each_cpu_path
def test_lstm_larger_shape_float32():
    # Here the weight gradients sum 660 rows, and nn.LSTM's own float32 error
    # (measured: ~1e-4) exceeds 1e-5. So both are measured against the float64
    # result on the same weights: ours must be within float32 tolerance of it
    # and no less accurate than nn.LSTM in float32.
    gen = torch.Generator().manual_seed(4)
    ref = nn.LSTM(37, 53, num_layers=2, bidirectional=True)
    ours = fused_lstm.LSTM(37, 53, num_layers=2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    exact = nn.LSTM(37, 53, num_layers=2, bidirectional=True, dtype=torch.float64)
    exact.load_state_dict(ref.state_dict())
    x = _random((20, 33, 37), torch.float32, gen)
    truth = _larger_case_results(exact, x.double())
    for a, n, t in zip(_larger_case_results(ours, x), _larger_case_results(ref, x), truth):
        our_err = (a.double() - t).abs().max().item()
        nn_err = (n.double() - t).abs().max().item()
        scale = t.abs().max().item()
        assert our_err <= max(nn_err, 1e-5 * scale), (our_err, nn_err, scale)


@on_each_cpu_path
def test_zero_batch_matches_nn():
    ref, ours = nn.LSTM(4, 5), fused_lstm.LSTM(4, 5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 0, 4)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(x), ours(x)
    assert o1.shape == o2.shape and h1.shape == h2.shape and c1.shape == c2.shape


@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("used", ["output", "h_n", "c_n"])
@on_each_cpu_path
def test_gradients_from_one_output(used, proj_size):
    # A loss on one of output, h_n, c_n: the others get no gradient at all (undefined,
    # not materialised as zeros), and the gradients still equal nn.LSTM's.
    gen = torch.Generator().manual_seed(len(used) + proj_size)
    ref = nn.LSTM(I, H, num_layers=2, proj_size=proj_size, dtype=torch.float64)
    random_like_weights(ref, proj_size)
    ours = fused_lstm.LSTM(I, H, num_layers=2, proj_size=proj_size, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = _random((5, 3, I), torch.float64, gen)

    def grads(module):
        x_ = x.clone().requires_grad_()
        out, (h_n, c_n) = module(x_)
        t = {"output": out, "h_n": h_n, "c_n": c_n}[used]
        loss = (t * torch.linspace(-1, 2, t.numel(), dtype=t.dtype).view(t.shape)).sum()
        return torch.autograd.grad(loss, [x_] + list(module.parameters()), allow_unused=True)

    for a, e in zip(grads(ours), grads(ref)):
        if e is None:  # c_n does not depend on the last layer's projection
            assert a is None or not a.any()
        else:
            assert_close(a, e)


@pytest.mark.parametrize("module", ["lstm", "lstm-proj", "cell"])
@pytest.mark.parametrize("wanted", ["h0", "c0", "x"])
@on_each_cpu_path
def test_gradients_of_some_inputs_only(wanted, module):
    # Only some of x, h0, c0 need a gradient (an LSTMCell's h and c in training, x alone
    # with states that are constants): the backward skips the GEMMs of the others
    # (grad_input, the first step's dL/dh_prev), and the gradients still equal nn's.
    gen = torch.Generator().manual_seed(len(wanted) + len(module))
    if module == "cell":
        ref = nn.LSTMCell(I, H, dtype=torch.float64)
        ours = fused_lstm.LSTMCell(I, H, dtype=torch.float64)
        x, states = _random((4, I), torch.float64, gen), [(4, H), (4, H)]
    else:
        kwargs = dict(num_layers=2, bidirectional=True, proj_size=3 if module == "lstm-proj" else 0,
                      dtype=torch.float64)
        ref, ours = nn.LSTM(I, H, **kwargs), fused_lstm.LSTM(I, H, **kwargs)
        x, states = _random((5, 4, I), torch.float64, gen), [(4, 4, kwargs["proj_size"] or H), (4, 4, H)]
    random_like_weights(ref, 3)
    ours.load_state_dict(ref.state_dict())
    h0, c0 = (_random(shape, torch.float64, gen) for shape in states)
    lengths = torch.tensor([5, 4, 2, 1])

    def grads(m):
        leaves = {"x": x.clone(), "h0": h0.clone(), "c0": c0.clone()}
        leaves[wanted].requires_grad_()
        inp = leaves["x"] if module == "cell" else pack_padded_sequence(leaves["x"], lengths)
        out = m(inp, (leaves["h0"], leaves["c0"]))
        results = list(out) if module == "cell" else [out[0].data, *out[1]]
        loss = sum((t * torch.linspace(-1, 2, t.numel(), dtype=t.dtype).view(t.shape)).sum()
                   for t in results)
        return torch.autograd.grad(loss, [leaves[wanted]] + list(m.parameters()))

    for a, e in zip(grads(ours), grads(ref)):
        assert_close(a, e)


class _WordLanguageModel(nn.Module):
    """pytorch/examples' word language model: embedding, 2-layer LSTM, linear decoder."""

    def __init__(self, lstm_class, vocab, size, dtype):
        super().__init__()
        self.encoder = nn.Embedding(vocab, size, dtype=dtype)
        self.rnn = lstm_class(size, size, num_layers=2, dropout=0.0, dtype=dtype)
        self.decoder = nn.Linear(size, vocab, dtype=dtype)

    def forward(self, tokens, hidden):
        output, hidden = self.rnn(self.encoder(tokens), hidden)
        return self.decoder(output), hidden


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@on_each_cpu_path
def test_word_language_model_trains_like_nn(dtype):
    # Its sizes: 200 units, batch 20, 35 steps of BPTT; SGD (lr 20) with gradient
    # clipping 0.25 and the hidden state carried (detached) between batches, as there.
    # Large enough for every GEMM backend and the fused loops (the shape that crashed
    # on AVX2-only CPUs through the private oneDNN call).
    vocab, size, batch, bptt, steps = 500, 200, 20, 35, 4
    gen = torch.Generator().manual_seed(200)
    data = torch.randint(vocab, (steps * bptt + 1, batch), generator=gen)
    models = []
    for lstm_class in (nn.LSTM, fused_lstm.LSTM):
        torch.manual_seed(0)
        models.append(_WordLanguageModel(lstm_class, vocab, size, dtype))
    models[1].load_state_dict(models[0].state_dict())
    losses = []
    for model in models:
        run = []
        hidden = tuple(torch.zeros(2, batch, size, dtype=dtype) for _ in range(2))
        for i in range(0, steps * bptt, bptt):
            tokens, targets = data[i:i + bptt], data[i + 1:i + 1 + bptt]
            hidden = tuple(h.detach() for h in hidden)
            model.zero_grad()
            out, hidden = model(tokens, hidden)
            loss = nn.functional.cross_entropy(out.view(-1, vocab), targets.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-20)
            run.append(loss.item())
        losses.append(run)
    rtol, atol = TOLERANCES[dtype]
    for step, (e, a) in enumerate(zip(*losses)):
        assert abs(a - e) <= atol + rtol * abs(e), f"step {step}: fused {a} vs nn {e}"
    for (name, p), q in zip(models[1].named_parameters(), models[0].parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


HALF_CASES = {  # name: (module kwargs, H, packed lengths or None)
    "2layer-bidir-packed": (dict(num_layers=2, bidirectional=True), 8, [5, 4, 4, 2]),
    "fused-H144": (dict(), 144, None),
    "proj": (dict(proj_size=3, batch_first=True), 8, None),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(HALF_CASES))
def test_half_precision_cpu_against_float64(dtype, case):
    # half/bfloat16 on the CPU (run in float32, rounded once): outputs, states and
    # every gradient against nn.LSTM in float64 from the same (rounded) values.
    from testing import HALF_VS_FLOAT64
    kwargs, H_, lengths = HALF_CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    ours = fused_lstm.LSTM(7, H_, **kwargs)
    random_like_weights(ours, 5)
    ours = ours.to(dtype)
    exact = nn.LSTM(7, H_, **kwargs, dtype=torch.float64)
    exact.load_state_dict(ours.state_dict())
    B = 4
    x = _random((B, 5, 7) if kwargs.get("batch_first") else (5, B, 7), dtype, gen)
    D = 2 if kwargs.get("bidirectional") else 1
    L = kwargs.get("num_layers", 1)
    hx = (_random((L * D, B, kwargs.get("proj_size") or H_), dtype, gen),
          _random((L * D, B, H_), dtype, gen))
    lens = None if lengths is None else torch.tensor(lengths)
    got = lstm_outputs_and_grads(ours, x, hx, lens)
    expected = lstm_outputs_and_grads(exact, x.double(), tuple(h.double() for h in hx), lens)
    rtol, atol = HALF_VS_FLOAT64[dtype]
    for a, e in zip(got[0] + got[1], expected[0] + expected[1]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol * max(1.0, e.abs().max().item()))


def _outputs_and_grads_through_float(module, x, hx, lengths):
    # [output, h_n, c_n] and their gradients with respect to x, hx and every parameter,
    # for a loss read in float32 (so the gradients reaching a 16-bit output are the same
    # rounded values whatever the leaves' dtype).
    inp = x if lengths is None else nn.utils.rnn.pack_padded_sequence(x, lengths)
    out, (h_n, c_n) = module(inp, hx)
    outs = [out.data if lengths is not None else out, h_n, c_n]
    gen = torch.Generator().manual_seed(5)
    loss = sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in outs)
    return outs, torch.autograd.grad(loss, [x, *hx, *module.parameters()])


AUTOCAST_CASES = {  # name: (module kwargs, packed lengths or None)
    "dense-2layer-bidir": (dict(num_layers=2, bidirectional=True), None),
    "dense-H144": (dict(hidden_size=144), None),
    "packed-2layer": (dict(num_layers=2), [5, 4, 4, 2]),
    "proj": (dict(proj_size=3), None),
}


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "onednn-off"])
@pytest.mark.parametrize("case", list(AUTOCAST_CASES))
def test_cpu_autocast_like_nn(case, onednn, monkeypatch):
    # Under torch.autocast("cpu", dtype=torch.bfloat16) nn.LSTM's oneDNN path (dense
    # input, no projection, oneDNN enabled) runs in bfloat16, outputs and states too;
    # packed input stays float32. Ours takes the same dtypes, and its results are those
    # of our LSTM run in the autocast dtype on the cast values, bit for bit, gradients
    # included (float32 at the float32 leaves, the cast's backward). With a projection
    # nn.LSTM's native path returns output and h_n in bfloat16 but c_n in float32; ours
    # stays float32 throughout (README, Limits).
    kwargs, lengths = AUTOCAST_CASES[case]
    kwargs = dict(dict(input_size=7, hidden_size=8), **kwargs)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch is built without oneDNN: nn.LSTM has no autocast path")
    gen = torch.Generator().manual_seed(len(case))
    ours = fused_lstm.LSTM(**kwargs)
    random_like_weights(ours, 5)
    ref = nn.LSTM(**kwargs)
    ref.load_state_dict(ours.state_dict())
    D = 2 if kwargs.get("bidirectional") else 1
    L = kwargs.get("num_layers", 1)
    H_, P = kwargs["hidden_size"], kwargs.get("proj_size") or kwargs["hidden_size"]
    B = 4
    x = _random((5, B, 7), torch.float32, gen).requires_grad_()
    hx = tuple(_random((L * D, B, n), torch.float32, gen).requires_grad_() for n in (P, H_))
    lens = None if lengths is None else torch.tensor(lengths)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    cast = onednn and lengths is None and "proj_size" not in kwargs
    dtype = torch.bfloat16 if cast else torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            expected_dtypes = [t.dtype for t in lstm_outputs(ref, x, hx, lens)]
        except RuntimeError as e:
            # oneDNN's bfloat16 LSTM primitive needs AVX-512: on AVX2-only CPUs nn.LSTM
            # raises here (torch 2.13, AMD Zen 3), and ours runs; the dtypes are the rule's.
            if not cast or "primitive descriptor" not in str(e):
                raise
            expected_dtypes = [dtype] * 3
        outs, grads = _outputs_and_grads_through_float(ours, x, hx, lens)
    if "proj_size" in kwargs:
        expected_dtypes = [torch.float32] * 3
    assert [t.dtype for t in outs] == expected_dtypes == [dtype] * 3
    in_dtype = fused_lstm.LSTM(**kwargs).to(dtype)
    in_dtype.load_state_dict(ours.state_dict())
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, *hx)]
    want_outs, want_grads = _outputs_and_grads_through_float(in_dtype, leaves[0], tuple(leaves[1:]), lens)
    for a, e in zip(outs, want_outs):
        assert torch.equal(a, e)
    for a, e in zip(grads, want_grads):
        assert a.dtype == torch.float32 and torch.equal(a.to(dtype), e)


def test_cpu_autocast_leaves_cells_in_float32():
    # nn.LSTMCell is not autocast on the CPU (torch's lstm_cell has no CPU autocast rule).
    cell = fused_lstm.LSTMCell(7, 8)
    x = torch.randn(3, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = nn.LSTMCell(7, 8)(x)
        got = cell(x)
    assert [t.dtype for t in got] == [t.dtype for t in expected] == [torch.float32] * 2


def _bfloat16_kernels_in_use():
    return fused_lstm.backend_info()["bfloat16_products"].startswith("AVX512_BF16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu_is_float32_rounded_once(dtype, request):
    # A 16-bit layer on the CPU is the float32 layer on the same values, its results
    # rounded to the dtype once (not a 16-bit h between steps; a stack rounds between
    # layers): bit for bit, with and without a gradient, at a fused size and with a
    # projection. (bfloat16 where the bfloat16 kernels do not run: on an AVX512_BF16 CPU
    # the AVX2 build, as on CPUs without it.)
    if dtype == torch.bfloat16 and _bfloat16_kernels_in_use():
        request.addfinalizer(lambda: torch.ops.fused_lstm.set_cpu_capability(""))
        torch.ops.fused_lstm.set_cpu_capability("avx2")
    gen = torch.Generator().manual_seed(11)
    for kwargs, H_ in ((dict(bidirectional=True), 144), (dict(proj_size=3), 8)):
        half = fused_lstm.LSTM(7, H_, **kwargs)
        random_like_weights(half, 3)
        half = half.to(dtype)
        single = fused_lstm.LSTM(7, H_, **kwargs)
        single.load_state_dict(half.state_dict())  # the rounded weights, in float32
        x = _random((6, 5, 7), dtype, gen)
        expected = [t.to(dtype) for t in lstm_outputs(single, x.float())]
        for got in (lstm_outputs(half, x), lstm_outputs_and_grads(half, x)[0]):
            for a, e in zip(got, expected):
                assert a.dtype == dtype and torch.equal(a, e)


def _16bit_recurrence(x, h0, c0, w_ih, w_hh, bias, reverse=False):
    # One layer in float64, each step reading h rounded to x's dtype (what the 16-bit
    # products compute, but for float32 sums): x [T, B, I], h0, c0 [B, H] -> output [T, B, H].
    def rounded(t):
        return t.to(x.dtype).double()
    h, c, out = rounded(h0), c0.double(), []
    for t in (reversed(range(x.shape[0])) if reverse else range(x.shape[0])):
        i, f, g, o = (x[t].double() @ w_ih.double().T + h @ w_hh.double().T + bias.double()).chunk(4, 1)
        c = i.sigmoid() * g.tanh() + f.sigmoid() * c
        h = rounded(o.sigmoid() * c.tanh())
        out.append(h)
    return torch.stack(out[::-1] if reverse else out)


def _bfloat16_layer_against_model(layer, reverse, with_grad):
    # The layer (_bfloat16_layer's tuple) run forward on 1 and 2 threads (and with a
    # gradient on h0 where with_grad), all bit for bit the same, against the float64
    # model with h rounded each step (_16bit_recurrence): under 1% of the outputs off, each
    # within 2^-7. Returns the model's output.
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, bias = layer
    expected = _16bit_recurrence(x, h0, c0, w_ih, w_hh, bias, reverse)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            runs.append(fused_lstm.functional.lstm_layer(
                x, (h0, c0), w_ih, w_hh, b_ih, b_hh, reverse=reverse)[0])
        if with_grad:
            runs.append(fused_lstm.functional.lstm_layer(
                x, (h0.clone().requires_grad_(), c0), w_ih, w_hh, b_ih, b_hh,
                reverse=reverse)[0].detach())
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    off = (runs[0].double() - expected).abs()
    assert off.max() <= 2.0 ** -7 and (off > 0).double().mean() < 0.01, reverse
    return expected


def _bfloat16_layer(T, B, I, H, gen):
    # x [T, B, I], h0, c0 and a layer's weights in bfloat16 (nn.LSTM's scale), and the
    # summed bias in float32: (x, h0, c0, w_ih, w_hh, b_ih, b_hh, bias).
    x = _random((T, B, I), torch.bfloat16, gen)
    h0, c0 = (_random((B, H), torch.bfloat16, gen) for _ in range(2))
    w_ih, w_hh, b_ih, b_hh = (_random(shape, torch.float32, gen).div(H ** 0.5).bfloat16()
                              for shape in ((4 * H, I), (4 * H, H), (4 * H,), (4 * H,)))
    return x, h0, c0, w_ih, w_hh, b_ih, b_hh, b_ih.float() + b_hh.float()


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="the bfloat16 kernels are AVX-512 only")
@pytest.mark.parametrize("B,I,H", [(4, 7, 144), (13, 64, 34), (37, 16, 18), (32, 16, 64),
                                   (61, 16, 40)], ids=str)
def test_bfloat16_fused_layer_rounds_h_each_step(B, I, H):
    # On an AVX512_BF16 CPU a bfloat16 layer whose loop runs fused multiplies x, h and the
    # weights as stored (bfloat16 products, float32 sums), each step reading the h of the
    # step before rounded to bfloat16: equal to the float64 model of that but for under
    # 1% of the outputs, each within 2^-7 (float32 sums may move a rounding; outputs lie
    # in (-1, 1)), both directions, with and without a gradient, bit for bit the same on
    # 1 and 2 threads (B4 H144: the threads split units; B32 H64: rows; B61: the input
    # GEMM's 549 rows in two blocks of row tiles, the last tile of 3 rows). The layer in
    # float32 rounded once (the AVX2 build) differs from the model in ~11% of the
    # outputs: the test tells the two apart. Weights of nn.LSTM's scale.
    if not _bfloat16_kernels_in_use():
        pytest.skip("this CPU has no AVX512_BF16 (the bfloat16 layers run in float32)")
    torch.ops.fused_lstm.set_cpu_gemm("small")  # the fused loop at every size
    before = torch.get_num_threads()
    try:
        gen = torch.Generator().manual_seed(B * H)
        layer = _bfloat16_layer(9, B, I, H, gen)
        args = (layer[0], layer[1:3]) + layer[3:7]
        for reverse in (False, True):
            expected = _bfloat16_layer_against_model(layer, reverse, with_grad=True)
            torch.ops.fused_lstm.set_cpu_capability("avx2")
            try:
                with torch.no_grad():
                    once = fused_lstm.functional.lstm_layer(*args, reverse=reverse)[0]
            finally:
                torch.ops.fused_lstm.set_cpu_capability("")
            assert ((once.double() - expected).abs() > 0).double().mean() > 0.05
    finally:
        torch.set_num_threads(before)
        torch.ops.fused_lstm.set_cpu_gemm("auto")


def _amx_in_use():
    return "AMX" in fused_lstm.backend_info()["bfloat16_products"]


@pytest.mark.parametrize("B,I,H", [(1, 5, 16), (2, 32, 30), (15, 70, 48), (16, 32, 32),
                                   (17, 9, 100), (33, 64, 64), (64, 40, 18)], ids=str)
def test_bfloat16_amx_tiles_against_the_rounding_model(B, I, H, request):
    # On an AMX CPU a bfloat16 layer's input GEMM and fused step run on AMX tiles (from
    # tuning.h's amx_min_rows rows; 1 here): 16-row tiles and 32-k blocks, cut by B, I and
    # H at every edge here (1, 15, 16, 17, 33 and 64 rows; k 5 to 100, padded to 32;
    # chunks of 16 units cut at 18, 30, 100), one row tile or pairs of them, threads
    # splitting units or rows. Against the float64 model of bfloat16 products into float32
    # sums with h rounded each step (as test_bfloat16_fused_layer_rounds_h_each_step), both
    # directions, 1 and 2 threads bit for bit; then the same layer on the vdpbf16ps
    # kernels (amx_min_rows past B) against the same model. The backward's dh = dgates
    # W_hh on tiles too: every gradient against _16bit_backward_model within bfloat16's
    # eps of its largest, and all but a few elements equal. (AMX sums in its own order:
    # where the exact sum needs more than float32, AMX and a float32 sum in k order round
    # it apart, and a dgates rounding moved so flows on through its row's dh: B4 H144 at 9
    # steps, one such flip in row 0 moved 49 of grad_h0's 576 elements by an ulp.)
    if not _amx_in_use():
        pytest.skip("this CPU has no AMX-BF16 (or FUSED_LSTM_CPU_AMX=off): no AMX kernels")
    set_tuning = torch.ops.fused_lstm.set_cpu_tuning
    request.addfinalizer(lambda: set_tuning("amx_min_rows", -1))
    request.addfinalizer(lambda: torch.ops.fused_lstm.set_cpu_gemm("auto"))
    torch.ops.fused_lstm.set_cpu_gemm("small")  # the fused loop at every size
    before = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(before))
    gen = torch.Generator().manual_seed(B * H + I)
    layer = _bfloat16_layer(6, B, I, H, gen)
    x, h0, c0, w_ih, w_hh = layer[:5]
    for min_rows in (1, B + 1):  # AMX, then vdpbf16ps
        set_tuning("amx_min_rows", min_rows)
        for reverse in (False, True):
            _bfloat16_layer_against_model(layer, reverse, with_grad=True)
    set_tuning("amx_min_rows", 1)
    torch.set_num_threads(2)
    bs = torch.full((6,), B)
    x2, go = x.view(-1, I), _random((6 * B, H), torch.bfloat16, gen)
    gh, gc = (_random((B, H), torch.bfloat16, gen) for _ in range(2))
    out, _, _, gates, cells, hiddens = torch.ops.fused_lstm.lstm_layer_forward(
        x2, bs, h0, c0, w_ih, w_hh, None, None, None, False)
    expected = _16bit_backward_model(go, gh, gc, x2, bs, h0, c0, w_ih, w_hh, out, gates, cells,
                                     False)
    got = torch.ops.fused_lstm.lstm_layer_backward(go, gh, gc, x2, bs, h0, c0, w_ih, w_hh, None,
                                                   out, gates, cells, hiddens, False, True)
    for g, e in zip(got, expected):
        off = (g.double() - e).abs()
        assert off.max() <= 2.0 ** -7 * e.abs().max() and (off > 0).double().mean() < 0.1


def _weight_shaped_conversions(fn, shapes):
    # The aten::_to_copy calls fn makes on tensors of the given shapes (torch.profiler).
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return [e.input_shapes[0] for e in prof.events()
            if e.name == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] in shapes]


@pytest.mark.parametrize("B,I,H,T", [(1, 7, 10, 1), (8, 65, 130, 1), (3, 33, 64, 1), (16, 40, 48, 1),
                                     (40, 65, 130, 1), (64, 32, 96, 1), (2, 9, 21, 1),
                                     (4, 16, 144, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_layer_reads_its_weights_as_stored(B, I, H, T, dtype, request):
    # On an AVX512_BF16 CPU a bfloat16 layer whose GEMMs all run in bfloat16 (one step:
    # x W_ih^T and h0 W_hh^T as dot products on the weights in place for few rows,
    # tuning.h's few_rows_*, else on the weights packed in bfloat16, B40 and B64 here; or
    # its loop fused; H even) never copies its weights to float32 (rows 49, 52; that copy
    # was most of a one-step call): no conversion of a weight-shaped tensor in the op, the
    # call an LSTMCell or a decoding LSTM makes. Its output is the float64 model of 16-bit
    # products with float32 sums (_16bit_recurrence) within the dtype's eps (2^-7 for
    # bfloat16), nearly all equal. Elsewhere (float16 on every CPU, row 59; bfloat16
    # without AVX512_BF16, row 57; odd H) one-step calls of up to *_widening_max_rows rows
    # do the same, as dot products at any weight size, widening each load (row 62): those
    # rules are stretched here to every row count tested (float32's few_rows_* left as
    # they are).
    if dtype == torch.float16 or not _bfloat16_kernels_in_use() or H % 2:
        if T > 1:
            pytest.skip("no 16-bit kernels for this dtype and CPU (only one-step calls keep "
                        "their weights as stored; AVX512_BF16 runs bfloat16 loops)")
        rules = ("bf16_widening_max_rows", "f16_widening_max_rows")
        request.addfinalizer(lambda: [torch.ops.fused_lstm.set_cpu_tuning(n, -1) for n in rules])
        for name in rules:
            torch.ops.fused_lstm.set_cpu_tuning(name, B)
    gen = torch.Generator().manual_seed(B * I + H)
    x = _random((T, B, I), dtype, gen)
    h0, c0 = (_random((B, H), dtype, gen) for _ in range(2))
    w_ih, w_hh, b_ih, b_hh = (_random(shape, torch.float32, gen).div(H ** 0.5).to(dtype)
                              for shape in ((4 * H, I), (4 * H, H), (4 * H,), (4 * H,)))
    args = (x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
    out = []

    def run():
        with torch.no_grad():
            out.append(fused_lstm.functional.lstm_layer(*args)[0])
    assert _weight_shaped_conversions(run, [[4 * H, I], [4 * H, H]]) == []
    expected = _16bit_recurrence(x, h0, c0, w_ih, w_hh, b_ih.float() + b_hh.float())
    off = (out[0].double() - expected).abs()
    assert out[0].dtype == dtype and off.max() <= torch.finfo(dtype).eps
    assert (off > 0).double().mean() < 0.01
    # The same call with a gradient (the training forward, which keeps the workspace)
    # reads them as stored too, and gives the same output; its backward runs as before.
    h0.requires_grad_()
    trained = []
    assert _weight_shaped_conversions(
        lambda: trained.append(fused_lstm.functional.lstm_layer(*args)[0]),
        [[4 * H, I], [4 * H, H]]) == []
    assert torch.equal(trained[0].detach(), out[0])
    trained[0].float().sum().backward()
    assert h0.grad is not None and torch.isfinite(h0.grad.float()).all()


def _16bit_backward_model(grad_output, grad_h_n, grad_c_n, x, batch_sizes, h0, c0, w_ih,
                          w_hh, output, gates, cells, reverse):
    # One layer's backward from its 16-bit workspace (op lstm_layer_backward's arguments,
    # no projection) in float64, dgates rounded to x's dtype each step, the results once:
    # what the 16-bit backward that reads it as stored computes, but for float32 sums and
    # math. Returns [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias].
    dtype = x.dtype

    def rounded(t):
        return t.to(dtype).double()
    bs = batch_sizes.tolist()
    offset = [0]
    for b in bs:
        offset.append(offset[-1] + b)
    d = [t.double() for t in (grad_output, x, h0, c0, w_ih, w_hh, output, gates, cells)]
    go, x, h0, c0, w_ih, w_hh, output, gates, cells = d
    dh, dc = grad_h_n.double().clone(), grad_c_n.double().clone()
    dgates, h_prev = torch.zeros_like(gates), torch.zeros_like(output)
    run = list(reversed(range(len(bs)))) if reverse else list(range(len(bs)))
    for n in reversed(range(len(run))):
        t, b = run[n], bs[run[n]]
        rows = slice(offset[t], offset[t] + b)
        c_prev, h_prev[rows] = c0[:b].clone(), h0[:b]
        if n > 0:  # rows [0, prev) continue from the step run before
            p = min(b, bs[run[n - 1]])
            c_prev[:p] = cells[offset[run[n - 1]]:offset[run[n - 1]] + p]
            h_prev[offset[t]:offset[t] + p] = output[offset[run[n - 1]]:offset[run[n - 1]] + p]
        i, f, g, o = gates[rows].chunk(4, 1)
        dh_t, tanh_c = dh[:b] + go[rows], cells[rows].tanh()
        dc_t = dc[:b] + dh_t * o * (1 - tanh_c ** 2)
        dgates[rows] = rounded(torch.cat([dc_t * g * i * (1 - i), dc_t * c_prev * f * (1 - f),
                                          dc_t * i * (1 - g ** 2), dh_t * tanh_c * o * (1 - o)], 1))
        dh[:b], dc[:b] = dgates[rows] @ w_hh, dc_t * f
    return [rounded(t) for t in (dgates @ w_ih, dh, dc, dgates.T @ x, dgates.T @ h_prev,
                                 dgates.sum(0))]


@pytest.mark.parametrize("B,I,H,T,packed,reverse", [
    (4, 7, 144, 9, False, False), (13, 64, 34, 9, True, False), (37, 16, 18, 9, True, True),
    (32, 16, 64, 9, False, True), (8, 32, 200, 9, True, True), (8, 48, 256, 1, False, False),
    (3, 16, 130, 1, False, True), (5, 33, 40, 1, False, False), (4, 16, 600, 3, False, False)],
    ids=str)
@pytest.mark.parametrize("op_name", ["lstm_layer_backward", "lstm_layer_backward_overwrite_gates"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_backward_reads_its_workspace_as_stored(B, I, H, T, packed, reverse, op_name,
                                                      dtype, request):
    # On an AVX512_BF16 CPU the backward of a bfloat16 layer whose loop runs fused, and on
    # every CPU that of one step (an LSTMCell, a decoding loop) in bfloat16 or float16,
    # reads its workspace (gates, cells, output), x, grad_output and weights as stored: no
    # conversion of a workspace-shaped tensor in the op (ReducedPrecisionInFloat's float32
    # copies were most of a 16-bit training step's peak memory, PERF_LOG rows 50, 58, 59).
    # Its dgates are rounded to the dtype each step, its GEMMs take 16-bit operands
    # (vdpbf16ps or torch's bfloat16 GEMM with AVX512_BF16, else each load widened): every
    # gradient equals the float64 model of that (_16bit_backward_model) but for under 5%
    # of the elements, each within the dtype's eps (2^-7 for bfloat16) of the largest (float32 sums move a rounding of dgates
    # now and then, and the change flows on through dh: 0-2% here at 9 steps, ~5% at 12
    # steps of 8 rows); bit for bit on 1 and 2 threads (B4 H144, H200: threads split
    # units; B32 H64, B37: rows). The float32-inside backward (the "aten" setting's plain
    # path) differs from the model in ~40% of them: the test tells the two apart. (H600:
    # dh's GEMM over 4H = 2400 in two slices of K.)
    if dtype == torch.float16 or not _bfloat16_kernels_in_use():
        if T > 1:
            pytest.skip("no 16-bit kernels for this dtype and CPU (16-bit layers of several "
                        "steps run in float32; AVX512_BF16 runs bfloat16 loops)")
        # (The portable build's rule is 0 rows: stretched to the rows tested.)
        rule = "widening_backward_max_rows"
        request.addfinalizer(lambda: torch.ops.fused_lstm.set_cpu_tuning(rule, -1))
        torch.ops.fused_lstm.set_cpu_tuning(rule, B)
    torch.ops.fused_lstm.set_cpu_gemm("small")  # the fused loop at every size
    # The vdpbf16ps kernels (on AMX CPUs too; AMX's: test_bfloat16_amx_tiles_*).
    request.addfinalizer(lambda: torch.ops.fused_lstm.set_cpu_tuning("amx_min_rows", -1))
    torch.ops.fused_lstm.set_cpu_tuning("amx_min_rows", 1 << 30)
    before = torch.get_num_threads()
    try:
        gen = torch.Generator().manual_seed(B * H + packed)
        bs = (torch.randint(1, B + 1, (T,), generator=gen).sort(descending=True).values
              if packed else torch.full((T,), B))
        bs[0] = B
        N = int(bs.sum())
        x, go = _random((N, I), dtype, gen), _random((N, H), dtype, gen)
        h0, c0, gh, gc = (_random((B, H), dtype, gen) for _ in range(4))
        w_ih, w_hh = (_random(shape, torch.float32, gen).div(H ** 0.5).to(dtype)
                      for shape in ((4 * H, I), (4 * H, H)))
        out, _, _, gates, cells, hiddens = torch.ops.fused_lstm.lstm_layer_forward(
            x, bs, h0, c0, w_ih, w_hh, None, None, None, reverse)
        args = [go, gh, gc, x, bs, h0, c0, w_ih, w_hh, None, out, gates, cells, hiddens, reverse, True]
        expected = _16bit_backward_model(go, gh, gc, x, bs, h0, c0, w_ih, w_hh, out, gates, cells,
                                         reverse)
        op = getattr(torch.ops.fused_lstm, op_name)
        # Workspace-, input- and weight-shaped (dh and dc, [B, H], are widened).
        shapes = [[N, 4 * H], [N, I], [4 * H, I], [4 * H, H]] + ([[N, H]] if N != B else [])
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            args[11] = gates.clone()  # the overwriting op writes dgates over it
            runs.append([])
            assert _weight_shaped_conversions(lambda: runs[-1].extend(op(*args)), shapes) == []
        for a, b in zip(*runs):
            assert torch.equal(a, b)
        for got, e in zip(runs[0], expected):
            off = (got.double() - e).abs()
            assert got.dtype == dtype and off.max() <= torch.finfo(dtype).eps * e.abs().max()
            assert (off > 0).double().mean() < 0.05
        torch.ops.fused_lstm.set_cpu_gemm("aten")
        args[11] = gates.clone()
        widened = op(*args)
        assert ((widened[0].double() - expected[0]).abs() > 0).double().mean() > 0.1
    finally:
        torch.set_num_threads(before)
        torch.ops.fused_lstm.set_cpu_gemm("auto")


@pytest.mark.parametrize("build", ["cpu", "avx2"])
def test_bfloat16_training_at_large_gemm_sizes_against_float64(build, request):
    # bfloat16 training at sizes where, on an AVX512_BF16 CPU, the backward's GEMMs run in
    # bfloat16 (from tuning.h's bf16_gemm_min_macs, 2^24: dW_ih here is 512 x 128 x 1024)
    # and the forward loop fuses: outputs, states and every gradient against nn.LSTM in
    # float64 on the same values, within HALF_VS_FLOAT64, with nn.LSTM-scale weights; and
    # on the AVX2 build (float32 inside), the same bounds.
    from testing import HALF_VS_FLOAT64
    if build == "avx2":
        if "avx2" not in CPU_CAPABILITIES:
            pytest.skip("this CPU has no AVX2 build")
        request.addfinalizer(lambda: torch.ops.fused_lstm.set_cpu_capability(""))
        torch.ops.fused_lstm.set_cpu_capability("avx2")
    gen = torch.Generator().manual_seed(3)
    ours = fused_lstm.LSTM(128, 128, num_layers=2, bidirectional=True).bfloat16()
    exact = nn.LSTM(128, 128, num_layers=2, bidirectional=True, dtype=torch.float64)
    exact.load_state_dict(ours.state_dict())
    x = _random((32, 16, 128), torch.bfloat16, gen)
    hx = tuple(_random((4, 16, 128), torch.bfloat16, gen) for _ in range(2))
    got = lstm_outputs_and_grads(ours, x, hx)
    expected = lstm_outputs_and_grads(exact, x.double(), tuple(h.double() for h in hx))
    rtol, atol = HALF_VS_FLOAT64[torch.bfloat16]
    for a, e in zip(got[0] + got[1], expected[0] + expected[1]):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol * max(1.0, e.abs().max().item()))


@pytest.mark.parametrize("batch", [1, 8, 20])
@on_each_cpu_path
def test_one_step_calls_match_nn(batch):
    # One step (a decoding loop's call, LSTMCell's): below tuning.h's fused_min_steps the
    # step runs gemm() on W_hh in place, and GEMMs of fewer than 16 rows whose B would be
    # copied (W_hh 331 KB here) go to ATen's BLAS; 20 rows take our own kernels.
    _bidirectional_matches_nn(50, 144, 1, batch, [None], 2, seed=batch + 77,
                              dtype=torch.float32)
