// The CPU cell kernels, compiled once per capability: the including file
// defines FUSED_LSTM_CAPABILITY_NS (and, for SIMD builds, the CPU_CAPABILITY
// macros and target pragma) before including this.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#if defined(CPU_CAPABILITY_AVX512) && defined(__linux__) && defined(__GNUC__) && \
    (__GNUC__ >= 11 || defined(__clang__))
// The AMX kernels (Linux: the tile state is asked of the kernel; g++ 11 and clang 12 know
// the instructions).
#define FUSED_LSTM_AMX_BUILD
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "core/cell_math.h"
#include "cpu/kernels/kernels.h"
#include "cpu/tuning.h"

namespace fused_lstm::cpu::FUSED_LSTM_CAPABILITY_NS {
namespace {

using at::vec::Vectorized;

// For lambdas whose calls must be inlined side by side (independent chains to overlap).
#if defined(__GNUC__)
#define FUSED_LSTM_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FUSED_LSTM_INLINE_LAMBDA
#endif

// Loads and stores of one lane group: Vectorized for float/double, one element
// in opmath for half/bfloat16. `n` is the number of valid lanes.
template <typename S>
C10_ALWAYS_INLINE Vectorized<S> load(Vectorized<S>, const S* p, int64_t n) {
  return n == Vectorized<S>::size() ? Vectorized<S>::loadu(p) : Vectorized<S>::loadu(p, n);
}
template <typename S>
C10_ALWAYS_INLINE void store(const Vectorized<S>& v, S* p, int64_t n) {
  n == Vectorized<S>::size() ? v.store(p) : v.store(p, n);
}
template <typename S>
C10_ALWAYS_INLINE at::opmath_type<S> load(at::opmath_type<S>, const S* p, int64_t) {
  return static_cast<at::opmath_type<S>>(*p);
}
template <typename S>
C10_ALWAYS_INLINE void store(at::opmath_type<S> v, S* p, int64_t) {
  *p = static_cast<S>(v);
}

template <typename T>
constexpr bool kHalfStorage = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
// 16-bit lanes to float and back (ATen's converters by name: its generic
// convert_to_float / convert_from_float are not defined in every build).
C10_ALWAYS_INLINE std::tuple<Vectorized<float>, Vectorized<float>> to_float(
    const Vectorized<c10::BFloat16>& v) {
  return at::vec::convert_bfloat16_float(v);
}
C10_ALWAYS_INLINE std::tuple<Vectorized<float>, Vectorized<float>> to_float(
    const Vectorized<c10::Half>& v) {
  return at::vec::convert_half_float(v);
}
C10_ALWAYS_INLINE Vectorized<c10::BFloat16> from_float(const Vectorized<float>& v, c10::BFloat16*) {
  return at::vec::convert_float_bfloat16(v, v);
}
C10_ALWAYS_INLINE Vectorized<c10::Half> from_float(const Vectorized<float>& v, c10::Half*) {
  return at::vec::convert_float_half(v, v);
}

// 16-bit storage (half_t: bfloat16 or float16) read into float lanes (exact): a 16-bit
// layer's workspace in the one-step and fused backward (backward_rows<float, half_t>), its
// weights in the one-step GEMMs. A whole vector's worth in one widening load, a partial
// one masked (AVX-512) or through a copy.
template <typename half_t, typename = std::enable_if_t<kHalfStorage<half_t>>>
C10_ALWAYS_INLINE Vectorized<float> load(Vectorized<float>, const half_t* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  // (Through Vectorized<half_t>'s loads and the converters' tuple, g++ 12 kept the 16
  // accumulators of small_gemm_trans_b<float, Half> on the stack.)
  const __m256i v = n == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                            : _mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p);
  if constexpr (std::is_same_v<half_t, c10::Half>) {
    return _mm512_cvtph_ps(v);
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  }
#else
  if (n == Vectorized<float>::size()) {
    Vectorized<float> v;
    at::vec::load_to_float(p, v);
    return v;
  }
  return std::get<0>(to_float(Vectorized<half_t>::loadu(p, n)));
#endif
}
// float lanes rounded (to nearest even) into 16-bit storage.
template <typename half_t, typename = std::enable_if_t<kHalfStorage<half_t>>>
C10_ALWAYS_INLINE void store(const Vectorized<float>& v, half_t* p, int64_t n) {
  from_float(v, p).store(p, n);
}

template <typename S>
constexpr bool kVectorized = std::is_same_v<S, float> || std::is_same_v<S, double>;

// Calls body(T{}, k, n) over the hidden units [u0, u1) of one row, T the lane type.
template <typename scalar_t, typename Body>
C10_ALWAYS_INLINE void for_each_unit(int64_t u0, int64_t u1, const Body& body) {
  if constexpr (kVectorized<scalar_t>) {
    using Vec = Vectorized<scalar_t>;
    constexpr int64_t width = Vec::size();
    int64_t k = u0;
    for (; k + width <= u1; k += width) body(Vec{}, k, width);
    if (k < u1) body(Vec{}, k, u1 - k);
  } else {
    for (int64_t k = u0; k < u1; ++k) body(at::opmath_type<scalar_t>{}, k, 1);
  }
}

// Calls unit(T{}, r, k, n) for rows [r0, r1) and each unit group of units [u0, u1),
// two rows side by side: two independent chains of exps and divisions for the core
// to overlap (PERF_LOG.md row 18; four rows gained nothing more).
template <typename scalar_t, typename Unit>
C10_ALWAYS_INLINE void for_each_row_unit(int64_t r0, int64_t r1, int64_t u0, int64_t u1,
                                         const Unit& unit) {
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    for_each_unit<scalar_t>(u0, u1, [&](auto lane, int64_t k, int64_t n) {
      unit(lane, r, k, n);
      unit(lane, r + 1, k, n);
    });
  }
  for (; r < r1; ++r) {
    for_each_unit<scalar_t>(u0, u1, [&](auto lane, int64_t k, int64_t n) { unit(lane, r, k, n); });
  }
}

// Runs fn(row_begin, row_end) over rows, threaded only when the work is large.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t H, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kCellPassUnitsPerTask / std::max<int64_t>(H, 1));
  if (rows <= grain) {
    fn(0, rows);  // skip the thread pool entirely for small steps
  } else {
    at::parallel_for(0, rows, grain, fn);
  }
}

template <typename scalar_t>
void forward_step(int64_t b, int64_t H, scalar_t* gates, scalar_t* c_state, scalar_t* cells,
                  scalar_t* h_out, scalar_t* h_state) {
  // One unit group of row r: loads, cell_forward, stores.
  const auto unit = [&](auto lane, int64_t r, int64_t k, int64_t n) FUSED_LSTM_INLINE_LAMBDA {
    using T = decltype(lane);
    scalar_t* g = gates + r * 4 * H;
    T i = load(lane, g + k, n), f = load(lane, g + H + k, n);
    T gg = load(lane, g + 2 * H + k, n), o = load(lane, g + 3 * H + k, n);
    const T c_prev = load(lane, c_state + r * H + k, n);
    T c, h;
    cell_forward(i, f, gg, o, c_prev, c, h);
    store(i, g + k, n);
    store(f, g + H + k, n);
    store(gg, g + 2 * H + k, n);
    store(o, g + 3 * H + k, n);
    store(c, c_state + r * H + k, n);
    store(c, cells + r * H + k, n);
    store(h, h_out + r * H + k, n);
    if (h_state != nullptr) store(h, h_state + r * H + k, n);
  };
  parallel_rows(b, H, [&](int64_t r0, int64_t r1) {
    for_each_row_unit<scalar_t>(r0, r1, 0, H, unit);
  });
}

// The cell backward of rows [r0, r1), units [u0, u1), on the calling thread. The
// workspace (gates, cells, c_prev, c0, dh_extra) and dgates in store_t: scalar_t, or
// 16-bit for a 16-bit layer's backward read as stored (StoredKernels::backward_block:
// float math, dgates rounded); dh and dc in scalar_t.
template <typename scalar_t, typename store_t = scalar_t>
void backward_rows(int64_t r0, int64_t r1, int64_t u0, int64_t u1, int64_t H,
                   const store_t* gates, const store_t* cells, const store_t* c_prev_step,
                   int64_t prev_batch, const store_t* c0, const scalar_t* dh,
                   const store_t* dh_extra, scalar_t* dc, store_t* dgates) {
  // One unit group of row r. dgates may be gates: every load comes before the stores.
  const auto unit = [&](auto lane, int64_t r, int64_t k, int64_t n) FUSED_LSTM_INLINE_LAMBDA {
    using T = decltype(lane);
    const store_t* g = gates + r * 4 * H;
    const store_t* c_prev_row = r < prev_batch ? c_prev_step + r * H : c0 + r * H;
    store_t* dg_row = dgates + r * 4 * H;
    const T i = load(lane, g + k, n), f = load(lane, g + H + k, n);
    const T gg = load(lane, g + 2 * H + k, n), o = load(lane, g + 3 * H + k, n);
    const T c_prev = load(lane, c_prev_row + k, n);
    const T c = load(lane, cells + r * H + k, n);
    T dh_unit = load(lane, dh + r * H + k, n);
    if (dh_extra != nullptr) dh_unit = dh_unit + load(lane, dh_extra + r * H + k, n);
    const T dc_unit = load(lane, dc + r * H + k, n);
    T di, df, dg, do_, dc_prev;
    cell_backward(i, f, gg, o, c_prev, c, dh_unit, dc_unit, di, df, dg, do_, dc_prev);
    store(di, dg_row + k, n);
    store(df, dg_row + H + k, n);
    store(dg, dg_row + 2 * H + k, n);
    store(do_, dg_row + 3 * H + k, n);
    store(dc_prev, dc + r * H + k, n);
  };
  for_each_row_unit<scalar_t>(r0, r1, u0, u1, unit);
}

template <typename scalar_t>
void backward_step(int64_t b, int64_t H, const scalar_t* gates, const scalar_t* cells,
                   const scalar_t* c_prev_step, int64_t prev_batch, const scalar_t* c0,
                   const scalar_t* dh, const scalar_t* dh_extra, scalar_t* dc, scalar_t* dgates) {
  parallel_rows(b, H, [&](int64_t r0, int64_t r1) {
    backward_rows(r0, r1, 0, H, H, gates, cells, c_prev_step, prev_batch, c0, dh, dh_extra, dc,
                  dgates);
  });
}

// v to p without reading p's cache line first (a non-temporal store: the line goes to
// memory, not the caches), where the build has one for scalar_t; else a plain store.
// p: 64-byte aligned on AVX-512, 32 on AVX2. Other threads read such stores only after
// an _mm_sfence (streamed_stores_done).
template <typename scalar_t>
C10_ALWAYS_INLINE void store_streamed(const Vectorized<scalar_t>& v, scalar_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) return _mm512_stream_ps(p, v);
  if constexpr (std::is_same_v<scalar_t, double>) return _mm512_stream_pd(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) return _mm256_stream_ps(p, v);
  if constexpr (std::is_same_v<scalar_t, double>) return _mm256_stream_pd(p, v);
#endif
  v.store(p);
}

// Orders this thread's streamed stores before its later stores (the end of a parallel
// task, after which other threads read them).
inline void streamed_stores_done() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// One block of kRows rows of C and kVecs vectors of columns, [n, n + cols): kRows x
// kVecs independent FMA chains (enough to hide the FMA latency: 4 x 2, or 1 x 8 for
// the rows left over, e.g. a batch of one). kFull: cols == kVecs * W, no masking.
// A(r, k) is A[r * lda + k], or with kTransA (A stored [K, M]) A[k * lda + r].
// Without accumulate, C starts from `bias` (the block's columns of a row added to every
// row) where it is not null, else from 0. A stored as a_t, B as b_t, C as out_t, the sums in
// scalar_t: 16-bit operands widened as loaded, C rounded once as stored
// (small_gemm_16bit). With `stream`, a full block of scalar_t whose rows are whole
// aligned cache lines goes to C by store_streamed (gemm_columns' caller checks both).
template <typename scalar_t, int kRows, int kVecs, bool kFull, bool kTransA, typename a_t,
          typename b_t, typename out_t>
