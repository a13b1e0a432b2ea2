"""The Store contract, run against every backend: memory://, a SQLite file, a PostgreSQL schema.

Each test takes the parametrized `backend` fixture, so one test body checks one promise of the
`Store` protocol on all three stores. Leases that must run out are short, and the tests poll for
their expiry with a deadline instead of sleeping a guessed time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.store_fixtures import Backend, require_psycopg
from tests.support import WAIT, wait_until

DONE, FAILED, QUEUED = tq.EntryState.DONE, tq.EntryState.FAILED, tq.EntryState.QUEUED
CLAIMED, COMPLETED = tq.ClaimState.CLAIMED, tq.ClaimState.COMPLETED
IN_PROGRESS, CONFLICT = tq.ClaimState.IN_PROGRESS, tq.ClaimState.CONFLICT
SHORT_LEASE = 0.3  # for the tests that wait for a lease to run out
FP1, FP2 = tq.fingerprint({"n": 1}), tq.fingerprint({"n": 2})


def out(value: Any) -> str:
    return json.dumps(value)


def claim(store: Any, key: str, fp: str | None = None) -> tq.Claim:
    return store.claim_many([(key, fp)])[0]


def task_counts(store: Any) -> dict[str, int]:
    return store.queue_status()["tasks"]


def ids(taken: list[Any]) -> set[str]:
    return {item.task.id for item in taken}


# --- Idempotency ---------------------------------------------------------------------------------


def test_claim_answers_claimed_then_in_progress_then_completed(backend: Backend) -> None:
    first, other = backend.stores(2)
    won = claim(first, "k", FP1)
    assert won.state is CLAIMED
    assert isinstance(won.token, int)
    assert won.lease_expires is not None and won.lease_expires > time.time()
    busy = claim(other, "k", FP1)
    assert busy.state is IN_PROGRESS
    assert busy.token is None
    assert busy.lease_expires == pytest.approx(won.lease_expires, abs=1e-3)
    assert first.complete_many([("k", won.token, out({"answer": 42}))]) == [True]
    done = claim(other, "k", FP1)
    assert done.state is COMPLETED
    assert done.output == {"answer": 42}
    assert done.token is None


def test_claim_many_answers_in_order_in_one_call(backend: Backend) -> None:
    store = backend.open()
    assert claim(store, "held").state is CLAIMED
    finished = claim(store, "finished")
    store.complete_many([("finished", finished.token, out("cached"))])
    claims = store.claim_many([("new", None), ("held", None), ("finished", None), ("new2", FP1)])
    assert [c.state for c in claims] == [CLAIMED, IN_PROGRESS, COMPLETED, CLAIMED]
    assert claims[2].output == "cached"
    assert claims[0].token != claims[3].token


def test_complete_with_a_stale_token_writes_nothing(backend: Backend) -> None:
    store = backend.open(lease_seconds=SHORT_LEASE)
    old = claim(store, "k")
    assert old.state is CLAIMED
    new = wait_until(
        lambda: (c := claim(store, "k")).state is CLAIMED and c, "the lease to run out"
    )
    assert new.token != old.token
    assert store.complete_many([("k", old.token, out("late"))]) == [False]
    assert store.renew_many([("k", old.token)]) == 0
    assert store.release_many([("k", old.token, "late failure")]) == 0
    row = store.lookup("k")
    assert row["state"] == "in_progress"
    assert row["output"] is None and row["error"] is None
    assert store.complete_many([("k", new.token, out("fresh"))]) == [True]
    assert store.lookup("k")["output"] == "fresh"
    # A completed key is no longer owned by anyone: its token cannot write again.
    assert store.complete_many([("k", new.token, out("again"))]) == [False]
    assert store.lookup("k")["output"] == "fresh"


@pytest.fixture
def seeded_alike() -> Any:
    """Restore the global `random` generator after a test that seeds it."""
    state = random.getstate()
    yield random.seed
    random.setstate(state)


def test_tokens_do_not_follow_the_seed_of_the_global_random(
    backend: Backend, seeded_alike: Any
) -> None:
    # Two processes that seed `random` alike must still fence each other out.
    stalled, other = backend.stores(2, lease_seconds=SHORT_LEASE)
    seeded_alike(1234)
    old = claim(stalled, "k")
    wait_until(lambda: time.time() > old.lease_expires, "the claim's lease to run out")
    seeded_alike(1234)
    new = claim(other, "k")
    assert new.state is CLAIMED and new.token != old.token
    assert stalled.complete_many([("k", old.token, out("stale"))]) == [False]
    # The durable queue's tokens likewise.
    stalled.enqueue_many([tq.Task("t")])
    seeded_alike(99)
    (first,) = stalled.take_many("stalled", 1)
    wait_until(lambda: other.queue_status()["stalled"] == 1, "the task's lease to run out")
    seeded_alike(99)
    (second,) = other.take_many("other", 1)
    assert second.token != first.token
    assert stalled.settle_many([("t", first.token, DONE, None)]) == 0


def test_complete_many_is_per_item(backend: Backend) -> None:
    store = backend.open()
    a, b = store.claim_many([("a", None), ("b", None)])
    written = store.complete_many([("a", a.token, out(1)), ("b", b.token + 1, out(2))])
    assert written == [True, False]
    assert store.lookup("a")["state"] == "completed"
    assert store.lookup("b")["state"] == "in_progress"
    assert store.complete_many([]) == []


def test_renew_extends_the_lease_of_the_owner_only(backend: Backend) -> None:
    store = backend.open(lease_seconds=5.0)
    won = claim(store, "k")
    before = store.lookup("k")["lease_expires"]
    asked = time.time()
    assert store.renew_many([("k", won.token)]) == 1
    after = store.lookup("k")["lease_expires"]
    assert after >= before
    assert after >= asked + 5.0 - 0.01
    assert store.renew_many([("k", won.token ^ 1), ("missing", 7)]) == 0
    assert store.renew_many([]) == 0


def test_renew_keeps_a_claim_from_expiring(backend: Backend) -> None:
    owner, rival = backend.stores(2, lease_seconds=1.0)
    won = claim(owner, "k")
    # Renew until the original lease has surely ended, then look: the key is still held.
    original_end = won.lease_expires
    while time.time() < original_end + 0.2:
        assert owner.renew_many([("k", won.token)]) == 1
        time.sleep(0.1)
    assert owner.renew_many([("k", won.token)]) == 1
    assert claim(rival, "k").state is IN_PROGRESS


def test_release_makes_the_key_claimable_and_counts_it_failed(backend: Backend) -> None:
    store = backend.open()
    won = claim(store, "k", FP1)
    assert store.release_many([("k", won.token, "boom")]) == 1
    row = store.lookup("k")
    assert row["state"] == "failed"
    assert row["error"] == "boom"
    assert row["lease_expires"] is None
    assert store.stats()["failed"] == 1
    assert store.release_many([("k", won.token, "twice")]) == 0
    again = claim(store, "k", FP1)
    assert again.state is CLAIMED
    assert again.token != won.token
    row = store.lookup("k")
    assert row["state"] == "in_progress"
    assert row["error"] is None


def test_a_different_fingerprint_is_a_conflict(backend: Backend) -> None:
    store = backend.open()
    won = claim(store, "k", FP1)
    assert claim(store, "k", FP2).state is CONFLICT  # while in progress
    store.complete_many([("k", won.token, out("one"))])
    assert claim(store, "k", FP2).state is CONFLICT  # once completed
    assert claim(store, "k", FP1).state is COMPLETED
    assert claim(store, "k", None).state is COMPLETED  # None skips the check
    assert store.lookup("k")["fingerprint"] == FP1
    # A failed key keeps its fingerprint: only the same payload may take it over.
    won = claim(store, "f", FP1)
    store.release_many([("f", won.token, "boom")])
    assert claim(store, "f", FP2).state is CONFLICT
    assert claim(store, "f", FP1).state is CLAIMED


def test_a_claim_without_fingerprint_takes_the_first_real_one_later(backend: Backend) -> None:
    store = backend.open()
    won = claim(store, "k", None)
    store.release_many([("k", won.token, None)])
    assert claim(store, "k", FP2).state is CLAIMED
    assert store.lookup("k")["fingerprint"] == FP2


def test_lookup_returns_the_public_row_or_none(backend: Backend) -> None:
    store = backend.open()
    assert store.lookup("missing") is None
    won = claim(store, "k", FP1)
    row = store.lookup("k")
    assert set(row) >= {"state", "fingerprint", "output", "error", "lease_expires", "updated_at"}
    assert row["state"] == "in_progress"
    assert row["fingerprint"] == FP1
    assert row["lease_expires"] == pytest.approx(won.lease_expires, abs=1e-3)
    store.complete_many([("k", won.token, out({"nested": [1, 2.5, None, "x"]}))])
    row = store.lookup("k")
    assert row["state"] == "completed"
    assert row["output"] == {"nested": [1, 2.5, None, "x"]}
    assert row["lease_expires"] is None
    assert row["updated_at"] <= time.time()


def test_mark_processed_completes_a_key_whoever_holds_it(backend: Backend) -> None:
    store = backend.open()
    store.mark_processed("fresh", out({"v": 1}))
    assert store.lookup("fresh")["state"] == "completed"
    assert claim(store, "fresh").output == {"v": 1}
    held = claim(store, "held")
    store.mark_processed("held", out("marked"))
    assert claim(store, "held").state is COMPLETED
    assert store.complete_many([("held", held.token, out("late"))]) == [False]
    assert store.lookup("held")["output"] == "marked"
    store.mark_processed("fresh", out({"v": 2}))  # marking again overwrites
    assert store.lookup("fresh")["output"] == {"v": 2}


def test_a_claim_adopts_keys_another_store_marked_without_a_namespace(backend: Backend) -> None:
    """Rows written without a namespace by another connection, after this one opened, are adopted
    by its claims: alone, and in a batch."""
    first, second = backend.stores(2)
    assert claim_in(first, ["warm-up"]) == [CLAIMED]  # the first store has claimed before
    for key in ("alone", "k1", "k2"):
        second.mark_processed(key, out(key))
    assert claim_in(first, ["alone"]) == [COMPLETED]
    claims = first.claim_many([("k1", None), ("fresh", None), ("k2", None)], "ns")
    assert [(c.state, c.output) for c in claims] == [
        (COMPLETED, "k1"),
        (CLAIMED, None),
        (COMPLETED, "k2"),
    ]
    assert first.lookup("k1", "ns")["state"] == "completed"
    assert first.lookup("k1", "") is None  # adopted: moved into the namespace
    # Another namespace finds it owned already, and runs its own.
    assert claim_in(second, ["k1"], "other") == [CLAIMED]


def claim_in(store: Any, keys: list[str], namespace: str = "ns") -> list[Any]:
    return [c.state for c in store.claim_many([(key, None) for key in keys], namespace)]


def test_stats_count_rows_by_state(backend: Backend) -> None:
    store = backend.open()
    assert store.stats() == {"in_progress": 0, "completed": 0, "failed": 0, "total": 0}
    claims = store.claim_many([(f"k{i}", None) for i in range(6)])
    store.complete_many([(f"k{i}", claims[i].token, out(i)) for i in range(3)])
    store.release_many([("k3", claims[3].token, "boom")])
    assert store.stats() == {"in_progress": 2, "completed": 3, "failed": 1, "total": 6}


def test_ttl_makes_an_old_completed_key_claimable_again(backend: Backend) -> None:
    store = backend.open(ttl_seconds=1.0)
    won = claim(store, "k")
    store.complete_many([("k", won.token, out("old"))])
    assert claim(store, "k").state is COMPLETED
    manager = tq.IdempotencyManager(store=store)
    assert manager.is_processed("k")
    again = wait_until(lambda: (c := claim(store, "k")).state is CLAIMED and c, "the TTL")
    assert again.token != won.token
    assert store.lookup("k")["output"] is None


def test_purge_expired_deletes_finished_rows_older_than_the_age(backend: Backend) -> None:
    store = backend.open()
    claims = store.claim_many([("done", None), ("failed", None), ("running", None)])
    store.complete_many([("done", claims[0].token, out(1))])
    store.release_many([("failed", claims[1].token, "boom")])
    store.enqueue_many([tq.Task(f"t{i}") for i in range(4)])
    token = {item.task.id: item.token for item in store.take_many("w", 4)}
    store.settle_many(
        [
            ("t0", token["t0"], DONE, None),
            ("t1", token["t1"], FAILED, "boom"),
            ("t3", token["t3"], QUEUED, None),
        ]
    )
    assert store.purge_expired() == 0  # no TTL and no age: nothing is old
    assert store.purge_expired(3600.0) == 0  # nothing is an hour old
    assert store.purge_expired(0.0) == 4  # two keys and two tasks
    assert store.lookup("done") is None and store.lookup("failed") is None
    assert store.lookup("running")["state"] == "in_progress"
    assert task_counts(store) == {"queued": 1, "running": 1, "done": 0, "failed": 0}
    assert store.purge_expired(0.0) == 0


def test_purge_expired_uses_the_ttl_by_default(backend: Backend) -> None:
    store = backend.open(ttl_seconds=0.5)
    won = claim(store, "k")
    store.complete_many([("k", won.token, out(1))])
    wait_until(lambda: store.purge_expired() == 1, "the completed key to pass its TTL")
    assert store.lookup("k") is None
    assert store.stats()["total"] == 0


def test_concurrent_claims_of_one_key_have_one_winner(backend: Backend) -> None:
    threads = 4
    keys = [f"k{i}" for i in range(24)]
    stores = backend.stores(threads)
    barrier = threading.Barrier(threads)
    results: list[list[tuple[str, tq.Claim]]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def contend(index: int) -> None:
        order = keys[:]
        random.Random(index).shuffle(order)
        try:
            barrier.wait(10)
            for start in range(0, len(order), 4):
                batch = order[start : start + 4]
                claims = stores[index].claim_many([(key, FP1) for key in batch])
                results[index].extend(zip(batch, claims, strict=True))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=contend, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(30)
    assert not errors, errors
    winners = Counter(key for answers in results for key, c in answers if c.state is CLAIMED)
    assert winners == Counter(dict.fromkeys(keys, 1))
    losers = {c.state for answers in results for _, c in answers if c.state is not CLAIMED}
    assert losers <= {IN_PROGRESS}


# --- Durable queue -------------------------------------------------------------------------------


def test_enqueue_many_is_idempotent_by_id(backend: Backend) -> None:
    store = backend.open()
    assert store.enqueue_many([tq.Task("a", {"v": 1}), tq.Task("b")]) == 2
    assert store.enqueue_many([tq.Task("a", {"v": 1}), tq.Task("b"), tq.Task("c")]) == 1
    assert store.enqueue_many([]) == 0
    assert task_counts(store) == {"queued": 3, "running": 0, "done": 0, "failed": 0}
    taken = {item.task.id: item.task for item in store.take_many("w", 10)}
    assert taken["a"].payload == {"v": 1}


@pytest.mark.parametrize(
    "changed",
    [tq.Task("a", {"v": 2}), tq.Task("a", {"v": 1}, idempotency_key="other")],
    ids=["payload", "key"],
)
def test_enqueue_many_refuses_a_known_id_with_another_task_and_adds_nothing(
    backend: Backend, changed: tq.Task
) -> None:
    store = backend.open()
    assert store.enqueue_many([tq.Task("a", {"v": 1})]) == 1
    with pytest.raises(tq.TaskConflictError, match="'a'") as caught:
        store.enqueue_many([tq.Task("0-new", {"v": 0}), changed, tq.Task("z-new")])
    assert caught.value.task_id == "a"
    assert task_counts(store)["queued"] == 1  # neither new task went in
    [item] = store.take_many("w", 10)
    assert item.task == tq.Task("a", {"v": 1})
    # The same id twice in one batch with different tasks is refused the same way.
    with pytest.raises(tq.TaskConflictError, match="'b'"):
        store.enqueue_many([tq.Task("b", {"v": 1}), tq.Task("b", {"v": 2})])
    assert task_counts(store)["queued"] == 0


@pytest.mark.parametrize("state", ["queued", "running", "done", "failed"])
def test_take_task_refuses_a_known_id_with_another_payload_in_every_state(
    backend: Backend, state: str
) -> None:
    store = backend.open()
    original = tq.Task("a", {"v": 1})
    store.enqueue_many([original])
    if state != "queued":
        [item] = store.take_many("w1", 1)
        if state != "running":
            store.settle_many([("a", item.token, tq.EntryState(state), None)])
    before = task_counts(store)
    with pytest.raises(tq.TaskConflictError, match="'a'"):
        store.take_task(tq.Task("a", {"v": 2}), "w2")
    assert task_counts(store) == before
    if state in ("queued", "failed"):
        # The identical task is still taken as before, and carries the stored payload.
        assert store.take_task(original, "w2") is not None


def test_take_many_round_trips_the_task(backend: Backend) -> None:
    store = backend.open()
    sent = [
        tq.Task("plain"),
        tq.Task("keyed", {"url": "https://example.org", "n": [1, 2]}, idempotency_key="K-1"),
        tq.Task("unicode", {"text": "héllo ☃"}),
    ]
    store.enqueue_many(sent)
    taken = store.take_many("w", 10)
    assert {item.task.id: item.task for item in taken} == {task.id: task for task in sent}
    assert {item.task.key for item in taken} == {"plain", "K-1", "unicode"}
    assert all(isinstance(item, tq.QueuedTask) and isinstance(item.token, int) for item in taken)


def insert_raw_tasks(backend: Backend, rows: list[tuple[Any, Any, Any]]) -> None:
    """Write (id, key, payload) rows straight into the tasks table, as another program could."""
    now = time.time()
    if backend.name == "sqlite":
        path = backend.url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.executemany(
                "INSERT INTO idempotency_tasks (id, key, payload, state, attempts, enqueued_at, "
                "updated_at) VALUES (?, ?, ?, 'queued', 0, ?, ?)",
                [(*row, now, now) for row in rows],
            )
            conn.commit()
    else:
        schema = store_fixtures.schema_of(backend.url)
        for row in rows:
            store_fixtures.pg_execute(
                f"INSERT INTO {schema}.tasks (id, key, payload, state, attempts, enqueued_at, "
                "updated_at) VALUES (%s, %s, %s, 'queued', 0, %s, %s)",
                (*row, now, now),
            )


def test_a_stored_row_that_holds_no_task_fails_alone_in_the_take(backend: Backend) -> None:
    """Good rows are taken; each bad one is failed on its own, naming the field, never retaken."""
    if not backend.shared:
        pytest.skip("memory:// keeps Task objects: it holds no row another program wrote")
    store = backend.open()
    store.enqueue_many([tq.Task(f"good{i}", {"i": i}) for i in range(3)])
    bad = {
        "empty-key": ("empty-key", "", "{}"),
        "broken": ("broken", "broken", "{"),
        "listed": ("listed", "listed", "[1]"),
        "nan": ("nan", "nan", '{"x": NaN}'),
    }
    if backend.name == "sqlite":  # values PostgreSQL text cannot even hold
        bad["nul"] = ("bad\x00id", "nul", "{}")
        bad["blob"] = (b"blob-id", "blob", "{}")
        bad["latin1"] = ("latin1", "latin1", b'{"x": "\xff"}'.decode("latin-1"))
    insert_raw_tasks(backend, list(bad.values()))
    if backend.name == "sqlite":  # text that is not UTF-8, as a C program could write it
        path = backend.url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute(
                "UPDATE idempotency_tasks SET payload = CAST(X'7b2278223a22ff227d' AS TEXT) "
                "WHERE key = 'latin1'"
            )
            conn.commit()
    taken = store.take_many("w", 50, 3)
    assert {item.task.id: item.task.payload for item in taken} == {
        f"good{i}": {"i": i} for i in range(3)
    }
    assert task_counts(store) == {"queued": 0, "running": 3, "done": 0, "failed": len(bad)}
    assert store.take_many("w", 50, 3) == []  # failed rows are not taken again
    if backend.name == "sqlite":
        path = backend.url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            errors = dict(
                conn.execute("SELECT id, error FROM idempotency_tasks WHERE state = 'failed'")
            )
    else:
        schema = store_fixtures.schema_of(backend.url)
        errors = dict(
            store_fixtures.pg_rows(f"SELECT id, error FROM {schema}.tasks WHERE state = 'failed'")
        )
    prefix = "permanent: the stored task cannot be read: field "
    expected = {
        "empty-key": "'key' must be a non-empty string",
        "broken": "'payload': line 1 column 2: invalid JSON: Expecting property name",
        "listed": "'payload' must be a JSON object, not an array",
        "nan": "'payload': line 1 column 7: invalid JSON: non-finite number NaN",
        "nul": "'id' must not contain a NUL character",
        "blob": "'id' is not stored as text",
        "latin1": "'payload' is not valid UTF-8 text",
    }
    names = {row[0]: name for name, row in bad.items()}
    assert set(errors) == set(names)
    for task_id, error in errors.items():
        assert error.startswith(prefix + expected[names[task_id]]), (task_id, error)


def test_take_many_takes_the_oldest_first_and_skips_live_leases(backend: Backend) -> None:
    first, second = backend.stores(2)
    for name in ("t1", "t2", "t3"):
        first.enqueue_many([tq.Task(name)])
    assert ids(first.take_many("w1", 2)) == {"t1", "t2"}
    assert ids(second.take_many("w2", 10)) == {"t3"}
    assert first.take_many("w1", 10) == []
    assert second.take_many("w2", 10) == []
    assert task_counts(first) == {"queued": 0, "running": 3, "done": 0, "failed": 0}


def test_a_task_returned_to_the_queue_keeps_its_place(backend: Backend) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task("older")])
    store.enqueue_many([tq.Task("newer")])
    (first,) = store.take_many("w", 1)
    assert first.task.id == "older"
    assert store.settle_many([("older", first.token, QUEUED, None)]) == 1
    (again,) = store.take_many("w", 1)
    assert again.task.id == "older"
    assert again.token != first.token
    assert store.settle_many([("older", first.token, DONE, None)]) == 0


def test_a_lease_expired_task_is_taken_again_and_the_old_token_is_fenced(backend: Backend) -> None:
    slow = backend.open(lease_seconds=SHORT_LEASE)
    other = backend.open(lease_seconds=30.0) if backend.shared else slow
    slow.enqueue_many([tq.Task("t")])
    (old,) = slow.take_many("slow", 5)
    wait_until(lambda: other.queue_status()["stalled"] == 1, "the lease to run out (stalled)")
    (new,) = wait_until(lambda: other.take_many("other", 5), "the task to be taken again")
    assert new.task.id == "t"
    assert new.token != old.token
    if backend.shared:  # the new owner's lease is a long one
        assert other.queue_status()["stalled"] == 0
    assert slow.settle_many([("t", old.token, DONE, None)]) == 0
    assert task_counts(other)["running"] == 1
    assert other.settle_many([("t", new.token, DONE, None)]) == 1
    assert task_counts(slow) == {"queued": 0, "running": 0, "done": 1, "failed": 0}


def start(store: Any, task_id: str, entry: int, namespace: str = "ns") -> tq.Claim:
    """Claim a taken task's key the way a pool does before it runs it (a started run)."""
    return store.claim_many([(task_id, None)], namespace, starts=[(task_id, entry)])[0]


