"""Peak memory of pasting detections into a large image: ours
(``maskrcnn_ops.paste_masks``, probabilities and bool; ``masks_to_rle``)
against torchvision's ``paste_masks_in_image``, each in a fresh process
(peak resident set size over the process's own baseline).

    python -m benchmarks.paste_memory [--detections 30] [--height 4000] [--width 6000]
                                      [--contenders ours ours-bool rle torchvision]

Prints one JSON line per contender: peak RSS growth in MiB and wall time,
then, for the pasted tensors, the same after reading every pixel once
(counting the foreground, > 0.5).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONTENDERS = ("ours", "ours-bool", "rle", "torchvision")


def measure(contender: str, detections: int, height: int, width: int) -> dict:
    """Runs one contender in this process (called in a child process)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import maskrcnn_ops
    from benchmarks.postprocess import paste_problem, torchvision_paste

    import torchvision.models.detection.roi_heads  # noqa: F401  (its import is not the paste's memory)

    masks, boxes = paste_problem("cpu", torch.float32, detections, (height, width))
    run = {
        "ours": lambda: maskrcnn_ops.paste_masks(masks, boxes, (height, width)),
        "ours-bool": lambda: maskrcnn_ops.paste_masks(masks, boxes, (height, width), threshold=0.5),
        "rle": lambda: maskrcnn_ops.masks_to_rle(masks, boxes, (height, width)),
        "torchvision": lambda: torchvision_paste(masks, boxes, (height, width)),
    }[contender]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    read = {}
    if isinstance(result, torch.Tensor):
        # What a user of the masks then does: read every pixel. Our large
        # outputs start as fresh zero pages (csrc/cpu/paste.cpp), resident
        # only where a box was written; reading the rest maps no memory.
        start = time.perf_counter()
        # One image at a time, so the count's temporaries stay one image.
        foreground = sum(int(torch.count_nonzero(m > 0.5 if m.is_floating_point() else m))
                         for m in result.flatten(0, -3))
        read = dict(read_seconds=round(time.perf_counter() - start, 3), foreground_pixels=foreground,
                    peak_rss_growth_after_read_mib=round(
                        (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024, 1))
    del result
    return dict(contender=contender, detections=detections, image=[height, width],
                peak_rss_growth_mib=round((peak - baseline) / 1024, 1), seconds=round(seconds, 3),
                threads=torch.get_num_threads(), **read)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detections", type=int, default=30)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.detections, args.height, args.width)))
        return
    for contender in args.contenders:
        command = [sys.executable, "-m", "benchmarks.paste_memory", "--child", contender, "--detections",
                   str(args.detections), "--height", str(args.height), "--width", str(args.width)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        print(done.stdout.strip() or json.dumps(dict(contender=contender, error=done.stderr.strip()[-300:])))


if __name__ == "__main__":
    main()
