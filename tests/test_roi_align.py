"""Tests of maskrcnn_ops.roi_align / RoIAlign and the raw dispatcher ops.

Oracles:
  * maskrcnn_ops.reference.roi_align: pure PyTorch, same geometry in the same
    precision, differentiable through autograd (values and input gradients);
  * torchvision.ops.roi_align: the interface and numerics we promise to match.

Every numeric test takes the ``device`` fixture (tests/conftest.py), so it runs
on CPU and on CUDA, the latter skipped without a GPU.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import maskrcnn_ops
from maskrcnn_ops import reference

ops = torch.ops.maskrcnn_ops

NCHW = torch.contiguous_format
CHANNELS_LAST = torch.channels_last
MEMORY_FORMATS = [pytest.param(NCHW, id="nchw"), pytest.param(CHANNELS_LAST, id="channels_last")]
ALL_DTYPES = [
    pytest.param(torch.float32, id="f32"),
    pytest.param(torch.float64, id="f64"),
    pytest.param(torch.float16, id="f16"),
    pytest.param(torch.bfloat16, id="bf16"),
]
GRAD_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]

# Kernel vs reference. Both compute identical sample positions and weights in
# the accumulation precision and differ only in summation order; half types
# are compared against the reference run on the *same* half input (which also
# accumulates in float32), so the only difference left is the final rounding.
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}

# ------------------------------------------------------------------ helpers --


def make_features(n, c, h, w, *, dtype=torch.float32, device="cpu", memory_format=NCHW, seed=0):
    """Reproducible N(0, 1) features (drawn in float64 on CPU, then cast), so
    every dtype and device sees the same values up to rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    return x.to(device=device, memory_format=memory_format)


def make_rois(n, h, w, *, spatial_scale=1.0, num_random=6, dtype=torch.float32, device="cpu", seed=0):
    """RoIs [K, 5] in *image* coordinates (feature coordinates / spatial_scale).

    Random boxes may start left of / above the image and end past it (partly
    outside); a few fixed boxes add: a sub-pixel box (exercises the 1x1 clamp
    of aligned=False and a sub-1 adaptive grid), a box much larger than the
    map, a box straddling the bottom-right corner and a box hugging the
    top-left corner.
    """
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = h / spatial_scale, w / spatial_scale
    x1 = (torch.rand(num_random, generator=g, dtype=torch.float64) * 1.3 - 0.3) * img_w
    y1 = (torch.rand(num_random, generator=g, dtype=torch.float64) * 1.3 - 0.3) * img_h
    bw = (torch.rand(num_random, generator=g, dtype=torch.float64) * 0.9 + 0.02) * img_w
    bh = (torch.rand(num_random, generator=g, dtype=torch.float64) * 0.9 + 0.02) * img_h
    random_boxes = torch.stack([x1, y1, x1 + bw, y1 + bh], dim=1)
    fixed_boxes = torch.tensor(
        [
            [0.3 * img_w, 0.4 * img_h, 0.3 * img_w + 0.3, 0.4 * img_h + 0.2],  # sub-pixel
            [-0.5 * img_w, -0.5 * img_h, 1.5 * img_w, 1.5 * img_h],  # covers everything
            [0.8 * img_w, 0.7 * img_h, 1.2 * img_w, 1.3 * img_h],  # bottom-right corner
            [-1.0, -1.0, 0.25 * img_w, 0.3 * img_h],  # top-left corner
        ],
        dtype=torch.float64,
    )
    boxes = torch.cat([random_boxes, fixed_boxes])
    batch = torch.randint(0, n, (boxes.size(0), 1), generator=g).to(torch.float64)
    return torch.cat([batch, boxes], dim=1).to(dtype=dtype, device=device)


def rois_to_list(rois: torch.Tensor, n: int):
    """Tensor[K, 5] -> torchvision's list-of-Tensor[L, 4] form, plus the order
    of the rows in the concatenated list (to compare outputs row by row)."""
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(n)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).flatten() for i in range(n)])
    return boxes, order


