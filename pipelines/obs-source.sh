#!/usr/bin/env bash
# Prints the pipeline to paste into OBS's "GStreamer Source" (the obs-gstreamer plugin): the portrait animated by the
# microphone (or by a speech file), ending in `video.` and `audio.`, which obs-gstreamer links to its own appsinks.
#   pipelines/obs-source.sh PORTRAIT.png [SPEECH.wav] [liveavatar properties...]
# Without SPEECH the default microphone (autoaudiosrc) drives the avatar; OBS gets the voice on its audio track.
# OBS must find the plugin: start it with GST_PLUGIN_PATH set to the folder of libgstliveavatar.so (or install it).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 PORTRAIT.png [SPEECH.wav] [prop=value ...]" >&2; exit 2; }
image=$1; shift
source="autoaudiosrc"
if [ $# -ge 1 ] && [[ $1 != *=* ]]; then
  [ -r "$1" ] || { echo "$0: cannot read $1" >&2; exit 2; }
  source="filesrc location=\"$(realpath "$1")\" ! decodebin"; shift
fi
[ -r "$image" ] || { echo "$0: cannot read $image" >&2; exit 2; }
# The voice is teed before it is cut down to 16 kHz mono for the element, so OBS hears it at full quality.
echo "filesrc location=\"$(realpath "$image")\" ! decodebin ! videoconvert ! la.image" \
  "$source ! audioconvert ! tee name=t" \
  "t. ! queue ! audioresample ! audioconvert ! audio/x-raw,format=F32LE,rate=16000,channels=1 ! la.audio" \
  "liveavatar name=la${*:+ $*} ! video." \
  "t. ! queue ! audio."
