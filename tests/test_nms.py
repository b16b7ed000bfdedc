"""Tests of maskrcnn_ops.nms / batched_nms / batched_nms_keep /
nms_keep_rows / batched_nms_padded and the raw dispatcher ops.

Oracles:
  * maskrcnn_ops.reference.nms / batched_nms: the textbook O(N^2) greedy loop
    in pure PyTorch, IoU in the kernels' precision (float32, float64 for
    float64 boxes; half types converted to float32 first), compared with the
    Python float threshold in float64;
  * torchvision.ops.nms / batched_nms (CPU, float32 and float64): the
    interface and the exact results we promise to match;
  * a straightforward per-image Python loop for batched_nms_padded;
  * reference.nms_keep_rows (reference.nms on each row) and batched_nms_keep
    with the row as image id for nms_keep_rows.

NMS results are indices, so every comparison is exact (torch.equal): same
boxes, same order. Every numeric test takes the ``device`` fixture
(tests/conftest.py), so it runs on CPU and on CUDA, the latter skipped
without a GPU. The reference is an O(N^2) Python loop, so the cases compared
with it stay small (N <= 500); the large cases use torchvision.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import maskrcnn_ops
from maskrcnn_ops import reference

ops = torch.ops.maskrcnn_ops



def cuda_only(test):
    """Marks a CUDA-only test (no ``device`` parameter): skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


FULL_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
HALF_DTYPES = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
ALL_DTYPES = FULL_DTYPES + HALF_DTYPES

# ------------------------------------------------------------------ helpers --


def make_boxes(n, *, seed=0, scale=100.0, offset=0.0, dtype=torch.float32, device="cpu"):
    """Reproducible boxes [N, 4] and scores [N] (drawn in float64, then cast).

    Random boxes with corners in [offset, offset + scale) and sides up to
    0.4 * scale, plus (for N >= 8) rows overwritten with the hard cases: exact
    duplicates of other boxes, boxes nested inside others, zero-width and
    zero-height boxes. Half of the scores come from ten levels (0.0, 0.1,
    ..., 0.9), so many are tied; the others are continuous.
    """
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * scale * 0.4
    boxes = torch.cat([xy, xy + wh], 1)
    k = n // 8
    if k > 0:
        def rows():
            return torch.randint(0, n, (k,), generator=g)

        boxes[rows()] = boxes[rows()].clone()  # exact duplicates
        src = rows()
        center = (boxes[src, :2] + boxes[src, 2:]) / 2
        half = (boxes[src, 2:] - boxes[src, :2]) / 2 * torch.rand(k, 1, generator=g, dtype=torch.float64)
        boxes[rows()] = torch.cat([center - half, center + half], 1)  # nested inside another box
        zero_w, zero_h = rows(), rows()
        boxes[zero_w, 2] = boxes[zero_w, 0]  # zero width
        boxes[zero_h, 3] = boxes[zero_h, 1]  # zero height
    boxes = boxes + offset
    scores = torch.randint(0, 10, (n,), generator=g).to(torch.float64) / 10
    continuous = torch.rand(n, generator=g) < 0.5
    scores[continuous] = torch.rand(int(continuous.sum()), generator=g, dtype=torch.float64)
    return boxes.to(dtype=dtype, device=device), scores.to(dtype=dtype, device=device)


def make_labels(n, high, *, seed=0, dtype=torch.int64, device="cpu"):
    """Reproducible integer labels in [0, high) (class or image ids)."""
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, high, (n,), generator=g).to(dtype=dtype, device=device)


# Box families: (scale, offset). "mixed" straddles the origin; "huge" has
# coordinates up to 1e6; "far" puts 100-pixel boxes around 1e6, where float32
# keeps only 1/16 of a pixel; "tiny" has coordinates of order 1e-3.
FAMILIES = {
    "mixed": (100.0, -50.0),
    "huge": (1e6, 0.0),
    "far": (100.0, 1e6),
    "tiny": (1e-3, 0.0),
}
SIZES = [2, 9, 40, 150, 500]


def assert_same(actual, expected, msg=""):
    """Exact equality of index tensors (values, order, dtype), on any device."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype == torch.int64, msg
    assert torch.equal(actual, expected), f"{msg}\n  ours:     {actual.tolist()}\n  expected: {expected.tolist()}"


def keep_mask(indices, n):
    """Kept indices -> bool [N] mask."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[indices.cpu()] = True
    return mask


def padded_oracle(boxes, scores, idxs, iou_threshold, max_output, image_ids, num_images):
    """batched_nms_padded written the obvious way: per image, the indices kept
    by reference.batched_nms (by decreasing score, ties by index), the first
    max_output of them, padded with -1."""
    boxes, scores, idxs = boxes.cpu(), scores.cpu(), idxs.cpu()
    image_ids = torch.zeros(len(scores), dtype=torch.int64) if image_ids is None else image_ids.cpu()
    indices = torch.full((num_images, max_output), -1, dtype=torch.int64)
    counts = torch.zeros(num_images, dtype=torch.int64)
    for image in range(num_images):
        members = torch.nonzero(image_ids == image).flatten()
        kept = members[reference.batched_nms(boxes[members], scores[members], idxs[members], iou_threshold)]
        kept = kept[:max_output]
        indices[image, : len(kept)] = kept
        counts[image] = len(kept)
    return indices, counts


def iou_float(a, b, dtype):
    """IoU of boxes a (the kept one) and b with the kernels' arithmetic, in
    float32 (float64 for float64), as a Python float."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    a, b = torch.tensor(a, dtype=acc), torch.tensor(b, dtype=acc)
    w = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    h = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = w * h
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return (inter / (area_a + area_b - inter)).item()


# -------------------------------------------- nms vs reference / torchvision --


@pytest.mark.parametrize("iou_threshold", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_nms_matches_reference_and_torchvision(device, dtype, family, iou_threshold):
    """Identical kept indices (same order) as the reference and as
    torchvision.ops.nms, over many seeds and sizes of box sets with
    duplicates, tied scores, nested and zero-area boxes, at 1e6 and 1e-3
    scales. Threshold 0 suppresses any overlap; threshold 1 nothing (IoU <= 1
    and only IoU strictly above suppresses)."""
    scale, offset = FAMILIES[family]
    for seed, n in enumerate(SIZES * 2):
        boxes, scores = make_boxes(n, seed=seed, scale=scale, offset=offset, dtype=dtype, device=device)
        ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
        assert ours.device == boxes.device
        msg = f"seed={seed} n={n}"
        assert_same(ours, reference.nms(boxes, scores, iou_threshold), msg)
        assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold), msg)
    if iou_threshold == 1.0:
        assert len(ours) == n


@pytest.mark.parametrize("iou_threshold", [0.3, 0.7, 0.05, 0.999999, 1e-30, -0.1, -1e-9, 2.0, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_nms_other_thresholds(device, dtype, iou_threshold):
    """More thresholds, including negative ones (IoU 0 then suppresses, so a
    box suppresses every other box it is compared with unless the IoU is
    NaN), thresholds above 1 and infinities: the reference and torchvision."""
    for seed, n in enumerate([3, 40, 200]):
        boxes, scores = make_boxes(n, seed=seed, dtype=dtype, device=device)
        ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
        assert_same(ours, reference.nms(boxes, scores, iou_threshold), f"seed={seed}")
        assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold), f"seed={seed}")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_nms_half_types_match_reference(device, dtype):
    """float16 / bfloat16 boxes and scores: the reference run on the same half
    inputs (it converts the boxes to float32, as the kernels do). torchvision
    has no half CPU kernel, so it is no oracle here. Also: the result equals
    that of the same (rounded) boxes passed as float32."""
    for seed, n in enumerate([1, 9, 60, 250]):
        boxes, scores = make_boxes(n, seed=seed, dtype=dtype, device=device)
        for iou_threshold in (0.0, 0.3, 0.5, 0.7, 1.0, -0.1):
            ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
            assert_same(ours, reference.nms(boxes, scores, iou_threshold), f"seed={seed} t={iou_threshold}")
            assert_same(ours, maskrcnn_ops.nms(boxes.float(), scores, iou_threshold))


def test_nms_mixed_dtypes(device):
    """Scores of another floating dtype than the boxes are accepted: only
    their order matters."""
    boxes, scores = make_boxes(100, seed=3, device=device)
    expected = maskrcnn_ops.nms(boxes, scores, 0.5)
    assert_same(maskrcnn_ops.nms(boxes, scores.double(), 0.5), expected)
    assert_same(maskrcnn_ops.nms(boxes.double(), scores, 0.5), reference.nms(boxes.double(), scores, 0.5))
    # float16 scores round some distinct scores to ties: the reference decides.
    assert_same(maskrcnn_ops.nms(boxes, scores.half(), 0.5), reference.nms(boxes, scores.half(), 0.5))


def test_nms_one_box(device):
    """A single box is kept whatever the threshold (even a negative one: there
    is nothing to compare it with), by every function."""
    boxes = torch.tensor([[1.0, 2.0, 5.0, 7.0]], device=device)
    scores = torch.tensor([0.3], device=device)
    idxs = torch.tensor([4], device=device)
    for iou_threshold in (0.0, 0.5, 1.0, -1.0):
        assert_same(maskrcnn_ops.nms(boxes, scores, iou_threshold), torch.tensor([0]))
        assert_same(maskrcnn_ops.batched_nms(boxes, scores, idxs, iou_threshold), torch.tensor([0]))
        assert maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, iou_threshold).tolist() == [True]
        indices, counts = maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, iou_threshold, 3)
        assert indices.tolist() == [[0, -1, -1]] and counts.tolist() == [1]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_no_boxes(device, dtype):
    """N = 0: empty int64 results (on the input's device), an empty keep mask,
    and an all -1 padded table with zero counts for every image."""
    boxes = torch.zeros(0, 4, dtype=dtype, device=device)
    scores = torch.zeros(0, dtype=dtype, device=device)
    idxs = torch.zeros(0, dtype=torch.int64, device=device)
    for result in (maskrcnn_ops.nms(boxes, scores, 0.5), maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5)):
        assert result.shape == (0,) and result.dtype == torch.int64 and result.device == boxes.device
    keep = maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5, idxs)
    assert keep.shape == (0,) and keep.dtype == torch.bool and keep.device == boxes.device
    indices, counts = maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 4, idxs, num_images=3)
    assert indices.dtype == counts.dtype == torch.int64
    assert indices.cpu().tolist() == [[-1] * 4] * 3 and counts.cpu().tolist() == [0, 0, 0]


@pytest.mark.parametrize("iou_threshold", [0.0, 0.05, 0.5, 0.7])
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_nms_large_single_segment(device, dtype, iou_threshold):
    """N = 5000 boxes in one segment (the CPU kernel's pruning grid, with
    thresholds from "any overlap" to 0.7): torchvision's result."""
    boxes, scores = make_boxes(5000, seed=7, scale=1000.0, dtype=dtype, device=device)
    ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
    assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold))
    # The case is not trivial: many boxes suppressed, many kept.
    assert 500 < len(ours) < 4500


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_threshold_equal_to_iou_is_not_suppressed(device, dtype):
    """The exact comparison: for a pair of boxes whose IoU (in float32, or
    float64 for float64 boxes) is v, a threshold of exactly v keeps both
    (strictly greater suppresses), and the largest double below v suppresses,
    even though in float32 that double rounds to v itself (the threshold is
    compared as a double, as in torchvision's CPU kernel). Integer coordinates
    below 64, exact in every dtype. torchvision agrees for float32/float64."""
    g = torch.Generator().manual_seed(11)
    checked = 0
    while checked < 25:
        xy = torch.randint(0, 40, (2, 2), generator=g)
        wh = torch.randint(1, 24, (2, 2), generator=g)
        pair = torch.cat([xy, xy + wh], 1).tolist()
        v = iou_float(pair[0], pair[1], dtype)
        if not 0 < v < 1:
            continue
        checked += 1
        boxes = torch.tensor(pair, dtype=dtype, device=device)
        scores = torch.tensor([0.9, 0.4], dtype=dtype, device=device)
        below = math.nextafter(v, -math.inf)
        for t, expected in [(v, [0, 1]), (below, [0])]:
            ours = maskrcnn_ops.nms(boxes, scores, t)
            assert ours.cpu().tolist() == expected, f"boxes={pair} iou={v!r} threshold={t!r}"
            assert_same(ours, reference.nms(boxes, scores, t))
            if dtype in (torch.float32, torch.float64):
                assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), t))
        if dtype != torch.float64:
            # Doubles half-way to the float32 neighbours of v: above v keeps,
            # below suppresses.
            up = torch.tensor(v, dtype=torch.float32).nextafter(torch.tensor(math.inf)).item()
            down = torch.tensor(v, dtype=torch.float32).nextafter(torch.tensor(-math.inf)).item()
            assert maskrcnn_ops.nms(boxes, scores, (v + up) / 2).cpu().tolist() == [0, 1]
            assert maskrcnn_ops.nms(boxes, scores, (v + down) / 2).cpu().tolist() == [0]


