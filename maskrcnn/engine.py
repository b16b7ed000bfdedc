"""The training loop: data loading, SGD or AdamW with a warm-up schedule,
optional gradient clipping and CUDA mixed precision, checkpoints with the
whole training state (resume continues the same run), a progress bar with
the running losses, DistributedDataParallel under torchrun, and on a shared
CPU the thread count of ``maskrcnn.threads``."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .data.batching import collate
from .data.sampler import EpochBatchSampler
from .distributed import DistributedContext
from .model import MaskRCNN
from .schedule import LRSchedule, set_learning_rate
from .threads import StepThreads, ThreadTuner

OPTIMIZERS = ("sgd", "adamw")
CHECKPOINT_NAME = "last.pt"
# Short names of the losses in the progress bar.
_SHORT_NAMES = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask", "loss_objectness": "obj",
                "loss_rpn_box_reg": "rpn", "loss_keypoint": "kp"}


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


@dataclass
class TrainResult:
    """What a run did.

    Attributes:
        history: per iteration run here, the loss values (``MaskRCNN.loss_names`` and
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
                  for name in _SHORT_NAMES if name in self.values]
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
    gradient norm, the step. Returns the loss values (``MaskRCNN.loss_names`` and
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


@dataclass(frozen=True)
class RunPlan:
    """Where a run starts: its schedule, optimizer kind, seed and first
    iteration, and on resume the checkpoint's training state (``state``,
    else None)."""

    schedule: LRSchedule
    optimizer: str
    seed: int
    start: int
    state: Optional[Dict[str, Any]]


def plan_run(
    *, schedule: Optional[LRSchedule], optimizer: Optional[str], seed: int, batch_size: int, world_size: int,
    resume: Optional[Union[str, Path]],
) -> RunPlan:
    """The given settings, or with ``resume`` the checkpoint's (a schedule
    given replaces its schedule; the batch size, world size and optimizer
    must be the checkpoint's). ValueError for a run that cannot start."""
    state = load_training_state(resume) if resume is not None else None
    if state is not None:
        saved = state["data"]
        if (saved["batch_size"], saved["world_size"]) != (batch_size, world_size):
            raise ValueError(
                f"{resume} was written by a run with batch size {saved['batch_size']} on {saved['world_size']} "
                f"process(es); resume it with the same (got {batch_size} on {world_size})"
            )
        if optimizer not in (None, state["optimizer_kind"]):
            raise ValueError(f"{resume} was trained with {state['optimizer_kind']}; resume it with the same "
                             f"optimizer (got {optimizer})")
        if schedule is None:
            schedule = LRSchedule.from_state_dict(state["schedule"])
        optimizer, seed = state["optimizer_kind"], saved["seed"]
    if schedule is None:
        raise ValueError("a schedule is needed (or a checkpoint to resume, whose schedule continues)")
    start = state["iteration"] if state is not None else 0
    if start >= schedule.total_iterations:
        raise ValueError(f"the run is already complete: {start} of {schedule.total_iterations} iterations done")
    return RunPlan(schedule=schedule, optimizer=optimizer or "sgd", seed=seed, start=start, state=state)


def start_model(model: MaskRCNN, dataset: Dataset, plan: RunPlan, *, rank: int) -> None:
    """The model (and the global RNG) where the run starts: on resume the
    checkpoint's weights (its RNG state comes back in ``start_batches``),
    else the RNG seeded with the plan's seed + ``rank``; the dataset's class
    names if the model has none (saved with the checkpoints, used by
    predict); training mode."""
    if plan.state is not None:
        model.load_state_dict(plan.state["model"])
    else:
        torch.manual_seed(plan.seed + rank)
    if not model.class_names and getattr(dataset, "class_names", None):
        model.class_names = list(dataset.class_names)
    if model.num_keypoints and not model.keypoint_skeleton and getattr(dataset, "skeleton", None):
        model.keypoint_skeleton = [tuple(edge) for edge in dataset.skeleton]
    model.train()


def optimizer_and_scaler(
    model: nn.Module, plan: RunPlan, *, weight_decay: float, momentum: float, amp: bool, device_type: str
) -> Tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """The optimizer (``make_optimizer``) and the gradient scaler (enabled
    with ``amp``), with the checkpoint's states on resume."""
    optimizer = make_optimizer(model, kind=plan.optimizer, lr=plan.schedule(plan.start), weight_decay=weight_decay,
                               momentum=momentum)
    scaler = torch.amp.GradScaler(device_type, enabled=amp)
    if plan.state is not None:
        optimizer.load_state_dict(plan.state["optimizer"])
        scaler.load_state_dict(plan.state["grad_scaler"])
    return optimizer, scaler


def data_loader(
    dataset: Dataset, plan: RunPlan, *, batch_size: int, context: DistributedContext, num_workers: int,
    pin_memory: bool,
) -> DataLoader:
    """Endless full batches of this process's share of each epoch, from the
    plan's first iteration on (``EpochBatchSampler``)."""
    return DataLoader(
        dataset,
        batch_sampler=EpochBatchSampler(len(dataset), batch_size=batch_size, seed=plan.seed, rank=context.rank,
                                        world_size=context.world_size, start_batch=plan.start),
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def start_batches(loader: DataLoader, plan: RunPlan) -> Iterator:
    """The loader's batches; on resume with the checkpoint's RNG state
    restored after ``iter(loader)``, which draws its workers' base seed from
    the global RNG: the state is then exactly where the interrupted run's
    sampling stood."""
    batches = iter(loader)
    if plan.state is not None:
        restore_rng_state(plan.state["rng"])
    return batches


def distributed_network(model: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """``model``, or with several processes its DistributedDataParallel
    replica (``model`` on ``device``)."""
    if not context.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def synchronize_buffers(model: nn.Module, context: DistributedContext) -> None:
    """DDP sends rank 0's buffers (BatchNorm statistics) to every rank at
    each forward, but each rank then updated its own with its last batch:
    send them once more, so that all replicas end identical."""
    if context.distributed:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


class Checkpoints:
    """Writes ``out_dir/last.pt``: the weights and the training state after
    an iteration (rank 0 only; nothing when ``out_dir`` is None)."""

    def __init__(
        self, out_dir: Optional[Union[str, Path]], *, model: nn.Module, optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler, plan: RunPlan, batch_size: int, context: DistributedContext,
    ) -> None:
        self.path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None and context.is_main else None
        self.model, self.optimizer, self.scaler, self.plan = model, optimizer, scaler, plan
        self.batch_size, self.world_size = batch_size, context.world_size

    def save(self, iteration: int) -> Optional[Path]:
        """Writes the state after ``iteration`` iterations; returns the path written, if any."""
        if self.path is None:
            return None
        save_checkpoint(self.path, self.model, training=training_state(
            iteration=iteration, optimizer=self.optimizer, optimizer_kind=self.plan.optimizer,
            schedule=self.plan.schedule, scaler=self.scaler, batch_size=self.batch_size, seed=self.plan.seed,
            world_size=self.world_size))
        return self.path


class ProgressBar:
    """A tqdm bar over the run's iterations with the running losses, the
    thread count when it is tuned, and the tuner's messages above it."""

    def __init__(self, plan: RunPlan, *, enabled: bool) -> None:
        self.bar = tqdm(total=plan.schedule.total_iterations, initial=plan.start, unit="it", dynamic_ncols=True,
                        disable=not enabled)
        self.running = RunningLosses()

    def update(self, iteration: int, values: Dict[str, float], *, threads: Optional[int], message: Optional[str]):
        self.running.add(values)
        summary = self.running.summary()
        if message is not None and not self.bar.disable:
            self.bar.write(f"iteration {iteration}: {message}")
        if threads is not None:
            summary += f" threads {threads}"
        self.bar.set_postfix_str(summary, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


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
    plan = plan_run(schedule=schedule, optimizer=optimizer, seed=seed, batch_size=batch_size,
                    world_size=context.world_size, resume=resume)
    start_model(model, dataset, plan, rank=context.rank)
    opt, scaler = optimizer_and_scaler(model, plan, weight_decay=weight_decay, momentum=momentum, amp=amp,
                                       device_type=device.type)
    loader = data_loader(dataset, plan, batch_size=batch_size, context=context, num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    network = distributed_network(model, context, device)
    checkpoints = Checkpoints(out_dir, model=model, optimizer=opt, scaler=scaler, plan=plan, batch_size=batch_size,
                              context=context)
    result = TrainResult(start_iteration=plan.start, iterations=plan.schedule.total_iterations)
    began = time.perf_counter()
    bar = ProgressBar(plan, enabled=progress and context.is_main)
    batches = start_batches(loader, plan)
    threads = StepThreads(ThreadTuner(max_threads=torch.get_num_threads()) if adapt_threads and device.type == "cpu"
                          else None)
    try:
        for iteration in range(plan.start, result.iterations):
            step_began = time.perf_counter()
            count = threads.begin(iteration - plan.start)
            images, targets = next(batches)
            learning_rate = plan.schedule(iteration)
            set_learning_rate(opt, learning_rate)
            values = training_step(
                network, opt, scaler, [image.to(device, non_blocking=True) for image in images], targets,
                amp=amp, max_grad_norm=max_grad_norm, iteration=iteration,
            )
            message = threads.end(count, time.perf_counter() - step_began)
            values["lr"] = learning_rate
            result.history.append(values)
            bar.update(iteration, values, threads=count if threads.tuner is not None else None, message=message)
            done = iteration + 1
            if checkpoint_every > 0 and done % checkpoint_every == 0 and done < result.iterations:
                result.checkpoint = checkpoints.save(done)
    finally:
        bar.close()
        threads.restore()
    result.threads, result.last_threads = threads.iterations_at(), threads.last
    synchronize_buffers(model, context)
    result.checkpoint = checkpoints.save(result.iterations)
    result.seconds = time.perf_counter() - began
    return result


__all__ = ["CHECKPOINT_NAME", "OPTIMIZERS", "RunPlan", "TrainResult", "load_training_state", "make_optimizer",
           "plan_run", "restore_rng_state", "rng_state", "train", "training_state", "training_step"]
