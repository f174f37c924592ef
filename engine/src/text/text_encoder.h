// gst-liveavatar text encoder: umT5-XXL encoder (models_t5_umt5-xxl-enc-bf16.pth), its SentencePiece tokenizer
// (google/umt5-xxl/spiece.model through libsentencepiece) and an on-disk cache of prompt embeddings, so that the
// 11 GB encoder runs once per prompt and is freed while streaming.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
//   text::EmbeddingCache cache({.checkpoint = ckpt + "/models_t5_umt5-xxl-enc-bf16.pth",
//                               .tokenizer = ckpt + "/google/umt5-xxl", .cache_dir = "/var/cache/liveavatar"});
//   at::Tensor context = cache.get_or_compute("A woman is talking");   // [512, 4096] float, zeros past the prompt
//   cache.release_encoder();                                             // frees the 11 GB before streaming
//
// Upstream (LiveAvatar @9c2c38d, wan_2_2/modules/t5.py T5EncoderModel + tokenizers.py HuggingfaceTokenizer):
//   prompt -> clean('whitespace') -> tokenizer (ids + </s>, padded with <pad> / truncated to text_len, mask) ->
//   umT5 encoder (per-layer relative position bias, gated-GELU FFN, RMS norms) -> the first `length` rows; the DiT
//   pads them back to text_len with zeros. get_or_compute returns that padded [text_len, dim] form directly.
//
// Thread-safety: Tokenizer and TextEncoder are immutable after construction and may be shared by threads.
// EmbeddingCache is not internally synchronised (one thread at a time); several processes may share a cache
// directory (files are written to a temporary name and renamed).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "liveavatar/engine.h"  // liveavatar::Error

namespace liveavatar::text {
class SpmProcessor;  // libsentencepiece, loaded in isolation (engine/src/text/spm.h)
}
namespace liveavatar::weights {
struct Checkpoint;
}

namespace liveavatar::text {

/// Unusable text encoder files, config or input. what() names the file or value and what to do.
class TextError : public Error {
 public:
  using Error::Error;
};

/// umT5 encoder shape: the arguments of upstream's umt5_xxl(encoder_only=True); defaults are umT5-XXL.
struct T5Config {
  int64_t vocab_size = 256384;  // vocab_size (rows of token_embedding)
  int64_t dim = 4096;           // dim
  int64_t dim_attn = 4096;      // dim_attn
  int64_t dim_ffn = 10240;      // dim_ffn
  int64_t num_heads = 64;       // num_heads
  int64_t num_layers = 24;      // encoder_layers
  int64_t num_buckets = 32;     // num_buckets (relative position buckets, half per direction)
  int64_t max_dist = 128;       // T5RelativeEmbedding max_dist
  double eps = 1e-6;            // T5LayerNorm eps
  int64_t text_len = 512;       // s2v_14B.text_len: tokenizer seq_len, embeddings padded to it

  /// The tiny shape of the golden fixtures (dim 48, 2 layers, 4 heads, vocab 320, text_len 16).
  static T5Config tiny();
  /// Reads the fields present in a JSON file (the names above; "encoder_layers" also accepted).
  static T5Config from_json_file(const std::string& path);
  /// Throws TextError naming the first inconsistent field.
  void validate() const;
  uint64_t parameter_count() const;
};

/// Tokens of one prompt, as HuggingfaceTokenizer(seq_len=text_len, clean='whitespace') returns them.
struct Tokens {
  std::vector<int64_t> ids;   // [text_len]: pieces, </s>, then <pad>
  std::vector<int64_t> mask;  // [text_len]: 1 for pieces and </s>, 0 for padding
  int64_t length = 0;         // number of 1s in mask (upstream's seq_lens)
};

/// umT5 SentencePiece tokenizer with upstream's cleaning, EOS, padding and truncation.
class Tokenizer {
 public:
  /// `path`: a spiece.model file or a folder holding one (e.g. the checkpoint's google/umt5-xxl).
  explicit Tokenizer(const std::string& path, int64_t text_len = 512);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  /// clean='whitespace': a subset of ftfy.fix_text (see docs/encoders.md), HTML entities unescaped twice, runs of
  /// Unicode whitespace collapsed to one space, trimmed.
  static std::string clean(const std::string& text);
  /// Pieces of the cleaned text, </s> appended, truncated to text_len (keeping </s>), padded with <pad>.
  Tokens encode(const std::string& text) const;
  /// Piece ids only (no cleaning, no </s>).
  std::vector<int64_t> pieces(const std::string& text) const;

  int64_t piece_count() const;  // pieces in the model (ids 0 .. piece_count - 1)
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int64_t text_len() const { return text_len_; }
  const std::string& path() const { return path_; }

