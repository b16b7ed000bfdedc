"""Export of the other model variants (maskrcnn/export.py): the small
Keypoint R-CNN of `train --keypoints` (with its mask branch), a keypoint
model without masks (torchvision's Keypoint R-CNN layout) and the small
ResNet-C4 model. torch.export with dynamic batch, height and width gives
the eager padded outputs (keypoints [N, D, K, 3] and keypoint scores [N,
D, K] included) on sizes other than the traced ones, and the padded
outputs mapped back equal the eager per-image detections. One AOTInductor
package (the keypoint model, `slow`: compiling takes minutes) runs through
ExportedDetector; the keypoint model exported to ONNX through the CLI gives
the eager padded outputs in onnxruntime, and keypoints through
ExportedDetector.

Random weights at 128 px with 10 detections per image keep the traces
short and fill the padded outputs.
"""

from __future__ import annotations

import pytest
import torch

import maskrcnn
from maskrcnn import export
from maskrcnn.model import maskrcnn_from_preset
from maskrcnn.presets import C4
from test_deploy import BOX_TOLERANCE, MASK_TOLERANCE, OTHER_BACKEND_BOX_TOLERANCE, random_images

SIDE = 128
DETECTIONS = 10
NUM_KEYPOINTS = 4
# The padded path's keypoints against the per-image eager ones: decoded
# in boxes that differ by the box head's summation order (measured here:
# keypoints and boxes up to 5.3e-5 px apart, scores 2.1e-5; the traced
# programs equal the eager padded outputs bit for bit).
KEYPOINT_TOLERANCE = dict(rtol=0, atol=2e-4)
SKELETON = [(1, 2), (2, 3), (3, 4), (4, 1)]


def build(variant: str) -> maskrcnn.MaskRCNN:
    torch.manual_seed(0)
    small = dict(box_detections_per_img=DETECTIONS, rpn_post_nms_top_n=200)
    if variant == "keypoints":
        model = maskrcnn.keypointrcnn_small(num_classes=4, num_keypoints=NUM_KEYPOINTS, image_size=SIDE, **small)
        model.keypoint_skeleton = list(SKELETON)
    elif variant == "keypoints-no-masks":
        model = maskrcnn.maskrcnn_resnet_fpn(depth=18, num_classes=3, min_size=SIDE, max_size=SIDE, with_masks=False,
                                             num_keypoints=NUM_KEYPOINTS + 1, keypoint_head_layers=(32, 32), **small)
    else:
        model = maskrcnn_from_preset(C4, num_classes=4, image_size=SIDE, **small)
    return model.eval()


VARIANTS = ["keypoints", "keypoints-no-masks", "c4"]
EXPECTED_NAMES = {
    "keypoints": export.OUTPUT_NAMES + export.KEYPOINT_OUTPUT_NAMES,
    "keypoints-no-masks": export.OUTPUT_NAMES[:-1] + export.KEYPOINT_OUTPUT_NAMES,
    "c4": export.OUTPUT_NAMES,
}


