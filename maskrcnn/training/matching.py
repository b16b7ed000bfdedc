"""Box overlap and ground-truth matching for training (anchors in the RPN,
proposals in the RoI heads), with the semantics of torchvision's
``box_iou`` and ``_utils.Matcher``."""

from __future__ import annotations

import torch
from torch import Tensor

# Values match_boxes writes for predictions without a ground-truth match.
BELOW_LOW_THRESHOLD = -1  # best IoU < low_threshold: a negative (background)
BETWEEN_THRESHOLDS = -2  # low_threshold <= best IoU < high_threshold: ignored


def _check_boxes(name: str, boxes: Tensor) -> None:
    if boxes.dim() != 2 or boxes.size(1) != 4:
        raise ValueError(f"{name} must have shape [N, 4] of (x1, y1, x2, y2), got {tuple(boxes.shape)}")


def box_area(boxes: Tensor) -> Tensor:
    """Areas of boxes [N, 4] (x1, y1, x2, y2) -> [N]. A box with x2 < x1 or
    y2 < y1 gets a negative area (not clamped, as torchvision)."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection over union.

    Args:
        boxes1: [N, 4] (x1, y1, x2, y2); boxes2: [M, 4], same dtype and device.

    Returns:
        [N, M] IoU, in float32 for half-precision inputs (the products would
        overflow float16 for boxes above ~256 pixels), else in the inputs'
        dtype. The arithmetic is torchvision's, operation by operation, so the
        values are bitwise equal. Two zero-area boxes give 0 / 0 = NaN; a
        zero-area box against a box of positive area gives 0.
    """
    _check_boxes("boxes1", boxes1)
    _check_boxes("boxes2", boxes2)
    if boxes1.dtype in (torch.float16, torch.bfloat16):
        boxes1 = boxes1.float()
    if boxes2.dtype in (torch.float16, torch.bfloat16):
        boxes2 = boxes2.float()
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # [N, M, 2]
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [N, M, 2]
    overlap_sides = (bottom_right - top_left).clamp(min=0)
    intersection = overlap_sides[..., 0] * overlap_sides[..., 1]
    union = area1[:, None] + area2[None, :] - intersection
    return intersection / union


def match_boxes(
    iou_matrix: Tensor,
    *,
    high_threshold: float,
    low_threshold: float,
    allow_low_quality_matches: bool,
) -> Tensor:
    """Assigns each prediction (anchor or proposal) its best ground-truth box.

    Args:
        iou_matrix: [K, N] quality of every (ground truth k, prediction n)
            pair, usually ``box_iou(gt_boxes, predictions)``.
        high_threshold: a best IoU >= this is a match (RPN 0.7, RoI heads 0.5).
        low_threshold: a best IoU < this is BELOW_LOW_THRESHOLD (-1);
            in [low, high) it is BETWEEN_THRESHOLDS (-2). RPN 0.3, RoI 0.5.
        allow_low_quality_matches: also match, for every ground-truth box, the
            predictions with its highest IoU (all of them when tied), even
            below the thresholds, each to its own best ground truth (the RPN
            does this so that every object gets at least one anchor).

    Returns:
        [N] int64: the matched ground-truth index in [0, K), or -1 / -2.
        Equal to torchvision's ``Matcher``, including its quirks: a zero-area
        ground-truth box has IoU 0 with everything, so with low-quality
        matches every prediction it does not overlap becomes "its best" and is
        matched to that prediction's own best ground truth; drop degenerate
        boxes first (``maskrcnn.data.validate_target`` rejects them).
        Where torchvision raises on an empty matrix, K == 0 (an image without
        objects) gives all -1 (every prediction is background) and N == 0 an
        empty result.
    """
    if iou_matrix.dim() != 2:
        raise ValueError(f"iou_matrix must be [K ground truths, N predictions], got shape {tuple(iou_matrix.shape)}")
    if low_threshold > high_threshold:
        raise ValueError(f"low_threshold ({low_threshold}) must be <= high_threshold ({high_threshold})")
    num_gt, num_predictions = iou_matrix.shape
    if num_gt == 0 or num_predictions == 0:
        return torch.full((num_predictions,), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=iou_matrix.device)

    best_iou, best_gt = iou_matrix.max(dim=0)
    matches = best_gt.clone()
    matches[best_iou < low_threshold] = BELOW_LOW_THRESHOLD
    matches[(best_iou >= low_threshold) & (best_iou < high_threshold)] = BETWEEN_THRESHOLDS
    if allow_low_quality_matches:
        best_iou_per_gt = iou_matrix.max(dim=1).values  # [K]
        _, best_predictions = torch.where(iou_matrix == best_iou_per_gt[:, None])
        matches[best_predictions] = best_gt[best_predictions]
    return matches
