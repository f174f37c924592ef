// The element with backend=liveavatar over several ranks (parallel=stage / auto, devices=cpu:N: ranks as threads of
// the element's process, joined over Gloo on loopback) on the tiny checkpoint: the same video as parallel=single,
// the plan posted as an element message, bad settings refused with what to write.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gst/app/gstappsink.h>
#include <gst/app/gstappsrc.h>
#include <gst/gst.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../tiny_checkpoint.h"
#include "media_io.h"
#include "neural_util.h"

namespace {

constexpr GstClockTime kFrame = GST_SECOND / 25;

using testutil::tiny;

using testutil::portrait_buffer;
using testutil::speech;

struct Output {
  std::vector<GstClockTime> pts;
  std::vector<std::vector<guint8>> data;
  std::string error;
  GstStructure* plan = nullptr;  // the "liveavatar-plan" message's structure (owned)
  ~Output() {
    if (plan) gst_structure_free(plan);
  }
};

GstElement* make_pipeline(const std::string& extra) {
  const std::string launch =
      "appsrc name=img format=time caps=video/x-raw,format=RGB,width=512,height=512,framerate=0/1 ! videoconvert ! "
      "la.image appsrc name=aud format=time caps=audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved "
      "! la.audio liveavatar name=la backend=liveavatar model-dir=" + tiny().dir +
      " width=64 height=64 seed=5 parallel-timeout=20000 " + extra + " ! appsink name=out sync=false max-buffers=0";
  GError* err = nullptr;
  GstElement* pipe = gst_parse_launch(launch.c_str(), &err);
  EXPECT_EQ(err, nullptr) << (err ? err->message : "");
  return pipe;
}

// One run from PLAYING to EOS (or an error) with `samples` of speech, then NULL.
void run_once(GstElement* pipe, Output* r, size_t samples) {
  GstElement* img = gst_bin_get_by_name(GST_BIN(pipe), "img");
  GstElement* aud = gst_bin_get_by_name(GST_BIN(pipe), "aud");
  GstElement* out = gst_bin_get_by_name(GST_BIN(pipe), "out");
  GstBus* bus = gst_element_get_bus(pipe);
  gst_element_set_state(pipe, GST_STATE_PLAYING);
  gst_app_src_push_buffer(GST_APP_SRC(img), portrait_buffer());
  gst_app_src_end_of_stream(GST_APP_SRC(img));
  for (size_t at = 0; at < samples; at += 1600)
    gst_app_src_push_buffer(GST_APP_SRC(aud), speech(gst_util_uint64_scale(at, GST_SECOND, 16000),
                                                     std::min<size_t>(1600, samples - at)));
  gst_app_src_end_of_stream(GST_APP_SRC(aud));
  for (gint64 end = g_get_monotonic_time() + 300 * G_USEC_PER_SEC; g_get_monotonic_time() < end;) {
    if (GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 50 * GST_MSECOND)) {
      GstBuffer* b = gst_sample_get_buffer(s);
      GstMapInfo m;
      gst_buffer_map(b, &m, GST_MAP_READ);
      r->pts.push_back(GST_BUFFER_PTS(b));
      r->data.emplace_back(m.data, m.data + m.size);
      gst_buffer_unmap(b, &m);
      gst_sample_unref(s);
      continue;
    }
    if (gst_app_sink_is_eos(GST_APP_SINK(out))) break;
    bool stop = false;
    while (GstMessage* msg = gst_bus_pop(bus)) {
      if (GST_MESSAGE_TYPE(msg) == GST_MESSAGE_ERROR) {
        GError* err = nullptr;
        gst_message_parse_error(msg, &err, nullptr);
        r->error = err->message;
        g_error_free(err);
        stop = true;
      } else if (GST_MESSAGE_TYPE(msg) == GST_MESSAGE_ELEMENT &&
                 gst_structure_has_name(gst_message_get_structure(msg), "liveavatar-plan") && !r->plan) {
        r->plan = gst_structure_copy(gst_message_get_structure(msg));
      }
      gst_message_unref(msg);
    }
    if (stop) break;
  }
  while (GstMessage* msg = gst_bus_pop(bus)) {  // what came with or after the end of the stream
    if (GST_MESSAGE_TYPE(msg) == GST_MESSAGE_ELEMENT &&
        gst_structure_has_name(gst_message_get_structure(msg), "liveavatar-plan") && !r->plan)
      r->plan = gst_structure_copy(gst_message_get_structure(msg));
    if (GST_MESSAGE_TYPE(msg) == GST_MESSAGE_ERROR && r->error.empty()) {
      GError* err = nullptr;
      gst_message_parse_error(msg, &err, nullptr);
      r->error = err->message;
      g_error_free(err);
    }
    gst_message_unref(msg);
  }
  gst_object_unref(bus);
  gst_element_set_state(pipe, GST_STATE_NULL);
  for (GstElement* e : {img, aud, out}) gst_object_unref(e);
}

