// The fused elementwise passes of one step on the CPU, built once per CPU
// capability (cell_kernels_{default,avx2,avx512}.cpp) from cell_kernels_impl.h
// and chosen at run time for the running CPU, as ATen does.
#pragma once

#include <cstdint>
#include <string>

namespace fused_lstm::cpu {

template <typename scalar_t>
struct CellKernels {
  // gates: [b, 4H] pre-activations in, activated out; c_state: [b, H] c_prev in, c out;
  // cells, h_out: [b, H] out; h_state: [b, H] h out as well, or null.
  void (*forward)(int64_t b, int64_t H, scalar_t* gates, scalar_t* c_state, scalar_t* cells,
                  scalar_t* h_out, scalar_t* h_state);
  // gates: [b, 4H] activated; cells: [b, H] c; c_prev rows [0, prev_batch) from
  // c_prev_step, the rest from c0; dh: [b, H] (+ dh_extra [b, H] unless null);
  // dc: [b, H] dL/dc in, dL/dc_prev out; dgates: [b, 4H] dL/d(pre-activation) out.
  void (*backward)(int64_t b, int64_t H, const scalar_t* gates, const scalar_t* cells,
                   const scalar_t* c_prev_step, int64_t prev_batch, const scalar_t* c0,
                   const scalar_t* dh, const scalar_t* dh_extra, scalar_t* dc,
                   scalar_t* dgates);
  // Register-blocked C[M, N] = A[M, K] B[K, N] (+ C when accumulate), row-major with B's
  // rows contiguous: the per-step GEMM for small batches, where a BLAS call's fixed
  // cost dominates (float and double; null for half/bfloat16).
  void (*small_gemm)(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                     const scalar_t* B, int64_t ldb, bool accumulate, scalar_t* C,
                     int64_t ldc);
};

// One namespace per build. The avx2 and avx512 builds exist only where
// FUSED_LSTM_SIMD_BUILDS is set (GCC on x86-64).
#define FUSED_LSTM_DECLARE_CAPABILITY(ns) \
  namespace ns {                          \
  template <typename scalar_t>            \
  CellKernels<scalar_t> cell_kernels();   \
  }
FUSED_LSTM_DECLARE_CAPABILITY(default_cpu)
FUSED_LSTM_DECLARE_CAPABILITY(avx2)
FUSED_LSTM_DECLARE_CAPABILITY(avx512)
#undef FUSED_LSTM_DECLARE_CAPABILITY

// The kernels for the capability in use: ATen's choice for this CPU (which
// honours ATEN_CPU_CAPABILITY), unless overridden by set_cpu_capability.
template <typename scalar_t>
const CellKernels<scalar_t>& cell_kernels();

// "default", "avx2", "avx512", or "" to follow ATen again. Returns the capability now in use.
std::string set_cpu_capability(const std::string& capability);
std::string cpu_capability();

}  // namespace fused_lstm::cpu
