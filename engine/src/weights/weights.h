// gst-liveavatar weights: load the published LiveAvatar / Wan2.2-S2V checkpoints safely, zero-copy and fast.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
//   auto dit  = weights::load_sharded_safetensors(dir + "/diffusion_pytorch_model.safetensors.index.json");
//   auto lora = weights::load_safetensors(dir + "/liveavatar.safetensors");
//   weights::merge_lora(dit, lora, {});                  // W += B @ A * alpha / r, in fp32
//   weights::load_into_module(model, dit, {});           // strict: missing / unexpected / mismatch -> throws
//   auto vae  = weights::load_pth(dir + "/Wan2.1_VAE.pth");
//
// Model files are untrusted input. Every reader validates what it reads before it builds a tensor (bounds, overlap,
// sizes, dtypes, container structure); a failure throws WeightsError naming the file and the problem, and leaves
// nothing half-loaded behind. Safetensors and .pth tensors are views of a private read-only-until-written mapping of
// the file (no copy); the mapping lives as long as any tensor that views it.
//
// Thread-safety: the free functions are reentrant; a Checkpoint is a value (not internally synchronised). Tensors
// that view one mapping may be read from several threads; writing to one copies the touched pages (MAP_PRIVATE).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "liveavatar/engine.h"  // liveavatar::Error

namespace torch::nn {
class Module;
}

namespace liveavatar::weights {

/// Any unusable checkpoint file or content. what() = "<file>: <problem>. <what to do>".
class WeightsError : public Error {
 public:
  WeightsError(const std::string& file, const std::string& message);
  /// The file the problem is in ("" when it concerns no single file).
  const std::string& file() const { return file_; }

 private:
  std::string file_;
};

// ---------------------------------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------------------------------

/// The dtype spelled as in a safetensors header ("BF16", "F8_E4M3", ...), or nullopt if the format has no name for it.
std::optional<std::string> safetensors_dtype_name(at::ScalarType type);
/// The ScalarType for a safetensors dtype name, or nullopt for names this reader does not know.
std::optional<at::ScalarType> scalar_type_from_safetensors(const std::string& name);

/// One tensor described by a safetensors header; offsets are relative to the start of the data section.
struct TensorEntry {
  std::string name;
  at::ScalarType dtype = at::ScalarType::Float;
  std::vector<int64_t> shape;
  uint64_t begin = 0;
  uint64_t end = 0;
};

/// A validated safetensors header.
struct SafetensorsHeader {
  uint64_t header_size = 0;  // N, the JSON length
  uint64_t data_offset = 0;  // 8 + N: where the data section starts in the file
  uint64_t data_size = 0;    // bytes of the data section
  std::vector<TensorEntry> tensors;               // in header order
  std::map<std::string, std::string> metadata;    // "__metadata__"
};

/// Largest JSON header accepted (the reference implementation's limit).
constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

/// Parses and validates the header of a safetensors file. `bytes` holds at least the first min(size, 8 + N) bytes of
/// the file, `file_size` is the size of the whole file, `file` names it in errors. Checks: length field, JSON object,
/// no duplicate key, known dtype, shape x dtype = byte range, ranges inside the data section, no overlap, no gap,
/// nothing after the last tensor (the reference implementation's rules). Throws WeightsError.
SafetensorsHeader parse_safetensors_header(const uint8_t* bytes, size_t size, uint64_t file_size,
                                           const std::string& file);

// ---------------------------------------------------------------------------------------------------------------
// Checkpoints (a flat state dict)
// ---------------------------------------------------------------------------------------------------------------

/// A flat state dict: checkpoint key -> tensor, with the file each key came from.
struct Checkpoint {
  std::map<std::string, at::Tensor> tensors;
  std::map<std::string, std::string> source;      // key -> file
  std::map<std::string, std::string> metadata;    // safetensors __metadata__ (merged over shards)
  std::vector<std::string> files;                 // files read, in order
  size_t copied_tensors = 0;  // tensors that could not view the mapping (misaligned) and were copied

