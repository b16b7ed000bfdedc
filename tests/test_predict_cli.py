"""Tests of ``python -m maskrcnn predict``: annotated PNGs and COCO-format
JSON for generated images and folders of them, both weights formats, and
one-line errors for bad images, weights files and output folders.

A small ResNet-18 model (random weights, 91 COCO classes, images resized
to 96 px) keeps each run to a few seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

import maskrcnn
from maskrcnn.checkpoint import CheckpointError
from maskrcnn.cli import main
from maskrcnn.data.coco_format import decode_segmentation

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return maskrcnn.maskrcnn_resnet_fpn(depth=18, num_classes=91, min_size=96, max_size=128,
                                        rpn_post_nms_top_n=100, box_detections_per_img=5)


@pytest.fixture(scope="module")
def checkpoint(small_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "small.pt"
    maskrcnn.save_checkpoint(path, small_model)
    return path


def write_image(path: Path, height: int, width: int, seed: int) -> Path:
    """A picture with a few filled shapes on a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 90)], -1)
    for _ in range(3):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(8, 30)
        pixels[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.integers(0, 255, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def test_predict_writes_png_and_coco_json(checkpoint, tmp_path):
    """The command as a user runs it (a separate process, two images)."""
    images = [write_image(tmp_path / "in" / "street.jpg", 120, 160, seed=1),
              write_image(tmp_path / "in" / "other" / "street.png", 90, 70, seed=2)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "maskrcnn", "predict", *map(str, images), "--weights", str(checkpoint),
               "--out", str(out), "--score-threshold", "0", "--device", "cpu"]
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert "detections in 2 images" in finished.stdout

    # One PNG per image, at the image's size (same stems get distinct names).
    for name, size in (("street.png", (160, 120)), ("street-2.png", (70, 90))):
        with Image.open(out / name) as drawn:
            assert drawn.format == "PNG" and drawn.size == size and drawn.mode == "RGB"

    data = json.loads((out / "detections.json").read_text())
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    assert [image["file_name"] for image in data["images"]] == [str(p) for p in images]
    assert len(data["annotations"]) == 10  # 5 per image: threshold 0
    names = {c["id"]: c["name"] for c in data["categories"]}
    # The 80 COCO categories, and unused COCO ids only where (random weights) detected them.
    detected = {a["category_id"] for a in data["annotations"]}
    assert {i for i, name in names.items() if name != "N/A"} == set(maskrcnn.COCO_CATEGORY_NAMES)
    assert {i for i, name in names.items() if name == "N/A"} <= detected
    for annotation in data["annotations"]:
        image = coco.imgs[annotation["image_id"]]
        assert annotation["category_id"] in names and 0 <= annotation["score"] <= 1
        x, y, w, h = annotation["bbox"]
        assert 0 <= x and 0 <= y and x + w <= image["width"] + 1e-3 and y + h <= image["height"] + 1e-3
        mask = decode_segmentation(annotation["segmentation"], image["height"], image["width"])
        assert mask.shape == (image["height"], image["width"])
        assert annotation["area"] == mask.sum()
    scores = [a["score"] for a in data["annotations"] if a["image_id"] == 1]
    assert scores == sorted(scores, reverse=True)


def test_predict_accepts_torchvision_state_dict(small_model, tmp_path, capsys):
    """A plain state dict (torchvision's file format) works; it holds no
    settings, so the image size comes from the command line."""
    weights = tmp_path / "maskrcnn_state_dict.pth"
    torch.save(small_model.state_dict(), weights)
    image = write_image(tmp_path / "photo.png", 64, 80, seed=3)
    assert main(["predict", str(image), "--weights", str(weights), "--out", str(tmp_path / "out"),
                 "--score-threshold", "0.99", "--device", "cpu", "--min-size", "96", "--max-size", "128"]) == 0
    assert "in 1 images" in capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert data["images"][0]["height"] == 64 and data["images"][0]["width"] == 80
    assert all(a["score"] > 0.99 for a in data["annotations"])
    assert (tmp_path / "out" / "photo.png").is_file()


def test_predict_errors(checkpoint, small_model, tmp_path, capsys):
    image = write_image(tmp_path / "ok.png", 40, 40, seed=4)
    out = tmp_path / "out"

    assert main(["predict", str(image), "--weights", str(tmp_path / "nope.pt"), "--out", str(out)]) == 1
    assert "weights file not found" in capsys.readouterr().err

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert main(["predict", str(image), str(tmp_path / "broken.jpg"), "--weights", str(checkpoint),
                 "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert "cannot read image" in error and "broken.jpg" in error
    assert not out.exists()  # images are checked before anything is written

    assert main(["predict", str(tmp_path / "missing.png"), "--weights", str(checkpoint), "--out", str(out)]) == 1
    assert "image not found" in capsys.readouterr().err

    assert main(["predict", str(image), "--weights", str(image), "--out", str(out)]) == 1
    assert "not a PyTorch weights file" in capsys.readouterr().err

    box_only = {k: v for k, v in small_model.state_dict().items() if ".mask_" not in k}
    torch.save(box_only, tmp_path / "faster_rcnn.pth")
    assert main(["predict", str(image), "--weights", str(tmp_path / "faster_rcnn.pth"), "--out", str(out)]) == 1
    assert "missing keys: roi_heads.mask_head.0.0.weight" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["predict", str(image), "--out", str(out)])  # --weights is required
    assert "--weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", str(image), "--weights", str(checkpoint), "--out", str(out), "--min-size", "0"])
    assert "argument --min-size: must be an integer >= 32, got 0" in capsys.readouterr().err


def one_line_error(capsys) -> str:
    """The command's stderr, checked to be one line starting with "error: "."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_predict_takes_folders_of_images(checkpoint, tmp_path, capsys):
    """A folder stands for its image files (any case of suffix, sorted by
    name; other files, hidden files and subfolders left out), mixed with
    files; a folder without images is a one-line error."""
    photos = tmp_path / "photos"
    write_image(photos / "b.png", 50, 60, seed=5)
    write_image(photos / "a.JPG", 40, 30, seed=6)
    write_image(photos / "nested" / "c.png", 40, 40, seed=7)
    write_image(photos / ".hidden.png", 40, 40, seed=8)
    (photos / "notes.txt").write_text("not an image")
    single = write_image(tmp_path / "single.png", 32, 48, seed=9)
    out = tmp_path / "out"
    assert main(["predict", str(photos), str(single), "--weights", str(checkpoint), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "in 3 images" in capsys.readouterr().out
    data = json.loads((out / "detections.json").read_text())
    assert [image["file_name"] for image in data["images"]] == [str(photos / "a.JPG"), str(photos / "b.png"),
                                                                 str(single)]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "detections.json", "single.png"]

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no pictures here")
    assert main(["predict", str(tmp_path / "empty"), "--weights", str(checkpoint), "--out", str(out)]) == 1
    assert "no image files in folder" in one_line_error(capsys)


def test_predict_output_errors(checkpoint, tmp_path, capsys):
    image = write_image(tmp_path / "photos" / "a.png", 40, 40, seed=4)
    taken = tmp_path / "taken.txt"
    taken.write_text("a file, not a folder")
    assert main(["predict", str(image), "--weights", str(checkpoint), "--out", str(taken)]) == 1
    assert "taken.txt is a file, not a folder" in one_line_error(capsys)
    assert main(["predict", str(image), "--weights", str(checkpoint), "--out", str(taken / "sub")]) == 1
    assert "taken.txt is a file, not a folder" in one_line_error(capsys)
    assert taken.read_text() == "a file, not a folder"

    # Writing the annotated a.png next to the input would replace the photo.
    before = image.read_bytes()
    assert main(["predict", str(image.parent), "--weights", str(checkpoint), "--out", str(image.parent),
                 "--device", "cpu"]) == 1
    assert "would overwrite an input image" in one_line_error(capsys)
    assert image.read_bytes() == before


def test_weights_errors_are_one_clear_line(checkpoint, tmp_path, capsys):
    image = write_image(tmp_path / "a.png", 40, 40, seed=4)
    out = str(tmp_path / "out")

    run = tmp_path / "run"
    run.mkdir()
    assert main(["predict", str(image), "--weights", str(run), "--out", out]) == 1
    assert one_line_error(capsys) == f"error: {run} is a directory, not a weights file\n"
    (run / "last.pt").write_bytes(checkpoint.read_bytes())
    assert main(["predict", str(image), "--weights", str(run), "--out", out]) == 1
    assert f"is a directory, not a weights file (did you mean {run / 'last.pt'}?)" in one_line_error(capsys)

    # A download or copy cut short: torch's several lines become one, its error the cause.
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    assert main(["predict", str(image), "--weights", str(damaged), "--out", out]) == 1
    error = one_line_error(capsys)
    assert error.startswith(f"error: {damaged} is damaged: torch.load cannot read it (")
    assert len(error) < len(str(damaged)) + 80
    with pytest.raises(CheckpointError) as raised:
        maskrcnn.load_model(damaged)
    assert raised.value.__cause__ is not None  # torch's full message, for debugging

    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    assert main(["predict", str(image), "--weights", str(tmp_path / "pickled.pt"), "--out", out]) == 1
    error = one_line_error(capsys)
    assert "torch.nn.modules.linear.Linear" in error and "refuses to load" in error
    assert not (tmp_path / "out").exists()
