// Golden tests of the whole model against upstream: sink prefill + one wrapped-ring inference call with its
// intermediates (model_forward), the audio path (audio_path), and the streaming loop with and without the rolling
// sink (streaming, streaming_refresh). The model-level runs go through liveavatar-run-module's library.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/CPUGeneratorImpl.h>

#include <functional>

#include "golden_util.h"
#include "run_module.h"

namespace liveavatar::dit::test {
namespace {

using tool::TensorMap;

const at::Tensor& at_key(const weights::Checkpoint& ck, const std::string& k) {
  const auto it = ck.tensors.find(k);
  if (it == ck.tensors.end()) throw std::runtime_error("fixture has no tensor " + k);
  return it->second;
}

tool::RunRequest fixture_request(const std::string& module) {
  tool::RunRequest r;
  r.module = module;
  r.weights = fixture_dir();  // weights.safetensors + config.json (constructor_args)
  return r;
}

class ModelGolden : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_fixture("model_forward.safetensors")) GTEST_SKIP() << "no model_forward.safetensors fixture";
    ck_ = weights::load_safetensors(fixture("model_forward.safetensors"));
  }
  const at::Tensor& t(const std::string& k) { return at_key(ck_, k); }
  TensorMap inputs() {
    TensorMap in{{"ref_latents", t("in.ref_latents")},   {"motion_latents", t("in.motion_latents")},
                 {"context", t("in.context")},           {"x", t("in.noisy_latent")},
                 {"t", t("in.t")},                        {"audio", t("in.audio_input")},
                 {"cond_states", t("in.cond_states")},   {"current_start", t("in.current_start")},
                 {"rope_offset", t("inf.rope_rel_dist")}};
    for (int l = 0; l < 2; ++l) {
      in["kv_k." + std::to_string(l)] = t("in.ring.layer" + std::to_string(l) + ".k");
      in["kv_v." + std::to_string(l)] = t("in.ring.layer" + std::to_string(l) + ".v");
    }
    return in;
  }
  weights::Checkpoint ck_;
};

TEST_F(ModelGolden, SinkPrefillCondCacheMatchesUpstream) {
  const auto out = tool::run(fixture_request("sink"), inputs());
  for (int l = 0; l < 2; ++l) {
    const auto L = std::to_string(l);
    // Layer 1's input has been through layer 0's bf16 rounding before norm3.
    const auto tol = l == 0 ? golden::kFp32 : golden::kBf16Rounded;
    EXPECT_TRUE(close(out.at("cond_k." + L), t("sink.layer" + L + ".cond_k"), "sink layer" + L + " cond_k", tol));
    EXPECT_TRUE(close(out.at("cond_v." + L), t("sink.layer" + L + ".cond_v"), "sink layer" + L + " cond_v", tol));
  }
}

TEST_F(ModelGolden, InferenceVelocityAndRingMatchUpstream) {
  const auto out = tool::run(fixture_request("block"), inputs());
  EXPECT_TRUE(close(out.at("noise_pred"), t("out.velocity"), "model velocity (wrapped ring, offset 7)",
                    golden::kBf16Rounded));
  for (int l = 0; l < 2; ++l) {
    const auto L = std::to_string(l);
    const auto tol = l == 0 ? golden::kFp32 : golden::kBf16Rounded;
    EXPECT_TRUE(close(out.at("kv_k." + L).slice(1, 96, 192), t("inf.ring_written.layer" + L + ".k"),
                      "ring layer" + L + " k written", tol));
    EXPECT_TRUE(close(out.at("kv_v." + L).slice(1, 96, 192), t("inf.ring_written.layer" + L + ".v"),
                      "ring layer" + L + " v written", tol));
    // Rows outside the written block are left as they were.
    EXPECT_TRUE(at::equal(out.at("kv_k." + L).slice(1, 192), t("in.ring.layer" + L + ".k").slice(1, 192)));
  }
}

