// Tensor lists, block inputs and sink inputs over a Communicator. SPDX-License-Identifier: LGPL-2.1-or-later
#include "parallel/messages.h"

#include <ATen/ATen.h>

namespace liveavatar::parallel {

namespace {

constexpr int64_t kUndefined = -1;
constexpr int64_t kMaxHeader = 1 << 16;

at::Tensor to_wire(const at::Tensor& t, const Communicator& comm) {
  return t.to(comm.device()).contiguous();
}

}  // namespace

void send_tensors(Communicator& comm, const std::vector<at::Tensor>& tensors, int to) {
  // Header: count, then per tensor its dtype (or -1) and rank followed by its sizes.
  std::vector<int64_t> header{static_cast<int64_t>(tensors.size())};
  for (const auto& t : tensors) {
    if (!t.defined()) {
      header.push_back(kUndefined);
      continue;
    }
    header.push_back(static_cast<int64_t>(t.scalar_type()));
    header.push_back(t.dim());
    for (auto s : t.sizes()) header.push_back(s);
  }
  const auto length = at::full({1}, static_cast<int64_t>(header.size()), at::kLong);
  comm.send(to_wire(length, comm), to);
  comm.send(to_wire(at::tensor(header, at::kLong), comm), to);
  for (const auto& t : tensors)
    if (t.defined() && t.numel() > 0) comm.send(to_wire(t, comm), to);
}

std::vector<at::Tensor> recv_tensors(Communicator& comm, int from) {
  const auto on = at::TensorOptions().device(comm.device());
  auto length = at::empty({1}, on.dtype(at::kLong));
  comm.recv(length, from);
  const int64_t n = length.cpu().item<int64_t>();
  if (n < 1 || n > kMaxHeader)
    throw ParallelError("rank " + std::to_string(comm.rank()) + " got a message header of " + std::to_string(n) +
                        " entries from rank " + std::to_string(from) +
                        ": the ranks are out of step (different builds or plans?); restart every rank");
  auto header_t = at::empty({n}, on.dtype(at::kLong));
  comm.recv(header_t, from);
  header_t = header_t.cpu();
  const auto* h = header_t.data_ptr<int64_t>();
  int64_t pos = 0;
  auto next = [&]() -> int64_t {
    if (pos >= n) throw ParallelError("malformed message header from rank " + std::to_string(from));
    return h[pos++];
  };
  const int64_t count = next();
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t dtype = next();
    if (dtype == kUndefined) {
      out.emplace_back();
      continue;
    }
    const int64_t dims = next();
    if (dims < 0 || dims > 16) throw ParallelError("malformed message header from rank " + std::to_string(from));
    std::vector<int64_t> sizes;
    for (int64_t d = 0; d < dims; ++d) sizes.push_back(next());
    auto t = at::empty(sizes, on.dtype(static_cast<at::ScalarType>(dtype)));
    if (t.numel() > 0) comm.recv(t, from);
    out.push_back(std::move(t));
  }
  return out;
}

void send_block_inputs(Communicator& comm, const dit::BlockInputs& in, int to, int64_t step) {
  const auto ints = at::tensor(
      std::vector<int64_t>{in.window.start, in.window.active, in.frames, in.hp, in.wp, step}, at::kLong);
  send_tensors(comm,
               {in.hidden, in.e, in.e0, in.audio_global, in.audio_local, in.rope.cos, in.rope.sin, in.cond_rope.cos,
                in.cond_rope.sin, ints},
               to);
}

dit::BlockInputs recv_block_inputs(Communicator& comm, int from, c10::Device device, int64_t* step) {
  auto t = recv_tensors(comm, from);
  if (t.size() != 10 || t[9].numel() != 6)
    throw ParallelError("rank " + std::to_string(comm.rank()) + " expected block inputs from rank " +
                        std::to_string(from) + " and got " + std::to_string(t.size()) +
                        " tensors: the ranks are out of step; restart every rank");
  auto dev = [&](const at::Tensor& x) { return x.defined() ? x.to(device) : x; };
  dit::BlockInputs in;
  in.hidden = dev(t[0]);
  in.e = dev(t[1]);
  in.e0 = dev(t[2]);
  in.audio_global = dev(t[3]);
  in.audio_local = dev(t[4]);
  in.rope = {dev(t[5]), dev(t[6])};
  in.cond_rope = {dev(t[7]), dev(t[8])};
  const auto ints = t[9].cpu();
  const auto* v = ints.data_ptr<int64_t>();
  in.window = {v[0], v[1]};
  in.frames = v[2];
  in.hp = v[3];
  in.wp = v[4];
  if (step) *step = v[5];
  return in;
}

void send_sink_inputs(Communicator& comm, const dit::SinkInputs& in, int to) {
  std::vector<int64_t> segs;
  for (const auto& s : in.segments)
    segs.insert(segs.end(), {s.f0, s.h0, s.w0, s.f1, s.h1, s.w1, s.tf, s.th, s.tw, s.rolls ? 1 : 0});
  const auto segments =
      at::tensor(segs, at::kLong).reshape({static_cast<int64_t>(in.segments.size()), 10});
  send_tensors(comm, {in.hidden, in.e0, in.rope.cos, in.rope.sin, segments}, to);
}

dit::SinkInputs recv_sink_inputs(Communicator& comm, int from, c10::Device device) {
  auto t = recv_tensors(comm, from);
  if (t.size() != 5)
    throw ParallelError("rank " + std::to_string(comm.rank()) + " expected sink inputs from rank " +
                        std::to_string(from) + " and got " + std::to_string(t.size()) +
                        " tensors: the ranks are out of step; restart every rank");
  dit::SinkInputs in;
  in.hidden = t[0].to(device);
  in.e0 = t[1].to(device);
  in.rope = {t[2].to(device), t[3].to(device)};
  const auto segs = t[4].cpu().contiguous();
  const auto* v = segs.data_ptr<int64_t>();
  for (int64_t i = 0; i < segs.size(0); ++i, v += 10)
    in.segments.push_back({v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9] != 0});
  return in;
}

}  // namespace liveavatar::parallel
