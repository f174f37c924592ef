// liveavatar-dit-bench: per-block latency and peak memory of the streaming DiT (single plan) with random weights.
// `--dit tiny` runs on CPU in CI; `--dit 14b --device cuda --dtype bf16` measures the real shape on a GPU (no
// checkpoint needed). `--compare-previous` runs the previous code path (complex128 RoPE, ring + sink K/V
// concatenated per layer, text K/V per call) side by side; `--load-bench DIR` measures checkpoint loading against a
// raw read of the same bytes. SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "dit/dit.h"
#include "weights/weights.h"
#include "model.h"

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}
// Resident anonymous / file-backed bytes (/proc/self/status, kB), to show what loading a checkpoint costs.
double rss_mib(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string key;
  while (in >> key) {
    if (key == field) {
      double kb = 0;
      in >> kb;
      return kb / 1024.0;
    }
    std::getline(in, key);
  }
  return -1;
}
double peak_rss_gib() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_maxrss) / (1024.0 * 1024.0);  // ru_maxrss is KiB on Linux
}

// Drops a file from the page cache (clean pages only), so the next read comes from the disk.
void evict(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
}

// Seconds to read a file with read() in 8 MiB pieces (the raw speed the loader is compared with).
double raw_read_seconds(const std::string& path, uint64_t* bytes) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw liveavatar::Error("cannot open " + path);
  std::vector<char> buf(8 << 20);
  const auto t0 = Clock::now();
  uint64_t n = 0;
  for (;;) {
    const ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r <= 0) break;
    n += static_cast<uint64_t>(r);
  }
  const double s = seconds_since(t0);
  ::close(fd);
  *bytes = n;
  return s;
}

// A mid-sized DiT (about 0.5 G parameters, 1 GB in bf16) for the load bench: real key names and shapes.
liveavatar::dit::ModelConfig medium_config() { return liveavatar::dit::ModelConfig::medium(); }

// --- The previous code path (before the layer split), kept here to measure against ----------------------------
namespace previous {
using namespace liveavatar::dit;

at::Tensor rope_apply_f64(const at::Tensor& x, const RopeTable& t) {
  const auto b = x.size(0), l = x.size(1), h = x.size(2), d = x.size(3);
  const auto table = at::complex(t.cos.to(at::kDouble), t.sin.to(at::kDouble));
  const auto xc = at::view_as_complex(x.to(at::kDouble).reshape({b, l, h, d / 2, 2}));
  return at::view_as_real(xc * table.unsqueeze(0)).flatten(3).to(at::kFloat);
}

at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RopeTable& table,
                          const RopeTable& cond_table, LayerKV& ring, const LayerKV& sink, const RingWindow& w) {
  const auto dtype = v.scalar_type();
  const int64_t seq = k.size(1);
  const auto rq = rope_apply_f64(q, table).to(dtype);
  const auto rk = rope_apply_f64(k, table).to(dtype);
  ring.k.slice(1, w.start, w.start + seq).copy_(rk);
  ring.v.slice(1, w.start, w.start + seq).copy_(v);
  const auto keys = at::cat({ring.k.slice(1, 0, w.active), rope_apply_f64(sink.k, cond_table).to(dtype)}, 1);
  const auto values = at::cat({ring.v.slice(1, 0, w.active), sink.v}, 1);
  return sdpa_blhd(rq, keys, values);
}

// One denoising call as forward_block ran it before: text K/V recomputed in every layer, fp64 RoPE, concatenation.
at::Tensor forward_block(CausalWanModelS2VImpl& m, BlockInputs in, const at::Tensor& context_emb, KVCache& kv,
                         const CondCache& cond) {
  auto x = in.hidden;
  for (int64_t i = 0; i < m.config.num_layers; ++i) {
    auto block = m.blocks[i]->as<BlockImpl>();
    auto& slot = kv.layers[static_cast<size_t>(i)];
    const auto& sink = cond.layers[static_cast<size_t>(i)];
    const auto mod = block->modulation_for(in.e0, /*conditioning=*/false);
    x = block->forward(x, mod, context_emb, [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
      return previous::ring_attention(q, k, v, in.rope, in.cond_rope, slot, sink, in.window);
    });
    int64_t inj = -1;
    const auto& layers = m.config.audio_inject_layers;
    for (size_t j = 0; j < layers.size(); ++j)
      if (layers[j] == i) inj = static_cast<int64_t>(j);
    if (inj >= 0) x = x + m.audio_injector->forward(inj, x, in.audio_local, in.audio_global);
  }
  in.hidden = x;
  return m.apply_head(in);
}
}  // namespace previous

