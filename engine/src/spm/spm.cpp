// SPDX-License-Identifier: LGPL-2.1-or-later
#include "spm.h"

#ifndef _GNU_SOURCE
#define _GNU_SOURCE  // dlmopen
#endif
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>

#include "liveavatar/engine.h"

#ifndef LIVEAVATAR_SPM_MODULE_INSTALLED
#define LIVEAVATAR_SPM_MODULE_INSTALLED ""
#endif
#ifndef LIVEAVATAR_SPM_MODULE_BUILD
#define LIVEAVATAR_SPM_MODULE_BUILD ""
#endif

namespace liveavatar::text {

namespace {

struct Api {
  void* (*load)(const char*, char*, size_t) = nullptr;
  void (*free)(void*) = nullptr;
  int (*piece_size)(void*) = nullptr;
  int (*piece_to_id)(void*, const char*) = nullptr;
  int (*id_to_piece)(void*, int, char*, size_t) = nullptr;
  int (*special_id)(void*, int) = nullptr;
  int (*encode)(void*, const char*, int*, size_t, char*, size_t) = nullptr;
  int (*train)(const char*, const char* const*, size_t, unsigned, char**, size_t*, char*, size_t) = nullptr;
  void (*free_buffer)(char*) = nullptr;
};

template <typename F>
void bind(void* lib, const char* name, F& fn, const std::string& path) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (!fn) throw Error(path + " lacks " + name + ": rebuild the project (ninja -C build)");
}

// Loaded once per process into a link-map namespace of its own (dlmopen LM_ID_NEWLM): sentencepiece, its protobuf
// copy and the C++ runtime it uses see nothing of the rest of the process (RTLD_DEEPBIND alone is not enough: it
// binds the module to libstdc++'s own std::cerr while an executable's copy relocation holds the live one).
const Api& api() {
  static std::once_flag once;
  static Api a;
  static std::string error;
  std::call_once(once, [] {
    std::string tried;
    for (const auto& path : spm_module_candidates()) {
      void* lib = dlmopen(LM_ID_NEWLM, path.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!lib) {
        tried += "\n  " + path + ": " + dlerror();
        continue;
      }
      try {
        bind(lib, "la_spm_load", a.load, path);
        bind(lib, "la_spm_free", a.free, path);
        bind(lib, "la_spm_piece_size", a.piece_size, path);
        bind(lib, "la_spm_piece_to_id", a.piece_to_id, path);
        bind(lib, "la_spm_id_to_piece", a.id_to_piece, path);
        bind(lib, "la_spm_special_id", a.special_id, path);
        bind(lib, "la_spm_encode", a.encode, path);
        bind(lib, "la_spm_train", a.train, path);
        bind(lib, "la_spm_free_buffer", a.free_buffer, path);
        return;
      } catch (const Error& e) {
        tried += "\n  " + std::string(e.what());
        a = Api{};
      }
    }
    error = "cannot load the SentencePiece module (liveavatar-spm): set LIVEAVATAR_SPM_MODULE to its path; tried:" +
            tried;
  });
  if (!a.load) throw Error(error);
  return a;
}

}  // namespace

std::vector<std::string> spm_module_candidates() {
  std::vector<std::string> c;
  if (const char* env = std::getenv("LIVEAVATAR_SPM_MODULE"); env && *env) c.emplace_back(env);
  for (const char* p : {LIVEAVATAR_SPM_MODULE_BUILD, LIVEAVATAR_SPM_MODULE_INSTALLED})
    if (*p) c.emplace_back(p);
  return c;
}

SpmProcessor::SpmProcessor(const std::string& model_path) {
  char err[512] = {0};
  handle_ = api().load(model_path.c_str(), err, sizeof err);
  if (!handle_) throw Error(model_path + ": not a SentencePiece model (" + err + ")");
}

SpmProcessor::~SpmProcessor() {
  if (handle_) api().free(handle_);
}

std::vector<int> SpmProcessor::encode(const std::string& text) const {
  std::vector<int> ids(text.size() + 16);
  char err[512] = {0};
  int n = api().encode(handle_, text.c_str(), ids.data(), ids.size(), err, sizeof err);
  if (n < 0) throw Error(std::string("SentencePiece cannot encode the prompt: ") + err);
  if (static_cast<size_t>(n) > ids.size()) {
    ids.resize(static_cast<size_t>(n));
    n = api().encode(handle_, text.c_str(), ids.data(), ids.size(), err, sizeof err);
  }
  ids.resize(static_cast<size_t>(n));
  return ids;
}

std::string spm_train(const std::string& args, const std::vector<std::string>& sentences, unsigned seed) {
  std::vector<const char*> ptrs;
  for (const auto& s : sentences) ptrs.push_back(s.c_str());
  char* model = nullptr;
  size_t len = 0;
  char err[512] = {0};
  if (api().train(args.c_str(), ptrs.data(), ptrs.size(), seed, &model, &len, err, sizeof err) != 0)
    throw Error(std::string("training a SentencePiece model failed: ") + err);
  std::string out(model, len);
  api().free_buffer(model);
  return out;
}

int SpmProcessor::piece_size() const { return api().piece_size(handle_); }
int SpmProcessor::piece_to_id(const std::string& piece) const { return api().piece_to_id(handle_, piece.c_str()); }
std::string SpmProcessor::id_to_piece(int id) const {
  std::vector<char> buf(256);
  int n = api().id_to_piece(handle_, id, buf.data(), buf.size());
  if (n < 0) {
    buf.resize(65536);
    n = api().id_to_piece(handle_, id, buf.data(), buf.size());
  }
  return n < 0 ? std::string() : std::string(buf.data(), static_cast<size_t>(n));
}
int SpmProcessor::unk_id() const { return api().special_id(handle_, 0); }
int SpmProcessor::eos_id() const { return api().special_id(handle_, 1); }
int SpmProcessor::pad_id() const { return api().special_id(handle_, 2); }

}  // namespace liveavatar::text
