"""Task files: ``load_tasks`` and ``Task.from_dict`` on good and bad input."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import task_queue_optimized
from task_queue_optimized import Task, TaskFileError, load_tasks

pytestmark = pytest.mark.timeout(10)

GOOD = {"id": "good", "payload": {"latency_ms": 1}}


def _write(tmp_path: Path, content: str | bytes, name: str = "tasks.json") -> Path:
    """Write ``content`` to a file under ``tmp_path`` and return its path."""
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _load_error(path: Path, **kwargs: object) -> TaskFileError:
    """Return the TaskFileError that ``load_tasks(path)`` raises, checking it names the file."""
    with pytest.raises(TaskFileError) as info:
        load_tasks(path, **kwargs)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert "\n" not in message
    return info.value


def _nested(levels: int, kind: str) -> object:
    """Return ``levels`` nested containers of ``kind`` whose innermost one is empty."""
    value: object = {} if kind == "object" else []
    for _ in range(levels - 1):
        value = {"n": value} if kind == "object" else [value]
    return value


def _document_of_depth(depth: int, kind: str, form: str) -> object:
    """Return a one-task document whose deepest container sits at ``depth`` (top level is 1)."""
    # The containers above the chain: [list, task, payload] or {dict, list, task, payload}.
    above = 3 if form == "list" else 4
    task = {"id": "deep", "payload": {"chain": _nested(depth - above, kind)}}
    return [task] if form == "list" else {"tasks": [task]}


# --- Good files ----------------------------------------------------------------------


def test_list_form_loads_tasks_in_order(tmp_path: Path) -> None:
    """Prove a list-form file loads every field, keeps order, and defaults the payload."""
    path = _write(
        tmp_path,
        json.dumps(
            [
                {"id": "a", "payload": {"latency_ms": 3, "nested": {"x": [1, 2]}}},
                {"id": "b", "idempotency_key": "kb"},
                {"id": "c", "payload": {}, "idempotency_key": "kc"},
            ]
        ),
    )
    tasks = load_tasks(path)
    assert tasks == [
        Task("a", {"latency_ms": 3, "nested": {"x": [1, 2]}}),
        Task("b", {}, "kb"),
        Task("c", {}, "kc"),
    ]
    assert [task.key for task in tasks] == ["a", "kb", "kc"]
    assert all(isinstance(task, Task) for task in tasks)


def test_tasks_object_form_loads(tmp_path: Path) -> None:
    """Prove the {"tasks": [...]} form loads like the list form, from a str path too."""
    path = _write(tmp_path, json.dumps({"tasks": [GOOD, {"id": "second"}]}))
    tasks = load_tasks(str(path))
    assert [task.id for task in tasks] == ["good", "second"]
    assert tasks[0].payload == {"latency_ms": 1}


def test_repeated_idempotency_key_is_allowed(tmp_path: Path) -> None:
    """Prove two tasks may share an idempotency key: that is what deduplication is for."""
    path = _write(
        tmp_path,
        json.dumps([{"id": "a", "idempotency_key": "k"}, {"id": "b", "idempotency_key": "k"}]),
    )
    tasks = load_tasks(path)
    assert [(task.id, task.key) for task in tasks] == [("a", "k"), ("b", "k")]


@pytest.mark.parametrize("form", ["list", "object"])
@pytest.mark.parametrize("kind", ["object", "array"])
def test_nesting_of_64_levels_is_accepted(tmp_path: Path, form: str, kind: str) -> None:
    """Prove a document whose deepest container is at depth 64 loads."""
    path = _write(tmp_path, json.dumps(_document_of_depth(64, kind, form)))
    (task,) = load_tasks(path)
    assert task.id == "deep"


def test_file_of_exactly_max_bytes_is_accepted(tmp_path: Path) -> None:
    """Prove the size limit rejects only files larger than max_bytes."""
    content = json.dumps([GOOD])
    path = _write(tmp_path, content)
    size = len(content.encode())
    assert [task.id for task in load_tasks(path, max_bytes=size)] == ["good"]
    _load_error(path, max_bytes=size - 1)


def test_huge_integer_never_leaks_another_exception(tmp_path: Path) -> None:
    """Prove a 5000-digit integer either loads or raises TaskFileError, nothing else."""
    path = _write(tmp_path, '[{"id": "a", "payload": {"n": ' + "9" * 5000 + "}}]")
    try:
        tasks = load_tasks(path)
    except TaskFileError as err:
        assert str(err).startswith(str(path))
    else:
        assert tasks[0].payload["n"] == int("9" * 5000)


# --- Bad encodings and syntax --------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b'[{"id": "caf\xe9"}]', b'[{"id": "a"}]\xff', b"\xc3\x28[]"],
    ids=["latin1-byte", "trailing-ff", "broken-sequence"],
)
def test_invalid_utf8_is_rejected(tmp_path: Path, content: bytes) -> None:
    """Prove bytes that are not UTF-8 raise TaskFileError naming the file."""
    _load_error(_write(tmp_path, content))


@pytest.mark.parametrize(
    ("content", "line", "column"),
    [
        ('[\n  {"id": "a"}\n  {"id": "b"}\n]\n', 3, 3),
        ('[{"id": "a"}]\nxyz\n', 2, 1),
        ("", 1, 1),
        ("[\n\n    {\"id\": 'a'}]", 3, 12),
    ],
    ids=["missing-comma", "extra-data", "empty-file", "single-quotes"],
)
def test_invalid_json_names_line_and_column(
    tmp_path: Path, content: str, line: int, column: int
) -> None:
    """Prove a JSON syntax error names the file, the line and the column."""
    err = _load_error(_write(tmp_path, content))
    assert (err.line, err.column) == (line, column)
    assert re.search(rf"\bline {line}\b", str(err)), str(err)
    assert re.search(rf"\bcolumn {column}\b", str(err)), str(err)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
def test_non_finite_numbers_are_rejected(tmp_path: Path, literal: str) -> None:
    """Prove NaN, the infinities and overflowing floats raise TaskFileError."""
    path = _write(tmp_path, '[{"id": "a", "payload": {"x": [1, ' + literal + "]}}]")
    _load_error(path)


@pytest.mark.parametrize(
    "content",
    [
        '[{"id": "a", "id": "b"}]',
        '[{"id": "a", "payload": {"x": 1, "x": 1}}]',
        '{"tasks": [], "tasks": [{"id": "a"}]}',
        '[{"id": "a", "payload": {"deep": {"y": 1, "y": 2}}}]',
    ],
    ids=["task-field", "payload-key", "top-level", "nested-key"],
)
def test_duplicate_object_keys_are_rejected(tmp_path: Path, content: str) -> None:
    """Prove an object with a repeated key raises TaskFileError naming the file."""
    _load_error(_write(tmp_path, content))


@pytest.mark.parametrize("form", ["list", "object"])
@pytest.mark.parametrize("kind", ["object", "array"])
def test_nesting_of_65_levels_is_rejected(tmp_path: Path, form: str, kind: str) -> None:
    """Prove a document whose deepest container is at depth 65 raises TaskFileError."""
    _load_error(_write(tmp_path, json.dumps(_document_of_depth(65, kind, form))))


def test_very_deep_nesting_is_rejected_cleanly(tmp_path: Path) -> None:
    """Prove nesting far beyond the limit raises TaskFileError, not RecursionError."""
    _load_error(_write(tmp_path, "[" * 100_000 + "]" * 100_000))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mebibytes", [1, 16])
def test_truncated_string_of_escaped_quotes_fails_in_one_pass(
    tmp_path: Path, mebibytes: int
) -> None:
    """Prove a file cut inside a long string of escaped quotes gets its syntax error at once.

    A scan that rescans the rest of the text from every escaped quote needs hours for these
    sizes; a linear one needs well under a second for both.
    """
    head = '[{"id": "a", "payload": {"text": "'
    content = head + '\\"ab' * (mebibytes * 1024 * 1024 // 4)
    err = _load_error(_write(tmp_path, content), max_bytes=len(content) + 1)
    assert "Unterminated string" in err.reason, str(err)
    assert (err.line, err.column) == (1, len(head))


def test_brackets_inside_an_unterminated_string_are_not_nesting(tmp_path: Path) -> None:
    """Prove brackets inside a string that never closes are not counted as nesting."""
    err = _load_error(_write(tmp_path, '[{"id": "a\\"' + "[" * 100))
    assert "Unterminated string" in err.reason, str(err)


@pytest.mark.timeout(30)
def test_non_finite_number_after_a_long_string_is_located(tmp_path: Path) -> None:
    """Prove the position of NaN is found past a long string full of quotes and brackets."""
    text = '\\"NaN[{' * 250_000
    path = _write(tmp_path, '[{"id": "a", "payload": {"s": "' + text + '",\n "n": NaN}}]')
    err = _load_error(path)
    assert (err.line, err.column) == (2, 7), str(err)


def test_size_limit_is_checked_before_parsing(tmp_path: Path) -> None:
    """Prove an oversized file is rejected for its size, even when it is not even JSON."""
    path = _write(tmp_path, b"\xff not json at all " * 20)
    err = _load_error(path, max_bytes=100)
    assert err.line is None
    assert err.column is None
    assert "100" in str(err)


def test_size_limit_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prove TQ_MAX_TASK_FILE_BYTES sets the default limit of load_tasks."""
    path = _write(tmp_path, json.dumps([GOOD] * 1))
    monkeypatch.setenv("TQ_MAX_TASK_FILE_BYTES", "10")
    _load_error(path)


