"""LangChain integration: compressed documents in, answers from the unchanged base model out.

Two pieces, both thin layers over :class:`~compressor_plugin.engine.CompressionEngine`:

* :class:`CompressedDocumentTransformer` (a ``BaseDocumentTransformer``) and
  :class:`CompressedDocumentCompressor` (a ``BaseDocumentCompressor``, for
  ``ContextualCompressionRetriever`` / ``DocumentCompressorPipeline``) compress each document
  once through the store and return new documents whose ``page_content`` is a short marker
  (``[[cc:<key>]]``) naming the stored K/V; the text stays in ``metadata["original_text"]``.
* :class:`CompressedChatModel` (a ``BaseChatModel``) and :class:`CompressedLLM` (a
  ``BaseLLM``) find those markers in the prompt and put the stored K/V at their place;
  a marker whose entry is gone falls back to the chunk text with a
  :class:`~compressor_plugin.markers.MissingChunkWarning`.

An existing RAG chain changes in two places::

    engine = CompressionEngine.from_pretrained("default", store="/data/chunks")
    compress = CompressedDocumentTransformer(engine).as_runnable()
    chain = (
        {"context": retriever | compress | format_docs, "question": RunnablePassthrough()}
        | prompt
        | CompressedChatModel(engine=engine, max_tokens=64)
        | StrOutputParser()
    )

Tool calling, structured output and non-text (image, audio, file) inputs are not supported.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from typing import Any, AsyncIterator, Iterator, Literal, Sequence

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.documents import BaseDocumentTransformer, Document
from langchain_core.documents.compressor import BaseDocumentCompressor
from langchain_core.language_models import BaseChatModel, BaseLLM, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import (
    ChatGeneration,
    ChatGenerationChunk,
    ChatResult,
    Generation,
    GenerationChunk,
    LLMResult,
)
from langchain_core.runnables import RunnableLambda
from pydantic import ConfigDict, Field, model_validator

from ..engine import CompressionEngine, EngineResult
from ..markers import has_markers, make_marker
from ..store import ContextStore, normalize_text

__all__ = [
    "CompressedChatModel",
    "CompressedDocumentCompressor",
    "CompressedDocumentTransformer",
    "CompressedLLM",
    "EmptyDocumentWarning",
]

OnLong = Literal["split", "truncate", "error"]
_ON_LONG = ("split", "truncate", "error")
_TOOLS_UNSUPPORTED = (
    "{cls} does not support tool calling or structured output: the compressed-context models are small "
    "local instruction models without a tool-calling format. Use a tool-calling chat model for agents and "
    "keep {cls} for answering from compressed documents.")


class EmptyDocumentWarning(UserWarning):
    """A document with no text was passed through uncompressed."""


# ====================================================================== documents
class _DocumentCompression:
    """The compression shared by the transformer and the document compressor."""

    def __init__(self, engine: CompressionEngine, on_long: str, batch_size: int):
        if not isinstance(engine, CompressionEngine):
            raise TypeError(f"engine must be a CompressionEngine, not {type(engine).__name__}")
        if on_long not in _ON_LONG:
            raise ValueError(f"on_long must be one of {_ON_LONG}, not {on_long!r}")
        if int(batch_size) < 1:
            raise ValueError("batch_size must be at least 1")
        self.engine = engine
        self.on_long = on_long
        self.batch_size = int(batch_size)

    # -------------------------------------------------------------- planning
    def _split(self, text: str, limit: int) -> list[str]:
        """Consecutive pieces of ``text`` of at most ``limit`` tokens each, cut at token boundaries."""
        tok = self.engine.tokenizer
        if not getattr(tok, "is_fast", False):  # slow tokenizers have no offsets: decode windows of ids
            ids = tok(text, add_special_tokens=False)["input_ids"]
            windows = (tok.decode(ids[s:s + limit]) for s in range(0, len(ids), limit))
            return [w for w in windows if normalize_text(w)]
        starts = [a for a, _ in tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        n = len(starts)
        pieces: list[str] = []
        start = 0
        while start < n:
            end = min(start + limit, n)
            while True:
                piece = text[starts[start]:(starts[end] if end < n else len(text))]
                # re-tokenising a piece can give a different count at its edges: shrink until it fits
                if end - start <= 1 or self.engine.count_tokens(normalize_text(piece)) <= limit:
                    break
                end -= max(1, (end - start) // 64)
            if normalize_text(piece):
                pieces.append(piece)
            start = end
        return pieces

    def _plan(self, documents: Sequence[Document]) -> list[list[str] | None]:
        """Per document: the texts to compress, or None to pass it through."""
        limit = self.engine.max_chunk_tokens
        plans: list[list[str] | None] = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, Document):
                raise TypeError(f"document {i} is a {type(doc).__name__}, not a langchain Document")
            text = doc.page_content if isinstance(doc.page_content, str) else ""
            if doc.metadata.get("compressed") is True and has_markers(text):
                plans.append(None)  # already compressed: idempotent
                continue
            norm = normalize_text(text)
            if not norm:
                warnings.warn(f"document {i} (id={doc.id!r}) has no text; passing it through uncompressed",
                              EmptyDocumentWarning, stacklevel=4)
                plans.append(None)
                continue
            n = self.engine.count_tokens(norm)
            if n <= limit or self.on_long == "truncate":
                plans.append([norm])
            elif self.on_long == "error":
                raise ValueError(
                    f"document {i} (id={doc.id!r}) has {n} tokens, more than the compressor's limit of {limit}; "
                    "split documents before compressing them, or use on_long='split' or on_long='truncate'")
            else:
                plans.append(self._split(norm, limit))
        return plans

    # -------------------------------------------------------------- assembly
    def _texts(self, plans: list[list[str] | None]) -> list[str]:
        return [t for p in plans if p for t in p]

    def _build(self, documents: Sequence[Document], plans: list[list[str] | None],
               results: list[Any]) -> list[Document]:
        out: list[Document] = []
        pos = 0
        for doc, plan in zip(documents, plans):
            if plan is None:
                if doc.metadata.get("compressed") is True:
                    out.append(doc)
                else:
                    out.append(Document(page_content=doc.page_content, metadata={**doc.metadata, "compressed": False},
                                        id=doc.id))
                continue
            mine = results[pos:pos + len(plan)]
            pos += len(plan)
            keys = [r.key for r in mine]
            k = sum(r.context.k for r in mine)
            src = sum(r.context.source_tokens for r in mine)
            meta = {
                **doc.metadata,
                "compressed": True,
                "store_key": keys[0],
                "store_keys": keys,
                "original_text": doc.page_content,
                "compressed_tokens": k,
                "source_tokens": src,
                "compression_ratio": src / k if k else 0.0,
            }
            if any(r.context.extra.get("truncated") == "true" for r in mine):
                meta["truncated"] = True
            out.append(Document(page_content="".join(make_marker(key) for key in keys), metadata=meta, id=doc.id))
        return out

    def run(self, documents: Sequence[Document]) -> list[Document]:
        documents = list(documents)
        plans = self._plan(documents)
        texts = self._texts(plans)
        results = self.engine.compress(texts, batch_size=self.batch_size, truncate=self.on_long == "truncate") \
            if texts else []
        return self._build(documents, plans, results)

    async def arun(self, documents: Sequence[Document]) -> list[Document]:
        documents = list(documents)
        plans = await asyncio.to_thread(self._plan, documents)
        texts = self._texts(plans)
        results = await self.engine.acompress(texts, batch_size=self.batch_size,
                                              truncate=self.on_long == "truncate") if texts else []
        return self._build(documents, plans, results)


class CompressedDocumentTransformer(BaseDocumentTransformer):
    """Replace each document's text by markers of its compressed K/V (stored once, reused forever).

    Returns new documents (the inputs are not changed) with the same ``id``, ``page_content``
    set to one marker per compressed piece, and metadata extended by ``compressed`` (True),
    ``store_key`` (the key of the first piece), ``store_keys`` (all pieces), ``original_text``,
    ``compressed_tokens`` (k per piece), ``source_tokens`` and ``compression_ratio``.
    Documents with no text are passed through with ``compressed=False`` and an
    :class:`EmptyDocumentWarning`; documents already compressed are returned as they are.

    Args:
        engine: the :class:`CompressionEngine` whose compressor and store are used.
        on_long: what to do with a document longer than ``engine.max_chunk_tokens``:
            ``"split"`` (default) compresses consecutive pieces of at most that many tokens and
            puts their markers back to back, so one document stays one document;
            ``"truncate"`` compresses only the first ``max_chunk_tokens`` tokens;
            ``"error"`` raises ``ValueError``.
        batch_size: chunks compressed per forward pass (store misses only).

    Example:
        >>> compress = CompressedDocumentTransformer(engine)                      # doctest: +SKIP
        >>> docs = compress.transform_documents([Document("Paris is in France.")])  # doctest: +SKIP
        >>> docs[0].page_content                                                  # doctest: +SKIP
        '[[cc:3fbe...]]'
    """

    def __init__(self, engine: CompressionEngine, *, on_long: OnLong = "split", batch_size: int = 16):
        self._impl = _DocumentCompression(engine, on_long, batch_size)

    @property
    def engine(self) -> CompressionEngine:
        return self._impl.engine

    @property
    def on_long(self) -> str:
        return self._impl.on_long

    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> list[Document]:
        """Compress the documents (store misses in batches) and return marked copies, in order."""
        return self._impl.run(documents)

    async def atransform_documents(self, documents: Sequence[Document], **kwargs: Any) -> list[Document]:
        """:meth:`transform_documents` with compression and store I/O off the event loop."""
        return await self._impl.arun(documents)

    def as_runnable(self) -> RunnableLambda:
        """This transformer as an LCEL step (``retriever | transformer.as_runnable() | ...``), sync and async."""

        async def _atransform(documents: Sequence[Document]) -> list[Document]:
            return await self.atransform_documents(documents)

        return RunnableLambda(self.transform_documents, afunc=_atransform, name="CompressedDocumentTransformer")


class CompressedDocumentCompressor(BaseDocumentCompressor):
    """:class:`CompressedDocumentTransformer` as a ``BaseDocumentCompressor``.

    For ``ContextualCompressionRetriever(base_compressor=..., base_retriever=...)`` and as the
    last step of a ``DocumentCompressorPipeline``. The query is not used: every retrieved
    document is kept and compressed.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: CompressionEngine
    """The engine whose compressor and store are used."""
    on_long: OnLong = "split"
    """``"split"``, ``"truncate"`` or ``"error"`` for documents over ``engine.max_chunk_tokens``."""
    batch_size: int = Field(default=16, ge=1)
    """Chunks compressed per forward pass."""

    def _impl(self) -> _DocumentCompression:
        return _DocumentCompression(self.engine, self.on_long, self.batch_size)

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        """Compressed, marked copies of ``documents`` (``query`` is ignored)."""
        return self._impl().run(documents)

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Callbacks | None = None) -> Sequence[Document]:
        """Async :meth:`compress_documents`."""
        return await self._impl().arun(documents)


