// Picks the build of the cell kernels for the running CPU.
#include "cpu/kernels/kernels.h"

#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <atomic>

#include "cpu/kernels/prelude.h"

namespace fused_lstm::cpu {
namespace {

constexpr int kDefault = kCapabilityDefault, kAvx2 = kCapabilityAvx2, kAvx512 = kCapabilityAvx512;
constexpr const char* kNames[] = {"default", "avx2", "avx512"};

// The best build this CPU runs, as ATen decided it (ATEN_CPU_CAPABILITY included).
int supported() {
#if defined(FUSED_LSTM_SIMD_BUILDS)
  static const int best = [] {
    const std::string aten = at::get_cpu_capability();
    return aten == "AVX512" ? kAvx512 : aten == "AVX2" ? kAvx2 : kDefault;
  }();
  return best;
#else
  return kDefault;
#endif
}

std::atomic<int> forced{-1};

int in_use() {
  const int f = forced.load(std::memory_order_relaxed);
  return f >= 0 ? f : supported();
}

}  // namespace

// The table of build c. Each build's cpu_kernels() is compiled for its ISA, so even
// filling the table may use its instructions (g++ zeroes the bfloat16 table with zmm
// stores): a build the CPU lacks is never called, its slot holds the default build's
// table, and in_use() never picks it (set_cpu_capability refuses it).
template <typename scalar_t>
CpuKernels<scalar_t> build_table(int c) {
#if defined(FUSED_LSTM_SIMD_BUILDS)
  if (c > supported()) return default_cpu::cpu_kernels<scalar_t>();
  if (c == kAvx512) return avx512::cpu_kernels<scalar_t>();
  if (c == kAvx2) return avx2::cpu_kernels<scalar_t>();
#endif
  return default_cpu::cpu_kernels<scalar_t>();
}

template <typename scalar_t>
const CpuKernels<scalar_t>& cpu_kernels() {
  static const CpuKernels<scalar_t> builds[] = {
      build_table<scalar_t>(kDefault), build_table<scalar_t>(kAvx2), build_table<scalar_t>(kAvx512)};
  return builds[in_use()];
}

template const CpuKernels<float>& cpu_kernels<float>();
template const CpuKernels<double>& cpu_kernels<double>();
template const CpuKernels<at::Half>& cpu_kernels<at::Half>();
template const CpuKernels<at::BFloat16>& cpu_kernels<at::BFloat16>();

std::string set_cpu_capability(const std::string& capability) {
  if (capability.empty()) {
    forced.store(-1);
    return cpu_capability();
  }
  int wanted = -1;
  for (int c = kDefault; c <= kAvx512; ++c) {
    if (capability == kNames[c]) wanted = c;
  }
  TORCH_CHECK(wanted >= 0, "fused_lstm: unknown CPU capability '", capability,
              "'; expected default, avx2, avx512, or '' for the CPU's own");
  TORCH_CHECK(wanted <= supported(), "fused_lstm: CPU capability '", capability,
              "' is not available here; the best is '", kNames[supported()], "'");
  forced.store(wanted);
  return cpu_capability();
}

std::string cpu_capability() { return kNames[in_use()]; }

int capability_in_use() { return in_use(); }

}  // namespace fused_lstm::cpu
