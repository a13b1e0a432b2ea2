"""Operating the durable queue: named queues, failed tasks, retry, cancel, results, status.

The store half runs against every backend (the `backend` fixture: memory://, a SQLite file, a
fresh PostgreSQL schema); the command-line half drives real worker processes with real signals on
a SQLite file and on the real PostgreSQL server, and counts handler calls in the files the test
handler writes (tests/store_fixtures.HANDLER_SOURCE).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.store_fixtures import Backend, Launcher
from tests.support import one_line_error, wait_until, write_tasks

DONE, FAILED, QUEUED = tq.EntryState.DONE, tq.EntryState.FAILED, tq.EntryState.QUEUED
SHORT_LEASE = 0.3  # for the tests that wait for a lease to run out
FAILED_KEYS = {"id", "key", "queue", "attempts", "error_kind", "error", "failed_at"}


def ids(taken: list[Any]) -> list[str]:
    return sorted(item.task.id for item in taken)


def tokens(taken: list[Any]) -> dict[str, int]:
    return {item.task.id: item.token for item in taken}


def fail(store: Any, task_ids: list[str], kind: str = "permanent", calls: int = 0) -> None:
    """Take `task_ids` (and nothing else) and settle each as failed."""
    taken = tokens(store.take_many("w", 10_000))
    assert set(taken) == set(task_ids), taken
    for task_id in task_ids:
        error = f"{kind}: {task_id} broke"
        assert store.settle_many([(task_id, taken[task_id], FAILED, error, kind, calls)]) == 1


# --- Named queues in the store -------------------------------------------------------------------


def test_a_take_serves_only_the_named_queues(backend: Backend) -> None:
    store = backend.open()
    sent = [
        tq.Task("mail-1", {"to": "a"}, queue="mail"),
        tq.Task("report-1", queue="reports"),
        tq.Task("plain-1"),
        tq.Task("mail-2", queue="mail"),
    ]
    store.enqueue_many(sent)
    taken = store.take_many("w", 10, queues=["mail"])
    assert ids(taken) == ["mail-1", "mail-2"]
    assert {item.task for item in taken} == {sent[0], sent[3]}  # the queue comes back too
    assert store.take_many("w", 10, queues=["nothing-here"]) == []
    rest = store.take_many("w", 10, queues=["reports", "default"])
    assert {item.task.id: item.task.queue for item in rest} == {
        "report-1": "reports",
        "plain-1": "default",
    }


def test_a_worker_of_one_queue_neither_takes_nor_fails_another_queues_expired_rows(
    backend: Backend,
) -> None:
    store = backend.open(lease_seconds=SHORT_LEASE)
    store.enqueue_many([tq.Task("a", queue="qa"), tq.Task("b", queue="qb")])
    taken = tokens(store.take_many("dead", 10))
    for task_id, token in taken.items():  # both runs start, then their worker dies
        store.claim_many([(task_id, None)], "ns", starts=[(task_id, token)])
    wait_until(lambda: store.queue_status()["stalled"] == 2, "both leases to run out")
    # max_crashes=1: a worker of qa fails qa's crashed task, and leaves qb's alone.
    assert store.take_many("w", 10, 1, queues=["qa"]) == []
    assert [t["id"] for t in store.failed_tasks()] == ["a"]
    assert ids(store.take_many("w", 10, queues=["qb"])) == ["b"]


def test_an_id_enqueued_again_in_another_queue_is_a_conflict(backend: Backend) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task("a", queue="one")])
    with pytest.raises(tq.TaskConflictError, match="'a'"):
        store.enqueue_many([tq.Task("a", queue="two")])
    with pytest.raises(tq.TaskConflictError, match="'a'"):
        store.take_task(tq.Task("a", queue="two"), "w")
    assert store.enqueue_many([tq.Task("a", queue="one")]) == 0


def test_queue_status_reports_each_queue(backend: Backend) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task("m1", queue="mail"), tq.Task("m2", queue="mail")])
    store.enqueue_many([tq.Task("r1", queue="reports"), tq.Task("r2", queue="reports")])
    taken = tokens(store.take_many("w", 1, queues=["mail"]))
    assert len(taken) == 1
    report = tokens(store.take_many("w", 2, queues=["reports"]))
    store.settle_many([("r1", report["r1"], DONE, None), ("r2", report["r2"], FAILED, "x")])
    queues = store.queue_status()["queues"]
    assert set(queues) == {"mail", "reports"}
    mail, reports = queues["mail"], queues["reports"]
    age = mail.pop("oldest_waiting_age")
    assert isinstance(age, float) and 0 <= age < 60
    assert mail == {"queued": 1, "delayed": 0, "running": 1, "failed": 0, "done": 0}
    assert reports == {
        "queued": 0,
        "delayed": 0,
        "running": 0,
        "failed": 1,
        "done": 1,
        "oldest_waiting_age": None,
    }


def test_status_tells_a_live_worker_from_a_gone_one_and_counts_its_rows(backend: Backend) -> None:
    store = backend.open(lease_seconds=SHORT_LEASE)
    store.enqueue_many([tq.Task("a"), tq.Task("b"), tq.Task("c")])
    store.take_many("gone", 2)
    # Its heartbeat says 1.5 s: long enough that the next reads see it alive on a busy machine.
    store.renew_tasks("gone", {"in_flight": 2, "lease_seconds": 1.5})
    store.renew_tasks("alive", {"in_flight": 0, "lease_seconds": 3600})

    def workers() -> dict[str, dict[str, Any]]:
        return {w["name"]: w for w in store.queue_status()["workers"]}

    assert workers()["gone"]["alive"] is True  # heard from within its lease
    wait_until(lambda: not workers()["gone"]["alive"], "the heartbeat to be older than the lease")
    found = workers()
    assert found["gone"]["running"] == 2
    assert found["alive"]["alive"] is True and found["alive"]["running"] == 0


# --- Failed tasks, retry, cancel -----------------------------------------------------------------


def test_failed_tasks_lists_newest_first_with_every_field(backend: Backend) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task("a", idempotency_key="K-a", queue="q1")])
    fail(store, ["a"], "transient", calls=2)
    time.sleep(0.01)  # distinct failure times, so "newest first" has one answer
    store.enqueue_many([tq.Task("b"), tq.Task("c", queue="q1")])
    fail(store, ["b", "c"])
    listed = store.failed_tasks()
    assert [row["id"] for row in listed] == ["c", "b", "a"]  # the newest failure first
    assert all(set(row) == FAILED_KEYS for row in listed)
    first = next(row for row in listed if row["id"] == "a")
    assert first["key"] == "K-a" and first["queue"] == "q1"
    assert first["error_kind"] == "transient" and first["error"] == "transient: a broke"
    assert first["attempts"] == 2  # the settled run's retries; its start was never counted here
    assert isinstance(first["failed_at"], float) and abs(first["failed_at"] - time.time()) < 60
    assert [row["id"] for row in store.failed_tasks(queue="q1")][-1] == "a"
    assert {row["id"] for row in store.failed_tasks(queue="q1")} == {"a", "c"}
    assert len(store.failed_tasks(limit=1)) == 1
    assert store.failed_tasks(queue="nowhere") == []


def test_retry_tasks_requeues_failed_tasks_with_fresh_attempts(backend: Backend) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task("a", queue="q1"), tq.Task("b", queue="q2"), tq.Task("c")])
    fail(store, ["a", "b", "c"], calls=2)
    assert store.retry_tasks(["a", "missing", "a"]) == 1
    assert store.task_states(["a", "b", "missing"]) == {"a": "queued", "b": "failed"}
    assert store.retry_tasks(["a"]) == 0  # queued now, not failed
    assert store.retry_tasks(queue="q2") == 1
    assert store.retry_tasks() == 1  # the last one, c
    assert store.failed_tasks() == []
    taken = store.take_many("w", 10)
    assert ids(taken) == ["a", "b", "c"]
    # Fresh attempts: a settled run now counts only its own calls.
    store.settle_many([("a", tokens(taken)["a"], FAILED, "again", "permanent", 0)])
    (row,) = store.failed_tasks()
    assert row["attempts"] == 0 and row["error"] == "again"


def test_cancel_tasks_withdraws_queued_tasks_only(backend: Backend) -> None:
    store = backend.open()
    names = ["queued", "running", "done", "failed"]
    store.enqueue_many([tq.Task(name) for name in names])
    token = {name: store.take_task(tq.Task(name), "w") for name in names[1:]}
    store.settle_many(
        [("done", token["done"], DONE, None), ("failed", token["failed"], FAILED, "x")]
    )
    assert store.cancel_tasks([*names, "missing", "queued"]) == 1
    assert store.task_states(names) == {"running": "running", "done": "done", "failed": "failed"}
    assert store.cancel_tasks([]) == 0
    # A withdrawn id is free again: enqueueing it adds it anew.
    assert store.enqueue_many([tq.Task("queued")]) == 1


def test_task_states_answers_for_the_ids_that_exist(backend: Backend) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task("a"), tq.Task("b")])
    assert store.task_states(["a", "zzz"]) == {"a": "queued"}
    assert store.task_states([]) == {}


def test_purge_never_touches_queued_or_running_rows(backend: Backend) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task(name) for name in ("queued", "running", "done", "failed")])
    taken = tokens(store.take_many("w", 10))
    store.settle_many(
        [
            ("queued", taken["queued"], QUEUED, None),
            ("done", taken["done"], DONE, None),
            ("failed", taken["failed"], FAILED, "boom"),
        ]
    )
    assert store.purge_expired(older_than=0) == 2
    assert store.task_states(["queued", "running", "done", "failed"]) == {
        "queued": "queued",
        "running": "running",
    }


def test_a_crashed_task_is_failed_with_the_kind_crashed(backend: Backend) -> None:
    store = backend.open(lease_seconds=SHORT_LEASE)
    store.enqueue_many([tq.Task("deadly")])
    (item,) = store.take_many("dead", 1, 1)
    store.claim_many([("deadly", None)], "ns", starts=[("deadly", item.token)])
    wait_until(lambda: store.queue_status()["stalled"] == 1, "the lease to run out")
    assert store.take_many("w", 5, 1) == []
    (row,) = store.failed_tasks()
    assert row["error_kind"] == "crashed" and row["attempts"] == 1
    assert row["error"] == "crashed: the worker running it died once"


# --- Attempts count handler calls ----------------------------------------------------------------


class FlakyOnce:
    """Fails each task's first call with a transient error, then succeeds."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, task: tq.Task) -> dict[str, str]:
        self.calls[task.id] += 1
        if self.calls[task.id] == 1:
            raise tq.TransientError("first call fails")
        return {"id": task.id}


