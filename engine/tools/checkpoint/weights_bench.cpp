// liveavatar-weights-bench: loading a synthetic safetensors checkpoint from the page cache, side by side with
// simply reading the same bytes, and the resident memory the load adds (zero-copy: no anonymous copy).
//   liveavatar-weights-bench [--size-gb 2] [--repeat 5] [--dir $TMPDIR]
// Writes <dir>/liveavatar-weights-bench-<pid>.safetensors and removes it at the end.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "weights/weights.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace w = liveavatar::weights;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// kB of the process's anonymous and file-backed resident memory.
void rss_kb(long* anon, long* file) {
  std::ifstream in("/proc/self/status");
  std::string line;
  *anon = *file = 0;
  while (std::getline(in, line)) {
    if (line.rfind("RssAnon:", 0) == 0) *anon = std::atol(line.c_str() + 8);
    if (line.rfind("RssFile:", 0) == 0) *file = std::atol(line.c_str() + 8);
  }
}

// Baseline: read(2) the whole file through an 8 MiB buffer.
double time_read(const std::string& path, std::vector<char>& buf, uint64_t* total) {
  auto t0 = Clock::now();
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw std::runtime_error("cannot open " + path);
  uint64_t n = 0;
  volatile char sink = 0;
  while (true) {
    ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r <= 0) break;
    sink = sink ^ buf[static_cast<size_t>(r) - 1];
    n += static_cast<uint64_t>(r);
  }
  ::close(fd);
  *total = n;
  return seconds_since(t0);
}

// The loader: parse + validate + map + build tensors, then touch one byte per 4 KiB page of every tensor so every
// page is really mapped in (a load that never faults its pages would measure nothing).
double time_load(const std::string& path, bool populate, w::Checkpoint* keep) {
  auto t0 = Clock::now();
  w::Checkpoint ck = w::load_safetensors(path, w::ReadOptions{populate});
  volatile uint8_t sink = 0;
  for (const auto& kv : ck.tensors) {
    const uint8_t* p = static_cast<const uint8_t*>(kv.second.data_ptr());
    size_t n = kv.second.nbytes();
    for (size_t i = 0; i < n; i += 4096) sink = sink ^ p[i];
    if (n) sink = sink ^ p[n - 1];
  }
  double t = seconds_since(t0);
  if (keep) *keep = std::move(ck);
  return t;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  double size_gb = 2.0;
  int repeat = 5;
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = tmp && *tmp ? tmp : "/tmp";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--size-gb" && i + 1 < argc) size_gb = std::atof(argv[++i]);
    else if (a == "--repeat" && i + 1 < argc) repeat = std::atoi(argv[++i]);
    else if (a == "--dir" && i + 1 < argc) dir = argv[++i];
    else {
      std::fprintf(stderr, "usage: liveavatar-weights-bench [--size-gb 2] [--repeat 5] [--dir DIR]\n");
      return 2;
    }
  }
  if (size_gb <= 0 || size_gb > 64 || repeat < 1 || repeat > 100) {
    std::fprintf(stderr, "liveavatar-weights-bench: --size-gb must be in (0, 64], --repeat in 1..100\n");
    return 2;
  }
  const std::string path = dir + "/liveavatar-weights-bench-" + std::to_string(::getpid()) + ".safetensors";
  int rc = 0;
  try {
    // A DiT-like file: bf16 [5120, 5120] tensors (52 MB each) up to the requested size, plus small ones.
    at::Tensor big = (at::arange(5120 * 5120, at::kFloat).remainder(977) / 977).to(at::kBFloat16).reshape({5120, 5120});
    at::Tensor small = at::ones({5120}, at::kBFloat16);
    std::map<std::string, at::Tensor> tensors;
    uint64_t bytes = 0, target = static_cast<uint64_t>(size_gb * 1e9);
    for (int i = 0; bytes < target; ++i) {
      tensors["blocks." + std::to_string(i) + ".ffn.0.weight"] = big;
      tensors["blocks." + std::to_string(i) + ".norm3.weight"] = small;
      bytes += big.nbytes() + small.nbytes();
    }
    auto tw = Clock::now();
    w::save_safetensors(path, tensors);
    std::printf("file: %s, %.3f GB, %zu tensors (written in %.1f s)\n", path.c_str(), bytes / 1e9, tensors.size(),
                seconds_since(tw));
    tensors.clear();
    big = at::Tensor();

    std::vector<char> buf(8u << 20);
    uint64_t total = 0;
    time_read(path, buf, &total);  // warm the page cache
    std::vector<double> t_read, t_load, t_pop;
    for (int r = 0; r < repeat; ++r) {  // interleaved, so drift affects all three alike
      t_read.push_back(time_read(path, buf, &total));
      t_load.push_back(time_load(path, false, nullptr));
      t_pop.push_back(time_load(path, true, nullptr));
    }
    const double gb = total / 1e9;
    double read_s = median(t_read), load_s = median(t_load), pop_s = median(t_pop);
    std::printf("read(2), 8 MiB buffer      : %7.3f s  %6.2f GB/s (median of %d)\n", read_s, gb / read_s, repeat);
    std::printf("load_safetensors + touch   : %7.3f s  %6.2f GB/s  = %5.1f%% of read\n", load_s, gb / load_s,
                100 * read_s / load_s);
    std::printf("load (populate) + touch    : %7.3f s  %6.2f GB/s  = %5.1f%% of read\n", pop_s, gb / pop_s,
                100 * read_s / pop_s);

    long anon0, file0, anon1, file1;
    rss_kb(&anon0, &file0);
    w::Checkpoint kept;
    time_load(path, false, &kept);
    rss_kb(&anon1, &file1);
    std::printf("resident growth with the checkpoint loaded: anonymous %+.1f MB, file-backed %+.1f MB "
                "(checkpoint %.1f MB, %zu tensors copied)\n",
                (anon1 - anon0) / 1e3, (file1 - file0) / 1e3, gb * 1e3, kept.copied_tensors);
    bool speed_ok = read_s / std::min(load_s, pop_s) >= 0.8;
    bool rss_ok = (anon1 - anon0) + (file1 - file0) < 1.5 * gb * 1e6 && (anon1 - anon0) < 0.05 * gb * 1e6;
    std::printf("verdict: speed %s (>= 80%% of read), memory %s (no second copy)\n", speed_ok ? "ok" : "BELOW",
                rss_ok ? "ok" : "GROWS");
    rc = speed_ok && rss_ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "liveavatar-weights-bench: %s\n", e.what());
    rc = 1;
  }
  std::remove(path.c_str());
  return rc;
}
