"""Anchors exactly as torchvision's ``AnchorGenerator`` (same values, same
order), generated on the features' device and cached per shape."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

FPN_SIZES = ((32,), (64,), (128,), (256,), (512,))
FPN_ASPECT_RATIOS = ((0.5, 1.0, 2.0),) * 5


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Zero-centred anchors of one level: [len(ratios) * len(sizes), 4],
    ratio-major, rounded to integers (torchvision's generate_anchors)."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors per FPN level for a batch, as ``torchvision.models.detection.
    anchor_utils.AnchorGenerator``.

    Args:
        sizes: one tuple of anchor sizes (pixels) per feature map.
        aspect_ratios: one tuple of height/width ratios per feature map.

    ``forward(image_list, feature_maps)`` takes an object with ``.tensors``
    [N, 3, H, W] and ``.image_sizes`` (torchvision's ImageList) and the list of
    feature maps [N, C, H_l, W_l]; it returns one [sum_l H_l * W_l * A, 4]
    tensor per image (level-major, then row, column, anchor). The tensor is
    cached and shared between calls and images: do not modify it in place.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = FPN_SIZES,
        aspect_ratios: Sequence[Sequence[float]] = FPN_ASPECT_RATIOS,
    ) -> None:
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"one aspect_ratios tuple per sizes tuple is needed, got {len(sizes)} and {len(aspect_ratios)}")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        # Buffers, so that a traced graph takes them as inputs rather than as
        # lifted constants (which AOTInductor's freezing cannot fold); not
        # persistent, so the state dict stays torchvision's (empty).
        for level, (s, r) in enumerate(zip(self.sizes, self.aspect_ratios)):
            self.register_buffer(f"cell_anchors_{level}", cell_anchors(s, r), persistent=False)
        self._cache: Dict[tuple, Tensor] = {}
        self.max_cached_shapes = 16

    @property
    def cell_anchors(self) -> List[Tensor]:
        """Each level's zero-centred anchors, [A_l, 4] (torchvision's attribute)."""
        return [getattr(self, f"cell_anchors_{level}") for level in range(len(self.sizes))]

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(
        self, grid_sizes: Sequence[Tuple[int, int]], strides: Sequence[Tuple[int, int]], dtype, device
    ) -> Tensor:
        """All anchors of all levels, [sum_l H_l * W_l * A, 4], cached per
        (grid sizes, strides, dtype, device)."""
        if len(grid_sizes) != len(self.cell_anchors):
            raise ValueError(
                f"{len(grid_sizes)} feature maps for anchor generator with {len(self.cell_anchors)} levels"
            )
        if torch.compiler.is_compiling():
            # A traced graph computes them (its sizes are symbolic): no state.
            return self._make_anchors(grid_sizes, strides, dtype, device)
        key = (tuple(map(tuple, grid_sizes)), tuple(map(tuple, strides)), dtype, torch.device(device))
        if key not in self._cache:
            if len(self._cache) >= self.max_cached_shapes:  # multi-scale training: bound the cache
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = self._make_anchors(grid_sizes, strides, dtype, device)
        return self._cache[key]

    def _make_anchors(self, grid_sizes, strides, dtype, device) -> Tensor:
        per_level = []
        for (grid_h, grid_w), (stride_h, stride_w), base in zip(grid_sizes, strides, self.cell_anchors):
            base = base.to(dtype=dtype, device=device)
            shifts_x = torch.arange(0, grid_w, dtype=torch.int32, device=device) * stride_w
            shifts_y = torch.arange(0, grid_h, dtype=torch.int32, device=device) * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            per_level.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return torch.cat(per_level)

    def forward(self, image_list, feature_maps: List[Tensor]) -> List[Tensor]:
        image_h, image_w = image_list.tensors.shape[-2:]
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        strides = [(image_h // g[0], image_w // g[1]) for g in grid_sizes]
        anchors = self.grid_anchors(grid_sizes, strides, feature_maps[0].dtype, feature_maps[0].device)
        return [anchors for _ in range(len(image_list.image_sizes))]
