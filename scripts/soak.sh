#!/usr/bin/env bash
# THE soak command: mixed traffic with injected faults (upstream resets mid-stream, slow streams,
# 5xx/429, client cancellations) through an in-process gateway for SECONDS (default 600), sampling
# RSS and open file descriptors every 10 s. Fails when RSS grows more than
# FLOWGATE_SOAK_MAX_RSS_GROWTH_MB (default 64) after the 30 s mark, when file descriptors leak,
# when the traces stored differ from the requests sent, or when an answer is wrong or hangs.
#
#   scripts/soak.sh          # 10 minutes
#   scripts/soak.sh 60       # a 1-minute smoke run
set -euo pipefail

# Work from the repo root whatever the caller's cwd.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECONDS_TO_RUN="${1:-${FLOWGATE_SOAK_SECS:-600}}"
case "$SECONDS_TO_RUN" in
    '' | *[!0-9]*)
        echo "usage: $0 [SECONDS]   (got '$SECONDS_TO_RUN')" >&2
        exit 2
        ;;
esac

export FLOWGATE_SOAK_SECS="$SECONDS_TO_RUN"
exec cargo test --release --test soak -- --ignored --nocapture
