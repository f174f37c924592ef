// Fault injection on the neural backend (backend=liveavatar on the make-tiny checkpoint): what the disk does to a
// model while it loads. The model folder disappears in the middle of the load; a weights file is truncated before
// the load, or while the load is reading it; the prompt cache's disk is full (a real ENOSPC: the cache's temporary
// file is a symlink to /dev/full). Each must give an element error that names the file and says what is wrong,
// within a bounded time, with no crash and no hang; the pipeline then goes to NULL and, once the fault is removed,
// plays again in the same process and gives every frame at its time.
#include <gst/app/gstappsink.h>
#include <gst/app/gstappsrc.h>
#include <gst/gst.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../tiny_checkpoint.h"

namespace {

using testutil::tiny;

constexpr GstClockTime kFrame = GST_SECOND / 25;
constexpr size_t kSamples = 8000;  // 0.5 s of speech: 13 frames, two blocks of the model
constexpr size_t kFrames = (kSamples + 639) / 640;
constexpr double kBoundS = 120;  // for an error or EOS: generous, a loaded 2-core machine loads the model in seconds
const char kDit1[] = "Wan2.2-S2V-14B/diffusion_pytorch_model-00001-of-00002.safetensors";
const char kVae[] = "Wan2.2-S2V-14B/Wan2.1_VAE.pth";
const char kWav2vec2[] = "Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english/model.safetensors";
const char kLora[] = "LiveAvatar/liveavatar.safetensors";
const char kT5[] = "Wan2.2-S2V-14B/models_t5_umt5-xxl-enc-bf16.pth";

int sh(const std::string& command) { return std::system(command.c_str()); }

// A model folder of its own: real copies of the tiny checkpoint's files (a path no earlier test loaded, so the model
// is read from it rather than shared).
std::string copy_of_tiny() {
  char tmpl[] = "/tmp/liveavatar-faults-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  EXPECT_EQ(sh("cp -R '" + tiny().dir + "/Wan2.2-S2V-14B' '" + tiny().dir + "/LiveAvatar' '" + dir + "/'"), 0);
  return dir;
}

// Puts the tiny checkpoint's copy of `file` back into `dir` (after a fault).
void restore(const std::string& dir, const std::string& file) {
  EXPECT_EQ(sh("mkdir -p \"$(dirname '" + dir + "/" + file + "')\" && cp '" + tiny().dir + "/" + file + "' '" + dir +
               "/" + file + "'"), 0);
}

off_t size_of(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? st.st_size : -1;
}

struct Outcome {
  std::string error;  // the element's error message; empty: EOS
  std::vector<GstClockTime> pts;
  double seconds = 0;  // from PLAYING to the error or EOS
  bool bounded = false;
};

class NeuralFaults : public ::testing::Test {
 protected:
  void TearDown() override {
    if (pipeline_) {
      gst_element_set_state(pipeline_, GST_STATE_NULL);
      gst_object_unref(pipeline_);
    }
    for (const auto& d : dirs_) sh("rm -rf '" + d + "'");
  }

  std::string model_dir() {
    dirs_.push_back(copy_of_tiny());
    return dirs_.back();
  }

  void make_pipeline(const std::string& dir, const std::string& extra = "") {
    const std::string launch =
        "appsrc name=img format=time caps=video/x-raw,format=RGB,width=96,height=96,framerate=0/1 ! la.image "
        "appsrc name=aud format=time caps=audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved "
        "! la.audio liveavatar name=la backend=liveavatar model-dir=" + dir +
        " width=64 height=64 seed=3 " + extra + " ! appsink name=out sync=false max-buffers=0 wait-on-eos=false";
    GError* err = nullptr;
    pipeline_ = gst_parse_launch(launch.c_str(), &err);
    ASSERT_NE(pipeline_, nullptr) << (err ? err->message : "");
  }

  // Tests only: every step of the load (each DiT tensor) takes this long, so a fault lands in the middle of it.
  void set_load_delay(int ms) {
    GstElement* la = gst_bin_get_by_name(GST_BIN(pipeline_), "la");
    g_object_set_data(G_OBJECT(la), "liveavatar-testing-load-delay-ms", GINT_TO_POINTER(ms));
    gst_object_unref(la);
  }