def test_a_durable_rows_attempts_and_the_keys_count_handler_calls(backend: Backend) -> None:
    store = backend.open()
    handler = FlakyOnce()
    manager = tq.IdempotencyManager(store=store)
    retry = tq.RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.001)
    pool = tq.WorkerPool(handler, workers=2, idempotency=manager, durable=True, retry=retry)
    with pool:
        record = pool.submit(tq.Task("flaky")).result(timeout=20)
        doomed = pool.submit(tq.Task("doomed", {"x": 1})).result(timeout=20)
    assert record.status == tq.TaskStatus.SUCCEEDED and record.attempts == 2
    assert doomed.status == tq.TaskStatus.SUCCEEDED  # FlakyOnce: the second call succeeds
    state = manager.get("flaky")
    assert isinstance(state, tq.KeyState)
    assert (state.state, state.output, state.attempts) == ("completed", {"id": "flaky"}, 2)
    assert state.namespace == pool.namespace and state.error is None
    assert isinstance(state.updated_at, float)
    assert manager.get("never-seen") is None
    # The durable row counts the same two calls.
    always = tq.WorkerPool(
        lambda task: (_ for _ in ()).throw(tq.TransientError("down")),
        workers=1,
        idempotency=manager,
        durable=True,
        retry=retry,
        namespace="always",
    )
    with always:
        failed = always.submit(tq.Task("down")).result(timeout=20)
    assert failed.status == tq.TaskStatus.FAILED and failed.attempts == 3
    (row,) = store.failed_tasks()
    assert (row["id"], row["attempts"], row["error_kind"]) == ("down", 3, "transient")
    key = manager.get("down", namespace="always")
    assert (key.state, key.attempts) == ("failed", 3)
    assert "down" in key.error


