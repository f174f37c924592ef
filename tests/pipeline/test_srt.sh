#!/usr/bin/env bash
# Streams the avatar over SRT (pipelines/srt.sh: x264enc ! mpegtsmux ! srtsink) to an srtsrc on loopback, twice:
# the sender listening (receiver calls in) and the sender calling (receiver listens). Each recording (MPEG-TS) is
# checked with ffprobe: H.264 at 25 fps + AAC, as many frames as the speech lasts (within 2 frames). Then ffmpeg,
# another SRT implementation, calls in to the listening sender.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
gst-inspect-1.0 srtsrc >/dev/null 2>&1 || { echo "FAIL: srtsrc/srtsink missing (gstreamer1.0-plugins-bad)"; exit 1; }
tmp=$(mktemp -d)
pids=()
cleanup() { [ -n "${KEEP_TMP:-}" ] && cp -r "$tmp" "$KEEP_TMP"; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

ffmpeg -v error -y -i "$src/examples/assets/speech.wav" -t 3 "$tmp/speech3.wav"
want=75   # 3 s at 25 fps
# SRT drops what is still inside the receiver's latency window when the sender closes: 20 ms on loopback keeps
# that under one frame (the 125 ms default would cut the last 3 frames of a file; a live stream has no end).
latency=20

wait_udp_listener() {   # port: until something listens on it (SRT is UDP, so /dev/tcp cannot tell)
  for _ in $(seq 100); do ss -Hlun "sport = :$1" | grep -q . && return 0; sleep 0.1; done
  fail "nothing listens on UDP port $1"
}

check_ts() {   # recording, label
  local rec=$1 label=$2 codecs fps frames span
  [ -s "$rec" ] || fail "$label: nothing was received"
  codecs=$(ffprobe -v error -show_entries stream=codec_name -of default=nw=1:nk=1 "$rec" | sort -u | tr '\n' ' ')
  [ "$codecs" = "aac h264 " ] || fail "$label: received streams: $codecs, expected aac h264"
  fps=$(ffprobe -v error -select_streams v:0 -show_entries stream=r_frame_rate -of default=nw=1:nk=1 "$rec" | sort -u)
  [ "$fps" = 25/1 ] || fail "$label: frame rate $fps, expected 25/1"
  # Decoded frames and the span of their timestamps (first to last + one frame).
  ffprobe -v error -select_streams v:0 -show_entries frame=pts_time -of csv=p=0 "$rec" |
    cut -d, -f1 | grep . > "$tmp/pts.txt" || true
  frames=$(wc -l < "$tmp/pts.txt")
  span=$(sort -g "$tmp/pts.txt" | awk 'NR == 1 { a = $1 } { b = $1 } END { printf "%.3f", b - a + 0.04 }')
  [ "$frames" -ge $((want - 2)) ] && [ "$frames" -le "$want" ] ||
    fail "$label: $frames frames decoded, expected $want (3 s at 25 fps) within 2"
  awk -v s="$span" -v w="$want" 'BEGIN { exit !(s >= (w - 2) / 25 - 0.001 && s <= w / 25 + 0.001) }' ||
    fail "$label: video spans $span s, expected 3 s within 2 frames"
  echo "ok: $label: h264 25/1 + aac, $frames frames over $span s"
}

# 1. The sender listens, the receiver calls in (how a player pulls from the avatar).
port=$(( 20000 + RANDOM % 20000 ))
timeout 60 "$src/pipelines/srt.sh" "$src/examples/assets/portrait.png" "$tmp/speech3.wav" \
  "srt://127.0.0.1:$port?mode=listener&latency=$latency" width=256 height=256 &
sender=$!; pids+=("$sender")
wait_udp_listener "$port"
gst-launch-1.0 -q -e srtsrc uri="srt://127.0.0.1:$port?latency=$latency" ! \
  filesink location="$tmp/listener.ts" buffer-mode=unbuffered &
receiver=$!; pids+=("$receiver")
wait "$sender" || fail "srt.sh (listener) exited with $?"
# A calling srtsrc does not end when the sender hangs up: stop it with EOS (-e) once the last packets are in.
sleep 0.5; kill -INT "$receiver"; wait "$receiver" || fail "srtsrc (caller) exited with $?"
check_ts "$tmp/listener.ts" "sender listening"

# 2. The receiver listens, the sender calls (how the avatar pushes to an SRT server or OBS).
port=$(( 20000 + RANDOM % 20000 ))
timeout 60 gst-launch-1.0 -q srtsrc uri="srt://:$port?mode=listener&latency=$latency" ! \
  filesink location="$tmp/caller.ts" &
receiver=$!; pids+=("$receiver")
wait_udp_listener "$port"
timeout 60 "$src/pipelines/srt.sh" "$src/examples/assets/portrait.png" "$tmp/speech3.wav" \
  "srt://127.0.0.1:$port?latency=$latency" width=256 height=256 || fail "srt.sh (caller) exited with $?"
# A listening srtsrc ends by itself (EOS) when the caller hangs up.
wait "$receiver" || fail "srtsrc (listener) exited with $?"
check_ts "$tmp/caller.ts" "sender calling"

# 3. Another SRT implementation calls in: ffmpeg (libsrt), as a player such as ffplay or VLC would.
ffmpeg -hide_banner -protocols 2>/dev/null | grep -qw srt || fail "this ffmpeg has no SRT protocol (Debian's has)"
port=$(( 20000 + RANDOM % 20000 ))
timeout 60 "$src/pipelines/srt.sh" "$src/examples/assets/portrait.png" "$tmp/speech3.wav" \
  "srt://127.0.0.1:$port?mode=listener&latency=$latency" width=256 height=256 &
sender=$!; pids+=("$sender")
wait_udp_listener "$port"
# ffmpeg's SRT latency is in microseconds; it stops by itself (an I/O error) when the sender hangs up.
timeout 60 ffmpeg -v error -y -i "srt://127.0.0.1:$port?latency=$((latency * 1000))" -c copy -f mpegts \
  "$tmp/ffmpeg.ts" 2> "$tmp/ffmpeg.log" || true
wait "$sender" || fail "srt.sh (listener, ffmpeg calling) exited with $?"
check_ts "$tmp/ffmpeg.ts" "ffmpeg calling in"
