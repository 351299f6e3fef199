"""LangChain integration: compressed documents in, answers from the unchanged base model out.

Two pieces, both thin layers over :class:`~compressor_plugin.engine.CompressionEngine`:

* :class:`CompressedDocumentTransformer` (a ``BaseDocumentTransformer``) and
  :class:`CompressedDocumentCompressor` (a ``BaseDocumentCompressor``, for
  ``ContextualCompressionRetriever`` / ``DocumentCompressorPipeline``) compress each document
  once through the store and return new documents whose ``page_content`` is a short marker
  (``[[cc:<key>.<tag>]]``) naming the stored K/V; the text stays in ``metadata["original_text"]``.
* :class:`CompressedChatModel` (a ``BaseChatModel``) and :class:`CompressedLLM` (a
  ``BaseLLM``) find those markers in the prompt and put the stored K/V at their place;
  a marker whose entry is gone falls back to the chunk text with a
  :class:`~compressor_plugin.errors.MissingChunkWarning`. Only markers the engine issued are
  resolved: a marker typed by a user or carried in a document stays plain text.

Both are thin faces over :mod:`compressor_plugin.integrations.core`, shared with the
LlamaIndex integration: the same options (``on_long``, ``batch_size``, ``show_progress``), the
same splitting (the same document gets the same store keys), the same metadata, the same
``from_pretrained``, the same model name and the same chat roles. :func:`source_documents`
gives compressed documents back with their text, for showing sources to users.

An existing RAG chain changes in two places::

    engine = CompressionEngine.from_pretrained("default", store="/data/chunks")
    compress = CompressedDocumentTransformer(engine).as_runnable()
    chain = (
        {"context": retriever | compress | format_docs, "question": RunnablePassthrough()}
        | prompt
        | CompressedChatModel(engine, max_tokens=64)
        | StrOutputParser()
    )

Tool calling, structured output and non-text (image, audio, file) inputs are not supported.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, ClassVar, Iterator, Sequence

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
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine import CompressionEngine, EngineResult
from ..errors import EmptyDocumentWarning
from .core import (
    FromPretrained,
    DEFAULT_MAX_NEW_TOKENS,
    CompressedText,
    CompressionOptions,
    OnLong,
    RENAMED_OPTIONS,
    acompress_texts,
    chat_role,
    check_engine,
    check_messages,
    check_model_switch,
    check_options,
    compress_texts,
    compression_metadata,
    compression_options,
    check_max_tokens,
    merge_alias,
    model_identity,
    model_name as engine_model_name,
    shown_text,
    stop_list,
    unsupported_content,
    warn_broken_markers,
)

__all__ = [
    "BaseCompressedModel",
    "CompressedChatModel",
    "CompressedDocumentCompressor",
    "CompressedDocumentTransformer",
    "CompressedLLM",
    "EmptyDocumentWarning",
    "source_documents",
]

_TOOLS_UNSUPPORTED = (
    "{cls} does not support tool calling or structured output: the compressed-context models are small "
    "local instruction models without a tool-calling format. Use a tool-calling chat model for agents and "
    "keep {cls} for answering from compressed documents.")


# ====================================================================== documents
_DOC_OPTIONS = ("on_long", "batch_size", "show_progress")
_RENAMED = RENAMED_OPTIONS
#: Other names of the models' options (LlamaIndex's and Google's), and the field to use instead.
_MODEL_RENAMED = {"max_output_tokens": "max_tokens"}


def _compress_documents(engine: CompressionEngine, documents: Sequence[Document],
                        compressed: Sequence[CompressedText | None]) -> list[Document]:
    """New documents for ``documents`` from their compression results (same order, same ids).

    Metadata through :func:`~compressor_plugin.integrations.core.compression_metadata`, as for
    LlamaIndex nodes: a document left as text (empty, or short) gets ``compressed=False`` and
    its ``skip_reason``.
    """
    out: list[Document] = []
    for doc, res in zip(documents, compressed):
        if res is None:
            out.append(Document(page_content=doc.page_content,
                                metadata=compression_metadata(doc.metadata, None, doc.page_content), id=doc.id))
        elif engine.own_marker_keys(doc.page_content) is not None:
            out.append(doc)  # already this engine's markers (an earlier step of this pipeline)
        else:
            meta = compression_metadata(doc.metadata, res, doc.page_content, original_text=True)
            out.append(Document(page_content=res.marker_text, metadata=meta, id=doc.id))
    return out


def _texts(documents: Sequence[Document]) -> tuple[list[Document], list[str]]:
    documents = list(documents)
    for i, doc in enumerate(documents):
        if not isinstance(doc, Document):
            raise TypeError(f"document {i} is a {type(doc).__name__}, not a langchain Document")
    # empty texts: the core's rule and warning (core.warn_empty_texts), as for LlamaIndex nodes
    return documents, [doc.page_content if isinstance(doc.page_content, str) else "" for doc in documents]


def source_documents(engine: CompressionEngine, documents: Sequence[Document]) -> list[Document]:
    """Documents as a user should see them: the chunk text in place of this engine's markers.

    A compressed document's ``page_content`` is its markers, which is what the prompt needs but
    not what a user should be shown (a marker is a handle that makes the engine read its
    chunk; see docs/security.md). For each document whose text is nothing but markers
    ``engine`` issued, this returns a copy whose ``page_content`` is ``metadata["original_text"]``
    (metadata and id kept); any other document is returned as it is. Use it on the sources a
    chain returns next to its answer, e.g. ``result["context"]`` of ``create_retrieval_chain``
    over a ``ContextualCompressionRetriever`` with :class:`CompressedDocumentCompressor`.

    Raises:
        TypeError: an item is not a LangChain ``Document``.
    """
    documents, _ = _texts(documents)
    out: list[Document] = []
    for doc in documents:
        text = shown_text(engine, doc.page_content, doc.metadata)
        out.append(doc if text is None else Document(page_content=text, metadata=dict(doc.metadata), id=doc.id))
    return out


def _run(engine: CompressionEngine, options: CompressionOptions, documents: Sequence[Document]) -> list[Document]:
    documents, texts = _texts(documents)
    results = compress_texts(engine, texts, options, [d.id for d in documents])
    return _compress_documents(engine, documents, results)


async def _arun(engine: CompressionEngine, options: CompressionOptions,
                documents: Sequence[Document]) -> list[Document]:
    documents, texts = _texts(documents)
    results = await acompress_texts(engine, texts, options, [d.id for d in documents])
    return _compress_documents(engine, documents, results)


class CompressedDocumentTransformer(FromPretrained, BaseDocumentTransformer):
    """Replace each document's text by markers of its compressed K/V (stored once, reused forever).

    Returns new documents (the inputs are not changed) with the same ``id``, ``page_content``
    set to one marker per compressed piece, and metadata extended by ``compressed`` (True),
    ``store_key`` (the key of the first piece), ``store_keys`` (all pieces), ``original_text``,
    ``compressed_tokens`` (k per piece), ``source_tokens`` and ``compression_ratio``
    (the same metadata as the LlamaIndex integration). Documents left as text get
    ``compressed=False`` and ``skip_reason``: ``"short"`` for a text short enough to stay text
    (the short-chunk rule), ``"empty"`` for no text (empty or whitespace only), for which the
    call also issues one :class:`EmptyDocumentWarning` naming them (the same metadata, rule and
    warning as the LlamaIndex classes); documents that hold nothing but markers this engine issued are returned as they
    are. Any other text, marker-shaped strings included, is compressed as text: a retrieved
    document cannot carry a marker into the prompt. Show users :func:`source_documents` of
    the output, not the output itself.

    Args:
        engine: the :class:`CompressionEngine` whose compressor and store are used (positional
            or keyword).
        on_long: what to do with a document longer than ``engine.max_chunk_tokens``:
            ``"split"`` (default) compresses consecutive pieces of at most that many tokens and
            puts their markers back to back, so one document stays one document;
            ``"truncate"`` compresses only the first ``max_chunk_tokens`` tokens;
            ``"error"`` raises :class:`~compressor_plugin.errors.ContextTooLongError`.
        batch_size: chunks compressed per forward pass (store misses only).
        show_progress: a progress bar over the chunks being compressed (off by default).

    Raises:
        UnknownOptionError: an option that does not exist.
        InvalidOptionError: an option with a value it cannot take.

    Example:
        >>> compress = CompressedDocumentTransformer(engine)                      # doctest: +SKIP
        >>> docs = compress.transform_documents([Document("Paris is in France.")])  # doctest: +SKIP
        >>> docs[0].page_content                                                  # doctest: +SKIP
        '[[cc:3fbe...]]'
    """

    def __init__(self, engine: CompressionEngine, *, on_long: OnLong = "split", batch_size: int = 16,
                 show_progress: bool = False, **unknown: Any):
        check_options(type(self).__name__, unknown, ("engine",) + _DOC_OPTIONS, _RENAMED)
        self._engine = check_engine(engine)
        self._options = CompressionOptions(on_long=on_long, batch_size=batch_size, show_progress=show_progress)

    @classmethod
    def _option_names(cls) -> tuple[frozenset[str], dict[str, str]]:
        return frozenset(_DOC_OPTIONS), dict(_RENAMED)

    @classmethod
    def _check_option_values(cls, options: Any) -> None:
        compression_options(options)

    @property
    def engine(self) -> CompressionEngine:
        return self._engine

    @property
    def on_long(self) -> str:
        return self._options.on_long

    @property
    def options(self) -> CompressionOptions:
        return self._options

    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> list[Document]:
        """Compress the documents (store misses in batches) and return marked copies, in order."""
        return _run(self._engine, self._options, documents)

    async def atransform_documents(self, documents: Sequence[Document], **kwargs: Any) -> list[Document]:
        """:meth:`transform_documents` with compression and store I/O off the event loop."""
        return await _arun(self._engine, self._options, documents)

    def as_runnable(self) -> RunnableLambda:
        """This transformer as an LCEL step (``retriever | transformer.as_runnable() | ...``), sync and async."""

        async def _atransform(documents: Sequence[Document]) -> list[Document]:
            return await self.atransform_documents(documents)

        return RunnableLambda(self.transform_documents, afunc=_atransform, name="CompressedDocumentTransformer")


class CompressedDocumentCompressor(FromPretrained, BaseDocumentCompressor):
    """:class:`CompressedDocumentTransformer` as a ``BaseDocumentCompressor``.

    For ``ContextualCompressionRetriever(base_compressor=..., base_retriever=...)`` and as the
    last step of a ``DocumentCompressorPipeline``. The query is not used: every retrieved
    document is kept and compressed. Options as for :class:`CompressedDocumentTransformer`;
    ``engine`` may be given positionally. The documents it returns hold markers: show users
    :func:`source_documents` of them (e.g. ``result["context"]`` of a retrieval chain).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    engine: CompressionEngine
    """The engine whose compressor and store are used."""
    on_long: OnLong = "split"
    """``"split"``, ``"truncate"`` or ``"error"`` for documents over ``engine.max_chunk_tokens``."""
    batch_size: int = Field(default=16, ge=1)
    """Chunks compressed per forward pass."""
    show_progress: bool = False
    """A progress bar over the chunks being compressed."""

    def __init__(self, engine: CompressionEngine | None = None, /, **data: Any):
        check_options(type(self).__name__, data, type(self).model_fields, _RENAMED)
        compression_options(data)  # the same checks as everywhere
        if engine is not None:
            data["engine"] = engine
        super().__init__(**data)

    @classmethod
    def _option_names(cls) -> tuple[frozenset[str], dict[str, str]]:
        return frozenset(cls.model_fields) - {"engine"}, dict(_RENAMED)

    @classmethod
    def _check_option_values(cls, options: Any) -> None:
        compression_options(options)

    def _options(self) -> CompressionOptions:
        return CompressionOptions(on_long=self.on_long, batch_size=self.batch_size, show_progress=self.show_progress)

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        """Compressed, marked copies of ``documents`` (``query`` is ignored)."""
        return _run(self.engine, self._options(), documents)

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Callbacks | None = None) -> Sequence[Document]:
        """Async :meth:`compress_documents`."""
        return await _arun(self.engine, self._options(), documents)

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
            raise unsupported_content(where, kind)  # the same PromptError (a ValueError) as LlamaIndex's
    return "".join(parts)


def _to_chat(messages: Sequence[BaseMessage], cls_name: str) -> list[dict[str, str]]:
    """LangChain messages as role/content dicts for the model's chat template.

    A ``ChatMessage``'s role must be ``"system"``, ``"user"`` or ``"assistant"`` (or LangChain's
    ``"human"`` / ``"ai"``); any other raises :class:`~compressor_plugin.errors.PromptError`
    (:func:`~compressor_plugin.integrations.core.chat_role`).
    """
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
            role = chat_role(m.role, where)  # a free-text role could forge a turn: known roles only
        else:
            raise ValueError(f"{where}: unsupported message type")
        out.append({"role": role, "content": _text_content(m.content, where)})
    check_messages(out)  # PromptError (a ValueError), as in LlamaIndex's CompressedLLM
    return out


class _Settings:
    """Decoding settings for one call: instance defaults overridden by call kwargs."""

    KEYS = ("max_tokens", "temperature", "top_p", "seed")

    @staticmethod
    def build(model: Any, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        check_model_switch(type(model).__name__, model.model_name, kwargs.pop("model", None))
        if kwargs.pop("tools", None) or kwargs.pop("tool_choice", None):
            raise NotImplementedError(_TOOLS_UNSUPPORTED.format(cls=type(model).__name__))
        settings = {k: kwargs.pop(k, getattr(model, k)) for k in _Settings.KEYS}
        if "max_new_tokens" in kwargs:
            settings["max_tokens"] = kwargs.pop("max_new_tokens")
        check_options(f"{type(model).__name__} call", sorted(k for k in kwargs if not k.startswith("ls_")),
                      (*_Settings.KEYS, "max_new_tokens", "stop", "model"))
        stops = stop_list(stop) if stop is not None else stop_list(model.stop)
        return {"max_new_tokens": check_max_tokens(settings["max_tokens"]), "temperature": float(settings["temperature"]),
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
            "fallback_chunks": result.fallback_chunks, "rejected_chunks": result.rejected_chunks}


class BaseCompressedModel(FromPretrained, BaseModel):
    """Fields, validation and tracing shared by :class:`CompressedChatModel` and :class:`CompressedLLM`.

    ``engine`` may be given positionally or by keyword; ``max_new_tokens`` is accepted as
    another name for ``max_tokens``; any option that does not exist raises
    :class:`~compressor_plugin.errors.UnknownOptionError`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    _ls_model_type: ClassVar[str] = "chat"

    engine: CompressionEngine = Field(exclude=True)
    """Compressor, store and base model."""
    model_name: str | None = None
    """Name reported in traces and ``response_metadata``; default
    :func:`~compressor_plugin.integrations.core.model_name` (base model + compressor), the
    name LlamaIndex's ``CompressedLLM`` reports for the same engine."""
    max_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1)
    """Most tokens generated per answer (``max_new_tokens`` is accepted as another name)."""
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

    def __init__(self, engine: CompressionEngine | None = None, /, **data: Any):
        name = type(self).__name__
        merge_alias(name, data, "max_tokens", "max_new_tokens")
        check_options(name, data, type(self).model_fields, _MODEL_RENAMED)
        if engine is not None:
            if "engine" in data:
                raise TypeError(f"{name} got engine both positionally and by keyword")
            data["engine"] = engine
        super().__init__(**data)

    @classmethod
    def _option_names(cls) -> tuple[frozenset[str], dict[str, str]]:
        return frozenset(cls.model_fields) - {"engine"} | {"max_new_tokens"}, dict(_MODEL_RENAMED)

    @classmethod
    def _check_option_values(cls, options: Any) -> None:
        merged = dict(options)
        merge_alias(cls.__name__, merged, "max_tokens", "max_new_tokens")  # both names, two values
        super()._check_option_values(merged)  # types and bounds of the pydantic fields

    @model_validator(mode="after")
    def _default_name(self) -> "BaseCompressedModel":
        if self.model_name is None:
            self.model_name = engine_model_name(self.engine)
        return self


    def _extra_identifying_params(self) -> dict[str, Any]:
        return {}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """:func:`~compressor_plugin.integrations.core.model_identity` (with this model's
        ``model_name``) and the decoding settings."""
        return {**model_identity(self.engine), "model_name": self.model_name,
                "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, **self._extra_identifying_params()}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="compressor_plugin", ls_model_type=self._ls_model_type,
                                 ls_model_name=kwargs.get("model") if isinstance(kwargs.get("model"), str)
                                 else str(self.model_name),
                                 ls_temperature=kwargs.get("temperature", self.temperature),
                                 ls_max_tokens=kwargs.get("max_tokens", self.max_tokens))
        stops = stop if stop is not None else self.stop
        if stops:
            params["ls_stop"] = list(stops)
        return params


