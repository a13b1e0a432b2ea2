"""The durable queue on SQLite files: durable pools and the enqueue/worker/status/purge commands.

Worker processes are real (``python task_queue_optimized.py worker``), stopped with real signals;
their handler (tests/store_fixtures.HANDLER_SOURCE) logs every call to a file per process, so a
test can count executions. Progress is observed by polling the database with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.store_fixtures import Launcher
from tests.support import WAIT, one_line_error, wait_until, write_tasks


def status_of(db: Path | str) -> dict[str, Any]:
    """Return `queue_status()` of the store at `db` (opened and closed for this one read)."""
    store = tq.open_store(str(db))
    try:
        return store.queue_status()
    finally:
        store.close()


def done_count(db: Path) -> int:
    return status_of(db)["tasks"]["done"]


def tasks(count: int, prefix: str = "t", **payload: Any) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i:03d}", "payload": dict(payload)} for i in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- enqueue -------------------------------------------------------------------------------------


def test_enqueue_twice_is_idempotent(launcher: Launcher, tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    file = write_tasks(tmp_path / "tasks.json", tasks(5))
    first = launcher.run("enqueue", "--task-file", str(file), "--db", str(db))
    assert first.returncode == 0, first.stderr
    assert "enqueued 5 new tasks (0 were already there)" in first.stdout
    again = launcher.run("enqueue", "--task-file", str(file), "--db", str(db))
    assert again.returncode == 0, again.stderr
    assert "enqueued 0 new tasks (5 were already there)" in again.stdout
    assert status_of(db)["tasks"] == {"queued": 5, "running": 0, "done": 0, "failed": 0}
    more = write_tasks(tmp_path / "more.json", tasks(7))
    second = launcher.run("enqueue", "--task-file", str(more), "--db", str(db))
    assert second.returncode == 0, second.stderr
    assert "enqueued 2 new tasks (5 were already there)" in second.stdout
    assert status_of(db)["tasks"] == {"queued": 7, "running": 0, "done": 0, "failed": 0}
    assert (db.stat().st_mode & 0o777) == 0o600


def test_enqueue_reads_the_database_url_from_tq_db_path(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "env.db"
    file = write_tasks(tmp_path / "tasks.json", tasks(3))
    proc = launcher.run("enqueue", "--task-file", str(file), TQ_DB_PATH=f"sqlite:///{db}")
    assert proc.returncode == 0, proc.stderr
    status = launcher.run("status", "--db", str(db), "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["tasks"]["queued"] == 3


def reject_insert_of(db: Path, task_id: str) -> None:
    """Create the queue in `db` with a trigger that makes the database refuse `task_id`."""
    tq.open_store(str(db)).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON idempotency_tasks "
            f"WHEN NEW.id = '{task_id}' BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"
        )
        conn.commit()


def test_enqueue_is_all_or_nothing_when_the_database_refuses_a_task(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "queue.db"
    reject_insert_of(db, "t-1500")
    file = write_tasks(tmp_path / "tasks.json", tasks(1600))
    line = one_line_error(launcher.run("enqueue", "--task-file", str(file), "--db", str(db)))
    assert "refused by trigger" in line and "nothing was enqueued" in line
    assert status_of(db)["tasks"]["queued"] == 0


def test_enqueue_of_a_known_id_with_another_payload_exits_2_and_writes_nothing(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "queue.db"
    first = write_tasks(tmp_path / "first.json", [{"id": "t-1200", "payload": {"v": 1}}])
    assert launcher.run("enqueue", "--task-file", str(first), "--db", str(db)).returncode == 0
    batch = tasks(1500, v=1)
    batch[1200]["payload"] = {"v": 2}
    file = write_tasks(tmp_path / "tasks.json", batch)
    line = one_line_error(launcher.run("enqueue", "--task-file", str(file), "--db", str(db)))
    assert "'t-1200'" in line and "different payload" in line
    assert status_of(db)["tasks"]["queued"] == 1
    store = tq.open_store(str(db))
    try:
        [item] = store.take_many("w", 10)
    finally:
        store.close()
    assert item.task.payload == {"v": 1}


# --- databases that do not exist -----------------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "purge"])
def test_reading_commands_refuse_a_missing_database_and_create_nothing(
    command: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "typo.db"
    line = one_line_error(launcher.run(command, "--db", str(db), timeout=30))
    assert str(db) in line and "does not exist" in line
    assert not db.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("typo")) == []


@pytest.mark.parametrize("command", ["status", "purge"])
def test_reading_commands_refuse_a_sqlite_file_without_a_queue_and_leave_it_alone(
    command: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.commit()
    before = db.read_bytes()
    line = one_line_error(launcher.run(command, "--db", str(db), timeout=30))
    assert "holds no task queue" in line
    assert db.read_bytes() == before


@pytest.mark.parametrize("db", [":memory:", "sqlite:///:memory:", "memory://"])
@pytest.mark.parametrize("command", ["enqueue", "worker", "status", "purge"])
def test_queue_commands_refuse_an_in_memory_database_and_create_no_file(
    command: str,
    db: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    file = write_tasks(tmp_path / "tasks.json", tasks(1))
    extra = ["--task-file", str(file)] if command == "enqueue" else []
    proc = launcher.run(command, "--db", db, *extra, timeout=30)
    line = one_line_error(proc)
    assert db in line
    assert not (tmp_path / ":memory:").exists()


def test_a_plain_run_and_a_pool_use_memory_for_memory(
    launcher: Launcher,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    file = write_tasks(tmp_path / "tasks.json", tasks(3, latency_ms=0))
    proc = launcher.run("--task-file", str(file), "--db", ":memory:", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["succeeded"] == 3
    with tq.WorkerPool(lambda task: task.id, workers=2, db_path=":memory:") as pool:
        assert [r.status for r in pool.run([tq.Task("a"), tq.Task("a")])] == [
            tq.TaskStatus.SUCCEEDED,
            tq.TaskStatus.DUPLICATE,
        ]
    assert not (tmp_path / ":memory:").exists()


def test_file_uris_are_refused_and_create_no_file(
    launcher: Launcher,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(tq.ConfigError, match="file: URIs"):
        tq.WorkerPool(lambda task: None, db_path="file:queue.db?mode=rwc")
    file = write_tasks(tmp_path / "tasks.json", tasks(1))
    line = one_line_error(launcher.run("--task-file", str(file), "--db", "file:queue.db"))
    assert "file: URIs" in line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("file")) == []


# --- worker --------------------------------------------------------------------------------------


def test_worker_drains_the_queue_and_exits_143_on_sigterm(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "queue.db"
    file = write_tasks(tmp_path / "tasks.json", tasks(40))
    assert launcher.run("enqueue", "--task-file", str(file), "--db", str(db)).returncode == 0
    worker = launcher.worker(str(db), "--name", "w1", "--workers", "4", "--lease-seconds", "3")
    wait_until(lambda: done_count(db) == 40, "40 tasks done", procs=[worker])

    def heartbeat() -> dict[str, Any] | None:
        found = [w for w in status_of(db)["workers"] if w["name"] == "w1"]
        return found[0] if found and found[0].get("succeeded") == 40 else None

    # The heartbeat comes every third of the lease and carries the worker's counters.
    beat = wait_until(heartbeat, "a heartbeat reporting 40 successes", procs=[worker])
    assert beat["pid"] == worker.pid
    assert beat["workers"] == 4
    assert worker.terminate() == 143
    assert "SIGTERM" in worker.stderr()
    snapshot = worker.json()
    assert snapshot["succeeded"] == 40 and snapshot["failed"] == 0
    assert launcher.calls_by_key() == Counter({f"t-{i:03d}": 1 for i in range(40)})
    status = launcher.run("status", "--db", str(db), "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["tasks"] == {"queued": 0, "running": 0, "done": 40, "failed": 0}
    assert report["keys"]["completed"] == 40 and report["keys"]["in_progress"] == 0
    assert [w["name"] for w in report["workers"]] == ["w1"]


def test_sigterm_mid_run_returns_held_tasks_and_a_second_worker_finishes(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "queue.db"
    file = write_tasks(tmp_path / "tasks.json", tasks(30, sleep_ms=200))
    assert launcher.run("enqueue", "--task-file", str(file), "--db", str(db)).returncode == 0
    first = launcher.worker(str(db), "--name", "first", "--workers", "2", "--prefetch", "6")
    wait_until(
        lambda: sum(map(len, launcher.executions().values())) >= 2,
        "two running tasks",
        procs=[first],
    )
    assert first.terminate() == 143
    ran = launcher.calls_by_key()
    snapshot = first.json()
    assert snapshot["cancelled"] >= 1  # it held more tasks than it ran
    status = status_of(db)
    # Running tasks finished; the ones it held but had not started went back to the queue.
    assert status["tasks"] == {"queued": 30 - len(ran), "running": 0, "done": len(ran), "failed": 0}
    assert snapshot["succeeded"] == len(ran)
    second = launcher.worker(str(db), "--name", "second", "--workers", "8")
    wait_until(lambda: done_count(db) == 30, "the second worker to finish", procs=[second])
    assert second.terminate() == 143
    assert launcher.calls_by_key() == Counter({f"t-{i:03d}": 1 for i in range(30)})
    assert second.json()["succeeded"] == 30 - len(ran)


DURABLE_CHILD = """
import sys, threading
import task_queue_optimized as tq

