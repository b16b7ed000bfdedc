"""The benchmark suite behind ``python -m benchmarks``: every op family
against torchvision, realistic workloads plus scaling sweeps, one table.

A case builds its inputs only when it runs (sweeps reach gigabytes), times
ours and torchvision's on the same inputs in the same process (warm-up, then
the median of several runs; CUDA events on GPU) and checks that both agree.
On the CPU, where a case has them and their packages are installed, the
peers of benchmarks/peers.py (OpenVINO, ONNX Runtime) are timed on the same
inputs too, each checked against ours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

import maskrcnn_ops
from benchmarks import peers
from benchmarks.common import random_boxes, time_call
from benchmarks.roi_align import WORKLOADS as ROI_WORKLOADS
from benchmarks.roi_align import random_rois

# setup() -> (ours, theirs, agree) or (ours, theirs, agree, Peers): two
# zero-argument callables and a check of their results (True, False, or None
# when not comparable), and the case's peers if it has any.
Setup = Callable[[], Tuple]


@dataclass
class Peers:
    """The peer runtimes of a case. ``builders`` maps a peer name (see
    peers.PEERS) to a function that builds its graph (not timed) and returns
    the zero-argument callable to time; ``compare(ours_result, peer_result)``
    -> (agree, difference): the largest absolute difference for tensors, the
    number of boxes kept by one and not the other for NMS and proposals.
    ``expect_agree`` is False where the peer's op is known to differ (the
    run then does not fail on it); ``note`` says how."""

    builders: Dict[str, Callable[[], Callable]]
    compare: Callable[[object, object], Tuple[bool, float]]
    expect_agree: bool = True
    note: str = ""


def compare_tensors(ours, theirs, tol: float = 1e-4) -> Tuple[bool, float]:
    """(allclose within `tol`, largest absolute difference) of two tensors."""
    if ours.shape != theirs.shape:
        return False, math.inf
    difference = (ours.float() - theirs.float()).abs().max().item() if ours.numel() else 0.0
    return bool(torch.allclose(ours, theirs, atol=tol, rtol=tol)), difference


def compare_kept(ours, theirs) -> Tuple[bool, float]:
    """(same kept set, boxes kept by one and not the other) of NMS results
    (the order of equal scores is arbitrary)."""
    a, b = set(ours.tolist()), set(theirs.tolist())
    return a == b, float(len(a ^ b))


@dataclass
class Case:
    op: str
    workload: str
    dtype: str
    layout: str
    setup: Setup
    sweep: str = ""  # name of the scaling sweep this case belongs to ("" for defaults)
    size: float = 0.0  # the swept quantity, for plots
    repeats: Optional[int] = None  # override (slow baselines)
    extra: Dict = field(default_factory=dict)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------ RoIAlign


def _roi_align_setup(device, dtype, channels_last, batch, channels, height, width, rois_per_image, output, backward):
    def setup():
        import torchvision

        generator = torch.Generator().manual_seed(0)
        features = torch.randn(batch, channels, height, width, generator=generator).to(device=device, dtype=dtype)
        if channels_last:
            features = features.contiguous(memory_format=torch.channels_last)
        rois = random_rois(rois_per_image, batch, generator).to(device=device, dtype=dtype)
        args = (output, 0.25, 2, True)
        grad = torch.randn(rois.size(0), channels, output, output, generator=generator).to(device=device, dtype=dtype)

        def make(fn):
            if not backward:
                return lambda: fn(features, rois, *args)
            leaf = features.detach().requires_grad_()
            return lambda: torch.autograd.grad(fn(leaf, rois, *args), leaf, grad)[0]

        ours, theirs = make(maskrcnn_ops.roi_align), make(torchvision.ops.roi_align)

        def agree():
            a, b = ours(), theirs()
            if dtype in (torch.float32, torch.float64):
                return bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4))
            # Half types: torchvision accumulates in half (large errors,
            # especially in its backward); judge both against torchvision
            # in float32 on the same (rounded) inputs, within our rounding.
            leaf = features.detach().float().requires_grad_()
            exact = torchvision.ops.roi_align(leaf, rois.float(), *args)
            if backward:
                exact = torch.autograd.grad(exact, leaf, grad.float())[0]
            tol = 1e-2 if dtype == torch.float16 else 5e-2
            return bool(torch.allclose(a.float(), exact, atol=tol, rtol=tol))

        if backward or dtype == torch.float16:
            return ours, theirs, agree  # the peers have neither a backward nor float16 CPU kernels
        if dtype == torch.bfloat16:
            # Both round float32 accumulations to bfloat16: a spacing apart
            # at most (2^-7 of the leading power of two).
            return ours, theirs, agree, Peers(
                {"openvino": lambda: peers.roi_align_openvino(features, rois, *args[:3])},
                lambda a, b: compare_tensors(a, b, tol=2.0**-6))
        builders = {
            "onnxruntime": lambda: peers.roi_align_onnxruntime(features, rois, *args[:3]),
            "openvino": lambda: peers.roi_align_openvino(features, rois, *args[:3]),
        }
        return ours, theirs, agree, Peers(builders, compare_tensors)

    return setup


def roi_align_cases(device: str, quick: bool) -> List[Case]:
    cases = []
    layouts = [(False, "nchw"), (True, "channels_last")]
    dtypes = [torch.float32] if quick else [torch.float32, torch.float16, torch.bfloat16]
    workloads = {"box_head": ROI_WORKLOADS["box_head"]} if quick else ROI_WORKLOADS
    for name, w in workloads.items():
        w = dict(w)
        if quick:
            w["rois_per_image"] = 100
        for dtype in dtypes:
            half = dtype != torch.float32
            if half and device == "cpu" and name != "box_head":
                continue  # torchvision's CPU kernels are very slow in half precision: one workload
            for channels_last, layout in layouts[:1] if half else layouts:
                for backward in (False, True):
                    cases.append(Case(
                        op="roi_align fwd+bwd" if backward else "roi_align",
                        workload=f"{name} {w['rois_per_image']}/img {w['output']}x{w['output']} C={w['channels']}",
                        dtype=_dtype_name(dtype), layout=layout,
                        setup=_roi_align_setup(device, dtype, channels_last, **w, backward=backward),
                        repeats=1 if half and device == "cpu" else None,
                    ))
    if quick:
        return cases
    # Scaling: RoIs 100 -> 10,000 (box head, float32, NCHW), and channels.
    box = ROI_WORKLOADS["box_head"]
    for total in (100, 300, 1000, 3000, 10000):
        for backward in (False, True):
            w = dict(box, rois_per_image=total // 2)
            cases.append(Case(
                op="roi_align fwd+bwd" if backward else "roi_align", workload=f"{total} RoIs 7x7 C=256",
                dtype="float32", layout="nchw", sweep="roi_align: RoIs", size=total, repeats=3,
                setup=_roi_align_setup(device, torch.float32, False, **w, backward=backward),
            ))
    for channels in (64, 128, 256, 512):
        w = dict(box, channels=channels)
        cases.append(Case(
            op="roi_align", workload=f"2000 RoIs 7x7 C={channels}", dtype="float32", layout="nchw",
            sweep="roi_align: channels", size=channels, repeats=3,
            setup=_roi_align_setup(device, torch.float32, False, **w, backward=False),
        ))
    return cases


# -------------------------------------------------------- multi-level RoIAlign

# The FPN of Mask R-CNN R50-FPN on an 800 x 1088 batch: P2..P5.
FPN_LEVELS = {"p2": (200, 272), "p3": (100, 136), "p4": (50, 68), "p5": (25, 34)}
IMAGE_SHAPES = [(800, 1088)] * 2


def _multiscale_setup(device, dtype, channels, rois_per_image, output, backward):
    """torchvision's MultiScaleRoIAlign (a roi_align per level, selected with
    torch.where) vs our fused op, on the same pyramid and boxes."""

    def setup():
        import torchvision

        generator = torch.Generator().manual_seed(0)
        features = {
            name: torch.randn(2, channels, h, w, generator=generator).to(device=device, dtype=dtype)
            for name, (h, w) in FPN_LEVELS.items()
        }
        boxes = [random_boxes(rois_per_image, generator).to(device=device, dtype=dtype) for _ in range(2)]
        names = list(FPN_LEVELS)
        grad = torch.randn(2 * rois_per_image, channels, output, output, generator=generator).to(device=device, dtype=dtype)

        def make(module):
            if not backward:
                return lambda: module(features, boxes, IMAGE_SHAPES)
            leaves = {k: v.detach().requires_grad_() for k, v in features.items()}
            return lambda: torch.autograd.grad(module(leaves, boxes, IMAGE_SHAPES), list(leaves.values()), grad)

        ours = make(maskrcnn_ops.MultiScaleRoIAlign(names, output, 2))
        theirs = make(torchvision.ops.MultiScaleRoIAlign(names, output, 2))

        def agree():
            a, b = ours(), theirs()
            pairs = zip(a, b) if backward else [(a, b)]
            return all(bool(torch.allclose(x, y, atol=1e-4, rtol=1e-4)) for x, y in pairs)

        if backward:
            return ours, theirs, agree
        strides = [int(round(IMAGE_SHAPES[0][0] / h)) for h, _ in FPN_LEVELS.values()]
        build = lambda: peers.multiscale_openvino(list(features.values()), boxes, output, 2, strides)  # noqa: E731
        return ours, theirs, agree, Peers({"openvino": build}, compare_tensors)

    return setup


def multiscale_cases(device: str, quick: bool) -> List[Case]:
    """Box head (1000 RoIs/image, 7x7) and mask head (100 RoIs/image, 14x14)
    over P2-P5 with 256 channels, sampling_ratio 2 (torchvision's detection
    models' settings); boxes as in the RoIAlign workloads, so every level
    gets RoIs."""
    workloads = [("box_head", 1000, 7), ("mask_head", 100, 14)]
    if quick:
        workloads = [("box_head", 100, 7)]
    cases = []
    for name, rois, output in workloads:
        for backward in (False, True):
            cases.append(Case(
                op="multi_scale_roi_align fwd+bwd" if backward else "multi_scale_roi_align",
                workload=f"{name} P2-P5 {rois}/img {output}x{output} C=256", dtype="float32", layout="nchw",
                setup=_multiscale_setup(device, torch.float32, 256, rois, output, backward),
            ))
    return cases


# ----------------------------------------------------------------------- NMS


def _nms_setup(device, dtype, n, classes, iou, batched):
    def setup():
        import torchvision

        generator = torch.Generator().manual_seed(n)
        boxes = random_boxes(n, generator).to(device=device, dtype=dtype)
        scores = torch.rand(n, generator=generator).to(device=device, dtype=dtype)
        idxs = torch.randint(0, classes, (n,), generator=generator).to(device)
        # torchvision has no bfloat16 CPU NMS: its float32 kernel on the same
        # values, which is what ours computes (the boxes widened exactly).
        widen = device == "cpu" and dtype == torch.bfloat16
        their_boxes, their_scores = (boxes.float(), scores.float()) if widen else (boxes, scores)
        if batched:
            ours = lambda: maskrcnn_ops.batched_nms(boxes, scores, idxs, iou)  # noqa: E731
            theirs = lambda: torchvision.ops.batched_nms(their_boxes, their_scores, idxs, iou)  # noqa: E731
        else:
            ours = lambda: maskrcnn_ops.nms(boxes, scores, iou)  # noqa: E731
            theirs = lambda: torchvision.ops.nms(their_boxes, their_scores, iou)  # noqa: E731

        def agree():
            a, b = ours(), theirs()
            # torchvision's batched_nms orders equal scores arbitrarily.
            return bool(set(a.tolist()) == set(b.tolist()) and torch.equal(scores[a], scores[b]))

        per_class = (idxs, classes) if batched else ()
        if widen:
            # OpenVINO's bfloat16 NMS (ONNX Runtime's takes float only); it
            # also suppresses at an IoU equal to the threshold, which boxes
            # rounded to bfloat16 reach for a few pairs (benchmarks/peers.py).
            return ours, theirs, agree, Peers(
                {"openvino": lambda: peers.nms_openvino(boxes, scores, iou, *per_class)}, compare_kept,
                expect_agree=False, note="suppresses at IoU equal to the threshold (see benchmarks/peers.py)")
        if dtype != torch.float32:
            return ours, theirs, agree
        builders = {
            "onnxruntime": lambda: peers.nms_onnxruntime(boxes, scores, iou, *per_class),
            "openvino": lambda: peers.nms_openvino(boxes, scores, iou, *per_class),
        }
        return ours, theirs, agree, Peers(builders, compare_kept)

    return setup


def _soft_nms_setup(device, n, classes, method):
    """Soft-NMS (float32, IoU threshold 0.3, sigma 0.5, score threshold
    0.001) against the pure-PyTorch reference, the only baseline at hand:
    torchvision has no soft-NMS, and mmcv's (CPU only) is not installed."""

    def setup():
        from maskrcnn_ops import reference

        generator = torch.Generator().manual_seed(n)
        boxes = random_boxes(n, generator).to(device)
        scores = torch.rand(n, generator=generator).to(device)
        idxs = torch.randint(0, classes, (n,), generator=generator).to(device)
        if classes > 1:
            ours = lambda: maskrcnn_ops.batched_soft_nms(boxes, scores, idxs, 0.3, method=method)  # noqa: E731
            theirs = lambda: reference.batched_soft_nms(boxes, scores, idxs, 0.3, method=method)  # noqa: E731
        else:
            ours = lambda: maskrcnn_ops.soft_nms(boxes, scores, 0.3, method=method)  # noqa: E731
            theirs = lambda: reference.soft_nms(boxes, scores, 0.3, method=method)  # noqa: E731

        def agree():
            # The same boxes with the same decayed scores (within float32
            # rounding: the exps differ by an ulp, which can swap two boxes
            # whose scores are a few ulps apart, so not compared in order).
            (a, sa), (b, sb) = ours(), theirs()
            a, sa, b, sb = a.cpu(), sa.cpu(), b.cpu(), sb.cpu()
            ia, ib = torch.argsort(a), torch.argsort(b)
            return bool(torch.equal(a[ia], b[ib]) and torch.allclose(sa[ia], sb[ib], rtol=1e-5, atol=1e-7))

        return ours, theirs, agree

    return setup


def soft_nms_cases(device: str, quick: bool) -> List[Case]:
    """Soft-NMS: one class of 1000 and 5000 boxes, and a batched 20000 boxes
    in 80 classes. "torchvision ms" is the reference's time here."""
    sizes = [(1000, 1, "gaussian")] if quick else [
        (1000, 1, "gaussian"), (5000, 1, "gaussian"), (5000, 1, "linear"), (20000, 80, "gaussian")]
    cases = []
    for n, classes, method in sizes:
        op = "batched_soft_nms" if classes > 1 else "soft_nms"
        per_class = f" {classes} classes" if classes > 1 else ""
        cases.append(Case(op, f"{n} boxes{per_class} {method} (vs pure-PyTorch reference)", "float32", "-",
                          _soft_nms_setup(device, n, classes, method), repeats=None if n <= 1000 else 2))
    return cases


def nms_cases(device: str, quick: bool) -> List[Case]:
    if quick:
        return [
            Case("nms", "3000 boxes IoU 0.7", "float32", "-", _nms_setup(device, torch.float32, 3000, 1, 0.7, False)),
            Case("batched_nms", "5000 boxes 80 classes IoU 0.5", "float32", "-",
                 _nms_setup(device, torch.float32, 5000, 80, 0.5, True)),
        ] + soft_nms_cases(device, quick)
    cases = soft_nms_cases(device, quick)
    dtypes = [torch.float32, torch.float16] if device == "cuda" else [torch.float32, torch.bfloat16]
    for dtype in dtypes:
        # On the CPU, torchvision's column of the bfloat16 rows is its float32 kernel (see _nms_setup).
        their = " (torchvision: float32)" if device == "cpu" and dtype == torch.bfloat16 else ""
        cases.append(Case("nms", f"12000 boxes IoU 0.7{their}", _dtype_name(dtype), "-",
                          _nms_setup(device, dtype, 12000, 1, 0.7, False)))
        cases.append(Case("batched_nms", f"20000 boxes 80 classes IoU 0.5{their}", _dtype_name(dtype), "-",
                          _nms_setup(device, dtype, 20000, 80, 0.5, True)))
    # torchvision's CPU NMS is quadratic (about 40 s at 100k): stop there on CPU.
    sizes = [1000, 3000, 10000, 30000, 100000] + ([200000] if device == "cuda" else [])
    for n in sizes:
        slow = device == "cpu" and n > 30000
        cases.append(Case("nms", f"{n} boxes IoU 0.7", "float32", "-", _nms_setup(device, torch.float32, n, 1, 0.7, False),
                          sweep="nms: boxes", size=n, repeats=1 if slow else None))
        cases.append(Case("batched_nms", f"{n} boxes 80 classes IoU 0.5", "float32", "-",
                          _nms_setup(device, torch.float32, n, 80, 0.5, True), sweep="batched_nms: boxes", size=n,
                          repeats=1 if slow else None))
    return cases


# --------------------------------------------------------- decode, proposals


def _decode_setup(device, dtype, n):
    def setup():
        from torchvision.models.detection._utils import BoxCoder

        generator = torch.Generator().manual_seed(1)
        boxes = random_boxes(n, generator).to(device=device, dtype=dtype)
        deltas = (0.5 * torch.randn(n, 4, generator=generator)).to(device=device, dtype=dtype)
        coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        ours = lambda: maskrcnn_ops.decode_boxes(deltas, boxes)  # noqa: E731
        theirs = lambda: coder.decode_single(deltas, boxes)  # noqa: E731
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        return ours, theirs, lambda: bool(torch.allclose(ours().float(), theirs().float(), rtol=tol, atol=tol * 1e3))

    return setup


def compare_proposals(ours, theirs) -> Tuple[bool, float]:
    """(same proposals and scores up to the order of ties, proposals of one
    with no box within 1e-4 in the other) of two (boxes, scores) per image."""
    from benchmarks.proposals import same_up_to_ties

    (ob, os_), (tb, ts) = ours, theirs
    unmatched = 0
    for a, b in zip(ob, tb):
        if len(a) == 0 or len(b) == 0:
            unmatched += len(a) + len(b)
            continue
        distance = torch.cdist(a.double(), b.double(), p=math.inf)
        unmatched += int((distance.min(1).values > 1e-4).sum()) + int((distance.min(0).values > 1e-4).sum())
    same = all(same_up_to_ties(*args) for args in zip(ob, os_, tb, ts))
    return same, float(unmatched)


def _proposals_setup(device, dtype, top_n, levels=5):
    """generate_proposals against torchvision on the first `levels` levels
    of the RPN workload; on one level (P2, 163,200 anchors per image), the
    form of OpenVINO's ExperimentalDetectronGenerateProposalsSingleImage,
    with it as a peer."""

    def setup():
        from benchmarks.proposals import IMAGE_SIZES, proposal_problem, rpn_inputs, rpn_problem, same_up_to_ties

        ours, theirs = proposal_problem(device, dtype, top_n, levels)

        def agree():
            (tb, ts), (ob, os_) = theirs(), ours()
            return all(same_up_to_ties(*args) for args in zip(tb, ts, ob, os_))

        if levels != 1:
            return ours, theirs, agree
        objectness, deltas, _ = rpn_inputs(device, dtype, levels=1)
        anchors = rpn_problem(device, dtype, levels=1)["anchors"]
        build = lambda: peers.proposals_openvino(objectness[0], deltas[0], anchors, IMAGE_SIZES, top_n, 0.7, 1e-3)  # noqa: E731
        return ours, theirs, agree, Peers({"openvino": build}, compare_proposals, expect_agree=False,
                                          note="Detectron's +1 pixel convention (see benchmarks/peers.py)")

    return setup


def proposals_cases(device: str, quick: bool) -> List[Case]:
    cases = [
        Case("decode_boxes", "434826 boxes", "float32", "-", _decode_setup(device, torch.float32, 434826)),
        Case("generate_proposals", "2 images 5 levels test 1000/1000", "float32", "-",
             _proposals_setup(device, torch.float32, 1000)),
        Case("generate_proposals", "2 images 1 level (P2) test 1000/1000", "float32", "-",
             _proposals_setup(device, torch.float32, 1000, levels=1)),
    ]
    if quick:
        return cases
    cases.append(Case("generate_proposals", "2 images 5 levels train 2000/2000", "float32", "-",
                      _proposals_setup(device, torch.float32, 2000)))
    for n in (10000, 100000, 1000000):
        cases.append(Case("decode_boxes", f"{n} boxes", "float32", "-", _decode_setup(device, torch.float32, n),
                          sweep="decode_boxes: boxes", size=n))
    return cases


# ------------------------------------------------------------ postprocess


def postprocess_cases(device: str, quick: bool) -> List[Case]:
    """Mask pasting against torchvision, and masks to COCO RLE against
    pasting + pycocotools.mask.encode (the baseline named in the workload)."""
    from benchmarks.postprocess import paste_setup, rle_setup

    image = (800, 1088)
    cases = [
        Case("paste_masks", "100 det 28x28 into 800x1088", "float32", "-",
             paste_setup(device, torch.float32, 100, image)),
        Case("paste_masks", "100 det 28x28 into 800x1088, > 0.5 (bool)", "float32", "-",
             paste_setup(device, torch.float32, 100, image, threshold=0.5)),
        Case("masks_to_rle", "100 det into 800x1088 vs paste_masks + pycocotools", "float32", "-",
             rle_setup(device, 100, image, "ours")),
        Case("masks_to_rle", "100 det into 800x1088 vs torchvision paste + pycocotools", "float32", "-",
             rle_setup(device, 100, image, "torchvision")),
    ]
    if quick:
        return cases
    cases.append(Case("paste_masks", "100 det 28x28 into 800x1088", "float16", "-",
                      paste_setup(device, torch.float16, 100, image)))
    for n in (10, 30, 300):
        cases.append(Case("paste_masks", f"{n} det 28x28 into 800x1088", "float32", "-",
                          paste_setup(device, torch.float32, n, image), sweep="paste_masks: detections", size=n))
    cases.append(Case("paste_masks", "100 det 28x28 into 480x640", "float32", "-",
                      paste_setup(device, torch.float32, 100, (480, 640))))
    cases.append(Case("masks_to_rle", "300 det into 1333x2000 vs torchvision paste + pycocotools", "float32", "-",
                      rle_setup(device, 300, (1333, 2000), "torchvision"), repeats=2))
    return cases


# -------------------------------------------------------------- keypoints


def person_boxes(n: int, image: Tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """[n, 4] float32 boxes of people in an image of (height, width): 20 to
    400 px wide, 1 to 3 times as tall, at fractional positions inside it."""
    width = 20 + 380 * torch.rand(n, generator=generator)
    height = torch.minimum(width * (1 + 2 * torch.rand(n, generator=generator)), torch.tensor(image[0] - 1.0))
    x1 = (image[1] - width) * torch.rand(n, generator=generator)
    y1 = (image[0] - height) * torch.rand(n, generator=generator)
    return torch.stack([x1, y1, x1 + width, y1 + height], 1)


def _keypoints_setup(device, dtype, n, keypoints, side, image):
    def setup():
        from torchvision.models.detection.roi_heads import heatmaps_to_keypoints

        generator = torch.Generator().manual_seed(n)
        boxes = person_boxes(n, image, generator).to(device)
        heatmaps = (3 * torch.randn(n, keypoints, side, side, generator=generator)).to(device=device, dtype=dtype)
        ours = lambda: maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)  # noqa: E731
        theirs = lambda: heatmaps_to_keypoints(heatmaps, boxes)  # noqa: E731

        def agree():
            # Torch's AVX2 / AVX-512 bicubic kernels fuse some operations
            # (ours round like its portable build), so a resized maximum a
            # few ulp from the runner-up may swap: allow 0.5% of keypoints
            # elsewhere, scores equal within float32 rounding.
            (a, sa), (b, sb) = ours(), theirs()
            same = (a.float() == b).all(-1)
            return bool(same.float().mean() >= 0.995 and torch.allclose(sa[same].float(), sb[same], rtol=1e-5,
                                                                          atol=1e-5))

        return ours, theirs, agree

    return setup


def keypoints_cases(device: str, quick: bool) -> List[Case]:
    """Keypoint R-CNN's decoding: 100 detections x 17 keypoints, 56 x 56
    heatmaps, people-sized boxes in an 800 x 1088 image, against
    torchvision's heatmaps_to_keypoints (a Python loop over detections)."""
    image = (800, 1088)
    cases = [Case("heatmaps_to_keypoints", "100 det x 17 kp 56x56, person boxes in 800x1088", "float32", "-",
                  _keypoints_setup(device, torch.float32, 100, 17, 56, image))]
    if quick:
        return cases
    for n in (10, 300):
        cases.append(Case("heatmaps_to_keypoints", f"{n} det x 17 kp 56x56, person boxes in 800x1088", "float32",
                          "-", _keypoints_setup(device, torch.float32, n, 17, 56, image),
                          sweep="heatmaps_to_keypoints: detections", size=n))
    return cases


FAMILIES: Dict[str, Callable[[str, bool], List[Case]]] = {
    "roi_align": roi_align_cases,
    "multiscale": multiscale_cases,
    "nms": nms_cases,
    "proposals": proposals_cases,
    "postprocess": postprocess_cases,
    "keypoints": keypoints_cases,
}


def run_peers(case_peers: Optional[Peers], ours: Callable, device: str, repeats: int) -> dict:
    """<peer>_ms, <peer>_agree, <peer>_diff (None where not run) and
    <peer>_note for every peer: built (not timed), run once and compared
    with ours (its warm-up), then timed. Peers run on the CPU only."""
    row = {}
    installed = peers.available() if device == "cpu" else []
    for name in peers.PEERS:
        row.update({f"{name}_ms": None, f"{name}_agree": None, f"{name}_diff": None})
        if case_peers is None or name not in case_peers.builders:
            continue
        if name not in installed:
            row[f"{name}_note"] = "not installed" if device == "cpu" else "CPU only"
            continue
        try:
            call = case_peers.builders[name]()
            agree, difference = case_peers.compare(ours(), call())
        except Exception as error:  # noqa: BLE001 - a runtime rejecting a graph is a result, recorded
            row[f"{name}_note"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:120]}"
            continue
        row.update({f"{name}_agree": agree, f"{name}_diff": difference, f"{name}_expect_agree": case_peers.expect_agree})
        if case_peers.note:
            row[f"{name}_note"] = case_peers.note
        row[f"{name}_ms"] = time_call(call, device, repeats, warmup=0)
    return row


def run_case(case: Case, device: str, repeats: int) -> dict:
    """Times one case; a baseline that cannot run (e.g. a dtype torchvision
    lacks on this device) is recorded as missing, not as a failure."""
    ours, theirs, agree, *case_peers = case.setup()
    reps = case.repeats or repeats
    row = dict(op=case.op, workload=case.workload, dtype=case.dtype, layout=case.layout, sweep=case.sweep,
               size=case.size, device=device)
    try:
        row["agree"] = agree()  # runs both once: the warm-up
        warmup = 0
    except (RuntimeError, NotImplementedError) as error:
        row.update(agree=None, note=str(error).splitlines()[0][:120])
        warmup = 1
    row["ours_ms"] = time_call(ours, device, reps, warmup=warmup)
    if row["agree"] is None:
        row.update(torchvision_ms=None, speedup=None)
    else:
        row["torchvision_ms"] = time_call(theirs, device, reps, warmup=0)
        row["speedup"] = row["torchvision_ms"] / row["ours_ms"]
    row.update(run_peers(case_peers[0] if case_peers else None, ours, device, reps))
    return row
