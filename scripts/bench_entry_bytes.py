"""Per-entry cost of making a stored context's bytes, on one core: the store's own safetensors
writer (`CompressedContext.to_bytes`) against `safetensors.torch.save` of the same tensors and
metadata, the whole `encode_context` (checks, one SHA-256 pass, entry digest, bytes), and the
finite-value check, on random k=16 contexts of the default model's shape (30 layers, 3 K/V
heads, head size 64) with 32 anchor ids.

    OMP_NUM_THREADS=1 python scripts/bench_entry_bytes.py [--n 256] [--dtype bfloat16] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from safetensors.torch import save

    from compressor_plugin.context import CompressedContext
    from compressor_plugin.store import all_finite, encode_context

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    keys = torch.randn(args.n, 30, 3, 16, 64).to(dtype)
    values = torch.randn(args.n, 30, 3, 16, 64).to(dtype)
    ctxs = [CompressedContext("kv", 512, "0" * 16, "1" * 16, keys=keys[i], values=values[i],
                              anchor_ids=torch.arange(1000 + i, 1032 + i)) for i in range(args.n)]
    key = "0" * 64
    meta = CompressedContext.from_bytes(ctxs[0].to_bytes())  # warm-up, and a check that it reads back
    assert torch.equal(meta.keys, ctxs[0].keys)

    def header(ctx: CompressedContext) -> dict[str, str]:
        data = ctx.to_bytes(tensor_digest="x")
        return json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]

    metas = [header(c) for c in ctxs]
    cases = {
        "to_bytes (this package's writer, digest given)": lambda i: ctxs[i].to_bytes(tensor_digest="x"),
        "safetensors.torch.save (same tensors and metadata)": lambda i: save(ctxs[i]._tensors(), metadata=metas[i]),
        "tensor digest (SHA-256 of the data)": lambda i: CompressedContext._digest(ctxs[i]._tensors()),
        "finite check (keys and values)": lambda i: (all_finite(ctxs[i].keys), all_finite(ctxs[i].values)),
        "encode_context (all of a store write but the file)": lambda i: encode_context(key, ctxs[i]),
    }
    rows = []
    for name, fn in cases.items():
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for i in range(args.n):
                fn(i)
            runs.append((time.perf_counter() - t0) / args.n * 1e3)
        rows.append({"case": name, "ms_per_entry_median": round(statistics.median(runs), 4),
                     "ms_per_entry_min": round(min(runs), 4)})
    print(json.dumps({"n": args.n, "dtype": args.dtype, "entry_bytes": len(encode_context(key, ctxs[0])),
                      "torch_threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print("\n| case | ms per entry (median) | min |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ms_per_entry_median']:.3f} | {r['ms_per_entry_min']:.3f} |")


if __name__ == "__main__":
    main()
