"""Other runtimes' versions of our ops, as peers in the benchmark suite:
ONNX Runtime (an ONNX graph built with ``onnx.helper``) and OpenVINO (a
graph built with its opset API, or, for its ExperimentalDetectron ops that
the Python opsets do not expose, an ONNX graph in its
``org.openvinotoolkit`` domain read by its ONNX frontend), both on the CPU.

Each ``<family>_<peer>`` function builds and compiles its graph once (not
timed) and returns a zero-argument callable that runs it on the case's
inputs and returns the result in the form of our op's, so that the suite
compares both with one check. The callable includes what the peer needs on
every call: torch -> numpy views, copies of non-contiguous inputs, the
layout it takes (dense per-class scores for batched NMS) and back.

Both runtimes get our thread count (``torch.get_num_threads()``) and one
stream: ONNX Runtime ``intra_op_num_threads`` N, ``inter_op_num_threads`` 1;
OpenVINO ``INFERENCE_NUM_THREADS`` N, the latency hint, and float32
inference (its CPU plugin would otherwise run bf16 where the CPU has it),
bfloat16 for the bfloat16 RoIAlign and NMS rows (the half-precision peer:
ONNX Runtime's CPU RoiAlign takes float and double only, its
NonMaxSuppression float only).

Semantics, measured against our ops (see the suite's agree columns):

- RoIAlign aligned=True is ONNX RoiAlign-16 ``coordinate_transformation_mode
  ="half_pixel"`` and OpenVINO ROIAlign-9 ``aligned_mode="half_pixel_for_nn"``
  (x * scale - 0.5). OpenVINO's ``"half_pixel"`` maps x to (x + 0.5) * scale
  - 0.5 (the same as torchvision on boxes moved by +0.5 px: differences up to
  0.66 on N(0, 1) features), its default ``"asymmetric"`` is aligned=False.
- Multi-level RoIAlign (torchvision's MultiScaleRoIAlign: aligned=False,
  levels floor(4 + log2(sqrt(area) / 224)) clamped to P2-P5) is OpenVINO's
  ExperimentalDetectronROIFeatureExtractor with ``aligned=0`` and pyramid
  scales = strides; it pools one image, so the graph has one per image.
  Same results on the benchmark's boxes, but its level formula is
  Detectron's, floor(4 + log2(sqrt(area) / 224 + 1e-6)), with the 1e-6
  inside the log where ours (torchvision's) adds it outside: a box whose
  side is within about 2e-6 (relative) below 112, 224 or 448 px goes one
  level up there (11 of 303 boxes placed at such boundaries, differences up
  to 1.8 on N(0, 1) features; no random box comes that close).
- NMS is NonMaxSuppression (ONNX, OpenVINO-9), corners, all boxes kept,
  suppressing above an IoU of ``iou``; batched NMS uses its per-class scores
  [1, classes, N] with -inf outside each box's class and a score threshold
  that drops those. OpenVINO also suppresses where the float32 IoU equals
  the float32 threshold (ours and torchvision need it above the threshold):
  random float32 boxes never meet that, boxes rounded to bfloat16 do for a
  few pairs (ours with the threshold one float32 step lower gives
  OpenVINO's set, in float32 and bfloat16).
- Proposals: OpenVINO's ExperimentalDetectronGenerateProposalsSingleImage,
  the one-level, one-image form of ours (top-k, decode, clip, min size, NMS,
  top-k); see ``proposals_openvino`` for where it differs.
"""

from __future__ import annotations

import importlib.util
import io
import math
from typing import Callable, List, Sequence

import numpy as np
import torch

PEERS = ("openvino", "onnxruntime")
LABELS = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime"}
ONNX_OPSET = 16
OPENVINO_DOMAIN = "org.openvinotoolkit"


def available() -> List[str]:
    """The peers whose packages are installed (ONNX Runtime needs onnx to
    build its graphs)."""
    needs = {"openvino": ("openvino", "onnx"), "onnxruntime": ("onnxruntime", "onnx")}
    return [peer for peer in PEERS if all(importlib.util.find_spec(m) is not None for m in needs[peer])]


def numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A C-contiguous numpy array of a CPU tensor: a view when it is
    contiguous, else a copy (e.g. channels-last features)."""
    return np.ascontiguousarray(tensor.detach().numpy())


# ------------------------------------------------------------ graph building


def _onnx_model(nodes, inputs, outputs, domains=()):
    """An in-memory ONNX model; inputs/outputs are (name, element type,
    shape) with None or names for dynamic dimensions."""
    from onnx import helper

    graph = helper.make_graph(
        nodes, "peer",
        [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in inputs],
        [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in outputs],
    )
    opsets = [helper.make_opsetid("", ONNX_OPSET)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


def onnxruntime_session(model):
    """An ONNX Runtime CPU session with our thread count."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def openvino_compile(model, precision: str = "f32"):
    """An OpenVINO model (or an ONNX model, read by OpenVINO's ONNX
    frontend) compiled for the CPU with our thread count, inference in
    `precision` ("f32" or "bf16")."""
    import openvino

    core = openvino.Core()
    if not isinstance(model, openvino.Model):
        model = core.read_model(io.BytesIO(model.SerializeToString()))
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": precision}
    return core.compile_model(model, "CPU", config)


# ------------------------------------------------------------------ RoIAlign


def _split_rois(rois: torch.Tensor):
    """[K, 5] (batch index, x1, y1, x2, y2) -> boxes [K, 4], indices [K]."""
    return rois[:, 1:].contiguous(), rois[:, 0]


def roi_align_onnxruntime(features, rois, output: int, spatial_scale: float, sampling_ratio: int) -> Callable:
    """ONNX RoiAlign-16, half_pixel (= aligned=True): features [N, C, H, W],
    rois [K, 5] -> [K, C, output, output]."""
    from onnx import TensorProto, helper

    node = helper.make_node("RoiAlign", ["x", "boxes", "batch"], ["y"], mode="avg", output_height=output,
                            output_width=output, sampling_ratio=sampling_ratio, spatial_scale=spatial_scale,
                            coordinate_transformation_mode="half_pixel")
    session = onnxruntime_session(_onnx_model(
        [node], [("x", TensorProto.FLOAT, ["n", "c", "h", "w"]), ("boxes", TensorProto.FLOAT, ["k", 4]),
                 ("batch", TensorProto.INT64, ["k"])], [("y", TensorProto.FLOAT, None)]))
    boxes, batch = _split_rois(rois)
    batch = batch.long()  # the case's fixed RoIs: their layout is built once, like ours' rois

    def call():
        return torch.from_numpy(session.run(None, dict(x=numpy_view(features), boxes=boxes.numpy(),
                                                       batch=batch.numpy()))[0])

    return call


def roi_align_openvino(features, rois, output: int, spatial_scale: float, sampling_ratio: int) -> Callable:
    """OpenVINO ROIAlign-9, half_pixel_for_nn (= aligned=True), in float32,
    or in bfloat16 for bfloat16 features and rois (bfloat16 parameters and
    inference precision: its CPU plugin's bfloat16 kernel)."""
    import openvino
    import openvino.opset9 as ops

    bf16 = features.dtype == torch.bfloat16
    element = openvino.Type.bf16 if bf16 else openvino.Type.f32
    x = ops.parameter([-1, features.size(1), -1, -1], element)
    boxes_in, batch_in = ops.parameter([-1, 4], element), ops.parameter([-1], np.int32)
    pooled = ops.roi_align(x, boxes_in, batch_in, output, output, sampling_ratio, spatial_scale, "avg",
                           "half_pixel_for_nn")
    compiled = openvino_compile(openvino.Model([pooled], [x, boxes_in, batch_in]),
                                precision="bf16" if bf16 else "f32")
    boxes, batch = _split_rois(rois)
    batch = batch.int()
    if not bf16:
        def call():
            return torch.from_numpy(compiled([numpy_view(features), boxes.numpy(), batch.numpy()])[0])

        return call

    request = compiled.create_infer_request()
    boxes_tensor = _openvino_bf16(boxes)

    def call_bf16():
        # numpy has no bfloat16: the bits go in and come out as 16-bit integers.
        result = request.infer([_openvino_bf16(features), boxes_tensor, batch.numpy()])
        bits = np.asarray(next(iter(result.values()))).view(np.int16)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16)

    return call_bf16


def _openvino_bf16(tensor: torch.Tensor):
    """An OpenVINO bf16 tensor holding the bits of a bfloat16 torch tensor."""
    import openvino

    result = openvino.Tensor(openvino.Type.bf16, list(tensor.shape))
    result.data.view(np.int16)[...] = tensor.contiguous().view(torch.int16).numpy()
    return result


# ------------------------------------------------------- multi-level RoIAlign


