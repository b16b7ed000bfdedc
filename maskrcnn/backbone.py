"""ResNet + FPN feature extractor: torchvision's ResNet and
FeaturePyramidNetwork, with the module names (and so the state-dict keys)
of torchvision's detection backbone."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

class FrozenBatchNorm2d(torchvision.ops.FrozenBatchNorm2d):
    """BatchNorm with fixed statistics and affine parameters (buffers, no
    ``num_batches_tracked``; loading a state dict that has it drops it):
    torchvision's FrozenBatchNorm2d, computed by one fused ``batch_norm``
    call in place of its multiply and add, so each of the ResNet's
    normalizations reads and writes the activations once instead of twice
    (the ResNet-50 body at 800x1088 on CPU: 1.65 s instead of 1.89 s)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (fewer when the channels do not allow it):
    trainable normalization that does not depend on the batch size."""
    groups = 32
    while num_channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, num_channels)


# Normalization of the ResNet, by name (a builder argument, so a checkpoint
# can name it): "frozen" for fine-tuning pretrained weights (torchvision's
# COCO model), "batch" or "group" to train from scratch.
NORM_LAYERS: Dict[str, Callable[[int], nn.Module]] = {
    "frozen": FrozenBatchNorm2d,
    "batch": nn.BatchNorm2d,
    "group": group_norm,
}


RESNETS: Dict[int, Callable[..., torchvision.models.ResNet]] = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}

# Stem and stages in the order they are unfrozen by ``trainable_layers``
# (the last stages first, as fine-tuning usually does).
_STAGES_LAST_FIRST = ("layer4", "layer3", "layer2", "layer1", "conv1")


class ResNetBody(nn.Module):
    """The convolutional part of a ResNet (no pooling head, no classifier).

    Args:
        resnet: a torchvision ResNet; its stem and four stages are reused.

    ``forward(x [N, 3, H, W])`` returns the outputs of the four stages under
    the keys "0".."3": [N, C_i, H / s_i, W / s_i] with strides 4, 8, 16, 32.
    """

    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.stage_channels = [_stage_out_channels(stage) for stage in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outputs = OrderedDict()
        for name, stage in zip("0123", (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = stage(x)
            outputs[name] = x
        return outputs


def _stage_out_channels(stage: nn.Sequential) -> int:
    """Output channels of a ResNet stage (its last block's last BN width)."""
    last_block = stage[-1]
    last_norm = last_block.bn3 if hasattr(last_block, "bn3") else last_block.bn2
    return last_norm.weight.numel()


# The stride of each pyramid level in input pixels (the feature maps of a
# batch padded to a multiple of 32 are exactly its size over these).
LEVEL_STRIDES = {"0": 4, "1": 8, "2": 16, "3": 32, "pool": 64}


class ResNetFPN(nn.Module):
    """ResNet body + feature pyramid.

    Args:
        body: the ResNet stages (state-dict prefix ``body.``).
        out_channels: channels of every pyramid level.
        channels_last: run in the channels_last memory format (oneDNN's and
            cuDNN's fast layout: the R50-FPN forward at 800x1088 on CPU
            took 1.7 s instead of 2.3 s); the features then stay
            channels_last, which the heads and maskrcnn_ops' RoIAlign take
            as they are. Values change by float rounding only, but with
            random weights that is enough to reorder near-ties (proposals
            at the top-k cut), so the default keeps torchvision's layout.

    ``forward(x [N, 3, H, W])`` returns levels "0", "1", "2", "3" (strides 4 to
    32) and "pool" (stride 64, a max-pool of "3"), each [N, out_channels, ., .]
    (``LEVEL_STRIDES``).
    """

    def __init__(self, body: ResNetBody, *, out_channels: int = 256, channels_last: bool = False) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=body.stage_channels, out_channels=out_channels, extra_blocks=LastLevelMaxPool()
        )
        self.out_channels = out_channels
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.fpn(self.body(x))


