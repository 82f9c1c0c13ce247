#!/usr/bin/env python3
"""The p99 of a paced load before and during a change, from `pairdb bench --latency-log`.

    p99_window.py LOG IDLE_FROM CHANGE_AT ENDED [TIMELINE]

LOG has one line per request: due time (Unix us), latency (us), HTTP status. Prints
"IDLE_P99_MS DURING_P99_MS": the p99 of the requests due in [IDLE_FROM, CHANGE_AT) and of
those due in [CHANGE_AT, ENDED] (times in Unix seconds). With TIMELINE, appends the p99 of
every 5 s from IDLE_FROM to ENDED to that file.
"""
import sys


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))] / 1000 if xs else 0.0


def main():
    log = sys.argv[1]
    idle_from, change_at, ended = map(float, sys.argv[2:5])
    timeline = sys.argv[5] if len(sys.argv) > 5 else None
    idle, during, buckets = [], [], {}
    for line in open(log):
        due, micros, _status = line.split()
        t = int(due) / 1e6
        if idle_from <= t < change_at:
            idle.append(int(micros))
        elif change_at <= t <= ended:
            during.append(int(micros))
        if idle_from <= t <= ended:
            buckets.setdefault(int((t - change_at) // 5), []).append(int(micros))
    if timeline:
        with open(timeline, "a") as out:
            for b in sorted(buckets):
                out.write(
                    f"load p99 in [{b * 5}, {b * 5 + 5}) s from the change: "
                    f"{p99(buckets[b]):.1f} ms ({len(buckets[b])} requests)\n"
                )
    print(f"{p99(idle):.1f} {p99(during):.1f}")


main()
