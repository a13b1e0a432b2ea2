"""The worker-side code of benchmark.py's durable runs: handlers, PGQueuer and Dramatiq setups.

Each contender runs the same two tasks: a no-op, and a 10 ms wait. This module is imported by
the worker processes (``task_queue_optimized.py worker --handler bench.worker_side:noop``,
``python -m bench.worker_side pgqueuer-worker``, ``dramatiq bench.worker_side:dramatiq_broker``),
so it imports nothing outside the standard library until a peer's function is called. The worker
processes read their settings from ``BENCH_*`` environment variables, set by `bench.peers`.

Completion counters: Dramatiq's worker counts its acks in a shared file (``BENCH_ACK_FILE``, an
8-byte counter in a memory map) that `bench.peers` reads, because RabbitMQ's AMQP interface does not
report unacknowledged messages. The count is written after Dramatiq has handed the ack to its
connection, so a task counts once it ran and was acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

SLEEP_SECONDS = 0.010  # the 10 ms task
READY_LINE = "bench-peers: ready"  # printed on stderr by the PGQueuer factory before it serves
PGQUEUER_ENTRYPOINTS = ("noop", "sleep_10ms")
DRAMATIQ_ACTORS = ("noop", "sleep_10ms")


# --- Our worker's handlers -----------------------------------------------------------------------


def noop(task: Any) -> None:
    """Do nothing: the task's whole cost is the queue's."""
    return None


def sleep_10ms(task: Any) -> None:
    """Wait 10 ms, like a call to a fast service."""
    time.sleep(SLEEP_SECONDS)


# --- Completion counter --------------------------------------------------------------------------


class AckCounter:
    """An 8-byte counter in a memory-mapped file: one process writes it, another reads it."""

    SIZE = 8

    def __init__(self, path: str, *, create: bool = False) -> None:
        if create:
            with open(path, "wb") as handle:
                handle.write(b"\0" * self.SIZE)
        self._file = open(path, "r+b")  # noqa: SIM115 - lives as long as the map
        self._map = mmap.mmap(self._file.fileno(), self.SIZE)
        self._lock = threading.Lock()  # guards the read-modify-write of increment

    def increment(self) -> None:
        with self._lock:
            (value,) = struct.unpack_from("<q", self._map, 0)
            struct.pack_into("<q", self._map, 0, value + 1)

    def read(self) -> int:
        return int(struct.unpack_from("<q", self._map, 0)[0])

    def close(self) -> None:
        self._map.close()
        self._file.close()


# --- PGQueuer ------------------------------------------------------------------------------------


async def _pgq_noop(job: Any) -> None:
    return None


async def _pgq_sleep_10ms(job: Any) -> None:
    # PGQueuer takes async entrypoints only; its idiomatic wait is asyncio.sleep.
    await asyncio.sleep(SLEEP_SECONDS)


@contextlib.asynccontextmanager
async def pgqueuer_factory() -> AsyncIterator[Any]:
    """Yield a PGQueuer QueueManager on ``BENCH_PGQ_DSN`` (one asyncpg connection).

    The factory of ``python -m pgqueuer run bench.worker_side:pgqueuer_factory``; it registers
    the two entrypoints and prints `READY_LINE` on stderr just before the worker starts
    dequeuing.
    """
    import asyncpg
    from pgqueuer import AsyncpgDriver, QueueManager
    from pgqueuer.queries import Queries

    connection = await asyncpg.connect(os.environ["BENCH_PGQ_DSN"])
    try:
        manager = QueueManager(Queries(AsyncpgDriver(connection)))
        manager.entrypoint("noop")(_pgq_noop)
        manager.entrypoint("sleep_10ms")(_pgq_sleep_10ms)
        print(READY_LINE, file=sys.stderr, flush=True)
        yield manager
    finally:
        await connection.close()


async def pgqueuer_install_and_enqueue(dsn: str, entrypoint: str, count: int) -> None:
    """Install PGQueuer's tables in the (empty, dedicated) database `dsn`; enqueue `count` jobs."""
    import asyncpg
    from pgqueuer import AsyncpgDriver
    from pgqueuer.queries import Queries

    connection = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(connection))
        await queries.install()
        for start in range(0, count, 1000):
            size = min(1000, count - start)
            await queries.enqueue([entrypoint] * size, [None] * size, [0] * size)
    finally:
        await connection.close()


# --- Dramatiq ------------------------------------------------------------------------------------


def dramatiq_setup(
    url: str, queue: str, counter_path: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Return a RabbitmqBroker on `url` and the two actors on `queue`, by name.

    ``confirm_delivery=True``: a send returns once RabbitMQ has taken the message (the producer
    side only). Dramatiq declares its queues durable and publishes persistent messages
    (delivery_mode=2); its worker acks a message after the actor returns.
    """
    import dramatiq
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=url, confirm_delivery=True)
    if counter_path is not None:
        broker.add_middleware(_ack_middleware(counter_path))
    actors = {
        "noop": dramatiq.actor(noop, broker=broker, queue_name=queue, actor_name="noop"),
        "sleep_10ms": dramatiq.actor(
            sleep_10ms, broker=broker, queue_name=queue, actor_name="sleep_10ms"
        ),
    }
    return broker, actors


def _ack_middleware(path: str) -> Any:
    from dramatiq.middleware import Middleware

    class CountAcks(Middleware):  # type: ignore[misc]  # Any: an optional extra
        def __init__(self) -> None:
            self.counter: AckCounter | None = None

        def before_worker_boot(self, broker: Any, worker: Any) -> None:
            # Before the consumers start: an ack sent while the worker boots counts too.
            self.counter = AckCounter(path)

        def after_ack(self, broker: Any, message: Any) -> None:
            if self.counter is not None:
                self.counter.increment()

    return CountAcks()


def __getattr__(name: str) -> Any:
    # ``dramatiq bench.worker_side:dramatiq_broker`` builds the worker's broker from BENCH_*
    # variables only when it asks for it, so the other workers never import Dramatiq.
    if name == "dramatiq_broker":
        broker, _actors = dramatiq_setup(
            os.environ["BENCH_RABBITMQ_URL"],
            os.environ["BENCH_DRAMATIQ_QUEUE"],
            os.environ["BENCH_ACK_FILE"],
        )
        globals()["dramatiq_broker"] = broker
        return broker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pgqueuer_worker(batch_size: int, max_concurrent_tasks: int) -> None:
    """Serve PGQueuer jobs until SIGTERM, as ``pgq run`` does (uvloop where installed).

    ``pgq run`` itself is not used: its ``--log-level`` handling fails in pgqueuer 1.6.0.
    """
    import pgqueuer

    coro = pgqueuer.run(
        pgqueuer_factory, batch_size=batch_size, max_concurrent_tasks=max_concurrent_tasks
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


if __name__ == "__main__":
    # python -m bench.worker_side pgqueuer-worker BATCH_SIZE MAX_CONCURRENT_TASKS
    if len(sys.argv) != 4 or sys.argv[1] != "pgqueuer-worker":
        sys.exit("usage: python -m bench.worker_side pgqueuer-worker BATCH_SIZE "
                 "MAX_CONCURRENT_TASKS")  # fmt: skip
    pgqueuer_worker(int(sys.argv[2]), int(sys.argv[3]))
