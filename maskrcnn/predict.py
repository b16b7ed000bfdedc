"""Running a model on image files: read, detect, draw, write PNGs and a
COCO-format JSON of the detections."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm

from .coco_names import UNUSED, label_names
from .data.coco_format import box_masks_to_rles, target_to_annotations
from .evaluation import pasted
from .model import MaskRCNN, box_masks_kept
from .visualize import draw_detections


class ImageReadError(ValueError):
    """An image file that cannot be read."""


@contextmanager
def open_image(path: Path) -> Iterator[Image.Image]:
    """``PIL.Image.open`` whose failures (also while decoding inside the
    block) become an ImageReadError naming the file."""
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error


def read_image(path: Path) -> Tensor:
    """An image file -> [3, H, W] float32 RGB in [0, 1] (EXIF orientation applied)."""
    with open_image(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        width, height = image.size
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return pixels.view(height, width, 3).permute(2, 0, 1).float() / 255


def image_suffixes() -> List[str]:
    """File name endings of the formats Pillow can open (".png", ".jpg", ...)."""
    Image.init()
    return sorted(suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN)


def find_images(paths: Sequence[Path]) -> List[Path]:
    """The image files that ``paths`` name: a file as given (checked later
    when opened), a folder as the files in it whose names end in an image
    format's suffix (any case; hidden files and subfolders left out), sorted
    by name.

    Raises:
        ImageReadError: a folder holding no image file.
    """
    suffixes = set(image_suffixes())
    found: List[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        inside = sorted(entry for entry in path.iterdir()
                        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in suffixes)
        if not inside:
            raise ImageReadError(f"no image files in folder {path} (none of its files ends in a suffix that "
                                 "Pillow reads, such as .png or .jpg)")
        found.extend(inside)
    return found


def output_names(paths: Sequence[Path]) -> List[str]:
    """A distinct PNG name per input (``stem.png``, ``stem-2.png`` on clashes)."""
    names, seen = [], set()
    for path in paths:
        name, n = f"{path.stem}.png", 1
        while name in seen:
            n += 1
            name = f"{path.stem}-{n}.png"
        seen.add(name)
        names.append(name)
    return names


def detections_to_coco(
    images: Sequence[dict], detections: Sequence[Dict[str, Tensor]], *, class_names: Sequence[str],
    mask_threshold: float = 0.5,
) -> dict:
    """A COCO-format dict {"images", "annotations", "categories"} of the
    model's detections (``pycocotools.coco.COCO`` reads it); each annotation
    also has its ``score``, so the list of annotations is a COCO results file.

    Args:
        images: per image {"file_name", "height", "width"}; ids are 1, 2, ...
        detections: the model's output per image: ``box_masks`` [D, 1, M, M]
            (encoded from the box windows by ``maskrcnn_ops.masks_to_rle``)
            or ``masks`` [D, 1, H, W] probabilities (neither for a model
            without masks: no ``segmentation``), and ``keypoints`` [D, K, 3]
            for a model with keypoints (COCO's ``keypoints`` per annotation).
        class_names: name per label (category id = label). Unused labels
            ("N/A" in the COCO table) are categories only if detected (a
            model can predict them), so every annotation has its category.
        mask_threshold: probability above which a mask pixel is set.
    """
    coco = dict(images=[], annotations=[], categories=[])
    for image_id, (info, found) in enumerate(zip(images, detections), start=1):
        coco["images"].append(dict(id=image_id, **info))
        target = dict(boxes=found["boxes"], labels=found["labels"])
        if "box_masks" in found:
            target["rles"] = box_masks_to_rles(found["box_masks"], found["boxes"], (info["height"], info["width"]),
                                               mask_threshold)
        elif "masks" in found:
            target["masks"] = found["masks"][:, 0] > mask_threshold
        if "keypoints" in found:
            target["keypoints"] = found["keypoints"]
        records = target_to_annotations(target, image_id=image_id, first_annotation_id=len(coco["annotations"]) + 1)
        for record, score in zip(records, found["scores"].tolist()):
            record["score"] = score
        coco["annotations"].extend(records)
    detected = {annotation["category_id"] for annotation in coco["annotations"]}
    coco["categories"] = [dict(id=i, name=name) for i, name in enumerate(class_names)
                          if i > 0 and (name != UNUSED or i in detected)]
    return coco


def predict_files(
    model: MaskRCNN,
    paths: Sequence[Path],
    out_dir: Path,
    *,
    device: torch.device,
    batch_size: int = 1,
    mask_threshold: float = 0.5,
    json_name: str = "detections.json",
) -> Dict[str, object]:
    """Detects objects in image files and writes ``out_dir/<stem>.png`` (the
    image with masks, boxes, keypoints and labels drawn) per image and
    ``out_dir/<json_name>`` (COCO format, all images).

    Every image is opened once before the model runs, so an unreadable file
    fails fast (ImageReadError naming it), and nothing is written if
    ``out_dir`` is a file or an output would overwrite an input image
    (ValueError). Returns the COCO dict written.
    """
    paths = [Path(p) for p in paths]
    for path in paths:  # headers only: cheap, and nothing is written if one is bad
        with open_image(path):
            pass
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"the output folder {out_dir} is a file")
    names = output_names(paths)
    inputs = {path.resolve() for path in paths}
    for name in (*names, json_name):
        if (out_dir / name).resolve() in inputs:
            raise ValueError(f"writing {out_dir / name} would overwrite an input image; choose another output folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = model.class_names or label_names(model.num_classes)
    infos, results = [], []
    model.eval()
    # The detections keep their M x M masks (the JSON's RLE is encoded from
    # them); each image's are pasted only to draw it.
    with box_masks_kept(model), tqdm(total=len(paths), unit="image", disable=len(paths) < 2) as progress, \
            torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            images = [read_image(path) for path in chunk]
            outputs = model([image.to(device) for image in images])
            for path, name, image, found in zip(chunk, names[start:], images, outputs):
                found = {key: value.cpu() for key, value in found.items()}
                drawn = draw_detections(image, pasted(found, tuple(image.shape[-2:])), class_names=class_names,
                                        mask_threshold=mask_threshold, skeleton=model.keypoint_skeleton)
                drawn.save(out_dir / name)
                infos.append(dict(file_name=str(path), height=image.size(1), width=image.size(2)))
                results.append(found)
            progress.update(len(chunk))
    coco = detections_to_coco(infos, results, class_names=class_names, mask_threshold=mask_threshold)
    (out_dir / json_name).write_text(json.dumps(coco))
    return coco


__all__ = ["ImageReadError", "detections_to_coco", "find_images", "image_suffixes", "open_image", "output_names",
           "predict_files", "read_image"]
