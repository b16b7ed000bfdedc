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


def class_boxes_and_scores(
    class_logits: Tensor, box_deltas: Tensor, proposals: Tensor, limits: Tensor, *, box_coder: maskrcnn_ops.BoxCoder
) -> Tuple[Tensor, Tensor, Tensor]:
    """Every (proposal, foreground class) pair as a candidate detection.

    Args:
        class_logits: [K, C]; box_deltas: [K, C * 4]; proposals: [K, 4].
        limits: [K, 2] float32 (height, width) of each proposal's image.
        box_coder: the coder the box deltas were trained with.

    Returns:
        boxes [K, C - 1, 4] decoded and clipped, scores [K, C - 1] (softmax)
        and labels [K, C - 1] int64 (1..C-1), all float32 but the labels.
    """
    total, num_classes = class_logits.shape
    boxes = box_coder.decode(box_deltas.float(), proposals.float())
    boxes = maskrcnn_ops.clip_boxes_to_image(boxes.view(total, num_classes, 4), limits[:, None])[:, 1:]  # no background
    scores = torch.softmax(class_logits.float(), dim=-1)[:, 1:]
    labels = torch.arange(1, num_classes, device=class_logits.device).expand(total, num_classes - 1)
    return boxes, scores, labels


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
    boxes, scores, labels = class_boxes_and_scores(
        class_logits, box_deltas, torch.cat(list(proposals)), limits, box_coder=box_coder
    )
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


class PaddedDetections(NamedTuple):
    """Detections of a batch in fixed-size form: ``num_detections`` int64
    [N]; per image the first ``num_detections[i]`` rows of ``boxes`` [N, D,
    4] float32, ``scores`` [N, D] float32 (decreasing) and ``labels`` [N, D]
    int64 are the detections, the rest zeros."""

    num_detections: Tensor
    boxes: Tensor
    scores: Tensor
    labels: Tensor


def detect_objects_padded(
    class_logits: Tensor,
    box_deltas: Tensor,
    proposals: Tensor,
    num_proposals: Tensor,
    image_sizes: Tensor,
    *,
    box_coder: maskrcnn_ops.BoxCoder,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
) -> PaddedDetections:
    """:func:`detect_objects` for a padded batch, with fixed-size outputs and
    no host sync (traceable with dynamic shapes): the same detections in
    the same order (the NMS sees the same candidates; the others are NaN
    boxes, which suppress nothing).

    Args:
        class_logits: [N, P, C] for P proposal slots per image.
        box_deltas: [N, P, C * 4].
        proposals: [N, P, 4]; the first ``num_proposals[i]`` rows of image i
            are its proposals.
        num_proposals: int64 [N].
        image_sizes: [N, 2] (height, width) to clip to.
        other arguments as :func:`detect_objects` (the NMS is one
        ``maskrcnn_ops.nms_keep_rows`` call, which bounds its CUDA memory itself).

    Returns:
        PaddedDetections with D = ``detections_per_img``.
    """
    n, slots, num_classes = class_logits.shape
    device = class_logits.device
    limits = image_sizes.to(device=device, dtype=torch.float32)[:, None].expand(n, slots, 2).reshape(-1, 2)
    boxes, scores, _ = class_boxes_and_scores(
        class_logits.reshape(n * slots, num_classes), box_deltas.reshape(n * slots, num_classes * 4),
        proposals.reshape(n * slots, 4), limits, box_coder=box_coder,
    )
    slot_labels = torch.arange(1, num_classes, device=device).repeat(slots)  # [P * (C - 1)], each image's
    is_proposal = torch.arange(slots, device=device)[None, :] < num_proposals.to(device)[:, None]  # [N, P]
    candidate = (is_proposal.reshape(-1, 1) & (scores > score_thresh)
                 & maskrcnn_ops.boxes_large_enough(boxes, min_size))  # [N * P, C - 1]
    # NMS within each (image, class): rows of the P proposals' boxes of one
    # class. Boxes that are not candidates become NaN, which suppress nothing.
    def by_class(x: Tensor) -> Tensor:  # [N * P, C - 1, ...] -> [N * (C - 1), P, ...]
        return x.view(n, slots, num_classes - 1, *x.shape[2:]).transpose(1, 2).reshape(-1, slots, *x.shape[2:])

    nms_boxes = by_class(boxes.masked_fill(~candidate[..., None], float("nan")))
    keep = maskrcnn_ops.nms_keep_rows(nms_boxes, by_class(scores), nms_thresh)
    keep = keep.view(n, num_classes - 1, slots).transpose(1, 2).reshape(n, -1) & candidate.view(n, -1)
    per_image = slots * (num_classes - 1)
    boxes, scores = boxes.reshape(n, per_image, 4), scores.reshape(n, per_image)
    image_ids = torch.arange(n, device=device).repeat_interleave(per_image)
    kept, counts = maskrcnn_ops.rank_kept_per_image(keep.reshape(-1), scores.reshape(-1), image_ids, n,
                                                    detections_per_img)
    filled = kept >= 0
    index = kept.clamp(min=0)
    return PaddedDetections(
        counts,
        torch.where(filled[..., None], boxes.reshape(-1, 4)[index], 0),
        torch.where(filled, scores.reshape(-1)[index], 0),
        torch.where(filled, slot_labels[index % per_image], 0),
    )


def select_class_masks(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Probabilities of each detection's own class: mask_logits [D, C, M, M]
    and labels [D] -> [D, 1, M, M] in [0, 1], float32."""
    rows = torch.arange(labels.numel(), device=labels.device)
    return torch.sigmoid(mask_logits[rows, labels].float())[:, None]


__all__ = ["Detections", "PaddedDetections", "class_boxes_and_scores", "detect_objects", "detect_objects_padded",
           "select_class_masks"]
