// CUDA kernels for the fused LSTM layer (TORCH_LIBRARY_IMPL CUDA).
// Mirrors cpu/lstm_cpu.cpp: input GEMM over all steps (cuBLAS), then per step
// one recurrent GEMM into the gate buffer and one fused elementwise kernel
// built from cell_math.h. Everything runs on the caller's current stream under
// a device guard; nothing is allocated or synchronised inside the time loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "../cell_math.h"
#include "../lstm.h"
#include "../weight_gradients.h"

namespace fused_lstm::cuda {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
struct CublasType;
template <>
struct CublasType<float> { static constexpr cudaDataType_t value = CUDA_R_32F; };
template <>
struct CublasType<double> { static constexpr cudaDataType_t value = CUDA_R_64F; };
template <>
struct CublasType<at::Half> { static constexpr cudaDataType_t value = CUDA_R_16F; };
template <>
struct CublasType<at::BFloat16> { static constexpr cudaDataType_t value = CUDA_R_16BF; };

// Row-major C[M, N] = op(A) op(B) + beta * C on the current stream, accumulating
// in float (double for double); TF32 only where torch allows it for cuBLAS.
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A,
          int64_t lda, const scalar_t* B, int64_t ldb, at::opmath_type<scalar_t> beta,
          scalar_t* C, int64_t ldc) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (M == 0 || N == 0) return;
  const bool fits_int = std::max({M, N, K, lda, ldb, ldc}) <= INT_MAX;
  if (K == 0 || !fits_int) {
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value)
                          .device(at::kCUDA, c10::cuda::current_device());
    auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
      return trans ? at::from_blob(const_cast<scalar_t*>(p), {cols, rows}, {ld, 1}, opts).t()
                   : at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1}, opts);
    };
    auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
    at::addmm_out(c, c, view(A, M, K, lda, trans_a), view(B, K, N, ldb, trans_b), beta, 1);
    return;
  }
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  constexpr bool is_double = std::is_same_v<scalar_t, double>;
  cublasComputeType_t compute = is_double ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  if (std::is_same_v<scalar_t, float> && at::globalContext().allowTF32CuBLAS()) {
    compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  }
  const opmath_t alpha = 1;
  const auto type = CublasType<scalar_t>::value;
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
      static_cast<int>(N), static_cast<int>(M), static_cast<int>(K), &alpha, B, type,
      static_cast<int>(ldb), A, type, static_cast<int>(lda), &beta, C, type,
      static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

// A forward step's GEMM at a small batch: C[M, N] = A[M, K] W[N, K]^T + beta C, M <=
// kSmallBatchRows. cuBLAS picked a 23 us kernel (and a memset) for the [8, 128] x
// [128, 512] step on an H200 (benchmarks/PERF_LOG.md, GPU run 5). One warp per output
// column n: its lanes split K (W's row n read coalesced), each row's sum in a
// register, then a warp reduction.
constexpr int kSmallBatchRows = 8;

template <typename scalar_t>
__global__ void small_batch_gemm_nt_kernel(int M, int N, int K, const scalar_t* __restrict__ A,
                                           int lda, const scalar_t* __restrict__ W, int ldw,
                                           at::opmath_type<scalar_t> beta,
                                           scalar_t* __restrict__ C, int ldc) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kWarp = 32;
  const int lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  for (int n = blockIdx.x * warps + threadIdx.x / kWarp; n < N; n += gridDim.x * warps) {
    opmath_t acc[kSmallBatchRows] = {};
    const scalar_t* w = W + static_cast<int64_t>(n) * ldw;
    for (int k = lane; k < K; k += kWarp) {
      const opmath_t w_k = w[k];
#pragma unroll
      for (int r = 0; r < kSmallBatchRows; ++r) {
        if (r < M) acc[r] += static_cast<opmath_t>(A[static_cast<int64_t>(r) * lda + k]) * w_k;
      }
    }
#pragma unroll
    for (int r = 0; r < kSmallBatchRows; ++r) {
      opmath_t sum = acc[r];
      for (int offset = kWarp / 2; offset > 0; offset /= 2) {
        sum += __shfl_down_sync(0xffffffffu, sum, offset);
      }
      if (lane == 0 && r < M) {
        scalar_t& c = C[static_cast<int64_t>(r) * ldc + n];
        c = beta == opmath_t(0) ? sum : beta * static_cast<opmath_t>(c) + sum;
      }
    }
  }
}

