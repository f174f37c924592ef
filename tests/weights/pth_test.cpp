// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <caffe2/serialize/inline_container.h>

#include "test_util.h"

using namespace liveavatar::weights;
using wt::expect_error;

namespace {

std::string unhex(const std::string& h) {
  std::string out;
  for (size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(static_cast<char>(std::stoi(h.substr(i, 2), nullptr, 16)));
  return out;
}

// What CPython's pickle writes for torch.save(sd) where sd = model.state_dict()-like OrderedDict
// {"a": float32 [2, 3] (storage "0"), "b": bfloat16 [2] (storage "1")} with a `_metadata` attribute. Generated with
// the standard pickle module (stand-in classes named torch.FloatStorage etc. and persistent_id as torch.save does),
// protocol 2 (torch.save's default) and protocol 4.
const std::string kStateDictP2 = unhex(
    "800263636f6c6c656374696f6e730a4f726465726564446963740a71002952710128580100000061710263746f7263682e5f"
    "7574696c730a5f72656275696c645f74656e736f725f76320a71032828580700000073746f72616765710463746f7263680a"
    "466c6f617453746f726167650a71055801000000307106580300000063707571074b06747108514b004b024b038671094b03"
    "4b0186710a8968002952710b74710c52710d580100000062710e68032828680463746f7263680a42466c6f6174313653746f"
    "726167650a710f580100000031711068074b02747111514b004b028571124b0185711389680029527114747115527116757d"
    "711758090000005f6d657461646174617118680029527119285800000000711a7d711b580700000076657273696f6e711c4b"
    "01735803000000626c6b711d7d711e681c4b01737573622e");
const std::string kStateDictP4 = unhex(
    "8004950f010000000000008c0b636f6c6c656374696f6e73948c0b4f72646572656444696374949394295294288c0161948c"
    "0c746f7263682e5f7574696c73948c125f72656275696c645f74656e736f725f763294939428288c0773746f72616765948c"
    "05746f726368948c0c466c6f617453746f726167659493948c0130948c03637075944b067494514b004b024b0386944b034b"
    "018694896802295294749452948c01629468072828680868098c0f42466c6f6174313653746f726167659493948c01319468"
    "0d4b027494514b004b0285944b01859489680229529474945294757d948c095f6d65746164617461946802295294288c0094"
    "7d948c0776657273696f6e944b01738c03626c6b947d9468234b01737573622e");

// A torch.save-style zip (LibTorch's own writer, as torch.save uses) with `pkl` as data.pkl and the given records.
void write_archive(const std::string& path, const std::string& pkl,
                   const std::vector<std::pair<std::string, std::string>>& records) {
  caffe2::serialize::PyTorchStreamWriter w(path);
  w.writeRecord("data.pkl", pkl.data(), pkl.size());
  for (const auto& r : records) w.writeRecord(r.first, r.second.data(), r.second.size());
  w.writeEndOfFile();
}

std::string floats(std::initializer_list<float> v) {
  return std::string(reinterpret_cast<const char*>(v.begin()), v.size() * sizeof(float));
}

const std::string kRecord0 = floats({0, 1, 2, 3, 4, 5});
const std::string kRecord1 = std::string("\x80\x3f\x00\x40", 4);  // bf16 1.0, 2.0

// Pickle snippets for hand-made hostile files.
std::string P(const std::string& body) { return std::string("\x80\x02", 2) + body + "."; }
std::string S(const std::string& s) {  // BINUNICODE
  std::string out = "X";
  uint32_t n = static_cast<uint32_t>(s.size());
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(n >> (8 * i)));
  return out + s;
}
std::string K(int v) { return std::string("K") + static_cast<char>(v); }
// _rebuild_tensor_v2((storage, FloatStorage, key, cpu, numel), offset, size, stride, False, OrderedDict())
std::string tensor_pickle(const std::string& key, int numel, int offset, const std::string& size,
                          const std::string& stride) {
  return "ctorch._utils\n_rebuild_tensor_v2\n((" + S("storage") + "ctorch\nFloatStorage\n" + S(key) + S("cpu") +
         K(numel) + "tQ" + K(offset) + size + stride + "\x89" + "ccollections\nOrderedDict\n)Rt" + "R";
}

}  // namespace

