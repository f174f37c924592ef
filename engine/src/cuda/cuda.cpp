// The engine's CUDA layer over LibTorch's CUDA libraries (built with -Dcuda=enabled). SPDX-License-Identifier:
// LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <optional>

#include "cuda/cuda.h"
#include "cuda/kernels.h"
#include "liveavatar/engine.h"

namespace liveavatar::cuda {

bool built() { return true; }

int device_count() {
  try {
    return static_cast<int>(c10::cuda::device_count());
  } catch (const std::exception&) {
    return 0;
  }
}

std::string unavailable_reason() {
  if (device_count() > 0) return "";
  return "no CUDA GPU is visible to this process (no driver, no device, or CUDA_VISIBLE_DEVICES hides them)";
}

namespace {
void require_device(int index, const char* what) {
  const int n = device_count();
  if (index < 0 || index >= n)
    throw Error(std::string(what) + ": cuda:" + std::to_string(index) + " is not a GPU of this machine (" +
                (n == 0 ? unavailable_reason() : std::to_string(n) + " visible: cuda:0 .. cuda:" + std::to_string(n - 1)) +
                ")");
}
}  // namespace

DeviceInfo device_info(int index) {
  require_device(index, "device_info");
  const auto* p = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(index));
  DeviceInfo d;
  d.name = p->name;
  d.major = p->major;
  d.minor = p->minor;
  d.total_bytes = p->totalGlobalMem;
  d.multiprocessors = p->multiProcessorCount;
  return d;
}

bool supports_fp8(const c10::Device& device) {
  if (!device.is_cuda() || device_count() == 0) return false;
  const auto d = device_info(device.has_index() ? device.index() : 0);
  return d.major > 8 || (d.major == 8 && d.minor >= 9);
}

void synchronize(const c10::Device& device) {
  if (!device.is_cuda()) return;
  c10::cuda::CUDAGuard guard(device);
  c10::cuda::device_synchronize();
}

MemoryStats memory_stats(int index) {
  require_device(index, "memory_stats");
  const auto s = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(index));
  const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  MemoryStats m;
  m.allocated = static_cast<uint64_t>(s.allocated_bytes[all].current);
  m.peak_allocated = static_cast<uint64_t>(s.allocated_bytes[all].peak);
  m.reserved = static_cast<uint64_t>(s.reserved_bytes[all].current);
  m.peak_reserved = static_cast<uint64_t>(s.reserved_bytes[all].peak);
  return m;
}

void reset_peak_memory(int index) {
  require_device(index, "reset_peak_memory");
  c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(index));
}

void set_memory_cap(int index, uint64_t bytes) {
  const auto info = device_info(index);
  if (bytes == 0 || bytes > info.total_bytes)
    throw Error("memory cap of " + std::to_string(bytes >> 20) + " MiB for cuda:" + std::to_string(index) +
                " must be in (0, " + std::to_string(info.total_bytes >> 20) + "] MiB (the device's memory)");
  c10::cuda::CUDACachingAllocator::setMemoryFraction(
      static_cast<double>(bytes) / static_cast<double>(info.total_bytes), static_cast<c10::DeviceIndex>(index));
}

std::pair<at::Tensor, at::Tensor> quantize_fp8_e4m3(const at::Tensor& x_in, bool per_row) {
  if (!x_in.is_cuda()) throw Error("quantize_fp8_e4m3: the kernel runs on CUDA tensors (quantize_fp8_reference for others)");
  if (x_in.scalar_type() != at::kFloat && x_in.scalar_type() != at::kBFloat16)
    throw Error("quantize_fp8_e4m3: x must be fp32 or bf16");
  const auto x = x_in.contiguous();
  const int64_t cols = x.dim() == 0 ? 1 : x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  auto amax = at::empty({per_row ? rows : 1}, f32);
  auto scale = per_row ? at::empty({rows, 1}, f32) : at::empty({}, f32);
  const int rc = kernels::quantize_fp8_e4m3(
      x.data_ptr(), x.scalar_type() == at::kBFloat16 ? kernels::Dtype::kBFloat16 : kernels::Dtype::kFloat32, rows,
      cols, per_row, amax.data_ptr<float>(), static_cast<uint8_t*>(q.data_ptr()), scale.data_ptr<float>(),
      at::cuda::getCurrentCUDAStream(x.device().index()).stream());
  if (rc != 0) throw Error("quantize_fp8_e4m3: CUDA error " + std::to_string(rc) + " (" + cudaGetErrorString(static_cast<cudaError_t>(rc)) + ")");
  if (per_row && x.dim() != 2) scale = scale.view([&] {
      auto s = x.sizes().vec();
      s.back() = 1;
      return s;
    }());
  return {q, scale};
}

// --- Side stream, host copies -----------------------------------------------------------------------------------
struct SideStream::Impl {
  c10::Device device;
  std::optional<c10::cuda::CUDAStream> stream;
  at::cuda::CUDAEvent done;
  explicit Impl(c10::Device d) : device(d) {}
};

