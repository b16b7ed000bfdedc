"""Saving and loading model weights.

Our checkpoint is a dict::

    {"format": "maskrcnn-ops/maskrcnn", "format_version": 1,
     "model_kwargs": {...},          # the builder's keyword arguments
     "architecture": "fpn" | "c4",   # the builder (maskrcnn.model.model_builder); absent: "fpn"
     "model": model.state_dict(),
     "class_names": [...],           # optional: a name per label (model.class_names)
     "keypoint_skeleton": [[i, j], ...],  # optional: model.keypoint_skeleton
     "training": {...}}              # optional: the state to resume a run

where "training" (written by ``maskrcnn.engine``) holds the iteration, the
optimizer's and gradient scaler's state dicts, the learning-rate schedule's
settings and the RNG states: tensors and plain containers only.

Loading also accepts a plain torchvision Mask R-CNN state dict (such as the
published ``maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth``); its depth and number
of classes (and, for a Keypoint R-CNN, its keypoints) are read from the
tensors. Files are read with
``torch.load(weights_only=True)``: no code in them runs.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .model import MaskRCNN, model_builder
from .torchvision_keys import current_key

FORMAT = "maskrcnn-ops/maskrcnn"
FORMAT_VERSION = 1

PathLike = Union[str, Path]

# (bottleneck blocks?, blocks in layer3) -> ResNet depth
_RESNET_DEPTHS = {(False, 2): 18, (False, 6): 34, (True, 6): 50, (True, 23): 101, (True, 36): 152}
_TORCHVISION_MARKERS = ("backbone.body.conv1.weight", "roi_heads.box_predictor.cls_score.weight")


# The builder families a checkpoint can name (maskrcnn.model.model_builder).
ARCHITECTURES = ("fpn", "c4")

# What a run folder's weights are called (engine.CHECKPOINT_NAME, demo.WEIGHTS_NAME).
WEIGHTS_NAMES = ("last.pt", "model.pt")


class CheckpointError(ValueError):
    """A weights file that cannot be used: not a checkpoint, or not this model's."""


def save_checkpoint(path: PathLike, model: MaskRCNN, *, training: Optional[Mapping[str, Any]] = None) -> None:
    """Writes ``model``'s weights and the keyword arguments it was built
    with, and optionally the training state (see the module docstring).

    The file is written next to ``path`` and then renamed over it, so an
    interrupted save never leaves a truncated checkpoint behind."""
    if not model.build_kwargs:
        raise ValueError("the model has no build_kwargs: build it with a builder (maskrcnn_resnet_fpn, ...) to save it")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_kwargs": dict(model.build_kwargs),
               "architecture": model.architecture, "model": model.state_dict()}
    if model.class_names:
        payload["class_names"] = list(model.class_names)
    if model.keypoint_skeleton:
        payload["keypoint_skeleton"] = [list(edge) for edge in model.keypoint_skeleton]
    if training is not None:
        payload["training"] = dict(training)
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:4]
        return f"a dict with {len(obj)} entries, the first keys {keys}"
    return f"an object of type {type(obj).__name__}"


def _load_failure(path: Path, error: Exception) -> str:
    """One line saying why ``torch.load(path, weights_only=True)`` failed:
    torch's own message is several lines of advice (kept as the chained
    cause for debugging)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # torch's message has terminal colours
    unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsafe or "Weights only load failed" in text:
        what = f" (such as {unsafe.group(1)})" if unsafe else ""
        return (f"{path} holds Python objects{what} besides tensors and plain containers, which "
                "torch.load(weights_only=True) refuses to load (they could run code)")
    return f"{path} is damaged: torch.load cannot read it ({type(error).__name__})"


def resnet_depth(*, bottleneck: bool, blocks_in_res4: int) -> int:
    """The ResNet depth with these blocks in its third stage (layer3, res4);
    CheckpointError if none."""
    depth = _RESNET_DEPTHS.get((bottleneck, blocks_in_res4))
    if depth is None:
        raise CheckpointError(
            f"the backbone is not a ResNet-18/34/50/101/152 (layer3 has {blocks_in_res4} "
            f"{'bottleneck' if bottleneck else 'basic'} blocks)"
        )
    return depth


def torchvision_model_kwargs(state_dict: Mapping[str, Tensor]) -> Dict[str, Any]:
    """ResNet depth and number of classes of a torchvision Mask R-CNN state
    dict; for a Keypoint R-CNN's, its keypoints and no mask branch."""
    blocks_in_layer3 = {int(k.split(".")[3]) for k in state_dict if k.startswith("backbone.body.layer3.")}
    bottleneck = "backbone.body.layer1.0.conv3.weight" in state_dict
    depth = resnet_depth(bottleneck=bottleneck, blocks_in_res4=len(blocks_in_layer3))
    kwargs = {"depth": depth, "num_classes": int(state_dict["roi_heads.box_predictor.cls_score.weight"].shape[0])}
    keypoint_logits = state_dict.get("roi_heads.keypoint_predictor.kps_score_lowres.weight")
    if keypoint_logits is not None:
        # torchvision's ConvTranspose2d weight: [in, K, 4, 4].
        kwargs.update(num_keypoints=int(keypoint_logits.shape[1]), with_masks=any(
            k.startswith("roi_heads.mask_predictor.") for k in state_dict))
    return kwargs


class Checkpoint(NamedTuple):
    """The contents of a weights file (see the module docstring): training
    None, class_names and keypoint_skeleton empty unless the file is our
    checkpoint with them."""

    model_kwargs: Dict[str, Any]
    state_dict: Dict[str, Tensor]
    training: Optional[Dict[str, Any]]
    class_names: List[str]
    keypoint_skeleton: List[Tuple[int, int]] = []
    architecture: str = "fpn"


