// The persistent recurrent kernel's partition, planner and per-phase work, in plain
// C++ shared by the CUDA kernels (cuda/persistent.cu) and their CPU emulation
// (cpu/persistent_emulation.cpp), so that the emulation runs this very code.
//
// One launch runs a layer's whole time loop (no projection). The batch is cut into
// slices of `slice` rows; each slice is one cluster of n blocks (n = 1: one block,
// "mode A"). Block `rank` owns hidden units [u0, u1) = [rank*H/n, (rank+1)*H/n) and
// the G = 4 (u1 - u0) rows of W_hh [4H, H] of their gates i, f, g, o, held in shared
// memory for all steps, so its cell update is local. Per step:
//   forward:  gates of its units = input part + h W_local^T; cell update; its slice of
//             the new h is written into every block's h buffer of the next parity
//             (all-gather through distributed shared memory); one cluster barrier.
//   backward: dgates of its units; its partial dh_prev [rows, H] = dgates_local W_local,
//             each block's columns sent to their owner (reduce-scatter); one cluster
//             barrier; each owner sums the n partials in rank order (deterministic).
// Phases are separated by barriers: a block barrier (`block`) or a cluster barrier
// (`cluster`). Inside a phase every thread's items are independent, so the emulation
// may run the threads one after another.
//
// Rows of a packed sequence: step info gives the rows active (`batch`), those carrying
// state from the step run before (`prev_batch`; the rest start from h0/c0) and those
// going on to the step run after (`next_batch`; the rest end here: h_n/c_n).
#pragma once

#include <c10/macros/Macros.h>

#include <climits>
#include <cstdint>

#include "core/cell_math.h"

#if defined(__CUDACC__)
#define FUSED_LSTM_UNROLL _Pragma("unroll")
#else
#define FUSED_LSTM_UNROLL _Pragma("GCC unroll 8")
#endif

