"""Periodic tasks: the cron parser, the schedule file, the slot policy and real workers.

The parser is checked against a deliberately naive reading of cron written here (each minute
tested field by field), over random expressions and times; the workers are real processes
sharing a SQLite file or a PostgreSQL schema, and each slot must run exactly once.
"""

from __future__ import annotations

import calendar
import datetime
import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import task_queue_optimized as tq
from tests import store_fixtures
from tests.store_fixtures import Launcher
from tests.support import one_line_error, wait_until

UTC = datetime.timezone.utc


def at(text: str) -> float:
    """Unix seconds of an ISO time in UTC, e.g. ``2026-12-01T03:00``."""
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M")


# --- A naive reading of cron, the oracle ---------------------------------------------------------

NAMES = {
    3: {name: n for n, name in enumerate(calendar.month_abbr) if name},
    4: {name: n for n, name in enumerate(["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"])},
}
BOUNDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def naive_field(text: str, position: int, value: int) -> bool:
    """Whether `value` satisfies one field, read item by item with arithmetic, no sets."""
    low, high = BOUNDS[position]

    def number(word: str) -> int:
        for name, n in NAMES.get(position, {}).items():
            if name.lower() == word.lower():
                return n
        return int(word)

    for item in text.split(","):
        span, slash, step = item.partition("/")
        step_n = int(step) if slash else 1
        if span == "*":
            first, last = low, high
        elif "-" in span:
            first, last = (number(part) for part in span.split("-"))
        else:
            first = number(span)
            last = high if slash else first
        candidates = [value, 7] if position == 4 and value == 0 else [value]
        if any(first <= v <= last and (v - first) % step_n == 0 for v in candidates):
            return True
    return False


def naive_day(expression: str, day: datetime.date) -> bool:
    _, _, dom, month, dow = expression.split()
    if not naive_field(month, 3, day.month):
        return False
    by_date = naive_field(dom, 2, day.day)
    by_weekday = naive_field(dow, 4, day.isoweekday() % 7)
    if dom.startswith("*") or dow.startswith("*"):
        return by_date and by_weekday
    return by_date or by_weekday


def naive_matches(expression: str, moment: datetime.datetime) -> bool:
    minute, hour = expression.split()[:2]
    return (
        naive_field(minute, 0, moment.minute)
        and naive_field(hour, 1, moment.hour)
        and naive_day(expression, moment.date())
    )


def naive_none_between(expression: str, start: float, end: float) -> bool:
    """Whether no minute strictly between `start` and `end` (minute boundaries) matches."""
    moment = datetime.datetime.fromtimestamp(start, UTC) + datetime.timedelta(minutes=1)
    stop = datetime.datetime.fromtimestamp(end, UTC)
    while moment < stop:
        if moment.hour == 0 and moment.minute == 0 and moment.date() < stop.date():
            # Whole days: the day test decides (every field has at least one hour and minute).
            if naive_day(expression, moment.date()):
                day_end = moment + datetime.timedelta(days=1)
                if any(naive_matches(expression, moment + datetime.timedelta(minutes=m))
                       for m in range(1440)):  # fmt: skip
                    return False
                moment = day_end
            else:
                moment += datetime.timedelta(days=1)
            continue
        if naive_matches(expression, moment):
            return False
        moment += datetime.timedelta(minutes=1)
    return True


def field_strategy(position: int) -> st.SearchStrategy[str]:
    low, high = BOUNDS[position]
    names = list(NAMES.get(position, {}))

    def word(n: int) -> st.SearchStrategy[str]:
        options = [st.just(str(n))]
        if names and n < len(names) + (position == 3):
            options.append(st.sampled_from([name for name, v in NAMES[position].items()
                                            if v == n] or [str(n)]))  # fmt: skip
        return st.one_of(options)

    value = st.integers(low, high)
    single = value.flatmap(word)
    span = (
        st.tuples(value, value)
        .map(sorted)
        .flatmap(lambda pair: st.tuples(word(pair[0]), word(pair[1])).map("-".join))
    )
    step = st.integers(1, high + 1).map(str)
    item = st.one_of(
        st.just("*"),
        single,
        span,
        st.tuples(st.sampled_from(["*"]) | span | single, step).map("/".join),
    )
    return st.lists(item, min_size=1, max_size=3).map(",".join)


