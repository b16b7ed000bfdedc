// Argument validation for the RoIAlign ops, shared by the CPU and CUDA
// kernels so both backends reject the same inputs with the same messages,
// each naming the op that was called; and the maps (a Pyramid) that a checked
// call reads. Host-only: included from .cpp and .cu files alike, but never
// from device code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "dtypes.h"
#include "roi_align_math.h"
#include "roi_align_pyramid.h"

namespace maskrcnn_ops {

inline void check_roi_align_common(const char* op, const at::Tensor& rois,
                                   double spatial_scale, int64_t pooled_h,
                                   int64_t pooled_w, int64_t sampling_ratio) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op,
              ": expected rois of shape [K, 5] (batch_index, x1, y1, x2, y2), "
              "got shape ",
              rois.sizes());
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), op,
              ": expected floating-point rois, got ", rois.scalar_type());
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, op,
              ": expected a positive output size, got (", pooled_h, ", ",
              pooled_w, ")");
  TORCH_CHECK(std::isfinite(spatial_scale) && spatial_scale > 0, op,
              ": expected a finite, positive spatial_scale, got ",
              spatial_scale);
  TORCH_CHECK(sampling_ratio <= kMaxAdaptiveGrid, op,
              ": sampling_ratio must be at most ", kMaxAdaptiveGrid, ", got ",
              sampling_ratio);
}

// The feature-like tensor of an op (input or grad): dtype, and same device
// as the rois.
inline void check_features(const char* op, const char* name,
                           const at::Tensor& features, const at::Tensor& rois) {
  TORCH_CHECK(is_supported_feature_dtype(features.scalar_type()), op,
              ": expected ", name,
              " of dtype float32, float64, float16 or bfloat16, got ",
              features.scalar_type());
  TORCH_CHECK(features.device() == rois.device(), op, ": ", name,
              " and rois must be on the same device, got ", name, " on ",
              features.device(), " and rois on ", rois.device());
}

// grad [K, C, PH, PW], the gradient of an output of the op.
inline void check_grad_shape(const char* op, const at::Tensor& grad,
                             const at::Tensor& rois, int64_t channels,
                             int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) &&
                  grad.size(1) == channels && grad.size(2) == pooled_h &&
                  grad.size(3) == pooled_w,
              op, ": expected grad of shape [", rois.size(0), ", ", channels,
              ", ", pooled_h, ", ", pooled_w, "], got ", grad.sizes());
}

// The forward of one feature map (roi_align, roi_align_max: `op` names it).
inline void check_roi_align_forward(const char* op, const at::Tensor& input,
                                    const at::Tensor& rois,
                                    double spatial_scale, int64_t pooled_h,
                                    int64_t pooled_w, int64_t sampling_ratio) {
  TORCH_CHECK(input.dim() == 4, op,
              ": expected input of shape [N, C, H, W], got a ", input.dim(),
              "-D tensor of shape ", input.sizes());
  check_features(op, "input", input, rois);
  check_roi_align_common(op, rois, spatial_scale, pooled_h, pooled_w,
                         sampling_ratio);
}

// The backward of one feature map (roi_align_backward,
// roi_align_max_backward: `op` names it).
inline void check_roi_align_backward(const char* op, const at::Tensor& grad,
                                     const at::Tensor& rois,
                                     double spatial_scale, int64_t pooled_h,
                                     int64_t pooled_w, int64_t batch_size,
                                     int64_t channels, int64_t height,
                                     int64_t width, int64_t sampling_ratio) {
  check_features(op, "grad", grad, rois);
  check_roi_align_common(op, rois, spatial_scale, pooled_h, pooled_w,
                         sampling_ratio);
  TORCH_CHECK(batch_size >= 0 && channels >= 0 && height >= 0 && width >= 0,
              op, ": expected a non-negative input shape, got [", batch_size,
              ", ", channels, ", ", height, ", ", width, "]");
  check_grad_shape(op, grad, rois, channels, pooled_h, pooled_w);
}

// The argmax of a max-mode forward, given back to its backward.
inline void check_argmax(const at::Tensor& grad, const at::Tensor& argmax) {
  TORCH_CHECK(argmax.scalar_type() == c10::kInt && argmax.sizes() == grad.sizes() &&
                  argmax.device() == grad.device(),
              "maskrcnn_ops::roi_align_max_backward: expected argmax as returned by "
              "roi_align_max (int32, the shape of grad ",
              grad.sizes(), ", on ", grad.device(), "), got ", argmax.scalar_type(), " of shape ",
              argmax.sizes(), " on ", argmax.device());
}

// ------------------------------------------------------------ multi-level --

// Scales must be powers of two, halving from one level to the next: the
// level a RoI maps to is its FPN level minus that of the finest map, which
// names a feature map only for such a pyramid.
inline void check_pyramid_scales(const char* op, c10::ArrayRef<double> scales,
                                  int64_t levels, double canonical_scale) {
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == levels, op, ": expected ",
              levels, " spatial_scales (one per feature map), got ",
              scales.size());
  for (size_t l = 0; l < scales.size(); ++l) {
    int exponent = 0;
    const bool power_of_two = std::isfinite(scales[l]) && scales[l] > 0 &&
                              std::frexp(scales[l], &exponent) == 0.5;
    TORCH_CHECK(power_of_two, op,
                ": expected spatial_scales that are powers of two, got ",
                scales[l], " at level ", l);
    TORCH_CHECK(l == 0 || scales[l] * 2 == scales[l - 1], op,
                ": expected each spatial scale to be half the previous one "
                "(consecutive FPN levels, finest first), got ",
                scales[l - (l > 0)], " then ", scales[l]);
  }
  TORCH_CHECK(std::isfinite(canonical_scale) && canonical_scale > 0, op,
              ": expected a finite, positive canonical_scale, got ",
              canonical_scale);
}

