// The DiT as layer ranges and shards: the split call equals the whole one bit for bit, shards built from a
// checkpoint reproduce the single-model stream, strict per-shard loading, FP8 and LoRA as load options, cancellation.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>

#include "dit/dit.h"
#include "weights/weights.h"
#include "model.h"

namespace liveavatar::dit::test {
namespace {

// Four layers, injectors at 0, 1 and 3: every shard boundary below splits the injector list.
ModelConfig four_layers() {
  auto c = ModelConfig::tiny();
  c.num_layers = 4;
  c.audio_inject_layers = {0, 1, 3};
  return c;
}

// The parameters of a model as a checkpoint in memory (what a safetensors file of it would hold).
weights::Checkpoint checkpoint_of(const Model& model) {
  weights::Checkpoint ck;
  for (const auto& p : model.module()->named_parameters(/*recurse=*/true)) ck.tensors[p.key()] = p.value().clone();
  ck.files.push_back("memory");
  return ck;
}

struct Inputs {
  at::Tensor ref, motion, text;
  std::vector<at::Tensor> audio;
};

Inputs make_inputs(const ModelConfig& cfg, int blocks) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(21);
  Inputs in;
  in.ref = at::randn({16, 1, 8, 16}, gen);
  in.motion = at::randn({16, 19, 8, 16}, gen);
  in.text = at::randn({5, cfg.text_dim}, gen);
  for (int b = 0; b < blocks; ++b) in.audio.push_back(at::randn({cfg.audio_layers, cfg.audio_dim, 12}, gen));
  return in;
}

std::vector<BlockResult> stream(Session& s, const Inputs& in) {
  s.set_condition(in.ref, in.motion, in.text);
  std::vector<BlockResult> out;
  for (const auto& a : in.audio) out.push_back(s.generate_block(a));
  return out;
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "dit-shards-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

LoadOptions cpu(Precision precision, int64_t first = 0, int64_t last = -1) {
  LoadOptions o;
  o.precision = precision;
  o.first_layer = first;
  o.last_layer = last;
  return o;
}

TEST(Split, RangesEqualTheWholeCallBitForBit) {
  at::NoGradGuard no_grad;
  Model model(four_layers(), c10::kCPU, c10::kFloat, /*seed=*/4);
  auto& m = *model.module();
  const auto in = make_inputs(model.config(), 1);
  const auto ctx = m.embed_text(in.text);
  CondCache cond;
  m.prefill(in.ref, in.motion, ctx, cond);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2);
  const auto x = at::randn({16, 3, 8, 16}, gen);
  const auto audio = in.audio[0].unsqueeze(0);
  // Ring already holding a block, so the call attends to a filling ring and the sink.
  KVCache kv_whole = m.make_kv_cache(32), kv_split = m.make_kv_cache(32);
  for (size_t l = 0; l < kv_whole.layers.size(); ++l) {
    kv_whole.layers[l].k.slice(1, 0, 96).normal_(0, 1, gen);
    kv_whole.layers[l].v.slice(1, 0, 96).normal_(0, 1, gen);
    kv_split.layers[l].k.copy_(kv_whole.layers[l].k);
    kv_split.layers[l].v.copy_(kv_whole.layers[l].v);
  }
  const auto whole = m.forward_block(x, 700.0, ctx, at::Tensor(), audio, kv_whole, cond, 96, 9);

  auto bi = m.prepare_block(x, 700.0, at::Tensor(), audio, cond.segments, 96, 9, kv_split.capacity);
  const auto text = m.text_kv(ctx, 0, 4);
  for (auto [a, b] : {std::pair<int64_t, int64_t>{0, 1}, {1, 3}, {3, 4}}) m.run_layers(a, b, bi, text, kv_split, cond);
  const auto split = m.apply_head(bi);
  EXPECT_TRUE(at::equal(whole, split));
  for (size_t l = 0; l < kv_whole.layers.size(); ++l) {
    EXPECT_TRUE(at::equal(kv_whole.layers[l].k, kv_split.layers[l].k)) << "layer " << l;
    EXPECT_TRUE(at::equal(kv_whole.layers[l].v, kv_split.layers[l].v)) << "layer " << l;
  }
}

TEST(Shards, HoldOnlyTheirLayersByCheckpointName) {
  Model full(four_layers(), c10::kCPU, c10::kFloat, 1);
  const auto ck = checkpoint_of(full);
  Model mid(four_layers(), ck, cpu(Precision::kFp32, 1, 3));
  EXPECT_FALSE(mid.has_embeddings());
  EXPECT_FALSE(mid.has_head());
  size_t n = 0;
  for (const auto& p : mid.module()->named_parameters()) {
    const auto& k = p.key();
    const bool ok = k.rfind("blocks.1.", 0) == 0 || k.rfind("blocks.2.", 0) == 0 ||
                    k.rfind("audio_injector.injector.1.", 0) == 0 ||
                    k.rfind("audio_injector.injector_adain_layers.1.", 0) == 0;
    EXPECT_TRUE(ok) << k;
    EXPECT_TRUE(at::equal(p.value(), ck.tensors.at(k))) << k;
    ++n;
  }
  EXPECT_GT(n, 0u);
  EXPECT_THROW(mid.embed_text(at::zeros({2, four_layers().text_dim})), DitError);
  Model last(four_layers(), ck, cpu(Precision::kFp32, 3, 4));
  EXPECT_TRUE(last.has_head());
  EXPECT_TRUE(last.module()->named_parameters().contains("audio_injector.injector.2.q.weight"));  // layer 3
  EXPECT_TRUE(last.module()->named_parameters().contains("head.head.weight"));
}

TEST(Shards, TwoShardsOnCpuEqualTheSingleModelOverFiveBlocksWithTheSinkRefresh) {
  Model full(four_layers(), c10::kCPU, c10::kFloat, 7);
  const auto ck = checkpoint_of(full);
  Model a(four_layers(), ck, cpu(Precision::kFp32, 0, 2));
  Model b(four_layers(), ck, cpu(Precision::kFp32, 2, 4));
  const auto in = make_inputs(full.config(), 5);  // block 4 starts clip 1: rolling-sink refresh, ring wrap
  SessionOptions o;
  o.seed = 3;
  o.rope_seed = 5;
  Session single(full, o), sharded({&a, &b}, o);
  const auto x = stream(single, in), y = stream(sharded, in);
  ASSERT_EQ(x.size(), 5u);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_TRUE(at::equal(x[i].latents, y[i].latents)) << "block " << i;
    for (size_t s = 0; s < x[i].velocities.size(); ++s)
      EXPECT_TRUE(at::equal(x[i].velocities[s], y[i].velocities[s])) << "block " << i << " step " << s;
    EXPECT_EQ(x[i].rope_offsets, y[i].rope_offsets);
  }
}

