// ParallelConfig validators and the Gloo communicator: contents through send / recv / broadcast / barrier with ranks
// as threads and as processes; silent, missing and killed peers give a named error within a bounded time.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <chrono>
#include <string>
#include <thread>

#include "parallel/communicator.h"
#include "parallel/config.h"
#include "parallel/driver.h"
#include "parallel/nccl_communicator.h"
#include "world.h"

namespace liveavatar::parallel::test {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The content rank `from` sends to rank `to`: distinct per pair and dtype, so a misrouted tensor fails.
at::Tensor payload(int from, int to, at::ScalarType dtype, int64_t n = 1000) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(100 * from + to + 7));
  return at::randn({n / 10, 10}, gen).to(dtype);
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const ParallelError& e) {
    return e.what();
  }
  return "";
}

// Shows the message a user would read (the tests below assert its parts).
void show(const std::string& error) { std::printf("[error] %s\n", error.c_str()); }

#define EXPECT_HAS(text, needle) EXPECT_NE(std::string(text).find(needle), std::string::npos) << (text)

// ----------------------------------------------------------------------------------------------------------------
// ParallelConfig
// ----------------------------------------------------------------------------------------------------------------

TEST(Config, ParsesDevicesPlansEndpointsAndTimeouts) {
  EXPECT_EQ(parse_devices("cpu:4").size(), 4u);
  EXPECT_TRUE(parse_devices("cpu:4")[3].is_cpu());
  const auto g = parse_devices("cuda:0, cuda:1,cuda:3");
  ASSERT_EQ(g.size(), 3u);
  EXPECT_EQ(g[2], c10::Device(c10::kCUDA, 3));
  EXPECT_EQ(parse_devices("cpu").size(), 1u);
  EXPECT_EQ(parse_plan("stage"), Plan::kStage);
  EXPECT_EQ(parse_plan("step"), Plan::kStep);
  EXPECT_EQ(parse_plan("auto"), Plan::kAuto);
  EXPECT_EQ(parse_plan("single"), Plan::kSingle);
  const auto ep = parse_endpoint("10.0.0.5:29501");
  EXPECT_EQ(ep.host, "10.0.0.5");
  EXPECT_EQ(ep.port, 29501);
  EXPECT_EQ(parse_endpoint("[::1]:0").host, "::1");
  EXPECT_EQ(parse_timeout("30"), 30s);
  EXPECT_EQ(parse_timeout("45s"), 45s);
  EXPECT_EQ(parse_timeout("500ms"), 500ms);
  EXPECT_EQ(parse_timeout("2m"), 120s);
  EXPECT_EQ(format_duration(1500ms), "1.5 s");
  EXPECT_EQ(format_duration(30s), "30 s");
  EXPECT_EQ(format_duration(250ms), "250 ms");
}

TEST(Config, ParseErrorsSayWhatToWrite) {
  EXPECT_HAS(error_of([] { parse_devices("gpu0"); }), "write e.g. \"cpu:4\"");
  EXPECT_HAS(error_of([] { parse_devices("cpu:0"); }), "1..4096");
  EXPECT_HAS(error_of([] { parse_devices("cuda:x"); }), "needs a GPU index");
  EXPECT_HAS(error_of([] { parse_devices(""); }), "empty");
  EXPECT_HAS(error_of([] { parse_plan("pipeline"); }), "write single, step, stage or auto");
  EXPECT_HAS(error_of([] { parse_endpoint("localhost"); }), "write host:port");
  EXPECT_HAS(error_of([] { parse_endpoint("h:70000"); }), "0..65535");
  EXPECT_HAS(error_of([] { parse_endpoint("::1:5"); }), "brackets");
  EXPECT_HAS(error_of([] { parse_timeout("soon"); }), "e.g. 30, 30s");
  EXPECT_HAS(error_of([] { parse_timeout("0"); }), "positive");
  EXPECT_HAS(error_of([] { parse_timeout("3h"); }), "unknown unit");
}

