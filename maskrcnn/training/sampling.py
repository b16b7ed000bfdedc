"""Balanced sampling of positive and negative training examples (anchors for
the RPN, proposals for the RoI heads)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def sample_balanced(
    labels: Sequence[Tensor],
    *,
    batch_size_per_image: int,
    positive_fraction: float,
    generator: Optional[torch.Generator] = None,
) -> Tuple[List[Tensor], List[Tensor]]:
    """Picks at most ``batch_size_per_image`` examples per image, at most
    ``positive_fraction`` of them positive, the rest negative, uniformly at
    random within each kind.

    Args:
        labels: one [N_i] tensor per image: >= 1 positive (a class id, or 1.0
            for the RPN), 0 negative, < 0 ignored (never sampled).
        batch_size_per_image: e.g. 256 anchors (RPN), 512 proposals (RoI heads).
        positive_fraction: e.g. 0.5 (RPN), 0.25 (RoI heads). Missing positives
            are made up with negatives.
        generator: the source of randomness (on the labels' device). None draws
            from the global RNG with torchvision's calls in torchvision's order
            (two ``randperm`` per image: positives, then negatives), so that
            seeding the global RNG alike gives the same samples as
            ``BalancedPositiveNegativeSampler``.

    Returns:
        (positive_masks, negative_masks): per image, bool [N_i] masks of the
        sampled positives and negatives.
    """
    if batch_size_per_image < 0:
        raise ValueError(f"batch_size_per_image must be >= 0, got {batch_size_per_image}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    max_positives = int(batch_size_per_image * positive_fraction)
    positive_masks, negative_masks = [], []
    for image_labels in labels:
        if image_labels.dim() != 1:
            raise ValueError(f"labels must be one [N] tensor per image, got shape {tuple(image_labels.shape)}")
        positive = torch.where(image_labels >= 1)[0]
        negative = torch.where(image_labels == 0)[0]
        num_positive = min(positive.numel(), max_positives)
        num_negative = min(negative.numel(), batch_size_per_image - num_positive)
        chosen_positive = positive[
            torch.randperm(positive.numel(), device=positive.device, generator=generator)[:num_positive]
        ]
        chosen_negative = negative[
            torch.randperm(negative.numel(), device=negative.device, generator=generator)[:num_negative]
        ]
        positive_mask = torch.zeros_like(image_labels, dtype=torch.bool)
        negative_mask = torch.zeros_like(image_labels, dtype=torch.bool)
        positive_mask[chosen_positive] = True
        negative_mask[chosen_negative] = True
        positive_masks.append(positive_mask)
        negative_masks.append(negative_mask)
    return positive_masks, negative_masks
