// Strict module loading, LoRA merge, precision conversion.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>

#include "test_util.h"

using namespace liveavatar::weights;
using wt::expect_error;

namespace {

// blocks.0.self_attn.q (Linear 4->3), blocks.0.scale (buffer [3]), head.head (Linear 3->2)
struct BlockImpl : torch::nn::Module {
  BlockImpl() {
    self_attn = register_module("self_attn", std::make_shared<torch::nn::Module>());
    q = self_attn->register_module("q", torch::nn::Linear(4, 3));
    scale = register_buffer("scale", torch::ones({3}));
  }
  std::shared_ptr<torch::nn::Module> self_attn;
  torch::nn::Linear q{nullptr};
  torch::Tensor scale;
};

struct Net : torch::nn::Module {
  Net() {
    blocks = register_module("blocks", torch::nn::ModuleList());
    blocks->push_back(std::make_shared<BlockImpl>());
    head = register_module("head", std::make_shared<torch::nn::Module>());
    head_linear = head->register_module("head", torch::nn::Linear(3, 2));
  }
  torch::nn::ModuleList blocks{nullptr};
  std::shared_ptr<torch::nn::Module> head;
  torch::nn::Linear head_linear{nullptr};
};

Checkpoint matching_checkpoint() {
  Checkpoint ck;
  ck.tensors["blocks.0.self_attn.q.weight"] = at::full({3, 4}, 0.5);
  ck.tensors["blocks.0.self_attn.q.bias"] = at::full({3}, 0.25);
  ck.tensors["blocks.0.scale"] = at::full({3}, 2.0);
  ck.tensors["head.head.weight"] = at::full({2, 3}, -1.0);
  ck.tensors["head.head.bias"] = at::zeros({2});
  for (const auto& kv : ck.tensors) ck.source[kv.first] = "test.safetensors";
  ck.files = {"test.safetensors"};
  return ck;
}

}  // namespace

