"""The CUDA kernels (RoIAlign, NMS, box coding, mask pasting, keypoint
decoding), run on the CPU by an emulator, against the CPU kernels.

No GPU is needed: csrc/cuda/roi_align_kernels.cuh (the kernels, the
device-side structures and the launch sequences of roi_align.cu, free of
ATen) is compiled as host C++ with tests/cuda_emulation/cuda_shim.h, which
defines threadIdx, blockIdx, atomicAdd and the other CUDA built-ins those
kernels use, and whose launcher runs every thread of a launch in turn. So
these tests check the CUDA kernels' own code and the host sequence that
launches them on the GPU (grids, work counts, the maps built from the
arguments, the deterministic path's scratch and passes): the work
decomposition of both layouts (one thread per channel for channels_last,
channel groups of four for NCHW), the pyramid and the level of each RoI, the
max mode's argmax, the outside-sample rule, both gradient sinks, the
fixed-point scale and conversion of the deterministic backward (and its
float64 fallback for a non-finite grad), and the grid-stride loops (with
fewer blocks than the work needs). The NMS kernels (csrc/cuda/nms_kernels.cuh)
share a tile in shared memory and meet at __syncthreads, so there the
emulator runs each block's threads as real threads with a barrier: the
tile-skipping mask kernel and the one-block reduction (removed-box bitmask in
shared or in global memory) give the CPU kernel's keep flags. The box-coding
kernel (csrc/cuda/launch.cuh's rows kernel, launched as box_coder.cu
launches it, over the rows of csrc/common/box_coder.h: decode, its backward,
encode and the RPN's fused decode-and-filter) gives the CPU kernels' results
bit for bit (the same row code, compiled with the same flags). So does the
mask pasting kernel (csrc/cuda/paste_kernels.cuh, launched as paste.cu
launches it: window slices per block, a grid-stride loop over masks),
against the CPU paste over csrc/common/paste_math.h. The keypoint decoding
kernel (csrc/cuda/keypoints_kernels.cuh: a block per (RoI, keypoint), a
shared-memory argmax reduction, so its threads run as real threads with a
barrier) gives the CPU kernel's keypoints and scores bit for bit (the same
bicubic values of csrc/common/keypoint_math.h, the same first-index rule).

Not checked here: what only a GPU has (the device math library's exp/log2,
concurrency of real atomics, launch limits, memory-access patterns). Those
are the CUDA cases of the other test files.

Oracle: the CPU ops (maskrcnn_ops::roi_align and friends), which are tested
against torchvision and the pure-PyTorch reference elsewhere. They sum in
another order, hence the tolerances, except where the arithmetic is the same
(max mode: the values and argmax are exact).
"""

from __future__ import annotations

import ctypes
import math
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

import maskrcnn_ops  # noqa: F401  (the CPU ops)

ops = torch.ops.maskrcnn_ops
ROOT = pathlib.Path(__file__).resolve().parent.parent
EMULATION = ROOT / "tests" / "cuda_emulation"
LAYOUTS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="channels_last")]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
CTYPE = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}

FPN_SIZES = [(40, 56), (20, 28), (10, 14), (5, 7)]
FPN_SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def _build(name, directory):
    """Compiles tests/cuda_emulation/<name>.cpp into a shared library (about
    2 s), with the flags of the CPU kernels' arithmetic (no FP contraction)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the CUDA kernel emulator")
    library = directory / f"{name}.so"
    command = [
        compiler, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-ffp-contract=off", "-Wall",
        "-Wno-unknown-pragmas", "-Werror", f"-I{ROOT / 'csrc'}", f"-I{EMULATION}", str(EMULATION / f"{name}.cpp"),
        "-o", str(library),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"building the emulator failed:\n{' '.join(command)}\n{result.stderr}"
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The emulated RoIAlign kernels."""
    return _build("roi_align_emulation", tmp_path_factory.mktemp("cuda_emulation"))


@pytest.fixture(scope="module")
def box_coder_emulator(tmp_path_factory):
    """The emulated box-coding kernels."""
    return _build("box_coder_emulation", tmp_path_factory.mktemp("cuda_emulation"))


@pytest.fixture(scope="module")
def nms_emulator(tmp_path_factory):
    """The emulated NMS kernels."""
    return _build("nms_emulation", tmp_path_factory.mktemp("cuda_emulation"))


def _pointer(t):
    return ctypes.c_void_p(t.data_ptr())


def _pointers(tensors):
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _int64s(values):
    return (ctypes.c_int64 * len(values))(*values)


def _doubles(values):
    return (ctypes.c_double * len(values))(*values)


