// Keypoint decoding math, shared by the CPU kernel (csrc/cpu/keypoints.cpp)
// and the CUDA kernel (csrc/cuda/keypoints_kernels.cuh). The semantics are
// torchvision's heatmaps_to_keypoints (roi_heads.py):
//
//   * a box (x1, y1, x2, y2) is width = max(x2 - x1, 1) by height =
//     max(y2 - y1, 1); its K heatmaps (H x W) are resized to ceil(height) x
//     ceil(width) as F.interpolate(mode="bicubic", align_corners=False) does;
//   * each keypoint is the first maximum of its resized map in row-major
//     order (torch.argmax: NaN counts as the largest value), at x = (column +
//     0.5) * width / ceil(width) + x1 (y alike), with the map's value there as
//     its score.
//
// The resized value of one output pixel is ATen's CPU upsample_bicubic2d
// operation by operation: source position (dst + 0.5) * in / out - 0.5 in
// the accumulation precision, its floor taken in float precision (ATen's
// floorf, also for double), the fraction clamped to [0, 1], Keys' cubic
// coefficients with A = -0.75 rounded to the heatmaps' dtype, the four taps'
// indices clamped to the map, the four taps of each row summed along x in
// order, the four rows summed along y in order, and the sum rounded to the
// heatmaps' dtype. Compiled without FP contraction (setup.py), this equals
// torch's portable CPU build bit for bit; its AVX2 / AVX-512 builds fuse some
// of these operations into FMAs and differ by a few ulp.
//
// Defined beyond torchvision (which allocates every resized map, and raises
// for a NaN box):
//   * an axis whose extent is not finite (a NaN or infinite coordinate, or an
//     overflowing difference) is resized to 1 pixel; its coordinates come out
//     non-finite, from the box arithmetic;
//   * an axis longer than kMaxKeypointMapSide pixels is resized to that many,
//     and its coordinates still scale to the box (width / side per pixel).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace maskrcnn_ops {

// The longest side a heatmap is resized to. Far beyond any box in an image
// a detector sees (Keypoint R-CNN decodes in its resized input, <= 1333 px);
// it bounds the work of absurd boxes (K x side^2 interpolations).
constexpr int64_t kMaxKeypointMapSide = 4096;

// Keys' cubic convolution coefficient A, as ATen's bicubic upsampling (OpenCV's).
constexpr double kCubicA = -0.75;

// The resized length of an axis of `extent` pixels (already clamped to >= 1,
// or non-finite): ceil(extent), at most kMaxKeypointMapSide; 1 for NaN and Inf.
template <typename acc_t>
MRO_HOST_DEVICE int64_t keypoint_map_side(acc_t extent) {
  if (!is_finite(extent)) return 1;
  const acc_t side = -floor_of(-extent);  // ceil
  return side >= static_cast<acc_t>(kMaxKeypointMapSide) ? kMaxKeypointMapSide : static_cast<int64_t>(side);
}

// A box's extent along one axis, clamped from below at 1 pixel as
// torchvision's clamp(min=1) (NaN stays NaN).
template <typename acc_t>
MRO_HOST_DEVICE acc_t keypoint_extent(acc_t low, acc_t high) {
  const acc_t extent = high - low;
  return extent < acc_t(1) ? acc_t(1) : extent;
}

// Where one RoI's heatmaps go: its offsets, extents and resized map size.
template <typename acc_t>
struct KeypointBox {
  acc_t x1, y1;            // the box's corner (the coordinates' offsets)
  acc_t width, height;     // extents, >= 1 or non-finite
  int64_t map_w, map_h;    // the resized map: map_h x map_w, each >= 1

  MRO_HOST_DEVICE int64_t pixels() const { return map_w * map_h; }
};

template <typename acc_t>
MRO_HOST_DEVICE KeypointBox<acc_t> keypoint_box(const acc_t* box) {
  KeypointBox<acc_t> b;
  b.x1 = box[0];
  b.y1 = box[1];
  b.width = keypoint_extent(box[0], box[2]);
  b.height = keypoint_extent(box[1], box[3]);
  b.map_w = keypoint_map_side(b.width);
  b.map_h = keypoint_map_side(b.height);
  return b;
}

// The image coordinate of resized pixel `index` along an axis: (index + 0.5)
// * extent / side + offset, in torchvision's operation order.
template <typename acc_t>
MRO_HOST_DEVICE acc_t keypoint_coordinate(int64_t index, acc_t extent, int64_t side, acc_t offset) {
  const acc_t correction = extent / static_cast<acc_t>(side);
  return (static_cast<acc_t>(index) + acc_t(0.5)) * correction + offset;
}

