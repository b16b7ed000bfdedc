"""Mask R-CNN on a ResNet-C4 backbone: the Mask R-CNN paper's ResNet-50-C4
design (detectron2's ``mask_rcnn_R_50_C4``).

The ResNet's stem and stages res2..res4 make one feature map of stride 16
(C4), on which the RPN runs (one level, every anchor size on it). Each RoI
is pooled from C4 at 14x14 (``maskrcnn_ops.roi_align``, aligned=True,
adaptive sampling as detectron2's ROIAlignV2 with sampling ratio 0), and the
ResNet's last stage, res5 (first block stride 2), turns it into 7x7 features
shared by both branches: their spatial mean feeds the box predictor (class
logits and class-specific deltas), and a 2x2 stride-2 transposed convolution
+ ReLU and a 1x1 convolution per class make 14x14 mask logits. In
inference, as in the paper, the mask branch runs on the detections (pooled
and through res5 again); in training on the positive samples (pooled and
through res5 again as well, where detectron2 reuses the box branch's
features: the same values, at the price of a second res5 pass over the
positives, which keeps the losses, sampling and targets those of
``maskrcnn.roi_heads.RoIHeads``).

State-dict layout (``maskrcnn_resnet_c4()``, ResNet-50, 81 classes)::

    backbone.conv1.weight, backbone.bn1.*          stem (7x7/2 conv + norm; max pool)
    backbone.layer1.* .. backbone.layer3.*         res2..res4, torchvision's block names
                                                   (convK, bnK, downsample.0 / .1)
    rpn.head.conv.0.0.{weight,bias}                3x3 conv, 1024 -> 1024
    rpn.head.cls_logits.{weight,bias}              [15, 1024, 1, 1]: anchor a = r * 5 + s
                                                   (ratio r of 0.5, 1, 2; size s of 32..512)
    rpn.head.bbox_pred.{weight,bias}               [60, 1024, 1, 1]: (dx, dy, dw, dh) of anchor a at 4a..4a+3
    roi_heads.res5.{0,1,2}.*                       res5, 1024 -> 2048, torchvision's block names
    roi_heads.box_predictor.cls_score.*            [81, 2048], class 0 the background
    roi_heads.box_predictor.bbox_pred.*            [81 * 4, 2048], class c at rows 4c..4c+3
    roi_heads.mask_predictor.conv5_mask.*          ConvTranspose2d 2048 -> 256, 2x2 stride 2
    roi_heads.mask_predictor.mask_fcn_logits.*     [81, 256, 1, 1], class 0 the background

``convert_detectron2_c4`` maps a detectron2 R50-C4 checkpoint's state dict
onto it, and ``detectron2_c4_model_kwargs`` gives the builder arguments that
reproduce detectron2's model (stride in the 1x1 convolutions, frozen
BatchNorm, BGR 0..255 pixel statistics).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import maskrcnn_ops

from .backbone import NORM_LAYERS, _stage_out_channels, build_resnet, check_resnet_settings, freeze_resnet_stages
from .heads import FastRCNNPredictor, MaskPredictor
from .model import MaskRCNN, check_model_settings, region_proposal_network, rpn_settings
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, ImageTransform
from .roi_heads import RoIHeads

C4_FEATURE = "res4"
C4_STRIDE = 16


class ResNetC4(nn.Module):
    """A ResNet's stem and its first three stages (res2..res4).

    Args:
        resnet: a torchvision ResNet; its stem and layer1..layer3 are reused
            (state-dict keys ``conv1``, ``bn1``, ``layer1``..``layer3``).
        channels_last: run in the channels_last memory format (see
            ``maskrcnn.backbone.ResNetFPN``).

    ``forward(x [N, 3, H, W])`` -> {"res4": [N, out_channels, H / 16, W / 16]}.
    """

    def __init__(self, resnet: nn.Module, *, channels_last: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.out_channels = _stage_out_channels(self.layer3)
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return OrderedDict([(C4_FEATURE, self.layer3(self.layer2(self.layer1(x))))])


class C4RoIAlign(nn.Module):
    """RoIAlign on the C4 map, with the interface of
    ``maskrcnn_ops.MultiScaleRoIAlign`` that ``RoIHeads`` calls.

    Args:
        output_size: pooled side (14).
        sampling_ratio: samples per bin along each axis; 0 adaptive
            (ceil(bin size), detectron2's R50-C4 setting).

    ``forward(x, boxes, image_shapes)``: x the feature dict (its "res4" map
    [N, C, H, W] is pooled), boxes one [L_i, 4] per image in the resized
    image's pixels -> [sum L_i, C, output_size, output_size]. The scale is
    1/16: the map's stride, exact as the batch is padded to multiples of 32.
    """

    def __init__(self, *, output_size: int = 14, sampling_ratio: int = 0) -> None:
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.spatial_scale = 1.0 / C4_STRIDE

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        return self.pool(x, boxes, [self.spatial_scale])

    def pool(self, x: Dict[str, Tensor], boxes, spatial_scales: List[float]) -> Tensor:
        """``forward`` with the scale given (one, of the C4 map); boxes: one
        [L_i, 4] per image or rois [K, 5] (image index, x1, y1, x2, y2)."""
        if len(spatial_scales) != 1:
            raise ValueError(f"the C4 pooler pools one map and takes one scale, got {len(spatial_scales)}")
        return maskrcnn_ops.roi_align(
            x[C4_FEATURE], boxes, self.output_size, spatial_scales[0], self.sampling_ratio, aligned=True
        )


class _Res5View(nn.Module):
    """Runs the RoI heads' res5 stage (owned by ``C4RoIHeads``, which holds
    it as ``res5``; kept here outside the module tree so that its weights
    have one state-dict key and one entry in ``parameters()``), then
    optionally the spatial mean: [K, C, 14, 14] -> [K, C5, 7, 7] or [K, C5].
    Both branches of the heads call the same stage through one of these."""

    def __init__(self, res5: nn.Sequential, *, spatial_mean: bool) -> None:
        super().__init__()
        self.__dict__["stage"] = res5  # not registered: see the class docstring
        self.spatial_mean = spatial_mean

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage(x)
        return x.mean(dim=(2, 3)) if self.spatial_mean else x


class C4RoIHeads(RoIHeads):
    """The box and mask branches on res5 features (module docstring):
    ``RoIHeads`` (its sampling, losses, post-processing and padded form)
    with the C4 pooler, res5 as the box head (then the spatial mean) and as
    the mask head, so ``box_head`` and ``mask_head`` hold no weights of their
    own and res5's are under ``res5``.

    Args:
        res5: the ResNet's last stage (a torchvision ``layer4``).
        num_classes: classes including the background.
        mask_channels: output channels of the mask branch's transposed
            convolution (256).
        pooler_resolution, sampling_ratio: of the C4 RoIAlign (14, 0).
        settings: the other ``RoIHeads`` arguments (thresholds, sampling).
    """

    def __init__(
        self, *, res5: nn.Sequential, num_classes: int, mask_channels: int = 256, pooler_resolution: int = 14,
        sampling_ratio: int = 0, **settings,
    ) -> None:
        pooler = C4RoIAlign(output_size=pooler_resolution, sampling_ratio=sampling_ratio)
        res5_channels = _stage_out_channels(res5)
        super().__init__(
            box_roi_pool=pooler,
            box_head=_Res5View(res5, spatial_mean=True),
            box_predictor=FastRCNNPredictor(in_features=res5_channels, num_classes=num_classes),
            mask_roi_pool=pooler,
            mask_head=_Res5View(res5, spatial_mean=False),
            mask_predictor=MaskPredictor(in_channels=res5_channels, dim_reduced=mask_channels, num_classes=num_classes),
            **settings,
        )
        self.res5 = res5


class MaskRCNNC4(MaskRCNN):
    """``MaskRCNN`` with a ``ResNetC4`` backbone and ``C4RoIHeads``: the
    same forward, losses and padded form; the RoI heads pool the C4 map."""

    architecture = "c4"

    def pooled_scales(self) -> List[float]:
        """[1/16]: the C4 map's scale."""
        return [self.roi_heads.box_roi_pool.spatial_scale]


