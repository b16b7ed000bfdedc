"""Tests of maskrcnn.evaluation (COCO box and mask AP through pycocotools).

Ground truth is hand-made: two images with small, medium and large objects
(COCO's area ranges: < 32^2, < 96^2, larger) of two categories with
non-contiguous ids, plus a crowd region. Predictions equal to it must score
AP = 1.0 on every metric, and each kind of damage must lower exactly the
metrics it should.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from maskrcnn.data import CocoDataset, ShapesDataset, mask_to_rle
from maskrcnn import evaluation
from maskrcnn.evaluation import METRIC_NAMES, coco_ground_truth, collect_predictions, evaluate_coco

SIZES = {1: (200, 300), 2: (120, 160)}  # image id -> (height, width)
# (image id, category id, x1, y1, x2, y2): a small, a medium and a large
# object in image 1, a medium and a small one in image 2.
OBJECTS = [
    (1, 5, 10, 10, 30, 30),
    (1, 9, 50, 40, 110, 100),
    (1, 5, 120, 20, 290, 190),
    (2, 9, 20, 30, 70, 90),
    (2, 5, 100, 10, 120, 25),
]
CROWD = (2, 9, 0, 95, 160, 120)


def ellipse_mask(height, width, x1, y1, x2, y2) -> np.ndarray:
    """An ellipse inscribed in the box, so masks and boxes differ."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    centre_x, centre_y, radius_x, radius_y = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    return (((xs - centre_x) / radius_x) ** 2 + ((ys - centre_y) / radius_y) ** 2 <= 1).astype(np.uint8)


def annotation(annotation_id, image_id, category_id, x1, y1, x2, y2, *, crowd=0):
    height, width = SIZES[image_id]
    mask = ellipse_mask(height, width, x1, y1, x2, y2)
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "area": float(mask.sum()),
        "iscrowd": crowd,
        "segmentation": mask_to_rle(mask),
    }


@pytest.fixture
def ground_truth_file(tmp_path):
    annotations = [annotation(i + 1, *obj) for i, obj in enumerate(OBJECTS)]
    annotations.append(annotation(len(OBJECTS) + 1, *CROWD, crowd=1))
    data = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w) in SIZES.items()],
        "annotations": annotations,
        "categories": [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def perfect_predictions(objects=OBJECTS):
    """image id -> prediction dict equal to the (non-crowd) ground truth,
    labels = category ids, masks as [N, 1, H, W] probabilities."""
    predictions = {}
    for image_id, (height, width) in SIZES.items():
        mine = [obj for obj in objects if obj[0] == image_id]
        masks = [ellipse_mask(height, width, *obj[2:]) for obj in mine]
        predictions[image_id] = {
            "boxes": torch.tensor([obj[2:] for obj in mine], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.linspace(0.9, 0.6, len(mine)),
            "labels": torch.tensor([obj[1] for obj in mine], dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks)).float()[:, None] * 0.9,
        }
    return predictions


def with_extra_detection(predictions, image_id, *, box, label, score):
    """Adds one detection (box and a matching rectangular mask) to an image."""
    height, width = SIZES[image_id]
    prediction = dict(predictions[image_id])
    mask = torch.zeros(1, 1, height, width)
    mask[..., box[1] : box[3], box[0] : box[2]] = 1.0
    prediction["boxes"] = torch.cat([prediction["boxes"], torch.tensor([box], dtype=torch.float32)])
    prediction["scores"] = torch.cat([prediction["scores"], torch.tensor([score])])
    prediction["labels"] = torch.cat([prediction["labels"], torch.tensor([label])])
    prediction["masks"] = torch.cat([prediction["masks"], mask])
    return {**predictions, image_id: prediction}


def test_predictions_equal_to_ground_truth_give_ap_one(ground_truth_file):
    metrics = evaluate_coco(perfect_predictions(), ground_truth_file)
    assert set(metrics) == {"bbox", "segm"}
    for iou_type in ("bbox", "segm"):
        assert set(metrics[iou_type]) == set(METRIC_NAMES)
        for name in METRIC_NAMES:
            assert metrics[iou_type][name] == pytest.approx(1.0), (iou_type, name)


def test_shifted_box_lowers_box_ap_only(ground_truth_file):
    predictions = perfect_predictions()
    shifted = dict(predictions[1])
    shifted["boxes"] = shifted["boxes"].clone()
    shifted["boxes"][1] += torch.tensor([20.0, 0.0, 20.0, 0.0])  # the medium object: IoU 0.5
    metrics = evaluate_coco({**predictions, 1: shifted}, ground_truth_file)
    assert metrics["bbox"]["AP"] < 0.95 and metrics["bbox"]["APm"] < 0.95
    assert metrics["bbox"]["APs"] == pytest.approx(1.0) and metrics["bbox"]["APl"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)  # the masks did not move


def test_false_positives_count_by_score(ground_truth_file):
    predictions = perfect_predictions()
    box = [20, 120, 80, 180]  # on the background of image 1
    late = evaluate_coco(with_extra_detection(predictions, 1, box=box, label=5, score=0.1), ground_truth_file)
    early = evaluate_coco(with_extra_detection(predictions, 1, box=box, label=9, score=0.99), ground_truth_file)
    # A false positive ranked below every true one does not lower AP; above, it does.
    assert late["bbox"]["AP"] == pytest.approx(1.0) and late["segm"]["AP"] == pytest.approx(1.0)
    assert early["bbox"]["AP"] < 1.0 and early["segm"]["AP"] < 1.0


def test_detection_on_a_crowd_region_is_not_penalised(ground_truth_file):
    predictions = with_extra_detection(perfect_predictions(), 2, box=[0, 95, 160, 120], label=9, score=0.99)
    assert evaluate_coco(predictions, ground_truth_file, iou_types=["bbox"])["bbox"]["AP"] == pytest.approx(1.0)


def test_no_predictions_give_ap_zero(ground_truth_file):
    metrics = evaluate_coco({}, ground_truth_file)
    for iou_type in ("bbox", "segm"):
        assert all(metrics[iou_type][name] == 0.0 for name in METRIC_NAMES)
    empty = {
        image_id: {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 1, h, w),
        }
        for image_id, (h, w) in SIZES.items()
    }
    assert evaluate_coco(empty, ground_truth_file)["segm"]["AP"] == 0.0


