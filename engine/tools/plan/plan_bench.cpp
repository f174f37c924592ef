// liveavatar-plan-bench: the memory planner's prediction against what LibTorch's CPU allocator really holds while
// the DiT (single plan, random weights) is built, prefills its sink and denoises one block.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/GradMode.h>
#include <dlfcn.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>

#include "counting_allocator.h"
#include "audio/audio_encoder.h"
#include "dit/dit.h"
#include "vae/vae.h"
#include "planner.h"

namespace {

using namespace liveavatar;

void usage() {
  std::printf(
      "usage: liveavatar-plan-bench [--dim N] [--ffn-dim N] [--heads N] [--layers N] [--size HxW] [--dtype fp32|bf16]\n"
      "                             [--device cpu|cuda]\n"
      "                             [--threads N] [--json FILE] [--component dit|vae|wav2vec2]\n"
      "  Builds dit::Model with random weights and a Session (set_condition + one generate_block) while a counting\n"
      "  CPU allocator measures live and peak bytes; prints the planner's prediction beside the measurement as JSON.\n"
      "  --device cuda: the same on GPU 0, measured with the CUDA caching allocator's statistics (allocated bytes,\n"
      "  plus the reserved peak).\n"
      "  Defaults: --dim 512 --ffn-dim 1536 --heads 4 --layers 10 --size 704x384 (1,056 tokens per latent frame)\n"
      "  --dtype fp32; the other fields are the 14B model's.\n"
      "  --component vae: the real-shape VAE (random weights): weights, stream cache and decode_block peak per output\n"
      "  pixel at --size (default 32x32; primed with 2 latent frames, then one 3-frame block). --component wav2vec2:\n"
      "  wav2vec2-large (random weights): weights and the peak of hidden_states on one 4.5 s window.\n");
}

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Live and peak bytes of the allocator that holds the run's tensors: the counting CPU allocator, or on a GPU the
// CUDA caching allocator's own statistics (allocated bytes; reserved bytes show its fragmentation and caching).
class Meter {
 public:
  virtual ~Meter() = default;
  virtual uint64_t live() = 0;
  virtual uint64_t peak() = 0;
  virtual void reset_peak() = 0;
  virtual uint64_t reserved_peak() { return 0; }
};

class CpuMeter final : public Meter {
 public:
  uint64_t live() override { return counter_.live(); }
  uint64_t peak() override { return counter_.peak(); }
  void reset_peak() override { counter_.reset_peak(); }

 private:
  runtime::CountingCpuAllocator counter_;
};

// This build links the CPU LibTorch; loading libtorch_cuda.so registers the CUDA backend and its caching allocator.
class CudaMeter final : public Meter {
 public:
  CudaMeter() {
    if (!dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_GLOBAL))
      throw Error("--device cuda: libtorch_cuda.so could not be loaded (" + std::string(dlerror()) + ")");
    at::empty({1}, at::TensorOptions().device(c10::kCUDA));  // initialises CUDA (throws without a usable GPU)
    allocator_ = c10::getDeviceAllocator(c10::kCUDA);
  }
  uint64_t live() override { return stat().current; }
  uint64_t peak() override { return stat().peak; }
  void reset_peak() override { allocator_->resetPeakStats(0); }
  uint64_t reserved_peak() override {
    return static_cast<uint64_t>(allocator_->getDeviceStats(0).reserved_bytes[0].peak);
  }

 private:
  struct Stat {
    uint64_t current, peak;
  };
  Stat stat() {
    const auto stats = allocator_->getDeviceStats(0);
    const auto& s = stats.allocated_bytes[0];  // StatType::AGGREGATE
    return {static_cast<uint64_t>(s.current), static_cast<uint64_t>(s.peak)};
  }
  c10::DeviceAllocator* allocator_ = nullptr;
};

