// Argument validation for the box-coding ops, shared by the CPU and CUDA
// kernels. Host-only.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "box_coder.h"
#include "dtypes.h"

namespace maskrcnn_ops {

template <typename acc_t>
inline BoxWeights<acc_t> check_box_weights(const char* op, c10::ArrayRef<double> weights) {
  TORCH_CHECK(weights.size() == 4, op, ": expected 4 weights (wx, wy, ww, wh), got ",
              weights.size());
  for (double w : weights)
    TORCH_CHECK(std::isfinite(w) && w != 0, op, ": weights must be finite and non-zero, got ",
                weights);
  return {static_cast<acc_t>(weights[0]), static_cast<acc_t>(weights[1]),
          static_cast<acc_t>(weights[2]), static_cast<acc_t>(weights[3])};
}

inline void check_coded(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_supported_feature_dtype(t.scalar_type()), op, ": expected ", name,
              " of dtype float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// deltas [K, 4 * C] relative to boxes [K, 4].
inline void check_decode_args(const char* op, const at::Tensor& deltas, const at::Tensor& boxes) {
  check_coded(op, "deltas", deltas);
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": expected floating-point boxes, got ",
              boxes.scalar_type());
  TORCH_CHECK(deltas.dim() == 2 && deltas.size(1) % 4 == 0, op,
              ": expected deltas of shape [K, 4 * C], got ", deltas.sizes());
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && boxes.size(0) == deltas.size(0), op,
              ": expected boxes of shape [", deltas.size(0), ", 4], got ", boxes.sizes());
  TORCH_CHECK(deltas.device() == boxes.device(), op,
              ": deltas and boxes must be on the same device, got ", deltas.device(), " and ",
              boxes.device());
}

// grad [K, 4 * C], the gradient of decode_boxes's output, on deltas's device.
inline void check_decode_backward_args(const char* op, const at::Tensor& grad,
                                       const at::Tensor& deltas, const at::Tensor& boxes) {
  check_decode_args(op, deltas, boxes);
  TORCH_CHECK(grad.sizes() == deltas.sizes(), op, ": expected grad of shape ", deltas.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": expected a floating-point grad, got ",
              grad.scalar_type());
  // The dispatcher picks the CUDA kernel when any argument is on a GPU; a
  // grad elsewhere would be read through a pointer of the wrong device.
  TORCH_CHECK(grad.device() == deltas.device(), op, ": grad and deltas must be on the same device, got ",
              grad.device(), " and ", deltas.device());
}

inline void check_encode_args(const char* op, const at::Tensor& reference, const at::Tensor& proposals) {
  check_coded(op, "reference_boxes", reference);
  TORCH_CHECK(at::isFloatingType(proposals.scalar_type()), op,
              ": expected floating-point proposals, got ", proposals.scalar_type());
  TORCH_CHECK(reference.dim() == 2 && reference.size(1) == 4, op,
              ": expected reference_boxes of shape [K, 4], got ", reference.sizes());
  TORCH_CHECK(proposals.sizes() == reference.sizes(), op, ": expected proposals of shape ",
              reference.sizes(), ", got ", proposals.sizes());
  TORCH_CHECK(reference.device() == proposals.device(), op,
              ": reference_boxes and proposals must be on the same device, got ",
              reference.device(), " and ", proposals.device());
}

// deltas and anchors [N, M, 4], scores [N, M], image_sizes [N, 2] (height, width).
inline void check_rpn_filter_args(const char* op, const at::Tensor& deltas, const at::Tensor& anchors,
                                  const at::Tensor& scores, const at::Tensor& image_sizes) {
  check_coded(op, "deltas", deltas);
  TORCH_CHECK(deltas.dim() == 3 && deltas.size(2) == 4, op,
              ": expected deltas of shape [N, M, 4], got ", deltas.sizes());
  TORCH_CHECK(anchors.sizes() == deltas.sizes() && at::isFloatingType(anchors.scalar_type()), op,
              ": expected floating-point anchors of shape ", deltas.sizes(), ", got ",
              anchors.scalar_type(), " ", anchors.sizes());
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == deltas.size(0) &&
                  scores.size(1) == deltas.size(1) && at::isFloatingType(scores.scalar_type()),
              op, ": expected floating-point scores of shape [", deltas.size(0), ", ",
              deltas.size(1), "], got ", scores.scalar_type(), " ", scores.sizes());
  TORCH_CHECK(image_sizes.dim() == 2 && image_sizes.size(0) == deltas.size(0) &&
                  image_sizes.size(1) == 2,
              op, ": expected image_sizes of shape [", deltas.size(0), ", 2] (height, width), got ",
              image_sizes.sizes());
  for (const auto* t : {&anchors, &scores, &image_sizes})
    TORCH_CHECK(t->device() == deltas.device(), op, ": all inputs must be on ", deltas.device(),
                ", got one on ", t->device());
}

}  // namespace maskrcnn_ops
