"""The peers: Huey in process, and the durable comparison with PGQueuer and Dramatiq.

`run_huey` runs a workload on Huey (MemoryHuey or SqliteHuey) with an in-process thread
consumer, beside the pool. `run_durable` runs the durable comparison of ``benchmark.py --db
postgresql://...``: our worker process, PGQueuer and Dramatiq each drain a queue filled before
their worker started, on their own servers; the worker processes import their code from
`bench.worker_side`, found through PYTHONPATH whatever the working folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import task_queue_optimized as tq
from bench import worker_side
from bench.core import PROGRESS_INTERVAL, Progress, Run, Settings, Workload, clean_env, rounded
from bench.scaleout import WORKER_LEASE_SECONDS, Database, fresh_database

__all__ = [
    "DEFAULT_RABBITMQ_URL",
    "PEER_POLL_INTERVAL",
    "PEER_SLEEP_CONCURRENCY",
    "PEER_SLEEP_TASKS",
    "PEER_WORKERS",
    "DurableResults",
    "huey_available",
    "machine_cpu_seconds",
    "peer_problem",
    "run_dramatiq",
    "run_durable",
    "run_huey",
    "run_ours_durable",
    "run_pgqueuer",
]


# --- Huey ----------------------------------------------------------------------------------------

# Huey's consumer polls a non-blocking queue, sleeping initial_delay, growing by backoff up to
# max_delay while the queue stays empty (its -d / -b / -m options). Its defaults (0.1 s, 1.15,
# 10 s) are tuned for a long-lived service; these keep an idle worker at most 10 ms from a task.
HUEY_CONSUMER_OPTIONS = {
    "initial_delay": 0.001,
    "backoff": 1.15,
    "max_delay": 0.01,
    "periodic": False,
    "check_worker_health": False,
}


def huey_available() -> bool:
    """Return whether Huey can be imported (it is an optional extra, requirements-bench.txt)."""
    try:
        return importlib.util.find_spec("huey") is not None
    except (ImportError, ValueError):  # a broken install, or huey blocked in sys.modules
        return False


def run_huey(
    storage: str, workload: Workload, workers: int, settings: Settings, repeat: int = 0
) -> Run:
    """Run the workload on Huey (MemoryHuey or SqliteHuey) with an in-process thread consumer.

    Completions are observed through Huey's signals (``complete`` is emitted after the result is
    stored), so no result is polled. Huey retries any exception, with ``retries =
    max_attempts - 1`` and ``retry_delay=0``: a non-zero delay goes through Huey's scheduler, which
    wakes at most once a second. SqliteHuey gets ``fsync=True`` for ``durability="full"``, else
    ``fsync=False`` (``synchronous=OFF``; the pool's default is ``NORMAL``).

    Args:
        storage: "memory" or "sqlite".
    """
    import huey
    from huey import signals as huey_signals

    metrics = tq.MetricsCollector(workers=workers)
    handler = workload.processor()
    system = f"huey-{storage}"
    with tempfile.TemporaryDirectory(prefix="bench-huey-") as folder:
        if storage == "memory":
            queue = huey.MemoryHuey("bench", utc=True)
        else:
            queue = huey.SqliteHuey(
                "bench",
                filename=os.path.join(folder, "huey.db"),
                fsync=settings.durability == "full",
                utc=True,
            )

        def bench_task(task_id: str, payload: dict[str, Any], key: str | None) -> Any:
            began = time.perf_counter()
            try:
                return handler(tq.Task(task_id, payload, key))
            finally:
                metrics.record_attempt(time.perf_counter() - began)

        task_wrapper = queue.task(retries=settings.max_attempts - 1, retry_delay=0)(bench_task)
        tracker = _HueyTracker(metrics, len(workload.tasks))
        queue.signal(huey_signals.SIGNAL_EXECUTING)(tracker.on_executing)
        queue.signal(huey_signals.SIGNAL_COMPLETE)(tracker.on_complete)
        queue.signal(huey_signals.SIGNAL_ERROR)(tracker.on_error)
        queue.signal(huey_signals.SIGNAL_RETRYING)(tracker.on_retrying)
        progress = Progress(f"{system} x{workers}", len(workload.tasks), settings.progress)
        consumer = queue.create_consumer(
            workers=workers, worker_type="thread", **HUEY_CONSUMER_OPTIONS
        )
        with _quiet_huey():
            with _kept_signal_handlers():
                consumer.start()
            try:
                for task in workload.tasks:
                    message = task_wrapper.s(task.id, task.payload, task.idempotency_key)
                    tracker.enqueued(message.id)
                    queue.enqueue(message)
                while not tracker.done.wait(PROGRESS_INTERVAL):
                    progress.set(tracker.finished)
            finally:
                progress.close()
                consumer.stop(graceful=True)
                if storage == "sqlite":
                    queue.storage.close()
    run = Run(system, workers, workload.name, repeat, metrics.snapshot(), tracker.finished,
              workload.ceiling(workers))  # fmt: skip
    run.extra["peer_settings"] = {
        "consumer": {"workers": workers, "worker_type": "thread", **HUEY_CONSUMER_OPTIONS},
        "retries": settings.max_attempts - 1,
        "retry_delay": 0,
        "fsync": settings.durability == "full" if storage == "sqlite" else None,
        "deduplication": "none (Huey has no idempotency keys)",
    }
    return run


class _HueyTracker:
    """Turns Huey's signals (sent from its worker threads) into `MetricsCollector` calls."""

    def __init__(self, metrics: tq.MetricsCollector, total: int) -> None:
        self._metrics = metrics
        self._total = total
        self._lock = threading.Lock()  # guards _times and finished
        self._times: dict[str, list[float | None]] = {}  # huey id -> [enqueued, started]
        self.finished = 0
        self.done = threading.Event()
        if total == 0:
            self.done.set()

    def enqueued(self, task_id: str) -> None:
        with self._lock:
            self._times[task_id] = [time.perf_counter(), None]
        self._metrics.record_enqueue()

    def on_executing(self, signal_name: str, task: Any) -> None:
        now = time.perf_counter()
        with self._lock:
            times = self._times[task.id]
            first = times[1] is None
            if first:
                times[1] = now
        if first:
            self._metrics.record_start(now - times[0])  # type: ignore[operator]  # set at enqueue

    def on_retrying(self, signal_name: str, task: Any) -> None:
        self._metrics.record_retry()

    def on_complete(self, signal_name: str, task: Any) -> None:
        enqueued, started = self._finish(task.id)
        now = time.perf_counter()
        self._metrics.record_success(now - enqueued, now - (started or enqueued))

    def on_error(self, signal_name: str, task: Any, exc: BaseException | None = None) -> None:
        if task.retries:
            return  # Huey retries it: "retrying" follows
        enqueued, started = self._finish(task.id)
        now = time.perf_counter()
        kind = "transient" if isinstance(exc, tq.TransientError) else "permanent"
        self._metrics.record_failure(kind, now - enqueued, now - (started or enqueued))

    def _finish(self, task_id: str) -> tuple[float, float | None]:
        with self._lock:
            enqueued, started = self._times.pop(task_id)
            self.finished += 1
            if self.finished >= self._total:
                self.done.set()
        assert enqueued is not None
        return enqueued, started


@contextlib.contextmanager
def _quiet_huey() -> Iterator[None]:
    """Silence Huey's logger: it logs a traceback for every injected fault."""
    logger = logging.getLogger("huey")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _kept_signal_handlers() -> Iterator[None]:
    """Restore the signal handlers that Huey's `Consumer.start` replaces.

    Its handlers only set a flag for `Consumer.run`, which an in-process consumer does not use:
    left in place, they would swallow Ctrl-C.
    """
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    signums = [getattr(signal, name) for name in names if hasattr(signal, name)]
    in_main = threading.current_thread() is threading.main_thread()
    saved = {signum: signal.getsignal(signum) for signum in signums} if in_main else {}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


# --- Durable peers -------------------------------------------------------------------------------

# The durable comparison (--db postgresql://... without --processes): each contender drains a
# queue that the producer filled before its worker process started, on its own local server, with
# persistence on and an ack after the handler ran.
#   ours: ``task_queue_optimized.py worker --handler bench.worker_side:noop|sleep_10ms --workers
#     N`` on a PostgresStore in a new schema (dropped after); tasks enqueued with ``enqueue_many``;
#     a task counts as done once its row in the tasks table is done (or failed).
#   pgqueuer: ``pgqueuer.run`` (what ``pgq run`` calls, on uvloop) with one asyncpg connection,
#     ``max_concurrent_tasks=N`` and ``batch_size=N/2`` (it requires max >= 2 x batch), tables
#     installed with durability "durable" (all logged) in a new database (dropped after); a job
#     counts as done once PGQueuer has deleted it from its queue table (its completion log flushes
#     in batches); jobs enqueued in batches of 1000 with ``Queries.enqueue``.
#   dramatiq: ``dramatiq bench.worker_side:dramatiq_broker --processes 1 --threads N`` on
#     RabbitMQ, durable queue, persistent messages (delivery_mode=2), publisher confirms on the
#     producer, ack after the actor returned, default middleware and prefetch (2 x threads); a
#     task counts once its ack is sent.
# The 10 ms task is ``time.sleep(0.01)`` for ours and Dramatiq (thread workers) and
# ``await asyncio.sleep(0.01)`` for PGQueuer, which takes async entrypoints only.
PEER_NOOP_TASKS = 5000
PEER_SLEEP_TASKS = 2000  # per process: two processes drain twice as many
PEER_WORKERS = 8  # the no-op runs' concurrency
PEER_SLEEP_CONCURRENCY = 16  # the 10 ms runs' concurrency
PEER_SLEEP_MS = 10.0
PEER_POLL_INTERVAL = 0.02  # seconds between two reads of a contender's done count
PEER_MIN_TIMEOUT = 120.0  # seconds a drain may last before the run gives up
PEER_STOP_TIMEOUT = 30.0
PEER_ATTEMPTS = 3  # a run that fails (a server restarted under it) is run again, at most this often
PEER_RETRY_PAUSE = 5.0  # seconds before running it again
OUTAGE_LINE = "database connection lost"  # what our worker logs when the server drops it
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
OURS_READY = "serving"  # the worker's stderr line once it serves
DRAMATIQ_READY = "is ready for action"
# The worker processes import their code as WORKER_SIDE ("bench.worker_side"), from ROOT (the
# folder that holds the bench package) on their PYTHONPATH, whatever the working folder.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_SIDE = worker_side.__name__
PEER_REQUIREMENTS = {
    "pgqueuer": ("pgqueuer", "asyncpg", "psycopg"),
    "dramatiq": ("dramatiq", "pika"),
}


def machine_cpu_seconds() -> float | None:
    """Return the CPU seconds all cores have spent busy since boot (None without /proc/stat).

    user + nice + system + irq + softirq of the ``cpu`` line: every process counts, the database
    server and the broker included.
    """
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = sum(int(fields[index]) for index in (1, 2, 3, 6, 7))
    return ticks / os.sysconf("SC_CLK_TCK")


def _server_problem(url: str, default_port: int) -> str | None:
    """Return why no server answers at `url`'s host and port within 3 s (None when one does)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=3):
            return None
    except OSError as exc:
        return f"no server answers at {host}:{port} ({exc.strerror or exc})"


def peer_problem(peer: str, pg_url: str, rabbitmq_url: str) -> str | None:
    """Return why `peer` ("pgqueuer" or "dramatiq") cannot run here, or None when it can."""
    missing = [name for name in PEER_REQUIREMENTS[peer] if importlib.util.find_spec(name) is None]
    if missing:
        return (f"{', '.join(missing)} not installed "
                "(pip install -r requirements-bench.txt)")  # fmt: skip
    if peer == "pgqueuer":
        return _server_problem(pg_url, 5432)
    return _server_problem(rabbitmq_url, 5672)


class _DrainProcesses:
    """Worker processes whose stderr a thread copies to a file, noting each one's ready line."""

    def __init__(
        self, commands: Sequence[Sequence[str]], env: dict[str, str], folder: str, marker: str
    ) -> None:
        self._commands = [list(command) for command in commands]
        self._env = env
        self._folder = folder
        self._marker = marker
        self._procs: list[subprocess.Popen[bytes]] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards _ready_count
        self._ready_count = 0
        self.ready = threading.Event()  # set once every process printed its ready line

    def start(self) -> None:
        for index, command in enumerate(self._commands):
            with open(os.path.join(self._folder, f"proc-{index}.out"), "wb") as out:
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE,
                                        stdin=subprocess.DEVNULL, cwd=self._folder,
                                        env=self._env, start_new_session=True)  # fmt: skip
            self._procs.append(proc)
            thread = threading.Thread(target=self._copy, args=(index, proc), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _copy(self, index: int, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        seen = False
        with open(os.path.join(self._folder, f"proc-{index}.err"), "wb") as err:
            for line in proc.stderr:
                err.write(line)
                if not seen and self._marker.encode() in line:
                    seen = True
                    with self._lock:
                        self._ready_count += 1
                        if self._ready_count == len(self._commands):
                            self.ready.set()

    def check(self, label: str) -> None:
        """Raise if a process has exited while tasks remain.

        Raises:
            RuntimeError: naming the process and its last stderr line.
        """
        for index, proc in enumerate(self._procs):
            if proc.poll() is not None:
                last = self.last_line(index) or "no message"
                raise RuntimeError(f"{label}: worker process {index + 1} exited early with code "
                                   f"{proc.returncode}: {last}")  # fmt: skip

    def last_line(self, index: int) -> str:
        try:
            with open(os.path.join(self._folder, f"proc-{index}.err"), "rb") as handle:
                lines = [
                    line.strip() for line in handle.read().decode(errors="replace").splitlines()
                ]
        except OSError:
            return ""
        lines = [line for line in lines if line]
        return lines[-1] if lines else ""

    def stderr_has(self, text: str) -> bool:
        """Return whether any process wrote `text` on stderr."""
        for index in range(len(self._procs)):
            path = os.path.join(self._folder, f"proc-{index}.err")
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                if text.encode() in handle.read():
                    return True
        return False

    def stdout(self, index: int) -> str:
        with open(os.path.join(self._folder, f"proc-{index}.out"), "rb") as handle:
            return handle.read().decode(errors="replace")

    def stop(self) -> list[int | None]:
        """SIGTERM every process (each drains), SIGKILL its group after `PEER_STOP_TIMEOUT`."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + PEER_STOP_TIMEOUT
        for proc in self._procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for thread in self._threads:
            thread.join(5.0)
        return [proc.returncode for proc in self._procs]


def _measure_drain(
    procs: _DrainProcesses, done: Callable[[], int], total: int, label: str, ceiling: float | None
) -> dict[str, Any]:
    """Start `procs`, wait for their ready lines, then read `done()` until it reaches `total`.

    The window runs from the first read after every process said it was ready (its count is
    subtracted) to the first read that shows every task done; the machine's CPU is read at both
    ends.

    Raises:
        RuntimeError: a process exited early, or the tasks did not finish in time.
    """
    limit = max(PEER_MIN_TIMEOUT, 20 * total / ceiling if ceiling else PEER_MIN_TIMEOUT)
    began = time.perf_counter()
    procs.start()
    while not procs.ready.wait(PEER_POLL_INTERVAL):
        procs.check(label)
        if time.perf_counter() - began > limit:
            raise RuntimeError(f"{label}: the workers never said they were ready")
    started = time.perf_counter()
    cpu_start = machine_cpu_seconds()
    done_at_start = done()
    polls = 1
    next_poll = started
    while True:
        next_poll += PEER_POLL_INTERVAL
        tq._sleep_until(next_poll)  # noqa: SLF001  # the module's own pacing
        finished = done()
        now = time.perf_counter()
        polls += 1
        if finished >= total:
            break
        procs.check(label)
        if now - started > limit:
            raise RuntimeError(f"{label}: {finished:,} of {total:,} tasks done after "
                               f"{now - started:.1f} s; giving up")  # fmt: skip
    cpu_end = machine_cpu_seconds()
    window_tasks = finished - done_at_start
    elapsed = now - started
    cpu = None if cpu_start is None or cpu_end is None else cpu_end - cpu_start
    return {
        "startup_seconds": round(started - began, 4),
        "done_at_start": done_at_start,
        "window_tasks": window_tasks,
        "elapsed_seconds": round(elapsed, 6),
        "throughput_per_second": round(window_tasks / elapsed, 3) if elapsed > 0 else 0.0,
        "machine_cpu_seconds": rounded(cpu),
        "cpu_ms_per_task": rounded(cpu / window_tasks * 1000 if cpu and window_tasks else None),
        "polls": polls,
    }


def _durable_run(
    system: str,
    workload: str,
    concurrency: int,
    tasks: int,
    latency_ms: float,
    window: dict[str, Any],
    repeat: int,
    settings: dict[str, Any],
) -> Run:
    ceiling = concurrency / (latency_ms / 1000.0) if latency_ms > 0 else None
    metrics = {
        "submitted": tasks,
        "succeeded": window["done_at_start"] + window["window_tasks"],
        "workers": concurrency,
        "elapsed_seconds": window["elapsed_seconds"],
        "throughput_per_second": window["throughput_per_second"],
    }
    run = Run(system, concurrency, workload, repeat, metrics, window["window_tasks"], ceiling)
    run.extra["durable"] = {**window, "tasks": tasks, "latency_ms": latency_ms,
                            "settings": settings}  # fmt: skip
    return run


def _child_env(**extra: str) -> dict[str, str]:
    """The environment of a worker process: no TQ_* variables, `ROOT` on PYTHONPATH."""
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_ours_durable(
    pg_url: str,
    handler: str,
    workers: int,
    tasks: int,
    latency_ms: float,
    repeat: int = 0,
    *,
    processes: int = 1,
) -> Run:
    """Drain `tasks` with `processes` ``task_queue_optimized.py worker`` processes on PostgreSQL.

    Args:
        handler: "noop" or "sleep_10ms", the function of `bench.worker_side` they import.
    """
    label = f"ours {handler} x{processes}"
    database = Database("postgresql", pg_url, tq._redact(pg_url))  # noqa: SLF001  # the module's own redaction
    with contextlib.ExitStack() as stack:
        url, store = stack.enter_context(fresh_database(database, tq.DEFAULT_DURABILITY))
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-ours-"))
        work = [tq.Task(f"durable-{index:07d}") for index in range(tasks)]
        for start in range(0, tasks, 1000):
            store.enqueue_many(work[start : start + 1000])
        command = [sys.executable, os.path.abspath(tq.__file__), "worker", "--db", url,
                   "--handler", f"{WORKER_SIDE}:{handler}", "--workers", str(workers),
                   "--lease-seconds", f"{WORKER_LEASE_SECONDS:g}", "--json"]  # fmt: skip
        # The probe is a count on the tasks table, as PGQueuer's is on its queue table: a full
        # queue_status() every 20 ms would cost the server more than the workers' own statements.
        import psycopg

        assert isinstance(store, tq.PostgresStore)
        probe = stack.enter_context(psycopg.connect(pg_url, autocommit=True))
        count_sql = f"SELECT count(*) FROM {store.schema}.tasks WHERE state IN ('done', 'failed')"
        procs = _DrainProcesses([command] * processes, _child_env(), folder, OURS_READY)

        def done() -> int:
            row = probe.execute(count_sql).fetchone()
            return int(row[0]) if row else 0

        try:
            window = _measure_drain(procs, done, tasks, label, workers * processes / 0.01)
        finally:
            codes = procs.stop()
        if procs.stderr_has(OUTAGE_LINE):
            raise RuntimeError(f"{label}: the database dropped the workers' connections")
        calls = 0
        for index in range(processes):
            with contextlib.suppress(ValueError):
                calls += int(json.loads(procs.stdout(index)).get("handler_calls", 0))
    command[command.index("--db") + 1] = tq._redact(url)  # noqa: SLF001  # the module's own redaction
    settings = {"processes": processes, "workers_per_process": workers, "store": "PostgresStore",
                "command": command, "exit_codes": codes, "handler_calls": calls,
                "completion": "count(*) of the tasks table's done and failed rows"}  # fmt: skip
    system = "ours-postgresql" if processes == 1 else f"ours-postgresql-x{processes}"
    return _durable_run(system, f"{tasks:,} {handler}", workers * processes, tasks, latency_ms,
                        window, repeat, settings)  # fmt: skip


def run_pgqueuer(
    pg_url: str, entrypoint: str, concurrency: int, tasks: int, latency_ms: float, repeat: int = 0
) -> Run:
    """Drain `tasks` PGQueuer jobs with one PGQueuer worker process (see the settings above)."""
    import psycopg

    label = f"pgqueuer {entrypoint}"
    name = f"bench_pgq_{secrets.token_hex(6)}"
    base = urllib.parse.urlsplit(pg_url)
    dsn = urllib.parse.urlunsplit(base._replace(path=f"/{name}", query=""))
    admin = urllib.parse.urlunsplit(base._replace(query=""))
    batch = max(concurrency // 2, 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        asyncio.run(worker_side.pgqueuer_install_and_enqueue(dsn, entrypoint, tasks))
        with tempfile.TemporaryDirectory(prefix="bench-pgq-") as folder, \
                psycopg.connect(dsn, autocommit=True) as conn:  # fmt: skip
            command = [sys.executable, "-m", WORKER_SIDE, "pgqueuer-worker", str(batch),
                       str(concurrency)]  # fmt: skip
            procs = _DrainProcesses([command], _child_env(BENCH_PGQ_DSN=dsn), folder,
                                    worker_side.READY_LINE)  # fmt: skip

            def done() -> int:
                left = conn.execute("SELECT count(*) FROM pgqueuer").fetchone()
                return tasks - int(left[0] if left else 0)

            try:
                window = _measure_drain(procs, done, tasks, label, concurrency / 0.01)
            finally:
                codes = procs.stop()
    finally:
        try:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        except Exception as exc:  # the server went away: say so, keep the error that matters
            print(f"warning: could not drop database {name}: {exc}", file=sys.stderr)
    settings = {"worker": "pgqueuer.run (uvloop), one asyncpg connection",
                "max_concurrent_tasks": concurrency, "batch_size": batch,
                "durability": "durable (all tables logged)", "database": f"{name} (dropped)",
                "exit_codes": codes,
                "completion": "the job's row deleted from the queue table"}  # fmt: skip
    return _durable_run("pgqueuer", f"{tasks:,} {entrypoint}", concurrency, tasks, latency_ms,
                        window, repeat, settings)  # fmt: skip


def run_dramatiq(
    rabbitmq_url: str, actor: str, threads: int, tasks: int, latency_ms: float, repeat: int = 0
) -> Run:
    """Drain `tasks` Dramatiq messages with one Dramatiq worker (see the settings above)."""
    import pika

    label = f"dramatiq {actor}"
    queue = f"bench_{secrets.token_hex(6)}"
    try:
        broker, actors = worker_side.dramatiq_setup(rabbitmq_url, queue)
        try:
            for index in range(tasks):
                actors[actor].send(index)
        finally:
            broker.close()
        with tempfile.TemporaryDirectory(prefix="bench-dramatiq-") as folder:
            counter_path = os.path.join(folder, "acks")
            counter = worker_side.AckCounter(counter_path, create=True)
            command = [sys.executable, "-m", "dramatiq", f"{WORKER_SIDE}:dramatiq_broker",
                       "--processes", "1", "--threads", str(threads)]  # fmt: skip
            env = _child_env(BENCH_RABBITMQ_URL=rabbitmq_url, BENCH_DRAMATIQ_QUEUE=queue,
                             BENCH_ACK_FILE=counter_path)  # fmt: skip
            procs = _DrainProcesses([command], env, folder, DRAMATIQ_READY)
            try:
                window = _measure_drain(procs, counter.read, tasks, label, threads / 0.01)
            finally:
                codes = procs.stop()
                counter.close()
    finally:
        with contextlib.suppress(Exception):
            connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
            channel = connection.channel()
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(name)
            connection.close()
    settings = {"worker": f"dramatiq --processes 1 --threads {threads}",
                "broker": "RabbitmqBroker(confirm_delivery=True): durable queue, persistent "
                "messages, ack after the actor returned", "prefetch": 2 * threads,
                "exit_codes": codes, "completion": "Dramatiq's after_ack hook"}  # fmt: skip
    return _durable_run("dramatiq-rabbitmq", f"{tasks:,} {actor}", threads, tasks, latency_ms,
                        window, repeat, settings)  # fmt: skip


@dataclasses.dataclass(slots=True)
class DurableResults:
    """The durable runs of every repeat, and why a peer did not run."""

    runs: list[Run] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def of(self, system: str, workload: str) -> list[Run]:
        return [
            run
            for run in self.runs
            if run.system == system and run.extra["durable"]["handler"] == workload
        ]


def run_durable(
    pg_url: str,
    rabbitmq_url: str,
    peers: bool,
    repeat: int,
    *,
    noop_tasks: int = PEER_NOOP_TASKS,
    sleep_tasks: int = PEER_SLEEP_TASKS,
    progress: bool = False,
) -> DurableResults:
    """Run ours (1 and 2 processes) and, with `peers`, PGQueuer and Dramatiq, `repeat` times.

    No-op: `PEER_WORKERS` concurrent tasks; 10 ms: `PEER_SLEEP_CONCURRENCY`. A peer that is
    not installed or whose server does not answer is skipped with one line on stderr.
    """
    results = DurableResults()
    available = []
    for peer in ("pgqueuer", "dramatiq") if peers else ():
        problem = peer_problem(peer, pg_url, rabbitmq_url)
        if problem is None:
            available.append(peer)
        else:
            results.skipped[peer] = problem
            print(f"peers: skipping {peer}: {problem}", file=sys.stderr)
    sleep = PEER_SLEEP_MS
    conc = PEER_SLEEP_CONCURRENCY
    plan: list[tuple[str, str, Callable[[int], Run]]] = [
        ("noop", "ours", lambda i: run_ours_durable(pg_url, "noop", PEER_WORKERS, noop_tasks,
                                                    0.0, i)),
        ("noop", "pgqueuer", lambda i: run_pgqueuer(pg_url, "noop", PEER_WORKERS, noop_tasks,
                                                    0.0, i)),
        ("noop", "dramatiq", lambda i: run_dramatiq(rabbitmq_url, "noop", PEER_WORKERS,
                                                    noop_tasks, 0.0, i)),
        ("sleep_10ms", "ours", lambda i: run_ours_durable(pg_url, "sleep_10ms", conc,
                                                          sleep_tasks, sleep, i)),
        ("sleep_10ms", "ours", lambda i: run_ours_durable(pg_url, "sleep_10ms", conc,
                                                          2 * sleep_tasks, sleep, i,
                                                          processes=2)),
        ("sleep_10ms", "pgqueuer", lambda i: run_pgqueuer(pg_url, "sleep_10ms", conc,
                                                          sleep_tasks, sleep, i)),
        ("sleep_10ms", "dramatiq", lambda i: run_dramatiq(rabbitmq_url, "sleep_10ms", conc,
                                                          sleep_tasks, sleep, i)),
    ]  # fmt: skip
    for index in range(repeat):
        for handler, who, run_one in plan:
            if who != "ours" and who not in available:
                continue
            run = _run_again_on_failure(run_one, index, f"{who} {handler}")
            run.extra["durable"]["handler"] = handler
            results.runs.append(run)
        if progress:
            print(f"durable runs: repeat {index + 1} of {repeat} done", file=sys.stderr)
    return results


def _run_again_on_failure(run_one: Callable[[int], Run], index: int, label: str) -> Run:
    """Return `run_one(index)`, run again up to `PEER_ATTEMPTS` times when it fails.

    A shared machine's database server may be restarted under a run: the failed attempt is
    reported on stderr and in the run (``failed_attempts``), never folded into its numbers.
    """
    failures: list[str] = []
    while True:
        try:
            run = run_one(index)
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {_first_line(exc)}")
            if len(failures) >= PEER_ATTEMPTS:
                raise
            print(f"warning: {label}: {failures[-1]}; running it again in "
                  f"{PEER_RETRY_PAUSE:g} s", file=sys.stderr)  # fmt: skip
            time.sleep(PEER_RETRY_PAUSE)
            continue
        run.extra["durable"]["failed_attempts"] = failures
        return run


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
