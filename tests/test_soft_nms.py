"""Tests of maskrcnn_ops.soft_nms / batched_soft_nms and their dispatcher ops.

Oracles:
  * maskrcnn_ops.reference.soft_nms / batched_soft_nms: the sequential loop
    of Bodla et al. in pure PyTorch, in the kernels' precision and operation
    order;
  * a Python loop of soft_nms over the segments, for the batched op;
  * the CUDA kernel run on the CPU by tests/cuda_emulation (soft_nms.cu's
    launch sequence, each block's threads as real threads), against the CPU
    op.

Tolerances: the linear method is IEEE-exact arithmetic (min, max, +, -, *,
/ in one order everywhere), so kernels and reference agree bit for bit. The
gaussian method needs exp: the kernels share their own (exp_nonpositive in
csrc/common/soft_nms.h, so the CPU kernel and the emulated CUDA kernel agree
bit for bit), the reference calls torch.exp (ATen's vectorized exp, which
depends on the CPU capability: hence the ``numerics`` marker,
tests/conftest.py); they differ by an ulp or so, so gaussian decayed scores
are compared within rtol 1e-5 (float32) / 1e-12 (float64) and indices
exactly on the seeded inputs here (a flip would need two decayed scores
within a few ulps of each other).
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import maskrcnn_ops
from maskrcnn_ops import reference

# The emulator's build step (compiler, flags) is the one of the other
# emulated kernels.
from test_cuda_kernels_emulated import _build

ops = torch.ops.maskrcnn_ops

FULL_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
HALF_DTYPES = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
METHODS = ["linear", "gaussian"]
SCORE_TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-4),
}


def make_boxes(n, *, seed=0, dtype=torch.float32, device="cpu"):
    """Clustered boxes [N, 4] (many overlaps) and scores [N] in (0, 1),
    drawn in float64 and cast; for N >= 8 also an exact duplicate of another
    box with an equal score, a zero-area box and an inverted box."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(n // 6, 1), 2, generator=g, dtype=torch.float64) * 300
    xy = centres[torch.randint(0, len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g, dtype=torch.float64) * 8
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 50 + 5
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g, dtype=torch.float64) * 0.98 + 0.01
    if n >= 8:
        boxes[3], scores[3] = boxes[2], scores[2]
        boxes[5, 2] = boxes[5, 0]  # zero area
        boxes[6, :2], boxes[6, 2:] = boxes[6, 2:].clone(), boxes[6, :2].clone()  # inverted
    return boxes.to(device, dtype), scores.to(device, dtype)


def make_labels(n, classes, *, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g).to(device)


def assert_same_result(ours, expected, *, dtype, method):
    keep, scores = ours
    keep_ref, scores_ref = expected
    assert keep.dtype == torch.int64 and scores.dtype == scores_ref.dtype
    assert torch.equal(keep.cpu(), keep_ref.cpu())
    tolerance = dict(rtol=0, atol=0) if method == "linear" and dtype in (torch.float32, torch.float64) else SCORE_TOLERANCE[dtype]
    torch.testing.assert_close(scores.cpu(), scores_ref.cpu(), **tolerance)


# --------------------------------------------------------------- reference --


@pytest.mark.parametrize("dtype", FULL_DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "iou_threshold, sigma, score_threshold",
    [(0.3, 0.5, 0.001), (0.5, 0.1, 0.05), (0.0, 2.0, 0.0), (0.7, 0.5, 0.3), (-0.1, 1.0, 0.001)],
)
def test_equals_reference(device, dtype, method, iou_threshold, sigma, score_threshold):
    for n, seed in [(1, 0), (7, 1), (120, 2), (300, 3)]:
        boxes, scores = make_boxes(n, seed=seed, dtype=dtype, device=device)
        kwargs = dict(sigma=sigma, method=method, score_threshold=score_threshold)
        ours = maskrcnn_ops.soft_nms(boxes, scores, iou_threshold, **kwargs)
        assert_same_result(ours, reference.soft_nms(boxes, scores, iou_threshold, **kwargs), dtype=dtype, method=method)
        assert ours[0].device == boxes.device and ours[1].device == boxes.device


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_half_types_equal_reference(device, dtype, method):
    """float16 / bfloat16 inputs: arithmetic in float32, scores returned in
    the input dtype (the order is the float32 decayed scores')."""
    boxes, scores = make_boxes(150, seed=4, dtype=dtype, device=device)
    ours = maskrcnn_ops.soft_nms(boxes, scores, 0.4, method=method)
    assert ours[1].dtype == dtype
    assert_same_result(ours, reference.soft_nms(boxes, scores, 0.4, method=method), dtype=dtype, method=method)


