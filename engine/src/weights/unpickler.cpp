// The restricted unpickler of torch.save's data.pkl (see unpickler.h).
//
// Why not LibTorch's torch::jit::pickle_load / Unpickler: in LibTorch 2.11 it cannot read an OrderedDict state dict
// (every torch.save(model.state_dict()); pytorch issue 100741, still open) and it trusts the file: a DICT with an
// odd item count reads past its stack, a storage's byte size is taken from the pickle rather than the record, tensor
// sizes/strides are not checked against their storage, and a memo index of 2^32 allocates 2^32 slots. Model files
// are untrusted input, so this file validates every opcode and every tensor extent itself.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "unpickler.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <sstream>
#include <unordered_map>

#include "mapped_file.h"

namespace liveavatar::weights::detail {

namespace {
[[noreturn]] void fail(const std::string& file, const std::string& message) { throw WeightsError(file, message); }
}  // namespace

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

namespace {

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

}  // namespace

void unpickle_state_dict(const uint8_t* p, size_t n, const std::string& file, const StorageLoader& load_storage,
                         Checkpoint& out) {
  Ref root;
  {
    Unpickler u(p, n, file, load_storage);
    root = u.run();
    if (root->kind != Node::kDict) {
      fail(file, "holds a " + std::string(kind_name(root->kind)) + ", not a state dict (a dict of tensors)");
    }
    std::set<const Node*> path;
    flatten(root, "", 0, path, out, file);
  }  // the unpickler breaks any reference cycle here
}

}  // namespace liveavatar::weights::detail