def possible(expression: str) -> bool:
    try:
        tq._Cron.parse(expression)
    except ValueError:
        return False
    return True


expressions = st.tuples(*(field_strategy(i) for i in range(5))).map(" ".join).filter(possible)
moments = st.floats(min_value=at("2000-01-01T00:00"), max_value=at("2090-01-01T00:00"))


# --- The parser ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expressions, moments)
def test_next_and_latest_slot_agree_with_a_naive_reading(expression: str, now: float) -> None:
    cron = tq._Cron.parse(expression)
    following = cron.next_after(now)
    assert following > now and following % 60 == 0
    assert naive_matches(expression, datetime.datetime.fromtimestamp(following, UTC))
    latest = cron.latest(now)
    assert latest is not None and latest <= now and latest % 60 == 0
    assert naive_matches(expression, datetime.datetime.fromtimestamp(latest, UTC))
    # Nothing matches between the two: each is the nearest slot on its side of `now`.
    if following - latest <= 40 * 86400:
        assert naive_none_between(expression, latest, following)
    assert cron.latest(following - 60) == latest
    assert cron.next_after(latest) == following


@pytest.mark.parametrize(
    ("expression", "now", "next_slot", "latest"),
    [
        ("0 3 * * *", "2026-12-01T02:59:59", "2026-12-01T03:00", "2026-11-30T03:00"),
        ("0 3 * * *", "2026-12-01T03:00", "2026-12-02T03:00", "2026-12-01T03:00"),
        ("*/15 * * * *", "2026-12-31T23:59", "2027-01-01T00:00", "2026-12-31T23:45"),
        # Both day fields restricted: the 13th OR a Friday (2026-11-13 is a Friday).
        ("0 0 13 * 5", "2026-11-13T00:01", "2026-11-20T00:00", "2026-11-13T00:00"),
        ("0 0 13 * 5", "2026-12-05T00:00", "2026-12-11T00:00", "2026-12-04T00:00"),
        # A star-led day field leaves the other one alone: odd days that are Mondays.
        ("0 0 */2 * mon", "2026-12-01T00:00", "2026-12-07T00:00", "2026-11-23T00:00"),
        ("0 12 * * 7", "2026-12-01T00:00", "2026-12-06T12:00", "2026-11-29T12:00"),
        ("0 12 * * SUN", "2026-12-01T00:00", "2026-12-06T12:00", "2026-11-29T12:00"),
        ("0 0 31 * *", "2026-11-01T00:00", "2026-12-31T00:00", "2026-10-31T00:00"),
        ("0 0 29 2 *", "2026-03-01T00:00", "2028-02-29T00:00", "2024-02-29T00:00"),
        # Star-led day of month AND a day of week: January's 1st, 8th, ... on a Sunday, which
        # comes round 6 to 11 years apart.
        ("* * */7 1 0", "2026-12-01T00:00", "2034-01-01T00:00", "2023-01-29T23:59"),
        ("30 8 * jan-mar mon-fri", "2026-12-01T00:00", "2027-01-01T08:30", "2026-03-31T08:30"),
        ("5/20 1-3/2 * * *", "2026-12-01T01:46", "2026-12-01T03:05", "2026-12-01T01:45"),
        ("@daily", "2026-12-01T10:00", "2026-12-02T00:00", "2026-12-01T00:00"),
        ("@HOURLY", "2026-12-01T10:30", "2026-12-01T11:00", "2026-12-01T10:00"),
    ],
)
def test_known_slots(expression: str, now: str, next_slot: str, latest: str) -> None:
    cron = tq._Cron.parse(expression)
    assert iso(cron.next_after(at(now))) == next_slot
    assert iso(cron.latest(at(now))) == latest


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("0 3 * *", "expected 5 fields"),
        ("0 3 * * * *", "expected 5 fields"),
        ("60 * * * *", "minute 60 is outside 0-59"),
        ("* 24 * * *", "hour 24 is outside 0-23"),
        ("* * 0 * *", "day of month 0 is outside 1-31"),
        ("* * * 13 *", "month 13 is outside 1-12"),
        ("* * * * 8", "day of week 8 is outside 0-7"),
        ("5-1 * * * *", "range '5-1' runs backwards"),
        ("*/0 * * * *", "step '0' is not a positive integer"),
        ("*/x * * * *", "step 'x' is not a positive integer"),
        ("1,,2 * * * *", "has an empty item"),
        ("* * * foo *", "month 'foo' is not a number or a name"),
        ("* * * * L", "day of week 'L' is not a number or a name"),
        ("mon * * * *", "minute 'mon' is not a number"),
        ("-1 * * * *", "minute range '-1' lacks an end"),
        ("* 1- * * *", "hour range '1-' lacks an end"),
        ("* 1-2-3 * * *", "hour '2-3' is not a number"),
        ("0 0 30 2 *", "never occurs"),
        ("0 0 31 4,6,9,11 *", "never occurs"),
        ("@often", "expected 5 fields"),
    ],
)
def test_bad_expressions_name_the_problem(expression: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("*", r"\*")):
        tq._Cron.parse(expression)


