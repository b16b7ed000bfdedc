"""The whole Mask R-CNN as one graph (maskrcnn/export.py): the fixed-size
path against the eager per-image outputs, torch.compile with no graph
break, torch.export with dynamic batch, height and width, an AOTInductor
package loaded by a process that imports only maskrcnn_ops, and ONNX in
onnxruntime.

A ResNet-18 model on small images (short side 128, long side at most 200,
10 detections per image) keeps the traces short; its random weights give
every image its full 10 detections, so the comparisons cover the whole
padded output. Traced programs run on batches and sizes other than the
ones they were traced with.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import maskrcnn
from maskrcnn import export

# Box corners: the fixed-size path runs the box head on more rows (padding
# included), so BLAS may sum in another order (measured: within 3e-5 px).
BOX_TOLERANCE = dict(rtol=0, atol=1e-4)
# Programs whose convolutions are another backend's (onnxruntime's, or
# oneDNN's prepacked ones in a frozen AOTInductor package) sum in another
# order: boxes 1.1e-4 px apart from eager measured on the frozen package.
OTHER_BACKEND_BOX_TOLERANCE = dict(rtol=0, atol=5e-4)
# Mask probabilities in [0, 1], from the same features up to float rounding.
MASK_TOLERANCE = dict(rtol=0, atol=1e-5)

TRACE_SIZES = [(150, 200), (128, 128), (200, 130)]  # landscape, square, portrait (original sizes)


def small_model() -> maskrcnn.MaskRCNN:
    torch.manual_seed(0)
    return maskrcnn.maskrcnn_resnet_fpn(depth=18, num_classes=5, min_size=128, max_size=200,
                                        rpn_post_nms_top_n=200, box_detections_per_img=10).eval()


def random_images(sizes, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) for h, w in sizes]


@pytest.fixture(scope="module")
def model() -> maskrcnn.MaskRCNN:
    return small_model()


def program_inputs(model, sizes, seed: int = 1) -> export.ProgramInputs:
    return export.resize_for_program(random_images(sizes, seed), min_size=model.transform.min_size,
                                     max_size=model.transform.max_size)


def assert_same_detections(ours, reference, *, box_tolerance=BOX_TOLERANCE) -> None:
    """Per-image output dicts: same count, labels and order; boxes, scores
    and masks within the tolerances."""
    assert len(ours) == len(reference)
    for a, b in zip(ours, reference):
        assert len(b["boxes"]) > 0, "the test needs detections to compare"
        torch.testing.assert_close(a["labels"], b["labels"], rtol=0, atol=0)
        torch.testing.assert_close(a["boxes"], b["boxes"], **box_tolerance)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-6)
        torch.testing.assert_close(a["masks"], b["masks"], **MASK_TOLERANCE)


def assert_same_outputs(ours, reference, *, box_tolerance=BOX_TOLERANCE) -> None:
    """Outputs of two DeployableDetectors (eager, exported, compiled):
    counts and labels equal, the rest within the tolerances."""
    names = export.OUTPUT_NAMES
    for name, a, b in zip(names, ours, reference):
        a = torch.as_tensor(a)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        tolerance = box_tolerance if name == "boxes" else MASK_TOLERANCE if name in ("masks", "scores") else {}
        torch.testing.assert_close(a, b, **(tolerance or dict(rtol=0, atol=0)), msg=name)


@pytest.fixture(scope="module")
def eager_reference(model):
    """Eager per-image outputs and the padded outputs for a batch of three
    images of different sizes (not the traced ones)."""
    sizes = [(180, 120), (100, 160), (140, 140)]
    inputs = program_inputs(model, sizes, seed=2)
    with torch.no_grad():
        listed = model(random_images(sizes, seed=2))
        padded = export.DeployableDetector(model)(inputs.images, inputs.image_sizes)
    return inputs, listed, padded


# ------------------------------------------------------------ fixed size --


def test_padded_outputs_equal_the_per_image_outputs(model, eager_reference):
    inputs, listed, padded = eager_reference
    num_detections, boxes, scores, labels, masks = padded
    assert boxes.shape == (3, 10, 4) and masks.shape == (3, 10, 28, 28) and labels.dtype == torch.int64
    assert num_detections.tolist() == [len(d["boxes"]) for d in listed]
    assert_same_detections(export.detections_from_outputs(padded, inputs), listed)
    # Rows past the count are zeros.
    short = export.DeployableDetector(small_model_with(score_thresh=0.6))
    with torch.no_grad():
        counts, boxes, scores, labels, masks = short(inputs.images, inputs.image_sizes)
    for i, count in enumerate(counts.tolist()):
        assert count < 10
        assert boxes[i, count:].abs().sum() == 0 and scores[i, count:].abs().sum() == 0
        assert labels[i, count:].abs().sum() == 0 and masks[i, count:].abs().sum() == 0


def small_model_with(*, score_thresh: float) -> maskrcnn.MaskRCNN:
    model = small_model()
    model.roi_heads.score_thresh = score_thresh
    return model


def test_pasted_masks_mode(model, eager_reference):
    """paste_masks=True: uint8 masks [N, D, H, W] in the input's pixels,
    the eager pasted probabilities thresholded at 0.5."""
    inputs, _, padded = eager_reference
    with torch.no_grad():
        pasted = export.DeployableDetector(model, paste_masks=True)(inputs.images, inputs.image_sizes)
    masks = pasted[-1]
    assert masks.dtype == torch.uint8 and masks.shape == (3, 10, *inputs.images.shape[-2:])
    for i in range(3):
        height, width = inputs.image_sizes[i].tolist()
        expected = maskrcnn.paste_masks_in_image(padded[-1][i, :, None], padded[1][i], (height, width))[:, 0] > 0.5
        agree = (masks[i, :, :height, :width].bool() == expected).float().mean()
        assert agree > 0.9999  # pixels at 0.5 +- rounding may flip
        assert masks[i, :, height:].sum() == 0 and masks[i, :, :, width:].sum() == 0


# --------------------------------------------------------- torch.compile --


def test_compile_fullgraph_equals_eager_with_a_bounded_number_of_graphs(model, fresh_dynamo):
    """Zero graph breaks (fullgraph=True raises on one), and images of any
    size share a graph: the only size-dependent choice left is the one
    PyTorch's CPU convolution makes between backends on small inputs (a
    padded batch of at most 20 x 1024 pixels, e.g. 128 x 160), so single
    images make at most two graphs, and a list of two images one more."""
    # aot_eager: dynamo's graphs through AOTAutograd (fake tensors and
    # functionalization, as inductor takes them), without inductor's slow
    # code generation (benchmarks/deploy.py measures inductor).
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    sizes = TRACE_SIZES + [(170, 210), (90, 90), (210, 100), (120, 150)]
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        for i, size in enumerate(sizes):
            images = random_images([size], seed=10 + i)
            assert_same_detections(compiled(images), model(images))
        batch = random_images([(150, 200), (130, 170)], seed=30)
        assert_same_detections(compiled(batch), model(batch))
    graphs = len(torch._dynamo.eval_frame._debug_get_cache_entry_list(type(model).forward))
    assert 1 <= graphs <= 2 + 1, f"{graphs} graphs"


# ---------------------------------------------------------- torch.export --


@pytest.fixture(scope="module")
def program(model):
    return export.export_program(model)


def test_exported_program_equals_eager_on_other_sizes(model, program, eager_reference):
    inputs, listed, padded = eager_reference
    run = program.module()
    with torch.no_grad():
        assert_same_outputs(run(inputs.images, inputs.image_sizes), padded)
        single = program_inputs(model, [(97, 200)], seed=5)  # batch of one, 97 x 150 after resizing
        assert_same_outputs(run(single.images, single.image_sizes),
                            export.DeployableDetector(model)(single.images, single.image_sizes))


def test_exported_program_rejects_bad_input(model, program):
    run = program.module()
    sizes = torch.tensor([[128, 128]])
    with pytest.raises(Exception, match=r"size\(\)\[1\] == 3"):
        run(torch.rand(1, 4, 128, 128), sizes)
    with pytest.raises(Exception, match=r"size\(\)\[3\] <= 224"):
        run(torch.rand(1, 3, 128, 256), sizes)
    with pytest.raises(ValueError, match="empty batch"):
        export.check_program_inputs(torch.rand(0, 3, 128, 128), torch.zeros(0, 2, dtype=torch.int64), model=model)


# ----------------------------------------------------------- AOTInductor --


@pytest.fixture(scope="module")
def package(model, program, tmp_path_factory):
    """The AOTInductor package of the program (compiling takes minutes: once)."""
    return export.compile_package(model, tmp_path_factory.mktemp("aoti") / "small.pt2", program=program)


def test_aoti_package_in_a_process_without_maskrcnn(package, eager_reference, tmp_path):
    inputs, _, padded = eager_reference
    torch.save({"images": inputs.images, "image_sizes": inputs.image_sizes}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch, maskrcnn_ops\n"
        "runner = torch._inductor.aoti_load_package(sys.argv[1])\n"
        "inputs = torch.load(sys.argv[2], weights_only=True)\n"
        "outputs = runner(inputs['images'], inputs['image_sizes'])\n"
        "assert not any(name.split('.')[0] == 'maskrcnn' for name in sys.modules), 'maskrcnn was imported'\n"
        "torch.save(list(outputs), sys.argv[3])\n"
        "try:\n"  # the raw runner checks shapes when AOTI_RUNTIME_CHECK_INPUTS=1 (README)
        "    runner(torch.rand(1, 4, 128, 128), inputs['image_sizes'][:1])\n"
        "except Exception as error:\n"
        "    print('rejected:', error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(package), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], check=True, cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"})
    assert_same_outputs(torch.load(tmp_path / "outputs.pt", weights_only=True), padded,
                        box_tolerance=OTHER_BACKEND_BOX_TOLERANCE)
    assert "expected: 3, but got: 4" in done.stdout, done.stdout + done.stderr


def test_exported_detector_equals_the_model(model, package):
    """ExportedDetector (what `predict --exported` runs) on the package:
    the model's per-image outputs for a list of images."""
    images = random_images([(150, 200), (200, 130)], seed=7)
    detector = export.ExportedDetector(package)
    with torch.no_grad():
        assert_same_detections(detector(images), model(images), box_tolerance=OTHER_BACKEND_BOX_TOLERANCE)
    assert detector.num_classes == model.num_classes