// The VAE decoder's per-pixel bytes: the planner's constants kVaeCacheBytesPerPixelFp32 / kVaeDecodeValuesPerPixel.
int bench_vae(Meter& counter, c10::Device device, int64_t height, int64_t width, at::ScalarType dtype) {
  c10::NoGradGuard no_grad;
  const uint64_t base = counter.live();
  auto t0 = Clock::now();
  vae::WanVae model(vae::VaeConfig{}, device, dtype, /*seed=*/1);
  const uint64_t weights = counter.live() - base;
  vae::StreamingDecoder decoder(model);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto opts = at::TensorOptions().dtype(dtype);
  decoder.prime(at::randn({1, 16, 2, height / 8, width / 8}, gen, opts).to(device));
  const auto block = at::randn({1, 16, 3, height / 8, width / 8}, gen, opts).to(device);
  const uint64_t cache_before = decoder.cache_bytes();
  counter.reset_peak();
  const uint64_t before = counter.live();
  auto t1 = Clock::now();
  const auto video = decoder.decode_block(block);
  const double block_s = seconds_since(t1);
  const uint64_t peak = counter.peak() - before;
  const double px = static_cast<double>(height * width), b = static_cast<double>(c10::elementSize(dtype));
  std::printf(
      "{\"component\": \"vae\", \"device\": \"%s\", \"reserved_peak\": %llu, \"height\": %lld, \"width\": %lld, \"dtype\": \"%s\", \"weights\": %llu,"
      " \"parameters\": %llu, \"cache_bytes\": %llu, \"cache_bytes_per_pixel\": %.1f,"
      " \"decode_peak_above_cache\": %llu, \"decode_peak_values_per_pixel\": %.1f, \"output_bytes\": %llu,"
      " \"seconds\": {\"total\": %.2f, \"decode_block\": %.2f}}\n",
      device.str().c_str(), static_cast<unsigned long long>(counter.reserved_peak()), static_cast<long long>(height),
      static_cast<long long>(width), c10::toString(dtype), static_cast<unsigned long long>(weights),
      static_cast<unsigned long long>(vae::VaeConfig{}.parameter_count()),
      static_cast<unsigned long long>(cache_before), static_cast<double>(cache_before) / px,
      static_cast<unsigned long long>(peak), static_cast<double>(peak) / px / b,
      static_cast<unsigned long long>(video.nbytes()), seconds_since(t0), block_s);
  return 0;
}

// wav2vec2-large on one streaming window (2 s context + one 0.48 s block + margin = 4.5 s).
int bench_wav2vec2(Meter& counter, c10::Device device, at::ScalarType dtype) {
  c10::NoGradGuard no_grad;
  const uint64_t base = counter.live();
  auto t0 = Clock::now();
  audio::AudioEncoder model(audio::Wav2Vec2Config{}, device, dtype, /*seed=*/1);
  const uint64_t weights = counter.live() - base;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const auto samples = at::randn({72000}, gen) * 0.1;
  counter.reset_peak();
  const uint64_t before = counter.live();
  auto t1 = Clock::now();
  const auto states = model.encode(samples);
  const double encode_s = seconds_since(t1);
  const uint64_t peak = counter.peak() - before;
  std::printf(
      "{\"component\": \"wav2vec2\", \"device\": \"%s\", \"reserved_peak\": %llu, \"samples\": 72000, \"dtype\": \"%s\", \"weights\": %llu,"
      " \"parameters\": %llu, \"window_peak\": %llu, \"output_bytes\": %llu,"
      " \"seconds\": {\"total\": %.2f, \"encode\": %.2f}}\n",
      device.str().c_str(), static_cast<unsigned long long>(counter.reserved_peak()), c10::toString(dtype),
      static_cast<unsigned long long>(weights), static_cast<unsigned long long>(model.parameter_count()), static_cast<unsigned long long>(peak),
      static_cast<unsigned long long>(states.nbytes()), seconds_since(t0), encode_s);
  return 0;
}

long parse_long(const std::string& flag, const std::string& v, long lo, long hi) {
  char* end = nullptr;
  const long x = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end || x < lo || x > hi)
    throw Error(flag + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + v +
                "'");
  return x;
}

