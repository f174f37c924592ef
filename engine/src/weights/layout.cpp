// SPDX-License-Identifier: LGPL-2.1-or-later
#include "layout.h"

#include <nlohmann/json.hpp>

namespace liveavatar::weights {

using json = nlohmann::json;

namespace {

class Builder {
 public:
  Builder(Layout& out, at::ScalarType dtype) : out_(out), dtype_(dtype) {}
  void add(const std::string& key, std::vector<int64_t> shape) { out_[key] = TensorSpec{std::move(shape), dtype_}; }
  void linear(const std::string& m, int64_t in, int64_t out, bool bias = true) {
    add(m + ".weight", {out, in});
    if (bias) add(m + ".bias", {out});
  }
  void conv(const std::string& m, int64_t in, int64_t out, std::vector<int64_t> kernel, bool bias = true) {
    std::vector<int64_t> s = {out, in};
    s.insert(s.end(), kernel.begin(), kernel.end());
    add(m + ".weight", s);
    if (bias) add(m + ".bias", {out});
  }

 private:
  Layout& out_;
  at::ScalarType dtype_;
};

// WanSelfAttention / WanCrossAttention / AudioCrossAttention with qk_norm: q k v o + RMS norms.
void wan_attention(Builder& b, const std::string& m, int64_t dim) {
  for (const char* p : {"q", "k", "v", "o"}) b.linear(m + "." + p, dim, dim);
  b.add(m + ".norm_q.weight", {dim});
  b.add(m + ".norm_k.weight", {dim});
}

}  // namespace

ModelConfig ModelConfig::tiny() {
  ModelConfig c;
  c.dit.dim = 64;
  c.dit.ffn_dim = 128;
  c.dit.num_heads = 4;
  c.dit.num_layers = 2;
  c.dit.freq_dim = 32;
  c.dit.text_dim = 32;
  c.dit.cond_dim = 16;
  c.dit.audio_dim = 32;
  c.dit.audio_inject_layers = {0, 1};
  c.vae.dim = 8;
  c.t5.vocab_size = 64;
  c.t5.dim = 32;
  c.t5.dim_attn = 32;
  c.t5.dim_ffn = 64;
  c.t5.num_heads = 4;
  c.t5.num_layers = 2;
  c.t5.num_buckets = 8;
  c.wav2vec2.hidden_size = 32;            // = dit.audio_dim
  c.wav2vec2.num_hidden_layers = 24;      // CausalAudioEncoder needs 25 hidden states
  c.wav2vec2.num_attention_heads = 2;
  c.wav2vec2.intermediate_size = 64;
  c.wav2vec2.conv_dim = {16, 16, 16, 16, 16, 16, 16};
  c.wav2vec2.num_conv_pos_embeddings = 16;
  c.wav2vec2.num_conv_pos_embedding_groups = 4;
  c.lora.rank = 4;
  c.lora.alpha = 2.0;  // alpha / r = 0.5 as the published 64 / 128
  return c;
}

int64_t audio_injector_count(const dit::ModelConfig& c) {
  int64_t n = 0;
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string name = "root.transformer_blocks." + std::to_string(i);
    for (int64_t id : c.audio_inject_layers) {
      if (name.find("transformer_blocks." + std::to_string(id)) != std::string::npos) ++n;
    }
  }
  return n;
}

