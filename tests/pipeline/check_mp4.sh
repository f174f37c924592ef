#!/usr/bin/env bash
# check_mp4.sh VIDEO AUDIO_SOURCE: asserts VIDEO is H.264 + AAC at 25 fps with ceil(audio duration x 25) frames.
set -euo pipefail
video=$1 source_audio=$2
probe() { ffprobe -v error -select_streams "$1" -show_entries "stream=$2" -of default=nw=1:nk=1 "$video"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
[ "$(probe v:0 codec_name)" = h264 ] || fail "video codec is $(probe v:0 codec_name), expected h264"
[ "$(probe a:0 codec_name)" = aac ] || fail "audio codec is $(probe a:0 codec_name), expected aac"
[ "$(probe v:0 r_frame_rate)" = 25/1 ] || fail "frame rate $(probe v:0 r_frame_rate), expected 25/1"
samples=$(ffprobe -v error -select_streams a:0 -show_entries stream=duration_ts,sample_rate -of default=nw=1 \
  "$source_audio")
dts=$(sed -n 's/^duration_ts=//p' <<<"$samples"); rate=$(sed -n 's/^sample_rate=//p' <<<"$samples")
want=$(( (dts * 25 + rate - 1) / rate ))
frames=$(ffprobe -v error -count_frames -select_streams v:0 -show_entries stream=nb_read_frames \
  -of default=nw=1:nk=1 "$video")
[ "$frames" = "$want" ] || fail "$frames video frames, expected ceil($dts / $rate x 25) = $want"
vdur=$(probe v:0 duration)
awk -v d="$vdur" -v n="$want" 'BEGIN { e = d - n / 25; if (e < -0.001 || e > 0.001) exit 1 }' ||
  fail "video lasts $vdur s, expected $want / 25 s"
echo "ok: $video h264+aac 25/1, $frames frames = ceil($dts / $rate s x 25), video $vdur s"
