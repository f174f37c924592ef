// SPDX-License-Identifier: LGPL-2.1-or-later
#include "media_io.h"

#include <png.h>
#include <sndfile.h>

#include <algorithm>
#include <cstring>

namespace liveavatar::io {

ImageView Image::view() const {
  ImageView v;
  v.data = data.data();
  v.width = width;
  v.height = height;
  v.stride = width * channels;
  v.format = channels == 1 ? PixelFormat::kGray8 : channels == 4 ? PixelFormat::kRGBA8 : PixelFormat::kRGB8;
  return v;
}

Image read_png(const std::string& path) {
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&img, path.c_str()))
    throw Error("cannot read PNG " + path + ": " + img.message);
  img.format = PNG_FORMAT_RGB;
  Image out;
  out.width = static_cast<int>(img.width);
  out.height = static_cast<int>(img.height);
  out.data.resize(PNG_IMAGE_SIZE(img));
  if (!png_image_finish_read(&img, nullptr, out.data.data(), 0, nullptr)) {
    std::string msg = img.message;
    png_image_free(&img);
    throw Error("cannot decode PNG " + path + ": " + msg);
  }
  return out;
}

void write_png(const std::string& path, int width, int height, const uint8_t* rgb) {
  png_image img;
  std::memset(&img, 0, sizeof img);
  img.version = PNG_IMAGE_VERSION;
  img.width = static_cast<png_uint_32>(width);
  img.height = static_cast<png_uint_32>(height);
  img.format = PNG_FORMAT_RGB;
  if (!png_image_write_to_file(&img, path.c_str(), 0, rgb, 0, nullptr))
    throw Error("cannot write PNG " + path + ": " + img.message);
}

std::vector<float> read_audio(const std::string& path, int* sample_rate) {
  SF_INFO info;
  std::memset(&info, 0, sizeof info);
  SNDFILE* f = sf_open(path.c_str(), SFM_READ, &info);
  if (!f) throw Error("cannot read audio " + path + ": " + sf_strerror(nullptr));
  std::vector<float> inter(static_cast<size_t>(info.frames) * info.channels);
  const sf_count_t got = sf_readf_float(f, inter.data(), info.frames);
  sf_close(f);
  std::vector<float> mono(static_cast<size_t>(got));
  for (sf_count_t i = 0; i < got; ++i) {
    float s = 0.f;
    for (int c = 0; c < info.channels; ++c) s += inter[static_cast<size_t>(i) * info.channels + c];
    mono[static_cast<size_t>(i)] = s / info.channels;
  }
  if (sample_rate) *sample_rate = info.samplerate;
  return mono;
}

void write_contact_sheet(const std::string& path, const std::vector<std::vector<uint8_t>>& frames, int width,
                         int height, int columns, int tile_width) {
  if (frames.empty()) throw Error("contact sheet: no frames");
  const int tw = tile_width, th = static_cast<int>(static_cast<int64_t>(height) * tile_width / width);
  const int rows = static_cast<int>((frames.size() + columns - 1) / columns);
  const int gap = 4;
  const int sw = columns * tw + (columns + 1) * gap, sh = rows * th + (rows + 1) * gap;
  std::vector<uint8_t> sheet(static_cast<size_t>(sw) * sh * 3, 255);
  for (size_t i = 0; i < frames.size(); ++i) {
    const int ox = gap + static_cast<int>(i % columns) * (tw + gap);
    const int oy = gap + static_cast<int>(i / columns) * (th + gap);
    for (int y = 0; y < th; ++y) {
      // Box filter over the source pixels that map to this tile pixel.
      const int y0 = y * height / th, y1 = std::max(y0 + 1, (y + 1) * height / th);
      for (int x = 0; x < tw; ++x) {
        const int x0 = x * width / tw, x1 = std::max(x0 + 1, (x + 1) * width / tw);
        int acc[3] = {0, 0, 0}, n = 0;
        for (int sy = y0; sy < y1; ++sy)
          for (int sx = x0; sx < x1; ++sx, ++n)
            for (int k = 0; k < 3; ++k) acc[k] += frames[i][(static_cast<size_t>(sy) * width + sx) * 3 + k];
        uint8_t* d = &sheet[(static_cast<size_t>(oy + y) * sw + ox + x) * 3];
        for (int k = 0; k < 3; ++k) d[k] = static_cast<uint8_t>(acc[k] / n);
      }
    }
  }
  write_png(path, sw, sh, sheet.data());
}

}  // namespace liveavatar::io
