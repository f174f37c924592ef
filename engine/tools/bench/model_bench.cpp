// `liveavatar-bench --config ...`: the streaming DiT on the devices of a plan, with random weights drawn on the
// device (no checkpoint) or a checkpoint folder. Prints one JSON object: FPS, time to the first block, per-block
// latency, peak allocated / reserved bytes per device beside the memory planner's prediction, achieved TFLOP/s;
// optionally a PNG of per-block latency and memory (one line per device). `--simulate-stage k/N` builds only stage
// k of an N-stage plan and feeds it synthetic hidden states, to measure one GPU of a multi-GPU plan on one GPU.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cuda/cuda.h"
#include "dit/dit.h"
#include "model.h"
#include "parallel/config.h"
#include "plot.h"
#include "runtime/planner.h"

namespace {

using namespace liveavatar;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

const char kUsage[] =
    "usage: liveavatar-bench --config tiny|medium|14b|CONFIG.json (--random-weights | --checkpoint DIR) [options]\n"
    "  --devices LIST       cpu, cuda:0, or cuda:0,cuda:1,... for --plan stage (default cpu)\n"
    "  --plan single|stage  one device, or the layer pipeline over --devices in this process (default single)\n"
    "  --precision P        fp32 | bf16 | fp8 (default bf16)\n"
    "  --fp8-scaling S      tensor | channel (FP8 weight scales; activations follow: per tensor / per row)\n"
    "  --fp8-compute C      auto | scaled-mm | dequantize (default auto: _scaled_mm on sm_89+ GPUs)\n"
    "  --attention K        auto | flash | efficient | cudnn | math (default auto)\n"
    "  --cuda-graphs        replay each (stage, step) forward as a CUDA graph\n"
    "  --simulate-stage k/N build only stage k of an N-stage plan on the first device; synthetic inputs\n"
    "  --memory-cap GIB     cap each GPU's caching allocator (an allocation beyond it is out of memory)\n"
    "  --size HxW           output pixels, multiples of 64 (default 704x384; tiny: 64x128)\n"
    "  --blocks N           blocks to stream (default 8), --seed N, --threads N (CPU)\n"
    "  --json FILE          also write the JSON there;  --plot FILE.png  per-block latency and memory\n"
    "liveavatar-bench --config C --attention-sweep [--devices D] [--size HxW] [--json FILE]\n"
    "  times each attention kernel at the model's shapes (a block's queries over ring + sink keys, first block and\n"
    "  full ring) and its largest difference from the math kernel; no weights.\n";

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

double peak_rss_bytes() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) * 1024.0;
}

dit::ModelConfig config_named(const std::string& name) {
  if (name == "14b") return dit::ModelConfig{};
  if (name == "tiny") return dit::ModelConfig::tiny();
  if (name == "medium") return dit::ModelConfig::medium();
  return dit::ModelConfig::from_json_file(name);
}

// The element's `devices` syntax (cpu, cpu:N, cuda:N lists), then each GPU checked to be there.
std::vector<c10::Device> parse_device_list(const std::string& text) {
  std::vector<c10::Device> out;
  try {
    out = parallel::parse_devices(text);
  } catch (const parallel::ParallelError& e) {
    throw Error(std::string("--devices: ") + e.what());
  }
  for (const auto& d : out)
    if (d.is_cuda() && d.index() >= cuda::device_count())
      throw Error("--devices: " + d.str() + " is not available (" +
                  (cuda::device_count() == 0 ? cuda::unavailable_reason()
                                             : std::to_string(cuda::device_count()) + " GPUs visible") + ")");
  return out;
}

