"""Helpers shared by the benchmark scripts: workloads, timing, environment."""

from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

IMAGE_HW = (800, 1088)


def random_boxes(n: int, generator: torch.Generator, image_hw=IMAGE_HW) -> torch.Tensor:
    """[n, 4] proposal-like boxes: centres uniform in the image, sides
    log-uniform in [16, 512] pixels, clipped to the image."""
    height, width = image_hw
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([width, height])
    side = torch.exp(torch.empty(n, 2).uniform_(math.log(16), math.log(512), generator=generator))
    boxes = torch.cat([centre - side / 2, centre + side / 2], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def time_call(fn, device: str, repeats: int, warmup: int = 1) -> float:
    """Median wall time in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cpu_model() -> str:
    """The CPU's model name (lscpu's "Model name"), from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Versions, commit and device of a run, stored with its figures."""
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    env = dict(torch=torch.__version__, torchvision=torchvision.__version__, commit=commit,
               threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
               cpu_model=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability())
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:  # the CPU changes between machines: name it in every table
        env["device_name"] = f"CPU {env['cpu_model']}, {env['cpu_capability']}"
    return env




def add_output_arguments(parser) -> None:
    parser.add_argument("--json", type=Path, help="write environment and figures as JSON")
    parser.add_argument("--markdown", type=Path, help="write the table as markdown")


def write_outputs(args, env: dict, rows: list, markdown_table) -> None:
    """Writes --json and --markdown outputs, if asked for."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(environment=env, results=rows), indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(env, rows))