TEST_F(ModelGolden, EmbeddingsAndIntermediatesMatchUpstream) {
  at::NoGradGuard no_grad;
  auto model = load_fixture_model();
  EXPECT_TRUE(close(model->embed_text(t("in.context")), t("inf.text_embedding"), "text_embedding", golden::kFp32));
  auto [e, e0] = model->embed_time(t("in.t").reshape({-1}));
  EXPECT_TRUE(close(e, t("inf.time_embedding").slice(0, 0, 3), "time_embedding (head e)", golden::kFp32));
  EXPECT_TRUE(close(e0, t("inf.e0"), "e0 (time_projection, t and t=0)", golden::kFp32));
  EXPECT_TRUE(
      close(model->embed_time(t("in.t_sink").reshape({-1})).second, t("sink.e0"), "sink e0", golden::kFp32));
  EXPECT_TRUE(close(model->frame_packer(t("in.motion_latents")[0]), t("sink.frame_packer.tokens"), "frame_packer",
                    golden::kFp32));
  auto [x, segs] = model->cond_tokens(t("in.ref_latents")[0], t("in.motion_latents")[0]);
  EXPECT_TRUE(close(x, t("sink.x_into_blocks"), "sink tokens (+ trainable_cond_mask)", golden::kFp32));
  EXPECT_TRUE(at::equal(rope_table(rope_positions(segs, 4), 16), stored_table(ck_, "inf.freqs_cond")))
      << "cond table with roll-out 4";
  EXPECT_EQ(model->cond_rollout(27, t("inf.rope_rel_dist").item<int64_t>()), t("inf.cond_rollout_frames").item<int64_t>());
  auto [g, loc] = model->encode_audio(t("in.audio_input"));
  EXPECT_TRUE(close(g, t("inf.audio_emb_global").slice(1, 19), "audio global tokens [19:]", golden::kFp32));
  EXPECT_TRUE(close(loc, t("inf.audio_emb_local").slice(1, 19), "audio local tokens [19:]", golden::kFp32));
}

TEST(AudioGolden, EncoderAndInjectorsMatchUpstream) {
  if (!have_fixture("audio_path.safetensors")) GTEST_SKIP() << "no audio_path.safetensors fixture";
  at::NoGradGuard no_grad;
  const auto ck = weights::load_safetensors(fixture("audio_path.safetensors"));
  auto model = load_fixture_model();
  const auto& a = at_key(ck, "in.audio_input");
  const auto padded = at::cat({a.slice(3, 0, 1).repeat({1, 1, 1, 73}), a}, 3);
  auto [g, loc] = model->casual_audio_encoder->forward(padded);
  EXPECT_TRUE(close(g, at_key(ck, "enc.audio_emb_global"), "casual_audio_encoder global", golden::kFp32));
  EXPECT_TRUE(close(loc, at_key(ck, "enc.audio_emb_local"), "casual_audio_encoder local", golden::kFp32));
  const auto& hidden = at_key(ck, "in.hidden_states");
  for (int j = 0; j < 2; ++j) {
    const auto J = std::to_string(j);
    const auto res = model->audio_injector->forward(j, hidden, at_key(ck, "enc.audio_emb_local").slice(1, 19),
                                                    at_key(ck, "enc.audio_emb_global").slice(1, 19));
    EXPECT_TRUE(
        close(res.reshape({3, 32, 64}), at_key(ck, "inj" + J + ".injector_out"), "injector " + J, golden::kFp32));
    EXPECT_TRUE(close(hidden + res, at_key(ck, "inj" + J + ".out"), "after injection " + J, golden::kFp32));
  }
}

TensorMap stream_inputs(const weights::Checkpoint& ck, bool roll_sink) {
  TensorMap in{{"ref_latents", at_key(ck, "in.ref_latents")},
               {"motion_latents", at_key(ck, "in.motion_latents")},
               {"context", at_key(ck, "in.context")},
               {"audio", at_key(ck, "in.audio_emb")},
               {"num_blocks", at::tensor(int64_t{8})},
               {"seed", at::tensor(int64_t{420})},
               {"roll_sink", at::tensor(int64_t{roll_sink ? 1 : 0})},
               {"rope_offsets", at_key(ck, "rope_rel_dist").reshape({-1})}};
  return in;
}

TEST(StreamingGolden, SeededNoiseIsUpstreamNoise) {
  if (!have_fixture("streaming.safetensors")) GTEST_SKIP() << "no streaming.safetensors fixture";
  const auto ck = weights::load_safetensors(fixture("streaming.safetensors"));
  for (int r = 0; r < 2; ++r) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(420 + r);
    EXPECT_TRUE(at::equal(at::randn({16, 12, 8, 16}, gen), at_key(ck, "in.clip" + std::to_string(r) + ".noise")))
        << "clip " << r;
  }
}

