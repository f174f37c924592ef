// Inputs shared by the element tests that drive the neural backend: the example portrait as one still RGB buffer and
// a deterministic voiced signal (a 180 Hz tone with a 3 Hz envelope, continuous across buffers by its timestamp).
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <gst/gst.h>

#include <cmath>
#include <string>

#include "media_io.h"

namespace testutil {

// examples/assets/portrait.png as RGB bytes at timestamp 0 (caps: the PNG's size, format RGB, framerate 0/1).
inline GstBuffer* portrait_buffer() {
  static const auto img = liveavatar::io::read_png(std::string(LIVEAVATAR_ASSETS_DIR) + "/portrait.png");
  GstBuffer* b = gst_buffer_new_memdup(img.data.data(), img.data.size());
  GST_BUFFER_PTS(b) = 0;
  return b;
}

// `n` mono F32 samples at 16 kHz starting at `pts`; the signal is a function of absolute time, so consecutive
// buffers join without a seam.
inline GstBuffer* speech(GstClockTime pts, size_t n) {
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

}  // namespace testutil
