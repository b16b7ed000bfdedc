"""Mask R-CNN's training losses as pure functions of predictions and targets,
numerically equal to torchvision's (``RegionProposalNetwork.compute_loss``
given sampled labels, ``fastrcnn_loss``, ``maskrcnn_loss``)."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# smooth-L1's switch from quadratic to linear, in delta units (Detectron's 1/9).
SMOOTH_L1_BETA = 1.0 / 9.0


def _concat(name: str, per_image: Sequence[Tensor], rows: int) -> Tensor:
    if isinstance(per_image, Tensor):
        raise TypeError(f"{name} must be a list with one tensor per image, got a single Tensor")
    if len(per_image) == 0:
        raise ValueError(f"{name} is an empty list: give one tensor per image")
    joined = torch.cat(list(per_image), dim=0)
    if joined.size(0) != rows:
        raise ValueError(f"{name} hold {joined.size(0)} rows over all images, but the predictions have {rows}")
    return joined


def _zero_loss(*predictions: Tensor) -> Tensor:
    """A zero that is still connected to the graph (so backward and DDP see
    every parameter used) when there is nothing to learn from."""
    return sum(prediction.sum() * 0 for prediction in predictions)


def rpn_loss(
    objectness: Tensor,
    pred_deltas: Tensor,
    labels: Sequence[Tensor],
    regression_targets: Sequence[Tensor],
) -> Tuple[Tensor, Tensor]:
    """The RPN's objectness and box losses over the sampled anchors.

    Args:
        objectness: [A] or [A, 1] logits of all anchors of all images
            (A = sum_i A_i, image-major, as ``flatten_rpn_outputs`` orders them).
        pred_deltas: [A, 4] predicted (dx, dy, dw, dh).
        labels: per image, [A_i] sampled labels (``sample_anchor_labels``):
            1 positive, 0 negative, -1 not sampled.
        regression_targets: per image, [A_i, 4] (``assign_anchor_targets``).

    Returns:
        (objectness_loss, box_loss): binary cross-entropy with logits, mean
        over the sampled anchors; smooth-L1 (beta 1/9) summed over positives
        and divided by the number sampled. Both zero (connected to the graph)
        when nothing is sampled.
    """
    objectness = objectness.flatten()
    labels = _concat("labels", labels, objectness.size(0))
    regression_targets = _concat("regression_targets", regression_targets, objectness.size(0))
    if pred_deltas.shape != (objectness.size(0), 4):
        raise ValueError(f"pred_deltas must be [A, 4] with A = {objectness.size(0)}, got {tuple(pred_deltas.shape)}")
    positive = torch.where(labels == 1)[0]
    negative = torch.where(labels == 0)[0]
    # Positives then negatives, as torchvision, so the mean sums in the same order.
    sampled = torch.cat([positive, negative])
    if sampled.numel() == 0:
        zero = _zero_loss(objectness, pred_deltas)
        return zero, zero.clone()
    box_loss = F.smooth_l1_loss(
        pred_deltas[positive], regression_targets[positive], beta=SMOOTH_L1_BETA, reduction="sum"
    ) / sampled.numel()
    objectness_loss = F.binary_cross_entropy_with_logits(
        objectness[sampled], labels[sampled].to(objectness.dtype)
    )
    return objectness_loss, box_loss


def box_head_loss(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Sequence[Tensor],
    regression_targets: Sequence[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Fast R-CNN's classification and box regression losses.

    Args:
        class_logits: [S, C] over all sampled proposals of all images
            (C classes including background 0).
        box_regression: [S, 4 * C] per-class deltas.
        labels: per image, [S_i] int64 classes (``ProposalSamples.labels``).
        regression_targets: per image, [S_i, 4] (weights 10, 10, 5, 5).

    Returns:
        (classification_loss, box_loss): cross-entropy, mean over samples;
        smooth-L1 (beta 1/9) of the positives' deltas for their ground-truth
        class only, summed and divided by the number of samples. Both zero
        (connected to the graph) when there are no samples.
    """
    if class_logits.dim() != 2 or box_regression.shape != (class_logits.size(0), 4 * class_logits.size(1)):
        raise ValueError(
            f"class_logits must be [S, C] and box_regression [S, 4 * C], got {tuple(class_logits.shape)} "
            f"and {tuple(box_regression.shape)}"
        )
    num_samples, num_classes = class_logits.shape
    labels = _concat("labels", labels, num_samples)
    regression_targets = _concat("regression_targets", regression_targets, num_samples)
    if num_samples == 0:
        zero = _zero_loss(class_logits, box_regression)
        return zero, zero.clone()
    classification_loss = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    per_class = box_regression.reshape(num_samples, num_classes, 4)
    box_loss = F.smooth_l1_loss(
        per_class[positive, labels[positive]], regression_targets[positive], beta=SMOOTH_L1_BETA, reduction="sum"
    ) / num_samples
    return classification_loss, box_loss


def mask_loss(mask_logits: Tensor, labels: Sequence[Tensor], mask_targets: Sequence[Tensor]) -> Tensor:
    """The mask head's loss: per-pixel binary cross-entropy on the channel of
    each positive's ground-truth class only (the other classes' masks get no
    gradient, which decouples mask and class prediction).

    Args:
        mask_logits: [P, C, M, M] over all positive samples of all images.
        labels: per image, [P_i] int64 ground-truth classes of the positives.
        mask_targets: per image, [P_i, M, M] in [0, 1] (``mask_targets``).

    Returns:
        scalar mean over P * M * M pixels; zero (connected to the graph)
        when there are no positives.
    """
    if mask_logits.dim() != 4:
        raise ValueError(f"mask_logits must be [P, C, M, M], got shape {tuple(mask_logits.shape)}")
    num_positives = mask_logits.size(0)
    labels = _concat("labels", labels, num_positives)
    mask_targets = _concat("mask_targets", mask_targets, num_positives)
    if mask_targets.shape[1:] != mask_logits.shape[2:]:
        raise ValueError(
            f"mask_targets must be [P, M, M] matching mask_logits {tuple(mask_logits.shape)}, "
            f"got {tuple(mask_targets.shape)}"
        )
    if num_positives == 0:
        return _zero_loss(mask_logits)
    logits_of_class = mask_logits[torch.arange(num_positives, device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits_of_class, mask_targets.to(mask_logits.dtype))
