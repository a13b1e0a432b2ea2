"""Properties (hypothesis): retry bounds, histogram accuracy, identifiers, and a model of the store.

The stateful test drives `IdempotencyManager` with claim, complete, renew, release, mark and expire
against a plain model. Leases run on the wall clock, so the model keeps, for every claim, the
interval in which its lease must end, and a claim made while that interval is still open may find
the key either way: the model then follows what the store did. Everything else must match.

Since outcomes depend on the clock, what hypothesis draws must not: a replayed choice sequence has
to draw the same things whatever the store answered. So every claim adds one entry to the token
bundle (a refused claim adds `NO_TOKEN`) and no rule's precondition reads the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
)

import task_queue_optimized as tq

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


# --- Retry policy ---------------------------------------------------------------------------------


def _cap(base: float, multiplier: float, max_delay: float, attempt: int) -> float:
    """Return min(max_delay, base * multiplier ** (attempt - 1)), max_delay when it overflows."""
    try:
        return min(max_delay, base * multiplier ** (attempt - 1))
    except OverflowError:
        return max_delay


@settings(max_examples=300, deadline=None)
@given(
    base=st.floats(min_value=0, max_value=10),
    multiplier=st.floats(min_value=1, max_value=10),
    max_delay=st.floats(min_value=0, max_value=100),
    attempt=st.integers(min_value=1, max_value=5000),
)
def test_retry_delay_stays_within_its_cap(
    base: float, multiplier: float, max_delay: float, attempt: int
) -> None:
    """Prove delay(n) lies in [0, min(max_delay, base * multiplier ** (n - 1))], jitter or not."""
    bound = _cap(base, multiplier, max_delay, attempt)
    full = tq.RetryPolicy(base_delay=base, max_delay=max_delay, multiplier=multiplier)
    for _ in range(5):
        assert 0.0 <= full.delay(attempt) <= bound
    exact = dataclasses.replace(full, jitter="none")
    assert exact.delay(attempt) == bound


@settings(max_examples=200, deadline=None)
@given(max_attempts=st.integers(min_value=1, max_value=50), attempt=st.integers(1, 100))
def test_should_retry_never_allows_more_than_max_attempts(max_attempts: int, attempt: int) -> None:
    """Prove a transient error is retried only while attempts < max_attempts, a permanent never."""
    policy = tq.RetryPolicy(max_attempts=max_attempts)
    assert policy.should_retry(tq.TransientError("x"), attempt) is (attempt < max_attempts)
    assert policy.should_retry(TimeoutError("x"), attempt) is (attempt < max_attempts)
    assert policy.should_retry(tq.PermanentError("x"), attempt) is False
    assert policy.should_retry(ValueError("x"), attempt) is False


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(
    max_attempts=st.integers(min_value=1, max_value=5),
    plans=st.lists(
        st.tuples(st.integers(min_value=0, max_value=7), st.sampled_from(["transient", "perm"])),
        min_size=1,
        max_size=6,
    ),
)
def test_pool_attempts_never_exceed_max_attempts(
    max_attempts: int, plans: list[tuple[int, str]]
) -> None:
    """Prove the pool never calls a handler more than max_attempts times and counts each retry."""
    calls: Counter[str] = Counter()
    lock = threading.Lock()
    plan_of = {f"t{index}": plan for index, plan in enumerate(plans)}

    def handler(task: tq.Task) -> dict[str, int]:
        with lock:
            calls[task.id] += 1
            made = calls[task.id]
        failures, kind = plan_of[task.id]
        if made <= failures:
            raise tq.TransientError("again") if kind == "transient" else tq.PermanentError("no")
        return {"calls": made}

    retry = tq.RetryPolicy(max_attempts=max_attempts, base_delay=0.0005, max_delay=0.001)
    with tq.WorkerPool(handler, workers=3, retry=retry) as pool:
        records = pool.run([tq.Task(task_id) for task_id in plan_of])
    expected_retries = 0
    for record in records:
        failures, kind = plan_of[record.task_id]
        if failures == 0:
            expected = (tq.TaskStatus.SUCCEEDED, 1)
        elif kind == "perm":
            expected = (tq.TaskStatus.FAILED, 1)
        elif failures < max_attempts:
            expected = (tq.TaskStatus.SUCCEEDED, failures + 1)
        else:
            expected = (tq.TaskStatus.FAILED, max_attempts)
        assert (record.status, record.attempts) == expected, (failures, kind, record)
        assert record.attempts <= max_attempts
        assert calls[record.task_id] == record.attempts
        expected_retries += record.attempts - 1
    assert pool.metrics.snapshot()["retries"] == expected_retries


# --- Histogram percentiles ------------------------------------------------------------------------


def _nearest_rank(ordered: list[float], p: float) -> float:
    """Return the exact nearest-rank p-th percentile, computed without rounding the rank."""
    rank = max(1, math.ceil(Fraction(p) * len(ordered) / 100))
    return ordered[rank - 1]


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(
        st.floats(min_value=1e-6, max_value=1e4) | st.just(0.0), min_size=1, max_size=300
    ),
    p=st.integers(min_value=0, max_value=100) | st.floats(min_value=0, max_value=100),
    series=st.sampled_from(["latency", "service", "queue_wait"]),
)
@example(values=[float(v) for v in range(1, 101)], p=7, series="latency")
def test_histogram_percentile_within_one_percent(
    values: list[float], p: float, series: str
) -> None:
    """Prove every series answers any percentile within 1% of the exact nearest-rank value."""
    metrics = tq.MetricsCollector()
    for value in values:
        if series == "latency":
            metrics.record_success(value)
        elif series == "service":
            metrics.record_success(0.0, service_time=value)
        else:
            metrics.record_start(value)
    exact = _nearest_rank(sorted(values), p)
    assert metrics.percentile(p, series=series) == pytest.approx(exact, rel=0.01, abs=0.0)


# --- Identifiers and parameters -------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    table=st.from_regex(IDENTIFIER, fullmatch=True)
    | st.text(max_size=70)
    | st.sampled_from(["x; DROP TABLE y", "a--", 'a"b', "a b", "é", "x" * 64])
)
@example(table="idempotency\n")
def test_table_name_accepted_only_when_it_is_an_identifier(table: str) -> None:
    """Prove only a whole SQL identifier is accepted as a table name, and names that very table."""
    folder = tempfile.mkdtemp()
    try:
        db = Path(folder) / "t.db"
        if not IDENTIFIER.fullmatch(table):
            with pytest.raises(ValueError):
                tq.IdempotencyManager(db, table=table)
            assert not db.exists()
            return
        try:
            store = tq.IdempotencyManager(db, table=table)
        except tq.ConfigError:
            return  # an SQL keyword or a reserved name: a clear error, not an injection
        with store:
            claim = store.claim("k")
            assert store.complete("k", claim.token, {"t": table})
        conn = sqlite3.connect(db)
        try:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
        assert table in names
    finally:
        shutil.rmtree(folder)


# Keys every store can keep: no lone surrogate, no NUL (the manager refuses both, see below).
STORABLE_CHARACTERS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")


@settings(max_examples=60, deadline=None)
@given(
    items=st.dictionaries(
        st.text(STORABLE_CHARACTERS, min_size=1, max_size=30)
        | st.sampled_from(["'; DROP TABLE idempotency; --", '" OR 1=1 --', "k\\x00z"]),
        JSON_VALUES,
        min_size=1,
        max_size=8,
    )
)
def test_any_key_and_output_round_trip(items: dict[str, Any]) -> None:
    """Prove keys and outputs full of SQL and JSON metacharacters are stored and read back as is."""
    with tq.IdempotencyManager() as store:
        for key, output in items.items():
            claim = store.claim(key, tq.fingerprint({"k": key}))
            assert claim.state == "claimed"
            assert store.complete(key, claim.token, output)
        for key, output in items.items():
            assert store.get_cached_output(key) == output
            assert store.claim(key).state == "completed"
        assert store.stats() == {
            "in_progress": 0,
            "completed": len(items),
            "failed": 0,
            "total": len(items),
        }


# --- A model of the idempotency store -------------------------------------------------------------

LEASE = 0.03  # seconds; the expire rule waits just past the latest lease
NO_TOKEN = 0  # what a refused claim leaves its caller: no claim returns it (tokens start at 1)


@dataclasses.dataclass
class _Entry:
    """What the model knows of one key."""

    state: str  # "in_progress", "completed" or "failed"
    token: int | None
    fingerprint: str | None
    output: Any = None
    lease_from: float = 0.0  # the lease ends somewhere in [lease_from, lease_to]
    lease_to: float = 0.0


KEYS = st.sampled_from(["a", "b", "c"])
FINGERPRINTS = st.sampled_from([None, "f1", "f2"])


class IdempotencyModel(RuleBasedStateMachine):
    """Drive one IdempotencyManager and a plain model side by side; they must agree."""

    tokens = Bundle("tokens")
    uses_file = False  # subclasses set True to keep the database in a file

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.mkdtemp() if self.uses_file else None
        db = None if self.folder is None else str(Path(self.folder) / "model.db")
        self.store = tq.IdempotencyManager(db, lease_seconds=LEASE)
        self.model: dict[str, _Entry] = {}

    def teardown(self) -> None:
        """Close the store and remove its folder."""
        self.store.close()
        if self.folder is not None:
            shutil.rmtree(self.folder)

    def _owned(self, key: str, token: int) -> bool:
        """Return whether the model says ``token`` owns ``key`` now."""
        entry = self.model.get(key)
        return entry is not None and entry.state == "in_progress" and entry.token == token

    @rule(target=tokens, key=KEYS, fp=FINGERPRINTS)
    def claim(self, key: str, fp: str | None) -> tuple[str, int]:
        """Claim a key; keep the token, or NO_TOKEN when the claim was refused.

        A refused claim adds to the bundle too: whether a claim near a lease's end is granted
        depends on the clock, and the bundle's size must not (hypothesis draws an index in it).
        """
        entry = self.model.get(key)
        began = time.time()
        claim = self.store.claim(key, fp)
        ended = time.time()
        if entry is None:
            allowed = {"claimed"}
        elif fp is not None and entry.fingerprint is not None and fp != entry.fingerprint:
            allowed = {"conflict"}
        elif entry.state == "failed":
            allowed = {"claimed"}
        elif entry.state == "completed":
            allowed = {"completed"}
        elif entry.lease_to <= began:
            allowed = {"claimed"}  # the lease certainly ended before the claim began
        elif ended < entry.lease_from:
            allowed = {"in_progress"}  # the lease certainly outlived the claim
        else:
            allowed = {"claimed", "in_progress"}  # too close to call: follow the store
        assert claim.state in allowed, (key, fp, entry, claim)
        event(f"claim found {entry.state if entry else 'nothing'}, allowed {sorted(allowed)}")
        if claim.state == "completed":
            assert claim.output == entry.output
        if claim.state != "claimed":
            assert claim.token is None
            return (key, NO_TOKEN)
        assert claim.token is not None
        assert entry is None or claim.token != entry.token
        kept = fp if fp is not None else (entry.fingerprint if entry else None)
        lease = (began + LEASE, ended + LEASE)
        self.model[key] = _Entry("in_progress", claim.token, kept, None, *lease)
        return (key, claim.token)

    @rule(held=tokens, output=JSON_VALUES)
    def complete(self, held: tuple[str, int], output: Any) -> None:
        """Complete with a token held now or long ago: only the current owner writes."""
        key, token = held
        expected = self._owned(key, token)
        assert self.store.complete(key, token, output) is expected
        if expected:
            entry = self.model[key]
            entry.state, entry.output = "completed", output

    @rule(held=tokens)
    def renew(self, held: tuple[str, int]) -> None:
        """Renew with a token: only the current owner extends its lease."""
        key, token = held
        expected = self._owned(key, token)
        began = time.time()
        assert self.store.renew(key, token) is expected
        ended = time.time()
        if expected:
            entry = self.model[key]
            entry.lease_from, entry.lease_to = began + LEASE, ended + LEASE

    @rule(held=tokens)
    def release(self, held: tuple[str, int]) -> None:
        """Release with a token: only the current owner frees the key."""
        key, token = held
        expected = self._owned(key, token)
        assert self.store.release(key, token, "gave up") is expected
        if expected:
            self.model[key].state = "failed"

    @rule(key=KEYS, output=JSON_VALUES)
    def mark_processed(self, key: str, output: Any) -> None:
        """Mark a key completed through the simple surface, whoever holds it."""
        self.store.mark_processed(key, output)
        entry = self.model.get(key)
        if entry is None:
            self.model[key] = _Entry("completed", None, None, output)
        else:
            entry.state, entry.output = "completed", output

    @rule(key=KEYS)
    def forged_token(self, key: str) -> None:
        """Use a token no claim ever returned: nothing is written."""
        assert self.store.complete(key, 0, "forged") is False
        assert self.store.renew(key, 0) is False
        assert self.store.release(key, 0) is False

    @rule()
    def expire(self) -> None:
        """Wait until every lease in progress has certainly ended (none: nothing to wait for).

        No precondition on the model: which keys are in progress depends on the clock, and a
        precondition that changes between runs changes which rule a choice sequence draws.
        """
        latest = max(
            (e.lease_to for e in self.model.values() if e.state == "in_progress"), default=0.0
        )
        while (left := latest - time.time()) >= 0:
            time.sleep(left + 0.001)

    @invariant()
    def store_matches_model(self) -> None:
        """Check stats, rows, fingerprints and cached outputs against the model."""
        counts = Counter(entry.state for entry in self.model.values())
        expected = {name: counts.get(name, 0) for name in ("in_progress", "completed", "failed")}
        expected["total"] = len(self.model)
        assert self.store.stats() == expected
        for key in ("a", "b", "c"):
            entry = self.model.get(key)
            row = self.store.lookup(key)
            if entry is None:
                assert row is None
                assert self.store.is_processed(key) is False
                continue
            assert row is not None and row["state"] == entry.state, (key, row, entry)
            assert row["fingerprint"] == entry.fingerprint
            done = entry.state == "completed"
            assert self.store.is_processed(key) is done
            assert self.store.get_cached_output(key) == (entry.output if done else None)
            if done:
                assert row["output"] == entry.output
                assert json.dumps(row["output"]) == json.dumps(entry.output)


class IdempotencyModelOnFile(IdempotencyModel):
    """The same model over a database file in WAL mode."""

    uses_file = True


# Each runs for seconds at rest, and for most of a minute on a busy machine.
TestIdempotencyModel = pytest.mark.timeout(180)(IdempotencyModel.TestCase)
TestIdempotencyModel.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None, database=None
)
TestIdempotencyModelOnFile = pytest.mark.timeout(180)(IdempotencyModelOnFile.TestCase)
TestIdempotencyModelOnFile.settings = settings(
    max_examples=30, stateful_step_count=40, deadline=None, database=None
)
