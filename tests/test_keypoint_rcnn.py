"""Tests of Keypoint R-CNN in maskrcnn/: torchvision's keypointrcnn_resnet50_fpn
state dict loads strictly, the same detections and keypoints on a batch of
images of different sizes, the same training losses (loss_keypoint too),
the keypoint targets and loss against torchvision's on edge cases, the
fixed-size (traceable) path, the shapes' corner keypoints, and the command
line's train --keypoints, evaluate and predict.

The R50 models run on images resized to 320..400 px (not 800) to keep the
tests to seconds on a CPU; the design and weights are torchvision's.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torchvision
from torch.testing import assert_close
from torchvision.models.detection import roi_heads as tv_roi_heads

import maskrcnn
from maskrcnn.checkpoint import load_model, read_checkpoint, save_checkpoint
from maskrcnn.cli import main
from maskrcnn.data import (
    SHAPE_KEYPOINT_NAMES,
    SHAPE_SKELETON,
    ShapesDataset,
    dataset_to_coco,
    validate_coco,
    validate_target,
)
from maskrcnn.data.coco_schema import CocoFormatError
from maskrcnn.evaluation import evaluate_coco
from maskrcnn.preprocess import ImageBatch
from maskrcnn.presets import RESNET50
from maskrcnn.training import keypoint_heatmap_targets, keypoint_loss
from maskrcnn.visualize import draw_detections
from test_training import assert_as_accurate

PARITY_IMAGE_SIZES = [(200, 260), (300, 220), (180, 340)]
SMALL_SIDE = 64


def random_images(sizes, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) for h, w in sizes]


def small_keypoint_model(**overrides) -> maskrcnn.MaskRCNN:
    torch.manual_seed(0)
    return maskrcnn.keypointrcnn_small(num_classes=4, num_keypoints=len(SHAPE_KEYPOINT_NAMES), image_size=SMALL_SIDE,
                                       **overrides)


def shapes_batch(count: int, *, size, seed: int = 3):
    dataset = ShapesDataset(count, image_size=size, seed=seed, min_shapes=2, keypoints=True)
    images, targets = zip(*(dataset[i] for i in range(count)))
    return list(images), list(targets)


@pytest.fixture(scope="module")
def torchvision_model():
    torch.manual_seed(0)
    return torchvision.models.detection.keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=320, max_size=400
    ).eval()


@pytest.fixture(scope="module")
def parity(torchvision_model):
    ours = maskrcnn.keypointrcnn_resnet50_fpn(min_size=320, max_size=400).eval()
    ours.load_state_dict(torchvision_model.state_dict(), strict=True)
    images = random_images(PARITY_IMAGE_SIZES)
    with torch.no_grad():
        return ours(images), torchvision_model(images)


# ---- state dict --------------------------------------------------------------------------


def test_state_dict_keys_and_shapes_equal_torchvision(torchvision_model):
    ours = maskrcnn.keypointrcnn_resnet50_fpn()
    theirs = {k: tuple(v.shape) for k, v in torchvision_model.state_dict().items()
              if not k.endswith("num_batches_tracked")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs
    assert ours.num_keypoints == 17 and not ours.roi_heads.has_masks
    assert ours.loss_names == ("loss_classifier", "loss_box_reg", "loss_keypoint", "loss_objectness",
                               "loss_rpn_box_reg")


def test_strict_load_of_torchvision_state_dict(torchvision_model):
    ours = maskrcnn.keypointrcnn_resnet50_fpn()
    result = ours.load_state_dict(torchvision_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name in ("roi_heads.keypoint_head.14.weight", "roi_heads.keypoint_predictor.kps_score_lowres.weight"):
        assert_close(ours.state_dict()[name], torchvision_model.state_dict()[name], rtol=0, atol=0)


def test_torchvision_keypoint_file_loads_with_its_keypoints(torchvision_model, tmp_path):
    path = tmp_path / "keypointrcnn.pth"
    torch.save(torchvision_model.state_dict(), path)
    kwargs = read_checkpoint(path).model_kwargs
    assert kwargs == {"depth": 50, "num_classes": 2, "num_keypoints": 17, "with_masks": False}
    model = load_model(path, min_size=320, max_size=400)
    assert model.num_keypoints == 17 and not model.roi_heads.has_masks


# ---- inference parity --------------------------------------------------------------------


def test_parity_detections_and_keypoints(parity):
    """Same boxes, labels, scores; keypoints within float rounding of
    torchvision's, but for argmax ties of the upsampled heatmap (a
    neighbouring pixel; at most 1% of them, within 2 px)."""
    ours, theirs = parity
    report = []
    for image_ours, image_theirs in zip(ours, theirs):
        assert sorted(image_ours) == sorted(image_theirs) == ["boxes", "keypoints", "keypoints_scores", "labels",
                                                              "scores"]
        count = image_theirs["boxes"].shape[0]
        assert count > 0 and image_ours["boxes"].shape[0] == count
        assert image_ours["keypoints"].shape == (count, 17, 3) and image_ours["keypoints"].dtype == torch.float32
        assert image_ours["keypoints_scores"].shape == (count, 17)
        assert torch.equal(image_ours["labels"], image_theirs["labels"])
        assert_close(image_ours["boxes"], image_theirs["boxes"], atol=1e-3, rtol=1e-4)
        assert_close(image_ours["scores"], image_theirs["scores"], atol=1e-4, rtol=1e-4)
        offsets = (image_ours["keypoints"][..., :2] - image_theirs["keypoints"][..., :2]).abs().amax(-1)
        assert torch.equal(image_ours["keypoints"][..., 2], image_theirs["keypoints"][..., 2])
        assert float((offsets > 1e-2).float().mean()) <= 0.01 and float(offsets.max()) <= 2.0
        same = offsets <= 1e-2
        score_difference = (image_ours["keypoints_scores"] - image_theirs["keypoints_scores"]).abs()[same]
        assert_close(image_ours["keypoints_scores"][same], image_theirs["keypoints_scores"][same], atol=1e-3, rtol=1e-4)
        report.append(f"{count} detections: max keypoint offset {float(offsets.max()):.2g} px, max keypoint "
                      f"score difference {float(score_difference.max()):.2g}")
    print("\nkeypoint parity with torchvision:\n  " + "\n  ".join(report))


def test_padded_path_gives_the_same_keypoints():
    """The fixed-size form (what torch.compile and export trace) gives the
    forward's detections and keypoints; zeros past the detections."""
    model = small_keypoint_model(box_score_thresh=0.0, box_detections_per_img=400).eval()
    images = random_images([(64, 80), (50, 64)], seed=4)
    with torch.no_grad():
        batch = model.transform(images)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        expected = model.roi_heads(features, proposals, batch.image_sizes)
        sizes = torch.tensor(batch.image_sizes)
        padded = model.detect_batch_padded(ImageBatch(batch.tensors, sizes))
    outputs = padded.unpad()
    for field in ("boxes", "scores", "labels", "masks", "keypoints", "keypoint_scores"):
        for ours, theirs in zip(getattr(outputs, field), getattr(expected, field)):
            assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    count = int(padded.detections.num_detections[1])
    assert count < padded.keypoints.shape[1]
    assert not padded.keypoints[1, count:].any() and not padded.keypoint_scores[1, count:].any()


