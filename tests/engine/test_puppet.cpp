// The puppet backend: face layout, mouth driven by speech, blinking, idle motion.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "test_util.h"

using liveavatar::Engine;
using liveavatar::Frame;
using testutil::config;
using testutil::portrait;

namespace {

// Frame loudness in dBFS, computed here independently of the engine.
std::vector<double> frame_db(const std::vector<float>& audio) {
  std::vector<double> db;
  for (size_t i = 0; i < audio.size(); i += 640) {
    double sum = 0;
    const size_t end = std::min(audio.size(), i + 640);
    for (size_t k = i; k < end; ++k) sum += audio[k] * audio[k];
    db.push_back(10 * std::log10(sum / 640 + 1e-12));
  }
  return db;
}

}  // namespace

TEST(Puppet, FindsTheFaceInThePortrait) {
  auto e = Engine::create(config(0, 512));
  e->set_reference(portrait().view());
  EXPECT_TRUE(e->take_warnings().empty());
  const auto l = e->face_layout();
  ASSERT_TRUE(l.detected);
  // The portrait's face is roughly x 170..280, y 50..190 at 512x512.
  EXPECT_GT(l.face.x, 140);
  EXPECT_LT(l.face.x + l.face.width, 310);
  EXPECT_GT(l.face.y, 20);
  EXPECT_LT(l.face.y, 120);
  // Mouth below the eyes, inside the face horizontally.
  EXPECT_GT(l.mouth.y, l.left_eye.y + l.left_eye.height);
  EXPECT_GT(l.mouth.x, l.face.x);
  EXPECT_LT(l.mouth.x + l.mouth.width, l.face.x + l.face.width);
  EXPECT_LT(l.left_eye.x, l.right_eye.x);
}

TEST(Puppet, MouthOpensInSpeechAndClosesInSilence) {
  const auto& audio = testutil::speech();
  auto e = Engine::create(config(0, 256));
  e->set_reference(portrait().view());
  auto frames = testutil::render(*e, audio, 1600);
  const auto db = frame_db(audio);
  ASSERT_EQ(frames.size(), db.size());

  double speech_sum = 0;
  int speech_n = 0;
  float silence_max = 0;
  int silence_n = 0;
  int quiet_run = 0;
  for (size_t i = 0; i < frames.size(); ++i) {
    if (db[i] > -35) {
      speech_sum += frames[i].mouth_open;
      ++speech_n;
    }
    quiet_run = db[i] < -60 ? quiet_run + 1 : 0;
    if (quiet_run > 8) {  // well inside a pause (the mouth has had 8 frames to close)
      silence_max = std::max(silence_max, frames[i].mouth_open);
      ++silence_n;
    }
  }
  ASSERT_GT(speech_n, 200);
  ASSERT_GT(silence_n, 50) << "speech.wav has pauses";
  EXPECT_GT(speech_sum / speech_n, 0.25) << "mean openness while speaking";
  EXPECT_LT(silence_max, 0.05f) << "the mouth is closed in pauses";
}

TEST(Puppet, OpenMouthIsDrawnInThePicture) {
  // The mouth interior darkens the mouth box: compare frames while a vowel is held with idle frames.
  auto e = Engine::create(config(3, 512));
  e->set_reference(portrait().view());
  std::vector<float> audio(16000, 0.f);
  auto v = testutil::vowel(16000, 0.4f);
  audio.insert(audio.end(), v.begin(), v.end());
  auto frames = testutil::render(*e, audio, 640);
  ASSERT_EQ(frames.size(), 50u);
  auto m = e->face_layout().mouth;
  liveavatar::Rect box{m.x, m.y, m.width, m.height * 2};
  double idle = 0, open = 0;
  for (int i = 10; i < 20; ++i) idle += testutil::mean_luma(frames[i], box) / 10;
  for (int i = 35; i < 45; ++i) {
    EXPECT_GT(frames[i].mouth_open, 0.4f);
    open += testutil::mean_luma(frames[i], box) / 10;
  }
  EXPECT_LT(open, idle - 8) << "idle luma " << idle << ", speaking luma " << open;
}

