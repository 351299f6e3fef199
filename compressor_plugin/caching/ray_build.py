"""Scale-out cache building on Ray Data: one model per actor, one store shard per actor.

How it works:

1. The driver reads and chunks the corpus (the same :class:`TokenChunker` and store keys as
   :func:`~compressor_plugin.caching.build.build_cache`), and keeps only the chunks whose key
   the target store does not hold yet (resume, deduplication).
2. Those chunks, sorted by token count, become a Ray dataset; ``map_batches`` runs a callable
   class on an actor pool: each actor loads the compressor once, compresses a batch per call
   and writes the contexts to its *own* store shard, a folder on the actor's local disk
   (diskcache uses SQLite, which must not share a database over NFS/SMB, and separate shards
   mean the actors never wait on each other's locks).
3. The driver merges every shard into the target store with :meth:`ContextStore.merge_from`
   (each entry is verified on the way), deletes the merged shards and writes the chunk map.

Limits: the driver holds the text of the chunks still to be compressed (not their K/V); for
corpora larger than its memory, run the build on parts of the input one after another (each run
skips what is stored). On a single machine the shards are in ``shard_dir`` and merged
automatically; on a multi-node cluster a shard written on another node is not on the driver's
disk: it is left where it is and listed in the summary (``unmerged_shards``); copy those
folders to the driver and merge them with ``ContextStore(target).merge_from(folder)``. Shards
left by an interrupted run are merged at the start of the next run with the same ``shard_dir``.
The package (and a checkpoint given as a folder) must be installed or present on every node.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from ..text import literal_ids
from ..store import ContextStore, context_key
from ..anchors import DEFAULT_ANCHORS, check_budget
from ..engine import stays_text
from .build import (BuildSummary, ChunkMapWriter, finish_summary, default_batch_size, encode_contexts, key_parts, map_row,
                    open_store)
from .chunking import Document, TokenChunker, iter_documents

logger = logging.getLogger(__name__)

#: Size limit of a shard store: shards must never evict (the merge would lose entries).
SHARD_SIZE_LIMIT = 2**60
_SHARD_MARKER = "store.json"


def default_shard_dir(store_dir: str | os.PathLike) -> Path:
    """``<tmp>/compressor-plugin-shards/<hash of the target store path>``: local disk, stable across runs."""
    digest = hashlib.sha256(str(Path(store_dir).expanduser().resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "compressor-plugin-shards" / digest


def merge_shards(target: ContextStore, shard_root: str | os.PathLike,
                 paths: Iterable[str] | None = None) -> dict[str, Any]:
    """Merge shard stores into ``target`` and delete them.

    Args:
        paths: the shard folders; default every store folder directly under ``shard_root``.

    Returns:
        ``copied``, ``existing``, ``bad`` (summed over shards), ``merged`` (shard count) and
        ``unmerged`` (folders not found on this machine).
    """
    root = Path(shard_root)
    if paths is None:
        paths = [str(p) for p in sorted(root.iterdir()) if (p / _SHARD_MARKER).is_file()] if root.is_dir() else []
    out: dict[str, Any] = {"copied": 0, "existing": 0, "bad": 0, "merged": 0, "unmerged": []}
    for path in dict.fromkeys(paths):
        p = Path(path)
        if not (p / _SHARD_MARKER).is_file():
            out["unmerged"].append(str(p))
            continue
        src = ContextStore(p, size_limit=None)
        try:
            res = target.merge_from(src)
        finally:
            src.close()
        for key in ("copied", "existing", "bad"):
            out[key] += int(res[key])
        out["merged"] += 1
        shutil.rmtree(p, ignore_errors=True)
    return out


class ShardCompressor:
    """Ray Data callable class: one compressor and one local store shard per actor.

    Called with a batch ``{"key": [...], "text": [...]}``; compresses the texts in one encoder
    forward, stores each context with its text in the shard, and returns the keys with the
    shard folder and host name they went to.
    """

    def __init__(self, checkpoint: str, device: str, dtype: torch.dtype, shard_root: str,
                 expected_parts: dict[str, Any], threads: int | None = None, merge_lora: bool = True,
                 compile: bool = False, anchors: int = 0):
        if threads:
            torch.set_num_threads(int(threads))
        from ..compressor import Compressor

        self.compressor = Compressor.from_pretrained(checkpoint, device=device, dtype=dtype)
        self.compressor.peft_model.eval()
        # The actor never decodes: it keeps the fast encoder for its whole life.
        self._fast = contextlib.ExitStack()
        self._fast.enter_context(self.compressor.fast_encoder(merge=merge_lora, compile=compile))
        self.anchors = int(anchors)
        parts = key_parts(self.compressor, self.anchors)
        if parts != expected_parts:
            raise RuntimeError(f"the compressor loaded on this worker ({parts}) differs from the driver's "
                               f"({expected_parts}); install the same package version and checkpoint everywhere")
        self.host = socket.gethostname()
        self.shard_dir = Path(shard_root) / f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._shard: ContextStore | None = None

    @property
    def shard(self) -> ContextStore:
        """This actor's store shard, created on first use (an actor that gets no batch leaves none)."""
        if self._shard is None:
            self._shard = ContextStore(self.shard_dir, size_limit=SHARD_SIZE_LIMIT)
        return self._shard

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        texts = [str(t) for t in batch["text"]]
        ids = literal_ids(self.compressor.tokenizer, texts, return_attention_mask=False, verbose=False)["input_ids"]
        ctxs = encode_contexts(self.compressor, ids, self.anchors)
        self.shard.put_many(zip(keys, ctxs, texts))  # raises if a key is not its text's key
        n = len(keys)
        return {"key": np.array(keys, dtype=object), "shard": np.array([str(self.shard.directory)] * n, dtype=object),
                "host": np.array([self.host] * n, dtype=object),
                "nbytes": np.array([c.nbytes for c in ctxs], dtype=np.int64),
                "anchor_tokens": np.array([c.anchor_count for c in ctxs], dtype=np.int64)}