def rois_dtype_for(dtype):
    """float64 boxes for float64 features; float32 (full precision) otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_exactly_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=CHANNELS_LAST) and not t.is_contiguous()


def reference_grad(x, rois, output_size, spatial_scale, sampling_ratio, aligned, grad_output):
    """Input gradient of the reference implementation for a given output gradient."""
    xr = x.detach().clone().requires_grad_(True)
    out = reference.roi_align(xr, rois, output_size, spatial_scale, sampling_ratio, aligned)
    if not out.requires_grad:
        # No RoI samples the map (K == 0, or only empty/non-finite boxes): the
        # reference then builds its output from new_zeros, outside autograd.
        return torch.zeros_like(xr)
    (grad,) = torch.autograd.grad(out, xr, grad_output)
    return grad


# ------------------------------------------------------- forward vs reference --


@pytest.mark.parametrize("spatial_scale", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_forward_matches_reference(device, dtype, memory_format, aligned, sampling_ratio, spatial_scale):
    """Values match the reference for every dtype, layout and parameter; the
    output has the input's dtype and is channels_last exactly when the input is."""
    n, c, h, w = 2, 4, 13, 17  # H != W and a non-square output catch transposed axes
    output_size = (3, 4)
    x = make_features(n, c, h, w, dtype=dtype, device=device, memory_format=memory_format)
    rois = make_rois(n, h, w, spatial_scale=spatial_scale, dtype=rois_dtype_for(dtype), device=device)

    out = maskrcnn_ops.roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
    expected = reference.roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)

    assert out.shape == (rois.size(0), c, *output_size)
    assert out.dtype == dtype
    assert out.device == x.device
    assert is_exactly_channels_last(out) == (memory_format == CHANNELS_LAST)
    if memory_format == NCHW:
        assert out.is_contiguous()
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("channels", [16, 20, 70])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_forward_and_backward_channel_blocking(device, channels, memory_format):
    """Channel counts that fill the kernels' channel blocks (16 for the NCHW
    forward, 64 for the NHWC backward) and leave a partial block, with many
    RoIs so the work is split across threads."""
    n, h, w = 2, 11, 12
    x = make_features(n, channels, h, w, device=device, memory_format=memory_format, seed=1)
    rois = make_rois(n, h, w, num_random=40, device=device, seed=1)
    out = maskrcnn_ops.roi_align(x, rois, 3, 1.0, -1, True)
    torch.testing.assert_close(out, reference.roi_align(x, rois, 3, 1.0, -1, True), **TOLERANCES[torch.float32])

    grad_output = torch.randn_like(out)  # same layout as the output
    grad = ops.roi_align_backward(grad_output, rois, 1.0, 3, 3, n, channels, h, w, -1, True)
    expected = reference_grad(x, rois, 3, 1.0, -1, True, grad_output)
    torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("boxes_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_boxes_dtype_is_independent_of_features(device, boxes_dtype):
    """Boxes may have another floating dtype than the features: they are read
    in the accumulation precision, giving the same result as the same (rounded)
    coordinates passed as float32."""
    x = make_features(2, 3, 10, 12, device=device)
    rois = make_rois(2, 10, 12, device=device).to(boxes_dtype)
    out = maskrcnn_ops.roi_align(x, rois, 2, 1.0, 2, True)
    torch.testing.assert_close(out, maskrcnn_ops.roi_align(x, rois.float(), 2, 1.0, 2, True), atol=0, rtol=0)


# ----------------------------------------------------- backward vs reference --


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
@pytest.mark.parametrize("grad_format", MEMORY_FORMATS)
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", GRAD_DTYPES)
def test_input_gradient_matches_reference(device, dtype, memory_format, grad_format, aligned, sampling_ratio):
    """Autograd's input gradient equals the reference's, for NCHW and
    channels_last inputs and for output gradients in either layout."""
    n, c, h, w = 2, 3, 12, 15
    spatial_scale, output_size = 0.5, (3, 2)
    x = make_features(n, c, h, w, dtype=dtype, device=device, memory_format=memory_format).requires_grad_(True)
    rois = make_rois(n, h, w, spatial_scale=spatial_scale, dtype=dtype, device=device)
    out = maskrcnn_ops.roi_align(x, rois, output_size, spatial_scale, sampling_ratio, aligned)
    grad_output = torch.randn(out.shape, dtype=dtype, device=device).contiguous(memory_format=grad_format)

    (grad,) = torch.autograd.grad(out, x, grad_output)
    expected = reference_grad(x, rois, output_size, spatial_scale, sampling_ratio, aligned, grad_output)
    tol = TOLERANCES[dtype] if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected, **tol)


