"""Export of modules that call maskrcnn_ops: torch.export with dynamic
shapes, and ONNX (torch.onnx.export(dynamo=True) with
maskrcnn_ops.onnx_translation_table()) checked against our ops in
onnxruntime on CPU.

Every exported program is run on inputs of other sizes than the ones it was
traced with, so the dynamic dimensions are exercised.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.export import Dim

import maskrcnn_ops

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# One Dim shared by several inputs makes the exporter say it names the axis once.
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")

# RoIAlign: onnxruntime and our kernel compute the same samples and weights
# and sum them in another order (measured: within 5e-7 on N(0, 1) features).
ROI_ALIGN_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _quiet_onnx_exporter():
    """The exporter logs every step at WARNING; keep the test output readable."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


# ------------------------------------------------------------------ inputs --


def random_rois(k: int, *, batch: int, size: float, generator: torch.Generator) -> torch.Tensor:
    """[k, 5] (batch_index, x1, y1, x2, y2), boxes of 0 to size/2 px, some
    reaching past the image."""
    corner = torch.rand(k, 2, generator=generator) * size - size / 8
    sides = torch.rand(k, 2, generator=generator) * size / 2
    index = torch.randint(0, batch, (k, 1), generator=generator).to(torch.float32)
    return torch.cat([index, corner, corner + sides], dim=1)


def random_boxes(n: int, *, generator: torch.Generator) -> torch.Tensor:
    """[n, 4] valid boxes in a 100x100 image, sides 1 to 40 px: many overlap."""
    corner = torch.rand(n, 2, generator=generator) * 100
    sides = 1 + torch.rand(n, 2, generator=generator) * 39
    return torch.cat([corner, corner + sides], dim=1)


def distinct_scores(n: int, *, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator).to(torch.float32) / max(n, 1)


# ---------------------------------------------------------------- modules --


class PoolRoIs(torch.nn.Module):
    """Calls maskrcnn_ops.roi_align on rois [K, 5], optionally in another
    dtype (the casts are part of the exported graph)."""

    def __init__(self, *, aligned: bool, sampling_ratio: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.aligned = aligned
        self.sampling_ratio = sampling_ratio
        self.dtype = dtype

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        pooled = maskrcnn_ops.roi_align(
            features.to(self.dtype),
            rois,
            output_size=(5, 4),
            spatial_scale=0.25,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
        )
        return pooled.to(torch.float32)


class SuppressBoxes(torch.nn.Module):
    """Calls maskrcnn_ops.nms and batched_nms."""

    def __init__(self, iou_threshold: float = 0.5) -> None:
        super().__init__()
        self.iou_threshold = iou_threshold

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor, categories: torch.Tensor):
        kept = maskrcnn_ops.nms(boxes, scores, iou_threshold=self.iou_threshold)
        kept_per_category = maskrcnn_ops.batched_nms(boxes, scores, categories, iou_threshold=self.iou_threshold)
        return kept, kept_per_category


class PoolPerImage(torch.nn.Module):
    """roi_align with a list of boxes per image, then NMS: a detector's tail."""

    def forward(self, features, boxes_image0, boxes_image1, scores):
        pooled = maskrcnn_ops.roi_align(
            features, [boxes_image0, boxes_image1], output_size=7, spatial_scale=0.5, sampling_ratio=2, aligned=True
        )
        kept = maskrcnn_ops.nms(torch.cat([boxes_image0, boxes_image1]), scores, iou_threshold=0.6)
        return pooled, kept


K = Dim("rois", min=1)
N = Dim("boxes", min=2)
FEATURE_SHAPE = {0: Dim("batch", min=1), 2: Dim("height", min=2), 3: Dim("width", min=2)}
ROI_SHAPES = (FEATURE_SHAPE, {0: K})
NMS_SHAPES = ({0: N}, {0: N}, {0: N})


def to_onnxruntime(module: torch.nn.Module, args: tuple, dynamic_shapes):
    """Exports `module` to ONNX with our translation table and returns a
    function that runs it in onnxruntime (CPU) on torch tensors."""
    program = torch.onnx.export(
        module.eval(),
        args,
        dynamo=True,
        custom_translation_table=maskrcnn_ops.onnx_translation_table(),
        dynamic_shapes=dynamic_shapes,
        optimize=False,  # the graph as translated; saves seconds per export
        verbose=False,
    )
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(*inputs: torch.Tensor):
        feed = {spec.name: tensor.numpy() for spec, tensor in zip(session.get_inputs(), inputs)}
        return [torch.from_numpy(np.asarray(out)) for out in session.run(None, feed)]

    run.model = model
    return run


def operator_types(model) -> set:
    return {node.op_type for node in model.graph.node}


# ------------------------------------------------------------ torch.export --


