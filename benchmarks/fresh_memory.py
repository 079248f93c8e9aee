"""What touching fresh memory costs on this machine, right after a free and after an idle pause.

    .venv/bin/python benchmarks/fresh_memory.py               # 1 GB, pauses of 0, 1, 3 and 6 s (~30 s)
    .venv/bin/python benchmarks/fresh_memory.py --gb 0.25

On a virtual machine whose balloon driver reports free pages to the host (virtio-balloon "free page
reporting", as on this project's Firecracker VMs), memory that has stayed free for a few seconds is
handed back to the host, and the next write to it faults on the host as well as in the guest. A
benchmark step that allocates large arrays after an idle spell then pays for it: here about 3-12 s per
GB, against ~0.25 s per GB for pages recycled at once. The script writes a fresh array of ``--gb`` GB
(``np.ones``) and frees it, first back to back, then after each pause, and prints the seconds and GB/s;
read the timings of memory-heavy steps (inference batches, first calls of a process) against it.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def touch(n_bytes: int) -> float:
    start = time.perf_counter()
    array = np.ones(n_bytes // 8)
    seconds = time.perf_counter() - start
    del array
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the fresh array (GB)")
    parser.add_argument("--pauses", type=float, nargs="+", default=[0.0, 1.0, 3.0, 6.0])
    args = parser.parse_args(argv)
    n_bytes = int(args.gb * 1e9)
    rows = [{"pause_s": "first touch in this process", "seconds": touch(n_bytes)}]
    rows.append({"pause_s": 0.0, "seconds": touch(n_bytes)})
    for pause in args.pauses:
        time.sleep(pause)
        rows.append({"pause_s": pause, "seconds": touch(n_bytes)})
    for row in rows:
        row["gb_per_s"] = args.gb / row["seconds"]
        print(f"pause {row['pause_s']!s:>28}: {row['seconds']:7.3f} s  ({row['gb_per_s']:6.2f} GB/s)")
    print(json.dumps({"gb": args.gb, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
