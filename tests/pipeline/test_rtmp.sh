#!/usr/bin/env bash
# Streams the avatar over RTMP (x264enc ! flvmux ! rtmp2sink) to a real nginx-rtmp server on loopback, which
# records the stream; the recording is checked with ffprobe.
set -euo pipefail
src=$(cd "$(dirname "$0")/../.." && pwd)
module=/usr/lib/nginx/modules/ngx_rtmp_module.so
command -v nginx >/dev/null && [ -f "$module" ] || { echo "nginx with libnginx-mod-rtmp is missing: run scripts/setup.sh" >&2; exit 1; }
tmp=$(mktemp -d); chmod 777 "$tmp"
nginx_pid=
cleanup() { [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

port=$(( 20000 + RANDOM % 20000 ))
cat > "$tmp/nginx.conf" <<CONF
load_module $module;
daemon off;
master_process off;
pid $tmp/nginx.pid;
error_log $tmp/error.log info;
events { worker_connections 64; }
rtmp {
  server {
    listen 127.0.0.1:$port;
    application live { live on; record all; record_path $tmp; record_unique off; }
  }
}
CONF
nginx -p "$tmp" -c "$tmp/nginx.conf" &
nginx_pid=$!
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

ffmpeg -v error -y -i "$src/examples/assets/speech.wav" -t 4 "$tmp/speech4.wav"
export GST_PLUGIN_PATH="$src/build/gst-plugin${GST_PLUGIN_PATH:+:$GST_PLUGIN_PATH}"
timeout 120 gst-launch-1.0 -q \
  filesrc location="$src/examples/assets/portrait.png" ! pngdec ! videoconvert ! la.image \
  filesrc location="$tmp/speech4.wav" ! wavparse ! audioconvert ! audioresample ! tee name=t \
  t. ! queue ! audioconvert ! audio/x-raw,format=F32LE,rate=16000,channels=1 ! la.audio \
  liveavatar name=la width=320 height=320 ! videoconvert ! x264enc tune=zerolatency key-int-max=50 ! h264parse ! \
    queue ! mux.video \
  t. ! queue ! audioconvert ! avenc_aac ! aacparse ! queue ! mux.audio \
  flvmux name=mux streamable=true ! rtmp2sink location="rtmp://127.0.0.1:$port/live/avatar"
sleep 0.5
kill "$nginx_pid"; wait "$nginx_pid" 2>/dev/null || true; nginx_pid=

rec="$tmp/avatar.flv"
[ -s "$rec" ] || { echo "FAIL: the RTMP server recorded nothing"; cat "$tmp/error.log"; exit 1; }
codecs=$(ffprobe -v error -show_entries stream=codec_name -of default=nw=1:nk=1 "$rec" | sort | tr '\n' ' ')
[ "$codecs" = "aac h264 " ] || { echo "FAIL: recorded streams: $codecs"; exit 1; }
frames=$(ffprobe -v error -count_frames -select_streams v:0 -show_entries stream=nb_read_frames -of default=nw=1:nk=1 "$rec")
[ "$frames" = 100 ] || { echo "FAIL: $frames frames received over RTMP, expected 100 (4 s at 25 fps)"; exit 1; }
echo "ok: RTMP server recorded h264+aac, $frames frames"
