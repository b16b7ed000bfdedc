"""Tests of maskrcnn_ops.flatten_rpn_outputs / generate_proposals /
generate_proposals_padded, the private batched top-k and the raw
rpn_decode_filter op.

Oracles:
  * torchvision's RegionProposalNetwork, run the way its forward runs after the
    head: concat_box_prediction_layers, box_coder.decode, filter_proposals,
    with the same pre/post-NMS top-n, NMS threshold, score threshold and
    min_size, in eval mode and in train mode (which selects the other top-n
    pair): the proposals and scores we promise;
  * maskrcnn_ops.reference.generate_proposals: the textbook per-image,
    per-level loop (reference decode and NMS), for small random cases, other
    settings (weights, clip) and dtypes torchvision has no CPU NMS for;
  * the per-level CPU top-k for the batched (CUDA) top-k.

Comparing with torchvision: same number of proposals per image, identical
scores (torch.equal), boxes within float32 rounding of exp() (rtol 1e-5,
atol 1e-4), same order. One exception: above 1000 boxes (4000
coordinates) torchvision's CPU batched_nms merges the levels with an
unstable sort, so proposals of equal score come in an arbitrary order there
(ours: by anchor rank). Within a run of equal scores the boxes are therefore compared as
multisets, and when such a run is cut by post_nms_top_n, ours must be a
subset of torchvision's whole run (torchvision rerun with no cut).

The tests against the reference and of the fixed-size form take the
``device`` fixture (tests/conftest.py), so they run on CPU and on CUDA, the
latter skipped without a GPU; the torchvision comparisons run on CPU, and
the CUDA path is compared with them and with the CPU path in the CUDA
section at the end.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import hypothesis
import pytest
import torch
from hypothesis import strategies as st
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

import maskrcnn_ops
import maskrcnn_ops.proposals as proposals_module
from maskrcnn_ops import NMS_BOXES_PER_CALL, reference
from maskrcnn_ops.anchors import FPN_ASPECT_RATIOS, FPN_SIZES
from maskrcnn_ops.proposals import _top_candidates

ops = torch.ops.maskrcnn_ops

BOX_TOL = dict(atol=1e-4, rtol=1e-5)
DEFAULT_CLIP = math.log(1000.0 / 16)

# torchvision's Mask R-CNN RPN settings: (pre_nms_top_n, post_nms_top_n,
# training mode) for inference and training.
MODES = {"eval": (1000, 1000, False), "train": (2000, 2000, True)}

# (padded batch height, width, image sizes): a COCO-sized batch of two images
# of different sizes, a small one, one smaller than the largest strides, and
# a small batch of five images.
BATCHES = {
    "coco": (800, 1088, [(800, 1066), (736, 1088)]),
    "medium": (256, 384, [(256, 370), (240, 384)]),
    "small": (64, 96, [(60, 90), (64, 71)]),
    "tiny": (32, 48, [(30, 41), (20, 17)]),
    "five": (64, 96, [(60, 90), (64, 71), (50, 96), (64, 96), (33, 40)]),
}
STRIDES = (4, 8, 16, 32, 64)


def cuda_only(test):
    """Marks a CUDA-only test (no ``device`` parameter): skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


# ------------------------------------------------------------------ helpers --


class Batch:
    """Random RPN head outputs for a batch, FPN levels with strides 4..64 and
    3 anchors per location: per-level objectness [N, 3, H, W] ~ N(0,
    logit_std) and deltas [N, 12, H, W] ~ N(0, delta_std), drawn in float64
    on CPU (then cast and moved), plus the ImageList and feature maps the
    anchor generators need."""

    def __init__(self, name, *, seed=0, logit_std=1.0, delta_std=0.5, dtype=torch.float32, device="cpu"):
        height, width, image_sizes = BATCHES[name]
        n = len(image_sizes)
        g = torch.Generator().manual_seed(seed)
        self.grids = [(math.ceil(height / s), math.ceil(width / s)) for s in STRIDES]
        self.images = ImageList(torch.zeros(n, 1, height, width, device=device), image_sizes)
        self.image_sizes = image_sizes
        self.features = [torch.zeros(n, 1, h, w, dtype=dtype, device=device) for h, w in self.grids]
        self.objectness = [
            (torch.randn(n, 3, h, w, generator=g, dtype=torch.float64) * logit_std).to(dtype=dtype, device=device)
            for h, w in self.grids
        ]
        self.deltas = [
            (torch.randn(n, 12, h, w, generator=g, dtype=torch.float64) * delta_std).to(dtype=dtype, device=device)
            for h, w in self.grids
        ]

    def flat(self):
        """(objectness [N, A], deltas [N, A, 4], anchors per level) as ours."""
        return maskrcnn_ops.flatten_rpn_outputs(self.objectness, self.deltas)

    def anchors(self):
        return maskrcnn_ops.AnchorGenerator()(self.images, self.features)[0]

    def set_flat(self, objectness=None, deltas=None):
        """Writes flat [N, A] logits / [N, A, 4] deltas back into the levels."""
        start = 0
        for level, (h, w) in enumerate(self.grids):
            count = h * w * 3
            n = len(self.image_sizes)
            if objectness is not None:
                self.objectness[level] = objectness[:, start: start + count].reshape(n, h, w, 3).permute(0, 3, 1, 2)
            if deltas is not None:
                level_deltas = deltas[:, start: start + count].reshape(n, h, w, 3, 4)
                self.deltas[level] = level_deltas.permute(0, 3, 4, 1, 2).reshape(n, 12, h, w)
            start += count


def ours(batch, *, pre_nms_top_n, post_nms_top_n, nms_thresh=0.7, score_thresh=0.0, min_size=1e-3):
    objectness, deltas, counts = batch.flat()
    return maskrcnn_ops.generate_proposals(
        objectness, deltas, batch.anchors(), counts, batch.image_sizes, pre_nms_top_n=pre_nms_top_n,
        post_nms_top_n=post_nms_top_n, nms_thresh=nms_thresh, score_thresh=score_thresh, min_size=min_size,
    )


def torchvision_proposals(batch, *, pre_nms_top_n, post_nms_top_n, training=False, nms_thresh=0.7,
                          score_thresh=0.0, min_size=1e-3):
    """torchvision's RegionProposalNetwork.forward after the head: its anchor
    generator, concat_box_prediction_layers, box_coder.decode and
    filter_proposals, in train or eval mode (the top-n pair of the other mode
    is deliberately different, so the mode matters)."""
    other = 10**9
    pre = dict(training=pre_nms_top_n, testing=other) if training else dict(training=other, testing=pre_nms_top_n)
    post = dict(training=post_nms_top_n, testing=other) if training else dict(training=other, testing=post_nms_top_n)
    rpn = RegionProposalNetwork(TorchvisionAnchorGenerator(FPN_SIZES, FPN_ASPECT_RATIOS), RPNHead(1, 3),
                                0.7, 0.3, 256, 0.5, pre, post, nms_thresh, score_thresh)
    rpn.min_size = min_size
    rpn.train(training)
    anchors = rpn.anchor_generator(batch.images, batch.features)
    num_images = len(anchors)
    num_anchors_per_level = [o[0].numel() for o in batch.objectness]
    objectness, pred_bbox_deltas = concat_box_prediction_layers(batch.objectness, batch.deltas)
    proposals = rpn.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
    with torch.no_grad():
        return rpn.filter_proposals(proposals, objectness, batch.image_sizes, num_anchors_per_level)


def assert_rows_match(actual, pool, msg, tol=BOX_TOL):
    """Each row of `actual` matches (within tol) a distinct row of `pool`."""
    close = ((actual[:, None, :] - pool[None, :, :]).abs()
             <= tol["atol"] + tol["rtol"] * pool.abs()[None, :, :]).all(-1)
    used = torch.zeros(len(pool), dtype=torch.bool)
    for row in range(len(actual)):
        free = torch.nonzero(close[row] & ~used).flatten()
        assert len(free) > 0, f"{msg}: box {actual[row].tolist()} not among {pool.tolist()[:8]}..."
        used[free[0]] = True


