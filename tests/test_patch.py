"""Tests of maskrcnn_ops.patch_torchvision: torchvision's RoIAlign,
MultiScaleRoIAlign and NMS on our kernels, unchanged code.

What is checked:
  * coverage: every binding of torchvision's functions in torchvision's
    modules is rebound (against a checked table), and every Python caller of
    the torchvision kernels in torchvision's source is one we replace;
  * our kernels run (and torchvision's do not) while patched, for the
    functions, the module classes (instances built before the patch) and the
    detection models; the reverse after unpatching;
  * unpatching restores every rebound name to the identical object, also in
    modules imported while patched; idempotence and nesting;
  * signatures and accepted inputs are torchvision's (quantized inputs fall
    back to torchvision's kernels);
  * torchvision's Faster, Mask and Keypoint R-CNN (seeded random weights)
    give the same detections and training losses (and, for Mask R-CNN, the
    same gradients) with and without the patch.
"""

from __future__ import annotations

import ast
import collections
import inspect
import pathlib
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection import (
    fasterrcnn_resnet50_fpn,
    keypointrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn,
)

import maskrcnn_ops
from maskrcnn_ops.patch import torchvision_originals

# Every binding of torchvision's functions inside torchvision 0.29, found by
# scanning its modules and checked by hand against the source. A new
# torchvision that binds them elsewhere fails test_rebinds_the_known_table
# (the patch rebinds such a name anyway; the table is there to be reviewed).
TORCHVISION_BINDINGS = {
    ("torchvision.ops", "roi_align"),
    ("torchvision.ops.roi_align", "roi_align"),  # RoIAlign.forward calls this one
    ("torchvision.ops.poolers", "roi_align"),
    ("torchvision.models.detection.roi_heads", "roi_align"),  # mask targets
    ("torchvision.ops", "nms"),
    ("torchvision.ops.boxes", "nms"),
    ("torchvision.ops", "batched_nms"),
    ("torchvision.ops.boxes", "batched_nms"),  # RPN and RoI heads: box_ops.batched_nms
    ("torchvision.ops.poolers", "_multiscale_roi_align"),  # MultiScaleRoIAlign.forward
}

# Python functions in torchvision's source that call its RoIAlign / NMS
# kernels (torch.ops.torchvision.*) directly: the two we replace, and the
# autocast kernels registered with the dispatcher, which only run inside
# torchvision's own operators (never reached once the callers are patched).
# The functions we replace; torchvision 0.29's Python autocast kernels also
# call the ops (they run under the dispatcher, not in place of our functions;
# torchvision 0.26 has them in C++).
REPLACED_CALLERS = {("ops/roi_align.py", "roi_align"), ("ops/boxes.py", "nms")}
KERNEL_CALLERS = REPLACED_CALLERS | {
    ("_autograd_registrations.py", "_autocast_nms"),
    ("_autograd_registrations.py", "_autocast_roi_align"),
}


