"""Writer processes for ``cache build``: entries encoded and written outside the calling process.

Storing a compressed chunk means checking its tensors, hashing them, serialising them and
writing a file (about 0.6-1 ms per k=16 chunk of the default model on one core). In writer
threads the parts that hold the interpreter lock share it with the encoder's launches and
everything else in the process, so more threads stop helping after a few hundred chunks/s.
A :class:`WriterPool` does that work in processes of its own: each opens the store's two
databases itself, receives a batch's tensors through a block of shared memory (its small
header fields are pickled) and writes the batch in one transaction per database, exactly as
:meth:`ContextStore.put_many <compressor_plugin.store.ContextStore.put_many>` does (both
encode through :func:`compressor_plugin.store_format.encode_entries`). The workers import
neither torch nor transformers, so they start in a fraction of a second.

Like any ``spawn`` pool it needs scripts to guard their entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import threading
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Any, Iterable

from .. import errors, store_format

if TYPE_CHECKING:  # pragma: no cover
    from ..context import CompressedContext
    from ..store import ContextStore

#: In a worker: the store's context and text databases and the entries' lifetime.
_WORKER: tuple[Any, Any, float | None] | None = None
#: Errors a worker's failure is raised as in the calling process (others become RuntimeError).
_ERRORS = {cls.__name__: cls for cls in (ValueError, TypeError, errors.StoreWriteError, errors.StoreReadOnlyError,
                                          errors.ValueTooLargeError, errors.StoreError)}


def _init_worker(spec: tuple[tuple[Any, dict], tuple[Any, dict], float | None]) -> None:
    global _WORKER
    from ..store_backend import SafeCache

    (ctx_dir, ctx_settings), (text_dir, text_settings), expire = spec
    _WORKER = (SafeCache(ctx_dir, **ctx_settings), SafeCache(text_dir, **text_settings), expire)


def _write_task(block: str, rows: list[tuple]) -> tuple[str, Any]:
    """Encode and store ``rows`` whose tensors lie in shared memory ``block``; ``("ok", bytes
    written)`` or ``(error class name, message)``."""
    assert _WORKER is not None
    contexts, texts, expire = _WORKER
    shm = shared_memory.SharedMemory(name=block)
    try:
        status, value = _encode_rows(shm.buf, rows)
    finally:
        shm.close()  # every view of the block is gone with _encode_rows' frame
    if status != "ok":
        return status, value
    text_rows, blobs = value
    try:
        if text_rows:
            texts.set_many(text_rows, expire=expire)
        if blobs:
            contexts.set_many(blobs, expire=expire)
    except Exception as exc:  # noqa: BLE001 - handed back to the calling process, which raises it
        return type(exc).__name__, str(exc)
    return "ok", sum(len(b) for _, b in blobs)


def _encode_rows(view: memoryview, rows: list[tuple]) -> tuple[str, Any]:
    """:func:`~compressor_plugin.store_format.encode_entries` of ``rows`` over ``view``; the
    error as ``(class name, message)``, so no traceback keeps a view of the block alive."""
    try:
        entries = [store_format.Entry(key, {name: store_format.RawTensor(dtype, tuple(shape), view[at: at + size])
                                            for name, (dtype, shape, at, size) in specs.items()}, *fields, text)
                   for key, specs, fields, text in rows]
        return "ok", store_format.encode_entries(entries)
    except Exception as exc:  # noqa: BLE001
        return type(exc).__name__, str(exc)


class WriterPool:
    """Processes that store entries in the folder of ``store`` (not in its remote tier).

    :meth:`put_many` has the semantics of :meth:`ContextStore.put_many
    <compressor_plugin.store.ContextStore.put_many>` and blocks until the batch is written;
    call it from several threads to keep several processes busy. Use the pool as a context
    manager or call :meth:`close`.

    Args:
        store: an open, writable store without a remote tier.
        processes: worker processes to start (at least 1).

    Raises:
        ValueError: ``processes`` below 1, or a store with a remote tier (its writes need the
            calling process: use writer threads).
        StoreReadOnlyError: the store is read-only.
    """

    def __init__(self, store: "ContextStore", processes: int):
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ValueError(f"a writer pool needs at least 1 process, not {processes!r}")
        if store.remote is not None:
            raise ValueError("writer processes write the store's folder only; a store with a remote tier needs "
                             "writer threads (writer_processes=0)")
        store._check_writable()
        self.store = store
        self.processes = processes
        spec = (store._cache_settings["contexts"], store._cache_settings["texts"], store.expire)
        self._pool = cf.ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("spawn"),
                                            initializer=_init_worker, initargs=(spec,))
        self._free: list[shared_memory.SharedMemory] = []
        self._blocks: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()
        self._closed = False

    def _block(self, size: int) -> shared_memory.SharedMemory:
        with self._lock:
            if self._closed:
                raise RuntimeError("the writer pool is closed")
            for i, block in enumerate(self._free):
                if block.size >= size:
                    return self._free.pop(i)
        block = shared_memory.SharedMemory(create=True, size=max(size, 1))
        with self._lock:
            self._blocks.append(block)
        return block

    def put_many(self, items: Iterable[tuple[str, "CompressedContext", str | None]]) -> int:
        """Store ``(key, context, text-or-None)`` entries; returns the context bytes written.

        The header fields are checked here, the tensors and the keys of the texts in the worker;
        nothing of the batch is written if any entry is invalid.

        Raises:
            as :meth:`ContextStore.put_many <compressor_plugin.store.ContextStore.put_many>`.
        """
        from ..store import _check_key, _entry

        entries = []
        for key, ctx, text in items:
            _check_key(key)
            entries.append(_entry(key, ctx, text))
        if not entries:
            return 0
        size = sum(memoryview(t.data).nbytes for e in entries for t in e.tensors.values())
        block = self._block(size)
        try:
            rows, at = [], 0
            for e in entries:
                specs = {}
                for name, t in e.tensors.items():
                    n = memoryview(t.data).nbytes
                    block.buf[at: at + n] = memoryview(t.data).cast("B")
                    specs[name] = (t.dtype, list(t.shape), at, n)
                    at += n
                rows.append((e.key, specs, (e.mode, e.k, e.source_tokens, e.base_fingerprint,
                                            e.compressor_fingerprint, dict(e.extra)), e.text))
            status, value = self._pool.submit(_write_task, block.name, rows).result()
        finally:
            with self._lock:
                self._free.append(block)
        if status != "ok":
            raise _ERRORS.get(status, RuntimeError)(value if status in _ERRORS else f"{status}: {value}")
        return int(value)

    def close(self) -> None:
        """Stop the workers and free the shared memory."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        for block in self._blocks:
            block.close()
            block.unlink()
        self._blocks.clear()
        self._free.clear()

    def __enter__(self) -> "WriterPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
