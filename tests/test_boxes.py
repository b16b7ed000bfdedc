"""Tests of maskrcnn_ops.decode_boxes / encode_boxes / clip_boxes_to_image /
remove_small_boxes and the raw box-coding dispatcher ops.

Oracles:
  * torchvision's BoxCoder(weights, clip).decode_single / encode_single and
    torchvision.ops.boxes.clip_boxes_to_image / remove_small_boxes: the
    interface and numerics we promise to match (values and, for decode, the
    gradient with respect to the deltas);
  * maskrcnn_ops.reference.decode_boxes / encode_boxes: the same arithmetic in
    pure PyTorch in the kernels' accumulation precision (float32 for the half
    types, which torchvision would compute in half), so half inputs can be
    checked against one final rounding.

Kernel and oracles differ only in exp/log rounding (std:: vs ATen's vectorized
functions, at most an ulp or so), hence the small tolerances below. Every
numeric test takes the ``device`` fixture (tests/conftest.py), so it runs on
CPU and on CUDA, the latter skipped without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch.autograd import gradcheck
from torchvision.models.detection._utils import BoxCoder

import maskrcnn_ops
from maskrcnn_ops import reference

ops = torch.ops.maskrcnn_ops

DEFAULT_CLIP = math.log(1000.0 / 16)
FULL_DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
HALF_DTYPES = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
ALL_DTYPES = FULL_DTYPES + HALF_DTYPES

# Coordinates go up to ~1e3, so float32 needs an absolute tolerance (an ulp of
# exp() moves a corner by ~6e-5 there, and x1 = cx - w/2 may cancel to ~0).
TOLERANCES = {
    torch.float64: dict(atol=1e-9, rtol=1e-12),
    torch.float32: dict(atol=1e-4, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),  # one half ulp at 512 is 1e-3 relative
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
}

WEIGHTS = [
    pytest.param((1.0, 1.0, 1.0, 1.0), id="w1111"),  # the RPN's
    pytest.param((10.0, 10.0, 5.0, 5.0), id="w101055"),  # the box head's
    pytest.param((0.5, 2.0, 3.0, 0.25), id="wmixed"),
]


def cuda_only(test):
    """Marks a CUDA-only test (no ``device`` parameter): skipped without a GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


# ------------------------------------------------------------------ helpers --