def handler(task):
    threading.Event().wait()  # never returns: the process is killed while it runs

pool = tq.WorkerPool(handler, workers=1, db_path=sys.argv[1], durable=True, lease_seconds=1.0)
pool.submit(tq.Task("durable-1", {"sleep_ms": 1}))
print("submitted", flush=True)
threading.Event().wait()
"""


def test_a_durable_submit_survives_the_death_of_its_process(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "queue.db"
    child = launcher.spawn_python(DURABLE_CHILD, str(db), label="durable child")
    wait_until(lambda: "submitted" in child.stdout(), "submit to return", procs=[child])
    child.kill()
    # The task was in the database when submit returned, though nothing ever finished it.
    assert status_of(db)["tasks"] == {"queued": 0, "running": 1, "done": 0, "failed": 0}
    worker = launcher.worker(str(db), "--lease-seconds", "2")
    wait_until(lambda: done_count(db) == 1, "a worker to finish the orphan", procs=[worker])
    assert worker.terminate() == 143
    assert launcher.calls_by_key() == Counter({"durable-1": 1})
    assert worker.json()["succeeded"] == 1


@pytest.mark.timeout(90)
def test_a_task_that_kills_its_worker_twice_is_failed_as_crashed(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "queue.db"
    never = str(tmp_path / "never-opened")  # the handler waits on this gate: it never returns
    file = write_tasks(
        tmp_path / "tasks.json", [{"id": "deadly", "payload": {"gate": never}}, {"id": "fine"}]
    )
    assert launcher.run("enqueue", "--task-file", str(file), "--db", str(db)).returncode == 0
    flags = ("--lease-seconds", "1", "--max-attempts", "2")
    for crash in range(1, 3):
        worker = launcher.worker(str(db), *flags)
        # The first worker runs "fine" beside "deadly": it dies only once "fine" is recorded
        # done, or a kill between that call and its commit would run "fine" again (rightly).
        wait_until(
            lambda crash=crash: launcher.calls_by_key()["deadly"] == crash and done_count(db) == 1,
            f"run {crash} of the deadly task, and the fine one done",
            procs=[worker],
        )
        worker.kill()
    survivor = launcher.worker(str(db), *flags)
    wait_until(
        lambda: status_of(db)["tasks"]["failed"] == 1 and done_count(db) == 1,
        "the deadly task to be failed as crashed",
        procs=[survivor],
    )
    assert survivor.terminate() == 143
    assert launcher.calls_by_key() == Counter({"deadly": 2, "fine": 1})
    with contextlib.closing(sqlite3.connect(db)) as conn:
        query = "SELECT error FROM idempotency_tasks WHERE id = 'deadly'"
        (error,) = conn.execute(query).fetchone()
    assert error == "crashed: the worker running it died 2 times in a row"
    store = tq.open_store(str(db))
    try:
        # Failed rows are not taken again: nothing is left to run.
        assert store.take_many("w", 5, 2) == []
    finally:
        store.close()


def test_tasks_a_killed_worker_prefetched_but_never_started_are_not_crashed(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    """Only the task running when the worker died counts a crash; its prefetched ones run."""
    db = tmp_path / "queue.db"
    gate = tmp_path / "gate"  # every call waits for it: the first one holds the only worker
    file = write_tasks(tmp_path / "tasks.json", tasks(4, gate=str(gate)))
    assert launcher.run("enqueue", "--task-file", str(file), "--db", str(db)).returncode == 0
    flags = ("--workers", "1", "--prefetch", "4", "--max-attempts", "1", "--lease-seconds", "1")
    worker = launcher.worker(str(db), *flags)
    wait_until(lambda: sum(launcher.calls_by_key().values()) == 1, "a run", procs=[worker])
    wait_until(lambda: status_of(db)["tasks"]["running"] == 4, "all four leased", procs=[worker])
    (started,) = launcher.calls_by_key()
    worker.kill()
    gate.touch()
    survivor = launcher.worker(str(db), *flags)
    wait_until(
        lambda: status_of(db)["tasks"] == {"queued": 0, "running": 0, "done": 3, "failed": 1},
        "the prefetched tasks to run and the crashed one to fail",
        procs=[survivor],
    )
    assert survivor.terminate() == 143
    assert launcher.calls_by_key() == Counter({f"t-{i:03d}": 1 for i in range(4)})
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT id, error FROM idempotency_tasks WHERE state = 'failed'")
        assert rows.fetchall() == [(started, "crashed: the worker running it died once")]


def test_a_row_that_holds_no_task_fails_alone_and_the_worker_runs_the_rest(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    """A row with a NUL in its id (older versions stored such ids) or a broken payload fails on
    its own; the good tasks run, and the worker reports no outage."""
    db = tmp_path / "queue.db"
    file = write_tasks(tmp_path / "tasks.json", tasks(4, "good"))
    assert launcher.run("enqueue", "--task-file", str(file), "--db", str(db)).returncode == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executemany(
            "INSERT INTO idempotency_tasks (id, key, payload, state, attempts, enqueued_at, "
            "updated_at) VALUES (?, ?, ?, 'queued', 0, 0, 0)",
            [("bad\x00id", "bad\x00id", "{}"), ("torn", "torn", '{"a": ')],
        )
        conn.commit()
    worker = launcher.worker(str(db))
    wait_until(
        lambda: status_of(db)["tasks"] == {"queued": 0, "running": 0, "done": 4, "failed": 2},
        "the good tasks to run and the bad rows to fail",
        procs=[worker],
    )
    assert worker.terminate() == 143
    assert launcher.calls_by_key() == Counter({f"good-{i:03d}": 1 for i in range(4)})
    assert "unavailable" not in worker.stderr()
    assert "field 'id' must not contain a NUL character" in worker.stderr()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        errors = dict(
            conn.execute("SELECT id, error FROM idempotency_tasks WHERE state = 'failed'")
        )
    assert errors["torn"].startswith("permanent: the stored task cannot be read: field 'payload'")
    assert errors["bad\x00id"] == (
        "permanent: the stored task cannot be read: field 'id' must not contain a NUL character"
    )


# --- status and purge ----------------------------------------------------------------------------


def legacy_queue(db: Path) -> None:
    """Make `db` a queue whose keys table is from before namespaces, with one finished key."""
    tq.open_store(str(db)).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("DROP TABLE idempotency")
        conn.execute(
            "CREATE TABLE idempotency (key TEXT PRIMARY KEY NOT NULL, state TEXT NOT NULL, "
            "fingerprint TEXT, token INTEGER NOT NULL, output TEXT, error TEXT, "
            "lease_expires REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL) WITHOUT ROWID"
        )
        conn.execute(
            "INSERT INTO idempotency VALUES ('old', 'completed', NULL, 7, '1', NULL, NULL, 0, 0)"
        )
        conn.commit()


def key_columns(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[1] for row in conn.execute("PRAGMA table_info(idempotency)")]


def test_status_leaves_a_database_from_before_namespaces_as_it_is(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "queue.db"
    legacy_queue(db)
    before = db.read_bytes()
    proc = launcher.run("status", "--db", str(db), "--json", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["keys"]["completed"] == 1
    assert "namespace" not in key_columns(db)
    assert db.read_bytes() == before
    # purge deletes what it is asked to, and changes nothing else.
    proc = launcher.run("purge", "--db", str(db), "--older-than", "0", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "purged 1 records" in proc.stdout
    assert "namespace" not in key_columns(db)


LOG_LEVEL_CHILD = """
import logging, sys
import task_queue_optimized as tq
code = tq.main([sys.argv[1], "--db", sys.argv[2], "--log-level", "DEBUG"])
print(code, logging.getLogger().getEffectiveLevel(), flush=True)
"""


@pytest.mark.parametrize("command", ["status", "purge"])
def test_status_and_purge_configure_logging_from_log_level(
    command: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "queue.db"
    tq.open_store(str(db)).close()
    child = launcher.spawn_python(LOG_LEVEL_CHILD, command, str(db), label=command)
    assert child.wait(30) == 0, child.stderr()
    assert child.stdout().splitlines()[-1].split() == ["0", str(logging.DEBUG)]


def test_status_reports_states_oldest_stalled_and_heartbeats(
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "queue.db"
    store = tq.open_store(str(db), lease_seconds=0.3)
    try:
        store.enqueue_many([tq.Task("a"), tq.Task("b"), tq.Task("c"), tq.Task("d")])
        taken = store.take_many("gone", 2)
        store.settle_many([(taken[0].task.id, taken[0].token, tq.EntryState.DONE, None)])
        store.renew_tasks("w-test", {"in_flight": 0, "succeeded": 3})
        wait_until(lambda: store.queue_status()["stalled"] == 1, "the abandoned lease to expire")
    finally:
        store.close()
    proc = launcher.run("status", "--db", str(db), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report) >= {"tasks", "oldest_queued_seconds", "stalled", "workers", "keys"}
    assert report["tasks"] == {"queued": 2, "running": 1, "done": 1, "failed": 0}
    assert isinstance(report["oldest_queued_seconds"], float)
    assert report["oldest_queued_seconds"] >= 0
    assert report["stalled"] == 1
    assert report["keys"] == {"in_progress": 0, "completed": 0, "failed": 0, "total": 0}
    (beat,) = report["workers"]
    assert beat["name"] == "w-test" and beat["succeeded"] == 3
    assert isinstance(beat["seen_seconds_ago"], (int, float))
    text = launcher.run("status", "--db", str(db))
    assert text.returncode == 0, text.stderr
    assert "queued 2" in text.stdout and "running 1" in text.stdout
    assert "stalled claims 1" in text.stdout
    assert "worker w-test" in text.stdout


def test_status_of_an_empty_queue(launcher: Launcher, tmp_path: Path) -> None:
    tq.open_store(str(tmp_path / "new.db")).close()
    proc = launcher.run("status", "--db", str(tmp_path / "new.db"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["tasks"] == {"queued": 0, "running": 0, "done": 0, "failed": 0}
    assert report["oldest_queued_seconds"] is None
    assert report["stalled"] == 0 and report["workers"] == []


def test_purge_deletes_finished_records_only(launcher: Launcher, tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    store = tq.open_store(str(db))
    try:
        store.enqueue_many([tq.Task("a"), tq.Task("b"), tq.Task("c")])
        token = {item.task.id: item.token for item in store.take_many("w", 3)}
        store.settle_many(
            [
                ("a", token["a"], tq.EntryState.DONE, None),
                ("b", token["b"], tq.EntryState.FAILED, "boom"),
                ("c", token["c"], tq.EntryState.QUEUED, None),
            ]
        )
        done, failed, _held = store.claim_many([("a", None), ("b", None), ("held", None)])
        store.complete_many([("a", done.token, "1")])
        store.release_many([("b", failed.token, "boom")])
    finally:
        store.close()
    keep = launcher.run("purge", "--db", str(db))  # default: a week old
    assert keep.returncode == 0, keep.stderr
    assert "purged 0 records" in keep.stdout
    proc = launcher.run("purge", "--db", str(db), "--older-than", "0")
    assert proc.returncode == 0, proc.stderr
    assert "purged 4 records" in proc.stdout  # two keys, two tasks
    report = json.loads(launcher.run("status", "--db", str(db), "--json").stdout)
    assert report["tasks"] == {"queued": 1, "running": 0, "done": 0, "failed": 0}
    assert report["keys"] == {"in_progress": 1, "completed": 0, "failed": 0, "total": 1}


# --- metrics -------------------------------------------------------------------------------------


def test_worker_serves_prometheus_metrics(launcher: Launcher, tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    file = write_tasks(tmp_path / "tasks.json", tasks(5))
    assert launcher.run("enqueue", "--task-file", str(file), "--db", str(db)).returncode == 0
    port = free_port()
    worker = launcher.worker(str(db), "--metrics-port", str(port))
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> tuple[str, str] | None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = response.read().decode()
                kind = response.headers["Content-Type"]
        except OSError:
            return None  # not listening yet
        return (body, kind) if "task_queue_succeeded_total 5" in body.splitlines() else None

    body, kind = wait_until(scrape, "/metrics to report 5 successes", procs=[worker])
    assert kind.startswith("text/plain")
    assert "# TYPE task_queue_succeeded_total counter" in body
    assert "# TYPE task_queue_in_flight gauge" in body
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    assert excinfo.value.code == 404
    assert worker.terminate() == 143


def test_to_prometheus_is_the_text_exposition_format() -> None:
    metrics = tq.MetricsCollector(workers=4, queue_size=10)
    for latency in (0.010, 0.020, 0.030):
        metrics.record_enqueue()
        metrics.record_start(0.001)
        metrics.record_success(latency, latency)
    metrics.record_enqueue()
    metrics.record_start(0.001)
    metrics.record_failure("permanent")
    text = metrics.to_prometheus()
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4, line
        else:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["task_queue_succeeded_total"] == 3
    assert samples["task_queue_failed_total"] == 1
    assert types["task_queue_succeeded_total"] == "counter"
    assert samples["task_queue_workers"] == 4 and types["task_queue_workers"] == "gauge"
    summaries = [name for name, kind in types.items() if kind == "summary"]
    assert "task_queue_latency_seconds" in summaries
    assert samples["task_queue_latency_seconds_count"] == 3  # the failure recorded no latency
    assert samples["task_queue_latency_seconds_sum"] == pytest.approx(0.06, rel=1e-6)
    assert samples['task_queue_latency_seconds{quantile="0.5"}'] == pytest.approx(0.02, rel=0.02)
    for name in samples:
        base = name.split("{")[0]
        family = base.removesuffix("_sum").removesuffix("_count")
        assert base in types or family in types, f"{name} has no # TYPE line"
    assert metrics.to_prometheus(prefix="app").startswith("# HELP app_")


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["enqueue", "worker", "status", "purge"])
def test_a_bad_db_scheme_exits_2_with_one_line(
    command: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    file = write_tasks(tmp_path / "tasks.json", tasks(1))
    extra = ["--task-file", str(file)] if command == "enqueue" else []
    proc = launcher.run(command, "--db", "redis://localhost:6379/0", *extra, timeout=30)
    line = one_line_error(proc)
    assert "redis://localhost:6379/0" in line and "scheme" in line


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:run", "cannot import"),
        ("tq_test_handlers:missing", "cannot import"),
        ("tq_test_handlers", "MODULE:FUNCTION"),
        ("tq_test_handlers:NOT_CALLABLE", "not callable"),
    ],
)
def test_a_bad_handler_exits_2_with_one_line_and_touches_no_database(
    spec: str,
    message: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    db = tmp_path / "untouched.db"
    line = one_line_error(launcher.run("worker", "--db", str(db), "--handler", spec, timeout=30))
    assert spec in line and message in line
    assert not db.exists()


# --- durable pools in process --------------------------------------------------------------------


def test_a_durable_pool_records_every_submission(tmp_path: Path) -> None:
    db = str(tmp_path / "pool.db")

    def handler(task: tq.Task) -> str:
        if task.payload.get("fail"):
            raise tq.PermanentError("refused")
        return task.id

    batch = [tq.Task(f"t{i}") for i in range(6)] + [tq.Task("bad", {"fail": True})]
    with tq.WorkerPool(handler, workers=3, db_path=db, durable=True, namespace="jobs") as pool:
        first = {r.task_id: r.status for r in pool.run(batch)}
    assert first["bad"] is tq.TaskStatus.FAILED
    assert status_of(db)["tasks"] == {"queued": 0, "running": 0, "done": 6, "failed": 1}
    # Another pool of the same namespace: completed keys are duplicates; the failed one runs again.
    with tq.WorkerPool(lambda task: task.id, workers=3, db_path=db, durable=True,
                       namespace="jobs") as pool:  # fmt: skip
        again = {
            r.task_id: r.status for r in pool.run([tq.Task("t0"), tq.Task("bad", {"fail": True})])
        }
    assert again == {"t0": tq.TaskStatus.DUPLICATE, "bad": tq.TaskStatus.SUCCEEDED}
    assert status_of(db)["tasks"] == {"queued": 0, "running": 0, "done": 7, "failed": 0}


def test_a_durable_resubmission_with_another_payload_fails_as_conflict_and_runs_nothing(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "pool.db")
    store = tq.open_store(db)
    try:
        store.enqueue_many([tq.Task("t", {"v": 1})])
    finally:
        store.close()
    calls: list[tq.Task] = []
    with tq.WorkerPool(calls.append, workers=2, db_path=db, durable=True) as pool:
        record = pool.submit(tq.Task("t", {"v": 2})).result(WAIT)
    assert record.status is tq.TaskStatus.FAILED
    assert record.error_kind == "conflict" and "'t'" in (record.error or "")
    assert calls == []
    assert status_of(db)["tasks"] == {"queued": 1, "running": 0, "done": 0, "failed": 0}
    # A worker then runs the task that was stored, with its payload.
    with tq.WorkerPool(calls.append, workers=2, db_path=db, durable=True) as pool:
        stop = threading.Event()
        server = threading.Thread(target=pool.serve, args=(stop,), kwargs={"poll_interval": 0.05})
        server.start()
        try:
            wait_until(lambda: status_of(db)["tasks"]["done"] == 1, "the stored task to run")
        finally:
            stop.set()
            server.join(WAIT)
    assert calls == [tq.Task("t", {"v": 1})]


def test_serve_needs_a_durable_pool() -> None:
    with tq.WorkerPool(lambda task: None, workers=1) as pool, pytest.raises(tq.TaskQueueError):
        pool.serve(threading.Event())


def test_serve_runs_what_others_enqueue_until_stopped(tmp_path: Path) -> None:
    db = str(tmp_path / "serve.db")
    producer = tq.open_store(db)
    seen: list[str] = []
    lock = threading.Lock()

    def handler(task: tq.Task) -> str:
        with lock:
            seen.append(task.id)
        return task.id

    pool = tq.WorkerPool(handler, workers=4, db_path=db, durable=True, worker_name="in-proc")
    stop = threading.Event()
    server = threading.Thread(target=pool.serve, args=(stop,), kwargs={"poll_interval": 0.05})
    server.start()
    try:
        producer.enqueue_many([tq.Task(f"t{i}") for i in range(50)])
        wait_until(lambda: producer.queue_status()["tasks"]["done"] == 50, "50 tasks done")
        producer.enqueue_many([tq.Task("late")])
        wait_until(lambda: producer.queue_status()["tasks"]["done"] == 51, "the late task")
    finally:
        stop.set()
        server.join(WAIT)
        pool.shutdown(wait=True, cancel_pending=True)
        producer.close()
    assert not server.is_alive()
    assert Counter(seen) == Counter([f"t{i}" for i in range(50)] + ["late"])
    assert pool.metrics.snapshot()["succeeded"] == 51


# --- Delays and priorities -----------------------------------------------------------------------


def next_run_at(url: str) -> float | None:
    store = tq.open_store(url)
    try:
        return store.next_run_at()
    finally:
        store.close()


@pytest.mark.timeout(90)
def test_a_delayed_task_survives_a_worker_restart_and_runs_once_due(
    launcher: Launcher, tmp_path: Path, durable_db: str
) -> None:
    file = write_tasks(
        tmp_path / "tasks.json", [{"id": "later", "delay_seconds": 4}, {"id": "now"}]
    )
    # The first worker is up before the tasks arrive, so the delay covers only the enqueue, the
    # ready task's run and the kill, not the worker's start.
    first = launcher.worker(durable_db, handler=store_fixtures.STAMPED_HANDLER)
    wait_until(lambda: "serving" in first.stderr(), "the first worker to serve", procs=[first])
    enqueued = launcher.run("enqueue", "--task-file", str(file), "--db", durable_db)
    assert enqueued.returncode == 0, enqueued.stderr
    due = next_run_at(durable_db)
    assert due is not None
    wait_until(lambda: status_of(durable_db)["tasks"]["done"] == 1, "the ready task", procs=[first])
    first.kill()  # no drain: whatever it held in memory is gone
    assert time.time() < due, "the first worker outlived the delay: the restart proved nothing"
    assert status_of(durable_db)["delayed"] == 1
    assert set(launcher.starts()) == {"now"}
    second = launcher.worker(durable_db, handler=store_fixtures.STAMPED_HANDLER)
    wait_until(
        lambda: status_of(durable_db)["tasks"]["done"] == 2, "the delayed task", procs=[second]
    )
    assert second.terminate() == 143
    (started,) = launcher.starts()["later"]
    assert started >= due  # by the clocks of two processes on one machine
    assert launcher.calls_by_key() == Counter({"now": 1, "later": 1})


@pytest.mark.timeout(60)
def test_a_worker_runs_the_queue_highest_priority_first(
    launcher: Launcher, tmp_path: Path, durable_db: str
) -> None:
    priorities = [0, 5, -3, 1000, 5, -1000, 1, 0]
    rows = [{"id": f"t{i}", "priority": p} for i, p in enumerate(priorities)]
    file = write_tasks(tmp_path / "tasks.json", rows)
    enqueued = launcher.run("enqueue", "--task-file", str(file), "--db", durable_db)
    assert enqueued.returncode == 0, enqueued.stderr
    worker = launcher.worker(durable_db, "--workers", "1")
    wait_until(lambda: done_count_of(durable_db) == len(rows), "every task", procs=[worker])
    assert worker.terminate() == 143
    (calls,) = launcher.executions().values()
    # One enqueue gives the tasks one enqueue time: among equal priorities the order is the
    # store's, so only the priorities' order is checked.
    ran = [priorities[int(task_id[1:])] for task_id, _ in calls]
    assert ran == sorted(priorities, reverse=True)


def done_count_of(url: str) -> int:
    return status_of(url)["tasks"]["done"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("delay_seconds", -1), ("delay_seconds", "soon"), ("priority", 1001), ("priority", True)],
)
def test_enqueue_of_a_bad_delay_or_priority_exits_2_and_creates_no_database(
    launcher: Launcher, tmp_path: Path, field: str, value: Any
) -> None:
    db = tmp_path / "queue.db"
    file = write_tasks(tmp_path / "tasks.json", [{"id": "ok"}, {"id": "bad", field: value}])
    line = one_line_error(launcher.run("enqueue", "--task-file", str(file), "--db", str(db)))
    assert f"task 1: field '{field}' must be " in line
    assert not db.exists()


@pytest.mark.timeout(60)
def test_an_idle_worker_wakes_when_the_earliest_delayed_task_falls_due(
    backend: store_fixtures.Backend,
) -> None:
    """No NOTIFY and no poll: the worker's wait ends at the due time, by its own clock."""
    store = backend.open()
    store.enqueue_many([tq.Task("later")], delay=1.0)  # before the worker listens: unheard
    due = store.next_run_at()
    assert due is not None
    takes: list[float] = []
    take_many = store.take_many

    def counted(*args: Any, **kwargs: Any) -> list[tq.QueuedTask]:
        takes.append(time.time())
        return take_many(*args, **kwargs)

    store.take_many = counted  # type: ignore[method-assign]
    started: dict[str, float] = {}
    ran = threading.Event()

    def handler(task: tq.Task) -> None:
        started[task.id] = time.time()
        ran.set()

    pool = tq.WorkerPool(
        handler, workers=1, idempotency=tq.IdempotencyManager(store=store), durable=True
    )
    stop = threading.Event()
    # A poll interval far past the test's timeout: only the due time can end the idle wait.
    serving = threading.Thread(target=pool.serve, args=(stop,), kwargs={"poll_interval": 600.0})
    serving.start()
    try:
        assert ran.wait(WAIT), "the idle worker slept past the due time"
    finally:
        stop.set()
        serving.join(WAIT)
        pool.shutdown(wait=True)
    assert started["later"] >= due
    # One take before the due time, one at it, one more that finds the queue empty: no loop.
    assert len(takes) <= 4, takes
    assert sum(1 for when in takes if when < due) <= 2, (takes, due)