def leases_ran_out(store: Any, stalled: int | None = None, namespace: str = "ns") -> bool:
    """Return whether a dead worker's leases all ran out: its rows' and its keys' claims.

    A run holds two leases: its row's, from the take, and its key's, from the claim made when
    the run starts, later. The key's outlives the row's by that gap, however long a loaded
    machine made it: a take that finds the row stalled may still find its key claimed.

    Args:
        stalled: how many rows must be stalled (None: every running row).
    """
    status = store.queue_status()
    expected = status["tasks"]["running"] if stalled is None else stalled
    return status["stalled"] == expected and not store.live_claims(namespace)


def test_a_task_whose_worker_died_max_crashes_times_is_failed_as_crashed(backend: Backend) -> None:
    store = backend.open(lease_seconds=SHORT_LEASE)
    store.enqueue_many([tq.Task("deadly"), tq.Task("fine")])
    # "fine" goes back to the queue unrun every time: a returned task is no crash.
    for take, expected in enumerate([{"deadly", "fine"}, {"deadly", "fine"}, {"fine"}]):
        taken = {item.task.id: item.token for item in store.take_many(f"w{take}", 2, 2)}
        assert set(taken) == expected
        if "deadly" in taken:  # its run starts: the key's claim counts it
            assert start(store, "deadly", taken["deadly"]).state == CLAIMED
        assert store.settle_many([("fine", taken["fine"], QUEUED, None)]) == 1
        # The worker holding "deadly" dies: its leases run out.
        wait_until(lambda: leases_ran_out(store), "the dead worker's leases to run out")
    assert task_counts(store) == {"queued": 1, "running": 0, "done": 0, "failed": 1}
    (item,) = store.take_many("w", 5, 2)
    assert item.task.id == "fine"
    assert store.settle_many([("fine", item.token, DONE, None)]) == 1
    # Without a cap (the default) a store keeps taking a task whose worker dies.
    store.enqueue_many([tq.Task("again")])
    for _ in range(3):
        assert ids(wait_until(lambda: store.take_many("w", 5), "the task to be taken")) == {"again"}


