#include "cpu/gemm.h"

#include <ATen/CPUFunctions.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "cpu/kernels/kernels.h"
#include "cpu/scratch.h"
#include "cpu/tuning.h"

namespace fused_lstm::cpu {
namespace {

constexpr const char* kSettingNames[] = {"auto", "aten", "small"};

std::atomic<int> gemm_setting{0};

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

// Whether a row-major C [M, N] is narrower than one 512-bit vector and has rows to
// spare: BLAS vectorises along C's contiguous dimension, so there it runs faster into
// a column-major C (PERF_LOG.md row 20: dW_ih at input size 10, 3-5x).
template <typename T>
bool narrow_output(int64_t M, int64_t N) {
  constexpr int64_t kVectorLanes = 64 / sizeof(T);
  return N < kVectorLanes && M >= 64;
}

template <typename scalar_t>
void aten_gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A,
               int64_t lda, const scalar_t* B, int64_t ldb, at::opmath_type<scalar_t> beta,
               scalar_t* C, int64_t ldc) {
  auto [a, b, c] = views(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc);
  if (narrow_output<scalar_t>(M, N)) {
    at::Tensor product = at::empty({N, M}, c.options()).t();  // [M, N], column-major
    at::cpu::mm_out(product, a, b);
    if (beta == 0) {
      c.copy_(product);
    } else {
      c.mul_(beta).add_(product);
    }
    return;
  }
  // beta == 0 ignores C (no NaN from it), as addmm documents.
  at::cpu::addmm_out(c, c, a, b, beta, 1);
}

// dst[c, r] = src[r, c] for src [rows, cols] (row stride ld_src), dst [cols, rows] (row
// stride ld_dst): the kernels' transpose, over blocks of 16 rows split between threads.
template <typename scalar_t>
void transpose_into(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld_src, scalar_t* dst,
                    int64_t ld_dst) {
  constexpr int64_t kTile = 16;
  const auto& kernels = cpu_kernels<scalar_t>();
  at::parallel_for(0, (rows + kTile - 1) / kTile, std::max<int64_t>(1, 4096 / std::max<int64_t>(cols, 1)),
                   [&](int64_t t0, int64_t t1) {
    const int64_t r0 = t0 * kTile, r1 = std::min(rows, t1 * kTile);
    kernels.transpose(src + r0 * ld_src, r1 - r0, cols, ld_src, dst + r0, ld_dst);
  });
}

// The calling thread's reused buffer `slot` as n elements (scratch_bytes: freed by
// release_cpu_scratch).
template <typename scalar_t>
scalar_t* scratch_of(Scratch slot, int64_t n) {
  return static_cast<scalar_t*>(scratch_bytes(slot, static_cast<size_t>(n) * sizeof(scalar_t)));
}

// op(B) as row-major [K, N], which our kernels read: B itself, or B^T gathered into
// a per-thread scratch.
template <typename scalar_t>
const scalar_t* rows_of_op_b(bool trans_b, int64_t N, int64_t K, const scalar_t* B, int64_t ldb) {
  if (!trans_b) return B;
  scalar_t* rows = scratch_of<scalar_t>(Scratch::kGemmOperand, K * N);
  transpose_into(B, N, K, ldb, rows, N);
  return rows;
}

// dst [k, w] (contiguous) = op(B)[k0 : k0 + k, n0 : n0 + w), B stored [K, N], or [N, K]
// with trans_b (the input GEMM's W_ih, [4H, I]): then by the kernels' transpose, in SIMD
// register blocks (an element at a time it took 6% of a 2-layer H200 forward, PERF_LOG.md
// row 66).
template <typename scalar_t>
void pack_panel(const CpuKernels<scalar_t>& kernels, bool trans_b, const scalar_t* B,
                int64_t ldb, int64_t n0, int64_t w, int64_t k0, int64_t k, scalar_t* dst) {
  if (trans_b) {
    kernels.transpose(B + n0 * ldb + k0, w, k, ldb, dst, w);
    return;
  }
  for (int64_t r = 0; r < k; ++r) std::copy_n(B + (k0 + r) * ldb + n0, w, dst + r * w);
}

// A large GEMM on our gemm_columns kernel, B in column panels, the work split between
// threads in equal parts (below): C = op(A) op(B) (+ C with accumulate, else + bias where
// not null: a row of N added to every row). With trans_a (A stored [K, M], the weight
// gradients dgates^T x; no bias) gemm_columns_trans_a reads A^T in place and writes C
// (PERF_LOG.md row 40; it once computed C^T and transposed it back). stream_c as
// gemm_columns'.
template <typename scalar_t>
void own_large_gemm(const CpuKernels<scalar_t>& kernels, bool trans_a, bool trans_b, int64_t M,
                    int64_t N, int64_t K, const scalar_t* A, int64_t lda, const scalar_t* B,
                    int64_t ldb, bool accumulate, const scalar_t* bias, scalar_t* C,
                    int64_t ldc, bool stream_c = false) {
  TORCH_INTERNAL_ASSERT(!trans_a || bias == nullptr, "own_large_gemm: no bias with trans_a");
  constexpr int64_t kColumns = 64;  // a panel: 4 AVX-512 vectors of float
  constexpr int64_t kVector = 16;   // columns split between threads in whole vectors
  constexpr int64_t kSlice = kGemmColumnsSliceBytes / (kColumns * int64_t(sizeof(scalar_t)));
  const auto kernel = trans_a ? kernels.gemm_columns_trans_a : kernels.gemm_columns;
  const int64_t k_step = trans_a ? lda : 1;  // from element k of op(A)'s rows to k + 1
  const int64_t row_step = trans_a ? 1 : lda;
  // Threads take equal runs of whole vectors of columns (of at least a panel each; as
  // 64-column blocks, 13 of them at N = 800 went 7 + 6, 12% longer than an even split,
  // PERF_LOG.md row 66) and, where threads outnumber those runs, blocks of rows in
  // multiples of gemm_columns' 6-row tile (at least 48 each).
  const int64_t vectors = (N + kVector - 1) / kVector;
  const int64_t threads = at::get_num_threads();
  const int64_t col_parts = std::max<int64_t>(1, std::min(threads, vectors * kVector / kColumns));
  const int64_t row_parts = std::max<int64_t>(1, std::min(threads / col_parts, M / 48));
  const int64_t part_rows = (M + row_parts - 1) / row_parts;
  const int64_t rows_per_part = (part_rows + 5) / 6 * 6;
  // Part p's columns over K [k0, k1), its rows' panels packed one K slice at a time (as
  // gemm_columns slices K, tuning.h) into a buffer of this thread's own: read in place,
  // the panel's rows lie ldb apart, and at ldb = 1024 floats every k maps to the same L1
  // sets (PERF_LOG.md row 37). ~256 KiB a thread, reused over all rows.
  const auto run_part = [&](int64_t p, int64_t k0, int64_t k1) {
    const int64_t c = p % col_parts, m0 = p / col_parts * rows_per_part;
    const int64_t n_begin = vectors * c / col_parts * kVector;
    const int64_t n_end = std::min(N, vectors * (c + 1) / col_parts * kVector);
    const int64_t rows = std::min(M, m0 + rows_per_part) - m0;
    if (rows <= 0) return;
    scalar_t* panel = scratch_of<scalar_t>(Scratch::kGemmPanels, std::min(kSlice, K) * kColumns);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kColumns) {
      const int64_t w = std::min(kColumns, n_end - n0);
      for (int64_t k = k0; k < k1; k += kSlice) {
        const int64_t kk = std::min(kSlice, k1 - k);
        pack_panel(kernels, trans_b, B, ldb, n0, w, k, kk, panel);
        kernel(rows, 0, w, kk, A + m0 * row_step + k * k_step, lda, panel, w,
               accumulate || k > 0, bias != nullptr ? bias + n0 : nullptr, C + m0 * ldc + n0,
               ldc, stream_c && k + kk == k1);
      }
    }
  };
  const int64_t parts = col_parts * row_parts;
  if (!trans_a) {
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) run_part(p, 0, K);
    });
    return;
  }
  // A^T in place: K slices outside, so that the slice of A every part reads (kSlice x M,
  // each k on its own page) comes from L3, not once per column block from DRAM: column
  // blocks outside lost 10-15% at K = 3200-6400 (PERF_LOG.md row 40).
  for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) run_part(p, k0, std::min(K, k0 + kSlice));
    });
  }
}

