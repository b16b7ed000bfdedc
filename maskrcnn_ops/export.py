"""Export of models that call maskrcnn_ops: ``torch.export`` and ONNX.

``torch.export`` needs nothing from here: every op has a fake kernel
(``_fake.py``), so ``torch.export.export`` traces a module that calls
:func:`maskrcnn_ops.roi_align` or :func:`maskrcnn_ops.nms` with dynamic
shapes (NMS returns a data-dependent number of indices, an unbacked size).

ONNX has standard operators for both, box coding is elementwise
arithmetic and keypoint decoding a Loop of Resize and ArgMax, so
``torch.onnx.export(..., dynamo=True)`` maps our ops onto standard ONNX
through the translation table built here::

    onnx_program = torch.onnx.export(
        model, args, dynamo=True,
        custom_translation_table=maskrcnn_ops.onnx_translation_table())

=================================  ==========================================
maskrcnn_ops op                    ONNX
=================================  ==========================================
``roi_align``                      ``RoiAlign`` (opset 16, avg mode):
                                   ``coordinate_transformation_mode``
                                   "half_pixel" when aligned, else
                                   "output_half_pixel"; rois [K, 4] and
                                   batch_indices int64 [K] split from our
                                   [K, 5]; ``sampling_ratio <= 0`` -> 0
                                   (adaptive, the same rule as ours)
``nms``                            ``NonMaxSuppression``: boxes [1, N, 4],
                                   scores [1, 1, N], at most N kept; the
                                   box-index column of the selected triples
``batched_nms``                    ``NonMaxSuppression`` with one class per
                                   category (scores [1, C, N], -inf outside
                                   the category; C = largest category + 1),
                                   then the kept boxes ordered by decreasing
                                   score, equal scores by index (``TopK``)
``nms_keep_rows``                  ``NonMaxSuppression`` with the rows as its
                                   batch: boxes [S, B, 4], scores [S, 1, B]
                                   = minus each box's rank in its row
                                   (``TopK``, ``ScatterElements``), at most
                                   B kept per row; the selected (row, box)
                                   pairs set in a False [S, B] (``ScatterND``)
``multi_level_roi_align``          each RoI's FPN level computed in the graph
(``MultiScaleRoIAlign``)           (the kernel's formula), then per level a
                                   ``RoiAlign`` over that level's RoIs
                                   (``NonZero``, ``Gather``) scattered into
                                   the output (``ScatterND``)
``decode_boxes``                   the kernel's arithmetic on (x, y) pairs
                                   (``Div``, ``Where`` for the clamp at clip,
                                   ``Exp``, ``Mul``, ``Add``, ``Sub``) over
                                   deltas [K, C, 4] against boxes [K, 1, 4]
``rpn_decode_filter``              the same decode against the anchors, then
                                   the image clip (``Where``, limits
                                   ``Gather``-ed from image_sizes) and keep =
                                   both sides >= min_size ``And`` score >=
                                   score_thresh (``GreaterOrEqual``)
``heatmaps_to_keypoints``          an ONNX ``Loop`` over the detections
                                   (``_onnx_keypoint_maxima``): ``Resize``
                                   (cubic, A = -0.75, "half_pixel",
                                   exclude_outside=0) of the detection's
                                   maps to its box's size, ``ArgMax`` (first
                                   maximum, NaN first), ``GatherElements``;
                                   the sizes and the coordinates elementwise
``aten::sort.stable``              ``TopK`` over the whole dimension
``aten::searchsorted.Tensor``      the number of the sequence's entries
                                   below (right: not above) each value
                                   (``Less``, ``ReduceSum``)
``aten::repeat_interleave``        ``Expand`` with the count after dim,
(``.self_int``)                    ``Reshape``
=================================  ==========================================

``paste_masks`` has no ONNX counterpart and is not translated: before the
ONNX export, ``program.run_decompositions(maskrcnn_ops.onnx_decompositions())``
replaces it by its dense pure-PyTorch formulation
(``maskrcnn_ops.reference.paste_masks``: interpolation matrices that are
zero outside each box, two batched matrix products), which the exporter
turns into standard ONNX. It gives the kernel's pixels up to float
rounding (binarized: except values within float rounding of the threshold),
assumes finite mask values (a NaN spreads along its matrix row), and costs
D x H x W x (M + 2) multiply-adds instead of the boxes' areas.

The three ATen ops are ones our code calls (``rank_kept_per_image``, the
image index of proposals, RoIs and detections) that torchlib (onnxscript
0.7) leaves untranslated, or, for ``repeat_interleave`` with a symbolic
count, puts the count on the wrong axis of its Expand (it fails in
onnxruntime).

Semantics, as checked against onnxruntime (CPU) by ``tests/test_export.py``:

- RoiAlign computes what ours does for both alignments, including the
  1-pixel minimum box size of ``aligned=False`` and boxes that are empty,
  inverted or past the edges, in float32 or float64 (a few ulps apart: the
  samples are summed in another order). float16 and bfloat16 features are
  computed in float32 and cast back, as our kernels accumulate (ONNX's
  RoiAlign-16 has no bfloat16).
- The FPN level of a RoI uses log(x) / log(2) (ONNX has no Log2), within an
  ulp or two of log2; only a box whose level formula lands that close to an
  integer could change level (the formula's 1e-6 margin covers the exact
  powers of two, e.g. a 224x224 box).
- NonMaxSuppression keeps a box unless its IoU with a kept box of higher
  score is strictly above the threshold, as ours, with the same float32
  arithmetic (boxes and scores are cast; half types exactly). The
  threshold goes in as the largest float32 not above ours, which is how
  ours compares, so float32 and half boxes get our flags bit for bit;
  float64 boxes, which ours compares in float64, may be decided
  differently when an IoU is within float32 rounding of the threshold.
  Thresholds above 1 act as 1 (nothing suppressed, as in ours); negative
  ones are refused at export (onnxruntime takes [0, 1]).
- A box ours cannot overlap (a NaN or infinite coordinate, zero or negative
  width or height: also inverted boxes, which onnxruntime would sort the
  corners of) goes in as (0, 0, 0, 0): it suppresses nothing and is never
  suppressed, so ``nms_keep_rows`` keeps it and ``nms`` lists it, as ours.
- Order: ``nms_keep_rows`` feeds NonMaxSuppression each box's rank in our
  order (decreasing score, ties by index, NaN first, -0.0 equal to +0.0;
  float64 scores compared in float64), so it visits the boxes in our order
  whatever the ties (ranks are exact float32 for up to 2**24 boxes a row).
  ``nms`` and ``batched_nms`` pass the scores (float32), and among equal
  scores onnxruntime's NMS visits boxes in no set order, so with ties the
  kept set may differ; give distinct scores for identical results. A box
  scored NaN or -inf is dropped by ``batched_nms``'s category masking (ours
  keeps it).
- ``aten::sort`` is stable whether asked or not (NaN after +inf, as torch);
  ``aten::searchsorted`` compares every value with every entry (meant for
  few values, as ``rank_kept_per_image``'s image starts; exact without NaN).
- Box decoding does the kernel's operations (``csrc/common/box_coder.h``) in
  the same order and type: float64 for float64 deltas, float32 for the
  others (boxes, anchors, scores and image sizes are cast to it; weights,
  clip, min_size and score_thresh are constants rounded to it, as the
  kernel's casts), outputs in the deltas' dtype. Clamps are ``Where``
  selections, so NaN stays NaN as in ours (and is never kept); +inf dw is
  clamped at clip and -inf gives a side of 0. Only ``Exp`` differs:
  onnxruntime's is within 1 ulp of the libm exp ours calls in float32, 2 ulps
  in float64, so a coordinate may differ by a few eps of max(|x1|, |x2|)
  of its box (``y`` alike; measured under 2 eps, the tests allow 4). Half
  types, computed in float32 and rounded as ours, almost always come out
  equal (at most 1 ulp apart).
- ``heatmaps_to_keypoints`` resizes as ATen's bicubic upsampling with
  align_corners=False ("half_pixel" is ATen's source position for every
  size; "pytorch_half_pixel" samples 0 for a side of 1), with onnxruntime's
  own arithmetic: resized values differ by up to 4.4e-6 of the map's largest
  magnitude (measured), so scores differ by as much, and a map whose maximum
  is that close to another value may have its keypoint at the other. Map
  sides, coordinates and the NaN rule are the kernel's (float32 boxes, or
  float64 for float64 heatmaps); the maps are resized in float32 (onnxruntime
  has no float64 Resize; half types are rounded back to their type, as
  torch's). A static K of 0 gives empty outputs without a Loop; D = 0 runs
  no iteration.
- ``rpn_decode_filter`` rounds the decoded boxes to the deltas' dtype, clips
  (x to [0, width], y to [0, height]), rounds again and tests the stored
  boxes, as the kernel. Scores compare exactly; a box whose side is within
  the decode's difference of min_size may be flagged differently.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import torch

from .keypoint_ops import MAX_KEYPOINT_MAP_SIDE
from .multiscale import LEVEL_EPS, first_pyramid_level

# ONNX RoiAlign-16 computes in the features' type, which must be one of
# these; other dtypes are computed in float32 and cast back.
_ROI_ALIGN_COMPUTE_TYPES = ("FLOAT", "DOUBLE")


def _onnx_roi_align_inputs(features, rois):
    """Our rois [K, 5] -> ONNX RoiAlign's (corners [K, 4], batch_indices int64
    [K]), in the type the features are computed in (float32 for half types)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    compute_type = features.dtype if features.dtype.name in _ROI_ALIGN_COMPUTE_TYPES else ir.DataType.FLOAT
    rois = op.Cast(rois, to=compute_type)
    batch_indices = op.Cast(op.Squeeze(op.Slice(rois, [0], [1], [1]), [1]), to=ir.DataType.INT64)
    corners = op.Slice(rois, [1], [5], [1])  # (x1, y1, x2, y2)
    return corners, batch_indices, compute_type


