"""Multi-level RoIAlign: our fused ``MultiScaleRoIAlign`` vs torchvision's,
side by side, forward and forward+backward, at the box-head (1000 RoIs per
image, 7x7) and mask-head (100 RoIs per image, 14x14) workloads of Mask R-CNN
R50-FPN over P2-P5 of an 800x1088 batch of 2, 256 channels, float32.

    python -m benchmarks.multiscale [--device cpu|cuda] [--repeats 5] [--out DIR]

The same cases as ``python -m benchmarks --ops multiscale`` (same table and
output files).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main(["--ops", "multiscale", *sys.argv[1:]])
