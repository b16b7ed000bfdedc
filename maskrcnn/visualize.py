"""Drawing detections: hatched masks with outlines, boxes, keypoints (dots
joined by the skeleton's lines), and captions sized to the image and placed
so that no two overlap."""

from __future__ import annotations

import colorsys
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

Rect = Tuple[int, int, int, int]  # x1, y1, x2, y2 (x2, y2 exclusive)


def label_color(label: int) -> tuple:
    """A bright RGB colour per label, far from its neighbours' (hues spaced
    by the golden ratio)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def text_color(background: tuple) -> tuple:
    """Black or white, whichever reads better on ``background``."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def image_to_uint8(image: Tensor) -> Tensor:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8 on the CPU."""
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu()


def line_width(height: int, width: int) -> int:
    """Outline and box width in pixels for an image of this size (2 px at
    256 px, 4 px at 800 px)."""
    return max(2, round(min(height, width) / 200))


def caption_font(height: int, width: int) -> ImageFont.ImageFont:
    """The caption font for an image of this size: about 1/22 of the short
    side (12 px at 256, 36 px at 800 and more), at least 11 px."""
    size = max(11, min(36, round(min(height, width) / 22)))
    return ImageFont.load_default(size=size)


def _owner(inside: Tensor) -> Tensor:
    """[D, H, W] bool -> [H, W] int64: the first (best) detection covering
    each pixel, -1 where none does."""
    first = inside.to(torch.uint8).argmax(dim=0)
    return torch.where(inside.any(dim=0), first, torch.full_like(first, -1))


def _differs_nearby(owner: Tensor, radius: int) -> Tensor:
    """[H, W] bool: pixels with a pixel of another owner within ``radius``
    (in the max norm)."""
    values = owner.float()[None, None]
    size = 2 * radius + 1
    high = F.max_pool2d(values, size, stride=1, padding=radius)
    low = -F.max_pool2d(-values, size, stride=1, padding=radius)
    return ((high != values) | (low != values))[0, 0]


