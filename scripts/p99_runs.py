#!/usr/bin/env python3
"""Per-run and pooled foreground p99s of `scripts/bench-streaming.sh`'s loaded runs.

    p99_runs.py DIR LABEL... [--phase NAME]

DIR is the bench's cluster directory (/tmp/pairdb-bench-streaming); LABEL names the build of
run 1, 2, ... (as PHASE3_BINS ran them; NAME is phase3 unless given). For each run, from
`timeline-NAME-runN.txt` (its idle and during windows, seconds from the first) and
`latencies-NAME-runN.txt` (one line per request: due time in Unix us, latency in us, status):
the p99 before and during the change, as the bench prints it; the median of the 5 s
windows' p99s before and during (a single stall in the 60 s before moves the first but not
this one); the same for the load after the change when the run kept it on (the bench's
AFTER); then, per label, the p99 of all its runs' requests pooled. The first window
starts 5 s after the first request was due (the bench's warm-up), as in the bench itself.
"""
import re
import statistics
import sys


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))] / 1000 if xs else float("nan")


def windows(timeline):
    text = open(timeline).read()
    found = {
        kind: (float(a), float(b))
        for kind, a, b in re.findall(r"(idle|during|after) window \[([\d.]+), ([\d.]+)\)", text)
    }
    return found["idle"], found["during"], found.get("after")


def five_second_p99s(rows, start, end):
    out, at = [], start
    while at + 5 <= end + 0.01:
        out.append(p99([lat for t, lat in rows if at <= t < at + 5]))
        at += 5
    return out


def main():
    args = sys.argv[1:]
    phase = "phase3"
    if "--phase" in args:
        i = args.index("--phase")
        phase = args[i + 1]
        del args[i : i + 2]
    directory, labels = args[0], args[1:]
    pooled = {}
    for run, label in enumerate(labels, 1):
        (idle_from, idle_to), (during_from, during_to), after = windows(
            f"{directory}/timeline-{phase}-run{run}.txt"
        )
        with open(f"{directory}/latencies-{phase}-run{run}.txt") as f:
            raw = [tuple(map(int, line.split()[:2])) for line in f if line.strip()]
        first = min(due for due, _ in raw) / 1e6 + 5
        rows = [(due / 1e6 - first, lat) for due, lat in raw]
        before = [lat for t, lat in rows if idle_from <= t < idle_to]
        during = [lat for t, lat in rows if during_from <= t < during_to]
        mb = statistics.median(five_second_p99s(rows, idle_from, idle_to))
        md = statistics.median(five_second_p99s(rows, during_from, during_to))
        print(
            f"run {run} ({label}): p99 {p99(before):.1f} ms before, {p99(during):.1f} ms "
            f"during, {p99(during) / p99(before):.2f}x; median 5 s p99 {mb:.1f} / {md:.1f} ms, "
            f"{md / mb:.2f}x"
        )
        b, d, a = pooled.setdefault(label, ([], [], []))
        b.extend(before)
        d.extend(during)
        if after:
            later = [lat for t, lat in rows if after[0] <= t < after[1]]
            ma = statistics.median(five_second_p99s(rows, *after))
            print(
                f"  after the change ({after[1] - after[0]:.0f} s): p99 {p99(later):.1f} ms, "
                f"{p99(later) / p99(before):.2f}x; median 5 s p99 {ma:.1f} ms, {ma / mb:.2f}x"
            )
            a.extend(later)
    for label, (b, d, a) in pooled.items():
        later = f", {p99(a):.1f} ms after ({p99(a) / p99(b):.2f}x)" if a else ""
        print(
            f"pooled {label}: p99 {p99(b):.1f} ms before, {p99(d):.1f} ms during, "
            f"{p99(d) / p99(b):.2f}x{later}"
        )


main()
