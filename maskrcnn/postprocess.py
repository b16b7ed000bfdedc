"""Detection post-processing for a whole batch: torchvision's
``RoIHeads.postprocess_detections`` (softmax, per-class decode, clip, drop
background, score threshold, small boxes, per-class NMS, top-k), with the
NMS of all classes of whole images at once (``maskrcnn_ops.image_groups``)
and one top-k for the batch."""

from __future__ import annotations

import itertools
from typing import List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

import maskrcnn_ops


class Detections(NamedTuple):
    """Per image: boxes [D_i, 4] (x1, y1, x2, y2) float32, scores [D_i]
    float32 by decreasing score, labels [D_i] int64 (1..num_classes-1)."""

    boxes: List[Tensor]
    scores: List[Tensor]
    labels: List[Tensor]


def detect_objects(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: Sequence[Tensor],
    image_sizes: Sequence[Tuple[int, int]],
    *,
    box_coder: maskrcnn_ops.BoxCoder,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
    nms_boxes_per_call: int = maskrcnn_ops.NMS_BOXES_PER_CALL,
) -> Detections:
    """Final detections from the box predictor's outputs.

    Args:
        class_logits: [K, C] for the K = sum_i K_i proposals of the batch.
        box_deltas: [K, C * 4] class-specific deltas.
        proposals: per image [K_i, 4] boxes the deltas refer to.
        image_sizes: per image (height, width) to clip to.
        box_coder: the coder the box deltas were trained with (the RoI
            heads' ``box_coder``).
        score_thresh: class probabilities at or below this are dropped.
        nms_thresh: IoU threshold of the NMS within each (image, class).
        detections_per_img: best detections kept per image.
        min_size: boxes with a side below this (pixels) are dropped.
        nms_boxes_per_call: the most candidates of one NMS call (whole
            images per call, as ``maskrcnn_ops.image_groups``); the result
            does not depend on it, the CUDA NMS memory does.

    Returns:
        Detections, in torchvision's order: by decreasing score, ties by
        (proposal, class). Box math is float32 whatever the inputs' dtype
        (half-precision boxes would be off by up to a pixel at 1333).
    """
    counts = [p.size(0) for p in proposals]
    num_images, num_classes = len(proposals), class_logits.size(-1)
    device = class_logits.device
    total = sum(counts)
    if class_logits.shape != (total, num_classes) or box_deltas.shape != (total, num_classes * 4):
        raise ValueError(
            f"expected class_logits [{total}, C] and box_deltas [{total}, C * 4] for {total} proposals, "
            f"got {tuple(class_logits.shape)} and {tuple(box_deltas.shape)}"
        )
    image_of_row = torch.repeat_interleave(torch.arange(num_images, device=device), torch.tensor(counts, device=device))
    limits = torch.tensor(image_sizes, dtype=torch.float32, device=device).view(num_images, 2)[image_of_row]

    boxes = box_coder.decode(box_deltas.float(), torch.cat(list(proposals)).float())
    boxes = maskrcnn_ops.clip_boxes_to_image(boxes.view(total, num_classes, 4), limits[:, None])[:, 1:]  # no background
    scores = torch.softmax(class_logits.float(), dim=-1)[:, 1:]
    labels = torch.arange(1, num_classes, device=device).expand(total, num_classes - 1)
    images = image_of_row[:, None].expand(total, num_classes - 1)

    boxes, scores, labels, images = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1), images.reshape(-1)
    candidates = torch.nonzero((scores > score_thresh) & maskrcnn_ops.boxes_large_enough(boxes, min_size)).squeeze(1)
    boxes, scores, labels, images = boxes[candidates], scores[candidates], labels[candidates], images[candidates]

    if candidates.numel() <= nms_boxes_per_call:  # the usual case: one call
        keep = maskrcnn_ops.batched_nms_keep(boxes, scores, labels, nms_thresh, images)
    else:
        # Candidates are grouped by image (rows are), so whole images go
        # through NMS together in bounded calls (image_groups); counting them
        # per image costs one more sync in a function that syncs anyway.
        keep = torch.empty(candidates.numel(), dtype=torch.bool, device=device)
        boxes_per_image = torch.bincount(images, minlength=num_images).tolist()
        offsets = list(itertools.accumulate(boxes_per_image, initial=0))
        for first, last in maskrcnn_ops.image_groups(boxes_per_image, nms_boxes_per_call):
            rows = slice(offsets[first], offsets[last])
            keep[rows] = maskrcnn_ops.batched_nms_keep(boxes[rows], scores[rows], labels[rows], nms_thresh,
                                                       images[rows])
    kept, kept_counts = maskrcnn_ops.rank_kept_per_image(keep, scores, images, num_images, detections_per_img)
    per_image = [kept[i, :n] for i, n in enumerate(kept_counts.tolist())]
    return Detections([boxes[k] for k in per_image], [scores[k] for k in per_image], [labels[k] for k in per_image])


def select_class_masks(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Probabilities of each detection's own class: mask_logits [D, C, M, M]
    and labels [D] -> [D, 1, M, M] in [0, 1], float32."""
    rows = torch.arange(labels.numel(), device=labels.device)
    return torch.sigmoid(mask_logits[rows, labels].float())[:, None]


__all__ = ["Detections", "detect_objects", "select_class_masks"]
