/* Portrait + speech -> MP4 (H.264 + AAC) with the liveavatar element, from C.
 *
 *   liveavatar-talk PORTRAIT.png SPEECH.wav OUT.mp4 [SIZE]
 *
 * Prints the progress (position / duration), the element's messages (model loading, warnings, QoS) and, at the
 * end, the frames made and how fast. GST_PLUGIN_PATH must reach libgstliveavatar.so (`meson devenv -C build`).
 */
#include <gst/gst.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  GMainLoop* loop;
  GstElement* pipeline;
  GstElement* avatar;
  guint64 frames; /* buffers out of the avatar's src pad (streaming thread) */
  int status;
} App;

/* A path inside a launch description: quoted, with quotes and backslashes escaped. */
static gchar* quoted(const char* path) {
  GString* s = g_string_new("\"");
  for (const char* p = path; *p; ++p) {
    if (*p == '"' || *p == '\\') g_string_append_c(s, '\\');
    g_string_append_c(s, *p);
  }
  g_string_append_c(s, '"');
  return g_string_free(s, FALSE);
}

static void print_progress(App* app) {
  gint64 pos = 0, dur = 0;
  if (!gst_element_query_position(app->pipeline, GST_FORMAT_TIME, &pos)) return;
  guint64 frames = __atomic_load_n(&app->frames, __ATOMIC_RELAXED);
  if (gst_element_query_duration(app->pipeline, GST_FORMAT_TIME, &dur) && dur > 0)
    printf("progress: %.2f s / %.2f s (%.0f%%), %" G_GUINT64_FORMAT " frames\n", (double)pos / GST_SECOND,
           (double)dur / GST_SECOND, 100.0 * pos / dur, frames);
  else
    printf("progress: %.2f s / ?, %" G_GUINT64_FORMAT " frames\n", (double)pos / GST_SECOND, frames);
  fflush(stdout);
}

static gboolean on_tick(gpointer data) {
  print_progress((App*)data);
  return G_SOURCE_CONTINUE;
}

static GstPadProbeReturn count_frame(GstPad* pad, GstPadProbeInfo* info, gpointer data) {
  (void)pad;
  (void)info;
  App* app = (App*)data;
  __atomic_add_fetch(&app->frames, 1, __ATOMIC_RELAXED);
  return GST_PAD_PROBE_OK;
}

