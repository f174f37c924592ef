// PyTorch .pth reader: a torch.save archive (ZIP, zip_reader.h) whose data.pkl (unpickler.h) is a tensor state
// dict; the tensors view the mapped file (or are copied once when a record is not aligned for its dtype).
// The writer is pth_writer.cpp. SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>

#include "mapped_file.h"
#include "unpickler.h"
#include "weights/weights.h"
#include "zip_reader.h"

namespace liveavatar::weights {

using detail::MappedFile;
using detail::Node;
using detail::Ref;
using detail::ZipReader;
using detail::ZipRecord;

namespace {

[[noreturn]] void fail(const std::string& file, const std::string& message) { throw WeightsError(file, message); }

Checkpoint read_pth(const std::shared_ptr<MappedFile>& mapped, const std::string& file) {
  const uint8_t* d = mapped->data();
  uint64_t n = mapped->size();
  if (n >= 2 && d[0] == 0x80) {
    fail(file, "legacy torch.save format (before PyTorch 1.6, or _use_new_zipfile_serialization=False) is not "
               "supported. Re-save it with a current torch: torch.save(torch.load(path), path)");
  }
  if (n < 4 || d[0] != 'P' || d[1] != 'K') {
    fail(file, "not a PyTorch checkpoint (no zip signature). Check the file name; download it again");
  }
  ZipReader zip(d, n, file);
  std::string prefix;
  for (const auto& r : zip.records()) {
    const std::string& name = r.first;
    auto slash = name.find('/');
    if (slash != std::string::npos && name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      if (!prefix.empty()) fail(file, "holds more than one data.pkl: not a single torch.save archive");
      prefix = name.substr(0, slash + 1);
    }
  }
  if (prefix.empty()) fail(file, "zip archive without <name>/data.pkl: not written by torch.save");
  if (zip.records().count(prefix + "constants.pkl") || zip.records().count(prefix + "code/")) {
    fail(file, "this is a TorchScript module archive, not a state dict. Save model.state_dict() instead");
  }
  auto bo = zip.records().find(prefix + "byteorder");
  if (bo != zip.records().end() &&
      std::string(reinterpret_cast<const char*>(d + bo->second.offset), bo->second.size) != "little") {
    fail(file, "big-endian archive: re-save it on a little-endian machine");
  }
  const ZipRecord& pkl = zip.records().at(prefix + "data.pkl");
#ifndef LIVEAVATAR_FUZZING  // the fuzzer mutates data.pkl directly; the CRC would reject nearly every mutation
  if (detail::crc32(d + pkl.offset, static_cast<size_t>(pkl.size)) != pkl.crc) {
    fail(file, "data.pkl fails its CRC check: the file is damaged. Download it again");
  }
#endif
  Checkpoint out;
  std::map<std::string, Ref> storages;
  auto load_storage = [&](const std::string& key, at::ScalarType dtype, int64_t numel) -> Ref {
    auto it = storages.find(key);
    if (it != storages.end()) {
      if (it->second->dtype != dtype) fail(file, "storage \"" + key + "\" is used with two dtypes");
      return it->second;
    }
    auto rec = zip.records().find(prefix + "data/" + key);
    if (rec == zip.records().end()) fail(file, "tensor data record \"data/" + key + "\" is missing (truncated?)");
    uint64_t item = c10::elementSize(dtype), need = 0;
    if (detail::mul_overflow(static_cast<uint64_t>(numel), item, &need) || need > rec->second.size) {
      fail(file, "storage \"" + key + "\" claims " + std::to_string(numel) + " elements but its record holds " +
                     std::to_string(rec->second.size) + " bytes (truncated?)");
    }
    auto r = std::make_shared<Node>();
    r->kind = Node::kStorage;
    r->dtype = dtype;
    bool copied = false;
    r->tensor = detail::tensor_from_mapping(mapped, rec->second.offset, {numel}, dtype, &copied);
    if (dtype == at::kBool) {
      const uint8_t* b = d + rec->second.offset;
      for (int64_t j = 0; j < numel; ++j)
        if (b[j] > 1) fail(file, "storage \"" + key + "\" has a BOOL byte that is not 0 or 1");
    }
    if (copied) ++out.copied_tensors;
    storages[key] = r;
    return r;
  };
  detail::unpickle_state_dict(d + pkl.offset, static_cast<size_t>(pkl.size), file, load_storage, out);
  out.files.push_back(file);
  return out;
}

}  // namespace

Checkpoint load_pth(const std::string& path, const ReadOptions& options) {
  return read_pth(MappedFile::open(path, options.populate), path);
}

Checkpoint load_pth_from_memory(const void* data, size_t size, const std::string& name) {
  return read_pth(MappedFile::from_memory(data, size, name), name);
}

}  // namespace liveavatar::weights
