// CausalWanModel_S2V: embeddings, the conditioning-sink prefill and the streaming block forward.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "model.h"

#include <ATen/core/Generator.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/modules/activation.h>

#include <algorithm>

namespace liveavatar::dit {

at::Tensor sinusoidal_embedding(int64_t dim, const at::Tensor& position) {
  const int64_t half = dim / 2;
  const auto pos = position.to(at::kDouble);
  const auto inv = at::pow(10000, -(at::arange(half, at::kDouble).div(half)));
  const auto sinusoid = at::outer(pos, inv);                   // [N, half]
  return at::cat({at::cos(sinusoid), at::sin(sinusoid)}, 1);  // [N, dim]
}

CausalWanModelS2VImpl::CausalWanModelS2VImpl(const ModelConfig& cfg) : config(cfg) {
  config.validate();
  const int64_t dim = cfg.dim;
  using namespace torch::nn;
  const auto& p = cfg.patch_size;
  // Registration order = upstream construction order (state_dict order).
  patch_embedding = register_module(
      "patch_embedding", Conv3d(Conv3dOptions(cfg.in_dim, dim, {p[0], p[1], p[2]}).stride({p[0], p[1], p[2]})));
  text_embedding = register_module(
      "text_embedding", Sequential(Linear(cfg.text_dim, dim), GELU(GELUOptions().approximate("tanh")), Linear(dim, dim)));
  time_embedding = register_module("time_embedding", Sequential(Linear(cfg.freq_dim, dim), SiLU(), Linear(dim, dim)));
  time_projection = register_module("time_projection", Sequential(SiLU(), Linear(dim, dim * 6)));
  blocks = register_module("blocks", ModuleList());
  for (int64_t i = 0; i < cfg.num_layers; ++i)
    blocks->push_back(Block(BlockOptions{dim, cfg.ffn_dim, cfg.num_heads, cfg.eps}));
  head = register_module("head", Head(HeadOptions{dim, cfg.out_dim, cfg.patch_size, cfg.eps}));
  cond_encoder = register_module(
      "cond_encoder", Conv3d(Conv3dOptions(cfg.cond_dim, dim, {p[0], p[1], p[2]}).stride({p[0], p[1], p[2]})));
  casual_audio_encoder = register_module(
      "casual_audio_encoder",
      AudioEncoder(AudioEncoderOptions{cfg.audio_dim, cfg.audio_layers, dim, cfg.num_audio_token, cfg.enable_adain}));
  injector_index_.assign(static_cast<size_t>(cfg.num_layers), -1);
  int64_t n = 0;
  for (int64_t layer = 0; layer < cfg.num_layers; ++layer)
    if (std::find(cfg.audio_inject_layers.begin(), cfg.audio_inject_layers.end(), layer) !=
        cfg.audio_inject_layers.end())
      injector_index_[static_cast<size_t>(layer)] = n++;
  audio_injector = register_module(
      "audio_injector", AudioInjector(AudioInjectorOptions{dim, cfg.num_heads, n, cfg.enable_adain,
                                                           cfg.adain_mode != "attn_norm", cfg.eps, cfg.adain_eps}));
  trainable_cond_mask = register_module("trainable_cond_mask", Embedding(3, dim));
  frame_packer = register_module("frame_packer", FramePack(FramePackOptions{dim, cfg.in_dim, cfg.framepack_buckets}));
}

at::Tensor CausalWanModelS2VImpl::embed_text(const at::Tensor& context) {
  if (context.dim() != 2 || context.size(1) != config.text_dim || context.size(0) > config.text_len)
    throw DitError("text context must be [L <= " + std::to_string(config.text_len) + ", " +
                   std::to_string(config.text_dim) + "], got " + c10::str(context.sizes()));
  const auto w = text_embedding[0]->as<torch::nn::LinearImpl>()->weight;
  auto padded = at::zeros({config.text_len, config.text_dim}, w.options());
  padded.slice(0, 0, context.size(0)).copy_(context);
  return text_embedding->forward(padded.unsqueeze(0));  // [1, text_len, dim]
}

std::pair<at::Tensor, at::Tensor> CausalWanModelS2VImpl::embed_time(const at::Tensor& t) {
  // Rows: the F timesteps of the block, then F zeros (zero_timestep: the t = 0 modulation of ref / motion tokens).
  const int64_t f = t.numel();
  const auto tt = at::cat({t.reshape({1, f}).to(at::kCPU), at::zeros({1, f}, t.options().device(at::kCPU))});
  const auto sin = sinusoidal_embedding(config.freq_dim, tt.flatten()).to(at::kFloat).to(patch_embedding->weight.device());
  auto lin = [](torch::nn::Sequential& seq, size_t i) -> const torch::nn::LinearImpl& {
    return *seq[i]->as<torch::nn::LinearImpl>();
  };
  auto e = linear_f32(at::silu(linear_f32(sin, lin(time_embedding, 0))), lin(time_embedding, 2));  // [2F, dim]
  auto e0 = linear_f32(at::silu(e), lin(time_projection, 1));                                      // [2F, 6 dim]
  e0 = e0.unflatten(1, {6, config.dim}).unflatten(0, {2, f});                   // [2, F, 6, dim]
  const auto e0_pair = at::cat({e0.slice(0, 0, 1).unsqueeze(3), e0.slice(0, 1, 2).unsqueeze(3)}, 3);  // [1,F,6,2,dim]
  return {e.slice(0, 0, f), e0_pair};
}

std::pair<at::Tensor, at::Tensor> CausalWanModelS2VImpl::encode_audio(const at::Tensor& audio) {
  if (audio.dim() != 4 || audio.size(1) != config.audio_layers || audio.size(2) != config.audio_dim)
    throw DitError("audio features must be [1, " + std::to_string(config.audio_layers) + ", " +
                   std::to_string(config.audio_dim) + ", T], got " + c10::str(audio.sizes()));
  const auto dev = patch_embedding->weight.device();
  const auto a = audio.to(dev);
  const auto padded = at::cat({a.slice(3, 0, 1).repeat({1, 1, 1, config.motion_frames}), a}, 3);
  auto [global, local] = casual_audio_encoder->forward(padded);
  const auto dtype = patch_embedding->weight.scalar_type();
  const int64_t skip = config.lat_motion_frames();
  local = local.to(dtype).slice(1, skip);
  if (global.defined()) global = global.to(dtype).slice(1, skip);
  return {global, local};
}

std::vector<RopeSegment> cond_segments(const ModelConfig& config, int64_t hp, int64_t wp, int64_t lh, int64_t lw) {
  const auto& bk = config.framepack_buckets;
  std::vector<RopeSegment> segs;
  // Group 0: the (empty) noisy group of the sink call; group 1: the reference frame; both roll with the stream.
  segs.push_back({0, 0, 0, 0, hp, wp, 0, hp, wp, true});
  segs.push_back({config.ref_rope_frame, 0, 0, config.ref_rope_frame + 1, hp, wp, 1, hp, wp, true});
  // FramePack groups at negative frames: 1x [-b0, 0), 2x [-(b0+b1), +b1/2), 4x [-(b0+b1+b2), +b2/4); the token
  // grids are lh/2, lh/4, lh/8 high, spread over the hp x wp range of the reference.
  const int64_t s1 = -bk[0], s2 = -(bk[0] + bk[1]), s4 = -(bk[0] + bk[1] + bk[2]);
  segs.push_back({s1, 0, 0, s1 + bk[0], lh / 2, lw / 2, bk[0], lh / 2, lw / 2, false});
  segs.push_back({s2, 0, 0, s2 + bk[1] / 2, lh / 4, lw / 4, bk[1], lh / 2, lw / 2, false});
  segs.push_back({s4, 0, 0, s4 + bk[2] / 4, lh / 8, lw / 8, bk[2], lh / 2, lw / 2, false});
  return segs;
}

std::pair<at::Tensor, std::vector<RopeSegment>> CausalWanModelS2VImpl::cond_tokens(const at::Tensor& ref,
                                                                                    const at::Tensor& motion) {
  const auto& w = patch_embedding->weight;
  const auto ref_emb = patch_embedding(ref.to(w.device(), w.scalar_type()).unsqueeze(0));  // [1, dim, 1, h, w]
  const int64_t hp = ref_emb.size(3), wp = ref_emb.size(4);
  const auto ref_tok = ref_emb.flatten(2).transpose(1, 2);                               // [1, h*w, dim]
  const auto mot_tok = frame_packer(motion.to(w.device(), w.scalar_type()));             // [1, Lm, dim]
  const int64_t lh = motion.size(2), lw = motion.size(3);
  const auto segs = cond_segments(config, hp, wp, lh, lw);
  // trainable_cond_mask: 1 for the reference tokens, 2 for the motion tokens.
  const auto& table = trainable_cond_mask->weight;
  auto x = at::cat({ref_tok + table[1].to(ref_tok.scalar_type()), mot_tok + table[2].to(mot_tok.scalar_type())}, 1);
  return {x, segs};
}

void CausalWanModelS2VImpl::prefill(const at::Tensor& ref, const at::Tensor& motion, const at::Tensor& context_emb,
                                    CondCache& cache) {
  if (ref.dim() != 4 || ref.size(0) != config.in_dim || ref.size(1) != 1)
    throw DitError("reference latent must be [" + std::to_string(config.in_dim) + ", 1, H, W], got " +
                   c10::str(ref.sizes()));
  if (motion.dim() != 4 || motion.size(0) != config.in_dim || motion.size(2) != ref.size(2) ||
      motion.size(3) != ref.size(3))
    throw DitError("motion latents must be [" + std::to_string(config.in_dim) + ", T, H, W] like the reference, got " +
                   c10::str(motion.sizes()));
  auto [x, segs] = cond_tokens(ref, motion);
  const auto positions = rope_positions(segs, 0);
  if (positions.size(0) != x.size(1))
    throw DitError("sink: " + std::to_string(x.size(1)) + " tokens but RoPE covers " +
                   std::to_string(positions.size(0)) + " (latent H, W must be multiples of 8)");
  const auto table = rope_table(positions, config.head_dim()).to(x.device());
  const auto zero_t = at::zeros({config.frames_per_block}, at::kFloat);
  const auto e0 = embed_time(zero_t).second;
  cache.layers.assign(static_cast<size_t>(config.num_layers), {});
  cache.segments = segs;
  cache.tokens = x.size(1);
  for (int64_t i = 0; i < config.num_layers; ++i) {
    auto block = blocks[static_cast<size_t>(i)]->as<BlockImpl>();
    auto& slot = cache.layers[static_cast<size_t>(i)];
    const auto mod = block->modulation_for(e0, /*conditioning=*/true);
    x = block->forward(x, mod, context_emb, [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
      return sink_attention(q, k, v, table, slot);
    });
  }
}

at::Tensor sink_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                          LayerKV& slot) {
  const auto dtype = v.scalar_type();
  slot.k = k.contiguous();  // stored un-roped; re-roped at every call
  slot.v = v.contiguous();
  const auto rq = rope_apply(q, table).to(dtype);
  const auto rk = rope_apply(k, table).to(dtype);
  return sdpa_blhd(rq, rk, slot.v);
}

