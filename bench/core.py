"""What every harness of benchmark.py shares: workloads, runs, settings and the progress bar.

A `Workload` is a list of tasks and the handler settings that run them; a `Run` is one measured
run of one system on one workload, with what the report says of it; `Settings` is what every run
shares. Nothing here starts a thread or a process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import task_queue_optimized as tq

__all__ = [
    "DEFAULT_LATENCY_MS",
    "DEFAULT_SEED",
    "PROGRESS_INTERVAL",
    "Progress",
    "Run",
    "Settings",
    "UsageError",
    "Workload",
    "clean_env",
    "file_workload",
    "rounded",
    "synthetic_workload",
]

DEFAULT_LATENCY_MS = 30.0
DEFAULT_SEED = 1
PROGRESS_DELAY = 0.5  # seconds a run must last before its progress bar appears
PROGRESS_INTERVAL = 0.1  # seconds between two redraws of the bar


class UsageError(Exception):
    """A bad flag or input: reported in one line on stderr with exit code 2."""


# --- Workloads -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """A list of tasks and the handler settings that run them.

    Attributes:
        name: a short description for tables and the report.
        tasks: the tasks, in submission order.
        latency_ms: the handler's default latency (a task's payload ``latency_ms`` wins).
        jitter_ms: uniform +- jitter on each attempt's latency.
        transient_rate: probability of an injected transient fault per attempt.
        seed: the seed of the handler's fault and jitter draws.
    """

    name: str
    tasks: Sequence[tq.Task]
    latency_ms: float = DEFAULT_LATENCY_MS
    jitter_ms: float = 0.0
    transient_rate: float = 0.0
    seed: int | None = DEFAULT_SEED

    def processor(self) -> tq.TaskProcessor:
        """Return a fresh handler: `payload["fail"]` counts attempts per processor."""
        return tq.TaskProcessor(
            latency_ms=self.latency_ms,
            jitter_ms=self.jitter_ms,
            transient_error_rate=self.transient_rate,
            seed=self.seed,
        )

    @functools.cached_property
    def unique(self) -> list[tq.Task]:
        """The first task of each idempotency key: the ones that run when deduplicated."""
        seen: set[str] = set()
        first = []
        for task in self.tasks:
            if task.key not in seen:
                seen.add(task.key)
                first.append(task)
        return first

    @functools.cached_property
    def mean_latency(self) -> float:
        """Mean configured latency, in seconds, of the tasks that run (jitter averages out)."""
        if not self.unique:
            return 0.0
        total = sum(self._latency_ms(task) for task in self.unique)
        return total / len(self.unique) / 1000.0

    def _latency_ms(self, task: tq.Task) -> float:
        value = task.payload.get("latency_ms", self.latency_ms)
        # The handler rejects a bad value (the task fails at once): it takes no time.
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        return float(value) if ok and math.isfinite(value) else 0.0

    def ceiling(self, workers: int) -> float | None:
        """Return the ceiling ``workers / mean latency`` in tasks per second (None for no-ops)."""
        return workers / self.mean_latency if self.mean_latency > 0 else None

    def describe(self) -> dict[str, Any]:
        """Return the workload's settings for the report."""
        return {
            "name": self.name,
            "tasks": len(self.tasks),
            "unique_keys": len(self.unique),
            "mean_latency_ms": round(self.mean_latency * 1000, 4),
            "latency_ms": self.latency_ms,
            "jitter_ms": self.jitter_ms,
            "transient_rate": self.transient_rate,
            "seed": self.seed,
        }


def synthetic_workload(
    count: int,
    latency_ms: float,
    *,
    jitter_ms: float = 0.0,
    transient_rate: float = 0.0,
    seed: int | None = DEFAULT_SEED,
    prefix: str = "bench",
) -> Workload:
    """Return `count` tasks with empty payloads, each taking `latency_ms` (+- jitter)."""
    tasks = [tq.Task(f"{prefix}-{index:07d}") for index in range(count)]
    name = f"{count:,} tasks of {latency_ms:g} ms"
    if jitter_ms:
        name += f" +- {jitter_ms:g}"
    if transient_rate:
        name += f", {transient_rate:.0%} transient faults"
    return Workload(name, tasks, latency_ms, jitter_ms, transient_rate, seed)


def file_workload(
    path: str,
    *,
    latency_ms: float = DEFAULT_LATENCY_MS,
    jitter_ms: float = 0.0,
    transient_rate: float = 0.0,
    seed: int | None = DEFAULT_SEED,
) -> Workload:
    """Return the tasks of a task file (a task's payload ``latency_ms`` wins over `latency_ms`).

    Raises:
        TaskFileError: the file is missing or invalid.
    """
    tasks = tq.load_tasks(path)
    return Workload(os.path.basename(path), tasks, latency_ms, jitter_ms, transient_rate, seed)