TEST(Config, ValidatesRanksPlansAndDevices) {
  const auto c = ParallelConfig::parse("stage", "cpu:4", 2, "127.0.0.1:0", "5s");
  EXPECT_EQ(c.world_size(), 4);
  EXPECT_EQ(c.rank(), 2);
  EXPECT_FALSE(c.is_first());
  EXPECT_FALSE(c.is_last());
  EXPECT_TRUE(c.with_rank(3).is_last());
  EXPECT_EQ(c.with_port(1234).rendezvous().port, 1234);
  EXPECT_EQ(c.timeout(), 5s);
  EXPECT_EQ(c.describe(), "stage rank 2/4 on cpu,cpu,cpu,cpu, rendezvous 127.0.0.1:0, timeout 5 s");
  EXPECT_HAS(error_of([&] { c.with_rank(4); }), "rank 4 is outside 0..3");
  EXPECT_HAS(error_of([] { ParallelConfig::parse("single", "cpu:2", 0); }), "choose parallel=step or parallel=stage");
  EXPECT_HAS(error_of([] { ParallelConfig::parse("step", "cuda:0,cuda:0", 0); }), "each rank needs its own GPU");
  EXPECT_HAS(error_of([] { ParallelConfig::parse("stage", "cpu:2", -1); }), "outside 0..1");
  EXPECT_EQ(ParallelConfig().world_size(), 1);
  EXPECT_EQ(ParallelConfig().plan(), Plan::kSingle);
}

// The plans' channels: NCCL for a world of GPUs (when the build has it), Gloo as soon as a rank is on the CPU.
TEST(Config, GpuWorldsTalkNcclCpuWorldsGloo) {
  EXPECT_FALSE(uses_nccl(ParallelConfig::parse("stage", "cpu:2", 0)));
  EXPECT_FALSE(uses_nccl(ParallelConfig::parse("stage", "cuda:0,cpu", 0)));
  EXPECT_EQ(uses_nccl(ParallelConfig::parse("stage", "cuda:0,cuda:1", 0)), nccl_built());
  EXPECT_EQ(uses_nccl(ParallelConfig::parse("step", "cuda:0,cuda:1,cuda:2,cuda:3", 3)), nccl_built());
}

TEST(Config, StageLayersCoverTheModelOnce) {
  for (int n : {1, 2, 3, 4, 5, 40}) {
    int64_t next = 0;
    for (int k = 0; k < n; ++k) {
      const auto [a, b] = stage_layers(40, k, n);
      EXPECT_EQ(a, next);
      EXPECT_GT(b, a);
      next = b;
    }
    EXPECT_EQ(next, 40);
  }
  EXPECT_EQ(stage_layers(40, 1, 4), std::make_pair(int64_t{10}, int64_t{20}));
  EXPECT_HAS(error_of([] { stage_layers(4, 0, 5); }), "use 1..4 ranks");
  EXPECT_HAS(error_of([] { stage_layers(4, 4, 4); }), "outside 0..3");
}

// ----------------------------------------------------------------------------------------------------------------
// Ranks as threads
// ----------------------------------------------------------------------------------------------------------------

class ThreadWorld : public ::testing::TestWithParam<int> {};

TEST_P(ThreadWorld, SendRecvAroundTheRingInFp32AndBf16) {
  const int world = GetParam();
  std::atomic<int> checked{0};
  const auto errors = run_world(world, [&](int r, Communicator& comm) {
    EXPECT_EQ(comm.rank(), r);
    EXPECT_EQ(comm.world_size(), world);
    EXPECT_EQ(comm.backend(), "gloo");
    const int next = (r + 1) % world, prev = (r + world - 1) % world;
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      // Even ranks send first, odd ones receive first: no two neighbours wait on each other.
      auto into = at::zeros({100, 10}, dtype);
      if (r % 2 == 0) {
        comm.send(payload(r, next, dtype), next);
        comm.recv(into, prev);
      } else {
        comm.recv(into, prev);
        comm.send(payload(r, next, dtype), next);
      }
      EXPECT_TRUE(at::equal(into, payload(prev, r, dtype))) << "rank " << r << " from " << prev << " " << dtype;
      EXPECT_FALSE(at::equal(into, payload(r, next, dtype)));  // the check can fail
      ++checked;
    }
  });
  expect_all_ok(errors);
  EXPECT_EQ(checked.load(), 2 * world);
}

TEST_P(ThreadWorld, BroadcastFromEveryRootInFp32AndBf16) {
  const int world = GetParam();
  const auto errors = run_world(world, [&](int r, Communicator& comm) {
    for (int root = 0; root < world; ++root) {
      for (auto dtype : {at::kFloat, at::kBFloat16}) {
        auto t = r == root ? payload(root, 99, dtype) : at::full({100, 10}, -1.0, dtype);
        comm.broadcast(t, root);
        EXPECT_TRUE(at::equal(t, payload(root, 99, dtype))) << "rank " << r << " root " << root << " " << dtype;
      }
    }
  });
  expect_all_ok(errors);
}

