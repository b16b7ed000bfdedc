"""Image preprocessing (normalize, resize, pad into a batch; in training the
targets' boxes and masks resized along) and the mapping of boxes back to
the original images, as torchvision's ``GeneralizedRCNNTransform``."""

from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageBatch(NamedTuple):
    """Images resized and padded into one tensor.

    Attributes:
        tensors: [N, 3, H_pad, W_pad], each image in the top-left corner, zeros
            elsewhere; H_pad and W_pad are multiples of ``size_divisible``.
        image_sizes: (height, width) of each resized image before padding.
    """

    tensors: Tensor
    image_sizes: List[Tuple[int, int]]


def resized_size(height: int, width: int, *, min_size: int, max_size: int) -> Tuple[int, int]:
    """Size of an image scaled so that its short side is ``min_size``, unless
    its long side would then exceed ``max_size`` (then the long side is
    ``max_size``). Sizes are truncated to integers the way
    ``F.interpolate(scale_factor=s, recompute_scale_factor=True)`` does, so
    they equal torchvision's."""
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return int(height * scale), int(width * scale)


def check_images(images: Sequence[Tensor]) -> None:
    """Raises a ValueError unless ``images`` is a non-empty list of floating
    [3, H, W] tensors with H, W > 0."""
    if isinstance(images, Tensor) or len(images) == 0:
        raise ValueError("expected a non-empty list of images, each a Tensor[3, H, W] with values in [0, 1]")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.dim() != 3 or image.size(0) != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"images[{i}] must be a Tensor[3, H, W] (RGB), got {shape}")
        if not image.is_floating_point():
            raise ValueError(
                f"images[{i}] must be floating point with values in [0, 1], got {image.dtype} "
                "(convert uint8 images with image.float() / 255)"
            )
        if image.size(1) == 0 or image.size(2) == 0:
            raise ValueError(f"images[{i}] is empty: shape {tuple(image.shape)}")