// Matrix multiplications of one block (all denoising steps), the usual 2 * m * n * k per product: the four
// self-attention projections, scores and values over ring + sink, cross-attention q / o projections and scores
// over the text (its K / V are cached per stream), the FFN, the audio injectors' projections and their attention
// over the audio tokens of each frame, and the head. Embeddings and element-wise work are left out.
double flops_per_block(const dit::ModelConfig& c, int64_t block_tokens, int64_t ring_tokens, int64_t sink_tokens,
                       int64_t layers, bool head, int64_t audio_tokens) {
  const double l = static_cast<double>(block_tokens), d = static_cast<double>(c.dim);
  const double keys = static_cast<double>(ring_tokens + sink_tokens);
  double per_layer = 2 * l * d * d * 4 + 2 * 2 * l * keys * d;               // self-attention
  per_layer += 2 * l * d * d * 2 + 2 * 2 * l * static_cast<double>(c.text_len) * d;  // cross-attention
  per_layer += 2 * 2 * l * d * static_cast<double>(c.ffn_dim);                // FFN
  double total = per_layer * static_cast<double>(layers);
  const double injectors = static_cast<double>(std::count_if(
      c.audio_inject_layers.begin(), c.audio_inject_layers.end(), [&](int64_t) { return true; })) *
                           static_cast<double>(layers) / static_cast<double>(c.num_layers);
  total += injectors * (2 * l * d * d * 4 + 2 * 2 * l * static_cast<double>(audio_tokens) * d);
  if (head) total += 2 * l * d * static_cast<double>(c.out_dim * 4);
  return total * static_cast<double>(c.sampling_steps);
}

struct Args {
  std::string config = "", checkpoint, devices = "cpu", plan = "single", precision = "bf16", fp8_scaling = "tensor";
  std::string fp8_compute = "auto", attention = "auto", simulate, json_path, plot_path, size;
  bool random_weights = false, graphs = false, attention_sweep = false;
  double memory_cap_gib = 0;
  int64_t blocks = 8, threads = 0;
  uint64_t seed = 1;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Error(k + " needs a value (see --help)");
      return argv[++i];
    };
    if (k == "--config") a.config = value();
    else if (k == "--random-weights") a.random_weights = true;
    else if (k == "--checkpoint") a.checkpoint = value();
    else if (k == "--devices") a.devices = value();
    else if (k == "--plan") a.plan = value();
    else if (k == "--precision") a.precision = value();
    else if (k == "--fp8-scaling") a.fp8_scaling = value();
    else if (k == "--fp8-compute") a.fp8_compute = value();
    else if (k == "--attention") a.attention = value();
    else if (k == "--cuda-graphs") a.graphs = true;
    else if (k == "--attention-sweep") a.attention_sweep = true;
    else if (k == "--simulate-stage") a.simulate = value();
    else if (k == "--memory-cap") a.memory_cap_gib = std::stod(value());
    else if (k == "--size") a.size = value();
    else if (k == "--blocks") a.blocks = std::stoll(value());
    else if (k == "--seed") a.seed = std::stoull(value());
    else if (k == "--threads") a.threads = std::stoll(value());
    else if (k == "--json") a.json_path = value();
    else if (k == "--plot") a.plot_path = value();
    else if (k == "-h" || k == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else throw Error("unknown argument '" + k + "' (see --help)");
  }
  if (a.attention_sweep) return a;
  if (a.random_weights == !a.checkpoint.empty())
    throw Error("give either --random-weights (weights drawn on the device) or --checkpoint DIR");
  if (a.plan != "single" && a.plan != "stage")
    throw Error("--plan must be single or stage (the step plan runs ranks with their own KV rings: "
                "liveavatar-worker); got " + a.plan);
  if (a.blocks < 2 || a.blocks > 100000) throw Error("--blocks must be in [2, 100000] (the first block is warm-up)");
  if (a.memory_cap_gib < 0) throw Error("--memory-cap must be positive (GiB)");
  return a;
}

// One measured block: seconds and, per device, the peak allocated / reserved bytes during it.
struct BlockSample {
  double seconds = 0;
  std::vector<double> peak_allocated, peak_reserved;
};

