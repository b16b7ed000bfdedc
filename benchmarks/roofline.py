"""How close is the RoIAlign box-head forward to what this CPU can do?

A roofline for one workload, the suite's box head (features [2, 256, 200,
272] float32, 1000 proposal-like RoIs per image, 7x7 bins, sampling ratio 2,
aligned): the work the op must do, the machine's measured limits, and the
time those limits allow, against the time each implementation takes.

The work, counted from the inputs:
  bytes   the compulsory traffic: every input element some RoI samples with a
          non-zero weight, read once (counted from the support of the input
          gradient of one channel, times the channels), plus the output
          written once and the RoIs read once.
  flops   the direct formula's arithmetic: per output element, each of the
          sampling_ratio^2 samples is 4 taps x (multiply + add), plus the
          final scaling: 8 sr^2 + 1. (Our kernels do fewer: they contract
          rows first; the count is of the algorithm, not of our code.)

The machine, measured in the same process with the same thread count:
  copy bandwidth  `dst.copy_(src)` of float32 buffers, bytes read + written:
                  1 GiB buffers (from DRAM: this CPU's last-level cache is
                  smaller) and 32 MiB buffers (two fit in the last-level
                  cache, where the box-head features also fit when it is
                  large); the best of several runs.
  arithmetic peak an sgemm (torch.mm, 2048 x 2048 x 2048, oneDNN/MKL) in
                  GFLOP/s: the attainable fused multiply-add rate, which the
                  hardware's nominal peak only bounds from above.

The bound is max(bytes / bandwidth, flops / peak) for each bandwidth; the
report gives every implementation's median time and the fraction of the
bound it reaches (1.0 would be at the roofline).

    python -m benchmarks.roofline [--repeats 9] [--out DIR]

Writes DIR/roofline.json and DIR/roofline.md (default DIR: a new temporary
folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import maskrcnn_ops  # noqa: E402
from benchmarks.common import environment, random_boxes  # noqa: E402

BATCH, CHANNELS, HEIGHT, WIDTH = 2, 256, 200, 272
ROIS_PER_IMAGE, OUTPUT, SAMPLING_RATIO, SPATIAL_SCALE = 1000, 7, 2, 0.25


def box_head_inputs(dtype: torch.dtype = torch.float32):
    """The workload: features [2, 256, 200, 272] and rois [2000, 5] (image
    index, x1, y1, x2, y2 in the 800 x 1088 image), seeded."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(BATCH, CHANNELS, HEIGHT, WIDTH, generator=generator).to(dtype)
    boxes = random_boxes(BATCH * ROIS_PER_IMAGE, generator)
    images = torch.arange(BATCH).repeat_interleave(ROIS_PER_IMAGE)[:, None].to(boxes.dtype)
    return features, torch.cat([images, boxes], dim=1).to(dtype)


def roi_align_args():
    return ((OUTPUT, OUTPUT), SPATIAL_SCALE, SAMPLING_RATIO, True)


