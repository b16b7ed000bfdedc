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
    # The fused implementations update all parameters in one kernel instead
    # of a few small operations per tensor.
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

    With every core free, the most threads are fastest. When another process
    keeps a core busy, a step with as many threads as cores can take many
    times longer than with one thread: the threads meet at the end of every
    parallel operation, and each time the thread that shares the busy core
    must wait for its turn on it while the others spin. One thread waits
    for no one. The results do not depend on the count beyond float
    rounding, so the tuner times steps and keeps the faster count.

    A probe times ``probe`` steps with each candidate, 1 first and then the
    maximum, and keeps the count whose median step was shorter. The larger
    count is dropped after its first step when that step alone took more
    than ``slow_factor`` times the 1-thread median: on a busy machine a
    probe costs one slow step, not ``probe`` of them. Probes come

    - on a schedule, ``min_interval`` steps after a decision, then twice as
      long after each probe that confirms the choice (up to
      ``max_interval``), and ``min_interval`` again after one that changes
      it. Only these bring the maximum back once the load goes away: one
      thread does not get faster when the other cores free up, so there is
      nothing to notice.
    - at once when steps at the chosen count slow down. Each step longer
      than ``slow_factor`` times the count's median at the last probe adds
      its excess to a tally of lost time; each other step halves the
      tally. When the tally exceeds ``probe`` of those medians (about what
      a probe costs), the next step starts a probe. So one very slow step
      is enough, a few moderately slow ones too, one a little slow never.
      A probe that keeps the count (the slowdown was noise, or slowed every
      count alike: its times are then the new reference) doubles the tally
      needed for the next one, up to ``max_patience`` times, so noise cannot
      make it probe over and over; a change of count resets it.

    Decisions that change the count, and probes started by a slowdown, are
    described by the message that ``record`` returns (and ``messages``
    keeps) for the progress bar.

    Args:
        max_threads: the largest count (torch's default: the cores).
        probe: steps timed per candidate.
        min_interval, max_interval: steps from one decision to the next
            scheduled probe.
        slow_factor: a step is slow when it takes this many times the
            reference median.
        max_patience: the largest multiple of the lost time that starts a
            probe after false alarms.
    """

    def __init__(self, *, max_threads: int, probe: int = 3, min_interval: int = 50, max_interval: int = 400,
                 slow_factor: float = 2.0, max_patience: int = 8) -> None:
        self.candidates = sorted({1, max_threads})
        self.probe = probe
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.slow_factor = slow_factor
        self.max_patience = max_patience
        self.interval = min_interval
        self.chosen = max_threads
        self.next_probe = 0
        self.step = 0
        # The probe under way: the counts of its remaining steps, in order,
        # the step times so far, and whether a slowdown started it.
        self.queue: List[int] = []
        self.timings: Dict[int, List[float]] = {}
        self.after_slowdown = False
        # Median step time of each count at the last probe that timed it.
        self.reference: Dict[int, float] = {}
        self.lost_seconds = 0.0
        self.patience = 1
        self.iterations_at: Dict[int, int] = {}
        self.messages: List[str] = []

    def threads(self, step: int) -> int:
        """The count for step ``step`` of this run (0-based; called for
        every step in order, each followed by ``record``)."""
        self.step = step
        if not self.queue and len(self.candidates) > 1 and step >= self.next_probe:
            self._start_probe(after_slowdown=False)
        return self.queue[0] if self.queue else self.chosen

    def record(self, threads: int, seconds: float) -> Optional[str]:
        """Notes that the step took ``seconds`` with ``threads`` threads.
        Returns a message for the user when the tuner changed its count or
        starts a probe because steps slowed down, else None."""
        self.iterations_at[threads] = self.iterations_at.get(threads, 0) + 1
        if self.queue:
            message = self._record_probe_step(threads, seconds)
        elif threads == self.chosen and threads in self.reference:
            message = self._watch(seconds)
        else:
            message = None
        if message is not None:
            self.messages.append(message)
        return message

    def _start_probe(self, *, after_slowdown: bool) -> None:
        self.queue = [count for count in self.candidates for _ in range(self.probe)]
        self.timings = {}
        self.after_slowdown = after_slowdown

    def _watch(self, seconds: float) -> Optional[str]:
        reference = self.reference[self.chosen]
        if seconds > self.slow_factor * reference:
            self.lost_seconds += seconds - reference
        else:
            self.lost_seconds /= 2
        if self.lost_seconds <= self.patience * self.probe * reference:
            return None
        self._start_probe(after_slowdown=True)
        return (f"thread tuner: a step took {seconds:.2f} s with {_threads_text(self.chosen)} "
                f"({reference:.2f} s when last timed); timing {' and '.join(map(str, self.candidates))} threads now")

    def _record_probe_step(self, threads: int, seconds: float) -> Optional[str]:
        self.queue.pop(0)
        times = self.timings.setdefault(threads, [])
        times.append(seconds)
        if len(times) == 1 and self.queue and self.queue[0] == threads:
            others = [statistics.median(t) for count, t in self.timings.items() if count != threads]
            if others and seconds > self.slow_factor * min(others):
                self.queue = [count for count in self.queue if count != threads]
        return None if self.queue else self._decide()

    def _decide(self) -> Optional[str]:
        medians = {count: statistics.median(times) for count, times in self.timings.items()}
        best = min(medians, key=medians.__getitem__)
        previous, self.chosen = self.chosen, best
        self.reference.update(medians)
        self.lost_seconds = 0.0
        if best != previous:
            self.interval = self.min_interval
            self.patience = 1
        elif self.after_slowdown:
            self.patience = min(2 * self.patience, self.max_patience)
        else:
            self.interval = min(2 * self.interval, self.max_interval)
        self.next_probe = self.step + 1 + self.interval
        if best == previous and not self.after_slowdown:
            return None
        timed = ", ".join(f"{_threads_text(count)} {median:.2f} s ({_steps_text(len(self.timings[count]))})"
                          for count, median in sorted(medians.items()))
        if best != previous:
            return f"thread tuner: {previous} -> {_threads_text(best)}; median step {timed}"
        return f"thread tuner: staying at {_threads_text(best)}; median step {timed}"


def _threads_text(count: int) -> str:
    return f"{count} thread" if count == 1 else f"{count} threads"


def _steps_text(count: int) -> str:
    return "1 step" if count == 1 else f"{count} steps"


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
            The progress bar then shows the count in use, and a line
            above it says when and why the count changes.
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
            step_seconds = time.perf_counter() - step_began
            values["lr"] = learning_rate
            result.history.append(values)
            running.add(values)
            summary = running.summary()
            if tuner is not None:
                message = tuner.record(threads, step_seconds)
                if message is not None and not bar.disable:
                    bar.write(f"iteration {iteration}: {message}")
                summary += f" threads {threads}"
            bar.set_postfix_str(summary, refresh=False)
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