def _onnx_roi_align(features, corners, batch_indices, compute_type, *, spatial_scale, pooled_height,
                    pooled_width, sampling_ratio, aligned):
    """ONNX RoiAlign of features [N, C, H, W] in compute_type -> [K, C, PH, PW] in compute_type."""
    from onnxscript import opset18 as op

    if features.dtype != compute_type:
        features = op.Cast(features, to=compute_type)
    return op.RoiAlign(
        features,
        corners,
        batch_indices,
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
        mode="avg",
        output_height=pooled_height,
        output_width=pooled_width,
        sampling_ratio=max(sampling_ratio, 0),
        spatial_scale=spatial_scale,
    )


def _roi_align_to_onnx(
    input,
    rois,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
):
    """maskrcnn_ops::roi_align(input [N, C, H, W], rois [K, 5]) -> [K, C, PH, PW]
    as ONNX RoiAlign."""
    from onnxscript import opset18 as op

    corners, batch_indices, compute_type = _onnx_roi_align_inputs(input, rois)
    pooled = _onnx_roi_align(
        input, corners, batch_indices, compute_type, spatial_scale=spatial_scale, pooled_height=pooled_height,
        pooled_width=pooled_width, sampling_ratio=sampling_ratio, aligned=aligned,
    )
    return pooled if compute_type == input.dtype else op.Cast(pooled, to=input.dtype)