namespace fused_lstm::persistent {

// Batch rows one thread's register tile covers in the GEMM phases.
constexpr int kRowTile = 8;
// Threads per block. Untuned: no GPU has run these kernels yet.
constexpr int kThreads = 256;
// Largest cluster: 8 is portable, 16 needs the non-portable cluster attribute (sm_90).
constexpr int kMaxCluster = 16;

// One launch's sizes. H is both the hidden size and the size of h (no projection).
struct Shape {
  int32_t H;       // hidden units
  int32_t B;       // batch rows (of the first step run)
  int32_t T;       // steps
  int32_t n;       // blocks per cluster
  int32_t slice;   // batch rows per cluster
  int32_t hu_max;  // most units a block owns: ceil(H / n)
};

inline Shape make_shape(int64_t H, int64_t B, int64_t T, int n, int slice) {
  return {static_cast<int32_t>(H), static_cast<int32_t>(B), static_cast<int32_t>(T), n, slice,
          static_cast<int32_t>((H + n - 1) / n)};
}

// Rows of the slice rounded up to the register tile: the buffers' row count.
C10_HOST_DEVICE inline int32_t tile_rows(const Shape& s) {
  return (s.slice + kRowTile - 1) / kRowTile * kRowTile;
}
C10_HOST_DEVICE inline int32_t slices(const Shape& s) { return (s.B + s.slice - 1) / s.slice; }
// First unit of block `rank`; units [unit_begin(r), unit_begin(r + 1)).
C10_HOST_DEVICE inline int32_t unit_begin(const Shape& s, int32_t rank) {
  return static_cast<int32_t>(static_cast<int64_t>(rank) * s.H / s.n);
}
// The block owning unit k: the largest r with unit_begin(r) <= k.
C10_HOST_DEVICE inline int32_t unit_owner(const Shape& s, int32_t k) {
  return static_cast<int32_t>((static_cast<int64_t>(k + 1) * s.n - 1) / s.H);
}

// One block's part: its units and its slice's rows.
struct Part {
  int32_t rank, u0, hu;  // units [u0, u0 + hu)
  int32_t row0;          // first batch row of the slice
};
C10_HOST_DEVICE inline Part make_part(const Shape& s, int32_t rank, int32_t slice_index) {
  const int32_t u0 = unit_begin(s, rank);
  return {rank, u0, unit_begin(s, rank + 1) - u0, slice_index * s.slice};
}
// Row of W_hh [4H, H] (and column of gates [N, 4H]) of local gate row jj in [0, 4 hu).
C10_HOST_DEVICE inline int64_t gate_row(const Shape& s, const Part& b, int32_t jj) {
  return static_cast<int64_t>(jj / b.hu) * s.H + b.u0 + jj % b.hu;
}
// How many of the slice's rows lie below batch row `to`: local rows [0, that).
C10_HOST_DEVICE inline int32_t local_rows(const Shape& s, const Part& b, int64_t to) {
  const int64_t r = to - b.row0;
  return static_cast<int32_t>(r < 0 ? 0 : (r > s.slice ? s.slice : r));
}

// One step, in the order the forward runs them (a device array for packed input).
struct StepInfo {
  int64_t offset;       // first row of the step in the [N, .] tensors
  int64_t prev_offset;  // of the step run before (unused at the first)
  int32_t batch;        // rows active
  int32_t prev_batch;   // rows [0, prev_batch) carry state from the step before
  int32_t next_batch;   // rows [0, next_batch) go on to the step after (0 at the last)
  int32_t pad;
};

// Step n of the forward's order: from the table, or for dense input (table null)
// computed, so that dense launches need no host-to-device copy (CUDA graph capture).
C10_HOST_DEVICE inline StepInfo step_at(const StepInfo* table, const Shape& s, bool reverse,
                                        int32_t n) {
  if (table != nullptr) return table[n];
  const int64_t t = reverse ? s.T - 1 - n : n;
  const int64_t prev_t = reverse ? t + 1 : t - 1;
  return {t * s.B, prev_t * s.B, s.B, n > 0 ? s.B : 0, n + 1 < s.T ? s.B : 0, 0};
}

// Shared memory of one block, as offsets in bytes (16-byte aligned).
struct SmemLayout {
  int64_t w;        // forward: W_local^T [H, G] scalar_t; backward: W_local [G, H]
  int64_t h;        // forward: h [2][tile_rows, H] scalar_t (double buffered)
  int64_t acc;      // forward: pre-activations [tile_rows, G]; backward: dgates, likewise
  int64_t c;        // forward: c [tile_rows, hu_max]; backward: dc, likewise
  int64_t dh;       // backward: running dh [tile_rows, hu_max]
  int64_t slots;    // backward: partials [2][n][tile_rows, hu_max] from each block
  int64_t bytes;
};

C10_HOST_DEVICE inline int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }

// acc_size: sizeof(opmath type); the math type's buffers come after the scalar ones.
C10_HOST_DEVICE inline SmemLayout smem_layout(const Shape& s, int elem_size, int acc_size,
                                              bool backward) {
  const int64_t G = 4 * static_cast<int64_t>(s.hu_max), R = tile_rows(s);
  SmemLayout l{};
  int64_t at = 0;
  const auto take = [&at](int64_t bytes) {
    const int64_t here = at;
    at = align16(at + bytes);
    return here;
  };
  l.w = take(G * s.H * elem_size);
  l.h = backward ? 0 : take(2 * R * s.H * elem_size);
  l.acc = take(R * G * acc_size);
  l.c = take(R * s.hu_max * acc_size);
  l.dh = backward ? take(R * s.hu_max * acc_size) : 0;
  l.slots = backward ? take(2 * static_cast<int64_t>(s.n) * R * s.hu_max * acc_size) : 0;
  l.bytes = at;
  return l;
}

// ---------------------------------------------------------------------------------
// Planner: the mode, cluster size and batch slice for a layer, from the device's
// properties; `why_not` says why not where the persistent kernels cannot run it.

struct DeviceLimits {
  int cc_major, cc_minor;
  int sm_count;
  int64_t smem_per_block;  // sharedMemPerBlockOptin
  int max_cluster;         // 1 without clusters (below sm_90), 8 portable, 16 non-portable
};

