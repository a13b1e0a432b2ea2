"""Idempotency: the store contract and what the pool makes of it."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.support import WAIT, GatedFactory, wait_until

PAYLOAD = {"v": 1}
FP = hashlib.sha256(b'{"v":1}').hexdigest()

# A child that claims a key, reports the claim, then completes it when told to on stdin.
CHILD_HOLDS_CLAIM = """
import sys
import task_queue_optimized as tq
store = tq.IdempotencyManager(sys.argv[1], lease_seconds=float(sys.argv[3]))
claim = store.claim(sys.argv[2], fingerprint=tq.fingerprint({"v": 1}))
print(claim.state, flush=True)
sys.stdin.readline()
print(store.complete(sys.argv[2], claim.token, {"by": "child"}), flush=True)
store.close()
"""

# A child that runs one pool over the same database and prints what it did, as JSON.
CHILD_RUNS_POOL = """
import json, sys, time
import task_queue_optimized as tq
keys = sys.argv[2].split(",")
if len(sys.argv) > 4:  # wait for the parent's "go" so that all children start together
    sys.stdin.readline()
def handler(task):
    time.sleep(0.005)
    return {"by": sys.argv[3], "key": task.key}
with tq.WorkerPool(handler, workers=4, db_path=sys.argv[1], claim_poll_interval=0.01) as pool:
    records = pool.run([tq.Task(sys.argv[3] + "-" + k, {"v": 1}, idempotency_key=k) for k in keys])