@pytest.fixture(scope="module")
def models():
    return {variant: build(variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def programs(models):
    """Each variant's exported program, made once (torch.export takes seconds)."""
    return {}


def program_of(variant, models, programs):
    if variant not in programs:
        programs[variant] = export.export_program(models[variant])
    return programs[variant]


def assert_same_named_outputs(names, ours, reference, *, box_tolerance=BOX_TOLERANCE) -> None:
    assert len(ours) == len(reference) == len(names)
    for name, a, b in zip(names, ours, reference):
        a = torch.as_tensor(a)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        tolerance = {"boxes": box_tolerance, "masks": MASK_TOLERANCE, "scores": MASK_TOLERANCE,
                     "keypoints": KEYPOINT_TOLERANCE, "keypoints_scores": KEYPOINT_TOLERANCE}
        torch.testing.assert_close(a, b, **tolerance.get(name, dict(rtol=0, atol=0)), msg=name)


def inputs_for(model, sizes, seed):
    return export.resize_for_program(random_images(sizes, seed), min_size=model.transform.min_size,
                                     max_size=model.transform.max_size)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_program_equals_eager_padded_outputs(variant, models, programs):
    model = models[variant]
    names = export.output_names(model)
    assert names == EXPECTED_NAMES[variant]
    run = program_of(variant, models, programs).module()
    # A batch of two sizes other than the traced one, and a batch of one.
    for sizes, seed in (([(120, 100), (100, 128)], 2), ([(97, 128)], 5)):
        inputs = inputs_for(model, sizes, seed)
        with torch.no_grad():
            eager = export.DeployableDetector(model)(inputs.images, inputs.image_sizes)
            traced = run(inputs.images, inputs.image_sizes)
        named = dict(zip(names, eager))
        n = len(sizes)
        assert bool((named["num_detections"] > 0).all()), "the test needs detections to compare"
        if model.num_keypoints:
            k = model.num_keypoints
            assert named["keypoints"].shape == (n, DETECTIONS, k, 3)
            assert named["keypoints_scores"].shape == (n, DETECTIONS, k)
        assert_same_named_outputs(names, traced, eager)


@pytest.mark.parametrize("variant", ["keypoints", "keypoints-no-masks"])
def test_padded_keypoints_mapped_back_equal_the_per_image_outputs(variant, models):
    model = models[variant]
    sizes = [(150, 200), (200, 130)]  # resized to 96 x 128 and 128 x 83 (padded to 96)
    inputs = inputs_for(model, sizes, seed=3)
    with torch.no_grad():
        padded = export.DeployableDetector(model)(inputs.images, inputs.image_sizes)
        listed = model(random_images(sizes, seed=3))
    mapped = export.detections_from_outputs(padded, inputs, names=export.output_names(model))
    for ours, reference in zip(mapped, listed):
        assert set(ours) == set(reference) and len(reference["boxes"]) > 0
        torch.testing.assert_close(ours["labels"], reference["labels"], rtol=0, atol=0)
        torch.testing.assert_close(ours["boxes"], reference["boxes"], **BOX_TOLERANCE)
        torch.testing.assert_close(ours["keypoints"], reference["keypoints"], **KEYPOINT_TOLERANCE)
        torch.testing.assert_close(ours["keypoints_scores"], reference["keypoints_scores"], **KEYPOINT_TOLERANCE)


def test_detections_from_outputs_checks_the_output_count(models):
    model = models["keypoints"]
    inputs = inputs_for(model, [(128, 128)], seed=1)
    with torch.no_grad():
        outputs = export.DeployableDetector(model)(inputs.images, inputs.image_sizes)
    with pytest.raises(ValueError, match="returned 7 tensors"):
        export.detections_from_outputs(outputs, inputs)  # the default names: a mask model's five


def assert_detector_equals_the_model(detector, model) -> None:
    """An ExportedDetector of the keypoint model against the model's eval
    interface on two images of other sizes: same labels, boxes, masks and
    keypoints (within 1e-3 px) in the original images."""
    images = random_images([(150, 200), (200, 130)], seed=7)
    with torch.no_grad():
        ours, reference = detector(images), model(images)
    for a, b in zip(ours, reference):
        assert set(a) == set(b) and len(b["boxes"]) > 0
        torch.testing.assert_close(a["labels"], b["labels"], rtol=0, atol=0)
        torch.testing.assert_close(a["boxes"], b["boxes"], **OTHER_BACKEND_BOX_TOLERANCE)
        torch.testing.assert_close(a["masks"], b["masks"], **MASK_TOLERANCE)
        torch.testing.assert_close(a["keypoints"], b["keypoints"], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["keypoints_scores"], b["keypoints_scores"], rtol=0, atol=1e-3)


@pytest.fixture(scope="module")
def keypoint_onnx(models, tmp_path_factory):
    """The keypoint model written by `python -m maskrcnn export --format onnx`
    from a checkpoint (the export takes about half a minute)."""
    pytest.importorskip("onnxruntime")
    from maskrcnn.cli import main

    folder = tmp_path_factory.mktemp("keypoint_onnx")
    weights = folder / "kp.pt"
    maskrcnn.save_checkpoint(weights, models["keypoints"])
    artifact = folder / "kp.onnx"
    assert main(["export", "--weights", str(weights), "--format", "onnx", "--out", str(artifact)]) == 0
    return artifact


@pytest.mark.numerics  # onnxruntime's float32 arithmetic against ATen's
def test_onnx_of_the_keypoint_model_equals_eager_padded_outputs(models, keypoint_onnx):
    import onnxruntime

    model = models["keypoints"]
    names = export.output_names(model)
    session = onnxruntime.InferenceSession(str(keypoint_onnx), providers=["CPUExecutionProvider"])
    assert tuple(output.name for output in session.get_outputs()) == names
    for sizes, seed in (([(120, 100), (100, 128)], 2), ([(97, 128)], 5)):
        inputs = inputs_for(model, sizes, seed)
        with torch.no_grad():
            eager = export.DeployableDetector(model)(inputs.images, inputs.image_sizes)
        ours = session.run(None, {"images": inputs.images.numpy(), "image_sizes": inputs.image_sizes.numpy()})
        named = dict(zip(names, eager))
        assert bool((named["num_detections"] > 0).all()), "the test needs detections to compare"
        assert named["keypoints"].shape == (len(sizes), DETECTIONS, NUM_KEYPOINTS, 3)
        # Keypoints within 1e-3 px: the keypoint of a map whose maximum is
        # within float rounding of another value could move (not seen here).
        tolerance = {"boxes": dict(rtol=0, atol=1e-4), "scores": MASK_TOLERANCE, "masks": MASK_TOLERANCE,
                     "keypoints": dict(rtol=0, atol=1e-3), "keypoints_scores": dict(rtol=0, atol=1e-4)}
        for name, a, b in zip(names, ours, eager):
            a = torch.from_numpy(a)
            assert a.shape == b.shape and a.dtype == b.dtype, name
            torch.testing.assert_close(a, b, **tolerance.get(name, dict(rtol=0, atol=0)), msg=name)


@pytest.mark.numerics
def test_exported_detector_runs_the_keypoint_onnx(models, keypoint_onnx):
    """ExportedDetector on the .onnx returns the keypoints of the model's
    eval interface, mapped back to the original images."""
    model = models["keypoints"]
    detector = export.ExportedDetector(keypoint_onnx)
    assert detector.output_names == export.output_names(model)
    assert_detector_equals_the_model(detector, model)


@pytest.mark.slow
def test_aoti_package_of_the_keypoint_model(models, programs, tmp_path):
    model = models["keypoints"]
    package = export.compile_package(model, tmp_path / "kp.pt2", program=program_of("keypoints", models, programs))
    detector = export.ExportedDetector(package)
    assert detector.output_names == export.output_names(model)
    assert detector.keypoint_skeleton == SKELETON
    assert_detector_equals_the_model(detector, model)