TEST(Shards, StageApiByHandEqualsTheSession) {
  // What a stage process does: its own state, the hidden state handed from range to range.
  Model full(four_layers(), c10::kCPU, c10::kFloat, 9);
  const auto ck = checkpoint_of(full);
  Model a(four_layers(), ck, cpu(Precision::kFp32, 0, 3));
  Model b(four_layers(), ck, cpu(Precision::kFp32, 3, 4));
  const auto in = make_inputs(full.config(), 1);
  SessionOptions o;
  o.rope_offsets = {11, 12, 13, 14};
  Session single(full, o);
  const auto expected = stream(single, in).front();

  auto sa = a.new_state(32), sb = b.new_state(32);
  const auto ctx = a.embed_text(in.text);
  a.set_text(ctx, sa);
  b.set_text(ctx, sb);
  auto sink = a.prepare_sink(in.ref, in.motion);
  a.prefill(sink, sa, 0, 1);  // a range inside a shard
  a.prefill(sink, sa, 1, 3);
  b.prefill(sink, sb);
  const auto schedule = make_schedule(full.config());
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  auto latents = at::randn({16, 12, 8, 16}, gen).slice(1, 0, 3);
  for (int64_t step = 0; step < 4; ++step) {
    auto bi = a.prepare(latents, schedule.timesteps[step].item<double>(), in.audio[0], sink.segments, 0,
                        o.rope_offsets[static_cast<size_t>(step)], sa.rings[0].capacity);
    a.run_layers(bi, sa, step);
    b.run_layers(bi, sb, step);
    const auto v = b.head(bi);
    EXPECT_TRUE(at::equal(v, expected.velocities[static_cast<size_t>(step)])) << "step " << step;
    latents = euler_step(latents, v, schedule, step);
  }
  EXPECT_TRUE(at::equal(latents, expected.latents));
  EXPECT_THROW(a.head(a.prepare(latents, 1.0, in.audio[0], sink.segments, 0, 4, sa.rings[0].capacity)), DitError);
  BlockInputs none;
  EXPECT_THROW(b.run_layers(none, sb, 0, 2, 4), DitError);  // layer 2 is a's
}

