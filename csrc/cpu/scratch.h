// Buffers that live only inside one CPU op call (the inference gate buffer, and in
// backward the gate gradients and the stacked previous h), reused per thread: a fresh
// buffer costs a page fault per 4 KiB on first touch, a tenth of a large call.
#pragma once

#include <ATen/ATen.h>

#include "core/layer_driver.h"

namespace fused_lstm::cpu {

// A [rows, cols] buffer of the calling thread's `slot`, grown as needed; above 256 MiB
// allocated afresh and not kept.
at::Tensor scratch_buffer(Scratch slot, int64_t rows, int64_t cols, const at::TensorOptions& opts);

// The calling thread's raw buffer `slot` of at least `bytes`, grown as needed: for the
// GEMMs' scratches (kGemmOperand, kGemmPanels), which small GEMMs ask for every step,
// where creating a tensor would cost more than their math.
void* scratch_bytes(Scratch slot, size_t bytes);

// Frees the calling thread's reused buffers, tensors and raw (op release_cpu_scratch).
void release_scratch();

}  // namespace fused_lstm::cpu
