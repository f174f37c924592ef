// The umT5 tokenizer of the tiny checkpoint: a SentencePiece unigram model trained here, with umT5's special ids
// (pad 0, eos 1, unk 2, no bos), so the text path of a tiny checkpoint runs through the real tokenizer code.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <fstream>
#include <string>
#include <vector>

#include "checkpoint_tool.h"
#include "spm.h"

namespace liveavatar::weights {

namespace {

// A fixed corpus with a small alphabet (to fit a tiny vocabulary), given from memory so that no file path ends up in
// the trained model: the same model bytes come out every time.
std::vector<std::string> corpus() {
  static const char* const kWords[] = {"a",     "person", "is",    "talking", "to",     "the",  "camera", "she",
                                       "he",    "smiles", "and",   "speaks",  "in",     "room", "light",  "calm",
                                       "voice", "face",   "looks", "at",      "viewer", "news", "studio", "hello"};
  const size_t n = sizeof(kWords) / sizeof(kWords[0]);
  std::vector<std::string> lines;
  for (size_t i = 0; i < 400; ++i) {
    std::string s;
    for (size_t k = 0; k < 6; ++k) s += (k ? " " : "") + std::string(kWords[(i * 7 + k * 5 + i / 3) % n]);
    lines.push_back(s);
  }
  return lines;
}

}  // namespace

void write_tiny_tokenizer(const std::string& folder, int64_t vocab_size) {
  const std::string path = folder + "/spiece.model";
  const std::string args = "--model_type=unigram --vocab_size=" + std::to_string(vocab_size) +
                           " --character_coverage=1.0 --pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1"
                           " --hard_vocab_limit=false --num_threads=1 --minloglevel=2";
  std::string model;
  try {
    model = text::spm_train(args, corpus(), /*seed=*/1);
  } catch (const Error& e) {
    throw WeightsError(path, e.what());
  }
  std::ofstream out(path, std::ios::binary);
  out.write(model.data(), static_cast<std::streamsize>(model.size()));
  if (!out) throw WeightsError(path, "cannot write the tokenizer");
}

}  // namespace liveavatar::weights
