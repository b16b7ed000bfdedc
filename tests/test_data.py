"""Tests of maskrcnn.data: the synthetic shapes dataset, the COCO reader and
writer, batching, flipping and target validation.

The COCO reader is checked on a small hand-made instances file with every
segmentation form (polygons, uncompressed and compressed RLE), a crowd
annotation, an image without annotations, a zero-width box and a box that
leaves the image, and on corrupt files; the writer by a round trip of the
shapes dataset through it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torch.testing import assert_close
from torch.utils.data import DataLoader

from maskrcnn.data import (
    SHAPE_CLASS_NAMES,
    CocoDataset,
    CocoFormatError,
    RandomHorizontalFlip,
    ShapesDataset,
    boxes_from_masks,
    collate,
    decode_segmentation,
    horizontal_flip,
    mask_to_rle,
    validate_target,
    write_coco_folder,
)
from maskrcnn.data.shapes import CIRCLE, SQUARE, TRIANGLE, _inside_shape, _pixel_centres

# ---------------------------------------------------------------- shapes


def test_shapes_samples_have_the_documented_format():
    dataset = ShapesDataset(12, image_size=(96, 128), seed=5)
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape == (3, 96, 128) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        count = len(target["labels"])
        assert count >= 1
        assert target["boxes"].shape == (count, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].dtype == torch.int64 and set(target["labels"].tolist()) <= {1, 2, 3}
        assert target["masks"].shape == (count, 96, 128) and target["masks"].dtype == torch.uint8
        assert target["image_id"] == index
        assert_close(target["area"], target["masks"].flatten(1).sum(1).float())
        assert torch.equal(target["iscrowd"], torch.zeros(count, dtype=torch.int64))
        validate_target(target, image_size=(96, 128), num_classes=len(SHAPE_CLASS_NAMES))


def test_shapes_masks_are_occluded_tight_and_large_enough():
    dataset = ShapesDataset(30, image_size=128, seed=1, min_shapes=3, max_shapes=6, min_visible_pixels=40)
    occluded_somewhere = False
    for index in range(len(dataset)):
        _, target = dataset[index]
        masks = target["masks"]
        assert int(masks.sum(0).max()) <= 1  # visible parts never overlap
        assert int(masks.flatten(1).sum(1).min()) >= 40
        boxes = target["boxes"]
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            # Tight, x2/y2 exclusive: the mask touches every side of its box.
            inside = mask[y1:y2, x1:x2]
            assert int(mask.sum()) == int(inside.sum())
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        # A visible mask much smaller than its box's fill says it was occluded.
        box_areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        occluded_somewhere |= bool((target["area"] < 0.4 * box_areas).any())
    assert occluded_somewhere


def test_shapes_are_deterministic_in_any_order_and_seed_dependent():
    first = ShapesDataset(8, image_size=64, seed=11)
    second = ShapesDataset(8, image_size=64, seed=11)
    forward = [first[i] for i in range(8)]
    for i in reversed(range(8)):
        image, target = second[i]
        assert torch.equal(image, forward[i][0])
        assert torch.equal(target["masks"], forward[i][1]["masks"])
        assert torch.equal(target["boxes"], forward[i][1]["boxes"])
    other_seed = ShapesDataset(8, image_size=64, seed=12)
    assert not torch.equal(other_seed[0][0], forward[0][0])
    assert not torch.equal(first[1][0], forward[0][0])


def test_shapes_are_the_same_from_dataloader_workers():
    dataset = ShapesDataset(6, image_size=48, seed=4)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate)
    images = [image for batch_images, _ in loader for image in batch_images]
    for index, image in enumerate(images):
        assert torch.equal(image, dataset[index][0])


def test_shapes_cover_every_class_and_vary():
    dataset = ShapesDataset(40, image_size=64, seed=0)
    labels = torch.cat([dataset[i][1]["labels"] for i in range(40)])
    assert set(labels.tolist()) == {CIRCLE, SQUARE, TRIANGLE}
    counts = {len(dataset[i][1]["labels"]) for i in range(40)}
    assert len(counts) >= 3


@pytest.mark.parametrize(
    "kind, area_over_radius_squared",
    [(CIRCLE, math.pi), (SQUARE, 2.0), (TRIANGLE, 3 * math.sqrt(3) / 4)],
    ids=["circle", "square", "triangle"],
)
def test_shape_rasterization_has_the_right_area(kind, area_over_radius_squared):
    radius = 40.0
    xs, ys = _pixel_centres((0, 0, 120, 120))
    for angle in (0.0, 0.4, 2.0):
        inside = _inside_shape(kind, 60.0, 60.0, radius, angle, xs, ys)
        expected = area_over_radius_squared * radius**2
        assert abs(int(inside.sum()) - expected) < 0.03 * expected  # edge pixels: ~perimeter / radius^2


def test_shapes_rejects_bad_arguments():
    with pytest.raises(ValueError, match="min_shapes <= max_shapes"):
        ShapesDataset(3, min_shapes=4, max_shapes=2)
    with pytest.raises(ValueError, match="at least 16x16"):
        ShapesDataset(3, image_size=8)
    with pytest.raises(IndexError, match="out of range"):
        ShapesDataset(3, image_size=32)[3]


def test_boxes_from_masks_exclusive_corners_and_empty_mask():
    masks = np.zeros((2, 10, 12), dtype=np.uint8)
    masks[0, 2:5, 3:9] = 1
    assert boxes_from_masks(masks).tolist() == [[3.0, 2.0, 9.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


# ---------------------------------------------------------------- COCO reader


def rectangle_mask(height, width, x1, y1, x2, y2):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels,
    starting with a run of zeros."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


@pytest.fixture
def coco_folder(tmp_path):
    """A hand-made COCO folder: image 10 (40x50) with a polygon, an
    uncompressed RLE, a compressed RLE, a crowd region and a box leaving the
    image; image 20 (30x30) without annotations; image 30 (20x20) with a
    zero-width box. Categories 3 "cat" and 7 "dog" (not contiguous)."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    sizes = {10: (40, 50), 20: (30, 30), 30: (20, 20)}
    for image_id, (height, width) in sizes.items():
        pixels = np.full((height, width, 3), image_id, dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / f"{image_id}.png")
    rle_mask = rectangle_mask(40, 50, 20, 5, 30, 25)
    compressed = coco_mask.encode(np.asfortranarray(rectangle_mask(40, 50, 35, 30, 50, 40)))
    annotations = [
        # A polygon: the rectangle x in [2, 12], y in [3, 13].
        {"id": 1, "image_id": 10, "category_id": 3, "bbox": [2, 3, 10, 10], "area": 100.0, "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]]},
        {"id": 2, "image_id": 10, "category_id": 7, "bbox": [20, 5, 10, 20], "area": 200.0, "iscrowd": 0,
         "segmentation": uncompressed_rle(rle_mask)},
        # The box runs past the right edge (50): clamped to 50.
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [35, 30, 20, 10], "area": 150.0, "iscrowd": 0,
         "segmentation": {"size": [40, 50], "counts": compressed["counts"].decode("ascii")}},
        {"id": 4, "image_id": 10, "category_id": 7, "bbox": [0, 0, 50, 40], "area": 2000.0, "iscrowd": 1,
         "segmentation": uncompressed_rle(rectangle_mask(40, 50, 0, 0, 50, 40))},
        {"id": 5, "image_id": 30, "category_id": 7, "bbox": [5, 5, 0, 8], "area": 0.0, "iscrowd": 0,
         "segmentation": [[5, 5, 5, 13, 5, 9]]},
    ]  # fmt: skip
    data = {
        "images": [
            {"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w}
            for image_id, (h, w) in sizes.items()
        ],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    }
    annotations_file = tmp_path / "instances.json"
    annotations_file.write_text(json.dumps(data))
    return images_dir, annotations_file, data


def test_coco_reader_decodes_every_segmentation_form(coco_folder):
    images_dir, annotations_file, _ = coco_folder
    dataset = CocoDataset(images_dir, annotations_file)
    assert len(dataset) == 3 and dataset.image_ids == [10, 20, 30]
    assert dataset.class_names == ["__background__", "cat", "dog"]
    assert dataset.label_to_category_id == {1: 3, 2: 7}

    image, target = dataset[0]
    assert image.shape == (3, 40, 50)
    assert_close(image, torch.full((3, 40, 50), 10 / 255))
    assert target["image_id"] == 10
    assert target["labels"].tolist() == [1, 2, 1]  # the crowd region (id 4) is left out
    assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 13], [20, 5, 30, 25], [35, 30, 50, 40]]))
    assert_close(target["area"], torch.tensor([100.0, 200.0, 150.0]))
    assert torch.equal(target["iscrowd"], torch.zeros(3, dtype=torch.int64))
    masks = target["masks"]
    assert masks.shape == (3, 40, 50) and masks.dtype == torch.uint8
    # pycocotools rasterizes the polygon's outline inclusively: the mask covers
    # the rectangle, give or take its boundary row and column.
    polygon = rectangle_mask(40, 50, 2, 3, 12, 13)
    assert int((masks[0].numpy() != polygon).sum()) <= 21
    assert np.array_equal(masks[1].numpy(), rectangle_mask(40, 50, 20, 5, 30, 25))
    assert np.array_equal(masks[2].numpy(), rectangle_mask(40, 50, 35, 30, 50, 40))
    validate_target(target, image_size=(40, 50), num_classes=dataset.num_classes)


