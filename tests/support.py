"""What every test module shares: the repository's paths, one wait, one way to poll, one
environment for child processes and one runner of the command line.

Fixtures live in tests/conftest.py. Helpers of one area live beside the tests of that area and
build on this module: store_fixtures.py (stores, PostgreSQL schemas, worker processes),
reliability_helpers.py (the kill loops), dashboard_support.py (a dashboard server and client).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # a child process that imports this module need not load the library
    import task_queue_optimized as tq

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "task_queue_optimized.py"
SAMPLE_FILE = REPO / "sample_tasks_100.json"

# The longest a test waits for something the code under test should deliver soon: a future to
# resolve, a thread or a worker to start, a line on a pipe, a row to reach a state. Generous, so
# that a loaded machine never fails a test; a correct run never waits that long. Long runs pass
# their own deadline.
WAIT = 20.0

# The longest a gated handler waits for its gate before failing the task: a safety net so that a
# broken test never holds a worker thread for the whole pytest timeout.
GATE_TIMEOUT = 15.0

# The longest a run of the command line may take before the test gives up on it.
CLI_TIMEOUT = 30.0


# --- Waiting -------------------------------------------------------------------------------------


class Watched(Protocol):
    """A child process that `wait_until` can watch: it must not exit while the test waits."""

    label: str

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def stderr(self) -> str: ...


def wait_until(
    condition: Callable[[], Any],
    what: str,
    timeout: float = WAIT,
    interval: float = 0.02,
    procs: Sequence[Watched] = (),
) -> Any:
    """Poll `condition` until it returns something true, and return that.

    Poll only where the code under test offers no event to wait on (another process, a file, a
    database row); within a process, wait on a `threading.Event`.

    Raises:
        AssertionError: the deadline passed first (naming `what`), or one of `procs` exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(
                    f"waiting for {what}: {proc.label} exited with {proc.returncode}; stderr:\n"
                    f"{proc.stderr()[-3000:]}"
                )
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- Child processes -----------------------------------------------------------------------------


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a child process: no TQ_* variable, the repository importable.

    ``extra`` is added last, so it may set TQ_* variables or replace PYTHONPATH.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("TQ_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def run_cli(
    args: Sequence[str],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = CLI_TIMEOUT,
    *,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``python task_queue_optimized.py ARGS`` in ``cwd`` and return the finished process.

    Args:
        args: the command line's arguments.
        cwd: the working folder (where a .env would be read and relative paths point).
        env: variables added to `child_env()`.
        timeout: seconds before `subprocess.TimeoutExpired`.
        prefix: a command the interpreter runs under (say, one that drops capabilities).
    """
    return subprocess.run(
        [*prefix, sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_json(
    args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run the command line with ``--json`` and return the process and the parsed snapshot."""
    proc = run_cli([*args, "--json"], cwd, env)
    assert proc.stdout.strip(), f"no JSON on stdout; stderr: {proc.stderr}"
    return proc, json.loads(proc.stdout)


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Assert that `proc` failed with exit code 2 and one ``error:`` line; return that line.

    Every one of ``words`` must be in the line; no traceback may be on stderr.
    """
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# --- Task files and progress databases -----------------------------------------------------------


def task_dicts(count: int, latency_ms: float = 1, prefix: str = "t") -> list[dict]:
    """Return ``count`` task objects (as a task file holds them) with distinct ids."""
    return [
        {"id": f"{prefix}-{i:04d}", "payload": {"latency_ms": latency_ms, "size_bytes": 64}}
        for i in range(count)
    ]


def write_tasks(path: Path, tasks: object) -> Path:
    """Write ``tasks`` as a JSON task file and return its path."""
    path.write_text(json.dumps(tasks), encoding="utf-8")
    return path


def state_counts(db: Path) -> dict[str, int]:
    """Return the number of rows per state in the idempotency table of ``db``."""
    # Read-only, so a poll that races the database's creation never creates the file itself.
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = conn.execute("SELECT state, COUNT(*) FROM idempotency GROUP BY state").fetchall()
    finally:
        conn.close()
    return {state: count for state, count in rows}


def completed_count(db: Path) -> int:
    """Return how many keys ``db`` holds completed; 0 while it or its table is not there yet."""
    if not db.exists():
        return 0
    try:
        return state_counts(db).get("completed", 0)
    except sqlite3.Error:
        return 0  # the table is not created yet, or a writer holds a lock


def tree_bytes(root: Path) -> dict[str, bytes | None]:
    """Return every path under ``root`` mapped to its bytes (None for a directory)."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }


# --- A handler that holds workers ----------------------------------------------------------------


class GatedHandler:
    """A handler that counts its calls per key and can hold workers busy until a gate opens."""

    def __init__(
        self,
        *,
        gated: bool = True,
        error: BaseException | None = None,
        output: Callable[[tq.Task], Any] | None = None,
    ) -> None:
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.started = threading.Event()
        self._error = error
        self._output = output
        self._lock = threading.Lock()  # guards calls and _started_by_id
        self.calls: Counter[str] = Counter()
        self._started_by_id: dict[str, threading.Event] = {}

    def started_event(self, task_id: str) -> threading.Event:
        """Return the event set when the handler starts on task_id."""
        with self._lock:
            return self._started_by_id.setdefault(task_id, threading.Event())

    def wait_started(self, task_id: str, timeout: float = WAIT) -> bool:
        """Wait until the handler has started on task_id."""
        return self.started_event(task_id).wait(timeout)

    @property
    def total_calls(self) -> int:
        """Return the number of handler calls over all keys."""
        with self._lock:
            return sum(self.calls.values())

    def __call__(self, task: tq.Task) -> Any:
        with self._lock:
            self.calls[task.key] += 1
            event = self._started_by_id.setdefault(task.id, threading.Event())
        event.set()
        self.started.set()
        if not self.gate.wait(GATE_TIMEOUT):
            raise RuntimeError("test gate never opened")
        if self._error is not None:
            raise self._error
        if self._output is not None:
            return self._output(task)
        return {"task_id": task.id, "payload": task.payload}


class GatedFactory:
    """Build GatedHandler instances and remember them so that teardown can open every gate."""

    def __init__(self) -> None:
        self.handlers: list[GatedHandler] = []

    def __call__(self, **kwargs: Any) -> GatedHandler:
        handler = GatedHandler(**kwargs)
        self.handlers.append(handler)
        return handler

    def release_all(self) -> None:
        """Open every gate handed out so far."""
        for handler in self.handlers:
            handler.gate.set()
