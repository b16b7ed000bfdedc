"""Pasting the small per-detection masks into the image: the model's last
stage, through the ``maskrcnn_ops::paste_masks`` kernel (torchvision's
geometry, each box's visible pixels computed once; see
``maskrcnn_ops.paste_ops``). The op has a fake kernel with symbolic image
sizes, so this also traces into one graph (torch.compile, torch.export)."""

from __future__ import annotations

from typing import Tuple

from torch import Tensor

import maskrcnn_ops


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int], *, padding: int = 1) -> Tensor:
    """Pastes masks into an image, as torchvision's ``paste_masks_in_image``.

    Args:
        masks: [N, 1, M, M] mask probabilities (any floating dtype).
        boxes: [N, 4] (x1, y1, x2, y2) of the detections in image pixels.
        image_size: (height, width) of the image.
        padding: zero pixels added around each mask before resizing (the box
            grows by the same factor), so the mask fades out at its border.

    Returns:
        [N, 1, height, width] float32 masks, zero outside each box (also
        under autocast). Parts of boxes outside the image are dropped.
    """
    return maskrcnn_ops.paste_masks(masks[:, 0].float(), boxes, image_size, padding=padding)[:, None]


__all__ = ["paste_masks_in_image"]