@pytest.mark.parametrize("iou_threshold", [1 - 1e-7, 1 - 3e-7, 1 - 1e-6, 1 - 1e-12, 0.9999])
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_near_duplicates_near_threshold_one(device, dtype, iou_threshold):
    """Boxes that differ from one another by a few ulps, with thresholds just
    below 1: the IoUs sit within rounding of the threshold, which stresses the
    margin of the CPU kernel's pruning bounds (its size bins and grid cells
    are about log(1/t) and 1 - t wide, i.e. tiny here). torchvision's result,
    exactly."""
    g = torch.Generator().manual_seed(5)
    n = 400
    base = torch.tensor([10.0, 20.0, 50.0, 70.0], dtype=dtype)
    jitter = torch.randint(-4, 5, (n, 4), generator=g).to(dtype) * torch.finfo(dtype).eps * 64
    boxes = (base * (1 + jitter)).to(device)
    scores = torch.rand(n, generator=g).to(dtype=dtype, device=device)
    ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
    assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold))
    assert_same(ours, reference.nms(boxes, scores, iou_threshold))


@pytest.mark.parametrize("iou_threshold", [1e-6, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_areas_spanning_many_orders_of_magnitude(device, dtype, iou_threshold):
    """Box sizes from 1e-7 to 1e7 (areas over 28 orders of magnitude): the
    CPU kernel's size bins span far more than their usual log(1/t) each.
    torchvision's result, exactly."""
    g = torch.Generator().manual_seed(9)
    n = 1500
    scale = 10 ** (torch.rand(n, 1, generator=g, dtype=torch.float64) * 14 - 7)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64)
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) + 0.2
    boxes = (torch.cat([xy, xy + wh], 1) * scale).to(dtype=dtype, device=device)
    scores = torch.rand(n, generator=g).to(dtype=dtype, device=device)
    ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
    assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold))
    assert len(ours) < n


def test_non_contiguous_inputs(device):
    """Strided views (every other row, a column-permuted copy viewed back,
    scores with a stride) give the same result as their contiguous copies."""
    boxes, scores = make_boxes(300, seed=4, device=device)
    idxs = make_labels(300, 5, device=device)
    wide = torch.stack([boxes, -boxes], 2).reshape(300, 8)[:, ::2]  # [N, 4] with stride (8, 2)
    assert not wide.is_contiguous() and torch.equal(wide, boxes)
    sparse_scores = torch.stack([scores, -scores], 1)[:, 0]
    assert not sparse_scores.is_contiguous()
    strided_idxs = torch.stack([idxs, idxs], 1)[:, 1]
    assert_same(maskrcnn_ops.nms(wide, sparse_scores, 0.5), maskrcnn_ops.nms(boxes, scores, 0.5))
    assert_same(
        maskrcnn_ops.batched_nms(wide, sparse_scores, strided_idxs, 0.5),
        maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5),
    )
    assert torch.equal(
        maskrcnn_ops.batched_nms_keep(wide, sparse_scores, strided_idxs, 0.5, strided_idxs),
        maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5, idxs),
    )
    transposed = boxes.t().contiguous().t()  # column-major [N, 4]
    assert_same(maskrcnn_ops.nms(transposed, scores, 0.5), maskrcnn_ops.nms(boxes, scores, 0.5))


# ------------------------------------------- the CPU kernel's pruning grid --
#
# The CPU kernel tests a box only against kept boxes whose width and height
# are within the ratio t of its own and whose centres are within reach, found
# in a grid of (width bin, height bin, centre cell) (csrc/cpu/nms.cpp); a
# segment of >= 512 boxes that can overlap goes through it. These cases sit
# at the edges of its bounds: any pair the pruning wrongly skipped would show
# as a difference from torchvision's exhaustive loop.


def boxes_from_centres(cx, cy, w, h):
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


GRID_THRESHOLDS = [1e-7, 1e-5, 0.05, 0.3, 0.5, 0.7, 0.9, 0.999]


@pytest.mark.parametrize("iou_threshold", GRID_THRESHOLDS)
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_grid_wide_and_thin_boxes(device, dtype, iou_threshold):
    """Aspect ratios from 1:1000 to 1000:1 (widths and heights are binned
    separately), centres on a few shared rows and columns so that thin boxes
    cross and stack, and copies of a sixth of them jittered by 1e-5 of their
    sides: torchvision's result."""
    g = torch.Generator().manual_seed(31)
    n = 1200
    cx = torch.randint(0, 12, (n,), generator=g).double() * 25 + torch.rand(n, generator=g, dtype=torch.float64)
    cy = torch.randint(0, 12, (n,), generator=g).double() * 25 + torch.rand(n, generator=g, dtype=torch.float64)
    aspect = torch.exp((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * math.log(1000))
    area = torch.exp(torch.rand(n, generator=g, dtype=torch.float64) * math.log(1e4))
    boxes = boxes_from_centres(cx, cy, (area * aspect).sqrt(), (area / aspect).sqrt())
    copies = boxes[: n // 6]
    sides = (copies[:, 2:] - copies[:, :2]).repeat(1, 2)
    boxes[-(n // 6):] = copies + sides * 1e-5 * (torch.rand(n // 6, 4, generator=g, dtype=torch.float64) * 2 - 1)
    boxes = boxes.to(dtype=dtype, device=device)
    scores = torch.rand(n, generator=g).to(dtype=dtype, device=device)
    ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
    assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold))
    assert len(ours) < n


@pytest.mark.parametrize("iou_threshold", [0.25, 0.5, 0.5 - 1e-9, 0.7, 0.9, 0.9 + 1e-9])
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_grid_boxes_sharing_centres(device, dtype, iou_threshold):
    """Concentric boxes: 40 centres, each with 30 boxes whose sides step by
    factors of sqrt(t) for thresholds t near the tested ones, so that many
    pairs at centre distance 0 have an IoU (the ratio of their areas) within
    rounding of the threshold, plus copies shifted by a fraction of a side:
    torchvision's result."""
    g = torch.Generator().manual_seed(32)
    centres = torch.rand(40, 2, generator=g, dtype=torch.float64) * 500
    steps = torch.tensor([0.25, 0.5, 0.7, 0.9], dtype=torch.float64).sqrt()
    rows = []
    for c in centres:
        step = steps[torch.randint(0, 4, (1,), generator=g)].item()
        base = 10 + 90 * torch.rand(1, generator=g, dtype=torch.float64).item()
        k = torch.arange(30, dtype=torch.float64)
        w = base * step ** (k % 10)
        h = base * step ** (k // 10) * 1.5
        shift = torch.where(k % 3 == 0, 0.1 * w, torch.zeros_like(w))
        rows.append(boxes_from_centres(c[0] + shift, c[1].expand(30), w, h))
    boxes = torch.cat(rows).to(dtype=dtype, device=device)
    n = len(boxes)
    scores = torch.rand(n, generator=g).to(dtype=dtype, device=device)
    ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
    assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold))
    assert len(ours) < n


@pytest.mark.parametrize("iou_threshold", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_grid_tiny_and_huge_boxes_together(device, dtype, iou_threshold):
    """One segment with ordinary boxes, tiny ones (sides of 1e-20 in float32,
    whose areas are subnormal, 1e-160 in float64) and huge ones (sides of
    1e17 in float32, 1e150 in float64, areas still finite), each group with
    overlapping members: outside the sizes whose rounding the kernel's
    bounds assume, where it prunes by intersection only. torchvision's
    result, and per group the result the group gets alone."""
    tiny, huge = (1e-20, 1e17) if dtype == torch.float32 else (1e-160, 1e150)
    groups = []
    for seed, scale in enumerate((100.0, tiny, huge)):
        boxes, _ = make_boxes(300, seed=40 + seed, scale=1.0, dtype=torch.float64)
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 0.01)
        groups.append(boxes * scale)
    boxes = torch.cat(groups).to(dtype=dtype, device=device)
    scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(40)).to(dtype=dtype, device=device)
    ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
    assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold))
    kept = keep_mask(ours, len(boxes))
    for k in range(3):
        part = slice(300 * k, 300 * (k + 1))
        alone = maskrcnn_ops.nms(boxes[part], scores[part], iou_threshold)
        assert torch.equal(kept[part], keep_mask(alone, 300))
        assert 0 < len(alone) < 300


@pytest.mark.parametrize("iou_threshold", [0.3, 0.7])
def test_grid_far_from_the_origin_float64(device, iou_threshold):
    """float64 boxes of sides 1e-3 to 1 around 1e12 (where a double keeps
    about 1e-4: the centres and sides the kernel derives in double are off by
    a good part of a small box) and unit boxes around 1e15: torchvision's
    result."""
    for seed, (offset, scale) in enumerate([(1e12, 1.0), (1e15, 30.0)]):
        boxes, scores = make_boxes(600, seed=50 + seed, scale=scale, dtype=torch.float64)
        boxes = (boxes + offset).to(device)
        scores = scores.to(device)
        ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
        assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold))
        assert len(ours) < 600