C10_ALWAYS_INLINE void small_gemm_block_impl(int64_t K, const a_t* A, int64_t lda,
                                             const b_t* B, int64_t ldb, bool accumulate,
                                             out_t* C, int64_t ldc, int64_t cols,
                                             const scalar_t* bias, bool stream) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  int64_t n[kVecs];  // valid lanes of each vector of columns
  for (int v = 0; v < kVecs; ++v) n[v] = kFull ? W : std::clamp<int64_t>(cols - v * W, 0, W);
  // (A whole vector of scalar_t by Vec::loadu itself: through load(), g++ 12 kept the
  // 6 x 4 accumulators of gemm_columns on the stack, 2x slower on an AMD Zen 4.)
  const auto load_n = [&](const auto* p, int v) {
    if constexpr (kFull && std::is_same_v<std::decay_t<decltype(*p)>, scalar_t>) {
      return Vec::loadu(p);
    } else if constexpr (kFull) {
      return load(Vec{}, p, W);
    } else {
      return n[v] > 0 ? load(Vec{}, p, n[v]) : Vec(scalar_t(0));
    }
  };
  Vec acc[kRows][kVecs];
  for (int v = 0; v < kVecs; ++v) {
    const Vec start = bias != nullptr && !accumulate ? load_n(bias + v * W, v) : Vec(scalar_t(0));
    for (int r = 0; r < kRows; ++r) {
      acc[r][v] = accumulate ? load_n(C + r * ldc + v * W, v) : start;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    // A^T's rows lie lda apart, each k on a new page from lda = 1024 floats, where the
    // hardware prefetcher stops: fetch kAhead rows ahead.
    if constexpr (kTransA) {
      constexpr int64_t kAhead = 16;
      if (k + kAhead < K) __builtin_prefetch(A + (k + kAhead) * lda);
    }
    Vec b[kVecs];
    for (int v = 0; v < kVecs; ++v) b[v] = load_n(B + k * ldb + v * W, v);
    for (int r = 0; r < kRows; ++r) {
      const Vec a(static_cast<scalar_t>(kTransA ? A[k * lda + r] : A[r * lda + k]));
      for (int v = 0; v < kVecs; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
  if constexpr (kFull && std::is_same_v<out_t, scalar_t>) {
    if (stream) {
      for (int r = 0; r < kRows; ++r) {
        for (int v = 0; v < kVecs; ++v) store_streamed(acc[r][v], C + r * ldc + v * W);
      }
      return;
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      if (kFull || n[v] > 0) store(acc[r][v], C + r * ldc + v * W, kFull ? W : n[v]);
    }
  }
}

template <typename scalar_t, int kRows, int kVecs, bool kTransA = false, typename a_t = scalar_t,
          typename b_t = a_t, typename out_t = scalar_t>
C10_ALWAYS_INLINE void small_gemm_block(int64_t K, const a_t* A, int64_t lda, const b_t* B,
                                        int64_t ldb, bool accumulate, out_t* C, int64_t ldc,
                                        int64_t cols, const scalar_t* bias = nullptr,
                                        bool stream = false) {
  if (cols == kVecs * Vectorized<scalar_t>::size()) {
    small_gemm_block_impl<scalar_t, kRows, kVecs, true, kTransA, a_t, b_t, out_t>(
        K, A, lda, B, ldb, accumulate, C, ldc, cols, bias, stream);
  } else {
    small_gemm_block_impl<scalar_t, kRows, kVecs, false, kTransA, a_t, b_t, out_t>(
        K, A, lda, B, ldb, accumulate, C, ldc, cols, bias, false);
  }
}

// One row of C, columns [n, n_end): c[n:n_end) (+)= a[0:K) B[0:K, n:n_end), in blocks
// of 8 vectors (8 accumulators and 8 B vectors of AVX-512's 32 registers; 4 + 4 of
// AVX2's 16), then 4, then 2 (the last maybe masked): a row alone is bound by the FMA
// latency, so it needs many independent chains (e.g. a batch of one). With kTransA,
// a's element k is a[k * lda] (a column of A stored [K, M]). `bias` as small_gemm_block's,
// indexed as c. Storage types as small_gemm_block's.
template <typename scalar_t, bool kTransA = false, typename a_t = scalar_t, typename b_t = a_t,
          typename out_t = scalar_t>
C10_ALWAYS_INLINE void gemm_one_row(int64_t K, const a_t* a, const b_t* B, int64_t ldb,
                                    bool accumulate, out_t* c, int64_t n, int64_t n_end,
                                    int64_t lda = 0, const scalar_t* bias = nullptr) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
  constexpr int kWideVecs = sizeof(Vectorized<scalar_t>) >= 64 ? 8 : 4;
  const auto bias_at = [&](int64_t col) { return bias != nullptr ? bias + col : nullptr; };
  for (; n + kWideVecs * W <= n_end; n += kWideVecs * W) {
    small_gemm_block<scalar_t, 1, kWideVecs, kTransA, a_t, b_t, out_t>(
        K, a, lda, B + n, ldb, accumulate, c + n, 0, kWideVecs * W, bias_at(n));
  }
  if (kWideVecs > 4 && n + 4 * W <= n_end) {
    small_gemm_block<scalar_t, 1, 4, kTransA, a_t, b_t, out_t>(K, a, lda, B + n, ldb, accumulate,
                                                           c + n, 0, 4 * W, bias_at(n));
    n += 4 * W;
  }
  for (; n < n_end; n += 2 * W) {
    small_gemm_block<scalar_t, 1, 2, kTransA, a_t, b_t, out_t>(
        K, a, lda, B + n, ldb, accumulate, c + n, 0, std::min(2 * W, n_end - n), bias_at(n));
  }
}

// C[M, N] = op(A) B (+ C when accumulate), B row-major [K, N]; op(A) = A [M, K], or
// A^T with kTransA (A stored [K, M], as dgates in the weight gradients dgates^T x).
// Storage types as small_gemm_block's.
template <typename scalar_t, bool kTransA, typename a_t = scalar_t, typename b_t = a_t,
          typename out_t = scalar_t>
void small_gemm_impl(int64_t M, int64_t N, int64_t K, const a_t* A, int64_t lda,
                     const b_t* B, int64_t ldb, bool accumulate, out_t* C, int64_t ldc) {
  if constexpr (kVectorized<scalar_t>) {
    constexpr int64_t W = Vectorized<scalar_t>::size();
    constexpr int64_t kCols = 2 * W;  // columns of a 4-row block; a thread's unit of work
    constexpr int kRows = 4;
    const int64_t col_blocks = (N + kCols - 1) / kCols;
    // Row m of op(A) starts at A + m * lda, or A + m with kTransA.
    const int64_t row_step = kTransA ? 1 : lda;
    // Threads split the columns; a block's B panel [K, kCols] stays in L1 across rows.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(M * K * kCols, 1));
    auto run = [&](int64_t j0, int64_t j1) {
      const int64_t n_end = std::min(N, j1 * kCols), full_rows = M - M % kRows;
      for (int64_t n = j0 * kCols; n < n_end; n += kCols) {
        for (int64_t m = 0; m < full_rows; m += kRows) {
          small_gemm_block<scalar_t, kRows, 2, kTransA, a_t, b_t, out_t>(
              K, A + m * row_step, lda, B + n, ldb, accumulate, C + m * ldc + n, ldc,
              std::min(kCols, n_end - n));
        }
      }
      for (int64_t m = full_rows; m < M; ++m) {  // rows left over, one at a time, wider blocks
        gemm_one_row<scalar_t, kTransA, a_t, b_t, out_t>(K, A + m * row_step, B, ldb, accumulate,
                                                     C + m * ldc, j0 * kCols, n_end, lda);
      }
    };
    if (col_blocks <= grain) {
      run(0, col_blocks);
    } else {
      at::parallel_for(0, col_blocks, grain, run);
    }
  }
}

template <typename scalar_t>
void small_gemm(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                const scalar_t* B, int64_t ldb, bool accumulate, scalar_t* C, int64_t ldc) {
  small_gemm_impl<scalar_t, false>(M, N, K, A, lda, B, ldb, accumulate, C, ldc);
}

template <typename scalar_t>
void small_gemm_trans_a(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                        const scalar_t* B, int64_t ldb, bool accumulate, scalar_t* C,
                        int64_t ldc) {
  small_gemm_impl<scalar_t, true>(M, N, K, A, lda, B, ldb, accumulate, C, ldc);
}

// src [rows, cols] (row stride ld) in half_t widened into a float [rows, cols].
template <typename half_t>
std::vector<float> widened(const half_t* src, int64_t rows, int64_t cols, int64_t ld) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  std::vector<float> out(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; c += W) {
      const int64_t n = std::min(W, cols - c);
      store(load(Vec{}, src + r * ld + c, n), out.data() + r * cols + c, n);
    }
  }
  return out;
}

// StoredKernels::small_gemm: C = op(A) B with A, B and C in half_t as stored, float
// sums, C rounded once; A (dgates, few rows or, transposed, K = the batch) widened to
// float first (a 16-bit broadcast is three instructions more a row of a block and k).
// A few rows of A (dx = dgates W_ih, dh = dgates W_hh: K = 4H, B up to 16 MB, each of
// its loads widened): threads split the columns, as small_gemm_impl's, but K goes in
// slices of kSlice rows of B, each over all of a thread's columns, the sums in a float
// buffer: a block of columns taking all K rows of B at once (B's rows N apart) touched
// a new page per k, 5x slower at 1 x 4096 x 1024 on an AMD Zen 3. With trans_a (dW =
// dgates^T x: M = 4H rows, K = the batch; B, here x, widened too, K x N), threads split
// blocks of 4 rows, each written along its rows, not columns of C in two halves of a
// line far apart.
template <typename half_t>
void small_gemm_16bit(bool trans_a, int64_t M, int64_t N, int64_t K, const half_t* A,
                      int64_t lda, const half_t* B, int64_t ldb, half_t* C, int64_t ldc) {
  constexpr int64_t W = Vectorized<float>::size(), kRows = 4, kSlice = 64;
  if (!trans_a) {
    const std::vector<float> a = widened(A, M, K, lda);
    std::vector<float> sums(M * N);
    const int64_t col_blocks = (N + 2 * W - 1) / (2 * W), full_rows = M - M % kRows;
    const int64_t grain =
        std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(M * K * 2 * W, 1));
    at::parallel_for(0, col_blocks, grain, [&](int64_t j0, int64_t j1) {
      const int64_t n0 = j0 * 2 * W, n1 = std::min(N, j1 * 2 * W);
      for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
        const int64_t k = std::min(kSlice, K - k0);
        for (int64_t n = n0; n < n1; n += 2 * W) {
          for (int64_t m = 0; m < full_rows; m += kRows) {
            small_gemm_block<float, kRows, 2, false, float, half_t, float>(
                k, a.data() + m * K + k0, K, B + k0 * ldb + n, ldb, k0 > 0,
                sums.data() + m * N + n, N, std::min(2 * W, n1 - n));
          }
        }
        for (int64_t m = full_rows; m < M; ++m) {
          gemm_one_row<float, false, float, half_t, float>(
              k, a.data() + m * K + k0, B + k0 * ldb, ldb, k0 > 0, sums.data() + m * N, n0, n1);
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = n0; n < n1; n += W) {
          store(load(Vectorized<float>{}, sums.data() + m * N + n, std::min(W, n1 - n)),
                C + m * ldc + n, std::min(W, n1 - n));
        }
      }
    });
    return;
  }
  const std::vector<float> a = widened(A, K, M, lda), b = widened(B, K, N, ldb);
  const int64_t blocks = (M + kRows - 1) / kRows;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(kRows * K * N, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t m = b0 * kRows; m < std::min(M, b1 * kRows); m += kRows) {
      if (m + kRows > M) {  // the rows left over, one at a time
        for (int64_t r = m; r < M; ++r) {
          gemm_one_row<float, true, float, float, half_t>(K, a.data() + r, b.data(), N, false,
                                                          C + r * ldc, 0, N, M);
        }
        break;
      }
      for (int64_t n = 0; n < N; n += 2 * W) {
        small_gemm_block<float, kRows, 2, true, float, float, half_t>(
            K, a.data() + m, M, b.data() + n, N, false, C + m * ldc + n, ldc, std::min(2 * W, N - n));
      }
    }
  });
}

