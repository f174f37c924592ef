#!/usr/bin/env bash
# Installs everything gst-liveavatar needs on a fresh Debian 12 machine, then configures build/.
# Idempotent: a second run only checks. Run as root or with sudo available.
#   scripts/setup.sh            Debian packages + venv with LibTorch + meson configure
#   SKIP_APT=1 scripts/setup.sh skip the package step (packages already present)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0   # keep in step with the GPU machines (DESIGN.md section 5)
SILERO_VAD_VERSION=6.2.3  # the TorchScript Silero VAD model for the stats' "speaking" (engine/src/vad/)
VENV=.venv
BUILD=build

say() { printf '[setup] %s\n' "$*"; }

APT_PACKAGES=(
  # toolchain
  g++ meson ninja-build pkg-config ccache python3 python3-venv
  # GStreamer: headers, check library, plugins used by the pipelines and tests, tools
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-tools
  gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad
  gstreamer1.0-plugins-ugly gstreamer1.0-libav
  # puppet backend: OpenCV image ops + Haar cascades
  libopencv-core-dev libopencv-imgproc-dev libopencv-objdetect-dev opencv-data
  # engine tools and tests: PNG / WAV I/O, JSON, GoogleTest; the umT5 tokenizer (SentencePiece)
  libpng-dev libsndfile1-dev nlohmann-json3-dev libgtest-dev googletest libsentencepiece-dev
  # libFuzzer targets for the checkpoint readers
  clang libclang-rt-14-dev
  # checks: ffprobe, an RTMP server for the streaming test, ss (waits for the SRT listener)
  ffmpeg nginx libnginx-mod-rtmp iproute2
  # examples and integration tests: PyGObject + typelibs (appsink, webrtcbin), ICE for webrtcbin, a headless browser
  # and websockets for the WebRTC preview test
  python3-gi python3-gst-1.0 gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0 gstreamer1.0-nice
  chromium python3-websockets
  # parallel runtime: Gloo's headers for LibTorch's c10d::ProcessGroupGloo (the wheel ships none; nothing is linked)
  libgloo-dev
)

if [ "${SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    say "installing ${#missing[@]} Debian packages: ${missing[*]}"
    $SUDO apt-get update -q
    # nginx must not start a system-wide server: the RTMP test runs its own on loopback.
    $SUDO env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    say "Debian packages present"
  fi
fi

# LibTorch comes from the pinned PyPI wheel (its torch/include + torch/lib). --no-deps: the CUDA libraries come from
# the toolkit (below), not from the nvidia-* wheels torch would pull in.
if [ ! -f "$VENV/.torch-$TORCH_VERSION" ]; then
  say "creating $VENV with torch==$TORCH_VERSION (about 530 MB download, a few minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check --progress-bar off --no-deps "torch==$TORCH_VERSION"
  touch "$VENV/.torch-$TORCH_VERSION"
else
  say "LibTorch $TORCH_VERSION present in $VENV"
fi

# Silero VAD (the element's "speaking" in its stats messages): only its TorchScript file is used, run by LibTorch,
# so the package comes without its dependencies.
if [ ! -f "$VENV/.silero-vad-$SILERO_VAD_VERSION" ]; then
  say "installing silero-vad==$SILERO_VAD_VERSION into $VENV (its TorchScript model, 2 MB)"
  "$VENV/bin/pip" install -q --disable-pip-version-check --progress-bar off --no-deps "silero-vad==$SILERO_VAD_VERSION"
  touch "$VENV/.silero-vad-$SILERO_VAD_VERSION"
else
  say "silero-vad $SILERO_VAD_VERSION present in $VENV"
fi

# CUDA: with the toolkit (nvcc) present the build links LibTorch's CUDA libraries and NCCL and compiles the
# project's kernels (meson -Dcuda=enabled), GPU or not. libtorch_cuda.so also needs cuSPARSELt, cuFile and NVSHMEM,
# which the toolkit lacks: their wheels (the versions torch 2.11.0 names) go into the venv, where the torch wheel's
# RPATH looks for them (about 235 MB). LIVEAVATAR_CUDA=disabled builds without CUDA.
NVCC=$(command -v nvcc || true)
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
CUDA=${LIVEAVATAR_CUDA:-$([ -n "$NVCC" ] && echo enabled || echo disabled)}
CUDA_WHEELS=(nvidia-cusparselt-cu13==0.8.0 nvidia-nvshmem-cu13==3.4.5 nvidia-cufile==1.15.1.6)
if [ "$CUDA" = enabled ]; then
  if [ ! -f "$VENV/.cuda-wheels-1" ]; then
    say "CUDA toolkit found ($NVCC): installing ${CUDA_WHEELS[*]} into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --progress-bar off --no-deps "${CUDA_WHEELS[@]}"
    touch "$VENV/.cuda-wheels-1"
  else
    say "CUDA libraries for LibTorch present in $VENV"
  fi
  export PATH="$(dirname "$NVCC"):$PATH"
else
  say "building without CUDA (no nvcc, or LIVEAVATAR_CUDA=$CUDA)"
fi

if [ ! -f "$BUILD/build.ninja" ]; then
  say "configuring $BUILD/ (cuda=$CUDA)"
  meson setup "$BUILD" --buildtype=release -Dlibtorch_dir="$VENV" -Dcuda="$CUDA"
else
  current=$(python3 -c 'import json,sys; print(next((o["value"] for o in json.load(open(sys.argv[1])) if o["name"] == "cuda"), ""))' \
            "$BUILD/meson-info/intro-buildoptions.json" 2>/dev/null || true)
  if [ "$current" != "$CUDA" ]; then
    say "reconfiguring $BUILD/ with cuda=$CUDA (was ${current:-unset})"
    meson setup --reconfigure "$BUILD" --buildtype=release -Dlibtorch_dir="$VENV" -Dcuda="$CUDA"
  else
    say "$BUILD/ already configured (cuda=$CUDA)"
  fi
fi
