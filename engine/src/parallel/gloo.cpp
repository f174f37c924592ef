// The rendezvous (c10d TCPStore) and the Gloo communicator (c10d::ProcessGroupGloo), both from LibTorch.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
// The torch wheel exports ProcessGroupGloo and the Gloo transport but ships no Gloo headers; ProcessGroupGloo.hpp is
// compiled against Debian's libgloo-dev (an older snapshot) and nothing of that package is linked. That is sound
// because ProcessGroupGloo holds every Gloo type by pointer (its layout does not depend on the Gloo version), its
// GlooStore store-v2 overrides are behind GLOO_STORE_HAS_STORE_V2 (left undefined), and this file constructs no Gloo
// object itself: the devices come from ProcessGroupGloo::createDevice*, inside the library.
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#include "parallel/communicator.h"

namespace liveavatar::parallel {

Communicator::~Communicator() = default;

struct Rendezvous::Impl {
  ParallelConfig config;
  c10::intrusive_ptr<c10d::Store> store;
  uint16_t port = 0;
};

namespace {

using Clock = std::chrono::steady_clock;
using Duration = std::chrono::milliseconds;

std::string first_line(const std::string& s) {
  auto line = s.substr(0, s.find('\n'));
  return line.size() > 300 ? line.substr(0, 300) + "..." : line;
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

// c10d's flight recorder is one per process; torch 2.11 inserts a process group's status into its map before taking
// its lock (FlightRecorder::recordWithResetEnabled), so two process groups of one process (ranks as threads) that
// start an operation at once corrupt that map (seen as a SIGSEGV about once in 40 runs of the thread tests). The
// calls that create work are therefore made one at a time per process; they only post or enqueue, the waits happen
// outside this lock.
std::mutex& c10d_call_mutex() {
  static std::mutex m;
  return m;
}

enum class Failure { kTimeout, kClosed, kOther };

Failure classify(const std::string& what) {
  const auto w = lower(what);
  if (w.find("timed out") != std::string::npos || w.find("timeout") != std::string::npos) return Failure::kTimeout;
  for (const char* closed : {"closed", "reset by peer", "broken pipe", "connection refused", "eof", "shutdown"})
    if (w.find(closed) != std::string::npos) return Failure::kClosed;
  return Failure::kOther;
}

std::string ranks_text(const std::vector<int>& ranks) {
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(const ParallelConfig& config, const Rendezvous& rendezvous, const std::string& group)
      : config_(config), rendezvous_(rendezvous.impl()) {
    store_ = c10::make_intrusive<c10d::PrefixStore>(group + "/", rendezvous_->store);
    const int rank = config_.rank(), world = config_.world_size();
    const auto t0 = Clock::now();
    try {
      store_->set("joined/" + std::to_string(rank), std::vector<uint8_t>{1});
      auto options = c10d::ProcessGroupGloo::Options::create(config_.timeout());
      const auto& host = config_.rendezvous().host;
      // Loopback worlds bind to loopback; across machines Gloo picks the interface this host's name resolves to.
      options->devices.push_back(is_loopback(host) ? c10d::ProcessGroupGloo::createDeviceForHostname(host)
                                                   : c10d::ProcessGroupGloo::createDefaultDevice());
      options->threads = 2;
      pg_ = c10::make_intrusive<c10d::ProcessGroupGloo>(store_, rank, world, options);
    } catch (const std::exception& e) {
      const auto waited = std::chrono::duration_cast<Duration>(Clock::now() - t0);
      std::vector<int> missing;
      try {
        for (int r = 0; r < world; ++r)
          if (!store_->check({"joined/" + std::to_string(r)})) missing.push_back(r);
      } catch (const std::exception&) {
        throw ParallelError("rank " + std::to_string(rank) + " lost the rendezvous at " + endpoint() +
                            " while joining (rank 0 hosts it: did it end?); restart every rank (c10d: " +
                            first_line(e.what()) + ")");
      }
      if (!missing.empty())
        throw ParallelError(ranks_text(missing) + " did not join group \"" + group + "\" at " + endpoint() +
                            " within " + format_duration(waited) + " (world of " + std::to_string(world) +
                            "); start every rank with the same parallel-rendezvous, or raise parallel-timeout (c10d: " +
                            first_line(e.what()) + ")");
      throw ParallelError("rank " + std::to_string(rank) + " could not connect to its peers through " + endpoint() +
                          ": " + first_line(e.what()) + "; check that the ranks can reach each other, then restart "
                          "every rank");
    }
  }

  ~GlooCommunicator() override {
    // The process group first (it joins its threads), then the works of failed calls, which keep the tensors Gloo
    // may still write into alive until nothing can.
    pg_.reset();
    failed_.clear();
  }

  int rank() const override { return config_.rank(); }
  int world_size() const override { return config_.world_size(); }
  c10::Device device() const override { return c10::kCPU; }
  Duration timeout() const override { return config_.timeout(); }
  std::string backend() const override { return "gloo"; }
  std::string broken() const override { return broken_; }

  // Every transfer is preceded by an envelope (tag 1: never matched with data, tag 0) that says what comes: Gloo
  // terminates the process when a message does not fit the posted buffer, so sizes are compared before the data
  // is posted, and a mismatch becomes a ParallelError on the receiving rank.
  void send(const at::Tensor& tensor, int to, Duration timeout) override {
    check_usable("send");
    check_peer("send to", to);
    check_tensor("send", tensor, /*must_be_contiguous=*/false);
    const std::string op = "send to rank " + std::to_string(to);
    const auto t0 = Clock::now();
    const auto data = tensor.contiguous();
    p2p(/*is_send=*/true, envelope_of(data), to, kEnvelopeTag, op, timeout, t0);
    p2p(/*is_send=*/true, data, to, kDataTag, op, timeout, t0);
    bytes_sent_ += data.nbytes();
  }

  void recv(at::Tensor& into, int from, Duration timeout) override {
    check_usable("recv");
    check_peer("recv from", from);
    check_tensor("recv", into, /*must_be_contiguous=*/true);
    const std::string op = "recv from rank " + std::to_string(from);
    const auto t0 = Clock::now();
    auto envelope = at::empty({kEnvelopeLength}, at::kLong);
    p2p(/*is_send=*/false, envelope, from, kEnvelopeTag, op, timeout, t0);
    check_envelope(envelope, into, op, from);
    p2p(/*is_send=*/false, into, from, kDataTag, op, timeout, t0);
    bytes_received_ += into.nbytes();
  }

  void broadcast(at::Tensor& tensor, int root, Duration timeout) override {
    check_usable("broadcast");
    if (root < 0 || root >= world_size())
      throw ParallelError("broadcast root " + std::to_string(root) + " is outside 0.." +
                          std::to_string(world_size() - 1));
    check_tensor("broadcast", tensor, /*must_be_contiguous=*/true);
    const std::string op = "broadcast from rank " + std::to_string(root);
    const auto t0 = Clock::now();
    const int64_t seq = enter_collective();
    auto envelope = envelope_of(tensor);
    collective_broadcast(envelope, root, op, seq, timeout, t0);
    if (rank() != root) check_envelope(envelope, tensor, op, root);
    collective_broadcast(tensor, root, op, seq, timeout, t0);
  }

  void barrier(Duration timeout) override {
    check_usable("barrier");
    const auto t0 = Clock::now();
    const int64_t seq = enter_collective();
    c10d::BarrierOptions options;
    options.timeout = timeout;
    c10::intrusive_ptr<c10d::Work> work;
    try {
      std::lock_guard<std::mutex> lock(c10d_call_mutex());
      work = pg_->barrier(options);
    } catch (const std::exception& e) {
      fail_collective("barrier", seq, timeout, t0, e.what(), work);
    }
    finish_collective(work, "barrier", seq, timeout, t0);
  }

 private:
  static constexpr int kDataTag = 0, kEnvelopeTag = 1;
  static constexpr int64_t kEnvelopeLength = 4, kMagic = 0x4c41564154415231;  // "LAVATAR1"

  static at::Tensor envelope_of(const at::Tensor& t) {
    return at::tensor(std::vector<int64_t>{kMagic, static_cast<int64_t>(t.nbytes()),
                                           static_cast<int64_t>(t.scalar_type()), t.numel()},
                      at::kLong);
  }

  static std::string describe(int64_t nbytes, int64_t dtype, int64_t numel) {
    return std::to_string(nbytes) + " bytes (" + std::to_string(numel) + " x " +
           c10::toString(static_cast<at::ScalarType>(dtype)) + ")";
  }

  // The sender's envelope against the buffer posted here; a mismatch breaks the communicator with what each side has.
  void check_envelope(const at::Tensor& envelope, const at::Tensor& into, const std::string& op, int peer) {
    const auto* e = envelope.data_ptr<int64_t>();
    std::string problem;
    if (e[0] != kMagic) {
      problem = "rank " + std::to_string(peer) + " sent something that is not a liveavatar message";
    } else if (e[1] != static_cast<int64_t>(into.nbytes()) || e[2] != static_cast<int64_t>(into.scalar_type())) {
      if (e[2] < 0 || e[2] >= static_cast<int64_t>(at::ScalarType::NumOptions)) {
        problem = "rank " + std::to_string(peer) + " sent an unknown dtype";
      } else {
        problem = "rank " + std::to_string(peer) + " sent " + describe(e[1], e[2], e[3]) + " but this rank expects " +
                  describe(static_cast<int64_t>(into.nbytes()), static_cast<int64_t>(into.scalar_type()),
                           into.numel());
      }
    }
    if (problem.empty()) return;
    broken_ = op + " on rank " + std::to_string(rank()) + ": " + problem +
              "; the ranks are out of step (different plans, sizes or builds?): restart every rank";
    throw ParallelError(broken_);
  }

  void p2p(bool is_send, const at::Tensor& tensor, int peer, int tag, const std::string& op, Duration timeout,
           Clock::time_point t0) {
    std::vector<at::Tensor> v{tensor};
    c10::intrusive_ptr<c10d::Work> work;
    try {
      std::lock_guard<std::mutex> lock(c10d_call_mutex());
      work = is_send ? pg_->send(v, peer, tag) : pg_->recv(v, peer, tag);
    } catch (const std::exception& e) {
      fail(op, peer, timeout, t0, e.what(), work);
    }
    finish(work, op, peer, timeout, t0);
  }

  void collective_broadcast(at::Tensor& tensor, int root, const std::string& op, int64_t seq, Duration timeout,
                            Clock::time_point t0) {
    std::vector<at::Tensor> v{tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.rootTensor = 0;
    options.timeout = remaining(timeout, t0);
    c10::intrusive_ptr<c10d::Work> work;
    try {
      std::lock_guard<std::mutex> lock(c10d_call_mutex());
      work = pg_->broadcast(v, options);
    } catch (const std::exception& e) {
      fail_collective(op, seq, timeout, t0, e.what(), work);
    }
    finish_collective(work, op, seq, timeout, t0);
  }

  // What is left of a call's timeout (its parts share it), at least 1 ms.
  static Duration remaining(Duration timeout, Clock::time_point t0) {
    const auto spent = std::chrono::duration_cast<Duration>(Clock::now() - t0);
    return std::max(Duration(1), timeout - spent);
  }

  std::string endpoint() const {
    return config_.rendezvous().host + ":" + std::to_string(rendezvous_->port);
  }

  void check_usable(const char* op) const {
    if (!broken_.empty())
      throw ParallelError(std::string(op) + " on rank " + std::to_string(rank()) +
                          ": this communicator is unusable after an earlier failure (" + broken_ +
                          "); build a new one on every rank");
  }

  void check_peer(const char* op, int peer) const {
    if (peer < 0 || peer >= world_size() || peer == rank())
      throw ParallelError(std::string(op) + " rank " + std::to_string(peer) + " from rank " +
                          std::to_string(rank()) + ": the peer must be another rank of 0.." +
                          std::to_string(world_size() - 1));
  }

  void check_tensor(const char* op, const at::Tensor& t, bool must_be_contiguous) const {
    if (!t.defined()) throw ParallelError(std::string(op) + " of an undefined tensor");
    if (!t.device().is_cpu())
      throw ParallelError(std::string(op) + " of a tensor on " + t.device().str() +
                          ": the gloo communicator moves CPU tensors (use the NCCL one for GPU ranks)");
    if (must_be_contiguous && !t.is_contiguous())
      throw ParallelError(std::string(op) + " needs a contiguous tensor to write into (got strides " +
                          c10::str(t.strides()) + ")");
  }

  void finish(const c10::intrusive_ptr<c10d::Work>& work, const std::string& op, int peer, Duration timeout,
              Clock::time_point t0) {
    try {
      if (!work->wait(remaining(timeout, t0))) fail(op, peer, timeout, t0, "timed out", work);
    } catch (const ParallelError&) {
      throw;
    } catch (const std::exception& e) {
      fail(op, peer, timeout, t0, e.what(), work);
    }
  }

  [[noreturn]] void fail(const std::string& op, int peer, Duration timeout, Clock::time_point t0,
                         const std::string& what, const c10::intrusive_ptr<c10d::Work>& work) {
    if (work) failed_.push_back(work);
    const auto waited = std::chrono::duration_cast<Duration>(Clock::now() - t0);
    const std::string where = op + " on rank " + std::to_string(rank()) + ": ";
    const std::string peer_s = "rank " + std::to_string(peer);
    std::string msg;
    switch (classify(what)) {
      case Failure::kTimeout:
        msg = where + peer_s + " did not answer within " + format_duration(timeout) + "; check that " + peer_s +
              " is running and at the same point of the stream, or raise parallel-timeout";
        break;
      case Failure::kClosed:
        msg = where + peer_s + " closed the connection after " + format_duration(waited) +
              " (its process ended or failed); check its log, then restart every rank";
        break;
      case Failure::kOther:
        msg = where + "the transfer with " + peer_s + " failed; restart every rank";
        break;
    }
    msg += " (gloo: " + first_line(what) + ")";
    broken_ = msg;
    throw ParallelError(msg);
  }

  // Every rank counts the collectives it entered in the store, so a failed one can name who did not come.
  int64_t enter_collective() {
    try {
      return store_->add("collectives/" + std::to_string(rank()), 1);
    } catch (const std::exception& e) {
      broken_ = "the rendezvous store at " + endpoint() + " is unreachable (rank 0 hosts it: did it end?)";
      throw ParallelError("collective on rank " + std::to_string(rank()) + ": " + broken_ +
                          "; restart every rank (c10d: " + first_line(e.what()) + ")");
    }
  }

  void finish_collective(const c10::intrusive_ptr<c10d::Work>& work, const std::string& op, int64_t seq,
                         Duration timeout, Clock::time_point t0) {
    try {
      if (!work->wait(remaining(timeout, t0))) fail_collective(op, seq, timeout, t0, "timed out", work);
    } catch (const ParallelError&) {
      throw;
    } catch (const std::exception& e) {
      fail_collective(op, seq, timeout, t0, e.what(), work);
    }
  }

  [[noreturn]] void fail_collective(const std::string& op, int64_t seq, Duration timeout, Clock::time_point t0,
                                    const std::string& what, const c10::intrusive_ptr<c10d::Work>& work) {
    if (work) failed_.push_back(work);
    const auto waited = std::chrono::duration_cast<Duration>(Clock::now() - t0);
    std::vector<int> behind;
    bool store_ok = true;
    try {
      for (int r = 0; r < world_size(); ++r)
        if (r != rank() && store_->add("collectives/" + std::to_string(r), 0) < seq) behind.push_back(r);
    } catch (const std::exception&) {
      store_ok = false;
    }
    const std::string where = op + " #" + std::to_string(seq) + " on rank " + std::to_string(rank()) + ": ";
    std::string msg;
    const auto kind = classify(what);
    if (!store_ok) {
      msg = where + "rank 0 (it hosts the rendezvous store) is unreachable: its process ended or failed; check its "
                    "log, then restart every rank";
    } else if (kind == Failure::kClosed) {
      msg = where + "a peer closed the connection after " + format_duration(waited) + " (its process ended or failed)" +
            (behind.empty() ? std::string()
                            : "; " + ranks_text(behind) + " had not reached it") +
            "; check the ranks' logs, then restart every rank";
    } else if (!behind.empty()) {
      msg = where + ranks_text(behind) + (behind.size() == 1 ? " has" : " have") + " not reached it within " +
            format_duration(waited) + "; check " + (behind.size() == 1 ? "that rank" : "those ranks") +
            ", or raise parallel-timeout";
    } else if (kind == Failure::kTimeout) {
      msg = where + "every rank entered it but it did not complete within " + format_duration(timeout) +
            "; check the ranks, or raise parallel-timeout";
    } else {
      msg = where + "failed; restart every rank";
    }
    msg += " (gloo: " + first_line(what) + ")";
    broken_ = msg;
    throw ParallelError(msg);
  }

  ParallelConfig config_;
  std::shared_ptr<Rendezvous::Impl> rendezvous_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
  std::vector<c10::intrusive_ptr<c10d::Work>> failed_;
  std::string broken_;
};

}  // namespace

Rendezvous Rendezvous::open(const ParallelConfig& config, std::optional<std::chrono::milliseconds> connect_timeout) {
  auto impl = std::make_shared<Impl>();
  impl->config = config;
  const auto& ep = config.rendezvous();
  const std::string where = ep.host + ":" + std::to_string(ep.port);
  c10d::TCPStoreOptions options;
  options.port = ep.port;
  options.isServer = config.is_first();
  options.numWorkers = static_cast<size_t>(config.world_size());
  options.waitWorkers = false;  // rank 0 returns at once; the communicator waits for the others
  options.timeout = connect_timeout && !config.is_first() ? *connect_timeout : config.timeout();
  if (!config.is_first() && ep.port == 0)
    throw ParallelError("rank " + std::to_string(config.rank()) + " needs the port rank 0 listens on, not 0: "
                        "give it rank 0's Rendezvous::port() in parallel-rendezvous");
  const auto t0 = Clock::now();
  try {
    auto store = c10::make_intrusive<c10d::TCPStore>(ep.host, options);
    impl->port = store->getPort();
    store->setTimeout(config.timeout());  // every later store call waits the configured time
    impl->store = store;
  } catch (const std::exception& e) {
    if (config.is_first())
      throw ParallelError("rank 0 could not host the rendezvous at " + where + ": " + first_line(e.what()) +
                          "; choose another port in parallel-rendezvous (0: any free one), or stop what uses it");
    const auto waited = std::chrono::duration_cast<Duration>(Clock::now() - t0);
    throw ParallelError("rank " + std::to_string(config.rank()) + " could not reach the rendezvous at " + where +
                        " within " + format_duration(waited) +
                        ": start rank 0 first (it hosts it), check parallel-rendezvous, or raise parallel-timeout "
                        "(c10d: " + first_line(e.what()) + ")");
  }
  Rendezvous r;
  r.impl_ = std::move(impl);
  return r;
}

uint16_t Rendezvous::port() const { return impl_->port; }

const ParallelConfig& Rendezvous::config() const { return impl_->config; }

void Rendezvous::post(const std::string& key, const std::string& value) const {
  try {
    impl_->store->set(key, std::vector<uint8_t>(value.begin(), value.end()));
  } catch (const std::exception& e) {
    throw ParallelError("rank " + std::to_string(impl_->config.rank()) + " could not write \"" + key +
                        "\" to the rendezvous: " + first_line(e.what()) + "; restart every rank");
  }
}

// Polls with check() (no blocking call that would hold the store client's connection): a command waits at most a
// few milliseconds more than it would with wait(), against DiT blocks of a second or more.
bool Rendezvous::poll(const std::string& key, std::chrono::milliseconds timeout, std::string* value) const {
  const auto deadline = Clock::now() + timeout;
  auto pause = std::chrono::microseconds(200);
  try {
    while (true) {
      if (impl_->store->check({key})) {
        const auto bytes = impl_->store->get(key);
        if (value) value->assign(bytes.begin(), bytes.end());
        return true;
      }
      if (Clock::now() >= deadline) return false;
      std::this_thread::sleep_for(pause);
      pause = std::min<std::chrono::microseconds>(pause * 2, std::chrono::milliseconds(5));
    }
  } catch (const std::exception& e) {
    const auto& ep = impl_->config.rendezvous();
    throw ParallelError("rank " + std::to_string(impl_->config.rank()) + " lost the rendezvous at " + ep.host + ":" +
                        std::to_string(impl_->port) + " (rank 0 ended or its host is unreachable): " +
                        first_line(e.what()));
  }
}

std::unique_ptr<Communicator> connect_gloo(const ParallelConfig& config, const Rendezvous& rendezvous,
                                           const std::string& group) {
  if (!rendezvous.impl()) throw ParallelError("connect_gloo: the rendezvous is not open (Rendezvous::open first)");
  if (rendezvous.config().rank() != config.rank() || rendezvous.config().world_size() != config.world_size())
    throw ParallelError("connect_gloo: the rendezvous was opened for rank " +
                        std::to_string(rendezvous.config().rank()) + " of " +
                        std::to_string(rendezvous.config().world_size()) + ", the config is rank " +
                        std::to_string(config.rank()) + " of " + std::to_string(config.world_size()));
  return std::make_unique<GlooCommunicator>(config, rendezvous, group);
}

}  // namespace liveavatar::parallel
