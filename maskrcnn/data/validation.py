"""Checks of one training target, with messages that say what was expected
and what came, to run before a sample reaches the model (a bad box is far
easier to find here than as a NaN loss many steps later)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid target: {message}")


def _reject_boxes(boxes: Tensor, bad: Tensor, reason: str) -> None:
    """Raises naming the first box flagged in ``bad`` [K] and the reason."""
    flagged = torch.where(bad)[0]
    if flagged.numel() > 0:
        first = int(flagged[0])
        raise ValueError(
            f"invalid target: boxes[{first}] = {boxes[first].tolist()} {reason} "
            f"({flagged.numel()} such box(es) in this target)"
        )


def validate_target(
    target: Dict, *, image_size: Tuple[int, int], num_classes: Optional[int] = None, require_masks: bool = True,
    num_keypoints: Optional[int] = None,
) -> None:
    """Raises ``ValueError`` unless ``target`` is a valid Mask R-CNN target
    for an image of ``image_size`` (height, width).

    Valid: ``boxes`` a floating tensor [K, 4] of finite (x1, y1, x2, y2) with
    x2 > x1 and y2 > y1 (a zero-width or zero-height box has no IoU with
    anything and breaks matching and box encoding; torchvision refuses them
    too); ``labels`` an integer tensor [K] in [1, num_classes) (0 is the
    background); ``masks`` (when present; required if ``require_masks``) a
    uint8 or bool tensor [K, H, W] of the image's size; ``keypoints`` (when
    present; required if ``num_keypoints``) a floating tensor [K, J, 3] of
    finite (x, y, visibility) with visibility 0, 1 or 2 (COCO's: not
    labeled, labeled but hidden, visible) and J = ``num_keypoints`` if given.
    Empty targets (K = 0) are valid.
    """
    _expect(isinstance(target, dict), f"expected a dict, got {type(target).__name__}")
    required = ("boxes", "labels") + (("masks",) if require_masks else ()) + (("keypoints",) if num_keypoints else ())
    for key in required:
        _expect(key in target, f"missing '{key}' (has {sorted(target)})")
        _expect(isinstance(target[key], Tensor), f"'{key}' must be a Tensor, got {type(target[key]).__name__}")
    boxes, labels = target["boxes"], target["labels"]
    _expect(boxes.dim() == 2 and boxes.size(1) == 4, f"'boxes' must be [K, 4], got shape {tuple(boxes.shape)}")
    _expect(boxes.is_floating_point(), f"'boxes' must be a floating tensor, got {boxes.dtype}")
    num_objects = boxes.size(0)
    _expect(
        labels.shape == (num_objects,) and not labels.is_floating_point() and labels.dtype != torch.bool,
        f"'labels' must be an integer tensor [K] = [{num_objects}], got {labels.dtype} of shape {tuple(labels.shape)}",
    )
    _reject_boxes(boxes, ~torch.isfinite(boxes).all(dim=1), "is not finite (NaN or Inf)")
    _reject_boxes(
        boxes,
        (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]),
        "has zero or negative width or height (need x2 > x1 and y2 > y1); drop such boxes from the dataset",
    )
    if num_objects > 0:
        upper = f", {num_classes})" if num_classes is not None else ", inf)"
        low, high = int(labels.min()), int(labels.max())
        _expect(
            low >= 1 and (num_classes is None or high < num_classes),
            f"labels must lie in [1{upper} (0 is the background), got values in [{low}, {high}]",
        )
    if "masks" in target:
        masks = target["masks"]
        height, width = image_size
        _expect(
            masks.dtype in (torch.uint8, torch.bool),
            f"'masks' must be uint8 or bool, got {masks.dtype}",
        )
        _expect(
            masks.shape == (num_objects, height, width),
            f"'masks' must be [K, H, W] = [{num_objects}, {height}, {width}] (one mask per box, at the image's "
            f"size), got {tuple(masks.shape)}",
        )
    if "keypoints" in target:
        _validate_keypoints(target["keypoints"], num_objects, num_keypoints)


def _validate_keypoints(keypoints, num_objects: int, num_keypoints: Optional[int]) -> None:
    _expect(isinstance(keypoints, Tensor), f"'keypoints' must be a Tensor, got {type(keypoints).__name__}")
    per_instance = num_keypoints if num_keypoints else "J"
    _expect(
        keypoints.dim() == 3 and keypoints.size(0) == num_objects and keypoints.size(2) == 3
        and (not num_keypoints or keypoints.size(1) == num_keypoints),
        f"'keypoints' must be [K, J, 3] = [{num_objects}, {per_instance}, 3] (x, y, visibility per keypoint of "
        f"each box), got {tuple(keypoints.shape)}",
    )
    _expect(keypoints.is_floating_point(), f"'keypoints' must be a floating tensor, got {keypoints.dtype}")
    _expect(bool(torch.isfinite(keypoints).all()), "'keypoints' must be finite (no NaN or Inf)")
    visibility = keypoints[..., 2]
    _expect(
        bool(((visibility == 0) | (visibility == 1) | (visibility == 2)).all()),
        f"keypoint visibilities must be 0, 1 or 2, got values {sorted(set(visibility.flatten().tolist()))[:6]}",
    )