# ====================================================================== models
def _text_content(content: Any, where: str) -> str:
    """The text of a message's content (a string or a list of text blocks)."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content or []:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in ("reasoning", "thinking"):
            continue
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"{where} holds a {kind!r} content block; only text content is supported")
    return "".join(parts)


def _to_chat(messages: Sequence[BaseMessage], cls_name: str) -> list[dict[str, str]]:
    """LangChain messages as role/content dicts for the model's chat template."""
    out = []
    for i, m in enumerate(messages):
        where = f"message {i} ({type(m).__name__})"
        if isinstance(m, (ToolMessage, FunctionMessage)) or (isinstance(m, AIMessage) and m.tool_calls):
            raise NotImplementedError(_TOOLS_UNSUPPORTED.format(cls=cls_name))
        if isinstance(m, HumanMessage):
            role = "user"
        elif isinstance(m, AIMessage):
            role = "assistant"
        elif isinstance(m, SystemMessage):
            role = "system"
        elif isinstance(m, ChatMessage):
            role = m.role
        else:
            raise ValueError(f"{where}: unsupported message type")
        out.append({"role": role, "content": _text_content(m.content, where)})
    if not out:
        raise ValueError("no messages to answer")
    return out


class _Settings:
    """Decoding settings for one call: instance defaults overridden by call kwargs."""

    KEYS = ("max_tokens", "temperature", "top_p", "seed")

    @staticmethod
    def build(model: Any, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        name = kwargs.pop("model", None)
        if name is not None and name != model.model_name:
            raise ValueError(f"{type(model).__name__} runs {model.model_name!r}; it cannot switch to model {name!r}")
        if kwargs.pop("tools", None) or kwargs.pop("tool_choice", None):
            raise NotImplementedError(_TOOLS_UNSUPPORTED.format(cls=type(model).__name__))
        settings = {k: kwargs.pop(k, getattr(model, k)) for k in _Settings.KEYS}
        if "max_new_tokens" in kwargs:
            settings["max_tokens"] = kwargs.pop("max_new_tokens")
        unknown = sorted(k for k in kwargs if not k.startswith("ls_"))
        if unknown:
            raise TypeError(f"{type(model).__name__} got unsupported call options {unknown}; "
                            f"supported: {list(_Settings.KEYS) + ['stop']}")
        stops = list(stop) if stop is not None else list(model.stop or [])
        return {"max_new_tokens": int(settings["max_tokens"]), "temperature": float(settings["temperature"]),
                "top_p": float(settings["top_p"]), "seed": settings["seed"], "stop": [s for s in stops if s]}


def _usage(result: EngineResult) -> UsageMetadata:
    u = result.usage()
    return UsageMetadata(input_tokens=u["prompt_tokens"], output_tokens=u["completion_tokens"],
                         total_tokens=u["total_tokens"])


def _compression_info(result: EngineResult) -> dict[str, Any]:
    u = result.usage()
    return {"finish_reason": result.generation.finish_reason, "text_tokens": u["text_tokens"],
            "compressed_tokens": u["compressed_tokens"], "source_tokens": u["source_tokens"],
            "tokens_saved": u["tokens_saved"], "resolved_chunks": result.resolved_chunks,
            "fallback_chunks": result.fallback_chunks}


def _load_engine(checkpoint: str | os.PathLike, store: ContextStore | str | os.PathLike | None,
                 device: Any, dtype: Any = None) -> CompressionEngine:
    return CompressionEngine.from_pretrained(checkpoint, store=store, device=device, dtype=dtype)


class CompressedChatModel(BaseChatModel):
    """Chat model over a :class:`CompressionEngine`: prompt markers become stored K/V.

    Messages are rendered with the base model's chat template; every ``[[cc:<key>]]`` marker
    in them (put there by :class:`CompressedDocumentTransformer`) is replaced by the stored
    compressed context, so the model attends to k positions instead of the chunk's text.
    A missing entry falls back to the chunk's stored text with a ``MissingChunkWarning``.

    ``usage_metadata`` counts real prompt positions (``input_tokens`` = text tokens +
    compressed tokens); ``response_metadata`` adds ``compressed_tokens``, ``source_tokens``,
    ``tokens_saved``, ``resolved_chunks``, ``fallback_chunks`` and ``finish_reason``.

    Tool calling, structured output and non-text inputs are not supported.

    Example:
        >>> llm = CompressedChatModel(engine=engine, max_tokens=64)    # doctest: +SKIP
        >>> llm.invoke("Context: [[cc:3fbe...]]\\nWhat is the capital?").content  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: CompressionEngine = Field(exclude=True)
    """Compressor, store and base model."""
    model_name: str | None = None
    """Name reported in traces and ``response_metadata``; default the base model's name."""
    max_tokens: int = Field(default=128, ge=1)
    """Most tokens generated per answer."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 is greedy decoding."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (with ``temperature > 0``)."""
    seed: int | None = None
    """Seed for sampling (``temperature > 0``); None draws a fresh one."""
    stop: list[str] | None = None
    """Stop strings (the answer ends before them); a call's ``stop`` replaces these."""
    streaming: bool = False
    """Make ``invoke`` stream internally (callbacks get tokens as they come)."""

    @model_validator(mode="after")
    def _default_name(self) -> "CompressedChatModel":
        if self.model_name is None:
            self.model_name = self.engine.compressor.base.name
        return self

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike = "default",
                        store: ContextStore | str | os.PathLike | None = None,
                        device: Any = None, dtype: Any = None, **kwargs: Any) -> "CompressedChatModel":
        """Load a compressor checkpoint (shipped name or folder) with its base model and open a store.

        Args:
            checkpoint: ``"default"`` (= ``"kv-k16"``), another shipped name, or a checkpoint folder.
            store: a :class:`ContextStore` or folder; default the user cache store.
            device: where the model runs (default: CUDA if available, else CPU).
            dtype: ``"bfloat16"``, ``"float32"``... (default: bf16 on GPU, fp32 on CPU); part of
                every store key, so use the dtype the store was built with.
            **kwargs: other fields (``max_tokens``, ``temperature``, ``stop``, ...).
        """
        return cls(engine=_load_engine(checkpoint, store, device, dtype), **kwargs)

    @property
    def _llm_type(self) -> str:
        return "compressed-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        comp = self.engine.compressor
        return {"model_name": self.model_name, "compressor": comp.fingerprint, "k": comp.k, "mode": comp.mode,
                "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="compressor_plugin", ls_model_type="chat",
                                 ls_model_name=kwargs.get("model") if isinstance(kwargs.get("model"), str)
                                 else str(self.model_name),
                                 ls_temperature=kwargs.get("temperature", self.temperature),
                                 ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> Any:
        """Not supported: raises ``NotImplementedError``."""
        raise NotImplementedError(_TOOLS_UNSUPPORTED.format(cls=type(self).__name__))

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Any:
        """Not supported: raises ``NotImplementedError``."""
        raise NotImplementedError(_TOOLS_UNSUPPORTED.format(cls=type(self).__name__))

    # -------------------------------------------------------------- helpers
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any]]:
        return _to_chat(messages, type(self).__name__), _Settings.build(self, stop, kwargs)

    def _result(self, result: EngineResult) -> ChatResult:
        info = _compression_info(result)
        message = AIMessage(content=result.text, usage_metadata=_usage(result),
                            response_metadata={"model_name": self.model_name, **info})
        gen = ChatGeneration(message=message, generation_info={"finish_reason": info["finish_reason"]})
        return ChatResult(generations=[gen], llm_output={"model_name": self.model_name,
                                                         "token_usage": result.usage()})

    def _last_chunk(self, result: EngineResult) -> ChatGenerationChunk:
        info = _compression_info(result)
        return ChatGenerationChunk(message=AIMessageChunk(
            content="", chunk_position="last", usage_metadata=_usage(result),
            response_metadata={"model_name": self.model_name, **info}))

    # -------------------------------------------------------------- LangChain hooks
    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        chat, cfg = self._prepare(messages, stop, kwargs)
        return self._result(self.engine.generate(chat, chat=True, **cfg))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        chat, cfg = self._prepare(messages, stop, kwargs)
        return self._result(await self.engine.agenerate(chat, chat=True, **cfg))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        chat, cfg = self._prepare(messages, stop, kwargs)
        stream = self.engine.stream_result(chat, chat=True, **cfg)
        for piece in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield self._last_chunk(stream.result)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        chat, cfg = self._prepare(messages, stop, kwargs)
        stream = self.engine.astream_result(chat, chat=True, **cfg)
        async for piece in stream:
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager is not None:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield self._last_chunk(stream.result)


