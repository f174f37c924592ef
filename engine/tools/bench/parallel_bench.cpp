// liveavatar-bench --plan: the DiT stream under a parallel plan against `single` in the same run, with the same total
// CPU cores (single: N intra-op threads; N ranks: one each), on a medium random-weight DiT (every rank's shard cut
// from the same weights). Ranks are threads joined over Gloo on loopback, as the element runs devices=cpu:N.
// Reported (JSON): blocks per second in the steady state, time to the first block, each rank's idle share in the
// steady state (the pipeline bubble) and the bytes per hop per block, and the throughput ratio plan / single.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dit/dit.h"
#include "dit/model.h"
#include "liveavatar/engine.h"
#include "parallel/driver.h"
#include "parallel/plans.h"

namespace {

using namespace liveavatar;
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

const char kUsage[] =
    "usage: liveavatar-bench --plan single|step|stage [--devices cpu:N] [options]\n"
    "  Streams blocks through a random-weight DiT under single with the same total cores (N intra-op threads), on\n"
    "  one thread, and under the plan (N ranks of one thread each), and prints one JSON line: each run's blocks/s\n"
    "  after the first block, time to the first block, idle share per rank (the pipeline bubble) and bytes per\n"
    "  hop per block (rank k -> k + 1; the last entry: N-1 -> 0), and throughput_ratio = plan / single.\n"
    "  --devices cpu:N   ranks (default cpu:2; step needs cpu:4)\n"
    "  --blocks B        blocks per stream (default 9: the first alone, for the time to the first block, then\n"
    "                    batches of N as a backlog gives them)\n"
    "  --dim D --ffn F --heads H --layers L   the DiT's shape (default 512, 2048, 8, 8: the medium config)\n"
    "  --latent HxW      latent size per frame (default 16x32: 128x256 pixels)\n"
    "  --json FILE       also write the JSON there\n";

struct Options {
  std::string plan = "stage";
  std::string devices = "cpu:2";
  int blocks = 9;
  int64_t dim = 512, ffn = 2048, heads = 8, layers = 8, lat_h = 16, lat_w = 32;
  std::string json;
};

long number(const std::string& flag, const std::string& text, long lo, long hi) {
  char* end = nullptr;
  const long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end || v < lo || v > hi)
    throw Error(flag + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" +
                text + "'");
  return v;
}

struct Inputs {
  at::Tensor ref, motion, text;
  std::vector<at::Tensor> audio;
};

struct Result {
  std::string plan;
  int ranks = 1;
  int threads_per_rank = 1;
  double first_block_s = 0;     // the stream's first block, alone (what the first frame waits for)
  double steady_blocks = 0;     // blocks after the first
  double steady_s = 0;
  double blocks_per_s() const { return steady_s > 0 ? steady_blocks / steady_s : 0; }
  std::vector<double> idle_share;    // per rank, steady state: 1 - busy / wall
  std::vector<double> hop_bytes;     // per block: hop k -> k + 1 (last: N-1 -> 0), steady state
};

// The batches a backlog gives: the first block alone, then `ranks` at a time.
std::vector<size_t> batches(int blocks, int ranks) {
  std::vector<size_t> out{1};
  for (int left = blocks - 1; left > 0; left -= ranks) out.push_back(static_cast<size_t>(std::min(left, ranks)));
  return out;
}

Result run_single(const dit::Model& model, const Inputs& in, int threads, const dit::SessionOptions& so) {
  at::set_num_threads(threads);
  Result r;
  r.plan = "single";
  r.threads_per_rank = threads;
  dit::Session s(model, so);
  s.set_condition(in.ref, in.motion, in.text);
  auto t0 = Clock::now();
  s.generate_block(in.audio[0]);
  r.first_block_s = seconds_since(t0);
  t0 = Clock::now();
  for (size_t b = 1; b < in.audio.size(); ++b) s.generate_block(in.audio[b]);
  r.steady_s = seconds_since(t0);
  r.steady_blocks = static_cast<double>(in.audio.size() - 1);
  r.idle_share = {0.0};
  return r;
}

