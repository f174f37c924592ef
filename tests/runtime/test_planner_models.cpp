// The planner against the real modules: parameter groups = the DiT's named parameters, bytes = what dit::Model
// holds, the companion-model constants = their configs, the session's caches = what the CPU allocator sees.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>

#include <map>

#include "counting_allocator.h"
#include "text/text_encoder.h"
#include "vae/vae.h"
#include "weights/weights.h"
#include "model.h"
#include "planner.h"

namespace {

using namespace liveavatar;

// The planner's parameter groups (what each rank holds) add up to the DiT config's exact count, for the 14B shape,
// the tiny one and a variant with the extra adain output layers.
TEST(PlannerModels, ParameterGroupsAddUpToTheDiTConfig) {
  auto other = dit::ModelConfig::tiny();
  other.adain_mode = "attn_norm_out";
  other.enable_adain = true;
  for (const auto& config : {dit::ModelConfig{}, dit::ModelConfig::tiny(), other}) {
    uint64_t sum = 0;
    for (const auto& g : runtime::parameter_groups(config)) sum += g.elements();
    EXPECT_EQ(sum, config.parameter_count());
  }
  EXPECT_GT(other.parameter_count(), dit::ModelConfig::tiny().parameter_count());
}

TEST(PlannerModels, CompanionModelsMatchTheirConfigs) {
  EXPECT_EQ(vae::VaeConfig{}.parameter_count(), runtime::kVaeParameters);
  EXPECT_EQ(text::T5Config{}.parameter_count(), runtime::kUmt5Parameters);
}

// Every parameter of the built module falls in exactly one planner group, with the group's element count, and the
// planner's bytes are the module's bytes in both dtypes (fp32 modules included).
TEST(PlannerModels, GroupsAndBytesMatchTheBuiltModule) {
  auto config = dit::ModelConfig::tiny();
  config.num_layers = 3;
  config.audio_inject_layers = {0, 2};
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    dit::Model model(config, c10::kCPU, dtype, /*seed=*/3);
    const auto groups = runtime::parameter_groups(config);
    std::map<std::string, uint64_t> elements, bytes;
    for (const auto& item : model.module()->named_parameters(/*recurse=*/true)) {
      const std::string& name = item.key();
      std::string owner;
      for (const auto& g : groups)
        if (name.rfind(g.name + ".", 0) == 0 && g.name.size() > owner.size()) owner = g.name;
      ASSERT_FALSE(owner.empty()) << name << " belongs to no planner group";
      elements[owner] += static_cast<uint64_t>(item.value().numel());
      bytes[owner] += static_cast<uint64_t>(item.value().nbytes());
    }
    const auto precision = dtype == at::kFloat ? runtime::Precision::kFp32 : runtime::Precision::kBf16;
    for (const auto& g : groups) {
      EXPECT_EQ(elements[g.name], g.elements()) << g.name;
      EXPECT_EQ(bytes[g.name], g.bytes(precision, runtime::Fp8Scaling::kPerTensor, /*keep_fp32_modules=*/true))
          << g.name << " " << c10::toString(dtype);
    }
  }
}

