// umT5 golden tests: cleaning, tokenizer ids / mask, relative buckets, per-layer bias, encoder outputs
// (tests/fixtures/t5, upstream T5EncoderModel + HuggingfaceTokenizer).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>

#include "text/text_encoder.h"
#include "weights/weights.h"
#include "t5.h"
#include "test_util.h"

namespace liveavatar::text {
namespace {

using test::close;
const std::string kDir = T5_FIXTURES_DIR;

const nlohmann::json& prompts() {
  static const nlohmann::json j = [] {
    std::ifstream in(kDir + "/prompts.json");
    return nlohmann::json::parse(in);
  }();
  return j;
}
const weights::Checkpoint& io() {
  static const weights::Checkpoint ck = weights::load_safetensors(kDir + "/t5_io.safetensors");
  return ck;
}
const at::Tensor& golden(const std::string& name) { return io().tensors.at(name); }

const Tokenizer& tokenizer() {
  static const Tokenizer t(kDir + "/google/umt5-xxl", 16);
  return t;
}
const TextEncoder& encoder() {
  static const TextEncoder e =
      TextEncoder::from_file(kDir + "/models_t5_umt5-xxl-enc-bf16.pth", T5Config::tiny(), c10::kCPU, at::kFloat);
  return e;
}

TEST(TokenizerGolden, CleaningIdsAndMask) {
  ASSERT_EQ(prompts()["text_len"].get<int64_t>(), 16);
  for (const auto& p : prompts()["prompts"]) {
    const auto raw = p["raw"].get<std::string>();
    const int idx = p["index"].get<int>();
    EXPECT_EQ(Tokenizer::clean(raw), p["cleaned"].get<std::string>()) << "prompt " << idx;
    const auto t = tokenizer().encode(raw);
    EXPECT_EQ(t.ids, p["ids"].get<std::vector<int64_t>>()) << "prompt " << idx;
    EXPECT_EQ(t.mask, p["mask"].get<std::vector<int64_t>>()) << "prompt " << idx;
    EXPECT_EQ(t.length, p["seq_len"].get<int64_t>()) << "prompt " << idx;
    auto full = tokenizer().pieces(p["cleaned"].get<std::string>());
    full.push_back(tokenizer().eos_id());
    EXPECT_EQ(full, p["sentencepiece_ids_plus_eos"].get<std::vector<int64_t>>()) << "prompt " << idx;
    // The stored tensors agree with the JSON.
    EXPECT_TRUE(at::equal(at::tensor(t.ids, at::kLong), golden("p" + std::to_string(idx) + ".ids")));
  }
  EXPECT_EQ(tokenizer().piece_count(), 300);
  EXPECT_EQ(tokenizer().eos_id(), 1);
  EXPECT_EQ(tokenizer().pad_id(), 0);
}

TEST(TokenizerGolden, CleaningDetails) {
  EXPECT_EQ(Tokenizer::clean("  a\t\tb\u00a0c \n"), "a b c");
  EXPECT_EQ(Tokenizer::clean("&amp;lt;x&#62; &#x41;"), "<x> A");
  EXPECT_EQ(Tokenizer::clean("\u2018q\u2019 \u201cd\u201d"), "'q' \"d\"");
  EXPECT_EQ(Tokenizer::clean("\xef\xbc\xa1\xef\xac\x81"), "Afi");  // full-width A, fi ligature
  EXPECT_EQ(Tokenizer::clean("caf\xc3\x83\xc2\xa9"), "caf\xc3\xa9");  // "cafÃ©" -> "café"
  EXPECT_EQ(Tokenizer::clean("\x1b[31mred\x1b[0m"), "red");
  EXPECT_EQ(Tokenizer::clean(""), "");
}

TEST(TokenizerGolden, TruncationKeepsEos) {
  const auto t = tokenizer().encode(std::string(400, 'a'));
  EXPECT_EQ(t.length, 16);
  EXPECT_EQ(t.ids.back(), 1);
  const auto e = tokenizer().encode("");
  EXPECT_EQ(e.length, 1);
  EXPECT_EQ(e.ids[0], 1);
  EXPECT_EQ(e.ids[1], 0);
}

TEST(T5Golden, RelativeBucketsAndPerLayerBias) {
  const auto buckets = relative_position_buckets(16, 32, 128);
  EXPECT_TRUE(at::equal(buckets, golden("rel_buckets")));
  for (int i = 0; i < 2; ++i) {
    const auto bias = encoder().module()->blocks->ptr<BlockImpl>(i)->pos_embedding(buckets)[0];
    EXPECT_TRUE(close(bias, golden("pos_bias" + std::to_string(i)), "pos_bias" + std::to_string(i)));
  }
  // Buckets beyond max_exact use the log scale and saturate at 15 per direction.
  const auto long_buckets = relative_position_buckets(512, 32, 128);
  EXPECT_EQ(long_buckets[0][511].item<int64_t>(), 31);
  EXPECT_EQ(long_buckets[511][0].item<int64_t>(), 15);
}

TEST(T5Golden, EncoderOutputs) {
  at::NoGradGuard no_grad;
  auto& m = *encoder().module();
  for (int k = 0; k < 4; ++k) {
    const std::string p = "p" + std::to_string(k) + ".";
    const auto ids = golden(p + "ids").unsqueeze(0), mask = golden(p + "mask").unsqueeze(0);
    auto x = at::embedding(m.token_embedding->weight, ids);
    EXPECT_TRUE(close(x[0], golden(p + "embed"), p + "embed"));
    const auto buckets = relative_position_buckets(16, 32, 128);
    for (int i = 0; i < 2; ++i) {
      x = m.blocks->ptr<BlockImpl>(i)->forward(x, buckets, mask);
      EXPECT_TRUE(close(x[0], golden(p + "block" + std::to_string(i) + "_out"), p + "block" + std::to_string(i)));
    }
    EXPECT_TRUE(close(encoder().encode_ids(ids, mask), golden(p + "output_padded"), p + "output_padded"));
    // What the DiT sees: the trimmed context, zero-padded to text_len.
    const auto prompt = prompts()["prompts"][k]["raw"].get<std::string>();
    const auto context = encoder().encode(tokenizer(), prompt);
    const auto& ref = golden(p + "context");
    EXPECT_TRUE(close(context.slice(0, 0, ref.size(0)), ref, p + "context (prompt -> embedding)"));
    EXPECT_EQ(context.slice(0, ref.size(0)).abs().sum().item<double>(), 0.0);
  }
}

TEST(T5Golden, SafetensorsAndPthAgree) {
  const auto st = TextEncoder::from_file(kDir + "/models_t5_umt5-xxl-enc-bf16.safetensors", T5Config::tiny(),
                                         c10::kCPU, at::kFloat);
  const auto ids = golden("p3.ids"), mask = golden("p3.mask");
  EXPECT_TRUE(at::equal(st.encode_ids(ids, mask), encoder().encode_ids(ids, mask)));
}

TEST(T5Golden, Bf16RunsCloseToFp32) {
  // Upstream's precision (bf16 weights and activations): close to the fp32 reference, not equal.
  const auto bf = TextEncoder::from_file(kDir + "/models_t5_umt5-xxl-enc-bf16.pth", T5Config::tiny());
  EXPECT_EQ(bf.dtype(), at::kBFloat16);
  const auto out = bf.encode_ids(golden("p0.ids"), golden("p0.mask"));
  EXPECT_TRUE(close(out, golden("p0.output_padded"), "p0.output_padded in bf16", 5e-2));
}

TEST(T5Errors, MismatchedTokenizerIsReported) {
  T5Config small = T5Config::tiny();
  small.vocab_size = 200;  // fewer rows than the tokenizer's 300 pieces
  const TextEncoder enc(small, c10::kCPU, at::kFloat, /*seed=*/1);
  try {
    enc.encode(tokenizer(), "hello");
    FAIL() << "no error";
  } catch (const TextError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("300 pieces"), std::string::npos) << m;
    EXPECT_NE(m.find("200"), std::string::npos) << m;
  }
  // The fixture model: 320 rows for 300 pieces (rows rounded up, like umT5-XXL's 256384) is accepted.
  EXPECT_NO_THROW(encoder().check_tokenizer(tokenizer()));
}

}  // namespace
}  // namespace liveavatar::text