def resnet_fpn_backbone(
    *,
    depth: int = 50,
    trainable_layers: int = 3,
    out_channels: int = 256,
    norm_layer: Callable[..., nn.Module] = FrozenBatchNorm2d,
    channels_last: bool = False,
) -> ResNetFPN:
    """A ResNet-FPN backbone with randomly initialized weights.

    Args:
        depth: 18, 34, 50, 101 or 152.
        trainable_layers: how many of (layer4, layer3, layer2, layer1, conv1)
            keep ``requires_grad``, counted from layer4; the others are
            frozen. 5 trains the whole body.
        out_channels: FPN width.
        norm_layer: normalization of the ResNet. FrozenBatchNorm2d (fixed
            statistics, no ``num_batches_tracked``) matches the state dict of
            torchvision's COCO-trained Mask R-CNN.
        channels_last: see ResNetFPN.
    """
    check_resnet_settings(depth, trainable_layers)
    body = ResNetBody(build_resnet(depth, norm_layer=norm_layer))
    freeze_resnet_stages(body, trainable_layers)
    return ResNetFPN(body, out_channels=out_channels, channels_last=channels_last)


def check_resnet_settings(depth: int, trainable_layers: int) -> None:
    """ValueError unless ``depth`` is one of ``RESNETS`` and ``trainable_layers`` in [0, 5]."""
    if depth not in RESNETS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNETS)}, got {depth}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")


def freeze_resnet_stages(resnet: nn.Module, trainable_layers: int) -> None:
    """Turns ``requires_grad`` off for the parameters of ``resnet`` (a module
    with torchvision's ResNet names: conv1, bn1, layer1..layer4) outside the
    first ``trainable_layers`` of (layer4, layer3, layer2, layer1, conv1);
    with all five, the stem's bn1 trains too."""
    trainable = set(_STAGES_LAST_FIRST[:trainable_layers])
    if trainable_layers == 5:
        trainable.add("bn1")
    for name, parameter in resnet.named_parameters():
        if name.split(".")[0] not in trainable:
            parameter.requires_grad_(False)


def build_resnet(depth: int, *, norm_layer: Callable[..., nn.Module], width: int = 64,
                 stride_in_1x1: bool = False) -> torchvision.models.ResNet:
    """A randomly initialized torchvision ResNet (module names and so
    state-dict keys as torchvision's).

    Args:
        depth: 18, 34, 50, 101 or 152.
        norm_layer: the normalization after every convolution.
        width: channels of the stem and of the first stage (64 in the
            standard ResNets); stage i has width * 2**i (times 4 at the
            output of bottleneck blocks). A narrower net is what a small
            model trained from scratch on a CPU affords.
        stride_in_1x1: in the first bottleneck block of stages 2..4, stride
            in the 1x1 convolution instead of the 3x3 one (the original
            MSRA ResNet, as detectron2's ImageNet weights; torchvision's
            "v1.5" strides in the 3x3). Same parameters and shapes either way.
    """
    resnet = RESNETS[depth](weights=None, norm_layer=norm_layer)
    if width != 64:
        # Rebuild the stem and stages at the given width with torchvision's
        # own stage builder (it reads the input width from ``inplanes``).
        block = type(resnet.layer1[0])
        blocks = [len(stage) for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)]
        resnet.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        resnet.bn1 = norm_layer(width)
        resnet.inplanes = width
        for index, count in enumerate(blocks):
            stage = resnet._make_layer(block, width * 2**index, count, stride=1 if index == 0 else 2)
            setattr(resnet, f"layer{index + 1}", stage)
        for module in resnet.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if stride_in_1x1:
        for stage in (resnet.layer2, resnet.layer3, resnet.layer4):
            first = stage[0]
            if hasattr(first, "conv3"):
                first.conv1.stride, first.conv2.stride = first.conv2.stride, first.conv1.stride
    return resnet


__all__ = ["FrozenBatchNorm2d", "NORM_LAYERS", "RESNETS", "group_norm", "LEVEL_STRIDES", "ResNetBody", "ResNetFPN",
           "build_resnet", "check_resnet_settings", "freeze_resnet_stages", "resnet_fpn_backbone"]