@pytest.mark.parametrize("iou_threshold", [0.0, 1e-9, 1e-4])
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_grid_touching_and_barely_overlapping_boxes(device, dtype, iou_threshold):
    """Rows of equal boxes whose neighbours touch or overlap by one ulp of
    the coordinates (at 1, 1e3 and 1e6), the rows a few ulps apart too:
    IoUs of 0 and of about 1e-7 (1e-16 in float64), at the very edge of the
    kernel's "the boxes intersect" bound, which it uses for small
    thresholds. torchvision's result."""
    for magnitude in (1.0, 1e3, 1e6):
        side = torch.tensor(magnitude, dtype=dtype)
        ulp = (torch.nextafter(side * 300, torch.tensor(math.inf, dtype=dtype)) - side * 300).item()
        rows = []
        for k, step in enumerate((side.item() - ulp, side.item(), side.item() + ulp)):
            x = torch.arange(100, dtype=torch.float64) * step + magnitude * 300
            y = torch.full_like(x, magnitude * 300 + k * (side.item() - ulp))
            rows.append(torch.stack([x, y, x + side.item(), y + side.item()], 1))
        boxes = torch.cat(rows).to(dtype=dtype, device=device)
        scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(62)).to(dtype=dtype, device=device)
        ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
        assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold), f"magnitude {magnitude}")
        if iou_threshold == 0.0:
            assert len(ours) < len(boxes) / 2


@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_grid_equal_scores(device, dtype):
    """All scores equal (the order is the index order), proposal-like boxes
    with exact duplicates: torchvision's result, and the result of distinct
    scores decreasing with the index."""
    boxes, _ = make_boxes(1500, seed=60, scale=800.0, dtype=dtype, device=device)
    boxes = torch.cat([boxes, boxes[:300]])
    n = len(boxes)
    same = torch.full((n,), 0.5, dtype=dtype, device=device)
    decreasing = torch.linspace(1, 0, n, dtype=torch.float64).to(dtype=dtype, device=device)
    for iou_threshold in (0.3, 0.5, 0.7):
        ours = maskrcnn_ops.nms(boxes, same, iou_threshold)
        assert_same(ours, torchvision.ops.nms(boxes.cpu(), same.cpu(), iou_threshold))
        assert_same(ours, maskrcnn_ops.nms(boxes, decreasing, iou_threshold))


@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_grid_lattice_ious_equal_to_the_threshold(device, dtype):
    """Integer boxes on a small lattice (sides 1 to 8, corners 0 to 40): many
    IoUs are simple fractions, and thresholds equal to them keep the pair
    (only strictly above suppresses) while the double just below does not.
    Centres and sides land exactly on the grid's cell and bin edges.
    torchvision's result."""
    g = torch.Generator().manual_seed(61)
    n = 2000
    xy = torch.randint(0, 40, (n, 2), generator=g)
    wh = torch.randint(1, 9, (n, 2), generator=g)
    boxes = torch.cat([xy, xy + wh], 1).to(dtype=dtype, device=device)
    scores = torch.randint(0, 50, (n,), generator=g).to(dtype=dtype, device=device)
    for v in (1 / 3, 0.5, 4 / 7, 9 / 16, 0.6, 2 / 3, 0.75):
        for t in (v, math.nextafter(v, -math.inf)):
            ours = maskrcnn_ops.nms(boxes, scores, t)
            assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), t), f"t={t!r}")


@st.composite
def grid_cases(draw):
    """Segments large enough for the grid (512 to 1000 boxes) built to be
    degenerate: corners on a coarse lattice of a random pitch (duplicates,
    shared edges and centres, IoUs equal to simple fractions), sides up to
    a random multiple of the pitch, optionally stretched into thin boxes,
    tied scores, and a threshold from a list or any float in [0, 1)."""
    n = draw(st.integers(512, 1000))
    return dict(
        n=n,
        seed=draw(st.integers(0, 2**31 - 1)),
        pitch=draw(st.sampled_from([1e-3, 0.5, 1.0, 7.0, 1e4])),
        lattice=draw(st.integers(2, 60)),
        max_side=draw(st.integers(1, 12)),
        stretch=draw(st.sampled_from([1.0, 1.0, 30.0])),
        score_levels=draw(st.sampled_from([2, 7, 1000])),
        iou_threshold=draw(st.sampled_from([0.0, 1e-6, 0.1, 1 / 3, 0.5, 2 / 3, 0.7, 0.95]) | st.floats(0.0, 0.9999)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
    )


@settings(max_examples=40, deadline=None)
@given(case=grid_cases())
def test_fuzz_grid_against_torchvision(case):
    """Random degenerate segments through the CPU kernel's grid: exactly
    torchvision's result."""
    g = torch.Generator().manual_seed(case["seed"])
    n, pitch = case["n"], case["pitch"]
    xy = torch.randint(0, case["lattice"], (n, 2), generator=g).double()
    wh = torch.randint(1, case["max_side"] + 1, (n, 2), generator=g).double()
    thin = torch.rand(n, generator=g) < 0.5
    wh[thin, 0] *= case["stretch"]
    boxes = (torch.cat([xy, xy + wh], 1) * pitch).to(case["dtype"])
    levels = case["score_levels"]
    scores = (torch.randint(0, levels, (n,), generator=g).double() / levels).to(case["dtype"])
    t = case["iou_threshold"]
    assert_same(maskrcnn_ops.nms(boxes, scores, t), torchvision.ops.nms(boxes, scores, t))


def test_cpu_buffers_across_calls():
    """The CPU kernel keeps its buffers between calls, and releases them after
    a segment of more than 65,536 boxes: a call of 80,000 boxes in four far
    apart regions keeps the union of what each region keeps alone, and calls
    before and after it give torchvision's results."""
    small, small_scores = make_boxes(3000, seed=90, scale=300.0)
    expected = torchvision.ops.nms(small, small_scores, 0.5)
    assert_same(maskrcnn_ops.nms(small, small_scores, 0.5), expected)
    regions = [make_boxes(20000, seed=91 + k, scale=3000.0) for k in range(4)]
    boxes = torch.cat([b + 1e4 * k for k, (b, _) in enumerate(regions)])
    scores = torch.cat([s for _, s in regions])
    kept = keep_mask(maskrcnn_ops.nms(boxes, scores, 0.5), len(boxes))
    for k, (b, s) in enumerate(regions):
        assert torch.equal(kept[20000 * k : 20000 * (k + 1)], keep_mask(maskrcnn_ops.nms(b, s, 0.5), 20000))
    assert_same(maskrcnn_ops.nms(small, small_scores, 0.5), expected)


@pytest.mark.parametrize("kept_before", [1, 5, 15, 16, 17])
def test_cpu_lanes_past_the_kept_boxes_are_ignored(kept_before):
    """The CPU kernel tests a box against the kept boxes in whole vectors of
    16, reading slots past the last kept box (left from earlier calls) and
    masking them off. A first call keeps 40 disjoint boxes (the slots then
    hold them); a second call keeps `kept_before` boxes far from them and
    then meets copies of the first call's boxes: nothing suppresses them, so
    every box is kept, as torchvision keeps them."""
    g = torch.Generator().manual_seed(95)
    disjoint = torch.arange(40, dtype=torch.float32)[:, None] * 20 + torch.tensor([0.0, 0.0, 10.0, 10.0])
    assert len(maskrcnn_ops.nms(disjoint, torch.linspace(1, 0.5, 40), 0.5)) == 40
    far = disjoint[:kept_before] + 5000
    boxes = torch.cat([far, disjoint])
    scores = torch.cat([torch.full((kept_before,), 2.0), torch.rand(40, generator=g)])
    ours = maskrcnn_ops.nms(boxes, scores, 0.5)
    assert_same(ours, torchvision.ops.nms(boxes, scores, 0.5))
    assert len(ours) == len(boxes)


@pytest.mark.parametrize("iou_threshold", [0.5, 0.7])
def test_segments_in_parallel(iou_threshold):
    """Calls of >= 32,768 boxes run their segments on the CPU kernel's
    threads: batched_nms over 6 classes of 6,000 boxes (grid segments) and
    batched_nms_keep over 500 (image, class) segments of about 80 (tested
    against every kept box): the same with one thread and two, and each
    segment's result that of nms on its boxes alone (and torchvision's for
    one large class)."""
    boxes, scores = make_boxes(36000, seed=70, scale=6000.0)
    idxs = make_labels(36000, 6, seed=70)
    small_boxes, small_scores = make_boxes(40000, seed=71, scale=300.0)
    classes, images = make_labels(40000, 50, seed=71), make_labels(40000, 10, seed=72)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            results.append((
                maskrcnn_ops.batched_nms(boxes, scores, idxs, iou_threshold),
                maskrcnn_ops.batched_nms_keep(small_boxes, small_scores, classes, iou_threshold, images),
            ))
    finally:
        torch.set_num_threads(threads)
    (large, keep), (large_two, keep_two) = results
    assert_same(large, large_two)
    assert torch.equal(keep, keep_two)
    kept = keep_mask(large, 36000)
    for c in range(6):
        members = torch.nonzero(idxs == c).flatten()
        alone = maskrcnn_ops.nms(boxes[members], scores[members], iou_threshold)
        assert torch.equal(kept[members], keep_mask(alone, len(members)))
        if c == 0:
            assert_same(alone, torchvision.ops.nms(boxes[members], scores[members], iou_threshold))
    segment = images * 50 + classes
    by_segment = torch.argsort(segment, stable=True).split(torch.bincount(segment, minlength=500).tolist())
    for members in by_segment:
        alone = maskrcnn_ops.nms(small_boxes[members], small_scores[members], iou_threshold)
        assert torch.equal(keep[members], keep_mask(alone, len(members)))


# ------------------------------------------------------------ batched_nms --


@pytest.mark.parametrize("idxs_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("num_classes", [1, 5, 80])
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_batched_nms_matches_reference_and_torchvision(device, dtype, num_classes, idxs_dtype):
    """batched_nms equals reference.batched_nms and torchvision's (N <= 1000: 4000 coordinates,
    where torchvision offsets each class's coordinates and runs one stable
    nms). Coordinates are multiples of 1/4 below 500, so torchvision's offsets
    (multiples of max_coordinate + 1) are exact in float32 and its IoUs equal
    ours bit for bit."""
    for seed, n in enumerate([2, 30, 300]):
        boxes, scores = make_boxes(n, seed=seed, scale=400.0, dtype=torch.float64)
        boxes = ((boxes * 4).round() / 4).to(dtype=dtype, device=device)
        scores = scores.to(dtype=dtype, device=device)
        idxs = make_labels(n, num_classes, seed=seed, dtype=idxs_dtype, device=device)
        for iou_threshold in (0.0, 0.5, 0.7, 1.0):
            ours = maskrcnn_ops.batched_nms(boxes, scores, idxs, iou_threshold)
            msg = f"seed={seed} n={n} t={iou_threshold}"
            assert_same(ours, reference.batched_nms(boxes, scores, idxs, iou_threshold), msg)
            theirs = torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), iou_threshold)
            assert_same(ours, theirs, msg)


