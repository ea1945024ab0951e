"""The tolerances fused_lstm is held to, written down once: the tests (CPU and CUDA)
and the benchmark's agreement check read them from here.

Each is ``dtype -> (rtol, atol)`` for ``torch.testing.assert_close``, except
``BENCHMARK_AGREEMENT``, a bound on the scaled max error (see ``fused_lstm.bench.measure``).
"""
import torch

# fused_lstm against torch.nn on the same device and dtype. Half precision: storage in
# 16 bits, math in float32, bounded by bf16's 8-bit mantissa (eps 7.8e-3) compounded over
# a few steps of a small LSTM.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-2),
}

# Half-precision results (CUDA) against a float64 reference on the same rounded weights
# and inputs, atol scaled by the reference's magnitude; cuDNN in the same dtype is held to
# the same bound.
HALF_VS_FLOAT64 = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (8e-2, 8e-2)}

# One CPU GEMM (op cpu_gemm) against float64: a bound on max |error| / (max |expected| + 1),
# times sqrt(K) for float32, whose rounding grows with the K products each element sums.
GEMM_VS_FLOAT64 = {torch.float64: 1e-12, torch.float32: 1e-6}

# float32 against cuDNN in float32 (TF32 off): cuDNN's own float32 error (up to 1.6e-5
# of the max on an H200, cuDNN 9.19) exceeds TOLERANCES' float32 bound.
CUDNN_FLOAT32 = (1e-4, 1e-4)

# The benchmark's check that both sides agree before it times them: max |a - e| /
# max(1, max |e|) over outputs (and gradients in train mode). A sanity bound at the
# benchmark's larger shapes; the tests hold the tight ones.
BENCHMARK_AGREEMENT = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}
