// Engine timing contract, validation and bad input.
#include <gtest/gtest.h>

#include "test_util.h"

using liveavatar::Engine;
using liveavatar::Error;
using liveavatar::Frame;
using testutil::config;
using testutil::portrait;

namespace {

std::unique_ptr<Engine> engine_with_portrait(const liveavatar::EngineConfig& c = config()) {
  auto e = Engine::create(c);
  e->set_reference(portrait().view());
  return e;
}

}  // namespace

TEST(Engine, SamplesPerFrameAt16kHz25fps) { EXPECT_EQ(Engine::create(config())->samples_per_frame(), 640); }

class FrameCount : public ::testing::TestWithParam<std::tuple<size_t, size_t>> {};

// ceil(samples / 640) frames, indices 0..N-1, for any chunking: the last frame covers the tail, none beyond it.
TEST_P(FrameCount, IsCeilOfDurationTimesFps) {
  const auto [samples, chunk] = GetParam();
  auto e = engine_with_portrait();
  std::vector<float> audio = testutil::vowel(samples);
  auto frames = testutil::render(*e, audio, chunk);
  ASSERT_EQ(frames.size(), (samples + 639) / 640) << samples << " samples in chunks of " << chunk;
  for (size_t i = 0; i < frames.size(); ++i) {
    ASSERT_EQ(frames[i].index, static_cast<int64_t>(i));
    ASSERT_EQ(frames[i].width, 256);
    ASSERT_EQ(frames[i].rgb.size(), 256u * 256u * 3u);
  }
}

INSTANTIATE_TEST_SUITE_P(Durations, FrameCount,
                         ::testing::Combine(::testing::Values(0, 1, 639, 640, 641, 16000, 16001, 40000),
                                            ::testing::Values(1, 333, 640, 100000)));

TEST(Engine, ChunkingDoesNotChangeFrames) {
  auto audio = std::vector<float>(testutil::speech().begin(), testutil::speech().begin() + 3 * 16000);
  auto a = engine_with_portrait();
  auto b = engine_with_portrait();
  auto fa = testutil::render(*a, audio, 1);
  auto fb = testutil::render(*b, audio, audio.size());
  ASSERT_EQ(fa.size(), fb.size());
  for (size_t i = 0; i < fa.size(); ++i) ASSERT_EQ(fa[i].rgb, fb[i].rgb) << "frame " << i;
}

TEST(Engine, SameSeedSameFramesOtherSeedOtherFrames) {
  auto audio = std::vector<float>(testutil::speech().begin(), testutil::speech().begin() + 8 * 16000);
  auto a = engine_with_portrait(config(7));
  auto b = engine_with_portrait(config(7));
  auto c = engine_with_portrait(config(8));
  auto fa = testutil::render(*a, audio, 1600);
  auto fb = testutil::render(*b, audio, 1600);
  auto fc = testutil::render(*c, audio, 1600);
  ASSERT_EQ(fa.size(), fb.size());
  size_t differ = 0;
  for (size_t i = 0; i < fa.size(); ++i) {
    ASSERT_EQ(fa[i].rgb, fb[i].rgb) << "frame " << i;
    differ += fa[i].rgb != fc[i].rgb;
  }
  EXPECT_GT(differ, fa.size() / 2) << "a different seed should move the head and eyes differently";
}

TEST(Engine, ResetStartsANewIdenticalStream) {
  auto audio = testutil::vowel(16000);
  auto e = engine_with_portrait();
  auto first = testutil::render(*e, audio, 800);
  e->reset();
  EXPECT_EQ(e->samples_pushed(), 0);
  auto second = testutil::render(*e, audio, 800);
  ASSERT_EQ(first.size(), second.size());
  for (size_t i = 0; i < first.size(); ++i) ASSERT_EQ(first[i].rgb, second[i].rgb);
}

TEST(Engine, ZeroLengthAudioGivesZeroFrames) {
  auto e = engine_with_portrait();
  e->finish();
  Frame f;
  EXPECT_FALSE(e->pop_frame(&f));
}

