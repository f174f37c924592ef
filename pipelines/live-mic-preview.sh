#!/usr/bin/env bash
# Live: the default microphone drives the portrait, shown in a window. When you stop talking the avatar idles.
#   pipelines/live-mic-preview.sh PORTRAIT.png [liveavatar properties...]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: $0 PORTRAIT.png [prop=value ...]" >&2; exit 2; }
image=$1; shift
[ -d "$here/build/gst-plugin" ] && export GST_PLUGIN_PATH="$here/build/gst-plugin${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
exec gst-launch-1.0 \
  filesrc location="$image" ! decodebin ! videoconvert ! imagefreeze ! la.image \
  autoaudiosrc ! audioconvert ! audioresample ! audio/x-raw,format=F32LE,rate=16000,channels=1 ! la.audio \
  liveavatar name=la "$@" ! videoconvert ! autovideosink