# ------------------------------------------------------------------ ONNX --


def onnx_outputs(model, path, inputs, **kwargs):
    """export_onnx(model, path, **kwargs) (its progress messages silenced),
    run in onnxruntime on the program inputs: the outputs as numpy arrays."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        path = export.export_onnx(model, path, **kwargs)
    finally:
        logger.setLevel(level)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": inputs.images.numpy(), "image_sizes": inputs.image_sizes.numpy()})


def test_onnx_in_onnxruntime_equals_eager(model, program, eager_reference, tmp_path):
    inputs, _, padded = eager_reference
    outputs = onnx_outputs(model, tmp_path / "small.onnx", inputs, program=program)
    # onnxruntime's convolutions and matrix products sum in another order
    # than PyTorch's; box deltas scaled to pixels carry it (measured up to
    # 9.2e-5 px on batches of small images).
    assert_same_outputs([torch.from_numpy(o) for o in outputs], padded, box_tolerance=OTHER_BACKEND_BOX_TOLERANCE)


@pytest.mark.slow
def test_onnx_with_pasted_masks(model, eager_reference, tmp_path):
    """paste_masks=True to ONNX: paste_masks goes through its dense
    decomposition (maskrcnn_ops.onnx_decompositions); onnxruntime's uint8
    masks equal the eager program's except pixels at 0.5 +- rounding."""
    inputs, _, _ = eager_reference
    masks = onnx_outputs(model, tmp_path / "pasted.onnx", inputs, paste_masks=True)[-1]
    with torch.no_grad():
        expected = export.DeployableDetector(model, paste_masks=True)(inputs.images, inputs.image_sizes)[-1]
    assert masks.dtype == np.uint8 and masks.shape == tuple(expected.shape)
    assert (torch.from_numpy(masks) == expected).float().mean() > 0.9999