# --- Databases from before named queues ----------------------------------------------------------

OLD_TASKS_SQLITE = """CREATE TABLE idempotency_tasks (
    id TEXT PRIMARY KEY NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
    state TEXT NOT NULL, token INTEGER, worker TEXT, lease_expires REAL,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, enqueued_at REAL NOT NULL,
    updated_at REAL NOT NULL) WITHOUT ROWID"""
OLD_KEYS_SQLITE = """CREATE TABLE idempotency (
    key TEXT NOT NULL, namespace TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
    fingerprint TEXT, token INTEGER NOT NULL, output TEXT, error TEXT, lease_expires REAL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (key, namespace)) WITHOUT ROWID"""


def old_sqlite_queue(db: Path) -> None:
    """Write a queue file as the version before named queues left it: one queued, one failed."""
    now = time.time()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(OLD_KEYS_SQLITE)
        conn.execute(OLD_TASKS_SQLITE)
        conn.execute(
            "CREATE INDEX idempotency_tasks_ready ON idempotency_tasks (state, enqueued_at)"
        )
        conn.execute(
            "CREATE TABLE idempotency_workers (name TEXT PRIMARY KEY NOT NULL, info TEXT NOT NULL,"
            " started_at REAL NOT NULL, seen_at REAL NOT NULL) WITHOUT ROWID"
        )
        conn.execute(
            "INSERT INTO idempotency VALUES ('old-key', 'ns', 'completed', NULL, 7, '1', NULL,"
            " NULL, ?, ?)",
            (now, now),
        )
        conn.executemany(
            "INSERT INTO idempotency_tasks (id, key, payload, state, attempts, error,"
            " enqueued_at, updated_at) VALUES (?, ?, '{}', ?, 1, ?, ?, ?)",
            [
                ("old-q", "old-q", "queued", None, now, now),
                ("old-f", "old-f", "failed", "x", now, now),
            ],
        )
        conn.commit()