// Keys' cubic kernel for |x| <= 1 and for 1 <= |x| <= 2, as ATen writes them.
template <typename acc_t>
MRO_HOST_DEVICE acc_t cubic_near(acc_t x) {
  const acc_t a = static_cast<acc_t>(kCubicA);
  return ((a + acc_t(2)) * x - (a + acc_t(3))) * x * x + acc_t(1);
}

template <typename acc_t>
MRO_HOST_DEVICE acc_t cubic_far(acc_t x) {
  const acc_t a = static_cast<acc_t>(kCubicA);
  return ((a * x - acc_t(5) * a) * x + acc_t(8) * a) * x - acc_t(4) * a;
}

// The four source samples an output pixel reads along one axis, and their
// weights (rounded to the heatmaps' dtype, as ATen stores them).
template <typename acc_t>
struct CubicTaps {
  int64_t index[4];
  acc_t weight[4];
};

// Taps of output position `dst` when `source` samples are resized to
// `length` (bicubic, align_corners=False).
template <typename weight_t, typename acc_t>
MRO_HOST_DEVICE CubicTaps<acc_t> cubic_taps(int64_t dst, int64_t source, int64_t length) {
  const acc_t scale = static_cast<acc_t>(source) / static_cast<acc_t>(length);
  const acc_t position = scale * (static_cast<acc_t>(dst) + acc_t(0.5)) - acc_t(0.5);
  // ATen floors in float precision (floorf) whatever the accumulation type.
  const int64_t floor_index = min_of<int64_t>(
      static_cast<int64_t>(floor_of(static_cast<float>(position))), source - 1);
  const acc_t t = min_of(max_of(position - static_cast<acc_t>(floor_index), acc_t(0)), acc_t(1));
  const acc_t mirrored = acc_t(1) - t;
  const acc_t coefficients[4] = {cubic_far(t + acc_t(1)), cubic_near(t), cubic_near(mirrored),
                                 cubic_far(mirrored + acc_t(1))};
  CubicTaps<acc_t> taps;
  for (int j = 0; j < 4; ++j) {
    taps.index[j] = max_of<int64_t>(min_of<int64_t>(floor_index + j - 1, source - 1), 0);
    taps.weight[j] = static_cast<acc_t>(static_cast<weight_t>(coefficients[j]));
  }
  return taps;
}

// One heatmap row [W] interpolated at the columns of `tx`: the four taps
// summed in order.
template <typename scalar_t, typename acc_t>
MRO_HOST_DEVICE acc_t cubic_row(const scalar_t* row, const CubicTaps<acc_t>& tx) {
  acc_t sum = static_cast<acc_t>(row[tx.index[0]]) * tx.weight[0];
  for (int i = 1; i < 4; ++i) sum += static_cast<acc_t>(row[tx.index[i]]) * tx.weight[i];
  return sum;
}

// The resized value from the four rows of `ty` already interpolated along x
// (r0..r3), summed in order and rounded to the heatmaps' dtype.
template <typename scalar_t, typename acc_t>
MRO_HOST_DEVICE acc_t cubic_combine(acc_t r0, acc_t r1, acc_t r2, acc_t r3, const CubicTaps<acc_t>& ty) {
  acc_t sum = r0 * ty.weight[0];
  sum += r1 * ty.weight[1];
  sum += r2 * ty.weight[2];
  sum += r3 * ty.weight[3];
  return static_cast<acc_t>(static_cast<scalar_t>(sum));
}

// The resized value at the pixel with row taps ty and column taps tx of a
// heatmap [H, W] (row-major): cubic_combine of four cubic_row's.
template <typename scalar_t, typename acc_t>
MRO_HOST_DEVICE acc_t cubic_value(const scalar_t* map, int64_t map_width, const CubicTaps<acc_t>& ty,
                                  const CubicTaps<acc_t>& tx) {
  return cubic_combine<scalar_t>(cubic_row(map + ty.index[0] * map_width, tx),
                                 cubic_row(map + ty.index[1] * map_width, tx),
                                 cubic_row(map + ty.index[2] * map_width, tx),
                                 cubic_row(map + ty.index[3] * map_width, tx), ty);
}

// torch.argmax's order: whether (value, index) comes before (best, best_index)
// as the maximum: a larger value, NaN above everything, the lower index
// among equal values (and among NaNs).
template <typename acc_t>
MRO_HOST_DEVICE bool argmax_prefers(acc_t value, int64_t index, acc_t best, int64_t best_index) {
  const bool value_nan = value != value, best_nan = best != best;
  if (value_nan || best_nan) return value_nan && (!best_nan || index < best_index);
  return value > best || (value == best && index < best_index);
}

}  // namespace maskrcnn_ops
