// The CPU's fused time loops: how their work is shared between threads for the whole
// loop (one parallel region, a barrier where threads own hidden units), and the
// weight gradients computed beside a one-thread backward loop.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <vector>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "core/weight_gradients.h"
#include "cpu/kernels/kernels.h"
#include "cpu/tuning.h"
#include "lstm.h"

namespace fused_lstm::cpu {

// Whether every task of a parallel_for runs concurrently (run_fused_loop's barrier).
constexpr bool kPersistentRegion = AT_PARALLEL_OPENMP;

// A count that only grows, and waits for it to reach a target (the fused loops'
// barriers). A wait spins while it is short (threads on cores of their own finish a
// step within microseconds of each other), then sleeps on a condition variable. Threads
// may outnumber cores: a container's CPU quota below the cores torch sees, several
// processes each using every core (CPU DDP), set_num_threads above the core count. A
// spinning thread then holds the core that the thread it waits for needs: spinning then
// yielding made a loop 30-100x slower there (PERF_LOG.md row 72).
class Progress {
 public:
  explicit Progress(int64_t spin_us) : spin_(spin_us) {}

  void add(int64_t k) {
    count_.fetch_add(k, std::memory_order_seq_cst);
    // Seen by a waiter that reads the count after announcing itself, or it sees this add.
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { const std::lock_guard<std::mutex> lock(mutex_); }
      woken_.notify_all();
    }
  }

  void wait_for(int64_t target) {
    const auto start = std::chrono::steady_clock::now();
    for (int spins = 1; count_.load(std::memory_order_acquire) < target; ++spins) {
      if (spins % 64 == 0 && std::chrono::steady_clock::now() - start > spin_) {
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        {
          std::unique_lock<std::mutex> lock(mutex_);
          woken_.wait(lock, [&] { return count_.load(std::memory_order_seq_cst) >= target; });
        }
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
        return;
      }
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#endif
    }
  }

 private:
  const std::chrono::microseconds spin_;
  std::atomic<int64_t> count_{0};
  std::atomic<int> sleepers_{0};
  std::mutex mutex_;
  std::condition_variable woken_;
};

// Whether a fused loop's step, B * 4H * H multiply-adds, is too little work to share
// between threads: run_fused_loop then runs it on the calling thread.
inline bool fused_step_too_small_to_share(int64_t B, int64_t H) {
  return B * 4 * H * H <= cpu_tuning().fused_step_max_macs_one_thread;
}

// Runs a fused time loop (B rows, H hidden units in chunks of `width`), its work
// shared between threads for the whole loop: one parallel region, no fork/join per
// step. body(r0, r1, j0, j1, sync) runs rows [r0, r1) and chunks [j0, j1) of every step
// (a step's rows past its batch excepted) and calls sync(n) after step n.
//  - A row depends only on its own past. So where each thread gets enough rows and
//    every thread can keep all of W_hh (`weight_bytes`) in its core's L2 (tuning.h),
//    threads own blocks of rows, balanced by the rows' lengths, and sync does nothing:
//    no barrier, no h crossing between cores.
//  - Else threads own unit chunks, each reading only its part of W_hh per step, and
//    sync(n) is a barrier (Progress): each step reads every unit of the step before. That
//    needs every task to run concurrently: true of ATen's OpenMP backend (one task per
//    team thread), not promised by its native pool, which gets the calling thread instead.
//  - A step too small to share (fused_step_too_small_to_share): the calling thread.
// Rows split from min_rows_per_thread rows a thread (-1: tuning.h's row_split_min_rows).
template <typename Body>
void run_fused_loop(const std::vector<Step>& steps, int64_t B, int64_t H, int64_t width,
                    int64_t weight_bytes, const Body& body, int64_t min_rows_per_thread = -1) {
  const CpuTuning& tuning = cpu_tuning();
  if (min_rows_per_thread < 0) min_rows_per_thread = tuning.row_split_min_rows;
  const int64_t chunks = (H + width - 1) / width;
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || fused_step_too_small_to_share(B, H)) {
    body(0, B, 0, chunks, [](size_t) {});
    return;
  }
  if (B >= min_rows_per_thread * threads &&
      weight_bytes <= tuning.row_split_max_weight_bytes) {
    // Row r runs at the steps whose batch exceeds r; blocks of equal total steps.
    std::vector<int64_t> work_before(B + 1, 0);  // steps run by rows [0, r)
    for (int64_t r = 0; r < B; ++r) {
      int64_t length = 0;
      for (const Step& step : steps) length += step.batch > r ? 1 : 0;
      work_before[r + 1] = work_before[r] + length;
    }
    std::vector<int64_t> bounds(threads + 1, B);
    bounds[0] = 0;
    for (int64_t t = 1; t < threads; ++t) {
      const int64_t target = work_before[B] * t / threads;
      bounds[t] = std::max(bounds[t - 1],
                           std::lower_bound(work_before.begin(), work_before.end(), target) -
                               work_before.begin());
    }
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (bounds[t] < bounds[t + 1]) body(bounds[t], bounds[t + 1], 0, chunks, [](size_t) {});
      }
    });
    return;
  }
  if (!kPersistentRegion) {
    body(0, B, 0, chunks, [](size_t) {});
    return;
  }
  Progress chunks_done(tuning.barrier_spin_us);
  at::parallel_for(0, chunks, 1, [&](int64_t j0, int64_t j1) {
    body(0, B, j0, j1, [&, mine = j1 - j0](size_t n) {
      // Every chunk belongs to exactly one of the concurrently running OpenMP
      // threads, so the count reaches (n + 1) * chunks once all finished step n.
      chunks_done.add(mine);
      chunks_done.wait_for(static_cast<int64_t>(n + 1) * chunks);
    });
  });
}

