// The NCCL communicator (CUDA tensors): c10d::ProcessGroupNCCL from LibTorch over the same c10d TCPStore the Gloo
// ranks meet at. Built with -Dcuda=enabled; otherwise connect_nccl() throws a ParallelError saying so.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
//   auto cfg = ParallelConfig::parse("stage", "cuda:0,cuda:1,cuda:2,cuda:3", rank, "10.0.0.5:29500");
//   auto rv = Rendezvous::open(cfg);
//   auto comm = connect_nccl(cfg.with_port(rv.port()), rv);   // tensors on cfg.device()
//
// Timeouts: every call waits at most its timeout, then throws ParallelError naming the operation, the peer and
// parallel-timeout; the communicator is then aborted (its NCCL communicators torn down, the process kept: this sets
// TORCH_NCCL_ASYNC_ERROR_HANDLING=2 "clean up only" unless the environment chose otherwise), and every rank builds
// a new one. Envelopes precede each transfer as for Gloo (a small int64 tensor on the device), so a size mismatch is
// an error on the receiving rank, not memory corruption.
#pragma once

#include <memory>
#include <string>

#include "parallel/communicator.h"

namespace liveavatar::parallel {

/// True when this build has the NCCL communicator (-Dcuda=enabled).
bool nccl_built();

/// The NCCL communicator of config.rank() (its device must be cuda:N) over the rendezvous's store.
std::unique_ptr<Communicator> connect_nccl(const ParallelConfig& config, const Rendezvous& rendezvous,
                                           const std::string& group = "liveavatar-nccl");

}  // namespace liveavatar::parallel
