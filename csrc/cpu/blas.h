// Row-major GEMM on raw pointers for the CPU kernels:
//   C[M, N] = op(A) @ op(B) + beta * C,  op(X) = X or X^T.
// Three backends:
//   blas   - the Fortran BLAS that libtorch_cpu carries (MKL on x86), called directly:
//            no dispatcher round trip, no allocation; float and double.
//   onednn - ATen's oneDNN matmul (JIT brgemm): faster for large float GEMMs with a
//            small M, such as the per-step recurrent GEMM, but ~15 us per call.
//   aten   - at::addmm_out: every dtype, any torch build.
// "auto" picks oneDNN for large float GEMMs, else BLAS, else ATen.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <string>

namespace fused_lstm::cpu {

template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
          const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb,
          at::opmath_type<scalar_t> beta, scalar_t* C, int64_t ldc);

// "auto", "blas", "onednn", "aten", or "small" (the per-step GEMMs run the
// register-blocked kernel of cell_kernels.h whatever their size; other GEMMs as
// "auto"). A backend that cannot run a GEMM falls back: onednn -> blas -> aten.
// Returns the setting now in force.
std::string set_cpu_gemm(const std::string& backend);

enum class GemmSetting : int { kAuto = 0, kBlas = 1, kOneDnn = 2, kAten = 3, kSmall = 4 };
GemmSetting cpu_gemm_setting();

}  // namespace fused_lstm::cpu
