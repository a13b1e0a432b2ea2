"""Driving the durable queue from scripts: enqueue() from code, burst workers, worker metrics.

Workers are real processes (``python task_queue_optimized.py worker``) on SQLite files and on
the real PostgreSQL server; their handlers log each call to a file per process.
"""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.store_fixtures import Launcher, pg_execute
from tests.support import one_line_error, wait_until

# A handler that fails the tasks whose payload says so, and otherwise logs like `record`.
FAILING_HANDLER = """\
import task_queue_optimized as tq
import tq_test_handlers


def run(task):
    if task.payload.get("fail"):
        raise tq.PermanentError("asked to fail")
    return tq_test_handlers.record(task)
"""


def status_of(db: str) -> dict[str, Any]:
    store = tq.open_store(db)
    try:
        return store.queue_status()
    finally:
        store.close()


def generated(count: int, prefix: str = "t", **payload: Any) -> Iterator[tq.Task]:
    for index in range(count):
        yield tq.Task(f"{prefix}-{index:05d}", dict(payload))


def burst(launcher: Launcher, db: str, *args: str, handler: str = store_fixtures.RECORD_HANDLER):
    proc = launcher.run("worker", "--db", db, "--handler", handler, "--burst", "--json", *args)
    return proc, (json.loads(proc.stdout) if proc.stdout.strip() else None)


# --- enqueue() from code -------------------------------------------------------------------------


def test_enqueue_streams_any_iterable_and_counts_only_new_tasks(durable_db: str) -> None:
    count = 2 * tq.ENQUEUE_CHUNK + 7  # three chunks, the last one short
    assert tq.enqueue(generated(count), db=durable_db) == count
    assert tq.enqueue(generated(count + 3), db=durable_db) == 3
    assert tq.enqueue([], db=durable_db) == 0
    assert status_of(durable_db)["tasks"]["queued"] == count + 3


def test_enqueue_is_all_or_nothing_across_chunks(durable_db: str) -> None:
    assert tq.enqueue([tq.Task("t-01100", {"old": True})], db=durable_db) == 1

    def conflicting() -> Iterator[tq.Task]:
        yield from generated(1500)  # t-01100 comes back with another payload in chunk 3

    with pytest.raises(tq.TaskConflictError, match="t-01100"):
        tq.enqueue(conflicting(), db=durable_db)

    def with_a_stranger() -> Iterator[Any]:
        yield from generated(1200, prefix="u")
        yield {"id": "not-a-task"}

    with pytest.raises(TypeError, match="expected Task objects, got dict"):
        tq.enqueue(with_a_stranger(), db=durable_db)

    def broken() -> Iterator[tq.Task]:
        yield from generated(700, prefix="v")
        raise RuntimeError("the producer broke")

    with pytest.raises(RuntimeError, match="the producer broke"):
        tq.enqueue(broken(), db=durable_db)
    assert status_of(durable_db)["tasks"]["queued"] == 1


def test_enqueue_refuses_bad_arguments_before_opening_anything(tmp_path: Path) -> None:
    for memory in (":memory:", "sqlite:///:memory:", "memory://"):
        with pytest.raises(tq.ConfigError, match="memory only"):
            tq.enqueue(generated(1), db=memory)
    db = tmp_path / "q.db"
    for queue in ("", "a\x00b", 7, "a,b", "a b"):
        with pytest.raises(ValueError, match="queue"):
            tq.enqueue(generated(1), db=db, queue=queue)  # type: ignore[arg-type]
    assert not db.exists()
    assert "enqueue" in tq.__all__


def test_enqueue_puts_tasks_in_the_queue_asked_unless_they_name_one(durable_db: str) -> None:
    tasks = [*generated(3), tq.Task("mine", queue="urgent")]
    assert tq.enqueue(tasks, db=durable_db, queue="reports") == 4
    queues = status_of(durable_db)["queues"]
    assert queues["reports"]["queued"] == 3 and queues["urgent"]["queued"] == 1
    assert "default" not in queues
    # The same ids in another queue are other tasks: refused, nothing added.
    with pytest.raises(tq.TaskConflictError):
        tq.enqueue([*generated(1, prefix="new"), *generated(1)], db=durable_db)
    assert sum(entry["queued"] for entry in status_of(durable_db)["queues"].values()) == 4