Layout dit_layout(const dit::ModelConfig& c, at::ScalarType dtype) {
  Layout out;
  Builder b(out, dtype);
  const int64_t d = c.dim;
  const std::vector<int64_t> p(c.patch_size.begin(), c.patch_size.end());
  b.conv("patch_embedding", c.in_dim, d, p);
  b.linear("text_embedding.0", c.text_dim, d);
  b.linear("text_embedding.2", d, d);
  b.linear("time_embedding.0", c.freq_dim, d);
  b.linear("time_embedding.2", d, d);
  b.linear("time_projection.1", d, 6 * d);
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string m = "blocks." + std::to_string(i);
    wan_attention(b, m + ".self_attn", d);
    wan_attention(b, m + ".cross_attn", d);
    b.add(m + ".norm3.weight", {d});  // cross_attn_norm=True: affine LayerNorm
    b.add(m + ".norm3.bias", {d});
    b.linear(m + ".ffn.0", d, c.ffn_dim);
    b.linear(m + ".ffn.2", c.ffn_dim, d);
    b.add(m + ".modulation", {1, 6, d});
  }
  b.linear("head.head", d, p[0] * p[1] * p[2] * c.out_dim);
  b.add("head.modulation", {1, 2, d});
  if (c.cond_dim > 0) b.conv("cond_encoder", c.cond_dim, d, p);
  // CausalAudioEncoder -> MotionEncoder_tc(in_dim=audio_dim, hidden_dim=dim, num_heads=num_audio_token)
  b.add("casual_audio_encoder.weights", {1, c.audio_layers, 1, 1});
  const std::string e = "casual_audio_encoder.encoder";
  b.conv(e + ".conv1_local.conv", c.audio_dim, d / 4 * c.num_audio_token, {3});
  if (c.enable_adain) b.conv(e + ".conv1_global.conv", c.audio_dim, d / 4, {3});
  b.conv(e + ".conv2.conv", d / 4, d / 2, {3});
  b.conv(e + ".conv3.conv", d / 2, d, {3});
  if (c.enable_adain) b.linear(e + ".final_linear", d, d);
  b.add(e + ".padding_tokens", {1, 1, 1, d});
  const int64_t n_inj = audio_injector_count(c);
  for (int64_t k = 0; k < n_inj; ++k) {
    const std::string s = std::to_string(k);
    wan_attention(b, "audio_injector.injector." + s, d);
    if (c.enable_adain) b.linear("audio_injector.injector_adain_layers." + s + ".linear", d, 2 * d);
    if (c.enable_adain && c.adain_mode != "attn_norm") {
      b.linear("audio_injector.injector_adain_output_layers." + s, d, d);
    }
  }
  b.add("trainable_cond_mask.weight", {3, d});
  b.conv("frame_packer.proj", 16, d, {1, 2, 2});  // enable_framepack=True (the only setting LiveAvatar runs)
  b.conv("frame_packer.proj_2x", 16, d, {2, 4, 4});
  b.conv("frame_packer.proj_4x", 16, d, {4, 8, 8});
  return out;
}

namespace {

void vae_residual(Builder& b, const std::string& m, int64_t in, int64_t out) {
  b.add(m + ".residual.0.gamma", {in, 1, 1, 1});
  b.conv(m + ".residual.2", in, out, {3, 3, 3});
  b.add(m + ".residual.3.gamma", {out, 1, 1, 1});
  b.conv(m + ".residual.6", out, out, {3, 3, 3});
  if (in != out) b.conv(m + ".shortcut", in, out, {1, 1, 1});
}

void vae_attention(Builder& b, const std::string& m, int64_t dim) {
  b.add(m + ".norm.gamma", {dim, 1, 1});
  b.conv(m + ".to_qkv", dim, 3 * dim, {1, 1});
  b.conv(m + ".proj", dim, dim, {1, 1});
}

void vae_middle(Builder& b, const std::string& m, int64_t dim) {
  vae_residual(b, m + ".0", dim, dim);
  vae_attention(b, m + ".1", dim);
  vae_residual(b, m + ".2", dim, dim);
}

}  // namespace

