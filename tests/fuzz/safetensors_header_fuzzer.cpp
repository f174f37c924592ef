// libFuzzer target: the safetensors header parser on arbitrary bytes (the input is a whole file).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <cstddef>
#include <cstdint>

#include "weights/weights.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    liveavatar::weights::parse_safetensors_header(data, size, size, "fuzz.safetensors");
  } catch (const liveavatar::weights::WeightsError&) {
    // the expected outcome for almost every input; anything else escapes and is reported
  }
  return 0;
}
