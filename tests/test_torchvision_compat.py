"""torchvision's own contract for roi_align, RoIAlign, MultiScaleRoIAlign,
nms and batched_nms, kept while maskrcnn_ops.patch_torchvision() is active.

torchvision's test/test_ops.py (RoIAlign, MultiScaleRoIAlign and NMS classes)
exercises these functions in ways a detector's forward does not; each group
below covers one of them, checked against torchvision's unpatched functions:

  * empty input: batched_nms of no boxes returns an empty int64 tensor
    before it reads the other arguments (which may then be None);
  * exception types: boxes of the wrong shape raise AssertionError, as
    torchvision's torch._assert does;
  * TorchScript: torch.jit.script of the patched functions, of RoIAlign and
    MultiScaleRoIAlign modules, and of code that calls them, compiles and
    runs our kernels (gradients included);
  * torch.fx: the patched functions stay leaves of a symbolic trace;
  * torch.compile: the empty-input check does not break a graph whose box
    count is only known at run time.

tests/torchvision_suite.py runs torchvision's own test file both ways, given
a checkout of torchvision.
"""

from __future__ import annotations

import collections
import warnings
from collections import OrderedDict
from typing import List

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import maskrcnn_ops
from maskrcnn_ops.patch import torchvision_originals

# torch.jit.script is deprecated (a FutureWarning on every call since torch
# 2.10), but it is how many deployed torchvision models are saved.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def patched():
    """Every test runs with the patch active, and leaves it undone (tests
    that compare with torchvision's modules undo it for a while)."""
    yield maskrcnn_ops.patch_torchvision()
    maskrcnn_ops.unpatch_torchvision()
    assert not maskrcnn_ops.torchvision_is_patched()


def unpatched(call):
    """call() run on torchvision's own kernels."""
    maskrcnn_ops.unpatch_torchvision()
    try:
        return call()
    finally:
        maskrcnn_ops.patch_torchvision()


@pytest.fixture(scope="module")
def originals():
    return torchvision_originals()


class KernelCounter(TorchDispatchMode):
    """Counts the dispatcher operators that run, by namespace ("maskrcnn_ops",
    "torchvision", "aten"); scripted code dispatches through it as well."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.names: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.counts[name.split("::")[0]] += 1
        self.names[name] += 1
        return func(*args, **(kwargs or {}))


def features_and_boxes(dtype=torch.float32):
    """Features [2, 3, 12, 10] and three boxes on image 0, two on image 1, as
    a list of Tensor[L, 4] and as the equivalent Tensor[5, 5]."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 12, 10, generator=g, dtype=dtype)
    corner = torch.rand(5, 2, generator=g, dtype=dtype) * 6
    boxes = torch.cat([corner, corner + 1 + torch.rand(5, 2, generator=g, dtype=dtype) * 5], dim=1)
    per_image = [boxes[:3], boxes[3:]]
    rois = torch.cat([torch.tensor([[0.0]] * 3 + [[1.0]] * 2, dtype=dtype), boxes], dim=1)
    return features, per_image, rois


def boxes_and_scores(n=60, classes=3):
    g = torch.Generator().manual_seed(1)
    corner = torch.rand(n, 2, generator=g) * 50
    boxes = torch.cat([corner, corner + 5 + torch.rand(n, 2, generator=g) * 30], dim=1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, classes, (n,), generator=g)


# ------------------------------------------------------------ empty input --


EMPTY_BOXES = {
    "float [0]": torch.empty(0),
    "int64 [0]": torch.empty((0,), dtype=torch.int64),  # what torchvision's test passes
    "float [0, 4]": torch.empty(0, 4),
}


@pytest.mark.parametrize("boxes", list(EMPTY_BOXES.values()), ids=list(EMPTY_BOXES))
@pytest.mark.parametrize("where", ["torchvision.ops", "torchvision.ops.boxes"])
def test_batched_nms_of_no_boxes_ignores_the_other_arguments(boxes, where, originals):
    batched_nms = torchvision.ops.batched_nms if where == "torchvision.ops" else torchvision.ops.boxes.batched_nms
    expected = originals["batched_nms"](boxes, None, None, None)
    with KernelCounter() as counter:
        kept = batched_nms(boxes, None, None, None)
    assert kept.dtype == expected.dtype == torch.int64
    assert kept.shape == expected.shape == (0,)
    assert kept.device == boxes.device
    assert counter.counts["torchvision"] == 0


def test_batched_nms_of_no_boxes_with_real_arguments(originals):
    boxes, scores, idxs = torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.int64)
    kept = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    torch.testing.assert_close(kept, originals["batched_nms"](boxes, scores, idxs, 0.5), rtol=0, atol=0)


def test_nms_of_no_boxes(originals):
    boxes, scores = torch.empty(0, 4), torch.empty(0)
    torch.testing.assert_close(
        torchvision.ops.nms(boxes, scores, 0.5), originals["nms"](boxes, scores, 0.5), rtol=0, atol=0
    )


