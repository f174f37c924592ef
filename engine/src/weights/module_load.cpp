// Strict, name-checked loading of a Checkpoint into a torch::nn::Module tree.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <sstream>

#include "weights/weights.h"
#include "mapped_file.h"

namespace liveavatar::weights {

using detail::dtype_string;
using detail::shape_string;

std::string LoadReport::to_string(size_t max_per_list) const {
  std::ostringstream s;
  auto list = [&](const char* title, const std::vector<std::string>& v) {
    if (v.empty()) return;
    s << title << " (" << v.size() << "):\n";
    for (size_t i = 0; i < v.size() && i < max_per_list; ++i) s << "  " << v[i] << "\n";
    if (v.size() > max_per_list) s << "  ... and " << v.size() - max_per_list << " more\n";
  };
  list("missing keys (the model has them, the checkpoint does not)", missing);
  list("unexpected keys (in the checkpoint, not in the model)", unexpected);
  list("mismatched keys", mismatched);
  if (ok()) s << "all keys match\n";
  return s.str();
}

Layout module_layout(const torch::nn::Module& module) {
  Layout out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) {
    out[p.key()] = TensorSpec{p.value().sizes().vec(), p.value().scalar_type()};
  }
  for (const auto& b : module.named_buffers(/*recurse=*/true)) {
    out[b.key()] = TensorSpec{b.value().sizes().vec(), b.value().scalar_type()};
  }
  return out;
}

LoadReport check_layout(const Layout& expected, const Checkpoint& checkpoint, bool check_dtype) {
  LoadReport r;
  for (const auto& e : expected) {
    auto it = checkpoint.tensors.find(e.first);
    if (it == checkpoint.tensors.end()) {
      r.missing.push_back(e.first + " " + shape_string(e.second.shape) + " " + dtype_string(e.second.dtype));
      continue;
    }
    const at::Tensor& t = it->second;
    bool shape_ok = t.sizes().vec() == e.second.shape;
    bool dtype_ok = !check_dtype || t.scalar_type() == e.second.dtype;
    if (!shape_ok || !dtype_ok) {
      auto src = checkpoint.source.find(e.first);
      r.mismatched.push_back(e.first + ": expected " + shape_string(e.second.shape) + " " +
                             dtype_string(e.second.dtype) + ", got " + shape_string(t.sizes().vec()) + " " +
                             dtype_string(t.scalar_type()) +
                             (src != checkpoint.source.end() ? " (" + src->second + ")" : std::string()));
    }
  }
  for (const auto& kv : checkpoint.tensors) {
    if (!expected.count(kv.first)) {
      auto src = checkpoint.source.find(kv.first);
      r.unexpected.push_back(kv.first + " " + shape_string(kv.second.sizes().vec()) + " " +
                             dtype_string(kv.second.scalar_type()) +
                             (src != checkpoint.source.end() ? " (" + src->second + ")" : std::string()));
    }
  }
  return r;
}

void load_into_module(torch::nn::Module& module, const Checkpoint& checkpoint, const ModuleLoadOptions& options) {
  LoadReport report = check_layout(module_layout(module), checkpoint, !options.cast_dtype);
  if (!report.ok()) {
    std::string files;
    for (const auto& f : checkpoint.files) files += (files.empty() ? "" : ", ") + f;
    throw WeightsError(files, "checkpoint does not match the model; nothing was loaded.\n" + report.to_string() +
                                  "Check that the files belong to this model and configuration");
  }
  // Prepare every value first (casts and device moves can fail: out of memory), then install them all.
  torch::NoGradGuard no_grad;
  std::vector<std::pair<at::Tensor, at::Tensor>> plan;  // (module tensor, value)
  // Values viewing a file mapping are read by pread (read_owned): with assign while preparing, otherwise one at a
  // time while copying, so the host holds one tensor's copy at a time.
  auto prepare = [&](const std::string& key, const at::Tensor& target) {
    at::Tensor v = checkpoint.tensors.at(key);
    if (options.assign) {
      v = read_owned(v);
      if (v.device() != target.device() || v.scalar_type() != target.scalar_type())
        v = v.to(target.device(), target.scalar_type());
    }
    plan.emplace_back(target, v);
  };
  for (const auto& p : module.named_parameters(/*recurse=*/true)) prepare(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) prepare(b.key(), b.value());
  for (auto& tv : plan) {
    if (options.assign) {
      tv.first.set_data(tv.second);
    } else {
      tv.first.copy_(read_owned(tv.second));
      tv.second = at::Tensor();
    }
  }
}

std::vector<std::string> linear_module_names(const torch::nn::Module& module) {
  std::vector<std::string> out;
  for (const auto& m : module.named_modules(/*name_prefix=*/"", /*include_self=*/false)) {
    if (m.value()->as<torch::nn::Linear>() != nullptr) out.push_back(m.key());
  }
  return out;
}

}  // namespace liveavatar::weights
