// Headers every build of the cell kernels shares, included before a build
// switches on its target ISA, so that their inline functions are compiled
// (and merged by the linker) the same way in every build.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// SIMD builds need GCC's target pragma on x86-64; elsewhere only the default build exists.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSED_LSTM_SIMD_BUILDS 1
#endif
