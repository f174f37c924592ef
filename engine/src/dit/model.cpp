// CausalWanModel_S2V: embeddings, the conditioning-sink prefill and the streaming block forward.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "model.h"

#include <torch/nn/modules/activation.h>

#include <algorithm>
#include <tuple>

namespace liveavatar::dit {

at::Tensor sinusoidal_embedding(int64_t dim, const at::Tensor& position) {
  const int64_t half = dim / 2;
  const auto pos = position.to(at::kDouble);
  const auto inv = at::pow(10000, -(at::arange(half, pos.options()).div(half)));
  const auto sinusoid = at::outer(pos, inv);                   // [N, half]
  return at::cat({at::cos(sinusoid), at::sin(sinusoid)}, 1);  // [N, dim]
}

CausalWanModelS2VImpl::CausalWanModelS2VImpl(const ModelConfig& cfg) : CausalWanModelS2VImpl(cfg, BuildOptions{}) {}

CausalWanModelS2VImpl::CausalWanModelS2VImpl(const ModelConfig& cfg, const BuildOptions& options)
    : config(cfg), build_(options) {
  config.validate();
  if (build_.last_layer < 0) build_.last_layer = cfg.num_layers;
  if (build_.first_layer < 0 || build_.first_layer > build_.last_layer || build_.last_layer > cfg.num_layers)
    throw DitError("layer range [" + std::to_string(build_.first_layer) + ", " + std::to_string(build_.last_layer) +
                   ") is not inside [0, " + std::to_string(cfg.num_layers) + ")");
  const int64_t dim = cfg.dim;
  const auto& p = build_.params;
  const auto hp = p.high_precision();            // modules upstream keeps out of FP8
  const auto f32 = p.with_dtype(at::kFloat);     // modules upstream runs under autocast(float32)
  using torch::nn::GELU;
  using torch::nn::GELUOptions;
  using torch::nn::Sequential;
  using torch::nn::SiLU;
  const auto& ps = cfg.patch_size;
  // Registration order = upstream construction order (state_dict order).
  if (build_.embeddings) {
    patch_embedding = register_module("patch_embedding", PatchConv3d(cfg.in_dim, dim, ps, hp));
    text_embedding = register_module(
        "text_embedding",
        Sequential(Linear(cfg.text_dim, dim, hp), GELU(GELUOptions().approximate("tanh")), Linear(dim, dim, hp)));
    time_embedding =
        register_module("time_embedding", Sequential(Linear(cfg.freq_dim, dim, f32), SiLU(), Linear(dim, dim, f32)));
    time_projection = register_module("time_projection", Sequential(SiLU(), Linear(dim, dim * 6, f32)));
  }
  blocks = register_module("blocks", IndexedList());
  for (int64_t i = build_.first_layer; i < build_.last_layer; ++i)
    blocks->insert(i, Block(BlockOptions{dim, cfg.ffn_dim, cfg.num_heads, cfg.eps, p}).ptr());
  if (build_.head) head = register_module("head", Head(HeadOptions{dim, cfg.out_dim, cfg.patch_size, cfg.eps, f32}));
  if (build_.embeddings) {
    cond_encoder = register_module("cond_encoder", PatchConv3d(cfg.cond_dim, dim, ps, hp));
    casual_audio_encoder = register_module(
        "casual_audio_encoder",
        AudioEncoder(AudioEncoderOptions{cfg.audio_dim, cfg.audio_layers, dim, cfg.num_audio_token, cfg.enable_adain,
                                         f32}));
  }
  injector_index_.assign(static_cast<size_t>(cfg.num_layers), -1);
  std::vector<int64_t> held;
  int64_t n = 0;
  for (int64_t layer = 0; layer < cfg.num_layers; ++layer)
    if (std::find(cfg.audio_inject_layers.begin(), cfg.audio_inject_layers.end(), layer) !=
        cfg.audio_inject_layers.end()) {
      injector_index_[static_cast<size_t>(layer)] = n;
      if (layer >= build_.first_layer && layer < build_.last_layer) held.push_back(n);
      ++n;
    }
  audio_injector = register_module(
      "audio_injector", AudioInjector(AudioInjectorOptions{dim, cfg.num_heads, held, cfg.enable_adain,
                                                           cfg.adain_mode != "attn_norm", 1e-6, cfg.adain_eps, p}));
  if (build_.embeddings) {
    trainable_cond_mask = register_module("trainable_cond_mask", Embedding(3, dim, hp));
    frame_packer = register_module("frame_packer", FramePack(FramePackOptions{dim, cfg.in_dim, cfg.framepack_buckets, hp}));
  }
}

void CausalWanModelS2VImpl::require_embeddings(const char* what) const {
  if (!build_.embeddings)
    throw DitError(std::string(what) + " needs the embeddings, which this shard (layers " +
                   std::to_string(build_.first_layer) + ".." + std::to_string(build_.last_layer) +
                   ") does not hold: call it on the first shard");
}

void CausalWanModelS2VImpl::require_layers(int64_t first, int64_t last) const {
  if (!holds_layers(first, last))
    throw DitError("layers [" + std::to_string(first) + ", " + std::to_string(last) + ") are not all held by this "
                   "model (layers [" + std::to_string(build_.first_layer) + ", " +
                   std::to_string(build_.last_layer) + "))");
}

at::Tensor CausalWanModelS2VImpl::embed_text(const at::Tensor& context) {
  require_embeddings("embed_text");
  if (context.dim() != 2 || context.size(1) != config.text_dim || context.size(0) > config.text_len)
    throw DitError("text context must be [L <= " + std::to_string(config.text_len) + ", " +
                   std::to_string(config.text_dim) + "], got " + c10::str(context.sizes()));
  auto padded = at::zeros({config.text_len, config.text_dim}, options());
  padded.slice(0, 0, context.size(0)).copy_(context);
  return text_embedding->forward(padded.unsqueeze(0));  // [1, text_len, dim]
}

std::pair<at::Tensor, at::Tensor> CausalWanModelS2VImpl::embed_time(const at::Tensor& t) {
  // Rows: the F timesteps of the block, then F zeros (zero_timestep: the t = 0 modulation of ref / motion tokens).
  require_embeddings("embed_time");
  const int64_t f = t.numel();
  // On the model's device (no host computation copied in per call).
  const auto tt = at::cat({t.reshape({1, f}).to(options().device()), at::zeros({1, f}, t.options().device(options().device()))});
  const auto sin = sinusoidal_embedding(config.freq_dim, tt.flatten()).to(at::kFloat);
  auto lin = [](torch::nn::Sequential& seq, size_t i) -> const LinearImpl& { return *seq[i]->as<LinearImpl>(); };
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
  require_embeddings("encode_audio");
  const auto a = audio.to(options().device());
  const auto padded = at::cat({a.slice(3, 0, 1).repeat({1, 1, 1, config.motion_frames}), a}, 3);
  auto [global, local] = casual_audio_encoder->forward(padded);
  const auto dtype = build_.params.dtype();
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
  require_embeddings("cond_tokens");
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

SinkInputs CausalWanModelS2VImpl::prepare_sink(const at::Tensor& ref, const at::Tensor& motion) {
  require_embeddings("prepare_sink");
  if (ref.dim() != 4 || ref.size(0) != config.in_dim || ref.size(1) != 1)
    throw DitError("reference latent must be [" + std::to_string(config.in_dim) + ", 1, H, W], got " +
                   c10::str(ref.sizes()));
  if (motion.dim() != 4 || motion.size(0) != config.in_dim || motion.size(2) != ref.size(2) ||
      motion.size(3) != ref.size(3))
    throw DitError("motion latents must be [" + std::to_string(config.in_dim) + ", T, H, W] like the reference, got " +
                   c10::str(motion.sizes()));
  SinkInputs in;
  std::tie(in.hidden, in.segments) = cond_tokens(ref, motion);
  const auto positions = rope_positions(in.segments, 0);
  if (positions.size(0) != in.hidden.size(1))
    throw DitError("sink: " + std::to_string(in.hidden.size(1)) + " tokens but RoPE covers " +
                   std::to_string(positions.size(0)) + " (latent H, W must be multiples of 8)");
  in.rope = rope_real(rope_table(positions.to(options().device()), config.head_dim()));
  in.e0 = embed_time(at::zeros({config.frames_per_block}, options().dtype(at::kFloat))).second;
  return in;
}

std::vector<LayerKV> CausalWanModelS2VImpl::text_kv(const at::Tensor& context_emb, int64_t first, int64_t last) {
  require_layers(first, last);
  std::vector<LayerKV> out(static_cast<size_t>(config.num_layers));
  const auto ctx = context_emb.to(options().device());
  for (int64_t i = first; i < last; ++i)
    out[static_cast<size_t>(i)] = blocks[i]->as<BlockImpl>()->cross_attn->cross_kv(ctx);
  return out;
}

namespace {
const LayerKV& text_of(const std::vector<LayerKV>& text, int64_t layer) {
  if (static_cast<int64_t>(text.size()) <= layer || !text[static_cast<size_t>(layer)].k.defined())
    throw DitError("no text cross-attention K/V for layer " + std::to_string(layer) +
                   ": set the text (set_text / set_condition) before prefill or denoising");
  return text[static_cast<size_t>(layer)];
}
}  // namespace

void CausalWanModelS2VImpl::prefill_layers(int64_t first, int64_t last, SinkInputs& in,
                                           const std::vector<LayerKV>& text, CondCache& cache) {
  require_layers(first, last);
  const auto dev = options().device();
  auto x = in.hidden.to(dev);
  const RopeTable table{in.rope.cos.to(dev), in.rope.sin.to(dev)};
  const auto e0 = in.e0.to(dev);
  if (cache.layers.size() != static_cast<size_t>(config.num_layers))
    cache.layers.assign(static_cast<size_t>(config.num_layers), {});
  cache.segments = in.segments;
  cache.tokens = x.size(1);
  for (int64_t i = first; i < last; ++i) {
    auto block = blocks[i]->as<BlockImpl>();
    auto& slot = cache.layers[static_cast<size_t>(i)];
    const auto mod = block->modulation_for(e0, /*conditioning=*/true);
    x = block->forward(x, mod, text_of(text, i), [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
      return sink_attention(q, k, v, table, slot, build_.params.attention);
    });
    slot.k = to_kv_storage(slot.k, cache.dtype);
    slot.v = to_kv_storage(slot.v, cache.dtype);
  }
  in.hidden = x;
}

void CausalWanModelS2VImpl::prefill(const at::Tensor& ref, const at::Tensor& motion, const at::Tensor& context_emb,
                                    CondCache& cache) {
  auto in = prepare_sink(ref, motion);
  const auto text = text_kv(context_emb, 0, config.num_layers);
  cache.layers.assign(static_cast<size_t>(config.num_layers), {});
  prefill_layers(0, config.num_layers, in, text, cache);
}

at::Tensor sink_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                          LayerKV& slot) {
  return sink_attention(q, k, v, rope_real(table), slot);
}

at::Tensor sink_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RopeTable& table,
                          LayerKV& slot, AttentionKernel kernel) {
  const auto dtype = v.scalar_type();
  slot.k = k.contiguous();  // stored un-roped; re-roped at every call
  slot.v = v.contiguous();
  const auto rq = rope_apply(q, table).to(dtype);
  const auto rk = rope_apply(k, table).to(dtype);
  return sdpa_blhd(rq, rk, slot.v, kernel);
}

