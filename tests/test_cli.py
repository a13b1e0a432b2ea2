"""The command line (configuration, exit codes, signals) through real subprocesses and files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests import store_fixtures
from tests.spec import SNAPSHOT_KEYS
from tests.support import (
    SAMPLE_FILE,
    SCRIPT,
    child_env,
    completed_count,
    one_line_error,
    run_cli,
    run_json,
    state_counts,
    task_dicts,
    tree_bytes,
    wait_until,
    write_tasks,
)

pytestmark = pytest.mark.timeout(30)

SERIES_KEYS = {"count", "mean", "p50", "p95", "p99", "max"}
FAST = ["--latency-ms", "0", "--jitter-ms", "0"]


def _assert_user_error(proc: subprocess.CompletedProcess[str], names: Sequence[str]) -> None:
    """Check exit 2 and one 'error:' line on stderr that names one of ``names``."""
    line = one_line_error(proc)
    assert any(name in line for name in names), (names, line)


@pytest.fixture(scope="module")
def progress_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real progress database left by a successful task-file run."""
    root = tmp_path_factory.mktemp("progress")
    write_tasks(root / "tasks.json", task_dicts(3))
    proc = run_cli(["--task-file", "tasks.json", "--db", "progress.db", *FAST], root)
    assert proc.returncode == 0, proc.stderr
    return root / "progress.db"


@pytest.fixture
def workdir(tmp_path: Path, progress_db: Path) -> Path:
    """A working directory with an existing database, a good task file and bad ones."""
    shutil.copyfile(progress_db, tmp_path / "progress.db")
    write_tasks(tmp_path / "good.json", task_dicts(3))
    (tmp_path / "bad.json").write_text('[{"id": "a"},]', encoding="utf-8")
    write_tasks(tmp_path / "dup.json", [{"id": "a"}, {"id": "a"}])
    write_tasks(tmp_path / "field.json", [{"id": "a", "colour": "red"}])
    return tmp_path


# --- Exit code 2: usage, configuration and input errors ------------------------------

