"""Tests of the fused multi-level RoIAlign: maskrcnn_ops.MultiScaleRoIAlign,
multi_scale_roi_align and the multi_level_roi_align ops.

Oracles: torchvision.ops.MultiScaleRoIAlign (the interface and results we
promise), maskrcnn_ops.reference.multi_level_roi_align (pure PyTorch, any
dtype), and our single-level roi_align (a pyramid of one map must be it).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import maskrcnn_ops
from maskrcnn_ops import reference
from maskrcnn_ops.multiscale import fpn_levels, infer_scales
from maskrcnn_ops.roi_align_ops import boxes_to_rois

ops = torch.ops.maskrcnn_ops

# The FPN of Mask R-CNN R50-FPN for an 800 x 1088 batch: P2..P5.
FPN_SIZES = [(200, 272), (100, 136), (50, 68), (25, 34)]
FPN_SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
IMAGE_SHAPES = [(800, 1088), (790, 1050)]


def make_pyramid(sizes=FPN_SIZES, *, batch=2, channels=8, dtype=torch.float32, device="cpu",
                 memory_format=torch.contiguous_format, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    maps = OrderedDict()
    for i, (h, w) in enumerate(sizes):
        x = torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64).to(dtype)
        maps[f"p{i + 2}"] = x.to(device=device, memory_format=memory_format).requires_grad_(requires_grad)
    return maps


def make_boxes(counts, *, image=(800, 1088), dtype=torch.float32, device="cpu", seed=0):
    """Boxes per image whose sides range from ~1 to ~1400 pixels (so they map
    to every level, below the lowest and above the highest)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([image[1], image[0]]) * 0.8
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) ** 3 * 1400 + 0.5
        out.append(torch.cat([xy, xy + wh], 1).to(dtype=dtype, device=device))
    return out


def torchvision_pool(maps, boxes, image_shapes, output_size=7, sampling_ratio=2):
    pool = torchvision.ops.MultiScaleRoIAlign(list(maps), output_size, sampling_ratio)
    return pool(maps, boxes, image_shapes)


def ours_pool(maps, boxes, image_shapes, output_size=7, sampling_ratio=2):
    pool = maskrcnn_ops.MultiScaleRoIAlign(list(maps), output_size, sampling_ratio)
    return pool(maps, boxes, image_shapes)


# -------------------------------------------------- equality with torchvision --


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("sampling_ratio", [2, 0, -1])
@pytest.mark.parametrize("output_size", [7, (14, 10)])
def test_matches_torchvision_forward_and_gradients(device, dtype, sampling_ratio, output_size):
    maps = make_pyramid(dtype=dtype, device=device, requires_grad=True)
    boxes = make_boxes([120, 90], dtype=dtype, device=device)
    expected = torchvision_pool(maps, boxes, IMAGE_SHAPES, output_size, sampling_ratio)
    actual = ours_pool(maps, boxes, IMAGE_SHAPES, output_size, sampling_ratio)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(actual, expected, **tol)

    weight = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weight).sum(), list(maps.values()))
    actual_grads = torch.autograd.grad((actual * weight).sum(), list(maps.values()))
    for e, a in zip(expected_grads, actual_grads):
        torch.testing.assert_close(a, e, **tol)


def test_every_level_is_used_including_clamped_boxes():
    """The random boxes reach every level, and some map below the finest and
    above the coarsest level before clamping, so the test above covers them."""
    boxes = torch.cat(make_boxes([120, 90], dtype=torch.float64))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    raw = torch.floor(4 + torch.log2(area.sqrt() / 224) + 1e-6)
    assert (raw < 2).any() and (raw > 5).any()
    counts = fpn_levels(boxes, FPN_SCALES).bincount(minlength=4)
    assert (counts > 0).all(), counts


