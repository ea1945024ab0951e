// The CPU kernels (elementwise passes, small GEMMs, the fused step), built once per CPU
// capability (kernels/{default,avx2,avx512}.cpp) from kernels/impl.h
// and chosen at run time for the running CPU, as ATen does.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace fused_lstm::cpu {

// Columns of a panel of Bf16PackedKernels::pack_columns (four AVX-512 vectors of float
// sums, or four AMX tiles).
constexpr int64_t kBf16PanelColumns = 64;

// The kernels that read a 16-bit layer (half_t: bfloat16 or float16) as stored, float32
// math and sums: the GEMMs of a one-step call (an LSTMCell, a decoding loop), where
// widening the weights to float32 every call cost more than the step (cpu/forward.cpp's
// forward_stored_weights, cpu/backward.cpp's backward_stored_workspace), and the cell
// backward on 16-bit storage. Non-null for float in every build.
template <typename scalar_t, typename half_t>
struct StoredKernels {
  // small_gemm_trans_b with A [M, K] and B [N, K] in half_t as stored (read in place), C
  // in float32: x W_ih^T and h W_hh^T. Each load widened to float (exact products, float32
  // sums), or for bfloat16 on AVX512_BF16 CPUs vdpbf16ps.
  void (*small_gemm_trans_b)(int64_t M, int64_t N, int64_t K, const half_t* A, int64_t lda,
                             const half_t* B, int64_t ldb, bool accumulate, scalar_t* C,
                             int64_t ldc);
  // small_gemm (or with trans_a small_gemm_trans_a) with A, B and C in half_t as stored,
  // each load widened to float, float32 sums, C rounded once: the one-step backward's
  // GEMMs dx = dgates W_ih, dh = dgates W_hh, dW = dgates^T x (bfloat16 on AVX512_BF16
  // CPUs takes torch's bfloat16 GEMM instead; without it that GEMM is emulated).
  void (*small_gemm)(bool trans_a, int64_t M, int64_t N, int64_t K, const half_t* A,
                     int64_t lda, const half_t* B, int64_t ldb, half_t* C, int64_t ldc);
  // backward_block with gates, cells, c_prev_step, c0, dh_extra and dgates in half_t
  // (dgates rounded; it may be gates), the math, dh and dc in float32.
  void (*backward_block)(int64_t r0, int64_t r1, int64_t u0, int64_t u1, int64_t H,
                         const half_t* gates, const half_t* cells, const half_t* c_prev_step,
                         int64_t prev_batch, const half_t* c0, const scalar_t* dh,
                         const half_t* dh_extra, scalar_t* dc, half_t* dgates);
};

// The kernels of a layer stored in bfloat16 that multiply bfloat16 operands as stored
// into float32 sums (cpu/forward.cpp's forward_stored_weights): W_ih and W_hh packed once
// a call, the input GEMM over all steps, the fused step. Two sets, each null where the CPU
// lacks it: `dot` (AVX512_BF16's vdpbf16ps, two exact products into a float32 sum per
// lane) and `amx` (AMX's tdpbf16ps on 16 x 32 tiles, Sapphire Rapids and later; the same
// exact products and float32 sums, in another order).
template <typename scalar_t>  // float (null for other types)
struct Bf16PackedKernels {
  // w [4H, K] (W_hh, K = H; or W_ih, K = I) as the layer stores it, packed in chunks of
  // 16 units x 4 gates, 0 past unit H and past K: `dot` [chunk][ceil(K / 2)][4 gates][16
  // units][2 k]; `amx` one tile per chunk, 32 k and gate, [chunk][ceil(K / 32)][4
  // gates][16 k pairs][16 units][2 k]. packed_size(H, K) elements. Chunks split between
  // threads.
  void (*pack_weights)(const c10::BFloat16* w, int64_t H, int64_t K, c10::BFloat16* out);
  int64_t k_multiple;  // packed_size's K is rounded up to it: 2, or 32 (amx)
  int64_t packed_size(int64_t H, int64_t K) const {
    return (H + 15) / 16 * 16 * 4 * ((K + k_multiple - 1) / k_multiple * k_multiple);
  }
  // gates [M, 4H] = x [M, K] W_ih^T + bias (bias [4H] or null), or with accumulate
  // gates += x W_ih^T (a one-step call's h0 W_hh^T), x in bfloat16 (K even, padded), W_ih
  // packed as above, float32 sums; threaded. With stream, gates written by non-temporal
  // stores where whole cache lines allow (`dot` only).
  void (*input_gemm)(int64_t M, int64_t H, int64_t K, const c10::BFloat16* x,
                     const c10::BFloat16* w_packed, const scalar_t* bias, bool accumulate,
                     scalar_t* gates, bool stream);
  // CpuKernels::fused_step with bfloat16 operands: h_prev rows (a_main, a_rest) and W_hh
  // (packed as above) in bfloat16, sums and the cell update in float32. h goes to h_out
  // in float32 and, rounded, to h_round [b, H], which the next step reads. H even.
  void (*fused_step)(int64_t b, int64_t H, const c10::BFloat16* a_main, int64_t split,
                     const c10::BFloat16* a_rest, const c10::BFloat16* w_packed, scalar_t* gates,
                     bool store_gates, scalar_t* c_state, scalar_t* cells, scalar_t* h_out,
                     c10::BFloat16* h_round, int64_t j0, int64_t j1);
  // b [K, N] (row-major; W_hh [4H, H] for the fused backward's dh = dgates W_hh) packed
  // in panels of kBf16PanelColumns: `dot` [panel][ceil(K / 2)][64][2 k]; `amx`
  // [panel][ceil(K / 32)][4 tiles of 16 columns][16 k pairs][16][2 k]; 0 past N and past
  // K, columns_packed_size(K, N) elements. The panels split between threads.
  void (*pack_columns)(const c10::BFloat16* b, int64_t K, int64_t N, c10::BFloat16* out);
  int64_t columns_packed_size(int64_t K, int64_t N) const {
    return (N + kBf16PanelColumns - 1) / kBf16PanelColumns * kBf16PanelColumns *
           ((K + k_multiple - 1) / k_multiple * k_multiple);
  }
  // C[M, n0:n1) = A[M, K] B[K, n0:n1), A in bfloat16, B packed by pack_columns, float32
  // sums (CpuKernels::gemm_columns without accumulate or bias): n0 a multiple of
  // kBf16PanelColumns, K even; on the calling thread.
  void (*gemm_columns)(int64_t M, int64_t n0, int64_t n1, int64_t K, const c10::BFloat16* A,
                       int64_t lda, const c10::BFloat16* b_packed, scalar_t* C, int64_t ldc);
};

