"""The sample task file: its content, and what a run of it reports."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from task_queue_optimized import Task, load_tasks
from tests.make_sample_tasks import build_tasks, render
from tests.support import SAMPLE_FILE, run_json


@pytest.fixture(scope="module")
def sample_tasks() -> list[Task]:
    """The sample file loaded through the public loader."""
    return load_tasks(SAMPLE_FILE)


def _duplicates(tasks: list[Task]) -> list[tuple[Task, Task]]:
    """Return (repeat, first) pairs for every task whose key an earlier task used."""
    first: dict[str, Task] = {}
    pairs = []
    for task in tasks:
        if task.key in first:
            pairs.append((task, first[task.key]))
        else:
            first[task.key] = task
    return pairs


@pytest.mark.timeout(10)
def test_file_is_what_the_generator_writes() -> None:
    """Prove the committed file is the seeded generator's output, byte for byte."""
    assert SAMPLE_FILE.read_text(encoding="utf-8") == render(build_tasks())


@pytest.mark.timeout(10)
def test_file_is_a_pretty_printed_list() -> None:
    """Prove the file is an indented JSON list of 100 objects."""
    text = SAMPLE_FILE.read_text(encoding="utf-8")
    document = json.loads(text)
    assert isinstance(document, list)
    assert len(document) == 100
    assert text.startswith("[\n  {")


@pytest.mark.timeout(10)
def test_ids_and_keys(sample_tasks: list[Task]) -> None:
    """Prove the ids run task-001..task-100 in order and every task has an explicit key."""
    assert [task.id for task in sample_tasks] == [f"task-{i:03d}" for i in range(1, 101)]
    assert all(task.idempotency_key for task in sample_tasks)
    assert len({task.key for task in sample_tasks}) == 95


@pytest.mark.timeout(10)
def test_payload_ranges(sample_tasks: list[Task]) -> None:
    """Prove every payload has a latency around 30 ms and at most 256 KiB of data."""
    for task in sample_tasks:
        assert 20 <= task.payload["latency_ms"] <= 40, task
        assert 0 <= task.payload["size_bytes"] <= 256 * 1024, task


@pytest.mark.timeout(10)
def test_five_duplicates_repeat_an_earlier_key_and_payload(sample_tasks: list[Task]) -> None:
    """Prove exactly five tasks repeat an earlier key, each with the identical payload."""
    pairs = _duplicates(sample_tasks)
    assert len(pairs) == 5
    for repeat, first in pairs:
        assert repeat.payload == first.payload
        assert repeat.id != first.id
        assert "fail" not in repeat.payload


@pytest.mark.timeout(10)
def test_five_transient_tasks_succeed_within_three_attempts(sample_tasks: list[Task]) -> None:
    """Prove five distinct, non-duplicate tasks fail transiently once or twice."""
    failing = [task for task in sample_tasks if "fail" in task.payload]
    assert len(failing) == 5
    assert all(task.payload["fail"] == "transient" for task in failing)
    assert all(task.payload.get("fail_times", 1) in (1, 2) for task in failing)
    counts = Counter(task.key for task in sample_tasks)
    assert all(counts[task.key] == 1 for task in failing)


@pytest.mark.timeout(40)
def test_cli_run_then_rerun(tmp_path: Path, sample_tasks: list[Task]) -> None:
    """Prove a clean run executes 95, dedups 5, retries, and a rerun executes nothing."""
    db = tmp_path / "sample.db"
    args = [
        "--task-file",
        str(SAMPLE_FILE),
        "--db",
        str(db),
        "--latency-ms",
        "5",
        "--jitter-ms",
        "0",
        "--workers",
        "8",
    ]
    fail_times = sum(
        task.payload.get("fail_times", 1) for task in sample_tasks if "fail" in task.payload
    )
    first_proc, first = run_json(args, tmp_path)
    assert first_proc.returncode == 0, first_proc.stderr
    assert first["submitted"] == 100
    assert first["succeeded"] == 95
    assert first["duplicates"] == 5
    assert first["failed"] == 0
    assert first["retries"] >= 5
    assert first["retries"] == fail_times
    assert first["handler_calls"] == 95 + fail_times
    assert first["success_rate"] == 1.0

    second_proc, second = run_json(args, tmp_path)
    assert second_proc.returncode == 0, second_proc.stderr
    assert second["duplicates"] == 100
    assert second["succeeded"] == 0
    assert second["failed"] == 0
    assert second["handler_calls"] == 0
    assert second["success_rate"] == 1.0
