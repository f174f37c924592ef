// The memory planner's arithmetic: parameter groups, token counts, per-device bytes of each plan, the decision and
// the refusal message. SPDX-License-Identifier: LGPL-2.1-or-later
#include "planner.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <set>

namespace liveavatar::runtime {

namespace {

using u64 = uint64_t;

u64 u(int64_t v) { return static_cast<u64>(v); }
std::string s(int64_t v) { return std::to_string(v); }

u64 bytes_of(Precision p) {
  switch (p) {
    case Precision::kFp32: return 4;
    case Precision::kBf16: return 2;
    case Precision::kFp8: return 1;
  }
  return 4;
}

// Companion-model caches and transients (docs/planner.md), measured on the CPU with a counting allocator
// (liveavatar-plan-bench --component vae / wav2vec2, fp32, random weights):
// - the VAE stream cache: 9,458 B per output pixel in fp32 (exactly proportional to the area, as docs/vae.md);
// - decode_block's transient peak: 3,341 fp32 values per output pixel at 128 x 128 px (3,313 between 64 x 64 and
//   128 x 128; a GPU's convolution workspaces come on top and must be measured there);
// - wav2vec2 on one 4.5 s window (2 s context + one block + margin): 106,644,736 B in fp32.
constexpr u64 kVaeCacheBytesPerPixelFp32 = 9458;
constexpr u64 kVaeDecodeValuesPerPixel = 3341;
constexpr u64 kWav2Vec2WindowBytesFp32 = 106644736;
// umT5 on 512 tokens (an estimate, not measured): [64, 512, 512] attention logits, the FFN hidden [512, 10240] three times, hidden states.
constexpr u64 kUmt5PassValues = 64ull * 512 * 512 + 3ull * 512 * 10240 + 8ull * 512 * 4096;

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Names, parsing
// ---------------------------------------------------------------------------------------------------------------
const char* to_string(Precision p) {
  switch (p) {
    case Precision::kFp32: return "fp32";
    case Precision::kBf16: return "bf16";
    case Precision::kFp8: return "fp8";
  }
  return "?";
}

const char* to_string(Parallel p) {
  switch (p) {
    case Parallel::kAuto: return "auto";
    case Parallel::kSingle: return "single";
    case Parallel::kStep: return "step";
    case Parallel::kStage: return "stage";
  }
  return "?";
}

Precision parse_precision(const std::string& text) {
  if (text == "fp32") return Precision::kFp32;
  if (text == "bf16") return Precision::kBf16;
  if (text == "fp8") return Precision::kFp8;
  throw PlanError("precision must be fp32, bf16 or fp8, got '" + text + "'");
}

Parallel parse_parallel(const std::string& text, int64_t* stages) {
  if (stages) *stages = 0;
  if (text == "auto") return Parallel::kAuto;
  if (text == "single") return Parallel::kSingle;
  if (text == "step") return Parallel::kStep;
  if (text == "stage") return Parallel::kStage;
  if (text.rfind("stage:", 0) == 0) {
    const std::string n = text.substr(6);
    char* end = nullptr;
    const long v = std::strtol(n.c_str(), &end, 10);
    if (n.empty() || *end || v < 2 || v > 4096)
      throw PlanError("parallel=stage:N needs N in [2, 4096] (ranks of the layer pipeline), got '" + text + "'");
    if (stages) *stages = v;
    return Parallel::kStage;
  }
  throw PlanError("parallel must be auto, single, step, stage or stage:N, got '" + text + "'");
}

uint64_t parse_bytes(const std::string& text) {
  size_t pos = 0;
  while (pos < text.size() && (std::isdigit(static_cast<unsigned char>(text[pos])) || text[pos] == '.')) ++pos;
  const std::string number = text.substr(0, pos), unit = text.substr(pos);
  char* end = nullptr;
  const double v = std::strtod(number.c_str(), &end);
  double scale = 0;
  if (unit.empty() || unit == "B") scale = 1;
  else if (unit == "KiB") scale = 1024.0;
  else if (unit == "MiB") scale = 1024.0 * 1024;
  else if (unit == "GiB") scale = static_cast<double>(kGiB);
  else if (unit == "KB") scale = 1e3;
  else if (unit == "MB") scale = 1e6;
  else if (unit == "GB") scale = 1e9;
  if (number.empty() || *end || scale == 0 || !(v > 0) || v * scale > 1e15)
    throw PlanError("a memory size is a positive number with B, KiB, MiB, GiB, KB, MB or GB (e.g. 24GiB), got '" +
                    text + "'");
  return static_cast<u64>(std::llround(v * scale));
}

std::vector<Device> parse_devices(const std::string& text, uint64_t context_reserve) {
  std::vector<Device> out;
  // Preset "NxSGB": N cards sold as S GB (S GiB of memory each), minus the CUDA context.
  const auto x = text.find('x');
  if (x != std::string::npos && text.find('=') == std::string::npos) {
    const std::string n = text.substr(0, x), size = text.substr(x + 1);
    char* end = nullptr;
    const long count = std::strtol(n.c_str(), &end, 10);
    const bool gb = size.size() > 2 && size.compare(size.size() - 2, 2, "GB") == 0;
    // The number must outlive the parse: end2 points into it (a temporary here was read after its end, ASan).
    const std::string number = gb ? size.substr(0, size.size() - 2) : std::string();
    char* end2 = nullptr;
    const double gbs = gb ? std::strtod(number.c_str(), &end2) : 0;
    if (n.empty() || *end || count < 1 || count > 64 || !gb || *end2 || !(gbs > 0) || gbs > 4096)
      throw PlanError("a device preset is NxSGB (N cards of S GB, e.g. 4x24GB, N in [1, 64]), got '" + text + "'");
    const u64 total = static_cast<u64>(std::llround(gbs * static_cast<double>(kGiB)));
    if (total <= context_reserve)
      throw PlanError("device preset " + text + ": " + gib(total) + " is not more than the " + gib(context_reserve) +
                      " the CUDA context takes");
    for (long i = 0; i < count; ++i) out.push_back({"cuda:" + std::to_string(i), total - context_reserve});
    return out;
  }
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t comma = text.find(',', pos);
    if (comma == std::string::npos) comma = text.size();
    const std::string item = text.substr(pos, comma - pos);
    const auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0)
      throw PlanError("a device is NAME=FREE (e.g. cuda:0=22GiB), got '" + item + "' in '" + text + "'");
    out.push_back({item.substr(0, eq), parse_bytes(item.substr(eq + 1))});
    pos = comma + 1;
  }
  return out;
}

