// The portable build of the CPU cell kernels (no ISA beyond the compiler's default).
#include "cell_kernels_prelude.h"

#define FUSED_LSTM_CAPABILITY_NS default_cpu
#include "cell_kernels_impl.h"
