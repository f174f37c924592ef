// A C interface to libsentencepiece, built as its own loadable module (liveavatar-spm.so).
//
// Why a module: Debian 12's libsentencepiece carries a private copy of protobuf 3.14 and exports its symbols, while
// OpenCV's dnn module (which objdetect, used by the puppet backend, depends on) loads the system libprotobuf 3.21.
// Linked into one library, the two bind to each other's symbols and crash or abort at load time. The engine loads
// this module into a link-map namespace of its own (dlmopen, engine/src/spm/spm.cpp), so sentencepiece keeps its
// own protobuf.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstring>
#include <string>
#include <vector>

namespace {
void set_error(char* err, size_t len, const std::string& text) {
  if (!err || !len) return;
  std::strncpy(err, text.c_str(), len - 1);
  err[len - 1] = '\0';
}
}  // namespace

extern "C" {

__attribute__((visibility("default"))) void* la_spm_load(const char* path, char* err, size_t err_len) {
  auto* sp = new sentencepiece::SentencePieceProcessor();
  const auto status = sp->Load(path);
  if (!status.ok()) {
    set_error(err, err_len, status.ToString());
    delete sp;
    return nullptr;
  }
  return sp;
}

__attribute__((visibility("default"))) void la_spm_free(void* h) {
  delete static_cast<sentencepiece::SentencePieceProcessor*>(h);
}

__attribute__((visibility("default"))) int la_spm_piece_size(void* h) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(h)->GetPieceSize();
}

__attribute__((visibility("default"))) int la_spm_piece_to_id(void* h, const char* piece) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(h)->PieceToId(piece);
}

// Copies the piece of `id` into buf (NUL-terminated); returns its length, or -1 if buf is too small.
__attribute__((visibility("default"))) int la_spm_id_to_piece(void* h, int id, char* buf, size_t len) {
  const std::string& p = static_cast<sentencepiece::SentencePieceProcessor*>(h)->IdToPiece(id);
  if (p.size() + 1 > len) return -1;
  std::memcpy(buf, p.c_str(), p.size() + 1);
  return static_cast<int>(p.size());
}

// which: 0 unk, 1 eos, 2 pad, 3 bos.
__attribute__((visibility("default"))) int la_spm_special_id(void* h, int which) {
  auto* sp = static_cast<sentencepiece::SentencePieceProcessor*>(h);
  switch (which) {
    case 0: return sp->unk_id();
    case 1: return sp->eos_id();
    case 2: return sp->pad_id();
    default: return sp->bos_id();
  }
}

// Encodes `text` into ids; returns the number of ids (writing at most `cap`), or -1 with err set.
__attribute__((visibility("default"))) int la_spm_encode(void* h, const char* text, int* ids, size_t cap, char* err,
                                                         size_t err_len) {
  std::vector<int> out;
  const auto status = static_cast<sentencepiece::SentencePieceProcessor*>(h)->Encode(text, &out);
  if (!status.ok()) {
    set_error(err, err_len, status.ToString());
    return -1;
  }
  for (size_t i = 0; i < out.size() && i < cap; ++i) ids[i] = out[i];
  return static_cast<int>(out.size());
}

namespace {
class Sentences : public sentencepiece::SentenceIterator {
 public:
  Sentences(const char* const* s, size_t n) : s_(s), n_(n) { load(); }
  bool done() const override { return i_ >= n_; }
  void Next() override {
    ++i_;
    load();
  }
  const std::string& value() const override { return cur_; }
  sentencepiece::util::Status status() const override { return sentencepiece::util::Status(); }

 private:
  void load() {
    if (i_ < n_) cur_ = s_[i_];
  }
  const char* const* s_;
  size_t n_;
  size_t i_ = 0;
  std::string cur_;
};
}  // namespace

// Trains a model from in-memory sentences (so no file path is recorded in it) with trainer flags `args` and a fixed
// random seed. On success *model / *model_len hold the serialized model (free with la_spm_free_buffer); returns 0.
__attribute__((visibility("default"))) int la_spm_train(const char* args, const char* const* sentences, size_t n,
                                                        unsigned seed, char** model, size_t* model_len, char* err,
                                                        size_t err_len) {
  sentencepiece::SetRandomGeneratorSeed(seed);
  Sentences it(sentences, n);
  std::string out;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &out);
  if (!status.ok()) {
    set_error(err, err_len, status.ToString());
    return -1;
  }
  *model = new char[out.size()];
  std::memcpy(*model, out.data(), out.size());
  *model_len = out.size();
  return 0;
}

__attribute__((visibility("default"))) void la_spm_free_buffer(char* p) { delete[] p; }

}  // extern "C"
