"""Handlers for the security tests. They never touch Redis (a least-privilege user may not, and a
TLS-only server would need the certificates): each call appends one line to TESTHANDLER_RECORD_FILE,

    <consumer> <entry id> <serial> <deliveries> <outcome>

outcome being ok, fail or poison. One write per line in append mode, so processes can share the file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from streamgroup import Message, PoisonMessage

_record = Path(os.environ.get("TESTHANDLER_RECORD_FILE", os.devnull))
_consumer = os.environ.get("STREAMGROUP_CONSUMER_NAME", "?")
_sleep = float(os.environ.get("TESTHANDLER_SLEEP_S", "0"))


def _write(message: Message, outcome: str) -> None:
    line = f"{_consumer} {message.id} {message.fields.get('serial', '-')} {message.deliveries} {outcome}\n"
    with open(_record, "a", encoding="utf-8") as out:
        out.write(line)


def ok(message: Message) -> None:
    _write(message, "ok")


def kind_of(serial: int) -> str:
    """What `mixed` does with a serial: every path that needs a permission, in every five messages."""
    return {0: "poison", 1: "fail-first", 2: "always-fail", 3: "slow" if serial == 3 else "ok"}.get(serial % 5, "ok")


def mixed(message: Message) -> None:
    """poison: dead-lettered by whoever reads it first; fail-first: fails once, the reclaimer's retry
    succeeds; always-fail: dead-lettered after MAX_DELIVERIES; slow (serial 3): runs TESTHANDLER_SLEEP_S,
    long enough for lease renewals; everything else succeeds."""
    kind = kind_of(int(message.fields["serial"]))
    if kind == "poison":
        _write(message, "poison")
        raise PoisonMessage("poison on purpose")
    if kind == "always-fail" or (kind == "fail-first" and message.deliveries == 1):
        _write(message, "fail")
        raise RuntimeError("failing on purpose")
    if kind == "slow":
        time.sleep(_sleep)
    _write(message, "ok")


@dataclass(frozen=True)
class Call:
    consumer: str
    entry_id: str
    serial: int
    deliveries: int
    outcome: str


def calls(path: Path) -> list[Call]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        consumer, entry_id, serial, deliveries, outcome = line.split(" ")
        rows.append(Call(consumer, entry_id, int(serial), int(deliveries), outcome))
    return rows
