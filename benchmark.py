"""Measure task_queue_optimized against its baseline, a raw executor and (optionally) Huey.

Every target is a ratio measured inside one run, because an absolute time on a shared machine means
little: efficiency against the ceiling ``workers / mean task latency``, throughput against a raw
``ThreadPoolExecutor`` in the same process, peak RSS growth between two points of one run, queue
wait measured from each task's intended arrival in an open-loop run. Each pool run gets a fresh
temporary SQLite file, so a rerun measures real work; all runs land in ``benchmark_report.json``.

``--db URL --processes LIST`` measures scale-out: for each process count P, `P` worker processes
(``task_queue_optimized.py worker``) drain a durable queue of 10 ms tasks in a fresh database (a
new PostgreSQL schema, or a new SQLite file in a temporary folder beside the path given), with
throughput and efficiency against the ceiling ``P x workers / 10 ms``; then the no-op overhead of
the PostgreSQL store against the SQLite one, as a ratio of in-process pool throughputs.

``--db postgresql://URL`` without ``--processes`` runs the durable comparison: a
``task_queue_optimized.py worker`` process on a PostgreSQL store drains no-op tasks and 10 ms tasks
enqueued before it started (one process and two), and with ``--peers`` PGQueuer on the same
server and Dramatiq on RabbitMQ (``--rabbitmq URL``) drain the same workloads with the same
concurrency, persistence on and an ack after the handler ran. Each run reports its throughput and
the whole machine's CPU per task (/proc/stat: the database server and the broker included). With
``--suite`` the same runs judge targets 10 to 13.

Example::

    python benchmark.py --task-file sample_tasks_100.json --workers 8
    python benchmark.py --tasks 1000 --latency-ms 30 --workers 1,2,4,8,16 --repeat 3 --plot b.png
    python benchmark.py --rate 66.7 --tasks 1000 --latency-ms 30 --workers 8
    python benchmark.py --rate-limit 100/s --repeat 3 --db postgresql://postgres@127.0.0.1/test
    python benchmark.py --suite --quick
    python benchmark.py --smoke --report /tmp/report.json
    python benchmark.py --db postgresql://postgres@127.0.0.1:5432/test --processes 1,2,4
    python benchmark.py --db /tmp/scale.db --processes 1,2,4
    python benchmark.py --db postgresql://postgres@127.0.0.1:5432/test --peers --repeat 3
    python benchmark.py --suite --peers --db postgresql://postgres@127.0.0.1:5432/test --repeat 3

Systems: ``naive`` (the design this project replaces: one thread, a SELECT then an INSERT and a
commit per task in a SQLite file with the default rollback journal, retries slept out inline),
``raw-executor`` (``ThreadPoolExecutor(workers)`` calling the handler: no idempotency, no
retries), ``pool`` (``WorkerPool`` with a file database) and, with ``--peers``, ``huey-memory``
and ``huey-sqlite`` (Huey with an in-process thread consumer). With ``--processes``:
``processes-sqlite`` or ``processes-postgresql`` (worker processes on a durable queue) and
``pool-sqlite`` / ``pool-postgresql`` (the no-op store runs). With ``--db`` alone:
``ours-postgresql`` (``-x2`` for two processes), ``pgqueuer`` and ``dramatiq-rabbitmq``. The
suite also runs ``plain-asyncio`` and, where the module has it, ``async-pool``.

The harnesses of the scale-out runs (``bench/scaleout.py``) and of the peers (``bench/peers.py``,
with the code their worker processes import in ``bench/worker_side.py``) live in the package
``bench`` beside this file, with the workloads and runs they share (``bench/core.py``); this file
keeps the in-process systems, the suite, the report and the command line.

Sections: defaults, targets and definitions, measurement helpers, systems, open loop, memory,
rate limits, async, unused features, suite, output, concurrency, command line.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import importlib.util
import itertools
import json
import math
import os
import platform
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import task_queue_optimized as tq
from bench.core import (
    DEFAULT_LATENCY_MS,
    DEFAULT_SEED,
    Progress,
    Run,
    Settings,
    UsageError,
    Workload,
    file_workload,
    rounded,
    synthetic_workload,
)
from bench.peers import (
    DEFAULT_RABBITMQ_URL,
    PEER_POLL_INTERVAL,
    PEER_SLEEP_CONCURRENCY,
    PEER_SLEEP_TASKS,
    PEER_WORKERS,
    DurableResults,
    huey_available,
    run_durable,
    run_huey,
)
from bench.scaleout import (
    NOOP_TASKS,
    NOOP_TASKS_PER_TASK,
    SCALE_LATENCY_MS,
    SCALE_MIN_TASKS,
    SCALE_TASKS_PER_THREAD,
    STATUS_POLL_INTERVAL,
    Database,
    fresh_database,
    noop_tasks,
    parse_database,
    run_noop_comparison,
    run_scale_out,
    run_scale_series,
    run_store_noop,
)

__all__ = [
    "Run",
    "Workload",
    "main",
    "run_huey",
    "run_naive",
    "run_open_loop",
    "run_pool",
    "run_raw_executor",
    "run_scale_out",
    "run_store_noop",
    "run_suite",
]


# --- Defaults ------------------------------------------------------------------------------------

DEFAULT_REPORT = "benchmark_report.json"
DEFAULT_WORKERS = "8"
DEFAULT_TASKS = 500
OPEN_LOOP_LEAD = 0.05  # seconds between building the pool and the first intended arrival
SUITE_WORKERS = 8  # the worker count every performance target is stated for
EXIT_OK, EXIT_TARGET_MISSED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclasses.dataclass(frozen=True, slots=True)
class SuiteSizes:
    """The sizes of the suite's workloads: the targets' own, or smaller for --quick and --smoke."""

    label: str
    ceiling_tasks: int = 1000
    latency_ms: float = 30.0
    overhead_tasks: int = 50_000
    memory_mark: int = 100_000
    memory_total: int = 1_000_000
    open_loop_tasks: int = 1000
    load: float = 0.25
    retry_tasks: int = 1000
    transient_rate: float = 0.2
    retry_base_delay: float = 0.02
    wide_workers: int = 256
    wide_tasks: int = 10_240
    async_in_flight: int = 1000
    async_tasks: int = 20_000
    thresholds: bool = True


FULL_SIZES = SuiteSizes("full")
QUICK_SIZES = SuiteSizes(
    "quick: targets 2 and 3 scaled down", overhead_tasks=10_000, memory_mark=20_000,
    memory_total=200_000,
)  # fmt: skip
SMOKE_SIZES = SuiteSizes(
    "smoke: tiny sizes, no thresholds", ceiling_tasks=40, latency_ms=2.0, overhead_tasks=2000,
    memory_mark=2000, memory_total=4000, open_loop_tasks=50, retry_tasks=100, wide_workers=32,
    wide_tasks=200, async_in_flight=50, async_tasks=200, thresholds=False,
)  # fmt: skip
SMOKE_COMPARISON: dict[str, Any] = {"tasks": 40, "latency_ms": 2.0, "workers": [1, 4]}
# --concurrency-plot: the concurrency levels without --workers, and the tasks of each level's run
# (--tasks overrides): CONCURRENCY_ROUNDS tasks per worker, at least CONCURRENCY_MIN_TASKS.
CONCURRENCY_LEVELS = (1, 4, 16, 64, 256, 1024)
CONCURRENCY_ROUNDS = 8
CONCURRENCY_MIN_TASKS = 64
CONCURRENCY_SYSTEMS = ("pool", "raw-executor-bare", "async-pool", "plain-asyncio")


# --- Targets and definitions ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TargetSpec:
    """One performance target of the suite: what it measures and the bar it must clear.

    `name` and `description` are `str.format` templates, filled from the suite's sizes and
    workloads (`run_suite`) or from the durable runs' settings (`durable_targets`).
    """

    number: int
    name: str
    metric: str
    threshold: float | None
    comparison: str  # ">=", "<=", "<" or "" (reported, no threshold)
    description: str
    unit: str = ""


# Targets 1 to 9 run in process (`run_suite`); 10 to 13 judge the durable runs (`durable_targets`).
TARGETS = (
    TargetSpec(1, "ceiling efficiency", "efficiency", 0.98, ">=",
               "{ceiling_work}, {workers} workers, file database"),
    TargetSpec(2, "pure no-op vs raw executor", "vs_raw_executor", 1.0, ">=",
               "{noop_work} through `lambda task: None`, {workers} workers, file database, "
               "against a bare ThreadPoolExecutor({workers}) calling the same lambda"),
    TargetSpec(3, "memory growth", "rss_growth_mb", 20.0, "<",
               "iter_results over a generator, peak RSS at {memory_mark:,} and {memory_total:,} "
               "tasks, queue_size {queue_size}, file database", " MB"),
    TargetSpec(4, "open-loop p99 queue wait", "p99_queue_wait_ms", 1.0, "<=",
               "{open_loop_tasks:,} Poisson arrivals of {latency_ms:g} ms tasks at {rate:.1f}/s "
               "({load:.0%} of capacity {capacity:.1f}/s), {workers} workers", " ms"),
    TargetSpec(5, "efficiency over attempts", "attempt_efficiency", 0.95, ">=",
               "{retry_work}, 3 attempts, {retry_base_delay_ms:g} ms base delay"),
    TargetSpec(6, "durability full / normal", "full_vs_normal", None, "",
               "the overhead run ({noop_work}) with durability='full'"),
    TargetSpec(7, "{wide_workers} workers efficiency", "efficiency", 0.90, ">=",
               "{wide_work}, {wide_workers} workers, file database"),
    TargetSpec(8, "efficiency gap to raw executor", "raw_minus_pool_efficiency", 0.005, "<=",
               "target 1's runs ({ceiling_work}, {workers} workers): a bare "
               "ThreadPoolExecutor({workers})'s efficiency minus the pool's"),
    TargetSpec(9, "async {async_in_flight:,} in flight vs asyncio", "vs_plain_asyncio", 0.85, ">=",
               "{async_tasks:,} asyncio.sleep tasks of {latency_ms:g} ms, {async_in_flight:,} in "
               "flight: AsyncWorkerPool (file database) over a plain asyncio loop of as many "
               "coroutines"),
    TargetSpec(10, "durable no-op vs best peer", "throughput_vs_best_peer", 1.5, ">=",
               "no-op tasks, one worker process of {peer_workers} workers on PostgreSQL, "
               "throughput over the best of PGQueuer and Dramatiq on RabbitMQ (same repeat), each "
               "drained from a queue filled before its worker started: from the worker's ready "
               "line to all done"),
    TargetSpec(11, "durable no-op CPU vs best peer", "cpu_per_task_vs_best_peer", 0.7, "<=",
               "the same runs: whole-machine CPU (/proc/stat, database and broker included) per "
               "task, over the lowest of the peers'"),
    TargetSpec(12, "durable 10 ms efficiency", "efficiency", 0.97, ">=",
               "{sleep_tasks:,} tasks of time.sleep(0.01), one worker process of "
               "{sleep_concurrency} workers: throughput over {sleep_concurrency} / 10 ms"),
    TargetSpec(13, "durable 2 processes / 1", "two_vs_one_process", 1.8, ">=",
               "the 10 ms tasks with two worker processes of {sleep_concurrency} workers "
               "({two_process_tasks:,} tasks) over one process ({sleep_tasks:,} tasks), same "
               "repeat"),
)  # fmt: skip

# What the report's figures mean: the comparison runs, the scale-out runs ("{base}" is the
# smallest process count) and the durable runs.
COMPARISON_DEFINITIONS = {
    "throughput": "finished submissions (duplicates included) per second, first enqueue to last "
    "finish",
    "ceiling": "workers / mean configured latency of the tasks that run",
    "efficiency": "tasks whose handler ran, per second, over the ceiling",
    "attempt_efficiency": "handler calls (retries included) per second, over the ceiling",
    "speedup": "throughput over the naive baseline's in the same repeat",
    "latency": "submission to finish (in a batch every task is submitted at the start)",
}
SCALE_DEFINITIONS = {
    "throughput": "tasks done or failed per second, from starting the worker processes (their "
    "start-up included) to the first status read that shows all done",
    "ceiling": "processes x workers per process / task latency",
    "efficiency": "throughput over the ceiling",
    "speedup": "throughput over the throughput with {base} process(es), same repeat",
    "startup_seconds": "from starting the processes to the first status read that lists every "
    "worker (each registers when it begins serving)",
    "efficiency_after_startup": "tasks finished after that read, per second, over the ceiling",
    "worker_cpu_seconds": "user + system CPU time of the worker processes, start-up and drain "
    "included (the database server's is not counted)",
    "postgresql_vs_sqlite": "no-op throughput with the PostgreSQL store over the one with the "
    "SQLite store, same repeat",
}
DURABLE_DEFINITIONS = {
    "window": "from the first read after the worker printed its ready line (tasks done by then "
    "are not counted) to the first read that shows every task done",
    "cpu_ms_per_task": "user + nice + system + irq + softirq of all cores (/proc/stat) during the "
    "window, over the tasks done in it: the database server, the broker and this benchmark's "
    "reads included",
}


# --- Measurement helpers -------------------------------------------------------------------------


def _summary_ms(values: Sequence[float]) -> dict[str, float | int]:
    """Return count, mean and nearest-rank percentiles of `values` (seconds) in milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}

    def rank(q: float) -> float:
        return ordered[max(1, math.ceil(q * len(ordered))) - 1] * 1000

    return {
        "count": len(ordered),
        "mean": round(statistics.fmean(ordered) * 1000, 4),
        "p50": round(rank(0.50), 4),
        "p95": round(rank(0.95), 4),
        "p99": round(rank(0.99), 4),
        "max": round(ordered[-1] * 1000, 4),
    }


