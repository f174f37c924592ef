// safetensors: header parser (the reference implementation's validation rules), mapped loader, sharded index, writer.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <unistd.h>

#include "weights/weights.h"
#include "mapped_file.h"

namespace liveavatar::weights {

using detail::MappedFile;
using detail::shape_string;
using json = nlohmann::json;

namespace {

struct DTypeName {
  const char* name;
  at::ScalarType type;
};

// Every dtype of the safetensors format that ATen can hold. Sub-byte types (F4, F6_*) have no ATen dtype.
const DTypeName kDTypes[] = {
    {"F64", at::kDouble},          {"F32", at::kFloat},          {"F16", at::kHalf},
    {"BF16", at::kBFloat16},       {"F8_E4M3", at::kFloat8_e4m3fn}, {"F8_E5M2", at::kFloat8_e5m2},
    {"F8_E8M0", at::kFloat8_e8m0fnu}, {"I64", at::kLong},        {"I32", at::kInt},
    {"I16", at::kShort},           {"I8", at::kChar},            {"U8", at::kByte},
    {"U16", at::kUInt16},          {"U32", at::kUInt32},         {"U64", at::kUInt64},
    {"BOOL", at::kBool},           {"C64", at::kComplexFloat},
};

constexpr int kMaxJsonDepth = 8;
constexpr size_t kMaxRank = 64;

[[noreturn]] void fail(const std::string& file, const std::string& message) { throw WeightsError(file, message); }

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

}  // namespace

std::optional<std::string> safetensors_dtype_name(at::ScalarType type) {
  for (const auto& d : kDTypes)
    if (d.type == type) return std::string(d.name);
  return std::nullopt;
}

std::optional<at::ScalarType> scalar_type_from_safetensors(const std::string& name) {
  for (const auto& d : kDTypes)
    if (name == d.name) return d.type;
  return std::nullopt;
}

SafetensorsHeader parse_safetensors_header(const uint8_t* bytes, size_t size, uint64_t file_size,
                                           const std::string& file) {
  const std::string hint = " The file is damaged or not a safetensors file: download it again";
  if (file_size < 8 || size < 8) {
    fail(file, "truncated: " + std::to_string(file_size) +
                   " bytes, shorter than the 8-byte header length field." + hint);
  }
  SafetensorsHeader h;
  h.header_size = read_le64(bytes);
  if (h.header_size > kMaxSafetensorsHeader) {
    fail(file, "header length " + std::to_string(h.header_size) + " exceeds the format's limit of " +
                   std::to_string(kMaxSafetensorsHeader) + " bytes." + hint);
  }
  if (h.header_size > file_size - 8) {
    fail(file, "header length " + std::to_string(h.header_size) + " runs past the end of the file (" +
                   std::to_string(file_size) + " bytes): the file is truncated." + hint);
  }
  if (size < 8 + h.header_size) fail(file, "internal: header bytes not provided");
  h.data_offset = 8 + h.header_size;
  h.data_size = file_size - h.data_offset;

  const char* begin = reinterpret_cast<const char*>(bytes + 8);
  const char* end = begin + h.header_size;
  if (h.header_size == 0 || *begin != '{') {
    fail(file, "header does not start with '{': not a JSON object." + hint);
  }

  // Parse with a callback that rejects duplicate keys (JSON parsers differ on which one wins: ambiguous) and
  // nesting deeper than the format uses.
  std::vector<std::set<std::string>> seen;
  json root;
  try {
    root = json::parse(
        begin, end,
        [&](int depth, json::parse_event_t event, json& parsed) {
          if (depth > kMaxJsonDepth) throw WeightsError(file, "header JSON nests deeper than the format allows." + hint);
          if (event == json::parse_event_t::object_start) {
            seen.emplace_back();
          } else if (event == json::parse_event_t::object_end) {
            if (!seen.empty()) seen.pop_back();
          } else if (event == json::parse_event_t::key && !seen.empty()) {
            const auto& key = parsed.get_ref<const std::string&>();
            if (!seen.back().insert(key).second) {
              throw WeightsError(file, "header has the key \"" + key + "\" twice." + hint);
            }
          }
          return true;
        },
        /*allow_exceptions=*/true);
  } catch (const json::exception& e) {
    fail(file, std::string("header is not valid JSON (") + e.what() + ")." + hint);
  }
  if (!root.is_object()) fail(file, "header JSON is not an object." + hint);

  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& key = it.key();
    const json& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object()) fail(file, "\"__metadata__\" is not an object of strings." + hint);
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) {
          fail(file, "\"__metadata__\" entry \"" + m.key() + "\" is not a string." + hint);
        }
        h.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "tensor \"" + key + "\": ";
    if (!v.is_object()) fail(file, where + "entry is not an object." + hint);
    for (auto f = v.begin(); f != v.end(); ++f) {
      if (f.key() != "dtype" && f.key() != "shape" && f.key() != "data_offsets") {
        fail(file, where + "unknown field \"" + f.key() + "\"." + hint);
      }
    }
    if (!v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets")) {
      fail(file, where + "needs \"dtype\", \"shape\" and \"data_offsets\"." + hint);
    }
    TensorEntry t;
    t.name = key;
    const json& dt = v["dtype"];
    if (!dt.is_string()) fail(file, where + "dtype is not a string." + hint);
    auto type = scalar_type_from_safetensors(dt.get<std::string>());
    if (!type) {
      fail(file, where + "unknown dtype \"" + dt.get<std::string>() +
                     "\" (known: F64 F32 F16 BF16 F8_E4M3 F8_E5M2 F8_E8M0 I64 I32 I16 I8 U8 U16 U32 U64 BOOL C64)." +
                     " Convert the checkpoint to a supported dtype");
    }
    t.dtype = *type;
    const json& shape = v["shape"];
    if (!shape.is_array() || shape.size() > kMaxRank) {
      fail(file, where + "shape is not an array of at most " + std::to_string(kMaxRank) + " sizes." + hint);
    }
    uint64_t numel = 1;
    for (const json& d : shape) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
        fail(file, where + "shape " + shape.dump() + " has an entry that is not a non-negative integer." + hint);
      }
      uint64_t n = d.get<uint64_t>();
      if (detail::mul_overflow(numel, n, &numel)) fail(file, where + "shape " + shape.dump() + " overflows." + hint);
      t.shape.push_back(static_cast<int64_t>(n));
    }
    uint64_t nbytes = 0;
    if (detail::mul_overflow(numel, c10::elementSize(t.dtype), &nbytes) || nbytes > static_cast<uint64_t>(INT64_MAX)) {
      fail(file, where + "shape " + shape.dump() + " is too large." + hint);
    }
    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      fail(file, where + "data_offsets is not [begin, end] of non-negative integers." + hint);
    }
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    if (t.end < t.begin) {
      fail(file, where + "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                     "] end before begin." + hint);
    }
    if (t.end > h.data_size) {
      fail(file, where + "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                     "] out of bounds: the data section has " + std::to_string(h.data_size) +
                     " bytes (file truncated?)." + hint);
    }
    if (t.end - t.begin != nbytes) {
      fail(file, where + "data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) + "] hold " +
                     std::to_string(t.end - t.begin) + " bytes but shape " + shape_string(t.shape) + " x " +
                     dt.get<std::string>() + " needs " + std::to_string(nbytes) + "." + hint);
    }
    h.tensors.push_back(std::move(t));
  }

  // The byte ranges must tile the data section exactly: no overlap, no gap, nothing after the last one.
  std::vector<const TensorEntry*> order;
  for (const auto& t : h.tensors) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(), [](const TensorEntry* a, const TensorEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t cursor = 0;
  const TensorEntry* prev = nullptr;
  for (const TensorEntry* t : order) {
    if (t->begin < cursor) {
      fail(file, "tensors \"" + prev->name + "\" and \"" + t->name + "\" overlap (bytes " +
                     std::to_string(t->begin) + " < " + std::to_string(cursor) + ")." + hint);
    }
    if (t->begin > cursor) {
      fail(file, "bytes [" + std::to_string(cursor) + ", " + std::to_string(t->begin) +
                     ") of the data section belong to no tensor (before \"" + t->name + "\")." + hint);
    }
    cursor = t->end;
    prev = t;
  }
  if (cursor != h.data_size) {
    fail(file, std::to_string(h.data_size - cursor) + " bytes after the last tensor belong to no tensor." + hint);
  }
  return h;
}

