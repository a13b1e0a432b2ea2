"""benchmark.py: its smoke run, its report, its modes and its user errors.

No thresholds and no wall-time assertions here: performance is what benchmark.py reports, not what
the test suite judges. Every run goes through a real subprocess in a temporary working directory.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import benchmark
from bench import peers
from tests import store_fixtures
from tests.support import REPO, SAMPLE_FILE, child_env, one_line_error

BENCHMARK = REPO / "benchmark.py"
SMOKE_TIMEOUT = 120.0
SHORT_TIMEOUT = 60.0
SNAPSHOT_SERIES = ("latency_ms", "queue_wait_ms", "service_ms")
SERIES_KEYS = {"count", "mean", "p50", "p95", "p99", "max"}
SCALE_TASKS = 200
WORKER_EXIT_ON_SIGTERM = 143

pytestmark = pytest.mark.timeout(SMOKE_TIMEOUT + 30)


def run_benchmark(
    args: Sequence[str], cwd: Path, timeout: float = SHORT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``python benchmark.py ARGS`` in ``cwd`` and return the finished process."""
    return subprocess.run(
        [sys.executable, str(BENCHMARK), *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def is_finite_number(value: Any) -> bool:
    """Return whether ``value`` is a finite int or float (and not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.fixture(scope="module")
def smoke(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Run the smoke benchmark once for the module; return the process and its report path."""
    folder = tmp_path_factory.mktemp("smoke")
    report = folder / "report.json"
    proc = run_benchmark(
        ["--smoke", "--no-progress", "--report", str(report)], folder, timeout=SMOKE_TIMEOUT
    )
    return proc, report


@pytest.fixture(scope="module")
def smoke_report(smoke: tuple[subprocess.CompletedProcess[str], Path]) -> dict[str, Any]:
    """The smoke run's JSON report."""
    proc, report = smoke
    assert proc.returncode == 0, proc.stderr
    return json.loads(report.read_text(encoding="utf-8"))


# --- The smoke run -------------------------------------------------------------------------------


def test_smoke_exits_zero_and_prints_both_tables(
    smoke: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """Prove --smoke succeeds and prints the comparison table and the targets table."""
    proc, report = smoke
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for heading in ("system", "throughput/s", "efficiency", "target", "threshold"):
        assert heading in proc.stdout
    for system in ("naive", "raw-executor", "pool"):
        assert f"\n{system} " in proc.stdout
    assert report.exists()
    assert sorted(path.name for path in report.parent.iterdir()) == ["report.json"]


def test_report_describes_the_machine_and_configuration(smoke_report: dict[str, Any]) -> None:
    """Prove the report carries the configuration, Python version, machine and date."""
    assert smoke_report["configuration"]["mode"] == "smoke"
    assert smoke_report["python"]["version"].startswith(f"{sys.version_info[0]}.")
    machine = smoke_report["machine"]
    assert isinstance(machine["cores"], int) and machine["cores"] >= 1
    assert machine["platform"]
    assert smoke_report["date"][:2] == "20"
    assert smoke_report["workload"]["tasks"] > 0


def test_every_run_carries_a_metrics_snapshot(smoke_report: dict[str, Any]) -> None:
    """Prove each run has its system, workers and a snapshot with finite numbers."""
    runs = smoke_report["runs"]
    assert runs
    systems = {run["system"] for run in runs}
    assert {"naive", "raw-executor", "pool", "pool-full", "raw-executor-bare"} <= systems
    for run in runs:
        assert isinstance(run["workers"], int) and run["workers"] >= 1
        metrics = run["metrics"]
        assert is_finite_number(metrics["throughput_per_second"]), run
        assert is_finite_number(metrics["elapsed_seconds"]), run
        if run["system"] not in ("raw-executor-bare", "plain-asyncio"):  # bare references
            for series in SNAPSHOT_SERIES:
                assert set(metrics[series]) >= SERIES_KEYS, (run["system"], series)


def test_comparison_runs_report_efficiency_and_speedup(smoke_report: dict[str, Any]) -> None:
    """Prove the comparison runs have a finite efficiency and a speedup over the baseline."""
    compared = [run for run in smoke_report["runs"] if run["speedup"] is not None]
    assert {run["system"] for run in compared} >= {"naive", "raw-executor", "pool"}
    for run in compared:
        assert is_finite_number(run["efficiency"]), run
        assert is_finite_number(run["speedup"]), run
    naive = [run for run in compared if run["system"] == "naive"]
    assert [run["speedup"] for run in naive] == [1.0]
    summary_keys = {"system", "workers", "throughput_per_second", "efficiency", "speedup"}
    for entry in smoke_report["summary"]:
        assert set(entry) >= summary_keys
        assert set(entry["throughput_per_second"]) == {"median", "min", "max"}


def test_targets_are_present_with_finite_ratios(smoke_report: dict[str, Any]) -> None:
    """Prove the thirteen targets are reported, measured ones finite, none judged in smoke."""
    targets = smoke_report["targets"]
    assert [target["target"] for target in targets] == list(range(1, 14))
    metrics = [target["metric"] for target in targets]
    assert metrics == [
        "efficiency",
        "vs_raw_executor",
        "rss_growth_mb",
        "p99_queue_wait_ms",
        "attempt_efficiency",
        "full_vs_normal",
        "efficiency",
        "raw_minus_pool_efficiency",
        "vs_plain_asyncio",
        "throughput_vs_best_peer",
        "cpu_per_task_vs_best_peer",
        "efficiency",
        "two_vs_one_process",
    ]
    for target in targets[:8]:
        assert is_finite_number(target["value"]), target
    for target in targets:
        assert target["met"] is None, target  # smoke: no thresholds
    for target in targets[9:]:
        assert target["skipped"] and target["value"] is None, target  # durable: not in smoke


def test_async_target_measures_plain_asyncio_and_never_a_stand_in(
    smoke_report: dict[str, Any],
) -> None:
    """Prove the async target has its plain asyncio side, and no value without AsyncWorkerPool."""
    plain = [run for run in smoke_report["runs"] if run["system"] == "plain-asyncio"]
    assert len(plain) == 1 and is_finite_number(plain[0]["efficiency"]), plain
    target = smoke_report["targets"][8]
    pooled = [run for run in smoke_report["runs"] if run["system"] == "async-pool"]
    if target["unavailable"] is not None:
        assert "AsyncWorkerPool" in target["unavailable"]
        assert target["value"] is None and not pooled
    else:
        assert is_finite_number(target["value"]) and len(pooled) == 1


def test_machine_cpu_seconds_grow_with_work() -> None:
    """Prove the /proc/stat reading is a finite, non-decreasing count of CPU seconds."""
    first = peers.machine_cpu_seconds()
    if first is None:
        pytest.skip("no /proc/stat here")
    sum(range(2_000_000))
    second = peers.machine_cpu_seconds()
    assert second is not None and second >= first


def test_open_loop_and_memory_samples_are_reported(smoke_report: dict[str, Any]) -> None:
    """Prove the open-loop run has percentiles from arrival and the memory run its RSS samples."""
    loops = {run["system"]: run["open_loop"] for run in smoke_report["runs"] if "open_loop" in run}
    assert set(loops) == {"pool", "raw-executor"}  # the pool, and the bare executor as reference
    for name in (
        "latency_from_arrival_ms",
        "queue_wait_from_arrival_ms",
        "queue_wait_from_submit_ms",
        "submit_lag_ms",
    ):
        assert set(loops["pool"][name]) == SERIES_KEYS
        assert loops["pool"][name]["count"] > 0
    memory = [run["memory"] for run in smoke_report["runs"] if "memory" in run]
    assert len(memory) == 1
    assert memory[0]["tasks"] == memory[0]["total"] > memory[0]["mark"]
    assert is_finite_number(memory[0]["growth_mb"])


# --- Other modes ---------------------------------------------------------------------------------


def test_repeat_and_sweep_report_median_min_and_max(tmp_path: Path) -> None:
    """Prove --repeat runs each system K times per worker count and summarises the spread."""
    report = tmp_path / "r.json"
    proc = run_benchmark(
        ["--tasks", "8", "--latency-ms", "1", "--workers", "1,2", "--repeat", "2",
         "--report", str(report)],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text(encoding="utf-8"))
    counted = {(e["system"], e["workers"]): e["runs"] for e in data["summary"]}
    assert counted == {
        ("naive", 1): 2,
        ("raw-executor", 1): 2,
        ("pool", 1): 2,
        ("raw-executor", 2): 2,
        ("pool", 2): 2,
    }
    assert "(" in proc.stdout  # medians with (min-max)


def test_task_file_counts_duplicates_and_retries(tmp_path: Path) -> None:
    """Prove a task-file run reports the sample file's duplicates and at least its retries."""
    report = tmp_path / "r.json"
    proc = run_benchmark(
        ["--task-file", str(SAMPLE_FILE), "--workers", "16", "--report", str(report)], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text(encoding="utf-8"))
    pool = next(run for run in data["runs"] if run["system"] == "pool")
    assert pool["metrics"]["duplicates"] == 5
    assert pool["metrics"]["retries"] >= 5
    assert pool["executed"] == 95
    assert data["workload"]["unique_keys"] == 95


def test_open_loop_mode(tmp_path: Path) -> None:
    """Prove --rate runs an open loop (pool and bare executor) with latency from arrivals."""
    report = tmp_path / "r.json"
    proc = run_benchmark(
        ["--rate", "400", "--tasks", "30", "--latency-ms", "1", "--workers", "2",
         "--report", str(report)],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["configuration"]["mode"] == "open-loop"
    assert sorted(run["system"] for run in data["runs"]) == ["pool", "raw-executor"]
    for run in data["runs"]:
        loop = run["open_loop"]
        assert loop["arrivals"] == 30
        assert loop["rate_per_second"] == 400
        assert is_finite_number(loop["load"])
        assert loop["latency_from_arrival_ms"]["count"] == 30


def test_rate_limit_mode_judges_the_limit_by_its_calls(tmp_path: Path) -> None:
    """Prove --rate-limit runs the limit in process and in a SQLite file, never over it."""
    report = tmp_path / "r.json"
    proc = run_benchmark(
        ["--rate-limit", "20/s", "--tasks", "25", "--workers", "4", "--report", str(report)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["configuration"]["mode"] == "rate-limit"
    assert sorted(run["system"] for run in data["runs"]) == ["pool-rate-memory", "pool-rate-sqlite"]
    for run in data["runs"]:
        limit = run["rate_limit"]
        assert limit["calls"] == 25 and limit["limit"] == "20/s"
        assert limit["busiest_window"] <= 20  # the limit held
        assert is_finite_number(limit["steady_rate"]) and limit["target_rate"] == 20
    one_line_error(run_benchmark(["--rate-limit", "fast"], tmp_path), "--rate-limit")


def test_peers_without_huey_print_one_line_and_go_on(tmp_path: Path) -> None:
    """Prove --peers without Huey says so in one line and runs the rest."""
    if importlib.util.find_spec("huey") is not None:
        pytest.skip("huey is installed")
    report = tmp_path / "r.json"
    proc = run_benchmark(
        ["--peers", "--tasks", "4", "--latency-ms", "0", "--workers", "1", "--report", str(report)],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "huey" in lines[0], proc.stderr
    assert report.exists()


# --- Scale-out -----------------------------------------------------------------------------------


def run_scale_out(db: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``--db DB --processes 1,2 --tasks 200`` in ``cwd``; return the process and report."""
    report = cwd / "report.json"
    proc = run_benchmark(
        ["--db", db, "--processes", "1,2", "--tasks", str(SCALE_TASKS), "--no-progress",
         "--report", str(report)],
        cwd,
        timeout=SMOKE_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "warning" not in proc.stderr, proc.stderr
    return proc, json.loads(report.read_text(encoding="utf-8"))


def check_scale_report(
    proc: subprocess.CompletedProcess[str], data: dict[str, Any], backend: str
) -> list[dict[str, Any]]:
    """Check the printed tables and the report of a 1,2-process run; return its scale runs."""
    for heading in ("processes", "throughput/s", "ceiling/s", "efficiency", "speedup", "no-op"):
        assert heading in proc.stdout
    assert data["configuration"]["mode"] == "scale-out"
    assert data["configuration"]["processes"] == [1, 2]
    scale = data["scale_out"]
    assert scale["backend"] == backend
    assert scale["latency_ms"] == 10.0
    assert scale["workers_per_process"] == 8
    assert [entry["processes"] for entry in scale["summary"]] == [1, 2]
    for entry in scale["summary"]:
        assert entry["tasks"] == SCALE_TASKS
        assert entry["ceiling_per_second"] == pytest.approx(entry["processes"] * 8 / 0.010)
        for name in ("throughput_per_second", "efficiency", "speedup"):
            assert set(entry[name]) == {"median", "min", "max"}, name
            assert is_finite_number(entry[name]["median"]), (name, entry)
    assert scale["summary"][0]["speedup"]["median"] == 1.0
    runs = [run for run in data["runs"] if "scale_out" in run]
    assert [run["system"] for run in runs] == [f"processes-{backend}"] * 2
    for run, processes in zip(runs, (1, 2), strict=True):
        details = run["scale_out"]
        assert details["processes"] == processes
        assert run["workers"] == 8 * processes
        assert is_finite_number(run["efficiency"]), run
        # Every task ran exactly once, each worker drained on SIGTERM and printed its snapshot.
        assert run["metrics"]["succeeded"] == SCALE_TASKS
        assert run["metrics"]["failed"] == 0
        assert run["metrics"]["handler_calls"] == SCALE_TASKS
        assert details["exit_codes"] == [WORKER_EXIT_ON_SIGTERM] * processes
        assert len(details["worker_snapshots"]) == processes
        assert sum(s["succeeded"] for s in details["worker_snapshots"]) == SCALE_TASKS
    noop = {run["system"]: run for run in data["runs"] if "store_noop" in run}
    assert noop["pool-sqlite"]["metrics"]["succeeded"] == 10 * SCALE_TASKS
    assert is_finite_number(scale["noop_overhead"]["sqlite_throughput_per_second"]["median"])
    return runs


def test_scale_out_on_sqlite_leaves_the_given_file_alone(tmp_path: Path) -> None:
    """Prove --db PATH --processes 1,2 runs both counts in temporary files beside PATH.

    No PostgreSQL figure: the report says the comparison needs a postgresql:// URL.
    """
    proc, data = run_scale_out(str(tmp_path / "scale.db"), tmp_path)
    check_scale_report(proc, data, "sqlite")
    overhead = data["scale_out"]["noop_overhead"]
    assert overhead["postgresql_throughput_per_second"] is None
    assert overhead["postgresql_vs_sqlite"] is None
    assert "postgresql://" in overhead["note"]
    assert "postgresql://" in proc.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json"]


def test_scale_out_on_postgres_drops_its_schemas(tmp_path: Path) -> None:
    """Prove --db postgresql://... --processes 1,2 reports the no-op ratio and drops its schemas."""
    store_fixtures.require_postgres()
    proc, data = run_scale_out(store_fixtures.PG_DSN, tmp_path)
    runs = check_scale_report(proc, data, "postgresql")
    overhead = data["scale_out"]["noop_overhead"]
    assert is_finite_number(overhead["postgresql_throughput_per_second"]["median"])
    assert is_finite_number(overhead["postgresql_vs_sqlite"]["median"])
    assert overhead["note"] is None
    schemas = []
    for run in runs:
        command = run["scale_out"]["command"]
        query = urllib.parse.urlsplit(command[command.index("--db") + 1]).query
        schemas.append(dict(urllib.parse.parse_qsl(query))["schema"])
    assert len(set(schemas)) == 2 and all(name.startswith("bench_") for name in schemas)
    rows = store_fixtures.pg_rows(
        "SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", (schemas,)
    )
    assert rows == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.json"]


# --- User errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--no-such-flag"], ["--no-such-flag"]),
        (["--workers", "1,x"], ["--workers"]),
        (["--workers", "0"], ["--workers"]),
        (["--repeat", "0"], ["--repeat"]),
        (["--rate", "-3"], ["--rate"]),
        (["--quick"], ["--quick"]),
        (["--suite", "--smoke"], ["--suite", "--smoke"]),
        (["--task-file", "missing.json"], ["missing.json"]),
        (["--report", "no/such/folder/r.json"], ["--report"]),
        (["--db", "x.db", "--processes", "1,x"], ["--processes"]),
        (["--db", "x.db", "--processes", "0"], ["--processes"]),
        (["--db", "mysql://h/db", "--processes", "1"], ["--db", "unknown scheme"]),
        (["--db", "memory://", "--processes", "1"], ["memory://"]),
        (["--db", "no/such/folder/x.db", "--processes", "1"], ["--db", "does not exist"]),
        (["--processes", "1,2"], ["--db", "--processes"]),
        (["--db", "x.db"], ["--db", "--processes"]),
        (["--db", "x.db", "--peers"], ["--db", "postgresql://"]),
        (["--smoke", "--db", "postgresql://postgres@127.0.0.1:5432/test"], ["--smoke", "--db"]),
        (["--db", "x.db", "--processes", "1", "--workers", "2,4"], ["--workers"]),
        (["--smoke", "--db", "x.db", "--processes", "1"], ["--smoke", "--processes"]),
        (["--db", "postgresql://postgres@127.0.0.1:1/test", "--processes", "1"], ["postgresql://"]),
        (["--concurrency-plot", "c.png", "--suite"], ["--suite", "--concurrency-plot"]),
        (["--concurrency-plot", "c.png", "--rate", "5"], ["--rate", "--concurrency-plot"]),
        (["--concurrency-plot", "c.png", "--db", "x.db"], ["--concurrency-plot", "--db"]),
        (["--concurrency-plot", "c.png", "--peers"], ["--concurrency-plot", "--peers"]),
        (["--concurrency-plot", "c.png", "--plot", "p.png"], ["--concurrency-plot", "--plot"]),
        (["--concurrency-plot", "c.png", "--latency-ms", "0"], ["--latency-ms"]),
        (["--concurrency-plot", "no/such/folder/c.png"], ["--concurrency-plot"]),
        (["--unused-cost", "missing.py"], ["--unused-cost", "missing.py"]),
        (["--unused-cost", "base.py", "--suite"], ["--suite", "--unused-cost"]),
        (["--unused-cost", "base.py", "--task-file", "t.json"], ["--unused-cost", "--task-file"]),
    ],
)
def test_user_error_exits_2_with_one_line(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    """Prove a bad flag or input exits 2 with one line on stderr, before running anything."""
    proc = run_benchmark(args, tmp_path)
    one_line_error(proc, *words)
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_unused_cost_compares_this_module_with_a_copy(tmp_path: Path) -> None:
    """Prove --unused-cost runs both modules in turn and reports medians and their ratios."""
    baseline = tmp_path / "base.py"
    baseline.write_bytes((REPO / "task_queue_optimized.py").read_bytes())
    report = tmp_path / "report.json"
    args = ["--unused-cost", str(baseline), "--tasks", "300", "--workers", "2", "--repeat", "2"]
    proc = run_benchmark([*args, "--report", str(report)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "current vs baseline" in proc.stdout
    result = json.loads(report.read_text(encoding="utf-8"))["unused_cost"]
    assert (result["tasks"], result["workers"], result["repeat"]) == (300, 2, 2)
    for variant in ("baseline", "current", "current-priority"):
        assert len(result["throughput"][variant]) == 2
        assert is_finite_number(result["median"][variant]) and result["median"][variant] > 0
        assert is_finite_number(result["cpu_median"][variant])
    assert all(is_finite_number(value) for value in result["current_vs_baseline"].values())


def test_plot_without_matplotlib_is_a_clear_user_error(tmp_path: Path) -> None:
    """Prove --plot without matplotlib names the missing package and runs nothing."""
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed")
    proc = run_benchmark(["--plot", str(tmp_path / "b.png")], tmp_path)
    one_line_error(proc, "matplotlib")
    assert list(tmp_path.iterdir()) == []


def test_concurrency_plot_without_matplotlib_is_a_clear_user_error(tmp_path: Path) -> None:
    """Prove --concurrency-plot without matplotlib names the missing package and runs nothing."""
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed")
    proc = run_benchmark(["--concurrency-plot", str(tmp_path / "c.png")], tmp_path)
    one_line_error(proc, "matplotlib")
    assert list(tmp_path.iterdir()) == []


def test_concurrency_plot_runs_every_system_at_every_level_and_draws_them(tmp_path: Path) -> None:
    """Prove --concurrency-plot runs the pool, the bare executor, AsyncWorkerPool and plain
    asyncio at each --workers count, reports throughput and efficiency, and writes the PNG."""
    pytest.importorskip("matplotlib")
    picture = tmp_path / "c.png"
    proc = run_benchmark(
        ["--concurrency-plot", str(picture), "--workers", "1,3", "--tasks", "6",
         "--latency-ms", "2", "--report", str(tmp_path / "r.json")],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert picture.read_bytes().startswith(b"\x89PNG")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["configuration"]["mode"] == "concurrency"
    summary = report["concurrency"]["summary"]
    systems = {"pool", "raw-executor-bare", "async-pool", "plain-asyncio"}
    assert {(e["system"], e["workers"]) for e in summary} == {
        (system, level) for system in systems for level in (1, 3)
    }
    for entry in summary:
        assert entry["throughput_per_second"]["median"] > 0
        assert 0 < entry["efficiency"]["median"] <= 1.5
    assert all(run["executed"] == 6 for run in report["runs"])
    assert "concurrency  system" in proc.stdout


# --- Arithmetic ----------------------------------------------------------------------------------


def test_ceiling_uses_the_mean_latency_of_the_tasks_that_run() -> None:
    """Prove the ceiling counts each idempotency key once, with its payload latency."""
    workload = benchmark.file_workload(str(SAMPLE_FILE), latency_ms=30.0, jitter_ms=0.0, seed=1)
    unique: dict[str, float] = {}
    for task in workload.tasks:
        unique.setdefault(task.key, float(task.payload.get("latency_ms", 30.0)))
    mean = sum(unique.values()) / len(unique) / 1000
    assert workload.mean_latency == pytest.approx(mean)
    assert workload.ceiling(8) == pytest.approx(8 / mean)
    assert benchmark.synthetic_workload(10, 0.0).ceiling(8) is None


def test_efficiency_is_executed_tasks_per_second_over_the_ceiling() -> None:
    """Prove efficiency and attempt efficiency from a snapshot's counts and elapsed time."""
    metrics = {"elapsed_seconds": 2.0, "throughput_per_second": 55.0, "handler_calls": 120}
    run = benchmark.Run("pool", 4, "w", 0, metrics, executed=100, ceiling=100.0)
    assert run.efficiency == pytest.approx(0.5)
    assert run.attempt_efficiency == pytest.approx(0.6)
    assert benchmark.Run("pool", 4, "w", 0, metrics, executed=100, ceiling=None).efficiency is None