// out lane i = the sum of acc[i]'s lanes, for one vector of accumulators (W of W
// lanes): a tree of cross-lane shuffles and adds (AVX-512: 16 -> 8 partial sums each in
// a 256-bit half, 8 -> 4 in a 128-bit lane, 4 -> 2 -> 1 within lanes, then one permute
// into order; AVX2 likewise from 8), 3 instructions a sum where storing and adding
// lanes took 16; the portable and double builds add lanes.
template <typename scalar_t>
C10_ALWAYS_INLINE Vectorized<scalar_t> sum_lanes(
    const Vectorized<scalar_t> (&acc)[Vectorized<scalar_t>::size()]) {
  using Vec = Vectorized<scalar_t>;
  constexpr int W = Vec::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    __m512 s[8], t[4], u[2];
    for (int p = 0; p < 8; ++p) {  // s[p]: acc[2p] in the low 256 bits, acc[2p + 1] high
      const __m512 x = acc[2 * p], y = acc[2 * p + 1];
      s[p] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
    }
    for (int p = 0; p < 4; ++p) {  // t[p]: 128-bit lane j holds acc[4p + j]
      t[p] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * p], s[2 * p + 1], 0x88),
                           _mm512_shuffle_f32x4(s[2 * p], s[2 * p + 1], 0xDD));
    }
    for (int p = 0; p < 2; ++p) {  // u[p], lane j: acc[8p + j] at 0, 2; acc[8p + 4 + j] at 1, 3
      u[p] = _mm512_add_ps(_mm512_unpacklo_ps(t[2 * p], t[2 * p + 1]),
                           _mm512_unpackhi_ps(t[2 * p], t[2 * p + 1]));
    }
    // v: element 4j + c is the sum of acc[4c + j].
    const __m512 v = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x44),
                                   _mm512_shuffle_ps(u[0], u[1], 0xEE));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    __m256 s[4], t[2];
    for (int p = 0; p < 4; ++p) {  // s[p]: acc[2p] in the low 128 bits, acc[2p + 1] high
      const __m256 x = acc[2 * p], y = acc[2 * p + 1];
      s[p] = _mm256_add_ps(_mm256_permute2f128_ps(x, y, 0x20), _mm256_permute2f128_ps(x, y, 0x31));
    }
    for (int p = 0; p < 2; ++p) {  // t[p], half h: acc[4p + h] at 0, 2; acc[4p + 2 + h] at 1, 3
      t[p] = _mm256_add_ps(_mm256_unpacklo_ps(s[2 * p], s[2 * p + 1]),
                           _mm256_unpackhi_ps(s[2 * p], s[2 * p + 1]));
    }
    // v: element 4h + c is the sum of acc[2c + h].
    const __m256 v = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], 0x44),
                                   _mm256_shuffle_ps(t[0], t[1], 0xEE));
    return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  }
#endif
  alignas(64) scalar_t lanes[W][W];
  alignas(64) scalar_t sums[W];
  for (int i = 0; i < W; ++i) acc[i].store(lanes[i]);
  for (int i = 0; i < W; ++i) {
    scalar_t sum = 0;
    for (int l = 0; l < W; ++l) sum += lanes[i][l];
    sums[i] = sum;
  }
  return Vec::loadu(sums);
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// bfloat16 storage p[0, 2W) (n valid, zeros past) as two float vectors, the elements at
// even and at odd positions: a bfloat16 is a float's high half, so the even ones are the
// 32-bit lanes shifted up, the odd ones the lanes masked, one cheap instruction each where
// widening in order takes a lane-crossing zero-extension a vector (the shuffle port bounds
// it). Out of order: for dot products whose two operands are split alike.
C10_ALWAYS_INLINE void load_bf16_even_odd(const c10::BFloat16* p, int64_t n,
                                          Vectorized<float>& even, Vectorized<float>& odd) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i v = n == 32 ? _mm512_loadu_si512(p)
                            : _mm512_maskz_loadu_epi16(__mmask32((uint64_t{1} << n) - 1), p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
#else
  const __m256i v = n == 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                            : __m256i(Vectorized<c10::BFloat16>::loadu(p, n));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))));
#endif
}
constexpr bool kBf16EvenOdd = true;
#else
constexpr bool kBf16EvenOdd = false;
#endif

// CpuKernels::small_gemm_trans_b: C[M, N] = A[M, K] B^T (+ C when accumulate), B stored
// [N, K] and read in place, as dot products along K: W rows of B at a time (W
// accumulators, one A vector and W B vectors a step of K), each such block over every
// row of A, its W sums one store (sum_lanes). K goes in slices of 256, so that a
// block's slice of B (16 KB) comes from L1 for the rows of A after the first (whole,
// the 64 KB of W rows at K = 1024 came from L2: 0.6x of BLAS at 16 rows). Blocks split
// between threads. For few rows, where small_gemm would first gather B^T and BLAS
// copies B every call (MKL's sgemm copy was 32% of a one-step decode). Tried: tiles of
// 2 rows x W / 2 (fewer loads a FMA; 8 pointers to B's rows on AVX-512, not 16), 1.2-2x
// faster with B of 16-64 MB but 1.1-1.5x slower at a decoding LSTM's 0.1-2 MB, its
// accumulators going through the stack (AMD Zen 4). With in_t 16-bit (A and B as a
// 16-bit layer stores them, C float; StoredKernels::small_gemm_trans_b): each load
// widened to float, exact products, float sums (bfloat16 on AVX512_BF16 CPUs:
// small_gemm_trans_b_bf16's vdpbf16ps); bfloat16 in the SIMD builds 2W elements a step,
// split even / odd (load_bf16_even_odd): in order, it ran at 0.6x of float16's vcvtph2ps
// (AVX2-only AMD Zen 3, PERF_LOG.md row 59).
template <typename scalar_t, typename in_t = scalar_t>
void small_gemm_trans_b(int64_t M, int64_t N, int64_t K, const in_t* A, int64_t lda,
                        const in_t* B, int64_t ldb, bool accumulate, scalar_t* C,
                        int64_t ldc) {
  if constexpr (kVectorized<scalar_t>) {
    using Vec = Vectorized<scalar_t>;
    constexpr int64_t W = Vec::size(), kSlice = 256;
    const int64_t blocks = (N + W - 1) / W;
    const int64_t grain =
        std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(M * K * W, 1));
    const auto run = [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t n = j * W, rows = std::min(W, N - n);
        const in_t* b[W];  // rows past N repeat row n; their sums are not stored
        for (int64_t i = 0; i < W; ++i) b[i] = B + (n + (i < rows ? i : 0)) * ldb;
        for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += kSlice) {
          const int64_t k1 = std::min(K, k0 + kSlice);
          for (int64_t m = 0; m < M; ++m) {
            const in_t* a = A + m * lda;
            Vec acc[W];
            for (int64_t i = 0; i < W; ++i) acc[i] = Vec(scalar_t(0));
            int64_t k = k0;
            if constexpr (std::is_same_v<in_t, c10::BFloat16> && kBf16EvenOdd) {
              // (The partial step apart: a partial load in the loop put the accumulators
              // on the stack.)
              Vec x0, x1, y0, y1;
              for (; k + 2 * W <= k1; k += 2 * W) {
                load_bf16_even_odd(a + k, 2 * W, x0, x1);
                for (int64_t i = 0; i < W; ++i) {
                  load_bf16_even_odd(b[i] + k, 2 * W, y0, y1);
                  acc[i] = at::vec::fmadd(x1, y1, at::vec::fmadd(x0, y0, acc[i]));
                }
              }
              if (k < k1) {
                load_bf16_even_odd(a + k, k1 - k, x0, x1);
                for (int64_t i = 0; i < W; ++i) {
                  load_bf16_even_odd(b[i] + k, k1 - k, y0, y1);
                  acc[i] = at::vec::fmadd(x1, y1, at::vec::fmadd(x0, y0, acc[i]));
                }
              }
              k = k1;
            }
            for (; k + W <= k1; k += W) {
              const Vec x = load(Vec{}, a + k, W);
              for (int64_t i = 0; i < W; ++i) {
                acc[i] = at::vec::fmadd(x, load(Vec{}, b[i] + k, W), acc[i]);
              }
            }
            if (k < k1) {
              const Vec x = load(Vec{}, a + k, k1 - k);
              for (int64_t i = 0; i < W; ++i) {
                acc[i] = at::vec::fmadd(x, load(Vec{}, b[i] + k, k1 - k), acc[i]);
              }
            }
            Vec sums = sum_lanes<scalar_t>(acc);
            scalar_t* c = C + m * ldc + n;
            if (accumulate || k0 > 0) sums = sums + load(Vec{}, c, rows);
            store(sums, c, rows);
          }
        }
      }
    };
    if (blocks <= grain) {
      run(0, blocks);
    } else {
      at::parallel_for(0, blocks, grain, run);
    }
  }
}