def _spread(values: Iterable[float | None]) -> dict[str, float] | None:
    """Return the median, min and max of the values that are not None."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {
        "median": round(statistics.median(present), 6),
        "min": round(min(present), 6),
        "max": round(max(present), 6),
    }


# --- Systems -------------------------------------------------------------------------------------


def run_naive(workload: Workload, settings: Settings, repeat: int = 0) -> Run:
    """Run the baseline: one thread and a commit per task in a rollback-journal SQLite file.

    For each task it SELECTs the key, skips it when done, calls the same handler with inline
    retries (sleeping out the backoff), INSERTs the output and commits. Every task counts as
    submitted when the batch starts, as `WorkerPool.run` would take them.
    """
    metrics = tq.MetricsCollector(workers=1)
    handler = workload.processor()
    retry = settings.retry()
    executed = 0
    progress = Progress("naive x1", len(workload.tasks), settings.progress)
    with tempfile.TemporaryDirectory(prefix="bench-naive-") as folder:
        conn = sqlite3.connect(os.path.join(folder, "naive.db"), isolation_level=None)
        try:
            conn.execute("CREATE TABLE processed (key TEXT PRIMARY KEY, output TEXT NOT NULL)")
            submitted = time.perf_counter()
            for _ in workload.tasks:
                metrics.record_enqueue()
            for task in workload.tasks:
                started = time.perf_counter()
                metrics.record_start(started - submitted)
                found = conn.execute("SELECT 1 FROM processed WHERE key = ?", (task.key,))
                if found.fetchone() is not None:
                    metrics.record_duplicate(time.perf_counter() - submitted, started=True)
                else:
                    executed += 1
                    output, error_kind = _call_with_retries(handler, task, retry, metrics)
                    if error_kind is None:
                        # Autocommit: this INSERT is its own transaction, a commit per task.
                        conn.execute(
                            "INSERT INTO processed (key, output) VALUES (?, ?)",
                            (task.key, json.dumps(output)),
                        )
                    now = time.perf_counter()
                    if error_kind is None:
                        metrics.record_success(now - submitted, now - started)
                    else:
                        metrics.record_failure(error_kind, now - submitted, now - started)
                progress.update()
        finally:
            progress.close()
            conn.close()
    return Run("naive", 1, workload.name, repeat, metrics.snapshot(), executed, workload.ceiling(1))


def _call_with_retries(
    handler: Callable[[tq.Task], Any],
    task: tq.Task,
    retry: tq.RetryPolicy,
    metrics: tq.MetricsCollector,
) -> tuple[Any, str | None]:
    """Call `handler` until it succeeds or the policy gives up; return (output, error kind)."""
    attempt = 0
    while True:
        attempt += 1
        began = time.perf_counter()
        try:
            output = handler(task)
        except Exception as exc:
            metrics.record_attempt(time.perf_counter() - began)
            if retry.should_retry(exc, attempt):
                metrics.record_retry()
                time.sleep(retry.delay(attempt))
                continue
            return None, "transient" if retry.is_transient(exc) else "permanent"
        metrics.record_attempt(time.perf_counter() - began)
        return output, None


def _instrumented(
    handler: Callable[[tq.Task], Any], metrics: tq.MetricsCollector
) -> Callable[[tq.Task, float], tuple[float, float]]:
    """Wrap `handler` for a bare executor: one attempt, the pool's metrics calls around it.

    The wrapper takes the task and its submission time and returns (started, finished).
    """

    def call(task: tq.Task, enqueued: float) -> tuple[float, float]:
        started = time.perf_counter()
        metrics.record_start(started - enqueued)
        try:
            handler(task)
        except Exception as exc:
            finished = time.perf_counter()
            metrics.record_attempt(finished - started)
            kind = "transient" if isinstance(exc, tq.TransientError) else "permanent"
            metrics.record_failure(kind, finished - enqueued, finished - started)
            return started, finished
        finished = time.perf_counter()
        metrics.record_attempt(finished - started)
        metrics.record_success(finished - enqueued, finished - started)
        return started, finished

    return call


def run_raw_executor(workload: Workload, workers: int, settings: Settings, repeat: int = 0) -> Run:
    """Run the handler on a bare `ThreadPoolExecutor(workers)`: no idempotency, no retries.

    The same `MetricsCollector` calls as the pool's are made around each call, so the numbers
    compare; duplicates run again and a failed attempt fails its task.
    """
    metrics = tq.MetricsCollector(workers=workers)
    call = _instrumented(workload.processor(), metrics)
    executed = 0
    progress = Progress(f"raw-executor x{workers}", len(workload.tasks), settings.progress)
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="bench-raw") as pool:
        futures = []
        try:
            for task in workload.tasks:
                metrics.record_enqueue()
                futures.append(pool.submit(call, task, time.perf_counter()))
            for _ in concurrent.futures.as_completed(futures):
                executed += 1
                progress.update()
        finally:
            progress.close()
            for future in futures:
                future.cancel()
    ceiling = workload.ceiling(workers)
    return Run(
        "raw-executor", workers, workload.name, repeat, metrics.snapshot(), executed, ceiling
    )


def raw_executor_bare(
    workload: Workload,
    workers: int,
    repeat: int = 0,
    *,
    handler: Callable[[tq.Task], Any] | None = None,
) -> Run:
    """Time a bare `ThreadPoolExecutor(workers)` calling the handler, with no instrumentation.

    The reference of the overhead and efficiency targets: from the first submit to the last
    completion.

    Args:
        handler: overrides the workload's handler (`Workload.processor`).
    """
    handler = handler or workload.processor()
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="bench-raw") as pool:
        began = time.perf_counter()
        futures = [pool.submit(handler, task) for task in workload.tasks]
        concurrent.futures.wait(futures)
        elapsed = time.perf_counter() - began
    failed = sum(1 for future in futures if future.exception() is not None)
    count = len(futures)
    metrics = {
        "submitted": count,
        "succeeded": count - failed,
        "failed": failed,
        "duplicates": 0,
        "workers": workers,
        "elapsed_seconds": round(elapsed, 6),
        "throughput_per_second": round(count / elapsed, 3) if elapsed > 0 else 0.0,
        "instrumented": False,
    }
    ceiling = workload.ceiling(workers)
    return Run("raw-executor-bare", workers, workload.name, repeat, metrics, count, ceiling)


def run_pool(
    workload: Workload,
    workers: int,
    settings: Settings,
    repeat: int = 0,
    *,
    durability: str | None = None,
    base_delay: float | None = None,
    handler: Callable[[tq.Task], Any] | None = None,
) -> Run:
    """Run the workload through `WorkerPool.iter_results` with a fresh temporary file database.

    Args:
        durability: overrides `settings.durability`.
        base_delay: overrides the retry policy's base delay.
        handler: overrides the workload's handler (`Workload.processor`).
    """
    durability = durability or settings.durability
    system = "pool" if durability == tq.DEFAULT_DURABILITY else f"pool-{durability}"
    executed = 0
    progress = Progress(f"{system} x{workers}", len(workload.tasks), settings.progress)
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as folder:
        pool = tq.WorkerPool(
            handler or workload.processor(),
            workers=workers,
            queue_size=settings.queue_size,
            db_path=os.path.join(folder, "bench.db"),
            retry=settings.retry(base_delay),
            durability=durability,
        )
        interrupted = True
        try:
            for record in pool.iter_results(workload.tasks):
                if record.attempts and record.status in (
                    tq.TaskStatus.SUCCEEDED,
                    tq.TaskStatus.FAILED,
                ):
                    executed += 1
                progress.update()
            interrupted = False
        finally:
            progress.close()
            pool.shutdown(wait=True, cancel_pending=interrupted)
    snapshot = pool.metrics.snapshot()
    run = Run(system, workers, workload.name, repeat, snapshot, executed, workload.ceiling(workers))
    run.extra["durability"] = durability
    return run


# --- Open loop -----------------------------------------------------------------------------------


class _Arrivals:
    """The samples of an open-loop run, each measured from its task's intended arrival.

    Thread-safe: completions are recorded from the threads that resolve the futures.
    """

    def __init__(self, total: int) -> None:
        self._lock = threading.Lock()  # guards the lists and _remaining
        self._remaining = total
        self.latency: list[float] = []  # intended arrival to finish
        self.wait: list[float] = []  # intended arrival to start
        self.wait_from_submit: list[float] = []  # actual submission to start: the system's view
        self.lag: list[float] = []  # intended arrival to actual submission: the producer's own
        self.done = threading.Event()
        if total == 0:
            self.done.set()

    def record(
        self, intended: float, submitted: float, started: float | None, finished: float | None
    ) -> None:
        with self._lock:
            if finished is not None:
                self.latency.append(finished - intended)
            if started is not None:
                self.wait.append(started - intended)
                self.wait_from_submit.append(started - submitted)
            self._remaining -= 1
            if self._remaining == 0:
                self.done.set()

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "latency_from_arrival_ms": _summary_ms(self.latency),
                "queue_wait_from_arrival_ms": _summary_ms(self.wait),
                "queue_wait_from_submit_ms": _summary_ms(self.wait_from_submit),
                "submit_lag_ms": _summary_ms(self.lag),
            }


def run_open_loop(
    workload: Workload,
    workers: int,
    rate: float,
    settings: Settings,
    repeat: int = 0,
    *,
    seed: int | None = DEFAULT_SEED,
    system: str = "pool",
) -> Run:
    """Submit the workload at Poisson arrivals of `rate` tasks per second (open loop).

    The producer sleeps until each intended arrival time and submits; every latency and queue
    wait is measured from the intended arrival, so a stall that delays submissions (coordinated
    omission) shows up in the percentiles instead of hiding. The producer's own lateness is
    reported as ``submit_lag_ms``, and the queue wait from the actual submission (what the system
    itself sees) as ``queue_wait_from_submit_ms``.

    Args:
        system: "pool" (a `WorkerPool` with a fresh file database), or "raw-executor" (a bare
            `ThreadPoolExecutor` calling the handler): the reference of what this machine allows.
    """
    rng = random.Random(seed)
    offsets = list(itertools.accumulate(rng.expovariate(rate) for _ in workload.tasks))
    arrivals = _Arrivals(len(workload.tasks))
    progress = Progress(f"open loop {system} x{workers}", len(offsets), settings.progress)
    with contextlib.ExitStack() as stack:
        stack.callback(progress.close)
        submit, metrics = _open_loop_target(stack, system, workload, workers, settings, arrivals)
        start = time.perf_counter() + OPEN_LOOP_LEAD
        for offset, task in zip(offsets, workload.tasks, strict=True):
            intended = start + offset
            tq._sleep_until(intended)  # noqa: SLF001  # the module's own pacing
            submitted = time.perf_counter()
            arrivals.lag.append(submitted - intended)
            submit(task, intended, submitted)
            progress.update()
        arrivals.done.wait()
    capacity = workload.ceiling(workers)
    run = Run(system, workers, workload.name, repeat, metrics.snapshot(),
              len(arrivals.latency), capacity)  # fmt: skip
    run.extra["open_loop"] = {
        "rate_per_second": round(rate, 4),
        "capacity_per_second": rounded(capacity),
        "load": rounded(rate / capacity if capacity else None),
        "arrivals": len(workload.tasks),
        "seed": seed,
        **arrivals.summary(),
    }
    return run


_Submit = Callable[[tq.Task, float, float], None]


def _open_loop_target(
    stack: contextlib.ExitStack,
    system: str,
    workload: Workload,
    workers: int,
    settings: Settings,
    arrivals: _Arrivals,
) -> tuple[_Submit, tq.MetricsCollector]:
    """Start the system an open loop feeds; return its submit function and its metrics.

    The system is stopped when `stack` closes: drained normally, its queue cancelled when the
    producer was interrupted.
    """
    if system == "raw-executor":
        metrics = tq.MetricsCollector(workers=workers)
        call = _instrumented(workload.processor(), metrics)
        executor = stack.enter_context(
            concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="bench-raw")
        )

        def on_raw_done(intended: float, submitted: float, future: Any) -> None:
            started, finished = future.result()
            arrivals.record(intended, submitted, started, finished)

        def submit_raw(task: tq.Task, intended: float, submitted: float) -> None:
            metrics.record_enqueue()
            future = executor.submit(call, task, submitted)
            future.add_done_callback(functools.partial(on_raw_done, intended, submitted))

        return submit_raw, metrics
    folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-open-"))
    pool = tq.WorkerPool(
        workload.processor(),
        workers=workers,
        queue_size=settings.queue_size,
        db_path=os.path.join(folder, "bench.db"),
        retry=settings.retry(),
        durability=settings.durability,
    )
    stack.push(lambda *exc: pool.shutdown(wait=True, cancel_pending=exc[0] is not None))

    def on_done(intended: float, submitted: float, future: Any) -> None:
        record: tq.TaskRecord = future.result()
        arrivals.record(intended, submitted, record.started_at, record.finished_at)

    def submit_pool(task: tq.Task, intended: float, submitted: float) -> None:
        future = pool.submit(task)
        future.add_done_callback(functools.partial(on_done, intended, submitted))

    return submit_pool, pool.metrics


# --- Memory --------------------------------------------------------------------------------------


def _proc_status_kb(field: str) -> float | None:
    """Return a kB field of /proc/self/status (Linux), or None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _peak_rss_kb() -> tuple[float | None, str]:
    """Return this process's peak RSS in kilobytes and where it was read.

    On Linux, ``ru_maxrss`` is not reset by exec: a child started by a large parent reports the
    parent's peak, which would hide any growth. VmHWM, the peak of this process's own memory map,
    is read instead where /proc has it; ``resource.getrusage`` is the fallback elsewhere.
    """
    peak = _proc_status_kb("VmHWM")
    if peak is not None:
        return peak, "VmHWM"
    try:
        import resource
    except ImportError:  # Windows
        return None, "unavailable"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak / 1024 if sys.platform == "darwin" else float(peak)), "ru_maxrss"  # macOS: bytes


