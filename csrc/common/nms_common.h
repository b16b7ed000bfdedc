// Host-side pieces of the NMS ops shared by the CPU and CUDA backends:
// argument checks and the processing order. Host-only (ATen calls).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>

namespace maskrcnn_ops {

// The checks every NMS op makes once boxes and scores have their shapes:
// floating dtypes, one device, a threshold that is a number.
inline void check_nms_dtypes_and_threshold(const char* op, const at::Tensor& boxes,
                                           const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()) &&
                  at::isFloatingType(scores.scalar_type()),
              op, ": expected floating-point boxes and scores, got ",
              boxes.scalar_type(), " and ", scores.scalar_type());
  TORCH_CHECK(boxes.device() == scores.device(), op,
              ": boxes and scores must be on the same device, got ",
              boxes.device(), " and ", scores.device());
  TORCH_CHECK(!std::isnan(iou_threshold), op, ": iou_threshold is NaN");
}

inline void check_nms_args(const char* op, const at::Tensor& boxes,
                           const at::Tensor& scores, const at::Tensor* idxs,
                           const at::Tensor* image_ids, double iou_threshold) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op,
              ": expected boxes of shape [N, 4] (x1, y1, x2, y2), got ",
              boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), op,
              ": expected scores of shape [", boxes.size(0),
              "] (one per box), got ", scores.sizes());
  check_nms_dtypes_and_threshold(op, boxes, scores, iou_threshold);
  for (const auto& [name, t] : {std::pair{"idxs", idxs}, std::pair{"image_ids", image_ids}}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == boxes.size(0), op, ": expected ",
                name, " of shape [", boxes.size(0), "] (one per box), got ",
                t->sizes());
    TORCH_CHECK(at::isIntegralType(t->scalar_type(), /*includeBool=*/false), op,
                ": expected integer ", name, ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == boxes.device(), op, ": ", name,
                " must be on the device of boxes (", boxes.device(), "), got ",
                t->device());
  }
}

// nms_keep_rows: boxes [S, B, 4], scores [S, B].
inline void check_nms_rows_args(const char* op, const at::Tensor& boxes,
                                const at::Tensor& scores, double iou_threshold) {
  TORCH_CHECK(boxes.dim() == 3 && boxes.size(2) == 4, op,
              ": expected boxes of shape [S, B, 4] (rows of B boxes x1, y1, x2, y2), got ",
              boxes.sizes());
  TORCH_CHECK(scores.dim() == 2 && scores.size(0) == boxes.size(0) &&
                  scores.size(1) == boxes.size(1),
              op, ": expected scores of shape [", boxes.size(0), ", ", boxes.size(1),
              "] (one per box), got ", scores.sizes());
  check_nms_dtypes_and_threshold(op, boxes, scores, iou_threshold);
}

// Processing orders of a batched NMS.
//   by_score:   indices by decreasing score, ties by increasing index
//               (the order of the variable-size results);
//   by_segment: the same, grouped stably by (image_id, idx): each segment is
//               contiguous and sorted by score inside, which is what the
//               greedy kernels walk.
// NaN scores sort first, as in torch.sort.
struct NmsOrder {
  at::Tensor by_score;
  at::Tensor by_segment;
};

inline NmsOrder make_nms_order(const at::Tensor& scores,
                               const c10::optional<at::Tensor>& idxs,
                               const c10::optional<at::Tensor>& image_ids) {
  NmsOrder order;
  order.by_score = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  at::Tensor by_segment = order.by_score;
  // Stable sorts by the minor key then the major key give lexicographic order.
  for (const auto* key : {&idxs, &image_ids}) {
    if (!key->has_value()) continue;
    const at::Tensor k = (*key)->index_select(0, by_segment);
    by_segment = by_segment.index_select(
        0, std::get<1>(k.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false)));
  }
  order.by_segment = by_segment;
  return order;
}

}  // namespace maskrcnn_ops

namespace maskrcnn_ops {

// For positions of `order`: true where a new (image_id, idx) segment starts.
inline at::Tensor segment_starts(const at::Tensor& order,
                                 const c10::optional<at::Tensor>& idxs,
                                 const c10::optional<at::Tensor>& image_ids) {
  const int64_t n = order.size(0);
  at::Tensor starts = at::zeros({n}, order.options().dtype(at::kBool));
  if (n == 0) return starts;
  starts.narrow(0, 0, 1).fill_(true);
  for (const auto* key : {&idxs, &image_ids}) {
    if (!key->has_value()) continue;
    const at::Tensor k = (*key)->index_select(0, order);
    starts.narrow(0, 1, n - 1).logical_or_(k.narrow(0, 1, n - 1).ne(k.narrow(0, 0, n - 1)));
  }
  return starts;
}

// For positions of a segment-grouped order (with segment_starts' flags,
// n >= 1), the last position of each one's segment: a reverse running
// minimum of the segment ends, with no host sync.
inline at::Tensor segment_last(const at::Tensor& starts) {
  const int64_t n = starts.size(0);
  at::Tensor is_end = at::ones_like(starts);
  is_end.narrow(0, 0, n - 1).copy_(starts.narrow(0, 1, n - 1));
  const at::Tensor ends = at::arange(n, starts.options().dtype(at::kLong))
                              .masked_fill_(is_end.logical_not(), n);
  return std::get<0>(ends.flip({0}).cummin(0)).flip({0}).contiguous();
}

// What a backend's greedy pass returns: keep flags at the original box
// positions, and the score order the variable-size results follow; a
// backend that has the kept indices at hand may return them too.
struct NmsKeep {
  at::Tensor keep;      // bool [N]
  at::Tensor by_score;  // int64 [N]
  at::Tensor kept;      // int64 [K] (kept_by_score), or undefined
};

// Indices of kept boxes by decreasing score: the variable-size result (one
// device-to-host sync on CUDA, for its size).
inline at::Tensor kept_by_score(const NmsKeep& r) {
  if (r.kept.defined()) return r.kept;
  return r.by_score.masked_select(r.keep.index_select(0, r.by_score));
}

// The three NMS operators of one backend, from its greedy pass `Impl`
// (boxes, scores, idxs, image_ids, iou_threshold) -> NmsKeep.
template <NmsKeep (*Impl)(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                          const c10::optional<at::Tensor>&, double)>
struct NmsOps {
  static at::Tensor batched_nms_keep(const at::Tensor& boxes, const at::Tensor& scores,
                                     const at::Tensor& idxs,
                                     const c10::optional<at::Tensor>& image_ids,
                                     double iou_threshold) {
    check_nms_args("maskrcnn_ops::batched_nms_keep", boxes, scores, &idxs,
                   image_ids.has_value() ? &*image_ids : nullptr, iou_threshold);
    return Impl(boxes, scores, idxs, image_ids, iou_threshold).keep;
  }
  static at::Tensor batched_nms(const at::Tensor& boxes, const at::Tensor& scores,
                                const at::Tensor& idxs, double iou_threshold) {
    check_nms_args("maskrcnn_ops::batched_nms", boxes, scores, &idxs, nullptr, iou_threshold);
    return kept_by_score(Impl(boxes, scores, idxs, c10::nullopt, iou_threshold));
  }
  static at::Tensor nms(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold) {
    check_nms_args("maskrcnn_ops::nms", boxes, scores, nullptr, nullptr, iou_threshold);
    return kept_by_score(Impl(boxes, scores, c10::nullopt, c10::nullopt, iou_threshold));
  }
};

}  // namespace maskrcnn_ops