def test_enqueue_with_a_delay_and_a_priority(durable_db: str, tmp_path: Path) -> None:
    assert tq.enqueue(generated(2, prefix="low"), db=durable_db, priority=-5) == 2
    assert tq.enqueue([tq.Task("high")], db=durable_db, priority=5) == 1
    assert tq.enqueue([tq.Task("later")], db=durable_db, delay=3600) == 1
    store = tq.open_store(durable_db)
    try:
        assert store.queue_status()["delayed"] == 1
        taken = [item.task.id for item in store.take_many("w", 10)]
    finally:
        store.close()
    # The higher priority first; the delayed one is not due.
    assert taken[0] == "high" and sorted(taken[1:]) == ["low-00000", "low-00001"]
    db = tmp_path / "never.db"
    for bad in ({"delay": -1}, {"delay": float("nan")}, {"priority": 1001}, {"priority": 1.5}):
        with pytest.raises((TypeError, ValueError), match=r"delay|priority"):
            tq.enqueue(generated(1), db=db, **bad)
    assert not db.exists()


def test_enqueue_that_loses_its_connection_midway_enqueues_nothing(pg_url: str) -> None:
    schema = store_fixtures.schema_of(pg_url)
    tq.open_store(pg_url).close()  # the schema exists, so the enqueue's first statement is ours

    def cut_midway() -> Iterator[tq.Task]:
        yield from generated(tq.ENQUEUE_CHUNK, prefix="w")
        # The enqueue's connection waits inside its transaction for the next chunk: end it.
        pg_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> "
            "pg_backend_pid() AND state = 'idle in transaction' AND query LIKE %s",
            (f"%{schema}.tasks%",),
        )
        yield from generated(10, prefix="x")

    with pytest.raises(tq.TaskQueueError, match="connection was lost during the enqueue"):
        tq.enqueue(cut_midway(), db=pg_url)
    assert status_of(pg_url)["tasks"]["queued"] == 0


def test_enqueue_many_over_several_chunks_counts_and_refuses_like_one_row_at_a_time(
    backend: store_fixtures.Backend,
) -> None:
    # PostgreSQL writes a chunk in one statement: repeats inside a chunk, rows stored before
    # and a conflict in a later chunk must come out as the per-row statements had them.
    store = backend.open()
    count = tq.ENQUEUE_CHUNK * 2 + 3
    batch = list(generated(count))
    assert store.enqueue_many([*batch, batch[0], batch[-1]]) == count
    assert store.enqueue_many(batch) == 0
    assert store.enqueue_many([*generated(count + 2)]) == 2
    with pytest.raises(tq.TaskConflictError, match="t-00000"):
        store.enqueue_many([tq.Task("new-1"), tq.Task("t-00000", {"other": 1})])
    with pytest.raises(tq.TaskConflictError, match="n-0"):
        store.enqueue_many([tq.Task("n-0"), tq.Task("n-0", {"other": 1})])
    assert store.queue_status()["tasks"]["queued"] == count + 2


# --- Burst workers -------------------------------------------------------------------------------


def test_a_burst_worker_drains_the_queue_and_exits_0(launcher: Launcher, durable_db: str) -> None:
    tq.enqueue(generated(30), db=durable_db)
    proc, snapshot = burst(launcher, durable_db, "--workers", "4")
    assert proc.returncode == 0, proc.stderr
    assert snapshot["succeeded"] == 30 and snapshot["failed"] == 0
    assert (snapshot["backlog"], snapshot["oldest_waiting_seconds"]) == (0, None)
    assert launcher.calls_by_key() == Counter({f"t-{i:05d}": 1 for i in range(30)})
    assert status_of(durable_db)["tasks"]["done"] == 30
    # Run again: nothing to do, and it says so at once.
    proc, snapshot = burst(launcher, durable_db)
    assert proc.returncode == 0 and snapshot["submitted"] == 0


def test_a_burst_worker_exits_1_when_a_task_it_ran_failed(
    launcher: Launcher, tmp_path: Path, durable_db: str
) -> None:
    (tmp_path / "failing.py").write_text(FAILING_HANDLER, encoding="utf-8")
    tq.enqueue([*generated(5), tq.Task("bad", {"fail": True})], db=durable_db)
    proc, snapshot = burst(launcher, durable_db, handler="failing:run")
    assert proc.returncode == 1, proc.stderr
    assert (snapshot["succeeded"], snapshot["failed"]) == (5, 1)
    assert snapshot["failures_by_kind"] == {"permanent": 1}
    status = status_of(durable_db)["tasks"]
    assert (status["done"], status["failed"], status["queued"]) == (5, 1, 0)
    # The failure is this worker's to report; the next burst finds nothing and exits 0.
    proc, snapshot = burst(launcher, durable_db, handler="failing:run")
    assert proc.returncode == 0 and snapshot["submitted"] == 0