def test_empty_levels_and_images(device):
    """Levels with no RoI get zero gradient; an image with no box is fine."""
    maps = make_pyramid(device=device, requires_grad=True)
    boxes = [torch.tensor([[10.0, 10.0, 60.0, 50.0], [100.0, 80.0, 180.0, 200.0]], device=device),
             torch.zeros(0, 4, device=device)]
    expected = torchvision_pool(maps, boxes, IMAGE_SHAPES)
    actual = ours_pool(maps, boxes, IMAGE_SHAPES)
    torch.testing.assert_close(actual, expected)
    grads = torch.autograd.grad(actual.sum(), list(maps.values()))
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert torch.count_nonzero(g) == 0


def test_no_rois(device):
    maps = make_pyramid(device=device, requires_grad=True)
    out = ours_pool(maps, [torch.zeros(0, 4, device=device)] * 2, IMAGE_SHAPES)
    assert out.shape == (0, 8, 7, 7)
    grads = torch.autograd.grad(out.sum(), list(maps.values()))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_feature_dict_order_and_unused_maps(device):
    """As torchvision: maps are taken in the dict's order, names not listed
    are ignored."""
    maps = make_pyramid(device=device)
    maps["pool"] = torch.randn(2, 8, 13, 17, device=device)
    names = ["p5", "p3", "p2", "p4"]  # order of featmap_names does not matter
    boxes = make_boxes([40, 30], device=device)
    expected = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)(maps, boxes, IMAGE_SHAPES)
    actual = maskrcnn_ops.MultiScaleRoIAlign(names, 7, 2)(maps, boxes, IMAGE_SHAPES)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("canonical", [(224, 4), (112, 3), (448, 5)])
def test_canonical_scale_and_level(device, canonical):
    scale, level = canonical
    maps = make_pyramid(device=device)
    boxes = make_boxes([60, 60], device=device)
    kwargs = dict(canonical_scale=scale, canonical_level=level)
    expected = torchvision.ops.MultiScaleRoIAlign(list(maps), 7, 2, **kwargs)(maps, boxes, IMAGE_SHAPES)
    actual = maskrcnn_ops.MultiScaleRoIAlign(list(maps), 7, 2, **kwargs)(maps, boxes, IMAGE_SHAPES)
    torch.testing.assert_close(actual, expected)


def test_three_levels_starting_at_p3(device):
    """A pyramid that does not start at P2: first level from the scales."""
    sizes = [(100, 136), (50, 68), (25, 34)]
    maps = make_pyramid(sizes, device=device)
    boxes = make_boxes([80, 50], device=device)
    torch.testing.assert_close(ours_pool(maps, boxes, IMAGE_SHAPES), torchvision_pool(maps, boxes, IMAGE_SHAPES))


def test_single_level_is_roi_align(device):
    maps = make_pyramid([(100, 136)], device=device)
    boxes = make_boxes([50, 40], device=device)
    expected = maskrcnn_ops.roi_align(maps["p2"], boxes, 7, spatial_scale=1 / 8, sampling_ratio=2)
    torch.testing.assert_close(ours_pool(maps, boxes, IMAGE_SHAPES), expected, rtol=0, atol=0)
    torch.testing.assert_close(torchvision_pool(maps, boxes, IMAGE_SHAPES), expected)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("aligned", [False, True])