// C[M, n0:n1) = A[M, K] B[K, n0:n1) (+ C when accumulate), on the calling thread: the
// fused backward step's dh GEMM over a thread's own rows or columns. Larger blocks than
// small_gemm's, for batches past 8: up to 6 rows x 4 vectors (24 accumulators + 4
// B vectors of AVX-512's 32 registers; 4 x 2 on AVX2), each B load serving 6 rows;
// the columns left over in blocks of 2 and 1 vectors, the last one masked (a masked
// 4-vector block kept its accumulators on the stack: H = 40 ran at half the speed);
// the rows left over (under 4) as in small_gemm.
// K goes in slices of at most 256 KiB of a block's columns of B, so that the row
// blocks after the first read them from L2, not L3 (wide: W_hh is 16 MB, K = 4096).
// Without accumulate, C starts from `bias` where it is not null (indexed as C's columns).
// With kTransA, A is stored [K, M] (op(A) = A^T: the weight gradients dgates^T x): a
// tile's rows at k are adjacent, A[k * lda + m + r]. With stream_c, the tiles' last K
// slice goes to C by store_streamed wherever their rows are whole aligned cache lines.
template <typename scalar_t, bool kTransA>
void gemm_columns_impl(int64_t M, int64_t n0, int64_t n1, int64_t K, const scalar_t* A,
                       int64_t lda, const scalar_t* B, int64_t ldb, bool accumulate,
                       const scalar_t* bias, scalar_t* C, int64_t ldc, bool stream_c) {
  if constexpr (kVectorized<scalar_t>) {
    // Where row m and element k of op(A) start.
    const int64_t row_step = kTransA ? 1 : lda, k_step = kTransA ? lda : 1;
    constexpr int64_t W = Vectorized<scalar_t>::size();
    constexpr bool kWide = sizeof(Vectorized<scalar_t>) >= 64;
    // Rows [0, tiled) go in blocks of 6 (while more than 8 remain) and 4; the rest, fewer
    // than 4, one at a time.
    int64_t tiled = 0;
    if (kWide) {
      while (M - tiled >= 6 && M - tiled != 8) tiled += 6;
    }
    tiled += (M - tiled) / 4 * 4;
    // Columns [n, n + cols) of rows [0, tiled) in blocks of kVecs vectors, slice by slice of K.
    // Streamed stores take whole cache lines: each row's block of columns in whole
    // aligned lines.
    constexpr uintptr_t kLine = 64;
    const bool lines = stream_c && reinterpret_cast<uintptr_t>(C) % kLine == 0 &&
                       ldc * sizeof(scalar_t) % kLine == 0;
    const auto column_block = [&](auto vecs, int64_t n, int64_t cols) {
      constexpr int kVecs = decltype(vecs)::value;
      constexpr int64_t kSlice = kGemmColumnsSliceBytes / (kVecs * W * int64_t(sizeof(scalar_t)));
      const bool stream = lines && cols == kVecs * W && n * sizeof(scalar_t) % kLine == 0 &&
                          cols * sizeof(scalar_t) % kLine == 0;
      for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
        const int64_t k = std::min(kSlice, K - k0);
        const bool add = accumulate || k0 > 0;
        const bool last = stream && k0 + k == K;
        const scalar_t* a = A + k0 * k_step;
        const scalar_t* b = B + k0 * ldb + n;
        const scalar_t* start = bias != nullptr ? bias + n : nullptr;
        int64_t m = 0;
        if constexpr (kWide) {
          for (; tiled - m >= 6 && tiled - m != 8; m += 6) {
            small_gemm_block<scalar_t, 6, kVecs, kTransA>(k, a + m * row_step, lda, b, ldb, add,
                                                          C + m * ldc + n, ldc, cols, start, last);
          }
        }
        for (; m < tiled; m += 4) {
          small_gemm_block<scalar_t, 4, kVecs, kTransA>(k, a + m * row_step, lda, b, ldb, add,
                                                        C + m * ldc + n, ldc, cols, start, last);
        }
      }
    };
    constexpr int kVecs = kWide ? 4 : 2;
    int64_t n = n0;
    for (; n + kVecs * W <= n1; n += kVecs * W) {
      column_block(std::integral_constant<int, kVecs>{}, n, kVecs * W);
    }
    if (kVecs > 2 && n + 2 * W <= n1) {
      column_block(std::integral_constant<int, 2>{}, n, 2 * W);
      n += 2 * W;
    }
    for (; n < n1; n += W) column_block(std::integral_constant<int, 1>{}, n, std::min(W, n1 - n));
    for (int64_t m = tiled; m < M; ++m) {
      gemm_one_row<scalar_t, kTransA>(K, A + m * row_step, B, ldb, accumulate, C + m * ldc, n0,
                                      n1, lda, bias);
    }
    if (lines) streamed_stores_done();
  }
}

template <typename scalar_t>
void gemm_columns(int64_t M, int64_t n0, int64_t n1, int64_t K, const scalar_t* A, int64_t lda,
                  const scalar_t* B, int64_t ldb, bool accumulate, const scalar_t* bias,
                  scalar_t* C, int64_t ldc, bool stream_c) {
  gemm_columns_impl<scalar_t, false>(M, n0, n1, K, A, lda, B, ldb, accumulate, bias, C, ldc,
                                     stream_c);
}

template <typename scalar_t>
void gemm_columns_trans_a(int64_t M, int64_t n0, int64_t n1, int64_t K, const scalar_t* A,
                          int64_t lda, const scalar_t* B, int64_t ldb, bool accumulate,
                          const scalar_t* bias, scalar_t* C, int64_t ldc, bool stream_c) {
  gemm_columns_impl<scalar_t, true>(M, n0, n1, K, A, lda, B, ldb, accumulate, bias, C, ldc,
                                    stream_c);
}

// Whether fused_step's packed weights come in gate halves (AVX2 and the portable build):
// two streams of 2 vectors a k (i f, then g o) instead of one of 4. The tiles of 4 and
// 6 rows read one half per pass over K (fused_step_tile_halves, PERF_LOG.md row 39);
// those of 1 and 2 both at once (at B16 H1024 a chunk's 128 KB came from L2 faster in
// two streams, row 33).
template <typename S>
constexpr bool kFusedGateHalves = sizeof(Vectorized<S>) < 64;

// The end of a fused step tile, for one row: the cell update on its summed gates
// (units [u, u + n)), then the activated gates (where store_gates), c and h stored.
// Returns h.
template <typename scalar_t>
C10_ALWAYS_INLINE Vectorized<scalar_t> fused_tile_row_update(
    int64_t H, Vectorized<scalar_t> (&gate)[4], scalar_t* gates, bool store_gates,
    scalar_t* c_state, scalar_t* cells, scalar_t* h_out, int64_t row, int64_t u, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  const Vec c_prev = load(Vec{}, c_state + row * H + u, n);
  Vec c, h;
  cell_forward(gate[0], gate[1], gate[2], gate[3], c_prev, c, h);
  if (store_gates) {
    scalar_t* g_row = gates + row * 4 * H + u;
    for (int q = 0; q < 4; ++q) store(gate[q], g_row + q * H, n);
  }
  store(c, c_state + row * H + u, n);
  store(c, cells + row * H + u, n);
  store(h, h_out + row * H + u, n);
  return h;
}

// fused_step's tile: kRows rows x one vector of hidden units [u, u + n), all four
// gates: 4 * kRows FMA chains over K = H, then the cell update in registers.
// Per k, the 4 weight vectors stay in registers across the rows: 4 * kRows
// accumulators + 4 + a broadcast (AVX-512's 6 rows: 29 of 32; AVX2 runs its tiles of
// 4 and 6 rows in gate halves, fused_step_tile_halves, and only 1 and 2 here).
// w_tile: this tile's packed weights, [H][4][W] or, in gate halves, [2][H][2][W].
template <typename scalar_t, int kRows>
C10_ALWAYS_INLINE void fused_step_tile(int64_t H, const scalar_t* const* a_rows,
                                       const scalar_t* w_tile, scalar_t* gates, bool store_gates,
                                       scalar_t* c_state, scalar_t* cells, scalar_t* h_out,
                                       int64_t row0, int64_t u, int64_t n) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  static_assert(4 * kRows + 4 + 1 <= (sizeof(Vec) >= 64 ? 32 : 16),
                "the tile's accumulators, weights and broadcast must fit the registers");
  constexpr bool kGateHalves = kFusedGateHalves<scalar_t>;
  const int64_t G = 4 * H;
  Vec acc[kRows][4];
  for (int r = 0; r < kRows; ++r) {
    for (int q = 0; q < 4; ++q) acc[r][q] = load(Vec{}, gates + (row0 + r) * G + q * H + u, n);
  }
  // Gate q's weights at k: [H][4][W], or with kGateHalves [2][H][2][W] (two streams).
  const auto w_at = [&](int64_t k, int q) {
    return kGateHalves ? w_tile + (q / 2) * H * 2 * W + k * 2 * W + (q % 2) * W
                       : w_tile + k * 4 * W + q * W;
  };
  for (int64_t k = 0; k < H; ++k) {
    Vec w[4];
    for (int q = 0; q < 4; ++q) w[q] = Vec::loadu(w_at(k, q));
    for (int r = 0; r < kRows; ++r) {
      const Vec a(a_rows[r][k]);
      for (int q = 0; q < 4; ++q) acc[r][q] = at::vec::fmadd(a, w[q], acc[r][q]);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    fused_tile_row_update(H, acc[r], gates, store_gates, c_state, cells, h_out, row0 + r, u, n);
  }
}

// fused_step's tile in gate halves (AVX2's 16 registers): kRows rows x one vector of
// hidden units, twice over K: gates i, f (activated and stored to `gates`), then g, o
// and the cell update. 2 * kRows accumulators + the half's 2 weight vectors + a
// broadcast (6 rows: 15 of 16) hold the weights in registers, where fused_step_tile's
// 3 x 4 took each weight from memory once per row: 15 loads per 12 FMAs, past the 2
// wide loads a cycle that feed 2 FMAs a cycle (PERF_LOG.md row 39).
// w_tile: this tile's packed weights, [2][H][2][W]. `gates` is written either way.
template <typename scalar_t, int kRows>
C10_ALWAYS_INLINE void fused_step_tile_halves(int64_t H, const scalar_t* const* a_rows,
                                              const scalar_t* w_tile, scalar_t* gates,
                                              scalar_t* c_state, scalar_t* cells,
                                              scalar_t* h_out, int64_t row0, int64_t u,
                                              int64_t n) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t G = 4 * H;
  for (int half = 0; half < 2; ++half) {
    const scalar_t* w_half = w_tile + half * H * 2 * W;
    Vec acc[kRows][2];
    for (int r = 0; r < kRows; ++r) {
      for (int q = 0; q < 2; ++q) {
        acc[r][q] = load(Vec{}, gates + (row0 + r) * G + (2 * half + q) * H + u, n);
      }
    }
    const auto k_loop = [&](auto prefetch) FUSED_LSTM_INLINE_LAMBDA {
      for (int64_t k = 0; k < H; ++k) {
        const Vec w0 = Vec::loadu(w_half + k * 2 * W), w1 = Vec::loadu(w_half + k * 2 * W + W);
        // The other half's line at k, toward L2, beside this one: two streams in flight
        // from memory where W_hh is beyond L2, as when a tile read all four gates.
        if constexpr (decltype(prefetch)::value) {
          __builtin_prefetch(w_half + H * 2 * W + k * 2 * W, 0, 2);
        }
        for (int r = 0; r < kRows; ++r) {
          const Vec a(a_rows[r][k]);
          acc[r][0] = at::vec::fmadd(a, w0, acc[r][0]);
          acc[r][1] = at::vec::fmadd(a, w1, acc[r][1]);
        }
      }
    };
    if (half == 0) {
      k_loop(std::true_type{});
    } else {
      k_loop(std::false_type{});
    }
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = row0 + r;
      scalar_t* g_row = gates + row * G + u;
      if (half == 0) {
        cell_forward_input_forget(acc[r][0], acc[r][1]);
        store(acc[r][0], g_row, n);
        store(acc[r][1], g_row + H, n);
        continue;
      }
      Vec& g = acc[r][0];
      Vec& o = acc[r][1];
      const Vec i = load(Vec{}, g_row, n), f = load(Vec{}, g_row + H, n);
      const Vec c_prev = load(Vec{}, c_state + row * H + u, n);
      Vec c, h;
      cell_forward_output(i, f, g, o, c_prev, c, h);
      store(g, g_row + 2 * H, n);
      store(o, g_row + 3 * H, n);
      store(c, c_state + row * H + u, n);
      store(c, cells + row * H + u, n);
      store(h, h_out + row * H + u, n);
    }
  }
}

// CpuKernels::transpose: in SIMD register blocks where ATen has them (at::vec::
// transpose_mxn: AVX-512 float any size, in 16 x 16 blocks; AVX2 float 8 x 8), else
// element by element in 16 x 16 tiles (a cache line of each row at a time). The scalar
// tiles alone cost 7% of a wide forward in its W_hh pack (PERF_LOG.md row 41).
template <typename scalar_t>
void transpose(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld_src, scalar_t* dst,
               int64_t ld_dst) {
  int64_t r0 = 0;
  if constexpr (std::is_same_v<scalar_t, float> && sizeof(Vectorized<float>) >= 64) {
    at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, int(rows), int(cols));
    return;
  } else if constexpr (std::is_same_v<scalar_t, float> && sizeof(Vectorized<float>) == 32) {
    for (; r0 + 8 <= rows; r0 += 8) {
      int64_t c0 = 0;
      for (; c0 + 8 <= cols; c0 += 8) {
        at::vec::transpose_mxn<float, 8, 8>(src + r0 * ld_src + c0, ld_src,
                                            dst + c0 * ld_dst + r0, ld_dst);
      }
      for (int64_t r = r0; r < r0 + 8; ++r) {
        for (int64_t c = c0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
      }
    }
  }
  constexpr int64_t kTile = 16;
  for (; r0 < rows; r0 += kTile) {
    const int64_t r1 = std::min(rows, r0 + kTile);
    for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
      const int64_t c1 = std::min(cols, c0 + kTile);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
      }
    }
  }
}