print(json.dumps([[r.key, r.status.value, r.attempts, r.output] for r in records]))
"""


class TestIdempotencyManager:
    """IdempotencyManager: the simple surface and atomic claims."""

    def test_not_processed_initially(self, tmp_db: str) -> None:
        """A fresh store, in memory or on disk, knows no key."""
        for path in (None, tmp_db):
            with tq.IdempotencyManager(path) as store:
                assert store.is_processed("k") is False
                assert store.get_cached_output("k") is None
                assert store.stats() == {"in_progress": 0, "completed": 0, "failed": 0, "total": 0}

    def test_mark_and_check_processed(self, tmp_db: str) -> None:
        """mark_processed makes is_processed true for that key only, and it persists."""
        with tq.IdempotencyManager(tmp_db) as store:
            store.mark_processed("k", {"ok": True})
            assert store.is_processed("k") is True
            assert store.is_processed("other") is False
        with tq.IdempotencyManager(tmp_db) as store:
            assert store.is_processed("k") is True

    def test_get_cached_output(self, tmp_db: str) -> None:
        """The cached output round-trips JSON values exactly, across reopening the file."""
        output = {"s": "é", "n": 3, "f": 1.5, "l": [1, None, True], "d": {"x": []}}
        with tq.IdempotencyManager(tmp_db) as store:
            store.mark_processed("k", output)
            assert store.get_cached_output("k") == output
        with tq.IdempotencyManager(tmp_db) as store:
            assert store.get_cached_output("k") == output
            claim = store.claim("k")
            assert claim.state == "completed"
            assert claim.output == output
            assert claim.token is None

    def test_multiple_keys(self) -> None:
        """Keys are independent: each keeps its own output."""
        with tq.IdempotencyManager() as store:
            for i in range(20):
                store.mark_processed(f"k{i}", {"i": i})
            assert [store.get_cached_output(f"k{i}") for i in range(20)] == [
                {"i": i} for i in range(20)
            ]
            assert store.stats()["completed"] == 20
            assert store.stats()["total"] == 20
            assert store.is_processed("k20") is False

    @pytest.mark.timeout(20)
    def test_concurrent_duplicate_handling(self, tmp_db: str) -> None:
        """Of 16 threads claiming one key at the same moment exactly one wins."""
        states: list[str] = []
        lock = threading.Lock()
        barrier = threading.Barrier(16)
        with tq.IdempotencyManager(tmp_db) as store:

            def claim() -> None:
                barrier.wait(WAIT)
                result = store.claim("same")
                with lock:
                    states.append(result.state)

            threads = [threading.Thread(target=claim) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)
            assert sorted(states) == ["claimed"] + ["in_progress"] * 15
            assert store.stats()["in_progress"] == 1


class TestLeases:
    """Leases expire, stale tokens write nothing, renewals keep claims."""

    @pytest.mark.timeout(15)
    def test_lease_expiry_and_stale_token(self, tmp_db: str) -> None:
        """After a lease lapses the key is claimable; a stale complete() writes nothing."""
        # 1.5 s: the second claim must find the first one live even on a busy machine.
        with tq.IdempotencyManager(tmp_db, lease_seconds=1.5) as store:
            first = store.claim("k")
            assert first.state == "claimed"
            assert store.claim("k").state == "in_progress"
            claims: list[tq.Claim] = []
            # A lease lapses by the wall clock: no event to wait on, so poll with a deadline.
            wait_until(
                lambda: claims.append(store.claim("k")) or claims[-1].state == "claimed",
                "the lease to lapse",
                interval=0.01,
            )
            second = claims[-1]
            assert second.token != first.token
            assert store.complete("k", first.token, {"by": "stale"}) is False
            assert store.renew("k", first.token) is False
            assert store.get_cached_output("k") is None
            assert store.stats()["in_progress"] == 1
            assert store.complete("k", second.token, {"by": "fresh"}) is True
            assert store.complete("k", first.token, {"by": "stale"}) is False
            assert store.get_cached_output("k") == {"by": "fresh"}

    @pytest.mark.timeout(15)
    def test_renew_keeps_claim(self, tmp_db: str) -> None:
        """Renewing a 0.3 s lease keeps the claim for three lease lengths."""
        with (
            tq.IdempotencyManager(tmp_db, lease_seconds=0.3) as owner,
            tq.IdempotencyManager(tmp_db, lease_seconds=0.3) as rival,
        ):
            claim = owner.claim("k")
            end = time.monotonic() + 0.9
            while time.monotonic() < end:
                assert owner.renew("k", claim.token) is True
                assert rival.claim("k").state == "in_progress"
                time.sleep(0.03)
            assert owner.complete("k", claim.token, {"ok": 1}) is True

    @pytest.mark.timeout(20)
    def test_pool_renews_lease_of_long_task(
        self, tmp_db: str, gated: GatedFactory, make_pool: Callable
    ) -> None:
        """A handler running past its first lease keeps its claim and succeeds."""
        handler = gated()
        # The pool renews every third of the lease: a lease of 1.5 s leaves a loaded machine a
        # second to run the renewal (0.2 s left it 0.13 s, which a busy machine overran).
        pool = make_pool(handler, workers=1, db_path=tmp_db, lease_seconds=1.5)
        future = pool.submit(tq.Task("long", PAYLOAD))
        assert handler.wait_started("long")
        scope = pool.namespace  # the rival runs the same handler
        with tq.IdempotencyManager(tmp_db, lease_seconds=1.5) as rival:
            end = rival.lookup("long")["lease_expires"] + 0.5  # past the first lease
            while time.time() < end:
                assert rival.claim("long", FP, namespace=scope).state == "in_progress"
                time.sleep(0.03)
            handler.gate.set()
            record = future.result(WAIT)
            assert (record.status, record.attempts) == ("succeeded", 1)
            assert rival.claim("long", FP, namespace=scope).state == "completed"


class TestStoreFile:
    """What the store does to its file: permissions, WAL, TTL, bad paths."""

    def test_file_mode_0600(self, tmp_path: Path) -> None:
        """The database files are created with mode 0600 even under a permissive umask."""
        old = os.umask(0o022)
        try:
            path = tmp_path / "perm.db"
            with tq.IdempotencyManager(str(path)) as store:
                store.mark_processed("k", {"x": 1})
                files = [p for p in tmp_path.iterdir() if p.name.startswith("perm.db")]
                assert path in files
                for file in files:
                    assert stat.S_IMODE(file.stat().st_mode) == 0o600, file.name
        finally:
            os.umask(old)

    def test_pool_db_file_mode_0600(self, tmp_db: str) -> None:
        """A pool's db_path file is created with mode 0600."""
        old = os.umask(0o022)
        try:
            with tq.WorkerPool(lambda task: 1, workers=1, db_path=tmp_db) as pool:
                pool.run([tq.Task("t")])
            assert stat.S_IMODE(os.stat(tmp_db).st_mode) == 0o600
        finally:
            os.umask(old)

    def test_wal_mode(self, tmp_db: str) -> None:
        """The database file is in WAL journal mode."""
        with tq.IdempotencyManager(tmp_db) as store:
            store.mark_processed("k", 1)
        conn = sqlite3.connect(tmp_db)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        finally:
            conn.close()

    @pytest.mark.timeout(15)
    def test_purge_expired_with_ttl(self, tmp_db: str) -> None:
        """Completed keys older than ttl_seconds are purged and can run again."""
        with tq.IdempotencyManager(tmp_db, ttl_seconds=0.3) as store:
            store.mark_processed("old", {"x": 1})
            purged: list[int] = []
            # The TTL runs on the wall clock: no event exists, so poll with a deadline.
            wait_until(
                lambda: purged.append(store.purge_expired()) or sum(purged) >= 1,
                "the key to outlive its TTL",
                interval=0.01,
            )
            assert sum(purged) == 1
            assert store.is_processed("old") is False
            assert store.claim("old").state == "claimed"

    def test_purge_keeps_fresh_rows(self, tmp_db: str) -> None:
        """Without a TTL, or within it, purge_expired keeps completed keys."""
        with tq.IdempotencyManager(tmp_db, ttl_seconds=60) as store:
            store.mark_processed("fresh", 1)
            assert store.purge_expired() == 0
            assert store.is_processed("fresh")
        with tq.IdempotencyManager(tmp_db) as store:
            assert store.purge_expired() == 0
            assert store.is_processed("fresh")

    def test_bad_paths_raise_config_error(self, tmp_path: Path) -> None:
        """A directory or a file that is not SQLite is a ConfigError."""
        with pytest.raises(tq.ConfigError):
            tq.IdempotencyManager(str(tmp_path))
        junk = tmp_path / "junk.db"
        junk.write_text("this is not a database, just text " * 100)
        with pytest.raises(tq.ConfigError):
            tq.IdempotencyManager(str(junk))

    def test_durability_modes(self, tmp_db: str) -> None:
        """durability="full" stores like "normal"; an unknown mode is refused."""
        with tq.IdempotencyManager(tmp_db, durability="full") as store:
            store.mark_processed("k", {"x": 1})
        with tq.IdempotencyManager(tmp_db, durability="normal") as store:
            assert store.get_cached_output("k") == {"x": 1}
        with pytest.raises((ValueError, tq.ConfigError)):
            tq.IdempotencyManager(tmp_db, durability="sometimes")

    def test_bad_table_name(self) -> None:
        """A table name that is not a plain identifier is refused."""
        with pytest.raises(ValueError):
            tq.IdempotencyManager(table="x; DROP TABLE y")


