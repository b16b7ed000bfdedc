"""The second stage: multi-level RoIAlign on the proposals, box head,
post-processing into detections, then RoIAlign on the detections and the
mask head and/or keypoint head; in training, sampled proposals and the box,
mask and keypoint losses."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import maskrcnn_ops

from .heads import FastRCNNPredictor, MaskHead, MaskPredictor, TwoMLPHead
from .keypoint_head import KeypointHead, KeypointPredictor, decode_keypoints
from .postprocess import PaddedDetections, detect_objects, detect_objects_padded, select_class_masks
from .training import ROI_BOX_WEIGHTS, box_head_loss, keypoint_loss, mask_loss, mask_targets, sample_proposals

FPN_LEVEL_NAMES = ("0", "1", "2", "3")


def fpn_roi_pooler(*, output_size: int, sampling_ratio: int = 2) -> maskrcnn_ops.MultiScaleRoIAlign:
    """A RoIAlign module over the FPN levels "0".."3", each box pooled from
    the level that matches its size (one fused maskrcnn_ops kernel)."""
    return maskrcnn_ops.MultiScaleRoIAlign(
        featmap_names=list(FPN_LEVEL_NAMES), output_size=output_size, sampling_ratio=sampling_ratio
    )


class RoIHeadOutputs(NamedTuple):
    """Per image, in the resized image's coordinates: boxes [D_i, 4],
    scores [D_i], labels [D_i] int64, masks [D_i, 1, M, M] (probabilities
    of the detected class, M = 28 for the standard head; None without a
    mask branch), keypoints [D_i, K, 3] float32 (x, y, 1) and
    keypoint_scores [D_i, K] (heatmap logits; both None without a keypoint
    branch)."""

    boxes: List[Tensor]
    scores: List[Tensor]
    labels: List[Tensor]
    masks: Optional[List[Tensor]]
    keypoints: Optional[List[Tensor]] = None
    keypoint_scores: Optional[List[Tensor]] = None


class PaddedRoIHeadOutputs(NamedTuple):
    """The RoI heads' outputs for a batch in fixed-size form (D =
    ``detections_per_img``): ``detections`` (PaddedDetections, resized-image
    coordinates), ``masks`` [N, D, M, M], the probabilities of each
    detection's class, ``keypoints`` [N, D, K, 3] and ``keypoint_scores``
    [N, D, K] (all zeros past ``num_detections``; None for a branch the
    model does not have)."""

    detections: PaddedDetections
    masks: Optional[Tensor]
    keypoints: Optional[Tensor] = None
    keypoint_scores: Optional[Tensor] = None

    def unpad(self) -> RoIHeadOutputs:
        """The per-image form of ``RoIHeads.forward`` (reads the counts: a
        host sync, or unbacked sizes in a traced graph)."""
        d = self.detections
        limit = d.boxes.size(1)
        boxes, scores, labels = [], [], []
        masks = None if self.masks is None else []
        keypoints = None if self.keypoints is None else []
        keypoint_scores = None if self.keypoint_scores is None else []
        for i, count in enumerate(d.num_detections.tolist()):
            torch._check(count >= 0)
            torch._check(count <= limit)
            boxes.append(d.boxes[i, :count])
            scores.append(d.scores[i, :count])
            labels.append(d.labels[i, :count])
            if masks is not None:
                masks.append(self.masks[i, :count, None])
            if keypoints is not None:
                keypoints.append(self.keypoints[i, :count])
                keypoint_scores.append(self.keypoint_scores[i, :count])
        return RoIHeadOutputs(boxes, scores, labels, masks, keypoints, keypoint_scores)


def padded_rois(boxes: Tensor) -> Tensor:
    """Boxes [N, B, 4] per image -> rois [N * B, 5] (image index, x1, y1, x2, y2)."""
    n, per_image, _ = boxes.shape
    index = torch.arange(n, device=boxes.device, dtype=boxes.dtype).repeat_interleave(per_image)
    return torch.cat([index[:, None], boxes.reshape(n * per_image, 4)], dim=1)


class RoIHeads(nn.Module):
    """Box branch and mask and/or keypoint branches of Mask R-CNN and
    Keypoint R-CNN.

    Args:
        box_roi_pool, mask_roi_pool: multi-level RoIAlign modules (7x7 and 14x14).
        box_head, box_predictor: features -> class logits and box deltas.
        mask_head, mask_predictor: features -> per-class mask logits
            (the three None, the default: no mask branch).
        keypoint_roi_pool, keypoint_head, keypoint_predictor: RoIAlign
            (14x14), features -> keypoint heatmap logits [R, K, 56, 56]
            (the three None, the default: no keypoint branch).
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
        mask_roi_pool: Optional[maskrcnn_ops.MultiScaleRoIAlign] = None,
        mask_head: Optional[MaskHead] = None,
        mask_predictor: Optional[MaskPredictor] = None,
        keypoint_roi_pool: Optional[maskrcnn_ops.MultiScaleRoIAlign] = None,
        keypoint_head: Optional[KeypointHead] = None,
        keypoint_predictor: Optional[KeypointPredictor] = None,
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
        for branch, modules in (("mask", (mask_roi_pool, mask_head, mask_predictor)),
                                ("keypoint", (keypoint_roi_pool, keypoint_head, keypoint_predictor))):
            if any(m is None for m in modules) and any(m is not None for m in modules):
                raise ValueError(f"give all three {branch} modules (roi_pool, head, predictor) or none")
        self.keypoint_roi_pool = keypoint_roi_pool
        self.keypoint_head = keypoint_head
        self.keypoint_predictor = keypoint_predictor
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

    @property
    def has_masks(self) -> bool:
        return self.mask_predictor is not None

    @property
    def has_keypoints(self) -> bool:
        return self.keypoint_predictor is not None

    def keypoint_logits(
        self, features: Dict[str, Tensor], boxes: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> Tensor:
        """Keypoint heatmap logits [D, K, S, S] of the D = sum_i D_i boxes."""
        return self.keypoint_predictor(self.keypoint_head(self.keypoint_roi_pool(features, boxes, image_sizes)))

    def keypoints(
        self, features: Dict[str, Tensor], boxes: List[Tensor], image_sizes: List[Tuple[int, int]]
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """Per image keypoints [D_i, K, 3] and their scores [D_i, K] (see
        ``keypoint_head.decode_keypoints``), in the boxes' coordinates."""
        counts = [b.size(0) for b in boxes]
        keypoints, scores = decode_keypoints(self.keypoint_logits(features, boxes, image_sizes), torch.cat(boxes))
        return list(keypoints.split(counts)), list(scores.split(counts))

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
        """The training losses of the box, mask and keypoint branches.

        The ground-truth boxes join the proposals, a balanced sample is
        drawn (global RNG, as torchvision), the box branch runs on it, the
        mask branch on its foreground samples against the ground-truth
        masks cropped to them (RoIAlign), and the keypoint branch on the
        same foreground samples against their instances' keypoints.

        Args:
            features: FPN levels.
            proposals: per image [K_i, 4] (no gradient), resized-image coordinates.
            image_sizes: per image (height, width) of the resized image.
            targets: per image ``boxes`` [G_i, 4], ``labels`` [G_i],
                ``masks`` [G_i, H_i, W_i] at the resized image's size (mask
                branch) and ``keypoints`` [G_i, K, 3] (keypoint branch).

        Returns:
            {"loss_classifier", "loss_box_reg"} and "loss_mask" and/or
            "loss_keypoint" (the branches the heads have): float32 scalars.
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
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
        boxes, labels, matched = samples.positives()
        if self.has_masks:
            logits = self.mask_logits(features, boxes, image_sizes).float()
            crops = [
                mask_targets(target["masks"], image_boxes, image_matched, size=logits.size(-1))
                for target, image_boxes, image_matched in zip(targets, boxes, matched)
            ]
            losses["loss_mask"] = mask_loss(logits, labels, crops)
        if self.has_keypoints:
            logits = self.keypoint_logits(features, boxes, image_sizes).float()
            losses["loss_keypoint"] = keypoint_loss(logits, boxes, [t["keypoints"] for t in targets], matched)
        return losses

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
        masks, keypoints, keypoint_scores = None, None, None
        if self.has_masks:
            masks = self.mask_probabilities(features, detections.boxes, detections.labels, image_sizes)
        if self.has_keypoints:
            keypoints, keypoint_scores = self.keypoints(features, detections.boxes, image_sizes)
        return RoIHeadOutputs(detections.boxes, detections.scores, detections.labels, masks, keypoints,
                              keypoint_scores)

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
        rois = padded_rois(detections.boxes)
        filled = torch.arange(self.detections_per_img, device=rois.device) < detections.num_detections[:, None]
        filled = filled.reshape(-1, 1, 1)  # [N * D, 1, 1]
        per_image = (n, self.detections_per_img)
        masks, keypoints, keypoint_scores = None, None, None
        if self.has_masks:
            logits = self.mask_predictor(self.mask_head(self.mask_roi_pool.pool(features, rois, spatial_scales)))
            masks = select_class_masks(logits, detections.labels.reshape(-1))[:, 0]
            masks = torch.where(filled, masks, 0).view(*per_image, *masks.shape[-2:])
        if self.has_keypoints:
            heatmaps = self.keypoint_predictor(
                self.keypoint_head(self.keypoint_roi_pool.pool(features, rois, spatial_scales))
            )
            keypoints, keypoint_scores = decode_keypoints(heatmaps, rois[:, 1:])
            keypoints = torch.where(filled, keypoints, 0).view(*per_image, *keypoints.shape[-2:])
            keypoint_scores = torch.where(filled[..., 0], keypoint_scores, 0).view(*per_image, -1)
        return PaddedRoIHeadOutputs(detections, masks, keypoints, keypoint_scores)


__all__ = ["FPN_LEVEL_NAMES", "PaddedRoIHeadOutputs", "RoIHeadOutputs", "RoIHeads", "fpn_roi_pooler", "padded_rois"]
