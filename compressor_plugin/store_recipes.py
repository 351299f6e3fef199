"""Recipes over a :class:`~compressor_plugin.store.ContextStore`: what is built on storing, not storing itself.

* :func:`get_or_compress` - look chunks up, compress only the misses, store them;
* :class:`ByteNamespace` - a namespace of raw bytes beside the contexts (the LangChain
  ``ByteStore`` view, :mod:`compressor_plugin.integrations.langchain_store`);
* maintenance: :func:`store_stats`, :func:`verify_store`, :func:`merge_stores`.

Each uses only the store's public reads and writes plus its two caches, so it works the same
on a store with or without a remote tier. ``ContextStore`` keeps methods of the same names
that delegate here.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

from .context import CompressedContext, contexts_to
from .store import (
    _BYTES,
    _CTX,
    _KEY_RE,
    _TEXT,
    EVICTION_POLICY,
    STORE_FORMAT_VERSION,
    ContextStore,
    StoreResult,
    check_anchor_ids,
    context_key,
    decode_context,
    decode_text,
    expected_fields,
    normalize_text,
)
from .store_backend import FOREIGN_KEY, RefusedValue, StoreReadOnlyError, ValueTooLargeError

if TYPE_CHECKING:  # pragma: no cover
    from .compressor import Compressor

logger = logging.getLogger("compressor_plugin.store")


# ---------------------------------------------------------------------------------- compute on miss
def get_or_compress(
    store: ContextStore,
    texts: Sequence[str],
    compressor: "Compressor",
    *,
    batch_size: int = 16,
    truncate: bool = False,
    progress: bool = False,
    device: torch.device | str | None = None,
    anchors: int = 0,
) -> list[StoreResult]:
    """Contexts of ``texts`` from ``store``, compressing (and storing) only the misses.

    Texts are normalised (:func:`~compressor_plugin.store.normalize_text`) before hashing and
    compressing; the same text twice in one call is compressed once. Misses are compressed in
    batches of ``batch_size`` (sorted by length) and stored after each batch, so an
    interrupted call keeps its finished work. A store that cannot be written (read-only, disk
    full) is logged once per call and the contexts are still returned.

    Args:
        texts: chunk texts (non-empty after normalisation).
        compressor: the compressor whose contexts are wanted.
        truncate: passed to :meth:`Compressor.compress`.
        progress: show a progress bar over the misses.
        device: where returned contexts live; default the compressor's device.
        anchors: anchor token budget per chunk (:mod:`compressor_plugin.anchors`; 0: none).
            Part of every key, so entries made with another budget are never returned. A
            stored entry whose anchor ids lie outside the compressor's vocabulary is removed
            and compressed again.

    Returns:
        one :class:`StoreResult` per input text, in input order.

    Raises:
        CompressorError: a text is not a string or is empty; ContextTooLongError as
            :meth:`Compressor.compress` raises it (the message names the input position).
    """
    from .compressor import CompressorError

    if isinstance(texts, str):
        raise CompressorError("pass a list of texts, not a single string")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size!r}")
    norm: list[str] = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise CompressorError(f"text {i} is {type(t).__name__}, not str")
        n = normalize_text(t)
        if not n:
            raise CompressorError(f"text {i} is empty; there is nothing to compress")
        norm.append(n)
    target = torch.device(device) if device is not None else compressor.device
    expect = expected_fields(compressor, anchors)  # the key fields and the tensor shape
    parts = {name: value for name, value in expect.items() if name != "shape"}
    keys = [context_key(n, **parts) for n in norm]
    vocab = compressor.base.vocab_size
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    found: dict[str, CompressedContext] = {}
    hits: set[str] = set()
    # an intact entry that is not what this compressor makes (planted, copied) is removed and recomputed
    for key, ctx in zip(first, store.get_many(list(first), expect=expect)):
        if ctx is not None and ctx.anchor_ids is not None:
            try:
                check_anchor_ids(ctx.anchor_ids, vocab)
            except ValueError as exc:
                store._discard(store._kv, _CTX + key, str(exc))
                ctx = None
        if ctx is not None:
            found[key] = ctx
            hits.add(key)
    misses = sorted((k for k in first if k not in found), key=lambda k: len(norm[first[k]]))
    bar = None
    if progress and misses:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(misses), desc=f"compress k={compressor.k}", unit="chunk")
    write_failed = store.read_only
    try:
        for s in range(0, len(misses), batch_size):
            batch = misses[s: s + batch_size]
            try:
                made = compressor.compress([norm[first[k]] for k in batch], batch_size=batch_size,
                                           truncate=truncate, progress=False, anchors=anchors)
            except CompressorError as exc:
                renamed = _reindex_error(exc, [first[k] for k in batch])
                if renamed is exc:
                    raise
                raise renamed from None
            for key, ctx in zip(batch, made):
                found[key] = ctx
            if not write_failed:
                try:
                    store.put_many([(key, found[key], norm[first[key]]) for key in batch])
                except (OSError, sqlite3.Error) as exc:
                    write_failed = True
                    logger.warning("could not write to store %s (%s); continuing without caching",
                                   store.directory, exc)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    found = dict(zip(found, contexts_to(list(found.values()), target)))  # one host-to-device copy for all
    return [StoreResult(key, found[key], key in hits) for key in keys]


def _reindex_error(exc: Exception, positions: list[int]) -> Exception:
    """The same error with 'text j' (position in a batch) replaced by the input position."""
    m = re.match(r"text (\d+)", str(exc))
    if not m or int(m.group(1)) >= len(positions):
        return exc
    return type(exc)(f"text {positions[int(m.group(1))]}{str(exc)[m.end():]}")


# ---------------------------------------------------------------------------------- byte namespace
class ByteNamespace:
    """Raw ``bytes`` values under string names, in a namespace of a store apart from its contexts.

    Entries share the context cache's size limit and least-recently-used eviction, are bytes
    only (never pickled) and stay in the local folder (they are not sent to a remote tier). A
    value larger than the store's size limit (or its largest value) is refused with
    :class:`~compressor_plugin.store.ValueTooLargeError` instead of evicting the store.
    """

    def __init__(self, store: ContextStore):
        self.store = store

    def get(self, name: str) -> bytes | None:
        """The bytes stored under ``name``, or None."""
        full = _BYTES + _check_name(name)
        data = self.store._raw_get(self.store._kv, full)
        if isinstance(data, RefusedValue):
            self.store._discard(self.store._kv, full, data.reason)
            return None
        return data

    def put(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``.

        Raises:
            TypeError: ``data`` is not bytes-like, or ``name`` is not a str.
            ValueTooLargeError: ``data`` is larger than the store accepts.
            StoreReadOnlyError / StoreWriteError: as :meth:`ContextStore.put`.
        """
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise TypeError(f"values must be bytes, not {type(data).__name__}")
        full = _BYTES + _check_name(name)
        self.store._check_writable()
        limit = min(self.store._kv.max_value_size, self.store.size_limit)
        if len(data) > limit:
            raise ValueTooLargeError(
                f"value for {name!r} is {len(data)} bytes; store {self.store.directory} takes byte values of at "
                f"most {limit} bytes (size limit {self.store.size_limit}); storing it would evict the store's "
                f"contexts")
        self.store._kv.set_many([(full, data)], expire=self.store.expire)

    def delete(self, name: str) -> bool:
        """Remove ``name``; True if it was there."""
        self.store._check_writable()
        return bool(self.store._kv.delete(_BYTES + _check_name(name)))

    def keys(self, prefix: str | None = None) -> Iterator[str]:
        """Names of the entries, optionally only those starting with ``prefix``."""
        start = _BYTES + (prefix or "")
        for name in self.store._kv.iterkeys():
            if isinstance(name, str) and name.startswith(start):
                yield name[len(_BYTES):]


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"keys must be str, not {type(name).__name__}")
    return name


