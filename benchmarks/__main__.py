"""``python -m benchmarks``: every op family against torchvision, side by side.

    python -m benchmarks [--device cpu|cuda] [--quick] [--ops roi_align nms proposals postprocess]
                         [--repeats 5] [--out DIR]

Prints a table (op, workload, dtype, layout, ours ms, torchvision ms,
speed-up, agreement; on the CPU, OpenVINO and ONNX Runtime ms and agreement
where they have the op and are installed, see benchmarks/peers.py) and writes DIR/results.json (device, versions, commit,
every figure), DIR/results.md and DIR/speedup.png (speed-up against size for
the scaling sweeps). The default DIR is a new temporary folder (its path is
printed), so that runs leave nothing in the source tree; to record a run
give ``--out benchmarks/results/<device>-<date>``. ``--quick`` (a smoke
test, under 2 minutes on a 2-core CPU) runs small workloads only. Refresh the README section from a results folder with
``python -m benchmarks.readme DIR``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment  # noqa: E402
from benchmarks.peers import LABELS, PEERS  # noqa: E402
from benchmarks.suite import FAMILIES, run_case  # noqa: E402


def default_out(env: dict) -> Path:
    """A new temporary folder named after the device and the date (outside
    the source tree: recorded runs go to benchmarks/results/ by --out)."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", env["device_name"]).strip("-").lower()
    return Path(tempfile.mkdtemp(prefix=f"maskrcnn-ops-benchmarks-{name}-{datetime.date.today().isoformat()}-"))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def peers_run(rows: list) -> list:
    """The peers with a figure in these rows (none in results recorded
    before the peers were added)."""
    return [peer for peer in PEERS if any(r.get(f"{peer}_ms") is not None for r in rows)]


def agree_mark(row: dict, key: str) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[row.get(key)]


def peer_cells(row: dict, peer: str) -> str:
    """'ms | agree' of one peer; a disagreement the case expects (a known
    difference of semantics) reads 'no (known)', with the difference."""
    agree = agree_mark(row, f"{peer}_agree")
    if row.get(f"{peer}_agree") is False:
        known = " (known)" if row.get(f"{peer}_expect_agree") is False else ""
        agree = f"{'no' if known else 'NO'}{known}, diff {row[f'{peer}_diff']:.3g}"
    return f"{fmt(row.get(f'{peer}_ms'), '.2f')} | {agree}"


def markdown_table(env: dict, rows: list, quick: bool) -> str:
    cuda = f", CUDA {env['cuda']}" if env.get("cuda") else ""
    shown = peers_run(rows)
    peer_text = ""
    if shown:
        peer_text = (
            f" Peers ({', '.join(LABELS[p] for p in shown)}; CPU, our thread count, graphs built once outside the "
            "timing, input copies they need inside it) on the same inputs, each checked against ours: RoIAlign within "
            "1e-4 (diff: largest absolute difference), NMS the same kept set and proposals the same boxes (diff: boxes "
            "found in only one of the two); 'known': a documented difference of semantics (benchmarks/peers.py)."
        )
    lines = [
        f"Device: {env['device_name']} ({env['threads']} CPU threads{cuda}); torch {env['torch']}, "
        f"torchvision {env['torchvision']}; commit {env['commit']}; {'quick run' if quick else 'full run'}. "
        "Median time after warm-up, both libraries on the same inputs in one process; "
        "'agree': same results (NMS and proposals up to torchvision's arbitrary order of equal scores; "
        "half-precision RoIAlign against torchvision in float32, since torchvision accumulates in half; "
        "paste_masks within 1e-5, bool except pixels within 1e-4 of the threshold; masks_to_rle byte-identical to "
        "paste_masks + pycocotools, mask IoU > 0.999 against torchvision's paste + pycocotools)." + peer_text,
        "",
        "| op | workload | dtype | layout | ours ms | torchvision ms | speed-up | agree |"
        + "".join(f" {LABELS[p]} ms | {LABELS[p]} agree |" for p in shown),
        "|---|---|---|---|---:|---:|---:|---|" + "---:|---|" * len(shown),
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['workload']} | {r['dtype']} | {r['layout']} | {fmt(r['ours_ms'], '.2f')} | "
            f"{fmt(r['torchvision_ms'], '.2f')} | {fmt(r['speedup'], '.2f')}{'x' if r['speedup'] else ''} | "
            f"{agree_mark(r, 'agree')} |" + "".join(f" {peer_cells(r, p)} |" for p in shown)
        )
    return "\n".join(lines) + "\n"


