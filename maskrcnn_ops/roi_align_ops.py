"""RoIAlign with torchvision's interface (``torchvision.ops.roi_align`` /
``RoIAlign``), on maskrcnn_ops kernels.

``roi_align`` and ``RoIAlign`` compile with ``torch.jit.script`` as
torchvision's do (TorchScript types in the signatures; a tuple of box tensors
is taken in eager mode only, as in torchvision).
"""

from __future__ import annotations

from typing import List, Tuple, Union

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

# A Tensor[K, 5], or one Tensor[L_i, 4] per image (a list; a tuple in eager mode).
BoxesArg = Union[Tensor, List[Tensor]]


class BoxesShapeError(ValueError, AssertionError):
    """Boxes of the wrong shape. A ValueError, and an AssertionError too:
    torchvision raises that (``torch._assert``) for the same boxes, so code
    written against torchvision that catches it keeps working on ours."""


def _pair(output_size: BroadcastingList2[int]) -> Tuple[int, int]:
    # TorchScript hands a List[int] of two (an int argument is broadcast at the call).
    if isinstance(output_size, int):
        return output_size, output_size
    if isinstance(output_size, (tuple, list)) and len(output_size) == 2:
        return int(output_size[0]), int(output_size[1])
    raise TypeError(f"output_size must be an int or a pair of ints, got {output_size}")


def boxes_to_rois(boxes: BoxesArg) -> Tensor:
    """Boxes as torchvision accepts them -> rois [K, 5] (batch_index, x1, y1, x2, y2).

    Args:
        boxes: a Tensor[K, 5] (returned unchanged) or a list/tuple with one
            Tensor[L_i, 4] of (x1, y1, x2, y2) per image; the batch index of a
            box is the position of its tensor in the list.

    Raises:
        BoxesShapeError (a ValueError and an AssertionError) for boxes of the
        wrong shape; ValueError for an empty list; TypeError for anything else.
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.size(1) != 5:
            raise BoxesShapeError(
                "boxes given as one Tensor must have shape [K, 5] with rows "
                f"(batch_index, x1, y1, x2, y2); got {list(boxes.shape)}. "
                "Pass a list of Tensor[L, 4] (one per image) for per-image boxes."
            )
        return boxes
    if not torch.jit.is_scripting():  # TorchScript has checked the types already
        if not isinstance(boxes, (list, tuple)) or not all(isinstance(b, Tensor) for b in boxes):
            raise TypeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    if len(boxes) == 0:
        raise ValueError("boxes is an empty list: give one Tensor[L, 4] per image (L may be 0)")
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.size(1) != 4:
            raise BoxesShapeError(f"boxes[{i}] must have shape [L, 4], got {list(b.shape)}")
    flat = torch.cat(boxes, dim=0)
    batch_index = torch.cat(
        [torch.full((b.size(0), 1), float(i), dtype=flat.dtype, device=flat.device) for i, b in enumerate(boxes)]
    )
    return torch.cat([batch_index, flat], dim=1)


def roi_align(
    input: Tensor,
    boxes: BoxesArg,
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Region of Interest Align (He et al., Mask R-CNN), as ``torchvision.ops.roi_align``.

    Args:
        input: features [N, C, H, W]; float32, float64, float16 or bfloat16;
            NCHW or channels_last (processed in place, no layout copy).
        boxes: Tensor[K, 5] of (batch_index, x1, y1, x2, y2), or a list of
            Tensor[L_i, 4] per image. Any floating dtype: coordinates are read in
            float32 (float64 for float64 features), so float32 boxes keep their
            precision with half-precision features.
        output_size: (pooled_height, pooled_width), or an int for both.
        spatial_scale: factor from box coordinates to feature coordinates
            (e.g. 1/4 for the stride-4 FPN level).
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive,
            ceil(bin size) (capped at 1024).
        aligned: shift boxes by -0.5 pixel to sample at pixel centres (the
            correct alignment; False reproduces the original implementation).

    Returns:
        Tensor[K, C, pooled_height, pooled_width] in input's dtype, in
        channels_last format when input is. Differentiable with respect to
        input (including double backward), not boxes.

    A box with NaN or infinite coordinates gives zeros. A batch index outside
    [0, N) is an error (on CUDA it is checked with one device-to-host copy,
    skipped during CUDA graph capture, where such RoIs give zeros).
    """
    rois = boxes_to_rois(boxes)
    pooled_height, pooled_width = _pair(output_size)
    return torch.ops.maskrcnn_ops.roi_align(
        input, rois, float(spatial_scale), pooled_height, pooled_width, int(sampling_ratio), bool(aligned)
    )


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`, as ``torchvision.ops.RoIAlign``."""

    def __init__(
        self,
        output_size: BroadcastingList2[int],
        spatial_scale: float,
        sampling_ratio: int,
        aligned: bool = False,
    ) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})"
        )


def roi_align_max(
    input: Tensor,
    boxes: BoxesArg,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign with max pooling (mmcv's ``pool_mode="max"``): each bin is the
    largest of its bilinear samples instead of their mean.

    Arguments, sampling geometry and output as :func:`roi_align`. Among equal
    samples the first (row-major within the bin) wins, so the gradient, which
    goes to the winning sample's four neighbours, is deterministic; NaN
    propagates. A sample outside the feature map counts as 0, as in mmcv.
    Differentiable once with respect to input.
    """
    rois = boxes_to_rois(boxes)
    pooled_height, pooled_width = _pair(output_size)
    output, _argmax = torch.ops.maskrcnn_ops.roi_align_max(
        input, rois, float(spatial_scale), pooled_height, pooled_width, int(sampling_ratio), bool(aligned)
    )
    return output
