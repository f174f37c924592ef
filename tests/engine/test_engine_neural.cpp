// The neural backend behind the Engine API on a make-tiny checkpoint, in both worker modes: the same frames inline
// and threaded, exact length, a reset that keeps the conditioning and repeats the stream, cancel from another
// thread mid-stream, and the model's output size rule.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <thread>

#include "../tiny_checkpoint.h"
#include "test_util.h"

using liveavatar::Cancelled;
using liveavatar::Engine;
using liveavatar::Error;
using liveavatar::Frame;
using namespace std::chrono_literals;

namespace {

using testutil::tiny;

liveavatar::EngineConfig neural_config(const std::string& worker, int size = 64) {
  liveavatar::EngineConfig c;
  c.backend = "liveavatar";
  c.model_dir = tiny().dir;
  c.width = c.height = size;
  c.seed = 11;
  c.worker = worker;
  return c;
}

std::unique_ptr<Engine> neural(const std::string& worker, int size = 64) {
  EXPECT_TRUE(liveavatar::register_neural_backend());
  auto e = Engine::create(neural_config(worker, size));
  e->set_reference(testutil::portrait().view());
  return e;
}

std::vector<float> speech_samples(size_t n) {
  const auto& s = testutil::speech();
  return std::vector<float>(s.begin() + 16000, s.begin() + 16000 + static_cast<std::ptrdiff_t>(n));
}

}  // namespace

TEST(EngineNeural, SameFramesInlineAndThreaded) {
  const auto audio = speech_samples(16160);  // 1.01 s: 26 frames, the last block padded
  auto a = neural("inline");
  auto b = neural("auto");
  EXPECT_FALSE(a->stats().threaded);
  EXPECT_TRUE(b->stats().threaded) << "auto runs the neural backend on a worker";
  EXPECT_EQ(b->stats().frames_per_block, 12);
  const auto fa = testutil::render(*a, audio, 1600);
  const auto fb = testutil::render(*b, audio, 1600);
  ASSERT_EQ(fa.size(), 26u);
  ASSERT_EQ(fb.size(), 26u);
  for (size_t i = 0; i < fa.size(); ++i) {
    ASSERT_EQ(fb[i].index, static_cast<int64_t>(i));
    ASSERT_EQ(fa[i].rgb, fb[i].rgb) << "frame " << i;
  }
  const auto st = b->stats();
  EXPECT_EQ(st.blocks_done, 3);
  EXPECT_GT(st.ms_per_block, 0);
  EXPECT_GT(st.ms_first_frame, 0);
  EXPECT_GE(b->latency(), 480ms) << "at least one block of audio";
}

TEST(EngineNeural, ResetKeepsTheConditioningAndRepeatsTheStream) {
  const auto audio = speech_samples(12000);
  auto e = neural("thread");
  const auto first = testutil::render(*e, audio, 4000);
  e->reset();
  const auto second = testutil::render(*e, audio, 4000);
  ASSERT_EQ(first.size(), 19u);
  ASSERT_EQ(second.size(), first.size());
  for (size_t i = 0; i < first.size(); ++i) ASSERT_EQ(first[i].rgb, second[i].rgb) << "frame " << i;
}

TEST(EngineNeural, CancelFromAnotherThreadMidStreamThenReset) {
  const auto audio = speech_samples(48000);  // 3 s: 7 blocks
  auto e = neural("thread");
  e->push_audio(audio.data(), audio.size());
  Frame f;
  ASSERT_TRUE(e->wait_frame(&f, 60000ms));  // the first block is out, more are being made
  std::thread other([&] { e->cancel(); });
  other.join();
  EXPECT_THROW(e->wait_frame(&f, 60000ms), Cancelled);
  EXPECT_THROW(e->push_audio(audio.data(), 640), Cancelled);
  const auto t0 = std::chrono::steady_clock::now();
  e->reset();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5000ms) << "reset waits for at most the step in progress";
  // The engine is reusable and deterministic after the cancelled stream.
  const auto again = testutil::render(*e, speech_samples(8000), 8000);
  auto fresh = neural("thread");
  const auto ref = testutil::render(*fresh, speech_samples(8000), 8000);
  ASSERT_EQ(again.size(), 13u);
  ASSERT_EQ(ref.size(), again.size());
  for (size_t i = 0; i < ref.size(); ++i) ASSERT_EQ(again[i].rgb, ref[i].rgb) << "frame " << i;
}

TEST(EngineNeural, OutputSizeFollowsTheModelRule) {
  ASSERT_TRUE(liveavatar::register_neural_backend());
  auto c = neural_config("thread", 0);
  c.width = c.height = 0;
  auto e = Engine::create(c);
  e->set_reference(testutil::portrait().view());  // 512 x 512: under 704 x 384 in area, kept
  EXPECT_EQ(e->output_size().width, 512);
  EXPECT_EQ(e->output_size().height, 512);
  std::vector<uint8_t> wide(1920 * 1080 * 3, 90);
  e->set_reference({wide.data(), 1920, 1080, 1920 * 3, liveavatar::PixelFormat::kRGB8});
  EXPECT_EQ(e->output_size().width, 704);
  EXPECT_EQ(e->output_size().height, 384);
  c.max_area = 256 * 256;
  auto small = Engine::create(c);
  small->set_reference({wide.data(), 1920, 1080, 1920 * 3, liveavatar::PixelFormat::kRGB8});
  EXPECT_EQ(small->output_size().width, 320);
  EXPECT_EQ(small->output_size().height, 192);
}

