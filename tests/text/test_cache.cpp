// EmbeddingCache and the text encoder's file errors.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>

#include "text/text_encoder.h"

namespace liveavatar::text {
namespace {

const std::string kDir = T5_FIXTURES_DIR;

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/liveavatar-text-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
};

CacheOptions options(const std::string& dir) {
  CacheOptions o;
  o.checkpoint = kDir + "/models_t5_umt5-xxl-enc-bf16.pth";
  o.tokenizer = kDir + "/google/umt5-xxl";
  o.cache_dir = dir + "/nested/cache";
  o.config = T5Config::tiny();
  o.dtype = at::kFloat;
  return o;
}

TEST(EmbeddingCache, ComputesOnceThenReadsFromDisk) {
  TempDir dir;
  at::Tensor first;
  {
    EmbeddingCache cache(options(dir.path));
    EXPECT_FALSE(cache.lookup("A man talks.").defined());
    first = cache.get_or_compute("A man talks.");
    EXPECT_EQ(first.sizes(), (at::IntArrayRef{16, 48}));
    EXPECT_TRUE(cache.encoder_loaded());
    cache.release_encoder();
    EXPECT_FALSE(cache.encoder_loaded());
    EXPECT_TRUE(at::equal(cache.get_or_compute("A man talks."), first));
    EXPECT_FALSE(cache.encoder_loaded());  // a hit never loads the encoder
    EXPECT_EQ(cache.computed(), 1);
  }
  EmbeddingCache again(options(dir.path));  // another object (process) sees the file
  EXPECT_TRUE(at::equal(again.get_or_compute("A man talks."), first));
  EXPECT_EQ(again.computed(), 0);
  EXPECT_NE(again.path_for("A man talks."), again.path_for("A man talks!"));
  const auto other = again.get_or_compute("A woman talks.");
  EXPECT_EQ(again.computed(), 1);
  EXPECT_FALSE(at::equal(other, first));
}

TEST(EmbeddingCache, KeyDependsOnModelFiles) {
  TempDir dir;
  const auto ckpt = dir.path + "/enc.safetensors";
  std::system(("cp '" + kDir + "/models_t5_umt5-xxl-enc-bf16.safetensors' '" + ckpt + "'").c_str());
  auto o = options(dir.path);
  const auto a = EmbeddingCache(o).path_for("p");
  o.checkpoint = ckpt;
  EXPECT_NE(EmbeddingCache(o).path_for("p"), a);
}

// A load cancelled while umT5 runs (the element going to NULL): the interrupt is asked before the encoder is read and
// before each layer; its exception ends the computation and nothing is cached; the next call computes it whole.
TEST(EmbeddingCache, InterruptStopsTheEncoderBetweenLayersAndCachesNothing) {
  struct Stop {};
  TempDir dir;
  auto o = options(dir.path);
  int calls = 0;
  o.interrupt = [&calls] { ++calls; };
  at::Tensor whole;
  {
    EmbeddingCache cache(o);
    whole = cache.get_or_compute("A man talks.");
  }
  EXPECT_EQ(calls, 1 + T5Config::tiny().num_layers) << "once before the encoder is read, then before each layer";
  ASSERT_EQ(std::system(("rm -rf '" + dir.path + "/nested'").c_str()), 0);
  for (int stop_at = 1; stop_at <= 2; ++stop_at) {
    int n = 0;
    o.interrupt = [&n, stop_at] {
      if (++n == stop_at) throw Stop{};
    };
    EmbeddingCache cache(o);
    EXPECT_THROW(cache.get_or_compute("A man talks."), Stop) << "stopping at call " << stop_at;
    EXPECT_EQ(n, stop_at) << "the encoder went on after the interrupt threw";
    EXPECT_EQ(cache.computed(), 0);
    EXPECT_FALSE(cache.lookup("A man talks.").defined()) << "a cancelled embedding was cached";
  }
  o.interrupt = {};
  EmbeddingCache cache(o);
  EXPECT_TRUE(at::equal(cache.get_or_compute("A man talks."), whole));
}

TEST(EmbeddingCache, CorruptFileIsRecomputed) {
  TempDir dir;
  EmbeddingCache cache(options(dir.path));
  const auto ref = cache.get_or_compute("x");
  FILE* f = std::fopen(cache.path_for("x").c_str(), "wb");
  std::fputs("garbage", f);
  std::fclose(f);
  EXPECT_TRUE(at::equal(cache.get_or_compute("x"), ref));
  EXPECT_EQ(cache.computed(), 2);
}

TEST(TextErrors, MissingFilesAreNamed) {
  try {
    Tokenizer t("/nonexistent/google/umt5-xxl");
    FAIL() << "no error";
  } catch (const TextError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/google/umt5-xxl"), std::string::npos) << e.what();
  }
  try {
    TextEncoder::from_file("/nonexistent/models_t5_umt5-xxl-enc-bf16.pth", T5Config::tiny());
    FAIL() << "no error";
  } catch (const TextError& e) {
    EXPECT_NE(std::string(e.what()).find("models_t5_umt5-xxl-enc-bf16.pth"), std::string::npos) << e.what();
  }
  CacheOptions o;
  o.checkpoint = "/nonexistent.pth";
  o.tokenizer = kDir + "/google/umt5-xxl";
  EXPECT_THROW(EmbeddingCache{o}, TextError);
}

TEST(TextErrors, WrongShapeCheckpointFails) {
  // The tiny checkpoint with the 14B shape: the strict loader names the mismatching keys (no 11 GB allocation:
  // parameters are uninitialised until loaded).
  T5Config wrong = T5Config::tiny();
  wrong.dim_ffn = 128;
  EXPECT_THROW(TextEncoder::from_file(kDir + "/models_t5_umt5-xxl-enc-bf16.pth", wrong), Error);
}

TEST(T5Config, RealSizeParameterCount) {
  // umT5-XXL encoder: 5,680,910,336 parameters = 11.36 GB in bf16.
  EXPECT_EQ(T5Config{}.parameter_count(), 5680910336ull);
}

}  // namespace
}  // namespace liveavatar::text
