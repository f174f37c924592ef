// PyTorch .pth reader: an own ZIP directory parser (stored records, ZIP64) and a restricted unpickler that accepts
// exactly what torch.save writes for tensor state dicts (like torch.load(weights_only=True)).
//
// Why not LibTorch's torch::jit::pickle_load / Unpickler: in LibTorch 2.11 it cannot read an OrderedDict state dict
// (every torch.save(model.state_dict()); pytorch issue 100741, still open) and it trusts the file: a DICT with an
// odd item count reads past its stack, a storage's byte size is taken from the pickle rather than the record, tensor
// sizes/strides are not checked against their storage, and a memo index of 2^32 allocates 2^32 slots. Model files
// are untrusted input, so this file validates every opcode and every tensor extent itself.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <sstream>
#include <unordered_map>

#include "weights/weights.h"
#include "mapped_file.h"

namespace liveavatar::weights {

using detail::MappedFile;

namespace {

[[noreturn]] void fail(const std::string& file, const std::string& message) { throw WeightsError(file, message); }

// ---------------------------------------------------------------------------------------------------------------
// ZIP
// ---------------------------------------------------------------------------------------------------------------

struct ZipRecord {
  uint64_t offset = 0;  // of the data in the file
  uint64_t size = 0;
  uint32_t crc = 0;
};

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

class ZipReader {
 public:
  ZipReader(const uint8_t* data, uint64_t size, const std::string& file) : d_(data), n_(size), file_(file) { parse(); }
  const std::map<std::string, ZipRecord>& records() const { return records_; }

 private:
  const uint8_t* d_;
  uint64_t n_;
  std::string file_;
  std::map<std::string, ZipRecord> records_;

  [[noreturn]] void bad(const std::string& what) const {
    fail(file_, "damaged zip archive: " + what + ". Download the file again");
  }
  uint64_t le(uint64_t at, int bytes) const {
    if (at > n_ || static_cast<uint64_t>(bytes) > n_ - at) bad("a structure runs past the end of the file (truncated?)");
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | d_[at + i];
    return v;
  }

  void parse() {
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
};

// ---------------------------------------------------------------------------------------------------------------
// Restricted unpickler
// ---------------------------------------------------------------------------------------------------------------

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

const char* kind_name(Node::Kind k) {
  static const char* names[] = {"None", "bool", "int", "float", "str", "tuple", "list", "dict",
                                "class/function", "storage class", "storage", "tensor"};
  return names[k];
}

std::optional<at::ScalarType> storage_dtype(const std::string& cls) {
  static const at::ScalarType types[] = {
      at::kDouble, at::kFloat, at::kHalf, at::kBFloat16, at::kLong, at::kInt, at::kShort, at::kChar, at::kByte,
      at::kBool, at::kComplexFloat, at::kComplexDouble, at::kFloat8_e4m3fn, at::kFloat8_e5m2,
      at::kFloat8_e4m3fnuz, at::kFloat8_e5m2fnuz, at::kFloat8_e8m0fnu, at::kUInt16, at::kUInt32, at::kUInt64};
  for (auto t : types)
    if (cls == std::string(c10::toString(t)) + "Storage") return t;
  return std::nullopt;
}

class Unpickler {
 public:
  Unpickler(const uint8_t* p, size_t n, std::string file, std::function<Ref(const std::string&, at::ScalarType, int64_t)>
                                                               storage)
      : p_(p), n_(n), file_(std::move(file)), load_storage_(std::move(storage)) {}

  ~Unpickler() {
    // Break reference cycles a hostile pickle may have built (a list appended to itself).
    for (auto& c : containers_) c->items.clear();
  }