def make_boxes(k, *, scale=200.0, min_side=1.0, seed=0, dtype=torch.float32, device="cpu"):
    """Reproducible boxes [K, 4] (drawn in float64, then cast): corners in
    [-0.1 * scale, scale), sides in [min_side, min_side + 0.5 * scale)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 1.1 * scale - 0.1 * scale
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * 0.5 * scale + min_side
    return torch.cat([xy, xy + wh], 1).to(dtype=dtype, device=device)


def make_deltas(k, classes=1, *, std=0.5, seed=0, dtype=torch.float32, device="cpu"):
    """Reproducible N(0, std) deltas [K, 4 * classes] (drawn in float64)."""
    g = torch.Generator().manual_seed(seed + 100)
    return (torch.randn(k, 4 * classes, generator=g, dtype=torch.float64) * std).to(dtype=dtype, device=device)


def scaled_by(weights, classes, device):
    """The weights as a [4 * classes] row, to scale N(0, s) deltas to N(0, s * w)."""
    return torch.tensor(weights, device=device).abs().repeat(classes)


def torchvision_decode(deltas, boxes, weights=(1.0, 1.0, 1.0, 1.0), clip=DEFAULT_CLIP):
    return BoxCoder(weights, clip).decode_single(deltas, boxes)


def torchvision_encode(reference_boxes, proposals, weights=(1.0, 1.0, 1.0, 1.0)):
    return BoxCoder(weights).encode_single(reference_boxes, proposals)


def grad_of(fn, deltas, grad_output):
    """d<fn(deltas), grad_output>/d deltas through autograd."""
    d = deltas.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(d), d, grad_output)
    return grad


# ------------------------------------------------------------------ decode --


@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_decode_matches_torchvision(device, dtype, weights, classes):
    """decode_boxes == BoxCoder(weights).decode_single for float32/float64,
    one and several classes per row (boxes shared by a row's classes), with
    deltas of std 2 so that some dw / dh exceed the default clip; the output
    has the deltas' dtype, shape and device, and the reference agrees too."""
    # Deltas scaled by the weights, so that every weighting sees the same
    # spread of dx / wx, ..., dh / wh.
    deltas = make_deltas(64, classes, std=2.0, dtype=dtype, device=device) * scaled_by(weights, classes, device)
    boxes = make_boxes(64, dtype=dtype, device=device)
    assert (deltas[:, 2::4] / weights[2] > DEFAULT_CLIP).any()  # the clip is exercised
    out = maskrcnn_ops.decode_boxes(deltas, boxes, weights)
    assert out.shape == deltas.shape and out.dtype == dtype and out.device == deltas.device
    torch.testing.assert_close(out, torchvision_decode(deltas, boxes, weights), **TOLERANCES[dtype])
    torch.testing.assert_close(out, reference.decode_boxes(deltas, boxes, weights), **TOLERANCES[dtype])


@pytest.mark.parametrize("clip", [0.0, 1.0, -2.0, 10.0, math.inf])
def test_decode_other_clips(device, clip):
    """Any clip value (zero, negative, infinite: exp may then overflow, as in
    torchvision) gives torchvision's boxes."""
    deltas = make_deltas(50, 2, std=3.0, seed=1, device=device)
    boxes = make_boxes(50, seed=1, device=device)
    out = maskrcnn_ops.decode_boxes(deltas, boxes, (1.0, 2.0, 1.0, 0.5), clip)
    torch.testing.assert_close(out, torchvision_decode(deltas, boxes, (1.0, 2.0, 1.0, 0.5), clip),
                               **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_decode_half_types(device, dtype):
    """float16 / bfloat16 deltas are decoded in float32 and rounded once: the
    reference on the same half input (float32 arithmetic), and torchvision run
    in float32 on the same values, then cast, agree within one half ulp."""
    deltas = make_deltas(80, 2, dtype=dtype, device=device, seed=2)
    boxes = make_boxes(80, dtype=torch.float32, device=device, seed=2)
    out = maskrcnn_ops.decode_boxes(deltas, boxes, (10.0, 10.0, 5.0, 5.0))
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.decode_boxes(deltas, boxes, (10.0, 10.0, 5.0, 5.0)), **TOLERANCES[dtype])
    expected = torchvision_decode(deltas.float(), boxes, (10.0, 10.0, 5.0, 5.0)).to(dtype)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("boxes_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=["f16", "bf16", "f64"])
def test_decode_boxes_dtype_is_independent_of_deltas(device, boxes_dtype):
    """Boxes of another floating dtype are read in the deltas' accumulation
    precision: exactly the result of the same (rounded) boxes as float32."""
    deltas = make_deltas(30, 2, device=device, seed=3)
    boxes = make_boxes(30, device=device, seed=3).to(boxes_dtype)
    out = maskrcnn_ops.decode_boxes(deltas, boxes)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, maskrcnn_ops.decode_boxes(deltas, boxes.float()), atol=0, rtol=0)


def test_decode_non_contiguous_inputs(device):
    """Strided deltas (a column slice) and boxes (a transposed buffer) give the
    result of their contiguous copies, as a contiguous tensor."""
    wide = make_deltas(40, 3, device=device, seed=4)
    deltas = wide[:, 4:12]
    boxes = make_boxes(40, device=device, seed=4).t().contiguous().t()
    assert not deltas.is_contiguous() and not boxes.is_contiguous()
    out = maskrcnn_ops.decode_boxes(deltas, boxes)
    assert out.is_contiguous()
    torch.testing.assert_close(out, maskrcnn_ops.decode_boxes(deltas.contiguous(), boxes.contiguous()), atol=0, rtol=0)


def test_decode_empty(device):
    """K = 0 rows, and C = 0 classes ([K, 0] deltas, as torchvision accepts)."""
    out = maskrcnn_ops.decode_boxes(torch.zeros(0, 8, device=device), torch.zeros(0, 4, device=device))
    assert out.shape == (0, 8)
    boxes = make_boxes(3, device=device)
    out = maskrcnn_ops.decode_boxes(torch.zeros(3, 0, device=device), boxes)
    assert out.shape == (3, 0)
    assert torchvision_decode(torch.zeros(3, 0, device=device), boxes).shape == (3, 0)


def test_reference_decode_no_rows():
    """The reference decodes zero boxes too, as the op does."""
    deltas, boxes = torch.zeros(0, 8), torch.zeros(0, 4)
    assert reference.decode_boxes(deltas, boxes).shape == maskrcnn_ops.decode_boxes(deltas, boxes).shape == (0, 8)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_decode_huge_deltas_are_clamped(device, dtype):
    """dw / dh far above the clip (100, 1e4, 1e30, the dtype's max, +inf)
    decode to the finite box of dw = clip, never inf (exp overflow guarded), exactly
    as torchvision (float32/float64) or the reference (half types)."""
    boxes = make_boxes(1, device=device).expand(5, 4).to(dtype)
    big = torch.finfo(dtype).max
    rows = [[0.0, 0.0, 100.0, 100.0], [0.1, -0.2, 1e4, 20.0], [0.0, 0.0, big, big],
            [0.3, 0.4, math.inf, math.inf], [0.0, 0.0, 50.0, 1e30 if dtype != torch.float16 else 6e4]]
    deltas = torch.tensor(rows, dtype=torch.float64).to(dtype=dtype, device=device)
    out = maskrcnn_ops.decode_boxes(deltas, boxes)
    assert torch.isfinite(out).all()
    # Rows 0 and 2 are both clamped to dw = dh = clip (and dx = dy = 0).
    torch.testing.assert_close(out[2], out[0], atol=0, rtol=0)
    oracle = torchvision_decode if dtype in (torch.float32, torch.float64) else reference.decode_boxes
    torch.testing.assert_close(out, oracle(deltas, boxes), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_decode_non_finite_deltas(device, dtype):
    """NaN deltas give NaN coordinates (only those they affect: NaN dx or dw
    makes x1 and x2 NaN), an infinite dx infinite ones, and -inf dw a
    zero-width box, exactly as torchvision (NaN where it has NaN)."""
    nan, inf = math.nan, math.inf
    deltas = torch.tensor(
        [[nan, 0, 0, 0], [0, nan, 0, 0], [0, 0, nan, 0], [0, 0, 0, nan], [inf, 0, 0, 0],
         [-inf, 0, 0, 0], [0, 0, -inf, 0], [0, 0, 0, -inf], [0.2, 0.1, -0.3, 0.5]],
        dtype=dtype, device=device,
    )
    boxes = make_boxes(1, device=device, dtype=dtype).expand(len(deltas), 4)
    out = maskrcnn_ops.decode_boxes(deltas, boxes)
    expected = torchvision_decode(deltas, boxes)
    torch.testing.assert_close(out, expected, equal_nan=True, **TOLERANCES[dtype])
    assert torch.isnan(out[:4]).sum() == 8 and torch.isfinite(out[4:]).sum() == 5 * 4 - 4
    assert out[6, 0] == out[6, 2] and out[7, 1] == out[7, 3]


# ---------------------------------------------------------------- gradient --


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("dtype", FULL_DTYPES)
def test_decode_gradient_matches_torchvision(device, dtype, weights):
    """The deltas gradient equals autograd through torchvision's decode_single
    (float32/float64, random output gradient), with some dw / dh above the
    clip (gradient zero there, as torch.clamp gives)."""
    deltas = make_deltas(40, 2, std=2.5, dtype=dtype, device=device, seed=5) * scaled_by(weights, 2, device)
    boxes = make_boxes(40, dtype=dtype, device=device, seed=5)
    grad_output = make_deltas(40, 2, std=1.0, dtype=dtype, device=device, seed=6)
    ours = grad_of(lambda d: maskrcnn_ops.decode_boxes(d, boxes, weights), deltas, grad_output)
    theirs = grad_of(lambda d: torchvision_decode(d, boxes, weights), deltas, grad_output)
    assert ours.dtype == dtype
    clipped = deltas[:, 2::4] / weights[2] > DEFAULT_CLIP
    assert clipped.any() and (ours[:, 2::4][clipped] == 0).all()
    tol = dict(atol=1e-3, rtol=1e-5) if dtype == torch.float32 else TOLERANCES[dtype]
    torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_gradcheck(device, weights):
    """Finite differences agree with the analytical gradient (float64), with
    dw / dh below the clip and beyond it (there the function is flat in dw /
    dh, so both gradients are zero; the deltas keep 0.2 from the kink)."""
    deltas = make_deltas(6, 2, std=0.5, dtype=torch.float64, device=device, seed=7)
    deltas[:2, 2] = DEFAULT_CLIP * weights[2] + 0.2 * abs(weights[2]) * torch.tensor([1.0, 5.0])
    deltas[2:4, 7] = DEFAULT_CLIP * weights[3] + 0.2 * abs(weights[3])
    boxes = make_boxes(6, dtype=torch.float64, device=device, seed=7)
    deltas.requires_grad_(True)
    assert gradcheck(lambda d: maskrcnn_ops.decode_boxes(d, boxes, weights), (deltas,), eps=1e-6, atol=1e-5)
    (grad,) = torch.autograd.grad(maskrcnn_ops.decode_boxes(deltas, boxes, weights).sum(), deltas)
    assert (grad[:2, 2] == 0).all() and (grad[2:4, 7] == 0).all()


def test_decode_gradient_exactly_at_the_clip(device):
    """At dw / ww == clip exactly our backward passes no gradient, as
    torch.clamp(max=clip) in torchvision's decode_single does with the torch
    we pin (2.14). Older torch (2.11) passes it at the boundary, so there
    torchvision is the oracle only for the entries off the clip."""
    c = DEFAULT_CLIP
    deltas = torch.tensor([[0.1, 0.2, c, c], [0.3, -0.2, c - 0.5, c + 0.5]], device=device)
    boxes = torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 15.0, 25.0]], device=device)
    grad_output = torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.5, 1.5, -1.0, 2.0]], device=device)
    ours = grad_of(lambda d: maskrcnn_ops.decode_boxes(d, boxes), deltas, grad_output)
    theirs = grad_of(lambda d: torchvision_decode(d, boxes, (1.0, 1.0, 1.0, 1.0)), deltas, grad_output)
    assert ours[0, 2] == 0 and ours[0, 3] == 0 and ours[1, 3] == 0 and ours[1, 2] != 0
    off_the_clip = deltas != c
    torch.testing.assert_close(ours[off_the_clip], theirs[off_the_clip], atol=1e-3, rtol=1e-5)
    clamp_blocks_the_boundary = torch.func.grad(lambda x: x.clamp(max=1.0))(torch.tensor(1.0)) == 0
    if clamp_blocks_the_boundary:
        torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-5)