TEST_P(ThreadWorld, BarrierWaitsForTheLastRank) {
  const int world = GetParam();
  std::vector<double> waited(static_cast<size_t>(world));
  const auto errors = run_world(world, [&](int r, Communicator& comm) {
    comm.barrier();  // everyone connected
    const auto t0 = Clock::now();
    if (r == world - 1) std::this_thread::sleep_for(400ms);
    comm.barrier();
    waited[static_cast<size_t>(r)] = seconds_since(t0);
  });
  expect_all_ok(errors);
  for (int r = 0; r < world; ++r) EXPECT_GE(waited[static_cast<size_t>(r)], 0.35) << "rank " << r;
}

INSTANTIATE_TEST_SUITE_P(Ranks, ThreadWorld, ::testing::Values(2, 4));

TEST(ThreadWorldErrors, ASilentPeerTimesOutNamingItThenANewWorldWorks) {
  std::string error;
  double took = 0;
  bool next_call_refused = false;
  const auto errors = run_world(
      2,
      [&](int r, Communicator& comm) {
        comm.barrier();
        if (r == 1) {
          std::this_thread::sleep_for(2500ms);  // silent: never sends
          return;
        }
        auto into = at::zeros({10}, at::kFloat);
        const auto t0 = Clock::now();
        error = error_of([&] { comm.recv(into, 1, 1000ms); });
        took = seconds_since(t0);
        EXPECT_FALSE(comm.broken().empty());
        next_call_refused = error_of([&] { comm.send(into, 1); }).find("unusable") != std::string::npos;
      },
      5s);
  expect_all_ok(errors);
  show(error);
  EXPECT_HAS(error, "recv from rank 1 on rank 0: rank 1 did not answer within 1 s");
  EXPECT_HAS(error, "raise parallel-timeout");
  EXPECT_GE(took, 0.9);
  EXPECT_LT(took, 3.0);
  EXPECT_TRUE(next_call_refused);

  // The same process builds a new world and uses it.
  const auto again = run_world(2, [&](int r, Communicator& comm) {
    auto t = r == 0 ? payload(0, 1, at::kFloat) : at::zeros({100, 10});
    if (r == 0) comm.send(t, 1);
    else comm.recv(t, 0);
    EXPECT_TRUE(at::equal(t, payload(0, 1, at::kFloat)));
  });
  expect_all_ok(again);
}

TEST(ThreadWorldErrors, ARankMissingFromABarrierIsNamed) {
  std::vector<std::string> messages(3);
  std::vector<double> took(3);
  const auto errors = run_world(
      3,
      [&](int r, Communicator& comm) {
        comm.barrier();
        if (r == 2) {
          std::this_thread::sleep_for(2500ms);
          return;
        }
        const auto t0 = Clock::now();
        messages[static_cast<size_t>(r)] = error_of([&] { comm.barrier(1000ms); });
        took[static_cast<size_t>(r)] = seconds_since(t0);
      },
      5s);
  expect_all_ok(errors);
  show(messages[0]);
  for (int r : {0, 1}) {
    EXPECT_HAS(messages[static_cast<size_t>(r)], "barrier #2 on rank " + std::to_string(r));
    EXPECT_HAS(messages[static_cast<size_t>(r)], "rank 2 has not reached it");
    EXPECT_HAS(messages[static_cast<size_t>(r)], "parallel-timeout");
    EXPECT_LT(took[static_cast<size_t>(r)], 3.0);
  }
}

TEST(ThreadWorldErrors, ARankThatNeverJoinsIsNamed) {
  // World of 3, rank 2 never comes.
  auto cfg0 = loopback(3, 0, 1000ms);
  auto host = Rendezvous::open(cfg0);
  std::string m0, m1;
  double took = 0;
  std::thread t1([&] {
    auto cfg = cfg0.with_port(host.port()).with_rank(1);
    m1 = error_of([&] { connect_gloo(cfg, Rendezvous::open(cfg)); });
  });
  const auto t0 = Clock::now();
  m0 = error_of([&] { connect_gloo(cfg0, host); });
  took = seconds_since(t0);
  t1.join();
  show(m0);
  EXPECT_HAS(m0, "rank 2 did not join group \"liveavatar\"");
  EXPECT_HAS(m0, "raise parallel-timeout");
  EXPECT_HAS(m1, "rank 2 did not join");
  EXPECT_LT(took, 5.0);
}

TEST(ThreadWorldErrors, RendezvousErrorsSayWhatToDo) {
  // Nobody hosts the port.
  auto cfg = loopback(2, 1, 1000ms).with_port(1);
  const auto t0 = Clock::now();
  const auto unreachable = error_of([&] { Rendezvous::open(cfg); });
  show(unreachable);
  EXPECT_HAS(unreachable, "start rank 0 first");
  EXPECT_LT(seconds_since(t0), 5.0);
  EXPECT_HAS(error_of([&] { Rendezvous::open(loopback(2, 1)); }), "needs the port rank 0 listens on");
}

