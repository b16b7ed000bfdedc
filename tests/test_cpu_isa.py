"""The CPU kernels compiled per instruction set (csrc/cpu/isa.h): the copy
that runs follows ATen's CPU capability (ATEN_CPU_CAPABILITY lowers it), and
every copy gives the same bits, since all perform the same IEEE operations in
the same order. Each capability runs in its own process (ATen reads the
variable once). The one exception: bfloat16 RoIAlign with the AVX-512 BF16
instructions, which rounds its own way and is checked to stay within one
bfloat16 rounding of the exact result."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import maskrcnn_ops
from maskrcnn_ops.reference import roi_align as roi_align_reference

ROOT = Path(__file__).resolve().parent.parent
CAPABILITIES = ("default", "avx2", "avx512")
ISA_OF_CAPABILITY = {"default": "baseline", "avx2": "avx2", "avx512": "avx512"}


def supported_capabilities() -> list:
    """The capabilities this CPU supports: its best and every one below."""
    best = torch.backends.cpu.get_cpu_capability().lower()
    if best not in CAPABILITIES:  # e.g. a non-x86 CPU: only the baseline
        return ["default"]
    return list(CAPABILITIES[: CAPABILITIES.index(best) + 1])


def run_under(capability: str, code: str) -> str:
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_build_info_names_the_kernel_copy_that_runs():
    for capability in supported_capabilities():
        isa = run_under(capability, "import maskrcnn_ops; print(maskrcnn_ops.build_info()['cpu_kernels'])")
        assert isa == ISA_OF_CAPABILITY[capability], capability


# Inputs from numpy's generator, not torch's: torch's own vectorized kernels
# (randn, exp) may round differently per capability.
ROI_ALIGN_HASHES = """
import hashlib
import json
import numpy as np
import torch
import maskrcnn_ops

digests = {}
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    digests[str(dtype)] = []
    for channels in (64, 19, 3):
        rng = np.random.default_rng(channels)
        features = torch.from_numpy(rng.standard_normal((2, channels, 40, 56)).astype("float32")).to(dtype)
        centres = rng.uniform(0, 56, (300, 2))
        sides = np.exp(rng.uniform(np.log(0.5), np.log(60), (300, 2)))
        rois = np.concatenate([rng.integers(0, 2, (300, 1)), centres - sides / 2, centres + sides / 2], 1)
        rois = torch.from_numpy(rois.astype("float32")).to(dtype)
        for channels_last in (False, True):
            x = features.contiguous(memory_format=torch.channels_last) if channels_last else features
            x = x.detach().requires_grad_()
            for sampling_ratio in (2, 0):
                pooled = maskrcnn_ops.roi_align(x, rois, (7, 7), 1.0, sampling_ratio, True)
                (grad,) = torch.autograd.grad(pooled, x, torch.ones_like(pooled))
                for t in (pooled, grad):
                    digests[str(dtype)].append(
                        hashlib.sha1(t.detach().contiguous().float().numpy().tobytes()).hexdigest())
print(json.dumps({"bf16_instructions": maskrcnn_ops.build_info()["cpu_bf16_instructions"],
                  "digests": digests}))
