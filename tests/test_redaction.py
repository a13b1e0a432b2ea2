"""Credentials in database URLs never reach output, logs, errors or reprs.

The commands run for real against the PostgreSQL test server with a password in the URL, given as
userinfo and as a ``?password=`` query parameter (the server trusts local connections, so the
password is carried everywhere and checked nowhere), at ``--log-level DEBUG``.
"""

from __future__ import annotations

import concurrent.futures
import signal
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

import task_queue_optimized as tq
from tests import store_fixtures
from tests.store_fixtures import Launcher, new_schema_url, pg_rows
from tests.support import one_line_error, wait_until, write_tasks

SECRET = "S3cretPw"
FORMS = ["userinfo", "query"]


def with_password(url: str, form: str, secret: str = SECRET) -> str:
    """Return `url` carrying `secret` as its userinfo password or as a ``password`` parameter."""
    parts = urllib.parse.urlsplit(url)
    if form == "userinfo":
        host = parts.netloc.rpartition("@")[2]
        return parts._replace(netloc=f"{parts.username or 'postgres'}:{secret}@{host}").geturl()
    return parts._replace(query=f"{parts.query}&password={secret}").geturl()


@pytest.fixture
def secret_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """Yield a fresh schema's URL carrying the password in the form the test is parametrized by."""
    store_fixtures.require_postgres()
    url = new_schema_url()
    yield with_password(url, request.param)
    store_fixtures.drop_schema(url)


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text


def tasks(count: int, **payload: object) -> list[dict[str, object]]:
    return [{"id": f"t{i}", "payload": dict(payload)} for i in range(count)]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h/db?schema=s", "postgresql://u:***@h/db?schema=s"),
        ("postgresql://u@h/db?password=pw&schema=s", "postgresql://u@h/db?password=***&schema=s"),
        ("postgresql://u:p%40w@h/db?PassWord=a%26b#x", "postgresql://u:***@h/db?PassWord=***"),
        ("postgresql://u:pa?ss@h:5432/db?schema=s", "postgresql://u:***@h:5432/db?schema=s"),
        ("postgresql://u:pa#ss@h/db?schema=s", "postgresql://u:***@h/db?schema=s"),
        ("postgresql://u:pa@ss@h/db?schema=s", "postgresql://u:***@h/db?schema=s"),
        (
            "postgresql://u:a?b#c/d@e@h/db?password=p#q&schema=s",
            "postgresql://u:***@h/db?password=***&schema=s",
        ),
        ("postgresql://u@corp:pw@h/db", "postgresql://u@corp:***@h/db"),
        ("postgresql://u@h:5432/db?schema=s", "postgresql://u@h:5432/db?schema=s"),
        ("sqlite:////tmp/a:b@c.db", "sqlite:////tmp/a:b@c.db"),
        ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
        ("postgres://:pw@h", "postgres://:***@h"),
        ("postgresql://h/db?sslpassword=pw", "postgresql://h/db?sslpassword=***"),
        ("postgresql://u@h/db?schema=s", "postgresql://u@h/db?schema=s"),
        ("/tmp/tasks.db", "/tmp/tasks.db"),
    ],
)
def test_redact_masks_passwords_in_userinfo_and_query(url: str, shown: str) -> None:
    assert tq._redact(url) == shown


def test_scrub_masks_a_password_echoed_in_any_form() -> None:
    url = "postgresql://u:p%40w@h/db?password=q%26r"
    text = "bad value 'p%40w', or p@w, or q&r, or q%26r"
    assert tq._scrub(text, url) == "bad value '***', or ***, or ***, or ***"


@pytest.mark.parametrize(
    ("url", "text", "shown"),
    [
        (
            "postgresql://u:pa?ss@h:5432/db?schema=s",
            'invalid URI query parameter: "ss@h:5432/db?schema" (pa?ss)',
            'invalid URI query parameter: "***@h:5432/db?schema" (***)',
        ),
        (
            "postgresql://u:S3cret@Pw@h/db",
            "failed to resolve host 'Pw@h': the password S3cret",
            "failed to resolve host '***@h': the password ***",
        ),
        (
            "postgresql://h/db?password=S3cret#Pw&schema=s",
            "password 'S3cret', or 'S3cret#Pw'; a class of its own",
            "password '***', or '***'; a class of its own",
        ),
    ],
)
def test_scrub_masks_every_piece_a_parser_may_cut_a_password_into(
    url: str, text: str, shown: str
) -> None:
    assert tq._scrub(text, url) == shown


