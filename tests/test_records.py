"""Records: a Task's key, immutability and validation; a TaskRecord's fields and durations."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

import task_queue_optimized as tq


class TestTask:
    """Task records: keys, immutability and validation."""

    def test_key_defaults_to_id(self) -> None:
        """Task.key is the idempotency key when given, else the id."""
        assert tq.Task("a").key == "a"
        assert tq.Task("a", {"x": 1}, idempotency_key="k").key == "k"

    def test_frozen_with_fresh_payload(self) -> None:
        """Task is frozen and each task gets its own default payload dict."""
        first, second = tq.Task("a"), tq.Task("b")
        assert first.payload == {}
        assert first.payload is not second.payload
        with pytest.raises(dataclasses.FrozenInstanceError):
            first.id = "other"  # type: ignore[misc]

    def test_from_dict_valid(self) -> None:
        """Task.from_dict builds a task from its three fields."""
        task = tq.Task.from_dict({"id": "t", "payload": {"n": 1}, "idempotency_key": "k"})
        assert (task.id, task.payload, task.idempotency_key) == ("t", {"n": 1}, "k")

    @pytest.mark.parametrize(
        ("mapping", "field"),
        [
            ({"id": ""}, "id"),
            ({"id": 3}, "id"),
            ({"id": "t", "payload": [1]}, "payload"),
            ({"id": "t", "idempotency_key": ""}, "idempotency_key"),
            ({"id": "t", "colour": "red"}, "colour"),
        ],
    )
    def test_from_dict_rejects_bad_field(self, mapping: dict[str, Any], field: str) -> None:
        """Task.from_dict raises TaskFileError naming the bad field."""
        with pytest.raises(tq.TaskFileError) as info:
            tq.Task.from_dict(mapping)
        assert info.value.field == field
        assert field in str(info.value)

    @pytest.mark.parametrize(
        ("task_id", "key", "field", "problem"),
        [
            ("a\x00", None, "id", "NUL"),
            ("\udcff", None, "id", "U+DCFF"),
            ("", None, "id", "non-empty"),
            (3, None, "id", "non-empty"),
            ("ok", "\ud800", "idempotency_key", "U+D800"),
            ("ok", "k\x00", "idempotency_key", "NUL"),
            ("ok", "", "idempotency_key", "non-empty"),
        ],
    )
    def test_an_id_or_key_no_store_can_keep_is_refused(
        self, task_id: Any, key: Any, field: str, problem: str
    ) -> None:
        """Task() and Task.from_dict refuse such an id or key with a ValueError naming the field."""
        with pytest.raises(tq.TaskFileError) as built:
            tq.Task(task_id, {}, key)
        with pytest.raises(ValueError) as parsed:
            tq.Task.from_dict({"id": task_id, "idempotency_key": key})
        for error in (built.value, parsed.value):
            assert isinstance(error, tq.TaskFileError) and isinstance(error, ValueError)
            assert error.field == field
            assert repr(field) in str(error) and problem in str(error), str(error)

    @pytest.mark.parametrize(
        ("longest", "field"),
        [
            ("\U0001f600" * (tq.MAX_KEY_BYTES // 4), "id"),
            ("\u20ac" * (tq.MAX_KEY_BYTES // 3) + "k" * (tq.MAX_KEY_BYTES % 3), "idempotency_key"),
        ],
        ids=["id-4-byte-chars", "key-3-byte-chars"],
    )
    def test_ids_and_keys_are_bounded_in_utf8_bytes(self, longest: str, field: str) -> None:
        """MAX_KEY_BYTES of UTF-8 is accepted; one byte more is refused, naming field and limit."""
        assert len(longest.encode()) == tq.MAX_KEY_BYTES
        other = {} if field == "id" else {"id": "t"}
        assert tq.Task.from_dict({**other, field: longest}).key == longest
        mapping = {**other, field: longest + "x"}
        errors = []
        for build in (tq.Task.from_dict, lambda fields: tq.Task(**fields)):
            with pytest.raises(tq.TaskFileError) as info:
                build(mapping)
            errors.append(info.value)
        for error in errors:
            message = str(error)
            assert error.field == field and repr(field) in message, message
            assert f"at most {tq.MAX_KEY_BYTES} bytes" in message, message
            assert f"not {tq.MAX_KEY_BYTES + 1}" in message and len(message) < 200, message

    def test_namespaces_and_worker_names_are_bounded_in_utf8_bytes(self) -> None:
        """A namespace over MAX_NAMESPACE_BYTES or a worker name over MAX_KEY_BYTES is refused."""
        longest = "\u540d" * (tq.MAX_NAMESPACE_BYTES // 3) + "n" * (tq.MAX_NAMESPACE_BYTES % 3)
        assert len(longest.encode()) == tq.MAX_NAMESPACE_BYTES
        with tq.WorkerPool(lambda task: None, workers=1, namespace=longest) as pool:
            assert pool.namespace == longest
        with pytest.raises(ValueError, match=f"namespace must be at most {tq.MAX_NAMESPACE_BYTES}"):
            tq.WorkerPool(lambda task: None, workers=1, namespace=longest + "n")
        with pytest.raises(ValueError, match=f"worker_name must be at most {tq.MAX_KEY_BYTES}"):
            tq.WorkerPool(lambda task: None, workers=1, worker_name="w" * (tq.MAX_KEY_BYTES + 1))

    def test_a_null_payload_is_the_empty_payload(self) -> None:
        """A null payload means {}, like a null idempotency key means none."""
        task = tq.Task.from_dict({"id": "t", "payload": None, "idempotency_key": None})
        assert (task.payload, task.key) == ({}, "t")
        assert tq.Task("t", None).payload == {}  # type: ignore[arg-type]
        assert tq.Task("t", None) == tq.Task("t")  # type: ignore[arg-type]


class TestTaskRecord:
    """TaskRecord: fields, defaults and derived durations."""

    def test_task_record_creation(self) -> None:
        """A record keeps its fields and defaults the optional ones to None or 0."""
        record = tq.TaskRecord("t1", "k1", tq.TaskStatus("succeeded"), output={"x": 1})
        assert (record.task_id, record.key, record.output) == ("t1", "k1", {"x": 1})
        assert record.status == "succeeded"
        assert record.status is tq.TaskStatus("succeeded")
        assert record.error is None
        assert record.error_kind is None
        assert record.attempts == 0
        assert record.enqueued_at is None
        assert record.started_at is None
        assert record.finished_at is None
        assert {s.value for s in tq.TaskStatus} == {"succeeded", "failed", "duplicate", "cancelled"}

    def test_duration_calculation(self) -> None:
        """queue_wait, duration and latency come from the timestamps; None where one is missing."""
        record = tq.TaskRecord(
            "t",
            "t",
            tq.TaskStatus("succeeded"),
            attempts=1,
            enqueued_at=10.0,
            started_at=10.5,
            finished_at=12.0,
        )
        assert record.queue_wait == pytest.approx(0.5)
        assert record.duration == pytest.approx(1.5)
        assert record.latency == pytest.approx(2.0)
        unstarted = tq.TaskRecord(
            "t", "t", tq.TaskStatus("cancelled"), enqueued_at=10.0, finished_at=11.0
        )
        assert unstarted.queue_wait is None
        assert unstarted.duration is None
        assert unstarted.latency == pytest.approx(1.0)
        assert tq.TaskRecord("t", "t", tq.TaskStatus("failed")).latency is None