// CUDA without linking it: the CPU LibTorch of this build gains the CUDA backend when libtorch_cuda.so is loaded,
// and device memory in use is read through the runtime's C API.
struct CudaRuntime {
  using MemGetInfo = int (*)(size_t*, size_t*);
  using Sync = int (*)();
  MemGetInfo mem_get_info = nullptr;
  Sync synchronize = nullptr;
  bool load() {
    if (!dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_GLOBAL)) return false;
    void* rt = dlopen("libcudart.so", RTLD_NOW | RTLD_GLOBAL);
    if (!rt) rt = dlopen("libcudart.so.12", RTLD_NOW | RTLD_GLOBAL);
    if (rt) {
      mem_get_info = reinterpret_cast<MemGetInfo>(dlsym(rt, "cudaMemGetInfo"));
      synchronize = reinterpret_cast<Sync>(dlsym(rt, "cudaDeviceSynchronize"));
    }
    return true;
  }
  double used_gib() const {
    size_t free_b = 0, total_b = 0;
    if (!mem_get_info || mem_get_info(&free_b, &total_b) != 0) return -1;
    return static_cast<double>(total_b - free_b) / (1024.0 * 1024.0 * 1024.0);
  }
  void sync() const {
    if (synchronize) synchronize();
  }
};

void usage() {
  std::printf(
      "usage: liveavatar-dit-bench [--dit tiny|14b] [--device cpu|cuda] [--dtype fp32|bf16] [--blocks N]\n"
      "                            [--latent HxW] [--threads N] [--json FILE] [--checkpoint DIR]\n"
      "                            [--compare-previous]\n"
      "       liveavatar-dit-bench --load-bench DIR [--precision fp32|bf16|fp8] [--keep]\n"
      "  Streams N blocks (3 latent frames, 4 Euler steps each) through the DiT with random weights and reports the\n"
      "  per-block latency (mean / min / max after the first block), the sink prefill time and peak memory.\n"
      "  --compare-previous: the same blocks also through the previous code path (complex128 RoPE, per-layer\n"
      "  concatenation of ring and sink K/V, text K/V per call), alternating, on the same weights and inputs.\n"
      "  --load-bench DIR: writes a medium bf16 checkpoint (0.5 G parameters) into DIR (kept with --keep), then\n"
      "  times a raw read() of its bytes and the model load (each from a cold page cache), and the host peak.\n"
      "  Defaults: --dit tiny --device cpu --dtype fp32 --blocks 6 --latent 8x16 (tiny) / 88x48 (14b, 704x384).\n");
}

}  // namespace

