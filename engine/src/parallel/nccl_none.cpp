// connect_nccl() of a build without CUDA. SPDX-License-Identifier: LGPL-2.1-or-later
#include "parallel/nccl_communicator.h"

namespace liveavatar::parallel {

bool nccl_built() { return false; }

std::unique_ptr<Communicator> connect_nccl(const ParallelConfig&, const Rendezvous&, const std::string&) {
  throw ParallelError("the NCCL communicator needs a build with CUDA (install the CUDA toolkit and run "
                      "scripts/setup.sh, which configures -Dcuda=enabled); CPU ranks use Gloo (devices=cpu:N)");
}

}  // namespace liveavatar::parallel
