// AudioStream: frame count contract, the fixed feature grid, chunking, and the agreement with whole-file encoding
// for 1 / 2 / 4 s of left context (printed; the figures go to docs/encoders.md).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>

#include <cmath>

#include "audio/audio_encoder.h"
#include "weights/weights.h"
#include "media_io.h"
#include "test_util.h"

namespace liveavatar::audio {
namespace {

const std::string kDir = WAV2VEC2_FIXTURES_DIR;

const AudioEncoder& encoder() {
  static const AudioEncoder e = AudioEncoder::from_folder(kDir + "/wav2vec2-large-xlsr-53-english");
  return e;
}

at::Tensor waveform() {
  return weights::load_safetensors(kDir + "/audio_features.safetensors").tensors.at("waveform").clone();
}

at::Tensor run_stream(const at::Tensor& audio, StreamOptions options, int64_t chunk) {
  AudioStream stream(encoder(), options);
  std::vector<at::Tensor> parts;
  for (int64_t s = 0; s < audio.numel(); s += chunk) {
    stream.push(audio.slice(0, s, std::min(s + chunk, audio.numel())));
    parts.push_back(stream.pop());
  }
  parts.push_back(stream.finish());
  EXPECT_EQ(stream.frames_out(), (audio.numel() * 25 + 15999) / 16000);
  return at::cat(parts, 2);  // [L, D, frames]
}

TEST(AudioStream, FrameCountIsCeilOfDuration) {
  for (const int64_t n : {0, 1, 399, 640, 641, 12345, 32000}) {
    AudioStream stream(encoder());
    stream.push(at::rand({n}));
    const auto a = stream.pop();
    const auto b = stream.finish();
    EXPECT_EQ(a.size(2) + b.size(2), (n * 25 + 15999) / 16000) << n << " samples";
    EXPECT_EQ(b.size(0), 25);
    EXPECT_EQ(b.size(1), 32);
  }
}

TEST(AudioStream, WholeClipAtOnceUsesTheFixedGrid) {
  // Everything pushed before finish(): one window, so the 50 Hz states are the whole-file ones and frame k is the
  // linear interpolation at 50 Hz position round(1.2 k) * 5 / 3.
  const auto audio = waveform();
  StreamOptions o;
  o.left_context_s = 10.0;
  AudioStream stream(encoder(), o);
  stream.push(audio);
  const auto got = stream.finish();  // [25, 32, 50]
  const auto z = encoder().encode(audio);  // [25, 99, 32]
  ASSERT_EQ(got.size(2), 50);
  std::vector<at::Tensor> expect;
  for (int64_t k = 0; k < got.size(2); ++k) {
    const double p = std::nearbyint(1.2 * k) * 5.0 / 3.0;
    const auto f0 = static_cast<int64_t>(std::floor(p));
    const double w = p - f0;
    const auto f1 = std::min<int64_t>(f0 + 1, z.size(1) - 1);
    expect.push_back(z.select(1, std::min<int64_t>(f0, z.size(1) - 1)) * (1 - w) + z.select(1, f1) * w);
  }
  EXPECT_TRUE(test::close(got, at::stack(expect, 2), "stream, whole clip at once", 1e-6));
}

TEST(AudioStream, PopWaitsForMinFramesAndLookahead) {
  StreamOptions o;
  o.min_frames = 12;
  o.lookahead_s = 0.2;
  AudioStream stream(encoder(), o);
  stream.push(at::rand({7680}));  // 12 frames of audio, but not their lookahead
  EXPECT_EQ(stream.pop().size(2), 0);
  stream.push(at::rand({3200 + 400}));
  EXPECT_GE(stream.pop().size(2), 12);
}

// exact_groups: the features do not depend on the chunking of the audio nor on when pop() was called.
TEST(AudioStream, ExactGroupsMakeFeaturesIndependentOfChunking) {
  const auto audio = at::rand({40000}) - 0.5;  // 2.5 s: 63 frames, 5 whole groups of 12 and a tail of 3
  auto run = [&](int64_t chunk, bool pop_each) {
    StreamOptions o;
    o.exact_groups = true;
    AudioStream stream(encoder(), o);
    std::vector<at::Tensor> parts;
    for (int64_t at = 0; at < audio.size(0); at += chunk) {
      stream.push(audio.slice(0, at, std::min<int64_t>(at + chunk, audio.size(0))));
      if (pop_each) parts.push_back(stream.pop());
    }
    parts.push_back(stream.finish());
    return at::cat(parts, 2);
  };
  const auto whole = run(40000, false);
  ASSERT_EQ(whole.size(2), 63);
  for (const auto& [chunk, pop_each] : {std::pair<int64_t, bool>{333, true}, {7680, true}, {1000, false}}) {
    const auto other = run(chunk, pop_each);
    EXPECT_TRUE(at::equal(other, whole)) << "chunks of " << chunk << (pop_each ? ", pop after each" : "");
  }
}

TEST(AudioStream, PushAfterFinishIsAnError) {
  AudioStream stream(encoder());
  stream.finish();
  EXPECT_THROW(stream.push(at::zeros({10})), AudioError);
}

// Cosine similarity per video frame between the stream and the whole-file path (flattened over layers x channels).
void agreement(const at::Tensor& audio, const std::string& name) {
  const auto whole = encoder().features(audio);  // [25, 32, padded frames]
  const std::pair<double, double> settings[] = {{1.0, 0.0}, {2.0, 0.0}, {4.0, 0.0}, {2.0, 0.32}};
  for (const auto& [ctx, lookahead] : settings) {
    StreamOptions o;
    o.left_context_s = ctx;
    o.lookahead_s = lookahead;
    const auto live = run_stream(audio, o, /*chunk=*/1280);  // 80 ms pushes
    const int64_t n = std::min(live.size(2), whole.size(2));
    // Frames whose 30 Hz index is past the whole-file features are zeros there: compare frames with audio only.
    const int64_t valid = std::min<int64_t>(n, interpolate_hidden(encoder().encode(audio)).size(1) * 25 / 30);
    const auto a = live.slice(2, 0, valid).permute({2, 0, 1}).reshape({valid, -1});
    const auto b = whole.slice(2, 0, valid).permute({2, 0, 1}).reshape({valid, -1});
    const auto cos = at::cosine_similarity(a, b, 1);
    std::printf("[agreement] %-10s left context %.0f s, lookahead %.2f s: %lld frames, cosine min %.4f mean %.4f "
                "(tiny fixture model)\n", name.c_str(), ctx, lookahead, static_cast<long long>(valid),
                cos.min().item<double>(), cos.mean().item<double>());
    EXPECT_GT(cos.mean().item<double>(), 0.9);
  }
}

TEST(AudioStream, AgreementWithWholeFile) {
  agreement(waveform(), "fixture");
  int rate = 0;
  const auto speech = io::read_audio(SPEECH_WAV, &rate);
  ASSERT_EQ(rate, 16000);
  agreement(at::from_blob(const_cast<float*>(speech.data()), {static_cast<int64_t>(speech.size())}, at::kFloat).clone(),
            "speech.wav");
}

}  // namespace
}  // namespace liveavatar::audio
