#!/usr/bin/env bash
# Run the test suite (the same command as README.md and CI).
set -euo pipefail
cd "$(dirname "$0")"
exec python -m pytest -q "$@"
