#!/usr/bin/env python3
"""One line per second about a running cluster, for finding where a benchmark's time goes.

    scripts/timeline.py OUT NAME=PID[:METRICS_URL] ...   # until killed (SIGTERM)

Each line: seconds since start; the machine's CPU use (percent of all cores, from /proc/stat)
and its disks' MB written and milliseconds of queued I/O over the last second (/proc/diskstats,
whole disks only); then per process its CPU use over the last second (percent of one core,
from /proc/PID/stat) and, for processes given a metrics URL (storage nodes), the engine's
memtables, level-0 tables, flushes and compactions so far, MiB written by compaction so far,
the compaction rate in force (MiB/s) and the mean commit-log fsync over the last second in
ms. A process that exited reads as '-'. Only 127.0.0.1 URLs are fetched.
"""

import os
import re
import signal
import sys
import time
import urllib.request

TICKS = os.sysconf("SC_CLK_TCK")
WANTED = {
    "pairdb_engine_memtables": "mem",
    "pairdb_engine_flushes": "fl",
    "pairdb_engine_compactions": "cp",
    "pairdb_engine_compaction_bytes_written": "cpMiB",
}
LINE = re.compile(r'^(\w+)(?:\{([^}]*)\})?\s+([0-9.eE+-]+)$')


def cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def machine_cpu():
    """(busy, total) jiffies of all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def disks():
    """(sectors written, weighted ms of I/O) summed over whole disks (no partitions)."""
    written = queued = 0
    with open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            name = parts[2]
            if re.match(r"^(sd[a-z]+|vd[a-z]+|xvd[a-z]+|nvme\d+n\d+)$", name):
                written += int(parts[9])
                queued += int(parts[13])
    return written, queued


SYNCS = {}


def engine(url):
    try:
        with urllib.request.urlopen(url, timeout=0.5) as r:
            text = r.read().decode()
    except OSError:
        return "-"
    got = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        name, labels, value = m.groups()
        if name == "pairdb_engine_log_sync_seconds_sum":
            got["sync_sum"] = float(value)
        elif name == "pairdb_engine_log_sync_seconds_count":
            got["sync_count"] = float(value)
        elif name == "pairdb_engine_compaction_rate_bytes":
            got["cpRate"] = f"{float(value) / 2**20:.0f}"
        elif name in WANTED:
            v = float(value)
            got[WANTED[name]] = f"{v / 2**20:.0f}" if name.endswith("bytes_written") else f"{v:.0f}"
        elif name == "pairdb_engine_level_tables" and 'level="0"' in (labels or ""):
            got["L0"] = f"{float(value):.0f}"
    total, count = got.get("sync_sum"), got.get("sync_count")
    before = SYNCS.get(url)
    if total is not None and count is not None:
        SYNCS[url] = (total, count)
    if before and total is not None and count is not None and count > before[1]:
        got["sync"] = f"{(total - before[0]) / (count - before[1]) * 1000:.1f}ms"
    return " ".join(f"{k}={got.get(k, '?')}" for k in ("mem", "L0", "fl", "cp", "cpMiB", "cpRate", "sync"))


def main():
    out = open(sys.argv[1], "a", buffering=1)
    procs = []
    for arg in sys.argv[2:]:
        name, rest = arg.split("=", 1)
        pid, _, url = rest.partition(":")
        if url and not url.startswith("http://127.0.0.1:"):
            sys.exit(f"{name}: only http://127.0.0.1 metrics URLs are fetched")
        procs.append((name, int(pid), url))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    start = time.monotonic()
    last = {pid: cpu_ticks(pid) for _, pid, _ in procs}
    last_cpu, last_disk = machine_cpu(), disks()
    while True:
        time.sleep(1.0)
        cpu, disk = machine_cpu(), disks()
        busy = (cpu[0] - last_cpu[0]) * 100 / max(1, cpu[1] - last_cpu[1])
        written_mb = (disk[0] - last_disk[0]) * 512 / 1e6
        queued_ms = disk[1] - last_disk[1]
        last_cpu, last_disk = cpu, disk
        parts = [
            f"{time.monotonic() - start:6.1f}",
            f"machine:{busy:.0f}% w={written_mb:.0f}MB io={queued_ms}ms",
        ]
        for name, pid, url in procs:
            now = cpu_ticks(pid)
            before = last.get(pid)
            last[pid] = now
            cpu = "-" if now is None or before is None else f"{(now - before) * 100 / TICKS:.0f}%"
            parts.append(f"{name}:{cpu}")
            if url:
                parts.append(f"[{engine(url)}]")
        out.write(" ".join(parts) + "\n")


if __name__ == "__main__":
    main()