def test_a_taken_task_never_started_is_no_crash(backend: Backend) -> None:
    """Only a run that started counts toward max_crashes, not a take (a dead worker's prefetch)."""
    store = backend.open(lease_seconds=SHORT_LEASE)
    store.enqueue_many([tq.Task("prefetched"), tq.Task("done-elsewhere")])
    store.mark_processed("done-elsewhere", out(1), "ns")

    def lease_runs_out() -> dict[str, int]:
        # The worker holding the rows dies: their leases, and any claim it made, run out.
        wait_until(lambda: leases_ran_out(store, 2), "the leases to run out")
        taken = {item.task.id: item.token for item in store.take_many("w", 5, 1)}
        assert set(taken) == {"prefetched", "done-elsewhere"}, taken
        return taken

    taken = {item.task.id: item.token for item in store.take_many("w", 5, 1)}
    for _ in range(2):
        # Prefetched and never started; and a claim that finds the key completed starts nothing.
        assert start(store, "done-elsewhere", taken["done-elsewhere"]).state == COMPLETED
        taken = lease_runs_out()
    # A start reported with a token that no longer holds the row counts for no one.
    stale = taken["prefetched"]
    taken = lease_runs_out()
    assert start(store, "prefetched", stale).state == CLAIMED
    taken = lease_runs_out()
    assert task_counts(store)["failed"] == 0
    # The run that starts, and whose worker dies, is the one crash max_crashes=1 allows.
    assert start(store, "prefetched", taken["prefetched"]).state == CLAIMED
    wait_until(lambda: store.queue_status()["stalled"] == 2, "the leases to run out")
    assert ids(store.take_many("w", 5, 1)) == {"done-elsewhere"}
    assert task_counts(store)["failed"] == 1


