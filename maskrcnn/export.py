"""The detector as one graph, for deployment without Python.

``DeployableDetector`` wraps an eval-mode MaskRCNN into a tensor-in,
tensor-out module with fixed-size outputs and no host synchronization
(``MaskRCNN.detect_padded``); from it:

- ``export_program``: a ``torch.export.ExportedProgram`` with dynamic batch
  size, height and width;
- ``compile_package``: an AOTInductor ``.pt2`` package, which a process
  loads with ``torch._inductor.aoti_load_package`` after importing only
  ``maskrcnn_ops`` (for its operators);
- ``export_onnx``: an ONNX model through the dynamo exporter and
  ``maskrcnn_ops.onnx_translation_table()``.

The program takes images already resized as the model resizes them
(``resize_for_program``) and returns boxes, masks and (Keypoint R-CNN)
keypoints in those images' pixels (``output_names``);
``detections_from_outputs`` maps them back to the original images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import maskrcnn_ops

from .model import MaskRCNN
from .paste import paste_masks_in_image
from .preprocess import check_images, rescale_boxes, rescale_keypoints, resized_size

# Bounds of the dynamic dimensions of exported programs: images per batch,
# and the side of the batch (at most the model's max_size rounded up to 32;
# at least MIN_SIDE, which gives the coarsest pyramid level, stride 64, two
# cells or more: the traced graph's layouts assume a level is not one cell
# wide; resize_for_program pads smaller batches up to it).
MAX_BATCH = 8
MIN_SIDE = 96

# The outputs of a Mask R-CNN's program; a model with a keypoint branch
# adds KEYPOINT_OUTPUT_NAMES, one without a mask branch has no "masks"
# (``output_names``).
OUTPUT_NAMES = ("num_detections", "boxes", "scores", "labels", "masks")
KEYPOINT_OUTPUT_NAMES = ("keypoints", "keypoints_scores")

# The version of the description written beside an artifact (write_metadata).
FORMAT = "maskrcnn-ops exported detector 1"


class DeployableDetector(nn.Module):
    """An eval-mode MaskRCNN as a function of tensors, fixed-size outputs.

    Args:
        model: the detector (its weights are shared, not copied).
        paste_masks: return masks pasted into the image, thresholded, as
            uint8 [N, D, H, W] instead of the M x M probabilities in each
            box's frame.
        mask_threshold: the probability a pasted mask pixel must exceed.

    ``forward(images, image_sizes)``:
        images: [N, 3, H, W] float RGB in [0, 1], each image resized as the
            model resizes (``resize_for_program``) and in the top-left
            corner; 1 <= N <= MAX_BATCH, MIN_SIDE <= H, W <= the model's
            ``max_size`` rounded up to 32.
        image_sizes: int64 [N, 2], (height, width) of each image.
    Returns ``num_detections`` int64 [N], ``boxes`` [N, D, 4] float32 (x1,
    y1, x2, y2 in the input's pixels), ``scores`` [N, D] float32 by
    decreasing score, ``labels`` [N, D] int64, ``masks`` [N, D, M, M]
    float32 probabilities (or [N, D, H, W] uint8 with ``paste_masks``; none
    without a mask branch), and with a keypoint branch ``keypoints`` [N, D,
    K, 3] float32 (x, y, 1 in the input's pixels) and ``keypoints_scores``
    [N, D, K] float32 (the heatmap logits at them); rows past
    ``num_detections`` are zeros. D = ``detections_per_img``; the names in
    order: ``output_names(model)``.
    """

    def __init__(self, model: MaskRCNN, *, paste_masks: bool = False, mask_threshold: float = 0.5) -> None:
        super().__init__()
        self.model = model.eval()
        self.paste_masks = paste_masks
        self.mask_threshold = mask_threshold

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, ...]:
        torch._check(images.dim() == 4 and images.size(1) == 3,
                     lambda: f"images must be [N, 3, H, W] RGB, got {tuple(images.shape)}")
        torch._check(image_sizes.shape == (images.size(0), 2),
                     lambda: f"image_sizes must be [N, 2] for N = {images.size(0)}, got {tuple(image_sizes.shape)}")
        outputs = self.model.detect_padded(images, image_sizes)
        detections = outputs.detections
        masks = outputs.masks
        if self.paste_masks and masks is not None:
            n, d = detections.boxes.shape[:2]
            height, width = images.shape[-2:]
            pasted = maskrcnn_ops.paste_masks(masks.reshape(n * d, *masks.shape[-2:]), detections.boxes.reshape(n * d, 4),
                                              (height, width), threshold=self.mask_threshold)
            # A mask's border (the pasting's padding) may reach past its
            # image into the batch's padding: cut it as an image-sized paste would.
            inside = ((torch.arange(height, device=images.device) < image_sizes[:, :1])[:, :, None]
                      & (torch.arange(width, device=images.device) < image_sizes[:, 1:])[:, None, :])
            masks = (pasted.view(n, d, height, width) & inside[:, None]).to(torch.uint8)
        # Which outputs exist is fixed by the model's branches, not by data.
        optional = (masks,) if masks is not None else ()
        if outputs.keypoints is not None:
            optional += (outputs.keypoints, outputs.keypoint_scores)
        return (detections.num_detections, detections.boxes, detections.scores, detections.labels) + optional


def output_names(model: MaskRCNN) -> Tuple[str, ...]:
    """The names of a program's outputs, in order (see DeployableDetector):
    OUTPUT_NAMES (less "masks" without a mask branch), then
    KEYPOINT_OUTPUT_NAMES for a model with a keypoint branch."""
    names = OUTPUT_NAMES if model.roi_heads.has_masks else OUTPUT_NAMES[:-1]
    return names + (KEYPOINT_OUTPUT_NAMES if model.roi_heads.has_keypoints else ())


class ProgramInputs(NamedTuple):
    """Inputs of a DeployableDetector and how to map its outputs back.

    Attributes:
        images: [N, 3, H, W] resized images in [0, 1], zero-padded.
        image_sizes: int64 [N, 2] resized (height, width).
        original_sizes: the images' (height, width) before resizing.
    """

    images: Tensor
    image_sizes: Tensor
    original_sizes: List[Tuple[int, int]]


def resize_for_program(images: Sequence[Tensor], *, min_size: int, max_size: int) -> ProgramInputs:
    """Resizes [3, H_i, W_i] float images in [0, 1] as MaskRCNN's transform
    does (short side ``min_size``, long side at most ``max_size``; bilinear,
    half-pixel centres) and pads them into one batch for a program."""
    check_images(images)
    resized = []
    for image in images:
        size = resized_size(image.size(1), image.size(2), min_size=min_size, max_size=max_size)
        if size != tuple(image.shape[-2:]):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        resized.append(image)
    height = max(max(image.size(1) for image in resized), MIN_SIDE)
    width = max(max(image.size(2) for image in resized), MIN_SIDE)
    batch = resized[0].new_zeros(len(resized), 3, height, width)
    for slot, image in zip(batch, resized):
        slot[:, : image.size(1), : image.size(2)].copy_(image)
    sizes = torch.tensor([tuple(image.shape[-2:]) for image in resized], dtype=torch.int64)
    return ProgramInputs(batch, sizes, [tuple(image.shape[-2:]) for image in images])


def detections_from_outputs(
    outputs: Sequence[Tensor], inputs: ProgramInputs, *, pasted: bool = False, names: Sequence[str] = OUTPUT_NAMES
) -> List[Dict[str, Tensor]]:
    """A program's outputs (named ``names``: its model's ``output_names``)
    -> one dict per image as ``MaskRCNN.forward`` returns (boxes in the
    original image, masks [D_i, 1, H, W] float32 probabilities pasted into
    it, keypoints [D_i, K, 3] and keypoints_scores [D_i, K] when the
    program has them). With ``pasted`` outputs (uint8 masks in the resized
    image) the masks are resized to the original by nearest neighbour and
    stay 0/1."""
    if len(outputs) != len(names):
        raise ValueError(f"a program with outputs {list(names)} returned {len(outputs)} tensors")
    named = dict(zip(names, outputs))
    results = []
    for i, count in enumerate(named["num_detections"].tolist()):
        resized = tuple(inputs.image_sizes[i].tolist())
        original = inputs.original_sizes[i]
        image_boxes = rescale_boxes(named["boxes"][i, :count], resized, original)
        result = dict(boxes=image_boxes, labels=named["labels"][i, :count], scores=named["scores"][i, :count])
        if "masks" in named and pasted:
            image_masks = named["masks"][i, :count, : resized[0], : resized[1]]
            result["masks"] = F.interpolate(image_masks[:, None].float(), size=original).to(torch.uint8)
        elif "masks" in named:
            result["masks"] = paste_masks_in_image(named["masks"][i, :count, None], image_boxes, original)
        if "keypoints" in named:
            result["keypoints"] = rescale_keypoints(named["keypoints"][i, :count], resized, original)
            result["keypoints_scores"] = named["keypoints_scores"][i, :count]
        results.append(result)
    return results


def dynamic_shapes(model: MaskRCNN) -> Tuple[dict, dict]:
    """The dynamic dimensions of a program's inputs (see DeployableDetector)."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    height = torch.export.Dim("height", min=MIN_SIDE, max=max_side(model))
    width = torch.export.Dim("width", min=MIN_SIDE, max=max_side(model))
    return {0: batch, 2: height, 3: width}, {0: batch}


def example_inputs(model: MaskRCNN, *, batch: int = 2) -> Tuple[Tensor, Tensor]:
    """Random inputs to trace with: ``batch`` images of the model's short
    side. Batch, height and width differ from each other and from 1, as
    the tracer would otherwise take them as equal or as constants."""
    height = model.transform.min_size
    width = max(height - 32, MIN_SIDE + 1)
    images = torch.rand(batch, 3, height, width)
    return images, torch.tensor([[height, width]] * batch, dtype=torch.int64)


def max_side(model: MaskRCNN) -> int:
    """The largest height or width a program of ``model`` takes: its
    ``max_size`` rounded up to a multiple of 32."""
    return -(-model.transform.max_size // 32) * 32


def check_program_inputs(images: Tensor, image_sizes: Tensor, *, model: MaskRCNN) -> None:
    """Raises a one-line ValueError unless ``images`` and ``image_sizes``
    are inputs a program of ``model`` takes (see DeployableDetector)."""
    check_inputs(images, image_sizes, max_side=max_side(model), max_batch=MAX_BATCH)


def check_inputs(images: Tensor, image_sizes: Tensor, *, max_side: int, max_batch: int) -> None:
    """``check_program_inputs`` with the bounds given."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.size(1) != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [N, 3, H, W] (RGB), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point with values in [0, 1], got {images.dtype}")
    n, _, height, width = images.shape
    if n == 0:
        raise ValueError("an empty batch: give at least one image")
    if n > max_batch:
        raise ValueError(f"a batch of {n} images; a program takes at most {max_batch}")
    largest = max_side
    if not (MIN_SIDE <= height <= largest and MIN_SIDE <= width <= largest):
        raise ValueError(f"images of {height} x {width}; a program of this model takes sides from {MIN_SIDE} to "
                         f"{largest} (resize with resize_for_program)")
    if image_sizes.shape != (n, 2) or image_sizes.dtype != torch.int64:
        raise ValueError(f"image_sizes must be int64 [{n}, 2], got {image_sizes.dtype} {tuple(image_sizes.shape)}")
    if bool((image_sizes < 1).any()) or bool((image_sizes[:, 0] > height).any()) or bool((image_sizes[:, 1] > width).any()):
        raise ValueError(f"image_sizes {image_sizes.tolist()} must lie within the batch's {height} x {width}")


def export_program(model: MaskRCNN, *, paste_masks: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``DeployableDetector(model)`` with dynamic N, H, W."""
    module = DeployableDetector(model, paste_masks=paste_masks)
    images_dims, sizes_dims = dynamic_shapes(model)
    # Size-oblivious: a traced size of 2 says nothing about sizes of 1, so
    # that a batch of one image stays in the program's range.
    with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(module, example_inputs(model), dynamic_shapes=(images_dims, sizes_dims))


def metadata_path(path: Path) -> Path:
    """Where the description of an artifact at ``path`` is kept: ``<path>.json``."""
    return Path(f"{path}.json")


def write_metadata(model: MaskRCNN, path: Path, *, paste_masks: bool) -> None:
    """Writes what a runner needs besides the program (``metadata_path``):
    how to resize images, the bounds of the inputs, the class names, the
    outputs' names and the keypoints' skeleton."""
    metadata = dict(format=FORMAT, min_size=model.transform.min_size, max_size=model.transform.max_size,
                    max_side=max_side(model), min_side=MIN_SIDE, max_batch=MAX_BATCH, paste_masks=paste_masks,
                    num_classes=model.num_classes, class_names=list(model.class_names),
                    detections_per_img=model.roi_heads.detections_per_img, outputs=list(output_names(model)),
                    num_keypoints=model.num_keypoints,
                    keypoint_skeleton=[list(edge) for edge in model.keypoint_skeleton])
    metadata_path(path).write_text(json.dumps(metadata, indent=1))


def compile_package(
    model: MaskRCNN,
    path: Path,
    *,
    paste_masks: bool = False,
    program: Optional[torch.export.ExportedProgram] = None,
    freeze: bool = True,
) -> Path:
    """An AOTInductor package of the program at ``path`` (a ``.pt2`` file),
    and its description beside it (``metadata_path``). ``program``: the
    model's ``export_program``, if already made. ``freeze``: inductor's
    freezing, the weights folded in as constants and the convolutions'
    prepacked for oneDNN (faster on CPU; boxes then differ from eager by
    float summation order, about 1e-4 px)."""
    program = program if program is not None else export_program(model, paste_masks=paste_masks)
    # check_lowerbound off: with AOTI_RUNTIME_CHECK_INPUTS=1 the package
    # checks its inputs' shapes, and would otherwise reject one image (its
    # default lower bound of dynamic sizes is 2).
    settings = {"aot_inductor.check_lowerbound": False, "freezing": freeze}
    with torch.no_grad(), torch._inductor.config.patch(settings):
        package = Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))
    write_metadata(model, package, paste_masks=paste_masks)
    return package