TEST(EngineNeural, SizeTheModelCannotMakeIsAClearError) {
  ASSERT_TRUE(liveavatar::register_neural_backend());
  auto c = neural_config("thread", 0);
  c.width = 720;
  c.height = 400;
  try {
    Engine::create(c);
    FAIL() << "720x400 accepted";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("multiples of 64"), std::string::npos) << err.what();
  }
  c.width = c.height = 128;
  auto e = Engine::create(c);
  EXPECT_THROW(e->set_output_size({200, 128}), Error);
  EXPECT_EQ(e->output_size().width, 128) << "a refused size leaves the size as it was";
}

// The memory planner runs before any weight file is read: a folder whose weight files are empty is refused for
// memory when the budget is too small (the empty files are never opened), and only fails on the files when it fits.
TEST(EngineNeural, MemoryPlannerRefusesBeforeAnyWeightFileIsRead) {
  ASSERT_TRUE(liveavatar::register_neural_backend());
  char tmpl[] = "/tmp/liveavatar-empty-weights-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const std::string base = dir + "/Wan2.2-S2V-14B";
  ASSERT_EQ(std::system(("mkdir -p '" + base + "/google/umt5-xxl' '" + base + "/wav2vec2-large-xlsr-53-english' && cp '" +
                         tiny().dir + "/Wan2.2-S2V-14B/config.json' '" + base + "/' && cd '" + base +
                         "' && touch diffusion_pytorch_model.safetensors Wan2.1_VAE.pth "
                         "models_t5_umt5-xxl-enc-bf16.pth")
                            .c_str()),
            0);
  auto c = neural_config("thread", 128);
  c.model_dir = dir;
  c.memory_budget = 1 << 20;  // 1 MiB: the tiny DiT alone needs more at 128 x 128
  try {
    Engine::create(c);
    FAIL() << "a 1 MiB budget was accepted";
  } catch (const Error& err) {
    const std::string what = err.what();
    EXPECT_NE(what.find("does not fit in memory at 128x128"), std::string::npos) << what;
    EXPECT_NE(what.find("nothing was loaded"), std::string::npos) << what;
    // The need in MiB (the companions are sized from their files: empty here) and the budget beside it.
    EXPECT_NE(what.find(" MiB on cpu, 1.0 free"), std::string::npos) << what;
  }
  c.memory_budget = uint64_t{64} << 30;  // fits: now the (empty) weight files are read, and refused
  try {
    Engine::create(c);
    FAIL() << "empty weight files were accepted";
  } catch (const Error& err) {
    EXPECT_EQ(std::string(err.what()).find("does not fit"), std::string::npos) << err.what();
  }
  (void)std::system(("rm -rf '" + dir + "'").c_str());
}

// A new picture in the middle of a stream takes effect at the next block, without restarting the stream: the frames
// before it are those of a run without the change, the frames after it differ, the indices run on.
TEST(EngineNeural, NewPictureMidStreamTakesEffectAtTheNextBlock) {
  const auto speech = speech_samples(30 * 640);
  const size_t first = 13 * 640;  // block 0 (12 frames) is complete with this much audio
  auto push_all = [&](Engine& e, const std::function<void()>& between, size_t* made_before) {
    std::vector<Frame> out;
    Frame f;
    e.push_audio(speech.data(), first);
    while (e.pop_frame(&f)) out.push_back(f);
    *made_before = out.size();
    between();
    e.push_audio(speech.data() + first, speech.size() - first);
    e.finish();
    while (e.pop_frame(&f)) out.push_back(f);
    return out;
  };
  auto plain = neural("inline");
  size_t before = 0;
  const auto a = push_all(*plain, [] {}, &before);
  auto switched = neural("inline");
  std::vector<uint8_t> other(320 * 240 * 3);
  for (size_t i = 0; i < other.size(); ++i) other[i] = static_cast<uint8_t>((i * 7) % 251);
  const auto b = push_all(*switched, [&] {
    switched->set_reference({other.data(), 320, 240, 320 * 3, liveavatar::PixelFormat::kRGB8});
  }, &before);
  ASSERT_EQ(before, 12u) << "block 0 is made (inline worker) before the new picture arrives";
  ASSERT_EQ(a.size(), 30u);
  ASSERT_EQ(b.size(), a.size());
  int changed = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    EXPECT_EQ(b[i].index, static_cast<int64_t>(i));
    if (i < before) EXPECT_EQ(b[i].rgb, a[i].rgb) << "frame " << i << " was made before the new picture";
    else changed += b[i].rgb != a[i].rgb;
  }
  EXPECT_EQ(changed, 18) << "every frame after the switch shows the new picture";
  EXPECT_EQ(switched->output_size().width, 64) << "the size stays";
}
