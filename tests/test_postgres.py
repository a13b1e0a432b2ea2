"""Scale-out on a real PostgreSQL server: worker processes sharing one durable queue.

Each test runs in a fresh schema (the `pg_url` fixture) on the server named by
``TQ_TEST_POSTGRES_DSN``; without a server the tests skip, or fail under ``TQ_REQUIRE_POSTGRES=1``.
Workers are real processes (``task_queue_optimized.py worker``) killed and stopped with real
signals; their handler logs every call per process, so a test can count executions, and the
workers' ``--json`` summaries count successful completions. Progress is observed by polling the
database with deadlines; no test asserts a wall time.
"""

from __future__ import annotations

import json
import re
import signal
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.store_fixtures import Launcher, listening, pg_rows, restart_postgres, schema_of
from tests.support import REPO, WAIT, one_line_error, wait_until, write_tasks


class Probe:
    """A store the test polls; it reconnects by itself across a server restart."""

    def __init__(self, url: str) -> None:
        self.store = tq.open_store(url)

    def done(self) -> int:
        return self.store.queue_status()["tasks"]["done"]

    def close(self) -> None:
        self.store.close()


def enqueue(launcher: Launcher, url: str, path: Path, tasks: list[dict[str, Any]]) -> None:
    proc = launcher.run("enqueue", "--task-file", str(write_tasks(path, tasks)), "--db", url)
    assert proc.returncode == 0, proc.stderr
    assert f"enqueued {len(tasks)} new tasks" in proc.stdout


def stop_all(workers: list[Any]) -> list[dict[str, Any]]:
    """SIGTERM every worker, check each exits 143, and return their --json summaries."""
    for worker in workers:
        worker.signal(signal.SIGTERM)
    for worker in workers:
        assert worker.wait() == 143, worker.stderr()[-3000:]
    return [worker.json() for worker in workers]


# --- Many workers, one queue ----------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_four_workers_share_20000_tasks_and_complete_each_key_once(
    pg_url: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    count = 20_000
    keys = {f"t{i:05d}" for i in range(count)}
    enqueue(launcher, pg_url, tmp_path / "tasks.json", [{"id": key} for key in sorted(keys)])
    workers = [launcher.worker(pg_url, "--name", f"w{i}", "--workers", "8") for i in range(4)]
    probe = Probe(pg_url)
    try:
        wait_until(lambda: probe.done() == count, f"{count} tasks done", 150, 0.5, workers)
        status = probe.store.queue_status()
        keys_status = probe.store.stats()
    finally:
        probe.close()
    summaries = stop_all(workers)
    assert status["tasks"] == {"queued": 0, "running": 0, "done": count, "failed": 0}
    assert {w["name"] for w in status["workers"]} == {"w0", "w1", "w2", "w3"}
    assert keys_status == {"in_progress": 0, "completed": count, "failed": 0, "total": count}
    # Each key's handler ran once, and each key was completed once (a success is a completion).
    calls = launcher.calls_by_key()
    assert set(calls) == keys
    assert max(calls.values()) == 1
    assert sum(s["succeeded"] for s in summaries) == count
    assert sum(s["duplicates"] + s["failed"] for s in summaries) == 0
    assert all(s["succeeded"] > 0 for s in summaries), "a worker got no share of the work"