def speedup_points(rows: list, sweep: str, op: str, baseline: str) -> list:
    """(size, baseline ms / ours ms) of one op in one sweep, by size."""
    return sorted((r["size"], r[f"{baseline}_ms"] / r["ours_ms"]) for r in rows
                  if r["sweep"] == sweep and r["op"] == op and r.get(f"{baseline}_ms") and r["ours_ms"])


def plot(rows: list, path: Path, env: dict) -> bool:
    """Speed-up of ours against size, one panel per sweep: against
    torchvision (solid) and against each peer run (dashed, dotted); False
    when no sweep ran."""
    sweeps = sorted({r["sweep"] for r in rows if r["sweep"] and r["speedup"]})
    if not sweeps:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = peers_run(rows)
    baselines = [("torchvision", "-", "o", "torchvision")] + [
        (p, style, marker, LABELS[p]) for p, style, marker in zip(shown, ["--", ":"], ["s", "^"])]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(4.2 * len(sweeps), 3.6), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps):
        for index, op in enumerate(sorted({r["op"] for r in rows if r["sweep"] == sweep})):
            for baseline, style, marker, label in baselines:
                points = speedup_points(rows, sweep, op, baseline)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, linestyle=style,
                            color=f"C{index}", label=f"{op} vs {label}")
        ax.set_xscale("log")
        ax.set_yscale("log" if shown else "linear")  # peers and torchvision can be orders of magnitude apart
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(sweep)
        ax.set_xlabel(sweep.split(": ")[-1])
        ax.set_ylabel("speed-up of ours")
        ax.legend(fontsize=7)
    contenders = ", ".join(["torchvision"] + [LABELS[p] for p in shown])
    fig.suptitle(f"maskrcnn_ops vs {contenders} on {env['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="small workloads only (CI smoke test)")
    parser.add_argument("--ops", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                        help="op families to run (default: all)")
    parser.add_argument("--repeats", type=positive_int, default=None, help="timed runs per case (default 5, quick 2)")
    parser.add_argument("--out", type=Path,
                        help="results folder (default: a new temporary folder, printed at the end)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    from tqdm import tqdm

    repeats = args.repeats or (2 if args.quick else 5)
    cases = [case for family in args.ops for case in FAMILIES[family](args.device, args.quick)]
    rows = []
    with tqdm(cases, unit="case", file=sys.stderr) as progress:
        for case in progress:
            progress.set_description(f"{case.op} {case.workload}"[:48])
            rows.append(run_case(case, args.device, repeats))
            if args.device == "cuda":
                torch.cuda.empty_cache()
    env = environment(args.device)
    table = markdown_table(env, rows, args.quick)
    print(table)
    out = args.out or default_out(env)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(environment=env, quick=args.quick, results=rows), indent=2))
    (out / "results.md").write_text(table)
    plotted = plot(rows, out / "speedup.png", env)
    print(f"wrote {out}/results.json, results.md{', speedup.png' if plotted else ''}")
    if any(r["agree"] is False for r in rows):
        sys.exit("some results disagree with torchvision (see the 'agree' column)")
    if any(r.get(f"{p}_agree") is False and r.get(f"{p}_expect_agree") for r in rows for p in PEERS):
        sys.exit("some results disagree with a peer runtime (see its 'agree' column)")


if __name__ == "__main__":
    main()
