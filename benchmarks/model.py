"""End-to-end Mask R-CNN R50-FPN inference: our model (maskrcnn/) against
torchvision's ``maskrcnn_resnet50_fpn`` with the same weights, in one process.

Workload: torchvision's model built with a fixed seed (random weights; no
download) as ``maskrcnn_resnet50_fpn(weights=COCO_V1)`` builds it (ResNet-50
with FrozenBatchNorm2d; ``--torchvision-norm batchnorm`` gives the
BatchNorm2d of ``weights=None`` instead), its state dict loaded into ours;
a batch of random images of --height x --width (default 800x1088, which the
transform keeps as is). ``--channels-last`` runs our backbone in that
memory format (an option of our model; off by default).
Random weights give confident detections (the image features are large),
so both models find --detections-per-img objects per image and the mask
branch and pasting do their full work.

Each stage is timed on its own (the model's forward split into its
submodules, run in the same sequence; CUDA synchronized at each boundary):
transform, backbone (ResNet + FPN), RPN (head + proposals), box branch
(RoIAlign, box head, post-processing), mask branch (RoIAlign, mask head),
paste (boxes and masks back to the original image). The two models run in
alternation, warm-up first, and each stage's median over --repeats runs is
reported along with the median total.

    python -m benchmarks.model [--device cpu|cuda] [--batch 1] [--repeats 5] [--channels-last]
                               [--torchvision-norm frozen|batchnorm] [--json OUT] [--markdown OUT]

``--train`` times a training step instead: torchvision's
``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` (trainable
BatchNorm, every stage trainable) and ours built alike
(``norm="batch", trainable_layers=5``) with its state dict, on the same
batch of generated shapes images (--height x --width, default 512x512 for
training) with their boxes, labels and masks, the global RNG seeded alike
before each step (the same anchor and proposal samples). A step is the
forward pass to the five losses, backward of their sum, and an SGD step
with learning rate 0 (so every repeat does the same work on the same
weights); forward, backward and optimizer step are timed apart, and the
losses of both models at the first step are reported side by side.

    python -m benchmarks.model --train [--batch 2] [--height 512 --width 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_output_arguments, environment, write_outputs  # noqa: E402
from maskrcnn import maskrcnn_resnet50_fpn  # noqa: E402
from maskrcnn.model import to_original_images  # noqa: E402

STAGES = ("transform", "backbone", "rpn", "box branch", "mask branch", "paste")


class StageClock:
    """Wall time between marks, in ms (CUDA synchronized before each mark)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times = {}
        self.last = None

    def start(self) -> None:
        self._sync()
        self.last = time.perf_counter()

    def mark(self, stage: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.times[stage] = (now - self.last) * 1e3
        self.last = now

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def time_alternately(run_step, *, warmup: int, repeats: int) -> dict:
    """Calls ``run_step(name, step)`` (-> stage times) for "ours" and
    "torchvision" in turn, ``warmup + repeats`` times each, and returns the
    stage times of the timed steps per model. Which model goes first
    alternates, so a slow phase of a shared machine does not always fall
    on the same one."""
    timings = {"ours": [], "torchvision": []}
    for step in range(warmup + repeats):
        for name in (("ours", "torchvision") if step % 2 == 0 else ("torchvision", "ours")):
            times = run_step(name, step)
            if step >= warmup:
                timings[name].append(times)
    return timings


def median_stages(timings: list, stages) -> tuple:
    """({stage: median ms}, median total ms) of a model's timed steps."""
    per_stage = {stage: statistics.median(t[stage] for t in timings) for stage in stages}
    return per_stage, statistics.median(sum(t.values()) for t in timings)


def mark_box_branch_end(roi_heads, clock_holder: list) -> None:
    """The box branch ends where the mask branch starts pooling: a forward
    pre-hook on ``mask_roi_pool`` marks it (the same in both models), and the
    mark after the RoI heads closes the mask branch."""
    roi_heads.mask_roi_pool.register_forward_pre_hook(lambda module, args: clock_holder[0].mark("box branch"))


def ours_staged(model, images, clock: StageClock):
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    clock.start()
    batch = model.transform(images)
    clock.mark("transform")
    features = model.backbone(batch.tensors)
    clock.mark("backbone")
    proposals, _ = model.rpn(batch, features)
    clock.mark("rpn")
    outputs = model.roi_heads(features, proposals, batch.image_sizes)
    clock.mark("mask branch")
    results = to_original_images(outputs, batch.image_sizes, original_sizes)
    clock.mark("paste")
    return results


def torchvision_staged(model, images, clock: StageClock):
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    clock.start()
    image_list, _ = model.transform(images)
    clock.mark("transform")
    features = model.backbone(image_list.tensors)
    clock.mark("backbone")
    proposals, _ = model.rpn(image_list, features)
    clock.mark("rpn")
    detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
    clock.mark("mask branch")
    results = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
    clock.mark("paste")
    return results


def build_models(device: str, *, torchvision_norm: str = "frozen", channels_last: bool = False):
    """(ours, torchvision's) with the same random weights, in eval mode."""
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    if torchvision_norm == "frozen":  # what maskrcnn_resnet50_fpn(weights=...) builds
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
        theirs = torchvision.models.detection.MaskRCNN(backbone, num_classes=91)
    else:
        theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = maskrcnn_resnet50_fpn(channels_last=channels_last)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.to(device).eval(), theirs.to(device).eval()


def agreement(ours_results, their_results) -> dict:
    """Same labels in the same order, and the largest box and score
    differences, over the batch."""
    same_labels = all(torch.equal(o["labels"], t["labels"]) for o, t in zip(ours_results, their_results))
    box_diff = max(((o["boxes"] - t["boxes"]).abs().max().item() if same_labels and len(o["boxes"]) else 0.0)
                   for o, t in zip(ours_results, their_results))
    score_diff = max(((o["scores"] - t["scores"]).abs().max().item() if same_labels and len(o["scores"]) else 0.0)
                     for o, t in zip(ours_results, their_results))
    return dict(same_labels=same_labels, max_box_abs_diff=box_diff, max_score_abs_diff=score_diff,
                detections=[len(o["labels"]) for o in ours_results])


def run(device: str, batch: int, height: int, width: int, repeats: int, warmup: int, *,
        torchvision_norm: str = "frozen", channels_last: bool = False) -> list:
    ours, theirs = build_models(device, torchvision_norm=torchvision_norm, channels_last=channels_last)
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, height, width, generator=generator).to(device) for _ in range(batch)]
    holders = {"ours": [None], "torchvision": [None]}
    mark_box_branch_end(ours.roi_heads, holders["ours"])
    mark_box_branch_end(theirs.roi_heads, holders["torchvision"])
    runners = {"ours": lambda c: ours_staged(ours, images, c), "torchvision": lambda c: torchvision_staged(theirs, images, c)}
    outputs = {}

    def run_step(name: str, step: int) -> dict:
        clock = StageClock(device)
        holders[name][0] = clock
        outputs[name] = runners[name](clock)
        return clock.times

    with torch.inference_mode():
        timings = time_alternately(run_step, warmup=warmup, repeats=repeats)
    rows = []
    for name in ("ours", "torchvision"):
        per_stage, total = median_stages(timings[name], STAGES)
        rows.append(dict(model=name, device=device, batch=batch, image=f"{height}x{width}", dtype="float32",
                         total_ms=total, per_image_ms=total / batch, stages_ms=per_stage, repeats=repeats,
                         torchvision_norm=torchvision_norm, channels_last=channels_last and name == "ours"))
    rows[0].update(agreement(outputs["ours"], outputs["torchvision"]))
    rows[0]["speedup"] = rows[1]["total_ms"] / rows[0]["total_ms"]
    return rows