def compulsory_bytes(features: torch.Tensor, rois: torch.Tensor) -> dict:
    """Bytes the box-head forward must move at least: the input elements it
    samples with a non-zero weight (from one channel's input-gradient
    support; every channel samples the same positions), the output and the
    RoIs."""
    one_channel = features[:, :1].detach().double().requires_grad_()
    pooled = maskrcnn_ops.roi_align(one_channel, rois.double(), *roi_align_args())
    (gradient,) = torch.autograd.grad(pooled, one_channel, torch.ones_like(pooled))
    touched = int((gradient != 0).sum()) * features.size(1)
    item = features.element_size()
    output = rois.size(0) * features.size(1) * OUTPUT * OUTPUT
    return dict(input_elements_touched=touched, input_elements=features.numel(),
                input_bytes=touched * item, output_bytes=output * item,
                rois_bytes=rois.numel() * rois.element_size(),
                total_bytes=touched * item + output * item + rois.numel() * rois.element_size(),
                output_elements=output)


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(buffer_bytes: int, repeats: int) -> float:
    """Bytes per second of `dst.copy_(src)` (read + write counted)."""
    source = torch.rand(buffer_bytes // 4)
    destination = torch.empty_like(source)
    seconds = best_seconds(lambda: destination.copy_(source), repeats)
    return 2 * buffer_bytes / seconds


def sgemm_flops(repeats: int, n: int = 2048) -> float:
    """Floating-point operations per second of an n x n x n float32 matmul."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), repeats)


def median_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def contenders(features: torch.Tensor, rois: torch.Tensor):
    """(name, layout, callable) of every implementation measured."""
    import torchvision

    channels_last = features.contiguous(memory_format=torch.channels_last)
    args = roi_align_args()
    return [
        ("maskrcnn_ops", "nchw", lambda: maskrcnn_ops.roi_align(features, rois, *args)),
        ("maskrcnn_ops", "channels_last", lambda: maskrcnn_ops.roi_align(channels_last, rois, *args)),
        ("torchvision", "nchw", lambda: torchvision.ops.roi_align(features, rois, *args)),
        ("torchvision", "channels_last", lambda: torchvision.ops.roi_align(channels_last, rois, *args)),
    ]


def measure(repeats: int) -> dict:
    features, rois = box_head_inputs()
    work = compulsory_bytes(features, rois)
    work["flops"] = work["output_elements"] * (8 * SAMPLING_RATIO**2 + 1)
    machine = dict(
        copy_bandwidth_dram_gbs=copy_bandwidth(1 << 30, repeats) / 1e9,
        copy_bandwidth_llc_gbs=copy_bandwidth(32 << 20, repeats * 4) / 1e9,
        sgemm_gflops=sgemm_flops(repeats) / 1e9,
    )
    bounds = {}
    for memory in ("dram", "llc"):
        memory_ms = work["total_bytes"] / (machine[f"copy_bandwidth_{memory}_gbs"] * 1e9) * 1e3
        compute_ms = work["flops"] / (machine["sgemm_gflops"] * 1e9) * 1e3
        bounds[memory] = dict(memory_ms=memory_ms, compute_ms=compute_ms, bound_ms=max(memory_ms, compute_ms))
    # A B A B: every contender once per round, medians over rounds.
    samples = {(name, layout): [] for name, layout, _ in contenders(features, rois)}
    calls = contenders(features, rois)
    for _ in range(repeats):
        for name, layout, fn in calls:
            samples[(name, layout)].append(median_ms(fn, 1))
    rows = []
    for (name, layout), times in samples.items():
        ms = statistics.median(times)
        rows.append(dict(impl=name, layout=layout, median_ms=ms,
                         achieved_gbs=work["total_bytes"] / ms / 1e6,
                         achieved_gflops=work["flops"] / ms / 1e6,
                         fraction_of_bound_dram=bounds["dram"]["bound_ms"] / ms,
                         fraction_of_bound_llc=bounds["llc"]["bound_ms"] / ms))
    shapes = dict(features=[BATCH, CHANNELS, HEIGHT, WIDTH], rois=list(rois.shape), output=OUTPUT,
                  sampling_ratio=SAMPLING_RATIO, spatial_scale=SPATIAL_SCALE, aligned=True, dtype="float32")
    return dict(workload=shapes, work=work, machine=machine, bounds=bounds, rows=rows)


def markdown(env: dict, result: dict) -> str:
    work, machine, bounds = result["work"], result["machine"], result["bounds"]
    lines = [
        f"RoIAlign box-head forward roofline on {env['device_name']} ({env['threads']} threads), torch "
        f"{env['torch']}, commit {env['commit']}; features [2, 256, 200, 272] float32, 2000 RoIs, 7x7, "
        "sampling ratio 2, aligned.",
        "",
        f"Work: {work['total_bytes'] / 1e6:.1f} MB compulsory traffic ({work['input_bytes'] / 1e6:.1f} MB of "
        f"input sampled, {100 * work['input_elements_touched'] / work['input_elements']:.0f}% of the features; "
        f"{work['output_bytes'] / 1e6:.1f} MB output), {work['flops'] / 1e9:.2f} GFLOP "
        f"({work['flops'] / work['total_bytes']:.2f} FLOP/byte).",
        f"Machine: copy {machine['copy_bandwidth_dram_gbs']:.1f} GB/s (1 GiB buffers), "
        f"{machine['copy_bandwidth_llc_gbs']:.1f} GB/s (32 MiB, cache-resident); sgemm "
        f"{machine['sgemm_gflops']:.0f} GFLOP/s.",
        f"Bound: {bounds['dram']['bound_ms']:.1f} ms at DRAM copy bandwidth, {bounds['llc']['bound_ms']:.1f} ms at "
        f"cache copy bandwidth (arithmetic alone: {bounds['dram']['compute_ms']:.1f} ms).",
        "",
        "| implementation | layout | median ms | GB/s | GFLOP/s | fraction of DRAM bound | fraction of cache bound |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['impl']} | {row['layout']} | {row['median_ms']:.1f} | {row['achieved_gbs']:.1f} | "
                     f"{row['achieved_gflops']:.1f} | {row['fraction_of_bound_dram']:.2f} | "
                     f"{row['fraction_of_bound_llc']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=9, help="rounds of every contender (A B A B), >= 1")
    parser.add_argument("--out", type=Path, default=None, help="folder for roofline.json/.md (default: a new temp dir)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    out = args.out or Path(tempfile.mkdtemp(prefix="roofline-"))
    out.mkdir(parents=True, exist_ok=True)
    env = environment("cpu")
    result = measure(args.repeats)
    (out / "roofline.json").write_text(json.dumps(dict(environment=env, **result), indent=2) + "\n")
    table = markdown(env, result)
    (out / "roofline.md").write_text(table)
    print(table)
    print(f"wrote {out / 'roofline.json'} and {out / 'roofline.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
