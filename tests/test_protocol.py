"""The wire format, sans-IO: no sockets."""

from __future__ import annotations

import json

import pytest
from wsproto.connection import Connection, ConnectionType

from trio_chat.protocol import (
    INT64_MAX,
    Draft,
    FrameError,
    accept,
    encode_error,
    encode_message,
    parse_chat_frame,
    parse_room_id,
    text_frame,
)

from .conftest import chat_frame

SEED_FRAME = json.dumps({
    "message_type": "chat_txt",
    "author_id": 11,
    "room_id": 123,
    "content": "hello",
    "create_at": "2022-06-05T12:34:56.789Z",
})


def test_seed_javascript_frame_parses() -> None:
    draft = parse_chat_frame(SEED_FRAME, 123)
    assert draft == Draft(123, 11, "chat_txt", "hello", "2022-06-05T12:34:56.789Z")


def test_room_id_may_be_omitted_and_is_taken_from_the_url() -> None:
    assert parse_chat_frame(chat_frame(room_id=None), 77).room_id == 77


def test_accepted_message_has_seed_fields_plus_id_and_receive_time() -> None:
    message = accept(parse_chat_frame(SEED_FRAME, 123), 5, "2022-06-05T12:35:00.000Z")
    wire = json.loads(encode_message(message))
    assert wire == {"id": 5, "message_type": "chat_txt", "author_id": 11, "room_id": 123,
                    "content": "hello", "create_at": "2022-06-05T12:34:56.789Z",
                    "received_at": "2022-06-05T12:35:00.000Z"}


@pytest.mark.parametrize(("text", "code", "detail_part"), [
    ("{not json", "invalid_json", "not valid JSON"),
    ("[1, 2]", "not_an_object", "an array"),
    ('"hi"', "not_an_object", "a string"),
    (json.dumps({"author_id": 1, "content": "x", "create_at": "2022-06-05T12:00:00Z"}),
     "missing_field", "message_type"),
    (json.dumps({"message_type": "chat_txt"}), "missing_field",
     "author_id, content, create_at"),
    (chat_frame(message_type="chat_video"), "unknown_message_type", "chat_video"),
    (chat_frame(message_type=5), "invalid_field", "message_type must be a string"),
    (chat_frame(author_id="11"), "invalid_field", "author_id must be an integer, got a string"),
    (chat_frame(author_id=True), "invalid_field", "got a boolean"),
    (chat_frame(author_id=1.5), "invalid_field", "got a number"),
    (chat_frame(author_id=INT64_MAX + 1), "invalid_field", "64-bit"),
    (chat_frame(room_id=124), "room_mismatch", "124"),
    (chat_frame(room_id="123"), "invalid_field", "room_id must be an integer"),
    (chat_frame(content=None), "invalid_field", "content must be a string, got null"),
    (chat_frame(content=""), "invalid_field", "must not be empty"),
    (chat_frame(create_at="yesterday"), "invalid_field", "ISO-8601"),
    (chat_frame(create_at="2022-06-05T12:00:00+09:00"), "invalid_field", "UTC"),
    (chat_frame(create_at="2022-02-30T12:00:00Z"), "invalid_field", "real date"),
])
def test_bad_frames_are_named(text: str, code: str, detail_part: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_chat_frame(text, 123)
    assert info.value.code == code
    assert detail_part in info.value.detail


@pytest.mark.parametrize("stamp", [
    "2022-06-05T12:00:00Z", "2022-06-05T12:00:00.1Z", "2022-06-05T12:00:00.123456Z",
    "2022-06-05T12:00:00+00:00", "2022-06-05T12:00:00.000-0000"])
def test_utc_timestamps_accepted(stamp: str) -> None:
    assert parse_chat_frame(chat_frame(create_at=stamp), 123).create_at == stamp


@pytest.mark.parametrize(("text", "expected"), [
    ("123", 123), ("0", 0), ("-5", -5), (str(INT64_MAX), INT64_MAX),
    (str(-(2**63)), -(2**63)), (str(INT64_MAX + 1), None), ("abc", None), ("", None),
    ("1.5", None), ("012", None), ("1e3", None), ("+1", None), (" 1", None), ("١٢", None)])
def test_room_id_in_url(text: str, expected: int | None) -> None:
    assert parse_room_id(text) == expected


def test_error_frame_shape() -> None:
    assert json.loads(encode_error("invalid_json", "bad")) == {
        "message_type": "error", "code": "invalid_json", "detail": "bad"}


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_frame_decodes_with_a_real_websocket_parser(size: int) -> None:
    text = "가" * (size // 3) + "x" * (size % 3)
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(text_frame(text) + text_frame("next"))
    received = [event.data for event in client.events()]
    assert "".join(received[:-1]) == text
    assert received[-1] == "next"


def test_lone_surrogate_content_is_refused_but_pairs_are_text() -> None:
    with pytest.raises(FrameError) as info:
        parse_chat_frame(chat_frame("\ud800", room_id=1), 1)
    assert info.value.code == "invalid_field" and "surrogate" in info.value.detail
    assert parse_chat_frame(chat_frame("😀", room_id=1), 1).content == "😀"
    assert parse_chat_frame('{"message_type":"chat_txt","author_id":1,"content":'
                            '"\\ud83d\\ude00","create_at":"2022-06-05T12:00:00.000Z"}',
                            1).content == "😀"