def test_compile_fullgraph_keypoint_model_equals_eager(fresh_dynamo):
    """With the decoding one op (maskrcnn_ops.heatmaps_to_keypoints), the
    keypoint model's eval forward compiles with zero graph breaks
    (fullgraph=True raises on one) and gives the eager keypoints."""
    model = small_keypoint_model(box_score_thresh=0.0).eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    images = random_images([(64, 80), (50, 64)], seed=5)
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        ours, expected = compiled(images), model(images)
    for a, b in zip(ours, expected):
        assert len(b["boxes"]) > 0, "the test needs detections to compare"
        assert torch.equal(a["labels"], b["labels"])
        assert_close(a["boxes"], b["boxes"], atol=1e-4, rtol=0)
        assert_close(a["keypoints"], b["keypoints"], atol=1e-3, rtol=0)
        assert_close(a["keypoints_scores"], b["keypoints_scores"], atol=1e-4, rtol=1e-4)


def test_no_detections_give_empty_keypoints():
    model = small_keypoint_model(box_score_thresh=1.0).eval()
    with torch.no_grad():
        (result,) = model(random_images([(64, 64)]))
    assert result["keypoints"].shape == (0, 4, 3) and result["keypoints_scores"].shape == (0, 4)


# ---- training ----------------------------------------------------------------------------


