"""Tests of maskrcnn.training: matching, sampling, targets and losses.

Oracle: torchvision's own training code (``ops.box_iou``, ``_utils.Matcher``,
``_utils.BalancedPositiveNegativeSampler``, ``RegionProposalNetwork.
assign_targets_to_anchors`` / ``compute_loss``, ``RoIHeads.
select_training_samples``, ``fastrcnn_loss``, ``project_masks_on_boxes``,
``maskrcnn_loss``), run on the same random inputs with the global RNG seeded
alike, and finally the loss dictionary of a whole ``maskrcnn_resnet50_fpn``
in training mode. Inputs include images without ground truth, ties in the IoU
matrix and zero-width ground-truth boxes.

Our box encoding is the maskrcnn_ops kernel, whose log() may differ from
ATen's by an ulp, hence assert_close's default float32 tolerances on
regression targets and losses; labels, matches and samples are compared
exactly.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch.testing import assert_close
from torchvision.models.detection import _utils as tv_utils
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

import maskrcnn_ops
from maskrcnn.training import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    ROI_BOX_WEIGHTS,
    RPN_BOX_WEIGHTS,
    assign_anchor_targets,
    box_head_loss,
    box_iou,
    mask_loss,
    mask_targets,
    match_boxes,
    rpn_loss,
    sample_anchor_labels,
    sample_balanced,
    sample_proposals,
)

RPN_CODER = maskrcnn_ops.BoxCoder(RPN_BOX_WEIGHTS)
ROI_CODER = maskrcnn_ops.BoxCoder(ROI_BOX_WEIGHTS)


def random_boxes(count: int, image_size: int, generator: torch.Generator, *, integer: bool = False) -> torch.Tensor:
    """[count, 4] valid boxes (x2 > x1, y2 > y1) inside a square image; integer
    corners make exact IoU ties likely."""
    corner = torch.rand(count, 2, generator=generator) * image_size * 0.8
    sides = 4 + torch.rand(count, 2, generator=generator) * image_size * 0.4
    boxes = torch.cat([corner, corner + sides], dim=1)
    return boxes.round() if integer else boxes


def zero_width(boxes: torch.Tensor) -> torch.Tensor:
    """The same boxes with x2 = x1 (degenerate)."""
    boxes = boxes.clone()
    boxes[:, 2] = boxes[:, 0]
    return boxes


def tv_rpn(batch_size_per_image: int = 256, positive_fraction: float = 0.5) -> RegionProposalNetwork:
    """A torchvision RPN with the paper's training settings (only its target
    and loss methods are used, so no anchor generator or head)."""
    return RegionProposalNetwork(
        anchor_generator=None,
        head=None,
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=batch_size_per_image,
        positive_fraction=positive_fraction,
        pre_nms_top_n={"training": 2000, "testing": 1000},
        post_nms_top_n={"training": 2000, "testing": 1000},
        nms_thresh=0.7,
    )


def tv_roi_heads_for_training() -> tv_roi_heads.RoIHeads:
    """torchvision's RoIHeads with Mask R-CNN's training settings (its pooling
    and head modules are not needed for select_training_samples)."""
    return tv_roi_heads.RoIHeads(
        box_roi_pool=None,
        box_head=None,
        box_predictor=None,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=512,
        positive_fraction=0.25,
        bbox_reg_weights=None,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
    )


# ---------------------------------------------------------------- box_iou


@pytest.mark.parametrize("integer", [False, True], ids=["float", "integer"])
def test_box_iou_equals_torchvision_bitwise(integer, device):
    g = torch.Generator().manual_seed(1)
    boxes1 = random_boxes(40, 300, g, integer=integer)
    boxes2 = random_boxes(300, 300, g, integer=integer).to(device)
    boxes1[:5] = zero_width(boxes1[:5])
    boxes1 = boxes1.to(device)
    assert_close(box_iou(boxes1, boxes2), torchvision.ops.box_iou(boxes1, boxes2), rtol=0, atol=0)


def test_box_iou_values_and_degenerate_boxes():
    boxes1 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 5.0, 15.0]])
    boxes2 = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    expected = torch.tensor([[1.0, 50.0 / 150.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(box_iou(boxes1, boxes2), expected)
    assert box_iou(boxes1, boxes2[:0]).shape == (2, 0)
    assert box_iou(boxes1[:0], boxes2).shape == (0, 3)


def test_box_iou_half_precision_computes_in_float32():
    boxes = torch.tensor([[0.0, 0.0, 400.0, 400.0], [100.0, 100.0, 500.0, 500.0]])
    iou = box_iou(boxes.half(), boxes.half())
    assert iou.dtype == torch.float32
    assert_close(iou, box_iou(boxes, boxes))


def test_box_iou_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"boxes2 must have shape \[N, 4\]"):
        box_iou(torch.zeros(2, 4), torch.zeros(3, 5))


# ---------------------------------------------------------------- match_boxes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "high, low, low_quality",
    [(0.7, 0.3, True), (0.7, 0.3, False), (0.5, 0.5, False), (0.5, 0.5, True)],
    ids=["rpn", "rpn-strict", "roi", "roi-lowq"],
)
def test_match_boxes_equals_torchvision_matcher(seed, high, low, low_quality):
    g = torch.Generator().manual_seed(seed)
    num_gt = 1 + seed
    # Values on a coarse grid: many exact ties, both per prediction and per
    # ground truth (the low-quality rule must keep all tied predictions).
    iou = (torch.rand(num_gt, 200, generator=g) * 10).floor() / 10
    expected = tv_utils.Matcher(high, low, allow_low_quality_matches=low_quality)(iou.clone())
    ours = match_boxes(iou, high_threshold=high, low_threshold=low, allow_low_quality_matches=low_quality)
    assert_close(ours, expected, rtol=0, atol=0)


def test_match_boxes_low_quality_ties_and_codes():
    iou = torch.tensor(
        [
            [0.10, 0.20, 0.20, 0.80, 0.00],  # gt 0: matched by pred 3; best is 0.8
            [0.25, 0.00, 0.10, 0.75, 0.50],  # gt 1: best 0.75 is taken by gt 0's 0.8
        ]
    )
    plain = match_boxes(iou, high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=False)
    assert plain.tolist() == [BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD, 0, BETWEEN_THRESHOLDS]
    tied = torch.tensor([[0.2, 0.2, 0.1], [0.0, 0.0, 0.6]])
    low_quality = match_boxes(tied, high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)
    assert low_quality.tolist() == [0, 0, 1]  # both tied best predictions of gt 0, and gt 1's best


def test_match_boxes_empty_inputs():
    none_gt = match_boxes(torch.zeros(0, 5), high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)
    assert none_gt.tolist() == [BELOW_LOW_THRESHOLD] * 5
    none_pred = match_boxes(torch.zeros(3, 0), high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=True)
    assert none_pred.shape == (0,) and none_pred.dtype == torch.int64


def test_match_boxes_rejects_bad_thresholds_and_shapes():
    with pytest.raises(ValueError, match="low_threshold"):
        match_boxes(torch.zeros(1, 1), high_threshold=0.3, low_threshold=0.7, allow_low_quality_matches=False)
    with pytest.raises(ValueError, match=r"\[K ground truths, N predictions\]"):
        match_boxes(torch.zeros(3), high_threshold=0.7, low_threshold=0.3, allow_low_quality_matches=False)


# ---------------------------------------------------------------- sampling


def random_labels(sizes, generator, *, classes: int = 1):
    """Per image, labels in {-1, 0, 1..classes} with few positives."""
    labels = []
    for size in sizes:
        kind = torch.rand(size, generator=generator)
        image_labels = torch.zeros(size, dtype=torch.int64)
        image_labels[kind < 0.2] = -1
        positive = kind > 0.9
        image_labels[positive] = torch.randint(1, classes + 1, (int(positive.sum()),), generator=generator)
        labels.append(image_labels)
    return labels


@pytest.mark.parametrize("batch, fraction", [(256, 0.5), (512, 0.25), (8, 0.5)])
def test_sampler_with_global_rng_equals_torchvision(batch, fraction):
    g = torch.Generator().manual_seed(3)
    labels = random_labels([1000, 50, 0, 3000], g, classes=5)
    torch.manual_seed(123)
    expected_pos, expected_neg = tv_utils.BalancedPositiveNegativeSampler(batch, fraction)(labels)
    torch.manual_seed(123)
    ours_pos, ours_neg = sample_balanced(labels, batch_size_per_image=batch, positive_fraction=fraction)
    for ours, expected in zip(ours_pos + ours_neg, expected_pos + expected_neg):
        assert_close(ours, expected.bool(), rtol=0, atol=0)
    # The draws leave the global RNG in the same state too.
    torch.manual_seed(123)
    tv_utils.BalancedPositiveNegativeSampler(batch, fraction)(labels)
    after_torchvision = torch.rand(4)
    torch.manual_seed(123)
    sample_balanced(labels, batch_size_per_image=batch, positive_fraction=fraction)
    assert_close(torch.rand(4), after_torchvision, rtol=0, atol=0)


def test_sampler_counts_and_generator():
    g = torch.Generator().manual_seed(4)
    labels = random_labels([2000, 30], g, classes=3)
    positive, negative = sample_balanced(
        labels, batch_size_per_image=256, positive_fraction=0.25, generator=torch.Generator().manual_seed(9)
    )
    for image_labels, pos, neg in zip(labels, positive, negative):
        num_pos_available = int((image_labels >= 1).sum())
        assert int(pos.sum()) == min(num_pos_available, 64)
        assert int(neg.sum()) == min(int((image_labels == 0).sum()), 256 - int(pos.sum()))
        assert bool((image_labels[pos] >= 1).all()) and bool((image_labels[neg] == 0).all())
    # The same generator seed gives the same sample, and the global RNG is untouched.
    state = torch.get_rng_state()
    again, _ = sample_balanced(
        labels, batch_size_per_image=256, positive_fraction=0.25, generator=torch.Generator().manual_seed(9)
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(again, positive))
    other, _ = sample_balanced(
        labels, batch_size_per_image=256, positive_fraction=0.25, generator=torch.Generator().manual_seed(10)
    )
    assert not torch.equal(other[0], positive[0])


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="positive_fraction"):
        sample_balanced([torch.zeros(3)], batch_size_per_image=4, positive_fraction=1.5)
    with pytest.raises(ValueError, match=r"one \[N\] tensor per image"):
        sample_balanced([torch.zeros(3, 2)], batch_size_per_image=4, positive_fraction=0.5)


# ---------------------------------------------------------------- RPN targets and loss


def rpn_case(seed: int, device: str = "cpu"):
    """Anchors and ground truth for three images: ordinary, without ground
    truth, and with a zero-width ground-truth box; plus random predictions."""
    g = torch.Generator().manual_seed(seed)
    anchors = [random_boxes(1500, 256, g, integer=True).to(device) for _ in range(3)]
    gt_boxes = [random_boxes(4, 256, g), torch.zeros(0, 4), random_boxes(3, 256, g)]
    gt_boxes[2][1:2] = zero_width(gt_boxes[2][1:2])
    gt_boxes = [boxes.to(device) for boxes in gt_boxes]
    objectness = torch.randn(4500, 1, generator=g).to(device).requires_grad_()
    pred_deltas = (0.3 * torch.randn(4500, 4, generator=g)).to(device).requires_grad_()
    return anchors, gt_boxes, objectness, pred_deltas


def test_anchor_targets_equal_torchvision():
    anchors, gt_boxes, _, _ = rpn_case(0)
    rpn = tv_rpn()
    expected_labels, matched = rpn.assign_targets_to_anchors(anchors, [{"boxes": b} for b in gt_boxes])
    expected_targets = rpn.box_coder.encode(matched, anchors)
    labels, targets = assign_anchor_targets(anchors, gt_boxes, box_coder=RPN_CODER)
    for image, (ours, expected) in enumerate(zip(labels, expected_labels)):
        assert_close(ours, expected, rtol=0, atol=0)
    assert (labels[0] == 1).any() and (labels[0] == -1).any()
    assert_close(targets[0], expected_targets[0])
    assert_close(targets[2], expected_targets[2])
    assert_close(targets[1], torch.zeros(1500, 4))  # no ground truth: unused zeros


def test_box_coder_weights_are_torchvision_defaults():
    """The default coders of the two stages are torchvision's (weights and
    clip), and the model's modules are built with them."""
    from maskrcnn.model import maskrcnn_small

    heads = tv_roi_heads_for_training()
    assert RPN_CODER == maskrcnn_ops.BoxCoder(tv_rpn().box_coder.weights, tv_rpn().box_coder.bbox_xform_clip)
    assert ROI_CODER == maskrcnn_ops.BoxCoder(heads.box_coder.weights, heads.box_coder.bbox_xform_clip)
    model = maskrcnn_small(num_classes=3)
    assert model.rpn.box_coder == RPN_CODER and model.roi_heads.box_coder == ROI_CODER