@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
def test_batched_nms_empty_check_keeps_a_data_dependent_graph_whole(fresh_dynamo):
    """Boxes selected by a score mask have a count known only at run time:
    the patched batched_nms must not guard on it (torchvision's own
    `boxes.numel() == 0` would stop a fullgraph compile there). The config
    is patched with its own API: monkeypatch and mock restore a config
    option by deleting it."""

    def confident_boxes_kept(boxes, scores, idxs):
        confident = scores > 0.4
        return torchvision.ops.batched_nms(boxes[confident], scores[confident], idxs[confident], 0.5)

    boxes, scores, idxs = boxes_and_scores()
    compiled = torch.compile(confident_boxes_kept, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(boxes, scores, idxs), confident_boxes_kept(boxes, scores, idxs))
    # No box above the threshold: the op itself answers with no indices.
    none_kept = compiled(boxes, scores * 0.1, idxs)
    assert none_kept.dtype == torch.int64 and none_kept.shape == (0,)


# ------------------------------------------------------- exception types --

WRONG_BOXES = {
    "Tensor[K, 4]": lambda: torch.tensor([[0.0, 0.0, 3.0, 3.0]]),
    "Tensor[K, 6]": lambda: torch.zeros(2, 6),
    "list of Tensor[L, 3]": lambda: [torch.tensor([[0.0, 0.0, 3.0]])],
    "list of Tensor[L, 5]": lambda: [torch.zeros(1, 4), torch.zeros(2, 5)],
}


@pytest.mark.parametrize("make_boxes", list(WRONG_BOXES.values()), ids=list(WRONG_BOXES))
def test_boxes_of_the_wrong_shape_raise_assertion_error(make_boxes, originals):
    """Code written against torchvision catches AssertionError here; ours is
    also a ValueError (the type maskrcnn_ops raised before)."""
    features = torch.rand(2, 1, 8, 8)
    with pytest.raises(AssertionError):
        originals["roi_align"](features, make_boxes(), output_size=(2, 2))
    with pytest.raises(AssertionError) as raised:
        torchvision.ops.roi_align(features, make_boxes(), output_size=(2, 2))
    assert isinstance(raised.value, maskrcnn_ops.BoxesShapeError) and isinstance(raised.value, ValueError)
    with pytest.raises(AssertionError):
        torchvision.ops.RoIAlign((2, 2), spatial_scale=1.0, sampling_ratio=-1)(features, make_boxes())


def test_nms_input_errors_are_runtime_errors():
    """torchvision's NMS kernel rejects these shapes with RuntimeError; so does ours."""
    for boxes, scores in [
        (torch.rand(4), torch.rand(3)),
        (torch.rand(3, 5), torch.rand(3)),
        (torch.rand(3, 4), torch.rand(3, 2)),
        (torch.rand(3, 4), torch.rand(4)),
    ]:
        with pytest.raises(RuntimeError):
            torchvision.ops.nms(boxes, scores, 0.5)


# ------------------------------------------------------------ TorchScript --


@pytest.mark.parametrize("form", ["list", "tensor"])
@pytest.mark.parametrize("output_size", [3, [3, 2]], ids=["int", "list"])
def test_scripted_roi_align(form, output_size, originals):
    features, per_image, rois = features_and_boxes()
    boxes = per_image if form == "list" else rois
    scripted = torch.jit.script(torchvision.ops.roi_align)
    with KernelCounter() as counter:
        result = scripted(features, boxes, output_size, 0.5, 2, True)
    assert counter.names["maskrcnn_ops::roi_align"] == 1 and counter.counts["torchvision"] == 0
    expected = originals["roi_align"](features, boxes, output_size, 0.5, 2, True)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


