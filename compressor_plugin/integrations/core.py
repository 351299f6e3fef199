"""The framework-free core both integrations wrap: options, splitting, compression, metadata.

LangChain's and LlamaIndex's classes only translate their framework's types (documents,
nodes, messages) to and from what is here, so the two behave the same:

* the same options with the same names and checks (:class:`CompressionOptions`: ``on_long``,
  ``batch_size``, ``show_progress``; :func:`check_options` rejects unknown names);
* the same splitter (:func:`split_text`), so one text gets the same store keys in both;
* the same metadata (:func:`compression_metadata`, one helper for both: for a compressed text
  :meth:`CompressedText.metadata`, where ``store_key`` is the first piece's key and ``store_keys``
  all of them; for a text left as text, :func:`skipped_metadata`: ``compressed=False`` and a
  ``skip_reason``);
* the same rule for text that already holds markers (:func:`plan_text`): only markers this
  engine issued are kept as markers; any other text is compressed as text, so a retrieved
  document can never carry a marker into a prompt;
* the same rule for documents with no text (:func:`warn_empty_texts`): passed through
  uncompressed, with one :class:`~compressor_plugin.errors.EmptyDocumentWarning` per call;
* the same loading (:func:`load_engine`, behind every class's ``from_pretrained``, which
  checks the class's options before the model loads) and the same model name (:func:`model_name`, :func:`model_identity`) for the LLM classes;
* the same chat roles (:func:`chat_role`): only ``system``, ``user`` and ``assistant`` (and
  fixed framework names for them) reach the chat template;
* the same message checks (:func:`check_messages`, :func:`unsupported_content`,
  :func:`check_model_switch`): the same error, with the same words, for the same bad input;
* the same text for users (:func:`shown_text`): the chunk text to show in place of a
  compressed document's or node's markers (LangChain's ``source_documents``, LlamaIndex's
  ``source_nodes`` and the sources of its ``CompressedLLM.response_synthesizer``).

Nothing here imports LangChain or LlamaIndex.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence, TypeVar

from ..anchors import DEFAULT_ANCHORS, DEFAULT_WINDOW_SHARE
from ..errors import ContextTooLongError, EmptyDocumentWarning, InvalidOptionError, PromptError, UnknownOptionError
from ..store import normalize_text
from ..text import has_control_text, literal_ids

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import CompressionEngine
    from ..store import ContextStore

__all__ = [
    "CHAT_ROLE_ALIASES",
    "COMPRESSION_METADATA_KEYS",
    "ORIGINAL_TEXT_KEY",
    "RENAMED_OPTIONS",
    "SKIPPED_METADATA_KEYS",
    "SKIP_REASONS",
    "CompressedText",
    "CompressionOptions",
    "FromPretrained",
    "OnLong",
    "ON_LONG_CHOICES",
    "chat_role",
    "check_messages",
    "check_model_switch",
    "check_options",
    "compression_metadata",
    "compression_options",
    "compress_texts",
    "acompress_texts",
    "load_engine",
    "model_identity",
    "model_name",
    "plan_text",
    "shown_text",
    "skip_reason",
    "skipped_metadata",
    "split_text",
    "unsupported_content",
    "warn_empty_texts",
]

logger = logging.getLogger(__name__)

OnLong = Literal["split", "truncate", "error"]
ON_LONG_CHOICES: tuple[str, ...] = ("split", "truncate", "error")

#: Metadata keys written for every compressed document or node (see :meth:`CompressedText.metadata`).
COMPRESSION_METADATA_KEYS: tuple[str, ...] = (
    "compressed", "store_key", "store_keys", "compressed_tokens", "source_tokens", "compression_ratio", "truncated")

#: Metadata keys written for a document or node left as text (see :func:`skipped_metadata`).
SKIPPED_METADATA_KEYS: tuple[str, ...] = ("compressed", "skip_reason")

#: Values of ``metadata["skip_reason"]``: no text at all, or the short-chunk rule.
SKIP_REASONS: tuple[str, ...] = ("empty", "short")

#: Where a compressed document or node keeps its own text once its text is markers.
ORIGINAL_TEXT_KEY = "original_text"

#: Old or other-framework names of the document options, and the option to use instead.
RENAMED_OPTIONS: Mapping[str, str] = {"long_text": "on_long", "progress": "show_progress"}

#: Default decoding settings shared by both frameworks' LLM classes.
DEFAULT_MAX_NEW_TOKENS = 128

#: Fixed role names of LangChain and LlamaIndex for the three chat roles (see :func:`chat_role`).
CHAT_ROLE_ALIASES: Mapping[str, str] = {
    "human": "user", "ai": "assistant",                                   # LangChain's names
    "developer": "system", "chatbot": "assistant", "model": "assistant",  # LlamaIndex's MessageRole
}


# ---------------------------------------------------------------------------------- options
def check_options(owner: str, given: Iterable[str], allowed: Iterable[str],
                  renamed: Mapping[str, str] | None = None) -> None:
    """Raise :class:`UnknownOptionError` for the first name in ``given`` not in ``allowed``.

    ``renamed`` maps old or other-framework names to the option to use instead.
    """
    allowed = set(allowed)
    renamed = dict(renamed or {})
    for name in given:
        if name in allowed:
            continue
        if name in renamed:
            hint = f"; use {renamed[name]!r}"
        else:
            close = difflib.get_close_matches(name, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        public = sorted(a for a in allowed if not a.startswith("_"))
        raise UnknownOptionError(f"{owner} has no option {name!r}{hint} (options: {', '.join(public)})", option=name)


def check_max_tokens(value: Any, option: str = "max_tokens") -> int:
    """A call's token limit as an int of at least 1 (the same bound as the models' fields).

    Raises:
        InvalidOptionError: not an integer, or below 1.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(f"{option} must be an integer of at least 1, not {value!r}", option=option)
    return value


