#!/usr/bin/env bash
# Builds the element's libFuzzer target (tests/fuzz/element_fuzzer.cpp) with clang: the plugin, the engine core and
# the puppet backend instrumented (-fsanitize=fuzzer-no-link,address,undefined), GStreamer and OpenCV linked as the
# system has them. Then runs it for a bounded time on the seeds of tests/fuzz/corpus/element_fuzzer/.
#   tests/fuzz/run_element.sh SOURCE_ROOT BUILD_DIR SECONDS [extra libFuzzer args...]
# Skips (exit 77) when clang++ cannot build a fuzzer here. A crash, a sanitizer report or a hang (-timeout) leaves a
# crash-*/timeout-* file in BUILD_DIR and fails. Objects are rebuilt only when a source or header is newer.
set -euo pipefail
src=${1:?source root}
out=${2:?build dir}
secs=${3:-60}
shift 3 || true
cxx=${CXX_FUZZ:-clang++}
mkdir -p "$out/obj"
probe="$out/probe.cpp"
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' > "$probe"
if ! "$cxx" -fsanitize=fuzzer "$probe" -o "$out/probe" 2>/dev/null; then
  echo "fuzz: $cxx cannot build libFuzzer targets here (needs clang with compiler-rt); skipped"
  exit 77
fi
pkgs="gstreamer-1.0 gstreamer-base-1.0 gstreamer-video-1.0 gstreamer-audio-1.0 gstreamer-check-1.0"
san=(-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined)
flags=(-std=c++17 -O1 -g "${san[@]}" -I"$src/engine/include" -I"$src/engine/src" -I"$src/gst-plugin"
       -isystem /usr/include/opencv4 -DLIVEAVATAR_CASCADE_DIR="\"${LIVEAVATAR_CASCADE_DIR:-/usr/share/opencv4/haarcascades}\""
       -DPLUGIN_VERSION='"fuzz"' -DPACKAGE='"gst-liveavatar"' $(pkg-config --cflags $pkgs))
headers=$(ls "$src"/engine/include/liveavatar/*.h "$src"/engine/src/*.h "$src"/engine/src/puppet/*.h "$src"/gst-plugin/*.h)
objs=()
compile() {  # source [extra flags]
  local s=$1; shift
  local o="$out/obj/$(basename "${s%.cpp}").o"
  objs+=("$o")
  if [[ -f "$o" && "$o" -nt "$s" && -z "$(find $headers -newer "$o")" ]]; then return; fi
  echo "fuzz: compiling $(basename "$s")"
  nice "$cxx" "${flags[@]}" "$@" -c "$s" -o "$o"
}
for s in engine/src/engine.cpp engine/src/puppet/audio_features.cpp engine/src/puppet/face_layout.cpp \
         engine/src/puppet/puppet_backend.cpp engine/src/testing/slow_backend.cpp \
         engine/src/testing/fault_backend.cpp engine/src/neural/unavailable.cpp engine/src/vad/vad.cpp \
         gst-plugin/gstliveavatar.cpp; do
  compile "$src/$s" -fsanitize=fuzzer-no-link
done
compile "$src/tests/fuzz/element_fuzzer.cpp" -fsanitize=fuzzer
target="$out/element_fuzzer"
if [[ ! -x "$target" || -n "$(find "${objs[@]}" -newer "$target")" ]]; then
  echo "fuzz: linking element_fuzzer"
  "$cxx" -fsanitize=fuzzer "${san[@]}" "${objs[@]}" -o "$target" $(pkg-config --libs $pkgs) \
    -lopencv_objdetect -lopencv_imgproc -lopencv_core -lpthread
fi
corpus="$out/corpus-element_fuzzer"
mkdir -p "$corpus"
cp -n "$src/tests/fuzz/corpus/element_fuzzer"/* "$corpus"/ 2>/dev/null || true
echo "fuzz: running element_fuzzer for ${secs}s"
# detect_leaks=0: GLib/GStreamer keep type and registry allocations for the life of the process; leaks over the
# element's state cycles are checked by the sanitizer build's leak test instead (scripts/sanitize.sh).
cd "$out"
set +e
ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1 \
  ./element_fuzzer "$corpus" -max_total_time="$secs" -max_len=4096 -rss_limit_mb=3072 -timeout=20 \
  -print_final_stats=1 "$@" 2>&1 | grep -v '^#[0-9].*\(NEW\|REDUCE\|pulse\)\|GStreamer-WARNING\|^$' | tail -n 60
rc=${PIPESTATUS[0]}
exit "$rc"
