"""Handlers for the consumer fault tests (tests/test_consumer_faults.py), on top of support.handlers'
record keeping. Knobs come from TESTHANDLER_* variables:
  TESTHANDLER_KILLER_SERIAL   the message with this serial ends the process (os._exit) every time
  TESTHANDLER_SLOW_SERIALS    "a-b": messages with serials a..b-1 take TESTHANDLER_SLOW_S each
  TESTHANDLER_BLOCK_SERIAL    the message with this serial waits until the key `release` exists
"""

from __future__ import annotations

import os
import time

from streamgroup import Message
from support.handlers import _called, _client, _succeeded, record

_killer = os.environ.get("TESTHANDLER_KILLER_SERIAL")
_slow_from, _, _slow_to = os.environ.get("TESTHANDLER_SLOW_SERIALS", "0-0").partition("-")
_slow_s = float(os.environ.get("TESTHANDLER_SLOW_S", "0"))
_block = os.environ.get("TESTHANDLER_BLOCK_SERIAL")


def exit_on_killer(message: Message) -> None:
    """As a segfault or an OOM kill would: no exception, no hand-off, the process is just gone."""
    _called(message)
    if message.fields["serial"] == _killer:
        _client.rpush("killed-by", message.id)
        os._exit(137)
    _succeeded(message)


def slow_then_block(message: Message) -> None:
    serial = message.fields["serial"]
    if int(_slow_from) <= int(serial) < int(_slow_to):
        time.sleep(_slow_s)
    if serial == _block:
        _called(message)
        deadline = time.monotonic() + 120
        while not _client.exists("release") and time.monotonic() < deadline:
            time.sleep(0.02)
        _succeeded(message)
        return
    record(message)


def record_pid(message: Message) -> None:
    """Like record, and notes which process handled it (two processes may share a consumer name)."""
    record(message)
    _client.rpush("pids", f"{os.getpid()} {message.id}")
