// The step and stage plans reproduce dit::Session (`single`) on the tiny checkpoint: ranks as threads (2 and 4) and
// as processes, 5 blocks (ring wrap and the rolling-sink refresh before clip 1), every latent and velocity within
// fp32 tolerance. SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "../golden.h"
#include "../tiny_checkpoint.h"
#include "dit/dit.h"
#include "parallel/driver.h"
#include "parallel/plans.h"
#include "world.h"

namespace liveavatar::parallel::test {
namespace {

using golden::close;
using golden::kFp32;

// The tiny checkpoint family with 4 layers (injectors 0, 1, 3), so 4 stages hold a layer each; written to disk by
// the same make-tiny tool as testutil::tiny() (2 layers).
struct FourLayerCheckpoint {
  std::string dir;
  FourLayerCheckpoint() {
    char tmpl[] = "/tmp/liveavatar-par4-XXXXXX";
    dir = ::mkdtemp(tmpl);
    auto c = weights::ModelConfig::tiny();
    c.dit.num_layers = 4;
    c.dit.audio_inject_layers = {0, 1, 3};
    try {
      weights::make_tiny_checkpoint(dir, c, /*seed=*/3);
    } catch (...) {
      remove();  // a failed construction runs no destructor
      throw;
    }
  }
  void remove() const { (void)std::system(("rm -rf '" + dir + "'").c_str()); }
  ~FourLayerCheckpoint() { remove(); }
};

const std::string& four_layer_dir() {
  static FourLayerCheckpoint c;
  return c.dir;
}

dit::ModelConfig config_of(const std::string& dir) {
  return dit::ModelConfig::from_json_file(dir + "/" + weights::OfficialFiles::kDitConfig);
}

dit::LoadOptions fp32(int64_t first = 0, int64_t last = -1) {
  dit::LoadOptions o;
  o.precision = dit::Precision::kFp32;
  o.first_layer = first;
  o.last_layer = last;
  return o;
}

struct Inputs {
  at::Tensor ref, motion, text;
  std::vector<at::Tensor> audio;
};

Inputs make_inputs(const dit::ModelConfig& cfg, int blocks) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(21);
  Inputs in;
  in.ref = at::randn({16, 1, 8, 16}, gen);
  in.motion = at::randn({16, 19, 8, 16}, gen);
  in.text = at::randn({5, cfg.text_dim}, gen);
  for (int b = 0; b < blocks; ++b) in.audio.push_back(at::randn({cfg.audio_layers, cfg.audio_dim, 12}, gen));
  return in;
}

dit::SessionOptions options() {
  dit::SessionOptions o;
  o.seed = 3;
  o.rope_seed = 5;
  return o;
}

constexpr int kBlocks = 5;  // block 4 starts clip 1: sink refresh; the 12-frame rings wrap

std::vector<dit::BlockResult> single_stream(const std::string& dir, const Inputs& in, bool roll_sink = true) {
  dit::Model model(config_of(dir), dir + "/" + weights::OfficialFiles::kDitDir, fp32());
  auto o = options();
  o.roll_sink = roll_sink;
  dit::Session s(model, o);
  s.set_condition(in.ref, in.motion, in.text);
  std::vector<dit::BlockResult> out;
  for (const auto& a : in.audio) out.push_back(s.generate_block(a));
  return out;
}

// One rank's stream: rank 0 gives the inputs, the others nothing.
std::vector<dit::BlockResult> rank_stream(const ParallelConfig& cfg, Communicator& comm, const dit::Model& model,
                                          const Inputs& in) {
  RankSession s(cfg, comm, model, options());
  const bool first = cfg.is_first();
  s.set_condition(first ? in.ref : at::Tensor(), first ? in.motion : at::Tensor(), first ? in.text : at::Tensor());
  std::vector<dit::BlockResult> out;
  for (int b = 0; b < kBlocks; ++b) out.push_back(s.generate_block(first ? in.audio[static_cast<size_t>(b)] : at::Tensor()));
  EXPECT_EQ(s.blocks_done(), kBlocks);
  return out;
}

// The models of every rank of a plan, built from the checkpoint on disk.
std::vector<std::shared_ptr<dit::Model>> rank_models(const std::string& dir, Plan plan, int world) {
  const auto cfg = config_of(dir);
  const auto path = dir + "/" + weights::OfficialFiles::kDitDir;
  std::vector<std::shared_ptr<dit::Model>> models;
  if (plan == Plan::kStep) {
    auto full = std::make_shared<dit::Model>(cfg, path, fp32());
    models.assign(static_cast<size_t>(world), full);  // one immutable model shared by the rank threads
  } else {
    for (int k = 0; k < world; ++k) {
      const auto [a, b] = stage_layers(cfg.num_layers, k, world);
      models.push_back(std::make_shared<dit::Model>(cfg, path, fp32(a, b)));
    }
  }
  return models;
}

// Rank 0's latents (and velocities, offsets) against single; for step also rank s's velocity of step s.
void expect_matches_single(Plan plan, const std::vector<std::vector<dit::BlockResult>>& ranks,
                           const std::vector<dit::BlockResult>& single) {
  ASSERT_EQ(ranks.front().size(), single.size());
  for (size_t b = 0; b < single.size(); ++b) {
    const auto& r0 = ranks.front()[b];
    const std::string blk = "block " + std::to_string(b);
    EXPECT_TRUE(close(r0.latents, single[b].latents, blk + " latents", kFp32));
    if (plan == Plan::kStage) {
      ASSERT_EQ(r0.velocities.size(), single[b].velocities.size());
      for (size_t s = 0; s < r0.velocities.size(); ++s)
        EXPECT_TRUE(close(r0.velocities[s], single[b].velocities[s], blk + " step " + std::to_string(s), kFp32));
      EXPECT_EQ(r0.rope_offsets, single[b].rope_offsets) << blk;
      const auto& last = ranks.back()[b];
      ASSERT_EQ(last.velocities.size(), single[b].velocities.size());
      EXPECT_TRUE(close(last.velocities.back(), single[b].velocities.back(), blk + " last rank's step 3", kFp32));
    } else {
      for (size_t s = 0; s < ranks.size(); ++s) {
        ASSERT_EQ(ranks[s][b].velocities.size(), 1u);
        EXPECT_TRUE(close(ranks[s][b].velocities[0], single[b].velocities[s],
                          blk + " rank " + std::to_string(s) + " step " + std::to_string(s), kFp32));
        EXPECT_EQ(ranks[s][b].rope_offsets.at(0), single[b].rope_offsets.at(s)) << blk << " rank " << s;
      }
      EXPECT_TRUE(close(ranks.back()[b].latents, single[b].latents, blk + " last rank's latents", kFp32));
    }
  }
}

void run_plan_as_threads(const std::string& dir, Plan plan, int world) {
  const auto cfg = config_of(dir);
  const auto in = make_inputs(cfg, kBlocks);
  const auto single = single_stream(dir, in);
  // The refresh matters: without it block 4 differs, so the comparison covers it.
  const auto unrolled = single_stream(dir, in, /*roll_sink=*/false);
  EXPECT_TRUE(at::equal(unrolled[3].latents, single[3].latents));
  EXPECT_FALSE(at::allclose(unrolled[4].latents, single[4].latents, 1e-3, 1e-3));

  const auto models = rank_models(dir, plan, world);
  std::vector<std::vector<dit::BlockResult>> results(static_cast<size_t>(world));
  const auto errors = run_world(
      world,
      [&](int r, Communicator& comm) {
        const auto pc = loopback(world, r, 60s, plan);
        results[static_cast<size_t>(r)] = rank_stream(pc, comm, *models[static_cast<size_t>(r)], in);
      },
      60s, plan);
  expect_all_ok(errors);
  if (!::testing::Test::HasFailure()) expect_matches_single(plan, results, single);
}

TEST(PlanThreads, StageOfTwoOnTheTinyCheckpointEqualsSingle) { run_plan_as_threads(testutil::tiny().dir, Plan::kStage, 2); }
TEST(PlanThreads, StageOfTwoOnFourLayersEqualsSingle) { run_plan_as_threads(four_layer_dir(), Plan::kStage, 2); }
TEST(PlanThreads, StageOfFourEqualsSingle) { run_plan_as_threads(four_layer_dir(), Plan::kStage, 4); }
TEST(PlanThreads, StepOfFourOnTheTinyCheckpointEqualsSingle) { run_plan_as_threads(testutil::tiny().dir, Plan::kStep, 4); }

// Pipelined: rank 0 drives the other ranks (threads, World + Leader + follow()) and hands over several blocks at
// once, so up to one item per block is in flight, the velocities coming back on the return channel. The batches
// cross the sink refresh (block 4), which starts a batch of its own. Every latent, velocity and offset equals
// single's.
void run_pipelined(const std::string& dir, int world, const std::vector<size_t>& batches, Plan plan = Plan::kStage) {
  const auto cfg = config_of(dir);
  const auto in = make_inputs(cfg, kBlocks);
  const auto single = single_stream(dir, in);
  const auto models = rank_models(dir, plan, world);
  World w(loopback(world, 0, 60s, plan),
          [&](int r) -> const dit::Model& { return *models[static_cast<size_t>(r)]; }, /*local_ranks=*/true);
  // Twice: a second stream on the same world starts from block 0 again.
  for (int round = 0; round < 2; ++round) {
    w.leader().set_condition(in.ref, in.motion, in.text, options());
    std::vector<dit::BlockResult> got;
    size_t next = 0;
    for (const size_t n : batches) {
      std::vector<at::Tensor> audio(in.audio.begin() + static_cast<std::ptrdiff_t>(next),
                                    in.audio.begin() + static_cast<std::ptrdiff_t>(next + n));
      for (auto& r : w.leader().generate_blocks(audio)) got.push_back(std::move(r));
      next += n;
    }
    ASSERT_EQ(next, static_cast<size_t>(kBlocks));
    EXPECT_EQ(w.leader().blocks_done(), kBlocks);
    ASSERT_EQ(got.size(), single.size());
    for (size_t b = 0; b < single.size(); ++b) {
      const std::string blk = "round " + std::to_string(round) + " block " + std::to_string(b);
      EXPECT_TRUE(close(got[b].latents, single[b].latents, blk + " latents", kFp32));
      if (plan == Plan::kStep) {  // rank 0 returns the velocity of its own step
        ASSERT_EQ(got[b].velocities.size(), 1u) << blk;
        EXPECT_TRUE(close(got[b].velocities[0], single[b].velocities[0], blk + " step 0", kFp32));
        EXPECT_EQ(got[b].rope_offsets.at(0), single[b].rope_offsets.at(0)) << blk;
        continue;
      }
      ASSERT_EQ(got[b].velocities.size(), single[b].velocities.size()) << blk;
      for (size_t s = 0; s < got[b].velocities.size(); ++s)
        EXPECT_TRUE(close(got[b].velocities[s], single[b].velocities[s], blk + " step " + std::to_string(s), kFp32));
      EXPECT_EQ(got[b].rope_offsets, single[b].rope_offsets) << blk;
    }
  }
  EXPECT_EQ(w.broken(), "");
}

TEST(PlanThreads, PipelinedStageOfTwoEqualsSingle) { run_pipelined(testutil::tiny().dir, 2, {2, 3}); }
TEST(PlanThreads, PipelinedStageOfFourEqualsSingle) { run_pipelined(four_layer_dir(), 4, {1, 4}); }
// The step plan through the same driver, pipelined: rank s runs step s of block b while rank s + 1 runs block b - 1;
// batches of 2 and 3 (the second split at the refresh), then of 4 and 1.
TEST(PlanThreads, DrivenStepOfFourEqualsSingle) {
  run_pipelined(testutil::tiny().dir, 4, {2, 3}, Plan::kStep);
}
TEST(PlanThreads, PipelinedStepOfFourInABatchOfFourEqualsSingle) {
  run_pipelined(testutil::tiny().dir, 4, {4, 1}, Plan::kStep);
}

// Cancelled in the middle of a pipelined batch (the element flushing or stopping): rank 0 stops issuing after the
// n-th question, the work in flight finishes, the followers leave the stream, generate_blocks throws Cancelled
// within about one item's time, and the same world runs the next stream exactly as single.
void run_cancelled_mid_batch(const std::string& dir, int world, Plan plan, int cancel_at) {
  const auto cfg = config_of(dir);
  const auto in = make_inputs(cfg, kBlocks);
  const auto single = single_stream(dir, in);
  const auto models = rank_models(dir, plan, world);
  World w(loopback(world, 0, 60s, plan),
          [&](int r) -> const dit::Model& { return *models[static_cast<size_t>(r)]; }, /*local_ranks=*/true);
  auto o = options();
  int asked = 0;
  o.cancelled = [&asked, cancel_at] { return ++asked > cancel_at; };
  w.leader().set_condition(in.ref, in.motion, in.text, o);
  const std::vector<at::Tensor> four(in.audio.begin(), in.audio.begin() + 4);
  EXPECT_THROW(w.leader().generate_blocks(four), Cancelled);
  EXPECT_GT(asked, cancel_at) << "the cancel question was not asked";
  EXPECT_EQ(w.broken(), "") << "a cancel must not break the world";
  // The next stream on the same world: whole and equal to single.
  w.leader().set_condition(in.ref, in.motion, in.text, options());
  std::vector<dit::BlockResult> got = w.leader().generate_blocks(four);
  for (auto& r : w.leader().generate_blocks({in.audio[4]})) got.push_back(std::move(r));
  ASSERT_EQ(got.size(), single.size());
  for (size_t b = 0; b < single.size(); ++b)
    EXPECT_TRUE(close(got[b].latents, single[b].latents, "after the cancel, block " + std::to_string(b), kFp32));
  EXPECT_EQ(w.broken(), "");
}

TEST(PlanThreads, StageCancelledMidBatchThenTheNextStreamIsWhole) {
  run_cancelled_mid_batch(testutil::tiny().dir, 2, Plan::kStage, 6);  // 4 blocks x 4 steps: after 6 items
}
TEST(PlanThreads, StageCancelledBeforeTheFirstItem) {
  run_cancelled_mid_batch(testutil::tiny().dir, 2, Plan::kStage, 0);
}
TEST(PlanThreads, StepCancelledMidBatchThenTheNextStreamIsWhole) {
  run_cancelled_mid_batch(testutil::tiny().dir, 4, Plan::kStep, 2);  // after 2 of 4 blocks
}

// A follower whose model is not rank 0's (here: another checkpoint's shape) says so instead of computing garbage.
TEST(PlanThreads, FollowerWithAnotherModelIsRefused) {
  const auto models2 = rank_models(testutil::tiny().dir, Plan::kStage, 2);
  std::string message;
  // Rank 0 posts the fingerprint of a stage x2 world of the 2-layer model; rank 1 holds the 4-layer model's half.
  const auto four = rank_models(four_layer_dir(), Plan::kStage, 2);
  auto cfg0 = loopback(2, 0, 20s, Plan::kStage);
  auto rv0 = Rendezvous::open(cfg0);
  cfg0 = cfg0.with_port(rv0.port());
  std::thread follower([&] {
    try {
      const auto cfg1 = cfg0.with_rank(1);
      auto rv1 = Rendezvous::open(cfg1);
      auto ch = connect_channels(cfg1, rv1);
      follow(cfg1, rv1, *ch.pipeline, ch.back.get(), *four[1]);
    } catch (const ParallelError& e) {
      message = e.what();
    }
  });
  {
    auto ch = connect_channels(cfg0, rv0);
    Leader leader(cfg0, rv0, *ch.pipeline, ch.back.get(), *models2[0]);
    follower.join();
  }
  EXPECT_NE(message.find("does not match rank 0's"), std::string::npos) << message;
  EXPECT_NE(message.find("2 layers"), std::string::npos) << message;
  EXPECT_NE(message.find("4 layers"), std::string::npos) << message;
}

TEST(PlanThreads, StageOfTwoInBf16EqualsSingleInBf16) {
  // The hidden state crosses the stage boundary in the model dtype (bf16 here), as the planner counts it.
  const auto dir = four_layer_dir();
  const auto cfg = config_of(dir);
  const auto path = dir + "/" + weights::OfficialFiles::kDitDir;
  auto bf16 = [](int64_t first, int64_t last) {
    auto o = fp32(first, last);
    o.precision = dit::Precision::kBf16;
    return o;
  };
  const auto in = make_inputs(cfg, kBlocks);
  dit::Model full(cfg, path, bf16(0, -1));
  dit::Session single(full, options());
  single.set_condition(in.ref, in.motion, in.text);
  std::vector<dit::BlockResult> expected;
  for (const auto& a : in.audio) expected.push_back(single.generate_block(a));
  const dit::Model a(cfg, path, bf16(0, 2)), b(cfg, path, bf16(2, 4));
  std::vector<dit::BlockResult> got;
  const auto errors = run_world(2, [&](int r, Communicator& comm) {
    auto out = rank_stream(loopback(2, r, 60s, Plan::kStage), comm, r == 0 ? a : b, in);
    if (r == 0) got = std::move(out);
  }, 60s);
  expect_all_ok(errors);
  ASSERT_EQ(got.size(), expected.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].latents.scalar_type(), at::kBFloat16);
    EXPECT_TRUE(close(got[i].latents, expected[i].latents, "bf16 block " + std::to_string(i) + " latents", kFp32));
  }
}

