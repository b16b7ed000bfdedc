// heatmaps_to_keypoints' host code, written once for both backends: the
// argument checks, the outputs and the dtypes each tensor is read in. A
// backend (csrc/cpu/keypoints.cpp, csrc/cuda/keypoints.cu) supplies
//   Backend::Guard                          made from the inputs' device
//   Backend::run<scalar_t>(heatmaps, boxes, keypoints, scores)
// and registers heatmaps_to_keypoints<Backend> as its kernel. Host-only.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <tuple>

#include "dtypes.h"

namespace maskrcnn_ops {

// heatmaps [D, K, H, W] of a floating dtype (H, W >= 1 unless K == 0),
// boxes [D, 4] floating on the same device.
inline void check_keypoint_args(const char* op, const at::Tensor& heatmaps, const at::Tensor& boxes) {
  TORCH_CHECK(heatmaps.dim() == 4, op, ": expected heatmaps of shape [D, K, H, W], got ", heatmaps.sizes());
  TORCH_CHECK(is_supported_feature_dtype(heatmaps.scalar_type()), op,
              ": expected heatmaps of dtype float32, float64, float16 or bfloat16, got ",
              heatmaps.scalar_type());
  TORCH_CHECK(heatmaps.size(1) == 0 || (heatmaps.size(2) >= 1 && heatmaps.size(3) >= 1), op,
              ": expected heatmaps of at least 1 x 1 pixels, got ", heatmaps.sizes());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && boxes.size(0) == heatmaps.size(0), op,
              ": expected boxes of shape [", heatmaps.size(0), ", 4] (one per heatmap group), got ",
              boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": expected floating-point boxes, got ",
              boxes.scalar_type());
  TORCH_CHECK(heatmaps.device() == boxes.device(), op,
              ": heatmaps and boxes must be on the same device, got ", heatmaps.device(), " and ",
              boxes.device());
}

// heatmaps [D, K, H, W], boxes [D, 4] -> (keypoints [D, K, 3], scores
// [D, K]) in the accumulation dtype (see csrc/ops.cpp). The kernel gets the
// heatmaps contiguous in their dtype, the boxes contiguous in the
// accumulation dtype and uninitialized outputs it writes entirely.
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> heatmaps_to_keypoints(const at::Tensor& heatmaps, const at::Tensor& boxes) {
  check_keypoint_args("maskrcnn_ops::heatmaps_to_keypoints", heatmaps, boxes);
  const typename Backend::Guard guard(heatmaps.device());
  const auto options = heatmaps.options().dtype(accumulate_dtype(heatmaps.scalar_type()));
  const int64_t rois = heatmaps.size(0), keypoints_per_roi = heatmaps.size(1);
  at::Tensor keypoints = at::empty({rois, keypoints_per_roi, 3}, options);
  at::Tensor scores = at::empty({rois, keypoints_per_roi}, options);
  if (scores.numel() == 0) return {keypoints, scores};
  const at::Tensor maps = heatmaps.contiguous();
  const at::Tensor b = boxes.to(options.dtype()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, maps.scalar_type(), "heatmaps_to_keypoints", [&] {
    Backend::template run<scalar_t>(maps, b, keypoints, scores);
  });
  return {keypoints, scores};
}

}  // namespace maskrcnn_ops
