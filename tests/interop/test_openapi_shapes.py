"""The bodies flowgate itself produces, validated against OpenAI's official OpenAPI spec.

The spec (MIT) is not in this repo: it is read from `shared/spec/openai-openapi.yaml` beside the
repo root (`FLOWGATE_OPENAPI_SPEC` overrides the path). Schemas are looked up by name under
`components/schemas` and validated with `jsonschema` as Draft 2020-12 (what OpenAPI 3.1 uses),
the whole spec wrapped as one `referencing` resource so `$ref: '#/components/schemas/...'` resolves.

One translation is applied to the spec, uniformly: a few schemas still carry OpenAPI 3.0's
`nullable: true`, which Draft 2020-12 ignores; it is rewritten to `anyOf: [<schema>, {type: null}]`,
the meaning the spec's authors gave it (e.g. a stream chunk's `finish_reason` and `usage` are
documented as null until the last chunk). Nothing else is relaxed: a body that does not validate
fails with every validation error listed, and the fix belongs in the gateway, not here.

Run with `.venv/bin/pytest -q tests/interop/test_openapi_shapes.py` after `cargo build`.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import jsonschema
import pytest
import referencing
import yaml
from referencing.jsonschema import DRAFT202012

from conftest import REPO_ROOT, Gateway

SPEC_PATH = Path(
    os.environ.get("FLOWGATE_OPENAPI_SPEC", REPO_ROOT.parent / "shared" / "spec" / "openai-openapi.yaml")
)
SPEC_URI = "urn:flowgate:openai-openapi"

CHAT_MODEL = "mock/gpt-4o-mini"
EMBEDDING_MODEL = "mock/text-embedding-3-small"
CHAT_BODY = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hi"}]}

# Every schema name these tests use; test_schema_names_exist checks each is in the spec.
CHAT_RESPONSE = "CreateChatCompletionResponse"
CHAT_CHUNK = "CreateChatCompletionStreamResponse"
COMPLETION_RESPONSE = "CreateCompletionResponse"
EMBEDDING_RESPONSE = "CreateEmbeddingResponse"
RESPONSE = "Response"
RESPONSE_STREAM_EVENT = "ResponseStreamEvent"
LIST_MODELS_RESPONSE = "ListModelsResponse"
ERROR_RESPONSE = "ErrorResponse"
SCHEMA_NAMES = (
    CHAT_RESPONSE,
    CHAT_CHUNK,
    COMPLETION_RESPONSE,
    EMBEDDING_RESPONSE,
    RESPONSE,
    RESPONSE_STREAM_EVENT,
    LIST_MODELS_RESPONSE,
    ERROR_RESPONSE,
)

# How many validation errors a failure message lists (each with its nested anyOf/oneOf causes).
MAX_REPORTED_ERRORS = 25
MAX_REPORTED_CAUSES = 20


# --- the spec -------------------------------------------------------------------------------


class SpecLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe YAML loading that keeps every scalar JSON-typed: no implicit timestamps (dates)."""


SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def translate_nullable(schemas: dict[str, Any]) -> dict[str, Any]:
    """Rewrites OpenAPI 3.0's `nullable: true` into Draft 2020-12 (see the module docstring)."""

    # Only schema objects are translated, never the `properties` maps holding them: a property
    # that is itself named `nullable` must stay a property.
    def schema(node: Any) -> Any:
        if isinstance(node, list):
            return [schema(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
                out[key] = {name: schema(sub) for name, sub in value.items()} if isinstance(value, dict) else value
            elif key in ("example", "examples", "default", "const", "enum", "x-oaiMeta"):
                out[key] = value  # data, not schemas
            else:
                out[key] = schema(value)
        if out.get("nullable") is True:
            del out["nullable"]
            return {"anyOf": [out, {"type": "null"}]}
        return out

    return {name: schema(value) for name, value in schemas.items()}


@dataclass
class Spec:
    document: dict[str, Any]
    registry: referencing.Registry

    @property
    def schemas(self) -> dict[str, Any]:
        return self.document["components"]["schemas"]

    def validator(self, name: str) -> jsonschema.protocols.Validator:
        if name not in self.schemas:
            pytest.fail(f"schema {name!r} is not in {SPEC_PATH} (components/schemas)")
        return jsonschema.Draft202012Validator(
            {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}, registry=self.registry
        )

    def errors(self, name: str, instance: Any) -> list[jsonschema.ValidationError]:
        return sorted(self.validator(name).iter_errors(instance), key=lambda e: json_path(e.absolute_path))

    def problems(self, name: str, instance: Any) -> Optional[str]:
        """None when `instance` validates against schema `name`, else every error, described."""
        errors = self.errors(name, instance)
        return f"{len(errors)} error(s):\n{describe(errors)}" if errors else None

    def assert_valid(self, name: str, instance: Any, what: str) -> None:
        problems = self.problems(name, instance)
        if problems:
            pytest.fail(
                f"{what} does not validate against {name}, {problems}"
                f"\n\nbody:\n{json.dumps(instance, indent=1)[:4000]}",
                pytrace=False,
            )

    def assert_all_valid(self, items: list[tuple[str, Any, str]]) -> None:
        """Validates (schema name, instance, what) items; fails once, naming every failing item.

        Items failing with the same errors (a stream's many deltas) are reported together."""
        failures: dict[str, list[tuple[str, Any]]] = {}
        for name, instance, what in items:
            problems = self.problems(name, instance)
            if problems:
                failures.setdefault(f"against {name}, {problems}", []).append((what, instance))
        if failures:
            report = []
            for problems, failed in failures.items():
                whats = ", ".join(what for what, _ in failed)
                report.append(
                    f"{whats} do(es) not validate {problems}"
                    f"\n\nbody of the first:\n{json.dumps(failed[0][1], indent=1)[:3000]}"
                )
            pytest.fail("\n\n".join(report), pytrace=False)


def json_path(path) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def describe(errors: list[jsonschema.ValidationError]) -> str:
    lines: list[str] = []
    for error in errors[:MAX_REPORTED_ERRORS]:
        describe_one(error, lines, indent="- ")
    if len(errors) > MAX_REPORTED_ERRORS:
        lines.append(f"... and {len(errors) - MAX_REPORTED_ERRORS} more errors")
    return "\n".join(lines)


def describe_one(error: jsonschema.ValidationError, lines: list[str], indent: str) -> None:
    pad = " " * len(indent)
    if not error.context:
        lines.append(f"{indent}at {json_path(error.absolute_path)}: {short(error.message)}")
        lines.append(f"{pad}  schema: {'/'.join(map(str, error.absolute_schema_path))}")
        return
    # anyOf/oneOf: the spec's unions are discriminated by `type`, so drop the branches whose
    # `type` does not match and explain why the branch(es) of the body's own type failed.
    branches: dict[Any, list[jsonschema.ValidationError]] = {}
    for cause in error.context:
        branches.setdefault(cause.relative_schema_path[0], []).append(cause)
    depth = len(error.absolute_path)

    def other_kind(causes: list[jsonschema.ValidationError]) -> bool:
        return any(
            cause.validator in ("enum", "const") and list(cause.absolute_path)[depth:] == ["type"]
            for cause in causes
        )

    matching = {branch: causes for branch, causes in branches.items() if not other_kind(causes)}
    kind = error.instance.get("type") if isinstance(error.instance, dict) else None
    lines.append(
        f"{indent}at {json_path(error.absolute_path)}: not valid under any branch of "
        f"{'/'.join(map(str, error.absolute_schema_path))}"
        + (f" (its type is {kind!r})" if kind is not None else "")
    )
    if not matching:
        lines.append(f"{pad}  no branch has that type")
        return
    for branch, causes in list(matching.items())[:MAX_REPORTED_CAUSES]:
        lines.append(f"{pad}  branch {branch} fails because:")
        for cause in causes[:MAX_REPORTED_CAUSES]:
            describe_one(cause, lines, indent=pad + "    - ")


def short(message: str, limit: int = 300) -> str:
    return message if len(message) <= limit else message[:limit] + " ..."


@pytest.fixture(scope="session")
def spec() -> Spec:
    if not SPEC_PATH.is_file():
        pytest.fail(
            f"OpenAI OpenAPI spec not found at {SPEC_PATH}: it is expected in shared/spec/ beside the "
            "repo root (or set FLOWGATE_OPENAPI_SPEC)",
            pytrace=False,
        )
    with open(SPEC_PATH, encoding="utf-8") as file:
        document = yaml.load(file, Loader=SpecLoader)
    schemas = (document.get("components") or {}).get("schemas")
    if not isinstance(schemas, dict):
        pytest.fail(f"{SPEC_PATH} has no components/schemas", pytrace=False)
    document["components"]["schemas"] = translate_nullable(schemas)
    resource = referencing.Resource(contents=document, specification=DRAFT202012)
    return Spec(document=document, registry=referencing.Registry().with_resource(SPEC_URI, resource))


# --- talking to the gateway -----------------------------------------------------------------


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as err:
            pytest.fail(f"HTTP {self.status} body is not JSON ({err}): {self.body[:500]!r}")


def request(
    gateway: Gateway,
    method: str,
    path: str,
    body: Optional[bytes] = None,
    content_type: Optional[str] = "application/json",
) -> Reply:
    headers = {"Authorization": "Bearer sk-interop-test"}
    if body is not None and content_type is not None:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(gateway.base_url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return Reply(response.status, response.headers.get("Content-Type", ""), response.read(),
                         dict(response.headers))
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.headers.get("Content-Type", ""), err.read(), dict(err.headers))


def post_json(gateway: Gateway, path: str, payload: Any) -> Reply:
    return request(gateway, "POST", path, json.dumps(payload).encode())


@dataclass
class SseEvent:
    event: Optional[str]
    data: str


def sse_events(body: bytes) -> Iterator[SseEvent]:
    """Parses a text/event-stream body (events split by blank lines; `data:` lines joined)."""
    text = body.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    for block in text.split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        if data:
            yield SseEvent(event, "\n".join(data))


def stream(gateway: Gateway, path: str, payload: Any) -> list[SseEvent]:
    reply = post_json(gateway, path, payload)
    assert reply.status == 200, f"HTTP {reply.status}: {reply.body[:1000]!r}"
    assert reply.content_type.startswith("text/event-stream"), reply.content_type
    events = list(sse_events(reply.body))
    assert events, f"empty event stream: {reply.body[:1000]!r}"
    return events


# --- the tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_names_exist(spec: Spec, name: str):
    assert name in spec.schemas, f"{name} is not in {SPEC_PATH} components/schemas"


# The harness itself: each of these must fail, so a pass above is not a vacuous one (an
# unresolved $ref, a union that accepts anything); the nullable translation must keep `null` only.
CHUNK = {
    "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
    "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
}
WRONG_SHAPES = [
    pytest.param(ERROR_RESPONSE, {}, id="error-without-error"),
    pytest.param(ERROR_RESPONSE, {"error": {"message": "m", "type": "t", "param": None}}, id="error-without-code"),
    pytest.param(CHAT_CHUNK, dict(CHUNK, object="chat.completion"), id="chunk-wrong-object"),
    pytest.param(
        CHAT_CHUNK, dict(CHUNK, choices=[dict(CHUNK["choices"][0], finish_reason="done")]), id="chunk-bad-finish"
    ),
    pytest.param(CHAT_CHUNK, dict(CHUNK, usage={"prompt_tokens": "1"}), id="chunk-bad-usage"),
    pytest.param(RESPONSE_STREAM_EVENT, {"type": "response.output_text.delta"}, id="event-missing-fields"),
    pytest.param(RESPONSE_STREAM_EVENT, {"type": "no.such.event"}, id="event-unknown-type"),
]


def test_harness_accepts_a_valid_chunk(spec: Spec):
    spec.assert_valid(CHAT_CHUNK, CHUNK, "a hand-written chunk with finish_reason null")
    spec.assert_valid(CHAT_CHUNK, dict(CHUNK, usage=None), "a hand-written chunk with usage null")


@pytest.mark.parametrize("name,instance", WRONG_SHAPES)
def test_harness_rejects_wrong_shapes(spec: Spec, name, instance):
    assert spec.errors(name, instance), f"{instance} validated against {name}"


JSON_CASES = [
    pytest.param("POST", "/v1/chat/completions", CHAT_BODY, CHAT_RESPONSE, id="chat-completion"),
    pytest.param(
        "POST", "/v1/completions", {"model": CHAT_MODEL, "prompt": "hi"}, COMPLETION_RESPONSE, id="completion"
    ),
    pytest.param(
        "POST", "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": ["a", "b"]}, EMBEDDING_RESPONSE, id="embeddings"
    ),
    pytest.param("POST", "/v1/responses", {"model": CHAT_MODEL, "input": "hi"}, RESPONSE, id="response"),
    pytest.param("GET", "/v1/models", None, LIST_MODELS_RESPONSE, id="list-models"),
]


@pytest.mark.parametrize("method,path,payload,schema", JSON_CASES)
def test_json_body_matches_spec(gateway: Gateway, spec: Spec, method, path, payload, schema):
    body = None if payload is None else json.dumps(payload).encode()
    reply = request(gateway, method, path, body)
    assert reply.status == 200, f"{method} {path}: HTTP {reply.status}: {reply.body[:1000]!r}"
    assert reply.content_type.startswith("application/json"), reply.content_type
    spec.assert_valid(schema, reply.json(), f"{method} {path}")


@pytest.mark.parametrize(
    "stream_options",
    [pytest.param(None, id="plain"), pytest.param({"include_usage": True}, id="include-usage")],
)
def test_chat_stream_chunks_match_spec(gateway: Gateway, spec: Spec, stream_options):
    payload = dict(CHAT_BODY, stream=True)
    if stream_options is not None:
        payload["stream_options"] = stream_options
    events = stream(gateway, "/v1/chat/completions", payload)
    assert events[-1].data == "[DONE]", f"the stream does not end with [DONE]: {events[-1]!r}"
    chunks = [json.loads(event.data) for event in events[:-1]]
    assert chunks, "no chunk before [DONE]"
    assert all(event.data != "[DONE]" for event in events[:-1]), "[DONE] before the end of the stream"
    spec.assert_all_valid([(CHAT_CHUNK, chunk, f"chunk {i}") for i, chunk in enumerate(chunks)])
    if stream_options:
        # The spec: usage is null on every chunk except the last, which carries it (choices empty).
        last = chunks[-1]
        assert last.get("usage"), f"include_usage: the last chunk carries no usage: {last}"
        assert last["choices"] == [], f"include_usage: the usage chunk has choices: {last}"
        assert all(chunk.get("usage") is None for chunk in chunks[:-1]), "usage before the last chunk"
    else:
        assert all("usage" not in chunk or chunk["usage"] is None for chunk in chunks), "usage not asked for"


def stream_event_schemas(spec: Spec) -> dict[str, str]:
    """Maps each `type` value of the spec's response stream events to the union branch for it.

    Checks what makes validating that one branch equivalent to validating the union (anyOf):
    every branch requires `type` and allows values no other branch allows."""
    union = spec.schemas[RESPONSE_STREAM_EVENT]
    branches = union.get("anyOf") or union.get("oneOf")
    assert branches, f"{RESPONSE_STREAM_EVENT} is not an anyOf/oneOf union"
    by_type: dict[str, str] = {}
    for branch in branches:
        name = branch["$ref"].rsplit("/", 1)[-1]
        schema = spec.schemas[name]
        type_schema = schema.get("properties", {}).get("type", {})
        values = type_schema.get("enum") or ([type_schema["const"]] if "const" in type_schema else [])
        assert values and "type" in schema.get("required", []), f"{name}: `type` is not a required enum"
        for value in values:
            assert value not in by_type, f"event type {value!r} is in both {by_type[value]} and {name}"
            by_type[value] = name
    return by_type


def test_response_stream_events_match_spec(gateway: Gateway, spec: Spec):
    events = stream(gateway, "/v1/responses", {"model": CHAT_MODEL, "input": "hi", "stream": True})
    by_type = stream_event_schemas(spec)
    checks, types = [], []
    for index, event in enumerate(events):
        assert event.data != "[DONE]", "the Responses API stream has no [DONE] sentinel"
        data = json.loads(event.data)
        kind = data.get("type")
        types.append(kind)
        what = f"event {index} ({kind})"
        assert event.event == kind, f"{what}: SSE `event: {event.event}` differs from its data's type"
        assert kind in by_type, f"{what}: no branch of {RESPONSE_STREAM_EVENT} has type {kind!r}"
        checks.append((by_type[kind], data, what))  # the same verdict as the union, clearer errors
    assert types[0] == "response.created", types
    assert types[-1] == "response.completed", types
    spec.assert_all_valid(checks)


ERROR_CASES = [
    pytest.param(
        json.dumps({"model": "no-such-provider/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        "application/json",
        404,
        id="unknown-model-404",
    ),
    pytest.param(b'{"model": "mock/gpt-4o-mini", "messages": [', "application/json", 400, id="malformed-json-400"),
    pytest.param(json.dumps(CHAT_BODY).encode(), "text/plain", 415, id="wrong-content-type-415"),
]


@pytest.mark.parametrize("body,content_type,status", ERROR_CASES)
def test_gateway_errors_match_spec(gateway: Gateway, spec: Spec, body, content_type, status):
    reply = request(gateway, "POST", "/v1/chat/completions", body, content_type=content_type)
    assert reply.status == status, f"expected HTTP {status}, got {reply.status}: {reply.body[:1000]!r}"
    assert reply.content_type.startswith("application/json"), reply.content_type
    spec.assert_valid(ERROR_RESPONSE, reply.json(), f"HTTP {status} error body")