@pytest.mark.timeout(150)
def test_a_sigkilled_workers_tasks_are_finished_by_the_others_after_the_lease(
    pg_url: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    count = 3000
    keys = {f"t{i:04d}" for i in range(count)}
    tasks = [{"id": key, "payload": {"sleep_ms": 2}} for key in sorted(keys)]
    enqueue(launcher, pg_url, tmp_path / "tasks.json", tasks)
    lease = ["--lease-seconds", "2"]
    workers = [
        launcher.worker(pg_url, "--name", f"w{i}", "--workers", "8", *lease) for i in range(3)
    ]
    victim, survivors = workers[0], workers[1:]
    wait_until(
        lambda: len(launcher.executions().get(victim.pid, [])) >= 100,
        "the victim to get going",
        procs=workers,
    )
    victim.signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    schema = schema_of(pg_url)
    held = {
        row[0]
        for row in pg_rows(
            f"SELECT id FROM {schema}.tasks WHERE state = 'running' AND worker = 'w0'"
        )
    }
    assert held, "the killed worker held no task"
    probe = Probe(pg_url)
    try:
        wait_until(lambda: probe.done() == count, "every task done", 90, 0.2, survivors)
        keys_status = probe.store.stats()
        status = probe.store.queue_status()
    finally:
        probe.close()
    summaries = stop_all(survivors)
    assert status["tasks"] == {"queued": 0, "running": 0, "done": count, "failed": 0}
    assert keys_status == {"in_progress": 0, "completed": count, "failed": 0, "total": count}
    # The tasks the victim held were taken over once their lease ran out.
    rows = pg_rows(f"SELECT state, worker FROM {schema}.tasks WHERE id = ANY(%s)", (list(held),))
    assert {state for state, _ in rows} == {"done"}
    assert {worker for _, worker in rows} <= {"w1", "w2"}
    # Nothing lost, nothing completed twice. A call the victim made without completing its key
    # runs again on a survivor (the victim held that task); survivors never repeat each other.
    executions = launcher.executions()
    victim_keys = {key for _, key in executions.get(victim.pid, [])}
    survivor_calls = Counter(
        key for pid, calls in executions.items() if pid != victim.pid for _, key in calls
    )
    assert set(survivor_calls) | victim_keys == keys
    assert max(survivor_calls.values()) == 1
    rerun = victim_keys & set(survivor_calls)
    assert rerun <= held
    completed_by_victim = len(victim_keys) - len(rerun)
    assert sum(s["succeeded"] for s in summaries) == count - completed_by_victim
    assert sum(s["failed"] for s in summaries) == 0


@pytest.mark.timeout(180)
def test_workers_reconnect_after_a_server_restart_and_lose_nothing(
    pg_url: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    count = 3000
    keys = {f"t{i:04d}" for i in range(count)}
    gate = tmp_path / "gate"
    # The three oldest tasks wait for a gate that opens only after the restart, so some tasks are
    # surely running (claims held, leases renewed) while the server goes away, however fast the
    # machine; the others are 5 ms each.
    tasks = [{"id": key, "payload": {"sleep_ms": 5}} for key in sorted(keys)]
    for task in tasks[:3]:
        task["payload"]["gate"] = str(gate)
    enqueue(launcher, pg_url, tmp_path / "tasks.json", tasks)
    lease = ["--lease-seconds", "5"]
    workers = [
        launcher.worker(pg_url, "--name", f"w{i}", "--workers", "4", *lease) for i in range(3)
    ]
    probe = Probe(pg_url)
    try:
        wait_until(lambda: probe.done() >= 100, "the run to get going", procs=workers)
        restart_postgres()
        assert probe.done() < count
        gate.touch()
        wait_until(lambda: probe.done() == count, "every task done", 120, 0.5, workers)
        status = probe.store.queue_status()
        keys_status = probe.store.stats()
    finally:
        gate.touch()
        probe.close()
    summaries = stop_all(workers)
    assert all("reconnecting" in worker.stderr() for worker in workers)
    assert status["tasks"] == {"queued": 0, "running": 0, "done": count, "failed": 0}
    assert keys_status == {"in_progress": 0, "completed": count, "failed": 0, "total": count}
    assert set(launcher.calls_by_key()) == keys
    # A success is a completion, so there are never more than one per key. A completion whose
    # acknowledgement the restart swallowed is reported as a duplicate instead.
    succeeded = sum(s["succeeded"] for s in summaries)
    assert succeeded <= count <= succeeded + sum(s["duplicates"] for s in summaries)
    assert sum(s["failed"] for s in summaries) == 0


# --- Shared idempotency ---------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_one_key_enqueued_from_two_processes_at_once_runs_once(
    pg_url: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    count = 200
    workers = [launcher.worker(pg_url, "--name", f"w{i}", "--workers", "8") for i in range(2)]
    probe = Probe(pg_url)
    try:
        wait_until(
            lambda: len(probe.store.queue_status()["workers"]) == 2,
            "both workers up",
            procs=workers,
        )
        producers = []
        for tag in ("a", "b"):
            same_keys = [
                {
                    "id": f"{tag}-{i:03d}",
                    "idempotency_key": f"k-{i:03d}",
                    "payload": {"sleep_ms": 20},
                }
                for i in range(count)
            ]
            file = write_tasks(tmp_path / f"{tag}.json", same_keys)
            producers.append(launcher.spawn("enqueue", "--task-file", str(file), "--db", pg_url))
        assert [producer.wait() for producer in producers] == [0, 0]
        wait_until(lambda: probe.done() == 2 * count, "both files done", 60, 0.2, workers)
        keys_status = probe.store.stats()
    finally:
        probe.close()
    summaries = stop_all(workers)
    assert launcher.calls_by_key() == Counter({f"k-{i:03d}": 1 for i in range(count)})
    assert keys_status["completed"] == count and keys_status["total"] == count
    assert sum(s["succeeded"] for s in summaries) == count
    assert sum(s["duplicates"] for s in summaries) == count
    assert sum(s["failed"] for s in summaries) == 0


SUBMITTER = """
import json, sys
import task_queue_optimized as tq
import tq_test_handlers

url, tag = sys.argv[1], sys.argv[2]
pool = tq.WorkerPool(tq_test_handlers.record, workers=8, db_path=url, lease_seconds=10)
print("ready", flush=True)
sys.stdin.readline()
tasks = [tq.Task(f"{tag}-{i:03d}", {"sleep_ms": 20}, idempotency_key=f"k-{i:03d}")
         for i in range(100)]
records = pool.run(tasks)
pool.shutdown()
print(json.dumps({r.key: r.status.value for r in records}), flush=True)
"""


@pytest.mark.timeout(120)
def test_one_key_submitted_by_two_processes_at_once_runs_once(
    pg_url: str,
    launcher: Launcher,
) -> None:
    children = [launcher.spawn_python(SUBMITTER, pg_url, tag, label=tag) for tag in ("a", "b")]
    for child in children:
        wait_until(lambda child=child: "ready" in child.stdout(), "the pools", procs=children)
    for child in children:  # both start at once
        child.popen.stdin.write(b"go\n")
        child.popen.stdin.flush()
    for child in children:
        child.popen.stdin.close()
        assert child.wait() == 0, child.stderr()[-3000:]
    answers = [json.loads(child.stdout().splitlines()[-1]) for child in children]
    for i in range(100):
        key = f"k-{i:03d}"
        assert sorted(answer[key] for answer in answers) == ["duplicate", "succeeded"], key
    assert launcher.calls_by_key() == Counter({f"k-{i:03d}": 1 for i in range(100)})


# --- Waking idle workers --------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_an_idle_worker_picks_up_tasks_enqueued_later(
    pg_url: str,
    launcher: Launcher,
    tmp_path: Path,
) -> None:
    worker = launcher.worker(pg_url, "--name", "idle")
    wait_until(lambda: listening(pg_url), "the idle worker to LISTEN", procs=[worker])
    probe = Probe(pg_url)
    try:
        for round_ in range(3):
            enqueue(launcher, pg_url, tmp_path / f"late-{round_}.json", [{"id": f"late-{round_}"}])
            wait_until(lambda n=round_ + 1: probe.done() == n, "the late task", procs=[worker])
    finally:
        probe.close()
    (summary,) = stop_all([worker])
    assert summary["succeeded"] == 3
    assert launcher.calls_by_key() == Counter({"late-0": 1, "late-1": 1, "late-2": 1})


@pytest.mark.timeout(120)
def test_serve_is_woken_by_notify_long_before_its_poll_interval(pg_url: str) -> None:
    seen: list[str] = []

    def handler(task: tq.Task) -> str:
        seen.append(task.id)
        return task.id

    pool = tq.WorkerPool(handler, workers=2, db_path=pg_url, durable=True, worker_name="in-proc")
    producer = tq.open_store(pg_url)
    stop = threading.Event()
    # Idle, this pool polls only every 600 s: a task it runs within the 30 s deadlines below was
    # announced by the enqueue's NOTIFY.
    server = threading.Thread(target=pool.serve, args=(stop,), kwargs={"poll_interval": 600.0})
    server.start()
    try:
        wait_until(lambda: listening(pg_url), "serve to LISTEN")
        for round_ in range(3):
            producer.enqueue_many([tq.Task(f"n{round_}")])
            wait_until(
                lambda n=round_ + 1: producer.queue_status()["tasks"]["done"] == n,
                f"task n{round_} to run",
                30.0,
            )
    finally:
        stop.set()
        # serve sleeps in LISTEN and does not watch `stop` there: one more NOTIFY wakes it.
        pg_rows("SELECT pg_notify(%s, '')", (f"task_queue_{schema_of(pg_url)}",))
        server.join(WAIT)
        pool.shutdown(wait=True, cancel_pending=True)
        producer.close()
    assert not server.is_alive()
    assert seen == ["n0", "n1", "n2"]


# --- The driver -----------------------------------------------------------------------------------


def test_the_postgres_extra_and_the_requirements_need_psycopg_3_2() -> None:
    # wait_for_work calls Connection.notifies(timeout=, stop_after=), which psycopg 3.2 added.
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert '"psycopg[binary]>=3.2"' in pyproject
    for name in ("requirements-dev.txt", "requirements.txt", "requirements-bench.txt"):
        text = (REPO / name).read_text(encoding="utf-8")
        pins = re.findall(r"^psycopg\S*", text, flags=re.MULTILINE)
        for pin in pins:
            # ">=3.2", or an exact version of 3.2 or later (the benchmark pins its peers).
            exact = re.fullmatch(r"psycopg(\[binary\])?==(\d+)\.(\d+)(\.\d+)?", pin)
            at_least = exact is not None and (int(exact[2]), int(exact[3])) >= (3, 2)
            assert pin.endswith(">=3.2") or at_least, (name, pin)


def test_an_older_psycopg_is_refused_with_a_clear_error_before_any_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    psycopg = pytest.importorskip("psycopg")
    monkeypatch.setattr(psycopg, "__version__", "3.1.19")
    url = store_fixtures.new_schema_url()
    with pytest.raises(tq.ConfigError, match=r"psycopg 3\.2 or newer, found 3\.1\.19"):
        tq.open_store(url)
    if store_fixtures._postgres_problem() is None:
        assert not schema_exists(schema_of(url))


# --- Reading never creates ------------------------------------------------------------------------


def schema_exists(schema: str) -> bool:
    return bool(pg_rows("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)))


@pytest.mark.parametrize("command", ["status", "purge"])
def test_reading_commands_refuse_a_missing_schema_and_create_nothing(
    command: str, launcher: Launcher
) -> None:
    store_fixtures.require_postgres()
    url = store_fixtures.new_schema_url()
    try:
        line = one_line_error(launcher.run(command, "--db", url, timeout=30))
        assert schema_of(url) in line and "holds no task queue" in line
        assert not schema_exists(schema_of(url))
    finally:
        store_fixtures.drop_schema(url)


def test_reading_a_url_without_schema_means_task_queue_and_never_creates_it() -> None:
    store_fixtures.require_postgres()
    if schema_exists("task_queue"):
        pytest.skip("the default schema task_queue exists on the test server")
    with pytest.raises(tq.ConfigError, match="'task_queue' holds no task queue"):
        tq.open_store(store_fixtures.PG_DSN, create=False)
    assert not schema_exists("task_queue")


def test_status_reads_a_schema_that_enqueue_created(launcher: Launcher, pg_url: str) -> None:
    enqueue(launcher, pg_url, launcher.root / "tasks.json", [{"id": "a"}, {"id": "b"}])
    proc = launcher.run("status", "--db", pg_url, "--json", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tasks"]["queued"] == 2


# --- Enqueue is all or nothing --------------------------------------------------------------------


def task_rows(url: str) -> int:
    """Return how many rows the schema's task table holds (0 when there is no table)."""
    table = f"{schema_of(url)}.tasks"
    if pg_rows("SELECT to_regclass(%s)", (table,))[0][0] is None:
        return 0
    return pg_rows(f"SELECT count(*) FROM {table}")[0][0]


def test_enqueue_of_a_task_postgresql_cannot_store_exits_2_and_writes_nothing(
    launcher: Launcher, pg_url: str
) -> None:
    batch = [{"id": f"t-{i:04d}"} for i in range(1500)]
    batch[1200]["id"] = "t-\u0000-nul"
    file = write_tasks(launcher.root / "tasks.json", batch)
    line = one_line_error(
        launcher.run("enqueue", "--task-file", str(file), "--db", pg_url, timeout=60)
    )
    assert "NUL" in line or "\\u0000" in line or "0x00" in line
    assert task_rows(pg_url) == 0


def test_enqueue_is_one_transaction_when_a_constraint_refuses_a_task(
    launcher: Launcher, pg_url: str
) -> None:
    tq.open_store(pg_url).close()
    store_fixtures.pg_execute(
        f"ALTER TABLE {schema_of(pg_url)}.tasks ADD CONSTRAINT refuse CHECK (id <> 't-1200')"
    )
    file = write_tasks(launcher.root / "tasks.json", [{"id": f"t-{i}"} for i in range(1500)])
    line = one_line_error(
        launcher.run("enqueue", "--task-file", str(file), "--db", pg_url, timeout=60)
    )
    assert "refuse" in line and "nothing was enqueued" in line
    assert task_rows(pg_url) == 0


# --- Database errors that are not a lost connection -----------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("setting", "error"),
    [("lock_timeout", "LockNotAvailable"), ("statement_timeout", "QueryCanceled")],
)
def test_a_timeout_surfaces_at_once_and_the_store_stays_usable(
    pg_url: str, setting: str, error: str
) -> None:
    import psycopg

    seed = tq.open_store(pg_url)
    seed.enqueue_many([tq.Task("held")])
    seed.close()
    # An hour of reconnecting would outlast the test's timeout: the error must not be retried.
    timed = tq.PostgresStore(f"{pg_url}&options=-c%20{setting}%3D100", reconnect_seconds=3600)
    try:
        with psycopg.connect(store_fixtures.PG_DSN, connect_timeout=10) as holder:
            holder.execute(f"SELECT * FROM {schema_of(pg_url)}.tasks WHERE id = 'held' FOR UPDATE")
            with pytest.raises(getattr(psycopg.errors, error)):
                timed.take_task(tq.Task("held"), "w")
            holder.rollback()
        assert timed.take_task(tq.Task("held"), "w") is not None
    finally:
        timed.close()


@pytest.mark.timeout(60)
def test_opening_a_complete_schema_takes_no_lock_writers_would_wait_on(pg_url: str) -> None:
    """A worker or a probe opening the store while others write neither waits for them nor
    blocks them: opening an existing schema only reads it."""
    import psycopg

    tq.open_store(pg_url).close()
    schema = schema_of(pg_url)
    opened = threading.Event()
    failures: list[BaseException] = []

    def open_it() -> None:
        try:
            tq.open_store(pg_url).close()
            opened.set()
        except BaseException as exc:  # reported below
            failures.append(exc)

    with psycopg.connect(store_fixtures.PG_DSN, connect_timeout=10) as writer:
        # A write transaction in progress on both tables, as a claim that counts a start holds.
        writer.execute(f"UPDATE {schema}.idempotency SET state = state WHERE false")
        writer.execute(f"UPDATE {schema}.tasks SET state = state WHERE false")
        opener = threading.Thread(target=open_it)
        opener.start()
        try:
            assert opened.wait(WAIT), "opening the store waited for a writer"
        finally:
            writer.rollback()
            opener.join(WAIT)
    assert failures == []


# A tasks table as versions before delays and priorities made it (no priority, no run_at).
LEGACY_TASKS = """CREATE TABLE {schema}.tasks (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, payload TEXT NOT NULL, state TEXT NOT NULL,
    token BIGINT, worker TEXT, lease_expires DOUBLE PRECISION,
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
    enqueued_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)"""


def task_columns(schema: str) -> set[str]:
    rows = pg_rows(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = 'tasks'",
        (schema,),
    )
    return {name for (name,) in rows}


@pytest.mark.timeout(60)
def test_a_tasks_table_from_before_delays_is_read_as_is_then_migrated(
    launcher: Launcher, pg_url: str
) -> None:
    tq.open_store(pg_url).close()
    schema = schema_of(pg_url)
    store_fixtures.pg_execute(f"DROP TABLE {schema}.tasks")
    store_fixtures.pg_execute(LEGACY_TASKS.format(schema=schema))
    store_fixtures.pg_execute(f"CREATE INDEX tasks_ready ON {schema}.tasks (state, enqueued_at)")
    for task_id, enqueued_at in (("old-2", 2.0), ("old-1", 1.0)):
        store_fixtures.pg_execute(
            f"INSERT INTO {schema}.tasks (id, key, payload, state, attempts, enqueued_at, "
            "updated_at) VALUES (%s, %s, '{}', 'queued', 0, %s, %s)",
            (task_id, task_id, enqueued_at, enqueued_at),
        )
    proc = launcher.run("status", "--db", pg_url, "--json", timeout=30)
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert (status["tasks"]["queued"], status["delayed"]) == (2, 0)
    assert "run_at" not in task_columns(schema)  # a reader writes nothing
    store = tq.open_store(pg_url)  # an opener that may create migrates in place
    try:
        assert {"priority", "run_at"} <= task_columns(schema)
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


@pytest.mark.timeout(120)
def test_one_worker_starts_a_task_file_by_priority_then_in_file_order(
    launcher: Launcher, pg_url: str, tmp_path: Path
) -> None:
    # More tasks than one enqueue statement holds, ids in no sorted order, a few priorities.
    count = 1200
    tasks = [{"id": f"t{(index * 7919) % count:05d}", "priority": (0, 3, -1, 0)[index % 4]}
             for index in range(count)]  # fmt: skip
    enqueue(launcher, pg_url, tmp_path / "tasks.json", tasks)
    proc = launcher.run("worker", "--db", pg_url, "--handler", store_fixtures.RECORD_HANDLER,
                        "--workers", "1", "--burst", "--json", timeout=100)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (calls,) = launcher.executions().values()
    expected = sorted(tasks, key=lambda task: -task["priority"])
    assert [task_id for task_id, _ in calls] == [task["id"] for task in expected]


def test_a_tasks_table_from_before_places_is_numbered_in_its_old_order(pg_url: str) -> None:
    tq.open_store(pg_url).close()
    schema = schema_of(pg_url)
    for ddl in (  # the layout of the version before
        f"ALTER TABLE {schema}.tasks DROP COLUMN seq",
        f"DROP SEQUENCE {schema}.tasks_order",
        f"CREATE INDEX tasks_take ON {schema}.tasks "
        "(state, priority DESC, (coalesce(run_at, enqueued_at)))",
        f"CREATE INDEX tasks_queue_take ON {schema}.tasks "
        "(state, queue, priority DESC, (coalesce(run_at, enqueued_at)))",
        # One enqueue of the old version: one enqueue time, rows stored in no id order.
        f"INSERT INTO {schema}.tasks (id, key, payload, state, attempts, enqueued_at, "
        "updated_at) VALUES ('old-c', 'old-c', '{}', 'queued', 0, 1.0, 1.0), "
        "('old-a', 'old-a', '{}', 'queued', 0, 1.0, 1.0), "
        "('old-b', 'old-b', '{}', 'queued', 0, 1.0, 1.0)",
    ):
        store_fixtures.pg_execute(ddl)
    store = tq.open_store(pg_url)  # a writer numbers the old rows by enqueue time, then id
    try:
        store.enqueue_many([tq.Task("new-z"), tq.Task("new-y")])
        taken = [item.task.id for item in store.take_many("w", 10)]
        assert taken == ["old-a", "old-b", "old-c", "new-z", "new-y"]
    finally:
        store.close()
    indexes = {name for (name,) in pg_rows(
        "SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,))}  # fmt: skip
    assert {"tasks_next", "tasks_queue_next"} <= indexes
    assert not {"tasks_take", "tasks_queue_take"} & indexes


def statements_sent(store: Any, call: Any) -> int:
    """Return how many statements with parameters `call` sent on the store's connection, as
    libpq's protocol trace shows them (a Bind message each; BEGIN and COMMIT have none)."""
    conn = store._conn
    with tempfile.TemporaryFile() as trace:
        conn.pgconn.trace(trace.fileno())
        try:
            call()
        finally:
            conn.pgconn.untrace()
        trace.seek(0)
        return sum(line.split(b"\t")[3:4] == [b"Bind"] for line in trace.read().splitlines())


@pytest.mark.timeout(60)
def test_a_batch_of_any_size_is_one_statement_per_kind_on_the_wire(pg_url: str) -> None:
    """Prove claims with their started runs, completions with their settlements, renewals,
    releases, settlements and entry renewals each cost one statement per batch, not per row."""
    store = tq.open_store(pg_url)
    try:
        keys = [f"k{index:03d}" for index in range(40)]
        store.enqueue_many([tq.Task(key) for key in keys])
        entry = {item.task.id: item.token for item in store.take_many("w", 40)}
        claims: list[tq.Claim] = []

        def claim() -> None:
            claims.extend(store.claim_many([(key, None) for key in keys], "ns",
                                           starts=sorted(entry.items())))  # fmt: skip

        assert statements_sent(store, claim) == 1
        assert {c.state for c in claims} == {tq.ClaimState.CLAIMED}
        token = {key: c.token for key, c in zip(keys, claims, strict=True)}
        done, released = keys[:30], keys[30:]
        assert statements_sent(store, lambda: store.renew_many(list(token.items()))) == 1
        assert statements_sent(store, lambda: store.renew_tasks("w", {}, list(entry.items()))) == 2
        written: list[bool] = []
        complete = [(key, token[key], "1") for key in done]
        settle = [(index, key, entry[key]) for index, key in enumerate(done)]
        assert statements_sent(
            store, lambda: written.extend(store.complete_many(complete, settle=settle))
        ) == 1  # fmt: skip
        assert written == [True] * 30
        release = [(key, token[key], "boom") for key in released]
        assert statements_sent(store, lambda: store.release_many(release)) == 1
        failed = [(key, entry[key], tq.EntryState.FAILED, "boom") for key in released]
        assert statements_sent(store, lambda: store.settle_many(failed)) == 1
        assert store.queue_status()["tasks"] == {
            "queued": 0,
            "running": 0,
            "done": 30,
            "failed": 10,
        }
        assert store.stats()["completed"] == 30 and store.stats()["failed"] == 10
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_a_row_postgresql_refuses_fails_alone_in_a_batch_and_the_others_are_written(
    pg_url: str,
) -> None:
    """Prove a batch statement that fails on one row (text PostgreSQL cannot store) falls back to
    one row at a time: the bad row fails alone, the good rows and their settlements commit."""
    store = tq.open_store(pg_url)
    try:
        keys = ["a", "b", "bad", "c"]
        store.enqueue_many([tq.Task(key) for key in keys])
        entry = {item.task.id: item.token for item in store.take_many("w", 4)}
        claims = store.claim_many([(key, None) for key in keys], "ns")
        items = [((key, claim.token, '"nul \x00"' if key == "bad" else '"ok"'), key, entry[key])
                 for key, claim in zip(keys, claims, strict=True)]  # fmt: skip

        def complete(batch: list[Any]) -> list[bool]:
            settle = [(index, task_id, token) for index, (_, task_id, token) in enumerate(batch)]
            return store.complete_many([item for item, _, _ in batch], settle=settle)

        with pytest.raises(tq._database_errors()):  # the batch as one statement fails whole
            complete(items)
        assert store.stats()["completed"] == 0
        results = tq._each_alone(complete, items)
        assert results[:2] == [True, True] and results[3] is True
        assert isinstance(results[2], tq._database_errors())
        assert store.queue_status()["tasks"] == {"queued": 0, "running": 1, "done": 3, "failed": 0}
        assert store.lookup("bad", "ns")["state"] == "in_progress"
    finally:
        store.close()