TEST(ThreadWorldErrors, ASizeOrDtypeMismatchIsANamedErrorNotACrash) {
  // Gloo itself terminates the process when a message does not fit the posted buffer; the envelope turns that
  // into an error on the receiving rank. The sender may finish or time out; neither crashes.
  struct Case {
    at::Tensor sent, into;
    const char* needle;
  };
  const std::vector<Case> cases{
      {at::ones({100}), at::zeros({50}), "rank 0 sent 400 bytes (100 x Float) but this rank expects 200 bytes (50 x Float)"},
      {at::ones({100}, at::kBFloat16), at::zeros({100}, at::kHalf), "(100 x BFloat16) but this rank expects 200 bytes (100 x Half)"},
  };
  for (const auto& c : cases) {
    std::string error;
    const auto errors = run_world(
        2,
        [&](int r, Communicator& comm) {
          if (r == 0) {
            error_of([&] { comm.send(c.sent, 1, 1000ms); });
            return;
          }
          auto into = c.into.clone();
          error = error_of([&] { comm.recv(into, 0); });
          EXPECT_FALSE(comm.broken().empty());
        },
        5s);
    expect_all_ok(errors);
    show(error);
    EXPECT_HAS(error, "recv from rank 0 on rank 1: ");
    EXPECT_HAS(error, c.needle);
    EXPECT_HAS(error, "restart every rank");
  }
  // The same for a broadcast whose buffers differ.
  std::string error;
  const auto errors = run_world(
      2,
      [&](int r, Communicator& comm) {
        auto t = r == 0 ? at::ones({100}) : at::zeros({50});
        const auto e = error_of([&] { comm.broadcast(t, 0, 1000ms); });
        if (r == 1) error = e;
      },
      5s);
  expect_all_ok(errors);
  EXPECT_HAS(error, "broadcast from rank 0 on rank 1: rank 0 sent 400 bytes (100 x Float) but this rank expects 200");
}

TEST(ThreadWorldErrors, MisuseIsRefusedWithoutBreakingTheCommunicator) {
  const auto errors = run_world(2, [&](int r, Communicator& comm) {
    auto t = at::zeros({4, 4});
    EXPECT_HAS(error_of([&] { comm.send(t, r); }), "must be another rank of 0..1");
    EXPECT_HAS(error_of([&] { comm.send(t, 2); }), "must be another rank");
    auto strided = t.t();
    EXPECT_HAS(error_of([&] { comm.recv(strided, 1 - r); }), "contiguous");
    EXPECT_HAS(error_of([&] { comm.broadcast(t, 5); }), "root 5 is outside");
    at::Tensor none;
    EXPECT_HAS(error_of([&] { comm.send(none, 1 - r); }), "undefined");
    EXPECT_TRUE(comm.broken().empty());
    // A non-contiguous send is fine (sent as its contiguous copy).
    auto m = at::arange(16, at::kFloat).reshape({4, 4});
    if (r == 0) {
      comm.send(m.t(), 1);
    } else {
      comm.recv(t, 0);
      EXPECT_TRUE(at::equal(t, m.t().contiguous()));
    }
  });
  expect_all_ok(errors);
}

// ----------------------------------------------------------------------------------------------------------------
// Ranks as processes (this binary re-executed; see main.cpp)
// ----------------------------------------------------------------------------------------------------------------


}  // namespace

// echo: receive a tensor from rank 0 (fp32, then bf16), send back 2x + rank; take part in a bf16 broadcast and a
// barrier. silent: join, barrier, then sleep until killed. Exit 0 on success.
int child_comm(const ChildArgs& a) {
  Rendezvous rv;
  auto comm = join_child(a, &rv);
  if (a.role == "echo") {
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      auto t = at::empty({100, 10}, dtype);
      comm->recv(t, 0);
      comm->send((t.to(at::kFloat) * 2 + a.rank).to(dtype), 0);
    }
    auto b = at::zeros({100, 10}, at::kBFloat16);
    comm->broadcast(b, 0);
    if (!at::equal(b, payload(0, 99, at::kBFloat16))) return 4;
    comm->barrier();
    return 0;
  }
  if (a.role == "silent") {
    comm->barrier();
    std::this_thread::sleep_for(300s);
    return 0;
  }
  return 2;
}