TEST(PlanThreads, RefusesModelsThatDoNotFitThePlan) {
  const auto dir = four_layer_dir();
  const auto cfg = config_of(dir);
  const auto path = dir + "/" + weights::OfficialFiles::kDitDir;
  dit::Model full(cfg, path, fp32()), half(cfg, path, fp32(0, 2));
  std::vector<std::string> messages(2);
  const auto errors = run_world(2, [&](int r, Communicator& comm) {
    try {
      // Stage rank r of 2 needs layers [2r, 2r + 2); the full model is not that.
      RankSession s(loopback(2, r, 20s, Plan::kStage), comm, r == 0 ? full : half, options());
    } catch (const ParallelError& e) {
      messages[static_cast<size_t>(r)] = e.what();
    }
  });
  expect_all_ok(errors);
  EXPECT_NE(messages[0].find("stage rank 0 of 2 must hold layers [0, 2), its model holds [0, 4)"), std::string::npos)
      << messages[0];
  EXPECT_NE(messages[1].find("stage rank 1 of 2 must hold layers [2, 4), its model holds [0, 2)"), std::string::npos)
      << messages[1];
  const auto step_errors = run_world(2, [&](int r, Communicator& comm) {
    EXPECT_THROW(RankSession(loopback(2, r, 20s, Plan::kStep), comm, full, options()), ParallelError);
  });
  expect_all_ok(step_errors);
}