std::string plan_string(const GstStructure* plan, const char* field) {
  const char* v = plan ? gst_structure_get_string(plan, field) : nullptr;
  return v ? v : "";
}

std::vector<std::string> plan_strings(const GstStructure* plan, const char* field) {
  std::vector<std::string> out;
  const GValue* a = plan ? gst_structure_get_value(plan, field) : nullptr;
  for (guint i = 0; a && i < gst_value_array_get_size(a); ++i)
    out.push_back(g_value_get_string(gst_value_array_get_value(a, i)));
  return out;
}

std::vector<guint64> plan_bytes(const GstStructure* plan) {
  std::vector<guint64> out;
  const GValue* a = plan ? gst_structure_get_value(plan, "bytes") : nullptr;
  for (guint i = 0; a && i < gst_value_array_get_size(a); ++i)
    out.push_back(g_value_get_uint64(gst_value_array_get_value(a, i)));
  return out;
}

// The largest difference of one byte between two runs' frames.
int max_difference(const Output& a, const Output& b) {
  int worst = 0;
  for (size_t i = 0; i < std::min(a.data.size(), b.data.size()); ++i) {
    if (a.data[i].size() != b.data[i].size()) return 256;
    for (size_t k = 0; k < a.data[i].size(); ++k) worst = std::max(worst, std::abs(a.data[i][k] - b.data[i][k]));
  }
  return worst;
}

constexpr size_t kSamples = 8000;  // 0.5 s: 13 frames, 2 DiT blocks

// parallel=single's video of kSamples, made once per test binary.
const Output& single_video() {
  static Output single;
  if (single.pts.empty() && single.error.empty()) {
    GstElement* pipe = make_pipeline("parallel=single devices=cpu");
    if (!pipe) {
      single.error = "no pipeline";
      return single;
    }
    run_once(pipe, &single, kSamples);
    gst_object_unref(pipe);
  }
  return single;
}

}  // namespace