inline void check_multi_level_roi_align_forward(
    at::TensorList features, const at::Tensor& rois,
    c10::ArrayRef<double> spatial_scales, int64_t pooled_h, int64_t pooled_w,
    int64_t sampling_ratio, double canonical_scale) {
  const char* op = "maskrcnn_ops::multi_level_roi_align";
  const int64_t levels = static_cast<int64_t>(features.size());
  TORCH_CHECK(levels >= 1 && levels <= kMaxPyramidLevels, op,
              ": expected 1 to ", kMaxPyramidLevels, " feature maps, got ",
              levels);
  const at::Tensor& first = features[0];
  for (int64_t l = 0; l < levels; ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.dim() == 4, op, ": expected features[", l,
                "] of shape [N, C, H, W], got shape ", f.sizes());
    check_features(op, "features", f, rois);
    TORCH_CHECK(f.scalar_type() == first.scalar_type(), op,
                ": expected every feature map in one dtype, got ",
                first.scalar_type(), " and ", f.scalar_type(), " at level ", l);
    TORCH_CHECK(f.size(0) == first.size(0) && f.size(1) == first.size(1), op,
                ": expected every feature map to have the same batch size and "
                "channels, got ",
                first.sizes(), " and ", f.sizes(), " at level ", l);
  }
  check_roi_align_common(op, rois, spatial_scales.empty() ? 1.0 : spatial_scales[0],
                         pooled_h, pooled_w, sampling_ratio);
  check_pyramid_scales(op, spatial_scales, levels, canonical_scale);
}

inline void check_multi_level_roi_align_backward(
    const at::Tensor& grad, const at::Tensor& rois,
    c10::ArrayRef<double> spatial_scales, int64_t pooled_h, int64_t pooled_w,
    int64_t batch_size, int64_t channels, c10::IntArrayRef heights,
    c10::IntArrayRef widths, int64_t sampling_ratio, double canonical_scale) {
  const char* op = "maskrcnn_ops::multi_level_roi_align_backward";
  const int64_t levels = static_cast<int64_t>(heights.size());
  TORCH_CHECK(levels >= 1 && levels <= kMaxPyramidLevels &&
                  widths.size() == heights.size(),
              op, ": expected 1 to ", kMaxPyramidLevels,
              " levels with one height and width each, got ", heights.size(),
              " heights and ", widths.size(), " widths");
  for (int64_t l = 0; l < levels; ++l) {
    TORCH_CHECK(heights[l] >= 0 && widths[l] >= 0, op,
                ": expected non-negative feature sizes, got ", heights[l], "x",
                widths[l], " at level ", l);
  }
  check_features(op, "grad", grad, rois);
  check_roi_align_common(op, rois, spatial_scales.empty() ? 1.0 : spatial_scales[0],
                         pooled_h, pooled_w, sampling_ratio);
  check_pyramid_scales(op, spatial_scales, levels, canonical_scale);
  TORCH_CHECK(batch_size >= 0 && channels >= 0, op,
              ": expected a non-negative batch size and channels, got ",
              batch_size, " and ", channels);
  check_grad_shape(op, grad, rois, channels, pooled_h, pooled_w);
}

// Layout policy shared by the kernels and mirrored by the fake kernels in
// maskrcnn_ops/_fake.py: a tensor that is channels_last-contiguous but not
// NCHW-contiguous is processed as NHWC without a copy; anything else is
// processed as NCHW (made contiguous if it is not already).
inline bool use_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// ------------------------------------------------ the maps a call reads --
// (csrc/common/roi_align_pyramid.h), from arguments the checks above passed.

// The memory format of the maps' tensors (features, outputs, gradients).
inline at::MemoryFormat memory_format_of(const Pyramid<double>& maps) {
  return maps.channels_last ? at::MemoryFormat::ChannelsLast
                            : at::MemoryFormat::Contiguous;
}

// A multi-level forward's feature maps.
inline Pyramid<double> feature_pyramid(at::TensorList features,
                                       c10::ArrayRef<double> spatial_scales,
                                       double canonical_scale,
                                       int64_t canonical_level) {
  std::vector<int64_t> heights, widths;
  for (const auto& f : features) {
    heights.push_back(f.size(2));
    widths.push_back(f.size(3));
  }
  return fpn_pyramid(features[0].size(1), static_cast<int64_t>(features.size()),
                     heights.data(), widths.data(), spatial_scales.data(),
                     canonical_scale, canonical_level,
                     use_channels_last(features[0]));
}

// A multi-level backward's maps (the inputs' sizes, grad's layout).
inline Pyramid<double> gradient_pyramid(const at::Tensor& grad, int64_t channels,
                                        c10::IntArrayRef heights,
                                        c10::IntArrayRef widths,
                                        c10::ArrayRef<double> spatial_scales,
                                        double canonical_scale,
                                        int64_t canonical_level) {
  return fpn_pyramid(channels, static_cast<int64_t>(heights.size()), heights.data(),
                     widths.data(), spatial_scales.data(), canonical_scale,
                     canonical_level, use_channels_last(grad));
}

}  // namespace maskrcnn_ops
