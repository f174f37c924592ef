// The step and stage plans, one rank at a time. SPDX-License-Identifier: LGPL-2.1-or-later
#include "parallel/plans.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>

#include "parallel/messages.h"

namespace liveavatar::parallel {

class ReturnReceiver;

struct RankSession::State {
  dit::StreamState stream;               // this rank's layers: text K/V, sink K/V, rings
  std::vector<dit::RopeSegment> segments;  // the sink's RoPE layout (rank 0 prepares the calls)
  dit::Schedule schedule;
  int64_t capacity = 0;      // ring tokens
  int64_t frame_tokens = 0;
  int64_t block = 0;         // blocks generated
  bool ready = false;        // set_condition completed
  // Rank 0 (and, for step, every rank: each prefills its own sink).
  at::Tensor ref, motion, refresh_motion;
  at::Tensor clip_noise;
  int64_t noise_clip = -1;   // the clip clip_noise was drawn for
  double busy = 0;           // seconds computing
  std::unique_ptr<ReturnReceiver> receiver;  // rank 0, pipelined stage and step plans
};

// Rank 0's receiver of what the last rank sends back on the return channel (stage: each item's velocity; step: each
// block's denoised latents), on a thread of its own: rank 0 sends the next item down the pipeline while the last
// rank sends back, and Gloo's transfers wait for the matching call on the other side. It posts a receive only for a
// tensor that is on its way (expect()), so an idle stream never runs into the timeout.
class ReturnReceiver {
 public:
  ReturnReceiver(Communicator& back, int from) : back_(back), from_(from), thread_([this] { run(); }) {}
  ~ReturnReceiver() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();  // a receive in progress ends within the communicator's timeout
  }
  void expect() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++expected_;
    }
    cv_.notify_all();
  }
  at::Tensor next() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !ready_.empty() || error_; });
    if (!ready_.empty()) {
      auto v = std::move(ready_.front());
      ready_.pop_front();
      return v;
    }
    std::rethrow_exception(error_);
  }

 private:
  void run() {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || (expected_ > 0 && !error_); });
        if (stop_) return;
        --expected_;
      }
      try {
        auto v = recv_tensors(back_, from_).at(0);
        std::lock_guard<std::mutex> lock(mu_);
        ready_.push_back(std::move(v));
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        error_ = std::current_exception();
      }
      cv_.notify_all();
    }
  }
  Communicator& back_;
  const int from_;
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t expected_ = 0;
  std::deque<at::Tensor> ready_;
  std::exception_ptr error_;
  bool stop_ = false;
  std::thread thread_;  // last: starts once the rest is built
};

namespace {

at::Tensor scalar_long(int64_t v) { return at::full({1}, v, at::kLong); }

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// A pipelined batch cancelled on rank 0 (SessionOptions::cancelled): rank 0 stops issuing work and sends this marker
// after what is in flight; each follower passes it on and leaves the batch (the stream is over: rank 0 throws
// Cancelled, and its next command starts a new stream or stops). Stage: block inputs of this step; step: an empty
// tensor list.
constexpr int64_t kCancelStep = -1;
struct FollowerCancelled {};

}  // namespace

RankSession::RankSession(const ParallelConfig& config, Communicator& comm, const dit::Model& model,
                         dit::SessionOptions options, Communicator* back)
    : config_(config),
      comm_(comm),
      model_(model),
      options_(std::move(options)),
      back_(back),
      state_(std::make_unique<State>()) {
  if (back_ && (back_->rank() != config_.rank() || back_->world_size() != config_.world_size() || back_ == &comm_))
    throw ParallelError("the return channel must be a second communicator of the same world (rank " +
                        std::to_string(config_.rank()) + " of " + std::to_string(config_.world_size()) + ")");
  if (comm_.rank() != config_.rank() || comm_.world_size() != config_.world_size())
    throw ParallelError("the communicator is rank " + std::to_string(comm_.rank()) + " of " +
                        std::to_string(comm_.world_size()) + ", the config rank " + std::to_string(config_.rank()) +
                        " of " + std::to_string(config_.world_size()));
  check_model();
  state_->schedule = dit::make_schedule(model_.config());
}

