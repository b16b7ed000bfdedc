"""COCO person-keypoints files in CocoDataset (maskrcnn/data/coco.py) and
in `train --keypoints --dataset coco`: targets' keypoints [K, J, 3] equal
the file's, annotations without keypoints (another category's) get
unlabeled ones, the names, skeleton and flip permutation come from the
category, bad keypoint fields give one-line errors, and a small keypoint
model trains a few steps on such a file through the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from maskrcnn.checkpoint import load_model
from maskrcnn.cli import main
from maskrcnn.data import (
    SHAPE_KEYPOINT_NAMES,
    SHAPE_SKELETON,
    CocoDataset,
    CocoFormatError,
    RandomHorizontalFlip,
    ShapesDataset,
    flip_keypoints,
    validate_target,
    write_coco_folder,
)
from test_flip_keypoints import COCO_PERSON_KEYPOINT_NAMES

J = len(COCO_PERSON_KEYPOINT_NAMES)
SKELETON = [[16, 14], [14, 12], [6, 7], [1, 2], [1, 3]]  # a few of COCO's edges


def person_keypoints(seed: int, width: int, height: int):
    """COCO's flat [x1, y1, v1, ...] for 17 keypoints, visibilities 0, 1, 2;
    unlabeled ones at a nonzero (x, y), which the reader must zero."""
    rng = np.random.default_rng(seed)
    flat = []
    for j in range(J):
        v = [2, 1, 0][j % 3]
        flat += [round(float(rng.uniform(0, width)), 2), round(float(rng.uniform(0, height)), 2), v]
    return flat


@pytest.fixture
def person_folder(tmp_path):
    """Image 1 (48x64): two people with keypoints, a crowd of people, a
    person without a 'keypoints' entry and a dog (a category without
    keypoint names); image 2 (40x40): one person; image 3 (32x48): none."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    sizes = {1: (48, 64), 2: (40, 40), 3: (32, 48)}
    rng = np.random.default_rng(0)
    for image_id, (height, width) in sizes.items():
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images_dir / f"{image_id}.png")

    def annotation(ann_id, image_id, category_id, box, *, keypoints=None, crowd=0):
        x, y, w, h = box
        record = {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": box, "iscrowd": crowd,
                  "area": float(w * h), "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}
        if keypoints is not None:
            record["keypoints"] = keypoints
            record["num_keypoints"] = sum(1 for v in keypoints[2::3] if v > 0)
        return record

    annotations = [
        annotation(1, 1, 1, [2, 3, 30, 40], keypoints=person_keypoints(1, 64, 48)),
        annotation(2, 1, 1, [30, 5, 30, 40], keypoints=person_keypoints(2, 64, 48)),
        annotation(3, 1, 1, [0, 0, 64, 48], keypoints=person_keypoints(3, 64, 48), crowd=1),
        annotation(4, 1, 1, [10, 10, 20, 20]),
        annotation(5, 1, 2, [40, 30, 20, 15]),
        annotation(6, 2, 1, [5, 5, 30, 30], keypoints=person_keypoints(6, 40, 40)),
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in sizes.items()],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "person", "keypoints": list(COCO_PERSON_KEYPOINT_NAMES),
                        "skeleton": SKELETON},
                       {"id": 2, "name": "dog"}],
    }
    annotations_file = tmp_path / "person_keypoints.json"
    annotations_file.write_text(json.dumps(data))
    return images_dir, annotations_file, data


def expected_keypoints(flat) -> torch.Tensor:
    keypoints = torch.tensor(flat, dtype=torch.float32).reshape(J, 3)
    return keypoints * (keypoints[:, 2:] > 0)


def test_targets_have_the_files_keypoints(person_folder):
    images_dir, annotations_file, data = person_folder
    dataset = CocoDataset(images_dir, annotations_file)
    assert dataset.keypoint_names == COCO_PERSON_KEYPOINT_NAMES
    assert dataset.skeleton == tuple(tuple(edge) for edge in SKELETON)
    assert dataset.keypoint_flip_permutation == [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
    by_id = {a["id"]: a for a in data["annotations"]}

    _, target = dataset[0]  # the crowd (id 3) is left out; ids 1, 2, 4, 5 in the file's order
    keypoints = target["keypoints"]
    assert keypoints.shape == (4, J, 3) and keypoints.dtype == torch.float32
    assert torch.equal(keypoints[0], expected_keypoints(by_id[1]["keypoints"]))
    assert torch.equal(keypoints[1], expected_keypoints(by_id[2]["keypoints"]))
    assert torch.equal(keypoints[2:], torch.zeros(2, J, 3))  # a person without keypoints, a dog
    assert set(keypoints[..., 2].unique().tolist()) == {0.0, 1.0, 2.0}  # v kept as 0 / 1 / 2
    validate_target(target, image_size=(48, 64), num_classes=dataset.num_classes, num_keypoints=J)

    _, target = dataset[1]
    assert torch.equal(target["keypoints"], expected_keypoints(by_id[6]["keypoints"])[None])
    _, target = dataset[2]
    assert target["keypoints"].shape == (0, J, 3)


def test_files_without_keypoint_names_have_no_keypoints(person_folder, tmp_path):
    images_dir, _, data = person_folder
    for category in data["categories"]:
        category.pop("keypoints", None)
        category.pop("skeleton", None)
    for annotation in data["annotations"]:
        annotation.pop("keypoints", None)
        annotation.pop("num_keypoints", None)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(data))
    dataset = CocoDataset(images_dir, plain)
    assert dataset.keypoint_names is None and dataset.skeleton == () and dataset.keypoint_flip_permutation is None
    assert "keypoints" not in dataset[0][1]


