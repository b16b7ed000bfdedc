"""The keypoint branch's training targets and loss as pure functions, with
the semantics of torchvision's ``keypoints_to_heatmap`` and
``keypointrcnn_loss``: each visible keypoint inside its proposal is one
cell of an S x S grid over the proposal, and the loss is a cross-entropy
over the S * S cells of each (proposal, keypoint) heatmap."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import _concat, _zero_loss


def keypoint_heatmap_targets(keypoints: Tensor, boxes: Tensor, *, size: int) -> Tuple[Tensor, Tensor]:
    """The heatmap cell of each keypoint in its box's S x S grid.

    A keypoint at (x, y) falls in cell (floor((x - x1) * S / w),
    floor((y - y1) * S / h)) of its box (w, h its width and height); one
    exactly on the box's right (bottom) edge counts in the last column
    (row). It is a target only when that cell lies in the grid (the
    keypoint inside the box) and its visibility is > 0.

    Args:
        keypoints: [P, K, 3] (x, y, visibility) of each box's matched instance.
        boxes: [P, 4] (x1, y1, x2, y2), same coordinates.
        size: S, the heatmaps' side (56).

    Returns:
        (cells [P, K] int64 y * S + x, 0 where not valid; valid [P, K] bool).
    """
    if keypoints.dim() != 3 or keypoints.size(-1) != 3 or boxes.shape != (keypoints.size(0), 4):
        raise ValueError(
            f"keypoints must be [P, K, 3] and boxes [P, 4], got {tuple(keypoints.shape)} and {tuple(boxes.shape)}"
        )
    x1, y1, x2, y2 = (boxes[:, i : i + 1] for i in range(4))
    x, y = keypoints[..., 0], keypoints[..., 1]
    # Scale then floor, in this order, as torchvision (the other order
    # rounds a few keypoints into the neighbouring cell).
    column = ((x - x1) * (size / (x2 - x1))).floor().long()
    row = ((y - y1) * (size / (y2 - y1))).floor().long()
    column = torch.where(x == x2, size - 1, column)
    row = torch.where(y == y2, size - 1, row)
    inside = (column >= 0) & (row >= 0) & (column < size) & (row < size)
    valid = inside & (keypoints[..., 2] > 0)
    return torch.where(valid, row * size + column, 0), valid


def keypoint_loss(
    keypoint_logits: Tensor,
    boxes: Sequence[Tensor],
    gt_keypoints: Sequence[Tensor],
    matched_gt_indices: Sequence[Tensor],
) -> Tensor:
    """The keypoint head's loss: for each (positive box, keypoint) with a
    valid target (``keypoint_heatmap_targets``), the cross-entropy of the
    S * S heatmap logits against the target cell; mean over those.

    Args:
        keypoint_logits: [P, K, S, S] over all positive samples of all images.
        boxes: per image, [P_i, 4] the positive samples' boxes.
        gt_keypoints: per image, [G_i, K, 3] ground-truth keypoints.
        matched_gt_indices: per image, [P_i] int64 index of each box's instance.

    Returns:
        a scalar; zero (connected to the graph) when no keypoint is a target.
    """
    if keypoint_logits.dim() != 4 or keypoint_logits.size(-1) != keypoint_logits.size(-2):
        raise ValueError(f"keypoint_logits must be [P, K, S, S], got shape {tuple(keypoint_logits.shape)}")
    num_boxes, num_keypoints, size, _ = keypoint_logits.shape
    boxes = _concat("boxes", boxes, num_boxes)
    if len(gt_keypoints) != len(matched_gt_indices):
        raise ValueError(f"expected one gt_keypoints and one matched_gt_indices per image, got "
                         f"{len(gt_keypoints)} and {len(matched_gt_indices)}")
    matched = _concat("matched_gt_indices", [k[m] for k, m in zip(gt_keypoints, matched_gt_indices)], num_boxes)
    if matched.size(1) != num_keypoints:
        raise ValueError(f"gt_keypoints have {matched.size(1)} keypoints per instance, the logits {num_keypoints}")
    cells, valid = keypoint_heatmap_targets(matched.to(boxes.dtype), boxes, size=size)
    valid = torch.where(valid.flatten())[0]
    if valid.numel() == 0:
        return _zero_loss(keypoint_logits)
    logits = keypoint_logits.reshape(num_boxes * num_keypoints, size * size)
    return F.cross_entropy(logits[valid], cells.flatten()[valid])


__all__ = ["keypoint_heatmap_targets", "keypoint_loss"]