  // Starts the pipeline and queues a picture and kSamples of speech, then EOS.
  void start() {
    start_us_ = g_get_monotonic_time();
    gst_element_set_state(pipeline_, GST_STATE_PLAYING);
    GstElement* img = gst_bin_get_by_name(GST_BIN(pipeline_), "img");
    GstElement* aud = gst_bin_get_by_name(GST_BIN(pipeline_), "aud");
    GstBuffer* picture = gst_buffer_new_allocate(nullptr, 96 * 96 * 3, nullptr);
    GstMapInfo m;
    gst_buffer_map(picture, &m, GST_MAP_WRITE);
    for (size_t i = 0; i < m.size; ++i) m.data[i] = static_cast<guint8>((i * 7) % 251);
    gst_buffer_unmap(picture, &m);
    GST_BUFFER_PTS(picture) = 0;
    gst_app_src_push_buffer(GST_APP_SRC(img), picture);
    gst_app_src_end_of_stream(GST_APP_SRC(img));
    for (size_t at = 0; at < kSamples; at += 1600) {
      const size_t n = std::min<size_t>(1600, kSamples - at);
      GstBuffer* b = gst_buffer_new_allocate(nullptr, n * sizeof(float), nullptr);
      gst_buffer_map(b, &m, GST_MAP_WRITE);
      for (size_t i = 0; i < n; ++i)
        reinterpret_cast<float*>(m.data)[i] = 0.3f * std::sin(2 * M_PI * 190.0 * (at + i) / 16000.0);
      gst_buffer_unmap(b, &m);
      GST_BUFFER_PTS(b) = gst_util_uint64_scale(at, GST_SECOND, 16000);
      GST_BUFFER_DURATION(b) = gst_util_uint64_scale(n, GST_SECOND, 16000);
      gst_app_src_push_buffer(GST_APP_SRC(aud), b);
    }
    gst_app_src_end_of_stream(GST_APP_SRC(aud));
    gst_object_unref(img);
    gst_object_unref(aud);
  }

  // Waits until the load has read `steps` DiT tensors (PROGRESS "load" messages of its first part); false: it
  // ended (or failed) first.
  bool wait_for_load_steps(int steps) {
    GstBus* bus = gst_element_get_bus(pipeline_);
    int seen = 0;
    const gint64 end = g_get_monotonic_time() + static_cast<gint64>(kBoundS * G_USEC_PER_SEC);
    while (seen < steps && g_get_monotonic_time() < end) {
      GstMessage* msg = gst_bus_timed_pop_filtered(
          bus, 50 * GST_MSECOND, static_cast<GstMessageType>(GST_MESSAGE_PROGRESS | GST_MESSAGE_ERROR));
      if (!msg) continue;
      bool over = GST_MESSAGE_TYPE(msg) == GST_MESSAGE_ERROR;
      if (GST_MESSAGE_TYPE(msg) == GST_MESSAGE_PROGRESS) {
        GstProgressType type;
        gst_message_parse_progress(msg, &type, nullptr, nullptr);
        int files_done = -1;
        gst_structure_get_int(gst_message_get_structure(msg), "files-done", &files_done);
        if (type == GST_PROGRESS_TYPE_CONTINUE && files_done == 0) ++seen;
        over |= type == GST_PROGRESS_TYPE_COMPLETE || type == GST_PROGRESS_TYPE_ERROR || files_done > 0;
      }
      gst_message_unref(msg);
      if (over) break;
    }
    gst_object_unref(bus);
    return seen >= steps;
  }