@pytest.mark.parametrize("grad_format", MEMORY_FORMATS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_raw_backward_op(device, dtype, grad_format):
    """roi_align_backward called directly: the reference gradient, in grad's
    dtype, with the layout its fake kernel promises (channels_last iff grad is)."""
    n, c, h, w = 2, 4, 9, 10
    x = make_features(n, c, h, w, dtype=dtype, device=device)
    rois = make_rois(n, h, w, dtype=torch.float32, device=device)
    grad_output = make_features(rois.size(0), c, 2, 3, dtype=dtype, device=device, memory_format=grad_format, seed=3)

    grad = ops.roi_align_backward(grad_output, rois, 1.0, 2, 3, n, c, h, w, 2, False)
    assert grad.shape == (n, c, h, w)
    assert grad.dtype == dtype
    assert is_exactly_channels_last(grad) == (grad_format == CHANNELS_LAST)
    # Half types accumulate in float32 and round once at the end.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = reference_grad(x.to(acc), rois, (2, 3), 1.0, 2, False, grad_output.to(acc)).to(dtype)
    torch.testing.assert_close(grad, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_channels_last_input_gradient_through_sum(device, memory_format):
    """The everyday `loss = out.sum(); loss.backward()` path (the output
    gradient is an expanded, stride-0 tensor) gives the reference gradient in
    .grad, in the layout of the input."""
    x = make_features(2, 3, 10, 11, device=device, memory_format=memory_format).requires_grad_(True)
    rois = make_rois(2, 10, 11, device=device)
    maskrcnn_ops.roi_align(x, rois, 3, 1.0, 2, True).sum().backward()
    expected = reference_grad(x, rois, 3, 1.0, 2, True, torch.ones(rois.size(0), 3, 3, 3, device=device))
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-5)
    assert x.grad.is_contiguous(memory_format=memory_format)


# ------------------------------------------------------------- torchvision --


def _torchvision_cases():
    """(seed, spatial_scale, sampling_ratio, aligned, output_size)."""
    return [
        (0, 1.0, -1, False, 7),
        (1, 0.5, 2, True, (3, 5)),
        (2, 0.25, 0, True, (4, 2)),
        (3, 0.5, 1, False, 2),
        (4, 1.0, 3, True, (5, 5)),
    ]


@pytest.mark.parametrize("boxes_form", ["tensor", "list"])
@pytest.mark.parametrize("case", _torchvision_cases(), ids=lambda c: f"seed{c[0]}")
def test_matches_torchvision(case, boxes_form):
    """Forward values and input gradients agree with torchvision.ops.roi_align
    (float32, CPU) within 1e-5, for boxes as a Tensor[K, 5] or a list of Tensor[L, 4]."""
    seed, spatial_scale, sampling_ratio, aligned, output_size = case
    n, c, h, w = 2, 3, 14, 18
    x = make_features(n, c, h, w, seed=seed)
    rois = make_rois(n, h, w, spatial_scale=spatial_scale, num_random=8, seed=seed)
    boxes = rois if boxes_form == "tensor" else rois_to_list(rois, n)[0]

    x_ours = x.clone().requires_grad_(True)
    x_tv = x.clone().requires_grad_(True)
    ours = maskrcnn_ops.roi_align(x_ours, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    theirs = torchvision.ops.roi_align(x_tv, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5

    grad_output = torch.randn(ours.shape, generator=torch.Generator().manual_seed(seed))
    ours.backward(grad_output)
    theirs.backward(grad_output)
    assert (x_ours.grad - x_tv.grad).abs().max().item() <= 1e-5


def test_list_boxes_equal_tensor_boxes(device):
    """The list-of-boxes form is the Tensor[K, 5] form with the batch index
    taken from the list position (rows grouped by image), including an image
    without boxes."""
    n, h, w = 3, 10, 12
    x = make_features(n, 3, h, w, device=device)
    rois = make_rois(n - 1, h, w, device=device)  # image n-1 gets no box
    boxes, order = rois_to_list(rois, n)
    assert boxes[-1].shape == (0, 4)
    from_list = maskrcnn_ops.roi_align(x, boxes, (2, 3), 1.0, 2, True)
    from_tensor = maskrcnn_ops.roi_align(x, rois, (2, 3), 1.0, 2, True)
    torch.testing.assert_close(from_list, from_tensor[order.to(device)], atol=0, rtol=0)


def test_module_matches_torchvision():
    """maskrcnn_ops.RoIAlign behaves and prints like torchvision.ops.RoIAlign."""
    n, h, w = 2, 16, 16
    x = make_features(n, 4, h, w, seed=5)
    rois = make_rois(n, h, w, spatial_scale=0.25, seed=5)
    for args in [(7, 0.25, 2), ((3, 5), 0.25, -1, True)]:
        ours, theirs = maskrcnn_ops.RoIAlign(*args), torchvision.ops.RoIAlign(*args)
        assert repr(ours) == repr(theirs)
        assert (ours(x, rois) - theirs(x, rois)).abs().max().item() <= 1e-5
        boxes = rois_to_list(rois, n)[0]
        assert (ours(x, boxes) - theirs(x, boxes)).abs().max().item() <= 1e-5


def test_adaptive_grid_is_exact_ceil_in_float64():
    """float64: a bin size just above an integer (3 + 1e-9) must use ceil = 4
    samples, as torchvision does (float32 geometry would round it to 3)."""
    x = make_features(1, 1, 16, 16, dtype=torch.float64)
    rois = torch.tensor([[0, 0.0, 0.0, 3 + 1e-9, 3.0]], dtype=torch.float64)
    ours = maskrcnn_ops.roi_align(x, rois, 1, 1.0, -1, True)
    theirs = torchvision.ops.roi_align(x, rois, 1, 1.0, -1, True)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


def test_reference_adaptive_grid_is_exact_ceil_in_float64():
    """The reference takes the ceil of the float64 bin size exactly (an earlier
    version rounded it to float32 first)."""
    x = make_features(1, 1, 16, 16, dtype=torch.float64)
    rois = torch.tensor([[0, 0.0, 0.0, 3 + 1e-9, 3.0]], dtype=torch.float64)
    theirs = torchvision.ops.roi_align(x, rois, 1, 1.0, -1, True)
    torch.testing.assert_close(reference.roi_align(x, rois, 1, 1.0, -1, True), theirs, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------ gradcheck / opcheck --


@pytest.mark.parametrize("deterministic", [False, True], ids=["nondeterministic", "deterministic"])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_gradcheck(device, memory_format, deterministic, deterministic_mode):
    """Finite differences agree with the analytical input gradient (float64),
    with deterministic algorithms on and off (the CUDA backward may pick a
    different kernel in deterministic mode)."""
    deterministic_mode(deterministic)
    n, h, w = 2, 5, 6
    x = make_features(n, 2, h, w, dtype=torch.float64, device=device, memory_format=memory_format)
    x.requires_grad_(True)
    rois = make_rois(n, h, w, num_random=2, dtype=torch.float64, device=device)
    for sampling_ratio, aligned in [(-1, False), (2, True)]:
        assert gradcheck(
            lambda t: maskrcnn_ops.roi_align(t, rois, (2, 3), 1.0, sampling_ratio, aligned),
            (x,),
            eps=1e-6,
            atol=1e-5,
        )


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_gradgradcheck(device, memory_format):
    """Double backward: roi_align_backward is differentiable (its gradient is
    roi_align), checked numerically in float64."""
    n, h, w = 2, 6, 7
    x = make_features(n, 2, h, w, dtype=torch.float64, device=device, memory_format=memory_format)
    x.requires_grad_(True)
    rois = make_rois(n, h, w, num_random=3, dtype=torch.float64, device=device)
    assert gradgradcheck(lambda t: maskrcnn_ops.roi_align(t, rois, (2, 3), 1.0, 2, True), (x,), eps=1e-6, atol=1e-5)


def test_double_backward_is_roi_align(device):
    """d/d(grad_output) of <roi_align_backward(grad_output), v> is roi_align(v)."""
    n, c, h, w = 2, 3, 8, 9
    rois = make_rois(n, h, w, num_random=3, dtype=torch.float64, device=device)
    grad_output = torch.randn(rois.size(0), c, 2, 2, dtype=torch.float64, device=device, requires_grad=True)
    v = make_features(n, c, h, w, dtype=torch.float64, device=device, seed=7)
    grad_input = ops.roi_align_backward(grad_output, rois, 1.0, 2, 2, n, c, h, w, -1, True)
    (second,) = torch.autograd.grad((grad_input * v).sum(), grad_output)
    torch.testing.assert_close(second, maskrcnn_ops.roi_align(v, rois, 2, 1.0, -1, True), **TOLERANCES[torch.float64])


def _opcheck_samples(device):
    rois32 = make_rois(2, 8, 9, num_random=2, device=device)
    rois64 = rois32.double()
    x32 = make_features(2, 3, 8, 9, device=device)
    x64 = x32.double()
    x_cl = x32.contiguous(memory_format=CHANNELS_LAST)
    k = rois32.size(0)
    return {
        "forward-f32": (ops.roi_align.default, (x32.requires_grad_(), rois32, 1.0, 3, 3, 2, True)),
        "forward-f64": (ops.roi_align.default, (x64.requires_grad_(), rois64, 0.5, 2, 4, -1, False)),
        "forward-channels_last": (ops.roi_align.default, (x_cl.requires_grad_(), rois32, 0.5, 2, 4, -1, False)),
        "backward-f32": (
            ops.roi_align_backward.default,
            (torch.randn(k, 3, 3, 3, device=device, requires_grad=True), rois32, 1.0, 3, 3, 2, 3, 8, 9, 2, True),
        ),
        "backward-f64": (
            ops.roi_align_backward.default,
            (
                torch.randn(k, 3, 2, 4, dtype=torch.float64, device=device, requires_grad=True),
                rois64, 0.5, 2, 4, 2, 3, 8, 9, -1, False,
            ),
        ),
        "backward-channels_last": (
            ops.roi_align_backward.default,
            (
                torch.randn(k, 3, 3, 3, device=device).contiguous(memory_format=CHANNELS_LAST).requires_grad_(),
                rois32, 1.0, 3, 3, 2, 3, 8, 9, 2, True,
            ),
        ),
    }


@pytest.mark.parametrize(
    "sample",
    ["forward-f32", "forward-f64", "forward-channels_last", "backward-f32", "backward-f64", "backward-channels_last"],
)
def test_opcheck(device, sample):
    """torch.library.opcheck: schema, autograd registration, fake kernel
    (shape/dtype/strides) and AOT-dispatch consistency of both raw ops."""
    op, args = _opcheck_samples(device)[sample]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------ torch.compile --


@pytest.mark.parametrize("boxes_form", ["tensor", "list"])
@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_compile_aot_eager(device, boxes_form, memory_format, fresh_dynamo):
    """torch.compile(fullgraph=True) traces the op without graph breaks; the
    compiled forward equals eager (values and strides) and so does backward.

    Note: AOTAutograd hands the backward a tangent with the forward output's
    strides, so for a channels_last input even `.sum().backward()` feeds a
    channels_last gradient to roi_align_backward."""

    def fn(x, boxes):
        return maskrcnn_ops.roi_align(x, boxes, (3, 2), 0.5, 2, True) * 2.0

    n, h, w = 2, 10, 12
    x = make_features(n, 3, h, w, device=device, memory_format=memory_format)
    rois = make_rois(n, h, w, spatial_scale=0.5, device=device)
    boxes = rois if boxes_form == "tensor" else rois_to_list(rois, n)[0]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")

    x_eager = x.clone().requires_grad_(True)
    x_compiled = x.clone().requires_grad_(True)
    expected = fn(x_eager, boxes)
    actual = compiled(x_compiled, boxes)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    assert actual.stride() == expected.stride()

    expected.sum().backward()
    actual.sum().backward()
    reference_input_grad = reference_grad(x, rois, (3, 2), 0.5, 2, True, torch.full_like(expected, 2.0))
    torch.testing.assert_close(x_eager.grad, reference_input_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, atol=0, rtol=0)


def test_compile_dynamic_shapes(device, fresh_dynamo):
    """With dynamic=True the SymInt schema and the fake kernel let one graph
    serve several numbers of RoIs and feature sizes (no recompilation);
    results equal eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(x, rois):
        return maskrcnn_ops.roi_align(x, rois, 2, 1.0, -1, False)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter, dynamic=True)
    for seed, (h, w, num) in enumerate([(8, 9, 2), (10, 7, 5), (12, 13, 3)]):
        x = make_features(2, 3, h, w, device=device, seed=seed)
        rois = make_rois(2, h, w, num_random=num, device=device, seed=seed)
        torch.testing.assert_close(compiled(x, rois), fn(x, rois), atol=0, rtol=0)
    assert counter.frame_count == 1


def test_compile_inductor(device, fresh_dynamo):
    """The default (inductor) backend, forward and backward, with list boxes."""

    def fn(x, boxes):
        return torch.relu(maskrcnn_ops.roi_align(x, boxes, 2, 1.0, 2, False)) + 1.0

    n, h, w = 2, 9, 10
    x = make_features(n, 3, h, w, device=device)
    boxes = rois_to_list(make_rois(n, h, w, device=device), n)[0]
    compiled = torch.compile(fn, fullgraph=True)

    x_eager = x.clone().requires_grad_(True)
    x_compiled = x.clone().requires_grad_(True)
    expected, actual = fn(x_eager, boxes), compiled(x_compiled, boxes)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    expected.sum().backward()
    actual.sum().backward()
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------ determinism --


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
def test_deterministic_backward_is_bitwise_reproducible(device, memory_format, deterministic_mode):
    """Under torch.use_deterministic_algorithms(True) the backward runs (no
    error) and two runs give bitwise-identical gradients, with many
    overlapping RoIs on the same image (where scatter-adds collide)."""
    deterministic_mode(True)
    n, c, h, w = 2, 8, 12, 12
    x = make_features(n, c, h, w, device=device, memory_format=memory_format).requires_grad_(True)
    rois = make_rois(n, h, w, num_random=60, device=device, seed=11)
    grad_output = torch.randn(rois.size(0), c, 4, 4, device=device)  # NCHW-contiguous

    def grad():
        out = maskrcnn_ops.roi_align(x, rois, 4, 1.0, -1, True)
        return torch.autograd.grad(out, x, grad_output)[0]

    first, second = grad(), grad()
    assert torch.equal(first, second)


def test_cpu_backward_independent_of_thread_count():
    """The CPU backward's summation order is fixed, so the gradient is
    bitwise identical with one thread and with several."""
    n, c, h, w = 2, 8, 12, 12
    rois = make_rois(n, h, w, num_random=60, seed=12)
    grad_output = torch.randn(rois.size(0), c, 3, 3, generator=torch.Generator().manual_seed(12))
    threads = torch.get_num_threads()
    try:
        results = []
        for num_threads in (1, max(threads, 4)):
            torch.set_num_threads(num_threads)
            results.append(ops.roi_align_backward(grad_output, rois, 1.0, 3, 3, n, c, h, w, -1, True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


# --------------------------------------------------------------- autocast --


def test_autocast_cpu_bfloat16():
    """CPU autocast with bf16 features and float32 boxes: bf16 output close to
    the float32 computation, boxes are not cast down, and backward works.
    float32 features are left in float32 (torchvision's policy)."""
    n, h, w = 2, 16, 20
    x = make_features(n, 4, h, w, dtype=torch.bfloat16)
    rois = make_rois(n, h, w, spatial_scale=0.25)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = maskrcnn_ops.roi_align(x, rois, 3, 0.25, 2, True)
        out_f32 = maskrcnn_ops.roi_align(x.float(), rois, 3, 0.25, 2, True)
    assert out.dtype == torch.bfloat16
    assert out_f32.dtype == torch.float32
    expected = maskrcnn_ops.roi_align(x.float(), rois, 3, 0.25, 2, True)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
    # The policy is "run as is": bitwise the result outside autocast, i.e.
    # with float32 boxes (bf16 boxes would move coordinates by up to 0.25 px
    # at this image size).
    torch.testing.assert_close(out, maskrcnn_ops.roi_align(x, rois, 3, 0.25, 2, True), atol=0, rtol=0)
    torch.testing.assert_close(out_f32, expected, atol=0, rtol=0)

    x_grad = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maskrcnn_ops.roi_align(x_grad, rois, 3, 0.25, 2, True).float().sum().backward()
    assert x_grad.grad.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_cuda_float16():
    """CUDA autocast with fp16 features and float32 boxes: fp16 output close
    to the float32 computation."""
    n, h, w = 2, 16, 20
    x = make_features(n, 4, h, w, dtype=torch.float16, device="cuda")
    rois = make_rois(n, h, w, spatial_scale=0.25, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        out = maskrcnn_ops.roi_align(x, rois, 3, 0.25, 2, True)
    assert out.dtype == torch.float16
    expected = maskrcnn_ops.roi_align(x.float(), rois, 3, 0.25, 2, True)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------- edge / bad inputs --


def test_empty_boxes(device):
    """K = 0 (as a Tensor[0, 5] or a list of Tensor[0, 4]): a [0, C, PH, PW]
    output and a zero input gradient of the input's shape."""
    x = make_features(2, 3, 8, 9, device=device).requires_grad_(True)
    for boxes in (torch.zeros(0, 5, device=device), [torch.zeros(0, 4, device=device)] * 2):
        out = maskrcnn_ops.roi_align(x, boxes, (3, 4))
        assert out.shape == (0, 3, 3, 4)
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(x.grad, torch.zeros_like(x))
        x.grad = None
    grad = ops.roi_align_backward(torch.zeros(0, 3, 3, 4, device=device), torch.zeros(0, 5, device=device),
                                  1.0, 3, 4, 2, 3, 8, 9, -1, False)
    assert grad.shape == (2, 3, 8, 9) and not grad.any()


def test_empty_batch(device):
    """N = 0 with K = 0 is valid: empty output and an empty gradient."""
    x = torch.zeros(0, 3, 8, 9, device=device, requires_grad=True)
    out = maskrcnn_ops.roi_align(x, torch.zeros(0, 5, device=device), 2)
    assert out.shape == (0, 3, 2, 2)
    out.sum().backward()
    assert x.grad.shape == (0, 3, 8, 9)


@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
def test_boxes_outside_image_give_zeros(device, aligned):
    """Boxes whose samples all fall more than one pixel outside the map pool
    nothing: zero output and zero gradient."""
    h, w = 8, 10
    x = make_features(1, 3, h, w, device=device).requires_grad_(True)
    rois = torch.tensor(
        [[0, -30.0, -30.0, -10.0, -10.0], [0, w + 5.0, 0.0, w + 15.0, h], [0, 0.0, h + 2.0, w, h + 9.0]],
        device=device,
    )
    for sampling_ratio in (-1, 2):
        out = maskrcnn_ops.roi_align(x, rois, 2, 1.0, sampling_ratio, aligned)
        assert not out.any()
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert not grad.any()


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
def test_non_finite_values_do_not_leak_through_outside_samples(device, aligned, memory_format, deterministic_mode):
    """Samples outside the map read nothing and take no gradient. With Inf
    and NaN at element (0, 0) of the planes, which no inside sample of the
    boxes below reaches (they stick out past the right and bottom borders),
    the output equals torchvision's on the same map with those elements set
    to 0, and so does the reference; an Inf or NaN gradient on such a box's
    bins lands exactly where torchvision's backward puts it, never at (0, 0).
    (Multiplying the outside samples' zero weights by the placeholder element
    would give NaN; torchvision's CUDA kernel, mmcv and detectron2 skip such
    samples, its CPU forward does not.) CUDA runs both backward kernels."""
    h, w = 12, 14
    finite = make_features(2, 3, h, w, device=device)
    x = finite.clone()
    x[:, 0, 0, 0], x[:, 1, 0, 0], x[:, 2, 0, 0] = math.inf, math.nan, -math.inf
    finite[:, :, 0, 0] = 0
    x = x.contiguous(memory_format=memory_format).requires_grad_(True)
    rois = torch.tensor(
        [[0, w - 4.0, 3.0, w + 20.0, 9.0], [1, 4.0, h - 3.0, 11.0, h + 30.0], [1, w - 2.0, h - 2.0, w + 9.0, h + 9.0]],
        device=device,
    )
    for sampling_ratio in (-1, 2):
        out = maskrcnn_ops.roi_align(x, rois, 3, 1.0, sampling_ratio, aligned)
        expected = torchvision.ops.roi_align(finite.cpu(), rois.cpu(), 3, 1.0, sampling_ratio, aligned)
        torch.testing.assert_close(out.detach().cpu(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reference.roi_align(x.detach(), rois, 3, 1.0, sampling_ratio, aligned).cpu(),
                                   expected, atol=1e-5, rtol=1e-5)
        grad_out = torch.ones_like(out)
        grad_out[0, :, 1, 0] = math.inf  # a bin of the first box, half outside
        grad_out[2, 1, 0, 0] = math.nan
        x_cpu = x.detach().cpu().requires_grad_(True)
        torchvision.ops.roi_align(x_cpu, rois.cpu(), 3, 1.0, sampling_ratio, aligned).backward(grad_out.cpu())
        for deterministic in (False, True):
            deterministic_mode(deterministic)
            (grad,) = torch.autograd.grad(out, x, grad_out, retain_graph=True)
            assert not grad[:, :, 0, 0].any()
            torch.testing.assert_close(grad.cpu(), x_cpu.grad, atol=1e-5, rtol=1e-5, equal_nan=True)
            assert grad.isinf().any() and grad.isnan().any()  # the Inf and NaN did arrive


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
def test_zero_size_and_inverted_boxes(device, aligned, sampling_ratio):
    """Degenerate boxes (zero width/height, x2 < x1, y2 < y1) follow the
    reference and torchvision exactly (legacy mode clamps them to 1x1;
    aligned mode gives zeros with an adaptive grid and samples "backwards"
    with a fixed one).

    torchvision itself cannot be the oracle for inverted boxes with
    aligned=True and an adaptive grid: its CPU kernel sizes a std::vector with
    the (negative) product of the grid sizes and raises "cannot create
    std::vector larger than max_size()". Those rows must be zeros here."""
    x = make_features(2, 3, 9, 11, device=device)
    rois = torch.tensor(
        [
            [0, 3.0, 4.0, 3.0, 4.0],  # a point
            [1, 2.0, 2.0, 7.0, 2.0],  # zero height
            [0, 6.0, 1.0, 6.0, 8.0],  # zero width
            [1, 8.0, 2.0, 3.0, 7.0],  # inverted x
            [0, 2.0, 7.0, 9.0, 1.5],  # inverted y
            [1, 9.0, 8.0, 1.0, 0.5],  # inverted both
        ],
        device=device,
    )
    out = maskrcnn_ops.roi_align(x, rois, (2, 3), 1.0, sampling_ratio, aligned)
    torch.testing.assert_close(out, reference.roi_align(x, rois, (2, 3), 1.0, sampling_ratio, aligned),
                               **TOLERANCES[torch.float32])
    rows = slice(None)
    if aligned and sampling_ratio <= 0:
        assert not out[3:].any()
        rows = slice(0, 3)  # zero-size boxes only (see the docstring)
    theirs = torchvision.ops.roi_align(x.cpu(), rois[rows].cpu(), (2, 3), 1.0, sampling_ratio, aligned)
    torch.testing.assert_close(out[rows].cpu(), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
def test_non_finite_box_coordinates(device, bad, aligned):
    """A box with a NaN/Inf coordinate gives zeros (no crash, no garbage), a
    zero gradient, and does not disturb the valid boxes next to it."""
    x = make_features(2, 3, 8, 9, device=device).requires_grad_(True)
    good = torch.tensor([[1, 1.0, 1.0, 6.0, 7.0]], device=device)
    rois = good.repeat(5, 1)
    for i, column in enumerate(range(1, 5)):
        rois[i, column] = bad
    for sampling_ratio in (-1, 2):
        out = maskrcnn_ops.roi_align(x, rois, 3, 1.0, sampling_ratio, aligned)
        assert not out[:4].any()
        torch.testing.assert_close(out[4:], maskrcnn_ops.roi_align(x, good, 3, 1.0, sampling_ratio, aligned))
        (grad,) = torch.autograd.grad(out[:4].sum(), x)
        assert torch.isfinite(grad).all() and not grad.any()


def test_huge_finite_coordinates(device):
    """Finite coordinates whose scaled size overflows (x2 - x1 = inf in
    float32) must not crash and, like the reference, pool nothing."""
    x = make_features(1, 2, 6, 7, device=device)
    rois = torch.tensor(
        [[0, -3e38, -3e38, 3e38, 3e38], [0, -1e30, 0.0, 1e30, 5.0], [0, 1e30, 1e30, 1e30, 1e30]], device=device
    )
    for sampling_ratio in (-1, 2):
        for aligned in (False, True):
            out = maskrcnn_ops.roi_align(x, rois, 2, 1.0, sampling_ratio, aligned)
            torch.testing.assert_close(out, reference.roi_align(x, rois, 2, 1.0, sampling_ratio, aligned))
            assert torch.isfinite(out).all()


def test_raw_backward_argument_checks(device):
    """roi_align_backward validates grad against rois and the input shape."""
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]], device=device)
    ones = lambda *shape: torch.ones(shape, device=device)  # noqa: E731
    with pytest.raises(RuntimeError, match=r"expected grad of shape \[1, 2, 2, 2\]"):
        ops.roi_align_backward(ones(2, 2, 2, 2), rois, 1.0, 2, 2, 1, 2, 6, 7, -1, False)  # K mismatch
    with pytest.raises(RuntimeError, match=r"expected grad of shape \[1, 2, 2, 2\]"):
        ops.roi_align_backward(ones(1, 3, 2, 2), rois, 1.0, 2, 2, 1, 2, 6, 7, -1, False)  # C mismatch
    with pytest.raises(RuntimeError, match=r"expected grad of shape"):
        ops.roi_align_backward(ones(1, 2, 2), rois, 1.0, 2, 2, 1, 2, 6, 7, -1, False)  # 3-D grad
    with pytest.raises(RuntimeError, match="non-negative input shape"):
        ops.roi_align_backward(ones(1, 2, 2, 2), rois, 1.0, 2, 2, -1, 2, 6, 7, -1, False)
    with pytest.raises(RuntimeError, match="expected grad of dtype"):
        ops.roi_align_backward(ones(1, 2, 2, 2).long(), rois, 1.0, 2, 2, 1, 2, 6, 7, -1, False)


@pytest.mark.parametrize("batch_index", [2.0, 5.0, -1.0, -3.5, math.nan], ids=["N", "N+3", "-1", "-3.5", "nan"])
def test_batch_index_out_of_range(device, batch_index):
    """A batch index outside (-1, N) (or NaN) is a RuntimeError naming the
    valid range. The CPU backward checks too; the CUDA backward (normally fed
    the rois its forward already checked) skips the host sync and gives the
    invalid row a zero contribution, never reading out of bounds."""
    x = make_features(2, 3, 8, 9, device=device)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [batch_index, 1.0, 1.0, 5.0, 5.0]], device=device)
    with pytest.raises(RuntimeError, match=r"batch index.*outside the valid range \[0, 2\)"):
        maskrcnn_ops.roi_align(x, rois, 2)
    grad = torch.ones(2, 3, 2, 2, device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"rois\[1, 0\] is a batch index of .*outside the valid range"):
            ops.roi_align_backward(grad, rois, 1.0, 2, 2, 2, 3, 8, 9, -1, False)
    else:
        grad_input = ops.roi_align_backward(grad, rois, 1.0, 2, 2, 2, 3, 8, 9, -1, False)
        only_valid = ops.roi_align_backward(grad[:1], rois[:1], 1.0, 2, 2, 2, 3, 8, 9, -1, False)
        torch.testing.assert_close(grad_input, only_valid)


@pytest.mark.parametrize(("given", "image"), [(1.7, 1.0), (-0.5, 0.0), (0.99, 0.0)])
def test_fractional_batch_index_truncates(device, given, image):
    """A fractional batch index is truncated toward zero, as in torchvision
    (1.7 selects image 1, -0.5 image 0)."""
    x = make_features(2, 3, 8, 9, device=device)
    rois = torch.tensor([[given, 1.0, 1.0, 5.0, 5.0]], device=device)
    expected = maskrcnn_ops.roi_align(x, torch.tensor([[image, 1.0, 1.0, 5.0, 5.0]], device=device), 2)
    torch.testing.assert_close(maskrcnn_ops.roi_align(x, rois, 2), expected, atol=0, rtol=0)
    theirs = torchvision.ops.roi_align(x, rois, 2)
    torch.testing.assert_close(maskrcnn_ops.roi_align(x, rois, 2), theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 8, 9), (1, 2, 3, 8, 9), (8, 9)])
def test_wrong_input_ndim(device, shape):
    """Features must be 4-D."""
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], device=device)
    with pytest.raises(RuntimeError, match=r"expected input of shape \[N, C, H, W\]"):
        maskrcnn_ops.roi_align(torch.randn(shape, device=device), rois, 2)