RankSession::~RankSession() = default;

void RankSession::check_model() const {
  const auto& cfg = model_.config();
  const int world = config_.world_size(), rank = config_.rank();
  switch (config_.plan()) {
    case Plan::kStep:
      if (world != cfg.sampling_steps)
        throw ParallelError("the step plan runs one denoising step per rank: " + std::to_string(cfg.sampling_steps) +
                            " ranks for " + std::to_string(cfg.sampling_steps) + " steps, got " +
                            std::to_string(world) + "; give " + std::to_string(cfg.sampling_steps) +
                            " devices, or choose parallel=stage");
      if (model_.first_layer() != 0 || model_.last_layer() != cfg.num_layers || !model_.has_embeddings() ||
          !model_.has_head())
        throw ParallelError("the step plan needs the whole DiT on every rank; rank " + std::to_string(rank) +
                            " holds layers " + std::to_string(model_.first_layer()) + ".." +
                            std::to_string(model_.last_layer()));
      break;
    case Plan::kStage: {
      const auto [first, last] = stage_layers(cfg.num_layers, rank, world);
      if (model_.first_layer() != first || model_.last_layer() != last)
        throw ParallelError("stage rank " + std::to_string(rank) + " of " + std::to_string(world) +
                            " must hold layers [" + std::to_string(first) + ", " + std::to_string(last) +
                            "), its model holds [" + std::to_string(model_.first_layer()) + ", " +
                            std::to_string(model_.last_layer()) + "); build it with LoadOptions first_layer / "
                            "last_layer from stage_layers()");
      if (rank == 0 && !model_.has_embeddings())
        throw ParallelError("stage rank 0 must hold the embeddings");
      if (rank == world - 1 && !model_.has_head())
        throw ParallelError("stage rank " + std::to_string(rank) + " (the last) must hold the head");
      break;
    }
    case Plan::kSingle:
    case Plan::kAuto:
      throw ParallelError(std::string("RankSession runs the step and stage plans, not \"") +
                          plan_name(config_.plan()) + "\" (single: dit::Session; auto: resolve it with the planner)");
  }
}

int64_t RankSession::blocks_done() const { return state_->block; }

double RankSession::busy_seconds() const { return state_->busy; }

void RankSession::set_refresh_motion(const at::Tensor& motion_latents) { state_->refresh_motion = motion_latents; }

// The same offsets dit::Session draws.
int64_t RankSession::rope_offset(int64_t call) const { return dit::rope_offset_of_call(model_.config(), options_, call); }

void RankSession::set_condition(const at::Tensor& ref_latent, const at::Tensor& motion_latents,
                                const at::Tensor& text_context) {
  at::NoGradGuard no_grad;
  if (config_.is_first() &&
      (!ref_latent.defined() || ref_latent.dim() != 4 || ref_latent.size(2) % 8 != 0 || ref_latent.size(3) % 8 != 0))
    throw ParallelError("reference latent [C, 1, H, W] needs H and W multiples of 8 (FramePack 4x bucket), got " +
                        (ref_latent.defined() ? c10::str(ref_latent.sizes()) : std::string("none")));
  state_->ready = false;
  if (config_.plan() == Plan::kStep) step_set_condition(ref_latent, motion_latents, text_context);
  else stage_set_condition(ref_latent, motion_latents, text_context);
  state_->block = 0;
  state_->noise_clip = -1;
  state_->busy = 0;
  state_->ready = true;
}

dit::BlockResult RankSession::generate_block(const at::Tensor& audio) {
  at::NoGradGuard no_grad;
  if (!state_->ready) throw ParallelError("generate_block before set_condition: the sink must be prefilled first");
  if (config_.is_first() && !audio.defined()) throw ParallelError("rank 0 needs the block's audio features");
  auto result = config_.plan() == Plan::kStep ? step_block(audio, /*pipelined=*/false) : stage_block(audio);
  ++state_->block;
  return result;
}

