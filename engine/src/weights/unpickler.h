// The restricted unpickler of torch.save's data.pkl: accepts exactly what torch.save writes for tensor state dicts
// (like torch.load(weights_only=True)) and validates every opcode and tensor extent. Internal to the weights
// library (pth.cpp, the fuzzers). SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "weights/weights.h"

namespace liveavatar::weights::detail {

struct Node;
using Ref = std::shared_ptr<Node>;

struct Node {
  enum Kind { kNone, kBool, kInt, kFloat, kStr, kTuple, kList, kDict, kGlobal, kStorageType, kStorage, kTensor };
  Kind kind = kNone;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;             // str, or global "module.name"
  std::vector<Ref> items;    // tuple / list; dict as key, value, key, value...
  at::ScalarType dtype = at::kFloat;  // storage type, storage
  at::Tensor tensor;         // storage (1-D of dtype over the record), tensor
};

/// "tensor", "dict", ... for messages.
const char* kind_name(Node::Kind k);
/// The dtype of a torch storage class name ("FloatStorage" -> float), or none.
std::optional<at::ScalarType> storage_dtype(const std::string& cls);

/// Makes the storage node for persistent id (key, dtype, element count): the caller maps the archive's record.
using StorageLoader = std::function<Ref(const std::string& key, at::ScalarType dtype, int64_t numel)>;

/// Runs data.pkl (n bytes at p) and flattens the state dict it builds into out.tensors / out.metadata (nested dicts
/// as "a.b" keys). Throws WeightsError naming `file` on anything a tensor state dict never holds.
void unpickle_state_dict(const uint8_t* p, size_t n, const std::string& file, const StorageLoader& load_storage,
                         Checkpoint& out);

}  // namespace liveavatar::weights::detail
