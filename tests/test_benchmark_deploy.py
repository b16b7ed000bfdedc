"""How ``python -m benchmarks.deploy`` compares a contender's detections
with torchvision's: matched as sets within the tolerance, the ranks of the
unmatched ones on each side, and how far each of ours unmatched is from
the nearest of theirs with its label.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.deploy import agreement  # noqa: E402


def detections(boxes, labels):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    return {"boxes": boxes, "labels": torch.tensor(labels), "scores": torch.linspace(1, 0.5, len(labels))}


THEIRS = detections([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]], [1, 2, 1])


def test_identical_detections_match_fully():
    a = agreement([THEIRS], [THEIRS])
    assert a["matched"] == 3 and a["detections"] == 3 and a["same_order"]
    assert a["unmatched_ranks"] == {"ours": [], "theirs": []}
    assert a["unmatched_nearest_px"] == []


def test_a_box_moved_past_the_tolerance_is_unmatched_at_its_rank():
    ours = detections([[0, 0, 10, 10], [5, 5, 20.02, 20], [30, 30, 40, 40.004]], [1, 2, 1])
    a = agreement([ours], [THEIRS])
    assert a["matched"] == 2 and a["same_order"]
    assert a["unmatched_ranks"] == {"ours": [1], "theirs": [1]}
    assert abs(a["max_matched_box_diff_px"] - 0.004) < 1e-5
    assert len(a["unmatched_nearest_px"]) == 1 and abs(a["unmatched_nearest_px"][0] - 0.02) < 1e-5


def test_a_swap_at_the_cut_shows_as_last_ranks_with_no_counterpart():
    ours = detections([[0, 0, 10, 10], [5, 5, 20, 20], [50, 50, 60, 60]], [1, 2, 3])
    a = agreement([ours], [THEIRS])
    assert a["matched"] == 2 and not a["same_order"]
    assert a["unmatched_ranks"] == {"ours": [2], "theirs": [2]}
    assert a["unmatched_nearest_px"] == [float("inf")]  # no label 3 on their side