def test_a_delayed_durable_submission_cancelled_at_shutdown_keeps_its_due_time(
    backend: store_fixtures.Backend,
) -> None:
    mine, other = backend.stores(2)
    calls: list[str] = []
    pool = tq.WorkerPool(
        lambda task: calls.append(task.id),
        workers=1,
        idempotency=tq.IdempotencyManager(store=mine),
        durable=True,
    )
    before = time.time()
    future = pool.submit(tq.Task("later"), delay=1.0, priority=4)
    pool.shutdown(wait=True, cancel_pending=True)  # at once, not in a second
    assert future.result(0).status is tq.TaskStatus.CANCELLED
    assert calls == []
    due = other.next_run_at()
    assert due is not None and due >= before + 1.0
    if time.time() < due:
        assert other.queue_status()["delayed"] == 1
        assert other.take_many("other", 5) == []
    (taken,) = wait_until(lambda: other.take_many("other", 5), "the task to fall due")
    assert time.time() >= due
    assert (taken.task.id, taken.priority) == ("later", 4)


# A tasks table as versions before delays and priorities made it (no priority, no run_at).
LEGACY_SQLITE_TASKS = """CREATE TABLE idempotency_tasks (
    id TEXT PRIMARY KEY NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
    state TEXT NOT NULL, token INTEGER, worker TEXT, lease_expires REAL,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, enqueued_at REAL NOT NULL,
    updated_at REAL NOT NULL) WITHOUT ROWID"""


