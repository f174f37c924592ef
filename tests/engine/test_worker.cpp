// The generation worker: the same frames inline and threaded, push_audio() that only enqueues, wait_frame(),
// cancel from another thread, worker errors at the next call, the bounded frame queue, latency() and stats().
// A scripted backend (registered under "scripted") makes block timing and failures controllable.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "backend.h"
#include "test_util.h"

using liveavatar::Cancelled;
using liveavatar::Engine;
using liveavatar::Error;
using liveavatar::Frame;
using namespace std::chrono_literals;

namespace {

// What the scripted backend does; set before Engine::create (the factory reads it).
struct Script {
  int frames_per_block = 12;
  int block_ms = 0;          // time one block takes (checks the cancel flag every millisecond)
  int fail_at_block = -1;    // throws an Error in this block
  bool prefers_worker = true;
};
Script g_script;
std::atomic<int> g_blocks_started{0};

// Frames of 64x64 whose pixels are a checksum of their audio: the same audio gives the same frame.
class ScriptedBackend final : public liveavatar::Backend {
 public:
  explicit ScriptedBackend(const Script& s) : s_(s) {}
  void set_reference(const liveavatar::RgbImage&, liveavatar::Size, std::vector<std::string>*) override {}
  void set_output_size(liveavatar::Size) override {}
  liveavatar::FaceLayout face_layout() const override { return {}; }
  int frames_per_block() const override { return s_.frames_per_block; }
  bool prefers_worker() const override { return s_.prefers_worker; }
  void set_cancel_flag(const std::atomic<bool>* flag) override { cancel_ = flag; }
  void push_audio_frames(const float* samples, int frames) override {
    for (int i = 0; i < frames; ++i) {
      double sum = 0;
      for (int k = 0; k < 640; ++k) sum += samples[i * 640 + k];
      audio_.push_back(sum);
    }
    run_blocks(false);
  }
  void finish(int64_t total) override {
    while (static_cast<int64_t>(audio_.size()) + made_ < total) audio_.push_back(0);
    run_blocks(true);
  }
  bool render_next(Frame* f) override {
    if (ready_.empty()) return false;
    *f = std::move(ready_.front());
    ready_.erase(ready_.begin());
    return true;
  }
  void reset() override {
    audio_.clear();
    ready_.clear();
    made_ = 0;
    blocks_ = 0;
  }

 private:
  void run_blocks(bool at_end) {
    const size_t n = static_cast<size_t>(s_.frames_per_block);
    while (audio_.size() >= n || (at_end && !audio_.empty())) {
      ++g_blocks_started;
      for (int ms = 0; ms < s_.block_ms; ++ms) {
        if (cancel_ && cancel_->load()) throw Cancelled();
        std::this_thread::sleep_for(1ms);
      }
      if (blocks_ == s_.fail_at_block) throw Error("scripted failure in block " + std::to_string(blocks_));
      while (audio_.size() < n) audio_.push_back(0);  // the padded last block
      for (size_t i = 0; i < n; ++i) {
        Frame f;
        f.index = made_++;
        f.width = f.height = 64;
        f.rgb.assign(64 * 64 * 3, static_cast<uint8_t>(static_cast<int64_t>(audio_[i] * 1000) & 0xff));
        ready_.push_back(std::move(f));
      }
      audio_.erase(audio_.begin(), audio_.begin() + static_cast<std::ptrdiff_t>(n));
      ++blocks_;
    }
  }
  Script s_;
  const std::atomic<bool>* cancel_ = nullptr;
  std::vector<double> audio_;
  std::vector<Frame> ready_;
  int64_t made_ = 0;
  int blocks_ = 0;
};

std::unique_ptr<liveavatar::Backend> make_scripted(const liveavatar::EngineConfig&) {
  return std::make_unique<ScriptedBackend>(g_script);
}

std::unique_ptr<Engine> scripted_engine(const Script& s, const std::string& worker = "auto", int queue = 0) {
  g_script = s;
  liveavatar::register_backend("scripted", &make_scripted);
  auto c = testutil::config();
  c.backend = "scripted";
  c.worker = worker;
  c.max_queued_frames = queue;
  auto e = Engine::create(c);
  e->set_reference(testutil::portrait().view());
  return e;
}

std::unique_ptr<Engine> puppet(const std::string& worker) {
  auto c = testutil::config(3);
  c.worker = worker;
  auto e = Engine::create(c);
  e->set_reference(testutil::portrait().view());
  return e;
}

std::vector<float> speech_seconds(double s) {
  const auto& sp = testutil::speech();
  return std::vector<float>(sp.begin(), sp.begin() + static_cast<std::ptrdiff_t>(s * 16000));
}

}  // namespace

