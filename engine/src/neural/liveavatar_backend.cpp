// Backend "liveavatar": the LiveAvatar pipeline on LibTorch, the DiT on one device or over several ranks (the step
// and stage plans of engine/src/parallel: ranks as threads here, or liveavatar-worker processes joining rank 0).
//   portrait -> Wan2.1 VAE -> reference latent (TPP: encode(ref)) + 19 motion latents (encode(ref x 73))
//   prompt   -> umT5 -> text context (cached on disk, encoder freed)
//   speech   -> wav2vec2 (incremental, bounded left context) -> 25 hidden states per video frame
//   per block of 12 video frames: DiT (4 Euler steps, KV ring, conditioning sink) -> 3 latent frames
//            -> streaming VAE decoder (primed with 7 motion latents) -> 12 RGB frames
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <mutex>
#include <string>

#include "../backend.h"
#include "audio/audio_encoder.h"
#include "cuda/cuda.h"
#include "dit/dit.h"
#include "parallel/driver.h"
#include "runtime/planner.h"
#include "test_seams.h"
#include "text/text_encoder.h"
#include "vae/vae.h"
#include "weights/weights.h"
#include "worker.h"

namespace liveavatar {
namespace {

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// The files of a LiveAvatar installation, as the upstream README lays them out:
//   <model_dir>/Wan2.2-S2V-14B/{config.json, diffusion_pytorch_model*.safetensors(+index), Wan2.1_VAE.pth,
//                               models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/, wav2vec2-large-xlsr-53-english/}
//   <model_dir>/LiveAvatar/liveavatar.safetensors
struct ModelFiles {
  std::string base, dit_config, dit_index, dit_single, vae, t5, tokenizer, wav2vec2, lora;

  static ModelFiles locate(const EngineConfig& c) {
    if (c.model_dir.empty())
      throw Error("backend=liveavatar needs model-dir: the folder holding Wan2.2-S2V-14B/ and LiveAvatar/ "
                  "(see the README for the files; `liveavatar-checkpoint make-tiny DIR` writes a tiny test set)");
    struct stat dir_stat {};
    if (::stat(c.model_dir.c_str(), &dir_stat) != 0 || !S_ISDIR(dir_stat.st_mode))
      throw Error("model-dir " + c.model_dir + " does not exist or is not a folder: give the folder holding "
                  "Wan2.2-S2V-14B/ and LiveAvatar/ (see the README; `liveavatar-checkpoint make-tiny DIR` writes a "
                  "tiny test set)");
    ModelFiles f;
    f.base = exists(c.model_dir + "/Wan2.2-S2V-14B") ? c.model_dir + "/Wan2.2-S2V-14B" : c.model_dir;
    f.dit_config = f.base + "/config.json";
    f.dit_index = f.base + "/diffusion_pytorch_model.safetensors.index.json";
    f.dit_single = f.base + "/diffusion_pytorch_model.safetensors";
    f.vae = f.base + "/Wan2.1_VAE.pth";
    f.t5 = f.base + "/models_t5_umt5-xxl-enc-bf16.pth";
    f.tokenizer = f.base + "/google/umt5-xxl";
    f.wav2vec2 = f.base + "/wav2vec2-large-xlsr-53-english";
    auto need = [](const std::string& path, const char* what) {
      if (!exists(path)) throw Error("model-dir is missing " + path + " (" + what + ")");
    };
    need(f.dit_config, "the DiT's config.json");
    if (!exists(f.dit_index) && !exists(f.dit_single))
      throw Error("model-dir is missing the DiT weights: neither " + f.dit_index + " nor " + f.dit_single);
    need(f.vae, "the Wan2.1 VAE");
    need(f.t5, "the umT5 text encoder");
    need(f.tokenizer, "the umT5 tokenizer folder with spiece.model");
    need(f.wav2vec2, "the wav2vec2 audio encoder folder");
    if (!c.lora.empty()) {
      if (!exists(c.lora))
        throw Error("lora file " + c.lora + " does not exist: give the LiveAvatar LoRA (liveavatar.safetensors), or "
                    "leave lora empty to use model-dir/LiveAvatar/liveavatar.safetensors");
      f.lora = c.lora;
    } else if (exists(c.model_dir + "/LiveAvatar/liveavatar.safetensors")) {
      f.lora = c.model_dir + "/LiveAvatar/liveavatar.safetensors";
    }
    return f;
  }
};

uint64_t file_bytes(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode) ? static_cast<uint64_t>(st.st_size) : 0;
}

// Load progress in four parts, each a file or a set of files: the DiT (its shards, and the LoRA merged into it),
// the VAE, wav2vec2 and umT5. Bytes are the files' sizes; inside the DiT they advance tensor by tensor. The
// callback may throw Cancelled, which stops the load.
class Progress {
 public:
  Progress(const EngineConfig& c, const ModelFiles& f) : callback_(c.on_load_progress) {
    uint64_t dit = 0;
    DIR* d = opendir(f.base.c_str());
    if (d) {
      while (dirent* e = readdir(d)) {
        const std::string name = e->d_name;
        if (name.rfind("diffusion_pytorch_model", 0) == 0 && name.size() > 12 &&
            name.compare(name.size() - 12, 12, ".safetensors") == 0)
          dit += file_bytes(f.base + "/" + name);
      }
      closedir(d);
    }
    uint64_t w2v = file_bytes(f.wav2vec2 + "/model.safetensors");
    if (w2v == 0) w2v = file_bytes(f.wav2vec2 + "/pytorch_model.bin");
    parts_ = {{f.base + "/diffusion_pytorch_model*.safetensors", dit + (f.lora.empty() ? 0 : file_bytes(f.lora))},
              {f.vae, file_bytes(f.vae)},
              {f.wav2vec2, w2v},
              {f.t5, file_bytes(f.t5)}};
    for (const auto& p : parts_) total_ += p.second;
  }
  // Part `i` starts (all before it are read).
  void begin(int i) {
    part_ = i;
    done_ = 0;
    for (int k = 0; k < i; ++k) done_ += parts_[static_cast<size_t>(k)].second;
    in_part_ = 0;
    report();
  }
  // `bytes` more of the current part are being read (capped at the part's size).
  void advance(uint64_t bytes) {
    in_part_ = std::min(parts_[static_cast<size_t>(part_)].second, in_part_ + bytes);
    report();
  }
  void end() {
    part_ = static_cast<int>(parts_.size());
    done_ = total_;
    in_part_ = 0;
    report();
  }
  LoadProgress now() const {
    LoadProgress p;
    p.file = part_ < static_cast<int>(parts_.size()) ? parts_[static_cast<size_t>(part_)].first : "";
    p.files_done = part_;
    p.files_total = static_cast<int>(parts_.size());
    p.bytes_done = done_ + in_part_;
    p.bytes_total = total_;
    return p;
  }

