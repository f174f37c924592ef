// libFuzzer target: the .pth reader (zip directory, restricted unpickler, tensor extents) on arbitrary bytes.
// Every tensor it returns is read completely, so a view outside its storage is caught by AddressSanitizer.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#include "liveavatar/weights.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto ck = liveavatar::weights::load_pth_from_memory(data, size, "fuzz.pth");
    for (const auto& kv : ck.tensors) {
      at::Tensor t = kv.second.contiguous();  // touches every element the view can reach
      volatile uint8_t sink = 0;
      const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
      for (size_t i = 0; i < t.nbytes(); ++i) sink ^= p[i];
      (void)sink;
    }
  } catch (const liveavatar::weights::WeightsError&) {
  }
  return 0;
}
