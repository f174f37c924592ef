// The .pth writer: the pickle torch.save emits for an OrderedDict of tensors (protocol 2) in torch.save's ZIP
// layout (LibTorch's PyTorchStreamWriter), so torch.load and our reader both read it. SPDX-License-Identifier:
// LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <caffe2/serialize/inline_container.h>

#include <cstdio>
#include <string>
#include <vector>

#include "weights/weights.h"

namespace liveavatar::weights {

namespace {


class PickleWriter {
 public:
  std::string out;
  void op(uint8_t o) { out.push_back(static_cast<char>(o)); }
  void u32(uint32_t v) { for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(v >> (8 * i))); }
  void str(const std::string& s) { op('X'); u32(static_cast<uint32_t>(s.size())); out += s; }
  void integer(int64_t v) {
    if (v >= 0 && v < 256) { op('K'); op(static_cast<uint8_t>(v)); }
    else if (v >= 0 && v < 65536) { op('M'); op(v & 0xFF); op(static_cast<uint8_t>(v >> 8)); }
    else if (v >= INT32_MIN && v <= INT32_MAX) { op('J'); u32(static_cast<uint32_t>(v)); }
    else { op(0x8a); op(8); for (int i = 0; i < 8; ++i) op(static_cast<uint8_t>(static_cast<uint64_t>(v) >> (8 * i))); }
  }
  void global(const std::string& module, const std::string& name) { op('c'); out += module + "\n" + name + "\n"; }
  void int_tuple(at::IntArrayRef v) {
    if (v.empty()) { op(')'); return; }
    op('(');
    for (auto x : v) integer(x);
    op('t');
  }
};

}  // namespace

void save_pth(const std::string& path, const std::map<std::string, at::Tensor>& tensors) {
  PickleWriter w;
  w.op(0x80);
  w.op(2);
  w.global("collections", "OrderedDict");
  w.op(')');
  w.op('R');
  std::vector<at::Tensor> records;
  if (!tensors.empty()) {
    w.op('(');
    for (const auto& kv : tensors) {
      at::Tensor t = kv.second.to(at::kCPU).contiguous();
      w.str(kv.first);
      w.global("torch._utils", "_rebuild_tensor_v2");
      w.op('(');
      w.op('(');
      w.str("storage");
      w.global("torch", std::string(c10::toString(t.scalar_type())) + "Storage");
      w.str(std::to_string(records.size()));
      w.str("cpu");
      w.integer(t.numel());
      w.op('t');
      w.op('Q');
      w.integer(0);
      w.int_tuple(t.sizes());
      w.int_tuple(t.strides());
      w.op(0x89);
      w.global("collections", "OrderedDict");
      w.op(')');
      w.op('R');
      w.op('t');
      w.op('R');
      records.push_back(t);
    }
    w.op('u');
  }
  w.op('.');
  // Written beside and renamed over: a mapping of the old file (tensors that view it) stays valid. The archive
  // name inside the zip comes from the file name up to its first '.', as torch.save's writer does.
  const std::string tmp = path + ".tmp";
  try {
    caffe2::serialize::PyTorchStreamWriter writer(tmp);
    writer.writeRecord("data.pkl", w.out.data(), w.out.size());
    for (size_t i = 0; i < records.size(); ++i) {
      writer.writeRecord("data/" + std::to_string(i), records[i].data_ptr(), records[i].nbytes());
    }
    writer.writeEndOfFile();
  } catch (const c10::Error& e) {
    std::remove(tmp.c_str());
    throw WeightsError(path, std::string("cannot write: ") + e.what_without_backtrace());
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw WeightsError(path, "cannot rename the written file into place");
  }
}

}  // namespace liveavatar::weights
