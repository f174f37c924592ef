// The memory planner: the 14B reference figures of DESIGN.md section 4, the rank layouts, the decisions for the
// common machines, refusals with their messages, and every validator. SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include <unistd.h>

#include "planner.h"

namespace {

using namespace liveavatar::runtime;

double gb(uint64_t bytes) { return std::round(static_cast<double>(bytes) / 1e8) / 10.0; }  // 1 GB = 1e9 B, 0.1 GB

// The DESIGN.md figures hold every non-FP8 tensor in the model dtype, as upstream does.
PlanRequest upstream_request(Precision weights, Precision kv, const std::string& devices) {
  PlanRequest r;
  r.weights = weights;
  r.kv = kv;
  r.devices = parse_devices(devices);
  r.keep_fp32_modules = false;
  return r;
}

uint64_t weights_kv_sink(const DeviceBytes& d) { return d.weights + d.kv_rings + d.sink; }

uint64_t group_elements(const std::vector<ParamGroup>& groups, const std::string& name) {
  for (const auto& g : groups)
    if (g.name == name) return g.elements();
  ADD_FAILURE() << "no parameter group " << name;
  return 0;
}

void expect_error(const std::function<void()>& fn, const std::string& fragment) {
  try {
    fn();
    ADD_FAILURE() << "expected an error containing \"" << fragment << "\"";
  } catch (const liveavatar::Error& e) {  // PlanError, or DitError from the model config
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

// --- 14B reference figures ----------------------------------------------------------------------------------------
TEST(PlannerFigures, ParameterCountsOf14B) {
  const liveavatar::dit::ModelConfig m;
  EXPECT_EQ(m.parameter_count(), 16295755609ull);
  const auto groups = parameter_groups(m);
  EXPECT_EQ(group_elements(groups, "blocks.0"), 351394304ull);
  EXPECT_EQ(group_elements(groups, "blocks.39"), 351394304ull);
  EXPECT_EQ(group_elements(groups, "audio_injector.injector.0") +
                group_elements(groups, "audio_injector.injector_adain_layers.0"),
            157327360ull);
}

TEST(PlannerFigures, WeightBytesBf16AndUpstreamFp8) {
  const liveavatar::dit::ModelConfig m;
  uint64_t bf16 = 0, fp8 = 0, fp8_channel = 0, fp8_elements = 0, fp8_tensors = 0;
  for (const auto& g : parameter_groups(m)) {
    bf16 += g.bytes(Precision::kBf16, Fp8Scaling::kPerTensor, false);
    fp8 += g.bytes(Precision::kFp8, Fp8Scaling::kPerTensor, false);
    fp8_channel += g.bytes(Precision::kFp8, Fp8Scaling::kPerChannel, false);
    fp8_elements += g.fp8_elements;
    fp8_tensors += g.fp8_tensors;
  }
  EXPECT_EQ(bf16, 2 * 16295755609ull);  // 32.59 GB
  EXPECT_EQ(gb(bf16), 32.6);
  // 40 blocks x 10 linears + 12 injectors x (4 + 1 AdaLN linear); one byte each + a 4-byte scale per tensor.
  EXPECT_EQ(fp8_tensors, 460u);
  EXPECT_EQ(fp8_elements, 15938355200ull);
  EXPECT_EQ(fp8, 15938355200ull + 2 * (16295755609ull - 15938355200ull) + 4 * 460);
  EXPECT_NEAR(static_cast<double>(fp8) / 1e9, 16.65, 0.005);
  // Per output channel: 4 bytes per output feature instead of per tensor.
  const uint64_t channels = 40 * (9 * 5120 + 13824) + 12 * 6 * 5120;  // blocks: 8 x dim + ffn + dim; injectors
  EXPECT_EQ(fp8_channel - fp8, 4 * (channels - 460));
}

TEST(PlannerFigures, TokensAt704x384) {
  const auto t = count_tokens(liveavatar::dit::ModelConfig{}, 704, 384);
  EXPECT_EQ(t.frame, 1056);
  EXPECT_EQ(t.block, 3168);
  EXPECT_EQ(t.ring, 12672);
  EXPECT_EQ(t.sink, 2640);  // 1,056 reference + 1,056 + 264 + 264 FramePack
  EXPECT_EQ(t.text, 512);
  // The planner's size is height x width; the tokens do not depend on the orientation.
  const auto w = count_tokens(liveavatar::dit::ModelConfig{}, 384, 704);
  EXPECT_EQ(w.sink, t.sink);
}

TEST(PlannerFigures, KvPerStepAndSink) {
  auto r = upstream_request(Precision::kBf16, Precision::kBf16, "1x80GB");
  const auto single = evaluate(r, Parallel::kSingle, 1).devices[0];
  // 20,480 B per token per layer (bf16 K + V of dim 5120): 12,672 tokens x 40 layers per step, 2,640 in the sink.
  EXPECT_EQ(single.kv_rings, 4ull * 12672 * 20480 * 40);
  EXPECT_EQ(gb(single.kv_rings / 4), 10.4);
  EXPECT_NEAR(static_cast<double>(single.kv_rings / 4) / 1e9, 10.38, 0.005);
  EXPECT_EQ(single.sink, 2640ull * 20480 * 40);
  EXPECT_NEAR(static_cast<double>(single.sink) / 1e9, 2.16, 0.005);
}

TEST(PlannerFigures, SingleAndStepPerDevice) {
  auto bf16 = upstream_request(Precision::kBf16, Precision::kBf16, "5x80GB");
  auto fp8 = upstream_request(Precision::kFp8, Precision::kBf16, "5x80GB");
  auto fp8kv = upstream_request(Precision::kFp8, Precision::kFp8, "5x80GB");
  EXPECT_EQ(gb(weights_kv_sink(evaluate(bf16, Parallel::kSingle, 1).devices[0])), 76.3);
  EXPECT_EQ(gb(weights_kv_sink(evaluate(fp8, Parallel::kSingle, 1).devices[0])), 60.3);
  EXPECT_EQ(gb(weights_kv_sink(evaluate(fp8kv, Parallel::kSingle, 1).devices[0])), 38.5);
  const auto step_bf16 = evaluate(bf16, Parallel::kStep, 4);
  const auto step_fp8 = evaluate(fp8, Parallel::kStep, 4);
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(gb(weights_kv_sink(step_bf16.devices[k])), 45.1) << k;
    EXPECT_EQ(gb(weights_kv_sink(step_fp8.devices[k])), 29.2) << k;
  }
}

TEST(PlannerFigures, StageOfFourPerDevice) {
  struct Case {
    Precision weights, kv;
    double lo, hi;
  };
  for (const auto& c : {Case{Precision::kBf16, Precision::kBf16, 18.6, 19.6},
                        Case{Precision::kFp8, Precision::kBf16, 14.8, 15.6},
                        Case{Precision::kFp8, Precision::kFp8, 9.3, 10.2}}) {
    const auto plan = evaluate(upstream_request(c.weights, c.kv, "4x24GB"), Parallel::kStage, 4);
    double lo = 1e9, hi = 0;
    for (const auto& d : plan.devices) {
      lo = std::min(lo, gb(weights_kv_sink(d)));
      hi = std::max(hi, gb(weights_kv_sink(d)));
      // 10 layers each: the KV of all 4 steps is one step's worth of the 40-layer model.
      EXPECT_EQ(d.kv_rings, 4ull * 12672 * 2 * 5120 * (c.kv == Precision::kFp8 ? 1 : 2) * 10);
    }
    EXPECT_EQ(lo, c.lo) << to_string(c.weights) << "/" << to_string(c.kv);
    EXPECT_EQ(hi, c.hi) << to_string(c.weights) << "/" << to_string(c.kv);
    // A quarter of the sink: 0.54 GB in bf16.
    EXPECT_NEAR(static_cast<double>(plan.devices[0].sink) / 1e9, c.kv == Precision::kFp8 ? 0.27 : 0.54, 0.005);
  }
}

TEST(PlannerFigures, EngineKeepsFourModulesInFp32) {
  // dit::Model holds time_embedding, time_projection, head and casual_audio_encoder in fp32: stage 0 carries three of
  // them, the last stage the head.
  auto engine = upstream_request(Precision::kBf16, Precision::kBf16, "4x24GB");
  engine.keep_fp32_modules = true;
  const auto upstream = evaluate(upstream_request(Precision::kBf16, Precision::kBf16, "4x24GB"), Parallel::kStage, 4);
  const auto ours = evaluate(engine, Parallel::kStage, 4);
  uint64_t first = 0, last = 0;
  for (const auto& g : parameter_groups(liveavatar::dit::ModelConfig{}))
    if (g.fp32_module) (g.where == ParamGroup::Where::kLast ? last : first) += 2 * g.elements();
  EXPECT_EQ(ours.devices[0].weights - upstream.devices[0].weights, first);
  EXPECT_EQ(ours.devices[3].weights - upstream.devices[3].weights, last);
  EXPECT_EQ(ours.devices[1].weights, upstream.devices[1].weights);
  EXPECT_EQ(gb(first), 0.6);
}

// --- Rank layout ----------------------------------------------------------------------------------------------------
TEST(PlannerLayout, StagesPartitionTheModel) {
  for (int64_t n : {2, 3, 4, 5, 8}) {
    auto r = upstream_request(Precision::kBf16, Precision::kBf16, "8x80GB");
    r.aux.device = Placement::kHost;
    r.text_encoder.device = Placement::kNone;
    const auto single = evaluate(r, Parallel::kSingle, 1).devices[0];
    const auto plan = evaluate(r, Parallel::kStage, n);
    uint64_t weights = 0, kv = 0, sink = 0;
    for (const auto& d : plan.devices) {
      weights += d.weights;
      kv += d.kv_rings;
      sink += d.sink;
    }
    EXPECT_EQ(weights, single.weights) << n;
    EXPECT_EQ(kv, single.kv_rings) << n;
    EXPECT_EQ(sink, single.sink) << n;
  }
}

TEST(PlannerLayout, InjectorsEmbeddingsAndHeadFollowTheirLayers) {
  auto r = upstream_request(Precision::kBf16, Precision::kBf16, "4x80GB");
  const auto plan = evaluate(r, Parallel::kStage, 4);
  EXPECT_EQ(plan.devices[1].role.substr(0, 31), "stage 1/4 (layers 10-19) + aux");
  const liveavatar::dit::ModelConfig m;
  const uint64_t block = 2 * 351394304ull, injector = 2 * 157327360ull;
  uint64_t embeddings = 0, head = 0;
  for (const auto& g : parameter_groups(m)) {
    if (g.where == ParamGroup::Where::kFirst) embeddings += 2 * g.elements();
    if (g.where == ParamGroup::Where::kLast) head += 2 * g.elements();
  }
  // Injectors at 0, 4, 8 | 12, 16 | 20, 24, 27 | 30, 33, 36, 39.
  EXPECT_EQ(plan.devices[0].weights, 10 * block + 3 * injector + embeddings);
  EXPECT_EQ(plan.devices[1].weights, 10 * block + 2 * injector);
  EXPECT_EQ(plan.devices[2].weights, 10 * block + 3 * injector);
  EXPECT_EQ(plan.devices[3].weights, 10 * block + 4 * injector + head);
  // The step plan: every rank holds everything and one ring.
  const auto step = evaluate(r, Parallel::kStep, 4);
  for (const auto& d : step.devices) EXPECT_EQ(d.weights, 2 * m.parameter_count());
}

TEST(PlannerLayout, AuxAndTextEncoderPlacement) {
  auto r = upstream_request(Precision::kBf16, Precision::kBf16, "5x80GB");
  auto step = evaluate(r, Parallel::kStep, 4);
  EXPECT_EQ(step.devices[4].role, "aux");  // the fifth card decodes, as upstream's TPP
  // bf16: weights, the stream cache (9,458 B per pixel in fp32) and the decode peak (3,341 values per pixel).
  const uint64_t px = 704 * 384;
  EXPECT_EQ(step.devices[4].vae, kVaeParameters * 2 + 9458 * px / 2 + 3341 * px * 2);
  EXPECT_EQ(step.devices[4].audio_encoder, kWav2Vec2Parameters * 2 + 106644736 / 2);
  EXPECT_EQ(step.devices[4].aux_resident, (kVaeParameters + kWav2Vec2Parameters) * 2);
  r.aux.device = 2;
  step = evaluate(r, Parallel::kStep, 4);
  EXPECT_EQ(step.devices[2].role, "step 2 + aux");
  EXPECT_EQ(step.devices[4].vae, 0u);
  r.aux.device = Placement::kHost;
  r.text_encoder.device = Placement::kNone;
  step = evaluate(r, Parallel::kStep, 4);
  for (const auto& d : step.devices) {
    EXPECT_EQ(d.vae + d.audio_encoder + d.text_encoder, 0u);
    EXPECT_EQ(d.prompt(), 0u);
  }
  // umT5 (11.4 GB bf16) goes where it fits beside the loaded weights; with no room anywhere it runs on the host.
  r.text_encoder.device = Placement::kAuto;
  r.devices = {{"cuda:0", 40 * kGiB}};
  auto single = evaluate(r, Parallel::kSingle, 1);
  EXPECT_EQ(single.devices[0].text_encoder, 0u);
  r.devices = {{"cuda:0", 200 * kGiB}};
  single = evaluate(r, Parallel::kSingle, 1);
  EXPECT_GT(single.devices[0].text_encoder, 11000000000u);
  EXPECT_EQ(single.devices[0].total(), std::max(single.devices[0].streaming(), single.devices[0].prompt()) +
                                           single.devices[0].slack);
}

TEST(PlannerLayout, SlackIsTheRequestedFraction) {
  auto r = upstream_request(Precision::kBf16, Precision::kBf16, "1x80GB");
  r.slack_fraction = 0.1;
  const auto d = evaluate(r, Parallel::kSingle, 1).devices[0];
  EXPECT_NEAR(static_cast<double>(d.slack), 0.1 * static_cast<double>(std::max(d.streaming(), d.prompt())), 1.0);
}

// --- Decisions --------------------------------------------------------------------------------------------------------
TEST(PlannerDecision, FourByTwentyFourGbFitsWithStage) {
  for (Precision w : {Precision::kBf16, Precision::kFp8}) {
    PlanRequest r;
    r.weights = w;
    r.devices = parse_devices("4x24GB");
    const auto d = decide(r);
    ASSERT_TRUE(d.fits) << d.message;
    EXPECT_EQ(d.plan.name(), "stage:4") << to_string(w);
    EXPECT_DOUBLE_EQ(d.plan.block_forwards, 1.0);
    for (const auto& dev : d.plan.devices) EXPECT_LE(dev.total(), dev.free_bytes);
  }
}

TEST(PlannerDecision, ChoicesForTheCommonMachines) {
  struct Case {
    const char* devices;
    Precision weights;
    bool fits;
    const char* plan;
  };
  for (const auto& c : {Case{"1x80GB", Precision::kBf16, false, "single"}, Case{"1x80GB", Precision::kFp8, true, "single"},
                        Case{"4x48GB", Precision::kBf16, true, "stage:4"}, Case{"4x48GB", Precision::kFp8, true, "step"},
                        Case{"5x80GB", Precision::kBf16, true, "step"}, Case{"5x80GB", Precision::kFp8, true, "step"}}) {
    PlanRequest r;
    r.weights = c.weights;
    r.devices = parse_devices(c.devices);
    const auto d = decide(r);
    EXPECT_EQ(d.fits, c.fits) << c.devices << " " << to_string(c.weights) << ": " << d.message;
    EXPECT_EQ(d.plan.name(), c.plan) << c.devices << " " << to_string(c.weights);
  }
}

TEST(PlannerDecision, FastestFirstAndStepBeforeStageOnATie) {
  PlanRequest r;
  r.devices = parse_devices("5x80GB");
  const auto d = decide(r);
  ASSERT_GE(d.candidates.size(), 3u);
  EXPECT_EQ(d.candidates[0].name(), "step");
  EXPECT_EQ(d.candidates[1].name(), "stage:4");  // same speed, more hops
  EXPECT_EQ(d.candidates.back().name(), "single");
  for (size_t i = 1; i < d.candidates.size(); ++i)
    EXPECT_LE(d.candidates[i - 1].block_forwards, d.candidates[i].block_forwards);
  // stage:2 needs two forwards per block, single four.
  for (const auto& p : d.candidates) {
    if (p.name() == "stage:2") {
      EXPECT_DOUBLE_EQ(p.block_forwards, 2.0);
    } else if (p.name() == "single") {
      EXPECT_DOUBLE_EQ(p.block_forwards, 4.0);
    }
  }
}

TEST(PlannerDecision, RefusalNamesShortfallAndWhatWouldFit) {
  PlanRequest r;
  r.devices = parse_devices("1x80GB");
  auto d = decide(r);
  ASSERT_FALSE(d.fits);
  EXPECT_EQ(d.message,
            "needs " + gib(d.plan.devices[0].total()) + " on cuda:0, 79.5 free (single, bf16 weights, bf16 KV, "
            "704x384); fits with precision=fp8 or kv-precision=fp8");
  // An explicit plan that does not fit: another plan does.
  r.devices = parse_devices("4x24GB");
  r.parallel = Parallel::kStep;
  d = decide(r);
  ASSERT_FALSE(d.fits);
  EXPECT_NE(d.message.find("on cuda:0, 23.5 free (step, bf16 weights"), std::string::npos) << d.message;
  EXPECT_NE(d.message.find("; fits with parallel=stage"), std::string::npos) << d.message;
  EXPECT_EQ(d.message.find("precision=fp8"), std::string::npos) << d.message;  // fp8 alone is not enough for step
  // Two knobs needed.
  r.devices = parse_devices("cuda:0=24GiB,cuda:1=24GiB");
  r.parallel = Parallel::kSingle;
  d = decide(r);
  ASSERT_FALSE(d.fits);
  EXPECT_NE(d.message.find("; fits with precision=fp8 + kv-precision=fp8 + parallel=stage"), std::string::npos)
      << d.message;
  // Nothing fits.
  r.devices = parse_devices("cuda:0=8GiB");
  r.parallel = Parallel::kAuto;
  d = decide(r);
  ASSERT_FALSE(d.fits);
  EXPECT_NE(d.message.find("nothing fits on these devices"), std::string::npos) << d.message;
  try {
    require_fit(r);
    ADD_FAILURE() << "require_fit accepted 8 GiB";
  } catch (const PlanError& e) {
    EXPECT_EQ(std::string(e.what()), d.message);
  }
}

// A checkpoint too big for the budget is refused from its config.json alone: its weight files are never opened
// (here they do not even exist, and the index names a shard that is a directory).
TEST(PlannerDecision, RefusesACheckpointBeforeReadingWeights) {
  const auto dir = std::filesystem::temp_directory_path() / ("planner-ckpt-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir / "diffusion_pytorch_model-00001-of-00001.safetensors");
  {
    std::ofstream(dir / "config.json") << R"({"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40,
      "text_dim": 4096, "text_len": 512, "audio_dim": 1024, "enable_framepack": true, "framepack_drop_mode": "padd",
      "adain_mode": "attn_norm", "patch_size": [1, 2, 2]})";
    std::ofstream(dir / "diffusion_pytorch_model.safetensors.index.json")
        << R"({"weight_map": {"blocks.0.self_attn.q.weight": "diffusion_pytorch_model-00001-of-00001.safetensors"}})";
  }
  PlanRequest r;
  r.devices = parse_devices("cuda:0=22GiB");
  const auto d = decide_for_checkpoint(dir.string(), r);
  EXPECT_FALSE(d.fits);
  EXPECT_EQ(d.message.rfind("needs ", 0), 0u) << d.message;
  EXPECT_NE(d.message.find("on cuda:0, 22.0 free"), std::string::npos) << d.message;
  uint64_t fp32_elements = 0;
  for (const auto& g : parameter_groups(liveavatar::dit::ModelConfig{}))
    if (g.fp32_module) fp32_elements += g.elements();
  EXPECT_EQ(d.plan.devices[0].weights, 2 * 16295755609ull + 2 * fp32_elements)  // the engine's fp32 modules
      << d.message;
  std::filesystem::remove_all(dir);
}

TEST(PlannerConfig, ReadsConfigJsonLikeTheDiT) {
  const auto dir = std::filesystem::temp_directory_path() / ("planner-config-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const auto path = (dir / "config.json").string();
  std::ofstream(path) << R"({"constructor_args": {"dim": 64, "ffn_dim": 128, "num_heads": 4, "num_layers": 2,
    "audio_inject_layers": [0, 1], "audio_dim": 32, "text_dim": 32, "text_len": 16, "freq_dim": 32,
    "adain_mode": "other"}})";
  const auto m = liveavatar::dit::ModelConfig::from_json_file(path);
  EXPECT_EQ(m.dim, 64);
  EXPECT_EQ(m.num_layers, 2);
  EXPECT_EQ(m.audio_inject_layers, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(m.adain_mode, "other");  // upstream registers injector_adain_output_layers for it
  EXPECT_EQ(m.text_len, 16);

  auto write = [&](const std::string& text) { std::ofstream(path, std::ios::trunc) << text; };
  write("{\"dim\": ");
  expect_error([&] { liveavatar::dit::ModelConfig::from_json_file(path); }, "not valid JSON");
  write(R"({"dim": "wide"})");
  expect_error([&] { liveavatar::dit::ModelConfig::from_json_file(path); }, "a field has the wrong type");
  write(R"({"enable_motioner": true})");
  expect_error([&] { liveavatar::dit::ModelConfig::from_json_file(path); }, "enable_motioner=true is not supported");
  write(R"({"framepack_drop_mode": "drop"})");
  expect_error([&] { liveavatar::dit::ModelConfig::from_json_file(path); }, "framepack_drop_mode must be \"padd\"");
  write(R"({"patch_size": [1, 2]})");
  expect_error([&] { liveavatar::dit::ModelConfig::from_json_file(path); }, "patch_size must have 3 entries");
  write(R"({"dim": 100, "num_heads": 40})");
  expect_error([&] { liveavatar::dit::ModelConfig::from_json_file(path); }, "config.json: model config: dim 100 is not a multiple");
  write("[1, 2]");
  expect_error([&] { liveavatar::dit::ModelConfig::from_json_file(path); }, "must be a JSON object");
  expect_error([&] { liveavatar::dit::ModelConfig::from_json_file((dir / "absent.json").string()); }, "cannot open");
  std::filesystem::remove_all(dir);
}

