"""maskrcnn_ops.masks_to_rle: COCO RLE of pasted masks, byte-identical to
pycocotools.mask.encode of the pasted, binarized masks (paste_masks with
the same threshold, which the window-by-window encoding must reproduce
exactly), without ever forming an H x W mask."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import maskrcnn_ops
from maskrcnn_ops import reference

coco_mask = pytest.importorskip("pycocotools.mask")
ops = torch.ops.maskrcnn_ops


def pycocotools_rles(masks, boxes, size, threshold=0.5):
    """pycocotools.mask.encode of our pasted, binarized masks."""
    pasted = maskrcnn_ops.paste_masks(masks, boxes, size, threshold=threshold).cpu().numpy()
    return coco_mask.encode(np.asfortranarray(pasted.transpose(1, 2, 0).astype(np.uint8)))


def assert_same_rles(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a["size"] == list(b["size"]) and a["counts"] == b["counts"]


def random_boxes(num, height, width, seed):
    from test_paste_ops import make_boxes

    return make_boxes(num, height, width, seed=seed, outside=True)


@pytest.mark.parametrize("size", [(60, 80), (37, 23), (128, 96)])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_random_masks_equal_pycocotools(size, threshold):
    masks = torch.rand(40, 28, 28)
    boxes = random_boxes(40, *size, seed=size[0])
    assert_same_rles(maskrcnn_ops.masks_to_rle(masks, boxes, size, threshold), pycocotools_rles(masks, boxes, size,
                                                                                                 threshold))


def test_boxes_touching_the_borders():
    """Windows starting at row/column 0 and ending at the last one, and the
    whole image, where runs cross from one column to the next."""
    height, width = 50, 40
    boxes = torch.tensor([[0.0, 0, 10, 10], [30, 40, 39, 49], [0, 20, 39, 30], [15, 0, 20, 49], [-5, -5, 45, 55],
                          [0, 0, 39, 49], [39, 49, 39, 49], [0, 49, 39, 49]])
    masks = torch.ones(boxes.size(0), 14, 14)
    assert_same_rles(maskrcnn_ops.masks_to_rle(masks, boxes, (height, width)),
                     pycocotools_rles(masks, boxes, (height, width)))
    masks = torch.rand(boxes.size(0), 14, 14)
    assert_same_rles(maskrcnn_ops.masks_to_rle(masks, boxes, (height, width)),
                     pycocotools_rles(masks, boxes, (height, width)))


def test_empty_and_full_masks():
    """Empty (zero probabilities, boxes outside, NaN boxes) and full masks
    (a box far larger than the image: its padding fades out beyond it)."""
    boxes = torch.tensor([[5.0, 5, 30, 30], [100, 100, 120, 120], [math.nan, 0, 10, 10], [-1e4, -1e4, 1e4, 1e4]])
    masks = torch.stack([torch.zeros(28, 28), torch.ones(28, 28), torch.ones(28, 28), torch.ones(28, 28)])
    ours = maskrcnn_ops.masks_to_rle(masks, boxes, (40, 50))
    assert_same_rles(ours, pycocotools_rles(masks, boxes, (40, 50)))
    assert [r["counts"] for r in ours[:3]] == [coco_mask.encode(np.zeros((40, 50, 1), np.uint8, order="F"))[0]["counts"]] * 3
    assert coco_mask.area(ours[3]) == 40 * 50


@pytest.mark.parametrize("value,expected", [(1.0, b"01"), (0.0, b"1")])
def test_one_pixel_image(value, expected):
    masks = torch.full((1, 28, 28), value)
    ours = maskrcnn_ops.masks_to_rle(masks, torch.tensor([[-3.0, -3, 3, 3]]), (1, 1))
    assert ours == [{"size": [1, 1], "counts": expected}]
    assert_same_rles(ours, pycocotools_rles(masks, torch.tensor([[-3.0, -3, 3, 3]]), (1, 1)))


@pytest.mark.parametrize("size", [(0, 5), (5, 0)])
def test_zero_sized_image(size):
    """pycocotools encodes an empty image as the single count 0 ("0")."""
    ours = maskrcnn_ops.masks_to_rle(torch.rand(2, 28, 28), torch.tensor([[0.0, 0, 3, 3]] * 2), size)
    assert_same_rles(ours, coco_mask.encode(np.zeros((*size, 2), np.uint8, order="F")))


def test_no_masks():
    assert maskrcnn_ops.masks_to_rle(torch.rand(0, 28, 28), torch.zeros(0, 4), (30, 40)) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    """Other dtypes compare the float32 (float64) value, as paste_masks with
    a threshold does."""
    masks, boxes = torch.rand(20, 28, 28).to(dtype), random_boxes(20, 60, 80, seed=9).to(dtype)
    assert_same_rles(maskrcnn_ops.masks_to_rle(masks, boxes, (60, 80)), pycocotools_rles(masks, boxes, (60, 80)))


def test_reference_equals_pycocotools():
    masks, boxes = torch.rand(15, 28, 28), random_boxes(15, 45, 61, seed=4)
    assert_same_rles(reference.masks_to_rle(masks, boxes, (45, 61)), pycocotools_rles(masks, boxes, (45, 61)))


def test_long_runs_and_large_differences():
    """Counts far apart (large positive and negative differences between a
    count and the one two before) exercise the multi-character numbers."""
    boxes = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2000, 3], [1500, 900, 1990, 995], [3, 3, 4, 4]])
    masks = torch.ones(4, 28, 28)
    assert_same_rles(maskrcnn_ops.masks_to_rle(masks, boxes, (1000, 2000)), pycocotools_rles(masks, boxes, (1000, 2000)))


def test_huge_image_needs_no_image_memory():
    """A mask in a 40000 x 60000 image (a bool image would be 2.4 GB): the
    op allocates its encodings alone, and the RLE has the area and bounding
    box of the same mask pasted into a small image."""
    from test_paste_ops import _allocated_bytes

    masks, boxes = torch.rand(2, 28, 28), torch.tensor([[10.0, 20, 60, 45], [35000.0, 100, 35040, 120]])
    allocated, (chars, offsets) = _allocated_bytes(lambda: ops.masks_to_rle(masks, boxes, 40000, 60000, 1, 0.5))
    assert allocated < 64 * 1024, allocated
    rles = maskrcnn_ops.masks_to_rle(masks, boxes, (40000, 60000))
    small = maskrcnn_ops.masks_to_rle(masks[:1], boxes[:1], (100, 100))
    assert coco_mask.area(rles[0]) == coco_mask.area(small[0]) > 0
    assert list(coco_mask.toBbox(rles[0])) == list(coco_mask.toBbox(small[0]))
    shifted = maskrcnn_ops.masks_to_rle(masks[1:], boxes[1:] - torch.tensor([34990.0, 0, 34990, 0]), (200, 100))
    assert coco_mask.area(rles[1]) == coco_mask.area(shifted[0]) > 0


def test_cuda_inputs_are_encoded_on_the_cpu(device):
    masks, boxes = torch.rand(10, 28, 28), random_boxes(10, 60, 80, seed=12)
    assert_same_rles(maskrcnn_ops.masks_to_rle(masks.to(device), boxes.to(device), (60, 80)),
                     pycocotools_rles(masks, boxes, (60, 80)))


@pytest.mark.parametrize(
    "masks,boxes,size,threshold,message",
    [
        (torch.rand(2, 28, 14), torch.zeros(2, 4), (10, 10), 0.5, "square masks"),
        (torch.rand(2, 28, 28), torch.zeros(1, 4), (10, 10), 0.5, r"boxes of shape \[2, 4\]"),
        (torch.ones(2, 28, 28, dtype=torch.int32), torch.zeros(2, 4), (10, 10), 0.5, "dtype float32"),
        (torch.rand(2, 28, 28), torch.zeros(2, 4), (10, -3), 0.5, "non-negative image size"),
        (torch.rand(2, 28, 28), torch.zeros(2, 4), (10, 10), math.nan, "threshold must not be NaN"),
    ],
)
def test_bad_input(masks, boxes, size, threshold, message):
    with pytest.raises(RuntimeError, match=message):
        ops.masks_to_rle(masks, boxes, size[0], size[1], 1, threshold)


def test_opcheck():
    from test_paste_ops import make_boxes

    masks, boxes = torch.rand(6, 14, 14), make_boxes(6, 30, 40, outside=True)
    result = torch.library.opcheck(ops.masks_to_rle.default, (masks, boxes, 30, 40, 1, 0.5))
    assert all(v == "SUCCESS" for v in result.values()), result