def columns(db: Path, table: str) -> set[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def test_an_old_sqlite_queue_is_read_as_it_is_and_upgraded_by_a_writer(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old_sqlite_queue(db)
    before = db.read_bytes()
    reader = tq.open_store(str(db), create=False)
    try:
        assert reader.queue_status()["queues"]["default"]["queued"] == 1
        (row,) = reader.failed_tasks()
        assert (row["id"], row["queue"], row["error_kind"]) == ("old-f", "default", None)
        assert reader.lookup("old-key")["attempts"] == 0
    finally:
        reader.close()
    assert db.read_bytes() == before and "queue" not in columns(db, "idempotency_tasks")
    writer = tq.open_store(str(db))
    try:
        assert {"queue", "error_kind"} <= columns(db, "idempotency_tasks")
        assert "attempts" in columns(db, "idempotency")
        assert writer.retry_tasks(["old-f"]) == 1
        taken = writer.take_many("w", 10, queues=["default"])
        assert {(item.task.id, item.task.queue) for item in taken} == {
            ("old-f", "default"),
            ("old-q", "default"),
        }
    finally:
        writer.close()


def test_an_old_postgres_schema_is_read_as_it_is_and_upgraded_by_a_writer(pg_url: str) -> None:
    store = tq.open_store(pg_url)
    store.enqueue_many([tq.Task("old-q"), tq.Task("old-f")])
    store.close()
    schema = store_fixtures.schema_of(pg_url)
    for ddl in (
        f"ALTER TABLE {schema}.tasks DROP COLUMN queue",
        f"ALTER TABLE {schema}.tasks DROP COLUMN error_kind",
        f"ALTER TABLE {schema}.idempotency DROP COLUMN attempts",
        f"UPDATE {schema}.tasks SET state = 'failed', error = 'x' WHERE id = 'old-f'",
    ):
        store_fixtures.pg_execute(ddl)

    def task_columns() -> set[str]:
        rows = store_fixtures.pg_rows(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'tasks'",
            (schema,),
        )
        return {name for (name,) in rows}

    reader = tq.open_store(pg_url, create=False)
    try:
        default = reader.queue_status()["queues"]["default"]
        assert isinstance(default.pop("oldest_waiting_age"), float)
        assert default == {"queued": 1, "delayed": 0, "running": 0, "failed": 1, "done": 0}
        (row,) = reader.failed_tasks()
        assert (row["id"], row["queue"], row["error_kind"]) == ("old-f", "default", None)
    finally:
        reader.close()
    assert "queue" not in task_columns()
    writer = tq.open_store(pg_url)
    try:
        assert {"queue", "error_kind"} <= task_columns()
        assert writer.retry_tasks() == 1
        assert ids(writer.take_many("w", 10, queues=["default"])) == ["old-f", "old-q"]
    finally:
        writer.close()


# --- The command line, on SQLite and on PostgreSQL -----------------------------------------------


def run_json(launcher: Launcher, *args: str) -> tuple[int, Any]:
    proc = launcher.run(*args, "--json")
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON from {args}: {proc.stdout!r} {proc.stderr!r}") from None


def states(db: str, *task_ids: str) -> dict[str, str]:
    store = tq.open_store(db)
    try:
        return store.task_states(list(task_ids))
    finally:
        store.close()


def queue_status(db: str) -> dict[str, Any]:
    store = tq.open_store(db)
    try:
        return store.queue_status()
    finally:
        store.close()


def enqueue(
    launcher: Launcher, db: str, path: Path, tasks: list[dict[str, Any]], *args: str
) -> None:
    proc = launcher.run("enqueue", "--task-file", str(write_tasks(path, tasks)), "--db", db, *args)
    assert proc.returncode == 0, proc.stderr


def test_workers_take_only_their_queues(
    launcher: Launcher, tmp_path: Path, durable_db: str
) -> None:
    tasks = [
        {"id": "mail-1"},
        {"id": "mail-2"},
        {"id": "report-1", "queue": "reports"},  # the file's own field wins over --queue
        {"id": "other-1", "queue": "other"},
    ]
    enqueue(launcher, durable_db, tmp_path / "tasks.json", tasks, "--queue", "mail")
    code, report = run_json(launcher, "status", "--db", durable_db)
    assert code == 0
    assert {name: q["queued"] for name, q in report["queues"].items()} == {
        "mail": 2,
        "other": 1,
        "reports": 1,
    }
    worker = launcher.worker(durable_db, "--queues", "mail,reports", "--name", "mr")
    wait_until(
        lambda: (
            states(durable_db, "mail-1", "mail-2", "report-1")
            == dict.fromkeys(("mail-1", "mail-2", "report-1"), "done")
        ),
        "the mail and report tasks to be done",
        procs=[worker],
    )
    code, report = run_json(launcher, "status", "--db", durable_db)
    (beat,) = report["workers"]
    assert beat["queues"] == ["mail", "reports"] and beat["alive"] is True
    assert report["queues"]["other"]["queued"] == 1  # never taken by that worker
    assert worker.terminate() == 143
    assert "serving queues mail, reports" in worker.stderr()
    everything = launcher.worker(durable_db)
    wait_until(
        lambda: states(durable_db, "other-1") == {"other-1": "done"}, "the rest", procs=[everything]
    )
    assert everything.terminate() == 143
    assert launcher.calls_by_key() == Counter(
        dict.fromkeys(("mail-1", "mail-2", "report-1", "other-1"), 1)
    )


@pytest.mark.timeout(120)
def test_a_task_whose_worker_was_killed_is_retried_from_failed_and_completes_once(
    launcher: Launcher, tmp_path: Path, durable_db: str
) -> None:
    gate = tmp_path / "gate"  # the handler waits for it: the first run never returns
    enqueue(
        launcher,
        durable_db,
        tmp_path / "tasks.json",
        [{"id": "job", "payload": {"gate": str(gate)}}],
    )
    flags = ("--max-attempts", "1", "--lease-seconds", "1")
    doomed = launcher.worker(durable_db, *flags, "--name", "doomed")
    wait_until(lambda: launcher.calls_by_key()["job"] == 1, "the run to start", procs=[doomed])
    doomed.kill()
    # status shows the killed worker as gone, and what becomes of its task. (The store is polled
    # in process; the command line is run once it answers.)
    wait_until(
        lambda: not queue_status(durable_db)["workers"][0]["alive"],
        "the killed worker's heartbeat to outlive its lease",
    )
    code, report = run_json(launcher, "status", "--db", durable_db)
    assert code == 0 and not report["workers"][0]["alive"], report
    text = launcher.run("status", "--db", durable_db)
    assert "worker doomed" in text.stdout and "gone" in text.stdout
    assert "its 1 running task returns to the queue when the leases expire" in text.stdout
    survivor = launcher.worker(durable_db, *flags, "--name", "survivor")
    wait_until(
        lambda: queue_status(durable_db)["tasks"]["failed"] == 1,
        "the crash to be failed",
        procs=[survivor],
    )
    code, failed = run_json(launcher, "failed", "--db", durable_db)
    assert code == 0
    (row,) = failed
    assert set(row) == FAILED_KEYS
    assert row["id"] == "job" and row["key"] == "job" and row["queue"] == "default"
    assert row["error_kind"] == "crashed" and row["attempts"] == 1
    assert row["error"] == "crashed: the worker running it died once"
    assert isinstance(row["failed_at"], float) and abs(row["failed_at"] - time.time()) < 120
    text = launcher.run("failed", "--db", durable_db)
    assert text.returncode == 0 and "job" in text.stdout and "crashed" in text.stdout
    code, key = run_json(launcher, "result", "job", "--db", durable_db)
    assert code == 3 and key["state"] == "in_progress"  # the dead run's claim, never finished
    gate.touch()
    retried = launcher.run("retry", "job", "--db", durable_db)
    assert retried.returncode == 0, retried.stderr
    assert "retried 1 failed task: back in its queue" in retried.stdout
    wait_until(
        lambda: states(durable_db, "job") == {"job": "done"}, "the retried run", procs=[survivor]
    )
    assert survivor.terminate() == 143
    assert launcher.calls_by_key() == Counter(
        {"job": 2}
    )  # the killed call, then one that completed
    code, key = run_json(launcher, "result", "job", "--db", durable_db)
    assert code == 0
    assert key == {
        "key": "job",
        "state": "completed",
        "output": {"id": "job"},
        "error": None,
        "attempts": 2,
        "updated_at": key["updated_at"],
        "namespace": "tq_test_handlers.record",
    }
    assert isinstance(key["updated_at"], float)
    assert run_json(launcher, "failed", "--db", durable_db) == (0, [])


def test_cancel_lets_a_running_task_finish_and_removes_a_queued_one(
    launcher: Launcher, tmp_path: Path, durable_db: str
) -> None:
    gate = tmp_path / "gate"
    enqueue(
        launcher, durable_db, tmp_path / "a.json", [{"id": "slow", "payload": {"gate": str(gate)}}]
    )
    enqueue(launcher, durable_db, tmp_path / "b.json", [{"id": "waiting"}])  # enqueued later
    worker = launcher.worker(durable_db, "--workers", "1", "--prefetch", "1")
    wait_until(lambda: launcher.calls_by_key()["slow"] == 1, "the slow task to run", procs=[worker])
    assert states(durable_db, "slow", "waiting") == {"slow": "running", "waiting": "queued"}
    code, outcome = run_json(launcher, "cancel", "slow", "waiting", "missing", "--db", durable_db)
    assert code == 1
    assert outcome == {
        "cancelled": ["waiting"],
        "running": ["slow"],
        "finished": {},
        "not_found": ["missing"],
    }
    text = launcher.run("cancel", "slow", "--db", durable_db)
    assert text.returncode == 1 and "slow is running; it finishes" in text.stderr
    gate.touch()
    wait_until(
        lambda: states(durable_db, "slow") == {"slow": "done"},
        "the slow task to finish",
        procs=[worker],
    )
    assert worker.terminate() == 143
    assert launcher.calls_by_key() == Counter({"slow": 1})  # the cancelled one never ran
    assert states(durable_db, "waiting") == {}
    done = launcher.run("cancel", "slow", "--db", durable_db)
    assert done.returncode == 1 and "slow has finished (done)" in done.stderr


def test_result_answers_by_exit_code(launcher: Launcher, durable_db: str) -> None:
    manager = tq.IdempotencyManager(durable_db)
    try:
        manager.mark_processed("done-key", {"n": 1})
        failed = manager.claim("failed-key")
        manager.release("failed-key", failed.token, "it broke")
        manager.claim("running-key")
    finally:
        manager.close()
    text = launcher.run("result", "done-key", "--db", durable_db)
    assert text.returncode == 0 and text.stdout.splitlines()[-1] == '{"n": 1}'
    code, failed_state = run_json(launcher, "result", "failed-key", "--db", durable_db)
    assert code == 1 and failed_state["state"] == "failed" and failed_state["error"] == "it broke"
    assert failed_state["attempts"] == 1
    assert run_json(launcher, "result", "running-key", "--db", durable_db)[0] == 3
    code, unknown = run_json(launcher, "result", "nobody", "--db", durable_db)
    assert code == 3 and unknown["state"] == "unknown" and unknown["output"] is None


BAD_INPUT = [
    (["enqueue", "--task-file", "tasks.json", "--queue", "two words"], "--queue must be printable"),
    (
        ["enqueue", "--task-file", "tasks.json", "--queue", "a,b"],
        "--queue must not contain a comma",
    ),
    (["worker", "--queues", "a,,b"], "--queues: expected queue names separated by commas"),
    (["worker", "--queues", ""], "--queues: expected queue names"),
    (["failed", "--limit", "0"], "--limit: expected an integer >= 1"),
    (["failed", "--limit", "many"], "--limit: expected an integer >= 1"),
    (["failed", "--queue", "x y"], "--queue must be printable"),
    (["failed", "--jsn"], "unrecognized arguments: --jsn"),
    (["retry"], "nothing to retry: give the ids of failed tasks, or --all"),
    (["retry", "t-1", "--all"], "give the ids of failed tasks or --all, not both"),
    (["retry", "t-1", "--queue", "q"], "--queue goes with --all"),
    (["retry", "--all", "--queue", ""], "--queue must be a non-empty string"),
    (["retry", ""], "task id: a task id must be a non-empty string"),
    (["cancel"], "the following arguments are required: ID"),
    (["cancel", ""], "task id: a task id must be a non-empty string"),
    (["result"], "the following arguments are required: KEY"),
    (["result", ""], "idempotency key '' must be a non-empty string"),
    (["result", "k", "--namespace", " "], "--namespace must be a non-empty printable string"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(
    launcher: Launcher, tmp_path: Path, argv: list[str], message: str
) -> None:
    db = tmp_path / "queue.db"
    write_tasks(tmp_path / "tasks.json", [{"id": "t-1"}])
    store = tq.open_store(str(db))
    store.enqueue_many([tq.Task("t-1")])
    store.close()
    before = db.read_bytes()
    line = one_line_error(launcher.run(*argv, "--db", str(db)))
    assert message in line
    assert db.read_bytes() == before


@pytest.mark.parametrize(
    "command", [["failed"], ["retry", "--all"], ["cancel", "t"], ["result", "k"]]
)
def test_operating_commands_never_create_a_database(
    launcher: Launcher, tmp_path: Path, command: list[str]
) -> None:
    line = one_line_error(launcher.run(*command, "--db", str(tmp_path / "none.db")))
    assert "does not exist" in line
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda store: store.failed_tasks(limit=0), "limit must be a positive integer"),
        (lambda store: store.failed_tasks(queue="a,b"), "queue must not contain a comma"),
        (lambda store: store.retry_tasks("t-1"), "must be a list of task ids"),
        (lambda store: store.retry_tasks(["t-1", ""]), "a task id must be a non-empty string"),
        (lambda store: store.retry_tasks(None, queue=" "), "queue must be printable"),
        (lambda store: store.cancel_tasks(["t\x00"]), "must not contain a NUL character"),
        (lambda store: store.task_states([3]), "a task id must be a non-empty string"),
    ],
)
def test_operations_refuse_bad_arguments_before_touching_the_store(
    backend: Backend, call: Any, message: str
) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task("t-1")])
    fail(store, ["t-1"])
    with pytest.raises(ValueError, match=message):
        call(store)
    assert [row["id"] for row in store.failed_tasks()] == ["t-1"]


