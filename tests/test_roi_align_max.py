"""Tests of max-pooling RoIAlign (mmcv's pool_mode="max"): roi_align_max, the
roi_align_max ops, and the mmcv-style MmcvRoIAlign / mmcv_roi_align.

Oracle: maskrcnn_ops.reference.roi_align(..., pool_mode="max"), the same
bilinear samples reduced with torch.max (whose gradient goes to the first
maximum, the tie rule the kernels promise).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import maskrcnn_ops
from maskrcnn_ops import reference

ops = torch.ops.maskrcnn_ops
LAYOUTS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="channels_last")]


def make_problem(device, dtype=torch.float64, memory_format=torch.contiguous_format, seed=0, rois=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 24, 30, generator=g, dtype=torch.float64).to(dtype)
    x = x.to(device=device, memory_format=memory_format).requires_grad_()
    xy = torch.rand(rois, 2, generator=g, dtype=torch.float64) * torch.tensor([60.0, 48.0]) - 4
    wh = torch.rand(rois, 2, generator=g, dtype=torch.float64) * 40
    batch = torch.randint(0, 2, (rois, 1), generator=g).double()
    boxes = torch.cat([batch, xy, xy + wh], 1).to(device=device, dtype=dtype)
    return x, boxes


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 3])
def test_matches_reference_values_and_gradients(device, memory_format, aligned, sampling_ratio):
    x, rois = make_problem(device, memory_format=memory_format)
    actual = maskrcnn_ops.roi_align_max(x, rois, (4, 3), 0.5, sampling_ratio, aligned)
    expected = reference.roi_align(x, rois, (4, 3), 0.5, sampling_ratio, aligned, pool_mode="max")
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    assert actual.is_contiguous(memory_format=memory_format)
    grad = torch.randn_like(actual)
    (actual_grad,) = torch.autograd.grad(actual, x, grad)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_lower_precision(device, dtype):
    x, rois = make_problem(device, dtype=dtype)
    actual = maskrcnn_ops.roi_align_max(x, rois, 3, 0.5, 2, True)
    expected = reference.roi_align(x, rois, 3, 0.5, 2, True, pool_mode="max")
    assert actual.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def test_max_is_at_least_the_average(device):
    """Sanity of the mode itself: a bin's max is >= its mean, and equal for a
    single sample per bin."""
    x, rois = make_problem(device, dtype=torch.float32)
    top = maskrcnn_ops.roi_align_max(x, rois, 4, 0.5, 2, True)
    mean = maskrcnn_ops.roi_align(x, rois, 4, 0.5, 2, True)
    assert (top >= mean - 1e-6).all()
    torch.testing.assert_close(
        maskrcnn_ops.roi_align_max(x, rois, 4, 0.5, 1, True), maskrcnn_ops.roi_align(x, rois, 4, 0.5, 1, True)
    )


@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_gradcheck(device, memory_format):
    x, rois = make_problem(device, memory_format=memory_format, rois=6)
    x = x.detach()[:, :2, :12, :14].contiguous(memory_format=memory_format).requires_grad_()
    rois = rois.clone()
    rois[:, 1:] = rois[:, 1:].clamp(0, 26)
    assert gradcheck(lambda t: maskrcnn_ops.roi_align_max(t, rois, 2, 0.5, 2, True), (x,))


def test_ties_go_to_the_first_sample_deterministically(device):
    """On a constant map every sample ties: the argmax is sample 0 and the
    whole bin gradient goes to that sample's neighbours, every time."""
    x = torch.ones(1, 2, 10, 10, dtype=torch.float64, device=device, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 7.0, 8.0], [0, 2.5, 0.5, 9.0, 6.0]], dtype=torch.float64, device=device)
    out, argmax = ops.roi_align_max(x, rois, 0.5 * 2, 2, 2, 3, True)
    assert (argmax == 0).all()
    grad = torch.randn_like(out)
    (first,) = torch.autograd.grad(maskrcnn_ops.roi_align_max(x, rois, 2, 1.0, 3, True), x, grad)
    expected_out = reference.roi_align(x, rois, 2, 1.0, 3, True, pool_mode="max")
    (expected,) = torch.autograd.grad(expected_out, x, grad)
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-12)
    for _ in range(3):
        (again,) = torch.autograd.grad(maskrcnn_ops.roi_align_max(x, rois, 2, 1.0, 3, True), x, grad)
        assert torch.equal(again, first)


def test_nan_propagates(device):
    x = torch.zeros(1, 1, 8, 8, device=device)
    x[0, 0, 3, 3] = float("nan")
    rois = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0], [0, 5.0, 5.0, 8.0, 8.0]], device=device)
    out = maskrcnn_ops.roi_align_max(x, rois, 1, 1.0, 8, True)
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1]).any()


