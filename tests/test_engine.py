"""Tests of the training engine and its command line: learning-rate
schedule, the thread tuner (on made-up step times: load coming and going,
noise), epoch batches (shuffle, shards, resume), checkpoint and resume
(the resumed run equals the uninterrupted one), two-process
DistributedDataParallel on gloo (replicas stay identical), the train,
evaluate and demo commands on a tiny shapes run, and their errors.

Every run here uses the small ResNet-18 model on 64-px shapes for a few
iterations.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.testing import assert_close

import maskrcnn
from maskrcnn import demo
from maskrcnn.checkpoint import CheckpointError, save_checkpoint
from maskrcnn.cli import main
from maskrcnn.data import EpochBatchSampler, ShapesDataset
from maskrcnn.distributed import init_distributed, shutdown_distributed
from maskrcnn.engine import CHECKPOINT_NAME, load_training_state, train
from maskrcnn.presets import SMALL
from maskrcnn.schedule import LRSchedule
from maskrcnn.threads import StepThreads, ThreadTuner

TINY = ["--image-size", "64", "--batch-size", "2"]


def tiny_model() -> maskrcnn.MaskRCNN:
    torch.manual_seed(0)
    return maskrcnn.maskrcnn_small(num_classes=4, image_size=64)


def tiny_dataset(count: int = 40) -> ShapesDataset:
    return ShapesDataset(count, image_size=64, seed=0)


# ---------------------------------------------------------------- schedule


def test_schedule_warmup_then_cosine():
    schedule = LRSchedule(base_lr=0.1, total_iterations=110, warmup_iterations=10, warmup_factor=0.01)
    assert schedule(0) == pytest.approx(0.001)
    assert schedule(5) == pytest.approx(0.001 + 0.099 * 0.5)
    assert schedule(10) == pytest.approx(0.1)
    assert schedule(60) == pytest.approx(0.05)  # half way through the decay
    assert schedule(110) == pytest.approx(0.0, abs=1e-12)
    rates = [schedule(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_schedule_steps_constant_and_state():
    step = LRSchedule(base_lr=1.0, total_iterations=100, kind="step", steps=(0.5, 0.8), gamma=0.1)
    assert [step(i) for i in (0, 49, 50, 79, 80, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    constant = LRSchedule(base_lr=0.3, total_iterations=10, kind="constant", warmup_iterations=2)
    assert constant(1) < 0.3 and constant(2) == constant(9) == 0.3
    assert LRSchedule.from_state_dict(step.state_dict()) == step
    for bad in (dict(kind="linear"), dict(base_lr=0.0), dict(steps=(1.5,)), dict(total_iterations=0)):
        with pytest.raises(ValueError):
            LRSchedule(**{**dict(base_lr=0.1, total_iterations=10), **bad})


IDLE = {1: 0.55, 2: 0.35}  # seconds per step with 1 and 2 threads, every core free
BUSY = {1: 0.51, 2: 7.0}  # another process holds a core: two threads spin-wait on it
LOADED = {1: 0.51, 2: 1.14}  # a milder case of the same


def drive(tuner: ThreadTuner, seconds, steps: range):
    """Runs ``steps`` through the tuner; ``seconds(step, threads)`` is a
    step's time. Returns the count of each step and the messages by step."""
    counts, messages = [], {}
    for step in steps:
        threads = tuner.threads(step)
        counts.append(threads)
        message = tuner.record(threads, seconds(step, threads))
        if message is not None:
            messages[step] = message
    return counts, messages