def export_onnx(
    model: MaskRCNN, path: Path, *, paste_masks: bool = False, program: Optional[torch.export.ExportedProgram] = None
) -> Path:
    """The program as an ONNX model at ``path``, for onnxruntime (the
    maskrcnn_ops operators become standard ONNX ops). ``program``: the
    model's ``export_program``, if already made. Outputs are named
    ``output_names(model)``, keypoints included for a keypoint model (its
    decoding is an ONNX Loop over the detections, see
    ``maskrcnn_ops.export``)."""
    program = program if program is not None else export_program(model, paste_masks=paste_masks)
    # paste_masks (with paste_masks=True) has no ONNX translation: decomposed
    # (a program without it goes to the exporter untouched).
    if any(node.target == torch.ops.maskrcnn_ops.paste_masks.default for node in program.graph.nodes):
        program = program.run_decompositions(maskrcnn_ops.onnx_decompositions())
    onnx_program = torch.onnx.export(
        program, dynamo=True, custom_translation_table=maskrcnn_ops.onnx_translation_table(),
        input_names=["images", "image_sizes"], output_names=list(output_names(model)),
    )
    onnx_program.save(str(path))
    write_metadata(model, Path(path), paste_masks=paste_masks)
    return Path(path)


class ExportedDetector:
    """A ``.pt2`` (AOTInductor) or ``.onnx`` artifact of ``compile_package``
    or ``export_onnx`` with MaskRCNN's eval interface: called on a list of
    [3, H, W] float images in [0, 1], it returns one dict per image
    (``boxes``, ``labels``, ``scores``, ``masks`` [D, 1, H, W], and
    ``keypoints``, ``keypoints_scores`` for a keypoint model) in the
    original images. Runs on CPU; needs maskrcnn_ops (for a .pt2, whose
    operators it calls) or onnxruntime (for a .onnx).

    Raises ValueError (one line) for a missing or unknown artifact, and for
    images the artifact cannot take.
    """

    def __init__(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"exported model not found: {path}")
        try:
            self.metadata = json.loads(metadata_path(path).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{metadata_path(path)}: the description written with {path} is missing or "
                             f"unreadable ({error}); export the model again") from None
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{metadata_path(path)} is not a description of format {FORMAT}")
        self.num_classes = int(self.metadata["num_classes"])
        self.class_names = list(self.metadata["class_names"])
        # Descriptions written before keypoints were exported name no outputs: OUTPUT_NAMES.
        self.output_names = tuple(self.metadata.get("outputs", OUTPUT_NAMES))
        # What predict draws keypoints with, as MaskRCNN's.
        self.keypoint_skeleton = [tuple(edge) for edge in self.metadata.get("keypoint_skeleton", [])]
        if path.suffix == ".onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self.run = lambda images, sizes: [torch.from_numpy(o) for o in session.run(
                None, {"images": images.numpy(), "image_sizes": sizes.numpy()})]
        elif path.suffix == ".pt2":
            import maskrcnn_ops  # noqa: F401  (the operators the package calls)

            runner = torch._inductor.aoti_load_package(str(path))
            self.run = lambda images, sizes: list(runner(images, sizes))
        else:
            raise ValueError(f"{path}: expected a .pt2 or .onnx file from `python -m maskrcnn export`")

    def eval(self) -> "ExportedDetector":
        return self

    def __call__(self, images: Sequence[Tensor]) -> List[Dict[str, Tensor]]:
        meta = self.metadata
        if len(images) > meta["max_batch"]:
            raise ValueError(f"{len(images)} images in one call; the exported model takes at most {meta['max_batch']}")
        inputs = resize_for_program([image.cpu() for image in images], min_size=meta["min_size"],
                                    max_size=meta["max_size"])
        check_inputs(inputs.images, inputs.image_sizes, max_side=meta["max_side"], max_batch=meta["max_batch"])
        return detections_from_outputs(self.run(inputs.images, inputs.image_sizes), inputs,
                                       pasted=meta["paste_masks"], names=self.output_names)


__all__ = ["DeployableDetector", "ExportedDetector", "FORMAT", "KEYPOINT_OUTPUT_NAMES", "check_inputs", "metadata_path",
           "write_metadata", "MAX_BATCH", "MIN_SIDE", "OUTPUT_NAMES", "ProgramInputs", "check_program_inputs",
           "compile_package", "detections_from_outputs", "dynamic_shapes", "example_inputs", "export_onnx",
           "export_program", "max_side", "output_names", "resize_for_program"]
