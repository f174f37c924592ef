// Voice activity: Silero VAD (TorchScript, run with LibTorch) or an energy gate. SPDX-License-Identifier: LGPL-2.1-or-later
#include "liveavatar/vad.h"

#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <vector>

#ifdef LIVEAVATAR_VAD_TORCH
#include <dlfcn.h>
#include <torch/script.h>
#endif

#ifndef LIVEAVATAR_VAD_MODEL
#define LIVEAVATAR_VAD_MODEL ""
#endif

namespace liveavatar {

namespace {
constexpr int kRate = 16000;

#ifdef LIVEAVATAR_VAD_TORCH
// LibTorch runs its ops on an OpenMP thread pool. For a model this small that only costs: on a busy machine each
// window waits for the other cores (measured: 32 s instead of 0.9 s for the 27.5 s example on 2 loaded cores).
// OpenMP's thread count is per calling thread, so the thread that runs the VAD is set to one thread after its first
// LibTorch call (LibTorch sets its own default at that call); other threads (the model's) keep theirs.
void one_openmp_thread_here() {
  thread_local bool done = false;
  if (done) return;
  done = true;
  using SetThreads = void (*)(int);
  static const auto set_threads = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  if (set_threads) set_threads(1);
}
#endif

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
}  // namespace

std::string default_vad_model() {
  const char* env = std::getenv("LIVEAVATAR_VAD_MODEL");
  if (env && *env) return env;
  return LIVEAVATAR_VAD_MODEL;
}

struct VoiceActivity::Impl {
  VadOptions options;
  std::string kind = "energy";
  std::string warning;
  std::vector<float> window;  // the incomplete window
  int64_t samples = 0;
  bool speaking = false;
  float probability = 0.f;
  int64_t quiet = 0;  // samples since the probability fell under `release` while speaking
  bool streaming = false;  // judge() called from push() (not the warm-up on the constructing thread)
#ifdef LIVEAVATAR_VAD_TORCH
  torch::jit::Module module;
#endif

  // The speech probability of one window of kWindow samples.
  float judge(const float* w) {
#ifdef LIVEAVATAR_VAD_TORCH
    if (kind == "silero") {
      c10::InferenceMode guard;
      const auto x = at::from_blob(const_cast<float*>(w), {1, kWindow}, at::kFloat).clone();
      const float p = module.forward({x, static_cast<int64_t>(kRate)}).toTensor().item<float>();
      if (streaming) one_openmp_thread_here();
      return p;
    }
#endif
    double sum = 0;
    for (int i = 0; i < kWindow; ++i) sum += static_cast<double>(w[i]) * w[i];
    const double rms = std::sqrt(sum / kWindow);
    return 20.0 * std::log10(rms + 1e-12) >= options.energy_db ? 1.f : 0.f;
  }

  // Silero's VADIterator rule: start at `threshold`; under `release` for min_silence_ms ends it.
  void update(float p) {
    probability = p;
    if (p >= options.threshold) {
      speaking = true;
      quiet = 0;
    } else if (speaking && p < options.release) {
      quiet += kWindow;
      if (quiet * 1000 >= static_cast<int64_t>(options.min_silence_ms) * kRate) {
        speaking = false;
        quiet = 0;
      }
    } else if (speaking) {
      quiet = 0;
    }
  }

  void reset_model() {
#ifdef LIVEAVATAR_VAD_TORCH
    if (kind == "silero") module.get_method("reset_states")({});
#endif
  }
};

VoiceActivity::VoiceActivity(const VadOptions& options) : impl_(std::make_unique<Impl>()) {
  impl_->options = options;
  const std::string path = options.model.empty() ? default_vad_model() : options.model;
  impl_->window.reserve(kWindow);
#ifdef LIVEAVATAR_VAD_TORCH
  if (path.empty()) {
    impl_->warning = "no Silero VAD model file is known (set LIVEAVATAR_VAD_MODEL to silero_vad/data/silero_vad.jit "
                     "of the PyPI package silero-vad, which scripts/setup.sh installs): an energy gate decides who "
                     "is speaking";
  } else if (!is_file(path)) {
    impl_->warning = "the Silero VAD model " + path + " does not exist (install the PyPI package silero-vad with "
                     "scripts/setup.sh, or point LIVEAVATAR_VAD_MODEL or vad-model at silero_vad.jit): an energy "
                     "gate decides who is speaking";
  } else {
    try {
      impl_->module = torch::jit::load(path);
      impl_->module.eval();
      impl_->kind = "silero";
      // TorchScript optimises the graph during the first calls, which takes a while (seconds on a loaded machine):
      // here, not in the middle of a live stream.
      const std::vector<float> quiet(kWindow, 0.f);
      for (int i = 0; i < 3; ++i) impl_->judge(quiet.data());
      impl_->reset_model();
    } catch (const std::exception& e) {
      impl_->kind = "energy";
      impl_->warning = "the Silero VAD model " + path + " cannot be loaded (" + std::string(e.what()).substr(0, 200) +
                       "): an energy gate decides who is speaking";
    }
  }
#else
  (void)path;
  (void)is_file;
  impl_->warning = "this engine was built without LibTorch, so Silero VAD cannot run: an energy gate decides who is "
                   "speaking";
#endif
}

VoiceActivity::~VoiceActivity() = default;

void VoiceActivity::push(const float* samples, size_t count) {
  Impl& m = *impl_;
  for (size_t i = 0; i < count;) {
    const size_t take = std::min(count - i, static_cast<size_t>(kWindow) - m.window.size());
    m.window.insert(m.window.end(), samples + i, samples + i + take);
    i += take;
    if (m.window.size() == static_cast<size_t>(kWindow)) {
      m.streaming = true;
      m.update(m.judge(m.window.data()));
      m.window.clear();
    }
  }
  m.samples += static_cast<int64_t>(count);
}

bool VoiceActivity::speaking() const { return impl_->speaking; }
float VoiceActivity::probability() const { return impl_->probability; }
int64_t VoiceActivity::samples() const { return impl_->samples; }
const std::string& VoiceActivity::kind() const { return impl_->kind; }
const std::string& VoiceActivity::warning() const { return impl_->warning; }

void VoiceActivity::reset() {
  Impl& m = *impl_;
  m.window.clear();
  m.samples = 0;
  m.speaking = false;
  m.probability = 0.f;
  m.quiet = 0;
  m.reset_model();
}

}  // namespace liveavatar