struct Plan {
  int n = 0;      // blocks per cluster; 0: not planned
  int slice = 0;  // batch rows per cluster
  int64_t forward_smem = 0, backward_smem = 0;
  const char* why_not = nullptr;
  bool ok() const { return n > 0; }
};

// elem_size: bytes of the storage dtype (2 or 4; float64 is not planned).
inline Plan plan(const DeviceLimits& d, int64_t H, int64_t P, int64_t B, int64_t T,
                 int elem_size, bool has_proj) {
  Plan p;
  if (has_proj || P != H) {
    p.why_not = "projections (proj_size > 0) run the per-step path";
    return p;
  }
  if (elem_size != 2 && elem_size != 4) {
    p.why_not = "float64 runs the per-step path";
    return p;
  }
  if (d.cc_major < 8) {
    p.why_not = "the persistent kernels need sm_80 or newer";
    return p;
  }
  if (B < 1 || T < 1 || H < 1 || B > INT32_MAX / 2 || T > INT32_MAX || H > 4096) {
    p.why_not = "empty input or sizes out of the persistent kernels' range";
    return p;
  }
  // Slices of 8 rows (untuned), fewer where the batch is smaller.
  const int slice = static_cast<int>(B < kRowTile ? B : kRowTile);
  const int acc_size = 4;  // float accumulation for every planned dtype
  const int max_n = d.max_cluster < kMaxCluster ? d.max_cluster : kMaxCluster;
  // The smallest cluster that holds W_hh: fewer blocks, cheaper barriers.
  for (int n = 1; n <= max_n && n <= H; n *= 2) {
    const Shape s = make_shape(H, B, T, n, slice);
    const int64_t fwd = smem_layout(s, elem_size, acc_size, false).bytes;
    const int64_t bwd = smem_layout(s, elem_size, acc_size, true).bytes;
    if (fwd <= d.smem_per_block && bwd <= d.smem_per_block) {
      p.n = n;
      p.slice = slice;
      p.forward_smem = fwd;
      p.backward_smem = bwd;
      return p;
    }
  }
  p.why_not = "W_hh does not fit the shared memory of the largest cluster this GPU allows";
  return p;
}

// ---------------------------------------------------------------------------------
// The phases. `Peer` maps a pointer into this block's shared memory to the same place
// in block `rank`'s: peer(ptr, rank). Each phase runs items tid, tid + threads, ...

// Where a forward launch reads and writes (global memory), and its steps.
template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* w_hh;  // [4H, H]
  scalar_t* gates;       // [N, 4H]: the input part (x W_ih^T + b) in, activated out
  scalar_t* output;      // [N, H]
  scalar_t* cells;       // [N, H]
  const scalar_t* h0;    // [B, H]
  const scalar_t* c0;    // [B, H]
  // [B, H] h_n, c_n out. Not h0's buffer: a row that starts and ends at one step would
  // have its h_n written by one block while another still reads its h0.
  scalar_t* h_n;
  scalar_t* c_n;
  const StepInfo* steps; // [T], or null for dense input
  Shape s;
  bool reverse;
};

// This block's shared buffers in a forward launch.
template <typename scalar_t, typename acc_t>
struct ForwardSmem {
  scalar_t* wt;   // [H, G] W_local^T
  scalar_t* h;    // [2][tile_rows, H]
  acc_t* pre;     // [tile_rows, G]
  acc_t* c;       // [tile_rows, hu_max]

  C10_HOST_DEVICE static ForwardSmem at(unsigned char* base, const SmemLayout& l) {
    return {reinterpret_cast<scalar_t*>(base + l.w), reinterpret_cast<scalar_t*>(base + l.h),
            reinterpret_cast<acc_t*>(base + l.acc), reinterpret_cast<acc_t*>(base + l.c)};
  }
};

// This block's gate rows of W_hh [4H, H] into shared memory, once per launch: W_local
// [G, H], or (transposed) W_local^T [H, G]; read along W_hh's rows (coalesced).
template <typename scalar_t>
C10_HOST_DEVICE void load_weights(const scalar_t* w_hh, const Shape& s, const Part& b,
                                  bool transposed, scalar_t* w, int tid, int threads) {
  const int64_t G = 4 * b.hu, H = s.H;
  for (int64_t e = tid; e < G * H; e += threads) {
    const int32_t jj = static_cast<int32_t>(e / H);
    const int64_t k = e - jj * H;
    w[transposed ? k * G + jj : jj * H + k] = w_hh[gate_row(s, b, jj) * H + k];
  }
}

