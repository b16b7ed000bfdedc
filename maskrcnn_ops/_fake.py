"""Fake (shape-only) kernels, used by torch.compile, torch.export and opcheck.

Each mirrors the output shape, dtype and memory format of the real kernels.
"""

from __future__ import annotations

import torch

from ._layout import memory_format_of


def _pooled(op, features, rois, pooled_height, pooled_width):
    """Output of a RoIAlign over `features` (feature maps of one dtype and layout)."""
    for f in features:
        torch._check(f.dim() == 4, lambda: f"{op}: expected 4-D features, got {f.dim()}-D")
    torch._check(
        rois.dim() == 2 and rois.size(1) == 5,
        lambda: f"{op}: expected rois of shape [K, 5], got {tuple(rois.shape)}",
    )
    first = features[0]
    return torch.empty(
        (rois.size(0), first.size(1), pooled_height, pooled_width),
        dtype=first.dtype,
        device=first.device,
        memory_format=memory_format_of(first),
    )


@torch.library.register_fake("maskrcnn_ops::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    return _pooled("roi_align", [input], rois, pooled_height, pooled_width)


@torch.library.register_fake("maskrcnn_ops::roi_align_max")
def _roi_align_max_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    output = _pooled("roi_align_max", [input], rois, pooled_height, pooled_width)
    return output, torch.empty_like(output, dtype=torch.int32)


@torch.library.register_fake("maskrcnn_ops::roi_align_max_backward")
def _roi_align_max_backward_fake(
    grad, rois, argmax, spatial_scale, pooled_height, pooled_width,
    batch_size, channels, height, width, sampling_ratio, aligned,
):
    return _roi_align_backward_fake(
        grad, rois, spatial_scale, pooled_height, pooled_width,
        batch_size, channels, height, width, sampling_ratio, aligned,
    )


@torch.library.register_fake("maskrcnn_ops::roi_align_backward")
def _roi_align_backward_fake(
    grad, rois, spatial_scale, pooled_height, pooled_width,
    batch_size, channels, height, width, sampling_ratio, aligned,
):
    torch._check(grad.dim() == 4, lambda: f"roi_align_backward: expected a 4-D grad, got {grad.dim()}-D")
    return torch.empty(
        (batch_size, channels, height, width),
        dtype=grad.dtype,
        device=grad.device,
        memory_format=memory_format_of(grad),
    )


@torch.library.register_fake("maskrcnn_ops::multi_level_roi_align")
def _multi_level_roi_align_fake(
    features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned,
    canonical_scale, canonical_level,
):
    torch._check(len(features) >= 1, lambda: "multi_level_roi_align: expected at least one feature map")
    return _pooled("multi_level_roi_align", features, rois, pooled_height, pooled_width)


@torch.library.register_fake("maskrcnn_ops::multi_level_roi_align_backward")
def _multi_level_roi_align_backward_fake(
    grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels,
    heights, widths, sampling_ratio, aligned, canonical_scale, canonical_level,
):
    torch._check(grad.dim() == 4, lambda: f"multi_level_roi_align_backward: expected a 4-D grad, got {grad.dim()}-D")
    return [
        torch.empty(
            (batch_size, channels, h, w), dtype=grad.dtype, device=grad.device, memory_format=memory_format_of(grad)
        )
        for h, w in zip(heights, widths)
    ]


def _check_nms_inputs(boxes, scores):
    torch._check(boxes.dim() == 2 and boxes.size(1) == 4, lambda: f"nms: expected boxes [N, 4], got {tuple(boxes.shape)}")
    torch._check(scores.dim() == 1, lambda: f"nms: expected scores [N], got {tuple(scores.shape)}")


def _kept_indices(boxes):
    # The number of kept boxes depends on the data: an unbacked size.
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count,), dtype=torch.int64)


@torch.library.register_fake("maskrcnn_ops::nms")
def _nms_fake(boxes, scores, iou_threshold):
    _check_nms_inputs(boxes, scores)
    return _kept_indices(boxes)


@torch.library.register_fake("maskrcnn_ops::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    _check_nms_inputs(boxes, scores)
    return _kept_indices(boxes)


@torch.library.register_fake("maskrcnn_ops::batched_nms_keep")
def _batched_nms_keep_fake(boxes, scores, idxs, image_ids, iou_threshold):
    _check_nms_inputs(boxes, scores)
    return boxes.new_empty((boxes.size(0),), dtype=torch.bool)


@torch.library.register_fake("maskrcnn_ops::nms_keep_rows")
def _nms_keep_rows_fake(boxes, scores, iou_threshold):
    torch._check(
        boxes.dim() == 3 and boxes.size(2) == 4,
        lambda: f"nms_keep_rows: expected boxes [S, B, 4], got {tuple(boxes.shape)}",
    )
    torch._check(
        scores.dim() == 2 and scores.shape == boxes.shape[:2],
        lambda: f"nms_keep_rows: expected scores [S, B] = {tuple(boxes.shape[:2])}, got {tuple(scores.shape)}",
    )
    return boxes.new_empty(boxes.shape[:2], dtype=torch.bool)


def _soft_nms_outputs(boxes, scores):
    # Kept indices and their decayed scores: one unbacked size for both.
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count,), dtype=torch.int64), scores.new_empty((count,))


