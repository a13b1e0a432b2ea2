"""Generate ``sample_tasks_100.json``, the sample task file.

The output is deterministic: running ``python tests/make_sample_tasks.py`` rewrites the file
byte for byte identically. The file holds 100 tasks ``task-001`` ... ``task-100`` with keys
``key-001`` ... ``key-100``, a ``latency_ms`` between 20 and 40 and a ``size_bytes`` of at most
256 KiB. Five tasks repeat an earlier task's idempotency key with an identical payload (five
duplicates) and five other tasks fail transiently once or twice, so a clean run with the default
three attempts ends 100% successful: 95 executed, 5 duplicates, at least 5 retries.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240311
TASK_COUNT = 100
DUPLICATE_COUNT = 5
TRANSIENT_COUNT = 5
MIN_LATENCY_MS = 20
MAX_LATENCY_MS = 40
MAX_SIZE_BYTES = 256 * 1024
SAMPLE_PATH = Path(__file__).resolve().parent.parent / "sample_tasks_100.json"


def build_tasks(seed: int = SEED) -> list[dict]:
    """Return the sample tasks as JSON-compatible dicts, the same list for the same seed."""
    rng = random.Random(seed)
    # Duplicates and transient failures sit in the later part of the file, so every duplicate
    # has plenty of earlier tasks to copy from.
    special = rng.sample(range(20, TASK_COUNT), DUPLICATE_COUNT + TRANSIENT_COUNT)
    duplicates = set(special[:DUPLICATE_COUNT])
    transients = set(special[DUPLICATE_COUNT:])
    copied: set[int] = set()
    tasks: list[dict] = []
    for index in range(TASK_COUNT):
        task_id = f"task-{index + 1:03d}"
        if index in duplicates:
            sources = [
                i
                for i in range(index)
                if i not in duplicates and i not in transients and i not in copied
            ]
            source = rng.choice(sources)
            copied.add(source)
            original = tasks[source]
            tasks.append(
                {
                    "id": task_id,
                    "idempotency_key": original["idempotency_key"],
                    "payload": dict(original["payload"]),
                }
            )
            continue
        payload: dict = {
            "latency_ms": rng.randint(MIN_LATENCY_MS, MAX_LATENCY_MS),
            "size_bytes": rng.randint(0, MAX_SIZE_BYTES),
        }
        if index in transients:
            payload["fail"] = "transient"
            payload["fail_times"] = rng.choice((1, 2))
        tasks.append({"id": task_id, "idempotency_key": f"key-{index + 1:03d}", "payload": payload})
    return tasks


def render(tasks: list[dict]) -> str:
    """Return the pretty-printed JSON text written to the sample file."""
    return json.dumps(tasks, indent=2) + "\n"


def main(path: Path = SAMPLE_PATH) -> None:
    """Write the sample task file."""
    path.write_text(render(build_tasks()), encoding="utf-8")


if __name__ == "__main__":
    main()
