// T5Config, TextEncoder (loading, encoding, tokenizer check).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <nlohmann/json.hpp>
#include <sys/stat.h>

#include <fstream>

#include "weights/json_field.h"
#include "weights/weights.h"
#include "t5.h"

namespace liveavatar::text {
T5Config T5Config::tiny() {
  T5Config c;
  c.vocab_size = 320;
  c.dim = 48;
  c.dim_attn = 48;
  c.dim_ffn = 64;
  c.num_heads = 4;
  c.num_layers = 2;
  c.num_buckets = 32;
  c.text_len = 16;
  return c;
}

T5Config T5Config::from_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw TextError(path + ": cannot open the umT5 config");
  nlohmann::json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    throw TextError(path + ": not valid JSON: " + e.what());
  }
  if (j.contains("constructor_args") && j["constructor_args"].is_object()) {
    nlohmann::json args = j["constructor_args"];
    j = args;
  }
  T5Config c;
  try {
    auto get = [&](const char* key, auto& field) {
      if (j.contains(key) && !j[key].is_null()) weights::read_json_field(j[key], field);
    };
    get("vocab_size", c.vocab_size);
    get("vocab", c.vocab_size);
    get("dim", c.dim);
    get("dim_attn", c.dim_attn);
    get("dim_ffn", c.dim_ffn);
    get("num_heads", c.num_heads);
    get("num_layers", c.num_layers);
    get("encoder_layers", c.num_layers);
    get("num_buckets", c.num_buckets);
    get("max_dist", c.max_dist);
    get("eps", c.eps);
    get("text_len", c.text_len);
    if (j.contains("shared_pos") && j["shared_pos"].get<bool>())
      throw TextError("shared_pos=true is not supported (umT5 has a position bias per layer)");
  } catch (const TextError& e) {
    throw TextError(path + ": " + e.what());
  } catch (const std::exception& e) {
    throw TextError(path + ": a field has the wrong type: " + e.what());
  }
  try {
    c.validate();
  } catch (const TextError& e) {
    throw TextError(path + ": " + e.what());
  }
  return c;
}

void T5Config::validate() const {
  if (vocab_size <= 0 || dim <= 0 || dim_attn <= 0 || dim_ffn <= 0 || num_heads <= 0 || num_layers <= 0 ||
      text_len <= 0)
    throw TextError("umT5 config: vocab_size, dim, dim_attn, dim_ffn, num_heads, num_layers and text_len must be "
                    "positive");
  if (dim_attn % num_heads != 0)
    throw TextError("umT5 config: dim_attn " + std::to_string(dim_attn) + " is not a multiple of num_heads " +
                    std::to_string(num_heads));
  if (num_buckets < 4 || num_buckets % 2 != 0 || max_dist <= num_buckets / 4)
    throw TextError("umT5 config: num_buckets must be even and >= 4, max_dist > num_buckets / 4 (got " +
                    std::to_string(num_buckets) + ", " + std::to_string(max_dist) + ")");
}

uint64_t T5Config::parameter_count() const {
  const uint64_t per_layer = 2ull * dim + 3ull * dim * dim_attn + 1ull * dim_attn * dim + 3ull * dim * dim_ffn +
                             1ull * num_buckets * num_heads;
  return 1ull * vocab_size * dim + per_layer * num_layers + dim;
}

// ---------------------------------------------------------------------------------------------------------------

TextEncoder::TextEncoder(const T5Config& config, c10::Device device, c10::ScalarType dtype, int64_t seed)
    : config_(config), device_(device), dtype_(dtype) {
  config_.validate();
  module_ = std::make_shared<T5Encoder>(config_, dtype_);
  if (seed >= 0) randomize_parameters(**module_, static_cast<uint64_t>(seed));
  if (!device_.is_cpu()) (*module_)->to(device_);
  (*module_)->eval();
}

TextEncoder::~TextEncoder() = default;
TextEncoder::TextEncoder(TextEncoder&&) noexcept = default;
TextEncoder& TextEncoder::operator=(TextEncoder&&) noexcept = default;