def test_wrong_rois_shape(device):
    """A Tensor must be [K, 5]: the wrapper raises ValueError with a hint about
    the list form, the raw op RuntimeError; list items must be [L, 4]."""
    x = make_features(2, 3, 8, 9, device=device)
    for rois in (torch.zeros(3, 4, device=device), torch.zeros(5, device=device), torch.zeros(2, 5, 1, device=device)):
        with pytest.raises(ValueError, match=r"\[K, 5\]"):
            maskrcnn_ops.roi_align(x, rois, 2)
        with pytest.raises(RuntimeError, match=r"expected rois of shape \[K, 5\]"):
            ops.roi_align(x, rois, 1.0, 2, 2, -1, False)
    with pytest.raises(ValueError, match=r"boxes\[1\] must have shape \[L, 4\]"):
        maskrcnn_ops.roi_align(x, [torch.zeros(1, 4, device=device), torch.zeros(1, 5, device=device)], 2)
    with pytest.raises(ValueError, match="empty list"):
        maskrcnn_ops.roi_align(x, [], 2)
    with pytest.raises(TypeError):
        maskrcnn_ops.roi_align(x, "boxes", 2)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_non_float_input_dtype(device, dtype):
    """Integer/bool features are rejected with the list of supported dtypes."""
    x = torch.ones(2, 3, 8, 9, device=device).to(dtype)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], device=device)
    with pytest.raises(RuntimeError, match="expected input of dtype float32, float64, float16 or bfloat16"):
        maskrcnn_ops.roi_align(x, rois, 2)