def warn_broken_markers(texts: Iterable[str], stacklevel: int = 3) -> None:
    """Warn (:class:`~compressor_plugin.errors.BrokenMarkerWarning`) when a prompt holds a cut marker."""
    import warnings

    from ..errors import BrokenMarkerWarning
    from ..markers import MARKER_RE, MARKER_START

    for text in texts:
        if isinstance(text, str) and text.count(MARKER_START) > len(MARKER_RE.findall(text)):
            warnings.warn("the prompt holds a cut or damaged compressed-chunk marker, which is passed to the model as "
                          "plain text; a prompt helper or text splitter probably cut a chunk mid-marker (count "
                          "tokens with the LLM's marker-aware tokenizer, or give it a larger context window)",
                          BrokenMarkerWarning, stacklevel=stacklevel)
            return


def stop_list(stop: str | Iterable[str] | None) -> list[str]:
    """Stop strings as a list: one string is one stop string (not its characters); empty ones dropped.

    Raises:
        InvalidOptionError: ``stop`` holds something that is not a string.
    """
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    for s in items:
        if not isinstance(s, str):
            raise InvalidOptionError(f"stop strings must be strings, not {type(s).__name__}", option="stop")
    return [s for s in items if s]


def merge_alias(owner: str, data: dict[str, Any], name: str, alias: str) -> None:
    """Move ``data[alias]`` to ``data[name]`` (in place); both given and different is an error."""
    if alias not in data:
        return
    value = data.pop(alias)
    if name in data and data[name] != value:
        raise InvalidOptionError(f"{owner} got {name}={data[name]!r} and its alias {alias}={value!r}; give one",
                                 option=alias)
    data[name] = value


@dataclass(frozen=True)
class CompressionOptions:
    """How documents are compressed; the same options in both frameworks.

    Args:
        on_long: a text longer than ``engine.max_chunk_tokens``: ``"split"`` (default)
            compresses consecutive pieces of at most that many tokens, cut at token boundaries,
            and puts their markers back to back (one document stays one document);
            ``"truncate"`` compresses the first ``max_chunk_tokens`` tokens only; ``"error"``
            raises :class:`~compressor_plugin.errors.ContextTooLongError`.
        batch_size: chunks per encoder forward pass (store misses only).
        show_progress: a progress bar (tqdm) over the chunks being compressed; off by default.
    """

    on_long: OnLong = "split"
    batch_size: int = 16
    show_progress: bool = False

    def __post_init__(self) -> None:
        if self.on_long not in ON_LONG_CHOICES:
            raise InvalidOptionError(f"on_long must be one of {ON_LONG_CHOICES}, not {self.on_long!r}",
                                     option="on_long")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidOptionError(f"batch_size must be an integer of at least 1, not {self.batch_size!r}",
                                     option="batch_size")
        if not isinstance(self.show_progress, bool):
            raise InvalidOptionError(f"show_progress must be True or False, not {self.show_progress!r}",
                                     option="show_progress")