TEST(StreamingGolden, TwoClipsWithRingWrapMatchUpstream) {
  if (!have_fixture("streaming.safetensors")) GTEST_SKIP() << "no streaming.safetensors fixture";
  const auto ck = weights::load_safetensors(fixture("streaming.safetensors"));
  const auto out = tool::run(fixture_request("stream"), stream_inputs(ck, /*roll_sink=*/false));
  for (int b = 0; b < 8; ++b) {
    const auto B = std::to_string(b);
    for (int i = 0; i < 4; ++i)
      EXPECT_TRUE(close(out.at("velocity." + B + "." + std::to_string(i)),
                        at_key(ck, "b" + B + ".s" + std::to_string(i) + ".velocity"),
                        "stream b" + B + " s" + std::to_string(i) + " velocity", golden::kBf16Rounded));
    EXPECT_TRUE(close(out.at("latents." + B), at_key(ck, "b" + B + ".s3.latent"), "stream b" + B + " latent",
                      golden::kBf16Rounded));
  }
  EXPECT_TRUE(at::equal(out.at("rope_offsets"), at_key(ck, "rope_rel_dist").reshape({-1})));
}

TEST(StreamingGolden, RollingSinkRefreshMatchesUpstream) {
  if (!have_fixture("streaming_refresh.safetensors")) GTEST_SKIP() << "no streaming_refresh.safetensors fixture";
  const auto ck = weights::load_safetensors(fixture("streaming_refresh.safetensors"));
  const auto base = weights::load_safetensors(fixture("streaming.safetensors"));
  auto in = stream_inputs(base, /*roll_sink=*/true);
  const auto out = tool::run(fixture_request("stream"), in);
  for (int b = 4; b < 8; ++b) {
    const auto B = std::to_string(b);
    for (int i = 0; i < 4; ++i)
      EXPECT_TRUE(close(out.at("velocity." + B + "." + std::to_string(i)),
                        at_key(ck, "b" + B + ".s" + std::to_string(i) + ".velocity"),
                        "refresh b" + B + " s" + std::to_string(i) + " velocity", golden::kBf16Rounded));
    EXPECT_TRUE(close(out.at("latents." + B), at_key(ck, "b" + B + ".s3.latent"), "refresh b" + B + " latent",
                      golden::kBf16Rounded));
  }
}

// --- Teacher-forced streaming ------------------------------------------------------------------------------------
// Every DiT call gets upstream's input latent for its step (the noise for step 0, upstream's latent after step i - 1
// otherwise), so a rounding difference of one call cannot compound through the Euler chain and the 32 calls are
// judged one by one. The KV rings and the sink are still filled by our own calls: ring placement, wrap and the sink
// refresh are covered. Upstream rounds to bf16 before norm3, so the velocities are compared with kBf16Rounded.

/// A deliberate bug, to show that the comparisons catch it.
struct Mutation {
  double velocity_scale = 1.0;   // the model output off by this factor
  bool ring_one_frame_late = false;  // each block's K/V land in the ring one latent frame after their place
  double injector_eps = 0;       // != 0: the audio injector's q/k RMSNorm eps
};

struct ForcedRun {
  std::vector<at::Tensor> velocity;  // [b * steps + i]
  std::vector<at::Tensor> latent;    // after step i
};

using Teacher = std::function<at::Tensor(int64_t block, int64_t step)>;  // undefined: chain our own latent

void set_injector_eps(CausalWanModelS2V& model, double eps) {
  int n = 0;
  for (const auto& item : model->audio_injector->named_modules())
    if (item.key().rfind("injector.", 0) == 0)
      if (auto* norm = item.value()->as<RMSNormImpl>()) {
        norm->options.eps = eps;
        ++n;
      }
  ASSERT_GT(n, 0) << "no RMSNorm under audio_injector.injector";
}

// The mutation "ring position off by one frame": the rows the call wrote at [start, start + frames) frames move one
// frame later (modulo the ring), as a ring index off by one would have put them; the first frame stays duplicated.
void write_one_frame_late(KVCache& kv, int64_t current_start, int64_t frames, int64_t frame_tokens) {
  const int64_t start = current_start % kv.capacity;
  for (auto& layer : kv.layers)
    for (at::Tensor* t : {&layer.k, &layer.v}) {
      if (!t->defined()) continue;
      const auto written = t->slice(1, start, start + frames * frame_tokens).clone();
      for (int64_t f = 0; f < frames; ++f) {
        const int64_t dst = (start + (f + 1) * frame_tokens) % kv.capacity;
        t->slice(1, dst, dst + frame_tokens).copy_(written.slice(1, f * frame_tokens, (f + 1) * frame_tokens));
      }
    }
}

