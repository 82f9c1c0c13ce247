#!/usr/bin/env python3
"""How much deleting a large file stalls another file's fdatasync on this disk.

One thread writes 4 KiB and fdatasyncs in a loop (a commit log); the main thread writes a
256 MiB file (fsynced), waits, then deletes it, three times, either at once (unlink) or by
truncating it from the end in steps of --step-mib first (RocksDB's DeleteScheduler does the
latter). On a file system mounted with `discard` the freed blocks are discarded as they are
freed, and a large discard holds the device queue. Prints how long each deletion took and the
longest fdatasync while it ran. Works in --dir (default: a new directory under the current one,
removed at the end).
  scripts/discard-stall.py [--step-mib N] [--dir D]     (N = 0: plain unlink)
"""
import argparse
import os
import shutil
import tempfile
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("--step-mib", type=int, default=0)
parser.add_argument("--dir", default=None)
args = parser.parse_args()
work = args.dir or tempfile.mkdtemp(prefix="discard-stall-", dir=".")
os.makedirs(work, exist_ok=True)
try:
    log = os.open(os.path.join(work, "log"), os.O_RDWR | os.O_CREAT)
    os.pwrite(log, b"\0" * (8 << 20), 0)
    os.fsync(log)
    syncs = []
    stop = threading.Event()

    def logger():
        offset = 0
        while not stop.is_set():
            t = time.perf_counter()
            os.pwrite(log, b"x" * 4096, offset)
            os.fdatasync(log)
            syncs.append((t, time.perf_counter() - t))
            offset = (offset + 4096) % (8 << 20)

    thread = threading.Thread(target=logger, daemon=True)
    thread.start()
    chunk = os.urandom(1 << 20)
    for run in range(3):
        path = os.path.join(work, f"big{run}")
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        for i in range(256):
            os.write(f, chunk)
            if i % 4 == 3:
                os.fdatasync(f)
        os.fsync(f)
        os.close(f)
        time.sleep(1.5)
        start = time.perf_counter()
        if args.step_mib > 0:
            f = os.open(path, os.O_WRONLY)
            size = 256 << 20
            while size > 0:
                size = max(0, size - (args.step_mib << 20))
                os.ftruncate(f, size)
            os.close(f)
        os.unlink(path)
        took = time.perf_counter() - start
        time.sleep(1.0)
        during = [d for t, d in syncs if start <= t < start + took + 0.5]
        print(
            f"step {args.step_mib} MiB: delete took {took * 1000:.0f} ms,"
            f" longest fdatasync meanwhile {max(during) * 1000:.1f} ms"
        )
    stop.set()
    thread.join()
finally:
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
