"""Shared test helpers: reference comparisons and random inputs. The tolerances live in
fused_lstm.testing, with the benchmark's."""
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from fused_lstm.testing import CUDNN_FLOAT32, HALF_VS_FLOAT64, TOLERANCES  # noqa: F401

def assert_close(actual, expected, dtype=None, what="", scaled=False):
    """TOLERANCES[dtype]; with `scaled`, atol times the reference's largest magnitude (at
    least 1): for tensors far from unit scale (a gradient of magnitude 10 at H = 50 say),
    whose elements near zero carry errors from sums of terms of that magnitude."""
    dtype = dtype or expected.dtype
    rtol, atol = TOLERANCES[dtype]
    if scaled and expected.numel() > 0:
        atol *= max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def random_like_weights(module, seed):
    """Fills every parameter with fresh values (not nn's init) so tests do not
    depend on the initialisation scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).mul(1.2).sub(0.6))


def random_tensor(shape, dtype, gen, device="cpu"):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, dtype)


def lstm_outputs(module, x, hx=None, lengths=None, enforce_sorted=True):
    """[output (its .data when packed), h_n, c_n] under torch.no_grad: the inference path."""
    with torch.no_grad():
        inp = x
        if lengths is not None:
            inp = pack_padded_sequence(x, lengths, batch_first=module.batch_first,
                                       enforce_sorted=enforce_sorted)
        out, (h_n, c_n) = module(inp, hx)
    return [out.data if lengths is not None else out, h_n, c_n]


def lstm_outputs_and_grads(module, x, hx=None, lengths=None, enforce_sorted=True, seed=0):
    """Runs `module` (an nn.LSTM-like) forward and backward on copies of x and hx.

    x: dense input, or the padded input of a PackedSequence when `lengths` is
    given. The loss weighs every element of output, h_n and c_n differently.
    Returns ([output (its .data when packed), h_n, c_n], [dx, dh0, dc0 (when hx
    is given), d(each parameter)])."""
    dtype = x.dtype
    x_ = x.detach().clone().requires_grad_()
    hx_ = tuple(h.detach().clone().requires_grad_() for h in hx) if hx is not None else None
    inp = x_
    if lengths is not None:
        inp = pack_padded_sequence(x_, lengths, batch_first=module.batch_first,
                                   enforce_sorted=enforce_sorted)
    out, (h_n, c_n) = module(inp, hx_)
    out = out.data if lengths is not None else out
    loss_gen = torch.Generator().manual_seed(seed + 1)
    loss = sum((t * random_tensor(t.shape, dtype, loss_gen, t.device)).sum() for t in (out, h_n, c_n))
    leaves = [x_] + (list(hx_) if hx_ is not None else []) + list(module.parameters())
    return [out, h_n, c_n], list(torch.autograd.grad(loss, leaves))
