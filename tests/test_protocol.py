"""The chat wire format and what the server sends, sans-IO: no sockets."""

from __future__ import annotations

import json
import random

import attrs
import pytest

from trio_chat import protocol
from trio_chat.framing import text_frame
from trio_chat.outbound import encode_ack, encode_error, encode_message, message_frame
from trio_chat.protocol import (
    INT64_MAX,
    Draft,
    FrameError,
    Message,
    Typing,
    accept,
    apply_change,
    check_change,
    parse_frame,
    parse_room_id,
    peek_client_msg_id,
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
    draft = parse_frame(SEED_FRAME, 123)
    assert draft == Draft(123, 11, "chat_txt", "hello", "2022-06-05T12:34:56.789Z")


def test_room_id_may_be_omitted_and_is_taken_from_the_url() -> None:
    assert parse_frame(chat_frame(room_id=None), 77).room_id == 77


def test_accepted_message_has_seed_fields_plus_id_and_receive_time() -> None:
    message = accept(parse_frame(SEED_FRAME, 123), 5, "2022-06-05T12:35:00.000Z")
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
    (json.dumps({"message_type": "chat_txt"}), "missing_field", "author_id, content"),
    (json.dumps({"message_type": "chat_edit", "author_id": 1, "content": "x"}),
     "missing_field", "target_id"),
    (json.dumps({"message_type": "chat_delete", "author_id": 1}), "missing_field",
     "target_id"),
    (json.dumps({"message_type": "chat_delete", "author_id": 1, "target_id": "5"}),
     "invalid_field", "target_id must be an integer"),
    (json.dumps({"message_type": "typing"}), "missing_field", "author_id"),
    (chat_frame(client_msg_id=5), "invalid_field", "client_msg_id must be a string"),
    (chat_frame(client_msg_id=""), "invalid_field", "1 to 64 characters"),
    (chat_frame(client_msg_id="x" * 65), "invalid_field", "1 to 64 characters"),
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
        parse_frame(text, 123)
    assert info.value.code == code
    assert detail_part in info.value.detail


@pytest.mark.parametrize("stamp", [
    "2022-06-05T12:00:00Z", "2022-06-05T12:00:00.1Z", "2022-06-05T12:00:00.123456Z",
    "2022-06-05T12:00:00+00:00", "2022-06-05T12:00:00.000-0000"])
def test_utc_timestamps_accepted(stamp: str) -> None:
    assert parse_frame(chat_frame(create_at=stamp), 123).create_at == stamp


@pytest.mark.parametrize(("text", "expected"), [
    ("123", 123), ("0", 0), ("-5", -5), (str(INT64_MAX), INT64_MAX),
    (str(-(2**63)), -(2**63)), (str(INT64_MAX + 1), None), ("abc", None), ("", None),
    ("1.5", None), ("012", None), ("1e3", None), ("+1", None), (" 1", None), ("١٢", None)])
def test_room_id_in_url(text: str, expected: int | None) -> None:
    assert parse_room_id(text) == expected


def test_error_frame_shape() -> None:
    assert json.loads(encode_error("invalid_json", "bad")) == {
        "message_type": "error", "code": "invalid_json", "detail": "bad"}


def test_lone_surrogate_content_is_refused_but_pairs_are_text() -> None:
    with pytest.raises(FrameError) as info:
        parse_frame(chat_frame("\ud800", room_id=1), 1)
    assert info.value.code == "invalid_field" and "surrogate" in info.value.detail
    assert parse_frame(chat_frame("😀", room_id=1), 1).content == "😀"
    assert parse_frame('{"message_type":"chat_txt","author_id":1,"content":'
                            '"\\ud83d\\ude00","create_at":"2022-06-05T12:00:00.000Z"}',
                            1).content == "😀"


def test_author_and_create_at_may_be_left_out_when_the_connection_knows_its_author() -> None:
    draft = parse_frame('{"message_type":"chat_txt","content":"hi"}', 5, author_known=True)
    assert draft == Draft(5, None, "chat_txt", "hi", None)
    message = accept(attrs.evolve(draft, author_id=9), 1, "2022-06-05T12:35:00.000Z")
    assert message.author_id == 9 and message.create_at == message.received_at


def test_new_message_types_parse() -> None:
    assert parse_frame('{"message_type":"typing","author_id":3}', 5) == Typing(5, 3)
    edit = parse_frame('{"message_type":"chat_edit","target_id":4,"content":"fixed",'
                       '"client_msg_id":"e-1"}', 5, author_known=True)
    assert (edit.message_type, edit.target_id, edit.content, edit.client_msg_id) == (
        "chat_edit", 4, "fixed", "e-1")
    delete = parse_frame('{"message_type":"chat_delete","target_id":4}', 5, author_known=True)
    assert (delete.target_id, delete.content) == (4, "")


def test_a_refused_frame_names_its_client_msg_id() -> None:
    with pytest.raises(FrameError) as info:
        parse_frame(chat_frame(content="", client_msg_id="m-7"), 123)
    assert info.value.client_msg_id == "m-7"
    assert json.loads(encode_error("invalid_field", "x", "m-7"))["client_msg_id"] == "m-7"
    assert peek_client_msg_id(chat_frame(client_msg_id="m-8")) == "m-8"
    assert peek_client_msg_id(chat_frame()) is None
    assert peek_client_msg_id('{"client_msg_id": 5}') is None


def test_optional_fields_are_on_the_wire_only_when_set() -> None:
    plain = accept(parse_frame(SEED_FRAME, 123), 5, "2022-06-05T12:35:00.000Z")
    assert set(plain.to_wire()) == {"id", "message_type", "author_id", "room_id", "content",
                                    "create_at", "received_at"}
    tagged = accept(parse_frame(chat_frame(room_id=None, client_msg_id="c"), 1), 2,
                    "2022-06-05T12:35:00.000Z")
    assert tagged.to_wire()["client_msg_id"] == "c"


def test_the_ack_is_the_same_bytes_for_the_same_message() -> None:
    message = accept(parse_frame(chat_frame(client_msg_id="c-1"), 123), 8,
                     "2022-06-05T12:35:00.000Z")
    assert json.loads(encode_ack("c-1", message)) == {
        "message_type": "ack", "client_msg_id": "c-1", "id": 8, "room_id": 123,
        "received_at": "2022-06-05T12:35:00.000Z", "durable": True}
    assert encode_ack("c-1", message) == encode_ack("c-1", attrs.evolve(message))
    assert json.loads(encode_ack("c-1", message, durable=False))["durable"] is False


def _message(message_id: int, author_id: int = 1, message_type: str = "chat_txt",
             **fields: object) -> Message:
    return Message(message_id, 5, author_id, message_type, "text", "2022-06-05T12:00:00.000Z",
                   f"2022-06-05T12:00:0{message_id}.000Z", **fields)  # type: ignore[arg-type]


def test_edits_and_deletes_change_the_target() -> None:
    target = _message(1)
    edited = apply_change(target, _message(2, message_type="chat_edit", target_id=1))
    assert (edited.content, edited.edited_at) == ("text", "2022-06-05T12:00:02.000Z")
    deleted = apply_change(edited, _message(3, message_type="chat_delete", target_id=1))
    assert (deleted.content, deleted.deleted_at) == ("", "2022-06-05T12:00:03.000Z")
    # An edit that lost the race with a delete does not bring the text back.
    assert apply_change(deleted, _message(4, message_type="chat_edit", target_id=1)) == deleted


@pytest.mark.parametrize(("target", "kind", "author", "admin", "code"), [
    (None, "chat_edit", 1, False, "message_not_found"),
    (_message(1, message_type="chat_edit", target_id=0), "chat_edit", 1, False,
     "message_not_found"),
    (_message(1), "chat_edit", 2, False, "forbidden"),
    (_message(1), "chat_delete", 2, False, "forbidden"),
    (_message(1, deleted_at="2022-06-05T12:00:09.000Z"), "chat_delete", 1, False,
     "message_deleted"),
    (_message(1, message_type="chat_img"), "chat_edit", 1, False, "not_editable"),
    (_message(1), "chat_edit", 1, False, None),
    (_message(1), "chat_delete", 2, True, None),
    (_message(1, message_type="chat_img"), "chat_delete", 1, False, None),
])
def test_who_may_change_what(target: Message | None, kind: str, author: int, admin: bool,
                             code: str | None) -> None:
    change = Draft(5, author, kind, "new", None, "c-9", target_id=1)
    if code is None:
        check_change(target, change, author, admin)
        return
    with pytest.raises(FrameError) as info:
        check_change(target, change, author, admin)
    assert (info.value.code, info.value.client_msg_id) == (code, "c-9")


def _json_outcome(text: str) -> object:
    """What the frame gives when decoded by the standard json module alone."""
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return ("invalid_json", f"frame is not valid JSON: {exc}", None)
    try:
        return protocol._validate(frame, text, 123, False)
    except FrameError as exc:
        return (exc.code, exc.detail, exc.client_msg_id)


def _outcome(text: str) -> object:
    try:
        return parse_frame(text, 123)
    except FrameError as exc:
        return (exc.code, exc.detail, exc.client_msg_id)


ODD_JSON = [
    '{"message_type":"chat_txt","author_id":-9223372036854775809,"content":"x"}',
    '{"message_type":"chat_txt","author_id":18446744073709551616,"content":"x"}',
    '{"message_type":"chat_txt","author_id":123456789012345678901234567890,"content":"x"}',
    '{"message_type":"chat_txt","author_id":1,"content":"x","room_id":1e400}',
    '{"message_type":"chat_txt","author_id":NaN,"content":"x"}',
    '{"message_type":"chat_txt","author_id":1,"content":"\\ud800"}',
    '{"message_type":"chat_txt","author_id":1,"content":"\\ud83d\\ude00"}',
    '{"message_type":"chat_txt","author_id":1,"author_id":2,"content":"dup"}',
    '{"message_type":"chat_txt","author_id":1.0,"content":"x"}',
    '{"message_type":"chat_txt","author_id":1,"content":"x","extra":1e400}',
    '{"message_type":"chat_txt","author_id":1,"content":"x","client_msg_id":"\\udfff"}',
    '{"message_type":"chat_txt","author_id":1,"content":"a\\u0000b"}',
    "[" * 5000 + "]" * 5000, '{"a":1} x', "", " ", '"\\x"', "{\"a\":\"\x01\"}",
]


@pytest.mark.parametrize("text", ODD_JSON)
def test_orjson_decoding_gives_exactly_what_json_gives(text: str) -> None:
    assert _outcome(text) == _json_outcome(text)


def test_orjson_decoding_agrees_with_json_on_mutated_frames() -> None:
    rng = random.Random(6)
    seeds = [chat_frame("héllo 😀", room_id=123), chat_frame(create_at="2022-06-05T12:00:00Z"),
             '{"message_type":"chat_edit","author_id":5,"target_id":9,"content":"x",'
             '"client_msg_id":"c1"}', '{"message_type":"typing","author_id":7}']
    alphabet = '{}[]",:0123456789-.eE\\u tnlfrasx\x00é\ud800'
    for _ in range(3000):
        text = list(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(text))
            if rng.random() < 0.5:
                text[i] = rng.choice(alphabet)
            else:
                text.insert(i, rng.choice(alphabet) * rng.randrange(1, 25))
        joined = "".join(text)
        assert _outcome(joined) == _json_outcome(joined), joined


@pytest.mark.parametrize("content", ["a\x00b\x1f\x7f\u2028/\\\"\b\f\n\r\t é😀", "<script>", "",
                                     "x" * 70000])
def test_encoding_is_byte_for_byte_what_json_writes(content: str) -> None:
    message = Message(2**63 - 1, -(2**63), 5, "chat_img", content, "2022-06-05T12:00:00.000Z",
                      "2022-06-05T12:00:00.001Z", "c", None, {"id": "m", "width": 3},
                      moderated=True)
    expected = json.dumps(message.to_wire(), ensure_ascii=False, separators=(",", ":"))
    assert encode_message(message) == expected
    assert message_frame(message) == text_frame(expected)
