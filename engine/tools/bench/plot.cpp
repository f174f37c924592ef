// A small PNG line chart. SPDX-License-Identifier: LGPL-2.1-or-later
#include "plot.h"

#include <png.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>

#include "liveavatar/engine.h"

namespace liveavatar::bench {
namespace {

// 5x7 glyphs: seven rows of five bits, the most significant bit the left column. Unknown characters draw as blanks.
const std::map<char, std::array<uint8_t, 7>>& font() {
  static const std::map<char, std::array<uint8_t, 7>> glyphs = {
    {' ', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}},
    {'%', {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03}},
    {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}},
    {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}},
    {',', {0x00, 0x00, 0x00, 0x00, 0x0c, 0x04, 0x08}},
    {'-', {0x00, 0x00, 0x00, 0x1f, 0x00, 0x00, 0x00}},
    {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0c, 0x0c}},
    {'/', {0x01, 0x02, 0x02, 0x04, 0x08, 0x08, 0x10}},
    {'0', {0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e}},
    {'1', {0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e}},
    {'2', {0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f}},
    {'3', {0x1e, 0x01, 0x01, 0x0e, 0x01, 0x01, 0x1e}},
    {'4', {0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02}},
    {'5', {0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e}},
    {'6', {0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e}},
    {'7', {0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e}},
    {'9', {0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c}},
    {':', {0x00, 0x0c, 0x0c, 0x00, 0x0c, 0x0c, 0x00}},
    {'=', {0x00, 0x00, 0x1f, 0x00, 0x1f, 0x00, 0x00}},
    {'B', {0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e}},
    {'C', {0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e}},
    {'D', {0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c}},
    {'F', {0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10}},
    {'G', {0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f}},
    {'L', {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f}},
    {'M', {0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11}},
    {'O', {0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e}},
    {'P', {0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10}},
    {'S', {0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e}},
    {'T', {0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
    {'U', {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e}},
    {'a', {0x00, 0x00, 0x0e, 0x01, 0x0f, 0x11, 0x0f}},
    {'b', {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1e}},
    {'c', {0x00, 0x00, 0x0e, 0x10, 0x10, 0x11, 0x0e}},
    {'d', {0x01, 0x01, 0x0d, 0x13, 0x11, 0x11, 0x0f}},
    {'e', {0x00, 0x00, 0x0e, 0x11, 0x1f, 0x10, 0x0e}},
    {'f', {0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08}},
    {'g', {0x00, 0x0f, 0x11, 0x11, 0x0f, 0x01, 0x0e}},
    {'h', {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11}},
    {'i', {0x04, 0x00, 0x0c, 0x04, 0x04, 0x04, 0x0e}},
    {'j', {0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0c}},
    {'k', {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12}},
    {'l', {0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e}},
    {'m', {0x00, 0x00, 0x1a, 0x15, 0x15, 0x11, 0x11}},
    {'n', {0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11}},
    {'o', {0x00, 0x00, 0x0e, 0x11, 0x11, 0x11, 0x0e}},
    {'p', {0x00, 0x00, 0x1e, 0x11, 0x1e, 0x10, 0x10}},
    {'q', {0x00, 0x00, 0x0d, 0x13, 0x0f, 0x01, 0x01}},
    {'r', {0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10}},
    {'s', {0x00, 0x00, 0x0e, 0x10, 0x0e, 0x01, 0x1e}},
    {'t', {0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06}},
    {'u', {0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0d}},
    {'v', {0x00, 0x00, 0x11, 0x11, 0x11, 0x0a, 0x04}},
    {'w', {0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0a}},
    {'x', {0x00, 0x00, 0x11, 0x0a, 0x04, 0x0a, 0x11}},
    {'y', {0x00, 0x00, 0x11, 0x11, 0x0f, 0x01, 0x0e}},
    {'z', {0x00, 0x00, 0x1f, 0x02, 0x04, 0x08, 0x1f}},
  };
  return glyphs;
}

struct Rgb {
  uint8_t r, g, b;
};
constexpr Rgb kPalette[] = {{31, 119, 180}, {214, 39, 40}, {44, 160, 44}, {255, 127, 14}, {148, 103, 189}, {140, 86, 75}};

