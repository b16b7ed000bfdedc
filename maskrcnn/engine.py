"""The training loop: data loading, SGD or AdamW with a warm-up schedule,
optional gradient clipping and CUDA mixed precision, checkpoints with the
whole training state (resume continues the same run), a progress bar with
the running losses, and DistributedDataParallel under torchrun."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .data.collate import collate
from .data.sampler import EpochBatchSampler
from .distributed import DistributedContext
from .model import LOSS_NAMES, MaskRCNN
from .schedule import LRSchedule, set_learning_rate

OPTIMIZERS = ("sgd", "adamw")
CHECKPOINT_NAME = "last.pt"
# Short names of the losses in the progress bar.
_SHORT_NAMES = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask", "loss_objectness": "obj",
                "loss_rpn_box_reg": "rpn"}


def make_optimizer(
    model: nn.Module, *, kind: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """SGD with momentum, or AdamW, over the trainable parameters.

    Weight decay applies to the weights of convolutions and linear layers
    only: biases and normalization scales and shifts (the 1-D parameters)
    are left undecayed, since pulling them towards zero does not regularize
    anything and hurts normalization layers trained from scratch.
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() <= 1], "weight_decay": 0.0},
    ]
    # The fused implementations update all parameters in one kernel (on the
    # 2-core CPU a step of the small model took 35 ms less with AdamW).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def rng_state() -> Dict[str, Any]:
    """The torch RNG states (CPU, and every CUDA device when present), as
    tensors: what a resumed run restores so that its random samples
    continue the interrupted run's."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ThreadTuner:
    """Chooses the number of intra-op threads on a CPU shared with other jobs.

    On an idle 2-core machine a step of the small model took 0.35 s with 2
    threads and 0.55 s with 1; with another process busy on one core it
    took 1.14 s with 2 (the threads wait for each other at every operation)
    and 0.51 s with 1. So now and then the tuner runs ``probe`` steps with
    each candidate count (1 and the maximum) and keeps the one whose median
    step was shorter until the next probe. Probing the slow count costs
    time, so the interval between probes doubles (up to ``max_interval``)
    each time a probe confirms the current choice, and falls back to
    ``min_interval`` when it changes. The results do not depend on the
    choice beyond float rounding.

    Args:
        max_threads: the largest count (torch's default: the cores).
        probe: steps timed per candidate.
        min_interval, max_interval: steps from one decision to the next probe.
    """

    def __init__(self, *, max_threads: int, probe: int = 3, min_interval: int = 50, max_interval: int = 400) -> None:
        self.candidates = sorted({1, max_threads})
        self.probe = probe
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.interval = min_interval
        self.chosen = max_threads
        self.next_probe = 0
        self.timings: Dict[int, List[float]] = {}
        self.iterations_at: Dict[int, int] = {}

    def threads(self, step: int) -> int:
        """The count for step ``step`` of this run (0-based; called for
        every step in order)."""
        offset = step - self.next_probe
        probing = len(self.candidates) * self.probe
        if 0 <= offset < probing:
            if offset == 0:
                self.timings = {count: [] for count in self.candidates}
            return self.candidates[offset // self.probe]
        if offset == probing:
            best = min(self.candidates, key=lambda count: statistics.median(self.timings[count]))
            self.interval = min(2 * self.interval, self.max_interval) if best == self.chosen else self.min_interval
            self.chosen = best
            self.next_probe = step + self.interval
        return self.chosen

    def record(self, threads: int, seconds: float) -> None:
        if threads in self.timings:
            self.timings[threads].append(seconds)
        self.iterations_at[threads] = self.iterations_at.get(threads, 0) + 1


@dataclass
class TrainResult:
    """What a run did.

    Attributes:
        history: per iteration run here, the loss values (LOSS_NAMES and
            "loss", their sum) and "lr".
        start_iteration: the first iteration run here (> 0 after a resume).
        iterations: the run's total length (its last iteration is iterations - 1).
        seconds: wall time of the loop.
        checkpoint: the last checkpoint written, if any.
        threads: iterations run with each intra-op thread count.
        last_threads: the count in use at the end (the tuner's last choice).
    """

    history: List[Dict[str, float]] = field(default_factory=list)
    start_iteration: int = 0
    iterations: int = 0
    seconds: float = 0.0
    checkpoint: Optional[Path] = None
    threads: Dict[int, int] = field(default_factory=dict)
    last_threads: int = 1


class RunningLosses:
    """Medians of the last ``window`` values of each loss, for the progress
    bar (single iterations are noisy)."""

    def __init__(self, window: int = 20) -> None:
        self.values: Dict[str, Deque[float]] = {}
        self.window = window

    def add(self, values: Dict[str, float]) -> None:
        for name, value in values.items():
            self.values.setdefault(name, deque(maxlen=self.window)).append(value)

    def summary(self) -> str:
        parts = [f"loss {statistics.median(self.values['loss']):.3f}"]
        parts += [f"{_SHORT_NAMES[name]} {statistics.median(self.values[name]):.3f}"
                  for name in LOSS_NAMES if name in self.values]
        return " ".join(parts) + f" lr {self.values['lr'][-1]:.2g}"


def training_state(
    *, iteration: int, optimizer: torch.optim.Optimizer, optimizer_kind: str, schedule: LRSchedule,
    scaler: torch.amp.GradScaler, batch_size: int, seed: int, world_size: int,
) -> Dict[str, Any]:
    """The "training" entry of a checkpoint: everything but the weights
    that a resumed run needs (tensors and plain types only)."""
    return {
        "iteration": iteration,
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "grad_scaler": scaler.state_dict(),
        "rng": rng_state(),
        "data": {"batch_size": batch_size, "seed": seed, "world_size": world_size},
        "optimizer_kind": optimizer_kind,
    }


def load_training_state(path: Union[str, Path]) -> Dict[str, Any]:
    """The training state of a checkpoint written by ``train`` (its
    "training" entry, and the weights under "model"). CheckpointError if
    the file holds weights only."""
    checkpoint = read_checkpoint(path)
    training, state_dict = checkpoint.training, checkpoint.state_dict
    if training is None:
        raise CheckpointError(
            f"{path} holds model weights but no training state, so a run cannot resume from it "
            "(only checkpoints written during training can be resumed)"
        )
    for key in ("iteration", "optimizer", "optimizer_kind", "schedule", "grad_scaler", "rng", "data"):
        if key not in training:
            raise CheckpointError(f"{path}: the training state has no {key!r} entry")
    return {**training, "model": state_dict}


def training_step(
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: List[torch.Tensor],
    targets: List[Dict[str, Any]],
    *,
    amp: bool,
    max_grad_norm: Optional[float],
    iteration: int,
) -> Dict[str, float]:
    """One optimizer step on a batch: the losses (under float16 autocast
    if ``amp``), backward of their sum (scaled), optional clipping of the
    gradient norm, the step. Returns the loss values (LOSS_NAMES and
    "loss", their sum); FloatingPointError if the sum is not finite (after
    the backward, before any update, so the weights stay as they were)."""
    device_type = images[0].device.type
    with torch.autocast(device_type=device_type, dtype=torch.float16, enabled=amp):
        losses = network(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    # One device-to-host copy, after the backward is queued (reading each
    # loss before it would make the host wait for the forward six times).
    # The check still comes before any update.
    numbers = torch.stack([value.detach().float() for value in (*losses.values(), total)]).tolist()
    values = dict(zip([*losses, "loss"], numbers))
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(
            f"the loss became {values['loss']} at iteration {iteration}: "
            + ", ".join(f"{name} {value:.4g}" for name, value in values.items())
            + " (a smaller learning rate, a longer warm-up or --max-grad-norm may help)"
        )
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return values


def train(
    model: MaskRCNN,
    dataset: Dataset,
    *,
    schedule: Optional[LRSchedule] = None,
    batch_size: int = 2,
    optimizer: Optional[str] = None,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    max_grad_norm: Optional[float] = None,
    amp: bool = False,
    num_workers: int = 0,
    seed: int = 0,
    out_dir: Optional[Union[str, Path]] = None,
    checkpoint_every: int = 0,
    resume: Optional[Union[str, Path]] = None,
    context: Optional[DistributedContext] = None,
    adapt_threads: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Trains ``model`` on ``dataset`` in place.

    Args:
        model: a MaskRCNN (built by ``maskrcnn_resnet_fpn`` to be saved),
            on ``context.device``.
        dataset: (image, target) samples (see ``MaskRCNN``), e.g.
            ShapesDataset or CocoDataset.
        schedule: learning rate per iteration; its ``total_iterations`` is
            the run's length. May be None when resuming (the checkpoint's
            schedule continues); one given on resume replaces it (to extend
            a run, say).
        batch_size: images per step of each process (the global batch is
            batch_size * world_size).
        optimizer: "sgd" (momentum ``momentum``) or "adamw"; None: "sgd",
            or on resume the checkpoint's (a different one is an error).
        weight_decay: on weights only (see ``make_optimizer``).
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        amp: CUDA mixed precision (float16 autocast and a gradient scaler);
            an error on other devices.
        num_workers: DataLoader worker processes (0: load in this process).
        seed: the data order's and the global RNG's seed (ignored on
            resume: the checkpoint's RNG state continues).
        out_dir: where ``last.pt`` (weights and training state) is written
            every ``checkpoint_every`` iterations (0: never) and at the end.
            None: nothing is written.
        resume: a checkpoint written by a previous run: its weights,
            optimizer state, iteration and RNG state are restored and the
            run continues from there (the batch size and world size must
            be the same, so that the data order continues too).
        context: the distributed context (``init_distributed``); None: one
            process on the model's device. With several processes the model
            is wrapped in DistributedDataParallel, each rank reads its own
            share of every epoch, and only rank 0 shows progress and writes.
        adapt_threads: on the CPU, pick the number of intra-op threads by
            timing (``ThreadTuner``): for machines shared with other jobs.
        progress: show a tqdm bar with the running losses (rank 0).

    Returns:
        TrainResult. Raises FloatingPointError, naming the iteration and the
        losses, if the loss becomes NaN or infinite.
    """
    device = next(model.parameters()).device
    context = context or DistributedContext(device=device)
    if amp and device.type != "cuda":
        raise ValueError(f"amp (mixed precision) needs a CUDA device; the model is on {device}")
    state = load_training_state(resume) if resume is not None else None
    if state is not None:
        if schedule is None:
            schedule = LRSchedule.from_state_dict(state["schedule"])
        saved = state["data"]
        if (saved["batch_size"], saved["world_size"]) != (batch_size, context.world_size):
            raise ValueError(
                f"{resume} was written by a run with batch size {saved['batch_size']} on {saved['world_size']} "
                f"process(es); resume it with the same (got {batch_size} on {context.world_size})"
            )
        if optimizer not in (None, state["optimizer_kind"]):
            raise ValueError(f"{resume} was trained with {state['optimizer_kind']}; resume it with the same "
                             f"optimizer (got {optimizer})")
        optimizer = state["optimizer_kind"]
        seed = saved["seed"]
        model.load_state_dict(state["model"])
    if schedule is None:
        raise ValueError("a schedule is needed (or a checkpoint to resume, whose schedule continues)")
    optimizer = optimizer or "sgd"
    start = state["iteration"] if state is not None else 0
    if start >= schedule.total_iterations:
        raise ValueError(f"the run is already complete: {start} of {schedule.total_iterations} iterations done")

    if not model.class_names and getattr(dataset, "class_names", None):
        model.class_names = list(dataset.class_names)  # saved with the checkpoints, used by predict
    opt = make_optimizer(model, kind=optimizer, lr=schedule(start), weight_decay=weight_decay, momentum=momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["grad_scaler"])
    else:
        torch.manual_seed(seed + context.rank)

    loader = DataLoader(
        dataset,
        batch_sampler=EpochBatchSampler(len(dataset), batch_size=batch_size, seed=seed, rank=context.rank,
                                        world_size=context.world_size, start_batch=start),
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    model.train()
    network = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if context.distributed else model
    out_dir = Path(out_dir) if out_dir is not None else None
    result = TrainResult(start_iteration=start, iterations=schedule.total_iterations)
    running = RunningLosses()
    began = time.perf_counter()

    def save(iteration: int) -> None:
        if out_dir is None or not context.is_main:
            return
        result.checkpoint = out_dir / CHECKPOINT_NAME
        save_checkpoint(result.checkpoint, model, training=training_state(
            iteration=iteration, optimizer=opt, optimizer_kind=optimizer, schedule=schedule, scaler=scaler,
            batch_size=batch_size, seed=seed, world_size=context.world_size))

    bar = tqdm(total=schedule.total_iterations, initial=start, unit="it", dynamic_ncols=True,
               disable=not (progress and context.is_main))
    batches = iter(loader)
    if state is not None:
        # After iter(loader), which draws its workers' base seed from the
        # global RNG: the restored state is then exactly where the
        # interrupted run's sampling stood.
        restore_rng_state(state["rng"])
    default_threads = torch.get_num_threads()
    tuner = ThreadTuner(max_threads=default_threads) if adapt_threads and device.type == "cpu" else None
    try:
        for iteration in range(start, schedule.total_iterations):
            step_began = time.perf_counter()
            threads = tuner.threads(iteration - start) if tuner is not None else default_threads
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            images, targets = next(batches)
            learning_rate = schedule(iteration)
            set_learning_rate(opt, learning_rate)
            values = training_step(
                network, opt, scaler, [image.to(device, non_blocking=True) for image in images], targets,
                amp=amp, max_grad_norm=max_grad_norm, iteration=iteration,
            )
            values["lr"] = learning_rate
            if tuner is not None:
                tuner.record(threads, time.perf_counter() - step_began)
            result.history.append(values)
            running.add(values)
            bar.set_postfix_str(running.summary(), refresh=False)
            bar.update(1)
            done = iteration + 1
            if checkpoint_every > 0 and done % checkpoint_every == 0 and done < schedule.total_iterations:
                save(done)
    finally:
        bar.close()
        torch.set_num_threads(default_threads)
    result.threads = dict(tuner.iterations_at) if tuner is not None else {default_threads: len(result.history)}
    result.last_threads = tuner.chosen if tuner is not None else default_threads
    if context.distributed:
        # DDP sends rank 0's buffers (BatchNorm statistics) to every rank at
        # each forward, but each rank then updated its own with its last
        # batch: send them once more, so that all replicas end identical.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    save(schedule.total_iterations)
    result.seconds = time.perf_counter() - began
    return result


__all__ = ["CHECKPOINT_NAME", "OPTIMIZERS", "ThreadTuner", "TrainResult", "load_training_state", "make_optimizer",
           "restore_rng_state", "rng_state", "train", "training_state", "training_step"]
