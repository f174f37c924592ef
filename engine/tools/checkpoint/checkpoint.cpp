// liveavatar-checkpoint: inspect a LiveAvatar / Wan2.2-S2V checkpoint set, or write the tiny one.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include "checkpoint_tool.h"

namespace {

int usage() {
  std::fprintf(stderr,
               "usage: liveavatar-checkpoint inspect DIR\n"
               "       liveavatar-checkpoint make-tiny DIR [--seed N] [--shards N]\n"
               "inspect   read every component under DIR, validate it against the configuration, print a report\n"
               "          (exit 0 when the set is complete and valid, 1 otherwise)\n"
               "make-tiny write the complete set in the official layout with seeded random weights at the tiny\n"
               "          configuration (the fixture of the tests and benchmarks)\n");
  return 2;
}

bool parse_u64(const char* s, uint64_t* out) {
  char* end = nullptr;
  errno = 0;
  unsigned long long v = std::strtoull(s, &end, 10);
  if (errno != 0 || end == s || *end != '\0' || s[0] == '-') return false;
  *out = v;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace liveavatar::weights;
  if (argc < 3) return usage();
  const std::string cmd = argv[1], dir = argv[2];
  try {
    if (cmd == "inspect") {
      if (argc != 3) return usage();
      InspectResult r = inspect_checkpoint(dir);
      std::fputs(r.to_string().c_str(), stdout);
      return r.ok() ? 0 : 1;
    }
    if (cmd == "make-tiny") {
      uint64_t seed = 0, shards = 2;
      for (int i = 3; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--seed") && i + 1 < argc) {
          if (!parse_u64(argv[++i], &seed)) return usage();
        } else if (!std::strcmp(argv[i], "--shards") && i + 1 < argc) {
          if (!parse_u64(argv[++i], &shards) || shards < 1 || shards > 99) return usage();
        } else {
          return usage();
        }
      }
      make_tiny_checkpoint(dir, ModelConfig::tiny(), seed, static_cast<int>(shards));
      std::printf("wrote the tiny checkpoint set (seed %llu) to %s\n", static_cast<unsigned long long>(seed), dir.c_str());
      return 0;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "liveavatar-checkpoint: %s\n", e.what());
    return 1;
  }
  return usage();
}