uint64_t Checkpoint::nbytes() const {
  uint64_t n = 0;
  for (const auto& kv : tensors) n += kv.second.nbytes();
  return n;
}

uint64_t Checkpoint::numel() const {
  uint64_t n = 0;
  for (const auto& kv : tensors) n += static_cast<uint64_t>(kv.second.numel());
  return n;
}

namespace {

// Bytes of a BOOL tensor other than 0 / 1 are undefined behaviour for ATen's bool kernels.
void check_bool_bytes(const uint8_t* p, uint64_t n, const std::string& file, const std::string& key) {
  for (uint64_t i = 0; i < n; ++i) {
    if (p[i] > 1) fail(file, "tensor \"" + key + "\": BOOL byte " + std::to_string(i) + " is " +
                                 std::to_string(p[i]) + ", not 0 or 1. The file is damaged: download it again");
  }
}

void add_safetensors(Checkpoint& out, const std::shared_ptr<MappedFile>& mapped, const std::string& path) {
  SafetensorsHeader h = parse_safetensors_header(mapped->data(), static_cast<size_t>(mapped->size()),
                                                 mapped->size(), path);
  Checkpoint part;
  for (const auto& t : h.tensors) {
    if (t.dtype == at::kBool) check_bool_bytes(mapped->data() + h.data_offset + t.begin, t.end - t.begin, path, t.name);
    bool copied = false;
    part.tensors[t.name] = detail::tensor_from_mapping(mapped, h.data_offset + t.begin, t.shape, t.dtype, &copied);
    part.source[t.name] = path;
    if (copied) ++part.copied_tensors;
  }
  // Only now, with the whole file valid, does anything reach `out`.
  for (auto& kv : part.tensors) out.tensors[kv.first] = std::move(kv.second);
  for (auto& kv : part.source) out.source[kv.first] = std::move(kv.second);
  for (auto& kv : h.metadata) out.metadata[kv.first] = kv.second;
  out.files.push_back(path);
  out.copied_tensors += part.copied_tensors;
}

std::string dirname_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

std::string read_small_file(const std::string& path, size_t limit) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, "cannot open. Check the path and that the file was downloaded");
  std::string s;
  char buf[65536];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    s.append(buf, static_cast<size_t>(in.gcount()));
    if (s.size() > limit) fail(path, "larger than " + std::to_string(limit) + " bytes: not a checkpoint index");
  }
  return s;
}

}  // namespace

