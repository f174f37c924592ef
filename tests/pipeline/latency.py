#!/usr/bin/python3
"""Speech-to-frame latency of the live recipes, measured end to end on this machine.

    latency.py [--seconds N] [--check] [obs] [srt] [rtmp]      (GST_PLUGIN_PATH must reach libgstliveavatar.so)

The sender runs the recipe with a live audio source (audiotestsrc is-live=true, 10 ms buffers, like a microphone)
and notes the running time of every frame the element makes; the receiver (in the same process, so on the same
clock) notes when each frame comes out of its decoder. The latency of frame n is

    arrival of frame n at the receiver - (sender base time + running time of frame n + 40 ms),

i.e. from the moment the last sound the frame shows was captured to the moment a player has the decoded picture.
Frames are matched in order (the receiver is ready before the sender starts). Recipes:
  obs   the OBS source pipeline behind an obs-gstreamer-style appsink (sync=true, as OBS has it), no network
  srt   pipelines/srt.sh's chain -> srtsrc ! tsdemux ! avdec_h264, loopback (--srt-latency, default SRT's 125 ms)
  rtmp  pipelines/rtmp.sh's chain -> nginx-rtmp -> rtmp2src ! flvdemux ! avdec_h264, loopback
--check fails (exit 1) when frames go missing or the median is over a second: the meson test `latency` runs that.
"""
import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import gi

gi.require_version("Gst", "1.0")
from gi.repository import GLib, Gst  # noqa: E402

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FRAME_NS = Gst.SECOND // 25
NGINX_RTMP_MODULE = "/usr/lib/nginx/modules/ngx_rtmp_module.so"   # Debian's libnginx-mod-rtmp


def sender_head(seconds, size):
    portrait = os.path.join(SRC, "examples", "assets", "portrait.png")
    return (f'filesrc location="{portrait}" ! pngdec ! videoconvert ! la.image '
            f"audiotestsrc is-live=true wave=ticks samplesperbuffer=160 num-buffers={seconds * 100} ! "
            "audio/x-raw,format=S16LE,rate=16000,channels=1 ! tee name=t "
            "t. ! queue ! audioconvert ! audio/x-raw,format=F32LE,rate=16000,channels=1 ! la.audio "
            f"liveavatar name=la width={size} height={size} ! videoconvert ")


ENCODE = "x264enc tune=zerolatency key-int-max=50 ! h264parse config-interval=-1 ! queue ! mux. "
AAC = "t. ! queue ! audioconvert ! avenc_aac ! aacparse ! queue ! mux. "
APPSINK = "appsink name=frames emit-signals=true"


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """One sender pipeline and, unless the appsink is in the sender, one receiver pipeline."""

    def __init__(self, sender_desc, receiver_desc=None):
        self.sender = Gst.parse_launch(sender_desc)
        self.receiver = Gst.parse_launch(receiver_desc) if receiver_desc else None
        self.made = []       # running time of each frame the element made
        self.arrived = []    # clock time at which each frame reached the receiver's appsink
        self.errors = []
        la = self.sender.get_by_name("la")
        la.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, self._on_made)
        sink = (self.receiver or self.sender).get_by_name("frames")
        sink.connect("new-sample", self._on_arrived)

    def _on_made(self, pad, info):
        seg = pad.get_sticky_event(Gst.EventType.SEGMENT, 0).parse_segment()
        self.made.append(seg.to_running_time(Gst.Format.TIME, info.get_buffer().pts))
        return Gst.PadProbeReturn.OK

    def _on_arrived(self, sink):
        sink.emit("pull-sample")
        clock = self.sender.get_clock()
        if clock is not None:
            self.arrived.append(clock.get_time())
        return Gst.FlowReturn.OK

    def run(self, seconds):
        loop = GLib.MainLoop()
        sender_done = threading.Event()

        def watch(pipeline, is_sender):
            def on_message(_bus, msg):
                if msg.type == Gst.MessageType.ERROR:
                    err, dbg = msg.parse_error()
                    self.errors.append(f"{msg.src.get_name()}: {err.message} ({dbg})")
                    loop.quit()
                elif msg.type == Gst.MessageType.EOS and is_sender:
                    sender_done.set()
                    # Let the last packets cross before the receiver stops.
                    GLib.timeout_add(1500, loop.quit)
                elif msg.type == Gst.MessageType.EOS:
                    loop.quit()
            bus = pipeline.get_bus()
            bus.add_signal_watch()
            bus.connect("message", on_message)

        watch(self.sender, True)
        if self.receiver:
            watch(self.receiver, False)
            self.receiver.set_state(Gst.State.PLAYING)
            time.sleep(0.3)   # the receiver listens / waits for the stream before the sender starts
        self.sender.set_state(Gst.State.PLAYING)
        def give_up():
            self.errors.append(f"no end after {seconds + 30} s")
            loop.quit()
            return GLib.SOURCE_REMOVE
        timer = GLib.timeout_add((seconds + 30) * 1000, give_up)
        loop.run()
        if not any(e.startswith("no end") for e in self.errors):
            GLib.source_remove(timer)
        base = self.sender.get_base_time()
        for p in (self.sender, self.receiver):
            if p:
                p.set_state(Gst.State.NULL)
                p.get_bus().remove_signal_watch()
        if not sender_done.is_set() and not self.errors:
            self.errors.append("the sender did not finish")
        n = min(len(self.made), len(self.arrived))
        return [(self.arrived[i] - (base + self.made[i] + FRAME_NS)) / 1e6 for i in range(n)]


