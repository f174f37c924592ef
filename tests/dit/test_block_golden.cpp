// Golden tests of one attention block (sink prefill, filling ring, wrapped ring) and of the RoPE tables against the
// upstream fixtures (tests/fixtures/dit/block_forward.safetensors). The block output passes upstream's bf16 rounding
// before norm3 (kBf16Rounded); the cache rows are fp32 functions of the inputs (kFp32).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "golden_util.h"

namespace liveavatar::dit::test {
namespace {

class BlockGolden : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_fixture("block_forward.safetensors")) GTEST_SKIP() << "no block_forward.safetensors fixture";
    model_ = load_fixture_model();
    ck_ = weights::load_safetensors(fixture("block_forward.safetensors"));
  }
  const at::Tensor& t(const std::string& name) { return ck_.tensors.at(name); }
  int64_t i(const std::string& name) { return t(name).item<int64_t>(); }

  CausalWanModelS2V model_{nullptr};
  weights::Checkpoint ck_;
};

TEST_F(BlockGolden, SinkPrefillMatchesUpstream) {
  at::NoGradGuard no_grad;
  auto block = model_->blocks[1]->as<BlockImpl>();
  const auto table = stored_table(ck_, "sink.freqs");
  LayerKV slot;
  const auto mod = block->modulation_for(t("sink.e0"), /*conditioning=*/true);
  const auto out = block->forward(t("sink.x"), mod, t("sink.context"),
                                  [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
                                    return sink_attention(q, k, v, table, slot);
                                  });
  EXPECT_TRUE(close(out, t("sink.out"), "block1 sink out", golden::kBf16Rounded));
  EXPECT_TRUE(close(slot.k, t("sink.cache_out.cond_k"), "block1 sink cond_k (un-roped)", golden::kFp32));
  EXPECT_TRUE(close(slot.v, t("sink.cache_out.cond_v"), "block1 sink cond_v", golden::kFp32));
  EXPECT_EQ(slot.k.size(1), i("sink.cache_out.cond_end"));
}

void run_streaming_call(BlockGolden& self, CausalWanModelS2V& model, const weights::Checkpoint& ck,
                        const std::string& p) {
  at::NoGradGuard no_grad;
  auto block = model->blocks[1]->as<BlockImpl>();
  auto get = [&](const std::string& n) { return ck.tensors.at(p + "." + n); };
  const auto cfg = model->config;
  const int64_t fs = get("frame_seqlen").item<int64_t>();
  const int64_t capacity = cfg.clip_frames * fs;
  const int64_t start = get("current_start").item<int64_t>();
  const auto& x = get("x");
  LayerKV ring{at::zeros({1, capacity, cfg.num_heads, cfg.head_dim()}),
               at::zeros({1, capacity, cfg.num_heads, cfg.head_dim()})};
  ring.k.slice(1, 0, get("cache_in.k").size(1)).copy_(get("cache_in.k"));
  ring.v.slice(1, 0, get("cache_in.v").size(1)).copy_(get("cache_in.v"));
  const LayerKV sink{get("cache_in.cond_k"), get("cache_in.cond_v")};
  const auto table = stored_table(ck, p + ".freqs");
  const auto cond_table = stored_table(ck, p + ".freqs_cond");
  const auto window = ring_window(start, x.size(1), capacity);
  const auto mod = block->modulation_for(get("e0"), /*conditioning=*/false);
  const auto out = block->forward(x, mod, get("context"),
                                  [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
                                    return ring_attention(q, k, v, table, cond_table, ring, sink, window);
                                  });
  EXPECT_TRUE(close(out, get("out"), "block1 " + p + " out", golden::kBf16Rounded));
  EXPECT_TRUE(close(ring.k.slice(1, window.start, window.start + x.size(1)), get("cache_out.k_written"),
                    "block1 " + p + " ring k written (roped)", golden::kFp32));
  EXPECT_TRUE(close(ring.v.slice(1, window.start, window.start + x.size(1)), get("cache_out.v_written"),
                    "block1 " + p + " ring v written", golden::kFp32));
  (void)self;
}

TEST_F(BlockGolden, FillingRingMatchesUpstream) { run_streaming_call(*this, model_, ck_, "grow"); }
TEST_F(BlockGolden, WrappedRingMatchesUpstream) { run_streaming_call(*this, model_, ck_, "wrap"); }

TEST_F(BlockGolden, RingWindowFollowsUpstream) {
  EXPECT_EQ(ring_window(96, 96, 384).start, 96);
  EXPECT_EQ(ring_window(96, 96, 384).active, 192);
  EXPECT_EQ(ring_window(864, 96, 384).start, 96);
  EXPECT_EQ(ring_window(864, 96, 384).active, 384);
  EXPECT_THROW(ring_window(0, 96, 100), DitError);
}

// Our tables, built from positions, equal the stored upstream tables bit for bit (fp16-rounded cos / sin).
TEST_F(BlockGolden, RopeTablesMatchUpstream) {
  const auto cfg = model_->config;
  const int64_t hp = 4, wp = 8, lh = 8, lw = 16;
  const auto segs = cond_segments(cfg, hp, wp, lh, lw);
  const auto sink_table = rope_table(rope_positions(segs, 0), cfg.head_dim());
  EXPECT_TRUE(at::equal(sink_table, stored_table(ck_, "sink.freqs"))) << "sink (ref + FramePack) table";
  for (const std::string p : {"grow", "wrap"}) {
    const int64_t frame = i(p + ".current_start") / i(p + ".frame_seqlen");
    const std::vector<RopeSegment> noisy{{0, 0, 0, 3, hp, wp, 3, hp, wp, true}};
    EXPECT_TRUE(at::equal(rope_table(rope_positions(noisy, frame), cfg.head_dim()), stored_table(ck_, p + ".freqs")))
        << p << " block table at frame " << frame;
    // The cond table of the call equals ours for some offset in [4, 30] (the drawn one is not in this file).
    bool found = false;
    for (int64_t rd = cfg.rope_offset_min; rd <= cfg.rope_offset_max && !found; ++rd) {
      const auto table = rope_table(rope_positions(segs, model_->cond_rollout(frame, rd)), cfg.head_dim());
      found = at::equal(table, stored_table(ck_, p + ".freqs_cond"));
    }
    EXPECT_TRUE(found) << p << ": no offset in [4, 30] reproduces the stored cond table";
  }
}

}  // namespace
}  // namespace liveavatar::dit::test
