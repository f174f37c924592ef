// gst-liveavatar parallel plans: one rank's part of a DiT stream under `step` (LiveAvatar's TPP) or `stage` (layer
// pipeline), over a Communicator. SPDX-License-Identifier: LGPL-2.1-or-later
//
// Work item (block b, denoising step s): (b, s) needs the latent of (b, s - 1) and, at each layer, the KV that
// earlier blocks wrote into the ring of step s.
//
//   step  (N = sampling steps)   rank s: full DiT, the ring of step s, its own copy of the sink.
//         rank 0 draws the noise and runs step 0; {audio, latent} go s -> s + 1 (with the new reference when the sink
//         rolls); rank N-1 sends the denoised latent back to rank 0.
//   stage (N <= layers)          rank k: layers [kL/N, (k+1)L/N) and their injectors, the rings of every step and
//         the sink K/V of its layers; embeddings on rank 0, head on rank N-1. Per step, the block inputs (hidden
//         state + the small per-call tensors) go k -> k + 1 and the velocity goes N-1 -> 0; the sink prefill (and its
//         refresh before clip 1) runs through every stage the same way.
//
// Every rank makes the same calls in the same order (set_condition, then generate_block per block or
// generate_blocks per batch); the inputs matter on rank 0 only, which returns the latents, the velocity of every step
// (stage) or of step 0 (step) and the RoPE offsets. Results equal dit::Session on one device (same seeds, same
// offsets).
//
// Pipelining (stage, with a return channel): generate_blocks(K blocks) keeps up to K items (b, s) in flight, one
// per block, so with K = N every stage works in the steady state. Rank 0 issues (b, 0) for each block, then, as the
// velocity of (b, s) comes back, the Euler step and (b, s + 1). Every stage processes items in arrival order, which
// is block order within each step, so each step's ring is written by block b before block b + 1 reads it: the same
// computation as one block after the other. The velocities return on a second communicator, received on rank 0 by
// a thread of its own (Gloo's transfers wait for the matching call, so rank 0 sending (b + 1, s) down the pipeline
// while the last stage sends (b, s)'s velocity back would otherwise wait on each other). The sink refresh before
// clip 1 starts a batch of its own (the blocks before it finish first: they attend to the old sink).
//
//   time ->     rank 0 (layers 0..L/2)        rank 1 (layers L/2..L + head)
//               (0,0) (1,0) (0,1) (1,1) ...
//                     (0,0) (1,0) (0,1) (1,1) ...       velocity of (b,s) -> rank 0 -> Euler -> (b,s+1)
//
// Pipelining (step, with a return channel): rank 0 runs step 0 of each block of the batch and hands it to rank 1
// at once; rank s runs step s of the blocks in order as they come, so with K >= N blocks rank s works on block b
// while rank s + 1 works on block b - 1 (upstream's TPP: one forward per block per rank in the steady state). The
// last rank sends each block's denoised latents back on the return channel. The refresh before clip 1 starts a
// batch of its own here too (rank 0 needs block 0's latents for the new reference).
//
//   time ->     rank 0: (0,0) (1,0) (2,0) (3,0)
//               rank 1:       (0,1) (1,1) (2,1) (3,1)
//               rank 2:             (0,2) (1,2) (2,2) (3,2)
//               rank 3:                   (0,3) (1,3) (2,3) (3,3) -> latents of each block back to rank 0
//
// Thread-safety: a RankSession is used by one thread; the Model may be shared (it is immutable).
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>

#include "dit/dit.h"
#include "parallel/communicator.h"
#include "parallel/config.h"

namespace liveavatar::parallel {

class RankSession {
 public:
  /// `model`: the full DiT (step) or this rank's shard, layers stage_layers(L, rank, world) (stage). Throws
  /// ParallelError when the plan, the world size or the model's layers do not fit.
  /// `back`: the return channel of the stage plan's velocities (a second communicator of the same world);
  /// without it generate_blocks() runs one block after the other.
  RankSession(const ParallelConfig& config, Communicator& comm, const dit::Model& model,
              dit::SessionOptions options = {}, Communicator* back = nullptr);
  ~RankSession();
  RankSession(const RankSession&) = delete;
  RankSession& operator=(const RankSession&) = delete;

  /// Rank 0: the inputs of dit::Session::set_condition; other ranks pass undefined tensors (they receive them).
  void set_condition(const at::Tensor& ref_latent, const at::Tensor& motion_latents, const at::Tensor& text_context);
  /// Rank 0: motion latents for the sink refresh before clip 1 (default: the previous ones).
  void set_refresh_motion(const at::Tensor& motion_latents);
  /// Rank 0: audio [audio_layers, audio_dim, 4 * frames_per_block]; other ranks: undefined.
  dit::BlockResult generate_block(const at::Tensor& audio);
  /// Several blocks, pipelined (stage with a return channel; else one after the other); equal to generate_block
  /// per block. Rank 0: one audio per block; other ranks: as many undefined tensors.
  std::vector<dit::BlockResult> generate_blocks(const std::vector<at::Tensor>& audio);
  int64_t blocks_done() const;
  /// Seconds this rank spent computing (not waiting for transfers) since set_condition: 1 - busy / wall is its idle
  /// share (the pipeline bubble).
  double busy_seconds() const;

 private:
  struct State;
  void check_model() const;
  int64_t rope_offset(int64_t call) const;
  void step_set_condition(const at::Tensor& ref, const at::Tensor& motion, const at::Tensor& text);
  /// `pipelined`: the last rank sends the latents back on the return channel and rank 0 does not wait for them.
  dit::BlockResult step_block(const at::Tensor& audio, bool pipelined);
  std::vector<dit::BlockResult> step_pipeline_first(const std::vector<at::Tensor>& audio);
  void stage_set_condition(const at::Tensor& ref, const at::Tensor& motion, const at::Tensor& text);
  void stage_prefill(const at::Tensor& ref, const at::Tensor& motion);
  dit::BlockResult stage_block(const at::Tensor& audio);
  bool refresh_before(int64_t block) const;
  std::vector<dit::BlockResult> stage_pipeline_first(const std::vector<at::Tensor>& audio);
  /// False when rank 0 cancelled the batch (its marker came instead of an item).
  bool stage_pipeline_follow(size_t blocks);

  ParallelConfig config_;
  Communicator& comm_;
  const dit::Model& model_;
  dit::SessionOptions options_;
  Communicator* back_ = nullptr;
  std::unique_ptr<State> state_;
};

}  // namespace liveavatar::parallel
