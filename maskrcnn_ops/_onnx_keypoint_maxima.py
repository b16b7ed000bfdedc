"""The ONNX Loop of ``heatmaps_to_keypoints``'s translation (export.py).

An onnxscript script-mode function, kept in its own module for two reasons:
onnxscript compiles it from its source with this module's globals, so its
type annotations must be real names here (export.py postpones annotations),
and importing onnxscript stays out of ``import maskrcnn_ops`` (export.py
imports this module only when it translates).
"""

from typing import Tuple

from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op


@script()
def resized_maxima(heatmaps: FLOAT[...], sides: INT64[...]) -> Tuple[INT64[...], FLOAT[...]]:
    """The per-detection part of heatmaps_to_keypoints as an ONNX Loop over
    the D detections (each one's maps are resized to its own size).

    heatmaps [D, K, H, W] float32 (onnxruntime's Resize has no float64), sides int64 [D, 2] (height,
    width of each detection's resized maps) -> (positions int64 [D, K]: the
    first maximum of each resized map, row-major, NaN the largest; values
    [D, K]: the resized value there).
    """
    channels = op.Shape(heatmaps, start=1, end=2)  # [K]
    flat_shape = op.Concat(channels, op.Constant(value_ints=[-1]), axis=0)
    # Outputs [D, K] filled row by row (ScatterND), so that every
    # iteration's loop-carried values have the same shape.
    detections_keypoints = op.Shape(heatmaps, start=0, end=2)
    positions = op.ConstantOfShape(detections_keypoints, value=[0])  # int64 (the value's type)
    values = op.ConstantOfShape(detections_keypoints)  # float32 zeros
    count = op.Squeeze(op.Shape(heatmaps, start=0, end=1))
    for i in range(count):
        maps = op.Gather(heatmaps, op.Reshape(i, [1]), axis=0)  # [1, K, H, W]
        size = op.Concat(op.Constant(value_ints=[1]), channels, op.Gather(sides, i, axis=0), axis=0)
        # ATen's bicubic with align_corners=False: source (dst + 0.5) * in /
        # out - 0.5 for every size, 1 included ("half_pixel"; onnx's
        # "pytorch_half_pixel" samples 0 for an output of 1), Keys' A = -0.75,
        # taps clamped to the border (exclude_outside=0).
        resized = op.Resize(maps, None, None, size, mode="cubic", cubic_coeff_a=-0.75,
                            coordinate_transformation_mode="half_pixel", exclude_outside=0)
        flat = op.Reshape(resized, flat_shape)  # [K, S]
        # ArgMax gives the first maximum but skips NaN, which torch.argmax
        # counts as the largest: a map with a NaN takes its first NaN.
        nan = op.Cast(op.IsNaN(flat), to=1)  # float32 0 / 1
        first_nan = op.ArgMax(nan, axis=1, keepdims=1, select_last_index=0)
        first_max = op.ArgMax(flat, axis=1, keepdims=1, select_last_index=0)
        has_nan = op.Greater(op.ReduceMax(nan, [1], keepdims=1), op.Constant(value_float=0.0))
        position = op.Where(has_nan, first_nan, first_max)  # [K, 1]
        row = op.Reshape(i, [1, 1])
        positions = op.ScatterND(positions, row, op.Transpose(position, perm=[1, 0]))
        values = op.ScatterND(values, row, op.Transpose(op.GatherElements(flat, position, axis=1), perm=[1, 0]))
    return positions, values
