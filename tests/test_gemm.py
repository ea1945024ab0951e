"""The CPU GEMMs the kernels run (csrc/cpu/gemm.h), called directly through the op
cpu_gemm: op(a) @ op(b), + c, or + a bias row (gemm_bias, the input GEMM's path), on
every CPU path, at sizes on both sides of each backend's cut-over (tuning.h: our
register-blocked kernel up to 2^20 multiply-adds, then gemm_columns or torch's BLAS;
with b transposed and up to 8 rows, or 16 with b up to 4 MB, the dot-product kernel)
and of the kernels' tile edges (6 and 4 rows, 64-column blocks, 256 KiB K slices; the
dot kernel's blocks of one vector of b's rows and K slices of 256)."""
import itertools

import pytest
import torch

import fused_lstm  # noqa: F401  (registers the ops)
from fused_lstm.testing import GEMM_VS_FLOAT64, HALF_VS_FLOAT64

gemm = torch.ops.fused_lstm.cpu_gemm

# (M, K, N): tiny; under the small-GEMM cut-over with odd edges; past it with rows left
# over after the 6- and 4-row tiles and a column block cut short; K past one 256 KiB slice
# of a 64-column block (1024 floats), under the cut-over and past it (a row left over);
# a wide N; few multiply-adds into a C too large for one thread's small_gemm (K = 1);
# with b transposed, the dot kernel's rows (8 with b of 2.4 MB, K past two slices and a
# block of b's rows cut short; 16 with b under 4 MB) and just past them (12 rows, b of
# 4.5 MB: BLAS on AVX-512); AVX2's wider rule (32 rows, 128 with b up to 4 MB) and past
# it (40 rows with b of 4.5 MB, 130 with b of 1.2 MB).
SHAPES = [(1, 1, 1), (7, 3, 5), (33, 17, 100), (203, 129, 77), (301, 64, 1030),
          (13, 1100, 70), (23, 1100, 70), (64, 300, 2000), (600, 1, 500),
          (8, 600, 1000), (16, 300, 130), (12, 1100, 1030), (32, 1100, 1030),
          (40, 1100, 1030), (128, 300, 1000), (130, 300, 1000)]


def _operands(M, K, N, trans_a, trans_b, dtype):
    a = torch.randn(K, M, dtype=dtype) if trans_a else torch.randn(M, K, dtype=dtype)
    b = torch.randn(N, K, dtype=dtype) if trans_b else torch.randn(K, N, dtype=dtype)
    return a, b, (a.t() if trans_a else a).double() @ (b.t() if trans_b else b).double()


