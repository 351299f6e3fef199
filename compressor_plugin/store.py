"""The on-disk store of compressed chunks.

A :class:`ContextStore` maps a content key (sha256 of everything that changes the compressed
K/V) to a :class:`~compressor_plugin.context.CompressedContext`, so each chunk is compressed
once and reused by every later query, by every process that opens the same folder.

Layout of a store folder::

    store.json     format marker (written once)
    contexts/      diskcache Cache: compressed contexts ("ctx:<key>") and raw byte entries
                   ("bytes:<name>", used by the LangChain ByteStore view); LRU-evicted
    texts/         diskcache Cache: the normalised text of each chunk ("text:<key>"), the
                   fallback used when a context is missing; evicted oldest-stored first

Safety: diskcache pickles values that are not bytes, and unpickling data read from a folder
other people can write runs their code (CVE-2025-69872). This store writes bytes only (the
safetensors bytes of :meth:`CompressedContext.to_bytes`, UTF-8 text) through
:class:`BytesOnlyDisk`, which refuses to store anything else and treats every value or key
stored in pickle form as corrupt without ever unpickling it.

Integrity: every read is verified (safetensors structure, format version, sha256 of the
tensor data, the key the entry was stored under). A bad entry is logged, deleted and
reported as a miss; it never raises. The digest is not a signature: whoever can write the
folder can still plant well-formed contexts with wrong numbers, so share a store only with
people you would share the model with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import diskcache
import torch
from diskcache.core import DBNAME, MODE_BINARY, MODE_RAW, UNKNOWN

from .context import FORMAT_VERSION as CONTEXT_FORMAT_VERSION
from .context import CompressedContext

if TYPE_CHECKING:  # pragma: no cover
    from .compressor import Compressor

logger = logging.getLogger(__name__)

#: Version of the key derivation and folder layout; part of every key.
STORE_FORMAT_VERSION = 1
#: Default size limit of the context cache (diskcache's own default is a silent 1 GB).
DEFAULT_SIZE_LIMIT = 4 * 2**30
#: Values at least this large are kept in their own file instead of inside SQLite.
DEFAULT_MIN_FILE_SIZE = 32 * 2**10
EVICTION_POLICY = "least-recently-used"

_CTX = "ctx:"
_TEXT = "text:"
_BYTES = "bytes:"
_KEY_FIELD = "store_key"  # recorded in CompressedContext.extra of every stored entry
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_MARKER_FILE = "store.json"
_MARKER_FORMAT = "compressor_plugin.ContextStore"


class StoreFormatError(ValueError):
    """The folder is not a store this version can open."""


# ---------------------------------------------------------------------------------- keys
def normalize_text(text: str) -> str:
    """The form of a chunk that is hashed and compressed: Unicode NFC, surrounding whitespace stripped."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    return unicodedata.normalize("NFC", text).strip()


def _dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical ``"torch.<name>"`` form of a dtype (``torch.float`` -> ``"torch.float32"``)."""
    if isinstance(dtype, torch.dtype):
        return str(dtype)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype[len("torch."):] if dtype.startswith("torch.") else dtype, None)
        if isinstance(resolved, torch.dtype):
            return str(resolved)
    raise ValueError(f"not a torch dtype: {dtype!r}")


def context_key(
    text: str,
    *,
    base_fingerprint: str,
    compressor_fingerprint: str,
    k: int,
    mode: str,
    dtype: torch.dtype | str,
) -> str:
    """The store key of a chunk: sha256 hex of a canonical JSON of everything that changes its K/V.

    The JSON holds the normalised text (:func:`normalize_text`), the base-model and compressor
    fingerprints, ``k``, ``mode``, the dtype name and the store and context format versions.
    It is independent of Python's ``hash()`` randomisation, so every process agrees on keys.
    """
    payload = {
        "base": str(base_fingerprint),
        "compressor": str(compressor_fingerprint),
        "context_format": CONTEXT_FORMAT_VERSION,
        "dtype": _dtype_name(dtype),
        "k": int(k),
        "mode": str(mode),
        "store_format": STORE_FORMAT_VERSION,
        "text": normalize_text(text),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _key_parts(compressor: "Compressor") -> dict[str, Any]:
    return {
        "base_fingerprint": compressor.base.fingerprint,
        "compressor_fingerprint": compressor.fingerprint,
        "k": compressor.k,
        "mode": compressor.mode,
        "dtype": str(compressor.base.dtype),
    }


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"a store key is 64 lowercase hex characters (ContextStore.key_for), got {key!r}")


# ---------------------------------------------------------------------------------- disk
class RefusedValue:
    """What :class:`BytesOnlyDisk` returns instead of a value it will not decode."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self) -> str:
        return f"RefusedValue({self.reason!r})"


