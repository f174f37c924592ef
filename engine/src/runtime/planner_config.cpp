// The planner's view of a checkpoint: config.json only (never a weight file), read by dit::ModelConfig.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "planner.h"

namespace liveavatar::runtime {

Decision decide_for_checkpoint(const std::string& checkpoint_dir, PlanRequest request) {
  try {
    request.model = dit::ModelConfig::from_json_file(checkpoint_dir + "/config.json");
  } catch (const dit::DitError& e) {
    throw PlanError(e.what());
  }
  return decide(request);
}

}  // namespace liveavatar::runtime
