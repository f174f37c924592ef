#!/usr/bin/env bash
# Runs every test registered with meson and ends with the line "N passed, N failed" (counted per test case from
# meson's JUnit log, so the GoogleTest cases inside one binary count one by one).
#   scripts/run-tests.sh [BUILD_DIR] [meson test args...]
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}; shift || true
log="$build/meson-logs/testlog.junit.xml"
rm -f "$log"
echo "[test] meson test -C $build"
meson test -C "$build" --print-errorlogs --num-processes 2 "$@"
rc=$?
if [ -f "$log" ]; then
  python3 - "$log" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
passed = failed = skipped = 0
for case in root.iter("testcase"):
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