Layout vae_layout(const vae::VaeConfig& c, at::ScalarType dtype) {
  Layout out;
  Builder b(out, dtype);
  const size_t levels = c.dim_mult.size();
  // Encoder3d(dim, z_dim * 2, ...)
  std::vector<int64_t> dims = {c.dim};
  for (int64_t m : c.dim_mult) dims.push_back(c.dim * m);
  b.conv("encoder.conv1", 3, dims[0], {3, 3, 3});
  int64_t j = 0;
  for (size_t i = 0; i + 1 < dims.size(); ++i) {
    int64_t in = dims[i], o = dims[i + 1];
    for (int64_t r = 0; r < c.num_res_blocks; ++r, in = o) vae_residual(b, "encoder.downsamples." + std::to_string(j++), in, o);
    if (i != levels - 1) {
      const std::string m = "encoder.downsamples." + std::to_string(j++);
      b.conv(m + ".resample.1", o, o, {3, 3});
      if (c.temperal_downsample[i]) b.conv(m + ".time_conv", o, o, {3, 1, 1});
    }
  }
  vae_middle(b, "encoder.middle", dims.back());
  b.add("encoder.head.0.gamma", {dims.back(), 1, 1, 1});
  b.conv("encoder.head.2", dims.back(), 2 * c.z_dim, {3, 3, 3});
  b.conv("conv1", 2 * c.z_dim, 2 * c.z_dim, {1, 1, 1});
  b.conv("conv2", c.z_dim, c.z_dim, {1, 1, 1});
  // Decoder3d(dim, z_dim, ..., temperal_upsample = reversed temperal_downsample)
  std::vector<int64_t> ddims = {c.dim * c.dim_mult.back()};
  for (size_t i = levels; i-- > 0;) ddims.push_back(c.dim * c.dim_mult[i]);
  std::vector<bool> up(c.temperal_downsample.rbegin(), c.temperal_downsample.rend());
  b.conv("decoder.conv1", c.z_dim, ddims[0], {3, 3, 3});
  vae_middle(b, "decoder.middle", ddims[0]);
  j = 0;
  for (size_t i = 0; i + 1 < ddims.size(); ++i) {
    int64_t in = ddims[i], o = ddims[i + 1];
    if (i == 1 || i == 2 || i == 3) in /= 2;
    for (int64_t r = 0; r < c.num_res_blocks + 1; ++r, in = o) {
      vae_residual(b, "decoder.upsamples." + std::to_string(j++), in, o);
    }
    if (i != levels - 1) {
      const std::string m = "decoder.upsamples." + std::to_string(j++);
      b.conv(m + ".resample.1", o, o / 2, {3, 3});
      if (up[i]) b.conv(m + ".time_conv", o, 2 * o, {3, 1, 1});
    }
  }
  b.add("decoder.head.0.gamma", {ddims.back(), 1, 1, 1});
  b.conv("decoder.head.2", ddims.back(), 3, {3, 3, 3});
  return out;
}

Layout t5_layout(const text::T5Config& c, at::ScalarType dtype) {
  Layout out;
  Builder b(out, dtype);
  b.add("token_embedding.weight", {c.vocab_size, c.dim});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string m = "blocks." + std::to_string(i);
    b.add(m + ".norm1.weight", {c.dim});
    for (const char* p : {"q", "k", "v"}) b.linear(m + ".attn." + p, c.dim, c.dim_attn, /*bias=*/false);
    b.linear(m + ".attn.o", c.dim_attn, c.dim, /*bias=*/false);
    b.add(m + ".norm2.weight", {c.dim});
    b.linear(m + ".ffn.gate.0", c.dim, c.dim_ffn, /*bias=*/false);
    b.linear(m + ".ffn.fc1", c.dim, c.dim_ffn, /*bias=*/false);
    b.linear(m + ".ffn.fc2", c.dim_ffn, c.dim, /*bias=*/false);
    b.add(m + ".pos_embedding.embedding.weight", {c.num_buckets, c.num_heads});  // shared_pos=False
  }
  b.add("norm.weight", {c.dim});
  return out;
}