# --- Runs and settings ---------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Run:
    """One measured run of one system on one workload.

    Attributes:
        system: "naive", "raw-executor", "pool", "huey-memory", ...
        workers: worker threads.
        workload: the workload's name.
        repeat: 0-based index of the repetition.
        metrics: a `MetricsCollector.snapshot()` (or, for the bare raw executor, its subset).
        executed: tasks whose handler ran (duplicates excluded), for the efficiency.
        ceiling: ``workers / mean latency`` in tasks per second; None for no-op tasks.
        extra: anything else the report should carry (open-loop percentiles, memory samples).
    """

    system: str
    workers: int
    workload: str
    repeat: int
    metrics: dict[str, Any]
    executed: int
    ceiling: float | None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    speedup: float | None = None

    @property
    def throughput(self) -> float:
        """Finished submissions (duplicates included) per second."""
        return float(self.metrics["throughput_per_second"])

    @property
    def efficiency(self) -> float | None:
        """Tasks whose handler ran, per second, over the ceiling."""
        elapsed: float = self.metrics["elapsed_seconds"]
        if not self.ceiling or elapsed <= 0:
            return None
        return self.executed / elapsed / self.ceiling

    @property
    def attempt_efficiency(self) -> float | None:
        """Handler calls (retries included) per second, over the ceiling."""
        elapsed: float = self.metrics["elapsed_seconds"]
        calls: int | None = self.metrics.get("handler_calls")
        if not self.ceiling or elapsed <= 0 or calls is None:
            return None
        return calls / elapsed / self.ceiling

    def to_dict(self) -> dict[str, Any]:
        """Return the run as a JSON-compatible dict for the report."""
        return {
            "system": self.system,
            "workers": self.workers,
            "workload": self.workload,
            "repeat": self.repeat,
            "executed": self.executed,
            "ceiling_per_second": rounded(self.ceiling),
            "efficiency": rounded(self.efficiency),
            "attempt_efficiency": rounded(self.attempt_efficiency),
            "speedup": rounded(self.speedup),
            "metrics": self.metrics,
            **self.extra,
        }


def rounded(value: float | None, digits: int = 4) -> float | None:
    """Return `value` rounded to `digits`, or None for None and for a value that is not finite."""
    return None if value is None or not math.isfinite(value) else round(value, digits)


class Progress:
    """A one-line progress bar on stderr, drawn only once a run has lasted `PROGRESS_DELAY`.

    Not thread-safe: one thread (the one consuming results) updates it.
    """

    WIDTH = 28

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self._label = label
        self._total = max(total, 1)
        self._enabled = enabled
        self._count = 0
        self._start = time.perf_counter()
        self._next_draw = self._start + PROGRESS_DELAY
        self._drawn = 0  # width of the last line drawn, for clearing it

    def update(self, count: int = 1) -> None:
        """Advance by `count` items (redraws at most every `PROGRESS_INTERVAL`)."""
        self.set(self._count + count)

    def set(self, count: int) -> None:
        """Set the number of items done."""
        self._count = count
        if not self._enabled:
            return
        now = time.perf_counter()
        if now < self._next_draw:
            return
        self._next_draw = now + PROGRESS_INTERVAL
        filled = int(self.WIDTH * min(count / self._total, 1.0))
        line = (
            f"{self._label:<26.26} [{'#' * filled}{'.' * (self.WIDTH - filled)}] "
            f"{count:,}/{self._total:,} {now - self._start:6.1f} s"
        )
        sys.stderr.write("\r" + line)
        sys.stderr.flush()
        self._drawn = len(line)

    def close(self) -> None:
        """Erase the bar if it was drawn."""
        if self._drawn:
            sys.stderr.write("\r" + " " * self._drawn + "\r")
            sys.stderr.flush()
            self._drawn = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """What every run shares: pool tuning, retries and whether to draw progress bars."""

    queue_size: int = tq.DEFAULT_QUEUE_SIZE
    max_attempts: int = tq.DEFAULT_MAX_ATTEMPTS
    base_delay: float = tq.DEFAULT_BASE_DELAY
    durability: str = tq.DEFAULT_DURABILITY
    progress: bool = False

    def retry(self, base_delay: float | None = None) -> tq.RetryPolicy:
        """Return the retry policy (with another base delay if given)."""
        delay = self.base_delay if base_delay is None else base_delay
        return tq.RetryPolicy(max_attempts=self.max_attempts, base_delay=delay)


def clean_env() -> dict[str, str]:
    """Return this process's environment without TQ_* variables, for a worker process.

    A worker reads TQ_* variables (and ./.env, which its working folder does not have): without
    them, the flags the report records are all its configuration.
    """
    return {name: value for name, value in os.environ.items() if not name.startswith("TQ_")}
