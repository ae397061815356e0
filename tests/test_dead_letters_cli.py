"""`streamgroup dead-letters`: list, show, replay and purge against real servers, including a
replay killed halfway and run again, and the refusal to change data without confirmation."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time

import redis

from support.accounting import GROUP, STREAM, group_info
from support.processes import service_env, wait_for

DEAD = f"{STREAM}:dead"


def _cli(redis_url: str, *args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)  # no terminal: what CI and scripts have
    return subprocess.run(
        [sys.executable, "-m", "streamgroup", "dead-letters", *args],
        env=service_env(redis_url), capture_output=True, text=True, timeout=120, **kw,
    )  # fmt: skip


def _dead_letter(r: redis.Redis, flat: list, original_id: str, error: str, deliveries: int = 5, stream=STREAM) -> str:
    """A dead-letter entry as the consumer writes it: the original fields, then the bookkeeping."""
    bookkeeping = {
        "x-streamgroup-original-id": original_id,
        "x-streamgroup-stream": stream,
        "x-streamgroup-group": GROUP,
        "x-streamgroup-consumer": "consumer-1",
        "x-streamgroup-deliveries": str(deliveries),
        "x-streamgroup-error": error,
    }
    flat = [*flat, *(part for pair in bookkeeping.items() for part in pair)]
    key = DEAD if stream == STREAM else f"{stream}:dead"
    return r.execute_command("XADD", key, "*", *flat)


def _flat(raw: redis.Redis, key: str) -> list[list[bytes]]:
    """Each entry's fields as Redis sends them (redis-py's xrange would fold repeated names)."""
    raw.set_response_callback("XRANGE", lambda response, **options: response)
    return [list(fields) for _, fields in raw.execute_command("XRANGE", key, "-", "+")]


def test_list_shows_id_original_id_error_deliveries_and_age(redis_url, r) -> None:
    first = _dead_letter(r, ["order", "1"], "1700000000000-0", "ValueError: bad amount", deliveries=5)
    second = _dead_letter(r, ["order", "2"], "1700000000001-0", "PoisonMessage: unknown customer", deliveries=1)
    result = _cli(redis_url, "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [e["id"] for e in listed] == [first, second]
    assert listed[0]["original_id"] == "1700000000000-0"
    assert listed[0]["error"] == "ValueError: bad amount"
    assert (listed[0]["deliveries"], listed[1]["deliveries"]) == (5, 1)
    assert listed[0]["age_seconds"] >= 0
    assert listed[1]["fields"] == [["order", "2"]]

    table = _cli(redis_url, "list")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if line.startswith(second))
    assert "1700000000001-0" in row and "PoisonMessage: unknown customer" in row
    assert "(2 in messageStream:dead)" in table.stdout


def test_show_prints_every_field_and_a_missing_id_is_an_error(redis_url, r) -> None:
    entry = _dead_letter(r, ["order", "7", "blob", b"\xff\x00"], "1700000000000-0", "KeyError: 'sku'")
    result = _cli(redis_url, "show", entry)
    assert result.returncode == 0, result.stderr
    assert "order             7" in result.stdout
    assert "blob              b'\\xff\\x00'" in result.stdout  # not text: shown, not hidden
    assert "x-streamgroup-error KeyError: 'sku'" in result.stdout

    missing = _cli(redis_url, "show", "1-1")
    assert missing.returncode == 5
    assert "1-1 is not in messageStream:dead" in missing.stderr


def test_replay_restores_the_original_fields_and_removes_the_dead_letter(redis_url, r) -> None:
    raw = redis.Redis.from_url(redis_url)
    # Repeated field names, binary values and field order must all survive the round trip.
    original = [b"tag", b"a", b"tag", b"b", b"bin", b"\xff\xfe", b"n", b"1"]
    entry = _dead_letter(r, original, "1700000000000-0", "ValueError: boom")
    other = _dead_letter(r, ["n", "2"], "1700000000001-0", "ValueError: boom")
    result = _cli(redis_url, "replay", entry, "--yes")
    assert result.returncode == 0, result.stderr
    assert "replayed 1" in result.stdout
    assert _flat(raw, STREAM) == [original]
    assert [e[0].decode() for e in raw.xrange(DEAD)] == [other], "only the named entry left :dead"


def test_replay_goes_to_the_stream_the_entry_came_from(redis_url, r) -> None:
    _dead_letter(r, ["n", "1"], "1700000000000-0", "boom", stream="orders")
    result = _cli(redis_url, "--stream", "orders", "replay", "--all", "--yes")
    assert result.returncode == 0, result.stderr
    assert r.xlen("orders") == 1 and r.xlen("orders:dead") == 0
    assert r.xlen(STREAM) == 0


def test_replay_match_and_dry_run(redis_url, r) -> None:
    timeout = [_dead_letter(r, ["n", str(n)], f"17000000000{n:02d}-0", "TimeoutError: upstream") for n in range(3)]
    poison = _dead_letter(r, ["n", "99"], "1700000000099-0", "PoisonMessage: unknown customer")

    dry = _cli(redis_url, "replay", "--match", "TimeoutError", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "3 entries would be replayed" in dry.stdout
    assert r.xlen(DEAD) == 4 and r.xlen(STREAM) == 0, "a dry run changes nothing"

    result = _cli(redis_url, "replay", "--match", "TimeoutError", "--yes")
    assert result.returncode == 0, result.stderr
    assert r.xlen(STREAM) == 3
    assert [e[0] for e in r.xrange(DEAD)] == [poison]
    assert not set(timeout) & {e[0] for e in r.xrange(DEAD)}


def test_changes_without_yes_are_refused_when_there_is_no_terminal(redis_url, r) -> None:
    entry = _dead_letter(r, ["n", "1"], "1700000000000-0", "boom")
    for args in (["replay", "--all"], ["purge", entry], ["purge", "--all"]):
        result = _cli(redis_url, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "no terminal to confirm on; pass --yes" in result.stderr
    assert r.xlen(DEAD) == 1 and r.xlen(STREAM) == 0

    unnamed = _cli(redis_url, "replay")
    assert unnamed.returncode == 2
    assert "IDs, --all, or --match" in unnamed.stderr


def _on_a_terminal(redis_url: str, answer: bytes, *args: str) -> tuple[int, str]:
    """Run the command with a pseudo-terminal as stdin, and type `answer` when it asks."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamgroup", "dead-letters", *args],
        env=service_env(redis_url), stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(terminal)
    os.write(controller, answer)
    out, err = proc.communicate(timeout=60)
    os.close(controller)
    return proc.returncode, (out + err).decode()