// The packed bfloat16 kernels for a loop or GEMMs of `rows` rows: AMX's tiles from
// tuning.h's amx_min_rows where the CPU has them, else vdpbf16ps.
// (Non-null only for float.)
template <typename scalar_t>
const Bf16PackedKernels<scalar_t>& bf16_packed_kernels(int64_t rows) {
  const CpuKernels<scalar_t>& k = cpu_kernels<scalar_t>();
  return k.bf16_amx.fused_step != nullptr && rows >= cpu_tuning().amx_min_rows ? k.bf16_amx
                                                                                 : k.bf16_dot;
}

// run_fused_loop's weight_bytes and min_rows_per_thread for a loop on `kernels` with
// weights of w_bytes: on AMX threads split rows only where each gets
// amx_row_split_min_rows (whole tiles) and the weights fit in half of L2, the tiles' rows
// streaming beside them (B64 H512, W_hh 2 MB, L2 2 MB: the unit split 1.08x faster; B32
// H256: the row split 1.18x).
template <typename scalar_t>
std::pair<int64_t, int64_t> bf16_loop_split(const Bf16PackedKernels<scalar_t>& kernels,
                                            int64_t w_bytes) {
  const bool amx = &kernels == &cpu_kernels<scalar_t>().bf16_amx;
  return amx ? std::pair<int64_t, int64_t>{2 * w_bytes, cpu_tuning().amx_row_split_min_rows}
             : std::pair<int64_t, int64_t>{w_bytes, -1};
}

// The same gradients from steps [first, last) of the schedule alone (no projection),
// added into grad_w_ih and grad_w_hh if accumulate: the weight gradients of a part of
// the sequence, which the CPU backward computes while its time loop goes on. Those
// steps' rows are contiguous; h_prev is gathered for them.
template <typename scalar_t, typename Gemm, typename CopyRows>
void weight_gradients_of_steps(const LayerSizes& s, const Step* first, const Step* last,
                               bool accumulate, const WeightGradientArgs<scalar_t>& a,
                               const Gemm& gemm, const CopyRows& copy_rows) {
  const int64_t I = s.I, P = s.P, G = 4 * s.H;
  int64_t row0 = s.N, row1 = 0;
  for (const Step* step = first; step != last; ++step) {
    row0 = std::min(row0, step->offset);
    row1 = std::max(row1, step->offset + step->batch);
  }
  const int64_t rows = std::max<int64_t>(row1 - row0, 0);
  const scalar_t* dgates = a.dgates + row0 * G;
  if (a.grad_input != nullptr) {
    gemm(false, false, rows, I, G, dgates, G, a.w_ih, I, 0, a.grad_input + row0 * I, I);
  }
  gemm(true, false, G, I, rows, dgates, G, a.input + row0 * I, I, accumulate ? 1 : 0,
       a.grad_w_ih, I);
  gather_prev_state(first, last, a.output, a.h0, P, a.h_prev, copy_rows);
  gemm(true, false, G, P, rows, dgates, G, a.h_prev + row0 * P, P, accumulate ? 1 : 0,
       a.grad_w_hh, P);
}