def _fpn_level_index(corners, *, first_level: int, num_levels: int, canonical_scale: float, canonical_level: int):
    """Index into the pyramid (0 = finest) of each box [K, 4], int64 [K]:
    ``multiscale.fpn_levels`` (the kernel's formula) written in ONNX
    operators, in the boxes' precision; tests/test_export.py checks the two
    agree. ONNX has no Log2: log(x) / log(2) is within an ulp or two of it,
    far inside the LEVEL_EPS margin for boxes whose log2 is an integer."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    x1, y1, x2, y2 = (op.Squeeze(op.Slice(corners, [i], [i + 1], [1]), [1]) for i in range(4))
    size = op.Sqrt(op.Mul(op.Sub(x2, x1), op.Sub(y2, y1)))

    def constant(value: float):
        return op.CastLike(op.Constant(value_float=value), size)

    log2_ratio = op.Div(op.Log(op.Div(size, constant(canonical_scale))), op.Log(constant(2.0)))
    level = op.Floor(op.Add(op.Add(constant(float(canonical_level)), log2_ratio), constant(LEVEL_EPS)))
    level = op.Clip(level, constant(float(first_level)), constant(float(first_level + num_levels - 1)))
    level = op.Sub(level, constant(float(first_level)))
    level = op.Where(op.IsNaN(level), constant(0.0), level)
    return op.Cast(level, to=ir.DataType.INT64)


def _multi_level_roi_align_to_onnx(
    features,
    rois,
    spatial_scales: Sequence[float],
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
    canonical_scale: float,
    canonical_level: int,
):
    """maskrcnn_ops::multi_level_roi_align(features [N, C, H_l, W_l] per level,
    rois [K, 5]) -> [K, C, PH, PW]: each RoI's level from the FPN formula, then
    per level one RoiAlign over the RoIs of that level (NonZero, Gather),
    scattered into the output (ScatterND)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    first = features[0]
    corners, batch_indices, compute_type = _onnx_roi_align_inputs(first, rois)
    first_level = first_pyramid_level(spatial_scales)
    level = _fpn_level_index(  # in the corners' float32 (float64 for float64 features), as the kernel
        corners,
        first_level=first_level,
        num_levels=len(features),
        canonical_scale=canonical_scale,
        canonical_level=canonical_level,
    )
    shape = op.Concat(
        op.Shape(rois, start=0, end=1),
        op.Shape(first, start=1, end=2),
        op.Constant(value_ints=[pooled_height, pooled_width]),
        axis=0,
    )
    pooled = op.ConstantOfShape(shape, value=ir.tensor([0.0], dtype=compute_type))
    for index, (level_features, scale) in enumerate(zip(features, spatial_scales)):
        members = op.Reshape(op.NonZero(op.Equal(level, op.Constant(value_int=index))), [-1, 1])  # [M, 1]
        member_ids = op.Reshape(members, [-1])
        pooled_here = _onnx_roi_align(
            level_features,
            op.Gather(corners, member_ids),
            op.Gather(batch_indices, member_ids),
            compute_type,
            spatial_scale=scale,
            pooled_height=pooled_height,
            pooled_width=pooled_width,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
        )
        pooled = op.ScatterND(pooled, members, pooled_here)
    return pooled if compute_type == first.dtype else op.Cast(pooled, to=first.dtype)


