// libFuzzer target: a sharded checkpoint's *.safetensors.index.json (untrusted: it comes with a model folder) through
// weights::load_sharded_safetensors, beside two real shards written once at start-up (so an index that names them
// gets as far as the cross-checks of keys against shards). Every input must either load or be refused with a
// WeightsError; paths that leave the folder must never be opened (the loader refuses names that are not plain file
// names, and the fuzzer's folder holds nothing else to find).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <string>

#include "weights/weights.h"

namespace {
std::string g_dir;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  char tmpl[] = "/tmp/index-json-fuzz-XXXXXX";
  if (!mkdtemp(tmpl)) std::abort();
  g_dir = tmpl;
  using liveavatar::weights::save_safetensors;
  save_safetensors(g_dir + "/model-00001-of-00002.safetensors",
                   {{"blocks.0.q.weight", at::ones({4, 4})}, {"blocks.0.q.bias", at::zeros({4})}});
  save_safetensors(g_dir + "/model-00002-of-00002.safetensors", {{"head.weight", at::full({2, 4}, 0.5)}});
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string index = g_dir + "/model.safetensors.index.json";
  {
    std::ofstream out(index, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  try {
    const auto checkpoint = liveavatar::weights::load_sharded_safetensors(index);
    volatile size_t n = checkpoint.tensors.size();
    (void)n;
  } catch (const liveavatar::weights::WeightsError&) {
    // refused with a message: the expected outcome for most inputs
  }
  return 0;
}