@pytest.mark.timeout(60)
@pytest.mark.parametrize("delimiter", ["?", "#", "/", "@"])
def test_a_password_holding_a_url_delimiter_is_never_printed(
    delimiter: str, launcher: Launcher, tmp_path: Path
) -> None:
    """Prove every command masks a password with ?, #, / or @ unescaped, in whole and in part."""
    store_fixtures.require_postgres()
    parts = urllib.parse.urlsplit(new_schema_url())
    url = parts._replace(netloc=f"postgres:S3cret{delimiter}Pw@{parts.hostname}:{parts.port}")
    url_text = url.geturl()
    file = write_tasks(tmp_path / "tasks.json", tasks(1))
    commands = [
        ("status", "--db", url_text),
        ("purge", "--db", url_text),
        ("enqueue", "--db", url_text, "--task-file", str(file)),
        ("worker", "--db", url_text),
        ("--task-file", str(file), "--db", url_text),
    ]
    # Each is refused by the server on its own: they run side by side.
    with concurrent.futures.ThreadPoolExecutor(len(commands)) as executor:
        runs = list(executor.map(lambda args: launcher.run(*args), commands))
    for proc in runs:
        line = one_line_error(proc)
        assert "S3cret" not in line and "Pw" not in line, line
        assert "postgres:***@" in line, line


@pytest.mark.parametrize("secret_url", FORMS, indirect=True)
def test_reprs_and_urls_of_stores_managers_and_pools_hide_the_password(secret_url: str) -> None:
    store = tq.open_store(secret_url)
    manager = tq.IdempotencyManager(store=store)
    try:
        with tq.WorkerPool(lambda task: None, workers=1, idempotency=manager) as pool:
            assert_no_secret(repr(store), store.url, repr(manager), repr(pool))
            assert "***" in store.url
    finally:
        store.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("secret_url", FORMS, indirect=True)
def test_commands_never_print_the_password(
    secret_url: str, launcher: Launcher, tmp_path: Path
) -> None:
    file = write_tasks(tmp_path / "tasks.json", tasks(3, latency_ms=1))
    debug = ("--log-level", "DEBUG")
    outputs = [
        launcher.run("enqueue", "--db", secret_url, "--task-file", str(file), *debug),
        launcher.run("status", "--db", secret_url, *debug),
        launcher.run("status", "--db", secret_url, "--json", *debug),
        launcher.run("purge", "--db", secret_url, *debug),
        launcher.run("--task-file", str(file), "--db", secret_url, "--latency-ms", "1", *debug),
    ]
    for proc in outputs:
        assert proc.returncode == 0, proc.stderr
        assert_no_secret(proc.stdout, proc.stderr)
    assert "***" in outputs[0].stdout
    # A worker: its banner, its debug log and its summary, up to a graceful stop.
    worker = launcher.spawn("worker", "--db", secret_url, "--latency-ms", "1", *debug)
    status = store_fixtures.schema_of(secret_url)
    wait_until(
        lambda: pg_rows(f"SELECT COUNT(*) FROM {status}.workers")[0][0] > 0,
        "the worker's heartbeat",
        procs=[worker],
    )
    assert worker.terminate() == 143
    assert "serving" in worker.stderr()
    assert_no_secret(worker.stdout(), worker.stderr())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("secret_url", FORMS, indirect=True)
def test_the_rerun_advice_after_a_signal_hides_the_password(
    secret_url: str, launcher: Launcher, tmp_path: Path
) -> None:
    # One worker, 0.5 s a task: when the signal comes, one runs and the others wait (cancelled).
    file = write_tasks(tmp_path / "tasks.json", tasks(3, latency_ms=500))
    run = launcher.spawn(
        "--task-file", str(file), "--db", secret_url, "--workers", "1", "--log-level", "DEBUG"
    )
    schema = store_fixtures.schema_of(secret_url)

    def running() -> bool:
        try:
            rows = pg_rows(f"SELECT COUNT(*) FROM {schema}.idempotency WHERE state = 'in_progress'")
        except Exception:  # the run has not created its tables yet
            return False
        return rows[0][0] > 0

    wait_until(running, "a task to start", procs=[run])
    run.signal(signal.SIGINT)
    assert run.wait() == 130
    assert "A rerun with --db" in run.stderr()
    assert_no_secret(run.stdout(), run.stderr())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(
    "change",
    ["port", "unknown-parameter", "bad-schema", "unknown-scheme"],
)
def test_database_errors_never_print_the_password(
    form: str, change: str, launcher: Launcher
) -> None:
    store_fixtures.require_postgres()
    url = with_password(new_schema_url(), form)
    if change == "port":
        url = url.replace("127.0.0.1:5432", "127.0.0.1:1").replace("@127.0.0.1/", "@127.0.0.1:1/")
    elif change == "unknown-parameter":
        url += "&no_such_option=1"
    elif change == "bad-schema":
        url = url.replace("schema=", "schema=1-bad-")
    else:
        url = url.replace("postgresql://", "mysql://", 1)
    for command in ("status", "purge"):
        proc = launcher.run(command, "--db", url, "--log-level", "DEBUG", timeout=30)
        line = one_line_error(proc)
        assert_no_secret(line, proc.stdout)
        assert "***" in line, line


def test_a_password_echoed_by_the_driver_is_masked() -> None:
    """A malformed percent-escape in the password is echoed by libpq; the message masks it."""
    store_fixtures.require_psycopg()
    url = with_password(new_schema_url(), "userinfo", secret=f"{SECRET}%zz")
    with pytest.raises(tq.ConfigError) as info:
        tq.open_store(url)
    assert_no_secret(str(info.value))
