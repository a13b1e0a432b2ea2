"""Run the test suite (the same command as README.md and CI), on any platform."""

import os
import subprocess
import sys


def main() -> int:
    """Run pytest from the repository root and return its exit code."""
    root = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-m", "pytest", "-q", *sys.argv[1:]]
    return subprocess.call(command, cwd=root)


if __name__ == "__main__":
    raise SystemExit(main())