def test_decays_and_order(device):
    """A worked case: two overlapping boxes and a distant one. The second
    box's score is decayed by exactly the method's weight of their IoU, and
    the output is by decreasing decayed score."""
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 5], [100, 100, 110, 110]], dtype=torch.float64, device=device)
    scores = torch.tensor([0.9, 0.8, 0.5], dtype=torch.float64, device=device)
    keep, out = maskrcnn_ops.soft_nms(boxes, scores, 0.3, method="linear")
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(out.cpu(), torch.tensor([0.9, 0.5, 0.8 * 0.5], dtype=torch.float64), rtol=0, atol=0)
    keep, out = maskrcnn_ops.soft_nms(boxes, scores, 0.3, method="gaussian", sigma=0.5)
    assert keep.tolist() == [0, 2, 1]  # 0.8 * exp(-0.5) = 0.485 < 0.5
    torch.testing.assert_close(out.cpu(), torch.tensor([0.9, 0.5, 0.8 * math.exp(-0.25 / 0.5)], dtype=torch.float64))
    # Linear: an IoU of exactly the threshold decays (the paper's and mmcv's
    # >=); just above it does not.
    keep, out = maskrcnn_ops.soft_nms(boxes, scores, 0.5, method="linear")
    assert keep.tolist() == [0, 2, 1] and out[2].item() == 0.8 * 0.5
    keep, out = maskrcnn_ops.soft_nms(boxes, scores, math.nextafter(0.5, 1), method="linear")
    assert keep.tolist() == [0, 1, 2] and out[1].item() == 0.8
    # The decayed score falls below the threshold: the box leaves.
    keep, _ = maskrcnn_ops.soft_nms(boxes, scores, 0.3, method="linear", score_threshold=0.45)
    assert keep.tolist() == [0, 2]


@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_gaussian_weight_is_exp(device, dtype):
    """The kernels' exp (exp_nonpositive) over the decay's whole range: pairs
    of boxes of IoU k/64, sigmas from 1e-3 to 10, against math.exp in
    float64 of the same argument within 2.5 ulp; a weight below the smallest normal number is 0 (the
    box leaves at score_threshold 0)."""
    eps = torch.finfo(dtype).eps
    for sigma in (1e-3, 0.02, 0.1, 0.5, 2.0, 10.0):
        for k in range(1, 65):
            # Box b = [0, 0, 64, k] inside a = [0, 0, 64, 64]: IoU k / 64, exact.
            boxes = torch.tensor([[0, 0, 64, 64], [0, 0, 64, k]], dtype=dtype, device=device)
            keep, out = maskrcnn_ops.soft_nms(boxes, torch.tensor([1.0, 0.5], dtype=dtype, device=device), 0.0,
                                              sigma=sigma, score_threshold=0.0)
            # The argument as the kernel rounds it (in dtype): its rounding is
            # amplified by exp (by |x| ulps), the exp itself must be within 2.
            overlap = torch.tensor(k / 64, dtype=dtype)
            expected = 0.5 * math.exp((-(overlap * overlap) / torch.tensor(sigma, dtype=dtype)).item())
            if expected < 0.5 * torch.finfo(dtype).tiny * 2:
                assert keep.tolist() in ([0], [0, 1]) and (len(keep) == 1 or out[1] <= expected * 2)
                continue
            assert keep.tolist() == [0, 1]
            assert abs(out[1].item() - expected) <= 2.5 * eps * expected, (sigma, k, out[1].item(), expected)


