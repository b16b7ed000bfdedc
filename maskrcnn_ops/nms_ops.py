"""Non-maximum suppression with torchvision's interface, plus a fixed-size,
sync-free batched form for CUDA graphs, torch.compile and whole-batch
post-processing."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C

_ops = torch.ops.maskrcnn_ops

# A caller that holds many images' boxes keeps at most this many in one NMS
# call (unless a single image has more): the CUDA kernel's suppression mask is
# quadratic in the boxes of a call (N * ceil(N / 64) 8-byte words: 50 MiB for
# 20,480 boxes, 3.2 GB for 160k boxes, a batch of 16 at torchvision's training
# top-n), and its reduction walks them serially. Segments never cross images,
# so calls over whole images give exactly one call's result. nms_keep_rows
# groups its rows by the same bound itself (csrc/common/nms_limits.h, where
# the value is defined).
NMS_BOXES_PER_CALL: int = _C.nms_boxes_per_call


def image_groups(boxes_per_image: Sequence[int], max_boxes: int = NMS_BOXES_PER_CALL) -> List[Tuple[int, int]]:
    """Consecutive images in groups of at most ``max_boxes`` boxes; an image
    with more is a group of its own, and an image without boxes joins the
    group before it.

    Args:
        boxes_per_image: number of boxes of each image (Python ints, so no
            host sync is needed where the counts come from shapes).
        max_boxes: the bound of a group (``NMS_BOXES_PER_CALL``: see there).

    Returns:
        (first, end) image ranges, covering all images in order.
    """
    groups: List[Tuple[int, int]] = []
    first, boxes = 0, 0
    for image, count in enumerate(boxes_per_image):
        if image > first and count > 0 and boxes + count > max_boxes:
            groups.append((first, image))
            first, boxes = image, 0
        boxes += count
    if len(boxes_per_image) > first:
        groups.append((first, len(boxes_per_image)))
    return groups


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS, as ``torchvision.ops.nms``.

    Args:
        boxes: [N, 4] (x1, y1, x2, y2); float32, float64, float16 or bfloat16
            (IoU computed in float32, float64 for float64).
        scores: [N] floating.
        iou_threshold: a box is discarded when its IoU with a kept box of
            higher score is strictly greater than this.

    Returns:
        int64 [K] indices of the kept boxes by decreasing score; equal scores
        keep their index order. NaN scores rank first (as in ``torch.sort``);
        a box with a NaN or infinite coordinate, or of zero or negative area,
        never suppresses another and is never suppressed (its IoU is never
        above a threshold >= 0). On CUDA this syncs once, for K.
    """
    # torch.ops spelled out (not _ops): TorchScript resolves only that path,
    # and nms / batched_nms script as torchvision's do.
    return torch.ops.maskrcnn_ops.nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each category, as ``torchvision.ops.batched_nms``: one native
    op over all categories (no coordinate offsets, no per-class loop).

    Args:
        boxes: [N, 4]; scores: [N]; idxs: [N] integer category of each box.

    Returns:
        int64 [K] indices of kept boxes by decreasing score (ties by index).
    """
    return torch.ops.maskrcnn_ops.batched_nms(boxes, scores, idxs, float(iou_threshold))


def batched_nms_keep(
    boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, image_ids: Optional[Tensor] = None
) -> Tensor:
    """Keep flags of NMS within each (image, category) segment. Fixed size, no
    host synchronization.

    Args:
        boxes: [N, 4]; scores: [N]; idxs: [N] integer category;
        image_ids: optional [N] integer image of each box, so that the boxes
            of a whole batch are processed in one launch.

    Returns:
        bool [N], True for kept boxes.
    """
    return _ops.batched_nms_keep(boxes, scores, idxs, image_ids, float(iou_threshold))


def nms_keep_rows(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Keep flags of NMS within each row of a fixed-size layout: rows
    (image, FPN level) of RPN candidates, or (image, class) of detections.
    Each row is processed as a segment of ``batched_nms_keep`` is (same IoU
    arithmetic, ties by index within the row), with no host synchronization;
    on CUDA whole rows are launched in groups of at most
    ``NMS_BOXES_PER_CALL`` boxes.

    Args:
        boxes: [S, B, 4] (x1, y1, x2, y2), row s holding B boxes; float32,
            float64, float16 or bfloat16 (IoU in float32, float64 for float64).
        scores: [S, B] floating.
        iou_threshold: a box is discarded when its IoU with a kept box of
            higher score in its row is strictly greater than this.

    Returns:
        bool [S, B], True for kept boxes. A box with a NaN or infinite
        coordinate, or of zero or negative area, suppresses nothing and is
        kept (for a threshold >= 0). S or B may be 0.
    """
    return _ops.nms_keep_rows(boxes, scores, float(iou_threshold))