namespace {
// The unit gib() prints `bytes` in: GiB from 1 GiB on, then MiB, then KiB (a tiny test model is not "0.0 GiB").
uint64_t unit_of(uint64_t bytes, const char** name) {
  if (bytes >= kGiB) { *name = "GiB"; return kGiB; }
  if (bytes >= (1ull << 20)) { *name = "MiB"; return 1ull << 20; }
  *name = "KiB";
  return 1ull << 10;
}
}  // namespace

std::string gib(uint64_t bytes) {
  const char* name = nullptr;
  const uint64_t unit = unit_of(bytes, &name);
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.1f %s", static_cast<double>(bytes) / static_cast<double>(unit), name);
  return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// Model shape
// ---------------------------------------------------------------------------------------------------------------
std::vector<ParamGroup> parameter_groups(const dit::ModelConfig& m) {
  using W = ParamGroup::Where;
  const u64 d = u(m.dim), f = u(m.ffn_dim), patch = u(m.patch_size[0] * m.patch_size[1] * m.patch_size[2]);
  std::vector<ParamGroup> g;
  auto add = [&](std::string name, W where, int64_t layer, u64 fp8, u64 tensors, u64 channels, u64 other,
                 bool fp32 = false) {
    ParamGroup p;
    p.name = std::move(name);
    p.where = where;
    p.layer = layer;
    p.fp8_elements = fp8;
    p.fp8_tensors = tensors;
    p.fp8_channels = channels;
    p.other_elements = other;
    p.fp32_module = fp32;
    g.push_back(std::move(p));
  };
  // Checkpoint order. Linear layers that FP8 leaves alone (upstream ignore_keys: text_embedding, time_embedding,
  // time_projection, head.head, casual_audio_encoder.encoder.final_linear) count as "other".
  add("patch_embedding", W::kFirst, -1, 0, 0, 0, u(m.in_dim) * d * patch + d);
  add("text_embedding", W::kFirst, -1, 0, 0, 0, u(m.text_dim) * d + d + d * d + d);
  add("time_embedding", W::kFirst, -1, 0, 0, 0, u(m.freq_dim) * d + d + d * d + d, true);
  add("time_projection", W::kFirst, -1, 0, 0, 0, d * 6 * d + 6 * d, true);
  // A block: self_attn and cross_attn (q, k, v, o + biases, norm_q, norm_k), norm3, ffn.0 / ffn.2, modulation.
  for (int64_t i = 0; i < m.num_layers; ++i)
    add("blocks." + s(i), W::kLayer, i, 8 * d * d + 2 * d * f, 10, 8 * d + f + d,
        2 * (4 * d + 2 * d) + 2 * d + (f + d) + 6 * d);
  add("head", W::kLast, -1, 0, 0, 0, d * u(m.out_dim) * patch + u(m.out_dim) * patch + 2 * d, true);
  add("cond_encoder", W::kFirst, -1, 0, 0, 0, u(m.cond_dim) * d * patch + d);
  {
    const u64 a = u(m.audio_dim), q = d / 4, t = u(m.num_audio_token);
    u64 n = u(m.audio_layers) + a * q * t * 3 + q * t;    // weights, conv1_local
    if (m.enable_adain) n += a * q * 3 + q + d * d + d;   // conv1_global, final_linear
    n += q * (d / 2) * 3 + d / 2 + (d / 2) * d * 3 + d + d;  // conv2, conv3, padding_tokens
    add("casual_audio_encoder", W::kFirst, -1, 0, 0, 0, n, true);
  }
  const auto& inj = m.audio_inject_layers;
  for (size_t j = 0; j < inj.size(); ++j)
    add("audio_injector.injector." + std::to_string(j), W::kLayer, inj[j], 4 * d * d, 4, 4 * d, 4 * d + 2 * d);
  if (m.enable_adain) {
    for (size_t j = 0; j < inj.size(); ++j)
      add("audio_injector.injector_adain_layers." + std::to_string(j), W::kLayer, inj[j], 2 * d * d, 1, 2 * d, 2 * d);
    if (m.adain_mode != "attn_norm")  // upstream registers injector_adain_output_layers then
      for (size_t j = 0; j < inj.size(); ++j)
        add("audio_injector.injector_adain_output_layers." + std::to_string(j), W::kLayer, inj[j], d * d, 1, d, d);
  }
  add("trainable_cond_mask", W::kFirst, -1, 0, 0, 0, 3 * d);
  add("frame_packer", W::kFirst, -1, 0, 0, 0, u(m.in_dim) * d * (4 + 32 + 256) + 3 * d);
  return g;
}

uint64_t ParamGroup::bytes(Precision weights, Fp8Scaling scaling, bool keep_fp32_modules) const {
  if (fp32_module && keep_fp32_modules) return elements() * 4;
  if (weights != Precision::kFp8) return elements() * bytes_of(weights);
  const u64 scales = 4 * (scaling == Fp8Scaling::kPerTensor ? fp8_tensors : fp8_channels);
  return fp8_elements + scales + other_elements * 2;
}

Tokens count_tokens(const dit::ModelConfig& m, int64_t height, int64_t width) {
  if (height <= 0 || width <= 0 || height % 64 != 0 || width % 64 != 0)
    throw PlanError("output size " + s(height) + "x" + s(width) +
                    ": height and width must be positive multiples of 64 (VAE x8, patch x2, FramePack 4x bucket)");
  const int64_t lh = height / 8, lw = width / 8;
  const auto& b = m.framepack_buckets;
  Tokens t;
  t.frame = (lh / m.patch_size[1]) * (lw / m.patch_size[2]);
  t.block = m.frames_per_block * t.frame;
  t.ring = m.clip_frames * t.frame;
  t.sink = t.frame + b[0] * (lh / 2) * (lw / 2) + (b[1] / 2) * (lh / 4) * (lw / 4) + (b[2] / 4) * (lh / 8) * (lw / 8);
  t.text = m.text_len;
  return t;
}

// ---------------------------------------------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------------------------------------------
Precision PlanRequest::kv_precision() const {
  return kv ? *kv : weights == Precision::kFp32 ? Precision::kFp32 : Precision::kBf16;
}
Precision PlanRequest::activation_precision() const {
  return weights == Precision::kFp32 ? Precision::kFp32 : Precision::kBf16;
}
Precision PlanRequest::aux_dtype() const { return aux_precision ? *aux_precision : activation_precision(); }

void PlanRequest::validate() const {
  try {
    model.validate();
  } catch (const dit::DitError& e) {
    throw PlanError(e.what());
  }
  count_tokens(model, height, width);
  if (devices.empty()) throw PlanError("no devices: give at least one (e.g. --devices cuda:0=22GiB or 4x24GB)");
  std::set<std::string> names;
  for (const auto& d : devices) {
    if (d.name.empty()) throw PlanError("a device has no name");
    if (!names.insert(d.name).second) throw PlanError("device " + d.name + " is listed twice");
    if (d.free_bytes == 0) throw PlanError("device " + d.name + " has no free memory");
  }
  const int64_t n = static_cast<int64_t>(devices.size());
  if (parallel == Parallel::kStep && n < model.sampling_steps)
    throw PlanError("parallel=step needs one device per denoising step (" + s(model.sampling_steps) + "), got " +
                    s(n) + " devices: use parallel=stage or single");
  if (parallel == Parallel::kStage) {
    const int64_t ranks = stages > 0 ? stages : n;
    if (ranks < 2) throw PlanError("parallel=stage needs at least 2 ranks (one device is parallel=single)");
    if (ranks > n) throw PlanError("parallel=stage:" + s(ranks) + " needs " + s(ranks) + " devices, got " + s(n));
    if (ranks > model.num_layers)
      throw PlanError("parallel=stage:" + s(ranks) + " has more ranks than the model has layers (" +
                      s(model.num_layers) + ")");
  } else if (stages != 0) {
    throw PlanError("a stage count (" + s(stages) + ") is only meaningful with parallel=stage");
  }
  auto check_place = [&](const Placement& p, const char* what, bool none_ok) {
    if (p.device >= n || p.device < Placement::kNone || (p.device == Placement::kNone && !none_ok))
      throw PlanError(std::string(what) + " placement " + std::to_string(p.device) + " is not a device index in [0, " +
                      s(n) + ")" + (none_ok ? ", auto, host or none" : ", auto or host"));
  };
  check_place(aux, "VAE / audio encoder", false);
  check_place(text_encoder, "text encoder", true);
  if (aux_precision && *aux_precision == Precision::kFp8)
    throw PlanError("the VAE, wav2vec2 and umT5 run in fp32 or bf16, not fp8");
  if (!(slack_fraction >= 0 && slack_fraction < 1)) throw PlanError("slack fraction must be in [0, 1)");
}

// ---------------------------------------------------------------------------------------------------------------
// Per-device bytes
// ---------------------------------------------------------------------------------------------------------------
uint64_t DeviceBytes::streaming() const {
  return weights + kv_rings + sink + text_context + activations + vae + audio_encoder;
}
uint64_t DeviceBytes::prompt() const {
  if (text_encoder == 0) return 0;
  return weights + aux_resident + text_encoder + text_context;
}
uint64_t DeviceBytes::total() const { return std::max(streaming(), prompt()) + slack; }

bool Plan::fits() const {
  return std::all_of(devices.begin(), devices.end(), [](const DeviceBytes& d) { return d.fits(); });
}

const DeviceBytes& Plan::tightest() const {
  size_t best = 0;
  double worst = -1e300;
  for (size_t i = 0; i < devices.size(); ++i) {
    const double over = static_cast<double>(devices[i].total()) - static_cast<double>(devices[i].free_bytes);
    if (over > worst) {
      worst = over;
      best = i;
    }
  }
  return devices[best];
}

std::string Plan::name() const {
  if (parallel == Parallel::kStage) return "stage:" + s(ranks);
  return to_string(parallel);
}

namespace {

// The transient peak of one block call on a rank, the way DESIGN.md section 4 assumes the DiT holds it: modulation
// per latent frame (not per token), RoPE tables per token in fp32, no concatenation of ring and sink, the
// conditioning keys re-roped per call. The larger of the self-attention and the FFN phases of one layer:
//   attention: input x, q / k / v, roped q / k, the output and its projection (a-byte values) + one fp32 RoPE
//              temporary, and the sink keys re-roped (a bytes + an fp32 temporary)
//   FFN: input x, fp32 residual, fp32 norm and its cast, the FFN output, two [L, ffn_dim] hiddens (linear, GELU)
// plus the block's inputs (noise of the clip, fp32 latents, the padded audio features) and, for a pipeline stage,
// a send and a receive buffer of the hidden state.
u64 activation_bytes(const PlanRequest& r, const Tokens& t, bool stage) {
  const auto& m = r.model;
  const u64 a = bytes_of(r.activation_precision()), d = u(m.dim), f = u(m.ffn_dim);
  auto layer_peak = [&](u64 tokens, u64 sink_keys) {
    const u64 attention = tokens * d * (7 * a + 4) + sink_keys * d * (a + 4);
    const u64 ffn = tokens * d * (3 * a + 8) + 2 * tokens * f * a;
    return std::max(attention, ffn);
  };
  const u64 block = layer_peak(u(t.block), u(t.sink));
  const u64 prefill = layer_peak(u(t.sink), 0);
  const u64 lat = u(t.frame) * u(m.patch_size[1] * m.patch_size[2]);  // latent pixels per frame
  const u64 io = u(m.in_dim) * u(m.clip_frames) * lat * a + u(m.in_dim) * u(m.frames_per_block) * lat * 4 +
                 u(m.audio_layers) * u(m.audio_dim) * u(4 * m.frames_per_block + m.motion_frames) * 4;
  const u64 hop = stage ? 2 * u(t.block) * d * a : 0;
  return std::max(block, prefill) + io + hop;
}

struct Aux {
  u64 vae = 0, audio = 0, resident = 0, text = 0;
};
Aux aux_bytes(const PlanRequest& r) {
  const u64 b = bytes_of(r.aux_dtype());
  const u64 px = u(r.height) * u(r.width);
  Aux x;
  const auto& c = r.companions;
  const u64 vae_p = c.vae_parameters.value_or(kVaeParameters);
  const u64 audio_p = c.audio_encoder_parameters.value_or(kWav2Vec2Parameters);
  const u64 text_p = c.text_encoder_parameters.value_or(kUmt5Parameters);
  // Transient bytes grow with the width (sqrt of the parameters) from the published models' figures.
  auto scaled = [](u64 bytes, u64 params, u64 published) {
    return static_cast<u64>(std::ceil(static_cast<double>(bytes) *
                                      std::sqrt(static_cast<double>(params) / static_cast<double>(published))));
  };
  const u64 vae_w = vae_p * b, audio_w = audio_p * b;
  x.vae = vae_w + scaled(kVaeCacheBytesPerPixelFp32 * px * b / 4 + kVaeDecodeValuesPerPixel * px * b, vae_p,
                         kVaeParameters);
  x.audio = audio_w + scaled(kWav2Vec2WindowBytesFp32 * b / 4, audio_p, kWav2Vec2Parameters);
  x.resident = vae_w + audio_w;
  x.text = text_p * b + scaled(kUmt5PassValues * 4, text_p, kUmt5Parameters);
  return x;
}

}  // namespace

Plan evaluate(const PlanRequest& r, Parallel parallel, int64_t ranks) {
  r.validate();
  const auto& m = r.model;
  const int64_t n = static_cast<int64_t>(r.devices.size());
  if (parallel == Parallel::kAuto) throw PlanError("evaluate() takes a concrete plan, not auto");
  if (parallel == Parallel::kSingle) ranks = 1;
  if (parallel == Parallel::kStep) ranks = m.sampling_steps;
  if (ranks < 1 || ranks > n)
    throw PlanError(std::string("parallel=") + to_string(parallel) + " with " + s(ranks) + " ranks needs " + s(ranks) +
                    " devices, got " + s(n));
  if (parallel == Parallel::kStage && (ranks < 2 || ranks > m.num_layers))
    throw PlanError("parallel=stage needs 2 to " + s(m.num_layers) + " ranks, got " + s(ranks));

  Plan plan;
  plan.parallel = parallel;
  plan.ranks = ranks;
  plan.weights = r.weights;
  plan.kv = r.kv_precision();
  const double steps = static_cast<double>(m.sampling_steps);
  plan.block_forwards = parallel == Parallel::kSingle ? steps
                        : parallel == Parallel::kStep ? 1.0
                                                      : steps / static_cast<double>(std::min(ranks, m.sampling_steps));
  for (const auto& d : r.devices) {
    DeviceBytes db;
    db.device = d.name;
    db.free_bytes = d.free_bytes;
    db.role = "unused";
    plan.devices.push_back(db);
  }

  // Rank -> device: single runs on the device with the most free memory, the others on the first `ranks` devices.
  std::vector<size_t> device_of(static_cast<size_t>(ranks));
  if (parallel == Parallel::kSingle) {
    size_t best = 0;
    for (size_t i = 1; i < r.devices.size(); ++i)
      if (r.devices[i].free_bytes > r.devices[best].free_bytes) best = i;
    device_of[0] = best;
  } else {
    for (int64_t k = 0; k < ranks; ++k) device_of[static_cast<size_t>(k)] = static_cast<size_t>(k);
  }

  const Tokens t = count_tokens(m, r.height, r.width);
  const u64 kvb = bytes_of(plan.kv), ab = bytes_of(r.activation_precision()), d = u(m.dim);
  const u64 ring_layer = u(t.ring) * 2 * d * kvb;     // one layer's ring of one step
  const u64 sink_layer = u(t.sink) * 2 * d * kvb;
  const u64 text_kv_layer = r.cache_text_kv ? u(t.text) * 2 * d * ab : 0;
  const auto groups = parameter_groups(m);
  const bool stage = parallel == Parallel::kStage;

  for (int64_t k = 0; k < ranks; ++k) {
    auto& db = plan.devices[device_of[static_cast<size_t>(k)]];
    const int64_t lo = stage ? k * m.num_layers / ranks : 0;
    const int64_t hi = stage ? (k + 1) * m.num_layers / ranks : m.num_layers;
    const bool first = k == 0 || !stage, last = k == ranks - 1 || !stage;
    for (const auto& g : groups) {
      const bool held = g.where == ParamGroup::Where::kFirst  ? first
                        : g.where == ParamGroup::Where::kLast ? last
                                                              : g.layer >= lo && g.layer < hi;
      if (held) db.weights += g.bytes(r.weights, r.fp8_scaling, r.keep_fp32_modules);
    }
    const u64 layers = u(hi - lo);
    const u64 rings = parallel == Parallel::kStep ? 1 : u(m.sampling_steps);
    db.kv_rings = layers * rings * ring_layer;
    db.sink = layers * sink_layer;
    db.text_context = u(t.text) * d * ab + layers * text_kv_layer;
    db.activations = activation_bytes(r, t, stage);
    if (parallel == Parallel::kSingle) db.role = "single";
    else if (parallel == Parallel::kStep) db.role = "step " + s(k);
    else db.role = "stage " + s(k) + "/" + s(ranks) + " (layers " + s(lo) + "-" + s(hi - 1) + ")";
  }

  // VAE decoder + wav2vec2: pinned, or the first device without a rank, or the rank with the most room left.
  const Aux aux = aux_bytes(r);
  auto headroom = [&](const DeviceBytes& db, u64 extra_streaming, u64 extra_prompt) {
    const double need = std::max(static_cast<double>(db.streaming() + extra_streaming),
                                 static_cast<double>(db.prompt() + extra_prompt));
    return static_cast<double>(db.free_bytes) - need * (1 + r.slack_fraction);
  };
  if (r.aux.device != Placement::kHost) {
    size_t where = 0;
    if (r.aux.device >= 0) {
      where = static_cast<size_t>(r.aux.device);
    } else {
      double best = -1e300;
      bool unused = false;
      for (size_t i = 0; i < plan.devices.size(); ++i) {
        const bool is_unused = plan.devices[i].role == "unused";
        const double h = headroom(plan.devices[i], aux.vae + aux.audio, 0);
        if ((is_unused && !unused) || (is_unused == unused && h > best)) {
          best = h;
          where = i;
          unused = unused || is_unused;
        }
      }
    }
    auto& db = plan.devices[where];
    db.vae = aux.vae;
    db.audio_encoder = aux.audio;
    db.aux_resident = aux.resident;
    if (db.role == "unused") db.role = "aux";
    else db.role += " + aux";
  }
  // umT5 (prompt phase): pinned, or the device with the most room if it fits there, else the host.
  if (r.text_encoder.device >= 0) {
    plan.devices[static_cast<size_t>(r.text_encoder.device)].text_encoder = aux.text;
  } else if (r.text_encoder.device == Placement::kAuto) {
    double best = -1e300;
    size_t where = 0;
    for (size_t i = 0; i < plan.devices.size(); ++i) {
      DeviceBytes probe = plan.devices[i];
      probe.text_encoder = aux.text;
      const double h = headroom(probe, 0, 0);
      if (h > best) {
        best = h;
        where = i;
      }
    }
    if (best >= 0) plan.devices[where].text_encoder = aux.text;
  }
  for (auto& db : plan.devices)
    db.slack = static_cast<u64>(std::llround(static_cast<double>(std::max(db.streaming(), db.prompt())) *
                                             r.slack_fraction));
  return plan;
}

// ---------------------------------------------------------------------------------------------------------------
// Decision
// ---------------------------------------------------------------------------------------------------------------
namespace {

int preference(Parallel p) { return p == Parallel::kStep ? 0 : p == Parallel::kStage ? 1 : 2; }

std::vector<Plan> candidates(const PlanRequest& r) {
  std::vector<Plan> out;
  const int64_t n = static_cast<int64_t>(r.devices.size());
  if (r.parallel == Parallel::kAuto) {
    out.push_back(evaluate(r, Parallel::kSingle, 1));
    if (n >= r.model.sampling_steps) out.push_back(evaluate(r, Parallel::kStep, r.model.sampling_steps));
    for (int64_t k = 2; k <= std::min(n, r.model.num_layers); ++k) out.push_back(evaluate(r, Parallel::kStage, k));
  } else if (r.parallel == Parallel::kStage) {
    out.push_back(evaluate(r, Parallel::kStage, r.stages > 0 ? r.stages : n));
  } else {
    out.push_back(evaluate(r, r.parallel, 1));
  }
  std::stable_sort(out.begin(), out.end(), [](const Plan& a, const Plan& b) {
    if (a.block_forwards != b.block_forwards) return a.block_forwards < b.block_forwards;
    if (preference(a.parallel) != preference(b.parallel)) return preference(a.parallel) < preference(b.parallel);
    return a.ranks < b.ranks;
  });
  return out;
}

// How far a plan is from fitting: the largest shortfall over its devices (negative when it fits).
double shortfall(const Plan& p) {
  const auto& t = p.tightest();
  return static_cast<double>(t.total()) - static_cast<double>(t.free_bytes);
}

const Plan* first_fit(const std::vector<Plan>& c) {
  for (const auto& p : c)
    if (p.fits()) return &p;
  return nullptr;
}

std::string parallel_knob(const Plan& p, int64_t devices) {
  if (p.parallel == Parallel::kStage && p.ranks == devices) return "stage";
  return p.name();
}

// The single changes (then pairs, then all three) that would make the request fit, mildest first.
std::string what_would_fit(const PlanRequest& r) {
  struct Knobs {
    std::optional<Precision> weights, kv;
    bool auto_plan = false;
    int count() const { return (weights ? 1 : 0) + (kv ? 1 : 0) + (auto_plan ? 1 : 0); }
  };
  const int64_t devices = static_cast<int64_t>(r.devices.size());
  // Returns the knobs as text when the request changed by them fits, else "".
  auto try_knobs = [&](const Knobs& k) -> std::string {
    PlanRequest q = r;
    if (k.weights) q.weights = *k.weights;
    if (k.kv) q.kv = *k.kv;
    if (k.auto_plan) {
      q.parallel = Parallel::kAuto;
      q.stages = 0;
    }
    const auto c = candidates(q);
    const Plan* p = first_fit(c);
    if (!p) return "";
    std::vector<std::string> parts;
    if (k.weights) parts.push_back(std::string("precision=") + to_string(*k.weights));
    if (k.kv) parts.push_back(std::string("kv-precision=") + to_string(*k.kv));
    if (k.auto_plan) parts.push_back("parallel=" + parallel_knob(*p, devices));
    std::string out;
    for (size_t i = 0; i < parts.size(); ++i) out += (i ? " + " : "") + parts[i];
    return out;
  };
  std::vector<std::optional<Precision>> weights{std::nullopt}, kv{std::nullopt};
  for (Precision p : {Precision::kBf16, Precision::kFp8}) {
    if (bytes_of(p) < bytes_of(r.weights)) weights.push_back(p);
    if (bytes_of(p) < bytes_of(r.kv_precision())) kv.push_back(p);
  }
  std::vector<bool> plans{false};
  if (r.parallel != Parallel::kAuto) plans.push_back(true);

  // One knob: the mildest weight precision that fits, the mildest KV precision, any plan.
  std::vector<std::string> found;
  for (size_t i = 1; i < weights.size(); ++i)
    if (auto t = try_knobs({weights[i], std::nullopt, false}); !t.empty()) {
      found.push_back(t);
      break;
    }
  for (size_t i = 1; i < kv.size(); ++i)
    if (auto t = try_knobs({std::nullopt, kv[i], false}); !t.empty()) {
      found.push_back(t);
      break;
    }
  if (plans.size() > 1)
    if (auto t = try_knobs({std::nullopt, std::nullopt, true}); !t.empty()) found.push_back(t);
  if (!found.empty()) {
    std::string out;
    for (size_t i = 0; i < found.size(); ++i) out += (i ? " or " : "") + found[i];
    return "fits with " + out;
  }
  // Two knobs, then three.
  for (int count = 2; count <= 3; ++count)
    for (const auto& w : weights)
      for (const auto& k : kv)
        for (bool a : plans) {
          const Knobs knobs{w, k, a};
          if (knobs.count() != count) continue;
          if (auto t = try_knobs(knobs); !t.empty()) return "fits with " + t;
        }
  return "nothing fits on these devices, even with fp8 weights and fp8 KV: add devices, use larger ones, or a "
         "smaller output size";
}

std::string summary(const PlanRequest& r, const Plan& p) {
  return p.name() + ", " + to_string(p.weights) + " weights, " + to_string(p.kv) + " KV, " + s(r.height) + "x" +
         s(r.width);
}

}  // namespace

Decision decide(const PlanRequest& request) {
  request.validate();
  Decision out;
  out.candidates = candidates(request);
  if (const Plan* p = first_fit(out.candidates)) {
    out.fits = true;
    out.plan = *p;
    const auto& t = p->tightest();
    out.message = summary(request, *p) + ": fits; fullest device " + t.device + " needs " + gib(t.total()) + " of " +
                  gib(t.free_bytes) + " free";
    return out;
  }
  // Refused: report the plan that came closest (for an explicit plan, that plan).
  const Plan* closest = &out.candidates.front();
  for (const auto& p : out.candidates)
    if (shortfall(p) < shortfall(*closest)) closest = &p;
  out.plan = *closest;
  const auto& t = closest->tightest();
  char free_text[32];
  // The free bytes in the unit of the need ("needs 25.3 GiB on cuda:0, 22.0 free"), or with their own unit when
  // that would print 0.0 ("needs 2.2 GiB on cpu, 1.0 MiB free").
  const char* need_unit = nullptr;
  const char* free_unit = nullptr;
  const uint64_t unit = unit_of(t.total(), &need_unit);
  const uint64_t own = unit_of(t.free_bytes, &free_unit);
  if (own == unit || t.free_bytes >= unit)
    std::snprintf(free_text, sizeof free_text, "%.1f", static_cast<double>(t.free_bytes) / static_cast<double>(unit));
  else
    std::snprintf(free_text, sizeof free_text, "%.1f %s", static_cast<double>(t.free_bytes) / static_cast<double>(own),
                  free_unit);
  out.message = "needs " + gib(t.total()) + " on " + t.device + ", " + free_text + " free (" +
                summary(request, *closest) + "); " + what_would_fit(request);
  return out;
}

Plan require_fit(const PlanRequest& request) {
  auto d = decide(request);
  if (!d.fits) throw PlanError(d.message);
  return d.plan;
}

}  // namespace liveavatar::runtime
