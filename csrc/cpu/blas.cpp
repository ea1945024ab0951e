#include "blas.h"

#include <ATen/Config.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <atomic>
#include <climits>
#include <vector>

namespace fused_lstm::cpu {
namespace {

enum Backend : int { kAuto = 0, kBlas = 1, kOneDnn = 2, kAten = 3, kSmall = 4 };
constexpr const char* kBackendNames[] = {"auto", "blas", "onednn", "aten", "small"};
std::atomic<int> backend_setting{kAuto};

// oneDNN pays ~15 us per call; below this many multiply-adds BLAS is faster
// (measured on the 2-core AVX-512 CI machine, see benchmarks/PERF_LOG.md).
constexpr int64_t kOneDnnMinMacs = int64_t{1} << 22;

void* find_symbol(const char* name) {
  // libtorch_cpu is already loaded (we link against it); RTLD_NOLOAD just finds it.
  if (void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD)) {
    if (void* sym = dlsym(lib, name)) return sym;
  }
  return dlsym(RTLD_DEFAULT, name);
}

// Fortran BLAS, LP64: column-major, every argument by pointer.
template <typename T>
using fortran_gemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                                 const T*, const T*, const int*, const T*, const int*,
                                 const T*, T*, const int*);

// MKL's thread-local thread count (returns the previous one; 0 = the global setting).
using set_threads_local_fn = int (*)(int);
set_threads_local_fn blas_set_threads_local() {
  static const auto fn =
      reinterpret_cast<set_threads_local_fn>(find_symbol("MKL_Set_Num_Threads_Local"));
  return fn;
}

// Below this many multiply-adds a GEMM runs on one thread: MKL's fork and join
// costs more than it saves (measured: 32x20x80 and 8x128x512 steps).
constexpr int64_t kBlasSingleThreadMaxMacs = int64_t{1} << 19;

// Whether a row-major C [M, N] is narrower than one 512-bit vector and has rows to
// spare: then BLAS runs faster on the transposed product (measured on the CI machine's
// MKL, benchmarks/PERF_LOG.md row 20).
template <typename T>
bool narrow_output(int64_t M, int64_t N) {
  constexpr int64_t kVectorLanes = 64 / sizeof(T);
  return N < kVectorLanes && M >= 64;
}

template <typename T>
fortran_gemm_fn<T> blas_gemm() {
  if constexpr (std::is_same_v<T, float>) {
    static auto fn = reinterpret_cast<fortran_gemm_fn<float>>(find_symbol("sgemm_"));
    return fn;
  } else if constexpr (std::is_same_v<T, double>) {
    static auto fn = reinterpret_cast<fortran_gemm_fn<double>>(find_symbol("dgemm_"));
    return fn;
  } else {
    return nullptr;
  }
}

// at::native::mkldnn_matmul(mat1, mat2, result, beta, alpha): result = alpha mat1 mat2 + beta result.
// Looked up at run time: not every torch build has oneDNN.
using onednn_matmul_fn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, float,
                                  float);
onednn_matmul_fn onednn_matmul() {
  static const auto fn = [] {
    return at::hasMKLDNN() ? reinterpret_cast<onednn_matmul_fn>(find_symbol(
                                 "_ZN2at6native13mkldnn_matmulERKNS_6TensorES3_S3_ff"))
                           : nullptr;
  }();
  return fn;
}

// Tensor views over the raw operands: A as op(A) [M, K], B as op(B) [K, N], C [M, N].
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> views(
    bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
    const scalar_t* B, int64_t ldb, scalar_t* C, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    // The stored matrix is [rows, cols], or [cols, rows] when trans; row stride ld.
    return trans ? at::from_blob(const_cast<scalar_t*>(p), {cols, rows}, {ld, 1}, opts).t()
                 : at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1}, opts);
  };
  return {view(A, M, K, lda, trans_a), view(B, K, N, ldb, trans_b),
          at::from_blob(C, {M, N}, {ldc, 1}, opts)};
}

}  // namespace

GemmSetting cpu_gemm_setting() {
  return static_cast<GemmSetting>(backend_setting.load(std::memory_order_relaxed));
}

