"""Command line: ``python -m maskrcnn <command> ...``.

    demo     [--out DIR] [--device D] [--iterations N]
    train    [--dataset shapes | coco --images DIR --annotations FILE] [--config small|resnet50|c4]
             [--iterations N | --epochs N] [--batch-size N] [--lr LR] [--warmup N] [--out DIR]
             [--resume FILE] [--amp] [--device D] ...   (torchrun: one process per GPU or CPU share)
    evaluate --weights FILE [--dataset shapes | coco --images DIR --annotations FILE] [--out FILE]
    predict  IMAGE|FOLDER... (--weights FILE | --exported FILE) --out DIR [--score-threshold T]
             [--device D] [--mask-threshold T] [--min-size N] [--max-size N] [--batch-size N]
    export   --weights FILE --format pt2|onnx --out FILE [--min-size N] [--max-size N]
             [--score-threshold T] [--paste-masks]

Each command is a subparser with its own ``run`` function, so a command is
added by writing one ``add_<command>_parser`` function. Numeric options are
range-checked when parsed (an argparse error naming the option), every
option's help states its default, and bad files are one-line errors
(``report``), never tracebacks.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import List, Optional

import torch

from .presets import MODEL_PRESETS, SHAPES_TRAINING, SMALL, model_preset

# Errors of bad input (files, arguments, data) and of the file system that
# the commands report in one line instead of a traceback: CheckpointError,
# CocoFormatError and ImageReadError are ValueErrors; FileNotFoundError,
# PermissionError, IsADirectoryError etc. are OSErrors.
INPUT_ERRORS = (OSError, ValueError)

# Seeds go to torch and numpy generators (DistributedSampler adds the epoch).
MAX_SEED = 2**32 - 1


def report(error: Exception) -> int:
    """Prints an input error as one line on stderr; returns the exit status 1."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.filename}: {error.strerror}"  # without the "[Errno N]" of str(error)
    else:
        text = str(error)
    print(f"error: {text}", file=sys.stderr)
    return 1