 private:
  void report() const {
    if (callback_) callback_(now());
  }
  std::function<void(const LoadProgress&)> callback_;
  std::vector<std::pair<std::string, uint64_t>> parts_;
  uint64_t total_ = 0, done_ = 0, in_part_ = 0;
  int part_ = 0;
};

// Shapes that upstream hard-codes for the real model are read off the checkpoint tensors instead, so a tiny test
// checkpoint in the official layout loads through the same code.
vae::VaeConfig infer_vae_config(const weights::Checkpoint& ckpt, const std::string& file) {
  vae::VaeConfig c;
  auto it = ckpt.tensors.find("encoder.conv1.weight");
  if (it == ckpt.tensors.end()) throw Error(file + " has no encoder.conv1.weight: not a Wan2.1 VAE state dict");
  c.dim = it->second.size(0);
  return c;
}

text::T5Config infer_t5_config(const weights::Checkpoint& ckpt, const std::string& file, int64_t text_len) {
  auto get = [&](const std::string& key) {
    auto it = ckpt.tensors.find(key);
    if (it == ckpt.tensors.end()) throw Error(file + " has no " + key + ": not a umT5 encoder state dict");
    return it->second;
  };
  text::T5Config c;
  const auto emb = get("token_embedding.weight");
  c.vocab_size = emb.size(0);
  c.dim = emb.size(1);
  c.dim_attn = get("blocks.0.attn.q.weight").size(0);
  c.dim_ffn = get("blocks.0.ffn.fc1.weight").size(0);
  const auto rel = get("blocks.0.pos_embedding.embedding.weight");
  c.num_buckets = rel.size(0);
  c.num_heads = rel.size(1);
  int64_t layers = 0;
  while (ckpt.tensors.count("blocks." + std::to_string(layers) + ".attn.q.weight")) ++layers;
  c.num_layers = layers;
  c.text_len = text_len;
  return c;
}

// Bytes the host can still give (MemAvailable of /proc/meminfo); 0 when it cannot be read.
uint64_t host_available_bytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key, unit;
  uint64_t kib = 0;
  while (meminfo >> key >> kib) {
    std::getline(meminfo, unit);
    if (key == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

// The KV caches' storage for kv-precision (auto: the DiT's own dtype).
c10::ScalarType kv_dtype(const std::string& kv_precision) {
  if (kv_precision == "auto") return c10::ScalarType::Undefined;
  if (kv_precision == "fp32") return at::kFloat;
  if (kv_precision == "bf16") return at::kBFloat16;
  if (kv_precision == "fp8") return at::kFloat8_e4m3fn;
  throw Error("kv-precision must be auto, fp32, bf16 or fp8, got " + kv_precision);
}

// The parallel settings resolved before any weight file is read: the plan (auto: the memory planner's choice), one
// device per rank, rank 0's ParallelConfig, and the planner's bytes per device.
struct ParallelSetup {
  parallel::ParallelConfig config;  // rank 0's
  bool local_ranks = true;          // ranks 1.. are threads here (no rendezvous given), else worker processes
  runtime::Plan plan;               // the planner's bytes per device for the chosen plan
  bool checked = false;             // the bytes were checked against known free memory
  // Where the companions run, as the planner placed them: the VAE decoder and wav2vec2 (a device without a rank,
  // else the rank with the most room; with workers elsewhere, rank 0's device) and umT5 (the prompt phase: the
  // device with the most room, else the host).
  c10::Device companions = c10::kCPU;
  c10::Device text_encoder = c10::kCPU;

  static ParallelSetup resolve(const EngineConfig& c, const ModelFiles& files) {
    ParallelSetup out;
    const std::string devices_text = !c.devices.empty() ? c.devices : c.device == "cuda" ? "cuda:0" : c.device;
    std::vector<c10::Device> devices;
    std::chrono::milliseconds timeout{c.parallel_timeout_ms};
    try {
      devices = parallel::parse_devices(devices_text);
      if (c.parallel_timeout_ms <= 0)
        throw parallel::ParallelError("parallel-timeout must be positive, got " +
                                      std::to_string(c.parallel_timeout_ms) + " ms");
    } catch (const parallel::ParallelError& e) {
      throw Error(e.what());
    }
    for (const auto& d : devices)
      if (d.is_cuda() && d.index() >= cuda::device_count())
        throw Error("device " + d.str() + " is not available: " +
                    (cuda::device_count() == 0 ? cuda::unavailable_reason()
                                               : std::to_string(cuda::device_count()) + " GPUs are visible (cuda:0.." +
                                                     std::to_string(cuda::device_count() - 1) + ")") +
                    "; use devices=cpu or GPUs this process sees");
    const auto weights = runtime::parse_precision(c.precision);

    runtime::PlanRequest request;
    // Workers in other processes hold their stages only: this process's one device (rank 0's) runs the companions.
    if (!c.rendezvous.empty()) {
      request.aux.device = 0;
      request.text_encoder.device = 0;
    }
    const int64_t max_area = c.max_area > 0 ? c.max_area : kDefaultMaxArea;
    const Size size = c.width > 0 && c.height > 0 ? Size{c.width, c.height} : model_output_size(384, 704, max_area);
    request.width = size.width;
    request.height = size.height;
    request.weights = weights;
    if (c.kv_precision != "auto") {
      kv_dtype(c.kv_precision);  // a clear error for a bad value
      request.kv = runtime::parse_precision(c.kv_precision);  // else the activations' (the planner's default)
    }
    int64_t stages = 0;
    try {
      request.parallel = runtime::parse_parallel(c.parallel, &stages);
    } catch (const runtime::PlanError& e) {
      throw Error(e.what());
    }
    if (stages != 0 && stages != static_cast<int64_t>(devices.size()))
      throw Error("parallel=" + c.parallel + " needs " + std::to_string(stages) + " devices, devices=" +
                  devices_text + " gives " + std::to_string(devices.size()) +
                  ": list one device per stage (e.g. cpu:" + std::to_string(stages) + ")");
    // The companions' sizes from their files' sizes (stat only: fp32 VAE and wav2vec2, bf16 umT5 as published).
    request.companions.vae_parameters = file_bytes(files.vae) / 4;
    uint64_t w2v = file_bytes(files.wav2vec2 + "/model.safetensors");
    if (w2v == 0) w2v = file_bytes(files.wav2vec2 + "/pytorch_model.bin");
    request.companions.audio_encoder_parameters = w2v / 4;
    request.companions.text_encoder_parameters = file_bytes(files.t5) / 2;
    // Free bytes per device: memory-budget when given; CPU ranks of this process share the host's available memory
    // evenly; a GPU gives its memory less the CUDA context and library handles (the planner's reserve).
    int64_t cpu_ranks = 0;
    for (const auto& d : devices) cpu_ranks += d.is_cpu() ? 1 : 0;
    const uint64_t host = host_available_bytes();
    out.checked = true;
    for (const auto& d : devices) {
      uint64_t budget = c.memory_budget;
      if (budget == 0 && d.is_cpu() && host > 0) budget = host / static_cast<uint64_t>(std::max<int64_t>(1, cpu_ranks));
      if (budget == 0 && d.is_cuda()) {
        const uint64_t total = cuda::device_info(d.index()).total_bytes;
        budget = total > runtime::kDefaultContextReserve ? total - runtime::kDefaultContextReserve : 0;
      }
      if (budget == 0) {
        budget = uint64_t{1} << 50;  // unknown: plan for speed alone, report the bytes unchecked
        out.checked = false;
      }
      // The planner names each device once: CPU ranks share the host, so they are told apart by their rank.
      const std::string name = d.is_cpu() && devices.size() > 1 ? "cpu:" + std::to_string(request.devices.size())
                                                                 : d.str();
      request.devices.push_back(runtime::Device{name, budget});
    }
    runtime::Decision decision;
    try {
      decision = runtime::decide_for_checkpoint(files.base, request);
    } catch (const runtime::PlanError& e) {
      throw Error(std::string("backend=liveavatar cannot plan its memory: ") + e.what());
    }
    if (!decision.fits)
      throw Error("backend=liveavatar does not fit in memory at " + std::to_string(size.width) + "x" +
                  std::to_string(size.height) + ": " + decision.message +
                  " (a smaller width/height or max-area, another precision, more memory-budget or more devices "
                  "would fit; nothing was loaded)");
    out.plan = decision.plan;
    for (size_t i = 0; i < out.plan.devices.size() && i < devices.size(); ++i) {
      if (out.plan.devices[i].vae > 0) out.companions = devices[i];
      if (out.plan.devices[i].text_encoder > 0) out.text_encoder = devices[i];
    }
    const auto chosen = out.plan.parallel == runtime::Parallel::kStep    ? parallel::Plan::kStep
                        : out.plan.parallel == runtime::Parallel::kStage ? parallel::Plan::kStage
                                                                        : parallel::Plan::kSingle;
    if (request.parallel == runtime::Parallel::kAuto) {
      // The planner's choice (posted with the plan): its ranks take the first devices (a device after them may
      // still hold the companions: its entry stays in the plan).
      devices.erase(devices.begin() + out.plan.ranks, devices.end());
      while (static_cast<int64_t>(out.plan.devices.size()) > out.plan.ranks && out.plan.devices.back().role == "unused")
        out.plan.devices.pop_back();
    }
    out.local_ranks = c.rendezvous.empty();
    try {
      out.config = parallel::ParallelConfig(chosen, devices, 0,
                                            out.local_ranks ? parallel::Endpoint{"127.0.0.1", 0}
                                                            : parallel::parse_endpoint(c.rendezvous),
                                            timeout);
    } catch (const parallel::ParallelError& e) {
      throw Error(e.what());
    }
    if (static_cast<int64_t>(devices.size()) != out.plan.ranks)
      throw Error("parallel=" + c.parallel + " runs " + std::to_string(out.plan.ranks) + " ranks, devices=" +
                  devices_text + " gives " + std::to_string(devices.size()) + ": list exactly " +
                  std::to_string(out.plan.ranks) + " devices, one per rank");
    if (!out.local_ranks && chosen == parallel::Plan::kSingle)
      throw Error("rendezvous=" + c.rendezvous + " is where liveavatar-worker processes join rank 0, but the plan is "
                  "single (one rank): clear rendezvous, or choose parallel=step or stage with several devices");
    return out;
  }
};

// The DiT that rank config.rank() holds, built on its device and read from the files with the LoRA merged: the whole
// model (single, step) or its stage's layers.
std::unique_ptr<dit::Model> load_rank_dit(const EngineConfig& c, const ModelFiles& files,
                                          const dit::ModelConfig& dit_config, const parallel::ParallelConfig& pc,
                                          std::function<void(uint64_t)> on_tensor = {}) {
  dit::LoadOptions lo;
  lo.on_tensor = std::move(on_tensor);
  lo.device = pc.device();
  lo.precision = dit::parse_precision(c.precision);
  if (!files.lora.empty()) {
    // The published LoRA is r = 128, alpha = 64. The file does not say so; the rank is in the tensors, and the
    // scale alpha / r = 0.5 is kept for any rank (a tiny test checkpoint uses r = 4, alpha = 2).
    const auto lora = weights::load_safetensors(files.lora);  // header only: the tensors stay mapped
    for (const auto& kv : lora.tensors)
      if (kv.first.find("lora_A") != std::string::npos && kv.second.dim() == 2) {
        lo.lora_options.rank = kv.second.size(0);
        break;
      }
    lo.lora_options.alpha = 0.5 * static_cast<double>(lo.lora_options.rank);
    lo.lora = files.lora;
  }
  if (pc.plan() == parallel::Plan::kStage) {
    const auto [first, last] = parallel::stage_layers(dit_config.num_layers, pc.rank(), pc.world_size());
    lo.first_layer = first;
    lo.last_layer = last;
  }
  return std::make_unique<dit::Model>(dit_config, exists(files.dit_index) ? files.dit_index : files.dit_single, lo);
}

// Immutable weights of one model folder, shared by every stream that uses the same files and precision.
struct Models {
  ModelFiles files;
  dit::ModelConfig dit_config;
  ParallelSetup setup;
  // single and step: [0] the whole DiT (step: shared by the ranks of this process); stage: rank r's layers (only
  // rank 0's when the other ranks are workers).
  std::vector<std::unique_ptr<dit::Model>> dits;
  std::unique_ptr<vae::WanVae> vae;
  std::unique_ptr<audio::AudioEncoder> audio;
  text::CacheOptions text_options;
  LoadProgress loaded;  // the load's last progress report (everything read)

  Models(const EngineConfig& c, ParallelSetup parallel_setup)
      : files(ModelFiles::locate(c)), setup(std::move(parallel_setup)) {
    c10::NoGradGuard no_grad;
    Progress progress(c, files);
    progress.begin(0);
    const c10::Device device = setup.companions;  // the VAE and wav2vec2 (umT5: setup.text_encoder)

    dit_config = dit::ModelConfig::from_json_file(files.dit_config);
    dit_config.validate();
    // Built directly on its device in its dtype and read tensor by tensor (no random values first, host memory
    // near the largest tensor), the LoRA merged per tensor.
    const auto& pc = setup.config;
    // Stage: each local rank its layers. Step: one whole DiT shared by the local ranks when they share a device
    // (a Model is immutable), else one copy per rank's device.
    bool one_device = true;
    for (const auto& d : pc.devices()) one_device = one_device && d == pc.devices().front();
    const bool per_rank = setup.local_ranks && (pc.plan() == parallel::Plan::kStage ||
                                                (pc.plan() == parallel::Plan::kStep && !one_device));
    const int held = per_rank ? pc.world_size() : 1;
    for (int r = 0; r < held; ++r) dits.push_back(load_rank_dit(c, files, dit_config, pc.with_rank(r),
                                      [&progress](uint64_t bytes) { progress.advance(bytes); }));

    progress.begin(1);
    auto vae_ckpt = weights::load_pth(files.vae);
    vae = std::make_unique<vae::WanVae>(infer_vae_config(vae_ckpt, files.vae), device, c10::kFloat);
    vae->load(vae_ckpt);

    progress.begin(2);
    audio = std::make_unique<audio::AudioEncoder>(audio::AudioEncoder::from_folder(files.wav2vec2, device));
    const auto& ac = audio->config();
    if (ac.hidden_size != dit_config.audio_dim || ac.num_hidden_states() != dit_config.audio_layers)
      throw Error("the wav2vec2 in " + files.wav2vec2 + " gives " + std::to_string(ac.num_hidden_states()) +
                  " states of width " + std::to_string(ac.hidden_size) + " but the DiT expects " +
                  std::to_string(dit_config.audio_layers) + " of width " + std::to_string(dit_config.audio_dim) +
                  ": the files come from different models");

    progress.begin(3);
    auto t5_ckpt = weights::load_pth(files.t5);
    text_options.checkpoint = files.t5;
    text_options.tokenizer = files.tokenizer;
    text_options.config = infer_t5_config(t5_ckpt, files.t5, dit_config.text_len);
    text_options.device = setup.text_encoder;
    // umT5 in bf16 as upstream runs it (t5_dtype), or in fp32 when everything is (precision=fp32, the golden runs).
    text_options.dtype = c.precision == "fp32" ? at::kFloat : at::kBFloat16;
    if (text_options.config.dim != dit_config.text_dim)
      throw Error("the umT5 encoder in " + files.t5 + " is " + std::to_string(text_options.config.dim) +
                  " wide but the DiT expects text_dim " + std::to_string(dit_config.text_dim) +
                  ": the files come from different models");
    progress.end();
    loaded = progress.now();
  }
};

// One Models per (files, precision, devices, plan), kept while any engine uses it.
std::shared_ptr<Models> shared_models(const EngineConfig& c) {
  static std::mutex mutex;
  static std::map<std::string, std::weak_ptr<Models>> cache;
  if (c.device != "cpu" && c.device.rfind("cuda", 0) != 0)
    throw Error("device must be cpu, cuda or cuda:N, got " + c.device);
  if (c.precision != "fp32" && c.precision != "bf16" && c.precision != "fp8")
    throw Error("precision must be fp32, bf16 or fp8, got " + c.precision);
  const std::string key = c.model_dir + "\n" + c.lora + "\n" + c.precision + "\n" + c.device + "\n" + c.devices +
                          "\n" + c.parallel + "\n" + c.kv_precision + "\n" + c.rendezvous + "\n" + std::to_string(c.parallel_timeout_ms) +
                          "\n" + std::to_string(c.memory_budget) + "\n" + std::to_string(c.max_area) + "\n" +
                          std::to_string(c.width) + "x" + std::to_string(c.height);
  std::lock_guard<std::mutex> lock(mutex);
  if (auto m = cache[key].lock()) return m;
  const auto files = ModelFiles::locate(c);
  auto setup = ParallelSetup::resolve(c, files);  // the memory planner decides before any weight file is read
  auto m = std::make_shared<Models>(c, std::move(setup));
  cache[key] = m;
  return m;
}

std::shared_ptr<const neural::TestSeams>& test_seams() {
  static std::shared_ptr<const neural::TestSeams> seams;
  return seams;
}

class LiveAvatarBackend final : public Backend {
 public:
  explicit LiveAvatarBackend(const EngineConfig& config)
      : config_(config),
        models_(shared_models(config)),
        spf_(config.sample_rate * config.fps_d / config.fps_n),
        max_area_(config.max_area > 0 ? config.max_area : kDefaultMaxArea),
        seams_(test_seams()) {
    if (config.sample_rate != 16000 || config.fps_n != 25 || config.fps_d != 1)
      throw Error("backend=liveavatar runs at 16000 Hz audio and 25 fps video");
    // The prompt's embedding ends the load: on a cache miss umT5 (11 GB) is read and run. Going to NULL meanwhile
    // cancels it between its layers (the load's progress callback throws Cancelled), as it cancels the files' reading.
    text::CacheOptions text_options = models_->text_options;
    if (config.on_load_progress)
      text_options.interrupt = [callback = config.on_load_progress, at = models_->loaded] { callback(at); };
    text::EmbeddingCache cache(text_options);
    text_context_ = cache.get_or_compute(config.prompt).to(at::kFloat);  // the encoder is freed with `cache`
    if (parallel()) connect();  // workers that do not come fail the start, not the first block
    reset();
  }

  ExecutionPlan execution_plan() const override {
    const auto& setup = models_->setup;
    ExecutionPlan p;
    p.parallel = parallel::plan_name(setup.config.plan());
    p.precision = config_.precision;
    p.kv_precision = runtime::to_string(setup.plan.kv);
    p.rendezvous = config_.rendezvous;
    std::string bytes;
    for (size_t r = 0; r < setup.config.devices().size(); ++r) {
      DevicePlan d;
      d.device = setup.config.devices()[r].str();
      if (r < setup.plan.devices.size()) {
        d.role = setup.plan.devices[r].role;
        d.bytes = setup.plan.devices[r].total();
        d.free_bytes = setup.checked ? setup.plan.devices[r].free_bytes : 0;
      }
      bytes += (bytes.empty() ? "" : ", ") + d.device + " " + runtime::gib(d.bytes);
      p.devices.push_back(std::move(d));
    }
    p.companions = setup.companions.str();
    p.text_encoder = setup.text_encoder.str();
    p.summary = p.parallel + (setup.config.world_size() > 1 ? " x" + std::to_string(setup.config.world_size()) : "") +
                ": " + bytes + " (DiT " + p.precision + ", KV " + p.kv_precision + ", VAE + wav2vec2 on " +
                p.companions + ", umT5 on " + p.text_encoder + ", " +
                (setup.checked ? "checked against free memory" : "free memory unknown, not checked") + "; " +
                (setup.config.world_size() == 1 ? std::string("one rank")
                 : setup.local_ranks            ? std::string("ranks as threads of this process")
                                                : "ranks 1.. are workers joining " + config_.rendezvous) +
                ")";
    return p;
  }

  void set_reference(const RgbImage& image, Size output, std::vector<std::string>* warnings) override {
    (void)warnings;
    reference_ = image;
    encoded_.reset();  // a new picture: encode it again (lazily, on the worker, at the next audio)
    set_output_size(output);
  }

  Size default_size(int reference_width, int reference_height) const override {
    return model_output_size(reference_width, reference_height, max_area_);
  }

  void check_size(Size output) const override {
    if (output.width % 64 || output.height % 64)
      throw Error("backend=liveavatar makes frames whose width and height are multiples of 64 (the VAE downsamples "
                  "by 8, the DiT patches 2x2 and its FramePack packs 4x4 patches), got " +
                  std::to_string(output.width) + "x" + std::to_string(output.height) +
                  ": leave width and height at 0 for the model's size (704x384 area for the portrait's aspect), set "
                  "max-area, or set both to multiples of 64");
  }

  void set_output_size(Size output) override {
    check_size(output);
    if (blocks_done() > 0 && (output.width != size_.width || output.height != size_.height))
      throw Error("backend=liveavatar cannot change the output size in the middle of a stream");
    if (output.width != size_.width || output.height != size_.height) encoded_.reset();
    size_ = output;
    drop_stream();  // conditioned lazily, at the first audio, so negotiation does not encode twice
  }

  FaceLayout face_layout() const override {
    FaceLayout l;
    l.face = {0, 0, size_.width, size_.height};
    return l;
  }

  int frames_per_block() const override { return static_cast<int>(block_frames()); }
  std::vector<std::string> startup_warnings() const override {
    if (!models_->files.lora.empty()) return {};
    return {"model-dir " + config_.model_dir + " has no LiveAvatar/liveavatar.safetensors: running the Wan2.2-S2V "
            "weights without the LiveAvatar LoRA, which the streaming model needs for good pictures (add the file, "
            "or set lora to where it is)"};
  }
  int max_steps() const override { return static_cast<int>(models_->dit_config.sampling_steps); }
  void set_steps(int steps) override {
    steps_ = std::clamp<int64_t>(steps, 1, models_->dit_config.sampling_steps);
    if (session_) session_->set_steps(steps_);
  }
  int last_block_steps() const override { return last_steps_; }
  bool prefers_worker() const override { return true; }

  void push_audio_frames(const float* samples, int frames) override {
    c10::NoGradGuard no_grad;
    condition();
    if (seams_ && seams_->audio_features.defined()) {
      append_features(seam_features(frames));
    } else {
      stream_->push(samples, static_cast<size_t>(frames) * spf_);
      append_features(stream_->pop());
    }
    run_blocks(/*at_end=*/false);
  }

  void finish(int64_t total_frames) override {
    c10::NoGradGuard no_grad;
    condition();
    if (!(seams_ && seams_->audio_features.defined())) append_features(stream_->finish());
    // The last block is padded with silent features (zeros, as upstream pads its audio buckets); the engine shows
    // only the frames up to total_frames.
    const int64_t have = frames_queued_ + pending_frames();
    if (total_frames > have) append_features(at::zeros({models_->dit_config.audio_layers,
                                                         models_->dit_config.audio_dim, total_frames - have}));
    run_blocks(/*at_end=*/true);
  }

  bool render_next(Frame* frame) override {
    if (ready_.empty()) return false;
    *frame = std::move(ready_.front());
    ready_.pop_front();
    return true;
  }

  void set_cancel_flag(const std::atomic<bool>* flag) override { cancel_ = flag; }

  // A new stream with the same picture and size keeps its encoded conditioning (VAE latents, primed decoder).
  void reset() override {
    drop_stream();
    decoder_.reset();
    audio::StreamOptions so;
    so.min_frames = block_frames();
    so.exact_groups = true;  // the same features however the audio arrives (inline or worker, any chunk size)
    stream_ = std::make_unique<audio::AudioStream>(*models_->audio, so);
    features_ = at::Tensor();
    ready_.clear();
    frames_queued_ = 0;
    seam_frames_ = 0;
  }

 private:
  // What the VAE made of the current picture at the current size: kept across streams.
  struct Encoded {
    at::Tensor ref_latent;  // [16, 1, h, w]
    at::Tensor motion;      // [16, 19, h, w]
    std::unique_ptr<vae::StreamingDecoder> primed;  // primed with motion[:, :, :7]; forked for each stream
  };

  int64_t block_frames() const { return 4 * models_->dit_config.frames_per_block; }

  // The DiT of rank 0: the whole model (single, step) or its first layers (stage).
  const dit::Model& dit() const { return *models_->dits.front(); }
  bool parallel() const { return models_->setup.config.world_size() > 1; }
  bool conditioned() const { return session_ || conditioned_; }
  int64_t blocks_done() const {
    return session_ ? session_->blocks_done() : conditioned_ && world_ ? world_->leader().blocks_done() : 0;
  }
  void drop_stream() {
    session_.reset();
    conditioned_ = false;
  }

  // A call into the world of ranks; when it breaks the world (a rank died, hung or erred), the world is taken down
  // at once, so the rendezvous port is free for the ranks' next attempt, and the next stream builds a new one.
  template <typename F>
  void on_world(F&& call) {
    try {
      call();
    } catch (...) {
      if (world_ && !world_->broken().empty()) {
        conditioned_ = false;
        world_.reset();
      }
      throw;
    }
  }

  // The world of ranks (parallel plans): local ranks are threads with their models; remote ones join rank 0's
  // rendezvous. A failed transfer breaks it; the next stream builds a new one.
  void connect() {
    world_.reset();
    const Models& m = *models_;
    world_ = std::make_unique<parallel::World>(
        m.setup.config,
        [&m](int rank) -> const dit::Model& { return *m.dits[m.dits.size() == 1 ? 0 : static_cast<size_t>(rank)]; },
        m.setup.local_ranks);
  }
  int64_t pending_frames() const { return features_.defined() ? features_.size(2) : 0; }

  void append_features(const at::Tensor& f) {
    if (!f.defined() || f.size(2) == 0) return;
    features_ = features_.defined() ? at::cat({features_, f.to(at::kFloat)}, 2) : f.to(at::kFloat);
  }

  // The next `frames` frames of the test seam's features (zeros past its end).
  at::Tensor seam_features(int64_t frames) {
    const auto& all = seams_->audio_features;
    const int64_t have = std::clamp<int64_t>(all.size(2) - seam_frames_, 0, frames);
    at::Tensor f = at::zeros({all.size(0), all.size(1), frames});
    if (have > 0) f.narrow(2, 0, have).copy_(all.narrow(2, seam_frames_, have));
    seam_frames_ += frames;
    return f;
  }

  void throw_if_cancelled() const {
    if (cancel_ && cancel_->load()) throw Cancelled();
  }

  // Reference + motion latents of the current picture and size (once per picture), then the stream's DiT session
  // (the conditioning sink) and its decoder.
  void encode_reference() {
    if (reference_.data.empty()) throw Error("backend=liveavatar: no reference image");
    const int64_t w = size_.width, h = size_.height;
    // Cover-fit the portrait to the output size (scale, centre crop), as upstream's resize_and_centercrop.
    auto img = at::from_blob(const_cast<uint8_t*>(reference_.data.data()), {reference_.height, reference_.width, 3},
                             at::kByte)
                   .permute({2, 0, 1})
                   .unsqueeze(0)
                   .to(at::kFloat);
    const double s = std::max(static_cast<double>(w) / reference_.width, static_cast<double>(h) / reference_.height);
    const int64_t sw = std::max<int64_t>(w, static_cast<int64_t>(std::lround(reference_.width * s)));
    const int64_t sh = std::max<int64_t>(h, static_cast<int64_t>(std::lround(reference_.height * s)));
    if (sh != reference_.height || sw != reference_.width) {
      img = at::upsample_bilinear2d(img, {sh, sw}, /*align_corners=*/false);
      img = img.narrow(2, (sh - h) / 2, h).narrow(3, (sw - w) / 2, w);
    } else if (sh != h || sw != w) {
      img = img.narrow(2, (sh - h) / 2, h).narrow(3, (sw - w) / 2, w);
    }
    const auto device = models_->vae->device();
    // ToTensor() * 2 - 1, as upstream: [1, 3, 1, H, W] in [-1, 1].
    auto ref = (img.div(255) * 2 - 1.0).clamp(-1.0, 1.0).unsqueeze(2).contiguous().to(device);
    auto e = std::make_unique<Encoded>();
    e->ref_latent = models_->vae->encode(ref)[0];  // [16, 1, h, w]
    throw_if_cancelled();
    e->motion = models_->vae->encode(ref.expand({1, 3, models_->dit_config.motion_frames, h, w}).contiguous())[0];
    throw_if_cancelled();
    e->primed = std::make_unique<vae::StreamingDecoder>(*models_->vae);
    e->primed->prime(e->motion.unsqueeze(0).narrow(2, 0, std::min<int64_t>(7, e->motion.size(1))));
    encoded_ = std::move(e);
  }

  void condition() {
    if (conditioned()) return;
    if (!encoded_) encode_reference();
    throw_if_cancelled();
    dit::SessionOptions so;
    so.seed = config_.seed;
    so.rope_seed = config_.seed;
    if (seams_) so.rope_offsets = seams_->rope_offsets;
    so.cancelled = [this] { return cancel_ && cancel_->load(); };  // checked between denoising steps
    so.kv_dtype = kv_dtype(config_.kv_precision);
    const auto dtype = dit().dtype();
    // From the companions' device (the VAE's) to rank 0's.
    const auto ref = encoded_->ref_latent.to(dit().device(), dtype), motion = encoded_->motion.to(dit().device(), dtype);
    const auto text = text_context_.to(dit().device(), dtype);
    if (parallel()) {
      if (!world_ || !world_->broken().empty()) connect();
      on_world([&] { world_->leader().set_condition(ref, motion, text, so); });
      conditioned_ = true;
    } else {
      auto session = std::make_unique<dit::Session>(dit(), so);
      session->set_steps(steps_ > 0 ? steps_ : models_->dit_config.sampling_steps);
      session->set_condition(ref, motion, text);
      session_ = std::move(session);
    }
    decoder_ = std::make_unique<vae::StreamingDecoder>(encoded_->primed->fork());
  }

  // A block whose decode and copy to the host are queued (on a GPU: on the VAE's stream, while the next block's
  // DiT runs on the DiT's). The device tensors it reads stay referenced until its frames are taken.
  struct DecodingBlock {
    int64_t index = 0;
    at::Tensor latents, finite;    // device: the DiT's output and its all-finite flag
    at::Tensor frames, finite_host;  // host (pinned on a GPU): [T, H, W, 3] uint8 and the flag
  };

  void run_blocks(bool at_end) {
    const int64_t n = block_frames();
    // The stage and step plans keep one block per rank in flight when the audio of several is here (a slow model's
    // backlog, or the end of a file), so every rank works; one block at a time otherwise.
    const size_t batch = parallel() ? static_cast<size_t>(models_->setup.config.world_size()) : 1;
    std::optional<DecodingBlock> decoding;
    try {
      while (pending_frames() >= n || (at_end && pending_frames() > 0)) {
        // A block takes long on real weights: a flush or a stop must not wait for the rest of the audio.
        throw_if_cancelled();
        std::vector<at::Tensor> inputs;
        while (inputs.size() < batch && (pending_frames() >= n || (at_end && pending_frames() > 0))) {
          at::Tensor audio = features_.narrow(2, 0, std::min(n, pending_frames()));
          features_ = pending_frames() > n ? features_.narrow(2, n, pending_frames() - n).contiguous() : at::Tensor();
          if (audio.size(2) < n)
            audio = at::cat({audio, at::zeros({audio.size(0), audio.size(1), n - audio.size(2)})}, 2);
          // To a GPU from pinned memory without waiting (LibTorch's host allocator keeps the buffer until the copy).
          const auto dev = dit().device();
          audio = audio.to(dit().dtype());
          inputs.push_back(dev.is_cuda() ? audio.pin_memory().to(dev, /*non_blocking=*/true) : audio);
        }
        std::vector<dit::BlockResult> blocks;
        if (session_) blocks.push_back(session_->generate_block(inputs.front()));
        else on_world([&] { blocks = world_->leader().generate_blocks(inputs); });
        const int64_t first = blocks_done() - static_cast<int64_t>(blocks.size());
        for (size_t i = 0; i < blocks.size(); ++i) {
          last_steps_ = blocks[i].steps.empty() ? static_cast<int>(models_->dit_config.sampling_steps)
                                                : static_cast<int>(blocks[i].steps.size());
          // The previous block's frames were decoded while this block's DiT ran.
          if (decoding) take_frames(*decoding);
          decoding = DecodingBlock{};
          decode_async(blocks[i].latents, first + static_cast<int64_t>(i), *decoding);
        }
      }
    } catch (...) {
      // Frames already generated are kept (a cancelled or failed block loses only itself).
      if (decoding) {
        try {
          take_frames(*decoding);
        } catch (...) {
        }
      }
      throw;
    }
    if (decoding) take_frames(*decoding);
  }

  // Queues the VAE decode of `latents` and the copy of its frames to the host; no host synchronisation here (the
  // NaN check travels with the frames instead of syncing per block).
  // The VAE may sit on another device than rank 0's DiT (the planner's place for the companions): the latents move
  // there first (a small copy, ordered after the DiT's work by LibTorch's cross-device copy), then decode on that
  // device's side stream while the DiT goes on.
  void decode_async(const at::Tensor& latents, int64_t index, DecodingBlock& out) {
    out.index = index;
    out.latents = latents.to(models_->vae->device());
    out.finite = at::isfinite(out.latents).all();
    if (!vae_stream_) vae_stream_ = std::make_unique<cuda::SideStream>(models_->vae->device());
    vae_stream_->run([&] {
      // Upstream's real-time pipeline drops the first 3 decoded frames of the very first block (the hand-over from
      // the motion frames). They are kept here: frame n shows the audio of frame n, so the video stays exactly as
      // long as the audio.
      const auto video = decoder_->decode_block(out.latents.unsqueeze(0).to(models_->vae->dtype()))[0];
      // As upstream writes its frames: uint8(((clamp(x, -1, 1) + 1) / 2) * 255), truncating. [3, T, H, W] -> [T, H, W, 3]
      const auto u8 = (((video.to(at::kFloat).clamp(-1, 1) + 1.0) / 2.0) * 255.0).to(at::kByte).permute({1, 2, 3, 0});
      out.frames = cuda::copy_to_host_async(u8);
      out.finite_host = cuda::copy_to_host_async(out.finite);
    });
  }

  void take_frames(DecodingBlock& block) {
    vae_stream_->synchronize();
    if (!block.finite_host.item<bool>())
      throw Error("backend=liveavatar: the DiT produced NaN or infinity in block " + std::to_string(block.index) +
                  " (try precision=fp32)");
    queue_frames(block.frames);
    block = DecodingBlock{};
  }

  void queue_frames(const at::Tensor& u8) {  // [T, H, W, 3] uint8, host
    for (int64_t t = 0; t < u8.size(0); ++t) {
      Frame f;
      f.index = frames_queued_++;
      f.width = static_cast<int>(u8.size(2));
      f.height = static_cast<int>(u8.size(1));
      const auto* p = u8[t].data_ptr<uint8_t>();
      f.rgb.assign(p, p + static_cast<size_t>(f.width) * f.height * 3);
      ready_.push_back(std::move(f));
    }
  }

  EngineConfig config_;
  std::shared_ptr<Models> models_;
  int spf_;
  int64_t max_area_;
  at::Tensor text_context_;
  RgbImage reference_;
  Size size_;
  std::unique_ptr<Encoded> encoded_;
  std::unique_ptr<dit::Session> session_;  // single: null until conditioned for the current stream
  std::unique_ptr<parallel::World> world_;  // step, stage: rank 0 and the ranks it drives
  bool conditioned_ = false;                // step, stage: the world holds the current stream's conditioning
  std::unique_ptr<vae::StreamingDecoder> decoder_;
  std::unique_ptr<cuda::SideStream> vae_stream_;  // the VAE decode beside the DiT (created on first use)
  std::unique_ptr<audio::AudioStream> stream_;
  at::Tensor features_;  // [layers, dim, frames] not yet given to the DiT
  std::deque<Frame> ready_;
  int64_t frames_queued_ = 0;
  int64_t steps_ = 0;     // denoising steps of the next blocks (0: the model's full count)
  int last_steps_ = 0;    // steps of the last block made
  const std::atomic<bool>* cancel_ = nullptr;
  std::shared_ptr<const neural::TestSeams> seams_;  // tests only (test_seams.h)
  int64_t seam_frames_ = 0;                          // frames of seams_->audio_features handed out
};

std::unique_ptr<Backend> make_liveavatar_backend(const EngineConfig& config) {
  return std::make_unique<LiveAvatarBackend>(config);
}

}  // namespace

namespace neural {
void set_test_seams(std::shared_ptr<const TestSeams> seams) { test_seams() = std::move(seams); }

void run_worker(const EngineConfig& c, const WorkerOptions& options) {
  c10::NoGradGuard no_grad;
  auto log = [&](const std::string& line) {
    if (options.log) options.log("rank " + std::to_string(options.rank) + ": " + line);
  };
  if (c.parallel != "step" && c.parallel != "stage")
    throw Error("a worker runs a rank of parallel=step or parallel=stage, got parallel=" + c.parallel +
                " (auto is decided by rank 0 from its memory: give the worker the plan rank 0 posted)");
  if (c.rendezvous.empty())
    throw Error("a worker needs rendezvous=host:port, the address where rank 0 (the element or tool with the same "
                "rendezvous setting) hosts the store");
  if (c.precision != "fp32" && c.precision != "bf16" && c.precision != "fp8")
    throw Error("precision must be fp32, bf16 or fp8, got " + c.precision);
  parallel::ParallelConfig pc;
  try {
    pc = parallel::ParallelConfig(parallel::parse_plan(c.parallel), parallel::parse_devices(c.devices),
                                  options.rank, parallel::parse_endpoint(c.rendezvous),
                                  std::chrono::milliseconds(c.parallel_timeout_ms));
  } catch (const parallel::ParallelError& e) {
    throw Error(e.what());
  }
  if (pc.is_first())
    throw Error("rank 0 is the engine (the element or a tool with rendezvous set); a worker is rank 1 to " +
                std::to_string(pc.world_size() - 1));
  const auto files = ModelFiles::locate(c);
  auto dit_config = dit::ModelConfig::from_json_file(files.dit_config);
  dit_config.validate();
  const auto model = load_rank_dit(c, files, dit_config, pc);
  log("loaded " + (pc.plan() == parallel::Plan::kStage
                       ? "layers [" + std::to_string(model->first_layer()) + ", " +
                             std::to_string(model->last_layer()) + ")"
                       : std::string("the whole DiT")) +
      " of " + files.base + " on " + pc.device().str());
  bool waiting_said = false;  // "waiting for rank 0" once per wait, not every round
  for (;;) {
    if (options.stop && options.stop()) return;
    try {
      parallel::Rendezvous rv;
      try {
        // Short rounds, so a worker notices rank 0's new world soon after it opens.
        rv = parallel::Rendezvous::open(pc, std::chrono::milliseconds(1000));
      } catch (const parallel::ParallelError&) {
        if (!waiting_said) log("waiting for rank 0 at " + c.rendezvous);
        waiting_said = true;
        continue;
      }
      waiting_said = false;
      auto channels = parallel::connect_channels(pc, rv);
      log("joined " + pc.describe());
      parallel::follow(pc, rv, *channels.pipeline, channels.back.get(), *model);
      log("rank 0 stopped the world");
      if (options.once) return;
      // Wait for rank 0's store to go away before joining again, so the next world is a new one.
      std::string ignored;
      while (!(options.stop && options.stop())) rv.poll("driver/never", std::chrono::milliseconds(200), &ignored);
    } catch (const parallel::ParallelError& e) {
      if (options.once) throw Error(e.what());
      log(std::string(e.what()) + "; joining again");
    }
  }
}
}  // namespace neural

bool register_neural_backend() {
  register_backend("liveavatar", &make_liveavatar_backend);
  return true;
}

}  // namespace liveavatar
