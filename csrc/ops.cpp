// Every operator schema of maskrcnn_ops, in one place. Kernels are registered
// per backend in csrc/cpu and csrc/cuda; fake (meta) kernels and autograd
// formulas are registered from Python (maskrcnn_ops/_fake.py, _autograd.py).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

TORCH_LIBRARY(maskrcnn_ops, m) {
  // rois: [K, 5] rows of (batch_index, x1, y1, x2, y2); any floating dtype,
  // read in the accumulation precision. Returns [K, C, pooled_height,
  // pooled_width] in input's dtype, channels_last when input is.
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
      "bool aligned) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Gradient of roi_align with respect to its input: [batch_size, channels,
  // height, width] in grad's dtype. Linear in grad, so its own gradient is
  // roi_align again (see _autograd.py).
  m.def(
      "roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, "
      "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, "
      "SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
      "bool aligned) -> Tensor",
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
}
