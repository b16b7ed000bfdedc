"""Batching for detection data loaders: images differ in size and targets in
object count, so a batch stays a list (the model's transform pads)."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from torch import Tensor


def collate(batch: Sequence[Tuple[Tensor, Dict]]) -> Tuple[List[Tensor], List[Dict]]:
    """``DataLoader(..., collate_fn=collate)``: a list of (image, target)
    samples -> (images, targets), two lists in the same order."""
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets
