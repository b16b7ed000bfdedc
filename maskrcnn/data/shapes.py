"""A synthetic instance-segmentation dataset of coloured shapes, generated on
the fly (in the spirit of the "train on shapes" sample of Matterport's Keras
Mask R-CNN): small enough to train a detector on a CPU in minutes, with exact
masks and no download. With ``keypoints=True`` each instance also has the
corners of its shape as keypoints (see ``SHAPE_KEYPOINT_NAMES``)."""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

SHAPE_CLASS_NAMES = ("__background__", "circle", "square", "triangle")
CIRCLE, SQUARE, TRIANGLE = 1, 2, 3

# Keypoints of every instance (ShapesDataset(keypoints=True)): the corners
# of its shape, the topmost first and the others clockwise (on screen, y
# down) from it. A square has four, a triangle three (its fourth is never
# labeled), a circle none. COCO visibility: 2 visible, 1 in the image but
# hidden under a later shape, 0 not labeled (no such corner, or outside the
# image; then x = y = 0, as COCO writes them).
# A mirror image lists a shape's corners anticlockwise, and a square
# (1 4 3 2) and a triangle (1 3 2) would need different swaps: no one
# permutation of these names flips them (keypoint_flip_permutation keeps
# them in place), so the keypoint demo trains without flips.
SHAPE_KEYPOINT_NAMES = ("first_corner", "second_corner", "third_corner", "fourth_corner")
# Consecutive corners, 1-based as COCO's ``skeleton``: a square's outline
# (a triangle's has its third edge from corner 3 to 1, not drawn).
SHAPE_SKELETON = ((1, 2), (2, 3), (3, 4), (4, 1))
# The COCO keypoint evaluation's per-keypoint sigmas (the OKS falloff, in
# pycocotools' kpt_oks_sigmas units): 0.05, between COCO's sharpest joints
# (eyes, 0.025) and its hips (0.107). For a shape of 1000 pixels of area a
# corner 2 px off scores 0.82, 4 px off 0.45 (exp(-d^2 / (2 area (2 sigma)^2))).
SHAPE_KEYPOINT_SIGMAS = (0.05, 0.05, 0.05, 0.05)

# A shape's colour must differ from the background under it by at least this
# (Euclidean distance in RGB in [0, 1]) so that every object is visible.
MIN_COLOUR_CONTRAST = 0.35


