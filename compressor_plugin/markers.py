"""Markers: how compressed chunks travel through LangChain / LlamaIndex prompts.

Frameworks hand an LLM a prompt string, never the documents. So the document transformer /
node postprocessor replaces each chunk's text with a short marker naming its store key, and
the LLM wrapper resolves every marker back into the stored :class:`CompressedContext` at the
marker's place.

A marker is text, and text also comes from users and from retrieved documents. So every
marker carries a tag, an HMAC of its key made with a secret that only the engine that issued
it holds (:class:`MarkerSigner`): only markers issued by this engine are looked up. Any other
marker -- typed by a user, carried inside a retrieved document, issued by another engine or
another process, or with its tag cut off -- is passed to the model as plain text with an
:class:`~compressor_plugin.errors.UnauthorizedMarkerWarning`, without touching the store.
docs/security.md gives the threat model.

Marker format: ``[[cc:<64 hex store key>.<32 hex tag>]]``. It contains no braces, so it
survives f-string and Jinja prompt templates unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .context import CompressedContext
from .errors import MissingChunkError, MissingChunkWarning, UnauthorizedMarkerWarning  # noqa: F401

logger = logging.getLogger(__name__)

#: The start every marker has; a prompt holding it outside a whole marker has a damaged one.
MARKER_START = "[[cc:"
#: Anything shaped like a marker: group 1 the key, group 2 the tag (None when absent).
MARKER_RE = re.compile(r"\[\[cc:([0-9a-f]{64})(?:\.([0-9a-f]{32}))?\]\]")
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_TAG_BYTES = 16


class MarkerLookup(Protocol):
    """What marker resolution needs from a store."""

    def get(self, key: str) -> CompressedContext | None: ...

    def get_text(self, key: str) -> str | None: ...


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"a store key is 64 lowercase hex characters, got {key!r}")
    return key


class MarkerSigner:
    """Issues and checks the tags that make a marker valid.

    Args:
        secret: at least 32 bytes; by default 32 random bytes drawn now and kept only in
            memory, so markers are valid for the lifetime of this signer and nowhere else.
            Pass the same secret to engines in several processes that must accept each
            other's markers (keep it as secret as a password).
        scope: bound into every tag (the engine passes its store folder), so a marker issued
            for one store is refused by a signer with the same secret over another store.
    """

    def __init__(self, secret: bytes | None = None, scope: str = ""):
        if secret is None:
            secret = secrets.token_bytes(32)
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < 32:
            raise ValueError("a marker secret is at least 32 bytes")
        self._secret = bytes(secret)
        self.scope = str(scope)

    def __repr__(self) -> str:  # never show the secret
        return f"MarkerSigner(scope={self.scope!r})"

    def tag(self, key: str) -> str:
        """The tag of ``key`` (32 hex characters)."""
        msg = f"{self.scope}\0{_check_key(key)}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).digest()[:_TAG_BYTES].hex()

    def marker(self, key: str) -> str:
        """The marker string standing for the stored chunk ``key`` in prompts."""
        return make_marker(key, self.tag(key))

    def verify(self, key: str, tag: str | None) -> bool:
        """Whether ``tag`` is this signer's tag for ``key`` (constant-time compare)."""
        return tag is not None and hmac.compare_digest(self.tag(key), tag)

    def own_keys(self, text: str) -> list[str] | None:
        """The keys if ``text`` is nothing but valid markers of this signer (back to back), else None."""
        found = list(MARKER_RE.finditer(text or ""))
        if not found or "".join(m.group(0) for m in found) != text:
            return None
        if not all(self.verify(m.group(1), m.group(2)) for m in found):
            return None
        return [m.group(1) for m in found]


def make_marker(key: str, tag: str) -> str:
    """Format a marker from a store key and its tag (use :meth:`MarkerSigner.marker` to make one)."""
    _check_key(key)
    if not isinstance(tag, str) or not re.fullmatch(r"[0-9a-f]{32}", tag):
        raise ValueError(f"a marker tag is 32 lowercase hex characters, got {tag!r}")
    return f"{MARKER_START}{key}.{tag}]]"


def has_markers(text: str) -> bool:
    """Whether ``text`` holds anything shaped like a marker (valid or not)."""
    return bool(MARKER_RE.search(text or ""))


def split_markers(text: str) -> list[str | tuple[str, str | None]]:
    """Split text into plain strings and ``(key, tag)`` tuples (tag None when absent), in order."""
    out: list[str | tuple[str, str | None]] = []
    pos = 0
    for m in MARKER_RE.finditer(text):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        out.append((m.group(1), m.group(2)))
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


@dataclass
class Resolution:
    """Segments for the generator, and what resolution found.

    ``rejected`` counts markers passed through as text because this engine did not issue them.
    """

    segments: list[Any]
    resolved: int = 0
    fallbacks: int = 0
    missing_keys: list[str] = field(default_factory=list)
    rejected: int = 0


