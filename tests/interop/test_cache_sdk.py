"""The response cache through the official openai SDK: hits it can read, streams replayed from
the cache that it parses, and replayed chunks that match OpenAI's spec."""

from __future__ import annotations

import json
import uuid

import openai
import pytest

from conftest import Gateway, eventually
from test_openapi_shapes import (  # noqa: F401 (spec is the fixture)
    CHAT_CHUNK,
    CHAT_RESPONSE,
    Spec,
    post_json,
    spec,
    sse_events,
)

CHAT_MODEL = "mock/gpt-4o-mini"


def question() -> list[dict]:
    # A fresh question per test: the session's gateway is shared, and its cache with it.
    return [{"role": "user", "content": f"Cache me {uuid.uuid4()}"}]


def until_hit(call, what: str):
    """The entry is stored right after the first answer ends: retry briefly until it is a hit.
    `call` returns something with `headers`; the hit is returned."""
    def hit():
        reply = call()
        return reply if reply.headers.get("x-flowgate-cache") == "hit" else None

    return eventually(hit, f"{what} answered from the cache")


def test_second_deterministic_call_is_a_hit(client: openai.OpenAI):
    messages = question()
    create = client.chat.completions.with_raw_response.create
    first = create(model=CHAT_MODEL, messages=messages, temperature=0)
    assert first.headers["x-flowgate-cache"] == "miss"
    hit = until_hit(lambda: create(model=CHAT_MODEL, messages=messages, temperature=0), "second call")
    assert hit.parse().choices[0].message.content == first.parse().choices[0].message.content
    warm = create(model=CHAT_MODEL, messages=messages, temperature=0.7)
    assert warm.headers["x-flowgate-cache"] == "bypass"


@pytest.mark.parametrize("stored_as_stream", [True, False], ids=["stored-stream", "stored-json"])
@pytest.mark.parametrize("include_usage", [False, True], ids=["plain", "include-usage"])
def test_sdk_reads_a_stream_answered_from_the_cache(client: openai.OpenAI, stored_as_stream, include_usage):
    messages = question()
    create = client.chat.completions.with_raw_response.create
    if stored_as_stream:
        with client.chat.completions.create(model=CHAT_MODEL, messages=messages, temperature=0, stream=True) as s:
            expected = "".join(c.choices[0].delta.content or "" for c in s if c.choices)
    else:
        expected = create(model=CHAT_MODEL, messages=messages, temperature=0).parse().choices[0].message.content
    options = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    raw = until_hit(
        lambda: create(model=CHAT_MODEL, messages=messages, temperature=0, stream=True, stream_options=options),
        "streamed call",
    )
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"], finishes
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and not chunks[-1].choices
        assert chunks[-1].usage.completion_tokens > 0
    else:
        assert usage_chunks == []


def test_replays_match_the_spec(gateway: Gateway, spec: Spec):
    # Stored as JSON, replayed as a stream with usage; stored as a stream, replayed as JSON.
    for first_stream in (False, True):
        payload = {"model": CHAT_MODEL, "temperature": 0, "messages": question()}
        post_json(gateway, "/v1/chat/completions", dict(payload, stream=first_stream))
        again = dict(payload, stream=not first_stream)
        if not first_stream:
            again["stream_options"] = {"include_usage": True}
        reply = until_hit(lambda: post_json(gateway, "/v1/chat/completions", again), "the replay")
        if again["stream"]:
            events = [event.data for event in sse_events(reply.body)]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            spec.assert_all_valid([(CHAT_CHUNK, c, f"replayed chunk {i}") for i, c in enumerate(chunks)])
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]
        else:
            spec.assert_valid(CHAT_RESPONSE, reply.json(), "stream replayed as JSON")
