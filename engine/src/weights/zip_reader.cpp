// The ZIP container of a torch.save archive (see zip_reader.h). SPDX-License-Identifier: LGPL-2.1-or-later
#include "zip_reader.h"

#include "weights/weights.h"

namespace liveavatar::weights::detail {

namespace {
[[noreturn]] void fail(const std::string& file, const std::string& message) { throw WeightsError(file, message); }
}  // namespace

uint32_t crc32(const uint8_t* p, size_t n) {
  static uint32_t table[256];
  static bool init = [] {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    return true;
  }();
  (void)init;
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

void ZipReader::bad(const std::string& what) const {
  fail(file_, "damaged zip archive: " + what + ". Download the file again");
}
uint64_t ZipReader::le(uint64_t at, int bytes) const {
  if (at > n_ || static_cast<uint64_t>(bytes) > n_ - at) bad("a structure runs past the end of the file (truncated?)");
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | d_[at + i];
  return v;
}

void ZipReader::parse() {
  if (n_ < 22) bad("shorter than a zip end record");
  // End of central directory: the last signature within the final 64 KiB + 22 bytes.
  uint64_t eocd = UINT64_MAX;
  uint64_t lowest = n_ > 22 + 65535 ? n_ - 22 - 65535 : 0;
  for (uint64_t p = n_ - 22 + 1; p-- > lowest;) {
    if (le(p, 4) == 0x06054b50u) { eocd = p; break; }
  }
  if (eocd == UINT64_MAX) bad("no end-of-central-directory record (truncated?)");
  uint64_t entries = le(eocd + 10, 2), cd_size = le(eocd + 12, 4), cd_off = le(eocd + 16, 4);
  if (entries == 0xFFFF || cd_size == 0xFFFFFFFFu || cd_off == 0xFFFFFFFFu) {
    if (eocd < 20 || le(eocd - 20, 4) != 0x07064b50u) bad("ZIP64 locator missing");
    uint64_t z = le(eocd - 20 + 8, 8);
    if (le(z, 4) != 0x06064b50u) bad("ZIP64 end record missing");
    entries = le(z + 32, 8);
    cd_size = le(z + 40, 8);
    cd_off = le(z + 48, 8);
  }
  if (cd_off > n_ || cd_size > n_ - cd_off) bad("central directory out of bounds");
  if (entries > cd_size / 46) bad("entry count larger than the central directory");
  uint64_t p = cd_off;
  for (uint64_t i = 0; i < entries; ++i) {
    if (le(p, 4) != 0x02014b50u) bad("central directory entry signature");
    uint64_t flags = le(p + 8, 2), method = le(p + 10, 2), crc = le(p + 16, 4);
    uint64_t csize = le(p + 20, 4), usize = le(p + 24, 4);
    uint64_t nlen = le(p + 28, 2), elen = le(p + 30, 2), clen = le(p + 32, 2);
    uint64_t local = le(p + 42, 4);
    if (p + 46 + nlen > cd_off + cd_size) bad("entry name out of bounds");
    std::string name(reinterpret_cast<const char*>(d_ + p + 46), nlen);
    // ZIP64 extra field: the 0xFFFFFFFF fields, in order.
    uint64_t e = p + 46 + nlen, e_end = e + elen;
    if (e_end > cd_off + cd_size) bad("entry extra field out of bounds");
    while (e + 4 <= e_end) {
      uint64_t id = le(e, 2), len = le(e + 2, 2);
      if (e + 4 + len > e_end) bad("extra field length");
      if (id == 0x0001) {
        uint64_t q = e + 4, q_end = e + 4 + len;
        auto take = [&](uint64_t* field) {
          if (*field != 0xFFFFFFFFu) return;
          if (q + 8 > q_end) bad("ZIP64 extra field too short");
          *field = le(q, 8);
          q += 8;
        };
        take(&usize);
        take(&csize);
        take(&local);
      }
      e += 4 + len;
    }
    if (flags & 1) fail(file_, "record \"" + name + "\" is encrypted: not a torch.save file");
    if (method != 0 || csize != usize) {
      fail(file_, "record \"" + name + "\" is compressed (method " + std::to_string(method) +
                      "); torch.save stores records uncompressed. Re-save it with torch.save");
    }
    if (le(local, 4) != 0x04034b50u) bad("local header of \"" + name + "\"");
    uint64_t data = local + 30 + le(local + 26, 2) + le(local + 28, 2);
    if (data > n_ || usize > n_ - data) bad("record \"" + name + "\" runs past the end of the file (truncated?)");
    if (!records_.emplace(name, ZipRecord{data, usize, static_cast<uint32_t>(crc)}).second) {
      bad("record \"" + name + "\" appears twice");
    }
    p += 46 + nlen + elen + clen;
  }
}

}  // namespace liveavatar::weights::detail
