// The CUDA layer and the GPU code paths of the DiT. The CPU half runs everywhere (FP8 through at::_scaled_mm,
// the named attention kernels, random weights drawn on the device, a session asked for CUDA graphs on the CPU);
// the GPU half skips with the reason when this machine has no GPU and runs in scripts/gpu-check.sh where it has.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "cuda/cuda.h"
#include "dit/dit.h"
#include "model.h"
#include "parallel/communicator.h"
#include "parallel/nccl_communicator.h"

namespace liveavatar::test {
namespace {

using dit::AttentionKernel;
using dit::Fp8Compute;
using dit::LoadOptions;
using dit::Model;
using dit::ModelConfig;
using dit::Precision;
using dit::Session;
using dit::SessionOptions;

struct Inputs {
  at::Tensor ref, motion, text;
  std::vector<at::Tensor> audio;
};

Inputs make_inputs(const ModelConfig& cfg, int blocks, c10::ScalarType dtype = at::kFloat) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  Inputs in;
  in.ref = at::randn({16, 1, 8, 16}, gen).to(dtype);
  in.motion = at::randn({16, 19, 8, 16}, gen).to(dtype);
  in.text = at::randn({5, cfg.text_dim}, gen).to(dtype);
  for (int b = 0; b < blocks; ++b) in.audio.push_back(at::randn({cfg.audio_layers, cfg.audio_dim, 12}, gen).to(dtype));
  return in;
}

std::vector<at::Tensor> stream(const Model& model, const Inputs& in, SessionOptions options = {},
                               std::string* graph_status = nullptr) {
  c10::NoGradGuard no_grad;
  Session s(model, options);
  s.set_condition(in.ref, in.motion, in.text);
  std::vector<at::Tensor> out;
  for (const auto& a : in.audio) out.push_back(s.generate_block(a).latents.to(at::kCPU, at::kFloat));
  if (graph_status) *graph_status = s.graph_status();
  return out;
}

double max_abs_diff(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, (a[i] - b[i]).abs().max().item<double>());
  return m;
}
double max_abs(const std::vector<at::Tensor>& a) {
  double m = 0;
  for (const auto& t : a) m = std::max(m, t.abs().max().item<double>());
  return m;
}

LoadOptions options_on(c10::Device device, Precision precision) {
  LoadOptions o;
  o.device = device;
  o.precision = precision;
  return o;
}

const dit::LinearImpl& first_q(const Model& m) {
  return *m.module()->blocks[0]->as<dit::BlockImpl>()->self_attn->q;
}

// --- The build and the machine ---------------------------------------------------------------------------------
TEST(Cuda, TheBuildSaysWhetherItHasCuda) {
  EXPECT_EQ(cuda::built(), LIVEAVATAR_TEST_WITH_CUDA != 0);
  if (cuda::device_count() == 0) {
    EXPECT_FALSE(cuda::unavailable_reason().empty());
    EXPECT_FALSE(cuda::supports_fp8(c10::Device(c10::kCUDA, 0)));
    try {
      cuda::memory_stats(0);
      FAIL() << "memory_stats without a GPU must throw";
    } catch (const Error& e) {
      const std::string what = e.what();
      EXPECT_TRUE(what.find("not a GPU") != std::string::npos || what.find("no CUDA") != std::string::npos) << what;
    }
  }
  EXPECT_FALSE(cuda::supports_fp8(c10::Device(c10::kCPU)));
  cuda::synchronize(c10::Device(c10::kCPU));  // a no-op for the CPU
}