def _opmath_type(value):
    """float64 for float64 values, float32 for the others (at::opmath_type):
    the type box coding computes in and NMS orders scores in, as the kernels."""
    from onnxscript import ir

    return ir.DataType.DOUBLE if value.dtype == ir.DataType.DOUBLE else ir.DataType.FLOAT


def _as_type(value, dtype):
    """value cast to dtype (no Cast node when it already is)."""
    from onnxscript import opset18 as op

    return value if value.dtype == dtype else op.Cast(value, to=dtype)


def _pair(boxes, start: int):
    """Columns start and start + 1 of boxes [..., 4]: [..., 2]."""
    from onnxscript import opset18 as op

    return op.Slice(boxes, [start], [start + 2], [-1])


def _onnx_nms_boxes(boxes):
    """Boxes [..., 4] as NonMaxSuppression takes them: in float32 (the only
    type onnxruntime's takes; half types convert exactly, as our kernels
    convert them), and (0, 0, 0, 0) for each box that cannot overlap
    anything in ours (``can_overlap`` in csrc/common/box_iou.h: no finite
    positive width, height and area, so NaN, infinite, empty and inverted
    boxes). onnxruntime finds no intersection with such a point, so it
    neither suppresses nor is suppressed, as in ours; left as they are,
    onnxruntime would sort an inverted box's corners and give it an area.
    ONNX calls the corners (y1, x1, y2, x2); the IoU is the same with x and
    y swapped, so our (x1, y1, x2, y2) go in as they are."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    boxes = op.Cast(boxes, to=ir.DataType.FLOAT)
    size = op.Sub(_pair(boxes, 2), _pair(boxes, 0))  # (width, height)
    width, height = (op.Slice(size, [i], [i + 1], [-1]) for i in range(2))
    zero = op.Constant(value_float=0.0)
    overlaps = op.And(  # False where a side is NaN
        op.And(op.Greater(width, zero), op.Greater(height, zero)), op.Not(op.IsInf(op.Mul(width, height)))
    )
    return op.Where(overlaps, boxes, zero)


def _onnx_iou_threshold(iou_threshold: float):
    """NonMaxSuppression's iou_threshold input: the largest float32 not above
    ours (``threshold_as<float>`` in csrc/common/box_iou.h), so that its
    float32 test ``iou > t`` decides as ours does for IoUs computed in
    float32. onnxruntime rejects thresholds outside [0, 1]: one above 1
    suppresses nothing in ours (IoU <= 1), as 1 does; a negative one has no
    translation (ours then suppresses boxes that do not even touch)."""
    from onnxscript import opset18 as op

    if not iou_threshold >= 0:
        raise ValueError(f"maskrcnn_ops ONNX export: NMS iou_threshold must be >= 0, got {iou_threshold}")
    threshold = torch.tensor(min(iou_threshold, 1.0), dtype=torch.float32)
    if threshold.item() > iou_threshold:
        threshold = torch.nextafter(threshold, torch.tensor(-math.inf))
    return op.Constant(value_floats=[threshold.item()])


def _kept_by_onnx_nms(boxes, scores_per_class, iou_threshold: float, score_threshold=None):
    """ONNX NonMaxSuppression of boxes [N, 4] (any float type) with one row of
    scores per class [C, N], at most N kept per class, in float32. Returns
    the kept box indices int64 [K], class by class, by decreasing score
    within a class."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    inputs = [
        op.Unsqueeze(_onnx_nms_boxes(boxes), [0]),  # [1, N, 4]
        op.Unsqueeze(op.Cast(scores_per_class, to=ir.DataType.FLOAT), [0]),  # [1, C, N]
        op.Shape(boxes, start=0, end=1),  # max_output_boxes_per_class: N
        _onnx_iou_threshold(iou_threshold),
    ]
    if score_threshold is not None:
        inputs.append(op.Constant(value_floats=[score_threshold]))
    selected = op.NonMaxSuppression(*inputs, center_point_box=0)  # [K, 3] (batch, class, box)
    return op.Reshape(op.Slice(selected, [2], [3], [1]), [-1])


def _nms_to_onnx(boxes, scores, iou_threshold: float):
    """maskrcnn_ops::nms(boxes [N, 4], scores [N]) -> int64 [K] as ONNX
    NonMaxSuppression (kept indices by decreasing score)."""
    from onnxscript import opset18 as op

    return _kept_by_onnx_nms(boxes, op.Unsqueeze(scores, [0]), iou_threshold)


