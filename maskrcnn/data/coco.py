"""A COCO-format instance-segmentation dataset: an images folder and an
instances JSON (polygons, compressed or uncompressed RLE masks; keypoints
as in COCO's person_keypoints files), read with pycocotools, returning the
same (image, target) samples as ShapesDataset."""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from .augment import keypoint_flip_permutation
from .coco_format import decode_segmentation
from .coco_schema import CocoFormatError, load_coco_json


def load_rgb_image(path: Path) -> Tensor:
    """An image file as [3, H, W] float32 in [0, 1] (grey and RGBA converted to RGB)."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as error:
        raise OSError(f"cannot read image {path}: {error}") from None
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))).to(torch.float32) / 255.0


class CocoDataset(Dataset):
    """Images and instance annotations in COCO format.

    Handling, following torchvision's detection reference scripts:

    * crowd annotations (``iscrowd`` 1) are left out of the training targets
      (they mark regions of many objects; COCOeval uses them, from the file,
      as regions where detections are neither rewarded nor penalised);
    * boxes are converted from [x, y, w, h] to (x1, y1, x2, y2), clamped to
      the image, and an annotation whose clamped box has zero width or height
      is dropped (it cannot be a training target: it has no IoU with anything);
    * images without annotations are kept, with empty targets of the right
      shapes: boxes [0, 4], labels [0], masks [0, H, W] (keypoints [0, J, 3]);
    * keypoints, when categories name them (COCO's ``keypoints`` and
      ``skeleton`` of a category, e.g. person_keypoints files): every
      target gets ``keypoints`` [K, J, 3]; an annotation without
      ``keypoints`` (another category's, in a file that mixes them) has J
      unlabeled ones, and unlabeled keypoints (v 0) are (0, 0, 0) whatever
      x, y the file gives them (they are no training target). All
      categories that name keypoints must name the same ones: one model
      predicts one list.

    The whole file is validated when the dataset is built (``CocoFormatError``
    naming the entry and the problem), and so are the image files if
    ``check_images``, so that no bad input surfaces in the middle of an epoch.

    Args:
        images_dir: folder the ``file_name`` of each image is relative to.
        annotations_file: the instances JSON.
        contiguous_labels: True (default): labels 1..C number the categories
            in ascending id order (what a model with C + 1 outputs needs for a
            custom dataset); False: label = COCO category id (torchvision's
            91-class COCO models), with "N/A" names for unused ids.
        check_images: at construction, check that every image file exists and
            that its header gives the size the JSON says (no pixel decoding).
        transform: optional callable (image, target) -> (image, target).

    Attributes:
        class_names: names indexed by label, "__background__" at 0.
        num_classes: len(class_names), background included.
        label_to_category_id, category_id_to_label: the label mapping.
        image_ids: COCO image id of each index, in the file's order.
        coco: a pycocotools ``COCO`` of the whole file (crowd regions
            included), built on first use: the ground truth for evaluation.
        keypoint_names: the categories' keypoint names (J), None when no
            category names any.
        skeleton: the keypoint category's ``skeleton`` (pairs of 1-based
            keypoint numbers), () without keypoints.
        keypoint_flip_permutation: the left-right swap of the keypoints in a
            mirror image (``keypoint_flip_permutation`` of the names), for
            ``RandomHorizontalFlip(keypoint_permutation=...)``.

    ``dataset[i]`` returns ``(image, target)``: image [3, H, W] float32 in
    [0, 1]; target ``boxes`` [K, 4] float32, ``labels`` [K] int64, ``masks``
    [K, H, W] uint8, ``image_id`` int, ``area`` [K] float32 (the file's),
    ``iscrowd`` [K] int64 (zeros); with keypoint names also ``keypoints``
    [K, J, 3] float32 (x, y, v), v as in the file (0 not labeled, 1 hidden,
    2 visible), x and y in pixels (pixel edges, as the boxes).
    """

    def __init__(
        self,
        images_dir: Union[str, Path],
        annotations_file: Union[str, Path],
        *,
        contiguous_labels: bool = True,
        check_images: bool = True,
        transform: Optional[Callable[[Tensor, Dict], Tuple[Tensor, Dict]]] = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotations_file = Path(annotations_file)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"images folder not found: {self.images_dir}")
        self._data = load_coco_json(self.annotations_file)
        self._images = self._data["images"]
        self.image_ids = [image["id"] for image in self._images]
        self._annotations_of: Dict[int, List[Dict]] = defaultdict(list)
        for annotation in self._data["annotations"]:
            self._annotations_of[annotation["image_id"]].append(annotation)

        categories = sorted(self._data["categories"], key=lambda category: category["id"])
        if contiguous_labels:
            self.label_to_category_id = {label: c["id"] for label, c in enumerate(categories, start=1)}
            self.class_names = ["__background__"] + [c["name"] for c in categories]
        else:
            self.label_to_category_id = {c["id"]: c["id"] for c in categories}
            names = {c["id"]: c["name"] for c in categories}
            largest = max(names, default=0)
            self.class_names = ["__background__"] + [names.get(i, "N/A") for i in range(1, largest + 1)]
        self.category_id_to_label = {c: label for label, c in self.label_to_category_id.items()}
        self.keypoint_names, self.skeleton = _keypoint_names_and_skeleton(categories, str(self.annotations_file))
        self.transform = transform
        self._coco = None
        if check_images:
            self._check_image_files()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def keypoint_flip_permutation(self) -> Optional[List[int]]:
        """The keypoints' left-right swap (None without keypoints); raises
        ValueError where a name has no mirror (see keypoint_flip_permutation)."""
        return None if self.keypoint_names is None else keypoint_flip_permutation(self.keypoint_names)

    @property
    def coco(self):
        """pycocotools ``COCO`` of the annotations file (quietly indexed)."""
        if self._coco is None:
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = self._data
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    def _check_image_files(self) -> None:
        problems = []
        for image in self._images:
            path = self.images_dir / image["file_name"]
            try:
                with Image.open(path) as opened:
                    width, height = opened.size
            except FileNotFoundError:
                problems.append(f"{path}: missing")
                continue
            except (UnidentifiedImageError, OSError) as error:
                problems.append(f"{path}: unreadable ({error})")
                continue
            if (height, width) != (image["height"], image["width"]):
                problems.append(
                    f"{path}: {height}x{width} pixels, the annotations say {image['height']}x{image['width']}"
                )
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"{len(problems)} image file(s) do not match {self.annotations_file}: {shown}")

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> Tuple[Tensor, Dict]:
        info = self._images[index]
        image = load_rgb_image(self.images_dir / info["file_name"])
        if tuple(image.shape[1:]) != (info["height"], info["width"]):
            raise ValueError(
                f"{self.images_dir / info['file_name']} is {image.shape[1]}x{image.shape[2]} pixels, "
                f"{self.annotations_file} says {info['height']}x{info['width']}"
            )
        target = self._target(info)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def _target(self, info: Dict) -> Dict:
        height, width = info["height"], info["width"]
        annotations = [a for a in self._annotations_of[info["id"]] if a.get("iscrowd", 0) == 0]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # [x, y, w, h] -> (x1, y1, x2, y2)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
        keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist()
        kept = [a for a, k in zip(annotations, keep) if k]
        masks = [decode_segmentation(a["segmentation"], height, width) for a in kept]
        mask_tensor = (
            torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
        )
        areas = [float(a["area"]) if "area" in a else float(m.sum()) for a, m in zip(kept, masks)]
        target = {
            "boxes": boxes[torch.tensor(keep, dtype=torch.bool)] if keep else boxes,
            "labels": torch.tensor([self.category_id_to_label[a["category_id"]] for a in kept], dtype=torch.int64),
            "masks": mask_tensor,
            "image_id": info["id"],
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.zeros(len(kept), dtype=torch.int64),
        }
        if self.keypoint_names is not None:
            target["keypoints"] = _keypoints_tensor(kept, len(self.keypoint_names))
        return target


def _keypoint_names_and_skeleton(categories: List[Dict], source: str) -> Tuple[Optional[Tuple[str, ...]], Tuple]:
    """The keypoint names and skeleton the categories state (None, () when
    none does); ``CocoFormatError`` when two categories name different
    keypoints (the file's keypoint lists were validated on loading)."""
    named = [c for c in categories if "keypoints" in c]
    if not named:
        return None, ()
    first = named[0]
    for other in named[1:]:
        if other["keypoints"] != first["keypoints"]:
            raise CocoFormatError(
                f"{source}: categories {first['id']} and {other['id']} name different keypoints "
                f"({len(first['keypoints'])} and {len(other['keypoints'])} names, or another order): "
                f"a keypoint model predicts one list for every class"
            )
    return tuple(first["keypoints"]), tuple(tuple(edge) for edge in first.get("skeleton", []))


def _keypoints_tensor(annotations: List[Dict], num_keypoints: int) -> Tensor:
    """[K, J, 3] float32 of the annotations' COCO ``keypoints`` [x1, y1,
    v1, ...]; (0, 0, 0) for unlabeled points and annotations without them."""
    keypoints = torch.zeros((len(annotations), num_keypoints, 3), dtype=torch.float32)
    for row, annotation in enumerate(annotations):
        if "keypoints" in annotation:
            keypoints[row] = torch.tensor(annotation["keypoints"], dtype=torch.float32).reshape(num_keypoints, 3)
    return torch.where(keypoints[..., 2:] > 0, keypoints, torch.zeros((), dtype=torch.float32))
