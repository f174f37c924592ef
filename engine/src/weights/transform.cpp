// LoRA merge and precision conversion on load.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>

#include <c10/core/GradMode.h>

#include <algorithm>
#include <set>

#include "weights/weights.h"
#include "mapped_file.h"

namespace liveavatar::weights {

using detail::shape_string;

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

struct LoraPair {
  std::string a_key, b_key;  // keys in the LoRA file
  at::Tensor a, b;
};

std::string lora_files(const Checkpoint& lora) {
  std::string s;
  for (const auto& f : lora.files) s += (s.empty() ? "" : ", ") + f;
  return s;
}

}  // namespace

LoraIndex index_lora(const Checkpoint& lora, const Layout& base, const LoraOptions& options) {
  const std::string file = lora_files(lora);
  auto fail = [&](const std::string& message) {
    throw WeightsError(file, message + ". Nothing was merged; check that this LoRA belongs to this base model");
  };
  std::map<std::string, LoraPair> pairs;             // base module -> pair
  LoraIndex index;
  for (const auto& kv : lora.tensors) {
    std::string key = kv.first;
    if (!options.prefix.empty() && key.compare(0, options.prefix.size(), options.prefix) == 0) {
      key = key.substr(options.prefix.size());
    }
    for (const char* which : {".lora_A.", ".lora_B."}) {
      auto pos = key.find(which);
      if (pos == std::string::npos) continue;
      std::string module = key.substr(0, pos);
      std::string rest = key.substr(pos + 8);  // "weight" or "<adapter>.weight"
      if (rest != "weight" && (rest.find('.') == std::string::npos || !ends_with(rest, ".weight") ||
                               rest.find('.') != rest.size() - 7)) {
        fail("LoRA key \"" + kv.first + "\" is not <module>.lora_A/B[.<adapter>].weight");
      }
      LoraPair& p = pairs[module];
      bool is_a = which[6] == 'A';
      std::string& slot = is_a ? p.a_key : p.b_key;
      if (!slot.empty()) fail("LoRA keys \"" + slot + "\" and \"" + kv.first + "\" target the same module");
      slot = kv.first;
      (is_a ? p.a : p.b) = kv.second;
      key.clear();
      break;
    }
    if (key.empty()) continue;
    if (key.find("lora_") != std::string::npos) {
      fail("LoRA key \"" + kv.first + "\" is of a kind this merge does not support (only lora_A / lora_B)");
    }
    // A full weight saved with the adapter (PEFT model state dict): "X.base_layer.weight" or "X.weight".
    auto bl = key.find(".base_layer.");
    if (bl != std::string::npos) key.erase(bl, 11);
    if (!options.allow_full_weights) fail("LoRA file has the non-LoRA key \"" + kv.first + "\"");
    auto it = base.find(key);
    if (it == base.end()) fail("LoRA file key \"" + kv.first + "\" names no weight of the base model");
    if (it->second.shape != kv.second.sizes().vec()) {
      fail("LoRA file key \"" + kv.first + "\" has shape " + shape_string(kv.second.sizes().vec()) +
           ", the base weight " + shape_string(it->second.shape));
    }
    LoraPatch patch;
    patch.full = kv.second;
    patch.file = file;
    index[key] = patch;
  }
  // Validate every pair before anything is merged.
  for (const auto& mp : pairs) {
    const LoraPair& p = mp.second;
    const std::string target = mp.first + ".weight";
    if (p.a_key.empty() || p.b_key.empty()) {
      fail("LoRA for \"" + mp.first + "\" has " + (p.a_key.empty() ? p.b_key : p.a_key) + " but no " +
           (p.a_key.empty() ? "lora_A" : "lora_B"));
    }
    auto it = base.find(target);
    if (it == base.end()) fail("LoRA \"" + p.a_key + "\" has no base weight \"" + target + "\"");
    const TensorSpec& w = it->second;
    if (p.a.dim() != 2 || p.b.dim() != 2 || w.shape.size() != 2) {
      fail("LoRA for \"" + target + "\" is not a Linear LoRA (A " + shape_string(p.a.sizes().vec()) + ", B " +
           shape_string(p.b.sizes().vec()) + ", weight " + shape_string(w.shape) + ")");
    }
    if (!at::isFloatingType(w.dtype) || w.dtype == at::kFloat8_e4m3fn || w.dtype == at::kFloat8_e5m2) {
      fail("base weight \"" + target + "\" is " + std::string(c10::toString(w.dtype)) +
           ": merge the LoRA before FP8 conversion");
    }
    int64_t r = p.a.size(0);
    if (p.b.size(1) != r) {
      fail("rank mismatch for \"" + target + "\": lora_A has rank " + std::to_string(r) + ", lora_B " +
           std::to_string(p.b.size(1)));
    }
    if (options.rank > 0 && r != options.rank) {
      fail("rank mismatch for \"" + target + "\": the tensors have rank " + std::to_string(r) +
           ", the adapter config says r=" + std::to_string(options.rank));
    }
    if (p.b.size(0) != w.shape[0] || p.a.size(1) != w.shape[1]) {
      fail("LoRA for \"" + target + "\": B @ A is [" + std::to_string(p.b.size(0)) + ", " +
           std::to_string(p.a.size(1)) + "], the weight " + shape_string(w.shape));
    }
    if (index.count(target)) fail("LoRA file has both a full weight and lora_A / lora_B for \"" + target + "\"");
    LoraPatch patch;
    patch.a = p.a;
    patch.b = p.b;
    patch.scale = options.alpha / static_cast<double>(r);
    patch.file = file;
    index[target] = patch;
  }
  return index;
}