// --- FP8 -----------------------------------------------------------------------------------------------------
TEST(Fp8, ReferenceScalesByTheAbsoluteMaximumAndSaturates) {
  // Maxima of 3.5 and 1.75 give power-of-two scales (2^-7, 2^-8), and every x / scale here is an e4m3 value, so
  // dequantising gives x back exactly.
  auto x = at::tensor({0.5f, -1.75f, 1.0f, 0.25f, 3.5f, -1.0f, 0.0f, 3.0f}).view({2, 4});
  auto [q, s] = cuda::quantize_fp8_reference(x, /*per_row=*/false);
  EXPECT_EQ(q.scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_EQ(s.dim(), 0);
  EXPECT_FLOAT_EQ(s.item<float>(), 3.5f / 448.0f);
  EXPECT_FLOAT_EQ(q[1][0].to(at::kFloat).item<float>(), 448.0f);  // the maximum maps to e4m3's largest value
  EXPECT_TRUE(at::equal(q.to(at::kFloat) * s, x));
  auto [qr, sr] = cuda::quantize_fp8_reference(x, /*per_row=*/true);
  EXPECT_EQ(sr.sizes(), (std::vector<int64_t>{2, 1}));
  EXPECT_FLOAT_EQ(sr[0][0].item<float>(), 1.75f / 448.0f);
  EXPECT_FLOAT_EQ(sr[1][0].item<float>(), 3.5f / 448.0f);
  EXPECT_TRUE(at::equal(qr.to(at::kFloat) * sr, x));
  // A value between e4m3 steps rounds to the nearest: 3.1 / 2^-7 = 396.8 lies between 384 and 416 (steps of 32).
  auto [q3, s3] = cuda::quantize_fp8_reference(at::tensor({3.5f, 3.1f}), false);
  EXPECT_FLOAT_EQ(q3[1].to(at::kFloat).item<float>(), 384.0f);
  // An all-zero row keeps a finite scale.
  auto [qz, sz] = cuda::quantize_fp8_reference(at::zeros({3, 16}), true);
  EXPECT_TRUE(at::isfinite(sz).all().item<bool>());
  EXPECT_EQ(qz.to(at::kFloat).abs().sum().item<float>(), 0.0f);
}

// FP8 weights computed by at::_scaled_mm (activations quantised per call) against the dequantised bf16 matmul, over
// a streamed tiny model: the same weights, results within the activations' e4m3 rounding, and the path really taken.
void expect_scaled_mm_close(weights::Fp8Scaling scaling) {
  const auto cfg = ModelConfig::tiny();
  auto o = options_on(c10::kCPU, Precision::kFp8);
  o.fp8_scaling = scaling;
  o.fp8_compute = Fp8Compute::kDequantize;
  Model dequant(cfg, o, /*seed=*/3);
  o.fp8_compute = Fp8Compute::kScaledMm;
  Model scaled(cfg, o, /*seed=*/3);
  ASSERT_TRUE(first_q(scaled).is_fp8());
  EXPECT_TRUE(first_q(scaled).scaled_mm);
  EXPECT_FALSE(first_q(dequant).scaled_mm);
  EXPECT_TRUE(at::equal(first_q(scaled).weight_fp8.to(at::kFloat), first_q(dequant).weight_fp8.to(at::kFloat)));
  const auto in = make_inputs(cfg, 3);
  const auto a = stream(dequant, in), b = stream(scaled, in);
  const double diff = max_abs_diff(a, b), scale = max_abs(a);
  EXPECT_GT(diff, 0.0) << "the _scaled_mm path gave the dequantised result bit for bit: was it taken?";
  EXPECT_LT(diff, 0.1 * scale) << "diff " << diff << " of " << scale;
}
TEST(Fp8, ScaledMmPerTensorMatchesTheDequantisedPath) { expect_scaled_mm_close(weights::Fp8Scaling::kPerTensor); }
TEST(Fp8, ScaledMmRowwiseMatchesTheDequantisedPath) { expect_scaled_mm_close(weights::Fp8Scaling::kPerChannel); }

TEST(Fp8, AutoDequantisesOnTheCpu) {
  auto o = options_on(c10::kCPU, Precision::kFp8);
  Model m(ModelConfig::tiny(), o, 1);
  EXPECT_FALSE(first_q(m).scaled_mm);
}

// --- Random weights drawn on the device --------------------------------------------------------------------------
TEST(RandomModel, SeededPerDeviceAndShardable) {
  const auto cfg = ModelConfig::tiny();
  const auto o = options_on(c10::kCPU, Precision::kBf16);
  Model a(cfg, o, 7), b(cfg, o, 7), c(cfg, o, 8);
  const auto pa = a.module()->named_parameters(), pb = b.module()->named_parameters(),
             pc = c.module()->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  size_t differ = 0;
  for (const auto& kv : pa) {
    EXPECT_TRUE(at::equal(kv.value(), pb[kv.key()])) << kv.key();
    differ += at::equal(kv.value(), pc[kv.key()]) ? 0 : 1;
    EXPECT_TRUE(at::isfinite(kv.value().to(at::kFloat)).all().item<bool>()) << kv.key();
  }
  EXPECT_EQ(differ, pa.size()) << "another seed must change every tensor";
  EXPECT_EQ(a.parameter_count(), cfg.parameter_count());
  auto shard = o;
  shard.first_layer = 1;
  Model last(cfg, shard, 7);
  EXPECT_FALSE(last.has_embeddings());
  EXPECT_TRUE(last.has_head());
  EXPECT_LT(last.parameter_count(), a.parameter_count());
  // A random model streams (finite latents).
  const auto out = stream(a, make_inputs(cfg, 2, at::kBFloat16));
  for (const auto& t : out) EXPECT_TRUE(at::isfinite(t).all().item<bool>());
}

// --- Attention kernels -------------------------------------------------------------------------------------------
TEST(Attention, NamedKernelsAgreeOnTheCpu) {
  const auto cfg = ModelConfig::tiny();
  const auto in = make_inputs(cfg, 3);
  std::vector<at::Tensor> reference;
  for (auto kernel : {AttentionKernel::kAuto, AttentionKernel::kMath, AttentionKernel::kFlash}) {
    auto o = options_on(c10::kCPU, Precision::kFp32);
    o.attention = kernel;
    Model m(cfg, o, 2);
    const auto out = stream(m, in);
    if (reference.empty()) reference = out;
    EXPECT_LT(max_abs_diff(reference, out), 1e-3 * max_abs(reference)) << dit::attention_kernel_name(kernel);
  }
  EXPECT_EQ(dit::parse_attention_kernel("cudnn"), AttentionKernel::kCudnn);
  try {
    dit::parse_attention_kernel("fast");
    FAIL();
  } catch (const dit::DitError& e) {
    EXPECT_NE(std::string(e.what()).find("auto, flash, efficient, cudnn or math"), std::string::npos);
  }
}

// --- CUDA graphs ---------------------------------------------------------------------------------------------------
TEST(Graphs, ACpuSessionRunsEagerAndSaysWhy) {
  const auto cfg = ModelConfig::tiny();
  Model m(cfg, options_on(c10::kCPU, Precision::kFp32), 4);
  const auto in = make_inputs(cfg, 6);  // past clip 0: the sink refresh clears the graphs
  SessionOptions with;
  with.cuda_graphs = true;
  std::string status;
  const auto a = stream(m, in), b = stream(m, in, with, &status);
  EXPECT_EQ(max_abs_diff(a, b), 0.0);
  EXPECT_EQ(status.rfind("eager: ", 0), 0u) << status;
  std::string off;
  stream(m, make_inputs(cfg, 1), {}, &off);
  EXPECT_EQ(off, "off");
}

// --- NCCL ---------------------------------------------------------------------------------------------------------
TEST(Nccl, WithoutAGpuItRefusesAndSaysWhy) {
  if (cuda::device_count() > 0) GTEST_SKIP() << "this machine has a GPU (the Gpu tests cover NCCL)";
  auto cfg = parallel::ParallelConfig::parse("single", "cuda:0", 0, "127.0.0.1:0", "2s");
  auto rv = parallel::Rendezvous::open(cfg);
  try {
    parallel::connect_nccl(cfg.with_port(rv.port()), rv);
    FAIL() << "connect_nccl without a GPU must throw";
  } catch (const parallel::ParallelError& e) {
    const std::string what = e.what();
    EXPECT_TRUE(what.find(parallel::nccl_built() ? "cuda:0" : "needs a build with CUDA") != std::string::npos) << what;
  }
  EXPECT_EQ(parallel::nccl_built(), LIVEAVATAR_TEST_WITH_CUDA != 0);
}

// --- On a GPU ------------------------------------------------------------------------------------------------------
class Gpu : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::device_count() == 0) GTEST_SKIP() << cuda::unavailable_reason();
  }
  const c10::Device dev{c10::kCUDA, 0};
};

