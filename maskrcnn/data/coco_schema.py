"""Loading and validating a COCO instances file before anything reads it, so
that a bad file fails at once with the place and the reason, never deep
inside pycocotools or in the middle of an epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Union


class CocoFormatError(ValueError):
    """An annotations file that is not a valid COCO instances file."""


def load_coco_json(path: Union[str, Path]) -> Dict:
    """Reads and validates a COCO instances file (see ``validate_coco``).

    Raises:
        FileNotFoundError: no such file.
        CocoFormatError: not UTF-8 JSON, or not a valid instances file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotations file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise CocoFormatError(f"{path}: not a UTF-8 text file ({error})") from None
    except json.JSONDecodeError as error:
        raise CocoFormatError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            f"the file may be truncated or corrupt"
        ) from None
    validate_coco(data, source=str(path))
    return data


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _records(data: Dict, key: str, source: str) -> List[Dict]:
    records = data.get(key)
    if not isinstance(records, list):
        found = "missing" if key not in data else f"a {type(records).__name__}"
        raise CocoFormatError(f"{source}: '{key}' must be a list, but it is {found}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise CocoFormatError(f"{source}: {key}[{i}] must be an object, got {type(record).__name__}")
    return records


def _require(condition: bool, source: str, where: str, message: str) -> None:
    if not condition:
        raise CocoFormatError(f"{source}: {where}: {message}")


def _validate_segmentation(segmentation, height: int, width: int, source: str, where: str) -> None:
    if isinstance(segmentation, list):
        _require(len(segmentation) > 0, source, where, "'segmentation' is an empty list of polygons")
        for polygon in segmentation:
            _require(
                isinstance(polygon, list)
                and len(polygon) >= 6
                and len(polygon) % 2 == 0
                and all(_is_number(v) for v in polygon),
                source,
                where,
                "each polygon must be a list of at least 3 points [x1, y1, x2, y2, x3, y3, ...] of finite "
                f"numbers, got {str(polygon)[:80]}",
            )
        return
    _require(
        isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation,
        source,
        where,
        "'segmentation' must be a list of polygons or an RLE object {'size': [h, w], 'counts': ...}, "
        f"got {str(segmentation)[:80]}",
    )
    _require(
        segmentation["size"] == [height, width],
        source,
        where,
        f"RLE size {segmentation['size']} differs from its image's [height, width] = [{height}, {width}]",
    )
    counts = segmentation["counts"]
    if isinstance(counts, list):
        _require(
            all(_is_int(c) and c >= 0 for c in counts) and sum(counts) == height * width,
            source,
            where,
            f"uncompressed RLE counts must be non-negative integers summing to {height} * {width} pixels",
        )
    else:
        _require(isinstance(counts, str) and counts.isascii(), source, where, "compressed RLE counts must be a string")


def _validate_category_keypoints(category: Dict, source: str, where: str) -> Optional[int]:
    """The number of keypoints a category names (None without ``keypoints``),
    its ``skeleton`` checked against them."""
    if "keypoints" not in category:
        return None
    names = category["keypoints"]
    _require(
        isinstance(names, list) and len(names) > 0 and all(isinstance(n, str) for n in names)
        and len(set(names)) == len(names),
        source, where, f"'keypoints' must be a non-empty list of distinct names, got {names!r}",
    )
    skeleton = category.get("skeleton", [])
    _require(
        isinstance(skeleton, list) and all(
            isinstance(edge, list) and len(edge) == 2 and all(_is_int(i) and 1 <= i <= len(names) for i in edge)
            for edge in skeleton),
        source, where, f"'skeleton' must be a list of [i, j] keypoint numbers in 1..{len(names)}, got {skeleton!r}",
    )
    return len(names)


def _validate_annotation_keypoints(annotation: Dict, num_keypoints: Optional[int], source: str, where: str) -> None:
    """COCO's ``keypoints`` [x1, y1, v1, ...] (one triple per keypoint name
    of the category, v 0 not labeled, 1 hidden, 2 visible) and
    ``num_keypoints`` (how many have v > 0)."""
    keypoints = annotation["keypoints"]
    _require(num_keypoints is not None, source, where,
             "has 'keypoints' but its category lists no keypoint names ('keypoints' in 'categories')")
    _require(
        isinstance(keypoints, list) and len(keypoints) == 3 * num_keypoints and all(_is_number(v) for v in keypoints),
        source, where,
        f"'keypoints' must be [x, y, v] * {num_keypoints} = {3 * num_keypoints} finite numbers, got "
        f"{len(keypoints) if isinstance(keypoints, list) else type(keypoints).__name__}",
    )
    visibility = keypoints[2::3]
    _require(all(v in (0, 1, 2) for v in visibility), source, where,
             f"keypoint visibilities must be 0, 1 or 2, got {sorted(set(visibility))}")
    labeled = sum(1 for v in visibility if v > 0)
    _require(
        annotation.get("num_keypoints", labeled) == labeled and not isinstance(annotation.get("num_keypoints"), bool),
        source, where, f"'num_keypoints' {annotation.get('num_keypoints')!r} != {labeled} keypoints with v > 0",
    )


def validate_coco(data, *, source: str = "annotations") -> None:
    """Checks a parsed COCO instances dict, raising ``CocoFormatError`` with
    the place and the reason at the first problem.

    Required: ``images`` (``id`` int, unique; ``file_name`` str; ``height``,
    ``width`` int > 0), ``categories`` (``id`` int >= 1, unique; ``name``
    str), ``annotations`` (``id`` int; ``image_id`` of a listed image;
    ``category_id`` of a listed category; ``bbox`` 4 finite numbers with
    width, height >= 0; ``segmentation``: polygons of >= 3 points, or RLE
    with the image's size; ``iscrowd`` 0 or 1 when present, default 0;
    ``area`` a number >= 0 when present). Keypoints, when present: a
    category's ``keypoints`` (distinct names) and ``skeleton`` ([i, j]
    pairs of 1-based keypoint numbers); an annotation's ``keypoints`` ([x,
    y, v] per name of its category, v 0, 1 or 2) and ``num_keypoints``
    (the count with v > 0).
    """
    _require(isinstance(data, dict), source, "top level", f"must be a JSON object, got {type(data).__name__}")
    image_sizes = {}
    for i, image in enumerate(_records(data, "images", source)):
        where = f"images[{i}]"
        _require(_is_int(image.get("id")), source, where, f"'id' must be an integer, got {image.get('id')!r}")
        _require(image["id"] not in image_sizes, source, where, f"duplicate image id {image['id']}")
        _require(
            isinstance(image.get("file_name"), str) and image["file_name"] != "",
            source,
            where,
            f"'file_name' must be a non-empty string, got {image.get('file_name')!r}",
        )
        for key in ("height", "width"):
            _require(
                _is_int(image.get(key)) and image[key] > 0,
                source,
                where,
                f"'{key}' must be an integer > 0, got {image.get(key)!r}",
            )
        image_sizes[image["id"]] = (image["height"], image["width"])

    category_ids, category_keypoints = set(), {}
    for i, category in enumerate(_records(data, "categories", source)):
        where = f"categories[{i}]"
        _require(
            _is_int(category.get("id")) and category["id"] >= 1,
            source,
            where,
            f"'id' must be an integer >= 1 (0 is the background), got {category.get('id')!r}",
        )
        _require(category["id"] not in category_ids, source, where, f"duplicate category id {category['id']}")
        name = category.get("name")
        _require(isinstance(name, str), source, where, f"'name' must be a string, got {name!r}")
        category_ids.add(category["id"])
        category_keypoints[category["id"]] = _validate_category_keypoints(category, source, where)

    for i, annotation in enumerate(_records(data, "annotations", source)):
        where = f"annotations[{i}] (id {annotation.get('id')!r})"
        _require(_is_int(annotation.get("id")), source, where, "'id' must be an integer")
        _require(
            _is_int(annotation.get("image_id")) and annotation["image_id"] in image_sizes,
            source,
            where,
            f"'image_id' {annotation.get('image_id')!r} is not the id of any entry in 'images'",
        )
        _require(
            _is_int(annotation.get("category_id")) and annotation["category_id"] in category_ids,
            source,
            where,
            f"'category_id' {annotation.get('category_id')!r} is not the id of any entry in 'categories'",
        )
        bbox = annotation.get("bbox")
        _require(
            isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox) and min(bbox[2:]) >= 0,
            source,
            where,
            f"'bbox' must be [x, y, width, height] of finite numbers with width, height >= 0, got {bbox!r}",
        )
        _require(
            annotation.get("iscrowd", 0) in (0, 1) and not isinstance(annotation.get("iscrowd"), bool),
            source,
            where,
            f"'iscrowd' must be 0 or 1, got {annotation.get('iscrowd')!r}",
        )
        _require(
            "area" not in annotation or (_is_number(annotation["area"]) and annotation["area"] >= 0),
            source,
            where,
            f"'area' must be a finite number >= 0, got {annotation.get('area')!r}",
        )
        _require("segmentation" in annotation, source, where, "'segmentation' is missing (Mask R-CNN needs masks)")
        height, width = image_sizes[annotation["image_id"]]
        _validate_segmentation(annotation["segmentation"], height, width, source, where)
        if "keypoints" in annotation:
            _validate_annotation_keypoints(annotation, category_keypoints[annotation["category_id"]], source, where)
