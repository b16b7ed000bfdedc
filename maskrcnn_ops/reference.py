"""Pure-PyTorch reference implementations: the oracles of the tests.

They use no custom kernel, favour clarity over speed (a Python loop over
RoIs), and are differentiable through autograd. Geometry is computed in the
kernels' accumulation precision (float32, float64 for float64 features), with
the same operation order, so sample positions agree bit for bit and results
differ only by summation order.

What has a single pure-PyTorch definition elsewhere in the package is used
from there rather than written again: the FPN level mapping
(``multiscale.fpn_levels``, checked against torchvision's LevelMapper and
against the kernel) and box clipping and the size test
(``boxes.clip_boxes_to_image`` / ``boxes_large_enough``, checked against
torchvision). The references here are independent formulations of what the
kernels compute.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import Tensor

from .boxes import DEFAULT_CLIP, boxes_large_enough, clip_boxes_to_image
from .multiscale import CANONICAL_LEVEL, CANONICAL_SCALE, fpn_levels

MAX_ADAPTIVE_GRID = 1024  # csrc/common/roi_align_math.h: kMaxAdaptiveGrid


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _axis_taps(coord: Tensor, size: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis. coord: [S] sample coordinates.
    Returns (low, high, w_low, w_high), each [S]; weights are zero outside [-1, size]."""
    valid = (coord >= -1) & (coord <= size)
    c = coord.clamp(min=0)
    low = c.floor().clamp(max=max(size - 1, 0)).long()
    at_edge = low >= size - 1
    high = torch.where(at_edge, low, low + 1)
    c = torch.where(at_edge, low.to(c.dtype), c)
    frac = c - low.to(c.dtype)
    zero = torch.zeros_like(frac)
    w_low = torch.where(valid, 1 - frac, zero)
    w_high = torch.where(valid, frac, zero)
    return low.where(valid, 0), high.where(valid, 0), w_low, w_high


def _sample_coordinates(start: Tensor, bin_size: Tensor, bins: int, grid: int) -> Tensor:
    """Coordinates of all samples along one axis, bin-major: [bins * grid]."""
    dtype = start.dtype
    b = torch.arange(bins, dtype=dtype).repeat_interleave(grid)
    i = torch.arange(grid, dtype=dtype).repeat(bins)
    return start + b * bin_size + (i + 0.5) * bin_size / grid


