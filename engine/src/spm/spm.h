// SentencePiece through the liveavatar-spm module, loaded in isolation (see spm_shim.cpp for why).
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <string>
#include <vector>

namespace liveavatar::text {

/// The subset of sentencepiece::SentencePieceProcessor the tokenizer uses. Throws liveavatar::Error (TextError) when
/// the module or the model cannot be loaded. Not thread-safe per object.
class SpmProcessor {
 public:
  explicit SpmProcessor(const std::string& model_path);
  ~SpmProcessor();
  SpmProcessor(const SpmProcessor&) = delete;
  SpmProcessor& operator=(const SpmProcessor&) = delete;

  std::vector<int> encode(const std::string& text) const;
  int piece_size() const;
  int piece_to_id(const std::string& piece) const;
  std::string id_to_piece(int id) const;
  int unk_id() const;
  int eos_id() const;
  int pad_id() const;

 private:
  void* handle_ = nullptr;
};

/// Trains a SentencePiece model from `sentences` with trainer flags `args` and a fixed seed; returns the serialized
/// model (the bytes of a spiece.model). Throws liveavatar::Error on failure.
std::string spm_train(const std::string& args, const std::vector<std::string>& sentences, unsigned seed = 1);

/// Where the module is looked for: $LIVEAVATAR_SPM_MODULE, then the install and build locations.
std::vector<std::string> spm_module_candidates();

}  // namespace liveavatar::text