TRAIN_STAGES = ("forward", "backward", "optimizer step")


def stage_table(ours: dict, theirs: dict, stages) -> list:
    """Markdown rows: header, one row per stage and the total, ours against torchvision."""
    lines = ["| stage | ours ms | torchvision ms | ours / torchvision |", "|---|---:|---:|---:|"]
    for stage in stages:
        a, b = ours["stages_ms"][stage], theirs["stages_ms"][stage]
        lines.append(f"| {stage} | {a:.1f} | {b:.1f} | {a / b:.2f} |")
    lines.append(f"| **total** | **{ours['total_ms']:.1f}** | **{theirs['total_ms']:.1f}** | "
                 f"**{ours['total_ms'] / theirs['total_ms']:.2f}** |")
    return lines


def build_training_models(device: str, height: int, width: int):
    """(ours, torchvision's) with the same random weights, in training mode:
    torchvision's model as ``weights=None`` builds it (BatchNorm2d, every
    stage trainable) and ours with the same design; both resize to
    ``height`` x ``width`` images' own size (no rescaling)."""
    import torchvision

    from maskrcnn import maskrcnn_from_preset
    from maskrcnn.presets import RESNET50

    sizes = dict(min_size=min(height, width), max_size=max(height, width))
    torch.manual_seed(0)
    theirs = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4,
                                                                **sizes)
    ours = maskrcnn_from_preset(RESNET50, num_classes=4, **sizes)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.to(device).train(), theirs.to(device).train()


def shapes_batch(batch: int, height: int, width: int, device: str):
    """(images, targets) of ``batch`` generated shapes images, on ``device``."""
    from maskrcnn.data import ShapesDataset

    dataset = ShapesDataset(batch, image_size=(height, width), seed=1, min_shapes=2, max_shapes=5)
    images, targets = zip(*(dataset[i] for i in range(batch)))
    images = [image.to(device) for image in images]
    targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    return images, targets


