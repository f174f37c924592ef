// The engine's CUDA layer: device facts and memory, the project's own kernels, and CUDA graphs of repeated
// forwards. Built against LibTorch's CUDA libraries with -Dcuda=enabled; without it every query answers "no GPU"
// and every action throws an Error saying how to build with CUDA. SPDX-License-Identifier: LGPL-2.1-or-later
//
//   if (cuda::device_count() > 0 && cuda::supports_fp8(dev)) ...
//   cuda::set_memory_cap(0, 22ull << 30);                 // the caching allocator refuses beyond 22 GiB
//   auto [q, scale] = cuda::quantize_fp8_e4m3(x, false);   // x / (amax / 448) -> e4m3, scale stays on the device
//   cuda::Graphs graphs(dev);                              // one per shard and stream
//   graphs.run(key, {&in.hidden, &in.e0}, &in.hidden, [&] { model.run_layers(in, state, step); });
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace liveavatar::cuda {

/// True when this build links LibTorch's CUDA libraries (meson -Dcuda=enabled).
bool built();
/// GPUs this process can use (0 without CUDA in the build, without a driver or without a GPU).
int device_count();
/// Why device_count() is 0, for messages ("" when there are GPUs).
std::string unavailable_reason();

struct DeviceInfo {
  std::string name;
  int major = 0, minor = 0;  // compute capability
  uint64_t total_bytes = 0;
  int multiprocessors = 0;
};
/// Throws Error when `index` is not a usable GPU.
DeviceInfo device_info(int index);
/// A CUDA device with FP8 tensor cores (sm_89 and later); false for the CPU.
bool supports_fp8(const c10::Device& device);
/// Waits for all work queued on the device (no-op for the CPU).
void synchronize(const c10::Device& device);

/// The caching allocator's counters of one GPU, bytes.
struct MemoryStats {
  uint64_t allocated = 0, reserved = 0, peak_allocated = 0, peak_reserved = 0;
};
MemoryStats memory_stats(int index);
void reset_peak_memory(int index);
/// Caps the caching allocator of GPU `index` at `bytes` (the fraction bytes / total of the device): an allocation
/// beyond it fails as out of memory, as on a smaller card.
void set_memory_cap(int index, uint64_t bytes);

/// The project's kernel (engine/src/cuda/kernels.cu): dynamic FP8 e4m3 quantisation of a CUDA tensor x [rows, cols]
/// (fp32 or bf16, contiguous): scale = max(amax, 1e-12) / 448 per tensor (0-dim) or per row ([rows, 1]), q =
/// saturate(x / scale) rounded to nearest even. The scale never leaves the device (no host round trip). Bit for bit
/// what quantize_fp8_reference() computes with ATen.
std::pair<at::Tensor, at::Tensor> quantize_fp8_e4m3(const at::Tensor& x, bool per_row);
/// The same with ATen operations (any device): the reference for the kernel and the CPU path.
std::pair<at::Tensor, at::Tensor> quantize_fp8_reference(const at::Tensor& x, bool per_row);

/// A stream beside the calling thread's current one on `device` (on the CPU: everything runs at once, in order).
/// run(fn) queues fn's work on it after the work already queued on the current stream, so it overlaps what the
/// current stream does next; synchronize() waits for everything run() queued. Tensors that fn reads and the current
/// stream allocated must stay referenced until synchronize() (the caching allocator could otherwise hand their memory
/// to the current stream while this one still reads it); tensors fn allocates belong to this stream.
class SideStream {
 public:
  explicit SideStream(c10::Device device);
  ~SideStream();
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  void run(const std::function<void()>& fn);
  void synchronize();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// A copy of `t` in host memory; from a GPU into pinned memory without waiting (the copy completes in stream order:
/// synchronize the stream that queued it before reading). On the CPU: t itself, contiguous.
at::Tensor copy_to_host_async(const at::Tensor& t);

/// CUDA graphs of forwards repeated at fixed shapes, by key (e.g. denoising step and ring slot). The first call of a
/// key runs `body` eagerly (warm-up); the second copies the `inputs` into static buffers, captures `body` and replays
/// it; later calls copy the inputs into the buffers and replay. `*output` (set by body) is cloned out of the graph's
/// memory pool, which all graphs of one Graphs share (they run one after another). If capture fails, the Graphs
/// switch to eager for good and fallback_reason() says why. clear() after anything the graphs read other than the
/// inputs (caches reallocated, a new sink) changes its storage.
class Graphs {
 public:
  explicit Graphs(c10::Device device);
  ~Graphs();
  Graphs(const Graphs&) = delete;
  Graphs& operator=(const Graphs&) = delete;
  void run(uint64_t key, const std::vector<at::Tensor*>& inputs, at::Tensor* output,
           const std::function<void()>& body);
  void clear();
  size_t graphs() const;
  int64_t replays() const;
  std::string fallback_reason() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace liveavatar::cuda
