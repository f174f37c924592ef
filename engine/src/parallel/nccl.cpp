// The NCCL communicator: c10d::ProcessGroupNCCL from LibTorch. SPDX-License-Identifier: LGPL-2.1-or-later
#include "parallel/nccl_communicator.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <cstdlib>

#include "cuda/cuda.h"

namespace liveavatar::parallel {

bool nccl_built() { return true; }

namespace {

using Duration = std::chrono::milliseconds;

std::string first_line(const std::string& s) {
  auto line = s.substr(0, s.find('\n'));
  return line.size() > 300 ? line.substr(0, 300) + "..." : line;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const ParallelConfig& config, uint16_t port, const std::string& group) : config_(config) {
    const auto device = config.device();
    if (!device.is_cuda())
      throw ParallelError("the NCCL communicator runs on GPUs, rank " + std::to_string(config.rank()) + " is on " +
                          device.str() + ": use Gloo for CPU ranks (devices=cpu:N)");
    if (device.index() >= cuda::device_count())
      throw ParallelError("rank " + std::to_string(config.rank()) + " is on " + device.str() + " but " +
                          (cuda::device_count() == 0 ? cuda::unavailable_reason()
                                                     : std::to_string(cuda::device_count()) + " GPUs are visible"));
    // Abort the NCCL communicators on a timeout or error, keep the process (the default kills it).
    ::setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2", /*overwrite=*/0);
    c10d::TCPStoreOptions so;
    so.port = port;
    so.isServer = false;  // rank 0's Rendezvous hosts the store; every rank joins it as a client here
    so.numWorkers = static_cast<size_t>(config.world_size());
    so.waitWorkers = false;
    so.timeout = config.timeout();
    try {
      auto store = c10::make_intrusive<c10d::TCPStore>(config.rendezvous().host, so);
      store_ = c10::make_intrusive<c10d::PrefixStore>(group + "/", store);
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = config.timeout();
      c10::cuda::CUDAGuard guard(device);
      pg_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(store_, config.rank(), config.world_size(), options);
      // Joining: a barrier (NCCL communicators are created on first use).
      barrier(config.timeout());
    } catch (const ParallelError&) {
      throw;
    } catch (const std::exception& e) {
      throw ParallelError("rank " + std::to_string(config.rank()) + " could not join NCCL group \"" + group +
                          "\" at " + config.rendezvous().host + ":" + std::to_string(port) + " within " +
                          format_duration(config.timeout()) + ": start every rank with the same parallel-rendezvous, "
                          "or raise parallel-timeout (" + first_line(e.what()) + ")");
    }
  }
  ~NcclCommunicator() override {
    try {
      if (pg_) pg_->shutdown();
    } catch (...) {
    }
  }

  int rank() const override { return config_.rank(); }
  int world_size() const override { return config_.world_size(); }
  c10::Device device() const override { return config_.device(); }
  Duration timeout() const override { return config_.timeout(); }
  std::string backend() const override { return "nccl"; }
  std::string broken() const override { return broken_; }

  void send(const at::Tensor& tensor, int to, Duration timeout) override {
    check_usable("send", to);
    require_here(tensor, "send");
    auto env = envelope(tensor);
    std::vector<at::Tensor> e{env}, t{tensor.contiguous()};
    finish(pg_->send(e, to, /*tag=*/1), "send (envelope)", to, timeout);
    finish(pg_->send(t, to, /*tag=*/0), "send", to, timeout);
  }

  void recv(at::Tensor& into, int from, Duration timeout) override {
    check_usable("recv", from);
    require_here(into, "recv");
    if (!into.is_contiguous()) throw ParallelError("recv: the buffer must be contiguous");
    auto env = at::empty({3}, at::TensorOptions().dtype(at::kLong).device(device()));
    std::vector<at::Tensor> e{env};
    finish(pg_->recv(e, from, /*tag=*/1), "recv (envelope)", from, timeout);
    const auto got = env.cpu();
    const auto* g = got.data_ptr<int64_t>();
    const auto mine = envelope(into).cpu();
    const auto* m = mine.data_ptr<int64_t>();
    if (g[0] != m[0] || g[1] != m[1] || g[2] != m[2]) {
      broken_ = "envelope mismatch";
      throw ParallelError("recv from rank " + std::to_string(from) + " on rank " + std::to_string(rank()) + ": rank " +
                          std::to_string(from) + " sent " + std::to_string(g[0]) + " bytes (" + std::to_string(g[2]) +
                          " x " + c10::toString(static_cast<at::ScalarType>(g[1])) + ") but this rank expects " +
                          std::to_string(m[0]) + " bytes (" + std::to_string(m[2]) + " x " +
                          c10::toString(into.scalar_type()) +
                          "); the ranks are out of step (different plans, sizes or builds?): restart every rank");
    }
    std::vector<at::Tensor> t{into};
    finish(pg_->recv(t, from, /*tag=*/0), "recv", from, timeout);
  }

  void broadcast(at::Tensor& tensor, int root, Duration timeout) override {
    check_usable("broadcast", root);
    require_here(tensor, "broadcast");
    std::vector<at::Tensor> t{tensor};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = timeout;
    finish(pg_->broadcast(t, o), "broadcast", root, timeout);
  }

  void barrier(Duration timeout) override {
    check_usable("barrier", -1);
    c10d::BarrierOptions o;
    o.timeout = timeout;
    o.device_ids = {static_cast<int64_t>(device().index())};
    finish(pg_->barrier(o), "barrier", -1, timeout);
  }

 private:
  at::Tensor envelope(const at::Tensor& t) const {
    return at::tensor({static_cast<int64_t>(t.nbytes()), static_cast<int64_t>(t.scalar_type()), t.numel()},
                      at::kLong).to(device());
  }
  void require_here(const at::Tensor& t, const char* op) const {
    if (t.device() != device())
      throw ParallelError(std::string(op) + ": NCCL moves tensors on this rank's " + device().str() + ", got one on " +
                          t.device().str());
  }
  void check_usable(const char* op, int peer) const {
    if (!broken_.empty())
      throw ParallelError(std::string(op) + (peer >= 0 ? " with rank " + std::to_string(peer) : std::string()) +
                          " on rank " + std::to_string(rank()) + ": the communicator failed before (" + broken_ +
                          "); every rank must connect a new one");
  }
  void finish(const c10::intrusive_ptr<c10d::Work>& work, const std::string& op, int peer, Duration timeout) {
    const std::string who = peer >= 0 ? "rank " + std::to_string(peer) : std::string("a peer");
    try {
      if (work->wait(timeout)) return;
      broken_ = op + " timed out";
    } catch (const std::exception& e) {
      broken_ = first_line(e.what());
    }
    try {
      pg_->abort();
    } catch (...) {
    }
    throw ParallelError(op + (peer >= 0 ? (op.rfind("send", 0) == 0 ? " to " : " from ") + who : std::string()) +
                        " on rank " + std::to_string(rank()) + ": " + who + " did not complete it within " +
                        format_duration(timeout) + "; check that " + who +
                        " is running and at the same point of the stream, or raise parallel-timeout (nccl: " + broken_ +
                        ")");
  }

  ParallelConfig config_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg_;
  std::string broken_;
};

}  // namespace

std::unique_ptr<Communicator> connect_nccl(const ParallelConfig& config, const Rendezvous& rendezvous,
                                           const std::string& group) {
  if (!rendezvous.impl()) throw ParallelError("connect_nccl: the rendezvous is not open (Rendezvous::open first)");
  return std::make_unique<NcclCommunicator>(config, rendezvous.port(), group);
}

}  // namespace liveavatar::parallel