def test_coco_reader_empty_image_and_degenerate_box(coco_folder):
    images_dir, annotations_file, _ = coco_folder
    dataset = CocoDataset(images_dir, annotations_file)
    for index, (height, width) in ((1, (30, 30)), (2, (20, 20))):  # no annotation; only a zero-width box
        image, target = dataset[index]
        assert image.shape == (3, height, width)
        assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
        assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
        assert target["masks"].shape == (0, height, width) and target["masks"].dtype == torch.uint8
        assert target["area"].shape == (0,) and target["iscrowd"].shape == (0,)
        validate_target(target, image_size=(height, width), num_classes=dataset.num_classes)


def test_coco_reader_keeps_coco_category_ids_when_asked(coco_folder):
    images_dir, annotations_file, _ = coco_folder
    dataset = CocoDataset(images_dir, annotations_file, contiguous_labels=False)
    assert dataset.class_names == ["__background__", "N/A", "N/A", "cat", "N/A", "N/A", "N/A", "dog"]
    assert dataset.num_classes == 8
    assert dataset.label_to_category_id == {3: 3, 7: 7}
    assert dataset[0][1]["labels"].tolist() == [3, 7, 3]


def test_coco_reader_exposes_the_full_ground_truth(coco_folder):
    images_dir, annotations_file, _ = coco_folder
    coco = CocoDataset(images_dir, annotations_file).coco
    assert sorted(coco.getImgIds()) == [10, 20, 30]
    assert len(coco.getAnnIds(imgIds=[10], iscrowd=None)) == 4  # crowd included for evaluation


