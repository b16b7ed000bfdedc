"""maskrcnn_ops: hand-written CPU and CUDA kernels for Mask R-CNN's hot operators.

The operators are registered with the PyTorch dispatcher under
``torch.ops.maskrcnn_ops`` (so they work with autograd, ``torch.compile``,
autocast and ``torch.library.opcheck``); this package adds typed wrappers
with torchvision's signatures.
"""

from __future__ import annotations

import torch


def _load_extension():
    """Import the compiled kernels, or fail with the reason and the fix."""
    try:
        from . import _C
    except ImportError as error:
        text = str(error)
        if "undefined symbol" in text or "version" in text.lower():
            cause = (
                f"it was most likely built against a different torch than the one "
                f"installed ({torch.__version__})"
            )
        elif "No module named" in text or "cannot import name" in text:
            cause = "the extension has not been built"
        else:
            cause = "the shared library failed to load"
        raise ImportError(
            f"maskrcnn_ops could not load its compiled extension maskrcnn_ops._C: {cause}. "
            f"Rebuild it against the installed torch with "
            f"`pip install --no-build-isolation .` (or `-e .`) in the source tree. "
            f"Original error: {text}"
        ) from error

    runtime = torch.__version__.split("+")[0]
    if runtime.split(".")[:2] != _C.built_with_torch.split(".")[:2]:
        raise ImportError(
            f"maskrcnn_ops._C was built against torch {_C.built_with_torch} but torch "
            f"{torch.__version__} is installed; rebuild with "
            f"`pip install --no-build-isolation .` in the source tree."
        )
    return _C


_C = _load_extension()

from . import _autograd, _fake  # noqa: E402,F401  (registrations)
from .anchors import AnchorGenerator  # noqa: E402
from .boxes import (  # noqa: E402
    BoxCoder,
    boxes_large_enough,
    clip_boxes_to_image,
    decode_boxes,
    encode_boxes,
    remove_small_boxes,
)
from .nms_ops import (  # noqa: E402
    NMS_BOXES_PER_CALL,
    batched_nms,
    batched_nms_keep,
    batched_nms_padded,
    image_groups,
    nms,
    nms_keep_rows,
    rank_kept_per_image,
)
from .paste_ops import masks_to_rle, paste_masks  # noqa: E402
from .keypoint_ops import heatmaps_to_keypoints  # noqa: E402
from .soft_nms_ops import batched_soft_nms, soft_nms  # noqa: E402
from .proposals import flatten_rpn_outputs, generate_proposals, generate_proposals_padded  # noqa: E402
from .multiscale import MultiScaleRoIAlign, multi_scale_roi_align  # noqa: E402
from .export import onnx_decompositions, onnx_translation_table  # noqa: E402
from .patch import patch_torchvision, patched_torchvision, torchvision_is_patched, unpatch_torchvision  # noqa: E402
from .roi_align_ops import BoxesShapeError, RoIAlign, roi_align, roi_align_max  # noqa: E402
from .mmcv import MmcvRoIAlign, mmcv_roi_align  # noqa: E402


def build_info() -> dict:
    """How the loaded extension was built and runs: torch version, whether the
    CUDA kernels are compiled in, and which copy of the vectorized CPU kernels
    runs ("baseline", "avx2" or "avx512": ATen's CPU capability, lowered by
    ATEN_CPU_CAPABILITY), and whether bfloat16 RoIAlign uses the CPU's AVX-512
    BF16 instructions (then its results are within one bfloat16 rounding of
    the other copies', not bitwise equal to them)."""
    return {"built_with_torch": _C.built_with_torch, "with_cuda": bool(_C.with_cuda),
            "cpu_kernels": _C.cpu_kernel_isa(), "cpu_bf16_instructions": _C.cpu_bf16_instructions()}


__all__ = [
    "roi_align",
    "RoIAlign",
    "roi_align_max",
    "BoxesShapeError",
    "MmcvRoIAlign",
    "mmcv_roi_align",
    "MultiScaleRoIAlign",
    "multi_scale_roi_align",
    "nms",
    "batched_nms",
    "batched_nms_keep",
    "nms_keep_rows",
    "batched_nms_padded",
    "rank_kept_per_image",
    "image_groups",
    "NMS_BOXES_PER_CALL",
    "soft_nms",
    "batched_soft_nms",
    "BoxCoder",
    "decode_boxes",
    "encode_boxes",
    "clip_boxes_to_image",
    "boxes_large_enough",
    "remove_small_boxes",
    "AnchorGenerator",
    "paste_masks",
    "masks_to_rle",
    "heatmaps_to_keypoints",
    "flatten_rpn_outputs",
    "generate_proposals",
    "generate_proposals_padded",
    "build_info",
    "patch_torchvision",
    "patched_torchvision",
    "unpatch_torchvision",
    "torchvision_is_patched",
    "onnx_translation_table",
    "onnx_decompositions",
]