def test_take_task_persists_one_task_as_running(backend: Backend) -> None:
    first, second = backend.stores(2)
    task = tq.Task("x", {"a": 1})
    token = first.take_task(task, "w1")
    assert isinstance(token, int)
    assert task_counts(second) == {"queued": 0, "running": 1, "done": 0, "failed": 0}
    assert second.take_task(task, "w2") is None  # running elsewhere, lease live
    assert second.take_many("w2", 10) == []
    assert first.settle_many([("x", token, DONE, None)]) == 1
    assert second.take_task(task, "w2") is None  # done
    # A queued task is taken; a failed one is taken again (a resubmission reruns it).
    first.enqueue_many([tq.Task("y")])
    assert isinstance(second.take_task(tq.Task("y"), "w2"), int)
    failing = first.take_task(tq.Task("z"), "w1")
    first.settle_many([("z", failing, FAILED, "boom")])
    retry = second.take_task(tq.Task("z"), "w2")
    assert isinstance(retry, int) and retry != failing
    assert task_counts(first) == {"queued": 0, "running": 2, "done": 1, "failed": 0}


def test_take_task_takes_over_a_lease_expired_task(backend: Backend) -> None:
    store = backend.open(lease_seconds=SHORT_LEASE)
    old = store.take_task(tq.Task("x"), "dead")
    new = wait_until(lambda: store.take_task(tq.Task("x"), "alive"), "the lease to run out")
    assert new != old
    assert store.settle_many([("x", old, DONE, None)]) == 0
    assert store.settle_many([("x", new, DONE, None)]) == 1


def test_settle_many_records_done_failed_and_queued(backend: Backend) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task("a"), tq.Task("b"), tq.Task("c"), tq.Task("d")])
    token = {item.task.id: item.token for item in store.take_many("w", 3)}
    (queued_id,) = {"a", "b", "c", "d"} - set(token)
    a, b, c = sorted(token)
    settled = store.settle_many(
        [(a, token[a], DONE, None), (b, token[b], FAILED, "boom"), (c, token[c], QUEUED, None)]
    )
    assert settled == 3
    assert task_counts(store) == {"queued": 2, "running": 0, "done": 1, "failed": 1}
    assert store.settle_many([(a, token[a], FAILED, "late")]) == 0  # no longer running
    assert store.settle_many([("missing", 1, DONE, None)]) == 0
    assert store.settle_many([(queued_id, 1, DONE, None)]) == 0  # queued, not running
    assert store.settle_many([]) == 0
    assert ids(store.take_many("w", 10)) == {c, queued_id}  # a failed task is not retaken
    assert task_counts(store) == {"queued": 0, "running": 2, "done": 1, "failed": 1}


def test_complete_many_settles_the_rows_of_written_completions_in_one_call(
    backend: Backend,
) -> None:
    """A completion and its durable row's settlement share one transaction; a stale one, none."""
    store = backend.open()
    store.enqueue_many([tq.Task("a"), tq.Task("b")])
    entry = {item.task.id: item.token for item in store.take_many("w", 2)}
    claims = store.claim_many([("a", None), ("b", None)], "ns")
    stale = claims[1].token + 1 if claims[1].token < 2**62 else claims[1].token - 1
    written = store.complete_many(
        [("a", claims[0].token, '"A"'), ("b", stale, '"B"')],
        settle=[(0, "a", entry["a"]), (1, "b", entry["b"])],
    )
    assert written == [True, False]
    # Only the row whose completion was written is done; the other one is still running.
    assert task_counts(store) == {"queued": 0, "running": 1, "done": 1, "failed": 0}
    assert store.lookup("a", "ns")["state"] == "completed"


# --- Batches: each row of a batch acts on its own ---------------------------------------------


def other_token(token: int) -> int:
    """Return a token that differs from `token` (a stale one)."""
    return token + 1 if token < 2**62 else token - 1


def test_a_batch_naming_a_key_twice_acts_once_per_row_in_order(backend: Backend) -> None:
    """Prove a batch that repeats a key or a task id answers as if its rows ran one by one."""
    store = backend.open()
    claims = store.claim_many([("d", None), ("d", None), ("e", None), ("f", None)], "ns")
    assert [c.state for c in claims] == [CLAIMED, IN_PROGRESS, CLAIMED, CLAIMED]
    d, e, f = claims[0].token, claims[2].token, claims[3].token
    assert store.renew_many([("e", e), ("e", e), ("f", f)]) == 3
    written = store.complete_many([("d", d, out(1)), ("d", d, out(2)), ("e", e, out(3))])
    assert written == [True, False, True]
    assert store.lookup("d", "ns")["output"] == 1
    assert store.release_many([("f", f, "first"), ("f", f, "second")]) == 1
    assert store.lookup("f", "ns")["error"] == "first"
    store.enqueue_many([tq.Task("t"), tq.Task("u")])
    entry = {item.task.id: item.token for item in store.take_many("w", 2)}
    assert store.renew_tasks("w", {}, [("t", entry["t"]), ("t", entry["t"])]) == 2
    settled = store.settle_many(
        [
            ("t", entry["t"], DONE, None),
            ("t", entry["t"], FAILED, "late"),
            ("u", entry["u"], DONE, None),
        ]
    )
    assert settled == 2
    assert task_counts(store) == {"queued": 0, "running": 0, "done": 2, "failed": 0}


def test_a_batch_of_keys_in_every_state_and_namespace_answers_each_key(backend: Backend) -> None:
    """Prove one claim batch adopts unscoped rows, wins free keys and answers held ones, row by
    row, with keys stored in other namespaces and without one mixed in."""
    store = backend.open()
    store.mark_processed("legacy-done", out("old"))  # rows without a namespace ...
    (free,) = store.claim_many([("legacy-free", FP1)])
    assert store.release_many([("legacy-free", free.token, "boom")]) == 1
    (held,) = store.claim_many([("legacy-held", None)])
    store.mark_processed("both", out("unscoped"))  # ... and one in both
    store.mark_processed("both", out("scoped"), "ns")
    store.mark_processed("mine", out("mine"), "ns")
    store.mark_processed("elsewhere", out("other"), "other")
    assert [c.state for c in store.claim_many([("busy", None)], "ns")] == [CLAIMED]
    keys = ["fresh", "legacy-done", "legacy-free", "legacy-held", "mine", "elsewhere", "busy",
            "both", "conflict"]  # fmt: skip
    store.mark_processed("conflict", out("c"), "ns")
    claims = store.claim_many([(key, FP1 if key == "legacy-free" else None) for key in keys], "ns")
    answers = {key: (c.state, c.output) for key, c in zip(keys, claims, strict=True)}
    assert answers == {
        "fresh": (CLAIMED, None),
        "legacy-done": (COMPLETED, "old"),
        "legacy-free": (CLAIMED, None),
        "legacy-held": (IN_PROGRESS, None),
        "mine": (COMPLETED, "mine"),
        "elsewhere": (CLAIMED, None),
        "busy": (IN_PROGRESS, None),
        "both": (COMPLETED, "scoped"),
        "conflict": (COMPLETED, "c"),
    }
    # Adopted rows moved into the namespace as they were: the legacy claim's token still owns it.
    assert store.lookup("legacy-held", "") is None
    assert store.complete_many([("legacy-held", held.token, out("held"))]) == [True]
    assert store.lookup("legacy-held", "ns")["output"] == "held"
    assert store.lookup("both", "")["output"] == "unscoped"  # the namespace had its own row
    assert store.lookup("elsewhere", "other")["output"] == "other"
    # A fingerprint that disagrees with the adopted row's is a conflict, in a batch as alone.
    store.mark_processed("legacy-fp", out(1))
    (fp_claim,) = store.claim_many([("legacy-fp2", FP1)])
    assert store.release_many([("legacy-fp2", fp_claim.token, None)]) == 1
    claims = store.claim_many([("legacy-fp2", FP2), ("new", FP2)], "ns")
    assert [c.state for c in claims] == [CONFLICT, CLAIMED]


def test_a_stale_token_in_a_batch_leaves_its_row_alone_and_the_others_act(
    backend: Backend,
) -> None:
    """Prove fencing holds row by row: a stale token among good ones writes nothing, on every
    kind of batch (renew, release, complete and settle, settle, started runs)."""
    store = backend.open()
    store.enqueue_many([tq.Task(key) for key in "abcde"])
    entry = {item.task.id: item.token for item in store.take_many("w", 5)}
    claims = dict(zip("abcde", store.claim_many([(key, None) for key in "abcde"], "ns"),
                      strict=True))  # fmt: skip
    token = {key: claim.token for key, claim in claims.items()}
    assert all(claim.state is CLAIMED for claim in claims.values())
    assert store.renew_many([("a", token["a"]), ("b", other_token(token["b"])),
                             ("c", token["c"])]) == 2  # fmt: skip
    assert store.release_many([("c", token["c"], "x"), ("d", other_token(token["d"]), "y")]) == 1
    assert store.lookup("c", "ns")["state"] == "failed"
    assert store.lookup("d", "ns")["state"] == "in_progress"
    written = store.complete_many(
        [("a", token["a"], out("A")), ("b", other_token(token["b"]), out("B")),
         ("d", token["d"], out("D"))],
        settle=[(0, "a", entry["a"]), (1, "b", entry["b"]), (2, "d", other_token(entry["d"]))],
    )  # fmt: skip
    assert written == [True, False, True]
    # "a" is done; "b" (stale key token) and "d" (stale row token) still run.
    assert task_counts(store) == {"queued": 0, "running": 4, "done": 1, "failed": 0}
    settled = store.settle_many([("b", other_token(entry["b"]), DONE, None),
                                 ("c", entry["c"], FAILED, "x"), ("d", entry["d"], DONE, None),
                                 ("e", entry["e"], QUEUED, None)])  # fmt: skip
    assert settled == 3
    assert task_counts(store) == {"queued": 1, "running": 1, "done": 2, "failed": 1}
    assert store.renew_tasks("w", {}, [("b", entry["b"]), ("e", entry["e"])]) == 1