  // Waits until the prompt is being encoded (the load's progress reports all files read, then once per umT5 layer).
  bool wait_for_prompt_phase() {
    GstBus* bus = gst_element_get_bus(pipeline_);
    bool found = false, over = false;
    const gint64 end = g_get_monotonic_time() + static_cast<gint64>(kBoundS * G_USEC_PER_SEC);
    while (!found && !over && g_get_monotonic_time() < end) {
      GstMessage* msg = gst_bus_timed_pop_filtered(
          bus, 50 * GST_MSECOND, static_cast<GstMessageType>(GST_MESSAGE_PROGRESS | GST_MESSAGE_ERROR));
      if (!msg) continue;
      over = GST_MESSAGE_TYPE(msg) == GST_MESSAGE_ERROR;
      if (GST_MESSAGE_TYPE(msg) == GST_MESSAGE_PROGRESS) {
        GstProgressType type;
        gst_message_parse_progress(msg, &type, nullptr, nullptr);
        int files_done = -1, files_total = -2;
        gst_structure_get_int(gst_message_get_structure(msg), "files-done", &files_done);
        gst_structure_get_int(gst_message_get_structure(msg), "files-total", &files_total);
        found = type == GST_PROGRESS_TYPE_CONTINUE && files_done == files_total;
        over |= type == GST_PROGRESS_TYPE_COMPLETE || type == GST_PROGRESS_TYPE_ERROR;
      }
      gst_message_unref(msg);
    }
    gst_object_unref(bus);
    return found;
  }

  // Reads to the error or EOS (at most kBoundS), then takes the pipeline to NULL (which must succeed).
  Outcome finish() {
    Outcome o;
    GstElement* out = gst_bin_get_by_name(GST_BIN(pipeline_), "out");
    GstBus* bus = gst_element_get_bus(pipeline_);
    const gint64 end = start_us_ + static_cast<gint64>(kBoundS * G_USEC_PER_SEC);
    while (g_get_monotonic_time() < end) {
      while (GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 0)) {
        o.pts.push_back(GST_BUFFER_PTS(gst_sample_get_buffer(s)));
        gst_sample_unref(s);
      }
      GstMessage* msg = gst_bus_timed_pop_filtered(bus, 20 * GST_MSECOND,
                                                   static_cast<GstMessageType>(GST_MESSAGE_ERROR | GST_MESSAGE_EOS));
      if (!msg) continue;
      o.bounded = true;
      if (GST_MESSAGE_TYPE(msg) == GST_MESSAGE_ERROR) {
        GError* err = nullptr;
        gst_message_parse_error(msg, &err, nullptr);
        o.error = err->message;
        g_error_free(err);
      }
      gst_message_unref(msg);
      break;
    }
    o.seconds = (g_get_monotonic_time() - start_us_) / 1e6;
    while (GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 0)) {
      o.pts.push_back(GST_BUFFER_PTS(gst_sample_get_buffer(s)));
      gst_sample_unref(s);
    }
    gst_object_unref(bus);
    gst_object_unref(out);
    const gint64 t0 = g_get_monotonic_time();
    EXPECT_EQ(gst_element_set_state(pipeline_, GST_STATE_NULL), GST_STATE_CHANGE_SUCCESS);
    EXPECT_LT((g_get_monotonic_time() - t0) / 1e6, 10.0) << "going to NULL took long";
    std::printf("  %s after %.2f s%s%s\n", o.error.empty() ? "EOS" : "error", o.seconds, o.error.empty() ? "" : ": ",
                o.error.c_str());
    return o;
  }

  Outcome play() {
    start();
    return finish();
  }

  // The same pipeline, the fault removed: the whole stream, every frame at its time.
  void expect_clean_run() {
    set_load_delay(0);
    const Outcome o = play();
    ASSERT_TRUE(o.bounded) << "neither EOS nor an error within " << kBoundS << " s of the restart";
    ASSERT_EQ(o.error, "");
    ASSERT_EQ(o.pts.size(), kFrames);
    for (size_t i = 0; i < o.pts.size(); ++i) EXPECT_EQ(o.pts[i], i * kFrame) << "frame " << i;
  }

  GstElement* pipeline_ = nullptr;
  gint64 start_us_ = 0;
  std::vector<std::string> dirs_;
};

// The model folder is deleted while the DiT's tensors are being read (the files are still mapped, but each tensor is
// read from its path): an error that names the file that is gone. Put back, the same pipeline loads and plays.
TEST_F(NeuralFaults, ModelFolderDisappearsWhileTheModelLoads) {
  const std::string dir = model_dir();
  make_pipeline(dir);
  set_load_delay(20);
  start();
  ASSERT_TRUE(wait_for_load_steps(5)) << "the DiT did not start loading";
  ASSERT_EQ(sh("rm -rf '" + dir + "/Wan2.2-S2V-14B' '" + dir + "/LiveAvatar'"), 0);
  const Outcome o = finish();
  ASSERT_TRUE(o.bounded) << "neither an error nor EOS within " << kBoundS << " s";
  EXPECT_NE(o.error.find(dir + "/Wan2.2-S2V-14B/"), std::string::npos) << o.error;
  EXPECT_NE(o.error.find("No such file or directory"), std::string::npos) << o.error;
  EXPECT_TRUE(o.pts.empty());
  ASSERT_EQ(sh("cp -R '" + tiny().dir + "/Wan2.2-S2V-14B' '" + tiny().dir + "/LiveAvatar' '" + dir + "/'"), 0);
  expect_clean_run();
}