def near_tie_runs(scores, rtol):
    """(start, end) of the runs of consecutive sorted scores that lie within
    rtol of their neighbour: equal scores, and scores whose order another
    rounding of sigmoid could swap."""
    if len(scores) == 0:
        return []
    gap = (scores[1:] - scores[:-1]).abs() > rtol * scores[1:].abs()
    cuts = [0] + (torch.nonzero(gap).flatten() + 1).tolist() + [len(scores)]
    return list(zip(cuts[:-1], cuts[1:]))


def assert_same_proposals(actual, expected, *, post_nms_top_n=None, uncut=None, box_tol=BOX_TOL, msg=""):
    """actual, expected: (boxes list, scores list). Counts equal, scores
    within two ulps of their dtype, boxes close in the
    same order, except within runs of near-equal scores (compared as
    multisets).

    The scores are not bitwise-defined: torch.sigmoid rounds its vectorized
    body and its scalar loop tail differently by an ulp, and which element
    falls in the tail depends on the tensor's length and the CPU's vector
    width (AVX2 or AVX-512), so our batched call and torchvision's can round
    an element differently. A near-tied run cut by post_nms_top_n must be a
    subset of the same scores in uncut() (the expected result without a
    cut)."""
    uncut_result = None
    for image, (boxes, scores, exp_boxes, exp_scores) in enumerate(zip(*actual, *expected)):
        where = f"{msg} image {image}"
        boxes, scores, exp_boxes, exp_scores = (t.cpu() for t in (boxes, scores, exp_boxes, exp_scores))
        assert len(scores) == len(exp_scores), f"{where}: {len(scores)} proposals, expected {len(exp_scores)}"
        assert boxes.shape == (len(scores), 4)
        rtol = 2 * torch.finfo(scores.dtype).eps
        torch.testing.assert_close(scores, exp_scores, atol=0, rtol=rtol, msg=lambda m: f"{where}: {m}")
        for start, end in near_tie_runs(exp_scores, rtol):
            run = f"{where} scores {exp_scores[start].item():.9g}..{exp_scores[end - 1].item():.9g}"
            if end - start == 1:
                torch.testing.assert_close(boxes[start:end], exp_boxes[start:end], **box_tol,
                                           msg=lambda m: f"{run}: {m}")
            elif end == len(scores) == post_nms_top_n and uncut is not None:
                if uncut_result is None:
                    uncut_result = uncut()
                full_boxes, full_scores = uncut_result[0][image].cpu(), uncut_result[1][image].cpu()
                low, high = exp_scores[end - 1], exp_scores[start]
                in_run = (full_scores >= low - rtol * low.abs()) & (full_scores <= high + rtol * high.abs())
                assert_rows_match(boxes[start:end], full_boxes[in_run], run, box_tol)
            else:
                assert_rows_match(boxes[start:end], exp_boxes[start:end], run, box_tol)


def assert_same_up_to_rounding(actual, expected, msg=""):
    """For results from other devices, whose exp() and sigmoid may round
    differently (so near-equal scores may swap): equal counts, scores within
    two ulps (both lists sorted), and the (score, box) rows equal as
    multisets within tolerance."""
    for image, (boxes, scores, exp_boxes, exp_scores) in enumerate(zip(*actual, *expected)):
        where = f"{msg} image {image}"
        boxes, scores, exp_boxes, exp_scores = (t.cpu() for t in (boxes, scores, exp_boxes, exp_scores))
        assert len(scores) == len(exp_scores), f"{where}: {len(scores)} proposals, expected {len(exp_scores)}"
        torch.testing.assert_close(scores, exp_scores, atol=0, rtol=2 * torch.finfo(scores.dtype).eps,
                                   msg=lambda m: f"{where}: {m}")
        score_close = (scores[:, None] - exp_scores[None, :]).abs() <= 2 * torch.finfo(scores.dtype).eps
        box_close = ((boxes[:, None, :] - exp_boxes[None, :, :]).abs()
                     <= BOX_TOL["atol"] + BOX_TOL["rtol"] * exp_boxes.abs()[None, :, :]).all(-1)
        close = score_close & box_close
        used = torch.zeros(len(exp_scores), dtype=torch.bool)
        for row in range(len(scores)):
            free = torch.nonzero(close[row] & ~used).flatten()
            assert len(free) > 0, f"{where}: proposal {row} ({scores[row].item()}, {boxes[row].tolist()}) unmatched"
            used[free[0]] = True


def compare_with_torchvision(batch, *, pre_nms_top_n, post_nms_top_n, training=False, msg="", **settings):
    """Runs both and compares; returns ours."""
    result = ours(batch, pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n, **settings)
    expected = torchvision_proposals(batch, pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n,
                                     training=training, **settings)

    def uncut():
        return torchvision_proposals(batch, pre_nms_top_n=pre_nms_top_n, post_nms_top_n=10**9,
                                     training=training, **settings)

    assert_same_proposals(result, expected, post_nms_top_n=post_nms_top_n, uncut=uncut, msg=msg)
    return result


def small_case(seed, *, n=2, levels=(40, 12, 5), dtype=torch.float32, device="cpu"):
    """A small random problem: n images, by default 3 levels of 40, 12 and 5
    anchors (random boxes, some partly outside the image), N(0, 2) logits,
    N(0, 0.5) deltas, image sizes around 60 x 80."""
    g = torch.Generator().manual_seed(seed)
    levels = list(levels)
    total = sum(levels)
    xy = torch.rand(total, 2, generator=g, dtype=torch.float64) * 90 - 10
    wh = torch.rand(total, 2, generator=g, dtype=torch.float64) * 40 + 2
    anchors = torch.cat([xy, xy + wh], 1)
    objectness = torch.randn(n, total, generator=g, dtype=torch.float64) * 2
    deltas = torch.randn(n, total, 4, generator=g, dtype=torch.float64) * 0.5
    image_sizes = [(int(h), int(w)) for h, w in torch.randint(40, 90, (n, 2), generator=g).tolist()]
    return dict(
        objectness=objectness.to(dtype=dtype, device=device),
        deltas=deltas.to(dtype=dtype, device=device),
        anchors=anchors.to(dtype=dtype, device=device),
        num_anchors_per_level=levels,
        image_sizes=image_sizes,
    )


def assert_same_as_reference(result, expected, dtype, msg=""):
    """Same order (ties by anchor rank on both sides; runs of equal scores
    compared as multisets all the same, since on CUDA the batched top-k may
    order equal logits otherwise), boxes within the dtype's rounding of
    exp(), scores within two ulps (the reference applies sigmoid to
    per-image, per-level slices: see assert_same_proposals)."""
    tol = {torch.float64: dict(atol=1e-9, rtol=1e-12), torch.float32: BOX_TOL,
           torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}[dtype]
    assert all(b.dtype == dtype and s.dtype == dtype for b, s in zip(*result))
    assert_same_proposals(result, expected, box_tol=tol, msg=msg)


# ------------------------------------------------------ flatten_rpn_outputs --


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_flatten_matches_torchvision(device, memory_format):
    """flatten_rpn_outputs == concat_box_prediction_layers (reshaped per
    image), for NCHW and channels_last head outputs, with the anchors per
    level (A * H * W, the order AnchorGenerator uses)."""
    batch = Batch("small", seed=1, device=device)
    objectness = [o.contiguous(memory_format=memory_format) for o in batch.objectness]
    deltas = [d.contiguous(memory_format=memory_format) for d in batch.deltas]
    flat_objectness, flat_deltas, counts = maskrcnn_ops.flatten_rpn_outputs(objectness, deltas)
    expected_objectness, expected_deltas = concat_box_prediction_layers(objectness, deltas)
    n = objectness[0].size(0)
    assert counts == [3 * h * w for h, w in batch.grids]
    assert flat_objectness.shape == (n, sum(counts)) and flat_deltas.shape == (n, sum(counts), 4)
    assert torch.equal(flat_objectness, expected_objectness.view(n, -1))
    assert torch.equal(flat_deltas, expected_deltas.view(n, -1, 4))
    assert len(batch.anchors()) == sum(counts)


