// RoIAlign geometry and bilinear weights, shared by the CPU and CUDA kernels
// (forward and backward). The semantics follow torchvision.ops.roi_align:
//
//   * a RoI row is (batch_index, x1, y1, x2, y2) in image coordinates;
//   * aligned=True shifts the scaled box by -0.5 (pixel centres), while
//     aligned=False forces the box to be at least 1x1 feature pixel;
//   * each of the pooled_h x pooled_w bins averages grid_h x grid_w bilinear
//     samples placed at the centres of a regular sub-grid of the bin, with
//     grid = sampling_ratio, or ceil(bin size) when sampling_ratio <= 0;
//   * a sample contributes zero when y < -1, y > H, x < -1 or x > W.
//
// The bilinear weight of a sample is the product of one weight per axis, so
// the kernels precompute per-axis taps (two indices and two weights per
// sample coordinate) once per RoI and reuse them across bins and channels.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace maskrcnn_ops {

// Pyramid levels a multi_level_roi_align call may take (FPN uses 4 or 5); the
// CUDA kernels take this many level pointers by value.
constexpr int64_t kMaxPyramidLevels = 8;

// The adaptive sampling grid (sampling_ratio <= 0) is ceil(bin size) per
// axis. It is capped so that an absurdly large (but finite) box cannot
// overflow an int or spin for hours; 1024 samples per bin axis means a box of
// more than 7000 feature pixels per side at a 7x7 output, far beyond any
// image. Boxes below the cap give torchvision's results exactly.
constexpr int kMaxAdaptiveGrid = 1024;

template <typename acc_t>
struct RoIAlignGeometry {
  int64_t batch_index;  // -1 when the RoI row is invalid (see roi_geometry)
  acc_t start_h;
  acc_t start_w;
  acc_t bin_h;
  acc_t bin_w;
  int grid_h;  // samples per bin along y; 0 means the RoI contributes nothing
  int grid_w;
  acc_t count;  // divisor of each bin's sum: max(grid_h * grid_w, 1)
};

// Bilinear taps along one axis for one sample coordinate: the output gets
// w_low * f[low] + w_high * f[high]. Both weights are zero when the sample is
// outside [-1, size], and the indices are then 0, which is in range whenever
// the geometry is valid (size > 0).
template <typename acc_t>
struct AxisTap {
  int64_t low;
  int64_t high;
  acc_t w_low;
  acc_t w_high;

  // A sample outside [-1, size] along this axis: no weight on either
  // neighbour (a tap inside has w_low + w_high == 1). The kernels skip such a
  // sample instead of multiplying its zero weights by the element at the
  // placeholder index 0, so a NaN or Inf there does not leak into the result
  // or its gradient (torchvision, mmcv and detectron2 skip it too).
  MRO_HOST_DEVICE bool outside() const { return w_low == acc_t(0) && w_high == acc_t(0); }
};

template <typename acc_t>
MRO_HOST_DEVICE int adaptive_grid(acc_t bin_size) {
  // `!(x > 0)` is also true for NaN.
  if (!(bin_size > acc_t(0))) return 0;
  if (bin_size >= acc_t(kMaxAdaptiveGrid)) return kMaxAdaptiveGrid;
  int whole = static_cast<int>(bin_size);
  return static_cast<acc_t>(whole) < bin_size ? whole + 1 : whole;
}

// Geometry of one RoI. `roi` points at the 5 values of its row. A row whose
// batch index is outside (-1, batch_size) (or NaN) gets batch_index = -1 and a
// zero grid; a row with non-finite coordinates, or a feature map with zero
// height or width, gets a zero grid. Zero-grid RoIs produce zero output and
// zero gradient and never read the feature map.
template <typename acc_t, typename roi_t>
MRO_HOST_DEVICE RoIAlignGeometry<acc_t> roi_geometry(
    const roi_t* roi, int64_t batch_size, int64_t height, int64_t width,
    acc_t spatial_scale, int64_t pooled_h, int64_t pooled_w,
    int64_t sampling_ratio, bool aligned) {
  RoIAlignGeometry<acc_t> g;
  g.start_h = g.start_w = g.bin_h = g.bin_w = acc_t(0);
  g.grid_h = g.grid_w = 0;
  g.count = acc_t(1);

  // The index is truncated toward zero, as in torchvision, so any value in
  // (-1, batch_size) names an image.
  const acc_t batch = static_cast<acc_t>(roi[0]);
  if (!(batch > acc_t(-1) && batch < static_cast<acc_t>(batch_size))) {
    g.batch_index = -1;
    return g;
  }
  g.batch_index = static_cast<int64_t>(batch);

  const acc_t offset = aligned ? acc_t(0.5) : acc_t(0);
  const acc_t start_w = static_cast<acc_t>(roi[1]) * spatial_scale - offset;
  const acc_t start_h = static_cast<acc_t>(roi[2]) * spatial_scale - offset;
  const acc_t end_w = static_cast<acc_t>(roi[3]) * spatial_scale - offset;
  const acc_t end_h = static_cast<acc_t>(roi[4]) * spatial_scale - offset;
  if (!(is_finite(start_w) && is_finite(start_h) && is_finite(end_w) &&
        is_finite(end_h)) ||
      height <= 0 || width <= 0) {
    return g;
  }

  acc_t roi_w = end_w - start_w;
  acc_t roi_h = end_h - start_h;
  if (!aligned) {
    // Legacy (Detectron v1) behaviour: malformed boxes become 1x1.
    roi_w = max_of(roi_w, acc_t(1));
    roi_h = max_of(roi_h, acc_t(1));
  }
  g.start_h = start_h;
  g.start_w = start_w;
  g.bin_h = roi_h / static_cast<acc_t>(pooled_h);
  g.bin_w = roi_w / static_cast<acc_t>(pooled_w);
  if (sampling_ratio > 0) {
    g.grid_h = g.grid_w = static_cast<int>(sampling_ratio);
  } else {
    g.grid_h = adaptive_grid(g.bin_h);
    g.grid_w = adaptive_grid(g.bin_w);
  }
  g.count = max_of(static_cast<acc_t>(g.grid_h) * static_cast<acc_t>(g.grid_w),
                   acc_t(1));
  return g;
}

