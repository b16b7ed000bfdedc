"""Writes the benchmark section of README.md from a results folder (so the
README's figures are never typed by hand).

    python -m benchmarks.readme benchmarks/results/<device>-<date> [more folders...]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def section(folders) -> str:
    parts = [BEGIN, ""]
    for folder in folders:
        folder = Path(folder).resolve()
        relative = folder.relative_to(ROOT)
        parts += [f"### {folder.name}", "", (folder / "results.md").read_text().strip(), ""]
        if (folder / "speedup.png").exists():
            parts += [f"![speed-up against size]({relative.as_posix()}/speedup.png)", ""]
        parts += [f"Raw figures: [`{relative.as_posix()}/results.json`]({relative.as_posix()}/results.json).", ""]
    parts.append(END)
    return "\n".join(parts)


def main(argv=None) -> None:
    folders = (argv if argv is not None else sys.argv[1:])
    if not folders:
        sys.exit(__doc__)
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"README.md has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + section(folders) + tail)
    print(f"README.md: benchmark section written from {', '.join(map(str, folders))}")


if __name__ == "__main__":
    main()