// Step start: rows starting at this step ([prev_batch, batch)) load h0 (all H columns)
// and c0 (this block's units).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE void forward_start_rows(const ForwardArgs<scalar_t>& a, const Part& b,
                                        const ForwardSmem<scalar_t, acc_t>& m,
                                        const StepInfo& st, int parity, int tid, int threads) {
  const int32_t lo = local_rows(a.s, b, st.prev_batch), hi = local_rows(a.s, b, st.batch);
  const int64_t H = a.s.H;
  scalar_t* h = m.h + static_cast<int64_t>(parity) * tile_rows(a.s) * H;
  for (int64_t e = tid; e < (hi - lo) * H; e += threads) {
    const int64_t r = lo + e / H, k = e % H;
    h[r * H + k] = a.h0[(b.row0 + r) * H + k];
  }
  for (int64_t e = tid; e < static_cast<int64_t>(hi - lo) * b.hu; e += threads) {
    const int64_t r = lo + e / b.hu, j = e % b.hu;
    m.c[r * a.s.hu_max + j] = static_cast<acc_t>(a.c0[(b.row0 + r) * H + b.u0 + j]);
  }
}

// pre [rows, G] = gates' input part + h [rows, H] W_local^T. Items: (gate row jj, tile
// of kRowTile rows); consecutive threads take consecutive jj (W^T read conflict-free,
// h broadcast).
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE void forward_gates(const ForwardArgs<scalar_t>& a, const Part& b,
                                   const ForwardSmem<scalar_t, acc_t>& m, const StepInfo& st,
                                   int parity, int tid, int threads) {
  const int32_t rows = local_rows(a.s, b, st.batch);
  if (rows == 0) return;
  const int64_t G = 4 * b.hu, H = a.s.H;
  const int32_t tiles = (rows + kRowTile - 1) / kRowTile;
  const scalar_t* h = m.h + static_cast<int64_t>(parity) * tile_rows(a.s) * H;
  for (int64_t e = tid; e < G * tiles; e += threads) {
    const int32_t jj = static_cast<int32_t>(e % G), r0 = static_cast<int32_t>(e / G) * kRowTile;
    const int64_t col = gate_row(a.s, b, jj);
    acc_t acc[kRowTile];
    const scalar_t* h_row[kRowTile];
FUSED_LSTM_UNROLL
    for (int i = 0; i < kRowTile; ++i) {
      // Rows past the last active one repeat it: in bounds, never stored.
      const int32_t r = r0 + i < rows ? r0 + i : rows - 1;
      h_row[i] = h + r * H;
      acc[i] = static_cast<acc_t>(a.gates[(st.offset + b.row0 + r) * 4 * H + col]);
    }
    for (int64_t k = 0; k < H; ++k) {
      const acc_t w = static_cast<acc_t>(m.wt[k * G + jj]);
FUSED_LSTM_UNROLL
      for (int i = 0; i < kRowTile; ++i) acc[i] += w * static_cast<acc_t>(h_row[i][k]);
    }
FUSED_LSTM_UNROLL
    for (int i = 0; i < kRowTile; ++i) {
      if (r0 + i < rows) m.pre[(r0 + i) * G + jj] = acc[i];
    }
  }
}

