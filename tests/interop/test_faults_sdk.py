"""The official openai SDK against a real flowgate process when things go wrong, and over TLS.

- An upstream that resets the connection mid-stream: the SDK raises a clean `openai.APIError`
  (from flowgate's closing SSE error event) after the content it already got, never hangs, the
  trace records `upstream_stream`, and the gateway keeps serving. A reset inside an event: the
  gateway forwards whole events only, so the half event never reaches the client.
- flowgate's own TLS listener (`server.tls_cert` / `tls_key`, a CA made with the openssl CLI)
  reached by the SDK, streamed and not.

Run with `.venv/bin/pytest -q tests/interop` after `cargo build`.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx2
import openai
import pytest

from conftest import eventually, MOCK_PROVIDER

MESSAGES = [{"role": "user", "content": "Say hello."}]
# Generous against a slow CI machine, small against a hang (the SDK's read timeout is 10 s).
CALL_DEADLINE_S = 8.0


def run_with_deadline(what: str, work: Callable[[], Any], deadline_s: float = CALL_DEADLINE_S) -> Any:
    """Runs `work` on a thread; fails (instead of hanging the session) when it takes too long.

    Returns what `work` returned, or the exception it raised (as a value, to be asserted on).
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:  # noqa: BLE001 - handed to the test to assert on
            outcome["value"] = err

    thread = threading.Thread(target=target, daemon=True, name=what)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        pytest.fail(f"{what}: still running after {deadline_s:.0f} s (the gateway hung the client)")
    return outcome["value"]


# ---------------------------------------------------------------------------------------------
# An OpenAI upstream that breaks every stream off: two chunks, then a TCP reset.

CHUNKS = ["Hel", "lo"]


def chunk_event(content: str) -> bytes:
    data = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class ResettingUpstream:
    """A raw-socket HTTP/1.1 server. `POST /v1/chat/completions` with `"stream": true` gets a
    chunked SSE answer with two chunk events, then the socket is closed with `SO_LINGER` 0 (an
    RST, no terminating chunk). With `partial_tail`, those bytes (the start of a third event) go
    out just before the reset. Anything else gets a 404 in OpenAI's shape."""

    def __init__(self, partial_tail: bytes = b"") -> None:
        self.partial_tail = partial_tail
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.requests: list[tuple[str, str, Any]] = []
        self.resets = 0
        self.errors: list[str] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name="resetting-upstream")
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            request = self._read_request(conn)
            if request is None:
                conn.close()
                return
            method, path, body = request
            self.requests.append((method, path, body))
            if method == "POST" and path == "/v1/chat/completions" and isinstance(body, dict) and body.get("stream"):
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\n"
                    b"content-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n"
                    b"\r\n"
                )
                for content in CHUNKS:
                    conn.sendall(http_chunk(chunk_event(content)))
                    time.sleep(0.05)
                if self.partial_tail:
                    conn.sendall(http_chunk(self.partial_tail))
                # Let the gateway read (and forward) the chunks before the reset: a reset can
                # discard data still in the receiver's buffer.
                time.sleep(0.3)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # Counted before the close: the test may look as soon as the client sees it.
                self.resets += 1
                conn.close()
                return
            payload = json.dumps(
                {"error": {"message": f"no {method} {path} here", "type": "invalid_request_error", "param": None, "code": None}}
            ).encode()
            conn.sendall(
                b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nconnection: close\r\n"
                + f"content-length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            conn.close()
        except Exception as err:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(err))
            conn.close()

    @staticmethod
    def _read_request(conn: socket.socket) -> Optional[tuple[str, str, Any]]:
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                return None
            data += more
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(rest) < length:
                more = conn.recv(65536)
                if not more:
                    break
                rest += more
            raw = rest[:length]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            raw = b""
            while True:
                while b"\r\n" not in rest:
                    rest += conn.recv(65536)
                size_line, rest = rest.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(rest) < size + 2:
                    rest += conn.recv(65536)
                raw += rest[:size]
                rest = rest[size + 2 :]
                if size == 0:
                    break
        else:
            raw = b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        return method, path, body


@pytest.fixture
def resetting_upstream():
    upstream = ResettingUpstream()
    try:
        yield upstream
    finally:
        upstream.close()


