// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>

#include "test_util.h"

using namespace liveavatar::weights;
using wt::expect_error;
using wt::safetensors_bytes;

namespace {

// 2 x F32 at [0, 8): a valid minimal file.
const std::string kData8 = std::string("\x00\x00\x80\x3f\x00\x00\x00\x40", 8);

Checkpoint load_text(const wt::TempDir& dir, const std::string& header, const std::string& data,
                     const std::string& name = "t.safetensors") {
  wt::write_bytes(dir.file(name), safetensors_bytes(header, data));
  return load_safetensors(dir.file(name));
}

}  // namespace

TEST(Safetensors, RoundTripEveryDtype) {
  wt::TempDir dir;
  std::map<std::string, at::Tensor> in;
  at::Tensor base = at::arange(12, at::kFloat).reshape({3, 4}) - 5;
  for (auto t : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16, at::kFloat8_e4m3fn, at::kFloat8_e5m2,
                 at::kLong, at::kInt, at::kShort, at::kChar, at::kByte}) {
    in[std::string("t_") + c10::toString(t)] = base.to(t);
  }
  in["t_bool"] = base > 0;
  in["t_empty"] = at::zeros({0, 3});
  in["t_scalar"] = at::scalar_tensor(3.5);
  save_safetensors(dir.file("a.safetensors"), in, {{"format", "pt"}});
  Checkpoint out = load_safetensors(dir.file("a.safetensors"));
  ASSERT_EQ(out.tensors.size(), in.size());
  EXPECT_EQ(out.metadata.at("format"), "pt");
  for (const auto& kv : in) {
    const at::Tensor& t = out.tensors.at(kv.first);
    EXPECT_EQ(t.scalar_type(), kv.second.scalar_type()) << kv.first;
    EXPECT_EQ(t.sizes(), kv.second.sizes()) << kv.first;
    EXPECT_TRUE(at::equal(t.to(at::kDouble), kv.second.to(at::kDouble))) << kv.first;
    EXPECT_EQ(out.source.at(kv.first), dir.file("a.safetensors"));
  }
}

TEST(Safetensors, DtypeNamesRoundTrip) {
  for (const char* n : {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"}) {
    auto t = scalar_type_from_safetensors(n);
    ASSERT_TRUE(t.has_value()) << n;
    EXPECT_EQ(*safetensors_dtype_name(*t), n);
  }
  EXPECT_FALSE(scalar_type_from_safetensors("F4").has_value());
}

TEST(Safetensors, TensorsViewTheMappingAndOutliveTheCheckpoint) {
  wt::TempDir dir;
  save_safetensors(dir.file("a.safetensors"), {{"w", at::arange(1024, at::kFloat)}});
  at::Tensor kept;
  {
    Checkpoint ck = load_safetensors(dir.file("a.safetensors"));
    EXPECT_EQ(ck.copied_tensors, 0u);
    kept = ck.tensors.at("w");
  }
  ::unlink(dir.file("a.safetensors").c_str());  // the mapping keeps the data alive
  EXPECT_EQ(kept[1023].item<float>(), 1023.f);
  // Writing copies the page (MAP_PRIVATE): allowed, and never reaches the file.
  kept[0] = 7.f;
  EXPECT_EQ(kept[0].item<float>(), 7.f);
}

TEST(Safetensors, MisalignedTensorIsCopiedNotRejected) {
  wt::TempDir dir;
  // U8 [1] at 0, then F32 [2] at byte 1: the F32 cannot be viewed at an aligned address.
  std::string header = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                       R"("b":{"dtype":"F32","shape":[2],"data_offsets":[1,9]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  Checkpoint ck = load_text(dir, header, std::string("\x05", 1) + kData8);
  EXPECT_EQ(ck.copied_tensors, 1u);
  EXPECT_EQ(ck.tensors.at("b")[1].item<float>(), 2.f);
}

TEST(SafetensorsBadInput, Truncated) {
  wt::TempDir dir;
  wt::write_bytes(dir.file("t.safetensors"), std::string("\x10\x00\x00", 3));
  expect_error([&] { load_safetensors(dir.file("t.safetensors")); }, {dir.file("t.safetensors"), "truncated"});
}

TEST(SafetensorsBadInput, EmptyFile) {
  wt::TempDir dir;
  wt::write_bytes(dir.file("t.safetensors"), "");
  expect_error([&] { load_safetensors(dir.file("t.safetensors")); }, {"empty file"});
}

TEST(SafetensorsBadInput, MissingFile) {
  expect_error([&] { load_safetensors("/nonexistent/x.safetensors"); }, {"/nonexistent/x.safetensors", "cannot open"});
}

TEST(SafetensorsBadInput, HeaderLengthBeyondFile) {
  wt::TempDir dir;
  std::string bytes = safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", kData8);
  bytes[0] = '\x7f';
  bytes[1] = '\x7f';
  wt::write_bytes(dir.file("t.safetensors"), bytes);
  expect_error([&] { load_safetensors(dir.file("t.safetensors")); }, {"runs past the end of the file"});
}

TEST(SafetensorsBadInput, HeaderLengthOverLimit) {
  std::string bytes(16, '\0');
  bytes[7] = '\x01';  // 2^56
  expect_error([&] {
    parse_safetensors_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), bytes.size(), "x");
  }, {"exceeds the format's limit"});
}

