"""The message a handler receives, and how stream entries as Redis sent them become messages."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

# An entry as a reply holds it: [id, [field, value, ...]] in bytes; the field list is None for an
# entry deleted while it was pending.
Entry = Sequence[Any]
_first, _second = itemgetter(0), itemgetter(1)


class Message:
    """One stream entry, as the handler gets it.

    `fields` is decoded to text on first access: a handler that never reads them (or reads them
    as they come, in bytes, from `raw_fields`) costs nothing for it. Whether they are valid UTF-8
    is checked before the handler is called, so reading them never fails.

    A stream entry may repeat a field name (`item 1 item 2`). `fields` and `raw_fields` are dicts
    and keep the last value only; `flat_fields` is the list exactly as Redis sent it. The
    dead-letter copy always holds that exact list.
    """

    __slots__ = ("id", "stream", "deliveries", "_fields", "_raw")

    def __init__(
        self,
        id: str,  # noqa: A002 - the stream entry's id, named as Redis names it
        fields: dict[str, str] | None,
        stream: str,
        deliveries: int = 1,
        flat_fields: list[bytes] | None = None,  # [field, value, ...] as Redis sent them
    ) -> None:
        if fields is None and flat_fields is None:
            raise TypeError("a Message needs fields or flat_fields")
        self.id, self.stream, self.deliveries = id, stream, deliveries
        self._fields, self._raw = fields, flat_fields

    @property
    def fields(self) -> dict[str, str]:
        if self._fields is None:
            texts = map(bytes.decode, self._raw)
            self._fields = dict(zip(texts, texts))  # noqa: B905 - Redis sends field, value pairs
        return self._fields

    @property
    def flat_fields(self) -> list[bytes]:
        """[field, value, field, value, ...] as Redis sent them: bytes, repeated names kept."""
        if self._raw is None:
            return [part.encode() for pair in self._fields.items() for part in pair]
        return list(self._raw)

    @property
    def raw_fields(self) -> dict[bytes, bytes]:
        """The fields as Redis sent them (bytes), for binary-safe handlers; a repeated field name
        keeps its last value (see flat_fields)."""
        if self._raw is None:
            return {key.encode(): value.encode() for key, value in self._fields.items()}
        flat = self._raw
        return dict(zip(flat[::2], flat[1::2], strict=True))

    @property
    def timestamp(self) -> float:
        """When the entry was added, in Unix seconds, from the ID that Redis gave it."""
        return entry_timestamp(self.id)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.id, self.fields, self.stream, self.deliveries) == (
            other.id, other.fields, other.stream, other.deliveries,
        )  # fmt: skip

    __hash__ = None  # type: ignore[assignment] - mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, fields={self.fields!r}, stream={self.stream!r}, deliveries={self.deliveries})"


@dataclass(slots=True)
class RawEntry:
    """An entry that cannot be handled, kept as Redis returned it for the dead-letter stream."""

    id: str
    fields: list[bytes] | None  # flat [field, value, ...]; None for an entry deleted while pending
    deliveries: int = 1


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

    This loop runs once per message at full speed: one pass, and text is decoded only when a
    handler asks for it. ASCII, by far the common case, is valid UTF-8: one C-level check over the
    whole batch usually settles it.
    """
    messages: list[Message] = []
    rejected: list[tuple[RawEntry, str]] = []
    add = messages.append
    try:  # one check in C for the whole batch; an entry deleted while pending (None) fails it
        all_ascii = b"".join(chain.from_iterable(map(_second, entries))).isascii()
    except TypeError:
        all_ascii = False
    for entry_id, flat in zip(map(bytes.decode, map(_first, entries)), map(_second, entries)):  # noqa: B905
        count = deliveries.get(entry_id, 1) if deliveries else 1
        if count > max_deliveries:
            reason = f"delivered {count} times; a consumer died handling it each time"
        elif all_ascii or (flat is not None and all(map(bytes.isascii, flat))):  # so valid UTF-8
            add(Message(entry_id, None, stream, count, flat))
            continue
        elif flat is None:
            reason = "malformed: entry deleted while pending"
        else:
            texts = map(bytes.decode, flat)
            try:
                add(Message(entry_id, dict(zip(texts, texts)), stream, count, flat))  # noqa: B905 - Redis sends pairs
                continue
            except UnicodeDecodeError:
                reason = "malformed: fields not UTF-8"
        rejected.append((RawEntry(entry_id, flat, count), reason))
    return messages, rejected
