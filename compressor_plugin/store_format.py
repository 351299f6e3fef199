"""The bytes of stored entries, in plain Python and numpy (no torch).

A stored context is a safetensors file (:meth:`CompressedContext.to_bytes
<compressor_plugin.context.CompressedContext.to_bytes>`) whose metadata carries a digest of its
tensor data and, in a store, the key and an entry digest over every header field
(:func:`compressor_plugin.store.encode_context`). A stored text is a 4-byte tag, a checksum
and the UTF-8 text. This module makes those bytes from raw tensor buffers (bytes, numpy
arrays or memoryviews), without torch: :class:`~compressor_plugin.store.ContextStore` writes
every entry through :func:`encode_entries`, and any process that holds a context's raw data can
make the same bytes.

The safetensors layout is written here rather than by ``safetensors.torch.save``: the same
context always gives the same bytes (metadata keys in sorted order), and the tensor data is
copied once, by one join (under a third of ``save``'s time for a k=16 entry of the default
model). ``safetensors`` reads the result as any other file of its format.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

#: Version of the serialised context format (:class:`~compressor_plugin.context.CompressedContext`).
CONTEXT_FORMAT_VERSION = 1
#: Version of the store's folder layout and key scheme.
STORE_FORMAT_VERSION = 1
#: The ``format`` field of every serialised context.
CONTEXT_FORMAT = "compressor_plugin.CompressedContext"
#: The tag every stored text starts with.
TEXT_MAGIC = b"cpt1"
#: The fields of ``extra`` a store writes into every entry: its key and its entry digest.
KEY_FIELD = "store_key"
DIGEST_FIELD = "store_digest"

#: torch's dtype name -> (safetensors dtype, bytes per element). A store keeps floating-point
#: tensors and int64 anchor ids; the rest serialise too, and are refused when read.
DTYPES: dict[str, tuple[str, int]] = {
    "torch.float32": ("F32", 4), "torch.float16": ("F16", 2), "torch.bfloat16": ("BF16", 2),
    "torch.float64": ("F64", 8), "torch.int64": ("I64", 8), "torch.int32": ("I32", 4), "torch.int16": ("I16", 2),
    "torch.int8": ("I8", 1), "torch.uint8": ("U8", 1), "torch.bool": ("BOOL", 1),
    "torch.float8_e4m3fn": ("F8_E4M3", 1), "torch.float8_e5m2": ("F8_E5M2", 1),
}
#: Floating-point dtypes a context may hold.
FLOAT_DTYPES = ("torch.float32", "torch.float16", "torch.bfloat16", "torch.float64")
#: The exponent field of each floating-point dtype, read through an unsigned view of the same
#: width: a value is NaN or infinite exactly when every bit of its exponent is set.
_EXPONENT = {"torch.float16": (np.uint16, 0x7C00), "torch.bfloat16": (np.uint16, 0x7F80),
             "torch.float32": (np.uint32, 0x7F800000), "torch.float64": (np.uint64, 0x7FF0000000000000)}


@dataclass(frozen=True)
class RawTensor:
    """A tensor as bytes: torch's dtype name (``"torch.bfloat16"``), its shape and its
    C-contiguous little-endian data (bytes, or a memoryview of them)."""

    dtype: str
    shape: tuple[int, ...]
    data: Any

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        n = 1
        for d in self.shape:
            n *= int(d)
        if memoryview(self.data).nbytes != n * DTYPES[self.dtype][1]:
            raise ValueError(f"{memoryview(self.data).nbytes} bytes for a {self.dtype} tensor of shape {self.shape}")


def normalize_text(text: str) -> str:
    """The form of a chunk that is hashed and compressed: Unicode NFC, surrounding whitespace stripped."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, not {type(text).__name__}")
    return unicodedata.normalize("NFC", text).strip()


