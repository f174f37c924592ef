#!/usr/bin/env bash
# The Python (examples/python/talk.py) and C (examples/c, built by meson) examples: each renders 3 s of speech to an
# MP4 checked with ffprobe, reports the element's loading messages, progress up to 100% and the frame count, and
# refuses a portrait that does not exist.
#   test_examples.sh PATH/TO/liveavatar-talk
set -euo pipefail
c_example=$1
src=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
ffmpeg -v error -y -i "$src/examples/assets/speech.wav" -t 3 "$tmp/speech3.wav"

check_output() {   # log, label
  grep -q '^avatar: load: ' "$1" || fail "$2: no loading message from the element"
  grep -q '^progress: 3.00 s / 3.00 s (100%), 75 frames$' "$1" || fail "$2: progress does not end at 3.00 s / 3.00 s"
  grep -q '^done: 75 frames (3.00 s of video)' "$1" || fail "$2: no final count of 75 frames"
}

python_example=(/usr/bin/python3 "$src/examples/python/talk.py")
"${python_example[@]}" "$src/examples/assets/portrait.png" "$tmp/speech3.wav" "$tmp/python.mp4" --size 256 \
  > "$tmp/python.log" || { cat "$tmp/python.log"; fail "talk.py exited with $?"; }
cat "$tmp/python.log"
check_output "$tmp/python.log" talk.py
"$src/tests/pipeline/check_mp4.sh" "$tmp/python.mp4" "$tmp/speech3.wav"

"$c_example" "$src/examples/assets/portrait.png" "$tmp/speech3.wav" "$tmp/c.mp4" 256 > "$tmp/c.log" ||
  { cat "$tmp/c.log"; fail "liveavatar-talk exited with $?"; }
cat "$tmp/c.log"
check_output "$tmp/c.log" liveavatar-talk
"$src/tests/pipeline/check_mp4.sh" "$tmp/c.mp4" "$tmp/speech3.wav"

# A portrait that is not there: a message and a failing exit status, from both.
for cmd in "${python_example[*]}" "$c_example"; do
  if $cmd "$tmp/missing.png" "$tmp/speech3.wav" "$tmp/missing.mp4" > "$tmp/missing.log" 2>&1; then
    fail "$cmd succeeded without a portrait"
  fi
  grep -q "cannot read $tmp/missing.png" "$tmp/missing.log" || { cat "$tmp/missing.log"; fail "$cmd: no message"; }
done
echo "ok: both examples refuse a missing portrait"