 private:
  std::unique_ptr<SpmProcessor> sp_;
  std::string path_;
  int64_t text_len_;
  int64_t eos_id_ = 1;
  int64_t pad_id_ = 0;
};

class T5Encoder;  // the module tree (engine/src/text/t5.h)

/// umT5 encoder weights on one device. Immutable after load().
class TextEncoder {
 public:
  /// Uninitialised (`seed` < 0: for loading, no memory touched) or seeded random weights.
  TextEncoder(const T5Config& config, c10::Device device = c10::kCPU, c10::ScalarType dtype = c10::kBFloat16,
              int64_t seed = -1);
  ~TextEncoder();
  TextEncoder(TextEncoder&&) noexcept;
  TextEncoder& operator=(TextEncoder&&) noexcept;

  /// The checkpoint (.pth as upstream ships it, or .safetensors) with the umT5-XXL shape of `config`.
  static TextEncoder from_file(const std::string& checkpoint, const T5Config& config = {},
                               c10::Device device = c10::kCPU, c10::ScalarType dtype = c10::kBFloat16);
  /// Strict load by key (token_embedding.weight, blocks.N.attn.q.weight, ...); casts to this encoder's dtype.
  void load(const weights::Checkpoint& checkpoint);

  /// ids [L] (or [1, L]) int, mask [L] (1 = token) -> [L, dim] float on the CPU (every row, padding included).
  /// `interrupt`, when set, is called before each layer (umT5-XXL: 24 on 11 GB of weights); it may throw (e.g.
  /// Cancelled) to stop the pass.
  at::Tensor encode_ids(const at::Tensor& ids, const at::Tensor& mask,
                        const std::function<void()>& interrupt = {}) const;
  /// Tokenizes and encodes: [text_len, dim] float, rows >= tokens.length zero (what the DiT sees).
  at::Tensor encode(const Tokenizer& tokenizer, const std::string& prompt,
                    const std::function<void()>& interrupt = {}) const;
  /// Fails with TextError when the tokenizer's ids do not fit this model's embedding (wrong tokenizer).
  void check_tokenizer(const Tokenizer& tokenizer) const;

  const T5Config& config() const { return config_; }
  c10::Device device() const { return device_; }
  c10::ScalarType dtype() const { return dtype_; }
  T5Encoder& module() const;

 private:
  T5Config config_;
  c10::Device device_;
  c10::ScalarType dtype_;
  std::shared_ptr<T5Encoder> module_;
};

struct CacheOptions {
  std::string checkpoint;  // models_t5_umt5-xxl-enc-bf16.pth (its path, size and mtime key the cache)
  std::string tokenizer;   // spiece.model or its folder (also part of the key)
  std::string cache_dir;   // "" : $XDG_CACHE_HOME/liveavatar/text, else $HOME/.cache/liveavatar/text
  T5Config config;         // model shape (text_len included)
  c10::Device device = c10::kCPU;
  c10::ScalarType dtype = c10::kBFloat16;  // upstream's t5_dtype
  /// Called before the encoder is read, after, and before each of its layers on a cache miss; it may throw (e.g.
  /// Cancelled: an element going to NULL while the model loads) to stop the computation; nothing is cached then.
  std::function<void()> interrupt;
};

/// Prompt embeddings on disk: <cache_dir>/<hash>.safetensors holding "context" [text_len, dim] float and metadata
/// (prompt, model identity) that is checked on every read, so a hash collision or a changed checkpoint recomputes.
class EmbeddingCache {
 public:
  explicit EmbeddingCache(CacheOptions options);
  ~EmbeddingCache();

  /// The cached embedding, or: load the encoder (once, kept until release_encoder()), encode, store, return.
  at::Tensor get_or_compute(const std::string& prompt);
  /// Cached embedding or an undefined tensor; never loads the encoder.
  at::Tensor lookup(const std::string& prompt) const;
  /// The file that holds (or would hold) `prompt`'s embedding.
  std::string path_for(const std::string& prompt) const;
  /// Frees the encoder (and tokenizer); a later miss loads them again.
  void release_encoder();
  bool encoder_loaded() const { return encoder_ != nullptr; }
  /// Embeddings computed (cache misses) by this object.
  int64_t computed() const { return computed_; }
  const std::string& cache_dir() const { return dir_; }

 private:
  std::string identity(const std::string& prompt) const;

  CacheOptions options_;
  std::string dir_;
  std::string model_identity_;
  std::unique_ptr<TextEncoder> encoder_;
  std::unique_ptr<Tokenizer> tokenizer_;
  int64_t computed_ = 0;
};

}  // namespace liveavatar::text
