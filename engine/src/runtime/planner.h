// The memory planner: the bytes every device needs for each parallel plan, computed from the model shape alone,
// and the decision (the fastest plan that fits, or a refusal that says what would fit) before any weight file is
// read. Plain C++ (no LibTorch), so the engine, the tools and the tests can ask it first.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
//   auto request = runtime::PlanRequest{};                       // 14B, 704x384, bf16, parallel auto
//   request.model = dit::ModelConfig::from_json_file(dir + "/config.json");   // reads nothing else
//   request.devices = runtime::parse_devices("4x24GB");
//   auto plan = runtime::require_fit(request);                    // throws PlanError: "needs 25.3 GiB on cuda:0, ..."
//
// Rank layout (L layers, S denoising steps, N devices in the order given):
//
//   single     rank 0   : all L layers + embeddings + head, S KV rings (one per step), the sink, the text context
//   step       rank s<S : all L layers + embeddings + head, the KV ring of step s, the sink, the text context
//   stage xN   rank k<N : layers [kL/N, (k+1)L/N) with the audio injectors placed in them, their KV rings of ALL S
//                         steps, their layers' part of the sink, the text context (+ its K/V for those layers);
//                         embeddings (patch, cond, text, time, audio encoder, FramePack) on rank 0, head on rank N-1;
//                         a hidden-state send / receive buffer for the hop
//   aux                 : the VAE decoder (weights + streaming cache + decode peak) and wav2vec2 on the first device
//                         no rank uses, else on the rank with the most free memory left (or pinned by the request)
//   prompt phase        : umT5 runs once before streaming, beside the loaded weights (or on the host, or is skipped
//                         when the embedding is cached); a device needs the larger of the two phases
//
// Speed model (steady state, in units of one full DiT forward F per block): single S*F; step F (needs S devices);
// stage xN S*F/min(N, S) (at most S items are in flight: (b, s+1) waits for (b, s)). Among the plans that fit, the
// fastest wins; ties go to step (no hidden-state hops, bit-compatible with upstream's TPP), then to fewer devices.
//
// Thread-safety: every function is a pure function of its arguments.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dit/config.h"          // dit::ModelConfig: the model shape, read from config.json without LibTorch
#include "liveavatar/engine.h"  // liveavatar::Error