def maskrcnn_resnet_c4(
    *,
    depth: int = 50,
    width: int = 64,
    num_classes: int = 91,
    trainable_layers: int = 3,
    norm: str = "frozen",
    stride_in_1x1: bool = False,
    min_size: int = 800,
    max_size: int = 1333,
    train_min_sizes: Optional[Sequence[int]] = None,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n: int = 6000,
    rpn_post_nms_top_n: int = 1000,
    rpn_train_pre_nms_top_n: int = 12000,
    rpn_train_post_nms_top_n: int = 2000,
    rpn_nms_thresh: float = 0.7,
    rpn_score_thresh: float = 0.0,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    pooler_sampling_ratio: int = 0,
    mask_channels: int = 256,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    channels_last: bool = False,
) -> MaskRCNNC4:
    """A ResNet-C4 Mask R-CNN with random weights (module docstring). The
    defaults are detectron2's R50-C4: anchors 32..512 x ratios 0.5, 1, 2
    (15 per location of C4), 6000/1000 proposals before/after NMS at
    inference and 12000/2000 in training, 14x14 RoIAlign with adaptive
    sampling, res5 as the shared head, a 256-channel mask upsampling, 512
    RoI samples per image.

    Args:
        depth: ResNet depth (18, 34, 50, 101, 152).
        width: the ResNet's first-stage width (64 standard; see ``build_resnet``).
        num_classes: classes including the background.
        trainable_layers: of (res5, res4, res3, res2, stem), how many train,
            counted from res5 (3: the stem and res2 frozen, detectron2's
            FREEZE_AT=2); as ``resnet_fpn_backbone``'s.
        norm: "frozen" (fine-tuning), "batch" or "group" (from scratch).
        stride_in_1x1: stride in the bottleneck's 1x1 convolution (detectron2's
            MSRA ResNets; see ``build_resnet``).
        min_size, max_size, train_min_sizes, image_mean, image_std: image
            resizing and normalization (see ImageTransform).
        anchor_sizes, aspect_ratios: every size with every ratio at each C4
            location.
        rpn_*: as ``maskrcnn_resnet_fpn``'s (the top-n apply per image: C4 is
            the one level).
        pooler_sampling_ratio: of the 14x14 RoIAlign (0 adaptive, or e.g. 2).
        mask_channels: output channels of the mask branch's upsampling.
        box_*: RoI sampling and detection post-processing, as ``maskrcnn_resnet_fpn``'s.
        channels_last: run the backbone in the channels_last memory format.
    """
    build_kwargs = dict(locals())
    check_model_settings(num_classes=num_classes, norm=norm)
    check_resnet_settings(depth, trainable_layers)
    resnet = build_resnet(depth, norm_layer=NORM_LAYERS[norm], width=width, stride_in_1x1=stride_in_1x1)
    freeze_resnet_stages(resnet, trainable_layers)
    backbone = ResNetC4(resnet, channels_last=channels_last)
    rpn = region_proposal_network(in_channels=backbone.out_channels, anchor_sizes=[tuple(anchor_sizes)],
                                  aspect_ratios=aspect_ratios, **rpn_settings(build_kwargs))
    roi_heads = C4RoIHeads(
        res5=resnet.layer4,
        num_classes=num_classes,
        mask_channels=mask_channels,
        sampling_ratio=pooler_sampling_ratio,
        score_thresh=box_score_thresh,
        nms_thresh=box_nms_thresh,
        detections_per_img=box_detections_per_img,
        batch_size_per_image=box_batch_size_per_image,
        positive_fraction=box_positive_fraction,
    )
    transform = ImageTransform(min_size=min_size, max_size=max_size, train_min_sizes=train_min_sizes,
                               image_mean=image_mean, image_std=image_std)
    model = MaskRCNNC4(transform=transform, backbone=backbone, rpn=rpn, roi_heads=roi_heads)
    model.build_kwargs = build_kwargs
    return model


