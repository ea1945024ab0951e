// The CUDA layer backward: the persistent kernel where it runs (cuda/persistent.h), else
// the driver's reverse loop (core/layer_driver.h), per step one cell kernel and one
// GEMM for dh; then the weight-gradient GEMMs.
#include <torch/library.h>

#include "cuda/backend.cuh"
#include "cuda/persistent.h"

namespace fused_lstm::cuda {

template <typename scalar_t>
struct CudaBackward : CudaLayerBase<scalar_t> {
  using CudaLayerBase<scalar_t>::stream;
  const LayerBackwardParams& p;
  const int64_t H, P;

  explicit CudaBackward(const LayerBackwardParams& params) : p(params), H(p.s.H), P(p.s.P) {}

  // out[e] = a[e] + b[e] over n elements.
  void add(int64_t n, const scalar_t* a, const scalar_t* b, scalar_t* out) const {
    add_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(n, a, b, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // dh [b, H] = dr [b, P] W_hr
  void projection_gemm(int64_t b, const scalar_t* dr, scalar_t* dh) const {
    gemm<scalar_t>(false, false, b, H, P, dr, P, p.w_hr.data_ptr<scalar_t>(), H, 0, dh, H);
  }

  void cell_backward(int64_t b, const scalar_t* gates, const scalar_t* cells,
                     const scalar_t* c_prev_step, int64_t prev_batch, const scalar_t* c0,
                     const scalar_t* dh, const scalar_t* dh_extra, scalar_t* dc,
                     scalar_t* dgates) const {
    with_index_type(b, H, [&](auto index) {
      using index_t = decltype(index);
      cell_backward_kernel<scalar_t, index_t><<<blocks_for(b * H), kThreads, 0, stream>>>(
          b, H, gates, cells, c_prev_step, prev_batch, c0, dh, dh_extra, dc, dgates);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // dh [b, P] = dgates [b, 4H] W_hh
  void recurrent_gemm(int64_t b, const scalar_t* dgates, scalar_t* dh) const {
    gemm<scalar_t>(false, false, b, P, 4 * H, dgates, 4 * H, p.w_hh.data_ptr<scalar_t>(), P, 0,
                   dh, P);
  }

  // The loop in one persistent launch where it runs (cuda/persistent.h), else the
  // driver's; then the driver's weight gradients.
  FusedBackward fused(const BackwardBuffers<scalar_t>& buf,
                      const WeightGradientArgs<scalar_t>&) const {
    return persistent_backward<scalar_t>(p, buf) ? FusedBackward::kLoop
                                                 : FusedBackward::kNotRun;
  }
};

TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) {
  m.impl("lstm_layer_backward", &lstm_layer_backward_kernel<CudaBackend, false>);
  m.impl("lstm_layer_backward_overwrite_gates", &lstm_layer_backward_kernel<CudaBackend, true>);
}

}  // namespace fused_lstm::cuda
