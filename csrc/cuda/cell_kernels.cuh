// The CUDA backend's elementwise passes, built from core/cell_math.h: one step's cell
// update forward and backward, and an add. Each runs one thread per hidden unit
// (grid-stride) on the given stream.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

#include "core/cell_math.h"

namespace fused_lstm::cuda {

constexpr int kThreads = 256;

inline int blocks_for(int64_t units) {
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

}  // namespace fused_lstm::cuda