Result run_plan(parallel::Plan plan, const std::vector<std::unique_ptr<dit::Model>>& models, int world,
                const Inputs& in, const dit::SessionOptions& so) {
  Result r;
  r.plan = parallel::plan_name(plan);
  r.ranks = world;
  const auto cfg0 = parallel::ParallelConfig(plan, std::vector<c10::Device>(static_cast<size_t>(world), c10::kCPU),
                                             0, parallel::Endpoint{"127.0.0.1", 0}, std::chrono::seconds(600));
  auto host = parallel::Rendezvous::open(cfg0);
  const auto cfg = cfg0.with_port(host.port());
  const auto plan_batches = batches(static_cast<int>(in.audio.size()), world);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world));
  std::vector<double> busy(static_cast<size_t>(world)), wall(static_cast<size_t>(world));
  std::vector<uint64_t> sent(static_cast<size_t>(world));
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        at::set_num_threads(1);  // one core per rank: the same total as single's threads
        c10::NoGradGuard no_grad;
        const auto rc = cfg.with_rank(rank);
        auto rv = rank == 0 ? host : parallel::Rendezvous::open(rc);
        auto ch = parallel::connect_channels(rc, rv);
        const auto& model = *models[plan == parallel::Plan::kStep ? 0 : static_cast<size_t>(rank)];
        parallel::RankSession s(rc, *ch.pipeline, model, so, ch.back.get());
        const bool first = rank == 0;
        s.set_condition(first ? in.ref : at::Tensor(), first ? in.motion : at::Tensor(),
                        first ? in.text : at::Tensor());
        size_t next = 0;
        double busy0 = 0;
        uint64_t sent0 = 0;
        Clock::time_point steady;
        for (size_t i = 0; i < plan_batches.size(); ++i) {
          std::vector<at::Tensor> audio(plan_batches[i]);
          if (first)
            for (size_t k = 0; k < audio.size(); ++k) audio[k] = in.audio[next + k];
          const auto t0 = Clock::now();
          s.generate_blocks(audio);
          next += plan_batches[i];
          if (i == 0) {
            if (first) r.first_block_s = seconds_since(t0);
            steady = Clock::now();
            busy0 = s.busy_seconds();
            sent0 = (rank + 1 == world && ch.back ? ch.back : ch.pipeline)->bytes_sent();
          }
        }
        wall[static_cast<size_t>(rank)] = seconds_since(steady);
        busy[static_cast<size_t>(rank)] = s.busy_seconds() - busy0;
        sent[static_cast<size_t>(rank)] = (rank + 1 == world && ch.back ? ch.back : ch.pipeline)->bytes_sent() - sent0;
      } catch (...) {
        errors[static_cast<size_t>(rank)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    if (e) std::rethrow_exception(e);
  r.steady_s = wall[0];
  r.steady_blocks = static_cast<double>(in.audio.size() - 1);
  for (int k = 0; k < world; ++k) {
    r.idle_share.push_back(wall[static_cast<size_t>(k)] > 0
                               ? 1.0 - busy[static_cast<size_t>(k)] / wall[static_cast<size_t>(k)]
                               : 0.0);
    r.hop_bytes.push_back(static_cast<double>(sent[static_cast<size_t>(k)]) / r.steady_blocks);
  }
  return r;
}

std::string json_of(const Result& r) {
  std::ostringstream o;
  o.setf(std::ios::fixed);
  o.precision(4);
  o << "{\"plan\": \"" << r.plan << "\", \"ranks\": " << r.ranks << ", \"threads_per_rank\": " << r.threads_per_rank
    << ", \"time_to_first_block_s\": " << r.first_block_s << ", \"steady_blocks\": " << r.steady_blocks
    << ", \"steady_s\": " << r.steady_s << ", \"blocks_per_s\": " << r.blocks_per_s() << ", \"idle_share\": [";
  for (size_t i = 0; i < r.idle_share.size(); ++i) o << (i ? ", " : "") << r.idle_share[i];
  o << "], \"bytes_per_hop_per_block\": [";
  o.precision(0);
  for (size_t i = 0; i < r.hop_bytes.size(); ++i) o << (i ? ", " : "") << r.hop_bytes[i];
  o << "]}";
  return o.str();
}

}  // namespace

