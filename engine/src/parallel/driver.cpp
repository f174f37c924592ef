// Rank 0 drives, the other ranks follow (driver.h). SPDX-License-Identifier: LGPL-2.1-or-later
#include "parallel/driver.h"
#include "parallel/nccl_communicator.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <sstream>

namespace liveavatar::parallel {

namespace {

constexpr std::chrono::milliseconds kPollSlice{100};  // how often an idle follower looks at its stop flag

std::string key(int64_t n) { return "driver/" + std::to_string(n); }

std::string encode_options(const dit::SessionOptions& o) {
  std::ostringstream s;
  s << "condition " << o.seed << ' ' << o.rope_seed << ' ' << (o.roll_sink ? 1 : 0) << ' '
    << static_cast<int>(o.kv_dtype) << ' ' << o.rope_offsets.size();
  for (const auto v : o.rope_offsets) s << ' ' << v;
  return s.str();
}

dit::SessionOptions decode_options(const std::string& text) {
  std::istringstream s(text);
  std::string word;
  dit::SessionOptions o;
  int roll = 1, kv = 0;
  size_t n = 0;
  s >> word >> o.seed >> o.rope_seed >> roll >> kv >> n;
  if (!s || word != "condition" || kv < 0 || kv >= static_cast<int>(c10::ScalarType::NumOptions) || n > (1u << 20))
    throw ParallelError("rank 0 sent a condition command this rank cannot read: " + text.substr(0, 200));
  o.roll_sink = roll != 0;
  o.kv_dtype = static_cast<c10::ScalarType>(kv);  // checked by Model::new_state
  o.rope_offsets.resize(n);
  for (auto& v : o.rope_offsets) s >> v;
  if (!s) throw ParallelError("rank 0 sent a condition command this rank cannot read: " + text.substr(0, 200));
  return o;
}

}  // namespace

std::string model_fingerprint(const ParallelConfig& config, const dit::Model& model) {
  const auto& c = model.config();
  std::ostringstream s;
  s << plan_name(config.plan()) << " x" << config.world_size() << ", " << c.num_layers << " layers of " << c.dim
    << ", " << c.sampling_steps << " steps, " << c10::toString(model.dtype());
  return s.str();
}

// ---------------------------------------------------------------------------------------------------------------

bool uses_nccl(const ParallelConfig& config) {
  if (!nccl_built()) return false;
  for (const auto& d : config.devices())
    if (!d.is_cuda()) return false;
  return true;  // ParallelConfig holds each GPU once
}

Channels connect_channels(const ParallelConfig& config, const Rendezvous& rendezvous) {
  const bool nccl = uses_nccl(config);
  auto connect = [&](const std::string& group) {
    return nccl ? connect_nccl(config, rendezvous, group + "-nccl") : connect_gloo(config, rendezvous, group);
  };
  Channels c;
  c.pipeline = connect("liveavatar");
  if (config.plan() == Plan::kStage || config.plan() == Plan::kStep) c.back = connect("liveavatar-return");
  return c;
}

Leader::Leader(const ParallelConfig& config, const Rendezvous& rendezvous, Communicator& comm, Communicator* back,
               const dit::Model& model)
    : config_(config), rendezvous_(rendezvous), comm_(comm), back_(back), model_(model) {
  if (!config_.is_first()) throw ParallelError("the Leader is rank 0, this config is rank " +
                                               std::to_string(config_.rank()) + " (the others call follow())");
  post("hello " + model_fingerprint(config_, model_));
}

Leader::~Leader() {
  try {
    stop();
  } catch (...) {
    // The store is gone with rank 0's process anyway; nothing to tell the followers.
  }
}

void Leader::post(const std::string& command) {
  if (stopped_) throw ParallelError("the world of ranks was stopped: build a new one");
  rendezvous_.post(key(next_), command);
  ++next_;
}

void Leader::set_condition(const at::Tensor& ref, const at::Tensor& motion, const at::Tensor& text,
                           const dit::SessionOptions& options) {
  if (!comm_.broken().empty()) throw ParallelError(comm_.broken());
  session_.reset();
  post(encode_options(options));
  auto session = std::make_unique<RankSession>(config_, comm_, model_, options, back_);
  session->set_condition(ref, motion, text);
  session_ = std::move(session);
}

dit::BlockResult Leader::generate_block(const at::Tensor& audio) {
  if (!session_) throw ParallelError("generate_block before set_condition: the sink must be prefilled first");
  if (!comm_.broken().empty()) throw ParallelError(comm_.broken());
  post("block");
  return session_->generate_block(audio);
}

std::vector<dit::BlockResult> Leader::generate_blocks(const std::vector<at::Tensor>& audio) {
  if (!session_) throw ParallelError("generate_blocks before set_condition: the sink must be prefilled first");
  if (!comm_.broken().empty()) throw ParallelError(comm_.broken());
  if (back_ && !back_->broken().empty()) throw ParallelError(back_->broken());
  if (audio.empty()) return {};
  post("blocks " + std::to_string(audio.size()));
  try {
    return session_->generate_blocks(audio);
  } catch (const Cancelled&) {
    session_.reset();  // the followers left the stream with it: the next one starts with set_condition
    throw;
  }
}

int64_t Leader::blocks_done() const { return session_ ? session_->blocks_done() : 0; }

void Leader::stop() {
  if (stopped_) return;
  rendezvous_.post(key(next_), "stop");
  ++next_;
  stopped_ = true;
}

// ---------------------------------------------------------------------------------------------------------------

void follow(const ParallelConfig& config, const Rendezvous& rendezvous, Communicator& comm, Communicator* back,
            const dit::Model& model, const std::atomic<bool>* stop) {
  if (config.is_first()) throw ParallelError("rank 0 leads (Leader); follow() is for ranks 1 and up");
  std::unique_ptr<RankSession> session;
  const std::string mine = model_fingerprint(config, model);
  for (int64_t n = 0;; ++n) {
    std::string command;
    while (!rendezvous.poll(key(n), kPollSlice, &command))
      if (stop && stop->load()) return;
    if (command == "stop") return;
    if (command == "block") {
      if (!session) throw ParallelError("rank 0 sent a block before a condition: restart every rank");
      session->generate_block(at::Tensor());
    } else if (command.rfind("blocks ", 0) == 0) {
      if (!session) throw ParallelError("rank 0 sent blocks before a condition: restart every rank");
      const long count = std::strtol(command.c_str() + 7, nullptr, 10);
      if (count < 1 || count > 4096) throw ParallelError("rank 0 sent a command this rank cannot read: " + command);
      session->generate_blocks(std::vector<at::Tensor>(static_cast<size_t>(count)));
    } else if (command.rfind("condition ", 0) == 0) {
      session.reset();
      session = std::make_unique<RankSession>(config, comm, model, decode_options(command), back);
      session->set_condition(at::Tensor(), at::Tensor(), at::Tensor());
    } else if (command.rfind("hello ", 0) == 0) {
      const std::string theirs = command.substr(6);
      if (theirs != mine)
        throw ParallelError("rank " + std::to_string(config.rank()) + " holds a model that does not match rank 0's: "
                            "rank 0 runs " + theirs + ", this rank " + mine +
                            "; start every rank with the same model files, precision, parallel plan and devices");
    } else {
      throw ParallelError("rank 0 sent a command this rank does not know (\"" + command.substr(0, 80) +
                          "\"): are both built from the same version?");
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------

World::World(const ParallelConfig& config, const ModelOf& model_of, bool local_ranks) : config_(config) {
  if (!config.is_first()) throw ParallelError("a World is rank 0's; the other ranks call follow()");
  rendezvous_ = std::make_unique<Rendezvous>(Rendezvous::open(config_));
  config_ = config_.with_port(rendezvous_->port());
  if (local_ranks) {
    for (int r = 1; r < config_.world_size(); ++r) {
      const auto cfg = config_.with_rank(r);
      const dit::Model& model = model_of(r);
      threads_.emplace_back([this, cfg, &model] {
        try {
          auto rv = Rendezvous::open(cfg);
          auto ch = connect_channels(cfg, rv);
          follow(cfg, rv, *ch.pipeline, ch.back.get(), model, &stop_);
        } catch (const std::exception&) {
          // Rank 0 sees this rank's failure in its next transfer (named, within the timeout); nothing more to do.
        }
      });
    }
  }
  try {
    channels_ = connect_channels(config_, *rendezvous_);
    leader_ = std::make_unique<Leader>(config_, *rendezvous_, *channels_.pipeline, channels_.back.get(), model_of(0));
  } catch (...) {
    join_local();
    throw;
  }
}

World::~World() {
  try {
    if (leader_) leader_->stop();
  } catch (...) {
  }
  join_local();
}

void World::join_local() {
  stop_ = true;
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
}

std::string World::broken() const {
  if (!channels_.pipeline) return "not connected";
  if (!channels_.pipeline->broken().empty()) return channels_.pipeline->broken();
  return channels_.back ? channels_.back->broken() : "";
}

}  // namespace liveavatar::parallel
