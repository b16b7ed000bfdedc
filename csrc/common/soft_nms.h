// The score decay of soft-NMS (Bodla et al. 2017), shared by the CPU and CUDA
// kernels: when a box is kept, every box still in play has its score
// multiplied by decay(IoU with the kept box). Computed in acc_t (float32,
// float64 for float64 inputs; dtypes.h), with the IoU of box_iou.h.
#pragma once

#include <cmath>
#include <limits>

#include "box_iou.h"
#include "host_device.h"

namespace maskrcnn_ops {

// The methods, as the schema's `method` string names them.
enum class SoftNmsMethod : int { kLinear = 0, kGaussian = 1 };

template <typename acc_t>
struct SoftNmsDecay {
  SoftNmsMethod method;
  acc_t iou_threshold;  // linear only: decay where IoU > iou_threshold
  acc_t sigma;          // gaussian only: > 0

  // The IoU the decay sees: box_iou clamped to [0, 1], NaN (a NaN or
  // infinite coordinate, two zero-area boxes) as 0. So a non-finite box
  // decays nothing and is never decayed, and a weight is never negative
  // (rounding can put an IoU a hair above 1).
  static MRO_HOST_DEVICE acc_t overlap(acc_t iou) {
    return iou > acc_t(0) ? min_of(iou, acc_t(1)) : acc_t(0);
  }

  // The factor of a score for an overlap in [0, 1] (1 for overlap 0 with
  // either method, so callers may skip non-overlapping boxes):
  //   linear:   1 - overlap where overlap > iou_threshold, else 1;
  //   gaussian: exp(-overlap^2 / sigma), for every box.
  MRO_HOST_DEVICE acc_t weight(acc_t overlap) const {
    if (method == SoftNmsMethod::kLinear)
      return overlap > iou_threshold ? acc_t(1) - overlap : acc_t(1);
    return exp_of(-(overlap * overlap) / sigma);
  }
};

// The score threshold as the kernels compare it: the smallest acc_t not
// below the double threshold, so `score >= at_least_as<acc_t>(t)` in acc_t
// equals `double(score) >= t` exactly. Host-only.
template <typename acc_t>
inline acc_t at_least_as(double threshold) {
  acc_t t = static_cast<acc_t>(threshold);
  if (static_cast<double>(t) < threshold)
    t = std::nextafter(t, std::numeric_limits<acc_t>::infinity());
  return t;
}

}  // namespace maskrcnn_ops