def test_torch_export_with_a_dynamic_number_of_boxes():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 24, 32, generator=g)
    traced_with = (features, random_boxes(6, generator=g), random_boxes(5, generator=g), torch.rand(11, generator=g))
    dynamic = ({}, {0: Dim("boxes0", min=1)}, {0: Dim("boxes1", min=1)}, {0: Dim("all_boxes", min=2)})
    module = PoolPerImage()
    program = torch.export.export(module, traced_with, dynamic_shapes=dynamic)

    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"maskrcnn_ops.roi_align.default", "maskrcnn_ops.nms.default"} <= targets
    for sizes in [(13, 4), (1, 30)]:
        args = (features, random_boxes(sizes[0], generator=g), random_boxes(sizes[1], generator=g))
        args = args + (torch.rand(sum(sizes), generator=g),)
        pooled, kept = program.module()(*args)
        expected_pooled, expected_kept = module(*args)
        assert pooled.shape == (sum(sizes), 8, 7, 7)
        torch.testing.assert_close(pooled, expected_pooled, rtol=0, atol=0)
        torch.testing.assert_close(kept, expected_kept, rtol=0, atol=0)


def test_torch_export_roundtrips_through_save_and_load(tmp_path):
    g = torch.Generator().manual_seed(1)
    module = SuppressBoxes()
    args = (random_boxes(20, generator=g), distinct_scores(20, generator=g), torch.randint(0, 3, (20,), generator=g))
    program = torch.export.export(module, args, dynamic_shapes=NMS_SHAPES)
    path = tmp_path / "suppress.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    other = (random_boxes(57, generator=g), distinct_scores(57, generator=g), torch.randint(0, 5, (57,), generator=g))
    for got, expected in zip(loaded.module()(*other), module(*other)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# -------------------------------------------------------------------- ONNX --


@pytest.mark.parametrize("sampling_ratio", [2, 0], ids=["sampling2", "adaptive"])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "legacy"])
def test_roi_align_to_onnx_matches_ours(aligned, sampling_ratio):
    g = torch.Generator().manual_seed(2)
    module = PoolRoIs(aligned=aligned, sampling_ratio=sampling_ratio)
    features = torch.randn(2, 6, 20, 24, generator=g)
    run = to_onnxruntime(module, (features, random_rois(7, batch=2, size=96, generator=g)), ROI_SHAPES)
    assert "RoiAlign" in operator_types(run.model)

    other_features = torch.randn(3, 6, 17, 29, generator=g)  # H, W and N are not baked in either
    rois = random_rois(40, batch=3, size=110, generator=g)
    (pooled,) = run(other_features, rois)
    torch.testing.assert_close(pooled, module(other_features, rois), **ROI_ALIGN_TOLERANCE)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "legacy"])