def compression_options(options: Mapping[str, Any]) -> CompressionOptions:
    """The :class:`CompressionOptions` among ``options`` (other names ignored; absent ones default).

    Every document class checks its options through this, at construction and in
    ``from_pretrained`` before the model loads.

    Raises:
        InvalidOptionError: an option with a value it cannot take.
    """
    return CompressionOptions(**{name: options[name] for name in ("on_long", "batch_size", "show_progress")
                                 if name in options})


def check_engine(engine: Any) -> "CompressionEngine":
    from ..engine import CompressionEngine

    if not isinstance(engine, CompressionEngine):
        raise TypeError(f"engine must be a CompressionEngine, not {type(engine).__name__}")
    return engine


# ---------------------------------------------------------------------------------- loading and naming
def load_engine(checkpoint: str | os.PathLike = "default", store: "ContextStore | str | os.PathLike | None" = None,
                device: Any = None, dtype: Any = None, verbose: bool = False, anchors: int = DEFAULT_ANCHORS,
                question_anchors: bool = True, marker_secret: bytes | None = None,
                window_share: float = DEFAULT_WINDOW_SHARE) -> "CompressionEngine":
    """The engine behind every class's ``from_pretrained``: base model, compressor checkpoint and store.

    Each call loads its own engine (its own copy of the model, its own marker secret). Build
    the document step and the LLM of one pipeline over **one** engine: load one with
    ``from_pretrained`` and hand its ``engine`` to the other class, as markers are valid only
    in the engine that issued them (or in engines given the same ``marker_secret`` and store).

    Args:
        checkpoint: ``"default"`` (= ``"kv-k16"``), another shipped name, or a checkpoint folder.
        store: a :class:`~compressor_plugin.store.ContextStore` or folder; default the user
            cache store.
        device: where the model runs (default: CUDA if available, else CPU).
        dtype: ``"bfloat16"``, ``"float32"``... (default: bf16 on GPU, fp32 on CPU); part of
            every store key, so use the dtype the store was built with.
        verbose: show the model loader's progress bars and messages.
        anchors: anchor token budget per chunk (see :class:`~compressor_plugin.engine.CompressionEngine`);
            default :data:`~compressor_plugin.anchors.DEFAULT_ANCHORS`, 0 for the K/V alone.
        question_anchors: choose each chunk's anchors for the prompt's question (default);
            False keeps those chosen at compression time.
        marker_secret: the secret that signs the engine's markers (at least 32 bytes); default
            a random one kept in memory.
        window_share: the share of a chunk's question-anchor budget its best-matching sentence
            may take verbatim (see :class:`~compressor_plugin.engine.CompressionEngine`); 0 for
            spans only. Default :data:`~compressor_plugin.anchors.DEFAULT_WINDOW_SHARE`.
    """
    from ..engine import CompressionEngine

    return CompressionEngine.from_pretrained(checkpoint, store=store, device=device, dtype=dtype,
                                             marker_secret=marker_secret, verbose=verbose, anchors=anchors,
                                             question_anchors=question_anchors, window_share=window_share)



_Face = TypeVar("_Face", bound="FromPretrained")

#: The arguments of :func:`load_engine`, which ``from_pretrained`` takes besides the class's options.
LOAD_OPTIONS: tuple[str, ...] = ("checkpoint", "store", "device", "dtype", "verbose", "anchors", "question_anchors",
                                 "marker_secret", "window_share")


