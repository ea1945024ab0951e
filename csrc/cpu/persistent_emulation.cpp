// A CPU emulation of the CUDA persistent kernels (core/persistent.h), for tests: each
// block of a cluster is an OS thread group running the same block program, its shared
// memory a host buffer, distributed shared memory a pointer into another block's
// buffer, the block and cluster barriers real barriers. It checks the partition
// (slicing, all-gather, reduce-scatter, masking), not the device's memory ordering.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "core/persistent.h"
#include "core/schedule.h"
#include "lstm.h"

namespace fused_lstm::cpu {
namespace {

namespace ps = persistent;

// A reusable barrier of `count` threads.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  const int count_;
  int arrived_ = 0;
  int64_t generation_ = 0;
};

struct Sync {
  Barrier* block_barrier;
  Barrier* cluster_barrier;
  void block() { block_barrier->wait(); }
  void cluster() { cluster_barrier->wait(); }
};

// Block `rank`'s view of another block's shared memory: the same offset in its buffer.
struct Peer {
  const std::vector<std::vector<unsigned char>>* smem;
  int rank;
  template <typename T>
  T* operator()(T* local, int32_t q) const {
    const auto offset = reinterpret_cast<unsigned char*>(local) - (*smem)[rank].data();
    return reinterpret_cast<T*>(const_cast<unsigned char*>((*smem)[q].data()) + offset);
  }
};

// Runs block_program(part, smem base, peer, sync, tid) for every block of every slice:
// the slices one after another, each cluster's n x threads threads at once.
template <typename Program>
void run_clusters(const ps::Shape& s, int64_t smem_bytes, int threads,
                  const Program& block_program) {
  for (int32_t slice = 0; slice < ps::slices(s); ++slice) {
    std::vector<std::vector<unsigned char>> smem(s.n, std::vector<unsigned char>(smem_bytes));
    Barrier cluster_barrier(s.n * threads);
    std::deque<Barrier> block_barriers;
    for (int32_t r = 0; r < s.n; ++r) block_barriers.emplace_back(threads);
    std::vector<std::thread> pool;
    for (int32_t r = 0; r < s.n; ++r) {
      for (int tid = 0; tid < threads; ++tid) {
        pool.emplace_back([&, r, tid] {
          Sync sync{&block_barriers[r], &cluster_barrier};
          block_program(ps::make_part(s, r, slice), smem[r].data(), Peer{&smem, r}, sync, tid);
        });
      }
    }
    for (auto& t : pool) t.join();
  }
}

void check_partition(int64_t H, int64_t cluster, int64_t slice, int64_t threads) {
  TORCH_CHECK(cluster >= 1 && cluster <= H && cluster <= ps::kMaxCluster,
              "persistent emulation: expected 1 <= cluster <= min(hidden_size, ",
              ps::kMaxCluster, "), got ", cluster);
  TORCH_CHECK(slice >= 1, "persistent emulation: expected batch_slice >= 1, got ", slice);
  TORCH_CHECK(threads >= 1 && threads <= 64,
              "persistent emulation: expected 1 <= threads <= 64, got ", threads);
}

// Packed input passes the step table; dense input none, as the CUDA launch does.
std::vector<ps::StepInfo> launch_steps(const std::vector<Step>& steps) {
  return dense_schedule(steps) ? std::vector<ps::StepInfo>{} : persistent_step_table(steps);
}

// -> (output [N, H], h_n [B, H], c_n [B, H], gates [N, 4H] activated, cells [N, H])
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate_forward(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh, bool reverse,
    int64_t cluster, int64_t slice, int64_t threads) {
  const LayerForwardParams p = make_forward_params(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih,
                                                   b_hh, std::nullopt, reverse, true);
  TORCH_CHECK(p.input.device().is_cpu(), "persistent emulation: expected CPU tensors");
  check_partition(p.s.H, cluster, slice, threads);
  // The input part of the gates over all steps, bias folded in (the driver's input GEMM).
  at::Tensor gates = p.b_ih.defined() ? at::addmm(p.b_ih + p.b_hh, p.input, p.w_ih.t())
                                      : at::mm(p.input, p.w_ih.t());
  at::Tensor output = at::empty({p.s.N, p.s.H}, p.input.options());
  at::Tensor cells = at::empty({p.s.N, p.s.H}, p.input.options());
  at::Tensor h_n = p.h0.clone(), c_n = p.c0.clone();
  const ps::Shape s = ps::make_shape(p.s.H, p.s.B, p.s.T, cluster, slice);
  const std::vector<ps::StepInfo> table = launch_steps(p.steps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "persistent_emulate_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ps::ForwardArgs<scalar_t> a{
        p.w_hh.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(),
        cells.data_ptr<scalar_t>(),  p.h0.data_ptr<scalar_t>(),  p.c0.data_ptr<scalar_t>(),
        h_n.data_ptr<scalar_t>(),    c_n.data_ptr<scalar_t>(),
        table.empty() ? nullptr : table.data(), s, reverse};
    const ps::SmemLayout layout = ps::smem_layout(s, sizeof(scalar_t), sizeof(acc_t), false);
    run_clusters(s, layout.bytes, threads, [&](const ps::Part& b, unsigned char* base,
                                               const Peer& peer, Sync& sync, int tid) {
      const auto m = ps::ForwardSmem<scalar_t, acc_t>::at(base, layout);
      ps::forward_block(a, b, m, peer, sync, tid, static_cast<int>(threads));
    });
  });
  return {output, h_n, c_n, gates, cells};
}