int liveavatar_parallel_bench_main(int argc, char** argv) {
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Error(a + " needs a value\n" + kUsage);
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--plan") {
      opt.plan = value();
    } else if (a == "--devices") {
      opt.devices = value();
    } else if (a == "--blocks") {
      opt.blocks = static_cast<int>(number(a, value(), 2, 1000));
    } else if (a == "--dim") {
      opt.dim = number(a, value(), 16, 8192);
    } else if (a == "--ffn") {
      opt.ffn = number(a, value(), 16, 65536);
    } else if (a == "--heads") {
      opt.heads = number(a, value(), 1, 128);
    } else if (a == "--layers") {
      opt.layers = number(a, value(), 1, 128);
    } else if (a == "--latent") {
      const std::string v = value();
      const auto x = v.find('x');
      if (x == std::string::npos) throw Error("--latent expects HxW, got '" + v + "'");
      opt.lat_h = number(a, v.substr(0, x), 8, 512);
      opt.lat_w = number(a, v.substr(x + 1), 8, 512);
    } else if (a == "--json") {
      opt.json = value();
    } else {
      throw Error("unknown argument '" + a + "'\n" + kUsage);
    }
  }
  const auto plan = parallel::parse_plan(opt.plan);
  if (plan == parallel::Plan::kAuto) throw Error("--plan auto is the element's (the planner decides from memory); "
                                                 "the bench compares a given plan: single, step or stage");
  const auto devices = parallel::parse_devices(opt.devices);
  for (const auto& d : devices)
    if (!d.is_cpu()) throw Error("the bench runs CPU ranks (--devices cpu:N); GPU options come with the CUDA build");
  const int world = plan == parallel::Plan::kSingle ? 1 : static_cast<int>(devices.size());
  const int cores = static_cast<int>(devices.size());
  if (opt.lat_h % 8 || opt.lat_w % 8) throw Error("--latent needs H and W multiples of 8 (FramePack's 4x bucket)");

  c10::NoGradGuard no_grad;
  auto cfg = dit::ModelConfig::tiny();
  cfg.dim = opt.dim;
  cfg.ffn_dim = opt.ffn;
  cfg.num_heads = opt.heads;
  cfg.num_layers = opt.layers;
  cfg.audio_inject_layers.clear();
  for (int64_t l = 0; l < opt.layers; l += 2) cfg.audio_inject_layers.push_back(l);
  cfg.validate();
  if (plan == parallel::Plan::kStep && world != cfg.sampling_steps)
    throw Error("--plan step needs --devices cpu:" + std::to_string(cfg.sampling_steps) + " (one rank per step)");
  if (plan == parallel::Plan::kStage && (world < 2 || world > cfg.num_layers))
    throw Error("--plan stage needs 2 to " + std::to_string(cfg.num_layers) + " ranks (--devices cpu:N)");

  // One set of random weights; the shards are cut from it, so every plan computes the same function.
  const dit::Model full(cfg, c10::kCPU, at::kFloat, /*seed=*/7);
  weights::Checkpoint ckpt;
  for (const auto& p : full.module()->named_parameters()) ckpt.tensors[p.key()] = p.value();
  std::vector<std::unique_ptr<dit::Model>> models;
  if (plan == parallel::Plan::kStage) {
    for (int k = 0; k < world; ++k) {
      dit::LoadOptions lo;
      lo.precision = dit::Precision::kFp32;
      std::tie(lo.first_layer, lo.last_layer) = parallel::stage_layers(cfg.num_layers, k, world);
      models.push_back(std::make_unique<dit::Model>(cfg, ckpt, lo));
    }
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  Inputs in;
  in.ref = at::randn({cfg.in_dim, 1, opt.lat_h, opt.lat_w}, gen);
  in.motion = at::randn({cfg.in_dim, 19, opt.lat_h, opt.lat_w}, gen);
  in.text = at::randn({cfg.text_len, cfg.text_dim}, gen);
  for (int b = 0; b < opt.blocks; ++b)
    in.audio.push_back(at::randn({cfg.audio_layers, cfg.audio_dim, cfg.audio_frames_per_block()}, gen));
  dit::SessionOptions so;
  so.seed = 1;
  so.rope_seed = 2;

  std::fprintf(stderr, "liveavatar-bench: DiT dim %lld, ffn %lld, %lld layers, latent %lldx%lld, %d blocks; %s on %d "
               "CPU ranks vs single with %d threads\n",
               static_cast<long long>(cfg.dim), static_cast<long long>(cfg.ffn_dim),
               static_cast<long long>(cfg.num_layers), static_cast<long long>(opt.lat_h),
               static_cast<long long>(opt.lat_w), opt.blocks, opt.plan.c_str(), world, cores);
  const Result single = run_single(full, in, cores, so);
  // For reading the figures on a loaded machine (threads of one intra-op region wait for the slowest): single on
  // one core, the per-rank share.
  Result single_one = cores > 1 ? run_single(full, in, 1, so) : single;
  Result result = single;
  if (plan != parallel::Plan::kSingle) {
    if (plan == parallel::Plan::kStep) {
      // Every step rank holds the whole DiT: one immutable copy, shared by the rank threads.
      dit::LoadOptions lo;
      lo.precision = dit::Precision::kFp32;
      models.push_back(std::make_unique<dit::Model>(cfg, ckpt, lo));
    }
    result = run_plan(plan, models, world, in, so);
  }
  std::ostringstream o;
  o << "{\"config\": {\"dim\": " << cfg.dim << ", \"ffn_dim\": " << cfg.ffn_dim << ", \"layers\": "
    << cfg.num_layers << ", \"latent\": [" << opt.lat_h << ", " << opt.lat_w << "], \"blocks\": " << opt.blocks
    << ", \"cores\": " << cores << "}, \"single\": " << json_of(single)
    << ", \"single_one_thread\": " << json_of(single_one) << ", \"" << opt.plan << "\": " << json_of(result)
    << ", \"throughput_ratio\": ";
  o.setf(std::ios::fixed);
  o.precision(3);
  o << (single.blocks_per_s() > 0 ? result.blocks_per_s() / single.blocks_per_s() : 0.0) << "}\n";
  std::fputs(o.str().c_str(), stdout);
  if (!opt.json.empty()) {
    std::ofstream f(opt.json);
    if (!f) throw Error("cannot write " + opt.json);
    f << o.str();
  }
  return 0;
}