// Each weights file cut to half its size before the load (an interrupted download): the load fails with an error that
// names the file, nothing crashes; with the file whole again the same pipeline plays.
TEST_F(NeuralFaults, TruncatedWeightsFileBeforeTheLoad) {
  const std::string dir = model_dir();
  make_pipeline(dir);
  for (const char* file : {kDit1, kVae, kWav2vec2, kLora}) {
    SCOPED_TRACE(file);
    const std::string path = dir + "/" + file;
    ASSERT_EQ(::truncate(path.c_str(), size_of(path) / 2), 0);
    const Outcome o = play();
    ASSERT_TRUE(o.bounded) << "neither an error nor EOS within " << kBoundS << " s";
    EXPECT_NE(o.error.find(path), std::string::npos) << o.error;
    EXPECT_TRUE(o.pts.empty());
    restore(dir, file);
  }
  expect_clean_run();
}

// A DiT shard cut short while the load is reading its tensors (the mapping made before the cut would raise SIGBUS on
// the missing pages; the loader reads with pread): "the file shrank", naming the file.
TEST_F(NeuralFaults, DitShardTruncatedWhileTheModelLoads) {
  const std::string dir = model_dir();
  make_pipeline(dir);
  set_load_delay(20);
  start();
  ASSERT_TRUE(wait_for_load_steps(3)) << "the DiT did not start loading";
  const std::string path = dir + "/" + kDit1;
  ASSERT_EQ(::truncate(path.c_str(), 4096), 0);
  const Outcome o = finish();
  ASSERT_TRUE(o.bounded) << "neither an error nor EOS within " << kBoundS << " s";
  EXPECT_NE(o.error.find(path), std::string::npos) << o.error;
  EXPECT_NE(o.error.find("the file shrank"), std::string::npos) << o.error;
  restore(dir, kDit1);
  expect_clean_run();
}

// The LoRA, merged tensor by tensor into the DiT as it loads, cut short in the middle of the load.
TEST_F(NeuralFaults, LoraTruncatedWhileTheModelLoads) {
  const std::string dir = model_dir();
  make_pipeline(dir);
  set_load_delay(20);
  start();
  ASSERT_TRUE(wait_for_load_steps(3)) << "the DiT did not start loading";
  const std::string path = dir + "/" + kLora;
  ASSERT_EQ(::truncate(path.c_str(), 1024), 0);
  const Outcome o = finish();
  ASSERT_TRUE(o.bounded) << "neither an error nor EOS within " << kBoundS << " s";
  EXPECT_NE(o.error.find(path), std::string::npos) << o.error;
  EXPECT_NE(o.error.find("the file shrank"), std::string::npos) << o.error;
  restore(dir, kLora);
  expect_clean_run();
}