def memory_child(total: int, mark: int, workers: int, settings: Settings) -> dict[str, Any]:
    """Stream `total` no-op tasks through `iter_results`; sample peak RSS at `mark` and at the end.

    Runs in a child process (see `run_memory`) so that earlier runs do not set the peak. The
    current RSS is sampled beside the peak, for information.
    """
    workload = Workload(f"{total:,} no-op tasks (generator)", [], latency_ms=0.0)
    samples: dict[str, Any] = {}

    def tasks() -> Iterator[tq.Task]:
        for index in range(total):
            yield tq.Task(f"mem-{index:08d}")

    def sample(name: str) -> None:
        samples[f"peak_rss_kb_at_{name}"], samples["peak_source"] = _peak_rss_kb()
        samples[f"rss_kb_at_{name}"] = _proc_status_kb("VmRSS")

    count = 0
    progress = Progress(f"memory x{workers}", total, settings.progress)
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as folder:
        pool = tq.WorkerPool(
            workload.processor(),
            workers=workers,
            queue_size=settings.queue_size,
            db_path=os.path.join(folder, "bench.db"),
            durability=settings.durability,
        )
        try:
            for _record in pool.iter_results(tasks()):
                count += 1
                if count == mark:
                    sample("mark")
                progress.update()
            sample("end")
        finally:
            progress.close()
            pool.shutdown(wait=True, cancel_pending=True)
    return {"tasks": count, "mark": mark, **samples, "metrics": pool.metrics.snapshot()}


def run_memory(total: int, mark: int, workers: int, settings: Settings, repeat: int = 0) -> Run:
    """Run `memory_child` in a fresh interpreter and return its samples as a run.

    Raises:
        RuntimeError: the child failed or printed no result.
    """
    command = [
        sys.executable, os.path.abspath(__file__), "--memory-child", str(total),
        "--memory-mark", str(mark), "--workers", str(workers),
        "--queue-size", str(settings.queue_size), "--durability", settings.durability,
        "--progress" if settings.progress else "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the memory child exited with code {proc.returncode}")
    result = json.loads(lines[-1])
    at_mark, at_end = result.get("peak_rss_kb_at_mark"), result.get("peak_rss_kb_at_end")
    growth = None if at_mark is None or at_end is None else (at_end - at_mark) / 1024
    run = Run("pool", workers, f"{total:,} no-op tasks (generator)", repeat, result.pop("metrics"),
              result["tasks"], None)  # fmt: skip
    run.extra["memory"] = {"total": total, **result, "growth_mb": rounded(growth)}
    return run


# --- Rate limits ---------------------------------------------------------------------------------


def run_rate_limit(
    rate: str, tasks: int, workers: int, database: Database | None, repeat: int = 0
) -> Run:
    """Run `tasks` no-op calls through a pool limited to `rate`; judge the limit by its calls.

    Each call records `time.monotonic()` as it starts. `busiest_window` is the most calls any
    half-open window of one period holds (the limit allows `count`); `steady_rate` is the calls
    after the first window's burst over the time they took, against `count / period`.

    Args:
        database: None keeps the limit in process (``memory://``); a SQLite or PostgreSQL
            database keeps it in the store, as workers sharing it do (a fresh one per run).
    """
    limit = tq._rate_of(rate, "--rate-limit")  # noqa: SLF001  # the pool's own parser
    starts: list[float] = []
    lock = threading.Lock()

    def handler(task: tq.Task) -> None:
        now = time.monotonic()
        with lock:
            starts.append(now)

    work = [tq.Task(f"rate-{index:06d}") for index in range(tasks)]
    with contextlib.ExitStack() as stack:
        if database is None:
            url, system = "memory://", "pool-rate-memory"
        else:
            url, _ = stack.enter_context(fresh_database(database, tq.DEFAULT_DURABILITY))
            system = f"pool-rate-{database.backend}"
        pool = tq.WorkerPool(handler, workers=workers, db_path=url, rate_limit=rate)
        try:
            for _ in pool.iter_results(work):
                pass
        finally:
            pool.shutdown(wait=True)
    starts.sort()
    busiest, first = 0, 0
    for last, now in enumerate(starts):
        while starts[first] <= now - limit.period:
            first += 1
        busiest = max(busiest, last - first + 1)
    span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
    steady = (len(starts) - limit.count) / span if span > 0 and len(starts) > limit.count else None
    target = limit.count / limit.period
    run = Run(system, workers, f"{tasks} no-op calls at {limit.text}", repeat,
              pool.metrics.snapshot(), len(starts), None)  # fmt: skip
    run.extra["rate_limit"] = {
        "limit": limit.text,
        "calls": len(starts),
        "busiest_window": busiest,
        "busiest_over_limit": busiest / limit.count,
        "steady_rate": rounded(steady),
        "target_rate": target,
        "steady_over_target": rounded(None if steady is None else steady / target),
    }
    return run


def rate_limit_table(runs: Sequence[Run], ranged: bool) -> str:
    rows = []
    for group in _grouped(runs):
        stats = [run.extra["rate_limit"] for run in group]
        rows.append([
            group[0].system,
            stats[0]["limit"],
            str(stats[0]["calls"]),
            _cell([s["busiest_window"] for s in stats], ".0f", ranged),
            _cell([s["busiest_over_limit"] for s in stats], ".3f", ranged),
            _cell([s["steady_rate"] for s in stats], ".2f", ranged),
            _cell([s["steady_over_target"] for s in stats], ".3f", ranged),
        ])  # fmt: skip
    headers = ["system", "limit", "calls", "busiest window", "/ limit", "steady calls/s",
               "/ target"]  # fmt: skip
    return _table(headers, rows)


# --- Async ---------------------------------------------------------------------------------------


def async_pool_available() -> bool:
    """Return whether the module has the async face of SPEC section 4 (`AsyncWorkerPool`)."""
    return hasattr(tq, "AsyncWorkerPool")


def run_plain_asyncio(count: int, in_flight: int, latency_ms: float, repeat: int = 0) -> Run:
    """Time `in_flight` coroutines on one event loop taking `count` ``asyncio.sleep`` tasks.

    The reference of the async target: what a bare event loop does with the same sleeps, from the
    first task to the last, with no queue, no store and no bookkeeping.
    """
    latency = latency_ms / 1000.0

    async def drain() -> tuple[float, int]:
        pending = iter(range(count))
        done = 0

        async def worker() -> None:
            nonlocal done
            for _ in pending:
                await asyncio.sleep(latency)
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return time.perf_counter() - began, done

    elapsed, done = asyncio.run(drain())
    metrics = {
        "submitted": count,
        "succeeded": done,
        "failed": count - done,
        "workers": in_flight,
        "elapsed_seconds": round(elapsed, 6),
        "throughput_per_second": round(done / elapsed, 3) if elapsed > 0 else 0.0,
    }
    ceiling = in_flight / latency if latency > 0 else None
    name = f"{count:,} asyncio.sleep tasks of {latency_ms:g} ms"
    return Run("plain-asyncio", in_flight, name, repeat, metrics, done, ceiling)


def run_async_pool(count: int, in_flight: int, latency_ms: float, repeat: int = 0) -> Run:
    """Run `count` ``asyncio.sleep`` tasks through ``AsyncWorkerPool(workers=in_flight)``.

    A fresh temporary file database, tasks fed by ``iter_results`` inside the caller's event
    loop. Every task must have succeeded and the handler must have returned `count` times.

    Raises:
        RuntimeError: the pool finished fewer tasks than it was given.
    """
    latency = latency_ms / 1000.0
    calls = 0

    async def handler(task: tq.Task) -> None:
        nonlocal calls
        await asyncio.sleep(latency)
        calls += 1

    async def drain(path: str) -> tuple[float, int, dict[str, Any]]:
        tasks = [tq.Task(f"async-{index:07d}") for index in range(count)]
        succeeded = 0
        async with tq.AsyncWorkerPool(handler, workers=in_flight, db_path=path) as pool:
            began = time.perf_counter()
            async for record in pool.iter_results(tasks):
                if record.status is tq.TaskStatus.SUCCEEDED:
                    succeeded += 1
            elapsed = time.perf_counter() - began
            snapshot = pool.metrics.snapshot()
        return elapsed, succeeded, snapshot

    with tempfile.TemporaryDirectory(prefix="bench-async-") as folder:
        elapsed, succeeded, snapshot = asyncio.run(drain(os.path.join(folder, "bench.db")))
    if succeeded != count or calls != count:
        raise RuntimeError(f"AsyncWorkerPool: {succeeded:,} of {count:,} tasks succeeded, "
                           f"{calls:,} handler calls returned")  # fmt: skip
    throughput = round(count / elapsed, 3) if elapsed > 0 else 0.0
    metrics = {**snapshot, "elapsed_seconds": round(elapsed, 6),
               "throughput_per_second": throughput}  # fmt: skip
    ceiling = in_flight / latency if latency > 0 else None
    name = f"{count:,} asyncio.sleep tasks of {latency_ms:g} ms"
    return Run("async-pool", in_flight, name, repeat, metrics, count, ceiling)


# --- Unused features -----------------------------------------------------------------------------
#
# Delays and priorities must cost nothing measurable when no task uses them. The reference is the
# module from before them, a copy given by path (``git show REV:task_queue_optimized.py > FILE``),
# loaded beside this one: both run the same no-op workload in turn, in one process, so that the
# machine's noise hits both alike.

