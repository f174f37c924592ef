// Golden test of the flow-matching schedule and Euler step (tests/fixtures/dit/sampler.safetensors).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "golden_util.h"

namespace liveavatar::dit::test {
namespace {

TEST(SamplerGolden, ScheduleIsBitExact) {
  if (!have_fixture("sampler.safetensors")) GTEST_SKIP() << "no sampler.safetensors fixture";
  const auto ck = weights::load_safetensors(fixture("sampler.safetensors"));
  const auto s = make_schedule(ModelConfig::tiny());
  EXPECT_TRUE(at::equal(s.timesteps, ck.tensors.at("timesteps"))) << s.timesteps << ck.tensors.at("timesteps");
  EXPECT_TRUE(at::equal(s.sigmas, ck.tensors.at("sigmas"))) << s.sigmas << ck.tensors.at("sigmas");
}

TEST(SamplerGolden, EulerStepIsBitExact) {
  if (!have_fixture("sampler.safetensors")) GTEST_SKIP() << "no sampler.safetensors fixture";
  const auto ck = weights::load_safetensors(fixture("sampler.safetensors"));
  const auto s = make_schedule(ModelConfig::tiny());
  const int64_t step = ck.tensors.at("step.step_index").item<int64_t>();
  const auto out = euler_step(ck.tensors.at("step.sample"), ck.tensors.at("step.model_output"), s, step);
  EXPECT_TRUE(close(out, ck.tensors.at("step.prev_sample"), "euler step"));
  EXPECT_TRUE(at::equal(out, ck.tensors.at("step.prev_sample")));
}

TEST(Sampler, RejectsStepsOutsideTheSchedule) {
  const auto s = make_schedule(ModelConfig::tiny());
  const auto x = at::zeros({1});
  EXPECT_THROW(euler_step(x, x, s, 4), DitError);
  EXPECT_THROW(euler_step(x, x, s, -1), DitError);
}

}  // namespace
}  // namespace liveavatar::dit::test