at::Tensor apply_lora(const at::Tensor& w, const LoraPatch& patch, int64_t chunk_rows) {
  c10::NoGradGuard no_grad;
  if (patch.full.defined()) return patch.full.to(w.device(), w.scalar_type());
  const auto a = patch.a.to(w.device(), at::kFloat);
  const auto b = patch.b.to(w.device(), at::kFloat);
  const int64_t rows = w.size(0);
  if (chunk_rows <= 0 || chunk_rows >= rows) {
    at::Tensor delta = at::matmul(b, a);
    return (w.to(at::kFloat) + delta * patch.scale).to(w.scalar_type());
  }
  // Row blocks: the fp32 temporaries are chunk_rows x in, not the whole weight.
  at::Tensor out = at::empty_like(w, at::MemoryFormat::Contiguous);
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t r1 = std::min(rows, r0 + chunk_rows);
    at::Tensor delta = at::matmul(b.slice(0, r0, r1), a);
    out.slice(0, r0, r1).copy_((w.slice(0, r0, r1).to(at::kFloat) + delta * patch.scale).to(w.scalar_type()));
  }
  return out;
}

LoraReport merge_lora(Checkpoint& base, const Checkpoint& lora, const LoraOptions& options) {
  Layout layout;
  for (const auto& kv : base.tensors) layout[kv.first] = TensorSpec{kv.second.sizes().vec(), kv.second.scalar_type()};
  const LoraIndex index = index_lora(lora, layout, options);
  const std::string file = lora_files(lora);
  LoraReport report;
  c10::NoGradGuard no_grad;
  // Pairs first, then full replacements (each list in key order), as the reports list them.
  for (const auto& kv : index) {
    if (kv.second.full.defined()) continue;
    at::Tensor& w = base.tensors[kv.first];
    w = apply_lora(w, kv.second);
    base.source[kv.first] += " + " + file;
    report.merged.push_back(kv.first);
  }
  for (const auto& kv : index) {
    if (!kv.second.full.defined()) continue;
    at::Tensor& w = base.tensors[kv.first];
    w = apply_lora(w, kv.second);
    base.source[kv.first] = file;
    report.replaced.push_back(kv.first);
  }
  return report;
}