ON_FILE = ["--task-file", "good.json", "--db", "progress.db"]
USER_ERRORS = [
    pytest.param(["--db", "progress.db"], {}, None, ["--benchmark", "--task-file"], id="no-mode"),
    pytest.param([*ON_FILE, "--workers", "0"], {}, None, ["--workers"], id="workers-0"),
    pytest.param([*ON_FILE, "--workers", "abc"], {}, None, ["--workers"], id="workers-abc"),
    pytest.param([*ON_FILE, "--queue-size", "0"], {}, None, ["--queue-size"], id="queue-size-0"),
    pytest.param(
        [*ON_FILE, "--max-attempts", "0"], {}, None, ["--max-attempts"], id="max-attempts-0"
    ),
    pytest.param(
        [*ON_FILE, "--durability", "bogus"], {}, None, ["--durability"], id="durability-bogus"
    ),
    pytest.param(
        [*ON_FILE, "--transient-rate", "2"], {}, None, ["--transient-rate"], id="transient-rate-2"
    ),
    pytest.param(
        [*ON_FILE, "--permanent-rate", "-0.5"],
        {},
        None,
        ["--permanent-rate"],
        id="permanent-rate-negative",
    ),
    pytest.param([*ON_FILE, "--frobnicate"], {}, None, ["--frobnicate"], id="unknown-flag"),
    pytest.param(
        ["--benchmark", "--tasks", "abc", "--db", "progress.db"],
        {},
        None,
        ["--tasks"],
        id="benchmark-tasks-abc",
    ),
    pytest.param(ON_FILE, {"TQ_WORKERS": "abc"}, None, ["TQ_WORKERS"], id="env-workers-abc"),
    pytest.param(
        ON_FILE, {"TQ_DURABILITY": "bogus"}, None, ["TQ_DURABILITY"], id="env-durability-bogus"
    ),
    pytest.param(
        ON_FILE,
        {"TQ_TRANSIENT_RATE": "1.5"},
        None,
        ["TQ_TRANSIENT_RATE"],
        id="env-transient-rate",
    ),
    pytest.param(
        ON_FILE,
        {"TQ_MAX_TASK_FILE_BYTES": "abc"},
        None,
        ["TQ_MAX_TASK_FILE_BYTES"],
        id="env-max-bytes-abc",
    ),
    pytest.param(ON_FILE, {}, "TQ_WORKERS=abc\n", ["TQ_WORKERS"], id="dotenv-workers-abc"),
    pytest.param(ON_FILE, {}, "TQ_LATENCY_MS=slow\n", ["TQ_LATENCY_MS"], id="dotenv-latency"),
    pytest.param(
        ON_FILE, {"TQ_MAX_TASK_FILE_BYTES": "10"}, None, ["good.json"], id="task-file-too-large"
    ),
    pytest.param(
        ["--task-file", "bad.json", "--db", "progress.db"],
        {},
        None,
        ["bad.json"],
        id="task-file-invalid-json",
    ),
    pytest.param(
        ["--task-file", "dup.json", "--db", "progress.db"],
        {},
        None,
        ["dup.json"],
        id="task-file-repeated-id",
    ),
    pytest.param(
        ["--benchmark", "--task-file", "field.json", "--db", "progress.db"],
        {},
        None,
        ["field.json"],
        id="benchmark-task-file-unknown-field",
    ),
    pytest.param(
        ["--task-file", "missing.json", "--db", "progress.db"],
        {},
        None,
        ["missing.json"],
        id="task-file-missing",
    ),
    pytest.param(
        [*ON_FILE, "--metrics-out", ""], {}, None, ["--metrics-out"], id="metrics-out-empty"
    ),
    pytest.param(
        [*ON_FILE, "--metrics-out", "/proc/metrics.json"],
        {},
        None,
        ["--metrics-out", "/proc"],
        id="metrics-out-unwritable-folder",
    ),
    pytest.param(
        ["worker", "--db", "progress.db", "--metrics-port", "70000"],
        {},
        None,
        ["--metrics-port"],
        id="worker-metrics-port-out-of-range",
    ),
]


@pytest.mark.parametrize(("args", "env", "dotenv", "names"), USER_ERRORS)
def test_user_error_exits_2_and_touches_nothing(
    workdir: Path, args: list[str], env: dict[str, str], dotenv: str | None, names: list[str]
) -> None:
    """Prove a user error exits 2 with one 'error:' line and leaves every file as it was."""
    if dotenv is not None:
        (workdir / ".env").write_text(dotenv, encoding="utf-8")
    before = tree_bytes(workdir)
    proc = run_cli(args, workdir, env)
    _assert_user_error(proc, names)
    assert tree_bytes(workdir) == before


def test_dotenv_that_is_not_utf8_exits_2_and_touches_nothing(workdir: Path) -> None:
    """Prove a .env that python-dotenv cannot decode is one error line naming it, exit 2."""
    (workdir / ".env").write_bytes(b"TQ_WORKERS=\xff\xfe\n")
    before = tree_bytes(workdir)
    proc = run_cli(["--task-file", "good.json", "--db", "progress.db"], workdir)
    _assert_user_error(proc, [".env"])
    assert tree_bytes(workdir) == before


