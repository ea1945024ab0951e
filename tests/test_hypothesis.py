"""Property-based differential tests against torch.nn.LSTM: hypothesis draws a
configuration (sizes 1..70, layers 1..3, bidirectional, batch_first, bias, proj_size,
dense / unbatched / packed sorted / packed unsorted input, hx given or not, float32 or
float64, contiguous or not) and every output, state and gradient must match nn.LSTM's
(float64 to 1e-10; float32 against float64 truth, within 1e-5 of the magnitude or
FLOAT32_VS_NN times nn.LSTM's own float32 error); bfloat16 against float64 truth within
HALF_VS_FLOAT64; and malformed input must raise the exception type nn.LSTM raises.

Profiles (conftest.py): "ci" by default; `pytest --hypothesis-profile=deep` draws many more."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (it is in "
                                 "the README's test install)")
from hypothesis import given, strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import PackedSequence  # noqa: E402

import fused_lstm  # noqa: E402
from testing import TOLERANCES, assert_close, lstm_outputs_and_grads, random_like_weights

KINDS = ["dense", "unbatched", "packed_sorted", "packed_unsorted"]
# fused_lstm's float32 error may be this many times nn.LSTM's (both against float64): its
# float activations use a polynomial exp (its own on the SIMD builds, 2e-7; ATen's exp_u20,
# ~20 ULP, on the portable build) where nn's use Sleef's 1-ULP exp and tanh; at H ~ 60
# over 3 layers with projection the ratio reached 7 with exp_u20 (session 15), 4.5 with
# its own over 48 draws (session 30; README, Limits).
FLOAT32_VS_NN = 10


@st.composite
def configs(draw):
    hidden = draw(st.integers(1, 70))
    return dict(
        input_size=draw(st.integers(1, 70)), hidden_size=hidden,
        num_layers=draw(st.integers(1, 3)), bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()), bias=draw(st.booleans()),
        proj_size=draw(st.integers(1, hidden - 1)) if hidden > 1 and draw(st.booleans()) else 0,
        kind=draw(st.sampled_from(KINDS)), give_hx=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        contiguous=draw(st.booleans()), T=draw(st.integers(1, 6)), B=draw(st.integers(1, 5)),
        seed=draw(st.integers(0, 2**16)))


def _tensor(shape, dtype, gen, contiguous):
    # Non-contiguous: every other element of a tensor twice as wide in the last dim.
    if contiguous:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64)
    return wide.to(dtype)[..., ::2]


@given(configs())
def test_matches_nn_lstm(cfg):
    kind, dtype, T, B = cfg["kind"], cfg["dtype"], cfg["T"], cfg["B"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    kwargs = {k: cfg[k] for k in ("input_size", "hidden_size", "num_layers", "bidirectional",
                                  "batch_first", "bias", "proj_size")}
    ref = nn.LSTM(**kwargs, dtype=dtype)
    random_like_weights(ref, cfg["seed"])
    ours = fused_lstm.LSTM(**kwargs, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    LD = cfg["num_layers"] * (2 if cfg["bidirectional"] else 1)
    P, H, I = cfg["proj_size"] or cfg["hidden_size"], cfg["hidden_size"], cfg["input_size"]
    c = cfg["contiguous"]
    if kind == "unbatched":
        x = _tensor((T, I), dtype, gen, c)
        hx = (_tensor((LD, P), dtype, gen, c), _tensor((LD, H), dtype, gen, c))
    else:
        x = _tensor((B, T, I) if cfg["batch_first"] else (T, B, I), dtype, gen, c)
        hx = (_tensor((LD, B, P), dtype, gen, c), _tensor((LD, B, H), dtype, gen, c))
    lengths = None
    if kind.startswith("packed"):
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[0] = T
        if kind == "packed_sorted":
            lengths = lengths.sort(descending=True).values
    hx = hx if cfg["give_hx"] else None
    run = lambda m, to=dtype: lstm_outputs_and_grads(
        m, x.to(to), tuple(h.to(to) for h in hx) if hx else None, lengths,
        kind != "packed_unsorted", seed=cfg["seed"])
    (e_out, e_grads), (a_out, a_grads) = run(ref), run(ours)
    names = ["output", "h_n", "c_n"] + ["input"] + (["h0", "c0"] if hx else []) + [
        n for n, _ in ref.named_parameters()]
    assert len(a_out + a_grads) == len(e_out + e_grads) == len(names)
    if dtype == torch.float64:
        for name, a, e in zip(names, a_out + a_grads, e_out + e_grads):
            assert a.shape == e.shape, name
            # Sizes up to 70 with weights in [-0.6, 0.6] give gradients up to ~40: atol
            # scaled by the tensor's magnitude.
            assert_close(a, e, what=name, scaled=True)
        return
    # float32: against float64 truth (nn.LSTM in float64 on the same rounded weights and
    # inputs), ours within FLOAT32_VS_NN times nn.LSTM's own float32 error, or within
    # float32's atol (1e-5) of the tensor's magnitude. (The grids in test_lstm.py hold
    # float32 to 1e-5 of nn.LSTM at unit scale; drawn here, sizes and layers amplify both
    # sides' rounding.)
    atol = TOLERANCES[torch.float32][1]
    truth = nn.LSTM(**kwargs, dtype=torch.float64)
    truth.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    t_out, t_grads = run(truth, torch.float64)
    for name, a, e, t in zip(names, a_out + a_grads, e_out + e_grads, t_out + t_grads):
        assert a.shape == t.shape, name
        ours_err = (a.double() - t).abs().max().item() if t.numel() else 0.0
        nn_err = (e.double() - t).abs().max().item() if t.numel() else 0.0
        scale = max(1.0, t.abs().max().item()) if t.numel() else 1.0
        assert ours_err <= max(FLOAT32_VS_NN * nn_err, atol * scale), (
            f"{name}: fused_lstm's float32 error {ours_err:.2e} against float64, nn.LSTM's "
            f"{nn_err:.2e}, magnitude {scale:.2e}")


@given(configs())
def test_bfloat16_against_float64(cfg):
    # bfloat16 on the CPU (float32 inside each layer op; on AVX512_BF16 CPUs bfloat16
    # products in the fused loops and the backward's large GEMMs): every output, state and
    # gradient against nn.LSTM in float64 on the same rounded values, within
    # HALF_VS_FLOAT64 of the tensor's magnitude. nn.LSTM's own initialisation (weights
    # of 1/sqrt(H)): with the differential test's larger weights a recurrence that rounds
    # h each step drifts from the truth, as nn.LSTM's own bfloat16 does (PERF_LOG row 45).
    from testing import HALF_VS_FLOAT64
    kind, T, B = cfg["kind"], cfg["T"], cfg["B"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    kwargs = {k: cfg[k] for k in ("input_size", "hidden_size", "num_layers", "bidirectional",
                                  "batch_first", "bias", "proj_size")}
    torch.manual_seed(cfg["seed"])
    ours = fused_lstm.LSTM(**kwargs, dtype=torch.bfloat16)
    truth = nn.LSTM(**kwargs, dtype=torch.float64)
    truth.load_state_dict(ours.state_dict())
    LD = cfg["num_layers"] * (2 if cfg["bidirectional"] else 1)
    P, H, I = cfg["proj_size"] or cfg["hidden_size"], cfg["hidden_size"], cfg["input_size"]
    x = _tensor((B, T, I) if cfg["batch_first"] else (T, B, I), torch.bfloat16, gen, True)
    hx = (_tensor((LD, B, P), torch.bfloat16, gen, True), _tensor((LD, B, H), torch.bfloat16, gen, True))
    hx = hx if cfg["give_hx"] else None
    lengths = None
    if kind.startswith("packed"):
        lengths = torch.randint(1, T + 1, (B,), generator=gen)
        lengths[0] = T
        lengths = lengths.sort(descending=True).values
    got = lstm_outputs_and_grads(ours, x, hx, lengths, seed=cfg["seed"])
    expected = lstm_outputs_and_grads(truth, x.double(), tuple(h.double() for h in hx) if hx else None,
                                      lengths, seed=cfg["seed"])
    rtol, atol = HALF_VS_FLOAT64[torch.bfloat16]
    for a, e in zip(got[0] + got[1], expected[0] + expected[1]):
        assert a.dtype == torch.bfloat16 and a.shape == e.shape
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol * scale)


def _malformed(draw_kind, gen):
    """(module input, hx) that nn.LSTM(5, 4, num_layers=2) rejects."""
    x = torch.randn(3, 2, 5, generator=gen)
    h = torch.zeros(2, 2, 4)
    return {
        "1-D input": (torch.randn(5, generator=gen), None),
        "4-D input": (torch.randn(3, 2, 1, 5, generator=gen), None),
        "input size": (torch.randn(3, 2, 6, generator=gen), None),
        "hx batch": (x, (torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))),
        "hx hidden": (x, (torch.zeros(2, 2, 5), h)),
        "hx layers": (x, (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
        "hx dims": (x, (torch.zeros(2, 4), torch.zeros(2, 4))),
        "input dtype": (x.double(), None),
        "hx dtype": (x, (h.double(), h)),
        "batch_sizes increasing": (PackedSequence(torch.randn(3, 5, generator=gen),
                                                  torch.tensor([1, 2])), None),
        "zero steps": (torch.randn(0, 2, 5, generator=gen), None),
        "hx device": (x, (h.cuda(), h)) if torch.cuda.is_available() else None,
    }[draw_kind]


MALFORMED = ["1-D input", "4-D input", "input size", "hx batch", "hx hidden", "hx layers",
             "hx dims", "input dtype", "hx dtype", "batch_sizes increasing", "zero steps"] + (
                 ["hx device"] if torch.cuda.is_available() else [])


@given(st.sampled_from(MALFORMED), st.integers(0, 2**16))
def test_malformed_input_raises_like_nn(kind, seed):
    ref = nn.LSTM(5, 4, num_layers=2)
    ours = fused_lstm.LSTM(5, 4, num_layers=2)
    x, hx = _malformed(kind, torch.Generator().manual_seed(seed))
    with pytest.raises(Exception) as expected:
        ref(x, hx)
    with pytest.raises(Exception) as got:
        ours(x, hx)
    assert type(got.value) is type(expected.value), (kind, got.value, expected.value)
