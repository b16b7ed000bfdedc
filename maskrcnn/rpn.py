"""Region proposal network: a small convolutional head on every FPN level,
proposal generation (anchors, decode, clip, NMS, top-k) for the whole batch
on maskrcnn_ops, and in training the anchors' targets and losses."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor, nn

import maskrcnn_ops

from .training import RPN_BOX_WEIGHTS, assign_anchor_targets, rpn_loss, sample_anchor_labels
from .preprocess import ImageBatch


class RPNHead(nn.Module):
    """Objectness logits and box deltas for every anchor of every level.

    Args:
        in_channels: channels of the feature maps (the same on every level).
        num_anchors: anchors per location.

    The 3x3 convolution sits in two nested Sequentials only so that its
    state-dict keys are torchvision's (``conv.0.0.weight``).
    """

    def __init__(self, *, in_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Sequential(nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True))
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Args: features: per level [N, C, H_l, W_l].

        Returns: per level objectness [N, A, H_l, W_l] and deltas [N, A * 4, H_l, W_l].
        """
        objectness, deltas = [], []
        for feature in features:
            hidden = self.conv(feature)
            objectness.append(self.cls_logits(hidden))
            deltas.append(self.bbox_pred(hidden))
        return objectness, deltas


class RPNPredictions(NamedTuple):
    """The RPN head's outputs for a batch, flattened to anchor order.

    Attributes:
        objectness: [N, A] logits (A anchors per image, all levels).
        deltas: [N, A, 4] box deltas (dx, dy, dw, dh) of the RPN's box coder.
        anchors: [A, 4] anchors (the same for every image of the padded batch).
        num_anchors_per_level: A split by level.
    """

    objectness: Tensor
    deltas: Tensor
    anchors: Tensor
    num_anchors_per_level: List[int]


