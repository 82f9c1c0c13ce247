#!/usr/bin/env python3
"""The p99 of a paced load before and during a change, from `pairdb bench --latency-log`.

    p99_window.py LOG IDLE_FROM CHANGE_AT ENDED [TIMELINE]
    p99_window.py LOG --windows WINDOWS [TIMELINE]

LOG has one line per request: due time (Unix us), latency (us), HTTP status. Prints
"IDLE_P99_MS DURING_P99_MS": the p99 of the requests due in [IDLE_FROM, CHANGE_AT) and of
those due in [CHANGE_AT, ENDED] (times in Unix seconds).

With --windows, WINDOWS has one line per window, "KIND START END" (KIND `idle`, `during` or
`after`, times in Unix seconds), alternating idle and during windows (one cycle each): the
p99s are of all idle windows' requests pooled, and of all during windows' pooled; with `after`
windows (the load once the change is over), their pooled p99 is printed third. Alternating windows
average out the drifts and the stalls of a run (the p99 of one 5 s window without any change
varies 10x on a 2-core machine), which one idle-then-during pair cannot.

With TIMELINE, appends the p99 of every 5 s (from the first window's start) to that file,
and with --windows also each window's p99 and the idle windows' own spread: the p99 of the
odd cycles' idle windows against the even cycles' (an A/A comparison: how far apart two sets
of windows without any change land in this run).
"""
import sys


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))] / 1000 if xs else 0.0


def read_log(log):
    with open(log) as f:
        for line in f:
            due, micros, _status = line.split()
            yield int(due) / 1e6, int(micros)


def windows_of(argv):
    """[(kind, start, end)] from the command line."""
    if argv[2] == "--windows":
        with open(argv[3]) as f:
            rows = [line.split() for line in f if line.strip()]
        return [(k, float(a), float(b)) for k, a, b in rows], argv[4] if len(argv) > 4 else None
    idle_from, change_at, ended = map(float, argv[2:5])
    timeline = argv[5] if len(argv) > 5 else None
    return [("idle", idle_from, change_at), ("during", change_at, ended)], timeline


def main():
    windows, timeline = windows_of(sys.argv)
    per_window = [[] for _ in windows]
    first = min(w[1] for w in windows)
    last = max(w[2] for w in windows)
    buckets = {}
    for t, micros in read_log(sys.argv[1]):
        for i, (_kind, start, end) in enumerate(windows):
            if start <= t < end:
                per_window[i].append(micros)
                break
        if first <= t <= last:
            buckets.setdefault(int((t - first) // 5), []).append(micros)
    pooled = {"idle": [], "during": [], "after": []}
    for (kind, _, _), xs in zip(windows, per_window):
        pooled[kind].extend(xs)
    if timeline:
        with open(timeline, "a") as out:
            for b in sorted(buckets):
                out.write(
                    f"load p99 in [{b * 5}, {b * 5 + 5}) s from the first window: "
                    f"{p99(buckets[b]):.1f} ms ({len(buckets[b])} requests)\n"
                )
            for (kind, start, end), xs in zip(windows, per_window):
                out.write(
                    f"{kind} window [{start - first:.1f}, {end - first:.1f}) s: "
                    f"p99 {p99(xs):.1f} ms ({len(xs)} requests)\n"
                )
            idles = [xs for (kind, _, _), xs in zip(windows, per_window) if kind == "idle"]
            if len(idles) >= 2:
                odd = [x for xs in idles[0::2] for x in xs]
                even = [x for xs in idles[1::2] for x in xs]
                out.write(
                    f"idle A/A: odd cycles' idle p99 {p99(odd):.1f} ms, even cycles' "
                    f"{p99(even):.1f} ms\n"
                )
    after = f" {p99(pooled['after']):.1f}" if any(k == "after" for k, _, _ in windows) else ""
    print(f"{p99(pooled['idle']):.1f} {p99(pooled['during']):.1f}{after}")


main()
