#!/usr/bin/env bash
# The sanitizer pass of `make test`: a second build folder with AddressSanitizer + UndefinedBehaviorSanitizer
# (LeakSanitizer included) and WITHOUT LibTorch: the engine core, the puppet backend, the plugin, the planner and
# their tests. The LibTorch parts (weights readers, DiT, VAE, audio/text encoders, the neural backend) are left out
# to keep CI time bounded: each of their translation units takes 1-2 minutes to compile, several times that with
# ASan, and running the neural tests under ASan would take longer still (docs/hardening.md has the figures).
#   scripts/sanitize.sh [BUILD_DIR] [meson test args...]     (default BUILD_DIR: build/asan)
# Leaks: LeakSanitizer runs in every test of the pass, with tests/hardening/lsan.supp (GLib/GStreamer one-time
# allocations only, each entry explained there). Writes BUILD_DIR/meson-logs/testlog.junit.xml.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/asan}; shift || true
suites=(--suite engine --suite gst --suite hardening --suite planner)
if [ ! -f "$dir/build.ninja" ]; then
  echo "[sanitize] configuring $dir (ASan + UBSan, no LibTorch)"
  meson setup "$dir" -Dlibtorch_dir= -Dcuda=disabled --buildtype=debugoptimized \
    -Db_sanitize=address,undefined -Db_lundef=false >/dev/null || exit 1
fi
echo "[sanitize] building $dir"
start=$(date +%s)
nice -n 5 ninja -C "$dir" >/dev/null || { ninja -C "$dir" | tail -n 30; exit 1; }
echo "[sanitize] built in $(( $(date +%s) - start )) s"
supp=$PWD/tests/hardening/lsan.supp
# halt_on_error + abort: a report fails the test. detect_leaks=1: LeakSanitizer at each test's exit;
# fast_unwind_on_malloc=0: whole allocation stacks through GLib (built without frame pointers) in leak reports.
# GST_REGISTRY_FORK=no: the plugin scanner is a separate, uninstrumented program that cannot load an ASan plugin,
# so plugins are scanned in the (instrumented) test process.
export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1:abort_on_error=1:fast_unwind_on_malloc=0:print_summary=1
export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1:print_summary=1
export LSAN_OPTIONS=suppressions=$supp:print_suppressions=1
export GST_REGISTRY_FORK=no
start=$(date +%s)
meson test -C "$dir" --print-errorlogs --num-processes 2 --no-rebuild "${suites[@]}" "$@"
rc=$?
echo "[sanitize] tests ran in $(( $(date +%s) - start )) s"
exit $rc
