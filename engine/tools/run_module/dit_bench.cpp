// liveavatar-dit-bench: per-block latency and peak memory of the streaming DiT (single plan) with random weights.
// `--dit tiny` runs on CPU in CI; `--dit 14b --device cuda --dtype bf16` measures the real shape on a GPU (no
// checkpoint needed). SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <dlfcn.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "liveavatar/dit.h"
#include "liveavatar/weights.h"

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
      "  Streams N blocks (3 latent frames, 4 Euler steps each) through the DiT with random weights and reports the\n"
      "  per-block latency (mean / min / max after the first block), the sink prefill time and peak memory.\n"
      "  Defaults: --dit tiny --device cpu --dtype fp32 --blocks 6 --latent 8x16 (tiny) / 88x48 (14b, 704x384).\n");
}

}  // namespace

// The bench's entry point, shared by liveavatar-dit-bench and `liveavatar-bench --dit`.
int liveavatar_dit_bench_main(int argc, char** argv) {
  using namespace liveavatar;
  try {
    std::string which = "tiny", device_name = "cpu", dtype_name = "fp32", json_path, checkpoint_dir;
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
    std::vector<double> lat;
    double dev_peak = cuda.used_gib();
    for (int64_t b = 0; b < blocks; ++b) {
      const auto audio = at::randn({config.audio_layers, config.audio_dim, config.audio_frames_per_block()}, gen);
      t0 = Clock::now();
      const auto r = session.generate_block(audio);
      (void)r.latents.sum().item<float>();  // wait for the device
      lat.push_back(seconds_since(t0));
      dev_peak = std::max(dev_peak, cuda.used_gib());
    }
    const std::vector<double> steady(lat.size() > 1 ? lat.begin() + 1 : lat.begin(), lat.end());
    double mean = 0;
    for (double v : steady) mean += v;
    mean /= static_cast<double>(steady.size());
    const double mn = *std::min_element(steady.begin(), steady.end());
    const double mx = *std::max_element(steady.begin(), steady.end());
    const double block_video_s = config.frames_per_block * 4 / 25.0;
    char buf[2048];
    std::snprintf(buf, sizeof buf,
                  "{\"dit\": \"%s\", \"device\": \"%s\", \"dtype\": \"%s\", \"threads\": %d, \"latent\": [%lld, %lld],"
                  " \"tokens_per_block\": %lld, \"parameters\": %llu, \"blocks\": %lld, \"build_s\": %.3f,"
                  " \"prefill_s\": %.4f, \"first_block_s\": %.4f, \"block_mean_s\": %.4f, \"block_min_s\": %.4f,"
                  " \"block_max_s\": %.4f, \"realtime_factor\": %.3f, \"peak_rss_gib\": %.3f, \"device_used_gib\": %.3f,"
                  " \"checkpoint_mib\": %.3f, \"load_s\": %.4f, \"load_rss_anon_growth_mib\": %.3f,"
                  " \"load_rss_file_growth_mib\": %.3f}\n",
                  which.c_str(), device_name.c_str(), dtype_name.c_str(), at::get_num_threads(),
                  static_cast<long long>(lat_h), static_cast<long long>(lat_w),
                  static_cast<long long>(config.frames_per_block * (lat_h / 2) * (lat_w / 2)),
                  static_cast<unsigned long long>(model.parameter_count()), static_cast<long long>(blocks), build_s,
                  prefill_s, lat.front(), mean, mn, mx, block_video_s / mean, peak_rss_gib(), dev_peak,
                  checkpoint_bytes / (1024.0 * 1024.0), load_s, anon_growth, file_growth);
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