@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_outside_samples_are_zero_candidates_that_read_nothing(device, memory_format):
    """A sample beyond the border is a candidate of value 0 (mmcv) whatever
    the map holds at the placeholder element (0, 0): with NaN and -Inf there,
    far from boxes that stick out past the right border, the result equals
    the one on the map with those elements set to 0; a box of all-negative
    values partly outside gets 0 from an outside sample, and the gradient of
    such a bin goes nowhere."""
    finite = -1.0 - torch.rand(1, 2, 8, 10, dtype=torch.float64, device=device)
    x = finite.clone()
    x[0, 0, 0, 0], x[0, 1, 0, 0] = float("nan"), -float("inf")
    finite[:, :, 0, 0] = 0
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    rois = torch.tensor([[0, 6.0, 2.0, 18.0, 7.0]], dtype=torch.float64, device=device)
    out = maskrcnn_ops.roi_align_max(x, rois, 2, 1.0, 2, True)
    expected = reference.roi_align(finite, rois, 2, 1.0, 2, True, pool_mode="max")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out[..., 1] == 0).all() and (out[..., 0] < 0).all()  # bins 1 lie wholly outside
    (grad,) = torch.autograd.grad(out, x, torch.full_like(out, float("inf")))
    assert not grad[:, :, 0, 0].any() and torch.isinf(grad).sum() > 0


def test_empty_and_degenerate_rois(device):
    x = torch.randn(1, 3, 8, 8, device=device, requires_grad=True)
    out, argmax = ops.roi_align_max(x, torch.zeros(0, 5, device=device), 1.0, 2, 2, 2, True)
    assert out.shape == (0, 3, 2, 2) and argmax.dtype == torch.int32
    nan = float("nan")
    rois = torch.tensor([[0, nan, 0.0, 4.0, 4.0], [0, 0.0, 0.0, float("inf"), 4.0]], device=device)
    out, argmax = ops.roi_align_max(x, rois, 1.0, 2, 2, 2, True)
    assert torch.count_nonzero(out) == 0 and (argmax == -1).all()
    (g,) = torch.autograd.grad(maskrcnn_ops.roi_align_max(x, rois, 2, 1.0, 2, True).sum(), x)
    assert torch.count_nonzero(g) == 0


def test_corrupt_argmax_is_ignored_not_read_out_of_bounds(device):
    x, rois = make_problem(device, dtype=torch.float32)
    out, argmax = ops.roi_align_max(x, rois, 0.5, 3, 3, 2, True)
    bad = argmax.clone()
    bad[::2] = 1000
    bad[1::4] = -7
    grad = torch.ones_like(out)
    result = ops.roi_align_max_backward(grad, rois, bad, 0.5, 3, 3, 2, 5, 24, 30, 2, True)
    assert torch.isfinite(result).all()
    with pytest.raises(RuntimeError, match="expected argmax as returned by roi_align_max"):
        ops.roi_align_max_backward(grad, rois, argmax.long(), 0.5, 3, 3, 2, 5, 24, 30, 2, True)
    with pytest.raises(RuntimeError, match="expected argmax as returned by roi_align_max"):
        ops.roi_align_max_backward(grad, rois, argmax[:1], 0.5, 3, 3, 2, 5, 24, 30, 2, True)


def test_errors_name_the_op_called(device):
    """roi_align_max and its backward share their argument checks with the
    average mode: an error names the op the caller called, never the other
    one."""
    x, rois = make_problem(device, rois=4)
    x = x.detach()
    bad_rois, flat_input = rois[:, :4], x[0]
    out, argmax = ops.roi_align_max(x, rois, 0.5, 2, 3, 2, True)
    grad = torch.ones_like(out)
    # The forward: rois, input, batch index.
    with pytest.raises(RuntimeError, match=r"maskrcnn_ops::roi_align_max: expected rois of shape \[K, 5\]"):
        ops.roi_align_max(x, bad_rois, 0.5, 2, 3, 2, True)
    with pytest.raises(RuntimeError, match=r"maskrcnn_ops::roi_align_max: expected input of shape"):
        ops.roi_align_max(flat_input, rois, 0.5, 2, 3, 2, True)
    outside = rois.clone()
    outside[1, 0] = 5.0
    with pytest.raises(RuntimeError, match=r"maskrcnn_ops::roi_align_max: rois\[.*batch index"):
        ops.roi_align_max(x, outside, 0.5, 2, 3, 2, True)
    # The backward: grad's shape (the check shared with every backward), the
    # common arguments, argmax.
    with pytest.raises(RuntimeError, match=r"maskrcnn_ops::roi_align_max_backward: expected grad of shape \[4, 5, 2, 3\]"):
        ops.roi_align_max_backward(grad[:, :2], rois, argmax[:, :2], 0.5, 2, 3, 2, 5, 24, 30, 2, True)
    with pytest.raises(RuntimeError, match=r"maskrcnn_ops::roi_align_max_backward: sampling_ratio must be at most"):
        ops.roi_align_max_backward(grad, rois, argmax, 0.5, 2, 3, 2, 5, 24, 30, 2000, True)
    with pytest.raises(RuntimeError, match=r"maskrcnn_ops::roi_align_max_backward: expected argmax"):
        ops.roi_align_max_backward(grad, rois, argmax.long(), 0.5, 2, 3, 2, 5, 24, 30, 2, True)
    # The average mode keeps its own names.
    with pytest.raises(RuntimeError, match=r"maskrcnn_ops::roi_align: expected rois of shape"):
        ops.roi_align(x, bad_rois, 0.5, 2, 3, 2, True)
    with pytest.raises(RuntimeError, match=r"maskrcnn_ops::roi_align_backward: expected grad of shape \[4, 5, 2, 3\]"):
        ops.roi_align_backward(grad[:, :2], rois, 0.5, 2, 3, 2, 5, 24, 30, 2, True)


