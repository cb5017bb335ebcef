"""The clients' sans-IO core (trio_chat.client_core) alone: frames in, actions out, no
socket, no clock."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from trio_chat.client_core import (
    ChatError,
    ClientCore,
    Deliver,
    Event,
    Reset,
    RetryLater,
    Settled,
    StateChange,
    backoff_delay,
    describe,
    image_frame,
    resolve_token,
)

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup


def wire(id: int, content: str = "hi", *, author_id: int = 2, **extra: Any) -> str:
    return json.dumps({"id": id, "message_type": "chat_txt", "author_id": author_id,
                       "room_id": 7, "content": content, "create_at": "2024-01-01T00:00:00Z",
                       "received_at": "2024-01-01T00:00:00Z", **extra})


def test_the_url_says_who_and_resumes_after_the_last_delivered_id() -> None:
    core = ClientCore("http://h:1/base/", 7, author_id=3)
    assert core.connect_url() == "ws://h:1/base/ws/7?author_id=3"
    (deliver,) = core.receive(wire(41))
    assert isinstance(deliver, Deliver)
    assert core.connect_url() == "ws://h:1/base/ws/7?author_id=3", "not delivered yet"
    core.delivered(deliver.message)
    assert core.connect_url("t.k") == "ws://h:1/base/ws/7?author_id=3&since=41&token=t.k"
    assert ClientCore("https://h", 7).connect_url() == "wss://h/ws/7"


def test_each_message_is_delivered_once_in_id_order() -> None:
    core = ClientCore("ws://h", 7, last_id=10)
    assert core.receive(wire(9)) == [] and core.receive(wire(10)) == []
    for id in (11, 12):
        (action,) = core.receive(wire(id))
        assert isinstance(action, Deliver) and action.message.id == id
        core.delivered(action.message)
    assert core.receive(wire(12)) == []
    assert core.last_id == 12


def test_the_outbox_is_resent_in_order_until_each_send_is_settled() -> None:
    core = ClientCore("ws://h", 7, author_id=2)
    first, text = core.outgoing({"message_type": "chat_txt", "content": "a"})
    assert json.loads(text) == {"message_type": "chat_txt", "content": "a", "author_id": 2,
                                "client_msg_id": first}
    second, _ = core.outgoing({"message_type": "chat_txt", "content": "b"})
    assert [json.loads(t)["content"] for t in core.pending_frames()] == ["a", "b"]
    # The broadcast of one's own message settles it as well as its ack does.
    actions = core.receive(wire(5, "a", client_msg_id=first))
    assert actions[0] == Settled(first, 5) and isinstance(actions[1], Deliver)
    assert core.receive(json.dumps({"message_type": "ack", "client_msg_id": first,
                                    "id": 5})) == [], "an ack after the broadcast is spare"
    assert core.receive(json.dumps({"message_type": "ack", "client_msg_id": second,
                                    "id": 6})) == [Settled(second, 6)]
    assert core.pending_frames() == []


def test_refusals_settle_or_retry() -> None:
    core = ClientCore("ws://h", 7)
    cmid, _ = core.outgoing({"message_type": "chat_txt", "content": "x"})
    busy = {"message_type": "error", "code": "sync_unavailable", "detail": "later",
            "client_msg_id": cmid}
    assert core.receive(json.dumps(busy)) == [RetryLater(cmid)]
    assert core.pending_frame(cmid) is not None
    (settled,) = core.receive(json.dumps({**busy, "code": "forbidden", "detail": "no"}))
    assert isinstance(settled.result, ChatError) and settled.result.code == "forbidden"
    assert core.pending_frame(cmid) is None
    stray = {"message_type": "error", "code": "invalid_json", "detail": "?"}
    assert core.receive(json.dumps(stray)) == [Event(stray)]


def test_a_cancelled_send_is_not_sent_again() -> None:
    core = ClientCore("ws://h", 7)
    cmid, _ = core.outgoing({"message_type": "typing"})
    core.forget(cmid)
    assert core.pending_frames() == []


def test_history_reset_starts_over() -> None:
    core = ClientCore("ws://h", 7, last_id=5000)
    reset = {"message_type": "history_reset", "room_id": 7, "since": 5000, "latest_id": 3,
             "detail": "ahead of the room"}
    assert core.receive(json.dumps(reset)) == [Reset("ahead of the room")]
    assert core.state == "reset" and core.last_id is None
    assert isinstance(core.receive(wire(2))[0], Deliver)


def test_events_pass_through() -> None:
    core = ClientCore("ws://h", 7, author_id=3)
    typing = {"message_type": "typing", "author_id": 2, "room_id": 7}
    assert core.receive(json.dumps(typing)) == [Event(typing)]
    assert core.receive(json.dumps({**typing, "author_id": 3})) == [], "one's own"


def test_states_and_backoff() -> None:
    core = ClientCore("ws://h", 7, backoff_first=1, backoff_max=4, rng=lambda: 1.0)
    assert core.connected() == StateChange("connected")
    delays = [core.lost("gone").delay for _ in range(5)]
    assert delays == [1, 2, 4, 4, 4]
    core.last_id = 42
    assert core.connected() == StateChange("resumed", since=42)
    assert core.lost("again") == StateChange("reconnecting", "again", delay=1)


@pytest.mark.parametrize("attempt", [0, 3, 10, 5000])
def test_backoff_is_jittered_within_its_upper_half(attempt: int) -> None:
    full = min(10.0, 0.25 * 2 ** min(attempt, 62))
    assert backoff_delay(attempt, 0.25, 10, lambda: 0.0) == full / 2
    assert backoff_delay(attempt, 0.25, 10, lambda: 0.999) <= full


def test_closing_refuses_what_is_left_and_further_sends() -> None:
    core = ClientCore("ws://h", 7)
    cmid, _ = core.outgoing({"message_type": "chat_txt", "content": "x"})
    (settled,) = core.close()
    assert settled.client_msg_id == cmid and isinstance(settled.result, ChatError)
    with pytest.raises(ChatError):
        core.outgoing({"message_type": "chat_txt", "content": "y"})


def test_frames_and_reasons() -> None:
    assert image_frame(b"\x89PNG\r\n\x1a\nrest")["content"].startswith("data:image/png;base64,")
    assert image_frame(b"RIFF\0\0\0\0WEBPVP8 ")["content"].startswith("data:image/webp;")
    assert describe(ExceptionGroup("x", [OSError("refused")])) == "OSError: refused"
    assert json.loads(ClientCore("ws://h", 7, author_id=4).typing_frame()) == {
        "message_type": "typing", "author_id": 4}


async def test_a_token_may_be_a_function_plain_or_async() -> None:
    async def fresh() -> str:
        return "async"

    assert await resolve_token("fixed") == "fixed"
    assert await resolve_token(lambda: "plain") == "plain"
    assert await resolve_token(fresh) == "async"
    assert await resolve_token(None) is None