def _opcheck_samples(device):
    deltas = make_deltas(5, 2, dtype=torch.float64, device=device, seed=40)
    boxes = make_boxes(5, dtype=torch.float64, device=device, seed=40)
    gt = make_boxes(5, dtype=torch.float64, device=device, seed=41)
    weights, clip = [10.0, 10.0, 5.0, 5.0], DEFAULT_CLIP
    return {
        "decode": (ops.decode_boxes, (deltas, boxes, weights, clip)),
        "decode-requires-grad": (ops.decode_boxes, (deltas.clone().requires_grad_(True), boxes, weights, clip)),
        "decode-f32": (ops.decode_boxes, (deltas.float(), boxes.float(), weights, clip)),
        "decode-backward": (ops.decode_boxes_backward, (torch.ones_like(deltas), deltas, boxes, weights, clip)),
        "encode": (ops.encode_boxes, (gt, boxes[:, :4], weights)),
    }


@pytest.mark.parametrize("sample", ["decode", "decode-requires-grad", "decode-f32", "decode-backward", "encode"])
def test_opcheck(device, sample):
    """torch.library.opcheck: schema, autograd registration, fake kernel and
    AOT-dispatch consistency (the last also runs decode's backward)."""
    op, args = _opcheck_samples(device)[sample]
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_not_differentiable_ops_with_grad_inputs(device):
    """decode_boxes_backward and encode_boxes with inputs that require grad:
    the autograd registration is sound (the forward works); the AOT-dispatch
    sub-test is left out, since it runs a backward, which raises by design
    (test_decode_double_backward_raises, test_encode_is_not_differentiable)."""
    deltas = make_deltas(8, device=device, seed=32)
    boxes = make_boxes(8, device=device, seed=32)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    samples = [
        (ops.decode_boxes_backward.default,
         (deltas.clone().requires_grad_(), deltas.clone().requires_grad_(), boxes, [1.0] * 4, 1.0)),
        (ops.encode_boxes.default, ((boxes + 2.0).requires_grad_(), boxes, [1.0] * 4)),
    ]
    for op, args in samples:
        result = torch.library.opcheck(op, args, test_utils=utils)
        assert set(result) == set(utils) and all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------- BoxCoder, clipping, min size --