TEST(Engine, SilenceIsRenderedAsIdleFrames) {
  auto e = engine_with_portrait();
  e->push_silence(16000);
  e->finish();
  Frame f;
  int n = 0;
  while (e->pop_frame(&f)) {
    EXPECT_EQ(f.mouth_open, 0.f);
    ++n;
  }
  EXPECT_EQ(n, 25);
}

TEST(Engine, AudioBeforeImageIsAClearError) {
  auto e = Engine::create(config());
  float s[10] = {};
  try {
    e->push_audio(s, 10);
    FAIL() << "expected an error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("reference image"), std::string::npos) << err.what();
  }
}

TEST(Engine, AudioAfterFinishIsAnError) {
  auto e = engine_with_portrait();
  e->finish();
  float s[10] = {};
  EXPECT_THROW(e->push_audio(s, 10), Error);
}

TEST(Engine, NonFiniteSamplesDoNotPoisonTheStream) {
  auto e = engine_with_portrait();
  std::vector<float> audio = testutil::vowel(6400);
  audio[100] = std::nanf("");
  audio[2000] = INFINITY;
  auto frames = testutil::render(*e, audio, 640);
  ASSERT_EQ(frames.size(), 10u);
  for (const auto& f : frames) EXPECT_TRUE(std::isfinite(f.mouth_open));
  EXPECT_GT(frames.back().mouth_open, 0.1f);
}

TEST(Engine, TinyImageIsRejectedWithAMessage) {
  auto e = Engine::create(liveavatar::EngineConfig{});
  std::vector<uint8_t> px(32 * 32 * 3, 128);
  liveavatar::ImageView v{px.data(), 32, 32, 96, liveavatar::PixelFormat::kRGB8};
  try {
    e->set_reference(v);
    FAIL() << "expected an error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("too small"), std::string::npos) << err.what();
  }
  EXPECT_FALSE(e->has_reference());
}

TEST(Engine, HugeImageIsScaledToTheDefaultSize) {
  auto e = Engine::create(liveavatar::EngineConfig{});
  std::vector<uint8_t> px(3000 * 2000 * 3, 90);
  liveavatar::ImageView v{px.data(), 3000, 2000, 9000, liveavatar::PixelFormat::kRGB8};
  e->set_reference(v);
  const auto s = e->output_size();
  EXPECT_EQ(s.width, 1024);
  EXPECT_EQ(s.height, 672);  // 2000 * 1024 / 3000 = 682.67 -> 672
  e->push_silence(640);
  Frame f;
  ASSERT_TRUE(e->pop_frame(&f));
  EXPECT_EQ(f.width, 1024);
  EXPECT_EQ(f.height, 672);
}

TEST(Engine, DefaultOutputSizeIsAMultipleOf16) {
  auto s = liveavatar::default_output_size(300, 200);
  EXPECT_EQ(s.width, 288);
  EXPECT_EQ(s.height, 192);
  s = liveavatar::default_output_size(512, 512);
  EXPECT_EQ(s.width, 512);
  EXPECT_THROW(liveavatar::default_output_size(63, 500), Error);
}