def test_february_30th_with_a_weekday_is_the_weekday() -> None:
    # Both day fields restricted: the impossible date adds nothing, the Mondays of February
    # still match.
    cron = tq._Cron.parse("0 0 30 2 mon")
    assert iso(cron.next_after(at("2026-12-01T00:00"))) == "2027-02-01T00:00"


# --- The schedule file ---------------------------------------------------------------------------


def write(path: Path, document: Any) -> str:
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return str(path)


def test_a_schedule_file_is_read(tmp_path: Path) -> None:
    entries = tq._load_schedule(write(tmp_path / "s.json", [
        {"id": "nightly-report", "cron": "0 3 * * *", "payload": {"to": "ops"}, "queue": "q"},
        {"id": "tick.v2:x", "every": 60.0},
    ]))  # fmt: skip
    assert [e.id for e in entries] == ["nightly-report", "tick.v2:x"]
    assert entries[0].payload == {"to": "ops"} and entries[0].queue == "q"
    assert entries[1].timing == tq._Every(60) and entries[1].payload == {}
    task = entries[0].task(at("2026-12-01T03:00"))
    assert (task.id, task.key) == ("nightly-report@2026-12-01T03:00:00Z",) * 2
    assert task.payload == {"to": "ops"} and task.queue == "q"
    assert entries[1].task(at("2026-12-01T03:00")).queue == "default"