TEST_F(Gpu, QuantiseKernelEqualsTheReferenceBitForBit) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  for (auto dtype : {at::kFloat, at::kBFloat16})
    for (bool per_row : {false, true})
      for (auto shape : {std::vector<int64_t>{1, 7}, {33, 5120}, {3168, 5120}, {300, 13824}}) {
        auto x = (at::randn(shape, gen) * 3.0).to(dtype).to(dev);
        auto [q, s] = cuda::quantize_fp8_e4m3(x, per_row);
        auto [rq, rs] = cuda::quantize_fp8_reference(x, per_row);
        EXPECT_TRUE(at::equal(s, rs)) << "scale " << c10::str(shape) << " per_row " << per_row;
        EXPECT_TRUE(at::equal(q.view(at::kByte), rq.view(at::kByte))) << c10::str(shape) << " per_row " << per_row;
      }
}

TEST_F(Gpu, Fp8ScaledMmMatchesTheDequantisedPath) {
  const auto cfg = ModelConfig::tiny();
  auto o = options_on(dev, Precision::kFp8);
  o.fp8_compute = Fp8Compute::kDequantize;
  Model dequant(cfg, o, 3);
  o.fp8_compute = Fp8Compute::kAuto;
  Model autom(cfg, o, 3);
  EXPECT_EQ(first_q(autom).scaled_mm, cuda::supports_fp8(dev));
  if (!cuda::supports_fp8(dev)) GTEST_SKIP() << "this GPU has no FP8 tensor cores (sm_89+)";
  const auto in = make_inputs(cfg, 3, at::kBFloat16);
  const auto a = stream(dequant, in), b = stream(autom, in);
  EXPECT_LT(max_abs_diff(a, b), 0.1 * max_abs(a));
}