def test_integer_rois(device):
    """Integer boxes are rejected (torchvision would reject them too)."""
    x = make_features(2, 3, 8, 9, device=device)
    with pytest.raises(RuntimeError, match="floating-point rois"):
        maskrcnn_ops.roi_align(x, torch.tensor([[0, 1, 1, 5, 5]], device=device), 2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_input_and_boxes_on_different_devices():
    """Features and boxes must be on the same device (both directions of the op)."""
    x = make_features(2, 3, 8, 9, device="cuda")
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(RuntimeError, match="same device"):
        maskrcnn_ops.roi_align(x, rois, 2)
    with pytest.raises(RuntimeError, match="same device"):
        maskrcnn_ops.roi_align(x.cpu(), rois.cuda(), 2)
    with pytest.raises(RuntimeError, match="same device"):
        ops.roi_align_backward(torch.ones(1, 3, 2, 2, device="cuda"), rois, 1.0, 2, 2, 2, 3, 8, 9, -1, False)


@pytest.mark.parametrize("output_size", [0, (0, 3), (3, 0), (-1, 2), (2, -5)])
def test_non_positive_output_size(device, output_size):
    """The pooled size must be positive in both dimensions."""
    x = make_features(2, 3, 8, 9, device=device)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], device=device)
    with pytest.raises(RuntimeError, match="expected a positive output size"):
        maskrcnn_ops.roi_align(x, rois, output_size)


