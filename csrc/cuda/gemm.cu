// The CUDA backend's GEMMs (cuda/gemm.cuh): cuBLAS, and a small-batch kernel for the
// forward's step GEMMs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <climits>

#include "cuda/gemm.cuh"

namespace fused_lstm::cuda {
namespace {

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

// Up to this many rows the step GEMM runs small_batch_gemm_nt_kernel: cuBLAS picks a
// slow kernel (and a memset) there (benchmarks/PERF_LOG.md, GPU run 5).
constexpr int kSmallBatchRows = 8;
constexpr int kThreads = 256;

// C[M, N] = A[M, K] W[N, K]^T + beta C, M <= kSmallBatchRows. One warp per output
// column n: its lanes split K (W's row n read coalesced), each row's sum in a
// register, then a warp reduction.
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

}  // namespace

template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A,
          int64_t lda, const scalar_t* B, int64_t ldb, at::opmath_type<scalar_t> beta,
          scalar_t* C, int64_t ldc) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (M == 0 || N == 0) return;
  const bool fits_int = std::max({M, N, K, lda, ldb, ldc}) <= INT_MAX;
  if (K == 0 || !fits_int) {
    // cuBLAS takes int sizes and does not scale C by beta when K == 0: ATen's addmm.
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
  const int blocks =
      static_cast<int>(std::min<int64_t>((N + kWarpsPerBlock - 1) / kWarpsPerBlock, 4096));
  small_batch_gemm_nt_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
      static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), A, static_cast<int>(lda), W,
      static_cast<int>(ldw), beta, C, static_cast<int>(ldc));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define FUSED_LSTM_INSTANTIATE_GEMMS(scalar_t)                                                  \
  template void gemm<scalar_t>(bool, bool, int64_t, int64_t, int64_t, const scalar_t*, int64_t, \
                               const scalar_t*, int64_t, at::opmath_type<scalar_t>, scalar_t*,  \
                               int64_t);                                                        \
  template void step_gemm_nt<scalar_t>(int64_t, int64_t, int64_t, const scalar_t*, int64_t,     \
                                       const scalar_t*, int64_t, at::opmath_type<scalar_t>,     \
                                       scalar_t*, int64_t, cudaStream_t);
FUSED_LSTM_INSTANTIATE_GEMMS(float)
FUSED_LSTM_INSTANTIATE_GEMMS(double)
FUSED_LSTM_INSTANTIATE_GEMMS(at::Half)
FUSED_LSTM_INSTANTIATE_GEMMS(at::BFloat16)
#undef FUSED_LSTM_INSTANTIATE_GEMMS

}  // namespace fused_lstm::cuda