def test_a_batch_counts_handler_calls_and_keeps_error_kinds_row_by_row(backend: Backend) -> None:
    """Prove the optional calls and error kinds of batch items land on their own rows: the keys'
    attempts (claims count one, completions and releases add their calls) and the failed tasks'
    attempts and kinds."""
    store = backend.open()
    store.enqueue_many([tq.Task(key) for key in "abcd"])
    entry = {item.task.id: item.token for item in store.take_many("w", 4)}
    claims = store.claim_many([(key, None) for key in "abcd"], "ns")
    token = {key: claim.token for key, claim in zip("abcd", claims, strict=True)}
    written = store.complete_many(
        [("a", token["a"], out(1), 2), ("b", token["b"], out(2))],
        settle=[(0, "a", entry["a"], 2), (1, "b", entry["b"])],
    )
    assert written == [True, True]
    assert store.release_many([("c", token["c"], "x", 3), ("d", token["d"], "y")]) == 2
    assert [store.lookup(key, "ns")["attempts"] for key in "abcd"] == [3, 1, 4, 1]
    settled = store.settle_many([("c", entry["c"], FAILED, "x", "transient", 3),
                                 ("d", entry["d"], FAILED, "y", "permanent", 1)])  # fmt: skip
    assert settled == 2
    failed = {row["id"]: row for row in store.failed_tasks()}
    assert {key: (row["attempts"], row["error_kind"]) for key, row in failed.items()} == {
        "c": (3, "transient"),
        "d": (1, "permanent"),
    }


def test_a_claim_batch_counts_started_runs_only_for_the_keys_it_wins(backend: Backend) -> None:
    """Prove a batch's started runs count where its claim won the key with a token that still
    holds the row, and nowhere else (each row is then a crash when its worker dies)."""
    store = backend.open(lease_seconds=SHORT_LEASE)
    store.enqueue_many([tq.Task(key) for key in ("won", "stale", "held", "done")])
    entry = {item.task.id: item.token for item in store.take_many("w", 4)}
    store.claim_many([("held", None)], "ns")  # another owner runs it
    store.mark_processed("done", out(1), "ns")
    keys = ["won", "stale", "held", "done"]
    starts = [(key, other_token(entry[key]) if key == "stale" else entry[key]) for key in keys]
    claims = store.claim_many([(key, None) for key in keys], "ns", starts=starts)
    assert [c.state for c in claims] == [CLAIMED, CLAIMED, IN_PROGRESS, COMPLETED]
    # The worker dies: with max_crashes=1, only the row whose run started is failed as crashed.
    wait_until(lambda: store.queue_status()["stalled"] == 4, "the leases to run out")
    assert ids(store.take_many("w2", 5, 1)) == {"stale", "held", "done"}
    assert task_counts(store)["failed"] == 1


def test_renew_tasks_renews_one_workers_leases_and_records_its_heartbeat(backend: Backend) -> None:
    first, second = backend.stores(2)
    first.enqueue_many([tq.Task(f"t{i}") for i in range(3)])
    assert len(first.take_many("w1", 2)) == 2
    assert len(second.take_many("w2", 5)) == 1
    assert first.renew_tasks("w1", {"pid": 123, "in_flight": 2}) == 2
    assert second.renew_tasks("w2") == 1
    assert second.renew_tasks("idle", {"pid": 7}) == 0
    workers = {w["name"]: w for w in first.queue_status()["workers"]}
    assert set(workers) == {"w1", "w2", "idle"}
    assert workers["w1"]["pid"] == 123 and workers["w1"]["in_flight"] == 2
    assert workers["idle"]["pid"] == 7
    assert all(0 <= w["seen_seconds_ago"] < 60 for w in workers.values())
    first.renew_tasks("w1", {"pid": 456})  # a later heartbeat replaces the info
    workers = {w["name"]: w for w in second.queue_status()["workers"]}
    assert workers["w1"]["pid"] == 456


def test_renew_tasks_revives_a_stalled_lease(backend: Backend) -> None:
    owner, rival = backend.stores(2, lease_seconds=1.0)
    owner.enqueue_many([tq.Task("t")])
    (item,) = owner.take_many("owner", 1)
    wait_until(lambda: rival.queue_status()["stalled"] == 1, "the lease to run out")
    assert owner.renew_tasks("owner") == 1
    assert rival.queue_status()["stalled"] == 0
    assert rival.take_many("rival", 5) == []
    assert owner.settle_many([("t", item.token, DONE, None)]) == 1


def test_renew_tasks_with_entries_renews_only_those_rows(backend: Backend) -> None:
    """Prove renewing by (id, token) leaves a row the worker does not know it holds to expire."""
    owner, rival = backend.stores(2, lease_seconds=1.0)
    owner.enqueue_many([tq.Task("known"), tq.Task("lost")])
    known, lost = owner.take_many("owner", 2)
    assert owner.renew_tasks("owner", {}, [(known.task.id, known.token)]) == 1
    assert owner.renew_tasks("owner", {}, [(lost.task.id, lost.token + 1)]) == 0  # a wrong token

    def only_lost_stalled() -> bool:  # the owner keeps renewing the row it knows
        renewed = owner.renew_tasks("owner", {}, [(known.task.id, known.token)])
        return renewed == 1 and rival.queue_status()["stalled"] == 1

    wait_until(only_lost_stalled, "the unrenewed lease to run out")
    assert [item.task.id for item in rival.take_many("rival", 5)] == [lost.task.id]


def test_queue_status_reports_counts_oldest_and_stalled(backend: Backend) -> None:
    store = backend.open(lease_seconds=SHORT_LEASE)
    empty = store.queue_status()
    assert empty == {
        "tasks": {"queued": 0, "running": 0, "done": 0, "failed": 0},
        "delayed": 0,
        "oldest_queued_seconds": None,
        "stalled": 0,
        "workers": [],
        "queues": {},
    }
    store.enqueue_many([tq.Task("a"), tq.Task("b")])
    status = store.queue_status()
    assert status["tasks"]["queued"] == 2
    assert isinstance(status["oldest_queued_seconds"], float)
    assert 0 <= status["oldest_queued_seconds"] < 60
    store.take_many("w", 2)
    wait_until(lambda: store.queue_status()["stalled"] == 2, "two stalled leases")
    status = store.queue_status()
    assert status["oldest_queued_seconds"] is None
    assert status["tasks"] == {"queued": 0, "running": 2, "done": 0, "failed": 0}


# --- Delays and priorities -----------------------------------------------------------------------


def test_take_many_takes_the_highest_priority_first_then_submission_order(
    backend: Backend,
) -> None:
    first, second = backend.stores(2)
    submitted = [("a", 0), ("b", 5), ("c", -1), ("d", 5), ("e", 0), ("f", 1000), ("g", -1000)]
    for name, priority in submitted:  # one enqueue each: each its own enqueue time
        first.enqueue_many([tq.Task(name)], priority=priority)
    expected = [name for name, _ in sorted(submitted, key=lambda item: -item[1])]
    taken = first.take_many("w1", 3) + second.take_many("w2", 10)
    assert [item.task.id for item in taken] == expected
    assert [item.priority for item in taken] == sorted((p for _, p in submitted), reverse=True)


