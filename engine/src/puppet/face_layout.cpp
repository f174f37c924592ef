// SPDX-License-Identifier: LGPL-2.1-or-later
#include "face_layout.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <opencv2/imgproc.hpp>
#include <vector>

#ifndef LIVEAVATAR_CASCADE_DIR
#define LIVEAVATAR_CASCADE_DIR "/usr/share/opencv4/haarcascades"
#endif

namespace liveavatar::puppet {

namespace {

constexpr int kDetectMaxSide = 640;  // detection runs on a copy at most this large

Rect to_rect(const cv::Rect& r, double s) {
  return {static_cast<int>(r.x * s), static_cast<int>(r.y * s), static_cast<int>(r.width * s),
          static_cast<int>(r.height * s)};
}

Rect eye_from_face(const Rect& f, bool left) {
  // left = the eye on the image's left side
  const int w = f.width * 22 / 100, h = f.height * 12 / 100;
  const int cx = f.x + f.width * (left ? 31 : 69) / 100, cy = f.y + f.height * 40 / 100;
  return {cx - w / 2, cy - h / 2, w, h};
}

void load(cv::CascadeClassifier& c, const std::string& dir, const char* file) {
  const std::string path = dir + "/" + file;
  bool ok = false;
  try {
    if (!std::ifstream(path).good()) throw cv::Exception();
    ok = c.load(path);
  } catch (const cv::Exception&) {
    ok = false;
  }
  if (!ok)
    throw Error("cannot load the face detector " + path +
                ": install Debian's opencv-data package, or point LIVEAVATAR_CASCADE_DIR (or the cascade-dir "
                "setting) at a folder with OpenCV's Haar cascades");
}

}  // namespace

FaceDetector::FaceDetector(const std::string& cascade_dir) {
  std::string dir = cascade_dir;
  if (dir.empty()) {
    const char* env = std::getenv("LIVEAVATAR_CASCADE_DIR");
    dir = env && *env ? env : LIVEAVATAR_CASCADE_DIR;
  }
  load(face_, dir, "haarcascade_frontalface_default.xml");
  load(eye_, dir, "haarcascade_eye.xml");
}

FaceLayout default_layout(int width, int height) {
  FaceLayout l;
  const int fw = std::min(width, height) * 40 / 100;
  const int fh = fw * 125 / 100;
  l.face = {(width - fw) / 2, std::max(0, height * 42 / 100 - fh / 2), fw, fh};
  l.left_eye = eye_from_face(l.face, true);
  l.right_eye = eye_from_face(l.face, false);
  const int mw = fw * 44 / 100, mh = fh * 14 / 100;
  l.mouth = {l.face.x + (fw - mw) / 2, l.face.y + fh * 82 / 100 - mh / 2, mw, mh};
  l.detected = false;
  return l;
}

Rect estimate_mouth(const cv::Mat& gray, const Rect& f) {
  const int mw = f.width * 44 / 100, mh = f.height * 14 / 100;
  const int cx = f.x + f.width / 2;
  // The gap between the lips is the darkest horizontal line of the lower face. Search rows 72%..94% of the
  // detector's face box (the nostrils above are dark too) over the central half of the mouth, averaging 3 rows,
  // with a mild preference for the typical position at 82%.
  const int prior = f.y + f.height * 82 / 100;
  const int y0 = std::max(1, f.y + f.height * 72 / 100), y1 = std::min(gray.rows - 2, f.y + f.height * 94 / 100);
  const int x0 = std::max(0, cx - mw / 4), x1 = std::min(gray.cols, cx + mw / 4);
  int best_y = prior;
  if (y1 > y0 && x1 > x0) {
    double best = 1e30;
    for (int y = y0; y <= y1; ++y) {
      double sum = 0;
      for (int dy = -1; dy <= 1; ++dy) {
        const uint8_t* row = gray.ptr<uint8_t>(y + dy);
        for (int x = x0; x < x1; ++x) sum += row[x];
      }
      const double mean = sum / (3.0 * (x1 - x0));
      const double score = mean + 40.0 * std::abs(y - prior) / f.height;
      if (score < best) {
        best = score;
        best_y = y;
      }
    }
  }
  return {cx - mw / 2, best_y - mh / 2, mw, mh};
}

FaceLayout FaceDetector::detect(const cv::Mat& rgb) {
  cv::Mat gray;
  cv::cvtColor(rgb, gray, cv::COLOR_RGB2GRAY);
  const double s = std::min(1.0, static_cast<double>(kDetectMaxSide) / std::max(rgb.cols, rgb.rows));
  cv::Mat small = gray;
  if (s < 1.0) cv::resize(gray, small, cv::Size(), s, s, cv::INTER_AREA);
  cv::Mat eq;
  cv::equalizeHist(small, eq);

  std::vector<cv::Rect> faces;
  const int min_face = std::max(24, std::min(small.cols, small.rows) / 10);
  face_.detectMultiScale(eq, faces, 1.1, 5, 0, cv::Size(min_face, min_face));
  if (faces.empty()) return default_layout(rgb.cols, rgb.rows);

  const cv::Rect face_small = *std::max_element(
      faces.begin(), faces.end(), [](const cv::Rect& a, const cv::Rect& b) { return a.area() < b.area(); });
  FaceLayout l;
  l.detected = true;
  l.face = to_rect(face_small, 1.0 / s);
  l.left_eye = eye_from_face(l.face, true);
  l.right_eye = eye_from_face(l.face, false);

  // Eyes: the cascade in the upper half of the face, one hit on each side of the centre line.
  cv::Rect upper(face_small.x, face_small.y, face_small.width, face_small.height / 2);
  std::vector<cv::Rect> eyes;
  eye_.detectMultiScale(eq(upper), eyes, 1.1, 4, 0, cv::Size(face_small.width / 10, face_small.width / 10));
  const int mid = face_small.width / 2;
  int best_left = -1, best_right = -1;
  for (int i = 0; i < static_cast<int>(eyes.size()); ++i) {
    const int ecx = eyes[i].x + eyes[i].width / 2;
    if (eyes[i].width > face_small.width / 2) continue;
    int& slot = ecx < mid ? best_left : best_right;
    if (slot < 0 || eyes[i].area() > eyes[slot].area()) slot = i;
  }
  for (int side = 0; side < 2; ++side) {
    const int i = side == 0 ? best_left : best_right;
    if (i < 0) continue;
    cv::Rect e = eyes[i];
    e.x += upper.x;
    e.y += upper.y;
    // The cascade box includes brow and lid; keep the eye opening (middle ~60% vertically).
    Rect r = to_rect(e, 1.0 / s);
    r.y += r.height * 25 / 100;
    r.height = r.height * 55 / 100;
    (side == 0 ? l.left_eye : l.right_eye) = r;
  }
  l.mouth = estimate_mouth(gray, l.face);
  return l;
}

}  // namespace liveavatar::puppet
