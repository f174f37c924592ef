#!/usr/bin/env bash
# The demo pipeline with backend=liveavatar on a tiny checkpoint from `liveavatar-checkpoint make-tiny`: 3 s of
# speech -> MP4 checked with ffprobe (H.264 + AAC, 25 fps, exactly as long as the audio).
set -euo pipefail
checkpoint_tool=$1
src=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
export XDG_CACHE_HOME="$tmp/cache"
"$checkpoint_tool" make-tiny "$tmp/models" > /dev/null
ffmpeg -v error -y -i "$src/examples/assets/speech.wav" -t 3 "$tmp/speech3.wav"
"$src/pipelines/file-to-mp4.sh" "$src/examples/assets/portrait.png" "$tmp/speech3.wav" "$tmp/neural.mp4" \
  backend=liveavatar model-dir="$tmp/models" width=128 height=128
"$src/tests/pipeline/check_mp4.sh" "$tmp/neural.mp4" "$tmp/speech3.wav"
