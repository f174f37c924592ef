// The element with backend=liveavatar on a tiny checkpoint that `liveavatar-checkpoint make-tiny` writes: the whole
// neural path (VAE, umT5, wav2vec2, DiT, streaming decode) behind the same timing contract as the puppet.
#include <gst/app/gstappsink.h>
#include <gst/app/gstappsrc.h>
#include <gst/gst.h>
#include <gst/video/video.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "../tiny_checkpoint.h"
#include "liveavatar/engine.h"
#include "media_io.h"

namespace {

constexpr GstClockTime kFrame = GST_SECOND / 25;

using testutil::tiny;

GstBuffer* portrait_buffer() {
  static const auto img = liveavatar::io::read_png(std::string(LIVEAVATAR_ASSETS_DIR) + "/portrait.png");
  GstBuffer* b = gst_buffer_new_memdup(img.data.data(), img.data.size());
  GST_BUFFER_PTS(b) = 0;
  return b;
}

GstBuffer* speech(GstClockTime pts, size_t n) {
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, n * sizeof(float), nullptr);
  GstMapInfo m;
  gst_buffer_map(buf, &m, GST_MAP_WRITE);
  auto* s = reinterpret_cast<float*>(m.data);
  const guint64 first = gst_util_uint64_scale(pts, 16000, GST_SECOND);
  for (size_t i = 0; i < n; ++i) {
    const double t = (first + i) / 16000.0;
    s[i] = static_cast<float>(0.3 * std::sin(2 * M_PI * 180 * t) * (0.6 + 0.4 * std::sin(2 * M_PI * 3 * t)));
  }
  gst_buffer_unmap(buf, &m);
  GST_BUFFER_PTS(buf) = pts;
  GST_BUFFER_DURATION(buf) = gst_util_uint64_scale(n, GST_SECOND, 16000);
  return buf;
}

struct Frames {
  std::vector<GstClockTime> pts;
  std::vector<std::vector<guint8>> data;
  std::string error;
};

// One run of the pipeline from PLAYING to EOS with `samples` of speech (16160 = 1.01 s = 26 frames).
Frames run_once(GstElement* pipe, size_t samples = 16160) {
  GstElement* img = gst_bin_get_by_name(GST_BIN(pipe), "img");
  GstElement* aud = gst_bin_get_by_name(GST_BIN(pipe), "aud");
  GstElement* out = gst_bin_get_by_name(GST_BIN(pipe), "out");
  gst_element_set_state(pipe, GST_STATE_PLAYING);
  gst_app_src_push_buffer(GST_APP_SRC(img), portrait_buffer());
  gst_app_src_end_of_stream(GST_APP_SRC(img));
  for (size_t at = 0; at < samples; at += 1600)
    gst_app_src_push_buffer(GST_APP_SRC(aud), speech(gst_util_uint64_scale(at, GST_SECOND, 16000),
                                                     std::min<size_t>(1600, samples - at)));
  gst_app_src_end_of_stream(GST_APP_SRC(aud));
  Frames f;
  GstBus* bus = gst_element_get_bus(pipe);
  for (;;) {
    GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 50 * GST_MSECOND);
    if (s) {
      GstBuffer* b = gst_sample_get_buffer(s);
      GstMapInfo m;
      gst_buffer_map(b, &m, GST_MAP_READ);
      f.pts.push_back(GST_BUFFER_PTS(b));
      f.data.emplace_back(m.data, m.data + m.size);
      gst_buffer_unmap(b, &m);
      gst_sample_unref(s);
      continue;
    }
    if (gst_app_sink_is_eos(GST_APP_SINK(out))) break;
    if (GstMessage* msg = gst_bus_pop_filtered(bus, GST_MESSAGE_ERROR)) {
      GError* err = nullptr;
      gst_message_parse_error(msg, &err, nullptr);
      f.error = err->message;
      g_error_free(err);
      gst_message_unref(msg);
      break;
    }
  }
  gst_object_unref(bus);
  gst_element_set_state(pipe, GST_STATE_NULL);
  gst_object_unref(img);
  gst_object_unref(aud);
  gst_object_unref(out);
  return f;
}

GstElement* make_pipeline(const std::string& extra = "") {
  const std::string launch =
      "appsrc name=img format=time caps=video/x-raw,format=RGB,width=512,height=512,framerate=0/1 ! videoconvert ! "
      "la.image appsrc name=aud format=time caps=audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved "
      "! la.audio liveavatar name=la backend=liveavatar model-dir=" + tiny().dir +
      " width=128 height=128 seed=5 " + extra + " ! appsink name=out sync=false max-buffers=0";
  GError* err = nullptr;
  GstElement* pipe = gst_parse_launch(launch.c_str(), &err);
  EXPECT_EQ(err, nullptr) << (err ? err->message : "");
  return pipe;
}

}  // namespace