Layout wav2vec2_layout(const audio::Wav2Vec2Config& c, at::ScalarType dtype) {
  Layout out;
  Builder b(out, dtype);
  const std::string w = "wav2vec2.";
  int64_t in = 1;
  for (size_t i = 0; i < c.conv_dim.size(); ++i) {
    const std::string m = w + "feature_extractor.conv_layers." + std::to_string(i);
    b.conv(m + ".conv", in, c.conv_dim[i], {c.conv_kernel[i]});  // conv_bias=True
    b.add(m + ".layer_norm.weight", {c.conv_dim[i]});           // feat_extract_norm="layer"
    b.add(m + ".layer_norm.bias", {c.conv_dim[i]});
    in = c.conv_dim[i];
  }
  const int64_t h = c.hidden_size;
  b.add(w + "feature_projection.layer_norm.weight", {in});
  b.add(w + "feature_projection.layer_norm.bias", {in});
  b.linear(w + "feature_projection.projection", in, h);
  b.add(w + "masked_spec_embed", {h});
  const std::string pc = w + "encoder.pos_conv_embed.conv";
  b.add(pc + ".weight_g", {1, 1, c.num_conv_pos_embeddings});  // weight_norm(dim=2)
  b.add(pc + ".weight_v", {h, h / c.num_conv_pos_embedding_groups, c.num_conv_pos_embeddings});
  b.add(pc + ".bias", {h});
  b.add(w + "encoder.layer_norm.weight", {h});  // do_stable_layer_norm=True
  b.add(w + "encoder.layer_norm.bias", {h});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string m = w + "encoder.layers." + std::to_string(i);
    for (const char* p : {"k_proj", "v_proj", "q_proj", "out_proj"}) b.linear(m + ".attention." + p, h, h);
    b.add(m + ".layer_norm.weight", {h});
    b.add(m + ".layer_norm.bias", {h});
    b.linear(m + ".feed_forward.intermediate_dense", h, c.intermediate_size);
    b.linear(m + ".feed_forward.output_dense", c.intermediate_size, h);
    b.add(m + ".final_layer_norm.weight", {h});
    b.add(m + ".final_layer_norm.bias", {h});
  }
  b.linear("lm_head", h, c.vocab_size);
  return out;
}

Layout lora_layout(const dit::ModelConfig& dit, const LoraOptions& lora, at::ScalarType dtype) {
  Layout out;
  Builder b(out, dtype);
  for (const auto& kv : dit_layout(dit, dtype)) {
    const std::string& key = kv.first;
    if (kv.second.shape.size() != 2 || key.size() < 7 || key.compare(key.size() - 7, 7, ".weight") != 0) continue;
    const std::string module = key.substr(0, key.size() - 7);
    bool targeted = false;
    for (const auto& t : lora.targets) {
      const std::string suffix = "." + t;
      targeted = targeted || (module.size() > suffix.size() &&
                              module.compare(module.size() - suffix.size(), suffix.size(), suffix) == 0);
    }
    if (!targeted) continue;
    b.add(module + ".lora_A.weight", {lora.rank, kv.second.shape[1]});
    b.add(module + ".lora_B.weight", {kv.second.shape[0], lora.rank});
  }
  return out;
}

uint64_t layout_numel(const Layout& layout) {
  uint64_t n = 0;
  for (const auto& kv : layout) {
    uint64_t e = 1;
    for (int64_t s : kv.second.shape) e *= static_cast<uint64_t>(s);
    n += e;
  }
  return n;
}


std::string wav2vec2_config_json(const audio::Wav2Vec2Config& c) {
  json j = {{"architectures", {"Wav2Vec2ForCTC"}},
            {"model_type", "wav2vec2"},
            {"hidden_size", c.hidden_size},
            {"num_hidden_layers", c.num_hidden_layers},
            {"num_attention_heads", c.num_attention_heads},
            {"intermediate_size", c.intermediate_size},
            {"conv_dim", c.conv_dim},
            {"conv_kernel", c.conv_kernel},
            {"conv_stride", c.conv_stride},
            {"conv_bias", true},
            {"feat_extract_norm", "layer"},
            {"do_stable_layer_norm", true},
            {"num_conv_pos_embeddings", c.num_conv_pos_embeddings},
            {"num_conv_pos_embedding_groups", c.num_conv_pos_embedding_groups},
            {"vocab_size", c.vocab_size},
            {"mask_time_prob", 0.05}};
  return j.dump(2) + "\n";
}

}  // namespace liveavatar::weights
