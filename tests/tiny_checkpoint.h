// A make-tiny checkpoint in a temporary folder, made once per test binary and removed at exit; the prompt cache of
// the test goes inside it (XDG_CACHE_HOME), so tests never touch the user's cache.
#pragma once

#include <stdlib.h>

#include <cstdlib>
#include <string>

#include "checkpoint_tool.h"
#include "layout.h"

namespace testutil {

struct TinyCheckpoint {
  std::string dir;
  TinyCheckpoint() {
    char tmpl[] = "/tmp/liveavatar-tiny-XXXXXX";
    dir = mkdtemp(tmpl);
    liveavatar::weights::make_tiny_checkpoint(dir, liveavatar::weights::ModelConfig::tiny(), /*seed=*/0);
    setenv("XDG_CACHE_HOME", (dir + "/cache").c_str(), 1);
  }
  ~TinyCheckpoint() { (void)std::system(("rm -rf '" + dir + "'").c_str()); }
};

inline const TinyCheckpoint& tiny() {
  static TinyCheckpoint t;
  return t;
}

}  // namespace testutil
