"""Mask post-processing: pasting the M x M masks of detections into the
image, and their COCO run-length encoding without the full-size masks.

Both follow torchvision's ``paste_masks_in_image`` geometry exactly: each
mask is padded by ``padding`` zero pixels, its box grown about its centre by
(M + 2 * padding) / M and truncated to integer pixels (ends inclusive), and
the padded mask resized bilinearly to that box (``F.interpolate``,
``align_corners=False``). The kernels (``csrc/common/paste_math.h``, shared by
CPU and CUDA) compute each pixel of each box's visible part once, in float32
(float64 for float64 masks); everything else is zero. So work scales with the
boxes' areas rather than D x H x W interpolations, and no padded or resized
copy of a mask is made.

Boxes with a NaN or infinite coordinate (or whose growth overflows) paste
nothing; boxes partly or wholly outside the image paste their visible part
(torchvision raises for a box entirely left of or above the image). Grown
coordinates beyond +-2^40 pixels are clamped before the integer conversion.
Inference only: the ops have no gradient.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

_ops = torch.ops.maskrcnn_ops

ImageSize = Union[Tuple[int, int], torch.Size]


def paste_masks(
    masks: Tensor, boxes: Tensor, image_size: ImageSize, *, threshold: Optional[float] = None, padding: int = 1
) -> Tensor:
    """Pastes each mask into its box in an image of ``image_size``.

    Args:
        masks: [D, M, M] mask probabilities, float32, float64, float16 or bfloat16.
        boxes: [D, 4] (x1, y1, x2, y2) in image pixels, floating, on masks' device.
        image_size: (height, width); SymInts when traced.
        threshold: when given, return bool masks: pixel > threshold (the
            comparison is on the float32 value, before any rounding to the
            masks' dtype; NaN is False).
        padding: zero pixels around each mask before resizing (torchvision's 1).

    Returns:
        [D, height, width] in masks' dtype (rounded once from float32), or
        bool with ``threshold``; zero outside each box's visible part. On
        the CPU (Linux) an output of 8 MiB or more is fresh anonymous
        memory: resident only where boxes were written until it is written
        to (reading the zeros maps no memory).
    """
    height, width = image_size
    if threshold is not None:
        threshold = float(threshold)
    return _ops.paste_masks(masks, boxes, height, width, padding, threshold)


def masks_to_rle(
    masks: Tensor, boxes: Tensor, image_size: ImageSize, threshold: float = 0.5, *, padding: int = 1
) -> List[Dict[str, object]]:
    """COCO run-length encodings of the masks :func:`paste_masks` would paste,
    binarized at pixel > ``threshold``, as ``pycocotools.mask.encode`` gives
    them for the pasted uint8 masks (byte-identical ``counts``).

    The encoding runs on the CPU, a mask per thread, column by column of the
    image from each box's window: no H x W mask is ever formed, so memory is
    the encodings themselves. CUDA inputs are moved to the CPU first (the
    M x M masks and the boxes, not pasted images).

    Args:
        masks: [D, M, M] mask probabilities; boxes: [D, 4] (x1, y1, x2, y2).
        image_size: (height, width).
        threshold: a pixel is in the mask when its value exceeds this.

    Returns:
        D dicts ``{"size": [height, width], "counts": bytes}``.
    """
    height, width = (int(s) for s in image_size)
    chars, offsets = _ops.masks_to_rle(masks.cpu(), boxes.cpu(), height, width, padding, float(threshold))
    data = chars.numpy().tobytes()
    ends = offsets.tolist()
    return [{"size": [height, width], "counts": data[ends[i]:ends[i + 1]]} for i in range(len(ends) - 1)]


__all__ = ["masks_to_rle", "paste_masks"]
