"""heatmaps_to_keypoints: torchvision's Keypoint R-CNN decoding as one op.

Oracles: the pure-PyTorch reference (maskrcnn_ops.reference, one tensor
operation per arithmetic operation of ATen's CPU bicubic kernel), which the
op equals bit for bit on every CPU; and torchvision's heatmaps_to_keypoints,
whose F.interpolate is torch's build for this CPU. Torch's portable build
(ATEN_CPU_CAPABILITY=default) rounds as the op does, and the reference's
resized maps equal it bit for bit; its AVX2 / AVX-512 builds fuse some
operations into FMAs, so resized values differ (measured on AVX-512: up to
3.2e-6 times the map's largest |value| in float32). Hence the near-tie rule
against torchvision: each keypoint must sit at a maximum of torch's resized
map up to NEAR_TIE times the heatmap's largest |value|, with its score equal
to torch's value there up to the same tolerance; where both pick the same
pixel, the coordinates are torchvision's exactly (float32 boxes).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import heatmaps_to_keypoints as tv_heatmaps_to_keypoints

import maskrcnn_ops
from maskrcnn_ops import reference

ops = torch.ops.maskrcnn_ops

# Largest difference between a resized value of ours and torch's, relative
# to the heatmap's largest |value| (the sums' magnitude): two resized values
# closer than this may swap places as the maximum. float32: about 3x the
# largest difference measured; float16 / bfloat16: about two ulp of the
# rounded value (an FMA may move it across a rounding boundary).
NEAR_TIE = {torch.float32: 1e-5, torch.float64: 1e-13, torch.float16: 4e-3, torch.bfloat16: 3.2e-2}

def make_boxes(num, *, seed=0, image=(800, 1088), dtype=torch.float32):
    """[num, 4] boxes of people-like sizes (20..400 px wide, 1..3 times as
    tall) inside an image of (height, width), at fractional positions."""
    g = torch.Generator().manual_seed(seed)
    width = 20 + 380 * torch.rand(num, generator=g, dtype=torch.float64)
    height = width * (1 + 2 * torch.rand(num, generator=g, dtype=torch.float64))
    x1 = (image[1] - width) * torch.rand(num, generator=g, dtype=torch.float64)
    y1 = ((image[0] - height).clamp(min=0)) * torch.rand(num, generator=g, dtype=torch.float64)
    return torch.stack([x1, y1, x1 + width, y1 + height], 1).to(dtype)


def edge_boxes(dtype=torch.float32):
    """Sub-pixel, zero-size, inverted, integer-sized and 1000 px boxes."""
    return torch.tensor(
        [
            [10.0, 20.0, 10.3, 20.7],  # below 1 px both ways: 1 x 1 map
            [5.0, 5.0, 5.0, 5.0],  # empty
            [30.0, 40.0, 20.0, 35.0],  # inverted: clamped to 1 x 1
            [0.0, 0.0, 56.0, 56.0],  # the heatmap's own size: the taps copy
            [3.25, 7.5, 60.25, 8.25],  # one row tall
            [-20.5, -10.25, 980.0, 1033.5],  # about 1000 px, partly outside the image
            [100.0, 200.0, 128.0, 214.0],  # downsampling: 28 x 14
        ],
        dtype=dtype,
    )


def make_heatmaps(num, keypoints=17, size=(56, 56), *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(num, keypoints, *size, generator=g, dtype=torch.float64)).to(dtype)


def keypoints_dtype(dtype):
    """The dtype of the results and of the boxes as the op reads them."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resized_by_torch(maps, height, width):
    """maps [K, H, W] resized by torch (this CPU's build), widened to float64."""
    resized = F.interpolate(maps[:, None], size=(height, width), mode="bicubic", align_corners=False)
    return resized[:, 0].double()