# -------------------------------------------------------------- torchvision --


@pytest.mark.parametrize("mode", list(MODES))
def test_matches_torchvision_rpn(mode):
    """A COCO-sized batch (two images, 800 x 1066 and 736 x 1088 padded to
    800 x 1088, 217,362 anchors): torchvision's proposals with its
    inference (1000/1000, N(0, 1) logits) and training (2000/2000, N(0, 3)
    logits, whose sigmoids saturate into many ties) settings. The
    stride-64 level has fewer anchors (663) than pre_nms_top_n in train mode."""
    pre, post, training = MODES[mode]
    batch = Batch("coco", seed=2, logit_std=3.0 if training else 1.0)
    boxes, scores = compare_with_torchvision(batch, pre_nms_top_n=pre, post_nms_top_n=post, training=training,
                                             msg=mode)
    assert [len(s) for s in scores] == [post, post]  # the cut is reached: the case is not trivial
    if training:
        assert (scores[0][1:] == scores[0][:-1]).sum() > 10  # ties are exercised
    for image, (height, width) in enumerate(batch.image_sizes):
        b = boxes[image]
        assert (b[:, 0::2] >= 0).all() and (b[:, 0::2] <= width).all()
        assert (b[:, 1::2] >= 0).all() and (b[:, 1::2] <= height).all()


@pytest.mark.parametrize(
    "settings",
    [dict(nms_thresh=0.5, score_thresh=0.6, min_size=8.0), dict(nms_thresh=0.3, score_thresh=0.0, min_size=30.0),
     dict(nms_thresh=1.0, score_thresh=0.9, min_size=0.0)],
    ids=["nms0.5-score0.6-min8", "nms0.3-min30", "nms1-score0.9"],
)
def test_matches_torchvision_other_settings(settings):
    """Other NMS thresholds, score thresholds and minimum sizes (which drop
    many candidates before NMS), on a medium batch."""
    batch = Batch("medium", seed=3, logit_std=1.5)
    compare_with_torchvision(batch, pre_nms_top_n=300, post_nms_top_n=400, msg=str(settings), **settings)


@pytest.mark.parametrize("name", ["small", "tiny"])
def test_small_images_and_levels_below_top_n(name):
    """Images smaller than the largest strides (1x1 and 1x2 maps), every level
    with fewer anchors than pre_nms_top_n, image 1 of the tiny batch much
    smaller than the padded batch (most anchors clipped away)."""
    batch = Batch(name, seed=4)
    for pre, post in [(1000, 1000), (20, 30)]:
        compare_with_torchvision(batch, pre_nms_top_n=pre, post_nms_top_n=post, msg=f"{name} {pre}/{post}")


def test_huge_deltas_match_torchvision():
    """Deltas far beyond the clip (dw, dh up to 1e30) and huge offsets (dx, dy
    up to 1e4: boxes far outside the image, clipped to zero width) on the
    best-scoring anchors: exp() cannot overflow, and the result is
    torchvision's."""
    batch = Batch("medium", seed=5)
    objectness, deltas, _ = batch.flat()
    top = objectness.topk(400, dim=1).indices
    g = torch.Generator().manual_seed(5)
    huge = torch.tensor([1e4, -1e4, 50.0, 1e30, -1e30, 100.0])
    picked = huge[torch.randint(0, len(huge), (2, 400, 4), generator=g)]
    deltas = deltas.clone()
    deltas.scatter_(1, top[..., None].expand(2, 400, 4), picked)
    batch.set_flat(deltas=deltas)
    boxes, _ = compare_with_torchvision(batch, pre_nms_top_n=500, post_nms_top_n=600)
    assert all(torch.isfinite(b).all() for b in boxes)


def test_non_finite_deltas_match_torchvision():
    """NaN and infinite deltas on many of the best anchors: their boxes are
    NaN (dropped by the size test, NaN >= min_size being false) or clipped
    to zero width (dropped too), exactly as torchvision; no proposal is NaN."""
    batch = Batch("medium", seed=6)
    objectness, deltas, _ = batch.flat()
    g = torch.Generator().manual_seed(6)
    top = objectness.topk(600, dim=1).indices
    values = torch.tensor([math.nan, math.inf, -math.inf])
    bad = values[torch.randint(0, 3, (2, 600, 4), generator=g)]
    bad[torch.rand(2, 600, 4, generator=g) < 0.6] = 0.1  # keep some rows partly finite
    deltas = deltas.clone()
    deltas.scatter_(1, top[..., None].expand(2, 600, 4), bad)
    batch.set_flat(deltas=deltas)
    boxes, scores = compare_with_torchvision(batch, pre_nms_top_n=500, post_nms_top_n=700)
    assert all(torch.isfinite(b).all() for b in boxes)
    assert all(len(s) > 0 for s in scores)


def test_non_finite_logits_match_torchvision():
    """NaN logits rank first in the top-k (torch.topk's order) but their NaN
    score fails the score test, so they are dropped; +inf logits score 1.0
    and are kept; -inf logits score 0.0, kept with score_thresh 0 (0 >= 0)
    and dropped with any positive one. torchvision's results."""
    batch = Batch("medium", seed=7)
    objectness, deltas, counts = batch.flat()
    objectness = objectness.clone()
    g = torch.Generator().manual_seed(7)
    draw = torch.rand(objectness.shape, generator=g)
    objectness[draw < 0.01] = math.nan
    objectness[(draw >= 0.01) & (draw < 0.015)] = math.inf
    objectness[:, sum(counts[:4]):] = -math.inf  # the whole stride-64 level
    batch.set_flat(objectness=objectness)
    for score_thresh in (0.0, 0.01):
        boxes, scores = compare_with_torchvision(batch, pre_nms_top_n=400, post_nms_top_n=2000,
                                                 score_thresh=score_thresh, msg=f"score_thresh={score_thresh}")
        for s in scores:
            assert not torch.isnan(s).any()
            assert s[0] == 1.0 and (s == 1.0).sum() > 5
            assert ((s == 0.0).sum() > 0) == (score_thresh == 0.0)


@pytest.mark.parametrize("settings", [dict(score_thresh=1.1), dict(min_size=1e6), dict(score_thresh=math.inf)],
                         ids=["score_thresh", "min_size", "score_inf"])
def test_everything_filtered_out(device, settings):
    """A score threshold above 1 or a minimum size larger than the image drop
    every candidate: empty [0, 4] / [0] results per image, all-zero padded
    tensors and zero counts; torchvision agrees."""
    batch = Batch("small", seed=8, device=device)
    objectness, deltas, counts = batch.flat()
    kwargs = dict(pre_nms_top_n=100, post_nms_top_n=50, nms_thresh=0.7, **settings)
    boxes, scores = maskrcnn_ops.generate_proposals(objectness, deltas, batch.anchors(), counts,
                                                    batch.image_sizes, **kwargs)
    assert [b.shape for b in boxes] == [(0, 4), (0, 4)] and [s.shape for s in scores] == [(0,), (0,)]
    padded_boxes, padded_scores, padded_counts = maskrcnn_ops.generate_proposals_padded(
        objectness, deltas, batch.anchors(), counts, batch.image_sizes, **kwargs)
    assert padded_boxes.shape == (2, 50, 4) and not padded_boxes.any() and not padded_scores.any()
    assert padded_counts.tolist() == [0, 0] and padded_counts.dtype == torch.int64
    if device == "cpu":
        cpu_batch = Batch("small", seed=8)
        expected = torchvision_proposals(cpu_batch, pre_nms_top_n=100, post_nms_top_n=50, **settings)
        assert [len(s) for s in expected[1]] == [0, 0]


