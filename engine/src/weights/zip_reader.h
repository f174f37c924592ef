// The ZIP container of a torch.save archive: an own central-directory parser (stored records only, ZIP64) that
// checks every offset and size against the file. Internal to the weights library (pth.cpp, the fuzzers).
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>

namespace liveavatar::weights::detail {

struct ZipRecord {
  uint64_t offset = 0;  // of the data in the file
  uint64_t size = 0;
  uint32_t crc = 0;
};

/// CRC-32 (the ZIP polynomial) of n bytes.
uint32_t crc32(const uint8_t* p, size_t n);

/// The records of a ZIP archive held in memory. Throws WeightsError naming `file` on any damage, an encrypted or a
/// compressed record (torch.save stores), or a duplicate name.
class ZipReader {
 public:
  ZipReader(const uint8_t* data, uint64_t size, const std::string& file) : d_(data), n_(size), file_(file) { parse(); }
  const std::map<std::string, ZipRecord>& records() const { return records_; }

 private:
  const uint8_t* d_;
  uint64_t n_;
  std::string file_;
  std::map<std::string, ZipRecord> records_;

  [[noreturn]] void bad(const std::string& what) const;
  uint64_t le(uint64_t at, int bytes) const;  // little-endian field of `bytes` bytes at `at`, bounds-checked
  void parse();
};

}  // namespace liveavatar::weights::detail
