// Helpers for the encoder golden tests: the max-abs-error-vs-scale comparison.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include "../golden.h"

namespace liveavatar::test {

using golden::close;
using golden::kRelTol;

}  // namespace liveavatar::test
