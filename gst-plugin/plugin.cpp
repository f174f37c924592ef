// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gst/gst.h>

#include "gstliveavatar.h"

#ifndef PACKAGE
#define PACKAGE "gst-liveavatar"
#endif

static gboolean plugin_init(GstPlugin* plugin) { return GST_ELEMENT_REGISTER(liveavatar, plugin); }

GST_PLUGIN_DEFINE(GST_VERSION_MAJOR, GST_VERSION_MINOR, liveavatar,
                  "Talking-head video from a portrait and speech", plugin_init, PLUGIN_VERSION, "LGPL",
                  "gst-liveavatar", "gst-liveavatar")