def test_double_backward_raises_clearly(device):
    x, rois = make_problem(device, rois=4)
    out = maskrcnn_ops.roi_align_max(x, rois, 2, 0.5, 2, True)
    grad_out = torch.randn_like(out, requires_grad=True)
    (g,) = torch.autograd.grad(out, x, grad_out, create_graph=True)
    with pytest.raises(RuntimeError, match="roi_align_max_backward is not differentiable"):
        g.sum().backward()


def test_opcheck(device):
    x, rois = make_problem(device, dtype=torch.float32, rois=8)
    torch.library.opcheck(ops.roi_align_max, (x, rois, 0.5, 3, 2, 2, True))
    out, argmax = ops.roi_align_max(x, rois, 0.5, 3, 2, 2, True)
    torch.library.opcheck(
        ops.roi_align_max_backward, (torch.randn_like(out), rois, argmax, 0.5, 3, 2, 2, 5, 24, 30, 2, True)
    )


def test_compile_fullgraph(device, fresh_dynamo):
    x, rois = make_problem(device, dtype=torch.float32)

    def fn(t):
        return maskrcnn_ops.roi_align_max(t, rois, 3, 0.5, 2, True).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), fn(x))
    torch.testing.assert_close(torch.autograd.grad(compiled(x), x)[0], torch.autograd.grad(fn(x), x)[0])


@settings(max_examples=40, deadline=None)
@given(
    rois=st.integers(0, 8),
    pooled=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    sampling_ratio=st.integers(-1, 3),
    aligned=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_against_reference(rois, pooled, sampling_ratio, aligned, seed):
    x, boxes = make_problem("cpu", seed=seed, rois=rois)
    actual = maskrcnn_ops.roi_align_max(x, boxes, pooled, 0.5, sampling_ratio, aligned)
    expected = reference.roi_align(x, boxes, pooled, 0.5, sampling_ratio, aligned, pool_mode="max")
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------- mmcv interface --


def test_mmcv_module_argument_order_and_defaults(device):
    x, rois = make_problem(device, dtype=torch.float32)
    module = maskrcnn_ops.MmcvRoIAlign(3, 0.5, 2, "max", False)
    assert (module.output_size, module.spatial_scale, module.sampling_ratio, module.pool_mode, module.aligned) == (
        (3, 3), 0.5, 2, "max", False,
    )
    torch.testing.assert_close(module(x, rois), maskrcnn_ops.roi_align_max(x, rois, 3, 0.5, 2, False))
    default = maskrcnn_ops.MmcvRoIAlign(7)
    assert (default.spatial_scale, default.sampling_ratio, default.pool_mode, default.aligned) == (1.0, 0, "avg", True)
    avg = maskrcnn_ops.MmcvRoIAlign((7, 5), 0.5)
    torch.testing.assert_close(avg(x, rois), maskrcnn_ops.roi_align(x, rois, (7, 5), 0.5, 0, True))
    torch.testing.assert_close(
        maskrcnn_ops.mmcv_roi_align(x, rois, 2, 0.5, 2, "max", True), maskrcnn_ops.roi_align_max(x, rois, 2, 0.5, 2, True)
    )
    assert "pool_mode='max'" in repr(module)


def test_mmcv_bad_pool_mode():
    with pytest.raises(ValueError, match="pool_mode must be one of"):
        maskrcnn_ops.MmcvRoIAlign(7, 1.0, 0, "sum")
    with pytest.raises(ValueError, match="pool_mode must be one of"):
        maskrcnn_ops.mmcv_roi_align(torch.randn(1, 1, 4, 4), torch.zeros(0, 5), 2, pool_mode="mean")