#: Returned by :meth:`BytesOnlyDisk.get` for a key stored in pickle form (never unpickled).
FOREIGN_KEY = RefusedValue("key stored in pickle form")


class BytesOnlyDisk(diskcache.Disk):
    """A :class:`diskcache.Disk` that stores bytes values and plain keys only, and never unpickles.

    * ``store`` accepts ``bytes`` values only (raises ``TypeError`` for anything that
      diskcache would pickle, and for str, int and float values).
    * ``fetch`` returns bytes for values kept in SQLite or in a file; a value in pickle or
      text mode (which this class never writes, so it was planted or written by another
      program) comes back as a :class:`RefusedValue`, without ``pickle.load``.
    * ``put`` refuses keys diskcache would pickle; ``get`` returns :data:`FOREIGN_KEY` for a
      pickled key found while iterating, without unpickling it.
    """

    def __init__(self, directory: str, min_file_size: int = DEFAULT_MIN_FILE_SIZE, pickle_protocol: int = 0,
                 **_ignored: Any):
        super().__init__(directory, min_file_size=min_file_size, pickle_protocol=pickle_protocol)

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) not in (str, bytes, int, float):
            raise TypeError(f"store keys are str, not {type(key).__name__}")
        db_key, raw = super().put(key)
        if not raw:  # an int outside SQLite's range would be pickled
            raise TypeError(f"key {key!r} cannot be stored without pickling")
        return db_key, raw

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            return FOREIGN_KEY
        return super().get(key, raw)

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[int, int, str | None, Any]:
        if read or type(value) is not bytes:
            raise TypeError(f"the store keeps bytes only, not {type(value).__name__}")
        if len(value) < self.min_file_size:
            return super().store(value, read, key=key)
        # diskcache writes a bytes value by iterating over io.BytesIO, i.e. line by line: about
        # one write() call per 256 bytes of binary data. One write for the whole value instead.
        filename, full_path = self.filename(key, value)
        self._write(full_path, iter((value,)), "xb")
        return len(value), MODE_BINARY, filename, None

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if read:
            raise TypeError("file handles are not supported by this store")
        if mode == MODE_BINARY:
            return super().fetch(mode, filename, value, read)
        if mode == MODE_RAW:
            if isinstance(value, (bytes, memoryview)):
                return bytes(value)
            return RefusedValue(f"raw {type(value).__name__} value")
        return RefusedValue(f"value stored in diskcache mode {mode} (pickle or text), refused")


# ---------------------------------------------------------------------------------- store
@dataclass(frozen=True)
class StoreResult:
    """One chunk of a :meth:`ContextStore.get_or_compress` call.

    Attributes:
        key: the chunk's store key.
        context: its compressed context.
        hit: True if a valid entry was already in the store when the call started; chunks
            compressed by the call (and repeats of them in the same call) have ``hit=False``.
    """

    key: str
    context: CompressedContext
    hit: bool


def default_store_dir() -> Path:
    """``cache_home()/"store"``: where a store without an explicit directory lives."""
    from .models import cache_home

    return cache_home() / "store"