@pytest.mark.parametrize("num_classes", [1, 80])
def test_batched_nms_large_against_unstable_torchvision(device, num_classes):
    """N = 6000 (> 1000 boxes on CPU): torchvision's batched_nms then loops over classes
    and orders the kept boxes with an *unstable* sort, so against it compare
    the set of kept indices and the scores in order (equal up to the order of
    tied scores). The reference is compared exactly (80 classes; for one class
    the 6000-box O(N^2) loop is left to torchvision). With one class, one
    large segment; with 80, segments processed in parallel."""
    boxes, scores = make_boxes(6000, seed=21, scale=1000.0, device=device)
    idxs = make_labels(6000, num_classes, seed=21, device=device)
    ours = maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5)
    theirs = torchvision.ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5)
    assert set(ours.tolist()) == set(theirs.tolist())
    assert torch.equal(scores.cpu()[ours.cpu()], scores.cpu()[theirs])
    # Ties by index: where scores are equal, indices increase.
    s, i = scores.cpu()[ours.cpu()], ours.cpu()
    tied = s[1:] == s[:-1]
    assert (s[1:] <= s[:-1]).all() and (i[1:][tied] > i[:-1][tied]).all()
    if num_classes > 1:
        assert_same(ours, reference.batched_nms(boxes, scores, idxs, 0.5))
    else:
        assert_same(ours, maskrcnn_ops.nms(boxes, scores, 0.5))


@pytest.mark.parametrize(
    "idxs_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=["u8", "i8", "i16", "i32"]
)
def test_batched_nms_integer_idxs_dtypes(device, idxs_dtype):
    """Any integer dtype of idxs is a class label: the same result as int64
    labels (negative labels included for the signed types)."""
    boxes, scores = make_boxes(200, seed=2, device=device)
    labels = make_labels(200, 6, seed=2, device=device)
    if idxs_dtype != torch.uint8:
        labels = labels - 3
    expected = maskrcnn_ops.batched_nms(boxes, scores, labels, 0.5)
    assert_same(maskrcnn_ops.batched_nms(boxes, scores, labels.to(idxs_dtype), 0.5), expected)
    assert_same(expected, reference.batched_nms(boxes, scores, labels, 0.5))


def test_batched_nms_one_class_is_nms(device):
    """With a single class, batched_nms is nms (whatever the label value)."""
    boxes, scores = make_boxes(300, seed=6, device=device)
    idxs = torch.full((300,), 7, device=device)
    assert_same(maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.4), maskrcnn_ops.nms(boxes, scores, 0.4))


# ------------------------------------------------------- batched_nms_keep --


@pytest.mark.parametrize("image_ids_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_batched_nms_keep_matches_per_image_batched_nms(device, image_ids_dtype):
    """batched_nms_keep with image_ids keeps exactly what batched_nms keeps
    when run on each image on its own (and, without image_ids, what
    batched_nms keeps on the whole set)."""
    for seed, (n, num_images, num_classes) in enumerate([(50, 2, 3), (400, 4, 10), (300, 3, 1)]):
        boxes, scores = make_boxes(n, seed=seed, device=device)
        idxs = make_labels(n, num_classes, seed=seed, device=device)
        image_ids = make_labels(n, num_images, seed=seed + 50, dtype=image_ids_dtype, device=device)
        keep = maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5, image_ids)
        assert keep.dtype == torch.bool and keep.shape == (n,) and keep.device == boxes.device
        expected = torch.zeros(n, dtype=torch.bool)
        for image in range(num_images):
            members = torch.nonzero(image_ids.cpu() == image).flatten()
            on_device = members.to(device)
            kept = maskrcnn_ops.batched_nms(boxes[on_device], scores[on_device], idxs[on_device], 0.5)
            assert_same(kept, reference.batched_nms(boxes[on_device], scores[on_device], idxs[on_device], 0.5))
            expected[members[kept.cpu()]] = True
        assert torch.equal(keep.cpu(), expected), f"seed={seed}"

        whole = maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5)
        assert torch.equal(whole.cpu(), keep_mask(maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5), n))
        # The raw op with image_ids=None is the same.
        assert torch.equal(ops.batched_nms_keep(boxes, scores, idxs, None, 0.5), whole)


def test_batched_nms_keep_segments_never_interact(device):
    """Boxes in different images or classes never suppress each other: one box
    repeated in every (image, class) pair is kept once in each, and a second
    copy in the same pair is suppressed; a lower-scored overlapping box is kept
    in a segment where its suppressor is absent."""
    box = [10.0, 10.0, 50.0, 40.0]
    rows, scores, classes, images = [], [], [], []
    for image in range(3):
        for cls in range(4):
            for copy in range(2):
                rows.append(box)
                scores.append(0.9 - 0.1 * copy)
                classes.append(cls)
                images.append(image)
    rows.append([11.0, 10.0, 50.0, 41.0])  # overlaps, alone in (image 3, class 0)
    scores.append(0.1)
    classes.append(0)
    images.append(3)
    boxes = torch.tensor(rows, device=device)
    scores = torch.tensor(scores, device=device)
    idxs = torch.tensor(classes, device=device)
    image_ids = torch.tensor(images, device=device)
    keep = maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5, image_ids)
    expected = [True, False] * 12 + [True]
    assert keep.cpu().tolist() == expected
    # Without image_ids the images merge: each class keeps one box, and the
    # last box (class 0) is now suppressed by class 0's first box.
    merged = maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5)
    assert merged.cpu().tolist() == [True, False] * 4 + [False] * 16 + [False]
    # One class in every image: the images alone separate the segments (in the
    # sorted order, image 0's boxes are directly followed by image 1's of the
    # same class).
    one_class = torch.zeros_like(idxs)
    keep = maskrcnn_ops.batched_nms_keep(boxes, scores, one_class, 0.5, image_ids)
    assert keep.cpu().tolist() == [True] + [False] * 7 + [True] + [False] * 7 + [True] + [False] * 7 + [True]
    indices, counts = maskrcnn_ops.batched_nms_padded(boxes, scores, one_class, 0.5, 2, image_ids, 4)
    assert indices.cpu().tolist() == [[0, -1], [8, -1], [16, -1], [24, -1]]
    assert counts.cpu().tolist() == [1, 1, 1, 1]


def test_batched_nms_keep_many_segments(device):
    """Many small segments (200 images x 20 classes over 3000 boxes, segments
    of 0 to ~4 boxes) mixed with one large one: the segment boundaries of the
    sorted order are handled (every segment against the reference)."""
    n = 3000
    boxes, scores = make_boxes(n, seed=13, scale=60.0, device=device)
    idxs = make_labels(n, 20, seed=13, device=device)
    image_ids = make_labels(n, 200, seed=14, device=device)
    big = torch.arange(n, device=device) < 600  # 600 boxes in (image 0, class 0)
    idxs = torch.where(big, 0, idxs)
    image_ids = torch.where(big, 0, image_ids)
    keep = maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.3, image_ids)
    # One label per (image, class) segment turns it into a plain batched_nms.
    segment = image_ids * 20 + idxs
    expected = keep_mask(reference.batched_nms(boxes, scores, segment, 0.3), n)
    assert torch.equal(keep.cpu(), expected)


# ---------------------------------------------------------- nms_keep_rows --


def make_rows(rows, per_row, *, seed=0, scale=100.0, dtype=torch.float32, device="cpu"):
    """make_boxes' boxes and scores (duplicates, nested and zero-area boxes,
    tied scores) laid out as rows: boxes [S, B, 4], scores [S, B]."""
    boxes, scores = make_boxes(rows * per_row, seed=seed, scale=scale, dtype=dtype, device=device)
    return boxes.reshape(rows, per_row, 4), scores.reshape(rows, per_row)


def rows_as_segments(boxes, scores, iou_threshold):
    """nms_keep_rows through batched_nms_keep: one class, image id = row."""
    rows, per_row = scores.shape
    image_ids = torch.arange(rows, device=scores.device).repeat_interleave(per_row)
    keep = maskrcnn_ops.batched_nms_keep(
        boxes.reshape(-1, 4), scores.reshape(-1), torch.zeros_like(image_ids), iou_threshold, image_ids
    )
    return keep.reshape(rows, per_row)


def assert_rows_keep(keep, boxes, scores, iou_threshold, msg=""):
    """Keep flags [S, B] on the boxes' device, equal to the per-row reference
    and to batched_nms_keep with the row as image id."""
    assert keep.dtype == torch.bool and keep.shape == scores.shape and keep.device == boxes.device, msg
    assert torch.equal(keep.cpu(), reference.nms_keep_rows(boxes, scores, iou_threshold).cpu()), msg
    assert torch.equal(keep, rows_as_segments(boxes, scores, iou_threshold)), msg


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_nms_keep_rows_matches_reference_and_batched_nms_keep(device, dtype):
    """Rows of overlapping boxes (duplicates, nested and zero-area ones, tied
    scores: ties by index within the row) for row counts and lengths around
    the CUDA kernel's 64-box tiles, and thresholds from "any overlap" to
    "nothing" and a negative one: the reference run on each row alone, and
    batched_nms_keep with image_ids = row index."""
    for seed, (rows, per_row) in enumerate([(1, 1), (3, 9), (2, 63), (5, 64), (4, 65), (7, 40), (2, 300)]):
        boxes, scores = make_rows(rows, per_row, seed=seed, scale=60.0, dtype=dtype, device=device)
        for iou_threshold in (0.0, 0.3, 0.5, 0.7, 1.0, -0.1):
            keep = maskrcnn_ops.nms_keep_rows(boxes, scores, iou_threshold)
            assert_rows_keep(keep, boxes, scores, iou_threshold, f"S={rows} B={per_row} t={iou_threshold}")
    assert not keep.all()  # it suppresses


def test_nms_keep_rows_rows_never_interact(device):
    """The same box in every row is kept once per row; its copy with a lower
    score in the same row is suppressed; a row of one box keeps it."""
    box = [10.0, 10.0, 50.0, 40.0]
    boxes = torch.tensor([[box, box, [11.0, 10.0, 50.0, 41.0]]] * 4, device=device)
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5], [0.3, 0.9, 0.1]], device=device)
    keep = maskrcnn_ops.nms_keep_rows(boxes, scores, 0.5)
    assert keep.cpu().tolist() == [[True, False, False], [False, False, True], [True, False, False],
                                   [False, True, False]]
    assert maskrcnn_ops.nms_keep_rows(boxes[:, :1], scores[:, :1], 0.5).cpu().tolist() == [[True]] * 4


@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_nms_keep_rows_ties_by_index(device, dtype):
    """Equal scores in a row are processed in column order: all scores
    equal gives the result of distinct scores decreasing along the row, and
    of exact duplicates of equal score the first is the one kept."""
    boxes, _ = make_rows(6, 120, seed=20, scale=80.0, dtype=dtype, device=device)
    same = torch.full((6, 120), 0.5, dtype=dtype, device=device)
    decreasing = torch.linspace(1, 0, 120, dtype=dtype, device=device).expand(6, 120)
    for iou_threshold in (0.3, 0.5, 0.7):
        keep = maskrcnn_ops.nms_keep_rows(boxes, same, iou_threshold)
        assert torch.equal(keep, maskrcnn_ops.nms_keep_rows(boxes, decreasing, iou_threshold))
        assert_rows_keep(keep, boxes, same, iou_threshold)
    pair = torch.tensor([[[1.0, 2.0, 30.0, 40.0]]], dtype=dtype, device=device).expand(6, 2, 4)  # stride 0
    assert maskrcnn_ops.nms_keep_rows(pair, same[:, :2], 0.5).cpu().tolist() == [[True, False]] * 6