  Ref run() {
    while (true) {
      if (pos_ >= n_) bad("ends without STOP (truncated)");
      size_t at = pos_;
      uint8_t op = p_[pos_++];
      if (op == '.') break;
      step(op, at);
    }
    if (stack_.size() != 1 || !marks_.empty()) bad("leaves " + std::to_string(stack_.size()) + " values on the stack");
    return stack_.back();
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  std::string file_;
  std::function<Ref(const std::string&, at::ScalarType, int64_t)> load_storage_;
  std::vector<Ref> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Ref> memo_;
  std::vector<Ref> containers_;

  static constexpr size_t kMaxStack = 1u << 20;

  [[noreturn]] void bad(const std::string& what) const {
    fail(file_, "data.pkl " + what + " (at byte " + std::to_string(pos_) + "). The file is damaged or is not a "
                "tensor state dict written by torch.save: re-save it with torch.save(model.state_dict(), path)");
  }
  [[noreturn]] void refuse(const std::string& what) const {
    fail(file_, "data.pkl " + what + ": only tensors, dicts, lists, tuples, strings, numbers, bools and None are "
                "accepted (no other Python objects are ever constructed). Re-save a plain state dict with "
                "torch.save(model.state_dict(), path)");
  }

  const uint8_t* take(size_t k) {
    if (k > n_ - pos_) bad("is truncated");
    const uint8_t* q = p_ + pos_;
    pos_ += k;
    return q;
  }
  uint64_t le(int k) {
    const uint8_t* q = take(static_cast<size_t>(k));
    uint64_t v = 0;
    for (int j = k - 1; j >= 0; --j) v = (v << 8) | q[j];
    return v;
  }
  std::string line() {
    const void* nl = std::memchr(p_ + pos_, '\n', n_ - pos_);
    if (!nl) bad("has an unterminated GLOBAL");
    size_t len = static_cast<const uint8_t*>(nl) - (p_ + pos_);
    std::string s(reinterpret_cast<const char*>(take(len)), len);
    pos_ += 1;
    return s;
  }
  Ref make(Node::Kind k) {
    auto r = std::make_shared<Node>();
    r->kind = k;
    if (k == Node::kTuple || k == Node::kList || k == Node::kDict) containers_.push_back(r);
    return r;
  }
  void push(Ref r) {
    if (stack_.size() >= kMaxStack) bad("stack grows beyond " + std::to_string(kMaxStack));
    stack_.push_back(std::move(r));
  }
  Ref pop() {
    if (stack_.size() <= (marks_.empty() ? 0 : marks_.back())) bad("pops an empty stack");
    Ref r = std::move(stack_.back());
    stack_.pop_back();
    return r;
  }
  Ref& top() {
    if (stack_.size() <= (marks_.empty() ? 0 : marks_.back())) bad("reads an empty stack");
    return stack_.back();
  }
  std::vector<Ref> pop_mark() {
    if (marks_.empty()) bad("has no MARK where one is needed");
    size_t m = marks_.back();
    marks_.pop_back();
    std::vector<Ref> items(std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(m)),
                           std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }
  Ref& container(Node::Kind k, const char* op) {
    Ref& c = top();
    if (c->kind != k) bad(std::string(op) + " applies to a " + kind_name(c->kind) + ", not a " + kind_name(k));
    return c;
  }
  void dict_insert(Node& d, Ref k, Ref v) {
    if (k->kind != Node::kStr && k->kind != Node::kInt) refuse("has a dict key of type " + std::string(kind_name(k->kind)));
    d.items.push_back(std::move(k));
    d.items.push_back(std::move(v));
  }
  Ref str(std::string s) {
    Ref r = make(Node::kStr);
    r->s = std::move(s);
    return r;
  }
  Ref integer(int64_t v) {
    Ref r = make(Node::kInt);
    r->i = v;
    return r;
  }
  void memo_put(uint64_t id) {
    if (memo_.size() >= kMaxStack && !memo_.count(id)) bad("memo grows beyond " + std::to_string(kMaxStack));
    memo_[id] = top();
  }
  Ref memo_get(uint64_t id) {
    auto it = memo_.find(id);
    if (it == memo_.end()) bad("reads memo entry " + std::to_string(id) + " that was never written");
    return it->second;
  }
  Ref global(const std::string& module, const std::string& name) {
    const std::string full = module + "." + name;
    if (module == "torch") {
      if (auto t = storage_dtype(name)) {
        Ref r = make(Node::kStorageType);
        r->dtype = *t;
        r->s = full;
        return r;
      }
    }
    if (full == "collections.OrderedDict" || full == "torch._utils._rebuild_tensor_v2" ||
        full == "torch._utils._rebuild_parameter") {
      Ref r = make(Node::kGlobal);
      r->s = full;
      return r;
    }
    refuse("references the Python global \"" + full + "\"");
  }

  static bool is_int_tuple(const Ref& r) {
    if (r->kind != Node::kTuple) return false;
    for (const auto& x : r->items)
      if (x->kind != Node::kInt) return false;
    return true;
  }

  Ref rebuild_tensor(const std::vector<Ref>& a) {
    if (a.size() < 6 || a.size() > 7 || a[0]->kind != Node::kStorage || a[1]->kind != Node::kInt ||
        !is_int_tuple(a[2]) || !is_int_tuple(a[3]) || a[2]->items.size() != a[3]->items.size() ||
        a[4]->kind != Node::kBool) {
      bad("calls _rebuild_tensor_v2 with arguments that are not (storage, offset, size, stride, requires_grad, hooks)");
    }
    if (a.size() == 7 && !(a[6]->kind == Node::kDict && a[6]->items.empty()) && a[6]->kind != Node::kNone) {
      refuse("has a tensor with extra metadata (conjugate/negative bits)");
    }
    const Node& st = *a[0];
    int64_t offset = a[1]->i;
    std::vector<int64_t> size, stride;
    for (const auto& x : a[2]->items) size.push_back(x->i);
    for (const auto& x : a[3]->items) stride.push_back(x->i);
    if (size.size() > 64) bad("has a tensor of rank " + std::to_string(size.size()));
    // Every element the view can reach must lie inside the storage.
    uint64_t storage_numel = static_cast<uint64_t>(st.tensor.numel());
    if (offset < 0) bad("has a negative storage offset");
    uint64_t last = static_cast<uint64_t>(offset), numel = 1;
    for (size_t d = 0; d < size.size(); ++d) {
      if (size[d] < 0 || stride[d] < 0) bad("has a negative size or stride");
      if (detail::mul_overflow(numel, static_cast<uint64_t>(size[d]), &numel)) bad("has a tensor size that overflows");
      if (size[d] == 0) continue;
      uint64_t span = 0;
      if (detail::mul_overflow(static_cast<uint64_t>(size[d] - 1), static_cast<uint64_t>(stride[d]), &span) ||
          __builtin_add_overflow(last, span, &last)) {
        bad("has a tensor extent that overflows");
      }
    }
    if (numel > 0 && last >= storage_numel) {
      bad("has a tensor of size " + detail::shape_string(size) + " reaching element " + std::to_string(last) +
          " of a storage of " + std::to_string(storage_numel) + " elements");
    }
    if (numel == 0 && static_cast<uint64_t>(offset) > storage_numel) bad("has a storage offset out of bounds");
    Ref r = make(Node::kTensor);
    r->tensor = st.tensor.as_strided(size, stride, offset);
    return r;
  }

  void reduce() {
    Ref args = pop();
    Ref fn = pop();
    if (fn->kind != Node::kGlobal) refuse("calls a " + std::string(kind_name(fn->kind)));
    if (args->kind != Node::kTuple) bad("REDUCE arguments are not a tuple");
    if (fn->s == "collections.OrderedDict") {
      if (!args->items.empty()) bad("builds an OrderedDict from arguments");
      push(make(Node::kDict));
    } else if (fn->s == "torch._utils._rebuild_tensor_v2") {
      push(rebuild_tensor(args->items));
    } else {  // torch._utils._rebuild_parameter(data, requires_grad, backward_hooks)
      if (args->items.size() != 3 || args->items[0]->kind != Node::kTensor) bad("bad _rebuild_parameter arguments");
      push(args->items[0]);
    }
  }

  void persistent_load() {
    Ref pid = pop();
    const auto& a = pid->items;
    if (pid->kind != Node::kTuple || a.size() != 5 || a[0]->kind != Node::kStr || a[0]->s != "storage" ||
        a[1]->kind != Node::kStorageType || a[2]->kind != Node::kStr || a[3]->kind != Node::kStr ||
        a[4]->kind != Node::kInt || a[4]->i < 0) {
      bad("has a persistent id that is not ('storage', <type>, key, location, numel)");
    }
    push(load_storage_(a[2]->s, a[1]->dtype, a[4]->i));
  }

  void step(uint8_t op, size_t at) {
    switch (op) {
      case 0x80: {  // PROTO
        uint64_t v = le(1);
        if (at != 0 || v < 2 || v > 5) bad("has protocol " + std::to_string(v) + " (2..5 accepted)");
        break;
      }
      case 0x95: le(8); break;  // FRAME: a hint only
      case '(': marks_.push_back(stack_.size()); break;
      case '0': pop(); break;
      case '1': pop_mark(); break;
      case '2': push(top()); break;
      case 'N': push(make(Node::kNone)); break;
      case 0x88: case 0x89: { Ref r = make(Node::kBool); r->b = op == 0x88; push(r); break; }
      case 'K': push(integer(static_cast<int64_t>(le(1)))); break;
      case 'M': push(integer(static_cast<int64_t>(le(2)))); break;
      case 'J': push(integer(static_cast<int32_t>(static_cast<uint32_t>(le(4))))); break;
      case 0x8a: case 0x8b: {  // LONG1 / LONG4: little-endian two's complement
        uint64_t k = le(op == 0x8a ? 1 : 4);
        if (k > 8) bad("has an integer wider than 64 bits");
        uint64_t v = k ? le(static_cast<int>(k)) : 0;
        if (k > 0 && k < 8 && (v >> (8 * k - 1)) & 1) v |= ~uint64_t(0) << (8 * k);  // sign-extend
        push(integer(static_cast<int64_t>(v)));
        break;
      }
      case 'G': {
        uint64_t bits = 0;
        const uint8_t* q = take(8);
        for (int j = 0; j < 8; ++j) bits = (bits << 8) | q[j];  // big endian
        Ref r = make(Node::kFloat);
        std::memcpy(&r->f, &bits, 8);
        push(r);
        break;
      }
      case 'X': case 0x8c: case 0x8d: case 'T': case 'U': case 'B': case 'C': case 0x8e: {
        int w = (op == 0x8c || op == 'U' || op == 'C') ? 1 : (op == 0x8d || op == 0x8e) ? 8 : 4;
        uint64_t len = le(w);
        if (len > n_ - pos_) bad("has a string longer than the file");
        push(str(std::string(reinterpret_cast<const char*>(take(static_cast<size_t>(len))), static_cast<size_t>(len))));
        break;
      }
      case ')': push(make(Node::kTuple)); break;
      case 't': { Ref r = make(Node::kTuple); r->items = pop_mark(); push(r); break; }
      case 0x85: case 0x86: case 0x87: {
        size_t k = op - 0x84u;
        Ref r = make(Node::kTuple);
        r->items.resize(k);
        for (size_t j = k; j-- > 0;) r->items[j] = pop();
        push(r);
        break;
      }
      case ']': push(make(Node::kList)); break;
      case 'l': { Ref r = make(Node::kList); r->items = pop_mark(); push(r); break; }
      case 'a': { Ref v = pop(); container(Node::kList, "APPEND")->items.push_back(v); break; }
      case 'e': {
        auto items = pop_mark();
        auto& l = container(Node::kList, "APPENDS")->items;
        l.insert(l.end(), items.begin(), items.end());
        break;
      }
      case '}': push(make(Node::kDict)); break;
      case 'd': {
        auto items = pop_mark();
        if (items.size() % 2) bad("has a DICT with an odd number of items");
        Ref r = make(Node::kDict);
        for (size_t j = 0; j < items.size(); j += 2) dict_insert(*r, items[j], items[j + 1]);
        push(r);
        break;
      }
      case 's': {
        Ref v = pop();
        Ref k = pop();
        dict_insert(*container(Node::kDict, "SETITEM"), k, v);
        break;
      }
      case 'u': {
        auto items = pop_mark();
        if (items.size() % 2) bad("has a SETITEMS with an odd number of items");
        Node& d = *container(Node::kDict, "SETITEMS");
        for (size_t j = 0; j < items.size(); j += 2) dict_insert(d, items[j], items[j + 1]);
        break;
      }
      case 'q': memo_put(le(1)); break;
      case 'r': memo_put(le(4)); break;
      case 0x94: memo_put(memo_.size()); break;
      case 'h': push(memo_get(le(1))); break;
      case 'j': push(memo_get(le(4))); break;
      case 'c': {
        std::string module = line();
        std::string name = line();
        push(global(module, name));
        break;
      }
      case 0x93: {  // STACK_GLOBAL
        Ref name = pop();
        Ref module = pop();
        if (name->kind != Node::kStr || module->kind != Node::kStr) bad("has a STACK_GLOBAL without names");
        push(global(module->s, name->s));
        break;
      }
      case 'R': reduce(); break;
      case 'b': {  // BUILD: only OrderedDict's state (the state dict's _metadata attribute), which is dropped
        Ref state = pop();
        Ref& obj = top();
        if (obj->kind != Node::kDict || (state->kind != Node::kDict && state->kind != Node::kNone &&
                                         state->kind != Node::kTuple)) {
          refuse("sets the state of a " + std::string(kind_name(obj->kind)));
        }
        break;
      }
      case 'Q': persistent_load(); break;
      default: {
        std::ostringstream s;
        s << "has opcode 0x" << std::hex << int(op) << std::dec << " at byte " << at
          << " that a tensor state dict never uses";
        refuse(s.str());
      }
    }
  }
};

void flatten(const Ref& node, const std::string& key, int depth, std::set<const Node*>& path, Checkpoint& out,
             const std::string& file) {
  if (depth > 64) fail(file, "data.pkl nests containers deeper than 64 levels: not a state dict");
  auto put_meta = [&](const std::string& text) {
    if (out.tensors.count(key) || !out.metadata.emplace(key, text).second) {
      fail(file, "data.pkl has the key \"" + key + "\" twice after flattening nested dicts");
    }
  };
  switch (node->kind) {
    case Node::kTensor:
      if (out.metadata.count(key) || !out.tensors.emplace(key, node->tensor).second) {
        fail(file, "data.pkl has the key \"" + key + "\" twice after flattening nested dicts");
      }
      out.source[key] = file;
      return;
    case Node::kNone: put_meta("None"); return;
    case Node::kBool: put_meta(node->b ? "True" : "False"); return;
    case Node::kInt: put_meta(std::to_string(node->i)); return;
    case Node::kFloat: { std::ostringstream s; s << node->f; put_meta(s.str()); return; }
    case Node::kStr: put_meta(node->s); return;
    case Node::kTuple: case Node::kList: case Node::kDict: {
      if (!path.insert(node.get()).second) fail(file, "data.pkl has a container that contains itself");
      const std::string prefix = key.empty() ? "" : key + ".";
      if (node->kind == Node::kDict) {
        for (size_t j = 0; j < node->items.size(); j += 2) {
          const Ref& k = node->items[j];
          std::string ks = k->kind == Node::kStr ? k->s : std::to_string(k->i);
          flatten(node->items[j + 1], prefix + ks, depth + 1, path, out, file);
        }
      } else {
        for (size_t j = 0; j < node->items.size(); ++j) {
          flatten(node->items[j], prefix + std::to_string(j), depth + 1, path, out, file);
        }
      }
      path.erase(node.get());
      return;
    }
    default:
      fail(file, "data.pkl holds a bare " + std::string(kind_name(node->kind)) + " at \"" + key +
                     "\": only tensors, containers and plain values are accepted");
  }
}

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
  if (crc32(d + pkl.offset, static_cast<size_t>(pkl.size)) != pkl.crc) {
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
  Ref root;
  {
    Unpickler u(d + pkl.offset, static_cast<size_t>(pkl.size), file, load_storage);
    root = u.run();
    if (root->kind != Node::kDict) {
      fail(file, "holds a " + std::string(kind_name(root->kind)) + ", not a state dict (a dict of tensors)");
    }
    std::set<const Node*> path;
    flatten(root, "", 0, path, out, file);
  }  // the unpickler breaks any reference cycle here
  out.files.push_back(file);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Writer: the pickle torch.save emits for an OrderedDict of tensors (protocol 2)
// ---------------------------------------------------------------------------------------------------------------

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

Checkpoint load_pth(const std::string& path, const ReadOptions& options) {
  return read_pth(MappedFile::open(path, options.populate), path);
}

Checkpoint load_pth_from_memory(const void* data, size_t size, const std::string& name) {
  return read_pth(MappedFile::from_memory(data, size, name), name);
}

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
