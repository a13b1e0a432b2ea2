"""Operating the durable queue: named queues, failed tasks, retry, cancel, results, status.

The store half runs against every backend (the `backend` fixture: memory://, a SQLite file, a
fresh PostgreSQL schema); the command-line half drives real worker processes with real signals on
a SQLite file and on the real PostgreSQL server, and counts handler calls in the files the test
handler writes (tests/store_fixtures.HANDLER_SOURCE).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.store_fixtures import (
    Backend,
    wait_until,
)

# Fixtures shared with the other store tests (pytest finds them by these module names).
backend = store_fixtures.backend
launcher = store_fixtures.launcher
pg_url = store_fixtures.pg_url

DONE, FAILED, QUEUED = tq.EntryState.DONE, tq.EntryState.FAILED, tq.EntryState.QUEUED
SHORT_LEASE = 0.3  # for the tests that wait for a lease to run out
FAILED_KEYS = {"id", "key", "queue", "attempts", "error_kind", "error", "failed_at"}


def ids(taken: list[Any]) -> list[str]:
    return sorted(item.task.id for item in taken)


def tokens(taken: list[Any]) -> dict[str, int]:
    return {item.task.id: item.token for item in taken}


def fail(store: Any, task_ids: list[str], kind: str = "permanent", calls: int = 0) -> None:
    """Take `task_ids` (and nothing else) and settle each as failed."""
    taken = tokens(store.take_many("w", 100))
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
    store.renew_tasks("gone", {"in_flight": 2, "lease_seconds": SHORT_LEASE})
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
