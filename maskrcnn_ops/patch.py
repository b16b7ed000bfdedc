"""Run torchvision's RoIAlign, MultiScaleRoIAlign and NMS on maskrcnn_ops
kernels, without changing the code that calls them.

``patch_torchvision()`` rebinds four torchvision functions, in every module
that holds them under any name, to thin adapters over our ops:

- ``roi_align`` -> :func:`maskrcnn_ops.roi_align` (bound in
  ``torchvision.ops``, ``torchvision.ops.roi_align``, ``torchvision.ops.poolers``
  and ``torchvision.models.detection.roi_heads``);
- ``nms``, ``batched_nms`` -> :func:`maskrcnn_ops.nms`,
  :func:`maskrcnn_ops.batched_nms` (``torchvision.ops``, ``torchvision.ops.boxes``;
  the detection models call ``box_ops.batched_nms``);
- ``torchvision.ops.poolers._multiscale_roi_align`` (the body of
  ``MultiScaleRoIAlign.forward``) -> :func:`maskrcnn_ops.multi_scale_roi_align`,
  the fused kernel that pools every FPN level in one launch;

and, by default, in loaded modules outside torchvision that imported them
(``detectron2.layers.roi_align`` binds ``roi_align`` that way).

The classes ``torchvision.ops.RoIAlign`` and ``torchvision.ops.MultiScaleRoIAlign``
are deliberately left in place: their ``forward`` looks the functions above
up in their module's globals at each call, so every instance -- built
before, during or after the patch -- runs on our kernels exactly while the
patch is active, and on torchvision's after it. Swapping the classes would
instead leave models built while patched on our classes for good, and would
break torchvision's own ``isinstance(box_roi_pool, MultiScaleRoIAlign)``
checks for poolers built on the other side of the patch.

Inputs our kernels do not take (quantized tensors) go to torchvision's
original functions, so the patched names accept exactly what torchvision's
accept, and answer as they do where torchvision answers before reaching a
kernel: ``batched_nms`` of no boxes returns an empty int64 tensor whatever
the other arguments are, and boxes of the wrong shape for ``roi_align``
raise an AssertionError (our ``BoxesShapeError``, also a ValueError). The
adapters carry torchvision's type annotations and compile with
``torch.jit.script``, so TorchScript code that calls these functions
(torchvision's tests, scripted detection models) compiles while patched.

Usage::

    with maskrcnn_ops.patched_torchvision():
        detections = torchvision_model(images)

    patch = maskrcnn_ops.patch_torchvision()    # idempotent
    ...
    maskrcnn_ops.unpatch_torchvision()          # or patch.undo()
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.jit.annotations import BroadcastingList2

from .nms_ops import batched_nms as _our_batched_nms
from .nms_ops import nms as _our_nms
from .roi_align_ops import boxes_to_rois
from .roi_align_ops import roi_align as _our_roi_align

# The adapters below are written in TorchScript's subset, with torchvision's
# annotations: torch.jit.script compiles them (and torchvision's functions
# they fall back to) wherever it meets them while the patch is active
# (torch.jit.script(torchvision.ops.roi_align), a scripted RoIAlign or
# detection model). A module scripted while patched keeps our kernels after
# the patch is undone. Blocks under ``if not torch.jit.is_scripting()`` are
# left out of the compiled code.


def _stands_in_for(original: Callable) -> Callable:
    """Decorator: the adapter takes torchvision's name and docstring (its
    signature is written out the same: tests compare them), and keeps its own
    module, so tracebacks and ``repr`` say where it lives. No ``__wrapped__``:
    tools that follow it (TorchScript) would mix the two functions up."""

    def decorate(adapter: Callable) -> Callable:
        adapter.__name__ = original.__name__
        adapter.__qualname__ = original.__qualname__
        adapter.__doc__ = original.__doc__
        return adapter

    return decorate


def _adapt_roi_align(original: Callable) -> Callable:
    @_stands_in_for(original)
    def roi_align(
        input: Tensor,
        boxes: Union[Tensor, List[Tensor]],
        output_size: BroadcastingList2[int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = False,
    ) -> Tensor:
        # Quantized features run on torchvision's quantized kernel (we have none).
        if input.is_quantized:
            return original(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
        # Boxes of the wrong shape raise BoxesShapeError: an AssertionError, as torchvision's.
        return _our_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned)

    return roi_align


def _adapt_nms(original: Callable) -> Callable:
    @_stands_in_for(original)
    def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
        if boxes.is_quantized:
            return original(boxes, scores, iou_threshold)
        return _our_nms(boxes, scores, iou_threshold)

    return nms


def _has_no_elements(tensor: Tensor) -> bool:
    """Whether ``tensor`` is empty. Under torch.compile or torch.export a size
    known only at run time (boxes selected by a mask) is taken as nonempty
    rather than guarded on, so the graph does not break there; the op returns
    no indices for no boxes anyway."""
    if not torch.jit.is_scripting():
        return guard_or_false(tensor.numel() == 0)
    return tensor.numel() == 0


def _adapt_batched_nms(original: Callable) -> Callable:
    @_stands_in_for(original)
    def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
        # Like torchvision: no boxes (of any shape, [0] included) keep no
        # indices, whatever the other arguments are (None included, eagerly).
        if _has_no_elements(boxes):
            return torch.empty((0,), dtype=torch.int64, device=boxes.device)
        if boxes.is_quantized:
            return original(boxes, scores, idxs, iou_threshold)
        return _our_batched_nms(boxes, scores, idxs, iou_threshold)

    return batched_nms


def _pyramid_fits(features: List[Tensor], scales: List[float], k_min: int, k_max: int, eps: float) -> bool:
    """Whether the fused multi-level kernel computes what torchvision's
    per-level loop would for a ``LevelMapper(k_min, k_max, eps=eps)``: the
    kernel's level formula is LevelMapper's with eps 1e-6, over a pyramid
    whose scales halve from level to level, starting at level ``k_min``; and
    one feature dtype."""
    if eps != 1e-6 or len(features) == 0:
        return False
    if len(scales) != len(features) or k_max - k_min + 1 != len(features):
        return False
    for level, scale in enumerate(scales):
        if scale != 2.0 ** -(k_min + level):
            return False
    for feature in features:
        if feature.dtype != features[0].dtype or feature.is_quantized:
            return False
    return True


def _adapt_multiscale_roi_align(original: Callable) -> Callable:
    from torchvision.ops.poolers import LevelMapper

    @_stands_in_for(original)
    def _multiscale_roi_align(
        x_filtered: List[Tensor],
        boxes: List[Tensor],
        output_size: List[int],
        sampling_ratio: int,
        scales: Optional[List[float]],
        mapper: Optional[LevelMapper],
    ) -> Tensor:
        if scales is not None and mapper is not None:
            fused = True
            if not torch.jit.is_scripting():
                # A subclass may map levels its own way (TorchScript has no subclasses).
                fused = type(mapper) is LevelMapper
            if fused and _pyramid_fits(x_filtered, scales, mapper.k_min, mapper.k_max, mapper.eps):
                # The op maskrcnn_ops.multi_scale_roi_align calls (its keyword
                # arguments are not TorchScript's), on arguments checked above.
                return torch.ops.maskrcnn_ops.multi_level_roi_align(
                    x_filtered,
                    boxes_to_rois(boxes),
                    scales,
                    output_size[0],
                    output_size[1],
                    sampling_ratio,
                    False,
                    float(mapper.s0),
                    mapper.lvl0,
                )
        # Anything else (a custom level mapper, an odd pyramid) goes through
        # torchvision's per-level loop, whose roi_align is patched too.
        return original(x_filtered, boxes, output_size, sampling_ratio, scales, mapper)

    return _multiscale_roi_align


_ADAPTERS = {
    "roi_align": _adapt_roi_align,
    "nms": _adapt_nms,
    "batched_nms": _adapt_batched_nms,
    "_multiscale_roi_align": _adapt_multiscale_roi_align,
}


def torchvision_originals() -> Dict[str, Callable]:
    """torchvision's functions that the patch replaces, by their name in
    torchvision: ``roi_align``, ``nms``, ``batched_nms`` and
    ``_multiscale_roi_align`` (what ``MultiScaleRoIAlign.forward`` calls)."""
    import torchvision.ops.boxes
    import torchvision.ops.poolers
    import torchvision.ops.roi_align  # noqa: F401  (the module, shadowed in torchvision.ops by the function)

    roi_align_module = sys.modules["torchvision.ops.roi_align"]
    return {
        "roi_align": roi_align_module.roi_align,
        "nms": torchvision.ops.boxes.nms,
        "batched_nms": torchvision.ops.boxes.batched_nms,
        "_multiscale_roi_align": torchvision.ops.poolers._multiscale_roi_align,
    }


def _module_namespaces(only_torchvision: bool) -> Iterator[Tuple[str, dict]]:
    """(name, globals dict) of every loaded module, each dict once."""
    seen = set()
    for name, module in list(sys.modules.items()):
        if not issubclass(type(module), types.ModuleType):  # type(): no attribute hooks run
            continue
        if only_torchvision and name != "torchvision" and not name.startswith("torchvision."):
            continue
        # object.__getattribute__ skips overridden attribute hooks (a lazy
        # module would otherwise be loaded just by being looked at).
        namespace = object.__getattribute__(module, "__dict__")
        if id(namespace) in seen:
            continue
        seen.add(id(namespace))
        yield name, namespace


@dataclass(frozen=True, eq=False)
class Rebinding:
    """One name the patch rebound: ``module.attribute`` held ``original`` and
    now holds ``replacement``."""

    module: str
    attribute: str
    original: Callable
    replacement: Callable
    namespace: dict

    def __repr__(self) -> str:
        return f"Rebinding({self.module}.{self.attribute}: torchvision's {self.original.__name__})"


class TorchvisionPatch:
    """The active patch: what it rebound, and how to undo it."""

    def __init__(self, originals: Dict[str, Callable]) -> None:
        self._originals = dict(originals)
        self._replacements = {name: _ADAPTERS[name](original) for name, original in originals.items()}
        self._rebindings: List[Rebinding] = []
        self.active = False

    @property
    def rebindings(self) -> Tuple[Rebinding, ...]:
        """Every name rebound so far, in the order it was rebound."""
        return tuple(self._rebindings)

    @property
    def replacements(self) -> Dict[str, Callable]:
        """The adapters bound in place of torchvision's functions, by name."""
        return dict(self._replacements)

    def _find(self, value: object, among: Dict[str, Callable]) -> Optional[str]:
        # Identity, not equality: only these very objects are rebound.
        for name, candidate in among.items():
            if value is candidate:
                return name
        return None

    def apply(self, *, beyond_torchvision: bool) -> "TorchvisionPatch":
        """Rebind every loaded module's references to torchvision's functions.

        Calling it again rebinds the references of modules loaded since.
        """
        for module_name, namespace in _module_namespaces(only_torchvision=not beyond_torchvision):
            for attribute, value in list(namespace.items()):
                name = self._find(value, self._originals)
                if name is None:
                    continue
                replacement = self._replacements[name]
                namespace[attribute] = replacement
                self._rebindings.append(Rebinding(module_name, attribute, value, replacement, namespace))
        self.active = True
        return self

    def undo(self) -> None:
        """Put torchvision's functions back where they were, and in modules
        that imported the adapters while the patch was active (they imported
        them from torchvision). A name that someone else rebound meanwhile is
        left as they set it. Undoing twice does nothing."""
        global _active_patch
        with _lock:
            if not self.active:
                return
            for rebinding in reversed(self._rebindings):
                if rebinding.namespace.get(rebinding.attribute) is rebinding.replacement:
                    rebinding.namespace[rebinding.attribute] = rebinding.original
            for _, namespace in _module_namespaces(only_torchvision=False):
                for attribute, value in list(namespace.items()):
                    name = self._find(value, self._replacements)
                    if name is not None:
                        namespace[attribute] = self._originals[name]
            self._rebindings.clear()
            self.active = False
            if _active_patch is self:
                _active_patch = None


