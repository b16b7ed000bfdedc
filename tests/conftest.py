"""Shared pytest fixtures for the maskrcnn_ops tests."""

from __future__ import annotations

import pytest
import torch

import maskrcnn_ops  # noqa: F401  (loads the extension and registers the ops)

# Every numeric test runs on both backends; the CUDA case is skipped (not
# failed) on machines without a GPU.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


# Test modules whose assertions compare floating-point results (with
# torchvision, the references or another backend). Their tolerances must hold
# on every CPU instruction set and thread count, so CI runs them again under
# each ATEN_CPU_CAPABILITY (`make test-numerics`): they carry the "numerics"
# marker.
NUMERIC_MODULES = frozenset({
    "test_anchors", "test_boxes", "test_cuda_kernels_emulated", "test_export", "test_keypoint_ops", "test_model",
    "test_multiscale_roi_align", "test_nms", "test_paste_ops", "test_rle", "test_patch", "test_proposals",
    "test_roi_align", "test_roi_align_max", "test_soft_nms", "test_torchvision_compat", "test_training",
    "test_training_blocks", "test_keypoint_rcnn",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in NUMERIC_MODULES:
            item.add_marker(pytest.mark.numerics)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a test runs on: "cpu", then "cuda" (skipped without a GPU)."""
    return request.param


@pytest.fixture
def deterministic_mode():
    """Returns a setter for torch.use_deterministic_algorithms that restores
    the global state (mode and warn_only) when the test ends."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield torch.use_deterministic_algorithms
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


@pytest.fixture
def fresh_dynamo():
    """A clean torch.compile cache, so tests neither share compiled graphs nor
    hit the recompilation limit because of each other."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Tests that draw from the global RNG (randn_like, ...) are reproducible."""
    torch.manual_seed(0)