UNUSED_COST_TASKS = 20_000  # no-op tasks per run
UNUSED_COST_VARIANTS = ("baseline", "current", "current-priority")


def load_module_copy(path: str, name: str = "task_queue_baseline") -> Any:
    """Import another copy of task_queue_optimized.py from `path` under `name`.

    Raises:
        UsageError: the file is missing or does not define a WorkerPool.
    """
    if not os.path.isfile(path):
        raise UsageError(f"--unused-cost {path}: no such file")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"--unused-cost {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    if not hasattr(module, "WorkerPool"):
        raise UsageError(f"--unused-cost {path}: defines no WorkerPool")
    return module


def _noop_throughput(
    module: Any, count: int, workers: int, priority: int | None
) -> tuple[float, float]:
    """Run `count` no-op tasks through `module.WorkerPool.iter_results` (an in-memory store, so
    that the pool's own path weighs most), `priority` set on every task when not None.

    Returns:
        Tasks per second, and this process's CPU microseconds per task (all threads): on a
        shared machine the CPU a task costs varies far less than the wall time it takes.
    """
    tasks = [module.Task(f"noop-{index:07d}") for index in range(count)]
    pool = module.WorkerPool(lambda task: None, workers=workers)
    try:
        # The priority variant goes through the same loop, each task with its schedule.
        schedule = None if priority is None else {task.id: (0.0, priority) for task in tasks}
        began, cpu = time.perf_counter(), time.process_time()
        records = (
            pool.iter_results(tasks) if schedule is None else pool._iter_results(tasks, schedule)  # noqa: SLF001  # the CLI's path for priorities
        )
        for _ in records:
            pass
        elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    finally:
        pool.shutdown(wait=True)
    return count / elapsed, cpu / count * 1e6