def test_ties_in_index_order(device):
    """Equal scores: the lowest index is kept first, in any input order.
    Identical boxes with equal scores: the lowest index keeps its score."""
    g = torch.Generator().manual_seed(5)
    far = torch.arange(40, dtype=torch.float32)[:, None] * 100 + torch.tensor([0.0, 0.0, 10.0, 10.0])
    scores = torch.full((40,), 0.5)
    keep, out = maskrcnn_ops.soft_nms(far.to(device), scores.to(device), 0.3)
    assert keep.tolist() == list(range(40)) and (out.cpu() == 0.5).all()
    perm = torch.randperm(40, generator=g)
    keep, _ = maskrcnn_ops.soft_nms(far[perm].to(device), scores.to(device), 0.3)
    assert keep.tolist() == list(range(40))
    same = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(3, 1)
    keep, out = maskrcnn_ops.soft_nms(same.to(device), torch.full((3,), 0.9, device=device), 0.3, method="linear",
                                      score_threshold=0.0)
    assert keep.tolist() == [0, 1, 2] and out.tolist() == pytest.approx([0.9, 0.0, 0.0])


def test_non_finite_inputs_never_crash(device):
    """NaN scores are dropped; NaN/infinite boxes decay nothing and are not
    decayed (their IoU counts as 0); infinite scores are kept first and leave
    when a weight of 0 makes them NaN. All equal to the reference."""
    boxes, scores = make_boxes(60, seed=6, dtype=torch.float64)
    boxes[10, 0] = math.nan
    boxes[11, 2] = math.inf
    boxes[12] = torch.tensor([-math.inf, -math.inf, math.inf, math.inf])
    boxes[13] = torch.tensor([math.nan] * 4)
    scores[20] = math.nan
    scores[21] = math.inf
    scores[22] = -math.inf
    boxes[23] = boxes[21]  # linear: IoU 1 with the infinite score's box
    for method in METHODS:
        for iou_threshold in (0.3, -1.0):
            ours = maskrcnn_ops.soft_nms(boxes.to(device), scores.to(device), iou_threshold, method=method)
            assert_same_result(ours, reference.soft_nms(boxes, scores, iou_threshold, method=method),
                               dtype=torch.float64, method=method)
            keep = ours[0].cpu().tolist()
            assert 20 not in keep and 22 not in keep and keep[0] == 21
            assert {10, 11, 12, 13} <= set(keep)
    all_nan = torch.full((5,), math.nan, dtype=torch.float64, device=device)
    keep, out = maskrcnn_ops.soft_nms(boxes[:5].to(device), all_nan, 0.3)
    assert keep.numel() == 0 and out.numel() == 0


def test_empty_and_all_below_threshold(device):
    boxes, scores = make_boxes(10, seed=7, device=device)
    for b, s in [(boxes[:0], scores[:0]), (boxes, scores * 0)]:
        keep, out = maskrcnn_ops.soft_nms(b, s, 0.3)
        assert keep.shape == (0,) and keep.dtype == torch.int64 and out.shape == (0,) and out.dtype == s.dtype
        keep, out = maskrcnn_ops.batched_soft_nms(b, s, torch.zeros(len(s), dtype=torch.int64, device=device), 0.3)
        assert keep.shape == (0,) and out.shape == (0,)