// ---------------------------------------------------------------------------------------------------------------
// step: rank s runs denoising step s of every block with the full model
// ---------------------------------------------------------------------------------------------------------------

void RankSession::step_set_condition(const at::Tensor& ref, const at::Tensor& motion, const at::Tensor& text) {
  auto& st = *state_;
  const int rank = config_.rank();
  std::vector<at::Tensor> in{ref, motion, text};
  if (rank > 0) in = recv_tensors(comm_, rank - 1);
  if (!config_.is_last()) send_tensors(comm_, in, rank + 1);
  const auto& cfg = model_.config();
  st.ref = in[0];
  st.motion = in[1];
  st.frame_tokens = (st.ref.size(2) / cfg.patch_size[1]) * (st.ref.size(3) / cfg.patch_size[2]);
  st.stream = model_.new_state(st.frame_tokens, options_.kv_dtype);
  // Only the ring of this rank's step is used: free the others.
  for (size_t i = 0; i < st.stream.rings.size(); ++i)
    if (static_cast<int>(i) != rank) st.stream.rings[i].layers.clear();
  st.capacity = st.stream.rings[static_cast<size_t>(rank)].capacity;
  model_.set_text(model_.embed_text(in[2]), st.stream);
  auto sink = model_.prepare_sink(st.ref, st.motion);
  model_.prefill(sink, st.stream);
  st.segments = sink.segments;
}

dit::BlockResult RankSession::step_block(const at::Tensor& audio, bool pipelined) {
  auto& st = *state_;
  const auto& cfg = model_.config();
  const int rank = config_.rank(), world = config_.world_size();
  const int64_t per_clip = cfg.clip_frames / cfg.frames_per_block;
  const int64_t clip = st.block / per_clip, in_clip = st.block % per_clip;
  const bool refresh = in_clip == 0 && clip == 1 && options_.roll_sink;

  at::Tensor a, latents;
  if (rank == 0) {
    a = audio.dim() == 3 ? audio.unsqueeze(0) : audio;
    if (in_clip == 0) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(options_.seed + static_cast<uint64_t>(clip));
      st.clip_noise = at::randn({cfg.in_dim, cfg.clip_frames, st.ref.size(2), st.ref.size(3)}, gen,
                                at::TensorOptions().dtype(model_.dtype()));
    }
    latents = st.clip_noise.slice(1, in_clip * cfg.frames_per_block, (in_clip + 1) * cfg.frames_per_block);
    if (refresh && st.refresh_motion.defined()) st.motion = st.refresh_motion;
  } else {
    auto msg = recv_tensors(comm_, rank - 1);
    if (msg.empty() && pipelined) {  // rank 0 cancelled the batch: pass it on, leave
      if (rank + 1 < world) send_tensors(comm_, {}, rank + 1);
      throw FollowerCancelled{};
    }
    if (msg.size() < 2)
      throw ParallelError("rank " + std::to_string(rank) + " expected a block from rank " + std::to_string(rank - 1) +
                          " and got " + std::to_string(msg.size()) + " tensors: the ranks are out of step; restart "
                          "every rank");
    a = msg[0];
    latents = msg[1];
    if (refresh) {
      st.ref = msg[2];
      st.motion = msg[3];
    }
  }
  const auto t0 = Clock::now();  // computing from here (the receive above is waiting)
  if (refresh) {
    // Rolling sink: every rank holds its own copy, refreshed with the first latent frame of clip 0.
    auto sink = model_.prepare_sink(st.ref, st.motion);
    model_.prefill(sink, st.stream);
    st.segments = sink.segments;
  }
  latents = latents.to(model_.device());
  const int64_t current_start = st.block * cfg.frames_per_block * st.frame_tokens;
  const int64_t offset = rope_offset(st.block * cfg.sampling_steps + rank);
  const double t = st.schedule.timesteps[rank].item<double>();
  auto in = model_.prepare(latents, t, a, st.segments, current_start, offset, st.capacity);
  model_.run_layers(in, st.stream, rank);
  const auto velocity = model_.head(in);
  latents = dit::euler_step(latents, velocity, st.schedule, rank);

  st.busy += seconds_since(t0);

  dit::BlockResult result;
  result.velocities.push_back(velocity);
  result.rope_offsets.push_back(offset);
  if (rank + 1 < world) {
    std::vector<at::Tensor> msg{a, latents};
    if (refresh) msg.insert(msg.end(), {st.ref, st.motion});
    if (rank == 0 && pipelined) st.receiver->expect();  // this block's latents come back on the return channel
    send_tensors(comm_, msg, rank + 1);
  } else if (world > 1) {
    send_tensors(pipelined ? *back_ : comm_, {latents}, 0);
  }
  if (rank == 0) {
    // Pipelined, rank 0 goes on with the next block; step_pipeline_first() collects the latents.
    if (!pipelined) {
      result.latents = world > 1 ? recv_tensors(comm_, world - 1).at(0).to(model_.device()) : latents;
      if (clip == 0 && in_clip == 0) st.ref = result.latents.slice(1, 0, 1).clone();  // the next sink's reference
    }
  } else if (rank == world - 1) {
    result.latents = latents;
  }
  return result;
}