std::pair<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& weight, Fp8Scaling scaling) {
  constexpr double kMax = 448.0;  // torch.finfo(torch.float8_e4m3fn).max
  c10::NoGradGuard no_grad;
  if (scaling == Fp8Scaling::kPerTensor) {
    // As upstream quant_fp8: scale = clamp(max / clamp(amax, 1e-12), max=448); the product is in the weight dtype.
    at::Tensor amax = weight.abs().max().to(at::kFloat);
    at::Tensor scale = (kMax / amax.clamp_min(1e-12)).clamp_max(kMax);
    at::Tensor q = (weight * scale).clamp(-kMax, kMax).to(at::kFloat8_e4m3fn);
    return {q, scale.reciprocal()};
  }
  at::Tensor amax = std::get<0>(weight.abs().max(/*dim=*/1)).to(at::kFloat);  // [out]
  at::Tensor scale = (kMax / amax.clamp_min(1e-12)).clamp_max(kMax);
  at::Tensor q = (weight.to(at::kFloat) * scale.unsqueeze(1)).clamp(-kMax, kMax).to(at::kFloat8_e4m3fn);
  return {q, scale.reciprocal()};
}

size_t convert(Checkpoint& checkpoint, const ConvertOptions& options) {
  if (options.float_dtype && *options.float_dtype != at::kFloat && *options.float_dtype != at::kHalf &&
      *options.float_dtype != at::kBFloat16) {
    throw WeightsError("", "conversion target must be Float, Half or BFloat16, not " +
                               std::string(c10::toString(*options.float_dtype)));
  }
  auto default_is_linear = [](const std::string& module) {
    return !(ends_with(module, "embedding") || ends_with(module, "embeddings") ||
             ends_with(module, "trainable_cond_mask"));
  };
  size_t converted = 0;
  std::set<std::string> keep;  // FP8 outputs: not touched by the float cast
  if (options.fp8) {
    std::vector<std::string> targets;
    for (const auto& kv : checkpoint.tensors) {
      if (!ends_with(kv.first, ".weight") || kv.second.dim() != 2 || !at::isFloatingType(kv.second.scalar_type())) {
        continue;
      }
      std::string module = kv.first.substr(0, kv.first.size() - 7);
      bool linear = options.is_linear ? options.is_linear(module) : default_is_linear(module);
      bool ignored = false;
      for (const auto& ig : options.fp8_ignore) ignored = ignored || module.find(ig) != std::string::npos;
      if (linear && !ignored) targets.push_back(kv.first);
    }
    for (const auto& key : targets) {
      std::string module = key.substr(0, key.size() - 7);
      if (checkpoint.tensors.count(module + ".weight_fp8") || checkpoint.tensors.count(module + ".weight_scale")) {
        throw WeightsError(checkpoint.source[key], "\"" + module + "\" already has FP8 tensors");
      }
    }
    for (const auto& key : targets) {
      std::string module = key.substr(0, key.size() - 7);
      auto q = quantize_fp8(checkpoint.tensors[key], options.fp8_scaling);
      std::string src = checkpoint.source[key];
      checkpoint.tensors.erase(key);
      checkpoint.source.erase(key);
      checkpoint.tensors[module + ".weight_fp8"] = q.first;
      checkpoint.tensors[module + ".weight_scale"] = q.second;
      checkpoint.source[module + ".weight_fp8"] = src;
      checkpoint.source[module + ".weight_scale"] = src;
      keep.insert(module + ".weight_fp8");
      keep.insert(module + ".weight_scale");
      ++converted;
    }
  }
  if (options.float_dtype) {
    for (auto& kv : checkpoint.tensors) {
      at::ScalarType t = kv.second.scalar_type();
      if (keep.count(kv.first) || t == *options.float_dtype || !at::isFloatingType(t) ||
          t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2 || t == at::kFloat8_e8m0fnu ||
          t == at::kFloat8_e4m3fnuz || t == at::kFloat8_e5m2fnuz) {
        continue;
      }
      kv.second = kv.second.to(*options.float_dtype);
      ++converted;
    }
  }
  return converted;
}

}  // namespace liveavatar::weights
