"""Scale-out: worker processes drain a durable queue (``benchmark.py --db URL --processes LIST``).

`run_scale_out` fills a fresh database (a new PostgreSQL schema, or a new SQLite file in a
temporary folder beside the path given) with 10 ms tasks and times `P` ``task_queue_optimized.py
worker`` processes draining it; `run_store_noop` measures a store's per-task overhead with no-op
tasks through an in-process pool. The same fresh databases serve the rate-limit runs and our
worker's durable runs (`bench.peers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any, cast

import task_queue_optimized as tq
from bench.core import Progress, Run, Settings, UsageError, Workload, clean_env, rounded

__all__ = [
    "NOOP_TASKS",
    "NOOP_TASKS_PER_TASK",
    "SCALE_LATENCY_MS",
    "SCALE_MIN_TASKS",
    "SCALE_TASKS_PER_THREAD",
    "STATUS_POLL_INTERVAL",
    "WORKER_LEASE_SECONDS",
    "Database",
    "fresh_database",
    "noop_tasks",
    "parse_database",
    "run_noop_comparison",
    "run_scale_out",
    "run_scale_series",
    "run_store_noop",
    "scale_tasks",
]

SCALE_LATENCY_MS = 10.0  # the task of the scale-out runs (--latency-ms overrides it)
SCALE_MIN_TASKS = 2000  # tasks per process count: max(this, SCALE_TASKS_PER_THREAD x P x W)
SCALE_TASKS_PER_THREAD = 100
NOOP_TASKS = 20_000  # the no-op store comparison; --tasks N makes it N x NOOP_TASKS_PER_TASK
NOOP_TASKS_PER_TASK = 10
STATUS_POLL_INTERVAL = 0.05  # seconds between two queue_status() reads while workers run
WORKER_LEASE_SECONDS = 30.0  # the workers' --lease-seconds: no lease expires during a run
WORKER_STOP_TIMEOUT = 30.0  # seconds a worker gets to drain after SIGTERM before SIGKILL
WORKER_EXIT_ON_SIGTERM = 143  # a worker's exit code after a graceful SIGTERM


# --- Databases -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Database:
    """Where scale-out runs keep their queue: a PostgreSQL server, or a folder for SQLite files.

    Attributes:
        backend: "postgresql" or "sqlite".
        location: the PostgreSQL URL as given, or the folder that gets each run's SQLite file.
        label: the URL or path for tables and the report, without a password.
    """

    backend: str
    location: str
    label: str


def parse_database(text: str) -> Database:
    """Parse --db: ``postgresql://...`` (or ``postgres://``), ``sqlite:///PATH`` or a plain path.

    A SQLite path only names the folder (and so the disk) the runs use: each run gets a new file
    in a temporary folder there, and the file at the path itself is never opened.

    Raises:
        UsageError: an unknown scheme, an in-memory database (workers in other processes cannot
            share it), or a folder that does not exist.
    """
    if text.startswith(("postgresql://", "postgres://")):
        return Database("postgresql", text, tq._redact(text))  # noqa: SLF001  # the module's own redaction
    if text in ("memory://", ":memory:", "sqlite:///:memory:"):
        raise UsageError(f"--db {text}: an in-memory database lives in one process; "
                         "--processes needs a SQLite path or a postgresql:// URL")  # fmt: skip
    if text.startswith("sqlite://"):
        path = text.removeprefix("sqlite:///") if text.startswith("sqlite:///") else ""
        if not path:
            raise UsageError(f"--db {text}: write sqlite:///PATH")
    elif "://" in text:
        raise UsageError(f"--db {tq._redact(text)}: unknown scheme (use a SQLite path, "  # noqa: SLF001  # the module's own redaction
                         "sqlite:///PATH or postgresql://USER@HOST:PORT/DBNAME)")  # fmt: skip
    else:
        path = text
    if os.path.isdir(path):
        raise UsageError(f"--db {text}: is a directory (give a file path; its folder is used)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--db {text}: folder {folder} does not exist")
    return Database("sqlite", folder, path)


def _with_schema(url: str, schema: str) -> str:
    """Return a PostgreSQL URL whose ``?schema=`` is `schema` (other query parameters kept)."""
    parts = urllib.parse.urlsplit(url)
    query = [(name, value)
             for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
             if name != "schema"]  # fmt: skip
    query.append(("schema", schema))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@contextlib.contextmanager
def fresh_database(database: Database, durability: str) -> Iterator[tuple[str, tq.Store]]:
    """Yield the URL of an empty database of `database`'s kind and a store open on it.

    PostgreSQL: a new schema ``bench_<hex>`` on the server, dropped afterwards. SQLite: a new file
    in a temporary folder inside `database.location`, deleted afterwards.

    Raises:
        ConfigError: the database cannot be used (no server answers, psycopg is missing, ...).
    """
    if database.backend == "postgresql":
        url = _with_schema(database.location, f"bench_{secrets.token_hex(6)}")
        store = tq.PostgresStore(url, lease_seconds=WORKER_LEASE_SECONDS)  # creates the schema
        try:
            yield url, store
        finally:
            try:
                store.drop_schema()
            except Exception as exc:  # the server went away: say so, keep the measurement
                print(f"warning: could not drop schema {store.schema}: {exc}", file=sys.stderr)
            finally:
                store.close()
        return
    with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=database.location) as folder:
        path = os.path.join(folder, "queue.db")
        sqlite_store = tq.SqliteStore(
            path, lease_seconds=WORKER_LEASE_SECONDS, durability=durability
        )
        try:
            yield path, sqlite_store
        finally:
            sqlite_store.close()


# --- Worker processes ----------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _WorkerExit:
    """How one worker process ended: its exit code, its JSON snapshot, its last stderr line."""

    returncode: int | None
    snapshot: dict[str, Any] | None
    last_error_line: str


class _WorkerFleet:
    """`count` ``task_queue_optimized.py worker`` processes, their output kept in files.

    Files rather than pipes: a worker that logs a lot can never block on a full pipe.
    """

    def __init__(self, command: Sequence[str], count: int, folder: str) -> None:
        self._command = list(command)
        self._count = count
        self._folder = folder
        self._procs: list[subprocess.Popen[bytes]] = []
        self._env = clean_env()

    def _path(self, index: int, stream: str) -> str:
        return os.path.join(self._folder, f"worker-{index}.{stream}")

    def start(self) -> None:
        for index in range(self._count):
            with open(self._path(index, "out"), "wb") as out, \
                    open(self._path(index, "err"), "wb") as err:  # fmt: skip
                self._procs.append(subprocess.Popen(
                    self._command, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                    cwd=self._folder, env=self._env,
                ))  # fmt: skip

    def check(self) -> None:
        """Raise if a worker has exited while tasks remain.

        Raises:
            RuntimeError: a worker exited (a crash, a bad flag, a lost database).
        """
        for index, proc in enumerate(self._procs):
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"worker process {index + 1} of {self._count} exited early with code {code}: "
                    f"{self._last_error_line(index) or 'no message'}"
                )

    def stop(self) -> list[_WorkerExit]:
        """SIGTERM every worker (they drain and print their snapshot), SIGKILL the stragglers."""
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        exits = []
        for index, proc in enumerate(self._procs):
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            exits.append(_WorkerExit(proc.returncode, self._snapshot(index),
                                     self._last_error_line(index)))  # fmt: skip
        return exits

    def _snapshot(self, index: int) -> dict[str, Any] | None:
        try:
            with open(self._path(index, "out"), encoding="utf-8") as handle:
                return cast("dict[str, Any]", json.load(handle))  # a snapshot: an object
        except (OSError, ValueError):
            return None

    def _last_error_line(self, index: int) -> str:
        try:
            with open(self._path(index, "err"), encoding="utf-8", errors="replace") as handle:
                lines = [line.strip() for line in handle if line.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""


def _children_cpu_seconds() -> float | None:
    """Return the user + system CPU time of this process's reaped children (None on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- Runs ----------------------------------------------------------------------------------------


