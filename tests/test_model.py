"""Tests of the Mask R-CNN in maskrcnn/: parity with torchvision's
maskrcnn_resnet50_fpn (same weights, same detections, and the same
proposals and box-head logits on the way), state-dict compatibility,
checkpoint errors, output format, empty detections, and the batched
post-processing, pasting and transform against torchvision's pieces.

The R50 parity forward (a batch of two images of different sizes, resized
to 800x1066 and 800x658) runs once per module and is shared by the tests
that read it; the other tests use a ResNet-18 model on small images.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torchvision
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection.transform import GeneralizedRCNNTransform

import maskrcnn_ops
from maskrcnn_ops import reference
import maskrcnn
from maskrcnn.checkpoint import CheckpointError, check_state_dict, load_model, save_checkpoint
from maskrcnn.paste import paste_masks_in_image
from maskrcnn.postprocess import detect_objects
from maskrcnn.torchvision_keys import current_key
from maskrcnn.preprocess import ImageTransform, resized_size

PARITY_IMAGE_SIZES = [(300, 400), (850, 700)]


def small_model(**kwargs) -> maskrcnn.MaskRCNN:
    """ResNet-18 model on small images, 200 proposals and at most 10
    detections per image: a forward costs a fraction of R50's."""
    torch.manual_seed(0)
    settings = dict(depth=18, num_classes=5, min_size=128, max_size=200, rpn_post_nms_top_n=200,
                    box_detections_per_img=10)
    settings.update(kwargs)
    return maskrcnn.maskrcnn_resnet_fpn(**settings).eval()