class TestPoolIdempotency:
    """Idempotency through the WorkerPool, within one process and across processes."""

    @pytest.mark.timeout(20)
    def test_completed_by_earlier_pool(self, tmp_db: str, gated: GatedFactory) -> None:
        """A key completed by an earlier pool on the same file is a duplicate; no handler call."""
        first = gated(gated=False)
        with tq.WorkerPool(first, workers=2, db_path=tmp_db) as pool:
            (original,) = pool.run([tq.Task("t", PAYLOAD)])
        second = gated(gated=False)
        with tq.WorkerPool(second, workers=2, db_path=tmp_db) as pool:
            (again,) = pool.run([tq.Task("t", PAYLOAD)])
        assert original.status == "succeeded"
        assert (again.status, again.attempts, again.output) == ("duplicate", 0, original.output)
        assert second.total_calls == 0

    @pytest.mark.timeout(30)
    def test_completed_by_earlier_process(
        self, tmp_db: str, gated: GatedFactory, run_python: Callable
    ) -> None:
        """A key completed by another process on the same file is a duplicate with its output."""
        child = run_python(CHILD_RUNS_POOL, tmp_db, "k1,k2", "child")
        assert child.returncode == 0, child.stderr
        assert [row[1] for row in json.loads(child.stdout)] == ["succeeded", "succeeded"]
        handler = gated(gated=False)
        # The child's handler is another function: one namespace makes them the same handler.
        scope = "__main__.handler"
        with tq.WorkerPool(handler, workers=2, db_path=tmp_db, namespace=scope) as pool:
            records = pool.run([tq.Task("k1", PAYLOAD), tq.Task("k3", PAYLOAD)])
        assert records[0].status == "duplicate"
        assert records[0].output == {"by": "child", "key": "k1"}
        assert records[1].status == "succeeded"
        assert handler.calls == {"k3": 1}

    @pytest.mark.timeout(20)
    def test_in_flight_followers_share_success(
        self, gated: GatedFactory, make_pool: Callable
    ) -> None:
        """Followers of an in-flight key take no queue slot and become duplicates of its output."""
        handler = gated()
        pool = make_pool(handler, workers=1, queue_size=1, on_full="reject")
        leader = pool.submit(tq.Task("lead", PAYLOAD, idempotency_key="k"))
        assert handler.wait_started("lead")
        followers = [pool.submit(tq.Task(f"f{i}", PAYLOAD, idempotency_key="k")) for i in range(5)]
        assert pool.metrics.snapshot()["queue_depth"] == 0
        assert not any(f.done() for f in followers)
        handler.gate.set()
        lead = leader.result(WAIT)
        assert (lead.status, lead.attempts) == ("succeeded", 1)
        for future in followers:
            record = future.result(WAIT)
            assert (record.status, record.attempts) == ("duplicate", 0)
            assert record.output == lead.output
            assert record.key == "k"
        assert handler.calls == {"k": 1}

    @pytest.mark.timeout(20)
    def test_in_flight_followers_share_failure(
        self, gated: GatedFactory, make_pool: Callable
    ) -> None:
        """Followers of an in-flight key that fails get the same failure with attempts 0."""
        handler = gated(error=tq.PermanentError("disk on fire"))
        pool = make_pool(handler, workers=2)
        leader = pool.submit(tq.Task("lead", PAYLOAD, idempotency_key="k"))
        assert handler.wait_started("lead")
        followers = [pool.submit(tq.Task(f"f{i}", PAYLOAD, idempotency_key="k")) for i in range(3)]
        handler.gate.set()
        lead = leader.result(WAIT)
        assert (lead.status, lead.attempts, lead.error_kind) == ("failed", 1, "permanent")
        assert "disk on fire" in lead.error
        for future in followers:
            record = future.result(WAIT)
            assert (record.status, record.attempts) == ("failed", 0)
            assert (record.error, record.error_kind) == (lead.error, lead.error_kind)
        assert handler.calls == {"k": 1}

    @pytest.mark.timeout(20)
    def test_fingerprint_conflict_in_pool(self, gated: GatedFactory, make_pool: Callable) -> None:
        """Reusing a key with another payload fails as a conflict, stored or in flight."""
        handler = gated()
        pool = make_pool(handler, workers=2)
        leader = pool.submit(tq.Task("a", {"x": 1}, idempotency_key="k"))
        assert handler.wait_started("a")
        in_flight = pool.submit(tq.Task("b", {"x": 2}, idempotency_key="k")).result(WAIT)
        assert (in_flight.status, in_flight.error_kind, in_flight.attempts) == (
            "failed",
            "conflict",
            0,
        )
        handler.gate.set()
        assert leader.result(WAIT).status == "succeeded"
        stored = pool.submit(tq.Task("c", {"x": 3}, idempotency_key="k")).result(WAIT)
        assert (stored.status, stored.error_kind, stored.attempts) == ("failed", "conflict", 0)
        assert stored.error
        same = pool.submit(tq.Task("d", {"x": 1}, idempotency_key="k")).result(WAIT)
        assert same.status == "duplicate"
        assert handler.calls == {"k": 1}

    @pytest.mark.timeout(20)
    def test_released_after_failure_runs_again(self, tmp_db: str, make_pool: Callable) -> None:
        """A final failure releases the key, so a later submission runs the handler again."""
        calls: list[str] = []

        def flaky(task: tq.Task) -> dict:
            calls.append(task.id)
            if len(calls) == 1:
                raise tq.PermanentError("first time fails")
            return {"ok": True}

        pool = make_pool(flaky, workers=1, db_path=tmp_db)
        first = pool.submit(tq.Task("t", PAYLOAD)).result(WAIT)
        assert (first.status, first.error_kind) == ("failed", "permanent")
        assert pool.idempotency.stats()["failed"] == 1
        second = pool.submit(tq.Task("t", PAYLOAD)).result(WAIT)
        assert (second.status, second.attempts, second.output) == ("succeeded", 1, {"ok": True})
        assert calls == ["t", "t"]
        assert pool.idempotency.stats()["completed"] == 1

    @pytest.mark.timeout(20)
    def test_waits_for_other_owner_then_duplicate(
        self, tmp_db: str, gated: GatedFactory, make_pool: Callable
    ) -> None:
        """A key claimed elsewhere waits without a worker, then is a duplicate of that owner."""
        handler = gated(gated=False)
        with tq.IdempotencyManager(tmp_db) as other:
            claim = other.claim("k", fingerprint=FP)
            assert claim.state == "claimed"
            pool = make_pool(handler, workers=1, db_path=tmp_db, claim_poll_interval=0.01)
            waiting = pool.submit(tq.Task("k", PAYLOAD))
            # The single worker is free for the next task while the first one waits.
            assert pool.submit(tq.Task("next", PAYLOAD)).result(WAIT).status == "succeeded"
            assert not waiting.done()
            assert other.complete("k", claim.token, {"by": "other"}) is True
            record = waiting.result(WAIT)
        assert (record.status, record.attempts, record.output) == ("duplicate", 0, {"by": "other"})
        assert "k" not in handler.calls

    @pytest.mark.timeout(20)
    def test_other_owner_lease_expires_then_runs(
        self, tmp_db: str, gated: GatedFactory, make_pool: Callable
    ) -> None:
        """A key whose other owner stops renewing is claimed by the pool after the lease."""
        handler = gated(gated=False)
        with tq.IdempotencyManager(tmp_db, lease_seconds=0.2) as other:
            claim = other.claim("k", fingerprint=FP)
            pool = make_pool(handler, workers=1, db_path=tmp_db, claim_poll_interval=0.01)
            record = pool.submit(tq.Task("k", PAYLOAD)).result(WAIT)
            assert (record.status, record.attempts) == ("succeeded", 1)
            assert handler.calls == {"k": 1}
            assert other.complete("k", claim.token, {"by": "other"}) is False
            assert other.get_cached_output("k") == record.output

    @pytest.mark.timeout(20)
    def test_cancel_while_waiting_on_other_owner(
        self, tmp_db: str, gated: GatedFactory, make_pool: Callable
    ) -> None:
        """shutdown(cancel_pending=True) cancels a task waiting on another owner's claim."""
        handler = gated(gated=False)
        with tq.IdempotencyManager(tmp_db) as other:
            other.claim("k", fingerprint=FP)
            pool = make_pool(handler, workers=1, db_path=tmp_db, claim_poll_interval=0.01)
            waiting = pool.submit(tq.Task("k", PAYLOAD))
            assert pool.submit(tq.Task("next", PAYLOAD)).result(WAIT).status == "succeeded"
            pool.shutdown(wait=True, cancel_pending=True)
            record = waiting.result(WAIT)
            assert (record.status, record.attempts) == ("cancelled", 0)
            assert other.stats()["in_progress"] == 1
        assert "k" not in handler.calls

    @pytest.mark.timeout(30)
    def test_waits_for_other_process(
        self, tmp_db: str, gated: GatedFactory, make_pool: Callable, spawn_python: Callable
    ) -> None:
        """A key claimed by a live child process resolves as duplicate once the child completes."""
        child = spawn_python(CHILD_HOLDS_CLAIM, tmp_db, "k", "30")
        assert child.stdout.readline().strip() == "claimed"
        handler = gated(gated=False)
        pool = make_pool(handler, workers=1, db_path=tmp_db, claim_poll_interval=0.01)
        waiting = pool.submit(tq.Task("k", PAYLOAD))
        assert pool.submit(tq.Task("next", PAYLOAD)).result(WAIT).status == "succeeded"
        assert not waiting.done()
        out, err = child.communicate("go\n", timeout=WAIT)
        assert child.returncode == 0, err
        assert out.strip() == "True"
        record = waiting.result(WAIT)
        assert (record.status, record.attempts, record.output) == ("duplicate", 0, {"by": "child"})
        assert "k" not in handler.calls

    @pytest.mark.timeout(30)
    def test_claim_of_killed_process_expires(
        self, tmp_db: str, gated: GatedFactory, make_pool: Callable, spawn_python: Callable
    ) -> None:
        """The claim of a killed process expires after its lease and the pool runs the task."""
        child = spawn_python(CHILD_HOLDS_CLAIM, tmp_db, "k", "0.3")
        assert child.stdout.readline().strip() == "claimed"
        child.kill()
        child.communicate(timeout=WAIT)
        handler = gated(gated=False)
        pool = make_pool(handler, workers=1, db_path=tmp_db, claim_poll_interval=0.01)
        record = pool.submit(tq.Task("k", PAYLOAD)).result(WAIT)
        assert (record.status, record.attempts) == ("succeeded", 1)
        assert handler.calls == {"k": 1}

    @pytest.mark.timeout(40)
    def test_processes_share_one_file(self, tmp_path: Path, spawn_python: Callable) -> None:
        """Four processes racing on one new file run every key exactly once, without errors."""
        db = str(tmp_path / "shared.db")
        keys = ",".join(f"k{i}" for i in range(20))
        procs = [spawn_python(CHILD_RUNS_POOL, db, keys, f"c{n}", "wait") for n in range(4)]
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [proc.communicate(timeout=30) for proc in procs]
        for proc, (_, err) in zip(procs, results, strict=True):
            assert proc.returncode == 0, err
            assert "locked" not in err
        rows = [row for out, _ in results for row in json.loads(out)]
        executed = [key for key, status, attempts, _ in rows if status == "succeeded"]
        assert sorted(executed) == sorted(keys.split(","))
        assert all(status in ("succeeded", "duplicate") for _, status, _, _ in rows)
        with tq.IdempotencyManager(db) as store:
            assert store.stats()["completed"] == 20