// Which of our kernels gemm() runs for these sizes (with beta 0 or 1), if any. For few
// rows of A (tuning.h's few_rows_*) one that reads B in place, copying nothing:
// small_gemm_trans_b for op(B) = B^T, small_gemm for B; else small_gemm up to tuning.h's
// own_gemm_max_macs and own_small_gemm_max_outputs, gemm_columns above them where
// tuning.h says so; neither where its copy of op(B) would cost more than the GEMM
// (own_gemm_copy_*).
enum class OwnPath { kNone, kSmall, kLarge, kDotRows };
template <typename scalar_t>
OwnPath own_path(const CpuKernels<scalar_t>& kernels, bool trans_a, bool trans_b, int64_t M,
                 int64_t N, int64_t K) {
  if (cpu_gemm_setting() == GemmSetting::kAten) return OwnPath::kNone;
  const CpuTuning& tuning = cpu_tuning();
  const int64_t b_bytes = N * K * int64_t(sizeof(scalar_t));
  const bool b_in_cache = b_bytes <= tuning.few_rows_b_cache_bytes;
  if (!trans_a && trans_b && kernels.small_gemm_trans_b != nullptr &&
      few_rows_dot(tuning, M, b_bytes)) {
    return OwnPath::kDotRows;
  }
  if (!trans_a && !trans_b && kernels.small_gemm != nullptr && M <= tuning.few_rows_max_rows &&
      b_in_cache) {
    return OwnPath::kSmall;
  }
  const bool copy_pays = M >= tuning.own_gemm_copy_min_rows ||
                         b_bytes <= tuning.own_gemm_copy_max_bytes;
  if (M * N * K <= tuning.own_gemm_max_macs && M * N <= tuning.own_small_gemm_max_outputs) {
    return kernels.small_gemm != nullptr && (!trans_b || copy_pays) ? OwnPath::kSmall
                                                                    : OwnPath::kNone;
  }
  return kernels.gemm_columns != nullptr && tuning.own_large_gemm && copy_pays ? OwnPath::kLarge
                                                                              : OwnPath::kNone;
}

}  // namespace