def _batched_nms_to_onnx(boxes, scores, idxs, iou_threshold: float):
    """maskrcnn_ops::batched_nms(boxes [N, 4], scores [N], idxs [N]) -> int64
    [K]: NMS within each category, kept indices by decreasing score."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    scores = op.Cast(scores, to=ir.DataType.FLOAT)
    categories = op.Cast(idxs, to=ir.DataType.INT64)
    # One NMS class per category id in [0, max id]: scores [C, N], -inf where
    # a box is of another category, removed by the score threshold.
    count = op.Add(op.ReduceMax(categories, keepdims=0), op.Constant(value_int=1))
    category_ids = op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1))  # [C]
    member = op.Equal(op.Unsqueeze(category_ids, [1]), op.Unsqueeze(categories, [0]))  # [C, N]
    per_category = op.Where(member, op.Unsqueeze(scores, [0]), op.Constant(value_float=float("-inf")))
    kept = _kept_by_onnx_nms(boxes, per_category, iou_threshold, score_threshold=float("-inf"))
    # Categories come one after the other: order by decreasing score, equal
    # scores by index as ours (TopK puts equal values in input order, so the
    # kept indices are sorted ascending first).
    kept_count = op.Shape(kept)
    kept = op.TopK(kept, kept_count, largest=0, sorted=1)[0]
    order = op.TopK(op.Gather(scores, kept), kept_count, largest=1, sorted=1)[1]
    return op.Gather(kept, order)


def _stable_sort_indices(values, sort_type, axis: int, descending: bool):
    """Indices int64 of torch.sort(values, dim=axis, descending=descending,
    stable=True), the values compared in sort_type (float32, float64, int32
    or int64: the types onnxruntime's TopK takes): equal values in index
    order (-0.0 equal to +0.0), NaN after +inf (first when descending, last
    otherwise), all NaNs equal."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    values = _as_type(values, sort_type)
    count = op.Shape(values, start=axis, end=axis + 1)  # [1]
    if not sort_type.is_floating_point():
        return op.TopK(values, count, axis=axis, largest=descending, sorted=1)[1]
    # TopK puts equal values in index order (ONNX says so) but leaves NaN's
    # place open (onnxruntime 1.32 happens to sort it as torch): NaN goes in
    # as +inf, then a second TopK of the NaN flags in that order moves the
    # NaNs past every number, keeping the order within both.
    nan = op.IsNaN(values)
    inf = op.CastLike(op.Constant(value_float=math.inf), values)
    by_value = op.TopK(op.Where(nan, inf, values), count, axis=axis, largest=descending, sorted=1)[1]
    nan_flags = op.GatherElements(op.Cast(nan, to=ir.DataType.INT64), by_value, axis=axis)
    return op.GatherElements(by_value, op.TopK(nan_flags, count, axis=axis, largest=descending, sorted=1)[1],
                             axis=axis)


def _sort_type(dtype):
    """The type a tensor of `dtype` is sorted in, exactly: itself where
    onnxruntime's TopK takes it, else float32 (half types) or int64 (other
    integers and bool)."""
    from onnxscript import ir

    if dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.INT32, ir.DataType.INT64):
        return dtype
    return ir.DataType.FLOAT if dtype.is_floating_point() else ir.DataType.INT64


def _processing_rank(scores):
    """Position of each box in its row's NMS order, int64 [S, B], for scores
    [S, B]: by decreasing score, ties by index, NaN first (ours:
    torch.sort(descending=True, stable=True)), compared in float64 for
    float64 scores and in float32 otherwise."""
    from onnxscript import opset18 as op

    order = _stable_sort_indices(scores, _opmath_type(scores), 1, descending=True)  # box at each position
    count = op.Squeeze(op.Shape(scores, start=1, end=2))
    positions = op.Expand(
        op.Unsqueeze(op.Range(op.Constant(value_int=0), count, op.Constant(value_int=1)), [0]), op.Shape(scores)
    )
    return op.ScatterElements(positions, order, positions, axis=1)  # the inverse permutation of order