def sdk_client(base_url: str, **kwargs: Any) -> openai.OpenAI:
    # No retries: a retried call would hide the failure and double the recorded requests.
    return openai.OpenAI(base_url=base_url, api_key="sk-interop-test", max_retries=0, timeout=10, **kwargs)


def stream_until_error(client: openai.OpenAI, include_usage: bool = False) -> tuple[str, list[str], Any, float]:
    """Streams a chat completion through the resetting upstream.

    Returns (trace id, content received, what ended the iteration, seconds it took).
    """
    started = time.monotonic()
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, **extra
    )
    trace_id = raw.headers.get("x-flowgate-trace-id")
    received: list[str] = []
    ended: Any = None
    try:
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    except Exception as err:  # noqa: BLE001 - asserted by the caller
        ended = err
    return trace_id, received, ended, time.monotonic() - started


def gateway_before(start_gateway, upstream: ResettingUpstream):
    return start_gateway(
        providers=f"""\
[[providers]]
name = "upstream"
kind = "openai"
base_url = "{upstream.base_url}"
models = ["gpt-*"]

{MOCK_PROVIDER}"""
    )


# Without include_usage the gateway asks for usage itself and filters the stream event by event;
# with it, frames pass as they come: two code paths to the closing error event.
@pytest.mark.parametrize("include_usage", [False, True], ids=["gateway-usage", "client-usage"])
def test_upstream_reset_mid_stream_ends_with_a_clean_sdk_error(start_gateway, resetting_upstream, include_usage):
    gateway = gateway_before(start_gateway, resetting_upstream)
    client = sdk_client(gateway.base_url + "/v1")

    # Twice: a broken connection must not poison the gateway's upstream pool for the next call.
    trace_ids = []
    for attempt in (1, 2):
        result = run_with_deadline(
            f"stream #{attempt} through the resetting upstream", lambda: stream_until_error(client, include_usage)
        )
        assert not isinstance(result, BaseException), f"stream #{attempt}: the call itself failed: {result!r}"
        trace_id, received, ended, took = result
        assert trace_id, f"stream #{attempt}: no x-flowgate-trace-id header"
        trace_ids.append(trace_id)
        # The first content arrives before the break: chunks are forwarded as they come.
        assert received and received[0] == "Hel", f"stream #{attempt}: content before the break: {received!r}"
        assert received == CHUNKS, f"stream #{attempt}: {received!r}"
        # flowgate's closing event `data: {"error": {...}}` makes the SDK raise APIError itself: not
        # APIConnectionError / APITimeoutError (subclasses), which would mean a raw cut or a hang.
        assert ended is not None, f"stream #{attempt}: the stream ended without an error after {received!r}"
        assert type(ended) is openai.APIError, (
            f"stream #{attempt}: expected openai.APIError, got {type(ended).__module__}.{type(ended).__name__}: {ended!r}"
        )
        assert isinstance(ended.body, dict), ended.body
        assert ended.body.get("code") == "upstream_stream_error", ended.body
        assert ended.body.get("type"), ended.body
        assert "upstream" in ended.message.lower(), ended.message
        assert took < CALL_DEADLINE_S, f"stream #{attempt} took {took:.1f} s"
    assert resetting_upstream.resets == 2, (resetting_upstream.resets, resetting_upstream.errors)
    assert not resetting_upstream.errors, resetting_upstream.errors
    method, path, body = resetting_upstream.requests[0]
    assert (method, path, body["model"]) == ("POST", "/v1/chat/completions", "gpt-4o-mini"), body
    assert body.get("stream_options") == {"include_usage": True}, body

    # The gateway keeps serving.
    completion = run_with_deadline(
        "chat on mock/gpt-4o-mini after the reset",
        lambda: client.chat.completions.create(model="mock/gpt-4o-mini", messages=MESSAGES),
    )
    assert not isinstance(completion, BaseException), f"call after the reset failed: {completion!r}"
    assert completion.choices[0].message.content
    assert gateway.process.poll() is None, f"flowgate exited:\n{gateway.log()}"

    for trace_id in trace_ids:

        def recorded(trace_id: str = trace_id) -> Any:
            status, body = gateway.get_json(f"/api/v1/traces/{trace_id}")
            return body if status == 200 else None

        trace = eventually(recorded, f"GET /api/v1/traces/{trace_id}")
        error = trace.get("error") or {}
        assert error.get("class") == "upstream_stream", json.dumps(trace, indent=1)[:4000]
        assert "upstream" in (error.get("message") or ""), error


