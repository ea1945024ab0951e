// The CPU dispatch rules per capability (tuning.h). Values measured on one machine
// kind only say so; PERF_LOG.md ("Tuning") has the numbers.
#include "cpu/tuning.h"

#include <unistd.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include <cstring>
#include <type_traits>

#include <c10/util/Exception.h>

#include "cpu/kernels/kernels.h"

namespace fused_lstm::cpu {

int64_t l2_cache_bytes() {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? int64_t(v) : int64_t(0);
  }();
  return bytes;
#else
  return 0;
#endif
}

bool cpu_is_intel() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool intel = [] {
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) return false;
    char vendor[13] = {};
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    return std::strcmp(vendor, "GenuineIntel") == 0;
  }();
  return intel;
#else
  return false;
#endif
}

namespace {

CpuTuning make_tuning(int capability) {
  // Where the L2 is unknown, 1 MiB (the AVX-512 machine's, where the rule was measured).
  const int64_t l2 = l2_cache_bytes() > 0 ? l2_cache_bytes() : int64_t{1} << 20;
  CpuTuning t{};
  // The SIMD builds: any H (the AVX2-only kind, session 24; AVX-512 on AMD Zen 4, session
  // 30: H 16-112 at batch 12-512, 1.1-2.0x faster than the per-step path in every dtype,
  // PERF_LOG.md row 67); the portable build 128 (on itself, session 30: fusing under it
  // ran forward at 0.94-1.6x of its per-step path but training at 0.6x).
  t.fused_min_hidden = capability == kCapabilityDefault ? 128 : 1;
  t.small_step_max_batch = 8;
  t.small_step_max_weight_bytes = int64_t{1} << 19;
  t.fused_step_max_macs_one_thread = int64_t{1} << 16;
  t.fused_min_steps = 2;
  t.own_gemm_copy_min_rows = 16;
  t.own_gemm_copy_max_bytes = int64_t{64} << 10;
  // AVX2: 32 / 128 (the AVX2-only kind, session 24: MKL's small-M GEMM on this AMD CPU
  // copies B and runs its slower path; the dot kernel led to 48 rows with B of 16 MB
  // and to 128 with B of 4 MB, PERF_LOG.md row 55); AVX-512: 8 / 16 (row 48).
  t.few_rows_max_rows = capability == kCapabilityAvx2 ? 32 : 8;
  t.few_rows_max_rows_b_in_cache = capability == kCapabilityAvx2 ? 128 : 16;
  t.few_rows_b_cache_bytes = int64_t{4} << 20;
  // AVX2: 8 (the AVX2-only kind, session 24: with 5-6 rows a thread the unit split ran
  // 4-10% faster at H 128, level at 4 rows, rows ahead from 8); AVX-512: 4 (session 10).
  t.row_split_min_rows = capability == kCapabilityAvx2 ? 8 : 4;
  t.row_split_max_weight_bytes = l2;
  t.beside_loop_min_steps = 16;
  // Measured on the AVX-512 kind (AMD Zen 5, 2 cores, session 34; PERF_LOG row 72): at
  // 2 threads 2-50 us alike (B8 H128, B32 H256, B16 H1024, forward and train); at 4 and 8
  // threads on those 2 cores B8 H128 T256 forward 284 / 575 ms spinning 1 ms, 24 / 52 at
  // 50 us, 15 / 36 at 20, 10 / 36 at 10 (nn.LSTM 26 / 31); 10 us read slower in training
  // at 2 threads in one of two runs.
  t.barrier_spin_us = 20;
  t.own_gemm_max_macs = int64_t{1} << 20;
  t.own_small_gemm_max_outputs = int64_t{1} << 18;
  t.bf16_gemm_min_macs = int64_t{1} << 24;
  // Measured on AVX2 (the AVX2-only kind, session 25); AVX-512 CPUs without AVX512_BF16
  // take the same (not measured).
  t.bf16_widening_max_rows = 8;
  // Measured on both kinds, against the float32 path: AVX2 (Zen 3, session 27) 1.2-3.7x at
  // 12-16 rows, 1.06-3.1x at 32, 1.06x at 48, 0.7-1.15x at 64; AVX-512 (Zen 4, session
  // 28) 1.9-5.3x at 8-16 rows, 1.6-2.5x at 32, 2.1x at 48 (H 1024), 0.74x at 64 (H 512).
  t.f16_widening_max_rows = 32;
  // Measured on AVX2 (the AVX2-only kind; bfloat16 in session 26: 1.1x at 16-32 rows,
  // 0.9x at 64, 0.7x at 128-256 against the float32 path's BLAS; float16 in session 27:
  // 1.0-1.8x at 32, 1.4x at 48, 0.94-1.10x at 64, 0.75-0.85x at 96-128); float16 on
  // AVX-512 (Zen 4, session 28, a train step with the forward's rule alike: 1.05-4.5x at
  // 8-16 rows, 1.09-1.91x at 32, 1.00x at 48, 0.90x at 64); bfloat16 on AVX-512 CPUs
  // without AVX512_BF16 takes the same (not measured).
  t.widening_backward_max_rows = 32;
  t.own_large_gemm = capability == kCapabilityAvx512 && !cpu_is_intel();
  // Measured on AVX-512 (Zen 4, session 29): gates of 0.5-2 MB level, 4 MB 1.07x,
  // 6.5-13 MB 1.03-1.04x, 52 MB 1.00x (float32 forward); bfloat16 1.03-1.07x at 13-52 MB.
  t.stream_gates_min_bytes = int64_t{4} << 20;
  // Measured on the AVX-512 kind (Intel, Sapphire Rapids class, AMX; session 33): AMX
  // ran the bfloat16 forward 1.1-1.7x faster than vdpbf16ps at 2 rows (H 128-512), 1.3-2.5x
  // at 4, 2.2-3.6x at 8-16; its row split at 16 rows a thread 1.18x the unit split (B32
  // H256; fused_loop.h's bf16_loop_split adds a rule on W_hh's size).
  t.amx_min_rows = 2;
  t.amx_row_split_min_rows = 16;
  // Both SIMD builds (measured on each); the portable build keeps W_hh in place (not measured).
  t.fused_backward_panels = capability != kCapabilityDefault;
  if (capability == kCapabilityDefault) {
    // The portable build has no SIMD FMA: our kernels lose to torch's BLAS sooner. Its
    // few-row GEMMs stay with torch's BLAS (not measured on it), its one-step bfloat16
    // backward in float32.
    t.own_gemm_max_macs = int64_t{1} << 16;
    t.few_rows_max_rows = 0;
    t.few_rows_max_rows_b_in_cache = 0;
    // Nor do its 16-bit one-step forwards read their weights as stored (not measured).
    t.bf16_widening_max_rows = 0;
    t.f16_widening_max_rows = 0;
    // Its widening one-step backward ran at 0.4-0.9x of the float32 path at B 1-16 (the
    // AVX2-only kind, session 26, in-process).
    t.widening_backward_max_rows = 0;
  }
  return t;
}

CpuTuning& tuning_of(int capability) {
  static CpuTuning tunings[] = {make_tuning(kCapabilityDefault), make_tuning(kCapabilityAvx2),
                                make_tuning(kCapabilityAvx512)};
  return tunings[capability];
}

// The integer rules by name, for set_cpu_tuning.
template <typename F>
void for_each_rule(CpuTuning& t, const F& f) {
  f("fused_min_hidden", t.fused_min_hidden);
  f("small_step_max_batch", t.small_step_max_batch);
  f("small_step_max_weight_bytes", t.small_step_max_weight_bytes);
  f("fused_min_steps", t.fused_min_steps);
  f("own_gemm_copy_min_rows", t.own_gemm_copy_min_rows);
  f("own_gemm_copy_max_bytes", t.own_gemm_copy_max_bytes);
  f("few_rows_max_rows", t.few_rows_max_rows);
  f("few_rows_max_rows_b_in_cache", t.few_rows_max_rows_b_in_cache);
  f("few_rows_b_cache_bytes", t.few_rows_b_cache_bytes);
  f("fused_step_max_macs_one_thread", t.fused_step_max_macs_one_thread);
  f("row_split_min_rows", t.row_split_min_rows);
  f("row_split_max_weight_bytes", t.row_split_max_weight_bytes);
  f("beside_loop_min_steps", t.beside_loop_min_steps);
  f("barrier_spin_us", t.barrier_spin_us);
  f("own_gemm_max_macs", t.own_gemm_max_macs);
  f("own_small_gemm_max_outputs", t.own_small_gemm_max_outputs);
  f("own_large_gemm", t.own_large_gemm);
  f("bf16_gemm_min_macs", t.bf16_gemm_min_macs);
  f("bf16_widening_max_rows", t.bf16_widening_max_rows);
  f("f16_widening_max_rows", t.f16_widening_max_rows);
  f("widening_backward_max_rows", t.widening_backward_max_rows);
  f("stream_gates_min_bytes", t.stream_gates_min_bytes);
  f("fused_backward_panels", t.fused_backward_panels);
  f("amx_min_rows", t.amx_min_rows);
  f("amx_row_split_min_rows", t.amx_row_split_min_rows);
}

}  // namespace

const CpuTuning& cpu_tuning() { return tuning_of(capability_in_use()); }

int64_t set_cpu_tuning(const std::string& name, int64_t value) {
  TORCH_CHECK(value >= -1, "fused_lstm: set_cpu_tuning: value must be >= 0, or -1 for the default");
  const int capability = capability_in_use();
  CpuTuning defaults = make_tuning(capability);
  int64_t previous = -1, fallback = -1;
  for_each_rule(defaults, [&](const char* rule, auto& field) {
    if (name == rule) fallback = int64_t(field);
  });
  for_each_rule(tuning_of(capability), [&](const char* rule, auto& field) {
    if (name != rule) return;
    using T = std::remove_reference_t<decltype(field)>;
    previous = int64_t(field);
    field = static_cast<T>(value == -1 ? fallback : value);
  });
  TORCH_CHECK(previous != -1, "fused_lstm: set_cpu_tuning: unknown rule '", name, "'");
  return previous;
}

}  // namespace fused_lstm::cpu