def test_roi_align_to_onnx_small_degenerate_and_outside_boxes(aligned):
    """ONNX's RoiAlign (output_half_pixel) also makes legacy boxes at least
    1x1 feature pixel, as ours; aligned boxes keep their size (even 0)."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 3, 16, 20, generator=g)
    rois = torch.tensor(
        [
            [0, 3.0, 4.0, 3.5, 4.2],  # under one feature pixel (scale 1/4)
            [1, 5.0, 5.0, 5.0, 5.0],  # empty
            [0, 40.0, 40.0, 32.0, 28.0],  # inverted
            [1, -40.0, -24.0, 12.0, 8.0],  # starts outside
            [0, 70.0, 55.0, 120.0, 100.0],  # reaches past the far edges
            [1, 0.3, 0.7, 1.1, 1.6],  # sub-pixel near the origin
        ]
    )
    for sampling_ratio in (2, 0):
        module = PoolRoIs(aligned=aligned, sampling_ratio=sampling_ratio)
        run = to_onnxruntime(module, (features, rois), ROI_SHAPES)
        (pooled,) = run(features, rois)
        torch.testing.assert_close(pooled, module(features, rois), **ROI_ALIGN_TOLERANCE)


@pytest.mark.parametrize(
    "dtype, tolerance",
    [
        (torch.float64, dict(rtol=1e-12, atol=1e-12)),
        # Computed in float32 by both, then rounded once to the half type.
        (torch.float16, dict(rtol=1e-3, atol=1e-3)),
        (torch.bfloat16, dict(rtol=1e-2, atol=1e-2)),
    ],
    ids=["f64", "f16", "bf16"],
)
def test_roi_align_to_onnx_other_dtypes(dtype, tolerance):
    g = torch.Generator().manual_seed(4)
    module = PoolRoIs(aligned=True, sampling_ratio=2, dtype=dtype)
    features = torch.randn(2, 4, 16, 16, generator=g)
    run = to_onnxruntime(module, (features, random_rois(9, batch=2, size=64, generator=g)), ROI_SHAPES)
    rois = random_rois(15, batch=2, size=64, generator=g)
    (pooled,) = run(features, rois)
    torch.testing.assert_close(pooled, module(features, rois), **tolerance)


def test_roi_align_to_onnx_no_rois():
    g = torch.Generator().manual_seed(5)
    module = PoolRoIs(aligned=True, sampling_ratio=2)
    features = torch.randn(1, 3, 8, 8, generator=g)
    run = to_onnxruntime(module, (features, random_rois(3, batch=1, size=32, generator=g)), ROI_SHAPES)
    (pooled,) = run(features, torch.zeros(0, 5))
    assert pooled.shape == (0, 3, 5, 4)


@pytest.fixture(scope="module")
def onnx_suppression():
    """SuppressBoxes exported once (traced with 30 boxes) for the NMS tests."""
    g = torch.Generator().manual_seed(6)
    args = (random_boxes(30, generator=g), distinct_scores(30, generator=g), torch.randint(0, 4, (30,), generator=g))
    return to_onnxruntime(SuppressBoxes(), args, NMS_SHAPES)


@pytest.mark.parametrize("n, categories", [(2, 1), (50, 3), (400, 80)])
def test_nms_to_onnx_matches_ours(onnx_suppression, n, categories):
    assert operator_types(onnx_suppression.model) >= {"NonMaxSuppression", "TopK"}
    g = torch.Generator().manual_seed(7 + n)
    inputs = (random_boxes(n, generator=g), distinct_scores(n, generator=g), torch.randint(0, categories, (n,), generator=g))
    kept, kept_per_category = onnx_suppression(*inputs)
    expected, expected_per_category = SuppressBoxes()(*inputs)
    assert 0 < expected.numel() < n or n == 2  # the case suppresses something
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    torch.testing.assert_close(kept_per_category, expected_per_category, rtol=0, atol=0)


def test_nms_to_onnx_half_precision_boxes():
    g = torch.Generator().manual_seed(8)

    class HalfBoxes(torch.nn.Module):
        def forward(self, boxes, scores, categories):
            return SuppressBoxes()(boxes.to(torch.float16), scores.to(torch.float16), categories)

    n = 64
    inputs = (random_boxes(n, generator=g), distinct_scores(n, generator=g), torch.randint(0, 3, (n,), generator=g))
    run = to_onnxruntime(HalfBoxes(), inputs, NMS_SHAPES)
    # Scores distinct in float16 too (multiples of 1/64); boxes rounded to
    # float16 are compared in float32 by both.
    for got, expected in zip(run(*inputs), HalfBoxes()(*inputs)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_batched_nms_to_onnx_orders_equal_scores_by_index(onnx_suppression):
    """Disjoint boxes (nothing suppressed) with tied scores across
    categories: kept indices by decreasing score, ties by index, as ours."""
    n = 12
    corner = (torch.arange(n, dtype=torch.float32)[:, None] * 10).expand(n, 2)
    boxes = torch.cat([corner, corner + 5], dim=1)
    scores = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9, 0.5, 0.3, 0.9, 0.1, 0.5, 0.3, 0.9])
    categories = torch.tensor([2, 0, 1, 0, 2, 0, 1, 1, 2, 2, 0, 0])
    _, kept_per_category = onnx_suppression(boxes, scores, categories)
    expected = maskrcnn_ops.batched_nms(boxes, scores, categories, 0.5)
    assert expected.tolist() == [1, 4, 7, 11, 0, 2, 5, 9, 6, 10, 3, 8]
    torch.testing.assert_close(kept_per_category, expected, rtol=0, atol=0)


def test_nms_to_onnx_no_boxes(onnx_suppression):
    kept, kept_per_category = onnx_suppression(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    assert kept.shape == (0,) and kept_per_category.shape == (0,)


def test_exported_detector_tail_runs_in_onnxruntime():
    """roi_align over per-image box lists and NMS in one graph, as a
    detector's post-processing calls them."""
    g = torch.Generator().manual_seed(9)
    features = torch.randn(2, 4, 24, 32, generator=g)
    module = PoolPerImage()
    args = (features, random_boxes(6, generator=g), random_boxes(5, generator=g), distinct_scores(11, generator=g))
    dynamic = ({}, {0: Dim("boxes0", min=1)}, {0: Dim("boxes1", min=1)}, {0: Dim("all_boxes", min=2)})
    run = to_onnxruntime(module, args, dynamic)
    other = (features, random_boxes(9, generator=g), random_boxes(14, generator=g), distinct_scores(23, generator=g))
    pooled, kept = run(*other)
    expected_pooled, expected_kept = module(*other)
    torch.testing.assert_close(pooled, expected_pooled, **ROI_ALIGN_TOLERANCE)
    torch.testing.assert_close(kept, expected_kept, rtol=0, atol=0)


def test_nms_to_onnx_inverted_boxes_suppress_nothing(onnx_suppression):
    """ONNX would sort an inverted box's corners; ours gives it no
    intersection, so it neither suppresses nor is suppressed, and the
    translation passes it as an empty box (module docstring of export.py)."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [10.0, 10.0, 1.0, 1.0], [0.0, 9.0, 10.0, 1.0]])
    scores = torch.tensor([0.9, 0.8, 0.95])
    categories = torch.zeros(3, dtype=torch.int64)
    kept, kept_per_category = onnx_suppression(boxes, scores, categories)
    assert kept.tolist() == kept_per_category.tolist() == maskrcnn_ops.nms(boxes, scores, 0.5).tolist() == [2, 0, 1]


def test_nms_to_onnx_threshold_rounds_as_ours():
    """The IoU of these boxes is float32(0.1), just above 0.1: ours suppresses
    at 0.1 (the threshold in float64); ONNX's float32 threshold is the
    largest float32 not above 0.1, so it suppresses too."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 1.0]])
    scores, categories = torch.tensor([0.9, 0.8]), torch.zeros(2, dtype=torch.int64)
    module = SuppressBoxes(iou_threshold=0.1)
    run = to_onnxruntime(module, (boxes, scores, categories), NMS_SHAPES)
    assert [k.tolist() for k in run(boxes, scores, categories)] == [[0], [0]]
    assert [k.tolist() for k in module(boxes, scores, categories)] == [[0], [0]]