class OpCounter(TorchDispatchMode):
    """Counts the dispatcher operators that run, by name
    ("maskrcnn_ops::roi_align", "torchvision::nms", ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    def by_namespace(self, namespace: str) -> int:
        return sum(n for name, n in self.counts.items() if name.startswith(namespace + "::"))


@pytest.fixture(autouse=True)
def _never_leave_torchvision_patched():
    """Other test files compare against torchvision: no patch may outlive a test."""
    yield
    maskrcnn_ops.unpatch_torchvision()
    assert not maskrcnn_ops.torchvision_is_patched()


def bindings_of(objects) -> dict:
    """(module name, attribute) -> object, for every attribute of every loaded
    module that is one of `objects` (by identity)."""
    wanted = {id(o) for o in objects}
    found = {}
    for name, module in list(sys.modules.items()):
        if not isinstance(module, types.ModuleType):
            continue
        for attribute, value in list(vars(module).items()):
            if id(value) in wanted:
                found[(name, attribute)] = value
    return found


def random_boxes(n: int, *, size: float, generator: torch.Generator) -> torch.Tensor:
    """[n, 4] valid (x1, y1, x2, y2) boxes inside [0, size]^2, sides 2 to size/2."""
    corner = torch.rand(n, 2, generator=generator) * size / 2
    sides = 2 + torch.rand(n, 2, generator=generator) * (size / 2 - 2)
    return torch.cat([corner, corner + sides], dim=1)


# -------------------------------------------------------------- coverage --


def test_rebinds_the_known_table():
    originals = torchvision_originals().values()
    patch = maskrcnn_ops.patch_torchvision()
    rebound = {(r.module, r.attribute) for r in patch.rebindings if r.module.startswith("torchvision")}
    assert rebound == TORCHVISION_BINDINGS
    # And nothing in torchvision still holds an original.
    assert [key for key in bindings_of(originals) if key[0].startswith("torchvision")] == []


def test_every_kernel_caller_in_torchvision_is_known():
    """A torchvision function that called torch.ops.torchvision.roi_align/nms
    directly, other than the ones we replace, would bypass the patch."""
    root = pathlib.Path(torchvision.__file__).parent
    callers = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr in ("roi_align", "nms")
                    and ast.unparse(node.value) == "torch.ops.torchvision"
                ):
                    callers.add((path.relative_to(root).as_posix(), function.name))
    assert REPLACED_CALLERS <= callers, "the scan no longer finds the functions we replace"
    assert callers <= KERNEL_CALLERS, f"unknown callers: {callers - KERNEL_CALLERS}"


def test_module_classes_are_served_by_patched_functions():
    """RoIAlign and MultiScaleRoIAlign are not swapped: their forward must
    name a global that the patch rebinds, in the module that defines them."""
    rebound = {(r.module, r.attribute) for r in maskrcnn_ops.patch_torchvision().rebindings}
    for cls, name in [
        (torchvision.ops.RoIAlign, "roi_align"),
        (torchvision.ops.MultiScaleRoIAlign, "_multiscale_roi_align"),
    ]:
        assert name in cls.forward.__code__.co_names
        assert (cls.__module__, name) in rebound


# ------------------------------------------------- which kernels really run --


def _pyramid(generator):
    """A 4-level FPN-like pyramid for 2 images of 128x160, 8 channels."""
    return OrderedDict(
        (str(level), torch.randn(2, 8, 32 >> level, 40 >> level, generator=generator)) for level in range(4)
    )


def _entry_points():
    """(name, callable with no arguments) for each public way into the ops.
    Modules are built here, before any patch, so the tests show that
    existing instances switch kernels."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 32, 40, generator=g)
    boxes = [random_boxes(6, size=128, generator=g), random_boxes(5, size=128, generator=g)]
    scores = torch.rand(11, generator=g)
    classes = torch.randint(0, 3, (11,), generator=g)
    pyramid = _pyramid(g)
    roi_align_module = torchvision.ops.RoIAlign(output_size=7, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    multiscale = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    masks = (torch.rand(6, 128, 128, generator=g) > 0.5).to(torch.float32)
    from torchvision.models.detection import roi_heads

    return {
        "roi_align": lambda: torchvision.ops.roi_align(features, boxes, 7, 0.25, 2, True),
        "RoIAlign": lambda: roi_align_module(features, boxes),
        "nms": lambda: torchvision.ops.nms(torch.cat(boxes), scores, 0.5),
        "batched_nms": lambda: torchvision.ops.batched_nms(torch.cat(boxes), scores, classes, 0.5),
        "box_ops.batched_nms": lambda: torchvision.ops.boxes.batched_nms(torch.cat(boxes), scores, classes, 0.5),
        "MultiScaleRoIAlign": lambda: multiscale(pyramid, boxes, [(128, 160), (120, 150)]),
        "project_masks_on_boxes": lambda: roi_heads.project_masks_on_boxes(
            masks, boxes[0], torch.arange(6), 28
        ),
    }


@pytest.mark.parametrize("entry", list(_entry_points()))
def test_our_kernels_run_only_while_patched(entry):
    call = _entry_points()[entry]
    with OpCounter() as before:
        expected = call()
    with maskrcnn_ops.patched_torchvision(), OpCounter() as patched:
        result = call()
    with OpCounter() as after:
        again = call()

    assert before.by_namespace("torchvision") > 0 and before.by_namespace("maskrcnn_ops") == 0
    assert patched.by_namespace("maskrcnn_ops") > 0 and patched.by_namespace("torchvision") == 0, patched.counts
    assert after.by_namespace("torchvision") == before.by_namespace("torchvision")
    assert after.by_namespace("maskrcnn_ops") == 0
    # Same results. RoIAlign sums a bin's samples in another order than
    # torchvision (a few float32 ulps apart); NMS keeps exactly the same boxes.
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def _pool_plain_then_patched(pooler, pyramid, boxes) -> OpCounter:
    """Pools with torchvision, then patched; checks that both agree and
    returns the operators the patched call ran."""
    expected = pooler(pyramid, boxes, [(128, 160)])
    with maskrcnn_ops.patched_torchvision(), OpCounter() as counter:
        result = pooler(pyramid, boxes, [(128, 160)])
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)
    return counter


