"""What a handler gets: Message, and how a batch as Redis sent it becomes messages and rejects."""

from __future__ import annotations

import pytest

from streamgroup.message import Message, decode_batch

ASCII = [b"producer", b"1", b"serial", b"2"]
UTF8 = ["é".encode(), "中🙂".encode(), b"k", b"v"]


def test_fields_are_decoded_on_first_read_and_kept() -> None:
    message = Message("1-0", None, "s", 1, ASCII)
    assert message.fields == {"producer": "1", "serial": "2"}
    message.fields["extra"] = "x"
    assert message.fields["extra"] == "x", "the same dict on every read, so a handler may change it"
    assert message.raw_fields == {b"producer": b"1", b"serial": b"2"}, "the bytes Redis sent, unchanged"


def test_a_message_built_by_hand_works_as_one_received() -> None:
    by_hand = Message("1-0", {"producer": "1", "serial": "2"}, "s")
    assert by_hand == Message("1-0", None, "s", 1, ASCII)
    assert by_hand.raw_fields == {b"producer": b"1", b"serial": b"2"}
    assert by_hand.timestamp == 0.001
    assert repr(by_hand) == "Message(id='1-0', fields={'producer': '1', 'serial': '2'}, stream='s', deliveries=1)"
    with pytest.raises(TypeError):
        Message("1-0", None, "s")


def test_a_batch_becomes_messages_and_rejects_with_reasons() -> None:
    entries = [
        [b"1-0", ASCII],
        [b"2-0", UTF8],
        [b"3-0", [b"payload", b"\xff\xfe"]],
        [b"4-0", None],
        [b"5-0", ASCII],
    ]
    messages, rejected = decode_batch("s", entries, {"5-0": 4}, max_deliveries=3)
    assert [(m.id, m.deliveries) for m in messages] == [("1-0", 1), ("2-0", 1)]
    assert messages[1].fields == {"é": "中🙂", "k": "v"}
    assert [(entry.id, entry.deliveries, reason.split(":")[0]) for entry, reason in rejected] == [
        ("3-0", 1, "malformed"),
        ("4-0", 1, "malformed"),
        ("5-0", 4, "delivered 4 times; a consumer died handling it each time"),
    ]
    assert rejected[0][0].fields == [b"payload", b"\xff\xfe"], "kept as sent, for the dead-letter copy"


def test_an_all_ascii_batch_takes_the_same_decisions() -> None:
    entries = [[f"{n}-0".encode(), ASCII] for n in range(1, 4)]
    messages, rejected = decode_batch("s", entries, {"2-0": 9}, max_deliveries=5)
    assert [m.id for m in messages] == ["1-0", "3-0"] and [e.id for e, _ in rejected] == ["2-0"]
    assert all(m.fields == {"producer": "1", "serial": "2"} for m in messages)