// The forward's step GEMMs, C[M, N] = A[M, K] W[N, K]^T + beta C: the kernel above up
// to kSmallBatchRows rows, cuBLAS beyond.
template <typename scalar_t>
void step_gemm_nt(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                  const scalar_t* W, int64_t ldw, at::opmath_type<scalar_t> beta, scalar_t* C,
                  int64_t ldc, cudaStream_t stream) {
  const bool fits_int = std::max({N, K, lda, ldw, ldc}) <= INT_MAX;
  if (M > kSmallBatchRows || K == 0 || !fits_int) {
    gemm<scalar_t>(false, true, M, N, K, A, lda, W, ldw, beta, C, ldc);
    return;
  }
  if (M == 0 || N == 0) return;
  constexpr int kWarpsPerBlock = kThreads / 32;
  const int blocks = static_cast<int>(std::min<int64_t>((N + kWarpsPerBlock - 1) / kWarpsPerBlock, 4096));
  small_batch_gemm_nt_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
      static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), A, static_cast<int>(lda), W,
      static_cast<int>(ldw), beta, C, static_cast<int>(ldc));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Fused forward for one step, one thread per hidden unit (grid-stride).
//   gates: [b, 4H] pre-activations in, activated out; c_state: [b, H] c_prev in, c out;
//   cells, h_out: [b, H] out; h_state: [b, H] out too, or null.
template <typename scalar_t, typename index_t>
__global__ void cell_forward_kernel(index_t b, index_t H, scalar_t* __restrict__ gates,
                                    scalar_t* __restrict__ c_state, scalar_t* __restrict__ cells,
                                    scalar_t* __restrict__ h_out, scalar_t* __restrict__ h_state) {
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t units = b * H;
  for (index_t u = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = u / H, k = u - r * H;
    scalar_t* g = gates + r * 4 * H;
    opmath_t i = g[k], f = g[H + k], gg = g[2 * H + k], o = g[3 * H + k];
    const opmath_t c_prev = c_state[u];
    opmath_t c, h;
    cell_forward(i, f, gg, o, c_prev, c, h);
    g[k] = i;
    g[H + k] = f;
    g[2 * H + k] = gg;
    g[3 * H + k] = o;
    c_state[u] = c;
    cells[u] = c;
    h_out[u] = h;
    if (h_state != nullptr) h_state[u] = h;
  }
}

// Fused backward for one step.
//   gates: [b, 4H] activated; cells: [b, H] c; c_prev rows [0, prev_batch) from
//   c_prev_step, the rest from c0; dh: [b, H] (+ dh_extra unless null);
//   dc: [b, H] dL/dc in, dL/dc_prev out; dgates: [b, 4H] out, may be gates itself (each
//   thread reads its four gates before it writes their gradients; hence no __restrict__).
template <typename scalar_t, typename index_t>
__global__ void cell_backward_kernel(index_t b, index_t H, const scalar_t* gates,
                                     const scalar_t* __restrict__ cells,
                                     const scalar_t* __restrict__ c_prev_step, index_t prev_batch,
                                     const scalar_t* __restrict__ c0,
                                     const scalar_t* __restrict__ dh,
                                     const scalar_t* __restrict__ dh_extra,
                                     scalar_t* __restrict__ dc, scalar_t* dgates) {
  using opmath_t = at::opmath_type<scalar_t>;
  const index_t units = b * H;
  for (index_t u = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; u < units;
       u += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t r = u / H, k = u - r * H;
    const scalar_t* g = gates + r * 4 * H;
    const opmath_t i = g[k], f = g[H + k], gg = g[2 * H + k], o = g[3 * H + k];
    const opmath_t c_prev = r < prev_batch ? c_prev_step[u] : c0[u];
    opmath_t dh_unit = dh[u];
    if (dh_extra != nullptr) dh_unit += static_cast<opmath_t>(dh_extra[u]);
    opmath_t di, df, dg, do_, dc_prev;
    cell_backward(i, f, gg, o, c_prev, static_cast<opmath_t>(cells[u]), dh_unit,
                  static_cast<opmath_t>(dc[u]), di, df, dg, do_, dc_prev);
    scalar_t* dg_row = dgates + r * 4 * H;
    dg_row[k] = di;
    dg_row[H + k] = df;
    dg_row[2 * H + k] = dg;
    dg_row[3 * H + k] = do_;
    dc[u] = dc_prev;
  }
}