namespace {

// --load-bench: write a medium checkpoint, then raw read vs model load, each from a cold page cache.
int load_bench(const std::string& dir, liveavatar::dit::Precision precision, bool keep, const std::string& json_path) {
  using namespace liveavatar;
  const auto config = medium_config();
  ::mkdir(dir.c_str(), 0755);
  const std::string file = dir + "/diffusion_pytorch_model.safetensors";
  uint64_t largest = 0, total = 0;
  {
    // Built on the meta device for the names and shapes; values drawn per tensor (bf16), never all at once.
    dit::BuildOptions meta;
    meta.params.tensor = at::TensorOptions().dtype(at::kFloat).device(at::kMeta);
    dit::CausalWanModelS2VImpl shapes(config, meta);
    std::map<std::string, at::Tensor> tensors;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
    for (const auto& p : shapes.named_parameters()) {
      auto t = at::empty(p.value().sizes(), at::kFloat).normal_(0.0, 0.02, gen).to(at::kBFloat16);
      largest = std::max<uint64_t>(largest, t.nbytes());
      total += t.nbytes();
      tensors[p.key()] = t;
    }
    weights::save_safetensors(file, tensors);
  }
  evict(file);
  uint64_t bytes = 0;
  const double read_s = raw_read_seconds(file, &bytes);
  evict(file);
  // The load runs in a fresh process (this binary, --load-only), so its peak resident set is the load's alone.
  char exe[4096] = {0};
  if (::readlink("/proc/self/exe", exe, sizeof exe - 1) <= 0) throw Error("cannot find this executable");
  const std::string cmd = std::string(exe) + " --load-only '" + dir + "' --precision " +
                          (precision == dit::Precision::kFp32 ? "fp32" : precision == dit::Precision::kBf16 ? "bf16" : "fp8");
  FILE* child = ::popen(cmd.c_str(), "r");
  if (!child) throw Error("cannot run " + cmd);
  double load_s = -1, peak_growth = -1, model_mib = -1;
  if (std::fscanf(child, "%lf %lf %lf", &load_s, &peak_growth, &model_mib) != 3 || ::pclose(child) != 0)
    throw Error("the load process failed: " + cmd);
  // The previous path: the whole tree built with random values, then the checkpoint copied in.
  evict(file);
  const auto t0 = Clock::now();
  {
    dit::Model old(config, c10::kCPU, dit::precision_dtype(precision), 1);
    old.load(weights::load_safetensors(file));
  }
  const double previous_s = seconds_since(t0);
  if (!keep) {
    std::remove(file.c_str());
    ::rmdir(dir.c_str());
  }
  const double mib = 1024.0 * 1024.0;
  char buf[1024];
  std::snprintf(buf, sizeof buf,
                "{\"load_bench\": \"medium\", \"precision\": \"%s\", \"parameters\": %llu, \"file_mib\": %.1f,"
                " \"largest_tensor_mib\": %.2f, \"raw_read_s\": %.3f, \"raw_read_mib_s\": %.1f, \"load_s\": %.3f,"
                " \"load_mib_s\": %.1f, \"load_vs_read\": %.3f, \"model_mib\": %.1f, \"host_peak_growth_mib\": %.1f,"
                " \"host_peak_over_model_mib\": %.2f, \"previous_build_and_load_s\": %.3f}\n",
                precision == dit::Precision::kFp32 ? "fp32" : precision == dit::Precision::kBf16 ? "bf16" : "fp8",
                static_cast<unsigned long long>(config.parameter_count()), static_cast<double>(bytes) / mib,
                static_cast<double>(largest) / mib, read_s, static_cast<double>(bytes) / mib / read_s, load_s,
                static_cast<double>(bytes) / mib / load_s, read_s / load_s, model_mib, peak_growth,
                peak_growth - model_mib, previous_s);
  std::fputs(buf, stdout);
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    if (!out) throw Error("cannot write " + json_path);
    out << buf;
  }
  (void)total;
  return 0;
}

}  // namespace

