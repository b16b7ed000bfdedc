"""RoIAlign forward and backward, maskrcnn_ops vs torchvision, side by side.

Workloads (Mask R-CNN R50-FPN on an 800x1088 batch of 2, P2 level):
  box head:  features [2, 256, 200, 272], 1000 RoIs per image, 7x7
  mask head: features [2, 256, 200, 272],  100 RoIs per image, 14x14
sampling_ratio 2, aligned=True, spatial_scale 0.25. RoIs are random boxes
inside the image with log-uniform sides between 16 and 512 pixels (seeded).

    python -m benchmarks.roi_align [--device cpu|cuda] [--dtype float32] [--channels-last]
        [--repeats 5] [--json OUT.json] [--markdown OUT.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import maskrcnn_ops  # noqa: E402
from benchmarks.common import add_output_arguments, environment, random_boxes, time_call, write_outputs  # noqa: E402

WORKLOADS = {
    "box_head": dict(batch=2, channels=256, height=200, width=272, rois_per_image=1000, output=7),
    "mask_head": dict(batch=2, channels=256, height=200, width=272, rois_per_image=100, output=14),
}


def random_rois(rois_per_image: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """[batch * rois_per_image, 5] rows of (batch_index, x1, y1, x2, y2)."""
    boxes = random_boxes(rois_per_image * batch, generator)
    index = torch.arange(batch, dtype=torch.float32).repeat_interleave(rois_per_image)[:, None]
    return torch.cat([index, boxes], dim=1)


def run_workload(name: str, device: str, dtype: torch.dtype, channels_last: bool, repeats: int) -> dict:
    import torchvision

    w = WORKLOADS[name]
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(w["batch"], w["channels"], w["height"], w["width"], generator=generator)
    features = features.to(device=device, dtype=dtype)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    rois = random_rois(w["rois_per_image"], w["batch"], generator).to(device=device, dtype=dtype)
    args = (w["output"], 0.25, 2, True)
    grad = torch.randn(rois.size(0), w["channels"], w["output"], w["output"], generator=generator)
    grad = grad.to(device=device, dtype=dtype)

    impls = {"ours": maskrcnn_ops.roi_align, "torchvision": torchvision.ops.roi_align}
    result = dict(workload=name, device=device, dtype=str(dtype).replace("torch.", ""),
                  layout="channels_last" if channels_last else "nchw", **w)
    outputs = {}
    for impl, fn in impls.items():
        outputs[impl] = fn(features, rois, *args)
        result[f"{impl}_forward_ms"] = time_call(lambda: fn(features, rois, *args), device, repeats)
        leaf = features.detach().requires_grad_()

        def backward():
            out = fn(leaf, rois, *args)
            (grad_input,) = torch.autograd.grad(out, leaf, grad)
            return grad_input

        # The backward figure is forward+backward minus the forward, as a user sees it.
        total = time_call(backward, device, repeats)
        result[f"{impl}_backward_ms"] = total - result[f"{impl}_forward_ms"]
    result["forward_speedup"] = result["torchvision_forward_ms"] / result["ours_forward_ms"]
    result["backward_speedup"] = result["torchvision_backward_ms"] / result["ours_backward_ms"]
    result["max_abs_diff_forward"] = (outputs["ours"].float() - outputs["torchvision"].float()).abs().max().item()
    return result


def markdown_table(env: dict, rows: list) -> str:
    lines = [
        f"RoIAlign on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
        f"torchvision {env['torchvision']}, commit {env['commit']}; median of repeated runs, ms.",
        "",
        "| workload | dtype | layout | pass | ours ms | torchvision ms | speed-up |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        for p in ("forward", "backward"):
            lines.append(
                f"| {r['workload']} ({r['rois_per_image']}/img, {r['output']}x{r['output']}) | {r['dtype']} | "
                f"{r['layout']} | {p} | {r[f'ours_{p}_ms']:.1f} | {r[f'torchvision_{p}_ms']:.1f} | "
                f"{r[f'{p}_speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=5)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = [run_workload(name, args.device, dtype, args.channels_last, args.repeats) for name in args.workloads]
    env = environment(args.device)
    print(f"# RoIAlign, {env['device_name']}, torch {env['torch']}, torchvision {env['torchvision']}, "
          f"{env['threads']} threads, {args.dtype}, {'channels_last' if args.channels_last else 'NCHW'}")
    print(f"{'workload':10} {'pass':9} {'ours ms':>9} {'tv ms':>9} {'speed-up':>9}")
    for r in rows:
        for p in ("forward", "backward"):
            print(f"{r['workload']:10} {p:9} {r[f'ours_{p}_ms']:9.2f} {r[f'torchvision_{p}_ms']:9.2f} "
                  f"{r[f'{p}_speedup']:8.2f}x")
    write_outputs(args, env, rows, markdown_table)

if __name__ == "__main__":
    main()