class CompressedChatModel(BaseCompressedModel, BaseChatModel):
    """Chat model over a :class:`CompressionEngine`: prompt markers become stored K/V.

    Messages are rendered with the base model's chat template; every marker in them that this
    engine issued (put there by :class:`CompressedDocumentTransformer`) is replaced by the
    stored compressed context, so the model attends to k positions instead of the chunk's
    text. A missing entry falls back to the chunk's stored text with a
    ``MissingChunkWarning``; a marker the engine did not issue (typed by a user, carried in a
    document) stays plain text, with an ``UnauthorizedMarkerWarning``.

    ``usage_metadata`` counts real prompt positions (``input_tokens`` = text tokens +
    compressed tokens); ``response_metadata`` adds ``compressed_tokens``, ``source_tokens``,
    ``tokens_saved``, ``resolved_chunks``, ``fallback_chunks``, ``rejected_chunks`` and
    ``finish_reason``. Fields are those of :class:`BaseCompressedModel`.

    Tool calling, structured output and non-text inputs are not supported.

    Example:
        >>> llm = CompressedChatModel(engine, max_tokens=64)            # doctest: +SKIP
        >>> llm.invoke(f"Context: {engine.mark(['Paris is in France.'])[0]}\\nWhere is Paris?").content  # doctest: +SKIP
    """

    @property
    def _llm_type(self) -> str:
        return "compressed-chat"

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> Any:
        """Not supported: raises ``NotImplementedError``."""
        raise NotImplementedError(_TOOLS_UNSUPPORTED.format(cls=type(self).__name__))

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Any:
        """Not supported: raises ``NotImplementedError``."""
        raise NotImplementedError(_TOOLS_UNSUPPORTED.format(cls=type(self).__name__))

    # -------------------------------------------------------------- helpers
    def _prepare(self, messages: list[BaseMessage], stop: list[str] | None,
                 kwargs: dict[str, Any]) -> tuple[list[dict[str, str]], dict[str, Any]]:
        chat = _to_chat(messages, type(self).__name__)
        warn_broken_markers([m["content"] for m in chat], stacklevel=5)
        return chat, _Settings.build(self, stop, kwargs)

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


