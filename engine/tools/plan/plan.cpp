// liveavatar-plan: what each device needs for each parallel plan, and which plan the runtime would choose (or why
// it refuses), from config.json alone. SPDX-License-Identifier: LGPL-2.1-or-later
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "planner.h"

namespace {

using namespace liveavatar::runtime;

void usage() {
  std::printf(
      "usage: liveavatar-plan [--devices SPEC] [--checkpoint DIR | --config FILE] [--size HxW]\n"
      "                       [--precision fp32|bf16|fp8] [--kv-precision fp32|bf16|fp8] [--fp8-scaling tensor|channel]\n"
      "                       [--parallel auto|single|step|stage|stage:N] [--aux auto|host|N]\n"
      "                       [--text-encoder auto|host|none|N] [--aux-precision fp32|bf16] [--slack F]\n"
      "                       [--context-reserve SIZE] [--upstream-dtypes] [--no-text-kv-cache] [--table] [--json]\n"
      "  Prints the bytes each device needs (weights, KV rings, sink, text context, activations, VAE, audio and text\n"
      "  encoders, allocator slack) for the chosen plan, or the refusal that says what would fit; exit status 1 when\n"
      "  nothing fits. Only config.json is read, never a weight file.\n"
      "  --devices   cuda:0=22GiB,cuda:1=22GiB (free memory as given) or a preset NxSGB: N cards of S GB (S GiB\n"
      "              each, minus --context-reserve, default 0.5GiB). Default: 1x80GB.\n"
      "  --size      output height x width in pixels, multiples of 64 (default 704x384)\n"
      "  --table     every plan x weight precision x KV precision -> GiB per device, instead of one decision\n"
      "  --upstream-dtypes  hold time_embedding, time_projection, head and the audio encoder in the model dtype as\n"
      "              upstream does (the engine keeps them fp32): reproduces the DESIGN.md figures\n"
      "  --no-text-kv-cache  the text's cross-attention K/V is recomputed per call instead of cached per layer\n");
}

int parse_placement(const std::string& flag, const std::string& v, bool none_ok) {
  if (v == "auto") return Placement::kAuto;
  if (v == "host") return Placement::kHost;
  if (v == "none" && none_ok) return Placement::kNone;
  char* end = nullptr;
  const long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || *end || n < 0 || n > 4096)
    throw PlanError(flag + " expects auto, host" + (none_ok ? ", none" : "") + " or a device index, got '" + v + "'");
  return static_cast<int>(n);
}

double to_gib(uint64_t b) { return static_cast<double>(b) / static_cast<double>(kGiB); }

nlohmann::json device_json(const DeviceBytes& d) {
  return {{"device", d.device},       {"role", d.role},
          {"free_bytes", d.free_bytes}, {"weights_bytes", d.weights},
          {"kv_rings_bytes", d.kv_rings}, {"sink_bytes", d.sink},
          {"text_context_bytes", d.text_context}, {"activations_bytes", d.activations},
          {"vae_bytes", d.vae},         {"audio_encoder_bytes", d.audio_encoder},
          {"text_encoder_bytes", d.text_encoder}, {"slack_bytes", d.slack},
          {"total_bytes", d.total()},   {"total_gib", to_gib(d.total())},
          {"fits", d.fits()}};
}

nlohmann::json plan_json(const Plan& p) {
  nlohmann::json devices = nlohmann::json::array();
  for (const auto& d : p.devices) devices.push_back(device_json(d));
  return {{"parallel", p.name()}, {"ranks", p.ranks}, {"weights", to_string(p.weights)}, {"kv", to_string(p.kv)},
          {"block_forwards", p.block_forwards}, {"fits", p.fits()}, {"devices", devices}};
}

void print_plan(const Plan& p) {
  std::printf("%-8s %-34s %8s %8s %8s %8s %8s %8s %8s %8s %8s %9s %9s\n", "device", "role", "weights", "kv", "sink",
              "text", "act", "vae", "audio", "umT5", "slack", "total", "free");
  for (const auto& d : p.devices)
    std::printf("%-8s %-34s %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %8.2f %9.2f %9.2f%s\n", d.device.c_str(),
                d.role.c_str(), to_gib(d.weights), to_gib(d.kv_rings), to_gib(d.sink), to_gib(d.text_context),
                to_gib(d.activations), to_gib(d.vae), to_gib(d.audio_encoder), to_gib(d.text_encoder), to_gib(d.slack),
                to_gib(d.total()), to_gib(d.free_bytes), d.fits() ? "" : "  DOES NOT FIT");
  std::printf("(GiB; total = max(streaming, prompt phase with umT5) + slack)\n");
}