def int_at_least(minimum: int, maximum: Optional[int] = None):
    """An argparse ``type``: an integer >= ``minimum`` (and <= ``maximum``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            wanted = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be an integer {wanted}, got {text}")
        return value

    return parse


def number_in(low: float, high: float = math.inf, *, low_open: bool = False):
    """An argparse ``type``: a finite float in [low, high] (or (low, high]
    with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or value > high:
            if high == math.inf:
                wanted = f"> {low:g}" if low_open else f">= {low:g}"
            else:
                wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a number {wanted}, got {text}")
        return value

    return parse


POSITIVE_INT = int_at_least(1)
COUNT = int_at_least(0)
SEED = int_at_least(0, MAX_SEED)
PROBABILITY = number_in(0.0, 1.0)
# Images smaller than the backbone's stride of 32 have no P5 cell.
IMAGE_SIDE = int_at_least(32)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the text already
    says its default or there is none to state (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def check_output_folder(path: Path) -> None:
    """A ValueError (before any work is done) if ``path`` or one of its
    parents exists as something other than a folder."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "" if folder == path else f": {folder}"
                raise ValueError(f"--out {path}{where} is a file, not a folder")
            return


def check_output_file(path: Path) -> None:
    """A ValueError if the output file ``path`` is a folder or cannot be
    created because a parent is a file."""
    if path.is_dir():
        raise ValueError(f"--out {path} is a folder; give a file name (such as {path / 'metrics.json'})")
    check_output_folder(path.parent)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(text: str) -> torch.device:
    """--device value -> torch.device, refusing CUDA where there is none."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine (use --device cpu)")
    return device


def add_device_argument(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--device", type=parse_device, default=default_device(),
                        help=f"cpu, cuda or cuda:N (default: cuda when available, else cpu{note})")


def add_command(commands, name: str, **kwargs) -> argparse.ArgumentParser:
    return commands.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def model_overrides(args: argparse.Namespace) -> dict:
    """The model settings given on the command line (--score-threshold,
    --min-size, --max-size), as ``load_model`` keyword arguments."""
    given = dict(box_score_thresh=args.score_threshold, min_size=args.min_size, max_size=args.max_size)
    return {key: value for key, value in given.items() if value is not None}


def run_predict(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .export import ExportedDetector
    from .predict import find_images, predict_files

    overrides = model_overrides(args)
    try:
        check_output_folder(args.out)
        images = find_images(args.images)
        if args.exported is not None:
            if overrides:
                raise ValueError("--score-threshold, --min-size and --max-size are fixed in an exported model; "
                                 "give them to `export`")
            model, device = ExportedDetector(args.exported), torch.device("cpu")  # --device does not apply
        else:
            model, device = load_model(args.weights, device=args.device, **overrides), args.device
        coco = predict_files(model, images, args.out, device=device, batch_size=args.batch_size,
                             mask_threshold=args.mask_threshold)
    except INPUT_ERRORS as error:
        return report(error)
    print(f"{len(coco['annotations'])} detections in {len(coco['images'])} images; "
          f"images and detections.json written to {args.out}")
    return 0


def add_predict_parser(commands) -> None:
    parser = add_command(
        commands, "predict",
        help="detect objects in images, write annotated PNGs and COCO-format JSON",
        description="Detects objects in images; writes OUT/<name>.png (masks, boxes, labels drawn) per image and "
        "OUT/detections.json (COCO format: images, annotations with scores and RLE masks, categories).",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE",
                        help="image files (any format Pillow reads) or folders of them (their image files, "
                        "sorted by name; subfolders are not searched)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path,
                        help="our checkpoint, or a torchvision Mask R-CNN state dict (e.g. "
                        "maskrcnn_resnet50_fpn_coco-*.pth); this or --exported is required")
    source.add_argument("--exported", type=Path,
                        help="a .pt2 or .onnx file written by `export` (runs on the CPU without the model's "
                        "Python code); this or --weights is required")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing); required")
    parser.add_argument("--score-threshold", type=PROBABILITY, default=None,
                        help="minimum detection score, in [0, 1] (default: the model's, 0.05 for torchvision "
                        "weights)")
    parser.add_argument("--mask-threshold", type=PROBABILITY, default=0.5,
                        help="mask probability above which a pixel is inside, in [0, 1]")
    parser.add_argument("--min-size", type=IMAGE_SIDE, default=None,
                        help="resize images so that their short side is this, >= 32 (default: the model's, 800 "
                        "for torchvision weights); smaller is faster and finds fewer small objects")
    parser.add_argument("--max-size", type=IMAGE_SIDE, default=None,
                        help="upper bound of the long side after resizing, >= 32 (default: the model's, 1333 "
                        "for torchvision weights)")
    add_device_argument(parser)
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=1, help="images per forward pass")
    parser.set_defaults(run=run_predict)