def test_a_terminal_is_asked_and_only_yes_changes_data(redis_url, r) -> None:
    _dead_letter(r, ["n", "1"], "1700000000000-0", "boom")
    code, output = _on_a_terminal(redis_url, b"n\n", "replay", "--all")
    assert code == 1, output
    assert "Replay 1 entries from messageStream:dead into messageStream? [y/N]" in output
    assert r.xlen(DEAD) == 1 and r.xlen(STREAM) == 0

    code, output = _on_a_terminal(redis_url, b"y\n", "replay", "--all")
    assert code == 0, output
    assert r.xlen(DEAD) == 0 and r.xlen(STREAM) == 1


def test_purge_named_entries_and_all(redis_url, r) -> None:
    ids = [_dead_letter(r, ["n", str(n)], f"17000000000{n:02d}-0", "boom") for n in range(5)]
    result = _cli(redis_url, "purge", ids[0], ids[3], "--yes")
    assert result.returncode == 0, result.stderr
    assert "purged 2" in result.stdout
    assert [e[0] for e in r.xrange(DEAD)] == [ids[1], ids[2], ids[4]]

    missing = _cli(redis_url, "purge", ids[0], "--yes")
    assert missing.returncode == 5, "an id that is not there is named, and nothing is purged"

    result = _cli(redis_url, "purge", "--all", "--yes")
    assert result.returncode == 0, result.stderr
    assert r.xlen(DEAD) == 0
    assert r.xlen(STREAM) == 0, "purging never touches the source stream"


