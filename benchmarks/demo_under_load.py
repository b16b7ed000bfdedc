"""The demo with a busy neighbour: does training stay fast when another
process holds a core?

One run starts ``python -m maskrcnn demo`` twice, one after the other: on a
quiet machine, then beside a child process spinning ``while True: pass``
(started and stopped here). It times each whole run (training, evaluation
and picture) and keeps what the thread tuner said in the progress output.

    python -m benchmarks.demo_under_load [--iterations N] [--out DIR]

Writes DIR/demo_under_load.json: the CPU model (lscpu), core count, wall
times, the ratio busy / quiet, the tuner's messages, and per run the CPU
pressure before it, the demo's CPU time and the CPU time other processes
(not the demo, not the busy neighbour) used while it ran. The
default DIR is a new temporary folder (runs leave nothing in the source
tree). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.nms_under_load import BusyNeighbour, OtherLoad, cpu_model, cpu_pressure

ROOT = Path(__file__).resolve().parent.parent


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (the demo runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_demo(out: Path, iterations, neighbour: bool) -> dict:
    """Runs the demo once into ``out``; returns its wall time and what it printed about threads."""
    command = [sys.executable, "-m", "maskrcnn", "demo", "--out", str(out)]
    if iterations is not None:
        command += ["--iterations", str(iterations)]
    pressure = cpu_pressure()
    with BusyNeighbour() if neighbour else contextlib.nullcontext() as busy:
        with OtherLoad(busy.pid if busy else None) as other:
            start, children = time.perf_counter(), _children_cpu_seconds()
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            seconds, demo_cpu = time.perf_counter() - start, _children_cpu_seconds() - children
    if done.returncode != 0:
        raise SystemExit(f"demo failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    output = done.stdout + done.stderr
    return dict(neighbour=neighbour, wall_seconds=round(seconds, 1), pressure_before=pressure,
                demo_cpu_seconds=round(demo_cpu, 1), other_cpu_seconds=round(max(0.0, other.seconds - demo_cpu), 1),
                steal_seconds=round(other.steal, 1),
                tuner_messages=sorted(set(re.findall(r"thread tuner: [^\r\n]*", output))),
                summary=[line for line in output.splitlines() if line.strip() and "|" not in line][-8:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--iterations", type=int, default=None, help="training steps (default: the demo's)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        parser.error("--iterations must be >= 1")
    out = args.out or Path(tempfile.mkdtemp(prefix="demo_under_load_"))
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for neighbour in (False, True):
        print(f"demo {'with a busy neighbour' if neighbour else 'on a quiet machine'} ...", flush=True)
        runs.append(run_demo(out / ("busy" if neighbour else "quiet"), args.iterations, neighbour))
        print(f"  {runs[-1]['wall_seconds']} s", flush=True)
    result = dict(cpu=cpu_model(), cores=os.cpu_count(), iterations=args.iterations or "demo default",
                  runs=runs, busy_over_quiet=round(runs[1]["wall_seconds"] / runs[0]["wall_seconds"], 2))
    (out / "demo_under_load.json").write_text(json.dumps(result, indent=2))
    print(f"busy / quiet = {result['busy_over_quiet']}; written to {out / 'demo_under_load.json'}")


if __name__ == "__main__":
    main()
