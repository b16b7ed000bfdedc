"""Intra-op thread counts on a CPU shared with other jobs: ``ThreadTuner``
chooses the count by timing steps, ``StepThreads`` applies a count to each
step of a loop (the tuner's, or torch's throughout) and puts torch's back
at the end. The results do not depend on the count beyond float rounding."""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional

import torch


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
    - at once when steps with the larger count slow down (one thread is not
      watched: its steps slow down only when the cores get busier, and then
      more threads would be slower still). Each step longer than
      ``slow_factor`` times the count's median at the last probe adds
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

    OMP_WAIT_POLICY=PASSIVE, set before the process starts, makes waiting
    threads sleep instead of spin: the larger count then fares about as
    well as one thread beside a busy neighbour, but every step on an idle
    machine is slower. So the tuner, not the wait policy, handles shared
    machines.

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
        elif threads == self.chosen and threads != self.candidates[0] and threads in self.reference:
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


class StepThreads:
    """Sets the intra-op thread count of each step of a loop.

    Args:
        tuner: chooses the counts; None: torch's count at construction,
            for every step.

    ``begin(step)`` before a step sets and returns its count, ``end`` after
    it passes the time to the tuner (and returns the tuner's message, if
    any), ``restore`` puts torch's count back.
    """

    def __init__(self, tuner: Optional[ThreadTuner]) -> None:
        self.tuner = tuner
        self.default = torch.get_num_threads()
        self.steps = 0

    def begin(self, step: int) -> int:
        threads = self.tuner.threads(step) if self.tuner is not None else self.default
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def end(self, threads: int, seconds: float) -> Optional[str]:
        self.steps += 1
        return self.tuner.record(threads, seconds) if self.tuner is not None else None

    def restore(self) -> None:
        torch.set_num_threads(self.default)

    def iterations_at(self) -> Dict[int, int]:
        """Steps ended with each count."""
        return dict(self.tuner.iterations_at) if self.tuner is not None else {self.default: self.steps}

    @property
    def last(self) -> int:
        """The count in use at the end (the tuner's last choice)."""
        return self.tuner.chosen if self.tuner is not None else self.default


__all__ = ["StepThreads", "ThreadTuner"]
