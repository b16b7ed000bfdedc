"""Tests of maskrcnn_ops.AnchorGenerator.

Oracle: torchvision.models.detection.anchor_utils.AnchorGenerator, which we
promise to match exactly (torch.equal: same values, same order, same dtype)
for every configuration, image size and feature-map size.

Anchors depend only on the feature maps' shapes, dtype and device, so the
feature maps here are tiny [N, 1, H_l, W_l] zero tensors. The comparisons
with torchvision and the cache test take the ``device`` fixture
(tests/conftest.py), so they run on CPU and on CUDA, the latter skipped
without a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TorchvisionAnchorGenerator
from torchvision.models.detection.image_list import ImageList

import maskrcnn_ops
from maskrcnn_ops.anchors import FPN_ASPECT_RATIOS, FPN_SIZES, cell_anchors

FPN_STRIDES = (4, 8, 16, 32, 64)
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]

# (sizes, aspect_ratios): the FPN defaults, several sizes per level with
# per-level ratio sets (odd ratios give .5 roundings), and torchvision's
# single-level default.
CONFIGS = {
    "fpn": (FPN_SIZES, FPN_ASPECT_RATIOS),
    "multi-size": (((32, 48), (64, 96), (128, 192), (256, 384), (512, 768)),
                   ((0.5, 1.0, 2.0), (1.0,), (0.25, 1 / 3, 3.0), (0.7, 1.3), (1.0, 2.0))),
    "one-level": (((128, 256, 512),), ((0.5, 1.0, 2.0),)),
}

# (batch height, batch width, image sizes, per-level grid sizes): a typical
# padded COCO batch (stride-64 map of ceil(800 / 64) = 13 rows, so its stride
# is 800 // 13 = 61), a small batch, a batch smaller than the largest stride
# (1x1 maps, stride = image size), one whose maps are all 1x1, and maps
# larger than the batch.
LAYOUTS = {
    "coco": (800, 1088, [(800, 1066), (736, 1088)], [(200, 272), (100, 136), (50, 68), (25, 34), (13, 17)]),
    "small": (32, 48, [(32, 48), (30, 41)], [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]),
    "below-stride": (20, 24, [(20, 24)], [(5, 6), (3, 3), (2, 2), (1, 1), (1, 1)]),
    "all-1x1": (16, 16, [(16, 16), (9, 12), (16, 3)], [(1, 1)] * 5),
    # Maps larger than the batch: stride 0 along an axis (all anchors of a row
    # or column at the same place), as torchvision computes it.
    "oversized": (3, 5, [(3, 5)], [(4, 4), (2, 6), (1, 1), (1, 1), (1, 1)]),
}


# ------------------------------------------------------------------ helpers --


def make_batch(layout, *, levels=5, dtype=torch.float32, device="cpu"):
    """(ImageList, feature maps) for a layout; the first ``levels`` grid sizes."""
    height, width, image_sizes, grids = LAYOUTS[layout]
    images = ImageList(torch.zeros(len(image_sizes), 3, height, width, device=device), image_sizes)
    features = [torch.zeros(len(image_sizes), 1, h, w, dtype=dtype, device=device) for h, w in grids[:levels]]
    return images, features


def assert_same_anchors(ours, theirs):
    """Lists of per-image anchors, exactly equal (values, dtype, device)."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
        assert torch.equal(a, b)


# --------------------------------------------------------------- torchvision --


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_torchvision(device, dtype, config, layout):
    """Per-image anchors equal torchvision's exactly, for every configuration
    and layout (1x1 maps and images smaller than a stride included), in the
    features' dtype and on their device, one [sum_l H_l * W_l * A_l, 4]
    tensor per image."""
    sizes, ratios = CONFIGS[config]
    images, features = make_batch(layout, levels=len(sizes), dtype=dtype, device=device)
    ours = maskrcnn_ops.AnchorGenerator(sizes, ratios)(images, features)
    theirs = TorchvisionAnchorGenerator(sizes, ratios)(images, features)
    assert_same_anchors(ours, theirs)
    per_location = maskrcnn_ops.AnchorGenerator(sizes, ratios).num_anchors_per_location()
    expected_rows = sum(f.shape[-2] * f.shape[-1] * a for f, a in zip(features, per_location))
    assert ours[0].shape == (expected_rows, 4) and ours[0].dtype == dtype
    assert ours[0].device.type == device


def test_default_is_fpn():
    """The default configuration is the FPN one (5 levels, sizes 32..512,
    ratios 0.5, 1, 2), torchvision's Mask R-CNN setting."""
    generator = maskrcnn_ops.AnchorGenerator()
    assert generator.sizes == FPN_SIZES and generator.aspect_ratios == FPN_ASPECT_RATIOS
    images, features = make_batch("small")
    assert_same_anchors(generator(images, features),
                        TorchvisionAnchorGenerator(FPN_SIZES, FPN_ASPECT_RATIOS)(images, features))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_num_anchors_per_location_and_cell_anchors(config):
    """num_anchors_per_location and the zero-centred cell anchors of each level
    (ratio-major, rounded) are torchvision's."""
    sizes, ratios = CONFIGS[config]
    ours, theirs = maskrcnn_ops.AnchorGenerator(sizes, ratios), TorchvisionAnchorGenerator(sizes, ratios)
    assert ours.num_anchors_per_location() == theirs.num_anchors_per_location()
    assert len(ours.cell_anchors) == len(theirs.cell_anchors)
    for level, (s, r) in enumerate(zip(sizes, ratios)):
        assert torch.equal(ours.cell_anchors[level], theirs.cell_anchors[level])
        assert torch.equal(cell_anchors(s, r), theirs.generate_anchors(s, r))