# --- Wrong shapes and types ----------------------------------------------------------


@pytest.mark.parametrize(
    "document",
    ['"tasks"', "42", "null", "true", "{}", '{"task": []}', '{"tasks": {"id": "a"}}'],
    ids=["string", "number", "null", "bool", "empty-object", "wrong-key", "tasks-not-list"],
)
def test_wrong_top_level_type_is_rejected(tmp_path: Path, document: str) -> None:
    """Prove a top level that is neither a list nor {"tasks": [...]} raises TaskFileError."""
    _load_error(_write(tmp_path, document))


BAD_TASKS = [
    pytest.param({"payload": {}}, "id", id="missing-id"),
    pytest.param({"id": ""}, "id", id="empty-id"),
    pytest.param({"id": 5}, "id", id="int-id"),
    pytest.param({"id": None}, "id", id="null-id"),
    pytest.param({"id": True}, "id", id="bool-id"),
    pytest.param({"id": ["a"]}, "id", id="list-id"),
    pytest.param({"id": "a", "payload": "x"}, "payload", id="string-payload"),
    pytest.param({"id": "a", "payload": [1]}, "payload", id="list-payload"),
    pytest.param({"id": "a", "payload": 3}, "payload", id="int-payload"),
    pytest.param({"id": "a", "idempotency_key": 5}, "idempotency_key", id="int-key"),
    pytest.param({"id": "a", "idempotency_key": ""}, "idempotency_key", id="empty-key"),
    pytest.param({"id": "a", "idempotency_key": {}}, "idempotency_key", id="object-key"),
    pytest.param({"id": "a", "retries": 1}, "retries", id="unknown-field"),
]