def test_multiscale_uses_one_fused_launch():
    g = torch.Generator().manual_seed(1)
    boxes = [random_boxes(40, size=128, generator=g), random_boxes(30, size=128, generator=g)]
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=(7, 5), sampling_ratio=0)
    counter = _pool_plain_then_patched(pooler, _pyramid(g), boxes)
    assert counter.counts["maskrcnn_ops::multi_level_roi_align"] == 1
    assert counter.counts["maskrcnn_ops::roi_align"] == 0


def test_multiscale_with_a_custom_level_mapper_keeps_torchvision_loop():
    """A mapper the fused kernel does not implement (here another eps) runs
    torchvision's per-level loop, on our roi_align."""
    from torchvision.ops.poolers import LevelMapper

    g = torch.Generator().manual_seed(2)
    pyramid = _pyramid(g)
    boxes = [random_boxes(20, size=128, generator=g)] * 2
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    pooler(pyramid, boxes, [(128, 160)])  # infers the scales and builds the mapper
    pooler.map_levels = LevelMapper(2, 5, canonical_scale=224, canonical_level=4, eps=1e-3)
    counter = _pool_plain_then_patched(pooler, pyramid, boxes)
    assert counter.counts["maskrcnn_ops::multi_level_roi_align"] == 0
    assert counter.counts["maskrcnn_ops::roi_align"] == 4


def test_training_gradients_through_the_poolers_are_torchvisions():
    """What a detector's backward sees: gradients of torchvision's
    MultiScaleRoIAlign (fused backward) and RoIAlign w.r.t. the features."""
    g = torch.Generator().manual_seed(6)
    pyramid = _pyramid(g)
    boxes = [random_boxes(30, size=128, generator=g), random_boxes(20, size=128, generator=g)]
    multiscale = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    roi_align = torchvision.ops.RoIAlign(output_size=14, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    upstream_multiscale = torch.randn(50, 8, 7, 7, generator=g)
    upstream_single = torch.randn(50, 8, 14, 14, generator=g)

    def gradients():
        leaves = OrderedDict((name, f.clone().requires_grad_()) for name, f in pyramid.items())
        pooled = multiscale(leaves, boxes, [(128, 160)])
        single = roi_align(leaves["0"], boxes)
        torch.autograd.backward([pooled, single], [upstream_multiscale, upstream_single])
        return [leaf.grad for leaf in leaves.values()]

    expected = gradients()
    with maskrcnn_ops.patched_torchvision():
        result = gradients()
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------ undo, idempotence --


def test_unpatch_restores_every_binding_to_the_identical_object():
    originals = list(torchvision_originals().values())
    before = bindings_of(originals)
    patch = maskrcnn_ops.patch_torchvision()
    assert set(before) <= {(r.module, r.attribute) for r in patch.rebindings}
    assert bindings_of(originals) == {}
    maskrcnn_ops.unpatch_torchvision()
    after = bindings_of(originals)
    assert after.keys() == before.keys()
    assert all(after[key] is before[key] for key in before)
    assert bindings_of(patch.replacements.values()) == {}


def _import_module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    sys.modules[name] = module
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)
    return module


