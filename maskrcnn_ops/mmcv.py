"""RoIAlign with mmcv's interface, for mmdetection users:
``mmcv.ops.RoIAlign(output_size, spatial_scale, sampling_ratio, pool_mode,
aligned)`` and ``mmcv.ops.roi_align``, on maskrcnn_ops kernels."""

from __future__ import annotations

from typing import Tuple, Union

from torch import Tensor, nn

from .roi_align_ops import _pair, roi_align, roi_align_max

POOL_MODES = ("avg", "max")


def mmcv_roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    pool_mode: str = "avg",
    aligned: bool = True,
) -> Tensor:
    """mmcv's ``roi_align(input, rois, output_size, spatial_scale,
    sampling_ratio, pool_mode, aligned)``.

    Args:
        input: features [N, C, H, W].
        rois: Tensor[K, 5] of (batch_index, x1, y1, x2, y2).
        output_size: pooled (height, width), or an int for both.
        spatial_scale: box coordinates to feature coordinates.
        sampling_ratio: samples per bin along each axis; 0 is adaptive.
        pool_mode: "avg" (the mean of each bin's samples) or "max" (their
            maximum).
        aligned: pixel-centre alignment (mmcv's default, True).

    Returns:
        Tensor[K, C, *output_size].
    """
    if pool_mode not in POOL_MODES:
        raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {pool_mode!r}")
    pool = roi_align_max if pool_mode == "max" else roi_align
    return pool(input, rois, output_size, spatial_scale, sampling_ratio, aligned)


class MmcvRoIAlign(nn.Module):
    """``mmcv.ops.RoIAlign`` on our kernels, same argument order and defaults:
    ``MmcvRoIAlign(output_size, spatial_scale=1.0, sampling_ratio=0,
    pool_mode="avg", aligned=True)``; ``forward(input, rois)`` with rois
    [K, 5]. (mmcv's ``use_torchvision`` switch has no meaning here.)"""

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        pool_mode: str = "avg",
        aligned: bool = True,
    ) -> None:
        super().__init__()
        if pool_mode not in POOL_MODES:
            raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {pool_mode!r}")
        # A pair, as mmcv stores it: mmdetection reads `*layer.output_size`.
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.pool_mode = pool_mode
        self.aligned = aligned

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        return mmcv_roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.pool_mode, self.aligned
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, pool_mode={self.pool_mode!r}, aligned={self.aligned})"
        )
