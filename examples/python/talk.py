#!/usr/bin/python3
"""Portrait + speech -> MP4 (H.264 + AAC) or a preview window, with the liveavatar element driven from Python.

    examples/python/talk.py PORTRAIT.png SPEECH.wav OUT.mp4 [--size N] [--seed N] [--backend puppet|liveavatar]
    examples/python/talk.py PORTRAIT.png SPEECH.wav --preview

Prints the progress (position / duration) twice a second, the element's messages (model loading, warnings such as
"no face found", QoS) and, at the end, the frames made and how fast. GST_PLUGIN_PATH must reach
libgstliveavatar.so (`meson devenv -C build` sets it).
"""
import argparse
import os
import sys
import time

import gi

gi.require_version("Gst", "1.0")
from gi.repository import GLib, Gst  # noqa: E402


def make(factory, **props):
    element = Gst.ElementFactory.make(factory, None)
    if element is None:
        raise RuntimeError(f"GStreamer element {factory} is missing"
                           + (" (set GST_PLUGIN_PATH to the folder of libgstliveavatar.so)"
                              if factory == "liveavatar" else ""))
    for name, value in props.items():
        element.set_property(name.replace("_", "-"), value)
    return element


def link(*elements):
    for a, b in zip(elements, elements[1:]):
        if not a.link(b):
            raise RuntimeError(f"cannot link {a.get_name()} to {b.get_name()}")


def quote(path):
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def decoder_bin(description):
    """A bin from a launch description whose element named "out" gives the bin's src pad. (Ghosting every unlinked
    pad instead would also ghost the converter's sink pad that decodebin links to later.)"""
    bin_ = Gst.parse_bin_from_description(description, False)
    bin_.add_pad(Gst.GhostPad.new("src", bin_.get_by_name("out").get_static_pad("src")))
    return bin_


def build(args):
    """The file-to-MP4 pipeline of pipelines/file-to-mp4.sh, built element by element."""
    pipeline = Gst.Pipeline.new("talk")
    # The decoding ends are small bins with one ghost src pad, so decodebin's late pads need no handling here.
    image = decoder_bin(f"filesrc location={quote(args.portrait)} ! decodebin ! videoconvert name=out")
    speech = decoder_bin(f"filesrc location={quote(args.speech)} ! decodebin ! audioconvert ! audioresample ! "
                         "capsfilter name=out caps=\"audio/x-raw,rate=16000,channels=1\"")
    avatar = make("liveavatar", name="avatar", backend=args.backend, seed=args.seed)
    if args.size:
        avatar.set_property("width", args.size)
        avatar.set_property("height", args.size)
    tee = make("tee")
    to_avatar = [make("queue"), make("audioconvert"),
                 make("capsfilter", caps=Gst.Caps.from_string("audio/x-raw,format=F32LE"))]
    convert = make("videoconvert")
    for e in [image, speech, avatar, tee, convert] + to_avatar:
        pipeline.add(e)
    # The avatar's sink pads by name: both would accept a decoder's not-yet-known caps.
    if not image.link_pads("src", avatar, "image"):
        raise RuntimeError("cannot link the portrait to the avatar's image pad")
    link(speech, tee)
    link(tee, *to_avatar)
    if not to_avatar[-1].link_pads("src", avatar, "audio"):
        raise RuntimeError("cannot link the speech to the avatar's audio pad")

    if args.preview:
        sink = make("autovideosink")
        pipeline.add(sink)
        link(avatar, convert, sink)
        voice = [make("queue"), make("audioconvert"), make("audioresample"), make("autoaudiosink")]
        for e in voice:
            pipeline.add(e)
        link(tee, *voice)
    else:
        encode = [make("x264enc", speed_preset="veryfast", tune="zerolatency"), make("queue")]
        voice = [make("queue"), make("audioconvert"), make("avenc_aac"), make("queue")]
        mux, sink = make("mp4mux"), make("filesink", location=args.out)
        for e in encode + voice + [mux, sink]:
            pipeline.add(e)
        link(avatar, convert, *encode, mux)
        link(tee, *voice, mux)
        link(mux, sink)
    return pipeline, avatar


