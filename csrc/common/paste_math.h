// Mask pasting geometry and per-pixel bilinear value, shared by the CPU
// paste kernel, the CUDA paste kernel and the RLE encoder. The semantics are
// torchvision's paste_masks_in_image (roi_heads.py):
//
//   * the M x M mask is padded by `padding` zero pixels on every side
//     (S = M + 2 * padding) and its box grown about its centre by S / M;
//   * the grown box is truncated toward zero to integer pixels (x1, y1, x2,
//     y2), both ends inclusive: the box is w = max(x2 - x1 + 1, 1) by
//     h = max(y2 - y1 + 1, 1) pixels;
//   * the padded mask is resized to h x w as F.interpolate(mode="bilinear",
//     align_corners=False) resizes (half-pixel centres, clamped at 0), and
//     the part inside the image is pasted; every other pixel is zero.
//
// The padding is never materialized: a tap on a padding pixel reads zero.
#pragma once

#include <cstdint>
#include <type_traits>

#include "host_device.h"

namespace maskrcnn_ops {

// Grown box coordinates are clamped to +-2^40 before the integer conversion:
// a float beyond int64's range has no defined conversion (NaN and Inf never
// get there: their boxes paste nothing). A box that large (a trillion
// pixels) is far beyond any image, so boxes below the limit get torchvision's
// pixels exactly; beyond it, the window is still clipped to the image and
// every index stays in range.
constexpr double kPasteCoordinateLimit = 1099511627776.0;  // 2^40

// Where one mask goes: its integer box and the visible window (the part of
// the box inside the image), [top, bottom) x [left, right). An empty window
// (bottom <= top or right <= left) pastes nothing.
struct PasteWindow {
  int64_t x1, y1;           // the box's first pixel (may lie outside the image)
  int64_t box_w, box_h;     // the box's size in pixels, >= 1
  int64_t top, bottom;      // visible rows
  int64_t left, right;      // visible columns

  MRO_HOST_DEVICE bool empty() const { return bottom <= top || right <= left; }
  MRO_HOST_DEVICE int64_t rows() const { return empty() ? 0 : bottom - top; }
  MRO_HOST_DEVICE int64_t cols() const { return empty() ? 0 : right - left; }
};

// Truncation toward zero (as torch's float -> int64 cast), clamped first.
template <typename acc_t>
MRO_HOST_DEVICE int64_t truncate_coordinate(acc_t value) {
  const acc_t limit = static_cast<acc_t>(kPasteCoordinateLimit);
  return static_cast<int64_t>(min_of(max_of(value, -limit), limit));
}

// The window of a box (x1, y1, x2, y2) in an image of height x width, for a
// mask grown by `scale` = S / M. A box with a non-finite coordinate gets an
// empty window: torchvision's int64 cast of NaN is undefined (on x86 it
// yields INT64_MIN, which slices nothing), so this states the outcome.
template <typename acc_t>
MRO_HOST_DEVICE PasteWindow paste_window(acc_t bx1, acc_t by1, acc_t bx2, acc_t by2, acc_t scale,
                                         int64_t height, int64_t width) {
  PasteWindow w;
  w.x1 = w.y1 = 0;
  w.box_w = w.box_h = 1;
  w.top = w.bottom = w.left = w.right = 0;
  // torchvision's expand_boxes, operation by operation: half sizes scaled,
  // then centre -+ half size.
  const acc_t half = acc_t(0.5);
  const acc_t half_w = (bx2 - bx1) * half * scale;
  const acc_t half_h = (by2 - by1) * half * scale;
  const acc_t centre_x = (bx2 + bx1) * half;
  const acc_t centre_y = (by2 + by1) * half;
  const acc_t gx1 = centre_x - half_w, gy1 = centre_y - half_h;
  const acc_t gx2 = centre_x + half_w, gy2 = centre_y + half_h;
  // NaN and Inf inputs end here, and so do finite ones whose arithmetic
  // overflows (x2 - x1 of -3e38 and 3e38 is Inf).
  if (!(is_finite(gx1) && is_finite(gy1) && is_finite(gx2) && is_finite(gy2))) return w;
  const int64_t x1 = truncate_coordinate(gx1), y1 = truncate_coordinate(gy1);
  const int64_t x2 = truncate_coordinate(gx2), y2 = truncate_coordinate(gy2);
  w.x1 = x1;
  w.y1 = y1;
  w.box_w = max_of<int64_t>(x2 - x1 + 1, 1);
  w.box_h = max_of<int64_t>(y2 - y1 + 1, 1);
  w.left = max_of<int64_t>(x1, 0);
  w.top = max_of<int64_t>(y1, 0);
  w.right = min_of<int64_t>(x2 + 1, width);
  w.bottom = min_of<int64_t>(y2 + 1, height);
  return w;
}

// The two padded-mask pixels an output pixel reads along one axis, and their
// weights (w_low + w_high == 1).
template <typename acc_t>
struct PasteTap {
  int64_t low, high;
  acc_t w_low, w_high;
};

// Tap of output pixel `offset` (0 .. length - 1 from the box's first pixel)
// when `source` padded pixels are resized to `length`, as PyTorch's
// upsample_bilinear2d computes it: an equal size copies; otherwise the
// source position is (offset + 0.5) * source / length - 0.5, clamped at 0.
template <typename acc_t>
MRO_HOST_DEVICE PasteTap<acc_t> paste_tap(int64_t offset, int64_t length, int64_t source) {
  PasteTap<acc_t> tap;
  if (length == source) {
    tap.low = tap.high = offset;
    tap.w_low = acc_t(1);
    tap.w_high = acc_t(0);
    return tap;
  }
  const acc_t ratio = static_cast<acc_t>(source) / static_cast<acc_t>(length);
  const acc_t position =
      max_of(ratio * (static_cast<acc_t>(offset) + acc_t(0.5)) - acc_t(0.5), acc_t(0));
  tap.low = min_of<int64_t>(static_cast<int64_t>(floor_of(position)), source - 1);
  tap.high = tap.low < source - 1 ? tap.low + 1 : tap.low;
  tap.w_high = min_of(max_of(position - static_cast<acc_t>(tap.low), acc_t(0)), acc_t(1));
  tap.w_low = acc_t(1) - tap.w_high;
  return tap;
}

// The factor torchvision grows the boxes by, S / M, in the box arithmetic's
// precision (as torch multiplies a float tensor by a Python float).
template <typename acc_t>
MRO_HOST_DEVICE acc_t paste_scale(int64_t side, int64_t padding) {
  return static_cast<acc_t>(static_cast<double>(side + 2 * padding) / static_cast<double>(side));
}

// One mask [M, M] (row-major) seen as its padded [S, S] version.
template <typename mask_t>
struct PaddedMask {
  const mask_t* data;
  int64_t side;     // M
  int64_t padding;  // zero pixels on each side