def test_matches_reference_and_keeps_layout(device, memory_format, aligned):
    maps = make_pyramid(channels=5, device=device, memory_format=memory_format, requires_grad=True)
    rois = boxes_to_rois(make_boxes([30, 25], device=device))
    actual = maskrcnn_ops.multi_scale_roi_align(
        list(maps.values()), rois, 7, 2, spatial_scales=FPN_SCALES, aligned=aligned
    )
    expected = reference.multi_level_roi_align(list(maps.values()), rois, 7, FPN_SCALES, 2, aligned)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert actual.is_contiguous(memory_format=memory_format)
    grad = torch.randn_like(actual)  # the gradient's layout follows this one's
    actual_grads = torch.autograd.grad(actual, list(maps.values()), grad)
    expected_grads = torch.autograd.grad(expected, list(maps.values()), grad)
    for a, e, f in zip(actual_grads, expected_grads, maps.values()):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
        assert a.is_contiguous(memory_format=memory_format) and a.shape == f.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_matches_reference(device, dtype):
    maps = make_pyramid(dtype=dtype, device=device)
    rois = boxes_to_rois(make_boxes([30, 25], device=device))
    actual = maskrcnn_ops.multi_scale_roi_align(list(maps.values()), rois, 7, 2, spatial_scales=FPN_SCALES)
    expected = reference.multi_level_roi_align(list(maps.values()), rois, 7, FPN_SCALES, 2)
    assert actual.dtype == dtype
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(actual, expected, **tol)


# --------------------------------------------------------------- level mapping --


def test_level_mapping_matches_torchvision_level_mapper(device):
    """Our in-kernel formula and torchvision's LevelMapper agree box for box,
    including the exact powers of two that sit on level boundaries; the
    kernel's choice on each device against the mapper run on that device (the
    device's own log2 and sqrt)."""
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(20000, 2, generator=g) * 500
    wh = torch.rand(20000, 2, generator=g) ** 2 * 1000
    boxes = torch.cat([xy, xy + wh], 1)
    sides = torch.tensor([56.0, 112.0, 224.0, 448.0, 896.0, 111.99999, 112.00001])
    boxes = torch.cat([boxes, torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)])
    mapper = torchvision.ops.poolers.LevelMapper(2, 5)
    expected = mapper([boxes])
    torch.testing.assert_close(fpn_levels(boxes, FPN_SCALES), expected, rtol=0, atol=0)
    # In float64 too (the precision the reference and the kernel use for
    # float64 features).
    torch.testing.assert_close(fpn_levels(boxes.double(), FPN_SCALES), mapper([boxes.double()]), rtol=0, atol=0)
    # The kernel's choice, observed through which level receives gradient:
    # pool one channel with a distinct constant per level.
    maps = [torch.full((1, 1, h, w), float(level + 1), device=device) for level, (h, w) in enumerate(FPN_SIZES)]
    inside = (boxes[:, 2] < 1000) & (boxes[:, 3] < 700) & (boxes[:, 0] >= 1) & (boxes[:, 1] >= 1)
    boxes = boxes[inside].to(device)
    out = maskrcnn_ops.multi_scale_roi_align(maps, [boxes], 1, 2, spatial_scales=FPN_SCALES)
    torch.testing.assert_close(out.flatten().round().long() - 1, mapper([boxes]), rtol=0, atol=0)


def test_infer_scales_as_torchvision():
    maps = make_pyramid()
    features = list(maps.values())
    scales, mapper = torchvision.ops.poolers._setup_scales(features, IMAGE_SHAPES, 224, 4)
    assert infer_scales(features, IMAGE_SHAPES) == scales == FPN_SCALES
    assert (mapper.k_min, mapper.k_max) == (2, 5)