@pytest.mark.parametrize("iou_threshold", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_nms_keep_rows_non_finite_and_degenerate_boxes(device, dtype, iou_threshold):
    """NaN, infinite, zero-area and inverted boxes (BAD_BOXES) spread over
    rows of ordinary ones: they suppress nothing and are kept (threshold >=
    0), and every row equals the reference and batched_nms_keep."""
    g = torch.Generator().manual_seed(21)
    good, good_scores = make_rows(4, 30, seed=21, scale=30.0, dtype=torch.float64)
    bad = torch.tensor(BAD_BOXES, dtype=torch.float64).repeat(4, 1, 1)  # [4, 10, 4]
    boxes = torch.cat([good, bad], 1)
    scores = torch.cat([good_scores, torch.rand(4, len(BAD_BOXES), generator=g, dtype=torch.float64)], 1)
    perm = torch.stack([torch.randperm(boxes.size(1), generator=g) for _ in range(4)])
    boxes = boxes.gather(1, perm[..., None].expand(-1, -1, 4)).to(dtype=dtype, device=device)
    scores = scores.gather(1, perm).to(dtype=dtype, device=device)
    keep = maskrcnn_ops.nms_keep_rows(boxes, scores, iou_threshold)
    assert_rows_keep(keep, boxes, scores, iou_threshold)
    assert keep.cpu()[perm >= good.size(1)].all()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)], ids=["S=0", "B=0", "S=B=0"])
def test_nms_keep_rows_empty(device, dtype, shape):
    """S = 0 or B = 0: an empty bool [S, B] on the boxes' device."""
    boxes = torch.zeros(*shape, 4, dtype=dtype, device=device)
    scores = torch.zeros(shape, dtype=dtype, device=device)
    keep = maskrcnn_ops.nms_keep_rows(boxes, scores, 0.5)
    assert keep.shape == shape and keep.dtype == torch.bool and keep.device == boxes.device
    assert torch.equal(keep.cpu(), reference.nms_keep_rows(boxes, scores, 0.5))


def test_nms_keep_rows_non_contiguous_inputs(device):
    """Strided rows (boxes and scores transposed from [B, S] storage, every
    other row, column-major coordinates) give the result of their
    contiguous copies."""
    boxes, scores = make_rows(12, 50, seed=22, scale=60.0, device=device)
    expected = maskrcnn_ops.nms_keep_rows(boxes, scores, 0.5)
    transposed = boxes.transpose(0, 1).contiguous().transpose(0, 1)
    scores_t = scores.t().contiguous().t()
    assert not transposed.is_contiguous() and not scores_t.is_contiguous()
    assert torch.equal(maskrcnn_ops.nms_keep_rows(transposed, scores_t, 0.5), expected)
    assert torch.equal(maskrcnn_ops.nms_keep_rows(boxes[::2], scores[::2], 0.5), expected[::2])
    column_major = boxes.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert torch.equal(maskrcnn_ops.nms_keep_rows(column_major, scores, 0.5), expected)
    one_column = boxes[:, 3:4]  # [S, 1, 4], row stride 200
    assert torch.equal(maskrcnn_ops.nms_keep_rows(one_column, scores[:, 3:4], 0.5),
                       torch.ones(12, 1, dtype=torch.bool, device=device))


@pytest.mark.parametrize("iou_threshold", [0.5, 0.7])
def test_nms_keep_rows_large_rows_in_parallel(iou_threshold):
    """40 rows of 1,000 proposal-like boxes (rows through the CPU kernel's
    grid, 40,000 boxes: the call runs its rows on the kernel's threads): the
    same with one thread and two, and equal to batched_nms_keep; one row
    equals torchvision's nms on it."""
    boxes, scores = make_rows(40, 1000, seed=23, scale=800.0)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            results.append(maskrcnn_ops.nms_keep_rows(boxes, scores, iou_threshold))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], rows_as_segments(boxes, scores, iou_threshold))
    expected = keep_mask(torchvision.ops.nms(boxes[7], scores[7], iou_threshold), 1000)
    assert torch.equal(results[0][7], expected)


@st.composite
def rows_cases(draw):
    """nms_cases' degenerate boxes (lattice corners, four score levels) laid
    out as S rows of B, S and B from 0."""
    rows, per_row = draw(st.integers(0, 4)), draw(st.integers(0, 8))
    coord = st.integers(0, 7).map(float)
    n = rows * per_row
    return dict(
        boxes=torch.tensor([draw(coord) for _ in range(4 * n)], dtype=torch.float64).reshape(rows, per_row, 4),
        scores=torch.tensor([draw(st.sampled_from([0.25, 0.5, 1.0])) for _ in range(n)],
                            dtype=torch.float64).reshape(rows, per_row),
        iou_threshold=draw(st.sampled_from([0.0, 1 / 3, 0.5, 1.0, -0.1]) | st.floats(0.0, 1.0)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
    )


@settings(max_examples=60, deadline=None)
@given(case=rows_cases())
def test_fuzz_nms_keep_rows(case):
    """nms_keep_rows agrees with the reference and batched_nms_keep on random
    small degenerate rows."""
    boxes, scores = case["boxes"].to(case["dtype"]), case["scores"].to(case["dtype"])
    keep = maskrcnn_ops.nms_keep_rows(boxes, scores, case["iou_threshold"])
    assert_rows_keep(keep, boxes, scores, case["iou_threshold"])


@pytest.mark.parametrize(
    "boxes_shape, scores_shape, match",
    [
        ((6, 4), (6,), r"expected boxes of shape \[S, B, 4\]"),
        ((2, 3, 5), (2, 3), r"expected boxes of shape \[S, B, 4\]"),
        ((1, 2, 3, 4), (1, 2), r"expected boxes of shape \[S, B, 4\]"),
        ((2, 3, 4), (6,), r"expected scores of shape \[2, 3\] \(one per box\)"),
        ((2, 3, 4), (2, 4), r"expected scores of shape \[2, 3\]"),
        ((2, 3, 4), (3, 3), r"expected scores of shape \[2, 3\]"),
        ((2, 3, 4), (2, 3, 1), r"expected scores of shape \[2, 3\]"),
    ],
    ids=["2d-boxes", "Bx5", "4d-boxes", "flat-scores", "scores-B", "scores-S", "3d-scores"],
)
def test_nms_keep_rows_wrong_shapes(device, boxes_shape, scores_shape, match):
    """boxes must be [S, B, 4] and scores [S, B]: the error says which."""
    with pytest.raises(RuntimeError, match=match):
        maskrcnn_ops.nms_keep_rows(torch.zeros(boxes_shape, device=device), torch.zeros(scores_shape, device=device),
                                   0.5)


def test_nms_keep_rows_bad_dtypes_and_threshold(device):
    """Integer boxes or scores and a NaN threshold are errors."""
    boxes, scores = make_rows(2, 3, device=device)
    match = "nms_keep_rows: expected floating-point boxes and scores, got"
    with pytest.raises(RuntimeError, match=f"{match} Int and Float"):
        maskrcnn_ops.nms_keep_rows(boxes.int(), scores, 0.5)
    with pytest.raises(RuntimeError, match=f"{match} Float and Long"):
        maskrcnn_ops.nms_keep_rows(boxes, scores.long(), 0.5)
    with pytest.raises(RuntimeError, match="nms_keep_rows: iou_threshold is NaN"):
        maskrcnn_ops.nms_keep_rows(boxes, scores, math.nan)


# ----------------------------------------------------- batched_nms_padded --


@pytest.mark.parametrize(
    ("max_output", "num_images"),
    [(1, 3), (5, 3), (40, 3), (1000, 3), (7, 6)],
    ids=["max1", "max5", "max40", "max1000", "extra-images"],
)
def test_batched_nms_padded_matches_python(device, max_output, num_images):
    """Against the per-image Python loop: max_output smaller than the kept
    count of an image (truncated to its best boxes by score, ties by index),
    larger (padded with -1), and num_images beyond the images present (images
    3..5 get no box: rows of -1, count 0)."""
    for seed, n in enumerate([60, 400]):
        boxes, scores = make_boxes(n, seed=seed, device=device)
        idxs = make_labels(n, 4, seed=seed, device=device)
        image_ids = make_labels(n, 3, seed=seed + 7, device=device)
        indices, counts = maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, max_output, image_ids, num_images)
        assert indices.shape == (num_images, max_output) and counts.shape == (num_images,)
        assert indices.dtype == counts.dtype == torch.int64
        assert indices.device == counts.device == boxes.device
        expected_indices, expected_counts = padded_oracle(
            boxes, scores, idxs, 0.5, max_output, image_ids, num_images
        )
        assert_same(indices, expected_indices, f"seed={seed}")
        assert_same(counts, expected_counts, f"seed={seed}")
    if num_images > 3:
        assert (indices[3:] == -1).all() and (counts[3:] == 0).all()


def test_batched_nms_padded_single_image_default(device):
    """Without image_ids (one image), row 0 is batched_nms's result, truncated
    or padded; max_output = 0 gives an empty row with count 0."""
    boxes, scores = make_boxes(200, seed=8, device=device)
    idxs = make_labels(200, 3, seed=8, device=device)
    kept = maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.6).cpu()
    for max_output in (0, 10, len(kept), len(kept) + 5):
        indices, counts = maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.6, max_output)
        k = min(max_output, len(kept))
        assert indices.shape == (1, max_output)
        assert indices[0, :k].cpu().tolist() == kept[:k].tolist()
        assert (indices[0, k:] == -1).all() and counts.cpu().tolist() == [k]


# ----------------------------------------------------- non-finite / degenerate --


BAD_BOXES = [
    [math.nan, 0.0, 10.0, 10.0],
    [0.0, 0.0, 10.0, math.nan],
    [0.0, 0.0, math.inf, 10.0],
    [-math.inf, -math.inf, math.inf, math.inf],
    [math.inf, 0.0, math.inf, 10.0],
    [0.0, 0.0, -math.inf, 10.0],
    [0.0, 0.0, 0.0, 10.0],  # zero width
    [5.0, 5.0, 5.0, 5.0],  # a point
    [10.0, 0.0, 0.0, 10.0],  # inverted x: negative area
    [10.0, 10.0, 0.0, 0.0],  # inverted x and y: positive area, empty intersection
]


@pytest.mark.parametrize("iou_threshold", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_non_finite_and_degenerate_boxes(device, dtype, iou_threshold):
    """Documented behaviour for a threshold >= 0: a box with a NaN or infinite
    coordinate, or of zero or negative area (or inverted), never suppresses
    another and is never suppressed. So all such boxes are kept, and the
    other boxes get the result they would get without them. Also equal to
    the reference (and torchvision for float32/float64); never a crash."""
    good, good_scores = make_boxes(60, seed=3, scale=30.0, dtype=torch.float64)
    good[:, 2:] = torch.maximum(good[:, 2:], good[:, :2] + 0.5)  # positive area only
    bad = torch.tensor(BAD_BOXES, dtype=torch.float64).repeat(2, 1)  # twice: bad duplicates too
    boxes = torch.cat([good, bad])
    g = torch.Generator().manual_seed(3)
    scores = torch.cat([good_scores, torch.rand(len(bad), generator=g, dtype=torch.float64)])
    scores[-3:] = 1.0  # bad boxes ranked first too
    perm = torch.randperm(len(boxes), generator=g)
    boxes, scores = boxes[perm].to(dtype=dtype, device=device), scores[perm].to(dtype=dtype, device=device)
    is_bad = perm >= len(good)

    ours = maskrcnn_ops.nms(boxes, scores, iou_threshold).cpu()
    kept = keep_mask(ours, len(boxes))
    assert kept[is_bad].all()
    good_positions = torch.nonzero(~is_bad).flatten()
    good_only = maskrcnn_ops.nms(boxes[good_positions.to(device)], scores[good_positions.to(device)], iou_threshold)
    assert torch.equal(kept[~is_bad], keep_mask(good_only, len(good_positions)))
    assert_same(ours, reference.nms(boxes, scores, iou_threshold))
    if dtype in (torch.float32, torch.float64):
        assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold))
    # Same through the batched forms (two classes).
    idxs = (torch.arange(len(boxes)) % 2).to(device)
    batched = maskrcnn_ops.batched_nms(boxes, scores, idxs, iou_threshold)
    assert_same(batched, reference.batched_nms(boxes, scores, idxs, iou_threshold))
    assert keep_mask(batched, len(boxes))[is_bad].all()