def task_columns(db: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[1] for row in conn.execute("PRAGMA table_info(idempotency_tasks)")]


def test_a_tasks_table_from_before_delays_is_read_as_is_then_migrated(
    launcher: Launcher, tmp_path: Path
) -> None:
    db = tmp_path / "queue.db"
    tq.open_store(str(db)).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("DROP TABLE idempotency_tasks")
        conn.execute(LEGACY_SQLITE_TASKS)
        conn.execute(
            "CREATE INDEX idempotency_tasks_ready ON idempotency_tasks (state, enqueued_at)"
        )
        conn.executemany(
            "INSERT INTO idempotency_tasks (id, key, payload, state, attempts, enqueued_at, "
            "updated_at) VALUES (?, ?, '{}', 'queued', 0, ?, ?)",
            [("old-2", "old-2", 2.0, 2.0), ("old-1", "old-1", 1.0, 1.0)],
        )
        conn.commit()
    before = db.read_bytes()
    proc = launcher.run("status", "--db", str(db), "--json", timeout=30)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert (status["tasks"]["queued"], status["delayed"]) == (2, 0)
    assert db.read_bytes() == before  # a reader writes nothing
    store = tq.open_store(str(db))  # an opener that may create migrates in place
    try:
        assert {"priority", "run_at"} <= set(task_columns(db))
        store.enqueue_many([tq.Task("new-high")], priority=1)
        store.enqueue_many([tq.Task("new-later")], delay=3600)
        taken = store.take_many("w", 10)
        assert [(item.task.id, item.priority) for item in taken] == [
            ("new-high", 1),
            ("old-1", 0),
            ("old-2", 0),
        ]
        assert store.queue_status()["delayed"] == 1
    finally:
        store.close()