def test_one_enqueue_of_thousands_comes_out_by_priority_then_submission_order(
    backend: Backend,
) -> None:
    count = 2400
    # Ids in no sorted order (a permutation), so no store can pass by ordering on the id.
    names = [f"t{(index * 7919) % count:05d}" for index in range(count)]
    priorities = [(0, 5, -2, 0, 5)[index % 5] for index in range(count)]
    first, second = backend.stores(2)
    assert first.enqueue_many([tq.Task(name) for name in names], priority=priorities) == count
    expected = [names[i] for i in sorted(range(count), key=lambda i: -priorities[i])]
    taken: list[Any] = []
    while batch := (first, second)[len(taken) // 300 % 2].take_many("w", 300):
        taken += batch
    assert [item.task.id for item in taken] == expected
    # Returned to the queue, tasks of one enqueue keep their places; retried, they go to the
    # back of their priority in the order they had.
    back = [item for item in taken if item.priority == 0][:5]
    assert first.settle_many([(i.task.id, i.token, QUEUED, None) for i in reversed(back)]) == 5
    failed = [item for item in taken if item.priority == 5][:5]
    assert first.settle_many([(i.task.id, i.token, FAILED, "x") for i in failed]) == 5
    assert first.retry_tasks([item.task.id for item in reversed(failed)]) == 5
    again = [item.task.id for item in first.take_many("w", 20)]
    assert again == [item.task.id for item in failed + back]


def test_one_enqueue_may_give_each_task_its_own_priority_and_delay(backend: Backend) -> None:
    store = backend.open()
    added = store.enqueue_many(
        [tq.Task("low"), tq.Task("high"), tq.Task("later")],
        priority=[-1, 7, 1000],
        delay=(0, 0.0, 3600),
    )
    assert added == 3
    assert [(item.task.id, item.priority) for item in store.take_many("w", 10)] == [
        ("high", 7),
        ("low", -1),
    ]
    assert task_counts(store) == {"queued": 1, "running": 2, "done": 0, "failed": 0}
    assert store.queue_status()["delayed"] == 1


def test_a_delayed_task_is_taken_only_once_it_is_due(backend: Backend) -> None:
    producer, taker = backend.stores(2)
    assert producer.next_run_at() is None
    before = time.time()
    producer.enqueue_many([tq.Task("later")], delay=0.5, priority=9)
    producer.enqueue_many([tq.Task("now")])
    due = taker.next_run_at()
    assert due is not None and due >= before + 0.5
    status = taker.queue_status()
    assert (status["tasks"]["queued"], status["delayed"]) == (2, 1)
    assert [item.task.id for item in taker.take_many("w", 10)] == ["now"]
    (later,) = wait_until(lambda: taker.take_many("w", 10), "the delayed task to fall due")
    assert time.time() >= due  # taken no sooner than its due time
    assert (later.task.id, later.priority) == ("later", 9)
    assert taker.next_run_at() is None
    assert taker.queue_status()["delayed"] == 0


def test_a_delayed_task_returned_to_the_queue_keeps_its_place(backend: Backend) -> None:
    store = backend.open()
    store.enqueue_many([tq.Task("first")], delay=0.2)
    store.enqueue_many([tq.Task("second")], delay=0.4)
    (taken,) = wait_until(lambda: store.take_many("w", 1), "the first task to fall due")
    assert taken.task.id == "first"
    assert store.settle_many([("first", taken.token, QUEUED, None)]) == 1
    due = store.next_run_at()  # the second task's, unless it is due already
    if due is not None:
        wait_until(lambda: time.time() >= due, "the second task to fall due")
    assert [item.task.id for item in store.take_many("w", 5)] == ["first", "second"]


def test_take_task_with_a_delay_is_taken_over_only_once_due(backend: Backend) -> None:
    if not backend.shared:
        pytest.skip("memory:// has no second process to take over")
    holder = backend.open(lease_seconds=SHORT_LEASE)
    rival = backend.open()
    # Due in an hour: its lease surely runs out first, however slow the machine.
    assert holder.take_task(tq.Task("later"), "holder", delay=3600) is not None
    wait_until(lambda: rival.queue_status()["stalled"] == 1, "the holder's lease to run out")
    assert rival.take_many("rival", 5) == []  # its lease ran out, but it is not due yet
    before = time.time()
    assert holder.take_task(tq.Task("t"), "holder", delay=1.0, priority=3) is not None
    (taken,) = wait_until(lambda: rival.take_many("rival", 5), "the task to fall due")
    assert time.time() >= before + 1.0
    assert (taken.task.id, taken.priority) == ("t", 3)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"delay": -1}, ValueError), ({"delay": float("nan")}, ValueError),
     ({"delay": "1"}, TypeError), ({"priority": 1001}, ValueError),
     ({"priority": True}, TypeError), ({"priority": [1]}, ValueError),
     ({"delay": [0, -1]}, ValueError), ({"priority": (0, 2.5)}, TypeError)],
)  # fmt: skip
def test_enqueue_many_refuses_a_bad_delay_or_priority_and_adds_nothing(
    backend: Backend, kwargs: dict[str, Any], error: type[Exception]
) -> None:
    store = backend.open()
    rule = r"^(delay|priority) (must be|has \d+ values for 2 tasks)"
    with pytest.raises(error, match=rule) as info:
        store.enqueue_many([tq.Task("a"), tq.Task("b")], **kwargs)
    assert "\n" not in str(info.value)
    assert sum(task_counts(store).values()) == 0
    if not any(isinstance(value, (list, tuple)) for value in kwargs.values()):
        with pytest.raises(error, match=rule):
            store.take_task(tq.Task("a"), "w", **kwargs)
        assert sum(task_counts(store).values()) == 0


def test_concurrent_takers_never_get_the_same_task(backend: Backend) -> None:
    threads = 6
    stores = backend.stores(threads)
    stores[0].enqueue_many([tq.Task(f"t{i:03d}") for i in range(300)])
    barrier = threading.Barrier(threads)
    taken: list[list[str]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []

    def drain(index: int) -> None:
        try:
            barrier.wait(10)
            while batch := stores[index].take_many(f"w{index}", 7):
                taken[index].extend(item.task.id for item in batch)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=drain, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(30)
    assert not errors, errors
    everything = [task_id for got in taken for task_id in got]
    assert len(everything) == 300
    assert set(everything) == {f"t{i:03d}" for i in range(300)}


def test_wait_for_work_returns_by_its_timeout(backend: Backend) -> None:
    store = backend.open()
    store.wait_for_work(0.05, threading.Event())  # returns (bounded by the test's timeout)
    store.enqueue_many([tq.Task("t")])
    store.wait_for_work(0.05, threading.Event())


def test_wait_for_work_returns_at_once_when_stop_is_already_set(backend: Backend) -> None:
    store = backend.open()
    store.wait_for_work(0.05, threading.Event())  # sets up LISTEN where there is one
    stop = threading.Event()
    stop.set()
    returned = threading.Event()

    def idle() -> None:
        store.wait_for_work(60.0, stop)
        returned.set()

    threading.Thread(target=idle, daemon=True).start()
    # Far below the 60 s timeout: a stop that is set must not be slept through.
    assert returned.wait(10.0), "wait_for_work ignored a stop event that was already set"


def test_wait_for_work_wakes_on_an_enqueue(backend: Backend) -> None:
    if not backend.wakes:
        pytest.skip("SQLite has no notifications: idle workers poll")
    waiter, producer = backend.stores(2)
    stop = threading.Event()
    waiter.wait_for_work(0.05, stop)  # sets up LISTEN where there is one
    woke = threading.Event()

    def idle() -> None:
        waiter.wait_for_work(600.0, stop)
        woke.set()

    thread = threading.Thread(target=idle, daemon=True)
    thread.start()
    # An enqueue made before the waiter sleeps may go unheard in memory://, so enqueue until it
    # wakes; all of it stays far below the 600 s timeout that only a notification can cut short.
    deadline = time.monotonic() + 30.0
    sent = 0
    while not woke.wait(0.2):
        assert time.monotonic() < deadline, f"{sent} enqueues did not wake the idle waiter"
        producer.enqueue_many([tq.Task(f"wake-{sent}")])
        sent += 1
    thread.join(5)


def test_a_shared_database_survives_its_stores(backend: Backend) -> None:
    if not backend.shared:
        pytest.skip("memory:// lives and dies with its store, by design")
    store = backend.open()
    won = claim(store, "k", FP1)
    store.complete_many([("k", won.token, out({"kept": True}))])
    store.enqueue_many([tq.Task("later", {"p": 1})])
    store.close()
    reopened = backend.open()
    assert claim(reopened, "k", FP1).output == {"kept": True}
    assert [item.task for item in reopened.take_many("w", 5)] == [tq.Task("later", {"p": 1})]


def test_a_closed_store_refuses_every_call_and_closes_twice(backend: Backend) -> None:
    store = backend.open()
    won = claim(store, "k")
    store.enqueue_many([tq.Task("t")])
    store.close()
    calls: dict[str, Any] = {
        "claim_many": lambda: store.claim_many([("k2", None)]),
        "complete_many": lambda: store.complete_many([("k", won.token, out(1))]),
        "renew_many": lambda: store.renew_many([("k", won.token)]),
        "release_many": lambda: store.release_many([("k", won.token, None)]),
        "lookup": lambda: store.lookup("k"),
        "mark_processed": lambda: store.mark_processed("k", out(1)),
        "purge_expired": lambda: store.purge_expired(0),
        "stats": store.stats,
        "enqueue_many": lambda: store.enqueue_many([tq.Task("u")]),
        "take_many": lambda: store.take_many("w", 1),
        "take_task": lambda: store.take_task(tq.Task("u"), "w"),
        "settle_many": lambda: store.settle_many([("t", 1, DONE, None)]),
        "renew_tasks": lambda: store.renew_tasks("w"),
        "queue_status": store.queue_status,
        "wait_for_work": lambda: store.wait_for_work(0.01, threading.Event()),
    }
    answered = []
    for name, call in calls.items():
        try:
            call()
        except tq.TaskQueueError as exc:
            assert "closed" in str(exc), (name, exc)
        else:
            answered.append(name)
    assert answered == []
    store.close()
    if backend.shared:  # nothing was written after the close
        reopened = backend.open()
        assert reopened.stats()["in_progress"] == 1 and reopened.stats()["total"] == 1
        assert task_counts(reopened)["queued"] == 1


def test_close_wakes_a_wait_for_work(backend: Backend) -> None:
    if not backend.wakes:
        pytest.skip("SQLite has no notifications: idle workers poll")
    store = backend.open()
    stop = threading.Event()
    waiting = threading.Event()
    # Once the store listens, a close must end the wait long before its hour is up.
    store.wait_for_work(0.01, stop)  # opens the listening connection where there is one

    def wait() -> None:
        waiting.set()
        with contextlib.suppress(tq.TaskQueueError):  # closed before the wait began
            store.wait_for_work(3600, stop)

    thread = threading.Thread(target=wait)
    thread.start()
    waiting.wait(WAIT)
    store.close()
    thread.join(WAIT)
    alive = thread.is_alive()
    stop.set()
    thread.join(WAIT)
    assert not alive


def test_store_url_names_the_backend(backend: Backend) -> None:
    store = backend.open()
    assert store.url == backend.url
    assert store.lease_seconds == 30.0
    assert store.ttl_seconds is None


@pytest.mark.parametrize("action", ["ROLLBACK", "ABORT", "FAIL"])
def test_sqlite_reports_the_error_that_ended_a_transaction(tmp_path: Path, action: str) -> None:
    # RAISE(ROLLBACK) ends the transaction inside SQLite, as a full disk or an I/O error does.
    db = tmp_path / "store.db"
    store = tq.open_store(str(db))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON idempotency_tasks WHEN NEW.id = 'bad' "
            f"BEGIN SELECT RAISE({action}, 'refused by trigger'); END"
        )
        conn.commit()
    try:
        with pytest.raises(sqlite3.IntegrityError, match="refused by trigger"):
            store.enqueue_many([tq.Task("a"), tq.Task("bad"), tq.Task("c")])
        assert task_counts(store)["queued"] == 0
        assert store.enqueue_many([tq.Task("a")]) == 1  # the store is still usable
    finally:
        store.close()


