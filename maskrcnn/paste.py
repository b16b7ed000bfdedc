"""Pasting the small per-detection masks into the image, for all
detections at once.

torchvision pastes one mask at a time: pad the M x M mask by one pixel,
grow the box by the same factor, round it to integers, resize the mask
bilinearly to the box's size and copy it in. Both ways here give the same
pixels (up to float rounding) for all masks in a few batched operations:

- windows: bilinear resizing is separable, so mask n resized and placed is
  ``Wy[n] @ mask[n] @ Wx[n]^T`` with interpolation matrices that hold the
  exact bilinear weights inside the box and zeros outside it. One window
  as large as the largest box (clipped to the image) serves every mask:
  two batched matrix products, then each window is copied into its plane.
  Cheap per pixel, but the work is N x (largest box).
- ragged: every visible pixel of every box listed once (a flat ragged
  list), its value gathered from the mask's four bilinear taps. The work
  is the sum of the box areas, at a higher cost per pixel.

The window way wins when boxes have similar sizes; the ragged way when a
few large (or long and thin) boxes would make the window much larger than
most boxes -- e.g. one wide and one tall box make it the whole image.
``paste_masks_in_image`` picks the cheaper by counting pixels.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

# How many window elements (each a 2 x (M+2)-long dot product inside a BLAS
# call) cost as much as one ragged pixel (some fifteen gather/arithmetic
# passes): the exchange rate paste_masks_in_image decides by. Tuned with
# benchmarks/model.py; the measurements belong in benchmarks/results.
RAGGED_PIXEL_COST = 8


def expand_boxes_to_pixels(boxes: Tensor, scale: float) -> Tensor:
    """Boxes [N, 4] grown about their centres by ``scale`` and truncated to
    int64 pixel indices (x1, y1, x2, y2), both ends inclusive."""
    centre_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
    centre_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    expanded = torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], dim=1)
    return expanded.to(torch.int64)


def bilinear_taps(offset: Tensor, length: Tensor, source: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where output pixels sample a mask, along one axis, as
    ``F.interpolate(mode="bilinear", align_corners=False)`` resizing
    ``source`` pixels to ``length``.

    Args:
        offset: int64, output pixel index from the box's first pixel (0 .. length - 1).
        length: float32, the box's length in pixels (broadcastable to offset).
        source: the mask's length.

    Returns:
        lower, upper (int64 mask pixel indices) and their weights (float32).
    """
    # Half-pixel centres, clamped at 0 as PyTorch's bilinear kernel does.
    position = ((offset.to(torch.float32) + 0.5) * (source / length) - 0.5).clamp(min=0)
    lower = position.to(torch.int64).clamp(max=source - 1)
    upper = (lower + 1).clamp(max=source - 1)
    upper_weight = (position - lower.to(torch.float32)).clamp(0, 1)
    return lower, upper, 1 - upper_weight, upper_weight