def test_scales_follow_the_images_of_each_call(device):
    """One module, batches of different sizes: scales are inferred per call."""
    pool = maskrcnn_ops.MultiScaleRoIAlign(["p2", "p3"], 7, 2)
    small = make_pyramid([(50, 68), (25, 34)], device=device)
    boxes = make_boxes([10, 10], image=(200, 272), device=device)
    out = pool(small, boxes, [(200, 272)] * 2)
    assert infer_scales(list(small.values()), [(200, 272)] * 2) == [1 / 4, 1 / 8]
    expected = torchvision.ops.MultiScaleRoIAlign(["p2", "p3"], 7, 2)(small, boxes, [(200, 272)] * 2)
    torch.testing.assert_close(out, expected)
    large = make_pyramid([(100, 136), (50, 68)], device=device)
    state = dict(vars(pool))
    out = pool(large, boxes, [(800, 1088)] * 2)
    assert infer_scales(list(large.values()), [(800, 1088)] * 2) == [1 / 8, 1 / 16]
    expected = torchvision.ops.MultiScaleRoIAlign(["p2", "p3"], 7, 2)(large, boxes, [(800, 1088)] * 2)
    torch.testing.assert_close(out, expected)
    assert vars(pool) == state and not hasattr(pool, "scales")  # a forward changes no attribute


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_python_level_mapping_equals_the_kernels(device, dtype):
    """fpn_levels, the one Python definition of the mapping (the reference
    uses it), equals the kernel's choice box for box: random boxes from far
    below the finest to far above the coarsest level, exact powers of two,
    zero-area boxes (log2(0) = -inf: the finest level), negative areas (NaN:
    level 0) and boxes inverted in both x and y (a positive area). The
    kernel's choice is observed by pooling, at each box's centre, maps that
    hold a distinct constant per level."""
    g = torch.Generator().manual_seed(7)
    centre = torch.rand(3000, 2, generator=g, dtype=torch.float64) * 100
    half = torch.rand(3000, 2, generator=g, dtype=torch.float64) ** 3 * 700
    sides = torch.tensor([56.0, 112.0, 224.0, 448.0, 896.0, 111.99999, 112.00001, 1e-20, 1e6], dtype=torch.float64)
    special = [
        [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 30.0], [0.0, 0.0, 30.0, 0.0],  # zero area
        [30.0, 0.0, 0.0, 30.0], [0.0, 30.0, 30.0, 0.0], [20.0, 0.0, 19.0, 500.0],  # negative area
        [30.0, 30.0, 0.0, 0.0], [900.0, 900.0, 0.0, 0.0],  # both inverted: positive area
    ]
    boxes = torch.cat([
        torch.cat([centre - half, centre + half], 1),
        torch.stack([-sides / 2, -sides / 2, sides / 2, sides / 2], 1),
        torch.tensor(special, dtype=torch.float64),
    ]).to(device=device, dtype=dtype)
    levels = fpn_levels(boxes, FPN_SCALES)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (levels[area < 0] == 0).all() and (levels[area == 0] == 0).all()
    assert levels.bincount(minlength=4).min() > 0

    maps = [torch.full((1, 1, 64, 64), float(level + 1), dtype=dtype, device=device) for level in range(4)]
    pooled = maskrcnn_ops.multi_scale_roi_align(maps, [boxes], 1, 1, spatial_scales=FPN_SCALES)
    torch.testing.assert_close(pooled.flatten().round().long() - 1, levels, rtol=0, atol=0)

    # NaN coordinates: level 0 in both (the kernel then pools zeros, so its
    # choice cannot be seen, only that it stays in bounds).
    nan = torch.tensor([[math.nan, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, math.nan]], dtype=dtype, device=device)
    assert fpn_levels(nan, FPN_SCALES).tolist() == [0, 0]
    assert torch.count_nonzero(maskrcnn_ops.multi_scale_roi_align(maps, [nan], 1, 1, spatial_scales=FPN_SCALES)) == 0


# ------------------------------------------------- gradcheck / opcheck / compile --


def _small_problem(device, dtype=torch.float64, memory_format=torch.contiguous_format):
    maps = make_pyramid([(8, 10), (4, 5), (2, 3)], batch=2, channels=2, dtype=dtype, device=device,
                        memory_format=memory_format, requires_grad=True)
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(12, 2, generator=g, dtype=torch.float64) * 24
    wh = torch.rand(12, 2, generator=g, dtype=torch.float64) * 48 + 1
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=g).double(), xy, xy + wh], 1).to(device=device, dtype=dtype)
    return list(maps.values()), rois


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_gradcheck_and_gradgradcheck(device, memory_format):
    features, rois = _small_problem(device, memory_format=memory_format)
    # Scales [1/4, 1/8, 1/16] with canonical 16 -> level 2 spreads these boxes.

    def fn(*maps):
        return maskrcnn_ops.multi_scale_roi_align(
            maps, rois, (3, 2), 2, spatial_scales=[1 / 4, 1 / 8, 1 / 16], canonical_scale=16, canonical_level=3
        )

    assert fpn_levels(rois[:, 1:], [1 / 4, 1 / 8, 1 / 16], canonical_scale=16, canonical_level=3).unique().numel() == 3
    assert gradcheck(fn, features)
    assert gradgradcheck(fn, features)