"""


@pytest.mark.skipif(len(supported_capabilities()) < 2, reason="this CPU has a single kernel copy")
def test_roi_align_gives_the_same_bits_under_every_capability():
    runs = {c: json.loads(run_under(c, ROI_ALIGN_HASHES)) for c in supported_capabilities()}
    first = runs["default"]
    assert not first["bf16_instructions"]
    for dtype, values in first["digests"].items():
        assert len(values) == 3 * 2 * 2 * 2
        for capability, run in runs.items():
            if dtype == str(torch.bfloat16) and run["bf16_instructions"]:
                continue  # test_bf16_instructions_stay_within_one_rounding
            assert run["digests"][dtype] == values, f"{dtype} under ATEN_CPU_CAPABILITY={capability} differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels", [16, 35])
def test_nchw_roi_alone_equals_roi_among_many(dtype, channels):
    """Many RoIs on a map make the NCHW forward interleave channel blocks into
    a tile first; one RoI alone reads the planes directly. Same bits."""
    rng = np.random.default_rng(7)
    features = torch.from_numpy(rng.standard_normal((2, channels, 48, 64)).astype("float32")).to(dtype)
    centres = rng.uniform(0, 64, (400, 2))
    sides = np.exp(rng.uniform(np.log(1), np.log(64), (400, 2)))
    rois = np.concatenate([rng.integers(0, 2, (400, 1)), centres - sides / 2, centres + sides / 2], 1)
    rois = torch.from_numpy(rois.astype("float32")).to(dtype)
    together = maskrcnn_ops.roi_align(features, rois, (7, 7), 1.0, 2, True)
    # With the BF16 instructions a tiled block rounds its own way.
    exact = dtype != torch.bfloat16 or not maskrcnn_ops.build_info()["cpu_bf16_instructions"]
    for k in (0, 1, 57, 399):
        alone = maskrcnn_ops.roi_align(features, rois[k : k + 1], (7, 7), 1.0, 2, True)
        if exact:
            assert torch.equal(alone[0], together[k]), k
        else:
            reference = roi_align_reference(features.double(), rois[k : k + 1].double(), (7, 7), 1.0, 2, True)
            magnitude = roi_align_reference(features.double().abs(), rois[k : k + 1].double(), (7, 7), 1.0, 2, True)
            assert_within_one_bf16_rounding(together[k], reference[0], magnitude[0])
            assert_within_one_bf16_rounding(alone[0], reference[0], magnitude[0])
    layout_reference = maskrcnn_ops.roi_align(
        features.contiguous(memory_format=torch.channels_last), rois, (7, 7), 1.0, 2, True)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(together, layout_reference.contiguous(), atol=tolerance, rtol=tolerance)


def assert_within_one_bf16_rounding(actual, reference, magnitude):
    """bfloat16 `actual` is the float64 `reference` rounded to bfloat16 or a
    neighbour of it: within one bfloat16 spacing of the reference (2^-7
    relative to its leading power of two), plus 2^-14 of `magnitude` (the
    same pooling of |input|: what the float32 accumulation and the 16-bit
    weights can lose when terms cancel), plus the smallest normal float32
    (denormals are flushed to zero)."""
    actual = actual.double()
    exponent = torch.floor(torch.log2(reference.abs().clamp_min(2.0**-126)))
    bound = torch.exp2(exponent - 7) + magnitude * 2.0**-14 + 2.0**-126
    error = (actual - reference).abs()
    worst = int(torch.argmax(error - bound))
    assert bool((error <= bound).all()), (
        f"{float(error.flatten()[worst])} > {float(bound.flatten()[worst])} at {worst}: "
        f"{float(actual.flatten()[worst])} vs {float(reference.flatten()[worst])}")


@pytest.mark.skipif(not maskrcnn_ops.build_info()["cpu_bf16_instructions"],
                    reason="the CPU lacks AVX-512 BF16 (or a lower ATEN_CPU_CAPABILITY is set)")
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_bf16_instructions_stay_within_one_rounding(aligned, sampling_ratio):
    """The AVX-512 BF16 forward (tiled NCHW blocks: two full blocks and a
    partial one, RoIs over the borders and past them) is the exact result
    rounded to bfloat16 or one of its neighbours, like the float32 copies."""
    rng = np.random.default_rng(11)
    features = torch.from_numpy(rng.standard_normal((2, 35, 40, 56)).astype("float32")).bfloat16()
    centres = rng.uniform(-8, 64, (500, 2))
    sides = np.exp(rng.uniform(np.log(0.5), np.log(70), (500, 2)))
    rois = np.concatenate([rng.integers(0, 2, (500, 1)), centres - sides / 2, centres + sides / 2], 1)
    rois = torch.from_numpy(rois.astype("float32")).bfloat16()
    pooled = maskrcnn_ops.roi_align(features, rois, (7, 7), 0.5, sampling_ratio, aligned)
    args = (rois.double(), (7, 7), 0.5, sampling_ratio, aligned)
    reference = roi_align_reference(features.double(), *args)
    magnitude = roi_align_reference(features.double().abs(), *args)
    assert_within_one_bf16_rounding(pooled, reference, magnitude)
    # Rounding the float32 result instead would also pass; this one is not it.
    float32_path = maskrcnn_ops.roi_align(features.float(), rois.float(), (7, 7), 0.5, sampling_ratio, aligned)
    assert not torch.equal(pooled, float32_path.bfloat16())


@pytest.mark.skipif(not maskrcnn_ops.build_info()["cpu_bf16_instructions"],
                    reason="the CPU lacks AVX-512 BF16 (or a lower ATEN_CPU_CAPABILITY is set)")
def test_bf16_instructions_propagate_inf_and_nan_like_float32():
    """A block holding Inf or NaN is pooled by the float32 tile (0 * Inf in a
    weight's zero low part would make NaN of an Inf): same bits as the
    bfloat16 copies without the instructions, i.e. the float32 result
    rounded."""
    rng = np.random.default_rng(5)
    features = torch.from_numpy(rng.standard_normal((1, 32, 24, 24)).astype("float32"))
    features[0, 3, 10, 10] = math.inf
    features[0, 20, 5, 7] = math.nan
    rois = torch.tensor([[0.0, 4.0, 4.0, 20.0, 20.0]] * 300)
    rois[:, 1:] += torch.from_numpy(rng.uniform(-3, 3, (300, 4)).astype("float32"))
    pooled = maskrcnn_ops.roi_align(features.bfloat16(), rois.bfloat16(), (7, 7), 1.0, 2, True)
    expected = maskrcnn_ops.roi_align(features.bfloat16().float(), rois.bfloat16().float(), (7, 7), 1.0, 2, True)
    assert torch.isinf(pooled[:, 3]).any() and torch.isnan(pooled[:, 20]).any()
    torch.testing.assert_close(pooled, expected.bfloat16(), rtol=0, atol=0, equal_nan=True)
