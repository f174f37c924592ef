#!/usr/bin/python3
"""Runs the OBS source pipeline (pipelines/obs-source.sh) the way obs-gstreamer does: the converter + appsink pairs
that `video.` and `audio.` link to, followed by the pasted string, pulls every sample from both appsinks and checks
the frame count, the timestamps and that picture and sound line up. Twice: driven by a speech file, and by a live
source (audiotestsrc is-live=true standing in for the microphone).

    test_obs_source.py            (GST_PLUGIN_PATH must reach libgstliveavatar.so)
"""
import math
import os
import subprocess
import sys
import tempfile
import threading

import gi

gi.require_version("Gst", "1.0")
from gi.repository import GLib, Gst  # noqa: E402

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FRAME_NS = Gst.SECOND // 25
# What obs-gstreamer puts in front of the pasted pipeline: a converter named "video" and one named "audio", each
# feeding an appsink that takes the raw formats OBS can show or mix; both appsinks sync to the clock by default.
OBS_HEAD = ("videoconvert name=video ! video/x-raw,format={I420,NV12,BGRA,BGRx,RGBx,RGBA,YUY2,YVYU,UYVY} ! "
            "appsink name=video_appsink sync=true "
            "audioconvert name=audio ! audioresample ! "
            "audio/x-raw,format={U8,S16LE,S32LE,F32LE},channels={1,2,3,4,5,6,8},layout=interleaved ! "
            "appsink name=audio_appsink sync=true ")


class Failure(Exception):
    pass


def run_source(description, timeout_s=60):
    """Plays OBS_HEAD + description to EOS; returns the samples of each appsink as (running time, duration, caps,
    buffer bytes or sample count)."""
    pipeline = Gst.parse_launch(OBS_HEAD + description)
    got = {"video": [], "audio": []}

    def on_sample(sink, kind):
        sample = sink.emit("pull-sample")
        buf, seg, caps = sample.get_buffer(), sample.get_segment(), sample.get_caps()
        rt = seg.to_running_time(Gst.Format.TIME, buf.pts)
        if kind == "video":
            ok, info = buf.map(Gst.MapFlags.READ)
            payload = hash(bytes(info.data)) if ok else None
            if ok:
                buf.unmap(info)
        else:
            payload = buf.get_size() // caps.get_structure(0).get_value("channels") // \
                {"U8": 1, "S16LE": 2, "S32LE": 4, "F32LE": 4}[caps.get_structure(0).get_value("format")]
        got[kind].append((rt, buf.duration, caps, payload))
        return Gst.FlowReturn.OK

    for kind in got:
        sink = pipeline.get_by_name(kind + "_appsink")
        sink.set_property("emit-signals", True)
        sink.connect("new-sample", on_sample, kind)

    loop = GLib.MainLoop()
    result = {}

    def on_message(_bus, msg):
        if msg.type == Gst.MessageType.EOS:
            loop.quit()
        elif msg.type == Gst.MessageType.ERROR:
            err, dbg = msg.parse_error()
            result["error"] = f"{msg.src.get_name()}: {err.message} ({dbg})"
            loop.quit()

    bus = pipeline.get_bus()
    bus.add_signal_watch()
    bus.connect("message", on_message)
    timer = threading.Timer(timeout_s, lambda: (result.setdefault("error", f"no EOS after {timeout_s} s"),
                                                loop.quit()))
    timer.start()
    pipeline.set_state(Gst.State.PLAYING)
    loop.run()
    timer.cancel()
    pipeline.set_state(Gst.State.NULL)
    bus.remove_signal_watch()
    if "error" in result:
        raise Failure(result["error"])
    return got


def check(label, got, audio_seconds, size):
    video, audio = got["video"], got["audio"]
    want = math.ceil(audio_seconds * 25 - 1e-9)
    if len(video) != want:
        raise Failure(f"{label}: {len(video)} video frames, expected ceil({audio_seconds} s x 25) = {want}")
    s = video[0][2].get_structure(0)
    if (s.get_value("width"), s.get_value("height")) != size:
        raise Failure(f"{label}: video {s.get_value('width')}x{s.get_value('height')}, expected {size}")
    for n, (rt, dur, _caps, _) in enumerate(video):
        if rt != video[0][0] + n * FRAME_NS or dur != FRAME_NS:
            raise Failure(f"{label}: frame {n} at {rt} ns lasting {dur} ns, expected "
                          f"{video[0][0] + n * FRAME_NS} ns lasting {FRAME_NS} ns (25 fps without gaps)")
    distinct = len({v[3] for v in video})
    if distinct < len(video) // 2:
        raise Failure(f"{label}: only {distinct} different pictures in {len(video)} frames: the avatar does not move")

    rate = audio[0][2].get_structure(0).get_value("rate")
    samples = sum(a[3] for a in audio)
    a_start, a_end = audio[0][0], audio[-1][0] + audio[-1][1]
    if abs(samples / rate - audio_seconds) > 0.001:
        raise Failure(f"{label}: {samples} audio samples at {rate} Hz, expected {audio_seconds} s")
    # Picture and sound start together and the video ends with the frame that covers the last sound.
    v_start, v_end = video[0][0], video[-1][0] + FRAME_NS
    if abs(v_start - a_start) > Gst.MSECOND:
        raise Failure(f"{label}: video starts at {v_start / 1e9:.3f} s, audio at {a_start / 1e9:.3f} s")
    if not 0 <= v_end - a_end < FRAME_NS:
        raise Failure(f"{label}: video ends at {v_end / 1e9:.3f} s, audio at {a_end / 1e9:.3f} s: "
                      "expected within the last frame")
    print(f"ok: {label}: {len(video)} frames {size[0]}x{size[1]} {s.get_value('format')} every 40 ms from "
          f"{v_start / 1e9:.3f} s to {v_end / 1e9:.3f} s ({distinct} different); audio {samples} samples at {rate} Hz "
          f"from {a_start / 1e9:.3f} s to {a_end / 1e9:.3f} s")


def main():
    Gst.init(None)
    if Gst.ElementFactory.find("liveavatar") is None:
        print("FAIL: liveavatar not found (GST_PLUGIN_PATH)")
        return 1
    portrait = os.path.join(SRC, "examples", "assets", "portrait.png")
    script = os.path.join(SRC, "pipelines", "obs-source.sh")
    with tempfile.TemporaryDirectory() as tmp:
        speech = os.path.join(tmp, "speech3.wav")
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", os.path.join(SRC, "examples", "assets", "speech.wav"),
                        "-t", "3", speech], check=True)
        try:
            # 1. The speech file (what the user pastes to play a recording).
            desc = subprocess.run([script, portrait, speech, "width=256", "height=256"], check=True,
                                  capture_output=True, text=True).stdout.strip()
            check("speech file", run_source(desc), 3.0, (256, 256))
            # 2. A live source in place of the microphone: 2 s of 48 kHz ticks, in 10 ms buffers.
            desc = subprocess.run([script, portrait, "width=192", "height=192"], check=True,
                                  capture_output=True, text=True).stdout.strip()
            if "autoaudiosrc" not in desc:
                raise Failure("obs-source.sh without a speech file does not use the microphone (autoaudiosrc)")
            desc = desc.replace("autoaudiosrc", "audiotestsrc is-live=true wave=ticks num-buffers=200 "
                                "samplesperbuffer=480 ! audio/x-raw,rate=48000,channels=1")
            check("live source", run_source(desc), 2.0, (192, 192))
        except Failure as e:
            print(f"FAIL: {e}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
