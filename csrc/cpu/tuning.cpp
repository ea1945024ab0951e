// The CPU dispatch rules per capability (tuning.h). Values measured on one machine
// kind only say so; PERF_LOG.md ("Tuning") has the numbers.
#include "cpu/tuning.h"

#include <unistd.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

#include <cstring>

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
  t.fused_min_hidden = 128;
  t.small_step_max_batch = 8;
  t.small_step_max_weight_bytes = int64_t{1} << 19;
  t.fused_step_max_macs_one_thread = int64_t{1} << 16;
  t.fused_min_steps = 2;
  t.own_gemm_copy_min_rows = 16;
  t.own_gemm_copy_max_bytes = int64_t{64} << 10;
  t.few_rows_max_rows = 8;
  t.few_rows_max_rows_b_in_cache = 16;
  t.few_rows_b_cache_bytes = int64_t{4} << 20;
  t.row_split_min_rows = 4;
  t.row_split_max_weight_bytes = l2;
  t.beside_loop_min_steps = 16;
  t.own_gemm_max_macs = int64_t{1} << 20;
  t.own_small_gemm_max_outputs = int64_t{1} << 18;
  t.bf16_gemm_min_macs = int64_t{1} << 24;
  t.own_large_gemm = capability == kCapabilityAvx512 && !cpu_is_intel();
  // Both SIMD builds (measured on each); the portable build keeps W_hh in place (not measured).
  t.fused_backward_panels = capability != kCapabilityDefault;
  if (capability == kCapabilityDefault) {
    // The portable build has no SIMD FMA: our kernels lose to torch's BLAS sooner. Its
    // few-row GEMMs stay with torch's BLAS (not measured on it).
    t.own_gemm_max_macs = int64_t{1} << 16;
    t.few_rows_max_rows = 0;
    t.few_rows_max_rows_b_in_cache = 0;
  }
  return t;
}

}  // namespace

const CpuTuning& cpu_tuning() {
  static const CpuTuning tunings[] = {make_tuning(kCapabilityDefault),
                                      make_tuning(kCapabilityAvx2),
                                      make_tuning(kCapabilityAvx512)};
  return tunings[capability_in_use()];
}

}  // namespace fused_lstm::cpu