class Guarded:
    """A tensor of `shape` in `layout` inside a buffer three times its size,
    whose two outer thirds hold a canary: a kernel that writes outside its
    output fails the test (`check`) instead of corrupting memory silently.
    `tensor` is the middle third, viewed in the layout."""

    def __init__(self, shape, layout, dtype, fill):
        self.numel = math.prod(shape)
        # bool: a byte buffer whose canary, 0x7F, no bool store writes.
        self.canary = {torch.int32: -12345, torch.float64: 1.5e300, torch.bool: 0x7F}.get(dtype, 3.0e38)
        self.buffer = torch.full((3 * self.numel,), self.canary, dtype=torch.uint8 if dtype == torch.bool else dtype)
        middle = self.buffer[self.numel: 2 * self.numel]
        middle.fill_(fill)
        if dtype == torch.bool:
            middle = middle.view(torch.bool)
        if layout == torch.channels_last:
            n, c, h, w = shape
            self.tensor = middle.view(n, h, w, c).permute(0, 3, 1, 2)
        else:
            self.tensor = middle.view(shape)

    def pointer(self):
        return ctypes.c_void_p(self.tensor.data_ptr())

    def check(self):
        for pad in (self.buffer[: self.numel], self.buffer[2 * self.numel:]):
            assert (pad == self.canary).all(), "the kernel wrote outside its output"
        return self.tensor


def emulated_forward(lib, features, rois, output_size, scales, sampling_ratio, aligned, *, pool_max=False,
                     blocks=0, canonical_scale=224.0, canonical_level=4):
    """The CUDA forward (roi_align.cu's launch sequence) over `features` (one
    map or a pyramid, all in one layout): output [K, C, PH, PW] in that
    layout, and the argmax (int32) in max mode."""
    first = features[0]
    channels_last = first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    features = [f.contiguous(memory_format=layout) for f in features]
    ph, pw = output_size
    rois = rois.to(first.dtype).contiguous()
    shape = (rois.size(0), first.size(1), ph, pw)
    output = Guarded(shape, layout, first.dtype, math.nan)
    argmax = Guarded(shape, layout, torch.int32, -7) if pool_max else None
    getattr(lib, f"mro_roi_align_forward_{SUFFIX[first.dtype]}")(
        ctypes.c_int(len(features)), _pointers(features), _int64s([f.size(2) for f in features]),
        _int64s([f.size(3) for f in features]), _doubles(scales), ctypes.c_int64(first.size(1)),
        ctypes.c_double(canonical_scale), ctypes.c_int64(canonical_level), ctypes.c_int(int(channels_last)),
        _pointer(rois), ctypes.c_int64(rois.size(0)), output.pointer(),
        argmax.pointer() if pool_max else ctypes.c_void_p(0), ctypes.c_int64(first.size(0)), ctypes.c_int64(ph),
        ctypes.c_int64(pw), ctypes.c_int64(sampling_ratio), ctypes.c_int(int(aligned)), ctypes.c_uint(blocks),
    )
    return (output.check(), argmax.check()) if pool_max else output.check()


def emulated_backward(lib, grad, rois, shapes, scales, sampling_ratio, aligned, *, argmax=None,
                      deterministic=False, blocks=0, canonical_scale=224.0, canonical_level=4):
    """The CUDA backward (roi_align.cu's launch sequence: float atomics, or the
    deterministic fixed-point path with its scale and conversion kernels): one
    gradient per level of `shapes` [(N, C, H, W), ...], in grad's layout."""
    channels_last = grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    grad = grad.contiguous(memory_format=layout)
    batch, channels = shapes[0][0], shapes[0][1]
    grad_inputs = [Guarded(s, layout, grad.dtype, 0.0) for s in shapes]
    rois = rois.to(grad.dtype).contiguous()
    argmax = argmax.contiguous(memory_format=layout) if argmax is not None else None
    max_abs = grad.abs().max().item() if grad.numel() else 0.0
    getattr(lib, f"mro_roi_align_backward_{SUFFIX[grad.dtype]}")(
        ctypes.c_int(len(shapes)), _int64s([s[2] for s in shapes]), _int64s([s[3] for s in shapes]),
        _doubles(scales), ctypes.c_int64(channels), ctypes.c_double(canonical_scale), ctypes.c_int64(canonical_level),
        ctypes.c_int(int(channels_last)),
        _pointer(grad), _pointer(rois), ctypes.c_int64(rois.size(0)),
        _pointer(argmax) if argmax is not None else ctypes.c_void_p(0), _pointers([g.tensor for g in grad_inputs]),
        ctypes.c_int64(batch), ctypes.c_int64(grad.size(2)), ctypes.c_int64(grad.size(3)),
        ctypes.c_int64(sampling_ratio), ctypes.c_int(int(aligned)), ctypes.c_int(int(deterministic)),
        ctypes.c_double(max_abs), ctypes.c_uint(blocks),
    )
    return [g.check() for g in grad_inputs]