namespace liveavatar::runtime {

/// A request that cannot be planned (bad shape, size, device list), or a refusal. what() says what would work.
class PlanError : public Error {
 public:
  using Error::Error;
};

enum class Precision { kFp32, kBf16, kFp8 };
/// fp8 weights: float8_e4m3fn Linear weights with an fp32 dequantisation scale per tensor (upstream) or per output
/// channel (weights::Fp8Scaling); the other tensors in bf16. fp8 KV: one byte per element.
enum class Fp8Scaling { kPerTensor, kPerChannel };
enum class Parallel { kAuto, kSingle, kStep, kStage };

const char* to_string(Precision p);
const char* to_string(Parallel p);
Precision parse_precision(const std::string& text);  // fp32 | bf16 | fp8
/// "auto", "single", "step", "stage" (N = devices) or "stage:N"; *stages receives N (0 = as many as devices).
Parallel parse_parallel(const std::string& text, int64_t* stages);

constexpr uint64_t kGiB = 1ull << 30;
/// What a preset device loses to the CUDA context, cuBLAS / cuDNN handles and NCCL before our first allocation.
constexpr uint64_t kDefaultContextReserve = kGiB / 2;

/// A device and the bytes the planner may use on it (free memory after the CUDA context).
struct Device {
  std::string name;     // "cuda:0", "cpu"
  uint64_t free_bytes = 0;
};
/// Bytes from "24GiB", "22.5GB", "512MiB", "1000000" (B). Throws PlanError on anything else.
uint64_t parse_bytes(const std::string& text);
/// "cuda:0=24GiB,cuda:1=22GiB" (free bytes as given) or a preset "NxSGB" (N cards sold as S GB = S GiB each,
/// cuda:0..N-1, each minus `context_reserve` bytes taken by the CUDA context and the libraries).
std::vector<Device> parse_devices(const std::string& text, uint64_t context_reserve = kDefaultContextReserve);

/// Where a component that is not part of the DiT plan runs.
struct Placement {
  static constexpr int kAuto = -1;   // an unused device, else the rank with the most room
  static constexpr int kHost = -2;   // the host (CPU memory, outside the device budget)
  static constexpr int kNone = -3;   // not loaded (text encoder: the prompt embedding is cached)
  int device = kAuto;                // or a device index
};

/// The companion models' sizes (defaults: the published ones). Their transient bytes (VAE cache and decode, the
/// wav2vec2 window, the umT5 pass) are the published models' figures scaled by sqrt(parameters / published), as
/// activations grow with the width while parameters grow with its square.
struct Companions {
  std::optional<uint64_t> vae_parameters;            // none = kVaeParameters
  std::optional<uint64_t> audio_encoder_parameters;  // none = kWav2Vec2Parameters
  std::optional<uint64_t> text_encoder_parameters;   // none = kUmt5Parameters
};

struct PlanRequest {
  dit::ModelConfig model;                // the DiT shape and streaming settings (defaults: the 14B model)
  Companions companions;                 // VAE, wav2vec2, umT5 sizes (defaults: the published models)
  int64_t height = 704;                 // output pixels (multiples of 64: VAE x8, patch x2, FramePack x4)
  int64_t width = 384;
  Precision weights = Precision::kBf16;
  Fp8Scaling fp8_scaling = Fp8Scaling::kPerTensor;
  std::optional<Precision> kv;          // default: fp32 with fp32 weights, else bf16
  Parallel parallel = Parallel::kAuto;
  int64_t stages = 0;                   // stage plan: ranks (0 = as many as devices)
  std::vector<Device> devices;
  Placement aux;                        // VAE decoder + wav2vec2
  Placement text_encoder;               // umT5 (prompt phase)
  std::optional<Precision> aux_precision;  // VAE + wav2vec2 + umT5 dtype (fp8 not allowed); default: fp32 with fp32
                                           // weights, else bf16
  // How the engine holds things (defaults = the engine's dit::Model):
  bool keep_fp32_modules = true;  // time_embedding, time_projection, head, casual_audio_encoder stay fp32
  bool cache_text_kv = true;      // each layer's cross-attention K/V of the text computed once per prompt
  double slack_fraction = 0.05;   // caching-allocator slack (fragmentation, rounding) on top of the sum