RingWindow ring_window(int64_t current_start, int64_t seq, int64_t capacity) {
  if (capacity <= 0 || capacity % seq != 0)
    throw DitError("KV ring of " + std::to_string(capacity) + " tokens does not hold whole blocks of " +
                   std::to_string(seq));
  if (current_start >= capacity) return {current_start % capacity, capacity};
  return {current_start, current_start + seq};
}

at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                          const at::Tensor& cond_table, LayerKV& ring, const LayerKV& sink, const RingWindow& window) {
  const auto dtype = v.scalar_type();
  const int64_t seq = k.size(1);
  const auto rq = rope_apply(q, table).to(dtype);
  const auto rk = rope_apply(k, table).to(dtype);
  ring.k.slice(1, window.start, window.start + seq).copy_(rk);
  ring.v.slice(1, window.start, window.start + seq).copy_(v);
  const auto keys = at::cat({ring.k.slice(1, 0, window.active), rope_apply(sink.k, cond_table).to(dtype)}, 1);
  const auto values = at::cat({ring.v.slice(1, 0, window.active), sink.v}, 1);
  return sdpa_blhd(rq, keys, values);
}

int64_t CausalWanModelS2VImpl::cond_rollout(int64_t current_frame, int64_t rope_offset) const {
  const int64_t start_idx = config.ref_rope_frame - rope_offset;
  return std::max<int64_t>(0, current_frame - start_idx);
}