@pytest.mark.parametrize("iou_threshold", [-0.1, -math.inf])
def test_non_finite_boxes_negative_threshold(device, iou_threshold):
    """With a negative threshold the documented guarantee does not hold (an
    IoU of 0 passes it; NaN IoUs still never do): follow the reference."""
    good, scores = make_boxes(30, seed=4, scale=30.0)
    boxes = torch.cat([good, torch.tensor(BAD_BOXES)]).to(device)
    scores = torch.rand(len(boxes), generator=torch.Generator().manual_seed(4)).to(device)
    ours = maskrcnn_ops.nms(boxes, scores, iou_threshold)
    assert_same(ours, reference.nms(boxes, scores, iou_threshold))
    assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), iou_threshold))


def test_huge_boxes_whose_area_overflows(device):
    """Finite coordinates whose area overflows float32 (1e20 x 1e20): the IoU
    of two such duplicates is inf/inf = NaN or inter/inf = 0, so they do not
    suppress each other, exactly as in torchvision and the reference; in
    float64 the same boxes have a finite area and do."""
    rows = [[0.0, 0.0, 1e20, 1e20], [0.0, 0.0, 1e20, 1e20], [1e19, 0.0, 2e20, 1e20], [1.0, 1.0, 5.0, 5.0]]
    for dtype in (torch.float32, torch.float64):
        boxes = torch.tensor(rows, dtype=dtype, device=device)
        scores = torch.tensor([0.9, 0.8, 0.7, 0.6], dtype=dtype, device=device)
        ours = maskrcnn_ops.nms(boxes, scores, 0.3)
        assert_same(ours, torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.3), str(dtype))
        assert_same(ours, reference.nms(boxes, scores, 0.3), str(dtype))
        assert ours.tolist() == ([0, 1, 2, 3] if dtype == torch.float32 else [0, 3])


def test_nan_and_infinite_scores_sort_like_torch_sort(device):
    """NaN scores rank first (as torch.sort(descending=True)), then +inf, ...,
    -inf; ties (NaN with NaN too) by index. With disjoint boxes all are kept
    in exactly that order; with overlapping ones the NaN-scored box wins."""
    nan, inf = math.nan, math.inf
    scores = torch.tensor([0.5, nan, inf, -inf, 0.5, nan, 0.0, -1.0], device=device)
    n = len(scores)
    one_class = torch.zeros(n, dtype=torch.int64, device=device)
    x = torch.arange(n, dtype=torch.float32, device=device) * 20
    disjoint = torch.stack([x, x * 0, x + 10, x * 0 + 10], 1)
    expected = torch.sort(scores.cpu(), descending=True, stable=True).indices
    assert expected.tolist() == [1, 5, 2, 0, 4, 6, 7, 3]
    assert_same(maskrcnn_ops.nms(disjoint, scores, 0.5), expected)
    assert_same(maskrcnn_ops.batched_nms(disjoint, scores, one_class, 0.5), expected)
    same = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * n, device=device)
    assert maskrcnn_ops.nms(same, scores, 0.5).cpu().tolist() == [1]
    assert_same(maskrcnn_ops.nms(same, scores, 0.5), reference.nms(same, scores, 0.5))
    indices, counts = maskrcnn_ops.batched_nms_padded(disjoint, scores, one_class, 0.5, 3)
    assert indices.cpu().tolist() == [[1, 5, 2]] and counts.cpu().tolist() == [3]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_order_of_many_scores_is_torch_sort(device, dtype):
    """The processing order is torch.sort(stable=True, descending=True)'s
    for 5000 scores of every kind: ties (a fifth of them from 4 values),
    +0.0 and -0.0 (equal), NaNs of either sign, +-inf, subnormals and
    magnitudes from 1e-300 to 1e300 (in float64; the casts to the other
    dtypes make more infinities, zeros and ties). With pairwise disjoint
    boxes every box is kept, in exactly that order, by nms and batched_nms."""
    g = torch.Generator().manual_seed(80)
    n = 5000
    magnitude = 10.0 ** torch.randint(-300, 300, (n,), generator=g).double()
    scores = torch.randn(n, generator=g, dtype=torch.float64) * magnitude
    tied = torch.rand(n, generator=g) < 0.2
    ties = torch.tensor([0.5, -2.0, 0.0, -0.0], dtype=torch.float64)
    scores[tied] = ties[torch.randint(0, 4, (int(tied.sum()),), generator=g)]
    special = torch.tensor([math.nan, -math.nan, math.inf, -math.inf, 5e-324, -5e-324, 0.0, -0.0], dtype=torch.float64)
    scores[torch.randint(0, n, (200,), generator=g)] = special[torch.randint(0, len(special), (200,), generator=g)]
    scores = scores.to(dtype)
    grid = torch.arange(n) % 71, torch.arange(n) // 71
    x, y = grid[0].double() * 20, grid[1].double() * 20
    boxes = torch.stack([x, y, x + 10, y + 10], 1).to(dtype)
    expected = torch.sort(scores, descending=True, stable=True).indices
    boxes, scores = boxes.to(device), scores.to(device)
    assert_same(maskrcnn_ops.nms(boxes, scores, 0.5), expected)
    assert_same(maskrcnn_ops.batched_nms(boxes, scores, make_labels(n, 3, device=device), 0.5), expected)


@pytest.mark.parametrize(
    "dtype", [torch.uint16, torch.uint32, torch.uint64, torch.int64], ids=["u16", "u32", "u64", "i64"]
)
def test_cpu_labels_of_any_integer_dtype_and_range(dtype):
    """CPU (which orders the segments itself): class and image labels of the
    unsigned dtypes, and at the ends of their range (2**64 - 1 in uint64,
    -2**63 in int64), group boxes like any other labels: the results of
    small int64 labels, which the reference gives too."""
    boxes, scores = make_boxes(600, seed=81)
    small, images = make_labels(600, 5, seed=81), make_labels(600, 2, seed=82)
    info = torch.iinfo(dtype)
    values = [info.min, info.min + 1, 7, info.max - 1, info.max]

    def relabel(labels):
        return torch.tensor([values[i] for i in labels.tolist()], dtype=dtype)

    expected = maskrcnn_ops.batched_nms(boxes, scores, small, 0.5)
    assert_same(expected, reference.batched_nms(boxes, scores, small, 0.5))
    assert_same(maskrcnn_ops.batched_nms(boxes, scores, relabel(small), 0.5), expected)
    keep = maskrcnn_ops.batched_nms_keep(boxes, scores, relabel(small), 0.5, relabel(images))
    assert torch.equal(keep, maskrcnn_ops.batched_nms_keep(boxes, scores, small, 0.5, images))


# ------------------------------------------------------------- bad input --


@pytest.mark.parametrize("shape", [(5, 3), (5, 5), (20,), (1, 5, 4), (0,)], ids=["Nx3", "Nx5", "1d", "3d", "empty-1d"])
def test_boxes_wrong_shape(device, shape):
    """Boxes must be [N, 4] (every function and the raw ops)."""
    boxes = torch.zeros(shape, device=device)
    n = shape[0] if len(shape) == 2 else 5
    scores = torch.zeros(n, device=device)
    idxs = torch.zeros(n, dtype=torch.int64, device=device)
    match = r"expected boxes of shape \[N, 4\]"
    with pytest.raises(RuntimeError, match=match):
        maskrcnn_ops.nms(boxes, scores, 0.5)
    with pytest.raises(RuntimeError, match=match):
        maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5)
    with pytest.raises(RuntimeError, match=match):
        maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5)


def test_scores_wrong_shape_or_length(device):
    """Scores must be [N], one per box."""
    boxes = torch.zeros(4, 4, device=device)
    idxs = torch.zeros(4, dtype=torch.int64, device=device)
    for scores in (torch.zeros(3, device=device), torch.zeros(5, device=device), torch.zeros(4, 1, device=device),
                   torch.zeros((), device=device)):
        with pytest.raises(RuntimeError, match=r"expected scores of shape \[4\] \(one per box\)"):
            maskrcnn_ops.nms(boxes, scores, 0.5)
        with pytest.raises(RuntimeError, match=r"expected scores of shape \[4\]"):
            maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5)
        with pytest.raises(RuntimeError, match=r"expected scores of shape \[4\]"):
            maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bool], ids=["f32", "f64", "bool"])
def test_idxs_not_integer(device, dtype):
    """Class labels must be an integer tensor (bool is rejected too)."""
    boxes, scores = make_boxes(6, device=device)
    idxs = torch.zeros(6, device=device).to(dtype)
    with pytest.raises(RuntimeError, match="expected integer idxs"):
        maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5)
    with pytest.raises(RuntimeError, match="expected integer idxs"):
        maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5)
    with pytest.raises(RuntimeError, match="expected integer idxs"):
        maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 3)


def test_idxs_wrong_length(device):
    """idxs must be [N]."""
    boxes, scores = make_boxes(6, device=device)
    for idxs in (torch.zeros(5, dtype=torch.int64, device=device), torch.zeros(6, 1, dtype=torch.int64, device=device)):
        with pytest.raises(RuntimeError, match=r"expected idxs of shape \[6\] \(one per box\)"):
            maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5)
        with pytest.raises(RuntimeError, match=r"expected idxs of shape \[6\]"):
            maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5)


def test_image_ids_wrong_dtype_or_length(device):
    """image_ids must be an integer [N] tensor: batched_nms_keep rejects a
    float tensor and a wrong length; batched_nms_padded a wrong length
    (shorter or longer)."""
    boxes, scores = make_boxes(6, device=device)
    idxs = torch.zeros(6, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match="expected integer image_ids"):
        maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5, torch.zeros(6, device=device))
    for wrong in (torch.zeros(5, dtype=torch.int64, device=device), torch.zeros(7, dtype=torch.int64, device=device)):
        with pytest.raises(RuntimeError, match=r"expected image_ids of shape \[6\] \(one per box\)"):
            maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5, wrong)
        with pytest.raises(RuntimeError, match=r"expected image_ids of shape \[6\]"):
            maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 3, wrong, 1)


def test_batched_nms_padded_rejects_float_image_ids(device):
    """batched_nms_padded documents image_ids as an integer tensor and
    batched_nms_keep rejects float ones; the padded form should too, rather
    than truncate 1.7 to image 1."""
    boxes, scores = make_boxes(3, device=device)
    idxs = torch.zeros(3, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match="expected integer image_ids"):
        maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 2, torch.tensor([0.0, 1.7, 1.0], device=device), 2)


