"""COCO box, mask and keypoint AP of a detector's predictions, through
pycocotools' COCOeval (the metric every Mask R-CNN paper reports)."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from tqdm import tqdm

from maskrcnn.data.coco_format import box_masks_to_rles, dataset_to_coco, masks_to_rles
from maskrcnn.data.coco_schema import load_coco_json
from maskrcnn.model import box_masks_kept
from maskrcnn.paste import paste_masks_in_image

# COCOeval.stats[0:6], in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")
KEYPOINTS = "keypoints"
# COCO's object size ranges (pixels of area); pycocotools' keypoint
# evaluation leaves out "small", which objects of the shapes demo mostly are.
AREA_RANGES = {"all": (0, 1e10), "small": (0, 32**2), "medium": (32**2, 96**2), "large": (96**2, 1e10)}


def _quiet(verbose: bool):
    """pycocotools prints progress; keep it only when asked."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _indexed_coco(data: Dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    with _quiet(False):
        coco.createIndex()
    return coco


def coco_ground_truth(ground_truth, *, class_names: Optional[Sequence[str]] = None) -> COCO:
    """The ground truth as a pycocotools ``COCO``.

    Args:
        ground_truth: a ``COCO`` (returned as is), the path of an instances
            JSON (validated), or a dataset of (image, target) samples
            (category id = label; its targets are used as they are, so for a
            ``CocoDataset`` prefer ``dataset.coco``, which keeps the crowd
            regions that its training targets leave out).
        class_names: names indexed by label, for a dataset without
            ``class_names``.
    """
    if isinstance(ground_truth, COCO):
        return ground_truth
    if isinstance(ground_truth, (str, Path)):
        return _indexed_coco(load_coco_json(ground_truth))
    if hasattr(ground_truth, "__getitem__") and hasattr(ground_truth, "__len__"):
        return _indexed_coco(dataset_to_coco(ground_truth, class_names=class_names))
    raise TypeError(
        f"ground_truth must be a pycocotools COCO, an annotations file path or a dataset, "
        f"got {type(ground_truth).__name__}"
    )


def _check_prediction(
    image_id: int, prediction: Mapping[str, Tensor], size, with_masks: bool, with_keypoints: bool = False
) -> None:
    required = ("boxes", "scores", "labels") + ((KEYPOINTS,) if with_keypoints else ())
    for key in required:
        if key not in prediction:
            raise ValueError(f"prediction for image {image_id} has no '{key}' (has {sorted(prediction)})")
    if with_masks and "masks" not in prediction and "box_masks" not in prediction:
        raise ValueError(f"prediction for image {image_id} has no 'masks' nor 'box_masks' (has {sorted(prediction)})")
    count = prediction["boxes"].shape[0]
    shapes = (prediction["boxes"].shape, prediction["scores"].shape, prediction["labels"].shape)
    if shapes != ((count, 4), (count,), (count,)):
        raise ValueError(
            f"prediction for image {image_id}: expected boxes [N, 4], scores [N], labels [N], got "
            f"{tuple(prediction['boxes'].shape)}, {tuple(prediction['scores'].shape)}, "
            f"{tuple(prediction['labels'].shape)}"
        )
    if with_keypoints and (prediction[KEYPOINTS].dim() != 3 or prediction[KEYPOINTS].shape[0] != count
                           or prediction[KEYPOINTS].shape[2] != 3):
        raise ValueError(f"prediction for image {image_id}: keypoints must be [N, K, 3] for N = {count}, got "
                         f"{tuple(prediction[KEYPOINTS].shape)}")
    if not with_masks:
        return
    if "box_masks" in prediction:
        masks = prediction["box_masks"]
        if masks.dim() not in (3, 4) or masks.shape[0] != count or masks.shape[-1] != masks.shape[-2] \
                or (masks.dim() == 4 and masks.shape[1] != 1):
            raise ValueError(
                f"prediction for image {image_id}: box_masks must be [N, 1, M, M] for N = {count} (probabilities "
                f"in each box's frame), got {tuple(masks.shape)}"
            )
        return
    masks = prediction["masks"]
    height, width = size
    if masks.shape not in ((count, 1, height, width), (count, height, width)):
        raise ValueError(
            f"prediction for image {image_id}: masks must be [N, 1, H, W] = [{count}, 1, {height}, {width}] "
            f"(probabilities at the image's size), got {tuple(masks.shape)}"
        )