def multiscale_openvino(features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], output: int,
                        sampling_ratio: int, strides: Sequence[int]) -> Callable:
    """ExperimentalDetectronROIFeatureExtractor (aligned=0) per image, on
    features [N, C, H_l, W_l] finest first and one [L_i, 4] boxes per image
    -> [sum L_i, C, output, output] in image order (torchvision's)."""
    from onnx import TensorProto, helper

    levels = [f"p{i}" for i in range(len(features))]
    nodes, outputs = [], []
    for image in range(len(boxes)):
        start = helper.make_tensor(f"start{image}", TensorProto.INT64, [1], [image])
        end = helper.make_tensor(f"end{image}", TensorProto.INT64, [1], [image + 1])
        nodes += [helper.make_node("Constant", [], [f"start{image}"], value=start),
                  helper.make_node("Constant", [], [f"end{image}"], value=end)]
        nodes += [helper.make_node("Slice", [level, f"start{image}", f"end{image}"], [f"{level}_{image}"])
                  for level in levels]
        nodes.append(helper.make_node(
            "ExperimentalDetectronROIFeatureExtractor", [f"rois{image}"] + [f"{level}_{image}" for level in levels],
            [f"pooled{image}", f"rois_out{image}"], domain=OPENVINO_DOMAIN, output_size=output,
            sampling_ratio=sampling_ratio, pyramid_scales=list(strides), aligned=0))
        outputs.append(f"pooled{image}")
    nodes.append(helper.make_node("Concat", outputs, ["y"], axis=0))
    channels = features[0].size(1)
    inputs = [(level, TensorProto.FLOAT, ["n", channels, f"h{level}", f"w{level}"]) for level in levels]
    inputs += [(f"rois{image}", TensorProto.FLOAT, [f"k{image}", 4]) for image in range(len(boxes))]
    compiled = openvino_compile(_onnx_model(nodes, inputs, [("y", TensorProto.FLOAT, None)], [OPENVINO_DOMAIN]))

    def call():
        arrays = [numpy_view(f) for f in features] + [numpy_view(b) for b in boxes]
        return torch.from_numpy(compiled(arrays)[0])

    return call


# ----------------------------------------------------------------------- NMS


def _dense_class_scores(scores: torch.Tensor, idxs, classes: int) -> torch.Tensor:
    """[1, classes, N] scores for NonMaxSuppression: each box's score in its
    class, -inf elsewhere (dropped by any finite score threshold)."""
    if idxs is None:
        return scores.view(1, 1, -1)
    dense = torch.full((classes, scores.numel()), -math.inf, dtype=scores.dtype)
    dense[idxs, torch.arange(scores.numel())] = scores
    return dense.unsqueeze(0)


def _kept_in_score_order(selected: np.ndarray, scores: torch.Tensor) -> torch.Tensor:
    """selected_indices [K, 3] (batch, class, box) -> kept box indices
    int64 [K] by decreasing score, as ours returns them."""
    kept = torch.from_numpy(np.asarray(selected[:, 2], dtype=np.int64))
    return kept[torch.argsort(scores[kept], descending=True, stable=True)]


def nms_onnxruntime(boxes, scores, iou: float, idxs=None, classes: int = 1) -> Callable:
    """ONNX NonMaxSuppression: boxes [N, 4] (x1, y1, x2, y2), scores [N],
    optional class indices [N] for batched NMS -> kept indices [K]."""
    from onnx import TensorProto, helper

    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_out", "iou", "min_score"], ["selected"],
                            center_point_box=0)
    session = onnxruntime_session(_onnx_model(
        [node], [("boxes", TensorProto.FLOAT, [1, "n", 4]), ("scores", TensorProto.FLOAT, [1, "c", "n"]),
                 ("max_out", TensorProto.INT64, [1]), ("iou", TensorProto.FLOAT, [1]),
                 ("min_score", TensorProto.FLOAT, [1])],
        [("selected", TensorProto.INT64, None)]))
    constants = dict(max_out=np.array([boxes.size(0)], np.int64), iou=np.array([iou], np.float32),
                     min_score=np.array([np.finfo(np.float32).min], np.float32))

    def call():
        dense = _dense_class_scores(scores, idxs, classes)
        selected = session.run(None, dict(boxes=numpy_view(boxes).reshape(1, -1, 4), scores=numpy_view(dense),
                                          **constants))[0]
        return _kept_in_score_order(selected, scores)

    return call


