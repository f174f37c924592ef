// gst-liveavatar audio encoder: wav2vec2 (facebook/wav2vec2-large-xlsr-53 fine-tuned, "wav2vec2-large-xlsr-53-english"
// in the LiveAvatar checkpoint) and the feature path that turns 16 kHz speech into the DiT's audio input.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
//   auto encoder = audio::AudioEncoder::from_folder(ckpt + "/wav2vec2-large-xlsr-53-english");  // HF folder
//   at::Tensor feats = encoder.features(samples);        // whole file: [25, 1024, video frames] (upstream path)
//
//   audio::AudioStream stream(encoder, {.left_context_s = 2.0});   // live audio of unknown length
//   stream.push(chunk);                                 // any size, mono float 16 kHz
//   at::Tensor ready = stream.pop();                    // [25, 1024, n] for the video frames now complete
//   at::Tensor tail = stream.finish();                  // the rest, up to ceil(samples / 640) frames
//
// Upstream (LiveAvatar @9c2c38d, wan_2_2/modules/s2v/audio_encoder.py + causal_s2v_pipeline.encode_audio):
//   samples -> Wav2Vec2Processor (zero mean, unit variance over the whole clip) -> Wav2Vec2ForCTC hidden states
//   (all 25: the projected features + positional conv, then each of the 24 pre-LN layers, the last after the final
//   norm) at 50 Hz -> linear interpolation to 30 Hz (align_corners) -> video frame k at 25 fps takes the 30 Hz frame
//   round(1.2 k) (frames past the audio are zeros, the count padded to a multiple of batch_frames).
//
// Thread-safety: an AudioEncoder is immutable after loading and may be shared by several threads and AudioStreams;
// an AudioStream is used from one thread at a time.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "liveavatar/engine.h"  // liveavatar::Error

namespace liveavatar::weights {
struct Checkpoint;
}

namespace liveavatar::audio {

/// An unusable audio encoder folder, config or input. what() names the file or value and what to do.
class AudioError : public Error {
 public:
  using Error::Error;
};

/// wav2vec2 shape: HF Wav2Vec2Config field names; defaults are wav2vec2-large-xlsr-53(-english).
struct Wav2Vec2Config {
  int64_t hidden_size = 1024;             // hidden_size
  int64_t num_hidden_layers = 24;         // num_hidden_layers (hidden states = layers + 1)
  int64_t num_attention_heads = 16;       // num_attention_heads
  int64_t intermediate_size = 4096;       // intermediate_size
  std::vector<int64_t> conv_dim{512, 512, 512, 512, 512, 512, 512};  // conv_dim
  std::vector<int64_t> conv_kernel{10, 3, 3, 3, 3, 2, 2};            // conv_kernel
  std::vector<int64_t> conv_stride{5, 2, 2, 2, 2, 2, 2};             // conv_stride
  bool conv_bias = true;                  // conv_bias
  int64_t num_conv_pos_embeddings = 128;  // num_conv_pos_embeddings (kernel of the positional conv)
  int64_t num_conv_pos_embedding_groups = 16;  // num_conv_pos_embedding_groups
  double layer_norm_eps = 1e-5;           // layer_norm_eps
  std::string feat_extract_norm = "layer";     // feat_extract_norm (only "layer" is supported: the xlsr family)
  bool do_stable_layer_norm = true;            // do_stable_layer_norm (only true: pre-LN encoder)
  int64_t vocab_size = 33;                     // vocab_size (rows of the CTC head lm_head: in the file, unused)
  std::string hidden_act = "gelu";             // hidden_act (exact erf GELU)
  std::string feat_extract_activation = "gelu";  // feat_extract_activation
  // preprocessor_config.json (Wav2Vec2FeatureExtractor)
  int64_t sampling_rate = 16000;  // sampling_rate
  bool do_normalize = true;       // do_normalize: zero mean, unit variance (eps 1e-7) per input

  /// A config.json (and, beside it, preprocessor_config.json when present). Absent fields keep the defaults.
  static Wav2Vec2Config from_json_file(const std::string& config_json);
  /// A tiny shape for tests (hidden 32, 24 layers, 2 heads, small convs).
  static Wav2Vec2Config tiny();
  /// Throws AudioError naming the first unsupported or inconsistent field.
  void validate() const;

  int64_t num_hidden_states() const { return num_hidden_layers + 1; }
  /// 50 Hz frames that the conv feature extractor makes of `samples` samples (0 when too short).
  int64_t frames_for_samples(int64_t samples) const;
  /// Samples per frame hop (320) and samples seen by one frame (400).
  int64_t hop() const;
  int64_t receptive_field() const;
};

/// The feature path from 50 Hz hidden states to the DiT's per-video-frame audio input.
struct FeatureOptions {
  double hidden_fps = 50.0;     // linear_interpolation input_fps
  double feature_fps = 30.0;    // AudioEncoder.video_rate (interpolation target)
  int64_t video_fps = 25;       // s2v_14B.sample_fps
  int64_t batch_frames = 48;    // infer_frames: the frame count is padded (zeros) to a multiple of it (> 0)
  int64_t m = 0;                // audio_sample_m: neighbours on each side, concatenated on the feature axis
};

/// Wav2Vec2Processor normalisation: (x - mean) / sqrt(var + 1e-7) over all of `samples` ([N] float) -> [N] float.
at::Tensor normalize_waveform(const at::Tensor& samples);

/// linear_interpolation(features, 50, 30): [L, T, D] -> [L, int(T / 50 * 30), D] (align_corners=True), float.
at::Tensor interpolate_hidden(const at::Tensor& hidden, const FeatureOptions& options = {});

/// The 30 Hz frame each video frame takes (get_sample_indices with fixed_start 0), for `frames` video frames.
std::vector<int64_t> video_frame_indices(int64_t frames, const FeatureOptions& options = {});

/// get_audio_embed_bucket_fps + encode_audio's permute: z [L, T30, D] -> [L, D * (2m + 1), frames] where
/// frames = (int(T30 / (batch_frames * 30/25)) + 1) * batch_frames (zeros past the audio). `num_repeat` gets the
/// number of batches (upstream's second return value) when not null.
at::Tensor bucket_features(const at::Tensor& z, const FeatureOptions& options = {}, int64_t* num_repeat = nullptr);

class Wav2Vec2Model;  // the module tree (engine/src/audio/wav2vec2.h)

/// wav2vec2 weights on one device. Immutable after load().
class AudioEncoder {
 public:
  /// Seeded random weights (tests and benches; load() replaces them).
  explicit AudioEncoder(const Wav2Vec2Config& config, c10::Device device = c10::kCPU,
                        c10::ScalarType dtype = c10::kFloat, uint64_t seed = 0);
  ~AudioEncoder();
  AudioEncoder(AudioEncoder&&) noexcept;
  AudioEncoder& operator=(AudioEncoder&&) noexcept;