def run_unused_cost(baseline_path: str, count: int, workers: int, repeat: int) -> dict[str, Any]:
    """Measure no-op pool throughput of the baseline module and of this one, interleaved.

    Variants: ``baseline`` and ``current`` (neither sets a delay or priority: the path every
    existing caller takes) and ``current-priority`` (every task submitted with priority 1: the
    heap path, for scale).

    Returns:
        Per variant its throughputs and CPU microseconds per task with their medians, and
        ``current_vs_baseline``: the baseline's median CPU per task over the current one's, and
        the same ratio of throughputs (1.0 means no cost; the target is >= 0.98).
    """
    baseline = load_module_copy(baseline_path)
    modules = {"baseline": (baseline, None), "current": (tq, None), "current-priority": (tq, 1)}
    results: dict[str, list[float]] = {name: [] for name in UNUSED_COST_VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in UNUSED_COST_VARIANTS}
    _noop_throughput(tq, min(count, 2000), workers, None)  # warm up imports and caches
    _noop_throughput(baseline, min(count, 2000), workers, None)
    for index in range(repeat):
        # Alternate which runs first, so that neither always follows the other.
        order = UNUSED_COST_VARIANTS if index % 2 == 0 else UNUSED_COST_VARIANTS[::-1]
        for name in order:
            module, priority = modules[name]
            throughput, cpu_per_task = _noop_throughput(module, count, workers, priority)
            results[name].append(throughput)
            cpu[name].append(cpu_per_task)
    medians = {name: statistics.median(values) for name, values in results.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    return {
        "tasks": count,
        "workers": workers,
        "repeat": repeat,
        "baseline": os.path.abspath(baseline_path),
        "throughput": {name: [round(v, 1) for v in values] for name, values in results.items()},
        "median": {name: round(value, 1) for name, value in medians.items()},
        "cpu_us_per_task": {name: [round(v, 2) for v in values] for name, values in cpu.items()},
        "cpu_median": {name: round(value, 2) for name, value in cpu_medians.items()},
        "current_vs_baseline": {
            "cpu": round(cpu_medians["baseline"] / cpu_medians["current"], 4),
            "throughput": round(medians["current"] / medians["baseline"], 4),
        },
    }


def _unused_cost_mode(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Run and print the unused-features comparison."""
    count = args.tasks or UNUSED_COST_TASKS
    workers = _parse_workers(args.workers)[0]
    result = run_unused_cost(args.unused_cost, count, workers, args.repeat)
    print(f"no-op pool throughput, {count:,} tasks x{workers}, median of {args.repeat} "
          f"(tasks/s): baseline {result['median']['baseline']:,.0f}  current "
          f"{result['median']['current']:,.0f}  current with priority 1 "
          f"{result['median']['current-priority']:,.0f}")  # fmt: skip
    cpu = result["cpu_median"]
    print(f"CPU per task (us): baseline {cpu['baseline']:.2f}  current {cpu['current']:.2f}  "
          f"current with priority 1 {cpu['current-priority']:.2f}")  # fmt: skip
    ratio = result["current_vs_baseline"]
    print(f"current vs baseline (1.0 = no cost; target >= 0.98): by CPU per task "
          f"{ratio['cpu']:.4f}, by throughput {ratio['throughput']:.4f}")  # fmt: skip
    report["unused_cost"] = result


# --- Suite ---------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class Target:
    """One target of `TARGETS` as measured: its ratio per repeat, what the runs saw, the verdict.

    The first detail is the target's description; the runs add one line each after it.
    """

    number: int
    name: str
    metric: str
    threshold: float | None
    comparison: str  # ">=", "<=", "<" or "" (reported, no threshold)
    unit: str = ""
    values: list[float | None] = dataclasses.field(default_factory=list)
    details: list[str] = dataclasses.field(default_factory=list)
    # The same ratio for other systems, for reference only: Huey, a bare executor.
    references: dict[str, list[float | None]] = dataclasses.field(default_factory=dict)
    # Why the measured side cannot run here: the target is NOT MET, never judged on a stand-in.
    unavailable: str | None = None
    # Why the target was not run at all (e.g. no --db): not judged.
    skipped: str | None = None

    @property
    def value(self) -> float | None:
        spread = _spread(self.values)
        return None if spread is None else spread["median"]

    def met(self, thresholds: bool) -> bool | None:
        """Return whether the median meets the threshold; None when not judged."""
        value = self.value
        if not thresholds or self.threshold is None or self.skipped is not None:
            return None
        if self.unavailable is not None:
            return False
        if value is None:
            return None
        if self.comparison == ">=":
            return value >= self.threshold
        if self.comparison == "<=":
            return value <= self.threshold
        return value < self.threshold

    def to_dict(self, thresholds: bool) -> dict[str, Any]:
        spread = _spread(self.values)
        return {
            "target": self.number,
            "name": self.name,
            "metric": self.metric,
            "value": None if spread is None else spread["median"],
            "min": None if spread is None else spread["min"],
            "max": None if spread is None else spread["max"],
            "values": [rounded(v, 6) for v in self.values],
            "threshold": self.threshold,
            "comparison": self.comparison or None,
            "unit": self.unit or None,
            "met": self.met(thresholds),
            "unavailable": self.unavailable,
            "skipped": self.skipped,
            "details": self.details,
            "references": {name: _spread(values) for name, values in self.references.items()},
        }


def _targets(numbers: range, context: dict[str, Any]) -> list[Target]:
    """Return the targets of `TARGETS` numbered in `numbers`, names and descriptions filled in.

    Each target's description becomes its first detail line.
    """
    return [
        Target(spec.number, spec.name.format(**context), spec.metric, spec.threshold,
               spec.comparison, spec.unit, details=[spec.description.format(**context)])
        for spec in TARGETS
        if spec.number in numbers
    ]  # fmt: skip


def run_suite(
    sizes: SuiteSizes, settings: Settings, repeat: int, peers: bool
) -> tuple[list[Run], list[Target]]:
    """Run the performance targets 1 to 9 `repeat` times each; return the runs and the targets."""
    workers = SUITE_WORKERS
    runs: list[Run] = []
    # The suite's retry policy is the targets': 3 attempts (target 5 sets its own base delay).
    settings = dataclasses.replace(settings, max_attempts=3, durability=tq.DEFAULT_DURABILITY)
    lat = sizes.latency_ms
    in_flight = sizes.async_in_flight
    work = synthetic_workload(sizes.ceiling_tasks, lat)
    noop = synthetic_workload(sizes.overhead_tasks, 0.0)
    wide_work = synthetic_workload(sizes.wide_tasks, lat, prefix="wide")
    opened = synthetic_workload(sizes.open_loop_tasks, lat, prefix="open")
    capacity = opened.ceiling(workers) or 0.0
    rate = sizes.load * capacity
    faulty = synthetic_workload(sizes.retry_tasks, lat, transient_rate=sizes.transient_rate)
    context = {
        **dataclasses.asdict(sizes),
        "workers": workers,
        "ceiling_work": work.name,
        "noop_work": noop.name,
        "wide_work": wide_work.name,
        "retry_work": faulty.name,
        "retry_base_delay_ms": sizes.retry_base_delay * 1000,
        "queue_size": settings.queue_size,
        "rate": rate,
        "capacity": capacity,
    }
    targets = _targets(range(1, 10), context)
    ceiling, overhead, memory, latency, retries, durability, wide, gap, aio = targets
    if not async_pool_available():
        aio.unavailable = (
            "task_queue_optimized has no AsyncWorkerPool (SPEC section 4); only the plain "
            "asyncio side was measured"
        )

    for index in range(repeat):
        run = run_pool(work, workers, settings, index)
        runs.append(run)
        ceiling.values.append(run.efficiency)

        bare = raw_executor_bare(work, workers, index)
        runs.append(bare)
        if bare.efficiency is not None and run.efficiency is not None:
            gap.values.append(bare.efficiency - run.efficiency)
        gap.details.append(
            f"repeat {index + 1}: raw executor {_num(bare.efficiency, '.4f')}, pool "
            f"{_num(run.efficiency, '.4f')}"
        )

        raw = raw_executor_bare(noop, workers, index, handler=lambda task: None)
        normal = run_pool(noop, workers, settings, index, handler=lambda task: None)
        full = run_pool(
            noop, workers, settings, index, durability="full", handler=lambda task: None
        )
        runs += [raw, normal, full]
        overhead.values.append(normal.throughput / raw.throughput if raw.throughput else None)
        durability.values.append(full.throughput / normal.throughput if normal.throughput else None)
        overhead.details.append(
            f"repeat {index + 1}: pool {normal.throughput:,.0f}/s, raw executor "
            f"{raw.throughput:,.0f}/s, pool full durability {full.throughput:,.0f}/s"
        )

        mem = run_memory(sizes.memory_total, sizes.memory_mark, workers, settings, index)
        runs.append(mem)
        memory.values.append(mem.extra["memory"]["growth_mb"])
        sampled = mem.extra["memory"]
        memory.details.append(
            f"repeat {index + 1}: peak RSS {_kb_text(sampled.get('peak_rss_kb_at_mark'))} -> "
            f"{_kb_text(sampled.get('peak_rss_kb_at_end'))}; current RSS "
            f"{_kb_text(sampled.get('rss_kb_at_mark'))} -> {_kb_text(sampled.get('rss_kb_at_end'))}"
        )

        loop = run_open_loop(opened, workers, rate, settings, index)
        runs.append(loop)
        open_loop = loop.extra["open_loop"]
        latency.values.append(open_loop["queue_wait_from_arrival_ms"]["p99"])
        arrival, wait = (
            open_loop["latency_from_arrival_ms"],
            open_loop["queue_wait_from_arrival_ms"],
        )
        latency.details.append(
            f"repeat {index + 1}: from intended arrival: latency p50 {arrival['p50']:.2f} p99 "
            f"{arrival['p99']:.2f} ms; queue wait p50 {wait['p50']:.3f} max {wait['max']:.3f} ms"
        )
        latency.details.append(
            f"repeat {index + 1}: producer lag (its own lateness, included above) p99 "
            f"{open_loop['submit_lag_ms']['p99']:.3f} ms; queue wait from the actual submit p99 "
            f"{open_loop['queue_wait_from_submit_ms']['p99']:.3f} ms"
        )
        # The same arrivals on a bare executor: the floor this machine allows right now.
        reference = run_open_loop(opened, workers, rate, settings, index, system="raw-executor")
        runs.append(reference)
        waits = reference.extra["open_loop"]["queue_wait_from_arrival_ms"]
        latency.references.setdefault(reference.system, []).append(waits["p99"])

        run = run_pool(faulty, workers, settings, index, base_delay=sizes.retry_base_delay)
        runs.append(run)
        retries.values.append(run.attempt_efficiency)
        retries.details.append(
            f"repeat {index + 1}: {run.metrics['handler_calls']:,} attempts, "
            f"{run.metrics['retries']:,} retries, efficiency over tasks {_num(run.efficiency)}"
        )

        run = run_pool(wide_work, sizes.wide_workers, settings, index)
        runs.append(run)
        wide.values.append(run.efficiency)
        wide.details.append(
            f"repeat {index + 1}: {run.throughput:,.0f}/s, ceiling {_num(run.ceiling, ',.0f')}/s"
        )

        plain = run_plain_asyncio(sizes.async_tasks, in_flight, lat, index)
        runs.append(plain)
        text = f"repeat {index + 1}: plain asyncio {plain.throughput:,.0f}/s (efficiency "
        text += f"{_num(plain.efficiency)})"
        if aio.unavailable is None:
            pooled = run_async_pool(sizes.async_tasks, in_flight, lat, index)
            runs.append(pooled)
            ratio = pooled.throughput / plain.throughput if plain.throughput else None
            aio.values.append(ratio)
            text += f", AsyncWorkerPool {pooled.throughput:,.0f}/s"
        else:
            text += ", AsyncWorkerPool not available"
        aio.details.append(text)

    if peers:
        runs += _suite_peers(work, noop, workers, settings, ceiling, overhead, runs)
    return runs, targets


def _suite_peers(
    work: Workload,
    noop: Workload,
    workers: int,
    settings: Settings,
    ceiling: Target,
    overhead: Target,
    runs: list[Run],
) -> list[Run]:
    """Run Huey on the workloads of targets 1 and 2, for reference beside the pool's ratios."""
    raw = [r.throughput for r in runs if r.system == "raw-executor-bare"]
    raw_throughput = statistics.median(raw) if raw else 0.0
    peer_runs = []
    for storage in ("memory", "sqlite"):
        run = run_huey(storage, work, workers, settings)
        ceiling.references.setdefault(run.system, []).append(run.efficiency)
        peer_runs.append(run)
        run = run_huey(storage, noop, workers, settings)
        ratio = run.throughput / raw_throughput if raw_throughput else None
        overhead.references.setdefault(run.system, []).append(ratio)
        peer_runs.append(run)
    return peer_runs


def durable_targets(results: DurableResults | None, skipped: str | None) -> list[Target]:
    """Return targets 10 to 13, judged on the durable runs (not run when `results` is None)."""
    context = {
        "peer_workers": PEER_WORKERS,
        "sleep_tasks": PEER_SLEEP_TASKS,
        "sleep_concurrency": PEER_SLEEP_CONCURRENCY,
        "two_process_tasks": 2 * PEER_SLEEP_TASKS,
    }
    targets = _targets(range(10, 14), context)
    noop, cpu, sleep, scale = targets
    if results is None:
        for target in targets:
            target.skipped = skipped
        return targets
    peers = ("pgqueuer", "dramatiq-rabbitmq")
    measured = [peer for peer in peers if results.of(peer, "noop")]
    if not measured:
        why = (
            "no peer measured (--peers; "
            + (
                "; ".join(f"{name}: {text}" for name, text in results.skipped.items())
                or "not asked"
            )
            + ")"
        )
        noop.skipped = cpu.skipped = why
    for index, ours in enumerate(results.of("ours-postgresql", "noop")):
        others = [run for peer in measured for run in results.of(peer, "noop")
                  if run.repeat == ours.repeat]  # fmt: skip
        if not others:
            continue
        best = max(others, key=lambda run: run.throughput)
        noop.values.append(ours.throughput / best.throughput if best.throughput else None)
        costs = [run.extra["durable"]["cpu_ms_per_task"] for run in others]
        lowest = min((c for c in costs if c), default=None)
        mine = ours.extra["durable"]["cpu_ms_per_task"]
        cpu.values.append(mine / lowest if mine and lowest else None)
        peer_text = ", ".join(
            f"{run.system} {run.throughput:,.0f}/s {_num(run.extra['durable']['cpu_ms_per_task'])}"
            " ms"
            for run in others
        )
        noop.details.append(f"repeat {index + 1}: ours {ours.throughput:,.0f}/s "
                            f"{_num(mine)} ms CPU/task; {peer_text}")  # fmt: skip
    one = results.of("ours-postgresql", "sleep_10ms")
    two = {run.repeat: run for run in results.of("ours-postgresql-x2", "sleep_10ms")}
    for run in one:
        sleep.values.append(run.efficiency)
        pair = two.get(run.repeat)
        if pair is not None:
            scale.values.append(pair.throughput / run.throughput if run.throughput else None)
            scale.details.append(f"repeat {run.repeat + 1}: one process {run.throughput:,.0f}/s, "
                                 f"two {pair.throughput:,.0f}/s")  # fmt: skip
    return targets


def _kb_text(kb: float | None) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.1f} MB"


def _num(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


# --- Output --------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Format rows as a fixed-width table; the first `left` columns are left-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if index < left else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _grouped(runs: Sequence[Run]) -> list[list[Run]]:
    """Group runs by (system, workers), in first-seen order."""
    groups: dict[tuple[str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.system, run.workers), []).append(run)
    return list(groups.values())


def _cell(values: Sequence[float | None], spec: str, ranged: bool) -> str:
    spread = _spread(values)
    if spread is None:
        return "n/a"
    text = format(spread["median"], spec)
    if ranged and len([v for v in values if v is not None]) > 1:
        text += f" ({format(spread['min'], spec)}-{format(spread['max'], spec)})"
    return text


def summarize(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Return one summary per (system, workers): median, min and max of the main numbers."""
    summary = []
    for group in _grouped(runs):
        first = group[0]
        entry: dict[str, Any] = {"system": first.system, "workers": first.workers,
                                 "runs": len(group)}  # fmt: skip
        entry["throughput_per_second"] = _spread(r.throughput for r in group)
        entry["efficiency"] = _spread(r.efficiency for r in group)
        entry["speedup"] = _spread(r.speedup for r in group)
        for name in ("mean", "p50", "p95", "p99"):
            entry[f"latency_{name}_ms"] = _spread(r.metrics["latency_ms"][name] for r in group)
        entry["success_rate"] = _spread(r.metrics["success_rate"] for r in group)
        entry["retries"] = _spread(r.metrics["retries"] for r in group)
        entry["duplicates"] = _spread(r.metrics["duplicates"] for r in group)
        summary.append(entry)
    return summary


def comparison_table(runs: Sequence[Run], ranged: bool) -> str:
    """Return the table of the comparison runs (medians; with repeats, min-max in brackets)."""
    headers = ["system", "workers", "throughput/s", "efficiency", "speedup", "lat mean ms",
               "p50", "p95", "p99", "success", "retries", "dups"]  # fmt: skip
    rows = []
    for group in _grouped(runs):
        latency = [r.metrics["latency_ms"] for r in group]
        rows.append([
            group[0].system,
            str(group[0].workers),
            _cell([r.throughput for r in group], ",.1f", ranged),
            _cell([r.efficiency for r in group], ".3f", ranged),
            _cell([r.speedup for r in group], ".2f", False) + ("x" if group[0].speedup else ""),
            _cell([s["mean"] for s in latency], ",.1f", False),
            _cell([s["p50"] for s in latency], ",.1f", False),
            _cell([s["p95"] for s in latency], ",.1f", False),
            _cell([s["p99"] for s in latency], ",.1f", False),
            _cell([r.metrics["success_rate"] * 100 for r in group], ".1f", False) + "%",
            _cell([r.metrics["retries"] for r in group], ".0f", False),
            _cell([r.metrics["duplicates"] for r in group], ".0f", False),
        ])  # fmt: skip
    return _table(headers, rows)


def open_loop_table(runs: Sequence[Run]) -> str:
    """Return the table of open-loop runs: percentiles from intended arrivals, in ms.

    The last two columns split the queue wait: the producer's own lateness, and the wait measured
    from the actual submission (the pool's view).
    """
    headers = ["system", "workers", "rate/s", "load", "latency p50 ms", "p95", "p99", "max",
               "queue wait p50 ms", "p99", "max", "producer lag p99",
               "wait from submit p99"]  # fmt: skip
    rows = []
    for run in runs:
        loop = run.extra["open_loop"]
        lat, wait = loop["latency_from_arrival_ms"], loop["queue_wait_from_arrival_ms"]
        rows.append([
            run.system, str(run.workers), f"{loop['rate_per_second']:,.1f}",
            "n/a" if loop["load"] is None else f"{loop['load']:.0%}",
            f"{lat['p50']:.2f}", f"{lat['p95']:.2f}", f"{lat['p99']:.2f}", f"{lat['max']:.2f}",
            f"{wait['p50']:.3f}", f"{wait['p99']:.3f}", f"{wait['max']:.3f}",
            f"{loop['submit_lag_ms']['p99']:.3f}",
            f"{loop['queue_wait_from_submit_ms']['p99']:.3f}",
        ])  # fmt: skip
    return _table(headers, rows)


def targets_table(targets: Sequence[Target], thresholds: bool) -> str:
    """Return the table of the suite's targets, then the details of each."""
    headers = ["target", "metric", "measured", "threshold", "result"]
    rows = []
    for target in targets:
        value = target.value
        measured = "n/a" if value is None else f"{value:.3f}{target.unit}"
        if target.unavailable is not None:
            measured = "not available"
        elif target.skipped is not None:
            measured = "not run"
        elif len([v for v in target.values if v is not None]) > 1:
            spread = _spread(target.values)
            assert spread is not None
            measured += f" ({spread['min']:.3f}-{spread['max']:.3f})"
        if target.threshold is None:
            threshold, result = "reported", "-"
        else:
            threshold = f"{target.comparison} {target.threshold:g}{target.unit}"
            met = target.met(thresholds)
            if met is None:
                result = "not judged" if target.skipped is not None else "n/a (smoke)"
            else:
                result = "met" if met else "NOT MET"
        rows.append([f"{target.number}. {target.name}", target.metric, measured, threshold, result])
    lines = [_table(headers, rows, left=2), ""]
    for target in targets:
        lines.append(f"{target.number}. {target.details[0]}")
        for reason, why in (("not available", target.unavailable), ("not run", target.skipped)):
            if why is not None:
                lines.append(f"     {reason}: {why}")
        lines += [f"     {detail}" for detail in target.details[1:]]
        for system, values in target.references.items():
            spread = _spread(values)
            value = None if spread is None else spread["median"]
            lines.append(f"     reference {system}: {target.metric} {_num(value)}{target.unit}")
    return "\n".join(lines)


def _scale_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """Group scale-out runs by process count, in first-seen order."""
    groups: dict[int, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.extra["scale_out"]["processes"], []).append(run)
    return list(groups.values())


def scale_table(runs: Sequence[Run], ranged: bool) -> str:
    """Return the table of the scale-out runs, one row per process count (medians)."""
    base = min(run.extra["scale_out"]["processes"] for run in runs) if runs else 1
    headers = ["processes", "threads", "tasks", "throughput/s", "ceiling/s", "efficiency",
               f"speedup vs x{base}", "startup s", "eff. after startup",
               "worker CPU s"]  # fmt: skip
    rows = []
    for group in _scale_groups(runs):
        scale = [run.extra["scale_out"] for run in group]
        rows.append([
            str(scale[0]["processes"]),
            str(group[0].workers),
            f"{scale[0]['tasks']:,}",
            _cell([r.throughput for r in group], ",.1f", ranged),
            _cell([r.ceiling for r in group], ",.0f", False),
            _cell([r.efficiency for r in group], ".3f", ranged),
            _cell([r.speedup for r in group], ".2f", False) + "x",
            _cell([s["startup_seconds"] for s in scale], ".2f", False),
            _cell([s["efficiency_after_startup"] for s in scale], ".3f", False),
            _cell([s["worker_cpu_seconds"] for s in scale], ".2f", False),
        ])  # fmt: skip
    return _table(headers, rows)


def noop_table(runs: Sequence[Run], ranged: bool) -> str:
    """Return the table of the no-op store runs: throughput, time per task, ratio to SQLite."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.extra["store_noop"]["backend"], []).append(run)
    sqlite = {run.repeat: run.throughput for run in groups.get("sqlite", [])}
    headers = ["store", "workers", "throughput/s", "us/task", "vs sqlite"]
    rows = []
    for backend, group in groups.items():
        ratios = [run.throughput / sqlite[run.repeat] if sqlite.get(run.repeat) else None
                  for run in group]  # fmt: skip
        rows.append([
            backend,
            str(group[0].workers),
            _cell([r.throughput for r in group], ",.0f", ranged),
            _cell([1e6 / r.throughput if r.throughput else None for r in group], ",.1f", False),
            _cell(ratios, ".3f", ranged and backend != "sqlite"),
        ])  # fmt: skip
    return _table(headers, rows)


def _durable_header(repeat: int) -> str:
    text = ("durable: each contender drains a queue filled before its worker started; throughput "
            "from the worker's ready line to all tasks done (read every "
            f"{PEER_POLL_INTERVAL * 1000:g} ms), CPU of the whole machine per task")  # fmt: skip
    if repeat > 1:
        text += f"; {repeat} repeats: median (min-max)"
    return text


def _durable_report(results: DurableResults) -> dict[str, Any]:
    summary = []
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in results.runs:
        groups.setdefault((run.extra["durable"]["handler"], run.system), []).append(run)
    for (handler, system), group in groups.items():
        summary.append({
            "workload": handler,
            "system": system,
            "concurrency": group[0].workers,
            "tasks": group[0].extra["durable"]["tasks"],
            "runs": len(group),
            "throughput_per_second": _spread(r.throughput for r in group),
            "efficiency": _spread(r.efficiency for r in group),
            "cpu_ms_per_task": _spread(r.extra["durable"]["cpu_ms_per_task"] for r in group),
            "settings": group[0].extra["durable"]["settings"],
        })  # fmt: skip
    return {
        "summary": summary,
        "skipped_peers": results.skipped,
        "definitions": dict(DURABLE_DEFINITIONS),
    }


def durable_table(results: DurableResults, ranged: bool) -> str:
    """Return the table of the durable runs: throughput and machine CPU per task (medians)."""
    headers = ["workload", "system", "concurrency", "tasks", "throughput/s", "efficiency",
               "CPU ms/task", "startup s"]  # fmt: skip
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in results.runs:
        groups.setdefault((run.extra["durable"]["handler"], run.system), []).append(run)
    rows = []
    for (handler, system), group in groups.items():
        durable = [run.extra["durable"] for run in group]
        rows.append([
            "no-op" if handler == "noop" else "10 ms", system, str(group[0].workers),
            f"{durable[0]['tasks']:,}",
            _cell([r.throughput for r in group], ",.1f", ranged),
            _cell([r.efficiency for r in group], ".3f", ranged),
            _cell([d["cpu_ms_per_task"] for d in durable], ".3f", ranged),
            _cell([d["startup_seconds"] for d in durable], ".2f", False),
        ])  # fmt: skip
    return _table(headers, rows, left=2)


def machine_info() -> dict[str, Any]:
    """Return the cores, platform and Python that the report records."""
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "sqlite": sqlite3.sqlite_version,
    }


def write_report(path: str, report: dict[str, Any]) -> None:
    """Write the report as JSON, atomically (a temporary file, then a rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".benchmark-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _log2_axes(axes: Sequence[Any], ticks: Sequence[int]) -> None:
    """Put each axis's x on a log2 scale marked at `ticks`; add a light grid and a legend."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_locator(FixedLocator(ticks))
        axis.xaxis.set_major_formatter(ScalarFormatter())
        axis.xaxis.set_minor_locator(NullLocator())
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")


def plot(path: str, runs: Sequence[Run], title: str) -> None:
    """Draw throughput and efficiency against workers, and the latency percentiles, to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_eff, ax_lat) = plt.subplots(1, 3, figsize=(16, 4.8))
    systems: dict[str, list[dict[str, Any]]] = {}
    for entry in summarize(runs):
        systems.setdefault(entry["system"], []).append(entry)
    for index, (system, entries) in enumerate(systems.items()):
        entries.sort(key=lambda e: e["workers"])
        color = f"C{index}"
        xs = [e["workers"] for e in entries]
        ax_tp.plot(xs, [e["throughput_per_second"]["median"] for e in entries], "o-",
                   color=color, label=system)  # fmt: skip
        eff = [e for e in entries if e["efficiency"]]
        if eff:
            ax_eff.plot([e["workers"] for e in eff], [e["efficiency"]["median"] for e in eff],
                        "o-", color=color, label=system)  # fmt: skip
        for name, style in (("p50", ":"), ("p95", "--"), ("p99", "-")):
            ys = [e[f"latency_{name}_ms"]["median"] for e in entries]
            label = system if name == "p99" else None
            ax_lat.plot(xs, ys, style, marker="o", color=color, label=label)
    ax_tp.set(title="throughput", xlabel="workers", ylabel="tasks / s")
    ax_eff.set(title="efficiency (vs workers / mean latency)", xlabel="workers", ylim=(0, 1.05))
    ax_lat.set(title="latency: p50 dotted, p95 dashed, p99 solid", xlabel="workers",
               ylabel="ms (submission to finish)", yscale="log")  # fmt: skip
    _log2_axes((ax_tp, ax_eff, ax_lat), sorted({run.workers for run in runs}))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- Concurrency ---------------------------------------------------------------------------------


def concurrency_tasks(level: int, tasks: int | None) -> int:
    """Return the tasks of one --concurrency-plot run at `level` workers or coroutines."""
    return tasks or max(CONCURRENCY_MIN_TASKS, CONCURRENCY_ROUNDS * level)


def run_concurrency(
    levels: Sequence[int], latency_ms: float, tasks: int | None, settings: Settings, repeat: int
) -> list[Run]:
    """At each level, run `latency_ms` sleeps through the pool and a bare ThreadPoolExecutor
    (``time.sleep``), and through AsyncWorkerPool and a plain asyncio loop (``asyncio.sleep``),
    with that many workers or coroutines in flight."""
    latency = latency_ms / 1000.0

    def sleep(task: tq.Task) -> None:
        time.sleep(latency)

    runs: list[Run] = []
    for index in range(repeat):
        for level in levels:
            count = concurrency_tasks(level, tasks)
            work = synthetic_workload(count, latency_ms, prefix=f"c{level}")
            runs.append(run_pool(work, level, settings, index, handler=sleep))
            runs.append(raw_executor_bare(work, level, index, handler=sleep))
            if async_pool_available():
                runs.append(run_async_pool(count, level, latency_ms, index))
            runs.append(run_plain_asyncio(count, level, latency_ms, index))
    return runs


def concurrency_table(runs: Sequence[Run], ranged: bool) -> str:
    """Return throughput and efficiency per level and system (medians; min-max with repeats)."""
    rows = []
    for group in sorted(_grouped(runs), key=lambda g: (g[0].workers, g[0].system)):
        rows.append([
            str(group[0].workers),
            group[0].system,
            f"{group[0].metrics['submitted']:,}",
            _cell([r.throughput for r in group], ",.1f", ranged),
            _cell([r.ceiling for r in group], ",.1f", False),
            _cell([r.efficiency for r in group], ".3f", ranged),
        ])  # fmt: skip
    headers = ["concurrency", "system", "tasks", "throughput/s", "ceiling/s", "efficiency"]
    return _table(headers, rows, left=2)


def plot_concurrency(path: str, runs: Sequence[Run], title: str) -> None:
    """Draw throughput and efficiency against concurrency, one line per system, to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_eff) = plt.subplots(1, 2, figsize=(10, 4))
    levels = sorted({run.workers for run in runs})
    ceilings = {run.workers: run.ceiling for run in runs if run.ceiling}
    ax_tp.plot(levels, [ceilings.get(level) for level in levels], "k--", lw=1,
               label="ceiling (concurrency / latency)")  # fmt: skip
    for index, system in enumerate(CONCURRENCY_SYSTEMS):
        groups = sorted((g for g in _grouped(runs) if g[0].system == system),
                        key=lambda g: g[0].workers)  # fmt: skip
        if not groups:
            continue
        xs = [g[0].workers for g in groups]
        tp = [statistics.median(r.throughput for r in g) for g in groups]
        eff = [statistics.median(r.efficiency or 0.0 for r in g) for g in groups]
        ax_tp.plot(xs, tp, "o-", color=f"C{index}", label=system)
        ax_eff.plot(xs, eff, "o-", color=f"C{index}", label=system)
    ax_tp.set(title="throughput", xlabel="workers or coroutines in flight", ylabel="tasks / s",
              yscale="log")  # fmt: skip
    ax_eff.set(title="efficiency (throughput / ceiling)", xlabel="workers or coroutines in flight",
               ylim=(0, 1.05))  # fmt: skip
    _log2_axes((ax_tp, ax_eff), levels)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --- Command line --------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = tq._Parser(  # noqa: SLF001  # the module's parser: usage errors in one line
        prog="benchmark.py",
        description="Benchmark task_queue_optimized: baseline, raw executor, pool and peers.",
        epilog="Exit codes: 0 done (with --suite: every target met); 1 a --suite target not "
        "met; 2 usage or input error; 130 interrupted.",
    )
    what = parser.add_argument_group("what to run (default: the comparison runs)")
    what.add_argument("--task-file", metavar="FILE", help="benchmark the tasks of a task file")
    what.add_argument(
        "--tasks",
        type=int,
        metavar="N",
        help=f"synthetic tasks (default {DEFAULT_TASKS}; with --processes: per process count, "
        f"default max({SCALE_MIN_TASKS}, {SCALE_TASKS_PER_THREAD} x P x W), and "
        f"{NOOP_TASKS_PER_TASK} x N no-op tasks, default {NOOP_TASKS:,})",
    )
    what.add_argument(
        "--latency-ms",
        type=float,
        metavar="X",
        help=f"synthetic task latency (default {DEFAULT_LATENCY_MS:g}; "
        f"{SCALE_LATENCY_MS:g} with --processes)",
    )
    what.add_argument(
        "--jitter-ms",
        type=float,
        metavar="X",
        default=0.0,
        help="uniform +- jitter on each latency (default 0)",
    )
    what.add_argument(
        "--transient-rate",
        type=float,
        metavar="P",
        default=0.0,
        help="injected transient faults per attempt (default 0)",
    )
    what.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of faults, jitter and arrivals (default {DEFAULT_SEED})",
    )
    what.add_argument(
        "--rate",
        type=float,
        metavar="R",
        help="open loop: Poisson arrivals at R tasks/s, latency from arrival",
    )
    what.add_argument(
        "--rate-limit",
        metavar="N/UNIT",
        help="how close a rate limit holds to its target: no-op calls (--tasks, default six "
        "periods' worth) through a pool limited to N/UNIT, the limit kept in process and in a "
        "SQLite file (and in PostgreSQL with --db postgresql://...)",
    )
    what.add_argument(
        "--unused-cost",
        metavar="BASELINE.py",
        help="no-op pool throughput of this module vs BASELINE.py (the module before delays and "
        "priorities), interleaved; --tasks per run (default "
        f"{UNUSED_COST_TASKS:,}), first --workers, --repeat runs",
    )
    what.add_argument(
        "--suite",
        action="store_true",
        help="run targets 1 to 9 (their own workloads), and 10 to 13 with --db postgresql://...",
    )
    what.add_argument(
        "--quick", action="store_true", help="with --suite: scale targets 2 and 3 down"
    )
    what.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny version of everything cheap, no thresholds (CI)",
    )
    what.add_argument(
        "--peers",
        action="store_true",
        help="also run Huey (MemoryHuey, SqliteHuey) where it is installed; with --db "
        "postgresql://..., PGQueuer and Dramatiq on RabbitMQ",
    )
    scale = parser.add_argument_group(
        "durable runs: scale-out with --processes, else our worker process against durable peers"
    )
    scale.add_argument(
        "--db",
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DBNAME (each run in a new schema, dropped after), or a "
        "SQLite path (each run in a new temporary file in its folder; the file is not touched); "
        "without --processes: our worker process on PostgreSQL, with --peers against PGQueuer "
        "and Dramatiq, and with --suite targets 10 to 13",
    )
    scale.add_argument(
        "--rabbitmq",
        metavar="URL",
        default=DEFAULT_RABBITMQ_URL,
        help="Dramatiq's RabbitMQ server for --peers with --db (default the local one, "
        "guest/guest)",
    )
    scale.add_argument(
        "--processes",
        metavar="LIST",
        help="worker process counts, e.g. 1,2,4 (with --db): throughput and efficiency per "
        "count, then the no-op overhead of PostgreSQL vs SQLite",
    )
    tuning = parser.add_argument_group("tuning")
    tuning.add_argument(
        "--workers",
        default=DEFAULT_WORKERS,
        metavar="LIST",
        help=f"worker counts, e.g. 1,2,4,8,16 (default {DEFAULT_WORKERS}); with --processes, "
        "one count: the threads of each worker process",
    )
    tuning.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="K",
        help="repeat each run K times: median, min and max",
    )
    tuning.add_argument(
        "--queue-size",
        type=int,
        default=tq.DEFAULT_QUEUE_SIZE,
        metavar="N",
        help=f"the pool's bounded queue (default {tq.DEFAULT_QUEUE_SIZE})",
    )
    tuning.add_argument(
        "--max-attempts",
        type=int,
        default=tq.DEFAULT_MAX_ATTEMPTS,
        metavar="N",
        help=f"attempts per task, retries included (default {tq.DEFAULT_MAX_ATTEMPTS})",
    )
    tuning.add_argument(
        "--base-delay",
        type=float,
        default=tq.DEFAULT_BASE_DELAY,
        metavar="S",
        help=f"first retry backoff cap, seconds (default {tq.DEFAULT_BASE_DELAY:g})",
    )
    tuning.add_argument(
        "--durability",
        choices=("normal", "full"),
        default=tq.DEFAULT_DURABILITY,
        help="the pool's store (and SqliteHuey's fsync): normal or full (default normal)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--report",
        default=DEFAULT_REPORT,
        metavar="FILE",
        help=f"JSON report (default {DEFAULT_REPORT})",
    )
    output.add_argument("--plot", metavar="FILE.png", help="draw the comparison (matplotlib)")
    output.add_argument(
        "--concurrency-plot",
        metavar="FILE.png",
        help="instead of the comparison: throughput against concurrency of the pool, a bare "
        "ThreadPoolExecutor, AsyncWorkerPool and plain asyncio on --latency-ms sleeps, at each "
        f"--workers count (default {','.join(map(str, CONCURRENCY_LEVELS))}; tasks per run: "
        f"--tasks, default max({CONCURRENCY_MIN_TASKS}, {CONCURRENCY_ROUNDS} x count)), "
        "drawn to FILE.png (matplotlib)",
    )
    output.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal)",
    )
    internal = parser.add_argument_group()
    internal.add_argument("--memory-child", type=int, metavar="N", help=argparse.SUPPRESS)
    internal.add_argument("--memory-mark", type=int, metavar="M", help=argparse.SUPPRESS)
    return parser


def _parse_counts(text: str, flag: str) -> list[int]:
    values: list[int] = []
    for part in text.split(","):
        try:
            value = int(part.strip())
        except ValueError:
            value = 0
        if value < 1:
            raise UsageError(f"{flag}: expected positive integers like 1,2,4,8, got {text!r}")
        if value not in values:
            values.append(value)
    return values


def _parse_workers(text: str) -> list[int]:
    return _parse_counts(text, "--workers")


def _check_args(args: argparse.Namespace) -> None:
    """Reject bad combinations and values before anything runs."""
    modes = [name for name in ("suite", "smoke") if getattr(args, name)]
    if args.rate is not None:
        modes.append("rate")
    if args.rate_limit is not None:
        modes.append("rate-limit")
        try:
            tq._rate_of(args.rate_limit, "--rate-limit")  # noqa: SLF001  # the pool's own parser
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if args.unused_cost is not None:
        modes.append("unused-cost")
    if args.processes is not None:
        modes.append("processes")
    if args.concurrency_plot is not None:
        modes.append("concurrency-plot")
    if len(modes) > 1:
        raise UsageError(f"--{modes[0]} and --{modes[1]} cannot be combined")
    if args.concurrency_plot is not None:
        _check_concurrency_args(args)
    elif args.processes is not None:
        _check_scale_args(args)
    elif args.db is not None and args.rate_limit is None:
        _check_durable_args(args)
    if args.peers and args.rate is not None:
        raise UsageError("--peers runs beside the comparison runs and --suite, not --rate")
    if args.quick and not args.suite:
        raise UsageError("--quick only applies to --suite")
    if args.unused_cost is not None and (args.db is not None or args.task_file is not None):
        raise UsageError("--unused-cost runs its own no-op workload: no --db or --task-file")
    if args.unused_cost is not None and not os.path.isfile(args.unused_cost):
        raise UsageError(f"--unused-cost {args.unused_cost}: no such file")
    if (args.suite or args.smoke) and (args.task_file is not None or args.tasks is not None):
        raise UsageError("--suite and --smoke run their own workloads: no --task-file or --tasks")
    if args.task_file is not None and args.tasks is not None:
        raise UsageError("give --task-file or --tasks, not both")
    checks = [
        (args.tasks is None or args.tasks >= 1, "--tasks must be >= 1"),
        (args.repeat >= 1, "--repeat must be >= 1"),
        (args.queue_size >= 1, "--queue-size must be >= 1"),
        (args.max_attempts >= 1, "--max-attempts must be >= 1"),
        (math.isfinite(args.latency_ms) and args.latency_ms >= 0, "--latency-ms must be >= 0"),
        (math.isfinite(args.jitter_ms) and args.jitter_ms >= 0, "--jitter-ms must be >= 0"),
        (math.isfinite(args.base_delay) and args.base_delay >= 0, "--base-delay must be >= 0"),
        (0 <= args.transient_rate <= 1, "--transient-rate must be within [0, 1]"),
        (args.rate is None or (math.isfinite(args.rate) and args.rate > 0), "--rate must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if args.plot is not None:
        if args.suite or args.rate is not None or args.smoke or args.processes is not None:
            raise UsageError(
                "--plot draws the comparison runs: not with --suite, --rate, --smoke, --processes"
            )
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError(
                "--plot needs matplotlib, which is not installed: pip install matplotlib"
            )
        tq._check_output_path(args.plot, "--plot")  # noqa: SLF001  # the module's own check of an output path
    tq._check_output_path(args.report, "--report")  # noqa: SLF001  # the module's own check of an output path


def _check_concurrency_args(args: argparse.Namespace) -> None:
    """Reject what --concurrency-plot cannot run with, or cannot draw without."""
    for flag, given in (("--db", args.db is not None), ("--peers", args.peers),
                        ("--task-file", args.task_file is not None),
                        ("--plot", args.plot is not None)):  # fmt: skip
        if given:
            raise UsageError(f"--concurrency-plot runs its own sleeps: no {flag}")
    if not (math.isfinite(args.latency_ms) and args.latency_ms > 0):
        raise UsageError("--latency-ms must be > 0 with --concurrency-plot (it draws a ceiling)")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(
            "--concurrency-plot needs matplotlib, which is not installed: pip install matplotlib"
        )
    tq._check_output_path(args.concurrency_plot, "--concurrency-plot")  # noqa: SLF001  # the module's own check of an output path


def _check_durable_args(args: argparse.Namespace) -> None:
    """Reject what --db without --processes (the durable comparison) cannot run with."""
    if args.smoke:
        raise UsageError("--smoke and --db cannot be combined (the durable runs are not smoke)")
    if parse_database(args.db).backend != "postgresql":
        raise UsageError("--db without --processes runs the durable comparison, which needs "
                         "--db postgresql://USER@HOST:PORT/DBNAME (for scale-out on SQLite give "
                         "--processes LIST)")  # fmt: skip
    if args.rate is not None or args.task_file is not None or args.tasks is not None:
        raise UsageError("--db runs its own durable workloads: no --rate, --task-file or --tasks")
    if os.name == "nt":
        raise UsageError("--db needs POSIX signals: its workers are stopped with SIGTERM")


def _check_scale_args(args: argparse.Namespace) -> None:
    """Reject what --db and --processes cannot run with."""
    if args.processes is None or args.db is None:
        raise UsageError("--db URL and --processes LIST go together, e.g. "
                         "--db /tmp/scale.db --processes 1,2,4")  # fmt: skip
    _parse_counts(args.processes, "--processes")
    parse_database(args.db)
    if len(_parse_workers(args.workers)) != 1:
        raise UsageError("--processes takes one --workers count: the threads of each process")
    if args.task_file is not None:
        raise UsageError("--processes runs its own tasks: no --task-file")
    if args.peers:
        raise UsageError("--peers runs beside the comparison runs, --suite and --db, not "
                         "--processes")  # fmt: skip
    if args.jitter_ms or args.transient_rate:
        raise UsageError("--processes runs tasks without jitter or faults: "
                         "no --jitter-ms or --transient-rate")  # fmt: skip
    if not (math.isfinite(args.latency_ms) and args.latency_ms > 0):
        raise UsageError("--latency-ms must be > 0 with --processes (the ceiling divides by it)")
    if os.name == "nt":
        raise UsageError("--processes needs POSIX signals: its workers are stopped with SIGTERM")


def _settings(args: argparse.Namespace) -> Settings:
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    return Settings(args.queue_size, args.max_attempts, args.base_delay, args.durability, progress)


def _workload(args: argparse.Namespace) -> Workload:
    if args.task_file is not None:
        return file_workload(
            args.task_file,
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            transient_rate=args.transient_rate,
            seed=args.seed,
        )
    return synthetic_workload(
        args.tasks or DEFAULT_TASKS,
        args.latency_ms,
        jitter_ms=args.jitter_ms,
        transient_rate=args.transient_rate,
        seed=args.seed,
    )


def _peers_wanted(requested: bool) -> bool:
    if not requested:
        return False
    if huey_available():
        return True
    print("peers: huey is not installed (pip install -r requirements-bench.txt); "
          "skipping the Huey runs", file=sys.stderr)  # fmt: skip
    return False


def run_comparison(
    workload: Workload, workers: Sequence[int], settings: Settings, repeat: int, peers: bool
) -> list[Run]:
    """Run the baseline once and, at each worker count, the raw executor, the pool and peers."""
    runs: list[Run] = []
    for index in range(repeat):
        naive = run_naive(workload, settings, index)
        runs.append(naive)
        batch = []
        for count in workers:
            batch.append(run_raw_executor(workload, count, settings, index))
            batch.append(run_pool(workload, count, settings, index))
            if peers:
                batch.append(run_huey("memory", workload, count, settings, index))
                batch.append(run_huey("sqlite", workload, count, settings, index))
        for run in [naive, *batch]:
            if naive.throughput:
                run.speedup = run.throughput / naive.throughput
        runs += batch
    return runs


def _header(workload: Workload, repeat: int) -> str:
    text = f"workload: {workload.name}"
    if len(workload.unique) != len(workload.tasks):
        text += f" ({len(workload.unique)} distinct keys)"
    text += f"; mean task latency {workload.mean_latency * 1000:.2f} ms"
    if repeat > 1:
        text += f"; {repeat} repeats: median (min-max)"
    return text


def _report(args: argparse.Namespace, argv: Sequence[str], mode: str) -> dict[str, Any]:
    return {
        "tool": "benchmark.py",
        "library_version": tq.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
        },
        "machine": machine_info(),
        "configuration": {
            "mode": mode,
            "argv": list(argv),
            "task_file": args.task_file,
            "tasks": args.tasks,
            "latency_ms": args.latency_ms,
            "jitter_ms": args.jitter_ms,
            "transient_rate": args.transient_rate,
            "seed": args.seed,
            "workers": _parse_workers(args.workers),
            "repeat": args.repeat,
            "queue_size": args.queue_size,
            "max_attempts": args.max_attempts,
            "base_delay": args.base_delay,
            "durability": args.durability,
            "rate": args.rate,
            "rate_limit": args.rate_limit,
            "quick": args.quick,
            "peers": args.peers,
            "db": None if args.db is None else tq._redact(args.db),  # noqa: SLF001  # the module's own redaction
            "processes": None if args.processes is None else _parse_counts(args.processes, "-"),
        },
        "definitions": dict(COMPARISON_DEFINITIONS),
    }


def _mode(args: argparse.Namespace) -> str:
    if args.concurrency_plot is not None:
        return "concurrency"
    if args.smoke:
        return "smoke"
    if args.unused_cost is not None:
        return "unused-cost"
    if args.suite:
        return "suite"
    if args.processes is not None:
        return "scale-out"
    if args.rate_limit is not None:
        return "rate-limit"
    if args.db is not None:
        return "durable"
    return "open-loop" if args.rate is not None else "compare"


def _compare_mode(
    args: argparse.Namespace,
    workload: Workload,
    settings: Settings,
    peers: bool,
    report: dict[str, Any],
) -> list[Run]:
    """Run and print the comparison; return its runs."""
    workers = _parse_workers(args.workers)
    if args.smoke:
        workers = SMOKE_COMPARISON["workers"]
    report["workload"] = workload.describe()
    runs = run_comparison(workload, workers, settings, args.repeat, peers)
    print(_header(workload, args.repeat))
    print(comparison_table(runs, ranged=args.repeat > 1))
    report["summary"] = summarize(runs)
    return runs


def _open_loop_mode(
    args: argparse.Namespace, workload: Workload, settings: Settings, report: dict[str, Any]
) -> list[Run]:
    """Run and print the open-loop runs; return them."""
    report["workload"] = workload.describe()
    runs = [
        run_open_loop(workload, count, args.rate, settings, index, seed=args.seed, system=system)
        for index in range(args.repeat)
        for count in _parse_workers(args.workers)
        for system in ("raw-executor", "pool")
    ]
    print(f"open loop: {_header(workload, 1)}; latency and queue wait from intended arrival")
    print(open_loop_table(runs))
    return runs


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Make SIGTERM raise KeyboardInterrupt meanwhile, so the cleanup of a run still happens.

    Killed without it, the benchmark would leave its worker processes serving forever and its
    PostgreSQL schema behind.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _scale_mode(args: argparse.Namespace, settings: Settings, report: dict[str, Any]) -> list[Run]:
    """Run and print the scale-out runs, then the no-op store comparison; return their runs."""
    with _sigterm_as_interrupt():
        return _run_scale_mode(args, settings, report)


def _run_scale_mode(
    args: argparse.Namespace, settings: Settings, report: dict[str, Any]
) -> list[Run]:
    database = parse_database(args.db)
    counts = _parse_counts(args.processes, "--processes")
    workers = _parse_workers(args.workers)[0]
    latency = args.latency_ms
    scale_runs = run_scale_series(database, counts, workers, args.tasks, settings, args.repeat,
                                  latency_ms=latency)  # fmt: skip
    text = f"scale-out on {database.backend} {database.label}"
    if database.backend == "sqlite":
        text += " (a new file beside it for each run)"
    else:
        text += " (a new schema for each run)"
    text += (f": tasks of {latency:g} ms, {workers} worker threads per process, time from "
             f"starting the processes to all tasks done (polled every "
             f"{STATUS_POLL_INTERVAL * 1000:g} ms)")  # fmt: skip
    if args.repeat > 1:
        text += f"; {args.repeat} repeats: median (min-max)"
    print(text)
    print(scale_table(scale_runs, ranged=args.repeat > 1))
    print()

    noop_count = noop_tasks(args.tasks)
    noop_runs, ratios = run_noop_comparison(database, noop_count, workers, settings, args.repeat)
    print(f"no-op store overhead: {noop_count:,} no-op tasks through an in-process "
          f"WorkerPool(durable=False), {workers} workers, a fresh database each")  # fmt: skip
    print(noop_table(noop_runs, ranged=args.repeat > 1))
    note = None
    if database.backend != "postgresql":
        note = ("PostgreSQL not measured: --db is a SQLite path; the comparison needs "
                "--db postgresql://USER@HOST:PORT/DBNAME")  # fmt: skip
        print(note)

    summary = []
    for group in _scale_groups(scale_runs):
        scale = [run.extra["scale_out"] for run in group]
        summary.append({
            "processes": scale[0]["processes"],
            "workers_per_process": workers,
            "threads": group[0].workers,
            "tasks": scale[0]["tasks"],
            "runs": len(group),
            "ceiling_per_second": rounded(group[0].ceiling),
            "throughput_per_second": _spread(r.throughput for r in group),
            "efficiency": _spread(r.efficiency for r in group),
            "speedup": _spread(r.speedup for r in group),
            "startup_seconds": _spread(s["startup_seconds"] for s in scale),
            "efficiency_after_startup": _spread(s["efficiency_after_startup"] for s in scale),
        })  # fmt: skip
    report["scale_out"] = {
        "backend": database.backend,
        "database": database.label,
        "latency_ms": latency,
        "workers_per_process": workers,
        "processes": counts,
        "summary": summary,
        "noop_overhead": {
            "tasks": noop_count,
            "workers": workers,
            "pool": "WorkerPool(lambda task: None, durable=False) fed by iter_results",
            "sqlite_throughput_per_second": _spread(
                r.throughput for r in noop_runs if r.system == "pool-sqlite"
            ),
            "postgresql_throughput_per_second": _spread(
                r.throughput for r in noop_runs if r.system == "pool-postgresql"
            ),
            "postgresql_vs_sqlite": _spread(ratios),
            "note": note,
        },
        "definitions": {
            name: text.format(base=min(counts)) for name, text in SCALE_DEFINITIONS.items()
        },
    }
    return scale_runs + noop_runs


def _suite_mode(
    args: argparse.Namespace, settings: Settings, peers: bool, report: dict[str, Any]
) -> tuple[list[Run], bool]:
    """Run and print the targets; return their runs and whether every judged target was met."""
    sizes = SMOKE_SIZES if args.smoke else QUICK_SIZES if args.quick else FULL_SIZES
    repeat = 1 if args.smoke else args.repeat
    runs, targets = run_suite(sizes, settings, repeat, peers and not args.smoke)
    durable = None
    skipped = "needs --db postgresql://USER@HOST:PORT/DBNAME (and --peers for 10 and 11)"
    if args.smoke:
        skipped = "not part of --smoke"
    elif args.db is not None:
        durable = run_durable(
            args.db, args.rabbitmq, args.peers, repeat, progress=settings.progress
        )
        runs += durable.runs
        print(_durable_header(repeat))
        print(durable_table(durable, ranged=repeat > 1))
        print()
        report["durable"] = _durable_report(durable)
    targets += durable_targets(durable, skipped)
    if args.smoke:
        print()
    print(f"suite ({sizes.label}), {SUITE_WORKERS} workers, {repeat} repeat(s): median")
    print(targets_table(targets, sizes.thresholds))
    report["suite"] = {"sizes": dataclasses.asdict(sizes)}
    report["targets"] = [target.to_dict(sizes.thresholds) for target in targets]
    return runs, all(target.met(sizes.thresholds) is not False for target in targets)


def _concurrency_mode(
    args: argparse.Namespace, argv: Sequence[str], settings: Settings, report: dict[str, Any]
) -> list[Run]:
    """Run, print and draw throughput against concurrency; return the runs."""
    given = any(arg == "--workers" or arg.startswith("--workers=") for arg in argv)
    levels = _parse_workers(args.workers) if given else list(CONCURRENCY_LEVELS)
    runs = run_concurrency(levels, args.latency_ms, args.tasks, settings, args.repeat)
    title = (f"sleeps of {args.latency_ms:g} ms, {CONCURRENCY_ROUNDS} per worker (at least "
             f"{CONCURRENCY_MIN_TASKS})" if args.tasks is None else
             f"{args.tasks:,} sleeps of {args.latency_ms:g} ms per run")  # fmt: skip
    if args.repeat > 1:
        title += f"; {args.repeat} repeats: median"
    print(f"concurrency: {title}")
    print(concurrency_table(runs, ranged=args.repeat > 1))
    summary = [{"system": g[0].system, "workers": g[0].workers, "runs": len(g),
                "throughput_per_second": _spread(r.throughput for r in g),
                "efficiency": _spread(r.efficiency for r in g)}
               for g in _grouped(runs)]  # fmt: skip
    report["concurrency"] = {"levels": levels, "title": title, "summary": summary}
    plot_concurrency(args.concurrency_plot, runs, title)
    print(f"plot written to {args.concurrency_plot}")
    return runs


def _rate_limit_mode(args: argparse.Namespace, report: dict[str, Any]) -> list[Run]:
    """Run and print the rate-limit runs; return them."""
    limit = tq._rate_of(args.rate_limit, "--rate-limit")  # noqa: SLF001  # the pool's own parser
    tasks = args.tasks or 6 * limit.count
    workers = _parse_workers(args.workers)[0]
    databases: list[Database | None] = [None, Database("sqlite", tempfile.gettempdir(), "")]
    if args.db is not None:
        databases.append(parse_database(args.db))
    runs = [
        run_rate_limit(args.rate_limit, tasks, workers, database, index)
        for index in range(args.repeat)
        for database in databases
    ]
    text = (f"rate limit {limit.text}: {tasks} no-op calls, {workers} workers; busiest window: "
            "most call starts in any window of one period; steady: the calls after the first "
            "window's burst over the time they took")  # fmt: skip
    if args.repeat > 1:
        text += f"; {args.repeat} repeats: median (min-max)"
    print(text)
    print(rate_limit_table(runs, ranged=args.repeat > 1))
    report["rate_limit"] = [run.extra["rate_limit"] | {"system": run.system} for run in runs]
    return runs


def _durable_mode(
    args: argparse.Namespace, settings: Settings, report: dict[str, Any]
) -> list[Run]:
    """Run and print the durable comparison; return its runs."""
    with _sigterm_as_interrupt():
        results = run_durable(args.db, args.rabbitmq, args.peers, args.repeat,
                              progress=settings.progress)  # fmt: skip
    print(_durable_header(args.repeat))
    print(durable_table(results, ranged=args.repeat > 1))
    report["durable"] = _durable_report(results)
    return results.runs


def _main(argv: Sequence[str]) -> int:
    args = _build_parser().parse_args(argv)
    if args.latency_ms is None:
        args.latency_ms = SCALE_LATENCY_MS if args.processes is not None else DEFAULT_LATENCY_MS
    settings = _settings(args)
    if args.memory_child is not None:
        mark = args.memory_mark or max(args.memory_child // 10, 1)
        workers = _parse_workers(args.workers)[0]
        print(json.dumps(memory_child(args.memory_child, mark, workers, settings)))
        return EXIT_OK
    _check_args(args)
    mode = _mode(args)
    workload = None
    if mode == "smoke":
        count, latency = SMOKE_COMPARISON["tasks"], SMOKE_COMPARISON["latency_ms"]
        workload = synthetic_workload(count, latency, seed=args.seed)
    elif mode not in ("suite", "scale-out", "durable", "concurrency", "rate-limit", "unused-cost"):
        workload = _workload(args)  # before anything prints: a bad task file is a usage error
    report = _report(args, argv, mode)
    # --smoke runs the peers where Huey happens to be installed, without a word where it is not.
    peers = _peers_wanted(args.peers) or (args.smoke and huey_available())
    report["peers"] = {"requested": args.peers, "huey_installed": huey_available(), "ran": peers}
    met = True
    runs: list[Run] = []
    if workload is not None and mode in ("compare", "smoke"):
        runs += _compare_mode(args, workload, settings, peers, report)
    if workload is not None and mode == "open-loop":
        runs += _open_loop_mode(args, workload, settings, report)
    if mode in ("suite", "smoke"):
        suite_runs, met = _suite_mode(args, settings, peers, report)
        runs += suite_runs
    if mode == "scale-out":
        runs += _scale_mode(args, settings, report)
    if mode == "durable":
        runs += _durable_mode(args, settings, report)
    if mode == "concurrency":
        runs += _concurrency_mode(args, argv, settings, report)
    if mode == "rate-limit":
        runs += _rate_limit_mode(args, report)
    if mode == "unused-cost":
        _unused_cost_mode(args, report)
    report["runs"] = [run.to_dict() for run in runs]
    write_report(args.report, report)
    print(f"report written to {args.report}")
    if args.plot is not None and workload is not None:
        plot(args.plot, runs, _header(workload, args.repeat))
        print(f"plot written to {args.plot}")
    return EXIT_OK if met else EXIT_TARGET_MISSED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit code.

    User errors (bad flags, a bad task file, an output folder that does not exist) print one line
    that starts with "error:" on stderr and return 2 before anything runs.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except (UsageError, tq.TaskFileError, tq.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: no report written", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
