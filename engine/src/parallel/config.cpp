// ParallelConfig and the parsers of what users write. SPDX-License-Identifier: LGPL-2.1-or-later
#include "parallel/config.h"

#include <cctype>
#include <cstdio>
#include <set>

namespace liveavatar::parallel {

namespace {

std::string trim(const std::string& s) {
  size_t a = 0, b = s.size();
  while (a < b && std::isspace(static_cast<unsigned char>(s[a]))) ++a;
  while (b > a && std::isspace(static_cast<unsigned char>(s[b - 1]))) --b;
  return s.substr(a, b - a);
}

// A whole non-negative decimal number, or false.
bool parse_uint(const std::string& s, uint64_t max, uint64_t* out) {
  if (s.empty() || s.size() > 19) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  if (v > max) return false;
  *out = v;
  return true;
}

}  // namespace

Plan parse_plan(const std::string& text) {
  const auto t = trim(text);
  if (t == "single") return Plan::kSingle;
  if (t == "step") return Plan::kStep;
  if (t == "stage") return Plan::kStage;
  if (t == "auto") return Plan::kAuto;
  throw ParallelError("parallel plan \"" + text + "\" is unknown: write single, step, stage or auto");
}

const char* plan_name(Plan plan) {
  switch (plan) {
    case Plan::kSingle: return "single";
    case Plan::kStep: return "step";
    case Plan::kStage: return "stage";
    case Plan::kAuto: return "auto";
  }
  return "?";
}

std::vector<c10::Device> parse_devices(const std::string& text) {
  const std::string hint = " (write e.g. \"cpu:4\" for four CPU ranks, or \"cuda:0,cuda:1,cuda:2,cuda:3\")";
  const auto t = trim(text);
  if (t.empty()) throw ParallelError("parallel devices are empty" + hint);
  std::vector<c10::Device> out;
  // "cpu:N": N CPU ranks (a CPU has no device index, so the number is a count).
  if (t.rfind("cpu:", 0) == 0 && t.find(',') == std::string::npos) {
    uint64_t n = 0;
    if (!parse_uint(t.substr(4), 4096, &n) || n == 0)
      throw ParallelError("parallel devices \"" + text + "\": the count after cpu: must be 1..4096" + hint);
    out.assign(static_cast<size_t>(n), c10::Device(c10::kCPU));
    return out;
  }
  size_t pos = 0;
  while (pos <= t.size()) {
    const size_t comma = t.find(',', pos);
    const auto item = trim(t.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos));
    if (item == "cpu") {
      out.emplace_back(c10::kCPU);
    } else if (item.rfind("cuda:", 0) == 0) {
      uint64_t index = 0;
      if (!parse_uint(item.substr(5), 127, &index))
        throw ParallelError("parallel devices \"" + text + "\": \"" + item + "\" needs a GPU index 0..127" + hint);
      out.emplace_back(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
    } else {
      throw ParallelError("parallel devices \"" + text + "\": \"" + item +
                          "\" is not a device (cpu or cuda:<index>; cpu:N only alone)" + hint);
    }
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

Endpoint parse_endpoint(const std::string& text) {
  const std::string hint = " (write host:port, e.g. 127.0.0.1:29500 or [::1]:29500; port 0 = any free port)";
  const auto t = trim(text);
  const size_t colon = t.rfind(':');
  if (colon == std::string::npos || colon == 0) throw ParallelError("parallel rendezvous \"" + text + "\"" + hint);
  std::string host = t.substr(0, colon);
  if (host.front() == '[') {
    if (host.size() < 3 || host.back() != ']') throw ParallelError("parallel rendezvous \"" + text + "\"" + hint);
    host = host.substr(1, host.size() - 2);
  } else if (host.find(':') != std::string::npos) {
    throw ParallelError("parallel rendezvous \"" + text + "\": an IPv6 address goes in brackets" + hint);
  }
  uint64_t port = 0;
  if (!parse_uint(t.substr(colon + 1), 65535, &port))
    throw ParallelError("parallel rendezvous \"" + text + "\": the port must be 0..65535" + hint);
  return Endpoint{host, static_cast<uint16_t>(port)};
}

std::chrono::milliseconds parse_timeout(const std::string& text) {
  const std::string hint = " (write seconds, e.g. 30, 30s, 500ms or 2m)";
  const auto t = trim(text);
  size_t digits = 0;
  while (digits < t.size() && t[digits] >= '0' && t[digits] <= '9') ++digits;
  uint64_t n = 0;
  if (!parse_uint(t.substr(0, digits), 1000000000ull, &n))
    throw ParallelError("parallel timeout \"" + text + "\" is not a duration" + hint);
  const auto unit = trim(t.substr(digits));
  uint64_t ms = 0;
  if (unit.empty() || unit == "s") ms = n * 1000;
  else if (unit == "ms") ms = n;
  else if (unit == "m" || unit == "min") ms = n * 60000;
  else throw ParallelError("parallel timeout \"" + text + "\": unknown unit \"" + unit + "\"" + hint);
  if (ms == 0) throw ParallelError("parallel timeout \"" + text + "\" must be positive" + hint);
  return std::chrono::milliseconds(ms);
}

std::string format_duration(std::chrono::milliseconds d) {
  char buf[48];
  const auto ms = d.count();
  if (ms < 1000) std::snprintf(buf, sizeof buf, "%lld ms", static_cast<long long>(ms));
  else if (ms % 1000 == 0) std::snprintf(buf, sizeof buf, "%lld s", static_cast<long long>(ms / 1000));
  else std::snprintf(buf, sizeof buf, "%.1f s", static_cast<double>(ms) / 1000.0);
  return buf;
}

std::pair<int64_t, int64_t> stage_layers(int64_t num_layers, int stage, int stages) {
  if (stages <= 0 || stages > num_layers)
    throw ParallelError("the stage plan splits " + std::to_string(num_layers) + " layers over " +
                        std::to_string(stages) + " ranks: use 1.." + std::to_string(num_layers) + " ranks");
  if (stage < 0 || stage >= stages)
    throw ParallelError("stage " + std::to_string(stage) + " is outside 0.." + std::to_string(stages - 1));
  return {stage * num_layers / stages, (stage + 1) * num_layers / stages};
}

ParallelConfig::ParallelConfig() : devices_{c10::Device(c10::kCPU)} {}

ParallelConfig::ParallelConfig(Plan plan, std::vector<c10::Device> devices, int rank, Endpoint rendezvous,
                               std::chrono::milliseconds timeout)
    : plan_(plan), devices_(std::move(devices)), rank_(rank), rendezvous_(std::move(rendezvous)), timeout_(timeout) {
  if (devices_.empty())
    throw ParallelError("parallel devices are empty: give one device per rank (e.g. cpu:4 or cuda:0,cuda:1)");
  if (rank_ < 0 || rank_ >= world_size())
    throw ParallelError("parallel rank " + std::to_string(rank_) + " is outside 0.." +
                        std::to_string(world_size() - 1) + " (one rank per device of \"" + describe() + "\")");
  if (plan_ == Plan::kSingle && world_size() != 1)
    throw ParallelError("the single plan runs on one device, got " + std::to_string(world_size()) +
                        ": give one device, or choose parallel=step or parallel=stage");
  std::set<c10::DeviceIndex> gpus;
  for (const auto& d : devices_) {
    if (d.is_cpu()) continue;
    if (!d.is_cuda())
      throw ParallelError("parallel device " + d.str() + " is not supported: use cpu or cuda:<index>");
    if (!gpus.insert(d.index()).second)
      throw ParallelError("parallel device " + d.str() + " is listed twice: each rank needs its own GPU");
  }
  if (timeout_.count() <= 0) throw ParallelError("parallel timeout must be positive (e.g. 30s)");
  if (rendezvous_.host.empty()) throw ParallelError("parallel rendezvous host is empty (write host:port)");
}

ParallelConfig ParallelConfig::parse(const std::string& plan, const std::string& devices, int rank,
                                     const std::string& rendezvous, const std::string& timeout) {
  return ParallelConfig(parse_plan(plan), parse_devices(devices), rank, parse_endpoint(rendezvous),
                        parse_timeout(timeout));
}

ParallelConfig ParallelConfig::with_rank(int rank) const {
  return ParallelConfig(plan_, devices_, rank, rendezvous_, timeout_);
}

ParallelConfig ParallelConfig::with_port(uint16_t port) const {
  auto r = rendezvous_;
  r.port = port;
  return ParallelConfig(plan_, devices_, rank_, r, timeout_);
}

std::string ParallelConfig::describe() const {
  std::string devs;
  for (size_t i = 0; i < devices_.size(); ++i) devs += (i ? "," : "") + devices_[i].str();
  return std::string(plan_name(plan_)) + " rank " + std::to_string(rank_) + "/" + std::to_string(world_size()) +
         " on " + (devices_.empty() ? std::string("?") : devs) + ", rendezvous " + rendezvous_.host + ":" +
         std::to_string(rendezvous_.port) + ", timeout " + format_duration(timeout_);
}

}  // namespace liveavatar::parallel
