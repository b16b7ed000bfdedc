"""RPN proposal generation for a whole batch and all FPN levels at once:
torchvision's ``RegionProposalNetwork`` decode + ``filter_proposals``, with
the same proposals and scores, as a few batched kernels and no host sync
before the final per-image split."""

from __future__ import annotations

import functools
import itertools
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from .boxes import DEFAULT_CLIP, _weights
from .nms_ops import nms_keep_rows, rank_kept_per_image

_ops = torch.ops.maskrcnn_ops
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

ImageSizes = Union[Tensor, Sequence[Tuple[int, int]]]


def flatten_rpn_outputs(objectness: List[Tensor], deltas: List[Tensor]) -> Tuple[Tensor, Tensor, List[int]]:
    """Per-level RPN head outputs -> the anchor order of AnchorGenerator, as
    torchvision's ``concat_box_prediction_layers``.

    Args:
        objectness: per level [N, A, H, W] logits.
        deltas: per level [N, A * 4, H, W].

    Returns:
        objectness [N, sum_l H*W*A], deltas [N, sum_l H*W*A, 4], anchors per level.
    """
    flat_scores, flat_deltas, counts = [], [], []
    for scores, level_deltas in zip(objectness, deltas):
        n, a, h, w = scores.shape
        flat_scores.append(scores.permute(0, 2, 3, 1).reshape(n, -1))
        flat_deltas.append(level_deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
        counts.append(h * w * a)
    return torch.cat(flat_scores, 1), torch.cat(flat_deltas, 1), counts


def _ordered_keys(x: Tensor) -> Tensor:
    """int64 keys with the order of x's values (NaN largest, as torch.topk),
    so that padding can sit strictly below every real value, -inf included."""
    if x.dtype == torch.float64:
        bits = x.view(torch.int64)
        keys = torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    else:
        bits = x.float().view(torch.int32).to(torch.int64)
        keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return keys.masked_fill(torch.isnan(x), _INT64_MAX)


def _level_layout(num_anchors_per_level: Sequence[int], width: int, device) -> Tuple[Tensor, Tensor]:
    """For the padded [L, width] view of the levels (width >= the largest
    level): gather index [L * width] into the flat anchors (0 at pads) and
    pad mask [L * width], on `device`. Made from Python ints by device
    kernels alone (no host-to-device copy, which would synchronize), so
    nothing needs caching."""
    offsets = list(itertools.accumulate(num_anchors_per_level, initial=0))[:-1]
    position = torch.arange(width, device=device)
    pad = torch.stack([position >= size for size in num_anchors_per_level])
    index = torch.stack([torch.arange(offset, offset + width, device=device) for offset in offsets])
    return index.masked_fill(pad, 0).reshape(-1), pad.reshape(-1)


def _image_sizes_tensor(image_sizes: ImageSizes, n: int, device) -> Tensor:
    sizes = torch.as_tensor(image_sizes, dtype=torch.float64, device=device)
    if sizes.shape != (n, 2):
        raise ValueError(f"image_sizes must give (height, width) for each of the {n} images, got shape {tuple(sizes.shape)}")
    return sizes


def _top_candidates(
    objectness: Tensor, num_anchors_per_level: Sequence[int], pre_nms_top_n: int, batched: bool
) -> Tuple[Tensor, Tensor]:
    """Per image and level, the anchors with the ``pre_nms_top_n`` highest
    logits, in decreasing order (torch.topk's order, as torchvision).

    Returns (candidates int64 [N, L * k] indices into the flat anchors, valid
    bool [N, L * k]); k = min(pre_nms_top_n, largest level), and levels with
    fewer anchors are padded with invalid entries.

    ``batched`` (the CUDA path): one top-k over all (image, level) pairs, the
    levels padded to the largest one with keys below every real logit. The
    CPU path runs one top-k per level on views, which needs no padded copy.
    Both give the same candidates up to the order of equal logits (which
    torch.topk leaves unspecified; the batched keys also rank +0.0 above
    -0.0).
    """
    n = objectness.size(0)
    device = objectness.device
    levels = len(num_anchors_per_level)
    # sym_max/sym_min: in a traced graph the level sizes are symbolic, and
    # these keep them so (max/min would fix them with a guard).
    width = functools.reduce(torch.sym_max, num_anchors_per_level, 1)
    k = torch.sym_min(pre_nms_top_n, width)
    if batched:
        index, pad = _level_layout(num_anchors_per_level, width, device)
        keys = _ordered_keys(objectness).index_select(1, index).masked_fill(pad, _INT64_MIN)
        top = keys.view(n, levels, width).topk(k, dim=2).indices  # [N, L, k]
        valid = ~pad.view(1, levels, width).expand(n, levels, width).gather(2, top)
        candidates = index.view(1, levels, width).expand(n, levels, width).gather(2, top)  # 0 at pads
        return candidates.view(n, levels * k), valid.view(n, levels * k)
    # Built by padding and stacking, not by writing into slices: a traced
    # graph would assume the batch is not one image for the in-place copy.
    per_level, valid_per_level = [], []
    offset = 0
    for size in num_anchors_per_level:
        k_level = torch.sym_min(pre_nms_top_n, size)
        top = objectness[:, offset : offset + size].topk(k_level, dim=1).indices
        per_level.append(torch.nn.functional.pad(top + offset, (0, k - k_level)))
        valid_per_level.append(torch.arange(k, device=device) < k_level)
        offset += size
    candidates = torch.stack(per_level, dim=1)
    valid = torch.stack(valid_per_level).reshape(1, levels * k).expand(n, levels * k)
    return candidates.reshape(n, levels * k), valid


def generate_proposals_padded(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    image_sizes: ImageSizes,
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    score_thresh: float = 0.0,
    min_size: float = 1e-3,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = DEFAULT_CLIP,
) -> Tuple[Tensor, Tensor, Tensor]:
    """RPN post-processing for a batch, fixed-size outputs, no host sync.

    Per image and level: the ``pre_nms_top_n`` anchors with the highest
    objectness; their deltas decoded, clipped to the image, boxes with a side
    below ``min_size`` or a score (sigmoid of the logit) below ``score_thresh``
    dropped, NMS at ``nms_thresh`` within each (image, level) (one
    ``nms_keep_rows`` call: rows of candidates); then the best
    ``post_nms_top_n`` of each image by score. The same proposals, scores and
    order as torchvision's ``RegionProposalNetwork`` with these settings.

    Args:
        objectness: [N, A_total] logits in anchor order (see flatten_rpn_outputs).
        deltas: [N, A_total, 4].
        anchors: [A_total, 4] shared by the images, or [N, A_total, 4].
        num_anchors_per_level: A_total split by level.
        image_sizes: [N, 2] or N pairs (height, width) of the unpadded images
            (give a tensor on the device for a call with no host sync at all:
            a Python list is copied to the device).

    Returns:
        boxes [N, post_nms_top_n, 4] and scores [N, post_nms_top_n] (zeros
        past the count), counts int64 [N]. Not differentiable (inputs are
        detached, as in torchvision). Non-finite deltas or logits are dropped
        with their boxes (a NaN box fails the size test, a NaN score the
        threshold), except that NaN logits rank first in the top-k, as in
        torch.topk.
    """
    if objectness.dim() != 2:
        raise ValueError(f"objectness must have shape [N, A] (logits in anchor order), got {tuple(objectness.shape)}")
    n, total = objectness.shape
    if deltas.shape != (n, total, 4):
        raise ValueError(f"deltas must have shape {(n, total, 4)}, got {tuple(deltas.shape)}")
    if anchors.shape not in ((total, 4), (n, total, 4)):
        raise ValueError(f"anchors must have shape {(total, 4)} or {(n, total, 4)}, got {tuple(anchors.shape)}")
    if sum(num_anchors_per_level) != total or min(num_anchors_per_level, default=0) < 0:
        raise ValueError(f"num_anchors_per_level {list(num_anchors_per_level)} does not add up to {total} anchors")
    if post_nms_top_n < 0:
        raise ValueError(f"post_nms_top_n must be >= 0, got {post_nms_top_n}")
    device = objectness.device
    objectness, deltas, anchors = objectness.detach(), deltas.detach(), anchors.detach()
    sizes = _image_sizes_tensor(image_sizes, n, device)
    if n == 0 or total == 0 or pre_nms_top_n <= 0 or post_nms_top_n == 0:
        return (
            deltas.new_zeros(n, post_nms_top_n, 4),
            objectness.new_zeros(n, post_nms_top_n),
            torch.zeros(n, dtype=torch.int64, device=device),
        )
    candidates, valid = _top_candidates(
        objectness, num_anchors_per_level, pre_nms_top_n, batched=objectness.is_cuda
    )
    levels = len(num_anchors_per_level)
    k = candidates.size(1) // max(levels, 1)

    logits = objectness.gather(1, candidates)
    scores = torch.sigmoid(logits)
    cand_deltas = deltas.gather(1, candidates[..., None].expand(n, levels * k, 4))
    if anchors.dim() == 2:
        cand_anchors = anchors[candidates]
    else:
        cand_anchors = anchors.gather(1, candidates[..., None].expand(n, levels * k, 4))
    boxes, keep = _ops.rpn_decode_filter(
        cand_deltas, cand_anchors, scores, sizes, _weights(weights), float(clip), float(min_size), float(score_thresh)
    )
    keep = keep & valid

    # NMS within each (image, level), the rows of k candidates; dropped
    # boxes become NaN, which never suppress anything, and stay dropped
    # through `keep`.
    nms_boxes = boxes.masked_fill(~keep[..., None], float("nan")).view(n * levels, k, 4)
    survives = nms_keep_rows(nms_boxes, scores.view(n * levels, k), nms_thresh).view(n, levels * k) & keep

    flat_scores = scores.reshape(-1)
    image_ids = torch.arange(n, device=device).repeat_interleave(levels * k)
    chosen, counts = rank_kept_per_image(survives.reshape(-1), flat_scores, image_ids, n, post_nms_top_n)
    filled = chosen >= 0
    gather = chosen.clamp(min=0)
    # where(), not a product: the padding must be zero even next to NaN.
    out_boxes = torch.where(filled[..., None], boxes.reshape(-1, 4)[gather], 0)
    out_scores = torch.where(filled, flat_scores[gather], 0)
    return out_boxes, out_scores, counts


def generate_proposals(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    num_anchors_per_level: Sequence[int],
    image_sizes: ImageSizes,
    **settings,
) -> Tuple[List[Tensor], List[Tensor]]:
    """As :func:`generate_proposals_padded` (same arguments), returning one
    [K_i, 4] boxes and one [K_i] scores tensor per image, like torchvision's
    ``filter_proposals``. Syncs once, for the counts."""
    boxes, scores, counts = generate_proposals_padded(
        objectness, deltas, anchors, num_anchors_per_level, image_sizes, **settings
    )
    counts = counts.tolist()
    return [b[:c] for b, c in zip(boxes, counts)], [s[:c] for s, c in zip(scores, counts)]


__all__ = ["flatten_rpn_outputs", "generate_proposals", "generate_proposals_padded"]