# ---------------------------------------------------------- nms_keep_rows --


class KeepRows(torch.nn.Module):
    """Calls maskrcnn_ops.nms_keep_rows on boxes [S, B, 4] and scores [S, B]
    in `dtype` (the casts are part of the exported graph)."""

    def __init__(self, iou_threshold: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.iou_threshold = iou_threshold
        self.dtype = dtype

    def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return maskrcnn_ops.nms_keep_rows(boxes.to(self.dtype), scores.to(self.dtype), self.iou_threshold)


ROWS, PER_ROW = Dim("rows", min=1), Dim("per_row", min=2)
ROWS_SHAPES = ({0: ROWS, 1: PER_ROW}, {0: ROWS, 1: PER_ROW})


def random_rows(rows: int, per_row: int, *, generator: torch.Generator):
    """random_boxes as rows [rows, per_row, 4], scores distinct over all."""
    boxes = random_boxes(rows * per_row, generator=generator).view(rows, per_row, 4)
    return boxes, distinct_scores(rows * per_row, generator=generator).view(rows, per_row)


@pytest.fixture(scope="module")
def onnx_keep_rows():
    """KeepRows(iou_threshold, dtype) exported on first use, traced with 3
    rows of 20 boxes: a function of (iou_threshold, dtype)."""
    exported = {}

    def get(iou_threshold: float, dtype: torch.dtype = torch.float32):
        if (iou_threshold, dtype) not in exported:
            args = random_rows(3, 20, generator=torch.Generator().manual_seed(14))
            exported[iou_threshold, dtype] = to_onnxruntime(KeepRows(iou_threshold, dtype), args, ROWS_SHAPES)
        return exported[iou_threshold, dtype]

    return get


def assert_keep_rows_equal(run, boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, dtype=torch.float32):
    (keep,) = run(boxes, scores)
    expected = KeepRows(iou_threshold, dtype)(boxes, scores)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert torch.equal(keep, expected), f"{(keep != expected).sum()} flags differ"
    return expected


@pytest.mark.parametrize(
    "iou_threshold, dtype",
    [
        (0.3, torch.float32),
        (0.5, torch.float32),
        (0.7, torch.float32),
        # IoU in float64 by ours, float32 by onnxruntime: these boxes have no
        # IoU that close to the threshold.
        (0.5, torch.float64),
        (0.5, torch.float16),
        (0.6, torch.bfloat16),
    ],
    ids=["t0.3", "t0.5", "t0.7", "f64", "f16", "bf16"],
)
def test_nms_keep_rows_to_onnx_matches_ours(onnx_keep_rows, iou_threshold, dtype):
    run = onnx_keep_rows(iou_threshold, dtype)
    assert {"NonMaxSuppression", "TopK", "ScatterND"} <= operator_types(run.model)
    g = torch.Generator().manual_seed(15)
    for rows, per_row in [(5, 60), (1, 300), (9, 2), (2, 1)]:
        expected = assert_keep_rows_equal(run, *random_rows(rows, per_row, generator=g), iou_threshold, dtype)
        assert expected.any()
        assert per_row < 60 or not expected.all()  # the case suppresses


def test_nms_keep_rows_to_onnx_no_rows_or_no_boxes(onnx_keep_rows):
    run = onnx_keep_rows(0.5)
    for rows, per_row in [(0, 10), (4, 0), (0, 0)]:
        (keep,) = run(torch.zeros(rows, per_row, 4), torch.zeros(rows, per_row))
        assert keep.shape == (rows, per_row) and keep.dtype == torch.bool


# Boxes ours cannot overlap (tests/test_nms.py's BAD_BOXES), each made from
# an ordinary box and scored above it: counted as a box (as onnxruntime counts
# an inverted one, sorting its corners), it would suppress that box.
def bad_versions(box: list) -> list:
    x1, y1, x2, y2 = box
    return [
        [math.nan, y1, x2, y2],
        [x1, y1, x2, math.nan],
        [math.nan] * 4,
        [x1, y1, math.inf, y2],
        [-math.inf, -math.inf, math.inf, math.inf],
        [x1, y1, x1, y2],  # zero width
        [x2, y1, x1, y2],  # inverted x: negative area
        [x2, y2, x1, y1],  # inverted x and y: positive area, no intersection
    ]


@pytest.mark.parametrize("iou_threshold", [0.0, 0.5])
def test_nms_keep_rows_to_onnx_nan_and_degenerate_boxes(onnx_keep_rows, iou_threshold):
    """NaN, infinite, empty and inverted boxes suppress nothing and are kept,
    in ours and in ONNX; the ordinary boxes they were made from are kept."""
    g = torch.Generator().manual_seed(16)
    rows, per_row = 4, 40
    boxes, scores = random_rows(rows, per_row, generator=g)
    # Each row: its first 8 boxes moved apart (away from each other and from
    # the rest), and their bad versions scored above every ordinary box.
    ordinary = boxes[:, :8] + 200 * torch.arange(1.0, 9.0)[:, None]
    boxes[:, :8] = ordinary
    bad = torch.tensor([[bad_versions(box)[i % 8] for i, box in enumerate(row)] for row in ordinary.tolist()])
    boxes = torch.cat([boxes, bad], 1)
    scores = torch.cat([scores, 1 + torch.rand(rows, 8, generator=g)], 1)
    expected = assert_keep_rows_equal(onnx_keep_rows(iou_threshold), boxes, scores, iou_threshold)
    assert expected[:, per_row:].all() and expected[:, :8].all()
    assert not expected.all()


def test_nms_keep_rows_to_onnx_order_ties_and_nan_scores(onnx_keep_rows):
    """A chain of boxes where each overlaps the next (IoU 0.54) and not the
    one after (0.25): which are kept depends on the order only. Ties go by
    index, NaN before +inf, -0.0 ties with +0.0, as ours."""
    corner = torch.arange(12.0)[:, None] * 3
    chain = torch.cat([corner, torch.zeros(12, 1), corner + 10, torch.full((12, 1), 10.0)], 1)
    nan, inf = math.nan, math.inf
    scores = torch.tensor(
        [
            [0.5] * 12,
            [inf, nan, 0.5, inf, 0.5, nan, -inf, 0.5, inf, nan, 0.5, -inf],
            [-0.0, 0.0, 0.0, -0.0, 1.0, -0.0, 0.0, 1.0, -1.0, 0.0, -0.0, -1.0],
            [0.3, 0.3, 0.9, 0.9, 0.1, 0.9, 0.3, 0.1, 0.1, 0.9, 0.3, 0.3],
        ]
    )
    boxes = chain.expand(len(scores), 12, 4)
    expected = assert_keep_rows_equal(onnx_keep_rows(0.5), boxes, scores, 0.5)
    assert expected[0].tolist() == [True, False] * 6  # ties by index: 0, 2, 4, ...
    assert expected[1, :2].tolist() == [False, True]  # NaN before +inf


def test_nms_keep_rows_to_onnx_thresholds(onnx_keep_rows):
    """The threshold as ours compares it: the IoU float32(0.1) of these boxes
    is above 0.1, so one suppresses the other (onnxruntime's float32
    threshold is rounded down); above 1 nothing is suppressed, and a
    negative threshold has no translation."""
    pair = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 1.0]]])
    scores = torch.tensor([[0.9, 0.8]])
    assert assert_keep_rows_equal(onnx_keep_rows(0.1), pair, scores, 0.1).tolist() == [[True, False]]
    g = torch.Generator().manual_seed(17)
    boxes, scores = random_rows(3, 50, generator=g)
    assert assert_keep_rows_equal(onnx_keep_rows(1.5), boxes, scores, 1.5).all()
    with pytest.raises(Exception, match="iou_threshold must be >= 0"):
        onnx_keep_rows(-0.1)


