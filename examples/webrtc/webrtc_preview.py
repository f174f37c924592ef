#!/usr/bin/python3
"""WebRTC preview of the avatar: serves a page on HTTP and streams liveavatar to it through webrtcbin (VP8 video +
Opus voice). The signalling is two plain HTTP requests, no trickle ICE: the page GETs /offer (a new stream starts,
answered once webrtcbin has gathered its candidates) and POSTs its answer, with its candidates, to /answer.

    examples/webrtc/webrtc_preview.py PORTRAIT.png [--speech SPEECH.wav | --tone] [--port 8080] [--size 256]

Then open http://HOST:PORT/ in a browser. Without --speech the default microphone drives the avatar. One viewer at
a time: a new page load restarts the stream for it. Needs gstreamer1.0-nice (ICE), the bad plugins (webrtcbin)
and python3-gi; GST_PLUGIN_PATH must reach libgstliveavatar.so (pipelines/ scripts show how).
"""
import argparse
import http.server
import json
import os
import sys
import threading
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstWebRTC", "1.0")
gi.require_version("GstSdp", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def quote(path):
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Stream:
    """One pipeline, liveavatar -> webrtcbin, for one viewer."""

    def __init__(self, portrait, speech, size, tone=False):
        # A file is played the way a microphone delivers: 10 ms buffers, each let through when its last sample is
        # due (clocksync ts-offset), so the browser gets real time and the latency shown is a microphone's.
        audio = (f"filesrc location={quote(speech)} ! decodebin ! audioconvert ! "
                 "audiobuffersplit output-buffer-duration=1/100 ! clocksync ts-offset=10000000"
                 if speech else "autoaudiosrc")
        if tone:   # a live source without a microphone: ticks in 10 ms buffers (to measure the latency)
            audio = "audiotestsrc is-live=true wave=ticks samplesperbuffer=480 ! audio/x-raw,rate=48000,channels=1"
        # timestamp-offset=0: RTP time = running time x 90 kHz, so the page can tell when a frame was made.
        self.pipeline = Gst.parse_launch(
            f"filesrc location={quote(portrait)} ! decodebin ! videoconvert ! la.image "
            f"{audio} ! audioconvert ! audioresample ! tee name=t "
            "t. ! queue ! audioconvert ! audio/x-raw,format=F32LE,rate=16000,channels=1 ! la.audio "
            f"liveavatar name=la width={size} height={size} ! videoconvert ! queue ! "
            "vp8enc deadline=1 keyframe-max-dist=25 ! rtpvp8pay pt=96 timestamp-offset=0 ! "
            "application/x-rtp,media=video,encoding-name=VP8,payload=96 ! webrtc. "
            "t. ! queue ! audioconvert ! audioresample ! opusenc ! rtpopuspay pt=97 ! "
            "application/x-rtp,media=audio,encoding-name=OPUS,payload=97 ! webrtc. "
            "webrtcbin name=webrtc bundle-policy=max-bundle")
        self.webrtc = self.pipeline.get_by_name("webrtc")
        self.offer_ready = threading.Event()
        self.error = None
        # The browser only receives.
        for i in range(2):
            self.webrtc.emit("get-transceiver", i).set_property(
                "direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
        self.webrtc.connect("on-negotiation-needed", self._on_negotiation_needed)
        self.webrtc.connect("notify::ice-gathering-state", self._on_gathering)
        bus = self.pipeline.get_bus()
        bus.add_signal_watch()
        bus.connect("message", self._on_message)

    def start(self):
        if self.pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            raise RuntimeError("the pipeline does not start (run with GST_DEBUG=3 to see why)")

    def stop(self):
        self.pipeline.set_state(Gst.State.NULL)
        self.pipeline.get_bus().remove_signal_watch()

    def _on_negotiation_needed(self, webrtc):
        def on_offer(promise):
            reply = promise.get_reply()
            offer = reply.get_value("offer") if reply and reply.has_field("offer") else None
            if offer is None or offer.sdp is None:
                self.error = "webrtcbin made no offer: " + (reply.to_string() if reply else "no reply")
                self.offer_ready.set()
                return
            webrtc.emit("set-local-description", offer, Gst.Promise.new())
        webrtc.emit("create-offer", None, Gst.Promise.new_with_change_func(on_offer))

    def _on_gathering(self, webrtc, _pspec):
        if webrtc.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            self.offer_ready.set()

    def _on_message(self, _bus, msg):
        if msg.type == Gst.MessageType.ERROR:
            err, dbg = msg.parse_error()
            self.error = f"{msg.src.get_name()}: {err.message}"
            print(f"error: {self.error} ({dbg})", file=sys.stderr, flush=True)
            self.offer_ready.set()
        elif msg.type == Gst.MessageType.WARNING:
            err, _dbg = msg.parse_warning()
            print(f"warning: {msg.src.get_name()}: {err.message}", file=sys.stderr, flush=True)
        elif msg.type == Gst.MessageType.EOS:
            print("end of the speech: the stream has ended", flush=True)

    def offer(self, timeout_s=10):
        """The SDP offer with every candidate in it."""
        if not self.offer_ready.wait(timeout_s):
            raise RuntimeError(f"ICE gathering did not finish in {timeout_s} s")
        if self.error:
            raise RuntimeError(self.error)
        return self.webrtc.get_property("local-description").sdp.as_text()

    def answer(self, sdp_text):
        ok, sdp = GstSdp.SDPMessage.new_from_text(sdp_text)
        if ok != GstSdp.SDPResult.OK:
            raise ValueError("the answer is not valid SDP")
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, sdp)
        self.webrtc.emit("set-remote-description", answer, Gst.Promise.new())

    def wall_time_of_running_time_zero_ms(self):
        """Wall-clock time (ms since the epoch) at which the stream's running time was 0; the page subtracts it
        from when it shows a frame to get the latency."""
        clock = self.pipeline.get_clock()
        if clock is None:
            return None
        running_ns = clock.get_time() - self.pipeline.get_base_time()
        return time.time() * 1000 - running_ns / 1e6


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, args):
        super().__init__(address, Handler)
        self.args = args
        self.stream = None
        self.lock = threading.Lock()

    def new_stream(self):
        with self.lock:
            if self.stream:
                self.stream.stop()
            self.stream = Stream(self.args.portrait, self.args.speech, self.args.size, self.args.tone)
            self.stream.start()
            return self.stream


