"""maskrcnn_ops.paste_masks: against torchvision's paste_masks_in_image and
the pure-PyTorch reference, on CPU and CUDA.

Oracles: torchvision for boxes it handles (inside or crossing the image;
it raises for boxes wholly left of or above it), the reference
(maskrcnn_ops.reference.paste_masks: a loop over masks with the same
geometry) for everything else: boxes outside the image, tiny, inverted,
NaN, huge. Tolerances: float32 1e-5 against torchvision (the issue's bound;
F.interpolate may contract into FMAs), float64 1e-12; float16 / bfloat16
masks are computed in float32 and rounded once, so they are within one unit
in the last place of the dtype of the float32 result. Binarized: equal to
torchvision's ``> threshold`` except pixels within 1e-4 of the threshold.
The CUDA kernel itself, run on the CPU, is compared with the CPU kernel in
test_cuda_kernels_emulated.py.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

import maskrcnn_ops
from maskrcnn_ops import reference

ops = torch.ops.maskrcnn_ops


def make_boxes(num, height, width, *, seed=0, outside=False, dtype=torch.float32):
    """Random (x1, y1, x2, y2) boxes: inside the image, or with ``outside``
    also crossing and beyond its borders, tiny and inverted ones."""
    g = torch.Generator().manual_seed(seed)
    if not outside:
        x1 = torch.rand(num, generator=g) * width * 0.9
        y1 = torch.rand(num, generator=g) * height * 0.9
        x2 = x1 + 1 + torch.rand(num, generator=g) * (width - x1)
        y2 = y1 + 1 + torch.rand(num, generator=g) * (height - y1)
        return torch.stack([x1, y1, x2, y2], 1).to(dtype)
    corners = (torch.rand(num, 2, generator=g) * 1.6 - 0.3) * torch.tensor([width, height])
    sizes = (torch.rand(num, 2, generator=g) * 1.2 - 0.2) * torch.tensor([width, height])  # some inverted
    sizes[: num // 4] *= 0.02  # tiny
    return torch.cat([corners, corners + sizes], 1).to(dtype)


def tv_reference(masks, boxes, size, padding=1):
    """torchvision's paste of masks [D, M, M] (only for boxes it accepts)."""
    return tv_paste(masks[:, None].float(), boxes.float(), size, padding=padding)[:, 0]


@pytest.mark.parametrize("side,size,padding", [(28, (60, 80), 1), (14, (45, 31), 1), (7, (64, 64), 2), (28, (50, 70), 0)])
def test_matches_torchvision(device, side, size, padding):
    masks = torch.rand(25, side, side)
    boxes = make_boxes(25, *size, seed=side)
    expected = tv_reference(masks, boxes, size, padding)
    ours = maskrcnn_ops.paste_masks(masks.to(device), boxes.to(device), size, padding=padding)
    assert ours.shape == (25, *size) and ours.dtype == torch.float32 and ours.device.type == device
    torch.testing.assert_close(ours.cpu(), expected, rtol=0, atol=1e-5)


def test_boxes_crossing_the_borders_match_torchvision(device):
    """Boxes over the right and bottom borders (and the top-left corner
    region) paste the visible part, as torchvision does."""
    masks = torch.rand(4, 28, 28)
    boxes = torch.tensor([[-10.0, -8, 30, 20], [50, 40, 95, 75], [0, 0, 79, 59], [70, 2, 140, 9]])
    torch.testing.assert_close(maskrcnn_ops.paste_masks(masks.to(device), boxes.to(device), (60, 80)).cpu(),
                               tv_reference(masks, boxes, (60, 80)), rtol=0, atol=1e-5)


def edge_boxes():
    """Boxes beyond the image, tiny, inverted, degenerate and non-finite."""
    nan, inf = math.nan, math.inf
    return torch.tensor([
        [-50.0, -40, -10, -5],  # above and left of the image (torchvision raises)
        [200, 10, 260, 40],  # right of it
        [10, 300, 40, 340],  # below it
        [30, 30, 30.4, 30.2],  # under a pixel
        [40, 30, 20, 10],  # inverted
        [nan, 10, 30, 40],
        [10, 10, inf, 40],
        [-inf, -inf, inf, inf],
        [-3e38, 0, 3e38, 10],  # its width overflows
        [-1e15, -1e15, 1e15, 1e15],  # past the 2^40 clamp
        [-1e9, 5, 1e9, 25],  # huge, under the clamp
        [5, 5, 5, 5],  # a point
    ])


