"""The package loads its kernels, registers every op for the backends it was
built with, and fails loudly (never silently) when the extension cannot load."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest
import torch

import maskrcnn_ops

# Every op the extension defined (TORCH_LIBRARY in csrc/ops.cpp), as the
# dispatcher knows them: a new op is checked without being listed here.
OPS = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("maskrcnn_ops::"))


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.environ.get("MASKRCNN_OPS_EXPECT_CUDA") != "1", reason="set by CI, which builds the CUDA kernels")
def test_cuda_kernels_compiled_in():
    assert maskrcnn_ops.build_info()["with_cuda"], "CI expected a build with the CUDA kernels"


def test_the_dispatcher_lists_the_ops():
    assert "maskrcnn_ops::roi_align" in OPS and "maskrcnn_ops::multi_level_roi_align_backward" in OPS


# Ops that run on the CPU only, by design: masks_to_rle's encodings are
# host data (its wrapper moves the M x M masks and boxes to the CPU).
CPU_ONLY_OPS = frozenset({"maskrcnn_ops::masks_to_rle"})


@pytest.mark.parametrize("name", OPS)
def test_kernels_registered_per_backend(name):
    """A CPU kernel for every op, and a CUDA kernel exactly when the build has
    the CUDA kernels (so a missing CUDA registration fails on any machine
    with a CUDA build, with or without a GPU), except the CPU-only ops."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert has_cuda == (maskrcnn_ops.build_info()["with_cuda"] and name not in CPU_ONLY_OPS)


def test_roi_align_has_autocast_kernels():
    for key in ("AutocastCPU", "AutocastCUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("maskrcnn_ops::roi_align", key)


def test_missing_extension_is_a_clear_import_error():
    result = run_python(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "maskrcnn_ops._C":
                    raise ImportError("No module named 'maskrcnn_ops._C'")
        sys.meta_path.insert(0, Block())
        import maskrcnn_ops
        """
    )
    assert result.returncode != 0
    assert "could not load its compiled extension" in result.stderr
    assert "has not been built" in result.stderr
    assert "pip install --no-build-isolation" in result.stderr


def test_torch_version_mismatch_is_a_clear_import_error():
    result = run_python(
        """
        import torch
        torch.__version__ = "1.0.0"
        import maskrcnn_ops
        """
    )
    assert result.returncode != 0
    assert "was built against torch" in result.stderr
    assert "1.0.0 is installed" in result.stderr


@pytest.mark.parametrize("package", ["maskrcnn_ops", "maskrcnn", "maskrcnn.data", "maskrcnn.training"])
def test_no_exported_name_hides_a_submodule(package):
    """``package.X`` is one thing: no function a package exports shares its
    name with a submodule (``maskrcnn_ops.roi_align`` is the function, its
    module ``roi_align_ops``), which could otherwise be reached only through
    importlib."""
    module = importlib.import_module(package)
    submodules = {info.name for info in pkgutil.iter_modules(module.__path__)}
    assert set(module.__all__) & submodules == set()
