// EmbeddingCache: prompt embeddings on disk, keyed by a hash of the prompt and the model files' identity.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include "text/text_encoder.h"
#include "weights/weights.h"

namespace liveavatar::text {
namespace {

// Path, size and modification time: cheap to read (the 11 GB file is not hashed) and changes when the file does.
std::string file_identity(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw TextError(path + ": missing (needed to key the embedding cache)");
  char real[PATH_MAX];
  const std::string name = ::realpath(path.c_str(), real) ? std::string(real) : path;
  return name + ":" + std::to_string(static_cast<long long>(st.st_size)) + ":" +
         std::to_string(static_cast<long long>(st.st_mtim.tv_sec)) + "." +
         std::to_string(static_cast<long long>(st.st_mtim.tv_nsec));
}

bool is_dir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

void make_dirs(const std::string& dir) {
  std::string partial;
  for (size_t i = 0; i <= dir.size(); ++i) {
    if (i == dir.size() || dir[i] == '/') {
      if (!partial.empty() && !is_dir(partial) && ::mkdir(partial.c_str(), 0755) != 0 && !is_dir(partial))
        throw TextError(partial + ": cannot create the prompt embedding cache folder " + dir + ": set "
                        "XDG_CACHE_HOME to a writable folder (the cache is $XDG_CACHE_HOME/liveavatar/text, else "
                        "$HOME/.cache/liveavatar/text)");
    }
    if (i < dir.size()) partial.push_back(dir[i]);
  }
}

// FNV-1a, 64 bit, twice with different offsets: a 128-bit file name. Collisions are caught by the metadata check.
std::string hash_hex(const std::string& s) {
  auto fnv = [&](uint64_t h) {
    for (unsigned char c : s) {
      h ^= c;
      h *= 1099511628211ull;
    }
    return h;
  };
  char buf[33];
  std::snprintf(buf, sizeof(buf), "%016llx%016llx", static_cast<unsigned long long>(fnv(14695981039346656037ull)),
                static_cast<unsigned long long>(fnv(0x84222325cbf29ce4ull)));
  return buf;
}

std::string default_dir() {
  const char* xdg = std::getenv("XDG_CACHE_HOME");
  if (xdg && *xdg) return std::string(xdg) + "/liveavatar/text";
  const char* home = std::getenv("HOME");
  if (home && *home) return std::string(home) + "/.cache/liveavatar/text";
  throw TextError("no cache directory: set CacheOptions::cache_dir (neither XDG_CACHE_HOME nor HOME is set)");
}

}  // namespace

EmbeddingCache::EmbeddingCache(CacheOptions options) : options_(std::move(options)) {
  options_.config.validate();
  dir_ = options_.cache_dir.empty() ? default_dir() : options_.cache_dir;
  const std::string tok = is_dir(options_.tokenizer) ? options_.tokenizer + "/spiece.model" : options_.tokenizer;
  const auto& c = options_.config;
  model_identity_ = "umt5-encoder|ckpt=" + file_identity(options_.checkpoint) + "|tok=" + file_identity(tok) +
                    "|text_len=" + std::to_string(c.text_len) + "|dim=" + std::to_string(c.dim) +
                    "|layers=" + std::to_string(c.num_layers) + "|dtype=" + c10::toString(options_.dtype);
}

EmbeddingCache::~EmbeddingCache() = default;

std::string EmbeddingCache::identity(const std::string& prompt) const { return model_identity_ + "|prompt=" + prompt; }

std::string EmbeddingCache::path_for(const std::string& prompt) const {
  return dir_ + "/" + hash_hex(identity(prompt)) + ".safetensors";
}

at::Tensor EmbeddingCache::lookup(const std::string& prompt) const {
  const auto path = path_for(prompt);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return {};
  try {
    const auto ck = weights::load_safetensors(path);
    const auto p = ck.metadata.find("prompt"), m = ck.metadata.find("model");
    const auto t = ck.tensors.find("context");
    if (p == ck.metadata.end() || p->second != prompt || m == ck.metadata.end() || m->second != model_identity_ ||
        t == ck.tensors.end() || t->second.dim() != 2 || t->second.size(0) != options_.config.text_len ||
        t->second.size(1) != options_.config.dim)
      return {};  // another prompt or model (hash collision, changed files): recompute
    return weights::read_owned(t->second).to(at::kFloat).clone();  // pread: a file cut short is no SIGBUS
  } catch (const weights::WeightsError&) {
    return {};  // a truncated or foreign file: recompute and overwrite
  }
}

at::Tensor EmbeddingCache::get_or_compute(const std::string& prompt) {
  auto cached = lookup(prompt);
  if (cached.defined()) return cached;
  if (!encoder_) {
    if (options_.interrupt) options_.interrupt();
    tokenizer_ = std::make_unique<Tokenizer>(options_.tokenizer, options_.config.text_len);
    encoder_ = std::make_unique<TextEncoder>(
        TextEncoder::from_file(options_.checkpoint, options_.config, options_.device, options_.dtype));
    encoder_->check_tokenizer(*tokenizer_);
  }
  auto context = encoder_->encode(*tokenizer_, prompt, options_.interrupt).contiguous();  // [text_len, dim] float
  ++computed_;
  make_dirs(dir_);
  const auto path = path_for(prompt);
  const auto tmp = path + ".tmp." + std::to_string(static_cast<long long>(::getpid()));
  try {
    weights::save_safetensors(tmp, {{"context", context}}, {{"prompt", prompt}, {"model", model_identity_}});
  } catch (const weights::WeightsError& e) {
    throw TextError(std::string(e.what()) + ": cannot write the prompt embedding cache: make " + dir_ +
                    " writable or set XDG_CACHE_HOME to a writable folder (the cache is "
                    "$XDG_CACHE_HOME/liveavatar/text)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw TextError(path + ": cannot write the prompt embedding cache: make " + dir_ + " writable or set "
                    "XDG_CACHE_HOME to a writable folder (the cache is $XDG_CACHE_HOME/liveavatar/text)");
  }
  return context;
}

void EmbeddingCache::release_encoder() {
  encoder_.reset();
  tokenizer_.reset();
}

}  // namespace liveavatar::text
