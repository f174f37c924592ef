// liveavatar-run-module: one DiT module or the streaming loop, tensors in and out as .safetensors.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <cstdio>
#include <exception>
#include <string>

#include "weights/weights.h"
#include "run_module.h"

namespace {
void usage() {
  std::printf(
      "usage: liveavatar-run-module --module NAME --inputs IN.safetensors --output OUT.safetensors\n"
      "                             [--weights DIR|FILE.safetensors] [--config config.json] [--tiny] [--seed N]\n"
      "Without --weights the model has seeded random weights. Without --config, <weights dir>/config.json is used\n"
      "when present, else the 14B config (or the tiny one with --tiny).\n\n%s\n",
      liveavatar::dit::tool::modules_help().c_str());
}
}  // namespace

int main(int argc, char** argv) {
  using namespace liveavatar;
  try {
    dit::tool::RunRequest req;
    std::string in_path, out_path;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw Error(a + " needs a value");
        return argv[++i];
      };
      if (a == "--module") req.module = value();
      else if (a == "--inputs") in_path = value();
      else if (a == "--output") out_path = value();
      else if (a == "--weights") req.weights = value();
      else if (a == "--config") req.config = value();
      else if (a == "--tiny") req.tiny = true;
      else if (a == "--seed") req.seed = std::stoull(value());
      else if (a == "-h" || a == "--help") { usage(); return 0; }
      else throw Error("unknown argument '" + a + "' (see --help)");
    }
    if (req.module.empty() || out_path.empty()) throw Error("--module and --output are required (see --help)");
    dit::tool::TensorMap inputs;
    if (!in_path.empty()) {
      const auto ck = weights::load_safetensors(in_path);
      for (const auto& [k, t] : ck.tensors) inputs[k] = t.clone();
    }
    const auto outputs = dit::tool::run(req, inputs);
    std::map<std::string, at::Tensor> contiguous;
    for (const auto& [k, t] : outputs) contiguous[k] = t.contiguous();
    weights::save_safetensors(out_path, contiguous, {{"module", req.module}});
    std::printf("%s: wrote %zu tensors to %s\n", req.module.c_str(), outputs.size(), out_path.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "liveavatar-run-module: %s\n", e.what());
    return 1;
  }
}