def test_thread_tuner_probes_on_a_schedule():
    """A probe (2 steps at 1 thread, then 2 at 2) starts the run; the next
    comes twice as long after each decision that confirms the choice (up to
    max_interval), min_interval after one that changes it. Under load, a
    probe drops the 2-thread count after its first step."""
    tuner = ThreadTuner(max_threads=2, probe=2, min_interval=4, max_interval=16)
    counts, messages = drive(tuner, lambda step, threads: IDLE[threads], range(56))
    probes = [step for step in range(56) if counts[step:step + 4] == [1, 1, 2, 2]]
    assert probes == [0, 12, 32, 52]  # 8 steps after the first decision (it kept 2 threads), 16, 16
    assert counts.count(1) == 8 and not messages  # nothing changed, nothing to say
    assert tuner.iterations_at == {1: 8, 2: 48}

    tuner = ThreadTuner(max_threads=2, probe=3, min_interval=4, max_interval=16)
    counts, messages = drive(tuner, lambda step, threads: BUSY[threads], range(30))
    assert counts[:4] == [1, 1, 1, 2] and set(counts[4:8]) == {1}  # 2 threads timed once only
    assert counts[8:12] == [1, 1, 1, 2] and set(counts[12:20]) == {1}
    assert counts[20:24] == [1, 1, 1, 2] and counts.count(2) == 3
    assert list(messages) == [3] and messages[3].startswith("thread tuner: 2 -> 1 thread;")
    assert "2 threads 7.00 s (1 step)" in messages[3]
    assert ThreadTuner(max_threads=1).threads(0) == 1  # nothing to choose from


def test_thread_tuner_reacts_to_a_slowdown_at_once_and_recovers():
    """A neighbour takes a core at step 40 and leaves at step 200: one slow
    step starts a probe, which switches to 1 thread after one more slow
    step at 2; the scheduled probes bring 2 threads back once the core is
    free, and every change is explained."""
    busy = range(40, 200)
    tuner = ThreadTuner(max_threads=2, probe=3, min_interval=50, max_interval=400)
    counts, messages = drive(tuner, lambda step, threads: (BUSY if step in busy else IDLE)[threads], range(400))
    assert set(counts[6:40]) == {2}
    assert counts[40:45] == [2, 1, 1, 1, 2] and set(counts[45:95]) == {1}
    assert sum(counts[step] == 2 for step in busy) <= 5  # a slow step per probe: 2 at once, then the scheduled ones
    assert messages[40] == ("thread tuner: a step took 7.00 s with 2 threads (0.35 s when last timed); "
                            "timing 1 and 2 threads now")
    assert messages[44] == "thread tuner: 2 -> 1 thread; median step 1 thread 0.51 s (3 steps), 2 threads 7.00 s (1 step)"
    recovered = min(step for step, message in messages.items() if "1 -> 2 threads" in message)
    assert 200 <= recovered < 200 + 2 * 50 + 6 and set(counts[recovered + 1:recovered + 51]) == {2}
    assert len(messages) == 3


def test_thread_tuner_moderate_slowdown_needs_two_slow_steps():
    tuner = ThreadTuner(max_threads=2, probe=3)
    counts, messages = drive(tuner, lambda step, threads: (LOADED if step >= 20 else IDLE)[threads], range(40))
    assert counts[20:26] == [2, 2, 1, 1, 1, 2] and set(counts[26:]) == {1}
    assert list(messages) == [21, 25] and "1.14 s with 2 threads" in messages[21]


def test_thread_tuner_does_not_probe_when_one_thread_slows_down():
    """With 1 thread chosen, slower steps mean busier cores: 2 threads would
    be slower still, so only the schedule probes again."""
    heavier = {1: 5.0, 2: 30.0}
    tuner = ThreadTuner(max_threads=2, probe=3, min_interval=50)
    counts, messages = drive(tuner, lambda step, threads: (heavier if step >= 20 else BUSY)[threads], range(60))
    assert list(messages) == [3] and set(counts[4:54]) == {1}  # the first decision, then nothing until step 54
    assert counts[54:58] == [1, 1, 1, 2]


