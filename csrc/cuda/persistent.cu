// The persistent recurrent kernels (cuda/persistent.h): one launch per layer runs the
// block program of core/persistent.h on every block, one cluster of n blocks per batch
// slice (n = 1, mode A: a plain launch; n > 1, mode B: sm_90 clusters, distributed
// shared memory, cluster barriers). Not yet run on a GPU: off by default.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "core/persistent.h"
#include "core/schedule.h"
#include "cuda/persistent.h"

namespace fused_lstm::cuda {
namespace {

namespace ps = persistent;
namespace cg = cooperative_groups;

// A block's view of block `rank`'s shared memory: its own (n = 1) or, in a cluster,
// the peer's through distributed shared memory.
struct DevicePeer {
  int n;
  template <typename T>
  __host__ __device__ T* operator()(T* local, int32_t rank) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (n > 1) return cg::this_cluster().map_shared_rank(local, static_cast<unsigned>(rank));
#endif
    return local;
  }
};

// The barriers: the block's, and the cluster's (the block's when n = 1). Cluster
// barriers are release/acquire: the peers' writes into this block's memory are visible
// after one.
struct DeviceSync {
  int n;
  __host__ __device__ void block() {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
  __host__ __device__ void cluster() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (n > 1) {
      cg::this_cluster().sync();
      return;
    }
#endif
    block();
  }
};

template <typename scalar_t, bool kBackward>
using LaunchArgs = std::conditional_t<kBackward, ps::BackwardArgs<scalar_t>, ps::ForwardArgs<scalar_t>>;

// The forward or backward block program on every block. Block blockIdx.x is rank
// blockIdx.x % n of slice blockIdx.x / n: clusters of a 1-D grid are n consecutive blocks.
template <typename scalar_t, bool kBackward>
__global__ void __launch_bounds__(ps::kThreads)
    persistent_kernel(const LaunchArgs<scalar_t, kBackward> a, const ps::SmemLayout layout) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int n = a.s.n;
  const ps::Part part = ps::make_part(a.s, blockIdx.x % n, blockIdx.x / n);
  DeviceSync sync{n};
  if constexpr (kBackward) {
    ps::backward_block(a, part, ps::BackwardSmem<scalar_t, acc_t>::at(smem, layout),
                       DevicePeer{n}, sync, threadIdx.x, blockDim.x);
  } else {
    ps::forward_block(a, part, ps::ForwardSmem<scalar_t, acc_t>::at(smem, layout), DevicePeer{n},
                      sync, threadIdx.x, blockDim.x);
  }
}

std::atomic<bool> g_enabled{[] {
  const char* env = std::getenv("FUSED_LSTM_CUDA_PERSISTENT");
  return env != nullptr && std::strcmp(env, "on") == 0;
}()};
std::atomic<int64_t> g_launches{0};

// What the current device and `kernel`'s binary allow: clusters only where the kernel
// was built for sm_90 or newer (an sm_80 binary run on sm_90 has no cluster code);
// max_cluster 0 where the kernel has no binary for this device.
ps::DeviceLimits device_limits(const void* kernel) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  cudaFuncAttributes attr{};
  const bool have_attr = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess;
  if (!have_attr) (void)cudaGetLastError();
  const bool clusters = have_attr && prop->major >= 9 && attr.binaryVersion >= 90;
  return {prop->major, prop->minor, prop->multiProcessorCount,
          static_cast<int64_t>(prop->sharedMemPerBlockOptin),
          have_attr ? (clusters ? ps::kMaxCluster : 1) : 0};
}

// Whether the device can hold one cluster of the kernel at this size (asked once per
// device, kernel, cluster size and shared memory size).
bool cluster_fits(const void* kernel, cudaLaunchConfig_t config) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, unsigned, size_t>, bool> known;
  const std::tuple<int, const void*, unsigned, size_t> key{
      at::cuda::current_device(), kernel, config.attrs[0].val.clusterDim.x,
      config.dynamicSmemBytes};
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = known.find(key);
  if (it != known.end()) return it->second;
  int clusters = 0;
  const bool ok = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) == cudaSuccess &&
                  clusters > 0;
  if (!ok) (void)cudaGetLastError();
  known.emplace(key, ok);
  return ok;
}

// Launches kernel(args, layout) as slices x n blocks in clusters of n; false where the
// device refuses (the error is cleared: nothing ran).
template <typename Args>
bool launch(void (*kernel)(const Args, const ps::SmemLayout), const Args& args,
            const ps::SmemLayout& layout, cudaStream_t stream) {
  const int n = args.s.n;
  const void* fn = reinterpret_cast<const void*>(kernel);
  bool ok = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(layout.bytes)) == cudaSuccess;
  if (ok && n > 8) {
    ok = cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
         cudaSuccess;
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = n;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(ps::slices(args.s) * n));
  config.blockDim = dim3(ps::kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(layout.bytes);
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = n > 1 ? 1 : 0;
  if (ok && n > 1) ok = cluster_fits(fn, config);
  if (ok) ok = cudaLaunchKernelEx(&config, kernel, args, layout) == cudaSuccess;
  if (!ok) {
    (void)cudaGetLastError();
    TORCH_WARN_ONCE("fused_lstm: the device refused the persistent CUDA kernel (", n,
                    " blocks a cluster, ", layout.bytes,
                    " bytes of shared memory a block); running the per-step path");
    return false;
  }
  ++g_launches;
  return true;
}

