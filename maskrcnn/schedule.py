"""Learning-rate schedules for training: a linear warm-up, then a cosine
decay, steps, or a constant rate. A schedule is a pure function of the
iteration, so resuming needs only the iteration (and the settings, which
``state_dict`` gives as plain types for the checkpoint)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

SCHEDULE_KINDS = ("cosine", "step", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate at each iteration.

    Args:
        base_lr: the rate after the warm-up.
        total_iterations: length of the run (the cosine reaches
            ``final_factor * base_lr`` there).
        warmup_iterations: the rate rises linearly from
            ``warmup_factor * base_lr`` at iteration 0 to ``base_lr`` here.
        kind: "cosine" (half a cosine from base_lr down to
            final_factor * base_lr over the iterations after the warm-up),
            "step" (multiplied by ``gamma`` at each of ``steps``, fractions
            of total_iterations) or "constant".
        warmup_factor: starting fraction of the warm-up.
        final_factor: the cosine's last value, as a fraction of base_lr.
        steps: for "step", where the rate drops, as fractions of the run.
        gamma: for "step", the factor of each drop.
    """

    base_lr: float
    total_iterations: int
    warmup_iterations: int = 0
    kind: str = "cosine"
    warmup_factor: float = 0.001
    final_factor: float = 0.0
    steps: Tuple[float, ...] = (0.67, 0.89)
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.base_lr <= 0 or self.total_iterations < 1 or self.warmup_iterations < 0:
            raise ValueError(
                f"need base_lr > 0, total_iterations >= 1 and warmup_iterations >= 0, got {self.base_lr}, "
                f"{self.total_iterations} and {self.warmup_iterations}"
            )
        if not all(0.0 < step < 1.0 for step in self.steps):
            raise ValueError(f"steps are fractions of the run in (0, 1), got {tuple(self.steps)}")
        object.__setattr__(self, "steps", tuple(float(step) for step in self.steps))

    def __call__(self, iteration: int) -> float:
        """The rate of iteration ``iteration`` (0-based)."""
        if iteration < self.warmup_iterations:
            progress = iteration / self.warmup_iterations
            return self.base_lr * (self.warmup_factor + (1.0 - self.warmup_factor) * progress)
        if self.kind == "constant":
            return self.base_lr
        if self.kind == "step":
            drops = sum(1 for step in self.steps if iteration >= step * self.total_iterations)
            return self.base_lr * self.gamma**drops
        decay_length = max(self.total_iterations - self.warmup_iterations, 1)
        progress = min((iteration - self.warmup_iterations) / decay_length, 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.base_lr * (self.final_factor + (1.0 - self.final_factor) * cosine)

    def state_dict(self) -> Dict[str, object]:
        """The settings as plain types (the steps as a list)."""
        state = asdict(self)
        state["steps"] = list(self.steps)
        return state

    @classmethod
    def from_state_dict(cls, state: Dict[str, object]) -> "LRSchedule":
        return cls(**state)


def set_learning_rate(optimizer, learning_rate: float) -> None:
    """Sets the rate of every parameter group of ``optimizer``."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


__all__ = ["LRSchedule", "SCHEDULE_KINDS", "set_learning_rate"]