// CpuKernels::pack_fused_weights. Per chunk and gate, the [n, H] block of w_hh (n units)
// transposed into [H][n] rows `row` apart (`transpose`).
template <typename scalar_t>
void pack_fused_weights(const scalar_t* w_hh, int64_t H, scalar_t* out) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
  constexpr bool kHalves = kFusedGateHalves<scalar_t>;
  const int64_t row = (kHalves ? 2 : 4) * W;  // elements per k in a stream
  const int64_t chunks = (H + W - 1) / W;
  at::parallel_for(0, chunks, std::max<int64_t>(1, (int64_t{1} << 16) / (H * 4 * W)),
                   [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n = std::min(W, H - j * W);
      for (int64_t q = 0; q < 4; ++q) {
        const scalar_t* src = w_hh + (q * H + j * W) * H;  // [n, H]
        scalar_t* dst = out + j * H * 4 * W + (kHalves ? (q / 2) * H * row + (q % 2) * W : q * W);
        transpose(src, n, H, H, dst, row);
        for (int64_t k = 0; n < W && k < H; ++k) {
          std::fill(dst + k * row + n, dst + k * row + W, scalar_t(0));
        }
      }
    }
  });
}

// fused_step's tiles over rows [0, b) and unit chunks [j0, j1) of W units:
// tile(rows, r, j, u, n) runs rows [r, r + rows) x units [u, u + n) of chunk j, `rows` an
// integral_constant. Row tiles: 6 while more than 8 rows remain (8 go as 4 + 4), then 4
// (on AVX2 in gate halves); then 2 and 1 with all four gates: a 1-row tile has only 4 FMA
// chains, too few to hide the FMA latency (PERF_LOG.md row 31), and in halves it would
// have 2. Before each tile, the next tile's input gates (the rows after, or the next
// units' first rows) go to L1 while this one runs: its rows lie 4H apart in a buffer too
// large for any cache, a stride the hardware prefetcher does not follow, and each tile
// began by waiting on its 4 * rows lines (PERF_LOG.md row 38). gates: [b, 4H].
template <int64_t W, typename scalar_t, typename Tile>
C10_ALWAYS_INLINE void for_each_fused_tile(int64_t b, int64_t H, const scalar_t* gates,
                                           int64_t j0, int64_t j1, const Tile& tile) {
  const int64_t u_end = std::min(H, j1 * W);
  const auto run = [&](auto rows, int64_t r, int64_t j, int64_t u,
                       int64_t n) FUSED_LSTM_INLINE_LAMBDA {
    constexpr int kTileRows = decltype(rows)::value;
    const int64_t next_r = r + kTileRows < b ? r + kTileRows : 0;
    const int64_t next_u = r + kTileRows < b ? u : u + W;
    if (next_u < u_end) {
      for (int64_t i = next_r; i < std::min(b, next_r + kTileRows); ++i) {
        for (int q = 0; q < 4; ++q) {
          const scalar_t* line = gates + i * 4 * H + q * H + next_u;
          __builtin_prefetch(line);
          __builtin_prefetch(line + std::min(W, u_end - next_u) - 1);
        }
      }
    }
    tile(rows, r, j, u, n);
  };
  int64_t big = 0;  // rows in the big tiles
  while (b - big >= 6 && b - big != 8) big += 6;
  big += (b - big) / 4 * 4;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t u = j * W, n = std::min(W, H - u);
    int64_t r = 0;
    for (; big - r >= 6 && big - r != 8; r += 6) run(std::integral_constant<int, 6>{}, r, j, u, n);
    for (; r < big; r += 4) run(std::integral_constant<int, 4>{}, r, j, u, n);
    for (; r + 2 <= b; r += 2) run(std::integral_constant<int, 2>{}, r, j, u, n);
    for (; r < b; ++r) run(std::integral_constant<int, 1>{}, r, j, u, n);
  }
}

template <typename scalar_t>
void fused_step(int64_t b, int64_t H, const scalar_t* a_main, int64_t split,
                const scalar_t* a_rest, const scalar_t* w_packed, scalar_t* gates,
                bool store_gates, scalar_t* c_state, scalar_t* cells, scalar_t* h_out,
                int64_t j0, int64_t j1) {
  if constexpr (kVectorized<scalar_t>) {
    constexpr int64_t W = Vectorized<scalar_t>::size();
    for_each_fused_tile<W>(b, H, gates, j0, j1,
                           [&](auto rows, int64_t r, int64_t j, int64_t u,
                               int64_t n) FUSED_LSTM_INLINE_LAMBDA {
      constexpr int kTileRows = decltype(rows)::value;
      const scalar_t* a[kTileRows];
      for (int i = 0; i < kTileRows; ++i) {
        a[i] = r + i < split ? a_main + (r + i) * H : a_rest + (r + i - split) * H;
      }
      const scalar_t* w_tile = w_packed + j * H * 4 * W;
      if constexpr (kFusedGateHalves<scalar_t> && kTileRows >= 4) {
        fused_step_tile_halves<scalar_t, kTileRows>(H, a, w_tile, gates, c_state, cells, h_out,
                                                    r, u, n);
      } else {
        fused_step_tile<scalar_t, kTileRows>(H, a, w_tile, gates, store_gates, c_state, cells,
                                             h_out, r, u, n);
      }
    });
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// fused_step with bfloat16 operands (CpuKernels::fused_step_bf16), for AVX512_BF16 CPUs
// only: its functions carry the target themselves, and cpu_kernels() hands them out only
// where the CPU has it.
#define FUSED_LSTM_BF16_TARGET \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16")))

// The bfloat16 tiles' sums: acc[r][q] += sum over k < K of a_rows[r][k] w[k][q][16
// units], by pairs of k: one vdpbf16ps a row and gate adds both products (exact in
// float32) to the float32 sum. w_tile: [K / 2][4][16][2]; K even. (q: a gate, or in
// gemm_columns_bf16 a panel's vector of columns.)
template <int kRows>
FUSED_LSTM_BF16_TARGET C10_ALWAYS_INLINE void bf16_tile_sums(int64_t K,
                                                             const c10::BFloat16* const* a_rows,
                                                             const c10::BFloat16* w_tile,
                                                             __m512 (&acc)[kRows][4]) {
  static_assert(4 * kRows + 4 + 1 <= 32, "AVX-512: 32 registers");
  for (int64_t k2 = 0; k2 < K / 2; ++k2) {
    __m512bh w[4];
    for (int q = 0; q < 4; ++q) {
      w[q] = (__m512bh)_mm512_loadu_si512(w_tile + (k2 * 4 + q) * 32);
    }
    for (int r = 0; r < kRows; ++r) {
      int32_t pair;  // a[2 k2], a[2 k2 + 1]
      std::memcpy(&pair, a_rows[r] + 2 * k2, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], a, w[q]);
    }
  }
}

// The bfloat16 GEMMs' row tiles: tile(std::integral_constant<int, R>{}) for the R =
// min(6, rows) rows left.
template <typename Tile>
FUSED_LSTM_BF16_TARGET C10_ALWAYS_INLINE void bf16_row_tile(int64_t rows, const Tile& tile) {
  switch (std::min<int64_t>(6, rows)) {
    case 6: tile(std::integral_constant<int, 6>{}); break;
    case 5: tile(std::integral_constant<int, 5>{}); break;
    case 4: tile(std::integral_constant<int, 4>{}); break;
    case 3: tile(std::integral_constant<int, 3>{}); break;
    case 2: tile(std::integral_constant<int, 2>{}); break;
    default: tile(std::integral_constant<int, 1>{}); break;
  }
}

// fused_step_tile with bfloat16 operands (bf16_tile_sums over K = H), h also stored
// rounded to h_round.
template <int kRows>
FUSED_LSTM_BF16_TARGET C10_ALWAYS_INLINE void fused_step_tile_bf16(
    int64_t H, const c10::BFloat16* const* a_rows, const c10::BFloat16* w_tile, float* gates,
    bool store_gates, float* c_state, float* cells, float* h_out, c10::BFloat16* h_round,
    int64_t row0, int64_t u, int64_t n) {
  using Vec = Vectorized<float>;
  const int64_t G = 4 * H;
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r) {
    for (int q = 0; q < 4; ++q) acc[r][q] = load(Vec{}, gates + (row0 + r) * G + q * H + u, n);
  }
  bf16_tile_sums<kRows>(H, a_rows, w_tile, acc);
  const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1);
  for (int r = 0; r < kRows; ++r) {
    Vec gate[4] = {Vec(acc[r][0]), Vec(acc[r][1]), Vec(acc[r][2]), Vec(acc[r][3])};
    const Vec h = fused_tile_row_update(H, gate, gates, store_gates, c_state, cells, h_out,
                                        row0 + r, u, n);
    _mm256_mask_storeu_epi16(h_round + (row0 + r) * H + u, lanes,
                             (__m256i)_mm512_cvtneps_pbh(h));
  }
}

FUSED_LSTM_BF16_TARGET void fused_step_bf16(int64_t b, int64_t H, const c10::BFloat16* a_main,
                                            int64_t split, const c10::BFloat16* a_rest,
                                            const c10::BFloat16* w_packed, float* gates,
                                            bool store_gates, float* c_state, float* cells,
                                            float* h_out, c10::BFloat16* h_round, int64_t j0,
                                            int64_t j1) {
  constexpr int64_t W = 16;
  for_each_fused_tile<W>(b, H, gates, j0, j1,
                         [&](auto rows, int64_t r, int64_t j, int64_t u,
                             int64_t n) FUSED_LSTM_BF16_TARGET {
    constexpr int kTileRows = decltype(rows)::value;
    const c10::BFloat16* a[kTileRows];
    for (int i = 0; i < kTileRows; ++i) {
      a[i] = r + i < split ? a_main + (r + i) * H : a_rest + (r + i - split) * H;
    }
    fused_step_tile_bf16<kTileRows>(H, a, w_packed + j * H * 4 * W, gates, store_gates,
                                    c_state, cells, h_out, h_round, r, u, n);
  });
}