  /// Throws PlanError on an impossible request (shape, size, devices, stage count, placements, fractions).
  void validate() const;
  Precision kv_precision() const;
  Precision activation_precision() const;  // fp32 with fp32 weights, else bf16
  Precision aux_dtype() const;
};

/// Token counts at an output size (704x384: 1,056 per latent frame, 3,168 per block, 12,672 in a ring, 2,640 in
/// the sink).
struct Tokens {
  int64_t frame = 0;   // patches per latent frame
  int64_t block = 0;   // frames_per_block * frame
  int64_t ring = 0;    // clip_frames * frame
  int64_t sink = 0;    // reference + FramePack 1x / 2x / 4x
  int64_t text = 0;    // text_len
};
Tokens count_tokens(const dit::ModelConfig& model, int64_t height, int64_t width);

/// A DiT parameter group (one checkpoint prefix) and how it is stored.
struct ParamGroup {
  enum class Where { kFirst, kLayer, kLast };  // embeddings (first rank), a transformer layer, head (last rank)
  std::string name;                  // checkpoint prefix, e.g. "blocks.7", "audio_injector.injector.3"
  Where where = Where::kLayer;
  int64_t layer = -1;                // for kLayer
  uint64_t fp8_elements = 0;         // weights of Linear layers that fp8 quantises
  uint64_t fp8_tensors = 0;          // how many (per-tensor scales)
  uint64_t fp8_channels = 0;         // their output features (per-channel scales)
  uint64_t other_elements = 0;       // everything else
  bool fp32_module = false;          // kept in fp32 by dit::Model (under keep_fp32_modules)
  uint64_t elements() const { return fp8_elements + other_elements; }
  uint64_t bytes(Precision weights, Fp8Scaling scaling, bool keep_fp32_modules) const;
};
std::vector<ParamGroup> parameter_groups(const dit::ModelConfig& model);

/// Companion models (standard shapes; the tests check these against their configs' parameter_count()).
constexpr uint64_t kVaeParameters = 126892531;       // Wan2.1 VAE
constexpr uint64_t kWav2Vec2Parameters = 315437696;  // wav2vec2-large-xlsr-53 without the CTC head
constexpr uint64_t kUmt5Parameters = 5680910336;     // umT5-XXL encoder

/// One device's bytes under a plan.
struct DeviceBytes {
  std::string device;
  uint64_t free_bytes = 0;
  std::string role;             // "single", "step 2", "stage 1/4 (layers 10-19)", "aux", "unused"
  uint64_t weights = 0;         // DiT parameters held
  uint64_t kv_rings = 0;        // self-attention K/V rings
  uint64_t sink = 0;            // conditioning K/V (one copy, shared by the steps)
  uint64_t text_context = 0;    // embedded text (+ its per-layer cross-attention K/V when cached)
  uint64_t activations = 0;     // peak transient bytes of one block call (+ hop buffers)
  uint64_t vae = 0;             // VAE weights + streaming cache + decode peak
  uint64_t audio_encoder = 0;   // wav2vec2 weights + window peak
  uint64_t text_encoder = 0;    // umT5 weights + pass peak (prompt phase only)
  uint64_t aux_resident = 0;    // the part of vae + audio_encoder loaded before the prompt phase (their weights)
  uint64_t slack = 0;           // allocator slack
  uint64_t streaming() const;   // everything held while streaming, without slack
  uint64_t prompt() const;      // what is held while the prompt is encoded, without slack
  uint64_t total() const;       // max(streaming, prompt) + slack
  bool fits() const { return total() <= free_bytes; }
};

struct Plan {
  Parallel parallel = Parallel::kSingle;
  int64_t ranks = 1;
  Precision weights = Precision::kBf16;
  Precision kv = Precision::kBf16;
  std::vector<DeviceBytes> devices;  // one per device of the request, in order
  double block_forwards = 0;         // steady-state time per block in full-DiT forwards (lower is faster)
  bool fits() const;
  /// The device with the largest shortfall (or the fullest one when everything fits).
  const DeviceBytes& tightest() const;
  std::string name() const;          // "single", "step", "stage:4"
};

/// Bytes per device of one plan (ranks: 1 for single, S for step, N for stage).
Plan evaluate(const PlanRequest& request, Parallel parallel, int64_t ranks);

struct Decision {
  bool fits = false;
  Plan plan;                      // the chosen plan, or the closest one that was refused
  std::string message;            // the refusal ("needs ... ; fits with ...") or a one-line summary
  std::vector<Plan> candidates;   // every plan considered, fastest first
};
/// The fastest plan that fits, or a refusal naming the shortfall and the single changes (precision, kv-precision,
/// parallel) that would fit.
Decision decide(const PlanRequest& request);
/// decide() that throws PlanError with the refusal message when nothing fits.
Plan require_fit(const PlanRequest& request);
/// Reads only `<checkpoint_dir>/config.json` into request.model, then decide(): no weight file is opened.
Decision decide_for_checkpoint(const std::string& checkpoint_dir, PlanRequest request);

/// "25.3 GiB" style, one decimal; under 1 GiB in MiB, under 1 MiB in KiB.
std::string gib(uint64_t bytes);

}  // namespace liveavatar::runtime