// --- Validators -------------------------------------------------------------------------------------------------------
TEST(PlannerValidate, ModelShape) {
  auto bad = [](const std::function<void(liveavatar::dit::ModelConfig&)>& edit, const std::string& fragment) {
    liveavatar::dit::ModelConfig m;
    edit(m);
    expect_error([&] { m.validate(); }, fragment);
  };
  bad([](auto& m) { m.dim = 0; }, "must be positive");
  bad([](auto& m) { m.dim = 5001; }, "dim 5001 is not a multiple of num_heads 40");
  bad([](auto& m) { m.num_heads = 1024; }, "head_dim 5 must be even");
  bad([](auto& m) { m.dim = 6; m.num_heads = 3; }, "dim 6 must be a multiple of 4");
  bad([](auto& m) { m.freq_dim = 3; }, "freq_dim 3 must be positive and even");
  bad([](auto& m) { m.patch_size = {1, 1, 1}; }, "patch_size must be (1, 2, 2)");
  bad([](auto& m) { m.in_dim = 4; }, "in_dim 4");
  bad([](auto& m) { m.cond_dim = 0; }, "out_dim and cond_dim must be positive");
  bad([](auto& m) { m.text_len = 0; }, "text_len, text_dim");
  bad([](auto& m) { m.audio_inject_layers = {40}; }, "audio_inject_layers has 40, outside [0, 40)");
  bad([](auto& m) { m.audio_inject_layers = {3, 3}; }, "lists layer 3 twice");
  bad([](auto& m) { m.framepack_buckets = {1, 3, 16}; }, "framepack_buckets must be (n, 2k, 4m)");
  bad([](auto& m) { m.motion_frames = 0; }, "motion_frames must be positive");
  bad([](auto& m) { m.clip_frames = 10; }, "clip_frames 10 must be a positive multiple of frames_per_block 3");
  bad([](auto& m) { m.sampling_steps = 0; }, "sampling_steps must be positive");
  liveavatar::dit::ModelConfig().validate();
}