def _pixel_centres(window: Tuple[int, int, int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """x [1, w] and y [h, 1] coordinates of the pixel centres of a window
    (x1, y1, x2, y2), integer bounds, x2 and y2 exclusive."""
    x1, y1, x2, y2 = window
    return np.arange(x1, x2)[None, :] + 0.5, np.arange(y1, y2)[:, None] + 0.5


def _inside_shape(kind: int, centre_x: float, centre_y: float, radius: float, angle: float, xs, ys) -> np.ndarray:
    """Boolean [h, w]: which pixel centres (xs [1, w], ys [h, 1]) lie in the
    shape of circumradius ``radius`` rotated by ``angle`` radians."""
    dx, dy = xs - centre_x, ys - centre_y
    if kind == CIRCLE:
        return dx * dx + dy * dy <= radius * radius
    cos, sin = math.cos(angle), math.sin(angle)
    if kind == SQUARE:
        half_side = radius / math.sqrt(2.0)
        along = dx * cos + dy * sin
        across = -dx * sin + dy * cos
        return (np.abs(along) <= half_side) & (np.abs(across) <= half_side)
    # Equilateral triangle: inside when on the inner side of all three edges,
    # i.e. the projection on each edge's outward normal is at most the
    # inradius (half the circumradius).
    inside = np.ones(np.broadcast_shapes(dx.shape, dy.shape), dtype=bool)
    for k in range(3):
        normal_angle = angle + math.pi / 3 + 2 * math.pi * k / 3
        inside &= dx * math.cos(normal_angle) + dy * math.sin(normal_angle) <= radius / 2
    return inside


def _corners(kind: int, centre_x: float, centre_y: float, radius: float, angle: float) -> np.ndarray:
    """[C, 2] (x, y) corners of a shape (C = 4 square, 3 triangle, 0
    circle), the topmost first, then clockwise on screen."""
    if kind == CIRCLE:
        return np.zeros((0, 2))
    # The vertices lie on the circumcircle, midway between the normals of
    # the edges _inside_shape uses.
    if kind == SQUARE:
        angles = angle + math.pi / 4 + np.arange(4) * math.pi / 2
    else:
        angles = angle + 2 * math.pi / 3 * np.arange(3)
    corners = np.stack([centre_x + radius * np.cos(angles), centre_y + radius * np.sin(angles)], axis=1)
    # Increasing angle is clockwise on screen (y points down): start at the topmost.
    return np.roll(corners, -int(np.argmin(corners[:, 1])), axis=0)


def shape_keypoints(
    shapes: List[Tuple[int, float, float, float, float]], kept: List[int], boxes: np.ndarray, height: int, width: int
) -> np.ndarray:
    """Keypoints [K, 4, 3] float32 (see SHAPE_KEYPOINT_NAMES) of the kept
    shapes (indices into ``shapes``, each (kind, centre_x, centre_y, radius,
    angle), in drawing order) whose tight boxes are ``boxes`` [K, 4]."""
    keypoints = np.zeros((len(kept), len(SHAPE_KEYPOINT_NAMES), 3), dtype=np.float32)
    for row, index in enumerate(kept):
        for k, (x, y) in enumerate(_corners(*shapes[index])):
            if not (0 <= x <= width and 0 <= y <= height):
                continue
            hidden = any(_inside_shape(*later, np.array([[x]]), np.array([[y]]))[0, 0] for later in shapes[index + 1:])
            if not hidden:
                # A visible corner's pixel is in the mask but the vertex
                # itself may lie up to a pixel past the tight box: move it
                # in so that it is a training target in its own box.
                x = min(max(x, boxes[row, 0]), boxes[row, 2])
                y = min(max(y, boxes[row, 1]), boxes[row, 3])
            keypoints[row, k] = (x, y, 1 if hidden else 2)
    return keypoints


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[H, W, 3] float32: a linear gradient between two random colours in a
    random direction."""
    start, end = rng.uniform(0.0, 1.0, size=(2, 3)).astype(np.float32)
    direction = rng.uniform(0.0, 2 * math.pi)
    xs = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.cos(direction))
    ys = np.arange(height, dtype=np.float32)[:, None] * np.float32(math.sin(direction))
    position = xs + ys  # [H, W]
    position -= position.min()
    position /= max(float(position.max()), 1e-6)  # in [0, 1]
    return start + (end - start) * position[..., None]


class ShapesDataset(Dataset):
    """Images of overlapping circles, squares and triangles on a gradient.

    Image ``i`` is a pure function of ``(seed, i)``: any order, any worker,
    any number of times gives the same pixels. Later shapes occlude earlier
    ones; masks show the visible part only and an instance left with fewer
    than ``min_visible_pixels`` pixels is dropped (the last shape drawn is
    never occluded, so every image has at least one object unless it is
    mostly outside the image, which the size and position ranges prevent).

    Args:
        num_images: the dataset's length.
        image_size: side of a square image, or (height, width).
        seed: the dataset; two seeds give independent images.
        min_shapes, max_shapes: shapes drawn per image (uniform, inclusive).
        min_radius, max_radius: circumradius of a shape as a fraction of the
            image's shorter side.
        noise: standard deviation of the Gaussian pixel noise (in [0, 1] units).
        min_visible_pixels: smaller (occluded) instances are dropped.
        transform: optional callable (image, target) -> (image, target),
            e.g. ``RandomHorizontalFlip``.
        keypoints: add each instance's corners (``SHAPE_KEYPOINT_NAMES``)
            to its target.

    ``dataset[i]`` returns ``(image, target)``: image [3, H, W] float32 in
    [0, 1]; target ``boxes`` [K, 4] float32 (x1, y1, x2, y2) tight around the
    visible mask, x2 and y2 exclusive (pixel edges, as COCO and torchvision),
    ``labels`` [K] int64 (1 circle, 2 square, 3 triangle; 0 is background),
    ``masks`` [K, H, W] uint8, ``image_id`` = i, ``area`` [K] float32 (mask
    pixels), ``iscrowd`` [K] int64 zeros, and with ``keypoints`` also
    ``keypoints`` [K, 4, 3] float32 (x, y, visibility). Class names:
    ``SHAPE_CLASS_NAMES``; keypoint names ``keypoint_names`` (None without
    keypoints), ``SHAPE_SKELETON``, ``SHAPE_KEYPOINT_SIGMAS``.
    """

    class_names = SHAPE_CLASS_NAMES
    skeleton = SHAPE_SKELETON
    keypoint_sigmas = SHAPE_KEYPOINT_SIGMAS

    def __init__(
        self,
        num_images: int,
        *,
        image_size: Union[int, Tuple[int, int]] = 256,
        seed: int = 0,
        min_shapes: int = 1,
        max_shapes: int = 4,
        min_radius: float = 0.08,
        max_radius: float = 0.25,
        noise: float = 0.03,
        min_visible_pixels: int = 40,
        transform: Optional[Callable[[Tensor, Dict], Tuple[Tensor, Dict]]] = None,
        keypoints: bool = False,
    ) -> None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if num_images < 0 or height < 16 or width < 16:
            raise ValueError(
                f"need num_images >= 0 and an image of at least 16x16 pixels, got {num_images} and {height}x{width}"
            )
        if not 1 <= min_shapes <= max_shapes:
            raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes} and {max_shapes}")
        if not 0 < min_radius <= max_radius <= 0.5:
            raise ValueError(f"need 0 < min_radius <= max_radius <= 0.5, got {min_radius} and {max_radius}")
        self.num_images = num_images
        self.height, self.width = int(height), int(width)
        self.seed = seed
        self.min_shapes, self.max_shapes = min_shapes, max_shapes
        self.min_radius, self.max_radius = min_radius, max_radius
        self.noise = noise
        self.min_visible_pixels = min_visible_pixels
        self.transform = transform
        self.keypoint_names = SHAPE_KEYPOINT_NAMES if keypoints else None

    @property
    def num_classes(self) -> int:
        """Classes including background (4)."""
        return len(SHAPE_CLASS_NAMES)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range for a ShapesDataset of {self.num_images} images")
        pixels, masks, labels, keypoints = self.draw_with_keypoints(index)
        image = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        target = _target_from_masks(masks, labels, image_id=index)
        if self.keypoint_names is not None:
            target["keypoints"] = torch.from_numpy(keypoints)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def draw(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image ``index`` as numpy arrays: pixels [H, W, 3] float32 in [0, 1],
        visible masks [K, H, W] uint8, labels [K] int64."""
        return self.draw_with_keypoints(index)[:3]

    def draw_with_keypoints(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``draw`` and the instances' keypoints [K, 4, 3] float32 (see
        ``SHAPE_KEYPOINT_NAMES``)."""
        rng = np.random.default_rng([self.seed, index])
        height, width = self.height, self.width
        pixels = _background(rng, height, width)
        shorter = min(height, width)
        masks, labels, shapes = [], [], []
        for _ in range(int(rng.integers(self.min_shapes, self.max_shapes + 1))):
            kind = int(rng.integers(CIRCLE, TRIANGLE + 1))
            radius = rng.uniform(self.min_radius, self.max_radius) * shorter
            # Centres keep at least half the shape inside the image.
            centre_x = rng.uniform(0.5 * radius, width - 0.5 * radius)
            centre_y = rng.uniform(0.5 * radius, height - 0.5 * radius)
            angle = rng.uniform(0.0, 2 * math.pi)
            window = (
                max(int(centre_x - radius), 0),
                max(int(centre_y - radius), 0),
                min(int(math.ceil(centre_x + radius)) + 1, width),
                min(int(math.ceil(centre_y + radius)) + 1, height),
            )
            xs, ys = _pixel_centres(window)
            inside = _inside_shape(kind, centre_x, centre_y, radius, angle, xs, ys)
            if not inside.any():
                continue
            # All pixel work stays inside the shape's window.
            rows, columns = slice(window[1], window[3]), slice(window[0], window[2])
            window_pixels = pixels[rows, columns]
            under = window_pixels[inside].mean(axis=0)
            colour = rng.uniform(0.0, 1.0, size=3)
            for _attempt in range(10):  # a few tries at a colour that stands out
                if np.linalg.norm(colour - under) >= MIN_COLOUR_CONTRAST:
                    break
                colour = rng.uniform(0.0, 1.0, size=3)
            window_pixels[inside] = colour
            for earlier in masks:  # the new shape hides what lies under it
                earlier[rows, columns] &= ~inside
            mask = np.zeros((height, width), dtype=bool)
            mask[rows, columns] = inside
            masks.append(mask)
            labels.append(kind)
            shapes.append((kind, centre_x, centre_y, radius, angle))
        pixels += self.noise * rng.standard_normal(size=pixels.shape, dtype=np.float32)
        np.clip(pixels, 0.0, 1.0, out=pixels)
        kept = [i for i, mask in enumerate(masks) if int(mask.sum()) >= self.min_visible_pixels]
        stacked = np.stack([masks[i] for i in kept]) if kept else np.zeros((0, height, width), dtype=bool)
        keypoints = shape_keypoints(shapes, kept, boxes_from_masks(stacked), height, width)
        return pixels, stacked.astype(np.uint8), np.array([labels[i] for i in kept], dtype=np.int64), keypoints


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight boxes [K, 4] float32 (x1, y1, x2, y2), x2 and y2 exclusive, of
    masks [K, H, W]; an empty mask gives a zero box (0, 0, 0, 0)."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        columns = np.flatnonzero(mask.any(axis=0))
        if rows.size > 0:
            boxes[i] = (columns[0], rows[0], columns[-1] + 1, rows[-1] + 1)
    return boxes


def _target_from_masks(masks: np.ndarray, labels: np.ndarray, *, image_id: int) -> Dict:
    """The target dict of one image from its visible masks [K, H, W] uint8
    (numpy, single-threaded: cheaper than torch's kernels at this size in a
    data-loader worker)."""
    return {
        "boxes": torch.from_numpy(boxes_from_masks(masks)),
        "labels": torch.from_numpy(labels),
        "masks": torch.from_numpy(masks),
        "image_id": image_id,
        "area": torch.from_numpy(masks.reshape(masks.shape[0], -1).sum(axis=1, dtype=np.float32)),
        "iscrowd": torch.zeros(labels.shape[0], dtype=torch.int64),
    }