namespace {

Rendezvous host_world(int world, std::chrono::milliseconds timeout) { return Rendezvous::open(loopback(world, 0, timeout)); }

TEST(ProcessWorld, SendRecvBroadcastBarrierAcrossThreeProcesses) {
  auto rv = host_world(3, 20s);
  Child c1("echo", 1, 3, rv.port(), 20s), c2("echo", 2, 3, rv.port(), 20s);
  auto comm = connect_gloo(loopback(3, 0, 20s).with_port(rv.port()), rv);
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    for (int peer : {1, 2}) comm->send(payload(0, peer, dtype), peer);
    for (int peer : {1, 2}) {
      auto back = at::empty({100, 10}, dtype);
      comm->recv(back, peer);
      const auto expected = (payload(0, peer, dtype).to(at::kFloat) * 2 + peer).to(dtype);
      EXPECT_TRUE(at::equal(back, expected)) << "peer " << peer << " " << dtype;
    }
  }
  auto b = payload(0, 99, at::kBFloat16);
  comm->broadcast(b, 0);
  comm->barrier();
  EXPECT_EQ(c1.wait_for(20s), 0);
  EXPECT_EQ(c2.wait_for(20s), 0);
}

TEST(ProcessWorld, AKilledPeerGivesANamedErrorWithinTheTimeoutThenANewWorldWorks) {
  auto rv = host_world(2, 10s);
  Child child("silent", 1, 2, rv.port(), 10s);
  auto comm = connect_gloo(loopback(2, 0, 10s).with_port(rv.port()), rv);
  comm->barrier();
  child.kill();
  EXPECT_EQ(child.wait(), 128 + SIGKILL);
  auto into = at::zeros({100, 10});
  const auto t0 = Clock::now();
  const auto error = error_of([&] { comm->recv(into, 1, 5000ms); });
  const double took = seconds_since(t0);
  show(error);
  EXPECT_HAS(error, "recv from rank 1 on rank 0: rank 1");
  EXPECT_TRUE(error.find("closed the connection") != std::string::npos ||
              error.find("did not answer within 5 s") != std::string::npos)
      << error;
  EXPECT_LT(took, 6.0);
  comm.reset();

  auto rv2 = host_world(2, 10s);
  Child echo("echo", 1, 2, rv2.port(), 10s);
  auto comm2 = connect_gloo(loopback(2, 0, 10s).with_port(rv2.port()), rv2);
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    comm2->send(payload(0, 1, dtype), 1);
    auto back = at::empty({100, 10}, dtype);
    comm2->recv(back, 1);
    EXPECT_TRUE(at::equal(back, (payload(0, 1, dtype).to(at::kFloat) * 2 + 1).to(dtype)));
  }
  auto b = payload(0, 99, at::kBFloat16);
  comm2->broadcast(b, 0);
  comm2->barrier();
  EXPECT_EQ(echo.wait_for(20s), 0);
}

TEST(ProcessWorld, ASilentPeerProcessTimesOutNamingIt) {
  auto rv = host_world(2, 10s);
  Child child("silent", 1, 2, rv.port(), 10s);
  auto comm = connect_gloo(loopback(2, 0, 10s).with_port(rv.port()), rv);
  comm->barrier();
  auto into = at::zeros({10});
  const auto t0 = Clock::now();
  const auto error = error_of([&] { comm->recv(into, 1, 1500ms); });
  const double took = seconds_since(t0);
  show(error);
  EXPECT_HAS(error, "rank 1 did not answer within 1.5 s");
  EXPECT_GE(took, 1.4);
  EXPECT_LT(took, 4.0);
  const auto t1 = Clock::now();
  EXPECT_HAS(error_of([&] { comm->barrier(1000ms); }), "unusable");
  EXPECT_LT(seconds_since(t1), 0.5);  // a broken communicator refuses at once
  comm.reset();
  child.kill();
  EXPECT_EQ(child.wait(), 128 + SIGKILL);
}

TEST(ProcessWorld, ADeadRankInACollectiveIsNamed) {
  auto rv = host_world(3, 10s);
  Child c1("silent", 1, 3, rv.port(), 10s), c2("silent", 2, 3, rv.port(), 10s);
  auto comm = connect_gloo(loopback(3, 0, 10s).with_port(rv.port()), rv);
  comm->barrier();
  c2.kill();
  EXPECT_EQ(c2.wait(), 128 + SIGKILL);
  const auto t0 = Clock::now();
  const auto error = error_of([&] { comm->barrier(2000ms); });
  show(error);
  EXPECT_HAS(error, "barrier #2 on rank 0");
  EXPECT_HAS(error, "closed the connection");
  EXPECT_HAS(error, "ranks 1, 2 had not reached it");  // rank 1 is alive but silent, rank 2 is dead
  EXPECT_LT(seconds_since(t0), 4.0);
}

}  // namespace

}  // namespace liveavatar::parallel::test