RingWindow ring_window(int64_t current_start, int64_t seq, int64_t capacity) {
  if (capacity <= 0 || capacity % seq != 0)
    throw DitError("KV ring of " + std::to_string(capacity) + " tokens does not hold whole blocks of " +
                   std::to_string(seq));
  if (current_start < 0 || current_start % seq != 0)
    throw DitError("a block starts at a multiple of its " + std::to_string(seq) + " tokens, not at token " +
                   std::to_string(current_start) + " (the ring holds whole blocks)");
  if (current_start >= capacity) return {current_start % capacity, capacity};
  return {current_start, current_start + seq};
}

at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                          const at::Tensor& cond_table, LayerKV& ring, const LayerKV& sink, const RingWindow& window) {
  return ring_attention(q, k, v, rope_real(table), rope_real(cond_table), ring, sink, window);
}

at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RopeTable& table,
                          const RopeTable& cond_table, LayerKV& ring, const LayerKV& sink, const RingWindow& window,
                          AttentionKernel kernel) {
  const auto dtype = v.scalar_type();
  const int64_t seq = k.size(1);
  const auto rq = rope_apply(q, table).to(dtype);
  const auto rk = rope_apply(k, table).to(dtype);
  const auto stored = ring.k.scalar_type();
  ring.k.slice(1, window.start, window.start + seq).copy_(to_kv_storage(rk, stored));
  ring.v.slice(1, window.start, window.start + seq).copy_(to_kv_storage(v, stored));
  // The ring window and the re-roped sink as two key sets of one softmax: no per-layer copy of the ring (unless it
  // is stored in another dtype than the model's: then the window is read back converted).
  return sdpa_two_blhd(rq, ring.k.slice(1, 0, window.active).to(dtype), ring.v.slice(1, 0, window.active).to(dtype),
                       rope_apply(sink.k.to(dtype), cond_table).to(dtype), sink.v.to(dtype), kernel);
}