def test_upstream_reset_inside_an_event_ends_with_a_clean_sdk_error(start_gateway):
    # The start of a third event, cut inside its JSON, with the client asking for usage itself
    # (the gateway filters nothing): the half event must still not reach the client.
    upstream = ResettingUpstream(partial_tail=chunk_event("world")[:30])
    try:
        gateway = gateway_before(start_gateway, upstream)
        client = sdk_client(gateway.base_url + "/v1")
        result = run_with_deadline("stream cut inside an event", lambda: stream_until_error(client, True))
        assert not isinstance(result, BaseException), f"the call itself failed: {result!r}"
        _, received, ended, _ = result
        assert received == CHUNKS, received
        assert type(ended) is openai.APIError, f"expected openai.APIError, got {type(ended).__name__}: {ended!r}"
        assert ended.body.get("code") == "upstream_stream_error", ended.body
    finally:
        upstream.close()


# ---------------------------------------------------------------------------------------------
# flowgate's TLS listener


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")


@pytest.fixture
def localhost_pki(tmp_path: Path) -> dict[str, Path]:
    """A CA made for this test and a `localhost` server certificate it signed (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make the test certificates")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=flowgate interop test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=tmp_path,
    )  # fmt: skip
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=tmp_path)
    (tmp_path / "server.ext").write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
    )
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
        cwd=tmp_path,
    )  # fmt: skip
    return {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server.pem", "key": tmp_path / "server.key"}


def test_sdk_over_the_tls_listener(start_gateway, localhost_pki):
    ca = localhost_pki["ca"]
    context = ssl.create_default_context(cafile=str(ca))
    gateway = start_gateway(
        server=f'tls_cert = "{localhost_pki["cert"]}"\ntls_key = "{localhost_pki["key"]}"',
        ssl_context=context,
    )
    assert gateway.base_url.startswith("https://localhost:"), gateway.base_url

    with httpx2.Client(verify=ssl.create_default_context(cafile=str(ca))) as http_client:
        client = sdk_client(gateway.base_url + "/v1", http_client=http_client)

        raw = run_with_deadline(
            "chat over TLS",
            lambda: client.chat.completions.with_raw_response.create(model="mock/gpt-4o-mini", messages=MESSAGES),
        )
        assert not isinstance(raw, BaseException), f"chat over TLS failed: {raw!r}\n{gateway.log()}"
        completion = raw.parse()
        assert completion.choices[0].message.content
        assert completion.usage is not None and completion.usage.completion_tokens > 0
        trace_id = raw.headers.get("x-flowgate-trace-id")
        assert trace_id

        def stream() -> list[Any]:
            with client.chat.completions.create(
                model="mock/gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            ) as chunks:
                return list(chunks)

        chunks = run_with_deadline("stream over TLS", stream)
        assert not isinstance(chunks, BaseException), f"stream over TLS failed: {chunks!r}\n{gateway.log()}"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip(), chunks
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, chunks[-1]

    # The admin API is on the same TLS listener.
    def recorded() -> Any:
        status, body = gateway.get_json(f"/api/v1/traces/{trace_id}")
        return body if status == 200 else None

    assert eventually(recorded, f"GET /api/v1/traces/{trace_id} over https")["id"] == trace_id

    # Verification is real: a client that does not trust the test CA cannot connect.
    untrusted = sdk_client(gateway.base_url + "/v1")
    refused = run_with_deadline(
        "chat over TLS without the CA",
        lambda: untrusted.chat.completions.create(model="mock/gpt-4o-mini", messages=MESSAGES),
    )
    assert isinstance(refused, openai.APIConnectionError), f"expected APIConnectionError, got {refused!r}"
    assert gateway.process.poll() is None, f"flowgate exited:\n{gateway.log()}"
