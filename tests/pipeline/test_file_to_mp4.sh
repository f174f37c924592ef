#!/usr/bin/env bash
# End to end through gst-launch: the demo pipeline on the example assets, and on a grey JPEG with 44.1 kHz stereo
# MP3-free audio (decodebin + audioresample path), each checked with ffprobe.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

"$src/pipelines/file-to-mp4.sh" "$src/examples/assets/portrait.png" "$src/examples/assets/speech.wav" "$tmp/demo.mp4"
"$src/tests/pipeline/check_mp4.sh" "$tmp/demo.mp4" "$src/examples/assets/speech.wav"

# A grey JPEG portrait and 3.3 s of 44.1 kHz stereo speech.
gst-launch-1.0 -q filesrc location="$src/examples/assets/portrait.png" ! pngdec ! videoconvert ! \
  video/x-raw,format=GRAY8 ! jpegenc ! filesink location="$tmp/grey.jpg"
ffmpeg -v error -y -i "$src/examples/assets/speech.wav" -t 3.3 -ac 2 -ar 44100 "$tmp/stereo.wav"
"$src/pipelines/file-to-mp4.sh" "$tmp/grey.jpg" "$tmp/stereo.wav" "$tmp/grey.mp4" seed=3
"$src/tests/pipeline/check_mp4.sh" "$tmp/grey.mp4" "$tmp/stereo.wav"
