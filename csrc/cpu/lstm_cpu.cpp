// CPU kernels for the fused LSTM layer (TORCH_LIBRARY_IMPL CPU).
// Mirrors cuda/lstm_cuda.cu: input GEMM over all steps, then per step one
// recurrent GEMM into the gate buffer and one fused elementwise pass (the
// cell kernels, built per CPU capability: cell_kernels.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <thread>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../lstm.h"
#include "../weight_gradients.h"
#include "cell_kernels.h"
#include "gemm.h"
#include "tuning.h"

namespace fused_lstm::cpu {
namespace {

// Whether every task of a parallel_for runs concurrently (run_fused_loop's barrier).
constexpr bool kPersistentRegion = AT_PARALLEL_OPENMP;

// Waits for count >= target: spins, then yields (threads may outnumber cores).
inline void spin_until(const std::atomic<int64_t>& count, int64_t target) {
  for (int spins = 0; count.load(std::memory_order_acquire) < target; ++spins) {
#if defined(__x86_64__) || defined(_M_X64)
    if (spins < (1 << 14)) {
      _mm_pause();
      continue;
    }
#endif
    std::this_thread::yield();
  }
}

// Whether a fused loop's step, B * 4H * H multiply-adds, is too little work to share
// between threads: run_fused_loop then runs it on the calling thread.
bool fused_step_too_small_to_share(int64_t B, int64_t H) {
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
//    sync(n) is a spin barrier: each step reads every unit of the step before. That
//    needs every task to run concurrently: true of ATen's OpenMP backend (one task per
//    team thread), not promised by its native pool, which gets the calling thread instead.
//  - A step too small to share (fused_step_too_small_to_share): the calling thread.
template <typename Body>
void run_fused_loop(const std::vector<Step>& steps, int64_t B, int64_t H, int64_t width,
                    int64_t weight_bytes, const Body& body) {
  const CpuTuning& tuning = cpu_tuning();
  const int64_t chunks = (H + width - 1) / width;
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || fused_step_too_small_to_share(B, H)) {
    body(0, B, 0, chunks, [](size_t) {});
    return;
  }
  if (B >= tuning.row_split_min_rows * threads &&
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
  std::atomic<int64_t> chunks_done{0};
  at::parallel_for(0, chunks, 1, [&](int64_t j0, int64_t j1) {
    body(0, B, j0, j1, [&, mine = j1 - j0](size_t n) {
      // Every chunk belongs to exactly one of the concurrently running OpenMP
      // threads, so the count reaches (n + 1) * chunks once all finished step n.
      chunks_done.fetch_add(mine, std::memory_order_acq_rel);
      spin_until(chunks_done, static_cast<int64_t>(n + 1) * chunks);
    });
  });
}

template <typename scalar_t>
void copy_rows(scalar_t* dst, const scalar_t* src, int64_t rows, int64_t cols) {
  if (rows > 0) std::memcpy(dst, src, sizeof(scalar_t) * rows * cols);
}

// Whether the fused backward loop runs on one thread (fused_step_too_small_to_share)
// while another is free and there are steps enough to share the weight gradients with
// it (weight_gradients_beside_loop).
bool weight_gradients_beside_loop_pays(int64_t B, int64_t H, int64_t T) {
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
  std::atomic<int64_t> steps_done{0}, next_chunk{0};
  at::Tensor own_w_ih, own_w_hh;  // the loop's thread's dW_ih [4H, I], dW_hh [4H, P]
  bool used[2] = {false, false};  // by task: wrote its dW
  at::parallel_for(0, 2, 1, [&](int64_t task0, int64_t task1) {
    for (int64_t task = task0; task < task1; ++task) {
      WeightGradientArgs<scalar_t> a = args;
      if (task == 0) {
        loop(0, s.B, 0, unit_chunks,
             [&](size_t n) { steps_done.store(int64_t(n) + 1, std::memory_order_release); });
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
        spin_until(steps_done, end);
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

// The GEMMs inside the time loop, C[b, N] (+)= A[b, K] op(B), go through the
// register-blocked small_gemm when the batch is small and B fits in L2 (tuning.h:
// there a library call costs more in fixed overhead than in math), else through gemm().
// small_gemm wants B as row-major [K, N]: `b_kn` (may equal `b`, when not trans_b).
template <typename scalar_t>
struct StepGemm {
  bool small;
  const CellKernels<scalar_t>* kernels;

  static StepGemm make(int64_t max_batch, int64_t N, int64_t K) {
    const auto& k = cell_kernels<scalar_t>();
    const auto setting = cpu_gemm_setting();
    const CpuTuning& tuning = cpu_tuning();
    const bool fits = max_batch <= tuning.small_step_max_batch &&
                      N * K * int64_t(sizeof(scalar_t)) <= tuning.small_step_max_weight_bytes;
    const bool small = k.small_gemm != nullptr &&
                       (setting == GemmSetting::kSmall || (setting == GemmSetting::kAuto && fits));
    return {small, &k};
  }

  void operator()(int64_t M, int64_t N, int64_t K, const scalar_t* A, int64_t lda,
                  const scalar_t* B, bool trans_b, const scalar_t* b_kn, bool accumulate,
                  scalar_t* C, int64_t ldc) const {
    if (small) {
      kernels->small_gemm(M, N, K, A, lda, b_kn, N, accumulate, C, ldc);
    } else {
      gemm<scalar_t>(false, trans_b, M, N, K, A, lda, B, trans_b ? K : N, accumulate ? 1 : 0,
                     C, ldc);
    }
  }
};

// Whether the forward (without a projection) runs the fused step of cell_kernels.h
// instead of a recurrent GEMM and an elementwise pass per step: always with the
// "small" setting, never with "aten", and with "auto" wherever the step GEMM is small
// or H reaches tuning.h's fused_min_hidden.
bool use_fused_step(bool step_gemm_small, int64_t H) {
  const auto setting = cpu_gemm_setting();
  return setting == GemmSetting::kSmall ||
         (setting == GemmSetting::kAuto &&
          (step_gemm_small || H >= cpu_tuning().fused_min_hidden));
}

// Buffers that live only inside one op call (the inference gate buffer, and in
// backward the gate gradients and the stacked previous h) are reused per thread:
// a fresh buffer costs a page fault per 4 KiB on first touch (~14 ms for
// fastrnns' 52 MB gate buffer, a tenth of the call). Above kMaxReusedBytes a
// buffer is allocated afresh and not kept.
enum class Scratch { kGates, kGradGates, kPrevHidden, kCount };
constexpr int64_t kMaxReusedBytes = int64_t{256} << 20;

thread_local at::Tensor kept_scratch[static_cast<int>(Scratch::kCount)];

at::Tensor scratch_buffer(Scratch slot, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  at::Tensor& cache = kept_scratch[static_cast<int>(slot)];
  const int64_t numel = rows * cols;
  if (numel * int64_t(opts.dtype().itemsize()) > kMaxReusedBytes) {
    return at::empty({rows, cols}, opts);
  }
  if (!cache.defined() || cache.numel() < numel || cache.dtype() != opts.dtype()) {
    cache = at::Tensor();  // free the old one first
    cache = at::empty({numel}, opts);
  }
  return cache.narrow(0, 0, numel).view({rows, cols});
}

// The layer forward. With keep_workspace (training) it returns the activated gates,
// the cells and, with a projection, the hiddens for backward; without (inference)
// they live only as long as a step needs them, and come back as empty tensors.
ForwardResult layer_forward(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse, bool keep_workspace) {
  const LayerSizes s = check_forward_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  const auto [N, T, B, I, H, P, has_proj] = s;
  const auto steps = make_schedule(batch_sizes, reverse);

  const at::Tensor x = input.contiguous();
  const at::Tensor w_ih_c = w_ih.contiguous(), w_hh_c = w_hh.contiguous();
  const std::optional<at::Tensor> w_hr_c =
      has_proj ? std::optional<at::Tensor>(w_hr->contiguous()) : std::nullopt;
  const auto opts = input.options();
  at::Tensor output = at::empty({N, P}, opts);  // [N, P]
  at::Tensor h_n = h0.contiguous().clone();     // [B, P], the running h state
  at::Tensor c_n = c0.contiguous().clone();     // [B, H], the running c state
  // Training: gates [N, 4H], cells [N, H], hiddens [N, H] or [0].
  // Inference: a reused gate buffer, c written only to c_n, h before the projection
  // in a [B, H] scratch.
  at::Tensor gates = keep_workspace ? at::empty({N, 4 * H}, opts)
                                    : scratch_buffer(Scratch::kGates, N, 4 * H, opts);
  at::Tensor cells = keep_workspace ? at::empty({N, H}, opts) : at::empty({0}, opts);
  at::Tensor hiddens = !has_proj        ? at::empty({0}, opts)
                       : keep_workspace ? at::empty({N, H}, opts)
                                        : at::empty({B, H}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "lstm_layer_forward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* gate_buffer = gates.data_ptr<scalar_t>();
    scalar_t* h_state = h_n.data_ptr<scalar_t>();
    scalar_t* c_state = c_n.data_ptr<scalar_t>();
    const scalar_t* w_hh_p = w_hh_c.data_ptr<scalar_t>();

    // Input GEMM over all steps, bias folded in: gates = x W_ih^T + (b_ih + b_hh).
    opmath_t beta = 0;
    if (b_ih.has_value() && N > 0) {
      const at::Tensor b_ih_c = b_ih->contiguous(), b_hh_c = b_hh->contiguous();
      const scalar_t* b1 = b_ih_c.data_ptr<scalar_t>();
      const scalar_t* b2 = b_hh_c.data_ptr<scalar_t>();
      for (int64_t k = 0; k < 4 * H; ++k) gate_buffer[k] = b1[k] + b2[k];
      for (int64_t n = 1; n < N; ++n) copy_rows(gate_buffer + n * 4 * H, gate_buffer, 1, 4 * H);
      beta = 1;
    }
    gemm<scalar_t>(false, true, N, 4 * H, I, x.data_ptr<scalar_t>(), I,
                   w_ih_c.data_ptr<scalar_t>(), I, beta, gate_buffer, 4 * H);

    scalar_t* out_p = output.data_ptr<scalar_t>();
    // Where step t's c and pre-projection h go: per-step rows, or (inference) one place.
    scalar_t* cells_p = keep_workspace ? cells.data_ptr<scalar_t>() : c_state;
    scalar_t* hiddens_p = has_proj ? hiddens.data_ptr<scalar_t>() : nullptr;
    const int64_t cells_step = keep_workspace ? H : 0;
    const int64_t hiddens_step = keep_workspace ? H : 0;
    const auto recurrent_gemm = StepGemm<scalar_t>::make(B, 4 * H, P);
    const auto projection_gemm = StepGemm<scalar_t>::make(B, P, H);
    const auto& kernels = cell_kernels<scalar_t>();
    const auto cell_forward_step = kernels.forward;
    const bool fused =
        !has_proj && kernels.fused_step != nullptr && use_fused_step(recurrent_gemm.small, H);
    // small_gemm reads B as [K, N]: the transposed weights, made once per call.
    const at::Tensor w_hh_t =
        recurrent_gemm.small && !fused ? w_hh_c.t().contiguous() : at::Tensor();
    const at::Tensor w_hr_t =
        has_proj && projection_gemm.small ? w_hr_c->t().contiguous() : at::Tensor();
    if (fused) {
      // GEMM and cell update fused per step (cell_kernels.h). Step t
      // reads h_prev from step t-1's output rows, and rows that start later (reverse
      // direction) from h_state, which holds h0 until the loop ends.
      const int64_t width = kernels.fused_width;
      at::Tensor w_packed = at::empty({(H + width - 1) / width * width * 4 * H}, opts);
      pack_w_hh_for_fused_step(w_hh_p, H, width, kernels.fused_gate_halves,
                               w_packed.data_ptr<scalar_t>());
      const scalar_t* w_t = w_packed.data_ptr<scalar_t>();
      run_fused_loop(steps, B, H, width, w_hh_c.nbytes(),
                     [&](int64_t r0, int64_t r1, int64_t j0, int64_t j1, const auto& sync) {
        for (size_t n = 0; n < steps.size(); ++n) {
          const Step& step = steps[n];
          // Rows [row0, row1) of the step; h_prev from step n - 1's output for rows below
          // `split`, from h_state (h0 until the loop ends) for the rest.
          const int64_t row0 = std::min(r0, step.batch), row1 = std::min(r1, step.batch);
          const int64_t split = n == 0 ? 0 : step.prev_batch;
          const int64_t own_split = std::max<int64_t>(split - row0, 0);
          kernels.fused_step(row1 - row0, H, out_p + (step.prev_offset + row0) * H, own_split,
                             h_state + (row0 + own_split) * H, w_t,
                             gate_buffer + (step.offset + row0) * 4 * H, keep_workspace,
                             c_state + row0 * H, cells_p + step.offset * cells_step + row0 * H,
                             out_p + (step.offset + row0) * H, j0, j1);
          sync(n);
        }
      });
      // h_n: each row's h at its last step (rows [next batch, batch) end at a step).
      for (size_t n = 0; n < steps.size(); ++n) {
        const int64_t b = steps[n].batch, b_next = n + 1 < steps.size() ? steps[n + 1].batch : 0;
        if (b_next < b) {
          copy_rows(h_state + b_next * H, out_p + (steps[n].offset + b_next) * H, b - b_next, H);
        }
      }
      return;
    }
    for (const Step& step : steps) {
      const int64_t b = step.batch;
      scalar_t* g = gate_buffer + step.offset * 4 * H;
      // Recurrent GEMM: gates[t] += h_state[:b] W_hh^T
      recurrent_gemm(b, 4 * H, P, h_state, P, w_hh_p, true,
                     recurrent_gemm.small ? w_hh_t.data_ptr<scalar_t>() : nullptr, true, g, 4 * H);
      if (!has_proj) {
        cell_forward_step(b, H, g, c_state, cells_p + step.offset * cells_step,
                          out_p + step.offset * H, h_state);
      } else {
        scalar_t* h_t = hiddens_p + step.offset * hiddens_step;
        cell_forward_step(b, H, g, c_state, cells_p + step.offset * cells_step, h_t, nullptr);
        // Projection: r_t = h_t W_hr^T, which is both the output and the next h.
        scalar_t* r_t = out_p + step.offset * P;
        projection_gemm(b, P, H, h_t, H, w_hr_c->data_ptr<scalar_t>(), true,
                        projection_gemm.small ? w_hr_t.data_ptr<scalar_t>() : nullptr, false, r_t,
                        P);
        copy_rows(h_state, r_t, b, P);
      }
    }
  });
  if (!keep_workspace) return {output, h_n, c_n, at::empty({0}, opts), cells, at::empty({0}, opts)};
  return {output, h_n, c_n, gates, cells, hiddens};
}

}  // namespace

void release_scratch() {
  for (at::Tensor& t : kept_scratch) t = at::Tensor();
}

ForwardResult lstm_layer_forward_cpu(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  return layer_forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, true);
}

LayerResult lstm_layer_cpu(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  auto [output, h_n, c_n, gates, cells, hiddens] =
      layer_forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, false);
  return {output, h_n, c_n};
}

namespace {

// The layer backward: ops lstm_layer_backward and, kOverwriteGates,
// lstm_layer_backward_overwrite_gates. There the gate gradients go over the gates
// (each step reads its gates before it writes their gradients), else into a scratch buffer.
template <bool kOverwriteGates>
BackwardResult layer_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& w_hr, const at::Tensor& output, const at::Tensor& gates,
    const at::Tensor& cells, const at::Tensor& hiddens, bool reverse, bool need_grad_input) {
  const LayerSizes s = check_backward_args(grad_output, grad_h_n, grad_c_n, input, batch_sizes,
                                           h0, c0, w_ih, w_hh, w_hr, output, gates, cells,
                                           hiddens);
  const auto [N, T, B, I, H, P, has_proj] = s;
  const auto steps = make_schedule(batch_sizes, reverse);

  const at::Tensor x = input.contiguous(), h0_c = h0.contiguous(), c0_c = c0.contiguous();
  const at::Tensor w_ih_c = w_ih.contiguous(), w_hh_c = w_hh.contiguous();
  const at::Tensor grad_out_c = grad_output.contiguous(), output_c = output.contiguous();
  const at::Tensor gates_c = gates.contiguous(), cells_c = cells.contiguous();
  const at::Tensor hiddens_c = hiddens.contiguous();
  const auto opts = input.options();
  // [N, 4H] dL/d(pre-activation); with kOverwriteGates over gates_c (gates itself, or a
  // contiguous copy of our own).
  at::Tensor grad_gates =
      kOverwriteGates ? gates_c : scratch_buffer(Scratch::kGradGates, N, 4 * H, opts);
  at::Tensor grad_h = grad_h_n.contiguous().clone();    // [B, P] running dL/dh
  at::Tensor grad_c = grad_c_n.contiguous().clone();    // [B, H] running dL/dc
  // [N, P] the h each step began from, gathered only when the batch varies or the
  // weight gradients go beside the loop.
  const bool beside_loop = !has_proj && weight_gradients_beside_loop_pays(B, H, T);
  at::Tensor h_prev = beside_loop || prev_hidden_terms(steps, reverse).empty()
                          ? scratch_buffer(Scratch::kPrevHidden, N, P, opts)
                          : at::Tensor();
  at::Tensor grad_r = has_proj ? at::empty({N, P}, opts) : at::Tensor();  // [N, P] dL/dr
  at::Tensor grad_hidden = has_proj ? at::empty({B, H}, opts) : at::Tensor();  // [B, H]
  at::Tensor grad_input = at::empty({need_grad_input ? N : 0, I}, opts);
  at::Tensor grad_w_ih = at::empty({4 * H, I}, opts);
  at::Tensor grad_w_hh = at::empty({4 * H, P}, opts);
  at::Tensor grad_w_hr = has_proj ? at::empty({P, H}, opts) : at::empty({0}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "lstm_layer_backward_cpu", [&] {
    scalar_t* dgates = grad_gates.data_ptr<scalar_t>();
    scalar_t* dh = grad_h.data_ptr<scalar_t>();
    scalar_t* dc = grad_c.data_ptr<scalar_t>();
    const scalar_t* go = grad_out_c.data_ptr<scalar_t>();
    const scalar_t* gates_p = gates_c.data_ptr<scalar_t>();
    const scalar_t* cells_p = cells_c.data_ptr<scalar_t>();
    const scalar_t* w_hh_p = w_hh_c.data_ptr<scalar_t>();
    const scalar_t* c0_p = c0_c.data_ptr<scalar_t>();
    const at::Tensor w_hr_c = has_proj ? w_hr->contiguous() : at::Tensor();
    const auto& kernels = cell_kernels<scalar_t>();
    const auto recurrent_gemm = StepGemm<scalar_t>::make(B, P, 4 * H);
    const auto projection_gemm = StepGemm<scalar_t>::make(B, H, P);
    // Where the forward fused its steps (no projection), so does the backward, its work
    // shared the same way (run_fused_loop): per step, the cell backward of a thread's
    // rows and units, then (after a barrier when threads own units: dh needs all of
    // dgates) its rows and units of dh = dgates W_hh, which only it reads next step.
    // No BLAS call, no fork/join.
    const bool fused = !has_proj && kernels.gemm_columns != nullptr &&
                       use_fused_step(recurrent_gemm.small, H);
    // Weight gradients over all steps (weight_gradients.h, shared with the other backend).
    WeightGradientArgs<scalar_t> args{
        dgates, x.data_ptr<scalar_t>(), w_ih_c.data_ptr<scalar_t>(), output_c.data_ptr<scalar_t>(),
        h0_c.data_ptr<scalar_t>(), h_prev.defined() ? h_prev.data_ptr<scalar_t>() : nullptr,
        has_proj ? grad_r.data_ptr<scalar_t>() : nullptr,
        has_proj ? hiddens_c.data_ptr<scalar_t>() : nullptr,
        need_grad_input ? grad_input.data_ptr<scalar_t>() : nullptr,
        grad_w_ih.data_ptr<scalar_t>(), grad_w_hh.data_ptr<scalar_t>(),
        has_proj ? grad_w_hr.data_ptr<scalar_t>() : nullptr};
    const auto step_gemm = [](auto... gemm_args) { gemm<scalar_t>(gemm_args...); };
    const auto step_copy = [](scalar_t* dst, const scalar_t* src, int64_t rows, int64_t cols) {
      copy_rows(dst, src, rows, cols);
    };
    if (fused) {
      // Threads own whole panels (tuning.h's fused_backward_panels) or fused_width units.
      const bool panels = cpu_tuning().fused_backward_panels;
      const int64_t width = panels ? kernels.gemm_columns_width : kernels.fused_width;
      at::Tensor w_panels;  // [ceil(H / width)][4H][width]
      if (panels) {
        w_panels = at::empty({(H + width - 1) / width * width * 4 * H}, opts);
        pack_column_panels(w_hh_p, 4 * H, H, width, w_panels.data_ptr<scalar_t>());
      }
      const scalar_t* w_panels_p = panels ? w_panels.data_ptr<scalar_t>() : nullptr;
      const auto loop = [&](int64_t r0, int64_t r1, int64_t j0, int64_t j1, const auto& sync) {
        const int64_t u0 = j0 * width, u1 = std::min(H, j1 * width);
        for (size_t n = 0; n < steps.size(); ++n) {
          const Step& step = steps[steps.size() - 1 - n];
          const int64_t row0 = std::min(r0, step.batch), row1 = std::min(r1, step.batch);
          scalar_t* dgates_t = dgates + step.offset * 4 * H;
          kernels.backward_block(row0, row1, u0, u1, H, gates_p + step.offset * 4 * H,
                                 cells_p + step.offset * H, cells_p + step.prev_offset * H,
                                 step.prev_batch, c0_p, dh, go + step.offset * H, dc, dgates_t);
          sync(n);
          // dL/dh_prev[rows, u0:u1) = dgates[t][rows] W_hh[:, u0:u1)
          if (panels) {
            for (int64_t u = u0; u < u1; u += width) {
              kernels.gemm_columns(row1 - row0, 0, std::min(width, u1 - u), 4 * H,
                                   dgates_t + row0 * 4 * H, 4 * H, w_panels_p + u * 4 * H, width,
                                   false, dh + row0 * H + u, H);
            }
          } else {
            kernels.gemm_columns(row1 - row0, u0, u1, 4 * H, dgates_t + row0 * 4 * H, 4 * H,
                                 w_hh_p, H, false, dh + row0 * H, H);
          }
        }
      };
      if (beside_loop) {
        weight_gradients_beside_loop(s, steps, (H + width - 1) / width, args, loop, step_gemm,
                                     step_copy);
        return;
      }
      run_fused_loop(steps, B, H, width, w_hh_c.nbytes(), loop);
    } else {
      for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
        const Step& step = *it;
        const int64_t b = step.batch;
        const scalar_t* go_t = go + step.offset * P;
        const scalar_t* dh_hidden;  // [b, H] dL/dh_t before the projection
        const scalar_t* dh_extra;
        if (has_proj) {
          // dL/dr_t = running dh + grad_output[t]; back through r_t = h_t W_hr^T.
          scalar_t* dr = grad_r.data_ptr<scalar_t>() + step.offset * P;
          for (int64_t e = 0; e < b * P; ++e) dr[e] = dh[e] + go_t[e];
          const scalar_t* w_hr_p = w_hr_c.data_ptr<scalar_t>();
          projection_gemm(b, H, P, dr, P, w_hr_p, false, w_hr_p, false,
                          grad_hidden.data_ptr<scalar_t>(), H);
          dh_hidden = grad_hidden.data_ptr<scalar_t>();
          dh_extra = nullptr;
        } else {
          dh_hidden = dh;
          dh_extra = go_t;
        }
        kernels.backward(b, H, gates_p + step.offset * 4 * H, cells_p + step.offset * H,
                         cells_p + step.prev_offset * H, step.prev_batch, c0_p, dh_hidden, dh_extra,
                         dc, dgates + step.offset * 4 * H);
        // dL/dh_prev = dgates[t] W_hh
        recurrent_gemm(b, P, 4 * H, dgates + step.offset * 4 * H, 4 * H, w_hh_p, false, w_hh_p,
                       false, dh, P);
      }
    }

    weight_gradients(s, steps, reverse, args, step_gemm, step_copy);
  });
  at::Tensor grad_bias = grad_gates.sum(0);
  if (!need_grad_input) grad_input = grad_input.view({0});
  return {grad_input, grad_h, grad_c, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("lstm_layer_forward", &lstm_layer_forward_cpu);
  m.impl("lstm_layer", &lstm_layer_cpu);
  m.impl("lstm_layer_backward", &layer_backward<false>);
  m.impl("lstm_layer_backward_overwrite_gates", &layer_backward<true>);
}

}  // namespace fused_lstm::cpu