ForcedRun forced_stream(const weights::Checkpoint& in, int64_t blocks, const Teacher& teacher,
                        const at::Tensor& refresh_ref, const Mutation& mut = {}) {
  at::NoGradGuard no_grad;
  auto model = load_fixture_model();
  if (mut.injector_eps != 0) set_injector_eps(model, mut.injector_eps);
  const auto& cfg = model->config;
  const auto ref = at_key(in, "in.ref_latents")[0];
  const auto motion = at_key(in, "in.motion_latents")[0];
  const auto ctx = model->embed_text(at_key(in, "in.context"));
  const auto audio = at_key(in, "in.audio_emb");
  const auto offsets = at_key(in, "rope_rel_dist").reshape({-1});
  CondCache cond;
  model->prefill(ref, motion, ctx, cond);
  const int64_t frame_tokens = (ref.size(2) / cfg.patch_size[1]) * (ref.size(3) / cfg.patch_size[2]);
  std::vector<KVCache> caches;
  for (int64_t i = 0; i < cfg.sampling_steps; ++i) caches.push_back(model->make_kv_cache(frame_tokens));
  const auto sched = make_schedule(cfg);
  const int64_t per_clip = cfg.clip_frames / cfg.frames_per_block;
  const int64_t afpb = cfg.audio_frames_per_block();
  ForcedRun run;
  for (int64_t b = 0; b < blocks; ++b) {
    if (b == per_clip && refresh_ref.defined()) model->prefill(refresh_ref, motion, ctx, cond);
    const auto noise = at_key(in, "in.clip" + std::to_string(b / per_clip) + ".noise")
                           .slice(1, (b % per_clip) * cfg.frames_per_block, (b % per_clip + 1) * cfg.frames_per_block);
    const int64_t start = b * cfg.frames_per_block * frame_tokens;
    at::Tensor x = noise;
    for (int64_t i = 0; i < cfg.sampling_steps; ++i) {
      if (i > 0) {
        const auto forced = teacher(b, i - 1);
        if (forced.defined()) x = forced;
      }
      const auto v = model->forward_block(x, sched.timesteps[i].item<double>(), ctx, at::Tensor(),
                                          audio.slice(3, b * afpb, (b + 1) * afpb), caches[static_cast<size_t>(i)],
                                          cond, start, offsets[b * cfg.sampling_steps + i].item<int64_t>()) *
                     mut.velocity_scale;
      if (mut.ring_one_frame_late)
        write_one_frame_late(caches[static_cast<size_t>(i)], start, x.size(1), frame_tokens);
      x = euler_step(x, v, sched, i);
      run.velocity.push_back(v);
      run.latent.push_back(x);
    }
  }
  return run;
}

Teacher teacher_from(const weights::Checkpoint& ck, int64_t first_unforced_block = 1 << 30) {
  return [&ck, first_unforced_block](int64_t b, int64_t i) {
    if (b >= first_unforced_block) return at::Tensor();
    return at_key(ck, "b" + std::to_string(b) + ".s" + std::to_string(i) + ".latent");
  };
}

/// The worst difference of a run against the fixture's velocities of blocks [first, last).
golden::Difference worst(const ForcedRun& run, const weights::Checkpoint& ck, int64_t first, int64_t last,
                         bool print = false) {
  golden::Difference w;
  for (int64_t b = first; b < last; ++b)
    for (int64_t i = 0; i < 4; ++i) {
      const auto d = golden::difference(run.velocity[static_cast<size_t>(b * 4 + i)],
                                        at_key(ck, "b" + std::to_string(b) + ".s" + std::to_string(i) + ".velocity"));
      if (print) std::printf("  b%ld s%ld max %.2e rms %.2e\n", static_cast<long>(b), static_cast<long>(i),
                             d.max_rel(), d.rms_rel());
      if (d.max_rel() > w.max_rel()) {
        w.max_err = d.max_err;
        w.scale = d.scale;
      }
      if (d.rms_rel() > w.rms_rel()) {
        w.rms_err = d.rms_err;
        w.rms_ref = d.rms_ref;
      }
    }
  return w;
}