# ---------------------------------------------------------------- reference --


@pytest.mark.parametrize(
    "settings",
    [
        dict(pre_nms_top_n=10, post_nms_top_n=12, nms_thresh=0.7),
        dict(pre_nms_top_n=3, post_nms_top_n=100, nms_thresh=0.5, score_thresh=0.3, min_size=4.0),
        dict(pre_nms_top_n=100, post_nms_top_n=5, nms_thresh=0.0),
        dict(pre_nms_top_n=25, post_nms_top_n=40, nms_thresh=0.6, weights=(2.0, 2.0, 1.0, 1.0), clip=0.5),
        dict(pre_nms_top_n=30, post_nms_top_n=30, nms_thresh=1.0, weights=(10.0, 10.0, 5.0, 5.0), min_size=0.0),
    ],
    ids=["basic", "thresholds", "nms0", "weights-clip", "box-head-weights"],
)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")])
def test_matches_reference(device, dtype, settings):
    """Small random problems (three levels of 40, 12 and 5 anchors, random
    anchor boxes, image sizes): the reference's proposals in the same order,
    for many seeds and settings, including non-default weights and clip."""
    for seed in range(6):
        case = small_case(seed, dtype=dtype, device=device)
        result = maskrcnn_ops.generate_proposals(**case, **settings)
        expected = reference.generate_proposals(**case, **settings)
        assert_same_as_reference(result, expected, dtype, f"seed={seed}")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")])
def test_half_types_match_reference(device, dtype):
    """float16 / bfloat16 inputs (decoded in float32, rounded once; scores the
    half sigmoid, so many ties): the reference on the same half inputs."""
    for seed in range(4):
        case = small_case(seed, n=3, dtype=dtype, device=device)
        settings = dict(pre_nms_top_n=20, post_nms_top_n=25, nms_thresh=0.6)
        assert_same_as_reference(maskrcnn_ops.generate_proposals(**case, **settings),
                                 reference.generate_proposals(**case, **settings), dtype, f"seed={seed}")


def test_per_image_anchors_and_image_size_forms(device):
    """Anchors may be [N, A, 4] (one set per image): the same set repeated
    gives the shared-anchor result, other sets the reference's; image_sizes
    may be a list of pairs or a [N, 2] tensor (int or float)."""
    case = small_case(11, device=device)
    settings = dict(pre_nms_top_n=15, post_nms_top_n=20, nms_thresh=0.6)
    shared = maskrcnn_ops.generate_proposals_padded(**case, **settings)
    repeated_anchors = case["anchors"].expand(2, -1, 4)
    repeated = maskrcnn_ops.generate_proposals_padded(**dict(case, anchors=repeated_anchors), **settings)
    for a, b in zip(shared, repeated):
        assert torch.equal(a, b)
    for sizes in (torch.tensor(case["image_sizes"], device=device), torch.tensor(case["image_sizes"]).double()):
        for a, b in zip(shared, maskrcnn_ops.generate_proposals_padded(**dict(case, image_sizes=sizes), **settings)):
            assert torch.equal(a, b)
    shifted = torch.stack([case["anchors"], case["anchors"] * 0.8 + 5.0])
    per_image = dict(case, anchors=shifted)
    assert_same_as_reference(maskrcnn_ops.generate_proposals(**per_image, **settings),
                             reference.generate_proposals(**per_image, **settings), torch.float32)


def test_padded_form_matches_list_form(device):
    """generate_proposals_padded: [N, post, 4] boxes and [N, post] scores
    holding the list form's proposals first and zeros after, int64 counts;
    the outputs do not require grad even for inputs that do (detached, as in
    torchvision)."""
    case = small_case(12, n=3, device=device)
    case["deltas"].requires_grad_(True)
    case["objectness"].requires_grad_(True)
    settings = dict(pre_nms_top_n=12, post_nms_top_n=20, nms_thresh=0.7, score_thresh=0.2)
    boxes, scores = maskrcnn_ops.generate_proposals(**case, **settings)
    padded_boxes, padded_scores, counts = maskrcnn_ops.generate_proposals_padded(**case, **settings)
    assert padded_boxes.shape == (3, 20, 4) and padded_scores.shape == (3, 20)
    assert counts.dtype == torch.int64 and counts.tolist() == [len(s) for s in scores]
    assert 0 < min(counts.tolist()) and max(counts.tolist()) < 20  # padding present in every row
    for image, count in enumerate(counts.tolist()):
        assert torch.equal(padded_boxes[image, :count], boxes[image])
        assert torch.equal(padded_scores[image, :count], scores[image])
        assert not padded_boxes[image, count:].any() and not padded_scores[image, count:].any()
    assert not any(t.requires_grad for t in (padded_boxes, padded_scores, *boxes, *scores))


def test_padding_is_zero_next_to_nan(device):
    """Padding stays exactly zero even when an image's best candidate has a
    NaN logit (it ranks first) or a NaN delta: the padded slots never take
    values from real candidates."""
    case = small_case(13, device=device)
    case["objectness"][0, 3] = math.nan
    best = case["objectness"][1].argmax()
    case["deltas"][1, best] = math.nan
    boxes, scores, counts = maskrcnn_ops.generate_proposals_padded(
        **case, pre_nms_top_n=10, post_nms_top_n=40, nms_thresh=0.7
    )
    for image, count in enumerate(counts.tolist()):
        assert count < 40
        assert torch.equal(boxes[image, count:], torch.zeros_like(boxes[image, count:]))
        assert torch.equal(scores[image, count:], torch.zeros_like(scores[image, count:]))
        assert not torch.isnan(boxes[image, :count]).any() and not torch.isnan(scores[image, :count]).any()


@pytest.mark.parametrize("what", ["pre_nms_top_n=0", "no anchors", "post_nms_top_n=0"])
def test_no_candidates(device, what):
    """No candidate at all (pre_nms_top_n = 0, no anchors) or no output slot
    gives empty results with zero counts, as torchvision, not an index error."""
    case = small_case(14, device=device)
    settings = dict(pre_nms_top_n=10, post_nms_top_n=20, nms_thresh=0.7)
    if what == "pre_nms_top_n=0":
        settings["pre_nms_top_n"] = 0
    elif what == "no anchors":
        n = case["objectness"].size(0)
        case.update(
            objectness=case["objectness"][:, :0], deltas=case["deltas"][:, :0], anchors=case["anchors"][:0],
            num_anchors_per_level=[0, 0, 0],
        )
        assert case["objectness"].shape == (n, 0)
    else:
        settings["post_nms_top_n"] = 0
    boxes, scores = maskrcnn_ops.generate_proposals(**case, **settings)
    assert [len(b) for b in boxes] == [0, 0] and [len(s) for s in scores] == [0, 0]
    padded_boxes, padded_scores, counts = maskrcnn_ops.generate_proposals_padded(**case, **settings)
    assert counts.tolist() == [0, 0]
    assert padded_boxes.shape == (2, settings["post_nms_top_n"], 4) and not padded_boxes.any()


def test_negative_post_nms_top_n(device):
    """A negative post_nms_top_n is a ValueError, as for batched_nms_padded's
    max_output."""
    case = small_case(15, device=device)
    with pytest.raises(ValueError, match="post_nms_top_n|max_output"):
        maskrcnn_ops.generate_proposals_padded(**case, pre_nms_top_n=10, post_nms_top_n=-1, nms_thresh=0.7)


# --------------------------------------------- NMS on (image, level) rows --


class NmsCall(NamedTuple):
    """One nms_keep_rows call seen by the spy, its tensors on CPU."""

    boxes: torch.Tensor  # [S, B, 4]
    scores: torch.Tensor  # [S, B]
    iou_threshold: float
    keep: torch.Tensor  # bool [S, B], what the op returned