def test_missing_image_counts_as_nothing_detected(ground_truth_file):
    only_first = {1: perfect_predictions()[1]}
    metrics = evaluate_coco(only_first, ground_truth_file, iou_types=["bbox"])
    assert 0.0 < metrics["bbox"]["AP"] < 1.0


def test_undefined_metrics_are_nan(ground_truth_file, tmp_path):
    data = json.loads(ground_truth_file.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["area"] < 32**2]  # small objects only
    path = tmp_path / "small.json"
    path.write_text(json.dumps(data))
    small = [obj for obj in OBJECTS if (obj[4] - obj[2]) * (obj[5] - obj[3]) < 32**2]
    metrics = evaluate_coco(perfect_predictions(small), path)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == pytest.approx(1.0) and metrics[iou_type]["APs"] == pytest.approx(1.0)
        assert math.isnan(metrics[iou_type]["APm"]) and math.isnan(metrics[iou_type]["APl"])


def test_ground_truth_from_a_dataset():
    dataset = ShapesDataset(4, image_size=(64, 80), seed=9)
    predictions = {}
    for index in range(len(dataset)):
        _, target = dataset[index]
        predictions[target["image_id"]] = {
            "boxes": target["boxes"],
            "scores": torch.ones(len(target["labels"])),
            "labels": target["labels"],
            "masks": target["masks"][:, None].float(),
        }
    metrics = evaluate_coco(predictions, dataset)
    assert metrics["bbox"]["AP"] == pytest.approx(1.0) and metrics["segm"]["AP"] == pytest.approx(1.0)
    gt = coco_ground_truth(dataset)
    assert isinstance(gt, COCO) and sorted(gt.getCatIds()) == [1, 2, 3]
    assert evaluate_coco(predictions, gt, iou_types=["segm"])["segm"]["AP"] == pytest.approx(1.0)


def test_coco_dataset_labels_are_mapped_back_to_category_ids(ground_truth_file, tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    dataset = CocoDataset(images_dir, ground_truth_file, check_images=False)
    to_label = dataset.category_id_to_label
    predictions = {
        image_id: {**prediction, "labels": torch.tensor([to_label[c] for c in prediction["labels"].tolist()])}
        for image_id, prediction in perfect_predictions().items()
    }
    metrics = evaluate_coco(predictions, dataset.coco, category_ids=dataset.label_to_category_id)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"category ids \[1, 2\] that the ground truth does not list"):
        evaluate_coco(predictions, dataset.coco)