@pytest.mark.parametrize("spatial_scale", [0.0, -0.5, math.nan, math.inf])
def test_invalid_spatial_scale(device, spatial_scale):
    x = make_features(2, 3, 8, 9, device=device)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], device=device)
    with pytest.raises(RuntimeError, match="spatial_scale"):
        maskrcnn_ops.roi_align(x, rois, 2, spatial_scale)


def test_sampling_ratio_above_cap(device):
    """A fixed sampling ratio above the adaptive cap (1024) is rejected; the
    cap itself is allowed."""
    x = make_features(1, 1, 4, 4, device=device)
    rois = torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]], device=device)
    with pytest.raises(RuntimeError, match="sampling_ratio must be at most 1024"):
        maskrcnn_ops.roi_align(x, rois, 1, 1.0, 1025)
    torch.testing.assert_close(maskrcnn_ops.roi_align(x, rois, 1, 1.0, 1024),
                               reference.roi_align(x, rois, 1, 1.0, 1024), **TOLERANCES[torch.float32])


def test_bad_output_size_type():
    x = make_features(1, 1, 4, 4)
    with pytest.raises(TypeError, match="output_size"):
        maskrcnn_ops.roi_align(x, torch.tensor([[0, 0.0, 0.0, 2.0, 2.0]]), (1, 2, 3))