TEST(Shards, SessionChecksTheChain) {
  Model full(four_layers(), c10::kCPU, c10::kFloat, 1);
  const auto ck = checkpoint_of(full);
  Model a(four_layers(), ck, cpu(Precision::kFp32, 0, 2));
  Model b(four_layers(), ck, cpu(Precision::kFp32, 2, 4));
  Model c(four_layers(), ck, cpu(Precision::kFp32, 1, 4));
  EXPECT_THROW(Session({&b, &a}), DitError);
  EXPECT_THROW(Session({&a, &c}), DitError);
  EXPECT_THROW(Session({&a}), DitError);
  EXPECT_NO_THROW(Session({&a, &b}));
}

TEST(ShardLoad, StrictOverTheWholeCheckpoint) {
  Model full(four_layers(), c10::kCPU, c10::kFloat, 1);
  auto ck = checkpoint_of(full);
  auto expect_error = [&](const weights::Checkpoint& bad, const LoadOptions& o, const std::string& needle) {
    try {
      Model m(four_layers(), bad, o);
      ADD_FAILURE() << "no error, expected one naming " << needle;
    } catch (const weights::WeightsError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  // A key no layer of the model has fails even for a shard that would not load it.
  auto extra = ck;
  extra.tensors["blocks.9.self_attn.q.weight"] = at::zeros({64, 64});
  expect_error(extra, cpu(Precision::kFp32, 0, 1), "blocks.9.self_attn.q.weight");
  // A missing key of the shard fails; a missing key of another shard does not.
  auto missing = ck;
  missing.tensors.erase("blocks.3.ffn.2.weight");
  expect_error(missing, cpu(Precision::kFp32, 2, 4), "blocks.3.ffn.2.weight");
  EXPECT_NO_THROW(Model(four_layers(), missing, cpu(Precision::kFp32, 0, 2)));
  // A mis-shaped key fails wherever it is (here: another shard's layer).
  auto shaped = ck;
  shaped.tensors["blocks.3.ffn.2.weight"] = at::zeros({64, 64});
  expect_error(shaped, cpu(Precision::kFp32, 0, 1), "blocks.3.ffn.2.weight: expected [64, 128]");
}

TEST(ShardLoad, FromFilesOnDiskAndConcurrentlyInDifferentDtypes) {
  Model full(four_layers(), c10::kCPU, c10::kFloat, 2);
  TempDir dir;
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : full.module()->named_parameters()) tensors[p.key()] = p.value().to(at::kBFloat16);
  weights::save_safetensors(dir.file("diffusion_pytorch_model.safetensors"), tensors);
  // Two shards built at the same time in one process, one fp32 and one bf16: nothing global is set.
  std::unique_ptr<Model> a, b;
  std::thread ta([&] { a = std::make_unique<Model>(four_layers(), dir.file(""), cpu(Precision::kFp32, 0, 2)); });
  std::thread tb([&] { b = std::make_unique<Model>(four_layers(), dir.file(""), cpu(Precision::kBf16, 2, 4)); });
  ta.join();
  tb.join();
  ASSERT_TRUE(a && b);
  for (const auto& p : a->module()->named_parameters()) EXPECT_EQ(p.value().scalar_type(), at::kFloat) << p.key();
  for (const auto& p : b->module()->named_parameters()) {
    // bf16 except what upstream keeps in fp32 (the head here).
    const bool f32 = p.key().rfind("head.", 0) == 0;
    EXPECT_EQ(p.value().scalar_type(), f32 ? at::kFloat : at::kBFloat16) << p.key();
    EXPECT_TRUE(at::equal(p.value().to(at::kFloat), tensors.at(p.key()).to(at::kFloat))) << p.key();
  }
  EXPECT_TRUE(at::equal(a->module()->patch_embedding->weight, tensors.at("patch_embedding.weight").to(at::kFloat)));
}

TEST(Fp8, QuantisedOnLoadEqualsTheConvertedCheckpointAndRunsClose) {
  Model full(four_layers(), c10::kCPU, c10::kBFloat16, 5);
  const auto ck = checkpoint_of(full);
  Model q(four_layers(), ck, cpu(Precision::kFp8));
  auto converted = ck;
  weights::ConvertOptions co;
  co.fp8 = true;
  weights::convert(converted, co);
  Model pre(four_layers(), converted, cpu(Precision::kFp8));
  const auto qp = q.module()->named_parameters(), pp = pre.module()->named_parameters();
  ASSERT_EQ(qp.size(), pp.size());
  EXPECT_TRUE(qp.contains("blocks.0.self_attn.q.weight_fp8"));
  EXPECT_TRUE(qp.contains("audio_injector.injector.0.k.weight_fp8"));
  EXPECT_TRUE(qp.contains("text_embedding.0.weight"));  // upstream's ignore list stays high precision
  EXPECT_FALSE(qp.contains("blocks.0.self_attn.q.weight"));
  for (const auto& p : qp) {
    EXPECT_EQ(p.value().scalar_type(), pp[p.key()].scalar_type()) << p.key();
    EXPECT_TRUE(at::equal(p.value().to(at::kFloat), pp[p.key()].to(at::kFloat))) << p.key();
  }
  EXPECT_LT(q.parameter_bytes(), full.parameter_bytes());
  // The dequantised weights run close to bf16 (not a fidelity claim: the FP8 rounding is upstream's scheme).
  const auto in = make_inputs(full.config(), 1);
  Session sq(q, {}), sb(full, {});
  const auto a = stream(sq, in)[0].latents.to(at::kFloat), b = stream(sb, in)[0].latents.to(at::kFloat);
  EXPECT_LT((a - b).abs().max().item<double>(), 0.1 * b.abs().max().item<double>());
}

TEST(Lora, MergedPerTensorOnLoadEqualsMergeThenLoad) {
  Model full(four_layers(), c10::kCPU, c10::kFloat, 6);
  const auto ck = checkpoint_of(full);
  TempDir dir;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  std::map<std::string, at::Tensor> lora;
  for (const std::string m : {"blocks.0.self_attn.q", "blocks.3.ffn.0", "audio_injector.injector.2.o"}) {
    const auto& w = ck.tensors.at(m + ".weight");
    lora["base_model.model." + m + ".lora_A.weight"] = at::randn({4, w.size(1)}, gen);
    lora["base_model.model." + m + ".lora_B.weight"] = at::randn({w.size(0), 4}, gen);
  }
  weights::save_safetensors(dir.file("lora.safetensors"), lora);
  weights::LoraOptions lo{/*alpha=*/2.0, /*rank=*/4};
  auto merged = ck;
  weights::merge_lora(merged, weights::load_safetensors(dir.file("lora.safetensors")), lo);
  auto opts = cpu(Precision::kFp32, 2, 4);
  opts.lora = dir.file("lora.safetensors");
  opts.lora_options = lo;
  Model streamed(four_layers(), ck, opts);
  Model reference(four_layers(), merged, cpu(Precision::kFp32, 2, 4));
  for (const auto& p : streamed.module()->named_parameters())
    EXPECT_TRUE(at::equal(p.value(), reference.module()->named_parameters()[p.key()])) << p.key();
  EXPECT_FALSE(at::equal(streamed.module()->named_parameters()["blocks.3.ffn.0.weight"],
                         ck.tensors.at("blocks.3.ffn.0.weight")));
  // A LoRA that names no weight of the checkpoint fails before anything is built.
  lora["base_model.model.blocks.7.self_attn.q.lora_A.weight"] = at::zeros({4, 64});
  lora["base_model.model.blocks.7.self_attn.q.lora_B.weight"] = at::zeros({64, 4});
  weights::save_safetensors(dir.file("bad.safetensors"), lora);
  opts.lora = dir.file("bad.safetensors");
  EXPECT_THROW(Model(four_layers(), ck, opts), weights::WeightsError);
}

TEST(Cancel, StopsBetweenStepsAndTheNextCallRedoesTheBlock) {
  Model model(four_layers(), c10::kCPU, c10::kFloat, 3);
  const auto in = make_inputs(model.config(), 2);
  SessionOptions plain;
  plain.rope_seed = 4;
  Session reference(model, plain);
  const auto expected = stream(reference, in);

  std::atomic<int> asked{0};
  std::atomic<bool> stop{false};
  SessionOptions o = plain;
  o.cancelled = [&] {
    ++asked;
    return stop.load();
  };
  Session s(model, o);
  s.set_condition(in.ref, in.motion, in.text);
  const auto first = s.generate_block(in.audio[0]);
  EXPECT_GT(asked.load(), 3);  // asked between steps
  stop = true;
  EXPECT_THROW(s.generate_block(in.audio[1]), Cancelled);
  EXPECT_EQ(s.blocks_done(), 1);
  stop = false;
  const auto second = s.generate_block(in.audio[1]);
  EXPECT_TRUE(at::equal(first.latents, expected[0].latents));
  EXPECT_TRUE(at::equal(second.latents, expected[1].latents));
  EXPECT_EQ(second.rope_offsets, expected[1].rope_offsets);
}

TEST(AudioInjector, AttentionEpsIsUpstreams1e6WhateverTheModelEps) {
  auto c = ModelConfig::tiny();
  c.eps = 1e-5;
  CausalWanModelS2V m(c);
  auto inj = m->audio_injector->injector[0]->as<AttentionImpl>();
  EXPECT_EQ(inj->options.eps, 1e-6);
  EXPECT_EQ(inj->norm_q->options.eps, 1e-6);
  EXPECT_EQ(m->blocks[0]->as<BlockImpl>()->self_attn->options.eps, 1e-5);
}

TEST(Attention, TwoKeySetsEqualOneSoftmaxOverTheirConcatenation) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto q = at::randn({1, 96, 4, 16}, gen);
  const auto k1 = at::randn({1, 192, 4, 16}, gen) * 2, v1 = at::randn({1, 192, 4, 16}, gen);
  const auto k2 = at::randn({1, 80, 4, 16}, gen), v2 = at::randn({1, 80, 4, 16}, gen) * 3;
  const auto two = sdpa_two_blhd(q, k1, v1, k2, v2);
  const auto one = sdpa_blhd(q, at::cat({k1, k2}, 1), at::cat({v1, v2}, 1));
  ASSERT_EQ(two.sizes(), one.sizes());
  EXPECT_LT((two - one).abs().max().item<double>(), 1e-5 * one.abs().max().item<double>());
  // A set that dominates the softmax (large logits) still merges right.
  const auto loud = sdpa_two_blhd(q, k1 * 40, v1, k2, v2);
  const auto loud_ref = sdpa_blhd(q, at::cat({k1 * 40, k2}, 1), at::cat({v1, v2}, 1));
  EXPECT_LT((loud - loud_ref).abs().max().item<double>(), 1e-5 * loud_ref.abs().max().item<double>());
  // bf16 in, bf16 out.
  const auto b = sdpa_two_blhd(q.to(at::kBFloat16), k1.to(at::kBFloat16), v1.to(at::kBFloat16), k2.to(at::kBFloat16),
                               v2.to(at::kBFloat16));
  EXPECT_EQ(b.scalar_type(), at::kBFloat16);
  EXPECT_LT((b.to(at::kFloat) - one).abs().max().item<double>(), 0.03 * one.abs().max().item<double>());
}

TEST(Rope, Fp32TableIsExactAndApplicationStaysWithinRounding) {
  const auto positions = rope_positions({{-19, 0, 0, -3, 4, 8, 16, 8, 16, false}, {0, 0, 0, 3, 4, 8, 3, 4, 8, true}}, 29);
  const auto table = rope_table(positions, 16);
  const auto real = rope_real(table);
  EXPECT_TRUE(at::equal(at::complex(real.cos.to(at::kDouble), real.sin.to(at::kDouble)), table));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
  const auto x = at::randn({1, positions.size(0), 4, 16}, gen);
  const auto xc = at::view_as_complex(x.to(at::kDouble).reshape({1, positions.size(0), 4, 8, 2}));
  const auto exact = at::view_as_real(xc * table.unsqueeze(0)).flatten(3);  // complex128 as upstream
  const auto ours = rope_apply(x, real);
  EXPECT_EQ(ours.scalar_type(), at::kFloat);
  const double err = (ours.to(at::kDouble) - exact).abs().max().item<double>();
  EXPECT_LT(err, 4 * 1.2e-7 * exact.abs().max().item<double>());  // a few fp32 ulp of the largest value
}

}  // namespace
}  // namespace liveavatar::dit::test