def test_operations_by_id_take_any_number_of_ids_in_one_call(backend: Backend) -> None:
    store = backend.open()
    names = [f"t-{i:04d}" for i in range(1500)]
    store.enqueue_many([tq.Task(name) for name in names])
    assert len(store.task_states([*names, "missing"])) == 1500
    assert store.cancel_tasks(names[:1000]) == 1000
    fail(store, names[1000:])
    assert store.retry_tasks([*names, "missing"]) == 500
    assert set(store.task_states(names).values()) == {"queued"}


def test_a_task_file_names_its_queue_and_a_bad_one_is_refused_naming_it(tmp_path: Path) -> None:
    good = write_tasks(
        tmp_path / "good.json",
        [{"id": "a", "queue": "mail"}, {"id": "b"}, {"id": "c", "queue": None}],
    )
    assert [task.queue for task in tq.load_tasks(good)] == ["mail", "default", "default"]
    assert [task.queue for task in tq.load_tasks(good, queue="bulk")] == ["mail", "bulk", "bulk"]
    for bad, problem in [
        ("", "non-empty"),
        ("a b", "without whitespace"),
        ("x,y", "comma"),
        (7, "string"),
    ]:
        path = write_tasks(tmp_path / "bad.json", [{"id": "a"}, {"id": "b", "queue": bad}])
        with pytest.raises(tq.TaskFileError, match=problem) as caught:
            tq.load_tasks(path)
        assert caught.value.index == 1 and caught.value.field == "queue"
    with pytest.raises(ValueError, match="queues must be a list of queue names"):
        tq.WorkerPool(lambda task: None, queues="mail")
    with pytest.raises(ValueError, match="queues must name at least one queue"):
        tq.WorkerPool(lambda task: None, queues=[])


def test_delayed_tasks_are_counted_apart_never_purged_cancelled_and_retried_at_once(
    backend: Backend,
) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task("later", queue="q"), tq.Task("now", queue="q")], delay=[3600, 0])
    store.enqueue_many([tq.Task("doomed", queue="q")], delay=3600)
    queue = store.queue_status()["queues"]["q"]
    assert (queue["queued"], queue["delayed"]) == (1, 2)
    assert store.queue_status()["delayed"] == 2
    assert store.purge_expired(older_than=0) == 0  # a delayed row is never purged
    assert store.cancel_tasks(["later"]) == 1  # withdrawn before it is due
    assert store.task_states(["later", "now", "doomed"]) == {"now": "queued", "doomed": "queued"}
    # A delayed task that failed (say, run early by a durable submit) is retried ready at once.
    token = store.take_task(tq.Task("doomed", queue="q"), "w", delay=3600)
    store.settle_many([("doomed", token, FAILED, "boom", "permanent", 0)])
    assert store.retry_tasks(["doomed"]) == 1
    assert ids(store.take_many("w", 10, queues=["q"])) == ["doomed", "now"]
