"""Writes the benchmark section of README.md from a results folder (so the
README's figures are never typed by hand).

    python -m benchmarks.readme [--render] benchmarks/results/<device>-<date> [more folders...]

--render first rewrites each folder's results.md and speedup.png from its
results.json with the current table and plot (which show the OpenVINO and
ONNX Runtime columns where the run has them; results recorded before the
peers existed render as they were, without them).
"""

from __future__ import annotations

import json
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


def render(folder: Path) -> None:
    """results.md and speedup.png of a results folder from its results.json."""
    from benchmarks.__main__ import markdown_table, plot

    data = json.loads((Path(folder) / "results.json").read_text())
    rows, env = data["results"], data["environment"]
    (Path(folder) / "results.md").write_text(markdown_table(env, rows, data.get("quick", False)))
    plot(rows, Path(folder) / "speedup.png", env)


def main(argv=None) -> None:
    folders = list(argv if argv is not None else sys.argv[1:])
    rendering = "--render" in folders
    folders = [f for f in folders if f != "--render"]
    if not folders:
        sys.exit(__doc__)
    if rendering:
        for folder in folders:
            render(folder)
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
