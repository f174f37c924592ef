// gst-liveavatar parallel runtime: how ranks meet (Rendezvous) and exchange tensors (Communicator).
// SPDX-License-Identifier: LGPL-2.1-or-later
//
//   auto cfg = ParallelConfig::parse("stage", "cpu:4", rank, "127.0.0.1:0");
//   Rendezvous rv = Rendezvous::open(cfg);        // rank 0 hosts a c10d TCPStore (port 0: any free port);
//   cfg = cfg.with_port(rv.port());                //   the others connect to host:port
//   auto comm = connect_gloo(cfg, rv);             // c10d ProcessGroupGloo over the store; blocks until all joined
//   comm->send(hidden, /*to=*/cfg.rank() + 1);     // point to point, into a preallocated tensor on the other side
//   comm->recv(buffer, /*from=*/cfg.rank() - 1);
//   comm->broadcast(audio, /*root=*/0);
//   comm->barrier();
//
// Every call waits at most the config's timeout (or the one given). A peer that stays silent, dies or errs makes the
// call throw ParallelError naming the operation, the peer rank and the knob ("rank 2 did not answer within 30 s ...
// raise parallel-timeout"); the communicator is then broken (every later call throws at once) and every rank must
// build a new one (a new Rendezvous generation or port). Nothing hangs past the timeout, nothing aborts the process.
//
// Each transfer is preceded by a small envelope (bytes, dtype, elements), so a buffer that does not fit what the
// peer sent is a ParallelError on the receiving rank (Gloo alone would terminate the process).
//
// Implementations: Gloo (CPU tensors, TCP; c10d::ProcessGroupGloo from LibTorch). NCCL (CUDA tensors) fits the same
// interface: c10d::ProcessGroupNCCL over the same TCPStore, its work waited with the same timeout.
//
// Thread-safety: a Communicator is used by one thread at a time (its rank's); different ranks' communicators may live
// in one process and run concurrently. A Rendezvous may be shared by the communicators of its rank.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "parallel/config.h"

namespace liveavatar::parallel {

/// The c10d TCPStore all ranks of a world meet at. Rank 0 hosts it (and returns at once: the others may come later),
/// the others connect to it, retrying until the config's timeout.
class Rendezvous {
 public:
  /// Rank 0: listens on config.rendezvous() (port 0: a free one, see port()); rank > 0: connects to it, trying for
  /// `connect_timeout` (default: the config's timeout; a worker waiting for rank 0 tries in short rounds).
  static Rendezvous open(const ParallelConfig& config,
                         std::optional<std::chrono::milliseconds> connect_timeout = std::nullopt);
  /// The port the store listens on (rank 0: the one it got for port 0).
  uint16_t port() const;
  const ParallelConfig& config() const;

  /// Small values in the store (rank 0's commands to the other ranks, see driver.h): `key` = `value`.
  void post(const std::string& key, const std::string& value) const;
  /// The value of `key` once some rank has posted it; false when it is still unset after `timeout`. Throws
  /// ParallelError when the store is gone (rank 0 ended or its host is unreachable).
  bool poll(const std::string& key, std::chrono::milliseconds timeout, std::string* value) const;

  struct Impl;
  std::shared_ptr<Impl> impl() const { return impl_; }

 private:
  std::shared_ptr<Impl> impl_;
};

/// Point-to-point and collective transfers between the ranks of one world.
class Communicator {
 public:
  using Duration = std::chrono::milliseconds;
  virtual ~Communicator();

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  /// Where the tensors it moves must live (CPU for Gloo, the rank's GPU for NCCL).
  virtual c10::Device device() const = 0;
  /// The default timeout of every call.
  virtual Duration timeout() const = 0;
  /// "gloo", "nccl".
  virtual std::string backend() const = 0;

  /// Sends `tensor` to rank `to`, which posts a recv of the same byte size; returns when `tensor` may be reused.
  virtual void send(const at::Tensor& tensor, int to, Duration timeout) = 0;
  /// Receives into `into` (contiguous, preallocated, on device()) from rank `from`.
  virtual void recv(at::Tensor& into, int from, Duration timeout) = 0;
  /// Copies root's `tensor` into every rank's `tensor` (same shape and dtype everywhere, contiguous).
  virtual void broadcast(at::Tensor& tensor, int root, Duration timeout) = 0;
  /// Returns once every rank has called it.
  virtual void barrier(Duration timeout) = 0;

  void send(const at::Tensor& tensor, int to) { send(tensor, to, timeout()); }
  void recv(at::Tensor& into, int from) { recv(into, from, timeout()); }
  void broadcast(at::Tensor& tensor, int root) { broadcast(tensor, root, timeout()); }
  void barrier() { barrier(timeout()); }

  /// Empty while usable; otherwise the error that broke it.
  virtual std::string broken() const = 0;

  /// Tensor bytes this rank has sent / received point to point (envelopes not counted): the traffic per hop.
  uint64_t bytes_sent() const { return bytes_sent_; }
  uint64_t bytes_received() const { return bytes_received_; }

 protected:
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> bytes_received_{0};
};

/// The Gloo communicator of config.rank() over `rendezvous` (c10d::ProcessGroupGloo, TCP on the interface that
/// reaches config.rendezvous().host). Blocks until every rank has joined (at most config.timeout(); a missing rank
/// is named). `group` separates several worlds meeting at one store (each needs its own name).
std::unique_ptr<Communicator> connect_gloo(const ParallelConfig& config, const Rendezvous& rendezvous,
                                           const std::string& group = "liveavatar");

}  // namespace liveavatar::parallel