def test_opcheck(device):
    features, rois = _small_problem(device, dtype=torch.float32)
    torch.library.opcheck(
        ops.multi_level_roi_align, (features, rois, [1 / 4, 1 / 8, 1 / 16], 3, 3, 2, False, 16.0, 3)
    )
    grad = torch.randn(rois.size(0), 2, 3, 3, device=device)
    torch.library.opcheck(
        ops.multi_level_roi_align_backward,
        (grad, rois, [1 / 4, 1 / 8, 1 / 16], 3, 3, 2, 2, [8, 4, 2], [10, 5, 3], 2, False, 16.0, 3),
    )


def test_backward_checks_grad_shape(device):
    """multi_level_roi_align_backward rejects a grad that is not [K, C, PH, PW]
    with the message of the single-map backward, naming itself."""
    features, rois = _small_problem(device, dtype=torch.float32)
    args = ([1 / 4, 1 / 8, 1 / 16], 3, 3, 2, 2, [8, 4, 2], [10, 5, 3], 2, False, 16.0, 3)
    expected = rf"maskrcnn_ops::multi_level_roi_align_backward: expected grad of shape \[{rois.size(0)}, 2, 3, 3\]"
    for grad in (torch.ones(rois.size(0), 3, 3, 3), torch.ones(rois.size(0) + 1, 2, 3, 3), torch.ones(2, 3, 3)):
        with pytest.raises(RuntimeError, match=expected):
            ops.multi_level_roi_align_backward(grad.to(device), rois, *args)