TextEncoder TextEncoder::from_file(const std::string& checkpoint, const T5Config& config, c10::Device device,
                                   c10::ScalarType dtype) {
  struct stat st {};
  if (::stat(checkpoint.c_str(), &st) != 0)
    throw TextError(checkpoint + ": missing. Give the umT5 encoder checkpoint (models_t5_umt5-xxl-enc-bf16.pth "
                    "in the LiveAvatar / Wan2.2-S2V checkpoint folder)");
  const bool st_file = checkpoint.size() >= 12 && checkpoint.compare(checkpoint.size() - 12, 12, ".safetensors") == 0;
  const auto ck = st_file ? weights::load_safetensors(checkpoint) : weights::load_pth(checkpoint);
  // Loaded where it runs: read by pread into its own memory on the CPU, or tensor by tensor onto the device (no
  // tensor keeps viewing the file: a file cut short while a prompt is encoded cannot SIGBUS).
  TextEncoder encoder(config, device, dtype);
  encoder.load(ck);
  return encoder;
}

void TextEncoder::load(const weights::Checkpoint& checkpoint) {
  weights::ModuleLoadOptions opts;
  opts.assign = device_.is_cpu();  // CPU: the checkpoint's values in memory of their own; a device: copied in place
  opts.cast_dtype = true;
  weights::load_into_module(**module_, checkpoint, opts);
}

T5Encoder& TextEncoder::module() const { return *module_; }

at::Tensor TextEncoder::encode_ids(const at::Tensor& ids, const at::Tensor& mask,
                                   const std::function<void()>& interrupt) const {
  if (ids.dim() > 2 || (ids.dim() == 2 && ids.size(0) != 1))
    throw TextError("encode_ids: ids must be [L] or [1, L]");
  const auto i = ids.reshape({1, -1}).to(device_, at::kLong);
  if (i.numel() > 0) {
    const auto lo = i.min().item<int64_t>(), hi = i.max().item<int64_t>();
    if (lo < 0 || hi >= config_.vocab_size)
      throw TextError("encode_ids: token id " + std::to_string(lo < 0 ? lo : hi) + " is outside the model's " +
                      std::to_string(config_.vocab_size) + " embeddings (wrong tokenizer for this model?)");
  }
  at::Tensor m;
  if (mask.defined()) {
    if (mask.numel() != i.numel()) throw TextError("encode_ids: mask and ids differ in length");
    m = mask.reshape({1, -1}).to(device_, at::kLong);
  }
  at::NoGradGuard no_grad;
  return (*module_)->forward(i, m, interrupt)[0].to(at::kCPU, at::kFloat);  // [L, dim]
}

void TextEncoder::check_tokenizer(const Tokenizer& tokenizer) const {
  const int64_t pieces = tokenizer.piece_count(), rows = config_.vocab_size;
  // The model's table is the tokenizer's pieces rounded up (umT5-XXL: 256384 rows); far fewer pieces or more pieces
  // than rows means the tokenizer belongs to another model.
  if (pieces > rows || rows - pieces > 1024)
    throw TextError(tokenizer.path() + ": the tokenizer has " + std::to_string(pieces) +
                    " pieces but the text encoder embeds " + std::to_string(rows) +
                    " ids: tokenizer and model do not belong together (umT5-XXL needs google/umt5-xxl/spiece.model)");
}

at::Tensor TextEncoder::encode(const Tokenizer& tokenizer, const std::string& prompt,
                               const std::function<void()>& interrupt) const {
  check_tokenizer(tokenizer);
  const auto tokens = tokenizer.encode(prompt);
  const auto ids = at::tensor(tokens.ids, at::kLong), mask = at::tensor(tokens.mask, at::kLong);
  auto out = encode_ids(ids, mask, interrupt);  // [text_len, dim]
  out.slice(0, tokens.length).zero_();
  return out;
}

}  // namespace liveavatar::text