def resolve_markers(parts: Sequence[Any], store: MarkerLookup | None, signer: MarkerSigner | None, *,
                    fallback: str = "text", literal: Callable[[str], Any] | None = None,
                    on_context: Callable[[str, Any], Any] | None = None) -> Resolution:
    """Replace the markers ``signer`` issued, inside string parts, with stored contexts.

    Args:
        parts: prompt segments (strings may contain markers; other segments pass through).
        store: where contexts and fallback texts are looked up.
        signer: the signer whose markers may be resolved; ``None`` resolves nothing.
        fallback: for an issued marker whose K/V is missing, ``"text"`` (use the stored text
            and warn) or ``"error"`` (raise :class:`~compressor_plugin.errors.MissingChunkError`).
        literal: makes the segment for a fallback text; the engine passes one that tokenises it
            literally (a stored ``<|im_end|>`` stays text). ``None`` keeps the text a string.
        on_context: applied to each stored context with its key (the engine's question anchors).

    A marker that ``signer`` did not issue stays in the prompt as plain text, with an
    :class:`~compressor_plugin.errors.UnauthorizedMarkerWarning`; the store is not consulted
    for it, so a prompt learns nothing about what the store holds.

    Raises:
        MissingChunkError: an issued marker's chunk is gone, K/V and text both (or
            ``fallback="error"`` and its K/V is gone).

    Whitespace-only text between two compressed contexts is dropped: compressors are trained
    with chunks placed back to back.
    """
    if fallback not in ("text", "error"):
        raise ValueError(f"fallback must be 'text' or 'error', not {fallback!r}")
    res = Resolution(segments=[])
    raw: list[Any] = []
    rejected: list[tuple[str, str | None]] = []
    for part in parts:
        if not isinstance(part, str) or not has_markers(part):
            raw.append(part)
            continue
        for piece in split_markers(part):
            if isinstance(piece, str):
                raw.append(piece)
                continue
            key, tag = piece
            if signer is None or store is None or not signer.verify(key, tag):
                rejected.append((key, tag))
                raw.append(make_marker(key, tag) if tag else f"{MARKER_START}{key}]]")
                res.rejected += 1
                continue
            ctx = store.get(key)
            if ctx is not None:
                raw.append(on_context(key, ctx) if on_context is not None else ctx)
                res.resolved += 1
                continue
            text = store.get_text(key)
            if fallback == "error" or text is None:
                raise MissingChunkError(
                    f"compressed chunk {key[:12]}... is not in the store" + ("" if text is not None else
                                                                             " and its text is unknown")
                    + "; re-run the document transformer / ingestion for these documents", key=key)
            warnings.warn(f"compressed chunk {key[:12]}... missing from the store; using its text", MissingChunkWarning,
                          stacklevel=_caller_level())
            # debug, not info: the warning above already tells the user, once
            logger.debug("compressed chunk %s missing; falling back to text", key[:12])
            raw.append(literal(text) if literal is not None else text)
            res.fallbacks += 1
            res.missing_keys.append(key)
    if rejected:
        _warn_unauthorized(rejected)
    # drop whitespace-only strings sitting between two compressed contexts
    for i, seg in enumerate(raw):
        if isinstance(seg, str) and not seg.strip() and 0 < i < len(raw) - 1 \
                and isinstance(raw[i - 1], CompressedContext) and isinstance(raw[i + 1], CompressedContext):
            continue
        res.segments.append(seg)
    return res


def _caller_level() -> int:
    """``stacklevel`` that points a warning at the first frame outside this package (the user's call)."""
    import sys

    f, level = sys._getframe(2), 2  # the frame that called the warning's caller
    while f is not None and f.f_globals.get("__name__", "").startswith("compressor_plugin"):
        f, level = f.f_back, level + 1
    return level


def _warn_unauthorized(rejected: list[tuple[str, str | None]]) -> None:
    """One warning per prompt, whatever its markers: the text is constant (no key in it), so
    forged markers cannot fill Python's per-message warning registry or flood the log."""
    untagged = sum(tag is None for _, tag in rejected)
    why = ("have no tag" if untagged == len(rejected) else "have a tag this engine did not issue" if not untagged
           else "have no tag or a tag this engine did not issue")
    warnings.warn(f"the prompt holds compressed-chunk markers that {why}; they are passed to the model as plain "
                  "text and not looked up (markers are valid only in the engine that made them). If your "
                  "pipeline's document step and model were built from two engines, build both from one: "
                  "CompressedDocumentTransformer(engine) with CompressedChatModel(engine), or "
                  "CompressedNodePostprocessor(engine) with CompressedLLM(engine)",
                  UnauthorizedMarkerWarning, stacklevel=_caller_level())
    # debug, not info: the warning above already tells the user, once
    logger.debug("%d unauthorised marker(s) left as text (%d without a tag), first %s...",
                 len(rejected), untagged, rejected[0][0][:12])
