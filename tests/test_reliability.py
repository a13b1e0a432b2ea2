"""Reliability and security: crashes, signals, contention, input.

Real subprocesses, real SQLite files and real signals; nothing of the library is mocked. Within a
process the tests coordinate with Events; across processes with lines printed on pipes, files and
bounded polling deadlines. No test asserts a wall time.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests.reliability_helpers import (
    cli_kill_loop,
    inspect_db,
    pool_kill_loop,
    read_results,
    read_timed_calls,
    worker_args,
)
from tests.support import (
    REPO,
    SCRIPT,
    WAIT,
    GatedFactory,
    child_env,
    one_line_error,
    run_cli,
    run_json,
    state_counts,
    tree_bytes,
    wait_until,
    write_tasks,
)

PAYLOAD = {"v": 1}
# Root ignores file permissions. As root, the permission cases run the command line through
# setpriv without the capabilities that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH).
DROP_DAC = [
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
]


def _row(db: str | Path, key: str) -> dict[str, Any] | None:
    """Return every column of the stored row of ``key``, read straight from the file."""
    conn = sqlite3.connect(db, timeout=30.0)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM idempotency WHERE key = ?", (key,)).fetchone()
    finally:
        conn.close()
    return None if row is None else dict(row)


def _in_progress(db: Path) -> int:
    """Return the number of keys in progress in ``db`` (0 while it is not readable yet)."""
    try:
        return state_counts(db).get("in_progress", 0) if db.exists() else 0
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="session")
def as_user(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Return a command prefix under which file permissions apply; skip where none exists."""
    if os.geteuid() != 0:
        return []
    probe = tmp_path_factory.mktemp("probe") / "secret"
    probe.write_text("x")
    probe.chmod(0)
    try:
        proc = subprocess.run([*DROP_DAC, "cat", str(probe)], capture_output=True, timeout=WAIT)
    except (OSError, subprocess.SubprocessError):
        proc = None
    if proc is None or proc.returncode == 0 or b"Permission denied" not in proc.stderr:
        pytest.skip(
            "runs as root, which ignores file permissions, and setpriv cannot drop "
            "CAP_DAC_OVERRIDE here, so a permission error cannot be reproduced"
        )
    return DROP_DAC


class _LineReader:
    """Read a child's text stream on a thread, so a test can wait for a line with a deadline."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, text: str, timeout: float = WAIT) -> bool:
        """Return whether a line containing ``text`` arrives before the deadline."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                return False
            if line is None:
                return False
            self.lines.append(line)
            if text in line:
                return True
        return False

    def rest(self, timeout: float = WAIT) -> str:
        """Return every line read so far and until the stream closes."""
        self._thread.join(timeout)
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


# --- 1. Kill loop ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("durability", ["normal", "full"])
def test_cli_survives_ten_sigkills(tmp_path: Path, durability: str) -> None:
    """Prove the CLI killed -9 ten times, then rerun, completes 1,000 keys once, none stuck."""
    figures = cli_kill_loop(tmp_path, tasks=1000, kills=10, durability=durability, seed=7)
    print(figures.line())
    assert figures.problems == []
    assert figures.mid_work_kills >= 1, figures.line()
    assert (figures.completed, figures.lost, figures.in_progress) == (1000, 0, 0)
    assert figures.integrity == "ok"


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("durability", "handler"), [("normal", "sync"), ("full", "sync"), ("normal", "async")]
)
def test_pool_kill_loop_completes_each_key_once(
    tmp_path: Path, durability: str, handler: str, record_property: Callable[[str, Any], None]
) -> None:
    """Prove a pool killed -9 ten times loses no key, completes none twice; count double runs."""
    figures = pool_kill_loop(
        tmp_path, tasks=1000, kills=10, durability=durability, seed=11, handler=handler
    )
    print(figures.line())
    record_property("double_executions", figures.double_executions)
    assert figures.problems == []
    assert figures.mid_work_kills >= 1, figures.line()
    assert (figures.completed, figures.lost, figures.in_progress) == (1000, 0, 0)
    assert figures.integrity == "ok"
    assert figures.handler_calls is not None and figures.handler_calls >= 1000
    assert figures.double_executions == figures.handler_calls - 1000


# --- 2. Leases and fencing across pools -----------------------------------------------------------

