// The persistent recurrent kernels (cuda/persistent.cu; the partition and the phases in
// core/persistent.h): a layer's whole time loop in one launch, W_hh held in shared
// memory, where the planner allows it and the setting asks for it.
//
// The setting (op set_cuda_persistent, or FUSED_LSTM_CUDA_PERSISTENT at start): "off",
// the default until the kernels have passed on a GPU, or "on": wherever the planner
// allows (no projection, not float64, sm_80+, W_hh fits a cluster's shared memory),
// with a warning once where it does not.
#pragma once

#include <string>

#include "core/layer_driver.h"
#include "lstm.h"

namespace fused_lstm::cuda {

// Sets "on" or "off", or with "" leaves it; returns the setting now in force.
std::string set_persistent(const std::string& setting);
// Launches of the persistent kernels so far (tests: that the path ran).
int64_t persistent_launches();

// Run the layer's time loop in one launch and return true, or return false: the
// caller runs the per-step path. On the current stream.
template <typename scalar_t>
bool persistent_forward(const LayerForwardParams& p, const ForwardBuffers<scalar_t>& buf);
template <typename scalar_t>
bool persistent_backward(const LayerBackwardParams& p, const BackwardBuffers<scalar_t>& buf);

}  // namespace fused_lstm::cuda