# detectron2/layers/roi_align.py and nms.py bind torchvision's functions this way.
DETECTRON2_LIKE_SOURCE = """
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops import nms
roi_align = tv_roi_align
"""


def test_modules_imported_while_patched_get_torchvision_back():
    originals = torchvision_originals()
    try:
        with maskrcnn_ops.patched_torchvision() as patch:
            late = _import_module("_late_importer", DETECTRON2_LIKE_SOURCE)
            assert late.roi_align is patch.replacements["roi_align"]
        assert late.roi_align is originals["roi_align"] and late.tv_roi_align is originals["roi_align"]
        assert late.nms is originals["nms"]
    finally:
        sys.modules.pop("_late_importer", None)


@pytest.mark.parametrize("beyond_torchvision", [True, False])
def test_modules_outside_torchvision(beyond_torchvision):
    originals = torchvision_originals()
    try:
        user = _import_module("_detectron2_like", DETECTRON2_LIKE_SOURCE)
        with maskrcnn_ops.patched_torchvision(beyond_torchvision=beyond_torchvision) as patch:
            replaced = patch.replacements
            assert torchvision.ops.roi_align is replaced["roi_align"]
            if beyond_torchvision:
                assert user.roi_align is replaced["roi_align"] and user.tv_roi_align is replaced["roi_align"]
                assert user.nms is replaced["nms"]
            else:
                assert user.roi_align is originals["roi_align"] and user.nms is originals["nms"]
        assert user.roi_align is originals["roi_align"] and user.nms is originals["nms"]
    finally:
        sys.modules.pop("_detectron2_like", None)


def test_patch_is_idempotent_and_nests():
    first = maskrcnn_ops.patch_torchvision()
    count = len(first.rebindings)
    assert maskrcnn_ops.patch_torchvision() is first
    assert len(first.rebindings) == count
    with maskrcnn_ops.patched_torchvision() as inner:
        assert inner is first
    assert maskrcnn_ops.torchvision_is_patched()  # the outer patch survives the block
    maskrcnn_ops.unpatch_torchvision()
    maskrcnn_ops.unpatch_torchvision()  # a second undo does nothing
    first.undo()
    assert not maskrcnn_ops.torchvision_is_patched()
    assert torchvision.ops.nms is torchvision_originals()["nms"]
    # A new patch after undo starts afresh.
    second = maskrcnn_ops.patch_torchvision()
    assert second is not first and len(second.rebindings) == count


def test_patched_block_undoes_on_error():
    with pytest.raises(RuntimeError, match="inside"):
        with maskrcnn_ops.patched_torchvision():
            raise RuntimeError("inside")
    assert not maskrcnn_ops.torchvision_is_patched()
    assert torchvision.ops.roi_align is torchvision_originals()["roi_align"]


def test_undo_leaves_someone_elses_rebinding_alone():
    original = torchvision_originals()["nms"]

    def their_nms(boxes, scores, iou_threshold):
        return original(boxes, scores, iou_threshold)

    try:
        maskrcnn_ops.patch_torchvision()
        torchvision.ops.nms = their_nms
        maskrcnn_ops.unpatch_torchvision()
        assert torchvision.ops.nms is their_nms
        assert torchvision.ops.boxes.nms is original
    finally:
        torchvision.ops.nms = original