TEST(PlannerValidate, Request) {
  auto bad = [](const std::function<void(PlanRequest&)>& edit, const std::string& fragment) {
    PlanRequest r;
    r.devices = parse_devices("4x24GB");
    edit(r);
    expect_error([&] { r.validate(); }, fragment);
    expect_error([&] { decide(r); }, fragment);
  };
  bad([](auto& r) { r.height = 720; }, "output size 720x384: height and width must be positive multiples of 64");
  bad([](auto& r) { r.width = 0; }, "multiples of 64");
  bad([](auto& r) { r.devices.clear(); }, "no devices");
  bad([](auto& r) { r.devices[1].name = "cuda:0"; }, "device cuda:0 is listed twice");
  bad([](auto& r) { r.devices[2].name = ""; }, "a device has no name");
  bad([](auto& r) { r.devices[0].free_bytes = 0; }, "device cuda:0 has no free memory");
  bad([](auto& r) { r.devices.pop_back(); r.parallel = Parallel::kStep; }, "parallel=step needs one device per denoising step (4), got 3");
  bad([](auto& r) { r.parallel = Parallel::kStage; r.stages = 1; }, "at least 2 ranks");
  bad([](auto& r) { r.parallel = Parallel::kStage; r.stages = 5; }, "parallel=stage:5 needs 5 devices, got 4");
  bad([](auto& r) { r.parallel = Parallel::kStage; r.model.num_layers = 3; r.model.audio_inject_layers = {0}; },
      "more ranks than the model has layers (3)");
  bad([](auto& r) { r.stages = 2; }, "only meaningful with parallel=stage");
  bad([](auto& r) { r.aux.device = 4; }, "VAE / audio encoder placement 4 is not a device index in [0, 4)");
  bad([](auto& r) { r.aux.device = Placement::kNone; }, "VAE / audio encoder placement");
  bad([](auto& r) { r.text_encoder.device = 7; }, "text encoder placement 7");
  bad([](auto& r) { r.aux_precision = Precision::kFp8; }, "not fp8");
  bad([](auto& r) { r.slack_fraction = 1.0; }, "slack fraction must be in [0, 1)");
  bad([](auto& r) { r.model.dim = 5001; }, "model config: dim 5001");
  expect_error([] { PlanRequest r; r.devices = parse_devices("1x80GB"); evaluate(r, Parallel::kAuto, 1); },
               "a concrete plan");
  expect_error([] { PlanRequest r; r.devices = parse_devices("1x80GB"); evaluate(r, Parallel::kStep, 4); },
               "parallel=step with 4 ranks needs 4 devices, got 1");
  expect_error([] { PlanRequest r; r.devices = parse_devices("2x80GB"); evaluate(r, Parallel::kStage, 1); },
               "parallel=stage needs 2 to 40 ranks, got 1");
}

