// The official layout and the tiny checkpoint set: make-tiny + inspect round trip.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>

#include "checkpoint_tool.h"
#include "test_util.h"

using namespace liveavatar::weights;

TEST(Layout, Dit14BMatchesTheUpstreamParameterCount) {
  liveavatar::dit::ModelConfig c;  // Wan2.2-S2V-14B
  EXPECT_EQ(audio_injector_count(c), 12);
  EXPECT_EQ(layout_numel(dit_layout(c)), 16295755609ull);
  uint64_t block = 0;
  for (const auto& kv : dit_layout(c)) {
    if (kv.first.rfind("blocks.7.", 0) == 0) {
      uint64_t n = 1;
      for (auto s : kv.second.shape) n *= static_cast<uint64_t>(s);
      block += n;
    }
  }
  EXPECT_EQ(block, 351394304ull);
  Layout l = dit_layout(c);
  for (const char* k : {"patch_embedding.weight", "blocks.39.self_attn.q.weight", "blocks.0.norm3.bias",
                        "audio_injector.injector.11.norm_k.weight", "audio_injector.injector_adain_layers.0.linear.bias",
                        "casual_audio_encoder.encoder.conv1_local.conv.weight", "frame_packer.proj_4x.weight",
                        "head.head.weight", "trainable_cond_mask.weight", "cond_encoder.weight"}) {
    EXPECT_EQ(l.count(k), 1u) << k;
  }
}

TEST(Layout, InjectorCountFollowsUpstreamSubstringMatching) {
  liveavatar::dit::ModelConfig c;
  c.num_layers = 20;
  c.audio_inject_layers = {1};  // 'transformer_blocks.1' is in blocks 1 and 10..19
  EXPECT_EQ(audio_injector_count(c), 11);
}

TEST(Layout, LoraTargetsEveryQkvoAndFfnLinear) {
  ModelConfig c = ModelConfig::tiny();
  Layout l = lora_layout(c.dit, c.lora);
  // per block: self q k v o, cross q k v o, ffn.0, ffn.2 = 10; per injector q k v o = 4; two halves each
  EXPECT_EQ(l.size(), static_cast<size_t>(2 * (10 * c.dit.num_layers + 4 * audio_injector_count(c.dit))));
  EXPECT_EQ(l.at("blocks.1.ffn.0.lora_A.weight").shape, (std::vector<int64_t>{4, 64}));
  EXPECT_EQ(l.at("blocks.1.ffn.0.lora_B.weight").shape, (std::vector<int64_t>{128, 4}));
}

TEST(MakeTiny, WritesTheOfficialSetThatInspectValidates) {
  wt::TempDir dir;
  make_tiny_checkpoint(dir.path(), ModelConfig::tiny(), /*seed=*/7, /*shards=*/3);
  InspectResult r = inspect_checkpoint(dir.path());
  EXPECT_TRUE(r.ok()) << r.to_string();
  ASSERT_EQ(r.components.size(), 5u);
  for (const auto& c : r.components) EXPECT_GT(c.numel, 0u) << c.name;
  EXPECT_NE(r.to_string().find("valid"), std::string::npos);
  // Every shard named like the published ones, loadable through the index.
  Checkpoint dit = load_sharded_safetensors(dir.file(OfficialFiles::kDitIndex));
  EXPECT_EQ(dit.files.size(), 3u);
  EXPECT_NE(dit.files[0].find("diffusion_pytorch_model-00001-of-00003.safetensors"), std::string::npos);
  // The LoRA merges into the DiT with the tiny adapter config.
  ModelConfig tiny = ModelConfig::tiny();
  Checkpoint lora = load_safetensors(dir.file(OfficialFiles::kLora));
  LoraReport lr = merge_lora(dit, lora, LoraOptions{tiny.lora.alpha, tiny.lora.rank});
  EXPECT_EQ(lr.merged.size() * 2, lora.tensors.size());
}

TEST(MakeTiny, IsDeterministicPerSeed) {
  wt::TempDir a, b;
  make_tiny_checkpoint(a.path(), ModelConfig::tiny(), 3, 1);
  make_tiny_checkpoint(b.path(), ModelConfig::tiny(), 3, 1);
  for (const char* f : {"Wan2.2-S2V-14B/diffusion_pytorch_model-00001-of-00001.safetensors",
                        OfficialFiles::kLora, OfficialFiles::kVae}) {
    EXPECT_EQ(wt::read_bytes(a.file(f)), wt::read_bytes(b.file(f))) << f;
  }
}

TEST(Inspect, ReportsAMissingComponentAndAWrongShape) {
  wt::TempDir dir;
  make_tiny_checkpoint(dir.path(), ModelConfig::tiny(), 1, 1);
  ::unlink(dir.file(OfficialFiles::kT5).c_str());
  // Replace the VAE with one that lacks a key.
  Checkpoint vae = load_pth(dir.file(OfficialFiles::kVae));
  std::map<std::string, at::Tensor> t(vae.tensors.begin(), vae.tensors.end());
  t.erase("conv1.weight");
  t["conv2.bias"] = at::zeros({3});
  save_pth(dir.file(OfficialFiles::kVae), t);
  InspectResult r = inspect_checkpoint(dir.path());
  EXPECT_FALSE(r.ok());
  std::string s = r.to_string();
  EXPECT_NE(s.find("t5       MISSING"), std::string::npos) << s;
  EXPECT_NE(s.find("vae      MISMATCH"), std::string::npos) << s;
  EXPECT_NE(s.find("conv1.weight"), std::string::npos) << s;
  EXPECT_NE(s.find("conv2.bias: expected [16]"), std::string::npos) << s;
}