TEST(Worker, PuppetFramesAreTheSameInlineAndThreaded) {
  const auto audio = speech_seconds(3.03);
  auto a = puppet("inline");
  auto b = puppet("thread");
  EXPECT_FALSE(a->stats().threaded);
  EXPECT_TRUE(b->stats().threaded);
  const auto fa = testutil::render(*a, audio, 1000);
  const auto fb = testutil::render(*b, audio, 1000);
  ASSERT_EQ(fa.size(), 76u);
  ASSERT_EQ(fb.size(), fa.size());
  for (size_t i = 0; i < fa.size(); ++i) {
    ASSERT_EQ(fb[i].index, static_cast<int64_t>(i));
    ASSERT_EQ(fa[i].rgb, fb[i].rgb) << "frame " << i;
  }
}

TEST(Worker, BlockBackendGivesExactLengthInBothModes) {
  for (const char* mode : {"inline", "thread"})
    for (size_t samples : {0u, 1u, 639u, 7680u, 7681u, 20000u}) {
      Script s;
      auto e = scripted_engine(s, mode);
      const auto frames = testutil::render(*e, testutil::vowel(samples), 1234);
      ASSERT_EQ(frames.size(), (samples + 639) / 640) << mode << ", " << samples << " samples";
      for (size_t i = 0; i < frames.size(); ++i) ASSERT_EQ(frames[i].index, static_cast<int64_t>(i));
      EXPECT_TRUE(e->done());
    }
}

TEST(Worker, PushOnlyEnqueuesAndFramesArriveLater) {
  Script s;
  s.block_ms = 150;
  auto e = scripted_engine(s);
  const auto audio = testutil::vowel(4 * 7680);  // four blocks: 600 ms of work
  const auto t0 = std::chrono::steady_clock::now();
  e->push_audio(audio.data(), audio.size());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 100ms) << "push_audio waited for the model";
  Frame f;
  EXPECT_FALSE(e->pop_frame(&f)) << "no block can be ready yet";
  EXPECT_EQ(e->stats().frames_pending, 48);
  ASSERT_TRUE(e->wait_frame(&f, 5000ms));
  EXPECT_EQ(f.index, 0);
  e->finish();
  int n = 1;
  while (e->pop_frame(&f)) ++n;
  EXPECT_EQ(n, 48);
}

TEST(Worker, WaitFrameTimesOutWhenNothingComes) {
  Script s;
  auto e = scripted_engine(s);
  const auto audio = testutil::vowel(640 * 5);  // less than a block: nothing until finish()
  e->push_audio(audio.data(), audio.size());
  Frame f;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(e->wait_frame(&f, 50ms));
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 45ms);
  e->finish();
  ASSERT_TRUE(e->wait_frame(&f, 5000ms));
  EXPECT_EQ(f.index, 0);
}

TEST(Worker, CancelFromAnotherThreadStopsARunningBlockQuickly) {
  Script s;
  s.block_ms = 60000;  // a block that would take a minute
  auto e = scripted_engine(s);
  g_blocks_started = 0;
  const auto audio = testutil::vowel(7680);
  e->push_audio(audio.data(), audio.size());
  while (g_blocks_started == 0) std::this_thread::sleep_for(1ms);
  std::thread canceller([&] { e->cancel(); });
  const auto t0 = std::chrono::steady_clock::now();
  Frame f;
  EXPECT_THROW(e->wait_frame(&f, 10000ms), Cancelled);
  canceller.join();
  EXPECT_THROW(e->push_audio(audio.data(), audio.size()), Cancelled);
  e->reset();  // waits for the worker to leave the block
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1000ms);
  EXPECT_EQ(e->samples_pushed(), 0);
}

TEST(Worker, CancelledEngineIsReusableAfterReset) {
  Script s;
  s.block_ms = 20;
  auto e = scripted_engine(s);
  const auto audio = testutil::vowel(3 * 7680);
  e->push_audio(audio.data(), audio.size());
  e->cancel();
  Frame f;
  EXPECT_THROW(e->pop_frame(&f), Cancelled);
  e->reset();
  const auto frames = testutil::render(*e, audio, 7680);
  ASSERT_EQ(frames.size(), 36u);
  EXPECT_EQ(frames.back().index, 35);
}

