"""The second stage: multi-level RoIAlign on the proposals, box head,
post-processing into detections, then RoIAlign on the detections and the
mask head; in training, sampled proposals and the box and mask losses."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor, nn

import maskrcnn_ops

from .heads import FastRCNNPredictor, MaskHead, MaskPredictor, TwoMLPHead
from .postprocess import PaddedDetections, detect_objects, detect_objects_padded, select_class_masks
from .training import ROI_BOX_WEIGHTS, box_head_loss, mask_loss, mask_targets, sample_proposals

FPN_LEVEL_NAMES = ("0", "1", "2", "3")


def fpn_roi_pooler(*, output_size: int, sampling_ratio: int = 2) -> maskrcnn_ops.MultiScaleRoIAlign:
    """A RoIAlign module over the FPN levels "0".."3", each box pooled from
    the level that matches its size (one fused maskrcnn_ops kernel)."""
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


class PaddedRoIHeadOutputs(NamedTuple):
    """The RoI heads' outputs for a batch in fixed-size form (D =
    ``detections_per_img``): ``detections`` (PaddedDetections, resized-image
    coordinates) and ``masks`` [N, D, M, M], the probabilities of each
    detection's class (zeros past ``num_detections``)."""

    detections: PaddedDetections
    masks: Tensor

    def unpad(self) -> RoIHeadOutputs:
        """The per-image form of ``RoIHeads.forward`` (reads the counts: a
        host sync, or unbacked sizes in a traced graph)."""
        d = self.detections
        limit = d.boxes.size(1)
        boxes, scores, labels, masks = [], [], [], []
        for i, count in enumerate(d.num_detections.tolist()):
            torch._check(count >= 0)
            torch._check(count <= limit)
            boxes.append(d.boxes[i, :count])
            scores.append(d.scores[i, :count])
            labels.append(d.labels[i, :count])
            masks.append(self.masks[i, :count, None])
        return RoIHeadOutputs(boxes, scores, labels, masks)


def padded_rois(boxes: Tensor) -> Tensor:
    """Boxes [N, B, 4] per image -> rois [N * B, 5] (image index, x1, y1, x2, y2)."""
    n, per_image, _ = boxes.shape
    index = torch.arange(n, device=boxes.device, dtype=boxes.dtype).repeat_interleave(per_image)
    return torch.cat([index[:, None], boxes.reshape(n * per_image, 4)], dim=1)


