#!/usr/bin/env bash
# End to end through gst-launch: the demo pipeline on the example assets, and on a grey JPEG with 44.1 kHz stereo
# MP3-free audio (decodebin + audioresample path), each checked with ffprobe; speech without samples is refused.
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

# Speech without samples: the script fails with a message and leaves no broken MP4 behind.
gst-launch-1.0 -q audiotestsrc num-buffers=0 ! audio/x-raw,rate=16000,channels=1 ! wavenc ! \
  filesink location="$tmp/empty.wav"
if "$src/pipelines/file-to-mp4.sh" "$src/examples/assets/portrait.png" "$tmp/empty.wav" "$tmp/empty.mp4" \
    2> "$tmp/empty.err"; then
  echo "FAIL: file-to-mp4.sh succeeded on speech without samples"; exit 1
fi
grep -q "holds no audio samples" "$tmp/empty.err" || { echo "FAIL: no message for empty speech:"; cat "$tmp/empty.err"; exit 1; }
[ ! -e "$tmp/empty.mp4" ] || { echo "FAIL: an empty MP4 was written"; exit 1; }
echo "ok: empty speech is refused with a message"
