// A CPU allocator that counts the bytes LibTorch holds (live and peak), for comparing the memory planner's
// prediction with what the model really allocates. Installed with c10::SetCPUAllocator for its lifetime and
// restored afterwards. SPDX-License-Identifier: LGPL-2.1-or-later
//
// Thread-safety: counting is atomic (intra-op threads allocate concurrently); install / restore from one thread
// while no other thread allocates.
#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>

namespace liveavatar::runtime {

class CountingCpuAllocator final : public c10::Allocator {
 public:
  CountingCpuAllocator() : base_(c10::GetCPUAllocator()), base_deleter_(base_->raw_deleter()), counters_(new Counters) {
    // Some kernels (oneDNN scratch pads) allocate through raw_allocate(), which needs data == context: the
    // bookkeeping lives in a header in front of the data, freed by the base allocator's raw deleter.
    TORCH_CHECK(base_deleter_ != nullptr, "CountingCpuAllocator: the CPU allocator has no raw deleter to wrap");
    c10::SetCPUAllocator(this, kPriority);
  }
  ~CountingCpuAllocator() override { c10::SetCPUAllocator(base_, kPriority); }
  CountingCpuAllocator(const CountingCpuAllocator&) = delete;
  CountingCpuAllocator& operator=(const CountingCpuAllocator&) = delete;

  /// Bytes allocated through this allocator and not freed yet (as requested, without the headers).
  uint64_t live() const { return counters_->live.load(); }
  /// The largest live() since construction or the last reset_peak().
  uint64_t peak() const { return counters_->peak.load(); }
  void reset_peak() { counters_->peak.store(counters_->live.load()); }

  c10::DataPtr allocate(size_t n) override {
    auto* raw = static_cast<char*>(base_->raw_allocate(n + kHeader));
    auto* header = reinterpret_cast<Header*>(raw);
    header->counters = counters_;
    header->size = n;
    header->base_deleter = base_deleter_;
    counters_->add(n);
    void* data = raw + kHeader;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  // Above the default CPU allocator's registration, so that both installing and restoring take effect.
  static constexpr uint8_t kPriority = 100;
  // Keeps the data 64-byte aligned, as the default CPU allocator returns it.
  static constexpr size_t kHeader = 64;
  struct Counters {
    std::atomic<uint64_t> live{0};
    std::atomic<uint64_t> peak{0};
    void add(uint64_t n) {
      const uint64_t now = live.fetch_add(n) + n;
      uint64_t p = peak.load();
      while (now > p && !peak.compare_exchange_weak(p, now)) {
      }
    }
  };
  struct Header {
    Counters* counters;
    uint64_t size;
    c10::DeleterFnPtr base_deleter;
  };
  static_assert(sizeof(Header) <= kHeader, "the header must fit in front of the data");
  static void release(void* data) {
    if (!data) return;
    auto* raw = static_cast<char*>(data) - kHeader;
    auto* header = reinterpret_cast<Header*>(raw);
    header->counters->live.fetch_sub(header->size);
    header->base_deleter(raw);
  }

  c10::Allocator* base_;
  c10::DeleterFnPtr base_deleter_;
  // Never freed: tensors allocated while counting may outlive the allocator and still decrement it (a few bytes
  // per allocator instance).
  Counters* counters_;
};

}  // namespace liveavatar::runtime