def _nms_keep_rows_to_onnx(boxes, scores, iou_threshold: float):
    """maskrcnn_ops::nms_keep_rows(boxes [S, B, 4], scores [S, B]) -> bool
    [S, B] as ONNX NonMaxSuppression with the rows as its batch (boxes
    [S, B, 4], scores [S, 1, B], at most B kept per row), then the selected
    (row, box) pairs scattered into a False [S, B] (ScatterND). The scores
    NonMaxSuppression sees are minus each box's position in our processing
    order (float32, exact for B up to 2**24): distinct, so onnxruntime
    visits the boxes in our order whatever the ties and NaNs."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    selected = op.NonMaxSuppression(
        _onnx_nms_boxes(boxes),
        op.Unsqueeze(op.Neg(op.Cast(_processing_rank(scores), to=ir.DataType.FLOAT)), [1]),  # [S, 1, B]
        op.Shape(boxes, start=1, end=2),  # max_output_boxes_per_class: B
        _onnx_iou_threshold(iou_threshold),
        center_point_box=0,
    )  # [K, 3] (row, 0, box)
    kept = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # [K, 2] (row, box)
    none_kept = op.ConstantOfShape(op.Shape(scores), value=ir.tensor([False]))
    return op.ScatterND(none_kept, kept, op.Expand(op.Constant(value=ir.tensor(True)), op.Shape(kept, start=0, end=1)))


def _sort_to_onnx(self, stable: bool = False, dim: int = -1, descending: bool = False):
    """aten::sort.stable(self, *, stable, dim, descending) -> (values,
    indices), which torchlib lacks (rank_kept_per_image calls it): TopK over
    the whole dimension, stable whether or not asked (see
    _stable_sort_indices), the values gathered from self."""
    from onnxscript import opset18 as op

    if len(self.shape) == 0:
        return op.Identity(self), op.Constant(value_int=0)
    axis = dim % len(self.shape)
    indices = _stable_sort_indices(self, _sort_type(self.dtype), axis, descending)
    return op.GatherElements(self, indices, axis=axis), indices


def _searchsorted_to_onnx(sorted_sequence, self, out_int32: bool = False, right: bool = False, side=None,
                          sorter=None):
    """aten::searchsorted.Tensor(sorted_sequence [..., N], self [..., M]) ->
    int64 (int32 with out_int32) [..., M], which torchlib lacks
    (rank_kept_per_image calls it): the number of entries of the sequence
    below each value (not above, for right / side="right"), counted with a
    [..., M, N] comparison, O(M * N), meant for few values. Exact without
    NaN (torch puts a NaN value past the end; here no entry is below it)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    if sorter is not None:
        sorted_sequence = op.GatherElements(sorted_sequence, sorter, axis=-1)
    values = op.Unsqueeze(self, [-1])  # [..., M, 1]
    if len(sorted_sequence.shape) > 1:
        sorted_sequence = op.Unsqueeze(sorted_sequence, [-2])  # [..., 1, N]
    right = side == "right" if side is not None else right
    before = op.LessOrEqual(sorted_sequence, values) if right else op.Less(sorted_sequence, values)
    count = op.ReduceSum(op.Cast(before, to=ir.DataType.INT64), [-1], keepdims=0)
    return op.Cast(count, to=ir.DataType.INT32) if out_int32 else count


def _repeat_interleave_to_onnx(self, repeats, dim=None, output_size=None):
    """aten::repeat_interleave.self_int(self, repeats, dim, *, output_size):
    each entry along dim repeated `repeats` times. torchlib's translation
    (onnxscript 0.7.2) puts a symbolic `repeats` on the wrong axis of its
    Expand, which fails at run time (the image index of proposals, RoIs and
    detections of a dynamic batch hits it): here it goes after dim, for an
    int or a symbolic count."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    if dim is None:  # flattened
        self, dim, rank = op.Reshape(self, [-1]), 0, 1
    else:
        rank = len(self.shape)
    axis = dim % rank
    repeats = op.Reshape(repeats if isinstance(repeats, ir.Value) else op.Constant(value_int=repeats), [1])
    # Tiles [1] * (axis + 1), repeats, [1] * (rank - axis - 1): the count on the new axis after `axis`.
    after = [op.Constant(value_ints=[1] * (rank - axis - 1))] if axis < rank - 1 else []
    tiles = op.Concat(op.Constant(value_ints=[1] * (axis + 1)), repeats, *after, axis=0)
    tiled = op.Expand(op.Unsqueeze(self, [axis + 1]), tiles)
    # The new size spelled out (a -1 cannot be inferred when another size is
    # 0), and its zeros taken as sizes (allowzero), not as "keep this size".
    shape = op.Concat(
        op.Shape(self, start=0, end=axis),
        op.Mul(op.Shape(self, start=axis, end=axis + 1), repeats),
        op.Shape(self, start=axis + 1, end=rank),
        axis=0,
    )
    return op.Reshape(tiled, shape, allowzero=1)


def _coding_constant(value, dtype):
    """A constant (a float, or a list of them) rounded once to dtype, as the
    kernels' static_cast<acc_t> of the schema's float64 arguments."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    return op.Constant(value=ir.tensor(value, dtype=dtype))