  /// An HF folder: config.json (+ preprocessor_config.json) and model.safetensors or pytorch_model.bin.
  /// Missing files and wrong keys throw (AudioError / weights::WeightsError) naming the file.
  static AudioEncoder from_folder(const std::string& folder, c10::Device device = c10::kCPU,
                                  c10::ScalarType dtype = c10::kFloat);

  /// Strict load of an HF state dict (Wav2Vec2ForCTC or Wav2Vec2Model keys). "wav2vec2." is stripped; the CTC
  /// head (lm_head.*) and masked_spec_embed are not used and dropped; weight-norm parametrizations
  /// (parametrizations.weight.original0/1) are read as weight_g / weight_v. Anything else missing or extra throws.
  void load(const weights::Checkpoint& checkpoint);

  /// All hidden states of normalised input values [N] -> [layers + 1, T, hidden] float (T = frames_for_samples(N)).
  at::Tensor hidden_states(const at::Tensor& input_values) const;
  /// Processor normalisation (when do_normalize) + hidden_states: upstream's res.hidden_states, concatenated.
  at::Tensor encode(const at::Tensor& samples) const;
  /// The whole-file path of encode_audio: [layers + 1, hidden * (2m + 1), frames] float on the CPU.
  at::Tensor features(const at::Tensor& samples, const FeatureOptions& options = {},
                      int64_t* num_repeat = nullptr) const;

  const Wav2Vec2Config& config() const { return config_; }
  c10::Device device() const { return device_; }
  c10::ScalarType dtype() const { return dtype_; }
  Wav2Vec2Model& module() const;
  uint64_t parameter_count() const;

 private:
  Wav2Vec2Config config_;
  c10::Device device_;
  c10::ScalarType dtype_;
  std::shared_ptr<Wav2Vec2Model> module_;
};

/// Incremental (live) encoding of audio of unknown length.
///
/// Whole-file encoding sees the whole clip (the normalisation statistics, the positional conv and self-attention
/// span everything), so a live stream cannot reproduce it exactly. The stream encodes, for each batch of ready video
/// frames, a window of audio that starts `left_context_s` before the first sample those frames need and ends
/// `lookahead_s` after the last (less at the stream's ends), and maps video frame k to the 50 Hz position
/// round(1.2 k) * 5 / 3 (the whole-file grid stretches slightly with the clip length, which a stream cannot know).
/// docs/encoders.md gives the agreement with whole-file encoding for 1, 2 and 4 s of left context.
struct StreamOptions {
  double left_context_s = 2.0;   // audio before the frames being encoded (bounded: the cost per frame is constant)
  double lookahead_s = 0.0;      // audio after them that a frame waits for (adds latency)
  int64_t min_frames = 12;       // encode at least this many video frames per wav2vec2 call (12 = one DiT block)
  // Encode in groups of exactly min_frames frames at fixed positions (the last group at finish() may be shorter):
  // the features then do not depend on how the audio was chunked or when pop() was called.
  bool exact_groups = false;
  FeatureOptions features;       // video_fps, feature grid and m (batch_frames is ignored: no padding)
};

class AudioStream {
 public:
  AudioStream(const AudioEncoder& encoder, StreamOptions options = {});
  /// Appends mono samples at the encoder's sampling rate ([N] float, or a pointer and count).
  void push(const at::Tensor& samples);
  void push(const float* samples, size_t count);
  /// Features of every video frame that is now complete (its audio + lookahead has arrived), in groups of at least
  /// min_frames: [layers + 1, hidden * (2m + 1), n], n >= 0.
  at::Tensor pop();
  /// End of audio: the remaining frames up to ceil(samples * video_fps / sampling_rate).
  at::Tensor finish();
  /// Video frames returned so far.
  int64_t frames_out() const { return frames_out_; }
  /// Samples pushed so far.
  int64_t samples_in() const { return samples_in_; }

 private:
  at::Tensor encode_frames(int64_t first, int64_t count, bool at_end);
  at::Tensor encode_groups(int64_t groups);  // `groups` x min_frames frames, one wav2vec2 window each
  int64_t frames_ready(bool at_end) const;

  const AudioEncoder* encoder_;
  StreamOptions options_;
  std::vector<float> buffer_;   // samples from buffer_start_ on
  int64_t buffer_start_ = 0;    // absolute index of buffer_[0]
  int64_t samples_in_ = 0;
  int64_t frames_out_ = 0;
  bool finished_ = false;
};

}  // namespace liveavatar::audio