def test_worker_metrics_port_in_use_exits_2_before_opening_the_database(workdir: Path) -> None:
    """Prove a busy --metrics-port is refused before the worker creates its database."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        before = tree_bytes(workdir)
        proc = run_cli(["worker", "--db", "w.db", "--metrics-port", str(port)], workdir)
    _assert_user_error(proc, ["--metrics-port", str(port)])
    assert tree_bytes(workdir) == before


DB_MODES = {
    "task-file": ["--task-file", "good.json"],
    "benchmark": ["--benchmark", "--tasks", "2", *FAST],
}


@pytest.mark.parametrize("mode", sorted(DB_MODES))
def test_db_path_that_is_a_directory_exits_2(workdir: Path, mode: str) -> None:
    """Prove --db naming a directory exits 2 and creates nothing."""
    (workdir / "dbdir").mkdir()
    before = tree_bytes(workdir)
    proc = run_cli([*DB_MODES[mode], "--db", "dbdir"], workdir)
    _assert_user_error(proc, ["dbdir", "--db"])
    assert tree_bytes(workdir) == before


@pytest.mark.parametrize("mode", sorted(DB_MODES))
def test_db_file_that_is_not_sqlite_exits_2_unchanged(workdir: Path, mode: str) -> None:
    """Prove --db naming a non-SQLite file exits 2 and leaves its bytes unchanged."""
    (workdir / "notdb.sqlite").write_bytes(b"this is not a SQLite database\n" * 40)
    before = tree_bytes(workdir)
    proc = run_cli([*DB_MODES[mode], "--db", "notdb.sqlite"], workdir)
    _assert_user_error(proc, ["notdb.sqlite", "--db"])
    assert tree_bytes(workdir) == before


def test_tq_db_path_that_is_not_sqlite_exits_2_unchanged(workdir: Path) -> None:
    """Prove TQ_DB_PATH naming a non-SQLite file exits 2 and leaves its bytes unchanged."""
    (workdir / "notdb.sqlite").write_bytes(b"\x00\x01garbage" * 200)
    before = tree_bytes(workdir)
    proc = run_cli(["--task-file", "good.json"], workdir, {"TQ_DB_PATH": "notdb.sqlite"})
    _assert_user_error(proc, ["notdb.sqlite", "TQ_DB_PATH"])
    assert tree_bytes(workdir) == before


# --- Benchmark mode and output -------------------------------------------------------


def test_benchmark_writes_metrics_out(tmp_path: Path) -> None:
    """Prove --benchmark exits 0, prints a summary and writes the metrics snapshot."""
    proc = run_cli(
        [
            "--benchmark",
            "--tasks",
            "20",
            "--workers",
            "4",
            "--latency-ms",
            "2",
            "--jitter-ms",
            "0",
            "--metrics-out",
            "bench.json",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    snapshot = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert snapshot.keys() >= SNAPSHOT_KEYS
    assert (snapshot["submitted"], snapshot["succeeded"], snapshot["failed"]) == (20, 20, 0)
    assert (snapshot["duplicates"], snapshot["cancelled"], snapshot["in_flight"]) == (0, 0, 0)
    assert (snapshot["workers"], snapshot["queue_depth"]) == (4, 0)
    assert snapshot["success_rate"] == 1.0
    assert snapshot["throughput_per_second"] > 0
    assert 0 < snapshot["utilization"] <= 1.0
    for series in ("latency_ms", "queue_wait_ms", "service_ms"):
        stats = snapshot[series]
        assert stats.keys() >= SERIES_KEYS, series
        assert stats["count"] == 20, series
        assert stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"] * 1.01, series
    summary = proc.stdout.lower()
    for word in ("throughput", "utilization", "success", "retries", "duplicates"):
        assert word in summary, word
    assert not (tmp_path / "task_queue.db").exists()


def test_json_prints_exactly_one_document(tmp_path: Path) -> None:
    """Prove --json puts only the snapshot on stdout and still writes metrics.json."""
    proc = run_cli(["--benchmark", "--tasks", "5", *FAST, "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    snapshot = json.loads(proc.stdout)  # fails on any text before or after the document
    assert snapshot.keys() >= SNAPSHOT_KEYS
    assert snapshot["succeeded"] == 5
    written = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert written["succeeded"] == snapshot["succeeded"]
    assert written["submitted"] == snapshot["submitted"]


def test_benchmark_twice_measures_real_work_both_times(tmp_path: Path) -> None:
    """Prove each --benchmark run uses a fresh database, ignoring TQ_DB_PATH."""
    env = {"TQ_DB_PATH": "shared.db"}
    for _ in range(2):
        proc, snapshot = run_json(["--benchmark", "--tasks", "10", *FAST], tmp_path, env)
        assert proc.returncode == 0, proc.stderr
        assert snapshot["handler_calls"] > 0
        assert snapshot["succeeded"] == 10
        assert snapshot["duplicates"] == 0
    assert not (tmp_path / "shared.db").exists()
    assert not (tmp_path / "task_queue.db").exists()


# --- Exit code 1: some task failed ---------------------------------------------------


def test_exit_1_when_benchmark_tasks_fail(tmp_path: Path) -> None:
    """Prove --permanent-rate 1.0 fails every task and exits 1."""
    proc, snapshot = run_json(
        ["--benchmark", "--tasks", "4", *FAST, "--permanent-rate", "1.0"], tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    assert (snapshot["failed"], snapshot["succeeded"]) == (4, 0)
    assert snapshot["success_rate"] == 0.0


def test_exit_1_when_a_file_task_fails_permanently(tmp_path: Path) -> None:
    """Prove one permanently failing task in a file makes the run exit 1."""
    tasks = [*task_dicts(3), {"id": "boom", "payload": {"fail": "permanent", "latency_ms": 0}}]
    write_tasks(tmp_path / "tasks.json", tasks)
    proc, snapshot = run_json(["--task-file", "tasks.json", "--db", "progress.db", *FAST], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert (snapshot["failed"], snapshot["succeeded"]) == (1, 3)


# --- Configuration precedence: flag > environment > ./.env > default -----------------


@pytest.mark.parametrize(
    ("dotenv", "env", "flags", "workers"),
    [
        pytest.param(None, {}, [], 8, id="default"),
        pytest.param("TQ_WORKERS=3\n", {}, [], 3, id="dotenv"),
        pytest.param("TQ_WORKERS=3\n", {"TQ_WORKERS": "5"}, [], 5, id="env-over-dotenv"),
        pytest.param("TQ_WORKERS=3\n", {}, ["--workers", "7"], 7, id="flag-over-dotenv"),
        pytest.param(
            "TQ_WORKERS=3\n", {"TQ_WORKERS": "5"}, ["--workers", "7"], 7, id="flag-over-all"
        ),
    ],
)
def test_configuration_precedence(
    tmp_path: Path, dotenv: str | None, env: dict[str, str], flags: list[str], workers: int
) -> None:
    """Prove the workers setting follows flag > environment > .env > default."""
    if dotenv is not None:
        (tmp_path / ".env").write_text(dotenv, encoding="utf-8")
    proc, snapshot = run_json(["--benchmark", "--tasks", "2", *FAST, *flags], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert snapshot["workers"] == workers


def test_dotenv_sets_several_variables(tmp_path: Path) -> None:
    """Prove every variable in ./.env applies, not only the first."""
    (tmp_path / ".env").write_text("# settings\nTQ_QUEUE_SIZE=77\nTQ_WORKERS=2\n", encoding="utf-8")
    proc, snapshot = run_json(["--benchmark", "--tasks", "2", *FAST], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (snapshot["queue_size"], snapshot["workers"]) == (77, 2)


def test_dotenv_in_a_parent_folder_is_ignored(tmp_path: Path) -> None:
    """Prove only the .env of the working directory is read, not one in a parent folder."""
    (tmp_path / ".env").write_text("TQ_WORKERS=3\nTQ_QUEUE_SIZE=77\n", encoding="utf-8")
    child = tmp_path / "child"
    child.mkdir()
    proc, snapshot = run_json(["--benchmark", "--tasks", "2", *FAST], child)
    assert proc.returncode == 0, proc.stderr
    assert (snapshot["workers"], snapshot["queue_size"]) == (8, 1000)


# --- Task files, databases and resuming ----------------------------------------------


def test_rerun_with_same_db_is_all_duplicates(tmp_path: Path) -> None:
    """Prove a second run of a file on the same --db executes nothing."""
    write_tasks(tmp_path / "tasks.json", task_dicts(10))
    args = ["--task-file", "tasks.json", "--db", "progress.db", *FAST]
    first_proc, first = run_json(args, tmp_path)
    assert first_proc.returncode == 0, first_proc.stderr
    assert (first["succeeded"], first["duplicates"]) == (10, 0)
    second_proc, second = run_json(args, tmp_path)
    assert second_proc.returncode == 0, second_proc.stderr
    assert (second["succeeded"], second["duplicates"], second["handler_calls"]) == (0, 10, 0)
    assert state_counts(tmp_path / "progress.db") == {"completed": 10}


HANDLER_MODULE = """
import os