def run_export(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .export import compile_package, export_onnx

    overrides = model_overrides(args)
    try:
        if args.out.suffix != f".{args.format}":
            raise ValueError(f"--out {args.out} must end in .{args.format} for --format {args.format}")
        check_output_file(args.out)
        model = load_model(args.weights, device="cpu", **overrides)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write = compile_package if args.format == "pt2" else export_onnx
        path = write(model, args.out, paste_masks=args.paste_masks)
    except INPUT_ERRORS as error:
        return report(error)
    print(f"wrote {path} and {path}.json (images up to {model.transform.max_size} px on the long side)")
    return 0


def add_export_parser(commands) -> None:
    parser = add_command(
        commands, "export",
        help="write the detector as one graph: an AOTInductor package (.pt2) or an ONNX model",
        description="Exports the eval-mode detector as a program with fixed-size outputs (num_detections, boxes, "
        "scores, labels per image, then masks and, for a keypoint model, keypoints and keypoints_scores) and "
        "dynamic batch size and image size: --format pt2 compiles it "
        "with AOTInductor (loaded with torch._inductor.aoti_load_package after `import maskrcnn_ops`), "
        "--format onnx converts it for onnxruntime. OUT.json beside it holds the resizing and class names; "
        "`predict --exported OUT` runs it.",
    )
    parser.add_argument("--weights", required=True, type=Path,
                        help="our checkpoint or a torchvision Mask R-CNN state dict; required")
    parser.add_argument("--format", required=True, choices=["pt2", "onnx"], help="artifact type; required")
    parser.add_argument("--out", required=True, type=Path, help="the file to write (.pt2 or .onnx); required")
    parser.add_argument("--score-threshold", type=PROBABILITY, default=None,
                        help="minimum detection score, in [0, 1] (default: the model's)")
    parser.add_argument("--min-size", type=IMAGE_SIDE, default=None,
                        help="short side images are resized to, >= 32 (default: the model's)")
    parser.add_argument("--max-size", type=IMAGE_SIDE, default=None,
                        help="upper bound of the long side after resizing, >= 32 (default: the model's); the "
                        "program takes images up to this size")
    parser.add_argument("--paste-masks", action="store_true",
                        help="output masks pasted into the image as uint8 [N, D, H, W] (default: the M x M "
                        "probabilities in each box's frame, [N, D, M, M])")
    parser.set_defaults(run=run_export)


def add_dataset_arguments(parser: argparse.ArgumentParser, *, shapes_images: int, shapes_seed: int) -> None:
    parser.add_argument("--dataset", choices=["shapes", "coco"], default="shapes",
                        help="generated shapes, or a COCO-format folder (--images, --annotations)")
    parser.add_argument("--images", type=Path, help="coco: the images folder (no default; needed with coco)")
    parser.add_argument("--annotations", type=Path, help="coco: the instances JSON (no default; needed with coco)")
    parser.add_argument("--shapes-images", type=POSITIVE_INT, default=shapes_images, help="shapes: number of images")
    parser.add_argument("--shapes-seed", type=SEED, default=shapes_seed,
                        help="shapes: the generator's seed (the demo trains on 0, validates on 1)")
    parser.add_argument("--image-size", type=IMAGE_SIDE, default=None,
                        help=f"shapes: image side, >= 32 (default: the small config's, {SMALL.image_size})")


def build_dataset(args: argparse.Namespace, *, keypoints: bool = False):
    """The dataset the --dataset arguments name (COCO files validated here);
    with ``keypoints``, one whose targets have keypoints (the shapes'
    corners, or a COCO file whose categories name keypoints)."""
    from .data import CocoDataset, ShapesDataset

    if args.dataset == "coco":
        if args.images is None or args.annotations is None:
            raise ValueError("--dataset coco needs --images DIR and --annotations FILE")
        dataset = CocoDataset(args.images, args.annotations)
        if keypoints and dataset.keypoint_names is None:
            raise ValueError(f"{args.annotations}: no category names keypoints ('keypoints' in 'categories', as in "
                             f"COCO's person_keypoints files), so there is nothing to train or evaluate keypoints on")
        return dataset
    return ShapesDataset(args.shapes_images, image_size=args.image_size or SMALL.image_size, seed=args.shapes_seed,
                         keypoints=keypoints)


DEFAULT_TRAIN_OUT = Path("train_out")


def train_output_folder(args: argparse.Namespace) -> Path:
    """--out, else the resumed checkpoint's folder (so the run goes on where
    it was), else train_out."""
    if args.out is not None:
        return args.out
    return args.resume.parent if args.resume is not None else DEFAULT_TRAIN_OUT


def run_train(args: argparse.Namespace) -> int:
    from .checkpoint import build_model, read_checkpoint
    from .data import EpochBatchSampler
    from .distributed import init_distributed, shutdown_distributed
    from .engine import train
    from .model import maskrcnn_from_preset
    from .presets import SMALL_KEYPOINT_HEAD_LAYERS
    from .schedule import LRSchedule

    if args.amp and args.device.type != "cuda":
        print(f"error: --amp (mixed precision) needs a CUDA device, got --device {args.device}", file=sys.stderr)
        return 1
    out = train_output_folder(args)
    context = init_distributed(args.device)
    try:
        check_output_folder(out)
        checkpoint = read_checkpoint(args.resume) if args.resume is not None else None
        # A resumed run trains the branches its checkpoint has.
        keypoints = args.keypoints or bool(checkpoint and checkpoint.model_kwargs.get("num_keypoints"))
        dataset = build_dataset(args, keypoints=keypoints)
        if checkpoint is not None:
            model = build_model(checkpoint, source=str(args.resume))
        else:
            preset = model_preset(args.config)
            keypoint_branch = {}
            if keypoints:
                keypoint_branch["num_keypoints"] = len(dataset.keypoint_names)
                if preset.name == SMALL.name:
                    keypoint_branch["keypoint_head_layers"] = SMALL_KEYPOINT_HEAD_LAYERS
            # The initial weights follow --seed too, so that two runs with one
            # seed train the same model.
            torch.manual_seed(args.seed)
            model = maskrcnn_from_preset(preset, num_classes=dataset.num_classes, image_size=args.image_size,
                                         **keypoint_branch)
        model.to(context.device)
        schedule = None
        if args.resume is None or args.iterations is not None or args.epochs is not None:
            iterations = args.iterations
            if iterations is None:
                per_epoch = len(EpochBatchSampler(len(dataset), batch_size=args.batch_size,
                                                  world_size=context.world_size))
                iterations = (args.epochs or 1) * per_epoch
            schedule = LRSchedule(base_lr=args.lr, total_iterations=iterations,
                                  warmup_iterations=min(args.warmup, iterations), kind=args.schedule)
        result = train(
            model, dataset, schedule=schedule, batch_size=args.batch_size,
            optimizer=args.optimizer or (None if args.resume is not None else SHAPES_TRAINING.optimizer),
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, amp=args.amp,
            num_workers=args.workers, seed=args.seed, out_dir=out, checkpoint_every=args.checkpoint_every,
            resume=args.resume, context=context, adapt_threads=args.adapt_threads,
        )
    except INPUT_ERRORS as error:
        return report(error)
    finally:
        shutdown_distributed(context)
    if context.is_main:
        last = result.history[-1] if result.history else {}
        losses = ", ".join(f"{name} {value:.4f}" for name, value in last.items() if name != "lr")
        print(f"trained iterations {result.start_iteration}..{result.iterations} in {result.seconds:.0f} s on "
              f"{context.world_size} process(es); last losses: {losses}; checkpoint: {result.checkpoint}")
    return 0


def add_train_parser(commands) -> None:
    from .engine import CHECKPOINT_NAME, OPTIMIZERS
    from .schedule import SCHEDULE_KINDS

    parser = add_command(
        commands, "train",
        help="train a Mask R-CNN on shapes or a COCO-format dataset (torchrun for several processes)",
        description="Trains a Mask R-CNN from scratch, writing OUT/" + CHECKPOINT_NAME + " (weights and training "
        "state) every --checkpoint-every iterations and at the end. Under torchrun (e.g. torchrun "
        "--nproc_per_node 2 -m maskrcnn train ...) each process trains a DistributedDataParallel replica "
        "(gloo on CPU, nccl on CUDA) on its share of the data; rank 0 logs and writes. Defaults: the demo's.",
    )
    recipe = SHAPES_TRAINING
    # One epoch of the default shapes set is the demo's training budget.
    add_dataset_arguments(parser, shapes_images=recipe.iterations * recipe.batch_size, shapes_seed=0)
    parser.add_argument("--config", choices=[preset.name for preset in MODEL_PRESETS], default=SMALL.name,
                        help="; ".join(f"{preset.name}: {preset.summary}" for preset in MODEL_PRESETS))
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--iterations", type=POSITIVE_INT,
                        help="optimizer steps (default: one epoch; on --resume: the checkpoint's schedule)")
    length.add_argument("--epochs", type=POSITIVE_INT,
                        help="passes over the dataset, rounded down to full batches (default: one)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=recipe.batch_size,
                        help="images per step and process")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help=f"default: {recipe.optimizer} (on --resume: the checkpoint's)")
    parser.add_argument("--lr", type=number_in(0.0, low_open=True), default=recipe.learning_rate,
                        help="learning rate after the warm-up, > 0")
    parser.add_argument("--warmup", type=COUNT, default=recipe.warmup_iterations,
                        help="linear warm-up iterations (capped at the run's length)")
    parser.add_argument("--schedule", choices=SCHEDULE_KINDS, default="cosine", help="decay after the warm-up")
    parser.add_argument("--weight-decay", type=number_in(0.0), default=recipe.weight_decay,
                        help="weight decay of convolution and linear weights (not of biases and norms), >= 0")
    parser.add_argument("--max-grad-norm", type=number_in(0.0), default=recipe.max_grad_norm,
                        help="clip the gradient norm to this (0: no clipping)")
    parser.add_argument("--keypoints", action="store_true",
                        help="add a keypoint branch (Keypoint R-CNN) and train it on the shapes' corners or on the "
                        "COCO file's keypoints (their number from the file)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: {DEFAULT_TRAIN_OUT}, or with --resume the checkpoint's folder)")
    parser.add_argument("--checkpoint-every", type=POSITIVE_INT, default=500, help="iterations between checkpoints")
    parser.add_argument("--resume", type=Path,
                        help=f"continue the run of a checkpoint (OUT/{CHECKPOINT_NAME}); default: a new run")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    add_device_argument(parser, "; under torchrun cuda:LOCAL_RANK")
    parser.add_argument("--workers", type=COUNT, default=0, help="data-loading processes (0: in this process)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the initial weights, the data order and the sampling")
    parser.add_argument("--adapt-threads", action=argparse.BooleanOptionalAction, default=True,
                        help="CPU: choose the number of threads by timing steps, and again at once when steps "
                             "slow down (a busy neighbour); --no-adapt-threads keeps torch's count (default: on)")
    parser.set_defaults(run=run_train)