def predictions_to_coco_results(
    predictions: Mapping[int, Mapping[str, Tensor]],
    ground_truth: COCO,
    *,
    category_ids: Optional[Mapping[int, int]] = None,
    iou_types: Sequence[str] = IOU_TYPES,
    mask_threshold: float = 0.5,
) -> Dict[str, List[Dict]]:
    """Predictions as COCO result records, one list per IoU type.

    Args:
        predictions: image id -> ``boxes`` [N, 4] (x1, y1, x2, y2), ``scores``
            [N], ``labels`` [N], and for "segm" either ``box_masks`` [N, 1,
            M, M] probabilities in each box's frame (the model's output with
            ``paste_masks=False``: encoded from the box windows by
            ``maskrcnn_ops.masks_to_rle``, no full-size masks) or ``masks``
            [N, 1, H, W] (or [N, H, W]) probabilities at the image's size,
            and for "keypoints" ``keypoints`` [N, K, 3] (x, y, v).
        ground_truth: gives the valid image ids, sizes and categories.
        category_ids: label -> COCO category id (default: the label itself).
        mask_threshold: a pixel is in the mask when its probability > this.

    Returns:
        {"bbox": [{image_id, category_id, bbox [x, y, w, h], score}, ...],
        "segm": [{image_id, category_id, segmentation (compressed RLE), score}, ...],
        "keypoints": [{image_id, category_id, keypoints [x1, y1, v1, ...], score}, ...]}
        (the detection's score for its keypoints, as torchvision's references).
    """
    known_categories = set(ground_truth.getCatIds())
    results: Dict[str, List[Dict]] = {iou_type: [] for iou_type in iou_types}
    for image_id, prediction in predictions.items():
        image_id = int(image_id)
        if image_id not in ground_truth.imgs:
            raise ValueError(f"prediction for image id {image_id}, which the ground truth does not have")
        info = ground_truth.imgs[image_id]
        _check_prediction(image_id, prediction, (info["height"], info["width"]), "segm" in iou_types,
                          KEYPOINTS in iou_types)
        labels = prediction["labels"].tolist()
        categories = [category_ids[label] if category_ids is not None else int(label) for label in labels]
        unknown = set(categories) - known_categories
        if unknown:
            raise ValueError(
                f"prediction for image {image_id} has category ids {sorted(unknown)} that the ground truth does "
                f"not list (labels {sorted(set(labels))}; pass category_ids to map labels to category ids)"
            )
        scores = prediction["scores"].tolist()
        if "bbox" in results:
            for (x1, y1, x2, y2), category, score in zip(prediction["boxes"].tolist(), categories, scores):
                results["bbox"].append(
                    {"image_id": image_id, "category_id": category, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
                )
        if "segm" in results:
            if "box_masks" in prediction:
                rles = box_masks_to_rles(prediction["box_masks"], prediction["boxes"], (info["height"], info["width"]),
                                         mask_threshold)
            else:
                masks = prediction["masks"]
                rles = masks_to_rles(masks.reshape(masks.shape[0], masks.shape[-2], masks.shape[-1]) > mask_threshold)
            for rle, category, score in zip(rles, categories, scores):
                results["segm"].append(
                    {"image_id": image_id, "category_id": category, "segmentation": rle, "score": score}
                )
        if KEYPOINTS in results:
            for keypoints, category, score in zip(prediction[KEYPOINTS].flatten(1).tolist(), categories, scores):
                results[KEYPOINTS].append(
                    {"image_id": image_id, "category_id": category, "keypoints": keypoints, "score": score}
                )
    return results


def _detections(ground_truth: COCO, results: List[Dict]) -> COCO:
    """The results as a COCO object (pycocotools' loadRes cannot take an
    empty list: no predictions is then an empty detection set)."""
    if results:
        return ground_truth.loadRes(results)
    return _indexed_coco(
        {"images": ground_truth.dataset["images"], "categories": ground_truth.dataset["categories"], "annotations": []}
    )


def evaluate_coco(
    predictions: Mapping[int, Mapping[str, Tensor]],
    ground_truth,
    *,
    category_ids: Optional[Mapping[int, int]] = None,
    iou_types: Sequence[str] = IOU_TYPES,
    keypoint_sigmas: Optional[Sequence[float]] = None,
    verbose: bool = False,
) -> Dict[str, Dict[str, float]]:
    """COCO AP of predictions against a ground truth.

    Args:
        predictions: image id -> prediction dict (``predictions_to_coco_results``);
            a ground-truth image without an entry counts as "nothing detected".
        ground_truth: a ``COCO``, an instances JSON path or a dataset
            (``coco_ground_truth``).
        category_ids: label -> COCO category id, e.g. a CocoDataset's
            ``label_to_category_id`` (default: the label itself).
        iou_types: any of "bbox", "segm", "keypoints" (OKS; the ground
            truth's annotations need COCO's ``keypoints``).
        keypoint_sigmas: per keypoint, the OKS falloff (pycocotools'
            ``kpt_oks_sigmas``); None: COCO's 17 body keypoints'.
        verbose: print pycocotools' progress and summary table.

    Returns:
        {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "segm": {...}},
        floats in [0, 1]; NaN where COCOeval has no ground truth to measure
        (its -1, e.g. APs when there are no small objects). "keypoints" has
        the same six figures (APs too, which pycocotools' own keypoint
        summary leaves out), at its 20 detections per image.
    """
    unknown = set(iou_types) - set(IOU_TYPES + (KEYPOINTS,))
    if unknown:
        raise ValueError(f"iou_types must be among {IOU_TYPES + (KEYPOINTS,)}, got {sorted(unknown)}")
    gt = coco_ground_truth(ground_truth)
    if KEYPOINTS in iou_types:
        _check_keypoint_ground_truth(gt, keypoint_sigmas)
    results = predictions_to_coco_results(predictions, gt, category_ids=category_ids, iou_types=iou_types)
    metrics = {}
    for iou_type in iou_types:
        with _quiet(verbose):
            evaluator = COCOeval(gt, _detections(gt, results[iou_type]), iouType=iou_type)
            if iou_type == KEYPOINTS:
                _keypoint_parameters(evaluator.params, keypoint_sigmas)
            evaluator.evaluate()
            evaluator.accumulate()
            if verbose:
                print(f"IoU type: {iou_type}")
            evaluator.summarize()
        if iou_type == KEYPOINTS:
            metrics[iou_type] = _keypoint_metrics(evaluator)
        else:
            metrics[iou_type] = {name: (math.nan if value < 0 else float(value))
                                 for name, value in zip(METRIC_NAMES, evaluator.stats[:6])}
    return metrics


def _check_keypoint_ground_truth(gt: COCO, sigmas: Optional[Sequence[float]]) -> None:
    """One-line errors for a keypoint evaluation that cannot run."""
    annotations = gt.dataset.get("annotations", [])
    if annotations and not all("keypoints" in a for a in annotations):
        raise ValueError("keypoint AP needs ground-truth annotations with 'keypoints' (COCO's [x, y, v] * K)")
    counts = {len(a["keypoints"]) // 3 for a in annotations}
    expected = len(sigmas) if sigmas is not None else 17
    if counts - {expected}:
        given = "were given" if sigmas is not None else "are COCO's body keypoints' (pass keypoint_sigmas)"
        raise ValueError(f"the ground truth has {' or '.join(map(str, sorted(counts)))} keypoints per object, "
                         f"but {expected} sigmas {given}")


def _keypoint_parameters(params, sigmas: Optional[Sequence[float]]) -> None:
    """OKS sigmas, and COCO's four size ranges (small too)."""
    if sigmas is not None:
        params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
    params.areaRngLbl = list(AREA_RANGES)
    params.areaRng = [list(AREA_RANGES[name]) for name in params.areaRngLbl]


def _keypoint_metrics(evaluator: COCOeval) -> Dict[str, float]:
    """The six AP figures of an accumulated keypoint COCOeval (NaN where
    nothing is measured), from its precision table [T, R, K, A, M]."""
    precision = evaluator.eval["precision"]
    thresholds = list(np.round(evaluator.params.iouThrs, 2))

    def average(area: str, threshold: Optional[float] = None) -> float:
        table = precision[:, :, :, evaluator.params.areaRngLbl.index(area), -1]
        if threshold is not None:
            table = table[thresholds.index(threshold)]
        table = table[table > -1]
        return float(np.mean(table)) if table.size else math.nan

    return {"AP": average("all"), "AP50": average("all", 0.5), "AP75": average("all", 0.75),
            "APs": average("small"), "APm": average("medium"), "APl": average("large")}


def _as_cpu(prediction: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    return {key: value.detach().cpu() if isinstance(value, Tensor) else value for key, value in prediction.items()}


def ground_truth_of(dataset) -> Tuple[COCO, Optional[Dict[int, int]]]:
    """(ground truth, label -> category id) to evaluate predictions on
    ``dataset``: a CocoDataset's own file (crowd regions included) and its
    label mapping, else the dataset's targets with category id = label."""
    if hasattr(dataset, "coco") and hasattr(dataset, "label_to_category_id"):
        return dataset.coco, dict(dataset.label_to_category_id)
    return coco_ground_truth(dataset), None


@torch.inference_mode()
def predict_dataset(
    model, dataset, *, device: Union[str, torch.device] = "cpu", batch_size: int = 4, num_workers: int = 0,
    progress: bool = False, paste_masks: bool = True,
) -> Dict[int, Dict[str, Tensor]]:
    """Runs ``model`` (put in eval mode) over every sample of ``dataset``.

    Args:
        paste_masks: the model's outputs with masks pasted into the images
            (``masks`` [D, 1, H, W]); False: the M x M masks (``box_masks``
            [D, 1, M, M], ``maskrcnn.model.box_masks_kept``), which
            ``evaluate_coco`` encodes without full-size masks.

    Returns:
        image id (the target's ``image_id``) -> the model's output for that
        image (boxes, labels, scores, masks or box_masks), on the CPU.
    """
    from torch.utils.data import DataLoader

    from maskrcnn.data.batching import collate

    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers)
    predictions: Dict[int, Dict[str, Tensor]] = {}
    with contextlib.nullcontext() if paste_masks else box_masks_kept(model):
        for images, targets in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
            outputs = model([image.to(device) for image in images])
            predictions.update(collect_predictions([t["image_id"] for t in targets], outputs))
    return predictions


def pasted(prediction: Mapping[str, Tensor], image_size: Tuple[int, int]) -> Dict[str, Tensor]:
    """A prediction with ``box_masks`` as one with ``masks`` [D, 1, H, W]
    pasted into an image of ``image_size`` (e.g. to draw it); others as they are."""
    if "box_masks" not in prediction:
        return dict(prediction)
    result = {key: value for key, value in prediction.items() if key != "box_masks"}
    result["masks"] = paste_masks_in_image(prediction["box_masks"], prediction["boxes"], image_size)
    return result


def evaluate_model(
    model, dataset, *, device: Union[str, torch.device] = "cpu", batch_size: int = 4, num_workers: int = 0,
    progress: bool = False,
) -> Tuple[Dict[str, Dict[str, float]], Dict[int, Dict[str, Tensor]]]:
    """COCO box and mask AP of ``model`` on ``dataset`` (see
    ``predict_dataset`` and ``evaluate_coco``), mask AP only for a model
    with masks and keypoint AP too for one with keypoints (OKS sigmas:
    ``dataset.keypoint_sigmas``, else COCO's): returns (metrics,
    predictions). The predictions keep the M x M masks (``box_masks``; see
    ``pasted``), which the masks' RLE is computed from directly."""
    ground_truth, category_ids = ground_truth_of(dataset)
    predictions = predict_dataset(model, dataset, device=device, batch_size=batch_size, num_workers=num_workers,
                                  progress=progress, paste_masks=False)
    heads = getattr(model, "roi_heads", None)
    iou_types = ("bbox",) + (("segm",) if getattr(heads, "has_masks", True) else ())
    iou_types += (KEYPOINTS,) if getattr(model, "num_keypoints", 0) else ()
    metrics = evaluate_coco(predictions, ground_truth, category_ids=category_ids, iou_types=iou_types,
                            keypoint_sigmas=getattr(dataset, "keypoint_sigmas", None))
    return metrics, predictions


def metrics_for_json(metrics: Mapping[str, Mapping[str, float]]) -> Dict[str, Dict[str, Optional[float]]]:
    """The metrics with NaN (nothing of that size to measure) as None, since
    JSON has no NaN."""
    return {kind: {name: (None if math.isnan(value) else value) for name, value in values.items()}
            for kind, values in metrics.items()}


def format_metrics(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """A small text table: one row per IoU type, COCO's six AP figures."""
    label = {"bbox": "box", "segm": "mask", KEYPOINTS: "kp"}
    lines = [f"{'':6}" + "".join(f"{name:>8}" for name in METRIC_NAMES)]
    for iou_type, values in metrics.items():
        lines.append(f"{label.get(iou_type, iou_type):6}" + "".join(f"{values[name]:8.3f}" for name in METRIC_NAMES))
    return "\n".join(lines)


def collect_predictions(image_ids: Sequence[int], outputs: Sequence[Mapping[str, Tensor]]) -> Dict[int, Dict]:
    """Pairs a batch's image ids with the model's outputs (moved to the CPU,
    detached), ready to ``update`` an evaluation's predictions dict."""
    if len(image_ids) != len(outputs):
        raise ValueError(f"{len(image_ids)} image ids for {len(outputs)} outputs")
    return {int(i.item() if isinstance(i, torch.Tensor) else i): _as_cpu(o) for i, o in zip(image_ids, outputs)}