// parallel=stage devices=cpu:2: rank 1 (a thread of this process, holding the second layer and its caches) runs
// every block's second half; the video equals parallel=single's (same frame count and timestamps; the plans are
// bit-identical on CPU, so the pixels may differ by at most one level from a rounding in the VAE). The plan is
// posted as the element message "liveavatar-plan".
TEST(ElementParallel, StageOverTwoCpuRanksMakesTheVideoOfSingle) {
  const Output& single = single_video();
  ASSERT_EQ(single.error, "");
  ASSERT_EQ(single.pts.size(), 13u) << "ceil(0.5 s x 25)";
  EXPECT_EQ(plan_string(single.plan, "parallel"), "single");

  GstElement* pipe = make_pipeline("parallel=stage devices=cpu:2");
  ASSERT_NE(pipe, nullptr);
  Output stage;
  run_once(pipe, &stage, kSamples);
  gst_object_unref(pipe);
  ASSERT_EQ(stage.error, "");
  ASSERT_EQ(stage.pts.size(), single.pts.size());
  for (size_t i = 0; i < stage.pts.size(); ++i) EXPECT_EQ(stage.pts[i], i * kFrame) << "frame " << i;
  EXPECT_LE(max_difference(stage, single), 1);
  EXPECT_NE(stage.data[0], stage.data[12]) << "the picture moves";
  // The plan: stage over two CPU ranks, rank 0's layers first, bytes per device from the memory planner.
  EXPECT_EQ(plan_string(stage.plan, "parallel"), "stage");
  EXPECT_EQ(plan_strings(stage.plan, "devices"), (std::vector<std::string>{"cpu", "cpu"}));
  const auto roles = plan_strings(stage.plan, "roles");
  ASSERT_EQ(roles.size(), 2u);
  EXPECT_NE(roles[0].find("stage 0/2"), std::string::npos) << roles[0];
  EXPECT_NE(roles[1].find("stage 1/2"), std::string::npos) << roles[1];
  const auto bytes = plan_bytes(stage.plan);
  ASSERT_EQ(bytes.size(), 2u);
  EXPECT_GT(bytes[0], 0u);
  EXPECT_GT(bytes[1], 0u);
  EXPECT_NE(plan_string(stage.plan, "summary").find("stage x2"), std::string::npos)
      << plan_string(stage.plan, "summary");
  // The VAE decoder and wav2vec2 run on the rank the planner gave them (its role says "+ aux"), umT5 where it put it.
  int aux = -1;
  for (size_t k = 0; k < roles.size(); ++k)
    if (roles[k].find("+ aux") != std::string::npos) aux = static_cast<int>(k);
  ASSERT_GE(aux, 0) << "no rank holds the VAE and wav2vec2: " << roles[0] << " / " << roles[1];
  EXPECT_EQ(plan_string(stage.plan, "companions"), plan_strings(stage.plan, "devices")[static_cast<size_t>(aux)]);
  EXPECT_EQ(plan_string(stage.plan, "text-encoder"), "cpu");
  EXPECT_NE(plan_string(stage.plan, "summary").find("VAE + wav2vec2 on cpu"), std::string::npos)
      << plan_string(stage.plan, "summary");
}

// kv-precision=fp8 over the stage plan: every rank keeps its rings and sink K/V in float8 (a quarter of fp32's
// bytes); the video has single's frames and timestamps, the pixels near single's (fp32 caches), and the plan says
// which precision the caches are in.
TEST(ElementParallel, Fp8KvCachesOnTheStagePlan) {
  const Output& single = single_video();
  ASSERT_EQ(single.error, "");
  EXPECT_EQ(plan_string(single.plan, "kv-precision"), "fp32");
  GstElement* pipe = make_pipeline("parallel=stage devices=cpu:2 kv-precision=fp8");
  ASSERT_NE(pipe, nullptr);
  Output fp8;
  run_once(pipe, &fp8, kSamples);
  gst_object_unref(pipe);
  ASSERT_EQ(fp8.error, "");
  ASSERT_EQ(fp8.pts.size(), single.pts.size());
  for (size_t i = 0; i < fp8.pts.size(); ++i) EXPECT_EQ(fp8.pts[i], i * kFrame) << "frame " << i;
  EXPECT_EQ(plan_string(fp8.plan, "kv-precision"), "fp8");
  double mean = 0;
  size_t count = 0;
  for (size_t i = 0; i < fp8.data.size(); ++i)
    for (size_t k = 0; k < fp8.data[i].size(); ++k, ++count) mean += std::abs(fp8.data[i][k] - single.data[i][k]);
  mean /= static_cast<double>(std::max<size_t>(1, count));
  std::printf("kv-precision=fp8 against fp32 caches: largest pixel difference %d, mean %.3f levels\n",
              max_difference(fp8, single), mean);
  EXPECT_GT(max_difference(fp8, single), 0) << "fp8 caches changed nothing";
  EXPECT_LT(mean, 8.0) << "fp8 caches moved the picture too far from fp32's";
}