@st.composite
def small_cases(draw):
    """Edge inputs: few boxes on a coarse grid (duplicates, nesting, touching
    edges, zero and negative sides), scores from a few levels (ties) or
    special values, any threshold and sigma."""
    n = draw(st.integers(0, 12))
    coords = st.sampled_from([0.0, 1.0, 2.0, 3.0, 5.0, 8.0])
    boxes = torch.tensor([[draw(coords) for _ in range(4)] for _ in range(n)], dtype=torch.float64).view(n, 4)
    levels = st.sampled_from([0.0, 0.3, 0.5, 0.5, 1.0]) | st.sampled_from([math.nan, math.inf, 1e-4])
    scores = torch.tensor([draw(levels) for _ in range(n)], dtype=torch.float64)
    return dict(
        boxes=boxes, scores=scores,
        iou_threshold=draw(st.sampled_from([-0.5, 0.0, 0.25, 0.5, 1.0]) | st.floats(0.0, 1.0)),
        sigma=draw(st.sampled_from([1e-3, 0.5, 3.0])),
        score_threshold=draw(st.sampled_from([0.0, 0.001, 0.3])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
    )


@settings(max_examples=80, deadline=None)
@given(case=small_cases())
def test_fuzz_equals_reference(case):
    """Hypothesis: on the CPU, both methods equal the reference on edge
    inputs (linear bit for bit; gaussian the same boxes, scores within the
    exp's tolerance, order exact where scores differ by more than that)."""
    boxes, scores = case["boxes"].to(case["dtype"]), case["scores"].to(case["dtype"])
    kwargs = dict(sigma=case["sigma"], score_threshold=case["score_threshold"])
    for method in METHODS:
        ours = maskrcnn_ops.soft_nms(boxes, scores, case["iou_threshold"], method=method, **kwargs)
        expected = reference.soft_nms(boxes, scores, case["iou_threshold"], method=method, **kwargs)
        if method == "linear":
            assert_same_result(ours, expected, dtype=case["dtype"], method=method)
            continue
        assert sorted(ours[0].tolist()) == sorted(expected[0].tolist())
        by_index = {i: v for i, v in zip(expected[0].tolist(), expected[1].tolist())}
        torch.testing.assert_close(ours[1], torch.tensor([by_index[i] for i in ours[0].tolist()], dtype=case["dtype"]),
                                   **SCORE_TOLERANCE[case["dtype"]])
        assert (ours[1][1:] <= ours[1][:-1]).all()  # decreasing


# ----------------------------------------------------------------- batched --


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("with_images", [False, True], ids=["classes", "images-and-classes"])
def test_batched_equals_per_segment_loop(device, method, with_images):
    """batched_soft_nms equals soft_nms on each (image, class) segment on its
    own, merged by decreasing score (ties by index), and the reference."""
    n = 400
    boxes, scores = make_boxes(n, seed=8, dtype=torch.float64, device=device)
    idxs = make_labels(n, 5, seed=9, device=device)
    image_ids = make_labels(n, 3, seed=10, device=device).int() if with_images else None
    ours = maskrcnn_ops.batched_soft_nms(boxes, scores, idxs, 0.4, image_ids=image_ids, method=method)
    expected = reference.batched_soft_nms(boxes, scores, idxs, 0.4, image_ids=image_ids, method=method)
    assert_same_result(ours, expected, dtype=torch.float64, method=method)
    keys = idxs.cpu() * 10 + (image_ids.cpu() if with_images else 0)
    kept, kept_scores = [], []
    for key in keys.unique():
        members = torch.nonzero(keys == key).flatten()
        k, s = maskrcnn_ops.soft_nms(boxes[members.to(device)], scores[members.to(device)], 0.4, method=method)
        kept.append(members[k.cpu()])
        kept_scores.append(s.cpu())
    kept, kept_scores = torch.cat(kept), torch.cat(kept_scores)
    order = torch.argsort(kept)
    kept, kept_scores = kept[order], kept_scores[order]
    order = torch.sort(kept_scores, descending=True, stable=True).indices
    assert torch.equal(ours[0].cpu(), kept[order]) and torch.equal(ours[1].cpu(), kept_scores[order])


def test_batched_many_segments_in_parallel(device):
    """Enough work for the CPU's parallel path (20,000 boxes, 80 classes):
    the same as one thread."""
    boxes, scores = make_boxes(20000, seed=11, device=device)
    idxs = make_labels(20000, 80, seed=12, device=device)
    ours = maskrcnn_ops.batched_soft_nms(boxes, scores, idxs, 0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = maskrcnn_ops.batched_soft_nms(boxes, scores, idxs, 0.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ours[0], single[0]) and torch.equal(ours[1], single[1])
    assert len(ours[0]) > 10000


# -------------------------------------------------------------- bad input --


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((torch.rand(5, 3), torch.rand(5), 0.3), {}, r"boxes of shape \[N, 4\]"),
        ((torch.rand(5, 4), torch.rand(4), 0.3), {}, r"scores of shape \[5\]"),
        ((torch.rand(5, 4), torch.rand(5, 1), 0.3), {}, r"scores of shape \[5\]"),
        ((torch.randint(0, 9, (5, 4)), torch.rand(5), 0.3), {}, "floating-point boxes and scores"),
        ((torch.rand(5, 4), torch.rand(5, dtype=torch.float64), 0.3), {}, "same dtype"),
        ((torch.rand(5, 4), torch.rand(5), 0.3), dict(sigma=0.0), "sigma > 0"),
        ((torch.rand(5, 4), torch.rand(5), 0.3), dict(sigma=-1.0), "sigma > 0"),
        ((torch.rand(5, 4), torch.rand(5), 0.3), dict(sigma=math.nan), "sigma > 0"),
        ((torch.rand(5, 4), torch.rand(5), 0.3), dict(method="naive"), "unknown method 'naive'"),
        ((torch.rand(5, 4), torch.rand(5), 0.3), dict(score_threshold=-0.1), "score_threshold >= 0"),
        ((torch.rand(5, 4), torch.rand(5), 0.3), dict(score_threshold=math.nan), "score_threshold >= 0"),
        ((torch.rand(5, 4), torch.rand(5), math.nan), {}, "iou_threshold is NaN"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        maskrcnn_ops.soft_nms(*args, **kwargs)


def test_bad_batched_arguments():
    boxes, scores = torch.rand(5, 4), torch.rand(5)
    with pytest.raises(RuntimeError, match=r"idxs of shape \[5\]"):
        maskrcnn_ops.batched_soft_nms(boxes, scores, torch.zeros(4, dtype=torch.int64), 0.3)
    with pytest.raises(RuntimeError, match="integer idxs"):
        maskrcnn_ops.batched_soft_nms(boxes, scores, torch.zeros(5), 0.3)
    with pytest.raises(RuntimeError, match=r"image_ids of shape \[5\]"):
        maskrcnn_ops.batched_soft_nms(boxes, scores, torch.zeros(5, dtype=torch.int64), 0.3,
                                      image_ids=torch.zeros(6, dtype=torch.int64))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_devices_are_an_error():
    with pytest.raises(RuntimeError, match="same device"):
        maskrcnn_ops.soft_nms(torch.rand(5, 4, device="cuda"), torch.rand(5), 0.3)


# ----------------------------------------------------------------- opcheck --


def _opcheck_samples(device):
    boxes, scores = make_boxes(40, seed=13, device=device)
    idxs = make_labels(40, 3, seed=14, device=device)
    image_ids = make_labels(40, 2, seed=15, device=device)
    return {
        "soft": (ops.soft_nms.default, (boxes, scores, 0.3, 0.5, "gaussian", 0.001)),
        "soft-linear-f64": (ops.soft_nms.default, (boxes.double(), scores.double(), 0.3, 0.5, "linear", 0.01)),
        "soft-f16": (ops.soft_nms.default, (boxes.half(), scores.half(), 0.3, 0.5, "gaussian", 0.001)),
        "soft-empty": (ops.soft_nms.default, (boxes[:0], scores[:0], 0.3, 0.5, "gaussian", 0.001)),
        "batched": (ops.batched_soft_nms.default, (boxes, scores, idxs, image_ids, 0.3, 0.5, "gaussian", 0.001)),
        "batched-no-image-ids": (ops.batched_soft_nms.default, (boxes, scores, idxs.int(), None, 0.5, 0.5, "linear", 0.0)),
    }


@pytest.mark.parametrize("sample", ["soft", "soft-linear-f64", "soft-f16", "soft-empty", "batched", "batched-no-image-ids"])
def test_opcheck(device, sample):
    """torch.library.opcheck: schema, autograd registration, fake kernel (an
    unbacked size shared by both outputs) and AOT-dispatch consistency."""
    op, args = _opcheck_samples(device)[sample]
    result = torch.library.opcheck(op, args)
    assert set(result) == {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}
    assert all(v == "SUCCESS" for v in result.values()), result


def test_not_differentiable(device):
    """Scores that require grad: the registration checks pass, and a backward
    through the decayed scores is a clear error, not a silent zero.
    (opcheck's test_aot_dispatch_dynamic cannot run here: it sums all outputs
    into the first, the int64 indices, and fails on the float scores.)"""
    boxes, scores = make_boxes(30, seed=23, device=device)
    idxs = make_labels(30, 2, seed=24, device=device)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for op, args in [(ops.soft_nms.default, (boxes, scores.clone().requires_grad_(), 0.3, 0.5, "gaussian", 0.001)),
                     (ops.batched_soft_nms.default,
                      (boxes, scores.clone().requires_grad_(), idxs, None, 0.3, 0.5, "linear", 0.001))]:
        result = torch.library.opcheck(op, args, test_utils=checks)
        assert all(v == "SUCCESS" for v in result.values()), result
    _, out = maskrcnn_ops.soft_nms(boxes, scores.clone().requires_grad_(), 0.3)
    with pytest.raises(RuntimeError, match="soft_nms is not differentiable"):
        out.sum().backward()


# --------------------------------------------------------- emulated CUDA --


@pytest.fixture(scope="module")
def soft_nms_emulator(tmp_path_factory):
    """The emulated soft-NMS CUDA kernel."""
    return _build("soft_nms_emulation", tmp_path_factory.mktemp("cuda_emulation"))


def _pointer(t):
    return ctypes.c_void_p(t.data_ptr())


def emulated_soft_nms(lib, boxes, scores, idxs, iou_threshold, *, image_ids=None, sigma=0.5, method="gaussian",
                      score_threshold=0.001, threads=32, blocks=0):
    """batched_soft_nms with the CUDA kernel: soft_nms.cu's ATen steps here
    (grouping, segment ends, final order), its launch sequence and kernel
    emulated with ``threads`` threads per block (and at most ``blocks``
    blocks when not 0)."""
    n = boxes.size(0)
    order = torch.arange(n)
    for key in (idxs, image_ids):  # stable sorts by the minor key, then the major key
        if key is not None:
            order = order[torch.sort(key[order], stable=True).indices]
    starts = torch.zeros(n, dtype=torch.bool)
    starts[0] = True
    for key in (idxs, image_ids):
        if key is not None:
            k = key[order]
            starts[1:] |= k[1:] != k[:-1]
    is_end = torch.ones(n, dtype=torch.bool)
    is_end[:-1] = starts[1:]
    seg_last = torch.where(is_end, torch.arange(n), torch.full((n,), n)).flip(0).cummin(0).values.flip(0).contiguous()
    acc = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    sorted_boxes = boxes[order].to(acc).contiguous()
    work = scores[order].to(acc).contiguous()
    kept_sorted = torch.zeros(n, dtype=torch.bool)
    kept_score = torch.full((n,), math.nan, dtype=acc)
    getattr(lib, f"mro_soft_nms_sorted_{'f64' if acc == torch.float64 else 'f32'}")(
        _pointer(sorted_boxes), _pointer(work), _pointer(seg_last), ctypes.c_int64(n),
        ctypes.c_int(METHODS.index(method)), ctypes.c_double(iou_threshold), ctypes.c_double(sigma),
        ctypes.c_double(score_threshold), ctypes.c_uint(threads), ctypes.c_uint(blocks), _pointer(kept_score),
        _pointer(kept_sorted),
    )
    decayed = torch.full((n,), -math.inf, dtype=acc)
    decayed[order] = kept_score.masked_fill(~kept_sorted, -math.inf)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order] = kept_sorted
    by_score = torch.sort(decayed, stable=True, descending=True).indices
    kept = by_score[keep[by_score]]
    return kept, decayed[kept].to(scores.dtype)


@pytest.mark.parametrize("dtype", FULL_DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("threads, blocks", [(1, 0), (4, 0), (32, 0), (8, 3)])
def test_emulated_cuda_kernel_equals_cpu(soft_nms_emulator, dtype, method, threads, blocks):
    """The CUDA kernel (block-wide argmax in shared memory, strided decay)
    gives the CPU kernel's result bit for bit (the same arithmetic, exp
    included): several segments of uneven sizes, blocks of 1, 4, 8 and 32
    threads (segments larger and smaller than the block), and a grid of 3
    blocks (each block walks several segments in the grid-stride loop)."""
    n = 150
    boxes, scores = make_boxes(n, seed=16, dtype=dtype)
    idxs = make_labels(n, 4, seed=17)
    idxs[:60] = 0  # one large segment
    image_ids = make_labels(n, 2, seed=18)
    for ids in (None, image_ids):
        kwargs = dict(image_ids=ids, method=method, sigma=0.3)
        ours = emulated_soft_nms(soft_nms_emulator, boxes, scores, idxs, 0.3, threads=threads, blocks=blocks, **kwargs)
        expected = maskrcnn_ops.batched_soft_nms(boxes, scores, idxs, 0.3, **kwargs)
        assert torch.equal(ours[0], expected[0])
        torch.testing.assert_close(ours[1], expected[1], rtol=0, atol=0)


def test_emulated_cuda_kernel_non_finite(soft_nms_emulator):
    boxes, scores = make_boxes(40, seed=19, dtype=torch.float64)
    boxes[10, 0], boxes[11, 2], scores[20], scores[21] = math.nan, math.inf, math.nan, math.inf
    boxes[22] = boxes[21]
    idxs = torch.zeros(40, dtype=torch.int64)
    for method in METHODS:
        ours = emulated_soft_nms(soft_nms_emulator, boxes, scores, idxs, 0.3, method=method, threads=8)
        expected = maskrcnn_ops.soft_nms(boxes, scores, 0.3, method=method)
        assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])


# -------------------------------------------------------------------- CUDA --


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_equals_cpu_on_large_inputs(method):
    """One segment of 3,000 boxes (one block walks it) and a batched call of
    20,000 boxes in 80 classes: CUDA equals the CPU kernel (both use
    exp_nonpositive and no FMA contraction, so the scores should agree bit
    for bit; compared within the reference's tolerance)."""
    boxes, scores = make_boxes(3000, seed=20)
    cpu = maskrcnn_ops.soft_nms(boxes, scores, 0.3, method=method)
    cuda = maskrcnn_ops.soft_nms(boxes.cuda(), scores.cuda(), 0.3, method=method)
    assert_same_result(cuda, cpu, dtype=torch.float32, method=method)
    boxes, scores = make_boxes(20000, seed=21)
    idxs = make_labels(20000, 80, seed=22)
    cpu = maskrcnn_ops.batched_soft_nms(boxes, scores, idxs, 0.3, method=method)
    cuda = maskrcnn_ops.batched_soft_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.3, method=method)
    assert_same_result(cuda, cpu, dtype=torch.float32, method=method)


# ----------------------------------------------------------- torch.compile --


def test_compile_fullgraph(device, fresh_dynamo):
    """torch.compile(fullgraph=True) of a post-processing step around both
    ops (the fake kernels give an unbacked size K; the boxes are gathered by
    it) equals eager."""

    def post(boxes, scores, idxs):
        keep, decayed = maskrcnn_ops.soft_nms(boxes, scores, 0.3, method="linear")
        keep_b, decayed_b = maskrcnn_ops.batched_soft_nms(boxes, scores, idxs, 0.3, sigma=0.4)
        return boxes[keep], decayed * 2, boxes[keep_b], decayed_b

    compiled = torch.compile(post, fullgraph=True, backend="aot_eager")
    for seed in (25, 26):
        boxes, scores = make_boxes(60 + seed, seed=seed, device=device)
        idxs = make_labels(60 + seed, 3, seed=seed, device=device)
        for got, expected in zip(compiled(boxes, scores, idxs), post(boxes, scores, idxs)):
            assert torch.equal(got, expected)