# ------------------------------------------------ torchvision's interface --


def _parameters(function):
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (maskrcnn_ops.roi_align, torchvision.ops.roi_align),
        (maskrcnn_ops.nms, torchvision.ops.nms),
        (maskrcnn_ops.batched_nms, torchvision.ops.batched_nms),
        (maskrcnn_ops.RoIAlign.__init__, torchvision.ops.RoIAlign.__init__),
        (maskrcnn_ops.RoIAlign.forward, torchvision.ops.RoIAlign.forward),
        (maskrcnn_ops.MultiScaleRoIAlign.__init__, torchvision.ops.MultiScaleRoIAlign.__init__),
        (maskrcnn_ops.MultiScaleRoIAlign.forward, torchvision.ops.MultiScaleRoIAlign.forward),
    ],
    ids=lambda f: f.__qualname__,
)
def test_signatures_are_torchvisions(ours, theirs):
    assert _parameters(ours) == _parameters(theirs)


def test_adapters_have_torchvisions_signatures():
    originals = torchvision_originals()
    with maskrcnn_ops.patched_torchvision() as patch:
        for name, adapter in patch.replacements.items():
            assert _parameters(adapter) == _parameters(originals[name]), name
            assert adapter.__name__ == originals[name].__name__
        # mmcv's RoIAlign(use_torchvision=True) probes this before passing `aligned`.
        assert "aligned" in torchvision.ops.roi_align.__code__.co_varnames


def test_patched_roi_align_takes_every_form_torchvision_takes():
    original = torchvision_originals()["roi_align"]
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 4, 16, 20, generator=g)
    per_image = [random_boxes(3, size=64, generator=g), random_boxes(2, size=64, generator=g)]
    rois = torch.cat([torch.tensor([[0.0]] * 3 + [[1.0]] * 2), torch.cat(per_image)], dim=1)
    forms = [
        dict(input=features, boxes=per_image, output_size=5, spatial_scale=0.25),
        dict(input=features, boxes=tuple(per_image), output_size=(5, 3), spatial_scale=0.25, sampling_ratio=2),
        dict(input=features, boxes=rois, output_size=[4, 6], spatial_scale=0.25, sampling_ratio=0, aligned=True),
    ]
    with maskrcnn_ops.patched_torchvision():
        for kwargs in forms:
            torch.testing.assert_close(
                torchvision.ops.roi_align(**kwargs), original(**kwargs), rtol=1e-5, atol=1e-6
            )
        positional = torchvision.ops.roi_align(features, rois, 5, 0.25, 2, True)
    torch.testing.assert_close(positional, original(features, rois, 5, 0.25, 2, True), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_inputs_run_on_torchvisions_kernels():
    originals = torchvision_originals()
    g = torch.Generator().manual_seed(4)
    features = torch.quantize_per_tensor(torch.rand(1, 3, 16, 16, generator=g), 0.01, 0, torch.quint8)
    rois = torch.quantize_per_tensor(
        torch.cat([torch.zeros(4, 1), random_boxes(4, size=16, generator=g)], dim=1), 0.125, 0, torch.quint8
    )
    boxes = torch.quantize_per_tensor(random_boxes(8, size=16, generator=g), 0.125, 0, torch.quint8)
    scores = torch.quantize_per_tensor(torch.rand(8, generator=g), 0.01, 0, torch.quint8)
    with maskrcnn_ops.patched_torchvision(), OpCounter() as counter:
        pooled = torchvision.ops.roi_align(features, rois, 3)
        kept = torchvision.ops.nms(boxes, scores, 0.5)
    assert counter.by_namespace("maskrcnn_ops") == 0
    assert torch.equal(pooled.int_repr(), originals["roi_align"](features, rois, 3).int_repr())
    assert torch.equal(kept, originals["nms"](boxes, scores, 0.5))


# ----------------------------------------------- torchvision's detectors --

# Small enough for a 2-core CPU: 160..256 px images, few proposals and
# detections (the keypoint head costs ~4 GFLOP per detection); score
# threshold 0 so that random-weight models detect something.
MODEL_OPTIONS = dict(
    weights=None,
    weights_backbone=None,
    min_size=160,
    max_size=256,
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=100,
    box_batch_size_per_image=64,
    box_detections_per_img=8,
    box_score_thresh=0.0,
)
MODELS = {
    "faster_rcnn": fasterrcnn_resnet50_fpn,
    "mask_rcnn": maskrcnn_resnet50_fpn,
    "keypoint_rcnn": keypointrcnn_resnet50_fpn,
}

# Detections and losses: our RoIAlign sums the samples of a bin in another
# order than torchvision, so pooled features differ by a few float32 ulps
# (measured: at most 5e-7 on N(0, 1) features); the random-weight heads carry
# that into the outputs (measured: boxes within 2e-4 px of ~200, scores within
# 2e-6, mask probabilities within 4e-5, keypoint logits within 2e-4 of ~80,
# losses within 2e-6 of ~8). rtol 1e-5 is some 100 ulps; atol covers values
# near zero. Labels and the number of detections must match exactly.
OUTPUT_TOLERANCE = dict(rtol=1e-5, atol=1e-4)


def _images_and_targets(kind: str):
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 160, 192, generator=g), torch.rand(3, 176, 160, generator=g)]
    targets = []
    for image in images:
        height, width = image.shape[1:]
        boxes = torch.tensor([[10.0, 20.0, 100.0, 140.0], [60.0, 30.0, 150.0, 110.0], [5.0, 5.0, 60.0, 60.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 1, 1])}
        if kind == "mask_rcnn":
            masks = torch.zeros(3, height, width, dtype=torch.uint8)
            for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
                masks[i, y1 + 5 : y2 - 5, x1 + 5 : x2 - 5] = 1
            target["masks"] = masks
        if kind == "keypoint_rcnn":
            fractions = torch.rand(3, 17, 2, generator=g)
            low, high = boxes[:, None, :2], boxes[:, None, 2:]
            visible = torch.ones(3, 17, 1)
            target["keypoints"] = torch.cat([low + fractions * (high - low), visible], dim=2)
        targets.append(target)
    return images, targets