def _init_ray(ray: Any, address: str | None, num_workers: int, cpus_per_worker: float, gpus_per_worker: float) -> bool:
    """Connect to or start Ray; True if this call started it (and so should shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address in (None, "", "local"):
        pkg_parent = str(Path(__file__).resolve().parents[2])
        paths = [pkg_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        kwargs.update(address="local",
                      num_cpus=max(os.cpu_count() or 1, int(np.ceil(num_workers * cpus_per_worker))),
                      num_gpus=torch.cuda.device_count() if gpus_per_worker > 0 else 0,
                      runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}})
    else:
        kwargs["address"] = address
    ray.init(**kwargs)
    return True


def build_cache_ray(
    source: str | os.PathLike | Iterable[Document],
    store: ContextStore | str | os.PathLike,
    checkpoint: str | os.PathLike = "default",
    *,
    text_field: str | None = None,
    id_field: str = "id",
    chunk_tokens: int = 512,
    overlap: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    map_path: str | os.PathLike | None = None,
    limit: int | None = None,
    address: str | None = "local",
    num_workers: int = 2,
    num_gpus_per_worker: float = 0,
    num_cpus_per_worker: float = 1,
    shard_dir: str | os.PathLike | None = None,
    progress: bool = True,
    size_limit: int | None = None,
    merge_lora: bool = True,
    compile: bool = False,
    anchors: int = DEFAULT_ANCHORS,
    follow_symlinks: bool = False,
    keep_short: bool = True,
) -> BuildSummary:
    """:func:`~compressor_plugin.caching.build.build_cache` on a Ray cluster (see the module docstring).

    Args:
        checkpoint: compressor checkpoint (shipped name or folder) every actor loads.
        device: the actors' device (default ``cuda`` with ``num_gpus_per_worker > 0``, else ``cpu``).
        dtype: the actors' dtype (default bf16 on GPU, fp32 on CPU); it is part of the store keys.
        address: ``"local"`` starts a Ray instance on this machine, ``"auto"`` joins the running
            cluster, anything else is passed to ``ray.init(address=...)``. If Ray is already
            initialised in this process it is used as it is.
        num_workers: actors (model replicas); ``num_gpus_per_worker``/``num_cpus_per_worker``
            their resources.
        shard_dir: root of the actors' shard folders (default :func:`default_shard_dir`, on the
            local disk); must be local to each node.

    Other arguments as for :func:`build_cache`.

    Raises:
        RuntimeError: Ray Data is not installed (``pip install "ray[data]"``).
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise RuntimeError('the Ray build needs Ray Data: pip install "ray[data]"') from exc
    from ..compressor import Compressor, resolve_checkpoint, shipped_checkpoints
    from ..models import default_dtype

    t0 = time.perf_counter()
    num_workers = int(num_workers)
    if num_workers < 1:
        raise ValueError("num_workers must be at least 1")
    worker_device = device or ("cuda" if num_gpus_per_worker > 0 else "cpu")
    if str(worker_device).startswith("cuda") and not num_gpus_per_worker > 0:
        raise ValueError("CUDA workers need a GPU each: pass num_gpus_per_worker=1 (--num-gpus-per-worker 1)")
    worker_dtype = dtype if dtype is not None else default_dtype(worker_device)
    # The driver loads the compressor on the CPU in the workers' dtype: for the tokenizer and
    # the store keys (which include the dtype), not to compress.
    driver = Compressor.from_pretrained(checkpoint, device="cpu", dtype=worker_dtype)
    max_len = int(driver.config.max_length)
    if not 1 <= int(chunk_tokens) <= max_len:
        raise ValueError(f"chunk_tokens must be between 1 and the compressor's max_length ({max_len}), "
                         f"not {chunk_tokens}")
    batch_size = int(batch_size or default_batch_size(worker_device))
    anchors = check_budget(anchors)
    parts = key_parts(driver, anchors)
    # Shipped names travel as names (each node resolves them in its own install), folders as absolute paths.
    name = str(checkpoint)
    shipped = name == "default" or name in shipped_checkpoints()
    ckpt_arg = name if shipped else str(resolve_checkpoint(checkpoint).resolve())
    target = open_store(store, size_limit)
    shard_root = Path(shard_dir).expanduser() if shard_dir else default_shard_dir(target.directory)
    summary = BuildSummary(store=str(target.directory), map=str(map_path) if map_path else None,
                           device=str(worker_device), dtype=parts["dtype"], k=driver.k, mode=driver.mode,
                           chunk_tokens=int(chunk_tokens), overlap=int(overlap), batch_size=batch_size,
                           workers=num_workers)
    recovered = merge_shards(target, shard_root)
    if recovered["merged"]:
        logger.info("merged %d shard(s) left by an earlier run (%d entries)", recovered["merged"], recovered["copied"])

    # 1. read, chunk, key, look up
    skipped: Counter = Counter()
    chunker = TokenChunker(driver.tokenizer, chunk_tokens, overlap)
    if isinstance(source, (str, os.PathLike)):
        docs_iter: Iterable[Document] = iter_documents(source, text_field=text_field, id_field=id_field,
                                                       skipped=skipped, limit=limit,
                                                       follow_symlinks=follow_symlinks)
    else:
        docs_iter = itertools.islice(source, limit) if limit is not None else source
    rows: list[tuple[dict[str, Any], str]] = []
    todo: dict[str, tuple[str, int]] = {}
    group: list[Document] = []

    def flush() -> None:
        for chunk in chunker.split(group, skipped):
            summary.source_tokens += chunk.n_tokens
            if keep_short and stays_text(driver.tokenizer, chunk.text, chunk.n_tokens, driver.k, anchors):
                rows.append((map_row(chunk, None), None))  # the short-chunk rule: kept as text
                summary.kept_as_text += 1
                summary.text_tokens += chunk.n_tokens
                continue
            key = context_key(chunk.text, **parts)
            rows.append((map_row(chunk, key), key))
            if key not in todo and key not in target:
                todo[key] = (chunk.text, chunk.n_tokens)
        summary.documents += len(group)
        group.clear()

    for doc in docs_iter:
        group.append(doc)
        if len(group) >= 1024:
            flush()
    flush()
    summary.chunks = len(rows)
    summary.already_stored = summary.chunks - len(todo) - summary.kept_as_text
    del driver

    # 2. compress on the actor pool
    results: list[dict[str, np.ndarray]] = []
    started = False
    if todo:
        started = _init_ray(ray, address, num_workers, float(num_cpus_per_worker), float(num_gpus_per_worker))
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = bool(progress)
            items = [{"key": k, "text": t} for k, (t, _) in sorted(todo.items(), key=lambda kv: -kv[1][1])]
            blocks = max(num_workers, -(-len(items) // (batch_size * 4)))
            ds = ray.data.from_items(items, override_num_blocks=min(blocks, len(items)))
            ds = ds.map_batches(
                ShardCompressor, batch_size=batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=num_workers),
                num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker or None,
                fn_constructor_kwargs={
                    "checkpoint": ckpt_arg, "device": str(worker_device), "dtype": _as_dtype(worker_dtype),
                    "shard_root": str(shard_root), "expected_parts": parts, "merge_lora": merge_lora,
                    "compile": compile, "anchors": anchors,
                    "threads": max(1, int(num_cpus_per_worker)) if worker_device == "cpu" else None})
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                results.append(batch)
        finally:
            if started:
                ray.shutdown()

    # 3. merge the shards, write the map
    shard_paths = sorted({str(s) for b in results for s in b["shard"]})
    local = [str(p) for p in sorted(shard_root.iterdir()) if (p / _SHARD_MARKER).is_file()] \
        if shard_root.is_dir() else []
    merged = merge_shards(target, shard_root, shard_paths + local)
    produced = {str(k) for b in results for k in b["key"]}
    summary.new = len(produced)
    summary.stored_bytes = int(sum(int(b["nbytes"].sum()) for b in results))
    summary.anchors = anchors
    summary.anchor_tokens = int(sum(int(b["anchor_tokens"].sum()) for b in results))
    missing = [k for k in todo if k not in target]
    if merged["unmerged"]:
        summary.warnings.append(f"{len(merged['unmerged'])} shard(s) were written on other nodes and are not merged: "
                                "copy them here and merge them with ContextStore.merge_from")
    elif missing:
        summary.warnings.append(f"{len(missing)} chunk(s) are not in the store after the merge "
                                "(evicted by the size limit, or a worker failed); run the build again")
    if map_path:
        with ChunkMapWriter(map_path) as mw:
            mw.write(r for r, key in rows if key is None or key in target)
            summary.map_rows = mw.rows_written
    finish_summary(summary, skipped, k=summary.k, t0=t0, store=target, close=target is not store)
    summary.extra = {"shard_dir": str(shard_root), "shards_merged": merged["merged"], "actors_used": len(shard_paths),
                     "unmerged_shards": merged["unmerged"], "recovered_from_earlier_run": recovered["copied"],
                     "ray_address": address}
    return summary


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    name = str(dtype).removeprefix("torch.")
    if name not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[name]
