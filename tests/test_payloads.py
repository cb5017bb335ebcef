"""What nodes pass each other through the broker, sans-IO: no sockets, no broker."""

from __future__ import annotations

import json

import pytest

from trio_chat.outbound import encode_message, presence_event, typing_event
from trio_chat.payloads import PayloadError, RelayedCommand, RelayedEvent, read_payload
from trio_chat.protocol import Message


def test_payloads_this_node_writes_read_back() -> None:
    message = Message(7, 9, 4, "chat_edit", "fixed", "2022-06-05T12:00:00.000Z",
                      "2022-06-05T12:00:01.000Z", "c-1", 3, None, moderated=True)
    assert read_payload(encode_message(message), 9) == message
    for event in (presence_event("chat_enter", 9, 4, 2, "2022-06-05T12:00:00.000Z"),
                  typing_event(9, 4, "2022-06-05T12:00:00.000Z")):
        assert read_payload(event, 9) == RelayedEvent(event)
    close = {"control": "close", "author_id": None, "code": 4003, "reason": "room deleted"}
    assert read_payload(json.dumps(close), 9) == RelayedCommand(close)


def test_payload_fields_from_a_newer_version_are_accepted() -> None:
    wire = {**encode_message_dict(), "reactions": {"+1": 2}}
    assert read_payload(json.dumps(wire), 9) == read_payload(json.dumps(encode_message_dict()), 9)
    event = json.dumps({"message_type": "typing", "author_id": 4, "room_id": 9,
                        "create_at": "2022-06-05T12:00:00.000Z", "device": "phone"})
    assert read_payload(event, 9) == RelayedEvent(event)


def encode_message_dict(**fields: object) -> dict[str, object]:
    return {"id": 1, "message_type": "chat_txt", "author_id": 4, "room_id": 9, "content": "hi",
            "create_at": "2022-06-05T12:00:00.000Z",
            "received_at": "2022-06-05T12:00:00.000Z", **fields}


@pytest.mark.parametrize(("data", "kind"), [
    ("not json", "not_json"),
    ("", "not_json"),
    ("[1, 2]", "not_json"),
    ("[" * 100_000, "not_json"),
    ("{}", "unknown_kind"),
    ('{"message_type": "bogus"}', "unknown_kind"),
    ('{"control": "nope"}', "unknown_kind"),
    ('{"control": "close", "code": 4003}', "malformed"),
    ('{"control": "close", "code": 99, "reason": ""}', "malformed"),
    ('{"control": "close", "code": 4003, "reason": "", "author_id": "7"}', "malformed"),
    ('{"id": 5}', "malformed"),
    (json.dumps(encode_message_dict(id=2**63)), "malformed"),
    (json.dumps(encode_message_dict(id=-1)), "malformed"),
    (json.dumps(encode_message_dict(id=True)), "malformed"),
    (json.dumps(encode_message_dict(id=1.0)), "malformed"),
    (json.dumps(encode_message_dict(content=5)), "malformed"),
    (json.dumps(encode_message_dict(image="x")), "malformed"),
    (json.dumps(encode_message_dict(message_type="chat_delete")), "malformed"),
    (json.dumps(encode_message_dict(message_type="chat_poll")), "unknown_kind"),
    (json.dumps(encode_message_dict(room_id=10)), "wrong_room"),
    (json.dumps(encode_message_dict(content="\ud800")), "malformed"),
    # Bytes that are not UTF-8, as the broker's surrogateescape decoding hands them on.
    (b'{"id": 1, "content": "\xff"}'.decode("utf-8", "surrogateescape"), "not_json"),
    ('{"message_type": "chat_exit", "author_id": 4, "room_id": 9}', "malformed"),
    ('{"message_type": "typing", "author_id": 4, "room_id": 10, "create_at": ""}',
     "wrong_room"),
])
def test_payloads_this_node_cannot_use_are_refused_by_kind(data: str, kind: str) -> None:
    with pytest.raises(PayloadError) as info:
        read_payload(data, 9)
    assert info.value.kind == kind