def test_edge_boxes_match_the_reference(device):
    boxes = edge_boxes()
    masks = torch.rand(boxes.size(0), 28, 28)
    ours = maskrcnn_ops.paste_masks(masks.to(device), boxes.to(device), (60, 80)).cpu()
    torch.testing.assert_close(ours, reference.paste_masks(masks, boxes, (60, 80)), rtol=0, atol=1e-5)
    # Boxes outside and non-finite ones paste nothing, nor does the inverted
    # one (its grown x2 < x1: an empty slice in torchvision too); the tiny
    # box grows to 2 x 2 pixels, the point stays one.
    assert ours[:3].eq(0).all() and ours[4:9].eq(0).all()
    assert [int(p.count_nonzero()) for p in ours[[3, 11]]] == [4, 1]
    assert ours[9].ne(0).all()  # covers the image (values of its mask's middle)


def test_random_boxes_outside_match_the_reference(device):
    boxes = make_boxes(60, 50, 70, seed=3, outside=True)
    masks = torch.rand(60, 28, 28)
    ours = maskrcnn_ops.paste_masks(masks.to(device), boxes.to(device), (50, 70)).cpu()
    torch.testing.assert_close(ours, reference.paste_masks(masks, boxes, (50, 70)), rtol=0, atol=1e-5)


def test_reference_matches_torchvision():
    """The oracle of the edge cases agrees with torchvision where both apply."""
    masks, boxes = torch.rand(30, 28, 28), make_boxes(30, 60, 80, seed=5)
    torch.testing.assert_close(reference.paste_masks(masks, boxes, (60, 80)), tv_reference(masks, boxes, (60, 80)),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(0, 40), (30, 0), (0, 0)])
def test_empty_image(device, size):
    out = maskrcnn_ops.paste_masks(torch.rand(3, 28, 28, device=device), make_boxes(3, 30, 40).to(device), size)
    assert out.shape == (3, *size) and out.dtype == torch.float32


def test_no_masks(device):
    out = maskrcnn_ops.paste_masks(torch.rand(0, 28, 28, device=device), torch.zeros(0, 4, device=device), (30, 40),
                                   threshold=0.5)
    assert out.shape == (0, 30, 40) and out.dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_masks(device, dtype):
    """Computed in float32 and rounded once: within one unit in the last
    place (of the dtype) of the float32 paste of the same values, and of
    torchvision's within two."""
    masks, boxes = torch.rand(20, 28, 28).to(dtype), make_boxes(20, 60, 80, seed=7)
    ours = maskrcnn_ops.paste_masks(masks.to(device), boxes.to(device), (60, 80))
    assert ours.dtype == dtype
    exact = maskrcnn_ops.paste_masks(masks.float(), boxes, (60, 80))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ours.cpu().float(), exact, rtol=eps, atol=eps / 2)
    torch.testing.assert_close(ours.cpu().float(), tv_reference(masks.float(), boxes, (60, 80)), rtol=2 * eps,
                               atol=eps)