class FromPretrained:
    """``from_pretrained`` for every class of both integrations: one loader, one signature.

    A class built as ``cls(engine, **options)`` gets it by listing this mixin first among its
    bases. Hooks:

    * :meth:`_option_names`: the options ``cls(engine, **options)`` takes and the renamed ones
      (the class's constructor checks its options against the same names);
    * :meth:`_check_option_values`: value checks that need no engine;
    * :meth:`_from_engine`: for a class that needs more than the engine.
    """

    @classmethod
    def _option_names(cls) -> tuple[frozenset[str], Mapping[str, str]]:
        """The option names ``cls(engine, **options)`` takes, and old or other names -> the one to use.

        Default: the class's pydantic fields (``engine`` and ``class_name`` left out), no renamed names.
        """
        fields = getattr(cls, "model_fields", None) or {}
        return frozenset(fields) - {"engine", "class_name"}, {}

    @classmethod
    def _check_option_values(cls, options: Mapping[str, Any]) -> None:
        """Check what can be checked of ``options``' values without an engine.

        Default: an option that is one of the class's pydantic fields (or another name of one,
        see :meth:`_option_names`) is validated against the field's type and constraints
        (``max_tokens=0`` against ``ge=1``), as the class will validate it after the model
        loads; fields whose type pydantic cannot check on its own are left to the class.

        Raises:
            InvalidOptionError: a value the field refuses (``option`` names the option given).
        """
        from typing import Annotated

        from pydantic import TypeAdapter, ValidationError

        fields = getattr(cls, "model_fields", None) or {}
        _, renamed = cls._option_names()
        for name, value in options.items():
            field = fields.get(renamed.get(name, name))
            if field is None or field.annotation is None:
                continue
            try:
                kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
                adapter = TypeAdapter(kind)
            except Exception:  # an arbitrary type (callbacks, caches): the class checks it
                continue
            try:
                adapter.validate_python(value)
            except ValidationError as e:
                why = e.errors()[0].get("msg", str(e)) if e.errors() else str(e)
                raise InvalidOptionError(f"{cls.__name__}.from_pretrained: {name}={value!r} is refused: {why}",
                                         option=name) from None

    @classmethod
    def check_pretrained_options(cls, options: Mapping[str, Any]) -> None:
        """Refuse options ``from_pretrained`` cannot take, before anything is loaded.

        Raises:
            UnknownOptionError: a name that is neither an argument of
                :func:`~compressor_plugin.integrations.core.load_engine` nor an option of this
                class; the message names it and the closest valid name (``difflib``), e.g.
                ``CompressedChatModel.from_pretrained has no option 'max_token'; did you mean
                'max_tokens'?``. ``engine`` is refused too: ``from_pretrained`` loads its own.
            InvalidOptionError: an option value that can be refused without an engine (for
                example ``on_long="drop"``).
        """
        owner = f"{cls.__name__}.from_pretrained"
        if "engine" in options:
            raise UnknownOptionError(f"{owner} loads its own engine and takes no 'engine'; to build over an engine "
                                     f"you have, use {cls.__name__}(engine, ...)", option="engine")
        allowed, renamed = cls._option_names()
        check_options(owner, options, set(allowed) | set(LOAD_OPTIONS), renamed)
        cls._check_option_values(options)

    @classmethod
    def from_pretrained(cls: type[_Face], checkpoint: str | os.PathLike = "default",
                        store: "ContextStore | str | os.PathLike | None" = None, device: Any = None,
                        dtype: Any = None, verbose: bool = False, anchors: int = DEFAULT_ANCHORS,
                        question_anchors: bool = True, marker_secret: bytes | None = None,
                        window_share: float = DEFAULT_WINDOW_SHARE, **kwargs: Any) -> _Face:
        """Load an engine (:func:`~compressor_plugin.integrations.core.load_engine`: base model,
        compressor checkpoint, store) and build this class over it.

        Args:
            checkpoint, store, device, dtype, verbose, anchors, question_anchors, marker_secret, window_share: as in
                :func:`~compressor_plugin.integrations.core.load_engine`.
            **kwargs: this class's own options. Their names (and the values that can be checked
                without a model) are checked **before** the model loads
                (:meth:`check_pretrained_options`), so a misspelt option fails at once.

        Raises:
            UnknownOptionError: an option this class does not take (the message suggests the
                closest valid one).
            InvalidOptionError: an option value this class cannot take.

        Build the other half of the pipeline over the same engine, e.g.
        ``CompressedDocumentTransformer(model.engine)`` or ``CompressedNodePostprocessor(llm.engine)``:
        markers are valid only in the engine that issued them.
        """
        cls.check_pretrained_options(kwargs)
        engine = load_engine(checkpoint, store=store, device=device, dtype=dtype, verbose=verbose, anchors=anchors,
                             question_anchors=question_anchors, marker_secret=marker_secret,
                             window_share=window_share)
        return cls._from_engine(engine, checkpoint, **kwargs)

    @classmethod
    def _from_engine(cls: type[_Face], engine: "CompressionEngine", checkpoint: str | os.PathLike,
                     **kwargs: Any) -> _Face:
        return cls(engine, **kwargs)  # type: ignore[call-arg]


def model_name(engine: "CompressionEngine") -> str:
    """The name both frameworks' LLM classes report for ``engine`` by default.

    ``<base model>+<mode>-k<k>-<first 8 hex of the compressor fingerprint>``, e.g.
    ``SmolLM2-135M-Instruct+kv-k16-a88ab0df``: the base model that answers, and
    exactly which compressor weights read the chunks (however the checkpoint was named or
    loaded). LangChain's ``model_name`` / ``response_metadata`` / LangSmith ``ls_model_name``
    and LlamaIndex's ``metadata.model_name`` use it.
    """
    comp = engine.compressor
    return f"{comp.base.name}+{comp.mode}-k{int(comp.k)}-{comp.fingerprint[:8]}"


