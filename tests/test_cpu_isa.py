"""The CPU kernels compiled per instruction set (csrc/cpu/isa.h): the copy
that runs follows ATen's CPU capability (ATEN_CPU_CAPABILITY lowers it), and
every copy gives the same bits, since all perform the same IEEE operations in
the same order. Each capability runs in its own process (ATen reads the
variable once)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import maskrcnn_ops

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
import numpy as np
import torch
import maskrcnn_ops

digests = []
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
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
                    digests.append(hashlib.sha1(t.detach().contiguous().float().numpy().tobytes()).hexdigest())
print(" ".join(digests))
"""


@pytest.mark.skipif(len(supported_capabilities()) < 2, reason="this CPU has a single kernel copy")
def test_roi_align_gives_the_same_bits_under_every_capability():
    digests = {c: run_under(c, ROI_ALIGN_HASHES) for c in supported_capabilities()}
    first = next(iter(digests.values()))
    assert len(first.split()) == 4 * 3 * 2 * 2 * 2
    for capability, value in digests.items():
        assert value == first, f"roi_align under ATEN_CPU_CAPABILITY={capability} differs"


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
    for k in (0, 1, 57, 399):
        alone = maskrcnn_ops.roi_align(features, rois[k : k + 1], (7, 7), 1.0, 2, True)
        assert torch.equal(alone[0], together[k]), k
    layout_reference = maskrcnn_ops.roi_align(
        features.contiguous(memory_format=torch.channels_last), rois, (7, 7), 1.0, 2, True)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(together, layout_reference.contiguous(), atol=tolerance, rtol=tolerance)