def test_box_coder_is_the_functions_with_its_settings(device):
    """BoxCoder(weights, clip) encodes and decodes as the functions (and so as
    torchvision's BoxCoder) with those settings; bad weights fail when it is
    built, not when it is first used."""
    coder = maskrcnn_ops.BoxCoder([10, 10, 5, 5], clip=2.0)
    assert coder.weights == (10.0, 10.0, 5.0, 5.0) and coder.clip == 2.0
    assert maskrcnn_ops.BoxCoder() == maskrcnn_ops.BoxCoder((1.0, 1.0, 1.0, 1.0), DEFAULT_CLIP)
    boxes, gt = make_boxes(30, device=device, seed=60), make_boxes(30, device=device, seed=61)
    deltas = make_deltas(30, 2, std=3.0, device=device, seed=60)
    torch.testing.assert_close(coder.decode(deltas, boxes), torchvision_decode(deltas, boxes, coder.weights, 2.0),
                               **TOLERANCES[torch.float32])
    assert torch.equal(coder.encode(gt, boxes), maskrcnn_ops.encode_boxes(gt, boxes, (10.0, 10.0, 5.0, 5.0)))
    with pytest.raises(ValueError, match="weights must be 4 numbers"):
        maskrcnn_ops.BoxCoder((1.0, 1.0))


