"""CPU NMS with a busy neighbour: does a call stay fast when another process
holds a core?

One run measures CPU ``maskrcnn_ops.nms``, ``torchvision.ops.nms`` and, where
installed, OpenVINO's and ONNX Runtime's NonMaxSuppression (benchmarks.peers,
float32; --no-peers leaves them out) on the
suite's proposal-like workload (``benchmarks.suite``'s NMS case: 12,000 boxes
in an 800x1088 image, IoU 0.7) with 1 and 2 intra-op threads, first on a
quiet machine, then with a busy neighbour: a child process spinning
``while True: pass``, started and stopped by this script. An OpenMP kernel
that opens many parallel regions per call suffers there, since at every
region's barrier its threads wait for the one that shares a core with the
neighbour. With --classes C above 1 the op is batched_nms over C classes.

    python -m benchmarks.nms_under_load [--boxes 12000] [--iou 0.7] [--classes 1] [--dtype float32]
                                        [--threads 1 2] [--rounds 2] [--repeats 25] [--no-peers] [--out DIR]

Prints a table (median and 90th percentile, ms) and writes
DIR/nms_under_load.json: the CPU model (lscpu), thread counts, dtype,
shapes, every sample, and per setting the CPU pressure (/proc/pressure/cpu)
before it and the CPU time other processes used (and the hypervisor stole)
while it ran.
The default DIR is a new temporary folder, so runs leave nothing in the
source tree. Run it on an otherwise idle machine: other work is a second,
uncontrolled neighbour (the pressure figures show whether there was any).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import peers  # noqa: E402
from benchmarks.common import environment  # noqa: E402
from benchmarks.suite import _nms_setup  # noqa: E402


def cpu_model() -> str:
    """lscpu's "Model name" (empty when lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return ""


def cpu_pressure() -> str:
    """The "some" line of /proc/pressure/cpu (empty where there is none)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return ""


def machine_cpu_seconds() -> tuple:
    """(busy, steal): CPU seconds the whole machine has spent running tasks,
    and those its hypervisor gave to others (/proc/stat; zeros where there
    is none)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds of one process (user + system), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BusyNeighbour:
    """A child process that spins on one core until the block ends."""

    pid = None

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        self.pid = self.process.pid
        time.sleep(0.5)  # let it start and be scheduled
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)


class OtherLoad:
    """CPU seconds used during a block by processes other than this one and
    its busy neighbour (about 0 when the measurement had the machine to
    itself), and stolen by the hypervisor."""

    def __init__(self, neighbour_pid=None):
        self.neighbour_pid = neighbour_pid

    def __enter__(self):
        self.start = self._sample()
        return self

    def __exit__(self, *exc):
        busy, steal, own, neighbour = (e - s for e, s in zip(self._sample(), self.start))
        self.seconds = max(0.0, busy - own - neighbour)
        self.steal = steal

    def _sample(self):
        own = process_cpu_seconds(os.getpid())
        neighbour = process_cpu_seconds(self.neighbour_pid) if self.neighbour_pid else 0.0
        return (*machine_cpu_seconds(), own, neighbour)