@pytest.mark.parametrize("seed", [0, 1])
def test_rpn_loss_equals_torchvision_compute_loss(seed, device):
    anchors, gt_boxes, objectness, pred_deltas = rpn_case(seed, device)
    rpn = tv_rpn()
    tv_labels, matched = rpn.assign_targets_to_anchors(anchors, [{"boxes": b} for b in gt_boxes])
    tv_targets = rpn.box_coder.encode(matched, anchors)
    torch.manual_seed(seed)
    expected = rpn.compute_loss(objectness, pred_deltas, tv_labels, list(tv_targets))
    expected_grads = torch.autograd.grad(sum(expected), [objectness, pred_deltas])

    labels, targets = assign_anchor_targets(anchors, gt_boxes, box_coder=RPN_CODER)
    torch.manual_seed(seed)
    sampled = sample_anchor_labels(labels)
    ours = rpn_loss(objectness, pred_deltas, sampled, targets)
    assert_close(ours[0], expected[0])
    assert_close(ours[1], expected[1])
    for grad, expected_grad in zip(torch.autograd.grad(sum(ours), [objectness, pred_deltas]), expected_grads):
        assert_close(grad, expected_grad)
    assert [int((s >= 0).sum()) for s in sampled[:2]] == [256, 256]
    # torchvision's quirk, reproduced: a zero-width ground-truth box has IoU 0
    # with every anchor, so all anchors are "its best" low-quality matches and
    # turn positive; 128 positives and no negatives are sampled there.
    assert bool((labels[2] == 1).all()) and int((sampled[2] == 1).sum()) == 128


