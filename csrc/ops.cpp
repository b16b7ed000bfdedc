// Every operator schema of maskrcnn_ops, in one place. Kernels are registered
// per backend in csrc/cpu and csrc/cuda; fake (meta) kernels and autograd
// formulas are registered from Python (maskrcnn_ops/_fake.py, _autograd.py).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

TORCH_LIBRARY(maskrcnn_ops, m) {
  // rois: [K, 5] rows of (batch_index, x1, y1, x2, y2); any floating dtype,
  // read in the accumulation precision. Returns [K, C, pooled_height,
  // pooled_width] in input's dtype, channels_last when input is.
  // flexible_layout: the kernels take features of any strides, so inductor
  // passes its convolutions' channels_last outputs as they are instead of
  // copying them to the NCHW strides of the traced eager graph.
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
      "bool aligned) -> Tensor",
      {at::Tag::pt2_compliant_tag, at::Tag::flexible_layout});
  // Gradient of roi_align with respect to its input: [batch_size, channels,
  // height, width] in grad's dtype. Linear in grad, so its own gradient is
  // roi_align again (see _autograd.py).
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
      "SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
      "bool aligned) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Max-pooling RoIAlign (mmcv's pool_mode="max"): each bin is the largest of
  // its bilinear samples, the first in sample order among equals (NaN wins).
  // Returns (output, argmax): argmax (int32, output's shape and layout) holds
  // the winning sample iy * grid_w + ix of each bin, -1 for a RoI with no
  // samples; the backward sends each bin's gradient to that sample alone.
  m.def(
      "roi_align_max(Tensor input, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
      "bool aligned) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "roi_align_max_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
      "SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
      "bool aligned) -> Tensor",
      {at::Tag::pt2_compliant_tag});

  // Multi-level (FPN) RoIAlign: each RoI pools from the feature map its size
  // maps to, level floor(canonical_level + log2(sqrt(area) / canonical_scale)
  // + 1e-6) clamped to the pyramid, as torchvision's MultiScaleRoIAlign.
  // features: [N, C, H_l, W_l] per level, finest first, one dtype and layout;
  // spatial_scales: one power of two per level, halving from each level to
  // the next. Returns [K, C, pooled_height, pooled_width].
  m.def(
      "multi_level_roi_align(Tensor[] features, Tensor rois, float[] spatial_scales, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, bool aligned, "
      "float canonical_scale, int canonical_level) -> Tensor",
      {at::Tag::pt2_compliant_tag, at::Tag::flexible_layout});
  // Its gradient: one [batch_size, channels, heights[l], widths[l]] per level.
  m.def(
      "multi_level_roi_align_backward(Tensor grad, Tensor rois, float[] spatial_scales, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
      "SymInt[] heights, SymInt[] widths, int sampling_ratio, bool aligned, "
      "float canonical_scale, int canonical_level) -> Tensor[]",
      {at::Tag::pt2_compliant_tag});

  // NMS: exact greedy, IoU strictly above iou_threshold suppresses; boxes
  // [N, 4] (x1, y1, x2, y2), scores [N]. Kept indices (int64) by decreasing
  // score, ties by index; the output size depends on the data.
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // NMS within each class of idxs [N] (integer).
  m.def(
      "batched_nms(Tensor boxes, Tensor scores, Tensor idxs, "
      "float iou_threshold) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Fixed-size form, no host sync: bool keep flags [N] of NMS within each
  // (image_ids, idxs) segment; image_ids [N] is optional.
  m.def(
      "batched_nms_keep(Tensor boxes, Tensor scores, Tensor idxs, "
      "Tensor? image_ids, float iou_threshold) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // The same for uniform segments: boxes [S, B, 4], scores [S, B]; bool keep
  // flags [S, B] of NMS within each row (ONNX NonMaxSuppression's layout,
  // with the rows as its batch).
  m.def("nms_keep_rows(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor",
        {at::Tag::pt2_compliant_tag});

  // Soft-NMS (Bodla et al. 2017): repeatedly keep the box of highest
  // current score (ties: lowest index) and multiply the score of every box
  // still in play by a decay of its IoU with it, method "linear"
  // (1 - IoU where IoU > iou_threshold) or "gaussian" (exp(-IoU^2 / sigma));
  // boxes whose score is below score_threshold (>= 0) leave. boxes [N, 4],
  // scores [N] of one floating dtype. Returns (kept indices int64 [K],
  // their decayed scores [K] in scores' dtype) by decreasing decayed score,
  // ties by index; K depends on the data.
  m.def(
      "soft_nms(Tensor boxes, Tensor scores, float iou_threshold, float sigma, str method, "
      "float score_threshold) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // The same within each (image_ids, idxs) segment; idxs [N] and the optional
  // image_ids [N] integer. One output over all segments, in the same order.
  m.def(
      "batched_soft_nms(Tensor boxes, Tensor scores, Tensor idxs, Tensor? image_ids, "
      "float iou_threshold, float sigma, str method, float score_threshold) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  // Box coding (torchvision's BoxCoder): deltas [K, 4 * C] relative to boxes
  // [K, 4] -> boxes [K, 4 * C]; dw, dh clamped from above at clip.
  m.def(
      "decode_boxes(Tensor deltas, Tensor boxes, float[] weights, float clip) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "decode_boxes_backward(Tensor grad, Tensor deltas, Tensor boxes, float[] weights, "
      "float clip) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Regression targets of reference_boxes [K, 4] relative to proposals [K, 4].
  m.def("encode_boxes(Tensor reference_boxes, Tensor proposals, float[] weights) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // RPN: decode deltas [N, M, 4] against anchors [N, M, 4], clip to
  // image_sizes [N, 2] (height, width), and flag boxes with both sides >=
  // min_size and scores [N, M] >= score_thresh: (boxes [N, M, 4], keep [N, M]).
  m.def(
      "rpn_decode_filter(Tensor deltas, Tensor anchors, Tensor scores, Tensor image_sizes, "
      "float[] weights, float clip, float min_size, float score_thresh) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  // Mask pasting (torchvision's paste_masks_in_image): masks [D, M, M], each
  // padded by `padding` zero pixels, resized bilinearly to its box [D, 4]
  // grown by (M + 2 * padding) / M and truncated to integer pixels, and
  // pasted into a zero image of height x width. Returns [D, height, width] in
  // the masks' dtype, or bool (pixel > threshold) when threshold is given.
  // Inference only: no gradient.
  m.def(
      "paste_masks(Tensor masks, Tensor boxes, SymInt height, SymInt width, int padding=1, "
      "float? threshold=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // COCO run-length encoding (pycocotools' compressed string) of each mask
  // paste_masks would paste, binarized at pixel > threshold, computed from
  // the box windows alone. Returns (chars uint8 [total], offsets int64
  // [D + 1]): the string of mask i is chars[offsets[i]:offsets[i + 1]]. CPU.
  m.def(
      "masks_to_rle(Tensor masks, Tensor boxes, SymInt height, SymInt width, int padding=1, "
      "float threshold=0.5) -> (Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  // Keypoint R-CNN's decoding (torchvision's heatmaps_to_keypoints):
  // heatmaps [D, K, H, W], each RoI's K maps resized bicubically to its box
  // boxes [D, 4] (ceil of the width and height, each clamped to >= 1 pixel
  // and at most 4096; an axis of non-finite extent to 1 pixel), and the first
  // maximum of each resized map. Returns (keypoints [D, K, 3] rows of (x, y,
  // 1) in image coordinates, scores [D, K]: the resized maps' maxima), in
  // float32, or float64 for float64 heatmaps. Inference only: no gradient.
  m.def("heatmaps_to_keypoints(Tensor heatmaps, Tensor boxes) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}
