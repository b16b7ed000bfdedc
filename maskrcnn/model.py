"""Mask R-CNN: transform -> backbone -> RPN -> RoI heads -> boxes and masks
in the original images; and the builders of the ResNet-FPN models."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from torch import Tensor, nn

import maskrcnn_ops

from .backbone import ResNetFPN, resnet_fpn_backbone
from .heads import FastRCNNPredictor, MaskHead, MaskPredictor, TwoMLPHead
from .paste import paste_masks_in_image
from .roi_heads import RoIHeadOutputs, RoIHeads, multi_scale_roi_align
from .rpn import RegionProposalNetwork, RPNHead
from .torchvision_keys import rename_legacy_keys_hook
from .transform import ImageTransform, rescale_boxes


def to_original_images(
    outputs: RoIHeadOutputs, resized_sizes: Sequence[Tuple[int, int]], original_sizes: Sequence[Tuple[int, int]]
) -> List[Dict[str, Tensor]]:
    """Maps the RoI heads' outputs (resized-image coordinates, M x M masks)
    to the original images: per image a dict with ``boxes`` [D, 4] float32,
    ``labels`` [D] int64, ``scores`` [D] float32 and ``masks`` [D, 1, H, W]
    float32 probabilities (torchvision's output format)."""
    results = []
    for boxes, scores, labels, masks, resized, original in zip(*outputs, resized_sizes, original_sizes):
        boxes = rescale_boxes(boxes, resized, original)
        results.append(
            dict(boxes=boxes, labels=labels, scores=scores, masks=paste_masks_in_image(masks, boxes, original))
        )
    return results


class MaskRCNN(nn.Module):
    """Mask R-CNN at inference.

    Args:
        transform: normalizes, resizes and batches the images.
        backbone: images [N, 3, H, W] -> FPN levels "0".."3", "pool".
        rpn: proposals per image.
        roi_heads: detections and mask probabilities per image.

    ``forward(images)`` takes a list of [3, H_i, W_i] float images in [0, 1]
    (RGB) and returns one dict per image as :func:`to_original_images`. It is
    inference only: call ``model.eval()`` first (training losses are not
    part of this model yet). The stages are attributes, so they can be run
    (or timed) one by one as ``forward`` does.

    A model made by :func:`maskrcnn_resnet_fpn` carries ``build_kwargs``, the
    builder's keyword arguments, so that a checkpoint can rebuild it.
    """

    def __init__(
        self, *, transform: ImageTransform, backbone: ResNetFPN, rpn: RegionProposalNetwork, roi_heads: RoIHeads
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.build_kwargs: Dict[str, object] = {}
        # torchvision's published weights use older key names: accept them.
        self.register_load_state_dict_pre_hook(rename_legacy_keys_hook)

    def forward(self, images: List[Tensor]) -> List[Dict[str, Tensor]]:
        if self.training:
            raise RuntimeError(
                "MaskRCNN.forward is inference only (training losses are not implemented): call model.eval() first"
            )
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        batch = self.transform(images)
        features = self.backbone(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        outputs = self.roi_heads(features, proposals, batch.image_sizes)
        return to_original_images(outputs, batch.image_sizes, original_sizes)


def maskrcnn_resnet_fpn(
    *,
    depth: int = 50,
    num_classes: int = 91,
    trainable_layers: int = 3,
    min_size: int = 800,
    max_size: int = 1333,
    rpn_pre_nms_top_n: int = 1000,
    rpn_post_nms_top_n: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_score_thresh: float = 0.0,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    channels_last: bool = False,
) -> MaskRCNN:
    """A ResNet-FPN Mask R-CNN with random weights (torchvision's v1 design:
    anchors 32..512 with ratios 0.5, 1, 2; 7x7 box and 14x14 mask RoIAlign;
    1024-wide box head; four 256-channel mask convolutions).

    Args:
        depth: ResNet depth (18, 34, 50, 101, 152).
        num_classes: classes including the background (91 for COCO ids).
        trainable_layers: ResNet stages left trainable (see resnet_fpn_backbone).
        min_size, max_size: image resizing (see ImageTransform).
        rpn_pre_nms_top_n, rpn_post_nms_top_n, rpn_nms_thresh, rpn_score_thresh:
            proposal generation (see RegionProposalNetwork).
        box_score_thresh, box_nms_thresh, box_detections_per_img: detection
            post-processing (see postprocess.detect_objects).
        channels_last: run the backbone in the channels_last memory format:
            faster, same results up to float rounding (see ResNetFPN).
    """
    build_kwargs = dict(locals())
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    backbone = resnet_fpn_backbone(depth=depth, trainable_layers=trainable_layers, channels_last=channels_last)
    channels = backbone.out_channels
    anchor_generator = maskrcnn_ops.AnchorGenerator()
    rpn = RegionProposalNetwork(
        anchor_generator=anchor_generator,
        head=RPNHead(in_channels=channels, num_anchors=anchor_generator.num_anchors_per_location()[0]),
        pre_nms_top_n=rpn_pre_nms_top_n,
        post_nms_top_n=rpn_post_nms_top_n,
        nms_thresh=rpn_nms_thresh,
        score_thresh=rpn_score_thresh,
    )
    box_pool_size, representation = 7, 1024
    roi_heads = RoIHeads(
        box_roi_pool=multi_scale_roi_align(output_size=box_pool_size),
        box_head=TwoMLPHead(in_features=channels * box_pool_size**2, representation_size=representation),
        box_predictor=FastRCNNPredictor(in_features=representation, num_classes=num_classes),
        mask_roi_pool=multi_scale_roi_align(output_size=14),
        mask_head=MaskHead(in_channels=channels, layers=(256, 256, 256, 256)),
        mask_predictor=MaskPredictor(in_channels=256, dim_reduced=256, num_classes=num_classes),
        score_thresh=box_score_thresh,
        nms_thresh=box_nms_thresh,
        detections_per_img=box_detections_per_img,
    )
    model = MaskRCNN(
        transform=ImageTransform(min_size=min_size, max_size=max_size),
        backbone=backbone,
        rpn=rpn,
        roi_heads=roi_heads,
    )
    model.build_kwargs = build_kwargs
    return model


def maskrcnn_resnet50_fpn(*, num_classes: int = 91, **kwargs) -> MaskRCNN:
    """Mask R-CNN ResNet-50-FPN, torchvision's ``maskrcnn_resnet50_fpn`` (v1):
    the same state-dict keys and shapes, so torchvision's COCO weights load
    with ``strict=True``. Other keyword arguments as :func:`maskrcnn_resnet_fpn`."""
    if "depth" in kwargs:
        raise TypeError("maskrcnn_resnet50_fpn has depth 50; use maskrcnn_resnet_fpn(depth=...) for others")
    return maskrcnn_resnet_fpn(depth=50, num_classes=num_classes, **kwargs)


__all__ = ["MaskRCNN", "maskrcnn_resnet_fpn", "maskrcnn_resnet50_fpn", "to_original_images"]