class TestStoredErrors:
    """Error texts are stored by every backend, whatever characters they hold."""

    UNSTORABLE = "refused \x00 at \ud800 here"
    STORED = "refused \\x00 at \\ud800 here"

    def test_release_and_settle_store_any_error_text(self, backend: Backend) -> None:
        """A NUL or a lone surrogate in an error is stored escaped, not refused by the database."""
        store = backend.open()
        (claim,) = store.claim_many([("k", None)])
        assert store.release_many([("k", claim.token, self.UNSTORABLE)]) == 1
        assert store.lookup("k")["error"] == self.STORED
        store.enqueue_many([tq.Task("t")])
        (entry,) = store.take_many("w", 1)
        assert store.settle_many([("t", entry.token, tq.EntryState.FAILED, self.UNSTORABLE)]) == 1
        assert store.queue_status()["tasks"]["failed"] == 1

    @pytest.mark.timeout(30)
    def test_a_failure_with_unstorable_text_fails_only_its_own_task(self, backend: Backend) -> None:
        """A handler error holding NUL and a lone surrogate fails its task alone, durably."""

        def handler(task: tq.Task) -> str:
            if task.id == "bad":
                raise tq.PermanentError(self.UNSTORABLE)
            return task.id

        manager = tq.IdempotencyManager(store=backend.open())
        batch = [tq.Task(f"t{i}") for i in range(6)] + [tq.Task("bad")]
        with tq.WorkerPool(handler, workers=2, idempotency=manager, durable=True) as pool:
            records = {record.task_id: record for record in pool.run(batch)}
        assert records["bad"].status is tq.TaskStatus.FAILED
        assert records["bad"].error is not None and "refused" in records["bad"].error
        assert all(records[f"t{i}"].status is tq.TaskStatus.SUCCEEDED for i in range(6))
        assert manager.lookup("bad")["error"] is not None
        assert "\x00" not in manager.lookup("bad")["error"]

    @pytest.mark.timeout(30)
    def test_the_longest_id_and_key_with_the_longest_namespace_run_on_every_store(
        self, backend: Backend
    ) -> None:
        """Ids and keys of MAX_KEY_BYTES with a namespace of MAX_NAMESPACE_BYTES are enqueued,
        claimed and completed, also where PostgreSQL indexes them (its btree row limit)."""
        # Random text: PostgreSQL compresses a long index value only when it shrinks.
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789\u00e9\u20ac\U0001f600"

        def longest(limit: int) -> str:
            text = ""
            while len((text + "\U0001f600").encode()) <= limit:
                text += secrets.choice(alphabet)
            return text + "z" * (limit - len(text.encode()))

        namespace = longest(tq.MAX_NAMESPACE_BYTES)
        tasks = [tq.Task(longest(tq.MAX_KEY_BYTES), {"n": n}, longest(tq.MAX_KEY_BYTES))
                 for n in range(2)]  # fmt: skip
        assert all(len(t.id.encode()) == len(t.key.encode()) == tq.MAX_KEY_BYTES for t in tasks)
        assert len(namespace.encode()) == tq.MAX_NAMESPACE_BYTES
        store = backend.open()
        # The durable queue: enqueued, taken and settled by id.
        assert store.enqueue_many([tasks[0]]) == 1
        (entry,) = store.take_many("w" * tq.MAX_KEY_BYTES, 1)
        assert entry.task == tasks[0]
        assert store.settle_many([(tasks[0].id, entry.token, tq.EntryState.DONE, None)]) == 1
        # A pool: each key claimed in the namespace, run and completed, durably.
        manager = tq.IdempotencyManager(store=store)
        with tq.WorkerPool(
            lambda task: task.payload, workers=2, idempotency=manager, durable=True,
            namespace=namespace,
        ) as pool:  # fmt: skip
            records = pool.run(tasks)
        assert [r.status for r in records] == [tq.TaskStatus.SUCCEEDED] * 2, records
        for task in tasks:
            assert manager.lookup(task.key, namespace=namespace)["state"] == "completed"

    def test_a_worker_name_no_store_can_keep_is_refused(self) -> None:
        """WorkerPool refuses a worker name with a NUL or a lone surrogate, opening nothing."""
        for name in ("w\x00", "w\udcff", ""):
            with pytest.raises(ValueError, match="worker_name"):
                tq.WorkerPool(lambda task: None, workers=1, durable=True, worker_name=name)


# --- Over the contract: the manager and the durable pool ----------------------------------------


def test_idempotency_manager_runs_over_the_store(backend: Backend) -> None:
    store = backend.open()
    manager = tq.IdempotencyManager(store=store)
    won = manager.claim("k", FP1)
    assert won.state is CLAIMED
    assert manager.renew("k", won.token)
    assert manager.complete("k", won.token, {"x": [1, 2]})
    assert manager.is_processed("k")
    assert manager.get_cached_output("k") == {"x": [1, 2]}
    assert not manager.is_processed("other")
    manager.mark_processed("other", "out")
    assert manager.get_cached_output("other") == "out"
    assert manager.stats()["completed"] == 2
    manager.close()
    with pytest.raises(tq.TaskQueueError):
        manager.claim("k")
    assert store.lookup("k")["state"] == "completed"  # the manager did not own the store


@pytest.fixture
def manager(backend: Backend) -> Iterator[tq.IdempotencyManager]:
    """Yield an IdempotencyManager that opened its own store at the backend's URL."""
    opened = tq.IdempotencyManager(backend.url)
    yield opened
    opened.close()


def test_manager_claim_complete_then_completed(manager: tq.IdempotencyManager) -> None:
    """A claimed key, once completed, answers completed with its output and no token."""
    claim = manager.claim("k", fingerprint=FP1)
    assert claim.state == "claimed"
    assert claim.token is not None
    assert manager.claim("k", fingerprint=FP1).state == "in_progress"
    assert manager.complete("k", claim.token, {"out": 1}) is True
    again = manager.claim("k", fingerprint=FP1)
    assert (again.state, again.token, again.output) == ("completed", None, {"out": 1})
    assert manager.is_processed("k")


def test_manager_fingerprint_conflict(manager: tq.IdempotencyManager) -> None:
    """A key first used with another fingerprint is a conflict; None skips the check."""
    claim = manager.claim("k", fingerprint=FP1)
    manager.complete("k", claim.token, {"out": 1})
    assert manager.claim("k", fingerprint="0" * 64).state == "conflict"
    assert manager.claim("k").state == "completed"
    assert manager.get_cached_output("k") == {"out": 1}


def test_fingerprint_is_the_sha256_of_canonical_json() -> None:
    """fingerprint() is the SHA-256 of the canonical JSON, independent of key order."""
    assert tq.fingerprint({"v": 1}) == hashlib.sha256(b'{"v":1}').hexdigest()
    assert tq.fingerprint({"b": [1, 2], "a": "x"}) == tq.fingerprint({"a": "x", "b": [1, 2]})
    expected = hashlib.sha256(b'{"a":"x","b":[1,2]}').hexdigest()
    assert tq.fingerprint({"b": [1, 2], "a": "x"}) == expected


def test_manager_release_then_claim_again(manager: tq.IdempotencyManager) -> None:
    """A released key counts as failed until it is claimed again."""
    claim = manager.claim("k")
    assert manager.release("k", claim.token, error="boom") is True
    assert manager.stats()["failed"] == 1
    assert manager.is_processed("k") is False
    again = manager.claim("k")
    assert again.state == "claimed"
    assert again.token != claim.token
    assert manager.stats()["in_progress"] == 1
    assert manager.stats()["failed"] == 0


