// The feature maps a RoIAlign call reads, as the CPU kernels, the CUDA
// kernels and the host code of both see them: each level's size and scale,
// the channels and layout, and how a RoI picks its level (FPN). A single
// feature map is a pyramid of one level, so roi_align, roi_align_max and
// multi_level_roi_align share one description and one code path.
//
// The host builds a Pyramid<double> from an op's arguments (the builders
// below) and converts it once per call to the precision the kernels compute
// in, with as<acc_t>(); the kernels read a Pyramid<acc_t>. Free of ATen and
// trivially copyable: the CUDA kernels take it by value, and the CUDA
// emulator of the test suite builds it with the same builders.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "roi_align_math.h"

namespace maskrcnn_ops {

template <typename acc_t>
struct Pyramid {
  int64_t levels = 0;  // 1 to kMaxPyramidLevels
  int64_t height[kMaxPyramidLevels] = {};
  int64_t width[kMaxPyramidLevels] = {};
  acc_t scale[kMaxPyramidLevels] = {};
  // FPN level mapping (unused for a single map): the FPN level of map 0, and
  // the canonical box size and its level (torchvision's LevelMapper).
  int64_t first_level = 0;
  acc_t canonical_scale = acc_t(224);
  acc_t canonical_level = acc_t(4);
  int64_t channels = 0;
  bool channels_last = false;

  MRO_HOST_DEVICE int64_t plane(int64_t level) const { return height[level] * width[level]; }

  // Elements of a level's map, or of its gradient: [batch, channels, H, W].
  MRO_HOST_DEVICE int64_t numel(int64_t level, int64_t batch) const {
    return batch * channels * plane(level);
  }

  // Elements of all levels' maps.
  MRO_HOST_DEVICE int64_t total_numel(int64_t batch) const {
    int64_t total = 0;
    for (int64_t l = 0; l < levels; ++l) total += numel(l, batch);
    return total;
  }

  MRO_HOST_DEVICE FeatureLayout layout(int64_t level) const {
    return FeatureLayout{channels, height[level], width[level], channels_last};
  }

  // The level the RoI `roi` (its 5 values) pools from.
  MRO_HOST_DEVICE int64_t level_of(const acc_t* roi) const {
    if (levels == 1) return 0;
    return fpn_level_index<acc_t>(roi, canonical_scale, canonical_level, first_level, levels);
  }

  // The RoI's geometry on its level's map.
  MRO_HOST_DEVICE RoIAlignGeometry<acc_t> geometry(const acc_t* roi, int64_t level, int64_t batch,
                                                   int64_t pooled_h, int64_t pooled_w,
                                                   int64_t sampling_ratio, bool aligned) const {
    return roi_geometry<acc_t>(roi, batch, height[level], width[level], scale[level], pooled_h,
                               pooled_w, sampling_ratio, aligned);
  }

  // The same maps with scales in T (host).
  template <typename T>
  Pyramid<T> as() const {
    Pyramid<T> p;
    p.levels = levels;
    for (int64_t l = 0; l < levels; ++l) {
      p.height[l] = height[l];
      p.width[l] = width[l];
      p.scale[l] = static_cast<T>(scale[l]);
    }
    p.first_level = first_level;
    p.canonical_scale = static_cast<T>(canonical_scale);
    p.canonical_level = static_cast<T>(canonical_level);
    p.channels = channels;
    p.channels_last = channels_last;
    return p;
  }
};

// ---------------------------------------------------- builders (host-only) --

// FPN level of the finest map, k_min = -log2(scales[0]), as torchvision's
// MultiScaleRoIAlign derives it (scales are checked powers of two).
inline int64_t fpn_first_level(const double* scales) {
  return static_cast<int64_t>(std::lround(-std::log2(scales[0])));
}

// One feature map [N, channels, height, width].
inline Pyramid<double> single_level_pyramid(int64_t channels, int64_t height, int64_t width,
                                            double spatial_scale, bool channels_last) {
  Pyramid<double> p;
  p.levels = 1;
  p.height[0] = height;
  p.width[0] = width;
  p.scale[0] = spatial_scale;
  p.channels = channels;
  p.channels_last = channels_last;
  return p;
}

// An FPN pyramid of `levels` maps (at most kMaxPyramidLevels, as the ops'
// checks ensure), finest first.
inline Pyramid<double> fpn_pyramid(int64_t channels, int64_t levels, const int64_t* heights,
                                   const int64_t* widths, const double* scales,
                                   double canonical_scale, int64_t canonical_level,
                                   bool channels_last) {
  Pyramid<double> p;
  p.levels = levels;
  for (int64_t l = 0; l < levels; ++l) {
    p.height[l] = heights[l];
    p.width[l] = widths[l];
    p.scale[l] = scales[l];
  }
  p.first_level = fpn_first_level(scales);
  p.canonical_scale = canonical_scale;
  p.canonical_level = static_cast<double>(canonical_level);
  p.channels = channels;
  p.channels_last = channels_last;
  return p;
}

}  // namespace maskrcnn_ops
