"""Soft-NMS (Bodla et al., "Soft-NMS -- Improving Object Detection With One
Line of Code", ICCV 2017) as native CPU and CUDA operators, plain and batched
per (image, category).

Where mmcv's ``mmcv.ops.soft_nms`` (mmcv/ops/csrc/pytorch/cpu/nms.cpp,
``softnms_cpu``) differs from these operators:

* **The two methods** are mmcv's, which are the paper's: linear decays where
  ``IoU >= iou_threshold`` (the paper's equation; the authors' released code
  and hard NMS, ours and torchvision's, use ``>``: only an IoU exactly equal
  to the threshold is treated differently), gaussian is
  ``exp(-IoU^2 / sigma)`` for every box, the threshold unused.
* **IoU**: mmcv has an ``offset`` (1 for the legacy "+1 pixel" widths; 0 by
  default); here the IoU is always torchvision's (no offset), computed by the
  same code as ``nms`` (csrc/common/box_iou.h). An IoU that is NaN (a NaN
  coordinate, two zero-area boxes) counts as 0 here; in mmcv it makes a
  gaussian weight NaN.
* **Score threshold**: mmcv tests a box against ``min_score`` only after a
  decay, so its first kept box is kept whatever its score; here every box
  whose score is below ``score_threshold``, initially or after a decay, is
  dropped (a NaN score too; mmcv keeps NaN scores, whose comparisons are
  false). ``score_threshold`` must be >= 0 here (see ``soft_nms``).
* **Ties**: mmcv takes the first maximum in an array it permutes while
  running (swapping kept and dropped boxes), so equal scores are not taken
  in index order; here the lowest index wins, so the result does not depend
  on the input's permutation beyond the index order of equal scores.
* **Output**: mmcv returns ``dets`` [K, 5] (boxes with their decayed scores)
  and the indices; here the indices and the decayed scores (boxes are
  ``boxes[keep]``). Both come in the order kept, which is decreasing decayed
  score.
* **Scope**: mmcv runs on the CPU only (CUDA inputs are copied to the host),
  float32 only, and has a third method, ``"naive"`` (hard NMS with ``>=``);
  here CPU and CUDA, float32/float64/float16/bfloat16 (arithmetic in float32,
  float64 for float64), ``torch.compile``-able, and per-category/per-image
  batching in one call. Hard NMS is ``maskrcnn_ops.nms``.
* **exp**: mmcv calls the C library's; the kernels here share their own
  (csrc/common/soft_nms.h, within about 1.2 ulp), so that CPU and CUDA give
  the same bits and the CPU's decay loop vectorizes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.maskrcnn_ops


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    *,
    sigma: float = 0.5,
    method: str = "gaussian",
    score_threshold: float = 0.001,
) -> Tuple[Tensor, Tensor]:
    """Soft-NMS with exact sequential semantics.

    Repeatedly keeps the box of highest current score (the lowest index among
    equal scores) and multiplies the score of every box still in play by a
    weight of its overlap with the kept box, the IoU (torchvision's, as in
    ``nms``) clamped to [0, 1], NaN counting as 0:

    * ``"linear"``: ``1 - IoU`` where ``IoU >= iou_threshold``, else 1;
    * ``"gaussian"``: ``exp(-IoU^2 / sigma)`` for every box
      (``iou_threshold`` is unused).

    A box leaves when its score is below ``score_threshold``, initially or
    after a decay. The decay runs in float32 (float64 for float64 inputs).
    See the module docstring for how this differs from mmcv's ``soft_nms``.

    Args:
        boxes: [N, 4] (x1, y1, x2, y2); float32, float64, float16 or bfloat16.
        scores: [N], the dtype of boxes.
        iou_threshold: linear only: the IoU above which a score decays.
        sigma: gaussian only: the width, > 0.
        method: ``"gaussian"`` or ``"linear"``.
        score_threshold: >= 0; boxes scoring less are dropped. (Decay moves a
            negative score up, so with negative scores in play the kept scores
            would not come out in decreasing order.)

    Returns:
        keep: int64 [K], indices of the kept boxes;
        scores: [K] their decayed scores, in the dtype of ``scores``;
        both by decreasing decayed score (as computed, in float32 for
        half inputs), ties by index. A NaN score is dropped; a box with a NaN
        or infinite coordinate neither decays another nor is decayed. On CUDA
        this syncs once, for K. Not differentiable.
    """
    return _ops.soft_nms(boxes, scores, float(iou_threshold), float(sigma), method, float(score_threshold))


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    *,
    image_ids: Optional[Tensor] = None,
    sigma: float = 0.5,
    method: str = "gaussian",
    score_threshold: float = 0.001,
) -> Tuple[Tensor, Tensor]:
    """Soft-NMS within each category (and image, with ``image_ids``), in one
    native call: ``soft_nms`` of each (image, category) segment on its own,
    the results merged.

    Args:
        boxes: [N, 4]; scores: [N]; idxs: [N] integer category of each box;
        image_ids: optional [N] integer image of each box, so that a whole
            batch goes through one call (as ``batched_nms_keep``);
        iou_threshold, sigma, method, score_threshold: as ``soft_nms``.

    Returns:
        keep: int64 [K] and scores [K], the kept boxes of all segments by
        decreasing decayed score, ties by index. On the CPU the segments run
        in parallel; on CUDA one thread block per segment.
    """
    return _ops.batched_soft_nms(
        boxes, scores, idxs, image_ids, float(iou_threshold), float(sigma), method, float(score_threshold)
    )