def test_losses_and_gradients_equal_torchvision_keypointrcnn():
    """Same weights and batch (shapes with corner keypoints, and an image
    without objects), the RNG seeded alike: the five losses, loss_keypoint
    among them, and the keypoint head's gradients agree to float32 rounding
    (measured against torchvision's model in float64, as the Mask R-CNN
    test does)."""
    torch.manual_seed(0)
    theirs = torchvision.models.detection.keypointrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=4, num_keypoints=4, min_size=320, max_size=400
    ).train()
    exact = copy.deepcopy(theirs).double()
    ours = maskrcnn.maskrcnn_from_preset(RESNET50, num_classes=4, min_size=320, max_size=400, with_masks=False,
                                         num_keypoints=4).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images, targets = shapes_batch(1, size=(240, 300))
    images.append(torch.rand(3, 200, 260, generator=torch.Generator().manual_seed(1)))
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                    "keypoints": torch.zeros(0, 4, 3)})
    for target in targets:
        target.pop("masks", None)
    assert int((targets[0]["keypoints"][..., 2] > 0).sum()) >= 3

    torch.manual_seed(7)
    expected = theirs(images, [dict(t) for t in targets])
    torch.manual_seed(7)
    losses = ours(images, targets)
    torch.manual_seed(7)
    truth = exact([image.double() for image in images], [dict(t) for t in targets])
    assert list(losses) == list(expected) == list(truth) == list(ours.loss_names)
    for name in ours.loss_names:
        assert float(losses[name].detach()) > 0, name
        assert_as_accurate(name, losses[name].detach(), expected[name].detach(), truth[name].detach())
    for model, model_losses in ((theirs, expected), (ours, losses), (exact, truth)):
        sum(model_losses.values()).backward()
    gradients = [{name: p.grad for name, p in model.named_parameters()} for model in (ours, theirs, exact)]
    for name in ("roi_heads.keypoint_head.0.weight", "roi_heads.keypoint_predictor.kps_score_lowres.weight"):
        assert gradients[0][name] is not None, name
        assert_as_accurate(name, *(g[name] for g in gradients))


def edge_case_keypoints():
    """Boxes and keypoints on every edge case: inside, on the left/top edge,
    exactly on the right/bottom edge, outside each side, not labeled (v 0),
    labeled but hidden (v 1), fractional cells."""
    boxes = torch.tensor([[10.0, 20.0, 66.0, 76.0], [0.0, 0.0, 7.0, 3.5], [5.5, 5.5, 30.25, 40.75]])
    keypoints = torch.tensor([
        [[10.0, 20.0, 2], [66.0, 76.0, 2], [38.0, 48.0, 0], [38.0, 48.0, 1], [9.99, 30.0, 2], [30.0, 76.01, 2]],
        [[6.99, 3.49, 2], [7.0, 1.0, 2], [3.0, 3.5, 1], [-0.01, 1.0, 2], [3.3, 1.7, 2], [7.01, 3.6, 2]],
        [[5.5, 40.75, 2], [30.25, 5.5, 2], [17.9, 23.1, 2], [30.24, 40.74, 2], [5.49, 6.0, 2], [12.0, 12.0, 0]],
    ])
    return keypoints, boxes


def test_keypoint_targets_equal_torchvision_on_edge_cases():
    keypoints, boxes = edge_case_keypoints()
    cells, valid = keypoint_heatmap_targets(keypoints, boxes, size=56)
    their_cells, their_valid = tv_roi_heads.keypoints_to_heatmap(keypoints, boxes, 56)
    assert torch.equal(valid, their_valid.bool())
    assert torch.equal(cells, their_cells)
    # The right/bottom edge is the last cell, outside or v = 0 is no target, v = 1 is one.
    assert int(cells[0, 1]) == 56 * 56 - 1 and valid[0, 3] and not valid[0, 2] and not valid[0, 4]
    assert int(cells[0, 0]) == 0 and not valid[1, 3] and not valid[2, 5]


