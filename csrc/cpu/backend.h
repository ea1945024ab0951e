// The CPU backend of the layer driver (core/layer_driver.h): its GEMMs (cpu/gemm.h,
// and per step StepGemm), the cell passes of the build in use (cpu/kernels), and the
// reused scratch buffers. CpuForward (cpu/forward.cpp) and CpuBackward
// (cpu/backward.cpp) are one call's state; their fused() is the CPU's fused loop.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

#include "core/layer_driver.h"
#include "cpu/fused_loop.h"
#include "cpu/gemm.h"
#include "cpu/kernels/kernels.h"
#include "cpu/scratch.h"
#include "cpu/tuning.h"
#include "lstm.h"

namespace fused_lstm::cpu {

// The dtype the layer op running on this thread was called in, where
// ReducedPrecisionInFloat runs it in float32; Undefined otherwise. A bfloat16 layer's
// backward reads it to multiply in bfloat16 on AVX512_BF16 CPUs (CpuBackward::bf16_gemms).
inline thread_local at::ScalarType reduced_precision_call_dtype = at::ScalarType::Undefined;

// A layer kernel, for half and bfloat16 arguments, run in float32 with its results
// rounded back (but for the bfloat16 products of a bfloat16 layer on AVX512_BF16 CPUs:
// above; and 16-bit layers read as stored, bfloat16 ones fused on such CPUs and one-step
// calls, do not come here at all: forward_stored_weights in cpu/forward.cpp,
// backward_stored_workspace in cpu/backward.cpp):
// the fused loops and the GEMMs of our own have no other 16-bit kernels, and
// the per-step path in 16 bits (ATen's GEMMs, scalar cell math) ran at 0.15-0.4x of
// nn.LSTM in bfloat16 on an AVX-512 Zen 4 (PERF_LOG.md row 42). Calls with any other
// dtype, or floating arguments of mixed dtypes (which the kernel rejects), go straight
// through. `gates` of the backward that overwrites them is then a float copy, left as
// it was: the schema allows the write, nothing reads it after.
template <auto kKernel>
struct ReducedPrecisionInFloat;
template <typename Result, typename... Args, Result (*kKernel)(Args...)>
struct ReducedPrecisionInFloat<kKernel> {
  static Result call(Args... args) {
    const at::ScalarType dtype = first_floating_dtype(args...);
    bool same = dtype == at::kHalf || dtype == at::kBFloat16;
    ((same = same && floating_dtype_is(args, dtype)), ...);
    if (!same) return kKernel(args...);
    struct CallDtype {
      at::ScalarType before = reduced_precision_call_dtype;
      explicit CallDtype(at::ScalarType dtype) { reduced_precision_call_dtype = dtype; }
      ~CallDtype() { reduced_precision_call_dtype = before; }
    } call_dtype(dtype);
    Result result = kKernel(in_float(args)...);
    std::apply([&](auto&... t) { ((t = t.to(dtype)), ...); }, result);
    return result;
  }

 private:
  static bool is_floating(const at::Tensor& t) { return t.defined() && t.is_floating_point(); }
  static at::ScalarType first_floating_dtype(const Args&... args) {
    at::ScalarType dtype = at::ScalarType::Undefined;
    const auto visit = [&](const auto& a) {
      using A = std::decay_t<decltype(a)>;
      if constexpr (std::is_same_v<A, at::Tensor>) {
        if (dtype == at::ScalarType::Undefined && is_floating(a)) dtype = a.scalar_type();
      }
    };
    (visit(args), ...);
    return dtype;
  }
  template <typename A>
  static bool floating_dtype_is(const A& a, at::ScalarType dtype) {
    if constexpr (std::is_same_v<A, at::Tensor>) {
      return !is_floating(a) || a.scalar_type() == dtype;
    } else if constexpr (std::is_same_v<A, std::optional<at::Tensor>>) {
      return !a.has_value() || floating_dtype_is(*a, dtype);
    } else {
      return true;
    }
  }
  template <typename A>
  static A in_float(const A& a) {
    if constexpr (std::is_same_v<A, at::Tensor>) {
      return is_floating(a) ? a.to(at::kFloat) : a;
    } else if constexpr (std::is_same_v<A, std::optional<at::Tensor>>) {
      return a.has_value() ? std::optional<at::Tensor>(in_float(*a)) : a;
    } else {
      return a;
    }
  }
};

template <typename scalar_t>
void copy_rows(scalar_t* dst, const scalar_t* src, int64_t rows, int64_t cols) {
  if (rows > 0) std::memcpy(dst, src, sizeof(scalar_t) * rows * cols);
}

// The GEMMs inside the time loop, C[b, N] (+)= A[b, K] op(B), go through the
// register-blocked small_gemm when the batch is small and B fits in L2 (tuning.h:
// there a library call costs more in fixed overhead than in math), else through gemm().
// small_gemm wants B as row-major [K, N]: `b_kn` (may equal `b`, when not trans_b).
// `allow_small` false: gemm() always (the caller would copy B^T per call for too few
// steps, tuning.h's fused_min_steps).
template <typename scalar_t>
struct StepGemm {
  bool small;
  const CpuKernels<scalar_t>* kernels;

