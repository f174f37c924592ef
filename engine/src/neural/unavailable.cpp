// Built instead of the neural backend when LibTorch was not found at configure time.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "liveavatar/engine.h"

namespace liveavatar {
bool register_neural_backend() { return false; }
}  // namespace liveavatar