// The bench's entry point, shared by liveavatar-dit-bench and `liveavatar-bench --dit`.
int liveavatar_dit_bench_main(int argc, char** argv) {
  using namespace liveavatar;
  try {
    std::string which = "tiny", device_name = "cpu", dtype_name = "fp32", json_path, checkpoint_dir, load_dir;
    std::string precision_name = "bf16", load_only;
    bool compare_previous = false, keep = false;
    int64_t blocks = 6, lat_h = -1, lat_w = -1, threads = 0;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw Error(a + " needs a value");
        return argv[++i];
      };
      if (a == "--dit") which = value();
      else if (a == "--device") device_name = value();
      else if (a == "--dtype") dtype_name = value();
      else if (a == "--blocks") blocks = std::stoll(value());
      else if (a == "--threads") threads = std::stoll(value());
      else if (a == "--json") json_path = value();
      else if (a == "--checkpoint") checkpoint_dir = value();
      else if (a == "--compare-previous") compare_previous = true;
      else if (a == "--load-bench") load_dir = value();
      else if (a == "--load-only") load_only = value();
      else if (a == "--precision") precision_name = value();
      else if (a == "--keep") keep = true;
      else if (a == "--latent") {
        const auto v = value();
        const auto x = v.find('x');
        if (x == std::string::npos) throw Error("--latent expects HxW (latent size), got " + v);
        lat_h = std::stoll(v.substr(0, x));
        lat_w = std::stoll(v.substr(x + 1));
      } else if (a == "-h" || a == "--help") { usage(); return 0; }
      else throw Error("unknown argument '" + a + "' (see --help)");
    }
    if (which != "tiny" && which != "14b") throw Error("--dit must be tiny or 14b, got " + which);
    if (blocks < 1 || blocks > 10000) throw Error("--blocks must be in [1, 10000]");
    if (threads > 0) at::set_num_threads(static_cast<int>(threads));
    if (!load_dir.empty()) return load_bench(load_dir, dit::parse_precision(precision_name), keep, json_path);
    if (!load_only.empty()) {
      // The child of --load-bench: load the medium checkpoint, print "seconds peak_growth_mib model_mib".
      const double rss0 = rss_mib("VmRSS:");
      dit::LoadOptions lo;
      lo.precision = dit::parse_precision(precision_name);
      const auto t0 = Clock::now();
      dit::Model model(medium_config(), load_only, lo);
      const double s = seconds_since(t0);
      std::printf("%.4f %.2f %.2f\n", s, rss_mib("VmHWM:") - rss0,
                  static_cast<double>(model.parameter_bytes()) / (1024.0 * 1024.0));
      return 0;
    }
    // --checkpoint DIR: the DiT of a checkpoint folder (config.json + sharded safetensors), e.g. one written by
    // `liveavatar-checkpoint make-tiny`, instead of random weights.
    const auto config = !checkpoint_dir.empty() ? dit::ModelConfig::from_json_file(checkpoint_dir + "/config.json")
                        : which == "tiny"       ? dit::ModelConfig::tiny()
                                                : dit::ModelConfig{};
    if (lat_h < 0) {
      lat_h = which == "tiny" ? 8 : 88;
      lat_w = which == "tiny" ? 16 : 48;
    }
    if (lat_h % 8 || lat_w % 8 || lat_h <= 0 || lat_w <= 0) throw Error("--latent H and W must be positive multiples of 8");
    CudaRuntime cuda;
    c10::Device device(c10::kCPU);
    if (device_name == "cuda") {
      if (!cuda.load()) throw Error("--device cuda: libtorch_cuda.so could not be loaded (CPU-only LibTorch?)");
      device = c10::Device(c10::kCUDA, 0);
    } else if (device_name != "cpu") {
      throw Error("--device must be cpu or cuda");
    }
    const auto dtype = dtype_name == "bf16" ? at::kBFloat16 : dtype_name == "fp32" ? at::kFloat : throw Error("--dtype fp32|bf16");

    auto t0 = Clock::now();
    dit::Model model(config, device, dtype, /*seed=*/1);
    const double build_s = seconds_since(t0);
    // Loading copies each tensor once, from the file mapping (page cache, shared) into the model's own tensors:
    // anonymous memory should not grow by the checkpoint size (the model tensors exist already).
    double checkpoint_bytes = 0, anon_before = rss_mib("RssAnon:"), anon_growth = 0, file_growth = 0, load_s = 0;
    if (!checkpoint_dir.empty()) {
      const double file_before = rss_mib("RssFile:");
      t0 = Clock::now();
      auto ckpt = weights::load_sharded_safetensors(checkpoint_dir + "/diffusion_pytorch_model.safetensors.index.json");
      for (const auto& kv : ckpt.tensors) checkpoint_bytes += static_cast<double>(kv.second.nbytes());
      model.load(ckpt);
      load_s = seconds_since(t0);
      anon_growth = rss_mib("RssAnon:") - anon_before;
      file_growth = rss_mib("RssFile:") - file_before;
    }
    c10::NoGradGuard no_grad;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
    const auto ref = at::randn({config.in_dim, 1, lat_h, lat_w}, gen);
    const auto motion = at::randn({config.in_dim, config.lat_motion_frames(), lat_h, lat_w}, gen);
    const auto text = at::randn({std::min<int64_t>(config.text_len, 32), config.text_dim}, gen);
    dit::Session session(model, {});
    t0 = Clock::now();
    session.set_condition(ref, motion, text);
    cuda.sync();
    const double prefill_s = seconds_since(t0);
    std::vector<double> lat, prev_lat;
    double dev_peak = cuda.used_gib(), prev_max_diff = 0;
    // The previous path replays the session's calls (same noise, offsets, positions) on its own caches.
    auto& m = *model.module();
    const auto schedule = dit::make_schedule(config);
    dit::CondCache prev_cond;
    std::vector<dit::KVCache> prev_rings;
    at::Tensor prev_ctx, prev_noise;
    if (compare_previous) {
      prev_ctx = m.embed_text(text.to(device, dtype));
      m.prefill(ref, motion, prev_ctx, prev_cond);
      for (int64_t i = 0; i < config.sampling_steps; ++i) prev_rings.push_back(m.make_kv_cache((lat_h / 2) * (lat_w / 2)));
    }
    const int64_t per_clip = config.clip_frames / config.frames_per_block;
    for (int64_t b = 0; b < blocks; ++b) {
      const auto audio = at::randn({config.audio_layers, config.audio_dim, config.audio_frames_per_block()}, gen);
      t0 = Clock::now();
      const auto r = session.generate_block(audio);
      (void)r.latents.sum().item<float>();  // wait for the device
      lat.push_back(seconds_since(t0));
      dev_peak = std::max(dev_peak, cuda.used_gib());
      if (!compare_previous) continue;
      if (b / per_clip >= 1) continue;  // the replay covers clip 0 (no sink refresh to mirror)
      if (b % per_clip == 0) {
        auto g = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(b / per_clip));
        prev_noise = at::randn({config.in_dim, config.clip_frames, lat_h, lat_w}, g, at::TensorOptions().dtype(dtype));
      }
      auto x = prev_noise.slice(1, (b % per_clip) * config.frames_per_block, (b % per_clip + 1) * config.frames_per_block)
                   .to(device);
      const int64_t start = b * config.frames_per_block * (lat_h / 2) * (lat_w / 2);
      t0 = Clock::now();
      for (int64_t i = 0; i < config.sampling_steps; ++i) {
        auto in = m.prepare_block(x, schedule.timesteps[i].item<double>(), at::Tensor(), audio.unsqueeze(0).to(device),
                                  prev_cond.segments, start, r.rope_offsets[static_cast<size_t>(i)],
                                  prev_rings[0].capacity);
        const auto v = previous::forward_block(m, in, prev_ctx, prev_rings[static_cast<size_t>(i)], prev_cond);
        x = dit::euler_step(x, v, schedule, i);
      }
      (void)x.sum().item<float>();
      prev_lat.push_back(seconds_since(t0));
      prev_max_diff = std::max(prev_max_diff, (x.to(at::kFloat) - r.latents.to(at::kFloat)).abs().max().item<double>());
    }
    const std::vector<double> steady(lat.size() > 1 ? lat.begin() + 1 : lat.begin(), lat.end());
    double mean = 0;
    for (double v : steady) mean += v;
    mean /= static_cast<double>(steady.size());
    const double mn = *std::min_element(steady.begin(), steady.end());
    const double mx = *std::max_element(steady.begin(), steady.end());
    const double block_video_s = config.frames_per_block * 4 / 25.0;
    std::string previous_json;
    if (compare_previous && prev_lat.size() > 1) {
      // Same blocks (after the first) in both paths: the ring fills identically.
      double now_sum = 0, prev_sum = 0;
      for (size_t i = 1; i < prev_lat.size(); ++i) {
        now_sum += lat[i];
        prev_sum += prev_lat[i];
      }
      const double n = static_cast<double>(prev_lat.size() - 1);
      char pb[512];
      std::snprintf(pb, sizeof pb,
                    ", \"previous_blocks\": %zu, \"previous_block_mean_s\": %.4f, \"same_blocks_mean_s\": %.4f,"
                    " \"speedup_vs_previous\": %.3f, \"previous_max_abs_diff\": %.3e",
                    prev_lat.size() - 1, prev_sum / n, now_sum / n, prev_sum / now_sum, prev_max_diff);
      previous_json = pb;
    }
    char buf[4096];
    std::snprintf(buf, sizeof buf,
                  "{\"dit\": \"%s\", \"device\": \"%s\", \"dtype\": \"%s\", \"threads\": %d, \"latent\": [%lld, %lld],"
                  " \"tokens_per_block\": %lld, \"parameters\": %llu, \"blocks\": %lld, \"build_s\": %.3f,"
                  " \"prefill_s\": %.4f, \"first_block_s\": %.4f, \"block_mean_s\": %.4f, \"block_min_s\": %.4f,"
                  " \"block_max_s\": %.4f, \"realtime_factor\": %.3f, \"peak_rss_gib\": %.3f, \"device_used_gib\": %.3f,"
                  " \"checkpoint_mib\": %.3f, \"load_s\": %.4f, \"load_rss_anon_growth_mib\": %.3f,"
                  " \"load_rss_file_growth_mib\": %.3f%s}\n",
                  which.c_str(), device_name.c_str(), dtype_name.c_str(), at::get_num_threads(),
                  static_cast<long long>(lat_h), static_cast<long long>(lat_w),
                  static_cast<long long>(config.frames_per_block * (lat_h / 2) * (lat_w / 2)),
                  static_cast<unsigned long long>(model.parameter_count()), static_cast<long long>(blocks), build_s,
                  prefill_s, lat.front(), mean, mn, mx, block_video_s / mean, peak_rss_gib(), dev_peak,
                  checkpoint_bytes / (1024.0 * 1024.0), load_s, anon_growth, file_growth, previous_json.c_str());
    std::fputs(buf, stdout);
    if (!json_path.empty()) {
      std::ofstream out(json_path);
      if (!out) throw Error("cannot write " + json_path);
      out << buf;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "liveavatar-dit-bench: %s\n", e.what());
    return 1;
  }
}