def run_obs(seconds, size):
    desc = (sender_head(seconds, size) + "! video/x-raw,format=I420 ! appsink name=frames emit-signals=true sync=true "
            "t. ! queue ! audioconvert ! audioresample ! fakesink sync=true")
    return Run(desc)


def run_srt(seconds, size, srt_latency):
    port = free_udp_port()
    sender = (sender_head(seconds, size) + "! " + ENCODE + AAC +
              f"mpegtsmux name=mux alignment=7 ! srtsink uri=srt://127.0.0.1:{port}?latency={srt_latency} sync=true")
    receiver = (f"srtsrc uri=srt://:{port}?mode=listener&latency={srt_latency} ! tsdemux ! h264parse ! avdec_h264 ! "
                f"{APPSINK} sync=false")
    return Run(sender, receiver)


class Nginx:
    def __init__(self):
        self.tmp = tempfile.mkdtemp()
        os.chmod(self.tmp, 0o777)
        self.port = free_tcp_port()
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"load_module {NGINX_RTMP_MODULE};\ndaemon off;\nmaster_process off;\n"
                    f"pid {self.tmp}/nginx.pid;\nerror_log {self.tmp}/error.log info;\n"
                    "events { worker_connections 64; }\n"
                    f"rtmp {{ server {{ listen 127.0.0.1:{self.port}; application live {{ live on; }} }} }}\n")
        self.proc = subprocess.Popen(["nginx", "-p", self.tmp, "-c", conf])
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("nginx does not listen")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_rtmp(seconds, size, nginx):
    url = f"rtmp://127.0.0.1:{nginx.port}/live/latency{random.randrange(1 << 30)}"
    sender = (sender_head(seconds, size) + "! " + ENCODE.replace(" config-interval=-1", "") + AAC +
              f"flvmux name=mux streamable=true ! rtmp2sink location={url} sync=true")
    receiver = (f"rtmp2src location={url} ! flvdemux name=d d.video ! queue ! h264parse ! avdec_h264 ! "
                f"{APPSINK} sync=false d.audio ! queue ! fakesink sync=false async=false")
    return Run(sender, receiver)


def summarize(name, run, lat, seconds, tail_allowed):
    made, got = len(run.made), len(run.arrived)
    if not lat:
        return f"{name}: no frame arrived", False
    steady = lat[25:] or lat   # after the first second (encoder and connection start-up)
    med = statistics.median(steady)
    p95 = sorted(steady)[int(0.95 * (len(steady) - 1))]
    line = (f"{name}: median {med:.0f} ms, 95th percentile {p95:.0f} ms, first frame {lat[0]:.0f} ms "
            f"({got} of {made} frames received, {seconds} s of live audio)")
    ok = not run.errors and made >= seconds * 25 - 1 and made - tail_allowed <= got <= made and 0 < med < 1000
    if run.errors:
        line += "; errors: " + "; ".join(run.errors)
    return line, ok


def main():
    parser = argparse.ArgumentParser(description="speech-to-frame latency of the live recipes")
    parser.add_argument("recipes", nargs="*", help="obs, srt and/or rtmp (default: all three)")
    parser.add_argument("--seconds", type=int, default=4, help="live audio per recipe, 2 to 600")
    parser.add_argument("--size", type=int, default=256, help="video width and height")
    parser.add_argument("--srt-latency", type=int, default=125, help="SRT latency in ms (SRT's default: 125)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a recipe loses frames or lags > 1 s")
    args = parser.parse_args()
    args.recipes = args.recipes or ["obs", "srt", "rtmp"]
    unknown = [r for r in args.recipes if r not in ("obs", "srt", "rtmp")]
    if unknown:
        parser.error("unknown recipe: " + ", ".join(unknown))
    if not 0 <= args.srt_latency <= 10000:
        parser.error("--srt-latency must be 0 to 10000 ms")
    if not 2 <= args.seconds <= 600:
        parser.error("--seconds must be 2 to 600")
    Gst.init(None)
    if Gst.ElementFactory.find("liveavatar") is None:
        print("FAIL: liveavatar not found (GST_PLUGIN_PATH)")
        return 1
    all_ok = True
    for name in args.recipes:
        nginx = None
        try:
            if name == "obs":
                run, tail = run_obs(args.seconds, args.size), 0
            elif name == "srt":
                run, tail = run_srt(args.seconds, args.size, args.srt_latency), 4   # SRT drops its latency window at hang-up
            else:
                if not (shutil.which("nginx") and os.path.exists(NGINX_RTMP_MODULE)):
                    print("rtmp: FAIL: nginx with libnginx-mod-rtmp is missing (scripts/setup.sh installs it)")
                    all_ok = False
                    continue
                nginx = Nginx()
                run, tail = run_rtmp(args.seconds, args.size, nginx), 2
            line, ok = summarize(name, run, run.run(args.seconds), args.seconds, tail)
        finally:
            if nginx:
                nginx.stop()
        print(("" if ok else "FAIL: ") + line, flush=True)
        all_ok &= ok
    return 0 if all_ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
