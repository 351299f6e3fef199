"""The on-disk store of compressed chunks.

A :class:`ContextStore` maps a content key (sha256 of everything that changes the compressed
K/V) to a :class:`~compressor_plugin.context.CompressedContext`, so each chunk is compressed
once and reused by every later query, by every process that opens the same folder, and (with
a remote tier, :mod:`compressor_plugin.store_redis`) by every machine that shares the tier.

This module only stores: keys, :meth:`ContextStore.get` / :meth:`~ContextStore.get_many` /
:meth:`~ContextStore.put` / :meth:`~ContextStore.put_many` / :meth:`~ContextStore.get_text` /
:meth:`~ContextStore.delete` / :meth:`~ContextStore.keys`, and the entry format that every read
is checked against.
Compute-on-miss, the byte namespace of the LangChain view and maintenance (stats, verify,
merge, clear) are recipes in :mod:`compressor_plugin.store_recipes`; the methods of the same
names here delegate to them.

Layout of a store folder::

    store.json     format marker and the size limits the store was created with
    contexts/      SQLite + value files: compressed contexts ("ctx:<key>") and raw byte
                   entries ("bytes:<name>", used by the LangChain ByteStore view); LRU-evicted
    texts/         the same for the normalised text of each chunk ("text:<key>"), the
                   fallback used when a context is missing; evicted oldest-stored first

Everything read back from the folder (or from a remote tier) is untrusted
(:mod:`compressor_plugin.store_backend` says how files and rows are checked). A context entry
is the safetensors bytes of :meth:`CompressedContext.to_bytes`, whose ``extra`` records the
key it was stored under and an *entry digest*: sha256 over the key, every header field
(mode, k, source tokens, fingerprints, extra, dtype, shapes) and the digest of the tensor
data. Reads check that digest and the range of every field (k >= 1, source tokens >= 0,
floating-point tensors with finite values, no tensors but the mode's own and ``anchor_ids``,
anchor ids a 1-D int64 tensor of at most ``MAX_ANCHOR_TOKENS`` ids >= 0; compute-on-miss
also checks them against the compressor's vocabulary). Anchor ids are always fed to the model
as ids, never decoded and re-read as text, so no string inside a chunk can act as a marker. Texts carry a sha256 bound to their key. A bad
entry is logged, deleted and reported as a miss; it never raises. Nothing is ever pickled.

The digests are not signatures: whoever can write the folder can still plant well-formed
entries with wrong numbers (wrong answers, not code execution), so share a store only with
people you would share the model with.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import numbers
import os
import re
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import torch

from . import store_format
from .context import CompressedContext, contexts_to
from .store_format import STORE_FORMAT_VERSION, encode_text, normalize_text
from .store_backend import (
    DEFAULT_MAX_VALUE_SIZE,
    FOREIGN_KEY,
    RefusedValue,
    SafeCache,
    StoreError,
    StoreFormatError,
    StoreReadOnlyError,
    StoreWriteError,
    ValueTooLargeError,
    is_disk_full,
    is_read_only,
)

if TYPE_CHECKING:  # pragma: no cover
    from .compressor import Compressor
    from .store_recipes import ByteNamespace

__all__ = [
    "ContextStore", "StoreResult", "StoreError", "StoreFormatError", "StoreReadOnlyError", "StoreWriteError",
    "ValueTooLargeError", "RefusedValue", "FOREIGN_KEY", "context_key", "normalize_text", "default_store_dir",
    "encode_context", "decode_context", "check_anchor_ids", "encode_text", "decode_text", "DEFAULT_SIZE_LIMIT", "DEFAULT_MAX_VALUE_SIZE",
]

logger = logging.getLogger(__name__)

#: Default size limit of the context cache.
DEFAULT_SIZE_LIMIT = 4 * 2**30
#: Bytes of verified contexts a ContextStore keeps in its process (stored bytes plus tensors).
DEFAULT_MEMORY_LIMIT = 256 * 2**20
#: Values at least this large are kept in their own file instead of inside SQLite.
DEFAULT_MIN_FILE_SIZE = 32 * 2**10
EVICTION_POLICY = "least-recently-used"
TEXT_EVICTION_POLICY = "least-recently-stored"
#: Size limits read from store.json are accepted only in this range (bytes).
_SAVED_LIMIT_RANGE = (1, 2**50)

_CTX = store_format.CONTEXT_PREFIX
_TEXT = store_format.TEXT_PREFIX
_BYTES = "bytes:"
_KEY_FIELD = store_format.KEY_FIELD  # recorded in CompressedContext.extra of every stored entry
_DIGEST_FIELD = store_format.DIGEST_FIELD  # the entry digest, also in extra
_TEXT_MAGIC = store_format.TEXT_MAGIC
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_MARKER_FILE = "store.json"
_MARKER_FORMAT = "compressor_plugin.ContextStore"


# ---------------------------------------------------------------------------------- keys
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
    return store_format.context_key(text, base_fingerprint=base_fingerprint,
                                    compressor_fingerprint=compressor_fingerprint, k=k, mode=mode,
                                    dtype=_dtype_name(dtype))


def _key_parts(compressor: "Compressor", anchors: int = 0) -> dict[str, Any]:
    """The key fields of ``compressor``'s contexts; an anchor budget changes the compressor
    fingerprint (:func:`~compressor_plugin.anchors.anchored_fingerprint`), hence every key."""
    from .anchors import anchored_fingerprint

    return {
        "base_fingerprint": compressor.base.fingerprint,
        "compressor_fingerprint": anchored_fingerprint(compressor.fingerprint, anchors),
        "k": compressor.k,
        "mode": compressor.mode,
        "dtype": str(compressor.base.dtype),
    }


def expected_fields(compressor: "Compressor", anchors: int = 0) -> dict[str, Any]:
    """What every context ``compressor`` makes (with an ``anchors`` budget) says about itself: its
    key fields (:func:`context_key`) and its tensors' ``shape``; see :func:`entry_mismatch`."""
    from .models import kv_dims

    if compressor.mode == "kv":
        layers, heads, head_dim = kv_dims(compressor.base.model.config)
        shape: tuple[int, ...] = (layers, heads, compressor.k, head_dim)
    else:
        shape = (compressor.k, int(compressor.base.model.get_input_embeddings().embedding_dim))
    return {**_key_parts(compressor, anchors), "shape": shape}