BAD_SCHEDULES = [
    pytest.param([{"id": "a", "cron": "0 3 * *"}], "schedule 0: field 'cron'", id="cron-fields"),
    pytest.param([{"id": "a", "cron": "61 * * * *"}], "minute 61", id="cron-range"),
    pytest.param([{"id": "a", "cron": 5}], "field 'cron' must be a string", id="cron-type"),
    pytest.param([{"id": "a", "cron": "* * * * *", "every": 60}], "exactly one", id="both"),
    pytest.param([{"id": "a"}], "exactly one of the fields 'cron' and 'every'", id="neither"),
    pytest.param([{"id": "a", "every": 0}], "field 'every' must be a whole number", id="every0"),
    pytest.param([{"id": "a", "every": -5}], "field 'every'", id="every-negative"),
    pytest.param([{"id": "a", "every": 1.5}], "field 'every'", id="every-fraction"),
    pytest.param([{"id": "a", "every": True}], "field 'every'", id="every-bool"),
    pytest.param([{"id": "a", "every": "60"}], "field 'every'", id="every-string"),
    pytest.param(
        [{"id": "a", "every": 5}, {"id": "b", "every": 5}, {"id": "a", "cron": "* * * * *"}],
        "schedule 2: id 'a' repeats schedule 0",
        id="duplicate-id",
    ),
    pytest.param([{"id": "a b", "every": 5}], "field 'id' must be", id="id-space"),
    pytest.param([{"id": "a@b", "every": 5}], "field 'id' must be", id="id-at"),
    pytest.param([{"id": "", "every": 5}], "field 'id' must be", id="id-empty"),
    pytest.param([{"id": "-a", "every": 5}], "field 'id' must be", id="id-dash-first"),
    pytest.param([{"id": "x" * 201, "every": 5}], "field 'id' must be", id="id-long"),
    pytest.param([{"every": 5}], "field 'id' must be", id="id-missing"),
    pytest.param([{"id": 7, "every": 5}], "field 'id' must be", id="id-number"),
    pytest.param([{"id": "a", "every": 5, "when": 1}], "unknown field 'when'", id="unknown"),
    pytest.param([{"id": "a", "every": 5, "payload": []}], "field 'payload'", id="payload"),
    pytest.param([{"id": "a", "every": 5, "queue": ""}], "field 'queue'", id="queue-empty"),
    pytest.param([{"id": "a", "every": 5, "queue": 3}], "field 'queue'", id="queue-type"),
    pytest.param([{"id": "a", "every": 5, "queue": "a,b"}], "field 'queue'", id="queue-comma"),
    pytest.param(["a"], "schedule 0: must be an object", id="not-object"),
    pytest.param([], "non-empty JSON array", id="empty"),
    pytest.param({"id": "a", "every": 5}, "non-empty JSON array", id="not-array"),
    pytest.param('[{"id": "a", "every": 5,}]', "line 1 column", id="bad-json"),
    pytest.param('[{"id": "a", "id": "b", "every": 5}]', "duplicate object key", id="dup-key"),
    pytest.param('[{"id": "a", "every": NaN}]', "line 1 column", id="nan"),
]


@pytest.mark.parametrize(("document", "words"), BAD_SCHEDULES)
def test_bad_schedule_files_name_the_problem(tmp_path: Path, document: Any, words: str) -> None:
    path = write(tmp_path / "s.json", document)
    with pytest.raises(tq.ConfigError) as excinfo:
        tq._load_schedule(path)
    message = str(excinfo.value)
    assert message.startswith(f"--schedule {path}: ") and words in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    "document",
    [
        [{"id": "a", "cron": "0 3 * * * *"}],
        [{"id": "a", "cron": "* * * * *", "every": 60}],
        [{"id": "a", "every": 0}],
        [{"id": "a", "every": 5}, {"id": "a", "every": 6}],
        [{"id": "bad id", "every": 5}],
    ],
    ids=["cron", "both", "every0", "duplicate", "bad-id"],
)
def test_worker_with_a_bad_schedule_exits_2_and_creates_no_database(
    launcher: Launcher, tmp_path: Path, document: Any
) -> None:
    path = write(tmp_path / "s.json", document)
    proc = launcher.run("worker", "--db", str(tmp_path / "q.db"), "--schedule", path)
    assert "--schedule" in one_line_error(proc)
    assert not (tmp_path / "q.db").exists()


def test_a_missing_schedule_file_exits_2(launcher: Launcher, tmp_path: Path) -> None:
    proc = launcher.run("worker", "--db", str(tmp_path / "q.db"), "--schedule", "nope.json")
    assert one_line_error(proc) == "error: --schedule nope.json: no such file"
    assert not (tmp_path / "q.db").exists()


# --- The slot policy -----------------------------------------------------------------------------


def entry(entry_id: str, **timing: Any) -> tq._ScheduleEntry:
    return tq._schedule_entry({"id": entry_id, **timing})


