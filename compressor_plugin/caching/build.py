"""Offline cache building: compress a whole corpus into a :class:`~compressor_plugin.store.ContextStore`.

:func:`build_cache` reads documents (:mod:`compressor_plugin.caching.chunking`), splits them
into token-bounded chunks, compresses every chunk the store does not hold yet, and writes the
contexts (with their texts) to the store and one row per chunk to an optional chunk map.

Pipeline (three kinds of threads, so the model never waits for the disk or the tokenizer):

* a reader thread reads documents, tokenises and splits a *window* of them in two bulk
  tokenizer calls and computes the chunks' store keys;
* the calling thread looks the keys up (``key in store``), sorts the missing chunks of the
  window by token count (longest first, so batches hold similar lengths and an out-of-memory
  error shows on the first batch), and runs one encoder forward per batch
  (:meth:`Compressor.encode_ids`), copying the batch's K/V to the CPU in one transfer;
* writer threads serialise and store the contexts of finished batches (``ContextStore.put``),
  and one map thread appends the window's chunk-map rows once all of its contexts are stored.

Resuming: store keys are content hashes, so a restarted build skips every chunk already
stored and compresses only the rest. Contexts are written batch by batch, so an interrupted
build (Ctrl-C, SIGKILL, a crash) loses at most the batches that were being written. The chunk
map is appended window by window; on restart a partial last line is cut off and rows already
present are not written again.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import torch

from ..anchors import DEFAULT_ANCHORS, AnchorPool
from ..compressor import to_host  # noqa: F401  (re-exported: callers import it from here)
from ..context import CompressedContext
from ..engine import stays_text
from ..store import ContextStore, context_key
from .chunking import Chunk, Document, TokenChunker, input_files, iter_documents, total_input_bytes

if TYPE_CHECKING:  # pragma: no cover
    from ..compressor import Compressor

logger = logging.getLogger(__name__)

#: Default chunks per encoder forward on a CPU and on a GPU.
DEFAULT_BATCH_CPU = 32
DEFAULT_BATCH_GPU = 256
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
#: H200 (SXM) dense bf16 peak, TFLOP/s, the default reference of :func:`benchmark`.
H200_BF16_PEAK_TFLOPS = 989.0


def default_batch_size(device: torch.device | str) -> int:
    """32 on a CPU, 256 on a GPU."""
    return DEFAULT_BATCH_GPU if torch.device(device).type == "cuda" else DEFAULT_BATCH_CPU


# ---------------------------------------------------------------------------------- summary
@dataclass
class BuildSummary:
    """What a build did. :meth:`to_dict` gives the JSON form printed by ``cache build --json``.

    Attributes:
        documents: documents read (after skipping bad inputs).
        chunks: chunks made from them and handled (every occurrence, duplicates included);
            always ``new + already_stored``.
        new: chunks compressed and stored by this build.
        already_stored: chunks whose key was already in the store, or that repeat a chunk
            compressed earlier in this build.
        skipped: skipped inputs by reason (see :func:`~compressor_plugin.caching.chunking.iter_documents`).
        source_tokens: tokens of all chunks; ``compressed_tokens``: k per chunk plus its anchor
            tokens (for chunks already stored, the anchor budget: an upper bound).
        anchors: the anchor token budget per chunk; ``anchor_tokens``: anchor tokens of the
            chunks this build compressed.
        stored_bytes: tensor bytes of the contexts this build stored.
        store_entries, store_bytes: the store's entry count and disk use at the end.
        map_rows: chunk-map rows written by this build (rows already in the map are not repeated).
        interrupted: the build was stopped early (Ctrl-C); what was stored stays stored.
        seconds: wall time of the build.
        anchor_workers: processes that chose the anchors (0: the main process).
        warnings: things the user should act on (e.g. the store reached its size limit).
    """

    documents: int = 0
    chunks: int = 0
    new: int = 0
    already_stored: int = 0
    kept_as_text: int = 0
    text_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    source_tokens: int = 0
    compressed_tokens: int = 0
    anchors: int = 0
    anchor_tokens: int = 0
    stored_bytes: int = 0
    store_entries: int | None = None
    store_bytes: int | None = None
    map_rows: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    store: str = ""
    map: str | None = None
    device: str = ""
    dtype: str = ""
    k: int = 0
    mode: str = ""
    chunk_tokens: int = 0
    overlap: int = 0
    batch_size: int = 0
    workers: int = 1
    anchor_workers: int = 0
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped_total(self) -> int:
        return int(sum(self.skipped.values()))

    @property
    def compression_ratio(self) -> float:
        """Source tokens per compressed token, over all chunks."""
        return self.source_tokens / self.compressed_tokens if self.compressed_tokens else 0.0

    @property
    def chunks_per_s(self) -> float:
        """All chunks (new and already stored) per second of wall time."""
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    @property
    def new_per_s(self) -> float:
        """Chunks compressed per second of wall time."""
        return self.new / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        data.update(skipped_total=self.skipped_total, compression_ratio=round(self.compression_ratio, 3),
                    chunks_per_s=round(self.chunks_per_s, 3), new_per_s=round(self.new_per_s, 3),
                    seconds=round(self.seconds, 3))
        data.update(extra)
        return data

    def format(self) -> str:
        """A human-readable multi-line summary."""
        lines = [
            f"documents       {self.documents}",
            f"chunks          {self.chunks}  (new {self.new}, already stored {self.already_stored}"
            + (f", kept as text {self.kept_as_text}" if self.kept_as_text else "") + ")",
            f"skipped         {self.skipped_total}" + (
                "  (" + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) + ")" if self.skipped else ""),
            f"tokens          {self.source_tokens} -> {self.compressed_tokens} compressed "
            f"(ratio {self.compression_ratio:.1f}x, k={self.k}, {self.mode})",
            f"stored          {_human(self.stored_bytes)} new"
            + (f"; store now {self.store_entries} entries, {_human(self.store_bytes)} on disk"
               if self.store_entries is not None else ""),
            f"time            {self.seconds:.1f} s  ({self.chunks_per_s:.1f} chunks/s, "
            f"{self.new_per_s:.1f} compressed/s)",
            f"store           {self.store}",
        ]
        if self.map:
            lines.append(f"chunk map       {self.map}  ({self.map_rows} rows written)")
        if self.interrupted:
            lines.append("INTERRUPTED     run the same command again to finish; nothing stored is recomputed")
        lines += [f"warning         {w}" for w in self.warnings]
        return "\n".join(lines)


def _human(n: float | None) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# ---------------------------------------------------------------------------------- chunk map
class ChunkMapWriter:
    """Appends chunk-map rows to a JSONL file, one per chunk, without repeating rows.

    A row: ``{"doc_id", "chunk", "start", "end", "n_tokens", "key", "source", "line"}``; ``start``
    and ``end`` are character offsets in the document text, ``line`` is the JSONL line (null
    for text files). Opening an existing map cuts off a partial last line (left by a killed
    build) and remembers its rows, so a resumed build appends only rows that are missing.

    Raises:
        ValueError: a row of the existing map has a field of the wrong type (e.g. a list or a
            number as its ``key``); the message names the file and line, and the file is left
            unchanged (not even a partial last line is cut off).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._seen: set[tuple[Any, ...]] = set()
        self.existing_rows = 0
        self.rows_written = 0
        if self.path.exists():
            self._load()
        self._fh = open(self.path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    #: The fields a row is known by, and the JSON types each may have (null: absent or unknown).
    _IDENTITY_FIELDS: tuple[tuple[str, type], ...] = (
        ("source", str), ("line", int), ("doc_id", str), ("chunk", int), ("key", str), ("start", int), ("end", int))

    @staticmethod
    def _identity(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row.get(name) for name, _ in ChunkMapWriter._IDENTITY_FIELDS)

    def _check_row(self, row: dict[str, Any], lineno: int) -> None:
        """Raise ValueError, naming the file and line, for an identity field of the wrong JSON type."""
        for name, kind in self._IDENTITY_FIELDS:
            value = row.get(name)
            if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
                continue
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            expected = "a string" if kind is str else "an integer"
            raise ValueError(f"chunk map {self.path}, line {lineno}: {name!r} is {shown} ({type(value).__name__}), "
                             f"not {expected}; this is not a chunk map this program wrote. Fix or delete that line, "
                             "or give another --map file (the file was left as it is)")

    def _load(self) -> None:
        data = self.path.read_bytes()
        cut = data.rfind(b"\n") + 1
        bad = 0
        seen: set[tuple[Any, ...]] = set()
        rows = 0
        # every line is checked before anything is cut off, so a refused map is never changed
        for lineno, line in enumerate(data[:cut].split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                bad += 1
                continue
            if isinstance(row, dict):
                self._check_row(row, lineno)
                seen.add(self._identity(row))
                rows += 1
        if cut < len(data):
            logger.warning("chunk map %s ends in a partial line (an interrupted build); cutting it off", self.path)
            with open(self.path, "r+b") as fh:
                fh.truncate(cut)
        self._seen.update(seen)
        self.existing_rows += rows
        if bad:
            logger.warning("chunk map %s has %d lines that are not JSON; they are left as they are", self.path, bad)

    def write(self, rows: Iterable[dict[str, Any]]) -> int:
        """Append the rows not yet in the map; returns how many were written."""
        lines = []
        with self._lock:
            for row in rows:
                ident = self._identity(row)
                if ident in self._seen:
                    continue
                self._seen.add(ident)
                lines.append(json.dumps(row, ensure_ascii=False))
            if lines:
                self._fh.write("\n".join(lines) + "\n")
                self._fh.flush()
                self.rows_written += len(lines)
        return len(lines)

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()

    def __enter__(self) -> "ChunkMapWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def map_row(chunk: Chunk, key: str | None) -> dict[str, Any]:
    """The chunk-map row of a chunk. ``key`` is None for a chunk kept as text (the short-chunk
    rule, :func:`~compressor_plugin.engine.stays_text`): its row holds its ``text`` instead, to be
    put into prompts as it is."""
    row = {"doc_id": chunk.doc_id, "chunk": chunk.index, "start": chunk.start, "end": chunk.end,
           "n_tokens": chunk.n_tokens, "key": key, "source": chunk.source, "line": chunk.line}
    if key is None:
        row["text"] = chunk.text
    return row


def read_chunk_map(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a chunk map (complete JSON lines only)."""
    rows = []
    with open(Path(path).expanduser(), encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n") and line.strip():
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if isinstance(row, dict):
                    rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- encoding
def default_anchor_workers(device: "torch.device | str") -> int:
    """Anchor worker processes for a build on ``device``: 8 on a CUDA device when this process may
    use 10 or more cores (two stay for the encoder, the reader and the writers), else 0. On the
    CPU the encoder is the limit, not anchor choice."""
    if torch.device(device).type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 8 if cores >= 10 else 0


def key_parts(compressor: "Compressor", anchors: int = 0) -> dict[str, Any]:
    """The arguments of :func:`~compressor_plugin.store.context_key` besides the text (an anchor
    budget changes the compressor fingerprint, see :func:`~compressor_plugin.anchors.anchored_fingerprint`)."""
    from ..anchors import anchored_fingerprint

    return {"base_fingerprint": compressor.base.fingerprint,
            "compressor_fingerprint": anchored_fingerprint(compressor.fingerprint, anchors),
            "k": compressor.k, "mode": compressor.mode, "dtype": str(compressor.base.dtype)}


def encode_contexts(compressor: "Compressor", ids: Sequence[Sequence[int]], anchors: int = 0,
                    anchor_ids: Sequence[Sequence[int]] | None = None) -> list[CompressedContext]:
    """Compress a batch of token-id lists with one encoder forward; contexts on the CPU.

    :meth:`Compressor.encode_contexts` (the encode path :meth:`Compressor.compress` uses too)
    with one device-to-host copy per batch. On a CUDA out-of-memory error the batch is split in
    halves and retried. ``anchors``: anchor token budget per chunk (0: none); ``anchor_ids``:
    the chunks' anchors when chosen already (:class:`~compressor_plugin.anchors.AnchorPool`).
    """
    if not ids:
        return []
    try:
        with torch.inference_mode():
            return compressor.encode_contexts(ids, host=True, anchors=anchors, anchor_ids=anchor_ids)
    except _OOM:
        if len(ids) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(ids) // 2
        logger.warning("out of memory with a batch of %d chunks; retrying as %d + %d", len(ids), half, len(ids) - half)
        a, b = (None, None) if anchor_ids is None else (anchor_ids[:half], anchor_ids[half:])
        return encode_contexts(compressor, ids[:half], anchors, a) + encode_contexts(compressor, ids[half:], anchors, b)


# ---------------------------------------------------------------------------------- windows
@dataclass
class _Window:
    chunks: list[Chunk]
    keys: list[str]
    documents: int
    nbytes: int


_DONE = object()


class _WindowReader:
    """Reads documents and prepares chunk windows in a background thread."""

    def __init__(self, documents: Iterator[Document], chunker: TokenChunker, parts: dict[str, Any],
                 window_chunks: int, skipped: Counter, depth: int = 2):
        self._docs = documents
        self._chunker = chunker
        self._parts = parts
        self._window_chars = max(1, window_chunks) * chunker.chunk_tokens * 4
        self._window_docs = max(1, window_chunks)
        self._skipped = skipped
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-build-reader", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _emit(self, docs: list[Document]) -> bool:
        chunks = self._chunker.split(docs, self._skipped)
        keys = [context_key(c.text, **self._parts) for c in chunks]
        return self._put(_Window(chunks, keys, len(docs), sum(d.nbytes for d in docs)))

    def _run(self) -> None:
        try:
            group: list[Document] = []
            chars = 0
            for doc in self._docs:
                if self._stop.is_set():
                    return
                group.append(doc)
                chars += len(doc.text)
                if chars >= self._window_chars or len(group) >= self._window_docs:
                    if not self._emit(group):
                        return
                    group, chars = [], 0
            if group and not self._emit(group):
                return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consuming thread
            self._put(exc)

    def __iter__(self) -> Iterator[_Window]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


# ---------------------------------------------------------------------------------- build
def open_store(store: ContextStore | str | os.PathLike, size_limit: int | None = None) -> ContextStore:
    """``store`` itself, or a :class:`ContextStore` opened at that folder (``size_limit=None`` keeps the saved one)."""
    return store if isinstance(store, ContextStore) else ContextStore(store, size_limit=size_limit)


def build_cache(
    source: str | os.PathLike | Iterable[Document],
    store: ContextStore | str | os.PathLike,
    compressor: "Compressor",
    *,
    text_field: str | None = None,
    id_field: str = "id",
    chunk_tokens: int = 512,
    overlap: int = 0,
    batch_size: int | None = None,
    map_path: str | os.PathLike | None = None,
    limit: int | None = None,
    window_chunks: int | None = None,
    writer_threads: int | None = None,
    progress: bool = True,
    size_limit: int | None = None,
    merge_lora: bool = True,
    compile: bool = False,
    anchors: int = DEFAULT_ANCHORS,
    follow_symlinks: bool = False,
    anchor_workers: int = 0,
    keep_short: bool = True,
    fused_kernels: bool = False,
) -> BuildSummary:
    """Compress a corpus into a store; resumable, see the module docstring.

    Args:
        source: a JSONL file, a ``.txt``/``.md`` file, a folder of them, or an iterable of
            :class:`~compressor_plugin.caching.chunking.Document`.
        store: a :class:`ContextStore` or its folder.
        compressor: the compressor (its device and dtype are used as they are).
        text_field, id_field: JSONL fields (see :func:`~compressor_plugin.caching.chunking.iter_documents`).
        chunk_tokens: most tokens per chunk; at most the compressor's ``max_length``.
        overlap: tokens shared by consecutive chunks of a document.
        batch_size: chunks per encoder forward (default 32 on CPU, 256 on GPU).
        map_path: write the chunk map (JSONL) here; appended to when it exists.
        limit: read at most this many documents.
        window_chunks: chunks prepared, looked up and sorted together (default ``16 * batch_size``,
            at least 512). Larger windows pad less; the chunk map is written once per window.
        writer_threads: threads that serialise and store contexts (default 1 on CPU, 4 on GPU).
        progress: show a tqdm progress bar (chunks/s and an ETA estimated from input bytes).
        size_limit: when ``store`` is a folder, the store's size limit in bytes (None keeps
            the one saved in the folder; 4 GiB for a new store).
        merge_lora, compile: run the encoder inside :meth:`Compressor.fast_encoder` with these
            settings (LoRA folded into the weights, blocks compiled with ``torch.compile``).
            The compressor's lock is held for the whole build: no decoding on this compressor
            in other threads meanwhile.
        anchors: anchor token budget per chunk (:mod:`compressor_plugin.anchors`; default
            :data:`~compressor_plugin.anchors.DEFAULT_ANCHORS`, the engine's; 0: none). Part of
            every key: use the budget the application's engine uses.
        follow_symlinks: read symlinked files of a ``source`` folder whose target lies outside
            it (by default they are skipped and counted as ``outside_input``).
        anchor_workers: processes that choose anchors beside the encoder (:class:`~compressor_plugin.anchors.AnchorPool`;
            0, the default: the main process does). The stored contexts are the same either way.
            On a GPU host with cores to spare, choosing anchors in the main process is the limit:
            on a 16-core H200 host 8 workers took a 10,000-chunk build from 290 to 481-521
            chunks/s (:func:`default_anchor_workers` gives the number the CLI uses). The workers
            are spawned, so a script needs an ``if __name__ == "__main__":`` guard.
        keep_short: the short-chunk rule of the engine's ``mark``
            (:func:`~compressor_plugin.engine.stays_text`): a chunk not longer than its
            compressed form (k plus ``anchors``) plus a small margin is neither compressed nor
            stored; its chunk-map row has ``"key": null`` and the chunk's ``text``, to be put into
            prompts as it is (compressed, it would take as many prompt positions and lose its
            exact words). Counted as ``kept_as_text``. False compresses every chunk.
        fused_kernels: swap the model's RMSNorm, rotary and MLP kernels for Liger's fused Triton
            kernels first (CUDA, :func:`~compressor_plugin.training.kernels.apply_fused_kernels`).
            The swap is not undone: it changes the model in this process (and the kernels of its
            model family), so use it in a process that builds caches, not beside an engine.

    Returns:
        A :class:`BuildSummary`. A Ctrl-C ends the build early with ``interrupted=True``
        after the batches already compressed are stored.
    """
    max_len = int(compressor.config.max_length)
    if fused_kernels:
        from ..training.kernels import apply_fused_kernels

        apply_fused_kernels(compressor.peft_model)
    if not 1 <= int(chunk_tokens) <= max_len:
        raise ValueError(f"chunk_tokens must be between 1 and the compressor's max_length ({max_len}), "
                         f"not {chunk_tokens}")
    device = compressor.device
    batch_size = int(batch_size or default_batch_size(device))
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    writer_threads = int(writer_threads or (4 if device.type == "cuda" else 1))
    window_chunks = int(window_chunks or max(512, 16 * batch_size))
    st = open_store(store, size_limit)
    chunker = TokenChunker(compressor.tokenizer, chunk_tokens, overlap)
    from ..anchors import check_budget

    anchors = check_budget(anchors)
    parts = key_parts(compressor, anchors)

    def short(chunk: Chunk) -> bool:
        return keep_short and stays_text(compressor.tokenizer, chunk.text, chunk.n_tokens, compressor.k, anchors)

    skipped: Counter = Counter()
    summary = BuildSummary(store=str(st.directory), map=str(map_path) if map_path else None, device=str(device),
                           dtype=parts["dtype"], k=compressor.k, mode=compressor.mode, chunk_tokens=int(chunk_tokens),
                           overlap=int(overlap), batch_size=batch_size, anchors=anchors)
    if isinstance(source, (str, os.PathLike)):
        total_bytes = total_input_bytes(input_files(source, follow_symlinks=follow_symlinks)[1])
        documents: Iterator[Document] = iter_documents(source, text_field=text_field, id_field=id_field,
                                                       skipped=skipped, limit=limit,
                                                       follow_symlinks=follow_symlinks)
    else:
        total_bytes = 0
        documents = iter(source) if limit is None else _take(source, limit)
    start_bytes = st.stats()["bytes"]
    t0 = time.perf_counter()
    map_writer = ChunkMapWriter(map_path) if map_path else None
    if int(anchor_workers) < 0:
        raise ValueError(f"anchor_workers must be 0 or more, not {anchor_workers}")
    pool = AnchorPool(compressor.tokenizer, int(anchor_workers)) if anchors and anchor_workers else None
    summary.anchor_workers = int(anchor_workers) if pool is not None else 0
    reader = _WindowReader(documents, chunker, parts, window_chunks, skipped)
    writers = cf.ThreadPoolExecutor(max_workers=writer_threads, thread_name_prefix="cache-build-writer")
    mapper = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-build-map")
    inflight = threading.BoundedSemaphore(2 * writer_threads + 1)
    pending: set[str] = set()
    pending_lock = threading.Lock()
    errors: list[BaseException] = []
    size_warned = False
    bar = _progress_bar(progress)
    was_training = compressor.peft_model.training
    compressor.peft_model.eval()
    fast = contextlib.ExitStack()
    fast.enter_context(compressor.fast_encoder(merge=merge_lora, compile=compile))

    def write_batch(keys: list[str], ctxs: list[CompressedContext], texts: list[str]) -> int:
        try:
            st.put_many(zip(keys, ctxs, texts))  # one database transaction per batch
            with pending_lock:
                pending.difference_update(keys)
            return sum(ctx.nbytes for ctx in ctxs)
        except BaseException as exc:
            errors.append(exc)
            raise
        finally:
            inflight.release()

    def write_map(rows: list[tuple[dict[str, Any], str]], futures: list[tuple[cf.Future, list[str]]]) -> int:
        failed: set[str] = set()
        for fut, keys in futures:
            if fut.exception() is not None:
                failed.update(keys)
        return map_writer.write(r for r, key in rows if key not in failed) if map_writer else 0

    map_futures: list[cf.Future] = []
    bytes_done = 0
    try:
        for window in reader:
            if errors:
                raise errors[0]
            summary.documents += window.documents
            todo: list[int] = []
            first: set[str] = set()
            kept: set[int] = set()  # chunks kept as text (the short-chunk rule)
            for i, (chunk, key) in enumerate(zip(window.chunks, window.keys)):
                if short(chunk):
                    kept.add(i)
                    summary.text_tokens += chunk.n_tokens
                elif key not in first:
                    with pending_lock:
                        queued = key in pending
                    if not queued and key not in st:
                        first.add(key)
                        todo.append(i)
                        continue
                summary.source_tokens += chunk.n_tokens  # counted now if stored, else once compressed
            summary.kept_as_text += len(kept)
            summary.already_stored += len(window.chunks) - len(todo) - len(kept)
            summary.chunks += len(window.chunks) - len(todo)
            bytes_done += window.nbytes
            _update_total(bar, summary, bytes_done, total_bytes, limit)
            if bar is not None:
                bar.update(len(window.chunks) - len(todo))
            todo.sort(key=lambda i: -window.chunks[i].n_tokens)
            batch_futures: list[tuple[cf.Future, list[str]]] = []
            starts = range(0, len(todo), batch_size)
            chosen = [pool.submit_ids([window.chunks[i].ids for i in todo[s: s + batch_size]], anchors) for s in starts] if pool else []
            for b, s in enumerate(starts):
                idx = todo[s: s + batch_size]
                ctxs = encode_contexts(compressor, [window.chunks[i].ids for i in idx], anchors,
                                       AnchorPool.result(chosen[b]) if pool else None)
                keys = [window.keys[i] for i in idx]
                with pending_lock:
                    pending.update(keys)
                inflight.acquire()
                if errors:
                    inflight.release()
                    raise errors[0]
                fut = writers.submit(write_batch, keys, ctxs, [window.chunks[i].text for i in idx])
                batch_futures.append((fut, keys))
                summary.new += len(idx)
                summary.chunks += len(idx)
                summary.source_tokens += sum(window.chunks[i].n_tokens for i in idx)
                summary.stored_bytes += sum(c.nbytes for c in ctxs)
                summary.anchor_tokens += sum(c.anchor_count for c in ctxs)
                if bar is not None:
                    bar.update(len(idx))
                    bar.set_postfix(new=summary.new, stored=summary.already_stored, skipped=sum(skipped.values()),
                                    refresh=False)
            if map_writer is not None:
                rows = [(map_row(c, None if i in kept else key), key)
                        for i, (c, key) in enumerate(zip(window.chunks, window.keys))]
                map_futures.append(mapper.submit(write_map, rows, batch_futures))
            if not size_warned and start_bytes + summary.stored_bytes > 0.9 * st.size_limit:
                size_warned = True
                msg = (f"the store is close to its size limit ({_human(st.size_limit)}): older entries are being "
                       f"evicted. Rebuild with a larger limit (--size-limit / size_limit=)")
                logger.warning(msg)
                summary.warnings.append(msg)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        reader.close()
        if pool is not None:
            pool.close()
        writers.shutdown(wait=True)
        mapper.shutdown(wait=True)
        fast.close()
        compressor.peft_model.train(was_training)
        if bar is not None:
            bar.close()
        if map_writer is not None:
            map_writer.close()
            summary.map_rows = map_writer.rows_written
    failed = sum(1 for f in map_futures if f.exception() is not None)
    if errors:
        summary.warnings.append(f"storing failed: {errors[0]!r}")
        raise RuntimeError(f"writing to the store failed ({errors[0]}); chunks stored before the failure are kept, "
                           "run the build again to resume") from errors[0]
    if failed:  # pragma: no cover - only on a disk error in the map thread
        raise RuntimeError(f"writing the chunk map failed: {next(f.exception() for f in map_futures if f.exception())}")
    finish_summary(summary, skipped, k=compressor.k, t0=t0, store=st, close=st is not store, warn_size=not size_warned)
    return summary


def finish_summary(summary: BuildSummary, skipped: Counter, *, k: int, t0: float, store: ContextStore, close: bool,
                   warn_size: bool = True) -> None:
    """Fill the closing fields of a build summary from the store (and close it if we opened it)."""
    summary.skipped = {key: v for key, v in sorted(skipped.items()) if v}
    # anchor tokens: exact for the chunks compressed now, the budget (an upper bound) for stored ones;
    # a chunk kept as text takes its own tokens
    summary.compressed_tokens = ((summary.chunks - summary.kept_as_text) * k + summary.anchor_tokens
                                 + summary.already_stored * summary.anchors + summary.text_tokens)
    summary.seconds = time.perf_counter() - t0
    stats = store.stats()
    if close:
        store.close()
    summary.store_entries, summary.store_bytes = stats["entries"], stats["bytes"]
    if warn_size and stats["bytes"] > 0.9 * stats["size_limit"]:
        summary.warnings.append(f"the store is close to its size limit ({_human(stats['size_limit'])}); raise it "
                                "(--size-limit / size_limit=) before adding more")


def _take(items: Iterable[Document], n: int) -> Iterator[Document]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def _progress_bar(enabled: bool) -> Any:
    if not enabled:
        return None
    import sys

    from tqdm.auto import tqdm

    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    # In a log file, one update every 30 s instead of ten a second.
    return tqdm(total=None, unit="chunk", desc="cache build", dynamic_ncols=True, smoothing=0.1,
                mininterval=0.1 if tty else 30.0)


def _update_total(bar: Any, summary: BuildSummary, bytes_done: int, total_bytes: int, limit: int | None) -> None:
    """Estimate the total chunk count from the input read so far (bytes, or documents with a limit)."""
    if bar is None or not summary.chunks:
        return
    estimates = []
    if limit:
        estimates.append(summary.chunks / max(summary.documents, 1) * limit)
    if total_bytes and bytes_done:
        estimates.append(summary.chunks / bytes_done * total_bytes)
    if estimates:
        bar.total = max(int(round(min(estimates))), summary.chunks)
        bar.refresh()


# ---------------------------------------------------------------------------------- benchmark
def flop_terms(compressor: "Compressor") -> tuple[int, int, int]:
    """``(N, L, d_attn)`` of :func:`encoder_flops`."""
    from ..compressor import causal_lm_of

    lm = causal_lm_of(compressor.peft_model)
    emb = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings()
    skip = {id(emb)} | ({id(head.weight)} if head is not None else set())
    n = sum(p.numel() for p in compressor.peft_model.parameters() if id(p) not in skip)
    cfg = lm.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return int(n), int(cfg.num_hidden_layers), heads * head_dim


def encoder_flops(compressor: "Compressor", tokens: int) -> float:
    """Forward FLOPs of the encoder on one sequence of ``tokens`` positions (text + k memory).

    ``2 * N * T + 4 * L * d_attn * T**2`` (the PaLM convention, no discount for causal
    masking): ``N`` is the number of parameters applied to every position (all weights of the
    transformer body, LoRA included, except the token-embedding table, which is a lookup; the
    LM head is not run), ``L`` the number of layers and ``d_attn = heads * head_dim``; the
    second term counts ``Q K^T`` and ``attention @ V``. For SmolLM2-135M (N ~ 106 M without
    the embedding table, L = 30, d_attn = 576) and T = 512 + 16 that is ~131 GFLOP per chunk.
    """
    n, layers, d_attn = flop_terms(compressor)
    return 2.0 * n * tokens + 4.0 * layers * d_attn * tokens ** 2


def benchmark(
    n_chunks: int = 1024,
    chunk_tokens: int = 512,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    k: int = 16,
    mode: str = "kv",
    peak_tflops: float = H200_BF16_PEAK_TFLOPS,
    warmup: int = 1,
    serialize: bool = True,
    compressor: "Compressor | None" = None,
    seed: int = 0,
    merge_lora: bool = True,
    compile: bool = False,
    fused_kernels: bool = False,
) -> dict[str, Any]:
    """Throughput of the cache-building hot path on the default model (untrained compressor).

    Encodes ``n_chunks`` random chunks of exactly ``chunk_tokens`` tokens in batches of
    ``batch_size`` with :func:`encode_contexts` (forward + one copy to the CPU per batch) inside
    :meth:`Compressor.fast_encoder` (``merge_lora``, ``compile``, as :func:`build_cache` runs
    it; ``fused_kernels`` as there, not undone afterwards), after ``warmup`` untimed batches,
    and optionally times :meth:`CompressedContext.to_bytes` (the per-chunk serialisation the
    store writers do).

    FLOPs per chunk: :func:`encoder_flops` with ``T = chunk_tokens + k``.

    Returns:
        ``chunks_per_s``, ``tokens_per_s``, ``tflops`` (achieved), ``mfu`` (``tflops / peak_tflops``),
        ``gflops_per_chunk``, ``seconds``, ``serialize_chunks_per_s`` / ``serialize_mb_per_s``
        (one thread), ``bytes_per_chunk``, and the settings (device, dtype, params, ...).
    """
    from ..compressor import Compressor, CompressorConfig
    from ..models import load_base_model

    if compressor is None:
        base = load_base_model(device=device, dtype=dtype)
        compressor = Compressor(base, CompressorConfig(k=k, mode=mode, max_length=max(512, chunk_tokens)))
        compressor.to(base.device)
    if fused_kernels:
        from ..training.kernels import apply_fused_kernels

        apply_fused_kernels(compressor.peft_model)
    dev = compressor.device
    batch_size = int(batch_size or default_batch_size(dev))
    vocab = int(compressor.base.model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, vocab - 1), vocab, (n_chunks, chunk_tokens), generator=gen).tolist()
    compressor.peft_model.eval()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with compressor.fast_encoder(merge=merge_lora, compile=compile):
        for _ in range(max(0, warmup)):
            encode_contexts(compressor, ids[:batch_size])
        sync()
        t0 = time.perf_counter()
        ctxs: list[CompressedContext] = []
        for s in range(0, n_chunks, batch_size):
            made = encode_contexts(compressor, ids[s: s + batch_size])
            if serialize and not ctxs:
                ctxs = made[: min(len(made), 64)]
        sync()
    seconds = time.perf_counter() - t0
    tokens = chunk_tokens + compressor.k
    flops = encoder_flops(compressor, tokens)
    tflops = flops * n_chunks / seconds / 1e12
    out: dict[str, Any] = {
        "device": str(dev), "dtype": str(compressor.base.dtype), "n_chunks": n_chunks, "chunk_tokens": chunk_tokens,
        "k": compressor.k, "mode": compressor.mode, "batch_size": batch_size, "merge_lora": merge_lora,
        "compile": compile, "fused_kernels": fused_kernels, "params_per_position": flop_terms(compressor)[0],
        "seconds": round(seconds, 4), "chunks_per_s": round(n_chunks / seconds, 2),
        "tokens_per_s": round(n_chunks * tokens / seconds, 1), "gflops_per_chunk": round(flops / 1e9, 3),
        "tflops": float(f"{tflops:.5g}"), "peak_tflops": peak_tflops, "mfu": float(f"{tflops / peak_tflops:.5g}"),
        "flops_formula": "2*N*T + 4*L*d_attn*T^2, T = chunk_tokens + k",
    }
    if serialize and ctxs:
        t1 = time.perf_counter()
        sizes = [len(c.to_bytes()) for c in ctxs]
        ser = time.perf_counter() - t1
        out.update(serialize_chunks_per_s=round(len(ctxs) / ser, 1),
                   serialize_mb_per_s=round(sum(sizes) / ser / 1e6, 1), bytes_per_chunk=sizes[0])
    return out