def make_rois(num, height, width, *, batch=2, spatial_scale=1.0, seed=0, dtype=torch.float64):
    """RoIs [num + 4, 5] in image coordinates: random boxes, many partly
    outside the map, plus a sub-pixel box, a box far outside, an inverted box
    and a box much larger than the map."""
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = height / spatial_scale, width / spatial_scale
    xy = (torch.rand(num, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2) * torch.tensor([img_w, img_h])
    wh = (torch.rand(num, 2, generator=g, dtype=torch.float64) * 0.8 + 0.01) * torch.tensor([img_w, img_h])
    boxes = torch.cat([xy, xy + wh], 1)
    fixed = torch.tensor([
        [0.3 * img_w, 0.4 * img_h, 0.3 * img_w + 0.3, 0.4 * img_h + 0.2],
        [img_w + 50, img_h + 50, img_w + 90, img_h + 70],
        [0.8 * img_w, 0.7 * img_h, 0.2 * img_w, 0.1 * img_h],
        [-img_w, -img_h, 2 * img_w, 2 * img_h],
    ], dtype=torch.float64)
    boxes = torch.cat([boxes, fixed])
    index = torch.randint(0, batch, (len(boxes), 1), generator=g).double()
    return torch.cat([index, boxes], 1).to(dtype)


def make_features(shape, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)


# ------------------------------------------------------------ single level --


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_forward_and_backward_equal_the_cpu_kernels(emulator, dtype, layout, aligned, sampling_ratio):
    """Average pooling, one map: the forward, the float-atomic backward and the
    deterministic fixed-point backward equal the CPU kernels; 5 channels, so
    NCHW's last channel group is partial."""
    x = make_features((2, 5, 13, 17), layout, dtype)
    rois = make_rois(30, 13, 17, spatial_scale=0.5, dtype=dtype)
    output = emulated_forward(emulator, [x], rois, (3, 4), [0.5], sampling_ratio, aligned)
    expected = ops.roi_align(x, rois, 0.5, 3, 4, sampling_ratio, aligned)
    assert output.is_contiguous(memory_format=layout)
    torch.testing.assert_close(output, expected, **TOLERANCE[dtype])

    grad = make_features(tuple(expected.shape), layout, dtype, seed=1)
    expected_grad = ops.roi_align_backward(grad, rois, 0.5, 3, 4, 2, 5, 13, 17, sampling_ratio, aligned)
    for deterministic in (False, True):
        (grad_input,) = emulated_backward(emulator, grad, rois, [(2, 5, 13, 17)], [0.5], sampling_ratio, aligned,
                                          deterministic=deterministic)
        torch.testing.assert_close(grad_input, expected_grad, **TOLERANCE[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grid_stride_loops_and_the_deterministic_sum(emulator, layout):
    """Fewer blocks than the work needs: every thread loops over several work
    items. The forward is the same bit for bit; so is the deterministic
    backward, although the order of its additions changed (fixed point
    commutes)."""
    x = make_features((2, 6, 11, 9), layout, torch.float32)
    rois = make_rois(40, 11, 9, dtype=torch.float32)
    full = emulated_forward(emulator, [x], rois, (2, 3), [1.0], 2, True)
    for blocks in (1, 3):
        torch.testing.assert_close(emulated_forward(emulator, [x], rois, (2, 3), [1.0], 2, True, blocks=blocks),
                                   full, rtol=0, atol=0)
    grad = make_features(tuple(full.shape), layout, torch.float32, seed=3)
    runs = [emulated_backward(emulator, grad, rois, [(2, 6, 11, 9)], [1.0], 2, True, deterministic=True,
                              blocks=blocks)[0] for blocks in (0, 1, 3, 7)]
    for run in runs[1:]:
        assert torch.equal(run, runs[0])
    torch.testing.assert_close(runs[0], ops.roi_align_backward(grad, rois, 1.0, 2, 3, 2, 6, 11, 9, 2, True),
                               **TOLERANCE[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
def test_max_mode_equals_the_cpu_kernels_exactly(emulator, layout, aligned):
    """mmcv's max pooling: values and argmax equal the CPU kernel's bit for bit
    (the same arithmetic per sample, no sum), ties included (a constant
    region); the backward sends each bin's gradient to its argmax sample."""
    x = make_features((2, 5, 12, 15), layout, torch.float64)
    x[:, :, 2:6, 3:8] = 0.25  # ties: the first sample in order must win
    rois = make_rois(25, 12, 15, dtype=torch.float64)
    rois = torch.cat([rois, torch.tensor([[1, 2.0, math.nan, 5.0, 5.0]], dtype=torch.float64)])  # no samples
    output, argmax = emulated_forward(emulator, [x], rois, (3, 3), [1.0], 2, aligned, pool_max=True)
    expected, expected_argmax = ops.roi_align_max(x, rois, 1.0, 3, 3, 2, aligned)
    assert torch.equal(output, expected) and torch.equal(argmax, expected_argmax)
    assert (argmax == -1).any() and (argmax > 0).any()  # a RoI without samples, and real choices

    grad = make_features(tuple(output.shape), layout, torch.float64, seed=2)
    expected_grad = ops.roi_align_max_backward(grad, rois, argmax, 1.0, 3, 3, 2, 5, 12, 15, 2, aligned)
    for deterministic in (False, True):
        (grad_input,) = emulated_backward(emulator, grad, rois, [(2, 5, 12, 15)], [1.0], 2, aligned,
                                          argmax=argmax, deterministic=deterministic)
        torch.testing.assert_close(grad_input, expected_grad, **TOLERANCE[torch.float64])


def test_corrupt_argmax_adds_nothing(emulator):
    """argmax entries that name no sample (negative, or past the bin's grid)
    are skipped, never used as an offset."""
    x = make_features((1, 3, 8, 8), torch.contiguous_format, torch.float64)
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 6.0]], dtype=torch.float64)
    grad = torch.ones(1, 3, 2, 2, dtype=torch.float64)
    corrupt = torch.tensor([-5, 4, 1 << 30, -(1 << 30)], dtype=torch.int32).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    (grad_input,) = emulated_backward(emulator, grad, rois, [(1, 3, 8, 8)], [1.0], 2, False, argmax=corrupt.clone())
    assert not grad_input.any()


def test_invalid_batch_index_gives_zeros_and_reads_nothing(emulator):
    """The CUDA kernels never sync, so a row whose batch index is out of range
    (or NaN) pools zeros and takes no gradient; the valid rows are untouched."""
    x = make_features((2, 4, 9, 9), torch.contiguous_format, torch.float64)
    good = torch.tensor([[1, 1.0, 2.0, 7.0, 8.0]], dtype=torch.float64)
    bad = good.repeat(4, 1)
    bad[:, 0] = torch.tensor([2.0, -1.0, math.nan, 1e9])
    rois = torch.cat([good, bad])
    output = emulated_forward(emulator, [x], rois, (2, 2), [1.0], 2, False)
    torch.testing.assert_close(output[:1], ops.roi_align(x, good, 1.0, 2, 2, 2, False), rtol=1e-12, atol=1e-12)
    assert not output[1:].any()
    grad = torch.ones(5, 4, 2, 2, dtype=torch.float64)
    for deterministic in (False, True):
        (grad_input,) = emulated_backward(emulator, grad, rois, [(2, 4, 9, 9)], [1.0], 2, False,
                                          deterministic=deterministic)
        torch.testing.assert_close(
            grad_input, ops.roi_align_backward(grad[:1], good, 1.0, 2, 2, 2, 4, 9, 9, 2, False), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_values(emulator, layout):
    """Inf/NaN at element (0, 0) of the map, which only outside samples would
    touch, stays out of the output; an Inf and a NaN in grad land where the CPU
    kernel puts them, with the float atomics and with the deterministic path
    (whose fixed point cannot hold them: its float64 fallback)."""
    x = make_features((1, 3, 10, 12), layout, torch.float64)
    x[0, 0, 0, 0], x[0, 1, 0, 0] = math.inf, math.nan
    rois = torch.tensor([[0, 8.0, 3.0, 30.0, 9.0], [0, 2.0, 7.0, 9.0, 25.0]], dtype=torch.float64)
    output = emulated_forward(emulator, [x], rois, (3, 3), [1.0], 2, True)
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, ops.roi_align(x, rois, 1.0, 3, 3, 2, True), rtol=1e-12, atol=1e-12)
    grad = torch.ones(2, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=layout)
    grad[0, 0, 1, 0], grad[1, 2, 0, 1] = math.inf, math.nan
    expected = ops.roi_align_backward(grad, rois, 1.0, 3, 3, 1, 3, 10, 12, 2, True)
    assert expected.isinf().any() and expected.isnan().any() and not expected[:, :, 0, 0].any()
    for deterministic in (False, True):
        (grad_input,) = emulated_backward(emulator, grad, rois, [(1, 3, 10, 12)], [1.0], 2, True,
                                          deterministic=deterministic)
        torch.testing.assert_close(grad_input, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_empty_and_degenerate_work(emulator):
    """No RoIs, no channels, a zero-size map: nothing launches, nothing is
    written, as the host code of roi_align.cu arranges."""
    x = make_features((2, 3, 6, 6), torch.contiguous_format, torch.float64)
    assert emulated_forward(emulator, [x], torch.zeros(0, 5, dtype=torch.float64), (2, 2), [1.0], 2, False).numel() == 0
    empty_map = torch.zeros(2, 3, 0, 6, dtype=torch.float64)
    rois = torch.tensor([[0, 1.0, 1.0, 4.0, 4.0]], dtype=torch.float64)
    assert not emulated_forward(emulator, [empty_map], rois, (2, 2), [1.0], 2, False).any()


# ------------------------------------------------------------ multi-level --


def make_pyramid(layout, dtype, channels=6, batch=2, seed=0):
    return [make_features((batch, channels, h, w), layout, dtype, seed=seed + i) for i, (h, w) in enumerate(FPN_SIZES)]


def make_fpn_rois(num, *, seed=0, dtype=torch.float64):
    """Boxes of every size class (so every level is used), in 160x224 images."""
    g = torch.Generator().manual_seed(seed)
    side = 2 ** (torch.rand(num, generator=g, dtype=torch.float64) * 8 + 2)  # 4 to 1024 px
    centre = torch.rand(num, 2, generator=g, dtype=torch.float64) * torch.tensor([224.0, 160.0])
    aspect = 2 ** (torch.rand(num, generator=g, dtype=torch.float64) * 2 - 1)
    half = torch.stack([side * aspect.sqrt(), side / aspect.sqrt()], 1) / 2
    boxes = torch.cat([centre - half, centre + half], 1)
    index = torch.randint(0, 2, (num, 1), generator=g).double()
    return torch.cat([index, boxes], 1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_multi_level_equals_the_cpu_kernels(emulator, dtype, layout, sampling_ratio):
    """The fused multi-level kernels (each thread picks its RoI's level):
    forward and both backward paths equal the CPU multi-level op, over RoIs of
    every level, including ones below P2 and above P5 (clamped)."""
    features = make_pyramid(layout, dtype)
    rois = make_fpn_rois(60, dtype=dtype)
    output = emulated_forward(emulator, features, rois, (4, 3), FPN_SCALES, sampling_ratio, False)
    expected = ops.multi_level_roi_align(features, rois, FPN_SCALES, 4, 3, sampling_ratio, False, 224.0, 4)
    torch.testing.assert_close(output, expected, **TOLERANCE[dtype])
    grad = make_features(tuple(expected.shape), layout, dtype, seed=9)
    heights, widths = [h for h, _ in FPN_SIZES], [w for _, w in FPN_SIZES]
    expected_grads = ops.multi_level_roi_align_backward(
        grad, rois, FPN_SCALES, 4, 3, 2, 6, heights, widths, sampling_ratio, False, 224.0, 4
    )
    assert all(g.any() for g in expected_grads)  # every level receives RoIs
    shapes = [(2, 6, h, w) for h, w in FPN_SIZES]
    for deterministic in (False, True):
        grads = emulated_backward(emulator, grad, rois, shapes, FPN_SCALES, sampling_ratio, False,
                                  deterministic=deterministic)
        for ours, theirs in zip(grads, expected_grads):
            torch.testing.assert_close(ours, theirs, **TOLERANCE[dtype])


def test_multi_level_other_canonical_settings_and_first_level(emulator):
    """A pyramid starting at P3 (three levels) with another canonical scale
    and level: the kernel's level choice follows the CPU op's."""
    features = make_pyramid(torch.contiguous_format, torch.float64)[1:]
    scales = FPN_SCALES[1:]
    rois = make_fpn_rois(40, seed=4)
    output = emulated_forward(emulator, features, rois, (2, 2), scales, 2, True, canonical_scale=112.0,
                              canonical_level=3)
    expected = ops.multi_level_roi_align(features, rois, scales, 2, 2, 2, True, 112.0, 3)
    torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------- NMS --


def emulated_nms_keep(lib, boxes, scores, idxs, iou_threshold, image_ids=None, *, force_global=False):
    """batched_nms_keep with the CUDA kernels: the host steps of nms.cu (the
    order by (image, class) then score, each box's segment end) here, the
    mask and reduction kernels emulated. Returns bool [N] keep flags."""
    n = boxes.size(0)
    by_segment = torch.sort(scores, stable=True, descending=True).indices
    keys = [k for k in (idxs, image_ids) if k is not None]
    for key in keys:  # stable sorts by the minor key, then the major key
        by_segment = by_segment[torch.sort(key[by_segment], stable=True).indices]
    starts = torch.zeros(n, dtype=torch.bool)
    if n:
        starts[0] = True
        for key in keys:
            k = key[by_segment]
            starts[1:] |= k[1:] != k[:-1]
    is_end = torch.ones(n, dtype=torch.bool)
    is_end[:-1] = starts[1:]
    ends = torch.where(is_end, torch.arange(n), torch.full((n,), n))
    seg_last = ends.flip(0).cummin(0).values.flip(0).contiguous()
    acc = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    sorted_boxes = boxes[by_segment].to(acc).contiguous()
    keep_sorted = torch.zeros(n, dtype=torch.bool)
    getattr(lib, f"mro_nms_keep_sorted_{SUFFIX[acc]}")(
        _pointer(sorted_boxes), _pointer(seg_last), ctypes.c_int64(n), ctypes.c_double(iou_threshold),
        ctypes.c_int(int(force_global)), _pointer(keep_sorted),
    )
    keep = torch.zeros(n, dtype=torch.bool)
    keep[by_segment] = keep_sorted
    return keep


def make_nms_boxes(n, *, seed=0, dtype=torch.float32):
    """Clustered boxes (many overlaps), a few duplicates with equal scores, a
    NaN box, a zero-area box and an inverted box."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(n // 8, 1), 2, generator=g, dtype=torch.float64) * 200
    xy = centres[torch.randint(0, len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g, dtype=torch.float64) * 6
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 40 + 4
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    if n >= 8:
        boxes[3], scores[3] = boxes[2], scores[2]  # a duplicate of equal score: index order decides
        boxes[5, 0] = math.nan
        boxes[6, 2] = boxes[6, 0]  # zero area
        boxes[7, :2], boxes[7, 2:] = boxes[7, 2:].clone(), boxes[7, :2].clone()  # inverted
    return boxes.to(dtype), scores.to(dtype)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 200, 333])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_nms_kernels_equal_the_cpu_kernel(nms_emulator, n, dtype):
    """Plain, batched over classes and batched over (image, class): the CUDA
    mask and reduction kernels keep exactly the boxes the CPU kernel keeps,
    for tile-edge sizes (63, 64, 65 boxes) and several thresholds, including
    0 (any overlap suppresses) and 1 (nothing is suppressed)."""
    boxes, scores = make_nms_boxes(n, seed=n, dtype=dtype)
    g = torch.Generator().manual_seed(n + 1)
    classes = torch.randint(0, 5, (n,), generator=g)
    images = torch.randint(0, 3, (n,), generator=g)
    single = torch.zeros(n, dtype=torch.int64)
    for iou_threshold in (0.0, 0.5, 1.0):  # (each emulated call starts ~3000 threads)
        for idxs, image_ids in ((single, None), (classes, None), (classes, images)):
            ours = emulated_nms_keep(nms_emulator, boxes, scores, idxs, iou_threshold, image_ids)
            expected = ops.batched_nms_keep(boxes, scores, idxs, image_ids, iou_threshold)
            assert torch.equal(ours, expected), (iou_threshold, idxs is classes, image_ids is not None)
    assert n < 64 or not emulated_nms_keep(nms_emulator, boxes, scores, single, 0.3).all()  # it suppresses


def test_nms_removed_mask_in_global_memory(nms_emulator):
    """The reduction's removed-box bitmask in global memory (the path for more
    than 393,216 boxes, forced here on a small case) gives the same flags."""
    boxes, scores = make_nms_boxes(300, seed=7)
    idxs = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(8))
    for iou_threshold in (0.2, 0.6):
        expected = ops.batched_nms_keep(boxes, scores, idxs, None, iou_threshold)
        for force_global in (False, True):
            ours = emulated_nms_keep(nms_emulator, boxes, scores, idxs, iou_threshold, force_global=force_global)
            assert torch.equal(ours, expected)


def test_nms_one_big_segment_and_many_small_ones(nms_emulator):
    """One class spanning many tiles (the reduction ORs rows across words)
    and one box per class (every off-diagonal tile is skipped and its
    garbage never read): both equal the CPU kernel."""
    boxes, scores = make_nms_boxes(260, seed=11)
    for idxs in (torch.zeros(260, dtype=torch.int64), torch.arange(260)):
        expected = ops.batched_nms_keep(boxes, scores, idxs, None, 0.4)
        assert torch.equal(emulated_nms_keep(nms_emulator, boxes, scores, idxs, 0.4), expected)
    assert emulated_nms_keep(nms_emulator, boxes, scores, torch.arange(260), 0.4).all()


# ------------------------------------------------------------- box coding --

RPN_WEIGHTS, BOX_HEAD_WEIGHTS = (1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)
CLIP = math.log(1000.0 / 16)


def make_coding_inputs(rows, classes, *, seed=0, dtype=torch.float32):
    """Boxes [rows, 4] and deltas [rows, 4 * classes], some huge (clamped by
    the clip), one NaN, one infinite."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(rows, 2, generator=g, dtype=torch.float64) * 800
    boxes = torch.cat([xy, xy + torch.rand(rows, 2, generator=g, dtype=torch.float64) * 300 + 1], 1)
    deltas = torch.randn(rows, 4 * classes, generator=g, dtype=torch.float64) * 2
    deltas[0, 2], deltas[1, 3] = 40.0, -40.0
    deltas[2, 0], deltas[3, 1] = math.nan, math.inf
    return boxes.to(dtype), deltas.to(dtype)


def _coder_call(lib, name, dtype, *args):
    return getattr(lib, f"mro_{name}_{SUFFIX[dtype]}")(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("blocks", [0, 2], ids=["launch", "grid-stride"])
def test_box_coding_kernels_equal_the_cpu_kernels(box_coder_emulator, dtype, classes, blocks):
    """decode_boxes (class-specific deltas share their box), its backward and
    encode_boxes: bit for bit the CPU kernels' results, with the launch of
    box_coder.cu and with two blocks striding over 600 rows."""
    lib = box_coder_emulator
    boxes, deltas = make_coding_inputs(200, classes, dtype=dtype)
    rows = deltas.numel() // 4
    for weights in (RPN_WEIGHTS, BOX_HEAD_WEIGHTS):
        w = _doubles(weights)
        out = torch.full_like(deltas, math.nan)
        _coder_call(lib, "decode", dtype, _pointer(deltas), _pointer(boxes), _pointer(out), ctypes.c_int64(rows),
                    ctypes.c_int64(classes), w, ctypes.c_double(CLIP), ctypes.c_uint(blocks))
        assert torch.equal(out.nan_to_num(7.0), ops.decode_boxes(deltas, boxes, weights, CLIP).nan_to_num(7.0))

        grad = torch.randn(deltas.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
        out = torch.full_like(deltas, math.nan)
        _coder_call(lib, "decode_backward", dtype, _pointer(grad), _pointer(deltas), _pointer(boxes), _pointer(out),
                    ctypes.c_int64(rows), ctypes.c_int64(classes), w, ctypes.c_double(CLIP), ctypes.c_uint(blocks))
        expected = ops.decode_boxes_backward(grad, deltas, boxes, weights, CLIP)
        assert torch.equal(out.nan_to_num(7.0), expected.nan_to_num(7.0))

        reference_boxes = boxes + torch.tensor([3.0, -2.0, 5.0, 1.0], dtype=dtype)
        out = torch.full_like(boxes, math.nan)
        _coder_call(lib, "encode", dtype, _pointer(reference_boxes), _pointer(boxes), _pointer(out),
                    ctypes.c_int64(len(boxes)), w, ctypes.c_uint(blocks))
        assert torch.equal(out, ops.encode_boxes(reference_boxes, boxes, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("blocks", [0, 3], ids=["launch", "grid-stride"])
def test_rpn_decode_filter_kernel_equals_the_cpu_kernel(box_coder_emulator, dtype, blocks):
    """The RPN's fused decode, clip (to each image's own size), small-box and
    score tests: boxes and keep flags bit for bit the CPU kernel's, for 3
    images of 300 candidates with boxes past the borders, tiny boxes, scores
    around the threshold and non-finite deltas."""
    images, per_image = 3, 300
    anchors, deltas = make_coding_inputs(images * per_image, 1, seed=5, dtype=dtype)
    anchors = anchors.view(images, per_image, 4) - 100
    deltas = deltas.view(images, per_image, 4) * torch.tensor([1.0, 1.0, 3.0, 3.0], dtype=dtype)
    scores = torch.rand(images, per_image, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
    image_hw = torch.tensor([[600.0, 800.0], [480.0, 640.0], [1000.0, 333.0]], dtype=dtype)
    boxes = torch.full_like(deltas, math.nan)
    keep = torch.zeros(images, per_image, dtype=torch.bool)
    _coder_call(box_coder_emulator, "rpn_decode_filter", dtype, _pointer(deltas), _pointer(anchors),
                _pointer(scores), _pointer(image_hw), _pointer(boxes), _pointer(keep),
                ctypes.c_int64(images * per_image), ctypes.c_int64(per_image), _doubles(RPN_WEIGHTS),
                ctypes.c_double(CLIP), ctypes.c_double(12.0), ctypes.c_double(0.3), ctypes.c_uint(blocks))
    expected_boxes, expected_keep = ops.rpn_decode_filter(deltas, anchors, scores, image_hw, RPN_WEIGHTS, CLIP,
                                                          12.0, 0.3)
    assert torch.equal(boxes.nan_to_num(7.0), expected_boxes.nan_to_num(7.0))
    assert torch.equal(keep, expected_keep)
    assert keep.any() and not keep.all()
    assert (boxes[2, :, 2] <= 333.0).all()  # clipped to its own image's width


# ------------------------------------------------------------ mask pasting --


@pytest.fixture(scope="module")
def paste_emulator(tmp_path_factory):
    """The emulated mask pasting kernel."""
    return _build("paste_emulation", tmp_path_factory.mktemp("cuda_emulation"))


def emulated_paste(lib, masks, boxes, size, *, padding=1, threshold=None, blocks=0):
    """paste.cu's launch sequence on CPU tensors: a zeroed output (as the
    CUDA op zeroes it) inside a Guarded buffer, so a write outside the
    output fails the test."""
    num, side = masks.size(0), masks.size(-1)
    height, width = size
    dtype = torch.bool if threshold is not None else masks.dtype
    out = Guarded((num, height, width), torch.contiguous_format, dtype, 0)
    shape = [ctypes.c_int64(v) for v in (num, side, padding, height, width)]
    if dtype == torch.bool:
        lib.mro_paste_bool(_pointer(masks), _pointer(boxes), out.pointer(), *shape, ctypes.c_double(threshold),
                           ctypes.c_uint(blocks))
    else:
        getattr(lib, f"mro_paste_{SUFFIX[dtype]}")(_pointer(masks), _pointer(boxes), out.pointer(), *shape,
                                                  ctypes.c_uint(blocks))
    return out.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("blocks", [0, 5], ids=["launch", "grid-stride"])
def test_paste_kernel_equals_the_cpu_kernel(paste_emulator, dtype, blocks):
    """The CUDA paste (window slices per block, the grid-stride loop over
    masks with fewer blocks) gives the CPU kernel's pixels bit for bit, for
    boxes inside, across and outside the image, tiny, inverted and
    non-finite ones, and never writes outside its output."""
    from test_paste_ops import edge_boxes, make_boxes

    boxes = torch.cat([make_boxes(30, 45, 61, seed=2, outside=True), edge_boxes()]).to(dtype)
    masks = torch.rand(boxes.size(0), 14, 14, generator=torch.Generator().manual_seed(3), dtype=dtype)
    for padding in (1, 2):
        ours = emulated_paste(paste_emulator, masks, boxes, (45, 61), padding=padding, blocks=blocks)
        assert torch.equal(ours, ops.paste_masks(masks, boxes, 45, 61, padding, None))
    if dtype == torch.float32:
        binary = emulated_paste(paste_emulator, masks, boxes, (45, 61), threshold=0.5, blocks=blocks)
        assert torch.equal(binary, ops.paste_masks(masks, boxes, 45, 61, 1, 0.5))


def test_paste_kernel_empty_work(paste_emulator):
    masks, boxes = torch.rand(3, 7, 7), torch.tensor([[1.0, 1, 5, 5]] * 3)
    assert emulated_paste(paste_emulator, masks, boxes, (0, 9)).shape == (3, 0, 9)
    assert emulated_paste(paste_emulator, masks[:0], boxes[:0], (8, 9)).shape == (0, 8, 9)


# ------------------------------------------------------- keypoint decoding --


@pytest.fixture(scope="module")
def keypoints_emulator(tmp_path_factory):
    """The emulated keypoint decoding kernel."""
    return _build("keypoints_emulation", tmp_path_factory.mktemp("cuda_emulation"))


def emulated_keypoints(lib, heatmaps, boxes, *, threads, blocks=0):
    """keypoints.cu's launch sequence on CPU tensors (boxes in the heatmaps'
    dtype), its outputs inside Guarded buffers, so a write outside them fails
    the test. Every output is NaN-filled first: the kernel must write all."""
    heatmaps = heatmaps.contiguous()
    boxes = boxes.to(heatmaps.dtype).contiguous()
    rois, per_roi, height, width = heatmaps.shape
    keypoints = Guarded((rois, per_roi, 3), torch.contiguous_format, heatmaps.dtype, math.nan)
    scores = Guarded((rois, per_roi), torch.contiguous_format, heatmaps.dtype, math.nan)
    getattr(lib, f"mro_keypoints_{SUFFIX[heatmaps.dtype]}")(
        _pointer(heatmaps), _pointer(boxes), keypoints.pointer(), scores.pointer(),
        *[ctypes.c_int64(v) for v in (rois, per_roi, height, width)], ctypes.c_uint(threads), ctypes.c_uint(blocks),
    )
    return keypoints.check(), scores.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("threads,blocks", [(8, 0), (5, 3)], ids=["launch", "odd-block-grid-stride"])
def test_keypoints_kernel_equals_the_cpu_kernel(keypoints_emulator, dtype, threads, blocks):
    """The CUDA keypoint decoding (a block per (RoI, keypoint), each thread's
    first maximum, the shared-memory tree reduction with its lower-index
    tie-break, the grid-stride loop over pairs with fewer blocks; a block
    size that is not a power of two, threads without pixels on 1 x 1 maps)
    gives the CPU kernel's keypoints and scores bit for bit, also for exact
    ties (zero maps), NaN values and non-finite, tiny and large boxes."""
    from test_keypoint_ops import edge_boxes, make_boxes

    nan, inf = math.nan, math.inf
    odd = torch.tensor([[nan, 10.0, 50.0, 60.0], [0.0, 0.0, inf, 40.0], [2.0, 3.0, 4.5, 4.0]])
    boxes = torch.cat([make_boxes(4, seed=21), edge_boxes()[[0, 2, 4, 6]], odd]).to(dtype)
    g = torch.Generator().manual_seed(22)
    heatmaps = torch.randn(boxes.size(0), 3, 12, 10, generator=g, dtype=dtype)
    heatmaps[1] = 0  # every pixel ties
    heatmaps[2, 1, 4, 5] = nan
    ours = emulated_keypoints(keypoints_emulator, heatmaps, boxes, threads=threads, blocks=blocks)
    expected = ops.heatmaps_to_keypoints(heatmaps, boxes)
    torch.testing.assert_close(ours[0], expected[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ours[1], expected[1], rtol=0, atol=0, equal_nan=True)


def test_keypoints_kernel_empty_work(keypoints_emulator):
    heatmaps, boxes = torch.rand(3, 0, 5, 5), torch.tensor([[1.0, 1, 5, 5]] * 3)
    keypoints, scores = emulated_keypoints(keypoints_emulator, heatmaps, boxes, threads=4)
    assert keypoints.shape == (3, 0, 3) and scores.shape == (3, 0)
