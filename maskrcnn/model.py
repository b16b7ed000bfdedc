"""Mask R-CNN: transform -> backbone -> RPN -> RoI heads -> boxes and masks
(and/or keypoints: Keypoint R-CNN) in the original images, or in training
mode the losses; and the builders of the ResNet-FPN models."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import maskrcnn_ops

from .backbone import LEVEL_STRIDES, NORM_LAYERS, ResNetFPN, resnet_fpn_backbone
from .data.validation import validate_target
from .heads import FastRCNNPredictor, MaskHead, MaskPredictor, TwoMLPHead
from .keypoint_head import KEYPOINT_HEAD_LAYERS, KeypointHead, KeypointPredictor
from .paste import paste_masks_in_image
from .preprocess import ImageBatch, ImageTransform, rescale_boxes, rescale_keypoints
from .presets import SMALL, SMALL_KEYPOINT_HEAD_LAYERS, ModelPreset
from .roi_heads import FPN_LEVEL_NAMES, PaddedRoIHeadOutputs, RoIHeadOutputs, RoIHeads, fpn_roi_pooler
from .rpn import RegionProposalNetwork, RPNHead
from .torchvision_keys import rename_legacy_keys_hook


def to_original_images(
    outputs: RoIHeadOutputs, resized_sizes: Sequence[Tuple[int, int]], original_sizes: Sequence[Tuple[int, int]],
    *, paste_masks: bool = True,
) -> List[Dict[str, Tensor]]:
    """Maps the RoI heads' outputs (resized-image coordinates, M x M masks)
    to the original images: per image a dict with ``boxes`` [D, 4] float32,
    ``labels`` [D] int64, ``scores`` [D] float32 and ``masks`` [D, 1, H, W]
    float32 probabilities (torchvision's output format). With
    ``paste_masks=False``, ``box_masks`` [D, 1, M, M] (each box's mask
    probabilities in its own frame) instead of ``masks``: what
    ``maskrcnn_ops.masks_to_rle`` encodes without full-size masks, and
    ``paste_masks_in_image`` pastes. A model without a mask branch has
    neither; one with a keypoint branch adds ``keypoints`` [D, K, 3]
    float32 (x, y, 1) and ``keypoints_scores`` [D, K] float32 (torchvision's
    Keypoint R-CNN outputs)."""
    results = []
    for i, (resized, original) in enumerate(zip(resized_sizes, original_sizes)):
        boxes = rescale_boxes(outputs.boxes[i], resized, original)
        result = dict(boxes=boxes, labels=outputs.labels[i], scores=outputs.scores[i])
        if outputs.masks is not None and paste_masks:
            result["masks"] = paste_masks_in_image(outputs.masks[i], boxes, original)
        elif outputs.masks is not None:
            result["box_masks"] = outputs.masks[i]
        if outputs.keypoints is not None:
            result["keypoints"] = rescale_keypoints(outputs.keypoints[i], resized, original)
            result["keypoints_scores"] = outputs.keypoint_scores[i]
        results.append(result)
    return results


@contextmanager
def box_masks_kept(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s eval outputs keep the M x M masks
    (``box_masks``, see :func:`to_original_images`) instead of pasting them.
    A model without the switch (e.g. torchvision's) is left as it is: its
    outputs keep ``masks``, which the evaluation and the COCO JSON also take."""
    if not hasattr(model, "paste_masks"):
        yield
        return
    previous, model.paste_masks = model.paste_masks, False
    try:
        yield
    finally:
        model.paste_masks = previous


# Mask R-CNN's losses in torchvision's order; a Keypoint R-CNN's have
# KEYPOINT_LOSS_NAME after "loss_mask" (or in its place without masks).
LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
KEYPOINT_LOSS_NAME = "loss_keypoint"


def prepare_targets(
    images: Sequence[Tensor], targets: Sequence[Dict[str, Tensor]], *, num_classes: int, masks: bool = True,
    num_keypoints: Optional[int] = None,
) -> List[Dict[str, Tensor]]:
    """Checks the training targets (``maskrcnn.data.validate_target``: boxes
    [K, 4] with positive width and height, labels in [1, num_classes), masks
    [K, H, W] at the image's size when ``masks``, keypoints [K,
    num_keypoints, 3] when ``num_keypoints``) and moves their tensors to
    the images' device. Raises ValueError naming the target and its
    ``image_id``."""
    if isinstance(targets, dict) or len(targets) != len(images):
        given = "a dict" if isinstance(targets, dict) else f"{len(targets)} targets"
        raise ValueError(f"expected a list of one target dict per image ({len(images)} images), got {given}")
    prepared = []
    for index, (image, target) in enumerate(zip(images, targets)):
        try:
            validate_target(target, image_size=tuple(image.shape[-2:]), num_classes=num_classes, require_masks=masks,
                            num_keypoints=num_keypoints)
        except ValueError as error:
            raise ValueError(f"targets[{index}] (image_id {target.get('image_id', 'unknown')}): {error}") from None
        prepared.append({k: v.to(image.device) if isinstance(v, Tensor) else v for k, v in target.items()})
    return prepared


class MaskRCNN(nn.Module):
    """Mask R-CNN.

    Args:
        transform: normalizes, resizes and batches the images.
        backbone: images [N, 3, H, W] -> FPN levels "0".."3", "pool".
        rpn: proposals per image.
        roi_heads: detections and mask probabilities per image.

    ``forward(images)`` in eval mode takes a list of [3, H, W] float images
    in [0, 1] (RGB) and returns one dict per image as
    :func:`to_original_images`. In training mode ``forward(images, targets)``
    (one dict per image: ``boxes`` [K, 4] float (x1, y1, x2, y2) in the
    image's pixels, ``labels`` [K] int64 in [1, num_classes), ``masks``
    [K, H, W] uint8 or bool, and for a model with keypoints ``keypoints``
    [K, num_keypoints, 3] float (x, y, visibility; 0: not labeled); K may be
    0) returns the losses, a dict with torchvision's keys (``loss_names``)
    of float32 scalars to sum and backpropagate. The stages are
    attributes, so they can be run (or timed) one by one as ``forward`` does. Setting ``paste_masks`` to False makes
    the eval outputs keep the M x M masks (``box_masks``, see
    :func:`to_original_images`) instead of pasting them into the images.

    A model made by :func:`maskrcnn_resnet_fpn` carries ``build_kwargs``, the
    builder's keyword arguments, so that a checkpoint can rebuild it, and
    ``class_names`` (a name per label, background first; empty when
    unknown), which checkpoints keep and training sets from its dataset,
    and likewise ``keypoint_skeleton`` (pairs of 1-based keypoint indices,
    COCO's ``skeleton``, to draw keypoints; empty when unknown).
    ``architecture`` names the builder family (see :func:`model_builder`).
    """

    architecture = "fpn"

    def __init__(
        self, *, transform: ImageTransform, backbone: ResNetFPN, rpn: RegionProposalNetwork, roi_heads: RoIHeads
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.build_kwargs: Dict[str, object] = {}
        self.class_names: List[str] = []
        self.keypoint_skeleton: List[Tuple[int, int]] = []
        self.paste_masks = True
        # torchvision's published weights use older key names: accept them.
        self.register_load_state_dict_pre_hook(rename_legacy_keys_hook)

    @property
    def num_classes(self) -> int:
        """Classes including the background."""
        return self.roi_heads.box_predictor.cls_score.out_features

    @property
    def num_keypoints(self) -> int:
        """Keypoints per instance; 0 without a keypoint branch."""
        return self.roi_heads.keypoint_predictor.num_keypoints if self.roi_heads.has_keypoints else 0

    @property
    def loss_names(self) -> Tuple[str, ...]:
        """The keys of the training losses, in their order (torchvision's)."""
        heads = ("loss_mask",) if self.roi_heads.has_masks else ()
        heads += (KEYPOINT_LOSS_NAME,) if self.roi_heads.has_keypoints else ()
        return LOSS_NAMES[:2] + heads + LOSS_NAMES[3:]

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        """Eval mode: detections per image (``targets`` is not read).
        Training mode: the loss dict (see the class docstring)."""
        if self.training:
            if targets is None:
                raise ValueError(
                    "in training mode the model computes losses and needs targets: model(images, targets); "
                    "call model.eval() for detections"
                )
            return self.losses(images, targets)
        original_sizes = [(image.shape[-2], image.shape[-1]) for image in images]
        batch = self.transform(images)
        if torch.compiler.is_compiling():
            # Traced: the fixed-size path, whose only data-dependent sizes
            # are the detection counts of the per-image outputs (which need
            # torch._dynamo.config.capture_scalar_outputs).
            sizes = torch.tensor(batch.image_sizes, dtype=torch.int64, device=batch.tensors.device)
            outputs = self.detect_batch_padded(ImageBatch(batch.tensors, sizes)).unpad()
        else:
            features = self.backbone(batch.tensors)
            proposals, _ = self.rpn(batch, features)
            outputs = self.roi_heads(features, proposals, batch.image_sizes)
        return to_original_images(outputs, batch.image_sizes, original_sizes, paste_masks=self.paste_masks)

    def detect_padded(self, images: Tensor, image_sizes: Tensor) -> PaddedRoIHeadOutputs:
        """The eval-mode detector on a padded batch, in fixed-size form and
        with no host sync, so that it traces into one graph with dynamic
        shapes (``maskrcnn.export``). The same detections as ``forward`` on
        the images it was given, before mapping to their original size.

        Args:
            images: [N, 3, H, W] float RGB in [0, 1], already resized as
                ``self.transform`` resizes (``resized_size``), each in the
                top-left corner; what lies outside its size is ignored.
            image_sizes: int64 [N, 2], (height, width) of each image.

        Returns:
            PaddedRoIHeadOutputs (D = ``roi_heads.detections_per_img``),
            boxes in the images' pixels.
        """
        return self.detect_batch_padded(ImageBatch(self.transform.normalize_and_pad(images, image_sizes), image_sizes))

    def detect_batch_padded(self, batch: ImageBatch) -> PaddedRoIHeadOutputs:
        """``detect_padded`` on a batch the transform made; its
        ``image_sizes`` an int64 tensor [N, 2]."""
        features = self.backbone(batch.tensors)
        proposals, _, num_proposals = self.rpn.forward_padded(batch, features)
        return self.roi_heads.forward_padded(features, proposals, num_proposals, batch.image_sizes, self.pooled_scales())

    def pooled_scales(self) -> List[float]:
        """The spatial scales of the feature maps the RoI heads pool, which
        a traced graph cannot infer from its symbolic image sizes: FPN levels
        "0".."3", 1/4 to 1/32."""
        return [1.0 / LEVEL_STRIDES[name] for name in FPN_LEVEL_NAMES]

    def losses(self, images: List[Tensor], targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """The training losses of a batch (what ``forward`` returns in
        training mode; the RPN's top-n and the normalization layers follow
        the module's mode). Random draws, from the global RNG in
        torchvision's order: one per image for the training scale, then
        the RPN's anchor sample, then the RoI heads' proposal sample."""
        targets = prepare_targets(images, targets, num_classes=self.num_classes, masks=self.roi_heads.has_masks,
                                  num_keypoints=self.num_keypoints or None)
        batch, targets = self.transform.with_targets(images, targets)
        features = self.backbone(batch.tensors)
        predictions = self.rpn.predict(batch, features)
        proposals, _ = self.rpn.proposals(batch, predictions)
        rpn_losses = self.rpn.losses(predictions, [t["boxes"] for t in targets])
        losses = self.roi_heads.losses(features, proposals, batch.image_sizes, targets)
        losses.update(rpn_losses)
        return losses


def _mask_branch(fpn_channels: int, layers: Sequence[int], num_classes: int) -> Dict[str, nn.Module]:
    """RoIHeads' mask modules: 14x14 RoIAlign, 3x3 convolutions, 28x28 logits."""
    return dict(
        mask_roi_pool=fpn_roi_pooler(output_size=14),
        mask_head=MaskHead(in_channels=fpn_channels, layers=tuple(layers)),
        mask_predictor=MaskPredictor(in_channels=layers[-1], dim_reduced=layers[-1], num_classes=num_classes),
    )


def _keypoint_branch(fpn_channels: int, layers: Sequence[int], num_keypoints: int) -> Dict[str, nn.Module]:
    """RoIHeads' keypoint modules: 14x14 RoIAlign, 3x3 convolutions, 56x56 heatmaps."""
    return dict(
        keypoint_roi_pool=fpn_roi_pooler(output_size=14),
        keypoint_head=KeypointHead(in_channels=fpn_channels, layers=tuple(layers)),
        keypoint_predictor=KeypointPredictor(in_channels=layers[-1], num_keypoints=num_keypoints),
    )


def check_model_settings(*, num_classes: int, norm: str) -> None:
    """ValueError unless ``num_classes`` >= 2 (background included) and
    ``norm`` is a key of ``NORM_LAYERS``."""
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes}")
    if norm not in NORM_LAYERS:
        raise ValueError(f"norm must be one of {sorted(NORM_LAYERS)}, got {norm!r}")


def region_proposal_network(
    *,
    in_channels: int,
    anchor_sizes: Sequence[Sequence[int]],
    aspect_ratios: Sequence[float],
    pre_nms_top_n: int,
    post_nms_top_n: int,
    train_pre_nms_top_n: int,
    train_post_nms_top_n: int,
    nms_thresh: float,
    score_thresh: float,
    batch_size_per_image: int,
    positive_fraction: float,
) -> RegionProposalNetwork:
    """The RPN of the builders: per feature level a tuple of anchor sizes
    (one per FPN level, or all five on the single C4 map), the same aspect
    ratios on every level, and the head on ``in_channels`` channels."""
    anchor_generator = maskrcnn_ops.AnchorGenerator(
        sizes=tuple(tuple(sizes) for sizes in anchor_sizes), aspect_ratios=(tuple(aspect_ratios),) * len(anchor_sizes)
    )
    return RegionProposalNetwork(
        anchor_generator=anchor_generator,
        head=RPNHead(in_channels=in_channels, num_anchors=anchor_generator.num_anchors_per_location()[0]),
        pre_nms_top_n=pre_nms_top_n,
        post_nms_top_n=post_nms_top_n,
        nms_thresh=nms_thresh,
        score_thresh=score_thresh,
        train_pre_nms_top_n=train_pre_nms_top_n,
        train_post_nms_top_n=train_post_nms_top_n,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
    )


def rpn_settings(build_kwargs: Dict[str, object]) -> Dict[str, object]:
    """A builder's ``rpn_*`` arguments, named as ``region_proposal_network``'s
    (the prefix dropped: ``rpn_nms_thresh`` -> ``nms_thresh``)."""
    return {name[len("rpn_"):]: value for name, value in build_kwargs.items() if name.startswith("rpn_")}


def maskrcnn_resnet_fpn(
    *,
    depth: int = 50,
    num_classes: int = 91,
    trainable_layers: int = 3,
    norm: str = "frozen",
    min_size: int = 800,
    max_size: int = 1333,
    train_min_sizes: Optional[Sequence[int]] = None,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n: int = 1000,
    rpn_post_nms_top_n: int = 1000,
    rpn_train_pre_nms_top_n: int = 2000,
    rpn_train_post_nms_top_n: int = 2000,
    rpn_nms_thresh: float = 0.7,
    rpn_score_thresh: float = 0.0,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    box_representation_size: int = 1024,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    mask_head_layers: Sequence[int] = (256, 256, 256, 256),
    with_masks: bool = True,
    num_keypoints: int = 0,
    keypoint_head_layers: Sequence[int] = KEYPOINT_HEAD_LAYERS,
    channels_last: bool = False,
) -> MaskRCNN:
    """A ResNet-FPN Mask R-CNN with random weights. The defaults are
    torchvision's v1 design (anchors 32..512, one size per FPN level, with
    ratios 0.5, 1, 2; 7x7 box and 14x14 mask RoIAlign; 1024-wide box head;
    four 256-channel mask convolutions; the paper's training samples).

    Args:
        depth: ResNet depth (18, 34, 50, 101, 152).
        num_classes: classes including the background (91 for COCO ids).
        trainable_layers: ResNet stages left trainable (see resnet_fpn_backbone).
        norm: the ResNet's normalization, a key of ``NORM_LAYERS``: "frozen"
            (torchvision's COCO model, for fine-tuning), "batch" or "group"
            (training from scratch).
        min_size, max_size: image resizing (see ImageTransform).
        train_min_sizes: short sides drawn from in training (see ImageTransform).
        fpn_channels: channels of every FPN level (and so of the heads' input).
        anchor_sizes: one anchor size (pixels) per FPN level, P2 to P6.
        aspect_ratios: anchor height/width ratios, the same on every level.
        rpn_pre_nms_top_n, rpn_post_nms_top_n, rpn_nms_thresh, rpn_score_thresh:
            proposal generation at inference (see RegionProposalNetwork).
        rpn_train_pre_nms_top_n, rpn_train_post_nms_top_n: the same in training.
        rpn_batch_size_per_image, rpn_positive_fraction: anchors sampled per
            image for the RPN's losses.
        box_representation_size: width of the box head's two layers.
        box_batch_size_per_image, box_positive_fraction: proposals sampled
            per image for the box and mask losses.
        box_score_thresh, box_nms_thresh, box_detections_per_img: detection
            post-processing (see postprocess.detect_objects).
        mask_head_layers: output channels of the mask head's convolutions
            (the predictor's transposed convolution keeps the last width).
        with_masks: whether the model has the mask branch (False with
            keypoints: torchvision's Keypoint R-CNN).
        num_keypoints: K > 0 adds Keypoint R-CNN's keypoint branch (14x14
            RoIAlign, ``keypoint_head_layers`` 3x3 convolutions, 56x56
            heatmaps), K keypoints per instance; 0: none.
        keypoint_head_layers: output channels of the keypoint head's
            convolutions (torchvision's: eight of 512).
        channels_last: run the backbone in the channels_last memory format:
            faster, same results up to float rounding (see ResNetFPN).
    """
    build_kwargs = dict(locals())
    check_model_settings(num_classes=num_classes, norm=norm)
    if len(anchor_sizes) != 5:
        raise ValueError(f"anchor_sizes needs one size per FPN level (P2..P6, 5 levels), got {tuple(anchor_sizes)}")
    if len(mask_head_layers) == 0:
        raise ValueError("mask_head_layers needs at least one convolution")
    if num_keypoints < 0 or (not with_masks and num_keypoints == 0):
        raise ValueError(f"need a mask branch or num_keypoints >= 1, got with_masks={with_masks}, "
                         f"num_keypoints={num_keypoints}")
    backbone = resnet_fpn_backbone(depth=depth, trainable_layers=trainable_layers, out_channels=fpn_channels,
                                   norm_layer=NORM_LAYERS[norm], channels_last=channels_last)
    rpn = region_proposal_network(in_channels=fpn_channels, anchor_sizes=[(size,) for size in anchor_sizes],
                                  aspect_ratios=aspect_ratios, **rpn_settings(build_kwargs))
    box_pool_size = 7
    roi_heads = RoIHeads(
        box_roi_pool=fpn_roi_pooler(output_size=box_pool_size),
        box_head=TwoMLPHead(in_features=fpn_channels * box_pool_size**2, representation_size=box_representation_size),
        box_predictor=FastRCNNPredictor(in_features=box_representation_size, num_classes=num_classes),
        **(_mask_branch(fpn_channels, mask_head_layers, num_classes) if with_masks else {}),
        **(_keypoint_branch(fpn_channels, keypoint_head_layers, num_keypoints) if num_keypoints else {}),
        score_thresh=box_score_thresh,
        nms_thresh=box_nms_thresh,
        detections_per_img=box_detections_per_img,
        batch_size_per_image=box_batch_size_per_image,
        positive_fraction=box_positive_fraction,
    )
    model = MaskRCNN(
        transform=ImageTransform(min_size=min_size, max_size=max_size, train_min_sizes=train_min_sizes),
        backbone=backbone,
        rpn=rpn,
        roi_heads=roi_heads,
    )
    model.build_kwargs = build_kwargs
    return model


def model_builder(architecture: str) -> Callable[..., MaskRCNN]:
    """The builder of an architecture family: "fpn" ``maskrcnn_resnet_fpn``,
    "c4" ``maskrcnn.c4.maskrcnn_resnet_c4`` (what a checkpoint's
    ``architecture`` and a preset's name)."""
    if architecture == "fpn":
        return maskrcnn_resnet_fpn
    if architecture == "c4":
        from .c4 import maskrcnn_resnet_c4  # c4 builds on this module's MaskRCNN

        return maskrcnn_resnet_c4
    raise ValueError(f"unknown architecture {architecture!r}; the architectures are ['c4', 'fpn']")


def maskrcnn_from_preset(
    preset: ModelPreset, *, num_classes: int, image_size: Optional[int] = None, **overrides
) -> MaskRCNN:
    """A model of a named design (``maskrcnn.presets``), with random weights.

    Args:
        preset: e.g. ``presets.SMALL``, ``presets.RESNET50`` or ``presets.C4``.
        num_classes: classes including the background.
        image_size: the images' side (short side resized to it, long side
            at most it); None: the preset's.
        overrides: other arguments of the preset's builder
            (``model_builder(preset.architecture)``), replacing the preset's.
    """
    builder = model_builder(preset.architecture)
    return builder(**{**preset.build_kwargs(num_classes=num_classes, image_size=image_size), **overrides})


def maskrcnn_small(*, num_classes: int, image_size: int = SMALL.image_size, **overrides) -> MaskRCNN:
    """The ``presets.SMALL`` design (the demo's model): a ResNet-18-FPN
    Mask R-CNN that trains from scratch on a CPU in minutes.

    Args:
        num_classes: classes including the background (4 for ShapesDataset).
        image_size: the images' side (they are resized so that their short
            side is this and their long side at most this).
        overrides: other ``maskrcnn_resnet_fpn`` arguments, replacing these.
    """
    return maskrcnn_from_preset(SMALL, num_classes=num_classes, image_size=image_size, **overrides)


def maskrcnn_resnet50_fpn(*, num_classes: int = 91, **kwargs) -> MaskRCNN:
    """Mask R-CNN ResNet-50-FPN, torchvision's ``maskrcnn_resnet50_fpn`` (v1):
    the same state-dict keys and shapes, so torchvision's COCO weights load
    with ``strict=True``. Other keyword arguments as :func:`maskrcnn_resnet_fpn`."""
    if "depth" in kwargs:
        raise TypeError("maskrcnn_resnet50_fpn has depth 50; use maskrcnn_resnet_fpn(depth=...) for others")
    return maskrcnn_resnet_fpn(depth=50, num_classes=num_classes, **kwargs)


# Keypoint R-CNN's training scales (torchvision's default; 800 at inference).
KEYPOINT_TRAIN_MIN_SIZES = (640, 672, 704, 736, 768, 800)


def keypointrcnn_resnet50_fpn(*, num_classes: int = 2, num_keypoints: int = 17, **kwargs) -> MaskRCNN:
    """Keypoint R-CNN ResNet-50-FPN, torchvision's ``keypointrcnn_resnet50_fpn``:
    no mask branch, a keypoint branch of eight 512-channel convolutions and
    56x56 heatmaps, short sides 640..800 in training. The same state-dict
    keys and shapes, so torchvision's COCO person keypoint weights load with
    ``strict=True``. Other keyword arguments as :func:`maskrcnn_resnet_fpn`."""
    if "depth" in kwargs:
        raise TypeError("keypointrcnn_resnet50_fpn has depth 50; use maskrcnn_resnet_fpn(depth=...) for others")
    kwargs = {"with_masks": False, "train_min_sizes": KEYPOINT_TRAIN_MIN_SIZES, **kwargs}
    return maskrcnn_resnet_fpn(depth=50, num_classes=num_classes, num_keypoints=num_keypoints, **kwargs)


def keypointrcnn_small(
    *, num_classes: int, num_keypoints: int, image_size: int = SMALL.image_size, **overrides
) -> MaskRCNN:
    """The ``presets.SMALL`` design with a small keypoint branch
    (``presets.SMALL_KEYPOINT_HEAD_LAYERS``) next to its mask branch: the
    keypoint demo's model (``train --keypoints``)."""
    return maskrcnn_from_preset(SMALL, num_classes=num_classes, image_size=image_size, num_keypoints=num_keypoints,
                                keypoint_head_layers=SMALL_KEYPOINT_HEAD_LAYERS, **overrides)


__all__ = ["KEYPOINT_LOSS_NAME", "KEYPOINT_TRAIN_MIN_SIZES", "LOSS_NAMES", "MaskRCNN", "check_model_settings",
           "keypointrcnn_resnet50_fpn", "keypointrcnn_small", "maskrcnn_from_preset", "model_builder",
           "region_proposal_network", "rpn_settings", "maskrcnn_resnet_fpn", "maskrcnn_small", "maskrcnn_resnet50_fpn",
           "box_masks_kept", "prepare_targets", "to_original_images"]