def entry_mismatch(ctx: CompressedContext, expect: Mapping[str, Any]) -> str | None:
    """Why ``ctx`` is not what its reader expects (the fields of :func:`expected_fields` that
    ``expect`` holds), or None. An intact entry whose header names another model, compressor,
    k, mode, dtype or shape than its key was made for was planted or copied there."""
    got = {"base_fingerprint": ctx.base_fingerprint, "compressor_fingerprint": ctx.compressor_fingerprint,
           "k": ctx.k, "mode": ctx.mode, "dtype": _dtype_name(ctx.dtype),
           "shape": tuple((ctx.keys if ctx.mode == "kv" else ctx.embeddings).shape)}
    for name, want in expect.items():
        want = _dtype_name(want) if name == "dtype" else tuple(want) if name == "shape" else want
        if got[name] != want:
            return f"entry's {name} is {got[name]!r}, its reader expects {want!r}"
    return None


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"a store key is 64 lowercase hex characters (ContextStore.key_for), got {key!r}")


# ---------------------------------------------------------------------------------- entry format
def _entry_digest(key: str, ctx: CompressedContext, tensor_digest: str, extra: dict[str, Any]) -> str:
    """sha256 over the key, every header field and the tensor digest (which covers the data)."""
    tensors = {"keys": ctx.keys, "values": ctx.values} if ctx.mode == "kv" else {"embeddings": ctx.embeddings}
    if ctx.anchor_ids is not None:  # absent for entries without anchors: their digest is unchanged
        tensors["anchor_ids"] = ctx.anchor_ids
    return store_format.entry_digest(
        key, mode=ctx.mode, k=ctx.k, source_tokens=ctx.source_tokens, base_fingerprint=ctx.base_fingerprint,
        compressor_fingerprint=ctx.compressor_fingerprint, extra=extra,
        specs={name: (str(t.dtype), list(t.shape)) for name, t in tensors.items()}, digest=tensor_digest)


