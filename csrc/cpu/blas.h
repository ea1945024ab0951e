// Row-major GEMM on raw pointers for the CPU kernels, with no dispatcher round
// trip and no allocation: C[M, N] = op(A) @ op(B) + beta * C, op(X) = X or X^T.
// float and double call the BLAS that libtorch_cpu carries (found at load time);
// other dtypes, or a torch built without a BLAS, go through at::addmm_out.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace fused_lstm::cpu {

template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
          const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb,
          at::opmath_type<scalar_t> beta, scalar_t* C, int64_t ldc);

}  // namespace fused_lstm::cpu
