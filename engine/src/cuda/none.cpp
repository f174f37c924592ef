// The CUDA layer of a build without CUDA (-Dcuda=disabled or no toolkit): no GPU, and every action says how to get
// one. SPDX-License-Identifier: LGPL-2.1-or-later
#include "cuda/cuda.h"
#include "liveavatar/engine.h"

namespace liveavatar::cuda {
namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw Error(std::string(what) + ": this build has no CUDA; install the CUDA toolkit and run scripts/setup.sh "
              "(it configures with -Dcuda=enabled when nvcc is present)");
}
}  // namespace

bool built() { return false; }
int device_count() { return 0; }
std::string unavailable_reason() { return "this build has no CUDA (configured with -Dcuda=disabled or without nvcc)"; }
DeviceInfo device_info(int) { no_cuda("device_info"); }
bool supports_fp8(const c10::Device&) { return false; }
void synchronize(const c10::Device& device) {
  if (device.is_cuda()) no_cuda("synchronize");
}
MemoryStats memory_stats(int) { no_cuda("memory_stats"); }
void reset_peak_memory(int) { no_cuda("reset_peak_memory"); }
void set_memory_cap(int, uint64_t) { no_cuda("set_memory_cap"); }
std::pair<at::Tensor, at::Tensor> quantize_fp8_e4m3(const at::Tensor&, bool) { no_cuda("quantize_fp8_e4m3"); }

struct SideStream::Impl {};
SideStream::SideStream(c10::Device device) : impl_(std::make_unique<Impl>()) {
  if (device.is_cuda()) no_cuda("SideStream");
}
SideStream::~SideStream() = default;
void SideStream::run(const std::function<void()>& fn) { fn(); }
void SideStream::synchronize() {}
at::Tensor copy_to_host_async(const at::Tensor& t) {
  if (t.is_cuda()) no_cuda("copy_to_host_async");
  return t.contiguous();
}

struct Graphs::Impl {};
Graphs::Graphs(c10::Device) : impl_(std::make_unique<Impl>()) {}
Graphs::~Graphs() = default;
void Graphs::run(uint64_t, const std::vector<at::Tensor*>&, at::Tensor*, const std::function<void()>& body) { body(); }
void Graphs::clear() {}
size_t Graphs::graphs() const { return 0; }
int64_t Graphs::replays() const { return 0; }
std::string Graphs::fallback_reason() const { return "this build has no CUDA"; }

}  // namespace liveavatar::cuda