TEST(PlannerValidate, Parsing) {
  EXPECT_EQ(parse_bytes("24GiB"), 24 * kGiB);
  EXPECT_EQ(parse_bytes("1.5GB"), 1500000000u);
  EXPECT_EQ(parse_bytes("512MiB"), 512u << 20);
  EXPECT_EQ(parse_bytes("1000"), 1000u);
  EXPECT_EQ(parse_bytes("3KB"), 3000u);
  for (const char* bad : {"", "GiB", "24TiB", "-1GiB", "0GiB", "1.2.3GB", "24 GiB"})
    expect_error([&] { parse_bytes(bad); }, "a memory size is a positive number");

  auto d = parse_devices("4x24GB");
  ASSERT_EQ(d.size(), 4u);
  EXPECT_EQ(d[3].name, "cuda:3");
  EXPECT_EQ(d[0].free_bytes, 24 * kGiB - kDefaultContextReserve);
  EXPECT_EQ(parse_devices("2x80GB", 0)[1].free_bytes, 80 * kGiB);
  d = parse_devices("cuda:0=22GiB,cpu=1000MB");
  ASSERT_EQ(d.size(), 2u);
  EXPECT_EQ(d[0].name, "cuda:0");
  EXPECT_EQ(d[0].free_bytes, 22 * kGiB);
  EXPECT_EQ(d[1].name, "cpu");
  EXPECT_EQ(d[1].free_bytes, 1000000000u);
  for (const char* bad : {"0x24GB", "4x24", "4x24GiB", "ax24GB", "65x24GB"})
    expect_error([&] { parse_devices(bad); }, "a device preset is NxSGB");
  expect_error([] { parse_devices("1x1GB", 2 * kGiB); }, "is not more than the 2.0 GiB the CUDA context takes");
  for (const char* bad : {"cuda:0", "=1GiB", "cuda:0=1GiB,", "cuda:0=1GiB,,cuda:1=1GiB"})
    expect_error([&] { parse_devices(bad); }, "a device is NAME=FREE");
  expect_error([] { parse_devices("cuda:0=lots"); }, "a memory size");

  int64_t stages = -1;
  EXPECT_EQ(parse_parallel("auto", &stages), Parallel::kAuto);
  EXPECT_EQ(stages, 0);
  EXPECT_EQ(parse_parallel("stage:3", &stages), Parallel::kStage);
  EXPECT_EQ(stages, 3);
  EXPECT_EQ(parse_parallel("step", &stages), Parallel::kStep);
  EXPECT_EQ(parse_parallel("single", nullptr), Parallel::kSingle);
  for (const char* bad : {"stage:1", "stage:x", "stage:"})
    expect_error([&] { parse_parallel(bad, nullptr); }, "parallel=stage:N needs N in [2, 4096]");
  expect_error([] { parse_parallel("pipeline", nullptr); }, "parallel must be auto, single, step, stage or stage:N");
  EXPECT_EQ(parse_precision("fp8"), Precision::kFp8);
  expect_error([] { parse_precision("fp16"); }, "precision must be fp32, bf16 or fp8, got 'fp16'");
  EXPECT_EQ(gib(25 * kGiB + 3 * kGiB / 10), "25.3 GiB");
  EXPECT_EQ(gib(3u << 20), "3.0 MiB");  // a tiny model is not "0.0 GiB"
  EXPECT_EQ(gib(512), "0.5 KiB");
}