def test_keypoint_loss_equals_torchvision():
    keypoints, boxes = edge_case_keypoints()
    logits = torch.randn(5, 6, 56, 56, generator=torch.Generator().manual_seed(3), requires_grad=True)
    per_image_boxes = [boxes[:2], torch.cat([boxes[2:], boxes[:2]])]
    gt = [keypoints, keypoints[1:]]
    matched = [torch.tensor([0, 1]), torch.tensor([1, 0, 1])]
    ours = keypoint_loss(logits, per_image_boxes, gt, matched)
    theirs = tv_roi_heads.keypointrcnn_loss(logits, per_image_boxes, gt, matched)
    assert_close(ours, theirs)
    nothing = keypoint_loss(logits[:1, 2:3], [boxes[:1]], [keypoints[:1, 2:3]], [torch.tensor([0])])  # a v = 0 keypoint
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad
    with pytest.raises(ValueError, match="keypoints per instance"):
        keypoint_loss(logits, per_image_boxes, [keypoints[..., :4, :], keypoints[1:, :4]], matched)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    model = small_keypoint_model().train()
    images, targets = shapes_batch(2, size=SMALL_SIDE, seed=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(12):
        torch.manual_seed(0)  # the same samples each step: only the weights change
        losses = model(images, targets)
        history.append({name: float(value.detach()) for name, value in losses.items()})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert set(history[0]) == set(model.loss_names) and "loss_keypoint" in history[0]
    # The keypoint loss of a from-scratch model is not monotone step to step
    # (measured: 8.66 at the start, a spike to 8.6-10.6 at step 6 on every
    # CPU capability, 3.7-4.1 averaged over steps 10-12), so the test looks at
    # the last steps together.
    last = [step["loss_keypoint"] for step in history[-3:]]
    assert sum(last) / len(last) < 0.75 * history[0]["loss_keypoint"]
    assert sum(history[-1].values()) < sum(history[0].values())


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("keypoints"), "missing 'keypoints'"),
    (lambda t: t.update(keypoints=t["keypoints"][:, :3]), r"'keypoints' must be \[K, J, 3\]"),
    (lambda t: t.update(keypoints=t["keypoints"].long()), "'keypoints' must be a floating tensor"),
    (lambda t: t["keypoints"].__setitem__((0, 0, 2), 5.0), "visibilities must be 0, 1 or 2"),
    (lambda t: t["keypoints"].__setitem__((0, 0, 0), math.nan), "must be finite"),
])
def test_bad_keypoint_targets_give_clear_errors(change, message):
    model = small_keypoint_model().train()
    images, targets = shapes_batch(1, size=SMALL_SIDE)
    change(targets[0])
    with pytest.raises(ValueError, match=message):
        model(images, targets)


# ---- data, evaluation, drawing -----------------------------------------------------------


def test_shapes_keypoints_are_the_corners():
    dataset = ShapesDataset(20, image_size=96, seed=2, keypoints=True, max_shapes=5)
    visible = hidden = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        keypoints, labels, boxes = target["keypoints"], target["labels"], target["boxes"]
        assert keypoints.shape == (labels.shape[0], 4, 3) and keypoints.dtype == torch.float32
        labeled = keypoints[..., 2] > 0
        assert not labeled[labels == 1].any()  # circles have no corners
        assert not labeled[labels == 3, 3].any()  # triangles have three
        assert not keypoints[~labeled].any()  # not labeled: (0, 0, 0), as COCO
        xy = keypoints[..., :2]
        assert ((xy >= 0) & (xy <= torch.tensor([96.0, 96.0]))).all()
        is_visible = keypoints[..., 2] == 2
        inside_box = ((xy >= boxes[:, None, :2]) & (xy <= boxes[:, None, 2:])).all(-1)
        assert inside_box[is_visible].all()  # visible corners are training targets in their box
        for row in range(labels.shape[0]):  # the first corner is the topmost
            if labeled[row].all() or (labels[row] == 3 and labeled[row, :3].all()):
                assert keypoints[row, 0, 1] <= keypoints[row, labeled[row], 1].min()
        visible += int(is_visible.sum())
        hidden += int((keypoints[..., 2] == 1).sum())
        validate_target(target, image_size=tuple(image.shape[-2:]), num_keypoints=4)
    assert visible > 50 and hidden > 0
    assert "keypoints" not in ShapesDataset(2, image_size=48, seed=2)[0][1]


def test_shapes_coco_keypoint_annotations_validate():
    dataset = ShapesDataset(4, image_size=64, seed=3, keypoints=True)
    coco = dataset_to_coco(dataset)
    validate_coco(coco)
    assert coco["categories"][0]["keypoints"] == list(SHAPE_KEYPOINT_NAMES)
    assert coco["categories"][0]["skeleton"] == [list(edge) for edge in SHAPE_SKELETON]
    annotation = coco["annotations"][0]
    assert len(annotation["keypoints"]) == 12
    assert annotation["num_keypoints"] == sum(1 for v in annotation["keypoints"][2::3] if v > 0)
    broken = copy.deepcopy(coco)
    broken["annotations"][0]["keypoints"] = annotation["keypoints"][:9]
    with pytest.raises(CocoFormatError, match=r"'keypoints' must be \[x, y, v\] \* 4 = 12 finite numbers"):
        validate_coco(broken)
    broken = copy.deepcopy(coco)
    del broken["categories"][annotation["category_id"] - 1]["keypoints"]
    with pytest.raises(CocoFormatError, match="its category lists no keypoint names"):
        validate_coco(broken)