// CpuKernels::input_gemm_bf16: gates[M, 4H] = a[M, K] w^T + bias (or, accumulate, +=), the
// layer's input GEMM with bfloat16 operands (bf16_tile_sums), float32 sums. w_packed: w
// [4H, K] packed by pack_fused_weights_bf16; K even; bias [4H] or null. Tiles of 6 rows x
// one chunk's 4 gates x 16 units, shared between threads. With stream (and neither
// accumulate nor a masked chunk), whole aligned vectors go by store_streamed.
FUSED_LSTM_BF16_TARGET void input_gemm_bf16(int64_t M, int64_t H, int64_t K,
                                            const c10::BFloat16* a, const c10::BFloat16* w_packed,
                                            const float* bias, bool accumulate, float* gates,
                                            bool stream) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = 16, kRows = 6;
  const int64_t chunks = (H + W - 1) / W, row_tiles = (M + kRows - 1) / kRows;
  // A vector (16 floats) is a cache line: aligned where gates and its rows (4H) are.
  const bool lines = stream && !accumulate && reinterpret_cast<uintptr_t>(gates) % 64 == 0 &&
                     H % W == 0;
  // A task: one chunk's weights (K * 128 bytes, in L2) over a block of up to 64 row tiles,
  // the blocks of equal size: threads take equal runs of tasks, and a last block of a few
  // tiles left one thread 2.5 times the other's work (wide, M = 800: 64 + 64 + 6 tiles).
  const int64_t blocks = std::max<int64_t>(1, (row_tiles + 63) / 64);
  const int64_t tiles_per_block = std::max<int64_t>(1, (row_tiles + blocks - 1) / blocks);
  at::parallel_for(0, chunks * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t % chunks, block = t / chunks;
      const int64_t u = j * W, n = std::min(W, H - u);
      const c10::BFloat16* w_tile = w_packed + j * K * 4 * W;
      Vec bias_q[4];
      for (int q = 0; q < 4; ++q) {
        bias_q[q] = bias != nullptr ? load(Vec{}, bias + q * H + u, n) : Vec(0.f);
      }
      const int64_t r_end = std::min(M, (block + 1) * tiles_per_block * kRows);
      for (int64_t r = block * tiles_per_block * kRows; r < r_end; r += kRows) {
        const auto tile = [&](auto rows) FUSED_LSTM_BF16_TARGET {
          constexpr int kTileRows = decltype(rows)::value;
          const c10::BFloat16* a_rows[kTileRows];
          __m512 acc[kTileRows][4];
          for (int i = 0; i < kTileRows; ++i) {
            a_rows[i] = a + (r + i) * K;
            for (int q = 0; q < 4; ++q) {
              acc[i][q] = accumulate ? __m512(load(Vec{}, gates + (r + i) * 4 * H + q * H + u, n))
                                     : __m512(bias_q[q]);
            }
          }
          bf16_tile_sums<kTileRows>(K, a_rows, w_tile, acc);
          for (int i = 0; i < kTileRows; ++i) {
            for (int q = 0; q < 4; ++q) {
              float* out = gates + (r + i) * 4 * H + q * H + u;
              if (lines) {
                store_streamed(Vec(acc[i][q]), out);
              } else {
                store(Vec(acc[i][q]), out, n);
              }
            }
          }
        };
        bf16_row_tile(M - r, tile);
      }
    }
    if (lines) streamed_stores_done();
  });
}

// The packed bfloat16 weights' common step: per chunk of 16 units and gate q, the units'
// rows of w [4H, K] (row-major, bfloat16 as the layer stores it) as pairs of k (32-bit
// words, as stored), words [16 units][pairs], 0 past unit H and past K (pairs >= K / 2,
// rounded up), handed to place(j, q, words) to transpose into the packed layout (SIMD
// blocks, `transpose`: a scalar loop took 14% of a wide bfloat16 forward). Chunks split
// between threads.
template <typename Place>
void pack_bf16_words(const c10::BFloat16* w, int64_t H, int64_t K, int64_t pairs,
                     const Place& place) {
  constexpr int64_t W = 16;
  const int64_t chunks = (H + W - 1) / W;
  at::parallel_for(0, chunks, std::max<int64_t>(1, (int64_t{1} << 16) / (pairs * 8 * W)),
                   [&](int64_t j0, int64_t j1) {
    std::vector<float> words(W * pairs);  // moved as bits, never computed on
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t q = 0; q < 4; ++q) {
        std::fill(words.begin(), words.end(), 0.f);
        for (int64_t u = 0; u < W && j * W + u < H; ++u) {
          std::memcpy(words.data() + u * pairs, w + (q * H + j * W + u) * K,
                      K * sizeof(c10::BFloat16));
        }
        place(j, q, words.data());
      }
    }
  });
}

// CpuKernels::bf16_dot.pack_weights: w [4H, K] to out[j][k / 2][q][u][k % 2] = w[q * H + j
// * 16 + u][k], 0 past unit H and, for odd K, at k = K: each chunk and gate's [16, K / 2]
// words transposed into place.
void pack_fused_weights_bf16(const c10::BFloat16* w, int64_t H, int64_t K, c10::BFloat16* out) {
  constexpr int64_t W = 16;
  const int64_t pairs = (K + 1) / 2;
  float* out_words = reinterpret_cast<float*>(out);
  pack_bf16_words(w, H, K, pairs, [&](int64_t j, int64_t q, const float* words) {
    transpose(words, W, pairs, pairs, out_words + (j * pairs * 4 + q) * W, 4 * W);
  });
}

// StoredKernels<float, BFloat16>::small_gemm_trans_b on AVX512_BF16 CPUs: A and B in
// bfloat16 as stored, C in float32: each step of K 32 elements, one vdpbf16ps per row of
// B adding two exact products per lane into the float32 sums; K slices of 512 (a block's
// 16 KB); the partial step masked by elements (odd K included).
FUSED_LSTM_BF16_TARGET void small_gemm_trans_b_bf16(int64_t M, int64_t N, int64_t K,
                                                    const c10::BFloat16* A, int64_t lda,
                                                    const c10::BFloat16* B, int64_t ldb,
                                                    bool accumulate, float* C, int64_t ldc) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = 16, kStep = 32, kSlice = 512;
  const int64_t blocks = (N + W - 1) / W;
  const int64_t grain =
      std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(M * K * W, 1));
  const auto run = [&](int64_t j0, int64_t j1) FUSED_LSTM_BF16_TARGET {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t n = j * W, rows = std::min(W, N - n);
      const c10::BFloat16* b[W];  // rows past N repeat row n; their sums are not stored
      for (int64_t i = 0; i < W; ++i) b[i] = B + (n + (i < rows ? i : 0)) * ldb;
      for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += kSlice) {
        const int64_t k1 = std::min(K, k0 + kSlice);
        for (int64_t m = 0; m < M; ++m) {
          const c10::BFloat16* a = A + m * lda;
          Vec acc[W];
          for (int64_t i = 0; i < W; ++i) acc[i] = Vec(0.f);
          int64_t k = k0;
          for (; k + kStep <= k1; k += kStep) {
            const __m512bh x = (__m512bh)_mm512_loadu_si512(a + k);
            for (int64_t i = 0; i < W; ++i) {
              acc[i] = _mm512_dpbf16_ps(acc[i], x, (__m512bh)_mm512_loadu_si512(b[i] + k));
            }
          }
          if (k < k1) {
            const __mmask32 lanes = static_cast<__mmask32>((uint64_t{1} << (k1 - k)) - 1);
            const __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(lanes, a + k);
            for (int64_t i = 0; i < W; ++i) {
              const __m512bh y = (__m512bh)_mm512_maskz_loadu_epi16(lanes, b[i] + k);
              acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
            }
          }
          Vec sums = sum_lanes<float>(acc);
          float* c = C + m * ldc + n;
          if (accumulate || k0 > 0) sums = sums + load(Vec{}, c, rows);
          store(sums, c, rows);
        }
      }
    }
  };
  if (blocks <= grain) {
    run(0, blocks);
  } else {
    at::parallel_for(0, blocks, grain, run);
  }
}

// CpuKernels::pack_column_pairs_bf16: b [K, N] to out[p][k / 2][w][k % 2] = b[k][p * 64
// + w], panels of kBf16PanelColumns = 64 columns by pairs of k (0 past column N and, for
// odd K, at k = K): per pair of rows and 32 columns, the two rows' elements interleaved
// by one vpermt2w each half. The panels split between threads.
void pack_column_pairs_bf16(const c10::BFloat16* b, int64_t K, int64_t N, c10::BFloat16* out) {
  constexpr int64_t kPanel = kBf16PanelColumns, kHalf = 32;
  static_assert(kPanel == 2 * kHalf, "a panel is two halves of 32 columns");
  const int64_t panels = (N + kPanel - 1) / kPanel, pairs = (K + 1) / 2;
  // Word j of the low (high) result: element j (16 + j) of row 2 k2, then of row 2 k2 + 1.
  alignas(64) int16_t low[32], high[32];
  for (int j = 0; j < 16; ++j) {
    low[2 * j] = j, low[2 * j + 1] = 32 + j;
    high[2 * j] = 16 + j, high[2 * j + 1] = 48 + j;
  }
  const __m512i low_idx = _mm512_load_si512(low), high_idx = _mm512_load_si512(high);
  at::parallel_for(0, panels, std::max<int64_t>(1, (int64_t{1} << 16) / (pairs * 2 * kPanel)),
                   [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t k2 = 0; k2 < pairs; ++k2) {
        const c10::BFloat16* row0 = b + 2 * k2 * N;
        const bool second = 2 * k2 + 1 < K;
        c10::BFloat16* dst = out + (p * pairs + k2) * 2 * kPanel;
        for (int64_t c = p * kPanel; c < (p + 1) * kPanel; c += kHalf) {
          const int64_t cols = std::clamp<int64_t>(N - c, 0, kHalf);
          const __mmask32 lanes = static_cast<__mmask32>((uint64_t{1} << cols) - 1);
          const __m512i x0 = _mm512_maskz_loadu_epi16(lanes, row0 + c);
          const __m512i x1 = second ? _mm512_maskz_loadu_epi16(lanes, row0 + N + c)
                                    : _mm512_setzero_si512();
          _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(x0, low_idx, x1));
          _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(x0, high_idx, x1));
          dst += 2 * kHalf;
        }
      }
    }
  });
}

// CpuKernels::gemm_columns_bf16: C[M, n0:n1) = A[M, K] B[K, n0:n1), A in bfloat16, B
// packed by pack_column_pairs_bf16, float32 sums: a panel's 4 vectors of columns taken
// as bf16_tile_sums' 4 gates, tiles of 6 rows. K goes in slices of 2048 (a panel's 256
// KB), so that the tiles after the first read it from L2. On the calling thread.
FUSED_LSTM_BF16_TARGET void gemm_columns_bf16(int64_t M, int64_t n0, int64_t n1, int64_t K,
                                              const c10::BFloat16* A, int64_t lda,
                                              const c10::BFloat16* b_packed, float* C,
                                              int64_t ldc) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = 16, kPanel = kBf16PanelColumns, kRows = 6, kSlice = 2048;
  static_assert(kPanel == 4 * W, "a panel is bf16_tile_sums' 4 vectors");
  for (int64_t n = n0; n < n1; n += kPanel) {
    const c10::BFloat16* panel = b_packed + n / kPanel * K * kPanel;
    int64_t cols[4];  // valid columns of each vector
    for (int q = 0; q < 4; ++q) cols[q] = std::clamp<int64_t>(n1 - n - q * W, 0, W);
    for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
      const int64_t k = std::min(kSlice, K - k0);
      for (int64_t r = 0; r < M; r += kRows) {
        const auto tile = [&](auto rows) FUSED_LSTM_BF16_TARGET {
          constexpr int kTileRows = decltype(rows)::value;
          const c10::BFloat16* a_rows[kTileRows];
          __m512 acc[kTileRows][4];
          for (int i = 0; i < kTileRows; ++i) {
            a_rows[i] = A + (r + i) * lda + k0;
            for (int q = 0; q < 4; ++q) {
              acc[i][q] = k0 > 0 && cols[q] > 0
                              ? __m512(load(Vec{}, C + (r + i) * ldc + n + q * W, cols[q]))
                              : _mm512_setzero_ps();
            }
          }
          bf16_tile_sums<kTileRows>(k, a_rows, panel + k0 * kPanel, acc);
          for (int i = 0; i < kTileRows; ++i) {
            for (int q = 0; q < 4 && cols[q] > 0; ++q) {
              store(Vec(acc[i][q]), C + (r + i) * ldc + n + q * W, cols[q]);
            }
          }
        };
        bf16_row_tile(M - r, tile);
      }
    }
  }
}

#if defined(FUSED_LSTM_AMX_BUILD)
// AMX (Sapphire Rapids and later): Bf16PackedKernels::amx. A tile register holds 16 rows
// of 64 bytes: A 16 rows x 32 bfloat16 of k, B 16 pairs of k x 16 columns x 2, C 16 x 16
// float32 sums; tdpbf16ps adds A B's exact products to C in float32. Tiles 0-3 hold sums,
// 4-5 rows of A, 5-7 weights. A tile's work (16 x 16 x 32 multiply-adds) costs the same at
// any row count, so few rows go to the `dot` kernels instead (tuning.h amx_min_rows).
#define FUSED_LSTM_AMX_TARGET                                                               \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,avx512bf16,amx-tile," \
                        "amx-bf16")))

