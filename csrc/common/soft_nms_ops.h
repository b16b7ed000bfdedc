// Host-side pieces of the soft-NMS ops shared by the CPU and CUDA backends:
// argument checks and the two operators over a backend's pass. Host-only
// (ATen calls).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <tuple>

#include "nms_common.h"
#include "soft_nms.h"

namespace maskrcnn_ops {

// The checked arguments of a soft-NMS call.
struct SoftNmsParams {
  SoftNmsMethod method;
  double iou_threshold, sigma, score_threshold;

  template <typename acc_t>
  SoftNmsDecay<acc_t> decay() const {
    // at_least_as: `overlap >= t` in acc_t is `double(overlap) >= t`.
    return {method, at_least_as<acc_t>(iou_threshold), static_cast<acc_t>(sigma)};
  }
};

inline SoftNmsParams check_soft_nms_args(const char* op, const at::Tensor& boxes,
                                         const at::Tensor& scores, const at::Tensor* idxs,
                                         const at::Tensor* image_ids, double iou_threshold,
                                         double sigma, c10::string_view method,
                                         double score_threshold) {
  check_nms_args(op, boxes, scores, idxs, image_ids, iou_threshold);
  // The decay runs in one precision for both (accumulate_dtype of boxes).
  TORCH_CHECK(boxes.scalar_type() == scores.scalar_type(), op,
              ": expected boxes and scores of the same dtype, got ", boxes.scalar_type(),
              " and ", scores.scalar_type());
  SoftNmsParams params{SoftNmsMethod::kGaussian, iou_threshold, sigma, score_threshold};
  if (method == "linear") {
    params.method = SoftNmsMethod::kLinear;
  } else {
    TORCH_CHECK(method == "gaussian", op, ": unknown method '", method,
                "', expected 'linear' or 'gaussian'");
  }
  TORCH_CHECK(sigma > 0, op, ": expected sigma > 0 (the gaussian's width), got ", sigma);
  // Decay multiplies scores by weights in [0, 1], which moves a negative
  // score up: kept scores would no longer come out in decreasing order.
  // A threshold >= 0 keeps only scores >= 0, where decay only lowers them.
  TORCH_CHECK(score_threshold >= 0, op, ": expected score_threshold >= 0, got ",
              score_threshold);
  return params;
}

// The two soft-NMS operators of one backend, from its pass `Impl`
// (boxes, scores, idxs, image_ids, params) -> (kept indices int64 [K],
// decayed scores [K] in scores' dtype), by decreasing decayed score, ties by
// index. Impl gets checked arguments (boxes and scores of one dtype; N may
// be 0).
template <std::tuple<at::Tensor, at::Tensor> (*Impl)(
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const SoftNmsParams&)>
struct SoftNmsOps {
  static std::tuple<at::Tensor, at::Tensor> soft_nms(const at::Tensor& boxes,
                                                     const at::Tensor& scores,
                                                     double iou_threshold, double sigma,
                                                     c10::string_view method,
                                                     double score_threshold) {
    const SoftNmsParams params =
        check_soft_nms_args("maskrcnn_ops::soft_nms", boxes, scores, nullptr, nullptr,
                            iou_threshold, sigma, method, score_threshold);
    return Impl(boxes, scores, c10::nullopt, c10::nullopt, params);
  }
  static std::tuple<at::Tensor, at::Tensor> batched_soft_nms(
      const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& idxs,
      const c10::optional<at::Tensor>& image_ids, double iou_threshold, double sigma,
      c10::string_view method, double score_threshold) {
    const SoftNmsParams params = check_soft_nms_args(
        "maskrcnn_ops::batched_soft_nms", boxes, scores, &idxs,
        image_ids.has_value() ? &*image_ids : nullptr, iou_threshold, sigma, method,
        score_threshold);
    return Impl(boxes, scores, idxs, image_ids, params);
  }
};

}  // namespace maskrcnn_ops
