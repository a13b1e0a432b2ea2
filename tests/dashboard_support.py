"""What the dashboard tests share: a real dashboard server in a thread, an HTTP client that can
send any header, and a durable queue filled by real worker pools."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import task_queue_optimized as tq
from tests.support import WAIT, wait_until

HOSTILE = "<img src=x onerror=alert(1)>"


class Answer:
    """One HTTP answer: status, headers (names lower-cased) and body."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Dashboard:
    """A dashboard server bound by `serve_dashboard` and served by a thread of its own."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.host, self.port = server.server_address[:2]
        self.base = f"http://{self.host}:{self.port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=WAIT)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            response = conn.getresponse()
            data = response.read()
            found = {name.lower(): value for name, value in response.getheaders()}
            return Answer(response.status, found, data)
        finally:
            conn.close()

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> Answer:
        return self.request("GET", path, headers=headers)

    def csrf(self, headers: Mapping[str, str] | None = None) -> str:
        """Return the CSRF token the served page carries."""
        page = self.get("/", headers)
        assert page.status == 200, page.text
        match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
        assert match is not None, page.text[:500]
        return match.group(1)

    def post(
        self,
        path: str,
        document: Any,
        csrf: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> Answer:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if csrf is not None:
            sent["X-CSRF-Token"] = csrf
        return self.request("POST", path, json.dumps(document).encode(), sent)


@contextlib.contextmanager
def serving(db: Any, **kwargs: Any) -> Iterator[Dashboard]:
    """Serve a dashboard of `db` (a URL or an open store) on a free port until the block ends."""
    server = tq.serve_dashboard(db, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, name="test-dashboard")
    thread.start()
    try:
        yield Dashboard(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


def handler(task: tq.Task) -> dict[str, Any]:
    """Sleep ``payload["sleep_ms"]``, then fail the tasks whose payload says so (permanently,
    with that error) and succeed the rest."""
    time.sleep(task.payload.get("sleep_ms", 0) / 1000)
    if "fail" in task.payload:
        raise tq.PermanentError(task.payload["fail"])
    return {"id": task.id}


def drain(store: Any, worker: str, lease_seconds: float | None = None) -> tq.MetricsCollector:
    """Run a durable pool named `worker` on `store` until no task is queued or running.

    Returns:
        the pool's metrics.
    """
    manager = tq.IdempotencyManager(store=store)
    pool = tq.WorkerPool(handler, workers=4, idempotency=manager, durable=True, worker_name=worker)
    stop = threading.Event()
    thread = threading.Thread(target=pool.serve, args=(stop,), name=f"serve-{worker}")
    thread.start()
    try:

        def drained() -> bool:
            tasks = store.queue_status()["tasks"]
            return tasks["queued"] == 0 and tasks["running"] == 0

        wait_until(drained, f"{worker} to drain the queue")
    finally:
        stop.set()
        thread.join(WAIT)
        pool.shutdown(wait=True)
    return pool.metrics


def make_tasks(ids: Iterable[str], **payload: Any) -> list[tq.Task]:
    return [tq.Task(task_id, dict(payload)) for task_id in ids]