def test_rpn_loss_with_nothing_sampled_is_connected_zero():
    objectness = torch.randn(6, requires_grad=True)
    deltas = torch.randn(6, 4, requires_grad=True)
    losses = rpn_loss(objectness, deltas, [torch.full((6,), -1.0)], [torch.zeros(6, 4)])
    assert [float(loss.detach()) for loss in losses] == [0.0, 0.0]
    sum(losses).backward()
    assert_close(objectness.grad, torch.zeros(6))


def test_rpn_loss_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="labels hold 5 rows"):
        rpn_loss(torch.zeros(6), torch.zeros(6, 4), [torch.zeros(5)], [torch.zeros(6, 4)])
    with pytest.raises(TypeError, match="one tensor per image"):
        rpn_loss(torch.zeros(6), torch.zeros(6, 4), torch.zeros(6), [torch.zeros(6, 4)])


# ---------------------------------------------------------------- RoI samples and box-head loss


def roi_case(seed: int, num_classes: int = 5, *, degenerate: bool = False, device: str = "cpu"):
    """Proposals and ground truth for three images: ordinary, without ground
    truth, and a third one, whose first box has zero width if degenerate."""
    g = torch.Generator().manual_seed(seed)
    gt_boxes = [random_boxes(5, 200, g), torch.zeros(0, 4), random_boxes(2, 200, g)]
    if degenerate:
        gt_boxes[2][0:1] = zero_width(gt_boxes[2][0:1])
    gt_labels = [torch.randint(1, num_classes, (len(b),), generator=g) for b in gt_boxes]
    # Proposals around the objects (jittered copies, kept valid like the
    # RPN's, which drops boxes under 1e-3 pixels) and elsewhere.
    proposals = []
    for boxes in gt_boxes:
        near = boxes.repeat(40, 1) + torch.randn(40 * len(boxes), 4, generator=g) * 12
        near[:, 2:] = torch.max(near[:, 2:], near[:, :2] + 1)
        proposals.append(torch.cat([near, random_boxes(600, 200, g)]))
    return [[t.to(device) for t in tensors] for tensors in (proposals, gt_boxes, gt_labels)]


