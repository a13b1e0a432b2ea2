"""Stress crash safety: SIGKILL a run many times, then check what survived.

Two loops run for each durability mode, each on a fresh database in a temporary folder:

- ``cli``: ``python task_queue_optimized.py --task-file F --db D --json`` killed at random moments
  (one in three during start-up, the others soon after the run starts completing tasks); a run that
  finishes by itself must report exactly the keys completed before it as duplicates.
- ``pool``: a child running `WorkerPool` with a handler that logs every call, so the figures include
  the handler calls that ran twice: the honest cost of at-least-once execution.

Then a final run finishes, and the database must hold every key completed exactly once, nothing
in progress, and pass ``PRAGMA integrity_check``. The task file holds 1,000 tasks of 2-5 ms, or
100 per kill when that is more, so that kills keep landing on work still to do. Example::

    python tests/stress_kill.py --kills 200
    python tests/stress_kill.py --kills 50 --tasks 5000 --durability full --mode pool

Exit code 0 when every check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.reliability_helpers import LoopFigures, cli_kill_loop, pool_kill_loop


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs per loop (default 200)")
    parser.add_argument(
        "--tasks",
        type=int,
        help="tasks in the file (default: 1000, or 100 per kill if more, so kills land on work)",
    )
    parser.add_argument(
        "--durability",
        choices=("normal", "full", "both"),
        default="both",
        help="durability mode(s) to run (default both)",
    )
    parser.add_argument(
        "--mode", choices=("cli", "pool", "both"), default="both", help="loop(s) to run"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--lease", type=float, default=1.0, help="lease seconds (default 1)")
    parser.add_argument(
        "--max-delay",
        type=float,
        default=0.05,
        help="latest kill moment after a run has started working, seconds (default 0.05)",
    )
    args = parser.parse_args(argv)
    if args.tasks is None:
        args.tasks = max(1000, 100 * args.kills)
    if args.kills < 0 or args.tasks < 1 or args.lease <= 0 or args.max_delay < 0:
        parser.error("--kills >= 0, --tasks >= 1, --lease > 0 and --max-delay >= 0 please")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the kill loops the flags ask for and print their figures; return the exit code."""
    args = _parse_args(argv)
    modes = ("cli", "pool") if args.mode == "both" else (args.mode,)
    durabilities = ("normal", "full") if args.durability == "both" else (args.durability,)
    loops = {"cli": cli_kill_loop, "pool": pool_kill_loop}
    ok = True
    for durability in durabilities:
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix="stress-kill-") as folder:
                began = time.monotonic()
                figures: LoopFigures = loops[mode](
                    Path(folder),
                    tasks=args.tasks,
                    kills=args.kills,
                    durability=durability,
                    seed=args.seed,
                    lease=args.lease,
                    work_window=(0.0, args.max_delay),
                )
                elapsed = time.monotonic() - began
            print(f"{figures.line()} seconds={elapsed:.1f}", flush=True)
            for problem in figures.problems:
                print(f"  PROBLEM: {problem}", flush=True)
            ok = ok and not figures.problems and figures.integrity == "ok" and not figures.lost
    print("all checks held" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