def _pixel_indices(keypoints, boxes):
    """Recovers the resized pixel (row, column) of each keypoint from its
    coordinates: [D, K] int64 each, and the map sizes [D] (height, width)."""
    b = boxes.double()
    extents = (b[:, 2:] - b[:, :2]).clamp(min=1)
    sides = extents.ceil().clamp(max=reference.KEYPOINT_MAP_LIMIT)
    k = keypoints.double()
    column = ((k[..., 0] - b[:, None, 0]) / (extents[:, None, 0] / sides[:, None, 0]) - 0.5).round().long()
    row = ((k[..., 1] - b[:, None, 1]) / (extents[:, None, 1] / sides[:, None, 1]) - 0.5).round().long()
    return row, column, sides.long()


def assert_near_torchvision(heatmaps, boxes, keypoints, scores):
    """The near-tie rule of the module docstring, per keypoint. Returns how
    many keypoints are at torchvision's pixel (where float32 boxes give
    torchvision's coordinates exactly)."""
    tolerance = NEAR_TIE[heatmaps.dtype]
    heatmaps, boxes, keypoints, scores = heatmaps.cpu(), boxes.cpu(), keypoints.cpu(), scores.cpu()
    expected_keypoints, expected_scores = tv_heatmaps_to_keypoints(heatmaps, boxes)
    rows, columns, sides = _pixel_indices(keypoints, boxes)
    expected_rows, expected_columns, _ = _pixel_indices(expected_keypoints, boxes)
    same = 0
    for i in range(heatmaps.size(0)):
        height, width = int(sides[i, 1]), int(sides[i, 0])
        resized = _resized_by_torch(heatmaps[i], height, width)
        for k in range(heatmaps.size(1)):
            row, column = int(rows[i, k]), int(columns[i, k])
            assert 0 <= row < height and 0 <= column < width, (i, k, row, column)
            top, value = float(resized[k].max()), float(resized[k, row, column])
            scale = float(heatmaps[i, k].abs().max())
            assert top - value <= tolerance * scale, (i, k, top, value)
            assert abs(float(scores[i, k]) - value) <= tolerance * scale, (i, k, float(scores[i, k]), value)
            if (row, column) == (int(expected_rows[i, k]), int(expected_columns[i, k])):
                same += 1
                if boxes.dtype == torch.float32:
                    assert torch.equal(keypoints[i, k], expected_keypoints[i, k]), (i, k)
    assert torch.all(keypoints[..., 2] == 1)
    return same


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torchvision_on_person_boxes(device, seed):
    boxes = make_boxes(24, seed=seed).to(device)
    heatmaps = make_heatmaps(24, seed=seed).to(device)
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    assert keypoints.shape == (24, 17, 3) and scores.shape == (24, 17)
    assert keypoints.dtype == scores.dtype == torch.float32
    same = assert_near_torchvision(heatmaps, boxes, keypoints, scores)
    # Random logits have no near-ties worth the name: nearly every keypoint is
    # torchvision's to the bit.
    assert same >= 0.97 * scores.numel()


def test_matches_torchvision_exactly_away_from_near_ties():
    """Where the best value leads the runner-up by far more than the ulps
    torch's FMA builds move, indices agree, so coordinates equal torchvision's
    to the bit and scores are within a few ulp."""
    boxes = torch.cat([make_boxes(20, seed=3), edge_boxes()])
    g = torch.Generator().manual_seed(4)
    heatmaps = torch.randn(boxes.size(0), 5, 56, 56, generator=g)
    # One clear peak per map, at a random pixel.
    flat = heatmaps.view(boxes.size(0), 5, -1)
    peaks = torch.randint(0, 56 * 56, (boxes.size(0), 5, 1), generator=g)
    flat.scatter_(2, peaks, 40.0)
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    expected_keypoints, expected_scores = tv_heatmaps_to_keypoints(heatmaps, boxes)
    assert torch.equal(keypoints, expected_keypoints)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=NEAR_TIE[torch.float32] * 40.0)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "DEFAULT",
                    reason="torch's portable CPU build only (ATEN_CPU_CAPABILITY=default, as make test-numerics "
                    "runs): its AVX2 / AVX-512 builds fuse FMAs")
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_torchvision_bit_for_bit_on_the_portable_build(seed):
    """Where torch rounds every operation (its portable build), our keypoints
    and scores are torchvision's to the bit: the same resized values, the
    same first maximum, the same coordinate arithmetic."""
    boxes = torch.cat([make_boxes(30, seed=seed), edge_boxes()])
    heatmaps = make_heatmaps(boxes.size(0), 17, seed=seed)
    heatmaps[0, :3] = 0  # exact ties
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    expected_keypoints, expected_scores = tv_heatmaps_to_keypoints(heatmaps, boxes)
    assert torch.equal(keypoints, expected_keypoints) and torch.equal(scores, expected_scores)


