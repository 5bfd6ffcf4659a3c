#!/usr/bin/env python3
"""Where flowgate's RSS goes during a load run: runs scripts/bench.sh with the given arguments and,
while it runs, samples the gateway every 0.1 s: RSS, threads, the recorder's queue and calls
served (from /metrics), and mimalloc's purge state read from /proc/<pid>/mem. Writes the samples
to target/bench/rss-trace.txt and prints the highest RSS and the longest time mimalloc's purges
stayed lost (docs/benchmarks.md, item 33: the process-wide purge expiry 0 while an arena's is
past due; src/allocator.rs's thread ends that within a second).

    scripts/rss-trace.py --only memory --duration-secs 20 --no-floor --idle-secs 5

Needs root (or ptrace rights over the gateway) to read its memory; without them the purge
columns are left out. The offsets are mimalloc v3's as libmimalloc-sys 0.1.49 builds them, and
are checked against each other before use (tests/allocator.rs uses the same ones).
"""
import os
import re
import struct
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "flowgate")
OUT = os.path.join(ROOT, "target", "bench", "rss-trace.txt")
SUBPROC_ARENA_COUNT, SUBPROC_ARENAS, SUBPROC_PURGE_EXPIRE = 24, 32, 1352
ARENA_SUBPROC, ARENA_PURGE_EXPIRE, MAX_ARENAS = 24, 64, 160
LOST_AFTER_MS = 200


def subproc_offset():
    """Where mimalloc's process state is in the binary (None without `nm` or the symbol)."""
    try:
        symbols = subprocess.run(["nm", BIN], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    for line in symbols.splitlines():
        if line.endswith(" subproc_main"):
            return int(line.split()[0], 16)
    return None


def find_gateway():
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/exe") == BIN:
                    return int(entry)
            except OSError:
                pass
    return None


def metrics_port(pid):
    try:
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    except OSError:
        return None
    ports = [int(m.group(1)) for line in listening.splitlines() if f"pid={pid}," in line
             for m in [re.search(r":(\d+)\s", line)] if m]
    return min(ports) if ports else None


def load_base(pid):
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if line.rstrip().endswith(BIN) and fields[2] == "00000000":
                return int(line.split("-")[0], 16)
    return None


def purge_state(pid, subproc):
    """(process-wide expiry, [arena expiries]) in ms relative to now (None = not set), or None."""
    def word(mem, addr, fmt):
        mem.seek(addr)
        return struct.unpack(fmt, mem.read(8))[0]
    try:
        with open(f"/proc/{pid}/mem", "rb") as mem:
            now = int(time.monotonic() * 1000)
            count = word(mem, subproc + SUBPROC_ARENA_COUNT, "<Q")
            if not 1 <= count <= MAX_ARENAS:
                return None
            arenas = []
            for i in range(count):
                arena = word(mem, subproc + SUBPROC_ARENAS + 8 * i, "<Q")
                if arena == 0:
                    continue
                if word(mem, arena + ARENA_SUBPROC, "<Q") != subproc:
                    return None
                expiry = word(mem, arena + ARENA_PURGE_EXPIRE, "<q")
                arenas.append(None if expiry == 0 else expiry - now)
            process = word(mem, subproc + SUBPROC_PURGE_EXPIRE, "<q")
            return (None if process == 0 else process - now, arenas)
    except OSError:
        return None


def sample(pid, port, subproc, out, summary):
    with open(f"/proc/{pid}/status") as status:
        fields = {l.split(":")[0]: l.split()[1] for l in status if l.startswith(("VmRSS", "Threads"))}
    rss = int(fields["VmRSS"]) / 1024
    line = f"{time.time():.2f} rss={rss:.1f} threads={fields['Threads']}"
    if port:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
            queue = re.search(r"^flowgate_trace_queue_depth (\d+)", text, re.M)
            served = sum(float(v) for v in re.findall(r"^flowgate_requests_total\{[^}]*\} (\S+)", text, re.M))
            line += f" queue={queue.group(1) if queue else '?'} served={served:.0f}"
        except OSError:
            pass
    state = purge_state(pid, subproc) if subproc else None
    if state:
        process, arenas = state
        show = lambda v: "-" if v is None else str(v)
        line += f" purge={show(process)} arenas={','.join(show(a) for a in arenas)}"
        lost = process is None and any(a is not None and a < -LOST_AFTER_MS for a in arenas)
        now = time.time()
        if lost:
            summary["lost_since"] = summary.get("lost_since") or now
            summary["longest_lost"] = max(summary["longest_lost"], now - summary["lost_since"])
        else:
            summary["lost_since"] = None
    summary["peak"] = max(summary["peak"], rss)
    out.write(line + "\n")


def main():
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    bench = subprocess.Popen([os.path.join(ROOT, "scripts", "bench.sh"), *sys.argv[1:]])
    summary = {"peak": 0.0, "longest_lost": 0.0, "lost_since": None}
    pid = port = subproc = None
    with open(OUT, "w") as out:
        while bench.poll() is None:
            if pid is None or not os.path.exists(f"/proc/{pid}"):
                pid = find_gateway()
                port = None
                if pid:
                    base, offset = load_base(pid), subproc_offset()
                    subproc = base + offset if base is not None and offset is not None else None
            if pid and port is None:
                port = metrics_port(pid)
            if pid:
                try:
                    sample(pid, port, subproc, out, summary)
                except (OSError, KeyError):
                    pid = None
            time.sleep(0.1)
    print(f"rss-trace: highest RSS {summary['peak']:.1f} MB; mimalloc's purges lost for at most "
          f"{summary['longest_lost']:.1f} s at a time; samples in {OUT}")
    sys.exit(bench.returncode)


if __name__ == "__main__":
    main()