@st.composite
def lattice_rows(draw):
    """Rows of boxes with corners on a small lattice (duplicates, nested,
    empty and inverted boxes, IoUs equal to the thresholds), a few NaN and
    infinite coordinates, and scores with ties and NaN: test_nms.py's
    rows_cases, harder on order and rounding."""
    rows, per_row = draw(st.integers(0, 4)), draw(st.integers(0, 8))
    coordinate = st.integers(0, 7).map(float) | st.sampled_from([math.nan, math.inf, -math.inf])
    score = st.sampled_from([0.25, 0.5, 1.0, math.nan, math.inf, -0.0, 0.0])
    n = rows * per_row
    return dict(
        boxes=torch.tensor([draw(coordinate) for _ in range(4 * n)]).reshape(rows, per_row, 4),
        scores=torch.tensor([draw(score) for _ in range(n)]).reshape(rows, per_row),
        iou_threshold=draw(st.sampled_from([0.0, 1 / 3, 0.5, 1.0])),
        dtype=draw(st.sampled_from([torch.float32, torch.float16])),
    )


@settings(max_examples=80, deadline=None)
@given(case=lattice_rows())
def test_fuzz_nms_keep_rows_to_onnx(onnx_keep_rows, case):
    """The exported op (one program per threshold and dtype, traced once)
    equals ours on small degenerate rows, including S or B = 0."""
    run = onnx_keep_rows(case["iou_threshold"], case["dtype"])
    assert_keep_rows_equal(run, case["boxes"], case["scores"], case["iou_threshold"], case["dtype"])


# ---------------------------------------------------- ATen ops we translate --