def test_zero_channels(device):
    """C = 0: output [K, 0, PH, PW]; backward gives [N, 0, H, W]."""
    x = torch.zeros(2, 0, 8, 9, device=device, requires_grad=True)
    rois = make_rois(2, 8, 9, device=device)
    out = maskrcnn_ops.roi_align(x, rois, (2, 3))
    assert out.shape == (rois.size(0), 0, 2, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("memory_format", MEMORY_FORMATS)
@pytest.mark.parametrize("hw", [(0, 9), (8, 0), (0, 0)])
def test_empty_feature_map(device, hw, memory_format):
    """H or W == 0: nothing to sample, all-zero output, empty gradient, no crash."""
    x = torch.zeros(2, 3, *hw, device=device).contiguous(memory_format=memory_format).requires_grad_(True)
    rois = torch.tensor([[0, 0.0, 0.0, 5.0, 5.0], [1, -2.0, -2.0, 3.0, 3.0]], device=device)
    for sampling_ratio in (-1, 2):
        out = maskrcnn_ops.roi_align(x, rois, 2, 1.0, sampling_ratio, True)
        assert out.shape == (2, 3, 2, 2) and not out.any()
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.shape == x.shape


def test_huge_box_adaptive_grid_is_capped(device):
    """A 1e6 x 1e6 pixel box with sampling_ratio=-1 would need 1e12 samples
    per bin; the grid is capped at 1024 per axis, so it finishes at once, with
    the reference result (which applies the same cap)."""
    x = make_features(1, 1, 16, 16, device=device) + 5.0
    # A 1,024,000 px box: 1024 samples per axis, 1000 px apart; with the
    # aligned -0.5 shift, sample 512 lands at 7.5 (inside the 16 x 16 map).
    start = 7.5 + 0.5 - 512.5 * 1000.0
    rois = torch.tensor([[0, start, start, start + 1024000.0, start + 1024000.0]], device=device)
    x.requires_grad_(True)
    start = time.perf_counter()
    out = maskrcnn_ops.roi_align(x, rois, 1, 1.0, -1, True)
    (grad,) = torch.autograd.grad(out.sum(), x)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    expected = reference.roi_align(x, rois, 1, 1.0, -1, True)
    assert expected.abs().sum() > 0  # the case is not trivially all zeros
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), x)[0], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------- non-contiguous input --


