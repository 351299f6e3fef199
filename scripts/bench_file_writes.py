"""How fast a folder takes the value files of a store: N values of one entry's size, written by T
threads through the store's database (`SafeCache.set_many`, 256 values per transaction, as
`cache build` writes a batch: value files under a two-level fan-out, O_EXCL | O_NOFOLLOW, one
write each, then one SQLite transaction) and, for comparison, as plain files in one folder.
No encoding or hashing: the ceiling the disk, the file system and the database put on `cache build`.

    python scripts/bench_file_writes.py --dir /tmp --n 10000 --size 369592 --threads 1,4,8 [--output fs.json]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=tempfile.gettempdir(), help="folder to write in (a fresh subfolder is used)")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--size", type=int, default=369592, help="bytes per file (default: a k=16 bf16 entry with anchors)")
    p.add_argument("--threads", default="1,4,8")
    p.add_argument("--output")
    args = p.parse_args()

    from compressor_plugin.store_backend import SafeCache

    data = os.urandom(args.size)
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for how in ("store", "plain"):
            folder = tempfile.mkdtemp(prefix="fs-", dir=args.dir)
            try:
                if how == "store":
                    cache = SafeCache(folder, size_limit=2**50)

                    def write(start: int) -> None:
                        cache.set_many([(f"ctx:{i:064x}", data) for i in range(start, min(start + 256, args.n))])
                else:
                    def write(start: int) -> None:
                        for i in range(start, min(start + 256, args.n)):
                            with open(os.path.join(folder, f"{i}.val"), "wb") as f:
                                f.write(data)
                t0 = time.perf_counter()
                with cf.ThreadPoolExecutor(threads) as pool:
                    list(pool.map(write, range(0, args.n, 256)))
                seconds = time.perf_counter() - t0
                if how == "store":
                    cache.close()
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            rows.append({"how": how, "threads": threads, "files": args.n, "bytes_per_file": args.size,
                         "seconds": round(seconds, 3), "files_per_s": round(args.n / seconds, 1),
                         "mb_per_s": round(args.n * args.size / seconds / 1e6, 1)})
            print(json.dumps(rows[-1]), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"dir": args.dir, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