int64_t CausalWanModelS2VImpl::cond_rollout(int64_t current_frame, int64_t rope_offset) const {
  const int64_t start_idx = config.ref_rope_frame - rope_offset;
  return std::max<int64_t>(0, current_frame - start_idx);
}

KVCache CausalWanModelS2VImpl::make_kv_cache(int64_t frame_tokens, c10::ScalarType dtype) const {
  KVCache kv;
  kv.capacity = config.clip_frames * frame_tokens;
  kv.layers.resize(static_cast<size_t>(config.num_layers));
  const auto opts = dtype == c10::ScalarType::Undefined ? options() : options().dtype(dtype);
  for (int64_t i = build_.first_layer; i < build_.last_layer; ++i)
    kv.layers[static_cast<size_t>(i)] = {at::zeros({1, kv.capacity, config.num_heads, config.head_dim()}, opts),
                                         at::zeros({1, kv.capacity, config.num_heads, config.head_dim()}, opts)};
  return kv;
}

at::Tensor to_kv_storage(const at::Tensor& x, c10::ScalarType dtype) {
  if (dtype == c10::ScalarType::Undefined || x.scalar_type() == dtype) return x;
  if (dtype == at::kFloat8_e4m3fn) return x.clamp(-448.0, 448.0).to(dtype);
  return x.to(dtype);
}