class CompressedLLM(BaseLLM):
    """Text-completion LLM over a :class:`CompressionEngine` (prompt string in, completion out).

    The prompt is used as plain text (no chat template) unless ``chat_template=True``, which
    sends it as one user message through the model's chat template. Markers in the prompt
    are resolved as in :class:`CompressedChatModel`; several prompts passed together
    (``batch`` / ``generate``) are decoded in one batch. Each ``Generation.generation_info``
    holds ``finish_reason``, ``usage`` (prompt/completion/total tokens) and the compression
    counts (``compressed_tokens``, ``source_tokens``, ``tokens_saved``, ``fallback_chunks``, ...).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: CompressionEngine = Field(exclude=True)
    """Compressor, store and base model."""
    model_name: str | None = None
    """Name reported in traces; default the base model's name."""
    max_tokens: int = Field(default=128, ge=1)
    """Most tokens generated per completion."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 is greedy decoding."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass (with ``temperature > 0``)."""
    seed: int | None = None
    """Seed for sampling; None draws a fresh one."""
    stop: list[str] | None = None
    """Stop strings; a call's ``stop`` replaces these."""
    chat_template: bool = False
    """Send the prompt as a user message through the chat template instead of as plain text."""
    streaming: bool = False
    """Accepted for compatibility; use ``stream``/``astream`` for token streaming."""

    @model_validator(mode="after")
    def _default_name(self) -> "CompressedLLM":
        if self.model_name is None:
            self.model_name = self.engine.compressor.base.name
        return self

    @classmethod
    def from_pretrained(cls, checkpoint: str | os.PathLike = "default",
                        store: ContextStore | str | os.PathLike | None = None,
                        device: Any = None, dtype: Any = None, **kwargs: Any) -> "CompressedLLM":
        """Load a compressor checkpoint with its base model and open a store (see :class:`CompressedChatModel`)."""
        return cls(engine=_load_engine(checkpoint, store, device, dtype), **kwargs)

    @property
    def _llm_type(self) -> str:
        return "compressed-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        comp = self.engine.compressor
        return {"model_name": self.model_name, "compressor": comp.fingerprint, "k": comp.k, "mode": comp.mode,
                "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "chat_template": self.chat_template}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="compressor_plugin", ls_model_type="llm",
                                 ls_model_name=kwargs.get("model") if isinstance(kwargs.get("model"), str)
                                 else str(self.model_name),
                                 ls_temperature=kwargs.get("temperature", self.temperature),
                                 ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params

    def _generation(self, result: EngineResult) -> list[Generation]:
        info = _compression_info(result)
        info["usage"] = result.usage()
        return [Generation(text=result.text, generation_info=info)]

    def _llm_result(self, results: list[EngineResult]) -> LLMResult:
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for r in results:
            u = r.usage()
            for key in total:
                total[key] += u[key]
        return LLMResult(generations=[self._generation(r) for r in results],
                         llm_output={"model_name": self.model_name, "token_usage": total})

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        cfg = _Settings.build(self, stop, kwargs)
        if len(prompts) == 1:
            results = [self.engine.generate(prompts[0], chat=self.chat_template, **cfg)]
        else:
            results = self.engine.generate_batch(list(prompts), chat=self.chat_template, **cfg)
        return self._llm_result(results)

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        return await asyncio.to_thread(self._generate, prompts, stop, None, **kwargs)

    def _final_chunk(self, result: EngineResult) -> GenerationChunk:
        return GenerationChunk(text="", generation_info=self._generation(result)[0].generation_info)

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        cfg = _Settings.build(self, stop, kwargs)
        stream = self.engine.stream_result(prompt, chat=self.chat_template, **cfg)
        for piece in stream:
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield self._final_chunk(stream.result)

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        cfg = _Settings.build(self, stop, kwargs)
        stream = self.engine.astream_result(prompt, chat=self.chat_template, **cfg)
        async for piece in stream:
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield self._final_chunk(stream.result)