def fetch(task):
    with open("calls.txt", "a", encoding="utf-8") as log:
        log.write(task.id + "\\n")
    return {"fetched": task.id}

fetch_v2 = fetch
"""


def test_handler_keys_are_not_answered_by_the_simulator(tmp_path: Path) -> None:
    """Prove --handler runs tasks the simulator completed, and --namespace survives a rename."""
    (tmp_path / "mine.py").write_text(HANDLER_MODULE, encoding="utf-8")
    write_tasks(tmp_path / "tasks.json", task_dicts(4))
    base = ["--task-file", "tasks.json", "--db", "progress.db", *FAST]
    proc, simulated = run_json(base, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert simulated["succeeded"] == 4
    proc, fetched = run_json([*base, "--handler", "mine:fetch"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (fetched["succeeded"], fetched["duplicates"]) == (4, 0)
    assert len((tmp_path / "calls.txt").read_text(encoding="utf-8").split()) == 4
    proc, again = run_json([*base, "--handler", "mine:fetch"], tmp_path)
    assert (again["succeeded"], again["duplicates"]) == (0, 4)
    # A renamed handler keeps the keys when given the old name as its namespace.
    renamed = [*base, "--handler", "mine:fetch_v2", "--namespace", "mine.fetch"]
    proc, kept = run_json(renamed, tmp_path)
    assert (kept["succeeded"], kept["duplicates"]) == (0, 4)
    assert len((tmp_path / "calls.txt").read_text(encoding="utf-8").split()) == 4
    assert state_counts(tmp_path / "progress.db") == {"completed": 8}


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        pytest.param(ON_FILE, {"TQ_WORKERS": "9" * 100_000 + "x"}, ["TQ_WORKERS"], id="env"),
        pytest.param([*ON_FILE, "--durability", "d" * 100_000], {}, ["--durability"], id="flag"),
        pytest.param(
            [*ON_FILE, "--handler", "m" * 100_000 + ":f"], {}, ["--handler"], id="handler"
        ),
        pytest.param(
            [*ON_FILE, "--metrics-out", "/nosuch/" + "p" * 100_000],
            {},
            ["--metrics-out"],
            id="metrics-out",
        ),
        pytest.param(
            ["worker", "--db", "progress.db", "--name", "n" * 100_000], {}, ["--name"], id="name"
        ),
    ],
)
def test_an_error_repeats_at_most_a_short_part_of_a_huge_value(
    workdir: Path, args: list[str], env: dict[str, str], names: list[str]
) -> None:
    """Prove a value of 100,000 characters makes a short one-line error and touches nothing."""
    before = tree_bytes(workdir)
    proc = run_cli(args, workdir, env)
    _assert_user_error(proc, names)
    assert len(proc.stderr) < 600, proc.stderr[:600]
    assert tree_bytes(workdir) == before


@pytest.mark.parametrize("command", ["enqueue", "main"])
def test_an_id_postgresql_cannot_index_exits_2_before_the_database(
    tmp_path: Path, pg_url: str, command: str
) -> None:
    """Prove an id over MAX_KEY_BYTES is refused with its field and the limit, no schema made."""
    import task_queue_optimized as tq

    write_tasks(tmp_path / "tasks.json", [{"id": "ok"}, {"id": "\u20ac" * 1000}])
    args = ["--task-file", "tasks.json", "--db", pg_url]
    proc = run_cli(["enqueue", *args] if command == "enqueue" else args, tmp_path)
    _assert_user_error(proc, ["task 1: field 'id' must be at most 2048 bytes in UTF-8, not 3000"])
    schema = store_fixtures.schema_of(pg_url)
    rows = store_fixtures.pg_rows(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", (schema,)
    )
    assert rows == [(0,)]
    assert tq.MAX_KEY_BYTES == 2048


@pytest.mark.parametrize(
    ("args", "names"),
    [
        pytest.param(["--handler", "nosuch_module:fetch"], ["--handler"], id="main-bad-handler"),
        pytest.param(["--handler", "fetch"], ["--handler"], id="main-handler-without-colon"),
        pytest.param(["--namespace", ""], ["--namespace"], id="main-empty-namespace"),
        pytest.param(["--namespace", " "], ["--namespace"], id="main-blank-namespace"),
        pytest.param(["worker", "--namespace", ""], ["--namespace"], id="worker-empty-namespace"),
    ],
)
def test_bad_handler_or_namespace_exits_2_and_touches_nothing(
    workdir: Path, args: list[str], names: list[str]
) -> None:
    """Prove a bad --handler or --namespace is a one-line error before any database exists."""
    write_tasks(workdir / "tasks.json", task_dicts(1))
    before = tree_bytes(workdir)
    if args[0] == "worker":
        argv = [*args, "--db", "progress.db"]
    else:
        argv = ["--task-file", "tasks.json", "--db", "progress.db", *args]
    proc = run_cli(argv, workdir)
    _assert_user_error(proc, names)
    assert tree_bytes(workdir) == before


class TestLoadHandler:
    """``worker --handler MODULE:FUNCTION``: every bad spec is one line and exit code 2."""

    BROKEN_MODULES = {
        "tq_syntax_error": ("def run(task)\n    return 1\n", "SyntaxError"),
        "tq_raises_at_import": ("raise RuntimeError('no config here')\n", "no config here"),
        "tq_exits_at_import": ("import sys\nsys.exit(3)\n", "SystemExit"),
        "tq_missing_dependency": ("import tq_no_such_dependency\n", "tq_no_such_dependency"),
        "tq_multiline_error": ("raise ValueError('first\\nsecond')\n", "first"),
    }

    @pytest.mark.timeout(30)
    @pytest.mark.parametrize("module", sorted(BROKEN_MODULES))
    def test_a_module_that_fails_to_import_exits_2(self, tmp_path: Path, module: str) -> None:
        """A module with a syntax error or one that raises or exits at import: one line, exit 2."""
        source, detail = self.BROKEN_MODULES[module]
        (tmp_path / f"{module}.py").write_text(source, encoding="utf-8")
        proc = run_cli(["worker", "--db", "untouched.db", "--handler", f"{module}:run"], tmp_path)
        line = one_line_error(proc)
        assert f"{module}:run" in line and "cannot import module" in line, line
        assert detail in line, line
        assert not (tmp_path / "untouched.db").exists()

    @pytest.mark.timeout(30)
    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("tq_handlers_ok:missing", "has no attribute 'missing'"),
            ("tq_handlers_ok:VALUE", "not callable"),
            ("tq_handlers_ok", "expected MODULE:FUNCTION"),
            (":run", "expected MODULE:FUNCTION"),
            ("tq_handlers_ok:", "expected MODULE:FUNCTION"),
            ("tq_handlers_ok:run:extra", "expected MODULE:FUNCTION"),
            ("", "expected MODULE:FUNCTION"),
            (".relative:run", "cannot import module"),
        ],
    )
    def test_a_bad_spec_exits_2(self, tmp_path: Path, spec: str, message: str) -> None:
        """A missing or non-callable attribute and a malformed spec: one line, exit 2."""
        (tmp_path / "tq_handlers_ok.py").write_text(
            "VALUE = 42\n\n\ndef run(task):\n    return {}\n", encoding="utf-8"
        )
        proc = run_cli(["worker", "--db", "untouched.db", "--handler", spec], tmp_path)
        line = one_line_error(proc)
        assert message in line, line
        assert not (tmp_path / "untouched.db").exists()


def test_rerun_says_what_it_waits_for(tmp_path: Path) -> None:
    """Prove a rerun blocked by a stopped run's live claims says once how many and until when,
    at the default log level."""
    import task_queue_optimized as tq

    write_tasks(tmp_path / "tasks.json", task_dicts(3))
    db = tmp_path / "progress.db"
    with tq.IdempotencyManager(str(db), lease_seconds=30.0) as crashed:
        for task in task_dicts(3):
            claim = crashed.claim(task["id"], namespace="task_queue_optimized.TaskProcessor")
            assert claim.state == "claimed"
    args = ["--task-file", "tasks.json", "--db", "progress.db", *FAST]  # the default log level
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        notices = []
        for line in proc.stderr:
            if "held by another owner" in line:
                notices.append(line)
                break
        proc.send_signal(signal.SIGINT)  # the notice was seen: no need to wait out the leases
        rest = proc.stderr.read()
        assert proc.wait(30) == 130, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(notices) == 1 and "held by another owner" not in rest
    assert re.search(
        r"waiting for 3 keys .* expires at \d\d:\d\d:\d\d \(in \d+\.\d s\)", notices[0]
    )


def _help(*args: str) -> str:
    """Return the --help text of a command with its lines joined, as one paragraph."""
    proc = run_cli([*args, "--help"], Path.cwd())
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())


@pytest.mark.parametrize("command", [[], ["enqueue"], ["worker"], ["status"], ["purge"]])
def test_help_describes_each_command_s_database_and_flags(command: list[str]) -> None:
    """Prove --db's help names every kind of database, one default, and the benchmark only
    where there is one; the main help's notes point the right way."""
    text = _help(*command)
    db_help = text.partition("--db DB_PATH ")[2].partition(" --max-attempts")[0]
    assert "postgresql://" in db_help and "SQLite progress database" not in db_help, db_help
    assert "default task_queue.db" in db_help and "default None" not in db_help, db_help
    assert ("benchmark" in db_help) is (command == []), db_help
    assert ("memory://" in db_help) is (command == []), db_help  # subcommands refuse it
    simulator = "--latency-ms, --jitter-ms, --transient-rate, --permanent-rate) are"
    if command == []:
        assert f"{simulator} ignored" in text
    if command == ["worker"]:
        assert f"{simulator} refused (exit 2)" in text
        assert "--metrics-host HOST" in text and "TQ_METRICS_HOST" in text
        assert "--schedule FILE" in text and "--burst" in text
    if command == []:
        assert "Every flag above that names a TQ_ variable" in text
    if command == ["worker"]:
        assert "default HOST:PID:ID" in text