TEST(PlannerValidate, DefaultPrecisions) {
  PlanRequest r;
  EXPECT_EQ(r.kv_precision(), Precision::kBf16);
  EXPECT_EQ(r.aux_dtype(), Precision::kBf16);
  r.weights = Precision::kFp32;
  EXPECT_EQ(r.kv_precision(), Precision::kFp32);
  EXPECT_EQ(r.activation_precision(), Precision::kFp32);
  r.weights = Precision::kFp8;
  EXPECT_EQ(r.kv_precision(), Precision::kBf16);
  EXPECT_EQ(r.activation_precision(), Precision::kBf16);
  r.kv = Precision::kFp8;
  EXPECT_EQ(r.kv_precision(), Precision::kFp8);
}

}  // namespace

// The companions are sized from what the checkpoint holds: 1/100 of the published parameters gives 1/100 of their
// weights and 1/10 of their transient bytes (sqrt), the DiT untouched; unset = the published models.
TEST(PlannerDecision, CompanionSizesScaleTheirBytes) {
  PlanRequest r;
  r.devices = parse_devices("cuda:0=80GiB");
  const auto published = evaluate(r, Parallel::kSingle, 1).devices[0];
  r.companions.vae_parameters = kVaeParameters / 100;
  r.companions.audio_encoder_parameters = kWav2Vec2Parameters / 100;
  r.companions.text_encoder_parameters = kUmt5Parameters / 100;
  const auto small = evaluate(r, Parallel::kSingle, 1).devices[0];
  EXPECT_EQ(small.weights, published.weights);
  EXPECT_EQ(small.kv_rings, published.kv_rings);
  EXPECT_LT(small.vae, published.vae / 9);
  EXPECT_GT(small.vae, published.vae / 11);
  EXPECT_LT(small.audio_encoder, published.audio_encoder / 9);
  EXPECT_LT(small.text_encoder, published.text_encoder / 9);
  r.companions = {};
  EXPECT_EQ(evaluate(r, Parallel::kSingle, 1).devices[0].total(), published.total());
}
