// The parallel tests' main: GoogleTest, or one child rank when re-executed with --parallel-child=<role>.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "world.h"

namespace {

bool take(const std::string& arg, const char* name, std::string* value) {
  const std::string prefix = std::string(name) + "=";
  if (arg.rfind(prefix, 0) != 0) return false;
  *value = arg.substr(prefix.size());
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  using liveavatar::parallel::test::ChildArgs;
  ChildArgs child;
  bool is_child = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    std::string v;
    if (take(a, "--parallel-child", &v)) {
      child.role = v;
      is_child = true;
    } else if (take(a, "--rank", &v)) {
      child.rank = std::atoi(v.c_str());
    } else if (take(a, "--world", &v)) {
      child.world = std::atoi(v.c_str());
    } else if (take(a, "--port", &v)) {
      child.port = static_cast<uint16_t>(std::atoi(v.c_str()));
    } else if (take(a, "--timeout-ms", &v)) {
      child.timeout = std::chrono::milliseconds(std::atoll(v.c_str()));
    } else if (is_child) {
      child.extra.push_back(a);
    }
  }
  if (is_child) {
    ::alarm(300);  // never outlive a test that lost track of us
    try {
      namespace t = liveavatar::parallel::test;
      return child.role.rfind("plan-", 0) == 0 ? t::child_plan(child) : t::child_comm(child);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "child rank %d (%s): %s\n", child.rank, child.role.c_str(), e.what());
      return 3;
    }
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
