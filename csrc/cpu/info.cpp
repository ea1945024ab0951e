// What the CPU kernels run on this machine (op cpu_info; fused_lstm.backend_info()).
#include "cpu/info.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include "cpu/gemm.h"
#include "cpu/kernels/kernels.h"
#include "cpu/tuning.h"
#if defined(FUSED_LSTM_WITH_CUDA)
#include "cuda/persistent.h"
#endif

namespace fused_lstm::cpu {

c10::Dict<std::string, std::string> cpu_info() {
  const CpuTuning& t = cpu_tuning();
  const bool aten_only = cpu_gemm_setting() == GemmSetting::kAten;
  const std::string torch_blas = "torch's BLAS (at::addmm)";
  c10::Dict<std::string, std::string> info;
  info.insert("cpu_capability", cpu_capability());
  info.insert("aten_cpu_capability", at::get_cpu_capability());
  info.insert("gemm_setting", cpu_gemm_setting_name());
  info.insert("gemm_small", aten_only ? torch_blas
                                      : "fused_lstm register-blocked (up to " +
                                            std::to_string(t.own_gemm_max_macs) +
                                            " multiply-adds and " +
                                            std::to_string(t.own_small_gemm_max_outputs) +
                                            " outputs)");
  const std::string rows = std::to_string(t.few_rows_max_rows);
  const std::string cache = std::to_string(t.few_rows_b_cache_bytes);
  info.insert("gemm_few_rows",
              aten_only || t.few_rows_max_rows == 0 ? torch_blas
                        : "fused_lstm, B read in place: dot products with B^T up to " + rows +
                              " rows (" + std::to_string(t.few_rows_max_rows_b_in_cache) +
                              " with B up to " + cache + " bytes); with B as stored, "
                              "register-blocked up to " + rows + " rows with B up to " + cache +
                              " bytes");
  info.insert("gemm_large", !aten_only && t.own_large_gemm ? "fused_lstm gemm_columns"
                                                           : torch_blas);
  // half/bfloat16 layers run in float32 (cpu/backend.h's ReducedPrecisionInFloat), but
  // for bfloat16 products on AVX512_BF16 CPUs (CpuForward::stored, backward_stored_workspace
  // in cpu/backward.cpp, CpuBackward::gemm), and 16-bit one-step calls of few rows
  // elsewhere (CpuForward::stored_weights_apply, the backward's widening_backward_max_rows).
  const bool bf16_kernels = cpu_kernels<float>().bf16_dot.fused_step != nullptr;
  const bool amx = cpu_kernels<float>().bf16_amx.fused_step != nullptr;
  const auto widening = [&](int64_t forward_rows) {
    return "one-step calls read the weights as stored, each load widened to float32, the "
           "forward up to " + std::to_string(forward_rows) + " rows, the backward up to " +
           std::to_string(t.widening_backward_max_rows) +
           " (dgates rounded); otherwise as half_layers";
  };
  info.insert("half_layers", "in float32, rounded back once per layer, but for "
                             "bfloat16_products and float16_products");
  info.insert("bfloat16_products",
              bf16_kernels ? "AVX512_BF16: fused loops and one-step calls, forward (h rounded "
                             "each step) and backward (dgates rounded each step), the weights "
                             "and workspace read as stored; other layers' backward large GEMMs" +
                             (amx ? std::string("; the fused loops' GEMMs (forward, backward dh) and the "
                                                    "input GEMM on AMX tiles from ") +
                                        std::to_string(t.amx_min_rows) + " rows"
                                  : std::string())
                           : "none: " + widening(t.bf16_widening_max_rows));
  info.insert("float16_products", "none: " + widening(t.f16_widening_max_rows));
  info.insert("fused_forward_min_hidden", std::to_string(t.fused_min_hidden));
  info.insert("fused_min_steps", std::to_string(t.fused_min_steps));
  info.insert("fused_backward_weights", t.fused_backward_panels ? "column panels" : "in place");
  info.insert("l2_cache_bytes", std::to_string(l2_cache_bytes()));
  info.insert("cpu_vendor_intel", cpu_is_intel() ? "yes" : "no");
  info.insert("threads", std::to_string(at::get_num_threads()));
  info.insert("parallel_backend", AT_PARALLEL_OPENMP ? "OpenMP" : "ATen native pool");
#if defined(FUSED_LSTM_WITH_CUDA)
  info.insert("cuda_kernels", "built");
  info.insert("cuda_persistent", cuda::set_persistent(""));
#else
  info.insert("cuda_kernels", "not built");
#endif
  return info;
}

}  // namespace fused_lstm::cpu
