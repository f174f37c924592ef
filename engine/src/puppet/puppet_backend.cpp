// Backend "puppet": animates the portrait itself with smooth local warps. CPU only, no model weights.
//   mouth  - the jaw drops and the lips part over a dark mouth interior, driven by MouthTracker
//   eyes   - the upper lids slide down at natural random intervals (seeded)
//   head   - slow breathing and sway, small nods while speaking, as one affine warp of the whole frame
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <opencv2/imgproc.hpp>
#include <random>

#include "../backend.h"
#include "audio_features.h"
#include "face_layout.h"

namespace liveavatar {
namespace {

using puppet::MouthShape;

constexpr float kPi = 3.14159265358979f;
// Eyelid closure over the frames of one blink (about 0.28 s at 25 fps): fast close, slower open.
constexpr float kBlinkProfile[] = {0.35f, 0.8f, 1.f, 0.9f, 0.6f, 0.3f, 0.1f};
constexpr int kBlinkFrames = sizeof(kBlinkProfile) / sizeof(kBlinkProfile[0]);

float raised_cos(float u) { return u >= 1.f ? 0.f : 0.5f * (1.f + std::cos(kPi * u)); }
float smoothstep(float e0, float e1, float x) {
  float t = std::clamp((x - e0) / (e1 - e0), 0.f, 1.f);
  return t * t * (3.f - 2.f * t);
}

cv::Rect clip(const cv::Rect& r, const cv::Mat& m) { return r & cv::Rect(0, 0, m.cols, m.rows); }

struct FrameState {
  int64_t index;
  MouthShape mouth;
  float blink;
};

class PuppetBackend final : public Backend {
 public:
  explicit PuppetBackend(const EngineConfig& config)
      : config_(config),
        detector_(config.cascade_dir),
        tracker_(config.sample_rate,
                 static_cast<int>(static_cast<int64_t>(config.sample_rate) * config.fps_d / config.fps_n)) {
    spf_ = static_cast<int>(static_cast<int64_t>(config.sample_rate) * config.fps_d / config.fps_n);
    fps_ = static_cast<float>(config.fps_n) / config.fps_d;
    reset();
  }

  void set_reference(const RgbImage& image, Size output, std::vector<std::string>* warnings) override {
    reference_ = cv::Mat(image.height, image.width, CV_8UC3, const_cast<uint8_t*>(image.data.data())).clone();
    ref_layout_ = detector_.detect(reference_);
    if (!config_.mouth_box.empty()) {
      const Rect& m = config_.mouth_box;
      if (m.x < 0 || m.y < 0 || m.x + m.width > image.width || m.y + m.height > image.height)
        throw Error("mouth box " + std::to_string(m.x) + "," + std::to_string(m.y) + "," + std::to_string(m.width) +
                    "," + std::to_string(m.height) + " lies outside the " + std::to_string(image.width) + "x" +
                    std::to_string(image.height) + " reference image: give x,y,width,height in its pixels");
      ref_layout_.mouth = m;
    } else if (!ref_layout_.detected && warnings) {
      warnings->push_back(
          "no face found in the reference image: using a centred default layout. Use a frontal portrait with the "
          "face at least 1/10 of the image, or set the mouth box by hand");
    }
    fit(output);
  }

  void set_output_size(Size output) override { fit(output); }
  FaceLayout face_layout() const override { return layout_; }

  void push_audio_frames(const float* samples, int frames) override {
    for (int f = 0; f < frames; ++f) {
      FrameState st;
      st.index = next_audio_index_++;
      st.mouth = tracker_.push_frame(samples + static_cast<size_t>(f) * spf_);
      st.blink = next_blink(st.index);
      pending_.push_back(st);
    }
  }

  bool render_next(Frame* frame) override {
    if (pending_.empty() || base_.empty()) return false;
    const FrameState st = pending_.front();
    pending_.pop_front();
    render(st, frame);
    return true;
  }

  bool skip_next() override {
    if (pending_.empty()) return false;
    pending_.pop_front();
    return true;
  }

  void reset() override {
    tracker_.reset();
    pending_.clear();
    next_audio_index_ = 0;
    rng_.seed(config_.seed);
    for (float& p : phase_) p = 2.f * kPi * uniform();
    next_blink_start_ = static_cast<int64_t>(fps_ * (1.0f + 3.0f * uniform()));
    double_blink_ = false;
  }

 private:
  // A uniform number in [0, 1) from the raw 64-bit Mersenne Twister output, which the C++ standard fixes exactly
  // (std::uniform_real_distribution is not portable across standard libraries).
  float uniform() { return static_cast<float>((rng_() >> 40) * (1.0 / 16777216.0)); }

