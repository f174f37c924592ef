// Voice activity on the example speech (27.5 s, 16 kHz, with pauses): Silero VAD and the energy gate that stands in
// when its model file is missing. SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "liveavatar/vad.h"
#include "media_io.h"

namespace {

using liveavatar::VadOptions;
using liveavatar::VoiceActivity;

const std::vector<float>& speech() {
  static const std::vector<float> s = [] {
    int rate = 0;
    auto a = liveavatar::io::read_audio(std::string(LIVEAVATAR_ASSETS_DIR) + "/speech.wav", &rate);
    EXPECT_EQ(rate, 16000);
    return a;
  }();
  return s;
}

// The state every 100 ms while the speech is pushed in 100 ms chunks: states[k] = speaking after k + 1 chunks.
std::vector<bool> states(VoiceActivity& vad, const std::vector<float>& audio) {
  std::vector<bool> out;
  for (size_t at = 0; at + 1600 <= audio.size(); at += 1600) {
    vad.push(audio.data() + at, 1600);
    out.push_back(vad.speaking());
  }
  return out;
}

// The clip talks from 0 to 6.9 s, pauses until 8.7 s, talks to 17.0 s, pauses until 19.1 s, talks to 26.1 s, and is
// silent to its end (100 ms RMS under -50 dBFS in the pauses). Checked away from the edges (the hangover).
void expect_speech_and_pauses(const std::vector<bool>& s, const std::string& who) {
  auto at = [&](double seconds) { return static_cast<bool>(s.at(static_cast<size_t>(seconds * 10) - 1)); };
  for (double t : {1.0, 3.0, 5.5, 10.0, 12.5, 15.0, 20.5, 23.0, 25.6}) EXPECT_TRUE(at(t)) << who << " at " << t << " s";
  for (double t : {7.5, 8.2, 17.8, 18.5, 26.9, 27.4}) EXPECT_FALSE(at(t)) << who << " at " << t << " s";
}

TEST(Vad, SileroFindsTheSpeechAndThePauses) {
#ifndef LIVEAVATAR_VAD_TORCH
  GTEST_SKIP() << "built without LibTorch (the sanitizer build): the energy gate only";
#endif
  VoiceActivity vad;
  ASSERT_EQ(vad.kind(), "silero") << vad.warning() << " (run scripts/setup.sh: it installs silero-vad)";
  EXPECT_EQ(vad.warning(), "");
  expect_speech_and_pauses(states(vad, speech()), "silero");
  EXPECT_EQ(vad.samples(), static_cast<int64_t>(speech().size() / 1600 * 1600));
}

TEST(Vad, ResetStartsAfresh) {
  VoiceActivity vad;
  const auto first = states(vad, speech());
  vad.reset();
  EXPECT_FALSE(vad.speaking());
  EXPECT_EQ(vad.samples(), 0);
  EXPECT_EQ(states(vad, speech()), first) << "the model's state must start afresh";
}

// A steady tone is loud but not a voice: the model says so, the energy gate cannot.
TEST(Vad, SileroIsNotFooledByATone) {
#ifndef LIVEAVATAR_VAD_TORCH
  GTEST_SKIP() << "built without LibTorch (the sanitizer build): the energy gate only";
#endif
  std::vector<float> tone(16000 * 2);
  for (size_t i = 0; i < tone.size(); ++i) tone[i] = 0.3f * static_cast<float>(std::sin(2 * M_PI * 440 * i / 16000.0));
  VoiceActivity vad;
  ASSERT_EQ(vad.kind(), "silero");
  const auto s = states(vad, tone);
  EXPECT_FALSE(s.back());
  VadOptions energy;
  energy.model = "/nonexistent/silero_vad.jit";
  VoiceActivity gate(energy);
  EXPECT_TRUE(states(gate, tone).back());
}

TEST(Vad, MissingModelFallsBackToTheEnergyGateAndSaysWhy) {
#ifndef LIVEAVATAR_VAD_TORCH
  GTEST_SKIP() << "built without LibTorch (the sanitizer build): the energy gate only";
#endif
  VadOptions o;
  o.model = "/nonexistent/silero_vad.jit";
  VoiceActivity vad(o);
  EXPECT_EQ(vad.kind(), "energy");
  EXPECT_NE(vad.warning().find("/nonexistent/silero_vad.jit does not exist"), std::string::npos) << vad.warning();
  EXPECT_NE(vad.warning().find("silero-vad"), std::string::npos) << vad.warning();
  expect_speech_and_pauses(states(vad, speech()), "energy gate");
}

TEST(Vad, SilenceIsNotSpeech) {
  std::vector<float> zeros(16000, 0.f);
  VoiceActivity vad;
  EXPECT_FALSE(states(vad, zeros).back());
  EXPECT_LT(vad.probability(), 0.2f);
}

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
