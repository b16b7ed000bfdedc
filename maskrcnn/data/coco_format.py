"""Conversions between our (image, target) samples and the COCO format:
masks to and from RLE / polygons, targets to COCO annotation records, and a
dataset written out as a COCO folder (PNG images + instances JSON)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torch import Tensor


def masks_to_rles(masks: Union[Tensor, np.ndarray]) -> List[Dict]:
    """Compressed RLEs of binary masks [N, H, W] (nonzero = inside), each
    ``{"size": [H, W], "counts": str}``, JSON-ready."""
    array = masks.detach().cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if array.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {array.shape}")
    # pycocotools encodes a Fortran-ordered [H, W, N] stack in one call.
    rles = coco_mask.encode(np.asfortranarray((array != 0).transpose(1, 2, 0), dtype=np.uint8))
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in rles]


def box_masks_to_rles(box_masks: Tensor, boxes: Tensor, image_size: Tuple[int, int], threshold: float = 0.5
                      ) -> List[Dict]:
    """Compressed RLEs of the masks that pasting ``box_masks`` [N, 1, M, M]
    (or [N, M, M]) probabilities into their ``boxes`` [N, 4] in an image of
    ``image_size`` would give, binarized at > ``threshold``, each
    ``{"size": [H, W], "counts": str}``, JSON-ready: what ``masks_to_rles``
    gives for the pasted masks, encoded by ``maskrcnn_ops.masks_to_rle``
    from the box windows, without full-size masks."""
    import maskrcnn_ops

    masks = box_masks.reshape(box_masks.shape[0], box_masks.shape[-2], box_masks.shape[-1])
    rles = maskrcnn_ops.masks_to_rle(masks, boxes, image_size, threshold)
    return [{"size": rle["size"], "counts": rle["counts"].decode("ascii")} for rle in rles]


def mask_to_rle(mask: Union[Tensor, np.ndarray]) -> Dict:
    """Compressed RLE of one binary mask [H, W]; see ``masks_to_rles``."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    return masks_to_rles(mask[None])[0]


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` as a uint8 mask [height, width].

    Args:
        segmentation: a list of polygons ``[[x1, y1, x2, y2, ...], ...]``
            (parts of one object, merged), an uncompressed RLE
            ``{"size": [h, w], "counts": [int, ...]}`` or a compressed one
            (``"counts"`` a string). Validated beforehand by the reader.
    """
    if isinstance(segmentation, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation
        # notice on every call; the result is unaffected.
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle)


def target_to_annotations(
    target: Dict, *, image_id: int, first_annotation_id: int, category_ids: Optional[Dict[int, int]] = None
) -> List[Dict]:
    """COCO annotation records of one image's target.

    Args:
        target: ``boxes`` [K, 4] (x1, y1, x2, y2), ``labels`` [K], ``masks``
            [K, H, W] or, already encoded, ``rles`` (K compressed RLEs as
            ``masks_to_rles`` gives) or neither (no ``segmentation``; area
            of the boxes); optional ``area`` [K] (default: mask pixels),
            ``iscrowd`` [K] (default 0) and ``keypoints`` [K, J, 3] (x, y,
            visibility).
        image_id: the COCO image id.
        first_annotation_id: ids are consecutive from here (>= 1: COCOeval
            takes id 0 for "unmatched").
        category_ids: label -> COCO category id (default: the label itself).

    Returns:
        K dicts with ``id``, ``image_id``, ``category_id``, ``bbox`` [x, y,
        w, h], ``area``, ``iscrowd`` and ``segmentation`` (compressed RLE),
        and with keypoints COCO's ``keypoints`` [x1, y1, v1, x2, ...] and
        ``num_keypoints`` (those with v > 0).
    """
    if first_annotation_id < 1:
        raise ValueError(f"annotation ids must start at 1 or more, got {first_annotation_id}")
    boxes = target["boxes"].tolist()
    labels = target["labels"].tolist()
    rles = target["rles"] if "rles" in target else masks_to_rles(target["masks"]) if "masks" in target else None
    if "area" in target:
        areas = target["area"].tolist()
    elif rles is None:  # no masks (a Keypoint R-CNN's detections): box areas
        areas = [(x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in boxes]
    elif "rles" in target:
        areas = [float(a) for a in coco_mask.area([{**r, "counts": r["counts"].encode("ascii")} for r in rles])] \
            if rles else []
    else:
        areas = target["masks"].flatten(1).sum(dim=1).tolist()
    crowd = target["iscrowd"].tolist() if "iscrowd" in target else [0] * len(labels)
    records = []
    for k, ((x1, y1, x2, y2), label) in enumerate(zip(boxes, labels)):
        records.append(
            {
                "id": first_annotation_id + k,
                "image_id": image_id,
                "category_id": category_ids[label] if category_ids is not None else int(label),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float(areas[k]),
                "iscrowd": int(crowd[k]),
            }
        )
        if rles is not None:
            records[-1]["segmentation"] = rles[k]
    if "keypoints" in target:
        for record, keypoints in zip(records, target["keypoints"].tolist()):
            record["keypoints"] = [float(value) for point in keypoints for value in point]
            record["num_keypoints"] = sum(1 for point in keypoints if point[2] > 0)
    return records


def _categories(class_names: Sequence[str], dataset=None) -> List[Dict]:
    """COCO categories of a class-name table indexed by label (0 background;
    "N/A" marks unused labels, as torchvision's COCO table); each with the
    dataset's ``keypoint_names`` and ``skeleton`` when it has keypoints."""
    extra = {}
    if getattr(dataset, "keypoint_names", None):
        extra = {"keypoints": list(dataset.keypoint_names),
                 "skeleton": [list(edge) for edge in getattr(dataset, "skeleton", ())]}
    return [{"id": label, "name": name, **extra} for label, name in enumerate(class_names)
            if label > 0 and name != "N/A"]


def _class_names(dataset) -> Sequence[str]:
    names = getattr(dataset, "class_names", None)
    if names is None:
        raise ValueError(
            f"{type(dataset).__name__} has no class_names (a table of names indexed by label, "
            f"0 = background): pass class_names explicitly"
        )
    return names


def _image_id(target: Dict, index: int) -> int:
    image_id = target.get("image_id", index)
    return int(image_id.item() if isinstance(image_id, Tensor) else image_id)


def _coco_records(dataset):
    """Yields (image, image record, annotation records) per sample, with
    annotation ids consecutive from 1 over the dataset."""
    next_annotation_id = 1
    for index in range(len(dataset)):
        image, target = dataset[index]
        image_id = _image_id(target, index)
        height, width = int(image.shape[-2]), int(image.shape[-1])
        record = {"id": image_id, "file_name": f"{image_id:012d}.png", "height": height, "width": width}
        annotations = target_to_annotations(target, image_id=image_id, first_annotation_id=next_annotation_id)
        next_annotation_id += len(annotations)
        yield image, record, annotations


def dataset_to_coco(dataset, *, class_names: Optional[Sequence[str]] = None) -> Dict:
    """A COCO instances dict (images, annotations, categories) of a dataset
    of (image [3, H, W], target) samples, category id = label. Images are
    named ``{image_id:012d}.png`` (what ``write_coco_folder`` writes).

    Args:
        dataset: yields (image, target) with ``boxes``, ``labels``, ``masks``
            and an int ``image_id`` (default: the index).
        class_names: names indexed by label (default ``dataset.class_names``).
    """
    coco = {"images": [], "annotations": [], "categories": _categories(class_names or _class_names(dataset), dataset)}
    for _image, record, annotations in _coco_records(dataset):
        coco["images"].append(record)
        coco["annotations"].extend(annotations)
    return coco


def write_coco_folder(
    dataset,
    folder: Union[str, Path],
    *,
    class_names: Optional[Sequence[str]] = None,
    annotations_name: str = "instances.json",
) -> Tuple[Path, Path]:
    """Writes a dataset as a COCO folder: ``folder/images/<id>.png`` (8-bit
    RGB) and ``folder/<annotations_name>`` (masks as compressed RLE).

    Args:
        dataset, class_names: as ``dataset_to_coco``; images are float in [0, 1].

    Returns:
        (images_dir, annotations_file), ready for ``CocoDataset``.
    """
    folder = Path(folder)
    images_dir = folder / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": _categories(class_names or _class_names(dataset), dataset)}
    for image, record, annotations in _coco_records(dataset):
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(images_dir / record["file_name"])
        coco["images"].append(record)
        coco["annotations"].extend(annotations)
    annotations_file = folder / annotations_name
    annotations_file.write_text(json.dumps(coco))
    return images_dir, annotations_file
