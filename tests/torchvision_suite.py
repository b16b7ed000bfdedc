"""Run torchvision's own RoIAlign / MultiScaleRoIAlign / NMS tests twice: on
torchvision's kernels, then with maskrcnn_ops.patch_torchvision() active, and
list what the patch changes.

torchvision's wheels do not ship their tests: give a checkout of
https://github.com/pytorch/vision (at the tag of the installed torchvision)::

    python tests/torchvision_suite.py /path/to/vision
    python tests/torchvision_suite.py /path/to/vision -k "TestNMS and not cuda"

Each run is a separate pytest process on <checkout>/test/test_ops.py; the
patched one applies the patch before pytest imports the tests. Exit status 0
when the patched run passes every test the plain run passes.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from typing import Dict, List

# The classes the patch touches, on CPU; "RoIAlign" alone would also select
# TestPSRoIAlign, which the patch does not touch.
DEFAULT_SELECTION = "(TestRoIAlign or TestMultiScaleRoIAlign or TestNMS) and not cuda and not mps"

RUN_PYTEST = """
import sys
import pytest
if sys.argv[1] == "patched":
    import maskrcnn_ops
    maskrcnn_ops.patch_torchvision()
sys.exit(pytest.main(sys.argv[2:]))
"""


def run(mode: str, test_file: pathlib.Path, selection: str, extra: List[str], workdir: pathlib.Path) -> Dict[str, str]:
    """Outcome ("passed", "failed", "skipped") of every selected test, by id."""
    report = workdir / f"{mode}.xml"
    command = [sys.executable, "-c", RUN_PYTEST, mode, str(test_file), "-q", "-p", "no:cacheprovider",
               "-k", selection, f"--junitxml={report}", *extra]
    print(f"[{mode}] pytest {' '.join(command[4:])}", flush=True)
    # Run outside the checkout, so that `import torchvision` is the installed one.
    completed = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    print(f"[{mode}] {completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else completed.stderr}")
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[name] = "failed"
        elif case.find("skipped") is not None:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=pathlib.Path, help="a checkout of pytorch/vision")
    parser.add_argument("-k", dest="selection", default=DEFAULT_SELECTION, help=f"default: {DEFAULT_SELECTION!r}")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args()
    test_file = (args.checkout / "test" / "test_ops.py").resolve()
    if not test_file.is_file():
        parser.error(f"{test_file} does not exist: give the root of a pytorch/vision checkout")

    with tempfile.TemporaryDirectory() as workdir:
        plain = run("plain", test_file, args.selection, args.pytest_args, pathlib.Path(workdir))
        patched = run("patched", test_file, args.selection, args.pytest_args, pathlib.Path(workdir))

    for mode, outcomes in (("plain", plain), ("patched", patched)):
        counts = {kind: sum(1 for o in outcomes.values() if o == kind) for kind in ("passed", "failed", "skipped")}
        print(f"{mode:>8}: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
    broken = sorted(name for name, outcome in plain.items() if outcome == "passed" and patched.get(name) != "passed")
    for name in broken:
        print(f"passes plain, not patched: {name}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