// ----------------------------------------------------------------------------------------------------------------
// Ranks as processes: this binary re-executed for ranks 1..N-1, rank 0 here
// ----------------------------------------------------------------------------------------------------------------

void run_plan_as_processes(const std::string& dir, Plan plan, int world) {
  const auto cfg = config_of(dir);
  const auto in = make_inputs(cfg, kBlocks);
  const auto single = single_stream(dir, in);
  auto pc = loopback(world, 0, 120s, plan);
  // Rank 0's model only: the whole DiT (step) or the layers of stage 0.
  const auto [a, b] = plan == Plan::kStep ? std::make_pair(int64_t{0}, cfg.num_layers)
                                          : stage_layers(cfg.num_layers, 0, world);
  const dit::Model model0(cfg, dir + "/" + weights::OfficialFiles::kDitDir, fp32(a, b));
  auto rv = Rendezvous::open(pc);
  std::vector<std::unique_ptr<Child>> children;
  const std::string role = plan == Plan::kStep ? "plan-step" : "plan-stage";
  for (int r = 1; r < world; ++r)
    children.push_back(std::make_unique<Child>(role, r, world, rv.port(), 120s, std::vector<std::string>{dir}));
  auto comm = connect_gloo(pc.with_port(rv.port()), rv);
  const auto r0 = rank_stream(pc, *comm, model0, in);
  for (auto& c : children) EXPECT_EQ(c->wait_for(120s), 0) << "a child rank failed (its stderr says why)";
  ASSERT_EQ(r0.size(), single.size());
  for (size_t b = 0; b < single.size(); ++b) {
    EXPECT_TRUE(close(r0[b].latents, single[b].latents, "process block " + std::to_string(b) + " latents", kFp32));
    if (plan == Plan::kStage) {
      for (size_t s = 0; s < single[b].velocities.size(); ++s)
        EXPECT_TRUE(close(r0[b].velocities[s], single[b].velocities[s],
                          "process block " + std::to_string(b) + " step " + std::to_string(s), kFp32));
    }
  }
}