def ids(tasks: list[tq.Task]) -> list[str]:
    return [task.id for task in tasks]


def test_a_starting_worker_enqueues_only_the_latest_slot_it_missed() -> None:
    periodic = tq._Periodic(
        [entry("tick", every=10), entry("nightly", cron="0 3 * * *")], lambda tasks: len(tasks)
    )
    now = at("2026-12-01T14:00:07")
    assert ids(periodic.due(now)) == ["tick@2026-12-01T14:00:00Z", "nightly@2026-12-01T03:00:00Z"]
    assert periodic.due(now + 2) == []  # nothing new within the same slot
    assert periodic.next_at(now) == at("2026-12-01T14:00:10")
    # Down (or stalled) for five and a half periods: only the latest slot comes back.
    assert ids(periodic.due(now + 55)) == ["tick@2026-12-01T14:01:00Z"]
    # And a day later, one nightly slot, not the ones in between.
    assert ids(periodic.due(at("2026-12-04T05:00:00"))) == [
        "tick@2026-12-04T05:00:00Z",
        "nightly@2026-12-04T03:00:00Z",
    ]


def test_a_conflicting_slot_does_not_hold_back_the_others(tmp_path: Path) -> None:
    store = tq.open_store(str(tmp_path / "q.db"))
    try:
        # Another worker enqueued this slot with another payload (its schedule file differs).
        store.enqueue_many([tq.Task("a@2026-12-01T14:00:00Z", {"old": True})])
        periodic = tq._Periodic([entry("a", every=60), entry("b", every=60)], store.enqueue_many)
        assert periodic.enqueue_due(at("2026-12-01T14:00:30")) is True
        ids_stored = {task.task.id for task in store.take_many("w", 10)}
    finally:
        store.close()
    assert ids_stored == {"a@2026-12-01T14:00:00Z", "b@2026-12-01T14:00:00Z"}


def test_a_refused_enqueue_is_tried_again_and_a_conflict_is_left_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[list[str]] = []
    answers: list[Any] = [tq.TaskQueueError("the database is down"), 1,
                          tq.TaskConflictError("tick@2026-12-01T14:00:10Z"),
                          tq.TaskConflictError("tick@2026-12-01T14:00:10Z")]  # fmt: skip

    def enqueue(tasks: list[tq.Task]) -> int:
        calls.append(ids(tasks))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    periodic = tq._Periodic([entry("tick", every=10)], enqueue)
    now = at("2026-12-01T14:00:01")
    with caplog.at_level(logging.WARNING, logger="task_queue_optimized"):
        assert periodic.enqueue_due(now) is False
        assert periodic.enqueue_due(now + 1) is True  # the same slot, again
        assert periodic.enqueue_due(now + 10) is True  # the conflict is logged, not retried
        assert periodic.enqueue_due(now + 11) is True
    assert calls == [["tick@2026-12-01T14:00:00Z"]] * 2 + [["tick@2026-12-01T14:00:10Z"]] * 2
    messages = [record.getMessage() for record in caplog.records]
    assert any("the database is down" in m and "trying again" in m for m in messages)
    assert any("the slot enqueued first stands" in m for m in messages)


def test_the_schedule_thread_enqueues_at_start_and_stops_at_once(tmp_path: Path) -> None:
    # The next slot is an hour away on this clock: stop must not wait for it.
    store = tq.open_store(str(tmp_path / "q.db"))
    clock = [at("2026-12-01T14:00:05")]
    periodic = tq._Periodic([entry("tick", every=3600)], store.enqueue_many, lambda: clock[0])
    try:
        periodic.start()
        wait_until(lambda: store.queue_status()["tasks"]["queued"] == 1, "the first slot")
        assert periodic.next_at(clock[0]) == at("2026-12-01T15:00:00")
    finally:
        periodic.stop()
        store.close()


