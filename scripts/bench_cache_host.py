"""`cache build`'s host side alone: the encoder forward replaced by slices of one random K/V batch
of the real shape and dtype, so chunking, store keys and lookups, anchor choice, serialisation,
digests, store writes and the chunk map run as they do, at the rate the host allows. The result
is a ceiling for the real build on the same machine, not a build: the stored K/V are random.

    python scripts/bench_cache_host.py --data ../shared/data/arxiv_abstracts_train.jsonl --limit 10000 \\
        [--anchors 32] [--anchor-workers 8] [--writer-threads 4] [--output host.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--anchors", type=int, default=32)
    p.add_argument("--anchor-workers", type=int, default=0)
    p.add_argument("--writer-threads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--output")
    args = p.parse_args()

    from compressor_plugin.caching.build import build_cache
    from compressor_plugin.evaluation.qa import load_compressor

    comp = load_compressor("default", device="cpu", dtype=torch.bfloat16).compressor
    cfg = comp.base.model.config
    shape = (args.batch_size, cfg.num_hidden_layers, cfg.num_key_value_heads, comp.k,
             getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    batch = {name: torch.randn(shape, dtype=torch.bfloat16) for name in ("keys", "values")}
    comp.encode_ids = lambda rows: {name: t[: len(rows)] for name, t in batch.items()}  # no encoder forward
    folder = tempfile.mkdtemp(prefix="cache-host-")
    t0 = time.perf_counter()
    try:
        s = build_cache(args.data, f"{folder}/store", comp, map_path=f"{folder}/map.jsonl", batch_size=args.batch_size,
                        limit=args.limit, anchors=args.anchors, anchor_workers=args.anchor_workers,
                        writer_threads=args.writer_threads, progress=False)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    row = {"chunks": s.chunks, "new": s.new, "seconds": round(s.seconds, 2), "wall_s": round(time.perf_counter() - t0, 2),
           "chunks_per_s": round(s.new / s.seconds, 1), "anchors": args.anchors, "anchor_workers": args.anchor_workers,
           "writer_threads": args.writer_threads, "stored_bytes": s.stored_bytes}
    print(json.dumps(row))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