def spy_on_nms_rows(monkeypatch, change_keep=None):
    """Routes generate_proposals_padded's nms_keep_rows calls through a spy;
    returns the list that receives an NmsCall per call. ``change_keep``, if
    given, maps the op's keep flags to those handed back to the caller."""
    calls = []

    def spy(boxes, scores, iou_threshold):
        keep = maskrcnn_ops.nms_keep_rows(boxes, scores, iou_threshold)
        calls.append(NmsCall(boxes.cpu(), scores.cpu(), iou_threshold, keep.cpu()))
        return keep if change_keep is None else change_keep(keep)

    monkeypatch.setattr(proposals_module, "nms_keep_rows", spy)
    return calls


def batch_case(batch):
    """A Batch as generate_proposals' arguments (small_case's form)."""
    objectness, deltas, counts = batch.flat()
    return dict(objectness=objectness, deltas=deltas, anchors=batch.anchors(), num_anchors_per_level=counts,
                image_sizes=batch.image_sizes)


def assert_image_level_rows(call, case, *, pre_nms_top_n, min_size=1e-3, score_thresh=0.0):
    """The call's rows are the candidates of each (image, level), image by
    image: row image * L + level holds that image's min(k, level size) best
    anchors of the level (k = min(pre_nms_top_n, largest level)) in
    decreasing logit order: scores their sigmoids (within two ulps), boxes
    their deltas decoded (reference decode) and clipped to that image, NaN
    where the box fails the size or score test; the slots past the level's
    size are NaN boxes."""
    objectness, deltas, anchors = (case[key].cpu() for key in ("objectness", "deltas", "anchors"))
    levels = case["num_anchors_per_level"]
    n = objectness.size(0)
    k = min(pre_nms_top_n, max(levels))
    assert call.boxes.shape == (n * len(levels), k, 4) and call.scores.shape == (n * len(levels), k)
    eps = torch.finfo(call.scores.dtype).eps
    for image, size in enumerate(case["image_sizes"]):
        offset = 0
        for level, count in enumerate(levels):
            row, where = image * len(levels) + level, f"image {image} level {level}"
            top = objectness[image, offset: offset + count].topk(min(k, count))
            index, used = top.indices + offset, min(k, count)
            scores = call.scores[row, :used]
            torch.testing.assert_close(scores, torch.sigmoid(top.values), atol=0, rtol=2 * eps,
                                       msg=lambda m: f"{where}: {m}")
            expected = maskrcnn_ops.clip_boxes_to_image(reference.decode_boxes(deltas[image, index], anchors[index]),
                                                        size)
            kept = (((expected[:, 2] - expected[:, 0]) >= min_size) & ((expected[:, 3] - expected[:, 1]) >= min_size)
                    & (scores >= score_thresh))
            boxes = call.boxes[row]
            assert torch.equal(torch.isnan(boxes[:used]).all(1), ~kept), where
            torch.testing.assert_close(boxes[:used][kept], expected[kept], **BOX_TOL, msg=lambda m: f"{where}: {m}")
            assert torch.isnan(boxes[used:]).all(), where
            offset += count


def roll_rows(keep):
    """Each row's keep flags given to the next row (the last to the first)."""
    return keep.roll(1, dims=0)


def test_nms_is_one_call_on_image_level_rows(device, monkeypatch):
    """Five images (3 levels of 40, 12 and 5 anchors, k = 15), image 2's
    deltas all NaN: one nms_keep_rows call on [15, 15, 4] rows (image,
    level) in order (assert_image_level_rows), at the NMS threshold; image 2
    gets no proposal, every other image loses candidates to the low NMS
    threshold, and the proposals are the reference's (per image, per
    level). Handing each row the next row's keep flags changes the
    proposals, so flags applied to the wrong row would show."""
    case = small_case(50, n=5, device=device)
    case["deltas"][2] = math.nan
    settings = dict(pre_nms_top_n=15, post_nms_top_n=45, nms_thresh=0.2, score_thresh=0.1)
    without_nms = maskrcnn_ops.generate_proposals_padded(**dict(settings, nms_thresh=1.0), **case)[2].tolist()
    calls = spy_on_nms_rows(monkeypatch)
    result = maskrcnn_ops.generate_proposals_padded(**case, **settings)
    assert len(calls) == 1 and calls[0].iou_threshold == 0.2
    assert_image_level_rows(calls[0], case, pre_nms_top_n=15, score_thresh=0.1)
    counts = result[2].tolist()
    assert counts[2] == 0 and all(0 < kept < before for kept, before in zip(counts, without_nms) if before)
    assert sum(before > 0 for before in without_nms) == 4
    assert_same_as_reference(maskrcnn_ops.generate_proposals(**case, **settings),
                             reference.generate_proposals(**case, **settings), torch.float32)

    spy_on_nms_rows(monkeypatch, change_keep=roll_rows)
    wrong_rows = maskrcnn_ops.generate_proposals_padded(**case, **settings)
    assert not all(torch.equal(wrong, right) for wrong, right in zip(wrong_rows, result))


def test_nms_rows_match_torchvision(monkeypatch):
    """A batch of five images with 5 FPN levels (k = 100), image 2's deltas
    all NaN: one nms_keep_rows call on [25, 100, 4] rows (image, level) in
    order, in which NMS suppresses finite boxes of every other image; and
    torchvision's proposals (none for image 2)."""
    batch = Batch("five", seed=51)
    objectness, deltas, _ = batch.flat()
    deltas = deltas.clone()
    deltas[2] = math.nan
    batch.set_flat(deltas=deltas)
    calls = spy_on_nms_rows(monkeypatch)
    _, scores = compare_with_torchvision(batch, pre_nms_top_n=100, post_nms_top_n=150)
    assert [len(s) > 0 for s in scores] == [True, True, False, True, True]
    assert len(calls) == 1
    call = calls[0]
    assert_image_level_rows(call, batch_case(batch), pre_nms_top_n=100)
    suppressed = (~call.keep & torch.isfinite(call.boxes).all(-1)).view(5, -1).sum(1)
    assert [count > 0 for count in suppressed.tolist()] == [True, True, False, True, True]


def test_nms_rows_beyond_the_bound_equal_image_by_image(device, monkeypatch):
    """Five images of 3 levels of k = 3000 candidates: one nms_keep_rows call
    of [15, 3000, 4] rows, 45,000 boxes, more than NMS_BOXES_PER_CALL (so
    the CUDA op launches them in groups of rows), gives each image the
    proposals it gets alone (9,000 boxes, within the bound): rows of
    different images never interact. Scores within two ulps (sigmoid may
    round an element of a longer tensor otherwise), boxes equal."""
    case = small_case(52, n=5, levels=(3000, 3000, 3000), device=device)
    settings = dict(pre_nms_top_n=3000, post_nms_top_n=1000, nms_thresh=0.7)
    assert 3 * 3000 <= NMS_BOXES_PER_CALL < 5 * 3 * 3000
    calls = spy_on_nms_rows(monkeypatch)
    together = maskrcnn_ops.generate_proposals(**case, **settings)
    assert [tuple(call.boxes.shape) for call in calls] == [(15, 3000, 4)]
    assert min(len(s) for s in together[1]) > 0
    for image in range(5):
        alone = maskrcnn_ops.generate_proposals(
            **dict(case, objectness=case["objectness"][image: image + 1], deltas=case["deltas"][image: image + 1],
                   image_sizes=case["image_sizes"][image: image + 1]), **settings)
        assert_same_proposals(([together[0][image]], [together[1][image]]), alone, box_tol=dict(atol=0, rtol=0),
                              msg=f"image {image}")


