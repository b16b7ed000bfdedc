"""Layout policy of the kernels, mirrored from csrc/common/roi_align_checks.h."""

from __future__ import annotations

import torch


def use_channels_last(tensor: torch.Tensor) -> bool:
    """True when the kernels process `tensor` as NHWC without a copy (and give
    channels_last results); false means NCHW."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def memory_format_of(tensor: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if use_channels_last(tensor) else torch.contiguous_format