def test_matches_the_reference_bit_for_bit(device):
    boxes = torch.cat([make_boxes(16, seed=5), edge_boxes()]).to(device)
    heatmaps = make_heatmaps(boxes.size(0), 7, seed=6).to(device)
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    expected_keypoints, expected_scores = reference.heatmaps_to_keypoints(heatmaps.cpu(), boxes.cpu())
    assert torch.equal(keypoints.cpu(), expected_keypoints)
    assert torch.equal(scores.cpu(), expected_scores)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_match_the_reference(device, dtype):
    """float64 computes in float64; float16 / bfloat16 in float32 with the
    weights and resized values rounded to the heatmaps' dtype (as torch's
    kernel stores them), results widened to float32."""
    boxes = torch.cat([make_boxes(10, seed=7), edge_boxes()]).to(device)
    heatmaps = make_heatmaps(boxes.size(0), 6, seed=8, dtype=dtype).to(device)
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    expected_keypoints, expected_scores = reference.heatmaps_to_keypoints(heatmaps.cpu(), boxes.cpu())
    assert keypoints.dtype == scores.dtype == expected_scores.dtype
    assert torch.equal(keypoints.cpu(), expected_keypoints)
    assert torch.equal(scores.cpu(), expected_scores)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_near_torchvision(dtype):
    """torchvision returns float32 whatever the dtype; ours keep float64's
    precision, so float64 coordinates are compared within float32's."""
    boxes = torch.cat([make_boxes(10, seed=9), edge_boxes()])
    heatmaps = make_heatmaps(boxes.size(0), 6, seed=10, dtype=dtype)
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes.to(keypoints_dtype(dtype)))
    assert_near_torchvision(heatmaps, boxes.to(keypoints_dtype(dtype)), keypoints, scores)
    if dtype == torch.float64:
        expected_keypoints, _ = tv_heatmaps_to_keypoints(heatmaps, boxes.double())
        torch.testing.assert_close(keypoints.float(), expected_keypoints, rtol=1e-6, atol=2e-4)


def test_ties_take_the_first_pixel(device):
    """Zero maps resize to exact zeros: every pixel ties, and the keypoint is
    the map's first pixel (row 0, column 0), as torch.argmax picks."""
    boxes = torch.cat([make_boxes(6, seed=11), edge_boxes()]).to(device)
    heatmaps = torch.zeros(boxes.size(0), 3, 56, 56, device=device)
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    expected_keypoints, expected_scores = tv_heatmaps_to_keypoints(heatmaps.cpu(), boxes.cpu())
    assert torch.equal(keypoints.cpu(), expected_keypoints)
    assert torch.equal(scores.cpu(), expected_scores)
    extents = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1)
    first = 0.5 * (extents / extents.ceil()) + boxes[:, :2]
    assert torch.equal(keypoints[..., :2], first[:, None, :].expand(-1, 3, -1))