def test_empty_batch(device):
    """A batch of no images (image sizes [0, 2]) gives [0, post, 4] /
    [0, post] / [0] outputs and empty lists, not an error."""
    case = small_case(53, device=device)
    empty = dict(case, objectness=case["objectness"][:0], deltas=case["deltas"][:0],
                 image_sizes=torch.zeros(0, 2, device=device))
    settings = dict(pre_nms_top_n=10, post_nms_top_n=20, nms_thresh=0.7)
    boxes, scores, counts = maskrcnn_ops.generate_proposals_padded(**empty, **settings)
    assert boxes.shape == (0, 20, 4) and scores.shape == (0, 20) and counts.shape == (0,)
    assert maskrcnn_ops.generate_proposals(**empty, **settings) == ([], [])


# ---------------------------------------------------------------- bad input --


def test_wrong_shapes():
    """Inconsistent inputs are ValueErrors naming the expected shapes."""
    case = small_case(16)
    settings = dict(pre_nms_top_n=10, post_nms_top_n=10, nms_thresh=0.7)

    def call(**changes):
        return maskrcnn_ops.generate_proposals(**dict(case, **changes), **settings)

    with pytest.raises(ValueError, match=r"deltas must have shape \(2, 57, 4\), got \(2, 56, 4\)"):
        call(deltas=case["deltas"][:, :56])
    with pytest.raises(ValueError, match=r"deltas must have shape \(2, 57, 4\), got \(2, 57, 5\)"):
        call(deltas=torch.zeros(2, 57, 5))
    with pytest.raises(ValueError, match=r"anchors must have shape \(57, 4\) or \(2, 57, 4\), got \(56, 4\)"):
        call(anchors=case["anchors"][:56])
    with pytest.raises(ValueError, match=r"anchors must have shape \(57, 4\) or \(2, 57, 4\), got \(3, 57, 4\)"):
        call(anchors=case["anchors"].expand(3, -1, 4))
    for levels in ([40, 12, 4], [40, 12, 5, 1], [58, -1]):
        with pytest.raises(ValueError, match=r"num_anchors_per_level .* does not add up to 57 anchors"):
            call(num_anchors_per_level=levels)
    for sizes, shape in [([(60, 80)], r"\(1, 2\)"), ([(60, 80)] * 3, r"\(3, 2\)"), ([(60, 80, 3)] * 2, r"\(2, 3\)"),
                         (torch.tensor([60, 80]), r"\(2,\)")]:
        with pytest.raises(ValueError, match=r"image_sizes must give \(height, width\) for each of the 2 images, "
                                             r"got shape " + shape):
            call(image_sizes=sizes)


def test_bad_weights_and_nms_threshold():
    """Bad box-coder weights and a NaN NMS threshold are rejected."""
    case = small_case(17)
    settings = dict(pre_nms_top_n=10, post_nms_top_n=10, nms_thresh=0.7)
    with pytest.raises(ValueError, match="weights must be 4 numbers"):
        maskrcnn_ops.generate_proposals(**case, **settings, weights=(1.0, 1.0))
    with pytest.raises(RuntimeError, match="rpn_decode_filter: weights must be finite and non-zero"):
        maskrcnn_ops.generate_proposals(**case, **settings, weights=(1.0, 0.0, 1.0, 1.0))
    with pytest.raises(RuntimeError, match="iou_threshold is NaN"):
        maskrcnn_ops.generate_proposals(**case, **dict(settings, nms_thresh=math.nan))


# ------------------------------------------------------------ batched top-k --


def _level_of(num_anchors_per_level, k):
    """Level index of each of the L * k candidate slots."""
    return torch.arange(len(num_anchors_per_level)).repeat_interleave(k)


def assert_same_top_candidates(objectness, num_anchors_per_level, pre_nms_top_n, exact):
    """batched=True equals batched=False: same valid mask, same logits at every
    valid slot (NaN matching NaN), and the same anchor at every slot whose
    logit is unique within its level (equal logits, -0.0 and +0.0 included,
    may come in either order from torch.topk); all of them if `exact`."""
    batched, batched_valid = _top_candidates(objectness, num_anchors_per_level, pre_nms_top_n, batched=True)
    per_level, valid = _top_candidates(objectness, num_anchors_per_level, pre_nms_top_n, batched=False)
    assert batched.shape == per_level.shape and batched.dtype == per_level.dtype == torch.int64
    assert torch.equal(batched_valid, valid)
    assert (per_level[valid] < objectness.size(1)).all()
    k = per_level.size(1) // len(num_anchors_per_level)
    assert k == min(pre_nms_top_n, max(max(num_anchors_per_level), 1))
    assert valid.sum(1).tolist() == [sum(min(pre_nms_top_n, a) for a in num_anchors_per_level)] * len(objectness)
    got = objectness.gather(1, batched.masked_fill(~valid, 0))[valid]
    want = objectness.gather(1, per_level.masked_fill(~valid, 0))[valid]
    torch.testing.assert_close(got, want, atol=0, rtol=0, equal_nan=True)
    if exact:
        assert torch.equal(batched[valid], per_level[valid])
        return
    level = _level_of(num_anchors_per_level, k).expand_as(valid)
    offsets = torch.tensor([0] + list(num_anchors_per_level)).cumsum(0)
    for image in range(objectness.size(0)):
        for slot in torch.nonzero(valid[image]).flatten().tolist():
            lvl = int(level[image, slot])
            values = objectness[image, offsets[lvl]: offsets[lvl + 1]]
            value = objectness[image, per_level[image, slot]]
            same = torch.isnan(values) if torch.isnan(value) else values == value
            if int(same.sum()) == 1:
                assert batched[image, slot] == per_level[image, slot], (image, slot)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64"),
                                   pytest.param(torch.float16, id="f16")])
def test_batched_top_k_equals_per_level(dtype):
    """The private batched top-k (one topk over levels padded with keys below
    every real logit, the CUDA path) equals the per-level CPU top-k, for
    distinct logits (exactly), and for logits with -inf, +inf, NaN, signed
    zeros and repeated values, with levels smaller than pre_nms_top_n, of a
    single anchor and empty."""
    g = torch.Generator().manual_seed(18)
    layouts = [[40, 12, 5], [7, 300, 1, 64], [3, 0, 9], [1], [500]]
    for levels in layouts:
        total = sum(levels)
        distinct = (torch.randperm(2 * total, generator=g)[: 2 * total].view(2, total).double() - total) / 8
        for k in (1, 4, 12, 64, 1000):
            assert_same_top_candidates(distinct.to(dtype), levels, k, exact=True)
        messy = distinct.clone()
        draw = torch.rand(messy.shape, generator=g)
        messy[draw < 0.1] = -math.inf
        messy[(draw >= 0.1) & (draw < 0.15)] = math.nan
        messy[(draw >= 0.15) & (draw < 0.2)] = math.inf
        messy[(draw >= 0.2) & (draw < 0.25)] = 0.0
        messy[(draw >= 0.25) & (draw < 0.3)] = -0.0
        messy[(draw >= 0.3) & (draw < 0.4)] = 1.5
        for k in (1, 4, 12, 64, 1000):
            assert_same_top_candidates(messy.to(dtype), levels, k, exact=False)


def test_batched_top_k_all_non_finite_level():
    """A level whose logits are all -inf (or all NaN) still yields its
    min(k, size) valid candidates, below (above) the other levels' ones."""
    objectness = torch.tensor([[-math.inf] * 6 + [0.5, -1.0, 2.0] + [math.nan] * 4])
    levels = [6, 3, 4]
    for k in (2, 5, 10):
        assert_same_top_candidates(objectness, levels, k, exact=False)
    candidates, valid = _top_candidates(objectness, levels, 5, batched=True)
    assert valid.sum() == 5 + 3 + 4
    assert sorted(candidates[valid][5:8].tolist()) == [6, 7, 8]


# --------------------------------------------------------- rpn_decode_filter --


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64"),
                                   pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")])