  float next_blink(int64_t index) {
    if (index >= next_blink_start_ + kBlinkFrames) {
      // Schedule the next blink: 2-6 s apart, sometimes a quick double blink.
      if (!double_blink_ && uniform() < 0.12f) {
        double_blink_ = true;
        next_blink_start_ += kBlinkFrames + 2;
      } else {
        double_blink_ = false;
        next_blink_start_ += kBlinkFrames + static_cast<int64_t>(fps_ * (2.f + 4.f * uniform()));
      }
    }
    const int64_t k = index - next_blink_start_;
    return k >= 0 && k < kBlinkFrames ? kBlinkProfile[k] : 0.f;
  }

  // Scales the reference to cover the output size, cropping around the face.
  void fit(Size out) {
    if (reference_.empty()) return;
    const double s = std::max(static_cast<double>(out.width) / reference_.cols,
                              static_cast<double>(out.height) / reference_.rows);
    const double fcx = (ref_layout_.face.x + ref_layout_.face.width / 2.0) * s;
    const double fcy = (ref_layout_.face.y + ref_layout_.face.height / 2.0) * s;
    const double sw = reference_.cols * s, sh = reference_.rows * s;
    const double ox = std::clamp(fcx - out.width / 2.0, 0.0, std::max(0.0, sw - out.width));
    const double oy = std::clamp(fcy - out.height / 2.0, 0.0, std::max(0.0, sh - out.height));
    cv::Mat scaled;
    const cv::Size scaled_size(std::max(out.width, static_cast<int>(std::lround(sw))),
                               std::max(out.height, static_cast<int>(std::lround(sh))));
    cv::resize(reference_, scaled, scaled_size, 0, 0, s < 1.0 ? cv::INTER_AREA : cv::INTER_LINEAR);
    const cv::Rect crop(static_cast<int>(std::min<double>(ox, scaled.cols - out.width)),
                        static_cast<int>(std::min<double>(oy, scaled.rows - out.height)), out.width, out.height);
    base_ = scaled(crop).clone();
    auto map = [&](const Rect& r) {
      return Rect{static_cast<int>(std::lround(r.x * s - ox)), static_cast<int>(std::lround(r.y * s - oy)),
                  static_cast<int>(std::lround(r.width * s)), static_cast<int>(std::lround(r.height * s))};
    };
    layout_.face = map(ref_layout_.face);
    layout_.left_eye = map(ref_layout_.left_eye);
    layout_.right_eye = map(ref_layout_.right_eye);
    layout_.mouth = map(ref_layout_.mouth);
    layout_.detected = ref_layout_.detected;
    work_ = base_.clone();
    pick_mouth_colours();
  }