TEST(Pth, ReadsPythonPickledOrderedDictStateDict) {
  wt::TempDir dir;
  for (const auto& pkl : {kStateDictP2, kStateDictP4}) {
    write_archive(dir.file("sd.pth"), pkl, {{"data/0", kRecord0}, {"data/1", kRecord1}});
    Checkpoint ck = load_pth(dir.file("sd.pth"));
    ASSERT_EQ(ck.tensors.size(), 2u);
    EXPECT_TRUE(at::equal(ck.tensors.at("a"), at::arange(6, at::kFloat).reshape({2, 3})));
    EXPECT_EQ(ck.tensors.at("b").scalar_type(), at::kBFloat16);
    EXPECT_EQ(ck.tensors.at("b")[1].item<float>(), 2.f);
    EXPECT_EQ(ck.copied_tensors, 0u);  // records are 64-byte aligned: views of the mapping
  }
}

TEST(Pth, SaveLoadRoundTripEveryDtype) {
  wt::TempDir dir;
  std::map<std::string, at::Tensor> in;
  at::Tensor base = at::arange(12, at::kFloat).reshape({3, 4}) - 5;
  for (auto t : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16, at::kFloat8_e4m3fn, at::kLong, at::kInt,
                 at::kShort, at::kChar, at::kByte}) {
    in[std::string("blocks.0.") + c10::toString(t)] = base.to(t);
  }
  in["mask"] = base > 0;
  in["big"] = at::arange(70000, at::kFloat);  // sizes beyond BININT2
  in["empty"] = at::zeros({0});
  save_pth(dir.file("Wan2.1_VAE.pth"), in);
  Checkpoint out = load_pth(dir.file("Wan2.1_VAE.pth"));
  ASSERT_EQ(out.tensors.size(), in.size());
  for (const auto& kv : in) {
    EXPECT_EQ(out.tensors.at(kv.first).scalar_type(), kv.second.scalar_type());
    EXPECT_TRUE(at::equal(out.tensors.at(kv.first).to(at::kDouble), kv.second.to(at::kDouble))) << kv.first;
  }
}

TEST(Pth, NestedDictsFlattenAndPrimitivesBecomeMetadata) {
  wt::TempDir dir;
  std::string pkl = P("}(" + S("model") + "}(" + S("w") + tensor_pickle("0", 6, 0, K(6) + "\x85", K(1) + "\x85") +
                      "u" + S("epoch") + K(3) + S("name") + S("x") + "u");
  write_archive(dir.file("c.pth"), pkl, {{"data/0", kRecord0}});
  Checkpoint ck = load_pth(dir.file("c.pth"));
  EXPECT_EQ(ck.tensors.count("model.w"), 1u);
  EXPECT_EQ(ck.metadata.at("epoch"), "3");
  EXPECT_EQ(ck.metadata.at("name"), "x");
}

TEST(PthBadInput, NonTensorObjectRejected) {
  wt::TempDir dir;
  write_archive(dir.file("evil.pth"), P("}" + S("a") + "cbuiltins\neval\n(" + S("1") + "tRs"), {});
  expect_error([&] { load_pth(dir.file("evil.pth")); }, {dir.file("evil.pth"), "builtins.eval"});
  write_archive(dir.file("cls.pth"), P("c__main__\nModel\n)R"), {});
  expect_error([&] { load_pth(dir.file("cls.pth")); }, {"__main__.Model"});
  write_archive(dir.file("np.pth"), P("}" + S("a") + "cnumpy.core.multiarray\nscalar\n)Rs"), {});
  expect_error([&] { load_pth(dir.file("np.pth")); }, {"numpy.core.multiarray.scalar"});
}