// The umT5 encoder's file cut short while it encodes the prompt (precision=bf16, where its weights were views of the
// file's mapping: the encoding touched the missing pages and SIGBUS killed the process; they are read into memory of
// their own now). A first pipeline loads the model (kept, so the second shares it and reads no weights file); the
// second has a prompt not cached yet. Its load's progress callback runs (and sleeps the test delay) before umT5 is
// read, after, and before each of its 2 layers: the cut comes 2 delays after the first, in the middle of the
// encoding, so umT5 was read whole before it and the stream is whole; on a machine so loaded that the cut comes
// before umT5 is read, the error names the file.
TEST_F(NeuralFaults, TextEncoderTruncatedWhileThePromptIsEncoded) {
  const std::string dir = model_dir();
  const std::string saved = std::getenv("XDG_CACHE_HOME") ? std::getenv("XDG_CACHE_HOME") : "";
  setenv("XDG_CACHE_HOME", (dir + "/cache").c_str(), 1);
  make_pipeline(dir, "precision=bf16");
  const Outcome first = play();
  ASSERT_EQ(first.error, "");
  GstElement* loaded = pipeline_;
  make_pipeline(dir, "precision=bf16 prompt=\"a prompt that is not cached yet\"");
  constexpr int kDelayMs = 400;
  set_load_delay(kDelayMs);
  start();
  ASSERT_TRUE(wait_for_prompt_phase()) << "the prompt was not encoded";
  g_usleep(2 * kDelayMs * 1000);
  const std::string path = dir + "/" + kT5;
  ASSERT_EQ(::truncate(path.c_str(), 1024), 0);
  const Outcome o = finish();
  ASSERT_TRUE(o.bounded) << "neither an error nor EOS within " << kBoundS << " s";
  if (o.error.empty())
    EXPECT_EQ(o.pts.size(), kFrames);
  else
    EXPECT_NE(o.error.find(path), std::string::npos) << o.error;
  restore(dir, kT5);
  expect_clean_run();
  gst_element_set_state(loaded, GST_STATE_NULL);
  gst_object_unref(loaded);
  setenv("XDG_CACHE_HOME", saved.c_str(), 1);
}

// The prompt cache's disk is full: the embedding's file cannot be written (ENOSPC, from /dev/full). The documented
// behaviour (README, `prompt`): an element error that says the cache cannot be written and names XDG_CACHE_HOME; no
// partial file is left. With room again the same pipeline plays and the embedding is cached.
TEST_F(NeuralFaults, PromptCacheDiskFull) {
  const std::string dir = model_dir();
  const std::string saved = std::getenv("XDG_CACHE_HOME") ? std::getenv("XDG_CACHE_HOME") : "";
  setenv("XDG_CACHE_HOME", (dir + "/cache").c_str(), 1);
  const std::string cache = dir + "/cache/liveavatar/text";
  // A first pipeline (another element) learns the cache file's name (a hash of the prompt and the model files).
  make_pipeline(dir);
  const Outcome first = play();
  ASSERT_EQ(first.error, "");
  ASSERT_EQ(first.pts.size(), kFrames);
  GstElement* learned = pipeline_;  // kept alive, so the model stays loaded (shared) and the next load is quick
  std::string name;
  GDir* d = g_dir_open(cache.c_str(), 0, nullptr);
  ASSERT_NE(d, nullptr) << cache;
  while (const gchar* n = g_dir_read_name(d)) name = n;
  g_dir_close(d);
  ASSERT_TRUE(g_str_has_suffix(name.c_str(), ".safetensors")) << name;
  // The embedding is written to <name>.tmp.<pid>.tmp, then renamed: that file is /dev/full.
  ASSERT_EQ(std::remove((cache + "/" + name).c_str()), 0);
  const std::string tmp = cache + "/" + name + ".tmp." + std::to_string(getpid()) + ".tmp";
  ASSERT_EQ(symlink("/dev/full", tmp.c_str()), 0);
  make_pipeline(dir);
  const Outcome o = play();
  ASSERT_TRUE(o.bounded) << "neither an error nor EOS within " << kBoundS << " s";
  EXPECT_NE(o.error.find("No space left on device"), std::string::npos) << o.error;
  EXPECT_NE(o.error.find("cannot write the prompt embedding cache"), std::string::npos) << o.error;
  EXPECT_NE(o.error.find("XDG_CACHE_HOME"), std::string::npos) << o.error;
  struct stat st {};
  EXPECT_NE(::lstat(tmp.c_str(), &st), 0) << "the temporary file was left behind";
  EXPECT_NE(::stat((cache + "/" + name).c_str(), &st), 0) << "a partial embedding was cached";
  ::unlink(tmp.c_str());  // the fault removed (if the element had not)
  expect_clean_run();
  EXPECT_EQ(::stat((cache + "/" + name).c_str(), &st), 0) << "the embedding was not cached after the restart";
  gst_element_set_state(learned, GST_STATE_NULL);
  gst_object_unref(learned);
  setenv("XDG_CACHE_HOME", saved.c_str(), 1);
}

}  // namespace

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
