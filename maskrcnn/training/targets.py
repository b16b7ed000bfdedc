"""Training targets: which anchors and proposals are positive, negative or
ignored, what their boxes should regress to, and the masks the mask head
should predict. Semantics of torchvision's ``RegionProposalNetwork.
assign_targets_to_anchors``, ``RoIHeads.select_training_samples`` and
``project_masks_on_boxes``, on maskrcnn_ops kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import maskrcnn_ops

from .matching import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, box_iou, match_boxes
from .sampling import sample_balanced

# The box coder weights (wx, wy, ww, wh) of the paper and torchvision: the
# defaults of the RPN's and the RoI heads' ``box_weights``. Each of those
# modules builds one ``maskrcnn_ops.BoxCoder`` from its weights and passes it
# both to its training targets here and to its decoding.
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _check_same_length(**lists: Sequence) -> None:
    lengths = {name: len(items) for name, items in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"expected one entry per image in each of {', '.join(lengths)}, got lengths {lengths}")


def assign_anchor_targets(
    anchors: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    *,
    box_coder: maskrcnn_ops.BoxCoder,
    high_threshold: float = 0.7,
    low_threshold: float = 0.3,
) -> Tuple[List[Tensor], List[Tensor]]:
    """Labels and regression targets of the RPN's anchors (before sampling).

    Args:
        anchors: per image, [A_i, 4] anchors (x1, y1, x2, y2).
        gt_boxes: per image, [K_i, 4] ground-truth boxes; K_i may be 0.
        box_coder: the RPN's coder (the one that decodes its proposals).
        high_threshold, low_threshold: IoU >= high is positive, < low negative,
            in between ignored; each ground truth's best anchors are positive
            too (low-quality matches), as in the paper and torchvision.

    Returns:
        (labels, regression_targets): per image, float32 [A_i] of 1 (object),
        0 (background), -1 (ignored), and [A_i, 4] deltas (dx, dy, dw, dh) of
        each anchor's matched box, ``box_coder.encode``.
        Anchors that are not positive get the deltas towards ground truth 0
        (as torchvision; the loss uses positives only). An image without
        ground truth has all anchors at 0 and zero targets (torchvision's
        targets there are encodings of an all-zero box, -inf in dw and dh;
        they are never read).
    """
    _check_same_length(anchors=anchors, gt_boxes=gt_boxes)
    labels, regression_targets = [], []
    for image_anchors, image_gt_boxes in zip(anchors, gt_boxes):
        num_anchors = image_anchors.size(0)
        if image_gt_boxes.size(0) == 0:
            labels.append(torch.zeros(num_anchors, dtype=torch.float32, device=image_anchors.device))
            regression_targets.append(torch.zeros_like(image_anchors))
            continue
        matches = match_boxes(
            box_iou(image_gt_boxes, image_anchors),
            high_threshold=high_threshold,
            low_threshold=low_threshold,
            allow_low_quality_matches=True,
        )
        image_labels = (matches >= 0).to(torch.float32)
        image_labels[matches == BETWEEN_THRESHOLDS] = -1.0
        matched_boxes = image_gt_boxes[matches.clamp(min=0)]
        labels.append(image_labels)
        regression_targets.append(box_coder.encode(matched_boxes, image_anchors))
    return labels, regression_targets


def sample_anchor_labels(
    labels: Sequence[Tensor],
    *,
    batch_size_per_image: int = 256,
    positive_fraction: float = 0.5,
    generator: Optional[torch.Generator] = None,
) -> List[Tensor]:
    """Keeps a balanced sample of the anchors' labels, the rest set to -1.

    Args:
        labels: per image, [A_i] labels 1 / 0 / -1 from ``assign_anchor_targets``.
        batch_size_per_image, positive_fraction: the sample's size and its
            largest share of positives (paper and torchvision: 256, 0.5).
        generator: see ``sample_balanced`` (None: torchvision's draws).

    Returns:
        per image, [A_i] labels: 1 sampled positive, 0 sampled negative, -1
        not in the sample. This is what ``rpn_loss`` takes.
    """
    positive_masks, negative_masks = sample_balanced(
        labels, batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction, generator=generator
    )
    sampled_labels = []
    for image_labels, positive, negative in zip(labels, positive_masks, negative_masks):
        image_sampled = torch.full_like(image_labels, -1.0)
        image_sampled[positive] = 1.0
        image_sampled[negative] = 0.0
        sampled_labels.append(image_sampled)
    return sampled_labels


@dataclass
class ProposalSamples:
    """The proposals the RoI heads train on, per image (S_i sampled of each).

    Attributes:
        proposals: [S_i, 4] sampled boxes (proposals and ground-truth boxes).
        labels: [S_i] int64 class of the matched ground truth, 0 background.
        matched_gt_indices: [S_i] int64 index of the matched ground truth
            (0 for background samples, as torchvision; meaningful only where
            labels > 0).
        regression_targets: [S_i, 4] deltas towards the matched ground truth
            (``box_coder.encode``); zeros in images without ground truth.
    """

    proposals: List[Tensor]
    labels: List[Tensor]
    matched_gt_indices: List[Tensor]
    regression_targets: List[Tensor]

    def positives(self) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """(boxes [P_i, 4], labels [P_i], matched_gt_indices [P_i]) per image,
        of the samples with labels > 0: the mask head trains on these."""
        keep = [torch.where(image_labels > 0)[0] for image_labels in self.labels]
        return (
            [boxes[k] for boxes, k in zip(self.proposals, keep)],
            [labels[k] for labels, k in zip(self.labels, keep)],
            [indices[k] for indices, k in zip(self.matched_gt_indices, keep)],
        )


def _label_proposals(
    candidates: Tensor, gt_boxes: Tensor, gt_labels: Tensor, *, foreground_iou: float, background_iou: float
) -> Tuple[Tensor, Tensor]:
    """(matched_gt_indices [N] >= 0, labels [N] int64 with 0 background and
    -1 ignored) of one image's candidate boxes."""
    if gt_boxes.size(0) == 0:
        zeros = torch.zeros(candidates.size(0), dtype=torch.int64, device=candidates.device)
        return zeros, zeros.clone()
    matches = match_boxes(
        box_iou(gt_boxes, candidates),
        high_threshold=foreground_iou,
        low_threshold=background_iou,
        allow_low_quality_matches=False,
    )
    matched = matches.clamp(min=0)
    labels = gt_labels[matched].to(torch.int64)
    labels[matches == BELOW_LOW_THRESHOLD] = 0
    labels[matches == BETWEEN_THRESHOLDS] = -1
    return matched, labels


def sample_proposals(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    *,
    box_coder: maskrcnn_ops.BoxCoder,
    foreground_iou: float = 0.5,
    background_iou: float = 0.5,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    generator: Optional[torch.Generator] = None,
) -> ProposalSamples:
    """Chooses the RoI heads' training samples among the proposals.

    The ground-truth boxes are appended to each image's proposals (so that
    every object has at least one perfect positive), each candidate is
    matched to its best ground truth (IoU >= foreground_iou: that class;
    < background_iou: background; in between, possible when the thresholds
    differ: ignored), then a balanced sample is drawn.

    Args:
        proposals: per image, [N_i, 4] RPN proposals (x1, y1, x2, y2).
        gt_boxes: per image, [K_i, 4]; K_i may be 0 (all samples background).
        gt_labels: per image, [K_i] int64 classes (>= 1).
        box_coder: the RoI heads' coder (the one that decodes their box
            deltas), for the regression targets.
        foreground_iou, background_iou: paper and torchvision: 0.5, 0.5.
        batch_size_per_image, positive_fraction: paper and torchvision: 512, 0.25.
        generator: see ``sample_balanced`` (None: torchvision's draws).

    Returns:
        ProposalSamples; sample order within an image is by candidate index
        (proposals first, then ground-truth boxes), as torchvision.
    """
    _check_same_length(proposals=proposals, gt_boxes=gt_boxes, gt_labels=gt_labels)
    candidates, matched, labels = [], [], []
    for image_proposals, image_gt_boxes, image_gt_labels in zip(proposals, gt_boxes, gt_labels):
        if image_gt_boxes.size(0) != image_gt_labels.size(0):
            raise ValueError(
                f"gt_boxes [K, 4] and gt_labels [K] disagree on K: {tuple(image_gt_boxes.shape)} "
                f"and {tuple(image_gt_labels.shape)}"
            )
        image_gt_boxes = image_gt_boxes.to(image_proposals.dtype)
        image_candidates = torch.cat([image_proposals, image_gt_boxes])
        image_matched, image_labels = _label_proposals(
            image_candidates,
            image_gt_boxes,
            image_gt_labels,
            foreground_iou=foreground_iou,
            background_iou=background_iou,
        )
        candidates.append(image_candidates)
        matched.append(image_matched)
        labels.append(image_labels)

    positive_masks, negative_masks = sample_balanced(
        labels, batch_size_per_image=batch_size_per_image, positive_fraction=positive_fraction, generator=generator
    )
    samples = ProposalSamples(proposals=[], labels=[], matched_gt_indices=[], regression_targets=[])
    for image_index, (positive, negative) in enumerate(zip(positive_masks, negative_masks)):
        sampled = torch.where(positive | negative)[0]
        sampled_boxes = candidates[image_index][sampled]
        sampled_matched = matched[image_index][sampled]
        image_gt_boxes = gt_boxes[image_index].to(sampled_boxes.dtype)
        if image_gt_boxes.size(0) == 0:
            targets = torch.zeros_like(sampled_boxes)
        else:
            targets = box_coder.encode(image_gt_boxes[sampled_matched], sampled_boxes)
        samples.proposals.append(sampled_boxes)
        samples.labels.append(labels[image_index][sampled])
        samples.matched_gt_indices.append(sampled_matched)
        samples.regression_targets.append(targets)
    return samples


def mask_targets(gt_masks: Tensor, boxes: Tensor, matched_gt_indices: Tensor, *, size: int) -> Tensor:
    """Ground-truth masks cropped to boxes and resized: the mask head's targets.

    Each box's matched mask is sampled with RoIAlign (output size x size,
    spatial_scale 1, adaptive sampling, aligned=False), as torchvision's
    ``project_masks_on_boxes``; values are fractions in [0, 1], not rounded.

    Args:
        gt_masks: [K, H, W] one image's instance masks (uint8, bool or float).
        boxes: [P, 4] positive sampled proposals in that image's coordinates.
        matched_gt_indices: [P] int64 index in [0, K) of each box's mask.
        size: M, the mask head's output resolution (28 for Mask R-CNN).

    Returns:
        [P, M, M] in boxes' dtype.
    """
    if gt_masks.dim() != 3:
        raise ValueError(f"gt_masks must be [K, H, W], got shape {tuple(gt_masks.shape)}")
    if boxes.dim() != 2 or boxes.size(1) != 4 or matched_gt_indices.shape != (boxes.size(0),):
        raise ValueError(
            f"boxes must be [P, 4] and matched_gt_indices [P], got {tuple(boxes.shape)} "
            f"and {tuple(matched_gt_indices.shape)}"
        )
    if boxes.size(0) == 0:
        return boxes.new_zeros((0, size, size))
    if int(matched_gt_indices.min()) < 0 or int(matched_gt_indices.max()) >= gt_masks.size(0):
        raise ValueError(
            f"matched_gt_indices must lie in [0, {gt_masks.size(0)}) (one per mask), "
            f"got values in [{int(matched_gt_indices.min())}, {int(matched_gt_indices.max())}]"
        )
    # Only the matched masks are converted to floating point (an image may
    # hold many large masks of which few are positives in the sample).
    used_masks, mask_of_box = torch.unique(matched_gt_indices, return_inverse=True)
    masks = gt_masks[used_masks][:, None].to(boxes.dtype)  # [U, 1, H, W]
    rois = torch.cat([mask_of_box.to(boxes.dtype)[:, None], boxes], dim=1)
    return maskrcnn_ops.roi_align(masks, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=False)[:, 0]