// The plan message of READY -> PAUSED (the engine loads there), or the error.
std::string start_plan(const std::string& settings, GstStructure** plan) {
  GstElement* pipe = make_pipeline(settings);
  if (!pipe) return "no pipeline";
  std::string error;
  if (gst_element_set_state(pipe, GST_STATE_PAUSED) == GST_STATE_CHANGE_FAILURE) error = "start failed";
  GstBus* bus = gst_element_get_bus(pipe);
  while (GstMessage* m = gst_bus_pop(bus)) {
    if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_ELEMENT &&
        gst_structure_has_name(gst_message_get_structure(m), "liveavatar-plan") && !*plan)
      *plan = gst_structure_copy(gst_message_get_structure(m));
    gst_message_unref(m);
  }
  gst_object_unref(bus);
  gst_element_set_state(pipe, GST_STATE_NULL);
  gst_object_unref(pipe);
  return error;
}

// parallel=auto with two CPU ranks: the planner picks the layer pipeline over both (twice single's speed in its
// model; step needs 4 devices) and the element says so when it starts.
TEST(ElementParallel, AutoChoosesAPlanAndPostsIt) {
  Output r;
  EXPECT_EQ(start_plan("parallel=auto devices=cpu:2", &r.plan), "");
  EXPECT_EQ(plan_string(r.plan, "parallel"), "stage");
  EXPECT_EQ(plan_strings(r.plan, "devices").size(), 2u);
  EXPECT_EQ(plan_bytes(r.plan).size(), 2u);
}

// The error of READY->PAUSED with `extra` settings ("" if the start succeeds).
std::string start_error(const std::string& extra) {
  GstElement* pipe = make_pipeline(extra);
  if (!pipe) return "no pipeline";
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

TEST(ElementParallel, BadSettingsAreRefusedWithWhatToWrite) {
  struct Case {
    const char* settings;
    const char* says;
  } cases[] = {
      {"parallel=stage devices=gpu0", "write e.g. \"cpu:4\""},
      {"parallel=single devices=cpu:2", "choose parallel=step or parallel=stage"},
      {"parallel=step devices=cpu:2", "parallel=step needs one device per denoising step"},
      {"parallel=stage devices=cpu", "parallel=stage needs at least 2 ranks"},
      {"parallel=stage devices=cpu:3", "more ranks than the model has layers"},
      {"kv-precision=fp8 parallel=step devices=cpu:2", "parallel=step needs one device per denoising step"},
      {"parallel=single rendezvous=127.0.0.1:29511", "clear rendezvous"},
  };
  for (const auto& c : cases) {
    const std::string err = start_error(c.settings);
    EXPECT_NE(err.find(c.says), std::string::npos) << c.settings << " -> " << err;
  }
}

// The parallel properties are documented and can only change in NULL / READY (they decide the model's layout).
TEST(ElementParallel, PropertiesAreMutableInReadyOnly) {
  GstElement* la = gst_element_factory_make("liveavatar", nullptr);
  ASSERT_NE(la, nullptr);
  for (const char* name : {"parallel", "devices", "precision", "kv-precision", "rendezvous", "parallel-timeout"}) {
    GParamSpec* spec = g_object_class_find_property(G_OBJECT_GET_CLASS(la), name);
    ASSERT_NE(spec, nullptr) << name;
    EXPECT_TRUE(spec->flags & GST_PARAM_MUTABLE_READY) << name;
    EXPECT_GT(std::string(g_param_spec_get_blurb(spec)).size(), 40u) << name;
  }
  gchar* devices = nullptr;
  guint timeout = 0;
  g_object_get(la, "devices", &devices, "parallel-timeout", &timeout, nullptr);
  EXPECT_STREQ(devices, "cpu");
  EXPECT_EQ(timeout, 30000u);
  g_free(devices);
  gst_object_unref(la);
}

// ---------------------------------------------------------------------------------------------------------------
// Rank 1 in a liveavatar-worker process on loopback.

uint16_t free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  uint16_t port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0)
    port = ntohs(a.sin_port);
  ::close(fd);
  return port;
}

