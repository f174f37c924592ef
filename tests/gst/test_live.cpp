// Live timing of the element: the latency it reports (puppet: one frame; a block model: a block + its processing,
// raised with a LATENCY message), no busy loop while a block is made, and lag-policy when the model cannot keep up.
// The model is stood in for by the tests-only slow puppet (object data "liveavatar-testing-block-delay-ms": blocks
// of 12 frames on the engine's worker, a fixed time per block), so no weights are needed.
#include "live_util.h"

using namespace liveutil;


TEST(Latency, PuppetAnswersOneFrame) {
  const LiveRun r = run_live("", 0, 1.0);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 1.0);
  EXPECT_EQ(r.latency_in_stream, kSource + kFrame);
  EXPECT_EQ(r.latency_messages_playing, 0) << "the puppet's figure does not change";
}

// A block model that keeps up (300 ms per 480 ms block): the latency is a block and then a block + its processing,
// raised with a LATENCY message; the frames come at that latency; no busy loop while a block is made.
TEST(Latency, BlockModelReportsBlockPlusProcessingWithoutBusyLoop) {
  const LiveRun r = run_live("", 300, 3.0);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 3.0);
  EXPECT_GE(r.latency_in_stream, kSource + kBlock + 300 * GST_MSECOND);
  EXPECT_LT(r.latency_in_stream, kSource + kBlock + 2 * 300 * GST_MSECOND);
  EXPECT_GE(r.latency_messages_playing, 1) << "the measured processing raised the latency";
  EXPECT_LT(worst_delay(r), r.latency_at_end + 100 * GST_MSECOND);
  EXPECT_LT(r.cpu, 0.3 * r.wall) << "CPU " << r.cpu << " s in " << r.wall << " s: a busy loop?";
}

// The first block takes 2 s while the latency still says 520 ms: the first frame is overdue for more than a second,
// and the element waits for it on the engine (wait_frame), not by spinning through the aggregator.
TEST(Latency, NoBusyLoopWhileALateBlockIsMade) {
  const LiveRun r = run_live("lag-policy=wait", 2000, 0.4);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 0.4);
  EXPECT_GT(r.wall_first, 1.5) << "the first frame came late: the element had to wait";
  EXPECT_LT(r.cpu_first, 0.25 * r.wall_first)
      << "CPU " << r.cpu_first << " s in the " << r.wall_first << " s before the first frame: a busy loop?";
}

// A block model slower than real time (700 ms per 480 ms block), lag-policy=wait: every model frame is shown, the
// latency grows and is reported; the element waits for the late frames without spinning.
TEST(LagPolicy, WaitShowsEveryFrameAndTheLatencyGrows) {
  const LiveRun r = run_live("lag-policy=wait", 700, 4.0);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 4.0);
  EXPECT_EQ(r.qos_dropped, 0u);
  EXPECT_GE(r.latency_messages_playing, 2);
  EXPECT_GT(r.latency_at_end, kSource + kBlock + 2 * 700 * GST_MSECOND) << "blocks queued: the latency grew";
  EXPECT_GT(worst_delay(r), kBlock + 700 * GST_MSECOND + 500 * GST_MSECOND);
  EXPECT_LT(r.cpu, 0.3 * r.wall) << "CPU " << r.cpu << " s in " << r.wall << " s: a busy loop while waiting?";
}

// lag-policy=drop: frames not made in time repeat the last frame, the model skips what it cannot make in time; the
// output keeps its pace (no frame later than the reported latency) and the reported latency stays bounded.
TEST(LagPolicy, DropKeepsThePaceByRepeatingFrames) {
  const LiveRun r = run_live("lag-policy=drop", 700, 4.0);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 4.0);
  EXPECT_GT(r.qos_dropped, 0u);
  EXPECT_GT(r.qos_processed, 0u);
  EXPECT_LE(r.qos_processed, r.frames.size());
  EXPECT_LE(r.latency_at_end, kSource + kBlock + kFrame + 800 * GST_MSECOND);
  EXPECT_LT(worst_delay(r), r.latency_at_end + 250 * GST_MSECOND);
  EXPECT_GE(repeated_frames(r), static_cast<int>(r.qos_dropped) / 2);
}

// lag-policy=puppet: the puppet draws the frames the model does not make in time; same pace and bounds as drop.
TEST(LagPolicy, PuppetStandsInAndKeepsThePace) {
  const LiveRun r = run_live("lag-policy=puppet", 700, 4.0);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 4.0);
  EXPECT_GT(r.qos_dropped, 0u);
  EXPECT_LE(r.latency_at_end, kSource + kBlock + kFrame + 800 * GST_MSECOND);
  EXPECT_LT(worst_delay(r), r.latency_at_end + 250 * GST_MSECOND);
  EXPECT_LT(repeated_frames(r), static_cast<int>(r.qos_dropped) / 2) << "stand-in frames move, unlike drop";
}

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