// Rank 0 of the pipelined step plan: step 0 of each block, handed to rank 1 at once, so rank s works on block b
// while rank s + 1 works on block b - 1 (upstream's TPP steady state: one forward per block per rank); the denoised
// latents come back from the last rank on the return channel, in block order.
std::vector<dit::BlockResult> RankSession::step_pipeline_first(const std::vector<at::Tensor>& audio) {
  auto& st = *state_;
  if (!st.receiver) st.receiver = std::make_unique<ReturnReceiver>(*back_, config_.world_size() - 1);
  std::vector<dit::BlockResult> results;
  const int64_t first = st.block;
  bool cancelled = false;
  for (const auto& a : audio) {
    if (options_.cancelled && options_.cancelled()) {
      cancelled = true;
      send_tensors(comm_, {}, 1);  // the blocks already issued finish on their ranks; the marker follows them
      break;
    }
    results.push_back(step_block(a, /*pipelined=*/true));
    ++st.block;
  }
  for (size_t k = 0; k < results.size(); ++k) {
    results[k].latents = st.receiver->next().to(model_.device());
    if (first + static_cast<int64_t>(k) == 0) st.ref = results[k].latents.slice(1, 0, 1).clone();  // the next sink's
  }
  if (cancelled) throw Cancelled();
  return results;
}

// ---------------------------------------------------------------------------------------------------------------
// stage: rank k runs its layer range for every step; the hidden state walks the pipeline
// ---------------------------------------------------------------------------------------------------------------

void RankSession::stage_set_condition(const at::Tensor& ref, const at::Tensor& motion, const at::Tensor& text) {
  auto& st = *state_;
  const int rank = config_.rank();
  const auto& cfg = model_.config();
  // The embedded text and the token count travel down the pipeline; each stage caches its layers' text K/V.
  std::vector<at::Tensor> msg;
  if (rank == 0) {
    const int64_t ft = (ref.size(2) / cfg.patch_size[1]) * (ref.size(3) / cfg.patch_size[2]);
    msg = {model_.embed_text(text), scalar_long(ft)};
  } else {
    msg = recv_tensors(comm_, rank - 1);
  }
  if (!config_.is_last()) send_tensors(comm_, msg, rank + 1);
  st.frame_tokens = msg[1].cpu().item<int64_t>();
  st.stream = model_.new_state(st.frame_tokens, options_.kv_dtype);
  st.capacity = st.stream.rings.front().capacity;
  model_.set_text(msg[0].to(model_.device()), st.stream);
  if (rank == 0) {
    st.ref = ref;
    st.motion = motion;
  }
  stage_prefill(st.ref, st.motion);
}

