"""Benchmark of the store's hit path: read + verify one stored k=16 chunk.

The default shapes are those of the default model (SmolLM2-135M: 30 layers, 3 KV heads of
64) at k=16 in fp32: 737 KB of keys and values per chunk. The timed call is
:meth:`ContextStore.get` (SQLite lookup and LRU update, file read, safetensors parse,
sha256 check of the tensor data, key check) on a warm page cache.

Run: ``python -m compressor_plugin.evaluation.bench_store [--n 200]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from typing import Any

import torch

from ..context import CompressedContext
from ..store import ContextStore, context_key


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    idx = min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))
    return s[idx]


def bench_hit_path(
    n: int = 200,
    *,
    layers: int = 30,
    kv_heads: int = 3,
    k: int = 16,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    source_tokens: int = 512,
    directory: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``ContextStore.get`` for ``n`` stored chunks (each read once, in random order, then the last ones again).

    Returns:
        dict with ``median_ms``, ``p90_ms``, ``mean_ms``, ``min_ms`` per chunk read,
        ``put_median_ms``, ``again_median_ms`` / ``again_p90_ms`` (a second read of the last
        ``again_n`` = min(n, 100) chunks: their bytes were checked before, so the store reuses the
        checked context from memory), ``bytes_per_chunk`` (stored value), ``context_nbytes`` (tensor data),
        ``full_kv_bytes`` (keys+values of ``source_tokens`` uncompressed tokens in the same
        dtype), ``full_kv_ratio`` (full_kv_bytes / bytes_per_chunk) and the settings used.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    gen = torch.Generator().manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        store = ContextStore(directory if directory is not None else tmp)
        keys: list[str] = []
        put_times: list[float] = []
        try:
            for i in range(n):
                shape = (layers, kv_heads, k, head_dim)
                ctx = CompressedContext("kv", source_tokens, "bench-base", "bench-compressor",
                                        keys=torch.randn(shape, generator=gen).to(dtype),
                                        values=torch.randn(shape, generator=gen).to(dtype))
                text = f"benchmark chunk {seed}-{i}"
                key = context_key(text, base_fingerprint=ctx.base_fingerprint,
                                  compressor_fingerprint=ctx.compressor_fingerprint, k=k, mode="kv", dtype=dtype)
                t0 = time.perf_counter()
                store.put(key, ctx, text)
                put_times.append(time.perf_counter() - t0)
                keys.append(key)
            random.Random(seed).shuffle(keys)
            store.get(keys[0])  # warm up imports and the connection
            times: list[float] = []
            for key in keys:
                t0 = time.perf_counter()
                got = store.get(key)
                times.append(time.perf_counter() - t0)
                if got is None:
                    raise RuntimeError("benchmark entry missing: the store evicted or rejected it")
            again: list[float] = []  # the last chunks read, read again: checked before, same bytes
            for key in reversed(keys[-min(n, 100):]):
                t0 = time.perf_counter()
                got = store.get(key)
                again.append(time.perf_counter() - t0)
                if got is None:
                    raise RuntimeError("benchmark entry missing on its second read")
            memory = store.stats()
            stored = store._kv.get("ctx:" + keys[0])  # the exact stored value (to_bytes() + key field)
            value_bytes = len(stored)
            nbytes = got.nbytes
        finally:
            store.close()
    elem = torch.tensor([], dtype=dtype).element_size()
    full = 2 * layers * kv_heads * source_tokens * head_dim * elem
    ms = [t * 1e3 for t in times]
    return {
        "n": n,
        "median_ms": round(statistics.median(ms), 4),
        "p90_ms": round(_percentile(ms, 0.9), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "min_ms": round(min(ms), 4),
        "put_median_ms": round(statistics.median(put_times) * 1e3, 4),
        "again_n": len(again),
        "again_median_ms": round(statistics.median(again) * 1e3, 4),
        "again_p90_ms": round(_percentile([t * 1e3 for t in again], 0.9), 4),
        "memory_entries": memory["memory_entries"],
        "memory_limit": memory["memory_limit"],
        "bytes_per_chunk": value_bytes,
        "context_nbytes": nbytes,
        "full_kv_bytes": full,
        "full_kv_tokens": source_tokens,
        "full_kv_ratio": round(full / value_bytes, 2),
        "shape": [layers, kv_heads, k, head_dim],
        "dtype": str(dtype),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the store's hit path (read + verify one chunk).")
    parser.add_argument("--n", type=int, default=200, help="chunks to store and read (default 200)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--dir", default=None, help="store folder (default: a temporary folder)")
    args = parser.parse_args(argv)
    print(json.dumps(bench_hit_path(args.n, dtype=getattr(torch, args.dtype), directory=args.dir), indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