@pytest.mark.parametrize("degenerate", [False, True], ids=["valid", "zero-width-gt"])
def test_proposal_samples_equal_torchvision_select_training_samples(degenerate, device):
    proposals, gt_boxes, gt_labels = roi_case(0, degenerate=degenerate, device=device)
    targets = [{"boxes": b, "labels": l} for b, l in zip(gt_boxes, gt_labels)]
    torch.manual_seed(5)
    expected = tv_roi_heads_for_training().select_training_samples(list(proposals), targets)
    torch.manual_seed(5)
    samples = sample_proposals(proposals, gt_boxes, gt_labels, box_coder=ROI_CODER)
    exp_proposals, exp_matched, exp_labels, exp_targets = expected
    for image in range(3):
        assert_close(samples.proposals[image], exp_proposals[image], rtol=0, atol=0)
        assert_close(samples.labels[image], exp_labels[image], rtol=0, atol=0)
        assert_close(samples.matched_gt_indices[image], exp_matched[image], rtol=0, atol=0)
    assert_close(samples.regression_targets[0], exp_targets[0])
    # A zero-width ground-truth box is its own candidate with IoU 0 / 0 = NaN
    # and NaN targets (log 0, division by 0), as in torchvision: such boxes
    # must not reach training (maskrcnn.data.validate_target rejects them).
    assert_close(samples.regression_targets[2], exp_targets[2], equal_nan=True)
    assert bool(samples.regression_targets[2].isnan().any()) == degenerate
    assert_close(samples.regression_targets[1], torch.zeros(len(samples.proposals[1]), 4, device=device))
    assert 0 < int((samples.labels[0] > 0).sum()) <= 128  # at most 512 * 0.25 positives
    assert len(samples.labels[0]) == 512  # negatives make up the rest
    assert bool((samples.labels[1] == 0).all())