  MRO_HOST_DEVICE int64_t padded_side() const { return side + 2 * padding; }

  template <typename acc_t>
  MRO_HOST_DEVICE acc_t at(int64_t y, int64_t x) const {
    const int64_t my = y - padding, mx = x - padding;
    if (my < 0 || my >= side || mx < 0 || mx >= side) return acc_t(0);
    return static_cast<acc_t>(data[my * side + mx]);
  }

  // The pasted value at the pixel whose row and column taps are ty, tx. The
  // order of the operations is PyTorch's (interpolate along x, then y).
  template <typename acc_t>
  MRO_HOST_DEVICE acc_t value(const PasteTap<acc_t>& ty, const PasteTap<acc_t>& tx) const {
    const acc_t upper = at<acc_t>(ty.low, tx.low) * tx.w_low + at<acc_t>(ty.low, tx.high) * tx.w_high;
    const acc_t lower = at<acc_t>(ty.high, tx.low) * tx.w_low + at<acc_t>(ty.high, tx.high) * tx.w_high;
    return upper * ty.w_low + lower * ty.w_high;
  }
};

// Row and column taps of image pixel (y, x) inside window w.
template <typename acc_t>
MRO_HOST_DEVICE PasteTap<acc_t> paste_row_tap(const PasteWindow& w, int64_t y, int64_t source) {
  return paste_tap<acc_t>(y - w.y1, w.box_h, source);
}

template <typename acc_t>
MRO_HOST_DEVICE PasteTap<acc_t> paste_col_tap(const PasteWindow& w, int64_t x, int64_t source) {
  return paste_tap<acc_t>(x - w.x1, w.box_w, source);
}

// What a pasted pixel becomes: the value in the output's dtype, or for a
// bool output whether it exceeds the threshold (NaN does not).
template <typename out_t, typename acc_t>
MRO_HOST_DEVICE out_t paste_store(acc_t value, acc_t threshold) {
  if constexpr (std::is_same<out_t, bool>::value) {
    return value > threshold;
  } else {
    return static_cast<out_t>(value);
  }
}

}  // namespace maskrcnn_ops