// --attention-sweep: each kernel at q [1, H, block, D] over k, v [1, H, ring + sink, D] in the model dtype.
json attention_sweep(const dit::ModelConfig& config, const c10::Device& device, int64_t height, int64_t width,
                     c10::ScalarType dtype) {
  const auto tk = runtime::count_tokens(config, height, width);
  const int64_t h = config.num_heads, d = config.head_dim();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(11);
  json cases = json::array();
  for (int64_t ring : {tk.block, tk.ring}) {
    const int64_t keys = ring + tk.sink;
    const auto opts = at::TensorOptions().dtype(dtype).device(device);
    const auto q = at::randn({1, h, tk.block, d}, gen).to(opts), k = at::randn({1, h, keys, d}, gen).to(opts),
               v = at::randn({1, h, keys, d}, gen).to(opts);
    // [B, H, L, D] -> the [B, L, H, D] layout the model calls with.
    auto call = [&](dit::AttentionKernel kernel) {
      return dit::sdpa_blhd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kernel);
    };
    const auto reference = call(dit::AttentionKernel::kMath).to(at::kFloat);
    json row{{"queries", tk.block}, {"keys", keys}, {"heads", h}, {"head_dim", d}, {"dtype", c10::toString(dtype)}};
    const double flops = 4.0 * static_cast<double>(h * tk.block * keys * d);
    for (auto kernel : {dit::AttentionKernel::kMath, dit::AttentionKernel::kAuto, dit::AttentionKernel::kFlash,
                        dit::AttentionKernel::kEfficient, dit::AttentionKernel::kCudnn}) {
      const char* name = dit::attention_kernel_name(kernel);
      try {
        at::Tensor out;
        for (int i = 0; i < 2; ++i) out = call(kernel);  // warm-up
        cuda::synchronize(device);
        std::vector<double> times;
        for (int i = 0; i < 10; ++i) {
          const auto t0 = Clock::now();
          out = call(kernel);
          cuda::synchronize(device);
          times.push_back(seconds_since(t0));
        }
        std::sort(times.begin(), times.end());
        const double median = times[times.size() / 2];
        row[name] = {{"median_ms", median * 1000.0}, {"min_ms", times.front() * 1000.0}, {"tflops", flops / median / 1e12},
                     {"max_abs_diff_vs_math", (out.to(at::kFloat) - reference).abs().max().item<double>()}};
      } catch (const std::exception& e) {
        std::string what = e.what();
        row[name] = {{"refused", what.substr(0, what.find('\n'))}};
      }
    }
    cases.push_back(row);
  }
  return json{{"bench", "attention"}, {"device", device.str()}, {"cases", cases}};
}

}  // namespace

