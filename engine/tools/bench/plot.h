// A small PNG line chart (libpng, a built-in 5x7 font): panels stacked vertically, one line per series, y from 0.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <string>
#include <vector>

namespace liveavatar::bench {

struct Series {
  std::string name;
  std::vector<double> values;  // y at x = 0, 1, 2, ...
};
struct Chart {
  std::string title;
  std::vector<Series> series;
};
/// Writes the charts one above the other (900 px wide, 300 px each) with `x_label` under the x axis. Throws
/// liveavatar::Error when the file cannot be written.
void write_chart_png(const std::string& path, const std::vector<Chart>& charts, const std::string& x_label);

}  // namespace liveavatar::bench