KVCache CausalWanModelS2VImpl::make_kv_cache(int64_t frame_tokens) const {
  KVCache kv;
  kv.capacity = config.clip_frames * frame_tokens;
  const auto& w = patch_embedding->weight;
  for (int64_t i = 0; i < config.num_layers; ++i)
    kv.layers.push_back({at::zeros({1, kv.capacity, config.num_heads, config.head_dim()}, w.options()),
                         at::zeros({1, kv.capacity, config.num_heads, config.head_dim()}, w.options())});
  return kv;
}

at::Tensor CausalWanModelS2VImpl::forward_block(const at::Tensor& x_in, double t, const at::Tensor& context_emb,
                                                const at::Tensor& cond_states, const at::Tensor& audio, KVCache& kv,
                                                const CondCache& cond, int64_t current_start, int64_t rope_offset) {
  const auto& w = patch_embedding->weight;
  const auto dtype = w.scalar_type();
  if (x_in.dim() != 4 || x_in.size(0) != config.in_dim)
    throw DitError("latents must be [" + std::to_string(config.in_dim) + ", F, H, W], got " + c10::str(x_in.sizes()));
  if (cond.layers.size() != static_cast<size_t>(config.num_layers))
    throw DitError("the conditioning sink is empty: prefill (set_condition) before denoising");
  const auto x5 = x_in.to(w.device(), dtype).unsqueeze(0);  // [1, C, F, H, W]
  const int64_t frames = x5.size(2);
  auto emb = patch_embedding(x5);                           // [1, dim, F, h, w]
  at::Tensor cs = cond_states.defined() ? cond_states.to(w.device(), dtype).unsqueeze(0)
                                        : at::zeros({1, config.cond_dim, frames, x5.size(3), x5.size(4)}, w.options());
  emb = emb + cond_encoder(cs);
  const int64_t hp = emb.size(3), wp = emb.size(4);
  const int64_t frame_tokens = hp * wp;
  auto x = emb.flatten(2).transpose(1, 2);  // [1, L, dim]
  const int64_t seq = x.size(1);
  x = x + trainable_cond_mask->weight[0].to(dtype);

  // Audio tokens of this block (all 25 wav2vec2 layers in, motion-frame padding dropped).
  auto [audio_global, audio_local] = encode_audio(audio);
  if (audio_local.size(1) != frames)
    throw DitError("audio gives " + std::to_string(audio_local.size(1)) + " latent frames for a block of " +
                   std::to_string(frames) + ": pass " + std::to_string(4 * frames) + " audio frames per block");

  // RoPE: noisy tokens at their absolute frames; the sink re-roped with the reference shifted by the offset.
  const int64_t current_frame = current_start / frame_tokens;
  const std::vector<RopeSegment> noisy{{0, 0, 0, frames, hp, wp, frames, hp, wp, true}};
  const auto table = rope_table(rope_positions(noisy, current_frame), config.head_dim()).to(w.device());
  const auto cond_table =
      rope_table(rope_positions(cond.segments, cond_rollout(current_frame, rope_offset)), config.head_dim())
          .to(w.device());

  const auto t_vec = at::full({frames}, t, at::kFloat);
  auto [e, e0] = embed_time(t_vec);

  // Ring slot of this block.
  if (kv.layers.size() != static_cast<size_t>(config.num_layers) || kv.capacity % seq != 0)
    throw DitError("KV cache of " + std::to_string(kv.capacity) + " tokens does not hold whole blocks of " +
                   std::to_string(seq));
  const RingWindow window = ring_window(current_start, seq, kv.capacity);

  for (int64_t i = 0; i < config.num_layers; ++i) {
    auto block = blocks[static_cast<size_t>(i)]->as<BlockImpl>();
    auto& slot = kv.layers[static_cast<size_t>(i)];
    const auto& sink = cond.layers[static_cast<size_t>(i)];
    const auto mod = block->modulation_for(e0, /*conditioning=*/false);
    x = block->forward(x, mod, context_emb, [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
      return ring_attention(q, k, v, table, cond_table, slot, sink, window);
    });
    const int64_t inj = injector_index_[static_cast<size_t>(i)];
    if (inj >= 0) x = x + audio_injector->forward(inj, x, audio_local, audio_global);
  }

  // Head on the noisy tokens, then unpatchify [L, c * p] -> [c, F * p0, h * p1, w * p2].
  auto out = head(x, e);  // [1, L, c * prod(patch)]
  const auto& p = config.patch_size;
  const int64_t c = config.out_dim;
  out = out[0].view({frames, hp, wp, p[0], p[1], p[2], c}).permute({6, 0, 3, 1, 4, 2, 5});
  return out.reshape({c, frames * p[0], hp * p[1], wp * p[2]});
}

void randomize_parameters(torch::nn::Module& module, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto& item : module.named_parameters(/*recurse=*/true)) {
    auto& p = item.value();
    auto values = at::empty(p.sizes(), at::kFloat);
    values.normal_(0.0, 0.02, gen);
    if (p.dim() <= 1) values.normal_(0.0, 0.1, gen);
    p.copy_(values);
  }
}

}  // namespace liveavatar::dit
