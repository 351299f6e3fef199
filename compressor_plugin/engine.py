"""CompressionEngine: compressor + store + generator, the object the integrations share.

It does the three things a compressed RAG pipeline needs, independent of any framework:

* :meth:`CompressionEngine.compress` / :meth:`mark`: compress chunks through the store (each
  chunk once, ever) and return markers that stand for them in prompts;
* :meth:`resolve`: turn a prompt string or chat messages holding markers into generator
  segments (stored K/V at each marker's place, text fallback when an entry is missing);
* :meth:`generate` / :meth:`stream` / :meth:`agenerate` / :meth:`astream`: answer with the
  unchanged base model.

Example:
    >>> eng = CompressionEngine.from_pretrained()                       # doctest: +SKIP
    >>> markers = eng.mark(["Paris is the capital of France."])         # doctest: +SKIP
    >>> eng.generate(f"Context: {markers[0]}\\nQuestion: What is the capital of France?\\nAnswer:").text  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

import torch

from .compressor import Compressor
from .generation import GenerationConfig, GenerationResult, Generator
from .markers import Resolution, make_marker, resolve_markers
from .store import ContextStore, StoreResult

Message = dict[str, Any]


@dataclass
class EngineResult:
    """A generation plus what marker resolution found."""

    generation: GenerationResult
    resolved_chunks: int = 0
    fallback_chunks: int = 0
    missing_keys: list[str] = field(default_factory=list)

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


class CompressionEngine:
    """Compressor, store and generator over one loaded base model.

    Args:
        compressor: a loaded :class:`Compressor` (its base model is the decoder).
        store: a :class:`ContextStore`; by default the one in the user cache directory.
    """

    def __init__(self, compressor: Compressor, store: ContextStore | None = None):
        self.compressor = compressor
        self.store = store if store is not None else ContextStore()
        self.generator = Generator(compressor.base, compressor)
        self._lock = compressor.lock  # the adapter switch is model-wide: one forward at a time
        self.checkpoint: str | None = None  # the shipped name or folder it was loaded from, if any

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike = "default", *, store: ContextStore | str | os.PathLike | None = None,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "CompressionEngine":
        """Load the base model and a compressor checkpoint (shipped name or folder), open a store."""
        comp = Compressor.from_pretrained(checkpoint, device=device, dtype=dtype)
        if store is not None and not isinstance(store, ContextStore):
            store = ContextStore(store)
        engine = cls(comp, store)
        engine.checkpoint = str(checkpoint)
        return engine

    @property
    def tokenizer(self) -> Any:
        return self.compressor.tokenizer

    @property
    def max_chunk_tokens(self) -> int:
        return self.compressor.config.max_length

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ compression
    def compress(self, texts: Sequence[str], *, batch_size: int = 16, truncate: bool = False,
                 progress: bool = False) -> list[StoreResult]:
        """Look chunks up in the store, compress the misses in batches, store them (input order)."""
        with self._lock:
            return self.store.get_or_compress(texts, self.compressor, batch_size=batch_size, truncate=truncate,
                                              progress=progress)

    async def acompress(self, texts: Sequence[str], **kwargs: Any) -> list[StoreResult]:
        return await asyncio.to_thread(self.compress, texts, **kwargs)

    def mark(self, texts: Sequence[str], **kwargs: Any) -> list[str]:
        """Compress chunks (through the store) and return one marker string per chunk."""
        return [make_marker(r.key) for r in self.compress(texts, **kwargs)]

    # ------------------------------------------------------------------ prompts
    def resolve(self, prompt: str | Sequence[Message], *, chat: bool | None = None) -> Resolution:
        """Segments for a prompt string, or for chat messages (rendered with the chat template).

        ``chat=None`` uses the chat template for message lists and plain text for strings.
        """
        if isinstance(prompt, str):
            if chat:
                prompt = [{"role": "user", "content": prompt}]
            else:
                return resolve_markers([prompt], self.store)
        parts = self.generator.chat_segments(list(prompt))
        return resolve_markers(parts, self.store)

    def _config(self, config: GenerationConfig | None, kwargs: dict[str, Any]) -> GenerationConfig:
        from .generation import _make_config

        return _make_config(config, kwargs)

    def generate(self, prompt: str | Sequence[Message], config: GenerationConfig | None = None, *,
                 chat: bool | None = None, **kwargs: Any) -> EngineResult:
        """Answer a prompt (string or chat messages) whose markers are resolved from the store."""
        res = self.resolve(prompt, chat=chat)
        with self._lock:
            gen = self.generator.generate(res.segments, self._config(config, kwargs))
        return EngineResult(gen, res.resolved, res.fallbacks, res.missing_keys)

    def generate_batch(self, prompts: Sequence[str | Sequence[Message]], config: GenerationConfig | None = None, *,
                       chat: bool | None = None, **kwargs: Any) -> list[EngineResult]:
        """Answer several prompts in one batched decode loop."""
        resolved = [self.resolve(p, chat=chat) for p in prompts]
        with self._lock:
            gens = self.generator.generate_batch([r.segments for r in resolved], self._config(config, kwargs))
        return [EngineResult(g, r.resolved, r.fallbacks, r.missing_keys) for g, r in zip(gens, resolved)]

    def stream(self, prompt: str | Sequence[Message], config: GenerationConfig | None = None, *,
               chat: bool | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield answer text pieces as they are generated."""
        res = self.resolve(prompt, chat=chat)
        # no lock across yields: the generator takes the model's lock around each forward pass
        yield from self.generator.stream(res.segments, self._config(config, kwargs))

    async def agenerate(self, prompt: str | Sequence[Message], config: GenerationConfig | None = None, *,
                        chat: bool | None = None, **kwargs: Any) -> EngineResult:
        """:meth:`generate` in a worker thread (the event loop stays free)."""
        return await asyncio.to_thread(self.generate, prompt, config, chat=chat, **kwargs)

    async def astream(self, prompt: str | Sequence[Message], config: GenerationConfig | None = None, *,
                      chat: bool | None = None, **kwargs: Any) -> AsyncIterator[str]:
        """Async token streaming: generation runs in a worker thread, pieces arrive as produced."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        cancelled = threading.Event()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                cancelled.set()

        def work() -> None:
            try:
                for piece in self.stream(prompt, config, chat=chat, **kwargs):
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