def _run(model, images, targets, *, train: bool):
    """Eval: the detections. Train: the losses (the samplers draw random
    numbers, so the global RNG is seeded the same before each run)."""
    torch.manual_seed(1)
    if train:
        model.train()
        return model(images, targets)
    model.eval()
    with torch.no_grad():
        return model(images)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_torchvision_detector_unchanged_under_patch(kind, train):
    torch.manual_seed(0)
    model = MODELS[kind](**MODEL_OPTIONS)
    images, targets = _images_and_targets(kind)

    expected = _run(model, images, targets, train=train)
    with maskrcnn_ops.patched_torchvision(), OpCounter() as patched:
        result = _run(model, images, targets, train=train)

    assert patched.by_namespace("torchvision") == 0, patched.counts
    # Box pooling (and mask or keypoint pooling) in one fused launch per head.
    heads = 1 if kind == "faster_rcnn" else 2
    assert patched.counts["maskrcnn_ops::multi_level_roi_align"] == heads
    assert patched.counts["maskrcnn_ops::batched_nms"] > 0
    if train:
        assert result.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(result[name], expected[name], **OUTPUT_TOLERANCE, msg=name)
    else:
        assert len(result) == len(expected) == len(images)
        for ours, theirs in zip(result, expected):
            assert ours.keys() == theirs.keys()
            assert torch.equal(ours["labels"], theirs["labels"])
            for name in theirs:
                torch.testing.assert_close(ours[name], theirs[name], **OUTPUT_TOLERANCE, msg=name)