  // The mouth interior takes its colour from the portrait: the darkest pixels around the lips, darkened further
  // (a grey portrait gets a grey mouth). Teeth are hinted only where the portrait shows teeth-like pixels.
  void pick_mouth_colours() {
    const Rect& m = layout_.mouth;
    const cv::Rect box = clip(cv::Rect(m.x, m.y, m.width, m.height), base_);
    std::vector<std::pair<int, cv::Vec3b>> px;
    for (int y = box.y; y < box.y + box.height; ++y)
      for (int x = box.x; x < box.x + box.width; ++x) {
        const cv::Vec3b p = base_.at<cv::Vec3b>(y, x);
        px.emplace_back(p[0] * 299 + p[1] * 587 + p[2] * 114, p);
      }
    cavity_ = cv::Vec3f(60.f, 22.f, 26.f);
    teeth_ = cv::Vec3f(0.f, 0.f, 0.f);
    if (px.size() < 10) return;
    std::sort(px.begin(), px.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    const size_t n = std::max<size_t>(1, px.size() / 7);
    cv::Vec3f dark(0, 0, 0), light(0, 0, 0);
    for (size_t i = 0; i < n; ++i) {
      dark += cv::Vec3f(px[i].second);
      light += cv::Vec3f(px[px.size() - 1 - i].second);
    }
    dark /= static_cast<float>(n);
    light /= static_cast<float>(n);
    cavity_ = dark * 0.55f;
    const float lmax = std::max({light[0], light[1], light[2]}), lmin = std::min({light[0], light[1], light[2]});
    if (lmax > 150.f && lmax - lmin < 60.f) teeth_ = light;  // bright and nearly grey: teeth
  }

  void render(const FrameState& st, Frame* frame) {
    base_.copyTo(work_);
    warp_mouth(st.mouth);
    if (st.blink > 0.f) {
      warp_eye(layout_.left_eye, st.blink);
      warp_eye(layout_.right_eye, st.blink);
    }
    frame->index = st.index;
    frame->width = base_.cols;
    frame->height = base_.rows;
    frame->rgb.resize(static_cast<size_t>(base_.cols) * base_.rows * 3);
    frame->mouth_open = st.mouth.open;
    frame->blink = st.blink;
    cv::Mat out(base_.rows, base_.cols, CV_8UC3, frame->rgb.data());
    cv::warpAffine(work_, out, head_motion(st), out.size(), cv::INTER_LINEAR, cv::BORDER_REFLECT101);
  }

  // Breathing, slow sway and small speech nods: rotation about the neck plus a vertical shift, scaled to the face.
  cv::Mat head_motion(const FrameState& st) const {
    const float t = st.index / fps_;
    const float fh = static_cast<float>(std::max(layout_.face.height, 16));
    const float breath = std::sin(2.f * kPi * t / 4.6f + phase_[0]);
    const float angle_deg = 0.7f * std::sin(2.f * kPi * 0.09f * t + phase_[1]) +
                            0.35f * std::sin(2.f * kPi * 0.21f * t + phase_[2]) +
                            0.5f * st.mouth.level * std::sin(2.f * kPi * 0.7f * t + phase_[3]);
    const float dy = fh * (0.006f * breath + 0.012f * st.mouth.level * std::sin(2.f * kPi * 1.6f * t + phase_[4]));
    const float dx = fh * 0.006f * std::sin(2.f * kPi * 0.13f * t + phase_[5]);
    const float sy = 1.f + 0.0035f * breath;  // chest and shoulders rise a little
    const cv::Point2f pivot(layout_.face.x + layout_.face.width / 2.f, layout_.face.y + 1.25f * fh);
    const float a = angle_deg * kPi / 180.f, c = std::cos(a), s = std::sin(a);
    // x' = R * S * (x - p) + p + (dx, dy)
    cv::Mat m = (cv::Mat_<double>(2, 3) << c, -s * sy, 0, s, c * sy, 0);
    m.at<double>(0, 2) = pivot.x - (c * pivot.x - s * sy * pivot.y) + dx;
    m.at<double>(1, 2) = pivot.y - (s * pivot.x + c * sy * pivot.y) + dy;
    return m;
  }

  // Opens the mouth: rows below the lip line move down (jaw drop, fading out under the chin), the upper lip lifts
  // slightly, and the gap between the lips is filled with a shaded mouth interior. Corners stay put.
  void warp_mouth(const MouthShape& shape) {
    if (shape.open <= 0.f) return;
    const Rect& m = layout_.mouth;
    const float mw = static_cast<float>(std::max(m.width, 8));
    const float cx = m.x + m.width / 2.f, ly = m.y + m.height / 2.f;
    const float d = shape.open * mw * 0.32f;                       // lip parting at the centre, pixels
    const float chin = std::max(ly + 0.3f * mw, layout_.face.y + 1.02f * layout_.face.height);
    const float fall = 0.45f * mw;                                 // jaw motion fades out below the chin
    const float up = std::max(2.f, 0.6f * m.height);               // upper-lip region that lifts
    const float half = 0.5f * mw * (0.9f + 0.2f * shape.wide);     // half mouth width at the lip line
    const cv::Rect roi = clip(cv::Rect(static_cast<int>(cx - 1.2f * mw), static_cast<int>(ly - up - 2),
                                       static_cast<int>(2.4f * mw), static_cast<int>(chin + fall - ly + up + 4)),
                              work_);
    if (roi.empty()) return;
    map_x_.create(roi.size(), CV_32FC1);
    map_y_.create(roi.size(), CV_32FC1);
    alpha_.create(roi.size(), CV_32FC1);
    for (int r = 0; r < roi.height; ++r) {
      const float y = static_cast<float>(roi.y + r);
      float* mx = map_x_.ptr<float>(r);
      float* my = map_y_.ptr<float>(r);
      float* al = alpha_.ptr<float>(r);
      // The moving region widens from the mouth at the lip line to the jaw at the chin.
      const float grow = smoothstep(ly, chin, y);
      const float hw = y >= ly ? half * (1.1f + 0.9f * grow) : half * 1.1f;
      for (int c = 0; c < roi.width; ++c) {
        const float x = static_cast<float>(roi.x + c);
        const float wx = raised_cos(std::fabs(x - cx) / hw);
        float disp;
        if (y >= ly) {
          const float fy = y <= chin ? 1.f : raised_cos((y - chin) / fall);
          disp = d * wx * fy;
        } else {
          disp = -0.15f * d * wx * raised_cos((ly - y) / up);
        }
        mx[c] = x;
        my[c] = y - disp;
        // Mouth interior between the parted lips: from the lifted upper lip to the lowered lower lip.
        const float top = ly - 0.15f * d * wx, bot = ly + d * wx;
        const float gap = bot - top;
        al[c] = gap > 0.3f ? smoothstep(top - 0.5f, top + 1.f, y) * (1.f - smoothstep(bot - 1.f, bot + 0.5f, y)) *
                                 std::min(1.f, gap / 3.f)
                           : 0.f;
      }
    }
    cv::Mat dst = work_(roi);
    cv::remap(base_, dst, map_x_, map_y_, cv::INTER_LINEAR, cv::BORDER_REPLICATE);
    // Shade: dark red throat, a hint of upper teeth right under the upper lip when open wide enough.
    for (int r = 0; r < roi.height; ++r) {
      const float y = static_cast<float>(roi.y + r);
      const float* al = alpha_.ptr<float>(r);
      uint8_t* px = dst.ptr<uint8_t>(r);
      for (int c = 0; c < roi.width; ++c, px += 3) {
        const float a = al[c];
        if (a <= 0.f) continue;
        const float x = static_cast<float>(roi.x + c);
        const float wx = raised_cos(std::fabs(x - cx) / (half * 1.1f));
        const float top = ly - 0.15f * d * wx, gap = 1.15f * d * wx;
        const float v = gap > 0 ? (y - top) / gap : 1.f;  // 0 at the upper lip .. 1 at the lower lip
        const float teeth = gap > 5.f && teeth_[0] > 0.f ? (1.f - smoothstep(0.1f, 0.3f, v)) * 0.5f : 0.f;
        const float shade = 1.25f - 0.5f * v;  // darker towards the throat
        for (int k = 0; k < 3; ++k) {
          const float want = cavity_[k] * shade * (1.f - teeth) + teeth_[k] * teeth;
          px[k] = static_cast<uint8_t>(std::clamp(px[k] * (1.f - a) + want * a, 0.f, 255.f));
        }
      }
    }
  }

  // Closes one eye: the upper lid slides down over the opening; the lower lid barely moves.
  void warp_eye(const Rect& e, float blink) {
    if (e.empty()) return;
    const float ew = static_cast<float>(e.width);
    const float cx = e.x + ew / 2.f, cy = e.y + e.height / 2.f;
    const float h = std::max(2.f, 0.42f * ew);  // lid travel for a full closure
    const float top = cy - 1.3f * h, low = cy + 0.3f * h, end = cy + 0.65f * h;
    const cv::Rect roi = clip(cv::Rect(static_cast<int>(cx - 0.7f * ew), static_cast<int>(top) - 1,
                                       static_cast<int>(1.4f * ew), static_cast<int>(end - top) + 3),
                              work_);
    if (roi.empty()) return;
    map_x_.create(roi.size(), CV_32FC1);
    map_y_.create(roi.size(), CV_32FC1);
    for (int r = 0; r < roi.height; ++r) {
      const float y = static_cast<float>(roi.y + r);
      const float fy = y <= low ? smoothstep(top, low, y) : 1.f - smoothstep(low, end, y);
      float* mx = map_x_.ptr<float>(r);
      float* my = map_y_.ptr<float>(r);
      for (int c = 0; c < roi.width; ++c) {
        const float x = static_cast<float>(roi.x + c);
        mx[c] = x;
        my[c] = y - blink * 0.95f * h * fy * raised_cos(std::fabs(x - cx) / (0.62f * ew));
      }
    }
    cv::Mat dst = work_(roi);
    cv::remap(base_, dst, map_x_, map_y_, cv::INTER_LINEAR, cv::BORDER_REPLICATE);
  }

  EngineConfig config_;
  puppet::FaceDetector detector_;
  puppet::MouthTracker tracker_;
  int spf_ = 640;
  float fps_ = 25.f;
  cv::Mat reference_;
  FaceLayout ref_layout_;
  cv::Mat base_, work_;
  cv::Mat map_x_, map_y_, alpha_;
  cv::Vec3f cavity_, teeth_;  // mouth interior colours picked from the portrait
  FaceLayout layout_;
  std::deque<FrameState> pending_;
  int64_t next_audio_index_ = 0;
  std::mt19937_64 rng_;
  float phase_[6] = {};
  int64_t next_blink_start_ = 0;
  bool double_blink_ = false;
};

}  // namespace

std::unique_ptr<Backend> make_puppet_backend(const EngineConfig& config) {
  return std::make_unique<PuppetBackend>(config);
}

}  // namespace liveavatar
