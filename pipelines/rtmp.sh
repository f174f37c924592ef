#!/usr/bin/env bash
# Portrait + speech file -> RTMP (H.264 + AAC in FLV), e.g. to nginx-rtmp, OBS ingest or a streaming service.
#   pipelines/rtmp.sh PORTRAIT.png SPEECH.wav rtmp://HOST/APP/STREAM [liveavatar properties...]
# The file is played in real time (audio clock), as a live stream would be.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 3 ] || { echo "usage: $0 PORTRAIT.png SPEECH.wav rtmp://HOST/APP/STREAM [prop=value ...]" >&2; exit 2; }
image=$1 audio=$2 url=$3; shift 3
[ -d "$here/build/gst-plugin" ] && export GST_PLUGIN_PATH="$here/build/gst-plugin${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
exec gst-launch-1.0 \
  filesrc location="$image" ! decodebin ! videoconvert ! la.image \
  filesrc location="$audio" ! decodebin ! audioconvert ! audioresample ! tee name=t \
  t. ! queue ! audioconvert ! audio/x-raw,format=F32LE,rate=16000,channels=1 ! la.audio \
  liveavatar name=la "$@" ! videoconvert ! x264enc tune=zerolatency key-int-max=50 ! h264parse ! queue ! mux.video \
  t. ! queue ! audioconvert ! avenc_aac ! aacparse ! queue ! mux.audio \
  flvmux name=mux streamable=true ! rtmp2sink location="$url" sync=true