// Stage shards built by the DiT's loader hold exactly the planner's per-rank bytes, in every precision (FP8
// weights + scales per tensor or per channel included).
TEST(PlannerModels, ShardBytesAreThePlannersStageBytes) {
  c10::NoGradGuard no_grad;
  auto config = dit::ModelConfig::tiny();
  config.num_layers = 4;
  config.audio_inject_layers = {0, 1, 3};
  dit::Model source(config, c10::kCPU, at::kFloat, /*seed=*/9);
  weights::Checkpoint checkpoint;
  for (const auto& p : source.module()->named_parameters(/*recurse=*/true))
    checkpoint.tensors[p.key()] = p.value().clone();
  checkpoint.files.push_back("memory");

  struct Case {
    dit::Precision dit;
    runtime::Precision planner;
    weights::Fp8Scaling scaling;
  };
  for (const auto& c : {Case{dit::Precision::kFp32, runtime::Precision::kFp32, weights::Fp8Scaling::kPerTensor},
                        Case{dit::Precision::kBf16, runtime::Precision::kBf16, weights::Fp8Scaling::kPerTensor},
                        Case{dit::Precision::kFp8, runtime::Precision::kFp8, weights::Fp8Scaling::kPerTensor},
                        Case{dit::Precision::kFp8, runtime::Precision::kFp8, weights::Fp8Scaling::kPerChannel}}) {
    runtime::PlanRequest r;
    r.model = config;
    r.height = 128;
    r.width = 64;
    r.weights = c.planner;
    r.fp8_scaling = c.scaling == weights::Fp8Scaling::kPerTensor ? runtime::Fp8Scaling::kPerTensor
                                                                 : runtime::Fp8Scaling::kPerChannel;
    r.devices = {{"cpu:0", 1ull << 40}, {"cpu:1", 1ull << 40}, {"cpu:2", 1ull << 40}, {"cpu:3", 1ull << 40}};
    for (int64_t ranks = 1; ranks <= 4; ++ranks) {
      const auto plan = ranks == 1 ? runtime::evaluate(r, runtime::Parallel::kSingle, 1)
                                   : runtime::evaluate(r, runtime::Parallel::kStage, ranks);
      for (int64_t k = 0; k < ranks; ++k) {
        dit::LoadOptions o;
        o.precision = c.dit;
        o.fp8_scaling = c.scaling;
        o.first_layer = k * config.num_layers / ranks;
        o.last_layer = (k + 1) * config.num_layers / ranks;
        const dit::Model shard(config, checkpoint, o);
        uint64_t bytes = 0;
        for (const auto& p : shard.module()->named_parameters(/*recurse=*/true))
          bytes += static_cast<uint64_t>(p.value().nbytes());
        for (const auto& b : shard.module()->named_buffers(/*recurse=*/true))
          bytes += static_cast<uint64_t>(b.value().nbytes());
        EXPECT_EQ(bytes, plan.devices[static_cast<size_t>(k)].weights)
            << "precision " << runtime::to_string(c.planner) << (c.scaling == weights::Fp8Scaling::kPerChannel ? " per channel" : "")
            << ", rank " << k << " of " << ranks;
      }
    }
  }
}

// set_condition allocates the sink, the four rings and the embedded text: exactly the planner's bytes (the text
// either alone or with its per-layer cross-attention K/V, depending on whether the DiT caches it).
TEST(PlannerModels, SessionCachesAreThePlannersBytes) {
  c10::NoGradGuard no_grad;
  const auto config = dit::ModelConfig::tiny();
  const int64_t height = 128, width = 64;
  runtime::PlanRequest r;
  r.model = config;
  r.height = height;
  r.width = width;
  r.weights = runtime::Precision::kFp32;
  r.devices = {{"cpu", 1ull << 40}};
  r.aux.device = runtime::Placement::kHost;
  r.text_encoder.device = runtime::Placement::kNone;
  r.cache_text_kv = false;
  const auto plain = runtime::evaluate(r, runtime::Parallel::kSingle, 1).devices[0];
  r.cache_text_kv = true;
  const auto cached = runtime::evaluate(r, runtime::Parallel::kSingle, 1).devices[0];

  runtime::CountingCpuAllocator counter;
  const uint64_t base = counter.live();
  dit::Model model(config, c10::kCPU, at::kFloat, /*seed=*/5);
  EXPECT_EQ(counter.live() - base, plain.weights);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  const auto ref = at::randn({16, 1, height / 8, width / 8}, gen);
  const auto motion = at::randn({16, config.lat_motion_frames(), height / 8, width / 8}, gen);
  const auto text = at::randn({config.text_len, config.text_dim}, gen);
  dit::Session session(model);
  const uint64_t before = counter.live();
  session.set_condition(ref, motion, text);
  const uint64_t held = counter.live() - before;
  const uint64_t without_kv = plain.kv_rings + plain.sink + plain.text_context;
  const uint64_t with_kv = cached.kv_rings + cached.sink + cached.text_context;
  EXPECT_TRUE(held == without_kv || held == with_kv)
      << "set_condition holds " << held << " B; the planner expects " << without_kv << " (text K/V recomputed) or "
      << with_kv << " (text K/V cached)";
  EXPECT_EQ(plain.kv_rings, 4ull * 12 * 32 * 2 * 64 * 4 * 2);  // 4 steps x 12 frames x 32 tokens x K+V x dim x fp32 x 2 layers
}

}  // namespace
