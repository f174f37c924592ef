#!/usr/bin/env bash
# The long soak: an hour of speech (or SECONDS) through the element, accelerated (tests/hardening/test_soak.cpp:
# live-like 10-30 ms buffers, a new picture every twelfth of the run, 4 flushes; no frame lost or duplicated, drift
# under one frame, resident memory growth under 1%). `make test` runs the same test on 600 s of speech.
# --neural: the same through backend=liveavatar on the make-tiny checkpoint (64x64; LibTorch builds), default 600 s
# of speech (a few minutes here); `make test` runs it on 40 s.
#   scripts/soak.sh [--neural] [SECONDS] [BUILD_DIR]        (defaults: 3600 / --neural 600, build)
set -euo pipefail
cd "$(dirname "$0")/.."
target=test-soak
name=soak
default=3600
if [ "${1:-}" = --neural ]; then
  target=test-soak-neural
  name=soak-neural
  default=600
  shift
fi
seconds=${1:-$default}
build=${2:-build}
ninja -C "$build" "tests/hardening/$target" gst-plugin/libgstliveavatar.so >/dev/null
LIVEAVATAR_SOAK_SECONDS=$seconds /usr/bin/time -f "soak: %e s wall, %M KiB peak RSS" \
  meson test -C "$build" --no-rebuild --print-errorlogs -v -t 100 "$name" 2>&1 |
  grep -E '^soak:|OK|FAIL|Failure|Expected|RSS'