  static StepGemm make(int64_t max_batch, int64_t N, int64_t K, bool allow_small = true) {
    const auto& k = cpu_kernels<scalar_t>();
    const auto setting = cpu_gemm_setting();
    const CpuTuning& tuning = cpu_tuning();
    const bool fits = max_batch <= tuning.small_step_max_batch &&
                      N * K * int64_t(sizeof(scalar_t)) <= tuning.small_step_max_weight_bytes;
    const bool small = k.small_gemm != nullptr &&
                       (setting == GemmSetting::kSmall ||
                        (setting == GemmSetting::kAuto && fits && allow_small));
    return {small, &k};
  }

  void operator()(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                  const scalar_t* B, bool trans_b, const scalar_t* b_kn, bool accumulate,
                  scalar_t* C, int64_t ldc) const {
    if (small) {
      kernels->small_gemm(M, N, K, A, lda, b_kn, N, accumulate, C, ldc);
    } else {
      gemm<scalar_t>(false, trans_b, M, N, K, A, lda, B, trans_b ? K : N, accumulate ? 1 : 0,
                     C, ldc);
    }
  }
};

// Whether the loops (without a projection) run fused, the recurrent GEMM and the cell
// update per step in one pass (kernels/kernels.h), instead of a recurrent GEMM and an
// elementwise pass per step: always with the "small" setting, never with "aten", and
// with "auto" over tuning.h's fused_min_steps wherever the step GEMM is small or H
// reaches its fused_min_hidden.
inline bool use_fused_step(bool step_gemm_small, int64_t H, size_t steps) {
  const auto setting = cpu_gemm_setting();
  const CpuTuning& tuning = cpu_tuning();
  return setting == GemmSetting::kSmall ||
         (setting == GemmSetting::kAuto && int64_t(steps) >= tuning.fused_min_steps &&
          (step_gemm_small || H >= tuning.fused_min_hidden));
}

// What CpuForward and CpuBackward share: the GEMM outside the time loop, the copies,
// the kernels of the build in use.
template <typename scalar_t>
struct CpuLayerBase {
  const CpuKernels<scalar_t>& kernels = cpu_kernels<scalar_t>();

  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A,
            int64_t lda, const scalar_t* B, int64_t ldb, at::opmath_type<scalar_t> beta,
            scalar_t* C, int64_t ldc) const {
    cpu::gemm<scalar_t>(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
  void copy_rows(scalar_t* dst, const scalar_t* src, int64_t rows, int64_t cols) const {
    cpu::copy_rows(dst, src, rows, cols);
  }
};

template <typename scalar_t>
struct CpuForward;
template <typename scalar_t>
struct CpuBackward;

struct CpuBackend {
  // Inference (op lstm_layer) keeps no workspace: its gate buffer is a reused scratch.
  static constexpr bool kInferenceKeepsWorkspace = false;
  struct DeviceGuard {
    explicit DeviceGuard(const at::Tensor&) {}
  };
  static at::Tensor scratch(Scratch slot, int64_t rows, int64_t cols,
                            const at::TensorOptions& opts) {
    return scratch_buffer(slot, rows, cols, opts);
  }
  // The weight gradients beside a one-thread fused backward loop read h_prev gathered.
  static bool gathers_prev_hidden(const LayerBackwardParams& p) {
    return !p.s.has_proj && weight_gradients_beside_loop_pays(p.s.B, p.s.H, p.s.T);
  }
  template <typename scalar_t>
  using Forward = CpuForward<scalar_t>;
  template <typename scalar_t>
  using Backward = CpuBackward<scalar_t>;
};

}  // namespace fused_lstm::cpu