def test_bad_predictions_are_rejected_clearly(ground_truth_file):
    predictions = perfect_predictions()
    with pytest.raises(ValueError, match="prediction for image id 3, which the ground truth does not have"):
        evaluate_coco({**predictions, 3: predictions[1]}, ground_truth_file)
    wrong_size = {**predictions[1], "masks": predictions[1]["masks"][..., :-1]}
    with pytest.raises(ValueError, match=r"masks must be \[N, 1, H, W\] = \[3, 1, 200, 300\]"):
        evaluate_coco({1: wrong_size}, ground_truth_file)
    no_masks = {key: value for key, value in predictions[1].items() if key != "masks"}
    with pytest.raises(ValueError, match="has no 'masks'"):
        evaluate_coco({1: no_masks}, ground_truth_file)
    assert evaluate_coco({1: no_masks}, ground_truth_file, iou_types=["bbox"])["bbox"]["AP"] > 0
    with pytest.raises(ValueError, match="iou_types"):
        evaluate_coco(predictions, ground_truth_file, iou_types=["poses"])
    with pytest.raises(ValueError, match="keypoint AP needs ground-truth annotations with 'keypoints'"):
        evaluate_coco(predictions, ground_truth_file, iou_types=["keypoints"])


def test_quiet_unless_verbose(ground_truth_file, capsys):
    evaluate_coco(perfect_predictions(), ground_truth_file)
    assert capsys.readouterr().out == ""
    evaluate_coco(perfect_predictions(), ground_truth_file, iou_types=["segm"], verbose=True)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in capsys.readouterr().out


def test_collect_predictions_pairs_ids_with_detached_cpu_outputs(ground_truth_file):
    logits = torch.zeros(3, requires_grad=True)
    outputs = [dict(perfect_predictions()[1], scores=logits.sigmoid() + 0.1), perfect_predictions()[2]]
    collected = collect_predictions([torch.tensor(1), 2], outputs)
    assert sorted(collected) == [1, 2]
    assert not collected[1]["scores"].requires_grad and collected[1]["scores"].device.type == "cpu"
    assert evaluate_coco(collected, ground_truth_file)["bbox"]["AP"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 image ids for 1 outputs"):
        collect_predictions([1, 2], outputs[:1])


def box_mask_predictions(seed=0):
    """The perfect predictions' boxes with random M x M masks in each box's
    frame (``box_masks``), and the same predictions with those masks pasted
    (``masks``)."""
    generator = torch.Generator().manual_seed(seed)
    in_boxes, pasted = {}, {}
    for image_id, prediction in perfect_predictions().items():
        box_masks = torch.rand(prediction["boxes"].shape[0], 1, 28, 28, generator=generator)
        common = {key: prediction[key] for key in ("boxes", "scores", "labels")}
        in_boxes[image_id] = {**common, "box_masks": box_masks}
        pasted[image_id] = evaluation.pasted(in_boxes[image_id], SIZES[image_id])
    return in_boxes, pasted


def test_box_masks_are_encoded_as_their_pasted_masks(ground_truth_file):
    """Predictions with box_masks (the model's paste_masks=False output) give
    the very segmentations, and metrics, of the same masks pasted."""
    gt = evaluation.coco_ground_truth(ground_truth_file)
    in_boxes, pasted = box_mask_predictions()
    assert "masks" in pasted[1] and "box_masks" not in pasted[1]
    ours = evaluation.predictions_to_coco_results(in_boxes, gt)
    assert ours == evaluation.predictions_to_coco_results(pasted, gt)
    assert len(ours["segm"]) == sum(p["boxes"].shape[0] for p in in_boxes.values())
    assert evaluate_coco(in_boxes, ground_truth_file) == evaluate_coco(pasted, ground_truth_file)


def test_bad_box_masks_are_rejected_clearly(ground_truth_file):
    in_boxes, _ = box_mask_predictions()
    wrong = {**in_boxes[1], "box_masks": in_boxes[1]["box_masks"][..., :-1]}
    with pytest.raises(ValueError, match=r"box_masks must be \[N, 1, M, M\]"):
        evaluate_coco({1: wrong}, ground_truth_file)
