// The CUDA backend of the layer driver (core/layer_driver.h): cuBLAS and the small-batch
// step GEMM (cuda/gemm.cuh), the cell kernels (cuda/cell_kernels.cuh), everything on the
// caller's current stream under a device guard; nothing is allocated or synchronised
// inside the time loop. CudaForward (cuda/forward.cu) and CudaBackward
// (cuda/backward.cu) are one call's state.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "core/layer_driver.h"
#include "cuda/cell_kernels.cuh"
#include "cuda/gemm.cuh"
#include "lstm.h"

namespace fused_lstm::cuda {

// What CudaForward and CudaBackward share: the stream, the GEMM outside the time loop,
// the copies.
template <typename scalar_t>
struct CudaLayerBase {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A,
            int64_t lda, const scalar_t* B, int64_t ldb, at::opmath_type<scalar_t> beta,
            scalar_t* C, int64_t ldc) const {
    cuda::gemm<scalar_t>(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
  }
  void copy_rows(scalar_t* dst, const scalar_t* src, int64_t rows, int64_t cols) const {
    if (rows > 0) {
      C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(scalar_t) * rows * cols,
                                     cudaMemcpyDeviceToDevice, stream));
    }
  }
};

template <typename scalar_t>
struct CudaForward;
template <typename scalar_t>
struct CudaBackward;

struct CudaBackend {
  // The caching allocator already spares inference fresh pages: op lstm_layer runs the
  // training forward and drops its workspace.
  static constexpr bool kInferenceKeepsWorkspace = true;
  struct DeviceGuard {
    c10::cuda::CUDAGuard guard;
    explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  };
  static at::Tensor scratch(Scratch, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
    return at::empty({rows, cols}, opts);
  }
  static bool gathers_prev_hidden(const LayerBackwardParams&) { return false; }
  template <typename scalar_t>
  using Forward = CudaForward<scalar_t>;
  template <typename scalar_t>
  using Backward = CudaBackward<scalar_t>;
};

}  // namespace fused_lstm::cuda