@pytest.mark.parametrize("seed", [0, 1])
def test_box_head_loss_equals_torchvision_fastrcnn_loss(seed):
    proposals, gt_boxes, gt_labels = roi_case(seed)
    samples = sample_proposals(proposals, gt_boxes, gt_labels, box_coder=ROI_CODER)
    g = torch.Generator().manual_seed(seed)
    num_samples = sum(len(p) for p in samples.proposals)
    class_logits = torch.randn(num_samples, 5, generator=g, requires_grad=True)
    box_regression = torch.randn(num_samples, 20, generator=g, requires_grad=True)
    expected = tv_roi_heads.fastrcnn_loss(class_logits, box_regression, samples.labels, samples.regression_targets)
    ours = box_head_loss(class_logits, box_regression, samples.labels, samples.regression_targets)
    assert_close(ours[0], expected[0], rtol=0, atol=0)
    assert_close(ours[1], expected[1], rtol=0, atol=0)
    assert float(ours[1].detach()) > 0


def test_box_head_loss_without_samples_is_connected_zero():
    logits = torch.zeros(0, 3, requires_grad=True)
    regression = torch.zeros(0, 12, requires_grad=True)
    losses = box_head_loss(logits, regression, [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, 4)])
    assert [float(loss.detach()) for loss in losses] == [0.0, 0.0]
    sum(losses).backward()
    with pytest.raises(ValueError, match=r"box_regression \[S, 4 \* C\]"):
        box_head_loss(torch.zeros(2, 3), torch.zeros(2, 8), [torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, 4)])


