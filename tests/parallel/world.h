// Test helpers: N ranks as threads of this process (TCPStore on loopback, port 0), and ranks as child processes
// (this test binary re-executed with --parallel-child), reaped by the test.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "parallel/communicator.h"

namespace liveavatar::parallel::test {

using namespace std::chrono_literals;

inline ParallelConfig loopback(int world, int rank, std::chrono::milliseconds timeout = 20s,
                               Plan plan = Plan::kStage) {
  return ParallelConfig(plan, std::vector<c10::Device>(static_cast<size_t>(world), c10::Device(c10::kCPU)), rank,
                        Endpoint{"127.0.0.1", 0}, timeout);
}

/// Runs fn(rank, communicator) on `world` threads, one rank each, joined through a fresh store on loopback.
/// Returns each rank's exception (null when it succeeded).
inline std::vector<std::exception_ptr> run_world(int world, const std::function<void(int, Communicator&)>& fn,
                                                 std::chrono::milliseconds timeout = 20s,
                                                 Plan plan = Plan::kStage) {
  auto cfg0 = loopback(world, 0, timeout, plan);
  auto host = Rendezvous::open(cfg0);
  const uint16_t port = host.port();
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto cfg = cfg0.with_port(port).with_rank(r);
        auto rv = r == 0 ? host : Rendezvous::open(cfg);
        auto comm = connect_gloo(cfg, rv);
        fn(r, *comm);
      } catch (...) {
        errors[static_cast<size_t>(r)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

inline std::string what(const std::exception_ptr& e) {
  if (!e) return "";
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  }
  return "unknown exception";
}

/// Fails the test with every rank's error.
inline void expect_all_ok(const std::vector<std::exception_ptr>& errors) {
  for (size_t r = 0; r < errors.size(); ++r) EXPECT_FALSE(errors[r]) << "rank " << r << ": " << what(errors[r]);
}

/// A child process running this binary with --parallel-child=<role>; killed (if still running) and reaped when
/// destroyed, so no test leaves a process behind.
class Child {
 public:
  Child(const std::string& role, int rank, int world, uint16_t port, std::chrono::milliseconds timeout,
        const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args{"/proc/self/exe",
                                  "--parallel-child=" + role,
                                  "--rank=" + std::to_string(rank),
                                  "--world=" + std::to_string(world),
                                  "--port=" + std::to_string(port),
                                  "--timeout-ms=" + std::to_string(timeout.count())};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawn(&pid_, "/proc/self/exe", nullptr, nullptr, argv.data(), environ) != 0) pid_ = -1;
  }
  ~Child() {
    if (pid_ > 0 && !reaped_) {
      ::kill(pid_, SIGKILL);
      wait();
    }
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  void kill() { ::kill(pid_, SIGKILL); }
  /// Waits for the child and returns its exit status (128 + signal when killed).
  int wait() {
    if (reaped_) return status_;
    int st = 0;
    while (::waitpid(pid_, &st, 0) < 0 && errno == EINTR) {
    }
    reaped_ = true;
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return status_;
  }
  /// Waits at most `limit`; kills the child if it is still running then (status 128 + SIGKILL).
  int wait_for(std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      int st = 0;
      const pid_t r = ::waitpid(pid_, &st, WNOHANG);
      if (r == pid_) {
        reaped_ = true;
        status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        return status_;
      }
      std::this_thread::sleep_for(20ms);
    }
    kill();
    return wait();
  }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  int status_ = -1;
};

/// Arguments of a child (parsed from argv by the test main).
struct ChildArgs {
  std::string role;
  int rank = 0, world = 0;
  uint16_t port = 0;
  std::chrono::milliseconds timeout{0};
  std::vector<std::string> extra;
};

/// Joins the world a child was started for.
inline std::unique_ptr<Communicator> join_child(const ChildArgs& a, Rendezvous* keep, Plan plan = Plan::kStage) {
  auto cfg = loopback(a.world, a.rank, a.timeout, plan).with_port(a.port);
  *keep = Rendezvous::open(cfg);
  return connect_gloo(cfg, *keep);
}

/// The roles a child can play, by test file; each returns its exit status (0: success).
int child_comm(const ChildArgs& args);  // echo, silent (test_communicator.cpp)
int child_plan(const ChildArgs& args);  // plan-step, plan-stage (test_plans.cpp)

}  // namespace liveavatar::parallel::test
