"""The whole detector, images in and detections out, in every form we ship,
against torchvision's ``maskrcnn_resnet50_fpn`` in the same process.

Contenders (same random weights as benchmarks/model.py builds them, same
images, batch of --batch, --height x --width, which the transform keeps as
it is at the default 800x1088):

- torchvision eager;
- torchvision with its backbone compiled (``torch.compile`` with inductor
  freezing): what a torchvision user can do, since its whole model does not
  compile into one graph;
- ours eager;
- ours compiled: ``torch.compile(model, fullgraph=True)`` with inductor
  freezing (convolution weights prepacked), the whole forward one graph;
- ours AOTInductor: the ``.pt2`` of ``maskrcnn.export.compile_package``
  (with freezing), run through ``ExportedDetector``
  (resizing and pasting included);
- ours in onnxruntime: the ``.onnx`` of ``export_onnx``, the same way.

Each is warmed up (compiling counted apart, reported as ``prepare_s``),
then the contenders run in turn, --repeats rounds, the order rotating each
round; the median per contender and its ratio to torchvision eager are
reported, with the detections compared with torchvision eager
(``agreement``: matched as sets within 0.01 px, and whether in the same
order). Random weights give
confident detections, so every image has its --detections-per-img.

    python -m benchmarks.deploy [--batch 1] [--height 800 --width 1088] [--repeats 5]
                                [--only NAME ...] [--json OUT] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_output_arguments, environment, write_outputs  # noqa: E402
from benchmarks.model import build_models  # noqa: E402
from maskrcnn import export  # noqa: E402

CONTENDERS = ("torchvision eager", "torchvision compiled backbone", "ours eager", "ours compiled",
              "ours AOTInductor", "ours onnxruntime")


@contextlib.contextmanager
def inference_compile_settings():
    """Inductor settings for inference on CPU: freezing (weights become
    constants, convolutions prepacked for oneDNN); scalar outputs captured
    (our per-image outputs slice by the detection counts)."""
    with torch._inductor.config.patch(freezing=True), torch._dynamo.config.patch(capture_scalar_outputs=True):
        yield


def prepare(name: str, ours, theirs, workdir: Path):
    """The callable (a list of images -> per-image dicts) of a contender."""
    if name == "torchvision eager":
        return theirs
    if name == "ours eager":
        return ours
    if name == "torchvision compiled backbone":
        import copy

        compiled = copy.deepcopy(theirs)
        compiled.backbone = torch.compile(compiled.backbone)
        return compiled
    if name == "ours compiled":
        return torch.compile(ours, fullgraph=True)
    if name == "ours AOTInductor":
        return export.ExportedDetector(export.compile_package(ours, workdir / "model.pt2", freeze=True))
    if name == "ours onnxruntime":
        return export.ExportedDetector(export.export_onnx(ours, workdir / "model.onnx"))
    raise ValueError(name)


def run(batch: int, height: int, width: int, repeats: int, names) -> list:
    ours, theirs = build_models("cpu")
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, height, width, generator=generator) for _ in range(batch)]
    rows, runners = {}, {}
    with tempfile.TemporaryDirectory() as workdir, inference_compile_settings(), torch.no_grad():
        for name in names:
            start = time.perf_counter()
            runners[name] = prepare(name, ours, theirs, Path(workdir))
            outputs = runners[name](images)  # warm-up (compiles on the first call)
            rows[name] = dict(contender=name, prepare_s=time.perf_counter() - start, times_ms=[],
                              outputs=[{k: v for k, v in d.items() if k != "masks"} for d in outputs])
            print(f"# {name}: ready in {rows[name]['prepare_s']:.0f} s", flush=True)
        for round_ in range(repeats):
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for name in order:
                start = time.perf_counter()
                runners[name](images)
                rows[name]["times_ms"].append(1000 * (time.perf_counter() - start))
    for row in rows.values():
        row["median_ms"] = statistics.median(row["times_ms"])
    reference = rows.get("torchvision eager")
    results = []
    for name in names:
        row = rows[name]
        if reference is not None:
            row["speedup_vs_torchvision"] = reference["median_ms"] / row["median_ms"]
            row["agreement"] = agreement(row["outputs"], reference["outputs"])
        results.append({k: v for k, v in row.items() if k != "outputs"})
    return results


def agreement(ours, theirs, *, tolerance_px: float = 0.01) -> dict:
    """Detections compared as sets, per image: each of ours matched to an
    unmatched one of theirs with the same label and the nearest box. Random
    weights give many near-equal scores, which float rounding (another
    convolution algorithm, a frozen weight layout) may reorder, so order is
    reported apart: ``same_order`` when the labels also agree position by
    position."""
    matched, total, worst = 0, 0, 0.0
    same_order = True
    unmatched_ranks = {"ours": [], "theirs": []}
    nearest = []
    for o, t in zip(ours, theirs):
        total += max(len(o["labels"]), len(t["labels"]))
        same_order &= torch.equal(o["labels"], t["labels"])
        free = torch.ones(len(t["labels"]), dtype=torch.bool)
        for rank, (box, label) in enumerate(zip(o["boxes"], o["labels"])):
            distance = (t["boxes"] - box).abs().amax(1).masked_fill(t["labels"] != label, float("inf"))
            available = distance.masked_fill(~free, float("inf"))
            if len(distance) and available.min() <= tolerance_px:
                index = int(available.argmin())
                free[index] = False
                matched += 1
                worst = max(worst, float(available[index]))
            else:
                unmatched_ranks["ours"].append(rank)
                nearest.append(float(distance.min()) if len(distance) else float("inf"))
        unmatched_ranks["theirs"] += free.nonzero().flatten().tolist()
    # Ranks (0 = highest score) of the detections left unmatched on each
    # side: a swap at the detections_per_img cut shows as the last ranks.
    # For each of ours unmatched, the distance to the nearest of theirs with
    # its label says whether it moved a little past the tolerance (the same
    # detection) or has no counterpart.
    return dict(matched=matched, detections=total, same_order=same_order, max_matched_box_diff_px=worst,
                tolerance_px=tolerance_px, unmatched_ranks=unmatched_ranks,
                unmatched_nearest_px=nearest)


def _nearest(values) -> str:
    return ", ".join(f"{v:.1e}" for v in values) or "-"


def markdown_table(env: dict, rows: list) -> str:
    lines = [
        f"Device: {env['device_name']} ({env['threads']} CPU threads); torch {env['torch']}, torchvision "
        f"{env['torchvision']}; commit {env['commit']}. Mask R-CNN R50-FPN, float32, images in and per-image "
        "detections out; median of the rounds after warm-up, contenders alternated.",
        "",
        "| contender | median ms | vs torchvision eager | detections matched | max box diff px (matched) "
        "| unmatched: distance to nearest px | prepare s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        a = r.get("agreement", {})
        lines.append(f"| {r['contender']} | {r['median_ms']:.0f} | {r.get('speedup_vs_torchvision', 0):.2f}x | "
                     f"{a.get('matched')}/{a.get('detections')}{'' if a.get('same_order') else ' (reordered)'} | "
                     f"{a.get('max_matched_box_diff_px', 0):.1e} | {_nearest(a.get('unmatched_nearest_px', []))} | "
                     f"{r['prepare_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1088)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    names = [name for name in CONTENDERS if name in args.only]
    rows = run(args.batch, args.height, args.width, args.repeats, names)
    env = environment("cpu")
    print(markdown_table(env, rows))
    write_outputs(args, env, rows, markdown_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