class RankAndRepeat(torch.nn.Module):
    """The ATen ops the table translates, as our code calls them:
    rank_kept_per_image (aten::sort.stable on scores and on image ids,
    aten::searchsorted), torch.sort both ways along either dim, and
    repeat_interleave by a symbolic count (the detector's image ids) and by
    an int."""

    def forward(self, keep, scores, image_ids, grid):
        ranked, counts = maskrcnn_ops.rank_kept_per_image(keep, scores, image_ids, 3, 5)
        ascending = torch.sort(grid, dim=0, stable=True)
        descending = torch.sort(grid, descending=True, stable=True)
        image_of_column = torch.arange(grid.size(0)).repeat_interleave(grid.size(1))
        return ranked, counts, *ascending, *descending, image_of_column, grid.repeat_interleave(2, dim=1)


def tied_values(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Values of four levels (many ties) with NaN, +-inf and -0.0 among them."""
    values = (torch.rand(*shape, generator=generator) * 4).floor() / 4
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0])
    pick = torch.randint(0, 12, shape, generator=generator)
    return torch.where(pick < 4, special[pick.clamp(max=3)], values)


def test_aten_sort_searchsorted_and_repeat_interleave_to_onnx():
    g = torch.Generator().manual_seed(18)

    def inputs(n: int, rows: int, columns: int):
        # Image ids from -1 to 3: rank_kept_per_image ignores those outside [0, 3).
        return (torch.rand(n, generator=g) < 0.7, tied_values(n, generator=g),
                torch.randint(-1, 4, (n,), generator=g), tied_values(rows, columns, generator=g))

    module = RankAndRepeat()
    entries, rows, columns = Dim("entries", min=2), Dim("grid_rows", min=2), Dim("grid_columns", min=2)
    run = to_onnxruntime(module, inputs(20, 3, 4), ({0: entries}, {0: entries}, {0: entries}, {0: rows, 1: columns}))
    for sizes in [(200, 9, 31), (7, 40, 2), (1, 1, 1), (0, 0, 3), (5, 3, 0)]:
        args = inputs(*sizes)
        for got, expected in zip(run(*args), module(*args)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


class PoolPyramid(torch.nn.Module):
    """maskrcnn_ops.MultiScaleRoIAlign (the fused multi-level op) over a
    4-level pyramid for 2 images of about 256x320."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.pool = maskrcnn_ops.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], output_size=7, sampling_ratio=2)
        self.dtype = dtype

    def forward(self, p2, p3, p4, p5, boxes_image0, boxes_image1):
        features = {name: f.to(self.dtype) for name, f in zip(["p2", "p3", "p4", "p5"], [p2, p3, p4, p5])}
        pooled = self.pool(features, [boxes_image0, boxes_image1], [(256, 320), (240, 300)])
        return pooled.to(torch.float32)


def pyramid_boxes(n: int, *, generator: torch.Generator) -> torch.Tensor:
    """[n, 4] boxes of 1 to 300 px (sides squared-uniform): every level
    gets some, and the clamps at both ends are reached."""
    corner = torch.rand(n, 2, generator=generator) * 200
    sides = 0.5 + torch.rand(n, 2, generator=generator) ** 2 * 300
    return torch.cat([corner, corner + sides], dim=1)


@pytest.mark.parametrize(
    "dtype, tolerance",
    [
        (torch.float32, ROI_ALIGN_TOLERANCE),
        # Both accumulate in float32; the rounding to half may differ by an ulp.
        (torch.float16, dict(rtol=1e-3, atol=1e-3)),
    ],
    ids=["f32", "f16"],
)
def test_multi_scale_roi_align_to_onnx_matches_ours(dtype, tolerance):
    g = torch.Generator().manual_seed(10)
    pyramid = [torch.randn(2, 8, 64 >> level, 80 >> level, generator=g) for level in range(4)]
    module = PoolPyramid(dtype)
    args = (*pyramid, pyramid_boxes(10, generator=g), pyramid_boxes(12, generator=g))
    dynamic = ({}, {}, {}, {}, {0: Dim("boxes0", min=1)}, {0: Dim("boxes1", min=1)})
    run = to_onnxruntime(module, args, dynamic)
    assert {"RoiAlign", "NonZero", "ScatterND"} <= operator_types(run.model)

    boxes_image1 = torch.cat(
        [
            torch.tensor(
                [
                    [0.0, 0.0, 224.0, 224.0],  # exactly the canonical size: level 4
                    [0.0, 0.0, 224.0, 223.9999],  # just under: the formula's 1e-6 keeps it on level 4
                    [10.0, 10.0, 122.0, 122.0],  # 112 px: exactly level 3
                    [0.0, 0.0, 448.0, 448.0],  # 448 px: exactly level 5
                    [30.0, 40.0, 20.0, 90.0],  # inverted: NaN level, pooled from the finest map
                    [5.0, 5.0, 5.0, 5.0],  # empty: clamped to the finest level
                ]
            ),
            pyramid_boxes(150, generator=g),
        ]
    )
    inputs = (*pyramid, pyramid_boxes(200, generator=g), boxes_image1)
    (pooled,) = run(*inputs)
    torch.testing.assert_close(pooled, module(*inputs), **tolerance)


# ------------------------------------------------------------ box coding --

# Decoding: the translation does decode_box's operations in the same order and
# type, except Exp: onnxruntime's is within 1 ulp of the libm exp our kernels
# call in float32, 2 ulps in float64. A half size then differs by up to 3 eps
# of itself, and a coordinate (center -/+ half size) by up to 4 eps of the
# larger of the two, which is at most max(|x1|, |x2|) of the decoded box
# (for y, of y1 and y2). The tolerance is in units of eps times that scale
# (measured: up to 1.9 over 240,000 random coordinates, 1.05 in these
# tests). float16 and bfloat16 are computed in float32 by both and rounded
# once (rpn_decode_filter: before and after the clip) to the half type, which
# hides the float32 difference or moves a coordinate by one half ulp
# (measured: 2 of those 240,000 coordinates in float16, none here).
DECODE_EPS_MULTIPLE = {torch.float32: 4, torch.float64: 4, torch.float16: 1, torch.bfloat16: 1}
BOX_WEIGHTS = [10.0, 10.0, 5.0, 5.0]  # the box head's
DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.float64, id="f64"),
    pytest.param(torch.float16, id="f16"),
    pytest.param(torch.bfloat16, id="bf16"),
]