def _onnx_decode(deltas, boxes, weights: Sequence[float], clip: float, compute_type):
    """decode_box (csrc/common/box_coder.h) operation by operation, on (x, y)
    pairs: deltas [..., 4] against boxes [..., 4] (broadcast), both in
    compute_type -> (x1, y1, x2, y2) [..., 4] in compute_type."""
    from onnxscript import opset18 as op

    size = op.Sub(_pair(boxes, 2), _pair(boxes, 0))  # (width, height)
    half = _coding_constant(0.5, compute_type)
    center = op.Add(_pair(boxes, 0), op.Mul(half, size))
    scaled = op.Div(deltas, _coding_constant(list(weights), compute_type))  # (dx, dy, dw, dh)
    # dw, dh clamped from above at clip; NaN stays NaN, as the kernel's test.
    upper = _coding_constant(clip, compute_type)
    log_scale = _pair(scaled, 2)
    log_scale = op.Where(op.Greater(log_scale, upper), upper, log_scale)
    predicted_center = op.Add(op.Mul(_pair(scaled, 0), size), center)
    half_size = op.Mul(half, op.Mul(op.Exp(log_scale), size))
    return op.Concat(op.Sub(predicted_center, half_size), op.Add(predicted_center, half_size), axis=-1)


def _decode_boxes_to_onnx(deltas, boxes, weights: Sequence[float], clip: float):
    """maskrcnn_ops::decode_boxes(deltas [K, 4 * C], boxes [K, 4]) -> [K, 4 * C]
    in deltas's type: deltas as [K, C, 4] against boxes [K, 1, 4]."""
    from onnxscript import opset18 as op

    compute_type = _opmath_type(deltas)
    # [K, C, 4] with C = (4 * C) / 4 spelled out: a -1 cannot be inferred when K is 0.
    classes = op.Div(op.Shape(deltas, start=1, end=2), op.Constant(value_ints=[4]))
    per_class = op.Concat(op.Shape(deltas, start=0, end=1), classes, op.Constant(value_ints=[4]), axis=0)
    decoded = _onnx_decode(
        op.Reshape(_as_type(deltas, compute_type), per_class),
        op.Unsqueeze(_as_type(boxes, compute_type), [1]),
        weights,
        clip,
        compute_type,
    )
    return _as_type(op.Reshape(decoded, op.Shape(deltas)), deltas.dtype)


def _rpn_decode_filter_to_onnx(
    deltas,
    anchors,
    scores,
    image_sizes,
    weights: Sequence[float],
    clip: float,
    min_size: float,
    score_thresh: float,
):
    """maskrcnn_ops::rpn_decode_filter(deltas [N, M, 4], anchors [N, M, 4],
    scores [N, M], image_sizes [N, 2]) -> (boxes [N, M, 4] in deltas's type,
    keep bool [N, M]): decode, round to deltas's type, clip to the image,
    round again (RpnDecodeFilterRow's rule), then the size and score test
    on the stored boxes."""
    from onnxscript import opset18 as op

    compute_type = _opmath_type(deltas)
    decoded = _onnx_decode(_as_type(deltas, compute_type), _as_type(anchors, compute_type), weights, clip, compute_type)
    boxes = _as_type(_as_type(decoded, deltas.dtype), compute_type)  # rounded to deltas's type
    # x into [0, width], y into [0, height] of each image: (height, width)
    # [N, 2] -> (width, height, width, height) [N, 1, 4]. NaN stays NaN.
    width_height = op.Constant(value_ints=[1, 0, 1, 0])
    limit = op.Unsqueeze(op.Gather(_as_type(image_sizes, compute_type), width_height, axis=1), [1])
    zero = _coding_constant(0.0, compute_type)
    boxes = op.Where(op.Less(boxes, zero), zero, boxes)
    stored = _as_type(op.Where(op.Greater(boxes, limit), limit, boxes), deltas.dtype)
    boxes = _as_type(stored, compute_type)
    # Both sides >= min_size (False for NaN) and score >= score_thresh.
    large = op.GreaterOrEqual(op.Sub(_pair(boxes, 2), _pair(boxes, 0)), _coding_constant(min_size, compute_type))
    wide, tall = (op.Squeeze(op.Slice(large, [i], [i + 1], [-1]), [-1]) for i in range(2))
    scored = op.GreaterOrEqual(_as_type(scores, compute_type), _coding_constant(score_thresh, compute_type))
    return stored, op.And(op.And(wide, tall), scored)


