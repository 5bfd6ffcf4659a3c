"""Claude through flowgate with the official SDKs, against a mock Anthropic upstream.

- The `openai` SDK calls a Claude model (an `anthropic` provider): plain, streamed, tools, and
  errors raised as the right exception classes.
- The `anthropic` SDK calls `/v1/messages` through flowgate: plain and streamed.
- Tokens, cached tokens and cost come out right in the trace and the run (admin API).

Run with `.venv/bin/pytest -q tests/interop` after `cargo build`.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import openai
import pytest

from conftest import eventually, toml_string

MODEL = "claude-sonnet-4-6"
TAGS = {"x-flowgate-experiment": "claude-interop", "x-flowgate-prompt-version": "v1"}
# The mock's usage: 20 plain input tokens, 1000 read from the prompt cache, 100 written, 12 out.
USAGE = {"input_tokens": 20, "cache_read_input_tokens": 1000, "cache_creation_input_tokens": 100, "output_tokens": 12}
PROMPT_TOKENS = 1120
# claude-sonnet-4-6 per 1M tokens: $3 input, $0.30 cache read, $3.75 cache write, $15 output.
COST = (20 * 3.0 + 1000 * 0.30 + 100 * 3.75 + 12 * 15.0) / 1e6
ANSWER = "Paris is the capital of France."


# ---------------------------------------------------------------------------------------------
# A mock of Anthropic's Messages API: text answers, a tool call when tools are offered and no
# tool result came back yet, streams in Anthropic's events, and errors on request.


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def message_events(text: str) -> list[bytes]:
    words = [w + " " for w in text.split(" ")]
    words[-1] = words[-1].rstrip()
    start = {"input_tokens": USAGE["input_tokens"], "cache_read_input_tokens": USAGE["cache_read_input_tokens"],
             "cache_creation_input_tokens": USAGE["cache_creation_input_tokens"], "output_tokens": 1}
    events = [
        sse("message_start", {"type": "message_start", "message": {
            "id": "msg_stream", "type": "message", "role": "assistant", "content": [], "model": MODEL,
            "stop_reason": None, "stop_sequence": None, "usage": start}}),
        sse("content_block_start", {"type": "content_block_start", "index": 0,
                                    "content_block": {"type": "text", "text": ""}}),
        sse("ping", {"type": "ping"}),
    ]
    events += [sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": w}}) for w in words]
    events += [
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                              "usage": {"output_tokens": USAGE["output_tokens"]}}),
        sse("message_stop", {"type": "message_stop"}),
    ]
    return events


def message(content: list[dict[str, Any]], stop_reason: str) -> dict[str, Any]:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": MODEL, "content": content,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": USAGE}


class AnthropicUpstream:
    """Serves POST /v1/messages like Anthropic. A model named `error-<status>-<type>` answers
    that error. Every request is kept in `requests` as (path, headers, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet test output
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(length) or b"null")
                upstream.requests.append((self.path, dict(self.headers), body))
                upstream.answer(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="anthropic-upstream")
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        model = body.get("model", "")
        if model.startswith("error-"):
            _, status, kind = model.split("-", 2)
            error = {"type": "error", "error": {"type": kind, "message": f"mock {kind}"}}
            return self.send(handler, int(status), "application/json", [json.dumps(error).encode()])
        last = body["messages"][-1]
        answered_tool = isinstance(last["content"], list) and any(
            block.get("type") == "tool_result" for block in last["content"]
        )
        if body.get("tools") and not answered_tool:
            tool = body["tools"][0]["name"]
            reply = message([{"type": "tool_use", "id": "toolu_01", "name": tool, "input": {"city": "Paris"}}],
                            "tool_use")
            return self.send(handler, 200, "application/json", [json.dumps(reply).encode()])
        if body.get("stream"):
            return self.send(handler, 200, "text/event-stream", message_events(ANSWER))
        reply = message([{"type": "text", "text": ANSWER}], "end_turn")
        self.send(handler, 200, "application/json", [json.dumps(reply).encode()])

    @staticmethod
    def send(handler: BaseHTTPRequestHandler, status: int, content_type: str, pieces: list[bytes]) -> None:
        handler.send_response(status)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(sum(len(p) for p in pieces)))
        handler.end_headers()
        for piece in pieces:
            handler.wfile.write(piece)
            handler.wfile.flush()


@pytest.fixture(scope="module")
def upstream():
    server = AnthropicUpstream()
    yield server
    server.close()


@pytest.fixture
def gateway(start_gateway, upstream: AnthropicUpstream):
    """A gateway whose only provider is the mock Anthropic upstream, without a key of its own."""
    return start_gateway(
        providers=f"""\
[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = {toml_string(upstream.base_url)}
models = ["claude-*", "error-*"]
"""
    )


@pytest.fixture
def oai(gateway) -> openai.OpenAI:
    # The client's key goes to Anthropic as x-api-key (the provider has none of its own).
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="sk-ant-interop", max_retries=0, timeout=30)


@pytest.fixture
def claude(gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.base_url, api_key="sk-ant-interop", max_retries=0, timeout=30)


def trace_of(gateway, trace_id: str) -> dict[str, Any]:
    def recorded() -> Any:
        status, trace = gateway.get_json(f"/api/v1/traces/{trace_id}")
        return trace if status == 200 else None

    return eventually(recorded, f"trace {trace_id}")