def model_identity(engine: "CompressionEngine") -> dict[str, Any]:
    """What identifies the model behind ``engine``: :func:`model_name` and what decides its answers.

    ``model_name``, ``base_model`` (the base model's name), ``base_fingerprint``, ``dtype``,
    ``compressor`` (the compressor's fingerprint), ``k``, ``mode``, ``anchors``,
    ``question_anchors`` and ``window_share``. The checkpoint's name or folder is left out: the same weights loaded
    under another name answer the same. LangChain's ``_identifying_params`` (and so its LLM
    cache keys) start from these.
    """
    comp = engine.compressor
    return {"model_name": model_name(engine), "base_model": comp.base.name, "base_fingerprint": comp.base.fingerprint,
            "dtype": str(comp.base.dtype).replace("torch.", ""), "compressor": comp.fingerprint, "k": int(comp.k),
            "mode": str(comp.mode), "anchors": int(engine.anchors), "question_anchors": bool(engine.question_anchors),
            "window_share": float(engine.window_share)}


# ---------------------------------------------------------------------------------- chat roles
def chat_role(role: Any, where: str) -> str:
    """The chat-template role for a message's role: ``"system"``, ``"user"`` or ``"assistant"``.

    Those three pass as they are; the fixed names of :data:`CHAT_ROLE_ALIASES` (LangChain's
    ``"human"`` / ``"ai"``, LlamaIndex's ``DEVELOPER`` / ``CHATBOT`` / ``MODEL``) become the role
    they stand for. Anything else is refused: a role is written into the prompt as template
    markup, so a free-text role such as ``"user<|im_end|>\\n<|im_start|>system"`` would forge a
    turn. Enum roles (LlamaIndex's ``MessageRole``) are read by their value.

    Raises:
        PromptError: an unknown role (tool and function roles included: tool calling is not
            supported); the message names ``where`` and the role.
    """
    from ..generation import CHAT_ROLES

    value = getattr(role, "value", role)  # a str-valued Enum (MessageRole) by its value
    if isinstance(value, str):
        if value in CHAT_ROLES:
            return value
        if value in CHAT_ROLE_ALIASES:
            return CHAT_ROLE_ALIASES[value]
    raise PromptError(f"{where} has role {value!r}, which the chat template does not take; use one of "
                      f"{', '.join(repr(r) for r in CHAT_ROLES)} (tool and function messages are not supported)")


def unsupported_content(where: str, kind: Any) -> PromptError:
    """The error both LLM faces raise for a non-text content block (image, audio, file...).

    Reasoning or thinking blocks are skipped by both; any other block that is not text is
    refused with this error, e.g. ``message 0 (HumanMessage) holds a 'image_url' content block;
    only text content is supported``.
    """
    return PromptError(f"{where} holds a {kind!r} content block; only text content is supported")


def check_messages(messages: Sequence[Any]) -> None:
    """Refuse an empty message list, with the same error in both faces.

    Raises:
        PromptError: no messages.
    """
    if not messages:
        raise PromptError("no messages to answer")


def check_model_switch(owner: str, model_name: Any, requested: Any) -> None:
    """Refuse a call option ``model=`` naming another model than the one this LLM runs.

    Raises:
        InvalidOptionError: ``requested`` is given and is not ``model_name``.
    """
    if requested is not None and requested != model_name:
        raise InvalidOptionError(f"{owner} runs {model_name!r}; it cannot switch to model {requested!r}",
                                 option="model")


# ---------------------------------------------------------------------------------- text for users
def shown_text(engine: "CompressionEngine", text: Any, metadata: Mapping[str, Any] | None) -> str | None:
    """The chunk text to show a user in place of a compressed document's or node's markers.

    For a text that is nothing but markers this engine issued, ``metadata[ORIGINAL_TEXT_KEY]``
    (the text the document or node had before it was compressed); None for any other text
    (it is shown as it is), or when the metadata holds no original text. Markers are prompt
    material: a marker shown to a user is a handle that makes the engine read its chunk.
    """
    if not isinstance(text, str) or engine.own_marker_keys(text) is None:
        return None
    original = (metadata or {}).get(ORIGINAL_TEXT_KEY)
    return original if isinstance(original, str) else None


