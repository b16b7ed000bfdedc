"""Autograd formulas for the operators.

Differentiable: roi_align and multi_level_roi_align (features; and their
backwards, linear in the gradient, so double backward is exact),
roi_align_max (features, first order) and decode_boxes (deltas, first
order). Not differentiable: encode_boxes (regression targets are constants),
rpn_decode_filter, the NMS and soft-NMS ops (integer or boolean results, or
scores decayed by a discrete choice of boxes), paste_masks and
heatmaps_to_keypoints (inference post-processing); a backward that reaches
encode_boxes, rpn_decode_filter, soft_nms, batched_soft_nms, paste_masks,
heatmaps_to_keypoints, roi_align_max's or decode_boxes' own backward raises a
clear error rather than returning a silent zero.

roi_align is differentiable with respect to its input features (not the
boxes, as in torchvision). Its backward is a linear map of the output
gradient, so the backward op is differentiable too: its gradient is
roi_align applied to the incoming gradient, which gives exact double
backward (the second derivative with respect to the features is zero).
"""

from __future__ import annotations

import torch

_ops = torch.ops.maskrcnn_ops


def _roi_align_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = input.shape
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _roi_align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    batch_size, channels, height, width = ctx.input_shape
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.roi_align_backward(
            grad, rois, spatial_scale, pooled_height, pooled_width,
            batch_size, channels, height, width, sampling_ratio, aligned,
        )
    return grad_input, None, None, None, None, None, None


def _roi_align_backward_setup_context(ctx, inputs, output):
    rois = inputs[1]
    spatial_scale, pooled_height, pooled_width = inputs[2:5]
    sampling_ratio, aligned = inputs[9:11]
    ctx.save_for_backward(rois)
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _roi_align_backward_backward(ctx, grad_grad_input):
    (rois,) = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    grad_grad = None
    if ctx.needs_input_grad[0]:
        grad_grad = _ops.roi_align(
            grad_grad_input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned
        )
    return (grad_grad,) + (None,) * 10




# roi_align_max: each bin's gradient goes to its winning sample (argmax).
def _roi_align_max_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.input_shape = input.shape
    ctx.params = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _roi_align_max_backward(ctx, grad, _grad_argmax):
    rois, argmax = ctx.saved_tensors
    spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.params
    batch_size, channels, height, width = ctx.input_shape
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _ops.roi_align_max_backward(
            grad, rois, argmax, spatial_scale, pooled_height, pooled_width,
            batch_size, channels, height, width, sampling_ratio, aligned,
        )
    return grad_input, None, None, None, None, None, None


# multi_level_roi_align: the same formulas over a list of feature maps.
def _multi_level_setup_context(ctx, inputs, output):
    features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned = inputs[:7]
    canonical_scale, canonical_level = inputs[7:9]
    ctx.save_for_backward(rois)
    ctx.feature_shape = (features[0].shape[0], features[0].shape[1])
    ctx.sizes = ([f.shape[2] for f in features], [f.shape[3] for f in features])
    ctx.params = (spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale, canonical_level)


def _multi_level_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale, canonical_level = ctx.params
    batch_size, channels = ctx.feature_shape
    heights, widths = ctx.sizes
    grad_features = _ops.multi_level_roi_align_backward(
        grad, rois, spatial_scales, pooled_height, pooled_width, batch_size, channels,
        heights, widths, sampling_ratio, aligned, canonical_scale, canonical_level,
    )
    return list(grad_features), None, None, None, None, None, None, None, None


def _multi_level_backward_setup_context(ctx, inputs, output):
    rois, spatial_scales, pooled_height, pooled_width = inputs[1:5]
    sampling_ratio, aligned, canonical_scale, canonical_level = inputs[9:13]
    ctx.save_for_backward(rois)
    ctx.params = (spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale, canonical_level)
    ctx.like = [(o.shape, o.dtype, o.device) for o in output]


def _multi_level_backward_backward(ctx, grad_grad_features):
    (rois,) = ctx.saved_tensors
    spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned, canonical_scale, canonical_level = ctx.params
    grad_grad = None
    if ctx.needs_input_grad[0]:
        # Levels whose gradient was not used come back as None: they add zero.
        features = [
            g if g is not None else torch.zeros(shape, dtype=dtype, device=device)
            for g, (shape, dtype, device) in zip(grad_grad_features, ctx.like)
        ]
        grad_grad = _ops.multi_level_roi_align(
            features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned,
            canonical_scale, canonical_level,
        )
    return (grad_grad,) + (None,) * 12




def _decode_setup_context(ctx, inputs, output):
    deltas, boxes, weights, clip = inputs
    ctx.save_for_backward(deltas, boxes)
    ctx.params = (weights, clip)


def _decode_backward(ctx, grad):
    deltas, boxes = ctx.saved_tensors
    weights, clip = ctx.params
    grad_deltas = None
    if ctx.needs_input_grad[0]:
        grad_deltas = _ops.decode_boxes_backward(grad, deltas, boxes, weights, clip)
    return grad_deltas, None, None, None


def _not_differentiable(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"maskrcnn_ops::{name} is not differentiable")

    def setup_context(ctx, inputs, output):
        pass

    return backward, setup_context


# op name -> (backward, setup_context)
_FORMULAS = {
    "roi_align": (_roi_align_backward, _roi_align_setup_context),
    "roi_align_backward": (_roi_align_backward_backward, _roi_align_backward_setup_context),
    "roi_align_max": (_roi_align_max_backward, _roi_align_max_setup_context),
    "multi_level_roi_align": (_multi_level_backward, _multi_level_setup_context),
    "multi_level_roi_align_backward": (_multi_level_backward_backward, _multi_level_backward_setup_context),
    "decode_boxes": (_decode_backward, _decode_setup_context),
}
# roi_align_max_backward is first order only: its own gradient would need a
# gather at the argmax samples, which no op provides yet.
# paste_masks and heatmaps_to_keypoints are inference ops (the model's output
# stage: an argmax has no useful gradient); soft_nms' decayed
# scores are scores times weights of the boxes' IoUs, but which boxes they
# belong to is a discrete choice: a backward through either raises rather
# than silently returning nothing.
for _name in ("roi_align_max_backward", "decode_boxes_backward", "encode_boxes", "rpn_decode_filter", "paste_masks",
              "heatmaps_to_keypoints", "soft_nms", "batched_soft_nms"):
    _FORMULAS[_name] = _not_differentiable(_name)
for _name, (_backward, _setup) in _FORMULAS.items():
    torch.library.register_autograd(f"maskrcnn_ops::{_name}", _backward, setup_context=_setup)