def batched_nms_padded(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    max_output: int,
    image_ids: Optional[Tensor] = None,
    num_images: int = 1,
) -> Tuple[Tensor, Tensor]:
    """Batched NMS for a whole batch with fixed-size outputs and no host
    synchronization (CUDA-graph capturable).

    NMS runs within each (image, category) segment; then each image keeps its
    best ``max_output`` surviving boxes by decreasing score (ties by index).

    Args:
        boxes: [N, 4]; scores: [N]; idxs: [N] integer category.
        image_ids: [N] integer image index in [0, num_images), or None for one
            image. Boxes of other images are ignored (they cannot be checked
            without a host sync).
        num_images: number of images (rows of the output).

    Returns:
        indices: int64 [num_images, max_output], box indices, padded with -1;
        counts: int64 [num_images], valid entries per row.
    """
    if image_ids is None:
        image_ids = torch.zeros(boxes.size(0), dtype=torch.int64, device=boxes.device)
    keep = batched_nms_keep(boxes, scores, idxs, iou_threshold, image_ids)  # also validates image_ids
    return rank_kept_per_image(keep, scores, image_ids.to(torch.int64), num_images, max_output)


def rank_kept_per_image(
    keep: Tensor, scores: Tensor, image_ids: Tensor, num_images: int, max_output: int
) -> Tuple[Tensor, Tensor]:
    """The best ``max_output`` kept entries of each image by decreasing score
    (ties by index), with no host synchronization.

    Args:
        keep: bool [N]; scores: [N]; image_ids: int64 [N] (entries outside
            [0, num_images) are ignored).

    Returns:
        indices int64 [num_images, max_output] padded with -1, counts int64 [num_images].
    """
    if max_output < 0 or num_images < 1:
        raise ValueError(f"need max_output >= 0 and num_images >= 1, got {max_output} and {num_images}")
    n = keep.size(0)
    device = keep.device
    # Rank the kept boxes of each image by score: order by (image, -score).
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(image_ids[order], stable=True).indices]
    image_sorted = image_ids[order]
    kept_sorted = keep[order].to(torch.int64)
    # Kept boxes before each sorted position, and per image (images are
    # contiguous in the sorted order; searchsorted finds their starts).
    kept_before = torch.cat([kept_sorted.new_zeros(1), torch.cumsum(kept_sorted, 0)])
    image_start = torch.searchsorted(image_sorted, torch.arange(num_images + 1, device=device))
    kept_per_image = kept_before[image_start[1:]] - kept_before[image_start[:-1]]
    rank = kept_before[:-1] - kept_before[image_start[:-1]][image_sorted.clamp(0, num_images - 1)]
    valid = (kept_sorted == 1) & (rank < max_output) & (image_sorted >= 0) & (image_sorted < num_images)
    # Invalid entries go to private slots past the table, so every index is
    # unique; index_put_ (not scatter_) has a deterministic CUDA path.
    slot = torch.where(
        valid, image_sorted * max_output + rank, num_images * max_output + torch.arange(n, device=device)
    )
    table = torch.full((num_images * max_output + n,), -1, dtype=torch.int64, device=device)
    table.index_put_((slot,), order)
    indices = table[: num_images * max_output].view(num_images, max_output)
    return indices, kept_per_image.clamp(max=max_output)
