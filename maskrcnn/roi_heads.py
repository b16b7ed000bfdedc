"""The second stage: multi-level RoIAlign on the proposals, box head,
post-processing into detections, then RoIAlign on the detections and the
mask head."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor, nn

import maskrcnn_ops

from .heads import FastRCNNPredictor, MaskHead, MaskPredictor, TwoMLPHead
from .postprocess import BOX_CODER_WEIGHTS, detect_objects, select_class_masks

FPN_LEVEL_NAMES = ("0", "1", "2", "3")


def multi_scale_roi_align(*, output_size: int, sampling_ratio: int = 2) -> maskrcnn_ops.MultiScaleRoIAlign:
    """RoIAlign over the FPN levels "0".."3", each box pooled from the level
    that matches its size (one fused maskrcnn_ops kernel)."""
    return maskrcnn_ops.MultiScaleRoIAlign(
        featmap_names=list(FPN_LEVEL_NAMES), output_size=output_size, sampling_ratio=sampling_ratio
    )


class RoIHeadOutputs(NamedTuple):
    """Per image, in the resized image's coordinates: boxes [D_i, 4],
    scores [D_i], labels [D_i] int64 and masks [D_i, 1, M, M] (probabilities
    of the detected class, M = 28 for the standard head)."""

    boxes: List[Tensor]
    scores: List[Tensor]
    labels: List[Tensor]
    masks: List[Tensor]


class RoIHeads(nn.Module):
    """Box and mask branches of Mask R-CNN at inference.

    Args:
        box_roi_pool, mask_roi_pool: multi-level RoIAlign modules (7x7 and 14x14).
        box_head, box_predictor: features -> class logits and box deltas.
        mask_head, mask_predictor: features -> per-class mask logits.
        score_thresh, nms_thresh, detections_per_img: see
            ``postprocess.detect_objects``.
        box_weights: box coder weights of the box deltas.
    """

    def __init__(
        self,
        *,
        box_roi_pool: nn.Module,
        box_head: TwoMLPHead,
        box_predictor: FastRCNNPredictor,
        mask_roi_pool: nn.Module,
        mask_head: MaskHead,
        mask_predictor: MaskPredictor,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        box_weights: Sequence[float] = BOX_CODER_WEIGHTS,
    ) -> None:
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.box_weights = tuple(box_weights)

    def box_logits(
        self, features: Dict[str, Tensor], proposals: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> Tuple[Tensor, Tensor]:
        """Class logits [K, C] and box deltas [K, C * 4] of the K = sum_i K_i
        proposals of the batch."""
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        return self.box_predictor(self.box_head(pooled))

    def mask_probabilities(
        self, features: Dict[str, Tensor], boxes: List[Tensor], labels: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> List[Tensor]:
        """Per image [D_i, 1, M, M] probabilities of each detection's class."""
        counts = [b.size(0) for b in boxes]
        pooled = self.mask_roi_pool(features, boxes, image_sizes)
        logits = self.mask_predictor(self.mask_head(pooled))
        return list(select_class_masks(logits, torch.cat(labels)).split(counts))

    def forward(
        self, features: Dict[str, Tensor], proposals: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> RoIHeadOutputs:
        """Args:
            features: FPN levels (the "0".."3" ones are pooled).
            proposals: per image [K_i, 4] in the resized image.
            image_sizes: per image (height, width) of the resized image.
        """
        class_logits, box_deltas = self.box_logits(features, proposals, image_sizes)
        detections = detect_objects(
            class_logits,
            box_deltas,
            proposals,
            image_sizes,
            score_thresh=self.score_thresh,
            nms_thresh=self.nms_thresh,
            detections_per_img=self.detections_per_img,
            weights=self.box_weights,
        )
        masks = self.mask_probabilities(features, detections.boxes, detections.labels, image_sizes)
        return RoIHeadOutputs(detections.boxes, detections.scores, detections.labels, masks)


__all__ = ["FPN_LEVEL_NAMES", "RoIHeadOutputs", "RoIHeads", "multi_scale_roi_align"]