template <typename scalar_t>
struct CpuKernels {
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
  // The same with A stored transposed, [K, M] (lda its row stride): C = A^T B (+ C), the
  // small weight-gradient GEMMs dgates^T x.
  void (*small_gemm_trans_a)(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                             const scalar_t* B, int64_t ldb, bool accumulate, scalar_t* C,
                             int64_t ldc);
  // The same with B stored transposed, [N, K] (ldb its row stride), read in place: C =
  // A B^T (+ C), dot products along K, for few rows of A (cpu/gemm.cpp: x W^T and h
  // W_hh^T of a one-step call, where B is too large to copy each call).
  void (*small_gemm_trans_b)(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                             const scalar_t* B, int64_t ldb, bool accumulate, scalar_t* C,
                             int64_t ldc);
  // A whole forward step (no projection; where use_fused_step in cpu/backend.h picks
  // it): the recurrent GEMM and the cell update fused per tile of rows and fused_width
  // hidden units, the gates never leaving registers in between. h_prev row r is
  // a_main[r] for r < split, else a_rest[r - split] (rows of H). w_packed: W_hh as
  // [ceil(H / fused_width)][H][4 gates][fused_width], or in gate halves (the AVX2 and
  // portable builds) [ceil(H / fused_width)][2][H][2 gates][fused_width], zero past H
  // (pack_fused_weights). gates: [b, 4H] input part in, activated out when
  // store_gates, else undefined out (AVX2's two-pass tiles keep i, f there between
  // passes); c_state: [b, H] in/out; cells, h_out: [b, H] out. h_out must not
  // overlap h_prev. Runs the tiles of hidden-unit chunks [j0, j1) (chunk j: units
  // [j * fused_width, (j + 1) * fused_width)), on the calling thread. Null for
  // half/bfloat16.
  void (*fused_step)(int64_t b, int64_t H, const scalar_t* a_main, int64_t split,
                     const scalar_t* a_rest, const scalar_t* w_packed, scalar_t* gates,
                     bool store_gates, scalar_t* c_state, scalar_t* cells, scalar_t* h_out,
                     int64_t j0, int64_t j1);
  int64_t fused_width;  // hidden units per tile (the SIMD width), 0 without fused_step
  // Packs w_hh [4H, H] (row-major) into fused_step's w_packed: each tile's weights
  // contiguous in the order the step reads them, out[j][k][q][w] = w_hh[q * H + j *
  // fused_width + w][k] (0 past unit H), or in gate halves out[j][q / 2][k][q % 2][w]:
  // gates i, f, then g, o, each half one stream. A transpose per gate and chunk, in
  // SIMD blocks (at::vec::transpose_mxn), the chunks split between threads. Null with
  // fused_step.
  void (*pack_fused_weights)(const scalar_t* w_hh, int64_t H, scalar_t* out);
  // dst[c * ld_dst + r] = src[r * ld_src + c] for src [rows, cols], on the calling thread.
  void (*transpose)(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld_src,
                    scalar_t* dst, int64_t ld_dst);
  // The fused backward step (no projection), in two halves: backward_block is
  // `backward` for rows [r0, r1) and units [u0, u1), on the calling thread;
  // gemm_columns is C[M, n0:n1) = A[M, K] B[K, n0:n1) (+ C when accumulate, else + bias
  // where not null: a row of C's columns added to every row), row-major, on the calling
  // thread (dh = dgates W_hh over a thread's own rows or units, and the large GEMMs of
  // cpu/gemm.cpp; null for half/bfloat16). With stream_c, C written by non-temporal
  // stores (the line to memory, not read first) where its rows are whole aligned cache
  // lines, for a large C read back only much later (the input GEMM's gates); then
  // ordered (sfence) before the call returns.
  void (*backward_block)(int64_t r0, int64_t r1, int64_t u0, int64_t u1, int64_t H,
                         const scalar_t* gates, const scalar_t* cells,
                         const scalar_t* c_prev_step, int64_t prev_batch, const scalar_t* c0,
                         const scalar_t* dh, const scalar_t* dh_extra, scalar_t* dc,
                         scalar_t* dgates);
  void (*gemm_columns)(int64_t M, int64_t n0, int64_t n1, int64_t K, const scalar_t* A,
                       int64_t lda, const scalar_t* B, int64_t ldb, bool accumulate,
                       const scalar_t* bias, scalar_t* C, int64_t ldc, bool stream_c);
  // The same with A stored transposed, [K, M] (lda its row stride): C = A^T B (+ C), the
  // large weight-gradient GEMMs dgates^T x written straight into C.
  void (*gemm_columns_trans_a)(int64_t M, int64_t n0, int64_t n1, int64_t K, const scalar_t* A,
                               int64_t lda, const scalar_t* B, int64_t ldb, bool accumulate,
                               const scalar_t* bias, scalar_t* C, int64_t ldc, bool stream_c);
  // Columns of gemm_columns' widest block (a multiple of fused_width; 0 without it).
  int64_t gemm_columns_width;
  // A bfloat16 layer's packed kernels (float only, AVX-512 build): vdpbf16ps on CPUs with
  // AVX512_BF16, AMX tiles on CPUs with AMX-BF16 (whose fused_width is 16 as well).
  Bf16PackedKernels<scalar_t> bf16_dot{}, bf16_amx{};
  // A 16-bit layer read as stored (StoredKernels), by its storage type.
  StoredKernels<scalar_t, c10::BFloat16> bf16{};
  StoredKernels<scalar_t, c10::Half> f16{};
  template <typename half_t>
  const StoredKernels<scalar_t, half_t>& stored() const {
    if constexpr (std::is_same_v<half_t, c10::Half>) {
      return f16;
    } else {
      return bf16;
    }
  }
};