def run_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .demo import format_metrics_explained
    from .evaluation import evaluate_model, metrics_for_json

    try:
        if args.out is not None:
            check_output_file(args.out)
        model = load_model(args.weights, device=args.device)
        dataset = build_dataset(args, keypoints=model.num_keypoints > 0)
        metrics, _ = evaluate_model(model, dataset, device=args.device, batch_size=args.batch_size,
                                    num_workers=args.workers, progress=True)
    except INPUT_ERRORS as error:
        return report(error)
    print(f"COCO AP of {args.weights} on {len(dataset)} images:")
    print(format_metrics_explained(metrics))
    if args.out is not None:
        try:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"weights": str(args.weights), "images": len(dataset),
                                            "metrics": metrics_for_json(metrics)}, indent=2))
        except OSError as error:
            return report(error)
        print(f"wrote {args.out}")
    return 0


def add_evaluate_parser(commands) -> None:
    from .demo import VALIDATION_IMAGES, VALIDATION_SEED

    parser = add_command(
        commands, "evaluate",
        help="COCO box and mask AP of a model on a dataset (pycocotools)",
        description="Runs the model over a dataset and prints COCO box and mask AP (AP, AP50, AP75, APs, APm, "
        "APl) through pycocotools. Default dataset: the demo's held-out shapes.",
    )
    parser.add_argument("--weights", required=True, type=Path,
                        help="our checkpoint (e.g. demo_out/model.pt) or a torchvision state dict; required")
    add_dataset_arguments(parser, shapes_images=VALIDATION_IMAGES, shapes_seed=VALIDATION_SEED)
    parser.add_argument("--out", type=Path, help="write the metrics to this JSON file (default: print only)")
    parser.add_argument("--batch-size", type=POSITIVE_INT, default=4, help="images per forward pass")
    parser.add_argument("--workers", type=COUNT, default=0, help="data-loading processes (0: in this process)")
    add_device_argument(parser)
    parser.set_defaults(run=run_evaluate)


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        check_output_folder(args.out)
        run_demo(out_dir=args.out, device=args.device, iterations=args.iterations)
    except INPUT_ERRORS as error:
        return report(error)
    return 0


def add_demo_parser(commands) -> None:
    parser = add_command(
        commands, "demo",
        help="train the small model on generated shapes, evaluate it, draw its masks (no arguments needed)",
        description="Trains the small Mask R-CNN (ResNet-18-FPN) from scratch on generated shapes, evaluates "
        "it with pycocotools on held-out images, prints box and mask AP and the wall time, and writes "
        "OUT/predictions.png, OUT/metrics.json and OUT/model.pt.",
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    add_device_argument(parser)
    parser.add_argument("--iterations", type=POSITIVE_INT, default=SHAPES_TRAINING.iterations,
                        help="training iterations")
    parser.set_defaults(run=run_demo_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maskrcnn", description="Mask R-CNN on maskrcnn_ops.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_parser(commands)
    add_train_parser(commands)
    add_evaluate_parser(commands)
    add_predict_parser(commands)
    add_export_parser(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


__all__ = ["build_parser", "main"]