class RecordingEvent(threading.Event):
    """An Event whose waits are recorded; the first wait stops the loop that waits."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        self.set()
        return True


@pytest.mark.parametrize(
    ("now", "expected"),
    [("2026-12-01T14:00:05", 5.0), ("2026-12-01T14:00:09.75", 0.25), ("2026-12-01T13:00:00", 60.0)],
)
def test_the_schedule_thread_sleeps_until_the_next_slot_without_polling(
    now: str, expected: float
) -> None:
    timing = {"every": 10} if now.startswith("2026-12-01T14") else {"cron": "0 15 * * *"}
    periodic = tq._Periodic([entry("tick", **timing)], len, lambda: at(now))
    periodic._stop = RecordingEvent()
    periodic._run()  # one round: enqueue what is due, then one wait until the next slot
    # One wait, as long as the time to the next slot (at most a minute: the clock is reread).
    assert periodic._stop.waits == [pytest.approx(expected)]


# --- Real workers: each slot exactly once --------------------------------------------------------


def slot_calls(launcher: Launcher) -> Counter[str]:
    return Counter(key for key in launcher.calls_by_key().elements() if key.startswith("tick@"))


@pytest.mark.timeout(120)
def test_three_workers_with_one_schedule_run_each_slot_once(
    launcher: Launcher, tmp_path: Path, durable_db: str
) -> None:
    schedule = write(tmp_path / "s.json", [{"id": "tick", "every": 1, "payload": {"n": 1}}])
    # Three workers, each carrying the schedule: every one of them enqueues every slot.
    workers = [
        launcher.worker(
            durable_db, "--schedule", schedule, "--workers", "2", "--lease-seconds", "5"
        )
        for _ in range(3)
    ]
    # A worker says it serves just before its schedule starts: every slot after the last one
    # said so is enqueued by all three. Three such slots have each been carried by every worker.
    wait_until(
        lambda: all("serving" in worker.stderr() for worker in workers),
        "every worker to serve",
        procs=workers,
    )
    all_serving = time.time()
    wait_until(
        lambda: sum(at(key.partition("@")[2].rstrip("Z")) > all_serving
                    for key in slot_calls(launcher)) >= 3,
        "three slots that every worker carried",
        timeout=60,
        procs=workers,
    )  # fmt: skip
    for worker in workers:
        assert worker.terminate() == 143
    calls = slot_calls(launcher)
    assert calls and set(calls.values()) == {1}, calls
    # The store holds one row per slot, every one done.
    store = tq.open_store(durable_db)
    try:
        status = store.queue_status()
    finally:
        store.close()
    assert status["tasks"]["done"] == len(calls) and status["tasks"]["failed"] == 0


@pytest.mark.timeout(60)
def test_a_worker_back_after_missed_slots_runs_only_the_latest(
    launcher: Launcher, tmp_path: Path
) -> None:
    db = str(tmp_path / "queue.db")
    schedule = write(tmp_path / "s.json", [{"id": "tick", "every": 1}])
    first = launcher.run("worker", "--db", db, "--schedule", schedule, "--burst", "--handler",
                         store_fixtures.RECORD_HANDLER, "--json")  # fmt: skip
    assert first.returncode == 0, first.stderr
    (ran_first,) = slot_calls(launcher)
    # The worker is away while two slots pass (the slots are wall-clock seconds).
    away_until = at(ran_first.partition("@")[2].rstrip("Z")) + 3
    while time.time() < away_until:
        time.sleep(away_until - time.time())
    second = launcher.run("worker", "--db", db, "--schedule", schedule, "--burst", "--handler",
                          store_fixtures.RECORD_HANDLER, "--json")  # fmt: skip
    assert second.returncode == 0, second.stderr
    calls = slot_calls(launcher)
    assert len(calls) == 2 and set(calls.values()) == {1}, calls
    (ran_second,) = set(calls) - {ran_first}
    assert at(ran_second.partition("@")[2].rstrip("Z")) >= away_until