def assert_metered(gateway, trace_id: str, endpoint: str) -> dict[str, Any]:
    trace = trace_of(gateway, trace_id)
    assert trace["provider"] == "anthropic"
    assert trace["endpoint"] == endpoint
    assert trace["experiment"] == "claude-interop"
    assert trace["usage"] == {"input_tokens": PROMPT_TOKENS, "output_tokens": USAGE["output_tokens"],
                              "cached_input_tokens": USAGE["cache_read_input_tokens"],
                              "cache_write_input_tokens": USAGE["cache_creation_input_tokens"], "source": "provider"}
    assert trace["cost_usd"] == pytest.approx(COST, rel=1e-9)
    return trace


# ---------------------------------------------------------------------------------------------
# The openai SDK calling Claude


def test_openai_sdk_chat_with_claude(oai: openai.OpenAI, gateway, upstream: AnthropicUpstream):
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}],
        max_tokens=100,
        extra_headers=TAGS,
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == ANSWER
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert completion.usage.prompt_tokens_details.cached_tokens == USAGE["cache_read_input_tokens"]
    path, headers, body = upstream.requests[-1]
    assert path == "/v1/messages"
    assert headers["x-api-key"] == "sk-ant-interop"
    assert body["system"] == "Answer briefly." and body["max_tokens"] == 100
    trace = assert_metered(gateway, raw.headers["x-flowgate-trace-id"], "chat.completions")

    def run() -> Any:
        status, run = gateway.get_json(f"/api/v1/runs/{trace['run_id']}")
        return run if status == 200 and run["metrics"]["requests"] >= 1 else None

    metrics = eventually(run, "the run")["metrics"]
    assert metrics["cached_input_tokens"] % USAGE["cache_read_input_tokens"] == 0
    assert metrics["cost_usd"] == pytest.approx(COST * metrics["requests"], rel=1e-9)


@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_sdk_streams_from_claude(oai: openai.OpenAI, gateway, include_usage: bool):
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    with oai.chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}], stream=True,
        extra_headers=TAGS, **options,
    ) as response:
        trace_id = response.headers["x-flowgate-trace-id"]
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and usage_chunks[0].usage.prompt_tokens == PROMPT_TOKENS
    else:
        assert usage_chunks == []
    trace = assert_metered(gateway, trace_id, "chat.completions")
    assert trace["latency"]["ttft_ms"] is not None


def test_openai_sdk_tools_with_claude(oai: openai.OpenAI, upstream: AnthropicUpstream):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = oai.chat.completions.create(model=MODEL, messages=messages, tools=tools)
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert upstream.requests[-1][2]["tools"][0]["input_schema"]["required"] == ["city"]

    messages += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "18 °C"}]
    second = oai.chat.completions.create(model=MODEL, messages=messages, tools=tools)
    assert second.choices[0].message.content == ANSWER
    sent = upstream.requests[-1][2]["messages"]
    assert sent[1]["content"][0] == {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                     "input": {"city": "Paris"}}
    assert sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18 °C"}


@pytest.mark.parametrize(
    ("model", "exception"),
    [
        ("error-400-invalid_request_error", openai.BadRequestError),
        ("error-401-authentication_error", openai.AuthenticationError),
        ("error-403-permission_error", openai.PermissionDeniedError),
        ("error-404-not_found_error", openai.NotFoundError),
        ("error-429-rate_limit_error", openai.RateLimitError),
        ("error-529-overloaded_error", openai.InternalServerError),
    ],
)
def test_openai_sdk_raises_the_matching_exception(oai: openai.OpenAI, model: str, exception: type):
    kind = model.split("-", 2)[2]
    with pytest.raises(exception) as raised:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["code"] == kind
    assert raised.value.body["message"] == f"mock {kind}"


def test_openai_sdk_gets_a_400_for_what_claude_cannot_do(oai: openai.OpenAI, upstream: AnthropicUpstream):
    before = len(upstream.requests)
    with pytest.raises(openai.BadRequestError) as raised:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert raised.value.body["param"] == "n"
    assert "anthropic" in raised.value.body["message"]
    assert len(upstream.requests) == before


# ---------------------------------------------------------------------------------------------
# The anthropic SDK calling /v1/messages


def test_anthropic_sdk_messages(claude: anthropic.Anthropic, gateway, upstream: AnthropicUpstream):
    raw = claude.messages.with_raw_response.create(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "Capital of France?"}],
        extra_headers=TAGS,
    )
    reply = raw.parse()
    assert reply.content[0].text == ANSWER
    assert reply.usage.cache_read_input_tokens == USAGE["cache_read_input_tokens"]
    path, headers, body = upstream.requests[-1]
    assert path == "/v1/messages"
    # The SDK's own credentials header and API version go through as it sent them.
    assert headers.get("x-api-key") == "sk-ant-interop" or headers.get("authorization") == "Bearer sk-ant-interop"
    assert headers["anthropic-version"] == claude.default_headers["anthropic-version"]
    assert body == {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "Capital of France?"}]}
    assert_metered(gateway, raw.headers["x-flowgate-trace-id"], "messages")


def test_anthropic_sdk_streams_messages(claude: anthropic.Anthropic, gateway):
    with claude.messages.stream(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "Capital of France?"}],
        extra_headers=TAGS,
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        trace_id = stream.response.headers["x-flowgate-trace-id"]
    assert text == ANSWER
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == USAGE["output_tokens"]
    trace = assert_metered(gateway, trace_id, "messages")
    assert trace["stream"] is True
    assert trace["latency"]["ttft_ms"] is not None
