#!/usr/bin/env bash
# The long soak: an hour of speech (or SECONDS) through the element, accelerated (tests/hardening/test_soak.cpp:
# live-like 10-30 ms buffers, a new picture every twelfth of the run, 4 flushes; no frame lost or duplicated, drift
# under one frame, resident memory growth under 1%). `make test` runs the same test on 600 s of speech.
#   scripts/soak.sh [SECONDS] [BUILD_DIR]        (defaults: 3600, build)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3600}
build=${2:-build}
ninja -C "$build" tests/hardening/test-soak gst-plugin/libgstliveavatar.so >/dev/null
LIVEAVATAR_SOAK_SECONDS=$seconds /usr/bin/time -f "soak: %e s wall, %M KiB peak RSS" \
  meson test -C "$build" --no-rebuild --print-errorlogs -v -t 100 soak 2>&1 | grep -E '^soak:|OK|FAIL|Failure|Expected|RSS'
