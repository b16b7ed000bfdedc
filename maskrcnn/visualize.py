"""Drawing detections: translucent masks, boxes and labels on the image."""

from __future__ import annotations

import colorsys
from typing import Dict, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def label_color(label: int) -> tuple:
    """A bright RGB colour per label, far from its neighbours' (hues spaced
    by the golden ratio)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def image_to_uint8(image: Tensor) -> Tensor:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8 on the CPU."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()


def blend_masks(pixels: Tensor, masks: Tensor, labels: Tensor, *, threshold: float, alpha: float) -> Tensor:
    """Tints each pixel covered by a mask with its detection's label colour.

    Args:
        pixels: [H, W, 3] uint8.
        masks: [D, 1, H, W] probabilities, best detection first.
        labels: [D].
        threshold: mask probability above which a pixel belongs to the object.
        alpha: opacity of the tint.

    Returns:
        [H, W, 3] uint8. Where masks overlap, the best-scoring detection's
        colour wins (the first one along D).
    """
    if masks.numel() == 0:
        return pixels
    inside = masks[:, 0].cpu() > threshold  # [D, H, W]
    covered = inside.any(dim=0)
    first = inside.to(torch.uint8).argmax(dim=0)  # first (best) detection covering each pixel
    palette = torch.tensor([label_color(int(label)) for label in labels.tolist()], dtype=torch.float32)
    tint = palette[first]  # [H, W, 3]
    blended = pixels.float() * (1 - alpha) + tint * alpha
    return torch.where(covered[..., None], blended.round(), pixels.float()).to(torch.uint8)


def draw_detections(
    image: Tensor,
    detections: Dict[str, Tensor],
    *,
    class_names: Sequence[str],
    mask_threshold: float = 0.5,
    alpha: float = 0.45,
) -> Image.Image:
    """The image with the detections drawn on it.

    Args:
        image: [3, H, W] float in [0, 1] (the image the detections refer to).
        detections: the model's output for the image: ``boxes`` [D, 4],
            ``labels`` [D], ``scores`` [D], optionally ``masks`` [D, 1, H, W].
        class_names: name of each label.
        mask_threshold: mask probability that counts as inside.
        alpha: opacity of the mask tint.
    """
    pixels = image_to_uint8(image)
    labels = detections["labels"].cpu()
    if "masks" in detections:
        pixels = blend_masks(pixels, detections["masks"], labels, threshold=mask_threshold, alpha=alpha)
    canvas = Image.fromarray(pixels.numpy())
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    # Worst detections first, so the best boxes and captions end up on top.
    for box, label, score in reversed(list(zip(detections["boxes"].tolist(), labels.tolist(), detections["scores"].tolist()))):
        color = label_color(label)
        draw.rectangle(box, outline=color, width=2)
        name = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
        caption = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        height = bottom - top + 2
        # Above the box, or just inside it at the image's top edge.
        y = box[1] - height if box[1] >= height else box[1]
        draw.rectangle((box[0], y, box[0] + right - left + 2, y + height), fill=color)
        draw.text((box[0] + 1 - left, y + 1 - top), caption, fill=(0, 0, 0), font=font)
    return canvas


def enlarge(image: Tensor, detections: Dict[str, Tensor], *, scale: int) -> tuple:
    """An image [3, H, W] and its detections ``scale`` times larger (pixels
    and masks repeated, boxes scaled), so that captions fit on small images."""
    if scale == 1:
        return image, detections
    bigger = dict(detections, boxes=detections["boxes"] * scale)
    if "masks" in detections:
        bigger["masks"] = detections["masks"].repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return image.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1), bigger


def detection_grid(
    images: Sequence[Tensor],
    detections: Sequence[Dict[str, Tensor]],
    *,
    class_names: Sequence[str],
    columns: int = 4,
    score_threshold: float = 0.0,
    scale: int = 1,
    mask_threshold: float = 0.5,
    margin: int = 4,
) -> Image.Image:
    """Several images with their detections drawn (``draw_detections``),
    tiled row by row on a white sheet, ``columns`` per row; images of
    different sizes each take a cell of the largest size.

    Args:
        score_threshold: detections scoring below this are not drawn.
        scale: integer enlargement of every image (see ``enlarge``).
    """
    if len(images) == 0 or len(images) != len(detections):
        raise ValueError(f"expected as many detections as images (at least one), got {len(detections)} and {len(images)}")
    drawn = []
    for image, found in zip(images, detections):
        keep = found["scores"] >= score_threshold
        image, found = enlarge(image, {key: value[keep] for key, value in found.items()}, scale=scale)
        drawn.append(draw_detections(image, found, class_names=class_names, mask_threshold=mask_threshold))
    cell_w = max(d.width for d in drawn) + margin
    cell_h = max(d.height for d in drawn) + margin
    columns = min(columns, len(drawn))
    rows = -(-len(drawn) // columns)
    sheet = Image.new("RGB", (columns * cell_w + margin, rows * cell_h + margin), (255, 255, 255))
    for index, picture in enumerate(drawn):
        row, column = divmod(index, columns)
        sheet.paste(picture, (margin + column * cell_w, margin + row * cell_h))
    return sheet


__all__ = ["blend_masks", "detection_grid", "draw_detections", "enlarge", "image_to_uint8", "label_color"]
