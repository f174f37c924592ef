// A read-only file mapping shared by the tensors that view it.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace liveavatar::weights::detail {

/// A whole file mapped MAP_PRIVATE (writes copy the touched pages, never reach the file). Immutable after open;
/// kept alive by every tensor that views it.
class MappedFile {
 public:
  /// Maps `path`; throws WeightsError for a missing, unreadable, empty or non-regular file.
  static std::shared_ptr<MappedFile> open(const std::string& path, bool populate);
  /// Wraps a copy of memory bytes (for load_pth_from_memory and fuzzing); `name` is used in errors.
  static std::shared_ptr<MappedFile> from_memory(const void* data, size_t size, const std::string& name);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  /// A file mapping (false: a copy of memory bytes).
  bool mapped() const { return mapped_; }

 private:
  MappedFile() = default;
  uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  bool mapped_ = false;
  std::vector<uint8_t> owned_;
  std::string path_;
};

/// A tensor over bytes [offset, offset + nbytes) of `file`: a view when the address suits the dtype's alignment,
/// otherwise a copy (`*copied` is set). Bounds are the caller's job (checked before this is called).
at::Tensor tensor_from_mapping(const std::shared_ptr<MappedFile>& file, uint64_t offset,
                               const std::vector<int64_t>& shape, at::ScalarType dtype, bool* copied);

/// "[2, 3]"
std::string shape_string(const std::vector<int64_t>& shape);
/// "BF16" (safetensors spelling) or ATen's name when the format has none.
std::string dtype_string(at::ScalarType type);

/// n * m, or false on uint64 overflow.
inline bool mul_overflow(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace liveavatar::weights::detail