class ImageTransform(nn.Module):
    """Normalizes, resizes and batches images for the detector.

    Args:
        min_size: target length of the short side after resizing.
        max_size: upper bound of the long side after resizing.
        train_min_sizes: short sides to pick from in training mode, one
            drawn per image (multi-scale training); None: ``(min_size,)``.
            The draw comes from the global RNG even when there is one size,
            as torchvision's transform does, so that a model and
            torchvision's seeded alike sample the same training examples.
        image_mean, image_std: per-channel normalization (RGB, values in [0, 1]).
        size_divisible: the padded batch's height and width are multiples of
            this (the coarsest FPN stride), so every level's grid is exact.
    """

    def __init__(
        self,
        *,
        min_size: int = 800,
        max_size: int = 1333,
        train_min_sizes: Optional[Sequence[int]] = None,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        size_divisible: int = 32,
    ) -> None:
        super().__init__()
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.train_min_sizes = tuple(int(m) for m in (train_min_sizes or (min_size,)))
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.size_divisible = int(size_divisible)
        # Buffers, not tensors made in forward: a traced graph then takes them
        # as inputs instead of lifted constants, which inductor's constant
        # folding under freezing cannot resolve in an AOTInductor package.
        # Not persistent: the state dict stays torchvision's.
        self.register_buffer("mean_per_channel", torch.tensor(self.image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std_per_channel", torch.tensor(self.image_std).view(3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """[..., 3, H, W] in [0, 1] -> (images - mean) / std per channel."""
        mean = self.mean_per_channel.to(dtype=images.dtype, device=images.device)
        std = self.std_per_channel.to(dtype=images.dtype, device=images.device)
        return (images - mean) / std

    def normalize_and_resize(self, image: Tensor, *, min_size: Optional[int] = None) -> Tensor:
        """[3, H, W] in [0, 1] -> normalized [3, H', W'] (bilinear, half-pixel
        centres) with short side ``min_size`` (default: ``self.min_size``)."""
        image = self.normalize(image)
        size = resized_size(image.size(1), image.size(2), min_size=min_size or self.min_size, max_size=self.max_size)
        # Bilinear resampling to the same size copies every pixel: skip it,
        # except in a traced graph, where the test would split the graph in two.
        if not torch.compiler.is_compiling() and size == (image.size(1), image.size(2)):
            return image
        return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]

    def normalize_and_pad(self, images: Tensor, image_sizes: Tensor) -> Tensor:
        """A padded batch of resized images -> the batch ``forward`` makes of
        them: normalized, zeros outside each image, height and width padded
        up to multiples of ``size_divisible``. Traceable with dynamic shapes.

        Args:
            images: [N, 3, H, W] float in [0, 1], each image top-left.
            image_sizes: int64 [N, 2] (height, width) of each image.
        """
        height, width = images.shape[-2:]
        sizes = image_sizes.to(images.device)
        inside = ((torch.arange(height, device=images.device) < sizes[:, :1])[:, :, None]
                  & (torch.arange(width, device=images.device) < sizes[:, 1:])[:, None, :])  # [N, H, W]
        normalized = torch.where(inside[:, None], self.normalize(images), 0)
        step = self.size_divisible
        return F.pad(normalized, (0, (-width) % step, 0, (-height) % step))

    def draw_train_min_size(self) -> int:
        """One of ``train_min_sizes``, uniformly, from one ``torch.rand``
        draw of the global RNG (torchvision's transform draws one number per
        image the same way)."""
        index = min(int(torch.rand(1).item() * len(self.train_min_sizes)), len(self.train_min_sizes) - 1)
        return self.train_min_sizes[index]

    def forward(self, images: Sequence[Tensor]) -> ImageBatch:
        """Args: images: list of [3, H_i, W_i] floating tensors in [0, 1].

        Returns: an ImageBatch of the resized, normalized images, zero-padded
        to a common size rounded up to ``size_divisible``.
        """
        check_images(images)
        return self.batch([self.normalize_and_resize(image) for image in images])

    def with_targets(self, images: Sequence[Tensor], targets: Sequence[Dict[str, Tensor]]) -> Tuple[ImageBatch, List[Dict[str, Tensor]]]:
        """Training form: each image resized to a short side drawn from
        ``train_min_sizes``, and its target's ``boxes`` [K, 4] scaled and
        ``masks`` [K, H, W] resized (nearest) along with it.

        Args:
            images: list of [3, H_i, W_i] floating tensors in [0, 1].
            targets: one dict per image with ``boxes``, ``labels`` and
                optionally ``masks`` (checked by the caller); not modified.

        Returns:
            (ImageBatch, targets): new target dicts in the resized images'
            coordinates (other entries passed through).
        """
        check_images(images)
        if len(targets) != len(images):
            raise ValueError(f"expected one target per image, got {len(targets)} targets for {len(images)} images")
        resized, resized_targets = [], []
        for image, target in zip(images, targets):
            scaled = self.normalize_and_resize(image, min_size=self.draw_train_min_size())
            resized.append(scaled)
            resized_targets.append(resize_target(target, tuple(image.shape[-2:]), tuple(scaled.shape[-2:])))
        return self.batch(resized), resized_targets

    def batch(self, resized: List[Tensor]) -> ImageBatch:
        """Pads normalized [3, H_i, W_i] images into one ImageBatch."""
        # sym_max: a traced graph keeps the sizes symbolic (max() would
        # fix which image is the largest with a guard).
        height = functools.reduce(torch.sym_max, [image.size(1) for image in resized])
        width = functools.reduce(torch.sym_max, [image.size(2) for image in resized])
        step = self.size_divisible
        padded_h, padded_w = -(-height // step) * step, -(-width // step) * step
        # Zero-padding each image, not copying it into a slice, so that a
        # traced graph holds for any size (a slice that ends at the
        # image's edge would split it by whether sizes are multiples of 32).
        batch = torch.stack([F.pad(image, (0, padded_w - image.size(2), 0, padded_h - image.size(1)))
                             for image in resized])
        return ImageBatch(batch, [(image.size(1), image.size(2)) for image in resized])


def resize_target(target: Dict[str, Tensor], from_size: Tuple[int, int], to_size: Tuple[int, int]) -> Dict[str, Tensor]:
    """A training target for the image resized from ``from_size`` to
    ``to_size`` (height, width): boxes scaled (``rescale_boxes``), masks
    [K, H, W] resized by nearest neighbour and kept uint8, as torchvision's
    transform. A new dict; nothing is done when the size is unchanged."""
    if tuple(from_size) == tuple(to_size):
        return dict(target)
    resized = dict(target)
    resized["boxes"] = rescale_boxes(target["boxes"], from_size, to_size)
    if "masks" in target:
        masks = target["masks"]
        resized["masks"] = F.interpolate(masks[:, None].float(), size=tuple(to_size))[:, 0].to(torch.uint8)
    if "keypoints" in target:
        resized["keypoints"] = rescale_keypoints(target["keypoints"], from_size, to_size)
    return resized


def _size_ratios(from_size: Tuple[int, int], to_size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
    """(height, width) ratios as float32 scalar tensors, as torchvision computes them."""
    return tuple(torch.tensor(new, dtype=torch.float32) / torch.tensor(old, dtype=torch.float32)
                 for new, old in zip(to_size, from_size))


def rescale_boxes(boxes: Tensor, from_size: Tuple[int, int], to_size: Tuple[int, int]) -> Tensor:
    """Boxes [K, 4] (x1, y1, x2, y2) in an image of ``from_size`` (height,
    width) -> the same boxes in an image of ``to_size``. The ratios are float32
    quotients, as torchvision's ``resize_boxes``, so coordinates match it."""
    ratio_h, ratio_w = _size_ratios(from_size, to_size)
    ratios = torch.stack([ratio_w, ratio_h, ratio_w, ratio_h]).to(boxes.device)
    return boxes * ratios


def rescale_keypoints(keypoints: Tensor, from_size: Tuple[int, int], to_size: Tuple[int, int]) -> Tensor:
    """Keypoints [..., 3] (x, y, visibility) in an image of ``from_size``
    -> the same in an image of ``to_size``: x and y scaled by the float32
    ratios of :func:`rescale_boxes`, visibility kept."""
    ratio_h, ratio_w = _size_ratios(from_size, to_size)
    ratios = torch.stack([ratio_w, ratio_h, torch.ones(())]).to(keypoints.device)
    return keypoints * ratios


__all__ = ["ImageBatch", "ImageTransform", "IMAGENET_MEAN", "IMAGENET_STD", "check_images", "rescale_boxes",
           "rescale_keypoints", "resize_target", "resized_size"]