TEST(Engine, GrayAndAlphaImagesWork) {
  const auto& rgb = portrait();
  const int w = rgb.width, h = rgb.height;
  std::vector<uint8_t> gray(static_cast<size_t>(w) * h), rgba(static_cast<size_t>(w) * h * 4);
  for (int i = 0; i < w * h; ++i) {
    gray[i] = rgb.data[i * 3 + 1];
    for (int k = 0; k < 3; ++k) rgba[i * 4 + k] = rgb.data[i * 3 + k];
    rgba[i * 4 + 3] = 200;
  }
  auto a = Engine::create(config());
  a->set_reference({rgba.data(), w, h, w * 4, liveavatar::PixelFormat::kRGBA8});
  auto b = engine_with_portrait();
  auto audio = testutil::vowel(3200);
  auto fa = testutil::render(*a, audio, 640);
  auto fb = testutil::render(*b, audio, 640);
  ASSERT_EQ(fa.size(), 5u);
  EXPECT_EQ(fa[2].rgb, fb[2].rgb) << "alpha is dropped: RGBA renders like RGB";

  auto g = Engine::create(config());
  g->set_reference({gray.data(), w, h, w, liveavatar::PixelFormat::kGray8});
  auto fg = testutil::render(*g, audio, 640);
  ASSERT_EQ(fg.size(), 5u);
  for (size_t i = 0; i < fg[2].rgb.size(); i += 3) {
    ASSERT_EQ(fg[2].rgb[i], fg[2].rgb[i + 1]);
    ASSERT_EQ(fg[2].rgb[i], fg[2].rgb[i + 2]);
  }
}

TEST(Engine, UnknownBackendNamesTheAvailableOnes) {
  liveavatar::EngineConfig c;
  c.backend = "nope";
  try {
    Engine::create(c);
    FAIL();
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("puppet"), std::string::npos);
  }
}

TEST(Engine, InvalidSizesAndRatesAreRejected) {
  liveavatar::EngineConfig c;
  c.width = 255;
  c.height = 256;
  EXPECT_THROW(Engine::create(c), Error);
  c.width = 256;
  c.height = 0;
  EXPECT_THROW(Engine::create(c), Error);
  c = {};
  c.sample_rate = 44100;
  c.fps_n = 30000;
  c.fps_d = 1001;
  EXPECT_THROW(Engine::create(c), Error);
}

TEST(Engine, ChangingTheReferenceKeepsTheOutputSize) {
  auto e = engine_with_portrait();
  std::vector<uint8_t> px(640 * 480 * 3, 60);
  e->set_reference({px.data(), 640, 480, 640 * 3, liveavatar::PixelFormat::kRGB8});
  EXPECT_EQ(e->output_size().width, 256);
  EXPECT_EQ(e->output_size().height, 256);
}

// The neural backend's size rule, against values computed with upstream's get_size_less_than_area.
TEST(Engine, ModelOutputSizeFollowsTheReferenceAspectUnderTheArea) {
  struct Case {
    int w, h;
    int64_t area;
    int ow, oh;
  };
  const Case cases[] = {
      {512, 512, liveavatar::kDefaultMaxArea, 512, 512},   {1024, 1024, liveavatar::kDefaultMaxArea, 512, 512},
      {384, 704, liveavatar::kDefaultMaxArea, 384, 704},   {704, 384, liveavatar::kDefaultMaxArea, 704, 384},
      {1920, 1080, liveavatar::kDefaultMaxArea, 704, 384}, {1080, 1920, liveavatar::kDefaultMaxArea, 384, 704},
      {3000, 2000, liveavatar::kDefaultMaxArea, 576, 384}, {3000, 2000, 720 * 400, 640, 448},
      {100, 100, liveavatar::kDefaultMaxArea, 128, 128},   {64, 4000, liveavatar::kDefaultMaxArea, 64, 4032},
      {333, 517, liveavatar::kDefaultMaxArea, 384, 576},   {4096, 64, liveavatar::kDefaultMaxArea, 4096, 64},
  };
  for (const auto& c : cases) {
    const auto s = liveavatar::model_output_size(c.w, c.h, c.area);
    EXPECT_EQ(s.width, c.ow) << c.w << "x" << c.h << " under " << c.area;
    EXPECT_EQ(s.height, c.oh) << c.w << "x" << c.h << " under " << c.area;
    EXPECT_EQ(s.width % 64, 0);
    EXPECT_EQ(s.height % 64, 0);
    EXPECT_LE(static_cast<int64_t>(s.width) * s.height, c.area);
  }
  EXPECT_THROW(liveavatar::model_output_size(32, 512), Error);
  EXPECT_THROW(liveavatar::model_output_size(512, 512, 1000), Error);
}