constexpr int64_t kAmxRows = 16;          // rows of a tile, and units of a chunk
constexpr int64_t kAmxK = 32;             // bfloat16 k of an A tile's row
constexpr int64_t kAmxTile = 16 * 32;     // bfloat16 elements of an A or B tile

// Every tile 16 rows x 64 bytes (palette 1), for the calling thread until amx_done.
FUSED_LSTM_AMX_TARGET inline void amx_start() {
  struct alignas(64) Config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = kAmxRows;
  }
  _tile_loadconfig(&config);
}
FUSED_LSTM_AMX_TARGET inline void amx_done() { _tile_release(); }

// Tiles 0-3 += A B over kblocks blocks of 32 k. b: a chunk's packed weights,
// [kblocks][4 gates][tile]. kRowTiles 2: rows a0, a1 (16 each, lda_bytes apart) x gates
// q0, q0 + 1 (tiles 0, 1 from a0; 2, 3 from a1): two weight tiles a block for four sums.
// kRowTiles 1: rows a0 x all four gates (tile q). between() runs after each block's
// products are issued, on the vector units while the tiles work.
template <int kRowTiles, typename Between>
FUSED_LSTM_AMX_TARGET C10_ALWAYS_INLINE void amx_sums(int64_t kblocks, const c10::BFloat16* a0,
                                                     const c10::BFloat16* a1, int64_t lda_bytes,
                                                     const c10::BFloat16* b, int q0,
                                                     const Between& between) {
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const c10::BFloat16* w = b + kb * 4 * kAmxTile;
    if constexpr (kRowTiles == 2) {
      _tile_loadd(4, a0 + kb * kAmxK, lda_bytes);
      _tile_loadd(5, a1 + kb * kAmxK, lda_bytes);
      _tile_loadd(6, w + q0 * kAmxTile, 64);
      _tile_loadd(7, w + (q0 + 1) * kAmxTile, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    } else {
      _tile_loadd(4, a0 + kb * kAmxK, lda_bytes);
      _tile_loadd(5, w, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_loadd(6, w + kAmxTile, 64);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(7, w + 2 * kAmxTile, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_loadd(5, w + 3 * kAmxTile, 64);
      _tile_dpbf16ps(3, 4, 5);
    }
    between();
  }
}

// `rows` rows of K (lda apart; rows <= 2 * 16) as A tiles: in place
// where whole (32 rows, K a multiple of 32), else copied into pad [32][Kp] with zeros past
// K and past the rows (tile rows never read past a's end, and zeros, unlike whatever lies
// there, times anything is 0). row_of(i) gives row i's start. Returns the rows' start and
// their stride in bytes.
template <typename RowOf>
C10_ALWAYS_INLINE std::pair<const c10::BFloat16*, int64_t> amx_rows(
    int64_t rows, int64_t K, int64_t lda, const RowOf& row_of,
    std::vector<c10::BFloat16>& pad) {
  const int64_t kp = (K + kAmxK - 1) / kAmxK * kAmxK;
  if (rows == 2 * kAmxRows && K % kAmxK == 0) {
    return {row_of(0), lda * int64_t(sizeof(c10::BFloat16))};
  }
  pad.resize(2 * kAmxRows * kp);
  for (int64_t i = 0; i < 2 * kAmxRows; ++i) {
    c10::BFloat16* dst = pad.data() + i * kp;
    const int64_t n = i < rows ? K : 0;
    if (n > 0) std::memcpy(dst, row_of(i), n * sizeof(c10::BFloat16));
    std::memset(static_cast<void*>(dst + n), 0, (kp - n) * sizeof(c10::BFloat16));
  }
  return {pad.data(), kp * int64_t(sizeof(c10::BFloat16))};
}

// Bf16PackedKernels::amx.pack_weights: w [4H, K] to out[j][kb][q][p][u][e] = w[q * H +
// j * 16 + u][kb * 32 + 2 p + e], 0 past unit H and past K: each chunk and gate's words
// (pack_bf16_words), each block's [16 units, 16 pairs] transposed into place.
void pack_weights_amx(const c10::BFloat16* w, int64_t H, int64_t K, c10::BFloat16* out) {
  constexpr int64_t W = kAmxRows, kPairs = kAmxK / 2;
  const int64_t kblocks = (K + kAmxK - 1) / kAmxK;
  float* out_words = reinterpret_cast<float*>(out);
  pack_bf16_words(w, H, K, kblocks * kPairs, [&](int64_t j, int64_t q, const float* words) {
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      transpose(words + kb * kPairs, W, kPairs, kblocks * kPairs,
                out_words + ((j * kblocks + kb) * 4 + q) * (kAmxTile / 2), W);
    }
  });
}

// Bf16PackedKernels::amx.input_gemm: tiles of 32 rows x one chunk's gates (two gates a
// pass), a task a chunk over a run of row pairs. Sums start from the bias (or, accumulate,
// from gates) and go to gates straight from the tiles where whole; a tile cut by M or H
// goes through `sums`. `stream` is not used: a tile store is an ordinary store.
FUSED_LSTM_AMX_TARGET void input_gemm_amx(int64_t M, int64_t H, int64_t K,
                                          const c10::BFloat16* a, const c10::BFloat16* w_packed,
                                          const float* bias, bool accumulate, float* gates,
                                          bool /*stream*/) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = kAmxRows, kPairRows = 2 * kAmxRows;
  const int64_t G = 4 * H, chunks = (H + W - 1) / W, kblocks = (K + kAmxK - 1) / kAmxK;
  const int64_t row_pairs = (M + kPairRows - 1) / kPairRows;
  // 16 rows of the bias (or zeros), where the sums start; one tile's reach past the last.
  std::vector<float> bias_rows(kAmxRows * G + W, 0.f);
  for (int64_t i = 0; bias != nullptr && i < kAmxRows; ++i) {
    std::copy_n(bias, G, bias_rows.data() + i * G);
  }
  // As input_gemm_bf16: runs of up to 16 row pairs, the runs of equal size.
  const int64_t runs = std::max<int64_t>(1, (row_pairs + 15) / 16);
  const int64_t pairs_per_run = std::max<int64_t>(1, (row_pairs + runs - 1) / runs);
  at::parallel_for(0, chunks * runs, 1, [&](int64_t t0, int64_t t1) {
    std::vector<c10::BFloat16> pad;
    alignas(64) float sums[4][kPairRows][W];
    amx_start();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t % chunks, run = t / chunks;
      const int64_t u = j * W, n = std::min(W, H - u);
      const c10::BFloat16* w_chunk = w_packed + j * kblocks * 4 * kAmxTile;
      const int64_t p_end = std::min(row_pairs, (run + 1) * pairs_per_run);
      for (int64_t pr = run * pairs_per_run; pr < p_end; ++pr) {
        const int64_t r = pr * kPairRows, rows = std::min(kPairRows, M - r);
        const auto [a0, lda_bytes] =
            amx_rows(rows, K, K, [&](int64_t i) { return a + (r + i) * K; }, pad);
        const c10::BFloat16* a1 =
            reinterpret_cast<const c10::BFloat16*>(reinterpret_cast<const char*>(a0) +
                                                   kAmxRows * lda_bytes);
        const bool whole = rows == kPairRows && n == W;
        for (int q0 = 0; q0 < 4; q0 += 2) {
          float* c0 = gates + r * G + q0 * H + u;  // tile 0's place; 1: + H, 2: + 16 rows
          if (accumulate && whole) {
            _tile_loadd(0, c0, G * 4);
            _tile_loadd(1, c0 + H, G * 4);
            _tile_loadd(2, c0 + kAmxRows * G, G * 4);
            _tile_loadd(3, c0 + kAmxRows * G + H, G * 4);
          } else if (accumulate) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            const float* b0 = bias_rows.data() + q0 * H + u;
            _tile_loadd(0, b0, G * 4);
            _tile_loadd(1, b0 + H, G * 4);
            _tile_loadd(2, b0, G * 4);
            _tile_loadd(3, b0 + H, G * 4);
          }
          amx_sums<2>(kblocks, a0, a1, lda_bytes, w_chunk, q0, [] {});
          if (whole) {
            _tile_stored(0, c0, G * 4);
            _tile_stored(1, c0 + H, G * 4);
            _tile_stored(2, c0 + kAmxRows * G, G * 4);
            _tile_stored(3, c0 + kAmxRows * G + H, G * 4);
            continue;
          }
          _tile_stored(0, &sums[q0][0][0], 64);
          _tile_stored(1, &sums[q0 + 1][0][0], 64);
          _tile_stored(2, &sums[q0][kAmxRows][0], 64);
          _tile_stored(3, &sums[q0 + 1][kAmxRows][0], 64);
          for (int64_t i = 0; i < rows; ++i) {
            for (int q = q0; q < q0 + 2; ++q) {
              float* out = gates + (r + i) * G + q * H + u;
              Vec v = Vec::loadu(&sums[q][i][0]);
              if (accumulate) v = v + load(Vec{}, out, n);
              store(v, out, n);
            }
          }
        }
      }
    }
    amx_done();
  });
}

// Bf16PackedKernels::amx.pack_columns: b [K, N] (row-major) in panels of 64 columns, a
// panel's four 16-column tiles by blocks of 32 k: out[p][kb][c][i][w][e] = b[kb * 32 + 2 i
// + e][p * 64 + c * 16 + w], 0 past N and past K (amx_sums' [kblocks][4][tile], the
// panel's tiles for its 4 gates). Panels split between threads.
void pack_columns_amx(const c10::BFloat16* b, int64_t K, int64_t N, c10::BFloat16* out) {
  const int64_t panels = (N + kBf16PanelColumns - 1) / kBf16PanelColumns;
  const int64_t kblocks = (K + kAmxK - 1) / kAmxK;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      c10::BFloat16* dst = out + p * kblocks * 4 * kAmxTile;
      for (int64_t kb = 0; kb < kblocks; ++kb) {
        for (int64_t c = 0; c < 4; ++c) {
          c10::BFloat16* tile = dst + (kb * 4 + c) * kAmxTile;
          for (int64_t i = 0; i < kAmxK / 2; ++i) {
            for (int64_t e = 0; e < 2; ++e) {
              const int64_t k = kb * kAmxK + 2 * i + e, col = p * kBf16PanelColumns + c * 16;
              for (int64_t w = 0; w < 16; ++w) {
                tile[(i * 16 + w) * 2 + e] =
                    k < K && col + w < N ? b[k * N + col + w] : c10::BFloat16(0.f);
              }
            }
          }
        }
      }
    }
  });
}