def main():
    parser = argparse.ArgumentParser(description="Make a portrait talk with the liveavatar GStreamer element")
    parser.add_argument("portrait")
    parser.add_argument("speech")
    parser.add_argument("out", nargs="?", help="output .mp4 (or use --preview)")
    parser.add_argument("--preview", action="store_true", help="show it in a window instead of writing a file")
    parser.add_argument("--size", type=int, default=0, help="square output size, even, 64 to 4096 (0: automatic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="puppet", choices=["puppet", "liveavatar"])
    args = parser.parse_args()
    if bool(args.out) == args.preview:
        parser.error("give an output file or --preview, not both")
    if args.size and not (64 <= args.size <= 4096 and args.size % 2 == 0):
        parser.error("--size must be even, 64 to 4096")
    if not 0 <= args.seed < 2 ** 64:
        parser.error("--seed must be 0 to 2^64 - 1")
    for path in (args.portrait, args.speech):
        if not os.access(path, os.R_OK):
            parser.error(f"cannot read {path}")

    Gst.init(None)
    try:
        pipeline, avatar = build(args)
    except (RuntimeError, GLib.Error) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    frames = 0

    def count(_pad, _info):
        nonlocal frames
        frames += 1
        return Gst.PadProbeReturn.OK
    avatar.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, count)

    loop = GLib.MainLoop()
    status = {"rc": 0}

    def on_message(_bus, msg):
        t = msg.type
        if t == Gst.MessageType.EOS:
            on_tick()   # the final position
            loop.quit()
        elif t == Gst.MessageType.ERROR:
            err, dbg = msg.parse_error()
            print(f"error from {msg.src.get_name()}: {err.message}", file=sys.stderr)
            if dbg:
                print(f"  debug: {dbg}", file=sys.stderr)
            status["rc"] = 1
            loop.quit()
        elif t == Gst.MessageType.WARNING and msg.src == avatar:
            print(f"warning from the avatar: {msg.parse_warning()[0].message}")
        elif t == Gst.MessageType.PROGRESS and msg.src == avatar:
            _kind, code, text = msg.parse_progress()
            print(f"avatar: {code}: {text}")
        elif t == Gst.MessageType.QOS and msg.src == avatar:
            fmt, processed, dropped = msg.parse_qos_stats()
            print(f"avatar QoS: {processed} frames processed, {dropped} dropped")
        elif t == Gst.MessageType.LATENCY:
            pipeline.recalculate_latency()
        return True

    def on_tick():
        ok_pos, pos = pipeline.query_position(Gst.Format.TIME)
        ok_dur, dur = pipeline.query_duration(Gst.Format.TIME)
        if ok_pos:
            total = f"{dur / Gst.SECOND:.2f} s" if ok_dur and dur > 0 else "?"
            pct = f" ({100 * pos / dur:.0f}%)" if ok_dur and dur > 0 else ""
            print(f"progress: {pos / Gst.SECOND:.2f} s / {total}{pct}, {frames} frames", flush=True)
        return True

    bus = pipeline.get_bus()
    bus.add_signal_watch()
    bus.connect("message", on_message)
    GLib.timeout_add(500, on_tick)
    start = time.monotonic()
    if pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
        print("error: the pipeline does not start (GST_DEBUG=3 tells why)", file=sys.stderr)
        status["rc"] = 1
    else:
        try:
            loop.run()
        except KeyboardInterrupt:
            status["rc"] = 130
    pipeline.set_state(Gst.State.NULL)
    bus.remove_signal_watch()
    elapsed = time.monotonic() - start
    video_s = frames / 25
    print(f"done: {frames} frames ({video_s:.2f} s of video) in {elapsed:.2f} s, "
          f"{video_s / elapsed if elapsed > 0 else 0:.1f}x real time" + (f" -> {args.out}" if args.out else ""))
    return status["rc"]


if __name__ == "__main__":
    sys.exit(main())