TEST(Worker, WorkerErrorSurfacesAtTheNextCallUntilReset) {
  Script s;
  s.fail_at_block = 1;
  auto e = scripted_engine(s);
  const auto audio = testutil::vowel(3 * 7680);
  e->push_audio(audio.data(), audio.size());
  Frame f;
  int got = 0;
  try {
    while (got < 36) {
      if (e->wait_frame(&f, 5000ms)) ++got;
    }
    FAIL() << "no error";
  } catch (const Cancelled&) {
    FAIL() << "an error is not a cancellation";
  } catch (const Error& err) {
    EXPECT_EQ(std::string(err.what()), "scripted failure in block 1");
  }
  EXPECT_EQ(got, 12) << "the frames of block 0 come out before the error";
  try {
    e->push_audio(audio.data(), 640);
    FAIL() << "push_audio after a worker error";
  } catch (const Error& err) {
    EXPECT_EQ(std::string(err.what()), "scripted failure in block 1");
  }
  EXPECT_THROW(e->finish(), Error);
  e->reset();
  g_script.fail_at_block = -1;
  EXPECT_EQ(testutil::render(*e, testutil::vowel(7680), 7680).size(), 12u) << "reset clears the error";
}

TEST(Worker, FrameQueueIsBounded) {
  Script s;
  s.frames_per_block = 4;
  auto e = scripted_engine(s, "thread", /*queue=*/10);
  const auto audio = testutil::vowel(640 * 100);
  e->push_audio(audio.data(), audio.size());
  std::this_thread::sleep_for(200ms);  // the worker runs until the queue is full
  auto st = e->stats();
  EXPECT_GE(st.frames_queued, 10);
  EXPECT_LE(st.frames_queued, 10 + 4) << "at most one block beyond the bound";
  EXPECT_GE(st.frames_pending, 100 - 14);
  e->finish();
  Frame f;
  int n = 0;
  while (e->pop_frame(&f)) {
    EXPECT_LE(e->stats().frames_queued, 14);
    ++n;
  }
  EXPECT_EQ(n, 100);
}

TEST(Worker, LatencyIsBlockLengthPlusProcessingPlusQueue) {
  Script s;
  s.block_ms = 40;
  auto e = scripted_engine(s);
  const auto audio = testutil::vowel(7680);
  e->push_audio(audio.data(), audio.size());
  Frame f;
  ASSERT_TRUE(e->wait_frame(&f, 5000ms));
  const auto st = e->stats();
  EXPECT_EQ(st.frames_per_block, 12);
  EXPECT_EQ(st.blocks_done, 1);
  EXPECT_GE(st.ms_per_block, 39.0);
  EXPECT_LT(st.ms_per_block, 1000.0);
  EXPECT_GT(st.ms_first_frame, 39.0);
  const auto idle = e->latency();
  EXPECT_GE(idle, 480ms + 39ms) << "one block of audio (12 x 40 ms) plus its processing";
  // Five more blocks queued behind the one in progress: the latency says so.
  const auto more = testutil::vowel(6 * 7680);
  e->push_audio(more.data(), more.size());
  EXPECT_GE(e->latency(), idle + 4 * 39ms);
  e->cancel();
  e->reset();
}

TEST(Worker, PuppetLatencyIsAboutOneFrame) {
  auto e = puppet("auto");
  const auto audio = testutil::vowel(16000);
  const auto frames = testutil::render(*e, audio, 640);
  ASSERT_EQ(frames.size(), 25u);
  EXPECT_GE(e->latency(), 40ms);
  EXPECT_LT(e->latency(), 200ms);
  EXPECT_EQ(e->stats().frames_taken, 25);
}

// skip_to() while block 0 is being made: block 1 (frames 12-23) is dropped unmade, frames 0-11 and 24-29 are made
// and discarded; the next frames are 30, 31, ... up to the same total as without skipping.
TEST(Worker, SkipToDropsStaleBlocksAndKeepsTheIndices) {
  Script s;
  s.block_ms = 150;
  auto e = scripted_engine(s);
  const auto audio = testutil::vowel(48 * 640);
  g_blocks_started = 0;
  e->push_audio(audio.data(), audio.size());
  for (int i = 0; i < 100 && g_blocks_started == 0; ++i) std::this_thread::sleep_for(1ms);
  ASSERT_EQ(g_blocks_started, 1) << "block 0 is in progress";
  e->skip_to(30);
  e->finish();
  std::vector<int64_t> got;
  Frame f;
  while (e->pop_frame(&f)) got.push_back(f.index);
  ASSERT_EQ(got.size(), 18u);
  for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], 30 + static_cast<int64_t>(i));
  EXPECT_EQ(g_blocks_started, 3) << "blocks 0, 2 and 3 made; block 1 dropped unmade";
  EXPECT_EQ(e->stats().frames_skipped, 30);
  EXPECT_EQ(e->stats().frames_pending, 0);
  EXPECT_TRUE(e->done());
}

