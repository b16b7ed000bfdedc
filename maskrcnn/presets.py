"""Named presets, each stated once and read by the builders, the command line
and the demo: the model designs that ``train --config`` offers, and the
training recipe of the demo (the command line's training defaults).

A model preset says which arguments of its builder (``maskrcnn_resnet_fpn``
or ``maskrcnn_resnet_c4``) it sets; the others keep that builder's defaults. ``maskrcnn.model.maskrcnn_from_preset``
builds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class ModelPreset:
    """A named Mask R-CNN design.

    Attributes:
        name: its ``--config`` name.
        summary: one line for ``--help``.
        image_size: the images' side by default (short and long side
            resized to it); None: the builder's 800/1333 resizing.
        settings: image side (or None) -> the builder's arguments of the
            design at that side, ``num_classes`` aside.
        architecture: the builder, ``maskrcnn.model.model_builder``'s name:
            "fpn" (``maskrcnn_resnet_fpn``) or "c4" (``maskrcnn_resnet_c4``).
    """

    name: str
    summary: str
    image_size: Optional[int]
    settings: Callable[[Optional[int]], Dict[str, Any]]
    architecture: str = "fpn"

    def build_kwargs(self, *, num_classes: int, image_size: Optional[int] = None) -> Dict[str, Any]:
        """The builder's arguments for ``num_classes`` classes (background
        included) and images of side ``image_size`` (default: the preset's)."""
        return {**self.settings(image_size or self.image_size), "num_classes": num_classes}


def _image_side(image_size: Optional[int]) -> Dict[str, Any]:
    return dict(min_size=image_size, max_size=image_size) if image_size else {}


def _small_image_settings(image_size: Optional[int]) -> Dict[str, Any]:
    # What SMALL and C4 share: a ResNet-18 with BatchNorm that trains (no
    # pretrained weights to freeze), every stage trainable, anchors from
    # image_size / 16 to image_size, and fewer proposals than the paper's (a
    # few objects per image need no more).
    return dict(
        depth=18,
        norm="batch",
        trainable_layers=5,
        **_image_side(image_size),
        anchor_sizes=tuple(image_size // 16 * 2**level for level in range(5)),
        rpn_pre_nms_top_n=300,
        rpn_post_nms_top_n=100,
        rpn_train_pre_nms_top_n=600,
        rpn_train_post_nms_top_n=300,
        box_detections_per_img=20,
    )


def _small_settings(image_size: Optional[int]) -> Dict[str, Any]:
    # The ResNet-18-FPN: 64 FPN channels, a 256-wide box head, two
    # 64-channel mask convolutions, 128 RoI samples per image.
    return dict(
        **_small_image_settings(image_size),
        fpn_channels=64,
        box_representation_size=256,
        box_batch_size_per_image=128,
        mask_head_layers=(64, 64),
    )


def _resnet50_settings(image_size: Optional[int]) -> Dict[str, Any]:
    # torchvision's maskrcnn_resnet50_fpn(weights=None): BatchNorm that
    # trains and every stage trainable.
    return dict(depth=50, norm="batch", trainable_layers=5, **_image_side(image_size))


# The keypoint branch that ``train --keypoints`` adds to SMALL: four
# 64-channel convolutions (torchvision's eight of 512 cost 40x more per RoI
# and a few corner keypoints per shape need far less).
SMALL_KEYPOINT_HEAD_LAYERS = (64, 64, 64, 64)


def _c4_settings(image_size: Optional[int]) -> Dict[str, Any]:
    # The paper's C4 design scaled to SMALL's budget: the ResNet-18 at a
    # quarter of the standard width (stem and res2 16 channels, res3 32, res4
    # 64: the C4 map of the RPN and the RoIAlign; res5 128 on the 7x7 RoI
    # features), all five anchor sizes on C4 with the three ratios, a
    # 64-channel mask upsampling and 32 RoI samples per image, half of them
    # positive. The preset's side is 256: the demo's 128-px shapes are
    # upsampled 2x, so that C4 is 16x16 instead of 8x8 (at 128 px, 400 steps
    # gave mask AP50 0.31 instead of 0.47). res5 runs once per RoI sample (and
    # again on the positives for the mask loss), about two thirds of a
    # training step (profiled), so the step's cost follows the samples and the
    # square of the width, not the image; with a few shapes per image, 16
    # background samples of 32 are enough. Trained as the demo trains SMALL
    # (its 1000 steps of 4 images) beside SMALL, both at once, one thread each
    # on a shared 2-core "Intel(R) Xeon(R) Processor" (AVX-512), held-out mask
    # AP50 / box AP / training time: seed 0, this preset 0.872 / 0.706 /
    # 868 s, SMALL 0.900 / 0.708 / 904 s; seed 1, 0.900 / 0.737 / 1090 s, SMALL
    # 0.890 / 0.707 / 1133 s; seed 2, 0.890 / 0.727 / 1144 s, SMALL 0.903 /
    # 0.732 / 1149 s. The former 64 samples with a quarter positive
    # took 1.5x as long a step and reached mask AP50 0.752 in 630 steps (about
    # SMALL's time); widths 24 and 32 took 2x and 3x its step
    # (benchmarks/results/c4-shapes-2026-11-30).
    return dict(
        **_small_image_settings(image_size),
        width=16,
        mask_channels=64,
        box_batch_size_per_image=32,
        box_positive_fraction=0.5,
    )


SMALL = ModelPreset(
    name="small",
    summary="ResNet-18-FPN for small images that trains from scratch on a CPU in minutes (the demo's)",
    image_size=128,
    settings=_small_settings,
)
RESNET50 = ModelPreset(
    name="resnet50",
    summary="torchvision's R50-FPN design with trainable BatchNorm (from scratch)",
    image_size=None,
    settings=_resnet50_settings,
)
C4 = ModelPreset(
    name="c4",
    summary="a quarter-width ResNet-18-C4 (the paper's C4 design: RPN and RoIAlign on stride 16, res5 as the "
    "RoI head) that upsamples small images to 256 px, in about the small config's time",
    image_size=256,
    settings=_c4_settings,
    architecture="c4",
)
MODEL_PRESETS: Tuple[ModelPreset, ...] = (SMALL, RESNET50, C4)


def model_preset(name: str) -> ModelPreset:
    """The model preset called ``name``; ValueError naming the others if none is."""
    for preset in MODEL_PRESETS:
        if preset.name == name:
            return preset
    raise ValueError(f"no model preset {name!r}; the presets are {[p.name for p in MODEL_PRESETS]}")


@dataclass(frozen=True)
class TrainingPreset:
    """A training recipe (see ``maskrcnn.engine.train`` and ``LRSchedule``).

    Attributes:
        optimizer: "sgd" or "adamw".
        learning_rate: after the warm-up.
        batch_size: images per step (and process).
        iterations: optimizer steps.
        warmup_iterations: of the linear warm-up.
        weight_decay: of convolution and linear weights.
        max_grad_norm: the gradient norm is clipped to this (0: no clipping).
    """

    optimizer: str
    learning_rate: float
    batch_size: int
    iterations: int
    warmup_iterations: int
    weight_decay: float
    max_grad_norm: float


# The demo's: SMALL on generated shapes, tuned to finish in minutes on a
# 2-core CPU.
SHAPES_TRAINING = TrainingPreset(
    optimizer="adamw",
    learning_rate=1e-3,
    batch_size=4,
    iterations=1000,
    warmup_iterations=100,
    weight_decay=1e-4,
    max_grad_norm=10.0,
)


__all__ = ["C4", "MODEL_PRESETS", "RESNET50", "SHAPES_TRAINING", "SMALL", "SMALL_KEYPOINT_HEAD_LAYERS", "ModelPreset",
           "TrainingPreset", "model_preset"]