// -> (dgates [N, 4H], grad_h0 [B, H], grad_c0 [B, H])
std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& batch_sizes, const at::Tensor& c0, const at::Tensor& w_hh,
    const at::Tensor& gates, const at::Tensor& cells, bool reverse, int64_t cluster,
    int64_t slice, int64_t threads) {
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 4 * w_hh.size(1) && w_hh.size(1) > 0,
              "persistent emulation: expected w_hh [4H, H], got ", w_hh.sizes());
  const int64_t H = w_hh.size(1), N = gates.size(0), T = batch_sizes.numel();
  const std::vector<Step> steps = make_schedule(batch_sizes, reverse);
  const int64_t B = T > 0 ? batch_sizes[0].item<int64_t>() : 0;
  const auto check = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK(t.sizes() == shape && t.scalar_type() == w_hh.scalar_type() && t.is_cpu(),
                "persistent emulation: expected ", name, " ", shape, " ", w_hh.scalar_type(),
                " on the CPU, got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  };
  check(gates, "gates", {N, 4 * H});
  check(cells, "cells", {N, H});
  check(grad_output, "grad_output", {N, H});
  check(grad_h_n, "grad_h_n", {B, H});
  check(grad_c_n, "grad_c_n", {B, H});
  check(c0, "c0", {B, H});
  TORCH_CHECK(batch_sizes.sum().item<int64_t>() == N, "persistent emulation: batch_sizes sum");
  check_partition(H, cluster, slice, threads);
  at::Tensor dgates = at::empty({N, 4 * H}, gates.options());
  at::Tensor grad_h = grad_h_n.clone(), grad_c = grad_c_n.clone();
  const at::Tensor go = grad_output.contiguous(), g = gates.contiguous(),
                   cl = cells.contiguous(), c0c = c0.contiguous(), w = w_hh.contiguous();
  const ps::Shape s = ps::make_shape(H, B, T, cluster, slice);
  const std::vector<ps::StepInfo> table = launch_steps(steps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w_hh.scalar_type(),
                                  "persistent_emulate_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ps::BackwardArgs<scalar_t> a{
        w.data_ptr<scalar_t>(),      go.data_ptr<scalar_t>(),     g.data_ptr<scalar_t>(),
        cl.data_ptr<scalar_t>(),     c0c.data_ptr<scalar_t>(),    dgates.data_ptr<scalar_t>(),
        grad_h.data_ptr<scalar_t>(), grad_c.data_ptr<scalar_t>(),
        table.empty() ? nullptr : table.data(), s, reverse};
    const ps::SmemLayout layout = ps::smem_layout(s, sizeof(scalar_t), sizeof(acc_t), true);
    run_clusters(s, layout.bytes, threads, [&](const ps::Part& b, unsigned char* base,
                                               const Peer& peer, Sync& sync, int tid) {
      const auto m = ps::BackwardSmem<scalar_t, acc_t>::at(base, layout);
      ps::backward_block(a, b, m, peer, sync, tid, static_cast<int>(threads));
    });
  });
  return {dgates, grad_h, grad_c};
}

// The planner for given device properties (tests, with H200 and A100 values).
c10::Dict<std::string, std::string> plan_for(int64_t H, int64_t P, int64_t B, int64_t T,
                                             int64_t elem_size, bool has_proj, int64_t cc_major,
                                             int64_t cc_minor, int64_t sm_count,
                                             int64_t smem_per_block, int64_t max_cluster) {
  const ps::DeviceLimits d{static_cast<int>(cc_major), static_cast<int>(cc_minor),
                           static_cast<int>(sm_count), smem_per_block,
                           static_cast<int>(max_cluster)};
  const ps::Plan plan = ps::plan(d, H, P, B, T, static_cast<int>(elem_size), has_proj);
  c10::Dict<std::string, std::string> out;
  out.insert("cluster", std::to_string(plan.n));
  out.insert("batch_slice", std::to_string(plan.slice));
  out.insert("forward_smem", std::to_string(plan.forward_smem));
  out.insert("backward_smem", std::to_string(plan.backward_smem));
  out.insert("why_not", plan.why_not != nullptr ? plan.why_not : "");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("persistent_emulate_forward", &emulate_forward);
  m.impl("persistent_emulate_backward", &emulate_backward);
}

TORCH_LIBRARY_IMPL(fused_lstm, CompositeImplicitAutograd, m) {
  m.impl("persistent_plan", &plan_for);
}

}  // namespace fused_lstm::cpu