def _adaptive_grid(bin_size: float) -> int:
    if not bin_size > 0:
        return 0
    if bin_size >= MAX_ADAPTIVE_GRID:
        return MAX_ADAPTIVE_GRID
    return math.ceil(bin_size)


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    pool_mode: str = "avg",
) -> Tensor:
    """Reference RoIAlign.

    Args:
        input: [N, C, H, W] features.
        rois: [K, 5] rows of (batch_index, x1, y1, x2, y2).
        pool_mode: "avg" (mean of each bin's samples) or "max" (their
            maximum; the first maximum in sample order gets the gradient).
    Returns:
        [K, C, PH, PW] in input's dtype (computed in the accumulation dtype).
    """
    pooled_h, pooled_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    n, channels, height, width = input.shape
    acc = _accumulate_dtype(input.dtype)
    features = input.to(acc)
    rois_acc = rois.to(acc).cpu()
    scale = torch.tensor(spatial_scale, dtype=acc)
    offset = 0.5 if aligned else 0.0
    outputs = []
    for roi in rois_acc:
        batch = roi[0].item()
        if not (-1 < batch < n):  # truncated toward zero, as in the kernels
            raise ValueError(f"batch index {batch} outside [0, {n})")
        start_w, start_h, end_w, end_h = (roi[1:] * scale - offset).unbind()
        roi_w, roi_h = end_w - start_w, end_h - start_h
        if not aligned:
            roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
        bin_h, bin_w = roi_h / pooled_h, roi_w / pooled_w
        finite = bool(torch.isfinite(torch.stack([start_w, start_h, end_w, end_h])).all())
        if sampling_ratio > 0:
            grid_h = grid_w = sampling_ratio
        else:
            grid_h, grid_w = _adaptive_grid(bin_h.item()), _adaptive_grid(bin_w.item())
        if not finite or height == 0 or width == 0 or grid_h == 0 or grid_w == 0:
            outputs.append(features.new_zeros(channels, pooled_h, pooled_w))
            continue
        ys = _sample_coordinates(start_h, bin_h, pooled_h, grid_h)
        xs = _sample_coordinates(start_w, bin_w, pooled_w, grid_w)
        y_lo, y_hi, wy_lo, wy_hi = (t.to(input.device) for t in _axis_taps(ys, height))
        x_lo, x_hi, wx_lo, wx_hi = (t.to(input.device) for t in _axis_taps(xs, width))
        f = features[int(batch)]

        def corner(yi, xi):
            return f[:, yi[:, None], xi[None, :]]  # [C, Sy, Sx]

        samples = (
            corner(y_lo, x_lo) * (wy_lo[:, None] * wx_lo[None, :])
            + corner(y_lo, x_hi) * (wy_lo[:, None] * wx_hi[None, :])
            + corner(y_hi, x_lo) * (wy_hi[:, None] * wx_lo[None, :])
            + corner(y_hi, x_hi) * (wy_hi[:, None] * wx_hi[None, :])
        )
        # A sample outside the map is 0 whatever the map holds (zero weights
        # times a NaN or Inf at the placeholder index would not be), and
        # passes no gradient.
        inside = ((wy_lo != 0) | (wy_hi != 0))[:, None] & ((wx_lo != 0) | (wx_hi != 0))[None, :]
        samples = torch.where(inside, samples, torch.zeros((), dtype=samples.dtype, device=samples.device))
        bins = samples.reshape(channels, pooled_h, grid_h, pooled_w, grid_w)
        if pool_mode == "max":
            # torch.max over a dim returns (and differentiates) the first maximum.
            per_bin = bins.permute(0, 1, 3, 2, 4).reshape(channels, pooled_h, pooled_w, grid_h * grid_w)
            outputs.append(per_bin.max(dim=-1).values)
        else:
            outputs.append(bins.sum(dim=(2, 4)) / max(grid_h * grid_w, 1))
    if not outputs:
        return input.new_zeros(0, channels, pooled_h, pooled_w)
    return torch.stack(outputs).to(input.dtype)