# ---------------------------------------------------------------------------------- splitting
#: Where a piece may end: after a sentence's closing punctuation (and quotes or brackets), or a blank line.
#: A match starts only where a run of closing marks starts (the lookbehind): without it, a
#: document of N dots made the scan try every start inside the run, O(N^2) (32,000 dots took 12 s).
_BOUNDARY_RE = re.compile(r"""(?<![.!?。！？])[.!?。！？]+["'”’)\]]*\s+|\n\s*\n""")


def _most_that_fit(fits: Callable[[int], bool], n: int) -> int:
    """The largest ``m`` in ``[0, n]`` with ``fits(m)``, given ``fits(0)`` and that ``fits`` turns
    false once and stays false (more text, more tokens): doubling steps, then bisection, so a
    piece of many short sentences costs O(log n) tokenisations, not one per sentence."""
    lo, step = 0, 1
    while lo < n:
        hi = min(lo + step, n)
        if not fits(hi):
            break
        lo, step = hi, step * 2
    else:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def split_text(engine: "CompressionEngine", text: str, limit: int) -> list[str]:
    """Consecutive pieces of ``text`` of at most ``limit`` tokens each, cut at sentence ends where possible.

    Sentences (and paragraphs) are packed greedily into pieces; a sentence longer than
    ``limit`` on its own is cut at token boundaries. Every character of ``text`` lands in
    exactly one piece (whitespace-only pieces are dropped), so a document is compressed
    whole and in order, and the same text always gives the same pieces.
    """
    units: list[str] = []
    pos = 0
    for m in _BOUNDARY_RE.finditer(text):
        units.append(text[pos:m.end()])
        pos = m.end()
    if pos < len(text):
        units.append(text[pos:])
    fits = lambda piece: engine.count_tokens(normalize_text(piece)) <= limit  # noqa: E731
    pieces: list[str] = []
    current = ""
    i = 0
    while i < len(units):
        if not current:  # a new piece starts with the next sentence
            unit = units[i]
            i += 1
            if fits(unit):
                current = unit
            else:  # one sentence over the limit: cut it at token boundaries, keep its tail open
                cut = _split_tokens(engine, unit, limit)
                pieces.extend(cut[:-1])
                current = cut[-1] if cut else ""
            continue
        # as many of the following sentences as still fit (the same pieces as adding them one by one)
        m = _most_that_fit(lambda m: fits(current + "".join(units[i:i + m])), len(units) - i)
        current += "".join(units[i:i + m])
        i += m
        if i < len(units):
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return [p for p in pieces if normalize_text(p)]