def _keypoint_map_sides(extents, compute_type):
    """The resized map's side along each axis of extents [D, 2] in compute_type (already at
    least 1, or non-finite), int64 [D, 2]: ceil, at most
    MAX_KEYPOINT_MAP_SIDE, 1 for NaN and infinity (keypoint_map_side in
    csrc/common/keypoint_math.h)."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    limit = _coding_constant(float(MAX_KEYPOINT_MAP_SIDE), compute_type)
    sides = op.Ceil(extents)
    sides = op.Where(op.Greater(sides, limit), limit, sides)  # +inf too: non-finite tested on the extents
    sides = op.Where(op.Or(op.IsNaN(extents), op.IsInf(extents)), _coding_constant(1.0, compute_type), sides)
    return op.Cast(sides, to=ir.DataType.INT64)


def _heatmaps_to_keypoints_to_onnx(heatmaps, boxes):
    """maskrcnn_ops::heatmaps_to_keypoints(heatmaps [D, K, H, W], boxes [D,
    4]) -> (keypoints [D, K, 3], scores [D, K]): an ONNX Loop over the
    detections (``_onnx_keypoint_maxima.resized_maxima``: Resize, ArgMax,
    GatherElements), then the maxima's coordinates as the kernel computes
    them."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    compute_type = _opmath_type(heatmaps)
    detections_keypoints = op.Shape(heatmaps, start=0, end=2)  # [D, K]
    if isinstance(heatmaps.shape[1], int) and heatmaps.shape[1] == 0:  # nothing to resize
        zero = ir.tensor([0.0], dtype=compute_type)
        keypoints_shape = op.Concat(detections_keypoints, op.Constant(value_ints=[3]), axis=0)
        return op.ConstantOfShape(keypoints_shape, value=zero), op.ConstantOfShape(detections_keypoints, value=zero)
    boxes = _as_type(boxes, compute_type)
    corner = _pair(boxes, 0)  # (x1, y1) [D, 2]
    extents = op.Sub(_pair(boxes, 2), corner)
    one = _coding_constant(1.0, compute_type)
    extents = op.Where(op.Less(extents, one), one, extents)  # max(., 1), NaN stays NaN
    sides = _keypoint_map_sides(extents, compute_type)  # (width, height)
    from ._onnx_keypoint_maxima import resized_maxima

    # Resized in float32 whatever the heatmaps' type: onnxruntime's Resize
    # has no float64, and half types are resized in float32 by torch too
    # (rounded to their type after, as below).
    positions, values = resized_maxima(
        _as_type(heatmaps, ir.DataType.FLOAT), op.Gather(sides, op.Constant(value_ints=[1, 0]), axis=1))
    # The Loop's outputs carry no shape: [D, K] spelled out for what follows.
    positions = op.Reshape(positions, detections_keypoints)
    values = _as_type(_as_type(op.Reshape(values, detections_keypoints), heatmaps.dtype), compute_type)
    # (column, row) [D, K, 2], then (cell + 0.5) * (extent / side) + corner.
    widths = op.Slice(sides, [0], [1], [1])  # [D, 1]
    cells = op.Concat(op.Unsqueeze(op.Mod(positions, widths), [2]), op.Unsqueeze(op.Div(positions, widths), [2]),
                      axis=2)
    half = _coding_constant(0.5, compute_type)
    pixel = op.Unsqueeze(op.Div(extents, op.Cast(sides, to=compute_type)), [1])  # [D, 1, 2]
    xy = op.Add(op.Mul(op.Add(op.Cast(cells, to=compute_type), half), pixel), op.Unsqueeze(corner, [1]))
    ones = op.ConstantOfShape(op.Shape(values), value=ir.tensor([1.0], dtype=compute_type))
    return op.Concat(xy, op.Unsqueeze(ones, [2]), axis=2), values


def onnx_translation_table() -> Dict[Callable, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export(...,
    dynamo=True)``: our ops to ONNX's RoiAlign and NonMaxSuppression, and box
    coding to elementwise ONNX (see the module docstring for the mapping and
    its semantics). Needs onnxscript."""
    ops = torch.ops.maskrcnn_ops
    aten = torch.ops.aten
    return {
        ops.roi_align.default: _roi_align_to_onnx,
        ops.nms.default: _nms_to_onnx,
        ops.batched_nms.default: _batched_nms_to_onnx,
        ops.nms_keep_rows.default: _nms_keep_rows_to_onnx,
        ops.multi_level_roi_align.default: _multi_level_roi_align_to_onnx,
        ops.decode_boxes.default: _decode_boxes_to_onnx,
        ops.rpn_decode_filter.default: _rpn_decode_filter_to_onnx,
        ops.heatmaps_to_keypoints.default: _heatmaps_to_keypoints_to_onnx,
        # ATen ops our Python code calls that torchlib does not translate (right).
        aten.sort.stable: _sort_to_onnx,
        aten.searchsorted.Tensor: _searchsorted_to_onnx,
        aten.repeat_interleave.self_int: _repeat_interleave_to_onnx,
    }


def _paste_masks_decomposition(masks, boxes, height, width, padding=1, threshold=None):
    from .reference import paste_masks

    return paste_masks(masks, boxes, (height, width), threshold=threshold, padding=padding)


def onnx_decompositions() -> Dict[Callable, Callable]:
    """The ``decomp_table`` for ``ExportedProgram.run_decompositions`` that
    an ONNX export needs before ``onnx_translation_table``: our ops without
    an ONNX translation, as traceable PyTorch (see the module docstring)."""
    return {torch.ops.maskrcnn_ops.paste_masks.default: _paste_masks_decomposition}