# The keys table as databases created before namespaces have it.
LEGACY_SQLITE_KEYS = """
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY NOT NULL, state TEXT NOT NULL, fingerprint TEXT,
    token INTEGER NOT NULL, output TEXT, error TEXT, lease_expires REAL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL) WITHOUT ROWID
"""
LEGACY_POSTGRES_KEYS = """
CREATE TABLE {schema}.idempotency (
    key TEXT PRIMARY KEY, state TEXT NOT NULL, fingerprint TEXT, token BIGINT NOT NULL,
    output TEXT, error TEXT, lease_expires DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)
"""


def emails(task: tq.Task) -> dict:
    return {"sent": task.key}


def reports(task: tq.Task) -> dict:
    return {"report": task.key}


class Fetcher:
    """A callable object: its class names its namespace."""

    def __call__(self, task: tq.Task) -> dict:
        return {"fetched": task.key}


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Return a store URL for each backend (a fresh PostgreSQL schema, dropped afterwards)."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return str(tmp_path / "keys.db")
    return request.getfixturevalue("pg_url")


class TestNamespaces:
    """Keys are scoped by the handler that owns them, or by an explicit namespace."""

    def test_handler_namespace_names_function_or_class(self) -> None:
        """A function is named by its module and qualified name; a callable object by its class."""
        assert tq.handler_namespace(emails) == "tests.test_idempotency.emails"
        assert tq.handler_namespace(Fetcher()) == "tests.test_idempotency.Fetcher"
        assert tq.handler_namespace(tq.TaskProcessor()) == "task_queue_optimized.TaskProcessor"
        with tq.WorkerPool(emails, workers=1) as pool:
            assert pool.namespace == "tests.test_idempotency.emails"
        with tq.WorkerPool(emails, workers=1, namespace="mail") as pool:
            assert pool.namespace == "mail"

    @pytest.mark.parametrize("bad", ["", "  ", "a\nb", 3])
    def test_bad_namespace_is_refused(self, bad: object) -> None:
        """An empty, blank, multi-line or non-string namespace is a ValueError naming it."""
        with pytest.raises(ValueError, match="namespace"):
            tq.WorkerPool(emails, workers=1, namespace=bad)  # type: ignore[arg-type]

    def test_two_handlers_on_one_database_keep_their_outcomes(self, store_url: str) -> None:
        """Emails and reports both keyed user-42 each run once, and each sees its own output."""
        task = tq.Task("t", {"v": 1}, idempotency_key="user-42")
        with tq.IdempotencyManager(store_url) as manager:
            runs = {}
            for handler in (emails, reports, emails, reports):
                with tq.WorkerPool(handler, workers=1, idempotency=manager) as pool:
                    record = pool.submit(task).result(WAIT)
                runs.setdefault(handler.__name__, []).append((record.status, record.output))
            assert runs == {
                "emails": [("succeeded", {"sent": "user-42"}), ("duplicate", {"sent": "user-42"})],
                "reports": [
                    ("succeeded", {"report": "user-42"}),
                    ("duplicate", {"report": "user-42"}),
                ],
            }
            # The simple surface answers for the key whichever handler completed it.
            assert manager.is_processed("user-42")
            assert manager.get_cached_output("user-42") in (
                {"sent": "user-42"},
                {"report": "user-42"},
            )
            assert manager.stats()["completed"] == 2

    def test_simulator_completions_never_answer_for_a_handler(self, store_url: str) -> None:
        """Keys the built-in simulator completed run again for a real handler."""
        tasks = [tq.Task(f"t{i}") for i in range(3)]
        with tq.IdempotencyManager(store_url) as manager:
            with tq.WorkerPool(tq.TaskProcessor(latency_ms=0, jitter_ms=0), workers=2,
                               idempotency=manager) as pool:  # fmt: skip
                assert {r.status for r in pool.run(tasks)} == {"succeeded"}
            fetcher = Fetcher()
            with tq.WorkerPool(fetcher, workers=2, idempotency=manager) as pool:
                records = pool.run(tasks)
            assert [(r.status, r.output) for r in records] == [
                ("succeeded", {"fetched": f"t{i}"}) for i in range(3)
            ]

    def test_a_namespace_keeps_keys_across_a_renamed_handler(self, tmp_db: str) -> None:
        """Two handler functions given one namespace share their completed keys."""
        task = tq.Task("t", {"v": 1})
        with tq.WorkerPool(emails, workers=1, db_path=tmp_db, namespace="mail") as pool:
            assert pool.submit(task).result(WAIT).status == "succeeded"
        with tq.WorkerPool(reports, workers=1, db_path=tmp_db, namespace="mail") as pool:
            record = pool.submit(task).result(WAIT)
        assert (record.status, record.output) == ("duplicate", {"sent": "t"})

    @pytest.mark.timeout(30)
    def test_durable_queue_completes_under_the_handler_namespace(self, store_url: str) -> None:
        """A task enqueued and served by a handler's worker is completed in its namespace."""
        store = tq.open_store(store_url)
        manager = tq.IdempotencyManager(store=store)
        try:
            assert store.enqueue_many([tq.Task("a"), tq.Task("b")]) == 2
            pool = tq.WorkerPool(Fetcher(), workers=2, idempotency=manager, durable=True)
            stop = threading.Event()
            serving = threading.Thread(
                target=pool.serve, args=(stop,), kwargs={"poll_interval": 0.05}
            )
            serving.start()
            try:
                wait_until(
                    lambda: store.queue_status()["tasks"]["done"] == 2, "both tasks", interval=0.01
                )
            finally:
                stop.set()
                serving.join(WAIT)
                pool.shutdown(wait=True)
            for key in ("a", "b"):
                row = manager.lookup(key, namespace="tests.test_idempotency.Fetcher")
                assert row is not None and row["state"] == "completed"
                assert manager.lookup(key, namespace="task_queue_optimized.TaskProcessor") is None
        finally:
            store.close()