void RankSession::stage_prefill(const at::Tensor& ref, const at::Tensor& motion) {
  auto& st = *state_;
  const int rank = config_.rank();
  dit::SinkInputs in = rank == 0 ? model_.prepare_sink(ref, motion) : recv_sink_inputs(comm_, rank - 1, model_.device());
  model_.prefill(in, st.stream);
  if (!config_.is_last()) send_sink_inputs(comm_, in, rank + 1);
  st.segments = in.segments;
}

dit::BlockResult RankSession::stage_block(const at::Tensor& audio) {
  auto& st = *state_;
  const auto& cfg = model_.config();
  const int rank = config_.rank(), world = config_.world_size();
  const int64_t per_clip = cfg.clip_frames / cfg.frames_per_block;
  const int64_t clip = st.block / per_clip, in_clip = st.block % per_clip;
  if (in_clip == 0 && clip == 1 && options_.roll_sink) {
    // Rolling sink: the refreshed conditioning runs through every stage before the block.
    if (rank == 0 && st.refresh_motion.defined()) st.motion = st.refresh_motion;
    stage_prefill(st.ref, st.motion);
  }
  dit::BlockResult result;
  if (rank == 0) {
    const auto a = audio.dim() == 3 ? audio.unsqueeze(0) : audio;
    if (in_clip == 0) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(options_.seed + static_cast<uint64_t>(clip));
      st.clip_noise = at::randn({cfg.in_dim, cfg.clip_frames, st.ref.size(2), st.ref.size(3)}, gen,
                                at::TensorOptions().dtype(model_.dtype()));
    }
    auto latents = st.clip_noise.slice(1, in_clip * cfg.frames_per_block, (in_clip + 1) * cfg.frames_per_block)
                       .to(model_.device());
    const int64_t current_start = st.block * cfg.frames_per_block * st.frame_tokens;
    for (int64_t i = 0; i < cfg.sampling_steps; ++i) {
      const int64_t offset = rope_offset(st.block * cfg.sampling_steps + i);
      result.rope_offsets.push_back(offset);
      const double t = st.schedule.timesteps[i].item<double>();
      auto in = model_.prepare(latents, t, a, st.segments, current_start, offset, st.capacity);
      model_.run_layers(in, st.stream, i);
      at::Tensor velocity;
      if (world == 1) {
        velocity = model_.head(in);
      } else {
        send_block_inputs(comm_, in, 1);
        velocity = recv_tensors(comm_, world - 1).at(0).to(model_.device());
      }
      result.velocities.push_back(velocity);
      latents = dit::euler_step(latents, velocity, st.schedule, i);
    }
    if (clip == 0 && in_clip == 0) st.ref = latents.slice(1, 0, 1).clone();  // the next sink's reference
    result.latents = latents;
  } else {
    for (int64_t i = 0; i < cfg.sampling_steps; ++i) {
      auto in = recv_block_inputs(comm_, rank - 1, model_.device());
      model_.run_layers(in, st.stream, i);
      if (rank + 1 < world) {
        send_block_inputs(comm_, in, rank + 1);
      } else {
        const auto velocity = model_.head(in);
        result.velocities.push_back(velocity);
        send_tensors(comm_, {velocity}, 0);
      }
    }
  }
  return result;
}

// ---------------------------------------------------------------------------------------------------------------
// Several blocks: pipelined under stage with a return channel (see plans.h), else one after the other
// ---------------------------------------------------------------------------------------------------------------


bool RankSession::refresh_before(int64_t block) const {
  const auto& cfg = model_.config();
  return options_.roll_sink && block == cfg.clip_frames / cfg.frames_per_block;  // the first block of clip 1
}