@pytest.mark.parametrize("db", [":memory:", "sqlite:///:memory:", "memory://"])
def test_an_in_memory_database_for_the_durable_queue_is_one_clear_line(
    tmp_path: Path, db: str
) -> None:
    """Prove the refusal quotes the database's name once (no double colon)."""
    proc = run_cli(["status", "--db", db], tmp_path)
    _assert_user_error(proc, [f"error: database {db!r} lives in one process's memory only"])
    assert "::" not in proc.stderr.replace(":memory:", "").replace("://", "")


@pytest.mark.timeout(45)
def test_an_interrupted_run_in_memory_says_a_rerun_starts_over(
    tmp_path: Path, launcher: store_fixtures.Launcher
) -> None:
    """Prove the rerun advice of a run on :memory: promises nothing it did not keep."""
    gate = tmp_path / "gate"
    write_tasks(tmp_path / "tasks.json", [{"id": "t0", "payload": {"gate": str(gate)}},
                                          {"id": "t1"}])  # fmt: skip
    run = launcher.spawn(
        "--task-file", "tasks.json", "--db", ":memory:", "--workers", "1",
        "--handler", store_fixtures.RECORD_HANDLER,
    )  # fmt: skip
    wait_until(lambda: launcher.executions(), "t0 to start", procs=[run])
    run.signal(signal.SIGINT)
    gate.touch()
    assert run.wait() == 130
    stderr = run.stderr()
    assert "The database :memory: kept nothing: a rerun starts over." in stderr, stderr
    assert "skips" not in stderr, stderr


