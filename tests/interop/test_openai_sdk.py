"""The official openai SDK against a real flowgate process with the built-in mock provider.

Run with `.venv/bin/pytest -q tests/interop` after `cargo build` (scripts/test.sh does both).
"""

from __future__ import annotations

import openai
import pytest

from conftest import eventually

EXPERIMENT = "interop"
PROMPT_VERSION = "v1"
CHAT_MODEL = "mock/gpt-4o-mini"  # priced like gpt-4o-mini, so cost must be > 0
EMBEDDING_MODEL = "mock/text-embedding-3-small"
TAGS = {"x-flowgate-experiment": EXPERIMENT, "x-flowgate-prompt-version": PROMPT_VERSION}
MESSAGES = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Say hello to the interop test."},
]



def stream_text(chunks) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


@pytest.fixture(scope="module")
def tagged_chats(client: openai.OpenAI):
    """Two identical tagged chat completions: one run, two traces, for the admin API checks."""
    return [
        client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES, extra_headers=TAGS)
        for _ in range(2)
    ]


def test_chat_completion(tagged_chats):
    raw = tagged_chats[0]
    completion = raw.parse()
    assert completion.choices, completion
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens > 0
    assert raw.headers.get("x-flowgate-trace-id")
    assert raw.headers.get("x-flowgate-run-id")


def test_same_configuration_same_run_new_trace(tagged_chats):
    first, second = (raw.headers for raw in tagged_chats)
    assert first["x-flowgate-run-id"] == second["x-flowgate-run-id"]
    assert first["x-flowgate-trace-id"] != second["x-flowgate-trace-id"]


def test_streaming_without_stream_options_has_no_usage_chunk(client: openai.OpenAI):
    with client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True, extra_headers=TAGS
    ) as stream:
        chunks = list(stream)
    assert stream_text(chunks).strip()
    # The gateway asks upstream for usage on its own behalf; the client did not, so the extra
    # usage chunk (usage set, no choices) must not reach it.
    assert [c for c in chunks if c.usage is not None] == []
    assert all(chunk.choices for chunk in chunks)


def test_streaming_with_include_usage_ends_with_usage(client: openai.OpenAI):
    with client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=TAGS,
    ) as stream:
        chunks = list(stream)
    assert stream_text(chunks).strip()
    usage = chunks[-1].usage
    assert usage is not None, chunks[-1]
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens > 0
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_embeddings(client: openai.OpenAI):
    result = client.embeddings.create(model=EMBEDDING_MODEL, input=["hello", "world"])
    assert len(result.data) == 2
    assert all(len(item.embedding) > 0 for item in result.data)


def test_unknown_model_is_not_found(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no-such-model-interop", messages=MESSAGES)
    assert raised.value.status_code == 404
    assert raised.value.message


def test_run_aggregates_the_tagged_calls(gateway, tagged_chats):
    run_id = tagged_chats[0].headers["x-flowgate-run-id"]

    def recorded_run():
        status, body = gateway.get_json(f"/api/v1/runs?experiment={EXPERIMENT}")
        assert status == 200, body
        for run in body.get("runs", []):
            if run.get("id") == run_id and (run.get("metrics") or {}).get("requests", 0) >= 2:
                return run
        return None

    run = eventually(recorded_run, f"run {run_id} with >= 2 requests in /api/v1/runs")
    metrics = run["metrics"]
    assert run["experiment"] == EXPERIMENT
    assert run["prompt_version"] == PROMPT_VERSION
    assert metrics["input_tokens"] > 0
    assert metrics["output_tokens"] > 0
    assert metrics["cost_usd"] is not None and metrics["cost_usd"] > 0


def test_trace_is_served_by_id(gateway, tagged_chats):
    headers = tagged_chats[0].headers
    trace_id = headers["x-flowgate-trace-id"]

    def recorded_trace():
        status, body = gateway.get_json(f"/api/v1/traces/{trace_id}")
        return body if status == 200 else None

    trace = eventually(recorded_trace, f"GET /api/v1/traces/{trace_id} to answer 200")
    assert trace["id"] == trace_id
    assert trace["experiment"] == EXPERIMENT
    assert trace["run_id"] == headers["x-flowgate-run-id"]
    assert trace["prompt_version"] == PROMPT_VERSION


def test_experiments_lists_interop(gateway, tagged_chats):
    def listed():
        status, body = gateway.get_json("/api/v1/experiments")
        assert status == 200, body
        names = [experiment.get("name") for experiment in body.get("experiments", [])]
        return names if EXPERIMENT in names else None

    eventually(listed, f"experiment {EXPERIMENT!r} in /api/v1/experiments")