const char* cpu_gemm_setting_name() {
  return kSettingNames[static_cast<int>(cpu_gemm_setting())];
}

GemmSetting cpu_gemm_setting() {
  return static_cast<GemmSetting>(gemm_setting.load(std::memory_order_relaxed));
}

std::string set_cpu_gemm(const std::string& setting) {
  for (int s = 0; s < 3; ++s) {
    if (setting == kSettingNames[s]) {
      gemm_setting.store(s);
      return setting;
    }
  }
  TORCH_CHECK(false, "fused_lstm: unknown CPU GEMM setting '", setting,
              "'; expected auto, aten or small");
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
  const auto& kernels = cpu_kernels<scalar_t>();
  const OwnPath path = beta == opmath_t(0) || beta == opmath_t(1)
                           ? own_path(kernels, trans_a, trans_b, M, N, K)
                           : OwnPath::kNone;
  if (path == OwnPath::kDotRows) {
    kernels.small_gemm_trans_b(M, N, K, A, lda, B, ldb, beta == opmath_t(1), C, ldc);
    return;
  }
  if (path == OwnPath::kSmall) {
    const scalar_t* b_rows = rows_of_op_b(trans_b, N, K, B, ldb);
    const int64_t ld_rows = trans_b ? N : ldb;
    const auto kernel = trans_a ? kernels.small_gemm_trans_a : kernels.small_gemm;
    kernel(M, N, K, A, lda, b_rows, ld_rows, beta == opmath_t(1), C, ldc);
    return;
  }
  if (path == OwnPath::kLarge) {
    own_large_gemm<scalar_t>(kernels, trans_a, trans_b, M, N, K, A, lda, B, ldb,
                             beta == opmath_t(1), nullptr, C, ldc);
    return;
  }
  aten_gemm<scalar_t>(trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

template <typename scalar_t>
void gemm_bias(bool trans_b, int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
               const scalar_t* B, int64_t ldb, const scalar_t* bias, scalar_t* C, int64_t ldc,
               bool stream_c) {
  if (M == 0 || N == 0) return;
  const auto& kernels = cpu_kernels<scalar_t>();
  // Where gemm() would run gemm_columns, the bias is where its tiles start: no pass over
  // C to fill it, and no read of C back (PERF_LOG.md row 38).
  if (K > 0 && own_path(kernels, false, trans_b, M, N, K) == OwnPath::kLarge) {
    own_large_gemm(kernels, false, trans_b, M, N, K, A, lda, B, ldb, false, bias, C, ldc,
                   stream_c);
    return;
  }
  if (bias != nullptr) {
    for (int64_t m = 0; m < M; ++m) std::copy_n(bias, N, C + m * ldc);
  }
  gemm<scalar_t>(false, trans_b, M, N, K, A, lda, B, ldb, bias != nullptr ? 1 : 0, C, ldc);
}

#define FUSED_LSTM_INSTANTIATE_GEMM(scalar_t)                                               \
  template void gemm<scalar_t>(bool, bool, int64_t, int64_t, int64_t, const scalar_t*,      \
                               int64_t, const scalar_t*, int64_t,                           \
                               at::opmath_type<scalar_t>, scalar_t*, int64_t);              \
  template void gemm_bias<scalar_t>(bool, int64_t, int64_t, int64_t, const scalar_t*,      \
                                    int64_t, const scalar_t*, int64_t, const scalar_t*,     \
                                    scalar_t*, int64_t, bool);
FUSED_LSTM_INSTANTIATE_GEMM(float)
FUSED_LSTM_INSTANTIATE_GEMM(double)
FUSED_LSTM_INSTANTIATE_GEMM(at::Half)
FUSED_LSTM_INSTANTIATE_GEMM(at::BFloat16)

namespace {

// op cpu_gemm (ops/schemas.cpp): op(a) @ op(b) (+ c) through gemm(), or (+ bias, or
// stream) through gemm_bias.
at::Tensor cpu_gemm_op(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b,
                       const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& bias,
                       bool stream) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "cpu_gemm: a and b must be 2-D, got ", a.dim(),
              "-D and ", b.dim(), "-D");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "cpu_gemm: a and b must share a dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  const int64_t M = a.size(trans_a ? 1 : 0), K = a.size(trans_a ? 0 : 1);
  const int64_t N = b.size(trans_b ? 0 : 1);
  TORCH_CHECK(b.size(trans_b ? 1 : 0) == K, "cpu_gemm: op(a) is [", M, ", ", K, "] but op(b) is [",
              b.size(trans_b ? 1 : 0), ", ", N, "]");
  const at::Tensor A = a.contiguous(), B = b.contiguous();
  at::Tensor C;
  TORCH_CHECK(!stream || (!c.has_value() && !trans_a), "cpu_gemm: stream only without c and trans_a");
  if (bias.has_value()) {
    TORCH_CHECK(!c.has_value() && !trans_a, "cpu_gemm: bias only without c and trans_a");
    TORCH_CHECK(bias->scalar_type() == a.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == N,
                "cpu_gemm: bias must be [", N, "] of ", a.scalar_type(), ", got ",
                bias->sizes(), " of ", bias->scalar_type());
  }
  if (c.has_value()) {
    TORCH_CHECK(c->scalar_type() == a.scalar_type() && c->dim() == 2 && c->size(0) == M &&
                    c->size(1) == N,
                "cpu_gemm: c must be [", M, ", ", N, "] of ", a.scalar_type(), ", got ",
                c->sizes(), " of ", c->scalar_type());
    C = c->clone(at::MemoryFormat::Contiguous);
  } else {
    C = at::empty({M, N}, a.options());
  }
  const at::Tensor bias_row = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "cpu_gemm", [&] {
    if (bias.has_value() || stream) {
      gemm_bias<scalar_t>(trans_b, M, N, K, A.const_data_ptr<scalar_t>(), A.size(1),
                          B.const_data_ptr<scalar_t>(), B.size(1),
                          bias.has_value() ? bias_row.const_data_ptr<scalar_t>() : nullptr,
                          C.mutable_data_ptr<scalar_t>(), N, stream);
      return;
    }
    gemm<scalar_t>(trans_a, trans_b, M, N, K, A.const_data_ptr<scalar_t>(), A.size(1),
                   B.const_data_ptr<scalar_t>(), B.size(1), c.has_value() ? 1 : 0,
                   C.mutable_data_ptr<scalar_t>(), N);
  });
  return C;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("cpu_gemm", &cpu_gemm_op);
}

}  // namespace fused_lstm::cpu
