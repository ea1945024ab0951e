// Row-major GEMM on raw pointers for the CPU kernels:
//   C[M, N] = op(A) @ op(B) + beta * C,  op(X) = X or X^T.
// Two backends, both through supported interfaces:
//   ours - the register-blocked kernels of kernels/kernels.h (float, double), for GEMMs
//          small enough that a library call's fixed cost dominates (tuning.h);
//   aten - at::cpu::addmm_out: torch's own BLAS (MKL on x86-64 builds, else what
//          torch was built with), every dtype.
// The per-step GEMMs of the time loop choose for themselves (StepGemm, cpu/backend.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <string>

namespace fused_lstm::cpu {

template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
          const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb,
          at::opmath_type<scalar_t> beta, scalar_t* C, int64_t ldc);

// C[M, N] = A[M, K] op(B) + bias, `bias` a row of N added to every row (none where null):
// the input GEMM with the LSTM's bias folded in. stream_c: C goes to memory by
// non-temporal stores where gemm_columns runs it (CpuKernels::gemm_columns), for a C too
// large to stay in cache until it is read.
template <typename scalar_t>
void gemm_bias(bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
               const scalar_t* B, int64_t ldb, const scalar_t* bias, scalar_t* C, int64_t ldc,
               bool stream_c = false);

// "auto": the fastest path by tuning.h; "aten": every GEMM through ATen and no fused
// loops (the plain path: a GEMM and an elementwise pass per step); "small": the
// per-step GEMMs through our kernel whatever their size, and the loops fused wherever
// the kernels allow. Returns the setting now in force.
enum class GemmSetting : int { kAuto = 0, kAten = 1, kSmall = 2 };
std::string set_cpu_gemm(const std::string& setting);
GemmSetting cpu_gemm_setting();

// The name of the setting in force ("auto", "aten", "small").
const char* cpu_gemm_setting_name();

}  // namespace fused_lstm::cpu