def blend_masks(
    pixels: Tensor, masks: Tensor, labels: Tensor, *, threshold: float, alpha: float, outline: int = 2,
    hatch: Optional[int] = None,
) -> Tensor:
    """Paints each detection's mask in its label colour so that it stands
    out even on an object of that colour: a translucent tint, diagonal
    stripes of full colour, an outline of full colour along the mask's
    edge and a dark line just outside it.

    Args:
        pixels: [H, W, 3] uint8.
        masks: [D, 1, H, W] probabilities, best detection first.
        labels: [D].
        threshold: mask probability above which a pixel belongs to the object.
        alpha: opacity of the tint.
        outline: width of the coloured edge in pixels (0: none).
        hatch: distance between stripes in pixels (default: 4 outlines; 0: none).

    Returns:
        [H, W, 3] uint8. Where masks overlap, the best-scoring detection's
        colour wins (the first one along D), and the edge between the two
        is drawn.
    """
    if masks.numel() == 0:
        return pixels
    owner = _owner(masks[:, 0].cpu() > threshold)  # [H, W]
    covered = owner >= 0
    palette = torch.tensor([label_color(int(label)) for label in labels.tolist()], dtype=torch.float32)
    colour = palette[owner.clamp(min=0)]  # [H, W, 3]
    out = pixels.float()
    out = torch.where(covered[..., None], out * (1 - alpha) + colour * alpha, out)
    hatch = 4 * max(outline, 1) if hatch is None else hatch
    if hatch > 0:
        height, width = owner.shape
        diagonal = torch.arange(height)[:, None] + torch.arange(width)[None, :]
        stripes = covered & (diagonal % hatch < max(1, outline // 2))
        out = torch.where(stripes[..., None], colour, out)
    if outline > 0:
        edge = _differs_nearby(owner, outline)
        out = torch.where((edge & covered)[..., None], colour, out)
        out = torch.where((_differs_nearby(owner, 1) & ~covered)[..., None], out * 0.25, out)
    return out.round().to(torch.uint8)


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_captions(boxes: Sequence[Sequence[float]], sizes: Sequence[Tuple[int, int]], *, width: int,
                   height: int) -> List[Optional[Rect]]:
    """Where to put each box's caption (width, height in ``sizes``) so that
    no two captions overlap and all lie inside the image.

    Boxes are taken in order (put the best first): each caption goes to the
    free place nearest to just above its box's top-left corner, trying
    above and below the box, inside it, and then rows further away; a
    caption with no free place at all is None (left out).
    """
    placed: List[Rect] = []
    result: List[Optional[Rect]] = []
    for box, (w, h) in zip(boxes, sizes):
        if w > width or h > height:
            result.append(None)
            continue
        x1, y1, x2, y2 = (round(v) for v in box)
        home_x, home_y = x1, y1 - h
        xs = {x1, x2 - w, x1 - w, x2}
        ys = {y1 - h, y1, y2 - h, y2}
        ys.update(y1 - h - k * h for k in range(1, height // h + 1))
        ys.update(y2 + k * h for k in range(1, height // h + 1))
        candidates = {(min(max(x, 0), width - w), min(max(y, 0), height - h)) for x in xs for y in ys}
        chosen = None
        for x, y in sorted(candidates, key=lambda p: (abs(p[1] - home_y) + abs(p[0] - home_x), p)):
            rect = (x, y, x + w, y + h)
            if not any(_overlaps(rect, other) for other in placed):
                chosen = rect
                break
        if chosen is not None:
            placed.append(chosen)
        result.append(chosen)
    return result


def draw_keypoints(
    draw: ImageDraw.ImageDraw, keypoints: Tensor, scores: Optional[Tensor], labels: Sequence[int], *,
    skeleton: Sequence[Tuple[int, int]] = (), threshold: float = 0.0, radius: int = 2,
) -> None:
    """Draws each detection's keypoints as dots (a colour per keypoint
    index, outlined in black) joined by the skeleton's lines (the label's
    colour).

    Args:
        keypoints: [D, K, 3] (x, y, v) in the image's pixels.
        scores: [D, K] (the model's heatmap logits) or None; a keypoint
            whose score is not above ``threshold`` (or whose v is 0) is
            not drawn.
        labels: [D] the detections' labels (line colours).
        skeleton: pairs of 1-based keypoint indices (COCO's ``skeleton``).
    """
    if keypoints.numel() == 0:
        return
    keypoints = keypoints.detach().float().cpu()
    shown = keypoints[..., 2] > 0
    if scores is not None:
        shown &= scores.detach().cpu() > threshold
    for points, visible, label in zip(keypoints.tolist(), shown.tolist(), labels):
        for first, second in skeleton:
            if 1 <= first <= len(points) and 1 <= second <= len(points) and visible[first - 1] and visible[second - 1]:
                draw.line([tuple(points[first - 1][:2]), tuple(points[second - 1][:2])], fill=label_color(label),
                          width=max(1, radius // 2))
        for index, ((x, y, _), is_visible) in enumerate(zip(points, visible)):
            if is_visible:
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=label_color(index + 7),
                             outline=(0, 0, 0))


def draw_detections(
    image: Tensor,
    detections: Dict[str, Tensor],
    *,
    class_names: Sequence[str],
    mask_threshold: float = 0.5,
    alpha: float = 0.35,
    skeleton: Sequence[Tuple[int, int]] = (),
    keypoint_threshold: float = 0.0,
) -> Image.Image:
    """The image with the detections drawn on it: masks (see
    ``blend_masks``), boxes in the label's colour, and captions "name
    score" sized to the image, never overlapping each other (see
    ``place_captions``; the best detections get the nearest places, a
    caption moved away from its box gets a line to it).

    Args:
        image: [3, H, W] float in [0, 1] (the image the detections refer to).
        detections: the model's output for the image: ``boxes`` [D, 4],
            ``labels`` [D], ``scores`` [D], optionally ``masks`` [D, 1, H, W]
            and ``keypoints`` [D, K, 3] with ``keypoints_scores`` [D, K],
            best first.
        class_names: name of each label.
        mask_threshold: mask probability that counts as inside.
        alpha: opacity of the mask tint.
        skeleton, keypoint_threshold: see ``draw_keypoints``.
    """
    height, width = image.shape[-2:]
    thickness = line_width(height, width)
    pixels = image_to_uint8(image)
    labels = detections["labels"].cpu().tolist()
    boxes = detections["boxes"].cpu().tolist()
    scores = detections["scores"].cpu().tolist()
    if "masks" in detections:
        pixels = blend_masks(pixels, detections["masks"], detections["labels"], threshold=mask_threshold,
                             alpha=alpha, outline=thickness)
    canvas = Image.fromarray(pixels.numpy())
    draw = ImageDraw.Draw(canvas)
    font = caption_font(height, width)
    # Worst detections first, so the best boxes end up on top.
    for box, label in reversed(list(zip(boxes, labels))):
        draw.rectangle(box, outline=label_color(label), width=thickness)
    if "keypoints" in detections:
        draw_keypoints(draw, detections["keypoints"], detections.get("keypoints_scores"), labels, skeleton=skeleton,
                       threshold=keypoint_threshold, radius=thickness + 1)

    captions, sizes, offsets = [], [], []
    pad = max(1, thickness // 2)
    for label, score in zip(labels, scores):
        name = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
        captions.append(f"{name} {score:.2f}")
        left, top, right, bottom = draw.textbbox((0, 0), captions[-1], font=font)
        sizes.append((right - left + 2 * pad, bottom - top + 2 * pad))
        offsets.append((pad - left, pad - top))
    places = place_captions(boxes, sizes, width=width, height=height)
    for box, label, caption, place, (dx, dy) in zip(boxes, labels, captions, places, offsets):
        if place is None:
            continue
        color = label_color(label)
        x1, y1, x2, y2 = place
        corner = (min(max(box[0], x1), x2 - 1), min(max(box[1], y1), y2 - 1))  # the caption's point nearest the box
        if abs(corner[0] - box[0]) + abs(corner[1] - box[1]) > thickness + 1:
            draw.line([corner, (box[0], box[1])], fill=color, width=max(1, thickness // 2))
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=color, outline=(0, 0, 0))
        draw.text((x1 + dx, y1 + dy), caption, fill=text_color(color), font=font)
    return canvas


def enlarge(image: Tensor, detections: Dict[str, Tensor], *, scale: int) -> tuple:
    """An image [3, H, W] and its detections ``scale`` times larger (pixels
    and masks repeated, boxes scaled), so that captions fit on small images."""
    if scale == 1:
        return image, detections
    bigger = dict(detections, boxes=detections["boxes"] * scale)
    if "keypoints" in detections:
        bigger["keypoints"] = detections["keypoints"] * torch.tensor([scale, scale, 1.0])
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
    skeleton: Sequence[Tuple[int, int]] = (),
) -> Image.Image:
    """Several images with their detections drawn (``draw_detections``),
    tiled row by row on a white sheet, ``columns`` per row; images of
    different sizes each take a cell of the largest size.

    Args:
        score_threshold: detections scoring below this are not drawn.
        scale: integer enlargement of every image (see ``enlarge``).
        skeleton: of the keypoints (see ``draw_keypoints``).
    """
    if len(images) == 0 or len(images) != len(detections):
        raise ValueError(f"expected as many detections as images (at least one), got {len(detections)} and {len(images)}")
    drawn = []
    for image, found in zip(images, detections):
        keep = found["scores"] >= score_threshold
        image, found = enlarge(image, {key: value[keep] for key, value in found.items()}, scale=scale)
        drawn.append(draw_detections(image, found, class_names=class_names, mask_threshold=mask_threshold,
                                     skeleton=skeleton))
    cell_w = max(d.width for d in drawn) + margin
    cell_h = max(d.height for d in drawn) + margin
    columns = min(columns, len(drawn))
    rows = -(-len(drawn) // columns)
    sheet = Image.new("RGB", (columns * cell_w + margin, rows * cell_h + margin), (255, 255, 255))
    for index, picture in enumerate(drawn):
        row, column = divmod(index, columns)
        sheet.paste(picture, (margin + column * cell_w, margin + row * cell_h))
    return sheet


__all__ = ["blend_masks", "caption_font", "detection_grid", "draw_detections", "draw_keypoints", "enlarge",
           "image_to_uint8", "label_color", "line_width", "place_captions", "text_color"]
