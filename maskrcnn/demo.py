"""``python -m maskrcnn demo``: the project's main job on a fresh machine.

Trains the small configuration (``presets.SMALL``) from scratch on
generated shapes with the ``presets.SHAPES_TRAINING`` recipe, evaluates it
with pycocotools on a held-out validation set (another seed of the generator),
prints box and mask AP and the wall time, and writes into the output
folder: ``predictions.png`` (predicted masks over validation images),
``metrics.json`` and ``model.pt`` (the trained weights, for ``predict``
and ``evaluate``).

The recipe was tuned for a 2-core CPU: about ten minutes there, less on a
GPU.
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from .checkpoint import save_checkpoint
from .data import ShapesDataset
from .engine import train
from .evaluation import METRIC_NAMES, evaluate_model, format_metrics, metrics_for_json, pasted
from .model import maskrcnn_from_preset
from .presets import SHAPES_TRAINING, SMALL
from .schedule import LRSchedule
from .visualize import detection_grid

TRAIN_SEED, VALIDATION_SEED = 0, 1
# Training images are generated on the fly, each one new: the run never
# sees an image twice, so it cannot overfit them.
TRAIN_IMAGES = 1_000_000
VALIDATION_IMAGES = 200
PICTURED_IMAGES = 8
WEIGHTS_NAME = "model.pt"
# The picture: detections scoring 0.5 or more, on images enlarged twice.
PICTURE_SCORE_THRESHOLD = 0.5
PICTURE_SCALE = 2


# COCO's object sizes (mask or box area in pixels) of the size-specific APs.
SIZE_RANGES = {"APs": "small (area below 32x32 pixels)", "APm": "medium (area 32x32 to 96x96 pixels)",
               "APl": "large (area above 96x96 pixels)"}


def format_metrics_explained(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """``format_metrics``'s table with "n/a" instead of "nan", and a line
    per such figure saying why there is none: pycocotools measures nothing
    when no ground-truth object falls in a size range (the demo's 128-px
    images have no large objects, so APl is n/a)."""
    table = format_metrics(metrics)
    missing = [name for name in METRIC_NAMES if any(math.isnan(values[name]) for values in metrics.values())]
    if not missing:
        return table
    notes = [f"{name} n/a: no ground-truth object is {SIZE_RANGES[name]}" if name in SIZE_RANGES
             else f"{name} n/a: no ground-truth objects to measure" for name in missing]
    return re.sub(r"\bnan\b", "n/a", table) + "\n" + "\n".join(notes)


def shapes_datasets(*, image_size: int = SMALL.image_size, validation_images: int = VALIDATION_IMAGES):
    """(training set, validation set) of the demo: the same generator with
    different seeds, so the validation images are never trained on."""
    return (
        ShapesDataset(TRAIN_IMAGES, image_size=image_size, seed=TRAIN_SEED),
        ShapesDataset(validation_images, image_size=image_size, seed=VALIDATION_SEED),
    )


def run_demo(
    *, out_dir: Path = Path("demo_out"), device: torch.device = torch.device("cpu"),
    iterations: Optional[int] = None, validation_images: int = VALIDATION_IMAGES, progress: bool = True,
) -> Dict[str, object]:
    """Trains, evaluates and draws (see the module docstring); prints the
    figures and returns what ``metrics.json`` holds. ``iterations`` and
    ``validation_images`` replace the demo's settings (for quick checks)."""
    began = time.perf_counter()
    recipe = SHAPES_TRAINING
    iterations = iterations or recipe.iterations
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(TRAIN_SEED)
    train_set, validation_set = shapes_datasets(validation_images=validation_images)
    model = maskrcnn_from_preset(SMALL, num_classes=train_set.num_classes).to(device)
    side = SMALL.image_size
    print(f"training the small Mask R-CNN (ResNet-18-FPN, {side}x{side} shapes) from scratch on {device}: "
          f"{iterations} iterations of {recipe.batch_size} images")
    result = train(
        model,
        train_set,
        schedule=LRSchedule(base_lr=recipe.learning_rate, total_iterations=iterations,
                            warmup_iterations=min(recipe.warmup_iterations, iterations // 2)),
        batch_size=recipe.batch_size,
        optimizer=recipe.optimizer,
        weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm or None,
        adapt_threads=True,  # the demo must finish in time on a shared CPU too
        progress=progress,
    )
    trained = time.perf_counter()
    save_checkpoint(out_dir / WEIGHTS_NAME, model)
    default_threads = torch.get_num_threads()
    torch.set_num_threads(result.last_threads)  # what the training found fastest on this machine just now
    try:
        metrics, predictions = evaluate_model(model, validation_set, device=device, batch_size=8, progress=progress)
    finally:
        torch.set_num_threads(default_threads)
    evaluated = time.perf_counter()

    pictured = range(min(PICTURED_IMAGES, len(validation_set)))
    images = [validation_set[i][0] for i in pictured]
    drawn = [pasted(predictions[i], tuple(image.shape[-2:])) for i, image in zip(pictured, images)]
    sheet = detection_grid(images, drawn,
                           class_names=train_set.class_names, score_threshold=PICTURE_SCORE_THRESHOLD,
                           scale=PICTURE_SCALE)
    sheet.save(out_dir / "predictions.png")
    summary = {
        "metrics": metrics_for_json(metrics),
        "wall_seconds": time.perf_counter() - began,
        "train_seconds": trained - began,
        "evaluate_seconds": evaluated - trained,
        "iterations": iterations,
        "batch_size": recipe.batch_size,
        "image_size": side,
        "validation_images": len(validation_set),
        "device": str(device),
        "iterations_per_thread_count": result.threads,
        "machine": platform.processor() or platform.machine(),
        "final_losses": result.history[-1] if result.history else {},
    }
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(f"\nCOCO AP on {len(validation_set)} held-out validation images (pycocotools):")
    print(format_metrics_explained(metrics))
    print(f"\nbox AP {metrics['bbox']['AP']:.3f}  box AP50 {metrics['bbox']['AP50']:.3f}  "
          f"mask AP {metrics['segm']['AP']:.3f}  mask AP50 {metrics['segm']['AP50']:.3f}")
    print(f"wall time {summary['wall_seconds']:.0f} s (training {summary['train_seconds']:.0f} s, "
          f"evaluation {summary['evaluate_seconds']:.0f} s)")
    print(f"wrote {out_dir / 'predictions.png'}, {out_dir / 'metrics.json'} and {out_dir / WEIGHTS_NAME}")
    return summary


__all__ = ["format_metrics_explained", "run_demo", "shapes_datasets"]