BlockInputs CausalWanModelS2VImpl::prepare_block(const at::Tensor& x_in, double t, const at::Tensor& cond_states,
                                                 const at::Tensor& audio, const std::vector<RopeSegment>& segments,
                                                 int64_t current_start, int64_t rope_offset, int64_t ring_capacity) {
  require_embeddings("prepare");
  const auto opts = options();
  const auto dtype = build_.params.dtype();
  if (x_in.dim() != 4 || x_in.size(0) != config.in_dim)
    throw DitError("latents must be [" + std::to_string(config.in_dim) + ", F, H, W], got " + c10::str(x_in.sizes()));
  if (segments.empty())
    throw DitError("the conditioning sink is empty: prefill (set_condition) before denoising");
  BlockInputs in;
  const auto x5 = x_in.to(opts.device(), dtype).unsqueeze(0);  // [1, C, F, H, W]
  in.frames = x5.size(2);
  auto emb = patch_embedding(x5);                              // [1, dim, F, h, w]
  at::Tensor cs = cond_states.defined()
                      ? cond_states.to(opts.device(), dtype).unsqueeze(0)
                      : at::zeros({1, config.cond_dim, in.frames, x5.size(3), x5.size(4)}, opts);
  emb = emb + cond_encoder(cs);
  in.hp = emb.size(3);
  in.wp = emb.size(4);
  const int64_t frame_tokens = in.hp * in.wp;
  auto x = emb.flatten(2).transpose(1, 2);  // [1, L, dim]
  const int64_t seq = x.size(1);
  in.hidden = x + trainable_cond_mask->weight[0].to(dtype);

  // Audio tokens of this block (all 25 wav2vec2 layers in, motion-frame padding dropped).
  std::tie(in.audio_global, in.audio_local) = encode_audio(audio);
  if (in.audio_local.size(1) != in.frames)
    throw DitError("audio gives " + std::to_string(in.audio_local.size(1)) + " latent frames for a block of " +
                   std::to_string(in.frames) + ": pass " + std::to_string(4 * in.frames) + " audio frames per block");

  // RoPE: noisy tokens at their absolute frames; the sink re-roped with the reference shifted by the offset.
  const int64_t current_frame = current_start / frame_tokens;
  const std::vector<RopeSegment> noisy{{0, 0, 0, in.frames, in.hp, in.wp, in.frames, in.hp, in.wp, true}};
  // The positions are host integers (one small copy); the tables are computed on the device.
  in.rope = rope_real(rope_table(rope_positions(noisy, current_frame).to(opts.device()), config.head_dim()));
  in.cond_rope = rope_real(rope_table(
      rope_positions(segments, cond_rollout(current_frame, rope_offset)).to(opts.device()), config.head_dim()));

  std::tie(in.e, in.e0) = embed_time(at::full({in.frames}, t, opts.dtype(at::kFloat)));

  // Ring slot of this block.
  if (ring_capacity % seq != 0)
    throw DitError("KV cache of " + std::to_string(ring_capacity) + " tokens does not hold whole blocks of " +
                   std::to_string(seq));
  in.window = ring_window(current_start, seq, ring_capacity);
  return in;
}

