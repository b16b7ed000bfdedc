"""Training building blocks of Mask R-CNN: ground-truth matching, balanced
sampling, target assignment (RPN anchors, RoI proposals, mask crops,
keypoint heatmap cells) and the losses, as pure functions numerically equal to torchvision's."""

from .keypoints import keypoint_heatmap_targets, keypoint_loss
from .losses import box_head_loss, mask_loss, rpn_loss
from .matching import BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, box_area, box_iou, match_boxes
from .sampling import sample_balanced
from .targets import (
    ROI_BOX_WEIGHTS,
    RPN_BOX_WEIGHTS,
    ProposalSamples,
    assign_anchor_targets,
    mask_targets,
    sample_anchor_labels,
    sample_proposals,
)

__all__ = [
    "BELOW_LOW_THRESHOLD",
    "BETWEEN_THRESHOLDS",
    "box_area",
    "box_iou",
    "match_boxes",
    "sample_balanced",
    "RPN_BOX_WEIGHTS",
    "ROI_BOX_WEIGHTS",
    "assign_anchor_targets",
    "sample_anchor_labels",
    "ProposalSamples",
    "sample_proposals",
    "mask_targets",
    "rpn_loss",
    "box_head_loss",
    "mask_loss",
    "keypoint_heatmap_targets",
    "keypoint_loss",
]