@pytest.mark.parametrize("kind", ["constant", "plateau", "two-peaks"])
def test_plateaus_and_near_ties(device, kind):
    """Maps whose resized maxima are exact or near ties (a constant map
    resizes to values a few ulp apart, a plateau of maxima, two equal peaks):
    the op equals the reference bit for bit and obeys the near-tie rule
    against torchvision."""
    boxes = torch.cat([make_boxes(8, seed=12), edge_boxes()])
    heatmaps = torch.full((boxes.size(0), 4, 56, 56), -2.0)
    if kind == "constant":
        heatmaps.fill_(1.5)
    elif kind == "plateau":
        heatmaps[:, :, 10:30, 5:45] = 3.0
    else:
        heatmaps[:, :, 20, 10] = heatmaps[:, :, 20, 40] = 5.0
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps.to(device), boxes.to(device))
    expected = reference.heatmaps_to_keypoints(heatmaps, boxes)
    assert torch.equal(keypoints.cpu(), expected[0]) and torch.equal(scores.cpu(), expected[1])
    assert_near_torchvision(heatmaps, boxes, keypoints, scores)


def test_nan_is_the_maximum(device):
    """NaN counts as the largest value (torch.argmax): the keypoint is the
    first resized pixel that a NaN reaches, with a NaN score, as torchvision."""
    boxes = make_boxes(5, seed=13)
    heatmaps = make_heatmaps(5, 2, seed=14)
    heatmaps[:, 0, 30, 20] = math.nan
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps.to(device), boxes.to(device))
    expected_keypoints, expected_scores = tv_heatmaps_to_keypoints(heatmaps, boxes)
    assert torch.equal(keypoints[:, 0].cpu(), expected_keypoints[:, 0])
    assert scores[:, 0].isnan().all() and expected_scores[:, 0].isnan().all()


def test_huge_and_non_finite_boxes(device):
    """A side beyond 4096 px is resized to 4096 (coordinates still span the
    box); an axis of NaN or infinite extent to 1 px, which gives non-finite
    coordinates along it and finite ones along the other axis. Nothing is
    read or written out of bounds (the reference agrees bit for bit)."""
    nan, inf = math.nan, math.inf
    boxes = torch.tensor(
        [
            [0.0, 0.0, 5000.5, 30.0],
            [nan, 10.0, 50.0, 60.0],
            [10.0, 10.0, 50.0, nan],
            [-inf, 0.0, 40.0, 40.0],
            [0.0, 0.0, inf, 40.0],
            [-3e38, 0.0, 3e38, 40.0],  # the width overflows to Inf
        ]
    )
    heatmaps = make_heatmaps(boxes.size(0), 3, seed=15)
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps.to(device), boxes.to(device))
    expected_keypoints, expected_scores = reference.heatmaps_to_keypoints(heatmaps, boxes)
    torch.testing.assert_close(keypoints.cpu(), expected_keypoints, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(scores.cpu(), expected_scores, rtol=0, atol=0, equal_nan=True)
    assert scores.isfinite().all()
    assert ((keypoints[0, :, 0] > 0) & (keypoints[0, :, 0] < 5000.5)).all()
    assert not keypoints[1, :, 0].isfinite().any() and keypoints[1, :, 1].isfinite().all()
    assert not keypoints[2, :, 1].isfinite().any() and keypoints[2, :, 0].isfinite().all()
    assert not keypoints[3:, :, 0].isfinite().any()


@pytest.mark.parametrize("shape", [(0, 17, 56, 56), (4, 0, 56, 56), (4, 0, 0, 0), (0, 0, 0, 0)])
def test_empty(device, shape):
    heatmaps = torch.rand(shape, device=device)
    boxes = make_boxes(shape[0]).to(device)
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    assert keypoints.shape == (shape[0], shape[1], 3) and scores.shape == shape[:2]
    assert keypoints.device == heatmaps.device


def test_strided_inputs(device):
    heatmaps = make_heatmaps(6, 4, seed=16).to(device)
    boxes = make_boxes(6, seed=16).to(device)
    strided_maps = heatmaps.transpose(2, 3).contiguous().transpose(2, 3)
    strided_boxes = torch.cat([boxes, boxes], 1)[:, :4]
    assert not strided_maps.is_contiguous()
    expected = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    ours = maskrcnn_ops.heatmaps_to_keypoints(strided_maps, strided_boxes)
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])