# ---------------------------------------------------------------- mask targets and loss


def random_masks(boxes: torch.Tensor, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """[K, H, W] uint8: a random blob inside each box."""
    ys = torch.arange(height).view(-1, 1)
    xs = torch.arange(width).view(1, -1)
    masks = []
    for x1, y1, x2, y2 in boxes.tolist():
        centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
        radius_x, radius_y = max((x2 - x1) / 2, 1.0), max((y2 - y1) / 2, 1.0)
        blob = ((xs - centre_x) / radius_x) ** 2 + ((ys - centre_y) / radius_y) ** 2 <= 1
        noise = torch.rand(height, width, generator=generator) > 0.1
        masks.append((blob & noise).to(torch.uint8))
    return torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.uint8)


def test_mask_targets_equal_torchvision_project_masks_on_boxes():
    proposals, gt_boxes, gt_labels = roi_case(2)
    g = torch.Generator().manual_seed(2)
    samples = sample_proposals(proposals, gt_boxes, gt_labels, box_coder=ROI_CODER, generator=g)
    boxes, _, matched = samples.positives()
    masks = random_masks(gt_boxes[0], 200, 200, g)
    ours = mask_targets(masks, boxes[0], matched[0], size=28)
    expected = tv_roi_heads.project_masks_on_boxes(masks, boxes[0], matched[0], 28)
    assert ours.shape == (len(boxes[0]), 28, 28)
    assert_close(ours, expected)
    empty = mask_targets(torch.zeros(0, 200, 200, dtype=torch.uint8), boxes[1], matched[1], size=28)
    assert empty.shape == (0, 28, 28)


def test_mask_targets_reject_bad_input():
    masks = torch.zeros(2, 10, 10, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"matched_gt_indices must lie in \[0, 2\)"):
        mask_targets(masks, torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([2]), size=7)
    with pytest.raises(ValueError, match=r"gt_masks must be \[K, H, W\]"):
        mask_targets(masks[0], torch.tensor([[0.0, 0.0, 5.0, 5.0]]), torch.tensor([0]), size=7)


def test_mask_loss_equals_torchvision_maskrcnn_loss(device):
    proposals, gt_boxes, gt_labels = roi_case(3, device=device)
    samples = sample_proposals(proposals, gt_boxes, gt_labels, box_coder=ROI_CODER)
    boxes, labels, matched = samples.positives()
    g = torch.Generator().manual_seed(3)
    gt_masks = [random_masks(b.cpu(), 200, 200, g).to(device) for b in gt_boxes]
    mask_logits = torch.randn(sum(len(b) for b in boxes), 5, 28, 28, generator=g).to(device).requires_grad_()
    expected = tv_roi_heads.maskrcnn_loss(mask_logits, boxes, gt_masks, gt_labels, matched)
    targets = [mask_targets(m, b, i, size=28) for m, b, i in zip(gt_masks, boxes, matched)]
    ours = mask_loss(mask_logits, labels, targets)
    assert_close(ours, expected)
    (grad,) = torch.autograd.grad(ours, mask_logits)
    # Only the ground-truth class channel of each positive gets a gradient.
    has_grad = grad.abs().sum(dim=(2, 3)) > 0
    expected_channels = torch.zeros_like(has_grad)
    expected_channels[torch.arange(len(has_grad)), torch.cat(labels)] = True
    assert torch.equal(has_grad, expected_channels)


def test_mask_loss_without_positives_is_connected_zero():
    mask_logits = torch.randn(0, 4, 28, 28, requires_grad=True)
    loss = mask_loss(mask_logits, [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, 28, 28)])
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    with pytest.raises(ValueError, match=r"mask_targets must be \[P, M, M\]"):
        mask_loss(torch.zeros(1, 4, 28, 28), [torch.ones(1, dtype=torch.int64)], [torch.zeros(1, 14, 14)])