# ---------------------------------------------------------------------------------- maintenance
def store_stats(store: ContextStore) -> dict[str, Any]:
    """Counts and sizes of a store.

    Keys: ``entries`` (contexts), ``byte_entries``, ``text_entries``, ``bytes`` (disk use of
    both caches, values plus SQLite pages), ``size_limit``, ``text_size_limit``,
    ``hits``/``misses``/``removed`` (context lookups by this object), ``eviction_policy``,
    ``expire``, ``format_version``, ``read_only``, ``remote``, ``directory``, and
    ``memory_entries`` / ``memory_bytes`` / ``memory_limit`` (verified contexts this object keeps
    in its process).
    """
    entries = byte_entries = 0
    for name in store._kv.iterkeys():
        if isinstance(name, str):
            entries += name.startswith(_CTX)
            byte_entries += name.startswith(_BYTES)
    with store._lock:
        hits, misses, removed = store._hits, store._misses, store._removed
    return {
        "directory": str(store.directory),
        "entries": entries,
        "byte_entries": byte_entries,
        "text_entries": len(store._text),
        "bytes": int(store._kv.volume() + store._text.volume()),
        "size_limit": store.size_limit,
        "text_size_limit": store.text_size_limit,
        "hits": hits,
        "misses": misses,
        "removed": removed,
        "eviction_policy": EVICTION_POLICY,
        "expire": store.expire,
        "format_version": STORE_FORMAT_VERSION,
        "read_only": store.read_only,
        "memory_entries": len(store._memory._items),
        "memory_bytes": store._memory.size,
        "memory_limit": store._memory.limit,
        "remote": str(store.remote) if store.remote is not None else None,
    }