def read_checkpoint(path: PathLike) -> Checkpoint:
    """Reads a weights file: our checkpoint or a torchvision Mask R-CNN state
    dict.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a directory, a damaged file, one not loadable with
            weights_only=True, or neither our checkpoint format nor a
            torchvision Mask R-CNN state dict (one line each; torch's error
            chained as the cause).
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / name for name in WEIGHTS_NAMES if (path / name).is_file()]
        hint = f" (did you mean {candidates[0]}?)" if candidates else ""
        raise CheckpointError(f"{path} is a directory, not a weights file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as file:
        magic = file.read(4)
    # torch.save writes a zip archive (or, before PyTorch 1.6, a pickle).
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise CheckpointError(f"{path} is not a PyTorch weights file (not written by torch.save)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for bad or unsafe files
        raise CheckpointError(_load_failure(path, error)) from error
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if obj.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {obj.get('format_version')!r} is not "
                                  f"supported (this code reads version {FORMAT_VERSION})")
        kwargs, state_dict, training = obj.get("model_kwargs"), obj.get("model"), obj.get("training")
        if not isinstance(kwargs, Mapping) or not isinstance(state_dict, Mapping):
            raise CheckpointError(f"{path}: a checkpoint needs a 'model_kwargs' dict and a 'model' state dict")
        if training is not None and not isinstance(training, Mapping):
            raise CheckpointError(f"{path}: 'training' must be a dict, got {type(training).__name__}")
        class_names = obj.get("class_names", [])
        if not isinstance(class_names, (list, tuple)) or not all(isinstance(n, str) for n in class_names):
            raise CheckpointError(f"{path}: 'class_names' must be a list of strings")
        skeleton = obj.get("keypoint_skeleton", [])
        if not isinstance(skeleton, (list, tuple)) or not all(
                isinstance(e, (list, tuple)) and len(e) == 2 and all(isinstance(i, int) for i in e) for e in skeleton):
            raise CheckpointError(f"{path}: 'keypoint_skeleton' must be a list of [i, j] integer pairs")
        architecture = obj.get("architecture", "fpn")
        if architecture not in ARCHITECTURES:
            raise CheckpointError(f"{path}: unknown architecture {architecture!r}; "
                                  f"this code builds {list(ARCHITECTURES)}")
        return Checkpoint(dict(kwargs), dict(state_dict), dict(training) if training is not None else None,
                          list(class_names), [tuple(edge) for edge in skeleton], architecture)
    if isinstance(obj, Mapping) and all(marker in obj for marker in _TORCHVISION_MARKERS):
        if not all(isinstance(v, Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: a state dict must map names to tensors")
        try:
            return Checkpoint(torchvision_model_kwargs(obj), dict(obj), None, [])
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from error
    raise CheckpointError(
        f"{path} is neither a maskrcnn checkpoint (a dict with format {FORMAT!r}) nor a torchvision Mask R-CNN "
        f"state dict (with keys such as {_TORCHVISION_MARKERS[0]!r}); it holds {_describe(obj)}"
    )


def check_state_dict(model: MaskRCNN, state_dict: Mapping[str, Tensor], *, source: str = "state dict") -> None:
    """Raises a CheckpointError naming the missing keys, unexpected keys and
    shape mismatches of ``state_dict`` against ``model`` (old torchvision key
    names and BatchNorm's ``num_batches_tracked`` counters are accepted, as
    ``load_state_dict`` accepts them)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {current_key(k): tuple(v.shape) for k, v in state_dict.items()
             if not (k.endswith("num_batches_tracked") and k not in expected)}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [f"{k}: file {given[k]}, model {expected[k]}" for k in expected if k in given and given[k] != expected[k]]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            shown = "; ".join(items[:5]) + (f"; ... ({len(items) - 5} more)" if len(items) > 5 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + ". ".join(problems))


def build_model(checkpoint: Checkpoint, *, source: str, **overrides: Any) -> MaskRCNN:
    """The model that the checkpoint's builder arguments (with ``overrides``)
    describe, with its weights loaded (strict; CheckpointError naming
    ``source`` if they do not fit) and its class names. In training mode, as
    built."""
    kwargs = checkpoint.model_kwargs
    builder = model_builder(checkpoint.architecture)
    accepted = set(inspect.signature(builder).parameters)
    unknown = sorted(set(kwargs) - accepted) + sorted(set(overrides) - accepted)
    if unknown:
        raise CheckpointError(f"{source}: unknown model arguments {unknown}; {builder.__name__} takes {sorted(accepted)}")
    model = builder(**{**kwargs, **overrides})
    check_state_dict(model, checkpoint.state_dict, source=source)
    model.load_state_dict(checkpoint.state_dict, strict=True)
    model.class_names = checkpoint.class_names
    model.keypoint_skeleton = list(checkpoint.keypoint_skeleton)
    return model


def load_model(path: PathLike, *, device: Union[str, torch.device] = "cpu", **overrides: Any) -> MaskRCNN:
    """Builds the model a weights file describes and loads it (strict).

    Args:
        path: our checkpoint or a torchvision Mask R-CNN state dict.
        device: where the model goes.
        overrides: keyword arguments of the builder replacing the
            file's (e.g. ``box_score_thresh``).

    Returns:
        The model in eval mode.
    """
    checkpoint = read_checkpoint(path)
    model = build_model(checkpoint, source=str(path), **overrides)
    return model.to(device).eval()


__all__ = ["ARCHITECTURES", "FORMAT", "Checkpoint", "CheckpointError", "build_model", "check_state_dict", "load_model", "read_checkpoint",
           "resnet_depth", "save_checkpoint", "torchvision_model_kwargs"]
