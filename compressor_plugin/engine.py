"""CompressionEngine: compressor + store + generator, the object the integrations share.

It does the three things a compressed RAG pipeline needs, independent of any framework:

* :meth:`CompressionEngine.compress` / :meth:`mark`: compress chunks through the store (each
  chunk once, ever) and return markers that stand for them in prompts;
* :meth:`resolve`: turn a prompt string or chat messages holding markers into generator
  segments (stored K/V at each marker's place, text fallback when an entry is missing). Only
  markers this engine issued are resolved; any other marker is plain text (docs/security.md);
* :meth:`generate` / :meth:`stream` / :meth:`agenerate` / :meth:`astream`: answer with the
  unchanged base model (:meth:`stream_result` / :meth:`astream_result` also give the finished
  stream's :class:`EngineResult`).

Example:
    >>> eng = CompressionEngine.from_pretrained()                       # doctest: +SKIP
    >>> markers = eng.mark(["Paris is the capital of France."])         # doctest: +SKIP
    >>> eng.generate(f"Context: {markers[0]}\\nQuestion: What is the capital of France?\\nAnswer:").text  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import os
import threading
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

# Before torch is imported (it starts its OpenMP pool on import): waiting threads sleep instead of
# spinning, which keeps a small or shared CPU fast. A value the user set is kept; it has no effect
# if torch was imported before this module.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from .anchors import DEFAULT_ANCHORS, DEFAULT_WINDOW_SHARE
from .compressor import Compressor
from .context import CompressedContext
from .generation import (CHAT_ROLES, GenerationConfig, GenerationResult, GenerationStream,  # noqa: F401 (CHAT_ROLES re-exported)
                         Generator, TokenIds, check_messages)
from .markers import MarkerSigner, Resolution, resolve_markers, split_markers
from .models import verbose_loading
from .store import ContextStore, StoreResult, expected_fields
from .text import check_text, has_control_text, literal_ids

Message = dict[str, Any]

@dataclass
class EngineResult:
    """A generation plus what marker resolution found."""

    generation: GenerationResult
    resolved_chunks: int = 0
    fallback_chunks: int = 0
    missing_keys: list[str] = field(default_factory=list)
    rejected_chunks: int = 0  # markers this engine did not issue, passed to the model as text

    @property
    def text(self) -> str:
        return self.generation.text

    def usage(self) -> dict[str, int]:
        """Token accounting: what the model attended to and what compression saved."""
        g = self.generation
        return {"prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.token_ids),
                "total_tokens": g.prompt_tokens + len(g.token_ids), "text_tokens": g.text_tokens,
                "compressed_tokens": g.compressed_tokens, "source_tokens": g.source_tokens,
                "tokens_saved": g.tokens_saved}


#: Chunks whose anchor spans an engine keeps in memory for question anchors (least recently used dropped).
_SPAN_CACHE = 4096
#: Tokens a chunk may exceed k by and still stay text (see CompressionEngine.keep_text_tokens).
SHORT_TEXT_MARGIN = 8


def stays_text(tokenizer: Any, text: str, tokens: int, k: int, anchors: int) -> bool:
    """The short-chunk rule, shared by :meth:`CompressionEngine.stays_text` and ``cache build``.

    True for a chunk of ``tokens`` tokens that is not longer than its compressed form (``k``
    positions plus the ``anchors`` budget) plus :data:`SHORT_TEXT_MARGIN`: compressing it saves
    (almost) nothing, and its text is exact. False when it spells a control token of the model
    (``<|im_end|>``...): prompt strings are read with control tokens recognised, so such a chunk
    is compressed like a long one and never acts as markup.
    """
    return tokens <= int(k) + int(anchors) + SHORT_TEXT_MARGIN and not has_control_text(tokenizer, text)


class _CheckedLookup:
    """A store's ``get`` with ``expect`` fixed, and its ``get_text`` (what marker resolution reads)."""

    def __init__(self, store: ContextStore, expect: dict[str, Any]):
        self.store, self.expect = store, expect

    def get(self, key: str) -> CompressedContext | None:
        return self.store.get(key, expect=self.expect)

    def get_text(self, key: str) -> str | None:
        return self.store.get_text(key)