TEST(ElementNeural, FrameCountTimestampsAndDeterminismAcrossRuns) {
  GstElement* pipe = make_pipeline();
  ASSERT_NE(pipe, nullptr);
  const Frames a = run_once(pipe);
  ASSERT_EQ(a.error, "");
  ASSERT_EQ(a.pts.size(), 26u) << "ceil(1.01 s x 25)";
  for (size_t i = 0; i < a.pts.size(); ++i) EXPECT_EQ(a.pts[i], i * kFrame);
  EXPECT_EQ(a.data[0].size(), 128u * 128u * 3u);
  EXPECT_NE(a.data[0], a.data[13]) << "the picture moves";
  // NULL -> PLAYING again: the loaded engine is reused and the same input gives the same frames, bit for bit.
  const Frames b = run_once(pipe);
  ASSERT_EQ(b.error, "");
  ASSERT_EQ(b.pts.size(), a.pts.size());
  for (size_t i = 0; i < a.data.size(); ++i) EXPECT_EQ(a.data[i], b.data[i]) << "frame " << i;
  gst_object_unref(pipe);
}

// Less audio than one DiT block (12 frames): the block is padded with silent features and trimmed to the audio.
TEST(ElementNeural, AudioShorterThanOneBlockKeepsItsLength) {
  GstElement* pipe = make_pipeline();
  ASSERT_NE(pipe, nullptr);
  const Frames f = run_once(pipe, 3300);  // 0.206 s -> ceil(5.16) = 6 frames
  ASSERT_EQ(f.error, "");
  ASSERT_EQ(f.pts.size(), 6u);
  for (size_t i = 0; i < f.pts.size(); ++i) EXPECT_EQ(f.pts[i], i * kFrame);
  gst_object_unref(pipe);
}

// max-area bounds the size the model chooses when width and height are 0: the 512x512 portrait gives 128x128 under
// 128 x 128 (the default area keeps it at 512x512).
TEST(ElementNeural, MaxAreaBoundsTheChosenSize) {
  GstElement* pipe = make_pipeline("width=0 height=0 max-area=16384");
  ASSERT_NE(pipe, nullptr);
  const Frames f = run_once(pipe, 3300);
  ASSERT_EQ(f.error, "");
  ASSERT_EQ(f.pts.size(), 6u);
  EXPECT_EQ(f.data[0].size(), 128u * 128u * 3u);
  gst_object_unref(pipe);
}

// Live: the element reports the model's latency, at least one block of audio (480 ms) on top of the source's, and
// raises it with a LATENCY message once a block's processing is measured. No speech is needed: live, the avatar idles
// on silence, which the model turns into blocks too. lag-policy=drop keeps the frames coming at 25 fps however slow
// the CPU is, so the test waits only for the first block.
TEST(ElementNeural, LiveLatencyIsAtLeastOneBlockAndRisesWithAMessage) {
  const std::string launch =
      "appsrc name=img format=time caps=video/x-raw,format=RGB,width=512,height=512,framerate=0/1 ! videoconvert ! "
      "la.image appsrc name=aud is-live=true format=time min-latency=100000000 "
      "caps=audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved ! la.audio "
      "liveavatar name=la backend=liveavatar model-dir=" + tiny().dir +
      " width=128 height=128 seed=5 lag-policy=drop ! appsink name=out sync=false max-buffers=0";
  GError* err = nullptr;
  GstElement* pipe = gst_parse_launch(launch.c_str(), &err);
  ASSERT_EQ(err, nullptr) << (err ? err->message : "");
  GstElement* img = gst_bin_get_by_name(GST_BIN(pipe), "img");
  GstElement* out = gst_bin_get_by_name(GST_BIN(pipe), "out");
  GstElement* la = gst_bin_get_by_name(GST_BIN(pipe), "la");
  gst_app_src_push_buffer(GST_APP_SRC(img), portrait_buffer());
  gst_app_src_end_of_stream(GST_APP_SRC(img));
  ASSERT_NE(gst_element_set_state(pipe, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  gst_element_get_state(pipe, nullptr, nullptr, 60 * GST_SECOND);
  GstBus* bus = gst_element_get_bus(pipe);
  while (GstMessage* m = gst_bus_pop(bus)) gst_message_unref(m);  // the first figure, posted at READY->PAUSED
  ASSERT_NE(gst_element_set_state(pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE);

  auto own_latency = [&] {
    GstQuery* q = gst_query_new_latency();
    GstClockTime min = 0;
    if (gst_element_query(la, q)) gst_query_parse_latency(q, nullptr, &min, nullptr);
    gst_query_unref(q);
    return min;
  };
  g_usleep(300000);
  const GstClockTime before = own_latency();
  EXPECT_GE(before, 100 * GST_MSECOND + 12 * kFrame) << "the source's 100 ms + one block of audio";

  std::vector<GstClockTime> pts;
  bool raised = false;
  std::string error;
  for (gint64 end = g_get_monotonic_time() + 300 * G_USEC_PER_SEC; !raised && error.empty() &&
                                                                     g_get_monotonic_time() < end;) {
    while (GstMessage* m = gst_bus_pop(bus)) {
      if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_LATENCY && GST_MESSAGE_SRC(m) == GST_OBJECT(la)) {
        raised = true;
        gst_bin_recalculate_latency(GST_BIN(pipe));
      } else if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_ERROR) {
        GError* e = nullptr;
        gst_message_parse_error(m, &e, nullptr);
        error = e->message;
        g_error_free(e);
      }
      gst_message_unref(m);
    }
    while (GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 20 * GST_MSECOND)) {
      pts.push_back(GST_BUFFER_PTS(gst_sample_get_buffer(s)));
      gst_sample_unref(s);
    }
  }
  const GstClockTime after = own_latency();
  gst_element_set_state(pipe, GST_STATE_NULL);
  EXPECT_EQ(error, "");
  EXPECT_TRUE(raised) << "a LATENCY message once the first block was measured";
  EXPECT_GT(after, before + kFrame) << "block + its processing";
  ASSERT_GE(pts.size(), 12u);
  for (size_t i = 1; i < pts.size(); ++i) ASSERT_EQ(pts[i], pts[0] + i * kFrame) << "frame " << i;
  for (GstElement* e : {img, out, la}) gst_object_unref(e);
  gst_object_unref(bus);
  gst_object_unref(pipe);
}