@torch.library.register_fake("maskrcnn_ops::soft_nms")
def _soft_nms_fake(boxes, scores, iou_threshold, sigma, method, score_threshold):
    _check_nms_inputs(boxes, scores)
    return _soft_nms_outputs(boxes, scores)


@torch.library.register_fake("maskrcnn_ops::batched_soft_nms")
def _batched_soft_nms_fake(boxes, scores, idxs, image_ids, iou_threshold, sigma, method, score_threshold):
    _check_nms_inputs(boxes, scores)
    return _soft_nms_outputs(boxes, scores)


@torch.library.register_fake("maskrcnn_ops::decode_boxes")
def _decode_boxes_fake(deltas, boxes, weights, clip):
    torch._check(deltas.dim() == 2 and deltas.size(1) % 4 == 0, lambda: "decode_boxes: expected deltas [K, 4 * C]")
    return torch.empty_like(deltas, memory_format=torch.contiguous_format)


@torch.library.register_fake("maskrcnn_ops::decode_boxes_backward")
def _decode_boxes_backward_fake(grad, deltas, boxes, weights, clip):
    return torch.empty_like(deltas, memory_format=torch.contiguous_format)


@torch.library.register_fake("maskrcnn_ops::encode_boxes")
def _encode_boxes_fake(reference_boxes, proposals, weights):
    torch._check(reference_boxes.dim() == 2 and reference_boxes.size(1) == 4, lambda: "encode_boxes: expected [K, 4]")
    return torch.empty_like(reference_boxes, memory_format=torch.contiguous_format)


@torch.library.register_fake("maskrcnn_ops::rpn_decode_filter")
def _rpn_decode_filter_fake(deltas, anchors, scores, image_sizes, weights, clip, min_size, score_thresh):
    torch._check(deltas.dim() == 3 and deltas.size(2) == 4, lambda: "rpn_decode_filter: expected deltas [N, M, 4]")
    boxes = torch.empty_like(deltas, memory_format=torch.contiguous_format)
    keep = deltas.new_empty(deltas.shape[:2], dtype=torch.bool)
    return boxes, keep


def _check_paste_inputs(op, masks, boxes):
    torch._check(
        masks.dim() == 3 and masks.size(1) == masks.size(2),
        lambda: f"{op}: expected masks of shape [D, M, M], got {tuple(masks.shape)}",
    )
    torch._check(
        boxes.dim() == 2 and boxes.size(1) == 4 and boxes.size(0) == masks.size(0),
        lambda: f"{op}: expected boxes of shape [{masks.size(0)}, 4], got {tuple(boxes.shape)}",
    )


@torch.library.register_fake("maskrcnn_ops::paste_masks")
def _paste_masks_fake(masks, boxes, height, width, padding=1, threshold=None):
    _check_paste_inputs("paste_masks", masks, boxes)
    dtype = torch.bool if threshold is not None else masks.dtype
    return masks.new_empty((masks.size(0), height, width), dtype=dtype)


@torch.library.register_fake("maskrcnn_ops::masks_to_rle")
def _masks_to_rle_fake(masks, boxes, height, width, padding=1, threshold=0.5):
    _check_paste_inputs("masks_to_rle", masks, boxes)
    # The encodings' total length depends on the data: an unbacked size.
    length = torch.library.get_ctx().new_dynamic_size()
    chars = masks.new_empty((length,), dtype=torch.uint8)
    return chars, masks.new_empty((masks.size(0) + 1,), dtype=torch.int64)


@torch.library.register_fake("maskrcnn_ops::heatmaps_to_keypoints")
def _heatmaps_to_keypoints_fake(heatmaps, boxes):
    torch._check(
        heatmaps.dim() == 4, lambda: f"heatmaps_to_keypoints: expected heatmaps of shape [D, K, H, W], got "
        f"{tuple(heatmaps.shape)}"
    )
    torch._check(
        boxes.dim() == 2 and boxes.size(1) == 4 and boxes.size(0) == heatmaps.size(0),
        lambda: f"heatmaps_to_keypoints: expected boxes of shape [{heatmaps.size(0)}, 4], got {tuple(boxes.shape)}",
    )
    # float32 results, float64 for float64 heatmaps (the accumulation dtype).
    dtype = torch.float64 if heatmaps.dtype == torch.float64 else torch.float32
    rois, per_roi = heatmaps.size(0), heatmaps.size(1)
    return heatmaps.new_empty((rois, per_roi, 3), dtype=dtype), heatmaps.new_empty((rois, per_roi), dtype=dtype)
