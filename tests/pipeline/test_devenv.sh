#!/usr/bin/env bash
# `meson devenv -C build` alone makes the uninstalled element visible to gst-inspect-1.0 and gst-launch-1.0.
set -euo pipefail
build=$1
unset GST_PLUGIN_PATH
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
export GST_REGISTRY="$tmp/registry.bin"
meson devenv -C "$build" gst-inspect-1.0 liveavatar > "$tmp/inspect.txt"
grep -q "Live avatar" "$tmp/inspect.txt" || { echo "FAIL: gst-inspect-1.0 does not find liveavatar"; exit 1; }
meson devenv -C "$build" gst-launch-1.0 -q videotestsrc num-buffers=1 ! video/x-raw,width=128,height=128 ! la.image \
  audiotestsrc num-buffers=4 samplesperbuffer=400 ! audio/x-raw,format=F32LE,rate=16000,channels=1 ! la.audio \
  liveavatar name=la ! fakesink
for tool in liveavatar-render liveavatar-bench liveavatar-plan; do
  meson devenv -C "$build" sh -c "command -v $tool" > /dev/null || { echo "FAIL: meson devenv has no $tool on PATH"; exit 1; }
done
echo "ok: meson devenv finds liveavatar and the tools; gst-launch ran it"
