"""Command line: ``python -m maskrcnn <command> ...``.

    predict IMAGE... --weights FILE --out DIR [--score-threshold T] [--device D]
            [--mask-threshold T] [--min-size N] [--max-size N] [--batch-size N]

Each command is a subparser with its own ``run`` function, so a command is
added by writing one ``add_<command>_parser`` function.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch


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


def run_predict(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, load_model
    from .predict import ImageReadError, predict_files

    given = dict(box_score_thresh=args.score_threshold, min_size=args.min_size, max_size=args.max_size)
    overrides = {key: value for key, value in given.items() if value is not None}
    try:
        model = load_model(args.weights, device=args.device, **overrides)
        coco = predict_files(model, args.images, args.out, device=args.device, batch_size=args.batch_size,
                             mask_threshold=args.mask_threshold)
    except (FileNotFoundError, CheckpointError, ImageReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{len(coco['annotations'])} detections in {len(coco['images'])} images; "
          f"images and detections.json written to {args.out}")
    return 0


def add_predict_parser(commands) -> None:
    parser = commands.add_parser(
        "predict",
        help="detect objects in images, write annotated PNGs and COCO-format JSON",
        description="Detects objects in images; writes OUT/<name>.png (masks, boxes, labels drawn) per image and "
        "OUT/detections.json (COCO format: images, annotations with scores and RLE masks, categories).",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument("--weights", required=True, type=Path,
                        help="our checkpoint, or a torchvision Mask R-CNN state dict (e.g. maskrcnn_resnet50_fpn_coco-*.pth)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="minimum detection score (default: the model's, 0.05 for torchvision weights)")
    parser.add_argument("--mask-threshold", type=float, default=0.5, help="mask probability counted as inside")
    parser.add_argument("--min-size", type=int, default=None,
                        help="resize images so that their short side is this (default: the model's, 800 for "
                        "torchvision weights); smaller is faster and finds fewer small objects")
    parser.add_argument("--max-size", type=int, default=None, help="upper bound of the long side after resizing "
                        "(default: the model's, 1333 for torchvision weights)")
    parser.add_argument("--device", type=parse_device, default=default_device(),
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.set_defaults(run=run_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maskrcnn", description="Mask R-CNN on maskrcnn_ops.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_predict_parser(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in ("batch_size", "min_size", "max_size"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    return args.run(args)


__all__ = ["build_parser", "main"]
