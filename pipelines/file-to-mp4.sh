#!/usr/bin/env bash
# Portrait + speech file -> MP4 (H.264 + AAC, 25 fps, exactly as long as the audio).
#   pipelines/file-to-mp4.sh PORTRAIT.png SPEECH.(wav|mp3|...) OUT.mp4 [liveavatar properties...]
# Uses the uninstalled plugin in build/ when present (meson devenv does the same).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 3 ] || { echo "usage: $0 PORTRAIT.png SPEECH.wav OUT.mp4 [prop=value ...]" >&2; exit 2; }
image=$1 audio=$2 out=$3; shift 3
for f in "$image" "$audio"; do [ -r "$f" ] || { echo "$0: cannot read $f" >&2; exit 2; }; done
[ -d "$here/build/gst-plugin" ] && export GST_PLUGIN_PATH="$here/build/gst-plugin${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
# Speech without a single sample would give no frames, and mp4mux a file without playable streams: refuse it first
# (decoded to 8-bit 8 kHz, only to see whether any sample comes out).
probe=$(mktemp); trap 'rm -f "$probe"' EXIT
gst-launch-1.0 -q filesrc location="$audio" ! decodebin ! audioconvert ! audioresample ! \
  audio/x-raw,format=U8,rate=8000,channels=1 ! filesink location="$probe"
[ -s "$probe" ] || { echo "$0: $audio holds no audio samples, so there is no video to make" >&2; exit 1; }
echo "[demo] $image + $audio -> $out"
# decodebin handles PNG/JPEG stills and any audio file; the speech is teed to the avatar and to the AAC encoder.
gst-launch-1.0 -q \
  filesrc location="$image" ! decodebin ! videoconvert ! la.image \
  filesrc location="$audio" ! decodebin ! audioconvert ! audioresample ! audio/x-raw,rate=16000,channels=1 ! \
    tee name=t \
  t. ! queue ! audioconvert ! la.audio \
  liveavatar name=la "$@" ! videoconvert ! x264enc speed-preset=veryfast tune=zerolatency ! video/x-h264,profile=high ! \
    queue ! mux.video_0 \
  t. ! queue ! audioconvert ! avenc_aac ! queue ! mux.audio_0 \
  mp4mux name=mux ! filesink location="$out"