def test_rpn_decode_filter_matches_reference(device, dtype):
    """The fused op: decoded boxes (reference decode, rounded to the deltas'
    dtype) clipped to each image, and keep = both sides >= min_size and
    score >= score_thresh; NaN deltas give NaN boxes that are not kept."""
    case = small_case(19, dtype=dtype, device=device)
    deltas, anchors = case["deltas"], case["anchors"].expand(2, -1, 4).contiguous()
    deltas[0, :3] = torch.tensor([[math.nan, 0, 0, 0], [0, 0, math.inf, 0], [0, 0, 0, 100.0]], dtype=dtype)
    scores = torch.sigmoid(case["objectness"])
    sizes = torch.tensor(case["image_sizes"], dtype=torch.float32, device=device)
    weights, clip, min_size, score_thresh = [1.0, 2.0, 1.0, 0.5], 2.0, 6.0, 0.3
    boxes, keep = ops.rpn_decode_filter(deltas, anchors, scores, sizes, weights, clip, min_size, score_thresh)
    assert boxes.shape == deltas.shape and boxes.dtype == dtype and keep.shape == scores.shape
    assert keep.dtype == torch.bool
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = reference.decode_boxes(deltas.reshape(-1, 4), anchors.reshape(-1, 4), weights, clip).view_as(deltas)
    for image, size in enumerate(case["image_sizes"]):
        expected[image] = maskrcnn_ops.clip_boxes_to_image(expected[image], size)
    tol = {torch.float64: dict(atol=1e-9, rtol=1e-12), torch.float32: BOX_TOL,
           torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}[dtype]
    torch.testing.assert_close(boxes, expected, equal_nan=True, **tol)
    b = boxes.to(acc)
    expected_keep = ((b[..., 2] - b[..., 0]) >= min_size) & ((b[..., 3] - b[..., 1]) >= min_size) & (
        scores.to(acc) >= torch.tensor(score_thresh, dtype=acc))
    assert torch.equal(keep, expected_keep)
    assert not keep[0, 0] and keep.any() and not keep.all()


def test_rpn_decode_filter_is_not_differentiable(device):
    """A backward through rpn_decode_filter raises (generate_proposals
    detaches its inputs, so it never reaches it)."""
    case = small_case(20, device=device)
    deltas = case["deltas"].clone().requires_grad_(True)
    boxes, _ = ops.rpn_decode_filter(deltas, case["anchors"].expand(2, -1, 4).contiguous(),
                                     torch.sigmoid(case["objectness"]),
                                     torch.tensor(case["image_sizes"], dtype=torch.float32, device=device),
                                     [1.0] * 4, DEFAULT_CLIP, 1e-3, 0.0)
    with pytest.raises(RuntimeError, match="rpn_decode_filter is not differentiable"):
        boxes.sum().backward()


def test_rpn_decode_filter_argument_checks(device):
    """Shapes, dtypes of the raw op's inputs are validated."""
    d = torch.zeros(2, 5, 4, device=device)
    s = torch.zeros(2, 5, device=device)
    hw = torch.ones(2, 2, device=device)
    w = [1.0] * 4
    with pytest.raises(RuntimeError, match=r"expected deltas of shape \[N, M, 4\]"):
        ops.rpn_decode_filter(d[..., :3], d[..., :3], s, hw, w, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"expected floating-point anchors of shape \[2, 5, 4\]"):
        ops.rpn_decode_filter(d, d[:, :4], s, hw, w, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"expected floating-point anchors"):
        ops.rpn_decode_filter(d, d.long(), s, hw, w, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"expected floating-point scores of shape \[2, 5\]"):
        ops.rpn_decode_filter(d, d, s[:, :4], hw, w, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match=r"expected image_sizes of shape \[2, 2\] \(height, width\)"):
        ops.rpn_decode_filter(d, d, s, hw[:1], w, 1.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="expected deltas of dtype float32, float64, float16 or bfloat16"):
        ops.rpn_decode_filter(d.int(), d, s, hw, w, 1.0, 0.0, 0.0)


# ------------------------------------------------------------------ opcheck --


def _opcheck_samples(device):
    case = small_case(21, device=device)
    anchors = case["anchors"].expand(2, -1, 4).contiguous()
    scores = torch.sigmoid(case["objectness"])
    sizes = torch.tensor(case["image_sizes"], dtype=torch.float32, device=device)
    args = (case["deltas"], anchors, scores, sizes, [1.0, 1.0, 2.0, 2.0], DEFAULT_CLIP, 1e-3, 0.2)
    return {
        "f32": args,
        "f64": (args[0].double(), args[1].double(), args[2].double(), sizes.long()) + args[4:],
        "f16": (args[0].half(), args[1], args[2].half()) + args[3:],
        "empty": (args[0][:, :0], args[1][:, :0], args[2][:, :0]) + args[3:],
    }


@pytest.mark.parametrize("sample", ["f32", "f64", "f16", "empty"])
def test_opcheck(device, sample):
    """torch.library.opcheck of rpn_decode_filter: schema, autograd
    registration, fake kernel (boxes in the deltas' dtype, bool keep) and
    AOT-dispatch consistency."""
    result = torch.library.opcheck(ops.rpn_decode_filter.default, _opcheck_samples(device)[sample])
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_with_grad_inputs(device):
    """With deltas that require grad the autograd registration is checked;
    the AOT-dispatch sub-test is left out (it runs a backward, which raises
    by design: test_rpn_decode_filter_is_not_differentiable)."""
    args = list(_opcheck_samples(device)["f32"])
    args[0] = args[0].clone().requires_grad_(True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    result = torch.library.opcheck(ops.rpn_decode_filter.default, tuple(args), test_utils=utils)
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------ torch.compile --


def test_compile_generate_proposals_padded(device, fresh_dynamo):
    """torch.compile(fullgraph=True, backend="aot_eager") traces the whole
    padded form (top-k, gathers, the fused op, nms_keep_rows keep flags,
    ranking) without a graph break, and equals eager on several inputs of
    the same shapes (the per-level layout cache warm or cold)."""
    def fn(objectness, deltas, anchors, image_sizes):
        return maskrcnn_ops.generate_proposals_padded(
            objectness, deltas, anchors, [40, 12, 5], image_sizes, pre_nms_top_n=15, post_nms_top_n=20,
            nms_thresh=0.7, score_thresh=0.05)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for seed in range(3):
        case = small_case(30 + seed, device=device)
        sizes = torch.tensor(case["image_sizes"], device=device)
        args = (case["objectness"], case["deltas"], case["anchors"], sizes)
        for actual, expected in zip(compiled(*args), fn(*args)):
            assert torch.equal(actual, expected)


# ------------------------------------------------------------------- fuzz --


@st.composite
def proposal_cases(draw):
    """Small random problems built for degenerate cases: 1-3 levels of 0-12
    anchors (empty levels too) on an integer grid (zero-size and duplicate
    anchors), logits mixing continuous values with ties whose sigmoid is
    exact on every code path (0 -> 0.5, 20 and +inf -> 1.0, -inf -> 0.0)
    and NaN, deltas with NaN / huge values, and random settings."""
    n = draw(st.integers(1, 3))
    levels = [draw(st.integers(0, 12)) for _ in range(draw(st.integers(1, 3)))]
    if sum(levels) == 0:
        levels[0] = 1  # no anchors at all: see test_no_candidates
    total = sum(levels)
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(-5, 40, (total, 2), generator=g).float()
    anchors = torch.cat([xy, xy + torch.randint(0, 20, (total, 2), generator=g).float()], 1)
    logits = torch.randn(n, total, generator=g) * 3
    special = torch.tensor([0.0, 20.0, math.inf, -math.inf, math.nan])
    pick = torch.randint(0, 12, (n, total), generator=g)
    logits = torch.where(pick < 5, special[pick.clamp(max=4)], logits)
    deltas = torch.randn(n, total, 4, generator=g) * 0.7
    odd = torch.rand(n, total, 4, generator=g)
    deltas[odd < 0.03] = math.nan
    deltas[(odd >= 0.03) & (odd < 0.06)] = 50.0
    sizes = [(draw(st.integers(1, 50)), draw(st.integers(1, 50))) for _ in range(n)]
    return dict(
        objectness=logits, deltas=deltas, anchors=anchors, num_anchors_per_level=levels, image_sizes=sizes,
        pre_nms_top_n=draw(st.integers(1, 15)),
        post_nms_top_n=draw(st.integers(0, 30)),
        nms_thresh=draw(st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0])),
        score_thresh=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0])),
        min_size=draw(st.sampled_from([0.0, 1e-3, 1e-3, 2.0])),
    )


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(case=proposal_cases())
def test_fuzz_against_reference(case):
    """Random small degenerate problems (empty levels included): the
    reference's proposals in the same order; the padded form holds them."""
    result = maskrcnn_ops.generate_proposals(**case)
    expected = reference.generate_proposals(**case)
    assert_same_as_reference(result, expected, torch.float32)
    boxes, scores, counts = maskrcnn_ops.generate_proposals_padded(**case)
    assert counts.tolist() == [len(s) for s in result[1]]
    for image, count in enumerate(counts.tolist()):
        assert torch.equal(boxes[image, :count], result[0][image])
        assert torch.equal(scores[image, :count], result[1][image])


