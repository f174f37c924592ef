// gst-liveavatar parallel runtime: rank 0 drives a world of ranks; the others follow its commands.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
// The ranks of a RankSession must make the same calls in the same order, but only rank 0 (the engine) knows when a
// stream starts, when a block's audio is ready and when everything stops. So rank 0 posts each call as a command in
// the rendezvous store (small text values under "driver/<n>"), then makes the call itself; a follower polls for
// command n, makes the same call with empty inputs (the tensors arrive over the Communicator) and moves to n + 1.
//
//   rank 0: Leader                                   rank r > 0: follow()
//     driver/0 = "hello <model fingerprint>"           compares it with its own model: a mismatch is an error
//     driver/1 = "condition <seed> <rope seed> ..."    new RankSession, set_condition({}, {}, {})
//     driver/2 = "blocks 2"                            generate_blocks(2 x {}) (stage: pipelined)
//     ...                                              ...
//     driver/n = "stop"                                returns
//
// The same code serves ranks that are threads of rank 0's process (World with local ranks: the engine's cpu:N) and
// ranks in liveavatar-worker processes on this or other hosts (World without local ranks: they join at the
// configured rendezvous). A follower notices rank 0's end when the store goes away; rank 0 notices a follower's end
// or silence in the next transfer (ParallelError naming the rank and parallel-timeout).
//
// Thread-safety: a World and its Leader are used by one thread (the engine's worker); follow() runs on its own.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "dit/dit.h"
#include "parallel/communicator.h"
#include "parallel/config.h"
#include "parallel/plans.h"

namespace liveavatar::parallel {

/// What every rank's model must agree on (plan, world, shape, dtype), as text: "stage x2, 40 layers of 5120, BFloat16".
std::string model_fingerprint(const ParallelConfig& config, const dit::Model& model);

/// Rank 0's side of a RankSession stream: posts each call for the followers, then makes it.
class Leader {
 public:
  /// `back`: the stage plan's return channel (pipelining), or null.
  Leader(const ParallelConfig& config, const Rendezvous& rendezvous, Communicator& comm, Communicator* back,
         const dit::Model& model);
  ~Leader();  // posts "stop" (best effort)
  Leader(const Leader&) = delete;
  Leader& operator=(const Leader&) = delete;

  /// A new stream on every rank (seed, RoPE seed, recorded offsets and roll_sink travel with the command).
  void set_condition(const at::Tensor& ref, const at::Tensor& motion, const at::Tensor& text,
                     const dit::SessionOptions& options);
  dit::BlockResult generate_block(const at::Tensor& audio);
  /// Several blocks at once (pipelined, every rank busy); the same results as generate_block each. When the
  /// options' `cancelled` says so between items, the work in flight finishes, the followers leave the stream and
  /// this throws Cancelled (the stream is over: set_condition starts the next).
  std::vector<dit::BlockResult> generate_blocks(const std::vector<at::Tensor>& audio);
  int64_t blocks_done() const;
  /// Posts "stop": the followers return from follow(). Idempotent.
  void stop();

 private:
  void post(const std::string& command);
  ParallelConfig config_;
  Rendezvous rendezvous_;
  Communicator& comm_;
  Communicator* back_;
  const dit::Model& model_;
  std::unique_ptr<RankSession> session_;
  int64_t next_ = 0;
  bool stopped_ = false;
};

/// Follows rank 0's commands on rank config.rank() > 0 until "stop" (returns) or a failure (throws ParallelError:
/// rank 0 gone, a transfer failed, a model that does not match rank 0's). `back`: the return channel, as rank 0's.
/// `stop`, when set, also ends it while it waits for a command.
void follow(const ParallelConfig& config, const Rendezvous& rendezvous, Communicator& comm, Communicator* back,
            const dit::Model& model, const std::atomic<bool>* stop = nullptr);

/// Every rank of a world connects these two, in this order: the pipeline and the return channel (step, stage).
/// NCCL when every rank is on a GPU (uses_nccl: tensors stay on the devices), else Gloo (tensors cross through host
/// memory).
struct Channels {
  std::unique_ptr<Communicator> pipeline;
  std::unique_ptr<Communicator> back;
};
bool uses_nccl(const ParallelConfig& config);
Channels connect_channels(const ParallelConfig& config, const Rendezvous& rendezvous);

/// Rank 0's world: hosts the rendezvous, starts the ranks this process holds as threads (each with its model),
/// connects (waiting for every rank at most the timeout) and leads. Without local ranks, ranks 1.. are
/// liveavatar-worker processes joining at config.rendezvous().
class World {
 public:
  using ModelOf = std::function<const dit::Model&(int rank)>;
  World(const ParallelConfig& config, const ModelOf& model_of, bool local_ranks);
  ~World();  // stops the followers and joins the local ranks (each returns within the timeout)
  World(const World&) = delete;
  World& operator=(const World&) = delete;

  Leader& leader() { return *leader_; }
  const ParallelConfig& config() const { return config_; }
  /// Empty while usable; else why not (a failed transfer breaks the world: build a new one).
  std::string broken() const;

 private:
  void join_local();
  ParallelConfig config_;
  std::unique_ptr<Rendezvous> rendezvous_;
  Channels channels_;
  std::unique_ptr<Leader> leader_;
  std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
};

}  // namespace liveavatar::parallel
