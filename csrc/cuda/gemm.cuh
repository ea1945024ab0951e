// The CUDA backend's GEMMs, row-major, on the current stream (cuda/gemm.cu).
#pragma once

#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fused_lstm::cuda {

// C[M, N] = op(A) op(B) + beta * C through cuBLAS, accumulating in float (double for
// double); TF32 only where torch allows it for cuBLAS.
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A,
          int64_t lda, const scalar_t* B, int64_t ldb, at::opmath_type<scalar_t> beta,
          scalar_t* C, int64_t ldc);

// A step's GEMM C[M, N] = A[M, K] W[N, K]^T + beta C: a kernel of our own for a small
// batch (cuBLAS picks slow kernels there), cuBLAS beyond.
template <typename scalar_t>
void step_gemm_nt(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                  const scalar_t* W, int64_t ldw, at::opmath_type<scalar_t> beta, scalar_t* C,
                  int64_t ldc, cudaStream_t stream);

}  // namespace fused_lstm::cuda
