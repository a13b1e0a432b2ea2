"""Helpers of the store, durable-queue and PostgreSQL tests (their fixtures are in conftest.py).

Everything here drives real things: real SQLite files, a real PostgreSQL server (one fresh schema
per test, dropped at teardown), real worker processes started with the command line, real
signals.

PostgreSQL: the DSN comes from ``TQ_TEST_POSTGRES_DSN`` (default: the local server). Where psycopg
is missing or no server answers, the tests that need it skip with the reason, unless
``TQ_REQUIRE_POSTGRES=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.parse
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests.support import SCRIPT, child_env, run_cli

PG_DSN = os.environ.get("TQ_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REQUIRE_POSTGRES = os.environ.get("TQ_REQUIRE_POSTGRES") == "1"

# The module a worker process imports with --handler: every call appends "task_id key" to a file
# named after the process id, with one O_APPEND write (atomic, unbuffered: it survives SIGKILL
# and never interleaves between threads), then sleeps payload["sleep_ms"] and, given
# payload["gate"], waits until that file exists (a test opens the gate; 60 s at most).
HANDLER_MODULE = "tq_test_handlers"
HANDLER_SOURCE = '''\
"""Handlers for the durable-queue tests (written by tests/store_fixtures.py)."""

import os
import time

NOT_CALLABLE = 42
_fd = None


def record(task):
    global _fd
    if _fd is None:
        path = os.path.join(os.environ["HANDLER_LOG_DIR"], f"{os.getpid()}.log")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{task.id} {task.key}\\n".encode())
    sleep_ms = task.payload.get("sleep_ms", 0)
    if sleep_ms:
        time.sleep(sleep_ms / 1000)
    gate = task.payload.get("gate")
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise RuntimeError(f"gate {gate} never opened")
        time.sleep(0.01)
    return {"id": task.id}


def stamped(task):
    """record(task), after appending "task_id time.time()" to a file named after the process."""
    path = os.path.join(os.environ["HANDLER_LOG_DIR"], f"{os.getpid()}.starts")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{task.id} {time.time()!r}\\n")
    return record(task)
'''
RECORD_HANDLER = f"{HANDLER_MODULE}:record"
STAMPED_HANDLER = f"{HANDLER_MODULE}:stamped"  # record, and when each call began


# --- PostgreSQL ----------------------------------------------------------------------------------


def unavailable(reason: str) -> None:
    """Skip the current test with `reason`, or fail it when CI requires PostgreSQL."""
    if REQUIRE_POSTGRES:
        pytest.fail(f"TQ_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@functools.cache
def _postgres_problem() -> str | None:
    try:
        import psycopg
    except ImportError:
        return "psycopg 3 is not installed (pip install 'psycopg[binary]')"
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3):
            pass
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"no PostgreSQL server answers at {tq._redact(PG_DSN)}: {first}"
    return None


def require_postgres() -> None:
    """Skip (or, under TQ_REQUIRE_POSTGRES=1, fail) unless psycopg and a server are there."""
    problem = _postgres_problem()
    if problem is not None:
        unavailable(problem)


def require_psycopg() -> None:
    """Skip (or fail under TQ_REQUIRE_POSTGRES=1) when psycopg cannot be imported."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg 3 is not installed (pip install 'psycopg[binary]')")