# ------------------------------------------------------------------- CUDA --


@cuda_only
def test_cuda_matches_cpu():
    """generate_proposals_padded on CUDA (batched top-k, CUDA kernels) gives
    the CPU result on the COCO-sized batch in both modes: equal counts,
    scores and boxes equal up to exp()/sigmoid rounding; and
    rpn_decode_filter equals the CPU op."""
    for mode, (pre, post, _) in MODES.items():
        batch = Batch("coco", seed=40)
        objectness, deltas, counts = batch.flat()
        anchors = batch.anchors()
        settings = dict(pre_nms_top_n=pre, post_nms_top_n=post, nms_thresh=0.7)
        cpu = maskrcnn_ops.generate_proposals_padded(objectness, deltas, anchors, counts, batch.image_sizes,
                                                     **settings)
        cuda = maskrcnn_ops.generate_proposals_padded(objectness.cuda(), deltas.cuda(), anchors.cuda(), counts,
                                                      batch.image_sizes, **settings)
        assert torch.equal(cuda[2].cpu(), cpu[2]), mode
        counts_list = cpu[2].tolist()
        assert_same_up_to_rounding(
            ([b[:c] for b, c in zip(cuda[0], counts_list)], [s[:c] for s, c in zip(cuda[1], counts_list)]),
            ([b[:c] for b, c in zip(cpu[0], counts_list)], [s[:c] for s, c in zip(cpu[1], counts_list)]), mode)
        for image, count in enumerate(counts_list):
            assert not cuda[0][image, count:].any() and not cuda[1][image, count:].any()
    args = _opcheck_samples("cpu")["f32"]
    cpu = ops.rpn_decode_filter(*args)
    cuda = ops.rpn_decode_filter(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], **BOX_TOL)
    assert torch.equal(cuda[1].cpu(), cpu[1])


@cuda_only
def test_cuda_matches_torchvision():
    """The CUDA path against torchvision (run on CPU), eval settings, up to
    the rounding of CUDA's exp() and sigmoid."""
    batch = Batch("coco", seed=41)
    objectness, deltas, counts = batch.flat()
    result = maskrcnn_ops.generate_proposals(objectness.cuda(), deltas.cuda(), batch.anchors().cuda(), counts,
                                             batch.image_sizes, pre_nms_top_n=1000, post_nms_top_n=1000,
                                             nms_thresh=0.7)
    assert all(b.is_cuda and s.is_cuda for b, s in zip(*result))
    assert_same_up_to_rounding(result, torchvision_proposals(batch, pre_nms_top_n=1000, post_nms_top_n=1000))


@cuda_only
def test_cuda_batched_top_k_equals_per_level():
    """On CUDA the batched top-k picks the per-level CPU top-k's candidates."""
    g = torch.Generator().manual_seed(42)
    levels = [700, 90, 3, 40]
    objectness = torch.randperm(2 * sum(levels), generator=g).view(2, -1).float() / 100 - 8  # distinct
    batched, valid = _top_candidates(objectness.cuda(), levels, 64, batched=True)
    per_level, cpu_valid = _top_candidates(objectness, levels, 64, batched=False)
    assert torch.equal(valid.cpu(), cpu_valid)
    assert torch.equal(batched.cpu()[cpu_valid], per_level[cpu_valid])


@cuda_only
def test_cuda_padded_form_does_not_sync():
    """Under torch.cuda.set_sync_debug_mode("error") generate_proposals_padded
    runs without a host synchronization (image sizes given as a CUDA tensor;
    the per-level layout already cached), and gives the eager result."""
    batch = Batch("medium", seed=43, device="cuda")
    objectness, deltas, counts = batch.flat()
    anchors = batch.anchors()
    sizes = torch.tensor(batch.image_sizes, device="cuda")
    settings = dict(pre_nms_top_n=300, post_nms_top_n=200, nms_thresh=0.7)
    expected = maskrcnn_ops.generate_proposals_padded(objectness, deltas, anchors, counts, sizes, **settings)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        actual = maskrcnn_ops.generate_proposals_padded(objectness, deltas, anchors, counts, sizes, **settings)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_proposals_keep_no_module_state():
    """generate_proposals_padded caches nothing at module level (a cache keyed
    by the level layout would grow with every new image shape): the module's
    globals are the same objects, of the same sizes, after calls with new
    layouts, on both top-k paths."""

    def snapshot():
        return {name: (id(value), len(value) if isinstance(value, (dict, list, set)) else None)
                for name, value in vars(proposals_module).items()}

    before = snapshot()
    for name in ("small", "tiny"):
        batch = Batch(name, seed=44)
        objectness, deltas, counts = batch.flat()
        for batched in (True, False):
            _top_candidates(objectness, counts, 50, batched=batched)
        maskrcnn_ops.generate_proposals_padded(objectness, deltas, batch.anchors(), counts, batch.image_sizes,
                                               pre_nms_top_n=50, post_nms_top_n=20, nms_thresh=0.7)
    assert snapshot() == before


class SyncErrors:
    """Within the block a host synchronization raises (CUDA sync debug mode
    "error"); the previous mode is restored after it."""

    def __enter__(self):
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.previous)


@cuda_only
def test_cuda_padded_form_does_not_sync_on_a_new_layout():
    """The first call with a level layout never seen before is sync-free too
    (the padded layout is built on the device from the level sizes, not
    copied from the host)."""
    warm = Batch("medium", seed=45, device="cuda")
    objectness, deltas, counts = warm.flat()
    settings = dict(pre_nms_top_n=300, post_nms_top_n=200, nms_thresh=0.7)
    maskrcnn_ops.generate_proposals_padded(objectness, deltas, warm.anchors(), counts,
                                           torch.tensor(warm.image_sizes, device="cuda"), **settings)
    batch = Batch("five", seed=46, device="cuda")
    objectness, deltas, counts = batch.flat()
    anchors, sizes = batch.anchors(), torch.tensor(batch.image_sizes, device="cuda")
    torch.cuda.synchronize()
    with SyncErrors():
        actual = maskrcnn_ops.generate_proposals_padded(objectness, deltas, anchors, counts, sizes, **settings)
    expected = maskrcnn_ops.generate_proposals_padded(objectness.cpu(), deltas.cpu(), anchors.cpu(), counts,
                                                      batch.image_sizes, **settings)
    assert torch.equal(actual[2].cpu(), expected[2])
    counts_list = expected[2].tolist()
    assert_same_up_to_rounding(
        ([b[:c] for b, c in zip(actual[0], counts_list)], [s[:c] for s, c in zip(actual[1], counts_list)]),
        ([b[:c] for b, c in zip(expected[0], counts_list)], [s[:c] for s, c in zip(expected[1], counts_list)]),
        "new layout")