def test_scripted_roi_align_gradients():
    """What torchvision's test_backward checks on the scripted function."""
    features = torch.rand(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    features.requires_grad_()
    rois = torch.tensor([[0, 0, 0, 4, 4], [0, 0, 2, 3, 4], [1, 1, 1, 5, 3.5]], dtype=torch.float64)
    scripted = torch.jit.script(torchvision.ops.roi_align)
    assert torch.autograd.gradcheck(lambda x: scripted(x, rois, 2, 1.0, 1), (features,), atol=1e-5)


def test_scripted_roi_align_rejects_wrong_boxes():
    scripted = torch.jit.script(torchvision.ops.roi_align)
    # TorchScript raises its own error type for every exception (torchvision's too).
    with pytest.raises(torch.jit.Error, match=r"\[K, 5\]"):
        scripted(torch.rand(1, 1, 8, 8), torch.zeros(1, 4), [2, 2])


class PerImageBoxes(torch.nn.Module):
    """Passes boxes to a pooler as List[Tensor] (torchvision's test_jit_boxes_list)."""

    def __init__(self, pool: torch.nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, features: torch.Tensor, boxes: List[torch.Tensor]) -> torch.Tensor:
        return self.pool(features, boxes)


@pytest.mark.parametrize("output_size", [3, (3, 2), [3, 2]], ids=["int", "tuple", "list"])
def test_scripted_roi_align_module(output_size, originals):
    layer = torchvision.ops.RoIAlign(output_size, spatial_scale=0.5, sampling_ratio=-1)
    features, per_image, _ = features_and_boxes()
    scripted = torch.jit.script(PerImageBoxes(layer))
    with KernelCounter() as counter:
        result = scripted(features, per_image)
    assert counter.names["maskrcnn_ops::roi_align"] == 1 and counter.counts["torchvision"] == 0
    torch.testing.assert_close(
        result, originals["roi_align"](features, per_image, output_size, 0.5, -1), rtol=1e-5, atol=1e-6
    )


def test_scripted_nms_and_batched_nms(originals):
    boxes, scores, idxs = boxes_and_scores()
    nms, batched_nms = torch.jit.script(torchvision.ops.nms), torch.jit.script(torchvision.ops.batched_nms)
    with KernelCounter() as counter:
        kept = nms(boxes, scores, 0.5)
        kept_per_class = batched_nms(boxes, scores, idxs, 0.5)
        kept_of_none = batched_nms(boxes[:0], scores[:0], idxs[:0], 0.5)
    assert counter.counts["torchvision"] == 0 and counter.counts["maskrcnn_ops"] == 2
    torch.testing.assert_close(kept, originals["nms"](boxes, scores, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(kept_per_class, originals["batched_nms"](boxes, scores, idxs, 0.5), rtol=0, atol=0)
    assert kept_of_none.dtype == torch.int64 and kept_of_none.shape == (0,)


def _pyramid():
    g = torch.Generator().manual_seed(2)
    return OrderedDict((str(k), torch.randn(2, 4, 32 >> k, 40 >> k, generator=g)) for k in range(4))


def test_scripted_multiscale_roi_align_runs_the_fused_kernel():
    g = torch.Generator().manual_seed(3)
    corner = torch.rand(12, 2, generator=g) * 80
    boxes = torch.cat([corner, corner + 4 + torch.rand(12, 2, generator=g) * 60], dim=1)
    per_image, shapes = [boxes[:7], boxes[7:]], [(128, 160), (120, 150)]
    pyramid = _pyramid()
    pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 5, 2)
    expected = unpatched(lambda: pooler(pyramid, per_image, shapes))

    scripted = torch.jit.script(torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 5, 2))
    with KernelCounter() as counter:
        result = scripted(pyramid, per_image, shapes)
    assert counter.names["maskrcnn_ops::multi_level_roi_align"] == 1
    assert counter.counts["torchvision"] == 0
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


def test_code_scripted_while_patched_keeps_our_kernels(patched):
    scripted = torch.jit.script(torchvision.ops.nms)
    boxes, scores, _ = boxes_and_scores()
    patched.undo()
    with KernelCounter() as counter:
        scripted(boxes, scores, 0.5)
    assert counter.names["maskrcnn_ops::nms"] == 1 and counter.counts["torchvision"] == 0


@pytest.mark.slow
def test_scripted_torchvision_mask_rcnn(originals):
    """A whole detector scripted while patched (how torchvision models are
    often deployed): same detections as torchvision's eager model."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=160, box_score_thresh=0.0,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_detections_per_img=5,
    ).eval()
    images = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        expected = unpatched(lambda: model(images))
        scripted = torch.jit.script(model)
        with KernelCounter() as counter, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "RCNN always returns a (Losses, Detections) tuple in scripting"
            _, result = scripted(images)
    assert counter.counts["torchvision"] == 0
    assert counter.names["maskrcnn_ops::multi_level_roi_align"] == 2  # box and mask heads
    assert counter.names["maskrcnn_ops::batched_nms"] >= 2  # RPN and detections
    assert torch.equal(result[0]["labels"], expected[0]["labels"])
    for name in ("boxes", "scores", "masks"):
        torch.testing.assert_close(result[0][name], expected[0][name], rtol=1e-5, atol=1e-4, msg=name)


# --------------------------------------------------------------- torch.fx --


def test_fx_trace_keeps_the_patched_roi_align_a_leaf():
    layer = torchvision.ops.RoIAlign(3, spatial_scale=1.0, sampling_ratio=2)
    graph_module = torch.fx.symbolic_trace(layer)
    calls = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
    assert calls == [torchvision.ops.roi_align]
    features, _, rois = features_and_boxes()
    with KernelCounter() as counter:
        traced = graph_module(features, rois)
    assert counter.names["maskrcnn_ops::roi_align"] == 1
    torch.testing.assert_close(traced, layer(features, rois), rtol=0, atol=0)