def schema_url(schema: str, dsn: str = PG_DSN) -> str:
    """Return `dsn` with ``schema=NAME`` added to its query string."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(name, value) for name, value in query if name != "schema"] + [("schema", schema)]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def new_schema_url() -> str:
    """Return a URL of the test server naming a fresh random schema."""
    return schema_url(f"tq_{secrets.token_hex(6)}")


def schema_of(url: str) -> str:
    """Return the schema a PostgreSQL store URL names."""
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["schema"]


def drop_schema(url: str) -> None:
    """Drop the schema of `url` if it exists (opening a store on it would create it)."""
    import psycopg

    dsn, schema = tq._split_schema(url)  # validates the name, so it is safe to interpolate
    with psycopg.connect(dsn, connect_timeout=10, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def pg_rows(sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one read-only query on the test server (its own connection) and return the rows."""
    import psycopg

    with psycopg.connect(PG_DSN, connect_timeout=10, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def pg_execute(sql: str, params: Sequence[Any] = ()) -> None:
    """Run one statement that returns no rows on the test server (its own connection)."""
    import psycopg

    with psycopg.connect(PG_DSN, connect_timeout=10, autocommit=True) as conn:
        conn.execute(sql, params)


def listening(url: str) -> bool:
    """Return whether some connection has run ``LISTEN`` on the store's channel (an idle worker)."""
    channel = f"task_queue_{schema_of(url)}"
    rows = pg_rows(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = %s",
        (f"LISTEN {channel}",),
    )
    return rows[0][0] > 0


def restart_postgres() -> None:
    """Restart the local PostgreSQL cluster and return once it accepts connections again."""
    clusters = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    tool = shutil.which("pg_ctlcluster")
    if tool is None or not clusters or os.geteuid() != 0:
        unavailable("restarting the server needs pg_ctlcluster, /etc/postgresql and root")
    subprocess.run(
        [tool, "--skip-systemctl-redirect", clusters[0], "main", "restart"],
        check=True,
        timeout=120,
        capture_output=True,
    )


# --- The contract's backends ---------------------------------------------------------------------


class Backend:
    """One storage backend under test: opens stores on one shared location.

    `open` returns a new store each call; for SQLite and PostgreSQL they all share one database
    (the way several processes would), for ``memory://`` each store is a world of its own
    (`shared` is False).
    """

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.shared = name != "memory"
        self.wakes = name != "sqlite"  # wait_for_work returns on an enqueue (no polling)
        self._opened: list[Any] = []

    def open(self, lease_seconds: float = 30.0, ttl_seconds: float | None = None) -> Any:
        store = tq.open_store(self.url, lease_seconds=lease_seconds, ttl_seconds=ttl_seconds)
        self._opened.append(store)
        return store

    def stores(self, count: int, lease_seconds: float = 30.0) -> list[Any]:
        """Return `count` stores on the same data: distinct ones where the backend can share."""
        if self.shared:
            return [self.open(lease_seconds) for _ in range(count)]
        return [self.open(lease_seconds)] * count

    def close_all(self) -> None:
        for store in self._opened:
            store.close()
        self._opened.clear()


# --- Processes -----------------------------------------------------------------------------------


class CliProcess:
    """A child process whose stdout and stderr go to files (a chatty child never blocks)."""

    def __init__(self, popen: subprocess.Popen[bytes], label: str, out: Path, err: Path) -> None:
        self.popen = popen
        self.label = label
        self._out = out
        self._err = err

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def stdout(self) -> str:
        return self._out.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self._err.read_text(encoding="utf-8", errors="replace")

    def json(self) -> dict[str, Any]:
        """Return the JSON document the process printed on stdout (``--json``)."""
        text = self.stdout()
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise AssertionError(
                f"{self.label}: no JSON on stdout:\n{text}\nstderr:\n{self.stderr()[-3000:]}"
            ) from None

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.label} still running after {timeout:g} s; stderr:\n{self.stderr()[-3000:]}"
            ) from None

    def terminate(self, timeout: float = 60.0) -> int:
        """Send SIGTERM and return the exit code once the process has drained and exited."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        self.popen.kill()
        return self.popen.wait(30)


class Launcher:
    """Start command-line and Python children in a working folder; kill leftovers at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "handler-logs"
        self.logs.mkdir()
        (root / f"{HANDLER_MODULE}.py").write_text(HANDLER_SOURCE, encoding="utf-8")
        self.procs: list[CliProcess] = []

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return child_env({"HANDLER_LOG_DIR": str(self.logs), **(extra or {})})

    def _start(
        self,
        argv: list[str],
        label: str,
        stdin: Any = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
    ) -> CliProcess:
        index = len(self.procs)
        out = self.root / f"proc-{index}.out"
        err = self.root / f"proc-{index}.err"
        with out.open("wb") as out_file, err.open("wb") as err_file:
            popen = subprocess.Popen(
                argv,
                cwd=self.root,
                env=self._env(env),
                stdin=stdin,
                stdout=out_file,
                stderr=err_file,
            )
        proc = CliProcess(popen, f"{label} (pid {popen.pid})", out, err)
        self.procs.append(proc)
        return proc

    def spawn(self, *args: str, env: Mapping[str, str] | None = None) -> CliProcess:
        """Start ``python task_queue_optimized.py ARGS`` in the background, ``env`` added."""
        argv = [sys.executable, str(SCRIPT), *args]
        return self._start(argv, " ".join(args[:1]) or "cli", env=env)

    def spawn_python(self, code: str, *args: str, label: str = "python -c") -> CliProcess:
        """Start ``python -c CODE ARGS`` with a pipe on stdin."""
        return self._start([sys.executable, "-c", code, *args], label, stdin=subprocess.PIPE)

    def run(self, *args: str, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess:
        """Run ``python task_queue_optimized.py ARGS`` to completion and return it."""
        return run_cli(args, self.root, {"HANDLER_LOG_DIR": str(self.logs), **env}, timeout)

    def worker(self, db: str, *args: str, handler: str = RECORD_HANDLER) -> CliProcess:
        """Start ``task-queue worker --db DB --handler HANDLER --json ARGS``."""
        return self.spawn("worker", "--db", db, "--handler", handler, "--json", *args)

    def executions(self) -> dict[int, list[tuple[str, str]]]:
        """Return the handler calls logged so far: pid -> [(task_id, key), ...] in call order."""
        calls: dict[int, list[tuple[str, str]]] = {}
        for path in sorted(self.logs.glob("*.log")):
            lines = path.read_text(encoding="utf-8").splitlines()
            calls[int(path.stem)] = [tuple(line.split(" ", 1)) for line in lines]  # type: ignore[misc]
        return calls

    def starts(self) -> dict[str, list[float]]:
        """Return when the stamped handler began each call: task id -> `time.time()` values."""
        began: dict[str, list[float]] = {}
        for path in sorted(self.logs.glob("*.starts")):
            for line in path.read_text(encoding="utf-8").splitlines():
                task_id, stamp = line.rsplit(" ", 1)
                began.setdefault(task_id, []).append(float(stamp))
        return began

    def calls_by_key(self) -> Counter[str]:
        """Return how many times the handler ran for each key, over every process."""
        return Counter(key for calls in self.executions().values() for _, key in calls)

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