def test_coco_reader_applies_the_transform(coco_folder):
    images_dir, annotations_file, _ = coco_folder
    dataset = CocoDataset(images_dir, annotations_file, transform=RandomHorizontalFlip(1.0))
    _, target = dataset[0]
    assert_close(target["boxes"][1], torch.tensor([20.0, 5, 30, 25]))  # 50 - 30, 50 - 20
    assert_close(target["boxes"][2], torch.tensor([0.0, 30, 15, 40]))


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def broken(data, change):
    """A deep copy of ``data`` with ``change`` applied to it."""
    copy = json.loads(json.dumps(data))
    change(copy)
    return copy


BAD_FILES = [
    ("missing annotations", lambda d: d.pop("annotations"), r"'annotations' must be a list, but it is missing"),
    ("images not a list", lambda d: d.update(images={}), r"'images' must be a list, but it is a dict"),
    ("image without size", lambda d: d["images"][0].pop("height"), r"images\[0\]: 'height' must be an integer > 0"),
    ("duplicate image", lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id 10"),
    ("missing image id", lambda d: d["annotations"][0].update(image_id=99),
     r"annotations\[0\] \(id 1\): 'image_id' 99 is not the id of any entry in 'images'"),
    ("unknown category", lambda d: d["annotations"][1].update(category_id=5),
     r"annotations\[1\] \(id 2\): 'category_id' 5 is not the id"),
    ("bbox of 3", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"'bbox' must be \[x, y, width, height\]"),
    ("bbox with text", lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4]), r"'bbox' must be"),
    ("negative width", lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "width, height >= 0"),
    ("odd polygon", lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3, 4, 5, 6, 7]]), "at least 3 points"),
    ("rle of wrong size", lambda d: d["annotations"][1]["segmentation"].update(size=[10, 10]),
     r"RLE size \[10, 10\] differs from its image's \[height, width\] = \[40, 50\]"),
    ("rle counts short", lambda d: d["annotations"][1]["segmentation"]["counts"].pop(),
     "summing to 40 \\* 50 pixels"),
    ("no segmentation", lambda d: d["annotations"][0].pop("segmentation"), "'segmentation' is missing"),
    ("iscrowd 2", lambda d: d["annotations"][0].update(iscrowd=2), "'iscrowd' must be 0 or 1"),
    ("category 0", lambda d: d["categories"][0].update(id=0), r"integer >= 1 \(0 is the background\)"),
]  # fmt: skip