def check_context_fields(ctx: CompressedContext, *, tensors: bool = True) -> None:
    """Range checks on every field of a context (``tensors=False``: all but the K/V or
    embeddings, which :func:`~compressor_plugin.store_format.encode_entries` checks as bytes
    when the store writes them).

    Raises:
        ValueError: naming the field: ``source_tokens < 0``, ``k < 1``, an empty dimension, a
            non-floating dtype, NaN or infinite values, empty fingerprints or a non-string extra.
    """
    tokens = ctx.source_tokens
    if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 0:
        raise ValueError(f"source_tokens is {ctx.source_tokens!r}; it must be an integer >= 0")
    if ctx.k < 1:
        raise ValueError(f"k is {ctx.k}; it must be at least 1")
    for name in ("base_fingerprint", "compressor_fingerprint"):
        value = getattr(ctx, name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, not {value!r}")
    extra = ctx.extra
    if not isinstance(extra, dict) or not all(isinstance(a, str) and isinstance(b, str) for a, b in extra.items()):
        raise ValueError("extra must map strings to strings")
    check_anchor_ids(ctx.anchor_ids)
    if tensors:
        kept = {"keys": ctx.keys, "values": ctx.values} if ctx.mode == "kv" else {"embeddings": ctx.embeddings}
        store_format.check_tensors(kept, finite=all_finite)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a floating-point tensor (float32, float16, bfloat16 or float64) holds no NaN or infinite value.

    On the CPU its exponent bits are checked in numpy, on one thread: a torch reduction wakes
    torch's whole thread pool for every tensor, which on a many-core host costs far more than
    the check itself (this runs for every tensor of every store hit).
    """
    if t.device.type != "cpu":
        lo, hi = t.aminmax()  # min and max propagate NaN and show +-inf
        return math.isfinite(float(lo)) and math.isfinite(float(hi))
    t = t.detach().contiguous()
    return store_format.all_finite(CompressedContext._raw({"t": t})["t"])


def check_anchor_ids(anchor_ids: torch.Tensor | None, vocab_size: int | None = None,
                     control_ids: frozenset[int] = frozenset()) -> None:
    """Range checks on a context's anchor token ids (``None``, no anchors, passes).

    Anchors are chunk text tokenised literally, so they never hold a control token: an id in
    ``control_ids`` (the model's special tokens) means the entry was not made by this package.

    Raises:
        ValueError: not a 1-D int64 tensor, longer than
            :data:`~compressor_plugin.anchors.MAX_ANCHOR_TOKENS`, empty, a negative id, (when
            ``vocab_size`` is given) an id outside the vocabulary, or an id in ``control_ids``.
    """
    from .anchors import MAX_ANCHOR_TOKENS

    if anchor_ids is None:
        return
    if not isinstance(anchor_ids, torch.Tensor) or anchor_ids.dtype != torch.int64 or anchor_ids.dim() != 1:
        raise ValueError("anchor_ids must be a 1-D int64 tensor")
    n = anchor_ids.numel()
    if not 1 <= n <= MAX_ANCHOR_TOKENS:
        raise ValueError(f"anchor_ids has {n} ids; it must have 1 to {MAX_ANCHOR_TOKENS}")
    ids = anchor_ids.tolist()  # not torch reductions: those wake torch's thread pool for a few ids
    lo, hi = min(ids), max(ids)
    if lo < 0:
        raise ValueError(f"anchor id {lo} is negative")
    if vocab_size is not None and hi >= vocab_size:
        raise ValueError(f"anchor id {hi} is outside the vocabulary ({vocab_size} tokens)")
    if control_ids:
        bad = sorted(control_ids.intersection(ids))
        if bad:
            raise ValueError(f"anchor ids {bad[:4]} are control tokens of the model; anchors are plain text")


def _entry(key: str, ctx: CompressedContext, text: str | None = None) -> store_format.Entry:
    """``ctx`` as a :class:`~compressor_plugin.store_format.Entry` (on the CPU), its header fields checked."""
    if not isinstance(ctx, CompressedContext):
        raise TypeError(f"ctx must be a CompressedContext, not {type(ctx).__name__}")
    check_context_fields(ctx, tensors=False)
    cpu = ctx if ctx.device.type == "cpu" else ctx.to("cpu")  # _tensors() moves the anchor ids, if anywhere else
    return store_format.Entry(key, CompressedContext._raw(cpu._tensors()), cpu.mode, cpu.k, cpu.source_tokens,
                              cpu.base_fingerprint, cpu.compressor_fingerprint, cpu.extra, text)


def encode_context(key: str, ctx: CompressedContext) -> bytes:
    """The stored bytes of ``ctx`` under ``key``.

    :meth:`CompressedContext.to_bytes`, with the key and the entry digest recorded in ``extra``
    (:func:`compressor_plugin.store_format.entry_bytes`).

    Raises:
        ValueError: a field out of range (see :func:`check_context_fields`).
    """
    return store_format.encode_entries([_entry(key, ctx)])[1][0][1]


def _header_meta(data: bytes) -> dict[str, Any]:
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len]).get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no metadata in the entry header")
    return meta


def decode_context(data: Any, key: str) -> CompressedContext:
    """Parse and check stored bytes (from the folder or a remote tier); raise on anything wrong.

    Checks the safetensors structure and tensor digest (:meth:`CompressedContext.from_bytes`),
    the key the entry was written for, the entry digest over every header field, and the
    range of every field.

    Raises:
        ValueError: naming what is wrong (the caller treats the entry as corrupt).
    """
    if isinstance(data, RefusedValue):
        raise ValueError(data.reason)
    if not isinstance(data, bytes):
        raise ValueError(f"stored value is {type(data).__name__}, not bytes")
    ctx = CompressedContext.from_bytes(data)
    extra = dict(ctx.extra)
    bound = extra.get(_KEY_FIELD)
    if bound != key:
        raise ValueError(f"entry was stored for key {bound!r}")
    recorded = extra.get(_DIGEST_FIELD)
    if recorded is None:
        raise ValueError("entry has no entry digest (written by an older version of the store)")
    if recorded != _entry_digest(key, ctx, _header_meta(data).get("digest"), extra):
        raise ValueError("entry digest mismatch: the header (source tokens, fingerprints, extra, k, dtype or "
                         "shapes) was changed")
    check_context_fields(ctx)
    ctx.extra = {name: value for name, value in extra.items() if name not in (_KEY_FIELD, _DIGEST_FIELD)}
    return ctx


def decode_text(data: Any, key: str) -> str:
    """The text in stored bytes, checked against its checksum and key.

    Raises:
        ValueError: refused, untagged, checksum mismatch (changed, or stored for another key),
            or not UTF-8.
    """
    if isinstance(data, RefusedValue):
        raise ValueError(data.reason)
    if not isinstance(data, bytes) or len(data) < 36 or not data.startswith(_TEXT_MAGIC):
        raise ValueError("not a checksummed text entry")
    body = data[36:]
    if data[4:36] != store_format.text_digest(key, body):
        raise ValueError("text checksum mismatch: the text was changed or belongs to another key")
    return body.decode("utf-8")


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


def _saved_limit(info: dict[str, Any], name: str, marker: Path) -> int | None:
    value = info.get(name)
    if value is None:
        return None
    lo, hi = _SAVED_LIMIT_RANGE
    if type(value) is not int or not lo <= value <= hi:
        logger.warning("%s: ignoring %s=%r (not an integer between %d and %d)", marker, name, value, lo, hi)
        return None
    return value


class _VerifiedMemory:
    """Contexts decoded and checked earlier, by key, with the exact bytes they were decoded from.

    A store hit still reads the entry's bytes from the folder (so a deleted, expired or changed
    entry is seen at once); only when they equal the bytes verified before is the checked
    context reused, which skips the digest, the parse and the range checks. Least recently
    used first out once the held bytes pass ``limit``.
    """

    def __init__(self, limit: int):
        self.limit = int(limit)
        self.size = 0
        self._items: OrderedDict[str, tuple[bytes, CompressedContext, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _own(ctx: CompressedContext) -> CompressedContext:
        """A shallow copy with its own ``extra`` (the tensors are shared)."""
        out = copy.copy(ctx)
        out.extra = dict(ctx.extra)
        return out

    def get(self, key: str, data: bytes) -> CompressedContext | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[0] != data:
                return None
            self._items.move_to_end(key)
        return self._own(item[1])

    def put(self, key: str, data: bytes, ctx: CompressedContext) -> None:
        size = len(data) + ctx.nbytes
        if size > self.limit:
            return
        kept = self._own(ctx)
        with self._lock:
            self._pop(key)
            self._items[key] = (data, kept, size)
            self.size += size
            while self.size > self.limit:
                self._pop(next(iter(self._items)))

    def discard(self, key: str) -> None:
        with self._lock:
            self._pop(key)

    def _pop(self, key: str) -> None:  # the caller holds the lock
        item = self._items.pop(key, None)
        if item is not None:
            self.size -= item[2]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.size = 0


class ContextStore:
    """On-disk, multi-process store of compressed chunks, keyed by content.

    Args:
        directory: store folder; default ``cache_home()/"store"``
            (``$COMPRESSOR_PLUGIN_HOME/store`` or ``~/.cache/compressor_plugin/store``).
        size_limit: approximate bound, in bytes, on the context cache (values plus SQLite
            pages); least-recently-used entries are evicted as new ones are written. Default
            4 GiB (~5,800 k=16 contexts of the default model in fp32). The limit is saved in
            ``store.json``; ``None`` keeps the saved one (4 GiB for a new store).
        expire: optional lifetime of entries, in seconds from when they were written.
        text_size_limit: bound on the chunk texts kept for fallback (default ``size_limit // 4``,
            at least 1 MiB; with ``size_limit=None`` the saved one); texts are evicted
            oldest-stored first, independently of their contexts.
        min_file_size: values at least this large get their own file; smaller ones live in SQLite.
        timeout: seconds to wait for another process's SQLite lock before giving up.
        read_only: serve reads only; every write raises :class:`StoreReadOnlyError`. A store on
            a read-only volume (or a folder this user cannot write) opens read-only by itself.
        max_value_size: the largest single value read or written (default 64 MiB): rows and
            files claiming more are refused unread.
        remote: a shared tier behind the local folder: a ``redis://`` / ``rediss://`` /
            ``unix://`` URL or a :class:`~compressor_plugin.store_redis.RedisTier`. Local misses
            are looked up there (verified like local reads; hits are copied into the folder)
            and writes go to both. An unreachable remote means misses, never an exception.
        memory_limit: bytes of verified contexts kept in this process (default 256 MiB; 0:
            none). A hit still reads the entry from the folder, but when its bytes equal those
            verified before, the checked context is reused instead of being hashed, parsed and
            range-checked again (about 0.6 ms per k=16 fp32 context on a CPU core). Contexts returned
            from memory share their tensors: treat them as read-only.

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
        read_only: bool = False,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        remote: Any = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
    ):
        if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 0:
            raise ValueError(f"memory_limit must be a number of bytes >= 0, not {memory_limit!r}")
        for name, limit in (("size_limit", size_limit), ("text_size_limit", text_size_limit),
                            ("max_value_size", max_value_size)):
            if limit is not None and int(limit) <= 0:
                raise ValueError(f"{name} must be a positive number of bytes")
        if expire is not None and float(expire) <= 0:
            raise ValueError("expire must be a positive number of seconds, or None")
        self._init_args = {"directory": directory, "size_limit": size_limit, "expire": expire,
                           "text_size_limit": text_size_limit, "min_file_size": min_file_size, "timeout": timeout,
                           "read_only": read_only, "max_value_size": max_value_size,
                           "remote": remote, "memory_limit": memory_limit}
        self.directory = Path(directory).expanduser() if directory is not None else default_store_dir()
        self.expire = float(expire) if expire is not None else None
        if os.path.lexists(self.directory) and not self.directory.is_dir():
            raise StoreFormatError(f"the store {str(self.directory)!r} is a file, not a folder: pass a folder (a new "
                                   "one is created) or an existing store", path=self.directory)
        if not read_only:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if not (self.directory / _MARKER_FILE).is_file() or not is_read_only(exc):
                    raise
        saved = self._check_marker()
        if size_limit is None:
            size_limit = saved.get("size_limit") or DEFAULT_SIZE_LIMIT
            if text_size_limit is None:
                text_size_limit = saved.get("text_size_limit")
        if text_size_limit is None:
            text_size_limit = max(int(size_limit) // 4, 2**20)
        self.size_limit, self.text_size_limit = int(size_limit), int(text_size_limit)
        common = {"timeout": timeout, "min_file_size": int(min_file_size), "max_value_size": int(max_value_size),
                  "read_only": read_only}
        self._kv = _open_cache(self.directory / "contexts", size_limit=self.size_limit,
                               eviction_policy=EVICTION_POLICY, **common)
        self._text = _open_cache(self.directory / "texts", size_limit=self.text_size_limit,
                                 eviction_policy=TEXT_EVICTION_POLICY, **common)
        self.read_only = self._kv.read_only or self._text.read_only
        if self.read_only:
            self._kv.read_only = self._text.read_only = True
        elif (saved.get("size_limit"), saved.get("text_size_limit")) != (self.size_limit, self.text_size_limit):
            self._write_marker({"size_limit": self.size_limit, "text_size_limit": self.text_size_limit})
        self.remote = _open_remote(remote)
        self._lock = threading.Lock()
        self._memory = _VerifiedMemory(memory_limit)
        self._hits = 0
        self._misses = 0
        self._removed = 0

    # ------------------------------------------------------------------ folder marker
    def _check_marker(self) -> dict[str, int]:
        """Check store.json (writing it for a new folder); returns the saved size limits."""
        marker = self.directory / _MARKER_FILE
        if not marker.is_file():
            if self._init_args["read_only"]:
                raise StoreFormatError(f"no compressor-plugin store at {self.directory} (no {_MARKER_FILE})")
            self._write_marker({})
            return {}
        try:
            if marker.stat().st_size > 2**16:
                raise ValueError("file too large")
            found = json.loads(marker.read_text())
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
            raise StoreFormatError(f"{marker} is unreadable: {exc}") from exc
        if not isinstance(found, dict) or found.get("format") != _MARKER_FORMAT:
            raise StoreFormatError(f"{self.directory} is not a compressor-plugin store ({marker} says otherwise)")
        if found.get("version") != STORE_FORMAT_VERSION:
            raise StoreFormatError(
                f"store {self.directory} has format version {found.get('version')!r}; this version reads "
                f"{STORE_FORMAT_VERSION}. Use another directory, or delete this one (its entries can be recomputed)")
        limits = {name: _saved_limit(found, name, marker) for name in ("size_limit", "text_size_limit")}
        return {name: value for name, value in limits.items() if value is not None}

    def _write_marker(self, limits: dict[str, int]) -> None:
        marker = self.directory / _MARKER_FILE
        info = {"format": _MARKER_FORMAT, "version": STORE_FORMAT_VERSION, **limits}
        tmp = marker.with_name(f"{_MARKER_FILE}.{os.urandom(8).hex()}.tmp")
        try:
            # O_EXCL | O_NOFOLLOW: never write through a planted symlink.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info) + "\n")
            os.replace(tmp, marker)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if marker.is_file() and (is_disk_full(exc) or is_read_only(exc)):
                logger.warning("could not save the size limits in %s: %s", marker, exc)
                return
            raise

    # ------------------------------------------------------------------ keys
    def key_for(self, text: str, compressor: "Compressor", *, anchors: int = 0) -> str:
        """The key of ``text`` compressed by ``compressor`` (see :func:`context_key`) with an
        anchor budget of ``anchors`` tokens (:mod:`compressor_plugin.anchors`; 0: none)."""
        return context_key(text, **_key_parts(compressor, anchors))

    # ------------------------------------------------------------------ low level
    def _raw_get(self, cache: SafeCache, name: str, *, touch: bool = True) -> Any:
        """bytes, a RefusedValue, or None when absent (or the database could not be read)."""
        return self._raw_get_many(cache, [name], touch=touch).get(name)

    def _raw_get_many(self, cache: SafeCache, names: Sequence[str], *, touch: bool = True) -> dict[str, Any]:
        """``{name: bytes or RefusedValue}`` of the names present; ``{}`` if the database could not be read."""
        what = names[0] if len(names) == 1 else f"{len(names)} entries"
        try:
            return cache.get_many(names, touch=touch)
        except sqlite3.OperationalError as exc:
            logger.warning("store %s could not be read (%s); treating %s as a miss", self.directory, exc, what)
        except sqlite3.DatabaseError as exc:
            logger.warning("store %s cannot be read (%s); treating %s as a miss. `compressor-plugin cache "
                           "clear` or deleting the folder starts a fresh store", self.directory, exc, what)
        return {}

    def _discard(self, cache: SafeCache, name: str, reason: str) -> None:
        logger.warning("removing bad store entry %s in %s: %s", name, cache.directory, reason)
        with self._lock:
            self._removed += 1
        if cache.read_only:
            return
        try:
            cache.delete(name)
        except (OSError, sqlite3.Error) as exc:  # disk trouble: the entry stays a miss
            logger.warning("could not remove %s: %s", name, exc)

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreReadOnlyError(f"store {self.directory} is open read-only; writes are refused")

    def _keep_local(self, cache: SafeCache, name: str, data: bytes) -> None:
        """Copy a verified remote value into the folder; failures only cost a later remote read."""
        if self.read_only:
            return
        try:
            cache.set_many([(name, data)], expire=self.expire)
        except (OSError, sqlite3.Error, ValueError) as exc:
            logger.debug("could not keep %s from the remote tier in %s: %s", name, self.directory, exc)

    def _remote_get(self, name: str) -> bytes | None:
        if self.remote is None:
            return None
        return self.remote.get(name)

    # ------------------------------------------------------------------ contexts
    def get(self, key: str, *, device: torch.device | str | None = None,
            expect: Mapping[str, Any] | None = None) -> CompressedContext | None:
        """The verified context stored under ``key``, or None.

        A missing, expired or bad entry is a miss: bad entries (corrupted, truncated, foreign
        or pickled data, a changed header, out-of-range fields, stored under another key) are
        logged, deleted and give None. With a remote tier, a local miss is looked up there;
        a verified remote hit is also written into the folder. With ``expect``
        (:func:`expected_fields` of the reading compressor, or some of them), an entry that says
        otherwise is bad too (:func:`entry_mismatch`).
        """
        return self.get_many([key], device=device, expect=expect)[0]

    def get_many(self, keys: Sequence[str], *, device: torch.device | str | None = None,
                 expect: Mapping[str, Any] | None = None) -> list[CompressedContext | None]:
        """:meth:`get` of each key (None where it misses), with one database query for all of them
        and, with ``device``, one host-to-device copy (:func:`~compressor_plugin.context.contexts_to`).

        Raises:
            ValueError: a malformed key.
        """
        for key in keys:
            _check_key(key)
        found = self._raw_get_many(self._kv, [_CTX + key for key in keys])
        out: list[CompressedContext | None] = []
        for key in keys:
            name = _CTX + key
            data = found.get(name)
            ctx = None
            if isinstance(data, bytes):
                ctx = self._memory.get(key, data)
            if data is not None and ctx is None:
                try:
                    ctx = decode_context(data, key)
                except Exception as exc:  # any failure to parse is a corrupt entry
                    self._memory.discard(key)
                    self._discard(self._kv, name, str(exc))
                else:
                    self._memory.put(key, data, ctx)
            if ctx is None and self.remote is not None:
                remote = self._remote_get(name)
                if remote is not None:
                    try:
                        ctx = decode_context(remote, key)
                    except Exception as exc:
                        logger.warning("ignoring bad entry %s from remote tier %s: %s", name, self.remote, exc)
                    else:
                        self._keep_local(self._kv, name, remote)
                        self._memory.put(key, remote, ctx)
            reason = entry_mismatch(ctx, expect) if ctx is not None and expect else None
            if reason is not None:
                self._memory.discard(key)
                self._discard(self._kv, name, reason)
                ctx = None
            self._count(ctx is not None)
            out.append(ctx)
        if device is None:
            return out
        moved = iter(contexts_to([c for c in out if c is not None], device))
        return [None if c is None else next(moved) for c in out]

    def put(self, key: str, ctx: CompressedContext, text: str | None = None) -> None:
        """Store ``ctx`` under ``key``, and ``text`` (normalised) beside it for fallback.

        Raises:
            ValueError: ``key`` is malformed, a field of ``ctx`` is out of range, or ``text``
                is given and ``key`` is not the key of that text with the context's model,
                compressor, k, mode and dtype.
            TypeError: ``ctx`` is not a CompressedContext.
            StoreReadOnlyError: the store is read-only.
            StoreWriteError: the write failed (disk full, I/O error); nothing was kept.
        """
        self.put_many([(key, ctx, text)])

    def put_many(self, items: Iterable[tuple[str, CompressedContext, str | None]]) -> int:
        """Store several ``(key, context, text-or-None)`` entries, as :meth:`put` does each.

        Every entry is checked and serialised first; then the texts are written in one
        transaction and the contexts in another. Nothing is written if any entry is invalid,
        a failed transaction keeps nothing of its batch (and leaves no value files behind),
        and an overwritten entry keeps its old value until the new one is committed. With a
        remote tier the entries are also written there (a failure there is logged, not raised).

        Returns:
            The number of context bytes written.

        Raises:
            as :meth:`put`.
        """
        self._check_writable()
        entries = []
        for key, ctx, text in items:
            _check_key(key)
            entries.append(_entry(key, ctx, text))
        texts, blobs = store_format.encode_entries(entries)
        if texts:
            self._text.set_many(texts, expire=self.expire)
        if blobs:
            self._kv.set_many(blobs, expire=self.expire)
        if self.remote is not None:
            self.remote.set_many(texts + blobs)
        return sum(len(b) for _, b in blobs)

    def get_text(self, key: str) -> str | None:
        """The normalised text of the chunk stored under ``key``, or None (also when its checksum fails)."""
        _check_key(key)
        name = _TEXT + key
        data = self._raw_get(self._text, name)
        if data is not None:
            try:
                return decode_text(data, key)
            except (ValueError, UnicodeDecodeError) as exc:
                self._discard(self._text, name, str(exc))
        remote = self._remote_get(name)
        if remote is not None:
            try:
                text = decode_text(remote, key)
            except (ValueError, UnicodeDecodeError) as exc:
                logger.warning("ignoring bad entry %s from remote tier %s: %s", name, self.remote, exc)
            else:
                self._keep_local(self._text, name, remote)
                return text
        return None

    def delete(self, key: str) -> bool:
        """Remove a chunk's context and text (here and in the remote tier); True if a local context was there."""
        _check_key(key)
        self._check_writable()
        if self.remote is not None:
            self.remote.delete(_TEXT + key, _CTX + key)
        self._text.delete(_TEXT + key)
        self._memory.discard(key)
        return bool(self._kv.delete(_CTX + key))

    def keys(self) -> Iterator[str]:
        """Keys of the contexts in the folder (unverified; includes expired entries not yet removed)."""
        for name in self._kv.iterkeys():
            if isinstance(name, str) and name.startswith(_CTX):
                yield name[len(_CTX):]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(_KEY_RE.fullmatch(key)) and (_CTX + key) in self._kv

    def __len__(self) -> int:
        """Number of stored contexts (counts keys: O(entries))."""
        return sum(1 for _ in self.keys())

    # ------------------------------------------------------------------ recipes (store_recipes.py)
    def get_or_compress(self, texts: Sequence[str], compressor: "Compressor", **kwargs: Any) -> list[StoreResult]:
        """Contexts of ``texts``, compressing and storing only the misses: :func:`store_recipes.get_or_compress`."""
        from .store_recipes import get_or_compress

        return get_or_compress(self, texts, compressor, **kwargs)

    async def aget_or_compress(self, texts: Sequence[str], compressor: "Compressor", **kwargs: Any) -> list[StoreResult]:
        """:meth:`get_or_compress` in a worker thread, off the event loop."""
        return await asyncio.to_thread(self.get_or_compress, texts, compressor, **kwargs)

    async def aget(self, key: str, **kwargs: Any) -> CompressedContext | None:
        """:meth:`get` in a worker thread."""
        return await asyncio.to_thread(self.get, key, **kwargs)

    @property
    def bytes(self) -> "ByteNamespace":
        """The raw-bytes namespace of this store (:class:`store_recipes.ByteNamespace`)."""
        from .store_recipes import ByteNamespace

        return ByteNamespace(self)

    def get_bytes(self, name: str) -> bytes | None:
        """Bytes stored with :meth:`put_bytes`, or None (:meth:`ByteNamespace.get`)."""
        return self.bytes.get(name)

    def put_bytes(self, name: str, data: bytes) -> None:
        """Store bytes under ``name`` in a namespace apart from contexts (:meth:`ByteNamespace.put`)."""
        self.bytes.put(name, data)

    def delete_bytes(self, name: str) -> bool:
        """Remove a :meth:`put_bytes` entry; True if it was there."""
        return self.bytes.delete(name)

    def byte_keys(self, prefix: str | None = None) -> Iterator[str]:
        """Names of :meth:`put_bytes` entries, optionally only those starting with ``prefix``."""
        return self.bytes.keys(prefix)

    def stats(self) -> dict[str, Any]:
        """Counts and sizes: :func:`store_recipes.store_stats`."""
        from .store_recipes import store_stats

        return store_stats(self)

    def verify(self, *, fix_files: bool = True) -> dict[str, int]:
        """Check every entry and delete bad ones: :func:`store_recipes.verify_store`."""
        from .store_recipes import verify_store

        return verify_store(self, fix_files=fix_files)

    def merge_from(self, other: "ContextStore | str | os.PathLike", *, overwrite: bool = False) -> dict[str, int]:
        """Copy the valid entries of another store into this one: :func:`store_recipes.merge_stores`."""
        from .store_recipes import merge_stores

        return merge_stores(self, other, overwrite=overwrite)

    def clear(self) -> int:
        """Remove every entry of the folder (contexts, texts, byte entries, foreign rows); returns how many.

        The remote tier, if any, is left alone (other machines share it).
        """
        self._check_writable()
        self._memory.clear()
        return int(self._kv.clear()) + int(self._text.clear())

    # ------------------------------------------------------------------ lifetime
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
        extra = ", read_only=True" if self.read_only else ""
        extra += f", remote={self.remote!r}" if self.remote is not None else ""
        return f"ContextStore({str(self.directory)!r}, size_limit={self.size_limit}, expire={self.expire}{extra})"


def _open_cache(folder: Path, **settings: Any) -> SafeCache:
    try:
        return SafeCache(folder, **settings)
    except sqlite3.DatabaseError as exc:
        if is_read_only(exc) or is_disk_full(exc) or isinstance(exc, sqlite3.OperationalError):
            raise StoreError(f"the store database in {folder} cannot be opened ({exc}); it may be on a full or "
                             f"read-only disk, or locked. Free space, or open it with read_only=True") from exc
        raise StoreFormatError(
            f"the store database in {folder} is damaged ({exc}). Everything in a store can be recomputed: "
            f"delete {folder} to start it afresh") from exc


def _open_remote(remote: Any) -> Any:
    if remote is None or not isinstance(remote, str):
        return remote
    from .store_redis import RedisTier

    return RedisTier(remote)