@pytest.mark.timeout(90)
def test_a_burst_worker_waits_for_a_task_another_worker_runs_and_takes_it_if_that_one_dies(
    launcher: Launcher, tmp_path: Path, durable_db: str
) -> None:
    gate = tmp_path / "gate"
    tq.enqueue([tq.Task("long", {"gate": str(gate)})], db=durable_db)
    first = launcher.worker(durable_db, "--lease-seconds", "1")
    wait_until(lambda: launcher.calls_by_key()["long"] == 1, "the first worker runs it",
               procs=[first])  # fmt: skip
    second = launcher.worker(durable_db, "--lease-seconds", "1", "--burst")
    wait_until(lambda: "serving" in second.stderr(), "the burst worker serves", procs=[second])
    # The task is running elsewhere, not ready: a burst worker that stopped here would lose it.
    first.kill()
    gate.touch()
    assert second.wait() == 0, second.stderr()
    runs = launcher.executions()
    assert [task for task, _ in runs[second.pid]] == ["long"]
    assert second.json()["succeeded"] == 1
    assert status_of(durable_db)["tasks"]["done"] == 1


def test_a_burst_worker_does_not_wait_for_delayed_tasks(
    launcher: Launcher, durable_db: str
) -> None:
    tq.enqueue(generated(2), db=durable_db)
    tq.enqueue([tq.Task("tomorrow")], db=durable_db, delay=86400)
    proc, snapshot = burst(launcher, durable_db)
    assert proc.returncode == 0, proc.stderr
    assert snapshot["succeeded"] == 2
    status = status_of(durable_db)
    assert (status["tasks"]["done"], status["tasks"]["queued"], status["delayed"]) == (2, 1, 1)
    assert (snapshot["backlog"], snapshot["oldest_waiting_seconds"]) == (0, None)


def test_a_burst_worker_of_one_queue_leaves_the_others_alone(
    launcher: Launcher, durable_db: str
) -> None:
    tq.enqueue(generated(3, prefix="a"), db=durable_db, queue="a")
    tq.enqueue(generated(2, prefix="b"), db=durable_db, queue="b")
    proc, snapshot = burst(launcher, durable_db, "--queues", "a")
    assert proc.returncode == 0, proc.stderr
    assert snapshot["succeeded"] == 3
    other = snapshot["backlog_by_queue"]["b"]  # not served here, still shown
    assert other["backlog"] == 2 and other["oldest_waiting_seconds"] >= 0
    assert snapshot["backlog_by_queue"]["a"] == {"backlog": 0, "oldest_waiting_seconds": None}
    queues = status_of(durable_db)["queues"]
    assert (queues["a"]["done"], queues["b"]["queued"]) == (3, 2)


def test_a_burst_worker_is_stopped_by_sigterm_like_any_worker(
    launcher: Launcher, tmp_path: Path
) -> None:
    db = str(tmp_path / "queue.db")
    tq.enqueue([tq.Task("held", {"gate": str(tmp_path / "gate")})], db=db)
    worker = launcher.worker(db, "--burst", "--lease-seconds", "2")
    wait_until(lambda: launcher.calls_by_key()["held"] == 1, "the task runs", procs=[worker])
    worker.signal(signal.SIGTERM)
    (tmp_path / "gate").touch()
    assert worker.wait() == 143


# --- Worker metrics and flags --------------------------------------------------------------------


def test_prometheus_text_has_failures_by_kind_and_the_backlog_per_queue() -> None:
    metrics = tq.MetricsCollector(workers=2, queue_size=10)
    assert metrics.snapshot()["backlog"] is None  # not a worker: nothing measured
    assert "task_queue_backlog" not in metrics.to_prometheus()
    metrics.record_failure("permanent")
    metrics.record_failure("transient")
    metrics.record_failure("permanent")
    metrics.record_backlog({"default": (3, 12.5), 'od"d\\q\n': (0, None)})
    snapshot = metrics.snapshot()
    assert (snapshot["backlog"], snapshot["oldest_waiting_seconds"]) == (3, 12.5)
    assert snapshot["backlog_by_queue"] == {
        "default": {"backlog": 3, "oldest_waiting_seconds": 12.5},
        'od"d\\q\n': {"backlog": 0, "oldest_waiting_seconds": None},
    }
    lines = metrics.to_prometheus().splitlines()
    for expected in [
        "# TYPE task_queue_failures_total counter",
        'task_queue_failures_total{kind="permanent"} 2',
        'task_queue_failures_total{kind="transient"} 1',
        "# TYPE task_queue_backlog gauge",
        'task_queue_backlog{queue="default"} 3',
        'task_queue_backlog{queue="od\\"d\\\\q\\n"} 0',
        "# TYPE task_queue_oldest_waiting_seconds gauge",
        'task_queue_oldest_waiting_seconds{queue="default"} 12.5',
        'task_queue_oldest_waiting_seconds{queue="od\\"d\\\\q\\n"} NaN',
    ]:
        assert expected in lines, expected
    assert json.loads(metrics.to_json())["backlog_by_queue"]["default"]["backlog"] == 3


