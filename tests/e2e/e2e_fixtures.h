// Where the end-to-end tests find the recorded upstream run and the component fixture models (tests/fixtures).
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <sys/stat.h>

#include <string>

namespace liveavatar::e2e::test {

inline const std::string kFixtures = E2E_FIXTURES_ROOT;  // tests/fixtures
inline std::string fixture(const std::string& rel) { return kFixtures + "/" + rel; }
inline bool have(const std::string& rel) {
  struct stat st {};
  return ::stat(fixture(rel).c_str(), &st) == 0;
}
/// The run and the models it used are all there (a checkout without the fixtures skips the e2e tests).
inline bool have_e2e_fixtures() {
  return have("e2e/e2e.safetensors") && have("dit/weights.safetensors") && have("vae/Wan2.1_VAE.pth") &&
         have("wav2vec2/audio_features.safetensors") && have("t5/t5_io.safetensors") &&
         have("t5/models_t5_umt5-xxl-enc-bf16.pth");
}

}  // namespace liveavatar::e2e::test