@pytest.mark.parametrize("change, message", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_coco_reader_rejects_invalid_files_clearly(coco_folder, tmp_path, change, message):
    images_dir, _, data = coco_folder
    bad_file = write_json(tmp_path / "bad.json", broken(data, change))
    with pytest.raises(CocoFormatError, match=message):
        CocoDataset(images_dir, bad_file)


def test_coco_reader_rejects_corrupt_and_missing_files(coco_folder, tmp_path):
    images_dir, annotations_file, _ = coco_folder
    truncated = tmp_path / "truncated.json"
    truncated.write_text(annotations_file.read_text()[:-40])
    with pytest.raises(CocoFormatError, match=r"truncated.json: not valid JSON \(line 1, column \d+"):
        CocoDataset(images_dir, truncated)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CocoFormatError, match="not a UTF-8 text file"):
        CocoDataset(images_dir, binary)
    with pytest.raises(CocoFormatError, match="top level: must be a JSON object, got list"):
        CocoDataset(images_dir, write_json(tmp_path / "list.json", []))
    with pytest.raises(FileNotFoundError, match="annotations file not found"):
        CocoDataset(images_dir, tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        CocoDataset(tmp_path / "no_images", annotations_file)


def test_coco_reader_checks_image_files_up_front(coco_folder):
    images_dir, annotations_file, _ = coco_folder
    (images_dir / "20.png").unlink()
    Image.fromarray(np.zeros((21, 20, 3), dtype=np.uint8)).save(images_dir / "30.png")
    with pytest.raises(ValueError, match=r"2 image file\(s\) do not match.*20.png: missing.*30.png: 21x20 pixels"):
        CocoDataset(images_dir, annotations_file)
    # Without the up-front check, the bad image fails when read, with its name.
    dataset = CocoDataset(images_dir, annotations_file, check_images=False)
    assert dataset[0][0].shape == (3, 40, 50)
    with pytest.raises(FileNotFoundError, match="20.png"):
        dataset[1]
    with pytest.raises(ValueError, match="30.png is 21x20 pixels"):
        dataset[2]


# ---------------------------------------------------------------- COCO writer


def test_shapes_round_trip_through_a_coco_folder(tmp_path):
    shapes = ShapesDataset(5, image_size=(48, 64), seed=7)
    images_dir, annotations_file = write_coco_folder(shapes, tmp_path)
    coco = CocoDataset(images_dir, annotations_file)
    assert coco.class_names == list(SHAPE_CLASS_NAMES)
    assert coco.label_to_category_id == {1: 1, 2: 2, 3: 3}
    for index in range(len(shapes)):
        image, target = shapes[index]
        read_image, read_target = coco[index]
        assert_close(read_image, image, atol=0.5 / 255 + 1e-6, rtol=0)  # 8-bit PNG
        for key in ("boxes", "labels", "masks", "area", "iscrowd"):
            assert torch.equal(read_target[key], target[key]), key
        assert read_target["image_id"] == target["image_id"]


def test_mask_to_rle_decodes_back():
    mask = torch.rand(13, 17) > 0.5
    rle = mask_to_rle(mask)
    assert rle["size"] == [13, 17] and isinstance(rle["counts"], str)
    assert np.array_equal(decode_segmentation(rle, 13, 17), mask.numpy().astype(np.uint8))


# ---------------------------------------------------------------- flip, collate


def test_horizontal_flip_keeps_boxes_tight_and_is_an_involution():
    image, target = ShapesDataset(1, image_size=(40, 56), seed=2)[0]
    flipped_image, flipped = horizontal_flip(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    assert_close(flipped["boxes"], torch.from_numpy(boxes_from_masks(flipped["masks"].numpy())))
    assert torch.equal(flipped["labels"], target["labels"])
    back_image, back = horizontal_flip(flipped_image, flipped)
    assert torch.equal(back_image, image) and torch.equal(back["boxes"], target["boxes"])
    assert target["boxes"] is not flipped["boxes"]  # the input target is left as it was


def test_random_horizontal_flip_probability_and_generator():
    image, target = ShapesDataset(1, image_size=32, seed=3)[0]
    assert RandomHorizontalFlip(0.0)(image, target)[0] is image
    assert torch.equal(RandomHorizontalFlip(1.0)(image, target)[0], image.flip(-1))

    def decisions(seed):
        flip = RandomHorizontalFlip(0.5, generator=torch.Generator().manual_seed(seed))
        return [not torch.equal(flip(image, target)[0], image) for _ in range(40)]

    assert decisions(1) == decisions(1)
    assert 5 < sum(decisions(1)) < 35
    with pytest.raises(ValueError, match="probability"):
        RandomHorizontalFlip(1.5)


def test_collate_keeps_lists():
    dataset = ShapesDataset(3, image_size=(32, 40), seed=0)
    images, targets = collate([dataset[0], dataset[1], dataset[2]])
    assert len(images) == 3 and len(targets) == 3
    assert torch.equal(images[2], dataset[2][0]) and targets[1]["image_id"] == 1


# ---------------------------------------------------------------- validate_target


def good_target():
    masks = torch.zeros(2, 20, 30, dtype=torch.uint8)
    masks[0, 2:8, 3:9] = 1
    masks[1, 10:15, 5:25] = 1
    return {"boxes": torch.tensor([[3.0, 2, 9, 8], [5, 10, 25, 15]]), "labels": torch.tensor([1, 2]), "masks": masks}


def with_entry(**entries):
    target = good_target()
    target.update(entries)
    return target


BAD_TARGETS = [
    ("masks of the wrong size", with_entry(masks=torch.zeros(2, 20, 31, dtype=torch.uint8)),
     r"'masks' must be \[K, H, W\] = \[2, 20, 30\].*got \(2, 20, 31\)"),
    ("one mask short", with_entry(masks=torch.zeros(1, 20, 30, dtype=torch.uint8)), r"got \(1, 20, 30\)"),
    ("float masks", with_entry(masks=torch.zeros(2, 20, 30)), "'masks' must be uint8 or bool"),
    ("boxes of 5", with_entry(boxes=torch.zeros(2, 5)), r"'boxes' must be \[K, 4\], got shape \(2, 5\)"),
    ("integer boxes", with_entry(boxes=torch.tensor([[3, 2, 9, 8], [5, 10, 25, 15]])), "floating tensor"),
    ("label 0", with_entry(labels=torch.tensor([0, 2])), r"labels must lie in \[1, 4\).*\[0, 2\]"),
    ("label too large", with_entry(labels=torch.tensor([1, 4])), r"got values in \[1, 4\]"),
    ("float labels", with_entry(labels=torch.tensor([1.0, 2.0])), "'labels' must be an integer tensor"),
    ("labels short", with_entry(labels=torch.tensor([1])), r"integer tensor \[K\] = \[2\]"),
    ("NaN box", with_entry(boxes=torch.tensor([[3.0, 2, 9, 8], [5, float("nan"), 25, 15]])),
     r"boxes\[1\] = \[5.0, nan, 25.0, 15.0\] is not finite"),
    ("zero width", with_entry(boxes=torch.tensor([[3.0, 2, 3, 8], [5, 10, 25, 15]])),
     r"boxes\[0\] = \[3.0, 2.0, 3.0, 8.0\] has zero or negative width"),
    ("no masks", {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}, "missing 'masks'"),
    ("boxes a list", with_entry(boxes=[[3.0, 2, 9, 8]]), "'boxes' must be a Tensor, got list"),
]  # fmt: skip


@pytest.mark.parametrize("target, message", [b[1:] for b in BAD_TARGETS], ids=[b[0] for b in BAD_TARGETS])
def test_validate_target_rejects_bad_targets_clearly(target, message):
    with pytest.raises(ValueError, match=message):
        validate_target(target, image_size=(20, 30), num_classes=4)


def test_validate_target_accepts_good_and_empty_targets():
    validate_target(good_target(), image_size=(20, 30), num_classes=4)
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, 20, 30, dtype=torch.uint8),
    }
    validate_target(empty, image_size=(20, 30), num_classes=4)
    validate_target({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
                    image_size=(20, 30), require_masks=False)  # fmt: skip
