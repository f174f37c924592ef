// libFuzzer target: a DiT config.json (untrusted: it comes with a model folder) through dit::ModelConfig, then, when
// it is accepted, the exact parameter count and the memory planner's whole decision on it (every plan, every
// device byte figure), so an accepted config can make neither the reader nor the planner's arithmetic misbehave
// (UBSan: signed overflow, shifts; ASan: bounds). Plain C++, no LibTorch.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <cstddef>
#include <cstdint>
#include <string>

#include "dit/config.h"
#include "runtime/planner.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace liveavatar;
  dit::ModelConfig config;
  try {
    config = dit::ModelConfig::from_json_text(std::string(reinterpret_cast<const char*>(data), size), "config.json");
  } catch (const Error&) {
    return 0;  // refused with a message: the expected outcome for most inputs
  }
  volatile uint64_t params = config.parameter_count();
  (void)params;
  runtime::PlanRequest request;
  request.model = config;
  request.devices = runtime::parse_devices("cuda:0=24GiB,cuda:1=24GiB,cuda:2=24GiB,cuda:3=24GiB");
  try {
    const auto decision = runtime::decide(request);
    volatile size_t n = decision.message.size() + decision.candidates.size();
    (void)n;
  } catch (const Error&) {
  }
  return 0;
}