// Coordinate of sample `i` (of `grid`) inside bin `bin_index` along one axis.
template <typename acc_t>
MRO_HOST_DEVICE acc_t sample_coordinate(acc_t start, acc_t bin_size,
                                        int64_t bin_index, int i, int grid) {
  return start + static_cast<acc_t>(bin_index) * bin_size +
         (static_cast<acc_t>(i) + acc_t(0.5)) * bin_size /
             static_cast<acc_t>(grid);
}

template <typename acc_t>
MRO_HOST_DEVICE AxisTap<acc_t> axis_tap(acc_t coord, int64_t size) {
  AxisTap<acc_t> tap;
  tap.low = tap.high = 0;
  tap.w_low = tap.w_high = acc_t(0);
  if (!(coord >= acc_t(-1) && coord <= static_cast<acc_t>(size)) || size <= 0) {
    return tap;
  }
  if (coord <= acc_t(0)) coord = acc_t(0);
  int64_t low = static_cast<int64_t>(coord);
  int64_t high;
  if (low >= size - 1) {
    low = high = size - 1;
    coord = static_cast<acc_t>(low);
  } else {
    high = low + 1;
  }
  const acc_t frac = coord - static_cast<acc_t>(low);
  tap.low = low;
  tap.high = high;
  tap.w_low = acc_t(1) - frac;
  tap.w_high = frac;
  return tap;
}

// Tap for sample `i` of bin `bin_index` along y (use with start_h/bin_h/grid_h)
// or x (start_w/bin_w/grid_w).
template <typename acc_t>
MRO_HOST_DEVICE AxisTap<acc_t> bin_sample_tap(acc_t start, acc_t bin_size,
                                              int64_t bin_index, int i,
                                              int grid, int64_t size) {
  return axis_tap(sample_coordinate(start, bin_size, bin_index, i, grid), size);
}


// Where the elements of channel c of image b live, for either layout
// (NCHW or channels_last); also the offset of bin (k, c, ph, pw) of an output
// of that layout, [K, C, PH, PW] or [K, PH, PW, C].
struct FeatureLayout {
  int64_t channels, height, width;
  bool channels_last;

  MRO_HOST_DEVICE int64_t channel_origin(int64_t b, int64_t c) const {
    return channels_last ? b * height * width * channels + c
                         : (b * channels + c) * height * width;
  }
  MRO_HOST_DEVICE int64_t channel_stride() const {
    return channels_last ? 1 : height * width;
  }
  MRO_HOST_DEVICE int64_t y_stride() const {
    return channels_last ? width * channels : width;
  }
  MRO_HOST_DEVICE int64_t x_stride() const {
    return channels_last ? channels : 1;
  }
  MRO_HOST_DEVICE int64_t output_offset(int64_t k, int64_t c, int64_t ph, int64_t pw,
                                        int64_t pooled_h, int64_t pooled_w) const {
    return channels_last ? ((k * pooled_h + ph) * pooled_w + pw) * channels + c
                         : ((k * channels + c) * pooled_h + ph) * pooled_w + pw;
  }
};

// Max pooling (mmcv's pool_mode="max"): a bin's value is its largest sample
// (an out-of-range sample counts as 0), the first in sample order (iy major,
// ix minor) among equals, so the argmax is deterministic; NaN beats any number,
// so it propagates as in torch.max.
template <typename acc_t>
MRO_HOST_DEVICE bool beats_max(acc_t value, acc_t best) {
  return value > best || (value != value && best == best);
}

// Feature pyramid level of a RoI (Lin et al., FPN, eq. 1), as torchvision's
// LevelMapper: floor(canonical_level + log2(sqrt(area) / canonical_scale) +
// 1e-6), clamped to [first_level, first_level + num_levels - 1], returned as
// an index into the levels (0 for first_level). The arithmetic runs in the
// RoI's precision, in torchvision's order, so both pick the same level. A RoI
// whose formula gives NaN (a negative area, NaN coordinates) gets level 0,
// where it reads within bounds as any RoI does.
template <typename acc_t>
MRO_HOST_DEVICE int64_t fpn_level_index(const acc_t* roi, acc_t canonical_scale,
                                        acc_t canonical_level, int64_t first_level,
                                        int64_t num_levels) {
  const acc_t area = (roi[3] - roi[1]) * (roi[4] - roi[2]);
  const acc_t size = sqrt_of(area);
  const acc_t level =
      floor_of(canonical_level + log2_of(size / canonical_scale) + acc_t(1e-6));
  if (level != level) return 0;
  const acc_t lowest = static_cast<acc_t>(first_level);
  const acc_t highest = static_cast<acc_t>(first_level + num_levels - 1);
  return static_cast<int64_t>(min_of(max_of(level, lowest), highest)) - first_level;
}

}  // namespace maskrcnn_ops