TEST_F(Gpu, GraphReplayEqualsEagerOverTheSinkRefresh) {
  const auto cfg = ModelConfig::tiny();
  Model m(cfg, options_on(dev, Precision::kBf16), 4);
  const auto in = make_inputs(cfg, 8, at::kBFloat16);
  SessionOptions with;
  with.cuda_graphs = true;
  std::string status;
  const auto eager = stream(m, in), graphed = stream(m, in, with, &status);
  EXPECT_EQ(status.rfind("eager", 0), std::string::npos) << status;
  EXPECT_NE(status.find("replays"), std::string::npos) << status;
  EXPECT_LT(max_abs_diff(eager, graphed), 1e-2 * max_abs(eager)) << status;
}

// The stage plan on the machine's GPU(s): four layer-range shards in one process (all on cuda:0 when it is the only
// GPU; NCCL cannot put two ranks on one GPU) reproduce the single model over 5 blocks with the sink refresh.
TEST_F(Gpu, FourStageShardsEqualTheSingleModel) {
  auto cfg = ModelConfig::tiny();
  cfg.num_layers = 4;
  cfg.audio_inject_layers = {0, 1, 3};
  const auto single_options = options_on(dev, Precision::kBf16);
  Model single(cfg, single_options, 6);
  weights::Checkpoint ck;
  for (const auto& p : single.module()->named_parameters(/*recurse=*/true)) ck.tensors[p.key()] = p.value().cpu();
  ck.files.push_back("memory");
  std::vector<std::unique_ptr<Model>> shards;
  std::vector<const Model*> chain;
  const int gpus = cuda::device_count();
  for (int k = 0; k < 4; ++k) {
    auto o = options_on(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(k % gpus)), Precision::kBf16);
    o.first_layer = k;
    o.last_layer = k + 1;
    shards.push_back(std::make_unique<Model>(cfg, ck, o));
    chain.push_back(shards.back().get());
  }
  const auto in = make_inputs(cfg, 5, at::kBFloat16);
  const auto a = stream(single, in);
  c10::NoGradGuard no_grad;
  Session s(chain, {});
  s.set_condition(in.ref, in.motion, in.text);
  std::vector<at::Tensor> b;
  for (const auto& x : in.audio) b.push_back(s.generate_block(x).latents.to(at::kCPU, at::kFloat));
  EXPECT_EQ(max_abs_diff(a, b), 0.0);
}

