"""The message a handler receives, and how stream entries as Redis sent them become messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# An entry as a reply holds it: [id, [field, value, ...]] in bytes; the field list is None for an
# entry deleted while it was pending.
Entry = Sequence[Any]


@dataclass(slots=True)
class Message:
    id: str
    fields: dict[str, str]
    stream: str
    deliveries: int = 1

    @property
    def timestamp(self) -> float:
        """When the entry was added, in Unix seconds, from the ID that Redis gave it."""
        return entry_timestamp(self.id)


@dataclass(slots=True)
class RawEntry:
    """An entry that cannot be handled, kept as Redis returned it for the dead-letter stream."""

    id: str
    fields: list[bytes] | None
    deliveries: int = 1

    def field_dict(self) -> dict[bytes, bytes]:
        flat = self.fields or []
        return dict(zip(flat[::2], flat[1::2], strict=True))


def entry_timestamp(entry_id: str) -> float:
    return int(entry_id.partition("-")[0]) / 1000.0


def entry_ids(entries: Sequence[Entry]) -> list[str]:
    return [entry[0].decode() for entry in entries]


def decode_batch(
    stream: str, entries: Sequence[Entry], deliveries: Mapping[str, int], max_deliveries: int
) -> tuple[list[Message], list[tuple[RawEntry, str]]]:
    """Messages for the handler, and the entries it must not get with the reason why: delivered
    more than max_deliveries times (`deliveries` maps ids to counts; absent means 1), deleted while
    pending, or fields that are not UTF-8.

    This loop runs once per message at full speed, so it is one pass, decoding with map and zip in C.
    """
    messages: list[Message] = []
    rejected: list[tuple[RawEntry, str]] = []
    add = messages.append
    for raw_id, flat in entries:
        entry_id = raw_id.decode()
        count = deliveries.get(entry_id, 1) if deliveries else 1
        if count > max_deliveries:
            reason = f"delivered {count} times; a consumer died handling it each time"
        elif flat is None:
            reason = "malformed: entry deleted while pending"
        else:
            texts = map(bytes.decode, flat)
            try:
                add(Message(entry_id, dict(zip(texts, texts)), stream, count))  # noqa: B905 - Redis sends pairs
                continue
            except UnicodeDecodeError:
                reason = "malformed: fields not UTF-8"
        rejected.append((RawEntry(entry_id, flat, count), reason))
    return messages, rejected
