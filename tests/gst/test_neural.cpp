// The element with backend=liveavatar on a tiny checkpoint that `liveavatar-checkpoint make-tiny` writes: the whole
// neural path (VAE, umT5, wav2vec2, DiT, streaming decode) behind the same timing contract as the puppet.
#include <gst/app/gstappsink.h>
#include <gst/app/gstappsrc.h>
#include <gst/gst.h>
#include <gst/video/video.h>
#include <gtest/gtest.h>
#include <malloc.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <string>
#include <vector>

#include "../tiny_checkpoint.h"
#include "liveavatar/engine.h"
#include "media_io.h"
#include "neural_util.h"

namespace {

constexpr GstClockTime kFrame = GST_SECOND / 25;

using testutil::tiny;

using testutil::portrait_buffer;
using testutil::speech;

struct Frames {
  std::vector<GstClockTime> pts;
  std::vector<std::vector<guint8>> data;
  std::string error;
};

// One run of the pipeline from PLAYING to EOS with `samples` of speech (16160 = 1.01 s = 26 frames); `later`:
// pictures that follow the portrait on the image pad.
Frames run_once(GstElement* pipe, size_t samples = 16160, std::vector<GstBuffer*> later = {}) {
  GstElement* img = gst_bin_get_by_name(GST_BIN(pipe), "img");
  GstElement* aud = gst_bin_get_by_name(GST_BIN(pipe), "aud");
  GstElement* out = gst_bin_get_by_name(GST_BIN(pipe), "out");
  gst_element_set_state(pipe, GST_STATE_PLAYING);
  gst_app_src_push_buffer(GST_APP_SRC(img), portrait_buffer());
  for (GstBuffer* b : later) gst_app_src_push_buffer(GST_APP_SRC(img), b);
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
  // The model loads on a worker: its failure comes as an error message after READY->PAUSED returned.
  GstMessage* m = gst_bus_timed_pop_filtered(bus, 60 * GST_SECOND,
                                             static_cast<GstMessageType>(GST_MESSAGE_ERROR | GST_MESSAGE_ASYNC_DONE));
  if (m && GST_MESSAGE_TYPE(m) != GST_MESSAGE_ERROR) {
    gst_message_unref(m);
    m = nullptr;
  }
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

namespace {

// A model folder of its own (symlinks to the tiny checkpoint's parts): another path, so the model is loaded afresh
// rather than shared with what an earlier test loaded. `lora`: with LiveAvatar/ too.
std::string fresh_model_dir(bool lora = true) {
  char tmpl[] = "/tmp/liveavatar-link-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  EXPECT_EQ(symlink((tiny().dir + "/Wan2.2-S2V-14B").c_str(), (dir + "/Wan2.2-S2V-14B").c_str()), 0);
  if (lora) {
    EXPECT_EQ(symlink((tiny().dir + "/LiveAvatar").c_str(), (dir + "/LiveAvatar").c_str()), 0);
  }
  return dir;
}

void remove_dir(const std::string& dir) { (void)std::system(("rm -rf '" + dir + "'").c_str()); }

struct LoadMessages {
  int start = 0, complete = 0, error = 0;
  std::vector<int> percent;         // of the CONTINUE messages, in order
  std::vector<guint64> bytes_done;
  guint64 bytes_total = 0;
  int files_total = 0;
  std::vector<std::string> warnings, errors;
};

// Reads the bus until `stop` says so or `seconds` pass; PROGRESS "load" messages of the element and warnings/errors.
template <typename Stop>
LoadMessages read_load_messages(GstBus* bus, double seconds, Stop stop, LoadMessages m = {}) {
  const gint64 end = g_get_monotonic_time() + static_cast<gint64>(seconds * 1e6);
  while (!stop(m) && g_get_monotonic_time() < end) {
    GstMessage* msg = gst_bus_timed_pop(bus, 20 * GST_MSECOND);
    if (!msg) continue;
    if (GST_MESSAGE_TYPE(msg) == GST_MESSAGE_PROGRESS) {
      GstProgressType type;
      gchar *code = nullptr, *text = nullptr;
      gst_message_parse_progress(msg, &type, &code, &text);
      if (g_strcmp0(code, "load") == 0) {
        if (type == GST_PROGRESS_TYPE_START) ++m.start;
        if (type == GST_PROGRESS_TYPE_COMPLETE) ++m.complete;
        if (type == GST_PROGRESS_TYPE_ERROR) ++m.error;
        if (type == GST_PROGRESS_TYPE_CONTINUE) {
          const GstStructure* st = gst_message_get_structure(msg);
          int percent = -1;
          guint64 done = 0;
          gst_structure_get_int(st, "percent", &percent);
          gst_structure_get_uint64(st, "bytes-done", &done);
          gst_structure_get_uint64(st, "bytes-total", &m.bytes_total);
          gst_structure_get_int(st, "files-total", &m.files_total);
          m.percent.push_back(percent);
          m.bytes_done.push_back(done);
        }
      }
      g_free(code);
      g_free(text);
    } else if (GST_MESSAGE_TYPE(msg) == GST_MESSAGE_WARNING || GST_MESSAGE_TYPE(msg) == GST_MESSAGE_ERROR) {
      GError* e = nullptr;
      if (GST_MESSAGE_TYPE(msg) == GST_MESSAGE_WARNING) {
        gst_message_parse_warning(msg, &e, nullptr);
        m.warnings.push_back(e->message);
      } else {
        gst_message_parse_error(msg, &e, nullptr);
        m.errors.push_back(e->message);
      }
      g_error_free(e);
    }
    gst_message_unref(msg);
  }
  return m;
}

GstElement* element_of(GstElement* pipe) { return gst_bin_get_by_name(GST_BIN(pipe), "la"); }

void set_load_delay(GstElement* pipe, int ms) {
  GstElement* la = element_of(pipe);
  g_object_set_data(G_OBJECT(la), "liveavatar-testing-load-delay-ms", GINT_TO_POINTER(ms));
  gst_object_unref(la);
}

}  // namespace

// READY->PAUSED returns while the model is still loading (a worker loads it, here slowed down to 4 ms per tensor),
// which reports its progress: START, CONTINUE with percent, bytes and files rising, COMPLETE; then the stream runs.
TEST(ElementNeural, ModelLoadsOnAWorkerWithProgress) {
  const std::string dir = fresh_model_dir();
  GstElement* pipe = make_pipeline("model-dir=" + dir);
  ASSERT_NE(pipe, nullptr);
  set_load_delay(pipe, 4);
  GstBus* bus = gst_element_get_bus(pipe);
  const gint64 t0 = g_get_monotonic_time();
  ASSERT_NE(gst_element_set_state(pipe, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  const double returned_s = (g_get_monotonic_time() - t0) / 1e6;
  LoadMessages m = read_load_messages(bus, 0, [](const LoadMessages&) { return false; });
  EXPECT_EQ(m.complete, 0) << "READY->PAUSED waited for the load";
  m = read_load_messages(bus, 120, [](const LoadMessages& x) { return x.complete > 0 || x.error > 0; }, m);
  const double loaded_s = (g_get_monotonic_time() - t0) / 1e6;
  EXPECT_LT(returned_s, 1.0);
  EXPECT_GT(loaded_s, returned_s + 0.5) << "the slowed load takes longer than the state change";
  EXPECT_EQ(m.start, 1);
  EXPECT_EQ(m.complete, 1);
  EXPECT_EQ(m.error, 0);
  EXPECT_TRUE(m.errors.empty()) << m.errors.front();
  ASSERT_GE(m.percent.size(), 10u) << "progress in steps";
  for (size_t i = 1; i < m.percent.size(); ++i) {
    EXPECT_GE(m.percent[i], m.percent[i - 1]);
    EXPECT_GE(m.bytes_done[i], m.bytes_done[i - 1]);
  }
  EXPECT_EQ(m.percent.back(), 100);
  EXPECT_EQ(m.files_total, 4);
  EXPECT_GT(m.bytes_total, 100000u);
  EXPECT_EQ(m.bytes_done.back(), m.bytes_total);
  gst_object_unref(bus);
  const Frames f = run_once(pipe, 3300);
  EXPECT_EQ(f.error, "");
  EXPECT_EQ(f.pts.size(), 6u);
  gst_object_unref(pipe);
  remove_dir(dir);
}

// Going to NULL while the model loads returns at once: the load stops at its next tensor, and that is no error.
TEST(ElementNeural, GoingToNullCancelsTheLoad) {
  const std::string dir = fresh_model_dir();
  GstElement* pipe = make_pipeline("model-dir=" + dir);
  ASSERT_NE(pipe, nullptr);
  set_load_delay(pipe, 200);
  GstBus* bus = gst_element_get_bus(pipe);
  ASSERT_NE(gst_element_set_state(pipe, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  LoadMessages m = read_load_messages(bus, 60, [](const LoadMessages& x) { return x.percent.size() >= 2; });
  ASSERT_GE(m.percent.size(), 2u) << "the load did not start";
  const gint64 t0 = g_get_monotonic_time();
  EXPECT_EQ(gst_element_set_state(pipe, GST_STATE_NULL), GST_STATE_CHANGE_SUCCESS);
  const double stop_s = (g_get_monotonic_time() - t0) / 1e6;
  EXPECT_LT(stop_s, 1.0) << "going to NULL waited for the load";
  m = read_load_messages(bus, 0.5, [](const LoadMessages&) { return false; }, m);
  EXPECT_EQ(m.complete, 0);
  EXPECT_TRUE(m.errors.empty()) << m.errors.front();
  gst_object_unref(bus);
  gst_object_unref(pipe);
  remove_dir(dir);
}

// A second element with the same model settings shares the loaded model: its load reads no file (no CONTINUE).
TEST(ElementNeural, TheLoadedModelIsSharedBetweenElements) {
  const std::string dir = fresh_model_dir();
  GstElement* a = make_pipeline("model-dir=" + dir);
  GstElement* b = make_pipeline("model-dir=" + dir);
  ASSERT_TRUE(a && b);
  GstBus* bus_a = gst_element_get_bus(a);
  GstBus* bus_b = gst_element_get_bus(b);
  ASSERT_NE(gst_element_set_state(a, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  const LoadMessages ma = read_load_messages(bus_a, 120, [](const LoadMessages& x) { return x.complete || x.error; });
  ASSERT_EQ(ma.complete, 1);
  EXPECT_FALSE(ma.percent.empty()) << "the first element reads the files";
  ASSERT_NE(gst_element_set_state(b, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  const LoadMessages mb = read_load_messages(bus_b, 120, [](const LoadMessages& x) { return x.complete || x.error; });
  EXPECT_EQ(mb.complete, 1);
  EXPECT_TRUE(mb.percent.empty()) << "the second element read the files again: " << mb.percent.size() << " steps";
  gst_element_set_state(a, GST_STATE_NULL);
  gst_element_set_state(b, GST_STATE_NULL);
  gst_object_unref(bus_a);
  gst_object_unref(bus_b);
  gst_object_unref(a);
  gst_object_unref(b);
  remove_dir(dir);
}

// A model folder without LiveAvatar/liveavatar.safetensors, lora not set: a warning that names the file, and the
// model loads (the base weights) without an error.
TEST(ElementNeural, LoraAbsentFromModelDirIsAWarning) {
  const std::string dir = fresh_model_dir(/*lora=*/false);
  GstElement* pipe = make_pipeline("model-dir=" + dir);
  ASSERT_NE(pipe, nullptr);
  GstBus* bus = gst_element_get_bus(pipe);
  ASSERT_NE(gst_element_set_state(pipe, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  const LoadMessages m = read_load_messages(bus, 120, [](const LoadMessages& x) { return x.complete || x.error; });
  EXPECT_EQ(m.complete, 1);
  EXPECT_TRUE(m.errors.empty()) << m.errors.front();
  bool named = false;
  for (const auto& w : m.warnings) named |= w.find("LiveAvatar/liveavatar.safetensors") != std::string::npos;
  EXPECT_TRUE(named) << "no warning about the missing LoRA";
  gst_element_set_state(pipe, GST_STATE_NULL);
  gst_object_unref(bus);
  gst_object_unref(pipe);
  remove_dir(dir);
}

// A new picture in the middle of a neural stream (at 1.0 s = frame 25) takes effect at the start of a block that was
// not begun yet, without restarting the stream: frames before it are those of a run without the new picture, every
// frame from that block on differs, and the frame count, timestamps and size go on as before.
TEST(ElementNeural, NewPictureMidStreamSwitchesAtTheNextBlock) {
  GstElement* pipe = make_pipeline("width=64 height=64");
  ASSERT_NE(pipe, nullptr);
  const Frames base = run_once(pipe, 32000);  // 2 s = 50 frames
  ASSERT_EQ(base.error, "");
  ASSERT_EQ(base.pts.size(), 50u);
  GstBuffer* other = portrait_buffer();
  {
    GstMapInfo m;
    other = gst_buffer_make_writable(other);
    gst_buffer_map(other, &m, GST_MAP_WRITE);
    for (gsize i = 0; i < m.size; ++i) m.data[i] = static_cast<guint8>(255 - m.data[i]);  // another picture
    gst_buffer_unmap(other, &m);
  }
  GST_BUFFER_PTS(other) = GST_SECOND;
  const Frames f = run_once(pipe, 32000, {other});
  ASSERT_EQ(f.error, "");
  ASSERT_EQ(f.pts.size(), 50u);
  for (size_t i = 0; i < f.pts.size(); ++i) ASSERT_EQ(f.pts[i], i * kFrame) << "frame " << i;
  size_t first = 0;
  while (first < f.data.size() && f.data[first] == base.data[first]) ++first;
  EXPECT_EQ(first % 12, 0u) << "the switch is at a block start, frame " << first;
  EXPECT_GT(first, 24u) << "the picture showed before its time";
  EXPECT_LE(first, 48u) << "the picture never showed";
  for (size_t i = first; i < f.data.size(); ++i) {
    EXPECT_NE(f.data[i], base.data[i]) << "frame " << i << " is still the old picture's";
    EXPECT_EQ(f.data[i].size(), base.data[i].size());
  }
  gst_object_unref(pipe);
}

// Live with no audio at all: the avatar idles on silence-conditioned blocks that the model keeps making (not a
// stall): the output runs at the clock's pace (25 frames per second, timestamps without a gap), the model's frames
// keep coming block after block and the picture moves. lag-policy=drop covers what a slow CPU does not make in time
// (the tiny model's first block also conditions the portrait), so the model's own frames are told apart by the QoS
// messages that report each replaced one.
TEST(ElementNeural, LiveWithoutAudioTheAvatarKeepsMoving) {
  const std::string launch =
      "appsrc name=img format=time caps=video/x-raw,format=RGB,width=512,height=512,framerate=0/1 ! videoconvert ! "
      "la.image appsrc name=aud is-live=true format=time min-latency=100000000 "
      "caps=audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved ! la.audio "
      "liveavatar name=la backend=liveavatar model-dir=" + tiny().dir +
      " width=64 height=64 seed=5 lag-policy=drop ! appsink name=out sync=false max-buffers=0";
  GError* err = nullptr;
  GstElement* pipe = gst_parse_launch(launch.c_str(), &err);
  ASSERT_EQ(err, nullptr) << (err ? err->message : "");
  GstElement* img = gst_bin_get_by_name(GST_BIN(pipe), "img");
  GstElement* out = gst_bin_get_by_name(GST_BIN(pipe), "out");
  GstElement* la = gst_bin_get_by_name(GST_BIN(pipe), "la");
  gst_app_src_push_buffer(GST_APP_SRC(img), portrait_buffer());
  gst_app_src_end_of_stream(GST_APP_SRC(img));
  GstBus* bus = gst_element_get_bus(pipe);
  ASSERT_NE(gst_element_set_state(pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE);
  std::vector<GstClockTime> pts;
  std::vector<gint64> arrived;  // monotonic us
  std::vector<std::vector<guint8>> data;
  std::vector<GstClockTime> replaced;  // running times of replaced frames (the segment starts at 0: = pts)
  std::string error;
  guint64 dropped = 0;
  auto model_frames = [&] {
    size_t n = 0;
    for (GstClockTime t : pts) n += std::find(replaced.begin(), replaced.end(), t) == replaced.end();
    return n;
  };
  const gint64 give_up = g_get_monotonic_time() + 150 * G_USEC_PER_SEC;
  while (error.empty() && g_get_monotonic_time() < give_up && model_frames() < 36 + 12) {
    while (GstMessage* m = gst_bus_pop(bus)) {
      if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_LATENCY) gst_bin_recalculate_latency(GST_BIN(pipe));
      if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_QOS && GST_MESSAGE_SRC(m) == GST_OBJECT(la)) {
        GstFormat fmt;
        guint64 processed, before = dropped;
        gst_message_parse_qos_stats(m, &fmt, &processed, &dropped);
        gboolean live;
        guint64 rt, stream_time, ts, dur;
        gst_message_parse_qos(m, &live, &rt, &stream_time, &ts, &dur);
        if (dropped > before) replaced.push_back(ts);
      }
      if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_ERROR) {
        GError* e = nullptr;
        gst_message_parse_error(m, &e, nullptr);
        error = e->message;
        g_error_free(e);
      }
      gst_message_unref(m);
    }
    while (GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 20 * GST_MSECOND)) {
      GstBuffer* b = gst_sample_get_buffer(s);
      GstMapInfo m;
      gst_buffer_map(b, &m, GST_MAP_READ);
      pts.push_back(GST_BUFFER_PTS(b));
      arrived.push_back(g_get_monotonic_time());
      data.emplace_back(m.data, m.data + m.size);
      gst_buffer_unmap(b, &m);
      gst_sample_unref(s);
    }
  }
  gst_element_set_state(pipe, GST_STATE_NULL);
  EXPECT_EQ(error, "");
  ASSERT_GE(pts.size(), 48u) << "no idle frames";
  for (size_t i = 1; i < pts.size(); ++i) ASSERT_EQ(pts[i], pts[0] + i * kFrame) << "frame " << i;
  // The clock's pace: frames pushed per second of wall time over the run after the first second.
  size_t after = 0;
  for (gint64 t : arrived) after += t >= arrived.front() + G_USEC_PER_SEC;
  const double seconds = (arrived.back() - arrived.front()) / 1e6 - 1.0;
  ASSERT_GT(seconds, 1.0);
  EXPECT_NEAR(after / seconds, 25.0, 5.0) << after << " frames in " << seconds << " s";
  // The model keeps making idle blocks (beyond the first, which conditions the portrait), and they move.
  const size_t made = model_frames();
  EXPECT_GE(made, 48u) << "the model stopped making idle blocks: " << made << " of its frames in " << pts.size();
  std::vector<const std::vector<guint8>*> own;
  for (size_t i = 0; i < pts.size(); ++i)
    if (std::find(replaced.begin(), replaced.end(), pts[i]) == replaced.end()) own.push_back(&data[i]);
  // The tiny checkpoint's random weights move the idle picture only a little, so 8-bit frames often repeat; a frozen
  // picture (the same frame block after block) would move none.
  size_t moved = 0;
  for (size_t i = 1; i < own.size(); ++i) moved += *own[i] != *own[i - 1];
  EXPECT_GE(moved, own.size() / 8) << "the idle avatar does not move";
  for (GstElement* e : {img, out, la}) gst_object_unref(e);
  gst_object_unref(bus);
  gst_object_unref(pipe);
}

namespace {
long status_kib(const char* key) {
  FILE* f = fopen("/proc/self/status", "r");
  char line[256];
  long v = -1;
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, key, strlen(key)) == 0) v = atol(line + strlen(key));
  if (f) fclose(f);
  return v;
}
// What malloc has handed out and not had back, over all arenas and mmapped chunks (LibTorch's CPU tensors, GStreamer's
// buffers and the element's own state all come from malloc).
long heap_kib() {
  const struct mallinfo2 m = mallinfo2();
  return static_cast<long>((m.uordblks + m.hblkhd) / 1024);
}
int entries(const char* dir) {
  int n = 0;
  if (GDir* d = g_dir_open(dir, 0, nullptr)) {
    while (g_dir_read_name(d)) ++n;
    g_dir_close(d);
  }
  return n;
}
}  // namespace

// 600 NULL <-> PLAYING cycles of the neural element: every 50th streams a portrait and one frame of speech to EOS
// (a whole neural block: about a second on 2 CPU cores), the others go to PLAYING and back without data. From cycle
// 100 (the caches warmed up) to 600: no growth of the memory malloc has handed out (a leak of 4 KiB a cycle would
// show), nor of the resident anonymous memory's floor (its lowest reading after malloc_trim in each window: single
// readings move by +-40 MB as threads come and go and glibc's arenas fragment, with the allocated bytes flat to
// 0.1 MB), nor of open files; threads stay within the two that GStreamer's task pool may keep idle for the next
// streaming thread. Run as its own meson test (element-neural-cycles); LIVEAVATAR_CYCLES sets another count,
// LIVEAVATAR_CYCLES_TRACE=1 prints the readings.
TEST(Cycles, SixHundredNullPlayingCyclesDoNotGrow) {
  GstElement* pipe = make_pipeline("width=64 height=64");
  ASSERT_NE(pipe, nullptr);
  const int cycles = getenv("LIVEAVATAR_CYCLES") ? atoi(getenv("LIVEAVATAR_CYCLES")) : 600;
  const bool trace = getenv("LIVEAVATAR_CYCLES_TRACE") != nullptr;
  const int window = cycles / 6;  // readings over cycles [window, 2 window) and the last window
  long heap0 = 0, anon_floor0 = -1, anon_floor1 = -1;
  int threads0 = 0, fds0 = 0;
  const gint64 t0 = g_get_monotonic_time();
  for (int i = 0; i < cycles; ++i) {
    if (i % 50 == 0) {
      const Frames f = run_once(pipe, 640);
      ASSERT_EQ(f.error, "") << "cycle " << i;
      ASSERT_EQ(f.pts.size(), 1u) << "cycle " << i;
    } else {
      ASSERT_NE(gst_element_set_state(pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE) << "cycle " << i;
      ASSERT_EQ(gst_element_set_state(pipe, GST_STATE_NULL), GST_STATE_CHANGE_SUCCESS) << "cycle " << i;
    }
    const int n = i + 1;
    if (n % 10 == 0 && ((n > window && n <= 2 * window) || n > cycles - window)) {
      malloc_trim(0);
      const long anon = status_kib("RssAnon:");
      long& floor = n <= 2 * window ? anon_floor0 : anon_floor1;
      if (floor < 0 || anon < floor) floor = anon;
      if (trace)
        std::printf("cycle %d: RssAnon %ld KiB, heap %ld KiB, threads %d\n", n, anon, heap_kib(),
                    entries("/proc/self/task"));
    }
    if (n == window) {
      malloc_trim(0);
      heap0 = heap_kib();
      threads0 = entries("/proc/self/task");
      fds0 = entries("/proc/self/fd");
    }
  }
  malloc_trim(0);
  const long heap = heap_kib();
  const int threads = entries("/proc/self/task"), fds = entries("/proc/self/fd");
  std::printf("%d cycles in %.1f s; from cycle %d to %d: allocated %ld -> %ld KiB, RssAnon floor %ld -> %ld KiB, "
              "threads %d -> %d, fds %d -> %d\n",
              cycles, (g_get_monotonic_time() - t0) / 1e6, window, cycles, heap0, heap, anon_floor0, anon_floor1,
              threads0, threads, fds0, fds);
  EXPECT_LT(heap - heap0, 2 * 1024) << "malloc's memory in use grew by " << (heap - heap0) << " KiB";
  EXPECT_LT(anon_floor1 - anon_floor0, 32 * 1024) << "the resident anonymous memory's floor grew by "
                                                  << (anon_floor1 - anon_floor0) << " KiB";
  EXPECT_LE(threads, threads0 + 2);
  EXPECT_EQ(fds, fds0);
  gst_object_unref(pipe);
}

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