# Pool A in a child: its handler reports that it started, then waits for a line on stdin. Its store
# is the real one, extended only to print what each completion answered.
CHILD_POOL_BLOCKS = """
import json, sys
import task_queue_optimized as tq

class ReportingStore(tq.IdempotencyManager):
    def complete(self, *args, **kwargs):
        answer = super().complete(*args, **kwargs)
        print("complete", json.dumps(answer), flush=True)
        return answer

    def complete_many(self, *args, **kwargs):
        answer = super().complete_many(*args, **kwargs)
        print("complete", json.dumps(answer), flush=True)
        return answer

def handler(task):
    print("started", flush=True)
    sys.stdin.readline()
    return {"by": "A"}

store = ReportingStore(sys.argv[1], lease_seconds=float(sys.argv[2]))
with tq.WorkerPool(handler, workers=1, idempotency=store, claim_poll_interval=0.01,
                   namespace="one-handler") as pool:
    record = pool.submit(tq.Task("k", {"v": 1})).result()
store.close()
print(json.dumps([record.status.value, record.attempts, record.output]), flush=True)
"""

# Pool B in a child: submits the key, says so, and reports its record and its handler calls.
CHILD_POOL_WAITS = """
import json, sys
import task_queue_optimized as tq
calls = []
def handler(task):
    calls.append(task.id)
    return {"by": "B"}
with tq.WorkerPool(handler, workers=1, db_path=sys.argv[1], lease_seconds=float(sys.argv[2]),
                   claim_poll_interval=0.01, namespace="one-handler") as pool:
    future = pool.submit(tq.Task("k", {"v": 1}))
    print("submitted", flush=True)
    record = future.result()
print(json.dumps([record.status.value, record.attempts, record.output, calls]), flush=True)
"""


def _wait_stopped(pid: int) -> None:
    """Return once /proc says ``pid`` is stopped (state T)."""

    def stopped() -> bool:
        text = Path(f"/proc/{pid}/stat").read_text()
        return text.rsplit(")", 1)[1].split()[0] in ("T", "t")

    wait_until(stopped, f"process {pid} to stop", interval=0.01)


def _freeze_outside_a_write(pid: int, db: str, tries: int = 50) -> bool:
    """SIGSTOP ``pid`` at a moment it holds no write lock on ``db``; return whether that worked.

    A process frozen inside a write transaction (its lease renewal, say) would block every writer
    of the file; that is SQLite's limit, not what the test is about, so such a moment is skipped.
    """
    for _ in range(tries):
        os.kill(pid, signal.SIGSTOP)
        _wait_stopped(pid)
        conn = sqlite3.connect(db, timeout=0.05, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)  # it was mid-write: let it finish and try again
            time.sleep(0.01)
        finally:
            conn.close()
    return False


@pytest.mark.timeout(30)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see SIGSTOP")
def test_frozen_owner_is_taken_over_and_its_late_completion_writes_nothing(
    tmp_db: str, gated: GatedFactory, make_pool: Callable, spawn_python: Callable
) -> None:
    """Prove a SIGSTOPped owner loses its key after the lease; its late complete writes nothing."""
    lease = 0.3  # the frozen owner's, to run out soon
    child = spawn_python(CHILD_POOL_BLOCKS, tmp_db, str(lease))
    assert child.stdout.readline().strip() == "started"
    # The owner stops renewing, as a frozen VM or a long pause would make it.
    assert _freeze_outside_a_write(child.pid, tmp_db)
    frozen = _row(tmp_db, "k")
    assert frozen is not None and frozen["state"] == "in_progress"

    handler = gated(output=lambda task: {"by": "B"})
    # The new owner's lease must outlast its renewals' delays on a busy machine while the old
    # owner, awake again, polls the key (a renewal every 0.5 s leaves a second of slack).
    pool = make_pool(
        handler, workers=1, db_path=tmp_db, lease_seconds=1.5, claim_poll_interval=0.01,
        namespace="one-handler",
    )  # fmt: skip
    future = pool.submit(tq.Task("k", PAYLOAD))
    assert handler.wait_started("k")
    taken = _row(tmp_db, "k")
    assert taken is not None and taken["token"] != frozen["token"]
    assert taken["updated_at"] >= frozen["lease_expires"]  # claimed once the lease had run out

    # Wake the old owner while the new one still holds the key: its completion must be fenced off.
    os.kill(child.pid, signal.SIGCONT)
    child.stdin.write("go\n")
    child.stdin.flush()
    answer = child.stdout.readline().split()
    assert answer[0] == "complete" and "true" not in answer[1], answer
    held = _row(tmp_db, "k")
    assert held is not None
    columns = ("state", "token", "output", "error", "fingerprint")
    assert [held[name] for name in columns] == [taken[name] for name in columns]

    handler.gate.set()
    record = future.result(WAIT)
    assert (record.status, record.attempts, record.output) == ("succeeded", 1, {"by": "B"})
    out, err = child.communicate(timeout=WAIT)
    assert child.returncode == 0, err
    # The old owner reports the new owner's result as a duplicate; its one call still counts.
    assert json.loads(out.splitlines()[-1]) == ["duplicate", 1, {"by": "B"}]
    final = _row(tmp_db, "k")
    assert final is not None
    assert (final["state"], json.loads(final["output"])) == ("completed", {"by": "B"})
    assert handler.calls == {"k": 1}