def test_thread_tuner_noise_does_not_cause_probe_storms():
    """A step a little slow never starts a probe; a very slow one starts
    one, which keeps 2 threads; each such false alarm doubles the lost time
    the next needs, so spikes every 15 steps bring few probes; a slowdown
    of every count alike starts one probe, whose times become the new
    reference."""
    tuner = ThreadTuner(max_threads=2, probe=3)
    counts, messages = drive(tuner, lambda step, threads: IDLE[threads] * (1.9 if step % 3 == 0 else 1), range(300))
    assert not messages and set(counts[6:50]) == {2}

    tuner = ThreadTuner(max_threads=2, probe=3)
    counts, messages = drive(tuner, lambda step, threads: IDLE[threads] * (10 if step % 15 == 14 else 1), range(400))
    alarms = [step for step, message in messages.items() if "a step took" in message]
    assert alarms[0] == 14 and len(alarms) <= 3
    assert all("staying at 2 threads" in messages[step + 6] for step in alarms)
    assert counts.count(1) <= 3 * (len(alarms) + 4)  # the probes' 1-thread steps only

    tuner = ThreadTuner(max_threads=2, probe=3)
    counts, messages = drive(tuner, lambda step, threads: IDLE[threads] * (3 if step >= 20 else 1), range(100))
    assert list(messages) == [21, 27] and "staying at 2 threads" in messages[27]  # two steps 3 times slower
    assert tuner.reference[2] == pytest.approx(3 * IDLE[2]) and set(counts[28:]) == {2}


def test_step_threads_apply_the_tuners_counts_and_put_torchs_back():
    default = torch.get_num_threads()
    fixed = StepThreads(None)
    assert [fixed.begin(step) for step in range(3)] == [default] * 3
    for _ in range(3):
        assert fixed.end(default, 0.1) is None
    assert fixed.iterations_at() == {default: 3} and fixed.last == default
    tuned = StepThreads(ThreadTuner(max_threads=2, probe=1))
    try:
        assert tuned.begin(0) == 1 and torch.get_num_threads() == 1  # a probe starts with 1 thread
        tuned.end(1, 0.5)
    finally:
        tuned.restore()
    assert torch.get_num_threads() == default and tuned.iterations_at() == {1: 1}


def test_train_shows_the_thread_count_and_the_tuners_messages(monkeypatch, capsys):
    import maskrcnn.engine as engine

    class SpeakingTuner(ThreadTuner):
        def record(self, threads, seconds):
            super().record(threads, seconds)
            return "thread tuner: a test message" if self.step == 1 else None

    monkeypatch.setattr(engine, "ThreadTuner", SpeakingTuner)
    train(tiny_model(), tiny_dataset(), schedule=LRSchedule(base_lr=1e-3, total_iterations=3), batch_size=2,
          adapt_threads=True, progress=True)
    captured = capsys.readouterr()
    assert "iteration 1: thread tuner: a test message" in captured.out + captured.err
    assert "threads 1" in captured.err  # a run starts by timing 1 thread


# ---------------------------------------------------------------- batches