# ------------------------------------------------------------------- CLI --


def test_cli_export_then_predict_from_the_artifact(model, tmp_path, capsys):
    """`export --format onnx` then `predict --exported`: the same pictures'
    detections (COCO JSON) as `predict --weights`."""
    pytest.importorskip("onnxruntime")
    from maskrcnn.cli import main
    from PIL import Image

    weights = tmp_path / "small.pt"
    maskrcnn.save_checkpoint(weights, model)
    image = tmp_path / "in" / "picture.png"
    image.parent.mkdir()
    pixels = (random_images([(150, 200)], seed=8)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(image)
    artifact = tmp_path / "small.onnx"
    assert main(["export", "--weights", str(weights), "--format", "onnx", "--out", str(artifact)]) == 0
    assert artifact.is_file() and export.metadata_path(artifact).is_file()
    assert main(["predict", str(image), "--exported", str(artifact), "--out", str(tmp_path / "exported")]) == 0
    assert main(["predict", str(image), "--weights", str(weights), "--out", str(tmp_path / "eager")]) == 0
    assert (tmp_path / "exported" / "picture.png").is_file()
    ours = json.loads((tmp_path / "exported" / "detections.json").read_text())
    reference = json.loads((tmp_path / "eager" / "detections.json").read_text())
    assert len(ours["annotations"]) == len(reference["annotations"]) > 0
    for a, b in zip(ours["annotations"], reference["annotations"]):
        assert a["category_id"] == b["category_id"]
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["score"] == pytest.approx(b["score"], abs=1e-5)
    assert ours["categories"] == reference["categories"]


def test_cli_export_errors_are_one_line(model, tmp_path, capsys):
    from maskrcnn.cli import main

    weights = tmp_path / "small.pt"
    maskrcnn.save_checkpoint(weights, model)
    image = tmp_path / "picture.png"
    assert main(["export", "--weights", str(weights), "--format", "pt2", "--out", str(tmp_path / "x.onnx")]) == 1
    assert "must end in .pt2" in capsys.readouterr().err
    assert main(["predict", str(image), "--exported", str(tmp_path / "missing.pt2"), "--out", str(tmp_path / "o")]) == 1
    assert "exported model not found" in capsys.readouterr().err
    (tmp_path / "lone.onnx").write_bytes(b"")
    assert main(["predict", str(image), "--exported", str(tmp_path / "lone.onnx"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lone.onnx.json" in err