def nms_openvino(boxes, scores, iou: float, idxs=None, classes: int = 1) -> Callable:
    """OpenVINO NonMaxSuppression-9, as ``nms_onnxruntime``: in float32, or
    in bfloat16 for bfloat16 boxes and scores (bfloat16 parameters and
    inference precision)."""
    import openvino
    import openvino.opset9 as ops

    bf16 = boxes.dtype == torch.bfloat16
    element = openvino.Type.bf16 if bf16 else openvino.Type.f32
    boxes_in = ops.parameter([1, -1, 4], element)
    scores_in = ops.parameter([1, -1, -1], element)
    selected = ops.non_max_suppression(
        boxes_in, scores_in, ops.constant(np.array([boxes.size(0)], np.int64)),
        ops.constant(np.array([iou], np.float32)), ops.constant(np.array([np.finfo(np.float32).min], np.float32)),
        box_encoding="corner", sort_result_descending=False, output_type="i64")
    compiled = openvino_compile(openvino.Model([selected.output(0), selected.output(2)], [boxes_in, scores_in]),
                                precision="bf16" if bf16 else "f32")
    # numpy has no bfloat16: bfloat16 inputs go in as OpenVINO tensors of their bits.
    as_input = _openvino_bf16 if bf16 else numpy_view

    def call():
        dense = _dense_class_scores(scores, idxs, classes)
        result = compiled([as_input(boxes.reshape(1, -1, 4)), as_input(dense)])
        count = int(result[1][0])  # rows past the count are padding (-1)
        return _kept_in_score_order(result[0][:count], scores)

    return call


# ----------------------------------------------------------------- proposals


def proposals_openvino(objectness, deltas, anchors, image_sizes, top_n: int, nms_thresh: float,
                       min_size: float) -> Callable:
    """ExperimentalDetectronGenerateProposalsSingleImage per image, on one
    pyramid level: objectness [N, A, H, W] logits, deltas [N, A * 4, H, W],
    anchors [H * W * A, 4] (location-major, as ours), image_sizes (height,
    width) per image -> (boxes per image, scores per image) as ours.

    It takes probabilities; the logits go in unchanged (the sigmoid keeps
    their order) and the sigmoid is applied to the kept scores. It is
    Detectron's op, with the "+1" pixel convention (width = x2 - x1 + 1 in
    decoding, size test and NMS areas; x2, y2 clipped to width - 1, height
    - 1) where ours (torchvision's) has width = x2 - x1 and clips to width,
    height. Anchors given with x2, y2 one pixel less (built once here) and 1
    added to the x2, y2 it returns make the two conventions the same, except
    for a box that ends less than 1 px from the top or left edge: ours clips
    its x2 (y2) to 0, Detectron's to 1 - 1 = 0 before adding 1 back, i.e. to
    1 (a box ours keeps at height 0.3 is 1 px high there); NMS then differs
    around it. The suite records how many proposals that changes.
    """
    from onnx import TensorProto, helper

    nodes, outputs, inputs = [], [], [("anchors", TensorProto.FLOAT, ["k", 4])]
    for image in range(objectness.size(0)):
        nodes.append(helper.make_node(
            "ExperimentalDetectronGenerateProposalsSingleImage",
            [f"info{image}", "anchors", f"deltas{image}", f"scores{image}"], [f"boxes{image}", f"kept{image}"],
            domain=OPENVINO_DOMAIN, min_size=min_size, nms_threshold=nms_thresh, pre_nms_count=top_n,
            post_nms_count=top_n))
        outputs += [(f"boxes{image}", TensorProto.FLOAT, None), (f"kept{image}", TensorProto.FLOAT, None)]
        inputs += [(f"info{image}", TensorProto.FLOAT, [3]), (f"deltas{image}", TensorProto.FLOAT, list(deltas.shape[1:])),
                   (f"scores{image}", TensorProto.FLOAT, list(objectness.shape[1:]))]
    compiled = openvino_compile(_onnx_model(nodes, inputs, outputs, [OPENVINO_DOMAIN]))
    infos = [np.array([h, w, 1.0], np.float32) for h, w in image_sizes]
    one_pixel = torch.tensor([0.0, 0.0, 1.0, 1.0])
    anchors = anchors - one_pixel

    def call():
        arrays = [numpy_view(anchors)]
        for image, info in enumerate(infos):
            arrays += [info, numpy_view(deltas[image]), numpy_view(objectness[image])]
        result = compiled(arrays)
        boxes, scores = [], []
        for image in range(len(infos)):
            kept_boxes, kept_logits = (torch.from_numpy(result[2 * image + k]) for k in (0, 1))
            # Rows past the kept count are zero boxes with zero scores.
            valid = (kept_boxes[:, 2:] > kept_boxes[:, :2]).all(dim=1)
            boxes.append(kept_boxes[valid] + one_pixel)
            scores.append(torch.sigmoid(kept_logits[valid]))
        return boxes, scores

    return call
