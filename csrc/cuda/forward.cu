// The CUDA layer forward: the persistent kernel where it runs (cuda/persistent.h), else
// the driver's loop (core/layer_driver.h), per step one recurrent GEMM into the gate
// buffer and one cell kernel.
#include <torch/library.h>

#include "cuda/backend.cuh"
#include "cuda/persistent.h"

namespace fused_lstm::cuda {

template <typename scalar_t>
struct CudaForward : CudaLayerBase<scalar_t> {
  using CudaLayerBase<scalar_t>::stream;
  const LayerForwardParams& p;
  const int64_t H, P;

  explicit CudaForward(const LayerForwardParams& params) : p(params), H(p.s.H), P(p.s.P) {}

  // gates [N, 4H] = x [N, I] W_ih^T + (b_ih + b_hh): the bias in every row, then the GEMM
  // adds into it.
  void input_gemm(scalar_t* gates) const {
    const bool has_bias = p.b_ih.defined() && p.s.N > 0;
    if (has_bias) {
      at::from_blob(gates, {p.s.N, 4 * H}, p.input.options())
          .copy_((p.b_ih + p.b_hh).expand({p.s.N, 4 * H}));
    }
    this->gemm(false, true, p.s.N, 4 * H, p.s.I, p.input.data_ptr<scalar_t>(), p.s.I,
               p.w_ih.data_ptr<scalar_t>(), p.s.I, has_bias ? 1 : 0, gates, 4 * H);
  }

  // g [b, 4H] += h [b, P] W_hh^T
  void recurrent_gemm(int64_t b, const scalar_t* h, scalar_t* g) const {
    step_gemm_nt<scalar_t>(b, 4 * H, P, h, P, p.w_hh.data_ptr<scalar_t>(), P, 1, g, 4 * H,
                           stream);
  }

  void cell_forward(int64_t b, scalar_t* g, scalar_t* c_state, scalar_t* cells, scalar_t* h_out,
                    scalar_t* h_state) const {
    with_index_type(b, H, [&](auto index) {
      using index_t = decltype(index);
      cell_forward_kernel<scalar_t, index_t><<<blocks_for(b * H), kThreads, 0, stream>>>(
          b, H, g, c_state, cells, h_out, h_state);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // r [b, P] = h [b, H] W_hr^T
  void projection_gemm(int64_t b, const scalar_t* h, scalar_t* r) const {
    step_gemm_nt<scalar_t>(b, P, H, h, H, p.w_hr.data_ptr<scalar_t>(), H, 0, r, P, stream);
  }

  // The whole loop in one persistent launch where it runs (cuda/persistent.h), else
  // the driver's.
  bool fused(const ForwardBuffers<scalar_t>& buf) const {
    return persistent_forward<scalar_t>(p, buf);
  }
};

TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_kernel<CudaBackend>);
  m.impl("lstm_layer", &lstm_layer_kernel<CudaBackend>);
}

}  // namespace fused_lstm::cuda