def test_keypoint_ap_of_the_ground_truth_is_one():
    """The ground truth as predictions scores keypoint AP 1, and moving the
    keypoints by a few pixels lowers it (the stated sigmas are used)."""
    dataset = ShapesDataset(6, image_size=96, seed=4, keypoints=True)
    perfect, shifted = {}, {}
    for index in range(len(dataset)):
        _, target = dataset[index]
        prediction = {key: target[key] for key in ("boxes", "labels", "keypoints")}
        prediction["scores"] = torch.linspace(1.0, 0.5, target["labels"].shape[0])
        perfect[index] = prediction
        shifted[index] = dict(prediction, keypoints=prediction["keypoints"] + torch.tensor([3.0, -3.0, 0.0]))
    kwargs = dict(iou_types=("keypoints",), keypoint_sigmas=dataset.keypoint_sigmas)
    best = evaluate_coco(perfect, dataset, **kwargs)["keypoints"]
    worse = evaluate_coco(shifted, dataset, **kwargs)["keypoints"]
    assert best["AP"] == pytest.approx(1.0) and best["AP50"] == pytest.approx(1.0)
    assert worse["AP"] < 0.9
    with pytest.raises(ValueError, match="has 4 keypoints per object, but 5 sigmas were given"):
        evaluate_coco(perfect, dataset, iou_types=("keypoints",), keypoint_sigmas=(0.05,) * 4 + (0.1,))


def test_draw_detections_draws_keypoints():
    image = torch.zeros(3, 100, 100)
    detections = {"boxes": torch.tensor([[5.0, 5.0, 95.0, 95.0]]), "labels": torch.tensor([2]),
                  "scores": torch.tensor([0.9]),
                  "keypoints": torch.tensor([[[30.0, 60.0, 1.0], [70.0, 60.0, 1.0], [70.0, 90.0, 1.0],
                                              [30.0, 90.0, 1.0]]]),
                  "keypoints_scores": torch.tensor([[5.0, 5.0, 5.0, -1.0]])}
    plain = draw_detections(image, {k: v for k, v in detections.items() if "keypoints" not in k}, class_names=[])
    drawn = draw_detections(image, detections, class_names=[], skeleton=SHAPE_SKELETON)
    pixels, before = torch.tensor(np.array(drawn)), torch.tensor(np.array(plain))
    assert pixels[60, 30].any() and not before[60, 30].any()  # corner 1 (row y, column x)
    assert pixels[60, 50].any() and not before[60, 50].any()  # the skeleton line from corner 1 to 2
    assert not pixels[90, 30].any() and not pixels[75, 30].any()  # corner 4 scores below the threshold: not drawn


# ---- the command line --------------------------------------------------------------------


def test_train_keypoints_then_evaluate_and_predict(tmp_path, capsys):
    run = tmp_path / "run"
    tiny = ["--shapes-images", "4", "--image-size", "64", "--batch-size", "2", "--device", "cpu"]
    assert main(["train", "--keypoints", *tiny, "--iterations", "2", "--out", str(run)]) == 0
    assert "loss_keypoint" in capsys.readouterr().out
    checkpoint = run / "last.pt"
    model = load_model(checkpoint)
    assert model.num_keypoints == 4 and model.roi_heads.has_masks
    assert model.keypoint_skeleton == list(SHAPE_SKELETON)
    metrics_file = tmp_path / "metrics.json"
    assert main(["evaluate", "--weights", str(checkpoint), "--shapes-images", "2", "--image-size", "64",
                 "--device", "cpu", "--out", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())["metrics"]
    assert set(metrics) == {"bbox", "segm", "keypoints"}
    assert "kp" in capsys.readouterr().out
    image = tmp_path / "shape.png"
    from PIL import Image

    pixels = (ShapesDataset(1, image_size=64, seed=9)[0][0] * 255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(pixels).save(image)
    out = tmp_path / "predicted"
    assert main(["predict", str(image), "--weights", str(checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    detections = json.loads((out / "detections.json").read_text())
    assert (out / "shape.png").is_file()
    assert all(len(a["keypoints"]) == 12 for a in detections["annotations"])


def test_keypoint_checkpoint_round_trip(tmp_path):
    model = small_keypoint_model()
    model.keypoint_skeleton = list(SHAPE_SKELETON)
    save_checkpoint(tmp_path / "kp.pt", model)
    loaded = load_model(tmp_path / "kp.pt")
    assert loaded.num_keypoints == 4 and loaded.keypoint_skeleton == list(SHAPE_SKELETON)
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