def test_batched_nms_padded_bad_sizes_and_foreign_images(device):
    """A negative max_output or no image is a ValueError; boxes whose image id
    is outside [0, num_images) are ignored (checking them would need a host
    sync), never an out-of-bounds access."""
    boxes, scores = make_boxes(4, device=device)
    idxs = torch.zeros(4, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="max_output >= 0"):
        maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, -1)
    with pytest.raises(ValueError, match="num_images >= 1"):
        maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 2, num_images=0)
    image_ids = torch.tensor([0, 5, -1, 0], device=device)
    indices, counts = maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 4, image_ids, 1)
    expected = maskrcnn_ops.batched_nms(boxes[[0, 3]], scores[[0, 3]], idxs[[0, 3]], 0.5)
    expected = torch.tensor([0, 3], device=device)[expected]
    assert counts.tolist() == [expected.numel()]
    assert indices[0, : expected.numel()].tolist() == expected.tolist()
    assert (indices[0, expected.numel() :] == -1).all()


def test_integer_boxes_or_scores(device):
    """Boxes and scores must be floating point (torchvision rejects integer
    boxes as well)."""
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 9, 9]], device=device)
    scores = torch.tensor([0.9, 0.8], device=device)
    idxs = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match="expected floating-point boxes and scores, got Long and Float"):
        maskrcnn_ops.nms(boxes, scores, 0.5)
    with pytest.raises(RuntimeError, match="expected floating-point boxes and scores"):
        maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5)
    with pytest.raises(RuntimeError, match="expected floating-point boxes and scores"):
        maskrcnn_ops.batched_nms_keep(boxes.int(), scores, idxs, 0.5)
    with pytest.raises(RuntimeError, match="expected floating-point boxes and scores, got Float and Long"):
        maskrcnn_ops.nms(boxes.float(), torch.tensor([9, 8], device=device), 0.5)


def test_nan_iou_threshold(device):
    """A NaN threshold is an error (it would silently keep everything)."""
    boxes, scores = make_boxes(5, device=device)
    idxs = torch.zeros(5, dtype=torch.int64, device=device)
    with pytest.raises(RuntimeError, match="maskrcnn_ops::nms: iou_threshold is NaN"):
        maskrcnn_ops.nms(boxes, scores, math.nan)
    with pytest.raises(RuntimeError, match="iou_threshold is NaN"):
        maskrcnn_ops.batched_nms(boxes, scores, idxs, math.nan)
    with pytest.raises(RuntimeError, match="iou_threshold is NaN"):
        maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, math.nan)
    with pytest.raises(RuntimeError, match="iou_threshold is NaN"):
        maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, math.nan, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["f16", "bf16", "f64"])
def test_nan_iou_threshold_any_dtype(dtype):
    """The NaN check does not depend on the boxes' dtype (the threshold is a
    double in the schema)."""
    boxes, scores = make_boxes(5, dtype=dtype)
    with pytest.raises(RuntimeError, match="iou_threshold is NaN"):
        ops.nms(boxes, scores, math.nan)


@cuda_only
def test_inputs_on_different_devices():
    """boxes, scores, idxs and image_ids must share boxes' device."""
    boxes, scores = make_boxes(6, device="cuda")
    idxs = torch.zeros(6, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="boxes and scores must be on the same device"):
        maskrcnn_ops.nms(boxes, scores.cpu(), 0.5)
    with pytest.raises(RuntimeError, match="boxes and scores must be on the same device"):
        maskrcnn_ops.nms(boxes.cpu(), scores, 0.5)
    with pytest.raises(RuntimeError, match="idxs must be on the device of boxes"):
        maskrcnn_ops.batched_nms(boxes, scores, idxs.cpu(), 0.5)
    with pytest.raises(RuntimeError, match="idxs must be on the device of boxes"):
        maskrcnn_ops.batched_nms_keep(boxes, scores, idxs.cpu(), 0.5)
    with pytest.raises(RuntimeError, match="image_ids must be on the device of boxes"):
        maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5, idxs.cpu())
    with pytest.raises(RuntimeError, match="device"):
        maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 3, idxs.cpu(), 1)


# ------------------------------------------------------------------- CUDA --


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@cuda_only
def test_cuda_matches_cpu(dtype):
    """The CUDA kernels give exactly the CPU results for all four functions,
    for sizes around the 64-box tiles of the mask kernel (63, 64, 65, 129)
    and larger, with many (image, class) segments (tiles that straddle
    segment boundaries) and thresholds 0, 0.5, 0.7, 1 and a negative one."""
    for seed, n in enumerate([1, 63, 64, 65, 129, 700, 3000]):
        boxes, scores = make_boxes(n, seed=seed, dtype=dtype)
        idxs = make_labels(n, 7, seed=seed)
        image_ids = make_labels(n, 3, seed=seed + 5)
        cuda = [t.cuda() for t in (boxes, scores, idxs, image_ids)]
        for t in (0.0, 0.5, 0.7, 1.0, -0.1):
            msg = f"n={n} t={t}"
            assert_same(maskrcnn_ops.nms(*cuda[:2], t), maskrcnn_ops.nms(boxes, scores, t), msg)
            assert_same(maskrcnn_ops.batched_nms(*cuda[:3], t), maskrcnn_ops.batched_nms(boxes, scores, idxs, t), msg)
            keep = maskrcnn_ops.batched_nms_keep(*cuda, t)
            assert torch.equal(keep.cpu(), maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, t, image_ids)), msg
            got = maskrcnn_ops.batched_nms_padded(*cuda[:3], t, 50, cuda[3], 4)
            want = maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, t, 50, image_ids, 4)
            assert_same(got[0], want[0], msg)
            assert_same(got[1], want[1], msg)


