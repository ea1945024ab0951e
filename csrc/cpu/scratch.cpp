#include "cpu/scratch.h"

#include <cstddef>
#include <vector>

namespace fused_lstm::cpu {
namespace {

constexpr int64_t kMaxReusedBytes = int64_t{256} << 20;

thread_local at::Tensor kept_scratch[static_cast<int>(Scratch::kCount)];
thread_local std::vector<std::byte> kept_bytes[static_cast<int>(Scratch::kCount)];

}  // namespace

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

void* scratch_bytes(Scratch slot, size_t bytes) {
  std::vector<std::byte>& buffer = kept_bytes[static_cast<int>(slot)];
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

void release_scratch() {
  for (at::Tensor& t : kept_scratch) t = at::Tensor();
  for (std::vector<std::byte>& b : kept_bytes) std::vector<std::byte>().swap(b);
}

}  // namespace fused_lstm::cpu
