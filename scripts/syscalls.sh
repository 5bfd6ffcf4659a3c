#!/usr/bin/env bash
# Counts the syscalls and context switches of the flowgate (and floor proxy) processes that a load
# harness run starts, with perf's in-kernel counters, and prints them per call. This is how
# docs/benchmarks.md's syscall figures were taken. Counting the ~25 syscalls listed below costs
# little (CPU per call stays in its usual range); counting every syscall tracepoint doubled it.
#
#   scripts/syscalls.sh --only nonstream --rates 1000 --duration-secs 10
#
# Arguments go to scripts/bench.sh. Needs `perf` and permission to trace (root, or
# kernel.perf_event_paranoid <= 1). Counts cover each process's whole life, warm-up included;
# divide by the calls it served (printed per target) — open-loop phases are exact enough.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v perf >/dev/null || { echo "syscalls.sh: perf is not installed" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Waits for a process whose command line matches $1, then counts until it exits.
count() {
    local pattern=$1 name=$2 pid=""
    while [ -z "$pid" ]; do
        pid=$(pgrep -f -- "$pattern" | head -1 || true)
        [ -n "$pid" ] || sleep 0.05
    done
    local events=raw_syscalls:sys_enter,context-switches syscall
    for syscall in read write writev readv recvfrom sendto recvmsg sendmsg epoll_wait epoll_pwait \
        epoll_ctl futex getrandom madvise mmap munmap pwrite64 pread64 fsync fdatasync \
        sync_file_range sched_yield accept4 close; do
        events="$events,syscalls:sys_enter_$syscall"
    done
    perf stat -e "$events" -p "$pid" -o "$out/$name" 2>/dev/null || true
}
count 'release/flowgate serve' flowgate &
count '[-]-floor-proxy' floor &

scripts/bench.sh "$@" 2>&1 | tee "$out/bench"
# The counters end with their processes; give them a moment to write.
wait

calls() { { grep -E "^ +$1 +[0-9]+ requests" "$out/bench" || true; } | awk '{s += $2} END {print s + 0}'; }
for name in flowgate floor; do
    [ -s "$out/$name" ] || continue
    n=$(calls "$name")
    [ "$n" -gt 0 ] || continue
    echo
    echo "$name: $n calls measured; per call (whole process life):"
    awk -v n="$n" '$1 ~ /^[0-9,]+$/ {gsub(/,/, "", $1); if ($1 / n >= 0.01) printf "  %8.2f  %s\n", $1 / n, $2}' \
        "$out/$name" | sort -rn
done