def visible_part(pixels: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """For box pixels [N, 4] (x1, y1, x2, y2 inclusive): the first visible
    row and column and the visible height and width (0 if outside) in an
    image of (height, width)."""
    x1, y1, x2, y2 = pixels.unbind(1)
    top, left = y1.clamp(min=0), x1.clamp(min=0)
    visible_h = (y2.clamp(max=height - 1) - top + 1).clamp(min=0)
    visible_w = (x2.clamp(max=width - 1) - left + 1).clamp(min=0)
    return top, left, visible_h, visible_w


def interpolation_matrix(start: Tensor, end: Tensor, window_start: Tensor, window: int, source: int) -> Tensor:
    """Bilinear resize-and-place weights along one axis.

    Args:
        start, end: [N] int64, first and last (inclusive) output pixel of each box.
        window_start: [N] int64, output pixel of each window's first row.
        window: window length (output pixels computed per mask).
        source: length of the mask being resized.

    Returns:
        [N, window, source] float32: row r of mask n holds the weights of
        output pixel ``window_start[n] + r`` over the mask's pixels for a box
        of length ``end - start + 1`` (at least 1); zero rows outside [start, end].
    """
    n = start.numel()
    device = start.device
    length = (end - start + 1).clamp(min=1).to(torch.float32)
    pixel = window_start[:, None] + torch.arange(window, device=device)[None, :]  # [N, window]
    inside = (pixel >= start[:, None]) & (pixel <= end[:, None])
    lower, upper, lower_weight, upper_weight = bilinear_taps(pixel - start[:, None], length[:, None], source)
    weights = torch.zeros(n, window, source, dtype=torch.float32, device=device)
    weights.scatter_add_(2, lower[..., None], (lower_weight * inside)[..., None])
    weights.scatter_add_(2, upper[..., None], (upper_weight * inside)[..., None])
    return weights


def paste_by_windows(padded: Tensor, pixels: Tensor, out: Tensor, *, whole_image: bool = False) -> None:
    """Writes the resized masks into ``out`` [N, H, W] (zeros) through one
    window size for all masks (see the module docstring).

    Args:
        padded: [N, S, S] float32 masks (already padded).
        pixels: [N, 4] int64 box pixels (x1, y1, x2, y2), inclusive.
        whole_image: make every window the whole image instead of the
            largest box: more work, but no size read from the data, so
            that it traces into a graph with symbolic shapes.
    """
    num, height, width = out.shape
    x1, y1, x2, y2 = pixels.unbind(1)
    if whole_image:
        top = left = torch.zeros_like(x1)
        window_h, window_w = height, width
        rows = interpolation_matrix(y1, y2, top, window_h, padded.size(1))  # [N, H, S]
        cols = interpolation_matrix(x1, x2, left, window_w, padded.size(2))  # [N, W, S]
        out.copy_(torch.bmm(torch.bmm(rows, padded), cols.transpose(1, 2)))
        return
    # One window size covering the largest visible part of any box; each
    # window starts at its box's visible top-left, moved back where it
    # would cross the image border.
    top, left, visible_h, visible_w = visible_part(pixels, height, width)
    window_h = max(int(visible_h.max()), 1)
    window_w = max(int(visible_w.max()), 1)
    top = top.clamp(max=height - window_h)
    left = left.clamp(max=width - window_w)
    rows = interpolation_matrix(y1, y2, top, window_h, padded.size(1))  # [N, window_h, S]
    cols = interpolation_matrix(x1, x2, left, window_w, padded.size(2))  # [N, window_w, S]
    windows = torch.bmm(torch.bmm(rows, padded), cols.transpose(1, 2))  # [N, window_h, window_w]
    # `blocks[n, y, x]` is the window_h x window_w block of plane n at
    # (y, x): indexing it with one (top, left) per plane copies whole window
    # rows, far cheaper than indexing every pixel. A window's pixels outside
    # its box are zeros, and each plane holds one mask.
    blocks = out.as_strided(
        (num, height - window_h + 1, width - window_w + 1, window_h, window_w),
        (height * width, width, 1, width, 1),
    )
    blocks[torch.arange(num, device=out.device), top, left] = windows


def ragged_ranges(first: Tensor, count: Tensor) -> Tuple[Tensor, Tensor]:
    """Concatenated integer ranges ``first[i] .. first[i] + count[i] - 1``:
    returns (owner i of each entry, entry values), both int64 [sum count]."""
    owner = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
    starts = torch.cumsum(count, 0) - count
    values = first[owner] + torch.arange(owner.numel(), device=count.device) - starts[owner]
    return owner, values


def paste_by_pixels(padded: Tensor, pixels: Tensor, out: Tensor) -> None:
    """Writes the resized masks into ``out`` [N, H, W] (zeros) pixel by
    pixel of the boxes' visible parts, as one flat ragged list (see the
    module docstring). Arguments as :func:`paste_by_windows`."""
    num, height, width = out.shape
    source = padded.size(1)
    device = out.device
    x1, y1, x2, y2 = pixels.unbind(1)
    box_h = (y2 - y1 + 1).clamp(min=1).to(torch.float32)
    box_w = (x2 - x1 + 1).clamp(min=1).to(torch.float32)
    top, left, visible_h, visible_w = visible_part(pixels, height, width)

    # Every visible row and every visible column of every box, with its taps.
    row_mask, row_y = ragged_ranges(top, visible_h)
    col_mask, col_x = ragged_ranges(left, visible_w)
    y_lower, y_upper, y_lower_weight, y_upper_weight = bilinear_taps(row_y - y1[row_mask], box_h[row_mask], source)
    x_lower, x_upper, x_lower_weight, x_upper_weight = bilinear_taps(col_x - x1[col_mask], box_w[col_mask], source)
    # Each visible column of each mask, interpolated along x: [columns, S], flat.
    columns = (x_lower_weight[:, None] * padded[col_mask, :, x_lower]
               + x_upper_weight[:, None] * padded[col_mask, :, x_upper]).reshape(-1)

    # The pixels, row by row: a row's pixels are consecutive both in the
    # column table and in the output, so each pixel's two reads and its
    # write are arange(P) plus a per-row constant.
    per_row = visible_w[row_mask]
    row_start = torch.cumsum(per_row, 0) - per_row  # first pixel of each row
    first_column = torch.cumsum(visible_w, 0) - visible_w  # first column of each mask in the table
    column_shift = first_column[row_mask] - row_start
    read_lower = column_shift * source + y_lower
    read_step = y_upper - y_lower
    write_shift = (row_mask * height + row_y) * width + left[row_mask] - row_start
    pixel_row = torch.repeat_interleave(torch.arange(row_mask.numel(), device=device), per_row)
    pixel = torch.arange(pixel_row.numel(), device=device)
    read = pixel * source + read_lower[pixel_row]
    values = torch.addcmul(y_lower_weight[pixel_row] * columns[read], y_upper_weight[pixel_row],
                           columns[read + read_step[pixel_row]])
    out.view(-1)[pixel + write_shift[pixel_row]] = values


def paste_masks_in_image(
    masks: Tensor, boxes: Tensor, image_size: Tuple[int, int], *, padding: int = 1, method: Optional[str] = None
) -> Tensor:
    """Pastes masks into an image, as torchvision's ``paste_masks_in_image``.

    Args:
        masks: [N, 1, M, M] mask probabilities (any floating dtype).
        boxes: [N, 4] (x1, y1, x2, y2) of the detections in image pixels.
        image_size: (height, width) of the image.
        padding: zero pixels added around each mask before resizing (the box
            grows by the same factor), so the mask fades out at its border.
        method: "windows", "pixels", or None to pick the cheaper for these
            boxes (the results are the same); "image": windows the size of
            the image, which reads no size from the data (the choice when
            traced, e.g. under torch.compile).

    Returns:
        [N, 1, height, width] float32 masks, zero outside each box (also
        under autocast). Boxes are expected inside the image, as detections
        are after clipping; parts outside it are dropped.
    """
    if method not in (None, "windows", "pixels", "image"):
        raise ValueError(f"method must be 'windows', 'pixels', 'image' or None, got {method!r}")
    if method is None and torch.compiler.is_compiling():
        method = "image"
    height, width = image_size
    num = masks.size(0)
    out = torch.zeros(num, height, width, dtype=torch.float32, device=masks.device)
    if method != "image" and (num == 0 or height == 0 or width == 0):
        return out[:, None]
    side = masks.size(-1)
    padded = F.pad(masks[:, 0].float(), (padding,) * 4)  # [N, M + 2p, M + 2p]
    pixels = expand_boxes_to_pixels(boxes.float(), float(side + 2 * padding) / side)
    if method is None:
        _, _, visible_h, visible_w = visible_part(pixels, height, width)
        window_pixels = num * int(visible_h.max()) * int(visible_w.max())
        box_pixels = int((visible_h * visible_w).sum())
        method = "windows" if window_pixels <= RAGGED_PIXEL_COST * box_pixels else "pixels"
    with torch.autocast(out.device.type, enabled=False):  # float32 whatever the caller's autocast
        if method == "pixels":
            paste_by_pixels(padded, pixels, out)
        else:
            paste_by_windows(padded, pixels, out, whole_image=method == "image")
    return out[:, None]


__all__ = ["bilinear_taps", "expand_boxes_to_pixels", "interpolation_matrix", "paste_masks_in_image",
           "paste_by_pixels", "paste_by_windows", "ragged_ranges", "visible_part"]
