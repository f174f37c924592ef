// Tensor lists over a Communicator: a small header (dtypes and shapes) then the data, so the receiver allocates what
// the sender holds. What the plans send between ranks (block inputs, sink inputs, latents) goes through these.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "dit/dit.h"
#include "parallel/communicator.h"

namespace liveavatar::parallel {

/// Sends `tensors` (any dtype / shape; undefined ones arrive undefined) to rank `to`.
void send_tensors(Communicator& comm, const std::vector<at::Tensor>& tensors, int to);
/// Receives what send_tensors sent from rank `from`, on comm.device().
std::vector<at::Tensor> recv_tensors(Communicator& comm, int from);

/// The per-call inputs of a layer range, as the next stage needs them, with the denoising step they belong to.
void send_block_inputs(Communicator& comm, const dit::BlockInputs& in, int to, int64_t step = 0);
dit::BlockInputs recv_block_inputs(Communicator& comm, int from, c10::Device device, int64_t* step = nullptr);

/// The conditioning tokens on their way through the layers (sink prefill).
void send_sink_inputs(Communicator& comm, const dit::SinkInputs& in, int to);
dit::SinkInputs recv_sink_inputs(Communicator& comm, int from, c10::Device device);

}  // namespace liveavatar::parallel