_VERIFY_COUNTS = ("checked", "ok", "removed", "texts_checked", "texts_removed", "byte_entries", "byte_removed",
                  "foreign_removed", "foreign_left", "expired", "files_fixed", "errors")


def verify_store(store: ContextStore, *, fix_files: bool = True) -> dict[str, int]:
    """Check every entry of the folder; delete exactly the bad ones. Returns counts.

    Texts are checked first (checksum bound to their key, UTF-8), so a bad text is removed
    and never counts against its context. Contexts are then decoded and checked as
    :meth:`ContextStore.get` does, and where the chunk's (good) text is present the key is
    recomputed from the text and the context's fingerprints, k, mode and dtype. Byte entries
    must be bytes. Expired entries are removed. Verification does not count as a use for LRU
    eviction. A failure to delete (disk full) is counted in ``errors`` instead of raised; on a
    read-only store nothing is deleted (bad entries are counted as they would be removed).

    Args:
        fix_files: also remove value files no row refers to (left by a writer that was
            killed, or by a failed write) and rows whose file is missing or malformed. A
            write in progress in another process at that moment may be lost (it then reads as
            a miss).

    Returns:
        ``checked``, ``ok``, ``removed`` (contexts), ``texts_checked``, ``texts_removed``,
        ``byte_entries``, ``byte_removed``, ``foreign_removed`` (entries outside the store's
        namespaces), ``foreign_left`` (entries with pickled keys, which can only be removed
        with :meth:`ContextStore.clear`), ``expired``, ``files_fixed`` and ``errors``.
    """
    out = dict.fromkeys(_VERIFY_COUNTS, 0)
    writable = not store.read_only

    def discard(cache: Any, name: str, reason: str) -> None:
        if writable:
            try:
                logger.warning("removing bad store entry %s in %s: %s", name, cache.directory, reason)
                cache.delete(name)
            except (OSError, sqlite3.Error) as exc:
                logger.warning("could not remove %s: %s", name, exc)
                out["errors"] += 1

    if writable:
        for cache in (store._kv, store._text):
            try:
                out["expired"] += int(cache.expire())
                if fix_files:
                    fixed = cache.check(fix=True)
                    out["files_fixed"] += fixed["orphan_files"] + fixed["bad_rows"]
            except (OSError, sqlite3.Error) as exc:
                logger.warning("store %s: could not clean %s (%s)", store.directory, cache.directory, exc)
                out["errors"] += 1
    good_texts: dict[str, str] = {}
    for name in list(store._text.iterkeys()):
        if isinstance(name, str) and name.startswith(_TEXT) and _KEY_RE.fullmatch(name[len(_TEXT):]):
            out["texts_checked"] += 1
            data = store._text.get(name, default=None, touch=False)
            if data is None:
                continue
            try:
                good_texts[name[len(_TEXT):]] = decode_text(data, name[len(_TEXT):])
            except (ValueError, UnicodeDecodeError) as exc:
                discard(store._text, name, str(exc))
                out["texts_removed"] += 1
        elif name is FOREIGN_KEY:
            out["foreign_left"] += 1
        else:
            discard(store._text, name, "not an entry of this store")
            out["foreign_removed"] += 1
    for name in list(store._kv.iterkeys()):
        if isinstance(name, str) and name.startswith(_CTX) and _KEY_RE.fullmatch(name[len(_CTX):]):
            out["checked"] += 1
            key = name[len(_CTX):]
            data = store._kv.get(name, default=None, touch=False)
            if data is None:  # expired or removed meanwhile
                out["ok"] += 1
                continue
            try:
                ctx = decode_context(data, key)
            except Exception as exc:  # noqa: BLE001 - any failure to parse means a bad entry
                discard(store._kv, name, str(exc))
                out["removed"] += 1
                continue
            text = good_texts.get(key)
            if text is not None and _key_of(text, ctx) != key:
                # Both entries are intact, but they disagree: one of them was stored under the
                # wrong key and nothing tells which, so neither is kept.
                reason = ("the key does not match the chunk text and the context's model, compressor, k, mode "
                          "or dtype")
                discard(store._kv, name, reason)
                discard(store._text, _TEXT + key, reason)
                out["removed"] += 1
                out["texts_removed"] += 1
            else:
                out["ok"] += 1
        elif isinstance(name, str) and name.startswith(_BYTES):
            data = store._kv.get(name, default=None, touch=False)
            if isinstance(data, RefusedValue):
                discard(store._kv, name, data.reason)
                out["byte_removed"] += 1
            elif data is not None:
                out["byte_entries"] += 1
        elif name is FOREIGN_KEY:
            out["foreign_left"] += 1
        else:
            discard(store._kv, name, "not an entry of this store")
            out["foreign_removed"] += 1
    return out