def test_manager_wrong_token_is_refused(manager: tq.IdempotencyManager) -> None:
    """complete, renew and release with a token that is not the owner's do nothing."""
    claim = manager.claim("k")
    wrong = claim.token + 1 if isinstance(claim.token, int) else f"{claim.token}x"
    assert manager.renew("k", wrong) is False
    assert manager.release("k", wrong) is False
    assert manager.complete("k", wrong, {"x": 1}) is False
    assert manager.stats()["in_progress"] == 1
    assert manager.get_cached_output("k") is None


def test_manager_stats_counts(manager: tq.IdempotencyManager) -> None:
    """stats() counts in-progress, completed and failed keys as integers."""
    manager.claim("running")
    for key in ("done-1", "done-2"):
        manager.complete(key, manager.claim(key).token, {"k": key})
    manager.release("dropped", manager.claim("dropped").token, error="x")
    stats = manager.stats()
    assert stats == {"in_progress": 1, "completed": 2, "failed": 1, "total": 4}
    assert all(type(stats[k]) is int for k in ("in_progress", "completed", "failed", "total"))


def test_manager_renew_many(manager: tq.IdempotencyManager) -> None:
    """renew_many renews the claims whose token is current and counts them."""
    a, b = manager.claim("a"), manager.claim("b")
    manager.complete("b", b.token, None)
    assert manager.renew_many([("a", a.token), ("b", b.token)]) == 1


def test_durable_pool_runs_over_the_store(backend: Backend) -> None:
    store = backend.open()
    manager = tq.IdempotencyManager(store=store)
    calls: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(task: tq.Task) -> dict[str, str]:
        with lock:
            calls[task.key] += 1
        if task.payload.get("fail"):
            raise tq.PermanentError("no")
        return {"id": task.id}

    tasks = [tq.Task(f"t{i}", {"i": i}) for i in range(5)]
    tasks += [tq.Task("again", {"i": 0}, idempotency_key="t0"), tq.Task("bad", {"fail": True})]
    with tq.WorkerPool(handler, workers=3, idempotency=manager, durable=True) as pool:
        records = pool.run(tasks)
    statuses = {r.task_id: r.status for r in records}
    assert statuses == {
        **{f"t{i}": tq.TaskStatus.SUCCEEDED for i in range(5)},
        "again": tq.TaskStatus.DUPLICATE,
        "bad": tq.TaskStatus.FAILED,
    }
    assert max(calls.values()) == 1
    assert task_counts(store) == {"queued": 0, "running": 0, "done": 6, "failed": 1}


# --- Choosing a backend by URL -------------------------------------------------------------------


def test_store_names_are_public() -> None:
    # The Store contract and its backends are public API, so all of it is in __all__.
    missing = {"Store", "MemoryStore", "SqliteStore", "PostgresStore", "open_store"} - set(
        tq.__all__
    )
    assert not missing, f"not in __all__: {sorted(missing)}"


def test_open_store_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    path = str(tmp_path / "a.db")
    stores = {
        "memory://": tq.MemoryStore,
        path: tq.SqliteStore,
        f"sqlite:///{tmp_path / 'b.db'}": tq.SqliteStore,
        "sqlite:///:memory:": tq.SqliteStore,
    }
    for url, kind in stores.items():
        store = tq.open_store(url)
        try:
            assert type(store) is kind, url
        finally:
            store.close()
    by_url = tq.open_store(f"sqlite:///{tmp_path / 'b.db'}")
    by_path = tq.open_store(tmp_path / "a.db")  # a PathLike works too
    try:
        assert by_url.path == str(tmp_path / "b.db")
        assert by_path.path == path
        assert (tmp_path / "b.db").is_file()
    finally:
        by_url.close()
        by_path.close()
    default = tq.open_store(None)
    assert type(default) is tq.SqliteStore and default.path is None
    default.close()


@pytest.mark.parametrize(
    "url", ["redis://localhost/0", "mysql://root@db/x", "sqlite://", "sqlite://relative.db"]
)
def test_an_unknown_or_malformed_url_is_a_config_error(url: str, tmp_path: Path) -> None:
    with pytest.raises(tq.ConfigError) as excinfo:
        tq.open_store(url)
    assert url.split("://")[0] in str(excinfo.value)
    with pytest.raises(tq.ConfigError):
        tq.IdempotencyManager(url)
    with pytest.raises(tq.ConfigError):
        tq.WorkerPool(db_path=url)


def test_idempotency_manager_and_pool_choose_sqlite_and_memory(tmp_path: Path) -> None:
    cases = {
        None: (tq.SqliteStore, None),
        "memory://": (tq.MemoryStore, None),
        str(tmp_path / "plain.db"): (tq.SqliteStore, str(tmp_path / "plain.db")),
        f"sqlite:///{tmp_path / 'url.db'}": (tq.SqliteStore, str(tmp_path / "url.db")),
    }
    for url, (kind, path) in cases.items():
        with tq.IdempotencyManager(url) as manager:
            assert type(manager.store) is kind, url
            assert getattr(manager.store, "path", None) == path
        with tq.WorkerPool(lambda task: task.id, workers=1, db_path=url) as pool:
            assert type(pool.idempotency.store) is kind, url
            assert pool.run([tq.Task("t")])[0].status is tq.TaskStatus.SUCCEEDED
    # The SQLite URL and the plain path name the same file: a key done by one is done for both.
    with tq.WorkerPool(lambda task: task.id, db_path=str(tmp_path / "url.db")) as pool:
        assert pool.run([tq.Task("t")])[0].status is tq.TaskStatus.DUPLICATE


def test_idempotency_manager_and_pool_choose_postgres(pg_url: str) -> None:
    with tq.IdempotencyManager(pg_url, lease_seconds=12.0) as manager:
        assert type(manager.store) is tq.PostgresStore
        assert manager.store.schema == pg_url.rsplit("schema=", 1)[1]
        assert manager.lease_seconds == 12.0
        manager.mark_processed("k", "v")
    with tq.WorkerPool(lambda task: task.id, workers=2, db_path=pg_url) as pool:
        assert type(pool.idempotency.store) is tq.PostgresStore
        record = pool.run([tq.Task("k")])[0]
    assert record.status is tq.TaskStatus.DUPLICATE and record.output == "v"
    alias = tq.open_store("postgres://" + pg_url.split("://", 1)[1])
    try:
        assert type(alias) is tq.PostgresStore
        assert alias.lookup("k")["output"] == "v"
    finally:
        alias.close()


def test_postgres_url_problems_are_config_errors() -> None:
    require_psycopg()
    with pytest.raises(tq.ConfigError, match="schema"):
        tq.open_store("postgresql://postgres@127.0.0.1:5432/test?schema=bad-name")
    with pytest.raises(tq.ConfigError) as excinfo:
        tq.open_store("postgresql://postgres:secret@127.0.0.1:1/test")  # nothing listens
    assert "secret" not in str(excinfo.value)


# --- Rate-limit slots ----------------------------------------------------------------------------


def test_take_slots_never_hands_out_more_than_the_count_per_period(backend: Backend) -> None:
    first, second = backend.stores(2)
    taken, wait, base = first.take_slots("pool:x", 3, 60.0, 2, 0.05)
    assert (taken, wait) == (2, None)
    assert base <= time.monotonic()
    taken, wait, _ = second.take_slots("pool:x", 3, 60.0, 2, 0.05)
    # One slot was left; the next is free a period (plus the hold) after the first take.
    assert taken == 1 and wait is not None and 59.0 < wait <= 60.05
    assert first.take_slots("pool:x", 3, 60.0, 1, 0.05)[0] == 0
    # Another limit, and a larger count under the same name, have slots of their own.
    assert second.take_slots("group:api", 1, 60.0, 5, 0.05)[:1] == (1,)
    assert first.take_slots("pool:x", 4, 60.0, 5, 0.05)[0] == 1


def test_take_slots_frees_a_slot_after_its_period_and_hold(backend: Backend) -> None:
    (store,) = backend.stores(1)
    assert store.take_slots("pool:y", 1, 0.2, 1, 0.01)[0] == 1
    taken, wait, _ = store.take_slots("pool:y", 1, 0.2, 1, 0.01)
    assert taken == 0 and wait is not None
    time.sleep(wait + 0.01)  # the store's own answer says when: no guess
    assert store.take_slots("pool:y", 1, 0.2, 1, 0.01)[0] == 1


def test_durable_tasks_keep_their_group_and_timeout(backend: Backend) -> None:
    producer, worker = backend.stores(2)
    producer.enqueue_many([tq.Task("a", {"n": 1}, group="api", timeout=2.5), tq.Task("b")])
    taken = {item.task.id: item.task for item in worker.take_many("w", 10)}
    assert (taken["a"].group, taken["a"].timeout) == ("api", 2.5)
    assert (taken["b"].group, taken["b"].timeout) == (None, None)
    token = worker.take_task(tq.Task("c", group="g", timeout=1.0), "w")
    assert token is not None