def samples_ms(fn, repeats: int, warmup: int = 3) -> list:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def percentile(values: list, q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(args, dtype: torch.dtype) -> list:
    """Samples of every (implementation, load, threads) setting, over
    args.rounds rounds of quiet-then-busy, pooled (so that a change of the
    machine's other load during the run falls on both loads)."""
    ours, theirs, agree, *case_peers = _nms_setup("cpu", dtype, args.boxes, args.classes, args.iou,
                                                  args.classes > 1)()
    kept = int(ours().numel())
    identical = {"torchvision": agree()}
    # The peers (float32 only) are built once per thread count, with that
    # many threads, as the suite builds them with ours.
    peer_calls = {}
    threads_before = torch.get_num_threads()
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in peers.available() if case_peers and args.peers else []:
            call = peer_calls[(name, threads)] = case_peers[0].builders[name]()
            identical[name] = case_peers[0].compare(ours(), call())[0]
    torch.set_num_threads(threads_before)
    samples = collections.defaultdict(list)
    pressures = collections.defaultdict(list)
    other_load = collections.defaultdict(list)
    steal = collections.defaultdict(list)
    try:
        for _ in range(args.rounds):
            for load in ("quiet", "busy"):
                with BusyNeighbour() if load == "busy" else contextlib.nullcontext() as neighbour:
                    for threads in args.threads:
                        torch.set_num_threads(threads)
                        contenders = [("maskrcnn_ops", ours, args.repeats),
                                      ("torchvision", theirs, args.torchvision_repeats)]
                        contenders += [(name, call, args.repeats)
                                       for (name, n), call in peer_calls.items() if n == threads]
                        for impl, fn, repeats in contenders:
                            key = (impl, load, threads)
                            pressures[key].append(cpu_pressure())
                            with OtherLoad(neighbour.pid if neighbour else None) as other:
                                samples[key] += samples_ms(fn, repeats, warmup=3 if impl == "maskrcnn_ops" else 1)
                            other_load[key].append(round(other.seconds, 3))
                            steal[key].append(round(other.steal, 3))
    finally:
        torch.set_num_threads(threads_before)
    rows = []
    for (impl, load, threads), times in samples.items():
        rows.append(dict(
            impl=impl, load=load, threads=threads, kept=kept, identical=identical.get(impl, True),
            median_ms=statistics.median(times), p90_ms=percentile(times, 90), min_ms=min(times),
            samples_ms=times, cpu_pressure_before=pressures[(impl, load, threads)],
            other_processes_cpu_s=other_load[(impl, load, threads)],
            hypervisor_steal_s=steal[(impl, load, threads)],
        ))
        print(f"{impl:13} {load:5} threads={threads}  median {rows[-1]['median_ms']:8.2f} ms  "
              f"p90 {rows[-1]['p90_ms']:8.2f} ms  min {rows[-1]['min_ms']:8.2f} ms  "
              f"(other processes: {', '.join(f'{s:.2f}' for s in other_load[(impl, load, threads)])} CPU s)",
              flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=12000)
    parser.add_argument("--iou", type=float, default=0.7)
    parser.add_argument("--classes", type=int, default=1,
                        help="above 1: batched_nms over this many classes (random labels) instead of nms")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of quiet-then-busy measurements")
    parser.add_argument("--repeats", type=int, default=25, help="timed calls of maskrcnn_ops.nms per setting and round")
    parser.add_argument("--torchvision-repeats", type=int, default=3,
                        help="timed calls of torchvision.ops.nms (quadratic, slow) per setting and round")
    parser.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                        help="also OpenVINO's and ONNX Runtime's NMS where installed (float32), built with the same "
                             "thread count; their kept sets are compared with ours")
    parser.add_argument("--out", type=Path, help="folder for nms_under_load.json (default: a new temporary folder)")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="maskrcnn-ops-nms-under-load-"))

    pressure_before = cpu_pressure()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); pressure before: {pressure_before}", flush=True)
    rows = measure(args, getattr(torch, args.dtype))
    env = environment("cpu")
    env.update(
        cpu_model=cpu_model(), logical_cpus=os.cpu_count(),
        parallel_info=torch.__config__.parallel_info(),
        omp_env={k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))},
        cpu_pressure_before=pressure_before, cpu_pressure_after=cpu_pressure(),
    )
    workload = dict(op="nms" if args.classes == 1 else "batched_nms", classes=args.classes, boxes=args.boxes,
                    box_shape=[args.boxes, 4], scores_shape=[args.boxes],
                    iou=args.iou, dtype=args.dtype,
                    generator="benchmarks.suite._nms_setup (benchmarks.common.random_boxes)",
                    neighbour="a child process running `while True: pass`")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "nms_under_load.json"
    path.write_text(json.dumps(dict(environment=env, workload=workload, rounds=args.rounds, results=rows), indent=2))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        quiet_one = next((r["median_ms"] for r in rows
                          if r["impl"] == impl and r["load"] == "quiet" and r["threads"] == 1), None)
        for r in rows:
            if r["impl"] == impl and r["load"] == "busy" and quiet_one:
                print(f"{impl} busy, {r['threads']} threads: {r['median_ms'] / quiet_one:.2f}x "
                      f"its quiet 1-thread median")
    print(f"pressure after: {env['cpu_pressure_after']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