// The cell update of this block's units: activated gates, c and h to global memory,
// h (rounded to scalar_t, as stored in the output) into every block's h buffer of the
// next parity; rows ending here write h_n / c_n.
template <typename scalar_t, typename acc_t, typename Peer>
C10_HOST_DEVICE void forward_cells(const ForwardArgs<scalar_t>& a, const Part& b,
                                   const ForwardSmem<scalar_t, acc_t>& m, const StepInfo& st,
                                   int parity, const Peer& peer, int tid, int threads) {
  const int32_t rows = local_rows(a.s, b, st.batch), ending = local_rows(a.s, b, st.next_batch);
  const int64_t G = 4 * b.hu, H = a.s.H, hm = a.s.hu_max;
  scalar_t* h_next = m.h + static_cast<int64_t>(parity ^ 1) * tile_rows(a.s) * H;
  for (int64_t e = tid; e < static_cast<int64_t>(rows) * b.hu; e += threads) {
    const int64_t r = e / b.hu, j = e % b.hu, row = st.offset + b.row0 + r;
    const acc_t* pre = m.pre + r * G;
    acc_t i = pre[j], f = pre[b.hu + j], g = pre[2 * b.hu + j], o = pre[3 * b.hu + j];
    acc_t c, h;
    cell_forward(i, f, g, o, m.c[r * hm + j], c, h);
    scalar_t* gate = a.gates + row * 4 * H + b.u0 + j;
    gate[0] = static_cast<scalar_t>(i);
    gate[H] = static_cast<scalar_t>(f);
    gate[2 * H] = static_cast<scalar_t>(g);
    gate[3 * H] = static_cast<scalar_t>(o);
    const scalar_t c_stored = static_cast<scalar_t>(c), h_stored = static_cast<scalar_t>(h);
    // The next step reads c and h as stored, like the per-step path.
    m.c[r * hm + j] = static_cast<acc_t>(c_stored);
    a.cells[row * H + b.u0 + j] = c_stored;
    a.output[row * H + b.u0 + j] = h_stored;
    scalar_t* h_slot = h_next + r * H + b.u0 + j;
    for (int32_t q = 0; q < a.s.n; ++q) *peer(h_slot, q) = h_stored;
    if (r >= ending) {
      a.h_n[(b.row0 + r) * H + b.u0 + j] = h_stored;
      a.c_n[(b.row0 + r) * H + b.u0 + j] = c_stored;
    }
  }
}

// The forward launch of one block: `sync.block()` and `sync.cluster()` are its barriers.
template <typename scalar_t, typename acc_t, typename Peer, typename Sync>
C10_HOST_DEVICE void forward_block(const ForwardArgs<scalar_t>& a, const Part& b,
                                   const ForwardSmem<scalar_t, acc_t>& m, const Peer& peer,
                                   Sync& sync, int tid, int threads) {
  load_weights(a.w_hh, a.s, b, true, m.wt, tid, threads);
  // Every block of the cluster has started before any writes into another's memory.
  sync.cluster();
  for (int32_t n = 0; n < a.s.T; ++n) {
    const StepInfo st = step_at(a.steps, a.s, a.reverse, n);
    const int parity = n & 1;
    forward_start_rows(a, b, m, st, parity, tid, threads);
    sync.block();
    forward_gates(a, b, m, st, parity, tid, threads);
    sync.block();
    forward_cells(a, b, m, st, parity, peer, tid, threads);
    // The next h is complete in every block; also no block exits while others write.
    sync.cluster();
  }
}

// Where a backward launch reads and writes.
template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* w_hh;         // [4H, H]
  const scalar_t* grad_output;  // [N, H]
  const scalar_t* gates;        // [N, 4H] activated (may be dgates itself)
  const scalar_t* cells;        // [N, H]
  const scalar_t* c0;           // [B, H]
  scalar_t* dgates;             // [N, 4H] out: dL/d(pre-activation)
  scalar_t* grad_h;             // [B, H]: grad_h_n in, grad_h0 out
  scalar_t* grad_c;             // [B, H]: grad_c_n in, grad_c0 out
  const StepInfo* steps;        // [T] in the forward's order, or null for dense input
  Shape s;
  bool reverse;
};

template <typename scalar_t, typename acc_t>
struct BackwardSmem {
  scalar_t* w;    // [G, H] W_local
  acc_t* dg;      // [tile_rows, G] this step's dgates, as stored
  acc_t* dc;      // [tile_rows, hu_max] running dL/dc
  acc_t* dh;      // [tile_rows, hu_max] running dL/dh
  acc_t* slots;   // [2][n][tile_rows, hu_max] partial dh_prev from each block

