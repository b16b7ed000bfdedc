// Box area and the IoU test of NMS, shared by the CPU and CUDA kernels.
// The functions take acc_t (accumulate_dtype in dtypes.h): half and bfloat16
// boxes are converted to float32 before any arithmetic, so the IoU is computed in
// float32 (float64 for float64 boxes).
#pragma once

#include <cmath>
#include <limits>

#include "host_device.h"

namespace maskrcnn_ops {

template <typename acc_t>
MRO_HOST_DEVICE acc_t box_area(acc_t x1, acc_t y1, acc_t x2, acc_t y2) {
  return (x2 - x1) * (y2 - y1);
}

// IoU(a, b) with torchvision's arithmetic: the intersection's sides are
// clamped at zero and the IoU is inter / (area_a + area_b - inter). The one
// definition of IoU of the NMS ops (hard and soft). NaN when a coordinate is
// NaN, or for two boxes of zero area (0 / 0).
template <typename acc_t>
MRO_HOST_DEVICE acc_t box_iou(acc_t ax1, acc_t ay1, acc_t ax2, acc_t ay2, acc_t area_a,
                              acc_t bx1, acc_t by1, acc_t bx2, acc_t by2, acc_t area_b) {
  const acc_t w = max_of(min_of(ax2, bx2) - max_of(ax1, bx1), acc_t(0));
  const acc_t h = max_of(min_of(ay2, by2) - max_of(ay1, by1), acc_t(0));
  const acc_t inter = w * h;
  return inter / (area_a + area_b - inter);
}

// True when IoU(a, b) > threshold. NaN anywhere makes the test false.
template <typename acc_t>
MRO_HOST_DEVICE bool iou_exceeds(acc_t ax1, acc_t ay1, acc_t ax2, acc_t ay2,
                                 acc_t area_a, acc_t bx1, acc_t by1, acc_t bx2,
                                 acc_t by2, acc_t area_b, acc_t threshold) {
  return box_iou(ax1, ay1, ax2, ay2, area_a, bx1, by1, bx2, by2, area_b) > threshold;
}

// For a threshold >= 0 only boxes of finite, positive area can suppress or
// be suppressed: any other box has a zero intersection or a NaN/infinite
// union, so its IoU with anything is 0, -0 or NaN, never above the threshold.
template <typename acc_t>
MRO_HOST_DEVICE bool can_overlap(acc_t area) {
  return area > acc_t(0) && is_finite(area);
}

// The threshold as the kernels compare it: the largest acc_t not above the
// double threshold, so `iou > threshold_as<acc_t>(t)` in acc_t equals
// `double(iou) > t` exactly (the semantics of torchvision's CPU kernel, which
// compares with the double). Host-only.
template <typename acc_t>
inline acc_t threshold_as(double threshold) {
  acc_t t = static_cast<acc_t>(threshold);
  if (static_cast<double>(t) > threshold)
    t = std::nextafter(t, -std::numeric_limits<acc_t>::infinity());
  return t;
}

}  // namespace maskrcnn_ops