def test_float64(device):
    masks, boxes = torch.rand(10, 28, 28, dtype=torch.float64), make_boxes(10, 60, 80, dtype=torch.float64)
    ours = maskrcnn_ops.paste_masks(masks.to(device), boxes.to(device), (60, 80)).cpu()
    expected = tv_paste(masks[:, None], boxes, (60, 80))[:, 0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("threshold", [0.5, 0.2, 0.9])
def test_threshold_matches_torchvision(device, threshold):
    """bool masks: torchvision's pasted probabilities > threshold, except
    pixels within 1e-4 of it (float rounding may fall either way there)."""
    masks, boxes = torch.rand(30, 28, 28), make_boxes(30, 60, 80, seed=11)
    ours = maskrcnn_ops.paste_masks(masks.to(device), boxes.to(device), (60, 80), threshold=threshold).cpu()
    assert ours.dtype == torch.bool
    theirs = tv_reference(masks, boxes, (60, 80))
    settled = (theirs - threshold).abs() > 1e-4
    assert torch.equal(ours[settled], (theirs > threshold)[settled])
    # Against the probabilities of the op itself: exactly their comparison.
    assert torch.equal(ours, maskrcnn_ops.paste_masks(masks, boxes, (60, 80)) > threshold)


def test_threshold_compares_before_rounding():
    """float16 masks: the bool output compares the float32 value, so it
    equals the float32 paste's comparison even where rounding to float16
    would land on the threshold."""
    masks, boxes = torch.rand(20, 28, 28).half(), make_boxes(20, 60, 80, seed=13)
    binary = maskrcnn_ops.paste_masks(masks, boxes, (60, 80), threshold=0.5)
    assert torch.equal(binary, maskrcnn_ops.paste_masks(masks.float(), boxes, (60, 80)) > 0.5)


def test_nan_mask_values_are_not_set():
    masks = torch.full((1, 28, 28), math.nan)
    boxes = torch.tensor([[5.0, 5, 40, 40]])
    assert maskrcnn_ops.paste_masks(masks, boxes, (60, 80), threshold=0.5).sum() == 0
    assert maskrcnn_ops.paste_masks(masks, boxes, (60, 80))[0, 10, 10].isnan()


def test_strided_inputs(device):
    masks, boxes = torch.rand(10, 28, 28, device=device), make_boxes(10, 60, 80).to(device)
    strided_masks = masks.transpose(1, 2).contiguous().transpose(1, 2)
    strided_boxes = boxes.t().contiguous().t()
    torch.testing.assert_close(maskrcnn_ops.paste_masks(strided_masks, strided_boxes, (60, 80)),
                               maskrcnn_ops.paste_masks(masks, boxes, (60, 80)), rtol=0, atol=0)


def test_cpu_uses_threads_consistently():
    """One thread and several give the same bits (each pixel is computed by
    one thread with the same arithmetic)."""
    masks, boxes = torch.rand(40, 28, 28), make_boxes(40, 200, 300, seed=17, outside=True)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = maskrcnn_ops.paste_masks(masks, boxes, (200, 300))
        torch.set_num_threads(max(previous, 2))
        many = maskrcnn_ops.paste_masks(masks, boxes, (200, 300))
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, many)


def _allocated_bytes(fn):
    """Bytes the CPU allocator hands out while ``fn`` runs (the sum of the
    profiler's positive per-op allocations, so a temporary freed before the
    end still counts), and fn's result."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
    return allocated, result


def test_memory_is_the_output_alone():
    """The threshold path allocates the bool output and nothing of D x H x W
    floats (no padded, resized or full-size float masks): what the op
    allocates beyond its output is under a kilobyte per mask. (An output
    under the 8 MiB from which csrc/cpu/paste.cpp maps fresh pages, so the
    allocator, which the profiler sees, gives it.)"""
    masks, boxes = torch.rand(50, 28, 28), make_boxes(50, 300, 500, seed=19)
    output_bytes = 50 * 300 * 500
    allocated, out = _allocated_bytes(lambda: ops.paste_masks(masks, boxes, 300, 500, 1, 0.5))
    assert out.dtype == torch.bool
    assert output_bytes <= allocated <= output_bytes + 50 * 1024, allocated


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_large_output_matches_the_reference(threshold):
    """Outputs from 8 MiB on start as fresh zero pages (csrc/cpu/paste.cpp):
    the same values as the reference, zero outside the windows, and the
    tensor behaves as any other (written to, freed)."""
    masks, boxes = torch.rand(30, 28, 28), make_boxes(30, 600, 500, seed=23, outside=True)
    out = maskrcnn_ops.paste_masks(masks, boxes, (600, 500), threshold=threshold)
    assert out.numel() * out.element_size() >= 8 << 20
    probabilities = reference.paste_masks(masks, boxes, (600, 500))
    if threshold is None:
        torch.testing.assert_close(out, probabilities, rtol=0, atol=1e-5)
    else:
        # As test_threshold_matches_torchvision: the oracle where rounding
        # cannot matter, and exactly the comparison of the op's own values.
        settled = (probabilities - threshold).abs() > 1e-4
        assert torch.equal(out[settled], (probabilities > threshold)[settled])
        assert torch.equal(out, maskrcnn_ops.paste_masks(masks, boxes, (600, 500)) > threshold)
    out.fill_(1)
    assert bool(out.all())
    del out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fresh pages are mapped on Linux only")
def test_large_output_is_resident_only_where_boxes_are():
    """20 float masks of 2000 x 3000 (480 MB) with boxes of at most about
    100 x 100 pixels: the resident memory grows by the pages the windows
    touch (a few MB), not by the output's size, until it is written."""

    def resident_bytes():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    g = torch.Generator().manual_seed(29)
    corners = torch.rand(20, 2, generator=g) * torch.tensor([2900.0, 1900.0])
    boxes = torch.cat([corners, corners + 20 + torch.rand(20, 2, generator=g) * 80], 1)
    masks = torch.rand(20, 28, 28)
    before = resident_bytes()
    out = maskrcnn_ops.paste_masks(masks, boxes, (2000, 3000))
    grown = resident_bytes() - before
    assert out.shape == (20, 2000, 3000)
    assert grown < 32 << 20, grown
    total = out.sum(dtype=torch.float64)  # reading the zeros maps no memory either
    assert resident_bytes() - before < 64 << 20
    expected = sum(float(reference.paste_masks(masks[i : i + 1], boxes[i : i + 1], (2000, 3000)).sum(dtype=torch.float64))
                   for i in range(20))
    assert math.isclose(float(total), expected, rel_tol=1e-6)


