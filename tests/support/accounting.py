"""Account for every message: what the stream holds, what the test handlers recorded, what is pending."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import redis

STREAM, GROUP = "messageStream", "messageGroup"


@dataclass
class Ledger:
    produced: dict[str, dict[str, str]]  # id -> fields
    done: Counter  # id -> successful handler runs
    done_by: dict[str, set[str]]  # consumer -> ids

    @property
    def duplicates(self) -> int:
        return sum(count - 1 for count in self.done.values() if count > 1)

    def unprocessed(self) -> set[str]:
        return set(self.produced) - set(self.done)


def ledger(r: redis.Redis, stream: str = STREAM) -> Ledger:
    produced = {entry_id: fields for entry_id, fields in r.xrange(stream)}
    done: Counter = Counter()
    done_by: dict[str, set[str]] = {}
    for row in r.lrange("done-by", 0, -1):
        consumer, entry_id, _ = row.split(" ")
        done[entry_id] += 1
        done_by.setdefault(consumer, set()).add(entry_id)
    return Ledger(produced, done, done_by)


def group_info(r: redis.Redis, stream: str = STREAM, group: str = GROUP) -> dict:
    return next(g for g in r.xinfo_groups(stream) if g["name"] == group)


def all_acked(r: redis.Redis, expected: int, stream: str = STREAM, group: str = GROUP) -> bool:
    """True once `expected` entries were read by the group and none is pending."""
    if not r.exists(stream):
        return False
    groups = [g for g in r.xinfo_groups(stream) if g["name"] == group]
    return bool(groups) and groups[0]["entries-read"] == expected and groups[0]["pending"] == 0
