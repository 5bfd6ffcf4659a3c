"""Fixtures that run a real flowgate process for the interop tests.

The gateway binary is `target/debug/flowgate` (build it with `cargo build`); set `FLOWGATE_BIN`
to test another build. Each test session gets its own port, config and database in a temp dir.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("FLOWGATE_BIN", REPO_ROOT / "target" / "debug" / "flowgate"))

STARTUP_TIMEOUT_S = 30.0

# Traces are recorded off the request path, so the admin API may lag the answers a little.
RECORDING_TIMEOUT_S = 10.0

# Environment variables that would override the test config (CONTRACT section 1).
OVERRIDING_ENV = ("FLOWGATE_LISTEN", "FLOWGATE_DATA_DIR", "FLOWGATE_CONFIG", "FLOWGATE_ADMIN_TOKEN")


@dataclass
class Gateway:
    base_url: str
    process: subprocess.Popen
    log_path: Path
    # Trusts the gateway's certificate when it speaks TLS (see `start_gateway`).
    ssl_context: Any = None

    def get_json(self, path: str) -> tuple[int, Any]:
        """GET an admin API path; returns (status, parsed JSON or None)."""
        request = urllib.request.Request(self.base_url + path, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.ssl_context) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body)
            except ValueError:
                return err.code, None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def eventually(check: Callable[[], Optional[Any]], what: str) -> Any:
    """Polls `check` until it returns something truthy; fails naming `what` and the last value."""
    deadline = time.monotonic() + RECORDING_TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    pytest.fail(f"timed out after {RECORDING_TIMEOUT_S:.0f} s waiting for {what}; last seen: {last!r}")


def free_port() -> int:
    # Another process could take the port between here and the gateway's bind; in a test
    # session on one machine that race is rare enough to accept.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes), which covers any temp path.
    return json.dumps(value)


def write_config(directory: Path, port: int) -> Path:
    config = directory / "flowgate.toml"
    config.write_text(
        f"""\
[server]
listen = {toml_string(f"127.0.0.1:{port}")}

[storage]
path = {toml_string(str(directory / "flowgate.sled"))}

[[providers]]
name = "mock"
kind = "mock"
models = ["mock/*"]
"""
    )
    return config


def wait_until_healthy(gateway: Gateway) -> None:
    """Waits for /healthz; over https the check trusts the gateway's `ssl_context`."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error: Any = None
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            pytest.fail(
                f"flowgate exited with code {gateway.process.returncode} during startup:\n{gateway.log()}"
            )
        try:
            with urllib.request.urlopen(
                gateway.base_url + "/healthz", timeout=1, context=gateway.ssl_context
            ) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
            last_error = err
        time.sleep(0.1)
    pytest.fail(
        f"flowgate did not answer {gateway.base_url}/healthz within {STARTUP_TIMEOUT_S:.0f} s "
        f"(last error: {last_error!r}):\n{gateway.log()}"
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()  # SIGTERM: lets the gateway flush its trace queue
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    if not BINARY.is_file():
        pytest.fail(f"{BINARY} does not exist; run `cargo build` first (or set FLOWGATE_BIN)")
    directory = tmp_path_factory.mktemp("flowgate")
    port = free_port()
    config = write_config(directory, port)
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDING_ENV}
    log_path = directory / "flowgate.log"
    with open(log_path, "wb") as log:
        # cwd is the temp dir so nothing relative (config/flowgate.toml, data/) leaks in from the repo.
        process = subprocess.Popen(
            [str(BINARY), "serve", "--config", str(config)],
            cwd=directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    gw = Gateway(base_url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    try:
        wait_until_healthy(gw)
        yield gw
    finally:
        stop(process)


@pytest.fixture(scope="session")
def client(gateway: Gateway) -> openai.OpenAI:
    # No retries: a retried call would hide a gateway error and double the recorded requests.
    return openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="sk-interop-test", max_retries=0, timeout=30)



# ---------------------------------------------------------------------------------------------
# A gateway per test, with its own config (other providers, TLS): see test_faults_sdk.py.

MOCK_PROVIDER = """\
[[providers]]
name = "mock"
kind = "mock"
models = ["mock/*"]
"""


@pytest.fixture
def start_gateway(tmp_path_factory: pytest.TempPathFactory):
    """Starts flowgate processes with a config of the test's own; all are stopped after the test.

    `start_gateway(server="...", providers="...", ssl_context=None)`: `server` is TOML added to
    `[server]` (after `listen`), `providers` the `[[providers]]` tables (default: the mock). With
    an `ssl_context` the gateway is reached as `https://localhost:<port>` and trusted through it.
    """
    if not BINARY.is_file():
        pytest.fail(f"{BINARY} does not exist; run `cargo build` first (or set FLOWGATE_BIN)")
    started: list[subprocess.Popen] = []

    def start(server: str = "", providers: str = MOCK_PROVIDER, ssl_context: Any = None) -> Gateway:
        directory = tmp_path_factory.mktemp("flowgate-custom")
        port = free_port()
        config = directory / "flowgate.toml"
        config.write_text(
            f"""\
[server]
listen = {toml_string(f"127.0.0.1:{port}")}
{server}

[storage]
path = {toml_string(str(directory / "flowgate.sled"))}

{providers}
"""
        )
        env = {k: v for k, v in os.environ.items() if k not in OVERRIDING_ENV}
        log_path = directory / "flowgate.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(BINARY), "serve", "--config", str(config)],
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(process)
        host = "localhost" if ssl_context is not None else "127.0.0.1"
        scheme = "https" if ssl_context is not None else "http"
        gw = Gateway(
            base_url=f"{scheme}://{host}:{port}", process=process, log_path=log_path, ssl_context=ssl_context
        )
        wait_until_healthy(gw)
        return gw

    try:
        yield start
    finally:
        for process in started:
            stop(process)