SideStream::SideStream(c10::Device device) : impl_(std::make_unique<Impl>(device)) {
  if (device.is_cuda()) impl_->stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device.index());
}
SideStream::~SideStream() {
  try {
    synchronize();
  } catch (...) {
  }
}

void SideStream::run(const std::function<void()>& fn) {
  auto& im = *impl_;
  if (!im.stream) return fn();
  c10::cuda::CUDAGuard device_guard(im.device);
  at::cuda::CUDAEvent queued;
  queued.record(at::cuda::getCurrentCUDAStream(im.device.index()));
  queued.block(*im.stream);
  {
    c10::cuda::CUDAStreamGuard on_side(*im.stream);
    fn();
  }
  im.done.record(*im.stream);
}

void SideStream::synchronize() {
  if (impl_->stream && impl_->done.isCreated()) impl_->done.synchronize();
}

at::Tensor copy_to_host_async(const at::Tensor& t) {
  if (!t.is_cuda()) return t.contiguous();
  auto host = at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(true));
  host.copy_(t, /*non_blocking=*/true);
  return host;
}

// --- CUDA graphs ----------------------------------------------------------------------------------------------
struct Graphs::Impl {
  c10::Device device;
  at::cuda::MempoolId_t pool{0, 0};
  struct Entry {
    int eager_runs = 0;
    std::unique_ptr<at::cuda::CUDAGraph> graph;
    std::vector<at::Tensor> inputs;  // static buffers, in the order of run()'s inputs
    at::Tensor output;               // in the graphs' pool
  };
  std::map<uint64_t, Entry> entries;
  std::string fallback;
  int64_t replays = 0;
  explicit Impl(c10::Device d) : device(d) {}
};

Graphs::Graphs(c10::Device device) : impl_(std::make_unique<Impl>(device)) {
  if (!device.is_cuda()) impl_->fallback = "the device is " + device.str() + ", not a GPU";
}
Graphs::~Graphs() = default;

void Graphs::run(uint64_t key, const std::vector<at::Tensor*>& inputs, at::Tensor* output,
                 const std::function<void()>& body) {
  auto& im = *impl_;
  if (!im.fallback.empty()) return body();
  auto& e = im.entries[key];
  const auto index = im.device.index();
  if (!e.graph) {
    if (e.eager_runs++ == 0) return body();  // warm-up: library handles, workspaces, lazy initialisation
    // Capture on a side stream (the legacy default stream cannot capture), after the work queued so far.
    std::vector<at::Tensor> originals;
    for (auto* t : inputs) originals.push_back(*t);
    e.inputs.clear();
    for (auto* t : inputs) {
      e.inputs.push_back(t->defined() ? t->clone() : at::Tensor());
      *t = e.inputs.back();
    }
    const auto ambient = at::cuda::getCurrentCUDAStream(index);
    auto side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index);
    at::cuda::CUDAEvent ready;
    ready.record(ambient);
    ready.block(side);
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    try {
      c10::cuda::CUDAStreamGuard on_side(side);
      if (im.pool.first == 0 && im.pool.second == 0) im.pool = at::cuda::graph_pool_handle();
      // Thread-local capture: other threads of the process (GStreamer's, other streams') may keep using CUDA.
      graph->capture_begin(im.pool, cudaStreamCaptureModeThreadLocal);
      try {
        body();
      } catch (...) {
        try {
          graph->capture_end();
        } catch (...) {
        }
        throw;
      }
      graph->capture_end();
      e.output = *output;
      at::cuda::CUDAEvent captured;
      captured.record(side);
      captured.block(ambient);
    } catch (const std::exception& ex) {
      // Not capturable (a host synchronisation, an unsupported kernel): eager from now on, for every key.
      im.fallback = std::string("capture failed: ") + ex.what();
      im.entries.clear();
      for (size_t i = 0; i < inputs.size(); ++i) *inputs[i] = originals[i];
      return body();
    }
    e.graph = std::move(graph);
  } else {
    if (inputs.size() != e.inputs.size()) throw Error("cuda graph: a different number of inputs for the same key");
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (!inputs[i]->defined()) continue;
      if (inputs[i]->sizes() != e.inputs[i].sizes())
        throw Error("cuda graph: input " + std::to_string(i) + " changed shape for the same key");
      e.inputs[i].copy_(*inputs[i], /*non_blocking=*/true);
    }
  }
  e.graph->replay();
  ++im.replays;
  *output = e.output.clone();
}

void Graphs::clear() {
  impl_->entries.clear();
}
size_t Graphs::graphs() const {
  size_t n = 0;
  for (const auto& kv : impl_->entries) n += kv.second.graph ? 1 : 0;
  return n;
}
int64_t Graphs::replays() const { return impl_->replays; }
std::string Graphs::fallback_reason() const { return impl_->fallback; }

}  // namespace liveavatar::cuda
