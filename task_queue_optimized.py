"""A bounded, idempotent, crash-safe task queue for I/O-bound work.

task_queue_optimized runs many I/O-bound tasks concurrently on a thread pool fed by a bounded queue,
so memory stays flat and producers feel backpressure. Every task carries an idempotency key that a
SQLite store (UNIQUE key, cached outputs, leases and fencing tokens) deduplicates, so a task
submitted twice, by one process or by two, runs once, and a rerun after a crash resumes where the
last run stopped. Transient failures are retried with exponential backoff and full jitter;
permanent ones fail at once. Everything is measured and exported as JSON.

Example::

    from task_queue_optimized import Task, WorkerPool

    def fetch(task):
        return {"status": 200, "url": task.payload["url"]}

    with WorkerPool(fetch, workers=8, db_path="progress.db") as pool:
        records = pool.run([Task("t1", {"url": "https://example.org"})])
    print(records[0].status, pool.metrics.snapshot()["throughput_per_second"])

Command line::

    python task_queue_optimized.py --benchmark --workers 8
    python task_queue_optimized.py --task-file sample_tasks_100.json --db progress.db
    python task_queue_optimized.py dashboard --db progress.db   # http://127.0.0.1:8080/

Periodic tasks and scripts::

    task-queue worker --schedule schedule.json   # [{"id": "nightly", "cron": "0 3 * * *"}]
    task-queue worker --burst                     # run the queue dry, exit 0 or 1
    enqueue(tasks, db="postgresql://app@db/app")  # all or nothing, from code

Sections: defaults, exceptions, records, task files, retry policy, stores, idempotency,
metrics, processor, queue, flow control, pool, periodic tasks, configuration, dashboard,
process control, command line.
"""

from __future__ import annotations

__version__ = "1.0.0"

import argparse
import asyncio
import atexit
import collections
import concurrent.futures
import concurrent.futures.thread  # registers its exit hook now, so ours runs before it
import contextlib
import contextvars
import dataclasses
import datetime
import enum
import functools
import hashlib
import heapq
import hmac
import http
import http.server
import importlib
import inspect
import ipaddress
import itertools
import json
import json.scanner
import logging
import math
import os
import queue
import random
import re
import secrets
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, NamedTuple, NoReturn, Protocol, TypeGuard, TypeVar, cast, overload

__all__ = [
    "DEFAULT_BASE_DELAY",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CLAIM_POLL_INTERVAL",
    "DEFAULT_DASHBOARD_HOST",
    "DEFAULT_DASHBOARD_PORT",
    "DEFAULT_DB_FILE",
    "DEFAULT_DURABILITY",
    "DEFAULT_FAILED_LIMIT",
    "DEFAULT_JITTER_MS",
    "DEFAULT_LATENCY_MS",
    "DEFAULT_LEASE_SECONDS",
    "DEFAULT_LOG_LEVEL",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_DELAY",
    "DEFAULT_MAX_TASK_FILE_BYTES",
    "DEFAULT_METRICS_FILE",
    "DEFAULT_METRICS_HOST",
    "DEFAULT_MULTIPLIER",
    "DEFAULT_QUEUE",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_TASKS",
    "DEFAULT_WORKERS",
    "ENQUEUE_CHUNK",
    "MAX_DASHBOARD_BODY_BYTES",
    "MAX_DASHBOARD_IDS",
    "MAX_DASHBOARD_QUERY_FIELDS",
    "MAX_JSON_DEPTH",
    "MAX_KEY_BYTES",
    "MAX_NAMESPACE_BYTES",
    "MAX_PRIORITY",
    "MAX_RATE_COUNT",
    "MAX_RETRY_AFTER",
    "MIN_PRIORITY",
    "AsyncWorkerPool",
    "Claim",
    "ClaimState",
    "ConfigError",
    "EntryState",
    "ErrorKind",
    "IdempotencyConflictError",
    "IdempotencyManager",
    "KeyState",
    "MemoryStore",
    "MetricsCollector",
    "Outcome",
    "PermanentError",
    "PoolClosedError",
    "PostgresStore",
    "QueueFullError",
    "QueuedTask",
    "RetryPolicy",
    "SqliteStore",
    "Store",
    "Task",
    "TaskConflictError",
    "TaskFileError",
    "TaskProcessor",
    "TaskQueue",
    "TaskQueueError",
    "TaskRecord",
    "TaskStatus",
    "TransientError",
    "WorkerPool",
    "console_main",
    "current_deadline",
    "enqueue",
    "fingerprint",
    "handler_namespace",
    "load_config",
    "load_tasks",
    "main",
    "open_store",
    "serve_dashboard",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")  # the result of a store transaction's body


# --- Defaults ------------------------------------------------------------------------------------

DEFAULT_WORKERS = 8
DEFAULT_QUEUE_SIZE = 1000
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BASE_DELAY = 0.01
DEFAULT_MAX_DELAY = 1.0
DEFAULT_MULTIPLIER = 2.0
DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_LATENCY_MS = 30.0
DEFAULT_JITTER_MS = 5.0
DEFAULT_CHUNK_SIZE = 65536
DEFAULT_DURABILITY = "normal"
DEFAULT_MAX_TASK_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_DB_FILE = "task_queue.db"
DEFAULT_METRICS_FILE = "metrics.json"
DEFAULT_TASKS = 100
DEFAULT_QUEUE = "default"  # the named queue of a task that names none
DEFAULT_FAILED_LIMIT = 100  # failed tasks `failed_tasks` and ``task-queue failed`` list at once
DEFAULT_LOG_LEVEL = "WARNING"
DEFAULT_CLAIM_POLL_INTERVAL = 0.05
DEFAULT_METRICS_HOST = "127.0.0.1"  # where a worker serves its metrics: loopback unless told
ENQUEUE_CHUNK = 500  # tasks per statement batch of enqueue(): memory stays flat for any count
_PLACE_BLOCK = 1024  # places in submission order one PostgreSQL statement draws (>= ENQUEUE_CHUNK)
BACKLOG_REFRESH_SECONDS = 2.0  # how often a worker copies the store's backlog into its metrics
BATCH_BUDGET_SECONDS = 0.001  # handler time one worker batch aims for
MAX_BATCH = 64  # most jobs one worker takes from the queue at once
CLAIM_AHEAD = 8  # jobs of slow calls a worker claims at once: it runs one, others take the rest
MAX_COMPLETION_BATCH = 512  # most requests the committer takes in one round
ASYNC_DISPATCHERS = 2  # threads that claim keys and start calls for an async handler
ASYNC_MAX_BATCH = 256  # most jobs a dispatcher claims and starts at once
PREFETCH_BUDGET_SECONDS = 0.05  # handler time a durable worker leases ahead for quick tasks
MAX_PREFETCH = 256  # most durable rows a worker leases ahead for quick tasks
_WAIT_NOTICE_INTERVAL = 60.0  # seconds between two notices of keys held by another owner
_OUTAGE_NOTICE_INTERVAL = 60.0  # seconds between two warnings that a worker's database is down
_OUTAGE_MAX_BACKOFF = 5.0  # longest wait between two tries of an unavailable database
MAX_JSON_DEPTH = 64
# Ids, keys and worker names, and namespaces, in UTF-8 bytes: a key and a namespace together fit
# one PostgreSQL btree index row (2704 bytes, headers included), so every store keeps them alike.
MAX_KEY_BYTES = 2048
MAX_NAMESPACE_BYTES = 512
MAX_ECHO_CHARS = 80  # most characters of a user's value that an error message repeats
MAX_RETRY_AFTER = 3600.0  # longest wait a TransientError's retry_after can ask for, seconds
MAX_RATE_COUNT = 10_000  # most calls one rate limit counts per period (one slot each)
RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}  # the periods of a rate limit such as "100/s"
# A slot of a rate limit is free again this share of its period after the call that used it
# started, beyond the period itself: room for the moments between the pool's clock reading and
# the handler's (a thread switch), so that calls the handler itself times keep to the limit.
RATE_MARGIN = 0.01
# How long a worker sharing a store's rate limit may take to start the calls of the slots it
# reserved in one statement (a share of the period, within bounds); a slot stays taken this much
# longer than the period, so reserving ahead never lets two calls of one slot come closer.
RATE_HOLD_SHARE, RATE_HOLD_MIN, RATE_HOLD_MAX = 0.05, 0.01, 0.25
# The share of that hold a reserved slot may wait in this process before its call starts; the
# rest is room for the moment between the pool's clock reading and the handler's.
RATE_HOLD_USE = 0.8
# Priorities: higher starts first among ready tasks. A small closed range keeps task files
# portable and an index on the column compact.
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000

DURABILITY_MODES = ("normal", "full")
BUSY_TIMEOUT_SECONDS = 30.0
PG_CONFLICT_RETRIES = 3  # prompt reruns of a transaction PostgreSQL aborted as a deadlock
PSYCOPG_MIN_VERSION = (3, 2)  # Connection.notifies(timeout=, stop_after=)
HISTOGRAM_RELATIVE_ERROR = 0.01
DEFAULT_DASHBOARD_HOST = "127.0.0.1"
DEFAULT_DASHBOARD_PORT = 8080
DASHBOARD_MINUTES = 60  # minutes the dashboard's charts show
DASHBOARD_FAILED_LIMIT = 100  # failed tasks the page lists
DASHBOARD_REQUEST_TIMEOUT = 30.0  # seconds a dashboard connection may stay silent
MAX_DASHBOARD_IDS = 1000  # most task ids one dashboard request names
MAX_DASHBOARD_BODY_BYTES = 64 * 1024
MAX_DASHBOARD_QUERY_FIELDS = 20
MIN_DASHBOARD_TOKEN_CHARS = 16
DASHBOARD_TOKEN_ENV = "TQ_DASHBOARD_TOKEN"
HISTORY_BUCKET_SPAN = 4  # histogram buckets merged into one in the per-minute history (~4% error)
IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
SQLITE_HEADER = b"SQLite format 3\x00"
MEMORY_DATABASE = ":memory:"  # SQLite's name for a private in-memory database, never a file
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_NOT_FINISHED = 3  # ``task-queue result``: the key is unknown or has not finished
EXIT_SIGNAL: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}


# --- Exceptions ----------------------------------------------------------------------------------


class TaskQueueError(Exception):
    """Base class of every error this module raises."""


class TransientError(TaskQueueError):
    """A failure worth retrying: the same call may succeed later.

    Args:
        message: what went wrong.
        retry_after: seconds the next attempt must wait at least (a server's ``Retry-After``);
            the retry policy's own delay applies when it is longer, and its ``max_delay`` does
            not shorten this one. Values above `MAX_RETRY_AFTER` (an hour) are capped there.

    Raises:
        ValueError: `retry_after` is not None or a finite number >= 0.
    """

    def __init__(self, message: object = "", retry_after: float | None = None) -> None:
        if retry_after is not None:
            if not (_is_finite_number(retry_after) and retry_after >= 0):
                raise ValueError(
                    f"retry_after must be None or a finite number of seconds >= 0, not "
                    f"{_shown(retry_after)}"
                )
            retry_after = min(float(retry_after), MAX_RETRY_AFTER)
        self.retry_after: float | None = retry_after
        super().__init__(message)


class PermanentError(TaskQueueError):
    """A failure that no retry can fix."""


class QueueFullError(TaskQueueError):
    """The bounded queue stayed full: the submission was not accepted."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        super().__init__(f"queue is full ({maxsize} tasks waiting)")


class PoolClosedError(TaskQueueError):
    """The pool or queue is shut down and accepts no more work."""

    def __init__(self) -> None:
        super().__init__("the pool is shut down and accepts no more tasks")


class IdempotencyConflictError(TaskQueueError):
    """An idempotency key was reused with a different payload."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"idempotency key {_shown(key)} was first used with a different payload")


class TaskConflictError(TaskQueueError):
    """A task id already stored in the durable queue was given again with another payload or key."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(
            f"task id {_shown(task_id)} is already in the durable queue with a different payload "
            "or idempotency key"
        )


class TaskFileError(TaskQueueError, ValueError):
    """A task file or task object is invalid; the message names where.

    It is also a `ValueError`, so code that builds `Task` objects directly may catch either.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        index: int | None = None,
        field: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.reason = message
        self.path = path
        self.index = index
        self.field = field
        self.line = line
        self.column = column
        parts = [str(path)] if path is not None else []
        if line is not None:
            parts.append(f"line {line} column {column}")
        if index is not None:
            parts.append(f"task {index}")
        parts.append(message)
        super().__init__(": ".join(parts))

    def located(self, path: str, index: int | None = None) -> TaskFileError:
        """Return a copy of this error that names the file and the task index."""
        return TaskFileError(
            self.reason,
            path=path,
            index=self.index if index is None else index,
            field=self.field,
            line=self.line,
            column=self.column,
        )


class ConfigError(TaskQueueError):
    """A configuration value is invalid; the message names the flag or variable."""


# --- Records -------------------------------------------------------------------------------------


# One encoder each, made once: json.dumps with options builds a new encoder on every call.
_canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode
_output_json = json.JSONEncoder(allow_nan=False).encode


def _encode_output(output: Any) -> str:
    """Return the JSON text of a handler's output (NaN and infinities refused)."""
    return "null" if output is None else _output_json(output)


def fingerprint(payload: Mapping[str, Any]) -> str:
    """Return the hex SHA-256 of the canonical JSON of `payload`.

    Raises:
        TypeError: `payload` holds a value JSON cannot represent.
        ValueError: `payload` holds a non-finite float.
    """
    if not payload and isinstance(payload, dict):
        return _EMPTY_FINGERPRINT
    return hashlib.sha256(_canonical_json(payload).encode()).hexdigest()


_EMPTY_FINGERPRINT = hashlib.sha256(b"{}").hexdigest()


# A task file's fields that say when and in which order a task runs, not what it is: the
# commands that read a file apply them (see `_load_task_entries`); a `Task` does not carry them.
_SCHEDULE_FIELDS = frozenset({"delay_seconds", "priority"})
_TASK_FIELDS = (
    frozenset({"id", "payload", "idempotency_key", "queue", "group", "timeout_seconds"})
    | _SCHEDULE_FIELDS
)


def _cut(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Return `text` cut to `limit` characters, saying how long it was when it was longer.

    An error message is one line a person reads: the value it repeats (a 2,000,000-digit number
    in a task file, an environment variable of megabytes) must not make it megabytes long.
    """
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _shown(value: Any) -> str:
    """Return `value` as an error message repeats it: its repr, cut as `_cut` cuts."""
    if isinstance(value, str) and len(value) > MAX_ECHO_CHARS:
        return f"{value[:MAX_ECHO_CHARS]!r}... ({len(value)} characters)"
    try:
        return _cut(repr(value))
    except Exception:  # an int past the digit limit, a broken __repr__
        return f"<{type(value).__name__}>"


def _text_problem(value: Any, limit: int = MAX_KEY_BYTES) -> str | None:
    """Return why `value` cannot be an id or key, or None when it can.

    Every store must keep it as text: PostgreSQL text cannot hold a NUL character, and SQLite and
    PostgreSQL both need valid UTF-8, which a lone surrogate ("\\ud800") cannot be encoded to.
    At most `limit` bytes of UTF-8, so that PostgreSQL can index it (see `MAX_KEY_BYTES`); the
    same bound holds on every store, so a task accepted by one is accepted by all.
    """
    if value.__class__ is str and value.isascii() and 0 < len(value) <= limit:
        return "must not contain a NUL character" if "\x00" in value else None  # the usual case
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if "\x00" in value:
        return "must not contain a NUL character"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return (
            f"must be valid Unicode text, not hold the lone surrogate U+{ord(value[exc.start]):04X}"
        )
    if size > limit:
        return f"must be at most {limit} bytes in UTF-8, not {size}"
    return None


def _is_text(value: Any) -> bool:
    """Return whether `value` is a non-empty string every store can keep (see `_text_problem`)."""
    return _text_problem(value) is None


def _check_text_field(value: Any, field: str) -> None:
    """Raise `TaskFileError` naming `field` when `value` cannot be an id or key."""
    problem = _text_problem(value)
    if problem is not None:
        raise TaskFileError(f"field {field!r} {problem}", field=field)


def _checked_timeout(value: Any, field: str) -> float:
    """Return `value` as an attempt's timeout in seconds, or raise `TaskFileError` naming it."""
    if not (_is_finite_number(value) and value > 0):
        raise TaskFileError(
            f"field {field!r} must be a number of seconds > 0, not {_shown(value)}", field=field
        )
    return float(value)


def _queue_problem(value: Any) -> str | None:
    """Return why `value` cannot name a queue, or None when it can.

    A key's rules (`_text_problem`), and printable with no whitespace and no comma: a queue name
    is typed on command lines, where ``--queues a,b`` separates names by commas.
    """
    problem = _text_problem(value)
    if problem is None and not (value.isprintable() and not any(c.isspace() for c in value)):
        problem = "must be printable, without whitespace"
    if problem is None and "," in value:
        problem = "must not contain a comma"
    return problem


def _check_queue_name(value: Any, source: str) -> str:
    """Return `value` if it can name a queue; else raise ValueError naming `source`."""
    problem = _queue_problem(value)
    if problem is not None:
        raise ValueError(f"{source} {problem}, not {_shown(value)}")
    return cast(str, value)  # a str: _queue_problem checked it


def _storable_text(text: str | None) -> str | None:
    """Return `text` as every store can keep it: NUL and lone surrogates written as escapes.

    Error messages come from handlers and their exceptions, so they may hold anything; one that
    a database refuses must not turn a finished task's bookkeeping into an internal error.
    """
    if text is None:
        return None
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _check_delay(value: Any, name: str = "delay") -> float:
    """Return `value` as a delay in seconds: a finite number >= 0.

    Raises:
        TypeError: `value` is not a number (a bool is not one).
        ValueError: `value` is negative, NaN or infinite.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, not {_shown(value)}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {_shown(value)}")
    return seconds


def _check_priority(value: Any, name: str = "priority") -> int:
    """Return `value` as a priority: an integer from `MIN_PRIORITY` to `MAX_PRIORITY`.

    Raises:
        TypeError: `value` is not an integer (a bool is not one).
        ValueError: `value` is out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {_shown(value)}")
    if not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise ValueError(
            f"{name} must be from {MIN_PRIORITY} to {MAX_PRIORITY}, not {_shown(value)}"
        )
    return int(value)


def _schedule_of(mapping: Mapping[str, Any]) -> tuple[float, int]:
    """Return the ``(delay_seconds, priority)`` of a task object; absent or null means 0.

    Raises:
        TaskFileError: a field is of the wrong type or out of range; the error names it.
    """
    delay, priority = mapping.get("delay_seconds"), mapping.get("priority")
    try:
        delay = 0.0 if delay is None else _check_delay(delay, "field 'delay_seconds'")
    except (TypeError, ValueError) as exc:
        raise TaskFileError(str(exc), field="delay_seconds") from None
    try:
        priority = 0 if priority is None else _check_priority(priority, "field 'priority'")
    except (TypeError, ValueError) as exc:
        raise TaskFileError(str(exc), field="priority") from None
    return delay, priority


@dataclasses.dataclass(frozen=True, slots=True)
class Task:
    """One unit of work: an id, a JSON payload, an optional idempotency key and a named queue.

    The id and the key must be non-empty strings that every store can keep: no NUL character and
    no lone surrogate. A payload of None means the empty dict. The queue (default ``"default"``)
    is where the durable queue keeps the task; workers choose the queues they serve. Its name
    follows the key's rules and is printable, without whitespace or commas. `group` names the
    rate limit the task's calls count against (`WorkerPool(rate_limits=...)`), with the rules of
    a key; `timeout` bounds each attempt in seconds, overriding the pool's ``task_timeout``.

    Raises:
        TaskFileError: (a `ValueError`) a field is invalid; the error names it.
    """

    id: str
    payload: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=True)
    idempotency_key: str | None = None
    queue: str = DEFAULT_QUEUE
    group: str | None = None
    timeout: float | None = None

    def __post_init__(self) -> None:
        # Checked where every task is built, so one bad task is refused on its own instead of
        # failing the database transaction it would later share with other tasks.
        _check_text_field(self.id, "id")
        if self.idempotency_key is not None:
            _check_text_field(self.idempotency_key, "idempotency_key")
        if self.queue != DEFAULT_QUEUE:
            problem = _queue_problem(self.queue)
            if problem is not None:
                raise TaskFileError(f"field 'queue' {problem}", field="queue")
        if self.payload is None:
            object.__setattr__(self, "payload", {})
        if self.group is not None:
            _check_text_field(self.group, "group")
        if self.timeout is not None:
            object.__setattr__(self, "timeout", _checked_timeout(self.timeout, "timeout"))

    @property
    def key(self) -> str:
        """The key deduplication uses: the idempotency key, else the id."""
        return self.idempotency_key or self.id

    @classmethod
    def from_dict(cls, mapping: Any, *, queue: str = DEFAULT_QUEUE) -> Task:
        """Build a task from a parsed JSON object.

        ``"payload": null`` means the empty payload, as ``"idempotency_key": null`` means no key.
        `queue` is the queue of a task whose object names none (``"queue": null`` names none).
        The fields ``"delay_seconds"`` and ``"priority"`` are checked here but belong to the
        submission, not to the task: ``task-queue enqueue`` and a ``--task-file`` run apply them.

        Raises:
            TaskFileError: a field is missing, unknown or of the wrong type; the error names it.
        """
        if not isinstance(mapping, Mapping):
            raise TaskFileError(f"must be an object, not {_json_type(mapping)}")
        for name in mapping:
            if name not in _TASK_FIELDS:
                raise TaskFileError(f"unknown field {_shown(name)}", field=str(name))
        if "id" not in mapping:
            raise TaskFileError("missing field 'id'", field="id")
        task_id = mapping["id"]
        _check_text_field(task_id, "id")
        payload = mapping.get("payload")
        if payload is None:
            payload = {}
        elif not isinstance(payload, dict):
            raise TaskFileError(
                f"field 'payload' must be an object, not {_json_type(payload)}",
                field="payload",
            )
        key = mapping.get("idempotency_key")
        if key is not None:
            _check_text_field(key, "idempotency_key")
        timeout = mapping.get("timeout_seconds")
        if timeout is not None:
            timeout = _checked_timeout(timeout, "timeout_seconds")
        _schedule_of(mapping)
        named = mapping.get("queue")
        return cls(
            task_id,
            payload,
            key,
            queue if named is None else named,
            group=mapping.get("group"),
            timeout=timeout,
        )


class _TextEnum(str, enum.Enum):
    """An enum whose members are their string values (they compare and print as such)."""

    _value_: str

    def __str__(self) -> str:
        return self.value


class TaskStatus(_TextEnum):
    """The outcome of one submission."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    CANCELLED = "cancelled"


class ErrorKind(_TextEnum):
    """Why a task failed."""

    TRANSIENT = "transient"
    PERMANENT = "permanent"
    CONFLICT = "conflict"
    CRASHED = "crashed"  # its worker died while running it, max_attempts times in a row
    TIMEOUT = "timeout"  # its last attempt ran past its deadline (task_timeout, timeout_seconds)


@dataclasses.dataclass(frozen=True, slots=True)
class TaskRecord:
    """The outcome of one submission, with its timestamps (`time.perf_counter()` values)."""

    task_id: str
    key: str
    status: TaskStatus
    output: Any = None
    error: str | None = None
    error_kind: ErrorKind | None = None  # a str enum: it compares and prints as its text
    attempts: int = 0
    enqueued_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def queue_wait(self) -> float | None:
        """Seconds from enqueue to first start, or None if it never started."""
        if self.enqueued_at is None or self.started_at is None:
            return None
        return self.started_at - self.enqueued_at

    @property
    def duration(self) -> float | None:
        """Service time: seconds from first start to finish, retries included."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    @property
    def latency(self) -> float | None:
        """Seconds from enqueue to finish."""
        if self.enqueued_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.enqueued_at

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-compatible dict."""
        return {
            "task_id": self.task_id,
            "key": self.key,
            "status": self.status.value,
            "output": self.output,
            "error": self.error,
            "error_kind": None if self.error_kind is None else str(self.error_kind),
            "attempts": self.attempts,
            "queue_wait": self.queue_wait,
            "duration": self.duration,
            "latency": self.latency,
        }


# --- Task files ----------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _line_column(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


# A bracket, or the quote that opens a string.
_JSON_TOKEN = re.compile(r'["\[\]{}]')


def _json_tokens(text: str, pattern: re.Pattern[str]) -> Iterator[re.Match[str]]:
    """Yield the matches of `pattern` outside strings, in one linear pass over `text`.

    `pattern` must match a lone ``"`` where a string opens. The string is then skipped by the
    decoder's own string scanner, which reads it once from its opening quote, so a quote or
    bracket inside it is never a token and a string that never closes costs one pass (a regex
    asked for a whole string at every quote rescans the tail from each escaped quote: quadratic).
    A string the scanner rejects ends the scan; the parser then reports it.
    """
    position = 0
    while (match := pattern.search(text, position)) is not None:
        if match.group() != '"':
            yield match
            position = match.end()
            continue
        try:
            position = json.decoder.scanstring(text, match.end(), True)[1]  # type: ignore[attr-defined]  # not in the stubs
        except ValueError:
            return


def _check_depth(text: str, limit: int) -> None:
    """Reject nesting deeper than `limit` before the parser recurses into it."""
    depth = 0
    for match in _json_tokens(text, _JSON_TOKEN):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                line, column = _line_column(text, match.start())
                raise TaskFileError(f"nesting deeper than {limit} levels", line=line, column=column)
        elif token in "]}":
            depth -= 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {_cut(text)} is out of range")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"duplicate object key {_shown(name)}")
        result[name] = value
    return result


def _parse_json(text: str) -> Any:
    """Parse strict JSON: finite numbers only, no duplicate keys.

    Raises:
        TaskFileError: with the line and column of the problem.
    """
    decoder = json.JSONDecoder(
        object_pairs_hook=_unique_object,
        parse_constant=_reject_constant,
        parse_float=_finite_float,
    )
    try:
        return decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise TaskFileError(f"invalid JSON: {exc.msg}", line=exc.lineno, column=exc.colno) from None
    except ValueError as exc:
        # Raised by a hook, which does not know where it is: find the place in a second pass.
        reason = f"invalid JSON: {exc}"
        position = _hook_error_position(text, str(exc))
        if position is None:
            raise TaskFileError(reason) from None
        line, column = _line_column(text, position)
        raise TaskFileError(reason, line=line, column=column) from None
    except RecursionError:
        raise TaskFileError("invalid JSON: nesting too deep") from None


# The quote that opens a string (skipped by `_json_tokens`), or a number or named constant.
_JSON_SCALAR = re.compile(r'"|-?Infinity|NaN|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?')


class _FoundAt(Exception):
    """Internal: where the object that broke a hook starts."""

    def __init__(self, position: int) -> None:
        self.position = position


def _hook_error_position(text: str, reason: str) -> int | None:
    """Return the offset of what a decoder hook rejected: a non-finite number, or the object
    holding a duplicate key (found again with the pure-Python scanner, which shows positions)."""
    if reason.startswith("duplicate object key"):
        decoder = json.JSONDecoder(object_pairs_hook=_unique_object)
        parse_object = decoder.parse_object  # type: ignore[attr-defined]  # not in the stubs

        def located(s_and_end: tuple[str, int], *rest: Any) -> Any:
            try:
                return parse_object(s_and_end, *rest)
            except (_FoundAt, json.JSONDecodeError):
                raise
            except ValueError:
                raise _FoundAt(s_and_end[1] - 1) from None

        decoder.parse_object = located  # type: ignore[attr-defined]  # not in the stubs
        decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]  # not in the stubs
        try:
            decoder.decode(text)
        except _FoundAt as found:
            return found.position
        except ValueError:
            return None
        return None
    for match in _json_tokens(text, _JSON_SCALAR):
        token = match.group()
        if token in ("NaN", "Infinity", "-Infinity"):
            return match.start()
        if any(c in token for c in ".eE") and math.isinf(float(token)):
            return match.start()
    return None


def _max_task_file_bytes() -> int:
    raw = os.environ.get("TQ_MAX_TASK_FILE_BYTES")
    if raw is None:
        return DEFAULT_MAX_TASK_FILE_BYTES
    return _parse_positive_int(raw, "TQ_MAX_TASK_FILE_BYTES")


class _TaskEntry(NamedTuple):
    """One task of a task file with the scheduling fields that came with it."""

    task: Task
    delay: float = 0.0  # "delay_seconds"
    priority: int = 0


def load_tasks(
    path: str | os.PathLike[str], *, max_bytes: int | None = None, queue: str = DEFAULT_QUEUE
) -> list[Task]:
    """Read and validate a task file (section 3.10 of the contract).

    The fields ``"delay_seconds"`` and ``"priority"`` are validated, not returned: a `Task` does
    not carry them (see `WorkerPool.submit`).

    Args:
        path: a UTF-8 JSON file: a list of task objects, or ``{"tasks": [...]}``.
        max_bytes: the size cap, checked before parsing; default ``TQ_MAX_TASK_FILE_BYTES`` or
            64 MiB.
        queue: the queue of the tasks that name none (a task's own ``"queue"`` wins).

    Returns:
        The tasks, in file order.

    Raises:
        TaskFileError: the file is missing, unreadable, too large or invalid; the message names the
            file and, where they apply, the line and column or the task's index and field.
        ConfigError: ``TQ_MAX_TASK_FILE_BYTES`` is invalid.
    """
    return [entry.task for entry in _load_task_entries(path, max_bytes=max_bytes, queue=queue)]


def _load_task_entries(
    path: str | os.PathLike[str], *, max_bytes: int | None = None, queue: str = DEFAULT_QUEUE
) -> list[_TaskEntry]:
    """Read and validate a task file as `load_tasks` does; return each task with its schedule."""
    name = os.fspath(path)
    limit = _max_task_file_bytes() if max_bytes is None else max_bytes
    data = _read_task_file(name, limit)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start].decode("utf-8", "replace")
        line, column = _line_column(prefix, len(prefix))
        raise TaskFileError(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x})",
            path=name,
            line=line,
            column=column,
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        _check_depth(text, MAX_JSON_DEPTH)
        document = _parse_json(text)
    except TaskFileError as exc:
        raise exc.located(name) from None
    return _tasks_from_document(document, name, queue)


def _read_task_file(name: str, limit: int) -> bytes:
    try:
        with open(name, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise TaskFileError(
                    f"file is {size} bytes, more than the limit of {limit}", path=name
                )
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise TaskFileError("no such file", path=name) from None
    except IsADirectoryError:
        raise TaskFileError("is a directory, not a task file", path=name) from None
    except PermissionError:
        raise TaskFileError("permission denied", path=name) from None
    except OSError as exc:
        raise TaskFileError(f"cannot read: {exc.strerror or exc}", path=name) from None
    if len(data) > limit:
        raise TaskFileError(f"file is more than the limit of {limit} bytes", path=name)
    return data


def _tasks_from_document(document: Any, name: str, queue: str = DEFAULT_QUEUE) -> list[_TaskEntry]:
    if isinstance(document, dict):
        extra = sorted(set(document) - {"tasks"})
        if extra or "tasks" not in document:
            raise TaskFileError(
                "the top-level object must have exactly one key, 'tasks'", path=name
            )
        document = document["tasks"]
        if not isinstance(document, list):
            raise TaskFileError(f"'tasks' must be an array, not {_json_type(document)}", path=name)
    elif not isinstance(document, list):
        raise TaskFileError(
            f"the top level must be an array of tasks or an object with 'tasks', not "
            f"{_json_type(document)}",
            path=name,
        )
    tasks: list[_TaskEntry] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(document):
        try:
            task = Task.from_dict(item, queue=queue)
            delay, priority = _schedule_of(item)
        except TaskFileError as exc:
            raise exc.located(name, index) from None
        if task.id in first_index:
            raise TaskFileError(
                f"id {_shown(task.id)} repeats task {first_index[task.id]}",
                path=name,
                index=index,
                field="id",
            )
        first_index[task.id] = index
        tasks.append(_TaskEntry(task, delay, priority))
    return tasks


# --- Retry policy --------------------------------------------------------------------------------

_JITTER_MODES = ("full", "none")
# The source of retry jitter and of a worker's outage backoff: the operating system, apart from
# the global `random` (processes that call random.seed(42) alike would otherwise retry in
# lockstep) and with no state a forked child could repeat.
_jitter_random = random.SystemRandom()


def _is_finite_number(value: Any) -> TypeGuard[float]:
    """Return whether `value` is an int or float (not a bool) that a float can hold, finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, retrying only transient errors.

    The wait before attempt ``n + 1`` is uniform in ``[0, min(max_delay, base_delay * multiplier **
    (n - 1))]`` (``jitter="full"``), or that upper bound itself (``jitter="none"``). Anything not in
    `retry_on` is permanent, and so is `PermanentError` whatever `retry_on` says.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    base_delay: float = DEFAULT_BASE_DELAY
    max_delay: float = DEFAULT_MAX_DELAY
    multiplier: float = DEFAULT_MULTIPLIER
    jitter: str = "full"
    retry_on: tuple[type[BaseException], ...] = (
        TransientError,
        TimeoutError,
        ConnectionError,
    )

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError(f"max_attempts must be an integer, not {_shown(self.max_attempts)}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {_shown(self.max_attempts)}")
        for name, low in (("base_delay", 0), ("max_delay", 0), ("multiplier", 1)):
            value = getattr(self, name)
            if not (_is_finite_number(value) and value >= low):
                raise ValueError(f"{name} must be a finite number >= {low}, not {_shown(value)}")
        if not isinstance(self.jitter, str) or self.jitter not in _JITTER_MODES:
            raise ValueError(f"jitter must be one of {_JITTER_MODES}, not {_shown(self.jitter)}")
        object.__setattr__(self, "retry_on", tuple(self.retry_on))

    def cap(self, attempt: int) -> float:
        """Return the longest wait after attempt `attempt` (1-based)."""
        exponent = max(attempt - 1, 0)
        try:
            bound = self.base_delay * self.multiplier**exponent
        except OverflowError:
            return self.max_delay
        return min(self.max_delay, bound)

    def delay(self, attempt: int) -> float:
        """Return the wait in seconds before attempt ``attempt + 1``."""
        bound = self.cap(attempt)
        if self.jitter == "none":
            return bound
        return _jitter_random.uniform(0.0, bound)

    def is_transient(self, exc: BaseException) -> bool:
        """Return whether `exc` is classified transient."""
        return not isinstance(exc, PermanentError) and isinstance(exc, self.retry_on)

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Return whether to retry after `attempt` attempts ended with `exc`."""
        return attempt < self.max_attempts and self.is_transient(exc)


# --- Stores --------------------------------------------------------------------------------------
#
# A store keeps two things that must outlive a process: one row per idempotency key (the claim
# protocol below) and, for durable runs, one row per accepted task (the durable queue). The
# contract is the `Store` protocol; three backends implement it, from simplest to most complex:
# MemoryStore (one process), SqliteStore (one machine, several processes, WAL) and PostgresStore
# (many machines). `open_store` picks one from a URL. `IdempotencyManager` and `WorkerPool` speak
# only the protocol.


class ClaimState(_TextEnum):
    """What a claim found."""

    CLAIMED = "claimed"
    COMPLETED = "completed"
    IN_PROGRESS = "in_progress"
    CONFLICT = "conflict"


@dataclasses.dataclass(frozen=True, slots=True)
class Claim:
    """The answer to a claim: `token` fences a claimed key, `output` is a completed key's output."""

    state: ClaimState
    token: int | None = None
    output: Any = None
    lease_expires: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class KeyState:
    """What became of one idempotency key (`IdempotencyManager.get`).

    `state` is ``"completed"`` (`output` holds the cached output), ``"failed"`` (`error` holds the
    last error; a later submission runs it again) or ``"in_progress"`` (claimed, running or
    held by a lease); `attempts` counts the handler calls made for the key (a run cut short by
    its process's death counts one); `updated_at` is a `time.time()` value; `namespace` is the
    handler that owns the key.
    """

    key: str
    state: str
    output: Any = None
    error: str | None = None
    attempts: int = 0
    updated_at: float | None = None
    namespace: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the state as a JSON-compatible dict (``task-queue result --json``)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class QueuedTask:
    """A task taken from the durable queue, with the token that fences its settlement and the
    priority it was enqueued with."""

    task: Task
    token: int
    priority: int = 0


class _Row(_TextEnum):
    """The states of a stored key."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class EntryState(_TextEnum):
    """The states of a task in the durable queue."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


_STORE_CLOSED = "the store is closed"


def _new_token() -> int:
    # Tokens only need to differ between claims of one key; 63 random bits never repeat in
    # practice, and unlike a per-row counter they stay unique across a purge that deletes the row.
    # They come from the operating system, not the `random` module: processes that seed `random`
    # alike would otherwise draw the same tokens, and a stalled owner's token would still fence.
    return secrets.randbits(63) or 1


def _new_token_range(count: int) -> int:
    """Return the first of `count` consecutive fresh tokens (see `_new_token`).

    A batch claim draws its tokens this way so that one statement can tell the keys it won by
    their range; 62 random bits leave room for any batch below 2**63.
    """
    return secrets.randbits(62) + 1


# Backoff between database retries: drawn from the operating system so that processes which seed
# the global `random` generator alike do not retry in lockstep.
_backoff_random = random.SystemRandom()


class Store(Protocol):
    """The storage contract behind `IdempotencyManager` and the durable queue.

    Idempotency: one row per key and namespace, ``in_progress`` (claimed: a lease and a fencing
    token), ``completed`` (the output, as JSON text) or ``failed`` (released: claimable again).
    The namespace is the handler that owns the key (see `WorkerPool`); ``""`` holds rows written
    without one (a database from before namespaces, or `IdempotencyManager` used directly).

    - ``claim_many([(key, fingerprint)], namespace, starts=None)``: for each key, atomically
      insert it, or take over a failed, lease-expired or TTL-expired row whose fingerprint agrees;
      answer `Claim`s in order. A row of the key in ``""`` is first adopted into `namespace`
      (state, output and lease unchanged) when the namespace has none: the first handler to claim
      a legacy key owns it, whichever process wrote that row and whenever. `starts` lists the
      ``(task_id, entry_token)`` of durable-queue rows about to run: in the same transaction, each
      one still held by that token whose key this call claims counts one started run.
    - ``complete_many([(key, token, output_json, calls)])``, ``renew_many([(key, token)])``,
      ``release_many([(key, token, error, calls)])``: each acts only where the token still owns
      the key (fencing; tokens are unique, so they need no namespace); the batch is one
      transaction, committed before the call returns. A key row's ``attempts`` counts handler
      calls as a task row's does: one at each claim won, and `calls` (a run's retries; may be
      left out: 0) when the run completes or releases the key.
    - ``lookup(key, namespace=None)`` (None: the key in any namespace, a completed row first),
      ``mark_processed(key, output_json, namespace="")``, ``purge_expired``, ``stats``.
    - ``live_claims(namespace)``: ``(token, lease_expires)`` of the live claims of `namespace`
      (and of ``""``), for telling a user what a run waits for.

    Durable queue: one row per task id, in a named queue (`Task.queue`), ``queued``, ``running``
    (a lease, a token and the worker's name), ``done`` or ``failed`` (with its error and error
    kind). A row's ``attempts`` counts handler calls: the first call of a run when the run starts
    (see ``claim_many``), the others (retries) when the run settles; a run cut short by its
    worker's death counts one.

    - ``enqueue_many(tasks, delay=0.0, priority=0)``: insert new ids as queued, all or nothing,
      and return how many were new. `delay` (seconds) and `priority` are one value for every
      task or a sequence of one per task; a delayed row stores its due time ``run_at`` (NULL
      when there is no delay) and waits, still ``queued``, until then. An id already stored with
      the same key, payload and queue is left alone; with another one it raises
      `TaskConflictError` and nothing is inserted.
    - ``take_many(worker, limit, max_crashes=None, queues=None)``: lease up to `limit` queued
      tasks of `queues` (None: every queue) that are due, or lease-expired ones, the highest
      priority first and, within a priority, the one ready longest (``coalesce(run_at,
      enqueued_at)``) first, then the one submitted first (the row's place in submission
      order, ``seq``: tasks of one enqueue share their enqueue time), skipping rows other
      workers hold; the result is in that order. A row returned to the queue keeps its place. A
      lease-expired task of those queues whose runs all ended with their worker's death,
      `max_crashes` of them, is failed as crashed instead (error kind ``crashed``). Every run
      that ends otherwise settles its row, so such a row's ``attempts`` counts its crashed runs:
      a take alone counts nothing, so a task leased but never started (prefetched by a worker
      that died, returned unrun) is simply taken again; a failed task submitted again starts
      afresh.
      Each row is read back on its own: one that is no task (an id or key no store can keep,
      a payload that is not a JSON object) is failed alone, in the same transaction, with a
      ``permanent`` error naming the field, and the others are returned.
    - ``take_task(task, worker, delay=0.0, priority=0)``: persist one task as running for this
      worker (None when it is done, or running elsewhere; `TaskConflictError` when the id is
      stored with another key, payload or queue, changing nothing). With a delay the row stores
      its due time, so that another worker takes it over after this one's lease only once it is
      due.
    - ``next_run_at()``: the earliest due time (a `time.time()` value) of a queued task still
      waiting out its delay, or None: an idle worker waits for work until then at the latest.
    - ``settle_many([(task_id, token, state, error, error_kind, calls)])`` (the last two may be
      left out: None and 0): record a final state, or return a task to the queue, where the token
      still owns it; `calls` are handler calls to add to ``attempts`` (a run's retries).
      ``complete_many``'s `settle` items are ``(index, task_id, entry_token, calls)`` alike (calls
      may be left out). ``renew_tasks(worker, info, entries)``: extend the
      leases of the worker's running tasks (only the ``(task_id, token)`` `entries` when given:
      a row taken by a take whose answer was lost is then left to expire) and record a heartbeat.
      ``queue_status()``: counts by state, by queue (``queues``: name -> ``queued``, ``delayed``,
      ``running``, ``failed``, ``done``, ``oldest_waiting_age``), stalled rows and the workers'
      heartbeats (each with the rows it holds, ``running``, and ``alive``: whether its heartbeat
      is younger than its lease). ``wait_for_work``.

    Operating the queue:

    - ``failed_tasks(queue=None, limit=100)``: failed tasks, newest failure first, as dicts with
      ``id, key, queue, attempts, error_kind, error, failed_at`` (a `time.time()` value).
    - ``retry_tasks(ids=None, queue=None)``: failed tasks (those of `ids`, or all of them, only
      those in `queue` when given) go back to ``queued`` with fresh attempts, at the back of their
      queue in the order they had among themselves; returns how many moved.
    - ``cancel_tasks(ids)``: delete the queued tasks among `ids`, delayed ones included (running
      ones finish); returns how many were withdrawn.
    - ``task_states(ids)``: id -> state of the tasks of `ids` that exist.
      ``queue_status()``, ``wait_for_work``.

    Rate limits (shared by every process on the store):

    - ``take_slots(name, count, period, want, hold)``: a limit of `count` calls per `period`
      seconds is `count` slots, each holding the time it is free again. Reserve up to `want`
      free slots of limit `name` in one transaction; each is free again ``hold + period``
      seconds after the take, so the caller must start the reserved calls within `hold` seconds
      of `base` for no two calls of one slot to come closer than `period`: at most `count` calls
      start in any `period`, however many processes take. Returns ``(taken, wait, base)``:
      `wait` (when fewer than `want` were free) is the seconds until as many more are free, and
      `base` the `time.monotonic()` instant the hold runs from.

    History (what the dashboard charts): one row per minute and worker.

    - ``record_history(worker, minute, counts, latency)``: write the row of `minute` (Unix time
      // 60) for `worker`, replacing what it held: `counts` maps each of ``succeeded``,
      ``failed``, ``duplicates`` and ``retries`` to the minute's total so far, `latency` is the
      minute's latency histogram as JSON text (see `_History`).
    - ``history(since)``: the rows of every worker from the minute of `since` (Unix time) on, as
      dicts with ``minute``, ``worker``, the four counts and ``latency``, oldest first.
    """

    url: str
    lease_seconds: float
    ttl_seconds: float | None

    def claim_many(
        self,
        items: Sequence[tuple[str, str | None]],
        namespace: str = "",
        starts: Sequence[tuple[str, int]] | None = None,
    ) -> list[Claim]: ...
    def complete_many(
        self,
        items: Sequence[tuple[Any, ...]],
        settle: Sequence[tuple[Any, ...]] | None = None,
    ) -> list[bool]: ...
    def renew_many(self, claims: Sequence[tuple[str, int]]) -> int: ...
    def release_many(self, items: Sequence[tuple[Any, ...]]) -> int: ...
    def lookup(self, key: str, namespace: str | None = None) -> dict[str, Any] | None: ...
    def mark_processed(self, key: str, output_json: str, namespace: str = "") -> None: ...
    def live_claims(self, namespace: str) -> list[tuple[int, float]]: ...
    def purge_expired(self, older_than: float | None = None) -> int: ...
    def stats(self) -> dict[str, int]: ...
    def enqueue_many(
        self,
        tasks: Sequence[Task],
        *,
        delay: float | Sequence[float] = 0.0,
        priority: int | Sequence[int] = 0,
    ) -> int: ...
    def take_many(
        self,
        worker: str,
        limit: int,
        max_crashes: int | None = None,
        queues: Sequence[str] | None = None,
    ) -> list[QueuedTask]: ...
    def take_task(
        self, task: Task, worker: str, *, delay: float = 0.0, priority: int = 0
    ) -> int | None: ...
    def next_run_at(self) -> float | None: ...
    def settle_many(self, items: Sequence[tuple[Any, ...]]) -> int: ...
    def renew_tasks(
        self,
        worker: str,
        info: Mapping[str, Any] | None = None,
        entries: Sequence[tuple[str, int]] | None = None,
    ) -> int: ...
    def queue_status(self) -> dict[str, Any]: ...
    def wait_for_work(self, timeout: float, stop: threading.Event) -> None: ...
    def failed_tasks(
        self, queue: str | None = None, limit: int = DEFAULT_FAILED_LIMIT
    ) -> list[dict[str, Any]]: ...
    def retry_tasks(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int: ...
    def cancel_tasks(self, ids: Sequence[str]) -> int: ...
    def task_states(self, ids: Sequence[str]) -> dict[str, str]: ...
    def take_slots(
        self, name: str, count: int, period: float, want: int, hold: float
    ) -> tuple[int, float | None, float]: ...
    def record_history(
        self, worker: str, minute: int, counts: Mapping[str, int], latency: str
    ) -> None: ...
    def history(self, since: float) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


def _crash_error(crashes: int) -> str:
    """The error of a task failed because its worker died while running it `crashes` times."""
    times = "once" if crashes == 1 else f"{crashes} times in a row"
    return f"{ErrorKind.CRASHED.value}: the worker running it died {times}"


def _settlement(item: Sequence[Any]) -> tuple[str, int, EntryState, str | None, str | None, int]:
    """Return a `settle_many` item with its optional error kind and calls filled in."""
    task_id, token, state, error, *rest = item
    kind = rest[0] if rest else None
    calls = rest[1] if len(rest) > 1 else 0
    return task_id, token, state, error, None if kind is None else str(kind), calls


def _queue_names(queues: Iterable[str] | None, source: str = "queues") -> tuple[str, ...] | None:
    """Return the queue names of `queues` in order, each once; None means every queue.

    Raises:
        ValueError: a name is not a queue name, or there is none.
    """
    if queues is None:
        return None
    if isinstance(queues, str):
        raise ValueError(f"{source} must be a list of queue names, not the string {_shown(queues)}")
    where = f"{source}: a queue name"
    names = tuple(dict.fromkeys(_check_queue_name(name, where) for name in queues))
    if not names:
        raise ValueError(f"{source} must name at least one queue (None: every queue)")
    return names


def _check_task_ids(ids: Any, source: str = "ids") -> list[str]:
    """Return `ids` as a list of task ids.

    Raises:
        ValueError: `ids` is a string, or holds something no task id can be.
    """
    if isinstance(ids, str):
        raise ValueError(f"{source} must be a list of task ids, not the string {_shown(ids)}")
    checked = list(ids)
    for task_id in checked:
        problem = _text_problem(task_id)
        if problem is not None:
            raise ValueError(f"{source}: a task id {problem}, not {_shown(task_id)}")
    return checked


@overload
def _check_operation(ids: None = None, queue: Any = None, limit: Any = ...) -> None: ...
@overload
def _check_operation(ids: Sequence[str], queue: Any = None, limit: Any = ...) -> list[str]: ...


def _check_operation(
    ids: Any = None, queue: Any = None, limit: Any = DEFAULT_FAILED_LIMIT
) -> list[str] | None:
    """Check the arguments of `failed_tasks`, `retry_tasks`, `cancel_tasks` and `task_states`
    before any store is touched (the same answer from every store); return `ids` as a list.

    Raises:
        ValueError: an id, the queue name or the limit is invalid; the error names it.
    """
    if queue is not None:
        _check_queue_name(queue, "queue")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, not {_shown(limit)}")
    return None if ids is None else _check_task_ids(ids)


def _worker_entry(name: str, info: Mapping[str, Any], seen_ago: float, running: int,
                  lease_seconds: float) -> dict[str, Any]:  # fmt: skip
    """One worker of `queue_status`: its heartbeat, the rows it holds, and whether it lives.

    A worker renews its leases and heartbeat every third of its lease (its heartbeat carries
    the lease, else the reader's own is assumed): one silent for longer than a lease is gone.
    """
    lease = info.get("lease_seconds")
    if not isinstance(lease, (int, float)) or isinstance(lease, bool) or not lease > 0:
        lease = lease_seconds
    return {"name": name, "seen_seconds_ago": round(seen_ago, 3), **info, "running": running,
            "alive": seen_ago <= lease}  # fmt: skip


def _queue_entry() -> dict[str, Any]:
    entry: dict[str, Any] = {"queued": 0, "delayed": 0}
    entry.update(dict.fromkeys((EntryState.RUNNING.value, EntryState.FAILED.value,
                                EntryState.DONE.value), 0))  # fmt: skip
    entry["oldest_waiting_age"] = None
    return entry


def _stored_text(value: Any, field: str) -> str:
    """Return a text column of a stored task, or raise `TaskFileError` naming `field`.

    SQLite hands text over as UTF-8 bytes here (see `SqliteStore._TAKE_COLUMNS`), and None for
    a value stored as another type: a row written by hand or by an older version must fail alone
    instead of failing the read of every row beside it.
    """
    if value is None:
        raise TaskFileError(f"field {field!r} is not stored as text", field=field)
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise TaskFileError(f"field {field!r} is not valid UTF-8 text", field=field) from None
    _check_text_field(value, field)
    return cast(str, value)  # a str: _check_text_field checked it


def _stored_task(
    task_id: Any,
    key: Any,
    payload: Any,
    queue: Any = DEFAULT_QUEUE,
    group: Any = None,
    timeout: Any = None,
) -> Task:
    """Build the `Task` of a durable-queue row.

    Raises:
        TaskFileError: the row holds no task; the error names the field.
    """
    task_id = _stored_text(task_id, "id")
    key = _stored_text(key, "key")
    queue = _stored_text(queue, "queue")
    if group is not None:
        group = _stored_text(group, "group")
    if timeout is not None:
        timeout = _checked_timeout(timeout, "timeout_seconds")
    try:
        value = _parse_json(_stored_text(payload, "payload"))
    except TaskFileError as exc:
        if exc.field == "payload":
            raise
        raise TaskFileError(f"field 'payload': {exc}", field="payload") from None
    if not isinstance(value, dict):
        raise TaskFileError(
            f"field 'payload' must be a JSON object, not {_json_type(value)}", field="payload"
        )
    return Task(
        task_id, value, None if key == task_id else key, queue, group=group, timeout=timeout
    )


def _unreadable_error(exc: TaskFileError) -> str:
    """The error of a durable-queue row failed because it holds no task."""
    return f"{ErrorKind.PERMANENT.value}: the stored task cannot be read: {exc}"


def _key_order(keys: Sequence[str]) -> list[int]:
    """Indexes of `keys` in key order; equal keys keep their order."""
    return sorted(range(len(keys)), key=keys.__getitem__)


def _queue_payload(task: Task) -> str:
    return _canonical_json(task.payload)


# The counters of one minute in the history table, in its column order.
_HISTORY_COUNTS = ("succeeded", "failed", "duplicates", "retries")
_HISTORY_FIELDS = ("minute", "worker", *_HISTORY_COUNTS, "latency")


def _history_row(
    worker: str, minute: int, counts: Mapping[str, int], latency: str
) -> dict[str, Any]:
    row = {"minute": int(minute), "worker": worker, "latency": latency}
    row.update((name, int(counts.get(name, 0))) for name in _HISTORY_COUNTS)
    return row


def _spread(value: Any, count: int, check: Callable[[Any, str], Any], name: str) -> list[Any]:
    """Return `value` checked, once per task: one value for all, or a list or tuple of `count`."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{name} has {len(value)} values for {count} tasks")
        return [check(item, name) for item in value]
    return [check(value, name)] * count


def _schedules(
    tasks: Sequence[Task], delay: Any, priority: Any, now: float
) -> list[tuple[float | None, int]]:
    """Return the ``(run_at, priority)`` of each task enqueued at `now` (see `Store`).

    Raises:
        TypeError, ValueError: `delay` or `priority` is invalid or of the wrong length.
    """
    count = len(tasks)
    delays = _spread(delay, count, _check_delay, "delay")
    priorities = _spread(priority, count, _check_priority, "priority")
    return [(now + d if d else None, p) for d, p in zip(delays, priorities, strict=True)]


def _schedule_one(delay: Any, priority: Any, now: float) -> tuple[float | None, int]:
    """Return the ``(run_at, priority)`` of one task submitted at `now`.

    Raises:
        TypeError, ValueError: `delay` or `priority` is invalid.
    """
    seconds = _check_delay(delay)
    return (now + seconds if seconds else None), _check_priority(priority)


def _ready_time(value: Any) -> float:
    """Return a stored ready time, or 0.0 for a value no time can be (a row written by hand)."""
    if isinstance(value, float):
        return value
    return float(value) if type(value) is int else 0.0


def _stored_place(value: Any) -> int:
    """Return a stored place in submission order, or 0 for none (a row an older version wrote)."""
    return value if type(value) is int else 0


def _stored_priority(value: Any) -> int:
    """Return a stored priority, or 0 for a value no priority can be (a row written by hand)."""
    if type(value) is int and MIN_PRIORITY <= value <= MAX_PRIORITY:
        return value
    return 0


def _failed_entry(task_id: str, key: str, queue: str, attempts: int, kind: str | None,
                  error: str | None, failed_at: float) -> dict[str, Any]:  # fmt: skip
    """One element of `failed_tasks` (and of ``task-queue failed --json``)."""
    return {"id": task_id, "key": key, "queue": queue, "attempts": attempts, "error_kind": kind,
            "error": error, "failed_at": failed_at}  # fmt: skip


def _empty_status() -> dict[str, Any]:
    return {
        "tasks": dict.fromkeys((state.value for state in EntryState), 0),
        "delayed": 0,  # of the queued tasks, those still waiting out their delay
        "oldest_queued_seconds": None,
        "stalled": 0,
        "workers": [],
        "queues": {},
    }


def _public_row(row: dict[str, Any], namespace: str = "") -> dict[str, Any]:
    output = row.get("output")
    return {
        "namespace": namespace,
        "state": str(row["state"].value if isinstance(row["state"], enum.Enum) else row["state"]),
        "fingerprint": row.get("fingerprint"),
        "output": None if output is None else json.loads(output),
        "error": row.get("error"),
        "lease_expires": row.get("lease_expires"),
        "updated_at": row.get("updated_at"),
        "attempts": row.get("attempts", 0),
    }


# The rows of a MemoryStore: what a table row is to the SQL stores, one mutable record each. Every
# method that reads or writes one holds the store's lock; a caller sees only the dicts built from
# them at the boundary (`public`, `failed_entry`).


@dataclasses.dataclass(slots=True)
class _KeyRow:
    """One idempotency key in one namespace (see `Store`)."""

    state: _Row
    fingerprint: str | None
    token: int  # fences the claim that wrote the row
    output: str | None = None  # a completed key's output, as JSON text
    error: str | None = None
    lease_expires: float | None = None  # a time.time() value while in progress, else None
    updated_at: float = 0.0
    attempts: int = 0  # handler calls

    def live(self, now: float) -> bool:
        """Return whether the row is a claim whose lease still runs at `now`."""
        return (
            self.state == _Row.IN_PROGRESS
            and self.lease_expires is not None
            and self.lease_expires > now
        )

    def complete(self, output: str, now: float, calls: int = 0) -> None:
        """Record the key as completed at `now` with `output`, after `calls` more handler calls."""
        self.state = _Row.COMPLETED
        self.output = output
        self.error = None
        self.lease_expires = None
        self.updated_at = now
        self.attempts += calls

    def release(self, error: str | None, now: float, calls: int = 0) -> None:
        """Record the key as failed at `now` with `error`: claimable again."""
        self.state = _Row.FAILED
        self.error = error
        self.lease_expires = None
        self.updated_at = now
        self.attempts += calls

    def lookup_rank(self) -> tuple[bool, float]:
        # Which row of a key the namespace-free lookup shows: a completed one, else the latest.
        return self.state == _Row.COMPLETED, self.updated_at

    def public(self, namespace: str) -> dict[str, Any]:
        """Return the row as `Store.lookup` answers it."""
        return _public_row(dataclasses.asdict(self), namespace)


@dataclasses.dataclass(slots=True)
class _TaskRow:
    """One task of the durable queue (see `Store`)."""

    task: Task
    seq: int  # its place in submission order
    enqueued_at: float
    updated_at: float
    priority: int = 0
    run_at: float | None = None  # the due time of a delayed task, a time.time() value
    state: EntryState = EntryState.QUEUED
    token: int | None = None  # fences the run that holds it
    worker: str | None = None
    lease_expires: float | None = None  # a time.time() value while running, else None
    attempts: int = 0  # handler calls
    error: str | None = None
    error_kind: str | None = None

    @property
    def ready_at(self) -> float:
        """When the task was ready to run: its due time, else its enqueue time."""
        return self.enqueued_at if self.run_at is None else self.run_at

    def rank(self) -> tuple[int, float, int]:
        # Highest priority first; within one, ready longest first, then submission order (see
        # Store.take_many).
        return -self.priority, self.ready_at, self.seq

    def stalled(self, now: float) -> bool:
        """Return whether the task is running on a lease that has run out at `now`."""
        return (
            self.state == EntryState.RUNNING
            and self.lease_expires is not None
            and self.lease_expires <= now
        )

    def takeable(self, now: float, scheduled: bool = True) -> bool:
        """Return whether a take may lease the task; with `scheduled`, only once it is due (a
        submission's take_task brings its own due time instead)."""
        if self.state == EntryState.FAILED:
            return True
        due = not scheduled or self.run_at is None or self.run_at <= now
        return due and (self.state == EntryState.QUEUED or self.stalled(now))

    def settle(
        self, state: EntryState, error: str | None, kind: str | None, now: float, calls: int = 0
    ) -> None:
        """Record the end of a run at `now`: `state`, with `error` of `kind` when it failed."""
        self.state = state
        self.error = error
        self.error_kind = kind
        self.lease_expires = None
        self.updated_at = now
        self.attempts += calls
        if state == EntryState.QUEUED:  # returned to the queue, for any worker
            self.token = None
            self.worker = None

    def requeue(self, now: float, seq: int) -> None:
        """Queue a failed task again at `now`, at place `seq`, with fresh attempts."""
        self.state = EntryState.QUEUED
        self.token = None
        self.worker = None
        self.attempts = 0
        self.error = None
        self.error_kind = None
        self.enqueued_at = now
        self.updated_at = now
        self.run_at = None
        self.seq = seq

    def failed_entry(self) -> dict[str, Any]:
        """Return the row as `Store.failed_tasks` lists it."""
        task = self.task
        return _failed_entry(
            task.id,
            task.key,
            task.queue,
            self.attempts,
            self.error_kind,
            self.error,
            self.updated_at,
        )


@dataclasses.dataclass(slots=True)
class _WorkerRow:
    """One worker's heartbeat (see `Store.renew_tasks`)."""

    started_at: float
    seen_at: float
    info: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class _HistoryRow:
    """One minute of one worker (see `Store.record_history`); fields in `_history_row`'s order."""

    minute: int
    worker: str
    latency: str
    succeeded: int
    failed: int
    duplicates: int
    retries: int

    @classmethod
    def of(cls, worker: str, minute: int, counts: Mapping[str, int], latency: str) -> _HistoryRow:
        """Build the row `record_history` writes (missing counts are 0)."""
        return cls(**_history_row(worker, minute, counts, latency))

    def public(self) -> dict[str, Any]:
        """Return the row as `Store.history` lists it."""
        return dataclasses.asdict(self)


class MemoryStore:
    """The contract in process memory: one process, nothing survives it (``memory://``)."""

    def __init__(
        self,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        ttl_seconds: float | None = None,
    ) -> None:
        if not (isinstance(lease_seconds, (int, float)) and lease_seconds > 0):
            raise ValueError(f"lease_seconds must be > 0, not {lease_seconds!r}")
        self.url = "memory://"
        self.lease_seconds = float(lease_seconds)
        self.ttl_seconds = ttl_seconds
        self._lock = threading.Lock()  # guards the five dicts below, _places and _closed
        self._keys: dict[str, dict[str, _KeyRow]] = {}  # key -> namespace -> row
        self._tasks: dict[str, _TaskRow] = {}  # task id -> row
        self._workers: dict[str, _WorkerRow] = {}  # worker name -> heartbeat
        self._slots: dict[str, list[float]] = {}  # rate limit -> when each slot is free again
        self._history: dict[tuple[int, str], _HistoryRow] = {}  # (minute, worker) -> row
        self._places = itertools.count(1)  # a task row's "seq": its place in submission order
        self._work = threading.Condition(self._lock)  # notified on enqueue and on close
        self._closed = False

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the lock of an open store.

        Raises:
            TaskQueueError: the store is closed.
        """
        with self._lock:
            if self._closed:
                raise TaskQueueError(_STORE_CLOSED)
            yield

    # Idempotency --------------------------------------------------------------------------------

    def _claimable(self, row: _KeyRow, now: float) -> bool:
        return (
            row.state == _Row.FAILED
            or (row.state == _Row.IN_PROGRESS and not row.live(now))
            or (
                row.state == _Row.COMPLETED
                and self.ttl_seconds is not None
                and row.updated_at <= now - self.ttl_seconds
            )
        )

    def claim_many(
        self,
        items: Sequence[tuple[str, str | None]],
        namespace: str = "",
        starts: Sequence[tuple[str, int]] | None = None,
    ) -> list[Claim]:
        claims = []
        with self._guard():
            now = time.time()
            lease = now + self.lease_seconds
            for key, fp in items:
                rows = self._keys.setdefault(key, {})
                if namespace not in rows and "" in rows:
                    rows[namespace] = rows.pop("")  # a legacy row: its first handler adopts it
                row = rows.get(namespace)
                agrees = fp is None or row is None or row.fingerprint in (None, fp)
                if row is None or (agrees and self._claimable(row, now)):
                    token = _new_token()
                    rows[namespace] = _KeyRow(
                        state=_Row.IN_PROGRESS,
                        fingerprint=fp if row is None else (fp or row.fingerprint),
                        token=token,
                        lease_expires=lease,
                        updated_at=now,
                        attempts=1 if row is None else row.attempts + 1,
                    )
                    claims.append(Claim(ClaimState.CLAIMED, token=token, lease_expires=lease))
                elif not agrees:
                    claims.append(Claim(ClaimState.CONFLICT))
                elif row.state == _Row.COMPLETED:
                    output = json.loads(cast(str, row.output))  # a completed row holds one
                    claims.append(Claim(ClaimState.COMPLETED, output=output))
                else:
                    claims.append(Claim(ClaimState.IN_PROGRESS, lease_expires=row.lease_expires))
            claimed = {
                key
                for (key, _), c in zip(items, claims, strict=True)
                if c.state is ClaimState.CLAIMED
            }
            for task_id, entry in starts or ():
                task_row = self._tasks.get(task_id)
                if (
                    task_row is not None
                    and task_row.token == entry
                    and task_row.state == EntryState.RUNNING
                    and task_row.task.key in claimed
                ):
                    task_row.attempts += 1
        return claims

    def _owned(self, key: str, token: int) -> _KeyRow | None:
        for row in self._keys.get(key, {}).values():
            if row.token == token and row.state == _Row.IN_PROGRESS:
                return row
        return None

    def complete_many(
        self,
        items: Sequence[tuple[Any, ...]],
        settle: Sequence[tuple[Any, ...]] | None = None,
    ) -> list[bool]:
        results = []
        with self._guard():
            now = time.time()
            for key, token, text, *calls in items:
                row = self._owned(key, token)
                if row is not None:
                    row.complete(text, now, calls[0] if calls else 0)
                results.append(row is not None)
            for index, task_id, entry, *calls in settle or ():
                task = self._tasks.get(task_id)
                if (
                    results[index]
                    and task is not None
                    and task.token == entry
                    and task.state == EntryState.RUNNING
                ):
                    task.settle(EntryState.DONE, None, None, now, calls[0] if calls else 0)
        return results

    def renew_many(self, claims: Sequence[tuple[str, int]]) -> int:
        count = 0
        with self._guard():
            now = time.time()
            for key, token in claims:
                row = self._owned(key, token)
                if row is not None:
                    row.lease_expires = now + self.lease_seconds
                    row.updated_at = now
                    count += 1
        return count

    def release_many(self, items: Sequence[tuple[Any, ...]]) -> int:
        count = 0
        with self._guard():
            now = time.time()
            for key, token, error, *calls in items:
                row = self._owned(key, token)
                if row is not None:
                    row.release(_storable_text(error), now, calls[0] if calls else 0)
                    count += 1
        return count

    def lookup(self, key: str, namespace: str | None = None) -> dict[str, Any] | None:
        with self._guard():
            rows = self._keys.get(key, {})
            if namespace is not None:
                row = rows.get(namespace)
                return None if row is None else row.public(namespace)
            if not rows:
                return None
            name = max(rows, key=lambda n: rows[n].lookup_rank())
            return rows[name].public(name)

    def mark_processed(self, key: str, output_json: str, namespace: str = "") -> None:
        with self._guard():
            rows = self._keys.setdefault(key, {})
            row = rows.get(namespace)
            if row is None:
                rows[namespace] = row = _KeyRow(
                    state=_Row.COMPLETED, fingerprint=None, token=_new_token()
                )
            row.complete(output_json, time.time())

    def live_claims(self, namespace: str) -> list[tuple[int, float]]:
        with self._guard():
            now = time.time()
            return [
                (row.token, row.lease_expires)
                for rows in self._keys.values()
                for name, row in rows.items()
                if name in (namespace, "") and row.lease_expires is not None and row.live(now)
            ]

    def purge_expired(self, older_than: float | None = None) -> int:
        age = self.ttl_seconds if older_than is None else older_than
        if age is None:
            return 0
        cutoff = time.time() - age
        with self._guard():
            old_keys = [
                (key, name)
                for key, rows in self._keys.items()
                for name, row in rows.items()
                if row.state != _Row.IN_PROGRESS and row.updated_at <= cutoff
            ]
            old_tasks = [
                task_id
                for task_id, row in self._tasks.items()
                if row.state in (EntryState.DONE, EntryState.FAILED) and row.updated_at <= cutoff
            ]
            for key, name in old_keys:
                del self._keys[key][name]
                if not self._keys[key]:
                    del self._keys[key]
            for task_id in old_tasks:
                del self._tasks[task_id]
            for name in [n for n, w in self._workers.items() if w.seen_at <= cutoff]:
                del self._workers[name]
            for minute, worker in [k for k in self._history if k[0] * 60 <= cutoff]:
                del self._history[minute, worker]
        return len(old_keys) + len(old_tasks)

    def stats(self) -> dict[str, int]:
        counts = dict.fromkeys((state.value for state in _Row), 0)
        with self._guard():
            for rows in self._keys.values():
                for row in rows.values():
                    counts[row.state.value] += 1
        counts["total"] = sum(counts.values())
        return counts

    # Durable queue ------------------------------------------------------------------------------

    def _check_same(self, task: Task, stored: Task) -> None:
        if (
            stored.key != task.key
            or stored.queue != task.queue
            or _queue_payload(stored) != _queue_payload(task)
        ):
            raise TaskConflictError(task.id)

    def _new_row(
        self, task: Task, now: float, priority: int = 0, run_at: float | None = None
    ) -> _TaskRow:
        return _TaskRow(
            task=task,
            seq=next(self._places),
            enqueued_at=now,
            updated_at=now,
            priority=priority,
            run_at=run_at,
        )

    def enqueue_many(
        self,
        tasks: Sequence[Task],
        *,
        delay: float | Sequence[float] = 0.0,
        priority: int | Sequence[int] = 0,
    ) -> int:
        added = 0
        schedules = _schedules(tasks, delay, priority, 0.0)  # due times from the enqueue's now
        with self._guard():
            # Every task is checked before any is added: the batch is all or nothing.
            seen: dict[str, Task] = {}
            for task in tasks:
                row = self._tasks.get(task.id)
                self._check_same(task, row.task if row is not None else seen.get(task.id, task))
                seen.setdefault(task.id, task)
            now = time.time()
            for task, (wait, rank) in zip(tasks, schedules, strict=True):
                if task.id in self._tasks:
                    continue
                self._tasks[task.id] = self._new_row(
                    task, now, rank, None if wait is None else now + wait
                )
                added += 1
            if added:
                self._work.notify_all()
        return added

    def _lease(self, row: _TaskRow, worker: str, now: float) -> int:
        token = _new_token()
        # A failed task submitted again starts with fresh attempts; a take itself counts none.
        if row.state == EntryState.FAILED:
            row.attempts = 0
        row.state = EntryState.RUNNING
        row.token = token
        row.worker = worker
        row.lease_expires = now + self.lease_seconds
        row.updated_at = now
        return token

    def take_many(
        self,
        worker: str,
        limit: int,
        max_crashes: int | None = None,
        queues: Sequence[str] | None = None,
    ) -> list[QueuedTask]:
        taken = []
        with self._guard():
            now = time.time()
            rows = [
                row for row in self._tasks.values() if queues is None or row.task.queue in queues
            ]
            if max_crashes is not None:
                crashed = _crash_error(max_crashes)
                for row in rows:
                    if row.stalled(now) and row.attempts >= max_crashes:
                        row.settle(EntryState.FAILED, crashed, ErrorKind.CRASHED.value, now)
            ready = sorted(
                (row for row in rows if row.state != EntryState.FAILED and row.takeable(now)),
                key=_TaskRow.rank,
            )
            for row in ready[:limit]:
                lease = self._lease(row, worker, now)
                taken.append(QueuedTask(row.task, lease, row.priority))
        return taken

    def take_task(
        self, task: Task, worker: str, *, delay: float = 0.0, priority: int = 0
    ) -> int | None:
        wait, rank = _schedule_one(delay, priority, 0.0)  # the due time from the take's now
        with self._guard():
            now = time.time()
            row = self._tasks.get(task.id)
            if row is not None:
                self._check_same(task, row.task)
            else:
                self._tasks[task.id] = row = self._new_row(task, now, rank)
            # This submission's schedule replaces the stored one.
            if not row.takeable(now, scheduled=False):
                return None
            row.priority = rank
            row.run_at = None if wait is None else now + wait
            return self._lease(row, worker, now)

    def next_run_at(self) -> float | None:
        with self._guard():
            now = time.time()
            due = [
                row.run_at
                for row in self._tasks.values()
                if row.state == EntryState.QUEUED and row.run_at is not None and row.run_at > now
            ]
        return min(due, default=None)

    def settle_many(self, items: Sequence[tuple[Any, ...]]) -> int:
        count = 0
        with self._guard():
            now = time.time()
            for task_id, token, state, error, kind, calls in map(_settlement, items):
                row = self._tasks.get(task_id)
                if row is None or row.token != token or row.state != EntryState.RUNNING:
                    continue
                row.settle(state, _storable_text(error), kind, now, calls)
                count += 1
            if count:
                self._work.notify_all()
        return count

    def renew_tasks(
        self,
        worker: str,
        info: Mapping[str, Any] | None = None,
        entries: Sequence[tuple[str, int]] | None = None,
    ) -> int:
        count = 0
        with self._guard():
            now = time.time()
            if entries is None:
                rows = [row for row in self._tasks.values() if row.worker == worker]
            else:
                rows = [
                    self._tasks[i]
                    for i, token in entries
                    if i in self._tasks and self._tasks[i].token == token
                ]
            for row in rows:
                if row.state == EntryState.RUNNING:
                    row.lease_expires = now + self.lease_seconds
                    row.updated_at = now
                    count += 1
            seen = self._workers.get(worker)
            if seen is None:
                self._workers[worker] = seen = _WorkerRow(started_at=now, seen_at=now, info={})
            seen.seen_at = now
            seen.info = dict(info or {})
        return count

    def queue_status(self) -> dict[str, Any]:
        status = _empty_status()
        with self._guard():
            now = time.time()
            queued = []
            held: dict[str | None, int] = {}  # worker -> the rows it holds
            queues: dict[str, dict[str, Any]] = {}
            for row in self._tasks.values():
                state = row.state.value
                status["tasks"][state] += 1
                entry = queues.setdefault(row.task.queue, _queue_entry())
                if row.state == EntryState.QUEUED and (row.run_at or 0) > now:
                    status["delayed"] += 1
                    entry["delayed"] += 1
                elif row.state == EntryState.QUEUED:
                    queued.append(row.ready_at)
                    entry["queued"] += 1
                    oldest = entry["oldest_waiting_age"]
                    age = now - row.ready_at
                    entry["oldest_waiting_age"] = age if oldest is None else max(oldest, age)
                else:
                    entry[state] += 1
                    if row.state == EntryState.RUNNING:
                        held[row.worker] = held.get(row.worker, 0) + 1
                        if row.stalled(now):
                            status["stalled"] += 1
            if queued:
                status["oldest_queued_seconds"] = round(now - min(queued), 3)
            for entry in queues.values():
                if entry["oldest_waiting_age"] is not None:
                    entry["oldest_waiting_age"] = round(entry["oldest_waiting_age"], 3)
            status["queues"] = dict(sorted(queues.items()))
            lease = self.lease_seconds
            status["workers"] = [
                _worker_entry(name, w.info, now - w.seen_at, held.get(name, 0), lease)
                for name, w in sorted(self._workers.items())
            ]
        return status

    # Operating the queue ------------------------------------------------------------------------

    def failed_tasks(
        self, queue: str | None = None, limit: int = DEFAULT_FAILED_LIMIT
    ) -> list[dict[str, Any]]:
        _check_operation(queue=queue, limit=limit)
        with self._guard():
            rows = [
                row
                for row in self._tasks.values()
                if row.state == EntryState.FAILED and (queue is None or row.task.queue == queue)
            ]
            rows.sort(key=lambda row: (-row.updated_at, row.task.id))
            return [row.failed_entry() for row in rows[:limit]]

    def retry_tasks(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        ids = _check_operation(ids=ids, queue=queue)
        count = 0
        with self._guard():
            now = time.time()
            rows = self._tasks.values() if ids is None else filter(None, map(self._tasks.get, ids))
            # The retried go to the back, in the order they had among themselves.
            for row in sorted(rows, key=lambda row: row.seq):
                if row.state != EntryState.FAILED:
                    continue
                if queue is None or row.task.queue == queue:
                    row.requeue(now, next(self._places))
                    count += 1
            if count:
                self._work.notify_all()
        return count

    def cancel_tasks(self, ids: Sequence[str]) -> int:
        ids = _check_operation(ids=ids)
        count = 0
        with self._guard():
            for task_id in ids:
                row = self._tasks.get(task_id)
                if row is not None and row.state == EntryState.QUEUED:
                    del self._tasks[task_id]
                    count += 1
        return count

    def task_states(self, ids: Sequence[str]) -> dict[str, str]:
        ids = _check_operation(ids=ids)
        with self._guard():
            return {
                task_id: self._tasks[task_id].state.value
                for task_id in ids
                if task_id in self._tasks
            }

    def wait_for_work(self, timeout: float, stop: threading.Event) -> None:
        deadline = time.monotonic() + timeout
        with self._guard():
            # Short slices, so a stop request is seen within a quarter second; a close wakes it.
            while not stop.is_set() and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._work.wait(min(remaining, 0.25)):
                    return

    def take_slots(
        self, name: str, count: int, period: float, want: int, hold: float
    ) -> tuple[int, float | None, float]:
        with self._guard():
            base = time.monotonic()
            now = time.time()
            slots = self._slots.setdefault(name, [])
            slots.extend([0.0] * (count - len(slots)))
            free = [index for index in range(count) if slots[index] <= now][:want]
            for index in free:
                slots[index] = now + hold + period
            wait = None
            if len(free) < want:
                ahead = sorted(slots[:count])[min(want - len(free), count) - 1]
                wait = max(ahead - now, 0.0)
        return len(free), wait, base

    # History ------------------------------------------------------------------------------------

    def record_history(
        self, worker: str, minute: int, counts: Mapping[str, int], latency: str
    ) -> None:
        with self._guard():
            self._history[int(minute), worker] = _HistoryRow.of(worker, minute, counts, latency)

    def history(self, since: float) -> list[dict[str, Any]]:
        first = int(since // 60)
        with self._guard():
            return [self._history[key].public() for key in sorted(self._history) if key[0] >= first]

    def close(self) -> None:
        """Close the store: its contents are gone, and every later call raises `TaskQueueError`."""
        with self._work:
            self._closed = True
            self._keys.clear()
            self._tasks.clear()
            self._workers.clear()
            self._slots.clear()
            self._history.clear()
            self._work.notify_all()


class _BufferedCursor:
    """A cursor's result read at once: the statement is finished (and, alone, committed), and the
    next statement can reuse the cursor."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, cursor: Any) -> None:
        self.rowcount: int = cursor.rowcount
        self._rows = cursor.fetchall() if cursor.description is not None else []

    def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[Any]:
        return self._rows


class _Cursor(Protocol):
    """The result of one statement: a DB-API cursor, or a `_BufferedCursor`."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Execute(Protocol):
    """A transaction's ``execute(name, params)``: one named statement with one parameter
    mapping returns its cursor; with a list of mappings, a buffered result for each."""

    @overload
    def __call__(self, name: str, params: Mapping[str, Any], /) -> _Cursor: ...

    @overload
    def __call__(self, name: str, params: list[Any], /) -> list[_BufferedCursor]: ...


def _lost_claim(fp: str | None, found: Sequence[Any]) -> Claim:
    """Return the answer to a claim that lost, from the key's row as ``lookup`` reads it."""
    state, stored_fp, output, _, lease_expires, *_ = found
    if fp is not None and stored_fp is not None and stored_fp != fp:
        return Claim(ClaimState.CONFLICT)
    if state == _Row.COMPLETED:
        return Claim(ClaimState.COMPLETED, output=json.loads(output))
    return Claim(ClaimState.IN_PROGRESS, lease_expires=lease_expires)


# The retry statements (see _SqlStore._SQL), for the failed rows `where` picks.
_RETRY = """
    UPDATE {{tasks}} SET state = 'queued', token = NULL, worker = NULL, attempts = 0,
        error = NULL, error_kind = NULL, enqueued_at = :now, updated_at = :now, run_at = NULL,
        seq = r.place
    FROM (SELECT id, {{retry_place}} AS place
          FROM (SELECT id, seq FROM {{tasks}} WHERE state = 'failed' {where}
                ORDER BY seq, id) AS f) AS r
    WHERE {{tasks}}.id = r.id AND {{tasks}}.state = 'failed'
"""


class _SqlStore:
    """The contract in SQL, shared by SQLite and PostgreSQL; subclasses open and run transactions.

    Statements use ``:name`` parameters (SQLite's style; PostgresStore rewrites them). The claim
    is one upsert: it inserts the key, or takes over a claimable row whose fingerprint agrees, and
    returns the new token exactly when the caller now owns the key.
    """

    _DDL: tuple[str, ...] = ()
    _TAKE_LOCK = ""  # appended to the take query's row selection (FOR UPDATE SKIP LOCKED)
    # Whether the table named :name exists (the history table: see _has_history).
    _HISTORY_EXISTS = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = :name"
    # What a take returns of each row (id, key, payload, then the id as the fail statement finds
    # it, its priority and since when it is ready, then its queue, group and timeout, then its
    # place in submission order), and how that statement names the id: SQLite's differ (see
    # SqliteStore).
    _TAKE_COLUMNS = (
        "id, key, payload, id, priority, coalesce(run_at, enqueued_at), queue, task_group, "
        "timeout_seconds, seq"
    )  # fmt: skip
    _CLOCK = ":now"  # the clock rate-limit slots are stamped with (PostgreSQL: the server's)
    _RAW_ID = "id"
    # A row's place in submission order, its "seq" (see _place_rows): the first place of a
    # statement ({place}), what a statement must say before it to have one ({place_with}), and
    # a fresh place per row for a retry, drawn in the rows' old order ({retry_place}).
    # Subclasses define them over their counter, `{order}`.
    _PLACE_WITH = ""
    _PLACE = ""
    _RETRY_PLACE = ""
    _DIALECT_SQL: dict[str, str] = {}  # statements of one backend only, beside _SQL
    # How a take names the queues it serves, and a statement the ids it acts on (the `queues`
    # and `ids` parameters: a list, see `_list_param`).
    _QUEUE_FILTER = "queue IN (SELECT value FROM json_each(:queues))"
    _IDS_FILTER = "id IN (SELECT value FROM json_each(:ids))"
    _SQL = {
        # The WHERE leaves a key alone when it has a row without a namespace to adopt first
        # (two primary-key probes): claim_many then adopts it and claims again.
        "claim": """
            INSERT INTO {keys} AS t (key, namespace, state, fingerprint, token, lease_expires,
                attempts, created_at, updated_at)
            SELECT :key, :ns, 'in_progress', :fp, :token, :lease, 1, :now, :now
            WHERE :ns = ''
               OR EXISTS (SELECT 1 FROM {keys} WHERE key = :key AND namespace = :ns)
               OR NOT EXISTS (SELECT 1 FROM {keys} WHERE key = :key AND namespace = '')
            ON CONFLICT (key, namespace) DO UPDATE SET
                state = 'in_progress', token = excluded.token,
                lease_expires = excluded.lease_expires, updated_at = excluded.updated_at,
                output = NULL, error = NULL, attempts = t.attempts + 1,
                fingerprint = coalesce(excluded.fingerprint, t.fingerprint)
            WHERE (t.state = 'failed'
                   OR (t.state = 'in_progress' AND t.lease_expires <= :now)
                   OR (t.state = 'completed' AND t.updated_at <= :expired))
              AND (excluded.fingerprint IS NULL OR t.fingerprint IS NULL
                   OR t.fingerprint = excluded.fingerprint)
            RETURNING token
        """,
        "lookup": """
            SELECT state, fingerprint, output, error, lease_expires, updated_at, namespace,
                {key_attempts}
            FROM {keys} WHERE key = :key AND namespace = :ns
        """,
        "lookup_any": """
            SELECT state, fingerprint, output, error, lease_expires, updated_at, namespace,
                {key_attempts}
            FROM {keys} WHERE key = :key
            ORDER BY state = 'completed' DESC, updated_at DESC LIMIT 1
        """,
        # A row written without a namespace goes to the first handler that claims its key.
        "adopt": """
            UPDATE {keys} SET namespace = :ns
            WHERE key = :key AND namespace = ''
              AND NOT EXISTS (SELECT 1 FROM {keys} WHERE key = :key AND namespace = :ns)
        """,
        # A durable-queue row about to run counts a started run, where this transaction's claim
        # won the row's key (its token is one of the transaction's range).
        "start": """
            UPDATE {tasks} SET attempts = attempts + 1
            WHERE id = :id AND token = :entry AND state = 'running'
              AND EXISTS (SELECT 1 FROM {keys} AS k
                          WHERE k.key = {tasks}.key AND k.namespace = :ns
                            AND k.token >= :first AND k.token < :end)
        """,
        "live_claims": """
            SELECT token, lease_expires FROM {keys}
            WHERE namespace IN (:ns, '') AND state = 'in_progress' AND lease_expires > :now
        """,
        "complete": """
            UPDATE {keys} SET state = 'completed', output = :output, error = NULL,
                lease_expires = NULL, updated_at = :now, attempts = attempts + :calls
            WHERE key = :key AND token = :token AND state = 'in_progress'
        """,
        "renew": """
            UPDATE {keys} SET lease_expires = :lease, updated_at = :now
            WHERE key = :key AND token = :token AND state = 'in_progress'
        """,
        "release": """
            UPDATE {keys} SET state = 'failed', error = :error, lease_expires = NULL,
                updated_at = :now, attempts = attempts + :calls
            WHERE key = :key AND token = :token AND state = 'in_progress'
        """,
        "mark": """
            INSERT INTO {keys} AS t (key, namespace, state, token, output, created_at, updated_at)
            VALUES (:key, :ns, 'completed', :token, :output, :now, :now)
            ON CONFLICT (key, namespace) DO UPDATE SET state = 'completed',
                output = excluded.output, error = NULL, lease_expires = NULL,
                updated_at = excluded.updated_at
        """,
        "purge_keys": """
            DELETE FROM {keys} WHERE state IN ('completed', 'failed') AND updated_at <= :cutoff
        """,
        "purge_tasks": """
            DELETE FROM {tasks} WHERE state IN ('done', 'failed') AND updated_at <= :cutoff
        """,
        "stats": "SELECT state, count(*) FROM {keys} GROUP BY state",
        # A row's place in submission order ("seq") is the statement's first place (see
        # {place}) plus the row's index in its batch (`:seq`).
        "enqueue": """
            {place_with}INSERT INTO {tasks} (id, key, payload, queue, state, attempts,
                enqueued_at, updated_at, priority, run_at, task_group, timeout_seconds, seq)
            VALUES (:id, :key, :payload, :queue, 'queued', 0, :now, :now, :priority, :run_at,
                :task_group, :timeout, {place} + :seq)
            ON CONFLICT (id) DO NOTHING
        """,
        # Tasks whose every run so far ended with its worker's death are failed, not run again.
        # A worker fails only those of the queues it serves (`{in_queues}`: see _render_sql).
        "fail_crashed": """
            UPDATE {tasks} SET state = 'failed', error = :crash_error, error_kind = 'crashed',
                lease_expires = NULL, updated_at = :now
            WHERE id IN (
                SELECT id FROM {tasks} WHERE state = 'running' AND lease_expires <= :now
                    AND attempts >= :max_crashes {in_queues} {take_lock})
        """,
        # Two takes, each served by the take index (state, priority DESC, ready time, seq) with
        # no sort of the backlog: first running tasks whose lease expired (a dead worker's; the
        # scan reads the running rows, a few per worker), then the queued ones that are due:
        # the highest priority first, within it the one ready longest, and among those ready
        # at the same time (one enqueue) the one submitted first. A delayed task's ready time
        # is its due time, so that among due tasks the index range ends at "now". A worker of
        # one named queue has the index (state, queue, priority DESC, ready time, seq).
        "take_expired": """
            UPDATE {tasks} SET state = 'running', token = :token, worker = :worker,
                lease_expires = :lease, updated_at = :now
            WHERE id IN (
                SELECT id FROM {tasks} WHERE state = 'running' AND lease_expires <= :now
                    AND (run_at IS NULL OR run_at <= :now) {in_queues}
                ORDER BY priority DESC, coalesce(run_at, enqueued_at), seq
                LIMIT :limit {take_lock})
            RETURNING {take_columns}
        """,
        "take": """
            UPDATE {tasks} SET state = 'running', token = :token, worker = :worker,
                lease_expires = :lease, updated_at = :now
            WHERE id IN (
                SELECT id FROM {tasks}
                WHERE state = 'queued' AND coalesce(run_at, enqueued_at) <= :now {in_queues}
                ORDER BY priority DESC, coalesce(run_at, enqueued_at), seq
                LIMIT :limit {take_lock})
            RETURNING {take_columns}
        """,
        # A row just taken that holds no task (see _stored_task) fails on its own.
        "fail_unreadable": """
            UPDATE {tasks} SET state = 'failed', error = :error, error_kind = 'permanent',
                lease_expires = NULL, updated_at = :now
            WHERE {raw_id} = :raw_id AND token = :token AND state = 'running'
        """,
        # A submission's schedule replaces a stored one: the worker that submits it holds it.
        "take_task": """
            {place_with}INSERT INTO {tasks} AS t (id, key, payload, queue, state, token, worker,
                lease_expires, attempts, enqueued_at, updated_at, priority, run_at, task_group,
                timeout_seconds, seq)
            VALUES (:id, :key, :payload, :queue, 'running', :token, :worker, :lease, 0, :now,
                :now, :priority, :run_at, :task_group, :timeout, {place})
            ON CONFLICT (id) DO UPDATE SET state = 'running', token = excluded.token,
                worker = excluded.worker, lease_expires = excluded.lease_expires,
                attempts = CASE WHEN t.state = 'failed' THEN 0 ELSE t.attempts END,
                updated_at = excluded.updated_at, priority = excluded.priority,
                run_at = excluded.run_at
            WHERE (t.state IN ('queued', 'failed')
                   OR (t.state = 'running' AND t.lease_expires <= :now))
              AND t.key = excluded.key AND t.payload = excluded.payload
              AND t.queue = excluded.queue
            RETURNING token
        """,
        "task_entry": "SELECT key, payload, queue FROM {tasks} WHERE id = :id",
        "settle": """
            UPDATE {tasks} SET state = :state, error = :error, lease_expires = NULL,
                updated_at = :now, error_kind = :kind, attempts = attempts + :calls,
                token = CASE WHEN :state = 'queued' THEN NULL ELSE token END,
                worker = CASE WHEN :state = 'queued' THEN NULL ELSE worker END
            WHERE id = :id AND token = :token AND state = 'running'
        """,
        "renew_tasks": """
            UPDATE {tasks} SET lease_expires = :lease, updated_at = :now
            WHERE worker = :worker AND state = 'running'
        """,
        "renew_entry": """
            UPDATE {tasks} SET lease_expires = :lease, updated_at = :now
            WHERE id = :id AND token = :token AND state = 'running'
        """,
        "heartbeat": """
            INSERT INTO {workers} AS w (name, info, started_at, seen_at)
            VALUES (:worker, :info, :now, :now)
            ON CONFLICT (name) DO UPDATE SET info = excluded.info, seen_at = excluded.seen_at
        """,
        "task_counts": "SELECT state, count(*) FROM {tasks} GROUP BY state",
        # Since when the longest-waiting due task is ready, and the delayed ones (see Store).
        "oldest": """
            SELECT min(coalesce(run_at, enqueued_at)) FROM {tasks}
            WHERE state = 'queued' AND coalesce(run_at, enqueued_at) <= :now
        """,
        "delayed": "SELECT count(*) FROM {tasks} WHERE state = 'queued' AND run_at > :now",
        # By the partial index of delayed rows: one probe however long the backlog.
        "next_run_at": """
            SELECT min(run_at) FROM {tasks}
            WHERE state = 'queued' AND run_at IS NOT NULL AND run_at > :now
        """,
        "stalled": """
            SELECT count(*) FROM {tasks} WHERE state = 'running' AND lease_expires <= :now
        """,
        "workers": "SELECT name, info, seen_at FROM {workers} ORDER BY name",
        # Rate limits shared through the store: one row per slot of a limit, each holding the
        # time it is free again (see take_slots). The rows of a limit are made on first use.
        "slots_init": """
            WITH RECURSIVE s(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM s WHERE n + 1 < :count)
            INSERT INTO {limits} (name, slot, free_at) SELECT :name, n, 0 FROM s WHERE true
            ON CONFLICT (name, slot) DO NOTHING
        """,
        "take_slots": """
            UPDATE {limits} SET free_at = {clock} + :extra
            WHERE name = :name AND slot IN (
                SELECT slot FROM {limits} WHERE name = :name AND slot < :count
                    AND free_at <= {clock}
                LIMIT :want {take_lock})
            RETURNING slot
        """,
        "slots_wait": """
            SELECT free_at - {clock} FROM {limits} WHERE name = :name AND slot < :count
            ORDER BY free_at LIMIT 1 OFFSET :skip
        """,
        "purge_workers": "DELETE FROM {workers} WHERE seen_at <= :cutoff",
        # One row per minute and worker, replaced whole: a transaction run again writes the same.
        "history_upsert": """
            INSERT INTO {history} (minute, worker, succeeded, failed, duplicates, retries,
                latency)
            VALUES (:minute, :worker, :succeeded, :failed, :duplicates, :retries, :latency)
            ON CONFLICT (minute, worker) DO UPDATE SET succeeded = excluded.succeeded,
                failed = excluded.failed, duplicates = excluded.duplicates,
                retries = excluded.retries, latency = excluded.latency
        """,
        "history": """
            SELECT minute, worker, succeeded, failed, duplicates, retries, latency
            FROM {history} WHERE minute >= :since ORDER BY minute, worker
        """,
        "purge_history": "DELETE FROM {history} WHERE minute * 60 <= :cutoff",
        "history_exists": "{history_exists}",  # each dialect's own (_HISTORY_EXISTS)
        # Operating the queue. The reads name the columns through {queue_col} and {kind_col}: a
        # reader leaves a database from before named queues as it is (see _render_sql).
        "queue_counts": """
            SELECT {queue_col}, state, count(*) FROM {tasks} GROUP BY 1, 2
        """,
        # Since when each queue's longest-waiting due task is ready, and its delayed ones.
        "queue_oldest": """
            SELECT {queue_col}, min(coalesce(run_at, enqueued_at)) FROM {tasks}
            WHERE state = 'queued' AND coalesce(run_at, enqueued_at) <= :now GROUP BY 1
        """,
        "queue_delayed": """
            SELECT {queue_col}, count(*) FROM {tasks} WHERE state = 'queued' AND run_at > :now
            GROUP BY 1
        """,
        "held": "SELECT worker, count(*) FROM {tasks} WHERE state = 'running' GROUP BY worker",
        "failed": """
            SELECT id, key, {queue_col}, attempts, {kind_col}, error, updated_at FROM {tasks}
            WHERE state = 'failed' ORDER BY updated_at DESC, id LIMIT :limit
        """,
        "failed_in": """
            SELECT id, key, {queue_col}, attempts, {kind_col}, error, updated_at FROM {tasks}
            WHERE state = 'failed' AND {queue_col} = :queue
            ORDER BY updated_at DESC, id LIMIT :limit
        """,
        # A retried task goes to the back of its queue, with fresh attempts; the retried keep
        # the order they had among themselves (places drawn in their old order: {retry_place}).
        "retry_all": _RETRY.format(where=""),
        "retry_all_in": _RETRY.format(where="AND queue = :queue"),
        # By ids: one statement for any number of them (`{ids_filter}`: see _ids_param).
        "retry_ids": _RETRY.format(where="AND {ids_filter}"),
        "retry_ids_in": _RETRY.format(where="AND queue = :queue AND {ids_filter}"),
        "cancel": "DELETE FROM {tasks} WHERE state = 'queued' AND {ids_filter}",
        "task_states": "SELECT id, state FROM {tasks} WHERE {ids_filter}",
    }
    # Columns added to the tables after their first layout, and what a reader of a database
    # from before them reads instead (see _render_sql).
    _LATER_COLUMNS = {
        ("tasks", "queue"): ("queue_col", "queue", f"'{DEFAULT_QUEUE}'"),
        ("tasks", "error_kind"): ("kind_col", "error_kind", "NULL"),
        ("keys", "attempts"): ("key_attempts", "attempts", "0"),
        ("tasks", "task_group"): ("group_col", "task_group", "NULL"),
        ("tasks", "timeout_seconds"): ("timeout_col", "timeout_seconds", "NULL"),
    }

    # The take's index and the partial index of delayed rows (see _SQL), made by _migrate_tasks
    # once the tasks table has the columns: a table from before delays and priorities, or
    # before places in submission order, gets them first. The indexes of versions before
    # places (`_OLD_TAKE_INDEXES`, without seq) are dropped.
    _SCHEDULE_COLUMNS = {"priority": "INTEGER NOT NULL DEFAULT 0", "run_at": "{real}"}
    _SCHEDULE_DDL = (
        "CREATE INDEX IF NOT EXISTS {take_index} ON {tasks} "
        "(state, priority DESC, (coalesce(run_at, enqueued_at)), seq)",
        "CREATE INDEX IF NOT EXISTS {delayed_index} ON {tasks} (state, run_at) "
        "WHERE run_at IS NOT NULL",
    )
    _OLD_TAKE_INDEXES = ("tasks_take", "tasks_queue_take")
    # Statements for a tasks table from before delays, read as it is by a command that may not
    # migrate it (status): it holds no delayed task.
    _LEGACY_SQL = {
        "oldest": "SELECT min(enqueued_at) FROM {tasks} WHERE state = 'queued'",
        "delayed": "SELECT 0",
        "next_run_at": "SELECT NULL",
        "queue_oldest": "SELECT {queue_col}, min(enqueued_at) FROM {tasks} WHERE state = 'queued' "
        "GROUP BY 1",
        "queue_delayed": "SELECT NULL, 0 WHERE 1 = 0",
    }

    url: str
    lease_seconds: float
    ttl_seconds: float | None

    def _init_common(
        self, lease_seconds: float, ttl_seconds: float | None, names: Mapping[str, str]
    ) -> None:
        if not (isinstance(lease_seconds, (int, float)) and lease_seconds > 0):
            raise ValueError(f"lease_seconds must be > 0, not {lease_seconds!r}")
        if ttl_seconds is not None and not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be > 0 or None, not {ttl_seconds!r}")
        self.lease_seconds = float(lease_seconds)
        self.ttl_seconds = ttl_seconds
        self._names = dict(names)
        self._slot_rows: set[tuple[str, int]] = set()  # limits whose slot rows exist (a hint)
        self._schedule_legacy = False  # a tasks table from before delays, read as it is
        self._render_sql()
        self._lock = threading.Lock()  # guards the connection and _closed: one transaction at once
        self._closed = False  # set once by close; a closed store refuses every call

    def _render_sql(self, missing: Iterable[tuple[str, str]] = ()) -> None:
        """Build the statements; `missing` lists ``(table, column)`` pairs a database from an
        older version lacks, which the reads then take as their default (a reader must leave
        such a database as it is; an opener that may write adds them first)."""
        fields = {"take_lock": self._TAKE_LOCK, "take_columns": self._TAKE_COLUMNS,
                  "raw_id": self._RAW_ID, "ids_filter": self._IDS_FILTER, "clock": self._CLOCK,
                  "history_exists": self._HISTORY_EXISTS,
                  "place_with": self._PLACE_WITH.format(**self._names),
                  "place": self._PLACE.format(**self._names),
                  "retry_place": self._RETRY_PLACE.format(**self._names),
                  **self._names}  # fmt: skip
        gone = set(missing)
        for pair, (field, column, default) in self._LATER_COLUMNS.items():
            fields[field] = default if pair in gone else column
        sql = {}
        for name, text in {**self._SQL, **self._DIALECT_SQL}.items():
            if "{in_queues}" in text:
                # A variant for every queue, one for a worker of one queue (an equality, so the
                # queue's take index serves the take in order), one for several.
                sql[name + "_in"] = text.format(**fields, in_queues="AND " + self._QUEUE_FILTER)
                sql[name + "_in_one"] = text.format(**fields, in_queues="AND queue = :queue")
                text = text.replace("{in_queues}", "")
            sql[name] = text.format(**fields)
        if self._schedule_legacy:
            sql.update((name, text.format(**fields)) for name, text in self._LEGACY_SQL.items())
        self._fields = fields
        self._sql = {name: self._dialect(text) for name, text in sql.items()}

    @staticmethod
    def _list_param(values: Sequence[str]) -> Any:
        """A list of texts as one parameter: JSON text, which SQLite's json_each reads."""
        return json.dumps(list(values))

    @staticmethod
    def _dialect(sql: str) -> str:
        return sql

    def _read_as_legacy(self) -> None:
        """Read a tasks table without the delay and priority columns as it is (see _LEGACY_SQL)."""
        self._schedule_legacy = True
        for name, sql in self._LEGACY_SQL.items():
            self._sql[name] = self._dialect(sql.format(**self._fields))

    def _check_open(self) -> None:
        if self._closed:
            raise TaskQueueError(_STORE_CLOSED)

    def _transaction(self, body: Callable[[_Execute], _T], write: bool = True) -> _T:
        """Run ``body(execute)`` in one transaction; ``execute(name, params)`` runs one named
        statement and returns its cursor, or, given a list of parameter mappings, runs the
        statement once per mapping and returns a buffered result for each. ``write=False``
        promises `body` only reads."""
        raise NotImplementedError

    # Idempotency --------------------------------------------------------------------------------

    def _one_statement(self, name: str, params: Mapping[str, Any]) -> _BufferedCursor | None:
        """Run one statement as its own transaction where the backend can do that more cheaply
        than a BEGIN ... COMMIT around it (SQLite's autocommit); None where it cannot."""
        return None

    def claim_many(
        self,
        items: Sequence[tuple[str, str | None]],
        namespace: str = "",
        starts: Sequence[tuple[str, int]] | None = None,
    ) -> list[Claim]:
        lease, ttl = self.lease_seconds, self.ttl_seconds
        if len(items) == 1 and not starts:
            # The common case of a slow task: one upsert that wins is the whole claim. Losing it
            # (or a key to adopt first) needs the statements below in the same transaction, so
            # that path runs in one.
            key, fp = items[0]
            now = time.time()
            params = {"now": now, "lease": now + lease, "expired": now - ttl if ttl else -1e300,
                      "key": key, "fp": fp, "token": _new_token(), "ns": namespace}  # fmt: skip
            won = self._one_statement("claim", params)
            if won is not None and won.fetchone() is not None:
                return [
                    Claim(ClaimState.CLAIMED, token=won.fetchone()[0], lease_expires=now + lease)
                ]

        def claim_all(execute: _Execute) -> list[Claim]:
            now = time.time()
            # Consecutive tokens, one per key: the start statement finds the keys this
            # transaction won by their range.
            first = _new_token_range(len(items))
            params = {"now": now, "lease": now + lease, "expired": now - ttl if ttl else -1e300,
                      "ns": namespace, "first": first, "end": first + len(items)}  # fmt: skip
            claims: list[Claim] = [Claim(ClaimState.IN_PROGRESS)] * len(items)
            # Rows are locked in key order, so two transactions never wait on each other in a
            # cycle (PostgreSQL would abort one of them as a deadlock).
            for index in _key_order([key for key, _ in items]):
                key, fp = items[index]
                params.update(key=key, fp=fp, token=first + index)
                row = execute("claim", params).fetchone()
                found = None
                if row is None:
                    found = execute("lookup", {"key": key, "ns": namespace}).fetchone()
                    if found is None:
                        # The key has a row without a namespace and none in this one (the claim
                        # left it alone): adopt that row, then claim as usual.
                        execute("adopt", params)
                        row = execute("claim", params).fetchone()
                        if row is None:
                            found = execute("lookup", {"key": key, "ns": namespace}).fetchone()
                if row is not None:
                    claims[index] = Claim(
                        ClaimState.CLAIMED, token=row[0], lease_expires=now + lease
                    )
                    continue
                if found is not None:
                    # None: gone again meanwhile (a purge): in progress, asked again later.
                    claims[index] = _lost_claim(fp, found)
            if any(claim.state is ClaimState.CLAIMED for claim in claims):
                for task_id, entry in sorted(starts or ()):  # rows locked in id order
                    execute("start", {**params, "id": task_id, "entry": entry})
            return claims

        return self._transaction(claim_all)

    def _each(self, name: str, rows: list[dict[str, Any]], field: str = "key") -> list[int]:
        """Run one statement per row in one transaction, in `field` order (see claim_many);
        return each statement's row count."""
        if not rows:
            return []

        if len(rows) == 1:
            single = self._one_statement(name, rows[0])
            if single is not None:
                return [single.rowcount]

        def run(execute: _Execute) -> list[int]:
            counts = [0] * len(rows)
            for index in _key_order([row[field] for row in rows]):
                counts[index] = execute(name, rows[index]).rowcount
            if name == "settle" and any(row["state"] == "queued" for row in rows):
                self._notify(execute)  # wake idle workers: there is work for them
            return counts

        return self._transaction(run)

    def complete_many(
        self,
        items: Sequence[tuple[Any, ...]],
        settle: Sequence[tuple[Any, ...]] | None = None,
    ) -> list[bool]:
        now = time.time()
        rows = [{"key": k, "token": t, "output": o, "now": now, "calls": calls[0] if calls else 0}
                for k, t, o, *calls in items]  # fmt: skip
        if not settle:
            return [count == 1 for count in self._each("complete", rows)]

        def run(execute: _Execute) -> list[bool]:
            written = [False] * len(rows)
            order = _key_order([row["key"] for row in rows])
            for index, result in zip(order, execute("complete", [rows[i] for i in order]),
                                     strict=True):  # fmt: skip
                written[index] = result.rowcount == 1
            # The durable rows of the completed keys are done in the same transaction.
            done = sorted((task_id, entry, more[0] if more else 0)
                          for index, task_id, entry, *more in settle
                          if written[index])  # fmt: skip
            execute("settle", [{"id": task_id, "token": entry, "state": EntryState.DONE.value,
                                "error": None, "kind": None, "calls": calls, "now": now}
                               for task_id, entry, calls in done])  # fmt: skip
            return written

        return self._transaction(run)

    def renew_many(self, claims: Sequence[tuple[str, int]]) -> int:
        now = time.time()
        lease = now + self.lease_seconds
        rows = [{"key": k, "token": t, "lease": lease, "now": now} for k, t in claims]
        return sum(self._each("renew", rows))

    def release_many(self, items: Sequence[tuple[Any, ...]]) -> int:
        now = time.time()
        rows = [{"key": k, "token": t, "error": _storable_text(e), "now": now,
                 "calls": calls[0] if calls else 0} for k, t, e, *calls in items]  # fmt: skip
        return sum(self._each("release", rows))

    def lookup(self, key: str, namespace: str | None = None) -> dict[str, Any] | None:
        name, params = ("lookup_any", {"key": key}) if namespace is None else (
            "lookup", {"key": key, "ns": namespace})  # fmt: skip
        row = self._transaction(lambda execute: execute(name, params).fetchone(), write=False)
        if row is None:
            return None
        state, fp, output, error, lease_expires, updated_at, found_in, attempts = row
        return _public_row(
            {"state": state, "fingerprint": fp, "output": output, "error": error,
             "lease_expires": lease_expires, "updated_at": updated_at, "attempts": attempts},
            found_in,
        )  # fmt: skip

    def mark_processed(self, key: str, output_json: str, namespace: str = "") -> None:
        params = {"key": key, "token": _new_token(), "output": output_json, "now": time.time(),
                  "ns": namespace}  # fmt: skip
        self._transaction(lambda execute: execute("mark", params))

    def live_claims(self, namespace: str) -> list[tuple[int, float]]:
        params = {"ns": namespace, "now": time.time()}
        rows = self._transaction(
            lambda execute: execute("live_claims", params).fetchall(), write=False
        )
        return [(token, lease_expires) for token, lease_expires in rows]

    def purge_expired(self, older_than: float | None = None) -> int:
        age = self.ttl_seconds if older_than is None else older_than
        if age is None:
            return 0
        params = {"cutoff": time.time() - age}

        def purge(execute: _Execute) -> int:
            execute("purge_workers", params)  # heartbeats of workers long gone; not counted
            if self._has_history(execute):
                execute("purge_history", params)  # charted minutes, not records: not counted
            return execute("purge_keys", params).rowcount + execute("purge_tasks", params).rowcount

        return self._transaction(purge)

    def stats(self) -> dict[str, int]:
        counts = dict.fromkeys((state.value for state in _Row), 0)
        rows = self._transaction(lambda execute: execute("stats", {}).fetchall(), write=False)
        for state, count in rows:
            counts[state] = count
        counts["total"] = sum(counts.values())
        return counts

    # Durable queue ------------------------------------------------------------------------------

    def enqueue_many(
        self,
        tasks: Sequence[Task],
        *,
        delay: float | Sequence[float] = 0.0,
        priority: int | Sequence[int] = 0,
    ) -> int:
        now = time.time()
        rows = self._enqueue_rows(tasks, _schedules(tasks, delay, priority, now), now)
        if not rows:
            return 0

        def enqueue(execute: _Execute) -> int:
            added = self._enqueue_chunk(execute, rows)
            if added:
                self._notify(execute)  # wake idle workers: there is work for them
            return added

        return self._transaction(enqueue)

    @staticmethod
    def _enqueue_rows(
        tasks: Sequence[Task], schedules: Sequence[tuple[float | None, int]], now: float
    ) -> list[dict[str, Any]]:
        """The parameters of the enqueue statement for `tasks`, each with its
        ``(run_at, priority)`` (see `_schedules`)."""
        return [{"id": t.id, "key": t.key, "payload": _queue_payload(t), "queue": t.queue,
                 "now": now, "run_at": run_at, "priority": rank, "task_group": t.group,
                 "timeout": t.timeout, "seq": index}
                for index, (t, (run_at, rank))
                in enumerate(zip(tasks, schedules, strict=True))]  # fmt: skip

    def _enqueue_chunk(self, execute: _Execute, rows: list[dict[str, Any]]) -> int:
        """Insert `rows` inside the caller's transaction; return how many were new.

        Raises:
            TaskConflictError: an id is stored with another key or payload (the caller's
                transaction then rolls back: all or nothing).
        """
        added = 0
        for index in _key_order([row["id"] for row in rows]):  # see claim_many
            row = rows[index]
            if execute("enqueue", row).rowcount:
                added += 1
            else:
                self._check_same(execute, row)
        self._advance_places(execute, len(rows))
        return added

    def _advance_places(self, execute: _Execute, count: int) -> None:
        """Move the counter of places past the `count` a statement batch took from {place}
        (SqliteStore; on PostgreSQL each statement draws its own from a sequence)."""

    def _enqueue_stream(
        self,
        tasks: Iterable[Any],
        queue: str = DEFAULT_QUEUE,
        delay: float = 0.0,
        priority: int = 0,
        chunk_size: int = ENQUEUE_CHUNK,
    ) -> int:
        """Insert the tasks of any iterable as queued, all or nothing, `chunk_size` at a time
        inside one transaction (memory stays flat), with the statements of `enqueue_many`;
        each waits `delay` seconds from now and has `priority`, and a task in the default queue
        goes to `queue` (a task that names another queue keeps it).

        The iterable runs inside the transaction, under the store's lock: only a store that no
        other thread uses may do this (`enqueue` opens its own). An iterable cannot be read
        twice, so a transaction the backend would run again (a lost connection) fails instead.

        Raises:
            TaskConflictError: an id is stored with another key or payload; nothing is added.
            TypeError: an item is not a `Task`; nothing is added.
            TaskQueueError: the connection was lost midway; nothing is added.
        """
        items = iter(tasks)
        started = False

        def enqueue(execute: _Execute) -> int:
            nonlocal started
            if started:
                raise TaskQueueError(
                    "the database connection was lost during the enqueue; nothing was enqueued"
                )
            started = True
            added = 0
            now = time.time()
            schedule = _schedule_one(delay, priority, now)
            while chunk := list(itertools.islice(items, chunk_size)):
                for task in chunk:
                    if not isinstance(task, Task):
                        raise TypeError(f"expected Task objects, got {type(task).__name__}")
                if queue != DEFAULT_QUEUE:
                    chunk = [
                        dataclasses.replace(task, queue=queue)
                        if task.queue == DEFAULT_QUEUE
                        else task
                        for task in chunk
                    ]
                rows = self._enqueue_rows(chunk, [schedule] * len(chunk), now)
                added += self._enqueue_chunk(execute, rows)
            if added:
                self._notify(execute)
            return added

        return self._transaction(enqueue)

    @staticmethod
    def _check_same(execute: _Execute, row: Mapping[str, Any]) -> None:
        """Refuse a task id stored with another key or payload.

        Raises:
            TaskConflictError: the stored task differs.
        """
        stored = execute("task_entry", {"id": row["id"]}).fetchone()
        if stored is not None and tuple(stored) != (row["key"], row["payload"], row["queue"]):
            raise TaskConflictError(row["id"])

    def _notify(self, execute: _Execute) -> int:
        return 0  # PostgresStore wakes idle workers here

    def take_many(
        self,
        worker: str,
        limit: int,
        max_crashes: int | None = None,
        queues: Sequence[str] | None = None,
    ) -> list[QueuedTask]:
        now = time.time()
        token = _new_token()  # one token for the batch: it fences each row all the same
        params = {"token": token, "worker": worker, "lease": now + self.lease_seconds,
                  "now": now, "limit": limit}  # fmt: skip
        suffix = ""
        if queues is not None and len(queues) == 1:
            suffix = "_in_one"
            params["queue"] = queues[0]
        elif queues is not None:
            suffix = "_in"
            params["queues"] = self._list_param(queues)

        unreadable: list[tuple[Any, str]] = []  # (id, error) of the rows failed as no task

        def take(execute: _Execute) -> list[QueuedTask]:
            unreadable.clear()  # a transaction run again starts over
            if max_crashes is not None:
                execute("fail_crashed" + suffix, {**params, "max_crashes": max_crashes,
                        "crash_error": _crash_error(max_crashes)})  # fmt: skip
            rows = execute("take_expired" + suffix, params).fetchall()
            if len(rows) < limit:
                rows += execute("take" + suffix, {**params, "limit": limit - len(rows)}).fetchall()
            # RETURNING keeps no order: put the rows in the take's (see Store.take_many).
            rows.sort(key=lambda row: (-_stored_priority(row[4]), _ready_time(row[5]),
                                       _stored_place(row[9])))  # fmt: skip
            taken = []
            # Each row becomes a task on its own, before the lease commits: one that holds no
            # task fails alone, and the others run, instead of all of them being leased and
            # abandoned (and, leased again and again, failed as crashed).
            for task_id, key, payload, raw_id, rank, _, name, group, timeout, _ in rows:
                try:
                    task = _stored_task(task_id, key, payload, name, group, timeout)
                    taken.append(QueuedTask(task, token, _stored_priority(rank)))
                except TaskFileError as exc:
                    error = _unreadable_error(exc)
                    execute("fail_unreadable", {"raw_id": raw_id, "token": token,
                                                "error": error, "now": now})  # fmt: skip
                    unreadable.append((raw_id, error))
            return taken

        taken = self._transaction(take)
        for raw_id, error in unreadable:
            if isinstance(raw_id, bytes):
                raw_id = raw_id.decode("utf-8", "backslashreplace")
            logger.warning("task %r failed: %s", raw_id, error)
        return taken

    def take_task(
        self, task: Task, worker: str, *, delay: float = 0.0, priority: int = 0
    ) -> int | None:
        now = time.time()
        run_at, rank = _schedule_one(delay, priority, now)
        params = {"id": task.id, "key": task.key, "payload": _queue_payload(task),
                  "queue": task.queue, "token": _new_token(), "worker": worker,
                  "lease": now + self.lease_seconds, "now": now, "run_at": run_at,
                  "priority": rank, "task_group": task.group,
                  "timeout": task.timeout}  # fmt: skip

        def take(execute: _Execute) -> Any:
            row = execute("take_task", params).fetchone()
            if row is None:
                self._check_same(execute, params)
            else:
                self._advance_places(execute, 1)
            return row

        row = self._transaction(take)
        return None if row is None else row[0]

    def settle_many(self, items: Sequence[tuple[Any, ...]]) -> int:
        now = time.time()
        rows = [{"id": i, "token": t, "state": s.value, "error": _storable_text(e), "kind": k,
                 "calls": c, "now": now}
                for i, t, s, e, k, c in map(_settlement, items)]  # fmt: skip
        return sum(self._each("settle", rows, "id"))

    def renew_tasks(
        self,
        worker: str,
        info: Mapping[str, Any] | None = None,
        entries: Sequence[tuple[str, int]] | None = None,
    ) -> int:
        now = time.time()
        params = {"worker": worker, "lease": now + self.lease_seconds, "now": now,
                  "info": json.dumps(dict(info or {}))}  # fmt: skip

        def renew(execute: _Execute) -> int:
            execute("heartbeat", params)
            if entries is None:
                return execute("renew_tasks", params).rowcount
            return sum(
                execute("renew_entry", {**params, "id": task_id, "token": token}).rowcount
                for task_id, token in sorted(entries)
            )

        return self._transaction(renew)

    def queue_status(self) -> dict[str, Any]:
        status = _empty_status()
        now = time.time()

        def read(execute: _Execute) -> None:
            # The totals are the sums of the queues': one scan for both (status is polled).
            queues: dict[str, dict[str, Any]] = {}
            for name, state, count in execute("queue_counts", {}).fetchall():
                queues.setdefault(name, _queue_entry())[state] = count
                status["tasks"][state] = status["tasks"].get(state, 0) + count
            # A queue's "queued" are the tasks ready to run; its delayed ones wait apart.
            for name, count in execute("queue_delayed", {"now": now}).fetchall():
                entry = queues.setdefault(name, _queue_entry())
                entry["delayed"] = count
                entry["queued"] -= count
                status["delayed"] += count
            oldest = None
            for name, first in execute("queue_oldest", {"now": now}).fetchall():
                queues.setdefault(name, _queue_entry())["oldest_waiting_age"] = round(
                    now - first, 3
                )
                oldest = first if oldest is None else min(oldest, first)
            if oldest is not None:
                status["oldest_queued_seconds"] = round(now - oldest, 3)
            status["stalled"] = execute("stalled", {"now": now}).fetchone()[0]
            status["queues"] = dict(sorted(queues.items()))
            held = dict(execute("held", {}).fetchall())
            lease = self.lease_seconds
            status["workers"] = [
                _worker_entry(name, json.loads(info), now - seen_at, held.get(name, 0), lease)
                for name, info, seen_at in execute("workers", {}).fetchall()
            ]

        self._transaction(read, write=False)
        return status

    def next_run_at(self) -> float | None:
        params = {"now": time.time()}
        row = self._transaction(
            lambda execute: execute("next_run_at", params).fetchone(), write=False
        )
        return None if row is None else row[0]

    # Operating the queue ------------------------------------------------------------------------

    def failed_tasks(
        self, queue: str | None = None, limit: int = DEFAULT_FAILED_LIMIT
    ) -> list[dict[str, Any]]:
        _check_operation(queue=queue, limit=limit)
        name, params = ("failed", {"limit": limit}) if queue is None else (
            "failed_in", {"limit": limit, "queue": queue})  # fmt: skip
        rows = self._transaction(lambda execute: execute(name, params).fetchall(), write=False)
        return [_failed_entry(*row) for row in rows]

    def retry_tasks(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        ids = _check_operation(ids=ids, queue=queue)
        params: dict[str, Any] = {"now": time.time(), "queue": queue}
        if ids is None:
            name = "retry_all" if queue is None else "retry_all_in"
        elif not ids:
            return 0
        else:
            name = "retry_ids" if queue is None else "retry_ids_in"
            params["ids"] = self._list_param(sorted(set(ids)))

        def retry(execute: _Execute) -> int:
            count = execute(name, params).rowcount
            if count:
                self._advance_places(execute, count)
                self._notify(execute)  # wake idle workers: there is work for them
            return count

        return self._transaction(retry)

    def cancel_tasks(self, ids: Sequence[str]) -> int:
        ids = _check_operation(ids=ids)
        if not ids:
            return 0
        params = {"ids": self._list_param(sorted(set(ids)))}
        return self._transaction(lambda execute: execute("cancel", params).rowcount)

    def task_states(self, ids: Sequence[str]) -> dict[str, str]:
        ids = _check_operation(ids=ids)
        if not ids:
            return {}
        params = {"ids": self._list_param(sorted(set(ids)))}
        rows = self._transaction(lambda execute: execute("task_states", params).fetchall(),
                                 write=False)  # fmt: skip
        return dict(rows)

    def wait_for_work(self, timeout: float, stop: threading.Event) -> None:
        self._check_open()
        stop.wait(timeout)

    # Rate limits --------------------------------------------------------------------------------

    def take_slots(
        self, name: str, count: int, period: float, want: int, hold: float
    ) -> tuple[int, float | None, float]:
        params: dict[str, Any] = {"name": name, "count": count, "want": want,
                                  "extra": hold + period}  # fmt: skip
        made = (name, count) in self._slot_rows

        def take(execute: _Execute) -> tuple[int, float | None, float]:
            if not made:
                execute("slots_init", params)
            # Read once the transaction holds its locks (SQLite's write lock is taken at BEGIN):
            # the hold runs from here, so a take that waited for the lock loses none of it.
            base = time.monotonic()
            params["now"] = time.time()
            taken = len(execute("take_slots", params).fetchall())
            wait = None
            if taken < want:
                skip = min(want - taken, count) - 1
                row = execute("slots_wait", {**params, "skip": skip}).fetchone()
                wait = 0.0 if row is None or row[0] is None else max(float(row[0]), 0.0)
            return taken, wait, base

        result = self._transaction(take)
        self._slot_rows.add((name, count))
        return result

    # History ------------------------------------------------------------------------------------

    def _has_history(self, execute: _Execute) -> bool:
        """Return whether the history table exists: a database opened only to read or purge may
        come from a version without it (only an opener that may create adds it)."""
        return bool(execute("history_exists", {"name": self._names["history"]}).fetchone()[0])

    def record_history(
        self, worker: str, minute: int, counts: Mapping[str, int], latency: str
    ) -> None:
        params = _history_row(worker, minute, counts, latency)
        self._transaction(lambda execute: execute("history_upsert", params))

    def history(self, since: float) -> list[dict[str, Any]]:
        def read(execute: _Execute) -> list[Any]:
            if not self._has_history(execute):
                return []
            return execute("history", {"since": int(since // 60)}).fetchall()

        rows = self._transaction(read, write=False)
        return [dict(zip(_HISTORY_FIELDS, row, strict=True)) for row in rows]


# How `ALTER TABLE ... ADD COLUMN` declares each later column (see `_SqlStore._LATER_COLUMNS`).
_LATER_COLUMN_DDL = {
    "queue": "TEXT NOT NULL DEFAULT '{default}'",
    "error_kind": "TEXT",
    "attempts": "INTEGER NOT NULL DEFAULT 0",
    "task_group": "TEXT",
    "timeout_seconds": "DOUBLE PRECISION",
}


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class SqliteStore(_SqlStore):
    """The contract in one SQLite file: one machine, any number of threads and processes.

    WAL journal (readers never block the writer), ``synchronous=NORMAL`` (survives a process
    crash) or ``FULL`` (``durability="full"``: survives power loss), write transactions begun with
    ``BEGIN IMMEDIATE`` so none has to upgrade from read to write, and a 30 s busy timeout. New
    files are created with mode 0600. ``path=None`` or ``":memory:"`` is a private in-memory
    database (no file is created); ``file:`` URIs are refused (SQLite would take them for a file
    name).

    Args:
        create: create the file and tables when missing; False refuses a database that does not
            exist or holds no task queue (for commands that only read or delete).

    Raises:
        ConfigError: the path is a directory, is not a SQLite database, cannot be written, is a
            ``file:`` URI, or (``create=False``) does not exist or holds no task queue.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        ttl_seconds: float | None = None,
        durability: str = DEFAULT_DURABILITY,
        table: str = "idempotency",
        create: bool = True,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
        if not IDENTIFIER_PATTERN.fullmatch(table):
            raise ValueError(f"table name {table!r} is not a valid SQL identifier")
        if sqlite3.sqlite_version_info < (3, 35, 0):  # UPSERT ... RETURNING
            raise ConfigError(
                f"SQLite {sqlite3.sqlite_version} is too old: the store needs 3.35 or newer"
            )
        text = None if path is None else os.fspath(path)
        if text is not None and text.startswith("file:"):
            raise ConfigError(f"database {text}: file: URIs are not supported; give a plain path")
        self.path = None if text in (None, MEMORY_DATABASE) else text
        self.url = f"sqlite:///{MEMORY_DATABASE if self.path is None else self.path}"
        if not create and self.path is None:
            raise ConfigError(f"database {MEMORY_DATABASE} is new and empty in every process")
        if not create and not os.path.exists(self.path):  # type: ignore[arg-type]  # not None: raised above
            raise ConfigError(f"database {self.path}: does not exist")
        self.durability = durability
        self._create = create
        self._init_common(
            lease_seconds,
            ttl_seconds,
            {
                "keys": table,
                "tasks": f"{table}_tasks",
                "workers": f"{table}_workers",
                "history": f"{table}_history",
                "limits": f"{table}_limits",
                "order": f"{table}_tasks_order",
            },
        )
        self._conn: sqlite3.Connection | None = self._open()

    _KEYS_DDL = """CREATE TABLE IF NOT EXISTS {keys} (
            key TEXT NOT NULL, namespace TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
            fingerprint TEXT, token INTEGER NOT NULL, output TEXT, error TEXT, lease_expires REAL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (key, namespace)) WITHOUT ROWID"""
    # Text columns of a taken row come as UTF-8 bytes, and a value stored as another type as
    # NULL: a row that holds no text (written by hand or by an older version) must fail alone
    # (see _stored_task) instead of failing the whole take as the driver decodes it.
    _TAKE_COLUMNS = (
        "CASE typeof(id) WHEN 'text' THEN CAST(id AS BLOB) END, "
        "CASE typeof(key) WHEN 'text' THEN CAST(key AS BLOB) END, "
        "CASE typeof(payload) WHEN 'text' THEN CAST(payload AS BLOB) END, CAST(id AS BLOB), "
        "priority, coalesce(run_at, enqueued_at), "
        "CASE typeof(queue) WHEN 'text' THEN CAST(queue AS BLOB) END, "
        "CASE typeof(task_group) WHEN 'text' THEN CAST(task_group AS BLOB) END, timeout_seconds, "
        "seq"
    )
    _RAW_ID = "CAST(id AS BLOB)"
    _LIMITS_DDL = """CREATE TABLE IF NOT EXISTS {limits} (
            name TEXT NOT NULL, slot INTEGER NOT NULL, free_at REAL NOT NULL,
            PRIMARY KEY (name, slot)) WITHOUT ROWID"""
    # Rows without a namespace, which claims adopt: a partial index keeps finding them cheap.
    _UNSCOPED_DDL = (
        "CREATE INDEX IF NOT EXISTS {keys}_unscoped ON {keys} (key) WHERE namespace = ''"
    )
    _QUEUE_INDEX_DDL = (
        "CREATE INDEX IF NOT EXISTS {tasks}_queue_next ON {tasks} "
        "(state, queue, priority DESC, (coalesce(run_at, enqueued_at)), seq)"
    )
    # Places come from a one-row counter that an enqueue moves on by the rows it inserted:
    # SQLite runs one writer at a time, so no two transactions ever draw the same place.
    _PLACE = "(SELECT next FROM {order})"
    _RETRY_PLACE = _PLACE + " + row_number() OVER (ORDER BY seq, id) - 1"
    _DIALECT_SQL = {"advance_places": "UPDATE {order} SET next = next + :count"}
    _HISTORY_DDL = """CREATE TABLE IF NOT EXISTS {history} (
            minute INTEGER NOT NULL, worker TEXT NOT NULL, succeeded INTEGER NOT NULL,
            failed INTEGER NOT NULL, duplicates INTEGER NOT NULL, retries INTEGER NOT NULL,
            latency TEXT NOT NULL, PRIMARY KEY (minute, worker)) WITHOUT ROWID"""
    _DDL = (
        _KEYS_DDL,
        _UNSCOPED_DDL,
        """CREATE TABLE IF NOT EXISTS {tasks} (
            id TEXT PRIMARY KEY NOT NULL, key TEXT NOT NULL, payload TEXT NOT NULL,
            state TEXT NOT NULL, token INTEGER, worker TEXT, lease_expires REAL,
            attempts INTEGER NOT NULL DEFAULT 0, error TEXT, enqueued_at REAL NOT NULL,
            updated_at REAL NOT NULL, priority INTEGER NOT NULL DEFAULT 0, run_at REAL,
            queue TEXT NOT NULL DEFAULT 'default', error_kind TEXT, task_group TEXT,
            timeout_seconds DOUBLE PRECISION, seq INTEGER) WITHOUT ROWID""",
        "CREATE INDEX IF NOT EXISTS {tasks}_ready ON {tasks} (state, enqueued_at)",
        _QUEUE_INDEX_DDL,
        """CREATE TABLE IF NOT EXISTS {workers} (
            name TEXT PRIMARY KEY NOT NULL, info TEXT NOT NULL, started_at REAL NOT NULL,
            seen_at REAL NOT NULL) WITHOUT ROWID""",
        _LIMITS_DDL,
        _HISTORY_DDL,
    )

    def _open(self) -> sqlite3.Connection:
        target = ":memory:" if self.path is None else self.path
        if self.path is not None:
            _prepare_database_file(self.path)
        try:
            conn = sqlite3.connect(
                target, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise ConfigError(f"database {target}: cannot open: {exc}") from None
        try:
            _retry_busy(lambda: self._initialise(conn))
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ConfigError(f"database {target}: {_describe_db_error(exc)}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _initialise(self, conn: sqlite3.Connection) -> None:
        names = self._names
        if not self._create:
            # Checked before anything is written: a reader must leave a stranger's file as it is.
            existing = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            if not {names["keys"], names["tasks"], names["workers"]} <= existing:
                raise ConfigError(f"database {self.path}: holds no task queue")
        if self.path is not None and self._create:
            # Switching to WAL needs a moment of exclusive access; _retry_busy covers a race with
            # another process opening the same new file. A reader leaves the file's journal mode
            # as it is: it reads in any mode, and it must not write.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch to WAL mode (got {mode})")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'full' else 'NORMAL'}")
        existing = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if names["keys"] in existing and self._create:
            # Only an opener that may create migrates: status and purge read an old file as it
            # is (their statements need no namespace column).
            self._migrate_keys(conn)
        if self._create and names["limits"] not in existing:
            # Alone, not with the other DDL, whose indexes an older tasks table cannot take
            # before its later columns are added (below); IF NOT EXISTS makes racing openers safe.
            conn.execute(self._LIMITS_DDL.format(**names))
        if not {names["keys"], names["tasks"], names["workers"]} <= existing:
            # Several processes may create the schema at once: one transaction, retried while
            # busy. An existing schema needs no write lock, so opening never waits for a writer.
            conn.execute("BEGIN IMMEDIATE")
            try:
                for ddl in self._DDL:
                    conn.execute(ddl.format(**names))
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        elif self._create and names["history"] not in existing:
            self._add_history(conn)
        if self._create:
            self._migrate_tasks(conn)
        elif not {"priority", "run_at"} <= self._columns(conn, names["tasks"]):
            self._read_as_legacy()
        keys = names["keys"]
        columns = {row[1] for row in conn.execute(f"PRAGMA table_info({keys})")}
        missing = {"key", "state", "fingerprint", "token", "output", "lease_expires"} - columns
        if missing:
            raise sqlite3.DatabaseError(
                f"table {keys!r} exists with another layout (no {', '.join(sorted(missing))})"
            )
        later = self._missing_columns(conn)
        if later and self._create:
            self._add_columns(conn)
        elif later:
            self._render_sql(later)  # a reader reads the old layout as it is

    def _add_history(self, conn: sqlite3.Connection) -> None:
        """Give a file from before the dashboard's history its table (one write transaction;
        concurrent openers queue on the write lock, and IF NOT EXISTS makes the later ones
        no-ops)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(self._HISTORY_DDL.format(**self._names))
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    @staticmethod
    def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}

    def _migrate_tasks(self, conn: sqlite3.Connection) -> None:
        """Give a tasks table from before delays and priorities its ``priority`` and ``run_at``
        columns, one from before places its ``seq`` column and counter, and the indexes on
        them, in place (a new table has the columns already).

        One write transaction, as in `_migrate_keys`; a table that has the indexes needs no
        write lock. Old rows get priority 0 and no due time: they are ready, in the old order
        (their places follow their enqueue time, then their id, as the old take did).
        """
        tasks, order = self._names["tasks"], self._names["order"]
        wanted = {f"{tasks}_next", f"{tasks}_delayed", order}
        fields = {**self._names, "real": "REAL", "take_index": f"{tasks}_next",
                  "delayed_index": f"{tasks}_delayed"}  # fmt: skip

        def ready() -> bool:
            found = conn.execute("SELECT name FROM sqlite_master WHERE type IN ('index', 'table')")
            return wanted <= {row[0] for row in found}

        if ready():
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not ready():
                columns = self._columns(conn, tasks)
                for column, kind in {**self._SCHEDULE_COLUMNS, "seq": "INTEGER"}.items():
                    if column not in columns:
                        kind = kind.format(**fields)
                        conn.execute(f"ALTER TABLE {tasks} ADD COLUMN {column} {kind}")
                self._number_rows(conn)
                for old in self._OLD_TAKE_INDEXES:
                    conn.execute(f"DROP INDEX IF EXISTS {self._names['keys']}_{old}")
                for ddl in self._SCHEDULE_DDL:
                    conn.execute(ddl.format(**fields))
                if "queue" in columns:  # else _add_columns adds the column and its index
                    conn.execute(self._QUEUE_INDEX_DDL.format(**self._names))
        except BaseException:
            _rollback(conn)
            raise
        conn.execute("COMMIT")

    def _number_rows(self, conn: sqlite3.Connection) -> None:
        """Give the rows without a place one, by enqueue time then id, and make the counter of
        places start after them (inside `_migrate_tasks`'s transaction)."""
        tasks, order = self._names["tasks"], self._names["order"]
        conn.execute(
            f"UPDATE {tasks} SET seq = r.place FROM (SELECT id, "
            f"(SELECT coalesce(max(seq), 0) FROM {tasks}) + row_number() OVER "
            f"(ORDER BY enqueued_at, id) AS place FROM {tasks} WHERE seq IS NULL) AS r "
            f"WHERE {tasks}.id = r.id"
        )
        conn.execute(f"CREATE TABLE IF NOT EXISTS {order} (next INTEGER NOT NULL)")
        conn.execute(
            f"INSERT INTO {order} (next) SELECT coalesce(max(seq), 0) + 1 FROM {tasks} "
            f"WHERE NOT EXISTS (SELECT 1 FROM {order})"
        )

    def _advance_places(self, execute: _Execute, count: int) -> None:
        execute("advance_places", {"count": count})

    def _migrate_keys(self, conn: sqlite3.Connection) -> None:
        """Give a keys table from before namespaces its ``namespace`` column, in place.

        SQLite cannot change a primary key, so the table is copied into the new layout and
        renamed, in one write transaction: concurrent openers queue on the write lock, and the
        first one migrates while the others find the column there. Old rows keep their state and
        output with the namespace ``""``; a claim adopts them (see `Store`).
        """
        keys = self._names["keys"]

        def has_namespace() -> bool:
            return "namespace" in {row[1] for row in conn.execute(f"PRAGMA table_info({keys})")}

        if has_namespace():
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not has_namespace():
                columns = "state, fingerprint, token, output, error, lease_expires, created_at, "
                columns += "updated_at"
                conn.execute(f"ALTER TABLE {keys} RENAME TO {keys}_before_namespaces")
                conn.execute(self._KEYS_DDL.format(keys=keys))
                conn.execute(
                    f"INSERT INTO {keys} (key, namespace, {columns}) "
                    f"SELECT key, '', {columns} FROM {keys}_before_namespaces"
                )
                conn.execute(f"DROP TABLE {keys}_before_namespaces")
                conn.execute(self._UNSCOPED_DDL.format(keys=keys))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        logger.info("database table %s now scopes keys by handler (namespace)", keys)

    def _missing_columns(self, conn: sqlite3.Connection) -> set[tuple[str, str]]:
        """Return the later columns (see `_LATER_COLUMNS`) the database's tables lack."""
        missing = set()
        for table, column in self._LATER_COLUMNS:
            name = self._names[table]
            if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({name})")}:
                missing.add((table, column))
        return missing

    def _add_columns(self, conn: sqlite3.Connection) -> None:
        """Give tables from before named queues (or task groups and timeouts) their later
        columns and index, in place.

        One write transaction: concurrent openers queue on the write lock, the first one adds
        the columns and the others find them there. Old tasks are in the queue ``default``, with
        no group and no timeout of their own.
        """
        conn.execute("BEGIN IMMEDIATE")
        try:
            for table, column in sorted(self._missing_columns(conn)):
                ddl = _LATER_COLUMN_DDL[column].format(default=DEFAULT_QUEUE)
                conn.execute(f"ALTER TABLE {self._names[table]} ADD COLUMN {column} {ddl}")
            conn.execute(self._QUEUE_INDEX_DDL.format(**self._names))
        except BaseException:
            _rollback(conn)
            raise
        conn.execute("COMMIT")
        logger.info("database tables %s now hold named queues", self._names["tasks"])

    def _transaction(self, body: Callable[[_Execute], _T], write: bool = True) -> _T:
        conn = self._conn
        if conn is None:
            raise TaskQueueError(_STORE_CLOSED)
        sql = self._sql

        def execute(name: str, params: Mapping[str, Any] | list[Mapping[str, Any]]) -> Any:
            if isinstance(params, list):  # one statement per row: a function call each here
                return [_BufferedCursor(conn.execute(sql[name], row)) for row in params]
            return conn.execute(sql[name], params)

        # A reader needs no write lock: in WAL mode it never waits for a writer.
        begin = "BEGIN IMMEDIATE" if write else "BEGIN"

        def run() -> _T:
            conn.execute(begin)
            try:
                result = body(execute)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            return result

        with self._lock:
            return _retry_busy(run)

    def _one_statement(self, name: str, params: Mapping[str, Any]) -> _BufferedCursor | None:
        conn = self._conn
        if conn is None:
            raise TaskQueueError(_STORE_CLOSED)
        sql = self._sql[name]
        with self._lock:
            # Fetching every row steps the statement to its end, which commits it.
            return _retry_busy(lambda: _BufferedCursor(conn.execute(sql, params)))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite has already rolled back after some errors (a full disk, an I/O error, a trigger's
    # RAISE(ROLLBACK)); a second ROLLBACK would then fail and hide the error that matters.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _retry_busy(operation: Callable[[], _T]) -> _T:
    # busy_timeout covers most waits, but a few steps (switching the journal mode, a transaction
    # that met a checkpoint) report SQLITE_BUSY at once. Retry them with backoff up to the timeout.
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    delay = 0.001
    while True:
        try:
            return operation()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(_backoff_random.uniform(0, delay))
        delay = min(delay * 2, 0.1)


def _describe_db_error(exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "not a database" in text:
        return "is not a SQLite database"
    if "readonly" in text or "read-only" in text:
        return "cannot be written (read-only)"
    return text


def _prepare_database_file(path: str) -> None:
    """Check that `path` can hold a SQLite database, creating it with mode 0600 if missing.

    Raises:
        ConfigError: the path is a directory, is not a SQLite database, or cannot be written.
    """
    if os.path.isdir(path):
        raise ConfigError(f"database {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"database {path}: folder {parent} does not exist")
    try:
        with open(path, "rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        header = None
    except OSError as exc:
        raise ConfigError(f"database {path}: cannot be read: {exc.strerror or exc}") from None
    if header is None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return  # another process created it a moment ago
        except OSError as exc:
            raise ConfigError(
                f"database {path}: cannot be created: {exc.strerror or exc}"
            ) from None
        os.close(fd)
        os.chmod(path, 0o600)  # whatever the umask
        return
    if header and header != SQLITE_HEADER:
        raise ConfigError(f"database {path}: is not a SQLite database")
    if not os.access(path, os.W_OK) or not os.access(parent, os.W_OK):
        raise ConfigError(f"database {path}: cannot be written")


class PostgresStore(_SqlStore):
    """The contract in PostgreSQL: workers on many machines share one database.

    Tasks are taken with ``FOR UPDATE SKIP LOCKED``, so workers never wait on each other's rows;
    an enqueue sends ``NOTIFY``, so idle workers (``LISTEN`` on their own connection) wake within
    milliseconds instead of polling. A batch of claims, completions (with their queue rows'
    settlements), renewals, releases or settlements is one statement over arrays, committed on
    its own: one round trip whatever its size. A lost connection (a server restart) is reopened with
    backoff for up to `reconnect_seconds`, and the interrupted transaction is run again: a
    transaction is all or nothing, and every write is fenced by a token, so a retry can delay a
    task but never complete one twice. A deadlock or serialization failure is run again at once,
    a few times; any other database error reaches the caller at once. Needs psycopg 3.2 or newer
    (``pip install "psycopg[binary]>=3.2"``).

    Args:
        url: ``postgresql://user@host:port/dbname``; ``?schema=NAME`` (default ``task_queue``)
            selects the schema that holds the tables.
        create: create the schema and tables when missing; False refuses a schema that does not
            hold them (for commands that only read or delete).

    Raises:
        ConfigError: psycopg is missing or too old, the URL or schema is invalid, no server
            answers, or (``create=False``) the schema holds no task queue.
    """

    _TAKE_LOCK = "FOR UPDATE SKIP LOCKED"
    _HISTORY_EXISTS = "SELECT to_regclass(:name) IS NOT NULL"
    _QUEUE_FILTER = "queue = ANY(:queues)"
    _IDS_FILTER = "id = ANY(:ids)"
    # The server's clock, one reading per statement: workers on machines whose clocks disagree
    # still share a rate limit exactly.
    _CLOCK = "extract(epoch FROM statement_timestamp())::float8"
    # Places come from a sequence that steps by _PLACE_BLOCK: a statement draws one value, the
    # first of a block of its own, and numbers its rows within it (a row inserted by an older
    # version takes a block by the column's default). A sequence never waits on another
    # transaction, so concurrent enqueues stay concurrent.
    _PLACE_WITH = "WITH base AS (SELECT nextval('{order}') AS seq) "
    _PLACE = "(SELECT seq FROM base)"
    _RETRY_PLACE = "nextval('{order}')"
    _DDL = (
        "CREATE SCHEMA IF NOT EXISTS {schema}",
        "CREATE SEQUENCE IF NOT EXISTS {order} INCREMENT BY " + str(_PLACE_BLOCK),
        """CREATE TABLE IF NOT EXISTS {keys} (
            key TEXT NOT NULL, namespace TEXT NOT NULL DEFAULT '', state TEXT NOT NULL,
            fingerprint TEXT, token BIGINT NOT NULL, output TEXT, error TEXT,
            lease_expires DOUBLE PRECISION, created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (key, namespace))""",
        """CREATE TABLE IF NOT EXISTS {tasks} (
            id TEXT PRIMARY KEY, key TEXT NOT NULL, payload TEXT NOT NULL, state TEXT NOT NULL,
            token BIGINT, worker TEXT, lease_expires DOUBLE PRECISION,
            attempts INTEGER NOT NULL DEFAULT 0, error TEXT,
            enqueued_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0, run_at DOUBLE PRECISION,
            queue TEXT NOT NULL DEFAULT 'default', error_kind TEXT, task_group TEXT,
            timeout_seconds DOUBLE PRECISION, seq BIGINT NOT NULL DEFAULT nextval('{order}'))""",
        "CREATE INDEX IF NOT EXISTS {tasks_index} ON {tasks} (state, enqueued_at)",
        """CREATE TABLE IF NOT EXISTS {workers} (
            name TEXT PRIMARY KEY, info TEXT NOT NULL, started_at DOUBLE PRECISION NOT NULL,
            seen_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS {limits} (
            name TEXT NOT NULL, slot INTEGER NOT NULL, free_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (name, slot))""",
        """CREATE TABLE IF NOT EXISTS {history} (
            minute BIGINT NOT NULL, worker TEXT NOT NULL, succeeded BIGINT NOT NULL,
            failed BIGINT NOT NULL, duplicates BIGINT NOT NULL, retries BIGINT NOT NULL,
            latency TEXT NOT NULL, PRIMARY KEY (minute, worker))""",
    )
    _QUEUE_INDEX = "tasks_queue_next"
    # Run once the later columns exist (a schema from an older version gets them first).
    _LATER_DDL = (
        "CREATE INDEX IF NOT EXISTS " + _QUEUE_INDEX + " ON {tasks} "
        "(state, queue, priority DESC, (coalesce(run_at, enqueued_at)), seq)",
    )

    # One statement per batch: the rows go in as parallel arrays (unnest), so a batch of any size
    # costs one round trip where one statement per row costs one each. Each keeps the meaning of
    # its per-row twin in _SqlStore._SQL (read those first); callers fall back to the per-row
    # statements for a batch that names a key or task twice, whose rows must act one after the
    # other. Arrays come in key order, and an insert takes its row locks in its input order.
    _SET_SQL = {
        # A chunk of an enqueue: its rows as parallel arrays, in id order (see claim_many), each
        # taking the statement's first place plus its index in submission order.
        "enqueue_set": """
            WITH base AS (SELECT nextval('{order}') AS seq)
            INSERT INTO {tasks} (id, key, payload, queue, state, attempts, enqueued_at,
                updated_at, priority, run_at, task_group, timeout_seconds, seq)
            SELECT v.id, v.key, v.payload, v.queue, 'queued', 0, v.now, v.now, v.priority,
                v.run_at, v.task_group, v.timeout, (SELECT seq FROM base) + v.seq
            FROM unnest(%(ids)s::text[], %(keys)s::text[], %(payloads)s::text[],
                        %(queues)s::text[], %(nows)s::float8[], %(priorities)s::int[],
                        %(run_ats)s::float8[], %(groups)s::text[], %(timeouts)s::float8[],
                        %(seqs)s::bigint[])
                AS v(id, key, payload, queue, now, priority, run_at, task_group, timeout, seq)
            ON CONFLICT (id) DO NOTHING
            RETURNING id
        """,
        # The claims, and the started runs of the durable rows whose keys they win (see "start":
        # `won` holds exactly the keys this statement claimed, in this namespace).
        "claim_set": """
            WITH v AS (
                SELECT * FROM unnest(%(keys)s::text[], %(fps)s::text[], %(tokens)s::bigint[])
                    WITH ORDINALITY AS v(key, fp, token, ord)
            ), won AS (
                INSERT INTO {keys} AS t (key, namespace, state, fingerprint, token,
                    lease_expires, attempts, created_at, updated_at)
                SELECT v.key, %(ns)s, 'in_progress', v.fp, v.token, %(lease)s, 1, %(now)s, %(now)s
                FROM v
                WHERE %(ns)s = ''
                   OR EXISTS (SELECT 1 FROM {keys} WHERE key = v.key AND namespace = %(ns)s)
                   OR NOT EXISTS (SELECT 1 FROM {keys} WHERE key = v.key AND namespace = '')
                ORDER BY v.ord
                ON CONFLICT (key, namespace) DO UPDATE SET
                    state = 'in_progress', token = excluded.token,
                    lease_expires = excluded.lease_expires, updated_at = excluded.updated_at,
                    output = NULL, error = NULL, attempts = t.attempts + 1,
                    fingerprint = coalesce(excluded.fingerprint, t.fingerprint)
                WHERE (t.state = 'failed'
                       OR (t.state = 'in_progress' AND t.lease_expires <= %(now)s)
                       OR (t.state = 'completed' AND t.updated_at <= %(expired)s))
                  AND (excluded.fingerprint IS NULL OR t.fingerprint IS NULL
                       OR t.fingerprint = excluded.fingerprint)
                RETURNING t.key, t.token
            ), started AS (
                UPDATE {tasks} AS q SET attempts = q.attempts + 1
                FROM unnest(%(ids)s::text[], %(entries)s::bigint[]) AS s(id, entry)
                WHERE q.id = s.id AND q.token = s.entry AND q.state = 'running'
                  AND EXISTS (SELECT 1 FROM won WHERE won.key = q.key)
            )
            SELECT key, token FROM won
        """,
        "lookup_set": """
            SELECT key, state, fingerprint, output, error, lease_expires, updated_at, namespace
            FROM {keys} WHERE key = ANY(%(keys)s::text[]) AND namespace = %(ns)s
        """,
        "adopt_set": """
            UPDATE {keys} AS t SET namespace = %(ns)s
            WHERE t.key = ANY(%(keys)s::text[]) AND t.namespace = ''
              AND NOT EXISTS (SELECT 1 FROM {keys} WHERE key = t.key AND namespace = %(ns)s)
        """,
        # Completions, and the durable rows of the keys they complete marked done (see
        # complete_many): one data-modifying statement, so both commit or neither does.
        "complete_set": """
            WITH v AS (
                SELECT * FROM unnest(%(keys)s::text[], %(tokens)s::bigint[], %(outputs)s::text[],
                                     %(calls)s::int[], %(ids)s::text[], %(entries)s::bigint[],
                                     %(entry_calls)s::int[])
                    WITH ORDINALITY AS v(key, token, output, calls, id, entry, entry_calls, ord)
            ), done AS (
                UPDATE {keys} AS k SET state = 'completed', output = v.output, error = NULL,
                    lease_expires = NULL, updated_at = %(now)s, attempts = k.attempts + v.calls
                FROM v WHERE k.key = v.key AND k.token = v.token AND k.state = 'in_progress'
                RETURNING v.ord, v.id, v.entry, v.entry_calls
            ), settled AS (
                UPDATE {tasks} AS q SET state = 'done', error = NULL, lease_expires = NULL,
                    updated_at = %(now)s, error_kind = NULL,
                    attempts = q.attempts + done.entry_calls
                FROM done WHERE q.id = done.id AND q.token = done.entry AND q.state = 'running'
            )
            SELECT ord FROM done
        """,
        "renew_set": """
            UPDATE {keys} AS k SET lease_expires = %(lease)s, updated_at = %(now)s
            FROM unnest(%(keys)s::text[], %(tokens)s::bigint[]) AS v(key, token)
            WHERE k.key = v.key AND k.token = v.token AND k.state = 'in_progress'
        """,
        "release_set": """
            UPDATE {keys} AS k SET state = 'failed', error = v.error, lease_expires = NULL,
                updated_at = %(now)s, attempts = k.attempts + v.calls
            FROM unnest(%(keys)s::text[], %(tokens)s::bigint[], %(errors)s::text[],
                        %(calls)s::int[]) AS v(key, token, error, calls)
            WHERE k.key = v.key AND k.token = v.token AND k.state = 'in_progress'
        """,
        "settle_set": """
            UPDATE {tasks} AS q SET state = v.state, error = v.error, lease_expires = NULL,
                updated_at = %(now)s, error_kind = v.kind, attempts = q.attempts + v.calls,
                token = CASE WHEN v.state = 'queued' THEN NULL ELSE q.token END,
                worker = CASE WHEN v.state = 'queued' THEN NULL ELSE q.worker END
            FROM unnest(%(ids)s::text[], %(tokens)s::bigint[], %(states)s::text[],
                        %(errors)s::text[], %(kinds)s::text[], %(calls)s::int[])
                AS v(id, token, state, error, kind, calls)
            WHERE q.id = v.id AND q.token = v.token AND q.state = 'running'
        """,
        "renew_entries_set": """
            UPDATE {tasks} AS q SET lease_expires = %(lease)s, updated_at = %(now)s
            FROM unnest(%(ids)s::text[], %(tokens)s::bigint[]) AS v(id, token)
            WHERE q.id = v.id AND q.token = v.token AND q.state = 'running'
        """,
    }

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        ttl_seconds: float | None = None,
        reconnect_seconds: float = 60.0,
        create: bool = True,
    ) -> None:
        psycopg = _import_psycopg()
        self._psycopg = psycopg
        self._dsn, schema = _split_schema(url)
        self._secret_url = url  # for `_scrub` only; `url` is what may be shown
        self.url = _redact(url)
        self.schema = schema
        self._channel = f"task_queue_{schema}"
        self._reconnect_seconds = reconnect_seconds
        self._init_common(
            lease_seconds,
            ttl_seconds,
            {"schema": schema, "keys": f"{schema}.idempotency", "tasks": f"{schema}.tasks",
             "tasks_index": "tasks_ready", "workers": f"{schema}.workers",
             "history": f"{schema}.history", "limits": f"{schema}.limits",
             "order": f"{schema}.tasks_order"},
        )  # fmt: skip
        self._listener: Any = None
        self._conn: Any = None
        try:
            self._conn = self._connect()
            if create:
                self._create_schema()
            else:
                self._check_schema()
        except psycopg.Error as exc:
            self.close()
            raise ConfigError(f"database {_redact(url)}: {_scrub(_first_line(exc), url)}") from None
        except ConfigError:
            self.close()
            raise

    def sibling(self) -> PostgresStore:
        """Open another store on this one's database and schema: a connection of its own, so
        that its statements run beside this store's instead of after them.

        Raises:
            ConfigError: the database cannot be used now.
        """
        return PostgresStore(
            self._secret_url,
            lease_seconds=self.lease_seconds,
            ttl_seconds=self.ttl_seconds,
            reconnect_seconds=self._reconnect_seconds,
            create=False,
        )

    def _render_sql(self, missing: Iterable[tuple[str, str]] = ()) -> None:
        super()._render_sql(missing)
        self._sql["notify"] = "SELECT pg_notify(%(channel)s, '')"
        self._sql.update({name: sql.format(**self._names) for name, sql in self._SET_SQL.items()})

    @staticmethod
    def _dialect(sql: str) -> str:
        return re.sub(r"(?<!:):([a-z_]+)", r"%(\1)s", sql)

    @staticmethod
    def _list_param(values: Sequence[str]) -> Any:
        return list(values)  # psycopg sends a text[] array

    def _connect(self) -> Any:
        # Autocommit: a batch written by one statement commits with it, in one round trip
        # (see _statement); every other call opens its transaction explicitly (_transaction).
        return self._psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)

    def _create_schema(self) -> None:
        # DDL on an existing table still locks it (CREATE INDEX IF NOT EXISTS takes a SHARE lock
        # that blocks writers, and can close a deadlock with a claim that writes both tables):
        # a complete schema is only read.
        if self._schema_ready():
            return
        # Several workers may start at once: an advisory lock makes the DDL one at a time.
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.schema,))
            for ddl in self._DDL:
                self._conn.execute(ddl.format(**self._names))
            self._migrate_keys()
            self._migrate_tasks()
            for (table, column), missing in self._later_columns().items():
                if missing:
                    ddl = _LATER_COLUMN_DDL[column].format(default=DEFAULT_QUEUE)
                    self._conn.execute(
                        f"ALTER TABLE {self._names[table]} ADD COLUMN IF NOT EXISTS {column} {ddl}"
                    )
            for ddl in self._LATER_DDL:
                self._conn.execute(ddl.format(**self._names))

    def _migrate_keys(self) -> None:
        """Give a keys table from before namespaces its ``namespace`` column, in place.

        Runs under the schema's advisory lock, so one opener migrates and the others find the
        column there. Old rows get the namespace ``""``, which a claim adopts (see `Store`).
        """
        conn, keys = self._conn, self._names["keys"]
        found = conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'idempotency' AND column_name = 'namespace'",
            (self.schema,),
        ).fetchone()
        if found is None:
            (primary,) = conn.execute(
                "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'p'",
                (keys,),
            ).fetchone()
            conn.execute(f"ALTER TABLE {keys} ADD COLUMN namespace TEXT NOT NULL DEFAULT ''")
            quoted = '"' + primary.replace('"', '""') + '"'
            conn.execute(f"ALTER TABLE {keys} DROP CONSTRAINT {quoted}")
            conn.execute(f"ALTER TABLE {keys} ADD PRIMARY KEY (key, namespace)")
            logger.info("database table %s now scopes keys by handler (namespace)", keys)
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS idempotency_unscoped ON {keys} (key) WHERE namespace = ''"
        )

    def _later_columns(self) -> dict[tuple[str, str], bool]:
        """Return, for each later column (see `_LATER_COLUMNS`), whether the schema lacks it."""
        tables = {"keys": "idempotency", "tasks": "tasks"}
        found = {
            (table, column)
            for table, column in self._conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = %s",
                (self.schema,),
            ).fetchall()
        }
        return {
            (table, column): (tables[table], column) not in found
            for table, column in self._LATER_COLUMNS
        }

    def _migrate_tasks(self) -> None:
        """Give a tasks table from before delays and priorities its ``priority`` and ``run_at``
        columns and the indexes on them, in place, under the schema's advisory lock (see
        `_migrate_keys`). Old rows get priority 0 and no due time: they are ready, in the old
        order."""
        conn, tasks = self._conn, self._names["tasks"]
        for column, kind in self._SCHEDULE_COLUMNS.items():
            kind = kind.format(real="DOUBLE PRECISION")
            conn.execute(f"ALTER TABLE {tasks} ADD COLUMN IF NOT EXISTS {column} {kind}")
        self._number_rows()
        conn.execute(
            "DROP INDEX IF EXISTS "
            + ", ".join(f"{self.schema}.{old}" for old in self._OLD_TAKE_INDEXES)
        )
        fields = {**self._names, "take_index": "tasks_next", "delayed_index": "tasks_delayed"}
        for ddl in self._SCHEDULE_DDL:
            conn.execute(ddl.format(**fields))

    def _number_rows(self) -> None:
        """Give a tasks table from before places its ``seq`` column, its rows places by
        enqueue time then id, and the sequence as the column's default (inside
        `_migrate_tasks`)."""
        conn, tasks, order = self._conn, self._names["tasks"], self._names["order"]
        found = conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = 'tasks' AND column_name = 'seq'",
            (self.schema,),
        ).fetchone()
        if found is not None:
            return
        conn.execute(f"ALTER TABLE {tasks} ADD COLUMN seq BIGINT")
        # nextval runs as the ordered rows come out of the inner query: places in that order.
        conn.execute(
            f"UPDATE {tasks} SET seq = r.place FROM (SELECT id, nextval('{order}') AS place "
            f"FROM (SELECT id FROM {tasks} ORDER BY enqueued_at, id) AS f) AS r "
            f"WHERE {tasks}.id = r.id"
        )
        conn.execute(f"ALTER TABLE {tasks} ALTER COLUMN seq SET DEFAULT nextval('{order}')")
        conn.execute(f"ALTER TABLE {tasks} ALTER COLUMN seq SET NOT NULL")

    def _schema_ready(self) -> bool:
        """Return whether the schema holds every table, index and column of this version."""
        names = [self._names[table] for table in ("keys", "tasks", "workers", "history", "limits")]
        names += [
            f"{self.schema}.{self._names['tasks_index']}",
            f"{self.schema}.idempotency_unscoped",
            f"{self.schema}.{self._QUEUE_INDEX}",
            f"{self.schema}.tasks_next",
            self._names["order"],
            f"{self.schema}.tasks_delayed",
        ]
        with self._conn.transaction():
            found = self._conn.execute(
                "SELECT " + ", ".join(["to_regclass(%s)"] * len(names)) + ", EXISTS (SELECT 1 "
                "FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = 'idempotency' AND column_name = 'namespace')",
                [*names, self.schema],
            ).fetchone()
            later = self._later_columns()
        return None not in found and found[-1] and not any(later.values())

    def _check_schema(self) -> None:
        """Refuse a schema that does not hold the tables (reading must never create them).

        Raises:
            ConfigError: the schema or one of its tables is missing.
        """
        names = [self._names[table] for table in ("keys", "tasks", "workers")]
        with self._conn.transaction():
            found = self._conn.execute(
                "SELECT " + ", ".join(["to_regclass(%s)"] * len(names)), names
            ).fetchone()
        if None in found:
            raise ConfigError(
                f"database {_redact(self.url)}: schema {self.schema!r} holds no task queue "
                "(check the URL's ?schema=; enqueue or a worker creates it)"
            )
        with self._conn.transaction():
            missing = [pair for pair, gone in self._later_columns().items() if gone]
            scheduled = self._conn.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = %s "
                "AND table_name = 'tasks' AND column_name = 'run_at'",
                (self.schema,),
            ).fetchone()
        if missing:
            self._render_sql(missing)  # a reader reads the old layout as it is
        if scheduled is None:
            self._read_as_legacy()

    def _statement(self, name: str, params: Mapping[str, Any]) -> _Cursor:
        """Run one statement as its own transaction: BEGIN and COMMIT cost a round trip each, the
        statement one. A lost connection leaves its outcome as unknown as a lost COMMIT would
        (the statement is atomic either way), and it is run again like a transaction."""
        return self._transaction(lambda execute: execute(name, params), alone=True)

    def _transaction(
        self, body: Callable[[_Execute], _T], write: bool = True, *, alone: bool = False
    ) -> _T:
        psycopg = self._psycopg
        sql = self._sql
        deadline = time.monotonic() + self._reconnect_seconds
        delay = 0.05
        conflicts = 0
        with self._lock:
            while True:
                self._check_open()
                if self._conn is None or self._conn.closed:
                    try:
                        self._conn = self._connect()
                    except psycopg.OperationalError:
                        if time.monotonic() >= deadline:
                            raise
                        time.sleep(_backoff_random.uniform(delay / 2, delay))
                        delay = min(delay * 2, 2.0)
                        continue
                conn = self._conn
                try:
                    scope = contextlib.nullcontext() if alone else conn.transaction()
                    with scope, conn.cursor() as cursor:

                        def execute(
                            name: str, params: Mapping[str, Any] | list[Mapping[str, Any]]
                        ) -> Any:
                            if isinstance(params, list):
                                results = []
                                for row in params:
                                    cursor.execute(sql[name], row)
                                    results.append(_BufferedCursor(cursor))
                                return results
                            cursor.execute(sql[name], params)
                            return _BufferedCursor(cursor)

                        return body(execute)
                except psycopg.OperationalError as exc:
                    # Only a broken connection (server restart, network) is reconnected and run
                    # again for up to reconnect_seconds. A deadlock or serialization failure left
                    # the connection fine and is retried a few times at once; anything else
                    # (a statement timeout, a full disk) is the caller's to see now.
                    if _pg_conflict(exc) and conflicts < PG_CONFLICT_RETRIES:
                        conflicts += 1
                        time.sleep(_backoff_random.uniform(0, 0.01 * conflicts))
                        continue
                    if not _pg_connection_lost(conn, exc):
                        raise
                    logger.warning(
                        "database connection lost (%s); reconnecting",
                        _scrub(_first_line(exc), self._secret_url),
                    )
                    with contextlib.suppress(Exception):
                        conn.close()
                    self._conn = None
                    if time.monotonic() >= deadline:
                        raise

    def _notify(self, execute: _Execute) -> int:
        execute("notify", {"channel": self._channel})
        return 0

    # Batches in one statement each (see _SET_SQL) ---------------------------------------------

    def claim_many(
        self,
        items: Sequence[tuple[str, str | None]],
        namespace: str = "",
        starts: Sequence[tuple[str, int]] | None = None,
    ) -> list[Claim]:
        keys = [key for key, _ in items]
        if not items or len(set(keys)) < len(keys):
            return super().claim_many(items, namespace, starts)
        lease, ttl = self.lease_seconds, self.ttl_seconds
        starts = sorted(starts or ())
        now = time.time()
        first = _new_token_range(len(items))
        params = {"now": now, "lease": now + lease, "expired": now - ttl if ttl else -1e300,
                  "ns": namespace, "ids": [task_id for task_id, _ in starts],
                  "entries": [entry for _, entry in starts]}  # fmt: skip

        def claim_params(indexes: list[int]) -> dict[str, Any]:
            return {**params, "keys": [keys[i] for i in indexes],
                    "fps": [items[i][1] for i in indexes],
                    "tokens": [first + i for i in indexes]}  # fmt: skip

        # The claims commit on their own (the common case: every key won, one round trip). The
        # keys they lost are looked up, and adopted where they need it, in a transaction of
        # their own: no key is in both, so that split changes no answer.
        order = _key_order(keys)
        won: dict[str, int] = dict(self._statement("claim_set", claim_params(order)).fetchall())
        lost = [i for i in order if keys[i] not in won]
        found: dict[str, Any] = {}

        def settle_lost(execute: _Execute) -> tuple[dict[str, int], dict[str, Any]]:
            def lookup(indexes: list[int]) -> dict[str, Any]:
                rows = execute("lookup_set", {"keys": [keys[i] for i in indexes], "ns": namespace})
                return {row[0]: row[1:] for row in rows.fetchall()}

            found = lookup(lost)
            missing = [i for i in lost if keys[i] not in found]
            if not missing:
                return {}, found
            # Keys with a row without a namespace and none in this one (the claim left them
            # alone): adopt those rows, then claim as usual. Rare: an old database.
            execute("adopt_set", {"keys": [keys[i] for i in missing], "ns": namespace})
            adopted = dict(execute("claim_set", claim_params(missing)).fetchall())
            found.update(lookup([i for i in missing if keys[i] not in adopted]))
            return adopted, found

        if lost:
            adopted, found = self._transaction(settle_lost)
            won.update(adopted)
        claims: list[Claim] = []
        for key, fp in items:
            if key in won:
                claims.append(Claim(ClaimState.CLAIMED, token=won[key], lease_expires=now + lease))
            elif key in found:
                claims.append(_lost_claim(fp, found[key]))
            else:  # gone again meanwhile (a purge): in progress, asked again later
                claims.append(Claim(ClaimState.IN_PROGRESS))
        return claims

    def complete_many(
        self,
        items: Sequence[tuple[Any, ...]],
        settle: Sequence[tuple[Any, ...]] | None = None,
    ) -> list[bool]:
        keys = [item[0] for item in items]
        task_ids = [item[1] for item in settle or ()]
        if not items or len(set(keys)) < len(keys) or len(set(task_ids)) < len(task_ids):
            return super().complete_many(items, settle)
        # An item's and a settlement's calls are optional (see _SqlStore.complete_many).
        entries = {index: (task_id, entry, more[0] if more else 0)
                   for index, task_id, entry, *more in settle or ()}  # fmt: skip
        order = _key_order(keys)
        none = (None, None, 0)
        params = {"now": time.time(), "keys": [keys[i] for i in order],
                  "tokens": [items[i][1] for i in order], "outputs": [items[i][2] for i in order],
                  "calls": [items[i][3] if len(items[i]) > 3 else 0 for i in order],
                  "ids": [entries.get(i, none)[0] for i in order],
                  "entries": [entries.get(i, none)[1] for i in order],
                  "entry_calls": [entries.get(i, none)[2] for i in order]}  # fmt: skip
        rows = self._statement("complete_set", params).fetchall()
        written = [False] * len(items)
        for (position,) in rows:
            written[order[position - 1]] = True  # ordinality counts from 1
        return written

    def renew_many(self, claims: Sequence[tuple[str, int]]) -> int:
        keys = [key for key, _ in claims]
        if not claims or len(set(keys)) < len(keys):
            return super().renew_many(claims)
        now = time.time()
        order = _key_order(keys)
        params = {"now": now, "lease": now + self.lease_seconds, "keys": [keys[i] for i in order],
                  "tokens": [claims[i][1] for i in order]}  # fmt: skip
        return self._statement("renew_set", params).rowcount

    def release_many(self, items: Sequence[tuple[Any, ...]]) -> int:
        keys = [item[0] for item in items]
        if not items or len(set(keys)) < len(keys):
            return super().release_many(items)
        order = _key_order(keys)
        params = {"now": time.time(), "keys": [keys[i] for i in order],
                  "tokens": [items[i][1] for i in order],
                  "errors": [_storable_text(items[i][2]) for i in order],
                  "calls": [items[i][3] if len(items[i]) > 3 else 0 for i in order]}  # fmt: skip
        return self._statement("release_set", params).rowcount

    def settle_many(self, items: Sequence[tuple[Any, ...]]) -> int:
        ids = [item[0] for item in items]
        if not items or len(set(ids)) < len(ids):
            return super().settle_many(items)
        rows = [_settlement(item) for item in items]
        order = _key_order(ids)
        states = [rows[i][2].value for i in order]
        params = {"now": time.time(), "ids": [ids[i] for i in order],
                  "tokens": [rows[i][1] for i in order], "states": states,
                  "errors": [_storable_text(rows[i][3]) for i in order],
                  "kinds": [rows[i][4] for i in order],
                  "calls": [rows[i][5] for i in order]}  # fmt: skip

        if EntryState.QUEUED.value not in states:
            return self._statement("settle_set", params).rowcount

        def settle(execute: _Execute) -> int:
            count = execute("settle_set", params).rowcount
            self._notify(execute)  # wake idle workers: there is work for them
            return count

        return self._transaction(settle)

    def renew_tasks(
        self,
        worker: str,
        info: Mapping[str, Any] | None = None,
        entries: Sequence[tuple[str, int]] | None = None,
    ) -> int:
        ids = [task_id for task_id, _ in entries or ()]
        if not entries or len(set(ids)) < len(ids):
            return super().renew_tasks(worker, info, entries)
        now = time.time()
        order = _key_order(ids)
        params = {"worker": worker, "lease": now + self.lease_seconds, "now": now,
                  "info": json.dumps(dict(info or {})), "ids": [ids[i] for i in order],
                  "tokens": [entries[i][1] for i in order]}  # fmt: skip

        def renew(execute: _Execute) -> int:
            execute("heartbeat", params)
            return execute("renew_entries_set", params).rowcount

        return self._transaction(renew)

    def _enqueue_chunk(self, execute: _Execute, rows: list[dict[str, Any]]) -> int:
        # One statement per ENQUEUE_CHUNK rows instead of one round trip per row: the rows as
        # arrays (`enqueue_set`), returning the ids it inserted. Only the rows it left alone
        # (stored before, or repeated in the chunk) are checked, one by one.
        # The chunks follow the submission order, so each one's block of places comes after
        # the previous one's; within a chunk, rows are inserted in id order (see claim_many)
        # and each takes its place by its index in the submission order.
        added = 0
        size = min(ENQUEUE_CHUNK, _PLACE_BLOCK)  # a chunk's places stay within its block
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            chunk = [{**part[index], "seq": index}
                     for index in _key_order([row["id"] for row in part])]  # fmt: skip
            if len(chunk) == 1:
                added += super()._enqueue_chunk(execute, chunk)
                continue
            # One fixed statement whatever the chunk's size: psycopg parses it once, where a
            # VALUES tuple per row made it parse thousands of placeholders per chunk.
            params = {
                name: [row[field] for row in chunk]
                for name, field in (
                    ("ids", "id"), ("keys", "key"), ("payloads", "payload"), ("queues", "queue"),
                    ("nows", "now"), ("priorities", "priority"), ("run_ats", "run_at"),
                    ("groups", "task_group"), ("timeouts", "timeout"), ("seqs", "seq"),
                )
            }  # fmt: skip
            inserted = {row[0] for row in execute("enqueue_set", params).fetchall()}
            for row in chunk:
                if row["id"] in inserted:
                    inserted.discard(row["id"])  # a repeat of the id later on is checked
                    added += 1
                else:
                    self._check_same(execute, row)
        return added

    def wait_for_work(self, timeout: float, stop: threading.Event) -> None:
        """Wait for a NOTIFY from an enqueue (or `timeout` seconds) on a listening connection.

        Returns early when `stop` is set or the store is closed meanwhile.

        Raises:
            TaskQueueError: the store is closed.
        """
        psycopg = self._psycopg
        self._check_open()
        try:
            listener = self._listener
            if listener is None or listener.closed:
                listener = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
                listener.execute(f"LISTEN {self._channel}")
                with self._lock:
                    closed = self._closed
                    if not closed:
                        self._listener = listener
                if closed:
                    listener.close()
                    raise TaskQueueError(_STORE_CLOSED)
            # Short slices, so a stop request or a close is seen within a quarter second.
            deadline = time.monotonic() + timeout
            while not stop.is_set() and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                for _ in listener.notifies(timeout=min(remaining, 0.25), stop_after=1):
                    return
        except psycopg.Error:
            if self._closed:
                return  # close() shut the listener under our feet
            with contextlib.suppress(Exception):
                self._listener.close()
            self._listener = None
            stop.wait(min(timeout, 1.0))

    def drop_schema(self) -> None:
        """Drop the schema and everything in it (tests use one schema per run)."""
        self._sql["drop"] = f"DROP SCHEMA IF EXISTS {self.schema} CASCADE"
        self._transaction(lambda execute: execute("drop", {}))

    def close(self) -> None:
        """Close both connections; later calls raise `TaskQueueError` (closing twice is fine)."""
        # Set before taking the lock, so a transaction waiting out a reconnect stops at once.
        self._closed = True
        with self._lock:
            for conn in (self._conn, self._listener):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            self._conn = self._listener = None


def _import_psycopg() -> Any:
    """Import psycopg, refusing a version older than the store needs.

    Raises:
        ConfigError: psycopg is missing or too old.
    """
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            "a postgresql:// database needs psycopg 3.2 or newer: "
            "pip install 'psycopg[binary]>=3.2'"
        ) from None
    found = tuple(int(part) for part in re.findall(r"\d+", psycopg.__version__)[:2])
    if found < PSYCOPG_MIN_VERSION:
        raise ConfigError(
            f"a postgresql:// database needs psycopg 3.2 or newer, found {psycopg.__version__}: "
            "pip install -U 'psycopg[binary]>=3.2'"
        )
    return psycopg


def _pg_conflict(exc: BaseException) -> bool:
    # 40001 serialization_failure, 40P01 deadlock_detected: the transaction was rolled back and
    # running it again is the documented remedy.
    return getattr(exc, "sqlstate", None) in ("40001", "40P01")


def _pg_connection_lost(conn: Any, exc: BaseException) -> bool:
    # Class 08 (connection exception) and 57P01-57P03 (the server shut down or is starting), or
    # an error raised by the client itself (no SQLSTATE) that left the connection unusable.
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is not None:
        return sqlstate.startswith("08") or sqlstate in ("57P01", "57P02", "57P03")
    return bool(conn.closed or getattr(conn, "broken", False))


def _database_errors() -> tuple[type[BaseException], ...]:
    """Return the base exception classes of the database drivers loaded so far."""
    psycopg = sys.modules.get("psycopg")
    return (sqlite3.Error,) if psycopg is None else (sqlite3.Error, psycopg.Error)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Query parameters of a database URL whose value is a credential (libpq takes ``?password=``).
_SECRET_PARAMETERS = frozenset(
    {"password", "passwd", "pwd", "pass", "secret", "token", "sslpassword", "api_key", "apikey"}
)
_REDACTED = "***"


def _url_secrets(url: str) -> list[str]:
    """Return the credentials `url` carries, longest first (a secret that holds another is
    replaced whole): its password and secret query values, as written and decoded, and every
    reading of the password that a parser cutting it at ``?``, ``#``, ``/`` or ``@`` could make."""
    found: set[str] = set()
    pieces: set[str] = set()
    span = _password_span(url)
    if span is not None:
        password = url[span[0] : span[1]]
        found.add(password)
        # libpq ends the userinfo at the first "@", urllib at the first "?" or "#": the pieces
        # either one may echo back (a host of "ss@127.0.0.1" when the password is "pa@ss").
        pieces.update(_URL_DELIMITER.split(password))
        pieces.update(password[: match.start()] for match in _URL_DELIMITER.finditer(password))
    for piece in _query_of(url, span).split("&"):
        name, equals, value = piece.partition("=")
        if equals and urllib.parse.unquote_plus(name).strip().lower() in _SECRET_PARAMETERS:
            found.add(value)
            pieces.add(value.partition("#")[0])  # what a parser that knows fragments reads
    # A piece of one or two characters would mask every such letter pair of a message.
    found |= {piece for piece in pieces if len(piece) > 2}
    found |= {urllib.parse.unquote_plus(secret) for secret in found}
    found.discard("")
    return sorted(found, key=len, reverse=True)


# Where a URL parser may end a userinfo or a query value.
_URL_DELIMITER = re.compile(r"[?#/@&]")


def _password_span(url: str) -> tuple[int, int] | None:
    """Return where the password of ``scheme://user:password@host...`` lies in `url`, or None.

    The user runs to the first ``:`` and holds none of ``/?#``; the password runs from there to
    the last ``@`` of the whole URL. A password may hold ``?``, ``#``, ``/`` and ``@`` unescaped
    (malformed, but it must not be shown), so where the text allows two readings, the one that
    masks more is taken: an ``@`` in the query of a URL with a port masks up to that ``@``.
    """
    scheme_end = url.find("://")
    if scheme_end < 0:
        return None
    start = scheme_end + 3
    colon = url.find(":", start)
    at = url.rfind("@", start)
    if colon < 0 or at < colon or any(c in url[start:colon] for c in "/?#"):
        return None
    return colon + 1, at


def _query_of(url: str, span: tuple[int, int] | None) -> str:
    """Return the query of `url` (after the userinfo), fragment included: libpq reads no
    fragment, so a ``#`` inside a ``?password=`` value belongs to that value."""
    rest = url[span[1] :] if span is not None else url
    return rest.partition("?")[2]


def _redact(url: str) -> str:
    """Return `url` with its password and every secret query parameter replaced by ``***``.

    Everything the module prints, logs or puts in an error or a repr goes through here (or
    `_scrub`); it never raises, whatever the text.
    """
    span = _password_span(url)
    head, rest = (url[: span[0]] + _REDACTED, url[span[1] :]) if span is not None else ("", url)
    before, question, query = rest.partition("?")
    if not question:
        return head + rest
    pieces = []
    for piece in query.split("&"):
        name, equals, _ = piece.partition("=")
        if equals and urllib.parse.unquote_plus(name).strip().lower() in _SECRET_PARAMETERS:
            piece = f"{name}={_REDACTED}"
        pieces.append(piece)
    return head + before + question + "&".join(pieces)


def _scrub(text: str, url: str) -> str:
    """Return `text` (say, a driver's error message) with every credential of `url` masked."""
    for secret in _url_secrets(url):
        text = text.replace(secret, _REDACTED)
    # A piece of one or two characters is masked only beside a neighbour it has in the URL
    # ('"ss@127.0.0.1"' for the password "pa?ss"), not as every such pair of letters.
    for piece, before, after in _short_pieces(url):
        pattern = (
            f"(?<={re.escape(before)}){re.escape(piece)}|{re.escape(piece)}(?={re.escape(after)})"
        )
        text = re.sub(pattern, _REDACTED, text)
    return text


def _short_pieces(url: str) -> list[tuple[str, str, str]]:
    """Return the pieces of one or two characters of `url`'s password between delimiters, each
    with the characters before and after it in the URL."""
    span = _password_span(url)
    if span is None:
        return []
    found = []
    start = span[0]
    for match in _URL_DELIMITER.finditer(url, span[0], span[1] + 1):
        if 0 < match.start() - start <= 2:
            found.append((url[start : match.start()], url[start - 1], match.group()))
        start = match.end()
    return found


def _split_schema(url: str) -> tuple[str, str]:
    """Split ``?schema=NAME`` off a PostgreSQL URL; validate the name.

    Raises:
        ConfigError: the schema name is not a valid SQL identifier.
    """
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schema = "task_queue"
    rest = []
    for name, value in query:
        if name == "schema":
            schema = value
        else:
            rest.append((name, value))
    if not IDENTIFIER_PATTERN.fullmatch(schema):
        raise ConfigError(
            f"database {_redact(url)}: schema {_shown(schema)} is not a valid identifier"
        )
    # libpq decodes %20 but not "+": quote spaces the way it reads them (options=-c%20a%3Db).
    query_text = urllib.parse.urlencode(rest, quote_via=urllib.parse.quote)
    dsn = urllib.parse.urlunsplit(parts._replace(query=query_text))
    return dsn, schema.lower()


def open_store(
    url: str | os.PathLike[str] | None,
    *,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ttl_seconds: float | None = None,
    durability: str = DEFAULT_DURABILITY,
    create: bool = True,
) -> Store:
    """Open the store a URL names.

    ``None``, ``:memory:`` or ``sqlite:///:memory:``: a private in-memory SQLite database;
    ``memory://``: `MemoryStore`; ``postgresql://...`` or ``postgres://...``: `PostgresStore`;
    ``sqlite:///PATH`` or a plain path: `SqliteStore` on that file.

    Args:
        create: create the database (file, schema, tables) when missing. False opens only a
            database that exists and holds a task queue, and refuses the in-memory ones, which
            hold nothing in a new process: for commands that only read or delete.

    Raises:
        ConfigError: the database cannot be used (see each store).
        ValueError: an argument is out of range.
    """
    if durability not in DURABILITY_MODES:
        raise ValueError(f"durability must be one of {DURABILITY_MODES}, not {durability!r}")
    text = MEMORY_DATABASE if url is None else os.fspath(url)
    if text == "memory://":
        if not create:
            raise ConfigError(f"database {text} is new and empty in every process")
        return MemoryStore(lease_seconds=lease_seconds, ttl_seconds=ttl_seconds)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(
            text, lease_seconds=lease_seconds, ttl_seconds=ttl_seconds, create=create
        )
    if text.startswith("sqlite://"):
        text = text.removeprefix("sqlite:///") if text.startswith("sqlite:///") else ""
        if not text:
            raise ConfigError(f"database {_redact(os.fspath(url))}: write sqlite:///PATH")  # type: ignore[arg-type]  # not None: text came from it
    elif "://" in text:
        raise ConfigError(
            f"database {_redact(text)}: unknown scheme (use a path, sqlite:///PATH, memory:// or "
            "postgresql://...)"
        )
    return SqliteStore(text, lease_seconds=lease_seconds, ttl_seconds=ttl_seconds,
                       durability=durability, create=create)  # fmt: skip


# Databases that live in one process's memory: nothing enqueued there could reach a worker.
_MEMORY_DATABASES = (MEMORY_DATABASE, f"sqlite:///{MEMORY_DATABASE}", "memory://")


def enqueue(
    tasks: Iterable[Task],
    *,
    db: str | os.PathLike[str],
    queue: str = DEFAULT_QUEUE,
    delay: float = 0.0,
    priority: int = 0,
    durability: str = DEFAULT_DURABILITY,
) -> int:
    """Persist tasks in the durable queue of `db`, all or nothing; return how many were new.

    The code form of ``task-queue enqueue``, with the same statements: the iterable (a list or
    a generator of any length) is read `ENQUEUE_CHUNK` tasks at a time inside one transaction,
    so memory stays flat, and a task the database refuses leaves the queue as it was. An id
    already stored with the same key and payload is left alone (not counted as new).

    Args:
        tasks: the `Task` objects to enqueue.
        db: a SQLite path (or ``sqlite:///PATH``) or a ``postgresql://`` URL, as ``--db``.
        queue: the queue of the tasks.
        delay: seconds from now before the tasks may start (a finite number >= 0).
        priority: among ready tasks, a higher one starts first (-1000 to 1000).
        durability: "normal" or "full" (SQLite; see `IdempotencyManager`).

    Raises:
        TaskConflictError: an id is stored with another key or payload; nothing was enqueued.
        ConfigError: `db` cannot be used, or is an in-memory database no worker could see.
        TypeError: an item is not a `Task`, or `delay` or `priority` is not a number;
            nothing was enqueued.
        ValueError: `queue`, `delay`, `priority` or `durability` is invalid.
    """
    _check_queue_name(queue, "queue")
    _schedule_one(delay, priority, 0.0)  # checked before anything is opened
    if os.fspath(db) in _MEMORY_DATABASES:
        raise ConfigError(
            f"database {os.fspath(db)!r} lives in this process's memory only; the durable queue "
            "needs a file or a postgresql:// URL"
        )
    store = open_store(db, durability=durability)
    try:
        assert isinstance(store, _SqlStore)  # the in-memory databases are refused above
        return store._enqueue_stream(tasks, queue, delay, priority)  # noqa: SLF001  # enqueue_tasks is its public face
    finally:
        store.close()


# --- Idempotency ---------------------------------------------------------------------------------


def _check_key(key: Any) -> str:
    """Return `key` if every store can keep it as an idempotency key (see `_text_problem`).

    Checked before a store is touched, so that a bad key gets the same answer from every store
    instead of whatever its driver makes of it.

    Raises:
        ValueError: `key` is not a non-empty string every store can keep; the error names it.
    """
    problem = _text_problem(key)
    if problem is not None:
        raise ValueError(f"idempotency key {key!r} {problem}")
    return cast(str, key)  # a str: _text_problem checked it


def _check_fingerprint(fp: Any) -> str | None:
    """Return `fp` if it is None or a fingerprint every store can keep; else raise ValueError."""
    if fp is not None and _text_problem(fp) is not None:
        raise ValueError(f"fingerprint {fp!r} {_text_problem(fp)}")
    return cast("str | None", fp)  # a str or None: _text_problem checked it


def _check_token(token: Any) -> int:
    """Return `token` if every store can compare it (a 64-bit signed int); else ValueError.

    A token no claim returned is no error: it owns nothing, and the call answers as stale.
    """
    if isinstance(token, bool) or not isinstance(token, int) or not -(2**63) <= token < 2**63:
        raise ValueError(f"token must be a 64-bit integer, not {token!r}")
    return token


def _check_key_namespace(namespace: Any) -> str:
    """Return `namespace` if it is ``""`` (no handler) or text every store can keep."""
    if namespace != "" and _text_problem(namespace) is not None:
        raise ValueError(f"namespace {namespace!r} {_text_problem(namespace)}")
    return cast(str, namespace)  # "" or a str _text_problem checked


class IdempotencyManager:
    """Deduplicate by idempotency key: the claim protocol over a `Store`.

    A key is ``in_progress`` (claimed, with a lease and a fencing token), ``completed`` (with the
    cached JSON output) or ``failed`` (released; claimable again). A claim is one atomic upsert:
    it inserts the key, or takes over a failed or lease-expired row, or changes nothing. Every
    later call of the owner carries the token, so an owner whose lease ran out and was taken over
    writes nothing. Thread-safe; a context manager that closes the store.

    Keys are scoped by a namespace, the handler that owns them (`WorkerPool` passes its own):
    ``claim`` and ``mark_processed`` take it as ``namespace=`` (default ``""``, no handler), while
    ``is_processed``, ``get_cached_output`` and ``lookup`` answer for a key whichever handler
    completed it.

    Args:
        path: a SQLite file, or a store URL (`open_store`); None for a private in-memory SQLite
            database.
        lease_seconds: how long a claim stays owned without renewal.
        ttl_seconds: completed and failed rows older than this are forgotten (None: kept forever).
        durability: "normal" survives a process crash; "full" syncs every commit (power loss).
        table: the SQLite table name, validated as an SQL identifier.
        store: an open store to use instead of `path` (not closed by `close`).

    Raises:
        ConfigError: the database cannot be used.
        ValueError: an argument is out of range.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        ttl_seconds: float | None = None,
        durability: str = DEFAULT_DURABILITY,
        table: str = "idempotency",
        store: Store | None = None,
    ) -> None:
        if store is None:
            text = None if path is None else os.fspath(path)
            if text is not None and "://" in text:
                store = open_store(text, lease_seconds=lease_seconds, ttl_seconds=ttl_seconds,
                                   durability=durability)  # fmt: skip
            else:
                store = SqliteStore(text, lease_seconds=lease_seconds, ttl_seconds=ttl_seconds,
                                    durability=durability, table=table)  # fmt: skip
            self._owns_store = True
        else:
            self._owns_store = False
        self.store = store
        self.path = None if path is None else os.fspath(path)
        self.durability = durability
        self._closed = False

    @property
    def lease_seconds(self) -> float:
        return self.store.lease_seconds

    @property
    def ttl_seconds(self) -> float | None:
        return self.store.ttl_seconds

    def _check_open(self) -> Store:
        if self._closed:
            raise TaskQueueError("the idempotency store is closed")
        return self.store

    # Safe protocol ------------------------------------------------------------------------------

    def claim(self, key: str, fingerprint: str | None = None, *, namespace: str = "") -> Claim:
        """Try to take ownership of `key` in `namespace`.

        Returns:
            A `Claim` whose state is "claimed" (with a fencing token), "completed" (with the cached
            output), "in_progress" (another owner's lease is live) or "conflict" (the key was
            first used with another fingerprint).

        Raises:
            ValueError: the key, fingerprint or namespace cannot be stored (nothing is touched).
        """
        return self.claim_many([(key, fingerprint)], namespace=namespace)[0]

    def claim_many(
        self,
        items: Iterable[tuple[str, str | None]],
        *,
        namespace: str = "",
        starts: Sequence[tuple[str, int]] | None = None,
    ) -> list[Claim]:
        """Claim many keys in one transaction; the answers come in the order of `items`.

        Args:
            items: ``(key, fingerprint)`` pairs.
            namespace: the handler that owns the keys (``""``: none).
            starts: ``(task_id, entry_token)`` of the durable-queue rows about to run for these
                keys: in the same transaction, each row whose key this call claims counts a
                started run (see `Store`).

        Raises:
            ValueError: a key, fingerprint or the namespace cannot be stored (nothing is touched).
        """
        items = [(_check_key(key), _check_fingerprint(fp)) for key, fp in items]
        namespace = _check_key_namespace(namespace)
        if not starts:  # a store written before `starts` keeps working where none are counted
            return self._check_open().claim_many(items, namespace)
        return self._check_open().claim_many(items, namespace, starts=starts)

    def complete(self, key: str, token: int, output: Any) -> bool:
        """Store `output` for a key you own and mark it completed; committed before returning.

        Returns:
            False, writing nothing, when `token` is stale (the key was claimed by someone else).

        Raises:
            TypeError, ValueError: `output` is not JSON-serialisable, or the key or token is
                invalid (nothing is touched).
        """
        _check_key(key)
        _check_token(token)
        text = _encode_output(output)
        return self._check_open().complete_many([(key, token, text)])[0]

    def complete_many(
        self,
        items: Iterable[tuple[str, int, str] | tuple[str, int, str, int]],
        *,
        settle: Sequence[tuple[int, str, int] | tuple[int, str, int, int]] | None = None,
    ) -> list[bool]:
        """Complete many owned keys in one transaction (group commit).

        Args:
            items: ``(key, token, output_json)`` triples, the output already JSON text; a fourth
                element, the run's retries (handler calls after its first), adds to the key's
                attempts.
            settle: ``(index, task_id, entry_token[, retries])`` of durable-queue rows to mark
                done in the same transaction, each only if the completion of ``items[index]`` was
                written.

        Returns:
            For each item, whether it was written (False: a stale token, nothing written).

        Raises:
            ValueError: a key or token is invalid, or an output is not text (nothing is touched).
        """
        items = list(items)
        for key, token, text, *_ in items:
            _check_key(key)
            _check_token(token)
            if not isinstance(text, str):
                raise ValueError(f"the output of key {key!r} must be JSON text, not {text!r}")
        if settle:
            return self._check_open().complete_many(items, settle)
        return self._check_open().complete_many(items)

    def renew(self, key: str, token: int) -> bool:
        """Extend the lease of a key you own; False when the token is stale."""
        return self.renew_many([(key, token)]) == 1

    def renew_many(self, claims: Iterable[tuple[str, int]]) -> int:
        """Extend the leases of many owned keys in one transaction; return how many were renewed."""
        claims = [(_check_key(key), _check_token(token)) for key, token in claims]
        return self._check_open().renew_many(claims)

    def release(self, key: str, token: int, error: str | None = None, *, retries: int = 0) -> bool:
        """Give up a key you own: it becomes claimable again and counts as failed until then.

        `retries` (handler calls of this run after its first) add to the key's attempts.
        """
        _check_key(key)
        _check_token(token)
        if error is not None and not isinstance(error, str):
            raise ValueError(f"error must be a string or None, not {error!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a non-negative integer, not {retries!r}")
        return self._check_open().release_many([(key, token, error, retries)]) == 1

    def release_many(self, items: Iterable[tuple[str, int, str | None]]) -> int:
        """Give up many owned keys in one transaction, each ``(key, token, error)`` as `release`
        gives up one; return how many were released (a stale token releases nothing)."""
        rows: list[tuple[str, int, str | None, int]] = []
        for key, token, error in items:
            _check_key(key)
            _check_token(token)
            if error is not None and not isinstance(error, str):
                raise ValueError(f"error must be a string or None, not {error!r}")
            rows.append((key, token, error, 0))
        return self._check_open().release_many(rows) if rows else 0

    def live_claims(self, namespace: str = "") -> list[tuple[int, float]]:
        """Return ``(token, lease_expires)`` of the live claims of `namespace` (and of keys that
        belong to no handler)."""
        return self._check_open().live_claims(_check_key_namespace(namespace))

    def lookup(self, key: str, *, namespace: str | None = None) -> dict[str, Any] | None:
        """Return the stored row of `key` as a dict, or None.

        With ``namespace=None`` the row of any handler, a completed one first.
        """
        _check_key(key)
        if namespace is not None:
            _check_key_namespace(namespace)
        return self._check_open().lookup(key, namespace)

    def get(self, key: str, *, namespace: str | None = None) -> KeyState | None:
        """Return what became of `key`, or None when no handler has taken it.

        With ``namespace=None`` the key of any handler, a completed one first.

        Raises:
            ValueError: the key or namespace cannot be stored (nothing is touched).
        """
        row = self.lookup(key, namespace=namespace)
        if row is None:
            return None
        return KeyState(key=key, state=row["state"], output=row["output"], error=row["error"],
                        attempts=row["attempts"], updated_at=row["updated_at"],
                        namespace=row["namespace"])  # fmt: skip

    # Simple surface -----------------------------------------------------------------------------

    def is_processed(self, key: str) -> bool:
        """Return whether `key` is completed."""
        return self._completed_row(key) is not None

    def _completed_row(self, key: str) -> dict[str, Any] | None:
        """Return the row of `key` if it is completed and not expired, else None (one read)."""
        row = self.lookup(key)
        if row is None or row["state"] != _Row.COMPLETED:
            return None
        ttl = self.store.ttl_seconds
        return row if ttl is None or row["updated_at"] > time.time() - ttl else None

    def mark_processed(self, key: str, output: Any = None, *, namespace: str = "") -> None:
        """Record `key` as completed with `output`, whoever holds it.

        Without a `namespace` the row belongs to no handler yet: the first pool that claims the
        key adopts it, and answers it as a duplicate.

        Raises:
            ValueError: the key or namespace cannot be stored (nothing is touched).
        """
        _check_key(key)
        _check_key_namespace(namespace)
        text = _encode_output(output)
        self._check_open().mark_processed(key, text, namespace)

    def get_cached_output(self, key: str) -> Any:
        """Return the output stored for a completed `key`, or None."""
        # One read: a purge between two reads must not turn a completed key into an error.
        row = self._completed_row(key)
        return None if row is None else row["output"]

    # Housekeeping -------------------------------------------------------------------------------

    def purge_expired(self) -> int:
        """Delete completed and failed rows older than the TTL; return how many went."""
        return self._check_open().purge_expired()

    def stats(self) -> dict[str, int]:
        """Return the row counts: in_progress, completed, failed and total."""
        return self._check_open().stats()

    def close(self) -> None:
        """Close the store (if this manager opened it); later calls raise `TaskQueueError`."""
        if not self._closed:
            self._closed = True
            if self._owns_store:
                self.store.close()

    def __enter__(self) -> IdempotencyManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"IdempotencyManager({_redact(self.store.url)!r})"


# --- Metrics -------------------------------------------------------------------------------------


_log, _ceil = math.log, math.ceil
_HISTOGRAM_MIN, _HISTOGRAM_MAX = 1e-9, 1e6  # seconds; values are clamped to this range


class _Histogram:
    """Fixed-memory log-bucketed histogram; percentiles within `relative_error` of exact ones.

    Bucket ``i`` holds values in ``(gamma ** (i - 1), gamma ** i]`` with ``gamma = (1 + a) / (1 -
    a)``; answering a bucket by ``2 * gamma ** i / (gamma + 1)`` is within ``a`` of every value in
    it (the DDSketch construction). Values are clamped to ``[MIN, MAX]`` seconds, which bounds the
    number of buckets (about 2,000 at 1%) whatever the number of samples. Not thread-safe: the
    collector's lock guards it.
    """

    MIN = _HISTOGRAM_MIN
    MAX = _HISTOGRAM_MAX

    __slots__ = (
        "_buckets",
        "_gamma",
        "_log_gamma",
        "count",
        "max",
        "min",
        "total",
        "zeros",
    )

    def __init__(self, relative_error: float = HISTOGRAM_RELATIVE_ERROR) -> None:
        self._gamma = (1 + relative_error) / (1 - relative_error)
        self._log_gamma = math.log(self._gamma)
        self._buckets: dict[int, int] = {}
        self.count = 0
        self.zeros = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def add(self, value: float) -> None:
        # On every task's path three times: plain comparisons, no builtin calls where one will do.
        if value < 0.0:
            value = 0.0
        self.count += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if value < _HISTOGRAM_MIN:
            self.zeros += 1
            return
        if value > _HISTOGRAM_MAX:
            value = _HISTOGRAM_MAX
        index = _ceil(_log(value) / self._log_gamma)
        buckets = self._buckets
        buckets[index] = buckets.get(index, 0) + 1

    def buckets(self) -> dict[int, int]:
        """Return a copy of the count in each bucket, by bucket index."""
        return dict(self._buckets)

    def percentile(self, p: float) -> float:
        """Return the nearest-rank `p`-th percentile (0 <= p <= 100), 0.0 when empty."""
        if not self.count:
            return 0.0
        # Rounding first keeps float noise (0.07 * 100 = 7.000000000000001) off the rank.
        rank = max(1, math.ceil(round(p * self.count / 100, 9)))
        if rank <= self.zeros:
            return 0.0
        seen = self.zeros
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                estimate = 2 * self._gamma**index / (self._gamma + 1)
                return min(max(estimate, self.min), self.max)
        return self.max

    def summary_ms(self) -> dict[str, float | int]:
        mean = self.total / self.count if self.count else 0.0
        return {
            "count": self.count,
            "mean": round(mean * 1000, 4),
            "p50": round(self.percentile(50) * 1000, 4),
            "p95": round(self.percentile(95) * 1000, 4),
            "p99": round(self.percentile(99) * 1000, 4),
            "max": round(self.max * 1000, 4),
        }


_SERIES = ("latency", "queue_wait", "service")


class _Totals(NamedTuple):
    """A collector's counters and latency histogram at one moment (see `_History`)."""

    counts: dict[str, int]
    zeros: int  # latencies below the histogram's floor
    total: float  # seconds, every latency summed
    buckets: dict[int, int]  # histogram bucket -> latencies in it


_NO_TOTALS = _Totals(dict.fromkeys(_HISTORY_COUNTS, 0), 0, 0.0, {})


def _coarse_bucket(index: int) -> int:
    """The history bucket of a histogram bucket: HISTORY_BUCKET_SPAN of them merged (ceil)."""
    return -(-index // HISTORY_BUCKET_SPAN)


_HISTORY_GAMMA = (
    (1 + HISTOGRAM_RELATIVE_ERROR) / (1 - HISTOGRAM_RELATIVE_ERROR)
) ** HISTORY_BUCKET_SPAN


def _history_latency(now: _Totals, base: _Totals) -> dict[str, Any]:
    """The latency histogram of what finished between `base` and `now`, in history buckets."""
    buckets: dict[int, int] = {}
    for index, count in now.buckets.items():
        count -= base.buckets.get(index, 0)
        if count:
            coarse = _coarse_bucket(index)
            buckets[coarse] = buckets.get(coarse, 0) + count
    return {
        "zeros": now.zeros - base.zeros,
        "sum": round(now.total - base.total, 6),
        "buckets": {str(index): count for index, count in sorted(buckets.items())},
    }


def _merge_latency(latencies: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge history latency histograms; return count, mean and percentiles in milliseconds.

    Percentiles are nearest-rank over the merged buckets, within about 4% of the exact ones.
    """
    zeros, total = 0, 0.0
    buckets: dict[int, int] = {}
    for latency in latencies:
        zeros += int(latency.get("zeros", 0))
        total += float(latency.get("sum", 0.0))
        for index, count in latency.get("buckets", {}).items():
            buckets[int(index)] = buckets.get(int(index), 0) + int(count)
    count = zeros + sum(buckets.values())
    summary: dict[str, Any] = {
        "count": count,
        "mean": round(total / count * 1000, 3) if count else None,
    }
    for p in (50, 95, 99):
        summary[f"p{p}"] = None
        if not count:
            continue
        rank = max(1, math.ceil(round(p * count / 100, 9)))
        seen = zeros
        value = 0.0
        if rank > seen:
            for index in sorted(buckets):
                seen += buckets[index]
                if seen >= rank:
                    value = 2 * _HISTORY_GAMMA**index / (_HISTORY_GAMMA + 1)
                    break
        summary[f"p{p}"] = round(value * 1000, 3)
    return summary


class Outcome(NamedTuple):
    """One finished submission, as `MetricsCollector.record_outcomes` counts it."""

    status: TaskStatus
    kind: str | None  # the error kind of a failure
    latency: float | None  # seconds, enqueue to finish
    service_time: float | None  # seconds, first start to finish
    started: bool  # a worker had taken it (it leaves in_flight)
    queued: bool  # it was still in the queue (it leaves queue_depth)


def _backlog_summary(backlog: Mapping[str, tuple[int, float | None]] | None) -> dict[str, Any]:
    """The snapshot's store gauges: totals (None until measured) and the figures per queue."""
    if backlog is None:
        return {"backlog": None, "oldest_waiting_seconds": None, "backlog_by_queue": {}}
    ages = [age for _, age in backlog.values() if age is not None]
    return {
        "backlog": sum(count for count, _ in backlog.values()),
        "oldest_waiting_seconds": max(ages) if ages else None,
        "backlog_by_queue": {
            queue: {"backlog": count, "oldest_waiting_seconds": age}
            for queue, (count, age) in sorted(backlog.items())
        },
    }


def _prometheus_label(value: str) -> str:
    # The exposition format escapes exactly these three in a label value.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labelled(
    metric: str, kind: str, help_text: str, label: str, samples: Iterable[tuple[str, Any]]
) -> list[str]:
    """Lines of one labelled metric family; a family without samples is left out."""
    rows = [f'{metric}{{{label}="{_prometheus_label(str(name))}"}} '
            f"{'NaN' if value is None else value}" for name, value in sorted(samples)]  # fmt: skip
    if not rows:
        return []
    return [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}", *rows]


class MetricsCollector:
    """Thread-safe counters and histograms for one pool (or any producer of task events).

    Args:
        workers: the worker count, reported in the snapshot and used for utilization.
        queue_size: the queue bound, reported in the snapshot.
    """

    def __init__(self, workers: int | None = None, queue_size: int | None = None) -> None:
        self.workers = workers
        self.queue_size = queue_size
        self._lock = threading.Lock()  # guards every attribute below
        self._counts = dict.fromkeys(
            (
                "submitted", "succeeded", "failed", "duplicates", "retries", "rejected",
                "cancelled", "in_flight", "queue_depth", "max_queue_depth", "handler_calls",
            ),
            0,
        )  # fmt: skip
        self._failures_by_kind: dict[str, int] = {}
        # The durable store's backlog per queue, as (ready tasks, age in seconds of the oldest
        # waiting one); None until a worker measures it (`record_backlog`).
        self._backlog: dict[str, tuple[int, float | None]] | None = None
        self._busy = 0.0
        self._first_enqueue: float | None = None
        self._last_finish: float | None = None
        self._series = {name: _Histogram() for name in _SERIES}

    # Recording ----------------------------------------------------------------------------------

    def record_enqueue(self, queued: bool = True) -> None:
        """Count an accepted submission; `queued` when it took a queue slot."""
        now = time.perf_counter()
        with self._lock:
            counts = self._counts
            counts["submitted"] += 1
            if self._first_enqueue is None:
                self._first_enqueue = now
            if queued:
                depth = counts["queue_depth"] + 1
                counts["queue_depth"] = depth
                if depth > counts["max_queue_depth"]:
                    counts["max_queue_depth"] = depth

    def record_enqueues(self, queued: int, joined: int) -> None:
        """Count `queued` accepted submissions that took a queue slot and `joined` that joined one
        in flight, as `record_enqueue` counts one."""
        now = time.perf_counter()
        with self._lock:
            counts = self._counts
            counts["submitted"] += queued + joined
            if self._first_enqueue is None:
                self._first_enqueue = now
            depth = counts["queue_depth"] + queued
            counts["queue_depth"] = depth
            if depth > counts["max_queue_depth"]:
                counts["max_queue_depth"] = depth

    def record_queued(self) -> None:
        """Count an accepted submission that took a queue slot after it was counted."""
        with self._lock:
            counts = self._counts
            counts["queue_depth"] += 1
            counts["max_queue_depth"] = max(counts["max_queue_depth"], counts["queue_depth"])

    def record_start(self, queue_wait: float) -> None:
        """Count a task leaving the queue for a worker after `queue_wait` seconds."""
        self.record_starts((queue_wait,))

    def record_starts(self, queue_waits: Iterable[float], dequeued: bool = True) -> None:
        """Count many tasks starting at once, one queue wait (seconds) each.

        Args:
            dequeued: they leave the queue now; False when `record_dequeue` counted that already.
        """
        with self._lock:
            counts = self._counts
            add = self._series["queue_wait"].add
            for wait in queue_waits:
                if dequeued:
                    counts["queue_depth"] -= 1
                counts["in_flight"] += 1
                add(wait)

    def record_dequeue(self, count: int) -> None:
        """Count tasks that a worker took from the queue before starting them."""
        with self._lock:
            # A worker may take a task before its producer records the enqueue: the depth can dip
            # below zero for that moment, and the snapshot shows it as zero.
            self._counts["queue_depth"] -= count

    def record_attempt(self, seconds: float, calls: int = 1) -> None:
        """Count `calls` handler calls that took `seconds` in all (feeds utilization)."""
        with self._lock:
            self._counts["handler_calls"] += calls
            self._busy += seconds

    def record_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        """Count many finished submissions under one lock acquisition."""
        with self._lock:
            for outcome in outcomes:
                self._count_outcome(*outcome)

    def _count_outcome(
        self,
        status: TaskStatus,
        kind: str | None,
        latency: float | None,
        service_time: float | None,
        started: bool,
        queued: bool,
    ) -> None:
        # Called with self._lock held.
        counts = self._counts
        if status is TaskStatus.SUCCEEDED:
            counts["succeeded"] += 1
        elif status is TaskStatus.DUPLICATE:
            counts["duplicates"] += 1
        elif status is TaskStatus.FAILED:
            counts["failed"] += 1
            label = str(kind) if kind is not None else "unknown"
            self._failures_by_kind[label] = self._failures_by_kind.get(label, 0) + 1
        else:
            counts["cancelled"] += 1
        if queued:
            counts["queue_depth"] -= 1
        if started:
            counts["in_flight"] = max(counts["in_flight"] - 1, 0)
        if latency is not None:
            self._series["latency"].add(latency)
        if service_time is not None:
            self._series["service"].add(service_time)
        self._last_finish = time.perf_counter()

    def record_success(
        self, latency: float, service_time: float | None = None, started: bool = True
    ) -> None:
        """Count a success after `latency` seconds; `service_time` runs from first start to end."""
        self.record_outcomes(
            [Outcome(TaskStatus.SUCCEEDED, None, latency, service_time, started, False)]
        )

    def record_failure(
        self,
        kind: str | None = None,
        latency: float | None = None,
        service_time: float | None = None,
        started: bool = True,
    ) -> None:
        """Count a task that failed; `kind` is "transient", "permanent" or "conflict"."""
        self.record_outcomes(
            [Outcome(TaskStatus.FAILED, kind, latency, service_time, started, False)]
        )

    def record_duplicate(self, latency: float | None = None, started: bool = False) -> None:
        """Count a submission answered from an earlier or concurrent run of its key."""
        self.record_outcomes([Outcome(TaskStatus.DUPLICATE, None, latency, None, started, False)])

    def record_cancel(self, queued: bool = True, started: bool = False) -> None:
        """Count a task cancelled before its handler ran.

        Args:
            queued: it was still in the queue (it leaves it).
            started: a worker had taken it (it leaves `in_flight`).
        """
        self.record_outcomes([Outcome(TaskStatus.CANCELLED, None, None, None, started, queued)])

    def record_retry(self) -> None:
        """Count a retry scheduled after a transient failure."""
        with self._lock:
            self._counts["retries"] += 1

    def record_rejection(self) -> None:
        """Count a submission refused by a full queue."""
        with self._lock:
            self._counts["rejected"] += 1

    def record_backlog(self, queues: Mapping[str, tuple[int, float | None]]) -> None:
        """Record the durable store's backlog, replacing the last reading.

        Args:
            queues: per queue, the tasks ready to run there and the age in seconds of the
                oldest of them (None when none waits).
        """
        with self._lock:
            self._backlog = dict(queues)

    # Reading ------------------------------------------------------------------------------------

    def _history_totals(self) -> _Totals:
        """Return the counters the history keeps and the latency histogram, as they stand."""
        with self._lock:
            latency = self._series["latency"]
            # A copy of at most a few thousand ints, taken once per heartbeat, never per task.
            return _Totals(
                {name: self._counts[name] for name in _HISTORY_COUNTS},
                latency.zeros,
                latency.total,
                latency.buckets(),
            )

    def percentile(self, p: float, series: str = "latency") -> float:
        """Return the `p`-th percentile (0-100) of a series, in seconds; 0.0 when empty.

        Raises:
            ValueError: unknown series or `p` outside [0, 100].
        """
        if series not in self._series:
            raise ValueError(f"series must be one of {_SERIES}, not {series!r}")
        if not 0 <= p <= 100:
            raise ValueError(f"percentile must be within [0, 100], not {p!r}")
        with self._lock:
            return self._series[series].percentile(p)

    def snapshot(self) -> dict[str, Any]:
        """Return every counter, rate and latency summary as a JSON-compatible dict."""
        now = time.perf_counter()
        with self._lock:
            counts = dict(self._counts)
            failures_by_kind = dict(self._failures_by_kind)
            backlog = self._backlog
            busy = self._busy
            first, last = self._first_enqueue, self._last_finish
            summaries = {f"{name}_ms": h.summary_ms() for name, h in self._series.items()}
        counts["queue_depth"] = max(counts["queue_depth"], 0)
        running = counts["in_flight"] or counts["queue_depth"]
        if first is None:
            elapsed = 0.0
        elif running or last is None:
            elapsed = now - first
        else:
            elapsed = max(last - first, 0.0)
        finished = counts["succeeded"] + counts["failed"] + counts["duplicates"]
        good = counts["succeeded"] + counts["duplicates"]
        utilization = None
        if self.workers and elapsed > 0:
            utilization = round(busy / (self.workers * elapsed), 4)
        return {
            **counts,
            "workers": self.workers,
            "queue_size": self.queue_size,
            "elapsed_seconds": round(elapsed, 6),
            "throughput_per_second": round(finished / elapsed, 3) if elapsed > 0 else 0.0,
            "success_rate": round(good / finished, 6) if finished else 1.0,
            "utilization": utilization,
            "busy_seconds": round(busy, 6),
            "failures_by_kind": failures_by_kind,
            **_backlog_summary(backlog),
            **summaries,
        }

    _PROMETHEUS_COUNTERS = {
        "submitted": "Submissions accepted.",
        "succeeded": "Tasks whose handler succeeded.",
        "failed": "Tasks that failed for good.",
        "duplicates": "Submissions answered from an earlier or concurrent run of their key.",
        "retries": "Retries scheduled after transient failures.",
        "rejected": "Submissions refused by a full queue.",
        "cancelled": "Tasks cancelled before they ran.",
        "handler_calls": "Handler calls, retries included.",
    }
    _PROMETHEUS_GAUGES = {
        "in_flight": "Tasks started and not finished.",
        "queue_depth": "Tasks waiting in the queue.",
        "max_queue_depth": "Deepest queue seen.",
        "workers": "Worker threads.",
        "queue_size": "Queue bound.",
        "utilization": "Handler time over workers x elapsed time.",
        "throughput_per_second": "Finished tasks per second since the first enqueue.",
    }

    def to_prometheus(self, prefix: str = "task_queue") -> str:
        """Return the metrics in the Prometheus text exposition format (version 0.0.4)."""
        snap = self.snapshot()
        lines = []
        for name, help_text in self._PROMETHEUS_COUNTERS.items():
            lines += [f"# HELP {prefix}_{name}_total {help_text}",
                      f"# TYPE {prefix}_{name}_total counter",
                      f"{prefix}_{name}_total {snap[name]}"]  # fmt: skip
        for name, help_text in self._PROMETHEUS_GAUGES.items():
            value = snap[name]
            lines += [f"# HELP {prefix}_{name} {help_text}", f"# TYPE {prefix}_{name} gauge",
                      f"{prefix}_{name} {'NaN' if value is None else value}"]  # fmt: skip
        lines += _labelled(f"{prefix}_failures_total", "counter",
                           "Tasks that failed for good, by error kind.", "kind",
                           snap["failures_by_kind"].items())  # fmt: skip
        by_queue = snap["backlog_by_queue"].items()
        lines += _labelled(f"{prefix}_backlog", "gauge",
                           "Tasks ready to run in the durable store, by queue.", "queue",
                           [(queue, row["backlog"]) for queue, row in by_queue])  # fmt: skip
        lines += _labelled(f"{prefix}_oldest_waiting_seconds", "gauge",
                           "Age of the oldest task ready to run in the durable store, by queue.",
                           "queue", [(queue, row["oldest_waiting_seconds"])
                                     for queue, row in by_queue])  # fmt: skip
        with self._lock:
            series = {
                name: (h.count, h.total, [(q, h.percentile(q * 100)) for q in (0.5, 0.95, 0.99)])
                for name, h in self._series.items()
            }
        for name, (count, total, quantiles) in series.items():
            metric = f"{prefix}_{name}_seconds"
            lines += [f"# HELP {metric} Task {name.replace('_', ' ')} in seconds.",
                      f"# TYPE {metric} summary"]  # fmt: skip
            lines += [f'{metric}{{quantile="{q}"}} {value:.9g}' for q, value in quantiles]
            lines += [f"{metric}_sum {total:.9g}", f"{metric}_count {count}"]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """Return the snapshot as indented JSON."""
        return json.dumps(self.snapshot(), indent=2, sort_keys=True)

    def export(self, path: str | os.PathLike[str]) -> None:
        """Write the snapshot to `path` as JSON (atomically: a temporary file, then a rename)."""
        target = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(target))
        fd, tmp = tempfile.mkstemp(prefix=".metrics-", suffix=".json", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_json() + "\n")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# --- Processor -----------------------------------------------------------------------------------


def _payload_number(payload: Mapping[str, Any], name: str, default: float) -> float:
    value = payload.get(name, default)
    if not _is_finite_number(value):
        raise PermanentError(f"payload field {name!r} must be a finite number, not {_shown(value)}")
    if value < 0:
        raise PermanentError(f"payload field {name!r} must be >= 0, not {_shown(value)}")
    return value


class TaskProcessor:
    """A stand-in I/O handler: streams real bytes through SHA-256 while sleeping out a latency.

    One call is one attempt. It streams ``payload["size_bytes"]`` bytes (default 0) in chunks of
    `chunk_size` through SHA-256, spreading the task's latency (``payload["latency_ms"]`` or
    `latency_ms`, plus uniform jitter of +-`jitter_ms`) across the chunks with real sleeps, and
    returns ``{"task_id", "bytes", "chunks", "sha256"}``, the same for the same task.

    Faults: each attempt fails at random with `TransientError` (probability
    `transient_error_rate`) or `PermanentError` (`permanent_error_rate`), drawn from a generator
    seeded by `seed`. ``payload["fail"] = "transient"`` fails the first ``payload["fail_times"]``
    (default 1) attempts of that task id; ``"permanent"`` fails every attempt.
    """

    def __init__(
        self,
        latency_ms: float = DEFAULT_LATENCY_MS,
        jitter_ms: float = DEFAULT_JITTER_MS,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        transient_error_rate: float = 0.0,
        permanent_error_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if latency_ms < 0 or jitter_ms < 0:
            raise ValueError("latency_ms and jitter_ms must be >= 0")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size!r}")
        for name, rate in (
            ("transient_error_rate", transient_error_rate),
            ("permanent_error_rate", permanent_error_rate),
        ):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], not {rate!r}")
        if transient_error_rate + permanent_error_rate > 1.0:
            raise ValueError("transient_error_rate + permanent_error_rate must be at most 1")
        self.latency_ms = latency_ms
        self.jitter_ms = jitter_ms
        self.chunk_size = chunk_size
        self.transient_error_rate = transient_error_rate
        self.permanent_error_rate = permanent_error_rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # guards self._rng and self._attempts
        self._attempts: dict[str, int] = {}  # task id -> attempts seen, for payload["fail"]

    def __call__(self, task: Task) -> dict[str, Any]:
        """Run one attempt of `task`.

        Raises:
            TransientError: an injected transient fault.
            PermanentError: an injected permanent fault, or an invalid payload.
        """
        payload = task.payload
        size = _payload_number(payload, "size_bytes", 0)
        if size != int(size):
            raise PermanentError(
                f"payload field 'size_bytes' must be an integer, not {_shown(size)}"
            )
        size = int(size)
        latency = _payload_number(payload, "latency_ms", self.latency_ms) / 1000.0
        fail = payload.get("fail")
        if fail not in (None, "transient", "permanent"):
            raise PermanentError("payload field 'fail' must be 'transient' or 'permanent'")
        draw, jitter = self._draw(task.id, fail is not None)
        if self.jitter_ms:
            latency = max(0.0, latency + jitter * self.jitter_ms / 1000.0)
        result = self._stream(task.id, size, latency)
        self._inject(task, fail, draw)
        return result

    def _draw(self, task_id: str, counts_attempts: bool) -> tuple[float, float]:
        with self._lock:
            draw = self._rng.random()
            jitter = self._rng.uniform(-1.0, 1.0) if self.jitter_ms else 0.0
            if counts_attempts:
                self._attempts[task_id] = self._attempts.get(task_id, 0) + 1
        return draw, jitter

    def _inject(self, task: Task, fail: str | None, draw: float) -> None:
        if fail == "permanent":
            raise PermanentError(f"task {task.id}: injected permanent failure")
        if fail == "transient":
            times = task.payload.get("fail_times", 1)
            with self._lock:
                attempt = self._attempts[task.id]
            if attempt <= times:
                raise TransientError(
                    f"task {task.id}: injected transient failure {attempt}/{times}"
                )
        if draw < self.permanent_error_rate:
            raise PermanentError(f"task {task.id}: random permanent failure")
        if draw < self.permanent_error_rate + self.transient_error_rate:
            raise TransientError(f"task {task.id}: random transient failure")

    def _stream(self, task_id: str, size: int, latency: float) -> dict[str, Any]:
        # The bytes are a function of the task id, so the digest is the same on every attempt.
        seed = hashlib.sha256(task_id.encode()).digest()
        chunk = (seed * (self.chunk_size // len(seed) + 1))[: self.chunk_size]
        view = memoryview(chunk)
        digest = hashlib.sha256()
        chunks = -(-size // self.chunk_size)
        start = time.perf_counter()
        sent = 0
        for index in range(chunks):
            n = min(self.chunk_size, size - sent)
            digest.update(view[:n])
            sent += n
            # Sleep to each chunk's share of the deadline, so the overshoot of one sleep does not
            # add up across chunks.
            _sleep_until(start + latency * (index + 1) / chunks)
        if not chunks and latency > 0:
            _sleep_until(start + latency)
        return {
            "task_id": task_id,
            "bytes": size,
            "chunks": chunks,
            "sha256": digest.hexdigest(),
        }


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


# --- Queue ---------------------------------------------------------------------------------------

_STOP = object()  # the sentinel that ends one worker loop
_live_queues: weakref.WeakSet[TaskQueue] = weakref.WeakSet()  # closed at interpreter exit


class _WorkQueue(queue.Queue[Any]):
    """A `queue.Queue` with priorities that can also take items past its bound (retries, stop
    sentinels).

    Priority 0, the default, lives in the deque `queue.Queue` keeps, as it always did: the path
    without priorities costs nothing more. Other priorities wait in a heap keyed by ``(-priority,
    order)``, so that a higher priority leaves first and equal ones leave in the order they came
    (``order`` counts up for items put at the back, and down for items put at the front). An item
    leaves the heap before the deque's head when its priority is above 0, or when the deque holds
    nothing but stop sentinels; a sentinel leaves last. Both are guarded by ``self.mutex``.

    Items taken out to wait elsewhere may keep their room: `hold` counts one against the bound
    (a task waiting for a rate limit's slot), `put_held` brings it back into that room, and
    `unhold` gives the room up. ``held`` is guarded by ``self.mutex`` too.
    """

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._ranked: list[tuple[int, int, Any]] = []  # heap of (-priority, order, item)
        self._order = itertools.count(1)
        self.held = 0

    def _qsize(self) -> int:
        return len(self.queue) + len(self._ranked)

    def _full(self) -> bool:
        # Called with the mutex held: the waiting items and the held ones fill the bound.
        return self._qsize() + self.held >= self.maxsize

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """`queue.Queue.put`, with the held items counted against the bound."""
        with self.not_full:
            if self.maxsize > 0:
                deadline = None if timeout is None else time.monotonic() + timeout
                while self._full():
                    if not block:
                        raise queue.Full
                    if deadline is None:
                        self.not_full.wait()
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise queue.Full
                    self.not_full.wait(remaining)
            self.queue.append(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def hold(self) -> None:
        """Count one item that left the queue against the bound until `put_held` or `unhold`."""
        with self.mutex:
            self.held += 1

    def reserve(self, count: int) -> int:
        """Hold room for up to `count` items without waiting; return how many rooms it holds.

        `put_reserved` fills them, `unhold` gives back the rooms not used.
        """
        with self.mutex:
            room = self.maxsize - self._qsize() - self.held if self.maxsize > 0 else count
            taken = max(0, min(count, room))
            self.held += taken
            return taken

    def put_reserved(self, items: list[Any]) -> None:
        """Put `items` (priority 0) at the back, in rooms `reserve` held: one wake-up for all."""
        with self.not_empty:  # shares self.mutex
            self.held -= len(items)
            self.queue.extend(items)
            self.unfinished_tasks += len(items)
            self.not_empty.notify(len(items))

    def put_held(self, item: Any, priority: int = 0) -> None:
        """Put a held item back at the front of its priority, in the room it kept."""
        with self.not_empty:  # shares self.mutex: the room passes from held to waiting at once
            self.held -= 1
            if priority:
                heapq.heappush(self._ranked, (-priority, -next(self._order), item))
            else:
                self.queue.appendleft(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def unhold(self, count: int = 1) -> None:
        """Give up the room of `count` held items that will not come back."""
        with self.mutex:
            self.held -= count
            self.not_full.notify(count)

    def _get(self) -> Any:
        ranked = self._ranked
        if ranked:
            waiting = self.queue
            if ranked[0][0] < 0 or not waiting or waiting[0] is _STOP:
                return heapq.heappop(ranked)[2]
        return self.queue.popleft()

    def put_ranked(
        self, item: Any, priority: int, block: bool = True, timeout: float | None = None
    ) -> None:
        """Put `item` with a priority other than 0 as `put` puts an item (waiting for room).

        Raises:
            queue.Full: no room came in time.
        """
        with self.not_full:
            if not block:
                if self._full():
                    raise queue.Full
            elif timeout is None:
                while self._full():
                    self.not_full.wait()
            else:
                deadline = time.monotonic() + timeout
                while self._full():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0.0:
                        raise queue.Full
                    self.not_full.wait(remaining)
            heapq.heappush(self._ranked, (-priority, next(self._order), item))
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def put_unbounded(self, item: Any, *, front: bool = False, priority: int = 0) -> None:
        """Add `item` without waiting for room: at the front, or at the back, of its priority."""
        with self.not_empty:  # shares self.mutex
            if priority:
                order = next(self._order)
                heapq.heappush(self._ranked, (-priority, -order if front else order, item))
            elif front:
                self.queue.appendleft(item)
            else:
                self.queue.append(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def get_many(self, limit: int) -> list[Any]:
        """Wait for an item, then take up to `limit` items at once (a stop sentinel alone)."""
        with self.not_empty:
            while not self.queue and not self._ranked:
                self.not_empty.wait()
            if self._ranked:
                items = self._get_ranked(limit)
            else:
                waiting = self.queue
                items = [waiting.popleft()]
                if items[0] is not _STOP:
                    while len(items) < limit and waiting and waiting[0] is not _STOP:
                        items.append(waiting.popleft())
            self.not_full.notify(len(items))
            return items

    def _get_ranked(self, limit: int) -> list[Any]:
        # Called with the mutex held while the heap holds an item, so the first is no sentinel.
        items: list[Any] = []
        while len(items) < limit and (self._ranked or (self.queue and self.queue[0] is not _STOP)):
            items.append(self._get())
        return items

    def take_back(self, item: Any) -> bool:
        """Remove `item` itself (not an equal one) if it still waits; return whether it did."""
        with self.mutex:
            for index, waiting in enumerate(self.queue):
                if waiting is item:
                    del self.queue[index]
                    self.not_full.notify()
                    return True
            for index, entry in enumerate(self._ranked):
                if entry[2] is item:
                    self._ranked[index] = self._ranked[-1]
                    self._ranked.pop()
                    heapq.heapify(self._ranked)
                    self.not_full.notify()
                    return True
        return False

    def drain(self) -> list[Any]:
        """Remove and return every waiting item, in the order they would have left; stop
        sentinels stay where they are."""
        with self.mutex:
            ranked = sorted(self._ranked, key=lambda entry: entry[:2])
            self._ranked.clear()
            items = [item for item in self.queue if item is not _STOP]
            stops = len(self.queue) - len(items)
            self.queue.clear()
            self.queue.extend([_STOP] * stops)
            self.not_full.notify_all()
        above = [item for key, _, item in ranked if key < 0]
        return above + items + [item for key, _, item in ranked if key > 0]

    def waiting_items(self) -> int:
        """Return how many items wait, stop sentinels not counted."""
        with self.mutex:
            return len(self._ranked) + sum(1 for item in self.queue if item is not _STOP)


class TaskQueue:
    """A bounded queue of waiting items served by `workers` loops on a `ThreadPoolExecutor`.

    Items leave the highest priority first, in the order they came within one (see `submit`).
    Each loop takes an item and calls ``process(item)``; an exception from `process` is logged and
    the loop goes on. At most `maxsize` items wait; `submit` blocks or raises `QueueFullError`
    when the queue stays full.

    With `process_many`, a loop instead takes up to ``batch_limit()`` waiting items at once and
    calls ``process_many(items)``: one wake-up and one hand-off for many small items. `on_stop`
    is called once, by the last worker loop to end.
    """

    def __init__(
        self,
        process: Callable[[Any], Any],
        *,
        maxsize: int = DEFAULT_QUEUE_SIZE,
        workers: int = DEFAULT_WORKERS,
        process_many: Callable[[list[Any]], Any] | None = None,
        batch_limit: Callable[[], int] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        for name, value in (("maxsize", maxsize), ("workers", workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        self._process = process
        self._process_many = process_many
        self._batch_limit = batch_limit or (lambda: 1)
        self._on_stop = on_stop
        self._loops_left = workers  # guarded by self._lock
        self._worker_idents: set[int] = set()
        self.maxsize = maxsize
        self.workers = workers
        self._queue = _WorkQueue(maxsize)
        self._lock = threading.Lock()  # guards _closed and _loops_left: a flag flip, a count
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="task-queue-worker"
        )
        for _ in range(workers):
            self._executor.submit(self._run_loop)
        _live_queues.add(self)

    def submit(
        self, item: Any, block: bool = True, timeout: float | None = None, *, priority: int = 0
    ) -> None:
        """Put `item` in the queue.

        Args:
            block: wait for room (up to `timeout` seconds, None: forever); False raises at once.
            priority: from `MIN_PRIORITY` to `MAX_PRIORITY`; a higher one leaves the queue first,
                equal ones in the order they came.

        Raises:
            QueueFullError: the queue stayed full.
            PoolClosedError: the queue is closed.
            TypeError, ValueError: `priority` is not an integer in range.
        """
        if priority or priority.__class__ is not int:
            _check_priority(priority)
        if self._closed:
            raise PoolClosedError()
        try:
            if priority:
                self._queue.put_ranked(item, priority, block, timeout)
            else:
                self._queue.put(item, block, timeout)
        except queue.Full:
            raise QueueFullError(self.maxsize) from None
        if self._closed and self._queue.take_back(item):
            # close() ran while this put waited: the item may sit behind the stop sentinels.
            raise PoolClosedError()

    def take_back(self, item: Any) -> bool:
        """Remove `item` itself if it still waits in the queue; return whether it did."""
        return self._queue.take_back(item)

    def reserve(self, count: int) -> int:
        """Hold room for up to `count` items without waiting (none once closed); return how
        many rooms it holds (see `_WorkQueue.reserve`)."""
        return 0 if self._closed else self._queue.reserve(count)

    def put_reserved(self, items: list[Any]) -> None:
        """Put `items` in rooms `reserve` held (see `_WorkQueue.put_reserved`)."""
        self._queue.put_reserved(items)

    def put_overflow(self, item: Any, priority: int = 0) -> None:
        """Put `item` at the back of its priority without waiting for room."""
        self._queue.put_unbounded(item, priority=priority)

    def put_ready(self, item: Any, priority: int = 0) -> None:
        """Put `item` at the front of its priority without waiting for room (a due retry)."""
        self._queue.put_unbounded(item, front=True, priority=priority)

    def hold(self) -> None:
        """Keep the room of an item taken out to wait elsewhere (see `_WorkQueue.hold`)."""
        self._queue.hold()

    def put_held(self, item: Any, priority: int = 0) -> None:
        """Put a held item back at the front of its priority, in the room it kept."""
        self._queue.put_held(item, priority)

    def unhold(self, count: int = 1) -> None:
        """Give up the room of `count` held items."""
        self._queue.unhold(count)

    def drain(self) -> list[Any]:
        """Remove and return every item waiting in the queue."""
        return self._queue.drain()

    def qsize(self) -> int:
        """Return the number of waiting items (approximate while others run)."""
        if not self._closed:
            return self._queue.qsize()
        return self._queue.waiting_items()

    @property
    def closed(self) -> bool:
        return self._closed

    def wait_stopped(self) -> None:
        """Wait until every worker loop has ended (after `close`); not from a worker loop."""
        self._executor.shutdown(wait=True)

    def in_worker(self) -> bool:
        """Return whether the calling thread is one of this queue's worker loops."""
        return threading.get_ident() in self._worker_idents

    def _run_loop(self) -> None:
        self._worker_idents.add(threading.get_ident())  # set.add is atomic under the GIL
        try:
            if self._process_many is not None:
                self._run_batch_loop(self._process_many)
            else:
                self._run_item_loop()
        finally:
            with self._lock:
                self._loops_left -= 1
                last = self._loops_left == 0
            if last and self._on_stop is not None:
                self._on_stop()

    def _run_item_loop(self) -> None:
        get = self._queue.get
        process = self._process
        while True:
            item = get()
            if item is _STOP:
                return
            try:
                process(item)
            except BaseException:
                logger.exception("processing %r raised; the worker goes on", item)

    def _run_batch_loop(self, process_many: Callable[[list[Any]], Any]) -> None:
        get_many = self._queue.get_many
        batch_limit = self._batch_limit
        while True:
            items = get_many(batch_limit())
            if items[0] is _STOP:
                return
            try:
                process_many(items)
            except BaseException:
                logger.exception("processing %d items raised; the worker goes on", len(items))

    def close(self, wait: bool = True, cancel_pending: bool = False) -> list[Any]:
        """Stop accepting items and stop the workers once the queue is empty.

        Args:
            wait: block until the workers have stopped.
            cancel_pending: remove the waiting items instead of processing them.

        Returns:
            The items removed without processing (empty unless `cancel_pending`).
        """
        with self._lock:
            first = not self._closed
            self._closed = True
        _live_queues.discard(self)
        removed = self._queue.drain() if cancel_pending else []
        if first:
            for _ in range(self.workers):
                self._queue.put_unbounded(_STOP)
        self._executor.shutdown(wait=wait)
        if wait:
            # A submit that raced with close may have landed behind the sentinels.
            late = self._queue.drain()
            if cancel_pending:
                removed.extend(late)
            else:
                for item in late:
                    self._process(item)
        return removed

    def __enter__(self) -> TaskQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- Flow control --------------------------------------------------------------------------------
#
# Rate limits and the deadlines of attempts. A limit of N calls per period is N slots: a call
# takes a free slot, and the slot is free again a period after the call started, so no window of
# the period ever holds more than N calls (a sliding window, not a token bucket, whose refill
# lets a window hold a burst and a refill: up to 2N). A pool's limits live in this process
# (`_LocalLimiter`) or, when its store is shared by other processes, in the store
# (`_SharedLimiter` over `Store.take_slots`), where every process takes the same slots. A pool
# gives its tasks their slots through one `_Flow`, or through `_NO_FLOW`, its do-nothing twin,
# when no limit is set.


@dataclasses.dataclass(frozen=True, slots=True)
class _Rate:
    """At most `count` calls in any `period` seconds, as written (`text`)."""

    count: int
    period: float
    text: str


_RATE_PATTERN = re.compile(r"\s*([0-9]+)\s*/\s*([smh])\s*")


def _rate_of(value: Any, what: str) -> _Rate:
    """Parse a rate limit such as ``"100/s"``.

    Raises:
        ValueError: `value` is not ``N/s``, ``N/m`` or ``N/h`` with N from 1 to `MAX_RATE_COUNT`;
            the message names `what`.
    """
    match = _RATE_PATTERN.fullmatch(value) if isinstance(value, str) else None
    count = int(match.group(1)) if match and len(match.group(1)) <= 9 else 0
    if not 1 <= count <= MAX_RATE_COUNT:
        raise ValueError(
            f"{what} must be calls per period such as '100/s' (units s, m, h; 1 to "
            f"{MAX_RATE_COUNT:,} calls), not {_shown(value)}"
        )
    assert match is not None
    return _Rate(count, RATE_UNITS[match.group(2)], f"{count}/{match.group(2)}")


def _group_rates(rate_limits: Any, what: str = "rate_limits") -> dict[str, _Rate]:
    """Parse ``{group: "N/unit"}``.

    Raises:
        ValueError: it is not a mapping, a group is no valid group name or a rate is invalid.
    """
    if not isinstance(rate_limits, Mapping):
        raise ValueError(f"{what} must be a mapping of group to rate, not {_shown(rate_limits)}")
    rates = {}
    for group, rate in rate_limits.items():
        problem = _text_problem(group)
        if problem is not None:
            raise ValueError(f"{what}: a group name {problem}, not {_shown(group)}")
        rates[group] = _rate_of(rate, f"{what}[{group!r}]")
    return rates


class _Permit:
    """The right to start one call under one limit: a slot, and when it must be used by."""

    __slots__ = ("limiter", "slot", "use_by")

    def __init__(self, limiter: Any, slot: int, use_by: float) -> None:
        self.limiter = limiter
        self.slot = slot
        self.use_by = use_by  # time.monotonic(); a call started later could break the limit


class _LocalLimiter:
    """A rate limit counted in this process alone.

    Slots sit in a heap by the time they are free again. `acquire` reserves the earliest free
    one; `used` marks it taken from the moment the call starts (plus `RATE_MARGIN` of the
    period), so the time between reserving and calling (a claim) costs nothing; `give_back`
    returns a slot whose call never happened.
    """

    def __init__(self, rate: _Rate) -> None:
        self.rate = rate
        self._reuse = rate.period * (1 + RATE_MARGIN)
        # Its waits are exact (the heap knows when each slot is free): no count of who waits.
        self.start_waiting = self.stop_waiting = lambda: None
        self._lock = threading.Lock()  # guards _free; arithmetic and heap operations only
        self._free: list[tuple[float, int]] = [(0.0, slot) for slot in range(rate.count)]

    def acquire(self) -> _Permit | float:
        """Reserve a slot; return its permit, or the seconds until one may be free."""
        now = time.monotonic()
        with self._lock:
            free = self._free
            if free and free[0][0] <= now:
                return _Permit(self, heapq.heappop(free)[1], math.inf)
            # Every slot reserved and none used yet: they come back within moments.
            wait = free[0][0] - now if free else self._reuse / self.rate.count
        return wait

    reserve = acquire  # before the claim: the slot counts from the call's start (`used`)

    def used(self, permit: _Permit, now: float) -> None:
        with self._lock:
            heapq.heappush(self._free, (now + self._reuse, permit.slot))

    def give_back(self, permit: _Permit) -> None:
        with self._lock:
            heapq.heappush(self._free, (0.0, permit.slot))


class _SharedLimiter:
    """A rate limit that every process sharing the store counts together (`Store.take_slots`).

    One statement reserves a batch of slots: as many as the tasks turned away since the last
    take, plus one (at most `batch`). Reserved slots must be used within `RATE_HOLD_USE` of the
    store's hold (the rest is room for a thread switch before the handler reads the clock), else
    they are dropped: a dropped slot only lowers the rate, and a used one never comes back to
    anyone before a period after its call.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        rate: _Rate,
        batch: int,
        wake: Callable[[Any, int], None],
    ) -> None:
        self.rate = rate
        self._store = store
        self._name = name
        self._batch = max(1, min(batch, rate.count))
        self._wake = wake  # wake(limiter, n): send up to n tasks parked for it back now
        self._hold = min(RATE_HOLD_MAX, max(RATE_HOLD_MIN, RATE_HOLD_SHARE * rate.period))
        self._lock = threading.Lock()  # guards _ready and _waiting; no I/O
        self._take = threading.Lock()  # one take at a time: the others use what it brought
        self._ready: collections.deque[float] = collections.deque()  # use-by of reserved slots
        self._waiting = 0  # tasks parked for this limit: the next take reserves for them too
        self._not_before = 0.0  # monotonic: the last take saw no free slot before then
        self._error_noticed: float | None = None  # when a failing take was last logged

    def reserve(self) -> float | None:
        """Before a claim: None when a slot may be free now, else the seconds until one may."""
        with self._lock:
            wait = self._not_before - time.monotonic()
        return wait if wait > 0 else None

    def start_waiting(self) -> None:
        with self._lock:
            self._waiting += 1

    def stop_waiting(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _pop(self) -> _Permit | None:
        now = time.monotonic()
        with self._lock:
            ready = self._ready
            while ready and ready[0] < now:
                ready.popleft()  # unused in time: dropped
            return _Permit(self, 0, ready.popleft()) if ready else None

    def acquire(self) -> _Permit | float:
        """Reserve a slot (taking a batch from the store when none is left); return its permit,
        or the seconds until enough may be free. Blocks for one statement at most."""
        permit = self._pop()
        if permit is not None:
            return permit
        with self._take:
            permit = self._pop()  # a take that ended meanwhile may have brought some
            if permit is not None:
                return permit
            wait = self.reserve()
            if wait is not None:
                return wait  # the last take found none free before then: no statement now
            with self._lock:
                want = min(self._batch, 1 + self._waiting)
            rate = self.rate
            try:
                taken, wait, base = self._store.take_slots(
                    self._name, rate.count, rate.period, want, self._hold
                )
            except Exception as exc:
                # The store is unreachable: the task waits (a rate is never exceeded by guessing)
                # and a warning says so once a minute.
                now = time.monotonic()
                if self._error_noticed is None or now - self._error_noticed >= 60:
                    self._error_noticed = now
                    logger.warning("taking rate-limit slots failed: %s", _first_line(exc))
                taken, wait, base = 0, _OUTAGE_MAX_BACKOFF / 5, 0.0
            wait = rate.period / rate.count if wait is None else wait + 0.001
            with self._lock:
                self._ready.extend([base + self._hold * RATE_HOLD_USE] * taken)
                self._not_before = 0.0 if taken else time.monotonic() + wait
        permit = self._pop()
        if taken > 1:
            self._wake(self, taken - 1)  # the tasks the other slots were taken for: now
        if permit is not None:
            return permit
        return wait

    def used(self, permit: _Permit, now: float) -> None:
        """A slot's call starts: it was counted when the store reserved it."""

    def give_back(self, permit: _Permit) -> None:
        """A reserved slot goes unused; the store keeps it taken until its time (no statement)."""


class _Flow:
    """The rate limits of one pool: which limits a task's calls count against, and its permits.

    Before a task's key is claimed (`admit`), each of its limits either reserves a slot (a limit
    in this process) or says whether a slot may be free now (a limit in the store, which is only
    taken at the call: a claim can take longer than a reserved slot may wait); a task that must
    wait is parked, holding no claim and no worker. Right before the handler runs (`start`), the
    call takes its remaining slots and spends them all. Retries take new ones: every attempt
    counts.
    """

    def __init__(self, overall: Any, groups: Mapping[str, Any]) -> None:
        self._overall = overall  # the limit of every call, or None
        self._groups = dict(groups)  # group -> its limit

    def _limiters(self, task: Task) -> list[Any]:
        found = [] if self._overall is None else [self._overall]
        group = self._groups.get(task.group) if task.group is not None else None
        if group is not None:
            found.append(group)
        return found

    def _wait(self, job: _Job, limiter: Any, held: list[_Permit], wait: float) -> float:
        """Give back `held` and note that `job` waits for `limiter`; return the wait."""
        for permit in held:
            permit.limiter.give_back(permit)
        job.permits = None
        limiter.start_waiting()
        job.waits_on = limiter
        return wait

    def _stop_waiting(self, job: _Job) -> None:
        if job.waits_on is not None:
            job.waits_on.stop_waiting()
            job.waits_on = None

    def admit(self, job: _Job) -> float | None:
        """Reserve what `job`'s next call needs before its claim; return None, or the seconds
        to wait first."""
        if job.permits is not None:
            return None
        self._stop_waiting(job)
        held: list[_Permit] = []
        for limiter in self._limiters(job.task):
            permit = limiter.reserve()
            if isinstance(permit, float):
                return self._wait(job, limiter, held, permit)
            if permit is not None:
                held.append(permit)
        job.permits = held
        return None

    def admit_all(self, jobs: list[_Job], park: Callable[[_Job, float], None]) -> list[_Job]:
        """Return the jobs admitted; `park` each other one with its wait."""
        ready = []
        for job in jobs:
            wait = self.admit(job)
            if wait is None:
                ready.append(job)
            else:
                park(job, wait)
        return ready

    def start(self, job: _Job) -> float | None:
        """Take every slot the call about to start still needs; return None, or the seconds to
        wait (a slot it needs is not free now). `begin` spends them."""
        self._stop_waiting(job)
        held = job.permits or []
        reserved = {id(permit.limiter) for permit in held}
        for limiter in self._limiters(job.task):
            if id(limiter) in reserved:
                continue
            permit = limiter.acquire()
            if isinstance(permit, float):
                return self._wait(job, limiter, held, permit)
            held.append(permit)
        job.permits = held
        return None

    def begin(self, job: _Job) -> bool:
        """Spend `job`'s slots as its call begins, in the thread that makes the call (an async
        call's: the loop, where it may begin well after `start`); False, with the slots given
        back, when one was held past its use-by and the call must not begin now."""
        now = time.monotonic()
        permits, job.permits = job.permits or [], None
        if any(permit.use_by < now for permit in permits):
            for permit in permits:
                permit.limiter.give_back(permit)
            return False
        for permit in permits:
            permit.limiter.used(permit, now)
        return True

    @staticmethod
    def lease_ahead(quick: int) -> int:
        """How many quick durable tasks a worker may lease ahead: none past its floor, since a
        rate, not the tasks' cost, paces them, and rows leased here wait while other workers
        that share the limit could run them."""
        return 0

    def give_back(self, job: _Job) -> None:
        """Return the slots reserved for a call that will not happen now."""
        permits, job.permits = job.permits, None
        for permit in permits or ():
            permit.limiter.give_back(permit)

    def forget(self, job: _Job) -> None:
        """Let go of a finished job: its slots, and its place among a limit's waiting tasks."""
        self.give_back(job)
        self._stop_waiting(job)


class _NoFlow:
    """`_Flow` for a pool without rate limits: every call may start at once."""

    @staticmethod
    def admit_all(jobs: list[_Job], park: Callable[[_Job, float], None]) -> list[_Job]:
        return jobs

    @staticmethod
    def start(job: _Job) -> float | None:
        return None

    @staticmethod
    def begin(job: _Job) -> bool:
        return True

    @staticmethod
    def give_back(job: _Job) -> None:
        return None

    forget = give_back

    @staticmethod
    def lease_ahead(quick: int) -> int:
        return quick


_NO_FLOW = _NoFlow()

# The deadline of the attempt running in this thread (a plain handler) or this asyncio task (an
# async one): each thread, and each asyncio task, has a context of its own.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "task_queue_deadline", default=None
)


def current_deadline() -> float | None:
    """Return the deadline of the attempt that calls this, as a `time.monotonic()` value.

    None outside a handler, or when the attempt has no timeout (``task_timeout``, a task's
    ``timeout``). A plain handler cannot be interrupted, so it should bound its own I/O with it,
    e.g. ``urlopen(url, timeout=max(0.1, current_deadline() - time.monotonic()))``.
    """
    return _deadline.get()


class _DeadlineExceeded(TimeoutError):
    """An attempt ran past its deadline: a transient `TimeoutError` for the retry policy."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"the attempt ran past its deadline of {timeout:g} s")


def _call_with_deadline(handler: Callable[[Task], Any], task: Task, timeout: float) -> Any:
    """Call a plain handler with its deadline set; its result counts only if it came in time.

    A late return, or a `TimeoutError` raised late (the handler bounded its I/O by the
    deadline), is the attempt's timeout; any other exception keeps its own meaning.
    """
    deadline = time.monotonic() + timeout
    reset = _deadline.set(deadline)
    try:
        output = handler(task)
    except TimeoutError as exc:
        if time.monotonic() >= deadline:
            raise _DeadlineExceeded(timeout) from exc
        raise
    finally:
        _deadline.reset(reset)
    if time.monotonic() > deadline:
        raise _DeadlineExceeded(timeout)
    return output


async def _await_with_deadline(handler: Callable[[Task], Any], task: Task, timeout: float) -> Any:
    """Await an async handler's call, cancelled at its deadline (see `_call_with_deadline`)."""
    deadline = time.monotonic() + timeout
    _deadline.set(deadline)  # this asyncio task's own context; wait_for's copies it
    try:
        output = await asyncio.wait_for(handler(task), timeout)
    except (TimeoutError, asyncio.TimeoutError) as exc:  # one class since Python 3.11
        if time.monotonic() >= deadline:
            raise _DeadlineExceeded(timeout) from exc
        raise
    if time.monotonic() > deadline:  # the handler swallowed its cancellation and returned
        raise _DeadlineExceeded(timeout)
    return output


# --- Pool ----------------------------------------------------------------------------------------


class _Scheduler:
    """One thread that hands items back to a callback after a delay.

    The pool parks tasks here while they wait out a submission's delay or a retry backoff, or poll
    another owner's claim, so no worker thread (and no queue slot) is held while they wait.
    """

    def __init__(self, callback: Callable[[Any], None], name: str) -> None:
        self._callback = callback
        # Guards _heap and _stopped; notified when an item is scheduled or removed and on stop,
        # so the thread recomputes its wait. The callback runs without it.
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def schedule(self, delay: float, item: Any) -> None:
        """Hand `item` to the callback after `delay` seconds."""
        entry = (time.monotonic() + delay, next(self._seq), item)
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()

    def remove(self, predicate: Callable[[Any], bool]) -> list[Any]:
        """Remove and return the waiting items for which `predicate` is true."""
        with self._cond:
            keep = [entry for entry in self._heap if not predicate(entry[2])]
            removed = [entry[2] for entry in self._heap if predicate(entry[2])]
            heapq.heapify(keep)
            self._heap = keep
        return removed

    def wake(
        self, predicate: Callable[[Any], bool], count: int, first: Callable[[Any], Any]
    ) -> None:
        """Hand up to `count` waiting items for which `predicate` is true to the callback now,
        in the order of ``first(item)``, then the earliest due."""
        with self._cond:
            matching = [entry for entry in self._heap if predicate(entry[2])]
            chosen = sorted(matching, key=lambda entry: (first(entry[2]), entry[:2]))[:count]
            if chosen:
                gone = {entry[1] for entry in chosen}
                self._heap = [entry for entry in self._heap if entry[1] not in gone]
                heapq.heapify(self._heap)
        for entry in chosen:
            self._callback(entry[2])

    def stop(self, wait: bool = True) -> None:
        """Stop the thread; items still waiting are dropped."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._heap:
                        timeout = self._heap[0][0] - time.monotonic()
                        if timeout <= 0:
                            break
                        # A delay of years is fine; a wait past the lock's limit is not.
                        timeout = min(timeout, threading.TIMEOUT_MAX)
                    else:
                        timeout = None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                item = heapq.heappop(self._heap)[2]
            try:
                self._callback(item)
            except BaseException:
                logger.exception("scheduled callback for %r raised", item)


class _History:
    """Write a durable pool's per-minute counts to the store's history table.

    The counts come from the pool's `MetricsCollector` (the hot path records nothing more): each
    flush reads its totals, and what changed since the last flush goes to the row of the current
    minute, which the flush rewrites whole (a retried write is harmless, and several workers add
    up because each writes its own row). What finished between the last flush of a minute and
    the first of the next counts in the next: a minute is exact to within one flush interval.
    Only the lease keeper's thread calls `flush`, so nothing here needs a lock.
    """

    def __init__(self, totals: Callable[[], _Totals], store: Store, worker: str) -> None:
        self._totals = totals
        self._store = store
        self._worker = worker
        self._minute: int | None = None
        # The totals at the last write (what earlier users of a shared collector counted is not
        # ours): a failed write loses nothing, its counts go to the next minute's row.
        self._flushed = totals()
        self._base = self._flushed  # the totals at the start of `_minute`
        self._written: dict[str, Any] | None = None  # the row last written for `_minute`

    def flush(self) -> None:
        """Write the current minute's row if it changed since the last flush.

        Raises:
            Exception: the store's error; the next flush writes what this one could not.
        """
        now = self._totals()
        minute = int(time.time() // 60)
        if minute != self._minute:
            self._minute, self._base, self._written = minute, self._flushed, None
        base = self._base
        counts = {name: now.counts[name] - base.counts[name] for name in _HISTORY_COUNTS}
        latency = _history_latency(now, base)
        row = {**counts, "latency": latency}
        if row == self._written or (self._written is None and not any(counts.values())):
            return  # nothing new: an idle worker writes nothing
        self._store.record_history(self._worker, minute, counts, json.dumps(latency))
        self._written, self._flushed = row, now


class _DurableRows:
    """What a durable pool keeps in the store's durable queue, besides the keys' claims.

    It persists submissions (`take`), takes rows to run (`take_many`), records how each run
    ended (`settle`; cancelled runs go back to the queue), gives back rows it will not run,
    renews its rows' leases with a heartbeat, and writes the per-minute history. `_NoRows` is its
    do-nothing twin for a plain pool, so that the pool never asks which kind it is to record.
    The store's own lock makes every method safe from any thread.
    """

    durable = True

    def __init__(self, store: Store, worker: str, totals: Callable[[], _Totals]) -> None:
        self._store = store
        self._worker = worker
        self._history = _History(totals, store, worker)

    def take(self, task: Task, delay: float, priority: int) -> int | None:
        """Persist a submission and lease it to this pool (see `Store.take_task`)."""
        return self._store.take_task(task, self._worker, delay=delay, priority=priority)

    def take_many(
        self, limit: int, max_crashes: int, queues: Sequence[str] | None
    ) -> list[QueuedTask]:
        """Lease up to `limit` rows to run (see `Store.take_many`)."""
        if queues is None:
            return self._store.take_many(self._worker, limit, max_crashes)
        return self._store.take_many(self._worker, limit, max_crashes, queues=queues)

    def wait_for_work(self, seconds: float, stop: threading.Event) -> None:
        self._store.wait_for_work(seconds, stop)

    def next_run_at(self) -> float | None:
        return self._store.next_run_at()

    def queue_status(self) -> dict[str, Any]:
        return self._store.queue_status()

    def settle(self, items: Iterable[tuple[Any, ...]]) -> None:
        """Record how runs ended (cancelled ones go back to the queue); never raises.

        Each item is ``(task_id, entry, status, error[, error_kind, retries])``: `retries` are the
        run's handler calls after its first, which its start counted (see `Store`).
        """
        rows = [
            (task_id, entry, _ENTRY_STATE[status], error, *rest)
            for task_id, entry, status, error, *rest in items
            if entry is not None
        ]
        if not rows:
            return
        try:
            self._store.settle_many(rows)
        except Exception:
            # The results are in the idempotency rows already; the queue rows' leases expire and
            # whoever takes them finds the keys completed.
            logger.exception("recording %d results in the durable queue failed", len(rows))

    def give_back(self, entries: Iterable[tuple[str, int | None]]) -> None:
        """Give rows this pool took but will not run back to the queue; never raises."""
        self.settle([(task_id, entry, TaskStatus.CANCELLED, None) for task_id, entry in entries])

    def heartbeat(self, info: dict[str, Any], entries: list[tuple[str, int]]) -> None:
        """Say this worker is alive and extend the leases of the rows it holds; never raises."""
        try:
            # Only the rows this pool holds: a row taken by a take whose answer was lost (a
            # dropped connection) is not renewed, and another worker takes it after its lease.
            self._store.renew_tasks(self._worker, info, entries)
        except Exception as exc:
            logger.warning("renewing the durable queue's leases failed: %s", _first_line(exc))

    def record_history(self) -> None:
        """Write this minute's counts to the store's history; never raises."""
        try:
            self._history.flush()
        except Exception as exc:
            # The counts are kept: the next flush writes them, the database back or not.
            logger.warning("writing the dashboard history failed: %s", _first_line(exc))


class _NoRows:
    """The durable rows of a plain pool: there are none, so each method does nothing."""

    durable = False

    def take(self, task: Task, delay: float, priority: int) -> int | None:
        raise TaskQueueError("this pool is not durable")

    def take_many(
        self, limit: int, max_crashes: int, queues: Sequence[str] | None
    ) -> list[QueuedTask]:
        raise TaskQueueError("this pool is not durable")

    def wait_for_work(self, seconds: float, stop: threading.Event) -> None:
        stop.wait(seconds)

    def next_run_at(self) -> float | None:
        return None

    def queue_status(self) -> dict[str, Any]:
        return _empty_status()

    def settle(self, items: Iterable[tuple[Any, ...]]) -> None:
        pass

    def give_back(self, entries: Iterable[tuple[str, int | None]]) -> None:
        pass

    def heartbeat(self, info: dict[str, Any], entries: list[tuple[str, int]]) -> None:
        pass

    def record_history(self) -> None:
        pass


_NO_ROWS = _NoRows()


class _LeaseKeeper:
    """One thread that calls `keep` every `interval` (a third of the lease) until stopped, and
    `last` once as it stops: the pool says it is alive, renews what it holds, writes history."""

    def __init__(self, interval: float, keep: Callable[[], None], last: Callable[[], None]) -> None:
        self._keep = keep
        self._last = last
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-queue-leases", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._keep()
        self._last()


def _is_async_handler(handler: Callable[..., Any]) -> bool:
    """Return whether calling `handler` gives a coroutine (an ``async def`` function or method,
    a callable object whose ``__call__`` is one, or a `functools.partial` of either)."""
    target: Any = handler
    while isinstance(target, functools.partial):
        target = target.func
    if inspect.iscoroutinefunction(target):
        return True
    if inspect.isroutine(target) or not callable(target):
        return False
    return inspect.iscoroutinefunction(type(target).__call__)


# One finished call of an async handler: the job, its output or exception, and its seconds.
_Finished = tuple["_Job", Any, "BaseException | None", float]
# One success a worker hands over for recording: the job, its output and the output's JSON.
_Done = tuple["_Job", Any, str]


class _ClaimRequest:
    """A worker's batch of jobs waiting for the committer to claim their keys."""

    __slots__ = ("error", "jobs", "outcomes", "owned", "ready")

    def __init__(self, jobs: list[_Job], outcomes: list[_JobOutcome]) -> None:
        self.jobs = jobs
        self.outcomes = outcomes  # the worker's list: the committer appends while it waits
        self.owned: list[_Job] = []
        self.error: BaseException | None = None
        # Held until the round that serves the request ends: the worker waits by acquiring it,
        # the committer releases it once (a bare lock costs a fraction of an Event).
        self.ready = threading.Lock()
        self.ready.acquire()


class _Committer:
    """One thread that writes the pool's claims and completions, many workers' at a time.

    Group commit: each round takes every request waiting (claims that workers wait for, successes
    and finished async calls that nobody waits for) and writes the claims in one transaction and
    the completions in another, then resolves the futures. No worker waits on the store for
    another task's bookkeeping, and a store serialised by one connection sees a few transactions
    per round instead of two per task.

    With `claimer_exit`, claims get a thread of their own (the pool claims on a connection of
    their own): a worker waiting for its claim no longer waits behind a round of completions.

    Threads: workers (and an async pool's dispatchers and event loop) put requests; this thread
    (and the claimer) alone take them. `claim` blocks its caller until the round that served it
    ends.
    """

    def __init__(
        self,
        claim: Callable[[list[_Job], list[_JobOutcome]], list[_Job]],
        record: Callable[[list[_Finished], list[_Done]], None],
        on_exit: Callable[[], None],
        claimer_exit: Callable[[], None] | None = None,
    ) -> None:
        self._claim = claim  # the pool's claim of many jobs' keys: one transaction
        self._record = record  # the pool's recording of finished work: one transaction, futures
        self._on_exit = on_exit  # called once as the thread ends
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._claims = self._requests  # where claim requests go: a queue of their own, or not
        self._thread = threading.Thread(target=self._run, name="task-queue-committer", daemon=True)
        self._threads = [self._thread]
        if claimer_exit is not None:
            self._claims = queue.SimpleQueue()
            claimer = threading.Thread(
                target=self._run_claims, args=(claimer_exit,), name="task-queue-claimer",
                daemon=True,
            )  # fmt: skip
            self._threads.append(claimer)
        for thread in self._threads:
            thread.start()

    @property
    def threads(self) -> list[threading.Thread]:
        return self._threads

    def owns_current_thread(self) -> bool:
        return threading.current_thread() in self._threads

    def claim(self, jobs: list[_Job], outcomes: list[_JobOutcome]) -> list[_Job]:
        """Claim the jobs' keys in the next round; return the jobs the caller now owns.

        Jobs answered without a handler call (duplicates, conflicts) are appended to `outcomes`.
        """
        request = _ClaimRequest(jobs, outcomes)
        self._claims.put(request)
        request.ready.acquire()
        if request.error is not None:
            raise request.error
        return request.owned

    def record(self, done: list[_Done]) -> None:
        """Hand over successes to record; returns at once."""
        self._requests.put(done)

    def finished(self, call: _Finished) -> None:
        """Hand over a finished async call to record; returns at once (the loop calls it)."""
        self._requests.put(call)

    def stop(self, wait: bool = True) -> None:
        """End the threads after the requests before this one; nothing may be running."""
        if self._claims is not self._requests:
            self._claims.put(_STOP)
        self._requests.put(_STOP)
        if wait:
            self.join()

    def join(self) -> None:
        """Wait until the threads have ended (after `stop`); from one of them, the others."""
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join()

    def _run_claims(self, on_exit: Callable[[], None]) -> None:
        requests = self._claims
        try:
            while True:
                items = [requests.get()]
                while not requests.empty() and len(items) < MAX_COMPLETION_BATCH:
                    items.append(requests.get())
                claims = [item for item in items if item is not _STOP]
                if claims:
                    self._serve_claims(claims)
                if len(claims) < len(items):
                    return
        finally:
            on_exit()

    def _run(self) -> None:
        requests = self._requests
        try:
            while True:
                items = [requests.get()]
                while not requests.empty() and len(items) < MAX_COMPLETION_BATCH:
                    items.append(requests.get())
                stop = any(item is _STOP for item in items)
                claims = [item for item in items if isinstance(item, _ClaimRequest)]
                calls = [item for item in items if isinstance(item, tuple)]
                done = [entry for item in items if isinstance(item, list) for entry in item]
                if claims:
                    self._serve_claims(claims)
                if calls or done:
                    try:
                        self._record(calls, done)
                    except BaseException:
                        logger.exception("recording %d results raised", len(calls) + len(done))
                if stop:
                    return
        finally:
            self._on_exit()

    def _serve_claims(self, requests: list[_ClaimRequest]) -> None:
        jobs = [job for request in requests for job in request.jobs]
        outcomes: list[_JobOutcome] = []
        try:
            owned = self._claim(jobs, outcomes)
        except BaseException as exc:
            for request in requests:
                request.error = exc
                request.ready.release()
            return
        if len(requests) == 1:
            requests[0].owned = owned
            requests[0].outcomes.extend(outcomes)
        else:
            by_job = {id(job): request for request in requests for job in request.jobs}
            for job in owned:
                by_job[id(job)].owned.append(job)
            for outcome in outcomes:
                by_job[id(outcome.job)].outcomes.append(outcome)
        for request in requests:
            request.ready.release()


class _AsyncRunner:
    """An event loop in a thread of its own, running up to `limit` handler calls at once.

    The loop thread runs the handler's coroutines and nothing else: each finished call goes to
    `finished` (the pool's committer), so the loop never waits on the store. Callers of `start`
    (the pool's dispatcher threads) block while `limit` calls are in flight: that semaphore is
    the async pool's worker count.
    """

    def __init__(
        self,
        handler: Callable[[Task], Any],
        limit: int,
        finished: Callable[[_Finished], None],
        timeout: float | None = None,
        begin: Callable[[_Job], bool] = _NO_FLOW.begin,
        restart: Callable[[_Job], None] | None = None,
    ) -> None:
        self._handler = handler
        self._finished = finished
        self._timeout = timeout  # seconds per attempt, unless the task has its own
        self._begin = begin  # spends the call's rate-limit slots as it begins (see _Flow.begin)
        self._restart = restart  # takes back a call whose slots lapsed before it could begin
        self._slots = threading.BoundedSemaphore(limit)  # one per call in flight
        self._loop = asyncio.new_event_loop()
        self._calls: set[asyncio.Task[None]] = set()  # owned by the loop thread
        self._loop_thread = threading.Thread(
            target=self._run_loop, name="task-queue-event-loop", daemon=True
        )
        self._loop_thread.start()

    def free_slots(self) -> int:
        """Return how many more calls could start now (a snapshot)."""
        return self._slots._value  # noqa: SLF001  # no public count; read without the lock: a hint

    @property
    def thread(self) -> threading.Thread:
        return self._loop_thread

    def owns_current_thread(self) -> bool:
        """Return whether the caller is the loop thread."""
        return threading.current_thread() is self._loop_thread

    def start(self, jobs: list[_Job]) -> None:
        """Start a handler call for each job on the loop; block while `limit` calls run.

        Calls that find free slots are handed over together: one wake-up of the loop for many.
        """
        slots = self._slots
        start, end = 0, len(jobs)
        while start < end:
            slots.acquire()
            stop = start + 1
            while stop < end and slots.acquire(blocking=False):
                stop += 1
            self._loop.call_soon_threadsafe(self._spawn, jobs[start:stop])
            start = stop

    def stop(self, wait: bool = True) -> None:
        """Stop the loop; no call may be running."""
        self._loop.call_soon_threadsafe(self._loop.stop)
        if wait and not self.owns_current_thread():
            self._loop_thread.join()

    def _spawn(self, jobs: list[_Job]) -> None:
        create_task, calls = self._loop.create_task, self._calls
        for job in jobs:
            call = create_task(self._call(job))
            calls.add(call)  # the loop keeps only weak references to its tasks
            call.add_done_callback(calls.discard)

    async def _call(self, job: _Job) -> None:
        clock = time.perf_counter
        began = clock()
        output: Any = None
        error: BaseException | None = None
        task = job.task
        timeout = task.timeout if task.timeout is not None else self._timeout
        if not self._begin(job):
            self._slots.release()
            assert self._restart is not None
            self._restart(job)
            return
        try:
            if timeout is None:
                output = await self._handler(task)
            else:
                output = await _await_with_deadline(self._handler, task, timeout)
        except BaseException as exc:  # the handler's failure is the task's, never the loop's
            error = exc
        self._slots.release()
        self._finished((job, output, error, clock() - began))

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            while True:
                try:
                    self._loop.run_forever()
                    return  # stopped by stop()
                except (SystemExit, KeyboardInterrupt):
                    # A task the handler made itself (asyncio.gather, wait_for) raised it:
                    # asyncio lets it out of run_forever. The call that awaited that task has
                    # its failure already; the loop goes on with the other calls.
                    logger.exception("a task of the async handler raised; the event loop goes on")
        finally:
            self._loop.close()

    def join(self) -> None:
        """Wait until the loop thread has ended (after `stop`)."""
        if not self.owns_current_thread():
            self._loop_thread.join()


# A submission that joined an in-flight one: its task, its future, when it was submitted and,
# in a durable pool, the token of its row in the durable queue.
@dataclasses.dataclass(slots=True)
class _Follower:
    """A submission that joined one of its key in flight: it shares that one's outcome."""

    task: Task
    future: Any  # its concurrent.futures.Future[TaskRecord], or an iter_results _Slot
    enqueued_at: float  # when it was submitted
    entry: int | None  # the token of its durable-queue row, in a durable pool


class _Job:
    """One accepted submission as the pool tracks it.

    Its phases: accepted (in `_inflight`, queued or delayed), taken (`dequeued`: a worker's
    batch holds it; `batch` is that batch), owned (`token` set: its key is claimed), called
    (`attempts` > 0), parked (in the scheduler for a retry, a poll or a rate limit), and finished
    (`done`). `done`, `dequeued` and `followers` are guarded by the pool's lock (see
    `WorkerPool.__init__`); every other field is written only by the thread that holds the job.
    """

    __slots__ = (
        "attempts", "batch", "delayed", "dequeued", "done", "enqueued_at", "entry", "fingerprint",
        "followers", "future", "held", "key", "permits", "polls", "priority", "started_at",
        "store_failures", "task", "token", "unrecorded", "waits_on",
    )  # fmt: skip

    def __init__(
        self,
        task: Task,
        fp: str,
        future: concurrent.futures.Future[TaskRecord] | _Slot,
        now: float,
        entry: int | None = None,
        priority: int = 0,
    ) -> None:
        self.task = task
        self.priority = priority  # its place among the ready jobs (see _WorkQueue)
        self.delayed = False  # waiting out the submission's delay in the scheduler
        self.entry = entry  # the token of its durable-queue row, in a durable pool
        self.key = task.key
        self.fingerprint = fp
        self.future = future
        self.enqueued_at = now
        self.started_at: float | None = None
        self.attempts = 0
        self.polls = 0
        self.token: int | None = None  # the fencing token while this pool owns the key
        self.done = False
        self.dequeued = False  # a worker has taken it from the queue once
        self.followers: list[_Follower] = []
        self.batch: list[_Job] | None = None  # the batch that holds the job now, if any
        # A durable pool's success the store could not record yet: (output, its JSON text).
        self.unrecorded: tuple[Any, str] | None = None
        self.store_failures = 0  # store errors in a row while claiming or completing it
        self.permits: list[_Permit] | None = None  # rate-limit slots reserved for its next call
        self.held = False  # parked for a rate limit, keeping its room in the queue
        self.waits_on: Any = None  # the rate limit it is parked for, if any

    def __repr__(self) -> str:
        return f"<job {self.task.id!r} key={self.key!r} attempts={self.attempts}>"


@dataclasses.dataclass(slots=True)
class _JobOutcome:
    """How a job ended, before its record is built."""

    job: _Job
    status: TaskStatus
    output: Any = None
    error: str | None = None
    kind: ErrorKind | None = None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = "TimeoutError" if isinstance(exc, _DeadlineExceeded) else type(exc).__name__
    return f"{name}: {text}" if text else name


def _each_alone(operation: Callable[[list[Any]], list[Any]], items: list[Any]) -> list[Any]:
    """Run `operation` on all `items` in one call, or, if that fails, on each item alone.

    One row the database refuses (a value it cannot store, a constraint) then fails alone, as the
    exception in place of its result, instead of failing every item of its batch. A batch of
    one raises the error as it is: the caller fails what it holds.
    """
    try:
        return operation(items)
    except Exception:
        if len(items) == 1:
            raise
    results: list[Any] = []
    for item in items:
        try:
            results.append(operation([item])[0])
        except Exception as exc:
            results.append(exc)
    return results


def _resolve_all(
    resolved: Iterable[tuple[concurrent.futures.Future[TaskRecord] | _Slot, TaskRecord]],
) -> BaseException | None:
    """Set every future's result; return the first BaseException a done-callback raised.

    `Future` logs a callback's Exception itself, but a BaseException (SystemExit,
    KeyboardInterrupt) escapes `set_result`: it must not leave the other futures unresolved.
    """
    escaped = None
    for future, record in resolved:
        try:
            future.set_result(record)
        except BaseException as exc:
            if escaped is None:
                escaped = exc
    return escaped


def _task_record(
    task: Task,
    status: TaskStatus,
    finished_at: float,
    *,
    enqueued_at: float,
    output: Any = None,
    error: str | None = None,
    kind: ErrorKind | None = None,
    attempts: int = 0,
    started_at: float | None = None,
) -> TaskRecord:
    """Build the record of one submission: the one place the pool makes a `TaskRecord`."""
    return TaskRecord(
        task_id=task.id,
        key=task.key,
        status=status,
        output=output,
        error=error,
        error_kind=kind,
        attempts=attempts,
        enqueued_at=enqueued_at,
        started_at=started_at,
        finished_at=finished_at,
    )


class _Slot:
    """A submission's place in an `iter_results` window, standing in for its future.

    Resolving it hands ``(slot, record)`` to the window's `put` (a queue the iterating thread
    reads, or an event loop's inbox): no Condition to build, no waiters to wake, no callbacks to
    run. The pool treats it as the job's future (`set_result` is all it calls).
    """

    __slots__ = ("_put",)

    def __init__(self, put: Callable[[tuple[_Slot, TaskRecord]], None]) -> None:
        self._put = put

    def set_result(self, record: TaskRecord) -> None:
        self._put((self, record))


class _LoopInbox:
    """Records finished on the pool's threads, delivered to one event loop.

    Any thread may `put`; one wake-up of the loop carries every item put before it ran, so a
    burst of completions costs the loop one callback instead of one per record. `get_all` runs
    on the loop. Items put after `close` (a consumer that left) are dropped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()  # guards the three attributes below
        self._items: list[Any] = []
        self._wake_pending = False  # a `_wake` is scheduled on the loop and has not run yet
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None  # the loop thread's alone

    def put(self, item: Any) -> None:
        with self._lock:
            if self._closed:
                return
            self._items.append(item)
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is left to read it
            self._loop.call_soon_threadsafe(self._wake)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._items = []

    def _wake(self) -> None:
        with self._lock:
            self._wake_pending = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get_all(self) -> list[Any]:
        """Wait until an item is there; remove and return every item there."""
        while True:
            with self._lock:
                if self._items:
                    items, self._items = self._items, []
                    return items
            # Only this loop runs `_wake`, and not before this await: no wake-up is lost.
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


def _resolved(record: TaskRecord) -> concurrent.futures.Future[TaskRecord]:
    future: concurrent.futures.Future[TaskRecord] = concurrent.futures.Future()
    future.set_running_or_notify_cancel()
    future.set_result(record)
    return future


def handler_namespace(handler: Callable[..., Any]) -> str:
    """Return the namespace that scopes a handler's idempotency keys.

    The module-qualified name of the function (``"jobs.fetch"``), of the class of a callable
    object (``"task_queue_optimized.TaskProcessor"``), or of the function a `functools.partial`
    wraps. A function of a script run as ``__main__`` is named after the script's module, so a
    script and ``task-queue worker --handler script:function`` share their keys.
    """
    target: Any = handler
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target) or inspect.isbuiltin(target)):
        target = type(target)
    module = getattr(target, "__module__", None) or "?"
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        path = getattr(main, "__file__", None)
        if spec is not None and spec.name:
            module = spec.name.removesuffix(".__main__")
        elif path:
            module = os.path.splitext(os.path.basename(path))[0]
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}"


def _check_namespace(namespace: Any, source: str = "namespace") -> str:
    """Return `namespace` if it is usable, else raise ValueError naming `source`.

    At most `MAX_NAMESPACE_BYTES` of UTF-8: with a key of `MAX_KEY_BYTES` it fits one PostgreSQL
    index row.
    """
    problem = _text_problem(namespace, MAX_NAMESPACE_BYTES)
    if problem is None and (not namespace.strip() or not namespace.isprintable()):
        problem = "must be a non-empty printable string"
    if problem is not None:
        raise ValueError(f"{source} {problem}, not {_shown(namespace)}")
    return cast(str, namespace)  # a str: _text_problem checked it


def _retries(calls: int) -> int:
    """The handler calls of a run after its first: the first was counted when the run started."""
    return max(calls - 1, 0)


def _never_called(job: _Job) -> bool:
    """Whether an owned job has not begun: its handler was never called and no output of it
    waits to be recorded. Cancellation gives its claim back."""
    return job.attempts == 0 and job.unrecorded is None


def _unstarted(job: _Job) -> bool:
    """Whether a parked job has not begun running: it holds no claim (queued, polling another
    owner's claim), or it waits for a rate limit before its first call. Cancellation takes it."""
    return job.token is None or (job.attempts == 0 and job.waits_on is not None)


_ON_FULL = ("block", "reject")
# What a submission's outcome makes of its durable-queue row: cancelled work goes back to the queue.
_ENTRY_STATE = {
    TaskStatus.SUCCEEDED: EntryState.DONE,
    TaskStatus.DUPLICATE: EntryState.DONE,
    TaskStatus.FAILED: EntryState.FAILED,
    TaskStatus.CANCELLED: EntryState.QUEUED,
}
_live_pools: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


class WorkerPool:
    """Run tasks on a bounded queue and a thread pool, once per idempotency key.

    A submission goes into the bounded queue; a worker claims its key in the idempotency store,
    calls the handler (retrying transient errors after a backoff spent off the worker), stores the
    output, completes the claim and resolves the future with a `TaskRecord`. A key already
    completed resolves as a duplicate with the cached output; a key in flight in this pool shares
    the running submission's outcome; a key another process holds is polled until that claim
    completes or its lease runs out.

    Args:
        handler: ``handler(task) -> JSON-compatible output``; None means `TaskProcessor()`.
        workers: worker threads.
        queue_size: how many tasks may wait in the queue.
        db_path: the SQLite file of the idempotency store; None keeps it in memory.
        retry: the `RetryPolicy`; None means the default.
        on_full: "block" makes `submit` wait for room (up to `submit_timeout`), "reject" raises
            `QueueFullError` at once.
        submit_timeout: seconds a blocked `submit` waits before `QueueFullError`; None: forever.
        lease_seconds: the claim lease, renewed while the handler runs.
        durability: "normal" or "full" (see `IdempotencyManager`).
        metrics: a `MetricsCollector` to record into; None makes one.
        claim_poll_interval: first wait before polling a key that another process holds.
        idempotency: an open `IdempotencyManager` to use (and not close) instead of `db_path`.
        durable: persist each submission in the store's durable queue before `submit` returns,
            so any worker (`serve`, ``task-queue worker``) finishes it if this process dies.
        worker_name: this pool's name in the durable queue (default host:pid:id).
        namespace: the scope of this pool's keys; None means `handler_namespace(handler)`. Pools
            (and processes) with one namespace share their keys' outcomes; pools with different
            ones never see each other's. Give one to keep the keys of a handler you rename.
        queues: the named queues `serve` takes tasks from; None means every queue. (A durable
            `submit` keeps each task in its own `Task.queue` and runs it here all the same.)
        rate_limit: at most this many handler calls (every attempt counts) in any period, such
            as ``"100/s"`` (units ``s``, ``m``, ``h``). Pools on one SQLite file or PostgreSQL
            database with the same namespace share it, in any number of processes.
        rate_limits: ``{group: rate}``: the calls of tasks of that group (`Task.group`), on top
            of `rate_limit`; shared by every pool on the store whatever its handler.
        task_timeout: seconds each attempt may take (a task's own ``timeout`` wins). An async
            handler is cancelled at the deadline; a plain one reads it with `current_deadline`,
            and its attempt, if it ends later, is a transient `TimeoutError`.

    Raises:
        ValueError: an argument is invalid; the message names it.
    """

    def __init__(
        self,
        handler: Callable[[Task], Any] | None = None,
        *,
        workers: int = DEFAULT_WORKERS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        db_path: str | os.PathLike[str] | None = None,
        retry: RetryPolicy | None = None,
        on_full: str = "block",
        submit_timeout: float | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        durability: str = DEFAULT_DURABILITY,
        metrics: MetricsCollector | None = None,
        claim_poll_interval: float = DEFAULT_CLAIM_POLL_INTERVAL,
        idempotency: IdempotencyManager | None = None,
        durable: bool = False,
        worker_name: str | None = None,
        namespace: str | None = None,
        queues: Iterable[str] | None = None,
        rate_limit: str | None = None,
        rate_limits: Mapping[str, str] | None = None,
        task_timeout: float | None = None,
    ) -> None:
        if namespace is not None:
            _check_namespace(namespace)
        self.queues = _queue_names(queues)
        overall_rate = None if rate_limit is None else _rate_of(rate_limit, "rate_limit")
        group_rates = {} if rate_limits is None else _group_rates(rate_limits)
        if task_timeout is not None and not (_is_finite_number(task_timeout) and task_timeout > 0):
            raise ValueError(
                f"task_timeout must be None or a number of seconds > 0, not {_shown(task_timeout)}"
            )
        if on_full not in _ON_FULL:
            raise ValueError(f"on_full must be one of {_ON_FULL}, not {on_full!r}")
        if submit_timeout is not None and not submit_timeout >= 0:
            raise ValueError(f"submit_timeout must be >= 0 or None, not {submit_timeout!r}")
        if worker_name is not None and _text_problem(worker_name) is not None:
            # The name is stored with every task the pool takes and in its heartbeat row.
            raise ValueError(f"worker_name {_text_problem(worker_name)}, got {_shown(worker_name)}")
        if not claim_poll_interval > 0:
            raise ValueError(f"claim_poll_interval must be > 0, not {claim_poll_interval!r}")
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, not {workers!r}")
        self._handler = handler if handler is not None else TaskProcessor()
        self._workers = workers  # handler calls at once: threads, or coroutines on one loop
        # Computed once: every claim of this pool carries it.
        self.namespace = namespace if namespace is not None else handler_namespace(self._handler)
        self._retry = retry if retry is not None else RetryPolicy()
        self._block = on_full == "block"
        self._submit_timeout = submit_timeout
        self._poll_interval = claim_poll_interval
        self._metrics = metrics if metrics is not None else MetricsCollector(workers, queue_size)
        self._owns_store = idempotency is None
        self._idempotency = idempotency or IdempotencyManager(
            db_path, lease_seconds=lease_seconds, durability=durability
        )
        self._durable = durable
        self._task_timeout = None if task_timeout is None else float(task_timeout)
        self._flow = self._make_flow(overall_rate, group_rates)
        self.worker_name = worker_name or f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        # The durable queue's rows this pool holds (and its per-minute history for the
        # dashboard), or their do-nothing twin in a plain pool.
        self._rows: _DurableRows | _NoRows = (
            _DurableRows(
                self._idempotency.store,
                self.worker_name,
                self._metrics._history_totals,  # noqa: SLF001  # the history's input, not public API
            )
            if durable
            else _NO_ROWS
        )
        # The lock protocol.
        #
        # Threads: submitters (any thread, `submit`), the worker loops of `_queue` (or, for an
        # async handler, its dispatchers and the `_AsyncRunner`'s event loop), the committer and,
        # on PostgreSQL, the claimer (`_Committer`), the scheduler (`_Scheduler`: retries,
        # delays, polls, rate-limit waits), the lease keeper (`_LeaseKeeper`) and `serve` loops.
        # A job (`_Job`) is held by one of them at a time and handed on through the queue, the
        # committer's queues, the scheduler or the loop, whose own locks order the writes; the
        # holder alone writes the job's other fields.
        #
        # `_lock` guards `_inflight`, `_pending`, `_closed`, `_cancelling`, `_stopping`,
        # `_store_users`, the two notice times below, and three fields of every job: `done`,
        # `dequeued` and `followers` (a submitter appends a follower while a worker holds the
        # job). It is held for dict and counter updates only, and while a job is taken back out
        # of the queue or the scheduler (`_cancel_queued`, `_abandon`): it may be taken before
        # `_queue`'s mutex or the scheduler's condition, never after them, and never around a
        # store call, a handler or a future's callbacks. `_changed` is notified whenever
        # `_pending` drops: `shutdown` and `serve` wait on it.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._inflight: dict[str, _Job] = {}  # key -> the job that runs it
        self._pending = 0  # jobs accepted and not finished
        self._closed = False
        self._cancelling = False
        self._stopping = False
        # Who uses the store now: the committer (for itself and the worker loops, which end
        # before it lets go: see _committer_done), serve() loops and durable submits. The last
        # to let go closes an owned store.
        self._store_users = 1
        self._wait_notice_at: float | None = None  # when keys held elsewhere were last reported
        self._store_error_notice_at: float | None = None  # when a store error was last reported
        # Unguarded: written once here, or a hint whose lost update costs nothing.
        self._runner: _AsyncRunner | None = None  # runs an async handler's calls
        # Seconds per handler call, smoothed: it sizes the batches a worker takes (see _run_batch).
        self._per_call = BATCH_BUDGET_SECONDS
        # An async handler's calls run on an event loop; a few dispatcher threads claim their
        # keys and start them there. A plain handler runs on `workers` threads.
        is_async = _is_async_handler(self._handler)
        try:
            self._queue = TaskQueue(
                lambda job: self._process_batch([job]),
                maxsize=queue_size,
                workers=min(workers, ASYNC_DISPATCHERS) if is_async else workers,
                process_many=self._process_batch,
                batch_limit=self._batch_limit,
            )
        except ValueError:
            if self._owns_store:
                self._idempotency.close()
            raise
        # On PostgreSQL, claims have a connection (and a thread) of their own: a worker waiting
        # for its claim does not wait behind a round of completions, and the server runs both.
        self._claimer = self._idempotency
        claimer_exit = None
        store = self._idempotency.store
        if isinstance(store, PostgresStore):
            try:
                self._claimer = IdempotencyManager(store=store.sibling())
                claimer_exit = self._claimer.store.close
            except Exception:  # the server just went away: claims share the one connection
                logger.debug("opening the claims' connection failed", exc_info=True)
        self._committer = _Committer(self._claim, self._record, self._committer_done, claimer_exit)
        if is_async:
            self._runner = _AsyncRunner(
                self._handler,
                workers,
                self._committer.finished,
                self._task_timeout,
                begin=self._flow.begin,
                restart=self._restart_call,
            )
        # Checked on every submit: a set of thread idents is the cheapest test.
        self._own_threads = frozenset(
            thread.ident
            for thread in (
                *self._committer.threads,
                None if self._runner is None else self._runner.thread,
            )
            if thread is not None
        )
        self._scheduler = _Scheduler(self._due, "task-queue-scheduler")
        # The pool has stopped when the keeper's last call comes: its last minute's counts go
        # to the history before the store closes.
        self._keeper = _LeaseKeeper(
            self._idempotency.lease_seconds / 3, self._keep_leases, self._rows.record_history
        )
        _live_pools.add(self)

    def _make_flow(self, overall: _Rate | None, groups: Mapping[str, _Rate]) -> _Flow | _NoFlow:
        """Build the pool's rate limits: in the store when other processes may share it."""
        if overall is None and not groups:
            return _NO_FLOW
        store = self._idempotency.store
        shared = isinstance(store, _SqlStore) and not (
            isinstance(store, SqliteStore) and store.path is None
        )

        def limiter(name: str, rate: _Rate) -> _LocalLimiter | _SharedLimiter:
            if shared:
                return _SharedLimiter(store, name, rate, self._workers, self._wake_waiting)
            return _LocalLimiter(rate)

        return _Flow(
            None if overall is None else limiter(f"pool:{self.namespace}", overall),
            {group: limiter(f"group:{group}", rate) for group, rate in groups.items()},
        )

    # Public surface -----------------------------------------------------------------------------

    @property
    def metrics(self) -> MetricsCollector:
        return self._metrics

    @property
    def idempotency(self) -> IdempotencyManager:
        return self._idempotency

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(
        self, task: Task, *, delay: float = 0.0, priority: int = 0
    ) -> concurrent.futures.Future[TaskRecord]:
        """Accept `task` and return a future that resolves to its `TaskRecord`.

        Blocks while the queue is full when ``on_full="block"``; a delayed task takes no queue
        slot, so it never blocks.

        Args:
            delay: seconds before the task may start. It waits off the queue and off the workers
                (a durable pool stores its due time: any worker runs it then if this process
                dies); `shutdown` waits for it to fall due and run, unless ``cancel_pending``.
            priority: from `MIN_PRIORITY` to `MAX_PRIORITY`: among ready tasks, a higher priority
                starts first; equal priorities start in the order they became ready. A submission
                that joins one of its key already in flight shares that one's place.

        Raises:
            QueueFullError: the queue stayed full (at once with ``on_full="reject"``).
            PoolClosedError: the pool is shut down.
            TypeError, ValueError: `delay` or `priority` is not a number in range (see above).
        """
        # Without a sink, `_submit` returns a future.
        return cast(
            "concurrent.futures.Future[TaskRecord]",
            self._submit(task, delay=delay, priority=priority),
        )

    def _submit(
        self,
        task: Task,
        *,
        probe: bool = False,
        delay: float = 0.0,
        priority: int = 0,
        sink: _Slot | None = None,
    ) -> Any:
        """Submit `task`; with `probe`, raise QueueFullError at once instead of waiting for room
        (and count no rejection): `AsyncWorkerPool` then waits for room off its event loop.

        With `sink`, the accepted submission resolves that slot instead of a new future, and the
        slot is returned; a submission refused at once still returns a resolved future."""
        if not isinstance(task, Task):
            raise TypeError(f"submit() takes a Task, not {type(task).__name__}")
        if delay or priority or type(delay) is not float or type(priority) is not int:
            delay, priority = _check_delay(delay), _check_priority(priority)
        now = time.perf_counter()
        try:
            fp = fingerprint(task.payload)
        except (TypeError, ValueError, RecursionError) as exc:  # deep nesting: RecursionError
            error = f"payload is not JSON-serialisable: {exc}"
            return self._refuse(task, now, error, ErrorKind.PERMANENT)
        if not self._durable:
            if probe:
                return self._accept(
                    task, fp, now, None, block=False, probe=True, delay=delay, priority=priority,
                    sink=sink,
                )  # fmt: skip
            return self._accept(task, fp, now, None, delay=delay, priority=priority, sink=sink)
        with self._lock:
            if self._closed:
                raise PoolClosedError()
            self._store_users += 1  # the store stays open until this submission is tracked
        try:
            # Persisted before submit returns; None when the task is done or another worker has it
            # (the key's claim then decides what this submission reports).
            try:
                entry = self._rows.take(task, delay, priority)
            except TaskConflictError as exc:
                # The stored task is another one: running either would run what was not asked.
                return self._refuse(task, now, str(exc), ErrorKind.CONFLICT)
            except Exception as exc:
                # Not persisted, so not accepted: the caller learns it from the record (submit
                # raises only QueueFullError and PoolClosedError) and may submit again.
                error = f"the durable queue could not record the task: {_describe(exc)}"
                return self._refuse(task, now, error, ErrorKind.TRANSIENT)
            return self._accept(task, fp, now, entry, delay=delay, priority=priority, sink=sink)
        finally:
            self._release_store()

    def _accept(
        self,
        task: Task,
        fp: str,
        now: float,
        entry: int | None,
        *,
        block: bool | None = None,
        timeout: float | None = None,
        probe: bool = False,
        delay: float = 0.0,
        priority: int = 0,
        sink: _Slot | None = None,
    ) -> Any:
        """Track `task` and put it in the queue, or in the scheduler for `delay` seconds; return
        its future (`sink` itself when given).

        `block` and `timeout` override the pool's ``on_full`` policy (``serve`` always waits for
        room: the rows it feeds in are leased to this pool already).
        """
        if block is None:
            block, timeout = self._block, self._submit_timeout
        future: Any = sink
        if future is None:
            future = concurrent.futures.Future()
            future.set_running_or_notify_cancel()  # outcomes come from the pool, not cancel()
        with self._lock:
            closed = self._closed
            if not closed:
                job, leader = self._track(task, fp, future, now, entry, priority)
        if closed:
            self._rows.give_back([(task.id, entry)])
            raise PoolClosedError()
        if leader is not None:
            if leader.fingerprint != fp:
                error = str(IdempotencyConflictError(task.key))
                self._rows.settle([(task.id, entry, TaskStatus.FAILED, error, "conflict", 0)])
                return self._refuse(task, now, error, ErrorKind.CONFLICT)
            self._metrics.record_enqueue(queued=False)
            return future
        assert job is not None  # no leader: a new job
        try:
            if delay:
                # It takes a queue slot when it falls due (see _due), never blocking then.
                job.delayed = True
                self._scheduler.schedule(delay, job)
            elif self._in_own_thread():
                # A done-callback (on the committer) or an async handler (on the event loop)
                # submitting more work: waiting for room there would wait for the very thread
                # that makes room. It goes in past the bound instead.
                self._queue.put_overflow(job, priority)
            else:
                self._queue.submit(job, block=block, timeout=timeout, priority=priority)
        except BaseException as exc:
            # Refused (QueueFullError), or interrupted while waiting for room (KeyboardInterrupt,
            # SystemExit, a pool closed meanwhile): a job in no queue must not stay counted, or
            # shutdown and interpreter exit wait for it forever. An interruption that came after
            # the job went in leaves it to the worker that took it.
            self._queue.take_back(job)
            if isinstance(exc, QueueFullError):
                if not probe:
                    self._metrics.record_rejection()
                reason = f"the submission this one joined was refused: {exc}"
            else:
                reason = f"the submission this one joined was interrupted: {_describe(exc)}"
            self._abandon(job, reason)
            raise
        self._metrics.record_enqueue(queued=not delay)
        return future

    def _track(
        self, task: Task, fp: str, future: Any, now: float, entry: int | None, priority: int
    ) -> tuple[_Job | None, _Job | None]:
        """Track a submission (the pool lock held): a new job for its key, or a follower of the
        job in flight with the same fingerprint. Returns ``(new job, None)``, or ``(None,
        leader)`` where the leader's fingerprint tells a follower from a conflict."""
        leader = self._inflight.get(task.key)
        if leader is None:
            job = _Job(task, fp, future, now, entry, priority)
            self._inflight[job.key] = job
            self._pending += 1
            return job, None
        if leader.fingerprint == fp:
            leader.followers.append(_Follower(task, future, now, entry))
        return None, leader

    def _submit_chunk(
        self,
        tasks: Sequence[Task],
        start: int,
        room: int,
        put: Callable[[tuple[_Slot, TaskRecord]], None],
        ours: set[_Slot],
    ) -> int:
        """Submit the tasks of `tasks` from `start` (at most `room`, and `MAX_BATCH`) into an
        `iter_results` window: each resolves a slot added to `ours` by calling `put`. Returns how
        many went in; 0 when the next one needs `_submit` alone (see `_submit_batch`)."""
        chunk = tasks[start : start + min(room, MAX_BATCH)]
        slots = [_Slot(put) for _ in chunk]
        futures = self._submit_batch(chunk, slots)
        for slot, future in zip(slots, futures, strict=False):
            ours.add(slot)
            if future is not slot:  # refused at once: resolved already
                put((slot, future.result()))
        return len(futures)

    def _submit_batch(self, tasks: Sequence[Task], slots: Sequence[_Slot]) -> list[Any]:
        """Submit tasks of a plain pool as `_submit` would, each resolving its slot, with one
        pool lock, one queue put and one metrics update for all: a sequence's tasks in
        `iter_results`. Returns the futures (slots) of the tasks taken, a prefix of `tasks`:
        it stops at the first task the queue has no room for at once, or that `_submit` alone
        must answer (not a `Task`, a payload with no fingerprint, a closed pool)."""
        if self._in_own_thread():
            return []  # past the bound, one at a time (see _accept)
        prints: list[str] = []
        for task in tasks:
            if task.__class__ is not Task:
                break
            try:
                prints.append(fingerprint(task.payload))
            except (TypeError, ValueError, RecursionError):
                break
        rooms = self._queue.reserve(len(prints))
        if not rooms:
            return []
        now = time.perf_counter()
        futures: list[Any] = []
        jobs: list[_Job] = []
        conflicts: list[tuple[int, Task]] = []  # (place in futures, task)
        joined = 0
        with self._lock:
            if not self._closed:
                track = self._track
                for task, fp, slot in zip(tasks[:rooms], prints, slots, strict=False):
                    job, leader = track(task, fp, slot, now, None, 0)
                    if job is not None:
                        jobs.append(job)
                    elif leader is not None and leader.fingerprint == fp:
                        joined += 1
                    else:
                        conflicts.append((len(futures), task))
                    futures.append(slot)
        if rooms > len(jobs):
            self._queue.unhold(rooms - len(jobs))
        if jobs:
            self._queue.put_reserved(jobs)
        if jobs or joined:
            self._metrics.record_enqueues(len(jobs), joined)
        for index, task in conflicts:  # rare: the same key with another payload in the window
            error = str(IdempotencyConflictError(task.key))
            futures[index] = self._refused(task, now, error, ErrorKind.CONFLICT)
        return futures

    def run(self, tasks: Iterable[Task]) -> list[TaskRecord]:
        """Submit every task and return their records in input order."""
        futures = [self.submit(task) for task in tasks]
        return [future.result() for future in futures]

    def iter_results(self, tasks: Iterable[Task]) -> Iterator[TaskRecord]:
        """Submit tasks lazily and yield their records in completion order.

        At most ``queue_size + workers`` submissions are outstanding at once, so memory stays flat
        for any number of tasks. If the pool is shut down meanwhile, the records of the accepted
        tasks are yielded and then `PoolClosedError` is raised. Leaving the loop early (``break``,
        an exception, closing the generator) cancels this loop's submissions that are still
        queued, as `Executor.map` does; those already running finish.
        """
        return self._iter_results(tasks, None)

    def _iter_results(
        self, tasks: Iterable[Task], schedule: Mapping[str, tuple[float, int]] | None
    ) -> Iterator[TaskRecord]:
        """`iter_results`, submitting the tasks whose id `schedule` holds with its ``(delay,
        priority)`` (a task file's fields)."""
        done: queue.SimpleQueue[tuple[_Slot, TaskRecord]] = queue.SimpleQueue()
        put = done.put
        window = self._queue.maxsize + self._workers
        ours: set[_Slot] = set()  # submitted and not yet yielded

        def collect() -> TaskRecord:
            slot, record = done.get()
            ours.discard(slot)
            return record

        closed: PoolClosedError | None = None
        # A sequence's tasks are all there already: the next ones go in together.
        batched = schedule is None and not self._durable and isinstance(tasks, Sequence)
        position = 0  # of `task` in a batched sequence
        try:
            iterator = iter(tasks)
            for task in iterator:
                while len(ours) >= window or (ours and not done.empty()):
                    yield collect()
                if batched:
                    taken = self._submit_chunk(
                        cast(Sequence[Task], tasks), position, window - len(ours), put, ours
                    )
                    if taken:
                        position += taken
                        for _ in range(taken - 1):
                            next(iterator)  # submitted with this one
                        continue
                    position += 1  # the queue is full, or this task needs the path below
                slot = _Slot(put)
                while True:
                    try:
                        if schedule is None or task.id not in schedule:
                            future = self._submit(task, sink=slot)
                        else:
                            delay, priority = schedule[task.id]
                            future = self._submit(task, delay=delay, priority=priority, sink=slot)
                        break
                    except QueueFullError:
                        # With on_full="reject" the queue may be full of this very iteration's
                        # work: wait for one of ours to finish instead of failing. Only a queue
                        # full of other producers' tasks raises.
                        if not ours:
                            raise
                        yield collect()
                    except PoolClosedError as exc:
                        closed = exc
                        break
                if closed is not None:
                    break
                ours.add(slot)
                if future is not slot:  # refused at once: its future is resolved already
                    put((slot, future.result()))
            while ours:
                yield collect()
        finally:
            if ours:
                self._cancel_queued(ours)
        if closed is not None:
            raise closed

    def serve(self, stop: threading.Event, *, prefetch: int | None = None,
              poll_interval: float = 1.0, burst: bool = False) -> None:  # fmt: skip
        """Take tasks from the durable queue and run them until `stop` is set.

        Keeps at most `prefetch` tasks leased from the store, so workers on other machines share
        the work (default: twice the workers, or up to ``MAX_PREFETCH`` when tasks are quick).
        Idle, it waits for an enqueue (PostgreSQL LISTEN/NOTIFY), for the earliest delayed task
        to fall due, or `poll_interval` seconds, whichever comes first. Tasks start highest
        priority first, and a delayed one not before its due time.
        Returns when `stop` is set; `shutdown` then drains or cancels what this pool holds.
        With `burst`, it also returns once the store holds nothing ready to run or running
        (another worker's running tasks included, which may come back if that worker dies) and
        this pool has finished everything it took; delayed tasks are not waited for.

        Raises:
            TaskQueueError: the pool is not durable.
        """
        if not self._durable:
            raise TaskQueueError("serve() needs a durable pool: WorkerPool(..., durable=True)")
        with self._lock:
            self._store_users += 1
        try:
            self._serve(stop, prefetch, poll_interval, burst)
        finally:
            self._release_store()

    def _prefetch(self) -> int:
        """How many durable rows to hold: twice the workers, or for quick tasks about
        PREFETCH_BUDGET_SECONDS of their work (at most MAX_PREFETCH), so that one take feeds many
        quick tasks while slow ones stay in the store for other workers to take."""
        quick = int(self._workers * PREFETCH_BUDGET_SECONDS / self._per_call)
        return max(2 * self._workers, min(MAX_PREFETCH, self._flow.lease_ahead(quick)))

    def _serve(
        self, stop: threading.Event, prefetch: int | None, poll_interval: float, burst: bool
    ) -> None:
        rows = self._rows
        self._heartbeat()
        outage_noticed: float | None = None  # when the last "unavailable" warning was logged
        backoff = 0.05
        while not stop.is_set():
            limit = prefetch or self._prefetch()
            with self._changed:
                # Refill in chunks, once half the prefetch is done: one take for many tasks,
                # and the workers never run dry while a take is on its way.
                while self._pending > limit // 2 and not stop.is_set():
                    self._changed.wait(0.5)
                room = limit - self._pending
            if stop.is_set() or self._closed:
                break
            try:
                leased = rows.take_many(room, self._retry.max_attempts, self.queues)
            except Exception as exc:
                # The database stayed unreachable past the store's own retries (a server down
                # longer than its reconnect window, a file locked or gone): a worker keeps
                # trying with backoff, under its running jobs, and says so once a minute.
                now = time.monotonic()
                if outage_noticed is None or now - outage_noticed >= _OUTAGE_NOTICE_INTERVAL:
                    outage_noticed = now
                    logger.warning("the database is unavailable (%s); retrying", _first_line(exc))
                stop.wait(_jitter_random.uniform(backoff / 2, backoff))
                backoff = min(backoff * 2, _OUTAGE_MAX_BACKOFF)
                continue
            if outage_noticed is not None:
                logger.warning("the database is available again")
                outage_noticed = None
            backoff = 0.05
            if not leased:
                if burst:
                    left = self._burst_left(stop)
                    if left == (0, 0):
                        return
                    if left is not None and left[0]:
                        # Ready rows another worker may be taking: look again in a moment.
                        rows.wait_for_work(min(poll_interval, 0.1), stop)
                        continue
                rows.wait_for_work(self._idle_wait(rows, poll_interval), stop)
                continue
            for position, item in enumerate(leased):
                try:
                    fp = fingerprint(item.task.payload)
                    # Wait for room whatever on_full says: these rows are leased to this pool
                    # already, and a refusal would strand the rest of them.
                    self._accept(item.task, fp, time.perf_counter(), item.token, block=True,
                                 priority=item.priority)  # fmt: skip
                except BaseException as exc:
                    # _accept gave this row back; the rest go back too, for any worker to take.
                    rest = leased[position + 1 :]
                    self._rows.give_back([(q.task.id, q.token) for q in rest])
                    if isinstance(exc, PoolClosedError):
                        return
                    raise

    def _burst_left(self, stop: threading.Event) -> tuple[int, int] | None:
        """Wait until this pool has finished what it took; then return the store's count of
        tasks ready to run and running (None when the store cannot say now)."""
        with self._changed:
            # A running task may fail and leave a retry, or hold a row: the store's view is
            # final only once this pool holds nothing. Short waits, so a stop is seen.
            while self._pending and not stop.is_set():
                self._changed.wait(0.5)
        if stop.is_set():
            return None
        try:
            status = self._rows.queue_status()
        except Exception as exc:
            logger.warning("reading the queue failed (%s); trying again", _first_line(exc))
            return None
        # A queue's "queued" are its ready tasks: a burst does not wait for delayed ones.
        mine = [entry for name, entry in status["queues"].items()
                if self.queues is None or name in self.queues]  # fmt: skip
        return (sum(entry[EntryState.QUEUED.value] for entry in mine),
                sum(entry[EntryState.RUNNING.value] for entry in mine))  # fmt: skip

    @staticmethod
    def _idle_wait(rows: _DurableRows | _NoRows, poll_interval: float) -> float:
        """Seconds an idle worker waits for work: `poll_interval`, or until the earliest delayed
        task falls due, whichever comes first (an enqueue may wake it sooner)."""
        try:
            due = rows.next_run_at()
        except Exception:
            return poll_interval  # the take that follows reports an outage
        if due is None:
            return poll_interval
        # Just past the due time, so that the take finds the task due by the store's clock.
        return min(poll_interval, max(due - time.time(), 0.0) + 0.001)

    def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stop accepting tasks, finish the accepted ones and stop the threads.

        Args:
            wait: block until every accepted task has finished and the threads have stopped
                (ignored when called from a handler or a done-callback, which would wait for
                itself). A delayed task counts as accepted: it runs when it falls due.
            cancel_pending: resolve queued tasks, delayed tasks still waiting, and tasks polling
                another process's claim, as cancelled (their keys stay unclaimed; a durable row
                goes back to the queue with its due time); running tasks, including those waiting
                out a retry backoff, always finish.
        """
        if wait and (self._queue.in_worker() or self._in_own_thread()):
            # Called from a handler or a done-callback: waiting would wait for itself.
            wait = False
        with self._lock:
            self._closed = True
            if cancel_pending:
                self._cancelling = True
        if cancel_pending:
            self._cancel_waiting()
        try:
            with self._changed:
                idle = self._pending == 0
                if wait:
                    while self._pending:
                        self._changed.wait()
                    idle = True
        except BaseException:
            # Interrupted while waiting (a second Ctrl-C): what has not started is cancelled,
            # running tasks finish on their own, and the interrupt goes on to the caller.
            with self._lock:
                self._cancelling = True
            self._cancel_waiting()
            raise
        if idle:
            self._stop_threads(wait)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        # Leaving on an exception cancels the queued work (a rerun picks it up) instead of
        # running all of it before the exception can surface; running tasks finish.
        self.shutdown(cancel_pending=exc_type is not None)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<WorkerPool {state} workers={self._workers} pending={self._pending}>"

    # Worker path --------------------------------------------------------------------------------
    #
    # A worker takes a batch of jobs from the queue, claims the unclaimed ones in one transaction,
    # calls the handler for each job it owns, and completes the successes in one transaction
    # before resolving their futures. Batches are sized so that their handler time stays near
    # BATCH_BUDGET_SECONDS: one job at a time for slow I/O, dozens for tiny tasks, where the
    # per-transaction cost would otherwise dominate.

    def _batch_limit(self) -> int:
        if self._runner is not None:
            # A dispatcher takes only what free slots can start now, so that what waits stays in
            # the queue (cancellable, unclaimed) instead of claimed in a dispatcher's hands.
            return max(1, min(ASYNC_MAX_BATCH, self._runner.free_slots()))
        per_call = self._per_call
        if per_call > BATCH_BUDGET_SECONDS:
            # Slow calls: one claim round for a few jobs; the worker runs the first and gives
            # the others, claimed, back to the front of the queue (see _call_handler), so the
            # next free workers start them without waiting for a claim of their own.
            return CLAIM_AHEAD
        return max(1, min(MAX_BATCH, int(BATCH_BUDGET_SECONDS / per_call)))

    def _process_batch(self, jobs: list[_Job]) -> None:
        outcomes: list[_JobOutcome] = []
        try:
            self._run_batch(jobs, outcomes)
        except BaseException as exc:
            # The store failed under us (disk full, closed database): the jobs this batch still
            # holds fail, the worker lives on, and their leases let a rerun take the keys.
            logger.exception("internal error while running %d jobs", len(jobs))
            error = f"internal error: {_describe(exc)}"
            finished = {id(outcome.job) for outcome in outcomes}
            stranded = [job for job in jobs if job.batch is jobs and id(job) not in finished]
            held = [(job.key, job.token, error) for job in stranded if job.token is not None]
            if held:
                try:
                    self._idempotency.release_many(held)  # a later run may take them at once
                except Exception:
                    logger.exception(
                        "releasing %d claims failed; their leases will expire", len(held)
                    )
            for job in stranded:
                job.token = None
                outcomes.append(
                    _JobOutcome(job, TaskStatus.FAILED, error=error, kind=ErrorKind.TRANSIENT)
                )
        if outcomes:
            self._finish_many(outcomes)

    def _run_batch(self, jobs: list[_Job], outcomes: list[_JobOutcome]) -> None:
        cancelling = self._cancelling
        owned: list[_Job] = []
        unclaimed: list[_Job] = []
        fresh = 0
        with self._lock:
            # Taking a job and abandoning it (_abandon, after an interrupted submit) exclude each
            # other here: a job is either run by this worker or withdrawn, never both.
            live = [job for job in jobs if not job.done]
            for job in live:
                if not job.dequeued:
                    job.dequeued = True
                    fresh += 1
        withdrawn: list[_Job] = []
        for job in live:
            job.batch = jobs
            if job.token is not None:
                if cancelling and _never_called(job):
                    withdrawn.append(job)  # claimed ahead by another worker: not started yet
                else:
                    owned.append(job)  # a retry, or a job handed over by another worker
            elif cancelling:
                outcomes.append(_JobOutcome(job, TaskStatus.CANCELLED))
            else:
                unclaimed.append(job)
        if fresh:
            self._metrics.record_dequeue(fresh)
        if withdrawn:
            self._withdraw(withdrawn)
            outcomes.extend(_JobOutcome(job, TaskStatus.CANCELLED) for job in withdrawn)
        if unclaimed:
            # A task waits for its rate limit's slot before its claim: unclaimed, cancellable.
            unclaimed = self._flow.admit_all(unclaimed, self._park_for_rate)
        if unclaimed:
            owned.extend(self._committer.claim(unclaimed, outcomes))
        if not owned:
            return
        unrecorded = [job for job in owned if job.unrecorded is not None]
        if unrecorded:
            # Their handler ran already: only the completion is left to record.
            owned = [job for job in owned if job.unrecorded is None]
            self._hand_over([(job, *job.unrecorded) for job in unrecorded])  # type: ignore[misc]  # not None: filtered
        if not owned:
            return
        if self._runner is None:
            self._hand_over(self._call_handler(owned, outcomes))
        else:
            self._dispatch(owned)

    def _hand_over(self, done: list[_Done]) -> None:
        """Give successes to the committer: it records them while this worker goes on."""
        if done:
            for job, _, _ in done:
                job.batch = None  # the committer's now, not this batch's
            self._committer.record(done)

    def _dispatch(self, jobs: list[_Job]) -> None:
        """Start an async handler call for each owned job (blocks while `workers` calls run)."""
        runner = self._runner
        assert runner is not None
        start = self._flow.start
        ready = []
        for job in jobs:
            wait = start(job)
            if wait is None:
                ready.append(job)
            else:
                self._hand_off(job, wait)  # claimed: it waits for its slot off the dispatcher
        jobs = ready
        now = time.perf_counter()
        waits = []
        for job in jobs:
            job.batch = None  # the completer owns it from here
            job.attempts += 1
            if job.started_at is None:
                job.started_at = now
                waits.append(now - job.enqueued_at)
        if waits:
            self._metrics.record_starts(waits, dequeued=False)
        runner.start(jobs)

    def _record(self, finished: list[_Finished], done: list[_Done]) -> None:
        """Record a round of finished work (the committer's thread).

        Finished async calls are classified first (retries, failures, outputs); then every
        success is completed in one transaction, and only then do their futures resolve.
        """
        outcomes: list[_JobOutcome] = []
        busy = 0.0
        try:
            for job, output, error, seconds in finished:
                busy += seconds
                if error is not None:
                    self._on_error(job, error, outcomes)
                    continue
                self._encoded(job, output, done, outcomes)
            if finished:
                self._metrics.record_attempt(busy, len(finished))
            self._complete(done, outcomes)
        except BaseException as exc:
            logger.exception("internal error while recording %d results", len(done))
            error_text = f"internal error: {_describe(exc)}"
            # The successes whose completion did not happen still hold their claims: fail them
            # and release the claims, so that a rerun may take the keys at once.
            finished_ids = {id(outcome.job) for outcome in outcomes}
            stranded = [job for job, _, _ in done if id(job) not in finished_ids
                        and job.token is not None]  # fmt: skip
            for job in stranded:
                outcomes.append(self._fail(job, error_text, ErrorKind.TRANSIENT))
        if outcomes:
            self._finish_many(outcomes)

    def _claim(self, jobs: list[_Job], outcomes: list[_JobOutcome]) -> list[_Job]:
        """Claim the jobs' keys in one transaction; return the jobs this worker now owns."""
        namespace = self.namespace
        # The durable rows of the jobs about to run count their started runs in the claim's
        # transaction (see Store.claim_many); run alone, each item carries its own row.
        try:
            claims = _each_alone(
                lambda items: self._claimer.claim_many(
                    [item for item, _ in items],
                    namespace=namespace,
                    starts=[entry for _, entry in items if entry is not None],
                ),
                [
                    (
                        (job.key, job.fingerprint),
                        (job.task.id, job.entry) if job.entry is not None else None,
                    )
                    for job in jobs
                ],
            )
        except Exception as exc:
            if not self._durable:
                raise
            claims = [exc] * len(jobs)
        now = time.perf_counter()
        owned = []
        waits = []  # jobs answered without a handler call start (and finish) now
        held_elsewhere = False
        for job, claim in zip(jobs, claims, strict=True):
            if isinstance(claim, Exception):
                if self._durable:
                    self._after_store_error(job, claim)  # a worker rides out an outage
                    continue
                error = f"internal error: {_describe(claim)}"
                outcomes.append(
                    _JobOutcome(job, TaskStatus.FAILED, error=error, kind=ErrorKind.TRANSIENT)
                )
                continue
            job.store_failures = 0
            state = claim.state
            if state is ClaimState.CLAIMED:
                job.token = claim.token
                owned.append(job)
                continue
            if job.permits is not None:
                self._flow.give_back(job)  # answered without a call
            if state is ClaimState.IN_PROGRESS:
                self._hand_off(job, self._poll_delay(job, claim.lease_expires))
                held_elsewhere = True
                continue
            if job.started_at is None:
                job.started_at = now
                waits.append(now - job.enqueued_at)
            if state is ClaimState.COMPLETED:
                outcomes.append(_JobOutcome(job, TaskStatus.DUPLICATE, output=claim.output))
            else:
                error = str(IdempotencyConflictError(job.key))
                outcomes.append(
                    _JobOutcome(job, TaskStatus.FAILED, error=error, kind=ErrorKind.CONFLICT)
                )
        if waits:
            self._metrics.record_starts(waits, dequeued=False)
        if held_elsewhere:
            self._notice_waits()
        return owned

    def _notice_waits(self) -> None:
        """Log what the pool waits for when keys are held by another owner (once a minute).

        After a crash, a rerun waits out the dead run's leases; without this it would wait in
        silence. The count covers every live claim of this namespace that this pool does not hold.
        """
        now = time.monotonic()
        with self._lock:
            last = self._wait_notice_at
            if last is not None and now - last < _WAIT_NOTICE_INTERVAL:
                return
            self._wait_notice_at = now
            own = {job.token for job in self._inflight.values() if job.token is not None}
        try:
            claims = self._idempotency.live_claims(self.namespace)
        except Exception:
            logger.debug("reading the live claims failed", exc_info=True)
            return
        others = [expires for token, expires in claims if token not in own]
        if not others:
            return
        earliest = min(others)
        logger.warning(
            "waiting for %d keys held by another owner (a stopped run or another process) until "
            "their leases expire; the earliest expires at %s (in %.1f s)",
            len(others),
            time.strftime("%H:%M:%S", time.localtime(earliest)),
            max(earliest - time.time(), 0.0),
        )

    def _call_handler(
        self, jobs: list[_Job], outcomes: list[_JobOutcome]
    ) -> list[tuple[_Job, Any, str]]:
        """Run one attempt of each job; return the successes with their outputs as JSON text."""
        handler = self._handler
        start, begin = self._flow.start, self._flow.begin
        task_timeout = self._task_timeout
        clock = time.perf_counter
        done: list[tuple[_Job, Any, str]] = []
        waits: list[float] = []  # a job starts at its first handler call
        busy = 0.0
        calls = 0
        if len(jobs) > 1 and self._per_call > BATCH_BUDGET_SECONDS:
            # Claimed ahead (see _batch_limit): the next free workers start the others now.
            for rest in reversed(jobs[1:]):
                self._hand_off(rest, None)
            jobs = jobs[:1]
        for index, job in enumerate(jobs):
            if busy > BATCH_BUDGET_SECONDS and index:
                # The handlers turned out slow: other workers take the rest now.
                for rest in reversed(jobs[index:]):
                    self._hand_off(rest, None)
                break
            wait = start(job)
            if wait is None and not begin(job):
                wait = 0.0  # its slot lapsed on the way (a thread switch): take another
            if wait is not None:
                self._hand_off(job, wait)  # claimed: it waits for its slot off the worker
                continue
            task = job.task
            timeout = task.timeout if task.timeout is not None else task_timeout
            job.attempts += 1
            began = clock()
            if job.started_at is None:
                job.started_at = began
                waits.append(began - job.enqueued_at)
                if len(jobs) == 1:  # a slow task: show it in flight while it runs
                    self._metrics.record_starts(waits, dequeued=False)
                    waits = []
            try:
                if timeout is None:
                    output = handler(task)
                else:
                    output = _call_with_deadline(handler, task, timeout)
            except BaseException as exc:
                busy += clock() - began
                calls += 1
                if waits:
                    # A retry may finish on another worker before this batch ends: its start
                    # must be counted first, or in_flight would never come back to zero.
                    self._metrics.record_starts(waits, dequeued=False)
                    waits = []
                self._on_error(job, exc, outcomes)
                continue
            busy += clock() - began
            calls += 1
            self._encoded(job, output, done, outcomes)
        if waits:
            self._metrics.record_starts(waits, dequeued=False)
        if calls:
            self._metrics.record_attempt(busy, calls)
            # A racy read-modify-write of one float: a lost update only nudges a batch size.
            self._per_call = 0.5 * self._per_call + 0.5 * max(busy / calls, 1e-7)
        return done

    def _complete(self, done: list[tuple[_Job, Any, str]], outcomes: list[_JobOutcome]) -> None:
        """Commit the successes in one transaction, before any of their futures resolves."""
        if not done:
            return
        # A durable job's row is marked done in the completion's own transaction; both count
        # the run's retries (its first call was counted when it started).
        items = [((job.key, job.token, text, _retries(job.attempts)), job.task.id, job.entry)
                 for job, _, text in done]  # fmt: skip

        def complete(batch: list[Any]) -> list[bool]:
            settle = [(index, task_id, entry, item[3])
                      for index, (item, task_id, entry) in enumerate(batch)
                      if entry is not None]  # fmt: skip
            return self._idempotency.complete_many([item for item, _, _ in batch], settle=settle)

        try:
            written = _each_alone(complete, items)
        except Exception as exc:
            if not self._durable:
                raise
            written = [exc] * len(done)
        for (job, output, text), ok in zip(done, written, strict=True):
            if isinstance(ok, Exception):
                if self._durable:
                    # The handler ran: keep its output and the claim, and record it once the
                    # store answers again (or report the new owner's result if the lease is lost).
                    job.unrecorded = (output, text)
                    self._after_store_error(job, ok)
                    continue
                error = f"internal error: {_describe(ok)}"
                outcomes.append(self._fail(job, error, ErrorKind.TRANSIENT))
                continue
            job.unrecorded = None
            job.store_failures = 0
            job.token = None
            if ok:
                job.entry = None  # settled as done with the completion
                outcomes.append(_JobOutcome(job, TaskStatus.SUCCEEDED, output=output))
            else:
                # The lease ran out and another owner took the key: report that owner's result.
                logger.warning("lost the claim on %r; waiting for the new owner's result", job.key)
                self._hand_off(job, self._poll_delay(job, None))

    def _encoded(
        self, job: _Job, output: Any, done: list[_Done], outcomes: list[_JobOutcome]
    ) -> None:
        """Add a success to `done` with its output's JSON, or fail it if there is none."""
        try:
            done.append((job, output, _encode_output(output)))
        except Exception as exc:  # TypeError, ValueError, RecursionError for deep nesting
            error = f"handler output is not JSON-serialisable: {_describe(exc)}"
            outcomes.append(self._fail(job, error, ErrorKind.PERMANENT))

    def _after_store_error(self, job: _Job, exc: Exception) -> None:
        """Try a job's claim or completion again after a backoff (durable pools only).

        A worker serving a durable queue outlives a database outage: its jobs wait off the
        workers, with growing pauses, and say so at most once a minute.
        """
        job.store_failures += 1
        now = time.monotonic()
        with self._lock:
            last = self._store_error_notice_at
            say = last is None or now - last >= _OUTAGE_NOTICE_INTERVAL
            if say:
                self._store_error_notice_at = now
        if say:
            logger.warning(
                "the database is unavailable (%s); holding finished and claimed tasks until it "
                "answers again",
                _first_line(exc),
            )
        cap = min(_OUTAGE_MAX_BACKOFF, 0.05 * 2 ** min(job.store_failures, 10))
        self._hand_off(job, _backoff_random.uniform(cap / 2, cap))

    def _on_error(self, job: _Job, exc: BaseException, outcomes: list[_JobOutcome]) -> None:
        if self._retry.should_retry(exc, job.attempts):
            self._metrics.record_retry()
            delay = self._retry.delay(job.attempts)
            # The server said when to come back: at least that long, whatever max_delay says.
            retry_after = getattr(exc, "retry_after", None)
            if isinstance(exc, TransientError) and retry_after is not None:
                delay = max(delay, retry_after)
            self._hand_off(job, delay)
            return
        if isinstance(exc, _DeadlineExceeded):
            kind = ErrorKind.TIMEOUT
        elif self._retry.is_transient(exc):
            kind = ErrorKind.TRANSIENT
        else:
            kind = ErrorKind.PERMANENT
        outcomes.append(self._fail(job, _describe(exc), kind))

    def _fail(self, job: _Job, error: str, kind: ErrorKind) -> _JobOutcome:
        """Release the job's claim (the key becomes claimable again) and return its failure."""
        token, job.token = job.token, None
        if token is not None:
            try:
                self._idempotency.release(job.key, token, error, retries=_retries(job.attempts))
            except Exception:
                # The failure stands; the claim's lease expires and a rerun takes the key then.
                logger.exception("releasing the claim on %r failed", job.key)
        return _JobOutcome(job, TaskStatus.FAILED, error=error, kind=kind)

    def _hand_off(self, job: _Job, delay: float | None) -> None:
        """Pass a job on: back to the front of the queue now, or to the scheduler after `delay`."""
        job.batch = None
        if self._cancelling and (job.token is None or _never_called(job)):
            # Cancelled while it was in a worker's or the committer's hands (polling another
            # owner's claim, or claimed ahead): it must not sit out that claim's lease first,
            # nor start now.
            self._withdraw([job])
            self._finish_many([_JobOutcome(job, TaskStatus.CANCELLED)])
            return
        if delay is None:
            self._queue.put_ready(job, job.priority)
        else:
            if job.permits is not None:
                self._flow.give_back(job)  # slots are not kept through a wait
            self._scheduler.schedule(delay, job)

    def _due(self, job: _Job) -> None:
        """Put a job whose wait ended back in the queue, past the bound (the scheduler's thread).

        A submission whose delay ended joins the back of its priority, as if submitted now; a
        retry or a poll goes to the front of its priority: it has started already; a task that
        waited for a rate limit goes to the front of its priority, into the room it kept.
        """
        if job.delayed:
            job.delayed = False
            self._metrics.record_queued()
            self._queue.put_overflow(job, job.priority)
        elif job.held:
            job.held = False
            self._queue.put_held(job, job.priority)
        else:
            self._queue.put_ready(job, job.priority)

    def _park_for_rate(self, job: _Job, delay: float) -> None:
        """Park an unclaimed job until its rate limit may have a slot, keeping its queue room.

        A task waiting for a rate limit still waits in the queue, as far as producers are
        concerned: they feel the limit as backpressure instead of filling memory.
        """
        job.batch = None
        if self._cancelling:
            self._finish_many([_JobOutcome(job, TaskStatus.CANCELLED)])
            return
        job.held = True
        self._queue.hold()
        self._scheduler.schedule(delay, job)

    def _restart_call(self, job: _Job) -> None:
        """Take back an async call that could not begin (its slots lapsed on the way to the
        loop): it was counted as an attempt, and goes back for new slots (the loop calls this)."""
        job.attempts -= 1
        self._hand_off(job, 0.0)

    def _wake_waiting(self, limiter: Any, count: int) -> None:
        """Send up to `count` tasks parked for `limiter` back to the queue now: a take brought
        slots for them, which must be used within moments (claimed ones first: they need no
        claim before their call)."""
        self._scheduler.wake(
            lambda job: job.waits_on is limiter, count, first=lambda job: job.token is None
        )

    def _unhold(self, jobs: Iterable[_Job]) -> None:
        """Give up the queue room of parked jobs that will not come back."""
        held = 0
        for job in jobs:
            if job.held:
                job.held = False
                held += 1
        if held:
            self._queue.unhold(held)

    def _poll_delay(self, job: _Job, lease_expires: float | None) -> float:
        delay: float = min(self._poll_interval * 2 ** min(job.polls, 10), 1.0)
        job.polls += 1
        if lease_expires is not None:
            # Look again just after the owner's lease ends, to take over a dead owner's key.
            delay = min(delay, max(lease_expires - time.time(), 0.0) + 0.001)
        return delay

    # Bookkeeping --------------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Extend the leases of this pool's durable-queue rows and say it is alive."""
        snap = self._metrics.snapshot()
        info = {"host": socket.gethostname(), "pid": os.getpid(), "workers": self._workers,
                "in_flight": snap["in_flight"], "succeeded": snap["succeeded"],
                "failed": snap["failed"], "duplicates": snap["duplicates"],
                "lease_seconds": self._idempotency.lease_seconds,
                "heartbeat_seconds": round(self._idempotency.lease_seconds / 3, 3),
                "queues": None if self.queues is None else list(self.queues)}  # fmt: skip
        with self._lock:
            entries = [(job.task.id, job.entry) for job in self._inflight.values()
                       if job.entry is not None]  # fmt: skip
            entries += [
                (follower.task.id, follower.entry)
                for job in self._inflight.values()
                for follower in job.followers
                if follower.entry is not None
            ]
        self._rows.heartbeat(info, entries)

    def _keep_leases(self) -> None:
        """Say this pool is alive, write its history and renew the claims it holds (the lease
        keeper's thread, every third of a lease)."""
        self._heartbeat()
        self._rows.record_history()
        held = self._held_claims()
        if not held:
            return
        try:
            renewed = self._idempotency.renew_many(held)
        except Exception as exc:
            # An outage is not a bug: one line, and the next round tries again.
            logger.warning("renewing %d leases failed: %s", len(held), _first_line(exc))
            return
        if renewed < len(held):
            # Claims that finished since the snapshot are not lost: count only those still held.
            lost = len(set(held) & set(self._held_claims())) - renewed
            if lost > 0:
                logger.warning("%d of %d claims were lost to lease expiry", lost, len(held))

    def _held_claims(self) -> list[tuple[str, int]]:
        with self._lock:
            jobs = list(self._inflight.values())
        return [(job.key, token) for job in jobs if (token := job.token) is not None]

    def _finish_many(self, outcomes: list[_JobOutcome]) -> None:
        """Resolve jobs and their followers, record their metrics, and stop the pool if idle."""
        now = time.perf_counter()
        retired = []
        with self._lock:
            for outcome in outcomes:
                job = outcome.job
                if job.done:
                    continue
                if job.permits is not None or job.waits_on is not None:
                    self._flow.forget(job)
                job.done = True
                if self._inflight.get(job.key) is job:
                    del self._inflight[job.key]
                retired.append((outcome, job.followers))
                job.followers = []
            self._pending -= len(retired)
            idle = self._pending == 0
            if retired:
                self._changed.notify_all()
            stop = idle and self._closed
        counted: list[Outcome] = []
        resolved: list[tuple[concurrent.futures.Future[TaskRecord] | _Slot, TaskRecord]] = []
        settle: list[tuple[str, int, TaskStatus, str | None, str | None, int]] = []
        for outcome, followers in retired:
            job = outcome.job
            status = outcome.status
            kind = outcome.kind
            text = None if kind is None else kind.value  # what metrics and the store keep
            record = _task_record(
                job.task, status, now, output=outcome.output, error=outcome.error, kind=kind,
                attempts=job.attempts, enqueued_at=job.enqueued_at, started_at=job.started_at,
            )  # fmt: skip
            started = job.started_at is not None
            service = now - job.started_at if job.started_at is not None else None
            latency = now - job.enqueued_at
            queued = not job.dequeued and not job.delayed
            counted.append(Outcome(status, text, latency, service, started, queued))
            resolved.append((job.future, record))
            if job.entry is not None:
                settle.append((job.task.id, job.entry, status, outcome.error, text,
                               _retries(job.attempts)))  # fmt: skip
            # A follower shares the outcome; a success it joined is a duplicate to it.
            shared = TaskStatus.DUPLICATE if status is TaskStatus.SUCCEEDED else status
            for follower in followers:
                task = follower.task
                latency = now - follower.enqueued_at
                counted.append(Outcome(shared, text, latency, None, False, False))
                resolved.append((follower.future, _task_record(
                    task, shared, now, output=outcome.output, error=outcome.error, kind=kind,
                    enqueued_at=follower.enqueued_at,
                )))  # fmt: skip
                if follower.entry is not None:
                    settle.append((task.id, follower.entry, shared, outcome.error, text, 0))
        if settle:
            self._rows.settle(settle)
        self._metrics.record_outcomes(counted)
        escaped = _resolve_all(resolved)
        if stop:
            self._stop_threads(wait=False)
        if escaped is not None:
            raise escaped

    def _refuse(
        self, task: Task, now: float, error: str, kind: ErrorKind
    ) -> concurrent.futures.Future[TaskRecord]:
        """Resolve a submission that fails before it is queued (conflict, bad payload)."""
        if self._closed:
            raise PoolClosedError()
        return self._refused(task, now, error, kind)

    def _refused(
        self, task: Task, now: float, error: str, kind: ErrorKind
    ) -> concurrent.futures.Future[TaskRecord]:
        """Count and resolve a submission refused at once (see `_refuse`)."""
        self._metrics.record_enqueue(queued=False)
        self._metrics.record_failure(kind.value, 0.0, started=False)
        return _resolved(
            _task_record(task, TaskStatus.FAILED, now, error=error, kind=kind, enqueued_at=now)
        )

    def _abandon(self, job: _Job, error: str) -> None:
        """Undo a submission that did not get into the queue.

        Submissions that joined it were accepted (their `submit` returned): the first of them
        takes its place in the queue, past the bound, and the others follow it. Only a closed pool
        fails them. Does nothing if a worker has taken the job meanwhile: it then runs to its end.
        """
        heir = None
        with self._lock:
            if job.dequeued or job.done:
                return
            job.done = True
            if self._inflight.get(job.key) is job:
                del self._inflight[job.key]
            followers, job.followers = job.followers, []
            if followers and not self._closed:
                first = followers.pop(0)
                heir = _Job(first.task, job.fingerprint, first.future, first.enqueued_at,
                            first.entry, job.priority)  # fmt: skip
                heir.followers, followers = followers, []
                self._inflight[heir.key] = heir  # the pending count passes to the heir
            else:
                self._pending -= 1
            idle = self._pending == 0
            self._changed.notify_all()
            stop = idle and self._closed
        if heir is not None:
            self._metrics.record_queued()
            self._queue.put_overflow(heir, heir.priority)
            self._rows.give_back([(job.task.id, job.entry)])
            return
        now = time.perf_counter()
        kind = ErrorKind.TRANSIENT
        self._metrics.record_outcomes(
            Outcome(TaskStatus.FAILED, kind.value, now - follower.enqueued_at, None, False, False)
            for follower in followers
        )
        # Durable rows stay in the store, back in the queue, for any worker to take.
        self._rows.give_back([(job.task.id, job.entry)] + [(f.task.id, f.entry) for f in followers])
        escaped = _resolve_all(
            (follower.future, _task_record(follower.task, TaskStatus.FAILED, now, error=error,
                                           kind=kind, enqueued_at=follower.enqueued_at))
            for follower in followers
        )  # fmt: skip
        if stop:
            self._stop_threads(wait=False)
        if escaped is not None:
            raise escaped

    def _cancel_waiting(self) -> None:
        """Cancel the jobs that have not started: queued ones, those polling another owner's
        claim, and those waiting for a rate limit before their first call."""
        cancelled = []
        withdrawn = []
        for job in self._queue.drain():
            if job.token is None:
                cancelled.append(_JobOutcome(job, TaskStatus.CANCELLED))
            elif _never_called(job):
                withdrawn.append(job)  # claimed ahead by a worker, not started
            else:
                # Owned: a retry whose backoff ended runs to the end.
                self._queue.put_ready(job, job.priority)
        if withdrawn:
            self._withdraw(withdrawn)
            cancelled.extend(_JobOutcome(job, TaskStatus.CANCELLED) for job in withdrawn)
        parked = self._scheduler.remove(_unstarted)
        self._withdraw(parked)
        cancelled.extend(_JobOutcome(job, TaskStatus.CANCELLED) for job in parked)
        if cancelled:
            self._finish_many(cancelled)

    def _withdraw(self, parked: list[_Job]) -> None:
        """Undo what parked jobs about to be cancelled hold: queue room, and the claims of those
        that waited for a rate limit after their claim (released: a rerun takes them at once)."""
        self._unhold(parked)
        claims = []
        for job in parked:
            if job.token is not None:
                claims.append((job.key, job.token, "cancelled before its first call"))
                job.token = None
        if claims:
            try:
                self._idempotency.release_many(claims)
            except Exception:
                logger.exception("releasing %d claims failed; their leases expire", len(claims))

    def _in_own_thread(self) -> bool:
        """Return whether the caller is the committer (done-callbacks run there) or the loop."""
        return threading.get_ident() in self._own_threads

    def _cancel_queued(self, futures: set[Any]) -> None:
        """Cancel the jobs behind `futures` (futures or slots) that no worker has started (see
        `iter_results`)."""

        def ours(job: _Job) -> bool:
            # A job that other callers' submissions joined is theirs too: it still runs.
            return job.future in futures and all(f.future in futures for f in job.followers)

        with self._lock:  # followers join under this lock: none can join between check and take
            jobs = [job for job in self._inflight.values() if not job.dequeued and ours(job)]
            cancelled = [job for job in jobs if self._queue.take_back(job)]
            parked = self._scheduler.remove(lambda job: _unstarted(job) and ours(job))
            cancelled += parked
        self._withdraw(parked)
        if cancelled:
            self._finish_many([_JobOutcome(job, TaskStatus.CANCELLED) for job in cancelled])

    def _stop_threads(self, wait: bool) -> None:
        with self._lock:
            first = not self._stopping
            self._stopping = True
        # Until now the pool stays in _live_pools, so interpreter exit drains what a
        # shutdown(wait=False) left running or waiting out a backoff.
        _live_pools.discard(self)
        if first:
            # Neither thread is ever the caller here, so both can be joined from any thread. An
            # owned store is closed once the worker loops (and an async pool's completer) have
            # ended and no serve() or durable submit still uses it (_release_store).
            self._keeper.stop()
            self._scheduler.stop()
        self._queue.close(wait=wait)
        if first:
            self._committer.stop(wait)
            if self._runner is not None:
                self._runner.stop(wait)
        elif wait:
            # Another thread stopped them without waiting (the last task's finisher): this
            # caller was asked to wait until they have ended.
            self._committer.join()
            if self._runner is not None:
                self._runner.join()

    def _committer_done(self) -> None:
        """The committer's last act: once the worker loops have ended too (they are stopped
        first, and none waits for the committer by then), let go of the store for both."""
        self._queue.wait_stopped()
        self._release_store()

    def _release_store(self) -> None:
        """End one use of the store (see ``_store_users``); the last one closes an owned store."""
        with self._lock:
            self._store_users -= 1
            close = self._store_users == 0
        if close and self._owns_store:
            self._idempotency.close()


async def _aiterate(tasks: Iterable[Task] | AsyncIterable[Task]) -> AsyncIterator[Task]:
    if isinstance(tasks, AsyncIterable):
        async for task in tasks:
            yield task
    else:
        for task in tasks:
            yield task


class AsyncWorkerPool:
    """A `WorkerPool` for code that already runs an event loop.

    Same arguments and guarantees as `WorkerPool`; the handler may be async (its calls run on
    the pool's own loop, in a thread of its own) or plain (it runs on worker threads, never on
    the caller's loop). Nothing here blocks the caller's loop: waiting for room in a full queue,
    for a result or for shutdown happens in awaitables.

    Example::

        async with AsyncWorkerPool(fetch, workers=500, db_path="progress.db") as pool:
            async for record in pool.iter_results(tasks):
                print(record.task_id, record.status)
    """

    def __init__(self, handler: Callable[[Task], Any] | None = None, **kwargs: Any) -> None:
        self._pool = WorkerPool(handler, **kwargs)

    @property
    def metrics(self) -> MetricsCollector:
        return self._pool.metrics

    @property
    def idempotency(self) -> IdempotencyManager:
        return self._pool.idempotency

    @property
    def closed(self) -> bool:
        return self._pool.closed

    async def submit(self, task: Task, *, delay: float = 0.0, priority: int = 0) -> TaskRecord:
        """Submit `task` and return its record once it has finished.

        Waits for room without blocking the loop when the queue is full (``on_full="block"``).
        `delay` and `priority` are `WorkerPool.submit`'s.

        Raises:
            QueueFullError: the queue stayed full (at once with ``on_full="reject"``).
            PoolClosedError: the pool is shut down.
            TypeError, ValueError: `delay` or `priority` is not a number in range.
        """
        return await asyncio.wrap_future(await self._enter(task, delay, priority))

    async def run(self, tasks: Iterable[Task] | AsyncIterable[Task]) -> list[TaskRecord]:
        """Submit every task and return their records in input order."""
        futures = [asyncio.wrap_future(await self._enter(task)) async for task in _aiterate(tasks)]
        return list(await asyncio.gather(*futures))

    async def iter_results(
        self, tasks: Iterable[Task] | AsyncIterable[Task]
    ) -> AsyncIterator[TaskRecord]:
        """Submit tasks lazily and yield their records in completion order.

        At most ``queue_size + workers`` submissions are outstanding at once. Leaving the loop
        early cancels this loop's submissions that are still queued; running ones finish.
        """
        pool = self._pool
        window = pool._queue.maxsize + pool._workers  # noqa: SLF001  # the WorkerPool it wraps
        # Records come back through one inbox: a burst of them wakes this loop once.
        inbox = _LoopInbox(asyncio.get_running_loop())
        put = inbox.put
        ours: set[_Slot] = set()  # submitted and not yet yielded
        try:
            if isinstance(tasks, Sequence) and not pool._durable:  # noqa: SLF001  # the WorkerPool it wraps
                # A sequence's tasks are all there already: the next ones go in together.
                position = 0
                while position < len(tasks):
                    while len(ours) >= window:
                        for record in await self._collect(inbox, ours):
                            yield record
                    room = window - len(ours)
                    taken = pool._submit_chunk(tasks, position, room, put, ours)  # noqa: SLF001  # the WorkerPool it wraps
                    if taken:
                        position += taken
                        continue
                    # The queue is full, or this task needs the path below.
                    async for record in self._submit_one(tasks[position], inbox, ours):
                        yield record
                    position += 1
            else:
                async for task in _aiterate(tasks):
                    while len(ours) >= window:
                        for record in await self._collect(inbox, ours):
                            yield record
                    async for record in self._submit_one(task, inbox, ours):
                        yield record
            while ours:
                for record in await self._collect(inbox, ours):
                    yield record
        finally:
            inbox.close()
            if ours:
                pool._cancel_queued(ours)  # noqa: SLF001  # the WorkerPool it wraps

    async def shutdown(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Shut the pool down as `WorkerPool.shutdown` does, without blocking the loop."""
        await asyncio.to_thread(self._pool.shutdown, wait, cancel_pending)

    async def __aenter__(self) -> AsyncWorkerPool:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        await self.shutdown(cancel_pending=exc_type is not None)

    def __repr__(self) -> str:
        return f"<AsyncWorkerPool of {self._pool!r}>"

    async def _enter(
        self, task: Task, delay: float = 0.0, priority: int = 0, sink: _Slot | None = None
    ) -> Any:
        """Submit `task`; wait for room, or for a durable take, on a thread. Returns its future,
        or `sink` when given and the submission was accepted (see `WorkerPool._submit`)."""
        pool = self._pool
        if not pool._durable:  # noqa: SLF001  # the WorkerPool it wraps
            try:
                return pool._submit(task, probe=True, delay=delay, priority=priority, sink=sink)  # noqa: SLF001  # the WorkerPool it wraps
            except QueueFullError:
                if not pool._block:  # noqa: SLF001  # the WorkerPool it wraps
                    pool.metrics.record_rejection()
                    raise
        return await asyncio.to_thread(
            functools.partial(pool._submit, task, delay=delay, priority=priority, sink=sink)  # noqa: SLF001  # the WorkerPool it wraps
        )

    async def _submit_one(
        self, task: Task, inbox: _LoopInbox, ours: set[_Slot]
    ) -> AsyncIterator[TaskRecord]:
        """Submit one task of `iter_results` into `ours`, yielding the records of ours that finish
        while it waits for room."""
        slot = _Slot(inbox.put)
        while True:
            try:
                future = await self._enter(task, sink=slot)
                break
            except QueueFullError:
                # With on_full="reject" the queue may be full of this loop's own work.
                if not ours:
                    raise
                for record in await self._collect(inbox, ours):
                    yield record
        ours.add(slot)
        if future is not slot:  # refused at once: its future is resolved already
            inbox.put((slot, future.result()))

    @staticmethod
    async def _collect(inbox: _LoopInbox, ours: set[_Slot]) -> list[TaskRecord]:
        """Wait for at least one of `ours` to finish; remove and return the finished records."""
        records = []
        for slot, record in await inbox.get_all():
            ours.discard(slot)
            records.append(record)
        return records


def _shutdown_live_pools() -> None:
    # Runs before the interpreter joins non-daemon threads, so the worker loops get their
    # sentinels instead of hanging the exit; accepted tasks are drained, as ThreadPoolExecutor does.
    for pool in list(_live_pools):
        try:
            pool.shutdown(wait=True)
        except Exception:
            logger.exception("shutting down %r at exit failed", pool)
    for task_queue in list(_live_queues):  # standalone queues; a pool closed its own above
        try:
            task_queue.close(wait=True)
        except Exception:
            logger.exception("closing %r at exit failed", task_queue)


if hasattr(threading, "_register_atexit"):
    threading._register_atexit(_shutdown_live_pools)  # noqa: SLF001  # as concurrent.futures does
else:  # pragma: no cover - Python builds without the hook
    atexit.register(_shutdown_live_pools)


# --- Periodic tasks ------------------------------------------------------------------------------
#
# `task-queue worker --schedule FILE` turns each slot of each schedule into one durable task whose
# id (and so its key) is the schedule's id plus the slot time in UTC, such as
# ``nightly-report@2026-12-01T03:00:00Z``. Every worker carrying the schedule enqueues that same
# id, and an enqueue leaves an id already stored alone: however many workers carry a schedule, a
# slot is one row and runs once, with no scheduler process to keep alive and none to elect.

SCHEDULE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
_SCHEDULE_FILE_FIELDS = frozenset({"id", "cron", "every", "payload", "queue"})
_SLOT_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_CRON_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
_CRON_DAYS = {name: number for number, name in enumerate(("sun", "mon", "tue", "wed", "thu",
                                                          "fri", "sat"))}  # fmt: skip
_CRON_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}  # fmt: skip
# Days a search for the next or latest slot may look through: the Gregorian calendar repeats
# after 400 years (146,097 days), so an expression that matches at all matches within them. A
# search skips the months an expression leaves out, so it visits few of these days. (A star-led
# day of month with a day of week must match both: ``*/7`` of January on a Sunday comes round
# 6 to 11 years apart.)
_CRON_SEARCH_DAYS = 146_097 + 1
_RETRY_ENQUEUE_SECONDS = 5.0  # wait before enqueueing a slot again after the database refused
_LONGEST_NAP = 60.0  # a periodic thread rereads the clock at least this often (clock changes)


@dataclasses.dataclass(frozen=True, slots=True)
class _CronField:
    """One of the five fields of a cron expression: its range and the names it accepts."""

    name: str
    low: int
    high: int
    names: Mapping[str, int] = dataclasses.field(default_factory=dict)
    star_high: int | None = None  # the top of '*' when it differs (day of week: 7 is 0 again)

    def value(self, text: str) -> int:
        """Return the number `text` names, or raise `ValueError` saying why it names none."""
        if text.lower() in self.names:
            return self.names[text.lower()]
        if not re.fullmatch(r"[0-9]{1,4}", text):
            kind = "a number or a name" if self.names else "a number"
            raise ValueError(f"{self.name} {text!r} is not {kind}")
        number = int(text)
        if not self.low <= number <= self.high:
            raise ValueError(f"{self.name} {number} is outside {self.low}-{self.high}")
        return number

    def values(self, text: str) -> frozenset[int]:
        """Expand a field: lists (``a,b``), ranges (``a-b``), steps (``*/n``, ``a-b/n``,
        ``a/n`` = ``a-high/n``) and ``*``.

        Raises:
            ValueError: an empty item, a value out of range, a backwards range or a bad step.
        """
        found: set[int] = set()
        for item in text.split(","):
            span, slash, step_text = item.partition("/")
            step = 1
            if slash:
                if not re.fullmatch(r"[0-9]{1,4}", step_text) or int(step_text) == 0:
                    raise ValueError(f"{self.name} step {step_text!r} is not a positive integer")
                step = int(step_text)
            if not span:
                raise ValueError(f"{self.name} {text!r} has an empty item")
            if span == "*":
                first, last = self.low, self.high if self.star_high is None else self.star_high
            elif "-" in span:
                start, _, end = span.partition("-")
                if not start or not end:
                    raise ValueError(f"{self.name} range {span!r} lacks an end")
                first, last = self.value(start), self.value(end)
                if first > last:
                    raise ValueError(f"{self.name} range {span!r} runs backwards")
            else:
                first = self.value(span)
                last = self.high if slash else first
            found.update(range(first, last + 1, step))
        if self.star_high is not None and self.high in found:
            found = (found - {self.high}) | {self.low}  # day of week 7 is Sunday, 0
        return frozenset(found)


_CRON_FIELDS = (
    _CronField("minute", 0, 59),
    _CronField("hour", 0, 23),
    _CronField("day of month", 1, 31),
    _CronField("month", 1, 12, _CRON_MONTHS),
    _CronField("day of week", 0, 7, _CRON_DAYS, star_high=6),
)
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February 29th exists, sometimes


@dataclasses.dataclass(frozen=True, slots=True)
class _Cron:
    """A five-field cron expression in UTC: minute, hour, day of month, month, day of week.

    As in cron, when both day fields are restricted (neither starts with ``*``) a day matches if
    either does; otherwise both must match.
    """

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 is Sunday
    either_day: bool

    @classmethod
    def parse(cls, expression: str) -> _Cron:
        """Parse `expression` (five fields, or a macro such as ``@daily``).

        Raises:
            ValueError: the expression is invalid or never matches; the message says where.
        """
        text = _CRON_MACROS.get(expression.strip().lower(), expression)
        fields = text.split()
        if len(fields) != 5:
            raise ValueError(
                f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}"
            )
        minutes, hours, days, months, weekdays = (
            spec.values(field) for spec, field in zip(_CRON_FIELDS, fields, strict=True)
        )
        either_day = not fields[2].startswith("*") and not fields[4].startswith("*")
        # With the day of week unrestricted, the date alone decides: it must exist somewhere.
        if not either_day and not any(
            day <= _MONTH_DAYS[month - 1] for day in days for month in months
        ):
            raise ValueError("the day of month never occurs in those months")
        cron = cls(expression, tuple(sorted(minutes)), tuple(sorted(hours)), days, months,
                   weekdays, either_day)  # fmt: skip
        try:
            cron.next_after(0.0)  # a whole calendar cycle: it matches somewhere or never
        except ValueError:
            raise ValueError("the day of month never falls on those days of the week") from None
        return cron

    def _day_matches(self, day: datetime.date) -> bool:
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        return (by_date or by_weekday) if self.either_day else (by_date and by_weekday)

    def next_after(self, moment: float) -> float:
        """Return the first matching minute strictly after `moment` (Unix seconds)."""
        start = datetime.datetime.fromtimestamp(
            (math.floor(moment / 60) + 1) * 60, datetime.timezone.utc
        )
        day, hour, minute = start.date(), start.hour, start.minute
        end = day.toordinal() + _CRON_SEARCH_DAYS
        try:
            while day.toordinal() <= end:
                if day.month not in self.months:  # on to the first day of the next month
                    day = (day.replace(day=1) + datetime.timedelta(days=32)).replace(day=1)
                    hour = minute = 0
                    continue
                if self._day_matches(day):
                    for h in self.hours:
                        for m in self.minutes:
                            if (h, m) >= (hour, minute):
                                return _utc_seconds(day, h, m)
                day += datetime.timedelta(days=1)
                hour = minute = 0
        except OverflowError:  # past the year 9999
            pass
        raise ValueError(f"cron {self.expression!r} matches no time")  # excluded by parse

    def latest(self, moment: float) -> float | None:
        """Return the last matching minute at or before `moment` (Unix seconds)."""
        start = datetime.datetime.fromtimestamp(math.floor(moment / 60) * 60, datetime.timezone.utc)
        day, hour, minute = start.date(), start.hour, start.minute
        end = day.toordinal() - _CRON_SEARCH_DAYS
        try:
            while day.toordinal() >= end:
                if day.month not in self.months:  # back to the last day of the month before
                    day = day.replace(day=1) - datetime.timedelta(days=1)
                    hour, minute = 23, 59
                    continue
                if self._day_matches(day):
                    for h in reversed(self.hours):
                        for m in reversed(self.minutes):
                            if (h, m) <= (hour, minute):
                                return _utc_seconds(day, h, m)
                day -= datetime.timedelta(days=1)
                hour, minute = 23, 59
        except OverflowError:  # before the year 1
            pass
        return None


def _utc_seconds(day: datetime.date, hour: int, minute: int) -> float:
    moment = datetime.datetime(day.year, day.month, day.day, hour, minute,
                               tzinfo=datetime.timezone.utc)  # fmt: skip
    return moment.timestamp()


@dataclasses.dataclass(frozen=True, slots=True)
class _Every:
    """Slots every `seconds` seconds, aligned on the Unix epoch so every worker agrees on them."""

    seconds: int

    def next_after(self, moment: float) -> float:
        return (math.floor(moment / self.seconds) + 1) * self.seconds

    def latest(self, moment: float) -> float | None:
        return math.floor(moment / self.seconds) * self.seconds


@dataclasses.dataclass(frozen=True, slots=True)
class _ScheduleEntry:
    """One periodic task: its id, when it runs, and the task each slot enqueues."""

    id: str
    timing: _Cron | _Every
    payload: dict[str, Any]
    queue: str = DEFAULT_QUEUE

    def task(self, slot: float) -> Task:
        """Return the task of the slot at `slot` (Unix seconds): id and key name the slot."""
        when = datetime.datetime.fromtimestamp(slot, datetime.timezone.utc)
        return Task(f"{self.id}@{when.strftime(_SLOT_FORMAT)}", self.payload, queue=self.queue)


def _schedule_entry(item: Any) -> _ScheduleEntry:
    """Build one entry of a schedule file.

    Raises:
        ValueError: the entry is invalid; the message names the field.
    """
    if not isinstance(item, dict):
        raise ValueError(f"must be an object, not {_json_type(item)}")
    unknown = sorted(set(item) - _SCHEDULE_FILE_FIELDS)
    if unknown:
        raise ValueError(f"unknown field {_shown(unknown[0])}")
    entry_id = item.get("id")
    if not isinstance(entry_id, str) or not SCHEDULE_ID_PATTERN.fullmatch(entry_id):
        raise ValueError(
            f"field 'id' must be 1-200 letters, digits, '_', '.', ':' or '-' starting with a "
            f"letter or digit, not {_shown(entry_id)}"
        )
    if ("cron" in item) == ("every" in item):
        raise ValueError("give exactly one of the fields 'cron' and 'every'")
    timing: _Cron | _Every
    if "cron" in item:
        if not isinstance(item["cron"], str):
            raise ValueError(f"field 'cron' must be a string, not {_json_type(item['cron'])}")
        try:
            timing = _Cron.parse(item["cron"])
        except ValueError as exc:
            raise ValueError(f"field 'cron' {_shown(item['cron'])}: {exc}") from None
    else:
        every = item["every"]
        whole = isinstance(every, int) or (isinstance(every, float) and every.is_integer())
        if isinstance(every, bool) or not whole or every < 1:
            raise ValueError(f"field 'every' must be a whole number of seconds >= 1, not "
                             f"{_shown(every)}")  # fmt: skip
        timing = _Every(int(every))
    payload = item.get("payload")
    if payload is None:
        payload = {}
    elif not isinstance(payload, dict):
        raise ValueError(f"field 'payload' must be an object, not {_json_type(payload)}")
    queue_name = item.get("queue", DEFAULT_QUEUE)
    problem = _queue_problem(queue_name) if isinstance(queue_name, str) else "must be a string"
    if problem is not None:
        raise ValueError(f"field 'queue' {problem}, not {_shown(queue_name)}")
    return _ScheduleEntry(entry_id, timing, payload, queue_name)


def _load_schedule(path: str) -> list[_ScheduleEntry]:
    """Read a schedule file: a JSON array of ``{"id", "cron" | "every", "payload", "queue"}``.

    Raises:
        ConfigError: the file cannot be read or an entry is invalid; one line naming the file,
            the entry and the field.
    """
    source = f"--schedule {_cut(path)}"
    try:
        text = _read_task_file(path, _max_task_file_bytes()).decode("utf-8")
        _check_depth(text, MAX_JSON_DEPTH)
        document = _parse_json(text.removeprefix("\ufeff"))
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not valid UTF-8") from None
    except TaskFileError as exc:
        where = f"line {exc.line} column {exc.column}: " if exc.line is not None else ""
        raise ConfigError(f"{source}: {where}{exc.reason}") from None
    if not isinstance(document, list) or not document:
        raise ConfigError(f"{source}: expected a non-empty JSON array of schedules")
    entries: list[_ScheduleEntry] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(document):
        try:
            entry = _schedule_entry(item)
        except ValueError as exc:
            raise ConfigError(f"{source}: schedule {index}: {exc}") from None
        if entry.id in seen:
            raise ConfigError(
                f"{source}: schedule {index}: id {entry.id!r} repeats schedule {seen[entry.id]}"
            )
        seen[entry.id] = index
        entries.append(entry)
    return entries


class _Periodic:
    """Enqueue the slots of a schedule into the durable queue as they come due.

    `due(now)` is the whole policy, kept apart from threads and clocks so it can be tested
    alone: the first call gives each entry's latest slot (a worker that was down runs the slot
    it missed last, never the ones before it), later calls each entry's latest slot that is new
    since the call before (a worker that fell behind skips to the latest slot too). `start`
    runs it in a thread that sleeps until the next slot: no polling in between.

    Args:
        entries: the schedules.
        enqueue: ``enqueue(tasks) -> int``, the durable enqueue (it leaves known ids alone).
        clock: Unix seconds now; `time.time` outside tests.
    """

    def __init__(
        self,
        entries: Sequence[_ScheduleEntry],
        enqueue: Callable[[list[Task]], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._entries = list(entries)
        self._enqueue = enqueue
        self._clock = clock
        self._done: dict[str, float] = {}  # entry id -> the latest slot enqueued; one thread's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-queue-schedule", daemon=True)

    def due(self, now: float) -> list[Task]:
        """Return the tasks of the slots due at `now` that were not handed out before."""
        tasks = []
        for entry in self._entries:
            slot = entry.timing.latest(now)
            if slot is not None and slot > self._done.get(entry.id, -math.inf):
                tasks.append(entry.task(slot))
                self._done[entry.id] = slot
        return tasks

    def next_at(self, now: float) -> float:
        """Return when the next slot of any entry comes (Unix seconds)."""
        return min(entry.timing.next_after(now) for entry in self._entries)

    def enqueue_due(self, now: float | None = None) -> bool:
        """Enqueue the slots due now; return False when the database refused them (logged)."""
        tasks = self.due(self._clock() if now is None else now)
        if not tasks:
            return True
        try:
            try:
                added = self._enqueue(tasks)
            except TaskConflictError:
                # Workers disagree on a schedule's payload, and the batch was refused whole:
                # the other slots go in on their own, and the first enqueue of this one stands.
                added = 0
                for task in tasks:
                    try:
                        added += self._enqueue([task])
                    except TaskConflictError as exc:
                        logger.warning("schedule: %s; the slot enqueued first stands", exc)
        except Exception as exc:
            for task in tasks:  # handed out again by the next call
                self._done.pop(task.id.rpartition("@")[0], None)
            logger.warning("schedule: enqueueing %s failed (%s); trying again",
                           ", ".join(t.id for t in tasks), _first_line(exc))  # fmt: skip
            return False
        logger.info("schedule: enqueued %d of %s", added, ", ".join(t.id for t in tasks))
        return True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self._clock()
            wait = self.next_at(now) - now if self.enqueue_due(now) else _RETRY_ENQUEUE_SECONDS
            # One Event.wait until the next slot; capped so a changed wall clock is seen.
            self._stop.wait(min(max(wait, 0.0), _LONGEST_NAP))


# --- Configuration -------------------------------------------------------------------------------


def _parse_int(raw: str, source: str, minimum: int) -> int:
    try:
        value = int(raw.strip())
    except (TypeError, ValueError):
        value = None
    if value is None or value < minimum:
        raise ConfigError(f"{source}: expected an integer >= {minimum}, got {_shown(raw)}")
    return value


def _parse_positive_int(raw: str, source: str) -> int:
    return _parse_int(raw, source, 1)


def _parse_seed(raw: str, source: str) -> int:
    return _parse_int(raw, source, 0)


def _parse_float(raw: str, source: str, *, low: float, high: float, open_low: bool) -> float:
    try:
        value = float(raw.strip())
    except (TypeError, ValueError):
        value = math.nan
    ok = math.isfinite(value) and (value > low if open_low else value >= low) and value <= high
    if not ok:
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        span = f"a number {bound}" + (f" and <= {high:g}" if math.isfinite(high) else "")
        raise ConfigError(f"{source}: expected {span}, got {_shown(raw)}")
    return value


def _parse_positive_float(raw: str, source: str) -> float:
    return _parse_float(raw, source, low=0.0, high=math.inf, open_low=True)


def _parse_nonnegative_float(raw: str, source: str) -> float:
    return _parse_float(raw, source, low=0.0, high=math.inf, open_low=False)


def _parse_rate(raw: str, source: str) -> float:
    return _parse_float(raw, source, low=0.0, high=1.0, open_low=False)


def _parse_rate_limits(raw: str, source: str) -> tuple[str | None, dict[str, str]]:
    """Parse ``100/s`` and ``GROUP=5/s`` items, separated by commas (a repeated flag's values
    are joined so): the pool's limit and each group's."""
    overall: str | None = None
    groups: dict[str, str] = {}
    for item in raw.split(","):
        text = item.strip()
        group, equals, rate = text.rpartition("=")
        try:
            if not equals:
                if overall is not None:
                    raise ValueError(f"two limits for every call ({overall}, {text})")
                overall = _rate_of(text, "a rate limit").text
                continue
            group = group.strip()
            problem = _text_problem(group)
            if problem is not None:
                raise ValueError(f"the group of {_shown(text)} {problem}")
            if group in groups:
                raise ValueError(f"two limits for group {_shown(group)}")
            groups[group] = _rate_of(rate, f"the rate of group {_shown(group)}").text
        except ValueError as exc:
            raise ConfigError(
                f"{source}: {exc} (expected RATE or GROUP=RATE, comma-separated, RATE such as "
                f"100/s), got {_shown(raw)}"
            ) from None
    return overall, groups


def _parse_path(raw: str, source: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{source}: expected a path, got an empty value")
    return raw


def _parse_host(raw: str, source: str) -> str:
    # Whether the address exists is learnt when it is bound, before any database is opened.
    host = raw.strip()
    if not host or any(char.isspace() for char in host):
        raise ConfigError(f"{source}: expected a host name or an IP address, got {_shown(raw)}")
    return host


def _choice(*choices: str, fold: Callable[[str], str] = str.lower) -> Callable[[str, str], str]:
    def parse(raw: str, source: str) -> str:
        value = fold(raw.strip())
        if value not in choices:
            raise ConfigError(f"{source}: expected one of {', '.join(choices)}, got {_shown(raw)}")
        return value

    return parse


@dataclasses.dataclass(frozen=True, slots=True)
class _Setting:
    """One configurable value: its flag, its environment variable, its parser and its default."""

    name: str
    env: str
    flag: str | None
    parse: Callable[[str, str], Any]
    default: Any
    help: str
    repeat: bool = False  # the flag may be given again; its values are joined with commas


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

SETTINGS = (
    _Setting("workers", "TQ_WORKERS", "--workers", _parse_positive_int, DEFAULT_WORKERS,
             "worker threads"),
    _Setting("queue_size", "TQ_QUEUE_SIZE", "--queue-size", _parse_positive_int,
             DEFAULT_QUEUE_SIZE, "tasks that may wait in the bounded queue"),
    _Setting("db_path", "TQ_DB_PATH", "--db", _parse_path, None,
             "database: a SQLite file (a path or sqlite:///PATH) or "
             f"postgresql://USER@HOST/DB[?schema=NAME] (default {DEFAULT_DB_FILE})"),
    _Setting("max_attempts", "TQ_MAX_ATTEMPTS", "--max-attempts", _parse_positive_int,
             DEFAULT_MAX_ATTEMPTS, "attempts per task, the first included"),
    _Setting("base_delay", "TQ_BASE_DELAY", "--base-delay", _parse_nonnegative_float,
             DEFAULT_BASE_DELAY, "first retry backoff cap, seconds"),
    _Setting("max_delay", "TQ_MAX_DELAY", "--max-delay", _parse_nonnegative_float,
             DEFAULT_MAX_DELAY, "largest retry backoff, seconds"),
    _Setting("lease_seconds", "TQ_LEASE_SECONDS", "--lease-seconds", _parse_positive_float,
             DEFAULT_LEASE_SECONDS, "claim lease (s): a crashed run's claims free up after it"),
    _Setting("latency_ms", "TQ_LATENCY_MS", "--latency-ms", _parse_nonnegative_float,
             DEFAULT_LATENCY_MS, "simulated I/O latency per task, ms (payload latency_ms wins)"),
    _Setting("jitter_ms", "TQ_JITTER_MS", "--jitter-ms", _parse_nonnegative_float,
             DEFAULT_JITTER_MS, "uniform +- jitter on the latency, ms"),
    _Setting("transient_rate", "TQ_TRANSIENT_RATE", "--transient-rate", _parse_rate, 0.0,
             "probability of an injected transient fault per attempt"),
    _Setting("permanent_rate", "TQ_PERMANENT_RATE", "--permanent-rate", _parse_rate, 0.0,
             "probability of an injected permanent fault per attempt"),
    _Setting("durability", "TQ_DURABILITY", "--durability", _choice(*DURABILITY_MODES),
             DEFAULT_DURABILITY, "normal: survives a crash; full: survives power loss"),
    _Setting("log_level", "TQ_LOG_LEVEL", "--log-level", _choice(*_LOG_LEVELS, fold=str.upper),
             DEFAULT_LOG_LEVEL, "logging level on stderr"),
    _Setting("max_task_file_bytes", "TQ_MAX_TASK_FILE_BYTES", None, _parse_positive_int,
             DEFAULT_MAX_TASK_FILE_BYTES, "largest task file accepted, bytes"),
    _Setting("rate_limit", "TQ_RATE_LIMIT", "--rate-limit", _parse_rate_limits, None,
             "most handler calls per period, every attempt counted: 100/s (units s, m, h) for "
             "all calls, GROUP=5/s for the tasks of a group; repeat the flag or separate with "
             "commas; shared by the workers of one database (default: no limit)", repeat=True),
    _Setting("task_timeout", "TQ_TASK_TIMEOUT", "--task-timeout", _parse_positive_float, None,
             "seconds each attempt may take, a transient TimeoutError after (a task's "
             "timeout_seconds wins; default: none)"),
    _Setting("metrics_host", "TQ_METRICS_HOST", "--metrics-host", _parse_host,
             DEFAULT_METRICS_HOST, "address --metrics-port listens on (0.0.0.0: every "
             "interface; the metrics are readable by anyone who reaches it)"),
)  # fmt: skip
# Settings only `task-queue worker` takes.
_WORKER_ONLY_SETTINGS = frozenset({"metrics_host"})
# The flags of the built-in simulator (TaskProcessor): a --handler replaces it.
_SIMULATOR_FLAGS = {"latency_ms": "--latency-ms", "jitter_ms": "--jitter-ms",
                    "transient_rate": "--transient-rate",
                    "permanent_rate": "--permanent-rate"}  # fmt: skip


def _read_dotenv(path: str) -> dict[str, str]:
    """Read `path` (the working directory's .env) if it exists; never searches parent folders."""
    if not os.path.isfile(path):
        return {}
    try:
        from dotenv import dotenv_values
    except ImportError:
        raise ConfigError(
            f"{path} exists but python-dotenv is not installed (pip install python-dotenv)"
        ) from None
    try:
        values = dotenv_values(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read: {_describe(exc)}") from None
    return {name: value for name, value in values.items() if value is not None}


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    dotenv_path: str | None = ".env",
) -> dict[str, Any]:
    """Resolve every setting: flag, then environment variable, then .env, then default.

    Args:
        flags: values given on the command line, by setting name (None: not given).
        environ: the environment; None means `os.environ`.
        dotenv_path: the .env file to read (in the working directory); None reads none.

    Raises:
        ConfigError: a value is invalid; the message names the flag or variable.
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    from_file = _read_dotenv(dotenv_path) if dotenv_path else {}
    config: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = flags.get(setting.name) if setting.flag else None
        if isinstance(raw, list):  # a repeated flag
            raw = ",".join(raw)
        source = setting.flag
        if raw is None and setting.env in environ:
            raw, source = environ[setting.env], setting.env
        elif raw is None and setting.env in from_file:
            raw, source = from_file[setting.env], f"{setting.env} (in {dotenv_path})"
        config[setting.name] = setting.default if raw is None else setting.parse(raw, source)  # type: ignore[arg-type]  # raw named by a flag or a variable
    if config["transient_rate"] + config["permanent_rate"] > 1.0:
        raise ConfigError("--transient-rate + --permanent-rate must be at most 1")
    return config


# --- Dashboard -----------------------------------------------------------------------------------
#
# One page, served by the standard library's ThreadingHTTPServer: `task-queue dashboard` and the
# `/` of `worker --metrics-port`. The page is a constant (no file is read, nothing is fetched from
# elsewhere) and draws itself from two JSON routes, `/api/status` and `/api/failed`; changes are
# POSTs (`/api/retry`, `/api/cancel`). Safe by default: bound to loopback, where the Host header
# must name loopback too (a page of another site that rebinds its name to 127.0.0.1 gets
# nothing); any other address needs a token on every request; every POST carries the CSRF token
# that only the served page knows; data reaches the page as JSON and becomes text there.

_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
# Databases that live in one process's memory: nothing of them outlives the command.
_MEMORY_DATABASES = (MEMORY_DATABASE, f"sqlite:///{MEMORY_DATABASE}", "memory://")
_TASK_STATES = ("queued", "delayed", "running", "failed", "done")

_DASHBOARD_PAGE = """\
<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="__CSRF__">
<title>task-queue dashboard</title>
<style nonce="__NONCE__">
:root { --bg: #f6f7f9; --panel: #fff; --ink: #1d2430; --muted: #667085; --line: #dde1e7;
  --ok: #2f7d4f; --bad: #c2412d; --accent: #2d5fc2; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  background: var(--bg); color: var(--ink); }
header { display: flex; flex-wrap: wrap; gap: .4rem 1rem; align-items: baseline;
  padding: .8rem 1rem; background: var(--ink); color: #fff; }
header h1 { font-size: 1.1rem; margin: 0; }
header .muted { color: #b9c0cc; overflow-wrap: anywhere; }
main { padding: 1rem; display: grid; gap: 1rem; max-width: 1400px; margin: 0 auto; }
.cards { display: grid; gap: .6rem; grid-template-columns: repeat(auto-fit, minmax(8.5rem, 1fr)); }
.card, .panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; }
.card { padding: .6rem .8rem; }
.card .label { color: var(--muted); font-size: .8rem; text-transform: uppercase;
  letter-spacing: .04em; }
.card .value { font-size: 1.6rem; font-weight: 600; font-variant-numeric: tabular-nums; }
.card.failed .value { color: var(--bad); }
.grid { display: grid; gap: 1rem;
  grid-template-columns: repeat(auto-fit, minmax(min(100%, 28rem), 1fr)); }
.panel { padding: .8rem 1rem; min-width: 0; }
.panel h2 { font-size: 1rem; margin: 0 0 .5rem; display: flex; gap: .6rem; align-items: baseline;
  flex-wrap: wrap; }
.panel h2 small { color: var(--muted); font-weight: normal; }
svg.chart { width: 100%; height: auto; display: block; }
svg .bar.ok { fill: var(--ok); }
svg .bar.bad { fill: var(--bad); }
svg .axis { stroke: var(--line); stroke-width: 1; }
svg text { fill: var(--muted); font-size: 11px; }
dl.latency { display: grid; grid-template-columns: repeat(auto-fit, minmax(6rem, 1fr)); gap: .4rem;
  margin: 0; }
dl.latency div { background: var(--bg); border-radius: 6px; padding: .4rem .6rem; }
dl.latency dt { color: var(--muted); font-size: .8rem; }
dl.latency dd { margin: 0; font-size: 1.2rem; font-weight: 600;
  font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .35rem .5rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: .8rem; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { overflow-wrap: anywhere; min-width: 6rem; max-width: 24rem; font-family: ui-monospace,
  SFMono-Regular, Menlo, monospace; font-size: .85rem; }
td.stale { color: var(--muted); }
button { font: inherit; padding: .25rem .7rem; border-radius: 6px; border: 1px solid var(--accent);
  background: var(--accent); color: #fff; cursor: pointer; }
button:disabled { background: var(--line); border-color: var(--line); color: var(--muted);
  cursor: not-allowed; }
.muted { color: var(--muted); }
#message { min-height: 1.2em; }
#message.problem { color: #ffb4a8; }
</style>
</head>
<body>
<header>
  <h1>task-queue</h1>
  <span class="muted" id="database"></span>
  <span class="muted" id="updated">loading&hellip;</span>
  <span id="message" role="status"></span>
</header>
<main>
  <section class="cards" aria-label="Tasks by state">
    <div class="card"><div class="label">Queued</div>
      <div class="value" id="count-queued">&ndash;</div></div>
    <div class="card"><div class="label">Delayed</div>
      <div class="value" id="count-delayed">&ndash;</div></div>
    <div class="card"><div class="label">Running</div>
      <div class="value" id="count-running">&ndash;</div></div>
    <div class="card failed"><div class="label">Failed</div>
      <div class="value" id="count-failed">&ndash;</div></div>
    <div class="card"><div class="label">Done</div>
      <div class="value" id="count-done">&ndash;</div></div>
    <div class="card"><div class="label">Stalled</div>
      <div class="value" id="count-stalled">&ndash;</div></div>
    <div class="card"><div class="label">Oldest waiting</div>
      <div class="value" id="oldest-waiting">&ndash;</div></div>
  </section>
  <section class="grid">
    <div class="panel">
      <h2>Throughput
        <small>tasks finished per minute; last hour <span id="hour-finished">&ndash;</span></small>
      </h2>
      <svg class="chart" id="chart-throughput" viewBox="0 0 600 150" role="img"
        aria-label="Tasks finished per minute"></svg>
    </div>
    <div class="panel">
      <h2>Failures
        <small>tasks failed per minute; last hour <span id="hour-failed">&ndash;</span></small>
      </h2>
      <svg class="chart" id="chart-failures" viewBox="0 0 600 150" role="img"
        aria-label="Tasks failed per minute"></svg>
    </div>
  </section>
  <section class="grid">
    <div class="panel">
      <h2>Latency
        <small>enqueue to finish, last hour, <span id="latency-count">&ndash;</span> tasks</small>
      </h2>
      <dl class="latency">
        <div><dt>p50</dt><dd id="latency-p50">&ndash;</dd></div>
        <div><dt>p95</dt><dd id="latency-p95">&ndash;</dd></div>
        <div><dt>p99</dt><dd id="latency-p99">&ndash;</dd></div>
        <div><dt>mean</dt><dd id="latency-mean">&ndash;</dd></div>
      </dl>
    </div>
    <div class="panel">
      <h2>Queues</h2>
      <div class="scroll"><table>
        <thead><tr><th>Queue</th><th>Queued</th><th>Delayed</th><th>Running</th><th>Failed</th>
          <th>Done</th><th>Oldest waiting</th></tr></thead>
        <tbody id="queue-rows"></tbody>
      </table></div>
    </div>
  </section>
  <section class="panel">
    <h2>Workers <small id="workers-note"></small></h2>
    <div class="scroll"><table>
      <thead><tr><th>Name</th><th>Host</th><th>PID</th><th>Threads</th><th>Running</th>
        <th>Succeeded</th><th>Failed</th><th>Last heartbeat</th></tr></thead>
      <tbody id="worker-rows"></tbody>
    </table></div>
  </section>
  <section class="panel">
    <h2>Failed tasks <small id="failed-note"></small>
      <button type="button" id="retry-all" disabled>Retry all</button></h2>
    <div class="scroll"><table>
      <thead><tr><th>Id</th><th>Queue</th><th>Key</th><th>Attempts</th><th>Kind</th><th>Error</th>
        <th>Failed at</th><th></th></tr></thead>
      <tbody id="failed-rows"></tbody>
    </table></div>
  </section>
</main>
<script nonce="__NONCE__">
"use strict";
(function () {
  const REFRESH_MS = 5000;
  const SVG = "http://www.w3.org/2000/svg";
  const token = new URLSearchParams(window.location.search).get("token");
  const csrf = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
  let timer = null;
  let refreshes = 0;

  function headers(extra) {
    const sent = { Accept: "application/json" };
    if (token) sent["X-Dashboard-Token"] = token;
    return Object.assign(sent, extra || {});
  }

  async function call(path, body) {
    const options = { headers: headers(), cache: "no-store", credentials: "same-origin" };
    if (body !== undefined) {
      options.method = "POST";
      options.headers = headers({ "Content-Type": "application/json", "X-CSRF-Token": csrf });
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    const data = await response.json().catch(function () { return {}; });
    if (!response.ok) throw new Error(data.error || "HTTP " + response.status);
    return data;
  }

  // Every value from the server becomes text: textContent, never markup.
  function cell(tag, value, className) {
    const node = document.createElement(tag);
    if (value !== undefined && value !== null) node.textContent = String(value);
    if (className) node.className = className;
    return node;
  }

  function say(text, problem) {
    const node = document.getElementById("message");
    node.textContent = text;
    node.className = problem ? "problem" : "";
  }

  function setStat(id, value, text) {
    const node = document.getElementById(id);
    const missing = value === null || value === undefined;
    node.dataset.value = missing ? "" : String(value);
    node.textContent = text !== undefined ? text : (missing ? "\\u2013" : String(value));
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "\\u2013";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    if (seconds < 3600) return (seconds / 60).toFixed(1) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function millis(value) {
    return value === null || value === undefined ? "\\u2013" : value.toFixed(1) + " ms";
  }

  function clock(minute) {
    return new Date(minute * 60000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function svgNode(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const name of Object.keys(attributes)) node.setAttribute(name, String(attributes[name]));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function drawBars(svg, minutes, values, kind) {
    const width = 600, height = 150, left = 40, bottom = 18, top = 8;
    const max = Math.max(1, ...values);
    const step = (width - left) / Math.max(values.length, 1);
    const nodes = [
      svgNode("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" }),
      svgNode("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom,
        class: "axis" }),
      svgNode("text", { x: left - 5, y: top + 8, "text-anchor": "end" }, String(max)),
      svgNode("text", { x: left - 5, y: height - bottom, "text-anchor": "end" }, "0"),
    ];
    if (minutes.length) {
      nodes.push(svgNode("text", { x: left, y: height - 4 }, clock(minutes[0])));
      const end = clock(minutes[minutes.length - 1]);
      nodes.push(svgNode("text", { x: width, y: height - 4, "text-anchor": "end" }, end));
    }
    values.forEach(function (value, index) {
      const barHeight = (height - bottom - top) * value / max;
      const bar = svgNode("rect", {
        x: (left + index * step + 0.5).toFixed(1), y: (height - bottom - barHeight).toFixed(1),
        width: Math.max(step - 1, 1).toFixed(1), height: barHeight.toFixed(1),
        class: "bar " + kind, "data-count": value, "data-minute": minutes[index],
      });
      bar.appendChild(svgNode("title", {}, clock(minutes[index]) + ": " + value));
      nodes.push(bar);
    });
    svg.replaceChildren.apply(svg, nodes);
  }

  function replaceRows(id, rows) {
    const body = document.getElementById(id);
    body.replaceChildren.apply(body, rows);
  }

  function row(values) {
    const tr = document.createElement("tr");
    for (const [value, className] of values) tr.appendChild(cell("td", value, className));
    return tr;
  }

  function renderStatus(status) {
    document.getElementById("database").textContent = status.database;
    for (const name of ["queued", "delayed", "running", "failed", "done", "stalled"]) {
      setStat("count-" + name, status.counts[name]);
    }
    setStat("oldest-waiting", status.oldest_waiting_seconds, age(status.oldest_waiting_seconds));
    const history = status.history;
    drawBars(document.getElementById("chart-throughput"), history.minutes, history.finished, "ok");
    drawBars(document.getElementById("chart-failures"), history.minutes, history.failed, "bad");
    setStat("hour-finished", status.last_hour.finished);
    setStat("hour-failed", status.last_hour.failed);
    const latency = status.latency_ms;
    for (const name of ["p50", "p95", "p99", "mean"]) {
      setStat("latency-" + name, latency[name], millis(latency[name]));
    }
    setStat("latency-count", latency.count);
    const queues = Object.keys(status.queues).sort().map(function (name) {
      const q = status.queues[name];
      const tr = row([[name, "text"], [q.queued, "num"], [q.delayed, "num"], [q.running, "num"],
        [q.failed, "num"], [q.done, "num"], [age(q.oldest_waiting_age), "num"]]);
      tr.dataset.queue = name;
      return tr;
    });
    replaceRows("queue-rows", queues);
    const workers = status.workers.map(function (w) {
      const tr = row([[w.name, "text"], [w.host, "text"], [w.pid, "num"], [w.threads, "num"],
        [w.running !== undefined && w.running !== null ? w.running : w.in_flight, "num"],
        [w.succeeded, "num"], [w.failed, "num"],
        [age(w.seen_seconds_ago) + " ago", w.live ? "num" : "num stale"]]);
      tr.dataset.worker = w.name;
      return tr;
    });
    replaceRows("worker-rows", workers);
    const gone = status.workers_not_seen;
    document.getElementById("workers-note").textContent =
      status.workers.length + " live" + (gone ? ", " + gone + " not seen for a while" : "");
  }

  function renderFailed(failed) {
    const retryAll = document.getElementById("retry-all");
    retryAll.disabled = !failed.can_retry || failed.tasks.length === 0;
    document.getElementById("failed-note").textContent = failed.available
      ? failed.tasks.length + " shown" : "this store cannot list failed tasks";
    const rows = failed.tasks.map(function (task) {
      const when = task.failed_at ? new Date(task.failed_at * 1000).toLocaleString() : "";
      const tr = row([[task.id, "text id"], [task.queue, "text"], [task.key, "text"],
        [task.attempts, "num"], [task.error_kind, ""], [task.error, "text error"], [when, ""]]);
      const button = cell("button", "Retry", "retry");
      button.type = "button";
      button.disabled = !failed.can_retry;
      button.addEventListener("click", function () {
        change("/api/retry", { ids: [task.id] }, button);
      });
      const last = document.createElement("td");
      last.appendChild(button);
      tr.appendChild(last);
      tr.dataset.id = task.id;
      return tr;
    });
    replaceRows("failed-rows", rows);
  }

  async function change(path, body, button) {
    button.disabled = true;
    try {
      const answer = await call(path, body);
      say((answer.retried !== undefined ? answer.retried : answer.cancelled) + " task(s) changed");
    } catch (error) {
      say("not changed: " + error.message, true);
    }
    refresh();
  }

  async function refresh() {
    clearTimeout(timer);
    try {
      const answers = await Promise.all([call("/api/status"), call("/api/failed")]);
      renderStatus(answers[0]);
      renderFailed(answers[1]);
      refreshes += 1;
      document.body.dataset.refreshes = String(refreshes);
      document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      say("cannot refresh: " + error.message, true);
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  document.getElementById("retry-all").addEventListener("click", function (event) {
    change("/api/retry", { all: true }, event.currentTarget);
  });
  refresh();
})();
</script>
</body>
</html>
"""


class _HttpError(TaskQueueError):
    """A request the dashboard refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _is_loopback(host: str) -> bool:
    """Return whether `host` (a name or an address, IPv6 with or without brackets) is loopback."""
    name = host.strip().lower().removeprefix("[").removesuffix("]")
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """Return the host part of a Host header (``name:port``, ``[v6]:port``)."""
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def _check_dashboard_token(token: Any, source: str) -> str:
    """Return a usable dashboard token, or raise `ConfigError` naming `source`.

    A token travels in a header or a query string, so it is printable ASCII without spaces, and
    long enough not to be guessed.
    """
    if not isinstance(token, str) or not token:
        raise ConfigError(f"{source}: expected a token, got an empty value")
    if len(token) < MIN_DASHBOARD_TOKEN_CHARS:
        raise ConfigError(
            f"{source}: expected at least {MIN_DASHBOARD_TOKEN_CHARS} characters, got "
            f"{len(token)} (python -c 'import secrets; print(secrets.token_urlsafe())' makes one)"
        )
    if not all("!" <= char <= "~" for char in token):
        raise ConfigError(f"{source}: expected printable ASCII characters without spaces")
    return token


def _minute_series(
    rows: Iterable[Mapping[str, Any]], now: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Sum the history rows of every worker per minute over the last DASHBOARD_MINUTES minutes;
    return the series and the latency histograms of those minutes."""
    last = int(now // 60)
    minutes = list(range(last - DASHBOARD_MINUTES + 1, last + 1))
    slot = {minute: index for index, minute in enumerate(minutes)}
    series = {name: [0] * len(minutes) for name in _HISTORY_COUNTS}
    latencies = []
    for row in rows:
        index = slot.get(int(row["minute"]))
        if index is None:
            continue
        for name in _HISTORY_COUNTS:
            series[name][index] += int(row[name])
        with contextlib.suppress(ValueError, TypeError):
            latencies.append(json.loads(row["latency"]))
    finished = [ok + dup for ok, dup in zip(series["succeeded"], series["duplicates"], strict=True)]
    return {"minutes": minutes, "finished": finished, **series}, latencies


@contextlib.contextmanager
def _refused_as_bad_request() -> Iterator[None]:
    """Turn the `ValueError` a store raises for an argument it refuses into a 400."""
    try:
        yield
    except ValueError as exc:
        raise _HttpError(400, _cut(str(exc), 200)) from None


def _status_queues(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The per-queue counts of a `queue_status()`; a store without named queues has one."""
    queues = raw.get("queues")
    if queues is not None:
        return dict(queues)
    tasks = raw["tasks"]
    delayed = raw.get("delayed", 0)  # counted among the queued rows: waiting out their delay
    return {
        "default": {
            **{state: tasks.get(state, 0) for state in _TASK_STATES},
            "queued": tasks.get("queued", 0) - delayed,
            "delayed": delayed,
            "oldest_waiting_age": raw.get("oldest_queued_seconds"),
        }
    }


# What the page shows of a worker's heartbeat row (`running`: the task rows it holds).
_WORKER_FIELDS = ("host", "pid", "in_flight", "running", "succeeded", "failed", "duplicates")


def _live_workers(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The workers of a `queue_status()` whose last heartbeat is within three of their
    heartbeat intervals (and a second of slack), with the fields the page shows."""
    live = []
    for row in rows:
        beat = row.get("heartbeat_seconds") or DEFAULT_LEASE_SECONDS / 3
        if row["seen_seconds_ago"] <= 3 * beat + 1:
            live.append({
                "name": row["name"],
                **{name: row.get(name) for name in _WORKER_FIELDS},
                "threads": row.get("workers"),
                "seen_seconds_ago": row["seen_seconds_ago"],
                "live": True,
            })  # fmt: skip
    return live


class _DashboardApp:
    """What the dashboard serves, over one store that it opens on first use.

    Args:
        open_store: returns the store to read (called once, on the first request that needs it).
        token: required on every request when given.
        metrics: the collector of the worker that serves the page, if one does (adds
            ``/metrics`` and the worker's own figures).
        owns_store: close the store when the app closes (False for a store the caller gave).
    """

    def __init__(
        self,
        open_store: Callable[[], Store],
        *,
        token: str | None = None,
        metrics: MetricsCollector | None = None,
        owns_store: bool = True,
    ) -> None:
        self._open_store = open_store
        self._owns_store = owns_store
        self.token = token
        self.metrics = metrics
        # Random per server start and embedded in the page: a POST that carries it comes from a
        # page this server served, which another site can neither read nor forge.
        self.csrf = secrets.token_urlsafe(32)
        self._lock = threading.Lock()  # guards _store and _closed (opened once, closed once)
        self._store: Store | None = None
        self._closed = False

    def store(self) -> Store:
        with self._lock:
            if self._closed:
                raise _HttpError(503, "the dashboard is shutting down")
            if self._store is None:
                self._store = self._open_store()
            return self._store

    def close(self) -> None:
        with self._lock:
            self._closed = True
            store, self._store = self._store, None
        if store is not None and self._owns_store:
            store.close()

    def page(self, nonce: str) -> bytes:
        return _DASHBOARD_PAGE.replace("__NONCE__", nonce).replace("__CSRF__", self.csrf).encode()

    def status(self) -> dict[str, Any]:
        store = self.store()
        now = time.time()
        raw = store.queue_status()
        history, latencies = _minute_series(store.history(now - 60 * DASHBOARD_MINUTES), now)
        queues = _status_queues(raw)
        counts = {state: sum(q.get(state, 0) for q in queues.values()) for state in _TASK_STATES}
        counts["stalled"] = raw.get("stalled", 0)
        ages = [q["oldest_waiting_age"] for q in queues.values() if q.get("oldest_waiting_age")]
        workers = _live_workers(raw["workers"])
        status = {
            "database": _redact(store.url),
            "generated_at": round(now, 3),
            "counts": counts,
            "oldest_waiting_seconds": max(ages, default=None),
            "queues": queues,
            "workers": workers,
            "workers_not_seen": len(raw["workers"]) - len(workers),
            "history": history,
            "last_hour": {name: sum(history[name]) for name in ("finished", *_HISTORY_COUNTS)},
            "latency_ms": _merge_latency(latencies),
        }
        if self.metrics is not None:
            status["this_worker"] = self.metrics.snapshot()
        return status

    def failed(self, query: Mapping[str, list[str]]) -> dict[str, Any]:
        store = self.store()
        limit = _query_int(query, "limit", DASHBOARD_FAILED_LIMIT, 1, MAX_DASHBOARD_IDS)
        queue = _query_text(query, "queue")
        lister = getattr(store, "failed_tasks", None)
        can_retry = hasattr(store, "retry_tasks")
        if lister is None:
            return {"available": False, "can_retry": False, "tasks": []}
        with _refused_as_bad_request():
            tasks = lister(queue=queue, limit=limit)
        return {"available": True, "can_retry": can_retry, "tasks": tasks}

    def retry(self, body: Mapping[str, Any]) -> dict[str, Any]:
        queue = body.get("queue")
        if queue is not None and (not isinstance(queue, str) or _text_problem(queue) is not None):
            raise _HttpError(400, "queue: expected a queue name")
        if body.get("all") is True and "ids" in body:
            raise _HttpError(400, "give either ids or all, not both")
        ids = None if body.get("all") is True else _body_ids(body)
        retry = self._operation("retry_tasks")
        with _refused_as_bad_request():
            return {"retried": retry(ids, queue=queue)}

    def cancel(self, body: Mapping[str, Any]) -> dict[str, Any]:
        ids = _body_ids(body)
        cancel = self._operation("cancel_tasks")
        with _refused_as_bad_request():
            return {"cancelled": cancel(ids)}

    def _operation(self, name: str) -> Callable[..., int]:
        operation: Callable[..., int] | None = getattr(self.store(), name, None)
        if operation is None:
            raise _HttpError(501, f"this store cannot {name.partition('_')[0]} tasks")
        return operation


def _query_int(query: Mapping[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[-1])
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise _HttpError(400, f"{name}: expected an integer from {low} to {high}")
    return value


def _query_text(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if not values or not values[-1]:
        return None
    if _text_problem(values[-1]) is not None:
        raise _HttpError(400, f"{name}: {_text_problem(values[-1])}")
    return values[-1]


def _body_ids(body: Mapping[str, Any]) -> list[str]:
    ids = body.get("ids")
    if not isinstance(ids, list) or not 1 <= len(ids) <= MAX_DASHBOARD_IDS:
        raise _HttpError(400, f"ids: expected a list of 1 to {MAX_DASHBOARD_IDS} task ids")
    for task_id in ids:
        if not isinstance(task_id, str) or _text_problem(task_id) is not None:
            raise _HttpError(400, "ids: every task id must be a non-empty string")
    return ids


def _security_headers(csp: str) -> list[tuple[str, str]]:
    return [
        ("Content-Security-Policy", csp),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cross-Origin-Resource-Policy", "same-origin"),
        ("Cache-Control", "no-store"),
    ]


# Everything but the page: no script, no style, no frame.
_DATA_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def _page_csp(nonce: str) -> str:
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


class _DashboardHandler(http.server.BaseHTTPRequestHandler):
    """One request to the dashboard (``server.app`` is the `_DashboardApp`)."""

    server_version = "task-queue"
    timeout = DASHBOARD_REQUEST_TIMEOUT  # an idle or slow client does not hold a thread longer

    # Routes: (method, path) -> handler method name.
    _ROUTES = {
        ("GET", "/"): "_get_page",
        ("GET", "/api/status"): "_get_status",
        ("GET", "/api/failed"): "_get_failed",
        ("GET", "/favicon.ico"): "_get_icon",
        ("GET", "/metrics"): "_get_metrics",
        ("POST", "/api/retry"): "_post_retry",
        ("POST", "/api/cancel"): "_post_cancel",
    }

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        app: _DashboardApp = self.server.app  # type: ignore[attr-defined]
        try:
            # The request target is a path, never a URL to parse: "//x" is a path too.
            path, _, query_text = self.path.partition("#")[0].partition("?")
            try:
                query = urllib.parse.parse_qs(
                    query_text, keep_blank_values=True, max_num_fields=MAX_DASHBOARD_QUERY_FIELDS
                )
            except ValueError:
                raise _HttpError(400, "too many query parameters") from None
            if path == "/metrics" and app.metrics is None:
                path = ""  # only a worker's server has metrics
            if path != "/favicon.ico":  # which a browser asks for without the page's token
                self._check_access(app, query, path)
            name = self._ROUTES.get((method, path))
            if name is None:
                if any(path == known for _, known in self._ROUTES):
                    allowed = sorted(m for m, known in self._ROUTES if known == path)
                    raise _HttpError(405, f"{method} is not allowed here; use {', '.join(allowed)}")
                raise _HttpError(404, "no such page")
            getattr(self, name)(app, query)
        except _HttpError as exc:
            self._send_json(exc.status, {"error": exc.message})
        except ConfigError as exc:
            # The store could not be opened (the worker has not created it yet, say).
            self._send_json(503, {"error": str(exc)})
        except OSError:
            pass  # the client went away mid-answer; nothing to tell it
        except Exception as exc:
            if isinstance(exc, _database_errors()):
                logger.warning("dashboard: the database failed: %s", _first_line(exc))
                self._send_json(503, {"error": "the database is unavailable; try again"})
                return
            logger.exception("dashboard: %s %s failed", method, _cut(self.path))
            self._send_json(500, {"error": "internal error (see the server's log)"})

    def _check_access(self, app: _DashboardApp, query: Mapping[str, list[str]], path: str) -> None:
        if app.token is not None:
            given = self.headers.get("X-Dashboard-Token")
            if given is None:
                scheme, _, value = (self.headers.get("Authorization") or "").partition(" ")
                given = value.strip() if scheme.lower() == "bearer" else None
            if given is None and query.get("token"):
                given = query["token"][-1]
            if given is None or not hmac.compare_digest(
                given.encode("utf-8", "replace"), app.token.encode()
            ):
                raise _HttpError(
                    401,
                    "a valid token is needed: ?token=, X-Dashboard-Token or Authorization: Bearer",
                )
            return
        if path == "/metrics":
            return  # scraped as before: numbers only, and changes nothing
        host = self.headers.get("Host")
        if not host or not _is_loopback(_host_of(host)):
            # Bound to loopback without a token: a name that is not loopback is another site's
            # page reaching this port through a rebound DNS name.
            raise _HttpError(403, "the Host header must name this machine's loopback address")

    def _check_post(self, app: _DashboardApp) -> dict[str, Any]:
        """Return the JSON object of a POST that carries the page's CSRF token."""
        kind = (self.headers.get("Content-Type") or "").partition(";")[0].strip().lower()
        if kind != "application/json":
            raise _HttpError(415, "send the request body as application/json")
        given = self.headers.get("X-CSRF-Token") or ""
        if not hmac.compare_digest(given.encode("utf-8", "replace"), app.csrf.encode()):
            raise _HttpError(403, "missing or wrong X-CSRF-Token: reload the page")
        origin = self.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != self.headers.get("Host"):
            raise _HttpError(403, "cross-origin requests are refused")
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            raise _HttpError(411, "a Content-Length header is needed") from None
        if not 0 <= length <= MAX_DASHBOARD_BODY_BYTES:
            raise _HttpError(413, f"the body may hold at most {MAX_DASHBOARD_BODY_BYTES} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise _HttpError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _HttpError(400, "the body must be a JSON object")
        return body

    # Routes -------------------------------------------------------------------------------------

    def _get_page(self, app: _DashboardApp, query: Mapping[str, list[str]]) -> None:
        nonce = secrets.token_urlsafe(16)
        self._send(200, app.page(nonce), "text/html; charset=utf-8", _page_csp(nonce))

    def _get_status(self, app: _DashboardApp, query: Mapping[str, list[str]]) -> None:
        self._send_json(200, app.status())

    def _get_failed(self, app: _DashboardApp, query: Mapping[str, list[str]]) -> None:
        self._send_json(200, app.failed(query))

    def _get_icon(self, app: _DashboardApp, query: Mapping[str, list[str]]) -> None:
        self._send(204, b"", "image/x-icon")  # no icon: a browser's request is not an error

    def _get_metrics(self, app: _DashboardApp, query: Mapping[str, list[str]]) -> None:
        body = app.metrics.to_prometheus().encode()  # type: ignore[union-attr]
        self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")

    def _post_retry(self, app: _DashboardApp, query: Mapping[str, list[str]]) -> None:
        self._send_json(200, app.retry(self._check_post(app)))

    def _post_cancel(self, app: _DashboardApp, query: Mapping[str, list[str]]) -> None:
        self._send_json(200, app.cancel(self._check_post(app)))

    # Answers ------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, kind: str, csp: str = _DATA_CSP) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _security_headers(csp):
            self.send_header(name, value)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="task-queue"')
        self.end_headers()
        if self.command != "HEAD" and status >= 200 and status not in (204, 304):
            self.wfile.write(body)

    def _send_json(self, status: int, document: Any) -> None:
        body = json.dumps(document, default=str, separators=(",", ":")).encode()
        self._send(status, body, "application/json")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The base class answers malformed requests (a bad request line, headers too long) here
        # with an HTML page; the dashboard answers JSON, with its headers, like everywhere else.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._send_json(code, {"error": message or http.HTTPStatus(code).phrase})

    def version_string(self) -> str:
        return self.server_version  # the name, not the Python version behind it

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("dashboard: " + format, *args)


class _DashboardServer(http.server.ThreadingHTTPServer):
    """The dashboard's server; closing it closes the store its app opened."""

    daemon_threads = True

    def __init__(self, host: str, port: int, app: _DashboardApp) -> None:
        self.app = app
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host.removeprefix("[").removesuffix("]"), port), _DashboardHandler)

    def server_close(self) -> None:
        super().server_close()
        self.app.close()


def _bind_dashboard(host: str, port: int, app: _DashboardApp, flag: str) -> _DashboardServer:
    """Bind the dashboard's server (not serving yet).

    Raises:
        ConfigError: the address cannot be bound; the message names `flag`.
    """
    try:
        return _DashboardServer(host, port, app)
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"{flag} {_cut(f'{host}:{port}')}: cannot listen: {reason}") from None


def serve_dashboard(
    db: str | os.PathLike[str] | Store,
    *,
    host: str = DEFAULT_DASHBOARD_HOST,
    port: int = DEFAULT_DASHBOARD_PORT,
    token: str | None = None,
) -> http.server.ThreadingHTTPServer:
    """Bind the dashboard's HTTP server for a store; the caller serves it.

    Run ``server.serve_forever()`` (in a thread of its own, say), then ``server.shutdown()`` and
    ``server.server_close()``, which closes the store if this function opened it. The page is at
    ``http://HOST:PORT/`` (``server.server_address`` tells the port when `port` is 0).

    Args:
        db: a database URL or path, opened to read (it must exist), or an open `Store`, which
            stays open.
        host: the address to listen on; anything but loopback needs `token`.
        port: the TCP port; 0 picks a free one.
        token: required on every request (``?token=``, ``X-Dashboard-Token`` or ``Authorization:
            Bearer``), at least MIN_DASHBOARD_TOKEN_CHARS printable characters.

    Raises:
        ConfigError: a host other than loopback without a token, a bad token, an address that
            cannot be bound, or a database that cannot be opened.
    """
    if token is not None:
        _check_dashboard_token(token, "token")
    if not isinstance(host, str) or not host.strip():
        raise ConfigError("host: expected an address to listen on, got an empty value")
    if token is None and not _is_loopback(host):
        raise ConfigError(
            f"host {_shown(host)} is not loopback: give a token (--token or TQ_DASHBOARD_TOKEN) "
            "that every request must carry"
        )
    if isinstance(db, (str, os.PathLike)):
        url = os.fspath(db)
        if url in _MEMORY_DATABASES:
            raise ConfigError(
                f"database {url!r} lives in one process's memory only: give a file or a "
                "postgresql:// URL, or an open store"
            )
        store = open_store(url, create=False)
        app = _DashboardApp(lambda: store, token=token)
    else:
        app = _DashboardApp(lambda: db, token=token, owns_store=False)
        store = None
    try:
        return _bind_dashboard(host, port, app, "host")
    except BaseException:
        if store is not None:
            store.close()
        raise


# --- Process control -----------------------------------------------------------------------------
#
# What drives a running process rather than reading its arguments: the progress bar, the signal
# handling of a run or a worker (the first SIGINT/SIGTERM drains, the second exits at once), the
# worker's metrics server and backlog gauge, and serving a page until a signal.


class _Progress:
    """A tqdm bar on stderr when wanted and available; otherwise nothing."""

    def __init__(self, total: int, wanted: bool | None) -> None:
        self._bar: Any = None
        if wanted is False or (wanted is None and not sys.stderr.isatty()):
            return
        try:
            from tqdm import tqdm
        except ImportError:
            if wanted:
                raise ConfigError("--progress needs tqdm: pip install tqdm") from None
            return
        # delay: no bar at all for runs shorter than a second.
        self._bar = tqdm(
            total=total, unit="task", file=sys.stderr, mininterval=0.2, delay=1.0, leave=False
        )

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Interrupts:
    """The CLI's signal handling: the first SIGINT/SIGTERM drains, the second exits at once.

    The handler runs in the main thread between two bytecodes, possibly while that thread holds
    a lock (the pool's, or an Event's inside `Event.wait`). So it takes no lock itself: it notes
    the signal, writes to stderr with `os.write`, and hands the signal to a watcher thread through
    a `queue.SimpleQueue`, whose `put` is safe in a signal handler. The watcher sets `stop` and
    shuts the pool down.
    """

    def __init__(
        self, pool: WorkerPool, lease_seconds: float, stop: threading.Event | None = None
    ) -> None:
        self.signum: int | None = None
        self._stop = stop if stop is not None else threading.Event()
        self._pool = pool
        self._lease = lease_seconds
        self._signals: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._previous: dict[int, Any] = {}
        self._watcher = threading.Thread(target=self._watch, name="task-queue-signals", daemon=True)

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_SIGNAL:
                self._previous[signum] = signal.signal(signum, self._handle)
        self._watcher.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._signals.put(None)
        self._watcher.join()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            running = len(self._pool._inflight)  # noqa: SLF001  # no lock in a signal handler: an estimate
            message = (
                f"{name} again: exiting now with up to {running} tasks unfinished; their claims "
                f"expire after {self._lease:g} s, and a rerun then takes them over\n"
            )
            os.write(2, message.encode())
            os._exit(EXIT_SIGNAL[self.signum])
        self.signum = signum
        os.write(2, f"{name}: finishing running tasks, cancelling queued ones\n".encode())
        self._signals.put(signum)

    def _watch(self) -> None:
        if self._signals.get() is None:
            return
        self._stop.set()
        try:
            self._pool.shutdown(wait=False, cancel_pending=True)
        except Exception:
            logger.exception("graceful shutdown failed; exiting")
            os._exit(EXIT_SIGNAL[self.signum or signal.SIGTERM])


@dataclasses.dataclass(slots=True)
class _RunOutcome:
    """What one command-line run did, for the summary and the exit code."""

    total: int
    counts: dict[TaskStatus, int]
    errors: list[str]
    signum: int | None = None

    @property
    def finished(self) -> int:
        return sum(self.counts.values()) - self.counts[TaskStatus.CANCELLED]

    @property
    def unstarted(self) -> int:
        return self.total - sum(self.counts.values())


def _run_pool(
    pool: WorkerPool,
    entries: list[_TaskEntry],
    config: dict[str, Any],
    progress: _Progress,
) -> _RunOutcome:
    counts = dict.fromkeys(TaskStatus, 0)
    errors: list[str] = []
    outcome = _RunOutcome(len(entries), counts, errors)
    tasks = [entry.task for entry in entries]
    # A task file's delays and priorities; None when it has none (the plain path).
    schedule = {entry.task.id: (entry.delay, entry.priority) for entry in entries
                if entry.delay or entry.priority} or None  # fmt: skip
    with _Interrupts(pool, config["lease_seconds"]) as interrupts:
        try:
            for record in pool._iter_results(tasks, schedule):  # noqa: SLF001  # with a task file's schedule
                counts[record.status] += 1
                if record.status is TaskStatus.FAILED and len(errors) < 5:
                    errors.append(f"{record.task_id}: {record.error}")
                progress.update()
        except PoolClosedError:
            pass  # interrupted: every accepted task has been reported
        finally:
            progress.close()
        pool.shutdown(wait=True)
        outcome.signum = interrupts.signum
    return outcome


def _status_backlog(
    status: Mapping[str, Any], queues: Iterable[str] | None = None
) -> dict[str, tuple[int, float | None]]:
    """The backlog per queue in a `queue_status` answer: (ready tasks, how long the oldest has
    been ready), every queue of the store, and the `queues` a worker serves even when empty."""
    backlog: dict[str, tuple[int, float | None]] = {
        name: (0, None) for name in (queues or (DEFAULT_QUEUE,))
    }
    for name, entry in status["queues"].items():
        backlog[name] = (entry[EntryState.QUEUED.value], entry["oldest_waiting_age"])
    return backlog


class _BacklogGauge:
    """A thread that copies the durable store's backlog into a worker's metrics.

    It reads `queue_status` every `interval` seconds, so that a scrape of ``/metrics`` never
    waits on the database; `stop` takes one last reading for the final snapshot.
    """

    def __init__(
        self,
        store: Store,
        metrics: MetricsCollector,
        queues: Iterable[str] | None = None,
        interval: float = BACKLOG_REFRESH_SECONDS,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._queues = None if queues is None else tuple(queues)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-queue-backlog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.refresh()

    def refresh(self) -> None:
        try:
            status = self._store.queue_status()
        except Exception as exc:
            # The worker's own loop reports an outage; the gauges keep their last reading.
            logger.debug("reading the backlog failed: %s", _first_line(exc))
            return
        self._metrics.record_backlog(_status_backlog(status, self._queues))

    def _run(self) -> None:
        self.refresh()
        while not self._stop.wait(self._interval):
            self.refresh()


def _serve_metrics(
    metrics: MetricsCollector, host: str, port: int, open_store: Callable[[], Store]
) -> _DashboardServer:
    """Serve ``GET /metrics`` (Prometheus text format) and the dashboard on `host`:`port`.

    The dashboard reads the queue through a connection of its own, opened by `open_store` on its
    first request, so that a page left open never waits on (or holds up) the worker's
    transactions. Off loopback, ``/metrics`` answers every scraper while the page and its API
    answer only requests that name a loopback address (the worker takes no token;
    ``task-queue dashboard --host --token`` is the way to show the page to other machines).
    """
    app = _DashboardApp(open_store, metrics=metrics)
    try:
        server = _DashboardServer(host, port, app)
    except (OSError, OverflowError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"--metrics-host {_cut(host)} --metrics-port {port}: {reason}") from None
    threading.Thread(target=server.serve_forever, name="task-queue-metrics", daemon=True).start()
    return server


def _serve_until_signal(server: http.server.HTTPServer) -> int:
    """Serve in this (the main) thread until SIGINT or SIGTERM; return the signal's number.

    The handler only hands the signal to a watcher thread through a `queue.SimpleQueue` (safe in
    a signal handler); the watcher stops the server, which `shutdown` cannot do from the thread
    that serves.
    """
    signals: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    received: list[int] = []

    def watch() -> None:
        signum = signals.get()
        if signum is not None:
            received.append(signum)
            server.shutdown()

    watcher = threading.Thread(target=watch, name="task-queue-dashboard-signals", daemon=True)
    watcher.start()
    previous = {signum: signal.signal(signum, lambda signum, frame: signals.put(signum))
                for signum in EXIT_SIGNAL}  # fmt: skip
    try:
        server.serve_forever()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signals.put(None)
        watcher.join()
    return received[0]


# --- Command line --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors become `ConfigError`, reported in one line by main."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help)")


_METAVARS = {"metrics_host": "HOST"}


def _add_settings(
    group: Any, names: Iterable[str] | None = None, notes: Mapping[str, str] | None = None
) -> None:
    """Add the flags of `names` (default: all), each help followed by what `notes` adds."""
    wanted = None if names is None else set(names)
    for setting in SETTINGS:
        if setting.flag and (wanted is None or setting.name in wanted):
            # A default of None is told in the help itself (it depends on the command).
            default = "" if setting.default is None else f", default {setting.default}"
            note = (notes or {}).get(setting.name, "")
            group.add_argument(
                setting.flag,
                dest=setting.name,
                metavar=_METAVARS.get(setting.name, setting.name.upper()),
                action="append" if setting.repeat else "store",
                help=f"{setting.help}{note} [{setting.env}{default}]",
            )


def _add_handler_arguments(group: Any, simulator_flags: str = "are ignored") -> None:
    group.add_argument(
        "--handler",
        metavar="MODULE:FUNCTION",
        help="handler to import (default: the built-in simulator, TaskProcessor); with a "
        "handler, the simulator's flags (--latency-ms, --jitter-ms, --transient-rate, "
        f"--permanent-rate) {simulator_flags}",
    )
    group.add_argument(
        "--namespace",
        metavar="NAME",
        help="scope of the handler's idempotency keys (default: the handler's module-qualified "
        "name); keeps completed keys when a handler is renamed",
    )


def _cli_processor(config: Mapping[str, Any], seed: int | None) -> TaskProcessor:
    return TaskProcessor(
        latency_ms=config["latency_ms"],
        jitter_ms=config["jitter_ms"],
        transient_error_rate=config["transient_rate"],
        permanent_error_rate=config["permanent_rate"],
        seed=seed,
    )


def _load_handler(spec: str) -> Callable[[Task], Any]:
    """Import ``module:function`` from the working directory or the installed packages.

    Raises:
        ConfigError: the spec is not ``MODULE:FUNCTION``, the module cannot be imported (missing,
            a syntax error, or an exception while it runs), or the attribute is missing or not
            callable; the one-line message names the spec and the error.
    """
    module_name, _, attribute = spec.partition(":")
    shown = _cut(spec)
    if not module_name.strip() or not attribute.strip() or ":" in attribute:
        raise ConfigError(f"--handler {shown}: expected MODULE:FUNCTION")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:
        # The module is user code: whatever it raises at import (SyntaxError, an ImportError of
        # its own, sys.exit) is a user error to name, not a crash to trace back.
        raise ConfigError(
            f"--handler {shown}: cannot import module {_shown(module_name)}: "
            f"{type(exc).__name__}: {_cut(_first_line(exc), 200)}"
        ) from None
    try:
        handler = getattr(module, attribute)
    except AttributeError:
        raise ConfigError(
            f"--handler {shown}: cannot import it: module {_shown(module_name)} has no attribute "
            f"{_shown(attribute)}"
        ) from None
    except Exception as exc:  # a module-level __getattr__ is user code too
        raise ConfigError(
            f"--handler {shown}: cannot import it: {type(exc).__name__}: "
            f"{_cut(_first_line(exc), 200)}"
        ) from None
    if not callable(handler):
        raise ConfigError(
            f"--handler {shown}: not callable ({_shown(attribute)} is {type(handler).__name__})"
        )
    return cast("Callable[[Task], Any]", handler)  # callable: checked above


def _cli_handler(
    args: argparse.Namespace,
    config: Mapping[str, Any],
    seed: int | None,
    refuse_simulator_flags: bool = False,
) -> Any:
    """Return the handler and the namespace the command line asks for.

    Raises:
        ConfigError: the handler cannot be imported, the namespace is empty, or (with
            `refuse_simulator_flags`) the simulator's flags are given beside a handler, which
            they would not configure.
    """
    if args.handler is not None and refuse_simulator_flags:
        given = [flag for name, flag in _SIMULATOR_FLAGS.items()
                 if getattr(args, name, None) is not None]  # fmt: skip
        if given:
            raise ConfigError(
                f"{', '.join(given)} configure{'s' if len(given) == 1 else ''} the built-in "
                f"simulator, which --handler {_cut(args.handler)} replaces: drop "
                f"{'it' if len(given) == 1 else 'them'}"
            )
    namespace = args.namespace
    if namespace is not None:
        try:
            _check_namespace(namespace, "--namespace")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if args.handler is not None:
        handler = _load_handler(args.handler)
    else:
        handler = _cli_processor(config, seed)
    return handler, namespace


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _prologue(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse `argv`, resolve the configuration and set up logging: every command's first step.

    Returns:
        The parsed flags and the configuration (`load_config` of the flags, the environment and
        ./.env).

    Raises:
        ConfigError: a usage error (before the configuration is read), then an invalid setting
            (before logging is set up).
    """
    args = parser.parse_args(argv)
    config = load_config(vars(args), os.environ, ".env")
    _configure_logging(config["log_level"])
    return args, config


def _cli_flow(config: Mapping[str, Any]) -> dict[str, Any]:
    """The pool's rate limits and attempt timeout from the configuration, as keyword arguments."""
    overall, groups = config["rate_limit"] or (None, {})
    return {"rate_limit": overall, "rate_limits": groups or None,
            "task_timeout": config["task_timeout"]}  # fmt: skip


def _cli_retry(config: Mapping[str, Any]) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=config["max_attempts"],
        base_delay=config["base_delay"],
        max_delay=config["max_delay"],
    )


def _format_summary(snapshot: Mapping[str, Any], total: int) -> str:
    def row(label: str, series: Mapping[str, Any]) -> str:
        cells = "  ".join(f"{name} {series[name]:9.2f}" for name in ("mean", "p50", "p95", "p99"))
        return f"  {label:<14}{cells}  max {series['max']:9.2f}"

    utilization = snapshot["utilization"]
    lines = [
        f"tasks {total}  workers {snapshot['workers']}  queue size {snapshot['queue_size']}  "
        f"elapsed {snapshot['elapsed_seconds']:.3f} s",
        f"  succeeded {snapshot['succeeded']}  failed {snapshot['failed']}  duplicates "
        f"{snapshot['duplicates']}  cancelled {snapshot['cancelled']}  retries "
        f"{snapshot['retries']}  rejected {snapshot['rejected']}",
        f"  throughput {snapshot['throughput_per_second']:.1f} tasks/s  utilization "
        + (f"{utilization * 100:.1f}%" if utilization is not None else "n/a")
        + f"  success rate {snapshot['success_rate'] * 100:.1f}%  max queue depth "
        f"{snapshot['max_queue_depth']}",
        row("latency ms", snapshot["latency_ms"]),
        row("queue wait ms", snapshot["queue_wait_ms"]),
        row("service ms", snapshot["service_ms"]),
    ]
    return "\n".join(lines)


# Subcommands: the durable queue ------------------------------------------------------------------

_STORE_SETTINGS = ("db_path", "lease_seconds", "durability", "log_level")
_WORKER_SETTINGS = tuple(s.name for s in SETTINGS if s.flag)


def _subcommand_parser(name: str, description: str, settings: Iterable[str]) -> _Parser:
    parser = _Parser(prog=f"task-queue {name}", description=description)
    _add_settings(parser, settings)
    return parser


def _open_cli_store(config: Mapping[str, Any], *, create: bool = True) -> Store:
    """Open the durable queue; ``create=False`` for commands that only read or delete.

    Raises:
        ConfigError: the database cannot be used, does not exist (``create=False``) or lives in
            this process's memory only, where no other command could see the queue.
    """
    url = config["db_path"] or DEFAULT_DB_FILE
    if url in _MEMORY_DATABASES:
        raise ConfigError(
            f"database {url!r} lives in one process's memory only; the durable queue needs a "
            "file or a postgresql:// URL"
        )
    return open_store(
        url,
        lease_seconds=config["lease_seconds"],
        durability=config["durability"],
        create=create,
    )


def _cli_queue(raw: str, flag: str) -> str:
    """Return the queue name a flag gives, or raise ConfigError naming the flag."""
    try:
        return _check_queue_name(raw, flag)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _cli_queues(raw: str | None) -> tuple[str, ...] | None:
    """Return the queues ``--queues a,b`` names (None: every queue), or raise ConfigError."""
    if raw is None:
        return None
    names = raw.split(",")
    if any(not name.strip() for name in names):
        raise ConfigError(f"--queues: expected queue names separated by commas, got {_shown(raw)}")
    try:
        return _queue_names([name.strip() for name in names], "--queues")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _cmd_enqueue(argv: list[str]) -> int:
    parser = _subcommand_parser(
        "enqueue", "Persist the tasks of a file in the durable queue and return.", _STORE_SETTINGS
    )
    parser.add_argument("--task-file", metavar="FILE", required=True, help="JSON task file")
    parser.add_argument(
        "--queue",
        metavar="NAME",
        default=DEFAULT_QUEUE,
        help=f"queue of the tasks that name none (default {DEFAULT_QUEUE}; a task's own "
        '"queue" field wins)',
    )
    args, config = _prologue(parser, argv)
    queue = _cli_queue(args.queue, "--queue")
    entries = _load_task_entries(
        args.task_file, max_bytes=config["max_task_file_bytes"], queue=queue
    )
    tasks = [entry.task for entry in entries]
    store = _open_cli_store(config)
    try:
        # One transaction for the whole file: a task the database refuses leaves nothing behind.
        added = store.enqueue_many(
            tasks,
            delay=[entry.delay for entry in entries],
            priority=[entry.priority for entry in entries],
        )
    except TaskConflictError as exc:
        raise ConfigError(f"{args.task_file}: {exc}; nothing was enqueued") from None
    except _database_errors() as exc:
        raise ConfigError(
            f"database {_redact(store.url)}: {_first_line(exc)}; nothing was enqueued"
        ) from None
    finally:
        store.close()
    print(
        f"enqueued {added} new tasks ({len(tasks) - added} were already there) in "
        f"{_redact(store.url)}"
    )
    return EXIT_OK


def _parse_port(raw: str, flag: str = "--metrics-port") -> int:
    port = _parse_int(raw, flag, 0)
    if port > 65535:
        raise ConfigError(f"{flag}: expected a port number up to 65535, got {_shown(raw)}")
    return port


def _cmd_worker(argv: list[str]) -> int:
    parser = _subcommand_parser(
        "worker",
        "Run tasks from the durable queue until SIGINT or SIGTERM, then drain gracefully: "
        "running tasks finish, the ones this worker holds go back to the queue.",
        _WORKER_SETTINGS,
    )
    parser.add_argument(
        "--name", help="worker name in status (default HOST:PID:ID, unique to each worker)"
    )
    _add_handler_arguments(parser, "are refused (exit 2); their TQ_ variables are ignored")
    parser.add_argument(
        "--prefetch",
        metavar="N",
        help=f"tasks leased at once (default 2 x workers, up to {MAX_PREFETCH} for quick tasks)",
    )
    parser.add_argument(
        "--metrics-port",
        metavar="PORT",
        help="serve Prometheus metrics on HOST:PORT/metrics and the dashboard at / "
        "(HOST: --metrics-host)",
    )
    parser.add_argument(
        "--queues",
        metavar="A,B",
        help="the named queues to take tasks from, separated by commas (default: every queue)",
    )
    parser.add_argument("--json", action="store_true", help="print the final snapshot as JSON")
    parser.add_argument(
        "--schedule",
        metavar="FILE",
        help='periodic tasks: a JSON array of {"id", "cron": "M H DOM MON DOW" (UTC) or '
        '"every": SECONDS, "payload", "queue"}; each slot runs once across every worker '
        "carrying the schedule, and a worker that was down runs only the latest slot it missed",
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="exit once the queue holds nothing ready or running (delayed tasks are not waited "
        "for): 0 when every task this worker finished succeeded or was a duplicate, 1 when some "
        "failed; with --schedule, only the latest slot of each schedule is enqueued first",
    )
    args, config = _prologue(parser, argv)
    if args.name is not None and _text_problem(args.name) is not None:
        raise ConfigError(f"--name {_shown(args.name)}: {_text_problem(args.name)}")
    queues = _cli_queues(args.queues)
    prefetch = _parse_positive_int(args.prefetch, "--prefetch") if args.prefetch else None
    port = _parse_port(args.metrics_port) if args.metrics_port else None
    handler, namespace = _cli_handler(args, config, None, refuse_simulator_flags=True)
    schedule = _load_schedule(args.schedule) if args.schedule is not None else None
    metrics = MetricsCollector(config["workers"], config["queue_size"])
    # Bind before the database is opened: a port in use is a user error that must touch nothing.
    server = None
    if port is not None:
        opener = functools.partial(_open_cli_store, config, create=False)
        server = _serve_metrics(metrics, config["metrics_host"], port, opener)
    try:
        manager = IdempotencyManager(store=_open_cli_store(config))
    except BaseException:
        if server is not None:
            server.shutdown()
            server.server_close()
        raise
    gauge = _BacklogGauge(manager.store, metrics, queues)
    periodic = _Periodic(schedule, manager.store.enqueue_many) if schedule else None
    try:
        pool = WorkerPool(
            handler,
            workers=config["workers"],
            queue_size=config["queue_size"],
            retry=_cli_retry(config),
            idempotency=manager,
            durable=True,
            worker_name=args.name,
            metrics=metrics,
            namespace=namespace,
            queues=queues,
            **_cli_flow(config),
        )
        stop = threading.Event()
        with _Interrupts(pool, config["lease_seconds"], stop) as interrupts:
            served = "every queue" if queues is None else "queues " + ", ".join(queues)
            print(
                f"worker {pool.worker_name} serving {served} of {_redact(manager.store.url)}",
                file=sys.stderr,
            )
            try:
                gauge.start()
                if periodic is not None and args.burst:
                    periodic.enqueue_due()  # the latest slots, once: a burst takes no later ones
                elif periodic is not None:
                    periodic.start()
                pool.serve(stop, prefetch=prefetch, burst=args.burst)
            finally:
                if periodic is not None:
                    periodic.stop()
                # Whatever ended serving, running jobs finish before the store closes below.
                pool.shutdown(wait=True, cancel_pending=True)
                gauge.stop()
        if server is not None:
            server.shutdown()
            server.server_close()
    finally:
        manager.store.close()
    snapshot = pool.metrics.snapshot()
    print(json.dumps(snapshot, indent=2, sort_keys=True) if args.json
          else _format_summary(snapshot, snapshot["submitted"]))  # fmt: skip
    if interrupts.signum is not None:
        return EXIT_SIGNAL[interrupts.signum]
    return EXIT_FAILED if args.burst and snapshot["failed"] else EXIT_OK


_QUEUE_STATES = ("queued", "delayed", "running", "failed", "done")


def _worker_line(worker: Mapping[str, Any]) -> str:
    """One worker of the status text: a live one's counters, or a gone one and its rows' fate."""
    head = f"  worker {worker['name']}  last seen {worker['seen_seconds_ago']:.1f} s ago"
    if worker.get("alive", True):
        return (f"{head}  in flight {worker.get('in_flight', '?')}  succeeded "
                f"{worker.get('succeeded', '?')}")  # fmt: skip
    held = worker.get("running", 0)
    lease = worker.get("lease_seconds")
    gone = f"{head}: gone (no heartbeat for longer than its lease"
    gone += f" of {lease:g} s)" if isinstance(lease, (int, float)) else ")"
    if not held:
        return f"{gone}; it holds no tasks"
    tasks = "task returns" if held == 1 else "tasks return"
    return (f"{gone}; its {held} running {tasks} to the queue when the leases expire, "
            "for any worker to take")  # fmt: skip


def _cmd_status(argv: list[str]) -> int:
    parser = _subcommand_parser(
        "status",
        "Show the durable queue: tasks by state (and how many queued ones wait out a delay), "
        "the oldest waiting task, stalled claims, "
        "workers and their heartbeats.",
        _STORE_SETTINGS,
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args, config = _prologue(parser, argv)
    store = _open_cli_store(config, create=False)
    try:
        status = {**store.queue_status(), "keys": store.stats(), "database": _redact(store.url)}
    finally:
        store.close()
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return EXIT_OK
    tasks = status["tasks"]
    oldest = status["oldest_queued_seconds"]
    print(f"database {status['database']}")
    print("  tasks   " + "  ".join(f"{state} {count}" for state, count in tasks.items()))
    print("  keys    " + "  ".join(f"{state} {count}" for state, count in status["keys"].items()))
    print(f"  oldest queued task waiting {'-' if oldest is None else f'{oldest:.1f} s'}  "
          f"delayed {status['delayed']}  stalled claims {status['stalled']}")  # fmt: skip
    for name, counts in status["queues"].items():
        age = counts["oldest_waiting_age"]
        print(f"  queue {name}  " + "  ".join(f"{state} {counts[state]}" for state in _QUEUE_STATES)
              + f"  oldest waiting {'-' if age is None else f'{age:.1f} s'}")  # fmt: skip
    for worker in status["workers"]:
        print(_worker_line(worker))
    return EXIT_OK


def _cmd_purge(argv: list[str]) -> int:
    parser = _subcommand_parser(
        "purge", "Delete finished keys and tasks older than --older-than seconds.", _STORE_SETTINGS
    )
    parser.add_argument(
        "--older-than",
        metavar="SECONDS",
        default="604800",
        help="age of the records to delete (default 604800, a week)",
    )
    args, config = _prologue(parser, argv)
    age = _parse_nonnegative_float(args.older_than, "--older-than")
    store = _open_cli_store(config, create=False)
    try:
        purged = store.purge_expired(age)
    finally:
        store.close()
    print(f"purged {purged} records older than {age:g} s from {_redact(store.url)}")
    return EXIT_OK


# Subcommands: operating the queue ----------------------------------------------------------------


def _open_cli_writer(config: Mapping[str, Any]) -> Store:
    """Open an existing durable queue to change it (upgraded to this version's layout).

    Raises:
        ConfigError: as `_open_cli_store` with ``create=False``: a command that changes tasks
            never creates a database.
    """
    _open_cli_store(config, create=False).close()
    return _open_cli_store(config)


def _cli_ids(ids: list[str]) -> list[str]:
    """Return the task ids of the command line, each once, or raise ConfigError naming one."""
    try:
        return list(dict.fromkeys(_check_task_ids(ids, "task id")))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _counted(count: int, noun: str) -> str:
    """Return "1 failed task" or "3 failed tasks"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _cmd_failed(argv: list[str]) -> int:
    parser = _subcommand_parser(
        "failed", "List failed tasks of the durable queue, the newest failure first.",
        _STORE_SETTINGS,
    )  # fmt: skip
    parser.add_argument("--queue", metavar="NAME", help="only the tasks of this queue")
    parser.add_argument(
        "--limit",
        metavar="N",
        default=str(DEFAULT_FAILED_LIMIT),
        help=f"most tasks listed (default {DEFAULT_FAILED_LIMIT})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON array of objects with the keys id, key, queue, attempts, error_kind, "
        "error and failed_at (seconds since the epoch)",
    )
    args, config = _prologue(parser, argv)
    queue = None if args.queue is None else _cli_queue(args.queue, "--queue")
    limit = _parse_positive_int(args.limit, "--limit")
    store = _open_cli_store(config, create=False)
    try:
        failed = store.failed_tasks(queue, limit)
    finally:
        store.close()
    if args.json:
        _print_json(failed)
        return EXIT_OK
    where = "" if queue is None else f" in queue {queue}"
    if not failed:
        print(f"no failed tasks{where} in {_redact(store.url)}")
        return EXIT_OK
    print(f"{_counted(len(failed), 'failed task')}{where}, the newest first (at most {limit}):")
    for row in failed:
        key = "" if row["key"] == row["id"] else f"  key {row['key']}"
        print(f"  {row['id']}{key}  queue {row['queue']}  {row['error_kind'] or '-'}  attempts "
              f"{row['attempts']}  failed {_when(row['failed_at'])}  "
              f"{_cut(row['error'] or '', 200)}")  # fmt: skip
    return EXIT_OK


def _cmd_retry(argv: list[str]) -> int:
    parser = _subcommand_parser(
        "retry",
        "Put failed tasks back in their queue with fresh attempts. Exit 0 when every task named "
        "was retried, 1 when some id was not found or not failed.",
        _STORE_SETTINGS,
    )
    parser.add_argument("ids", nargs="*", metavar="ID", help="ids of failed tasks")
    parser.add_argument("--all", action="store_true", help="every failed task")
    parser.add_argument("--queue", metavar="NAME", help="with --all: only the tasks of this queue")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    args, config = _prologue(parser, argv)
    if args.all and args.ids:
        raise ConfigError("give the ids of failed tasks or --all, not both")
    if not args.all and not args.ids:
        raise ConfigError("nothing to retry: give the ids of failed tasks, or --all")
    if args.queue is not None and not args.all:
        raise ConfigError("--queue goes with --all (ids name their tasks already)")
    queue = None if args.queue is None else _cli_queue(args.queue, "--queue")
    ids = _cli_ids(args.ids)
    store = _open_cli_writer(config)
    try:
        before = {} if args.all else store.task_states(ids)
        retried = store.retry_tasks(None if args.all else ids, queue)
    finally:
        store.close()
    missing = [task_id for task_id in ids if task_id not in before]
    not_failed = {task_id: state for task_id, state in before.items() if state != "failed"}
    if args.json:
        _print_json({"retried": retried, "not_found": missing, "not_failed": not_failed})
    else:
        where = "" if queue is None else f" of queue {queue}"
        back = "its queue" if retried == 1 else "their queue"
        print(f"retried {_counted(retried, 'failed task')}{where}: back in {back} with fresh "
              "attempts")  # fmt: skip
        for task_id in missing:
            print(f"not found: {task_id}", file=sys.stderr)
        for task_id, state in not_failed.items():
            print(f"not retried: {task_id} is {state}, not failed", file=sys.stderr)
    return EXIT_FAILED if missing or not_failed else EXIT_OK


def _cmd_cancel(argv: list[str]) -> int:
    parser = _subcommand_parser(
        "cancel",
        "Withdraw queued tasks from the durable queue; running tasks finish. Exit 0 when every "
        "task named was withdrawn, 1 when some id was not found, is running or has finished.",
        _STORE_SETTINGS,
    )
    parser.add_argument("ids", nargs="+", metavar="ID", help="ids of queued tasks")
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    args, config = _prologue(parser, argv)
    ids = _cli_ids(args.ids)
    store = _open_cli_writer(config)
    try:
        before = store.task_states(ids)
        store.cancel_tasks(ids)
        # A queued task a worker took meanwhile is running now: read what became of each.
        after = store.task_states([i for i, state in before.items() if state == "queued"])
    finally:
        store.close()
    now = {**before, **after}
    cancelled = [i for i in ids if before.get(i) == "queued" and i not in after]
    running = [i for i in ids if i not in cancelled and now.get(i) in ("running", "queued")]
    finished = {i: now[i] for i in ids if now.get(i) in ("done", "failed")}
    missing = [i for i in ids if i not in before]
    if args.json:
        _print_json({"cancelled": cancelled, "running": running, "finished": finished,
                     "not_found": missing})  # fmt: skip
    else:
        print(f"cancelled {len(cancelled)} of {len(ids)} tasks")
        for task_id in running:
            print(f"not cancelled: {task_id} is running; it finishes", file=sys.stderr)
        for task_id, state in finished.items():
            print(f"not cancelled: {task_id} has finished ({state})", file=sys.stderr)
        for task_id in missing:
            print(f"not found: {task_id}", file=sys.stderr)
    return EXIT_OK if len(cancelled) == len(ids) else EXIT_FAILED


def _cmd_result(argv: list[str]) -> int:
    parser = _subcommand_parser(
        "result",
        "Show what became of an idempotency key: its state and cached output. Exit 0 when "
        "completed, 1 when failed, 3 when unknown or not finished.",
        _STORE_SETTINGS,
    )
    parser.add_argument("key", metavar="KEY", help="the idempotency key (a task's id by default)")
    parser.add_argument(
        "--namespace", metavar="NAME", help="the handler that owns the key (default: any)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print an object with the keys key, state, output, error, attempts, updated_at "
        "and namespace (state 'unknown' for a key no handler has taken)",
    )
    args, config = _prologue(parser, argv)
    try:
        _check_key(args.key)
        if args.namespace is not None:
            _check_namespace(args.namespace, "--namespace")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    manager = IdempotencyManager(store=_open_cli_store(config, create=False))
    try:
        state = manager.get(args.key, namespace=args.namespace)
    finally:
        manager.store.close()
    code = {"completed": EXIT_OK, "failed": EXIT_FAILED}.get(state and state.state,  # type: ignore[arg-type]  # None: no code
                                                             EXIT_NOT_FINISHED)  # fmt: skip
    if args.json:
        unknown = KeyState(args.key, "unknown", namespace="")
        _print_json((state or unknown).to_dict())
        return code
    if state is None:
        print(f"{args.key}: unknown (no handler has taken this key yet)")
    elif state.state == "completed":
        calls = _counted(state.attempts, "handler call")
        print(f"{args.key}: completed {_when(state.updated_at)} after {calls} (handler "
              f"{state.namespace or '-'})")  # fmt: skip
        print(json.dumps(state.output))
    elif state.state == "failed":
        print(f"{args.key}: failed {_when(state.updated_at)} after "
              f"{_counted(state.attempts, 'handler call')} (handler {state.namespace or '-'}): "
              f"{state.error}")  # fmt: skip
    else:
        print(f"{args.key}: in progress (claimed {_when(state.updated_at)}, not finished)")
    return code


def _dashboard_token(flag: str | None) -> str | None:
    """Return the dashboard token: --token, then TQ_DASHBOARD_TOKEN, then ./.env, else None.

    Raises:
        ConfigError: the token is empty, short or not printable ASCII; the message names where
            it came from.
    """
    if flag is not None:
        return _check_dashboard_token(flag, "--token")
    if DASHBOARD_TOKEN_ENV in os.environ:
        return _check_dashboard_token(os.environ[DASHBOARD_TOKEN_ENV], DASHBOARD_TOKEN_ENV)
    from_file = _read_dotenv(".env")
    if DASHBOARD_TOKEN_ENV in from_file:
        source = f"{DASHBOARD_TOKEN_ENV} (in .env)"
        return _check_dashboard_token(from_file[DASHBOARD_TOKEN_ENV], source)
    return None


def _cmd_dashboard(argv: list[str]) -> int:
    parser = _subcommand_parser(
        "dashboard",
        "Serve a live page of the durable queue: throughput and failures over the last hour, "
        "queues, workers and their heartbeats, latency percentiles, and the failed tasks with a "
        "retry button. Stops on SIGINT or SIGTERM.",
        ("db_path", "log_level"),
    )
    parser.add_argument(
        "--host",
        metavar="ADDRESS",
        help=f"address to listen on (default {DEFAULT_DASHBOARD_HOST}); an address other than "
        "loopback needs --token",
    )
    parser.add_argument(
        "--port", metavar="PORT", help=f"TCP port (default {DEFAULT_DASHBOARD_PORT}; 0: any free)"
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"secret every request must carry (?token=, X-Dashboard-Token or Authorization: "
        f"Bearer), at least {MIN_DASHBOARD_TOKEN_CHARS} printable characters "
        f"[{DASHBOARD_TOKEN_ENV}]",
    )
    args, config = _prologue(parser, argv)
    port = DEFAULT_DASHBOARD_PORT if args.port is None else _parse_port(args.port, "--port")
    host = DEFAULT_DASHBOARD_HOST if args.host is None else args.host
    if not host.strip():
        raise ConfigError("--host: expected an address to listen on, got an empty value")
    token = _dashboard_token(args.token)
    if token is None and not _is_loopback(host):
        raise ConfigError(
            f"--host {_shown(host)} is not a loopback address: give --token (or "
            f"{DASHBOARD_TOKEN_ENV}), which every request must then carry"
        )
    app = _DashboardApp(functools.partial(_open_cli_store, config, create=False), token=token)
    # Bind first: a port in use is a user error that must not touch the database.
    server = _bind_dashboard(host, port, app, "--host/--port")
    try:
        store = app.store()  # opened now, so a wrong --db is an error at once
        bound_host, bound_port = cast("tuple[str, int]", server.server_address[:2])  # AF_INET(6)
        shown_host = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
        print(
            f"dashboard of {_redact(store.url)} at http://{shown_host}:{bound_port}/"
            + (" (every request needs the token)" if token else ""),
            file=sys.stderr,
            flush=True,
        )
        signum = _serve_until_signal(server)
    finally:
        server.server_close()
    return EXIT_SIGNAL[signum]


# The run command, the subcommand table and main --------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="task-queue",
        description="Run I/O-bound tasks on a bounded, idempotent, crash-safe thread pool.",
        epilog="Exit codes: 0 all tasks succeeded or were duplicates; 1 some failed; 2 usage, "
        "configuration or input error; 130/143 interrupted by SIGINT/SIGTERM. Every flag "
        "above that names a TQ_ variable can also be set in the environment or in ./.env. "
        "The durable queue has subcommands: enqueue, worker, status, failed, retry, cancel, "
        "result, purge and dashboard (task-queue SUBCOMMAND --help).",
    )
    mode = parser.add_argument_group("what to run")
    mode.add_argument("--task-file", metavar="FILE", help="JSON task file to process (resumable)")
    mode.add_argument(
        "--benchmark",
        action="store_true",
        help="run a synthetic workload on a fresh database",
    )
    mode.add_argument("--tasks", metavar="N", help=f"benchmark tasks (default {DEFAULT_TASKS})")
    mode.add_argument(
        "--seed", metavar="N", help="seed of the simulator's fault injection and jitter"
    )
    _add_handler_arguments(mode)
    _add_settings(
        parser.add_argument_group("configuration"),
        [setting.name for setting in SETTINGS if setting.name not in _WORKER_ONLY_SETTINGS],
        notes={
            "db_path": "; also :memory: or memory://, which keep nothing after the run; "
            "--benchmark uses a fresh temporary one unless --db is given"
        },
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--metrics-out",
        metavar="FILE",
        default=DEFAULT_METRICS_FILE,
        help=f"where to write the metrics snapshot (default {DEFAULT_METRICS_FILE})",
    )
    output.add_argument("--json", action="store_true", help="print the snapshot as JSON")
    output.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal and tqdm is installed)",
    )
    return parser


def _synthetic_tasks(count: int) -> list[Task]:
    return [Task(f"bench-{index:06d}") for index in range(1, count + 1)]


def _check_output_path(path: str, flag: str) -> None:
    """Check, before anything runs, that a file can be written at `path`."""
    if not path.strip():
        raise ConfigError(f"{flag}: expected a file path, got an empty value")
    shown = _cut(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {shown}: folder {_cut(folder)} does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {shown}: is a directory")
    try:  # the real test of a writable folder (permissions, read-only mounts, /proc)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".task-queue-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{flag} {shown}: cannot write in {_cut(folder)}: {exc.strerror}"
        ) from None


def _rerun_advice(outcome: _RunOutcome, db_label: str | None) -> str:
    name = signal.Signals(outcome.signum).name  # type: ignore[arg-type]  # given only after a signal
    cancelled = outcome.counts[TaskStatus.CANCELLED] + outcome.unstarted
    failed = outcome.counts[TaskStatus.FAILED]
    done = outcome.counts[TaskStatus.SUCCEEDED] + outcome.counts[TaskStatus.DUPLICATE]
    text = (
        f"interrupted by {name}: {outcome.finished} of {outcome.total} tasks finished "
        f"({done} completed, {failed} failed), {cancelled} cancelled or not started."
    )
    if db_label is None:
        return text + " The benchmark database was temporary: a rerun starts over."
    if db_label in _MEMORY_DATABASES:
        return text + f" The database {db_label} kept nothing: a rerun starts over."
    return (
        text
        + f" A rerun with --db {_redact(db_label)} skips the {done} completed tasks and runs the "
        f"{cancelled + failed} others."
    )


def _main(argv: list[str] | None) -> int:
    args, config = _prologue(_build_parser(), argv)
    if not args.benchmark and args.task_file is None:
        raise ConfigError("nothing to do: give --task-file FILE or --benchmark (see --help)")
    count = _parse_positive_int(args.tasks, "--tasks") if args.tasks is not None else DEFAULT_TASKS
    seed = _parse_seed(args.seed, "--seed") if args.seed is not None else None
    if args.task_file is not None:
        entries = _load_task_entries(args.task_file, max_bytes=config["max_task_file_bytes"])
    else:
        entries = [_TaskEntry(task) for task in _synthetic_tasks(count)]
    _check_output_path(args.metrics_out, "--metrics-out")
    handler, namespace = _cli_handler(args, config, seed)
    retry = _cli_retry(config)
    progress = _Progress(len(entries), args.progress)
    with contextlib.ExitStack() as stack:
        if args.benchmark:
            # A benchmark measures real work: a fresh database each run unless --db is explicit.
            db_label = args.db_path
            db_path = db_label or os.path.join(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="task-queue-")),
                "bench.db",
            )
        else:
            db_label = db_path = config["db_path"] or DEFAULT_DB_FILE
        store = IdempotencyManager(
            db_path,
            lease_seconds=config["lease_seconds"],
            durability=config["durability"],
        )
        stack.callback(store.close)
        pool = WorkerPool(
            handler,
            workers=config["workers"],
            queue_size=config["queue_size"],
            retry=retry,
            idempotency=store,
            namespace=namespace,
            **_cli_flow(config),
        )
        outcome = _run_pool(pool, entries, config, progress)
    snapshot = pool.metrics.snapshot()
    try:
        pool.metrics.export(args.metrics_out)
    except OSError as exc:
        raise ConfigError(
            f"--metrics-out {args.metrics_out}: cannot write: {exc.strerror}"
        ) from None
    if args.json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
    else:
        print(_format_summary(snapshot, len(entries)))
        print(f"  metrics written to {args.metrics_out}")
    for line in outcome.errors:
        print(f"failed: {line}", file=sys.stderr)
    if outcome.signum is not None:
        print(_rerun_advice(outcome, db_label), file=sys.stderr)
        return EXIT_SIGNAL[outcome.signum]
    return EXIT_FAILED if outcome.counts[TaskStatus.FAILED] else EXIT_OK


_SUBCOMMANDS: dict[str, Callable[[list[str]], int]] = {
    "enqueue": _cmd_enqueue,
    "worker": _cmd_worker,
    "status": _cmd_status,
    "failed": _cmd_failed,
    "retry": _cmd_retry,
    "cancel": _cmd_cancel,
    "result": _cmd_result,
    "purge": _cmd_purge,
    "dashboard": _cmd_dashboard,
}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code.

    User errors (bad flags, configuration, task files, database paths) print one line that starts
    with "error:" on stderr and return 2; nothing is written.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] in _SUBCOMMANDS:
            return _SUBCOMMANDS[argv[0]](argv[1:])
        return _main(argv)
    except (ConfigError, TaskFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _database_errors() as exc:
        # A database refused a statement (a server error, a full disk): one line, no traceback.
        print(f"error: database: {_first_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader of stdout went away (``task-queue status | head``): what ran is recorded,
        # only the rest of the output is lost. Point stdout at /dev/null so that the flush at
        # exit does not fail a second time, as the signal module's documentation advises.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return EXIT_FAILED


def console_main() -> None:
    """Entry point of the ``task-queue`` console script."""
    raise SystemExit(main())


if __name__ == "__main__":
    raise SystemExit(main())