@pytest.mark.timeout(30)
def test_long_handler_keeps_its_claim_against_another_process(
    tmp_db: str, gated: GatedFactory, make_pool: Callable, spawn_python: Callable
) -> None:
    """Prove renewal keeps a claim for several leases while another process's pool waits on it."""
    # A renewal every third of the lease: 1.5 s leaves a busy machine a second of slack (0.2 s
    # left it 0.13 s, and the other pool, polling every 0.01 s, took the key).
    lease = 1.5
    handler = gated()
    pool = make_pool(
        handler, workers=1, db_path=tmp_db, lease_seconds=lease, namespace="one-handler"
    )
    future = pool.submit(tq.Task("k", PAYLOAD))
    assert handler.wait_started("k")
    first = _row(tmp_db, "k")
    assert first is not None and first["state"] == "in_progress"

    child = spawn_python(CHILD_POOL_WAITS, tmp_db, str(lease))
    assert child.stdout.readline().strip() == "submitted"
    # Wait, by the stored lease rather than by a clock, until it was renewed past two leases.
    rows: list[dict[str, Any] | None] = []
    target = first["lease_expires"] + 2 * lease
    wait_until(
        lambda: rows.append(_row(tmp_db, "k")) or rows[-1]["lease_expires"] >= target,
        "two renewals",
        interval=0.01,
    )
    owners = {(row["state"], row["token"]) for row in rows if row}
    assert owners == {("in_progress", first["token"])}
    assert child.poll() is None  # the other pool is still waiting

    handler.gate.set()
    record = future.result(WAIT)
    assert (record.status, record.attempts) == ("succeeded", 1)
    out, err = child.communicate(timeout=WAIT)
    assert child.returncode == 0, err
    assert json.loads(out.splitlines()[-1]) == ["duplicate", 0, record.output, []]
    assert handler.calls == {"k": 1}


