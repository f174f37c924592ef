// liveavatar-render: offline rendering with the engine alone (no GStreamer): portrait + audio -> frames.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "cli_args.h"
#include "liveavatar/engine.h"
#include "media_io.h"

namespace {

const char kUsage[] =
    "usage: liveavatar-render IMAGE.png AUDIO.wav [options]\n"
    "  --y4m FILE            write all frames as a YUV4MPEG2 (C444) stream\n"
    "  --contact-sheet FILE  write a PNG grid of frames (see --sheet-frames, --columns)\n"
    "  --sheet-frames N      frames on the contact sheet, evenly spread (default 12)\n"
    "  --columns N           contact sheet columns (default 6)\n"
    "  --size WxH            output size (default: from the portrait)\n"
    "  --seed N              random seed (default 0)\n"
    "  --mouth-box x,y,w,h   mouth rectangle in portrait pixels (default: detected)\n"
    "Audio must be 16 kHz (resample with: ffmpeg -i in.wav -ac 1 -ar 16000 out.wav).\n";

void write_y4m_frame(std::ofstream& out, const liveavatar::Frame& f) {
  // C444 planar Y'CbCr (BT.601 limited range), so nothing is subsampled.
  const size_t n = static_cast<size_t>(f.width) * f.height;
  std::vector<uint8_t> planes(n * 3);
  for (size_t i = 0; i < n; ++i) {
    const float r = f.rgb[i * 3], g = f.rgb[i * 3 + 1], b = f.rgb[i * 3 + 2];
    planes[i] = static_cast<uint8_t>(16.5f + 0.257f * r + 0.504f * g + 0.098f * b);
    planes[n + i] = static_cast<uint8_t>(128.5f - 0.148f * r - 0.291f * g + 0.439f * b);
    planes[2 * n + i] = static_cast<uint8_t>(128.5f + 0.439f * r - 0.368f * g - 0.071f * b);
  }
  out << "FRAME\n";
  out.write(reinterpret_cast<const char*>(planes.data()), static_cast<std::streamsize>(planes.size()));
}

int run(int argc, char** argv) {
  std::vector<std::string> pos;
  std::string y4m, sheet;
  int sheet_frames = 12, columns = 6;
  liveavatar::EngineConfig config;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw liveavatar::Error(a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--y4m") {
      y4m = value();
    } else if (a == "--contact-sheet") {
      sheet = value();
    } else if (a == "--sheet-frames") {
      sheet_frames = static_cast<int>(liveavatar::cli::parse_long(a, value(), 1, 100));
    } else if (a == "--columns") {
      columns = static_cast<int>(liveavatar::cli::parse_long(a, value(), 1, 20));
    } else if (a == "--size") {
      const auto s = liveavatar::cli::parse_size(a, value());
      config.width = s.width;
      config.height = s.height;
    } else if (a == "--seed") {
      config.seed = static_cast<uint64_t>(liveavatar::cli::parse_long(a, value(), 0, 0x7fffffffL));
    } else if (a == "--mouth-box") {
      config.mouth_box = liveavatar::cli::parse_rect(a, value());
    } else if (!a.empty() && a[0] == '-') {
      throw liveavatar::Error("unknown option " + a + "\n" + kUsage);
    } else {
      pos.push_back(a);
    }
  }
  if (pos.size() != 2) throw liveavatar::Error(std::string("expected IMAGE and AUDIO\n") + kUsage);

  const auto image = liveavatar::io::read_png(pos[0]);
  int rate = 0;
  const auto audio = liveavatar::io::read_audio(pos[1], &rate);
  if (rate != config.sample_rate)
    throw liveavatar::Error(pos[1] + " is " + std::to_string(rate) + " Hz; resample it to 16000 Hz mono first");

  auto engine = liveavatar::Engine::create(config);
  engine->set_reference(image.view());
  for (const auto& w : engine->take_warnings()) std::fprintf(stderr, "warning: %s\n", w.c_str());
  const auto size = engine->output_size();
  const auto layout = engine->face_layout();
  std::fprintf(stderr, "output %dx%d, face %s at %d,%d %dx%d, mouth %d,%d %dx%d\n", size.width, size.height,
               layout.detected ? "found" : "not found (default layout)", layout.face.x, layout.face.y,
               layout.face.width, layout.face.height, layout.mouth.x, layout.mouth.y, layout.mouth.width,
               layout.mouth.height);

  std::ofstream out;
  if (!y4m.empty()) {
    out.open(y4m, std::ios::binary);
    if (!out) throw liveavatar::Error("cannot write " + y4m);
    out << "YUV4MPEG2 W" << size.width << " H" << size.height << " F25:1 Ip A1:1 C444\n";
  }
  const int64_t total = (static_cast<int64_t>(audio.size()) + engine->samples_per_frame() - 1) /
                        engine->samples_per_frame();
  std::vector<std::vector<uint8_t>> picked;
  liveavatar::Frame f;
  int64_t count = 0;
  auto drain = [&] {
    while (engine->pop_frame(&f)) {
      if (out.is_open()) write_y4m_frame(out, f);
      if (!sheet.empty() && total > 0 &&
          static_cast<int64_t>(picked.size()) < sheet_frames &&
          f.index == static_cast<int64_t>(picked.size()) * total / sheet_frames)
        picked.push_back(f.rgb);
      ++count;
    }
  };
  const size_t chunk = 1600;  // 100 ms, as a live source would deliver
  for (size_t i = 0; i < audio.size(); i += chunk) {
    engine->push_audio(audio.data() + i, std::min(chunk, audio.size() - i));
    drain();
  }
  engine->finish();
  drain();
  if (!sheet.empty() && !picked.empty())
    liveavatar::io::write_contact_sheet(sheet, picked, size.width, size.height, columns, 256);
  std::fprintf(stderr, "%lld frames for %.3f s of audio\n", static_cast<long long>(count),
               audio.size() / static_cast<double>(rate));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "liveavatar-render: %s\n", e.what());
    return 1;
  }
}
