// What the CPU kernels run on this machine.
#pragma once

#include <ATen/core/Dict.h>

#include <string>

namespace fused_lstm::cpu {

// As key -> value (op cpu_info; fused_lstm.backend_info): the kernel build in use and
// ATen's, the GEMM setting and each GEMM's backend, the tuning rules in force, threads
// and the threading backend.
c10::Dict<std::string, std::string> cpu_info();

}  // namespace fused_lstm::cpu
