// Tiny argument helpers shared by the engine tools: bounds-checked numbers, WxH and x,y,w,h parsing.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <cstdlib>
#include <string>

#include "liveavatar/engine.h"

namespace liveavatar::cli {

inline long parse_long(const std::string& flag, const std::string& text, long lo, long hi) {
  char* end = nullptr;
  const long v = std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end || v < lo || v > hi)
    throw Error(flag + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" +
                text + "'");
  return v;
}

inline Size parse_size(const std::string& flag, const std::string& text) {
  const auto x = text.find('x');
  if (x == std::string::npos) throw Error(flag + " expects WIDTHxHEIGHT, got '" + text + "'");
  return {static_cast<int>(parse_long(flag, text.substr(0, x), 0, 8192)),
          static_cast<int>(parse_long(flag, text.substr(x + 1), 0, 8192))};
}

inline Rect parse_rect(const std::string& flag, const std::string& text) {
  Rect r;
  int* fields[] = {&r.x, &r.y, &r.width, &r.height};
  size_t pos = 0;
  for (int i = 0; i < 4; ++i) {
    const size_t comma = i < 3 ? text.find(',', pos) : text.size();
    if (comma == std::string::npos) throw Error(flag + " expects x,y,width,height, got '" + text + "'");
    *fields[i] = static_cast<int>(parse_long(flag, text.substr(pos, comma - pos), 0, 65535));
    pos = comma + 1;
  }
  return r;
}

}  // namespace liveavatar::cli