// Packs b [K, N] (row-major) in panels of `width` columns, each contiguous:
// out[p][k][w] = b[k][p * width + w] (0 past column N), ceil(N / width) * K * width
// elements; the panels split between threads. A panel as gemm_columns' B (ldb =
// width) streams through memory in order, where b's rows, N apart, touch a new page
// per k once N * sizeof(scalar_t) reaches 4 KiB.
template <typename scalar_t>
void pack_column_panels(const scalar_t* b, int64_t K, int64_t N, int64_t width, scalar_t* out) {
  const int64_t panels = (N + width - 1) / width;
  at::parallel_for(0, panels, std::max<int64_t>(1, (int64_t{1} << 16) / (K * width)),
                   [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(width, N - p * width);
      scalar_t* dst = out + p * K * width;
      for (int64_t k = 0; k < K; ++k) {
        std::copy(b + k * N + p * width, b + k * N + p * width + cols, dst + k * width);
        std::fill(dst + k * width + cols, dst + (k + 1) * width, scalar_t(0));
      }
    }
  });
}

// One namespace per build. The avx2 and avx512 builds exist only where
// FUSED_LSTM_SIMD_BUILDS is set (GCC on x86-64).
#define FUSED_LSTM_DECLARE_CAPABILITY(ns) \
  namespace ns {                          \
  template <typename scalar_t>            \
  CpuKernels<scalar_t> cpu_kernels();     \
  }
FUSED_LSTM_DECLARE_CAPABILITY(default_cpu)
FUSED_LSTM_DECLARE_CAPABILITY(avx2)
FUSED_LSTM_DECLARE_CAPABILITY(avx512)
#undef FUSED_LSTM_DECLARE_CAPABILITY

// The kernels for the capability in use: ATen's choice for this CPU (which
// honours ATEN_CPU_CAPABILITY), unless overridden by set_cpu_capability.
template <typename scalar_t>
const CpuKernels<scalar_t>& cpu_kernels();

// "default", "avx2", "avx512", or "" to follow ATen again. Returns the capability now in use.
std::string set_cpu_capability(const std::string& capability);
std::string cpu_capability();

// The build in use as a number, for tables indexed by it (tuning.cpp).
enum CpuCapability : int { kCapabilityDefault = 0, kCapabilityAvx2 = 1, kCapabilityAvx512 = 2 };
int capability_in_use();

}  // namespace fused_lstm::cpu
