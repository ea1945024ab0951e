// Every CPU threshold in one place. The kernels' compile-time sizes are the
// constants below; the dispatch rules are a CpuTuning, chosen at run time for the
// build of the cell kernels in use (its capability: default, AVX2, AVX-512) and,
// where a rule is about fitting in cache, the running CPU's L2. Each rule carries
// its reason here; what each was measured on, and on which machine kind, is in
// benchmarks/PERF_LOG.md ("Tuning").
#pragma once

#include <cstdint>
#include <string>

namespace fused_lstm::cpu {

// gemm_columns takes K in slices of this many bytes of a block's columns of B, so the
// row blocks after the first read them from L2.
constexpr int64_t kGemmColumnsSliceBytes = int64_t{256} << 10;
// parallel_rows (the unfused cell passes) gives a thread at least this many units.
constexpr int64_t kCellPassUnitsPerTask = 16384;

struct CpuTuning {
  // The fused loops (no projection) run at any batch from this hidden size: below it a
  // step was too little work per hidden-unit chunk to share between threads (AVX-512,
  // session 7, before the row split). The SIMD builds fuse at any H: since the row split
  // the fused loops beat the per-step GEMM at H 16-112, B 12-512 (PERF_LOG.md rows 53,
  // 67); the portable build keeps 128 (there fusing under it lost in training).
  int64_t fused_min_hidden;
  // Per-step GEMMs go through small_gemm, and the loops fuse at any hidden size, up to
  // this batch with B (W_hh^T or W_hr^T) up to small_step_max_weight_bytes: there a
  // library call costs more in fixed overhead than in math.
  int64_t small_step_max_batch;
  int64_t small_step_max_weight_bytes;
  // The fused loops, and the forward's small step GEMMs, need this many steps in a call:
  // each call first copies W_hh (packed for the fused step, or transposed for
  // small_gemm; 1 MB at H = 256), which one step does not repay (a one-step call,
  // LSTMCell's or a decoding loop's, ran at 0.2-0.5x of nn.LSTM at B1-8, H 128-512).
  // Below it the step runs gemm() on W_hh.
  int64_t fused_min_steps;
  // gemm()'s own kernels copy op(B) per call (small_gemm gathers it transposed where
  // trans_b; gemm_columns packs it in panels, always): N * K moves for M * N * K
  // multiply-adds. With fewer than own_gemm_copy_min_rows rows and op(B) over
  // own_gemm_copy_max_bytes (past L1, so the moves are slow) that copy costs more than
  // the GEMM (a one-row input GEMM at H = 512 gathered a 4 MB W_ih^T in 2 ms): ATen's
  // BLAS reads B in place instead.
  int64_t own_gemm_copy_min_rows;
  int64_t own_gemm_copy_max_bytes;
  // gemm() with few rows of A reads B in place and copies nothing: op(B) = B^T through
  // small_gemm_trans_b (dot products along K) up to few_rows_max_rows rows, or up to
  // few_rows_max_rows_b_in_cache where B is at most few_rows_b_cache_bytes (at 16 rows
  // and B of 16 MB it lost to BLAS, 0.6x on one thread, 0.9x on two; with B up to 4 MB
  // it was 0.9-1.1x on one thread and 1.1-1.6x on two); op(B) = B through small_gemm
  // up to few_rows_max_rows rows where B is at most few_rows_b_cache_bytes (at 8 rows
  // 1.4-1.8x on one thread, 1.6-2.7x on two; at 16 MB 0.5x on one). BLAS copies B every
  // call, and one-step calls (decoding, LSTMCell) are these GEMMs (AMD Zen 4, PERF_LOG.md
  // row 48). On AVX2 the limits are 32 and 128 rows (AMD Zen 3, PERF_LOG.md row 55).
  int64_t few_rows_max_rows;
  int64_t few_rows_max_rows_b_in_cache;
  int64_t few_rows_b_cache_bytes;
  // A fused step of at most this many multiply-adds (B * 4H * H) runs on one thread.
  int64_t fused_step_max_macs_one_thread;
  // The fused loops split batch rows between threads (no barrier) where each gets at
  // least this many rows and every core can keep all of W_hh in its L2
  // (row_split_max_weight_bytes, the L2 size, measured on both kinds); else they split
  // hidden units (PERF_LOG.md rows 23, 54).
  int64_t row_split_min_rows;
  int64_t row_split_max_weight_bytes;
  // The weight gradients go beside a one-thread backward loop from this many steps.
  int64_t beside_loop_min_steps;
  // A fused loop's thread waiting at a step's barrier spins this many microseconds, then
  // sleeps until woken (fused_loop.h's Progress: threads may outnumber cores).
  int64_t barrier_spin_us;
  // GEMMs outside the time loop run our register-blocked kernel up to this many
  // multiply-adds, torch's BLAS (at::addmm) above: below it ATen's fixed cost per call
  // (and BLAS's fork/join) is more than the math.
  int64_t own_gemm_max_macs;
  // ... and with at most this many elements of C: small_gemm runs on one thread, and a
  // GEMM of few multiply-adds but a large C (a one-step weight gradient, K = batch = 1:
  // M * N = 1M at H = 512) is bound by writing C, which threads share (on gemm_columns
  // where own_large_gemm, else in ATen's BLAS).
  int64_t own_small_gemm_max_outputs;
  // Larger GEMMs run our gemm_columns kernel too, else torch's BLAS: on AVX-512 where
  // that BLAS is MKL on a CPU not made by Intel, which MKL runs at half the FMA width.
  bool own_large_gemm;
  // A bfloat16 layer's backward GEMMs outside the time loop (dx, dW_ih, dW_hh) run in
  // bfloat16 (CpuBackward::gemm) from this many multiply-adds, on CPUs with AVX512_BF16:
  // below it the operands' rounding copies cost more than the faster GEMM saves.
  int64_t bf16_gemm_min_macs;
  // A 16-bit one-step forward (bfloat16 on a CPU without AVX512_BF16; float16) reads its
  // weights as stored (StoredKernels::small_gemm_trans_b, each load widened to float) up
  // to this many rows, at any weight size: each row of A widens the same vectors of B
  // again (one or two more instructions a multiply-add), so past some rows the float32
  // path, its weights widened once a call, is faster; below, that widening is most of
  // the call (PERF_LOG.md rows 57, 59, 62). float16's widening (one vcvtph2ps) costs less
  // than bfloat16's (a zero-extension and a shift).
  int64_t bf16_widening_max_rows;
  int64_t f16_widening_max_rows;
  // ... and its one-step backward reads them as stored too (StoredKernels::small_gemm,
  // each load widened) up to this many rows: its register tiles run the GEMMs more
  // slowly than the float32 path's BLAS on widened weights, which past this many rows
  // repays the widening (PERF_LOG.md rows 58, 59).
  int64_t widening_backward_max_rows;
  // The input GEMM writes gates [N, 4H] of at least this many bytes by non-temporal
  // stores (where our kernels run it: gemm_columns, AVX-512 CPUs not made by Intel;
  // input_gemm_bf16): the time loop reads them only after the whole GEMM, and an
  // ordinary store first reads each line it writes from memory. The loop's reads of
  // those gates are prefetched (fused_step) either way (PERF_LOG.md row 63).
  int64_t stream_gates_min_bytes;
  // A bfloat16 layer's forward GEMMs with bfloat16 operands (the input GEMM, the fused
  // step) run on AMX tiles (Bf16PackedKernels::amx) from this many rows, where the CPU
  // has AMX: a tile's 16 x 16 x 32 multiply-adds cost the same at any row count, so with
  // few rows vdpbf16ps is faster.
  int64_t amx_min_rows;
  // ... and its fused loop splits rows between threads only from this many rows a
  // thread (else hidden units): an AMX tile costs the same for 1 row as for 16, so each
  // thread's rows should fill tiles.
  int64_t amx_row_split_min_rows;
  // The fused backward loop's dh = dgates W_hh reads W_hh packed in column panels
  // (pack_column_panels), not in place: W_hh's rows, H apart, touch a new page per k
  // from H = 1024 floats, and the in-place loop lost to BLAS once W_hh left L2.
  bool fused_backward_panels;
};

// The rules for the capability in use (kernels/kernels.h) on this CPU.
const CpuTuning& cpu_tuning();

// Sets one integer rule of the capability in use, by its field name ("fused_min_hidden",
// ...; bools as 0 / 1), and returns its previous value; value -1 restores the default.
// For experiments and tests that measure or cross a threshold on the machine at hand
// (op set_cpu_tuning); not thread-safe against running kernels.
int64_t set_cpu_tuning(const std::string& name, int64_t value);

// Whether M rows of A against a B^T of b_bytes go through the dot-product kernel, B read
// in place (few_rows_*): gemm()'s rule, and a one-step bfloat16 layer's.
inline bool few_rows_dot(const CpuTuning& t, int64_t M, int64_t b_bytes) {
  return M <= t.few_rows_max_rows ||
         (M <= t.few_rows_max_rows_b_in_cache && b_bytes <= t.few_rows_b_cache_bytes);
}

// The running CPU's L2 size per core in bytes (sysconf), or 0 where it cannot be read.
int64_t l2_cache_bytes();

// Whether the CPU's vendor string (cpuid) is GenuineIntel.
bool cpu_is_intel();

}  // namespace fused_lstm::cpu
