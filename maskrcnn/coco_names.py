"""COCO category names, indexed by the label the model predicts.

COCO numbers its 80 object categories from 1 to 90 with gaps (ids of
categories dropped before the 2014 release); Mask R-CNN models trained on
COCO, torchvision's included, predict the raw category id, so they have 91
classes: 0 is the background and the 10 unused ids never name an object.
"""

from __future__ import annotations

from typing import Dict, List

# COCO category id -> name, as in the instances_*.json annotation files.
COCO_CATEGORY_NAMES: Dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}

BACKGROUND = "__background__"
UNUSED = "N/A"

# Label -> name for a 91-class COCO model (torchvision's table has the same entries).
COCO_CLASSES: List[str] = [BACKGROUND] + [COCO_CATEGORY_NAMES.get(i, UNUSED) for i in range(1, 91)]


def label_names(num_classes: int) -> List[str]:
    """Names for the labels of a model with ``num_classes`` classes: the COCO
    table for 91 classes, otherwise "class 1", "class 2", ... (index 0 is the
    background)."""
    if num_classes == len(COCO_CLASSES):
        return list(COCO_CLASSES)
    return [BACKGROUND] + [f"class {i}" for i in range(1, num_classes)]


__all__ = ["COCO_CATEGORY_NAMES", "COCO_CLASSES", "label_names"]
