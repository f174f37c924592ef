#!/usr/bin/env bash
# Runs every test registered with meson and ends with the line "N passed, N failed" (counted per test case from
# meson's JUnit logs, so the GoogleTest cases inside one binary count one by one).
#   scripts/run-tests.sh [BUILD_DIR] [meson test args...]
# A full run (no meson test args) then runs the sanitizer pass, scripts/sanitize.sh BUILD_DIR/asan (ASan + UBSan +
# LeakSanitizer, without LibTorch), whose tests are counted too. SANITIZE=0 skips it, SANITIZE=1 runs it (whole)
# after a run with args as well.
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}; shift || true
log="$build/meson-logs/testlog.junit.xml"
rm -f "$log"
echo "[test] meson test -C $build"
meson test -C "$build" --print-errorlogs --num-processes 2 "$@"
rc=$?
logs=("$log")
if [ "${SANITIZE:-$([ $# -eq 0 ] && echo 1 || echo 0)}" = 1 ]; then
  asan_log="$build/asan/meson-logs/testlog.junit.xml"
  rm -f "$asan_log"
  scripts/sanitize.sh "$build/asan" || rc=1
  logs+=("$asan_log")
  [ -f "$asan_log" ] || rc=1
fi
if [ -f "$log" ]; then
  python3 - "${logs[@]}" <<'PY'
import os, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for path in sys.argv[1:]:
    if not os.path.exists(path):
        failed += 1  # the pass did not even run its tests
        continue
    for case in ET.parse(path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            failed += 1
        elif "skipped" in tags:
            skipped += 1
        else:
            passed += 1
print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
PY
else
  echo "0 passed, 1 failed"
  [ "$rc" -ne 0 ] || rc=1
fi
exit "$rc"
