"""Helpers shared by the command-line tests: real subprocesses, real files, no mocks."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "task_queue_optimized.py"
SAMPLE_FILE = REPO / "sample_tasks_100.json"
CLI_TIMEOUT = 30.0


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the current environment without any TQ_* variable, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("TQ_")}
    env.update(extra or {})
    return env


def run_cli(
    args: Sequence[str],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = CLI_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``python task_queue_optimized.py ARGS`` in ``cwd`` and return the finished process."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_json(
    args: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run the CLI with ``--json`` and return the process and the parsed snapshot."""
    proc = run_cli([*args, "--json"], cwd, env)
    assert proc.stdout.strip(), f"no JSON on stdout; stderr: {proc.stderr}"
    return proc, json.loads(proc.stdout)


def make_tasks(count: int, latency_ms: float = 1, prefix: str = "t") -> list[dict]:
    """Return ``count`` task objects with distinct ids and a small payload."""
    return [
        {"id": f"{prefix}-{i:04d}", "payload": {"latency_ms": latency_ms, "size_bytes": 64}}
        for i in range(count)
    ]


def write_tasks(path: Path, tasks: object) -> Path:
    """Write ``tasks`` as a JSON task file and return its path."""
    path.write_text(json.dumps(tasks), encoding="utf-8")
    return path


def state_counts(db: Path) -> dict[str, int]:
    """Return the number of rows per state in the idempotency table of ``db``."""
    # Read-only, so a poll that races the database's creation never creates the file itself.
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = conn.execute("SELECT state, COUNT(*) FROM idempotency GROUP BY state").fetchall()
    finally:
        conn.close()
    return {state: count for state, count in rows}


def wait_for_completed(db: Path, at_least: int, deadline_seconds: float = 20.0) -> int:
    """Poll ``db`` until it holds ``at_least`` completed keys; return the count seen.

    Raises:
        AssertionError: when the deadline passes first.
    """
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        if db.exists():
            try:
                completed = state_counts(db).get("completed", 0)
            except sqlite3.Error:
                completed = 0  # the table is not created yet, or a writer holds a lock
            if completed >= at_least:
                return completed
        time.sleep(0.02)
    raise AssertionError(f"{db} never reached {at_least} completed keys")


def tree_bytes(root: Path) -> dict[str, bytes | None]:
    """Return every path under ``root`` mapped to its bytes (None for a directory)."""
    return {
        str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
        for path in sorted(root.rglob("*"))
    }
