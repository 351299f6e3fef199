"""Markers: how compressed chunks travel through LangChain / LlamaIndex prompts.

Frameworks hand an LLM a prompt string, never the documents. So the document transformer /
node postprocessor replaces each chunk's text with a short marker naming its store key, and
the LLM wrapper resolves every marker back into the stored :class:`CompressedContext` at the
marker's place. A marker whose entry is missing falls back to the chunk's text (kept in the
store beside the K/V), with a warning.

Marker format: ``[[cc:<64 hex sha256 key>]]``. It contains no braces, so it survives
f-string and Jinja prompt templates unchanged.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from .context import CompressedContext

logger = logging.getLogger(__name__)

MARKER_RE = re.compile(r"\[\[cc:([0-9a-f]{64})\]\]")


class MissingChunkWarning(UserWarning):
    """A marker's compressed entry was missing; its text was used instead."""


class MarkerLookup(Protocol):
    """What marker resolution needs from a store."""

    def get(self, key: str) -> CompressedContext | None: ...

    def get_text(self, key: str) -> str | None: ...


def make_marker(key: str) -> str:
    """The marker string for a store key."""
    if not re.fullmatch(r"[0-9a-f]{64}", key or ""):
        raise ValueError(f"a store key is 64 lowercase hex characters, got {key!r}")
    return f"[[cc:{key}]]"


def has_markers(text: str) -> bool:
    return bool(MARKER_RE.search(text or ""))


def split_markers(text: str) -> list[str | tuple[str]]:
    """Split text into plain strings and ``(key,)`` tuples, in order."""
    out: list[str | tuple[str]] = []
    pos = 0
    for m in MARKER_RE.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append((m.group(1),))
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


@dataclass
class Resolution:
    """Segments for the generator, and what resolution found."""

    segments: list[Any]
    resolved: int = 0
    fallbacks: int = 0
    missing_keys: list[str] = field(default_factory=list)


def resolve_markers(parts: Sequence[Any], store: MarkerLookup | None, *, fallback: str = "text") -> Resolution:
    """Replace markers inside string parts with stored contexts.

    Args:
        parts: prompt segments (strings may contain markers; other segments pass through).
        store: where contexts and fallback texts are looked up.
        fallback: ``"text"`` (use the stored text and warn) or ``"error"`` (raise KeyError).

    Whitespace-only text between two compressed contexts is dropped: compressors are trained
    with chunks placed back to back.
    """
    res = Resolution(segments=[])
    raw: list[Any] = []
    for part in parts:
        if not isinstance(part, str) or not has_markers(part):
            raw.append(part)
            continue
        if store is None:
            raise ValueError("the prompt holds compressed-chunk markers but no store was given to resolve them")
        for piece in split_markers(part):
            if isinstance(piece, str):
                raw.append(piece)
                continue
            key = piece[0]
            ctx = store.get(key)
            if ctx is not None:
                raw.append(ctx)
                res.resolved += 1
                continue
            text = store.get_text(key)
            if fallback == "error" or text is None:
                raise KeyError(f"compressed chunk {key[:12]}... is not in the store and its text is unknown; "
                               "re-run the document transformer / ingestion for these documents")
            warnings.warn(f"compressed chunk {key[:12]}... missing from the store; using its text", MissingChunkWarning,
                          stacklevel=2)
            logger.warning("compressed chunk %s missing; falling back to text", key[:12])
            raw.append(text)
            res.fallbacks += 1
            res.missing_keys.append(key)
    # drop whitespace-only strings sitting between two compressed contexts
    for i, seg in enumerate(raw):
        if isinstance(seg, str) and not seg.strip() and 0 < i < len(raw) - 1 \
                and isinstance(raw[i - 1], CompressedContext) and isinstance(raw[i + 1], CompressedContext):
            continue
        res.segments.append(seg)
    return res