def test_anchor_layout():
    """The order is level-major, then row, column and cell anchor: the anchor
    of (level l, row y, column x, cell anchor a) is the cell anchor shifted
    by (x * stride_w, y * stride_h), at the position flatten_rpn_outputs
    gives that location's logit."""
    images, features = make_batch("small")
    anchors = maskrcnn_ops.AnchorGenerator()(images, features)[0]
    generator = maskrcnn_ops.AnchorGenerator()
    offset = 0
    for level, f in enumerate(features):
        h, w = f.shape[-2:]
        stride_h, stride_w = 32 // h, 48 // w
        level_anchors = anchors[offset: offset + h * w * 3].view(h, w, 3, 4)
        for y, x in [(0, 0), (h - 1, w - 1), (h // 2, w // 3)]:
            shift = torch.tensor([x * stride_w, y * stride_h] * 2, dtype=torch.float32)
            assert torch.equal(level_anchors[y, x], generator.cell_anchors[level] + shift)
        offset += h * w * 3
    assert offset == len(anchors)


# ------------------------------------------------------------------- cache --


def test_cache_reuses_tensor_for_same_shapes(device):
    """A second call with the same shapes (other values, other image sizes)
    returns the very same tensor object; every image of the batch gets that
    one tensor; new shapes, a new dtype give new tensors, and the earlier
    entry stays valid."""
    generator = maskrcnn_ops.AnchorGenerator()
    images, features = make_batch("small", device=device)
    first = generator(images, features)
    assert all(a is first[0] for a in first)
    again = generator(ImageList(images.tensors + 1, [(32, 48), (20, 20)]), [f + 1 for f in features])
    assert again[0] is first[0]

    other_images, other_features = make_batch("below-stride", device=device)
    other = generator(other_images, other_features)
    assert other[0] is not first[0] and other[0].shape != first[0].shape
    as_double = generator(images, [f.double() for f in features])
    assert as_double[0] is not first[0] and as_double[0].dtype == torch.float64
    torch.testing.assert_close(as_double[0], first[0].double(), atol=0, rtol=0)

    assert generator(images, features)[0] is first[0]
    assert_same_anchors(first, TorchvisionAnchorGenerator(FPN_SIZES, FPN_ASPECT_RATIOS)(images, features))


def test_cache_keyed_by_batch_size_not_only_grids():
    """Two batches with the same feature-map sizes but other padded image
    sizes have other strides (image size // grid size), hence other anchors."""
    generator = maskrcnn_ops.AnchorGenerator(((32,),), ((1.0,),))
    features = [torch.zeros(1, 1, 2, 2)]
    small = generator(ImageList(torch.zeros(1, 3, 16, 16), [(16, 16)]), features)[0]
    large = generator(ImageList(torch.zeros(1, 3, 32, 32), [(32, 32)]), features)[0]
    assert small is not large
    assert small[-1].tolist() == [-8.0, -8.0, 24.0, 24.0] and large[-1].tolist() == [0.0, 0.0, 32.0, 32.0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_follows_features():
    """One generator serves CPU and CUDA features: anchors on the features'
    device (cached per device), equal across devices."""
    generator = maskrcnn_ops.AnchorGenerator()
    images, features = make_batch("coco")
    cpu = generator(images, features)
    cuda = generator(ImageList(images.tensors.cuda(), images.image_sizes), [f.cuda() for f in features])
    assert cuda[0].is_cuda and not cpu[0].is_cuda
    assert torch.equal(cuda[0].cpu(), cpu[0])
    assert generator(images, features)[0] is cpu[0]


# --------------------------------------------------------------- bad input --


def test_wrong_number_of_feature_maps():
    """One feature map per level is required (ValueError naming both counts)."""
    generator = maskrcnn_ops.AnchorGenerator()
    images, features = make_batch("small")
    with pytest.raises(ValueError, match="4 feature maps for anchor generator with 5 levels"):
        generator(images, features[:4])
    with pytest.raises(ValueError, match="6 feature maps for anchor generator with 5 levels"):
        generator(images, features + features[:1])


def test_sizes_and_ratios_of_different_lengths():
    """One aspect-ratio tuple per sizes tuple (ValueError)."""
    with pytest.raises(ValueError, match="one aspect_ratios tuple per sizes tuple is needed, got 5 and 2"):
        maskrcnn_ops.AnchorGenerator(FPN_SIZES, ((1.0,), (2.0,)))