Checkpoint load_safetensors(const std::string& path, const ReadOptions& options) {
  Checkpoint out;
  add_safetensors(out, MappedFile::open(path, options.populate), path);
  return out;
}

Checkpoint load_sharded_safetensors(const std::string& index_path, const ReadOptions& options) {
  const std::string hint = " Download the index and all its shards again";
  std::string text = read_small_file(index_path, 64u << 20);
  json index;
  try {
    index = json::parse(text);
  } catch (const json::exception& e) {
    fail(index_path, std::string("not valid JSON (") + e.what() + ")." + hint);
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    fail(index_path, "no \"weight_map\" object: not a safetensors index." + hint);
  }
  // shard file -> keys the index assigns to it
  std::map<std::string, std::set<std::string>> shards;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    if (!it.value().is_string()) fail(index_path, "weight_map[\"" + it.key() + "\"] is not a file name." + hint);
    std::string shard = it.value().get<std::string>();
    if (shard.empty() || shard.find('/') != std::string::npos || shard.find('\\') != std::string::npos ||
        shard == "." || shard == "..") {
      fail(index_path, "weight_map[\"" + it.key() + "\"] = \"" + shard +
                           "\" is not a plain file name beside the index (paths are refused)." + hint);
    }
    shards[shard].insert(it.key());
  }
  if (shards.empty()) fail(index_path, "weight_map is empty." + hint);
  const std::string dir = dirname_of(index_path);
  for (const auto& s : shards) {  // every shard present before mapping any
    const std::string p = dir + "/" + s.first;
    if (::access(p.c_str(), R_OK) != 0) {
      fail(p, "shard named in " + index_path + " is missing or unreadable." + hint);
    }
  }
  Checkpoint out;
  for (const auto& s : shards) {
    const std::string p = dir + "/" + s.first;
    Checkpoint part = load_safetensors(p, options);
    for (const auto& kv : part.tensors) {
      auto prev = out.source.find(kv.first);
      if (prev != out.source.end()) {
        fail(p, "tensor \"" + kv.first + "\" is also in " + prev->second + " (duplicate key across shards)." + hint);
      }
      if (!s.second.count(kv.first)) {
        fail(p, "tensor \"" + kv.first + "\" is in this shard but " + index_path + " does not list it here." + hint);
      }
    }
    for (const auto& key : s.second) {
      if (!part.tensors.count(key)) {
        fail(p, "tensor \"" + key + "\" is listed for this shard in " + index_path + " but not in it." + hint);
      }
    }
    for (auto& kv : part.tensors) out.tensors[kv.first] = std::move(kv.second);
    for (auto& kv : part.source) out.source[kv.first] = std::move(kv.second);
    for (auto& kv : part.metadata) out.metadata[kv.first] = std::move(kv.second);
    out.files.push_back(p);
    out.copied_tensors += part.copied_tensors;
  }
  return out;
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::vector<at::Tensor> data;
  for (const auto& kv : tensors) {
    auto name = safetensors_dtype_name(kv.second.scalar_type());
    if (!name) {
      throw WeightsError(path, "tensor \"" + kv.first + "\" has dtype " +
                                   std::string(c10::toString(kv.second.scalar_type())) +
                                   ", which safetensors cannot store");
    }
    at::Tensor t = kv.second.to(at::kCPU).contiguous();
    uint64_t n = t.nbytes();
    header[kv.first] = {{"dtype", *name}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + n}}};
    offset += n;
    data.push_back(std::move(t));
  }
  std::string h = header.dump();
  h.append((8 - h.size() % 8) % 8, ' ');
  // Written beside and renamed over: a mapping of the old file (tensors that view it) stays valid.
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw WeightsError(path, std::string("cannot create: ") + std::strerror(errno));
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(h.size()) >> (8 * i));
  int err = 0;  // the first failure's errno, named in the error (ENOSPC: the disk is full)
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(h.data(), 1, h.size(), f) == h.size();
  if (!ok) err = errno;
  for (const auto& t : data) {
    if (!ok) break;
    ok = t.nbytes() == 0 || std::fwrite(t.data_ptr(), 1, t.nbytes(), f) == t.nbytes();
    if (!ok) err = errno;
  }
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (ok && std::rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    std::remove(tmp.c_str());
    throw WeightsError(path, std::string("write failed: ") + (err ? std::strerror(err) : "unknown error"));
  }
}

}  // namespace liveavatar::weights
