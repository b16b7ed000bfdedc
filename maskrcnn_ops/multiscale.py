"""Multi-level (FPN) RoIAlign with torchvision's interface
(``torchvision.ops.MultiScaleRoIAlign``), as one fused operator.

torchvision pools each pyramid level separately: it maps RoIs to levels,
then for every level selects its RoIs with ``torch.where`` (a host
synchronization on CUDA), runs ``roi_align`` and scatters the results back.
Here one kernel does all of it: the level of each RoI is computed inside the
kernel, with torchvision's formula and arithmetic, and the RoI pools straight
from that level's feature map into its output row; the backward is fused the
same way. Nothing waits on the device.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .roi_align_ops import BoxesArg, _pair, boxes_to_rois

ImageShapes = Sequence[Tuple[int, int]]

# The FPN paper's level mapping (eq. 1): a box of side CANONICAL_SCALE (the
# ImageNet pre-training size) maps to level CANONICAL_LEVEL (P4); LEVEL_EPS is
# torchvision's LevelMapper margin, which keeps exact powers of two (a 224 x
# 224 box) on their level. The kernel (csrc/common/roi_align_math.h:
# fpn_level_index) applies the same formula to the values it is given.
CANONICAL_SCALE = 224
CANONICAL_LEVEL = 4
LEVEL_EPS = 1e-6


def infer_scale(feature_size: Sequence[int], image_size: Sequence[int]) -> float:
    """Scale of a feature map relative to the (padded) image, as torchvision
    infers it: the power of two nearest to feature_height / image_height.

    Args:
        feature_size: (height, width) of the feature map.
        image_size: (height, width) of the largest image of the batch.
    """
    if image_size[0] <= 0:
        raise ValueError(f"image height must be positive to infer a feature scale, got {image_size[0]}")
    # torchvision rounds log2 in float32 (round half to even); float32 is
    # exact for the ratios that occur and Python's round is half-to-even too.
    approx = float(torch.tensor(float(feature_size[0]) / float(image_size[0])).log2())
    return 2.0 ** round(approx)


def infer_scales(features: Sequence[Tensor], image_shapes: ImageShapes) -> List[float]:
    """One scale per feature map [N, C, H, W] from the largest image size
    among image_shapes [(height, width), ...], as torchvision."""
    if len(image_shapes) == 0:
        raise ValueError("image_shapes is empty: give the (height, width) of each image")
    largest = (max(int(s[0]) for s in image_shapes), max(int(s[1]) for s in image_shapes))
    return [infer_scale(f.shape[-2:], largest) for f in features]


def first_pyramid_level(spatial_scales: Sequence[float]) -> int:
    """k of the finest feature map, whose scale is 2**-k (2 for P2 at 1/4)."""
    return int(round(-math.log2(spatial_scales[0])))


def fpn_levels(
    boxes: Tensor,
    spatial_scales: Sequence[float],
    *,
    canonical_scale: float = CANONICAL_SCALE,
    canonical_level: int = CANONICAL_LEVEL,
) -> Tensor:
    """Index into the pyramid (0 = finest map) of each box [K, 4] (x1, y1, x2,
    y2): ``floor(canonical_level + log2(sqrt(area) / canonical_scale) +
    LEVEL_EPS)`` clamped to the levels given, in the boxes' dtype and
    torchvision's order of operations. A box whose formula is NaN (negative
    area, NaN coordinates) gets level 0, as in the kernel; a zero-area box
    the finest level. The mapping the kernel applies (it reads the RoIs in
    the features' accumulation dtype: float32, float64 for float64), for
    inspection, tests and the reference. Returns int64 [K]."""
    first_level = first_pyramid_level(spatial_scales)
    x1, y1, x2, y2 = boxes.unbind(-1)
    size = torch.sqrt((x2 - x1) * (y2 - y1))
    eps = torch.tensor(LEVEL_EPS, dtype=boxes.dtype)
    level = torch.floor(canonical_level + torch.log2(size / canonical_scale) + eps)
    level = torch.where(torch.isnan(level), first_level, level)
    level = torch.clamp(level, min=first_level, max=first_level + len(spatial_scales) - 1)
    return level.to(torch.int64) - first_level


def multi_scale_roi_align(
    features: Sequence[Tensor],
    boxes: BoxesArg,
    output_size: Union[int, Tuple[int, int]],
    sampling_ratio: int,
    *,
    image_shapes: Optional[ImageShapes] = None,
    spatial_scales: Optional[Sequence[float]] = None,
    canonical_scale: float = CANONICAL_SCALE,
    canonical_level: int = CANONICAL_LEVEL,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign over a feature pyramid, each RoI pooled from its FPN level.

    The level of each box is :func:`fpn_levels`' (the FPN paper's eq. 1 and
    torchvision's ``LevelMapper``), computed inside the kernel.

    Args:
        features: feature maps [N, C, H_l, W_l], finest first (e.g. P2..P5),
            one dtype and memory format.
        boxes: Tensor[K, 5] of (batch_index, x1, y1, x2, y2) or a list with
            one Tensor[L_i, 4] per image, in image coordinates.
        output_size: (pooled_height, pooled_width), or an int for both.
        sampling_ratio: samples per bin along each axis; <= 0 is adaptive.
        image_shapes: (height, width) of each image before the backbone; the
            scales are inferred from it as torchvision does. Give either this
            or ``spatial_scales``.
        spatial_scales: one power of two per level, halving from each level
            to the next (e.g. [1/4, 1/8, 1/16, 1/32]).
        canonical_scale, canonical_level: the box side that maps to the
            canonical level (by default the paper's, ``CANONICAL_SCALE`` and
            ``CANONICAL_LEVEL``).
        aligned: pixel-centre alignment as in :func:`maskrcnn_ops.roi_align`
            (torchvision's MultiScaleRoIAlign uses False).

    Returns:
        Tensor[K, C, pooled_height, pooled_width] in the features' dtype,
        channels_last when they are. Differentiable with respect to every
        feature map (double backward included).

    RoIs with a batch index outside [0, N) raise an error on CPU; on CUDA,
    where checking would synchronize with the host, they give zeros and read
    nothing.
    """
    features = list(features)
    if len(features) == 0:
        raise ValueError("multi_scale_roi_align needs at least one feature map")
    if (image_shapes is None) == (spatial_scales is None):
        raise ValueError("give exactly one of image_shapes (to infer the scales) or spatial_scales")
    if spatial_scales is None:
        spatial_scales = infer_scales(features, image_shapes)
    rois = boxes_to_rois(boxes)
    pooled_height, pooled_width = _pair(output_size)
    return torch.ops.maskrcnn_ops.multi_level_roi_align(
        features,
        rois,
        [float(s) for s in spatial_scales],
        pooled_height,
        pooled_width,
        int(sampling_ratio),
        bool(aligned),
        float(canonical_scale),
        int(canonical_level),
    )


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign`` on the fused kernel.

    Args:
        featmap_names: names of the feature maps to pool from; they are taken
            in the order of the input dict, as torchvision does.
        output_size: pooled size, an int or (height, width).
        sampling_ratio: samples per bin along each axis; <= 0 is adaptive.
        canonical_scale, canonical_level: see :func:`multi_scale_roi_align`.

    ``forward(x, boxes, image_shapes)`` takes the feature dict, one Tensor[L_i,
    4] of boxes per image in image coordinates, and the (height, width) of
    each image, and returns Tensor[sum L_i, C, *output_size].

    Unlike torchvision, which infers the scales on its first call and keeps
    them (``scales``), the scales are inferred on every call (it costs
    nothing, see :func:`infer_scales`) and not stored, so one module serves
    batches of any image size and a forward changes no state.
    """

    def __init__(
        self,
        featmap_names: List[str],
        output_size: Union[int, Tuple[int, int], List[int]],
        sampling_ratio: int,
        *,
        canonical_scale: int = CANONICAL_SCALE,
        canonical_level: int = CANONICAL_LEVEL,
    ) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        features = self._pooled_maps(x)
        return self.pool(x, boxes, infer_scales(features, image_shapes))

    def pool(self, x: Dict[str, Tensor], boxes: BoxesArg, spatial_scales: List[float]) -> Tensor:
        """``forward`` with the scales of the pooled maps given instead of
        inferred from image sizes (a traced graph gives them, as its image
        sizes are symbolic); boxes: one [L_i, 4] per image or [K, 5] rois."""
        return multi_scale_roi_align(
            self._pooled_maps(x),
            boxes,
            self.output_size,
            self.sampling_ratio,
            spatial_scales=spatial_scales,
            canonical_scale=self.canonical_scale,
            canonical_level=self.canonical_level,
        )

    def _pooled_maps(self, x: Dict[str, Tensor]) -> List[Tensor]:
        features = [value for name, value in x.items() if name in self.featmap_names]
        if len(features) == 0:
            raise ValueError(f"none of the feature maps {self.featmap_names} is in the input (it has {list(x)})")
        return features

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(featmap_names={self.featmap_names}, "
            f"output_size={self.output_size}, sampling_ratio={self.sampling_ratio})"
        )

