// Streaming, name-checked loading of a DiT checkpoint into a module tree (whole model or shard): one tensor at a
// time from the file mapping to the device, LoRA merged and FP8 quantised per tensor.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <sys/mman.h>

#include <optional>
#include <set>
#include <sstream>

#include "model.h"

namespace liveavatar::dit {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
std::string strip(const std::string& s, const std::string& suffix) { return s.substr(0, s.size() - suffix.size()); }

std::string shape_str(at::IntArrayRef shape) { return c10::str(shape); }

// LoRA merges of weights larger than this run in row blocks (bounded fp32 temporaries).
constexpr int64_t kLoraChunkElements = int64_t{16} << 20;

// Where one parameter of the module gets its value.
struct Source {
  std::string param;       // module parameter key
  std::string key;         // checkpoint key (the high-precision weight, or the FP8 pair's weight_fp8)
  enum Kind { kCopy, kQuantize, kDequantize, kFp8Pair } kind = kCopy;
};

// Large CPU parameters are written once while loading: 2 MiB pages take 512 times fewer faults (transparent huge
// pages in "madvise" mode need the advice; no effect where THP is off).
void advise_huge_pages(const at::Tensor& t) {
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (t.nbytes() < 2 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) / kHuge * kHuge, last = (begin + t.nbytes()) / kHuge * kHuge;
  if (last > first) (void)::madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
}

}  // namespace

bool fp8_eligible(const std::string& module_name) {
  for (const auto& ignored : weights::ConvertOptions{}.fp8_ignore)
    if (module_name.find(ignored) != std::string::npos) return false;
  return true;
}

