// The portable build of the CPU cell kernels (no ISA beyond the compiler's default).
#include "cpu/kernels/prelude.h"

#define FUSED_LSTM_CAPABILITY_NS default_cpu
#include "cpu/kernels/impl.h"
