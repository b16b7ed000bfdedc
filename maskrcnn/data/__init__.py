"""Data for Mask R-CNN: a synthetic shapes dataset, a COCO-format reader and
writer, batching, augmentation and target validation. Every dataset yields
(image [3, H, W] float32 in [0, 1], target dict) samples."""

from .coco import CocoDataset, load_rgb_image
from .coco_format import (
    box_masks_to_rles,
    dataset_to_coco,
    decode_segmentation,
    mask_to_rle,
    masks_to_rles,
    target_to_annotations,
    write_coco_folder,
)
from .coco_schema import CocoFormatError, load_coco_json, validate_coco
from .batching import collate
from .sampler import EpochBatchSampler
from .shapes import (
    SHAPE_CLASS_NAMES,
    SHAPE_KEYPOINT_NAMES,
    SHAPE_KEYPOINT_SIGMAS,
    SHAPE_SKELETON,
    ShapesDataset,
    boxes_from_masks,
)
from .augment import RandomHorizontalFlip, flip_keypoints, horizontal_flip, keypoint_flip_permutation
from .validation import validate_target

__all__ = [
    "ShapesDataset",
    "SHAPE_CLASS_NAMES",
    "SHAPE_KEYPOINT_NAMES",
    "SHAPE_KEYPOINT_SIGMAS",
    "SHAPE_SKELETON",
    "boxes_from_masks",
    "CocoDataset",
    "CocoFormatError",
    "load_coco_json",
    "validate_coco",
    "load_rgb_image",
    "box_masks_to_rles",
    "mask_to_rle",
    "masks_to_rles",
    "decode_segmentation",
    "target_to_annotations",
    "dataset_to_coco",
    "write_coco_folder",
    "collate",
    "EpochBatchSampler",
    "RandomHorizontalFlip",
    "horizontal_flip",
    "flip_keypoints",
    "keypoint_flip_permutation",
    "validate_target",
]
