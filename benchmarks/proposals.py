"""Box decoding and RPN proposal generation, maskrcnn_ops vs torchvision.

Workload: Mask R-CNN R50-FPN RPN on a batch of 2 images padded to 800x1088
(unpadded 800x1066 and 736x1088), 5 FPN levels (strides 4-64), 3 anchors
per location (217,362 anchors per image); logits ~ N(0, 1), deltas ~
N(0, 0.5) (seeded).
  decode:     all anchors of both images, ours decode_boxes vs BoxCoder.decode_single
  proposals:  torchvision's decode + RegionProposalNetwork.filter_proposals vs
              ours generate_proposals, test (1000/1000) and train (2000/2000)
              pre/post-NMS top-n, NMS 0.7, min_size 1e-3

    python -m benchmarks.proposals [--device cpu|cuda] [--repeats 5] [--json OUT] [--markdown OUT]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import maskrcnn_ops  # noqa: E402
from benchmarks.common import add_output_arguments, environment, time_call, write_outputs  # noqa: E402

BATCH_HW = (800, 1088)
IMAGE_SIZES = [(800, 1066), (736, 1088)]
STRIDES = (4, 8, 16, 32, 64)
SIZES = ((32,), (64,), (128,), (256,), (512,))
RATIOS = ((0.5, 1.0, 2.0),) * 5


def rpn_inputs(device: str, dtype: torch.dtype, levels: int = len(STRIDES)):
    """Per-level objectness [2, 3, H, W], deltas [2, 12, H, W] and empty
    features of the first `levels` levels (the same values for any
    `levels`)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(-(-BATCH_HW[0] // s), -(-BATCH_HW[1] // s)) for s in STRIDES[:levels]]
    objectness = [torch.randn(2, 3, h, w, generator=generator).to(device, dtype) for h, w in shapes]
    deltas = [(0.5 * torch.randn(2, 12, h, w, generator=generator)).to(device, dtype) for h, w in shapes]
    features = [torch.empty(2, 1, h, w, device=device, dtype=dtype) for h, w in shapes]
    return objectness, deltas, features


def rpn_problem(device: str, dtype: torch.dtype, levels: int = len(STRIDES)) -> dict:
    """The standard RPN inputs (of the first `levels` levels) in both
    libraries' layouts: torchvision's anchors and flattened head outputs,
    and ours."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    objectness, deltas, features = rpn_inputs(device, dtype, levels)
    sizes, ratios = SIZES[:levels], RATIOS[:levels]
    images = ImageList(torch.empty(2, 3, *BATCH_HW, device=device, dtype=dtype), IMAGE_SIZES)
    obj_tv, del_tv = concat_box_prediction_layers(objectness, deltas)
    obj, dlt, per_level = maskrcnn_ops.flatten_rpn_outputs(objectness, deltas)
    return dict(
        anchors_tv=TVAnchorGenerator(sizes, ratios)(images, features), obj_tv=obj_tv, del_tv=del_tv,
        anchors=maskrcnn_ops.AnchorGenerator(sizes, ratios)(images, features)[0], obj=obj, dlt=dlt,
        per_level=per_level,
    )


def proposal_problem(device: str, dtype: torch.dtype, top_n: int, levels: int = len(STRIDES)):
    """(ours, theirs): zero-argument callables for the standard RPN workload
    (its first `levels` levels) with pre/post-NMS top-n `top_n`:
    generate_proposals against torchvision's
    decode + RegionProposalNetwork.filter_proposals, on the same inputs.
    Both return (boxes per image, scores per image)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    p = rpn_problem(device, dtype, levels)
    sizes = torch.tensor(IMAGE_SIZES, device=device)
    rpn = RegionProposalNetwork(
        TVAnchorGenerator(SIZES, RATIOS), RPNHead(1, 3), 0.7, 0.3, 256, 0.5,
        dict(training=top_n, testing=top_n), dict(training=top_n, testing=top_n), 0.7,
    ).to(device).eval()

    def theirs():
        proposals = rpn.box_coder.decode(p["del_tv"].detach(), p["anchors_tv"]).view(2, -1, 4)
        return rpn.filter_proposals(proposals, p["obj_tv"], IMAGE_SIZES, p["per_level"])

    def ours():
        return maskrcnn_ops.generate_proposals(
            p["obj"], p["dlt"], p["anchors"], p["per_level"], sizes,
            pre_nms_top_n=top_n, post_nms_top_n=top_n, nms_thresh=0.7,
        )

    return ours, theirs


def run(device: str, dtype: torch.dtype, repeats: int) -> list:
    from torchvision.models.detection._utils import BoxCoder

    p = rpn_problem(device, dtype)
    del_tv = p["del_tv"]
    rows = []

    # Decode of every anchor of both images.
    anchors_both = torch.cat(p["anchors_tv"])
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    row = dict(op="decode_boxes", workload=f"{anchors_both.size(0)} boxes", device=device, dtype=str(dtype)[6:],
               max_abs_diff=(maskrcnn_ops.decode_boxes(del_tv, anchors_both) - coder.decode_single(del_tv, anchors_both))
               .abs().max().item())
    row["ours_ms"] = time_call(lambda: maskrcnn_ops.decode_boxes(del_tv, anchors_both), device, repeats)
    row["torchvision_ms"] = time_call(lambda: coder.decode_single(del_tv, anchors_both), device, repeats)
    rows.append(row)

    for name, top_n in (("test", 1000), ("train", 2000)):
        ours, theirs = proposal_problem(device, dtype, top_n)
        (tb, ts), (ob, os_) = theirs(), ours()
        row = dict(op="generate_proposals", workload=f"2 images, 5 levels, {name} {top_n}/{top_n}", device=device,
                   dtype=str(dtype)[6:], proposals=[len(b) for b in ob],
                   identical=all(same_up_to_ties(*args) for args in zip(tb, ts, ob, os_)))
        row["ours_ms"] = time_call(ours, device, repeats)
        row["torchvision_ms"] = time_call(theirs, device, repeats)
        rows.append(row)
    for r in rows:
        r["speedup"] = r["torchvision_ms"] / r["ours_ms"]
    return rows


def same_up_to_ties(boxes_a, scores_a, boxes_b, scores_b) -> bool:
    """Same scores in the same order, and boxes within 1e-5 relative once
    each run of equal scores is put in a canonical order (torchvision's
    batched_nms orders equal scores arbitrarily)."""
    if not torch.equal(scores_a, scores_b):
        return False

    def canonical(boxes, scores):
        keys = torch.cat([scores[:, None].double(), boxes.double()], 1).cpu()
        order = sorted(range(len(keys)), key=lambda i: (-keys[i, 0].item(), *keys[i, 1:].tolist()))
        return boxes[order]

    return torch.allclose(canonical(boxes_a, scores_a), canonical(boxes_b, scores_b), rtol=1e-5, atol=1e-4)


def markdown_table(env: dict, rows: list) -> str:
    lines = [
        f"Box decoding and proposals on {env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
        f"torchvision {env['torchvision']}, commit {env['commit']}; median of repeated runs, ms.",
        "",
        "| op | workload | dtype | same result | ours ms | torchvision ms | speed-up |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        same = {True: "yes", False: "NO"}.get(r.get("identical"), "(max abs diff %.1e)" % r.get("max_abs_diff", 0))
        lines.append(f"| {r['op']} | {r['workload']} | {r['dtype']} | {same} | {r['ours_ms']:.2f} | "
                     f"{r['torchvision_ms']:.2f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    rows = run(args.device, getattr(torch, args.dtype), args.repeats)
    for r in rows:
        print(f"{r['op']:20} {r['workload']:40} ours {r['ours_ms']:8.2f} ms  torchvision {r['torchvision_ms']:8.2f} ms  "
              f"{r['speedup']:6.2f}x", flush=True)
    write_outputs(args, environment(args.device), rows, markdown_table)


if __name__ == "__main__":
    main()