@pytest.mark.parametrize(
    ("env", "flags", "expected", "absent"),
    [
        pytest.param({}, [], "task_queue.db", ["custom.db"], id="default"),
        pytest.param(
            {"TQ_DB_PATH": "custom.db"}, [], "custom.db", ["task_queue.db"], id="tq-db-path"
        ),
        pytest.param(
            {"TQ_DB_PATH": "custom.db"},
            ["--db", "flag.db"],
            "flag.db",
            ["custom.db", "task_queue.db"],
            id="flag-over-env",
        ),
    ],
)
def test_task_file_database_location(
    tmp_path: Path, env: dict[str, str], flags: list[str], expected: str, absent: list[str]
) -> None:
    """Prove the database is --db, else TQ_DB_PATH, else ./task_queue.db, created 0600."""
    write_tasks(tmp_path / "tasks.json", task_dicts(2))
    proc = run_cli(["--task-file", "tasks.json", *FAST, *flags], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    db = tmp_path / expected
    assert state_counts(db) == {"completed": 2}
    assert db.stat().st_mode & 0o777 == 0o600
    for name in absent:
        assert not (tmp_path / name).exists(), name


# --- Signals -------------------------------------------------------------------------


@pytest.mark.timeout(45)
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_signal_stops_gracefully_and_rerun_completes(
    tmp_path: Path, signum: signal.Signals, code: int
) -> None:
    """Prove a signal cancels the rest, leaves no claim in progress, and a rerun finishes."""
    write_tasks(tmp_path / "tasks.json", task_dicts(200, latency_ms=50))
    db = tmp_path / "progress.db"
    args = ["--task-file", "tasks.json", "--db", "progress.db", "--jitter-ms", "0"]
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args, "--workers", "2"],
            cwd=tmp_path,
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            wait_until(lambda: completed_count(db) >= 1, "a first completed key")
            proc.send_signal(signum)
            returncode = proc.wait(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err_path.read_text(encoding="utf-8")
    assert returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    assert "cancel" in stderr.lower(), stderr
    assert re.search(r"re-?run", stderr, re.IGNORECASE), stderr

    states = state_counts(db)
    assert states.get("in_progress", 0) == 0, states
    done = states.get("completed", 0)
    assert 1 <= done < 200, states

    rerun, snapshot = run_json([*args, "--workers", "20"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert snapshot["succeeded"] == 200 - done
    assert snapshot["duplicates"] == done
    assert (snapshot["failed"], snapshot["cancelled"]) == (0, 0)
    assert state_counts(db) == {"completed": 200}


def test_a_reader_that_went_away_ends_the_output_without_a_traceback(tmp_path: Path) -> None:
    """Prove `task-queue ... | head` exits 1 with a quiet stderr and the run still recorded."""
    db = tmp_path / "progress.db"
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the child starts: its writes fail, every time
    try:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--task-file", str(SAMPLE_FILE), "--db", str(db), *FAST],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert state_counts(db).get("completed") == 95