// out[e] = a[e] + b[e] over n elements.
template <typename scalar_t>
__global__ void add_kernel(int64_t n, const scalar_t* __restrict__ a,
                           const scalar_t* __restrict__ b, scalar_t* __restrict__ out) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[e] = static_cast<opmath_t>(a[e]) + static_cast<opmath_t>(b[e]);
  }
}

int blocks_for(int64_t units) {
  return static_cast<int>(std::min<int64_t>((units + kThreads - 1) / kThreads, int64_t{1} << 20));
}

// 32-bit index math whenever a step's gate block fits (it almost always does).
template <typename Launch>
void with_index_type(int64_t b, int64_t H, const Launch& launch) {
  if (b * 4 * H <= INT32_MAX) {
    launch(int32_t{0});
  } else {
    launch(int64_t{0});
  }
}

template <typename scalar_t>
void copy_rows(scalar_t* dst, const scalar_t* src, int64_t rows, int64_t cols,
               cudaStream_t stream) {
  if (rows > 0) {
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, sizeof(scalar_t) * rows * cols,
                                   cudaMemcpyDeviceToDevice, stream));
  }
}

}  // namespace

ForwardResult lstm_layer_forward_cuda(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  const LayerSizes s = check_forward_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  const auto [N, T, B, I, H, P, has_proj] = s;
  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto steps = make_schedule(batch_sizes, reverse);

  const at::Tensor x = input.contiguous();
  const at::Tensor w_ih_c = w_ih.contiguous(), w_hh_c = w_hh.contiguous();
  const at::Tensor w_hr_c = has_proj ? w_hr->contiguous() : at::Tensor();
  const auto opts = input.options();
  at::Tensor gates = at::empty({N, 4 * H}, opts);  // [N, 4H]
  at::Tensor output = at::empty({N, P}, opts);     // [N, P]
  at::Tensor cells = at::empty({N, H}, opts);      // [N, H]
  at::Tensor hiddens = has_proj ? at::empty({N, H}, opts) : at::empty({0}, opts);
  at::Tensor h_n = h0.contiguous().clone();  // [B, P], the running h state
  at::Tensor c_n = c0.contiguous().clone();  // [B, H], the running c state
  const bool has_bias = b_ih.has_value();
  if (has_bias && N > 0) gates.copy_((*b_ih + *b_hh).expand({N, 4 * H}));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "lstm_layer_forward_cuda", [&] {
    scalar_t* gate_buffer = gates.data_ptr<scalar_t>();
    scalar_t* h_state = h_n.data_ptr<scalar_t>();
    scalar_t* c_state = c_n.data_ptr<scalar_t>();
    scalar_t* out_p = output.data_ptr<scalar_t>();
    scalar_t* cells_p = cells.data_ptr<scalar_t>();
    scalar_t* hiddens_p = has_proj ? hiddens.data_ptr<scalar_t>() : nullptr;
    const scalar_t* w_hh_p = w_hh_c.data_ptr<scalar_t>();
    // Input GEMM over all steps, bias folded in: gates = x W_ih^T + (b_ih + b_hh).
    gemm<scalar_t>(false, true, N, 4 * H, I, x.data_ptr<scalar_t>(), I,
                   w_ih_c.data_ptr<scalar_t>(), I, has_bias ? 1 : 0, gate_buffer, 4 * H);
    for (const Step& step : steps) {
      const int64_t b = step.batch;
      if (b == 0) continue;
      scalar_t* g = gate_buffer + step.offset * 4 * H;
      // Recurrent GEMM: gates[t] += h_state[:b] W_hh^T
      step_gemm_nt<scalar_t>(b, 4 * H, P, h_state, P, w_hh_p, P, 1, g, 4 * H, stream);
      scalar_t* h_t = has_proj ? hiddens_p + step.offset * H : out_p + step.offset * H;
      with_index_type(b, H, [&](auto index) {
        using index_t = decltype(index);
        cell_forward_kernel<scalar_t, index_t><<<blocks_for(b * H), kThreads, 0, stream>>>(
            b, H, g, c_state, cells_p + step.offset * H, h_t, has_proj ? nullptr : h_state);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      if (has_proj) {
        // Projection: r_t = h_t W_hr^T, both the output and the next h.
        scalar_t* r_t = out_p + step.offset * P;
        step_gemm_nt<scalar_t>(b, P, H, h_t, H, w_hr_c.data_ptr<scalar_t>(), H, 0, r_t, P, stream);
        copy_rows(h_state, r_t, b, P, stream);
      }
    }
  });
  return {output, h_n, c_n, gates, cells, hiddens};
}

// The caching allocator already spares inference fresh pages: run the forward and
// drop its workspace.
LayerResult lstm_layer_cuda(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  auto [output, h_n, c_n, gates, cells, hiddens] =
      lstm_layer_forward_cuda(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
  return {output, h_n, c_n};
}

// Ops lstm_layer_backward and, kOverwriteGates, lstm_layer_backward_overwrite_gates
// (the gate gradients over the gates instead of a buffer of their own).
template <bool kOverwriteGates>
BackwardResult lstm_layer_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input) {
  const LayerSizes s = check_backward_args(grad_output, grad_h_n, grad_c_n, input, batch_sizes,
                                           h0, c0, w_ih, w_hh, w_hr, output, gates, cells,
                                           hiddens);
  const auto [N, T, B, I, H, P, has_proj] = s;
  const c10::cuda::CUDAGuard device_guard(input.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto steps = make_schedule(batch_sizes, reverse);

  const at::Tensor x = input.contiguous(), h0_c = h0.contiguous(), c0_c = c0.contiguous();
  const at::Tensor w_ih_c = w_ih.contiguous(), w_hh_c = w_hh.contiguous();
  const at::Tensor w_hr_c = has_proj ? w_hr->contiguous() : at::Tensor();
  const at::Tensor grad_out_c = grad_output.contiguous(), output_c = output.contiguous();
  const at::Tensor gates_c = gates.contiguous(), cells_c = cells.contiguous();
  const at::Tensor hiddens_c = hiddens.contiguous();
  const auto opts = input.options();
  // [N, 4H] dL/d(pre-activation); with kOverwriteGates over gates_c (gates itself, or a
  // contiguous copy of our own).
  at::Tensor grad_gates = kOverwriteGates ? gates_c : at::empty({N, 4 * H}, opts);
  at::Tensor grad_h = grad_h_n.contiguous().clone();    // [B, P] running dL/dh
  at::Tensor grad_c = grad_c_n.contiguous().clone();    // [B, H] running dL/dc
  // [N, P] the h each step began from, gathered only when the batch varies.
  at::Tensor h_prev =
      prev_hidden_terms(steps, reverse).empty() ? at::empty({N, P}, opts) : at::Tensor();
  at::Tensor grad_r = has_proj ? at::empty({N, P}, opts) : at::Tensor();       // [N, P]
  at::Tensor grad_hidden = has_proj ? at::empty({B, H}, opts) : at::Tensor();  // [B, H]
  at::Tensor grad_input = at::empty({need_grad_input ? N : 0, I}, opts);
  at::Tensor grad_w_ih = at::empty({4 * H, I}, opts);
  at::Tensor grad_w_hh = at::empty({4 * H, P}, opts);
  at::Tensor grad_w_hr = has_proj ? at::empty({P, H}, opts) : at::empty({0}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "lstm_layer_backward_cuda", [&] {
    scalar_t* dgates = grad_gates.data_ptr<scalar_t>();
    scalar_t* dh = grad_h.data_ptr<scalar_t>();
    scalar_t* dc = grad_c.data_ptr<scalar_t>();
    const scalar_t* go = grad_out_c.data_ptr<scalar_t>();
    const scalar_t* gates_p = gates_c.data_ptr<scalar_t>();
    const scalar_t* cells_p = cells_c.data_ptr<scalar_t>();
    const scalar_t* w_hh_p = w_hh_c.data_ptr<scalar_t>();
    const scalar_t* c0_p = c0_c.data_ptr<scalar_t>();
    for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
      const Step& step = *it;
      const int64_t b = step.batch;
      if (b == 0) continue;
      const scalar_t* go_t = go + step.offset * P;
      const scalar_t* dh_hidden = dh;  // [b, H] dL/dh_t before the projection
      const scalar_t* dh_extra = go_t;
      if (has_proj) {
        // dL/dr_t = running dh + grad_output[t]; back through r_t = h_t W_hr^T.
        scalar_t* dr = grad_r.data_ptr<scalar_t>() + step.offset * P;
        add_kernel<scalar_t><<<blocks_for(b * P), kThreads, 0, stream>>>(b * P, dh, go_t, dr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        gemm<scalar_t>(false, false, b, H, P, dr, P, w_hr_c.data_ptr<scalar_t>(), H, 0,
                       grad_hidden.data_ptr<scalar_t>(), H);
        dh_hidden = grad_hidden.data_ptr<scalar_t>();
        dh_extra = nullptr;
      }
      with_index_type(b, H, [&](auto index) {
        using index_t = decltype(index);
        cell_backward_kernel<scalar_t, index_t><<<blocks_for(b * H), kThreads, 0, stream>>>(
            b, H, gates_p + step.offset * 4 * H, cells_p + step.offset * H,
            cells_p + step.prev_offset * H, step.prev_batch, c0_p, dh_hidden, dh_extra, dc,
            dgates + step.offset * 4 * H);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      // dL/dh_prev = dgates[t] W_hh
      gemm<scalar_t>(false, false, b, P, 4 * H, dgates + step.offset * 4 * H, 4 * H, w_hh_p, P,
                     0, dh, P);
    }

    // Weight gradients over all steps at once (weight_gradients.h, shared with the other backend).
    WeightGradientArgs<scalar_t> args{
        dgates, x.data_ptr<scalar_t>(), w_ih_c.data_ptr<scalar_t>(), output_c.data_ptr<scalar_t>(),
        h0_c.data_ptr<scalar_t>(), h_prev.defined() ? h_prev.data_ptr<scalar_t>() : nullptr,
        has_proj ? grad_r.data_ptr<scalar_t>() : nullptr,
        has_proj ? hiddens_c.data_ptr<scalar_t>() : nullptr,
        need_grad_input ? grad_input.data_ptr<scalar_t>() : nullptr,
        grad_w_ih.data_ptr<scalar_t>(), grad_w_hh.data_ptr<scalar_t>(),
        has_proj ? grad_w_hr.data_ptr<scalar_t>() : nullptr};
    weight_gradients(s, steps, reverse, args, [](auto... gemm_args) { gemm<scalar_t>(gemm_args...); },
                     [&](scalar_t* dst, const scalar_t* src, int64_t rows, int64_t cols) { copy_rows(dst, src, rows, cols, stream); });
  });
  // Accumulated in float for half/bfloat16 (ATen's sum uses opmath).
  at::Tensor grad_bias = grad_gates.sum(0);
  if (!need_grad_input) grad_input = grad_input.view({0});
  return {grad_input, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cuda);
  m.impl("lstm_layer", &lstm_layer_cuda);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cuda<false>);
  m.impl("lstm_layer_backward_overwrite_gates", &lstm_layer_backward_cuda<true>);
}

}  // namespace fused_lstm::cuda
