"""Region proposal network: a small convolutional head on every FPN level,
and proposal generation (anchors, decode, clip, NMS, top-k) for the whole
batch on maskrcnn_ops."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

import maskrcnn_ops

from .transform import ImageBatch


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


class RegionProposalNetwork(nn.Module):
    """Proposals for a batch: torchvision's ``RegionProposalNetwork`` at
    inference, with the post-processing of all images and levels batched in
    ``maskrcnn_ops.generate_proposals``.

    Args:
        anchor_generator: a ``maskrcnn_ops.AnchorGenerator`` with one size
            tuple per feature level.
        head: the RPNHead.
        pre_nms_top_n: candidates kept per image and level before NMS.
        post_nms_top_n: proposals kept per image after NMS.
        nms_thresh: IoU threshold of the NMS within each (image, level).
        score_thresh: proposals whose objectness probability is below this are dropped.
        min_size: proposals with a side shorter than this (pixels) are dropped.
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
    ) -> None:
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.pre_nms_top_n = pre_nms_top_n
        self.post_nms_top_n = post_nms_top_n
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size

    def anchors(self, images: ImageBatch, features: List[Tensor]) -> Tensor:
        """All anchors of the padded batch, [sum_l H_l * W_l * A, 4], float32
        whatever the features' dtype (under autocast they are half precision,
        which cannot hold pixel coordinates of a large image exactly)."""
        padded_h, padded_w = images.tensors.shape[-2:]
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        strides = [(padded_h // h, padded_w // w) for h, w in grid_sizes]
        return self.anchor_generator.grid_anchors(grid_sizes, strides, torch.float32, features[0].device)

    def forward(self, images: ImageBatch, features: Dict[str, Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Args:
            images: the padded batch (only its shape and image sizes are read).
            features: FPN levels in order, each [N, C, H_l, W_l].

        Returns:
            per image, proposals [K_i, 4] (x1, y1, x2, y2) in the resized
            image, and their objectness probabilities [K_i], best first;
            K_i <= post_nms_top_n.
        """
        levels = list(features.values())
        objectness, deltas = self.head(levels)
        flat_objectness, flat_deltas, num_anchors_per_level = maskrcnn_ops.flatten_rpn_outputs(objectness, deltas)
        return maskrcnn_ops.generate_proposals(
            flat_objectness.float(),
            flat_deltas.float(),
            self.anchors(images, levels),
            num_anchors_per_level,
            images.image_sizes,
            pre_nms_top_n=self.pre_nms_top_n,
            post_nms_top_n=self.post_nms_top_n,
            nms_thresh=self.nms_thresh,
            score_thresh=self.score_thresh,
            min_size=self.min_size,
        )


__all__ = ["RPNHead", "RegionProposalNetwork"]
