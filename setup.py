"""Build of maskrcnn_ops._C: CPU kernels always, CUDA kernels when possible.

Environment switches:
  MASKRCNN_OPS_CPU_ONLY=1   build without CUDA kernels even if a toolkit exists
  MASKRCNN_OPS_DEBUG=1      -O0 -g host code and -G device code
  TORCH_CUDA_ARCH_LIST      GPU architectures (honoured by torch's build)
  MAX_JOBS                  parallel compile jobs (honoured by torch's build)
  CUDA_HOME / CUDA_PATH     the toolkit; found from nvcc when unset
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _log(message: str) -> None:
    print(f"maskrcnn_ops: {message}", file=sys.stderr, flush=True)


def _is_toolkit(path: Path) -> bool:
    return (path / "bin" / "nvcc").is_file() and (path / "include" / "cuda_runtime.h").is_file()


def _toolkit_from_nvcc(nvcc: str) -> Path | None:
    """Ask nvcc where it lives. This sees through wrapper scripts (such as a
    /usr/local/bin/nvcc that execs the real compiler), which make torch guess
    CUDA_HOME=/usr/local and fail at link time."""
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"_HERE_=(\S+)", dry.stdout + dry.stderr)
    return Path(match.group(1)).resolve().parent if match else None


def find_cuda_toolkit() -> Path | None:
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            path = Path(os.environ[variable])
            if _is_toolkit(path):
                return path
            _log(f"ignoring {variable}={path}: no bin/nvcc and include/cuda_runtime.h there")
    candidates: list[Path] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        found = _toolkit_from_nvcc(nvcc)
        if found:
            candidates.append(found)
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c.resolve() for c in candidates if _is_toolkit(c)), None)


def pip_cuda_include_dirs() -> list[str]:
    """Headers of the pip-installed CUDA libraries (cusparse.h, cublas_v2.h, ...)
    that ATen's CUDA headers include but a bare toolkit may lack."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    dirs = []
    for root in roots:
        for sub in ("cu13", "cu12"):
            include = Path(root) / sub / "include"
            if include.is_dir():
                dirs.append(str(include))
    return dirs


def build_plan() -> tuple[bool, str]:
    """(with_cuda, reason) decided before torch.utils.cpp_extension is imported,
    because that module reads CUDA_HOME once at import."""
    if os.environ.get("MASKRCNN_OPS_CPU_ONLY", "0") not in ("", "0"):
        return False, "MASKRCNN_OPS_CPU_ONLY is set"
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    toolkit = find_cuda_toolkit()
    if toolkit is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    os.environ["CUDA_HOME"] = str(toolkit)
    return True, f"CUDA toolkit {toolkit}, torch CUDA {torch.version.cuda}"


def extensions():
    with_cuda, reason = build_plan()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("MASKRCNN_OPS_DEBUG", "0") not in ("", "0")
    host_opt = ["-O0", "-g"] if debug else ["-O3"]
    # No contraction of a*b+c into FMAs on either side: the CPU and CUDA kernels
    # share their arithmetic (csrc/common) and must round identically, which
    # is what makes NMS decisions at the threshold equal across devices.
    cxx_flags = host_opt + ["-fopenmp", "-ffp-contract=off"]
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    common = dict(
        name="maskrcnn_ops._C",
        include_dirs=[str(ROOT / "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if not with_cuda:
        _log(f"building CPU-only kernels ({reason})")
        return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)]

    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "torch's default list")
    _log(f"building CPU and CUDA kernels ({reason}; TORCH_CUDA_ARCH_LIST={arch})")
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    nvcc_flags = (["-O0", "-G"] if debug else ["-O3", "-lineinfo"]) + ["--fmad=false"]
    common["include_dirs"] += pip_cuda_include_dirs()
    return [
        CUDAExtension(
            sources=sources,
            define_macros=[("MASKRCNN_OPS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            **common,
        )
    ]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="maskrcnn-ops",
    version="0.1.0",
    description="Hand-written CPU/CUDA kernels for Mask R-CNN's hot operators, as PyTorch operators",
    packages=find_packages(include=["maskrcnn_ops", "maskrcnn_ops.*", "maskrcnn", "maskrcnn.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy"],
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_class()},
    zip_safe=False,
)
