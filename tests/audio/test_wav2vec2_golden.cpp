// wav2vec2 golden tests: hidden states, intermediates and the feature path against upstream (tests/fixtures/wav2vec2).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>

#include "audio/audio_encoder.h"
#include "weights/weights.h"
#include "test_util.h"
#include "wav2vec2.h"

namespace liveavatar::audio {
namespace {

using test::close;
// wav2vec2 runs in fp32 only (no bf16 / fp16 rounding): kernels differ per CPU by a few ulp per reduction.
constexpr auto kTol = golden::kFp32;

const std::string kDir = WAV2VEC2_FIXTURES_DIR;
const std::string kModel = kDir + "/wav2vec2-large-xlsr-53-english";

const weights::Checkpoint& fixture() {
  static const weights::Checkpoint ck = weights::load_safetensors(kDir + "/audio_features.safetensors");
  return ck;
}
const at::Tensor& golden(const std::string& name) { return fixture().tensors.at(name); }

const AudioEncoder& encoder() {
  static const AudioEncoder e = AudioEncoder::from_folder(kModel);
  return e;
}

TEST(Wav2Vec2Golden, ConfigFromFolder) {
  const auto& c = encoder().config();
  EXPECT_EQ(c.hidden_size, 32);
  EXPECT_EQ(c.num_hidden_layers, 24);
  EXPECT_EQ(c.num_conv_pos_embeddings, 16);
  EXPECT_TRUE(c.do_normalize);
  EXPECT_EQ(c.frames_for_samples(32000), 99);
  EXPECT_EQ(c.frames_for_samples(12345), 38);
  EXPECT_EQ(c.hop(), 320);
  EXPECT_EQ(c.receptive_field(), 400);
}

TEST(Wav2Vec2Golden, ProcessorNormalisation) {
  EXPECT_TRUE(close(normalize_waveform(golden("waveform")), golden("input_values"), "input_values", kTol));
  EXPECT_TRUE(close(normalize_waveform(golden("short.waveform")), golden("short.input_values"),
                    "short.input_values", kTol));
}

TEST(Wav2Vec2Golden, Intermediates) {
  at::NoGradGuard no_grad;
  auto& m = *encoder().module();
  auto x = golden("input_values").unsqueeze(0).unsqueeze(1);  // [1, 1, N]
  for (size_t i = 0; i < m.feature_extractor->conv_layers->size(); ++i) {
    x = m.feature_extractor->conv_layers->ptr<ConvLayerImpl>(i)->forward(x);
    const auto& r = golden("conv" + std::to_string(i) + "_out");
    EXPECT_TRUE(close(x[0].slice(1, 0, r.size(1)), r, "conv" + std::to_string(i) + "_out", kTol));
  }
  const auto proj = m.feature_projection(x.transpose(1, 2));
  EXPECT_TRUE(close(proj[0], golden("feature_projection"), "feature_projection", kTol));
  EXPECT_TRUE(close(m.encoder->pos_conv_embed->conv->weight(), golden("pos_conv_effective_weight"),
                    "pos_conv_effective_weight", kTol));
  EXPECT_TRUE(close(m.encoder->pos_conv_embed(proj)[0], golden("pos_conv_embed"), "pos_conv_embed", kTol));
}

TEST(Wav2Vec2Golden, HiddenStates) {
  EXPECT_TRUE(close(encoder().hidden_states(golden("input_values")), golden("hidden_states"),
                    "hidden_states [25,99,32]", kTol));
  EXPECT_TRUE(close(encoder().encode(golden("waveform")), golden("hidden_states"),
                    "hidden_states from waveform", kTol));
  EXPECT_TRUE(close(encoder().encode(golden("short.waveform")), golden("short.hidden_states"),
                    "short.hidden_states", kTol));
}

TEST(Wav2Vec2Golden, FeaturePath) {
  for (const std::string p : {"", "short."}) {
    const auto z = interpolate_hidden(golden(p + "hidden_states"));
    EXPECT_TRUE(close(z, golden(p + "feat_30fps"), p + "feat_30fps", kTol));
    const auto& bidx = golden(p + "bucket_idx");
    const auto idx = video_frame_indices(bidx.numel());
    EXPECT_TRUE(at::equal(at::tensor(idx, at::kLong), bidx)) << p << "bucket_idx";
    int64_t nr = 0;
    const auto emb = encoder().features(golden(p + "waveform"), {}, &nr);
    EXPECT_TRUE(close(emb, golden(p + "audio_emb")[0], p + "audio_emb (waveform -> buckets)", kTol));
    EXPECT_EQ(nr, golden(p + "num_repeat").item<int64_t>());
  }
}

TEST(Wav2Vec2Golden, InterpolationLengthInDouble) {
  // int(T / 50.0 * 30) is one less than floor(3T / 5) for some T (e.g. 205): reproduce upstream, not the exact value.
  const auto z = interpolate_hidden(at::zeros({1, 205, 2}));
  EXPECT_EQ(z.size(1), static_cast<int64_t>(205 / 50.0 * 30));
}

}  // namespace
}  // namespace liveavatar::audio