def test_flip_transform_flips_the_files_keypoints(person_folder):
    images_dir, annotations_file, _ = person_folder
    plain = CocoDataset(images_dir, annotations_file)
    flip = RandomHorizontalFlip(1.0, keypoint_permutation=plain.keypoint_flip_permutation)
    flipped = CocoDataset(images_dir, annotations_file, transform=flip)
    image, target = plain[0]
    flipped_image, flipped_target = flipped[0]
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.equal(flipped_target["keypoints"],
                       flip_keypoints(target["keypoints"], 64, plain.keypoint_flip_permutation))


def change_and_write(data, tmp_path, change):
    copy = json.loads(json.dumps(data))
    change(copy)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(copy))
    return path


def second_person_category(data):
    data["categories"].append({"id": 3, "name": "child", "keypoints": list(COCO_PERSON_KEYPOINT_NAMES[:5])})


BAD_KEYPOINT_FIELDS = [
    ("short keypoints", lambda d: d["annotations"][0]["keypoints"].pop(), r"must be \[x, y, v\] \* 17 = 51"),
    ("text in keypoints", lambda d: d["annotations"][0]["keypoints"].__setitem__(0, "3"), "finite numbers"),
    ("visibility 3", lambda d: d["annotations"][0]["keypoints"].__setitem__(2, 3), "must be 0, 1 or 2, got"),
    ("num_keypoints off", lambda d: d["annotations"][0].update(num_keypoints=1), "'num_keypoints' 1 !="),
    ("keypoints on a dog", lambda d: d["annotations"][4].update(keypoints=[0, 0, 0]),
     r"annotations\[4\] \(id 5\): has 'keypoints' but its category lists no keypoint names"),
    ("duplicate names", lambda d: d["categories"][0]["keypoints"].__setitem__(1, "nose"), "distinct names"),
    ("skeleton out of range", lambda d: d["categories"][0]["skeleton"].append([1, 18]), r"numbers in 1\.\.17"),
    ("two keypoint lists", second_person_category,
     "categories 1 and 3 name different keypoints .* one list for every class"),
]  # fmt: skip


@pytest.mark.parametrize("change, message", [b[1:] for b in BAD_KEYPOINT_FIELDS],
                         ids=[b[0] for b in BAD_KEYPOINT_FIELDS])
def test_bad_keypoint_fields_give_one_line_errors(person_folder, tmp_path, change, message):
    images_dir, _, data = person_folder
    bad = change_and_write(data, tmp_path, change)
    with pytest.raises(CocoFormatError, match=message) as error:
        CocoDataset(images_dir, bad)
    assert "\n" not in str(error.value) and str(bad) in str(error.value)


def test_unpaired_side_names_fail_at_the_flip_permutation(person_folder, tmp_path):
    images_dir, _, data = person_folder
    bad = change_and_write(data, tmp_path, lambda d: d["categories"][0]["keypoints"].__setitem__(2, "eye_r"))
    dataset = CocoDataset(images_dir, bad)  # reading needs no permutation
    assert dataset[0][1]["keypoints"].shape == (4, J, 3)
    with pytest.raises(ValueError, match="'left_eye' has no mirror keypoint 'right_eye'"):
        dataset.keypoint_flip_permutation


def test_shapes_keypoints_round_trip_through_a_coco_folder(tmp_path):
    shapes = ShapesDataset(4, image_size=(48, 64), seed=2, min_shapes=2, keypoints=True)
    images_dir, annotations_file = write_coco_folder(shapes, tmp_path)
    coco = CocoDataset(images_dir, annotations_file)
    assert coco.keypoint_names == SHAPE_KEYPOINT_NAMES and coco.skeleton == SHAPE_SKELETON
    for index in range(len(shapes)):
        assert torch.equal(coco[index][1]["keypoints"], shapes[index][1]["keypoints"])


@pytest.mark.parametrize("keypoints", [True, False], ids=["keypoint-model", "mask-model"])
def test_cli_trains_on_a_coco_keypoints_file(person_folder, tmp_path, capsys, keypoints):
    """With --keypoints a keypoint model of the file's 17 keypoints; without,
    a mask model on the same file (the targets' keypoints unused)."""
    images_dir, annotations_file, _ = person_folder
    run = tmp_path / "run"
    assert main(["train", *(["--keypoints"] if keypoints else []), "--dataset", "coco", "--images", str(images_dir),
                 "--annotations", str(annotations_file), "--iterations", "2", "--batch-size", "2", "--device", "cpu",
                 "--no-adapt-threads", "--out", str(run)]) == 0
    assert ("loss_keypoint" in capsys.readouterr().out) == keypoints
    model = load_model(run / "last.pt")
    assert model.num_keypoints == (J if keypoints else 0) and model.num_classes == 3
    assert model.keypoint_skeleton == ([tuple(edge) for edge in SKELETON] if keypoints else [])


def test_cli_keypoints_need_a_file_with_keypoint_names(person_folder, tmp_path, capsys):
    images_dir, _, data = person_folder
    plain = change_and_write(data, tmp_path, lambda d: (d["categories"][0].pop("keypoints"), d["categories"][0].pop(
        "skeleton"), [a.pop("keypoints", None) for a in d["annotations"]],
        [a.pop("num_keypoints", None) for a in d["annotations"]]))
    assert main(["train", "--keypoints", "--dataset", "coco", "--images", str(images_dir), "--annotations",
                 str(plain), "--iterations", "1", "--out", str(tmp_path / "run"), "--device", "cpu"]) == 1
    error = capsys.readouterr().err
    assert "no category names keypoints" in error and error.count("\n") == 1