def test_compile_fullgraph(device, fresh_dynamo):
    maps = make_pyramid(device=device, requires_grad=True)
    boxes = make_boxes([30, 20], device=device)
    pool = maskrcnn_ops.MultiScaleRoIAlign(list(maps), 7, 2)

    def fn(m, b):
        return pool(m, b, IMAGE_SHAPES).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(maps, boxes), fn(maps, boxes))
    grads = torch.autograd.grad(compiled(maps, boxes), list(maps.values()))
    expected = torch.autograd.grad(fn(maps, boxes), list(maps.values()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_backward_is_deterministic(device, deterministic_mode):
    deterministic_mode(True)
    maps = make_pyramid(device=device, requires_grad=True)
    boxes = make_boxes([200, 200], device=device)
    out = ours_pool(maps, boxes, IMAGE_SHAPES)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, list(maps.values()), grad, retain_graph=True)
    for _ in range(3):
        again = torch.autograd.grad(out, list(maps.values()), grad, retain_graph=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    levels=st.integers(1, 4),
    sampling_ratio=st.integers(-1, 3),
    aligned=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_torchvision(counts, levels, sampling_ratio, aligned, seed):
    """Random pyramids, batches and boxes (including degenerate ones):
    torchvision's module and ours agree (torchvision has no aligned option in
    the module, so aligned=True is checked against the reference)."""
    sizes = FPN_SIZES[:levels]
    maps = make_pyramid([(h // 4, w // 4) for h, w in sizes], batch=len(counts), channels=2, seed=seed)
    boxes = make_boxes(counts, image=(200, 272), seed=seed)
    boxes = [b / 4 for b in boxes]
    shapes = [(200, 272)] * len(counts)
    if not aligned:
        expected = torchvision.ops.MultiScaleRoIAlign(list(maps), 3, sampling_ratio)(maps, boxes, shapes)
        actual = maskrcnn_ops.MultiScaleRoIAlign(list(maps), 3, sampling_ratio)(maps, boxes, shapes)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    features = list(maps.values())
    scales = infer_scales(features, shapes)
    rois = boxes_to_rois(boxes)
    actual = maskrcnn_ops.multi_scale_roi_align(features, rois, 3, sampling_ratio, spatial_scales=scales, aligned=aligned)
    expected = reference.multi_level_roi_align(features, rois, 3, scales, sampling_ratio, aligned)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ bad input --


def _call(features, rois, scales, **kwargs):
    args = dict(pooled_height=2, pooled_width=2, sampling_ratio=2, aligned=False, canonical_scale=224.0, canonical_level=4)
    args.update(kwargs)
    return ops.multi_level_roi_align(features, rois, scales, *args.values())


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_levels", "1 to 8 feature maps"),
        ("too_many_levels", "1 to 8 feature maps"),
        ("wrong_scale_count", "spatial_scales"),
        ("not_power_of_two", "powers of two"),
        ("not_halving", "half the previous"),
        ("channel_mismatch", "same batch size and channels"),
        ("dtype_mismatch", "one dtype"),
        ("bad_rois", "[K, 5]"),
        ("three_d_features", "[N, C, H, W]"),
        ("bad_canonical_scale", "canonical_scale"),
        ("batch_index", "batch index"),
    ],
)
def test_bad_input_raises_clear_errors(case, message):
    f = [torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)]
    rois = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0]])
    scales = [0.5, 0.25]
    if case == "no_levels":
        f = []
    elif case == "too_many_levels":
        f = [torch.randn(1, 2, 2, 2)] * 9
        scales = [2.0**-i for i in range(9)]
    elif case == "wrong_scale_count":
        scales = [0.5]
    elif case == "not_power_of_two":
        scales = [0.3, 0.15]
    elif case == "not_halving":
        scales = [0.5, 0.125]
    elif case == "channel_mismatch":
        f[1] = torch.randn(1, 3, 4, 4)
    elif case == "dtype_mismatch":
        f[1] = f[1].double()
    elif case == "bad_rois":
        rois = rois[:, :4]
    elif case == "three_d_features":
        f[0] = f[0][0]
    elif case == "bad_canonical_scale":
        with pytest.raises(RuntimeError, match="canonical_scale"):
            _call(f, rois, scales, canonical_scale=0.0)
        return
    elif case == "batch_index":
        rois[0, 0] = 1.0
    with pytest.raises((RuntimeError, ValueError), match=message.replace("[", r"\[").replace("]", r"\]")):
        _call(f, rois, scales)


def test_module_errors():
    pool = maskrcnn_ops.MultiScaleRoIAlign(["a"], 7, 2)
    with pytest.raises(ValueError, match="none of the feature maps"):
        pool({"b": torch.randn(1, 2, 8, 8)}, [torch.zeros(0, 4)], [(32, 32)])
    with pytest.raises(ValueError, match="image_shapes is empty"):
        pool({"a": torch.randn(1, 2, 8, 8)}, [torch.zeros(0, 4)], [])
    with pytest.raises(ValueError, match="exactly one of"):
        maskrcnn_ops.multi_scale_roi_align([torch.randn(1, 2, 8, 8)], [torch.zeros(0, 4)], 7, 2)


def test_nonfinite_boxes_give_zeros_and_stay_in_bounds(device):
    maps = make_pyramid(device=device)
    nan = float("nan")
    boxes = [torch.tensor([[nan, 0.0, 10.0, 10.0], [0.0, 0.0, float("inf"), 5.0], [5.0, 5.0, 1e30, 1e30]], device=device),
             torch.zeros(0, 4, device=device)]
    out = ours_pool(maps, boxes, IMAGE_SHAPES)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[:2]) == 0