// Every plan the devices allow x weight precision x KV precision -> total GiB per device.
int print_table(const PlanRequest& base, bool json) {
  nlohmann::json rows = nlohmann::json::array();
  const int64_t n = static_cast<int64_t>(base.devices.size());
  std::vector<std::pair<Parallel, int64_t>> plans{{Parallel::kSingle, 1}};
  if (n >= base.model.sampling_steps) plans.push_back({Parallel::kStep, base.model.sampling_steps});
  for (int64_t k = 2; k <= std::min<int64_t>(n, base.model.num_layers); ++k) plans.push_back({Parallel::kStage, k});
  if (!json) {
    std::printf("%-9s %-5s %-5s", "plan", "wts", "kv");
    for (const auto& d : base.devices) std::printf(" %9s", d.name.c_str());
    std::printf("  fits\n");
  }
  for (const auto& [parallel, ranks] : plans)
    for (Precision w : {Precision::kFp32, Precision::kBf16, Precision::kFp8})
      for (Precision kv : {Precision::kFp32, Precision::kBf16, Precision::kFp8}) {
        if (w == Precision::kFp32 ? kv != Precision::kFp32 : kv == Precision::kFp32) continue;
        PlanRequest r = base;
        r.weights = w;
        r.kv = kv;
        r.parallel = Parallel::kAuto;
        r.stages = 0;
        const Plan p = evaluate(r, parallel, ranks);
        if (json) {
          rows.push_back(plan_json(p));
          continue;
        }
        std::printf("%-9s %-5s %-5s", p.name().c_str(), to_string(w), to_string(kv));
        for (const auto& d : p.devices) {
          if (d.total() == 0) std::printf(" %9s", "-");
          else std::printf(" %8.1f%s", to_gib(d.total()), d.fits() ? " " : "!");
        }
        std::printf("  %s\n", p.fits() ? "yes" : "no");
      }
  if (json) std::cout << nlohmann::json{{"table", rows}}.dump(2) << "\n";
  else std::printf("(GiB per device; ! = more than its free memory, - = unused)\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    PlanRequest r;
    std::string devices = "1x80GB", checkpoint, config;
    uint64_t reserve = kDefaultContextReserve;
    bool json = false, table = false;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw PlanError(a + " needs a value (see --help)");
        return argv[++i];
      };
      if (a == "--devices") devices = value();
      else if (a == "--checkpoint") checkpoint = value();
      else if (a == "--config") config = value();
      else if (a == "--size") {
        const auto v = value();
        const auto x = v.find('x');
        // Named: e1 / e2 point into them after the parse (temporaries were read after their end, ASan).
        const std::string hs = x == std::string::npos ? std::string() : v.substr(0, x);
        const std::string ws = x == std::string::npos ? std::string() : v.substr(x + 1);
        char *e1 = nullptr, *e2 = nullptr;
        const long h = x == std::string::npos ? 0 : std::strtol(hs.c_str(), &e1, 10);
        const long w = x == std::string::npos ? 0 : std::strtol(ws.c_str(), &e2, 10);
        if (x == std::string::npos || *e1 || *e2 || h <= 0 || w <= 0 || h > 16384 || w > 16384)
          throw PlanError("--size expects HEIGHTxWIDTH in pixels (e.g. 704x384), got '" + v + "'");
        r.height = h;
        r.width = w;
      } else if (a == "--precision") r.weights = parse_precision(value());
      else if (a == "--kv-precision") r.kv = parse_precision(value());
      else if (a == "--aux-precision") r.aux_precision = parse_precision(value());
      else if (a == "--fp8-scaling") {
        const auto v = value();
        if (v == "tensor") r.fp8_scaling = Fp8Scaling::kPerTensor;
        else if (v == "channel") r.fp8_scaling = Fp8Scaling::kPerChannel;
        else throw PlanError("--fp8-scaling expects tensor or channel, got '" + v + "'");
      } else if (a == "--parallel") r.parallel = parse_parallel(value(), &r.stages);
      else if (a == "--aux") r.aux.device = parse_placement(a, value(), false);
      else if (a == "--text-encoder") r.text_encoder.device = parse_placement(a, value(), true);
      else if (a == "--slack") {
        const auto v = value();
        char* end = nullptr;
        r.slack_fraction = std::strtod(v.c_str(), &end);
        if (v.empty() || *end) throw PlanError("--slack expects a fraction such as 0.05, got '" + v + "'");
      } else if (a == "--context-reserve") reserve = parse_bytes(value());
      else if (a == "--upstream-dtypes") r.keep_fp32_modules = false;
      else if (a == "--no-text-kv-cache") r.cache_text_kv = false;
      else if (a == "--table") table = true;
      else if (a == "--json") json = true;
      else if (a == "-h" || a == "--help") {
        usage();
        return 0;
      } else throw PlanError("unknown argument '" + a + "' (see --help)");
    }
    if (!checkpoint.empty() && !config.empty()) throw PlanError("give --checkpoint or --config, not both");
    if (!checkpoint.empty()) config = checkpoint + "/config.json";
    if (!config.empty()) {
      try {
        r.model = liveavatar::dit::ModelConfig::from_json_file(config);
      } catch (const liveavatar::dit::DitError& e) {
        throw PlanError(e.what());
      }
    }
    r.devices = parse_devices(devices, reserve);
    r.validate();
    if (table) return print_table(r, json);

    const Decision d = decide(r);
    if (json) {
      nlohmann::json candidates = nlohmann::json::array();
      for (const auto& p : d.candidates) candidates.push_back(plan_json(p));
      const auto t = count_tokens(r.model, r.height, r.width);
      std::cout << nlohmann::json{{"fits", d.fits},
                                  {"message", d.message},
                                  {"parameters", r.model.parameter_count()},
                                  {"tokens", {{"frame", t.frame}, {"block", t.block}, {"ring", t.ring},
                                              {"sink", t.sink}, {"text", t.text}}},
                                  {"plan", plan_json(d.plan)},
                                  {"candidates", candidates}}
                       .dump(2)
                << "\n";
    } else {
      std::printf("%s\n\n", d.message.c_str());
      print_plan(d.plan);
    }
    if (!d.fits) {
      if (json) std::fprintf(stderr, "liveavatar-plan: %s\n", d.message.c_str());
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "liveavatar-plan: %s\n", e.what());
    return 2;
  }
}