std::vector<dit::BlockResult> RankSession::generate_blocks(const std::vector<at::Tensor>& audio) {
  at::NoGradGuard no_grad;
  if (!state_->ready) throw ParallelError("generate_blocks before set_condition: the sink must be prefilled first");
  std::vector<dit::BlockResult> out;
  const bool pipelined = back_ && config_.world_size() > 1;
  if (!pipelined) {
    for (const auto& a : audio) out.push_back(generate_block(a));
    return out;
  }
  if (config_.is_first())
    for (const auto& a : audio)
      if (!a.defined()) throw ParallelError("rank 0 needs the audio features of every block");
  auto& st = *state_;
  for (size_t i = 0; i < audio.size();) {
    // A batch never runs across the sink refresh: the blocks before it attend to the old sink (and, under step,
    // the refresh needs block 0's denoised latents back on rank 0).
    size_t j = i + 1;
    while (j < audio.size() && !refresh_before(st.block + static_cast<int64_t>(j - i))) ++j;
    if (config_.plan() == Plan::kStep) {
      const std::vector<at::Tensor> part(audio.begin() + static_cast<std::ptrdiff_t>(i),
                                         audio.begin() + static_cast<std::ptrdiff_t>(j));
      if (config_.is_first()) {
        for (auto& r : step_pipeline_first(part)) out.push_back(std::move(r));
      } else {
        try {
          for (const auto& a : part) {
            out.push_back(step_block(a, /*pipelined=*/true));
            ++st.block;
          }
        } catch (const FollowerCancelled&) {
          st.ready = false;  // the stream ends here; rank 0's next command starts another
          return out;
        }
      }
      i = j;
      continue;
    }
    if (refresh_before(st.block)) {
      if (config_.is_first() && st.refresh_motion.defined()) st.motion = st.refresh_motion;
      const auto t0 = Clock::now();
      stage_prefill(st.ref, st.motion);
      st.busy += seconds_since(t0);  // mostly compute (the prefill is a short pass)
    }
    if (config_.is_first()) {
      auto part = stage_pipeline_first(std::vector<at::Tensor>(audio.begin() + static_cast<std::ptrdiff_t>(i),
                                                               audio.begin() + static_cast<std::ptrdiff_t>(j)));
      for (auto& r : part) out.push_back(std::move(r));
    } else {
      if (!stage_pipeline_follow(j - i)) {
        st.ready = false;  // cancelled on rank 0: the stream ends here; rank 0's next command starts another
        return out;
      }
      out.resize(j);
    }
    st.block += static_cast<int64_t>(j - i);
    i = j;
  }
  return out;
}