TEST(ModuleLoad, NamesAreTheCheckpointKeys) {
  Net net;
  Layout l = module_layout(net);
  EXPECT_EQ(l.size(), 5u);
  EXPECT_EQ(l.at("blocks.0.self_attn.q.weight").shape, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(linear_module_names(net), (std::vector<std::string>{"blocks.0.self_attn.q", "head.head"}));
}

// Tensors already in memory (not views of a file) are installed as they are.
TEST(ModuleLoad, AssignIsZeroCopy) {
  Net net;
  Checkpoint ck = matching_checkpoint();
  load_into_module(net, ck);
  EXPECT_EQ(net.blocks[0]->as<BlockImpl>()->q->weight.data_ptr(), ck.tensors["blocks.0.self_attn.q.weight"].data_ptr());
  EXPECT_EQ(net.blocks[0]->as<BlockImpl>()->scale.data_ptr(), ck.tensors["blocks.0.scale"].data_ptr());
  EXPECT_TRUE(net.head_linear->weight.requires_grad());
}

// Values that view a checkpoint file's mapping are read by pread into memory of their own: no module tensor views
// the file afterwards (a file cut short later could not SIGBUS), in both modes.
TEST(ModuleLoad, MappedValuesAreReadIntoMemoryOfTheirOwn) {
  wt::TempDir dir;
  const std::string path = dir.file("net.safetensors");
  save_safetensors(path, matching_checkpoint().tensors);
  for (bool assign : {true, false}) {
    SCOPED_TRACE(assign ? "assign" : "copy");
    Checkpoint ck = load_safetensors(path);
    ASSERT_TRUE(file_range(ck.tensors.at("head.head.weight")).has_value());  // a view of the mapping
    Net net;
    load_into_module(net, ck, ModuleLoadOptions{assign, /*cast_dtype=*/false});
    for (const auto& p : net.named_parameters()) EXPECT_FALSE(file_range(p.value()).has_value()) << p.key();
    for (const auto& b : net.named_buffers()) EXPECT_FALSE(file_range(b.value()).has_value()) << b.key();
    EXPECT_EQ(net.head_linear->weight[1][2].item<float>(), -1.f);
    EXPECT_EQ(net.blocks[0]->as<BlockImpl>()->scale[2].item<float>(), 2.f);
  }
}

// The file cut short between opening it and loading it (an interrupted copy, a disk going away): through the mapping
// the missing bytes would read as zeros or kill the process with SIGBUS; read by pread they are an error that names
// the file.
TEST(ModuleLoad, FileCutShortAfterOpeningIsAnError) {
  wt::TempDir dir;
  const std::string path = dir.file("net.safetensors");
  save_safetensors(path, matching_checkpoint().tensors);
  for (bool assign : {true, false}) {
    SCOPED_TRACE(assign ? "assign" : "copy");
    Checkpoint ck = load_safetensors(path);
    const auto range = file_range(ck.tensors.at("blocks.0.self_attn.q.weight"));
    ASSERT_TRUE(range.has_value());
    ASSERT_EQ(::truncate(path.c_str(), static_cast<off_t>(range->offset)), 0);
    Net net;
    expect_error([&] { load_into_module(net, ck, ModuleLoadOptions{assign, /*cast_dtype=*/false}); },
                 {path, "the file shrank"});
    save_safetensors(path, matching_checkpoint().tensors);
  }
}

// read_owned copies exactly what a view of a mapping shows: a slice with a storage offset, a transposed view.
TEST(ModuleLoad, ReadOwnedKeepsShapeStridesAndValues) {
  wt::TempDir dir;
  const std::string path = dir.file("m.safetensors");
  save_safetensors(path, {{"m", at::arange(24, at::kFloat).reshape({4, 6})}});
  const Checkpoint ck = load_safetensors(path);
  const at::Tensor m = ck.tensors.at("m");
  for (const at::Tensor& view : {m, m.narrow(0, 1, 2), m.t(), m.narrow(1, 2, 3).t()}) {
    const at::Tensor own = read_owned(view);
    EXPECT_FALSE(file_range(own).has_value());
    EXPECT_EQ(own.sizes(), view.sizes());
    EXPECT_EQ(own.strides(), view.strides());
    EXPECT_TRUE(at::equal(own, view));
  }
  const at::Tensor plain = at::ones({3});
  EXPECT_EQ(read_owned(plain).data_ptr(), plain.data_ptr());  // not a mapping: as is
}

TEST(ModuleLoad, CopyModeKeepsTheModuleStorage) {
  Net net;
  void* before = net.head_linear->weight.data_ptr();
  load_into_module(net, matching_checkpoint(), ModuleLoadOptions{/*assign=*/false, /*cast_dtype=*/false});
  EXPECT_EQ(net.head_linear->weight.data_ptr(), before);
  EXPECT_EQ(net.head_linear->weight[0][0].item<float>(), -1.f);
}

TEST(ModuleLoad, ReportsEveryProblemAndLeavesTheModuleUntouched) {
  Net net;
  at::Tensor before = net.head_linear->weight.clone();
  Checkpoint ck = matching_checkpoint();
  ck.tensors.erase("blocks.0.scale");                            // missing
  ck.tensors["blocks.0.extra"] = at::zeros({1});                 // unexpected
  ck.tensors["head.head.bias"] = at::zeros({5});                 // shape mismatch
  ck.tensors["blocks.0.self_attn.q.bias"] = at::zeros({3}, at::kBFloat16);  // dtype mismatch
  LoadReport r = check_layout(module_layout(net), ck);
  EXPECT_EQ(r.missing.size(), 1u);
  EXPECT_EQ(r.unexpected.size(), 1u);
  EXPECT_EQ(r.mismatched.size(), 2u);
  expect_error([&] { load_into_module(net, ck); },
               {"test.safetensors", "blocks.0.scale", "blocks.0.extra", "head.head.bias: expected [2] F32, got [5] F32",
                "q.bias: expected [3] F32, got [3] BF16", "nothing was loaded"});
  EXPECT_TRUE(at::equal(net.head_linear->weight, before));
}

TEST(ModuleLoad, CastDtypeOnRequest) {
  Net net;
  Checkpoint ck = matching_checkpoint();
  for (auto& kv : ck.tensors) kv.second = kv.second.to(at::kBFloat16);
  expect_error([&] { load_into_module(net, ck); }, {"BF16"});
  load_into_module(net, ck, ModuleLoadOptions{/*assign=*/true, /*cast_dtype=*/true});
  EXPECT_EQ(net.head_linear->weight.scalar_type(), at::kFloat);
  EXPECT_EQ(net.head_linear->weight[1][2].item<float>(), -1.f);
}

// --- LoRA ------------------------------------------------------------------------------------------------------

namespace {

Checkpoint lora_of(const std::string& prefix, int64_t rank_a, int64_t rank_b, const std::string& adapter = "") {
  Checkpoint l;
  l.tensors[prefix + "blocks.0.self_attn.q.lora_A" + adapter + ".weight"] = at::arange(rank_a * 4, at::kFloat).reshape({rank_a, 4}) / 10;
  l.tensors[prefix + "blocks.0.self_attn.q.lora_B" + adapter + ".weight"] = at::arange(3 * rank_b, at::kFloat).reshape({3, rank_b}) / 10;
  l.files = {"liveavatar.safetensors"};
  return l;
}

}  // namespace

TEST(Lora, MergesBTimesAScaledInFp32BackToTheTargetDtype) {
  for (const std::string prefix : {"", "base_model.model."}) {
    for (const std::string adapter : {"", ".default"}) {
      Checkpoint base = matching_checkpoint();
      base.tensors["blocks.0.self_attn.q.weight"] = base.tensors["blocks.0.self_attn.q.weight"].to(at::kBFloat16);
      Checkpoint lora = lora_of(prefix, 2, 2, adapter);
      LoraReport r = merge_lora(base, lora, LoraOptions{/*alpha=*/1.0, /*rank=*/2});
      ASSERT_EQ(r.merged, std::vector<std::string>{"blocks.0.self_attn.q.weight"});
      const at::Tensor& a = lora.tensors[prefix + "blocks.0.self_attn.q.lora_A" + adapter + ".weight"];
      const at::Tensor& b = lora.tensors[prefix + "blocks.0.self_attn.q.lora_B" + adapter + ".weight"];
      at::Tensor expect = (at::full({3, 4}, 0.5) + at::matmul(b, a) * 0.5).to(at::kBFloat16);
      const at::Tensor& w = base.tensors["blocks.0.self_attn.q.weight"];
      EXPECT_EQ(w.scalar_type(), at::kBFloat16);
      EXPECT_TRUE(at::equal(w, expect));
    }
  }
}

TEST(LoraBadInput, WithoutItsBaseWeight) {
  Checkpoint base = matching_checkpoint();
  base.tensors.erase("blocks.0.self_attn.q.weight");
  expect_error([&] { merge_lora(base, lora_of("", 2, 2), LoraOptions{1.0, 2}); },
               {"liveavatar.safetensors", "no base weight \"blocks.0.self_attn.q.weight\"", "Nothing was merged"});
}

TEST(LoraBadInput, RankMismatch) {
  Checkpoint base = matching_checkpoint();
  Checkpoint before = base;
  expect_error([&] { merge_lora(base, lora_of("", 2, 3), LoraOptions{1.0, 0}); }, {"rank mismatch", "lora_B 3"});
  expect_error([&] { merge_lora(base, lora_of("", 2, 2), LoraOptions{64.0, 128}); }, {"rank 2", "r=128"});
  EXPECT_TRUE(at::equal(base.tensors["blocks.0.self_attn.q.weight"], before.tensors["blocks.0.self_attn.q.weight"]));
}

TEST(LoraBadInput, HalfAPairShapeAndUnknownKeys) {
  Checkpoint base = matching_checkpoint();
  Checkpoint lora = lora_of("", 2, 2);
  lora.tensors.erase("blocks.0.self_attn.q.lora_B.weight");
  expect_error([&] { merge_lora(base, lora, LoraOptions{1.0, 2}); }, {"no lora_B"});
  Checkpoint wide = lora_of("", 2, 2);
  wide.tensors["blocks.0.self_attn.q.lora_A.weight"] = at::zeros({2, 5});
  expect_error([&] { merge_lora(base, wide, LoraOptions{1.0, 2}); }, {"B @ A is [3, 5]"});
  Checkpoint junk = lora_of("", 2, 2);
  junk.tensors["nothing.here"] = at::zeros({1});
  expect_error([&] { merge_lora(base, junk, LoraOptions{1.0, 2}); }, {"\"nothing.here\" names no weight"});
}

TEST(Lora, FullWeightsInTheFileReplaceTheBase) {
  Checkpoint base = matching_checkpoint();
  Checkpoint lora = lora_of("base_model.model.", 2, 2);
  lora.tensors["base_model.model.head.head.base_layer.bias"] = at::full({2}, 9.0);
  LoraReport r = merge_lora(base, lora, LoraOptions{1.0, 2});
  EXPECT_EQ(r.replaced, std::vector<std::string>{"head.head.bias"});
  EXPECT_EQ(base.tensors["head.head.bias"][0].item<float>(), 9.f);
  LoraOptions strict{1.0, 2};
  strict.allow_full_weights = false;
  Checkpoint base2 = matching_checkpoint();
  expect_error([&] { merge_lora(base2, lora, strict); }, {"non-LoRA key"});
}

// --- conversion ------------------------------------------------------------------------------------------------

TEST(Convert, FloatDtypes) {
  for (auto t : {at::kFloat, at::kHalf, at::kBFloat16}) {
    Checkpoint ck = matching_checkpoint();
    ck.tensors["ids"] = at::arange(3, at::kLong);
    ConvertOptions options;
    options.float_dtype = t;
    convert(ck, options);
    EXPECT_EQ(ck.tensors["head.head.weight"].scalar_type(), t);
    EXPECT_EQ(ck.tensors["ids"].scalar_type(), at::kLong);
  }
}

TEST(Convert, Fp8PerTensorFollowsTheUpstreamScheme) {
  at::manual_seed(1);
  Checkpoint ck;
  at::Tensor w = (at::randn({16, 8}) * 3).to(at::kBFloat16);
  for (const char* m : {"blocks.0.self_attn.q", "text_embedding.0", "time_embedding.2", "time_projection.1",
                        "head.head", "casual_audio_encoder.encoder.final_linear", "trainable_cond_mask"}) {
    ck.tensors[std::string(m) + ".weight"] = w;
  }
  ck.tensors["blocks.0.norm3.weight"] = at::ones({8}, at::kBFloat16);
  ConvertOptions o;
  o.fp8 = true;
  EXPECT_EQ(convert(ck, o), 1u);
  ASSERT_EQ(ck.tensors.count("blocks.0.self_attn.q.weight"), 0u);
  const at::Tensor& q = ck.tensors.at("blocks.0.self_attn.q.weight_fp8");
  const at::Tensor& s = ck.tensors.at("blocks.0.self_attn.q.weight_scale");
  EXPECT_EQ(q.scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_EQ(s.dim(), 0);
  EXPECT_NEAR(s.item<float>(), std::max(1.f, w.abs().max().to(at::kFloat).item<float>()) / 448.f, 1e-6);
  at::Tensor back = q.to(at::kFloat) * s;
  EXPECT_LT((back - w.to(at::kFloat)).abs().max().item<float>(), 0.07f * w.abs().max().item<float>());
  for (const char* kept : {"text_embedding.0.weight", "head.head.weight", "trainable_cond_mask.weight",
                           "casual_audio_encoder.encoder.final_linear.weight", "blocks.0.norm3.weight"}) {
    EXPECT_EQ(ck.tensors.at(kept).scalar_type(), at::kBFloat16) << kept;
  }
}

TEST(Convert, Fp8PerChannelAndWithACast) {
  at::manual_seed(2);
  Checkpoint ck;
  at::Tensor w = at::randn({4, 8});
  w[2] *= 100;
  ck.tensors["blocks.0.ffn.0.weight"] = w;
  ck.tensors["blocks.0.ffn.0.bias"] = at::zeros({4});
  ConvertOptions o;
  o.fp8 = true;
  o.fp8_scaling = Fp8Scaling::kPerChannel;
  o.float_dtype = at::kBFloat16;
  convert(ck, o);
  const at::Tensor& s = ck.tensors.at("blocks.0.ffn.0.weight_scale");
  EXPECT_EQ(s.sizes(), (at::IntArrayRef{4}));
  EXPECT_EQ(s.scalar_type(), at::kFloat);
  // upstream clamps the quantisation factor 448 / amax at 448: amax below 1 keeps the scale 1 / 448
  EXPECT_TRUE(at::allclose(s, std::get<0>(w.abs().max(1)).clamp_min(1.0) / 448));
  EXPECT_EQ(ck.tensors.at("blocks.0.ffn.0.bias").scalar_type(), at::kBFloat16);
  at::Tensor back = ck.tensors.at("blocks.0.ffn.0.weight_fp8").to(at::kFloat) * s.unsqueeze(1);
  EXPECT_LT(((back - w).abs() / w.abs().amax(1, true)).max().item<float>(), 0.07f);
}
