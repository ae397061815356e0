"""`streamgroup status` shows what the server reports, as a table and as JSON."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from support.accounting import GROUP, STREAM, group_info
from support.processes import service_env


def _status(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamgroup", "status", *args],
        env=service_env(redis_url), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_status_json_matches_the_server(redis_url, r) -> None:
    ids = [r.xadd(STREAM, {"n": str(n)}) for n in range(12)]
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "alpha", {STREAM: ">"}, count=5)
    r.xreadgroup(GROUP, "beta", {STREAM: ">"}, count=3)
    r.xack(STREAM, GROUP, ids[0])
    result = _status(redis_url, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    info = group_info(r)
    assert status["stream_length"] == 12
    assert status["lag"] == info["lag"] == 4
    assert status["pending"] == info["pending"] == 7
    assert status["oldest_pending_id"] == ids[1]
    assert {c["name"]: c["pending"] for c in status["consumers"]} == {"alpha": 4, "beta": 3}


def test_status_table_for_people(redis_url, r) -> None:
    r.xadd(STREAM, {"n": "1"})
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "alpha", {STREAM: ">"}, count=1)
    result = _status(redis_url)
    assert result.returncode == 0, result.stderr
    assert "pending           1" in result.stdout
    assert "lag               0" in result.stdout
    assert any(line.startswith("alpha") and " 1 " in line for line in result.stdout.splitlines())


def test_status_of_a_missing_group_fails_and_says_so(redis_url, r) -> None:
    r.xadd(STREAM, {"n": "1"})
    r.xgroup_create(STREAM, GROUP, id="0")
    result = _status(redis_url, "--group", "nobody")
    assert result.returncode == 5, "helm test must catch a misnamed group"
    assert "nobody (does not exist)" in result.stdout
    assert "group 'nobody' does not exist on stream 'messageStream'" in result.stderr


def test_status_of_a_missing_stream_fails_and_says_so(redis_url) -> None:
    result = _status(redis_url, "--stream", "typo", "--json")
    assert result.returncode == 5
    assert json.loads(result.stdout)["group_exists"] is False
    assert "stream 'typo' does not exist" in result.stderr


def test_status_shows_the_reclaimer_apart_and_no_age_when_nothing_is_pending(redis_url, r) -> None:
    r.xadd(STREAM, {"n": "1"})
    r.xgroup_create(STREAM, GROUP, id="0")
    r.xreadgroup(GROUP, "consumer-7d9f-abcde", {STREAM: ">"}, count=1)
    r.xack(STREAM, GROUP, r.xrange(STREAM)[0][0])
    # The chart's reclaimer pod name (the reclaimer joins the group when it claims).
    r.xgroup_createconsumer(STREAM, GROUP, "sg-streamgroup-reclaimer-5c8d7-x2x9q")
    table = _status(redis_url)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert "oldest pending    –" in lines, "no pending entry has no age, not 0.0s"
    consumers, reclaimers = (
        lines.index(next(line for line in lines if line.startswith("CONSUMER"))),
        lines.index(next(line for line in lines if line.startswith("RECLAIMER"))),
    )
    assert lines[consumers + 1].startswith("consumer-7d9f-abcde")
    assert lines[reclaimers + 1].startswith("sg-streamgroup-reclaimer-5c8d7-x2x9q")
    assert not any(line.startswith("sg-streamgroup-reclaimer") for line in lines[consumers:reclaimers])

    status = json.loads(_status(redis_url, "--json").stdout)
    assert [c["name"] for c in status["consumers"]] == ["consumer-7d9f-abcde"]
    assert [c["name"] for c in status["reclaimers"]] == ["sg-streamgroup-reclaimer-5c8d7-x2x9q"]
    assert status["oldest_pending_age_seconds"] is None

    named = json.loads(_status(redis_url, "--json", "--reclaimer", "consumer-*").stdout)
    assert [c["name"] for c in named["reclaimers"]] == ["consumer-7d9f-abcde"]


def test_status_watch_refreshes_until_ctrl_c(redis_url, r) -> None:
    r.xadd(STREAM, {"n": "1"})
    r.xgroup_create(STREAM, GROUP, id="0")
    watch = subprocess.Popen(
        [sys.executable, "-m", "streamgroup", "status", "--watch", "0.2"],
        env=service_env(redis_url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = []
    try:
        for line in watch.stdout:
            if line.startswith("stream length"):
                seen.append(line.split()[-1])
                if len(seen) == 1:
                    r.xadd(STREAM, {"n": "2"})  # the next refresh shows it
                if "2" in seen:
                    break
    finally:
        watch.send_signal(signal.SIGINT)
        code = watch.wait(30)
    assert seen[0] == "1" and "2" in seen, seen
    assert code == 0, watch.stderr.read()


def test_status_reports_unreachable_redis_in_one_line() -> None:
    result = _status("redis://127.0.0.1:1/0")
    assert result.returncode == 4
    assert result.stderr.startswith("streamgroup: cannot reach redis")
    assert "Traceback" not in result.stderr


def test_status_of_another_stream_counts_its_own_dead_letters(redis_url, r) -> None:
    r.xadd("orders", {"n": "1"})
    r.xgroup_create("orders", GROUP, id="0")
    r.xadd("orders:dead", {"n": "0"})
    r.xadd(f"{STREAM}:dead", {"n": "0"})
    r.xadd(f"{STREAM}:dead", {"n": "0"})
    result = _status(redis_url, "--stream", "orders", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert (status["stream"], status["stream_length"], status["dead_letter_length"]) == ("orders", 1, 1)
