"""A small, readable Mask R-CNN whose hot operators come from maskrcnn_ops.

``maskrcnn_resnet50_fpn()`` has the state-dict keys of torchvision's
``maskrcnn_resnet50_fpn`` (v1) and gives the same detections, and in
training mode the same losses; ``keypointrcnn_resnet50_fpn()`` is
torchvision's Keypoint R-CNN in the same way; ``maskrcnn_small()`` trains
from scratch on a CPU in minutes; ``maskrcnn_resnet50_c4()`` is the paper's
ResNet-50-C4 design (``maskrcnn.c4``; detectron2's R50-C4 weights convert
to it). Command line: ``python -m maskrcnn demo | train | evaluate |
predict`` (see ``--help``).
"""

from .c4 import maskrcnn_resnet50_c4, maskrcnn_resnet_c4
from .checkpoint import load_model, save_checkpoint
from .coco_names import COCO_CATEGORY_NAMES, COCO_CLASSES, label_names
from .model import (
    MaskRCNN,
    keypointrcnn_resnet50_fpn,
    keypointrcnn_small,
    maskrcnn_from_preset,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet_fpn,
    maskrcnn_small,
)
from .paste import paste_masks_in_image
from .preprocess import ImageBatch, ImageTransform

__all__ = [
    "MaskRCNN",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet_fpn",
    "maskrcnn_small",
    "keypointrcnn_resnet50_fpn",
    "keypointrcnn_small",
    "maskrcnn_resnet50_c4",
    "maskrcnn_resnet_c4",
    "maskrcnn_from_preset",
    "load_model",
    "save_checkpoint",
    "COCO_CLASSES",
    "COCO_CATEGORY_NAMES",
    "label_names",
    "paste_masks_in_image",
    "ImageBatch",
    "ImageTransform",
]
