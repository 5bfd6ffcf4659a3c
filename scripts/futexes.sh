#!/usr/bin/env bash
# Where flowgate's futex calls come from: runs the load harness with the gateway under
# `perf record` (the futex syscall tracepoint, with DWARF call stacks) and prints, per thread, the
# most frequent call chains, per call served. A futex call on a tokio worker means a thread was put
# to sleep or woken; a call that wakes the idle worker for nothing shows up here as
# `Harness::poll` -> `yield_now` -> `notify_parked` (docs/benchmarks.md, item 25).
#
#   scripts/futexes.sh --only nonstream --rates 1000 --duration-secs 8 --no-floor
#
# Arguments go to scripts/bench.sh (keep phases short: the stacks make a large perf file). Needs
# `perf` and permission to trace (root, or kernel.perf_event_paranoid <= 1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v perf >/dev/null || { echo "futexes.sh: perf is not installed" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

cargo build --release --quiet --bin flowgate
wrapper="$out/wrap.sh"
printf '#!/bin/sh\nshift\nexec perf record -q -e syscalls:sys_enter_futex --call-graph dwarf,16384 -o "%s" -- "%s" "$@"\n' \
    "$out/perf.data" "$(realpath target/release/flowgate)" >"$wrapper"
chmod +x "$wrapper"

FLOWGATE_BENCH_WRAPPER="$wrapper" scripts/bench.sh "$@" 2>&1 | tee "$out/bench"
calls=$({ grep -E "^ +flowgate +[0-9]+ requests" "$out/bench" || true; } | awk '{s += $2} END {print s + 0}')
perf script -i "$out/perf.data" 2>/dev/null >"$out/stacks"

python3 - "$out/stacks" "$calls" <<'PY'
import collections, re, sys

path, calls = sys.argv[1], max(int(sys.argv[2]), 1)
# Frames that say nothing about who asked: the syscall wrapper, std and core plumbing.
plumbing = ("syscall", "core::", "std::", "<core::", "alloc::", "<alloc::")
per_thread = collections.Counter()
chains = collections.Counter()
for block in open(path).read().split("\n\n"):
    lines = [line for line in block.strip().split("\n") if line.strip()]
    if not lines:
        continue
    thread = re.sub(r"-?\d+$", "", lines[0].split()[0]) or lines[0].split()[0]
    frames = []
    for line in lines[1:]:
        parts = line.strip().split(" ", 1)
        if len(parts) < 2:
            continue
        frame = re.sub(r"\+0x[0-9a-f]+$", "", parts[1].split(" (")[0])
        if not frame.startswith(plumbing):
            frames.append(frame[:110])
    per_thread[thread] += 1
    chains[(thread, tuple(frames[:8]))] += 1

print(f"\nfutex calls per call served ({calls} calls, whole process life):")
for thread, count in per_thread.most_common():
    print(f"  {count / calls:8.3f}  {thread}")
print("\nmost frequent call chains (innermost first):")
for (thread, frames), count in chains.most_common(8):
    print(f"\n  {count / calls:.3f} per call, {thread}:")
    for frame in frames:
        print(f"      {frame}")
PY
