#!/usr/bin/env bash
# A/B: the load harness on two gateway builds, alternating, so that a change is measured against
# what it replaces on the same machine, minutes apart. This machine is shared and drifts by ±30%
# between runs; pairs run back to back are what docs/benchmarks.md compares.
#
#   scripts/ab.sh BEFORE AFTER [--pairs N] [-- bench.sh flags]
#   scripts/ab.sh HEAD~1 .                       # the last commit against the working tree
#   scripts/ab.sh /tmp/flowgate-old ./target/release/flowgate --pairs 2 -- --only stream --rates 1000
#
# BEFORE and AFTER are flowgate binaries, or git revisions ("." is the working tree), built in
# release mode (a revision in a worktree under target/ab/, with a target directory of its own).
# The harness flags default to `--only nonstream,closed --rates 1000 --duration-secs 8 --no-floor`.
# Prints one line per run: for each scenario the added p50 / p99 (ms; of the first chunk for streams), the
# throughput ratio to direct, and the gateway's CPU µs per call; then, for more than one pair, each
# side's medians. Each run's JSON is kept in target/ab/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() {
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
[ $# -ge 2 ] || usage
before=$1 after=$2
shift 2
pairs=3
while [ $# -gt 0 ]; do
    case $1 in
        --pairs) pairs=${2:?--pairs needs a number}; shift 2 ;;
        --) shift; break ;;
        *) usage ;;
    esac
done
flags=("$@")
[ ${#flags[@]} -gt 0 ] || flags=(--only nonstream,closed --rates 1000 --duration-secs 8 --no-floor)

mkdir -p target/ab
out=$(realpath target/ab)

# The path of a release binary for a file, "." or a git revision.
binary() {
    local spec=$1
    if [ -f "$spec" ]; then
        realpath "$spec"
    elif [ "$spec" = . ]; then
        cargo build --release --quiet --bin flowgate >&2
        realpath target/release/flowgate
    else
        local rev tree
        rev=$(git rev-parse --short "$spec^{commit}")
        tree="$out/src-$rev"
        if [ ! -x "$out/flowgate-$rev" ]; then
            git worktree add --force --detach "$tree" "$rev" >&2
            CARGO_TARGET_DIR="$out/target" cargo build --release --quiet --bin flowgate \
                --manifest-path "$tree/Cargo.toml" >&2
            cp "$out/target/release/flowgate" "$out/flowgate-$rev"
            git worktree remove --force "$tree" >&2
        fi
        echo "$out/flowgate-$rev"
    fi
}

# The harness starts its own flowgate through FLOWGATE_BENCH_WRAPPER: this one runs another.
wrapper() {
    local path="$out/run-$1.sh"
    printf '#!/bin/sh\nshift\nexec "%s" "$@"\n' "$2" >"$path"
    chmod +x "$path"
    echo "$path"
}

echo "building $before and $after" >&2
wrap_before=$(wrapper before "$(binary "$before")")
wrap_after=$(wrapper after "$(binary "$after")")

# Prints, per scenario, the added p50 / p99, throughput ratio and CPU per call: of one run
# (`summary LABEL JSON`), or the median of each over several (`summary LABEL JSON JSON ...`).
summary() {
    python3 - "$@" <<'PY'
import json, statistics, sys
label, paths = sys.argv[1], sys.argv[2:]

def figures(path):
    out = {}
    for scenario in json.load(open(path))["scenarios"]:
        added = next(a for a in scenario["added"] if a["target"] == "flowgate")
        phase = next(p for p in scenario["phases"] if p["target"] == "flowgate")
        if scenario["stream"]:
            what, p50, p99 = "ttfc", added["first_chunk_p50_ms"], added["first_chunk_p99_ms"]
        else:
            what, p50, p99 = "added", added["latency"]["p50_ms"], added["latency"]["p99_ms"]
        cpu = phase["process"]["cpu_us_per_request"]
        out[scenario["name"]] = (what, p50, p99, added["throughput_ratio"], cpu)
    return out

runs = [figures(path) for path in paths]
parts = []
for name, (what, *_) in runs[0].items():
    p50, p99, ratio, cpu = (statistics.median(run[name][i] for run in runs) for i in range(1, 5))
    parts.append(f"{name}: {what} {p50:+.3f} / {p99:+.3f} x{ratio:.3f} cpu {cpu:.0f}")
print(f"{label:7}", " | ".join(parts), flush=True)
PY
}

for pair in $(seq 1 "$pairs"); do
    for side in before after; do
        wrap=$wrap_before
        [ $side = after ] && wrap=$wrap_after
        log="$out/$side-$pair.log"
        if ! FLOWGATE_BENCH_WRAPPER=$wrap scripts/bench.sh "${flags[@]}" >"$log" 2>&1; then
            echo "$side, pair $pair: the harness failed; see $log" >&2
            exit 1
        fi
        cp target/bench/load.json "$out/$side-$pair.json"
        summary "$side" "$out/$side-$pair.json"
    done
done

if [ "$pairs" -gt 1 ]; then
    echo "medians of $pairs runs each:"
    for side in before after; do
        runs=()
        for pair in $(seq 1 "$pairs"); do runs+=("$out/$side-$pair.json"); done
        summary "$side" "${runs[@]}"
    done
fi