@pytest.mark.parametrize("dtype", FULL_DTYPES + [pytest.param(torch.float16, id="f16")])
def test_clip_boxes_to_image_matches_torchvision(device, dtype):
    """One image size, or one (height, width) per box (a tensor that
    broadcasts, as detection post-processing clips K x C boxes of K
    proposals from different images): torchvision's values, NaN kept."""
    boxes = (make_boxes(40, scale=300.0, device=device, seed=62) - 40).to(dtype)
    boxes[3, 1] = math.nan
    expected = torchvision.ops.clip_boxes_to_image(boxes, (150, 120))
    torch.testing.assert_close(maskrcnn_ops.clip_boxes_to_image(boxes, (150, 120)), expected, rtol=0, atol=0,
                               equal_nan=True)
    sizes = torch.tensor([[150, 120], [90, 200]], device=device)[torch.arange(40, device=device) % 2]
    per_box = maskrcnn_ops.clip_boxes_to_image(boxes.view(40, 1, 4).expand(40, 3, 4), sizes[:, None].float())
    for row in range(40):
        expected = torchvision.ops.clip_boxes_to_image(boxes[row], tuple(sizes[row].tolist()))
        torch.testing.assert_close(per_box[row], expected.expand(3, 4), rtol=0, atol=0, equal_nan=True)


def test_small_boxes_match_torchvision(device):
    """boxes_large_enough is remove_small_boxes as a mask (NaN and inverted
    boxes are not large enough), on any leading shape."""
    boxes = make_boxes(60, scale=20.0, min_side=0.0, device=device, seed=63)
    boxes[0, 0] = math.nan
    boxes[1, [0, 2]] = boxes[1, [2, 0]]
    kept = torchvision.ops.remove_small_boxes(boxes, 3.0)
    assert torch.equal(maskrcnn_ops.remove_small_boxes(boxes, 3.0), kept)
    mask = maskrcnn_ops.boxes_large_enough(boxes.view(6, 10, 4), 3.0)
    assert mask.shape == (6, 10) and torch.equal(torch.where(mask.flatten())[0], kept)
    assert not mask[0, 0] and not mask[0, 1]


# ------------------------------------------------------------ torch.compile --