double ratio(uint64_t measured, uint64_t predicted) {
  return predicted ? static_cast<double>(measured) / static_cast<double>(predicted) : 0.0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    int64_t dim = 512, ffn = 1536, heads = 4, layers = 10, height = 704, width = 384, threads = 0;
    std::string dtype_name = "fp32", json_path, component = "dit", device_name = "cpu";
    bool size_given = false;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw Error(a + " needs a value (see --help)");
        return argv[++i];
      };
      if (a == "--dim") dim = parse_long(a, value(), 8, 8192);
      else if (a == "--ffn-dim") ffn = parse_long(a, value(), 8, 65536);
      else if (a == "--heads") heads = parse_long(a, value(), 1, 256);
      else if (a == "--layers") layers = parse_long(a, value(), 1, 64);
      else if (a == "--threads") threads = parse_long(a, value(), 1, 1024);
      else if (a == "--dtype") dtype_name = value();
      else if (a == "--json") json_path = value();
      else if (a == "--component") component = value();
      else if (a == "--device") device_name = value();
      else if (a == "--size") {
        const auto v = value();
        const auto x = v.find('x');
        if (x == std::string::npos) throw Error("--size expects HEIGHTxWIDTH, got '" + v + "'");
        height = parse_long(a, v.substr(0, x), 8, 4096);
        width = parse_long(a, v.substr(x + 1), 8, 4096);
        size_given = true;
      } else if (a == "-h" || a == "--help") {
        usage();
        return 0;
      } else throw Error("unknown argument '" + a + "' (see --help)");
    }
    if (dtype_name != "fp32" && dtype_name != "bf16") throw Error("--dtype must be fp32 or bf16");
    if (threads > 0) at::set_num_threads(static_cast<int>(threads));
    const auto dtype = dtype_name == "bf16" ? at::kBFloat16 : at::kFloat;
    if (component != "dit" && component != "vae" && component != "wav2vec2")
      throw Error("--component must be dit, vae or wav2vec2, got " + component);
    if (device_name != "cpu" && device_name != "cuda") throw Error("--device must be cpu or cuda, got " + device_name);
    const c10::Device device = device_name == "cuda" ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
    std::unique_ptr<Meter> meter;
    if (device.is_cuda()) meter = std::make_unique<CudaMeter>();
    else meter = std::make_unique<CpuMeter>();
    if (component == "vae") {
      if (!size_given) height = width = 32;
      if (height % 8 || width % 8) throw Error("--component vae: --size needs multiples of 8");
      return bench_vae(*meter, device, height, width, dtype);
    }
    if (component == "wav2vec2") return bench_wav2vec2(*meter, device, dtype);

    dit::ModelConfig config;
    config.dim = dim;
    config.ffn_dim = ffn;
    config.num_heads = heads;
    config.num_layers = layers;
    std::vector<int64_t> inject;
    for (int64_t l : config.audio_inject_layers)
      if (l < layers) inject.push_back(l);
    config.audio_inject_layers = inject;
    config.validate();

    // The planner's view of the same run: one device, the engine's dtypes, the text's cross-attention K/V cached per
    // layer (the planner's default), no VAE / encoders / slack (not part of this measurement).
    runtime::PlanRequest request;
    request.model = config;
    request.height = height;
    request.width = width;
    request.weights = dtype == at::kFloat ? runtime::Precision::kFp32 : runtime::Precision::kBf16;
    request.devices = {{device.str(), 1ull << 50}};
    request.parallel = runtime::Parallel::kSingle;
    request.aux.device = runtime::Placement::kHost;
    request.text_encoder.device = runtime::Placement::kNone;
    request.slack_fraction = 0;
    const auto plan = runtime::evaluate(request, runtime::Parallel::kSingle, 1);
    const auto& predicted = plan.devices.front();
    const auto tokens = runtime::count_tokens(request.model, height, width);

    c10::NoGradGuard no_grad;
    Meter& counter = *meter;
    const uint64_t base = counter.live();

    auto t0 = Clock::now();
    dit::Model model(config, device, dtype, /*seed=*/1);
    const double build_s = std::chrono::duration<double>(Clock::now() - t0).count();
    const uint64_t weights = counter.live() - base;

    // Inputs the engine hands to the session (VAE latents, umT5 context, wav2vec2 states): not the planner's.
    const int64_t lh = height / 8, lw = width / 8;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
    const auto opts = at::TensorOptions().dtype(dtype);
    const auto ref = at::randn({config.in_dim, 1, lh, lw}, gen, opts).to(device);
    const auto motion = at::randn({config.in_dim, config.lat_motion_frames(), lh, lw}, gen, opts).to(device);
    const auto text = at::randn({config.text_len, config.text_dim}, gen, opts).to(device);
    const auto audio =
        at::randn({config.audio_layers, config.audio_dim, config.audio_frames_per_block()}, gen, opts).to(device);
    const uint64_t inputs = counter.live() - base - weights;

    dit::Session session(model, {});
    counter.reset_peak();
    const uint64_t before_condition = counter.live();
    t0 = Clock::now();
    session.set_condition(ref, motion, text);
    const double condition_s = std::chrono::duration<double>(Clock::now() - t0).count();
    const uint64_t caches = counter.live() - before_condition;
    const uint64_t condition_peak = counter.peak() - before_condition - caches;  // the prefill's transients

    counter.reset_peak();
    const uint64_t before_block = counter.live();
    t0 = Clock::now();
    uint64_t held_after = 0;
    {
      const auto block = session.generate_block(audio);
      held_after = counter.live() - before_block;  // the block's result (latents, velocities) and the clip noise
    }
    const double block_s = std::chrono::duration<double>(Clock::now() - t0).count();
    const uint64_t block_peak = counter.peak() - before_block;
    const uint64_t peak_total = counter.peak() - base - inputs;  // everything but the inputs, at the block's peak

    const uint64_t p_caches = predicted.kv_rings + predicted.sink + predicted.text_context;
    const uint64_t p_total = predicted.streaming();
    char buf[4096];
    std::snprintf(
        buf, sizeof buf,
        "{"
        "  \"config\": {\"dim\": %lld, \"ffn_dim\": %lld, \"heads\": %lld, \"layers\": %lld, \"inject_layers\": %zu,"
        " \"height\": %lld, \"width\": %lld, \"dtype\": \"%s\", \"threads\": %d, \"device\": \"%s\"},"
        "  \"tokens\": {\"frame\": %lld, \"block\": %lld, \"ring\": %lld, \"sink\": %lld},"
        "  \"parameters\": %llu,"
        "  \"weights\": {\"predicted\": %llu, \"measured\": %llu, \"ratio\": %.4f},"
        "  \"kv_sink_text\": {\"predicted\": %llu, \"measured\": %llu, \"ratio\": %.4f,"
        " \"predicted_kv_rings\": %llu, \"predicted_sink\": %llu, \"predicted_text\": %llu},"
        "  \"activations\": {\"predicted\": %llu, \"measured_block_peak\": %llu, \"ratio\": %.4f,"
        " \"measured_prefill_peak\": %llu, \"held_after_block\": %llu},"
        "  \"peak\": {\"predicted\": %llu, \"measured\": %llu, \"ratio\": %.4f, \"reserved\": %llu},"
        "  \"inputs_bytes\": %llu,"
        "  \"seconds\": {\"build\": %.2f, \"set_condition\": %.2f, \"generate_block\": %.2f}"
        "}\n",
        static_cast<long long>(dim), static_cast<long long>(ffn), static_cast<long long>(heads),
        static_cast<long long>(layers), inject.size(), static_cast<long long>(height), static_cast<long long>(width),
        dtype_name.c_str(), at::get_num_threads(), device.str().c_str(), static_cast<long long>(tokens.frame),
        static_cast<long long>(tokens.block), static_cast<long long>(tokens.ring), static_cast<long long>(tokens.sink),
        static_cast<unsigned long long>(request.model.parameter_count()),
        static_cast<unsigned long long>(predicted.weights), static_cast<unsigned long long>(weights),
        ratio(weights, predicted.weights), static_cast<unsigned long long>(p_caches),
        static_cast<unsigned long long>(caches), ratio(caches, p_caches),
        static_cast<unsigned long long>(predicted.kv_rings), static_cast<unsigned long long>(predicted.sink),
        static_cast<unsigned long long>(predicted.text_context),
        static_cast<unsigned long long>(predicted.activations), static_cast<unsigned long long>(block_peak),
        ratio(block_peak, predicted.activations), static_cast<unsigned long long>(condition_peak),
        static_cast<unsigned long long>(held_after), static_cast<unsigned long long>(p_total),
        static_cast<unsigned long long>(peak_total), ratio(peak_total, p_total),
        static_cast<unsigned long long>(counter.reserved_peak()),
        static_cast<unsigned long long>(inputs), build_s, condition_s, block_s);
    std::fputs(buf, stdout);
    if (!json_path.empty()) {
      std::ofstream out(json_path);
      if (!out) throw Error("cannot write " + json_path);
      out << buf;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "liveavatar-plan-bench: %s\n", e.what());
    return 1;
  }
}
