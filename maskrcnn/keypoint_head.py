"""The keypoint branch of Keypoint R-CNN: a stack of 3x3 convolutions on
14x14 RoIAlign features, a 4x4 stride-2 transposed convolution to one
heatmap per keypoint, a 2x bilinear upsampling (56x56 heatmaps), and the
decoding of heatmaps into keypoints in the image. Module names give
torchvision's state-dict keys (``keypoint_head.{0,2,..}``,
``keypoint_predictor.kps_score_lowres``)."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

import maskrcnn_ops

# Keypoint R-CNN's head: eight 512-channel convolutions (the paper's and torchvision's).
KEYPOINT_HEAD_LAYERS = (512,) * 8


class KeypointHead(nn.Sequential):
    """3x3 convolutions, each followed by a ReLU, as flat children (conv,
    relu, conv, relu, ...), so that the convolutions' keys are
    torchvision's ``0``, ``2``, ``4``...

    Args:
        in_channels: channels of the pooled features (the FPN's).
        layers: output channels of each convolution.

    ``forward(x [R, in_channels, P, P])`` -> [R, layers[-1], P, P].
    """

    def __init__(self, *, in_channels: int, layers: Sequence[int] = KEYPOINT_HEAD_LAYERS) -> None:
        if len(layers) == 0:
            raise ValueError("the keypoint head needs at least one convolution")
        modules = []
        for out_channels in layers:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            modules += [conv, nn.ReLU(inplace=True)]
            in_channels = out_channels
        super().__init__(*modules)


class KeypointPredictor(nn.Module):
    """One heatmap logit map per keypoint at 4x the pooled resolution: a
    transposed convolution (kernel 4, stride 2, padding 1: exactly 2x) then
    a 2x bilinear upsampling (align_corners=False).

    Args:
        in_channels: channels of the keypoint head's output.
        num_keypoints: K, keypoints per instance (17 for COCO people).

    ``forward(x [R, in_channels, P, P])`` -> logits [R, K, 4P, 4P].
    """

    def __init__(self, *, in_channels: int, num_keypoints: int) -> None:
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
        self.kps_score_lowres = nn.ConvTranspose2d(in_channels, num_keypoints, kernel_size=4, stride=2, padding=1)
        nn.init.kaiming_normal_(self.kps_score_lowres.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.kps_score_lowres.bias)

    @property
    def num_keypoints(self) -> int:
        return self.kps_score_lowres.out_channels

    def forward(self, x: Tensor) -> Tensor:
        # A fixed output size (not scale_factor), so that traced graphs see
        # plain integer sizes.
        x = self.kps_score_lowres(x)
        return F.interpolate(x, size=(2 * x.size(-2), 2 * x.size(-1)), mode="bilinear", align_corners=False)


def decode_keypoints(heatmaps: Tensor, boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """Keypoints from heatmap logits: each map resized (bicubic) to its
    box's size in pixels, its maximum taken as the keypoint (pixel centre,
    in the image), the logit there as its score.

    Args:
        heatmaps: [D, K, S, S] logits (S = 56), one set per box.
        boxes: [D, 4] (x1, y1, x2, y2) the heatmaps were pooled from.

    Returns:
        (keypoints [D, K, 3] (x, y, 1), scores [D, K]), float32 (float64
        for float64 heatmaps). One op, no resized map formed and no host
        synchronization, so the forward stays one graph.
    """
    return maskrcnn_ops.heatmaps_to_keypoints(heatmaps, boxes)


__all__ = ["KEYPOINT_HEAD_LAYERS", "KeypointHead", "KeypointPredictor", "decode_keypoints"]