def _close(out, expected, dtype, K):
    rtol = GEMM_VS_FLOAT64[dtype] * (max(1.0, K ** 0.5) if dtype == torch.float32 else 1.0)
    scale = expected.abs().max().item() + 1.0
    assert out.dtype == dtype
    err = (out.double() - expected).abs().max().item() / scale
    assert err <= rtol, f"max error {err:.3g} of the largest value, allowed {rtol:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_gemm_matches_float64(cpu_path, M, K, N, dtype):
    torch.manual_seed(M * 7 + K * 3 + N)
    for trans_a, trans_b in itertools.product([False, True], repeat=2):
        a, b, expected = _operands(M, K, N, trans_a, trans_b, dtype)
        _close(gemm(a, b, trans_a, trans_b), expected, dtype, K)
        c = torch.randn(M, N, dtype=dtype)
        _close(gemm(a, b, trans_a, trans_b, c), expected + c.double(), dtype, K)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("M,K,N", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
def test_gemm_bias_is_the_gemm_added_to_the_bias(cpu_path, M, K, N, dtype):
    # gemm_bias starts gemm_columns' tiles from the bias instead of filling C with it and
    # accumulating: the same sums in the same order, so the same bits as the fill.
    torch.manual_seed(M + K + N)
    for trans_b in (False, True):
        a, b, expected = _operands(M, K, N, False, trans_b, dtype)
        bias = torch.randn(N, dtype=dtype)
        out = gemm(a, b, False, trans_b, None, bias)
        _close(out, expected + bias.double(), dtype, K)
        assert torch.equal(out, gemm(a, b, False, trans_b, bias.expand(M, N)))


# Past the small-GEMM cut-over, C's rows whole 64-byte lines (N a multiple of 16): rows left
# after the 6- and 4-row tiles, a narrower last column block (2000 = 31 x 64 + 16), K in
# two slices (only the last one streamed); and rows of 1030 floats (not whole lines).
STREAM_SHAPES = [(301, 64, 1024), (64, 300, 2000), (23, 1100, 128), (301, 64, 1030)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("M,K,N", STREAM_SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in STREAM_SHAPES])
def test_gemm_streamed_stores_write_the_same_values(cpu_path, request, M, K, N, dtype):
    # The input GEMM writes large gates by non-temporal stores (tuning.h's
    # stream_gates_min_bytes): the same sums, so the same bits as ordinary stores. Our
    # large-GEMM kernel forced on (else it serves only AVX-512 CPUs not made by Intel), so
    # AVX2 builds run their streamed stores too.
    request.addfinalizer(lambda: torch.ops.fused_lstm.set_cpu_tuning("own_large_gemm", -1))
    torch.ops.fused_lstm.set_cpu_tuning("own_large_gemm", 1)
    torch.manual_seed(M + K + N)
    for trans_b, with_bias in itertools.product([False, True], repeat=2):
        a, b, expected = _operands(M, K, N, False, trans_b, dtype)
        bias = torch.randn(N, dtype=dtype) if with_bias else None
        out = gemm(a, b, False, trans_b, None, bias, True)
        _close(out, expected + (bias.double() if with_bias else 0), dtype, K)
        assert torch.equal(out, gemm(a, b, False, trans_b, None, bias, False))


# Our large-GEMM kernel's split between threads: columns in equal runs of whole vectors
# (800 = 50 vectors: 25 a thread on 2, 16/17/17 on 3), rows too where threads outnumber
# the 64-column runs (130 columns on 8 threads: 2 column runs x 4 row blocks of 150); K
# in two slices (2000).
SPLIT_SHAPES = [(301, 64, 800), (600, 40, 130), (97, 2000, 200), (1000, 70, 2600)]


@pytest.mark.parametrize("M,K,N", SPLIT_SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SPLIT_SHAPES])
def test_gemm_split_between_threads_changes_no_bit(cpu_path, request, M, K, N):
    # Each element's sum runs over K in the same order whichever thread, panel or tile
    # computes it: on 1, 2, 3, 5 and 8 threads the same bits, close to float64.
    if cpu_path[1] == "aten":
        pytest.skip("every GEMM runs torch's BLAS on this path, which splits its own way")
    before = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(before))
    request.addfinalizer(lambda: torch.ops.fused_lstm.set_cpu_tuning("own_large_gemm", -1))
    torch.ops.fused_lstm.set_cpu_tuning("own_large_gemm", 1)
    torch.manual_seed(M + K + N)
    for trans_a, trans_b in itertools.product([False, True], repeat=2):
        a, b, expected = _operands(M, K, N, trans_a, trans_b, torch.float32)
        bias = None if trans_a else torch.randn(N)
        outs = []
        for threads in (1, 2, 3, 5, 8):
            torch.set_num_threads(threads)
            outs.append(gemm(a, b, trans_a, trans_b, None, bias))
        _close(outs[0], expected + (0 if bias is None else bias.double()), torch.float32, K)
        assert all(torch.equal(outs[0], out) for out in outs[1:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_gemm_half_precision_through_torch(dtype):
    # No kernel of ours for 16-bit types: torch's BLAS, every entry point.
    torch.manual_seed(0)
    a, b, expected = _operands(40, 50, 60, False, True, dtype)
    bias = torch.randn(60, dtype=dtype)
    rtol, atol = HALF_VS_FLOAT64[dtype]  # atol as a share of the largest value
    for out, want in [(gemm(a, b, False, True), expected),
                      (gemm(a, b, False, True, None, bias), expected + bias.double())]:
        torch.testing.assert_close(out.double(), want, rtol=rtol,
                                   atol=atol * want.abs().max().item())


def test_gemm_ignores_what_c_held_without_it():
    # Without c (beta 0) the output buffer's old contents, NaN included, never leak in.
    torch.manual_seed(0)
    for M, K, N in [(8, 8, 8), (301, 64, 1030)]:
        a, b, expected = _operands(M, K, N, False, False, torch.float32)
        for _ in range(3):  # fresh outputs may reuse freed memory holding NaN
            junk = torch.full((M * N * 2,), float("nan"))
            del junk
            _close(gemm(a, b, False, False), expected, torch.float32, K)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(3), torch.randn(3, 4), False, False), "a and b must be 2-D"),
    ((torch.randn(3, 4), torch.randn(4, 5).double(), False, False), "must share a dtype"),
    ((torch.randn(3, 4), torch.randn(5, 6), False, False), r"op\(a\) is \[3, 4\] but op\(b\) is \[5, 6\]"),
    ((torch.randn(3, 4), torch.randn(4, 5), False, False, torch.randn(3, 4)), r"c must be \[3, 5\]"),
    ((torch.randn(3, 4), torch.randn(4, 5), False, False, None, torch.randn(4)), r"bias must be \[5\]"),
    ((torch.randn(4, 3), torch.randn(4, 5), True, False, None, torch.randn(5)), "bias only without c and trans_a"),
    ((torch.randn(3, 4), torch.randn(4, 5), False, False, torch.randn(3, 5), None, True), "stream only without c and trans_a"),
])
def test_gemm_op_errors(args, match):
    with pytest.raises(RuntimeError, match=match):
        gemm(*args)