def maskrcnn_resnet50_c4(*, num_classes: int = 91, **kwargs) -> MaskRCNNC4:
    """Mask R-CNN ResNet-50-C4 (the paper's and detectron2's R50-C4 design,
    module docstring). Other keyword arguments as :func:`maskrcnn_resnet_c4`."""
    if "depth" in kwargs:
        raise TypeError("maskrcnn_resnet50_c4 has depth 50; use maskrcnn_resnet_c4(depth=...) for others")
    return maskrcnn_resnet_c4(depth=50, num_classes=num_classes, **kwargs)


# ------------------------------------------------ detectron2 checkpoints --

# detectron2's pixel statistics for its MSRA ResNets: BGR images in 0..255,
# mean subtracted, std 1. Ours take RGB in [0, 1]: the converter reverses
# conv1's input channels, and these are the transform's mean and std that
# then give conv1 the same inputs (RGB order, in [0, 1] units).
DETECTRON2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
DETECTRON2_PIXEL_STD_BGR = (1.0, 1.0, 1.0)

_D2_BLOCK_RENAMES = (
    (re.compile(r"conv(\d)\.weight"), r"conv\1.weight"),
    (re.compile(r"conv(\d)\.norm\.(\w+)"), r"bn\1.\2"),
    (re.compile(r"shortcut\.weight"), "downsample.0.weight"),
    (re.compile(r"shortcut\.norm\.(\w+)"), r"downsample.1.\1"),
)
_D2_DIRECT_RENAMES = {
    "backbone.stem.conv1.weight": "backbone.conv1.weight",
    "proposal_generator.rpn_head.conv.weight": "rpn.head.conv.0.0.weight",
    "proposal_generator.rpn_head.conv.bias": "rpn.head.conv.0.0.bias",
    "roi_heads.mask_head.deconv.weight": "roi_heads.mask_predictor.conv5_mask.weight",
    "roi_heads.mask_head.deconv.bias": "roi_heads.mask_predictor.conv5_mask.bias",
}
# Buffers of detectron2's GeneralizedRCNN that are settings, not weights.
_D2_SETTINGS = ("pixel_mean", "pixel_std")