@pytest.mark.parametrize(
    ("content", "index", "field"),
    [
        ('[{"id": "ok"}, {"id": "a\\u0000b"}]', 1, "id"),
        ('[{"id": "\\udcff"}]', 0, "id"),
        ('[{"id": "a", "idempotency_key": "\\ud800"}]', 0, "idempotency_key"),
        ('[{"id": "a"}, {"id": "b", "idempotency_key": "k\\u0000"}]', 1, "idempotency_key"),
    ],
    ids=["nul-id", "surrogate-id", "surrogate-key", "nul-key"],
)
def test_id_or_key_no_store_can_keep_names_index_and_field(
    tmp_path: Path, content: str, index: int, field: str
) -> None:
    """Prove a NUL or a lone surrogate written as a JSON escape is refused with task and field."""
    err = _load_error(_write(tmp_path, content))
    assert (err.index, err.field) == (index, field)
    assert f"task {index}" in str(err) and repr(field) in str(err), str(err)


def test_null_payload_loads_as_empty(tmp_path: Path) -> None:
    """Prove "payload": null loads as the empty payload, as "idempotency_key": null means none."""
    path = _write(tmp_path, '[{"id": "a", "payload": null, "idempotency_key": null}]')
    (task,) = load_tasks(path)
    assert (task.payload, task.key) == ({}, "a")


@pytest.mark.parametrize(("task", "field"), BAD_TASKS)
def test_from_dict_rejects_bad_task(task: dict, field: str) -> None:
    """Prove Task.from_dict raises TaskFileError naming the bad field."""
    with pytest.raises(TaskFileError) as info:
        Task.from_dict(task)
    assert info.value.field == field
    assert re.search(rf"\b{field}\b", str(info.value)), str(info.value)