TEST(SafetensorsBadInput, InvalidJson) {
  wt::TempDir dir;
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"F32",)", kData8); }, {"not valid JSON"});
}

TEST(SafetensorsBadInput, NonObjectJson) {
  wt::TempDir dir;
  expect_error([&] { load_text(dir, "[1, 2]  ", ""); }, {"does not start with '{'"});
  expect_error([&] { load_text(dir, R"({"a": 3})", ""); }, {"tensor \"a\"", "not an object"});
}

TEST(SafetensorsBadInput, DuplicateKey) {
  wt::TempDir dir;
  expect_error([&] {
    load_text(dir, R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                   R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", kData8);
  }, {"key \"a\" twice"});
}

TEST(SafetensorsBadInput, OffsetsOutOfBounds) {
  wt::TempDir dir;
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", kData8); },
               {"tensor \"a\"", "out of bounds", "8 bytes"});
}

TEST(SafetensorsBadInput, OffsetsOverlap) {
  wt::TempDir dir;
  expect_error([&] {
    load_text(dir, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                   R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", kData8);
  }, {"\"a\" and \"b\" overlap"});
}

TEST(SafetensorsBadInput, OffsetsNotMatchingShapeTimesDtype) {
  wt::TempDir dir;
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,8]}})", kData8); },
               {"hold 8 bytes", "needs 4"});
}

TEST(SafetensorsBadInput, GapAndTrailingBytes) {
  wt::TempDir dir;
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", kData8); },
               {"belong to no tensor"});
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", kData8); },
               {"after the last tensor"});
}

TEST(SafetensorsBadInput, UnknownDtype) {
  wt::TempDir dir;
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"F128","shape":[1],"data_offsets":[0,8]}})", kData8); },
               {"unknown dtype \"F128\""});
}

TEST(SafetensorsBadInput, BadShapeAndFields) {
  wt::TempDir dir;
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", kData8); },
               {"not a non-negative integer"});
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", kData8); },
               {"not a non-negative integer"});
  expect_error([&] {
    load_text(dir, R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", kData8);
  }, {"overflows"});
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", kData8); },
               {"unknown field \"x\""});
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"F32","shape":[2]}})", kData8); }, {"data_offsets"});
  expect_error([&] { load_text(dir, R"({"__metadata__":{"k":1}})", ""); }, {"__metadata__"});
}

TEST(SafetensorsBadInput, BoolBytesOtherThanZeroOne) {
  wt::TempDir dir;
  expect_error([&] { load_text(dir, R"({"a":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", "\x01\x02"); },
               {"BOOL byte 1"});
}