class CompressionEngine:
    """Compressor, store and generator over one loaded base model.

    Args:
        compressor: a loaded :class:`Compressor` (its base model is the decoder).
        store: a :class:`ContextStore`; by default the one in the user cache directory.
        marker_secret: the secret that signs this engine's markers (at least 32 bytes). By
            default a random one kept in memory: only markers this engine issued are resolved,
            by this engine only. Give several processes the same secret (and store) when one
            issues markers that another must resolve.
        anchors: anchor token budget per chunk (:mod:`compressor_plugin.anchors`): besides its
            k compressed tokens, each chunk keeps up to this many tokens of its salient exact
            spans (names, numbers, dates, rare words) that the model reads as text right after
            the chunk. They are prompt tokens: a chunk then takes ``k + anchors`` positions at
            most. Part of every store key. Default :data:`~compressor_plugin.anchors.DEFAULT_ANCHORS`;
            0 gives the K/V alone.
        question_anchors: spend each chunk's anchor budget on what the prompt asks: when a
            prompt is resolved, the spans of the chunk's sentences that share words with the
            prompt's own text (the question) are taken first, from the chunk's stored text
            (:func:`~compressor_plugin.anchors.select_anchors` with ``question``). Same budget,
            same store entries; a chunk whose text is not in the store keeps the anchors stored
            with it. Default True.
        window_share: with question anchors, the share of a chunk's anchor budget that its
            sentence best matching the question may take verbatim, before the other spans
            (a *sentence window*: the model reads which name or number answers, not only a
            list of them; :func:`~compressor_plugin.anchors.select_anchors`). 0 keeps spans
            only. Default :data:`~compressor_plugin.anchors.DEFAULT_WINDOW_SHARE`.
    """

    def __init__(self, compressor: Compressor, store: ContextStore | None = None, *,
                 marker_secret: bytes | None = None, anchors: int = DEFAULT_ANCHORS, question_anchors: bool = True,
                 window_share: float = DEFAULT_WINDOW_SHARE):
        from .anchors import check_budget, check_window_share

        self.anchors = check_budget(anchors)
        self.question_anchors = bool(question_anchors)
        self.window_share = check_window_share(window_share)
        self._spans: OrderedDict[str, tuple[str, list]] = OrderedDict()  # key -> (text, anchor spans), bounded
        self._spans_lock = threading.Lock()
        self.compressor = compressor
        self.store = store if store is not None else ContextStore()
        self.signer = MarkerSigner(marker_secret, scope=str(getattr(self.store, "directory", "")))
        self.generator = Generator(compressor.base, compressor)
        self._lock = compressor.lock  # the adapter switch is model-wide: one forward at a time
        self.checkpoint: str | None = None  # the shipped name or folder it was loaded from, if any

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike = "default", *, store: ContextStore | str | os.PathLike | None = None,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        marker_secret: bytes | None = None, verbose: bool = False,
                        anchors: int = DEFAULT_ANCHORS, question_anchors: bool = True,
                        window_share: float = DEFAULT_WINDOW_SHARE,
                        allow_download: bool = False) -> "CompressionEngine":
        """Load the base model and a compressor checkpoint (shipped name or folder), open a store.

        ``verbose=True`` shows the loading library's progress bars and info messages (off by
        default); ``marker_secret``, ``anchors``, ``question_anchors`` and ``window_share`` are
        as for :class:`CompressionEngine`; ``allow_download`` as for :meth:`Compressor.from_pretrained`.
        """
        from .anchors import check_budget, check_window_share

        check_budget(anchors)  # before the model loads: a bad option fails in a second
        check_window_share(window_share)
        if store is not None and not isinstance(store, ContextStore):
            store = ContextStore(store)  # before the model loads: a bad store path fails in a second, not after it
        with verbose_loading(verbose):
            comp = Compressor.from_pretrained(checkpoint, device=device, dtype=dtype, allow_download=allow_download)
        comp.match_adapter_dtype()  # inference only: a bf16 model runs its encoder in bf16 end to end
        engine = cls(comp, store, marker_secret=marker_secret, anchors=anchors, question_anchors=question_anchors,
                     window_share=window_share)
        engine.checkpoint = str(checkpoint)
        return engine

    @property
    def tokenizer(self) -> Any:
        return self.compressor.tokenizer

    @property
    def max_chunk_tokens(self) -> int:
        return self.compressor.config.max_length

    @property
    def keep_text_tokens(self) -> int:
        """Chunks of at most this many tokens stay text (the short-chunk rule).

        A chunk that is not longer than its compressed form (k positions, plus the anchor
        budget when anchors are on) plus a margin of :data:`SHORT_TEXT_MARGIN` tokens saves
        (almost) nothing when compressed, and the text itself is exact, where compression loses
        names and numbers. So it stays text.
        """
        return int(self.compressor.k) + self.anchors + SHORT_TEXT_MARGIN

    def count_tokens(self, text: str, what: str = "the chunk") -> int:
        """Tokens of ``text`` read literally (the unit of :attr:`keep_text_tokens` and ``max_chunk_tokens``).

        Raises:
            InvalidTextError: ``text`` (named ``what`` in the message) holds a lone surrogate.
        """
        check_text(text, what)
        return len(literal_ids(self.tokenizer, text))

    def stays_text(self, text: str, tokens: int | None = None) -> bool:
        """The short-chunk rule: whether a chunk goes into prompts as its own text, uncompressed.

        True for a chunk of at most :attr:`keep_text_tokens` tokens (``tokens``, when the
        caller has counted them already), unless it spells a control token of the model
        (``<|im_end|>``...): such a chunk is compressed like a long one, since prompt strings
        are read with control tokens recognised and the chunk must not act as markup there.
        """
        n = self.count_tokens(text) if tokens is None else tokens
        return stays_text(self.tokenizer, text, n, self.compressor.k, self.anchors)

    # ------------------------------------------------------------------ compression
    def compress(self, texts: Sequence[str], *, batch_size: int = 16, truncate: bool = False,
                 progress: bool = False) -> list[StoreResult]:
        """Look chunks up in the store, compress the misses in batches, store them (input order).

        Contexts carry anchors when the engine's ``anchors`` budget is not 0."""
        with self._lock:
            return self.store.get_or_compress(texts, self.compressor, batch_size=batch_size, truncate=truncate,
                                              progress=progress, anchors=self.anchors)

    async def acompress(self, texts: Sequence[str], **kwargs: Any) -> list[StoreResult]:
        return await asyncio.to_thread(self.compress, texts, **kwargs)

    def mark(self, texts: Sequence[str], **kwargs: Any) -> list[str]:
        """Compress chunks (through the store) and return one marker string per chunk.

        The markers are valid in this engine's prompts only (see :meth:`marker`). A chunk of at
        most :attr:`keep_text_tokens` tokens is returned as its own text instead (the short-chunk
        rule, :meth:`stays_text`: compressing it would not shorten the prompt).
        """
        texts = list(texts)
        short = [self.stays_text(t) for t in texts]
        results = iter(self.compress([t for t, s in zip(texts, short) if not s], **kwargs))
        return [t if s else self.marker(next(results).key) for t, s in zip(texts, short)]

    def marker(self, key: str) -> str:
        """The marker that makes this engine read the stored chunk ``key`` at its place in a prompt.

        Only markers made here (or by an engine with the same ``marker_secret`` and store) are
        resolved; any other marker in a prompt is plain text. Hand markers only to prompts the
        application builds, never to users: whoever holds a marker can make the engine read
        its chunk.
        """
        return self.signer.marker(key)

    def own_marker_keys(self, text: str) -> list[str] | None:
        """The keys if ``text`` is nothing but markers this engine issued, back to back; else None."""
        return self.signer.own_keys(text)

    # ------------------------------------------------------------------ prompts
    def resolve(self, prompt: str | Sequence[Message], *, chat: bool | None = None) -> Resolution:
        """Segments for a prompt string, or for chat messages (rendered with the chat template).

        ``chat=None`` uses the chat template for message lists and plain text for strings.
        Markers this engine issued become stored contexts; any other marker stays plain text
        (with an :class:`~compressor_plugin.errors.UnauthorizedMarkerWarning`) and is never
        looked up. Each message is a dict whose ``role`` is one of :data:`CHAT_ROLES`.

        Raises:
            MissingChunkError: an issued marker's chunk is gone from the store, text included.
            PromptError: a message that is not a dict, or whose role is not one of :data:`CHAT_ROLES`
                (checked before any marker is looked up).
        """
        literal = self._literal
        asked = bool(self.anchors and self.question_anchors)
        found: list[tuple[str, Any]] = []  # (key, context) of each stored context, for question anchors
        lookup = self._lookup()
        on_context = (lambda key, ctx: found.append((key, ctx)) or ctx) if asked else None
        if isinstance(prompt, str) and not chat:
            res = resolve_markers([prompt], lookup, self.signer, literal=literal, on_context=on_context)
            contents: list[Any] = [prompt]
        else:
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            check_messages(prompt)
            contents = [m.get("content") for m in prompt if isinstance(m, dict)]
            # markers first, message by message, so the template sees contexts and literal text only
            res = Resolution(segments=[])
            messages = []
            for m in prompt:
                content = m.get("content") if isinstance(m, dict) else None
                parts = content if isinstance(content, list) else [content] if content is not None else []
                r = resolve_markers(parts, lookup, self.signer, literal=literal, on_context=on_context)
                res.resolved += r.resolved
                res.fallbacks += r.fallbacks
                res.rejected += r.rejected
                res.missing_keys.extend(r.missing_keys)
                messages.append({**m, "content": r.segments} if isinstance(m, dict) else m)
            res.segments = self.generator.chat_segments(messages)
        if found:
            self._ask_anchors(res, found, contents)
        return res

    def _lookup(self) -> Any:
        """The store as marker resolution reads it: an entry this engine's model cannot read (another
        base model, k, mode or shape in its header: planted or copied there) is removed as bad, and
        its marker falls back to the chunk's text, instead of failing every prompt that holds it."""
        if not isinstance(self.store, ContextStore):
            return self.store
        expect = {name: value for name, value in expected_fields(self.compressor).items()
                  if name in ("base_fingerprint", "k", "mode", "shape")}  # any anchor budget
        return _CheckedLookup(self.store, expect)

    def _ask_anchors(self, res: Resolution, found: list[tuple[str, Any]], contents: Sequence[Any]) -> None:
        """Question anchors: re-choose the anchors of the prompt's stored contexts for its question.

        The question is the prompt's text after its last marker (``Question: ... Answer:`` in
        the usual RAG template), or, when that holds no content word (a template that asks
        first), all of the prompt's own text; of that, the line that holds the last ``?`` when
        it has content words (:func:`~compressor_plugin.anchors.question_line`), so the
        template's own words do not pick sentences. Each chunk's spans come from its stored text
        (kept in memory for the next question); the prompt's anchor budget is shared by
        relevance (:func:`~compressor_plugin.anchors.question_anchors`). A context without
        anchors, or whose text is gone from the store, keeps what it has.
        """
        from .anchors import has_question_words, question_anchors, question_line

        pieces: list[str] = []
        after: list[str] = []  # the text after the last marker
        for content in contents:
            for part in content if isinstance(content, list) else [content]:
                if not isinstance(part, str):
                    continue
                for p in split_markers(part):
                    if isinstance(p, str):
                        pieces.append(p)
                        after.append(p)
                    else:
                        after = []
        question = " ".join(after)
        if not has_question_words(question):
            question = " ".join(pieces)
        if not has_question_words(question):
            return
        asks = question_line(question)  # "Question: Who ...?" without the template around it
        if has_question_words(asks):
            question = asks
        chosen = [(ctx, spans) for key, ctx in found if ctx.anchor_count
                  for spans in [self._chunk_spans(key)] if spans is not None]
        if not chosen:
            return
        ids = question_anchors([sp for _, sp in chosen], self.tokenizer, self.anchors, question,
                               window_share=self.window_share)
        new = {id(ctx): dataclasses.replace(ctx, anchor_ids=torch.tensor(a, dtype=torch.long) if a else None)
               for (ctx, _), a in zip(chosen, ids)}
        res.segments = [new.get(id(s), s) if isinstance(s, CompressedContext) else s for s in res.segments]

    def _chunk_spans(self, key: str) -> tuple[str, list] | None:
        """A stored chunk's text (as compressed: cut to ``max_length`` tokens) and its anchor spans; None without text."""
        from .anchors import anchor_spans

        with self._spans_lock:
            hit = self._spans.get(key)
            if hit is not None:
                self._spans.move_to_end(key)
                return hit
        text = self.store.get_text(key)
        if text is None:
            return None
        ids = literal_ids(self.tokenizer, text)
        limit = int(self.compressor.config.max_length)
        if len(ids) > limit:  # a truncated chunk: anchor what was compressed
            text = self.tokenizer.decode(ids[:limit])
        hit = (text, anchor_spans(text, self.tokenizer))
        with self._spans_lock:
            self._spans[key] = hit
            while len(self._spans) > _SPAN_CACHE:
                self._spans.popitem(last=False)
        return hit

    def _literal(self, text: str) -> TokenIds:
        """A chunk's stored text (the fallback for a missing K/V) as a prompt segment read literally."""
        return TokenIds(literal_ids(self.tokenizer, text))

    def _config(self, config: GenerationConfig | None, kwargs: dict[str, Any]) -> GenerationConfig:
        from .generation import _make_config

        return _make_config(config, kwargs)

    def generate(self, prompt: str | Sequence[Message], config: GenerationConfig | None = None, *,
                 chat: bool | None = None, **kwargs: Any) -> EngineResult:
        """Answer a prompt (string or chat messages) whose markers are resolved from the store."""
        res = self.resolve(prompt, chat=chat)
        with self._lock:
            gen = self.generator.generate(res.segments, self._config(config, kwargs))
        return EngineResult(gen, res.resolved, res.fallbacks, res.missing_keys, res.rejected)

    def generate_batch(self, prompts: Sequence[str | Sequence[Message]], config: GenerationConfig | None = None, *,
                       chat: bool | None = None, **kwargs: Any) -> list[EngineResult]:
        """Answer several prompts in one batched decode loop."""
        resolved = [self.resolve(p, chat=chat) for p in prompts]
        with self._lock:
            gens = self.generator.generate_batch([r.segments for r in resolved], self._config(config, kwargs))
        return [EngineResult(g, r.resolved, r.fallbacks, r.missing_keys, r.rejected) for g, r in zip(gens, resolved)]

    def stream(self, prompt: str | Sequence[Message], config: GenerationConfig | None = None, *,
               chat: bool | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield answer text pieces as they are generated."""
        yield from self.stream_result(prompt, config, chat=chat, **kwargs)

    def stream_result(self, prompt: str | Sequence[Message], config: GenerationConfig | None = None, *,
                      chat: bool | None = None, **kwargs: Any) -> "EngineStream":
        """Like :meth:`stream`, as an :class:`EngineStream`: the prompt is resolved now
        (``resolution``), and ``result`` (an :class:`EngineResult` with exact token accounting)
        is set once the pieces are exhausted."""
        res = self.resolve(prompt, chat=chat)
        # no lock across yields: the generator takes the model's lock around each forward pass
        return EngineStream(self.generator.stream_result(res.segments, self._config(config, kwargs)), res)

    async def agenerate(self, prompt: str | Sequence[Message], config: GenerationConfig | None = None, *,
                        chat: bool | None = None, **kwargs: Any) -> EngineResult:
        """:meth:`generate` in a worker thread (the event loop stays free)."""
        return await asyncio.to_thread(self.generate, prompt, config, chat=chat, **kwargs)

    async def astream(self, prompt: str | Sequence[Message], config: GenerationConfig | None = None, *,
                      chat: bool | None = None, **kwargs: Any) -> AsyncIterator[str]:
        """Async token streaming: generation runs in a worker thread, pieces arrive as produced."""
        async for piece in self.astream_result(prompt, config, chat=chat, **kwargs):
            yield piece

    def astream_result(self, prompt: str | Sequence[Message], config: GenerationConfig | None = None, *,
                       chat: bool | None = None, **kwargs: Any) -> "AsyncEngineStream":
        """:meth:`astream` as an :class:`AsyncEngineStream`, whose ``result`` is set once the
        pieces are exhausted (the prompt is resolved in the worker thread)."""
        return AsyncEngineStream(lambda: self.stream_result(prompt, config, chat=chat, **kwargs))


class EngineStream:
    """The answer to one prompt as text pieces, then its :class:`EngineResult` (``result``).

    Iterate it once; ``resolution`` (what the markers resolved to) is known from the start,
    ``result`` once the iteration has finished (``None`` if it stopped early).
    """

    def __init__(self, stream: GenerationStream, resolution: Resolution):
        self.resolution = resolution
        self._stream = stream

    def __iter__(self) -> Iterator[str]:
        return iter(self._stream)

    @property
    def result(self) -> EngineResult | None:
        gen = self._stream.result
        if gen is None:
            return None
        r = self.resolution
        return EngineResult(gen, r.resolved, r.fallbacks, r.missing_keys, r.rejected)


class AsyncEngineStream:
    """Async iteration over an :class:`EngineStream` made and run in a worker thread.

    Generation never blocks the event loop; if the consumer stops early, the worker stops at
    the next piece and frees the model. ``result`` is set once the pieces are exhausted.
    """

    def __init__(self, make: Callable[[], EngineStream]):
        self.result: EngineResult | None = None
        self._make = make
        self._pieces = self._run()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def _run(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        cancelled = threading.Event()
        holder: dict[str, EngineStream] = {}

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                cancelled.set()

        def work() -> None:
            try:
                stream = holder["stream"] = self._make()
                for piece in stream:
                    if cancelled.is_set():
                        break  # the consumer stopped: free the model instead of finishing the answer
                    put(piece)
            except BaseException as exc:  # surfaced in the consumer
                put(exc)
            finally:
                put(done)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
        await asyncio.to_thread(thread.join)
        if "stream" in holder:
            self.result = holder["stream"].result