_lock = threading.RLock()
_active_patch: Optional[TorchvisionPatch] = None


def patch_torchvision(*, beyond_torchvision: bool = True) -> TorchvisionPatch:
    """Make torchvision's ``roi_align``, ``RoIAlign``, ``nms``, ``batched_nms``
    and ``MultiScaleRoIAlign`` run on maskrcnn_ops kernels.

    Torchvision's detection models (Faster, Mask and Keypoint R-CNN, RetinaNet,
    FCOS, SSD), and code that calls torchvision's ops (detectron2's
    ``ROIAlign`` and ``batched_nms``), use our kernels unchanged, including
    models built before the call.

    Args:
        beyond_torchvision: also rebind the names in loaded modules outside
            torchvision that imported them (``from torchvision.ops import
            roi_align``, as ``detectron2.layers.roi_align`` does). With False
            only torchvision's own modules are patched.

    Returns:
        The active :class:`TorchvisionPatch`. Idempotent: while a patch is
        active, calling again returns it, after rebinding the references of
        modules imported since.
    """
    global _active_patch
    with _lock:
        if _active_patch is None:
            _active_patch = TorchvisionPatch(torchvision_originals())
        return _active_patch.apply(beyond_torchvision=beyond_torchvision)


def unpatch_torchvision() -> None:
    """Undo :func:`patch_torchvision` (restores every rebound name to the
    identical original object). Does nothing when no patch is active."""
    with _lock:
        patch = _active_patch
    if patch is not None:
        patch.undo()


def torchvision_is_patched() -> bool:
    """Whether :func:`patch_torchvision` is in effect."""
    return _active_patch is not None


@contextlib.contextmanager
def patched_torchvision(*, beyond_torchvision: bool = True) -> Iterator[TorchvisionPatch]:
    """Context manager: torchvision runs on maskrcnn_ops kernels inside the
    block. A patch that was already active on entry stays active on exit."""
    already_active = torchvision_is_patched()
    patch = patch_torchvision(beyond_torchvision=beyond_torchvision)
    try:
        yield patch
    finally:
        if not already_active:
            patch.undo()
