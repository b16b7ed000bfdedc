"""Box coding and box utilities with torchvision's semantics
(``BoxCoder.decode_single`` / ``encode_single``, ``clip_boxes_to_image``,
``remove_small_boxes``)."""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

_ops = torch.ops.maskrcnn_ops

DEFAULT_CLIP = math.log(1000.0 / 16)


def _weights(weights: Sequence[float]) -> list:
    weights = [float(w) for w in weights]
    if len(weights) != 4:
        raise ValueError(f"weights must be 4 numbers (wx, wy, ww, wh), got {weights}")
    return weights


def decode_boxes(
    deltas: Tensor,
    boxes: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = DEFAULT_CLIP,
) -> Tensor:
    """Applies regression deltas to boxes, as ``BoxCoder(weights, clip).decode_single``.

    Args:
        deltas: [K, 4 * C] rows of (dx, dy, dw, dh) per class; float32, float64,
            float16 or bfloat16 (computed in float32, float64 for float64).
        boxes: [K, 4] reference boxes (x1, y1, x2, y2), any floating dtype.
        weights: (wx, wy, ww, wh) dividing the deltas.
        clip: upper bound of dw / ww and dh / wh before exp (overflow guard).

    Returns:
        [K, 4 * C] decoded boxes in deltas' dtype. Differentiable with respect
        to ``deltas`` (first order; double backward raises); not ``boxes``.
        Non-finite deltas give non-finite boxes, as in torchvision.
    """
    return _ops.decode_boxes(deltas, boxes, _weights(weights), float(clip))


def encode_boxes(
    reference_boxes: Tensor, proposals: Tensor, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
) -> Tensor:
    """Regression targets of ``reference_boxes`` relative to ``proposals``, as
    ``BoxCoder(weights).encode_single(reference_boxes, proposals)``.

    Args:
        reference_boxes: [K, 4] ground-truth boxes; proposals: [K, 4].

    Returns:
        [K, 4] targets (dx, dy, dw, dh) in reference_boxes' dtype. Not
        differentiable (targets are constants of the loss).
    """
    return _ops.encode_boxes(reference_boxes, proposals, _weights(weights))


def clip_boxes_to_image(boxes: Tensor, size: Tuple[int, int]) -> Tensor:
    """Clips boxes [..., 4] to an image of ``size`` (height, width), as torchvision."""
    height, width = size
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=boxes.dim()).reshape(boxes.shape)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of boxes [K, 4] whose sides are both >= min_size, as torchvision."""
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]