class ContextStore:
    """On-disk, multi-process store of compressed chunks, keyed by content.

    Args:
        directory: store folder; default ``cache_home()/"store"``
            (``$COMPRESSOR_PLUGIN_HOME/store`` or ``~/.cache/compressor_plugin/store``).
        size_limit: approximate bound, in bytes, on the context cache (values plus SQLite
            pages); least-recently-used entries are evicted as new ones are written. Default
            4 GiB (~5,800 k=16 contexts of the default model in fp32). The limit is saved in
            the folder; ``None`` keeps the saved one (4 GiB for a new store).
        expire: optional lifetime of entries, in seconds from when they were written.
        text_size_limit: bound on the chunk texts kept for fallback (default ``size_limit // 4``,
            at least 1 MiB; with ``size_limit=None`` the saved one); texts are evicted
            oldest-stored first, independently of their contexts.
        min_file_size: values at least this large get their own file; smaller ones live in SQLite.
        timeout: seconds to wait for another process's SQLite lock before giving up.

    Several threads and processes may use one folder at once (SQLite locking); the folder
    must be on a local filesystem, not NFS/SMB (see ``docs/store.md``).

    Example:
        >>> store = ContextStore("/tmp/chunks")                               # doctest: +SKIP
        >>> results = store.get_or_compress(["Paris is in France."], comp)    # doctest: +SKIP
        >>> store.get(results[0].key)                                         # doctest: +SKIP
        CompressedContext(mode='kv', k=16, ...)
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        *,
        size_limit: int | None = None,
        expire: float | None = None,
        text_size_limit: int | None = None,
        min_file_size: int = DEFAULT_MIN_FILE_SIZE,
        timeout: float = 60.0,
    ):
        for name, limit in (("size_limit", size_limit), ("text_size_limit", text_size_limit)):
            if limit is not None and int(limit) <= 0:
                raise ValueError(f"{name} must be a positive number of bytes")
        if expire is not None and float(expire) <= 0:
            raise ValueError("expire must be a positive number of seconds, or None")
        self._init_args = {"directory": directory, "size_limit": size_limit, "expire": expire,
                           "text_size_limit": text_size_limit, "min_file_size": min_file_size, "timeout": timeout}
        self.directory = Path(directory).expanduser() if directory is not None else default_store_dir()
        self.expire = float(expire) if expire is not None else None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._check_marker()
        common = {"timeout": timeout, "disk": BytesOnlyDisk, "disk_min_file_size": int(min_file_size),
                  "disk_pickle_protocol": 0, "cull_limit": 10, "tag_index": 0}
        kv_dir, text_dir = self.directory / "contexts", self.directory / "texts"
        kv_limits: dict[str, int] = {}
        if size_limit is not None or not (kv_dir / DBNAME).exists():
            kv_limits["size_limit"] = int(size_limit) if size_limit is not None else DEFAULT_SIZE_LIMIT
        self._kv = _open_cache(kv_dir, eviction_policy=EVICTION_POLICY, statistics=1, **kv_limits, **common)
        self.size_limit = int(self._kv.size_limit)
        text_limits: dict[str, int] = {}
        if text_size_limit is not None:
            text_limits["size_limit"] = int(text_size_limit)
        elif size_limit is not None or not (text_dir / DBNAME).exists():
            text_limits["size_limit"] = max(self.size_limit // 4, 2**20)
        self._text = _open_cache(text_dir, eviction_policy="least-recently-stored", statistics=0,
                                 **text_limits, **common)
        self.text_size_limit = int(self._text.size_limit)
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._removed = 0

    # ------------------------------------------------------------------ folder marker
    def _check_marker(self) -> None:
        marker = self.directory / _MARKER_FILE
        info = {"format": _MARKER_FORMAT, "version": STORE_FORMAT_VERSION}
        if marker.is_file():
            try:
                found = json.loads(marker.read_text())
            except (OSError, ValueError) as exc:
                raise StoreFormatError(f"{marker} is unreadable: {exc}") from exc
            if not isinstance(found, dict) or found.get("format") != _MARKER_FORMAT:
                raise StoreFormatError(f"{self.directory} is not a compressor-plugin store ({marker} says otherwise)")
            if found.get("version") != STORE_FORMAT_VERSION:
                raise StoreFormatError(
                    f"store {self.directory} has format version {found.get('version')!r}; this version reads "
                    f"{STORE_FORMAT_VERSION}. Use another directory, or delete this one (its entries can be recomputed)")
            return
        tmp = marker.with_name(f"{_MARKER_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(info) + "\n")
        os.replace(tmp, marker)

    # ------------------------------------------------------------------ keys
    def key_for(self, text: str, compressor: "Compressor") -> str:
        """The key of ``text`` compressed by ``compressor`` (see :func:`context_key`)."""
        return context_key(text, **_key_parts(compressor))

    # ------------------------------------------------------------------ low level
    def _raw_get(self, cache: diskcache.Cache, name: str) -> Any:
        """bytes, a RefusedValue, or None when absent (or the database stayed locked)."""
        try:
            return cache.get(name, default=None, retry=False)
        except diskcache.Timeout:
            logger.warning("store %s is locked by another process; treating %s as a miss", self.directory, name)
            return None
        except sqlite3.DatabaseError as exc:
            logger.warning("store %s cannot be read (%s); treating %s as a miss. `compressor-plugin cache "
                           "clear` or deleting the folder starts a fresh store", self.directory, exc, name)
            return None

    def _discard(self, cache: diskcache.Cache, name: str, reason: str) -> None:
        logger.warning("removing bad store entry %s in %s: %s", name, self.directory, reason)
        with self._lock:
            self._removed += 1
        try:
            cache.delete(name, retry=True)
        except (OSError, sqlite3.Error) as exc:  # pragma: no cover - disk trouble
            logger.warning("could not remove %s: %s", name, exc)

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    @staticmethod
    def _decode(data: Any, key: str) -> CompressedContext:
        """Parse and check a stored value; raise on anything wrong."""
        if isinstance(data, RefusedValue):
            raise ValueError(data.reason)
        ctx = CompressedContext.from_bytes(data)
        bound = ctx.extra.pop(_KEY_FIELD, None)
        if bound != key:
            raise ValueError(f"entry was stored for key {bound!r}")
        return ctx

    # ------------------------------------------------------------------ contexts
    def get(self, key: str, *, device: torch.device | str | None = None) -> CompressedContext | None:
        """The verified context stored under ``key``, or None.

        A missing, expired or bad entry is a miss: bad entries (corrupted, truncated, foreign
        or pickled data, stored under another key) are logged, deleted and give None.
        """
        _check_key(key)
        data = self._raw_get(self._kv, _CTX + key)
        if data is None:
            self._count(False)
            return None
        try:
            ctx = self._decode(data, key)
        except Exception as exc:  # any failure to parse is a corrupt entry
            self._discard(self._kv, _CTX + key, str(exc))
            self._count(False)
            return None
        self._count(True)
        return ctx.to(device) if device is not None else ctx

    def put(self, key: str, ctx: CompressedContext, text: str | None = None) -> None:
        """Store ``ctx`` under ``key``, and ``text`` (normalised) beside it for fallback.

        Raises:
            ValueError: ``key`` is malformed, or ``text`` is given and ``key`` is not the key
                of that text with the context's model, compressor, k, mode and dtype.
            TypeError: ``ctx`` is not a CompressedContext.
        """
        self.put_many([(key, ctx, text)])

    def put_many(self, items: Iterable[tuple[str, CompressedContext, str | None]]) -> int:
        """Store several ``(key, context, text-or-None)`` entries, as :meth:`put` does each.

        Every entry is checked and serialised first; the entries are then written in one
        database transaction per cache instead of one per entry, which is what makes bulk
        writes (offline cache building) fast. Nothing is written if any entry is invalid.

        Returns:
            The number of context bytes written.
        """
        texts: list[tuple[str, bytes]] = []
        blobs: list[tuple[str, bytes]] = []
        for key, ctx, text in items:
            _check_key(key)
            if not isinstance(ctx, CompressedContext):
                raise TypeError(f"ctx must be a CompressedContext, not {type(ctx).__name__}")
            if text is not None:
                norm = normalize_text(text)
                expected = context_key(norm, base_fingerprint=ctx.base_fingerprint,
                                       compressor_fingerprint=ctx.compressor_fingerprint,
                                       k=ctx.k, mode=ctx.mode, dtype=ctx.dtype)
                if expected != key:
                    raise ValueError("key does not match this text and context (different text, base model, "
                                     "compressor, k, mode or dtype); compute it with ContextStore.key_for")
                texts.append((_TEXT + key, norm.encode("utf-8")))
            stored = dataclasses.replace(ctx, extra={**ctx.extra, _KEY_FIELD: key})
            blobs.append((_CTX + key, stored.to_bytes()))
        for cache, entries in ((self._text, texts), (self._kv, blobs)):
            if entries:
                with cache.transact(retry=True):
                    for name, data in entries:
                        cache.set(name, data, expire=self.expire, retry=True)
        return sum(len(b) for _, b in blobs)

    def get_text(self, key: str) -> str | None:
        """The normalised text of the chunk stored under ``key``, or None."""
        _check_key(key)
        data = self._raw_get(self._text, _TEXT + key)
        if data is None:
            return None
        try:
            if isinstance(data, RefusedValue):
                raise ValueError(data.reason)
            return data.decode("utf-8")
        except (ValueError, UnicodeDecodeError) as exc:
            self._discard(self._text, _TEXT + key, str(exc))
            return None

    def delete(self, key: str) -> bool:
        """Remove a chunk's context and text; True if a context was there."""
        _check_key(key)
        self._text.delete(_TEXT + key, retry=True)
        return bool(self._kv.delete(_CTX + key, retry=True))

    def keys(self) -> Iterator[str]:
        """Keys of the stored contexts (unverified; includes expired entries not yet evicted)."""
        for name in self._kv.iterkeys():
            if isinstance(name, str) and name.startswith(_CTX):
                yield name[len(_CTX):]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(_KEY_RE.fullmatch(key)) and (_CTX + key) in self._kv

    def __len__(self) -> int:
        """Number of stored contexts (counts keys: O(entries))."""
        return sum(1 for _ in self.keys())

    # ------------------------------------------------------------------ compress through the store
    def get_or_compress(
        self,
        texts: Sequence[str],
        compressor: "Compressor",
        *,
        batch_size: int = 16,
        truncate: bool = False,
        progress: bool = False,
        device: torch.device | str | None = None,
    ) -> list[StoreResult]:
        """Contexts of ``texts`` from the store, compressing (and storing) only the misses.

        Texts are normalised (:func:`normalize_text`) before hashing and compressing; the same
        text twice in one call is compressed once. Misses are compressed in batches of
        ``batch_size`` (sorted by length) and stored after each batch, so an interrupted call
        keeps its finished work. A failure to write the store is logged, not raised.

        Args:
            texts: chunk texts (non-empty after normalisation).
            compressor: the compressor whose contexts are wanted.
            truncate: passed to :meth:`Compressor.compress`.
            progress: show a progress bar over the misses.
            device: where returned contexts live; default the compressor's device.

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
        parts = _key_parts(compressor)
        keys = [context_key(n, **parts) for n in norm]
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        found: dict[str, CompressedContext] = {}
        hits: set[str] = set()
        for key in first:
            ctx = self.get(key)
            if ctx is not None:
                found[key] = ctx
                hits.add(key)
        misses = sorted((k for k in first if k not in found), key=lambda k: len(norm[first[k]]))
        bar = None
        if progress and misses:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(misses), desc=f"compress k={compressor.k}", unit="chunk")
        write_failed = False
        try:
            for s in range(0, len(misses), batch_size):
                batch = misses[s: s + batch_size]
                try:
                    made = compressor.compress([norm[first[k]] for k in batch], batch_size=batch_size,
                                               truncate=truncate, progress=False)
                except CompressorError as exc:
                    renamed = _reindex_error(exc, [first[k] for k in batch])
                    if renamed is exc:
                        raise
                    raise renamed from None
                for key, ctx in zip(batch, made):
                    found[key] = ctx
                    if write_failed:
                        continue
                    try:
                        self.put(key, ctx, norm[first[key]])
                    except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
                        write_failed = True
                        logger.warning("could not write to store %s (%s); continuing without caching",
                                       self.directory, exc)
                if bar is not None:
                    bar.update(len(batch))
        finally:
            if bar is not None:
                bar.close()
        out = []
        for key in keys:
            ctx = found[key]
            if ctx.device != target:
                ctx = found[key] = ctx.to(target)
            out.append(StoreResult(key, ctx, key in hits))
        return out

    async def aget_or_compress(self, texts: Sequence[str], compressor: "Compressor", **kwargs: Any) -> list[StoreResult]:
        """:meth:`get_or_compress` in a worker thread, off the event loop."""
        return await asyncio.to_thread(self.get_or_compress, texts, compressor, **kwargs)

    async def aget(self, key: str, **kwargs: Any) -> CompressedContext | None:
        """:meth:`get` in a worker thread."""
        return await asyncio.to_thread(self.get, key, **kwargs)

    # ------------------------------------------------------------------ raw bytes namespace
    def get_bytes(self, name: str) -> bytes | None:
        """Bytes stored with :meth:`put_bytes` (the LangChain ByteStore view), or None."""
        data = self._raw_get(self._kv, _BYTES + _check_name(name))
        if isinstance(data, RefusedValue):
            self._discard(self._kv, _BYTES + name, data.reason)
            return None
        return data

    def put_bytes(self, name: str, data: bytes) -> None:
        """Store arbitrary bytes under ``name`` in a namespace apart from contexts (never pickled)."""
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise TypeError(f"values must be bytes, not {type(data).__name__}")
        self._kv.set(_BYTES + _check_name(name), data, expire=self.expire, retry=True)

    def delete_bytes(self, name: str) -> bool:
        """Remove a :meth:`put_bytes` entry; True if it was there."""
        return bool(self._kv.delete(_BYTES + _check_name(name), retry=True))

    def byte_keys(self, prefix: str | None = None) -> Iterator[str]:
        """Names of :meth:`put_bytes` entries, optionally only those starting with ``prefix``."""
        start = _BYTES + (prefix or "")
        for name in self._kv.iterkeys():
            if isinstance(name, str) and name.startswith(start):
                yield name[len(_BYTES):]

    # ------------------------------------------------------------------ maintenance
    def stats(self) -> dict[str, Any]:
        """Counts and sizes.

        Keys: ``entries`` (contexts), ``byte_entries``, ``text_entries``, ``bytes`` (disk use
        of both caches, values plus SQLite pages), ``size_limit``, ``text_size_limit``,
        ``hits``/``misses``/``removed`` (context lookups by this object), ``lifetime_hits``/
        ``lifetime_misses`` (raw lookups of the context cache by every process since it was
        created), ``eviction_policy``, ``expire``, ``format_version``, ``directory``.
        """
        entries = byte_entries = 0
        for name in self._kv.iterkeys():
            if isinstance(name, str):
                entries += name.startswith(_CTX)
                byte_entries += name.startswith(_BYTES)
        life_hits, life_misses = self._kv.stats(enable=True)
        with self._lock:
            hits, misses, removed = self._hits, self._misses, self._removed
        return {
            "directory": str(self.directory),
            "entries": entries,
            "byte_entries": byte_entries,
            "text_entries": len(self._text),
            "bytes": int(self._kv.volume() + self._text.volume()),
            "size_limit": self.size_limit,
            "text_size_limit": self.text_size_limit,
            "hits": hits,
            "misses": misses,
            "removed": removed,
            "lifetime_hits": int(life_hits),
            "lifetime_misses": int(life_misses),
            "eviction_policy": EVICTION_POLICY,
            "expire": self.expire,
            "format_version": STORE_FORMAT_VERSION,
        }

    def verify(self, *, fix_files: bool = True) -> dict[str, int]:
        """Check every entry; delete bad ones. Returns counts.

        Contexts are fully decoded and checked like :meth:`get` does, and where the chunk's
        text is present its key is recomputed from the text and the context's fingerprints,
        k, mode and dtype. Texts must be UTF-8; byte entries must be bytes. Expired entries
        are removed. Verification does not count as a use for LRU eviction.

        Args:
            fix_files: also let diskcache remove value files no entry refers to (left by a
                writer that was killed) and entries whose file is gone. A write in progress in
                another process at that moment may be lost (it then reads as a miss).

        Returns:
            ``checked``, ``ok``, ``removed`` (contexts), ``texts_checked``, ``texts_removed``,
            ``byte_entries``, ``byte_removed``, ``foreign_removed`` (entries outside the
            store's namespaces), ``foreign_left`` (entries with pickled keys, which can only be
            removed with :meth:`clear`), ``expired`` and ``files_fixed``.
        """
        out = dict.fromkeys(("checked", "ok", "removed", "texts_checked", "texts_removed", "byte_entries",
                             "byte_removed", "foreign_removed", "foreign_left", "expired", "files_fixed"), 0)
        out["expired"] = int(self._kv.expire(retry=True)) + int(self._text.expire(retry=True))
        if fix_files:
            for cache in (self._kv, self._text):
                for _ in range(3):  # each pass removes one level of directories emptied by the last
                    with warnings.catch_warnings():
                        warnings.simplefilter("always")  # check() records (not prints) one warning per fix
                        fixed = cache.check(fix=True, retry=True)
                    out["files_fixed"] += len(fixed)
                    if not any(issubclass(w.category, diskcache.EmptyDirWarning) for w in fixed):
                        break
        # Texts first: a context is then checked against the text that survived.
        for name in list(self._text.iterkeys()):
            if isinstance(name, str) and name.startswith(_TEXT) and _KEY_RE.fullmatch(name[len(_TEXT):]):
                out["texts_checked"] += 1
                data = self._text.get(name, default=None, retry=True)
                if data is None:
                    continue
                try:
                    if isinstance(data, RefusedValue):
                        raise ValueError(data.reason)
                    data.decode("utf-8")
                except (ValueError, UnicodeDecodeError) as exc:
                    self._discard(self._text, name, str(exc))
                    out["texts_removed"] += 1
            elif name is FOREIGN_KEY:
                out["foreign_left"] += 1
            else:
                self._discard(self._text, name, "not an entry of this store")
                out["foreign_removed"] += 1
        # A second handle without access-time updates or hit counting, so walking the store
        # neither reorders LRU eviction nor inflates the statistics.
        view = diskcache.Cache(str(self.directory / "contexts"), timeout=self._kv.timeout, disk=BytesOnlyDisk,
                               eviction_policy="none", statistics=0)
        try:
            for name in list(view.iterkeys()):
                if isinstance(name, str) and name.startswith(_CTX) and _KEY_RE.fullmatch(name[len(_CTX):]):
                    out["checked"] += 1
                    if self._verify_context(view, name[len(_CTX):]):
                        out["ok"] += 1
                    else:
                        out["removed"] += 1
                elif isinstance(name, str) and name.startswith(_BYTES):
                    data = view.get(name, default=None, retry=True)
                    if isinstance(data, RefusedValue):
                        self._discard(view, name, data.reason)
                        out["byte_removed"] += 1
                    elif data is not None:
                        out["byte_entries"] += 1
                elif name is FOREIGN_KEY:
                    out["foreign_left"] += 1
                else:
                    self._discard(view, name, "not an entry of this store")
                    out["foreign_removed"] += 1
        finally:
            view.close()
            # The second handle rewrote these settings rows; put them back for new connections.
            self._kv.reset("eviction_policy", EVICTION_POLICY)
            self._kv.reset("statistics", 1)
        return out

    def _verify_context(self, view: diskcache.Cache, key: str) -> bool:
        data = view.get(_CTX + key, default=None, retry=True)
        if data is None:  # expired or removed meanwhile
            return True
        try:
            ctx = self._decode(data, key)
            text = self.get_text(key)
            if text is not None:
                expected = context_key(text, base_fingerprint=ctx.base_fingerprint,
                                       compressor_fingerprint=ctx.compressor_fingerprint,
                                       k=ctx.k, mode=ctx.mode, dtype=ctx.dtype)
                if expected != key:
                    raise ValueError("the key does not match the chunk text and the context's model, "
                                     "compressor, k, mode or dtype")
        except Exception as exc:
            self._discard(view, _CTX + key, str(exc))
            return False
        return True

    def merge_from(self, other: "ContextStore | str | os.PathLike", *, overwrite: bool = False) -> dict[str, int]:
        """Copy the valid contexts (with their texts) and byte entries of another store into this one.

        The way to combine stores built on several machines: build a local store per node,
        then merge them (each entry is verified on the way, so bad ones are not copied).

        Returns:
            ``copied``, ``existing`` (skipped: already here and ``overwrite`` is False),
            ``bad`` (unreadable in the source) and ``bytes_copied``.
        """
        src = other if isinstance(other, ContextStore) else ContextStore(other, size_limit=None)
        if src.directory.resolve() == self.directory.resolve():
            raise ValueError("cannot merge a store into itself")
        out = {"copied": 0, "existing": 0, "bad": 0, "bytes_copied": 0}
        try:
            for key in list(src.keys()):
                if not overwrite and key in self:
                    out["existing"] += 1
                    continue
                ctx = src.get(key)
                if ctx is None:
                    out["bad"] += 1
                    continue
                text = src.get_text(key)
                try:
                    self.put(key, ctx, text)
                except ValueError:  # the text does not belong to this key: keep the context only
                    self.put(key, ctx)
                out["copied"] += 1
            for name in list(src.byte_keys()):
                if not overwrite and self.get_bytes(name) is not None:
                    continue
                data = src.get_bytes(name)
                if data is not None:
                    self.put_bytes(name, data)
                    out["bytes_copied"] += 1
        finally:
            if src is not other:
                src.close()
        return out

    def clear(self) -> int:
        """Remove every entry (contexts, texts, byte entries, foreign rows); returns how many."""
        return int(self._kv.clear(retry=True)) + int(self._text.clear(retry=True))

    def close(self) -> None:
        """Close this thread's database connections (the store reopens them on next use)."""
        self._kv.close()
        self._text.close()

    def __enter__(self) -> "ContextStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Pickling sends only the settings; the receiving process reopens the folder.
        return dict(self._init_args, directory=str(self.directory))

    def __setstate__(self, state: dict[str, Any]) -> None:
        args = dict(state)
        self.__init__(args.pop("directory"), **args)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ContextStore({str(self.directory)!r}, size_limit={self.size_limit}, expire={self.expire})"


def _open_cache(folder: Path, **settings: Any) -> diskcache.Cache:
    try:
        return diskcache.Cache(str(folder), **settings)
    except sqlite3.DatabaseError as exc:
        raise StoreFormatError(
            f"the store database in {folder} is damaged ({exc}). Everything in a store can be recomputed: "
            f"delete {folder} to start it afresh") from exc


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"keys must be str, not {type(name).__name__}")
    return name


def _reindex_error(exc: Exception, positions: list[int]) -> Exception:
    """The same error with 'text j' (position in a batch) replaced by the input position."""
    m = re.match(r"text (\d+)", str(exc))
    if not m or int(m.group(1)) >= len(positions):
        return exc
    return type(exc)(f"text {positions[int(m.group(1))]}{str(exc)[m.end():]}")