class CompressedLLM(BaseCompressedModel, BaseLLM):
    """Text-completion LLM over a :class:`CompressionEngine` (prompt string in, completion out).

    The prompt is used as plain text (no chat template) unless ``chat_template=True``, which
    sends it as one user message through the model's chat template. Markers in the prompt
    are resolved as in :class:`CompressedChatModel`; several prompts passed together
    (``batch`` / ``generate``) are decoded in one batch. Each ``Generation.generation_info``
    holds ``finish_reason``, ``usage`` (prompt/completion/total tokens) and the compression
    counts (``compressed_tokens``, ``source_tokens``, ``tokens_saved``, ``fallback_chunks``, ...).
    Fields are those of :class:`BaseCompressedModel`, plus ``chat_template``.
    """

    _ls_model_type: ClassVar[str] = "llm"

    chat_template: bool = False
    """Send the prompt as a user message through the chat template instead of as plain text."""

    @property
    def _llm_type(self) -> str:
        return "compressed-llm"

    def _extra_identifying_params(self) -> dict[str, Any]:
        return {"chat_template": self.chat_template}

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

    @staticmethod
    def _joined(chunks: list[GenerationChunk]) -> list[Generation]:
        """One generation from streamed chunks (the last one carries the usage and counts)."""
        return [Generation(text="".join(c.text for c in chunks), generation_info=chunks[-1].generation_info)]

    def _streamed_result(self, generations: list[list[Generation]]) -> LLMResult:
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for (g,) in generations:
            for key in total:
                total[key] += g.generation_info["usage"][key]
        return LLMResult(generations=generations, llm_output={"model_name": self.model_name, "token_usage": total})

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        if self.streaming:  # callbacks get each piece as it comes (on_llm_new_token)
            return self._streamed_result([self._joined(list(self._stream(p, stop, run_manager, **kwargs)))
                                          for p in prompts])
        cfg = _Settings.build(self, stop, kwargs)
        warn_broken_markers(prompts, stacklevel=5)
        if len(prompts) == 1:
            results = [self.engine.generate(prompts[0], chat=self.chat_template, **cfg)]
        else:
            results = self.engine.generate_batch(list(prompts), chat=self.chat_template, **cfg)
        return self._llm_result(results)

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        if self.streaming:
            gens = []
            for p in prompts:
                gens.append(self._joined([c async for c in self._astream(p, stop, run_manager, **kwargs)]))
            return self._streamed_result(gens)
        return await asyncio.to_thread(self._generate, prompts, stop, None, **kwargs)

    def _final_chunk(self, result: EngineResult) -> GenerationChunk:
        return GenerationChunk(text="", generation_info=self._generation(result)[0].generation_info)

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        cfg = _Settings.build(self, stop, kwargs)
        warn_broken_markers([prompt], stacklevel=5)
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
        warn_broken_markers([prompt], stacklevel=5)
        stream = self.engine.astream_result(prompt, chat=self.chat_template, **cfg)
        async for piece in stream:
            chunk = GenerationChunk(text=piece)
            if run_manager is not None:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        yield self._final_chunk(stream.result)