def test_backward_raises():
    masks = torch.rand(2, 28, 28, requires_grad=True)
    out = maskrcnn_ops.paste_masks(masks, make_boxes(2, 30, 40), (30, 40))
    with pytest.raises(RuntimeError, match="paste_masks is not differentiable"):
        out.sum().backward()


@pytest.mark.parametrize(
    "masks,boxes,size,padding,threshold,message",
    [
        (torch.rand(2, 28), torch.zeros(2, 4), (10, 10), 1, None, r"masks of shape \[D, M, M\]"),
        (torch.rand(2, 28, 14), torch.zeros(2, 4), (10, 10), 1, None, "square masks"),
        (torch.rand(2, 0, 0), torch.zeros(2, 4), (10, 10), 1, None, "at least 1 x 1"),
        (torch.rand(2, 28, 28), torch.zeros(3, 4), (10, 10), 1, None, r"boxes of shape \[2, 4\]"),
        (torch.rand(2, 28, 28), torch.zeros(2, 5), (10, 10), 1, None, r"boxes of shape \[2, 4\]"),
        (torch.rand(2, 28, 28), torch.zeros(2, 4, dtype=torch.int64), (10, 10), 1, None, "floating-point boxes"),
        (torch.ones(2, 28, 28, dtype=torch.uint8), torch.zeros(2, 4), (10, 10), 1, None, "dtype float32"),
        (torch.rand(2, 28, 28), torch.zeros(2, 4), (-1, 10), 1, None, "non-negative image size"),
        (torch.rand(2, 28, 28), torch.zeros(2, 4), (10, 10), -1, None, "non-negative padding"),
        (torch.rand(2, 28, 28), torch.zeros(2, 4), (10, 10), 1, math.nan, "threshold must not be NaN"),
    ],
)
def test_bad_input(masks, boxes, size, padding, threshold, message):
    with pytest.raises(RuntimeError, match=message):
        ops.paste_masks(masks, boxes, size[0], size[1], padding, threshold)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_mismatch():
    with pytest.raises(RuntimeError, match="same device"):
        maskrcnn_ops.paste_masks(torch.rand(2, 28, 28, device="cuda"), torch.zeros(2, 4), (10, 10))


@pytest.mark.parametrize("threshold", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(device, dtype, threshold):
    masks = torch.rand(6, 14, 14, device=device, dtype=dtype)
    boxes = make_boxes(6, 30, 40, outside=True).to(device)
    result = torch.library.opcheck(ops.paste_masks.default, (masks, boxes, 30, 40, 1, threshold))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_compiles_with_symbolic_image_size(fresh_dynamo):
    """torch.compile(fullgraph=True, dynamic=True): one graph serves images
    of several sizes (the fake kernel's output is [D, H, W] in SymInts)."""
    def paste(masks, boxes, image):
        return maskrcnn_ops.paste_masks(masks, boxes, image.shape[-2:], threshold=0.5)

    compiled = torch.compile(paste, fullgraph=True, dynamic=True, backend="aot_eager")
    masks, boxes = torch.rand(5, 28, 28), make_boxes(5, 40, 50)
    for size in ((40, 50), (41, 57), (64, 33)):
        image = torch.zeros(3, *size)
        assert torch.equal(compiled(masks, boxes, image), paste(masks, boxes, image))
