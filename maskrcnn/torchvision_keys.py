"""State-dict key names of older torchvision releases.

torchvision's published COCO Mask R-CNN weights (2019) predate the
Conv2dNormActivation blocks, so three groups of keys have older names than
today's model (torchvision renames them on load, and so do we):

    backbone.fpn.inner_blocks.{i}.weight   -> backbone.fpn.inner_blocks.{i}.0.weight   (and layer_blocks)
    rpn.head.conv.weight                   -> rpn.head.conv.0.0.weight
    roi_heads.mask_head.mask_fcn{i}.weight -> roi_heads.mask_head.{i-1}.0.weight

(and the same for ``bias``).
"""

from __future__ import annotations

import re
from typing import MutableMapping

_LEGACY_PATTERNS = (
    (re.compile(r"^backbone\.fpn\.(inner_blocks|layer_blocks)\.(\d+)\.(weight|bias)$"),
     lambda m: f"backbone.fpn.{m[1]}.{m[2]}.0.{m[3]}"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), lambda m: f"rpn.head.conv.0.0.{m[1]}"),
    (re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)$"),
     lambda m: f"roi_heads.mask_head.{int(m[1]) - 1}.0.{m[2]}"),
)


def current_key(key: str) -> str:
    """Today's name of a Mask R-CNN state-dict key (unchanged if not an old name)."""
    for pattern, rename in _LEGACY_PATTERNS:
        match = pattern.match(key)
        if match:
            return rename(match)
    return key


def rename_legacy_keys(state_dict: MutableMapping, prefix: str = "") -> None:
    """Renames old torchvision keys under ``prefix`` in place (a key whose
    new name is already present is left alone)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new_key = prefix + current_key(key[len(prefix):])
        if new_key != key and new_key not in state_dict:
            state_dict[new_key] = state_dict.pop(key)


def rename_legacy_keys_hook(module, state_dict, prefix, *unused) -> None:
    """``register_load_state_dict_pre_hook`` form of :func:`rename_legacy_keys`,
    so that ``model.load_state_dict(old_file, strict=True)`` works."""
    rename_legacy_keys(state_dict, prefix)


__all__ = ["current_key", "rename_legacy_keys", "rename_legacy_keys_hook"]