def test_a_tasks_table_from_before_places_is_numbered_in_its_old_order(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    tq.open_store(str(db)).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:  # the layout of the version before
        conn.execute("DROP INDEX idempotency_tasks_next")
        conn.execute("DROP INDEX idempotency_tasks_queue_next")
        conn.execute("DROP TABLE idempotency_tasks_order")
        conn.execute("ALTER TABLE idempotency_tasks DROP COLUMN seq")
        conn.execute(
            "CREATE INDEX idempotency_tasks_take ON idempotency_tasks "
            "(state, priority DESC, (coalesce(run_at, enqueued_at)))"
        )
        conn.execute(
            "CREATE INDEX idempotency_tasks_queue_take ON idempotency_tasks "
            "(state, queue, priority DESC, (coalesce(run_at, enqueued_at)))"
        )
        conn.executemany(  # one enqueue of the old version: one enqueue time
            "INSERT INTO idempotency_tasks (id, key, payload, state, attempts, enqueued_at, "
            "updated_at) VALUES (?, ?, '{}', 'queued', 0, 1.0, 1.0)",
            [("old-c", "old-c"), ("old-a", "old-a"), ("old-b", "old-b")],
        )
        conn.commit()
    store = tq.open_store(str(db))  # a writer numbers the old rows in the order they had
    try:
        store.enqueue_many([tq.Task("new-z"), tq.Task("new-y")])
        taken = [item.task.id for item in store.take_many("w", 10)]
        assert taken == ["old-a", "old-b", "old-c", "new-z", "new-y"]
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"idempotency_tasks_next", "idempotency_tasks_queue_next"} <= indexes
    assert not {"idempotency_tasks_take", "idempotency_tasks_queue_take"} & indexes
