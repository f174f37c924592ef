// The planner's model shape from a dit::ModelConfig (for code that already has one; the planner itself reads
// config.json without LibTorch). SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include "dit/dit.h"
#include "planner.h"

namespace liveavatar::runtime {

inline PlannerModelShape planner_shape(const dit::ModelConfig& c) {
  PlannerModelShape m;
  m.dim = c.dim;
  m.ffn_dim = c.ffn_dim;
  m.num_heads = c.num_heads;
  m.num_layers = c.num_layers;
  m.in_dim = c.in_dim;
  m.out_dim = c.out_dim;
  m.cond_dim = c.cond_dim;
  m.text_dim = c.text_dim;
  m.text_len = c.text_len;
  m.freq_dim = c.freq_dim;
  m.audio_dim = c.audio_dim;
  m.audio_layers = c.audio_layers;
  m.num_audio_token = c.num_audio_token;
  m.patch_size = c.patch_size;
  m.audio_inject_layers = c.audio_inject_layers;
  m.enable_adain = c.enable_adain;
  m.adain_output_layers = c.adain_mode != "attn_norm";
  m.framepack_buckets = c.framepack_buckets;
  m.motion_frames = c.motion_frames;
  m.frames_per_block = c.frames_per_block;
  m.clip_frames = c.clip_frames;
  m.sampling_steps = c.sampling_steps;
  return m;
}

}  // namespace liveavatar::runtime