class TestLegacyDatabase:
    """A database from before namespaces opens, migrates in place and keeps its keys."""

    @pytest.mark.timeout(30)
    def test_sqlite_file_is_migrated_once_by_concurrent_openers(self, tmp_db: str) -> None:
        """Four openers at once migrate an old file; its completed key stays a duplicate."""
        conn = sqlite3.connect(tmp_db)
        conn.execute(LEGACY_SQLITE_KEYS)
        conn.execute(
            "INSERT INTO idempotency VALUES ('old', 'completed', NULL, 7, '{\"v\": 1}', NULL, "
            "NULL, 1.0, ?)",
            (time.time(),),
        )
        conn.commit()
        conn.close()
        barrier = threading.Barrier(4)
        errors: list[BaseException] = []

        def open_it() -> None:
            try:
                barrier.wait(WAIT)
                with tq.IdempotencyManager(tmp_db) as manager:
                    assert manager.is_processed("old")
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
        assert errors == []
        conn = sqlite3.connect(tmp_db)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(idempotency)")]
        assert "namespace" in columns
        conn.close()
        self._check_adoption(tmp_db)

    def test_postgres_schema_is_migrated(self, pg_url: str) -> None:
        """An old PostgreSQL keys table gets its namespace column and keeps its completed key."""
        schema = store_fixtures.schema_of(pg_url)
        store_fixtures.pg_execute(f"CREATE SCHEMA {schema}")
        store_fixtures.pg_execute(LEGACY_POSTGRES_KEYS.format(schema=schema))
        store_fixtures.pg_execute(
            f"INSERT INTO {schema}.idempotency VALUES ('old', 'completed', NULL, 7, "
            "'{\"v\": 1}', NULL, NULL, 1.0, %s)",
            (time.time(),),
        )
        self._check_adoption(pg_url)

    @staticmethod
    def _check_adoption(url: str) -> None:
        # The first handler to claim a legacy key adopts it (a duplicate); another runs its own.
        calls: list[str] = []

        def first(task: tq.Task) -> dict:
            calls.append(task.id)
            return {"v": 2}

        with tq.IdempotencyManager(url) as manager:
            with tq.WorkerPool(first, workers=1, idempotency=manager) as pool:
                record = pool.submit(tq.Task("old")).result(WAIT)
            assert (record.status, record.output, calls) == ("duplicate", {"v": 1}, [])
            with tq.WorkerPool(reports, workers=1, idempotency=manager) as pool:
                record = pool.submit(tq.Task("old")).result(WAIT)
            assert (record.status, record.output) == ("succeeded", {"report": "old"})
            assert manager.stats()["completed"] == 2