std::string set_cpu_gemm(const std::string& backend) {
  for (int b = kAuto; b <= kSmall; ++b) {
    if (backend == kBackendNames[b]) {
      backend_setting.store(b);
      return backend;
    }
  }
  TORCH_CHECK(false, "fused_lstm: unknown CPU GEMM backend '", backend,
              "'; expected auto, blas, onednn, aten or small");
}

template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
          const scalar_t* A, int64_t lda, const scalar_t* B, int64_t ldb,
          at::opmath_type<scalar_t> beta, scalar_t* C, int64_t ldc) {
  using opmath_t = at::opmath_type<scalar_t>;
  if (M == 0 || N == 0) return;
  if (K == 0) {  // C = beta * C; beta == 0 must not propagate NaN from C
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) {
        scalar_t& c = C[m * ldc + n];
        c = beta == opmath_t(0) ? scalar_t(0) : scalar_t(beta * opmath_t(c));
      }
    }
    return;
  }
  const int setting = backend_setting.load(std::memory_order_relaxed);
  if constexpr (std::is_same_v<scalar_t, float>) {
    const bool large = M * N * K >= kOneDnnMinMacs;
    if ((setting == kOneDnn || ((setting == kAuto || setting == kSmall) && large)) &&
        onednn_matmul() != nullptr) {
      auto [a, b, c] = views(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc);
      onednn_matmul()(a, b, c, beta, 1.0f);
      return;
    }
  }
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    const auto fn = blas_gemm<scalar_t>();
    const bool fits_int = std::max({M, N, K, lda, ldb, ldc}) <= INT_MAX;
    if (setting != kAten && fn != nullptr && fits_int) {
      // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
      const char ta = trans_b ? 'T' : 'N';
      const char tb = trans_a ? 'T' : 'N';
      const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
      const int ld_a = static_cast<int>(ldb), ld_b = static_cast<int>(lda),
                ld_c = static_cast<int>(ldc);
      const scalar_t alpha = 1;
      const auto set_threads = blas_set_threads_local();
      const bool single = set_threads != nullptr && M * N * K < kBlasSingleThreadMaxMacs;
      const int previous = single ? set_threads(1) : 0;
      if (narrow_output<scalar_t>(M, N)) {
        // BLAS vectorises along column-major m, which is our N: narrower than a vector it
        // ran 3-5x slower (seed shape, I = 10: dW_ih 19 -> 6 us). So compute C^T instead,
        // column-major [M, N] = op(A) op(B), into a scratch, and add it into C.
        const char ta_c = trans_a ? 'N' : 'T', tb_c = trans_b ? 'N' : 'T';
        const int m_c = static_cast<int>(M), n_c = static_cast<int>(N);
        const int ld_ac = static_cast<int>(lda), ld_bc = static_cast<int>(ldb);
        const scalar_t zero = 0;
        std::vector<scalar_t> c_t(static_cast<size_t>(M * N));  // column-major [M, N]
        fn(&ta_c, &tb_c, &m_c, &n_c, &k, &alpha, A, &ld_ac, B, &ld_bc, &zero, c_t.data(), &m_c);
        for (int64_t row = 0; row < M; ++row) {
          for (int64_t col = 0; col < N; ++col) {
            scalar_t& c = C[row * ldc + col];
            const scalar_t product = c_t[col * M + row];
            c = beta == opmath_t(0) ? product : beta * c + product;
          }
        }
      } else {
        fn(&ta, &tb, &m, &n, &k, &alpha, B, &ld_a, A, &ld_b, &beta, C, &ld_c);
      }
      if (single) set_threads(previous);
      return;
    }
  }
  auto [a, b, c] = views(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc);
  at::addmm_out(c, c, a, b, beta, 1);
}

#define FUSED_LSTM_INSTANTIATE_GEMM(scalar_t)                                          \
  template void gemm<scalar_t>(bool, bool, int64_t, int64_t, int64_t, const scalar_t*, \
                               int64_t, const scalar_t*, int64_t,                      \
                               at::opmath_type<scalar_t>, scalar_t*, int64_t);
FUSED_LSTM_INSTANTIATE_GEMM(float)
FUSED_LSTM_INSTANTIATE_GEMM(double)
FUSED_LSTM_INSTANTIATE_GEMM(at::Half)
FUSED_LSTM_INSTANTIATE_GEMM(at::BFloat16)

}  // namespace fused_lstm::cpu
