#!/usr/bin/env bash
# THE test command: installs what the tests need (idempotently), then runs every test suite.
# Exits non-zero as soon as anything fails.
#
# Pinned versions keep the interop tests reproducible; override them to try another SDK:
#   FLOWGATE_TEST_OPENAI_VERSION=1.109.1 scripts/test.sh
set -euo pipefail

OPENAI_VERSION="${FLOWGATE_TEST_OPENAI_VERSION:-3.57.0}"
PYTEST_VERSION="${FLOWGATE_TEST_PYTEST_VERSION:-9.2.0}"
# For tests/interop/test_openapi_shapes.py (validates bodies against OpenAI's OpenAPI spec).
JSONSCHEMA_VERSION="${FLOWGATE_TEST_JSONSCHEMA_VERSION:-4.26.0}"
REFERENCING_VERSION="${FLOWGATE_TEST_REFERENCING_VERSION:-0.37.0}"
PYYAML_VERSION="${FLOWGATE_TEST_PYYAML_VERSION:-6.0.3}"
# For tests/interop/test_anthropic_sdk.py (the official SDK against /v1/messages).
ANTHROPIC_VERSION="${FLOWGATE_TEST_ANTHROPIC_VERSION:-2.10.0}"

# Work from the repo root whatever the caller's cwd.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() {
    printf '\n==> %s\n' "$*"
}

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

# True when the venv already has the wanted versions, so pip (and the network) can be skipped.
venv_is_ready() {
    [ -x .venv/bin/python ] || return 1
    .venv/bin/python - "$OPENAI_VERSION" "$PYTEST_VERSION" "$JSONSCHEMA_VERSION" "$REFERENCING_VERSION" \
        "$PYYAML_VERSION" "$ANTHROPIC_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
import anthropic, jsonschema, openai, pytest, referencing, yaml  # noqa: F401  (importable, not just installed)
wanted = ("openai", "pytest", "jsonschema", "referencing", "PyYAML", "anthropic")
sys.exit(0 if tuple(version(name) for name in wanted) == tuple(sys.argv[1:]) else 1)
PY
}

setup_python() {
    section "python venv (.venv: openai==$OPENAI_VERSION, pytest==$PYTEST_VERSION," \
        "jsonschema==$JSONSCHEMA_VERSION, referencing==$REFERENCING_VERSION, PyYAML==$PYYAML_VERSION," \
        "anthropic==$ANTHROPIC_VERSION)"
    if venv_is_ready; then
        echo "already installed"
        return
    fi
    if [ ! -x .venv/bin/python ]; then
        # Debian ships venv's pip bootstrap separately.
        python3 -c 'import ensurepip' 2>/dev/null || {
            as_root apt-get update
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
        }
        python3 -m venv .venv
    fi
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        "openai==$OPENAI_VERSION" "pytest==$PYTEST_VERSION" "jsonschema==$JSONSCHEMA_VERSION" \
        "referencing==$REFERENCING_VERSION" "PyYAML==$PYYAML_VERSION" "anthropic==$ANTHROPIC_VERSION"
}

setup_prometheus() {
    section "prometheus + promtool (Debian package)"
    if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
        echo "already installed: $(command -v promtool)"
        return
    fi
    as_root apt-get update
    # Through `env` because sudo drops the caller's environment.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus
}

run_cargo_tests() {
    section "cargo test (doctests, which --all-targets leaves out, then all targets)"
    cargo test --doc
    cargo test --all-targets
}

run_interop_tests() {
    section "interop tests (official openai and anthropic SDKs against target/debug/flowgate)"
    cargo build
    .venv/bin/pytest -q tests/interop
}

setup_python
setup_prometheus
run_cargo_tests
run_interop_tests
section "all tests passed"