def test_an_interrupted_replay_run_again_replays_every_entry_exactly_once(redis_url, r) -> None:
    total = 20_000
    with r.pipeline(transaction=False) as pipe:
        for n in range(total):
            flat = ["n", str(n), "x-streamgroup-original-id", f"1700000000000-{n}", "x-streamgroup-error", "boom"]
            pipe.execute_command("XADD", DEAD, "*", *flat)
        pipe.execute()

    replay = subprocess.Popen(
        [sys.executable, "-m", "streamgroup", "dead-letters", "replay", "--all", "--yes"],
        env=service_env(redis_url), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while r.xlen(STREAM) == 0 and replay.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    replay.send_signal(signal.SIGKILL)
    replay.wait(30)
    done_before = r.xlen(STREAM)
    assert 0 < done_before < total, f"the kill should land mid-replay ({done_before} of {total} replayed)"
    assert r.xlen(DEAD) == total - done_before, "each entry is either replayed or still dead-lettered"

    again = _cli(redis_url, "replay", "--all", "--yes")
    assert again.returncode == 0, again.stderr
    numbers = [int(fields["n"]) for _, fields in r.xrange(STREAM)]
    assert sorted(numbers) == list(range(total)), "every entry exactly once in the source stream"
    assert r.xlen(DEAD) == 0
    assert all(set(fields) == {"n"} for _, fields in r.xrange(STREAM, count=100)), "bookkeeping stripped"


def test_dead_lettered_by_a_consumer_then_replayed_and_handled(redis_url, r, services) -> None:
    """The on-call path: a handler bug dead-letters messages; after the fix, replay brings them back."""
    for serial in range(1, 11):
        r.xadd(STREAM, {"producer": "1", "serial": str(serial)})
    buggy = services.start("consumer", name="buggy", HANDLER="support.handlers:poison_some", TESTHANDLER_FAIL_MOD=2)
    wait_for(lambda: r.xlen(DEAD) == 5 and group_info(r)["pending"] == 0, timeout=60, what="5 dead letters")
    buggy.signal(signal.SIGTERM)
    buggy.process.wait(30)

    listed = json.loads(_cli(redis_url, "list", "--json").stdout)
    assert sorted(int(dict(e["fields"])["serial"]) for e in listed) == [2, 4, 6, 8, 10]
    assert all("cannot ever handle this" in e["error"] for e in listed)

    result = _cli(redis_url, "replay", "--match", "cannot ever handle", "--yes")
    assert result.returncode == 0, result.stderr
    assert "replayed 5" in result.stdout
    services.start("consumer", name="fixed", HANDLER="support.handlers:record_fields")
    wait_for(lambda: group_info(r)["entries-read"] == 15 and group_info(r)["pending"] == 0, timeout=60, what="replayed")
    replayed = [entry_id for entry_id, _ in r.xrange(STREAM)][10:]
    handled = [json.loads(r.get(f"fields:{entry_id}")) for entry_id in replayed]
    assert sorted(int(fields["serial"]) for fields in handled) == [2, 4, 6, 8, 10]
    assert all(set(fields) == {"producer", "serial"} for fields in handled), handled
    assert r.xlen(DEAD) == 0


def test_an_entry_too_wide_for_the_script_is_replayed_whole(redis_url, r) -> None:
    raw = redis.Redis.from_url(redis_url)
    original = [part for n in range(4_000) for part in (f"f{n}".encode(), str(n).encode())]  # 8,000 items
    entry = _dead_letter(r, original, "1700000000000-0", "boom")
    result = _cli(redis_url, "replay", entry, "--yes")
    assert result.returncode == 0, result.stderr
    assert _flat(raw, STREAM) == [original]
    assert r.xlen(DEAD) == 0