def timed_training_step(model, optimizer, images, targets, clock: StageClock, seed: int) -> dict:
    """One step (seeded), timed by stage; returns the losses as floats."""
    torch.manual_seed(seed)
    clock.start()
    losses = model(images, [dict(t) for t in targets])
    clock.mark("forward")
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    clock.mark("backward")
    optimizer.step()
    clock.mark("optimizer step")
    return {name: float(value.detach()) for name, value in losses.items()}


def run_training(device: str, batch: int, height: int, width: int, repeats: int, warmup: int) -> list:
    ours, theirs = build_training_models(device, height, width)
    images, targets = shapes_batch(batch, height, width, device)
    models = {"ours": ours, "torchvision": theirs}
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9) for name, model in models.items()}
    first_losses = {}

    def run_step(name: str, step: int) -> dict:
        clock = StageClock(device)
        losses = timed_training_step(models[name], optimizers[name], images, targets, clock, seed=step)
        first_losses.setdefault(name, losses)
        return clock.times

    timings = time_alternately(run_step, warmup=warmup, repeats=repeats)
    rows = []
    for name in ("ours", "torchvision"):
        per_stage, total = median_stages(timings[name], TRAIN_STAGES)
        rows.append(dict(model=name, mode="train", device=device, batch=batch, image=f"{height}x{width}",
                         dtype="float32", total_ms=total, per_image_ms=total / batch, stages_ms=per_stage,
                         repeats=repeats, losses_first_step=first_losses[name]))
    rows[0]["speedup"] = rows[1]["total_ms"] / rows[0]["total_ms"]
    return rows


def training_markdown_table(env: dict, rows: list) -> str:
    ours, theirs = rows
    lines = [
        f"Mask R-CNN R50-FPN training step on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
        f"torchvision {env['torchvision']}, commit {env['commit']}: batch {ours['batch']} of {ours['image']} shapes "
        f"images with masks (kept at their size), float32, same weights (BatchNorm2d, all stages trainable), "
        f"RNG seeded alike per step, SGD with lr 0; median of {ours['repeats']} steps after warm-up, ms.",
        "",
        *stage_table(ours, theirs, TRAIN_STAGES),
        "",
    ]
    lines.append("Losses at the first step (ours / torchvision; random weights give many proposals of equal "
                 "score, which torchvision's unstable sort orders arbitrarily, so the sampled negatives and "
                 "with them the classifier loss can differ slightly): " + ", ".join(
        f"{name} {ours['losses_first_step'][name]:.6f} / {theirs['losses_first_step'][name]:.6f}"
        for name in theirs["losses_first_step"]))
    return "\n".join(lines) + "\n"


def markdown_table(env: dict, rows: list) -> str:
    ours, theirs = rows
    lines = [
        f"Mask R-CNN R50-FPN inference on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
        f"torchvision {env['torchvision']}, commit {env['commit']}: batch {ours['batch']} of {ours['image']} images, "
        f"float32, {ours['detections']} detections, median of {ours['repeats']} runs after warm-up, ms; "
        f"torchvision's ResNet with {'FrozenBatchNorm2d' if ours['torchvision_norm'] == 'frozen' else 'BatchNorm2d'}"
        f"{', ours channels_last' if ours['channels_last'] else ''}.",
        "",
        *stage_table(ours, theirs, STAGES),
    ]
    lines.append(f"| per image | {ours['per_image_ms']:.1f} | {theirs['per_image_ms']:.1f} | |")
    lines.append("")
    lines.append(f"Same labels in the same order: {'yes' if ours['same_labels'] else 'NO'}; largest box difference "
                 f"{ours['max_box_abs_diff']:.2e} px, largest score difference {ours['max_score_abs_diff']:.2e}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=1, help="images per forward")
    parser.add_argument("--height", type=int, default=None, help="image height (default 800; 512 with --train)")
    parser.add_argument("--width", type=int, default=None, help="image width (default 1088; 512 with --train)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--torchvision-norm", choices=["frozen", "batchnorm"], default="frozen",
                        help="torchvision's ResNet norm: frozen (as built for its COCO weights) or batchnorm (weights=None)")
    parser.add_argument("--channels-last", action="store_true", help="run our backbone channels_last")
    parser.add_argument("--train", action="store_true",
                        help="time a training step (forward to the losses, backward, SGD step) instead of inference")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    env = environment(args.device)
    if args.train:
        rows = run_training(args.device, args.batch, args.height or 512, args.width or 512, args.repeats, args.warmup)
        print(training_markdown_table(env, rows))
        write_outputs(args, env, rows, training_markdown_table)
        return 0
    rows = run(args.device, args.batch, args.height or 800, args.width or 1088, args.repeats, args.warmup,
               torchvision_norm=args.torchvision_norm, channels_last=args.channels_last)
    print(markdown_table(env, rows))
    write_outputs(args, env, rows, markdown_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
