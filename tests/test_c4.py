"""The ResNet-C4 Mask R-CNN (maskrcnn/c4.py): training losses and
gradients, eval outputs and their fixed-size form, the state-dict layout,
a few optimizer steps, checkpoints, torch.compile, and the conversion of a
detectron2 R50-C4 state dict (a synthetic one with detectron2's names and
shapes)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

import maskrcnn
from maskrcnn import c4, export
from maskrcnn.checkpoint import load_model, read_checkpoint, save_checkpoint
from maskrcnn.data.shapes import ShapesDataset
from maskrcnn.model import LOSS_NAMES, maskrcnn_from_preset
from maskrcnn.presets import C4

NUM_CLASSES = 4


def tiny_model(image_size: int = 64, **overrides) -> c4.MaskRCNNC4:
    """The C4 preset at 64 px (anchors 4..64) with few proposals."""
    torch.manual_seed(0)
    settings = dict(rpn_post_nms_top_n=30, box_detections_per_img=8, box_score_thresh=0.0)
    return maskrcnn_from_preset(C4, num_classes=NUM_CLASSES, image_size=image_size, **{**settings, **overrides})


def shapes_batch(count: int = 2, seed: int = 3):
    dataset = ShapesDataset(count, image_size=64, seed=seed)
    items = [dataset[i] for i in range(count)]
    return [image for image, _ in items], [target for _, target in items]


def test_training_losses_are_finite_and_reach_every_trainable_weight():
    model = tiny_model().train()
    images, targets = shapes_batch()
    losses = model(images, targets)
    assert sorted(losses) == sorted(LOSS_NAMES)
    assert all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert model.roi_heads.res5[0].conv1.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


def test_eval_outputs_and_14x14_masks():
    model = tiny_model().eval()
    images = [torch.rand(3, 64, 80), torch.rand(3, 50, 64)]
    with torch.no_grad():
        outputs = model(images)
        with maskrcnn.model.box_masks_kept(model):
            kept = model(images)
    for output, image in zip(outputs, images):
        count = len(output["boxes"])
        assert 0 < count <= 8
        assert output["boxes"].shape == (count, 4) and output["labels"].dtype == torch.int64
        assert output["masks"].shape == (count, 1, *image.shape[-2:])
        assert ((output["labels"] >= 1) & (output["labels"] < NUM_CLASSES)).all()
    assert kept[0]["box_masks"].shape[-2:] == (14, 14)


def test_layout_holds_res5_once_under_roi_heads():
    model = tiny_model()
    keys = list(model.state_dict())
    assert any(k.startswith("roi_heads.res5.0.conv1.") for k in keys)
    assert not any(k.startswith(("roi_heads.box_head.", "roi_heads.mask_head.", "backbone.layer4.")) for k in keys)
    assert "roi_heads.box_predictor.cls_score.weight" in keys and "rpn.head.cls_logits.weight" in keys
    assert len(list(model.parameters())) == len([k for k in keys if "running" not in k and "num_batches" not in k])
    assert model.rpn.head.cls_logits.out_channels == 15  # 5 sizes x 3 ratios on the one C4 map


def test_defaults_are_the_r50_c4_design():
    model = c4.maskrcnn_resnet50_c4(num_classes=81, rpn_post_nms_top_n=10)
    state = model.state_dict()
    assert state["backbone.layer3.0.conv3.weight"].shape == (1024, 256, 1, 1)
    assert state["roi_heads.res5.0.downsample.0.weight"].shape == (2048, 1024, 1, 1)
    assert model.roi_heads.res5[0].conv2.stride == (2, 2)  # torchvision's stride placement by default
    assert state["roi_heads.box_predictor.bbox_pred.weight"].shape == (81 * 4, 2048)
    assert state["roi_heads.mask_predictor.conv5_mask.weight"].shape == (2048, 256, 2, 2)
    pooler = model.roi_heads.box_roi_pool
    assert (pooler.output_size, pooler.sampling_ratio, pooler.spatial_scale) == (14, 0, 1 / 16)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(name.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1")) for name in frozen)


def test_padded_form_equals_the_per_image_outputs():
    # 96 px: the program's smallest canvas (export.MIN_SIDE), so both forms
    # see the same padding (beyond the images, normalization layers make
    # padding features that reach C4 cells at the images' edges).
    model = tiny_model(image_size=96).eval()
    images = [torch.rand(3, 96, 120), torch.rand(3, 80, 96)]
    inputs = export.resize_for_program(images, min_size=96, max_size=96)
    with torch.no_grad():
        listed = model(images)
        padded = export.DeployableDetector(model)(inputs.images, inputs.image_sizes)
    assert padded[-1].shape == (2, 8, 14, 14)
    for ours, reference in zip(export.detections_from_outputs(padded, inputs), listed):
        torch.testing.assert_close(ours["labels"], reference["labels"], rtol=0, atol=0)
        torch.testing.assert_close(ours["boxes"], reference["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(ours["masks"], reference["masks"], rtol=0, atol=1e-5)


def test_a_few_optimizer_steps_lower_the_loss():
    model = tiny_model().train()
    images, targets = shapes_batch(2, seed=5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loss_with_fixed_draws():
        torch.manual_seed(7)  # the same anchor and proposal samples each time
        return sum(model(images, targets).values())

    with torch.no_grad():
        first = float(loss_with_fixed_draws())
    for _ in range(8):
        loss = loss_with_fixed_draws()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = float(loss_with_fixed_draws())
    assert math.isfinite(last) and last < 0.8 * first, (first, last)


def test_checkpoint_round_trip_rebuilds_the_c4_model(tmp_path):
    model = tiny_model().eval()
    model.class_names = ["background", "circle", "square", "triangle"]
    save_checkpoint(tmp_path / "c4.pt", model)
    checkpoint = read_checkpoint(tmp_path / "c4.pt")
    assert checkpoint.architecture == "c4" and checkpoint.model_kwargs == model.build_kwargs
    loaded = load_model(tmp_path / "c4.pt")  # what evaluate and predict call
    assert isinstance(loaded, c4.MaskRCNNC4) and loaded.class_names == model.class_names
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        expected, got = model(images)[0], loaded(images)[0]
    for name in ("boxes", "scores", "labels", "masks"):
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_evaluate_command_reads_a_c4_checkpoint(tmp_path, capsys):
    from maskrcnn import cli

    save_checkpoint(tmp_path / "c4.pt", tiny_model())
    arguments = ["evaluate", "--weights", str(tmp_path / "c4.pt"), "--shapes-images", "2", "--image-size", "64"]
    assert cli.main(arguments) == 0
    assert "mask" in capsys.readouterr().out


@pytest.mark.slow
def test_compile_fullgraph_equals_eager(fresh_dynamo):
    """No graph break in the eval forward (the fixed-size path when traced)."""
    model = tiny_model().eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    images = [torch.rand(3, 64, 80), torch.rand(3, 60, 64)]
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        got, expected = compiled(images), model(images)
    for ours, reference in zip(got, expected):
        assert len(reference["boxes"]) > 0
        torch.testing.assert_close(ours["labels"], reference["labels"], rtol=0, atol=0)
        torch.testing.assert_close(ours["boxes"], reference["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(ours["masks"], reference["masks"], rtol=0, atol=1e-5)


# --------------------------------------------------- detectron2 R50-C4 --

D2_CLASSES = 3  # foreground classes; detectron2 adds the background last
D2_PIXEL_MEAN = (103.53, 116.28, 123.675)


def detectron2_r50_c4_state_dict() -> dict:
    """Random tensors under detectron2's R50-C4 names and shapes: stem and
    res2..res4 under ``backbone.``, res5 under ``roi_heads.``, FrozenBN as
    ``<conv>.norm.*``, shortcuts on every stage's first block, the RPN head
    with 15 anchors, class-specific box deltas and mask logits without a
    background class."""
    generator = torch.Generator().manual_seed(11)
    state = {}

    def tensor(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    def conv_norm(prefix, out_channels, in_channels, kernel):
        he_scale = (2 / (in_channels * kernel**2)) ** 0.5
        state[f"{prefix}.weight"] = tensor(out_channels, in_channels, kernel, kernel, scale=he_scale)
        state[f"{prefix}.norm.weight"] = 0.5 + tensor(out_channels, scale=0.05)  # keeps 16 residual blocks tame
        state[f"{prefix}.norm.bias"] = tensor(out_channels, scale=0.1)
        state[f"{prefix}.norm.running_mean"] = tensor(out_channels, scale=0.1)
        state[f"{prefix}.norm.running_var"] = 1 + torch.rand(out_channels, generator=generator)

    conv_norm("backbone.stem.conv1", 64, 3, 7)
    in_channels = 64
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3)):
        width = 64 * 2 ** (stage - 2)
        owner = "backbone" if stage < 5 else "roi_heads"
        for block in range(blocks):
            prefix = f"{owner}.res{stage}.{block}"
            if block == 0:
                conv_norm(f"{prefix}.shortcut", width * 4, in_channels, 1)
            conv_norm(f"{prefix}.conv1", width, in_channels, 1)
            conv_norm(f"{prefix}.conv2", width, width, 3)
            conv_norm(f"{prefix}.conv3", width * 4, width, 1)
            in_channels = width * 4
    rpn = "proposal_generator.rpn_head"
    state.update({
        f"{rpn}.conv.weight": tensor(1024, 1024, 3, 3, scale=0.01), f"{rpn}.conv.bias": tensor(1024, scale=0.01),
        f"{rpn}.objectness_logits.weight": tensor(15, 1024, 1, 1, scale=0.01),
        f"{rpn}.objectness_logits.bias": tensor(15),
        f"{rpn}.anchor_deltas.weight": tensor(60, 1024, 1, 1, scale=0.01),
        f"{rpn}.anchor_deltas.bias": tensor(60, scale=0.1),
        "roi_heads.box_predictor.cls_score.weight": tensor(D2_CLASSES + 1, 2048, scale=0.01),
        "roi_heads.box_predictor.cls_score.bias": tensor(D2_CLASSES + 1),
        "roi_heads.box_predictor.bbox_pred.weight": tensor(D2_CLASSES * 4, 2048, scale=0.001),
        "roi_heads.box_predictor.bbox_pred.bias": tensor(D2_CLASSES * 4, scale=0.1),
        "roi_heads.mask_head.deconv.weight": tensor(2048, 256, 2, 2, scale=0.01),
        "roi_heads.mask_head.deconv.bias": tensor(256),
        "roi_heads.mask_head.predictor.weight": tensor(D2_CLASSES, 256, 1, 1, scale=0.01),
        "roi_heads.mask_head.predictor.bias": tensor(D2_CLASSES),
        "pixel_mean": torch.tensor(D2_PIXEL_MEAN).view(3, 1, 1), "pixel_std": torch.ones(3, 1, 1),
    })
    return state


@pytest.fixture(scope="module")
def detectron2_state():
    return detectron2_r50_c4_state_dict()


@pytest.fixture(scope="module")
def converted_model(detectron2_state):
    return c4.load_detectron2_c4(detectron2_state, min_size=64, max_size=96, rpn_post_nms_top_n=8,
                                 box_score_thresh=0.0, box_detections_per_img=5)


def test_detectron2_state_dict_loads_strictly_and_runs(converted_model):
    kwargs = converted_model.build_kwargs
    assert (kwargs["depth"], kwargs["num_classes"], kwargs["stride_in_1x1"]) == (50, D2_CLASSES + 1, True)
    first = converted_model.roi_heads.res5[0]
    assert (first.conv1.stride, first.conv2.stride) == ((2, 2), (1, 1))  # MSRA: stride in the 1x1
    with torch.no_grad():
        output = converted_model([torch.rand(3, 64, 80)])[0]
    assert 0 < len(output["boxes"]) <= 5 and torch.isfinite(output["masks"]).all()


def test_detectron2_classes_move_background_first(converted_model, detectron2_state):
    ours = converted_model.roi_heads
    theirs = detectron2_state
    scores = theirs["roi_heads.box_predictor.cls_score.weight"]
    torch.testing.assert_close(ours.box_predictor.cls_score.weight[0], scores[-1], rtol=0, atol=0)
    torch.testing.assert_close(ours.box_predictor.cls_score.weight[1:], scores[:-1], rtol=0, atol=0)
    deltas = ours.box_predictor.bbox_pred.weight
    assert deltas[:4].abs().sum() == 0
    torch.testing.assert_close(deltas[4:], theirs["roi_heads.box_predictor.bbox_pred.weight"], rtol=0, atol=0)
    masks = ours.mask_predictor.mask_fcn_logits.weight
    assert masks[0].abs().sum() == 0
    torch.testing.assert_close(masks[1:], theirs["roi_heads.mask_head.predictor.weight"], rtol=0, atol=0)


def test_detectron2_anchors_follow_their_geometry(converted_model, detectron2_state):
    """Our anchor a (read from the generator: size sqrt(w h), ratio h / w)
    takes detectron2's anchor of that size and ratio, which it lists
    size-major (index size * 3 + ratio)."""
    sizes, ratios = (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)
    cell = converted_model.rpn.anchor_generator.cell_anchors[0]
    widths, heights = cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]
    logits = detectron2_state["proposal_generator.rpn_head.objectness_logits.weight"]
    deltas = detectron2_state["proposal_generator.rpn_head.anchor_deltas.weight"].view(15, 4, 1024, 1, 1)
    ours_logits = converted_model.rpn.head.cls_logits.weight
    ours_deltas = converted_model.rpn.head.bbox_pred.weight.view(15, 4, 1024, 1, 1)
    for a in range(15):
        size = min(range(5), key=lambda s: abs(sizes[s] - float((widths[a] * heights[a]).sqrt())))
        ratio = min(range(3), key=lambda r: abs(ratios[r] - float(heights[a] / widths[a])))
        theirs = size * 3 + ratio
        torch.testing.assert_close(ours_logits[a], logits[theirs], rtol=0, atol=0)
        torch.testing.assert_close(ours_deltas[a], deltas[theirs], rtol=0, atol=0)


def test_detectron2_stem_sees_the_same_input(converted_model, detectron2_state):
    """Our transform's RGB [0, 1] normalization and the reversed conv1 give
    detectron2's conv1 output on BGR 0..255 pixels minus its mean."""
    image = torch.rand(3, 32, 40)
    normalized = converted_model.transform.normalize(image)[None]
    ours = F.conv2d(normalized, converted_model.backbone.conv1.weight, stride=2, padding=3)
    bgr = image.flip(0) * 255 - torch.tensor(D2_PIXEL_MEAN).view(3, 1, 1)
    theirs = F.conv2d(bgr[None], detectron2_state["backbone.stem.conv1.weight"], stride=2, padding=3)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)


def test_detectron2_fpn_prefix_and_unknown_entries():
    state = {"backbone.bottom_up.res2.0.conv1.norm.running_var": torch.ones(1)}
    assert list(c4.convert_detectron2_c4(state, bgr_to_rgb=False)) == ["backbone.layer1.0.bn1.running_var"]
    with pytest.raises(ValueError, match="not those of a detectron2 Mask R-CNN R50-C4.*roi_heads.res4"):
        c4.convert_detectron2_c4({"roi_heads.res4.0.conv1.weight": torch.ones(1)})