// Whether the fused backward loop runs on one thread (fused_step_too_small_to_share)
// while another is free and there are steps enough to share the weight gradients with
// it (weight_gradients_beside_loop).
inline bool weight_gradients_beside_loop_pays(int64_t B, int64_t H, int64_t T) {
  return kPersistentRegion && at::get_num_threads() >= 2 && !at::in_parallel_region() &&
         B > 0 && fused_step_too_small_to_share(B, H) && T >= cpu_tuning().beside_loop_min_steps;
}

// The fused backward loop on this thread, `loop(r0, r1, j0, j1, sync)` as run_fused_loop
// calls it, and on a second thread the weight gradients (weight_gradients_of_steps) of
// the steps it has finished, in 8 chunks of steps, while it goes on. Once done, the
// loop's thread takes chunks too while 2 or more are left, into a dW buffer of its own
// added at the end: otherwise the second core would wait through the loop.
template <typename scalar_t, typename Loop, typename Gemm, typename CopyRows>
void weight_gradients_beside_loop(const LayerSizes& s, const std::vector<Step>& steps,
                                  int64_t unit_chunks, const WeightGradientArgs<scalar_t>& args,
                                  const Loop& loop, const Gemm& gemm, const CopyRows& copy_rows) {
  const int64_t num_steps = static_cast<int64_t>(steps.size());
  const int64_t chunk_steps = (num_steps + 7) / 8;
  const int64_t chunks = (num_steps + chunk_steps - 1) / chunk_steps;
  Progress steps_done(cpu_tuning().barrier_spin_us);  // steps the loop has finished
  std::atomic<int64_t> next_chunk{0};
  at::Tensor own_w_ih, own_w_hh;  // the loop's thread's dW_ih [4H, I], dW_hh [4H, P]
  bool used[2] = {false, false};  // by task: wrote its dW
  at::parallel_for(0, 2, 1, [&](int64_t task0, int64_t task1) {
    for (int64_t task = task0; task < task1; ++task) {
      WeightGradientArgs<scalar_t> a = args;
      if (task == 0) {
        loop(0, s.B, 0, unit_chunks,
             [&](size_t) { steps_done.add(1); });
        // Chunks for this thread only while task 1 runs on another (not after it, here).
        if (task1 != 1 || chunks - next_chunk.load() < 2) continue;
        const auto dtype = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
        own_w_ih = at::empty({4 * s.H, s.I}, dtype);
        own_w_hh = at::empty({4 * s.H, s.P}, dtype);
        a.grad_w_ih = own_w_ih.data_ptr<scalar_t>();
        a.grad_w_hh = own_w_hh.data_ptr<scalar_t>();
      }
      for (int64_t c = next_chunk.fetch_add(1); c < chunks; c = next_chunk.fetch_add(1)) {
        // The loop's steps [begin, end) are the schedule's [num_steps - end, num_steps - begin).
        const int64_t begin = c * chunk_steps, end = std::min(num_steps, begin + chunk_steps);
        steps_done.wait_for(end);
        weight_gradients_of_steps(s, steps.data() + (num_steps - end),
                                  steps.data() + (num_steps - begin), used[task], a, gemm,
                                  copy_rows);
        used[task] = true;
        if (task == 0 && chunks - next_chunk.load() < 2) break;
      }
    }
  });
  // Task 0 leaves at least the last chunk to task 1, so args' dW are written.
  if (!used[0]) return;
  at::from_blob(args.grad_w_ih, own_w_ih.sizes(), own_w_ih.options()).add_(own_w_ih);
  at::from_blob(args.grad_w_hh, own_w_hh.sizes(), own_w_hh.options()).add_(own_w_hh);
}

}  // namespace fused_lstm::cpu