class TestOpenPools:
    """A pool already open sees what other connections write."""

    @pytest.mark.timeout(30)
    def test_an_open_pool_adopts_a_completion_marked_elsewhere(self, store_url: str) -> None:
        """Manager B marks k1 while pool A is running: A answers k1 as a duplicate, unrun."""
        calls: list[str] = []

        def run(task: tq.Task) -> dict:
            calls.append(task.id)
            return {"ran": task.id}

        with tq.IdempotencyManager(store_url) as first:
            other = first if store_url == "memory://" else tq.IdempotencyManager(store_url)
            try:
                with tq.WorkerPool(run, workers=1, idempotency=first) as pool:
                    assert pool.submit(tq.Task("k0")).result(WAIT).status == "succeeded"
                    other.mark_processed("k1", {"marked": True})
                    record = pool.submit(tq.Task("k1")).result(WAIT)
            finally:
                if other is not first:
                    other.close()
        assert (record.status, record.output, calls) == ("duplicate", {"marked": True}, ["k0"])


BAD_KEYS = ["", "a\x00b", "\ud800", 5, None]


class TestKeyValidation:
    """Every public method of IdempotencyManager refuses a key no store can keep, the same way
    on every store, before the store is touched."""

    @pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
    def test_a_bad_key_is_a_value_error_naming_it(self, store_url: str, key: object) -> None:
        calls: list[Callable[[], object]] = [
            lambda: manager.claim(key),  # type: ignore[arg-type]
            lambda: manager.claim_many([(key, None)]),  # type: ignore[list-item]
            lambda: manager.claim_many([("fine", None), (key, None)]),  # type: ignore[list-item]
            lambda: manager.complete(key, 1, {}),  # type: ignore[arg-type]
            lambda: manager.complete_many([(key, 1, "{}")]),  # type: ignore[list-item]
            lambda: manager.renew(key, 1),  # type: ignore[arg-type]
            lambda: manager.renew_many([(key, 1)]),  # type: ignore[list-item]
            lambda: manager.release(key, 1),  # type: ignore[arg-type]
            lambda: manager.lookup(key),  # type: ignore[arg-type]
            lambda: manager.is_processed(key),  # type: ignore[arg-type]
            lambda: manager.mark_processed(key, 1),  # type: ignore[arg-type]
            lambda: manager.get_cached_output(key),  # type: ignore[arg-type]
        ]
        with tq.IdempotencyManager(store_url) as manager:
            for call in calls:
                with pytest.raises(ValueError, match=r"^idempotency key .* must ") as caught:
                    call()
                assert repr(key) in str(caught.value)
            assert manager.stats()["total"] == 0  # nothing reached the store

    @pytest.mark.parametrize("token", ["1", 2**63, -(2**63) - 1, 1.5, True, None], ids=repr)
    def test_a_bad_token_is_a_value_error(self, store_url: str, token: object) -> None:
        with tq.IdempotencyManager(store_url) as manager:
            calls = [(manager.complete, ("k", token, {})), (manager.renew, ("k", token)),
                     (manager.release, ("k", token))]  # fmt: skip
            for call, args in calls:
                with pytest.raises(ValueError, match="token must be"):
                    call(*args)  # type: ignore[operator]
            assert manager.stats()["total"] == 0

    @pytest.mark.parametrize("namespace", ["a\x00b", "\ud800", 5], ids=repr)
    def test_a_bad_namespace_or_fingerprint_is_a_value_error(
        self, store_url: str, namespace: object
    ) -> None:
        with tq.IdempotencyManager(store_url) as manager:
            with pytest.raises(ValueError, match=r"^namespace "):
                manager.claim("k", namespace=namespace)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=r"^namespace "):
                manager.mark_processed("k", 1, namespace=namespace)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=r"^namespace "):
                manager.lookup("k", namespace=namespace)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=r"^fingerprint "):
                manager.claim("k", namespace)  # type: ignore[arg-type]
            assert manager.stats()["total"] == 0


def test_cached_output_is_one_read_so_a_racing_purge_cannot_break_it(
    tmp_path: Path,
) -> None:
    """get_cached_output answers from one read of the key: a purge (or expiry) racing with it
    gives None or the output, never an error."""
    manager = tq.IdempotencyManager(tmp_path / "keys.db")
    manager.mark_processed("k", {"v": 1})
    store = manager.store
    reads: list[str] = []
    lookup = store.lookup

    def lookup_then_purge(key: str, namespace: str | None = None) -> dict[str, object] | None:
        row = lookup(key, namespace)
        reads.append(key)
        with sqlite3.connect(tmp_path / "keys.db") as other:  # a purge by another process
            other.execute("DELETE FROM idempotency")
        return row

    store.lookup = lookup_then_purge  # type: ignore[method-assign]
    try:
        assert manager.get_cached_output("k") == {"v": 1}
        assert reads == ["k"]
        assert manager.get_cached_output("k") is None
    finally:
        manager.close()