// The step table on the device for packed input (null tensor: dense, computed in the
// kernel). From pinned memory, stream-ordered: the buffer lives until the kernel ran.
at::Tensor device_steps(const std::vector<Step>& steps, const at::Tensor& like) {
  if (dense_schedule(steps)) return at::Tensor();
  const std::vector<ps::StepInfo> table = persistent_step_table(steps);
  const int64_t bytes = static_cast<int64_t>(table.size() * sizeof(ps::StepInfo));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), bytes);
  return host.to(like.device(), /*non_blocking=*/true);
}

const ps::StepInfo* steps_ptr(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const ps::StepInfo*>(t.data_ptr()) : nullptr;
}

// The plan for this layer on this device, or nothing (with the reason, once, when the
// setting is on).
template <typename scalar_t>
ps::Plan plan_layer(const LayerSizes& s, const void* kernel) {
  ps::Plan plan;
  if (!g_enabled.load()) return plan;
  const ps::DeviceLimits limits = device_limits(kernel);
  if (limits.max_cluster == 0) {
    plan.why_not = "this build has no persistent kernel for this GPU's architecture";
  } else {
    plan = ps::plan(limits, s.H, s.P, s.B, s.T, static_cast<int>(sizeof(scalar_t)), s.has_proj);
  }
  if (!plan.ok()) {
    TORCH_WARN_ONCE("fused_lstm: the persistent CUDA kernel does not run this layer (",
                    plan.why_not, "); running the per-step path");
  }
  return plan;
}

// Plans the layer, puts its step table on the device and launches
// kernel(make_args(shape, steps), layout); false: the caller runs the per-step path.
template <typename scalar_t, typename Args, typename MakeArgs>
bool plan_and_launch(void (*kernel)(const Args, const ps::SmemLayout), const LayerSizes& sizes,
                     const std::vector<Step>& schedule, const at::Tensor& like, bool backward,
                     const MakeArgs& make_args) {
  const ps::Plan plan = plan_layer<scalar_t>(sizes, reinterpret_cast<const void*>(kernel));
  if (!plan.ok()) return false;
  const ps::Shape s = ps::make_shape(sizes.H, sizes.B, sizes.T, plan.n, plan.slice);
  const at::Tensor steps = device_steps(schedule, like);
  return launch(kernel, make_args(s, steps_ptr(steps)),
                ps::smem_layout(s, sizeof(scalar_t), sizeof(float), backward),
                at::cuda::getCurrentCUDAStream());
}

}  // namespace

std::string set_persistent(const std::string& setting) {
  TORCH_CHECK(setting.empty() || setting == "on" || setting == "off",
              "fused_lstm: expected the CUDA persistent setting \"on\" or \"off\", got \"",
              setting, "\"");
  if (!setting.empty()) g_enabled.store(setting == "on");
  return g_enabled.load() ? "on" : "off";
}

int64_t persistent_launches() { return g_launches.load(); }

template <typename scalar_t>
bool persistent_forward(const LayerForwardParams& p, const ForwardBuffers<scalar_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return false;
  } else {
    return plan_and_launch<scalar_t>(
        &persistent_kernel<scalar_t, false>, p.s, p.steps, p.input, false,
        [&](const ps::Shape& s, const ps::StepInfo* steps) {
          return ps::ForwardArgs<scalar_t>{
              p.w_hh.data_ptr<scalar_t>(), buf.gates, buf.output, buf.cells,
              p.h0.data_ptr<scalar_t>(), p.c0.data_ptr<scalar_t>(), buf.h_state, buf.c_state,
              steps, s, p.reverse};
        });
  }
}

template <typename scalar_t>
bool persistent_backward(const LayerBackwardParams& p, const BackwardBuffers<scalar_t>& buf) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return false;
  } else {
    return plan_and_launch<scalar_t>(
        &persistent_kernel<scalar_t, true>, p.s, p.steps, p.input, true,
        [&](const ps::Shape& s, const ps::StepInfo* steps) {
          return ps::BackwardArgs<scalar_t>{
              p.w_hh.data_ptr<scalar_t>(), buf.grad_output, buf.gates, buf.cells, buf.c0,
              buf.dgates, buf.dh, buf.dc, steps, s, p.reverse};
        });
  }
}

#define FUSED_LSTM_PERSISTENT(scalar_t)                                                  \
  template bool persistent_forward<scalar_t>(const LayerForwardParams&,                  \
                                             const ForwardBuffers<scalar_t>&);           \
  template bool persistent_backward<scalar_t>(const LayerBackwardParams&,                \
                                              const BackwardBuffers<scalar_t>&);
FUSED_LSTM_PERSISTENT(float)
FUSED_LSTM_PERSISTENT(double)
FUSED_LSTM_PERSISTENT(at::Half)
FUSED_LSTM_PERSISTENT(at::BFloat16)
#undef FUSED_LSTM_PERSISTENT

TORCH_LIBRARY_IMPL(fused_lstm, CompositeImplicitAutograd, m) {
  m.impl("set_cuda_persistent", &set_persistent);
  m.impl("cuda_persistent_launches", &persistent_launches);
}

}  // namespace fused_lstm::cuda