def multi_level_roi_align(
    features,
    rois: Tensor,
    output_size: Union[int, Tuple[int, int]],
    spatial_scales,
    sampling_ratio: int = -1,
    aligned: bool = False,
    canonical_scale: float = CANONICAL_SCALE,
    canonical_level: int = CANONICAL_LEVEL,
) -> Tensor:
    """Reference multi-level RoIAlign: each RoI through the reference
    roi_align on the level the FPN formula picks. features: list of [N, C,
    H_l, W_l]; rois [K, 5]. Returns [K, C, PH, PW]."""
    pooled_h, pooled_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    acc = _accumulate_dtype(features[0].dtype)
    levels = fpn_levels(rois[:, 1:].to(acc), spatial_scales, canonical_scale=canonical_scale,
                        canonical_level=canonical_level)
    out = features[0].new_zeros(rois.size(0), features[0].size(1), pooled_h, pooled_w)
    for k in range(rois.size(0)):
        level = int(levels[k])
        out[k] = roi_align(features[level], rois[k : k + 1], output_size, spatial_scales[level], sampling_ratio, aligned)[0]
    return out


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    """[A, B] IoU of boxes a [A, 4] and b [B, 4] with torchvision's arithmetic
    (no +1; clamped sides)."""
    ax1, ay1, ax2, ay2 = a.unbind(1)
    bx1, by1, bx2, by2 = b.unbind(1)
    area_a = (ax2 - ax1) * (ay2 - ay1)
    area_b = (bx2 - bx1) * (by2 - by1)
    w = (torch.minimum(ax2[:, None], bx2[None, :]) - torch.maximum(ax1[:, None], bx1[None, :])).clamp(min=0)
    h = (torch.minimum(ay2[:, None], by2[None, :]) - torch.maximum(ay1[:, None], by1[None, :])).clamp(min=0)
    inter = w * h
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _iou_matrix(boxes: Tensor) -> Tensor:
    """[N, N] IoU of boxes [N, 4] with each other."""
    return _box_iou(boxes, boxes)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Reference greedy NMS: the O(N^2) textbook loop.

    boxes [N, 4], scores [N] -> int64 indices of kept boxes by decreasing score
    (ties by index). IoU in float32 (float64 for float64 boxes); a NaN IoU
    never suppresses.
    """
    boxes = boxes.detach().cpu().to(_accumulate_dtype(boxes.dtype))
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    iou = _iou_matrix(boxes[order])
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    kept = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        kept.append(i)
        # Compared in float64, as torchvision's CPU kernel (a float32 IoU
        # against the double threshold).
        suppressed[i + 1 :] |= iou[i, i + 1 :].double() > iou_threshold
    return order[kept].to(scores.device) if kept else torch.zeros(0, dtype=torch.int64, device=scores.device)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Reference NMS per category: a loop over categories, then all kept
    indices by decreasing score (ties by index)."""
    keep = torch.zeros(len(scores), dtype=torch.bool)
    for category in idxs.unique().tolist():
        members = torch.nonzero(idxs.cpu() == category).flatten()
        keep[members[nms(boxes[members.to(boxes.device)], scores[members.to(scores.device)], iou_threshold).cpu()]] = True
    order = torch.sort(scores.detach().cpu(), descending=True, stable=True).indices
    return order[keep[order]].to(scores.device)


