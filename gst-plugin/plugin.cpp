// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gst/gst.h>

#include "gstliveavatar.h"
#include "liveavatar/engine.h"

#ifndef PACKAGE
#define PACKAGE "gst-liveavatar"
#endif

static gboolean plugin_init(GstPlugin* plugin) {
  // The neural backend is there when the engine was built with LibTorch; backend=liveavatar says so otherwise.
  liveavatar::register_neural_backend();
  return GST_ELEMENT_REGISTER(liveavatar, plugin);
}

GST_PLUGIN_DEFINE(GST_VERSION_MAJOR, GST_VERSION_MINOR, liveavatar,
                  "Talking-head video from a portrait and speech", plugin_init, PLUGIN_VERSION, "LGPL",
                  "gst-liveavatar", "gst-liveavatar")