def test_epoch_batches_shuffle_shard_and_resume():
    full = EpochBatchSampler(10, batch_size=2, seed=3)
    batches = list(next_n(iter(full), 10))
    assert len(full) == 5
    assert sorted(sum(batches[:5], [])) == list(range(10))  # epoch 0: each sample once
    assert batches[:5] != batches[5:]  # epoch 1: another order
    resumed = list(next_n(iter(EpochBatchSampler(10, batch_size=2, seed=3, start_batch=7)), 3))
    assert resumed == batches[7:10]
    ranks = [list(next_n(iter(EpochBatchSampler(11, batch_size=2, seed=3, rank=r, world_size=2)), 2)) for r in (0, 1)]
    seen = [i for rank in ranks for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == 8  # disjoint shares, full batches only
    with pytest.raises(ValueError, match="no full batch of 4 per process with 2 process"):
        EpochBatchSampler(7, batch_size=4, world_size=2)


def next_n(iterator, n):
    return [next(iterator) for _ in range(n)]


# ---------------------------------------------------------------- checkpoint and resume


def test_resume_continues_the_same_run(tmp_path):
    """3 + 2 iterations with a checkpoint in between give the weights of 5
    uninterrupted ones (data order, samples, optimizer and schedule all
    continue), and the file loads with weights_only=True."""
    schedule = LRSchedule(base_lr=1e-3, total_iterations=5, warmup_iterations=2)
    settings = dict(batch_size=2, optimizer="adamw", max_grad_norm=10.0, progress=False)
    straight = tiny_model()
    whole = train(straight, tiny_dataset(), schedule=schedule, **settings)

    first = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        _interrupted_run(first, schedule, tmp_path, settings)
    checkpoint = tmp_path / CHECKPOINT_NAME
    raw = torch.load(checkpoint, weights_only=True)
    assert raw["training"]["iteration"] == 3

    resumed_model = tiny_model()  # fresh weights: the checkpoint's replace them
    rest = train(resumed_model, tiny_dataset(), resume=checkpoint, **settings)
    assert rest.start_iteration == 3 and len(rest.history) == 2
    assert [h["loss"] for h in rest.history] == pytest.approx([h["loss"] for h in whole.history[3:]], rel=1e-5)
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _interrupted_run(model, schedule, out_dir, settings):
    """Trains until the checkpoint after iteration 3 is written, then stops
    at the next forward as a Ctrl-C would."""
    calls = {"n": 0}
    original_forward = model.forward

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        return original_forward(*args, **kwargs)

    model.forward = forward
    train(model, tiny_dataset(), schedule=schedule, out_dir=out_dir, checkpoint_every=3, **settings)


def test_resume_errors(tmp_path):
    weights_only = tmp_path / "weights.pt"
    save_checkpoint(weights_only, tiny_model())
    with pytest.raises(CheckpointError, match="no training state"):
        load_training_state(weights_only)
    model = tiny_model()
    schedule = LRSchedule(base_lr=1e-3, total_iterations=2)
    train(model, tiny_dataset(), schedule=schedule, batch_size=2, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch size 2 on 1 process"):
        train(model, tiny_dataset(), resume=tmp_path / CHECKPOINT_NAME, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="already complete: 2 of 2"):
        train(model, tiny_dataset(), resume=tmp_path / CHECKPOINT_NAME, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="trained with sgd; resume it with the same optimizer"):
        train(model, tiny_dataset(), resume=tmp_path / CHECKPOINT_NAME, batch_size=2, optimizer="adamw",
              progress=False)
    with pytest.raises(ValueError, match="amp .* needs a CUDA device"):
        train(model, tiny_dataset(), schedule=schedule, amp=True, progress=False)


def test_nan_loss_stops_with_a_clear_error():
    model = tiny_model()
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss became nan at iteration 0.*loss_classifier nan"):
        train(model, tiny_dataset(), schedule=LRSchedule(base_lr=1e-3, total_iterations=2), batch_size=2,
              progress=False)


# ---------------------------------------------------------------- distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    context = init_distributed(torch.device("cpu"))
    try:
        model = tiny_model()  # the same seed on both ranks; DDP also broadcasts rank 0's weights
        result = train(model, tiny_dataset(), schedule=LRSchedule(base_lr=1e-3, total_iterations=3),
                       batch_size=2, optimizer="adamw", context=context, out_dir=out_dir, progress=False)
        torch.save({"state": model.state_dict(), "losses": [h["loss"] for h in result.history]},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        shutdown_distributed(context)


def test_two_process_gloo_replicas_stay_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    initial = tiny_model().state_dict()
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), name  # replicas bitwise identical
    moved = [name for name, value in rank0["state"].items() if value.is_floating_point()
             and not torch.equal(value, initial[name])]
    assert "roi_heads.box_head.fc6.weight" in moved and "backbone.body.conv1.weight" in moved
    assert rank0["losses"] != rank1["losses"]  # each rank trained on its own share of the data
    assert (tmp_path / CHECKPOINT_NAME).is_file()  # rank 0 wrote the checkpoint


# ---------------------------------------------------------------- command line


def test_cli_train_resume_and_evaluate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--iterations", "2", "--shapes-images", "20", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "trained iterations 0..2" in capsys.readouterr().out
    assert main(["train", *TINY, "--iterations", "3", "--shapes-images", "20", "--out", str(out),
                 "--resume", str(out / CHECKPOINT_NAME), "--device", "cpu"]) == 0
    assert "trained iterations 2..3" in capsys.readouterr().out
    assert torch.load(out / CHECKPOINT_NAME, weights_only=True)["training"]["iteration"] == 3

    metrics_file = tmp_path / "metrics.json"
    assert main(["evaluate", "--weights", str(out / CHECKPOINT_NAME), "--image-size", "64", "--shapes-images", "4",
                 "--out", str(metrics_file), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "box" in printed and "mask" in printed and "AP50" in printed
    written = json.loads(metrics_file.read_text())
    assert written["images"] == 4 and set(written["metrics"]) == {"bbox", "segm"}
    value = written["metrics"]["segm"]["AP50"]
    assert value is None or 0.0 <= value <= 1.0


def test_cli_train_on_coco_folder_and_bad_input(tmp_path, capsys):
    """A COCO folder with an image without objects and a zero-width
    annotation (dropped by the reader) trains through; a corrupt
    annotations file, a missing --annotations and --amp on the CPU are
    one-line errors."""
    from maskrcnn.data import write_coco_folder

    images_dir, annotations_file = write_coco_folder(ShapesDataset(4, image_size=64, seed=5), tmp_path / "coco")
    annotations = json.loads(annotations_file.read_text())
    annotations["annotations"] = [a for a in annotations["annotations"] if a["image_id"] != 0]
    degenerate = dict(annotations["annotations"][0], id=10_000, bbox=[5.0, 5.0, 0.0, 10.0])
    annotations["annotations"].append(degenerate)
    annotations_file.write_text(json.dumps(annotations))
    coco = ["--dataset", "coco", "--images", str(images_dir), "--annotations", str(annotations_file)]
    assert main(["train", *coco, "--image-size", "64", "--batch-size", "2", "--epochs", "1", "--out",
                 str(tmp_path / "out"), "--device", "cpu"]) == 0
    capsys.readouterr()

    (tmp_path / "corrupt.json").write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": [')
    assert main(["train", "--dataset", "coco", "--images", str(images_dir), "--annotations",
                 str(tmp_path / "corrupt.json"), "--device", "cpu"]) == 1
    assert "corrupt.json" in capsys.readouterr().err
    assert main(["train", "--dataset", "coco", "--images", str(images_dir), "--device", "cpu"]) == 1
    assert "needs --images DIR and --annotations FILE" in capsys.readouterr().err
    assert main(["train", "--amp", "--device", "cpu", "--iterations", "1"]) == 1
    assert "--amp (mixed precision) needs a CUDA device" in capsys.readouterr().err


def test_demo_writes_metrics_and_picture(tmp_path, capsys):
    summary = demo.run_demo(out_dir=tmp_path, iterations=2, validation_images=4, progress=False)
    printed = capsys.readouterr().out
    assert "mask AP50" in printed and "wall time" in printed
    assert {"bbox", "segm"} == set(summary["metrics"])
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text  # strict JSON: no objects of a size is null
    written = json.loads(text)
    assert written["iterations"] == 2 and written["validation_images"] == 4
    from PIL import Image

    with Image.open(tmp_path / "predictions.png") as picture:
        assert picture.width >= 4 * demo.PICTURE_SCALE * SMALL.image_size  # four enlarged images per row
    trained = maskrcnn.load_model(tmp_path / demo.WEIGHTS_NAME)
    assert trained.num_classes == 4
    assert trained.class_names == ["__background__", "circle", "square", "triangle"]  # for predict's captions


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_amp_training_on_cuda():
    model = tiny_model().cuda()
    result = train(model, tiny_dataset(), schedule=LRSchedule(base_lr=1e-3, total_iterations=3), batch_size=2,
                   optimizer="adamw", amp=True, progress=False)
    assert all(math.isfinite(h["loss"]) for h in result.history)