def nms_keep_rows(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Reference NMS per row: boxes [S, B, 4], scores [S, B] -> bool [S, B]
    keep flags, each row through ``nms`` on its own."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for row in range(scores.size(0)):
        keep[row, nms(boxes[row], scores[row], iou_threshold).cpu()] = True
    return keep.to(scores.device)


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    *,
    sigma: float = 0.5,
    method: str = "gaussian",
    score_threshold: float = 0.001,
    keep_precision: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Reference soft-NMS: the sequential loop of Bodla et al. 2017, one step
    per kept box.

    boxes [N, 4], scores [N] -> (int64 [K] kept indices, [K] decayed scores in
    scores' dtype) in the order kept, which is by decreasing decayed score,
    ties by index. Each step keeps the box of highest current score (the
    lowest index among equal ones, torch.argmax's first maximum) and
    multiplies the score of every box still in play by the weight of its
    overlap with it: the IoU clamped to [0, 1], NaN as 0; linear: 1 - overlap
    where ``overlap >= iou_threshold`` (compared in float64), gaussian:
    exp(-overlap^2 / sigma). A box whose score is not ``>= score_threshold``
    (compared in float64) leaves. Arithmetic in float32 (float64 for float64
    boxes), in the kernels' operation order; ``keep_precision`` returns the
    scores in that precision, on the CPU.
    """
    acc = _accumulate_dtype(boxes.dtype)
    b = boxes.detach().cpu().to(acc)
    current = scores.detach().cpu().to(acc).clone()
    dead = torch.tensor(-math.inf, dtype=acc)
    current = torch.where(current.double() >= score_threshold, current, dead)
    sigma_t = torch.tensor(sigma, dtype=acc)
    kept, kept_scores = [], []
    while len(current) > 0:
        p = int(torch.argmax(current))
        best = current[p].clone()
        if best == -math.inf:
            break
        kept.append(p)
        kept_scores.append(best)
        current[p] = dead
        overlap = _box_iou(b, b[p : p + 1])[:, 0]
        overlap = torch.where(overlap > 0, overlap.clamp(max=1), torch.zeros_like(overlap))
        if method == "linear":
            weight = torch.where(overlap.double() >= iou_threshold, 1 - overlap, torch.ones_like(overlap))
        else:
            weight = torch.exp(-(overlap * overlap) / sigma_t)
        current = current * weight  # dead boxes: -inf, or NaN (-inf * 0)
        current = torch.where(current.double() >= score_threshold, current, dead)
    kept_scores_t = torch.stack(kept_scores) if kept else current.new_zeros(0)
    # The scores in the computation's precision: batched_soft_nms orders by them.
    if keep_precision:
        return torch.tensor(kept, dtype=torch.int64), kept_scores_t
    return torch.tensor(kept, dtype=torch.int64, device=scores.device), kept_scores_t.to(scores.device, scores.dtype)


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    *,
    image_ids=None,
    sigma: float = 0.5,
    method: str = "gaussian",
    score_threshold: float = 0.001,
) -> Tuple[Tensor, Tensor]:
    """Reference soft-NMS per (image, category) segment: a loop over segments
    through ``soft_nms``, then all kept boxes by decreasing decayed score,
    ties by index."""
    keys = torch.stack([idxs.cpu().long(), (image_ids if image_ids is not None else torch.zeros_like(idxs)).cpu().long()], 1)
    kept, kept_scores = [], []
    for key in torch.unique(keys, dim=0):
        members = torch.nonzero((keys == key).all(1)).flatten()
        k, s = soft_nms(boxes[members.to(boxes.device)], scores[members.to(scores.device)], iou_threshold,
                        sigma=sigma, method=method, score_threshold=score_threshold, keep_precision=True)
        kept.append(members[k])
        kept_scores.append(s)
    if not kept:
        return torch.zeros(0, dtype=torch.int64, device=scores.device), scores.new_zeros(0)
    kept_t, scores_t = torch.cat(kept), torch.cat(kept_scores)
    # By index, then stably by decreasing score (in the computation's
    # precision): ties keep the index order.
    by_index = torch.argsort(kept_t)
    kept_t, scores_t = kept_t[by_index], scores_t[by_index]
    order = torch.sort(scores_t, descending=True, stable=True).indices
    return kept_t[order].to(scores.device), scores_t[order].to(scores.device, scores.dtype)


def decode_boxes(deltas: Tensor, boxes: Tensor, weights=(1.0, 1.0, 1.0, 1.0), clip: float = DEFAULT_CLIP) -> Tensor:
    """Reference decode: deltas [K, 4C] against boxes [K, 4] -> [K, 4C], in
    the accumulation dtype, returned in deltas' dtype."""
    acc = _accumulate_dtype(deltas.dtype)
    d = deltas.to(acc).reshape(deltas.size(0), deltas.size(1) // 4, 4)
    b = boxes.to(acc)[:, None, :]
    w = torch.tensor(weights, dtype=acc, device=deltas.device)
    width, height = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    ctr_x, ctr_y = b[..., 0] + 0.5 * width, b[..., 1] + 0.5 * height
    dx, dy = d[..., 0] / w[0], d[..., 1] / w[1]
    dw = torch.clamp(d[..., 2] / w[2], max=clip)
    dh = torch.clamp(d[..., 3] / w[3], max=clip)
    cx, cy = dx * width + ctr_x, dy * height + ctr_y
    half_w, half_h = 0.5 * (torch.exp(dw) * width), 0.5 * (torch.exp(dh) * height)
    out = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)
    return out.reshape(deltas.shape).to(deltas.dtype)


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Reference encode: targets [K, 4] of reference_boxes relative to proposals."""
    acc = _accumulate_dtype(reference_boxes.dtype)
    r, p = reference_boxes.to(acc), proposals.to(acc)
    wx, wy, ww, wh = weights
    ex_w, ex_h = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    ex_x, ex_y = p[:, 0] + 0.5 * ex_w, p[:, 1] + 0.5 * ex_h
    gt_w, gt_h = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
    gt_x, gt_y = r[:, 0] + 0.5 * gt_w, r[:, 1] + 0.5 * gt_h
    out = torch.stack(
        [wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h, ww * torch.log(gt_w / ex_w), wh * torch.log(gt_h / ex_h)],
        dim=1,
    )
    return out.to(reference_boxes.dtype)


def generate_proposals(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    num_anchors_per_level,
    image_sizes,
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    score_thresh: float = 0.0,
    min_size: float = 1e-3,
    weights=(1.0, 1.0, 1.0, 1.0),
    clip: float = DEFAULT_CLIP,
):
    """Reference RPN post-processing, the textbook loop: per image, per level
    top-k; decode; clip; drop small boxes and low scores; NMS per level; the
    best post_nms_top_n by score. Returns (boxes list, scores list)."""
    all_boxes, all_scores = [], []
    for image in range(objectness.size(0)):
        height, width = (float(v) for v in image_sizes[image])
        image_anchors = anchors if anchors.dim() == 2 else anchors[image]
        cand_boxes, cand_scores, cand_levels = [], [], []
        offset = 0
        for level, size in enumerate(num_anchors_per_level):
            logits = objectness[image, offset : offset + size]
            top = logits.topk(min(pre_nms_top_n, size)).indices + offset
            boxes = decode_boxes(deltas[image, top], image_anchors[top], weights, clip)
            cand_boxes.append(clip_boxes_to_image(boxes, (height, width)))
            cand_scores.append(torch.sigmoid(objectness[image, top]))
            cand_levels.append(torch.full((len(top),), level, dtype=torch.int64))
            offset += size
        boxes, scores, levels = torch.cat(cand_boxes), torch.cat(cand_scores), torch.cat(cand_levels)
        keep = boxes_large_enough(boxes, min_size) & (scores >= score_thresh)
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        kept = batched_nms(boxes, scores, levels.to(boxes.device), nms_thresh)[:post_nms_top_n]
        all_boxes.append(boxes[kept])
        all_scores.append(scores[kept])
    return all_boxes, all_scores


PASTE_COORDINATE_LIMIT = 2.0 ** 40  # csrc/common/paste_math.h: kPasteCoordinateLimit


def _paste_weights(pixel: Tensor, start: Tensor, end: Tensor, length: Tensor, source: int, valid: Tensor,
                   dtype: torch.dtype) -> Tensor:
    """Bilinear resize-and-place weights along one axis, as
    upsample_bilinear2d (half-pixel centres, clamped at 0; an equal size
    copies) resizing ``source`` padded pixels to each box's ``length``.

    Args:
        pixel: [L] image pixel indices; start, end, length: [D] int64, each
            box's first and last (inclusive) pixel and its length (>= 1);
            valid: [D] bool, boxes that paste at all.

    Returns:
        [D, L, source]: row l of box d holds the weights of pixel l over the
        padded mask's pixels; zero rows outside the box.
    """
    offset = pixel[None, :] - start[:, None]  # [D, L]
    inside = (pixel[None, :] >= start[:, None]) & (pixel[None, :] <= end[:, None]) & valid[:, None]
    ratio = torch.full_like(length, source, dtype=dtype) / length.to(dtype)
    position = (ratio[:, None] * (offset.to(dtype) + 0.5) - 0.5).clamp(min=0)
    position = torch.where((length == source)[:, None], offset.to(dtype), position)
    low = position.floor().clamp(0, source - 1).to(torch.int64)
    high = torch.where(low < source - 1, low + 1, low)
    w_high = (position - low.to(dtype)).clamp(0, 1)
    taps = torch.arange(source, device=pixel.device)
    weights = (taps == low[..., None]).to(dtype) * (1 - w_high)[..., None]
    weights = weights + (taps == high[..., None]).to(dtype) * w_high[..., None]
    return weights * inside[..., None].to(dtype)


def paste_masks(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int], *, threshold=None,
                padding: int = 1) -> Tensor:
    """Reference paste: masks [D, M, M] into [D, H, W] (bool, pixel >
    threshold, with a threshold; else masks' dtype) with torchvision's
    geometry (see ``maskrcnn_ops.paste_ops``), written densely as
    ``rows @ padded mask @ cols^T`` with interpolation matrices that are zero
    outside each box, in the accumulation precision. No data-dependent
    shape, so it also traces (the ONNX export's decomposition of
    paste_masks, ``maskrcnn_ops.export``); memory is D x (H + W) x S plus the
    D x H x W result."""
    height, width = image_size
    dtype = _accumulate_dtype(masks.dtype)
    side = masks.size(-1)
    source = side + 2 * padding
    b = boxes.to(dtype)
    scale = (side + 2 * padding) / side
    half_w, half_h = (b[:, 2] - b[:, 0]) * 0.5 * scale, (b[:, 3] - b[:, 1]) * 0.5 * scale
    centre_x, centre_y = (b[:, 2] + b[:, 0]) * 0.5, (b[:, 3] + b[:, 1]) * 0.5
    grown = torch.stack([centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h], 1)
    valid = grown.isfinite().all(1)
    pixels = grown.nan_to_num(0.0).clamp(-PASTE_COORDINATE_LIMIT, PASTE_COORDINATE_LIMIT).to(torch.int64)
    x1, y1, x2, y2 = pixels.unbind(1)
    device = masks.device
    rows = _paste_weights(torch.arange(height, device=device), y1, y2, (y2 - y1 + 1).clamp(min=1), source, valid,
                          dtype)
    cols = _paste_weights(torch.arange(width, device=device), x1, x2, (x2 - x1 + 1).clamp(min=1), source, valid,
                          dtype)
    padded = torch.nn.functional.pad(masks.to(dtype), (padding,) * 4)
    out = torch.bmm(torch.bmm(rows, padded), cols.transpose(1, 2))
    if threshold is not None:
        return out > threshold
    return out.to(masks.dtype)


def rle_counts(mask: Tensor) -> list:
    """Run lengths of a binary mask [H, W] in column-major order, starting
    with a run of zeros (COCO's uncompressed counts)."""
    flat = mask.t().reshape(-1).to(torch.int8)
    changes = (torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1).tolist()
    edges = [0] + changes + [flat.numel()]
    counts = [b - a for a, b in zip(edges[:-1], edges[1:])]
    return ([0] + counts) if flat.numel() and bool(flat[0]) else (counts or [0])


def compress_rle_counts(counts: list) -> bytes:
    """COCO's compressed string of run lengths: each count from the third
    on as its difference from the count two before, in signed 5-bit groups
    (least significant first), each a character 48 + group, 0x20 set while
    more groups follow."""
    out = bytearray()
    for i, count in enumerate(counts):
        x = count - (counts[i - 2] if i > 2 else 0)
        while True:
            group = x & 0x1F
            x >>= 5
            more = x != -1 if group & 0x10 else x != 0
            out.append(48 + (group | 0x20 if more else group))
            if not more:
                break
    return bytes(out)


def masks_to_rle(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int], threshold: float = 0.5, *,
                 padding: int = 1) -> list:
    """Reference RLE: the reference paste, binarized, run-length encoded."""
    pasted = paste_masks(masks, boxes, image_size, threshold=threshold, padding=padding).cpu()
    return [{"size": [int(image_size[0]), int(image_size[1])], "counts": compress_rle_counts(rle_counts(m))}
            for m in pasted]


KEYPOINT_MAP_LIMIT = 4096  # csrc/common/keypoint_math.h: kMaxKeypointMapSide


def _keypoint_map_side(extent: float) -> int:
    """Resized length of an axis of ``extent`` (>= 1 or non-finite) pixels."""
    if not math.isfinite(extent):
        return 1
    return min(math.ceil(extent), KEYPOINT_MAP_LIMIT)


def _cubic_taps(source: int, length: int, weight_dtype: torch.dtype, dtype: torch.dtype,
                device: torch.device) -> Tuple[Tensor, Tensor]:
    """Bicubic taps (A = -0.75, align_corners=False) of ``length`` output
    samples over ``source`` input samples, one tensor operation per
    arithmetic operation of ATen's CPU kernel, so every rounding is its own
    (its floor in float32 precision, weights rounded to the input dtype).

    Returns:
        index: [length, 4] int64 input samples (clamped to the axis);
        weight: [length, 4] in ``dtype``.
    """
    scale = torch.tensor(float(source), dtype=dtype, device=device) / torch.tensor(float(length), dtype=dtype,
                                                                                      device=device)
    position = scale * (torch.arange(length, dtype=dtype, device=device) + 0.5) - 0.5
    floor = position.float().floor().to(torch.int64).clamp(max=source - 1)
    t = (position - floor.to(dtype)).clamp(0, 1)
    mirrored = 1 - t

    def near(x):
        return (1.25 * x - 2.25) * x * x + 1

    def far(x):
        return ((-0.75 * x + 3.75) * x - 6) * x + 3

    weight = torch.stack([far(t + 1), near(t), near(mirrored), far(mirrored + 1)], dim=1)
    index = (floor[:, None] + torch.arange(-1, 3, device=device)).clamp(0, source - 1)
    return index, weight.to(weight_dtype).to(dtype)


def _bicubic_resize(maps: Tensor, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """maps [K, H, W] resized to [K, height, width] as upsample_bicubic2d on
    the CPU computes it (see _cubic_taps), in ``dtype``, rounded to maps' dtype."""
    ys, wy = _cubic_taps(maps.size(1), height, maps.dtype, dtype, maps.device)
    xs, wx = _cubic_taps(maps.size(2), width, maps.dtype, dtype, maps.device)
    values = maps.to(dtype)
    rows = values[:, :, xs[:, 0]] * wx[:, 0]  # [K, H, width], the taps summed in order
    for i in range(1, 4):
        rows = rows + values[:, :, xs[:, i]] * wx[:, i]
    out = rows[:, ys[:, 0], :] * wy[:, 0, None]
    for j in range(1, 4):
        out = out + rows[:, ys[:, j], :] * wy[:, j, None]
    return out.to(maps.dtype).to(dtype)


def heatmaps_to_keypoints(heatmaps: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """Reference keypoint decoding (``maskrcnn_ops.keypoint_ops``): heatmaps
    [D, K, H, W], boxes [D, 4] -> (keypoints [D, K, 3] of (x, y, 1), scores
    [D, K]) in the accumulation dtype. A Python loop over RoIs, each RoI's
    maps resized in full (torchvision's formulation) with the kernels'
    arithmetic, so results equal the op's bit for bit on every CPU."""
    dtype = _accumulate_dtype(heatmaps.dtype)
    rois, per_roi = heatmaps.shape[:2]
    keypoints = torch.ones((rois, per_roi, 3), dtype=dtype, device=heatmaps.device)
    scores = torch.zeros((rois, per_roi), dtype=dtype, device=heatmaps.device)
    if per_roi == 0:
        return keypoints, scores
    b = boxes.to(dtype)
    extents = (b[:, 2:] - b[:, :2]).clamp(min=1)  # [D, 2] width, height; NaN stays NaN
    for i in range(rois):
        width, height = extents[i]
        side_w, side_h = _keypoint_map_side(float(width)), _keypoint_map_side(float(height))
        resized = _bicubic_resize(heatmaps[i], side_h, side_w, dtype).reshape(per_roi, -1)
        position = resized.argmax(dim=1)
        column, row = position % side_w, position // side_w
        keypoints[i, :, 0] = (column.to(dtype) + 0.5) * (width / side_w) + b[i, 0]
        keypoints[i, :, 1] = (row.to(dtype) + 0.5) * (height / side_h) + b[i, 1]
        scores[i] = resized.gather(1, position[:, None])[:, 0]
    return keypoints, scores
