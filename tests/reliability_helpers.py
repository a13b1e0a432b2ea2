"""Kill loops and child processes shared by the reliability tests and tests/stress_kill.py.

Everything here drives real processes over real SQLite files: the command line killed with
SIGKILL at random moments, and a child that runs `WorkerPool` with a handler that logs every call
to an append-only file, so that a parent can count the handler calls that ran twice.

Run as a script, this module is that child::

    python tests/reliability_helpers.py worker DB TASKS SEED LEASE DURABILITY TAG CALLS RESULTS
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support import SCRIPT, child_env

HELPERS = Path(__file__).resolve()

# Seconds a finished run, or a process that was just killed, may take before the loop gives up.
RUN_TIMEOUT = 60.0


# --- Tasks and databases -------------------------------------------------------------------------


def task_objects(count: int, seed: int) -> list[dict[str, Any]]:
    """Return ``count`` task objects of 2-5 ms each and no bytes, the same for the same seed."""
    rng = random.Random(seed)
    return [
        {"id": f"t-{index:05d}", "payload": {"latency_ms": rng.randint(2, 5), "size_bytes": 0}}
        for index in range(count)
    ]


def write_task_file(path: Path, count: int, seed: int) -> Path:
    """Write a task file of ``task_objects(count, seed)`` and return its path."""
    path.write_text(json.dumps(task_objects(count, seed)), encoding="utf-8")
    return path


@dataclasses.dataclass
class DbReport:
    """What a progress database holds after a run."""

    states: dict[str, int]
    outputs: dict[str, Any]
    integrity: str

    @property
    def rows(self) -> int:
        """Return the number of keys stored."""
        return sum(self.states.values())


def inspect_db(db: Path, table: str = "idempotency") -> DbReport:
    """Open ``db`` as a rerun would (recovering its WAL) and report states, outputs, integrity."""
    conn = sqlite3.connect(db, timeout=30.0)
    try:
        integrity = "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        rows = conn.execute(f"SELECT key, state, output FROM {table}").fetchall()
    finally:
        conn.close()
    states = Counter(state for _, state, _ in rows)
    outputs = {key: json.loads(output) for key, state, output in rows if state == "completed"}
    return DbReport(dict(states), outputs, integrity)


def completed_keys(db: Path) -> set[str]:
    """Return the keys completed in ``db`` (empty when the file or its table does not exist)."""
    if not db.exists():
        return set()
    conn = sqlite3.connect(db, timeout=30.0)
    try:
        rows = conn.execute("SELECT key FROM idempotency WHERE state = 'completed'").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return set()
        raise
    finally:
        conn.close()
    return {key for (key,) in rows}


# --- The command line under kill -9 --------------------------------------------------------------


@dataclasses.dataclass
class LoopFigures:
    """The outcome of a kill loop, as tests/stress_kill.py prints it."""

    mode: str
    durability: str
    tasks: int
    kills: int = 0  # runs that SIGKILL ended
    mid_work_kills: int = 0  # kills that left some key not completed
    finished_runs: int = 0  # runs that ended by themselves before their kill moment
    completed: int = 0
    lost: int = 0
    in_progress: int = 0
    integrity: str = ""
    handler_calls: int | None = None  # None where calls cannot be observed (the CLI)
    double_executions: int | None = None
    problems: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        """Return the figures on one line."""
        calls = "n/a" if self.handler_calls is None else str(self.handler_calls)
        doubles = "n/a" if self.double_executions is None else str(self.double_executions)
        return (
            f"{self.mode:<4} durability={self.durability:<6} kills={self.kills} "
            f"mid-work={self.mid_work_kills} runs-finished-early={self.finished_runs} "
            f"tasks={self.tasks} "
            f"completed={self.completed} lost={self.lost} in_progress={self.in_progress} "
            f"handler_calls={calls} double_executions={doubles} integrity={self.integrity} "
            f"problems={len(self.problems)}"
        )


def count_completed(db: Path) -> int:
    """Return how many keys ``db`` holds completed; 0 while the file or its table is missing."""
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(db, timeout=30.0)
        try:
            return conn.execute(
                "SELECT count(*) FROM idempotency WHERE state = 'completed'"
            ).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise


def kill_at_random_moment(
    proc: subprocess.Popen,
    rng: random.Random,
    progressed: Callable[[], bool],
    startup_window: float = 0.15,
    work_window: tuple[float, float] = (0.0, 0.05),
) -> bool:
    """SIGKILL ``proc`` at a random moment; return whether it was killed (False: it had exited).

    One kill in three lands anywhere in the first ``startup_window`` seconds (importing, opening
    and creating the database). The others wait until ``progressed()`` says the run completed
    something, then kill after a delay drawn from ``work_window``, so that they land while the
    run is working rather than after everything is done.
    """
    began = time.monotonic()
    if rng.random() < 1 / 3:
        moment = began + rng.uniform(0.0, startup_window)
    else:
        deadline = began + RUN_TIMEOUT
        while proc.poll() is None and not progressed() and time.monotonic() < deadline:
            time.sleep(0.005)
        moment = time.monotonic() + rng.uniform(*work_window)
    try:
        proc.wait(timeout=max(moment - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=RUN_TIMEOUT)
        return proc.returncode == -signal.SIGKILL
    return False


def cli_kill_loop(
    workdir: Path,
    *,
    tasks: int = 1000,
    kills: int = 10,
    durability: str = "normal",
    seed: int = 0,
    lease: float = 1.0,
    workers: int = 8,
    work_window: tuple[float, float] = (0.0, 0.05),
) -> LoopFigures:
    """Run the command line on one task file, SIGKILL it ``kills`` times, then let it finish.

    Every run resumes the same database. A run that ends before its kill moment must report
    exactly the keys completed before it as duplicates and every other key as succeeded.
    """
    rng = random.Random(seed)
    task_file = write_task_file(workdir / "tasks.json", tasks, seed)
    db = workdir / "progress.db"
    figures = LoopFigures("cli", durability, tasks)
    args = [
        sys.executable, str(SCRIPT), "--task-file", str(task_file), "--db", str(db),
        "--workers", str(workers), "--lease-seconds", str(lease), "--jitter-ms", "0",
        "--durability", durability, "--metrics-out", str(workdir / "metrics.json"), "--json",
    ]  # fmt: skip
    for run in range(kills + 1):
        before = completed_keys(db)
        done_before = len(before)
        last = run == kills
        out_path, err_path = workdir / f"cli-{run}.out", workdir / f"cli-{run}.err"
        with out_path.open("w") as out, err_path.open("w") as err:
            proc = subprocess.Popen(args, cwd=workdir, env=child_env(), stdout=out, stderr=err)
            try:
                if last:
                    proc.wait(timeout=RUN_TIMEOUT)
                    killed = False
                else:
                    killed = kill_at_random_moment(
                        proc,
                        rng,
                        lambda done=done_before: count_completed(db) > done,
                        work_window=work_window,
                    )
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        stderr = err_path.read_text(encoding="utf-8", errors="replace")
        if "Traceback" in stderr or "database is locked" in stderr:
            figures.problems.append(f"run {run}: stderr: {stderr.strip()[-500:]}")
        if killed:
            figures.kills += 1
            figures.mid_work_kills += len(completed_keys(db)) < tasks
            continue
        if not last:
            figures.finished_runs += 1
        if proc.returncode != 0:
            figures.problems.append(f"run {run}: exit {proc.returncode}: {stderr.strip()[-500:]}")
            continue
        snapshot = json.loads(out_path.read_text(encoding="utf-8"))
        expected = {
            "succeeded": tasks - len(before),
            "duplicates": len(before),
            "failed": 0,
            "cancelled": 0,
        }
        got = {name: snapshot[name] for name in expected}
        if got != expected:
            figures.problems.append(f"run {run}: expected {expected}, got {got}")
    _finish_figures(figures, db, [task["id"] for task in task_objects(tasks, seed)])
    for key, output in inspect_db(db).outputs.items():
        if output.get("task_id") != key or output.get("bytes") != 0:
            figures.problems.append(f"{key}: unexpected output {output}")
    return figures


def _finish_figures(figures: LoopFigures, db: Path, keys: list[str]) -> None:
    report = inspect_db(db)
    figures.completed = report.states.get("completed", 0)
    figures.in_progress = report.states.get("in_progress", 0)
    figures.lost = len(set(keys) - set(report.outputs))
    figures.integrity = report.integrity
    if report.rows != len(keys) or set(report.outputs) != set(keys):
        figures.problems.append(f"database holds {report.states}, expected {len(keys)} completed")


# --- A WorkerPool child whose handler calls are observable ---------------------------------------


def worker_args(
    db: Path,
    tasks: int,
    seed: int,
    lease: float,
    durability: str,
    tag: str,
    calls: Path,
    results: Path,
) -> list[str]:
    """Return the command line that runs this module as the logging WorkerPool child."""
    return [
        sys.executable, str(HELPERS), "worker", str(db), str(tasks), str(seed), str(lease),
        durability, tag, str(calls), str(results),
    ]  # fmt: skip


def read_calls(path: Path) -> list[tuple[str, int, str]]:
    """Return the (tag, call number, task id) lines a worker child logged."""
    return [(tag, number, task_id) for tag, number, task_id, _ in read_timed_calls(path)]


def read_timed_calls(path: Path) -> list[tuple[str, int, str, float]]:
    """Return the (tag, call number, task id, time.time() at the call) lines a child logged."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        (tag, int(number), task_id, float(when))
        for tag, number, task_id, when in (line.split() for line in lines)
    ]


