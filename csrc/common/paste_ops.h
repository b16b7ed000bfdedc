// The mask pasting ops' host code, written once for both backends: argument
// checks (also masks_to_rle's), the output, and the dtypes each tensor is
// read in. A backend (csrc/cpu/paste.cpp, csrc/cuda/paste.cu) supplies
//   Backend::Guard                  made from the inputs' device
//   Backend::zeros(sizes, options)  a zeroed output (the kernels write the
//                                   boxes' windows only)
//   Backend::run<mask_t, out_t>(masks, boxes, out, padding, threshold)
// and registers paste_masks<Backend> as its kernel. Host-only.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>

#include "dtypes.h"

namespace maskrcnn_ops {

// masks [D, M, M] (M >= 1) of a floating dtype, boxes [D, 4] floating on the
// same device, a non-negative image size and padding.
inline void check_paste_args(const char* op, const at::Tensor& masks, const at::Tensor& boxes,
                             int64_t height, int64_t width, int64_t padding) {
  TORCH_CHECK(masks.dim() == 3, op, ": expected masks of shape [D, M, M], got ", masks.sizes());
  TORCH_CHECK(masks.size(1) == masks.size(2), op, ": expected square masks [D, M, M], got ",
              masks.sizes());
  TORCH_CHECK(masks.size(1) >= 1, op, ": expected masks of at least 1 x 1 pixels, got ",
              masks.sizes());
  TORCH_CHECK(is_supported_feature_dtype(masks.scalar_type()), op,
              ": expected masks of dtype float32, float64, float16 or bfloat16, got ",
              masks.scalar_type());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && boxes.size(0) == masks.size(0), op,
              ": expected boxes of shape [", masks.size(0), ", 4], got ", boxes.sizes());
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": expected floating-point boxes, got ",
              boxes.scalar_type());
  TORCH_CHECK(masks.device() == boxes.device(), op,
              ": masks and boxes must be on the same device, got ", masks.device(), " and ",
              boxes.device());
  TORCH_CHECK(height >= 0 && width >= 0, op, ": expected a non-negative image size, got (",
              height, ", ", width, ")");
  TORCH_CHECK(padding >= 0, op, ": expected a non-negative padding, got ", padding);
}

inline void check_threshold(const char* op, double threshold) {
  TORCH_CHECK(!std::isnan(threshold), op, ": the threshold must not be NaN");
}

// The output of paste_masks: [D, height, width] in the masks' dtype, or
// bool when a threshold is given, zeroed by the backend.
template <typename Backend>
at::Tensor paste_output(const at::Tensor& masks, int64_t height, int64_t width,
                        const c10::optional<double>& threshold) {
  return Backend::zeros({masks.size(0), height, width},
                        masks.options().dtype(threshold.has_value() ? at::kBool : masks.scalar_type()));
}

// masks [D, M, M], boxes [D, 4] -> [D, height, width] (see csrc/ops.cpp).
// The kernel gets masks contiguous in their dtype and boxes contiguous in the
// accumulation dtype.
template <typename Backend>
at::Tensor paste_masks(const at::Tensor& masks, const at::Tensor& boxes, int64_t height, int64_t width,
                       int64_t padding, c10::optional<double> threshold) {
  const char* op = "maskrcnn_ops::paste_masks";
  check_paste_args(op, masks, boxes, height, width, padding);
  if (threshold.has_value()) check_threshold(op, *threshold);
  const typename Backend::Guard guard(masks.device());
  at::Tensor out = paste_output<Backend>(masks, height, width, threshold);
  if (out.numel() == 0) return out;
  const at::Tensor m = masks.contiguous();
  const at::Tensor b = boxes.to(accumulate_dtype(masks.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "paste_masks", [&] {
    if (threshold.has_value()) {
      Backend::template run<scalar_t, bool>(m, b, out, padding, *threshold);
    } else {
      Backend::template run<scalar_t, scalar_t>(m, b, out, padding, 0.0);
    }
  });
  return out;
}

}  // namespace maskrcnn_ops