  C10_HOST_DEVICE static BackwardSmem at(unsigned char* base, const SmemLayout& l) {
    return {reinterpret_cast<scalar_t*>(base + l.w), reinterpret_cast<acc_t*>(base + l.acc),
            reinterpret_cast<acc_t*>(base + l.c), reinterpret_cast<acc_t*>(base + l.dh),
            reinterpret_cast<acc_t*>(base + l.slots)};
  }
};

// Rows whose backward starts at this step (they end here going forward: [next_batch,
// batch)) take dh, dc from grad_h_n, grad_c_n.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE void backward_start_rows(const BackwardArgs<scalar_t>& a, const Part& b,
                                         const BackwardSmem<scalar_t, acc_t>& m,
                                         const StepInfo& st, int tid, int threads) {
  const int32_t lo = local_rows(a.s, b, st.next_batch), hi = local_rows(a.s, b, st.batch);
  const int64_t H = a.s.H, hm = a.s.hu_max;
  for (int64_t e = tid; e < static_cast<int64_t>(hi - lo) * b.hu; e += threads) {
    const int64_t r = lo + e / b.hu, j = e % b.hu, at = (b.row0 + r) * H + b.u0 + j;
    m.dh[r * hm + j] = static_cast<acc_t>(a.grad_h[at]);
    m.dc[r * hm + j] = static_cast<acc_t>(a.grad_c[at]);
  }
}

// The cell backward of this block's units: dgates (to global memory and, as stored, to
// dg), dc_prev; rows that began from c0 here write grad_c0.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE void backward_cells(const BackwardArgs<scalar_t>& a, const Part& b,
                                    const BackwardSmem<scalar_t, acc_t>& m, const StepInfo& st,
                                    int tid, int threads) {
  const int32_t rows = local_rows(a.s, b, st.batch), carried = local_rows(a.s, b, st.prev_batch);
  const int64_t G = 4 * b.hu, H = a.s.H, hm = a.s.hu_max;
  for (int64_t e = tid; e < static_cast<int64_t>(rows) * b.hu; e += threads) {
    const int64_t r = e / b.hu, j = e % b.hu, row = st.offset + b.row0 + r;
    const int64_t unit = b.u0 + j;
    const scalar_t* gate = a.gates + row * 4 * H + unit;
    const acc_t i = gate[0], f = gate[H], g = gate[2 * H], o = gate[3 * H];
    const acc_t c_prev = r < carried ? static_cast<acc_t>(a.cells[(st.prev_offset + b.row0 + r) * H + unit])
                                     : static_cast<acc_t>(a.c0[(b.row0 + r) * H + unit]);
    const acc_t dh = m.dh[r * hm + j] + static_cast<acc_t>(a.grad_output[row * H + unit]);
    acc_t di, df, dg, do_, dc_prev;
    cell_backward(i, f, g, o, c_prev, static_cast<acc_t>(a.cells[row * H + unit]), dh,
                  m.dc[r * hm + j], di, df, dg, do_, dc_prev);
    const acc_t d[4] = {di, df, dg, do_};
    scalar_t* dgate = a.dgates + row * 4 * H + unit;
FUSED_LSTM_UNROLL
    for (int q = 0; q < 4; ++q) {
      const scalar_t stored = static_cast<scalar_t>(d[q]);
      dgate[q * H] = stored;
      m.dg[r * G + q * b.hu + j] = static_cast<acc_t>(stored);
    }
    const scalar_t dc_stored = static_cast<scalar_t>(dc_prev);
    m.dc[r * hm + j] = static_cast<acc_t>(dc_stored);
    if (r >= carried) a.grad_c[(b.row0 + r) * H + unit] = dc_stored;
  }
}

