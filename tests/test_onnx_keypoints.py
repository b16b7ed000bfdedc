"""ONNX translation of maskrcnn_ops.heatmaps_to_keypoints (maskrcnn_ops/export.py):
the op alone through torch.onnx.export(dynamo=True) and onnxruntime against
the op, on random 56 x 56 heatmaps and boxes of many sizes (under a pixel,
fractional, beyond MAX_KEYPOINT_MAP_SIDE, non-finite), D == 0 and K == 0.

onnxruntime's bicubic Resize computes the resized values with other
arithmetic than ATen (measured on 1200 maps, random and smooth: up to 4.4e-6 of the
heatmap's largest magnitude apart, 1.6e-5 absolute), so where two positions of a resized map are that close to its
maximum either may be the keypoint. Such maps (AMBIGUITY) are checked for a
keypoint at one of the near-maximal positions; all others must give the op's
keypoint and score (SCORE_TOLERANCE).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import maskrcnn_ops

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# Floating-point comparisons of two implementations: run under each CPU capability.
pytestmark = pytest.mark.numerics

SIDE = 56
# Both relative to the largest magnitude of the heatmap resized (the error of
# a resized value scales with its taps, not with the value): scores within
# SCORE_TOLERANCE (2.3x the measured difference), and resized values within
# AMBIGUITY of the maximum (two scores' tolerances) may be the keypoint in
# either implementation.
SCORE_TOLERANCE = 1e-5
AMBIGUITY = 2 * SCORE_TOLERANCE
COORDINATE_TOLERANCE = dict(rtol=0, atol=1e-4)  # px


class Decode(torch.nn.Module):
    def forward(self, heatmaps, boxes):
        return maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)


def onnx_session(keypoints: int, tmp_path, dtype=torch.float32):
    """onnxruntime session of the op exported with a dynamic D (at least 0)
    and a static K."""
    heatmaps = torch.randn(3, keypoints, SIDE, SIDE, dtype=dtype)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 30.0, 9.0], [1.0, 2.0, 300.0, 40.0]], dtype=dtype)
    count = torch.export.Dim("detections", min=0, max=64)
    program = torch.export.export(Decode(), (heatmaps, boxes), dynamic_shapes=({0: count}, {0: count}))
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False,
                                     custom_translation_table=maskrcnn_ops.onnx_translation_table())
    path = tmp_path / f"keypoints_{keypoints}.onnx"
    onnx_program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(heatmaps, boxes):
        outputs = session.run(None, {names[0]: heatmaps.numpy(), names[1]: boxes.numpy()})
        return tuple(torch.from_numpy(output) for output in outputs)

    return run


@pytest.fixture(scope="module")
def decode_onnx(tmp_path_factory):
    return onnx_session(5, tmp_path_factory.mktemp("onnx"))


def many_boxes(count: int, generator) -> torch.Tensor:
    """[count, 4] boxes of sides from under a pixel to a few hundred,
    fractional corners, some inverted (side clamped to 1)."""
    corners = torch.rand(count, 2, generator=generator) * 200 - 20
    sides = torch.exp(torch.rand(count, 2, generator=generator) * 7 - 2)  # 0.14 .. 150 px
    sides[: count // 8] *= -1  # inverted: width or height max(., 1) = 1
    return torch.cat([corners, corners + sides], dim=1)


def resized_map(heatmaps, box):
    """The maps [K, H, W] of one detection resized as torch does -> [K, S],
    and the resized width."""
    extent = (box[2:] - box[:2]).clamp(min=1)
    side_w, side_h = (1 if not math.isfinite(v) else min(math.ceil(v), 4096) for v in extent.tolist())
    resized = F.interpolate(heatmaps[None], size=(side_h, side_w), mode="bicubic", align_corners=False)[0]
    return resized.flatten(1), side_w


def assert_keypoints_match(ours, reference, heatmaps, boxes):
    """ONNX (keypoints, scores) against the op's: the op's keypoint and
    score where the resized map's maximum is unique by AMBIGUITY, else a
    keypoint at a near-maximal position and a score near the maximum.
    Returns the number of ambiguous maps."""
    keypoints, scores = ours
    assert keypoints.shape == reference[0].shape and scores.shape == reference[1].shape
    assert keypoints.dtype == reference[0].dtype and scores.dtype == reference[1].dtype
    ambiguous = 0
    for d in range(heatmaps.size(0)):
        maps, side_w = resized_map(heatmaps[d].float(), boxes[d])
        top = maps.max(dim=1).values
        scale = heatmaps[d].flatten(1).abs().max(dim=1).values.float()  # [K]
        near = maps >= (top - AMBIGUITY * scale)[:, None]  # [K, S]
        for k in range(heatmaps.size(1)):
            if int(near[k].sum()) == 1:
                torch.testing.assert_close(keypoints[d, k], reference[0][d, k], **COORDINATE_TOLERANCE, equal_nan=True)
                torch.testing.assert_close(scores[d, k], reference[1][d, k], rtol=0,
                                           atol=SCORE_TOLERANCE * float(scale[k]))
                continue
            ambiguous += 1
            # The position the ONNX keypoint lies at, from its coordinates.
            extent = (boxes[d, 2:] - boxes[d, :2]).clamp(min=1)
            cell = ((keypoints[d, k, :2] - boxes[d, :2]) / extent * torch.tensor([side_w, maps.size(1) // side_w])
                    - 0.5).round().long()
            assert bool(near[k, cell[1] * side_w + cell[0]]), (d, k)
            torch.testing.assert_close(scores[d, k].float(), top[k], rtol=0, atol=AMBIGUITY * float(scale[k]))
    return ambiguous


def test_onnx_keypoints_equal_the_op_on_boxes_of_many_sizes(decode_onnx):
    generator = torch.Generator().manual_seed(0)
    heatmaps = torch.randn(40, 5, SIDE, SIDE, generator=generator)
    boxes = many_boxes(40, generator)
    boxes[0] = torch.tensor([3.2, 4.7, 3.9, 5.1])  # under a pixel both ways: a 1 x 1 map
    boxes[1] = torch.tensor([0.0, 0.0, 4200.5, 2.5])  # wider than MAX_KEYPOINT_MAP_SIDE: 4096 columns
    boxes[2] = torch.tensor([10.0, 10.0, 66.0, 66.0])  # the heatmaps' own size
    reference = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    ambiguous = assert_keypoints_match(decode_onnx(heatmaps, boxes), reference, heatmaps, boxes)
    assert ambiguous < heatmaps.size(0) * heatmaps.size(1) // 10  # the test compares keypoints, mostly


def test_onnx_keypoints_of_smooth_heatmaps(decode_onnx):
    """Peaked heatmaps, as a trained head gives: upsampling a smooth map
    makes many near-equal values around its peak."""
    generator = torch.Generator().manual_seed(1)
    centres = torch.rand(12, 5, 2, generator=generator) * SIDE
    grid = torch.arange(SIDE, dtype=torch.float32)
    dy = grid[None, None, :, None] - centres[..., 1, None, None]
    dx = grid[None, None, None, :] - centres[..., 0, None, None]
    heatmaps = 8 * torch.exp(-(dx ** 2 + dy ** 2) / 20)
    boxes = many_boxes(12, generator)
    reference = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    assert_keypoints_match(decode_onnx(heatmaps, boxes), reference, heatmaps, boxes)


def test_onnx_keypoints_nan_and_flat_heatmaps_and_non_finite_boxes(decode_onnx):
    """A NaN in a map is its keypoint (torch.argmax: NaN the largest), at the
    first NaN of the resized map; a flat map's keypoint is its first pixel
    (the first maximum); a non-finite box side is resized to 1 pixel and
    gives non-finite coordinates, as the op."""
    generator = torch.Generator().manual_seed(2)
    heatmaps = torch.randn(3, 5, SIDE, SIDE, generator=generator)
    heatmaps[0, 2, 30, 17] = float("nan")
    heatmaps[0, 3] = 0.0
    boxes = torch.tensor([[5.0, 6.0, 40.0, 30.0], [float("nan"), 1.0, 20.0, 30.0], [0.0, 0.0, float("inf"), 8.0]])
    keypoints, scores = decode_onnx(heatmaps, boxes)
    reference = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    torch.testing.assert_close(keypoints, reference[0], **COORDINATE_TOLERANCE, equal_nan=True)
    assert bool(scores[0, 2].isnan()) and bool(reference[1][0, 2].isnan())
    assert keypoints[0, 3].tolist() == [5.5, 6.5, 1.0]  # the top-left pixel's centre
    scale = float(heatmaps[1:].abs().max())
    torch.testing.assert_close(scores, reference[1], rtol=0, atol=SCORE_TOLERANCE * scale, equal_nan=True)


def test_onnx_keypoints_of_no_detections(decode_onnx):
    keypoints, scores = decode_onnx(torch.zeros(0, 5, SIDE, SIDE), torch.zeros(0, 4))
    assert keypoints.shape == (0, 5, 3) and scores.shape == (0, 5)
    assert keypoints.dtype == scores.dtype == torch.float32


def test_onnx_keypoints_of_no_keypoints(tmp_path):
    run = onnx_session(0, tmp_path)
    for count in (4, 0):
        keypoints, scores = run(torch.zeros(count, 0, SIDE, SIDE), torch.rand(count, 4))
        assert keypoints.shape == (count, 0, 3) and scores.shape == (count, 0)


def test_onnx_keypoints_of_float64_heatmaps(tmp_path):
    """float64 heatmaps are resized in float32 (onnxruntime's Resize has no
    float64); boxes, coordinates and outputs stay float64."""
    run = onnx_session(5, tmp_path, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    heatmaps = torch.randn(10, 5, SIDE, SIDE, generator=generator, dtype=torch.float64)
    boxes = many_boxes(10, generator).double()
    reference = maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)
    assert_keypoints_match(run(heatmaps, boxes), reference, heatmaps, boxes)
