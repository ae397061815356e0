"""Handlers for services run inside the test process: they record in memory, not in Redis."""

from __future__ import annotations

from streamgroup import Message, PoisonMessage

POISON_EVERY = 7
handled: list[tuple[str, str]] = []  # (stream key, entry id) per success


def poison_every_seventh(message: Message) -> None:
    """Serials that are a multiple of POISON_EVERY are poison; the others are recorded."""
    if int(message.fields["serial"]) % POISON_EVERY == 0:
        raise PoisonMessage("cannot ever handle this")
    handled.append((message.stream, message.id))