def _block_key(rest: str) -> Optional[str]:
    """'0.conv1.norm.bias' (a detectron2 block entry) -> '0.bn1.bias'."""
    index, _, name = rest.partition(".")
    for pattern, replacement in _D2_BLOCK_RENAMES:
        if pattern.fullmatch(name):
            return f"{index}.{pattern.sub(replacement, name)}"
    return None


def _renamed_key(key: str) -> Optional[str]:
    """Our name for a detectron2 R50-C4 entry whose tensor moves unchanged
    (None: not one of those). Backbone entries may carry FPN models'
    ``bottom_up.`` too."""
    key = re.sub(r"^backbone\.bottom_up\.", "backbone.", key)
    if key in _D2_DIRECT_RENAMES:
        return _D2_DIRECT_RENAMES[key]
    stem = re.fullmatch(r"backbone\.stem\.conv1\.norm\.(\w+)", key)
    if stem:
        return f"backbone.bn1.{stem[1]}"
    stage = re.fullmatch(r"(backbone|roi_heads)\.res([2345])\.(.+)", key)
    if stage is None:
        return None
    owner, number, rest = stage.groups()
    block = _block_key(rest)
    if block is None or (owner == "roi_heads") != (number == "5"):
        return None
    return f"backbone.layer{int(number) - 1}.{block}" if owner == "backbone" else f"roi_heads.res5.{block}"


def _anchor_order(num_sizes: int, num_ratios: int) -> List[int]:
    """For each of our anchors (ratio-major: a = r * sizes + s, as
    ``maskrcnn_ops.AnchorGenerator``), detectron2's index of the same
    anchor (size-major: s * ratios + r)."""
    return [s * num_ratios + r for r in range(num_ratios) for s in range(num_sizes)]


def _with_background_first(tensor: Tensor, *, rows_per_class: int, background_last: bool) -> Tensor:
    """Per-class rows in our order, class 0 the background: detectron2's
    classifier has the background last (moved first); its box deltas and
    mask logits have no background rows (zeros added: our post-processing
    never reads them)."""
    if background_last:
        return torch.cat([tensor[-rows_per_class:], tensor[:-rows_per_class]])
    return torch.cat([tensor.new_zeros((rows_per_class, *tensor.shape[1:])), tensor])


def convert_detectron2_c4(
    state_dict: Mapping[str, Tensor], *, num_anchor_sizes: int = 5, num_aspect_ratios: int = 3, bgr_to_rgb: bool = True
) -> Dict[str, Tensor]:
    """A detectron2 Mask R-CNN R50-C4 state dict (``model_final.pth``'s
    "model") in our names and conventions (module docstring), to load into
    ``maskrcnn_resnet_c4(**detectron2_c4_model_kwargs(state_dict))``.

    Besides the renames: the RPN's anchors are reordered (detectron2 lists
    them size-major, we ratio-major); the classes move so that the
    background is class 0 (detectron2 puts it last in ``cls_score`` and has
    no background box deltas or mask logits: zero rows are added); with
    ``bgr_to_rgb`` conv1's input channels are reversed, as our images are RGB.
    Anchor geometry differs slightly (ours are rounded to whole pixels as
    torchvision's; detectron2's are not), so detections match up to that.

    Raises ValueError naming the entries it does not know.
    """
    converted: Dict[str, Tensor] = {}
    unknown = []
    order = _anchor_order(num_anchor_sizes, num_aspect_ratios)
    for key, tensor in state_dict.items():
        if key in _D2_SETTINGS or key.endswith("num_batches_tracked"):
            continue
        name = _renamed_key(key)
        if name is not None:
            converted[name] = tensor
        elif key.startswith("proposal_generator.rpn_head.objectness_logits."):
            converted[f"rpn.head.cls_logits.{key.rsplit('.', 1)[1]}"] = tensor[order]
        elif key.startswith("proposal_generator.rpn_head.anchor_deltas."):
            per_anchor = tensor.reshape(len(order), 4, *tensor.shape[1:])
            converted[f"rpn.head.bbox_pred.{key.rsplit('.', 1)[1]}"] = per_anchor[order].reshape(tensor.shape)
        elif key.startswith("roi_heads.box_predictor.cls_score."):
            converted[key] = _with_background_first(tensor, rows_per_class=1, background_last=True)
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            converted[key] = _with_background_first(tensor, rows_per_class=4, background_last=False)
        elif key.startswith("roi_heads.mask_head.predictor."):
            name = f"roi_heads.mask_predictor.mask_fcn_logits.{key.rsplit('.', 1)[1]}"
            converted[name] = _with_background_first(tensor, rows_per_class=1, background_last=False)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} entries are not those of a detectron2 Mask R-CNN R50-C4: {unknown[:5]}")
    if bgr_to_rgb:
        converted["backbone.conv1.weight"] = converted["backbone.conv1.weight"].flip(1)
    return converted