namespace {
void move_inputs(BlockInputs& in, const c10::Device& dev) {
  if (in.hidden.device() == dev) return;
  for (at::Tensor* t : {&in.hidden, &in.e, &in.e0, &in.audio_global, &in.audio_local, &in.rope.cos, &in.rope.sin,
                        &in.cond_rope.cos, &in.cond_rope.sin})
    if (t->defined()) *t = t->to(dev);
}
}  // namespace

void CausalWanModelS2VImpl::run_layers(int64_t first, int64_t last, BlockInputs& in, const std::vector<LayerKV>& text,
                                       KVCache& kv, const CondCache& cond) {
  require_layers(first, last);
  move_inputs(in, options().device());
  if (kv.layers.size() != static_cast<size_t>(config.num_layers) || kv.capacity % in.hidden.size(1) != 0)
    throw DitError("KV cache of " + std::to_string(kv.capacity) + " tokens does not hold whole blocks of " +
                   std::to_string(in.hidden.size(1)));
  if (cond.layers.size() != static_cast<size_t>(config.num_layers))
    throw DitError("the conditioning sink is empty: prefill (set_condition) before denoising");
  auto x = in.hidden;
  for (int64_t i = first; i < last; ++i) {
    auto block = blocks[i]->as<BlockImpl>();
    auto& slot = kv.layers[static_cast<size_t>(i)];
    const auto& sink = cond.layers[static_cast<size_t>(i)];
    if (!slot.k.defined() || !sink.k.defined())
      throw DitError("layer " + std::to_string(i) + " has no " + (slot.k.defined() ? "sink (prefill it)" : "KV ring"));
    const auto mod = block->modulation_for(in.e0, /*conditioning=*/false);
    x = block->forward(x, mod, text_of(text, i), [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
      return ring_attention(q, k, v, in.rope, in.cond_rope, slot, sink, in.window, build_.params.attention);
    });
    const int64_t inj = injector_index_[static_cast<size_t>(i)];
    if (inj >= 0) x = x + audio_injector->forward(inj, x, in.audio_local, in.audio_global);
  }
  in.hidden = x;
}

at::Tensor CausalWanModelS2VImpl::apply_head(const BlockInputs& in_) {
  if (!build_.head)
    throw DitError("head: this shard (layers " + std::to_string(build_.first_layer) + ".." +
                   std::to_string(build_.last_layer) + ") does not hold the output head: call it on the last shard");
  BlockInputs in = in_;
  move_inputs(in, options().device());
  // Head on the noisy tokens, then unpatchify [L, c * p] -> [c, F * p0, h * p1, w * p2].
  auto out = head(in.hidden, in.e);  // [1, L, c * prod(patch)]
  const auto& p = config.patch_size;
  const int64_t c = config.out_dim;
  out = out[0].view({in.frames, in.hp, in.wp, p[0], p[1], p[2], c}).permute({6, 0, 3, 1, 4, 2, 5});
  return out.reshape({c, in.frames * p[0], in.hp * p[1], in.wp * p[2]});
}

at::Tensor CausalWanModelS2VImpl::forward_block(const at::Tensor& x_in, double t, const at::Tensor& context_emb,
                                                const at::Tensor& cond_states, const at::Tensor& audio, KVCache& kv,
                                                const CondCache& cond, int64_t current_start, int64_t rope_offset) {
  if (cond.layers.size() != static_cast<size_t>(config.num_layers))
    throw DitError("the conditioning sink is empty: prefill (set_condition) before denoising");
  auto in = prepare_block(x_in, t, cond_states, audio, cond.segments, current_start, rope_offset, kv.capacity);
  run_layers(0, config.num_layers, in, text_kv(context_emb, 0, config.num_layers), kv, cond);
  return apply_head(in);
}

}  // namespace liveavatar::dit