// Inline (the puppet): skip_to() passes over the frames without drawing them; the next frame is the one asked for.
TEST(Worker, SkipToInlinePassesOverFrames) {
  auto e = puppet("inline");
  const auto audio = testutil::vowel(20 * 640);
  e->push_audio(audio.data(), audio.size());
  e->skip_to(15);
  Frame f;
  ASSERT_TRUE(e->pop_frame(&f));
  EXPECT_EQ(f.index, 15);
  e->skip_to(30);  // ahead of the audio: frames 16-19 now, the rest when their audio comes
  const auto more = testutil::vowel(20 * 640);
  e->push_audio(more.data(), more.size());
  ASSERT_TRUE(e->pop_frame(&f));
  EXPECT_EQ(f.index, 30);
  EXPECT_EQ(e->stats().frames_skipped, 29);
}

// The tests-only slow puppet: frames in blocks of 12 on the worker, each block after the configured delay.
TEST(Worker, TestingBlockDelayMakesThePuppetASlowBlockBackend) {
  auto c = testutil::config(3);
  c.testing_block_delay_ms = 100;
  auto e = Engine::create(c);
  e->set_reference(testutil::portrait().view());
  EXPECT_EQ(e->stats().frames_per_block, 12);
  EXPECT_TRUE(e->stats().threaded);
  const auto audio = testutil::vowel(30 * 640 + 100);
  const auto t0 = std::chrono::steady_clock::now();
  e->push_audio(audio.data(), audio.size());
  e->finish();
  int n = 0;
  Frame f;
  while (e->pop_frame(&f)) EXPECT_EQ(f.index, n++);
  EXPECT_EQ(n, 31);
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 300ms) << "three blocks of 100 ms";
  c.testing_block_delay_ms = -1;
  EXPECT_THROW(Engine::create(c), Error);
}

// Fewer denoising steps (Engine::set_denoising_steps): the block backend makes the next blocks with them, the stats
// say so, and a block then takes that share of the time (the slow puppet's 4 steps of equal cost).
TEST(Worker, DenoisingStepsApplyToTheNextBlocks) {
  auto c = testutil::config(3);
  c.testing_block_delay_ms = 400;
  auto e = Engine::create(c);
  e->set_reference(testutil::portrait().view());
  EXPECT_EQ(e->stats().steps_full, 4);
  EXPECT_EQ(e->stats().steps, 4);
  EXPECT_THROW(e->set_denoising_steps(-1), Error);
  e->set_denoising_steps(9);
  EXPECT_EQ(e->stats().steps, 4) << "clamped to the full count";
  e->set_denoising_steps(1);
  EXPECT_EQ(e->stats().steps, 1);
  const auto audio = testutil::vowel(24 * 640);
  const auto t0 = std::chrono::steady_clock::now();
  e->push_audio(audio.data(), audio.size());
  e->finish();
  Frame f;
  int n = 0;
  while (e->pop_frame(&f)) ++n;
  EXPECT_EQ(n, 24);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 700ms) << "two blocks of 1 step: 2 x 100 ms, not 2 x 400 ms";
  EXPECT_EQ(e->stats().steps_last_block, 1);
  EXPECT_EQ(e->stats().blocks_degraded, 2);
  e->reset();
  EXPECT_EQ(e->stats().steps, 4) << "a new stream starts at full quality";
  EXPECT_EQ(e->stats().blocks_degraded, 0);
  // The puppet without blocks has no steps.
  auto puppet = Engine::create(testutil::config(3));
  EXPECT_EQ(puppet->stats().steps_full, 1);
}

TEST(Worker, UnknownWorkerModeIsRejected) {
  auto c = testutil::config();
  c.worker = "fibers";
  EXPECT_THROW(Engine::create(c), Error);
  c.worker = "auto";
  c.max_queued_frames = -1;
  EXPECT_THROW(Engine::create(c), Error);
}