def scale_tasks(processes: int, workers: int, tasks: int | None) -> int:
    """Return how many tasks a scale-out run with `processes` x `workers` threads gets."""
    if tasks is not None:
        return tasks
    return max(SCALE_MIN_TASKS, SCALE_TASKS_PER_THREAD * processes * workers)


def run_scale_out(
    database: Database,
    processes: int,
    workers: int,
    tasks: int,
    settings: Settings,
    repeat: int = 0,
    *,
    latency_ms: float = SCALE_LATENCY_MS,
) -> Run:
    """Drain `tasks` durable tasks of `latency_ms` with `processes` worker processes.

    In a fresh database (see `fresh_database`) it enqueues the tasks, starts the processes
    (``task_queue_optimized.py worker --workers W --jitter-ms 0 --lease-seconds 30 --json``) and
    reads ``queue_status()`` every `STATUS_POLL_INTERVAL` until every task is done or failed:
    the elapsed time runs from starting the processes (their start-up included) to that read.
    Then each worker gets SIGTERM, drains, and prints its metrics snapshot (exit code 143).

    Raises:
        RuntimeError: a worker exited early, or the tasks did not finish in time.
        ConfigError: the database cannot be used.
    """
    work = Workload(
        f"{tasks:,} tasks of {latency_ms:g} ms",
        [tq.Task(f"scale-{index:07d}", {"latency_ms": latency_ms}) for index in range(tasks)],
        latency_ms,
    )
    threads = processes * workers
    ceiling = work.ceiling(threads)
    assert ceiling is not None  # the latency is > 0 (checked with the flags)
    label = f"{database.backend} x{processes} processes"
    progress = Progress(label, tasks, settings.progress)
    ready: float | None = None  # when every worker had registered in the queue's status
    finished_at_ready = 0
    polls = 0
    with contextlib.ExitStack() as stack:
        url, store = stack.enter_context(fresh_database(database, settings.durability))
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-workers-"))
        for start in range(0, tasks, 1000):
            store.enqueue_many(work.tasks[start : start + 1000])
        command = [
            sys.executable, os.path.abspath(tq.__file__), "worker", "--db", url,
            "--workers", str(workers), "--jitter-ms", "0",
            "--lease-seconds", f"{WORKER_LEASE_SECONDS:g}", "--durability", settings.durability,
            "--json",
        ]  # fmt: skip
        fleet = _WorkerFleet(command, processes, folder)
        cpu_before = _children_cpu_seconds()
        began = time.perf_counter()
        deadline = began + max(60.0, 20 * tasks / ceiling)
        try:
            fleet.start()
            next_poll = began
            while True:
                status = store.queue_status()
                now = time.perf_counter()
                polls += 1
                finished = status["tasks"]["done"] + status["tasks"]["failed"]
                if ready is None and len(status["workers"]) >= processes:
                    ready, finished_at_ready = now, finished
                progress.set(finished)
                # Stop only workers that have registered: one that has not yet set up its
                # signal handling would die of the SIGTERM instead of draining.
                if finished >= tasks and ready is not None:
                    break
                fleet.check()
                if now > deadline:
                    raise RuntimeError(
                        f"{label}: {finished:,} of {tasks:,} tasks finished after "
                        f"{now - began:.1f} s; giving up"
                    )
                next_poll += STATUS_POLL_INTERVAL
                tq._sleep_until(next_poll)  # noqa: SLF001  # the module's own pacing
        finally:
            progress.close()
            exits = fleet.stop()
    elapsed = now - began
    cpu_after = _children_cpu_seconds()
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    for index, ended in enumerate(exits):
        if ended.returncode != WORKER_EXIT_ON_SIGTERM or ended.snapshot is None:
            print(f"warning: {label}: worker process {index + 1} exited with code "
                  f"{ended.returncode} (expected {WORKER_EXIT_ON_SIGTERM})"
                  f"{'' if ended.snapshot else ' and printed no snapshot'}: "
                  f"{ended.last_error_line or 'no message'}", file=sys.stderr)  # fmt: skip
    snapshots = [ended.snapshot for ended in exits if ended.snapshot is not None]

    def total(name: str) -> int:
        return sum(int(snapshot.get(name, 0)) for snapshot in snapshots)

    metrics = {
        "submitted": tasks,
        "succeeded": status["tasks"]["done"],
        "failed": status["tasks"]["failed"],
        "duplicates": total("duplicates"),
        "handler_calls": total("handler_calls"),
        "retries": total("retries"),
        "workers": threads,
        "elapsed_seconds": round(elapsed, 6),
        "throughput_per_second": round(finished / elapsed, 3),
    }
    run = Run(f"processes-{database.backend}", threads, work.name, repeat, metrics, finished,
              ceiling)  # fmt: skip
    after = None
    if ready is not None and now > ready:
        after = (finished - finished_at_ready) / (now - ready) / ceiling
    command[command.index("--db") + 1] = tq._redact(url)  # noqa: SLF001  # the module's own redaction
    run.extra["scale_out"] = {
        "backend": database.backend,
        "database": database.label,
        "processes": processes,
        "workers_per_process": workers,
        "tasks": tasks,
        "latency_ms": latency_ms,
        "startup_seconds": rounded(None if ready is None else ready - began),
        "finished_at_startup": finished_at_ready if ready is not None else None,
        "efficiency_after_startup": rounded(after),
        "status_polls": polls,
        "poll_interval_seconds": STATUS_POLL_INTERVAL,
        "worker_cpu_seconds": rounded(cpu),
        "exit_codes": [ended.returncode for ended in exits],
        "command": command,
        "worker_snapshots": snapshots,
    }
    return run


