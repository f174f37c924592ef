// libFuzzer target: the .pth reader (zip directory, restricted unpickler, tensor extents) on arbitrary bytes.
// Input starting with "PK" is a whole file; anything else is taken as data.pkl and wrapped in a torch.save archive
// with records data/0 (24 bytes) and data/1 (4 bytes), so mutations reach the unpickler directly. Every tensor
// returned is read completely, so a view outside its storage is caught by AddressSanitizer. Built with
// -DLIVEAVATAR_FUZZING (no data.pkl CRC check).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <caffe2/serialize/inline_container.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "weights/weights.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<char> archive;
  if (!(size >= 2 && data[0] == 'P' && data[1] == 'K')) {
    caffe2::serialize::PyTorchStreamWriter w([&](const void* p, size_t n) -> size_t {
      archive.insert(archive.end(), static_cast<const char*>(p), static_cast<const char*>(p) + n);
      return n;
    });
    static const float record0[6] = {0, 1, 2, 3, 4, 5};
    static const uint8_t record1[4] = {0x80, 0x3f, 0x00, 0x40};
    w.writeRecord("data.pkl", data, size);
    w.writeRecord("data/0", record0, sizeof record0);
    w.writeRecord("data/1", record1, sizeof record1);
    w.writeEndOfFile();
    data = reinterpret_cast<const uint8_t*>(archive.data());
    size = archive.size();
  }
  try {
    auto ck = liveavatar::weights::load_pth_from_memory(data, size, "fuzz.pth");
    for (const auto& kv : ck.tensors) {
      at::Tensor t = kv.second.contiguous();  // touches every element the view can reach
      volatile uint8_t sink = 0;
      const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
      for (size_t i = 0; i < t.nbytes(); ++i) sink ^= p[i];
      (void)sink;
    }
  } catch (const liveavatar::weights::WeightsError&) {
  }
  return 0;
}
