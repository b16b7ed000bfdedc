"""NMS and batched NMS, maskrcnn_ops vs torchvision, side by side.

Workloads: proposal-like random boxes in an 800x1088 image (log-uniform
sides 16-512 px, uniform random scores, seeded).
  nms:          N boxes, IoU 0.7 (the RPN setting); default N = 12,000
  batched_nms:  N boxes over 80 classes, IoU 0.5 (detection post-processing);
                default N = 20,000
  --sweep:      nms and batched_nms at N = 1,000 ... 100,000

    python -m benchmarks.nms [--device cpu|cuda] [--dtype float32] [--sweep] [--json OUT] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import maskrcnn_ops  # noqa: E402
from benchmarks.common import add_output_arguments, environment, random_boxes, time_call, write_outputs  # noqa: E402


def run_case(op: str, n: int, classes: int, iou: float, device: str, dtype: torch.dtype, repeats: int) -> dict:
    import torchvision

    generator = torch.Generator().manual_seed(n)
    boxes = random_boxes(n, generator).to(device=device, dtype=dtype)
    scores = torch.rand(n, generator=generator).to(device=device, dtype=dtype)
    idxs = torch.randint(0, classes, (n,), generator=generator).to(device)
    if op == "nms":
        ours = lambda: maskrcnn_ops.nms(boxes, scores, iou)  # noqa: E731
        theirs = lambda: torchvision.ops.nms(boxes, scores, iou)  # noqa: E731
    else:
        ours = lambda: maskrcnn_ops.batched_nms(boxes, scores, idxs, iou)  # noqa: E731
        theirs = lambda: torchvision.ops.batched_nms(boxes, scores, idxs, iou)  # noqa: E731
    kept_ours, kept_theirs = ours(), theirs()
    row = dict(op=op, boxes=n, classes=classes, iou=iou, device=device, dtype=str(dtype).replace("torch.", ""),
               kept=int(kept_ours.numel()), identical=bool(torch.equal(kept_ours.cpu(), kept_theirs.cpu())),
               # torchvision's batched_nms orders equal scores arbitrarily (an
               # unstable sort); ours keeps index order. Same boxes, same scores
               # position by position, is the same result up to that order.
               identical_up_to_ties=bool(
                   set(kept_ours.tolist()) == set(kept_theirs.tolist())
                   and torch.equal(scores[kept_ours], scores[kept_theirs])
               ))
    row["ours_ms"] = time_call(ours, device, repeats)
    row["torchvision_ms"] = time_call(theirs, device, repeats)
    row["speedup"] = row["torchvision_ms"] / row["ours_ms"]
    return row


def markdown_table(env: dict, rows: list) -> str:
    lines = [
        f"NMS on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, torchvision "
        f"{env['torchvision']}, commit {env['commit']}; median of repeated runs, ms.",
        "",
        "| op | boxes | classes | IoU | dtype | kept | identical (up to tie order) | ours ms | torchvision ms | speed-up |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['boxes']} | {r['classes']} | {r['iou']} | {r['dtype']} | {r['kept']} | "
            f"{'yes' if r['identical'] else ('yes (ties ordered)' if r['identical_up_to_ties'] else 'NO')} | {r['ours_ms']:.2f} | {r['torchvision_ms']:.2f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--sweep", action="store_true", help="also scale N from 1,000 to 100,000")
    parser.add_argument("--repeats", type=int, default=5)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cases = [("nms", 12000, 1, 0.7), ("batched_nms", 20000, 80, 0.5)]
    if args.sweep:
        sizes = [1000, 3000, 10000, 30000, 100000]
        cases += [("nms", n, 1, 0.7) for n in sizes] + [("batched_nms", n, 80, 0.5) for n in sizes]
    rows = []
    for op, n, classes, iou in cases:
        repeats = args.repeats if n <= 30000 else 1  # torchvision's CPU nms is quadratic
        rows.append(run_case(op, n, classes, iou, args.device, dtype, repeats))
        r = rows[-1]
        print(f"{op:12} N={n:7d} C={classes:3d} kept={r['kept']:6d} identical={r['identical']}/{r['identical_up_to_ties']} "
              f"ours {r['ours_ms']:9.2f} ms  torchvision {r['torchvision_ms']:9.2f} ms  {r['speedup']:7.2f}x", flush=True)
    env = environment(args.device)
    write_outputs(args, env, rows, markdown_table)

if __name__ == "__main__":
    main()