@pytest.mark.parametrize("task", [["id", "a"], "a", 7, None], ids=["list", "str", "int", "null"])
def test_from_dict_rejects_non_mapping(task: object) -> None:
    """Prove Task.from_dict raises TaskFileError for something that is not an object."""
    with pytest.raises(TaskFileError):
        Task.from_dict(task)  # type: ignore[arg-type]


BAD_SCHEDULES = [
    pytest.param({"id": "a", "delay_seconds": -1}, "delay_seconds", id="negative-delay"),
    pytest.param({"id": "a", "delay_seconds": "5"}, "delay_seconds", id="string-delay"),
    pytest.param({"id": "a", "delay_seconds": True}, "delay_seconds", id="bool-delay"),
    pytest.param({"id": "a", "delay_seconds": [1]}, "delay_seconds", id="list-delay"),
    pytest.param({"id": "a", "delay_seconds": 10**400}, "delay_seconds", id="huge-int-delay"),
    pytest.param({"id": "a", "priority": 1001}, "priority", id="priority-above-range"),
    pytest.param({"id": "a", "priority": -1001}, "priority", id="priority-below-range"),
    pytest.param({"id": "a", "priority": 1.5}, "priority", id="fractional-priority"),
    pytest.param({"id": "a", "priority": 1.0}, "priority", id="float-priority"),
    pytest.param({"id": "a", "priority": True}, "priority", id="bool-priority"),
    pytest.param({"id": "a", "priority": "1"}, "priority", id="string-priority"),
]


@pytest.mark.parametrize(("task", "field"), BAD_SCHEDULES)
def test_a_bad_delay_or_priority_names_the_task_the_field_and_the_rule(
    tmp_path: Path, task: dict, field: str
) -> None:
    """Prove a delay or priority of the wrong type or out of range is refused, saying why."""
    path = _write(tmp_path, json.dumps({"tasks": [GOOD, task]}))
    err = _load_error(path)
    assert (err.index, err.field) == (1, field)
    assert re.search(rf"task 1: field '{field}' must be ", str(err)), str(err)
    with pytest.raises(TaskFileError, match=rf"field '{field}' must be "):
        Task.from_dict(task)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.5], ids=["nan", "inf", "neg"])
def test_from_dict_rejects_a_delay_json_files_cannot_spell(value: float) -> None:
    """Prove a non-finite or negative delay given to Task.from_dict names 'delay_seconds'."""
    with pytest.raises(TaskFileError) as info:
        Task.from_dict({"id": "a", "delay_seconds": value})
    assert info.value.field == "delay_seconds"
    assert "field 'delay_seconds' must be" in str(info.value)


def test_delay_and_priority_are_read_with_each_task(tmp_path: Path) -> None:
    """Prove a file's delay_seconds and priority come back with their task (null means 0)."""
    tasks = [
        {"id": "a", "delay_seconds": 2.5, "priority": -1000},
        {"id": "b", "priority": 1000, "delay_seconds": 0},
        {"id": "c", "delay_seconds": None, "priority": None},
        {"id": "d", "delay_seconds": 3},
    ]
    path = _write(tmp_path, json.dumps(tasks))
    entries = task_queue_optimized._load_task_entries(path)
    assert [tuple(entry) for entry in entries] == [
        (Task("a"), 2.5, -1000),
        (Task("b"), 0.0, 1000),
        (Task("c"), 0.0, 0),
        (Task("d"), 3.0, 0),
    ]
    assert load_tasks(path) == [Task("a"), Task("b"), Task("c"), Task("d")]


def test_from_dict_accepts_a_full_task() -> None:
    """Prove Task.from_dict builds the task with all three fields."""
    task = Task.from_dict({"id": "a", "payload": {"n": 1}, "idempotency_key": "k"})
    assert task == Task("a", {"n": 1}, "k")
    assert task.key == "k"


@pytest.mark.parametrize(("task", "field"), BAD_TASKS)
def test_load_tasks_names_index_and_field(tmp_path: Path, task: dict, field: str) -> None:
    """Prove a bad task in a file raises TaskFileError naming the file, its index and field."""
    path = _write(tmp_path, json.dumps({"tasks": [GOOD, task]}))
    err = _load_error(path)
    assert (err.index, err.field) == (1, field)
    assert re.search(r"\btask 1\b", str(err)), str(err)
    assert re.search(rf"\b{field}\b", str(err)), str(err)