def detectron2_c4_model_kwargs(state_dict: Mapping[str, Tensor]) -> Dict[str, object]:
    """The ``maskrcnn_resnet_c4`` arguments of a detectron2 R50-C4 (or
    R101-C4) state dict: depth, classes and mask width read from the
    tensors; stride in the 1x1 convolutions, frozen BatchNorm, and the
    transform's statistics for BGR 0..255 pixels (its ``pixel_mean`` and
    ``pixel_std`` when the state dict has them, else detectron2's defaults),
    in RGB order and [0, 1] units as ``convert_detectron2_c4`` expects."""
    from .checkpoint import resnet_depth  # checkpoint imports the model modules

    def entries(stage: str) -> set:
        prefix = re.compile(rf"backbone\.(?:bottom_up\.)?{stage}\.(\d+)\.(\w+)")
        return {match.groups() for match in map(prefix.match, state_dict) if match}

    res4 = entries("res4")
    depth = resnet_depth(bottleneck=any(name == "conv3" for _, name in res4), blocks_in_res4=len({i for i, _ in res4}))
    mean_bgr = state_dict["pixel_mean"].flatten().tolist() if "pixel_mean" in state_dict else DETECTRON2_PIXEL_MEAN_BGR
    std_bgr = state_dict["pixel_std"].flatten().tolist() if "pixel_std" in state_dict else DETECTRON2_PIXEL_STD_BGR
    return dict(
        depth=depth,
        width=int(state_dict[_first_present(state_dict, "stem.conv1.weight")].shape[0]),
        num_classes=int(state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0]),
        norm="frozen",
        stride_in_1x1=True,
        image_mean=tuple(m / 255 for m in reversed(mean_bgr)),
        image_std=tuple(s / 255 for s in reversed(std_bgr)),
        mask_channels=int(state_dict["roi_heads.mask_head.deconv.weight"].shape[1]),
    )


def _first_present(state_dict: Mapping[str, Tensor], backbone_key: str) -> str:
    """``backbone.<key>`` or ``backbone.bottom_up.<key>``, whichever the state dict has."""
    for key in (f"backbone.{backbone_key}", f"backbone.bottom_up.{backbone_key}"):
        if key in state_dict:
            return key
    raise ValueError(f"not a detectron2 ResNet state dict: no backbone.{backbone_key}")


def load_detectron2_c4(state_dict: Mapping[str, Tensor], **overrides) -> MaskRCNNC4:
    """A ``maskrcnn_resnet_c4`` model with a detectron2 R50-C4 state dict
    loaded (strict), in eval mode. ``overrides``: builder arguments (e.g.
    ``box_score_thresh``) replacing ``detectron2_c4_model_kwargs``'."""
    model = maskrcnn_resnet_c4(**{**detectron2_c4_model_kwargs(state_dict), **overrides})
    model.load_state_dict(convert_detectron2_c4(state_dict), strict=True)
    return model.eval()


__all__ = ["C4_FEATURE", "C4_STRIDE", "C4RoIAlign", "C4RoIHeads", "MaskRCNNC4", "ResNetC4", "convert_detectron2_c4",
           "detectron2_c4_model_kwargs", "load_detectron2_c4", "maskrcnn_resnet50_c4", "maskrcnn_resnet_c4"]
