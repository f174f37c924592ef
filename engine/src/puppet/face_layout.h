// Face, eyes and mouth in a portrait, from OpenCV's Haar cascades (opencv-data).
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <opencv2/core.hpp>
#include <opencv2/objdetect.hpp>
#include <string>

#include "liveavatar/engine.h"

namespace liveavatar::puppet {

/// Loads the cascades once; detect() is const but OpenCV's detectMultiScale is not re-entrant: one per thread.
class FaceDetector {
 public:
  /// cascade_dir empty: $LIVEAVATAR_CASCADE_DIR, else the path configured at build time.
  explicit FaceDetector(const std::string& cascade_dir);
  /// Layout in the image's pixels. No face: a centred default layout with detected = false.
  FaceLayout detect(const cv::Mat& rgb);

 private:
  cv::CascadeClassifier face_;
  cv::CascadeClassifier eye_;
};

/// The layout a portrait of this size gets when no face is found: a face centred in the upper middle.
FaceLayout default_layout(int width, int height);
/// Mouth box used when the user gives none: proportional to the face, lip line at the darkest row.
Rect estimate_mouth(const cv::Mat& gray, const Rect& face);

}  // namespace liveavatar::puppet
