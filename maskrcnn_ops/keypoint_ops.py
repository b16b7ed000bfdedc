"""Keypoint R-CNN post-processing: keypoints from the predicted heatmaps.

:func:`heatmaps_to_keypoints` is torchvision's
``roi_heads.heatmaps_to_keypoints`` as one op (CPU and CUDA) instead of a
Python loop over RoIs: each RoI's K heatmaps are resized bicubically
(``F.interpolate(mode="bicubic", align_corners=False)``) to its box, and each
keypoint is the first maximum of its resized map. The kernels
(``csrc/common/keypoint_math.h``, shared by CPU and CUDA) never form the
resized maps: bicubic interpolation is separable, so the CPU interpolates the
heatmap's rows once per output column and combines four of them per output
row, keeping a running maximum; the GPU gives each (RoI, keypoint) a block
that reduces its pixels' maxima.

The resized values follow ATen's CPU bicubic upsampling operation by
operation (equal, bit for bit, to torch's portable CPU build; torch's AVX2 and
AVX-512 builds fuse some operations and differ by a few ulp, so where two
resized values are that close, either may be the maximum).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

_ops = torch.ops.maskrcnn_ops

# csrc/common/keypoint_math.h: kMaxKeypointMapSide.
MAX_KEYPOINT_MAP_SIDE = 4096


def heatmaps_to_keypoints(heatmaps: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """Keypoints of detections from their heatmaps (Keypoint R-CNN's decoding).

    Box i is ``width = max(x2 - x1, 1)`` by ``height = max(y2 - y1, 1)``;
    its heatmaps are resized to ``ceil(height) x ceil(width)`` pixels and
    keypoint k lies at the first maximum (row-major; NaN counts as the
    largest) of map k, at ``x = (column + 0.5) * width / ceil(width) + x1``
    (``y`` alike).

    Args:
        heatmaps: [D, K, H, W] keypoint logits, float32, float64, float16 or
            bfloat16 (H, W >= 1 unless K == 0).
        boxes: [D, 4] (x1, y1, x2, y2) in image pixels, floating, on
            heatmaps' device; read in float32 (float64 for float64 heatmaps).

    Returns:
        keypoints: [D, K, 3] rows of (x, y, 1) in image pixels.
        scores: [D, K] the resized maps' values at the keypoints (in
        heatmaps' dtype, as torch resizes them, then widened).
        Both float32, or float64 for float64 heatmaps.

    Beyond torchvision: a side longer than ``MAX_KEYPOINT_MAP_SIDE`` (4096)
    pixels is resized to that many (coordinates still scale to the box), and
    an axis of non-finite extent (a NaN or infinite coordinate) to 1 pixel,
    which gives non-finite coordinates along it (torchvision raises for NaN).
    Inference only: no gradient.
    """
    return _ops.heatmaps_to_keypoints(heatmaps, boxes)


__all__ = ["MAX_KEYPOINT_MAP_SIDE", "heatmaps_to_keypoints"]