def _split_tokens(engine: "CompressionEngine", text: str, limit: int) -> list[str]:
    """Consecutive pieces of ``text`` of at most ``limit`` tokens each, cut at token boundaries."""
    tok = engine.tokenizer
    if not getattr(tok, "is_fast", False):  # slow tokenizers have no offsets: decode windows of ids
        ids = literal_ids(tok, text)
        windows = (tok.decode(ids[s:s + limit]) for s in range(0, len(ids), limit))
        return [w for w in windows if normalize_text(w)]
    starts = [a for a, _ in literal_ids(tok, text, return_offsets_mapping=True)["offset_mapping"]]
    n = len(starts)
    pieces: list[str] = []
    start = 0
    while start < n:
        end = min(start + limit, n)
        while True:
            piece = text[starts[start]:(starts[end] if end < n else len(text))]
            # re-tokenising a piece can give a different count at its edges: shrink until it fits
            if end - start <= 1 or engine.count_tokens(normalize_text(piece)) <= limit:
                break
            end -= max(1, (end - start) // 64)
        if normalize_text(piece):
            pieces.append(piece)
        start = end
    return pieces


@dataclass
class Plan:
    """What to do with one text: compress ``texts``, keep the issued markers ``own_keys``, or skip."""

    texts: list[str] = field(default_factory=list)
    own_keys: list[str] | None = None


def plan_text(engine: "CompressionEngine", text: str, on_long: str, document_id: str | None = None) -> Plan:
    """The pieces to compress for one document's text.

    A text that is nothing but markers this engine issued (the output of an earlier step of
    the same pipeline) keeps them. Any other text is compressed as text, marker-shaped
    strings included: a marker inside a retrieved document is data, never a reference.
    Empty text, and text of at most ``engine.keep_text_tokens`` tokens (the short-chunk rule,
    ``engine.stays_text``: compressing it would not shorten the prompt), give an empty plan:
    the text stays as it is.

    Raises:
        ContextTooLongError: ``on_long="error"`` and the text is over ``engine.max_chunk_tokens``.
        InvalidTextError: the text holds a lone surrogate (not Unicode).
    """
    own = engine.own_marker_keys(text) if text else None
    if own is not None:
        return Plan(own_keys=own)
    norm = normalize_text(text or "")
    if not norm:
        return Plan()
    limit = int(engine.max_chunk_tokens)
    n = engine.count_tokens(norm, f"document {document_id!r}" if document_id is not None else "a document")
    # the text that stays goes into prompts as it was given, so it is the raw text that must not
    # spell a control token (normalising can hide one: ">" + U+0338 becomes one character)
    if engine.stays_text(norm, n) and not has_control_text(engine.tokenizer, text):
        return Plan()
    if n <= limit or on_long == "truncate":
        return Plan([norm])
    if on_long == "error":
        raise ContextTooLongError(
            f"document {document_id!r} has {n} tokens, more than the compressor's limit of {limit}; split documents "
            "before compressing them, or use on_long='split' or on_long='truncate'",
            tokens=n, limit=limit, document_id=document_id, option="on_long")
    return Plan(split_text(engine, norm, limit))


# ---------------------------------------------------------------------------------- compression
@dataclass
class CompressedText:
    """One document's compressed pieces: keys, markers and counts."""

    keys: list[str]
    markers: list[str]
    compressed_tokens: int
    source_tokens: int
    truncated: bool = False
    hits: int = 0

    @property
    def marker_text(self) -> str:
        """The markers back to back: the document's text in prompts."""
        return "".join(self.markers)

    def metadata(self) -> dict[str, Any]:
        """The metadata both integrations add: ``compressed`` (True), ``store_key`` (the first
        piece's key), ``store_keys`` (all, in order), ``compressed_tokens`` (k plus anchor tokens per piece),
        ``source_tokens``, ``compression_ratio`` and, only when text was cut, ``truncated``."""
        meta: dict[str, Any] = {
            "compressed": True,
            "store_key": self.keys[0],
            "store_keys": list(self.keys),
            "compressed_tokens": self.compressed_tokens,
            "source_tokens": self.source_tokens,
            "compression_ratio": self.source_tokens / self.compressed_tokens if self.compressed_tokens else 0.0,
        }
        if self.truncated:
            meta["truncated"] = True
        return meta


def skip_reason(text: Any) -> str:
    """Why a text was left as text: ``"empty"`` (no text, or whitespace only) or ``"short"``.

    Only meaningful for a text that :func:`compress_texts` gave None for; such a text is either
    empty or kept by the short-chunk rule (``engine.stays_text``: compressing it would not
    shorten the prompt).
    """
    return "short" if isinstance(text, str) and normalize_text(text) else "empty"


def skipped_metadata(text: Any) -> dict[str, Any]:
    """The metadata both integrations add to a document or node left as text.

    ``compressed`` (False) and ``skip_reason`` (:func:`skip_reason`: ``"empty"`` or
    ``"short"``); no store key, since nothing was stored.
    """
    return {"compressed": False, "skip_reason": skip_reason(text)}


def compression_metadata(metadata: Mapping[str, Any] | None, result: "CompressedText | None", text: Any,
                         original_text: bool = False) -> dict[str, Any]:
    """A document's or node's metadata after compression: the one helper both faces use.

    Returns a new dict: ``metadata`` without any compression keys left from an earlier run
    (:data:`COMPRESSION_METADATA_KEYS`, ``skip_reason``), plus :meth:`CompressedText.metadata`
    for a compressed ``result``, or :func:`skipped_metadata` when ``result`` is None (the text
    is empty or short and stays text). With ``original_text``, a compressed document or node
    also keeps ``text`` under :data:`ORIGINAL_TEXT_KEY` (its text is about to become markers).
    """
    stale = set(COMPRESSION_METADATA_KEYS) | set(SKIPPED_METADATA_KEYS)
    out = {k: v for k, v in (metadata or {}).items() if k not in stale}
    if result is None:
        out.update(skipped_metadata(text))
        return out
    out.update(result.metadata())
    if original_text:
        out[ORIGINAL_TEXT_KEY] = text
    return out


def _assemble(engine: "CompressionEngine", plans: Sequence[Plan], results: Sequence[Any]) -> list[CompressedText | None]:
    out: list[CompressedText | None] = []
    pos = 0
    for plan in plans:
        if plan.own_keys is not None:
            out.append(_own(engine, plan.own_keys))
            continue
        if not plan.texts:
            out.append(None)
            continue
        mine = results[pos:pos + len(plan.texts)]
        pos += len(plan.texts)
        keys = [r.key for r in mine]
        out.append(CompressedText(
            keys=keys, markers=[engine.marker(k) for k in keys],
            compressed_tokens=sum(r.context.positions for r in mine),
            source_tokens=sum(r.context.source_tokens for r in mine),
            truncated=any(r.context.extra.get("truncated") == "true" for r in mine),
            hits=sum(1 for r in mine if r.hit)))
    return out


def _own(engine: "CompressionEngine", keys: list[str]) -> CompressedText:
    """Counts for markers this engine issued earlier (from the store's entries when present)."""
    comp = src = 0
    for key in keys:
        ctx = engine.store.get(key)
        comp += ctx.positions if ctx is not None else int(engine.compressor.k) + engine.anchors
        src += ctx.source_tokens if ctx is not None else 0
    return CompressedText(keys=list(keys), markers=[engine.marker(k) for k in keys], compressed_tokens=comp,
                          source_tokens=src, hits=len(keys))


def warn_empty_texts(texts: Sequence[Any], document_ids: Sequence[str | None] | None = None) -> list[int]:
    """Warn once when some texts are empty or whitespace only; their positions.

    The rule of both frameworks: such a document or node is passed through uncompressed (it
    has nothing to compress) and the call issues **one**
    :class:`~compressor_plugin.errors.EmptyDocumentWarning`, e.g. ``2 of 5 documents have no
    text; they are passed through uncompressed``, whose ``positions`` and ``document_ids``
    say which (the text does not: ids are untrusted, see the warning class). The warning
    points at the caller's code (the first frame outside this package).
    """
    empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not normalize_text(t)]
    if empty:
        ids = list(document_ids) if document_ids is not None else [None] * len(texts)
        if len(empty) == 1:
            message = f"1 of {len(texts)} documents has no text; it is passed through uncompressed"
        else:
            message = f"{len(empty)} of {len(texts)} documents have no text; they are passed through uncompressed"
        from ..markers import _caller_level

        warnings.warn(EmptyDocumentWarning(message, empty, [ids[i] for i in empty]), stacklevel=_caller_level())
        # debug, not info: the warning above already tells the user, once
        logger.debug("documents without text, passed through uncompressed: %s",
                     ", ".join(f"{i} (id={ids[i]!r})" for i in empty[:20]) + (", ..." if len(empty) > 20 else ""))
    return empty