// Bf16PackedKernels::amx.gemm_columns: C[M, n0:n1) = A[M, K] B[K, n0:n1), B packed by
// pack_columns_amx, float32 sums; tiles of 32 rows x 32 columns (two of a panel's tiles),
// stored to C where whole, else through `sums`. n0 a multiple of 64; on the calling thread.
FUSED_LSTM_AMX_TARGET void gemm_columns_amx(int64_t M, int64_t n0, int64_t n1, int64_t K,
                                            const c10::BFloat16* A, int64_t lda,
                                            const c10::BFloat16* b_packed, float* C,
                                            int64_t ldc) {
  using Vec = Vectorized<float>;
  constexpr int64_t kPairRows = 2 * kAmxRows;
  if (M <= 0 || n0 >= n1) return;
  const int64_t kblocks = (K + kAmxK - 1) / kAmxK;
  thread_local std::vector<c10::BFloat16> pad;
  alignas(64) float sums[2][kPairRows][16];
  amx_start();
  for (int64_t r = 0; r < M; r += kPairRows) {
    const int64_t rows = std::min(kPairRows, M - r);
    const auto [a0, lda_bytes] =
        amx_rows(rows, K, lda, [&](int64_t i) { return A + (r + i) * lda; }, pad);
    const c10::BFloat16* a1 = reinterpret_cast<const c10::BFloat16*>(
        reinterpret_cast<const char*>(a0) + kAmxRows * lda_bytes);
    for (int64_t col = n0; col < n1; col += 32) {
      const int64_t p = col / kBf16PanelColumns, q0 = (col % kBf16PanelColumns) / 16;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      amx_sums<2>(kblocks, a0, a1, lda_bytes, b_packed + p * kblocks * 4 * kAmxTile, int(q0),
                  [] {});
      float* c = C + r * ldc + col;
      if (rows == kPairRows && col + 32 <= n1) {
        _tile_stored(0, c, ldc * 4);
        _tile_stored(1, c + 16, ldc * 4);
        _tile_stored(2, c + kAmxRows * ldc, ldc * 4);
        _tile_stored(3, c + kAmxRows * ldc + 16, ldc * 4);
        continue;
      }
      _tile_stored(0, &sums[0][0][0], 64);
      _tile_stored(1, &sums[1][0][0], 64);
      _tile_stored(2, &sums[0][kAmxRows][0], 64);
      _tile_stored(3, &sums[1][kAmxRows][0], 64);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t h = 0; h < 2; ++h) {
          const int64_t n = std::min<int64_t>(16, n1 - col - 16 * h);
          if (n > 0) store(Vec::loadu(&sums[h][i][0]), c + i * ldc + 16 * h, n);
        }
      }
    }
  }
  amx_done();
}

// Bf16PackedKernels::amx.fused_step: h_prev's rows copied into `pad` as A tiles (zeros
// past H and past b), then per chunk and pair of row tiles (a block) the sums of gates i,
// f, then g, o into `sums`, and each row's cell update (fused_tile_row_update) on sums +
// the input part in gates. A block's cell update runs a few rows at a time between the
// next block's k blocks, on the vector units while the tiles work: after all of a
// block's products it cost as long as they did.
FUSED_LSTM_AMX_TARGET void fused_step_amx(int64_t b, int64_t H, const c10::BFloat16* a_main,
                                          int64_t split, const c10::BFloat16* a_rest,
                                          const c10::BFloat16* w_packed, float* gates,
                                          bool store_gates, float* c_state, float* cells,
                                          float* h_out, c10::BFloat16* h_round, int64_t j0,
                                          int64_t j1) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = kAmxRows, kPairRows = 2 * kAmxRows;
  if (b <= 0 || j0 >= j1) return;
  const int64_t kblocks = (H + kAmxK - 1) / kAmxK, kp = kblocks * kAmxK;
  const int64_t row_tiles = (b + kAmxRows - 1) / kAmxRows;
  // [row_tiles rounded up to pairs][kp]: the A tiles of this step's rows.
  thread_local std::vector<c10::BFloat16> pad;
  pad.resize((row_tiles + 1) / 2 * kPairRows * kp);
  for (int64_t i = 0; i < (row_tiles + 1) / 2 * kPairRows; ++i) {
    c10::BFloat16* dst = pad.data() + i * kp;
    const int64_t n = i < b ? H : 0;
    if (n > 0) std::memcpy(dst, i < split ? a_main + i * H : a_rest + (i - split) * H, n * 2);
    std::memset(static_cast<void*>(dst + n), 0, (kp - n) * sizeof(c10::BFloat16));
  }
  // Two blocks' sums: the one whose rows are being updated, the one the tiles fill.
  alignas(64) float sums[2][4][kPairRows][W];
  struct Block {
    int64_t r, r_end, u, n;  // its next row to update, its rows' end, its units
    const float (*sums)[kPairRows][W];
    int64_t r0;  // sums' row 0
  } pending{0, 0, 0, 0, nullptr, 0};
  const auto update_rows = [&](int64_t count) FUSED_LSTM_INLINE_LAMBDA {
    for (; count > 0 && pending.r < pending.r_end; --count, ++pending.r) {
      const int64_t r = pending.r, u = pending.u, n = pending.n;
      Vec gate[4];
      for (int q = 0; q < 4; ++q) {
        gate[q] = Vec::loadu(&pending.sums[q][r - pending.r0][0]) +
                  load(Vec{}, gates + r * 4 * H + q * H + u, n);
      }
      const Vec h = fused_tile_row_update(H, gate, gates, store_gates, c_state, cells, h_out, r,
                                          u, n);
      _mm256_mask_storeu_epi16(h_round + r * H + u, static_cast<__mmask16>((1u << n) - 1),
                               (__m256i)_mm512_cvtneps_pbh(h));
    }
  };
  int parity = 0;
  amx_start();
  // Blocks row pair by row pair, each over the chunks: the pair's A tiles (32 rows of H)
  // stay in L1 while the chunks' weights stream from L2 (chunk by chunk, each pair's
  // tiles came from L2 too).
  for (int64_t t = 0; t < row_tiles; t += 2) {
    const c10::BFloat16* a0 = pad.data() + t * kAmxRows * kp;
    const int64_t r0 = t * kAmxRows, r1 = std::min(b, r0 + kPairRows);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t u = j * W, n = std::min(W, H - u);
      const c10::BFloat16* w_chunk = w_packed + j * kblocks * 4 * kAmxTile;
      const bool two = row_tiles - t >= 2;
      const int64_t slots = (two ? 2 : 1) * kblocks;  // between() calls
      const int64_t per_slot = (pending.r_end - pending.r + slots - 1) / slots;
      // This block's input gates and c (5 lines a row), read by its cell update during
      // the next block: to cache a few lines a slot (the gates, [N, 4H] over all steps,
      // lie in memory; all at once, the prefetches waited on each other).
      const int64_t lines = (r1 - r0) * 5, lines_per_slot = (lines + slots - 1) / slots;
      int64_t line = 0;
      const auto between = [&] {
        update_rows(per_slot);
        for (const int64_t end = std::min(lines, line + lines_per_slot); line < end; ++line) {
          const int64_t r = r0 + line / 5, q = line % 5;
          __builtin_prefetch(q < 4 ? gates + r * 4 * H + q * H + u : c_state + r * H + u);
        }
      };
      float(*s)[kPairRows][W] = sums[parity];
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      if (two) {
        amx_sums<2>(kblocks, a0, a0 + kAmxRows * kp, kp * 2, w_chunk, 0, between);
        _tile_stored(0, &s[0][0][0], 64);
        _tile_stored(1, &s[1][0][0], 64);
        _tile_stored(2, &s[0][kAmxRows][0], 64);
        _tile_stored(3, &s[1][kAmxRows][0], 64);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        amx_sums<2>(kblocks, a0, a0 + kAmxRows * kp, kp * 2, w_chunk, 2, between);
        _tile_stored(0, &s[2][0][0], 64);
        _tile_stored(1, &s[3][0][0], 64);
        _tile_stored(2, &s[2][kAmxRows][0], 64);
        _tile_stored(3, &s[3][kAmxRows][0], 64);
      } else {
        amx_sums<1>(kblocks, a0, nullptr, kp * 2, w_chunk, 0, between);
        _tile_stored(0, &s[0][0][0], 64);
        _tile_stored(1, &s[1][0][0], 64);
        _tile_stored(2, &s[2][0][0], 64);
        _tile_stored(3, &s[3][0][0], 64);
      }
      update_rows(kPairRows);  // the previous block's rows left, if any
      pending = {r0, r1, u, n, s, r0};
      parity ^= 1;
    }
  }
  update_rows(kPairRows);
  amx_done();
}
#endif

// Whether this CPU runs fused_step_bf16 (AVX512_BF16). FUSED_LSTM_CPU_AVX512_BF16=off at
// start runs what an AVX-512 CPU without it runs (Intel Skylake to Ice Lake), so that an
// AVX512_BF16 machine can test those paths (.ci/run).
bool cpu_has_bf16_dot() {
  static const bool has = [] {
    const char* env = std::getenv("FUSED_LSTM_CPU_AVX512_BF16");
    return __builtin_cpu_supports("avx512bf16") && !(env && std::strcmp(env, "off") == 0);
  }();
  return has;
}

#if defined(FUSED_LSTM_AMX_BUILD)
// Whether this CPU runs the AMX kernels: AMX-BF16 and AMX-TILE (cpuid), AVX512_BF16 in
// use, and the tile state granted by Linux, which hands it out only on request
// (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, Linux 5.16+).
// FUSED_LSTM_CPU_AMX=off at start runs the vdpbf16ps kernels instead (.ci/run).
bool cpu_has_amx() {
  static const bool has = [] {
    const char* env = std::getenv("FUSED_LSTM_CPU_AMX");
    if ((env && std::strcmp(env, "off") == 0) || !cpu_has_bf16_dot()) return false;
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
    if (((edx >> 22) & 1) == 0 || ((edx >> 24) & 1) == 0) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return has;
}
#endif  // FUSED_LSTM_AMX_BUILD
#endif  // CPU_CAPABILITY_AVX512

template <typename half_t>
StoredKernels<float, half_t> stored_kernels() {
  return {&small_gemm_trans_b<float, half_t>, &small_gemm_16bit<half_t>,
          &backward_rows<float, half_t>};
}

}  // namespace

template <typename scalar_t>
CpuKernels<scalar_t> cpu_kernels() {
  CpuKernels<scalar_t> kernels{&forward_step<scalar_t>, &backward_step<scalar_t>,
          kVectorized<scalar_t> ? &small_gemm<scalar_t> : nullptr,
          kVectorized<scalar_t> ? &small_gemm_trans_a<scalar_t> : nullptr,
          kVectorized<scalar_t> ? &small_gemm_trans_b<scalar_t> : nullptr,
          kVectorized<scalar_t> ? &fused_step<scalar_t> : nullptr,
          kVectorized<scalar_t> ? int64_t(Vectorized<scalar_t>::size()) : 0,
          kVectorized<scalar_t> ? &pack_fused_weights<scalar_t> : nullptr,
          &transpose<scalar_t>,
          &backward_rows<scalar_t>,
          kVectorized<scalar_t> ? &gemm_columns<scalar_t> : nullptr,
          kVectorized<scalar_t> ? &gemm_columns_trans_a<scalar_t> : nullptr,
          kVectorized<scalar_t> ? int64_t(Vectorized<scalar_t>::size()) *
                                      (sizeof(Vectorized<scalar_t>) >= 64 ? 4 : 2)
                                : 0};
  if constexpr (std::is_same_v<scalar_t, float>) {
    // Every build: the one-step GEMMs that widen each 16-bit load (bfloat16's dot products
    // replaced by vdpbf16ps with AVX512_BF16, below), the cell backward on 16-bit storage.
    kernels.bf16 = stored_kernels<c10::BFloat16>();
    kernels.f16 = stored_kernels<c10::Half>();
  }
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (cpu_has_bf16_dot()) {
      kernels.bf16_dot = {&pack_fused_weights_bf16, 2,           &input_gemm_bf16,
                          &fused_step_bf16,        &pack_column_pairs_bf16, &gemm_columns_bf16};
      kernels.bf16.small_gemm_trans_b = &small_gemm_trans_b_bf16;
    }
#if defined(FUSED_LSTM_AMX_BUILD)
    if (cpu_has_amx()) {
      kernels.bf16_amx = {&pack_weights_amx, kAmxK,           &input_gemm_amx,
                          &fused_step_amx,   &pack_columns_amx, &gemm_columns_amx};
    }
#endif
  }
#endif
  return kernels;
}

template CpuKernels<float> cpu_kernels<float>();
template CpuKernels<double> cpu_kernels<double>();
template CpuKernels<at::Half> cpu_kernels<at::Half>();
template CpuKernels<at::BFloat16> cpu_kernels<at::BFloat16>();

}  // namespace fused_lstm::cpu::FUSED_LSTM_CAPABILITY_NS