int liveavatar_model_bench_main(int argc, char** argv) {
  try {
    const Args args = parse(argc, argv);
    if (args.threads > 0) at::set_num_threads(static_cast<int>(args.threads));
    c10::NoGradGuard no_grad;
    const auto config = config_named(args.config.empty() ? throw Error("--config is required (see --help)") : args.config);
    config.validate();
    const auto devices = parse_device_list(args.devices);
    if (args.attention_sweep) {
      int64_t h = args.config == "tiny" ? 64 : 704, w = args.config == "tiny" ? 128 : 384;
      if (!args.size.empty()) {
        const auto x = args.size.find('x');
        if (x == std::string::npos) throw Error("--size expects HxW, got " + args.size);
        h = std::stoll(args.size.substr(0, x));
        w = std::stoll(args.size.substr(x + 1));
      }
      const auto dtype = args.precision == "fp32" ? at::kFloat : at::kBFloat16;
      const auto result = attention_sweep(config, devices.front(), h, w, dtype);
      std::printf("%s\n", result.dump().c_str());
      if (!args.json_path.empty()) std::ofstream(args.json_path) << result.dump(2) << "\n";
      return 0;
    }
    if (args.plan == "single" && devices.size() != 1)
      throw Error("--plan single runs on one device; give one, or --plan stage for " + std::to_string(devices.size()));
    // Output size -> latent grid (VAE x8).
    int64_t height = args.config == "tiny" ? 64 : 704, width = args.config == "tiny" ? 128 : 384;
    if (!args.size.empty()) {
      const auto x = args.size.find('x');
      if (x == std::string::npos) throw Error("--size expects HxW, got " + args.size);
      height = std::stoll(args.size.substr(0, x));
      width = std::stoll(args.size.substr(x + 1));
    }
    if (height % 64 || width % 64 || height <= 0 || width <= 0)
      throw Error("--size: H and W must be positive multiples of 64 (VAE x8, patch x2, FramePack x4)");
    const int64_t lat_h = height / 8, lat_w = width / 8;

    // The plan: which layers each model holds, on which device.
    int stage_index = 0, stages = static_cast<int>(devices.size());
    bool simulate = !args.simulate.empty();
    if (simulate) {
      const auto slash = args.simulate.find('/');
      if (slash == std::string::npos) throw Error("--simulate-stage expects k/N, e.g. 1/4");
      stage_index = std::stoi(args.simulate.substr(0, slash));
      stages = std::stoi(args.simulate.substr(slash + 1));
      if (stages < 1 || stage_index < 0 || stage_index >= stages || stages > config.num_layers)
        throw Error("--simulate-stage k/N needs 0 <= k < N <= num_layers (" + std::to_string(config.num_layers) + ")");
    }
    if (args.plan == "single" && !simulate) stages = 1;
    for (const auto& d : devices)
      if (d.is_cuda() && args.memory_cap_gib > 0)
        cuda::set_memory_cap(d.index(), static_cast<uint64_t>(args.memory_cap_gib * (1ull << 30)));

    dit::LoadOptions base;
    base.precision = dit::parse_precision(args.precision);
    base.attention = dit::parse_attention_kernel(args.attention);
    base.fp8_scaling = args.fp8_scaling == "channel" ? weights::Fp8Scaling::kPerChannel
                       : args.fp8_scaling == "tensor" ? weights::Fp8Scaling::kPerTensor
                                                      : throw Error("--fp8-scaling must be tensor or channel");
    base.fp8_compute = args.fp8_compute == "auto"         ? dit::Fp8Compute::kAuto
                       : args.fp8_compute == "scaled-mm"  ? dit::Fp8Compute::kScaledMm
                       : args.fp8_compute == "dequantize" ? dit::Fp8Compute::kDequantize
                                                          : throw Error("--fp8-compute must be auto, scaled-mm or dequantize");
    auto layers_of = [&](int k) {
      return std::pair<int64_t, int64_t>{k * config.num_layers / stages, (k + 1) * config.num_layers / stages};
    };
    auto build = [&](const dit::LoadOptions& o) {
      return args.random_weights ? std::make_unique<dit::Model>(config, o, args.seed)
                                 : std::make_unique<dit::Model>(config, args.checkpoint, o);
    };
    std::vector<c10::Device> used;  // one per model, in layer order
    std::vector<std::unique_ptr<dit::Model>> models;
    const auto t_build = Clock::now();
    if (simulate) {
      auto o = base;
      o.device = devices.front();
      std::tie(o.first_layer, o.last_layer) = layers_of(stage_index);
      models.push_back(build(o));
      used.push_back(o.device);
    } else {
      for (int k = 0; k < stages; ++k) {
        auto o = base;
        o.device = devices[static_cast<size_t>(k)];
        std::tie(o.first_layer, o.last_layer) = layers_of(k);
        models.push_back(build(o));
        used.push_back(o.device);
      }
    }
    for (const auto& d : used) cuda::synchronize(d);
    const double build_s = seconds_since(t_build);

    auto gen = at::make_generator<at::CPUGeneratorImpl>(args.seed + 100);
    const auto ref = at::randn({config.in_dim, 1, lat_h, lat_w}, gen);
    const auto motion = at::randn({config.in_dim, config.lat_motion_frames(), lat_h, lat_w}, gen);
    const auto text = at::randn({config.text_len, config.text_dim}, gen);
    const int64_t frame_tokens = (lat_h / 2) * (lat_w / 2);
    auto sync_all = [&] {
      for (const auto& d : used) cuda::synchronize(d);
    };
    auto reset_peaks = [&] {
      for (const auto& d : used)
        if (d.is_cuda()) cuda::reset_peak_memory(d.index());
    };
    auto sample_peaks = [&](BlockSample& s) {
      for (const auto& d : used) {
        if (d.is_cuda()) {
          const auto m = cuda::memory_stats(d.index());
          s.peak_allocated.push_back(static_cast<double>(m.peak_allocated));
          s.peak_reserved.push_back(static_cast<double>(m.peak_reserved));
        } else {
          s.peak_allocated.push_back(peak_rss_bytes());
          s.peak_reserved.push_back(peak_rss_bytes());
        }
      }
    };

    std::vector<BlockSample> samples;
    double prefill_s = 0;
    std::string graph_status = "off";
    int64_t sink_tokens = 0, audio_tokens = 0;
    if (!simulate) {
      std::vector<const dit::Model*> chain;
      for (const auto& m : models) chain.push_back(m.get());
      dit::SessionOptions so;
      so.seed = args.seed;
      so.rope_seed = args.seed;
      so.cuda_graphs = args.graphs;
      dit::Session session(chain, so);
      reset_peaks();
      auto t0 = Clock::now();
      session.set_condition(ref, motion, text);
      sync_all();
      prefill_s = seconds_since(t0);
      for (int64_t b = 0; b < args.blocks; ++b) {
        const auto audio = at::randn({config.audio_layers, config.audio_dim, config.audio_frames_per_block()}, gen);
        BlockSample s;
        reset_peaks();
        t0 = Clock::now();
        (void)session.generate_block(audio);
        sync_all();
        s.seconds = seconds_since(t0);
        sample_peaks(s);
        samples.push_back(s);
      }
      graph_status = session.graph_status();
    } else {
      // Synthetic inputs from a CPU model of the first layer with the embeddings (the simulated stage sees
      // realistic shapes and value ranges, not the hidden states of real earlier stages).
      auto helper_options = base;
      helper_options.device = c10::kCPU;
      helper_options.precision = base.precision == dit::Precision::kFp32 ? dit::Precision::kFp32 : dit::Precision::kBf16;
      helper_options.first_layer = 0;
      helper_options.last_layer = 1;
      helper_options.embeddings = true;
      helper_options.head = false;
      dit::Model helper(config, helper_options, args.seed + 1);
      const dit::Model& stage = *models.front();
      auto state = stage.new_state(frame_tokens);
      auto t0 = Clock::now();
      stage.set_text(helper.embed_text(text).to(stage.device()), state);
      auto sink = helper.prepare_sink(ref, motion);
      sink.hidden = sink.hidden.to(stage.device(), stage.dtype());
      sink_tokens = sink.hidden.size(1);
      stage.prefill(sink, state);
      sync_all();
      prefill_s = seconds_since(t0);
      const auto schedule = dit::make_schedule(config);
      cuda::Graphs graphs(stage.device());
      for (int64_t b = 0; b < args.blocks; ++b) {
        const auto audio = at::randn({1, config.audio_layers, config.audio_dim, config.audio_frames_per_block()}, gen);
        const auto x = at::randn({config.in_dim, config.frames_per_block, lat_h, lat_w}, gen);
        // Inputs of the four steps, prepared before the clock starts.
        std::vector<dit::BlockInputs> steps;
        for (int64_t i = 0; i < config.sampling_steps; ++i) {
          auto in = helper.prepare(x, schedule.timesteps[i].item<double>(), audio, sink.segments,
                                   b * config.frames_per_block * frame_tokens, config.rope_offset_min,
                                   state.rings.front().capacity);
          for (at::Tensor* t : {&in.hidden, &in.e, &in.e0, &in.audio_global, &in.audio_local, &in.rope.cos,
                                &in.rope.sin, &in.cond_rope.cos, &in.cond_rope.sin})
            if (t->defined()) *t = t->to(stage.device());
          audio_tokens = in.audio_local.size(2);
          steps.push_back(std::move(in));
        }
        sync_all();
        BlockSample s;
        reset_peaks();
        t0 = Clock::now();
        for (int64_t i = 0; i < config.sampling_steps; ++i) {
          auto& in = steps[static_cast<size_t>(i)];
          if (args.graphs) {
            graphs.run(dit::graph_key(i, in.window), {&in.hidden, &in.e0, &in.audio_global, &in.audio_local, &in.rope.cos, &in.rope.sin,
                             &in.cond_rope.cos, &in.cond_rope.sin},
                       &in.hidden, [&] { stage.run_layers(in, state, i); });
          } else {
            stage.run_layers(in, state, i);
          }
          if (stage.has_head()) (void)stage.head(in);
        }
        sync_all();
        s.seconds = seconds_since(t0);
        sample_peaks(s);
        samples.push_back(s);
      }
      if (args.graphs)
        graph_status = graphs.fallback_reason().empty()
                           ? std::to_string(graphs.graphs()) + " graphs, " + std::to_string(graphs.replays()) + " replays"
                           : "eager: " + graphs.fallback_reason();
    }

    // Figures: the first block is warm-up (lazy initialisation, graph capture), the rest the steady state.
    std::vector<double> steady;
    for (size_t i = 1; i < samples.size(); ++i) steady.push_back(samples[i].seconds);
    std::vector<double> sorted = steady;
    std::sort(sorted.begin(), sorted.end());
    double mean = 0;
    for (double v : steady) mean += v;
    mean /= static_cast<double>(steady.size());
    const double video_per_block = static_cast<double>(config.frames_per_block * 4) / 25.0;
    const int64_t block_tokens = config.frames_per_block * frame_tokens;
    const int64_t ring_tokens = config.clip_frames * frame_tokens;
    if (sink_tokens == 0) {
      const auto tk = runtime::count_tokens(config, height, width);
      sink_tokens = tk.sink;
    }
    if (audio_tokens == 0) audio_tokens = 32;  // the 14B's audio tokens per latent frame, for the FLOP count
    int64_t held_layers = 0;
    bool has_head = false;
    for (const auto& m : models) {
      held_layers += m->last_layer() - m->first_layer();
      has_head = has_head || m->has_head();
    }
    const double flops = flops_per_block(config, block_tokens, ring_tokens, sink_tokens, held_layers, has_head, audio_tokens);

    // The planner's prediction for the DiT part of each device (no VAE / audio / text encoder here).
    runtime::PlanRequest req;
    req.model = config;
    req.height = height;
    req.width = width;
    req.weights = runtime::parse_precision(args.precision);
    req.fp8_scaling = base.fp8_scaling == weights::Fp8Scaling::kPerChannel ? runtime::Fp8Scaling::kPerChannel
                                                                           : runtime::Fp8Scaling::kPerTensor;
    req.text_encoder.device = runtime::Placement::kNone;
    req.aux.device = runtime::Placement::kHost;
    for (int k = 0; k < stages; ++k) req.devices.push_back({"dev" + std::to_string(k), 1ull << 50});
    json predicted = json::array();
    try {
      const auto plan = runtime::evaluate(req, stages == 1 ? runtime::Parallel::kSingle : runtime::Parallel::kStage, stages);
      for (const auto& d : plan.devices) {
        const uint64_t dit_bytes = d.weights + d.kv_rings + d.sink + d.text_context + d.activations;
        predicted.push_back({{"role", d.role}, {"dit_bytes", dit_bytes}, {"weights", d.weights},
                             {"kv_rings", d.kv_rings}, {"sink", d.sink}, {"text_context", d.text_context},
                             {"activations", d.activations}});
      }
    } catch (const std::exception& e) {
      predicted = json{{"error", e.what()}};
    }

    json out;
    out["bench"] = "model";
    out["config"] = args.config;
    out["parameters_held"] = [&] {
      uint64_t n = 0;
      for (const auto& m : models) n += m->parameter_count();
      return n;
    }();
    out["weights"] = args.random_weights ? "random (drawn on the device)" : args.checkpoint;
    out["plan"] = simulate ? "stage " + std::to_string(stage_index) + "/" + std::to_string(stages) + " (simulated)"
                           : args.plan + (stages > 1 ? ":" + std::to_string(stages) : "");
    out["precision"] = args.precision;
    out["fp8_scaling"] = args.fp8_scaling;
    out["fp8_scaled_mm"] = base.precision == dit::Precision::kFp8 &&
                           (base.fp8_compute == dit::Fp8Compute::kScaledMm ||
                            (base.fp8_compute == dit::Fp8Compute::kAuto && cuda::supports_fp8(used.front())));
    out["attention"] = args.attention;
    out["cuda_graphs"] = graph_status;
    out["size"] = {height, width};
    out["tokens"] = {{"block", block_tokens}, {"ring", ring_tokens}, {"sink", sink_tokens}};
    out["memory_cap_gib"] = args.memory_cap_gib;
    json devs = json::array();
    for (size_t i = 0; i < used.size(); ++i) {
      json d{{"device", used[i].str()},
             {"memory_source", used[i].is_cuda() ? "CUDA caching allocator, per block" : "process peak RSS (CPU)"}};
      if (used[i].is_cuda()) {
        const auto info = cuda::device_info(used[i].index());
        d["name"] = info.name;
        d["capability"] = std::to_string(info.major) + "." + std::to_string(info.minor);
        d["total_bytes"] = info.total_bytes;
      }
      double pa = 0, pr = 0;
      for (const auto& s : samples) {
        pa = std::max(pa, s.peak_allocated[i]);
        pr = std::max(pr, s.peak_reserved[i]);
      }
      d["peak_allocated_bytes"] = pa;
      d["peak_reserved_bytes"] = pr;
      // The planner's device for this one: the simulated stage's, else the same position in the chain.
      const size_t planned = simulate ? static_cast<size_t>(stage_index) : i;
      if (predicted.is_array() && planned < predicted.size()) {
        const auto& p = predicted[planned];
        d["predicted"] = p;
        d["predicted_over_peak_allocated"] = pa > 0 ? p["dit_bytes"].get<double>() / pa : 0.0;
      }
      devs.push_back(d);
    }
    out["devices"] = devs;
    out["build_s"] = build_s;
    out["prefill_s"] = prefill_s;
    out["first_block_s"] = samples.front().seconds;
    out["time_to_first_block_s"] = prefill_s + samples.front().seconds;
    out["block_mean_s"] = mean;
    out["block_median_s"] = sorted[sorted.size() / 2];
    out["block_min_s"] = sorted.front();
    out["block_max_s"] = sorted.back();
    out["fps"] = static_cast<double>(config.frames_per_block * 4) / mean;
    out["realtime_factor"] = video_per_block / mean;
    out["flops_per_block"] = flops;
    out["achieved_tflops"] = flops / mean / 1e12;
    json per_block = json::array();
    for (const auto& s : samples) per_block.push_back(s.seconds);
    out["block_s"] = per_block;
    const std::string text_out = out.dump();
    std::printf("%s\n", text_out.c_str());
    if (!args.json_path.empty()) {
      std::ofstream f(args.json_path);
      if (!f) throw Error("cannot write " + args.json_path);
      f << out.dump(2) << "\n";
    }
    if (!args.plot_path.empty()) {
      bench::Chart latency{"block latency, ms", {}}, memory{"peak allocated, GiB", {}};
      for (size_t i = 0; i < used.size(); ++i) {
        bench::Series lat{used[i].str(), {}}, mem{used[i].str(), {}};
        for (const auto& s : samples) {
          lat.values.push_back(s.seconds * 1000.0);
          mem.values.push_back(s.peak_allocated[i] / static_cast<double>(1ull << 30));
        }
        if (i == 0) latency.series.push_back(lat);  // one clock for the whole chain
        memory.series.push_back(mem);
      }
      bench::write_chart_png(args.plot_path, {latency, memory}, "block");
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "liveavatar-bench: %s\n", e.what());
    return 1;
  }
}