// cancel() (what the element calls on flush and PAUSED->READY) stops the work at a block boundary; reset() clears it.
TEST(EngineNeural, CancelStopsAtABlockBoundaryAndResetClearsIt) {
  ASSERT_TRUE(liveavatar::register_neural_backend());
  liveavatar::EngineConfig c;
  c.backend = "liveavatar";
  c.model_dir = tiny().dir;
  c.width = c.height = 64;
  auto engine = liveavatar::Engine::create(c);
  std::vector<uint8_t> grey(128 * 128 * 3, 120);
  engine->set_reference({grey.data(), 128, 128, 128 * 3, liveavatar::PixelFormat::kRGB8});
  std::vector<float> audio(16000, 0.1f);
  engine->cancel();
  EXPECT_THROW(engine->push_audio(audio.data(), audio.size()), liveavatar::Cancelled);
  engine->reset();
  engine->push_audio(audio.data(), audio.size());
  engine->finish();
  liveavatar::Frame f;
  int n = 0;
  while (engine->pop_frame(&f)) ++n;
  EXPECT_EQ(n, 25);
}

// The error message of READY->PAUSED with `property` set to `value` on the element ("" if the start succeeds).
std::string start_error(const char* property, const char* value, const char* prompt = nullptr) {
  GstElement* pipe = make_pipeline();
  EXPECT_NE(pipe, nullptr);
  if (!pipe) return "no pipeline";
  GstElement* la = gst_bin_get_by_name(GST_BIN(pipe), "la");
  g_object_set(la, property, value, nullptr);
  if (prompt) g_object_set(la, "prompt", prompt, nullptr);
  gst_object_unref(la);
  const bool failed = gst_element_set_state(pipe, GST_STATE_PAUSED) == GST_STATE_CHANGE_FAILURE;
  GstBus* bus = gst_element_get_bus(pipe);
  GstMessage* m = gst_bus_pop_filtered(bus, GST_MESSAGE_ERROR);
  std::string text = failed ? "(failed without an error message)" : "";
  if (m) {
    GError* err = nullptr;
    gst_message_parse_error(m, &err, nullptr);
    text = err->message;
    g_error_free(err);
    gst_message_unref(m);
  }
  gst_object_unref(bus);
  gst_element_set_state(pipe, GST_STATE_NULL);
  gst_object_unref(pipe);
  return text;
}

TEST(ElementNeural, MissingModelFolderSaysItDoesNotExist) {
  const std::string err = start_error("model-dir", "/nonexistent-liveavatar-models");
  EXPECT_NE(err.find("/nonexistent-liveavatar-models does not exist"), std::string::npos) << err;
}

TEST(ElementNeural, ModelFolderWithoutTheFilesSaysWhichFile) {
  char tmpl[] = "/tmp/liveavatar-empty-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const std::string err = start_error("model-dir", dir.c_str());
  rmdir(dir.c_str());
  EXPECT_NE(err.find("config.json"), std::string::npos) << err;
}

TEST(ElementNeural, MissingLoraFileSaysSo) {
  const std::string err = start_error("lora", "/nonexistent-lora.safetensors");
  EXPECT_NE(err.find("lora file /nonexistent-lora.safetensors does not exist"), std::string::npos) << err;
  EXPECT_EQ(err.find("model-dir is missing"), std::string::npos) << err;
}

// A prompt cache that cannot be written names the setting that moves it.
TEST(ElementNeural, UnwritablePromptCacheNamesXdgCacheHome) {
  const std::string not_a_folder = tiny().dir + "/cache-is-a-file";
  FILE* f = fopen(not_a_folder.c_str(), "w");
  ASSERT_NE(f, nullptr);
  fclose(f);
  const std::string saved = getenv("XDG_CACHE_HOME") ? getenv("XDG_CACHE_HOME") : "";
  setenv("XDG_CACHE_HOME", not_a_folder.c_str(), 1);
  const std::string err = start_error("seed", "5", "a prompt that is not cached yet");
  setenv("XDG_CACHE_HOME", saved.c_str(), 1);
  EXPECT_NE(err.find("XDG_CACHE_HOME"), std::string::npos) << err;
}

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