def _key_of(text: str, ctx: CompressedContext) -> str:
    return context_key(text, base_fingerprint=ctx.base_fingerprint, compressor_fingerprint=ctx.compressor_fingerprint,
                       k=ctx.k, mode=ctx.mode, dtype=ctx.dtype)


def merge_stores(target: ContextStore, other: "ContextStore | str | os.PathLike", *,
                 overwrite: bool = False) -> dict[str, int]:
    """Copy the valid contexts (with their texts) and byte entries of ``other`` into ``target``.

    The way to combine stores built on several machines: build a local store per node, then
    merge them (each entry is verified on the way, so bad ones are not copied). A source
    folder is opened read-only. Merging still trusts the source for what cannot be checked:
    a context stored without its text is copied as it is.

    Returns:
        ``copied``, ``existing`` (skipped: already there and ``overwrite`` is False), ``bad``
        (unreadable in the source, a context row whose key is not a store key, or a context
        whose intact text gives another key, as :meth:`ContextStore.verify` removes both) and
        ``bytes_copied``.

    Raises:
        StoreReadOnlyError: ``target`` is read-only.
        ValueError: ``other`` is ``target``'s own folder.
    """
    if target.read_only:
        raise StoreReadOnlyError(f"cannot merge into {target.directory}: it is open read-only")
    src = other if isinstance(other, ContextStore) else ContextStore(other, size_limit=None, read_only=True)
    if src.directory.resolve() == target.directory.resolve():
        raise ValueError("cannot merge a store into itself")
    out = {"copied": 0, "existing": 0, "bad": 0, "bytes_copied": 0}
    try:
        for key in list(src.keys()):
            if not _KEY_RE.fullmatch(key):  # a planted row: src.get() would raise on its key
                out["bad"] += 1
                continue
            if not overwrite and key in target:
                out["existing"] += 1
                continue
            ctx = src.get(key)
            if ctx is None:
                out["bad"] += 1
                continue
            text = src.get_text(key)
            if text is not None and _key_of(text, ctx) != key:
                # an intact text and context that disagree with their key: verify() removes both, so
                # copying the context alone would hide the evidence in the target
                out["bad"] += 1
                continue
            target.put(key, ctx, text)
            out["copied"] += 1
        source_bytes, target_bytes = ByteNamespace(src), ByteNamespace(target)
        for name in list(source_bytes.keys()):
            if not overwrite and target_bytes.get(name) is not None:
                continue
            data = source_bytes.get(name)
            if data is not None:
                target_bytes.put(name, data)
                out["bytes_copied"] += 1
    finally:
        if src is not other:
            src.close()
    return out