TEST(PthBadInput, TopLevelNotADict) {
  wt::TempDir dir;
  write_archive(dir.file("l.pth"), P("]"), {});
  expect_error([&] { load_pth(dir.file("l.pth")); }, {"not a state dict"});
}

TEST(PthBadInput, TensorBeyondItsStorage) {
  wt::TempDir dir;
  write_archive(dir.file("oob.pth"), P("}" + S("a") + tensor_pickle("0", 6, 2, K(5) + "\x85", K(1) + "\x85") + "s"),
                {{"data/0", kRecord0}});
  expect_error([&] { load_pth(dir.file("oob.pth")); }, {"reaching element 6", "6 elements"});
}

TEST(PthBadInput, StorageLargerThanItsRecord) {
  wt::TempDir dir;
  write_archive(dir.file("big.pth"), P("}" + S("a") + tensor_pickle("0", 60, 0, K(60) + "\x85", K(1) + "\x85") + "s"),
                {{"data/0", kRecord0}});
  expect_error([&] { load_pth(dir.file("big.pth")); }, {"claims 60 elements", "24 bytes"});
}

TEST(PthBadInput, MissingDataRecord) {
  wt::TempDir dir;
  write_archive(dir.file("m.pth"), P("}" + S("a") + tensor_pickle("7", 6, 0, K(6) + "\x85", K(1) + "\x85") + "s"),
                {{"data/0", kRecord0}});
  expect_error([&] { load_pth(dir.file("m.pth")); }, {"data/7", "missing"});
}

TEST(PthBadInput, MalformedPickles) {
  wt::TempDir dir;
  auto check = [&](const std::string& pkl, const std::string& expect) {
    write_archive(dir.file("p.pth"), pkl, {});
    expect_error([&] { load_pth(dir.file("p.pth")); }, {expect});
  };
  check(P("}(" + S("a") + "u"), "odd number");
  check(P("h\x05"), "never written");
  check(P(std::string("}q\0", 3) + S("a") + std::string("h\0s", 3)), "contains itself");
  check(std::string("\x80\x02}", 3), "without STOP");
  check(P("0"), "empty stack");
  check(P("}}"), "values on the stack");
  check(P("\x8a\x09"), "wider than 64 bits");
  check(P("}" + S("a") + "I1\ns"), "opcode 0x49");
}

TEST(PthBadInput, LegacyAndNonZipAndTruncated) {
  wt::TempDir dir;
  wt::write_bytes(dir.file("legacy.pth"), std::string("\x80\x02\x8a\x0a", 4) + "junk");
  expect_error([&] { load_pth(dir.file("legacy.pth")); }, {"legacy torch.save format"});
  wt::write_bytes(dir.file("text.pth"), "hello world, not a checkpoint");
  expect_error([&] { load_pth(dir.file("text.pth")); }, {"not a PyTorch checkpoint"});
  save_pth(dir.file("ok.pth"), {{"w", at::arange(4096, at::kFloat)}});
  std::string bytes = wt::read_bytes(dir.file("ok.pth"));
  wt::write_bytes(dir.file("cut.pth"), bytes.substr(0, bytes.size() / 2));
  expect_error([&] { load_pth(dir.file("cut.pth")); }, {dir.file("cut.pth"), "damaged zip archive"});
}

TEST(PthBadInput, CorruptedPickleFailsCrc) {
  wt::TempDir dir;
  save_pth(dir.file("ok.pth"), {{"w", at::arange(4, at::kFloat)}});
  std::string bytes = wt::read_bytes(dir.file("ok.pth"));
  auto pos = bytes.find("_rebuild_tensor_v2");
  ASSERT_NE(pos, std::string::npos);
  bytes[pos] = 'X';
  wt::write_bytes(dir.file("bad.pth"), bytes);
  expect_error([&] { load_pth(dir.file("bad.pth")); }, {"CRC"});
}

TEST(PthBadInput, FromMemoryNamesTheSource) {
  expect_error([&] { load_pth_from_memory("PK\x03\x04", 4, "buffer.pth"); }, {"buffer.pth"});
}
