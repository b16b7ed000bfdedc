"""The peer runtimes of ``python -m benchmarks`` (benchmarks/peers.py):
each peer's column of the quick run is filled where the peer has the op and
agrees with ours where its semantics are ours; a missing peer package
leaves the columns empty with a note; old results without peer fields
render as before.
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import peers  # noqa: E402
from benchmarks.__main__ import markdown_table, peers_run, plot  # noqa: E402
from benchmarks.suite import FAMILIES, run_case  # noqa: E402

# The quick cases that have peers, and which peers have their op.
PEER_OPS = {"roi_align": ("openvino", "onnxruntime"), "multi_scale_roi_align": ("openvino",),
            "nms": ("openvino", "onnxruntime"), "batched_nms": ("openvino", "onnxruntime"),
            "generate_proposals": ("openvino",)}


def installed(peer: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in (peer, "onnx"))


def quick_peer_cases():
    cases = [case for family in ("roi_align", "multiscale", "nms", "proposals") for case in FAMILIES[family]("cpu", True)]
    return [case for case in cases
            if case.op in PEER_OPS and (case.op != "generate_proposals" or "1 level" in case.workload)]


@pytest.fixture(scope="module")
def quick_rows():
    if not any(installed(p) for p in peers.PEERS):
        pytest.skip("neither openvino nor onnxruntime is installed")
    return [run_case(case, "cpu", repeats=1) for case in quick_peer_cases()]


def test_quick_cases_cover_every_family_with_a_peer():
    assert {case.op for case in quick_peer_cases()} == set(PEER_OPS)


@pytest.mark.parametrize("peer", peers.PEERS)
def test_peer_columns_of_the_quick_run(peer, quick_rows):
    if not installed(peer):
        pytest.skip(f"{peer} is not installed")
    for row in quick_rows:
        where = f"{row['op']} {row['workload']} {row['layout']}"
        if peer not in PEER_OPS[row["op"]]:
            assert row[f"{peer}_ms"] is None and row[f"{peer}_agree"] is None, where
            continue
        assert row.get(f"{peer}_note") is None or row[f"{peer}_expect_agree"] is False, (where, row.get(f"{peer}_note"))
        assert row[f"{peer}_ms"] > 0, where
        if row["op"] == "generate_proposals":
            # Detectron's +1 convention: the same proposals but for the few
            # boxes that end within 1 px of the top or left image edge.
            assert row[f"{peer}_expect_agree"] is False
            assert row[f"{peer}_diff"] < 20, where
        else:
            assert row[f"{peer}_agree"] is True, (where, row[f"{peer}_diff"])
            assert row[f"{peer}_diff"] <= 1e-4, where


@pytest.mark.parametrize("classes", [1, 80])
def test_openvino_bfloat16_nms_differs_only_at_the_threshold(classes):
    """OpenVINO's bfloat16 NMS peer (the bfloat16 rows of the suite) also
    suppresses at a float32 IoU equal to the threshold (benchmarks/peers.py):
    with 40 pairs of boxes whose IoU is exactly float32(0.7) among random
    ones, its kept set is ours with the threshold one float32 step lower,
    which drops one box of each pair that ours keeps. The suite's bfloat16
    NMS rows mark it as a known difference."""
    if not installed("openvino"):
        pytest.skip("openvino is not installed")
    import numpy as np

    import maskrcnn_ops
    from benchmarks.common import random_boxes

    g = torch.Generator().manual_seed(3)
    iou = 0.7
    # 40 pairs on a 16 px lattice (exact in bfloat16), apart from the random boxes.
    grid = torch.arange(49, dtype=torch.float32)[:40]
    x, y = (grid % 7 * 16)[:, None], (grid // 7 * 16)[:, None]
    square = torch.cat([x, y, x + 10, y + 10], 1)  # area 100
    shorter = torch.cat([x, y, x + 10, y + 7], 1)  # inside it, area 70: IoU 0.7
    boxes = torch.cat([random_boxes(2000, g) + 200, square, shorter]).bfloat16()
    scores = torch.rand(len(boxes), generator=g).bfloat16()
    pair_class = torch.randint(0, classes, (40,), generator=g)
    idxs = torch.cat([torch.randint(0, classes, (2000,), generator=g), pair_class, pair_class])
    theirs = peers.nms_openvino(boxes, scores, iou, *((idxs, classes) if classes > 1 else ()))()
    below = float(np.nextafter(np.float32(iou), np.float32(0)))
    ours = set(maskrcnn_ops.batched_nms(boxes, scores, idxs, iou).tolist())
    ours_below = set(maskrcnn_ops.batched_nms(boxes, scores, idxs, below).tolist())
    assert len(ours - ours_below) == 40
    assert set(theirs.tolist()) == ours_below
    rows = [case for case in FAMILIES["nms"]("cpu", False) if case.dtype == "bfloat16"]
    assert {case.op for case in rows} == {"nms", "batched_nms"}
    for case in rows:
        case_peers = case.setup()[3]
        assert set(case_peers.builders) == {"openvino"} and case_peers.expect_agree is False


def test_a_missing_peer_is_noted_not_run(monkeypatch):
    monkeypatch.setattr(peers, "available", lambda: [])
    case = next(case for case in quick_peer_cases() if case.op == "nms")
    row = run_case(case, "cpu", repeats=1)
    for peer in peers.PEERS:
        assert row[f"{peer}_ms"] is None and row[f"{peer}_agree"] is None
        assert row[f"{peer}_note"] == "not installed"
    assert row["agree"] is True and row["ours_ms"] > 0


def test_peer_graph_rejected_is_a_note_not_a_crash(monkeypatch):
    """A runtime that refuses a graph (e.g. an older OpenVINO without an op)
    leaves its columns empty with its error as the note."""
    if not installed("onnxruntime"):
        pytest.skip("onnxruntime is not installed")

    def refuse(*args, **kwargs):
        raise RuntimeError("no kernel for NonMaxSuppression")

    monkeypatch.setattr(peers, "nms_onnxruntime", refuse)
    case = next(case for case in quick_peer_cases() if case.op == "nms")
    row = run_case(case, "cpu", repeats=1)
    assert row["onnxruntime_ms"] is None and row["onnxruntime_agree"] is None
    assert row["onnxruntime_note"] == "RuntimeError: no kernel for NonMaxSuppression"


def peer_row(**peer_fields):
    row = dict(op="nms", workload="1000 boxes IoU 0.7", dtype="float32", layout="-", sweep="nms: boxes",
               size=1000.0, device="cpu", agree=True, ours_ms=1.0, torchvision_ms=10.0, speedup=10.0)
    row.update(peer_fields)
    return row


def test_table_shows_the_peers_run_and_old_rows_as_before():
    env = dict(device_name="CPU test", threads=2, torch="2", torchvision="0", commit="abc")
    old = markdown_table(env, [peer_row()], quick=True)
    assert "OpenVINO" not in old and "ONNX Runtime" not in old
    assert old.splitlines()[2] == "| op | workload | dtype | layout | ours ms | torchvision ms | speed-up | agree |"
    rows = [peer_row(openvino_ms=2.0, openvino_agree=True, openvino_diff=0.0, openvino_expect_agree=True,
                     onnxruntime_ms=None, onnxruntime_agree=None, onnxruntime_diff=None),
            peer_row(op="generate_proposals", openvino_ms=3.0, openvino_agree=False, openvino_diff=6.0,
                     openvino_expect_agree=False)]
    assert peers_run(rows) == ["openvino"]
    lines = markdown_table(env, rows, quick=True).splitlines()
    assert lines[2].endswith("| agree | OpenVINO ms | OpenVINO agree |")
    assert lines[4].endswith("| yes | 2.00 | yes |")
    assert lines[5].endswith("| yes | 3.00 | no (known), diff 6 |")


def test_plot_with_and_without_peers(tmp_path):
    env = dict(device_name="CPU test")
    sizes = [dict(size=float(n), ours_ms=n / 1e3) for n in (1000, 3000)]
    old = [peer_row(**s) for s in sizes]
    assert plot(old, tmp_path / "old.png", env) and (tmp_path / "old.png").stat().st_size > 0
    new = [peer_row(openvino_ms=s["ours_ms"] * 3, **s) for s in sizes]
    assert plot(new, tmp_path / "new.png", env) and (tmp_path / "new.png").stat().st_size > 0


def test_readme_renders_a_results_folder_recorded_before_the_peers(tmp_path):
    from benchmarks.readme import render

    recorded = REPO / "benchmarks" / "results" / "cpu-2026-11-30"
    for name in ("results.json", "results.md"):
        shutil.copy(recorded / name, tmp_path / name)
    assert not any(key.startswith(peers.PEERS) for row in json.loads((recorded / "results.json").read_text())["results"]
                   for key in row)
    render(tmp_path)
    assert (tmp_path / "results.md").read_text() == (recorded / "results.md").read_text()
    assert (tmp_path / "speedup.png").stat().st_size > 0


def identity_model():
    from onnx import TensorProto, helper

    return peers._onnx_model([helper.make_node("Identity", ["x"], ["y"])], [("x", TensorProto.FLOAT, [2])],
                             [("y", TensorProto.FLOAT, [2])])


@pytest.mark.parametrize("peer", peers.PEERS)
def test_peers_take_our_thread_count(peer):
    if not installed(peer):
        pytest.skip(f"{peer} is not installed")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        if peer == "onnxruntime":
            options = peers.onnxruntime_session(identity_model()).get_session_options()
            assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
        else:
            compiled = peers.openvino_compile(identity_model())
            assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
            import openvino

            assert compiled.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not installed("openvino"), reason="openvino is not installed")
def test_openvino_bfloat16_roi_align_is_ours_within_a_bfloat16_spacing():
    """The bfloat16 row's peer: OpenVINO's ROIAlign with bf16 parameters and
    inference precision, bits in and out as bfloat16."""
    import maskrcnn_ops
    from benchmarks.suite import compare_tensors

    generator = torch.Generator().manual_seed(3)
    features = torch.randn(2, 32, 20, 24, generator=generator).bfloat16()
    corners = torch.rand(40, 2, generator=generator) * 30
    sides = torch.rand(40, 2, generator=generator) * 20 + 1
    rois = torch.cat([torch.arange(2).repeat(20)[:, None].float(), corners, corners + sides], 1).bfloat16()
    theirs = peers.roi_align_openvino(features, rois, 7, 0.5, 2)()
    ours = maskrcnn_ops.roi_align(features, rois, (7, 7), 0.5, 2, True)
    assert theirs.dtype == torch.bfloat16 and theirs.shape == ours.shape
    agree, difference = compare_tensors(ours, theirs, tol=2.0**-6)
    assert agree, difference