// Partial dh_prev [rows, H] = dg [rows, G] W_local [G, H]; column k goes to its owner's
// slot for this block. Items: (column k, tile of rows); consecutive threads take
// consecutive k (W read conflict-free, dg broadcast).
template <typename scalar_t, typename acc_t, typename Peer>
C10_HOST_DEVICE void backward_partials(const BackwardArgs<scalar_t>& a, const Part& b,
                                       const BackwardSmem<scalar_t, acc_t>& m,
                                       const StepInfo& st, int parity, const Peer& peer, int tid,
                                       int threads) {
  const int32_t rows = local_rows(a.s, b, st.batch);
  if (rows == 0) return;
  const int64_t G = 4 * b.hu, H = a.s.H, hm = a.s.hu_max, R = tile_rows(a.s);
  const int32_t tiles = (rows + kRowTile - 1) / kRowTile;
  acc_t* slots = m.slots + (static_cast<int64_t>(parity) * a.s.n + b.rank) * R * hm;
  for (int64_t e = tid; e < H * tiles; e += threads) {
    const int32_t k = static_cast<int32_t>(e % H), r0 = static_cast<int32_t>(e / H) * kRowTile;
    acc_t acc[kRowTile];
    const acc_t* dg_row[kRowTile];
FUSED_LSTM_UNROLL
    for (int i = 0; i < kRowTile; ++i) {
      acc[i] = 0;
      dg_row[i] = m.dg + (r0 + i < rows ? r0 + i : rows - 1) * G;
    }
    for (int64_t jj = 0; jj < G; ++jj) {
      const acc_t w = static_cast<acc_t>(m.w[jj * H + k]);
FUSED_LSTM_UNROLL
      for (int i = 0; i < kRowTile; ++i) acc[i] += dg_row[i][jj] * w;
    }
    const int32_t owner = unit_owner(a.s, k);
    acc_t* slot = peer(slots + (k - unit_begin(a.s, owner)), owner);
FUSED_LSTM_UNROLL
    for (int i = 0; i < kRowTile; ++i) {
      if (r0 + i < rows) slot[(r0 + i) * hm] = acc[i];
    }
  }
}

// dh_prev of this block's units: the n partials summed in rank order. Rows carrying
// state on keep it in dh; rows that began from h0 here write grad_h0.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE void backward_reduce(const BackwardArgs<scalar_t>& a, const Part& b,
                                     const BackwardSmem<scalar_t, acc_t>& m, const StepInfo& st,
                                     int parity, int tid, int threads) {
  const int32_t rows = local_rows(a.s, b, st.batch), carried = local_rows(a.s, b, st.prev_batch);
  const int64_t H = a.s.H, hm = a.s.hu_max, R = tile_rows(a.s);
  const acc_t* slots = m.slots + static_cast<int64_t>(parity) * a.s.n * R * hm;
  for (int64_t e = tid; e < static_cast<int64_t>(rows) * b.hu; e += threads) {
    const int64_t r = e / b.hu, j = e % b.hu;
    acc_t sum = 0;
    for (int32_t q = 0; q < a.s.n; ++q) sum += slots[(q * R + r) * hm + j];
    const scalar_t stored = static_cast<scalar_t>(sum);  // as the per-step path stores dh
    if (r < carried) {
      m.dh[r * hm + j] = static_cast<acc_t>(stored);
    } else {
      a.grad_h[(b.row0 + r) * H + b.u0 + j] = stored;
    }
  }
}

// The backward launch of one block, steps in reverse of the forward's order.
template <typename scalar_t, typename acc_t, typename Peer, typename Sync>
C10_HOST_DEVICE void backward_block(const BackwardArgs<scalar_t>& a, const Part& b,
                                    const BackwardSmem<scalar_t, acc_t>& m, const Peer& peer,
                                    Sync& sync, int tid, int threads) {
  load_weights(a.w_hh, a.s, b, false, m.w, tid, threads);
  sync.cluster();
  for (int32_t n = a.s.T - 1; n >= 0; --n) {
    const StepInfo st = step_at(a.steps, a.s, a.reverse, n);
    const int parity = n & 1;
    backward_start_rows(a, b, m, st, tid, threads);
    sync.block();
    backward_cells(a, b, m, st, tid, threads);
    sync.block();
    backward_partials(a, b, m, st, parity, peer, tid, threads);
    sync.cluster();
    backward_reduce(a, b, m, st, parity, tid, threads);
    sync.block();
  }
  // Every write into a peer's slots came before the last cluster barrier: blocks may
  // exit.
}

}  // namespace fused_lstm::persistent
