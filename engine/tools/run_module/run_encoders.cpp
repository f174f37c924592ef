// liveavatar-run-module: the conditioning encoder modules (wav2vec2, audio_features, tokenize, t5_encode).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <sys/stat.h>

#include "audio/audio_encoder.h"
#include "text/text_encoder.h"
#include "run_module.h"

namespace liveavatar::dit::tool {
namespace {

const at::Tensor& need(const TensorMap& in, const std::string& name, const std::string& module) {
  const auto it = in.find(name);
  if (it == in.end()) throw Error("module '" + module + "' needs the input tensor '" + name + "'");
  return it->second;
}
int64_t opt_int(const TensorMap& in, const std::string& name, int64_t fallback) {
  const auto it = in.find(name);
  return it == in.end() ? fallback : it->second.reshape({-1})[0].item<int64_t>();
}

audio::AudioEncoder audio_encoder(const RunRequest& r) {
  if (!r.weights.empty()) return audio::AudioEncoder::from_folder(r.weights);
  const auto config = !r.config.empty() ? audio::Wav2Vec2Config::from_json_file(r.config)
                      : r.tiny          ? audio::Wav2Vec2Config::tiny()
                                        : audio::Wav2Vec2Config{};
  return audio::AudioEncoder(config, c10::kCPU, c10::kFloat, r.seed);
}

text::T5Config t5_config(const RunRequest& r) {
  if (!r.config.empty()) return text::T5Config::from_json_file(r.config);
  return r.tiny ? text::T5Config::tiny() : text::T5Config{};
}

std::string prompt_text(const TensorMap& in, const std::string& module) {
  const auto bytes = need(in, "prompt", module).reshape({-1}).to(at::kByte).contiguous();
  return std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), static_cast<size_t>(bytes.numel()));
}

}  // namespace

std::string encoder_modules_help() {
  return R"(Encoder modules (--weights: the HF wav2vec2 folder / the umT5 .pth or .safetensors / the tokenizer):
  wav2vec2          waveform [N] (16 kHz) or input_values [N]  -> hidden_states [25, T, hidden]
  audio_features    waveform [N] [, batch_frames (48), m (0)]  -> audio_emb [25, hidden, frames], feat_30fps,
                                                                  num_repeat
  tokenize          prompt [bytes] (UTF-8 as uint8) [, text_len (512)]  -> ids [text_len], mask [text_len],
                                                                  length (--weights: spiece.model or its folder)
  t5_encode         ids [L], mask [L]                          -> context [L, dim] (fp32; --tiny / --config
                                                                  config.json for the shape))";
}

bool run_encoders(const RunRequest& request, const TensorMap& inputs, TensorMap& out) {
  const std::string& mod = request.module;
  if (mod != "wav2vec2" && mod != "audio_features" && mod != "tokenize" && mod != "t5_encode") return false;
  at::NoGradGuard no_grad;
  if (mod == "wav2vec2") {
    const auto enc = audio_encoder(request);
    const auto it = inputs.find("input_values");
    out["hidden_states"] = it != inputs.end() ? enc.hidden_states(it->second)
                                              : enc.encode(need(inputs, "waveform", mod));
  } else if (mod == "audio_features") {
    const auto enc = audio_encoder(request);
    audio::FeatureOptions o;
    o.batch_frames = opt_int(inputs, "batch_frames", o.batch_frames);
    o.m = opt_int(inputs, "m", o.m);
    const auto& wave = need(inputs, "waveform", mod);
    const auto z = audio::interpolate_hidden(enc.encode(wave), o);
    int64_t nr = 0;
    out["audio_emb"] = audio::bucket_features(z, o, &nr);
    out["feat_30fps"] = z;
    out["num_repeat"] = at::scalar_tensor(nr, at::kLong);
  } else if (mod == "tokenize") {
    if (request.weights.empty()) throw Error("tokenize needs --weights <spiece.model or its folder>");
    const text::Tokenizer tok(request.weights, opt_int(inputs, "text_len", 512));
    const auto t = tok.encode(prompt_text(inputs, mod));
    out["ids"] = at::tensor(t.ids, at::kLong);
    out["mask"] = at::tensor(t.mask, at::kLong);
    out["length"] = at::scalar_tensor(t.length, at::kLong);
  } else {  // t5_encode
    const auto config = t5_config(request);
    const auto enc = request.weights.empty()
                         ? text::TextEncoder(config, c10::kCPU, c10::kFloat, static_cast<int64_t>(request.seed))
                         : text::TextEncoder::from_file(request.weights, config, c10::kCPU, c10::kFloat);
    out["context"] = enc.encode_ids(need(inputs, "ids", mod), need(inputs, "mask", mod));
  }
  return true;
}

}  // namespace liveavatar::dit::tool
