"""Training-time augmentation of (image, target) samples."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor


def horizontal_flip(image: Tensor, target: Dict) -> Tuple[Tensor, Dict]:
    """Mirrors an image [C, H, W] and its target left-right.

    Boxes (x1, y1, x2, y2) with x2 exclusive become (W - x2, y1, W - x1, y2),
    which is again tight around the mirrored mask; masks [K, H, W] are
    mirrored; other entries are passed through. The target is a new dict.
    """
    width = image.shape[-1]
    flipped = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        flipped["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        flipped["masks"] = target["masks"].flip(-1)
    return image.flip(-1), flipped


class RandomHorizontalFlip:
    """Flips a sample left-right with probability ``probability``.

    Args:
        probability: chance of a flip per call.
        generator: source of the coin tosses; None uses the global RNG (which
            DataLoader seeds differently in each worker).
    """

    def __init__(self, probability: float = 0.5, *, generator: Optional[torch.Generator] = None) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        self.probability = probability
        self.generator = generator

    def __call__(self, image: Tensor, target: Dict) -> Tuple[Tensor, Dict]:
        if float(torch.rand((), generator=self.generator)) < self.probability:
            return horizontal_flip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(probability={self.probability})"