def test_compile_box_coder_and_clipping(device, fresh_dynamo):
    """A BoxCoder held by a module, clipping to per-box sizes and the size
    mask trace with fullgraph=True, equal to eager."""

    class Decode(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.box_coder = maskrcnn_ops.BoxCoder((10.0, 10.0, 5.0, 5.0))

        def forward(self, deltas, boxes, sizes):
            decoded = maskrcnn_ops.clip_boxes_to_image(self.box_coder.decode(deltas, boxes).view(-1, 2, 4), sizes)
            return decoded, maskrcnn_ops.boxes_large_enough(decoded, 1.0)

    module = Decode()
    boxes, deltas = make_boxes(20, device=device, seed=64), make_deltas(20, 2, std=3.0, device=device, seed=64)
    sizes = torch.tensor([[100.0, 80.0]], device=device).expand(20, 2)[:, None]
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for a, e in zip(compiled(deltas, boxes, sizes), module(deltas, boxes, sizes)):
        torch.testing.assert_close(a, e, atol=0, rtol=0)


def test_encode_keeps_the_precision_of_float32_proposals(device):
    """Half ground truth with float32 proposals: the proposals are read in
    float32 (not rounded to half first), so the targets equal torchvision's
    float32 targets up to the final rounding to half."""
    gt = make_boxes(30, scale=1000.0, device=device, seed=50)
    proposals = make_boxes(30, scale=1000.0, device=device, seed=51)
    ours = maskrcnn_ops.encode_boxes(gt.half(), proposals)
    expected = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(gt.half().float(), proposals)
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours.float(), expected, **TOLERANCES[torch.float16])


def test_compile_decode_forward_and_backward(device, fresh_dynamo):
    """torch.compile(fullgraph=True, backend="aot_eager") of a function using
    decode_boxes and encode_boxes: no graph break; forward and deltas
    gradient equal eager (bitwise: the same kernels run)."""

    def fn(deltas, boxes, gt):
        decoded = maskrcnn_ops.decode_boxes(deltas, boxes, (10.0, 10.0, 5.0, 5.0))
        targets = maskrcnn_ops.encode_boxes(gt, boxes, (10.0, 10.0, 5.0, 5.0))
        return (decoded * 2.0).relu(), targets

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    boxes, gt = make_boxes(20, device=device, seed=33), make_boxes(20, device=device, seed=34)
    deltas = make_deltas(20, 2, std=3.0, device=device, seed=33)
    d_eager, d_compiled = deltas.clone().requires_grad_(True), deltas.clone().requires_grad_(True)
    expected, actual = fn(d_eager, boxes, gt), compiled(d_compiled, boxes, gt)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    grad_output = make_deltas(20, 2, device=device, seed=35)
    expected[0].backward(grad_output)
    actual[0].backward(grad_output)
    torch.testing.assert_close(d_compiled.grad, d_eager.grad, atol=0, rtol=0)
    assert d_eager.grad.abs().sum() > 0


# ---------------------------------------------------------------- bad input --

_W = [1.0, 1.0, 1.0, 1.0]