class RoIHeads(nn.Module):
    """Box and mask branches of Mask R-CNN.

    Args:
        box_roi_pool, mask_roi_pool: multi-level RoIAlign modules (7x7 and 14x14).
        box_head, box_predictor: features -> class logits and box deltas.
        mask_head, mask_predictor: features -> per-class mask logits.
        score_thresh, nms_thresh, detections_per_img: see
            ``postprocess.detect_objects``.
        box_weights: the (wx, wy, ww, wh) of ``box_coder``, the one coder
            of the box deltas: training encodes its regression targets with
            it and inference decodes with it (default (10, 10, 5, 5)).
        fg_iou_thresh, bg_iou_thresh: in training, a proposal with IoU >= fg
            with a ground-truth box takes its class, below bg it is
            background (0.5, 0.5).
        batch_size_per_image, positive_fraction: proposals sampled per image
            for the losses, at most this fraction foreground (512, 0.25).
    """

    def __init__(
        self,
        *,
        box_roi_pool: maskrcnn_ops.MultiScaleRoIAlign,
        box_head: TwoMLPHead,
        box_predictor: FastRCNNPredictor,
        mask_roi_pool: maskrcnn_ops.MultiScaleRoIAlign,
        mask_head: MaskHead,
        mask_predictor: MaskPredictor,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        box_weights: Sequence[float] = ROI_BOX_WEIGHTS,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
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
        self.box_coder = maskrcnn_ops.BoxCoder(tuple(box_weights))
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def box_logits(
        self, features: Dict[str, Tensor], proposals: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> Tuple[Tensor, Tensor]:
        """Class logits [K, C] and box deltas [K, C * 4] of the K = sum_i K_i
        proposals of the batch."""
        pooled = self.box_roi_pool(features, proposals, image_sizes)
        return self.box_predictor(self.box_head(pooled))

    def mask_logits(
        self, features: Dict[str, Tensor], boxes: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> Tensor:
        """Per-class mask logits [D, C, M, M] of the D = sum_i D_i boxes."""
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_sizes)))

    def mask_probabilities(
        self, features: Dict[str, Tensor], boxes: List[Tensor], labels: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> List[Tensor]:
        """Per image [D_i, 1, M, M] probabilities of each detection's class."""
        counts = [b.size(0) for b in boxes]
        logits = self.mask_logits(features, boxes, image_sizes)
        return list(select_class_masks(logits, torch.cat(labels)).split(counts))

    def losses(
        self,
        features: Dict[str, Tensor],
        proposals: List[Tensor],
        image_sizes: List[Tuple[int, int]],
        targets: Sequence[Dict[str, Tensor]],
    ) -> Dict[str, Tensor]:
        """The training losses of the box and mask branches.

        The ground-truth boxes join the proposals, a balanced sample is
        drawn (global RNG, as torchvision), the box branch runs on it, and
        the mask branch on its foreground samples against the ground-truth
        masks cropped to them (RoIAlign).

        Args:
            features: FPN levels.
            proposals: per image [K_i, 4] (no gradient), resized-image coordinates.
            image_sizes: per image (height, width) of the resized image.
            targets: per image ``boxes`` [G_i, 4], ``labels`` [G_i] and
                ``masks`` [G_i, H_i, W_i] at the resized image's size.

        Returns:
            {"loss_classifier", "loss_box_reg", "loss_mask"}: float32 scalars.
        """
        samples = sample_proposals(
            proposals,
            [t["boxes"] for t in targets],
            [t["labels"] for t in targets],
            box_coder=self.box_coder,
            foreground_iou=self.fg_iou_thresh,
            background_iou=self.bg_iou_thresh,
            batch_size_per_image=self.batch_size_per_image,
            positive_fraction=self.positive_fraction,
        )
        class_logits, box_deltas = self.box_logits(features, samples.proposals, image_sizes)
        loss_classifier, loss_box_reg = box_head_loss(
            class_logits.float(), box_deltas.float(), samples.labels, samples.regression_targets
        )
        boxes, labels, matched = samples.positives()
        logits = self.mask_logits(features, boxes, image_sizes).float()
        crops = [
            mask_targets(target["masks"], image_boxes, image_matched, size=logits.size(-1))
            for target, image_boxes, image_matched in zip(targets, boxes, matched)
        ]
        return {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_mask": mask_loss(logits, labels, crops),
        }

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
            box_coder=self.box_coder,
            score_thresh=self.score_thresh,
            nms_thresh=self.nms_thresh,
            detections_per_img=self.detections_per_img,
        )
        masks = self.mask_probabilities(features, detections.boxes, detections.labels, image_sizes)
        return RoIHeadOutputs(detections.boxes, detections.scores, detections.labels, masks)

    def forward_padded(
        self,
        features: Dict[str, Tensor],
        proposals: Tensor,
        num_proposals: Tensor,
        image_sizes: Tensor,
        spatial_scales: List[float],
    ) -> PaddedRoIHeadOutputs:
        """``forward`` in fixed-size form, with no host sync (traceable with
        dynamic shapes): the same detections, in the same order.

        Args:
            features: FPN levels (the "0".."3" ones are pooled).
            proposals: [N, P, 4], the first ``num_proposals[i]`` rows of
                image i its proposals, in the resized image.
            num_proposals: int64 [N].
            image_sizes: [N, 2] (height, width) of the resized images.
            spatial_scales: the scales of the pooled levels (1/4 .. 1/32).
        """
        n, slots, _ = proposals.shape
        pooled = self.box_roi_pool.pool(features, padded_rois(proposals), spatial_scales)
        class_logits, box_deltas = self.box_predictor(self.box_head(pooled))
        detections = detect_objects_padded(
            class_logits.view(n, slots, -1),
            box_deltas.view(n, slots, -1),
            proposals,
            num_proposals,
            image_sizes,
            box_coder=self.box_coder,
            score_thresh=self.score_thresh,
            nms_thresh=self.nms_thresh,
            detections_per_img=self.detections_per_img,
        )
        logits = self.mask_predictor(
            self.mask_head(self.mask_roi_pool.pool(features, padded_rois(detections.boxes), spatial_scales))
        )
        masks = select_class_masks(logits, detections.labels.reshape(-1))[:, 0]
        filled = torch.arange(self.detections_per_img, device=masks.device) < detections.num_detections[:, None]
        masks = torch.where(filled.reshape(-1, 1, 1), masks, 0)
        return PaddedRoIHeadOutputs(detections, masks.view(n, self.detections_per_img, *masks.shape[-2:]))


__all__ = ["FPN_LEVEL_NAMES", "PaddedRoIHeadOutputs", "RoIHeadOutputs", "RoIHeads", "fpn_roi_pooler", "padded_rois"]