def assert_decoded_close(got: torch.Tensor, expected: torch.Tensor, unclipped: torch.Tensor, dtype: torch.dtype):
    """got == expected (boxes [..., 4], NaN where expected is NaN) within
    DECODE_EPS_MULTIPLE eps of each coordinate's scale: max(|x1|, |x2|) or
    max(|y1|, |y2|) of the decoded box before any clipping (`unclipped`)."""
    got, expected, unclipped = (t.to(torch.float64).reshape(-1, 4) for t in (got, expected, unclipped))
    assert torch.equal(got.isnan(), expected.isnan())
    magnitude = unclipped.abs()
    scale_x = torch.maximum(magnitude[:, 0], magnitude[:, 2])
    scale_y = torch.maximum(magnitude[:, 1], magnitude[:, 3])
    bound = DECODE_EPS_MULTIPLE[dtype] * torch.finfo(dtype).eps * torch.stack([scale_x, scale_y, scale_x, scale_y], 1)
    compared = ~expected.isnan()
    error = (got - expected).abs()[compared]
    assert (error <= bound[compared]).all(), f"largest error {(error / bound[compared]).max():.2f} x the bound"


def random_deltas(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Deltas N(0, 1), one in eight dw, dh at 50x: past the default clip
    (log(1000 / 16) = 4.1) for weights up to 5, so exp() is clamped."""
    deltas = torch.randn(*shape, generator=generator)
    large = torch.rand(*shape, generator=generator) < 1 / 8
    large[..., 0::4] = large[..., 1::4] = False
    return torch.where(large, 50 * deltas.abs(), deltas)


# Non-finite deltas (dx, dy, dw, dh): NaN stays NaN (and is not kept), +inf
# dw is clamped at clip, -inf dh gives a box of no height.
SPECIAL_DELTAS = [[math.nan, 0.0, 0.0, 0.0], [0.0, 0.0, math.inf, 0.0], [0.5, -0.5, 0.0, -math.inf]]


class DecodeBoxes(torch.nn.Module):
    """Calls maskrcnn_ops.decode_boxes in `dtype` (the casts are part of the
    exported graph); the boxes come back as float64, which holds each dtype
    exactly."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return maskrcnn_ops.decode_boxes(deltas.to(self.dtype), boxes, BOX_WEIGHTS).to(torch.float64)


CLASSES = Dim("classes", min=1)
DECODE_SHAPES = ({0: K, 1: 4 * CLASSES}, {0: K})


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_boxes_to_onnx_matches_ours(dtype):
    g = torch.Generator().manual_seed(11)
    module = DecodeBoxes(dtype)
    run = to_onnxruntime(module, (random_deltas(5, 8, generator=g), random_boxes(5, generator=g)), DECODE_SHAPES)
    assert "Exp" in operator_types(run.model)

    for classes in (1, 3, 7):
        deltas = random_deltas(40, 4 * classes, generator=g)
        deltas[: len(SPECIAL_DELTAS), :4] = torch.tensor(SPECIAL_DELTAS)
        boxes = random_boxes(40, generator=g)
        assert (deltas[:, 2::4] / BOX_WEIGHTS[2] > maskrcnn_ops.boxes.DEFAULT_CLIP).any()  # the clip is reached
        (decoded,) = run(deltas, boxes)
        expected = module(deltas, boxes)
        assert decoded.shape == (40, 4 * classes) and decoded.dtype == torch.float64
        assert_decoded_close(decoded, expected, expected, dtype)


def test_decode_boxes_to_onnx_no_boxes():
    module = DecodeBoxes(torch.float32)
    g = torch.Generator().manual_seed(12)
    run = to_onnxruntime(module, (random_deltas(5, 8, generator=g), random_boxes(5, generator=g)), DECODE_SHAPES)
    (decoded,) = run(torch.zeros(0, 12), torch.zeros(0, 4))
    assert decoded.shape == (0, 12)


class FilterProposals(torch.nn.Module):
    """Calls maskrcnn_ops::rpn_decode_filter in `dtype`, as
    generate_proposals does (boxes come back as float64)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, deltas, anchors, scores, image_sizes):
        boxes, keep = torch.ops.maskrcnn_ops.rpn_decode_filter(
            deltas.to(self.dtype), anchors, scores, image_sizes, [1.0, 1.0, 1.0, 1.0], maskrcnn_ops.boxes.DEFAULT_CLIP,
            6.0, 0.3,  # min_size, score_thresh
        )
        return boxes.to(torch.float64), keep


IMAGES, PER_IMAGE = Dim("images", min=1), Dim("per_image", min=1)
FILTER_SHAPES = ({0: IMAGES, 1: PER_IMAGE}, {0: IMAGES, 1: PER_IMAGE}, {0: IMAGES, 1: PER_IMAGE}, {0: IMAGES})


def proposal_inputs(images: int, per_image: int, *, generator: torch.Generator):
    """deltas, anchors, scores [images, per_image] and image sizes (height,
    width) [images, 2] of at most 100 px: many boxes reach past the image
    (random_boxes fills 140 px), and clipped or not some are under 6 px."""
    deltas = random_deltas(images, per_image, 4, generator=generator) / 4
    anchors = random_boxes(images * per_image, generator=generator).view(images, per_image, 4)
    scores = torch.rand(images, per_image, generator=generator)
    image_sizes = torch.randint(40, 101, (images, 2), generator=generator).to(torch.float32)
    return deltas, anchors, scores, image_sizes


@pytest.mark.parametrize("dtype", DTYPES)
def test_rpn_decode_filter_to_onnx_matches_ours(dtype):
    g = torch.Generator().manual_seed(13)
    module = FilterProposals(dtype)
    run = to_onnxruntime(module, proposal_inputs(2, 6, generator=g), FILTER_SHAPES)
    assert {"Exp", "GreaterOrEqual", "And"} <= operator_types(run.model)

    deltas, anchors, scores, image_sizes = proposal_inputs(3, 50, generator=g)
    deltas[0, : len(SPECIAL_DELTAS)] = torch.tensor(SPECIAL_DELTAS)
    boxes, keep = run(deltas, anchors, scores, image_sizes)
    expected_boxes, expected_keep = module(deltas, anchors, scores, image_sizes)
    unclipped = maskrcnn_ops.decode_boxes(deltas.to(dtype).view(-1, 4), anchors.view(-1, 4), [1.0] * 4).view_as(deltas)
    assert boxes.shape == (3, 50, 4) and keep.dtype == torch.bool
    assert_decoded_close(boxes, expected_boxes, unclipped, dtype)
    # A box whose side is within the tolerance of min_size could be flagged
    # differently; none of these is.
    assert torch.equal(keep, expected_keep)

    # The case clips boxes and drops some for their size, some for their score.
    limits = image_sizes.flip(1).repeat(1, 2)[:, None, :].to(torch.float64)
    assert ((expected_boxes == 0) | (expected_boxes == limits)).any()
    large = FilterProposals(dtype)(deltas, anchors, torch.ones_like(scores), image_sizes)[1]
    assert (~large).any() and (large & (scores < 0.3)).any() and expected_keep.any()


# ------------------------------------------------------------ paste_masks --


class PasteInto(torch.nn.Module):
    """paste_masks into the image's size, probabilities and binarized."""

    def forward(self, masks, boxes, image):
        size = image.shape[-2:]
        return maskrcnn_ops.paste_masks(masks, boxes, size), maskrcnn_ops.paste_masks(masks, boxes, size, threshold=0.5)


def test_paste_masks_to_onnx_through_its_decomposition():
    """paste_masks has no translation: onnx_decompositions() replaces it by
    the dense reference before the ONNX export, whose result in onnxruntime
    (for another image size and boxes in and out of the image) equals the op
    within 1e-5 and, binarized, except pixels within 1e-4 of 0.5."""
    from test_paste_ops import make_boxes

    masks, boxes = torch.rand(6, 28, 28), make_boxes(6, 40, 50, outside=True)
    shapes = ({0: Dim("detections", min=1)}, {0: Dim("detections", min=1)},
              {1: Dim("height", min=2, max=4000), 2: Dim("width", min=2, max=4000)})
    program = torch.export.export(PasteInto(), (masks, boxes, torch.zeros(3, 40, 50)), dynamic_shapes=shapes)
    program = program.run_decompositions(maskrcnn_ops.onnx_decompositions())
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=maskrcnn_ops.onnx_translation_table(),
                                     optimize=False, verbose=False)
    session = onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    masks, boxes, image = torch.rand(9, 28, 28), make_boxes(9, 57, 31, seed=4, outside=True), torch.zeros(3, 57, 31)
    feed = {spec.name: t.numpy() for spec, t in zip(session.get_inputs(), (masks, boxes, image))}
    probabilities, binary = (torch.from_numpy(np.asarray(out)) for out in session.run(None, feed))
    expected = maskrcnn_ops.paste_masks(masks, boxes, (57, 31))
    torch.testing.assert_close(probabilities, expected, rtol=0, atol=1e-5)
    settled = (expected - 0.5).abs() > 1e-4
    assert torch.equal(binary[settled], (expected > 0.5)[settled])
