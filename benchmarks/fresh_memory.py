"""What a fresh output costs before a kernel writes a byte of it: a tensor of
the RoIAlign box-head output's size (default 111 MB), allocated and zeroed,
again and again, with ordinary 4 KiB pages and with transparent huge pages
requested by ``madvise(MADV_HUGEPAGE)``, back to back and with a pause
between calls (as an inference server or a training step sees it).

    python -m benchmarks.fresh_memory [--megabytes 111] [--calls 8] [--pause 3]
                                      [--json F] [--markdown F]

Linux only. Allocation is torch.empty (glibc maps a buffer this large afresh
each time, so every call takes its page faults); zeroing is Tensor.zero_ with
the process's threads. Reused: the same tensor zeroed again, no faults.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from .common import add_output_arguments, environment, write_outputs

MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20


def _advise_huge_pages(tensor: torch.Tensor) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    begin = (tensor.data_ptr() + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = (tensor.data_ptr() + tensor.nbytes) & ~(HUGE_PAGE - 1)
    if end > begin and libc.madvise(begin, end - begin, MADV_HUGEPAGE) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed")


def fresh_zero_ms(numel: int, huge_pages: bool, calls: int, pause_s: float) -> list:
    """Wall ms of allocating and zeroing a fresh float32 tensor, per call."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        tensor = torch.empty(numel)
        if huge_pages:
            _advise_huge_pages(tensor)
        tensor.zero_()
        times.append((time.perf_counter() - start) * 1e3)
        del tensor
        time.sleep(pause_s)
    return times


def reused_zero_ms(numel: int, calls: int) -> list:
    tensor = torch.empty(numel).zero_()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        tensor.zero_()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def thp_settings() -> dict:
    settings = {}
    for name in ("enabled", "defrag"):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                settings[name] = f.read().strip()
        except OSError:
            settings[name] = "unavailable"
    return settings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=111.4, help="tensor size (default: [2, 256, 200, 272] float32)")
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--pause", type=float, default=3.0, help="seconds between calls in the paused rows")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.megabytes <= 0 or args.calls <= 0 or args.pause < 0:
        parser.error("--megabytes and --calls must be positive, --pause not negative")
    numel = int(args.megabytes * 1e6) // 4
    rows = [
        ("4 KiB pages, back to back", fresh_zero_ms(numel, False, args.calls, 0.0)),
        ("huge pages (madvise), back to back", fresh_zero_ms(numel, True, args.calls, 0.0)),
        (f"4 KiB pages, {args.pause:g} s pause", fresh_zero_ms(numel, False, args.calls, args.pause)),
        (f"huge pages (madvise), {args.pause:g} s pause", fresh_zero_ms(numel, True, args.calls, args.pause)),
        ("reused tensor (no faults)", reused_zero_ms(numel, args.calls)),
    ]
    env = environment("cpu")
    env["transparent_hugepage"] = thp_settings()
    env["megabytes"] = args.megabytes
    results = [dict(memory=name, median_ms=statistics.median(times), calls_ms=times) for name, times in rows]
    print(markdown_table(env, results))
    write_outputs(args, env, results, markdown_table)


def markdown_table(env: dict, rows: list) -> str:
    lines = [
        f"Fresh memory, {env['megabytes']:g} MB float32 allocated and zeroed per call; {env['device_name']}, "
        f"{env['threads']} threads, torch {env['torch']}, commit {env['commit']}, transparent_hugepage "
        f"enabled {env['transparent_hugepage']['enabled']}, defrag {env['transparent_hugepage']['defrag']}.",
        "",
        "| memory | median ms | calls (ms, in order) |",
        "|---|---:|---|",
    ]
    for row in rows:
        calls = ", ".join(f"{t:.1f}" for t in row["calls_ms"])
        lines.append(f"| {row['memory']} | {row['median_ms']:.1f} | {calls} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