def test_the_backlog_gauge_reads_the_store(durable_db: str) -> None:
    tq.enqueue(generated(4), db=durable_db)
    store = tq.open_store(durable_db)
    metrics = tq.MetricsCollector()
    try:
        gauge = tq._BacklogGauge(store, metrics)
        gauge.refresh()
        first = metrics.snapshot()
        store.take_many("w", 3)
        gauge.refresh()
        second = metrics.snapshot()
    finally:
        store.close()
    assert first["backlog"] == 4 and first["oldest_waiting_seconds"] >= 0
    assert second["backlog"] == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(url: str) -> list[str] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode().splitlines()
    except OSError:
        return None  # not listening yet


@pytest.mark.timeout(90)
def test_a_worker_exports_the_store_backlog_as_it_drains(
    launcher: Launcher, tmp_path: Path
) -> None:
    db = str(tmp_path / "queue.db")
    gate = tmp_path / "gate"
    tq.enqueue(generated(3, gate=str(gate)), db=db)
    port = free_port()
    worker = launcher.worker(db, "--workers", "1", "--prefetch", "1", "--metrics-port", str(port))
    url = f"http://127.0.0.1:{port}/metrics"

    def backlog(count: int) -> Any:
        lines = scrape(url)
        return (
            lines if lines and f'task_queue_backlog{{queue="default"}} {count}' in lines else None
        )

    lines = wait_until(lambda: backlog(2), "a backlog of 2 behind the running task",
                       procs=[worker])  # fmt: skip
    age = [line for line in lines if line.startswith("task_queue_oldest_waiting_seconds{")]
    assert len(age) == 1 and float(age[0].split()[-1]) >= 0
    gate.touch()
    wait_until(lambda: backlog(0), "the backlog to drain", procs=[worker])
    assert worker.terminate() == 143
    assert worker.json()["backlog_by_queue"] == {
        "default": {"backlog": 0, "oldest_waiting_seconds": None}
    }


@pytest.mark.parametrize("how", ["flag", "dotenv"])
def test_metrics_host_chooses_the_address(launcher: Launcher, tmp_path: Path, how: str) -> None:
    db = str(tmp_path / "queue.db")
    port = free_port()
    args = ["--metrics-port", str(port)]
    if how == "flag":
        args += ["--metrics-host", "127.0.0.2"]
    else:
        (tmp_path / ".env").write_text("TQ_METRICS_HOST=127.0.0.2\n", encoding="utf-8")
    worker = launcher.worker(db, *args)
    wait_until(lambda: scrape(f"http://127.0.0.2:{port}/metrics"), "metrics on 127.0.0.2",
               procs=[worker])  # fmt: skip
    assert scrape(f"http://127.0.0.1:{port}/metrics") is None  # not on the default address
    wait_until(lambda: "serving" in worker.stderr(), "the worker serves", procs=[worker])
    assert worker.terminate() == 143


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--metrics-host", "no such host"], "--metrics-host: expected a host name"),
        (["--metrics-host", "host.invalid", "--metrics-port", "0"],
         "--metrics-host host.invalid --metrics-port 0: "),
        (["--handler", store_fixtures.RECORD_HANDLER, "--latency-ms", "5"],
         "--latency-ms configures the built-in simulator"),
        (["--handler", store_fixtures.RECORD_HANDLER, "--transient-rate", "0.1", "--jitter-ms",
          "1"], "--jitter-ms, --transient-rate configure the built-in simulator"),
    ],
    ids=["host-spaces", "host-unknown", "one-simulator-flag", "two-simulator-flags"],
)  # fmt: skip
def test_bad_worker_flags_exit_2_and_create_no_database(
    launcher: Launcher, tmp_path: Path, args: list[str], words: str
) -> None:
    proc = launcher.run("worker", "--db", str(tmp_path / "q.db"), *args)
    assert words in one_line_error(proc)
    assert not (tmp_path / "q.db").exists()


def test_simulator_variables_do_not_stop_a_worker_with_a_handler(
    launcher: Launcher, tmp_path: Path
) -> None:
    db = str(tmp_path / "q.db")
    tq.enqueue(generated(2), db=db)
    proc = launcher.run("worker", "--db", db, "--handler", store_fixtures.RECORD_HANDLER,
                        "--burst", TQ_LATENCY_MS="5", TQ_TRANSIENT_RATE="0.5")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(launcher.calls_by_key()) == ["t-00000", "t-00001"]
    assert status_of(db)["tasks"]["done"] == 2