def context_key(text: str, *, base_fingerprint: str, compressor_fingerprint: str, k: int, mode: str,
                dtype: str) -> str:
    """The store key of a chunk (``dtype``: torch's canonical name, ``"torch.float32"``); see
    :func:`compressor_plugin.store.context_key`."""
    payload = {
        "base": str(base_fingerprint),
        "compressor": str(compressor_fingerprint),
        "context_format": CONTEXT_FORMAT_VERSION,
        "dtype": dtype,
        "k": int(k),
        "mode": str(mode),
        "store_format": STORE_FORMAT_VERSION,
        "text": normalize_text(text),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def text_digest(key: str, body: bytes) -> bytes:
    """The checksum of a stored text: sha256 of the key, a zero byte and the UTF-8 text."""
    return hashlib.sha256(key.encode("ascii") + b"\0" + body).digest()


def encode_text(key: str, text: str) -> bytes:
    """The stored bytes of a chunk's text: a 4-byte tag, sha256 of (key, text), the UTF-8 text."""
    body = text.encode("utf-8")
    return TEXT_MAGIC + text_digest(key, body) + body


def all_finite(t: RawTensor) -> bool:
    """Whether a floating-point tensor holds no NaN or infinite value (its exponent bits, in numpy)."""
    view, exponent = _EXPONENT[t.dtype]
    bits = np.frombuffer(t.data, dtype=view)
    return bits.size == 0 or int(np.bitwise_and(bits, view(exponent)).max()) != exponent


def check_tensors(tensors: Mapping[str, Any], finite: Callable[[Any], bool] = all_finite) -> None:
    """The range checks on a context's K/V or embeddings (not its anchor ids): raw tensors, or
    torch tensors with ``finite`` a check that takes them
    (:func:`compressor_plugin.store.all_finite`).

    Raises:
        ValueError: a non-floating dtype, an empty dimension, or NaN or infinite values.
    """
    for name, t in tensors.items():
        if name == "anchor_ids":
            continue
        if str(t.dtype) not in FLOAT_DTYPES:
            raise ValueError(f"tensors must be floating point, not {t.dtype}")
        if any(d < 1 for d in t.shape):
            raise ValueError(f"tensor shape {tuple(t.shape)} has an empty dimension")
        if not finite(t):
            raise ValueError("tensors hold NaN or infinite values")


def tensor_digest(tensors: Mapping[str, RawTensor]) -> str:
    """sha256 over each tensor's name, shape, dtype name and data, in name order (the
    ``digest`` in a serialised context's metadata)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(tuple(int(d) for d in t.shape)).encode())
        h.update(t.dtype.encode())
        h.update(t.data)
    return h.hexdigest()


def entry_digest(key: str, *, mode: str, k: int, source_tokens: int, base_fingerprint: str,
                 compressor_fingerprint: str, extra: Mapping[str, str], specs: Mapping[str, tuple[str, list[int]]],
                 digest: Any) -> str:
    """sha256 over a stored entry's key, every header field and its tensor digest.

    ``specs``: each tensor's ``(dtype name, shape)``; the entry digest itself, where ``extra``
    holds it, is left out.
    """
    payload = {
        "key": key,
        "mode": mode,
        "k": int(k),
        "source_tokens": int(source_tokens),
        "base_fingerprint": base_fingerprint,
        "compressor_fingerprint": compressor_fingerprint,
        "extra": {name: value for name, value in extra.items() if name != DIGEST_FIELD},
        "tensors": {name: [dtype, list(shape)] for name, (dtype, shape) in specs.items()},
        "tensor_digest": digest,
        "context_format": CONTEXT_FORMAT_VERSION,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def serialize(tensors: Mapping[str, RawTensor], metadata: Mapping[str, str]) -> bytes:
    """safetensors bytes of ``tensors`` with string ``metadata``, the same for the same input.

    The layout is the format's own: an 8-byte little-endian header length, a JSON header
    (padded with spaces to a multiple of 8 bytes) and the tensors' data back to back, widest
    elements first (then by name), so every tensor starts aligned to its element size.
    """
    order = sorted(tensors, key=lambda name: (-DTYPES[tensors[name].dtype][1], name))
    header: dict[str, Any] = {"__metadata__": {str(a): str(b) for a, b in sorted(metadata.items())}}
    offset = 0
    for name in order:
        t = tensors[name]
        size = memoryview(t.data).nbytes
        header[name] = {"dtype": DTYPES[t.dtype][0], "shape": [int(d) for d in t.shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return b"".join([len(blob).to_bytes(8, "little"), blob, *(tensors[name].data for name in order)])


def context_bytes(tensors: Mapping[str, RawTensor], *, mode: str, k: int, source_tokens: int, base_fingerprint: str,
                  compressor_fingerprint: str, extra: Mapping[str, str], digest: str | None = None) -> bytes:
    """A serialised context (``digest``: the tensor digest, when the caller has it already)."""
    meta = {
        "format": CONTEXT_FORMAT,
        "format_version": str(CONTEXT_FORMAT_VERSION),
        "mode": mode,
        "k": str(int(k)),
        "source_tokens": str(int(source_tokens)),
        "base_fingerprint": base_fingerprint,
        "compressor_fingerprint": compressor_fingerprint,
        "digest": digest if digest is not None else tensor_digest(tensors),
        "extra": json.dumps(dict(extra), sort_keys=True),
    }
    return serialize(tensors, meta)


def entry_bytes(key: str, tensors: Mapping[str, RawTensor], *, mode: str, k: int, source_tokens: int,
                base_fingerprint: str, compressor_fingerprint: str, extra: Mapping[str, str]) -> bytes:
    """The stored bytes of a context under ``key``: its serialised form with the key and the
    entry digest in ``extra``. The tensors are hashed once, for both digests."""
    extra = {name: value for name, value in extra.items() if name not in (KEY_FIELD, DIGEST_FIELD)}
    extra[KEY_FIELD] = key
    digest = tensor_digest(tensors)
    fields = {"mode": mode, "k": k, "source_tokens": source_tokens, "base_fingerprint": base_fingerprint,
              "compressor_fingerprint": compressor_fingerprint}
    specs = {name: (t.dtype, list(t.shape)) for name, t in tensors.items()}
    extra[DIGEST_FIELD] = entry_digest(key, **fields, extra=extra, specs=specs, digest=digest)
    return context_bytes(tensors, **fields, extra=extra, digest=digest)


#: Name prefixes of a store's contexts and texts in its databases.
CONTEXT_PREFIX = "ctx:"
TEXT_PREFIX = "text:"


@dataclass(frozen=True)
class Entry:
    """One context to store, as raw tensors and header fields, with its chunk text or None."""

    key: str
    tensors: Mapping[str, RawTensor]
    mode: str
    k: int
    source_tokens: int
    base_fingerprint: str
    compressor_fingerprint: str
    extra: Mapping[str, str]
    text: str | None = None


def encode_entries(entries: Iterable[Entry]) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """The database rows of ``entries``: ``(texts, contexts)``, each a list of ``(name, bytes)``.

    Checks each entry's tensors (:func:`check_tensors`) and, where a text is given, that the
    key is that text's key for the entry's model, compressor, k, mode and dtype; the other
    header fields are the caller's to check (:func:`compressor_plugin.store.check_context_fields`).

    Raises:
        ValueError: a tensor out of range, or a key that is not the text's.
    """
    texts: list[tuple[str, bytes]] = []
    blobs: list[tuple[str, bytes]] = []
    for e in entries:
        check_tensors(e.tensors)
        fields = {"mode": e.mode, "k": e.k, "source_tokens": e.source_tokens, "base_fingerprint": e.base_fingerprint,
                  "compressor_fingerprint": e.compressor_fingerprint}
        if e.text is not None:
            norm = normalize_text(e.text)
            dtype = e.tensors["keys" if e.mode == "kv" else "embeddings"].dtype
            if context_key(norm, base_fingerprint=e.base_fingerprint, compressor_fingerprint=e.compressor_fingerprint,
                           k=e.k, mode=e.mode, dtype=dtype) != e.key:
                raise ValueError("key does not match this text and context (different text, base model, "
                                 "compressor, k, mode or dtype); compute it with ContextStore.key_for")
            texts.append((TEXT_PREFIX + e.key, encode_text(e.key, norm)))
        blobs.append((CONTEXT_PREFIX + e.key, entry_bytes(e.key, e.tensors, **fields, extra=e.extra)))
    return texts, blobs