@pytest.mark.slow
@pytest.mark.parametrize("n", [200_000, 400_000], ids=["200k", "400k"])
@cuda_only
def test_cuda_large_nms_matches_cpu(n):
    """200,000 boxes in one segment (a 5 GB bit mask; 3,125 words of removed
    flags, in shared memory), and 400,000 (6,250 words: above the 6,144-word
    shared-memory limit, so the reduction keeps them in global memory): the
    CUDA result equals the CPU result."""
    boxes, scores = make_boxes(n, seed=1, scale=2000.0)
    expected = maskrcnn_ops.nms(boxes, scores, 0.5)
    ours = maskrcnn_ops.nms(boxes.cuda(), scores.cuda(), 0.5)
    assert_same(ours, expected)
    assert 0 < len(ours) < n


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@cuda_only
def test_cuda_nms_keep_rows_matches_cpu(dtype):
    """nms_keep_rows on CUDA equals the CPU op, for rows around the 64-box
    tiles and for calls the kernel splits into groups of whole rows of at
    most NMS_BOXES_PER_CALL boxes: 50 rows of 1,000 (groups of 20 rows),
    rows of a third of the bound plus one (two rows a group), and rows
    longer than the bound (a row a group)."""
    bound = maskrcnn_ops.NMS_BOXES_PER_CALL
    for seed, (rows, per_row) in enumerate([(3, 65), (50, 1000), (7, bound // 3 + 1), (2, bound + 100)]):
        boxes, scores = make_rows(rows, per_row, seed=seed, scale=60.0 * math.sqrt(per_row), dtype=dtype)
        for t in (0.0, 0.5, 0.7):
            keep = maskrcnn_ops.nms_keep_rows(boxes.cuda(), scores.cuda(), t)
            assert keep.device.type == "cuda" and keep.shape == (rows, per_row)
            expected = maskrcnn_ops.nms_keep_rows(boxes, scores, t)
            assert torch.equal(keep.cpu(), expected), f"S={rows} B={per_row} t={t}"
            assert 0 < expected.sum() < rows * per_row


@cuda_only
def test_cuda_nms_keep_rows_does_not_sync():
    """Under torch.cuda.set_sync_debug_mode("error") nms_keep_rows runs, also
    when its rows make several groups (no host synchronization)."""
    boxes, scores = make_rows(30, 1000, seed=4, scale=2000.0, device="cuda")
    expected = maskrcnn_ops.nms_keep_rows(boxes, scores, 0.5)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        keep = maskrcnn_ops.nms_keep_rows(boxes, scores, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.equal(keep, expected)


def _cuda_batch(seed=0, n=500):
    boxes, scores = make_boxes(n, seed=seed, device="cuda")
    return boxes, scores, make_labels(n, 5, seed=seed, device="cuda"), make_labels(n, 3, seed=seed + 9, device="cuda")


@cuda_only
def test_cuda_fixed_size_forms_do_not_sync():
    """Under torch.cuda.set_sync_debug_mode("error") batched_nms_keep and
    batched_nms_padded run (no host synchronization), while nms, whose output
    size depends on the data, does sync and raises: the mode is armed."""
    boxes, scores, idxs, image_ids = _cuda_batch()
    expected = maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 20, image_ids, 3)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        keep = maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5, image_ids)
        padded = maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 20, image_ids, 3)
        with pytest.raises(RuntimeError, match="synchroniz"):
            maskrcnn_ops.nms(boxes, scores, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.equal(keep.cpu(), maskrcnn_ops.batched_nms_keep(*(t.cpu() for t in (boxes, scores, idxs)), 0.5,
                                                                 image_ids.cpu()))
    assert torch.equal(padded[0], expected[0]) and torch.equal(padded[1], expected[1])


@cuda_only
def test_cuda_graph_capture_of_padded():
    """batched_nms_padded is captured in a CUDA graph; replays on new data
    copied into the static inputs give the eager results."""
    static = [t.clone() for t in _cuda_batch(seed=0)]

    def run():
        return maskrcnn_ops.batched_nms_padded(static[0], static[1], static[2], 0.5, 30, static[3], 3)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (allocator, lazy init)
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        indices, counts = run()
    for seed in (1, 2, 3):
        fresh = _cuda_batch(seed=seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        expected = maskrcnn_ops.batched_nms_padded(fresh[0], fresh[1], fresh[2], 0.5, 30, fresh[3], 3)
        assert_same(indices, expected[0], f"seed={seed}")
        assert_same(counts, expected[1], f"seed={seed}")


# ------------------------------------------------------------------ opcheck --


def _opcheck_samples(device):
    boxes, scores = make_boxes(40, seed=1, device=device)
    idxs = make_labels(40, 3, seed=1, device=device)
    image_ids = make_labels(40, 2, seed=2, device=device)
    grad_boxes = boxes.clone().requires_grad_(True)
    return {
        "keep": (ops.batched_nms_keep.default, (boxes, scores, idxs, image_ids, 0.5)),
        "keep-no-image-ids": (ops.batched_nms_keep.default, (boxes, scores, idxs.int(), None, 0.3)),
        "keep-requires-grad": (ops.batched_nms_keep.default, (grad_boxes, scores, idxs, image_ids, 0.5)),
        "keep-f64": (ops.batched_nms_keep.default, (boxes.double(), scores.double(), idxs, image_ids, 0.5)),
        "nms": (ops.nms.default, (boxes, scores, 0.5)),
        "nms-f16": (ops.nms.default, (boxes.half(), scores.half(), 0.5)),
        "nms-requires-grad": (ops.nms.default, (grad_boxes, scores, 0.5)),
        "nms-empty": (ops.nms.default, (boxes[:0], scores[:0], 0.5)),
        "batched": (ops.batched_nms.default, (boxes, scores, idxs, 0.5)),
        "batched-f64": (ops.batched_nms.default, (boxes.double(), scores.double(), idxs, 0.7)),
        "rows": (ops.nms_keep_rows.default, (boxes.view(4, 10, 4), scores.view(4, 10), 0.5)),
        "rows-f16": (ops.nms_keep_rows.default, (boxes.view(4, 10, 4).half(), scores.view(4, 10).half(), 0.5)),
        "rows-requires-grad": (ops.nms_keep_rows.default, (grad_boxes.view(4, 10, 4), scores.view(4, 10), 0.5)),
        "rows-strided": (ops.nms_keep_rows.default,
                         (boxes.view(4, 10, 4).transpose(0, 1), scores.view(4, 10).t(), 0.3)),
        "rows-empty": (ops.nms_keep_rows.default, (boxes.view(4, 10, 4)[:, :0], scores.view(4, 10)[:, :0], 0.5)),
    }


@pytest.mark.parametrize(
    "sample",
    ["keep", "keep-no-image-ids", "keep-requires-grad", "keep-f64",
     "nms", "nms-f16", "nms-requires-grad", "nms-empty", "batched", "batched-f64",
     "rows", "rows-f16", "rows-requires-grad", "rows-strided", "rows-empty"],
)
def test_opcheck(device, sample):
    """torch.library.opcheck: schema, autograd registration (integer/bool
    outputs, so no formula is needed even for inputs that require grad),
    fake kernel and AOT-dispatch consistency.

    All four sub-tests also apply to the data-dependent nms / batched_nms:
    the fake kernels allocate the output with new_dynamic_size(), an unbacked
    SymInt, which test_faketensor and test_aot_dispatch_dynamic accept (they
    then check dtype, device and rank; the length is only known at run time).
    So test_utils is left at its default, every sub-test."""
    op, args = _opcheck_samples(device)[sample]
    result = torch.library.opcheck(op, args)
    assert set(result) == {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------ torch.compile --


def test_compile_fixed_size_forms(device, fresh_dynamo):
    """torch.compile(fullgraph=True) of a function calling batched_nms_keep
    and batched_nms_padded (no graph break: both have fixed-size outputs)
    equals eager, on several inputs of the same size."""

    def fn(boxes, scores, idxs, image_ids):
        keep = maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5, image_ids)
        indices, counts = maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 25, image_ids, 3)
        return keep, indices, counts, (scores * keep).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for seed in range(3):
        boxes, scores = make_boxes(200, seed=seed, device=device)
        args = (boxes, scores, make_labels(200, 4, seed=seed, device=device),
                make_labels(200, 3, seed=seed + 3, device=device))
        for actual, expected in zip(compiled(*args), fn(*args)):
            assert torch.equal(actual, expected)


def test_compile_nms_keep_rows(device, fresh_dynamo):
    """torch.compile(fullgraph=True) of a function calling nms_keep_rows (a
    fixed-size output: no graph break) equals eager, on several inputs of one
    shape and on another shape."""

    def fn(boxes, scores):
        keep = maskrcnn_ops.nms_keep_rows(boxes, scores, 0.5)
        return keep, (scores * keep).sum(1), keep.sum(1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for seed, (rows, per_row) in enumerate([(4, 50), (4, 50), (4, 50), (6, 80)]):
        args = make_rows(rows, per_row, seed=seed, device=device)
        for actual, expected in zip(compiled(*args), fn(*args)):
            assert torch.equal(actual, expected)


def test_compile_data_dependent_nms(device, fresh_dynamo):
    """With capture_dynamic_output_shape_ops, a function calling
    maskrcnn_ops.nms and batched_nms compiles with fullgraph=True (the fake
    kernels give the output an unbacked size) and equals eager; inputs with
    other sizes and other kept counts reuse the graph (dynamic=True: one
    frame compiled)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(boxes, scores, idxs):
        keep = maskrcnn_ops.nms(boxes, scores, 0.5)
        kept_boxes = boxes[keep]
        batched = maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5)
        return keep, kept_boxes.sum(1), batched, scores[batched].sum()

    counter = CompileCounterWithBackend("aot_eager")
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=True)
        kept_counts = set()
        for seed, n in enumerate([60, 90, 150]):
            boxes, scores = make_boxes(n, seed=seed, device=device)
            idxs = make_labels(n, 3, seed=seed, device=device)
            actual, expected = compiled(boxes, scores, idxs), fn(boxes, scores, idxs)
            for a, e in zip(actual, expected):
                assert torch.equal(a, e)
            kept_counts.add(len(expected[0]))
    assert len(kept_counts) == 3
    assert counter.frame_count == 1


def test_compile_nms_with_mock_patch(fresh_dynamo):
    """The same with the flag set through unittest.mock.patch; the recorded
    graph is a single graph that calls the custom op itself.

    (Note: for this custom op the flag is not actually required; dynamo
    also traces it without the flag, since the fake kernel provides the
    unbacked size. The flag matters for aten ops such as nonzero.)"""
    from torch._dynamo.testing import EagerAndRecordGraphs

    backend = EagerAndRecordGraphs()

    def fn(boxes, scores):
        return maskrcnn_ops.nms(boxes, scores, 0.5) + 0

    boxes, scores = make_boxes(80, seed=2)
    with mock.patch.object(torch._dynamo.config, "capture_dynamic_output_shape_ops", True):
        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        assert torch.equal(compiled(boxes, scores), fn(boxes, scores))
    assert len(backend.graphs) == 1
    assert "maskrcnn_ops.nms" in backend.graphs[0].code


# ------------------------------------------------------------ determinism --


def test_repeated_calls_are_identical(device, deterministic_mode):
    """Two calls give identical results for all four functions, with
    deterministic algorithms on (no op lacks a deterministic implementation)
    and off."""
    boxes, scores = make_boxes(3000, seed=17, scale=300.0, device=device)
    idxs = make_labels(3000, 3, seed=17, device=device)
    image_ids = make_labels(3000, 2, seed=18, device=device)

    def run():
        return (
            maskrcnn_ops.nms(boxes, scores, 0.5),
            maskrcnn_ops.batched_nms(boxes, scores, idxs, 0.5),
            maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5, image_ids),
            *maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, 0.5, 100, image_ids, 2),
        )

    for deterministic in (False, True):
        deterministic_mode(deterministic)
        first, second = run(), run()
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def test_cpu_independent_of_thread_count():
    """CPU results are the same with one thread and with two, for a large
    single-class case and for many small segments (a call too small for the
    kernel's threads; test_segments_in_parallel has larger ones)."""
    boxes, scores = make_boxes(9000, seed=23, scale=1500.0)
    idxs = make_labels(9000, 50, seed=23)
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            results.append([
                maskrcnn_ops.nms(boxes, scores, 0.5),
                maskrcnn_ops.nms(boxes, scores, 0.05),
                maskrcnn_ops.batched_nms(boxes, scores, torch.zeros_like(idxs), 0.7),
                maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, 0.5),
            ])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert_same(results[0][0], torchvision.ops.nms(boxes, scores, 0.5))


# ------------------------------------------------------------------- fuzz --


@st.composite
def nms_cases(draw):
    """Small random problems built to produce degenerate cases: coordinates on
    a grid of 8 integers (many duplicates, zero-area and inverted boxes,
    IoUs that are simple fractions, often equal to the threshold), scores
    from 4 levels (many ties), a few classes and images."""
    n = draw(st.integers(0, 24))
    coord = st.integers(0, 7).map(float)
    rows = [[draw(coord) for _ in range(4)] for _ in range(n)]
    score_levels = st.sampled_from([0.25, 0.5, 0.75, 1.0])
    return dict(
        boxes=torch.tensor(rows, dtype=torch.float64).reshape(n, 4),
        scores=torch.tensor([draw(score_levels) for _ in range(n)], dtype=torch.float64),
        idxs=torch.tensor([draw(st.integers(0, 2)) for _ in range(n)], dtype=torch.int64),
        image_ids=torch.tensor([draw(st.integers(0, 2)) for _ in range(n)], dtype=torch.int64),
        iou_threshold=draw(st.sampled_from([0.0, 0.25, 1 / 3, 0.5, 0.6, 2 / 3, 1.0, -0.1])
                           | st.floats(0.0, 1.0)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
    )


@settings(max_examples=60, deadline=None)
@given(case=nms_cases())
def test_fuzz_against_reference(case):
    """nms, batched_nms, batched_nms_keep (with image_ids) and
    batched_nms_padded agree with the reference on random small degenerate
    inputs; nms also with torchvision."""
    boxes, scores = case["boxes"].to(case["dtype"]), case["scores"].to(case["dtype"])
    idxs, image_ids, t = case["idxs"], case["image_ids"], case["iou_threshold"]
    n = len(scores)
    ours = maskrcnn_ops.nms(boxes, scores, t)
    assert_same(ours, reference.nms(boxes, scores, t))
    assert_same(ours, torchvision.ops.nms(boxes, scores, t))
    assert_same(maskrcnn_ops.batched_nms(boxes, scores, idxs, t), reference.batched_nms(boxes, scores, idxs, t))
    keep = maskrcnn_ops.batched_nms_keep(boxes, scores, idxs, t, image_ids)
    assert torch.equal(keep, keep_mask(reference.batched_nms(boxes, scores, image_ids * 3 + idxs, t), n))
    indices, counts = maskrcnn_ops.batched_nms_padded(boxes, scores, idxs, t, 5, image_ids, 3)
    expected_indices, expected_counts = padded_oracle(boxes, scores, idxs, t, 5, image_ids, 3)
    assert_same(indices, expected_indices)
    assert_same(counts, expected_counts)


@pytest.mark.parametrize(
    "boxes_per_image, limit, groups",
    [
        ([], 10, []),
        ([4, 4, 4], 10, [(0, 2), (2, 3)]),
        ([4, 4, 4], 12, [(0, 3)]),
        ([30, 2, 2], 10, [(0, 1), (1, 3)]),  # too big alone: a group of its own
        ([2, 30, 2], 10, [(0, 1), (1, 2), (2, 3)]),
        ([5, 0, 0, 5, 1], 10, [(0, 4), (4, 5)]),  # empty images join the group before
        ([0, 0], 10, [(0, 2)]),
        ([3, 3, 3], 1, [(0, 1), (1, 2), (2, 3)]),
    ],
)
def test_image_groups(boxes_per_image, limit, groups):
    """Consecutive whole images per NMS call, at most `limit` boxes a call
    unless one image alone has more; every image in exactly one group."""
    assert maskrcnn_ops.image_groups(boxes_per_image, limit) == groups


def test_image_groups_default_bound_keeps_the_mask_small():
    """The default bound keeps one call's suppression mask (N * ceil(N/64)
    8-byte words) within 64 MiB."""
    n = maskrcnn_ops.NMS_BOXES_PER_CALL
    assert n * math.ceil(n / 64) * 8 <= 64 * 2**20
    assert maskrcnn_ops.image_groups([n // 2] * 4) == [(0, 2), (2, 4)]