def test_cpu_uses_threads_consistently():
    """One thread and several give the same bits (each keypoint is found by
    one thread, with the same arithmetic)."""
    heatmaps, boxes = make_heatmaps(30, 17, seed=17), make_boxes(30, seed=17)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
        torch.set_num_threads(max(previous, 2))
        many = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_equals_cpu(dtype):
    """The CUDA kernel runs the CPU kernel's arithmetic (no FMA contraction):
    the same keypoints and scores, bit for bit."""
    boxes = torch.cat([make_boxes(40, seed=18), edge_boxes()])
    heatmaps = make_heatmaps(boxes.size(0), 17, seed=19, dtype=dtype)
    cpu = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    cuda = maskrcnn_ops.heatmaps_to_keypoints(heatmaps.cuda(), boxes.cuda())
    assert torch.equal(cuda[0].cpu(), cpu[0]) and torch.equal(cuda[1].cpu(), cpu[1])


def test_backward_raises():
    heatmaps = make_heatmaps(2, 3).requires_grad_()
    keypoints, scores = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, make_boxes(2))
    with pytest.raises(RuntimeError, match="heatmaps_to_keypoints is not differentiable"):
        scores.sum().backward()


@pytest.mark.parametrize(
    "heatmaps,boxes,message",
    [
        (torch.rand(2, 17, 56), torch.zeros(2, 4), r"heatmaps of shape \[D, K, H, W\]"),
        (torch.rand(2, 17, 56, 56), torch.zeros(3, 4), r"boxes of shape \[2, 4\]"),
        (torch.rand(2, 17, 56, 56), torch.zeros(2, 5), r"boxes of shape \[2, 4\]"),
        (torch.rand(2, 17, 56, 56), torch.zeros(2), r"boxes of shape \[2, 4\]"),
        (torch.rand(2, 17, 56, 56), torch.zeros(2, 4, dtype=torch.int64), "floating-point boxes"),
        (torch.ones(2, 17, 56, 56, dtype=torch.uint8), torch.zeros(2, 4), "dtype float32"),
        (torch.rand(2, 17, 0, 56), torch.zeros(2, 4), "at least 1 x 1"),
        (torch.rand(2, 17, 56, 0), torch.zeros(2, 4), "at least 1 x 1"),
    ],
)
def test_bad_input(heatmaps, boxes, message):
    with pytest.raises(RuntimeError, match=message):
        maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch():
    with pytest.raises(RuntimeError, match="same device"):
        maskrcnn_ops.heatmaps_to_keypoints(torch.rand(2, 17, 56, 56, device="cuda"), torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(device, dtype):
    heatmaps = make_heatmaps(5, 4, (14, 14), dtype=dtype).to(device)
    boxes = torch.cat([make_boxes(3), edge_boxes()[:2]]).to(device)
    result = torch.library.opcheck(ops.heatmaps_to_keypoints.default, (heatmaps, boxes))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compiles_with_dynamic_detections(fresh_dynamo):
    """torch.compile(fullgraph=True, dynamic=True): one graph for any number
    of detections (the fake kernel's outputs are [D, K, 3] and [D, K])."""
    compiled = torch.compile(maskrcnn_ops.heatmaps_to_keypoints, fullgraph=True, dynamic=True, backend="aot_eager")
    for num in (3, 7):
        heatmaps, boxes = make_heatmaps(num, 4, seed=num), make_boxes(num, seed=num)
        ours, expected = compiled(heatmaps, boxes), maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
        assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])