bool caught(const golden::Difference& d, const golden::Tolerance& tol) {
  return d.max_rel() > tol.max || (tol.rms > 0 && d.rms_rel() > tol.rms);
}

TEST(StreamingGolden, TeacherForcedCallsMatchUpstream) {
  if (!have_fixture("streaming.safetensors")) GTEST_SKIP() << "no streaming.safetensors fixture";
  const auto ck = weights::load_safetensors(fixture("streaming.safetensors"));
  const auto run = forced_stream(ck, 8, teacher_from(ck), at::Tensor());
  for (int64_t b = 0; b < 8; ++b)
    for (int64_t i = 0; i < 4; ++i) {
      const auto key = "b" + std::to_string(b) + ".s" + std::to_string(i);
      EXPECT_TRUE(close(run.velocity[static_cast<size_t>(b * 4 + i)], at_key(ck, key + ".velocity"),
                        "forced " + key + " velocity", golden::kBf16Rounded));
      EXPECT_TRUE(close(run.latent[static_cast<size_t>(b * 4 + i)], at_key(ck, key + ".latent"),
                        "forced " + key + " latent", golden::kBf16Rounded));
    }
}

// The criteria are not so loose that real bugs pass: each mutation must fail them. (The injector eps, whose effect
// is below the bf16 flips of a stream, is caught where the arithmetic is fp32 only: InjectorEpsMutationIsCaught.)
TEST(StreamingGolden, MutationsAreCaught) {
  if (!have_fixture("streaming.safetensors")) GTEST_SKIP() << "no streaming.safetensors fixture";
  const auto ck = weights::load_safetensors(fixture("streaming.safetensors"));
  const auto teacher = teacher_from(ck);
  const auto clean = worst(forced_stream(ck, 5, teacher, at::Tensor()), ck, 0, 5);
  std::printf("[golden] forced stream, 5 blocks (ring wrap at 4): worst max %.2e rms %.2e\n", clean.max_rel(),
              clean.rms_rel());
  EXPECT_FALSE(caught(clean, golden::kBf16Rounded));

  Mutation scale;
  scale.velocity_scale = 1.001;
  const auto d_scale = worst(forced_stream(ck, 2, teacher, at::Tensor(), scale), ck, 0, 2);
  std::printf("[golden] mutation 0.1%% scale: worst max %.2e rms %.2e\n", d_scale.max_rel(), d_scale.rms_rel());
  EXPECT_TRUE(caught(d_scale, golden::kBf16Rounded)) << "a 0.1% scale error passes";

  Mutation shift;
  shift.ring_one_frame_late = true;
  const auto d_shift = worst(forced_stream(ck, 5, teacher, at::Tensor(), shift), ck, 0, 5);
  std::printf("[golden] mutation ring position +1 frame: worst max %.2e rms %.2e\n", d_shift.max_rel(),
              d_shift.rms_rel());
  EXPECT_TRUE(caught(d_shift, golden::kBf16Rounded)) << "a ring position off by one frame passes";
}

// The injector eps in isolation, where the arithmetic is fp32 only: kFp32 must catch it.
TEST(AudioGolden, InjectorEpsMutationIsCaught) {
  if (!have_fixture("audio_path.safetensors")) GTEST_SKIP() << "no audio_path.safetensors fixture";
  at::NoGradGuard no_grad;
  const auto ck = weights::load_safetensors(fixture("audio_path.safetensors"));
  auto model = load_fixture_model();
  set_injector_eps(model, 1e-5);
  const auto& hidden = at_key(ck, "in.hidden_states");
  bool any = false;
  for (int j = 0; j < 2; ++j) {
    const auto res = model->audio_injector->forward(j, hidden, at_key(ck, "enc.audio_emb_local").slice(1, 19),
                                                    at_key(ck, "enc.audio_emb_global").slice(1, 19));
    const auto d =
        golden::difference(res.reshape({3, 32, 64}), at_key(ck, "inj" + std::to_string(j) + ".injector_out"));
    std::printf("[golden] mutation injector %d eps 1e-5: max %.2e rms %.2e\n", j, d.max_rel(), d.rms_rel());
    any = any || caught(d, golden::kFp32);
  }
  EXPECT_TRUE(any) << "kFp32 does not tell eps 1e-5 from 1e-6 in the injector";
}

}  // namespace
}  // namespace liveavatar::dit::test
