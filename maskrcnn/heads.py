"""The per-RoI networks: box head and predictor (class scores, box deltas),
mask head and predictor (per-class mask logits). Module names give
torchvision's state-dict keys."""

from __future__ import annotations

from typing import Sequence, Tuple

from torch import Tensor, nn


class TwoMLPHead(nn.Module):
    """Two fully connected layers on the pooled RoI features.

    Args:
        in_features: C * P * P of the pooled features (256 * 7 * 7 for R50-FPN).
        representation_size: width of both layers.

    ``forward(x [K, C, P, P])`` -> [K, representation_size].
    """

    def __init__(self, *, in_features: int, representation_size: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.relu(self.fc6(x.flatten(start_dim=1)))
        return nn.functional.relu(self.fc7(x))


class FastRCNNPredictor(nn.Module):
    """Class logits and class-specific box deltas.

    Args:
        in_features: width of the box head's output.
        num_classes: classes including the background (index 0).

    ``forward(x [K, in_features])`` -> (class_logits [K, num_classes],
    box_deltas [K, num_classes * 4]).
    """

    def __init__(self, *, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Sequential):
    """A stack of 3x3 convolutions + ReLU on the pooled mask features.

    Args:
        in_channels: channels of the pooled features.
        layers: output channels of each convolution.
        dilation: dilation (and padding) of the convolutions.

    ``forward(x [K, in_channels, P, P])`` -> [K, layers[-1], P, P]. Each block
    is a Sequential(conv, relu) so the keys are torchvision's (``0.0.weight``).
    """

    def __init__(self, *, in_channels: int, layers: Sequence[int] = (256, 256, 256, 256), dilation: int = 1) -> None:
        blocks = []
        for out_channels in layers:
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=dilation, dilation=dilation)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            blocks.append(nn.Sequential(conv, nn.ReLU(inplace=True)))
            in_channels = out_channels
        super().__init__(*blocks)


class MaskPredictor(nn.Module):
    """Upsamples the mask features 2x and predicts one mask logit map per class.

    Args:
        in_channels: channels of the mask head's output.
        dim_reduced: channels after the transposed convolution.
        num_classes: classes including the background.

    ``forward(x [K, in_channels, P, P])`` -> logits [K, num_classes, 2P, 2P].
    """

    def __init__(self, *, in_channels: int, dim_reduced: int = 256, num_classes: int) -> None:
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, dim_reduced, kernel_size=2, stride=2)
        self.mask_fcn_logits = nn.Conv2d(dim_reduced, num_classes, kernel_size=1)
        nn.init.kaiming_normal_(self.conv5_mask.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv5_mask.bias)
        # Logits near zero at the start (probability 1/2 everywhere): a
        # ReLU-gain initialization here makes logits of several units and a
        # first mask loss near 5, which a model trained from scratch spends
        # its first hundreds of steps undoing.
        nn.init.normal_(self.mask_fcn_logits.weight, std=0.001)
        nn.init.zeros_(self.mask_fcn_logits.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(nn.functional.relu(self.conv5_mask(x)))


__all__ = ["TwoMLPHead", "FastRCNNPredictor", "MaskHead", "MaskPredictor"]
