"""Tests of the model in training mode: the losses equal torchvision's
``maskrcnn_resnet50_fpn`` with the same weights, batch and seed (and so do
the gradients), every trainable parameter gets a gradient, a few steps on
a fixed batch lower the loss, the training transform resizes targets as
torchvision's does, and bad targets give clear errors (empty targets
train).

The parity test runs ResNet-50 at 320 px (one forward and backward of
each model); the others use the small ResNet-18 configuration on 64-96 px
images.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch.testing import assert_close
from torchvision.models.detection.transform import GeneralizedRCNNTransform

import maskrcnn
from maskrcnn.data import ShapesDataset
from maskrcnn.model import LOSS_NAMES
from maskrcnn.preprocess import ImageTransform
from maskrcnn.presets import RESNET50

# Parameters whose gradients the parity test compares, one per stage.
PARITY_GRADIENTS = (
    "backbone.body.conv1.weight",
    "backbone.body.layer4.1.bn2.weight",
    "backbone.fpn.inner_blocks.0.0.weight",
    "rpn.head.cls_logits.weight",
    "rpn.head.bbox_pred.bias",
    "roi_heads.box_head.fc6.weight",
    "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.mask_head.0.0.weight",
    "roi_heads.mask_predictor.mask_fcn_logits.weight",
)


def empty_target(height: int, width: int) -> dict:
    return {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, height, width, dtype=torch.uint8),
    }


def shapes_batch(count: int, *, size, seed: int = 3):
    """(images, targets) of ``count`` generated shapes images."""
    dataset = ShapesDataset(count, image_size=size, seed=seed, min_shapes=2)
    images, targets = zip(*(dataset[i] for i in range(count)))
    return list(images), list(targets)


def small_model(**overrides) -> maskrcnn.MaskRCNN:
    torch.manual_seed(0)
    return maskrcnn.maskrcnn_small(num_classes=4, image_size=64, **overrides).train()


def assert_as_accurate(name: str, ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> None:
    """Our float32 result is no further from the float64 one than twice
    torchvision's float32 result is, plus 2e-5 of its norm: equality to
    float32 rounding, on whatever CPU and thread count, since torchvision's
    own error measures how much rounding this computation amplifies."""
    ours, theirs, exact = (t.double() for t in (ours, theirs, exact))
    our_error, their_error = float((ours - exact).norm()), float((theirs - exact).norm())
    allowed = 2 * their_error + 2e-5 * float(exact.norm())
    assert our_error <= allowed, (
        f"{name}: |ours - float64| = {our_error:.3g} > allowed {allowed:.3g} "
        f"(|torchvision - float64| = {their_error:.3g}, |float64| = {float(exact.norm()):.3g})")


def test_losses_and_gradients_equal_torchvision_maskrcnn_resnet50_fpn():
    """Same weights, same batch (an image with three shapes, one without
    objects), the global RNG seeded alike before each forward: the five
    losses agree to float32 rounding and so do the gradients.

    "float32 rounding" is measured, not assumed: at random initialization
    with batch statistics, loss_classifier and the box head's gradients move
    by up to 1e-3 relative in float32 with the thread count or the CPU's
    vector width (the GEMMs sum in another order), for torchvision's model
    as for ours. So both are compared with torchvision's model in float64
    (see assert_as_accurate)."""
    torch.manual_seed(0)
    theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=320, max_size=400
    ).train()
    exact = copy.deepcopy(theirs).double()
    # weights=None builds trainable BatchNorm and an all-trainable ResNet: the RESNET50 preset.
    ours = maskrcnn.maskrcnn_from_preset(RESNET50, num_classes=4, min_size=320, max_size=400).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images, targets = shapes_batch(1, size=(240, 300))
    images.append(torch.rand(3, 200, 260, generator=torch.Generator().manual_seed(1)))
    targets.append(empty_target(200, 260))

    torch.manual_seed(7)
    expected = theirs(images, [dict(t) for t in targets])
    torch.manual_seed(7)
    losses = ours(images, targets)
    torch.manual_seed(7)
    truth = exact([image.double() for image in images], [dict(t) for t in targets])
    assert list(losses) == list(expected) == list(truth) == list(LOSS_NAMES)
    for name in LOSS_NAMES:
        assert float(losses[name].detach()) > 0, name
        assert_as_accurate(name, losses[name].detach(), expected[name].detach(), truth[name].detach())

    for model, model_losses in ((theirs, expected), (ours, losses), (exact, truth)):
        sum(model_losses.values()).backward()
    gradients = [{name: p.grad for name, p in model.named_parameters()} for model in (ours, theirs, exact)]
    for name in PARITY_GRADIENTS:
        assert gradients[0][name] is not None, name
        assert_as_accurate(name, *(g[name] for g in gradients))
    # BatchNorm saw the same batch statistics.
    assert_close(ours.backbone.body.bn1.running_mean, theirs.backbone.body.bn1.running_mean)


def test_gradients_reach_every_trainable_parameter():
    model = small_model()
    images, targets = shapes_batch(2, size=64)
    assert {int(label) for t in targets for label in t["labels"]} == {1, 2, 3}, "every class in the batch"
    losses = model(images, targets)
    sum(losses.values()).backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == len(list(model.parameters()))  # the small model trains everything
    missing = [name for name, p in trainable if p.grad is None]
    assert not missing, f"no gradient: {missing}"
    zero = [name for name, p in trainable if not (p.grad.abs().sum() > 0)]
    assert not zero, f"zero gradient: {zero}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


def test_group_norm_backbone_trains():
    """norm="group": GroupNorm in every ResNet block (32 groups, fewer where
    the channels do not divide), finite losses and gradients into them."""
    torch.manual_seed(0)
    model = maskrcnn.maskrcnn_resnet_fpn(depth=18, num_classes=4, norm="group", trainable_layers=5,
                                         min_size=64, max_size=64).train()
    norms = [m for m in model.backbone.body.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(m.num_channels % m.num_groups == 0 for m in norms) and norms[0].num_groups == 32
    images, targets = shapes_batch(1, size=64)
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert norms[0].weight.grad is not None and torch.isfinite(norms[0].weight.grad).all()


def test_frozen_layers_get_no_gradient():
    torch.manual_seed(0)
    model = maskrcnn.maskrcnn_resnet_fpn(depth=18, num_classes=4, trainable_layers=2, min_size=64,
                                         max_size=64).train()
    images, targets = shapes_batch(1, size=64)
    sum(model(images, targets).values()).backward()
    assert model.backbone.body.layer1[0].conv1.weight.grad is None
    assert model.backbone.body.layer4[0].conv1.weight.grad is not None


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    model = small_model()
    images, targets = shapes_batch(2, size=64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(12):
        torch.manual_seed(0)  # the same samples each step: only the weights change
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        totals.append(float(loss.detach()))
    assert totals[-1] < 0.6 * totals[0], totals


def test_empty_targets_train():
    """Images without objects: every anchor and proposal is background,
    the box-regression and mask losses are zero (connected to the graph),
    and backward runs."""
    model = small_model()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    losses = model(images, [empty_target(64, 64), empty_target(64, 80)])
    assert float(losses["loss_box_reg"].detach()) == 0.0 and float(losses["loss_mask"].detach()) == 0.0
    assert float(losses["loss_rpn_box_reg"].detach()) == 0.0
    assert float(losses["loss_classifier"].detach()) > 0 and float(losses["loss_objectness"].detach()) > 0
    sum(losses.values()).backward()
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad is not None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update(boxes=torch.tensor([[10.0, 10.0, 10.0, 30.0]])), r"zero or negative width"),
        (lambda t: t.update(masks=torch.zeros(1, 32, 32, dtype=torch.uint8)), r"'masks' must be \[K, H, W\] = \[1, 64, 64\]"),
        (lambda t: t.update(labels=torch.tensor([4])), r"labels must lie in \[1, 4\)"),
        (lambda t: t.update(boxes=torch.tensor([[1.0, 2.0, float("nan"), 30.0]])), r"not finite"),
        (lambda t: t.pop("masks"), r"missing 'masks'"),
    ],
    ids=["zero-width-box", "mask-size", "label-range", "nan-box", "no-masks"],
)
def test_bad_targets_give_clear_errors(change, message):
    model = small_model()
    target = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1]),
              "masks": torch.ones(1, 64, 64, dtype=torch.uint8), "image_id": 17}
    change(target)
    with pytest.raises(ValueError, match=message) as error:
        model([torch.rand(3, 64, 64)], [target])
    assert "targets[0] (image_id 17)" in str(error.value)


def test_targets_must_match_images():
    model = small_model()
    with pytest.raises(ValueError, match=r"one target dict per image \(2 images\), got 1 targets"):
        model([torch.rand(3, 64, 64)] * 2, [empty_target(64, 64)])


def test_training_mode_uses_the_training_top_n():
    model = small_model(rpn_post_nms_top_n=20, rpn_train_post_nms_top_n=150)
    batch = model.transform([torch.rand(3, 64, 64)])
    with torch.no_grad():
        features = model.backbone(batch.tensors)
        train_proposals, _ = model.rpn(batch, features)
        model.eval()
        eval_proposals, _ = model.rpn(batch, features)
    assert len(eval_proposals[0]) <= 20 < len(train_proposals[0]) <= 150


@pytest.mark.parametrize("min_sizes", [(96,), (64, 80, 96)], ids=["one-size", "multi-scale"])
def test_training_transform_resizes_targets_as_torchvision(min_sizes):
    """Images, boxes and masks equal torchvision's training transform, with
    the same random choice of scale per image (one draw each)."""
    images, targets = shapes_batch(3, size=(60, 90))
    ours = ImageTransform(min_size=min_sizes[-1], max_size=200, train_min_sizes=min_sizes)
    theirs = GeneralizedRCNNTransform(min_size=min_sizes, max_size=200, image_mean=ours.image_mean,
                                      image_std=ours.image_std).train()
    torch.manual_seed(5)
    their_batch, their_targets = theirs(images, [dict(t) for t in targets])
    torch.manual_seed(5)
    batch, resized = ours.with_targets(images, targets)
    assert batch.image_sizes == [tuple(s) for s in their_batch.image_sizes]
    assert_close(batch.tensors, their_batch.tensors)
    for mine, expected, original in zip(resized, their_targets, targets):
        assert_close(mine["boxes"], expected["boxes"])
        assert torch.equal(mine["masks"], expected["masks"])
        assert mine["masks"].dtype == torch.uint8
        assert original["masks"].shape[-2:] == (60, 90)  # inputs left alone