TEST(PlanProcesses, ARankKilledMidStreamGivesANamedErrorOnRankZero) {
  const auto dir = four_layer_dir();
  const auto cfg = config_of(dir);
  const auto in = make_inputs(cfg, kBlocks);
  auto pc = loopback(2, 0, 5s, Plan::kStage);
  const dit::Model model0(cfg, dir + "/" + weights::OfficialFiles::kDitDir, fp32(0, 2));
  auto rv = Rendezvous::open(pc);
  Child child("plan-stage", 1, 2, rv.port(), 5s, {dir, "--die-after=2"});
  auto comm = connect_gloo(pc.with_port(rv.port()), rv);
  RankSession s(pc, *comm, model0, options());
  s.set_condition(in.ref, in.motion, in.text);
  s.generate_block(in.audio[0]);
  s.generate_block(in.audio[1]);
  const auto t0 = std::chrono::steady_clock::now();
  std::string error;
  try {
    s.generate_block(in.audio[2]);
  } catch (const ParallelError& e) {
    error = e.what();
  }
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[error] %s\n", error.c_str());
  EXPECT_NE(error.find("rank 1"), std::string::npos) << error;
  EXPECT_TRUE(error.find("closed the connection") != std::string::npos ||
              error.find("did not answer within 5 s") != std::string::npos)
      << error;
  EXPECT_LT(took, 7.0);
  EXPECT_EQ(s.blocks_done(), 2);
  EXPECT_EQ(child.wait_for(10s), 128 + SIGKILL);
}