def run_store_noop(
    database: Database, count: int, workers: int, settings: Settings, repeat: int = 0
) -> Run:
    """Run `count` no-op tasks through an in-process pool on a fresh database of `database`'s kind.

    ``WorkerPool(lambda task: None, workers=W, db_path=URL, durable=False)`` fed by
    `iter_results`: every task costs its claim and completion in the idempotency store and
    nothing else, so the throughput is the store's per-task overhead (with the pool's own).
    """
    system = f"pool-{database.backend}"
    executed = 0
    progress = Progress(f"{system} no-op x{workers}", count, settings.progress)
    tasks = (tq.Task(f"noop-{index:07d}") for index in range(count))
    with fresh_database(database, settings.durability) as (url, _store):
        pool = tq.WorkerPool(
            lambda task: None,
            workers=workers,
            queue_size=settings.queue_size,
            db_path=url,
            retry=settings.retry(),
            durability=settings.durability,
            durable=False,
        )
        interrupted = True
        try:
            for record in pool.iter_results(tasks):
                if record.attempts and record.status is tq.TaskStatus.SUCCEEDED:
                    executed += 1
                progress.update()
            interrupted = False
        finally:
            progress.close()
            pool.shutdown(wait=True, cancel_pending=interrupted)
    run = Run(system, workers, f"{count:,} no-op tasks (a handler returning None)", repeat,
              pool.metrics.snapshot(), executed, None)  # fmt: skip
    run.extra["store_noop"] = {
        "backend": database.backend,
        "database": database.label,
        "durable": False,
        "handler": "lambda task: None",
    }
    return run