def read_results(path: Path) -> list[tuple[str, str, Any]]:
    """Return the (status, key, output) records a worker child logged."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        status, key, output = line.split(" ", 2)
        records.append((status, key, json.loads(output)))
    return records


def pool_kill_loop(
    workdir: Path,
    *,
    tasks: int = 1000,
    kills: int = 10,
    durability: str = "normal",
    seed: int = 0,
    lease: float = 1.0,
    work_window: tuple[float, float] = (0.0, 0.05),
    handler: str = "sync",
) -> LoopFigures:
    """Run the logging WorkerPool child, SIGKILL it ``kills`` times, then let it finish.

    ``handler`` is "sync" (a plain function on worker threads) or "async" (a coroutine function
    on the pool's event loop).

    Checks, recorded as problems: no run calls the handler for a key completed before it
    started; no key is reported succeeded twice; the stored output of every key is the output of
    a logged call of that very key, and equals the output any run reported for it.
    """
    rng = random.Random(seed)
    db = workdir / "progress.db"
    keys = [task["id"] for task in task_objects(tasks, seed)]
    figures = LoopFigures("pool", durability, tasks)
    all_calls: list[tuple[str, int, str]] = []
    results: list[tuple[str, str, Any]] = []
    for run in range(kills + 1):
        before = completed_keys(db)
        last = run == kills
        calls_path, results_path = workdir / f"calls-{run}.log", workdir / f"results-{run}.log"
        err_path = workdir / f"pool-{run}.err"
        argv = worker_args(db, tasks, seed, lease, durability, f"r{run}", calls_path, results_path)
        with err_path.open("w") as err:
            proc = subprocess.Popen(
                argv,
                cwd=workdir,
                env=child_env({"KILL_LOOP_HANDLER": handler}),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            try:
                if last:
                    proc.wait(timeout=RUN_TIMEOUT)
                    killed = False
                else:
                    killed = kill_at_random_moment(
                        proc,
                        rng,
                        lambda path=calls_path: path.exists() and path.stat().st_size > 0,
                        work_window=work_window,
                    )
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        stderr = err_path.read_text(encoding="utf-8", errors="replace")
        if "Traceback" in stderr or "database is locked" in stderr:
            figures.problems.append(f"run {run}: stderr: {stderr.strip()[-500:]}")
        calls = read_calls(calls_path)
        all_calls.extend(calls)
        again = sorted({task_id for _, _, task_id in calls} & before)
        if again:
            figures.problems.append(f"run {run} called the handler for completed keys {again[:5]}")
        run_results = read_results(results_path)
        results.extend(run_results)
        bad = [(status, key) for status, key, _ in run_results if status == "failed"]
        if bad:
            figures.problems.append(f"run {run}: failed records {bad[:5]}")
        if killed:
            figures.kills += 1
            figures.mid_work_kills += len(completed_keys(db)) < tasks
            continue
        if not last:
            figures.finished_runs += 1
        if proc.returncode != 0:
            figures.problems.append(f"run {run}: exit {proc.returncode}: {stderr.strip()[-500:]}")
            continue
        succeeded = sum(status == "succeeded" for status, _, _ in run_results)
        if (len(run_results), succeeded) != (tasks, tasks - len(before)):
            figures.problems.append(
                f"run {run}: {len(run_results)} records, {succeeded} succeeded; expected "
                f"{tasks}, {tasks - len(before)}"
            )
    _finish_figures(figures, db, keys)
    figures.handler_calls = len(all_calls)
    figures.double_executions = len(all_calls) - len({task_id for _, _, task_id in all_calls})
    _check_outputs(figures, db, all_calls, results)
    return figures


def _check_outputs(
    figures: LoopFigures,
    db: Path,
    calls: list[tuple[str, int, str]],
    results: list[tuple[str, str, Any]],
) -> None:
    called = {(tag, number): task_id for tag, number, task_id in calls}
    if len(called) != len(calls):
        figures.problems.append("a call number was logged twice within one run")
    stored = inspect_db(db).outputs
    for key, output in stored.items():
        origin = called.get((output.get("run"), output.get("call")))
        if origin != key:
            figures.problems.append(f"{key}: stored output {output} is not from a call of {key}")
    successes = Counter(key for status, key, _ in results if status == "succeeded")
    twice = sorted(key for key, count in successes.items() if count > 1)
    if twice:
        figures.problems.append(f"keys reported succeeded more than once: {twice[:5]}")
    for status, key, output in results:
        if status in ("succeeded", "duplicate") and stored.get(key) != output:
            figures.problems.append(f"{key}: reported {status} {output}, stored {stored.get(key)}")


def _append(fd: int, text: str) -> None:
    # One write(2) per line on an O_APPEND descriptor: the kernel has it once write returns, so a
    # SIGKILL right after a call starts cannot lose its line.
    os.write(fd, text.encode())


def _worker_main(argv: list[str]) -> int:
    """Run every task once through a WorkerPool, logging each handler call and each record."""
    started = time.time()
    import asyncio
    import itertools
    import threading

    import task_queue_optimized as tq

    db, count, seed, lease, durability, tag, calls_path, results_path = argv
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    calls_fd = os.open(calls_path, flags, 0o600)
    results_fd = os.open(results_path, flags, 0o600)
    numbers = itertools.count()
    numbers_lock = threading.Lock()  # guards numbers

    def handler(task: tq.Task) -> dict[str, Any]:
        with numbers_lock:
            number = next(numbers)
        _append(calls_fd, f"{tag} {number} {task.id} {time.time():.6f}\n")
        time.sleep(task.payload["latency_ms"] / 1000)
        return {"run": tag, "call": number}

    async def async_handler(task: tq.Task) -> dict[str, Any]:
        number = next(numbers)  # calls run on one event loop thread
        _append(calls_fd, f"{tag} {number} {task.id} {time.time():.6f}\n")
        await asyncio.sleep(task.payload["latency_ms"] / 1000)
        return {"run": tag, "call": number}

    tasks = [tq.Task.from_dict(item) for item in task_objects(int(count), int(seed))]
    chosen = async_handler if os.environ.get("KILL_LOOP_HANDLER") == "async" else handler
    with tq.WorkerPool(
        chosen,
        workers=8,
        db_path=db,
        lease_seconds=float(lease),
        durability=durability,
        claim_poll_interval=0.01,
    ) as pool:
        print(json.dumps({"started": started}), flush=True)
        for record in pool.iter_results(tasks):
            output = json.dumps(record.output, separators=(",", ":"))
            _append(results_fd, f"{record.status.value} {record.key} {output}\n")
    print(json.dumps(pool.metrics.snapshot(), sort_keys=True))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        raise SystemExit(_worker_main(sys.argv[2:]))
    raise SystemExit(f"usage: {sys.argv[0]} worker DB TASKS SEED LEASE DURABILITY TAG CALLS OUT")