std::vector<dit::BlockResult> RankSession::stage_pipeline_first(const std::vector<at::Tensor>& audio) {
  auto& st = *state_;
  const auto& cfg = model_.config();
  const int world = config_.world_size();
  const int64_t per_clip = cfg.clip_frames / cfg.frames_per_block;
  const size_t k_blocks = audio.size();
  if (!st.receiver) st.receiver = std::make_unique<ReturnReceiver>(*back_, world - 1);
  std::vector<dit::BlockResult> results(k_blocks);
  std::vector<at::Tensor> latents(k_blocks), a(k_blocks);
  std::vector<int64_t> current(k_blocks);
  for (size_t k = 0; k < k_blocks; ++k) {
    const int64_t block = st.block + static_cast<int64_t>(k);
    const int64_t clip = block / per_clip, in_clip = block % per_clip;
    if (clip != st.noise_clip) {  // the same seeded draw per clip as dit::Session
      auto gen = at::make_generator<at::CPUGeneratorImpl>(options_.seed + static_cast<uint64_t>(clip));
      st.clip_noise = at::randn({cfg.in_dim, cfg.clip_frames, st.ref.size(2), st.ref.size(3)}, gen,
                                at::TensorOptions().dtype(model_.dtype()));
      st.noise_clip = clip;
    }
    latents[k] = st.clip_noise.slice(1, in_clip * cfg.frames_per_block, (in_clip + 1) * cfg.frames_per_block)
                     .to(model_.device());
    a[k] = audio[k].dim() == 3 ? audio[k].unsqueeze(0) : audio[k];
    current[k] = block * cfg.frames_per_block * st.frame_tokens;
  }
  // (k, s): embeddings and this rank's layers, then down the pipeline; its velocity comes back on the receiver.
  auto issue = [&](size_t k, int64_t s) {
    const auto t0 = Clock::now();
    const int64_t offset = rope_offset((st.block + static_cast<int64_t>(k)) * cfg.sampling_steps + s);
    results[k].rope_offsets.push_back(offset);
    const double t = st.schedule.timesteps[s].item<double>();
    auto in = model_.prepare(latents[k], t, a[k], st.segments, current[k], offset, st.capacity);
    model_.run_layers(in, st.stream, s);
    st.busy += seconds_since(t0);
    st.receiver->expect();
    send_block_inputs(comm_, in, 1, s);
  };
  // Cancelled (asked before each item is issued, so with items left): the marker goes down the pipeline after the
  // items in flight, whose velocities are still received; nothing more is issued.
  bool cancelled = false;
  auto cancel_now = [&] {
    if (cancelled || !options_.cancelled || !options_.cancelled()) return cancelled;
    cancelled = true;
    send_block_inputs(comm_, dit::BlockInputs{}, 1, kCancelStep);
    return true;
  };
  std::deque<std::pair<size_t, int64_t>> in_flight;
  for (size_t k = 0; k < k_blocks && !cancel_now(); ++k) {
    issue(k, 0);
    in_flight.emplace_back(k, 0);
  }
  while (!in_flight.empty()) {
    const auto [k, s] = in_flight.front();
    in_flight.pop_front();
    const auto velocity = st.receiver->next().to(model_.device());
    if (cancelled) continue;
    const auto t0 = Clock::now();
    results[k].velocities.push_back(velocity);
    latents[k] = dit::euler_step(latents[k], velocity, st.schedule, s);
    st.busy += seconds_since(t0);
    if (s + 1 < cfg.sampling_steps && !cancel_now()) {
      issue(k, s + 1);
      in_flight.emplace_back(k, s + 1);
    }
  }
  if (cancelled) throw Cancelled();
  for (size_t k = 0; k < k_blocks; ++k) {
    results[k].latents = latents[k];
    if (st.block + static_cast<int64_t>(k) == 0) st.ref = latents[k].slice(1, 0, 1).clone();  // the next sink's ref
  }
  return results;
}

bool RankSession::stage_pipeline_follow(size_t blocks) {
  auto& st = *state_;
  const auto& cfg = model_.config();
  const int rank = config_.rank(), world = config_.world_size();
  const int64_t items = static_cast<int64_t>(blocks) * cfg.sampling_steps;
  for (int64_t i = 0; i < items; ++i) {
    int64_t step = -2;
    auto in = recv_block_inputs(comm_, rank - 1, model_.device(), &step);
    if (step == kCancelStep) {  // rank 0 cancelled the batch after the items before this one: pass it on, leave
      if (rank + 1 < world) send_block_inputs(comm_, dit::BlockInputs{}, rank + 1, kCancelStep);
      return false;
    }
    if (step < 0 || step >= cfg.sampling_steps)
      throw ParallelError("rank " + std::to_string(rank) + " got an item of step " + std::to_string(step) +
                          " from rank " + std::to_string(rank - 1) + ": the ranks are out of step; restart every rank");
    const auto t0 = Clock::now();
    model_.run_layers(in, st.stream, step);
    if (rank + 1 < world) {
      st.busy += seconds_since(t0);
      send_block_inputs(comm_, in, rank + 1, step);
    } else {
      const auto velocity = model_.head(in);
      st.busy += seconds_since(t0);
      send_tensors(*back_, {velocity}, 0);
    }
  }
  return true;
}

}  // namespace liveavatar::parallel