def run_scale_series(
    database: Database,
    counts: Sequence[int],
    workers: int,
    tasks: int | None,
    settings: Settings,
    repeat: int,
    *,
    latency_ms: float = SCALE_LATENCY_MS,
) -> list[Run]:
    """Run `run_scale_out` at each process count in `counts`, `repeat` times.

    Each run's speedup is its throughput over that of the smallest count in the same repeat.

    Args:
        tasks: the tasks of every run; None gives each count `scale_tasks`' default.
    """
    runs: list[Run] = []
    for index in range(repeat):
        batch = []
        for count in counts:
            size = scale_tasks(count, workers, tasks)
            run = run_scale_out(database, count, workers, size, settings, index,
                                latency_ms=latency_ms)  # fmt: skip
            batch.append(run)
        base = min(batch, key=lambda run: run.extra["scale_out"]["processes"])
        for run in batch:
            if base.throughput:
                run.speedup = run.throughput / base.throughput
        runs += batch
    return runs


def noop_tasks(tasks: int | None) -> int:
    """Return the tasks of one no-op store run: `NOOP_TASKS`, or `NOOP_TASKS_PER_TASK` x `tasks`."""
    return NOOP_TASKS if tasks is None else NOOP_TASKS_PER_TASK * tasks


def run_noop_comparison(
    database: Database, count: int, workers: int, settings: Settings, repeat: int
) -> tuple[list[Run], list[float | None]]:
    """Run `run_store_noop` on PostgreSQL (when `database` is a server) and SQLite, `repeat` times.

    SQLite runs in `database`'s folder, or in the temporary folder when `database` is a server.

    Returns:
        The runs, and per repeat the PostgreSQL throughput over the SQLite one (no ratio
        without a server).
    """
    if database.backend == "sqlite":
        sqlite = database
    else:
        sqlite = Database("sqlite", tempfile.gettempdir(), "a temporary SQLite file")
    postgres = database if database.backend == "postgresql" else None
    runs: list[Run] = []
    ratios: list[float | None] = []
    for index in range(repeat):
        pg = None if postgres is None else run_store_noop(postgres, count, workers,
                                                          settings, index)  # fmt: skip
        lite = run_store_noop(sqlite, count, workers, settings, index)
        runs += [run for run in (pg, lite) if run is not None]
        if pg is not None:
            ratios.append(pg.throughput / lite.throughput if lite.throughput else None)
    return runs, ratios
