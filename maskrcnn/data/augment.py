"""Training-time augmentation of (image, target) samples."""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# "left" or "right" as a word of a keypoint name: between separators
# (_ - space . or the ends), any case ("left_eye", "Right Hand", "hip.left").
_SIDE_WORD = re.compile(r"(?<![a-z])(left|right)(?![a-z])")


def keypoint_flip_permutation(names: Sequence[str]) -> List[int]:
    """Which keypoint each keypoint becomes in a left-right mirror image.

    A name with the word "left" swaps with the same name with "right" in its
    place, and vice versa (COCO's people: left_eye <-> right_eye, ...,
    left_ankle <-> right_ankle; the nose stays); a name without either word
    maps to itself. The word may stand between any separators (_ - . space)
    or at either end; case does not matter ("Left Hand" <-> "RIGHT HAND").

    Args:
        names: the keypoint names, e.g. a COCO category's ``keypoints``.

    Returns:
        permutation [J]: the flipped instance's keypoint j is the original's
        ``permutation[j]`` (an involution: swapping twice is the identity).

    Raises:
        ValueError: a left name without its right one (or the reverse), or
            names equal up to case: the mirror image would be mislabeled.
    """
    index_of = {}
    for index, name in enumerate(names):
        key = name.lower()
        if key in index_of:
            raise ValueError(f"keypoint names {names[index_of[key]]!r} and {name!r} differ only in case")
        index_of[key] = index
    permutation = []
    for name in names:
        mirrored = _SIDE_WORD.sub(lambda word: "right" if word.group(1) == "left" else "left", name.lower())
        if mirrored not in index_of:
            raise ValueError(f"keypoint {name!r} has no mirror keypoint {mirrored!r} to swap with on a horizontal "
                             f"flip (names: {list(names)})")
        permutation.append(index_of[mirrored])
    return permutation


def _check_flip_permutation(permutation: Sequence[int], num_keypoints: int) -> None:
    if sorted(permutation) != list(range(num_keypoints)) or any(
            permutation[permutation[j]] != j for j in range(num_keypoints)):
        raise ValueError(f"keypoint_permutation must swap pairs of the {num_keypoints} keypoints (a permutation "
                         f"of 0..{num_keypoints - 1} that is its own inverse), got {list(permutation)}")


def flip_keypoints(keypoints: Tensor, width: int, permutation: Sequence[int]) -> Tensor:
    """Keypoints [K, J, 3] (x, y, visibility) of a mirrored image of
    ``width`` pixels: x' = width - x (coordinates on pixel edges, as the
    boxes'), keypoints reordered by ``permutation`` (see
    ``keypoint_flip_permutation``), visibility kept; unlabeled ones (v 0)
    come out (0, 0, 0)."""
    _check_flip_permutation(permutation, keypoints.size(1))
    swapped = keypoints[:, list(permutation)]
    labeled = swapped[..., 2:] > 0
    mirrored = torch.cat([width - swapped[..., :1], swapped[..., 1:]], dim=-1)
    return torch.where(labeled, mirrored, torch.zeros((), dtype=keypoints.dtype))


def horizontal_flip(
    image: Tensor, target: Dict, *, keypoint_permutation: Optional[Sequence[int]] = None
) -> Tuple[Tensor, Dict]:
    """Mirrors an image [C, H, W] and its target left-right.

    Boxes (x1, y1, x2, y2) with x2 exclusive become (W - x2, y1, W - x1, y2),
    which is again tight around the mirrored mask; masks [K, H, W] are
    mirrored; keypoints [K, J, 3] go through ``flip_keypoints`` (so they
    need ``keypoint_permutation``: a left eye becomes a right eye); other
    entries are passed through. The target is a new dict.

    Raises:
        ValueError: keypoints without ``keypoint_permutation``, or one that
            does not pair up the J keypoints.
    """
    width = image.shape[-1]
    flipped = dict(target)
    if "boxes" in target:
        boxes = target["boxes"]
        flipped["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    if "masks" in target:
        flipped["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        if keypoint_permutation is None:
            raise ValueError("a flip of a target with keypoints needs keypoint_permutation (the mirror swaps left "
                             "and right keypoints): e.g. keypoint_flip_permutation(dataset.keypoint_names)")
        flipped["keypoints"] = flip_keypoints(target["keypoints"], width, keypoint_permutation)
    return image.flip(-1), flipped


class RandomHorizontalFlip:
    """Flips a sample left-right with probability ``probability``.

    Args:
        probability: chance of a flip per call.
        generator: source of the coin tosses; None uses the global RNG (which
            DataLoader seeds differently in each worker).
        keypoint_permutation: for targets with keypoints, the left-right
            swap (``keypoint_flip_permutation`` of the names, or a
            dataset's ``keypoint_flip_permutation``).
    """

    def __init__(
        self,
        probability: float = 0.5,
        *,
        generator: Optional[torch.Generator] = None,
        keypoint_permutation: Optional[Sequence[int]] = None,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        if keypoint_permutation is not None:
            _check_flip_permutation(keypoint_permutation, len(keypoint_permutation))
        self.probability = probability
        self.generator = generator
        self.keypoint_permutation = None if keypoint_permutation is None else list(keypoint_permutation)

    def __call__(self, image: Tensor, target: Dict) -> Tuple[Tensor, Dict]:
        if float(torch.rand((), generator=self.generator)) < self.probability:
            return horizontal_flip(image, target, keypoint_permutation=self.keypoint_permutation)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(probability={self.probability})"