  /// Bytes of all tensors.
  uint64_t nbytes() const;
  /// Number of elements of all tensors.
  uint64_t numel() const;
  bool contains(const std::string& key) const { return tensors.count(key) != 0; }
};

struct ReadOptions {
  /// Map every page up front (madvise MADV_POPULATE_READ, no copy): one kernel call instead of a fault per page.
  bool populate = false;
};

/// Loads one .safetensors file; tensors view the file mapping.
Checkpoint load_safetensors(const std::string& path, const ReadOptions& options = {});

/// Loads a sharded checkpoint through its `*.safetensors.index.json`: every shard named in the weight map, each
/// key from the shard the index names. Fails on a missing shard, a key missing from its shard, a key in a shard that
/// the index does not list, a key in two shards, a shard name that is not a plain file name.
Checkpoint load_sharded_safetensors(const std::string& index_path, const ReadOptions& options = {});

/// Writes `tensors` as one safetensors file (header padded to 8 bytes, data in key order). Tensors are written
/// contiguous; `metadata` goes to "__metadata__".
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// ---------------------------------------------------------------------------------------------------------------
// PyTorch .pth (torch.save zip archives)
// ---------------------------------------------------------------------------------------------------------------

/// Loads a torch.save zip archive of a tensor state dict (plain dict or OrderedDict, nested dicts flattened with
/// "."). Only tensors, dicts, lists, tuples, strings, ints, floats, bools and None are accepted; any other pickled
/// object (classes, functions, reducers outside torch's tensor rebuild) is rejected before anything runs. Non-tensor
/// leaves (e.g. "epoch": 3) are listed in `Checkpoint::metadata` as key -> value text. Tensors view the mapping.
Checkpoint load_pth(const std::string& path, const ReadOptions& options = {});

/// The same from bytes in memory (tensors are copies); `name` is used in errors. For tests and fuzzing.
Checkpoint load_pth_from_memory(const void* data, size_t size, const std::string& name);

/// Writes `tensors` as torch.save(OrderedDict(tensors)) does with the default zip format (pickle protocol 2, one
/// 64-byte-aligned stored record per tensor), readable by torch.load(weights_only=True) and by load_pth.
void save_pth(const std::string& path, const std::map<std::string, at::Tensor>& tensors);

// ---------------------------------------------------------------------------------------------------------------
// Strict, name-checked loading into a module tree
// ---------------------------------------------------------------------------------------------------------------

/// What a module (or a layout) expects for one key.
struct TensorSpec {
  std::vector<int64_t> shape;
  at::ScalarType dtype = at::ScalarType::Float;
};
using Layout = std::map<std::string, TensorSpec>;

/// The outcome of matching a checkpoint against what a model expects.
struct LoadReport {
  std::vector<std::string> missing;     // expected, not in the checkpoint
  std::vector<std::string> unexpected;  // in the checkpoint, not expected
  std::vector<std::string> mismatched;  // "key: expected [..] BF16, got [..] F32 (file)"
  bool ok() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }
  /// Human-readable, at most `max_per_list` lines per list (then "... and N more").
  std::string to_string(size_t max_per_list = 20) const;
};

/// The parameters and buffers of `module` by their full dotted names (= checkpoint keys), with shape and dtype.
Layout module_layout(const torch::nn::Module& module);

/// Matches `checkpoint` against `expected`. With `check_dtype` false, any dtype is accepted (loading then casts).
LoadReport check_layout(const Layout& expected, const Checkpoint& checkpoint, bool check_dtype = true);

struct ModuleLoadOptions {
  /// true: parameters become the checkpoint's values (read into memory of their own, cast / moved when they differ).
  /// false: checkpoint values are copied into the module's existing tensors (e.g. already on a GPU), one at a time.
  /// Either way values that view a file mapping are read by pread (read_owned), never through the mapping, and no
  /// module tensor views a file afterwards: a checkpoint cut short while loading or later is an error, not SIGBUS.
  bool assign = true;
  /// Accept a checkpoint dtype that differs from the module's and cast it (otherwise a dtype mismatch is an error).
  bool cast_dtype = false;
};

/// Loads `checkpoint` into `module` by name. Validates everything first; on any missing, unexpected or mismatched
/// key it throws WeightsError with the full report and leaves the module untouched. A read that fails afterwards (a
/// file cut short while loading) throws WeightsError too; with assign = false the module is then partly loaded and
/// should be dropped.
void load_into_module(torch::nn::Module& module, const Checkpoint& checkpoint, const ModuleLoadOptions& options = {});

// ---------------------------------------------------------------------------------------------------------------
// LoRA merge and precision conversion on load
// ---------------------------------------------------------------------------------------------------------------

struct LoraOptions {
  double alpha = 64.0;    // lora_alpha of the adapter config (LiveAvatar: 64)
  int64_t rank = 128;     // r of the adapter config (LiveAvatar: 128); every pair must have it. 0: take it from
                          // each pair's tensors (scale = alpha / that rank)
  /// PEFT prefix stripped from LoRA keys when present.
  std::string prefix = "base_model.model.";
  /// Keys in the LoRA file that are not lora_A / lora_B but name a base weight replace it (PEFT's
  /// load_state_dict(strict=False) then merge does this). false: such keys are an error.
  bool allow_full_weights = true;
  /// PEFT target_modules: a Linear is adapted when its name ends with ".<target>" (what make-tiny writes and
  /// inspect expects; the merge itself takes every pair the file has).
  std::vector<std::string> targets = {"q", "k", "v", "o", "ffn.0", "ffn.2"};
};

struct LoraReport {
  std::vector<std::string> merged;    // base keys that received B @ A * alpha / r
  std::vector<std::string> replaced;  // base keys replaced by a full weight from the LoRA file
};

/// One base weight's update from a LoRA file: the pair (delta = B @ A * scale) or a full replacement.
struct LoraPatch {
  at::Tensor a, b;      // [r, in], [out, r] (pair)
  double scale = 1.0;   // alpha / r
  at::Tensor full;      // replacement weight (defined instead of the pair)
  std::string file;
};
/// base weight key ("blocks.0.self_attn.q.weight") -> its update.
using LoraIndex = std::map<std::string, LoraPatch>;

/// Parses and validates a PEFT LoRA state dict against the base weights (`base`: key -> shape, dtype) without
/// touching any weight; the same rules and messages as merge_lora. Throws WeightsError.
LoraIndex index_lora(const Checkpoint& lora, const Layout& base, const LoraOptions& options = {});

/// w updated by `patch` as merge_lora does it (w.float() + B.float() @ A.float() * scale, cast back to w's dtype;
/// or the replacement cast to w's dtype and device). chunk_rows > 0 computes it in blocks of rows, so the fp32
/// temporaries stay chunk_rows x in (the GEMM per block may round differently from the whole one).
at::Tensor apply_lora(const at::Tensor& w, const LoraPatch& patch, int64_t chunk_rows = 0);

/// The bytes of a checkpoint file that a (contiguous CPU) tensor views through its file mapping.
struct FileRange {
  std::string path;
  uint64_t offset = 0;
  uint64_t size = 0;
};
/// Where `view` lies in its file, or nullopt when it does not view a live file mapping (a copy, a merged weight).
std::optional<FileRange> file_range(const at::Tensor& view);
/// Reads the range with pread into `dst` (large sequential reads; no page of it is mapped into the process, so
/// loading this way leaves the process's resident memory alone). Reads the file, so in-place writes made to a
/// mapped view are not seen. Throws WeightsError.
void read_file_range(const FileRange& range, void* dst);

/// `t` in memory of its own: a CPU tensor whose storage views a checkpoint file mapping is read by pread into a new
/// tensor of the same shape, strides and dtype (only the bytes it spans), so nothing touches the mapping afterwards
/// and a file cut short meanwhile is a WeightsError ("the file shrank") instead of SIGBUS; any other tensor is
/// returned as is. Throws WeightsError.
at::Tensor read_owned(const at::Tensor& t);

/// Drops the resident pages under a CPU tensor that views a checkpoint file mapping (MADV_PAGEOUT), so reading a
/// large checkpoint tensor by tensor keeps host memory at about one tensor; later reads fault the pages in again.
/// Never changes the tensor's values; a no-op on other memory and on kernels without MADV_PAGEOUT.
void release_pages(const at::Tensor& tensor);

/// Merges a PEFT LoRA state dict into `base`: for every "<prefix>X.lora_A[.default].weight" /
/// "X.lora_B[.default].weight" pair, base["X.weight"] += B @ A * alpha / r computed in fp32 and cast back to the base
/// dtype. Fails (and changes nothing) on: a pair with one half missing, no base weight X.weight, a rank that differs
/// from options.rank or between A and B, B @ A not matching the base shape, any key it cannot place.
LoraReport merge_lora(Checkpoint& base, const Checkpoint& lora, const LoraOptions& options = {});

enum class Fp8Scaling {
  kPerTensor,   // one fp32 scale per weight (upstream FP8ScaleLinear)
  kPerChannel,  // one fp32 scale per output channel, shape [out]
};

struct ConvertOptions {
  /// Cast every floating tensor (except FP8 ones and the FP8 scales) to this dtype: Float, Half or BFloat16.
  std::optional<at::ScalarType> float_dtype;
  /// Quantise eligible Linear weights to float8_e4m3fn with a scale, as upstream's replace_linear_with_scaled_fp8:
  /// "X.weight" becomes "X.weight_fp8" (e4m3) + "X.weight_scale" (fp32, the dequantisation factor amax / 448).
  bool fp8 = false;
  Fp8Scaling fp8_scaling = Fp8Scaling::kPerTensor;
  /// Linear modules whose name contains one of these stay in high precision (upstream's ignore_keys).
  std::vector<std::string> fp8_ignore = {"text_embedding", "time_embedding", "time_projection", "head.head",
                                         "casual_audio_encoder.encoder.final_linear"};
  /// Which modules are Linear layers. Default: any module with a 2-D "weight" that is not an embedding table
  /// (names ending in "embedding", "embeddings", "trainable_cond_mask"). Pass linear_module_names(model) to be exact.
  std::function<bool(const std::string& module)> is_linear;
};

/// Names of every torch::nn::Linear submodule of `module` (for ConvertOptions::is_linear).
std::vector<std::string> linear_module_names(const torch::nn::Module& module);

/// Converts in place as `options` say; returns the number of tensors converted.
size_t convert(Checkpoint& checkpoint, const ConvertOptions& options);

/// Quantises one weight as upstream's quant_fp8: returns {weight in float8_e4m3fn, fp32 dequantisation scale}
/// (0-dim per tensor, [out] per channel). weight ~= fp8.float() * scale.
std::pair<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& weight, Fp8Scaling scaling);

}  // namespace liveavatar::weights