def test_task_that_is_not_an_object_names_its_index(tmp_path: Path) -> None:
    """Prove a list item that is not an object raises TaskFileError naming its index."""
    err = _load_error(_write(tmp_path, json.dumps([GOOD, GOOD | {"id": "x"}, "task"])))
    assert err.index == 2
    assert re.search(r"\btask 2\b", str(err)), str(err)


def test_repeated_id_is_rejected(tmp_path: Path) -> None:
    """Prove a repeated id raises TaskFileError naming the second task's index and 'id'."""
    content = json.dumps([{"id": "a"}, {"id": "b"}, {"id": "a", "idempotency_key": "other"}])
    err = _load_error(_write(tmp_path, content))
    assert (err.index, err.field) == (2, "id")
    assert re.search(r"\btask 2\b", str(err)), str(err)


# --- Files that cannot be read -------------------------------------------------------


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    """Prove a path that does not exist raises TaskFileError naming it."""
    _load_error(tmp_path / "absent.json")


def test_directory_is_rejected(tmp_path: Path) -> None:
    """Prove a directory given as the task file raises TaskFileError naming it."""
    directory = tmp_path / "folder.json"
    directory.mkdir()
    _load_error(directory)


def test_unreadable_file_is_rejected(tmp_path: Path) -> None:
    """Prove a file without read permission raises TaskFileError naming it."""
    path = _write(tmp_path, json.dumps([GOOD]))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user can read a mode 000 file (running as root)")
        _load_error(path)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        pytest.param(
            '[\n {"id": "a"},\n {"id": "b", "payload": {"x": 1, "x": 2}}\n]',
            3,
            25,
            id="duplicate-key-object",
        ),
        pytest.param('[{"id": "a", "payload": {"v": NaN}}]', 1, 31, id="nan"),
        pytest.param(
            '[{"id": "a", "payload": {"s": "1e999", "v": -Infinity}}]',
            1,
            45,
            id="infinity-after-a-lookalike-string",
        ),
        pytest.param('[{"id": "a",\n  "payload": {"v": 1e999}}]', 2, 20, id="overflow"),
    ],
)
def test_hook_errors_name_line_and_column(
    tmp_path: Path, text: str, line: int, column: int
) -> None:
    """Prove duplicate keys and non-finite numbers are reported at their line and column."""
    path = tmp_path / "tasks.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TaskFileError) as caught:
        load_tasks(path)
    assert (caught.value.line, caught.value.column) == (line, column)
    assert f"line {line} column {column}" in str(caught.value)


HUGE = 2_000_000


@pytest.mark.parametrize(
    ("text", "located", "shown"),
    [
        pytest.param(
            '[{"id": "a", "payload": {"v": ' + "9" * HUGE + ".5}}]",
            "line 1 column 31",
            "number 99999",
            id="out-of-range-number",
        ),
        pytest.param(
            '[{"id": "a", "payload": {"' + "k" * HUGE + '": 1, "' + "k" * HUGE + '": 2}}]',
            "line 1 column 25",
            "duplicate object key 'kkkkk",
            id="duplicate-object-key",
        ),
        pytest.param(
            '[{"id": "a", "' + "f" * HUGE + '": 1}]',
            "task 0",
            "unknown field 'fffff",
            id="unknown-field",
        ),
        pytest.param(
            '[{"id": "' + "i" * HUGE + '"}]',
            "task 0",
            "field 'id' must be at most 2048 bytes in UTF-8, not 2000000",
            id="id-too-long",
        ),
    ],
)
def test_an_error_repeats_at_most_a_short_part_of_a_huge_value(
    tmp_path: Path, text: str, located: str, shown: str
) -> None:
    """Prove an error about a value of megabytes stays one short line that still locates it."""
    err = _load_error(_write(tmp_path, text))
    message = str(err)
    assert located in message and shown in message, message[:500]
    assert len(message) < len(str(tmp_path)) + 300, message[:500]
    if "characters" in message:
        assert f"({HUGE + 2 if 'number' in message else HUGE} characters)" in message, message
