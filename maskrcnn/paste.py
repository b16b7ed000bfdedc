"""Pasting the small per-detection masks into the image, for all
detections at once.

torchvision pastes one mask at a time: pad the M x M mask by one pixel,
grow the box by the same factor, round it to integers, resize the mask
bilinearly to the box's size and copy it in. Bilinear resizing is
separable, so mask n resized and placed is ``Wy[n] @ mask[n] @ Wx[n]^T``,
with interpolation matrices Wy [N, rows, M+2] and Wx [N, cols, M+2] that hold
the exact bilinear weights inside the box and zeros outside it: two batched
matrix products for all masks. Only a window as large as the largest box
(clipped to the image) is computed; it is then written into each mask's own
plane, whose other pixels are zero.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor
from torch.nn import functional as F


def expand_boxes_to_pixels(boxes: Tensor, scale: float) -> Tensor:
    """Boxes [N, 4] grown about their centres by ``scale`` and truncated to
    int64 pixel indices (x1, y1, x2, y2), both ends inclusive."""
    centre_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    centre_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    expanded = torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], dim=1)
    return expanded.to(torch.int64)


def interpolation_matrix(start: Tensor, end: Tensor, window_start: Tensor, window: int, source: int) -> Tensor:
    """Bilinear resize-and-place weights along one axis.

    Args:
        start, end: [N] int64, first and last (inclusive) output pixel of each box.
        window_start: [N] int64, output pixel of each window's first row.
        window: window length (output pixels computed per mask).
        source: length of the mask being resized.

    Returns:
        [N, window, source] float32: row r of mask n holds the weights of
        output pixel ``window_start[n] + r`` over the mask's pixels, as
        ``F.interpolate(mode="bilinear", align_corners=False)`` to a length of
        ``end - start + 1`` (at least 1); zero rows outside [start, end].
    """
    n = start.numel()
    device = start.device
    length = (end - start + 1).clamp(min=1).to(torch.float32)
    pixel = window_start[:, None] + torch.arange(window, device=device)[None, :]  # [N, window]
    inside = (pixel >= start[:, None]) & (pixel <= end[:, None])
    # Source coordinate of each output pixel centre (half-pixel convention),
    # clamped at 0 as PyTorch's bilinear kernel does.
    scale = source / length
    position = ((pixel - start[:, None]).to(torch.float32) + 0.5) * scale[:, None] - 0.5
    position = position.clamp(min=0)
    lower = position.to(torch.int64).clamp(max=source - 1)
    upper = (lower + 1).clamp(max=source - 1)
    upper_weight = (position - lower.to(torch.float32)).clamp(0, 1)
    lower_weight = 1 - upper_weight
    weights = torch.zeros(n, window, source, dtype=torch.float32, device=device)
    weights.scatter_add_(2, lower[..., None], (lower_weight * inside)[..., None])
    weights.scatter_add_(2, upper[..., None], (upper_weight * inside)[..., None])
    return weights


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int], *, padding: int = 1) -> Tensor:
    """Pastes masks into an image, as torchvision's ``paste_masks_in_image``.

    Args:
        masks: [N, 1, M, M] mask probabilities (any floating dtype).
        boxes: [N, 4] (x1, y1, x2, y2) of the detections in image pixels.
        image_size: (height, width) of the image.
        padding: zero pixels added around each mask before resizing (the box
            grows by the same factor), so the mask fades out at its border.

    Returns:
        [N, 1, height, width] float32 masks, zero outside each box.
    """
    height, width = image_size
    num = masks.size(0)
    device = masks.device
    out = torch.zeros(num, height, width, dtype=torch.float32, device=device)
    if num == 0 or height == 0 or width == 0:
        return out[:, None]
    side = masks.size(-1)
    padded = F.pad(masks[:, 0].float(), (padding,) * 4)  # [N, M + 2p, M + 2p]
    pixels = expand_boxes_to_pixels(boxes.float(), float(side + 2 * padding) / side)
    x1, y1, x2, y2 = pixels.unbind(1)

    # The visible part of each box, and one window size for all masks that
    # covers the largest visible part; each window starts at its box's
    # visible top-left, moved back where it would cross the image border.
    visible_h = (y2.clamp(max=height - 1) - y1.clamp(min=0) + 1).clamp(min=0)
    visible_w = (x2.clamp(max=width - 1) - x1.clamp(min=0) + 1).clamp(min=0)
    window_h = max(int(visible_h.max()), 1)
    window_w = max(int(visible_w.max()), 1)
    top = y1.clamp(min=0, max=height - window_h)
    left = x1.clamp(min=0, max=width - window_w)

    rows = interpolation_matrix(y1, y2, top, window_h, padded.size(1))  # [N, window_h, M + 2p]
    cols = interpolation_matrix(x1, x2, left, window_w, padded.size(2))  # [N, window_w, M + 2p]
    with torch.autocast(device.type, enabled=False):  # float32 output, whatever the caller's autocast
        windows = torch.bmm(torch.bmm(rows, padded), cols.transpose(1, 2))  # [N, window_h, window_w]

    # Write each window into its own plane (its pixels outside the box are
    # zeros). `blocks[n, y, x]` is the window_h x window_w block of plane n
    # at (y, x): indexing it with one (top, left) per plane copies whole
    # window rows, far cheaper than indexing every pixel.
    blocks = out.as_strided(
        (num, height - window_h + 1, width - window_w + 1, window_h, window_w),
        (height * width, width, 1, width, 1),
    )
    blocks[torch.arange(num, device=device), top, left] = windows
    return out[:, None]


__all__ = ["paste_masks_in_image", "expand_boxes_to_pixels", "interpolation_matrix"]
