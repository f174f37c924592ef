// liveavatar-worker: ranks 1.. of a parallel plan (step or stage) in their own process, on this or another host.
// It loads its part of the DiT, joins rank 0 (the liveavatar element or a tool with rendezvous set) at host:port and
// runs its share of every block until rank 0 stops; then it waits for rank 0's next world at the same address.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <atomic>
#include <csignal>
#include <cstdio>
#include <string>

#include "cli_args.h"
#include "liveavatar/engine.h"
#include "worker.h"

namespace {

std::atomic<bool> g_stop{false};

void on_signal(int) { g_stop = true; }

const char kUsage[] =
    "usage: liveavatar-worker --model-dir DIR --rendezvous HOST:PORT --rank R --parallel step|stage\n"
    "                         --devices DEVICES [--precision fp32|bf16|fp8] [--lora FILE]\n"
    "                         [--parallel-timeout MS] [--once]\n"
    "\n"
    "Rank R (1 .. ranks - 1) of rank 0's parallel plan. Give it what rank 0 was given: the same model files, plan,\n"
    "devices (the whole world's list, one per rank: cpu:2, or cuda:0,cuda:1,... where this rank uses entry R),\n"
    "precision and rendezvous (rank 0's host and port, e.g. rendezvous=10.0.0.5:29500 on the element). The\n"
    "worker joins again whenever rank 0 starts a new world; --once makes it exit after one (status 1 if it\n"
    "failed). SIGINT / SIGTERM end it between worlds.\n"
    "\n"
    "  --parallel-timeout MS  longest wait for another rank (default 30000), as rank 0's parallel-timeout\n";

}  // namespace

int main(int argc, char** argv) {
  liveavatar::EngineConfig config;
  config.backend = "liveavatar";
  config.parallel = "";
  liveavatar::neural::WorkerOptions options;
  options.rank = -1;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string flag = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw liveavatar::Error(flag + " needs a value (see --help)");
        return argv[++i];
      };
      if (flag == "--help" || flag == "-h") {
        std::fputs(kUsage, stdout);
        return 0;
      } else if (flag == "--model-dir") {
        config.model_dir = value();
      } else if (flag == "--lora") {
        config.lora = value();
      } else if (flag == "--rendezvous") {
        config.rendezvous = value();
      } else if (flag == "--rank") {
        options.rank = static_cast<int>(liveavatar::cli::parse_long(flag, value(), 1, 4095));
      } else if (flag == "--parallel") {
        config.parallel = value();
      } else if (flag == "--devices") {
        config.devices = value();
      } else if (flag == "--precision") {
        config.precision = value();
      } else if (flag == "--parallel-timeout") {
        config.parallel_timeout_ms = static_cast<int>(liveavatar::cli::parse_long(flag, value(), 100, 86400000));
      } else if (flag == "--once") {
        options.once = true;
      } else {
        throw liveavatar::Error("unknown argument '" + flag + "' (see --help)");
      }
    }
    if (config.model_dir.empty() || config.rendezvous.empty() || options.rank < 0 || config.parallel.empty() ||
        config.devices.empty())
      throw liveavatar::Error("--model-dir, --rendezvous, --rank, --parallel and --devices are required (see --help)");
  } catch (const liveavatar::Error& e) {
    std::fprintf(stderr, "liveavatar-worker: %s\n", e.what());
    return 2;
  }
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  options.stop = [] { return g_stop.load(); };
  options.log = [](const std::string& line) {
    std::fprintf(stderr, "liveavatar-worker: %s\n", line.c_str());
    std::fflush(stderr);
  };
  try {
    liveavatar::neural::run_worker(config, options);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "liveavatar-worker: %s\n", e.what());
    return 1;
  }
  return 0;
}