class Canvas {
 public:
  Canvas(int w, int h) : w_(w), h_(h), px_(static_cast<size_t>(w) * h * 3, 255) {}
  void set(int x, int y, Rgb c) {
    if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
    auto* p = &px_[(static_cast<size_t>(y) * w_ + x) * 3];
    p[0] = c.r;
    p[1] = c.g;
    p[2] = c.b;
  }
  void line(double x0, double y0, double x1, double y1, Rgb c, int width = 1) {
    const int steps = static_cast<int>(std::max(std::abs(x1 - x0), std::abs(y1 - y0))) + 1;
    for (int i = 0; i <= steps; ++i) {
      const double t = static_cast<double>(i) / steps;
      const int x = static_cast<int>(std::lround(x0 + (x1 - x0) * t)), y = static_cast<int>(std::lround(y0 + (y1 - y0) * t));
      for (int dx = 0; dx < width; ++dx)
        for (int dy = 0; dy < width; ++dy) set(x + dx - width / 2, y + dy - width / 2, c);
    }
  }
  // Text with its top-left corner at (x, y), 6 px per character, scale 1 or 2.
  void text(int x, int y, const std::string& s, Rgb c, int scale = 1) {
    for (char ch : s) {
      const auto it = font().find(ch);
      if (it != font().end())
        for (int row = 0; row < 7; ++row)
          for (int col = 0; col < 5; ++col)
            if (it->second[static_cast<size_t>(row)] & (0x10 >> col))
              for (int a = 0; a < scale; ++a)
                for (int b = 0; b < scale; ++b) set(x + col * scale + a, y + row * scale + b, c);
      x += 6 * scale;
    }
  }
  void save(const std::string& path) const {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) throw Error("cannot write " + path);
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
    png_infop info = png ? png_create_info_struct(png) : nullptr;
    if (!png || !info || setjmp(png_jmpbuf(png))) {
      png_destroy_write_struct(&png, &info);
      std::fclose(f);
      throw Error("cannot encode " + path);
    }
    png_init_io(png, f);
    png_set_IHDR(png, info, static_cast<png_uint_32>(w_), static_cast<png_uint_32>(h_), 8, PNG_COLOR_TYPE_RGB,
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int y = 0; y < h_; ++y)
      png_write_row(png, const_cast<png_bytep>(&px_[static_cast<size_t>(y) * w_ * 3]));
    png_write_end(png, nullptr);
    png_destroy_write_struct(&png, &info);
    if (std::fclose(f) != 0) throw Error("cannot write " + path);
  }

 private:
  int w_, h_;
  std::vector<uint8_t> px_;
};

std::string number(double v) {
  char buf[32];
  if (v == 0) return "0";
  if (std::abs(v) >= 100) std::snprintf(buf, sizeof buf, "%.0f", v);
  else if (std::abs(v) >= 10) std::snprintf(buf, sizeof buf, "%.1f", v);
  else std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

}  // namespace

void write_chart_png(const std::string& path, const std::vector<Chart>& charts, const std::string& x_label) {
  const int width = 900, panel = 300, left = 70, right = 20, top = 34, bottom = 40;
  Canvas c(width, panel * static_cast<int>(charts.size()));
  const Rgb ink{40, 40, 40}, grid{225, 225, 225};
  for (size_t k = 0; k < charts.size(); ++k) {
    const auto& chart = charts[k];
    const int y0 = static_cast<int>(k) * panel;
    const int plot_w = width - left - right, plot_h = panel - top - bottom;
    size_t n = 1;
    double ymax = 0;
    for (const auto& s : chart.series) {
      n = std::max(n, s.values.size());
      for (double v : s.values)
        if (std::isfinite(v)) ymax = std::max(ymax, v);
    }
    ymax = ymax > 0 ? ymax * 1.1 : 1.0;
    auto px = [&](double i) { return left + (n > 1 ? i / static_cast<double>(n - 1) : 0.5) * plot_w; };
    auto py = [&](double v) { return y0 + top + plot_h - v / ymax * plot_h; };
    c.text(left, y0 + 8, chart.title, ink, 2);
    for (int t = 0; t <= 4; ++t) {
      const double v = ymax * t / 4.0;
      c.line(left, py(v), left + plot_w, py(v), grid);
      const auto label = number(v);
      c.text(left - 6 - 6 * static_cast<int>(label.size()), static_cast<int>(py(v)) - 3, label, ink);
    }
    c.line(left, y0 + top, left, y0 + top + plot_h, ink);
    c.line(left, y0 + top + plot_h, left + plot_w, y0 + top + plot_h, ink);
    const size_t every = std::max<size_t>(1, n / 10);
    for (size_t i = 0; i < n; i += every) {
      c.line(px(static_cast<double>(i)), y0 + top + plot_h, px(static_cast<double>(i)), y0 + top + plot_h + 4, ink);
      const auto label = std::to_string(i);
      c.text(static_cast<int>(px(static_cast<double>(i))) - 3 * static_cast<int>(label.size()), y0 + top + plot_h + 8,
             label, ink);
    }
    c.text(left + plot_w / 2 - 3 * static_cast<int>(x_label.size()), y0 + top + plot_h + 22, x_label, ink);
    for (size_t s = 0; s < chart.series.size(); ++s) {
      const auto& series = chart.series[s];
      const Rgb colour = kPalette[s % (sizeof kPalette / sizeof kPalette[0])];
      for (size_t i = 1; i < series.values.size(); ++i)
        c.line(px(static_cast<double>(i - 1)), py(series.values[i - 1]), px(static_cast<double>(i)), py(series.values[i]),
               colour, 2);
      if (series.values.size() == 1) c.line(px(0) - 2, py(series.values[0]), px(0) + 2, py(series.values[0]), colour, 3);
      // Legend, top right.
      const int lx = left + plot_w - 150, ly = y0 + 10 + static_cast<int>(s) * 12;
      c.line(lx, ly + 3, lx + 20, ly + 3, colour, 2);
      c.text(lx + 26, ly, series.name, ink);
    }
  }
  c.save(path);
}

}  // namespace liveavatar::bench
