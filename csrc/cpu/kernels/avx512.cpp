// The AVX-512 (F, BW, VL, DQ) build of the CPU cell kernels.
#include "cpu/kernels/prelude.h"

#if defined(FUSED_LSTM_SIMD_BUILDS)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// g++ does not define the ISA macros for a target pragma; Sleef's and ATen's headers test them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FUSED_LSTM_CAPABILITY_NS avx512
#include "cpu/kernels/impl.h"
#endif