// A liveavatar-worker process, killed (if still running) and reaped when destroyed.
class Worker {
 public:
  Worker(uint16_t port, int rank = 1) {
    const std::vector<std::string> args{LIVEAVATAR_WORKER, "--model-dir", tiny().dir, "--rendezvous",
                                        "127.0.0.1:" + std::to_string(port), "--rank", std::to_string(rank),
                                        "--parallel", "stage", "--devices", "cpu:2", "--parallel-timeout", "6000"};
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    if (::posix_spawn(&pid_, LIVEAVATAR_WORKER, nullptr, nullptr, argv.data(), environ) != 0) pid_ = -1;
  }
  ~Worker() { kill(SIGKILL); }
  bool running() const { return pid_ > 0; }
  void signal(int sig) const {
    if (pid_ > 0) ::kill(pid_, sig);
  }
  void kill(int sig) {
    if (pid_ <= 0) return;
    ::kill(pid_, sig);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Rank 1 in its own process: the element (rank 0) hosts the rendezvous, the worker joins it and runs the second
// layer of every block; the video equals single's. Then the faults, each posted as an element error that names
// rank 1, within a bounded time, and each followed by a clean restart of the same pipeline with a new worker:
// the worker killed (its connection closes: error at once), the worker stopped (SIGSTOP: silent, error after
// parallel-timeout = 6 s, naming the knob). Between the two, a new worker joins the same pipeline's new world.
TEST(ElementParallel, WorkerProcessRunsRankOneAndItsDeathOrSilenceIsNamed) {
  const Output& single = single_video();
  ASSERT_EQ(single.error, "");
  ASSERT_EQ(single.pts.size(), 13u);

  const uint16_t port = free_port();
  ASSERT_NE(port, 0);
  const std::string settings =
      "parallel=stage devices=cpu:2 parallel-timeout=6000 rendezvous=127.0.0.1:" + std::to_string(port);
  GstElement* pipe = make_pipeline(settings);
  ASSERT_NE(pipe, nullptr);

  double healthy_s = 0;  // how long a run takes here with every rank well
  auto expect_video = [&](const char* when) {
    Output r;
    const auto t0 = std::chrono::steady_clock::now();
    run_once(pipe, &r, kSamples);
    healthy_s = std::max(healthy_s, seconds_since(t0));
    std::printf("%s: %zu frames in %.1f s\n", when, r.pts.size(), seconds_since(t0));
    ASSERT_EQ(r.error, "") << when;
    ASSERT_EQ(r.pts.size(), single.pts.size()) << when;
    for (size_t i = 0; i < r.pts.size(); ++i) EXPECT_EQ(r.pts[i], i * kFrame) << when << ", frame " << i;
    EXPECT_LE(max_difference(r, single), 1) << when;
    EXPECT_EQ(plan_string(r.plan, "rendezvous"), "127.0.0.1:" + std::to_string(port)) << when;
  };
  // Bounded: no longer than a healthy run plus the timeout (6 s) plus slack for a loaded machine.
  auto expect_error = [&](const char* when, double within_s, const std::vector<std::string>& says) {
    Output r;
    const auto t0 = std::chrono::steady_clock::now();
    run_once(pipe, &r, kSamples);
    const double took = seconds_since(t0);
    std::printf("%s: error after %.1f s: %s\n", when, took, r.error.c_str());
    EXPECT_LT(took, healthy_s + within_s) << when;
    for (const auto& s : says) EXPECT_NE(r.error.find(s), std::string::npos) << when << ": " << r.error;
    EXPECT_LT(r.pts.size(), single.pts.size()) << when;
  };

  {
    Worker worker(port);
    ASSERT_TRUE(worker.running());
    expect_video("with a worker");
    worker.kill(SIGKILL);
    expect_error("worker killed", 15, {"rank 1", "closed the connection"});
  }
  {
    Worker worker(port);
    expect_video("a new worker after the killed one");
    worker.signal(SIGSTOP);
    expect_error("worker stopped", 6 + 15, {"rank 1 did not answer within 6 s", "parallel-timeout"});
    worker.kill(SIGKILL);
  }
  gst_object_unref(pipe);
}

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