class RegionProposalNetwork(nn.Module):
    """Proposals for a batch: torchvision's ``RegionProposalNetwork``, with
    the post-processing of all images and levels batched in
    ``maskrcnn_ops.generate_proposals`` and the training targets and losses
    of ``maskrcnn.training``.

    Args:
        anchor_generator: a ``maskrcnn_ops.AnchorGenerator`` with one size
            tuple per feature level.
        head: the RPNHead.
        pre_nms_top_n: candidates kept per image and level before NMS (eval mode).
        post_nms_top_n: proposals kept per image after NMS (eval mode).
        nms_thresh: IoU threshold of the NMS within each (image, level).
        score_thresh: proposals whose objectness probability is below this are dropped.
        min_size: proposals with a side shorter than this (pixels) are dropped.
        train_pre_nms_top_n, train_post_nms_top_n: the same in training mode
            (paper and torchvision: 2000, 2000).
        fg_iou_thresh, bg_iou_thresh: an anchor with IoU >= fg with a
            ground-truth box is positive, below bg negative, in between
            ignored (0.7, 0.3).
        batch_size_per_image, positive_fraction: anchors sampled per image
            for the losses, at most this fraction positive (256, 0.5).
        box_weights: the (wx, wy, ww, wh) of ``box_coder``, the one coder of
            the deltas: training encodes the anchors' targets with it and
            proposal generation decodes with it (default (1, 1, 1, 1)).
    """

    def __init__(
        self,
        *,
        anchor_generator: maskrcnn_ops.AnchorGenerator,
        head: RPNHead,
        pre_nms_top_n: int = 1000,
        post_nms_top_n: int = 1000,
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
        min_size: float = 1e-3,
        train_pre_nms_top_n: int = 2000,
        train_post_nms_top_n: int = 2000,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        box_weights: Sequence[float] = RPN_BOX_WEIGHTS,
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size
        self.train_pre_nms_top_n = train_pre_nms_top_n
        self.train_post_nms_top_n = train_post_nms_top_n
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.box_coder = maskrcnn_ops.BoxCoder(tuple(box_weights))

    def anchors(self, images: ImageBatch, features: List[Tensor]) -> Tensor:
        """All anchors of the padded batch, [sum_l H_l * W_l * A, 4], float32
        whatever the features' dtype (under autocast they are half precision,
        which cannot hold pixel coordinates of a large image exactly)."""
        padded_h, padded_w = images.tensors.shape[-2:]
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        strides = [(padded_h // h, padded_w // w) for h, w in grid_sizes]
        return self.anchor_generator.grid_anchors(grid_sizes, strides, torch.float32, features[0].device)

    def predict(self, images: ImageBatch, features: Dict[str, Tensor]) -> RPNPredictions:
        """The head on every level, flattened to anchor order, and the anchors."""
        levels = list(features.values())
        objectness, deltas = self.head(levels)
        flat_objectness, flat_deltas, num_anchors_per_level = maskrcnn_ops.flatten_rpn_outputs(objectness, deltas)
        return RPNPredictions(flat_objectness, flat_deltas, self.anchors(images, levels), num_anchors_per_level)

    def proposal_settings(self) -> Dict[str, object]:
        """The keyword arguments of ``maskrcnn_ops.generate_proposals`` (and
        its padded form) for the current mode."""
        pre_nms_top_n, post_nms_top_n = (
            (self.train_pre_nms_top_n, self.train_post_nms_top_n)
            if self.training
            else (self.pre_nms_top_n, self.post_nms_top_n)
        )
        return dict(
            pre_nms_top_n=pre_nms_top_n,
            post_nms_top_n=post_nms_top_n,
            nms_thresh=self.nms_thresh,
            score_thresh=self.score_thresh,
            min_size=self.min_size,
            weights=self.box_coder.weights,
            clip=self.box_coder.clip,
        )

    def proposals(self, images: ImageBatch, predictions: RPNPredictions) -> Tuple[List[Tensor], List[Tensor]]:
        """Proposals and their objectness probabilities per image (see
        ``forward``), with the top-n of the current mode. No gradient flows
        into the boxes (the RoI heads take them as given, as in the paper)."""
        return maskrcnn_ops.generate_proposals(
            predictions.objectness.detach().float(),
            predictions.deltas.detach().float(),
            predictions.anchors,
            predictions.num_anchors_per_level,
            images.image_sizes,
            **self.proposal_settings(),
        )

    def forward_padded(self, images: ImageBatch, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """``forward`` in fixed-size form, with no host sync (traceable with
        dynamic shapes); ``images.image_sizes`` is an int64 tensor [N, 2].

        Returns:
            proposals [N, P, 4], their probabilities [N, P] (zeros past the
            count) and counts int64 [N], P = post_nms_top_n of the mode.
        """
        predictions = self.predict(images, features)
        return maskrcnn_ops.generate_proposals_padded(
            predictions.objectness.detach().float(),
            predictions.deltas.detach().float(),
            predictions.anchors,
            predictions.num_anchors_per_level,
            images.image_sizes,
            **self.proposal_settings(),
        )

    def losses(self, predictions: RPNPredictions, gt_boxes: Sequence[Tensor]) -> Dict[str, Tensor]:
        """The RPN's training losses: anchors matched to the ground truth
        (``fg_iou_thresh`` / ``bg_iou_thresh``), a balanced sample of them
        (from the global RNG, as torchvision), objectness and box losses.

        Args:
            predictions: from ``predict``.
            gt_boxes: per image [K_i, 4] ground-truth boxes in the resized
                image (K_i may be 0).

        Returns:
            {"loss_objectness", "loss_rpn_box_reg"}: float32 scalars.
        """
        num_images = predictions.objectness.size(0)
        labels, regression_targets = assign_anchor_targets(
            [predictions.anchors] * num_images,
            gt_boxes,
            box_coder=self.box_coder,
            high_threshold=self.fg_iou_thresh,
            low_threshold=self.bg_iou_thresh,
        )
        sampled = sample_anchor_labels(
            labels, batch_size_per_image=self.batch_size_per_image, positive_fraction=self.positive_fraction
        )
        loss_objectness, loss_box = rpn_loss(
            predictions.objectness.float().flatten(),
            predictions.deltas.float().reshape(-1, 4),
            sampled,
            regression_targets,
        )
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}

    def forward(self, images: ImageBatch, features: Dict[str, Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Args:
            images: the padded batch (only its shape and image sizes are read).
            features: FPN levels in order, each [N, C, H_l, W_l].

        Returns:
            per image, proposals [K_i, 4] (x1, y1, x2, y2) in the resized
            image, and their objectness probabilities [K_i], best first;
            K_i <= post_nms_top_n (train_post_nms_top_n in training mode).
        """
        return self.proposals(images, self.predict(images, features))


__all__ = ["RPNHead", "RPNPredictions", "RegionProposalNetwork"]
