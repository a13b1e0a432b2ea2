"""The dashboard's JSON API, its history and every security rule, through real HTTP requests.

Servers are real: `serve_dashboard` in a thread over a real store (memory, a SQLite file, a fresh
PostgreSQL schema), or ``task-queue dashboard`` and ``worker --metrics-port`` as processes.
Requests go through `http.client`, which can send any Host, Origin or token header.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.dashboard_support import HOSTILE, Dashboard, drain, make_tasks, serving
from tests.support import WAIT, one_line_error, wait_until, write_tasks

TOKEN = "a-token-of-twenty-four-ch"


def dashboard_of(backend: store_fixtures.Backend, store: Any) -> Any:
    """Serve the backend's database the way a separate process would (its own read-only
    connection); a memory store can only be shared as the object itself."""
    return serving(store if backend.name == "memory" else backend.url)


# --- The JSON API --------------------------------------------------------------------------------


def test_status_reports_counts_queues_history_and_latency(
    backend: store_fixtures.Backend,
) -> None:
    store = backend.open()
    store.enqueue_many(make_tasks(f"ok-{i}" for i in range(6)))
    store.enqueue_many(make_tasks(["bad-1"], fail="no such customer"))
    drain(store, "worker-a")
    store.enqueue_many(make_tasks(["later-1", "later-2"]))
    store.enqueue_many(make_tasks(["tomorrow"]), delay=86400)
    with dashboard_of(backend, store) as dashboard:
        answer = dashboard.get("/api/status")
        assert answer.status == 200, answer.text
        status = answer.json()
    assert status["counts"] == {
        "queued": 2, "delayed": 1, "running": 0, "failed": 1, "done": 6, "stalled": 0,
    }  # fmt: skip
    assert status["queues"]["default"]["queued"] == 2
    assert status["queues"]["default"]["delayed"] == 1
    assert status["oldest_waiting_seconds"] is not None
    assert status["oldest_waiting_seconds"] >= 0
    assert status["last_hour"]["finished"] == 6
    assert status["last_hour"]["failed"] == 1
    assert len(status["history"]["minutes"]) == tq.DASHBOARD_MINUTES
    assert sum(status["history"]["finished"]) == 6
    assert status["latency_ms"]["count"] == 7
    assert 0 < status["latency_ms"]["p50"] <= status["latency_ms"]["p95"]
    assert status["latency_ms"]["p95"] <= status["latency_ms"]["p99"]


def test_history_of_two_workers_adds_up_for_a_dashboard_started_later(
    backend: store_fixtures.Backend,
) -> None:
    """Each worker rewrites its own row per minute many times over (a heartbeat every 0.1 s
    here): the dashboard, started after both finished, shows the sum, counted once. (Two stores
    on one database; for memory://, two pools on one store.)"""
    first, second = backend.stores(2, lease_seconds=0.3)
    first.enqueue_many(make_tasks(f"a-{i}" for i in range(40)))
    drain(first, "worker-a")
    second.enqueue_many(make_tasks(f"b-{i}" for i in range(25)))
    second.enqueue_many(make_tasks(["b-bad"], fail="refused"))
    drain(second, "worker-b")
    workers = {row["worker"] for row in first.history(time.time() - 3600)}
    assert workers == {"worker-a", "worker-b"}
    with dashboard_of(backend, first) as dashboard:
        status = dashboard.get("/api/status").json()
    assert status["last_hour"]["succeeded"] == 65
    assert status["last_hour"]["failed"] == 1
    assert status["latency_ms"]["count"] == 66


def test_an_idle_worker_writes_no_history(tmp_path: Path) -> None:
    heartbeats = threading.Semaphore(0)

    class CountingStore(tq.SqliteStore):
        def renew_tasks(self, *args: Any, **kwargs: Any) -> int:
            heartbeats.release()
            return super().renew_tasks(*args, **kwargs)

    store = CountingStore(str(tmp_path / "q.db"), lease_seconds=0.3)
    try:
        pool = tq.WorkerPool(
            lambda task: None, idempotency=tq.IdempotencyManager(store=store), durable=True
        )
        stop = threading.Event()
        serve = threading.Thread(target=pool.serve, args=(stop,))
        serve.start()
        try:
            for _ in range(4):  # the keeper writes the history after each of its heartbeats
                assert heartbeats.acquire(timeout=WAIT)
        finally:
            stop.set()
            serve.join(WAIT)
            pool.shutdown()
        assert store.history(0) == []
        store.enqueue_many(make_tasks(["one"]))
        drain(store, "busy")
        assert [(row["worker"], row["succeeded"]) for row in store.history(0)] == [("busy", 1)]
    finally:
        store.close()


def test_history_percentiles_stay_within_five_percent_of_the_exact_ones() -> None:
    metrics = tq.MetricsCollector()
    latencies = [0.001 * 1.07**i for i in range(120)]  # 1 ms to about 3 s
    for latency in latencies:
        metrics.record_success(latency, latency)
    row = tq._history_latency(metrics._history_totals(), tq._NO_TOTALS)
    merged = tq._merge_latency([json.loads(json.dumps(row))])
    assert merged["count"] == len(latencies)
    for p in (50, 95, 99):
        exact = sorted(latencies)[max(1, -(-p * len(latencies) // 100)) - 1] * 1000
        assert abs(merged[f"p{p}"] - exact) <= 0.05 * exact, (p, merged, exact)
    assert merged["mean"] == pytest.approx(sum(latencies) / len(latencies) * 1000, rel=1e-3)


def test_history_is_added_to_an_old_sqlite_file_and_read_without_it(tmp_path: Path) -> None:
    """A file from before the history table: the dashboard reads it as it is (empty charts,
    nothing written), and the first worker to open it adds the table."""
    db = tmp_path / "old.db"
    store = tq.open_store(str(db))
    store.enqueue_many(make_tasks(["old-1"]))
    store.close()
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE idempotency_history")
    before = db.read_bytes()
    with serving(str(db)) as dashboard:
        status = dashboard.get("/api/status").json()
    assert status["counts"]["queued"] == 1
    assert status["last_hour"]["finished"] == 0
    assert db.read_bytes() == before  # reading wrote nothing
    store = tq.open_store(str(db), lease_seconds=0.3)
    try:
        drain(store, "upgraded")
        assert [row["succeeded"] for row in store.history(time.time() - 3600)] == [1]
    finally:
        store.close()


def test_history_is_added_to_an_old_postgresql_schema(pg_url: str) -> None:
    store = tq.open_store(pg_url)
    store.enqueue_many(make_tasks(["old-1"]))
    store.close()
    schema = store_fixtures.schema_of(pg_url)
    store_fixtures.pg_execute(f"DROP TABLE {schema}.history")
    with serving(pg_url) as dashboard:
        status = dashboard.get("/api/status").json()
    assert status["counts"]["queued"] == 1
    assert status["last_hour"]["finished"] == 0
    store = tq.open_store(pg_url, lease_seconds=0.3)
    try:
        drain(store, "upgraded")
        assert [row["succeeded"] for row in store.history(time.time() - 3600)] == [1]
    finally:
        store.close()


def test_purge_deletes_old_history(tmp_path: Path) -> None:
    store = tq.open_store(str(tmp_path / "q.db"))
    try:
        minute = int(time.time() // 60)
        counts = dict.fromkeys(("succeeded", "failed", "duplicates", "retries"), 1)
        store.record_history("w", minute - 100, counts, "{}")
        store.record_history("w", minute, counts, "{}")
        store.purge_expired(older_than=3600)
        assert [row["minute"] for row in store.history(0)] == [minute]
    finally:
        store.close()


def test_failed_route_degrades_or_lists(tmp_path: Path) -> None:
    store = tq.open_store(str(tmp_path / "q.db"))
    try:
        store.enqueue_many(make_tasks([HOSTILE], fail="<b>bold</b>"))
        drain(store, "w")
        with serving(store) as dashboard:
            answer = dashboard.get("/api/failed?limit=5")
            assert answer.status == 200, answer.text
            failed = answer.json()
            if not hasattr(store, "failed_tasks"):
                assert failed == {"available": False, "can_retry": False, "tasks": []}
            else:
                assert [task["id"] for task in failed["tasks"]] == [HOSTILE]
                assert failed["tasks"][0]["error"].endswith("<b>bold</b>")
            for query in ("limit=0", "limit=x", "limit=100000", "queue="):
                answer = dashboard.get(f"/api/failed?{query}")
                assert (answer.status == 400) == (query != "queue="), (query, answer.text)
    finally:
        store.close()


def test_retry_and_cancel_change_the_store(backend: store_fixtures.Backend) -> None:
    store = backend.open()
    store.enqueue_many(make_tasks(["bad-1", "bad-2", "bad-3"], fail="refused"))
    drain(store, "w")
    store.enqueue_many(make_tasks(["waiting-1", "waiting-2"]))
    with dashboard_of(backend, store) as dashboard:
        csrf = dashboard.csrf()
        failed = dashboard.get("/api/failed").json()
        assert failed["available"] and failed["can_retry"]
        assert sorted(task["id"] for task in failed["tasks"]) == ["bad-1", "bad-2", "bad-3"]
        answer = dashboard.post("/api/retry", {"ids": ["bad-1", "no-such-task"]}, csrf)
        assert answer.json() == {"retried": 1}
        assert store.task_states(["bad-1", "bad-2"]) == {"bad-1": "queued", "bad-2": "failed"}
        answer = dashboard.post("/api/retry", {"all": True, "queue": "default"}, csrf)
        assert answer.json() == {"retried": 2}
        assert dashboard.get("/api/failed").json()["tasks"] == []
        answer = dashboard.post("/api/cancel", {"ids": ["waiting-1", "bad-3"]}, csrf)
        assert answer.json() == {"cancelled": 2}
        assert store.task_states(["waiting-1", "bad-3", "waiting-2"]) == {"waiting-2": "queued"}
        answer = dashboard.post("/api/retry", {"all": True, "queue": "no such queue!"}, csrf)
        assert answer.status == 400, answer.text


# --- Security ------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Any:
    opened = tq.open_store(str(tmp_path / "queue.db"))
    yield opened
    opened.close()


def test_loopback_server_refuses_a_foreign_host_header(store: Any) -> None:
    """Bound to loopback without a token: a page of another site that rebinds its name to
    127.0.0.1 sends its own name as Host, and gets nothing."""
    with serving(store) as dashboard:
        for host in ("evil.example", "evil.example:8080", "192.168.1.10", ""):
            for path in ("/", "/api/status", "/api/failed"):
                answer = dashboard.get(path, {"Host": host})
                assert answer.status in (400, 403), (host, path, answer.status)
                assert "csrf-token" not in answer.text
        for host in ("localhost", f"localhost:{dashboard.port}", "127.0.0.1", "[::1]:80"):
            assert dashboard.get("/api/status", {"Host": host}).status == 200, host


def test_a_token_is_checked_on_every_request(store: Any) -> None:
    with serving(store, token=TOKEN) as dashboard:
        for path in ("/", "/api/status", "/api/failed", "/metrics", "/nowhere"):
            for headers in ({}, {"X-Dashboard-Token": TOKEN[:-1] + "x"}, {"Authorization": "x"}):
                answer = dashboard.get(path, headers)
                assert answer.status == 401, (path, headers)
                assert answer.json()["error"].startswith("a valid token is needed")
            assert dashboard.get(f"{path}?token=wrong-token-of-enough-length").status == 401
        answer = dashboard.post("/api/retry", {"all": True}, None)
        assert answer.status == 401
        good = [
            ("/api/status", {"X-Dashboard-Token": TOKEN}),
            ("/api/status", {"Authorization": f"Bearer {TOKEN}"}),
            (f"/api/status?token={TOKEN}", {}),
            (f"/?token={TOKEN}", {"Host": "dashboard.example.org"}),  # any name, with the token
        ]
        for path, headers in good:
            assert dashboard.get(path, headers).status == 200, (path, headers)


def test_an_address_other_than_loopback_needs_a_token(store: Any) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.1", "example.org"):
        with pytest.raises(tq.ConfigError, match="token"):
            tq.serve_dashboard(store, host=host, port=0)
    for token in ("short", "has a space in it ok", "ünïcödé-token-long-enough"):
        with pytest.raises(tq.ConfigError, match="token"):
            tq.serve_dashboard(store, port=0, token=token)
    with serving(store, host="0.0.0.0", token=TOKEN) as dashboard:
        dashboard.host = "127.0.0.1"
        assert dashboard.get("/api/status").status == 401
        assert dashboard.get(f"/api/status?token={TOKEN}").status == 200


def test_a_change_needs_a_post_with_the_page_csrf_token(store: Any) -> None:
    with serving(store) as dashboard:
        csrf = dashboard.csrf()
        assert len(csrf) >= 32
        assert dashboard.csrf() == csrf  # one per server start
        body = {"ids": ["t-1"]}
        for path in ("/api/retry", "/api/cancel"):
            assert dashboard.get(path).status == 405
            assert dashboard.post(path, body, None).status == 403
            wrong = csrf[:-1] + ("B" if csrf.endswith("A") else "A")  # never the token itself
            assert dashboard.post(path, body, wrong).status == 403
            form = dashboard.request(
                "POST", path, b"ids=t-1",
                {"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": csrf},
            )  # fmt: skip
            assert form.status == 415
            foreign = dashboard.post(path, body, csrf, {"Origin": "http://evil.example"})
            assert foreign.status == 403
            # With the token: accepted, or refused because this store cannot do it yet.
            answer = dashboard.post(path, body, csrf, {"Origin": dashboard.base})
            assert answer.status in (200, 501), answer.text
    with serving(store) as other:
        assert other.csrf() != csrf  # random per server start


def test_post_bodies_are_checked(store: Any) -> None:
    with serving(store) as dashboard:
        csrf = dashboard.csrf()
        bad = [
            ({"ids": []}, 400),
            ({"ids": "t-1"}, 400),
            ({"ids": [1]}, 400),
            ({"ids": [""]}, 400),
            ({"ids": ["t"] * (tq.MAX_DASHBOARD_IDS + 1)}, 400),
            ({"ids": ["t"], "queue": 5}, 400),
            ([1, 2], 400),
        ]
        for document, status in bad:
            answer = dashboard.post("/api/retry", document, csrf)
            assert answer.status in (status, 501), (document, answer.text)
        headers = {"Content-Type": "application/json", "X-CSRF-Token": csrf}
        assert dashboard.request("POST", "/api/retry", b"{not json", headers).status == 400
        assert dashboard.request("POST", "/api/retry", b"\xff\xfe", headers).status == 400
        huge = b'{"ids": ["' + b"x" * tq.MAX_DASHBOARD_BODY_BYTES + b'"]}'
        assert dashboard.request("POST", "/api/retry", huge, headers).status == 413


def test_every_answer_carries_the_security_headers(store: Any) -> None:
    with serving(store) as dashboard:
        page = dashboard.get("/")
        again = dashboard.get("/")
        answers = [page, dashboard.get("/api/status"), dashboard.get("/nope"), dashboard.get("/x?")]
    for answer in answers:
        headers = answer.headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "unsafe-inline" not in headers["content-security-policy"]
        assert "unsafe-eval" not in headers["content-security-policy"]
    csp = page.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp).group(1)
    assert f"style-src 'nonce-{nonce}'" in csp
    assert "default-src 'none'" in csp
    # Every script and style of the page carries the nonce; nothing is loaded from elsewhere.
    assert page.text.count("<script") == page.text.count(f'<script nonce="{nonce}">') == 1
    assert page.text.count("<style") == page.text.count(f'<style nonce="{nonce}">') == 1
    assert not re.search(r"\b(src|href)=", page.text)
    assert "http://" not in page.text.replace('"http://www.w3.org/2000/svg"', "")
    assert "https://" not in page.text
    # A fresh nonce for every page.
    assert again.headers["content-security-policy"] != csp


def test_bad_requests_get_a_short_4xx_and_no_route_reads_a_file(store: Any) -> None:
    with serving(store) as dashboard:
        for path in ("/nope", "/../../etc/passwd", "/task_queue_optimized.py", "/.env",
                     "/api/status/", "/%2e%2e/%2e%2e/etc/passwd", "/api/statusx"):  # fmt: skip
            answer = dashboard.get(path)
            assert answer.status == 404, (path, answer.status)
            assert answer.json() == {"error": "no such page"}
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"):
            assert dashboard.request(method, "/api/status").status == 405, method
        too_many = "&".join(f"f{i}=1" for i in range(tq.MAX_DASHBOARD_QUERY_FIELDS + 1))
        assert dashboard.get(f"/api/failed?{too_many}").status == 400
        # A request the HTTP layer itself refuses answers JSON as well, never a traceback.
        too_long = b"GET / HTTP/1.1\r\nX-Filler: " + b"a" * 70000 + b"\r\n\r\n"
        head, body = raw_exchange(dashboard, too_long)
        assert head.startswith(b"HTTP/1.0 431"), head
        assert b"nosniff" in head
        assert json.loads(body)["error"]
        head, body = raw_exchange(dashboard, b"GET / HTTP/x.y\r\n\r\n")
        assert json.loads(head + body)["error"].startswith("Bad request version")


def raw_exchange(dashboard: Dashboard, request: bytes) -> tuple[bytes, bytes]:
    """Send raw bytes; return the head and body of the answer (the head is empty when the
    server answers an unreadable request line as HTTP/0.9 would: a body only)."""
    with socket.create_connection((dashboard.host, dashboard.port), timeout=10) as sock:
        sock.sendall(request)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    assert b"Traceback" not in raw
    head, _, body = raw.partition(b"\r\n\r\n")
    return (head, body) if body or raw.startswith(b"HTTP/") else (b"", head)


def test_a_database_that_fails_answers_503_without_details(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    tq.open_store(str(db)).close()
    with serving(str(db)) as dashboard:
        assert dashboard.get("/api/status").status == 200
        with sqlite3.connect(db) as conn:
            conn.execute("DROP TABLE idempotency_tasks")
        answer = dashboard.get("/api/status")
    assert answer.status == 503
    assert answer.json() == {"error": "the database is unavailable; try again"}


def test_credentials_in_the_database_url_are_never_shown(
    pg_url: str, launcher: store_fixtures.Launcher
) -> None:
    secret = "s3cret-Pa55word"
    url = pg_url.replace("postgres@", f"postgres:{secret}@", 1)
    assert secret in url
    tq.open_store(url).close()
    with serving(url) as dashboard:
        answers = [dashboard.get(path) for path in ("/", "/api/status", "/api/failed")]
    for answer in answers:
        assert answer.status == 200
        assert secret not in answer.text
    assert json.loads(answers[1].body)["database"] == tq._redact(url)
    proc = launcher.spawn("dashboard", "--db", url, "--port", "0")
    line = wait_until(lambda: "http://" in proc.stderr() and proc.stderr(), "the URL line")
    assert secret not in line
    assert proc.terminate() == 143
    assert secret not in proc.stderr() + proc.stdout()


# --- Command line --------------------------------------------------------------------------------


def dashboard_url(proc: store_fixtures.CliProcess) -> str:
    """Wait for the line `task-queue dashboard` prints and return the URL in it."""
    found = wait_until(
        lambda: re.search(r"at (http://\S+/)", proc.stderr()), "the dashboard's URL", procs=[proc]
    )
    return found.group(1)


def client_for(url: str) -> Dashboard:
    host, port = re.match(r"http://\[?([^\]/]+?)\]?:(\d+)/", url).groups()
    client = Dashboard.__new__(Dashboard)
    client.host, client.port, client.base = host, int(port), url.rstrip("/")
    return client


def test_dashboard_command_serves_the_page_and_stops_on_a_signal(
    launcher: store_fixtures.Launcher, tmp_path: Path
) -> None:
    db = tmp_path / "queue.db"
    file = write_tasks(tmp_path / "tasks.json", [{"id": "t-1"}, {"id": "t-2"}])
    assert launcher.run("enqueue", "--task-file", str(file), "--db", str(db)).returncode == 0
    proc = launcher.spawn("dashboard", "--db", str(db), "--port", "0")
    client = client_for(dashboard_url(proc))
    page = client.get("/")
    assert page.status == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert client.get("/api/status").json()["counts"]["queued"] == 2
    assert proc.terminate() == 143
    assert "Traceback" not in proc.stderr()


def test_dashboard_command_needs_a_token_off_loopback(
    launcher: store_fixtures.Launcher, tmp_path: Path
) -> None:
    db = tmp_path / "queue.db"
    tq.open_store(str(db)).close()
    line = one_line_error(launcher.run("dashboard", "--db", str(db), "--host", "0.0.0.0"))
    assert "--host '0.0.0.0' is not a loopback address" in line
    args = ["dashboard", "--db", str(db), "--host", "0.0.0.0", "--port", "0"]
    proc = launcher.spawn(*args, env={"TQ_DASHBOARD_TOKEN": TOKEN})
    url = dashboard_url(proc)
    assert url.startswith("http://0.0.0.0:")
    client = client_for(url.replace("0.0.0.0", "127.0.0.1"))
    assert client.get("/api/status").status == 401
    assert client.get("/api/status", {"X-Dashboard-Token": TOKEN}).status == 200
    assert client.get(f"/?token={TOKEN}", {"Host": "queue.example.org"}).status == 200
    assert TOKEN not in proc.stderr()
    assert proc.terminate() == 143


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "70000"], {}, "--port"),
        (["--port", "x"], {}, "--port"),
        (["--host", ""], {}, "--host"),
        (["--host", "10.1.2.3"], {}, "--host"),
        (["--token", "short"], {}, "--token"),
        (["--token", "with spaces but long enough"], {}, "--token"),
        ([], {"TQ_DASHBOARD_TOKEN": "short"}, "TQ_DASHBOARD_TOKEN"),
        (["--db", "missing.db"], {}, "missing.db"),
        (["--db", "memory://"], {}, "memory://"),
        (["--host", "not a host name", "--token", TOKEN], {}, "--host"),
        (["--bogus"], {}, "--bogus"),
    ],
)
def test_dashboard_command_refuses_bad_input_in_one_line(
    launcher: store_fixtures.Launcher,
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    named: str,
) -> None:
    db = tmp_path / "queue.db"
    tq.open_store(str(db)).close()
    before = db.read_bytes()
    full = ["dashboard", "--db", str(db), "--port", "0", *args]
    line = one_line_error(launcher.run(*full, **env))
    assert named in line
    assert db.read_bytes() == before
    assert not (launcher.root / "missing.db").exists()


def test_dashboard_command_refuses_a_port_in_use_before_opening_the_database(
    launcher: store_fixtures.Launcher, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = one_line_error(launcher.run("dashboard", "--db", "new.db", "--port", str(port)))
    assert "--host/--port" in line
    assert str(port) in line
    assert not (launcher.root / "new.db").exists()


def test_worker_metrics_port_serves_the_dashboard_beside_metrics(
    launcher: store_fixtures.Launcher, tmp_path: Path
) -> None:
    db = tmp_path / "queue.db"
    file = write_tasks(tmp_path / "tasks.json", [{"id": f"t-{i}"} for i in range(5)])
    assert launcher.run("enqueue", "--task-file", str(file), "--db", str(db)).returncode == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = launcher.worker(str(db), "--metrics-port", str(port), "--lease-seconds", "0.6")
    client = client_for(f"http://127.0.0.1:{port}/")

    def status() -> dict[str, Any] | None:
        try:
            answer = client.get("/api/status")
        except OSError:
            return None  # not listening yet
        if answer.status != 200:
            return None
        found = answer.json()
        return found if found["last_hour"]["finished"] == 5 and found["workers"] else None

    found = wait_until(status, "the worker's page to count 5 tasks", procs=[worker])
    assert found["this_worker"]["succeeded"] == 5
    assert [w["pid"] for w in found["workers"]] == [worker.pid]
    assert client.get("/").status == 200
    assert "task_queue_succeeded_total 5" in client.get("/metrics").text
    assert client.get("/api/status", {"Host": "evil.example"}).status == 403
    assert worker.terminate() == 143