// kv-precision=fp8 on the GPU: the rings and the sink in float8_e4m3fn, read back in bf16; the latents stay near
// bf16 caches' over 5 blocks (the refresh included) and the same under CUDA graphs.
TEST_F(Gpu, Fp8KvCachesStayNearBf16Caches) {
  const auto cfg = ModelConfig::tiny();
  const auto in = make_inputs(cfg, 5, at::kBFloat16);
  Model m(cfg, options_on(dev, Precision::kBf16), 4);
  const auto base = stream(m, in);
  SessionOptions fp8;
  fp8.kv_dtype = at::kFloat8_e4m3fn;
  const auto narrow = stream(m, in, fp8);
  fp8.cuda_graphs = true;
  const auto graphed = stream(m, in, fp8);
  EXPECT_LT(max_abs_diff(base, narrow), 5e-2 * max_abs(base));
  EXPECT_LT(max_abs_diff(narrow, graphed), 1e-2 * max_abs(base));
}

TEST_F(Gpu, AttentionKernelsAgreeWithMath) {
  const auto cfg = ModelConfig::tiny();
  const auto in = make_inputs(cfg, 3, at::kBFloat16);
  std::vector<at::Tensor> reference;
  for (auto kernel : {AttentionKernel::kMath, AttentionKernel::kAuto, AttentionKernel::kFlash,
                      AttentionKernel::kEfficient, AttentionKernel::kCudnn}) {
    auto o = options_on(dev, Precision::kBf16);
    o.attention = kernel;
    Model m(cfg, o, 2);
    try {
      const auto out = stream(m, in);
      if (reference.empty()) reference = out;
      EXPECT_LT(max_abs_diff(reference, out), 5e-2 * max_abs(reference)) << dit::attention_kernel_name(kernel);
    } catch (const std::exception& e) {
      ADD_FAILURE() << dit::attention_kernel_name(kernel) << " refused the tiny shapes: " << e.what();
    }
  }
}

TEST_F(Gpu, NcclWorldOfOneJoinsBroadcastsAndRefusesAMismatchedPeer) {
  auto cfg = parallel::ParallelConfig::parse("single", "cuda:0", 0, "127.0.0.1:0", "20s");
  auto rv = parallel::Rendezvous::open(cfg);
  auto comm = parallel::connect_nccl(cfg.with_port(rv.port()), rv);
  EXPECT_EQ(comm->backend(), "nccl");
  auto t = at::arange(16, at::TensorOptions().dtype(at::kFloat).device(dev));
  comm->broadcast(t, 0);
  EXPECT_TRUE(at::equal(t.cpu(), at::arange(16, at::kFloat)));
  comm->barrier();
  auto cpu_tensor = at::zeros({4});
  EXPECT_THROW(comm->broadcast(cpu_tensor, 0), parallel::ParallelError);
}

TEST_F(Gpu, MemoryCapRefusesBeyondItAndStatsCount) {
  cuda::reset_peak_memory(0);
  const auto before = cuda::memory_stats(0);
  {
    auto t = at::empty({256 << 20}, at::TensorOptions().dtype(at::kByte).device(dev));
    const auto during = cuda::memory_stats(0);
    EXPECT_GE(during.allocated - before.allocated, 256u << 20);
    EXPECT_GE(during.peak_allocated, during.allocated);
  }
  cuda::set_memory_cap(0, 1ull << 30);
  EXPECT_THROW(at::empty({2ll << 30}, at::TensorOptions().dtype(at::kByte).device(dev)), c10::OutOfMemoryError);
  cuda::set_memory_cap(0, cuda::device_info(0).total_bytes);
  EXPECT_THROW(cuda::set_memory_cap(0, 0), Error);
}

}  // namespace
}  // namespace liveavatar::test
