"""Box coding and box utilities with torchvision's semantics
(``BoxCoder.decode_single`` / ``encode_single``, ``clip_boxes_to_image``,
``remove_small_boxes``). The Python clipping and size test here are the only
ones outside the kernels (``csrc/common/box_coder.h`` has the kernels')."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

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


@dataclass(frozen=True)
class BoxCoder:
    """A box coder, as torchvision's ``BoxCoder`` (detectron2's
    ``Box2BoxTransform``): the (wx, wy, ww, wh) weights and the clip of
    dw, dh. A model builds one per stage and uses it both for the training
    targets (``encode``) and for decoding its predictions (``decode``), so
    the two cannot disagree.

    Attributes:
        weights: (wx, wy, ww, wh) dividing the deltas (4 numbers).
        clip: upper bound of dw / ww and dh / wh before exp.
    """

    weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    clip: float = DEFAULT_CLIP

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(_weights(self.weights)))
        object.__setattr__(self, "clip", float(self.clip))

    def encode(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        """:func:`encode_boxes` with these weights: [K, 4] targets."""
        return encode_boxes(reference_boxes, proposals, self.weights)

    def decode(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """:func:`decode_boxes` with these weights and clip: [K, 4 * C] boxes."""
        return decode_boxes(deltas, boxes, self.weights, self.clip)


def clip_boxes_to_image(boxes: Tensor, size: Union[Tuple[int, int], Tensor]) -> Tensor:
    """Clips boxes [..., 4] (x1, y1, x2, y2) to [0, width] x [0, height], as
    torchvision's ``clip_boxes_to_image`` (NaN stays NaN).

    Args:
        boxes: [..., 4].
        size: (height, width) of the image, or a tensor [..., 2] of one
            (height, width) per box that broadcasts against ``boxes[..., 0]``
            (e.g. [K, 1, 2] for the [K, C, 4] boxes of K proposals in
            different images).
    """
    if isinstance(size, Tensor):
        height, width = size.to(boxes.dtype).unbind(-1)
    else:
        height, width = size
    x1, y1, x2, y2 = boxes.clamp(min=0).unbind(-1)
    return torch.stack([x1.clamp(max=width), y1.clamp(max=height), x2.clamp(max=width), y2.clamp(max=height)], dim=-1)


def boxes_large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """bool [...]: whether each box [..., 4] has both sides >= min_size
    (False for NaN), torchvision's ``remove_small_boxes`` test as a mask."""
    return ((boxes[..., 2] - boxes[..., 0]) >= min_size) & ((boxes[..., 3] - boxes[..., 1]) >= min_size)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of boxes [K, 4] whose sides are both >= min_size, as torchvision
    (a data-dependent size: traced code should use :func:`boxes_large_enough`)."""
    return torch.where(boxes_large_enough(boxes, min_size))[0]
