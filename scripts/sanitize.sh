#!/usr/bin/env bash
# The sanitizer pass of `make test`: a second build folder with AddressSanitizer + UndefinedBehaviorSanitizer
# (LeakSanitizer included) over the engine, the neural backend and its components (weights readers, DiT, VAE, audio
# and text encoders, the parallel plans' element path), the puppet, the plugin, the planner and their tests. LibTorch
# itself is not instrumented (the PyPI wheel); the project's code that calls it is.
#   scripts/sanitize.sh [BUILD_DIR] [meson test args...]     (default BUILD_DIR: build/asan)
# The main build (BUILD_DIR's parent, or SANITIZE_MAIN_BUILD) decides whether LibTorch is in: a main build without it
# gives a pass without it. Only the targets the chosen tests need are built (docs/hardening.md has the CI time).
# Leaks: LeakSanitizer runs in every test of the pass, with tests/hardening/lsan.supp (one-time allocations of GLib,
# GStreamer and LibTorch only, each entry explained there). Writes BUILD_DIR/meson-logs/testlog.junit.xml.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-build/asan}; shift || true
main=${SANITIZE_MAIN_BUILD:-$(dirname "$dir")}
torch=
if [ -f "$main/build.ninja" ] && meson introspect --tests "$main" 2>/dev/null | grep -q '"engine-neural"'; then
  torch=$(meson introspect --buildoptions "$main" | python3 -c \
    'import json,sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "libtorch_dir"))')
fi
if [ -f "$dir/build.ninja" ] && ! meson introspect --buildoptions "$dir" | python3 -c \
    'import json,sys; sys.exit(next(o["value"] for o in json.load(sys.stdin) if o["name"] == "libtorch_dir") != sys.argv[1])' \
    "$torch"; then
  rm -rf "$dir"  # configured for the other kind of main build
fi
if [ ! -f "$dir/build.ninja" ]; then
  echo "[sanitize] configuring $dir (ASan + UBSan, $([ -n "$torch" ] && echo "with LibTorch" || echo "no LibTorch"))"
  meson setup "$dir" -Dlibtorch_dir="$torch" -Dcuda=disabled --buildtype=debugoptimized \
    -Db_sanitize=address,undefined -Db_lundef=false >/dev/null || exit 1
fi
# The tests of the pass: the suites below, less
#  - element-neural-cycles: it measures malloc's bytes in use and the resident floor, which ASan's allocator and its
#    quarantine change by design (LeakSanitizer covers what it looks for; the main build runs it);
#  - the fuzz targets (a clang build of their own, already with ASan + UBSan) and the soak (quarantine again);
#  - the pipeline suite: gst-launch-1.0 and Python are not instrumented and cannot load the ASan plugin.
suites=(engine gst hardening planner weights text)
skip=(element-neural-cycles fuzz)
mapfile -t tests < <(meson introspect --tests "$dir" | python3 -c '
import json, sys
suites, skip = sys.argv[1].split(), sys.argv[2].split()
for t in json.load(sys.stdin):
    if t["name"] not in skip and any(s.split(":")[-1] in suites for s in t["suite"]):
        print(t["name"])' "${suites[*]}" "${skip[*]}")
mapfile -t targets < <(meson introspect --tests --targets "$dir" | python3 -c '
import json, os, sys
info = json.load(sys.stdin)
ids = {t["id"]: t for t in info["targets"]}
build = os.path.realpath(sys.argv[1])
for t in info["tests"]:
    if t["name"] in sys.argv[2:]:
        for d in t["depends"]:
            if d in ids:
                for f in ids[d]["filename"]:
                    print(os.path.relpath(f, build))' "$dir" "${tests[@]}" | sort -u)
echo "[sanitize] building $dir (${#targets[@]} targets for ${#tests[@]} tests)"
start=$(date +%s)
nice -n 5 ninja -C "$dir" "${targets[@]}" >/dev/null || { ninja -C "$dir" "${targets[@]}" | tail -n 30; exit 1; }
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
# SentencePiece is loaded into a link-map namespace of its own (dlmopen, engine/src/spm); an instrumented copy would
# bring a second ASan runtime there, which ASan refuses. The main build's (uninstrumented) module is used instead.
if [ -n "$torch" ]; then export LIVEAVATAR_SPM_MODULE=$PWD/$main/engine/src/spm/liveavatar-spm.so; fi
# Timing premises that ASan's speed breaks (no report; the main build runs them): the tests that cut or delete model
# files at a moment picked by the load's progress messages (they reach the test after the load has passed it), and
# the bound of 1 s on READY->PAUSED while the model loads (6.8 s here under ASan), and the live tests' bounds on the
# CPU share while a block is awaited (no busy loop: 30 %), which the Silero voice-activity model alone exceeds when
# every allocation goes through ASan (8.6 s of CPU in 12 s).
filter=NeuralFaults.ModelFolderDisappearsWhileTheModelLoads:NeuralFaults.DitShardTruncatedWhileTheModelLoads
filter+=:NeuralFaults.LoraTruncatedWhileTheModelLoads:ElementNeural.ModelLoadsOnAWorkerWithProgress
filter+=:Latency.BlockModelReportsBlockPlusProcessingWithoutBusyLoop:Latency.NoBusyLoopWhileALateBlockIsMade
filter+=:LagPolicy.WaitShowsEveryFrameAndTheLatencyGrows
export GTEST_FILTER=-$filter
start=$(date +%s)
# -t 3: ASan slows the project's own code 2-3x (LibTorch's kernels run at full speed).
meson test -C "$dir" --print-errorlogs --num-processes 2 --no-rebuild -t 3 "${tests[@]}" "$@"
rc=$?
echo "[sanitize] tests ran in $(( $(date +%s) - start )) s"
exit $rc