def _bad_box_coding_calls(device):
    """(name, call, error type, message) for every kind of bad argument."""
    deltas, boxes = make_deltas(3, device=device), make_boxes(3, device=device)
    empty = torch.zeros(0, 4, device=device)
    return [
        ("deltas-not-4C", lambda: maskrcnn_ops.decode_boxes(torch.zeros(3, 5, device=device), boxes),
         RuntimeError, r"decode_boxes: expected deltas of shape \[K, 4 \* C\], got \[3, 5\]"),
        ("deltas-1d", lambda: maskrcnn_ops.decode_boxes(deltas.flatten(), boxes),
         RuntimeError, r"decode_boxes: expected deltas of shape \[K, 4 \* C\]"),
        ("boxes-rows", lambda: maskrcnn_ops.decode_boxes(deltas, boxes[:2]),
         RuntimeError, r"decode_boxes: expected boxes of shape \[3, 4\], got \[2, 4\]"),
        ("integer-deltas", lambda: maskrcnn_ops.decode_boxes(deltas.long(), boxes),
         RuntimeError, "decode_boxes: expected deltas of dtype float32, float64, float16 or bfloat16, got Long"),
        ("integer-boxes", lambda: maskrcnn_ops.decode_boxes(deltas, boxes.int()),
         RuntimeError, "decode_boxes: expected floating-point boxes, got Int"),
        ("three-weights", lambda: maskrcnn_ops.decode_boxes(deltas, boxes, (1.0, 1.0, 1.0)),
         ValueError, r"weights must be 4 numbers \(wx, wy, ww, wh\)"),
        ("zero-weight", lambda: maskrcnn_ops.decode_boxes(deltas, boxes, (0.0, 1.0, 1.0, 1.0)),
         RuntimeError, "decode_boxes: weights must be finite and non-zero"),
        # Checked before the early exit of an empty input, on every backend.
        ("nan-weight-empty", lambda: ops.decode_boxes(empty, empty, [math.nan, 1.0, 1.0, 1.0], 1.0),
         RuntimeError, "decode_boxes: weights must be finite and non-zero"),
        ("backward-grad-shape", lambda: ops.decode_boxes_backward(make_deltas(3, 2, device=device), deltas, boxes, _W, 1.0),
         RuntimeError, r"decode_boxes_backward: expected grad of shape \[3, 4\], got \[3, 8\]"),
        ("backward-integer-grad", lambda: ops.decode_boxes_backward(deltas.long(), deltas, boxes, _W, 1.0),
         RuntimeError, "decode_boxes_backward: expected a floating-point grad, got Long"),
        ("backward-inf-weight-empty", lambda: ops.decode_boxes_backward(empty, empty, empty, [1.0, math.inf, 1.0, 1.0], 1.0),
         RuntimeError, "decode_boxes_backward: weights must be finite and non-zero"),
        ("encode-rows", lambda: maskrcnn_ops.encode_boxes(boxes, boxes[:2]),
         RuntimeError, r"encode_boxes: expected proposals of shape \[3, 4\], got \[2, 4\]"),
        ("encode-integer", lambda: maskrcnn_ops.encode_boxes(boxes.long(), boxes),
         RuntimeError, "encode_boxes: expected reference_boxes of dtype float32, float64, float16 or bfloat16"),
        ("encode-zero-weight-empty", lambda: ops.encode_boxes(empty, empty, [1.0, 1.0, 0.0, 1.0]),
         RuntimeError, "encode_boxes: weights must be finite and non-zero"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _bad_box_coding_calls("cpu")])
def test_bad_input_raises_clearly(device, case):
    """Each malformed argument is a one-line error naming the op and what was
    expected, on both backends; an empty input does not skip the checks."""
    _, call, error, message = next(c for c in _bad_box_coding_calls(device) if c[0] == case)
    with pytest.raises(error, match=message):
        call()


def test_decode_double_backward_raises(device):
    """decode_boxes is differentiable once (training never needs more); a
    second derivative is a clear error, not a silent zero."""
    deltas = make_deltas(5, device=device, seed=40).requires_grad_(True)
    decoded = maskrcnn_ops.decode_boxes(deltas, make_boxes(5, device=device, seed=40))
    (grad,) = torch.autograd.grad(decoded.sum(), deltas, create_graph=True)
    with pytest.raises(RuntimeError, match="decode_boxes_backward is not differentiable"):
        grad.sum().backward()


def test_encode_is_not_differentiable(device):
    """Regression targets carry no gradient in Mask R-CNN; asking for one is a
    clear error."""
    gt = make_boxes(4, device=device, seed=41).requires_grad_(True)
    targets = maskrcnn_ops.encode_boxes(gt, make_boxes(4, device=device, seed=42))
    with pytest.raises(RuntimeError, match="encode_boxes is not differentiable"):
        targets.sum().backward()


@cuda_only
def test_decode_backward_grad_on_another_device():
    """The raw backward op with a CPU grad and CUDA deltas: the dispatcher
    picks the CUDA kernel, which must refuse the host pointer."""
    deltas, boxes = make_deltas(3, device="cuda"), make_boxes(3, device="cuda")
    with pytest.raises(RuntimeError, match="decode_boxes_backward: grad and deltas must be on the same device"):
        ops.decode_boxes_backward(deltas.cpu(), deltas, boxes, _W, 1.0)
