// A rank of a parallel plan in a process of its own (liveavatar-worker): it loads its part of the DiT from the same
// files as rank 0, joins rank 0's rendezvous and follows its commands (engine/src/parallel/driver.h).
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <functional>
#include <string>

#include "liveavatar/engine.h"

namespace liveavatar::neural {

struct WorkerOptions {
  int rank = 1;        // this worker's rank, 1 .. world - 1
  bool once = false;   // return after one world (rank 0 stopped or failed) instead of joining the next
  std::function<void(const std::string&)> log;  // progress lines ("rank 1: joined ..."); may be empty
  std::function<bool()> stop;                   // asked between attempts to join; true ends the worker
};

/// Uses config.model_dir, lora, precision, parallel (step or stage; auto is refused: rank 0 decides it from its
/// memory), devices (the whole world's, one per rank), rendezvous (rank 0's host:port) and parallel_timeout_ms.
/// Loads the weights once, then joins rank 0's world and follows it; when that world ends (rank 0 stopped, went away
/// or a transfer failed) it joins the next one at the same address, until options.stop() or, with options.once,
/// after the first. Throws Error on bad settings, files that do not load, or (once) a failed world.
void run_worker(const EngineConfig& config, const WorkerOptions& options);

}  // namespace liveavatar::neural
