// gst-liveavatar voice activity: is someone speaking in a stream of mono 16 kHz audio?
// SPDX-License-Identifier: LGPL-2.1-or-later
//
//   liveavatar::VoiceActivity vad;            // Silero VAD if its model file is found, else an energy gate
//   vad.push(samples, n);                     // any chunk size, in stream order
//   if (vad.speaking()) ...                   // the state at the last whole 32 ms window
//
// The model is Silero VAD's TorchScript file as the PyPI package `silero-vad` ships it
// (silero_vad/data/silero_vad.jit; scripts/setup.sh installs it into the project venv), run with LibTorch on windows
// of 512 samples with its recurrent state carried from window to window, as the package's VADIterator runs it.
// Speech starts when a window's probability reaches `threshold` and ends when it has stayed under `release` for
// `min_silence_ms`. Without the file (or in an engine built without LibTorch) an energy gate stands in: a window is
// voiced when its RMS level reaches `energy_db`, with the same hangover; warning() then says why.
//
// Thread-safety: one audio stream per object; not for concurrent use. Distinct objects are independent.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace liveavatar {

struct VadOptions {
  // silero_vad.jit; "" = $LIVEAVATAR_VAD_MODEL, else the file found in the project venv when the engine was built.
  std::string model;
  float threshold = 0.5f;    // speech starts at this probability (silero's default)
  float release = 0.35f;     // ... and ends under this one (silero's threshold - 0.15) ...
  int min_silence_ms = 300;  // ... held this long, so the short gaps between words do not end it
  float energy_db = -40.f;   // energy gate: a window at or above this RMS level (dB full scale) is voiced
};

class VoiceActivity {
 public:
  /// Loads the model (throws nothing: a missing or unusable file selects the energy gate, see warning()).
  explicit VoiceActivity(const VadOptions& options = {});
  ~VoiceActivity();
  VoiceActivity(const VoiceActivity&) = delete;
  VoiceActivity& operator=(const VoiceActivity&) = delete;

  /// Mono samples at 16 kHz, any count; each whole window of 512 is judged as it completes.
  void push(const float* samples, size_t count);
  /// Someone is speaking (with the hangover of min_silence_ms).
  bool speaking() const;
  /// The last window's speech probability (energy gate: 1 voiced, 0 not).
  float probability() const;
  /// Samples pushed since construction or reset().
  int64_t samples() const;
  /// "silero" or "energy".
  const std::string& kind() const;
  /// Why the energy gate is used ("" with the model).
  const std::string& warning() const;
  /// A new stream: the model's state, the window and the hangover start afresh.
  void reset();

  static constexpr int kWindow = 512;  // samples per judgement at 16 kHz (32 ms)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// The Silero model file VoiceActivity uses when VadOptions::model is empty ("" if none is known).
std::string default_vad_model();

}  // namespace liveavatar
