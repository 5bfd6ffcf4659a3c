#!/usr/bin/env bash
# THE benchmark command: builds flowgate and the load harness (bench profile = release), then
# sends the same load straight to a mock OpenAI upstream and through flowgate, scenario by
# scenario, prints the table and writes target/bench/load.json. Exits non-zero when flowgate errs
# on more than 0.1% of requests or stores fewer traces than it was sent.
#
# Defaults: open loop at 500, 1000 and 2000 RPS, streamed and not, then a closed loop of 16
# workers; 10 s per phase (about 3 minutes in all). Flags pass through to the harness:
#   scripts/bench.sh --quick                 # ~1 s phases at 200 RPS: a smoke run (CI)
#   scripts/bench.sh --rates 500,1000 --duration-secs 5 --only nonstream,closed
#   scripts/bench.sh --litellm               # also LiteLLM's proxy (installs .peer-venv first)
#   scripts/bench.sh --portkey               # also Portkey's gateway (installs .peer-node with npm first)
#   scripts/bench.sh --help                  # every flag
set -euo pipefail

# Work from the repo root whatever the caller's cwd.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

exec cargo bench --bench load -- "$@"
