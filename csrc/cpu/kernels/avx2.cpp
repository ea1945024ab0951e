// The AVX2 + FMA build of the CPU cell kernels.
#include "cpu/kernels/prelude.h"

#if defined(FUSED_LSTM_SIMD_BUILDS)
#pragma GCC target("avx2,fma,f16c")
// g++ does not define the ISA macros for a target pragma; Sleef's and ATen's headers test them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FUSED_LSTM_CAPABILITY_NS avx2
#include "cpu/kernels/impl.h"
#endif