TEST(SafetensorsBadInput, DeepNesting) {
  wt::TempDir dir;
  std::string deep = "{\"a\":" + std::string(100, '[') + std::string(100, ']') + "}";
  expect_error([&] { load_text(dir, deep, ""); }, {"nests deeper"});
}

// --- sharded ---------------------------------------------------------------------------------------------------

namespace {

void write_index(const wt::TempDir& dir, const std::string& weight_map) {
  wt::write_bytes(dir.file("model.safetensors.index.json"),
                  "{\"metadata\": {\"total_size\": 16}, \"weight_map\": " + weight_map + "}");
}

void write_two_shards(const wt::TempDir& dir) {
  save_safetensors(dir.file("s-00001-of-00002.safetensors"), {{"a", at::ones({2})}});
  save_safetensors(dir.file("s-00002-of-00002.safetensors"), {{"b", at::zeros({2})}});
}

}  // namespace

TEST(Sharded, LoadsEveryShardThroughTheIndex) {
  wt::TempDir dir;
  write_two_shards(dir);
  write_index(dir, R"({"a": "s-00001-of-00002.safetensors", "b": "s-00002-of-00002.safetensors"})");
  Checkpoint ck = load_sharded_safetensors(dir.file("model.safetensors.index.json"));
  EXPECT_EQ(ck.tensors.size(), 2u);
  EXPECT_EQ(ck.files.size(), 2u);
  EXPECT_EQ(ck.source.at("b"), dir.file("s-00002-of-00002.safetensors"));
}

TEST(Sharded, MissingShard) {
  wt::TempDir dir;
  write_two_shards(dir);
  write_index(dir, R"({"a": "s-00001-of-00002.safetensors", "b": "s-00003-of-00003.safetensors"})");
  expect_error([&] { load_sharded_safetensors(dir.file("model.safetensors.index.json")); },
               {"s-00003-of-00003.safetensors", "missing"});
}

TEST(Sharded, DuplicateKeyAcrossShards) {
  wt::TempDir dir;
  save_safetensors(dir.file("s1.safetensors"), {{"a", at::ones({2})}});
  save_safetensors(dir.file("s2.safetensors"), {{"a", at::ones({2})}, {"b", at::ones({1})}});
  write_index(dir, R"({"a": "s1.safetensors", "b": "s2.safetensors"})");
  expect_error([&] { load_sharded_safetensors(dir.file("model.safetensors.index.json")); },
               {"\"a\"", "s1.safetensors", "s2.safetensors"});
}

TEST(Sharded, KeyMissingFromItsShard) {
  wt::TempDir dir;
  write_two_shards(dir);
  write_index(dir, R"({"a": "s-00001-of-00002.safetensors", "b": "s-00002-of-00002.safetensors",)"
                   R"( "c": "s-00002-of-00002.safetensors"})");
  expect_error([&] { load_sharded_safetensors(dir.file("model.safetensors.index.json")); },
               {"\"c\"", "listed for this shard"});
}

TEST(Sharded, PathInIndexRefused) {
  wt::TempDir dir;
  write_two_shards(dir);
  write_index(dir, R"({"a": "../etc/passwd"})");
  expect_error([&] { load_sharded_safetensors(dir.file("model.safetensors.index.json")); },
               {"not a plain file name"});
}

TEST(Sharded, IndexNotJsonOrWithoutWeightMap) {
  wt::TempDir dir;
  wt::write_bytes(dir.file("model.safetensors.index.json"), "{\"metadata\": {}}");
  expect_error([&] { load_sharded_safetensors(dir.file("model.safetensors.index.json")); }, {"weight_map"});
  wt::write_bytes(dir.file("model.safetensors.index.json"), "{oops");
  expect_error([&] { load_sharded_safetensors(dir.file("model.safetensors.index.json")); }, {"not valid JSON"});
}