void load_streaming(CausalWanModelS2VImpl& module, const weights::Checkpoint& ck, const StreamLoadOptions& options) {
  c10::NoGradGuard no_grad;
  const auto& config = module.config;
  // The whole model's names and shapes, built on the meta device (no memory): a key that no shard would load is an
  // error even for a shard, so a wrong file is caught wherever it is loaded.
  BuildOptions meta_build;
  meta_build.params.tensor = at::TensorOptions().dtype(at::kFloat).device(at::kMeta);
  CausalWanModelS2VImpl full(config, meta_build);
  std::map<std::string, std::vector<int64_t>> full_shapes;
  for (const auto& p : full.named_parameters(/*recurse=*/true)) full_shapes[p.key()] = p.value().sizes().vec();
  std::set<std::string> linears;  // Linear module names of the full model
  for (const auto& m : full.named_modules("", /*include_self=*/false))
    if (m.value()->as<LinearImpl>() != nullptr) linears.insert(m.key());

  weights::LoadReport report;
  auto source_of = [&](const std::string& key) {
    const auto it = ck.source.find(key);
    return it == ck.source.end() ? std::string() : " (" + it->second + ")";
  };
  auto mismatch = [&](const std::string& key, const std::string& expected, const at::Tensor& got) {
    report.mismatched.push_back(key + ": expected " + expected + ", got " + shape_str(got.sizes()) + " " +
                                std::string(c10::toString(got.scalar_type())) + source_of(key));
  };
  // 1. Every checkpoint key names a parameter of the model (or the FP8 form of one of its Linear weights).
  for (const auto& kv : ck.tensors) {
    const std::string& key = kv.first;
    const at::Tensor& t = kv.second;
    const auto it = full_shapes.find(key);
    if (it != full_shapes.end()) {
      if (t.sizes().vec() != it->second) mismatch(key, shape_str(it->second), t);
      else if (!at::isFloatingType(t.scalar_type())) mismatch(key, "a floating-point tensor", t);
      continue;
    }
    const bool is_q = ends_with(key, ".weight_fp8"), is_s = ends_with(key, ".weight_scale");
    const std::string mod = is_q ? strip(key, ".weight_fp8") : is_s ? strip(key, ".weight_scale") : std::string();
    if (!mod.empty() && linears.count(mod)) {
      const auto& shape = full_shapes.at(mod + ".weight");
      if (ck.tensors.count(mod + ".weight")) {
        report.unexpected.push_back(key + source_of(key) + ": the checkpoint also has " + mod + ".weight");
      } else if (is_q && (t.sizes().vec() != shape || t.scalar_type() != at::kFloat8_e4m3fn)) {
        mismatch(key, shape_str(shape) + " Float8_e4m3fn", t);
      } else if (is_s && !(t.dim() == 0 || (t.dim() == 1 && t.size(0) == shape[0]))) {
        mismatch(key, "[] or [" + std::to_string(shape[0]) + "]", t);
      } else if (!ck.tensors.count(mod + (is_q ? ".weight_scale" : ".weight_fp8"))) {
        report.missing.push_back(mod + (is_q ? ".weight_scale" : ".weight_fp8") + " (the other half of " + key + ")");
      }
      continue;
    }
    report.unexpected.push_back(key + " " + shape_str(t.sizes()) + source_of(key));
  }
  // 2. Every parameter of this module has a source.
  std::vector<Source> plan;
  const auto own = module.named_parameters(/*recurse=*/true);  // kept: find() below points into it
  for (const auto& p : own) {
    const std::string& name = p.key();
    const at::Tensor& target = p.value();
    if (ends_with(name, ".weight_scale")) continue;  // loaded with its weight_fp8
    if (ends_with(name, ".weight_fp8")) {
      const std::string mod = strip(name, ".weight_fp8");
      if (ck.tensors.count(name) && ck.tensors.count(mod + ".weight_scale")) {
        const auto& scale = ck.tensors.at(mod + ".weight_scale");
        const auto* want = own.find(mod + ".weight_scale");
        if (want && scale.sizes() != want->sizes())
          mismatch(mod + ".weight_scale", shape_str(want->sizes()) + " (the FP8 scaling this model was built with)",
                   scale);
        plan.push_back({name, name, Source::kFp8Pair});
      } else if (ck.tensors.count(mod + ".weight")) {
        plan.push_back({name, mod + ".weight", Source::kQuantize});
      } else {
        report.missing.push_back(mod + ".weight (or its FP8 pair) " + shape_str(target.sizes()));
      }
      continue;
    }
    if (ck.tensors.count(name)) {
      plan.push_back({name, name, Source::kCopy});
    } else if (ends_with(name, ".weight") && ck.tensors.count(strip(name, ".weight") + ".weight_fp8")) {
      plan.push_back({name, strip(name, ".weight") + ".weight_fp8", Source::kDequantize});
    } else {
      report.missing.push_back(name + " " + shape_str(target.sizes()) + " " +
                               std::string(c10::toString(target.scalar_type())));
    }
  }
  if (!report.ok()) {
    std::string files;
    for (const auto& f : ck.files) files += (files.empty() ? "" : ", ") + f;
    throw weights::WeightsError(files, "checkpoint does not match the model; nothing was loaded.\n" +
                                           report.to_string() +
                                           "Check that the files belong to this model and configuration");
  }
  // 3. LoRA, validated against the checkpoint before anything is copied.
  weights::LoraIndex lora;
  if (options.lora) {
    weights::Layout base;
    for (const auto& kv : ck.tensors)
      base[kv.first] = weights::TensorSpec{kv.second.sizes().vec(), kv.second.scalar_type()};
    lora = weights::index_lora(*options.lora, base, options.lora_options);
  }
  // 4. One tensor at a time: read (pread, or page faults on the mapping), merge, cast / quantise, copy.
  const auto params = module.named_parameters(/*recurse=*/true);
  at::Tensor bounce;  // one reused host buffer for reads that need a conversion or a device copy
  // The tensor's bytes in host memory, read from its file; undefined when read straight into `direct` (a plain
  // copy: same dtype on the CPU, or converted / sent to the device in pieces of kPiece bytes).
  constexpr int64_t kPiece = int64_t{8} << 20;
  auto read = [&](const at::Tensor& view, const at::Tensor& direct) -> at::Tensor {
    if (!options.read_files) return view;
    const auto range = weights::file_range(view);
    if (!range) return view;
    if (direct.defined() && direct.is_contiguous() && direct.sizes() == view.sizes()) {
      if (direct.device().is_cpu()) advise_huge_pages(direct);
      if (direct.device().is_cpu() && direct.scalar_type() == view.scalar_type()) {
        weights::read_file_range(*range, direct.data_ptr());
        return at::Tensor();
      }
      const int64_t item = static_cast<int64_t>(view.element_size());
      const int64_t per_piece = std::max<int64_t>(1, kPiece / item);
      if (!bounce.defined() || bounce.numel() < std::min<int64_t>(kPiece, view.numel() * item) + item)
        bounce = at::empty({std::max<int64_t>(kPiece, item) + item},
                           at::TensorOptions().dtype(at::kByte).pinned_memory(!direct.device().is_cpu()));
      auto flat = direct.view(-1);
      for (int64_t e0 = 0; e0 < view.numel(); e0 += per_piece) {
        const int64_t n = std::min(per_piece, view.numel() - e0);
        weights::read_file_range({range->path, range->offset + static_cast<uint64_t>(e0 * item),
                                  static_cast<uint64_t>(n * item)},
                                 bounce.data_ptr());
        flat.slice(0, e0, e0 + n).copy_(bounce.slice(0, 0, n * item).view(view.scalar_type()));
      }
      return at::Tensor();
    }
    const auto bytes = static_cast<int64_t>(range->size);
    if (!bounce.defined() || bounce.numel() < bytes)
      bounce = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(!direct.device().is_cpu()));
    weights::read_file_range(*range, bounce.data_ptr());
    return bounce.slice(0, 0, bytes).view(view.scalar_type()).view(view.sizes());
  };
  // A LoRA factor (or full weight) or an FP8 scale read from its file into memory of its own. Also by pread, not by
  // page faults on the mapping: a file cut short while the model loads is then an error ("the file shrank"), where
  // touching the mapping past the new end would kill the process with SIGBUS.
  auto read_copy = [&](const at::Tensor& view) -> at::Tensor {
    const auto range = options.read_files && view.defined() ? weights::file_range(view) : std::nullopt;
    if (!range) return view;
    at::Tensor t = at::empty(view.sizes(), view.options());
    weights::read_file_range(*range, t.data_ptr());
    return t;
  };
  for (const Source& s : plan) {
    at::Tensor target = params[s.param];
    const at::Tensor& view = ck.tensors.at(s.key);
    if (options.on_tensor) options.on_tensor(static_cast<uint64_t>(view.nbytes()));
    const auto dev = target.device();
    const bool merge = lora.count(s.key) != 0;
    const at::Tensor src = read(view, s.kind == Source::kCopy && !merge ? target : at::Tensor());
    if (!src.defined()) continue;  // read straight into the parameter
    switch (s.kind) {
      case Source::kCopy:
      case Source::kQuantize: {
        at::Tensor value = src;
        const auto lit = lora.find(s.key);
        if (lit != lora.end()) {
          weights::LoraPatch patch = lit->second;
          patch.a = read_copy(patch.a);
          patch.b = read_copy(patch.b);
          patch.full = read_copy(patch.full);
          const int64_t cols = src.dim() == 2 ? src.size(1) : 1;
          value = weights::apply_lora(src.to(dev), patch,
                                      src.numel() > kLoraChunkElements ? std::max<int64_t>(1, kLoraChunkElements / cols)
                                                                       : 0);
        }
        if (s.kind == Source::kCopy) {
          target.copy_(value);
        } else {
          const std::string mod = strip(s.param, ".weight_fp8");
          const auto scaling = params[mod + ".weight_scale"].dim() == 0 ? weights::Fp8Scaling::kPerTensor
                                                                         : weights::Fp8Scaling::kPerChannel;
          auto [q, scale] = weights::quantize_fp8(value.to(dev), scaling);
          target.copy_(q);
          params[mod + ".weight_scale"].copy_(scale);
        }
        break;
      }
      case Source::kFp8Pair: {
        const std::string mod = strip(s.param, ".weight_fp8");
        if (lora.count(mod + ".weight"))
          throw weights::WeightsError(options.lora->files.empty() ? "" : options.lora->files.front(),
                                      mod + " is stored as FP8 in the checkpoint: merge the LoRA before FP8 "
                                            "conversion (load the bf16 checkpoint with precision fp8 instead)");
        target.copy_(src);
        params[mod + ".weight_scale"].copy_(read_copy(ck.tensors.at(mod + ".weight_scale")));
        break;
      }
      case Source::kDequantize: {
        const std::string mod = strip(s.param, ".weight");
        if (lora.count(s.param))
          throw weights::WeightsError(options.lora->files.empty() ? "" : options.lora->files.front(),
                                      mod + " is stored as FP8 in the checkpoint: merge the LoRA before FP8 "
                                            "conversion");
        const auto scale = read_copy(ck.tensors.at(mod + ".weight_scale"));
        target.copy_(src.to(dev).to(at::kFloat) * (scale.dim() == 0 ? scale : scale.unsqueeze(1)).to(dev));
        break;
      }
    }
    if (options.release_pages) weights::release_pages(view);
  }
}

void randomize_parameters(torch::nn::Module& module, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto& item : module.named_parameters(/*recurse=*/true)) {
    auto& p = item.value();
    auto values = at::empty(p.sizes(), at::kFloat);
    values.normal_(0.0, 0.02, gen);
    if (p.dim() <= 1) values.normal_(0.0, 0.1, gen);
    p.copy_(values);
  }
}

}  // namespace liveavatar::dit