# ---------------------------------------------------------------- the whole model


def training_batch():
    """Two small images: three objects with masks, and none at all."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 120, 160, generator=g), torch.rand(3, 128, 128, generator=g)]
    boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [50.0, 40.0, 150.0, 110.0], [90.0, 5.0, 120.0, 30.0]])
    targets = [
        {"boxes": boxes, "labels": torch.tensor([1, 3, 2]), "masks": random_masks(boxes, 120, 160, g)},
        {
            "boxes": torch.zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 128, 128, dtype=torch.uint8),
        },
    ]
    return images, targets


def our_losses_with_torchvision_modules(model, images, targets):
    """torchvision's Mask R-CNN forward in training mode with its matching,
    sampling, target and loss code replaced by ours (its modules compute the
    features, predictions and proposals)."""
    image_list, targets = model.transform(images, targets)
    features = model.backbone(image_list.tensors)
    feature_maps = list(features.values())
    rpn = model.rpn
    objectness_per_level, deltas_per_level = rpn.head(feature_maps)
    anchors = rpn.anchor_generator(image_list, feature_maps)
    num_anchors_per_level = [o[0].numel() for o in objectness_per_level]
    objectness, pred_deltas = concat_box_prediction_layers(objectness_per_level, deltas_per_level)
    decoded = rpn.box_coder.decode(pred_deltas.detach(), anchors).view(len(anchors), -1, 4)
    proposals, _ = rpn.filter_proposals(decoded, objectness, image_list.image_sizes, num_anchors_per_level)

    gt_boxes = [t["boxes"] for t in targets]
    gt_labels = [t["labels"] for t in targets]
    rpn_coder = maskrcnn_ops.BoxCoder(rpn.box_coder.weights, rpn.box_coder.bbox_xform_clip)
    anchor_labels, anchor_targets = assign_anchor_targets(anchors, gt_boxes, box_coder=rpn_coder)
    loss_objectness, loss_rpn_box_reg = rpn_loss(
        objectness, pred_deltas, sample_anchor_labels(anchor_labels), anchor_targets
    )

    heads = model.roi_heads
    roi_coder = maskrcnn_ops.BoxCoder(heads.box_coder.weights, heads.box_coder.bbox_xform_clip)
    samples = sample_proposals(proposals, gt_boxes, gt_labels, box_coder=roi_coder)
    box_features = heads.box_head(heads.box_roi_pool(features, samples.proposals, image_list.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    loss_classifier, loss_box_reg = box_head_loss(
        class_logits, box_regression, samples.labels, samples.regression_targets
    )

    positive_boxes, positive_labels, positive_matched = samples.positives()
    mask_features = heads.mask_head(heads.mask_roi_pool(features, positive_boxes, image_list.image_sizes))
    mask_logits = heads.mask_predictor(mask_features)
    crops = [
        mask_targets(t["masks"], boxes, matched, size=mask_logits.shape[-1])
        for t, boxes, matched in zip(targets, positive_boxes, positive_matched)
    ]
    return {
        "loss_classifier": loss_classifier,
        "loss_box_reg": loss_box_reg,
        "loss_mask": mask_loss(mask_logits, positive_labels, crops),
        "loss_objectness": loss_objectness,
        "loss_rpn_box_reg": loss_rpn_box_reg,
    }


def test_losses_equal_torchvision_maskrcnn_resnet50_fpn():
    torch.manual_seed(0)
    model = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=128, max_size=160
    )
    model.train()  # BatchNorm uses batch statistics: both passes see the same features
    images, targets = training_batch()
    torch.manual_seed(7)
    expected = model(images, targets)
    torch.manual_seed(7)  # the same draws in the same order: the same samples
    ours = our_losses_with_torchvision_modules(model, images, targets)
    assert set(ours) == set(expected)
    for name in expected:
        assert_close(ours[name], expected[name], msg=name)
        assert float(ours[name].detach()) > 0, name
