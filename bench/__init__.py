"""The harnesses behind benchmark.py, which keeps the command line, the suite and the report.

- `bench.core`: workloads, runs, settings and the progress bar, shared by every harness.
- `bench.scaleout`: fresh databases, and worker processes draining a durable queue
  (``--db URL --processes LIST``).
- `bench.peers`: Huey in process, and the durable comparison of our worker process with PGQueuer
  and Dramatiq (``--db postgresql://... --peers``).
- `bench.worker_side`: the code those worker processes import (handlers, the PGQueuer and
  Dramatiq setups), standard library only until a peer's function is called.

Nothing is imported here, so that a worker process importing `bench.worker_side` loads nothing
else.
"""
