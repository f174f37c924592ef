// liveavatar-checkpoint: inspect a checkpoint set, write the tiny one. The logic lives here so tests call it directly.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "layout.h"

namespace liveavatar::weights {

/// One component of the checkpoint set as found on disk.
struct ComponentReport {
  std::string name;     // "dit", "vae", "t5", "wav2vec2", "lora"
  std::string path;     // file or index read
  bool found = false;
  uint64_t numel = 0;
  std::map<std::string, uint64_t> bytes_per_dtype;
  LoadReport validation;  // against the layout of the configuration
  std::string error;      // reader error, if the files could not be read
  bool ok() const { return found && error.empty() && validation.ok(); }
};

struct InspectResult {
  std::vector<ComponentReport> components;
  std::string config_source;  // where the configuration came from
  bool ok() const;
  std::string to_string() const;
};

/// Reads every component under `dir` (the layout of OfficialFiles, or the component files directly in `dir`) and
/// validates each against the configuration found there (DiT and wav2vec2 config.json; the rest: sizes derived from
/// the DiT config, or `tiny` when the DiT config says so).
InspectResult inspect_checkpoint(const std::string& dir);

/// Writes the complete set in the official layout and key names, with seeded random weights at `config`:
/// sharded DiT (`shards` files + index + config.json), Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth,
/// wav2vec2 folder (config.json + model.safetensors), LiveAvatar/liveavatar.safetensors (PEFT keys).
void make_tiny_checkpoint(const std::string& dir, const ModelConfig& config, uint64_t seed, int shards = 2);

/// Trains the tiny checkpoint's SentencePiece tokenizer into folder/spiece.model (umT5 special ids).
void write_tiny_tokenizer(const std::string& folder, int64_t vocab_size);

}  // namespace liveavatar::weights