@pytest.mark.parametrize("view", ["sliced", "transposed"])
def test_non_contiguous_input(device, view):
    """An input that is neither NCHW- nor channels_last-contiguous (a strided
    slice, or H/W transposed) still gives the reference values and gradient,
    and is processed (and returned) as NCHW."""
    base = make_features(2, 6, 20, 22, device=device)
    if view == "sliced":
        x = base[:, 1:5, 2::2, 1:-3]
    else:
        x = base.transpose(2, 3)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=CHANNELS_LAST)
    x = x.detach().requires_grad_(True)
    h, w = x.shape[2:]
    rois = make_rois(2, h, w, spatial_scale=0.5, device=device)
    out = maskrcnn_ops.roi_align(x, rois, (3, 2), 0.5, -1, True)
    assert out.is_contiguous()
    torch.testing.assert_close(out, reference.roi_align(x, rois, (3, 2), 0.5, -1, True), **TOLERANCES[torch.float32])

    grad_output = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, grad_output)
    expected = reference_grad(x, rois, (3, 2), 0.5, -1, True, grad_output)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- fuzz --


@st.composite
def roi_align_cases(draw):
    """Small random problems. Box coordinates are multiples of 1/8 and scales
    powers of two, so geometry is exact dyadic arithmetic; this sidesteps a
    float32 rounding in the reference's adaptive grid for float64 (see
    test_reference_adaptive_grid_is_exact_ceil_in_float64)."""
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    spatial_scale = draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]))
    coord = st.integers(-40, 120).map(lambda v: v / 8)
    k = draw(st.integers(0, 5))
    rows = []
    for _ in range(k):
        batch = draw(st.integers(0, n - 1)) + draw(st.sampled_from([0.0, 0.25, 0.75]))
        x1, y1, x2, y2 = (draw(coord) / spatial_scale for _ in range(4))
        rows.append([batch, x1, y1, x2, y2])
    return dict(
        shape=(n, c, h, w),
        rois=torch.tensor(rows, dtype=torch.float64).reshape(k, 5),
        output_size=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        spatial_scale=spatial_scale,
        sampling_ratio=draw(st.integers(-2, 4)),
        aligned=draw(st.booleans()),
        channels_last=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=50, deadline=None)
@given(case=roi_align_cases())
def test_fuzz_against_reference(case):
    """Random shapes, boxes (inside, outside, degenerate, inverted) and
    parameters: float64 forward and input gradient equal the reference."""
    memory_format = CHANNELS_LAST if case["channels_last"] else NCHW
    x = make_features(*case["shape"], dtype=torch.float64, memory_format=memory_format, seed=case["seed"])
    x.requires_grad_(True)
    args = (case["output_size"], case["spatial_scale"], case["sampling_ratio"], case["aligned"])
    out = maskrcnn_ops.roi_align(x, case["rois"], *args)
    expected = reference.roi_align(x, case["rois"], *args)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float64])

    # A gradient in the output's own layout, as autograd usually delivers it.
    grad_output = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(case["seed"]))
    grad_output = grad_output.contiguous(memory_format=memory_format)
    (grad,) = torch.autograd.grad(out, x, grad_output)
    expected_grad = reference_grad(x, case["rois"], *args, grad_output)
    torch.testing.assert_close(grad, expected_grad, **TOLERANCES[torch.float64])
