// gst-liveavatar parallel runtime: which plan, how many ranks, which device each rank drives, where they meet.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
// Rank layout (world size N, one process or thread per rank, rank r drives devices[r]):
//
//   plan     rank 0                         rank 1 .. N-2               rank N-1
//   single   everything (N = 1)
//   step     full DiT, KV ring of step 0    full DiT, ring of step r    full DiT, ring of step N-1 (N = steps)
//            (noise, audio in, latents out)  latent of block b: r-1 -> r -> r+1, final latent N-1 -> 0
//   stage    layers [0, L/N) + embeddings   layers [rL/N, (r+1)L/N)    layers [(N-1)L/N, L) + head
//            (noise, audio in, latents out)  hidden state: r-1 -> r -> r+1, velocity N-1 -> 0
//
// Rank 0 hosts the rendezvous (c10d TCPStore at host:port) and is the rank the engine talks to. Everything is a
// value: no globals, so several ranks (and several worlds) can live in one process.
//
// Thread-safety: a ParallelConfig is immutable; share it freely.
#pragma once

#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "liveavatar/engine.h"  // liveavatar::Error

namespace liveavatar::parallel {

/// A parallel setting that cannot work, or a peer that failed. what() names the value (or rank) and what to do.
class ParallelError : public Error {
 public:
  using Error::Error;
};

enum class Plan {
  kSingle,  // one device holds everything
  kStep,    // LiveAvatar's TPP: rank s runs denoising step s with the full DiT
  kStage,   // layer pipeline: rank k runs layers [kL/N, (k+1)L/N) for every step
  kAuto,    // the memory planner chooses (resolved before a plan runs)
};

/// "single" | "step" | "stage" | "auto"; anything else throws ParallelError listing them.
Plan parse_plan(const std::string& text);
const char* plan_name(Plan plan);

/// "cpu" (one rank), "cpu:N" (N CPU ranks), or a comma list "cuda:0,cuda:1,cpu". Throws ParallelError with an
/// example of what to write.
std::vector<c10::Device> parse_devices(const std::string& text);

/// Where rank 0 hosts the rendezvous store.
struct Endpoint {
  std::string host = "127.0.0.1";
  uint16_t port = 29500;  // 0: any free port (rank 0 only; the others must be told the port it got)
};
/// "host:port" or "[v6-address]:port", port 0..65535.
Endpoint parse_endpoint(const std::string& text);

/// "30" (seconds), "30s", "500ms", "2m"; must be positive.
std::chrono::milliseconds parse_timeout(const std::string& text);
/// "1.5 s", "30 s", "250 ms" (for messages).
std::string format_duration(std::chrono::milliseconds d);

/// Layers [first, last) of stage `stage` of `stages`: [stage * L / stages, (stage + 1) * L / stages).
std::pair<int64_t, int64_t> stage_layers(int64_t num_layers, int stage, int stages);

class ParallelConfig {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout{30000};

  /// single, rank 0 of 1, on the CPU.
  ParallelConfig();
  /// Throws ParallelError naming the value and the rule: rank in [0, devices), single needs one device, one rank
  /// per GPU.
  ParallelConfig(Plan plan, std::vector<c10::Device> devices, int rank, Endpoint rendezvous = {},
                 std::chrono::milliseconds timeout = kDefaultTimeout);
  /// The same from the strings a user writes (element properties, worker arguments), e.g.
  /// parse("stage", "cuda:0,cuda:1", 1, "10.0.0.5:29500", "30s").
  static ParallelConfig parse(const std::string& plan, const std::string& devices, int rank,
                              const std::string& rendezvous = "127.0.0.1:29500", const std::string& timeout = "30s");

  Plan plan() const { return plan_; }
  int world_size() const { return static_cast<int>(devices_.size()); }
  int rank() const { return rank_; }
  /// This rank's device.
  c10::Device device() const { return devices_[static_cast<size_t>(rank_)]; }
  const std::vector<c10::Device>& devices() const { return devices_; }
  const Endpoint& rendezvous() const { return rendezvous_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  bool is_first() const { return rank_ == 0; }
  bool is_last() const { return rank_ == world_size() - 1; }
  /// The same world seen from another rank (validated).
  ParallelConfig with_rank(int rank) const;
  /// The same world meeting at another port (e.g. the one rank 0 got for port 0).
  ParallelConfig with_port(uint16_t port) const;
  /// "stage rank 1/4 on cpu, rendezvous 127.0.0.1:29500, timeout 30 s"
  std::string describe() const;

 private:
  Plan plan_ = Plan::kSingle;
  std::vector<c10::Device> devices_;
  int rank_ = 0;
  Endpoint rendezvous_;
  std::chrono::milliseconds timeout_ = kDefaultTimeout;
};

}  // namespace liveavatar::parallel
