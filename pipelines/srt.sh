#!/usr/bin/env bash
# Portrait + speech file -> SRT (H.264 + AAC in MPEG-TS), for an SRT player, server or OBS's media source.
#   pipelines/srt.sh PORTRAIT.png SPEECH.wav SRT_URI [liveavatar properties...]
# SRT_URI picks the side that waits:
#   srt://:9000?mode=listener        wait for a receiver to call in (e.g. ffplay srt://HOST:9000)
#   srt://HOST:9000                  call a receiver that listens (mode=caller is the default)
# Add &latency=MS to set SRT's receive buffer (default 125 ms; both ends use the larger of their two values).
# The file is played in real time, as a live stream would be.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 3 ] || { echo "usage: $0 PORTRAIT.png SPEECH.wav srt://HOST:PORT[?mode=listener] [prop=value ...]" >&2; exit 2; }
image=$1 audio=$2 uri=$3; shift 3
for f in "$image" "$audio"; do [ -r "$f" ] || { echo "$0: cannot read $f" >&2; exit 2; }; done
case $uri in srt://*) ;; *) echo "$0: $uri is not an srt:// URI" >&2; exit 2 ;; esac
[ -d "$here/build/gst-plugin" ] && export GST_PLUGIN_PATH="$here/build/gst-plugin${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
# alignment=7: seven 188-byte TS packets per SRT message (1316 bytes), what SRT receivers expect.
# config-interval=-1: SPS/PPS before every keyframe, so a receiver that joins late can start decoding.
exec gst-launch-1.0 \
  filesrc location="$image" ! decodebin ! videoconvert ! la.image \
  filesrc location="$audio" ! decodebin ! audioconvert ! audioresample ! tee name=t \
  t. ! queue ! audioconvert ! audio/x-raw,format=F32LE,rate=16000,channels=1 ! la.audio \
  liveavatar name=la "$@" ! videoconvert ! x264enc tune=zerolatency key-int-max=50 ! \
    h264parse config-interval=-1 ! queue ! mux. \
  t. ! queue ! audioconvert ! avenc_aac ! aacparse ! queue ! mux. \
  mpegtsmux name=mux alignment=7 ! srtsink uri="$uri" sync=true