TEST(Puppet, BlinksAtNaturalIntervals) {
  auto e = Engine::create(config(11, 256));
  e->set_reference(portrait().view());
  e->push_silence(60 * 16000);
  e->finish();
  Frame f;
  std::vector<int> closed;  // frames where the eyes are fully shut
  int blinking = 0;
  while (e->pop_frame(&f)) {
    if (f.blink >= 1.f) closed.push_back(static_cast<int>(f.index));
    blinking += f.blink > 0;
  }
  // People blink ~10-20 times a minute; the puppet every 2-6 s with an occasional double blink.
  EXPECT_GE(closed.size(), 9u);
  EXPECT_LE(closed.size(), 34u);
  for (size_t i = 1; i < closed.size(); ++i) EXPECT_GE(closed[i] - closed[i - 1], 8) << "blinks overlap";
  EXPECT_LT(blinking, 1500 / 4) << "eyes are open most of the time";
}

TEST(Puppet, BlinkClosesTheEyes) {
  auto e = Engine::create(config(11, 512));
  e->set_reference(portrait().view());
  e->push_silence(10 * 16000);
  e->finish();
  Frame f, open_frame, shut_frame;
  bool have_open = false, have_shut = false;
  while (e->pop_frame(&f)) {
    if (f.blink == 0.f && !have_open && f.index > 5) open_frame = f, have_open = true;
    if (f.blink >= 1.f && !have_shut) shut_frame = f, have_shut = true;
  }
  ASSERT_TRUE(have_open && have_shut);
  const auto eye = e->face_layout().left_eye;
  // Eye opening (dark iris) is covered by lid skin: the eye box gets brighter.
  EXPECT_GT(testutil::mean_luma(shut_frame, eye), testutil::mean_luma(open_frame, eye) + 5);
}

TEST(Puppet, IdleHeadMovesSlightlyAndKeepsTheFace) {
  auto e = Engine::create(config(5, 256));
  e->set_reference(portrait().view());
  e->push_silence(4 * 16000);
  e->finish();
  Frame f;
  std::vector<Frame> frames;
  while (e->pop_frame(&f)) frames.push_back(f);
  ASSERT_EQ(frames.size(), 100u);
  // Frames differ over time (breathing / sway) but only slightly: mean absolute difference of a few levels.
  double mad = 0;
  for (size_t i = 0; i < frames[0].rgb.size(); ++i) mad += std::abs(frames[0].rgb[i] - frames[60].rgb[i]);
  mad /= frames[0].rgb.size();
  EXPECT_GT(mad, 0.2);
  EXPECT_LT(mad, 12.0);
}

TEST(Puppet, NoFaceWarnsAndUsesADefaultLayout) {
  std::vector<uint8_t> px(320 * 240 * 3);
  for (size_t i = 0; i < px.size(); ++i) px[i] = static_cast<uint8_t>(100 + (i / 3 % 320) / 8);
  auto e = Engine::create(liveavatar::EngineConfig{});
  e->set_reference({px.data(), 320, 240, 320 * 3, liveavatar::PixelFormat::kRGB8});
  auto w = e->take_warnings();
  ASSERT_EQ(w.size(), 1u);
  EXPECT_NE(w[0].find("no face"), std::string::npos);
  EXPECT_FALSE(e->face_layout().detected);
  auto frames = testutil::render(*e, testutil::vowel(6400), 640);
  EXPECT_EQ(frames.size(), 10u);
}

TEST(Puppet, MouthBoxOverride) {
  auto c = config(0, 256);  // portrait is 512: boxes scale by 1/2
  c.mouth_box = {200, 300, 80, 30};
  auto e = Engine::create(c);
  e->set_reference(portrait().view());
  const auto m = e->face_layout().mouth;
  EXPECT_EQ(m.x, 100);
  EXPECT_EQ(m.y, 150);
  EXPECT_EQ(m.width, 40);
  EXPECT_EQ(m.height, 15);

  c.mouth_box = {500, 500, 80, 30};
  auto bad = Engine::create(c);
  EXPECT_THROW(bad->set_reference(portrait().view()), liveavatar::Error);
}