def _compress(engine: "CompressionEngine", texts: Sequence[str], options: CompressionOptions,
              ids: Sequence[str | None]) -> list[CompressedText | None]:
    plans = [plan_text(engine, t, options.on_long, i) for t, i in zip(texts, ids)]
    flat = [t for p in plans for t in p.texts]
    results = engine.compress(flat, batch_size=options.batch_size, truncate=options.on_long == "truncate",
                              progress=options.show_progress) if flat else []
    return _assemble(engine, plans, results)


def compress_texts(engine: "CompressionEngine", texts: Sequence[str], options: CompressionOptions,
                   document_ids: Sequence[str | None] | None = None) -> list[CompressedText | None]:
    """Compress each text through the engine's store; one result per text (None: left as text).

    None is for a text that is empty (or whitespace only) or short enough to stay text (the
    short-chunk rule); :func:`compression_metadata` records which (:func:`skip_reason`).

    All pieces of all texts go to the store in one call (misses compressed in batches, with a
    progress bar when ``options.show_progress``). Empty or whitespace-only texts give None and
    one :class:`~compressor_plugin.errors.EmptyDocumentWarning` (:func:`warn_empty_texts`).

    Raises:
        ContextTooLongError: ``options.on_long == "error"`` and a text is too long (its
            ``document_id`` is set).
    """
    ids = list(document_ids) if document_ids is not None else [None] * len(texts)
    warn_empty_texts(texts, ids)
    return _compress(engine, texts, options, ids)


async def acompress_texts(engine: "CompressionEngine", texts: Sequence[str], options: CompressionOptions,
                          document_ids: Sequence[str | None] | None = None) -> list[CompressedText | None]:
    """:func:`compress_texts` in a worker thread (the event loop stays free; the warning is
    issued before, in the caller's thread)."""
    ids = list(document_ids) if document_ids is not None else [None] * len(texts)
    warn_empty_texts(texts, ids)
    return await asyncio.to_thread(_compress, engine, texts, options, ids)
