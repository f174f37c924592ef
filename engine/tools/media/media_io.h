// PNG and WAV helpers for the engine's tools and tests (libpng, libsndfile). Not part of the engine API.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "liveavatar/engine.h"

namespace liveavatar::io {

struct Image {
  int width = 0, height = 0, channels = 3;  // 1 gray, 3 RGB, 4 RGBA
  std::vector<uint8_t> data;
  ImageView view() const;
};

/// Reads any PNG as RGB8. Throws liveavatar::Error naming the file on failure.
Image read_png(const std::string& path);
void write_png(const std::string& path, int width, int height, const uint8_t* rgb);

/// Reads a WAV (or any libsndfile format) as mono float; *sample_rate receives its rate.
std::vector<float> read_audio(const std::string& path, int* sample_rate);

/// Tiles frames (packed RGB8, all of one size) into a grid scaled to tile_width; writes a PNG.
void write_contact_sheet(const std::string& path, const std::vector<std::vector<uint8_t>>& frames, int width,
                         int height, int columns, int tile_width);

}  // namespace liveavatar::io