# --- 3. A second signal ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_second_signal_exits_at_once_and_rerun_completes_after_the_lease(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    """Prove a second signal exits at once with the same code and a rerun takes the claims."""
    count, running = 8, 4
    tasks = [
        {"id": f"s-{i}", "payload": {"latency_ms": 1000, "size_bytes": 0}} for i in range(count)
    ]
    write_tasks(tmp_path / "tasks.json", tasks)
    db = tmp_path / "progress.db"
    args = ["--task-file", "tasks.json", "--db", "progress.db", "--jitter-ms", "0"]
    args += ["--lease-seconds", "1"]
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args, "--workers", str(running)],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader = _LineReader(proc.stderr)
    try:
        wait_until(lambda: _in_progress(db) >= running, "the run to claim its tasks", interval=0.01)
        proc.send_signal(signum)
        # The first signal is acknowledged on stderr at once; only then is the second one sent.
        assert reader.wait_for(signum.name), reader.rest(0)
        proc.send_signal(signum)
        returncode = proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = reader.rest()
    assert returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    # The message says after how long a rerun can take the abandoned claims: the 1 s lease.
    assert re.search(r"\b1(\.0)? ?(s|sec|seconds?)\b", stderr), stderr
    states = state_counts(db)
    # It did not wait for the running tasks: their claims are still in progress in the file.
    assert states.get("in_progress", 0) >= 1, states
    done = states.get("completed", 0)

    rerun, snapshot = run_json([*args, "--workers", str(count)], tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert (snapshot["succeeded"], snapshot["duplicates"]) == (count - done, done)
    assert (snapshot["failed"], snapshot["cancelled"]) == (0, 0)
    assert state_counts(db) == {"completed": count}


# --- 4. Contention --------------------------------------------------------------------------------

# Creates the database the library's way, then holds its write lock and reports when it let go.
CHILD_HOLDS_WRITE_LOCK = """
import sqlite3, sys, time
import task_queue_optimized as tq
tq.IdempotencyManager(sys.argv[1]).close()
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("CREATE TABLE IF NOT EXISTS locker (x)")
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT INTO locker VALUES (1)")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
committing = time.time()
conn.execute("COMMIT")
conn.close()
print("committing", committing, flush=True)
"""


@pytest.mark.timeout(60)
def test_two_pools_and_a_held_write_lock_lose_nothing(
    tmp_path: Path, spawn_python: Callable
) -> None:
    """Prove two processes sharing a file behind a 2 s write lock run each of 500 keys once."""
    db = tmp_path / "shared.db"
    locker = spawn_python(CHILD_HOLDS_WRITE_LOCK, str(db), "2")
    assert locker.stdout.readline().strip() == "locked"
    workers = []
    for tag in ("a", "b"):
        argv = worker_args(
            db, 500, 3, 30.0, "normal", tag, tmp_path / f"{tag}.calls", tmp_path / f"{tag}.res"
        )
        workers.append(
            subprocess.Popen(
                argv,
                cwd=tmp_path,
                env=child_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = [proc.communicate(timeout=50) for proc in workers]
    locker_out, locker_err = locker.communicate(timeout=WAIT)
    assert locker.returncode == 0, locker_err
    committing = float(locker_out.split()[-1])

    for proc, (out, err) in zip(workers, results, strict=True):
        assert proc.returncode == 0, err
        assert "locked" not in err and "Traceback" not in err, err
        lines = out.splitlines()
        assert json.loads(lines[0])["started"] < committing  # it ran while the lock was held
        assert json.loads(lines[-1])["failed"] == 0
    calls = [call for tag in ("a", "b") for call in read_timed_calls(tmp_path / f"{tag}.calls")]
    keys = [task_id for _, _, task_id, _ in calls]
    assert len(keys) == len(set(keys)) == 500  # each key's handler ran once, across both processes
    assert min(when for _, _, _, when in calls) >= committing  # nothing ran through the lock
    for tag in ("a", "b"):
        records = read_results(tmp_path / f"{tag}.res")
        assert len(records) == 500
        assert {status for status, _, _ in records} <= {"succeeded", "duplicate"}
    report = inspect_db(db)
    assert (report.states, report.integrity) == ({"completed": 500}, "ok")


# --- 5. Hostile input through the command line ----------------------------------------------------


@pytest.fixture(scope="module")
def existing_db(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Return the bytes of a real progress database left by a successful run."""
    root = tmp_path_factory.mktemp("existing")
    write_tasks(root / "tasks.json", [{"id": "a"}, {"id": "b"}])
    proc = run_cli(["--task-file", "tasks.json", "--db", "progress.db", "--latency-ms", "0"], root)
    assert proc.returncode == 0, proc.stderr
    return (root / "progress.db").read_bytes()


@pytest.fixture
def hostile_dir(tmp_path: Path, existing_db: bytes) -> Path:
    """Return a working directory holding an existing database and a good task file."""
    (tmp_path / "progress.db").write_bytes(existing_db)
    write_tasks(tmp_path / "good.json", [{"id": "a"}, {"id": "c"}])
    return tmp_path


def _deep(depth: int) -> str:
    """Return a one-task file whose deepest container sits at ``depth``."""
    return '[{"id": "a", "payload": {"x": ' + "[" * (depth - 3) + "]" * (depth - 3) + "}}]"


# (file name, bytes written, words the message must name)
TASK_FILE_CASES = [
    pytest.param("latin1.json", b'[{"id": "caf\xe9"}]', ["latin1.json", "line 1"], id="non-utf8"),
    pytest.param("nan.json", b'[{"id": "a", "payload": {"x": NaN}}]', ["nan.json"], id="nan"),
    pytest.param("inf.json", b'[{"id": "a", "payload": {"x": 1e999}}]', ["inf.json"], id="1e999"),
    pytest.param(
        "dupkey.json", b'[{"id": "a", "payload": {"x": 1, "x": 2}}]', ["dupkey.json"], id="dup-key"
    ),
    pytest.param("deep.json", _deep(65).encode(), ["deep.json"], id="depth-65"),
    pytest.param("abyss.json", _deep(200_000).encode(), ["abyss.json"], id="depth-200000"),
    pytest.param("top.json", b'{"tasks": 5}', ["top.json"], id="tasks-not-a-list"),
    pytest.param("scalar.json", b'"tasks"', ["scalar.json"], id="top-level-string"),
    pytest.param("idtype.json", b'[{"id": 5}]', ["idtype.json", "task 0", "id"], id="id-not-str"),
    pytest.param(
        "payload.json",
        b'[{"id": "a"}, {"id": "b", "payload": [1]}]',
        ["payload.json", "task 1", "payload"],
        id="payload-not-object",
    ),
    pytest.param(
        "key.json",
        b'[{"id": "a", "idempotency_key": ""}]',
        ["key.json", "task 0", "idempotency_key"],
        id="empty-key",
    ),
    pytest.param(
        "surrogate.json",
        b'[{"id": "ok"}, {"id": "\\ud800"}]',
        ["surrogate.json", "task 1", "id"],
        id="id-lone-surrogate",
    ),
    pytest.param(
        "surrogate-key.json",
        b'[{"id": "a", "idempotency_key": "\\udfff"}]',
        ["surrogate-key.json", "task 0", "idempotency_key"],
        id="key-lone-surrogate",
    ),
]


@pytest.mark.parametrize(("name", "content", "names"), TASK_FILE_CASES)
def test_bad_task_file_exits_2_and_leaves_the_database(
    hostile_dir: Path, name: str, content: bytes, names: list[str]
) -> None:
    """Prove each bad task file exits 2 with one line naming it, the database byte for byte kept."""
    (hostile_dir / name).write_bytes(content)
    before = tree_bytes(hostile_dir)
    proc = run_cli(["--task-file", name, "--db", "progress.db"], hostile_dir)
    one_line_error(proc, *names)
    assert tree_bytes(hostile_dir) == before


def test_task_file_that_is_a_directory_exits_2(hostile_dir: Path) -> None:
    """Prove a directory given as the task file exits 2 with one line naming it."""
    (hostile_dir / "folder.json").mkdir()
    before = tree_bytes(hostile_dir)
    proc = run_cli(["--task-file", "folder.json", "--db", "progress.db"], hostile_dir)
    one_line_error(proc, "folder.json")
    assert tree_bytes(hostile_dir) == before


def test_unreadable_task_file_exits_2(hostile_dir: Path, as_user: list[str]) -> None:
    """Prove a task file without read permission exits 2 with one line naming it."""
    path = hostile_dir / "secret.json"
    write_tasks(path, [{"id": "a"}])
    path.chmod(0)
    before = tree_bytes(hostile_dir)
    proc = run_cli(
        ["--task-file", "secret.json", "--db", "progress.db"], hostile_dir, prefix=as_user
    )
    one_line_error(proc, "secret.json")
    assert tree_bytes(hostile_dir) == before


def test_oversized_task_file_is_refused_before_it_is_read(hostile_dir: Path) -> None:
    """Prove a sparse file one byte over the default 64 MiB cap is refused by its size alone."""
    path = hostile_dir / "huge.json"
    with path.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024 + 1)  # sparse: no disk used; a parser would see NULs
    db_before = (hostile_dir / "progress.db").read_bytes()
    proc = run_cli(["--task-file", "huge.json", "--db", "progress.db"], hostile_dir)
    line = one_line_error(proc, "huge.json")
    assert re.search(r"\b67108865\b|limit|bytes", line), line
    assert (hostile_dir / "progress.db").read_bytes() == db_before
    names = sorted(path.name for path in hostile_dir.iterdir())
    assert names == ["good.json", "huge.json", "progress.db"]


BAD_VALUES = [
    pytest.param(["--lease-seconds", "0"], {}, "--lease-seconds", id="lease-0"),
    pytest.param(["--lease-seconds", "nan"], {}, "--lease-seconds", id="lease-nan"),
    pytest.param(["--max-delay", "inf"], {}, "--max-delay", id="max-delay-inf"),
    pytest.param(["--base-delay", "-1"], {}, "--base-delay", id="base-delay-negative"),
    pytest.param(["--latency-ms", "nan"], {}, "--latency-ms", id="latency-nan"),
    pytest.param(["--log-level", "LOUD"], {}, "--log-level", id="log-level"),
    pytest.param(["--seed", "x"], {}, "--seed", id="seed"),
    pytest.param([], {"TQ_LEASE_SECONDS": "-1"}, "TQ_LEASE_SECONDS", id="env-lease"),
    pytest.param([], {"TQ_QUEUE_SIZE": "1.5"}, "TQ_QUEUE_SIZE", id="env-queue-size"),
    pytest.param([], {"TQ_BASE_DELAY": "abc"}, "TQ_BASE_DELAY", id="env-base-delay"),
    pytest.param([], {"TQ_MAX_DELAY": "nan"}, "TQ_MAX_DELAY", id="env-max-delay"),
    pytest.param([], {"TQ_LOG_LEVEL": "LOUD"}, "TQ_LOG_LEVEL", id="env-log-level"),
    pytest.param([], {"TQ_MAX_ATTEMPTS": "0"}, "TQ_MAX_ATTEMPTS", id="env-max-attempts"),
]


@pytest.mark.parametrize(("flags", "env", "name"), BAD_VALUES)
def test_bad_flag_or_variable_exits_2_and_leaves_the_database(
    hostile_dir: Path, flags: list[str], env: dict[str, str], name: str
) -> None:
    """Prove each bad value exits 2 with one line naming its flag or variable, nothing written."""
    before = tree_bytes(hostile_dir)
    proc = run_cli(["--task-file", "good.json", "--db", "progress.db", *flags], hostile_dir, env)
    one_line_error(proc, name)
    assert tree_bytes(hostile_dir) == before


DB_PATHS = [
    pytest.param(["--db", "missing/x.db"], {}, "missing", id="parent-missing"),
    pytest.param(["--db", "good.json/x.db"], {}, "good.json", id="parent-is-a-file"),
    pytest.param([], {"TQ_DB_PATH": "good.json/x.db"}, "good.json", id="env-parent-is-a-file"),
]


@pytest.mark.parametrize(("flags", "env", "name"), DB_PATHS)
def test_db_path_that_cannot_hold_a_database_exits_2(
    hostile_dir: Path, flags: list[str], env: dict[str, str], name: str
) -> None:
    """Prove a --db or TQ_DB_PATH that cannot be created exits 2 naming it, creating nothing."""
    before = tree_bytes(hostile_dir)
    proc = run_cli(["--task-file", "good.json", *flags], hostile_dir, env)
    one_line_error(proc, name)
    assert tree_bytes(hostile_dir) == before


def test_read_only_database_exits_2_unchanged(hostile_dir: Path, as_user: list[str]) -> None:
    """Prove a read-only database file exits 2 naming it and keeps its bytes."""
    (hostile_dir / "progress.db").chmod(0o400)
    before = tree_bytes(hostile_dir)
    proc = run_cli(["--task-file", "good.json", "--db", "progress.db"], hostile_dir, prefix=as_user)
    one_line_error(proc, "progress.db")
    assert tree_bytes(hostile_dir) == before


def test_database_in_read_only_folder_exits_2(hostile_dir: Path, as_user: list[str]) -> None:
    """Prove a new database in a folder without write permission exits 2 naming it."""
    folder = hostile_dir / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        args = ["--task-file", "good.json", "--db", "locked/new.db"]
        proc = run_cli(args, hostile_dir, prefix=as_user)
        one_line_error(proc, "new.db")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


NOT_JSON = [
    pytest.param(object(), id="object"),
    pytest.param(float("nan"), id="nan"),
    pytest.param({"x": {1, 2}}, id="set"),
    pytest.param([b"bytes"], id="bytes"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bad", NOT_JSON)
def test_non_json_output_fails_that_task_alone_and_stays_runnable(
    tmp_db: str, make_pool: Callable, bad: object
) -> None:
    """Prove a non-JSON handler output fails that task only, stores nothing, and reruns later."""
    outputs = {"bad": bad}
    calls: list[str] = []
    lock = threading.Lock()

    def handler(task: tq.Task) -> object:
        with lock:
            calls.append(task.id)
        return outputs.get(task.id, {"ok": task.id})

    tasks = [tq.Task(f"g{i}", PAYLOAD) for i in range(12)]
    tasks.insert(6, tq.Task("bad", PAYLOAD))
    pool = make_pool(handler, workers=4, db_path=tmp_db)
    records = {record.task_id: record for record in pool.run(tasks)}
    pool.shutdown()
    failed = records.pop("bad")
    assert (failed.status, failed.error_kind, failed.attempts) == ("failed", "permanent", 1)
    assert failed.output is None and "JSON" in failed.error
    assert {(r.status, r.output["ok"]) for r in records.values()} == {
        ("succeeded", f"g{i}") for i in range(12)
    }
    report = inspect_db(Path(tmp_db))
    assert report.states == {"completed": 12, "failed": 1}
    assert "bad" not in report.outputs

    outputs["bad"] = {"ok": "fixed"}
    calls.clear()
    again = make_pool(handler, workers=4, db_path=tmp_db)
    rerun = {record.task_id: record for record in again.run(tasks)}
    assert (rerun["bad"].status, rerun["bad"].output) == ("succeeded", {"ok": "fixed"})
    assert all(rerun[f"g{i}"].status == "duplicate" for i in range(12))
    assert calls == ["bad"]


# --- 7. Security ----------------------------------------------------------------------------------

# Opens a pool under the umask given, keeps it open while it reports the modes of the files.
CHILD_REPORTS_MODES = """
import json, os, stat, sys
os.umask(int(sys.argv[2], 8))
import task_queue_optimized as tq
db = sys.argv[1]
with tq.WorkerPool(lambda task: {"ok": 1}, workers=2, db_path=db) as pool:
    pool.run([tq.Task(f"t{i}") for i in range(5)])
    modes = {suffix: oct(stat.S_IMODE(os.stat(db + suffix).st_mode))
             for suffix in ("", "-wal", "-shm")}
print(json.dumps(modes))
"""


@pytest.mark.parametrize("umask", ["000", "077", "022"])
def test_database_files_are_0600_whatever_the_umask(
    tmp_path: Path, run_python: Callable, umask: str
) -> None:
    """Prove the database, its -wal and its -shm are created 0600 under umask 000, 077 and 022."""
    proc = run_python(CHILD_REPORTS_MODES, str(tmp_path / "secure.db"), umask)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"": "0o600", "-wal": "0o600", "-shm": "0o600"}


FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def _python_sources() -> Iterator[Path]:
    """Yield the project's Python files (not those of virtual environments or caches)."""
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts
        if not any(part.startswith(".") or part in ("build", "dist", "venv") for part in parts):
            yield path


def _forbidden_uses(path: Path) -> list[str]:
    """Return where ``path`` imports a pickle-like module or calls eval, exec or compile."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            names = [node.func.id] if node.func.id in FORBIDDEN_CALLS else []
        else:
            continue
        found += [
            f"{path.name}:{node.lineno}: {name}"
            for name in names
            if name in FORBIDDEN_MODULES or name in FORBIDDEN_CALLS
        ]
    return found


def test_no_pickle_eval_or_exec_anywhere() -> None:
    """Prove no project file imports pickle-like modules or calls eval, exec or compile."""
    sources = list(_python_sources())
    assert SCRIPT in sources
    assert [use for path in sources for use in _forbidden_uses(path)] == []
    text = SCRIPT.read_text(encoding="utf-8")
    assert re.findall(r"\bimport pickle\b|\bfrom pickle\b|\beval\(|\bexec\(", text) == []


@pytest.mark.parametrize(
    "table",
    ["x; DROP TABLE idempotency", "idempotency--", "a b", "1abc", "", "t" * 64, "idem\u00e9"],
)
def test_bad_table_names_are_refused_before_any_sql(tmp_path: Path, table: str) -> None:
    """Prove a table name that is not a plain identifier raises ValueError and creates no file."""
    db = tmp_path / "t.db"
    with pytest.raises(ValueError, match="table"):
        tq.IdempotencyManager(db, table=table)
    assert not db.exists()


# --- 7. Interpreter exit and interrupts ---------------------------------------------------------

# A pool shut down without waiting, with tasks in a retry backoff and one key held by another
# owner (whose 1 s lease then runs out): interpreter exit must finish them all.
CHILD_EXITS_WITH_WAITING_TASKS = """
import sys
import task_queue_optimized as tq
calls = {}
def handler(task):
    calls[task.id] = calls.get(task.id, 0) + 1
    if task.id.startswith("retry") and calls[task.id] == 1:
        raise tq.TransientError("once more")
    return task.id
other = tq.IdempotencyManager(sys.argv[1], lease_seconds=1.0)
assert other.claim("held").state == "claimed"
pool = tq.WorkerPool(handler, workers=2, db_path=sys.argv[1], claim_poll_interval=0.05,
                     retry=tq.RetryPolicy(base_delay=0.3, jitter="none"))
futures = [pool.submit(tq.Task(name)) for name in ("retry-1", "retry-2", "held", "plain")]
pool.shutdown(wait=False)
print("leaving", flush=True)
"""


@pytest.mark.timeout(60)
def test_exit_after_shutdown_without_wait_finishes_waiting_tasks(
    tmp_path: Path, run_python: Callable
) -> None:
    """Tasks waiting out a backoff or another owner's lease are finished at interpreter exit."""
    db = tmp_path / "exit.db"
    proc = run_python(CHILD_EXITS_WITH_WAITING_TASKS, str(db))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    with tq.IdempotencyManager(db) as manager:
        for key in ("retry-1", "retry-2", "held", "plain"):
            assert manager.is_processed(key), key
        assert manager.stats()["in_progress"] == 0


# Two running tasks hold their workers until the parent closes stdin; 500 more wait in the queue.
CHILD_INTERRUPTED_IN_A_WITH_BLOCK = """
import atexit, faulthandler, signal, sys, threading
import task_queue_optimized as tq
faulthandler.register(signal.SIGUSR1, all_threads=True)  # every thread's stack, should it hang
calls = []
def handler(task):
    calls.append(task.id)
    sys.stdout.write(f"started {task.id}\\n")  # one write: lines from two threads never mix
    sys.stdout.flush()
    sys.stdin.read()
    return task.id
atexit.register(lambda: print("calls", len(calls), flush=True))
with tq.WorkerPool(handler, workers=2, queue_size=1000, db_path=sys.argv[1]) as pool:
    futures = [pool.submit(tq.Task(f"t{i:03d}")) for i in range(502)]
    futures[-1].add_done_callback(
        lambda future: print("resolved", future.result().status, flush=True))
    print("submitted", flush=True)
    threading.Event().wait()
"""


# Seven waits of at most WAIT each: a step that never comes fails with its own message (and the
# child's stacks) before the timeout could end the test without them.
@pytest.mark.timeout(WAIT * 7 + 30)
def test_ctrl_c_in_a_with_block_cancels_queued_tasks_and_a_second_one_stops_waiting(
    tmp_path: Path,
) -> None:
    """The first Ctrl-C cancels the queue, the second ends the wait; only running tasks ran."""
    db = tmp_path / "interrupt.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_INTERRUPTED_IN_A_WITH_BLOCK, str(db)],
        cwd=REPO,
        env=child_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = _LineReader(proc.stdout), _LineReader(proc.stderr)
    try:
        assert out.wait_for("submitted"), out.rest(0)
        while "".join(out.lines).count("started") < 2:
            assert out.wait_for("started"), out.rest(0)
        proc.send_signal(signal.SIGINT)
        # The queued tasks are cancelled at once, while the two running ones still run.
        assert out.wait_for("resolved cancelled"), out.rest(0)
        proc.send_signal(signal.SIGINT)
        assert err.wait_for("KeyboardInterrupt"), err.rest(0)
        proc.stdin.close()  # the running handlers return; the interpreter can exit
        proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            # Stuck: have the child write every thread's stack to stderr before it is killed.
            proc.send_signal(signal.SIGUSR1)
            err.wait_for("most recent call first", timeout=5)
            proc.kill()
            proc.wait()
            print("the child's stdout:", out.rest(), "its stderr:", err.rest(), sep="\n")
    assert "calls 2" in out.rest(), out.lines
    with tq.IdempotencyManager(db) as manager:
        stats = manager.stats()
    assert (stats["completed"], stats["in_progress"]) == (2, 0), stats