TEST(PlanProcesses, StageOfFourProcessesEqualsSingle) { run_plan_as_processes(four_layer_dir(), Plan::kStage, 4); }
TEST(PlanProcesses, StepOfFourProcessesEqualsSingle) { run_plan_as_processes(four_layer_dir(), Plan::kStep, 4); }

}  // namespace

// plan-step / plan-stage: rank a.rank of the plan on the checkpoint folder a.extra[0]; checks its own outputs' shapes.
int child_plan(const ChildArgs& a) {
  if (a.extra.empty()) return 2;
  const std::string dir = a.extra[0];
  const Plan plan = a.role == "plan-step" ? Plan::kStep : Plan::kStage;
  const auto cfg = config_of(dir);
  const auto path = dir + "/" + weights::OfficialFiles::kDitDir;
  const auto [first, last] = plan == Plan::kStep ? std::make_pair(int64_t{0}, cfg.num_layers)
                                                 : stage_layers(cfg.num_layers, a.rank, a.world);
  dit::Model model(cfg, path, fp32(first, last));
  Rendezvous rv;
  auto comm = join_child(a, &rv, plan);
  const auto pc = loopback(a.world, a.rank, a.timeout, plan).with_port(a.port);
  RankSession s(pc, *comm, model, options());
  s.set_condition({}, {}, {});
  // --die-after=N: killed by itself after N blocks (a rank lost mid-stream).
  int die_after = -1;
  for (const auto& e : a.extra)
    if (e.rfind("--die-after=", 0) == 0) die_after = std::atoi(e.c_str() + 12);
  for (int b = 0; b < kBlocks; ++b) {
    if (b == die_after) ::raise(SIGKILL);
    const auto r = s.generate_block({});
    if (r.velocities.empty() && (plan == Plan::kStep || pc.is_last())) return 4;
  }
  return 0;
}

}  // namespace liveavatar::parallel::test
