#!/usr/bin/python3
"""WebRTC preview end to end: examples/webrtc/webrtc_preview.py streams the avatar through webrtcbin to a real
headless Chromium, driven over the DevTools protocol. Checks that the page connects, decodes and shows frames, that
the picture moves (two canvas grabs of the video differ, neither blank), and takes a screenshot of the page.

    test_webrtc.py [--tone] [SCREENSHOT.png]     (GST_PLUGIN_PATH must reach libgstliveavatar.so)

--tone drives the avatar with a live test tone instead of the speech file played at its pace (the latency printed
is then that of a live source, like a microphone).
"""
import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FRAMES_WANTED = 50   # 2 s of video decoded and shown


class Failure(Exception):
    pass


class DevTools:
    """The few DevTools protocol calls the test needs, on one page target."""

    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method, **params):
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise Failure(f"DevTools {method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression):
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise Failure(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")


# Draws the video into a canvas and returns the mean brightness, its spread and a checksum of the pixels.
GRAB = """(() => {
  const v = document.getElementById('video');
  if (!v.videoWidth) return null;
  const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d'); g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let sum = 0, sq = 0, hash = 0;
  for (let i = 0; i < d.length; i += 4) {
    const y = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += y; sq += y * y;
    hash = (hash * 31 + d[i] + 7 * d[i + 1] + 13 * d[i + 2]) % 1000000007;
  }
  const n = d.length / 4, mean = sum / n;
  return { width: c.width, height: c.height, mean: mean, std: Math.sqrt(sq / n - mean * mean), hash: hash };
})()"""


async def drive(devtools_port, page_url, screenshot):
    with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list", timeout=10) as r:
        targets = [t for t in json.load(r) if t["type"] == "page"]
    if not targets:
        raise Failure("Chromium has no page open")
    async with websockets.connect(targets[0]["webSocketDebuggerUrl"], max_size=2 ** 25) as ws:
        dt = DevTools(ws)
        await dt.call("Page.enable")
        await dt.call("Emulation.setDeviceMetricsOverride", width=560, height=288, deviceScaleFactor=1, mobile=False)
        await dt.call("Page.navigate", url=page_url)
        deadline = time.monotonic() + 30
        stats = None
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            stats = await dt.js("window.previewStats ? JSON.stringify(window.previewStats) : null")
            stats = json.loads(stats) if stats else None
            if stats and stats.get("error"):
                raise Failure(f"the page failed: {stats['error']}")
            if stats and stats["framesDecoded"] >= FRAMES_WANTED and stats["framesShown"] >= FRAMES_WANTED:
                break
        else:
            raise Failure(f"fewer than {FRAMES_WANTED} frames decoded and shown in 30 s: {stats}")
        first = await dt.js(GRAB)
        await asyncio.sleep(1.0)
        second = await dt.js(GRAB)
        later = json.loads(await dt.js("JSON.stringify(window.previewStats)"))
        shot = await dt.call("Page.captureScreenshot", format="png", clip={
            "x": 0, "y": 0, "width": 560, "height": 288, "scale": 1})
        with open(screenshot, "wb") as f:
            f.write(base64.b64decode(shot["data"]))

    if not first or not second:
        raise Failure("the video element has no picture")
    if (first["width"], first["height"]) != (256, 256):
        raise Failure(f"video is {first['width']}x{first['height']}, expected 256x256")
    for grab in (first, second):
        if grab["std"] < 10 or not 20 < grab["mean"] < 235:
            raise Failure(f"the picture looks blank: mean {grab['mean']:.1f}, spread {grab['std']:.1f}")
    if first["hash"] == second["hash"]:
        raise Failure("two pictures 1 s apart are identical: the video does not move")
    if later["framesDecoded"] < stats["framesDecoded"] + 15:
        raise Failure(f"frames decoded went from {stats['framesDecoded']} to {later['framesDecoded']} in over 1 s: "
                      "the stream stalls")
    lat = sorted(later["latencyMs"])
    median = lat[len(lat) // 2] if lat else None
    print(f"ok: Chromium: {later['state']}, {later['framesDecoded']} frames decoded, {later['framesShown']} shown; "
          f"picture mean {first['mean']:.0f} spread {first['std']:.0f}, moving; screenshot {screenshot} "
          f"({os.path.getsize(screenshot)} bytes)")
    if median is not None:
        print(f"speech-to-screen latency: median {median:.0f} ms over {len(lat)} frames "
              f"(min {lat[0]:.0f}, max {lat[-1]:.0f})")


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        for d in os.environ.get("PATH", "").split(os.pathsep):
            if os.access(os.path.join(d, name), os.X_OK):
                return os.path.join(d, name)
    return None


def stop(proc):
    """Ends a process this test started, and the processes it started (its own process group)."""
    if proc and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def main():
    chromium = find_chromium()
    if chromium is None:
        print("FAIL: no chromium on PATH (scripts/setup.sh installs Debian's chromium)")
        return 1
    server = browser = None
    with tempfile.TemporaryDirectory() as tmp:
        args = sys.argv[1:]
        tone = "--tone" in args
        args = [a for a in args if a != "--tone"]
        screenshot = args[0] if args else os.path.join(tmp, "webrtc-preview.png")
        try:
            server = subprocess.Popen(
                [sys.executable, os.path.join(SRC, "examples", "webrtc", "webrtc_preview.py"),
                 os.path.join(SRC, "examples", "assets", "portrait.png"),
                 *(["--tone"] if tone else ["--speech", os.path.join(SRC, "examples", "assets", "speech.wav")]),
                 "--port", "0", "--size", "256"],
                stdout=subprocess.PIPE, text=True, start_new_session=True)
            line = server.stdout.readline()
            m = re.match(r"serving (http://\S+)", line)
            if not m:
                raise Failure(f"webrtc_preview.py did not start (said {line!r}, exit {server.poll()})")
            page_url = m.group(1)
            profile = os.path.join(tmp, "profile")
            # WebRtcHideLocalIpsWithMdns off: give libnice real host addresses instead of .local names it cannot
            # resolve; loopback allowed in case the machine has no other interface.
            browser = subprocess.Popen(
                [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=600,320",
                 "--autoplay-policy=no-user-gesture-required", "--allow-loopback-in-peer-connection",
                 "--disable-features=WebRtcHideLocalIpsWithMdns", "--disable-dev-shm-usage", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            port_file = os.path.join(profile, "DevToolsActivePort")
            for _ in range(300):
                if os.path.exists(port_file) and open(port_file).read().strip():
                    break
                if browser.poll() is not None:
                    raise Failure(f"Chromium exited with {browser.returncode}")
                time.sleep(0.1)
            else:
                raise Failure("Chromium did not open its DevTools port in 30 s")
            devtools_port = int(open(port_file).read().split()[0])
            asyncio.run(asyncio.wait_for(drive(devtools_port, page_url, screenshot), 90))
        except Failure as e:
            print(f"FAIL: {e}")
            return 1
        finally:
            stop(browser)
            stop(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