class Handler(http.server.BaseHTTPRequestHandler):
    def _send(self, code, body, kind="application/json"):
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        try:
            if self.path in ("/", "/index.html"):
                with open(os.path.join(HERE, "index.html"), "rb") as f:
                    self._send(200, f.read(), "text/html; charset=utf-8")
            elif self.path == "/offer":
                sdp = self.server.new_stream().offer()
                self._send(200, json.dumps({"type": "offer", "sdp": sdp}))
            elif self.path == "/clock":
                stream = self.server.stream
                t0 = stream.wall_time_of_running_time_zero_ms() if stream else None
                self._send(200, json.dumps({"t0_wall_ms": t0}))
            else:
                self._send(404, json.dumps({"error": "not found"}))
        except Exception as e:  # the page shows it; the server keeps running
            self._send(500, json.dumps({"error": str(e)}))

    def do_POST(self):
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if self.path == "/answer" and self.server.stream:
                self.server.stream.answer(body["sdp"])
                self._send(200, "{}")
            elif self.path == "/report":
                print("viewer: " + json.dumps(body, sort_keys=True), flush=True)
                self._send(200, "{}")
            else:
                self._send(404, json.dumps({"error": "no stream to answer" if self.path == "/answer"
                                            else "not found"}))
        except Exception as e:
            self._send(400, json.dumps({"error": str(e)}))

    def log_message(self, fmt, *args):  # quiet: the stream's own messages are what matter
        pass


def main():
    parser = argparse.ArgumentParser(description="WebRTC preview of the liveavatar element")
    parser.add_argument("portrait")
    parser.add_argument("--speech", help="speech file (played in real time); default: the microphone")
    parser.add_argument("--tone", action="store_true", help="a live test tone instead of speech or microphone")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=8080, help="0 = any free port")
    parser.add_argument("--size", type=int, default=256, help="video width and height, even, 64 to 1024")
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0 to 65535")
    if not (64 <= args.size <= 1024 and args.size % 2 == 0):
        parser.error("--size must be even, 64 to 1024")
    for path in [args.portrait] + ([args.speech] if args.speech else []):
        if not os.access(path, os.R_OK):
            parser.error(f"cannot read {path}")
    args.portrait = os.path.abspath(args.portrait)
    args.speech = os.path.abspath(args.speech) if args.speech else None

    Gst.init(None)
    missing = [e for e in ("liveavatar", "webrtcbin", "nicesrc", "vp8enc", "opusenc")
               if Gst.ElementFactory.find(e) is None]
    if missing:
        print("missing GStreamer elements: " + ", ".join(missing) +
              " (liveavatar: set GST_PLUGIN_PATH; nicesrc: gstreamer1.0-nice; webrtcbin: gstreamer1.0-plugins-bad)",
              file=sys.stderr)
        return 1
    server = Server((args.host, args.port), args)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"serving http://{args.host}:{server.server_address[1]}/", flush=True)
    loop = GLib.MainLoop()
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        if server.stream:
            server.stream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
