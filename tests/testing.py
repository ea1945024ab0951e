"""Shared test helpers: per-dtype tolerances (the one place they are written
down), reference comparisons and random inputs."""
import torch

# (rtol, atol) for fused_lstm against torch.nn on the same device and dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    # Half precision storage, float32 math: bounded by bf16's 8-bit mantissa
    # (eps 7.8e-3) compounded over a few steps of a small LSTM.
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}


def assert_close(actual, expected, dtype=None, what=""):
    dtype = dtype or expected.dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def random_like_weights(module, seed):
    """Fills every parameter with fresh values (not nn's init) so tests do not
    depend on the initialisation scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).mul(1.2).sub(0.6))