static gboolean on_message(GstBus* bus, GstMessage* msg, gpointer data) {
  (void)bus;
  App* app = (App*)data;
  gboolean from_avatar = GST_MESSAGE_SRC(msg) == GST_OBJECT(app->avatar);
  switch (GST_MESSAGE_TYPE(msg)) {
    case GST_MESSAGE_EOS:
      print_progress(app); /* the final position */
      g_main_loop_quit(app->loop);
      break;
    case GST_MESSAGE_ERROR: {
      g_autoptr(GError) err = NULL;
      g_autofree gchar* dbg = NULL;
      gst_message_parse_error(msg, &err, &dbg);
      fprintf(stderr, "error from %s: %s\n", GST_OBJECT_NAME(GST_MESSAGE_SRC(msg)), err->message);
      if (dbg) fprintf(stderr, "  debug: %s\n", dbg);
      app->status = 1;
      g_main_loop_quit(app->loop);
      break;
    }
    case GST_MESSAGE_WARNING:
      if (from_avatar) {
        g_autoptr(GError) err = NULL;
        gst_message_parse_warning(msg, &err, NULL);
        printf("warning from the avatar: %s\n", err->message);
      }
      break;
    case GST_MESSAGE_PROGRESS:
      if (from_avatar) {
        GstProgressType type;
        g_autofree gchar* code = NULL;
        g_autofree gchar* text = NULL;
        gst_message_parse_progress(msg, &type, &code, &text);
        printf("avatar: %s: %s\n", code, text);
      }
      break;
    case GST_MESSAGE_QOS:
      if (from_avatar) {
        GstFormat format;
        guint64 processed = 0, dropped = 0;
        gst_message_parse_qos_stats(msg, &format, &processed, &dropped);
        printf("avatar QoS: %" G_GUINT64_FORMAT " frames processed, %" G_GUINT64_FORMAT " dropped\n", processed,
               dropped);
      }
      break;
    case GST_MESSAGE_LATENCY:
      gst_bin_recalculate_latency(GST_BIN(app->pipeline));
      break;
    default:
      break;
  }
  return TRUE;
}

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  if (argc < 4 || argc > 5) {
    fprintf(stderr, "usage: %s PORTRAIT.png SPEECH.wav OUT.mp4 [SIZE]\n", argv[0]);
    return 2;
  }
  long size = 0;
  if (argc == 5) {
    char* end = NULL;
    size = strtol(argv[4], &end, 10);
    if (*argv[4] == '\0' || *end != '\0' || size < 64 || size > 4096 || size % 2 != 0) {
      fprintf(stderr, "SIZE must be an even number from 64 to 4096, not %s\n", argv[4]);
      return 2;
    }
  }
  for (int i = 1; i <= 2; ++i) {
    if (!g_file_test(argv[i], G_FILE_TEST_IS_REGULAR)) {
      fprintf(stderr, "cannot read %s\n", argv[i]);
      return 2;
    }
  }
  if (!gst_element_factory_find("liveavatar")) {
    fprintf(stderr, "the liveavatar element is missing: set GST_PLUGIN_PATH to the folder of libgstliveavatar.so\n");
    return 1;
  }

  g_autofree gchar* portrait = quoted(argv[1]);
  g_autofree gchar* speech = quoted(argv[2]);
  g_autofree gchar* out = quoted(argv[3]);
  g_autofree gchar* size_props = size ? g_strdup_printf("width=%ld height=%ld", size, size) : g_strdup("");
  /* The pipeline of pipelines/file-to-mp4.sh. */
  g_autofree gchar* description = g_strdup_printf(
      "filesrc location=%s ! decodebin ! videoconvert ! avatar.image "
      "filesrc location=%s ! decodebin ! audioconvert ! audioresample ! audio/x-raw,rate=16000,channels=1 ! "
      "tee name=t "
      "t. ! queue ! audioconvert ! audio/x-raw,format=F32LE ! avatar.audio "
      "liveavatar name=avatar %s ! videoconvert ! x264enc speed-preset=veryfast tune=zerolatency ! queue ! mux. "
      "t. ! queue ! audioconvert ! avenc_aac ! queue ! mux. "
      "mp4mux name=mux ! filesink location=%s",
      portrait, speech, size_props, out);

  g_autoptr(GError) error = NULL;
  App app = {0};
  app.pipeline = gst_parse_launch(description, &error);
  if (!app.pipeline) {
    fprintf(stderr, "cannot build the pipeline: %s\n", error->message);
    return 1;
  }
  app.avatar = gst_bin_get_by_name(GST_BIN(app.pipeline), "avatar");
  GstPad* src = gst_element_get_static_pad(app.avatar, "src");
  gst_pad_add_probe(src, GST_PAD_PROBE_TYPE_BUFFER, count_frame, &app, NULL);
  gst_object_unref(src);

  app.loop = g_main_loop_new(NULL, FALSE);
  GstBus* bus = gst_element_get_bus(app.pipeline);
  gst_bus_add_watch(bus, on_message, &app);
  guint tick = g_timeout_add(500, on_tick, &app);
  gint64 start = g_get_monotonic_time();
  if (gst_element_set_state(app.pipeline, GST_STATE_PLAYING) == GST_STATE_CHANGE_FAILURE) {
    fprintf(stderr, "the pipeline does not start (GST_DEBUG=3 tells why)\n");
    app.status = 1;
  } else {
    g_main_loop_run(app.loop);
  }
  gst_element_set_state(app.pipeline, GST_STATE_NULL);
  double elapsed = (g_get_monotonic_time() - start) / 1e6;
  double video_s = app.frames / 25.0;
  printf("done: %" G_GUINT64_FORMAT " frames (%.2f s of video) in %.2f s, %.1fx real time -> %s\n", app.frames,
         video_s, elapsed, elapsed > 0 ? video_s / elapsed : 0.0, argv[3]);

  g_source_remove(tick);
  gst_bus_remove_watch(bus);
  gst_object_unref(bus);
  gst_object_unref(app.avatar);
  gst_object_unref(app.pipeline);
  g_main_loop_unref(app.loop);
  return app.status;
}
