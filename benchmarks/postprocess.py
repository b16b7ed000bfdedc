"""Post-processing workloads of the benchmark suite: pasting the M x M masks
of detections into the image (``maskrcnn_ops.paste_masks`` against
torchvision's ``paste_masks_in_image``) and their COCO RLE
(``maskrcnn_ops.masks_to_rle`` against pasting, then
``pycocotools.mask.encode``).

The masks are smooth blobs (a sigmoid of the distance to a random centre,
as a mask head's probabilities are), so that few pixels lie near the 0.5
threshold; boxes are detection-like (``benchmarks.common.random_boxes``).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch

import maskrcnn_ops
from benchmarks.common import random_boxes


def blob_masks(num: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """[num, side, side] float32 probabilities: blobs of random centre and size."""
    grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    centre = 0.3 + 0.4 * torch.rand(num, 2, 1, 1, generator=generator)
    radius = 0.2 + 0.25 * torch.rand(num, 1, 1, generator=generator)
    distance = ((grid[None, :, None] - centre[:, 0]) ** 2 + (grid[None, None, :] - centre[:, 1]) ** 2).sqrt()
    return torch.sigmoid(12 * (radius - distance))


def paste_problem(device: str, dtype: torch.dtype, detections: int, image_hw: Tuple[int, int], side: int = 28):
    generator = torch.Generator().manual_seed(2)
    masks = blob_masks(detections, side, generator).to(device=device, dtype=dtype)
    boxes = random_boxes(detections, generator, image_hw).to(device)
    return masks, boxes


def torchvision_paste(masks: torch.Tensor, boxes: torch.Tensor, image_hw) -> torch.Tensor:
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    return paste_masks_in_image(masks[:, None], boxes, image_hw)[:, 0]


def encode(binary: torch.Tensor) -> list:
    """pycocotools.mask.encode of bool masks [D, H, W] (its Fortran-ordered
    [H, W, D] uint8 input, made as any caller must)."""
    from pycocotools import mask as coco_mask

    return coco_mask.encode(np.asfortranarray(binary.cpu().numpy().transpose(1, 2, 0).astype(np.uint8)))


def paste_setup(device, dtype, detections, image_hw, threshold: Optional[float] = None):
    def setup():
        masks, boxes = paste_problem(device, dtype, detections, image_hw)
        ours = lambda: maskrcnn_ops.paste_masks(masks, boxes, image_hw, threshold=threshold)  # noqa: E731
        if threshold is None:
            theirs = lambda: torchvision_paste(masks, boxes, image_hw)  # noqa: E731
        else:
            theirs = lambda: torchvision_paste(masks, boxes, image_hw) > threshold  # noqa: E731

        def agree():
            a, b = ours(), theirs()
            if threshold is None:
                tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
                return bool(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol))
            # Binarized: equal except pixels within 1e-4 of the threshold.
            settled = (torchvision_paste(masks, boxes, image_hw).float() - threshold).abs() > 1e-4
            return bool(torch.equal(a[settled], b[settled]))

        return ours, theirs, agree

    return setup


def rle_setup(device, detections, image_hw, baseline: str) -> Callable:
    """masks_to_rle against pasting ("ours": paste_masks with the threshold;
    "torchvision": paste_masks_in_image, then > 0.5), then pycocotools."""
    def setup():
        from pycocotools import mask as coco_mask

        masks, boxes = paste_problem(device, torch.float32, detections, image_hw)
        ours = lambda: maskrcnn_ops.masks_to_rle(masks, boxes, image_hw)  # noqa: E731
        if baseline == "ours":
            theirs = lambda: encode(maskrcnn_ops.paste_masks(masks, boxes, image_hw, threshold=0.5))  # noqa: E731
        else:
            theirs = lambda: encode(torchvision_paste(masks, boxes, image_hw) > 0.5)  # noqa: E731

        def agree():
            a, b = ours(), theirs()
            if baseline == "ours":
                return all(x["counts"] == y["counts"] for x, y in zip(a, b)) and len(a) == len(b)
            # torchvision's rounding may flip pixels at the threshold.
            return bool(all(coco_mask.iou([x], [y], [0])[0][0] > 0.999 for x, y in zip(a, b)))

        return ours, theirs, agree

    return setup