def random_images(sizes, seed: int = 1, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator).to(device) for h, w in sizes]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU per pair of binary masks [D, ...] (1 where both are empty)."""
    a, b = a.flatten(1), b.flatten(1)
    intersection = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def tie_order(boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """An order of boxes [K, 4] by decreasing score [K] and, within runs of
    equal scores, by coordinates (unchanged where scores differ)."""
    order = torch.arange(boxes.size(0))
    for column in (3, 2, 1, 0):
        order = order[torch.sort(boxes[order, column], stable=True).indices]
    return order[torch.sort(scores[order], descending=True, stable=True).indices]


def capture_output(module: torch.nn.Module, store: dict, name: str):
    return module.register_forward_hook(lambda m, args, output: store.__setitem__(name, output))


@pytest.fixture(scope="module")
def torchvision_model():
    torch.manual_seed(0)
    return torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()


@pytest.fixture(scope="module")
def parity(torchvision_model):
    """Both models on the same batch, with the intermediate results."""
    ours = maskrcnn.maskrcnn_resnet50_fpn().eval()
    ours.load_state_dict(torchvision_model.state_dict(), strict=True)
    images = random_images(PARITY_IMAGE_SIZES)
    seen = {}
    hooks = [
        capture_output(torchvision_model.rpn, seen, "tv_rpn"),
        capture_output(ours.rpn, seen, "rpn"),
        capture_output(torchvision_model.roi_heads.box_predictor, seen, "tv_box"),
        capture_output(ours.roi_heads.box_predictor, seen, "box"),
    ]
    with torch.inference_mode():
        theirs = torchvision_model(images)
        mine = ours(images)
    for hook in hooks:
        hook.remove()
    return dict(ours=mine, theirs=theirs, images=images, **seen)


def test_parity_detections(parity):
    """Same labels in the same order, boxes within 1e-3 relative, scores
    within 1e-4, masks of matching detections with IoU > 0.99.

    Random weights give large box deltas, so many boxes are one to three
    pixels wide and their masks have a few dozen pixels: there a pixel whose
    probability is within 1e-4 of the 0.5 threshold can flip and take the
    IoU under 0.99. So the probabilities themselves must agree within 1e-4,
    the IoU bound is checked on masks of 100 pixels or more, and every pixel
    that differs at the threshold must be such a borderline one."""
    report = []
    large_masks = 0
    for ours, theirs in zip(parity["ours"], parity["theirs"]):
        assert len(theirs["labels"]) > 0, "the parity workload must give detections"
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=0, atol=1e-4)
        torch.testing.assert_close(ours["masks"], theirs["masks"], rtol=0, atol=1e-4)
        inside, inside_tv = ours["masks"] > 0.5, theirs["masks"] > 0.5
        iou = mask_iou(inside, inside_tv)
        large = inside_tv.flatten(1).sum(1) >= 100
        large_masks += int(large.sum())
        assert (iou[large] > 0.99).all()
        assert ((theirs["masks"][inside != inside_tv] - 0.5).abs() < 1e-4).all()
        report.append(
            f"{len(ours['labels'])} detections: max |box diff| {(ours['boxes'] - theirs['boxes']).abs().max():.2e} px, "
            f"max |score diff| {(ours['scores'] - theirs['scores']).abs().max():.2e}, "
            f"max |mask diff| {(ours['masks'] - theirs['masks']).abs().max():.2e}, "
            f"min mask IoU {iou[large].min():.4f} ({int(large.sum())} masks of >= 100 px), {iou.min():.4f} (all), "
            f"{int((inside != inside_tv).sum())} of {int(inside_tv.sum())} mask pixels differ"
        )
    assert large_masks >= 5
    print("\nparity with torchvision:\n  " + "\n  ".join(report))


def test_parity_intermediate(parity):
    """Proposals (RPN output) and box-head outputs equal torchvision's.

    Proposals of equal score come in no defined order (torchvision's top-k
    and sort leave it open), so both sides are compared in ``tie_order``,
    and the box-head rows (one per proposal) with them."""
    tv_proposals, _ = parity["tv_rpn"]
    proposals, scores = parity["rpn"]
    (tv_logits, tv_deltas), (logits, deltas) = parity["tv_box"], parity["box"]
    rows, tv_rows, offset = [], [], 0
    for ours, theirs, ours_scores in zip(proposals, tv_proposals, scores):
        assert ours.shape == theirs.shape
        # Where scores differ the order is the same on both sides, so our
        # scores order torchvision's proposals too.
        order, tv_order = tie_order(ours, ours_scores), tie_order(theirs, ours_scores)
        torch.testing.assert_close(ours[order], theirs[tv_order], rtol=1e-4, atol=1e-3)
        rows.append(order + offset)
        tv_rows.append(tv_order + offset)
        offset += ours.size(0)
    rows, tv_rows = torch.cat(rows), torch.cat(tv_rows)
    torch.testing.assert_close(logits[rows], tv_logits[tv_rows], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(deltas[rows], tv_deltas[tv_rows], rtol=1e-4, atol=1e-4)
    print(f"\nproposals max |diff| {(torch.cat(proposals)[rows] - torch.cat(tv_proposals)[tv_rows]).abs().max():.2e} px, "
          f"class logits max |diff| {(logits[rows] - tv_logits[tv_rows]).abs().max():.2e}, "
          f"box deltas max |diff| {(deltas[rows] - tv_deltas[tv_rows]).abs().max():.2e}")


def test_output_format(parity):
    """Per image: boxes [N, 4] in the original image, int64 labels, float32
    scores by decreasing value, masks [N, 1, H, W] probabilities."""
    for result, image in zip(parity["ours"], parity["images"]):
        height, width = image.shape[-2:]
        n = result["boxes"].shape[0]
        assert set(result) == {"boxes", "labels", "scores", "masks"}
        assert result["boxes"].shape == (n, 4) and result["boxes"].dtype == torch.float32
        assert result["labels"].shape == (n,) and result["labels"].dtype == torch.int64
        assert result["scores"].shape == (n,) and result["scores"].dtype == torch.float32
        assert result["masks"].shape == (n, 1, height, width) and result["masks"].dtype == torch.float32
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
        assert result["masks"].min() >= 0 and result["masks"].max() <= 1
        boxes = result["boxes"]
        assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
        assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
        assert ((result["labels"] >= 1) & (result["labels"] < 91)).all()


def test_state_dict_keys_equal_torchvision_trained_model():
    """Keys and shapes equal torchvision's maskrcnn_resnet50_fpn as built for
    its COCO weights (FrozenBatchNorm2d backbone, hence no
    num_batches_tracked)."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    theirs = torchvision.models.detection.MaskRCNN(resnet_fpn_backbone(backbone_name="resnet50", weights=None), 91)
    ours = maskrcnn.maskrcnn_resnet50_fpn()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_strict_load_of_torchvision_state_dict(torchvision_model):
    """The state dict of maskrcnn_resnet50_fpn(weights=None) (BatchNorm2d,
    with num_batches_tracked) loads with strict=True, every tensor copied."""
    ours = maskrcnn.maskrcnn_resnet50_fpn()
    result = ours.load_state_dict(torchvision_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    theirs = torchvision_model.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def legacy_state_dict(state_dict):
    """A state dict with torchvision <= 0.12 key names (those of the
    published COCO weights file) and no num_batches_tracked."""
    renamed = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        old = key.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        old = old.replace("inner_blocks.", "inner_blocks#").replace("layer_blocks.", "layer_blocks#")
        for kind in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                old = old.replace(f"{kind}#{i}.0.", f"{kind}.{i}.")
        for i in range(4):
            old = old.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        renamed[old] = value
    return renamed


def test_strict_load_of_legacy_torchvision_key_names(torchvision_model):
    legacy = legacy_state_dict(torchvision_model.state_dict())
    assert "rpn.head.conv.weight" in legacy and "roi_heads.mask_head.mask_fcn4.bias" in legacy
    assert "backbone.fpn.inner_blocks.0.weight" in legacy
    assert all(current_key(k) in torchvision_model.state_dict() for k in legacy)
    ours = maskrcnn.maskrcnn_resnet50_fpn()
    ours.load_state_dict(legacy, strict=True)
    torch.testing.assert_close(ours.rpn.head.conv[0][0].weight, torchvision_model.rpn.head.conv[0][0].weight)
    torch.testing.assert_close(ours.roi_heads.mask_head[3][0].bias, torchvision_model.roi_heads.mask_head[3][0].bias)


def test_load_model_from_torchvision_file(torchvision_model, tmp_path):
    """A torchvision state-dict file: depth and classes read from it."""
    path = tmp_path / "maskrcnn_resnet50_fpn_coco.pth"
    torch.save(legacy_state_dict(torchvision_model.state_dict()), path)
    model = load_model(path, box_score_thresh=0.3)
    assert model.build_kwargs["depth"] == 50 and model.build_kwargs["num_classes"] == 91
    assert model.roi_heads.score_thresh == 0.3 and not model.training
    torch.testing.assert_close(model.backbone.body.layer4[2].conv3.weight,
                               torchvision_model.backbone.body.layer4[2].conv3.weight)


def test_checkpoint_round_trip(tmp_path):
    model = small_model(box_detections_per_img=7)
    path = tmp_path / "run" / "model.pt"
    save_checkpoint(path, model)
    loaded = load_model(path)
    assert loaded.build_kwargs == model.build_kwargs
    assert loaded.roi_heads.detections_per_img == 7
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key
    # A plain state dict of our model is a torchvision-format file.
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    plain = load_model(tmp_path / "plain.pt", min_size=128, max_size=200)
    assert plain.build_kwargs["depth"] == 18 and plain.build_kwargs["num_classes"] == 5


def test_wrong_weights_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(CheckpointError, match="not a PyTorch weights file"):
        load_model(tmp_path / "notes.txt")
    torch.save({"optimizer": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a maskrcnn checkpoint"):
        load_model(tmp_path / "other.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model(tmp_path / "pickled_module.pt")

    # A checkpoint whose tensors do not fit its own description: the error
    # names the keys and both shapes.
    model = small_model()
    payload = {"format": "maskrcnn-ops/maskrcnn", "format_version": 1,
               "model_kwargs": dict(model.build_kwargs, num_classes=3), "model": model.state_dict()}
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches: roi_heads\.box_predictor\.cls_score\.weight: "
                                              r"file \(5, 1024\), model \(3, 1024\)"):
        load_model(tmp_path / "mismatch.pt")
    torch.save(dict(payload, model_kwargs=dict(model.build_kwargs, colour="red")), tmp_path / "unknown.pt")
    with pytest.raises(CheckpointError, match="unknown model arguments.*colour"):
        load_model(tmp_path / "unknown.pt")


def test_check_state_dict_names_missing_and_unexpected_keys():
    model = small_model()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("roi_heads.mask_")}
    state["roi_heads.keypoint_head.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        check_state_dict(model, state, source="faster_rcnn.pt")
    message = str(error.value)
    assert "faster_rcnn.pt" in message and "missing keys: roi_heads.mask_head.0.0.weight" in message
    assert "1 unexpected keys: roi_heads.keypoint_head.weight" in message


def test_empty_detections_and_empty_proposals():
    images = random_images([(96, 128), (120, 90)])
    for settings in (dict(box_score_thresh=1.0), dict(rpn_score_thresh=1.0)):
        model = small_model(**settings)
        with torch.inference_mode():
            results = model(images)
        for result, image in zip(results, images):
            assert result["boxes"].shape == (0, 4) and result["labels"].shape == (0,)
            assert result["scores"].shape == (0,) and result["masks"].shape == (0, 1, *image.shape[-2:])


def test_batch_of_different_sizes():
    """Each image gets its results at its own size, and they do not depend
    on its place in the batch (swapping two images swaps their results)."""
    model = small_model(box_score_thresh=0.0)
    images = random_images([(96, 128), (150, 100), (64, 64)])
    with torch.inference_mode():
        results = model(images)
        swapped = model([images[1], images[0], images[2]])
    for result, image in zip(results, images):
        assert result["masks"].shape[-2:] == image.shape[-2:]
        assert len(result["labels"]) > 0
    for a, b in ((results[0], swapped[1]), (results[1], swapped[0]), (results[2], swapped[2])):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["masks"], b["masks"])


def test_unpasted_masks_paste_to_the_outputs():
    """Under box_masks_kept (paste_masks = False) the outputs keep box_masks
    [D, 1, M, M], which pasted into each image give the default outputs'
    masks exactly; the switch is restored after the block."""
    from maskrcnn.evaluation import pasted
    from maskrcnn.model import box_masks_kept

    model = small_model(box_score_thresh=0.0)
    images = random_images([(96, 128), (150, 100)])
    with torch.inference_mode():
        results = model(images)
        with box_masks_kept(model):
            unpasted = model(images)
    assert model.paste_masks
    for result, other, image in zip(results, unpasted, images):
        assert set(other) == {"boxes", "labels", "scores", "box_masks"} and other["box_masks"].shape[1] == 1
        assert torch.equal(pasted(other, tuple(image.shape[-2:]))["masks"], result["masks"])


def test_channels_last_changes_rounding_only():
    """channels_last changes the backbone's float rounding and nothing else:
    the same features within 1e-4 relative. (With random weights that
    rounding can reorder near-ties downstream, so detections are not
    compared; benchmarks/model.py --channels-last shows it.)"""
    default = small_model()
    fast = small_model(channels_last=True)
    fast.load_state_dict(default.state_dict())
    images = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected, features = default.backbone(images), fast.backbone(images)
        (result,) = fast([images[0]])
    assert features["0"].is_contiguous(memory_format=torch.channels_last)
    for name, value in expected.items():
        torch.testing.assert_close(features[name], value, rtol=1e-4, atol=1e-4 * value.abs().max().item())
    assert result["masks"].shape[-2:] == (64, 96)


def test_bad_input_and_training_mode_without_targets():
    model = small_model()
    with pytest.raises(ValueError, match=r"Tensor\[3, H, W\]"):
        model([torch.rand(1, 32, 32)])
    with pytest.raises(ValueError, match="floating point"):
        model([torch.zeros(3, 32, 32, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="non-empty list"):
        model([])
    with pytest.raises(ValueError, match=r"needs targets.*model\.eval\(\)"):
        model.train()([torch.rand(3, 32, 32)])


def test_cpu_autocast_bfloat16():
    """Under CPU autocast (bfloat16) the model runs and its outputs are sane
    float32: box math and masks stay in float32."""
    # Small: this CPU has no fast bfloat16 convolution.
    model = small_model(box_score_thresh=0.0, box_detections_per_img=5, min_size=64, max_size=96,
                        rpn_post_nms_top_n=100)
    images = random_images([(48, 64)])
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        (result,) = model(images)
    assert len(result["labels"]) > 0
    assert result["boxes"].dtype == torch.float32 and result["masks"].dtype == torch.float32
    assert torch.isfinite(result["boxes"]).all() and (result["boxes"][:, 2:] <= torch.tensor([64, 48])).all()
    assert result["masks"].min() >= 0 and result["masks"].max() <= 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_runs_under_autocast():
    model = small_model(box_score_thresh=0.0)
    images = random_images([(96, 128), (120, 90)])
    with torch.inference_mode():
        on_cpu = model(images)
        model.cuda()
        on_gpu = model([image.cuda() for image in images])
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype):
                half = model([image.cuda() for image in images])
            for result in half:
                assert result["boxes"].dtype == torch.float32 and torch.isfinite(result["boxes"]).all()
                assert result["masks"].min() >= 0 and result["masks"].max() <= 1
    for a, b in zip(on_cpu, on_gpu):
        assert torch.equal(a["labels"], b["labels"].cpu())
        torch.testing.assert_close(a["boxes"], b["boxes"].cpu(), rtol=1e-3, atol=1e-2)
        assert mask_iou(a["masks"] > 0.5, b["masks"].cpu() > 0.5).min() > 0.99


# ---- the batched pieces against torchvision's per-image ones -------------


def image_boxes(n: int, height: int, width: int, generator) -> torch.Tensor:
    """Boxes inside the image (as detections are, after clipping), from
    sub-pixel to full-image size, some touching the borders."""
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([width, height])
    side = torch.exp(torch.empty(n, 2).uniform_(-2, 7, generator=generator))
    boxes = torch.cat([centre - side / 2, centre + side / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 0.01)
    boxes[:3] = torch.tensor([[0.0, 0.0, 0.3, 0.2], [width - 8, height - 8, width, height], [0, 0, width, height]])
    return boxes


@pytest.mark.parametrize("size", [(120, 160), (97, 61)])
def test_paste_matches_torchvision(device, size):
    height, width = size
    generator = torch.Generator().manual_seed(3)
    boxes = image_boxes(60, height, width, generator)
    masks = torch.rand(60, 1, 28, 28, generator=generator)
    theirs = tv_roi_heads.paste_masks_in_image(masks, boxes, size)
    ours = paste_masks_in_image(masks.to(device), boxes.to(device), size).cpu()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert mask_iou(ours > 0.5, theirs > 0.5).min() > 0.99


def test_paste_other_mask_sizes_and_padding():
    generator = torch.Generator().manual_seed(4)
    boxes = image_boxes(20, 50, 70, generator)
    masks = torch.rand(20, 1, 14, 14, generator=generator, dtype=torch.float64)
    for padding in (0, 2):
        theirs = tv_roi_heads.paste_masks_in_image(masks.float(), boxes, (50, 70), padding=padding)
        ours = paste_masks_in_image(masks, boxes, (50, 70), padding=padding)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_paste_empty_and_outside(device):
    empty = paste_masks_in_image(torch.rand(0, 1, 28, 28, device=device), torch.zeros(0, 4, device=device),
                                 (30, 40))
    assert empty.shape == (0, 1, 30, 40)
    # Boxes entirely outside the image paste nothing (torchvision's loop fails there).
    outside = paste_masks_in_image(torch.ones(2, 1, 28, 28, device=device),
                                   torch.tensor([[50.0, 5, 60, 20], [-30, -30, -10, -5]], device=device), (30, 40))
    assert outside.shape == (2, 1, 30, 40) and outside.abs().sum() == 0


@pytest.mark.parametrize("boxes_per_call", [None, 1], ids=["one-call", "image-per-call"])
def test_detect_objects_matches_torchvision(device, boxes_per_call, monkeypatch):
    """Batched post-processing = torchvision's postprocess_detections, per
    image, in the same order (one image has no proposals), whether the NMS
    takes all images in one call or fewer per call (bounded mask memory)."""
    calls = []
    original = maskrcnn_ops.batched_nms_keep
    monkeypatch.setattr(maskrcnn_ops, "batched_nms_keep", lambda boxes, *args: calls.append(len(boxes)) or original(boxes, *args))
    bound = {} if boxes_per_call is None else dict(nms_boxes_per_call=boxes_per_call)
    generator = torch.Generator().manual_seed(5)
    sizes = [(200, 300), (150, 120), (90, 90)]
    counts = [300, 0, 120]
    num_classes = 7
    proposals = [image_boxes(n, h, w, generator) if n else torch.zeros(0, 4) for n, (h, w) in zip(counts, sizes)]
    logits = 3 * torch.randn(sum(counts), num_classes, generator=generator)
    deltas = torch.randn(sum(counts), num_classes * 4, generator=generator)
    heads = tv_roi_heads.RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    boxes, scores, labels = heads.postprocess_detections(logits, deltas, proposals, sizes)
    box_coder = maskrcnn_ops.BoxCoder(heads.box_coder.weights, heads.box_coder.bbox_xform_clip)
    ours = detect_objects(logits.to(device), deltas.to(device), [p.to(device) for p in proposals], sizes,
                          box_coder=box_coder, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100, **bound)
    assert [len(b) for b in boxes][1] == 0 and min(len(boxes[0]), len(boxes[2])) > 0
    assert len(calls) == (1 if boxes_per_call is None else 2)  # the empty image joins the first
    for i in range(len(sizes)):
        assert torch.equal(ours.labels[i].cpu(), labels[i])
        torch.testing.assert_close(ours.scores[i].cpu(), scores[i])
        torch.testing.assert_close(ours.boxes[i].cpu(), boxes[i], rtol=1e-5, atol=1e-4)


def test_nms_bound_defaults_to_the_one_constant():
    """Every function that splits NMS into bounded calls defaults to
    maskrcnn_ops.NMS_BOXES_PER_CALL (an argument, not a module global)."""
    bounds = [(maskrcnn_ops.image_groups, "max_boxes"), (detect_objects, "nms_boxes_per_call")]
    for function, name in bounds:
        assert inspect.signature(function).parameters[name].default == maskrcnn_ops.NMS_BOXES_PER_CALL, function


def recorder(function, results: list):
    """``function``, appending each of its results to ``results``."""

    def record(*args, **kwargs):
        results.append(function(*args, **kwargs))
        return results[-1]

    return record


class FixedPredictor(torch.nn.Module):
    """A box predictor that returns given class logits and box deltas."""

    def __init__(self, class_logits: torch.Tensor, box_deltas: torch.Tensor) -> None:
        super().__init__()
        self.class_logits, self.box_deltas = class_logits, box_deltas

    def forward(self, features):
        return self.class_logits, self.box_deltas


def test_non_default_box_weights_train_and_decode_with_one_coder(monkeypatch):
    """RoIHeads(box_weights=W) owns one coder: the regression targets of its
    losses are encoded with W and its detections decoded with W, so deltas
    equal to the training targets of the positive samples decode back to
    their ground-truth boxes (with the default weights on one side they
    would not)."""
    weights = (2.0, 3.0, 4.0, 0.5)
    built = maskrcnn.maskrcnn_small(num_classes=3, image_size=64)
    parts = {name: getattr(built.roi_heads, name) for name in
             ("box_roi_pool", "box_head", "box_predictor", "mask_roi_pool", "mask_head", "mask_predictor")}
    heads = maskrcnn.roi_heads.RoIHeads(**parts, box_weights=weights, score_thresh=0.0, detections_per_img=50)
    assert heads.box_coder.weights == weights

    generator = torch.Generator().manual_seed(3)
    features = {name: torch.randn(1, 64, 16 >> level, 16 >> level, generator=generator)
                for level, name in enumerate(["0", "1", "2", "3", "pool"])}
    gt_boxes = torch.tensor([[6.0, 8.0, 30.0, 40.0], [34.0, 20.0, 60.0, 44.0]])
    jitter = 3 * torch.randn(20, 4, generator=generator)
    proposals = torch.cat([gt_boxes.repeat(10, 1) + jitter, torch.tensor([[0.0, 0.0, 4.0, 4.0]])])
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    targets = [{"boxes": gt_boxes, "labels": torch.tensor([1, 2]), "masks": masks}]

    drawn = []
    monkeypatch.setattr(maskrcnn.roi_heads, "sample_proposals", recorder(maskrcnn.roi_heads.sample_proposals, drawn))
    heads.train()
    heads.losses(features, [proposals], [(64, 64)], targets)
    positives = drawn[0].labels[0] > 0
    boxes, labels = drawn[0].proposals[0][positives], drawn[0].labels[0][positives]
    regression = drawn[0].regression_targets[0][positives]
    matched = gt_boxes[drawn[0].matched_gt_indices[0][positives]]
    assert len(boxes) > 2 and set(labels.tolist()) == {1, 2}
    torch.testing.assert_close(regression, reference.encode_boxes(matched, boxes, weights))

    # Each positive sample's class gets a high score and its training target.
    num_classes = 3
    class_logits = torch.full((len(boxes), num_classes), -20.0)
    class_logits[torch.arange(len(boxes)), labels] = 20.0
    box_deltas = torch.zeros(len(boxes), num_classes, 4)
    box_deltas[torch.arange(len(boxes)), labels] = regression
    heads.box_predictor = FixedPredictor(class_logits, box_deltas.view(len(boxes), -1))
    heads.eval()
    with torch.inference_mode():
        detected = heads(features, [boxes], [(64, 64)])
    confident = detected.scores[0] > 0.5
    assert sorted(detected.labels[0][confident].tolist()) == [1, 2]  # NMS merges each object's copies
    for box, label in zip(detected.boxes[0][confident], detected.labels[0][confident]):
        torch.testing.assert_close(box, gt_boxes[int(label) - 1], rtol=0, atol=1e-4)


def test_rpn_box_weights_train_and_decode_with_one_coder(monkeypatch):
    """RegionProposalNetwork(box_weights=W) likewise: anchors' regression
    targets are encoded with W and proposals decoded with W, so predicting
    the targets turns the positive anchors into the ground-truth boxes."""
    weights = (0.5, 2.0, 3.0, 1.5)
    built = maskrcnn.maskrcnn_small(num_classes=3, image_size=64)
    rpn = maskrcnn.rpn.RegionProposalNetwork(anchor_generator=built.rpn.anchor_generator, head=built.rpn.head,
                                             box_weights=weights)
    assert rpn.box_coder.weights == weights
    generator = torch.Generator().manual_seed(4)
    batch = built.transform([torch.rand(3, 64, 64, generator=generator)])
    features = {name: torch.randn(1, 64, 16 >> level, 16 >> level, generator=generator)
                for level, name in enumerate("01234")}
    gt_boxes = torch.tensor([[6.0, 8.0, 30.0, 40.0], [34.0, 20.0, 60.0, 44.0]])
    predictions = rpn.predict(batch, features)

    assigned = []
    monkeypatch.setattr(maskrcnn.rpn, "assign_anchor_targets", recorder(maskrcnn.rpn.assign_anchor_targets, assigned))
    rpn.train()
    rpn.losses(predictions, [gt_boxes])
    (labels,), (regression,) = assigned[0]
    positive = labels == 1
    matched = reference.decode_boxes(regression[positive], predictions.anchors[positive], weights)
    assert positive.sum() >= 2
    assert all(torch.isclose(box, gt_boxes, atol=1e-4).all(1).any() for box in matched)  # encoded with W

    objectness = torch.where(positive, 20.0, -20.0)[None]
    rpn.eval()
    proposals, scores = rpn.proposals(batch, predictions._replace(objectness=objectness, deltas=regression[None]))
    confident = proposals[0][scores[0] > 0.5]
    assert len(confident) >= 2
    for box in confident:  # decoded with W: every confident proposal is a ground-truth box
        assert torch.isclose(box, gt_boxes, atol=1e-4).all(1).any(), box


@pytest.mark.parametrize("hw", [(480, 640), (600, 500), (1000, 3000), (799, 801), (37, 45)])
def test_transform_matches_torchvision(hw):
    theirs = GeneralizedRCNNTransform(800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
    images = random_images([hw, (hw[1], hw[0])])
    batch = ImageTransform()(images)
    image_list, _ = theirs(images)
    assert batch.image_sizes == [tuple(s) for s in image_list.image_sizes]
    assert resized_size(*hw, min_size=800, max_size=1333) == tuple(image_list.image_sizes[0])
    torch.testing.assert_close(batch.tensors, image_list.tensors, rtol=0, atol=0)
