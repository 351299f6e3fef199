"""LlamaIndex integration: compressed chunks in ingestion pipelines and query engines.

Three thin layers over :class:`~compressor_plugin.engine.CompressionEngine`:

* :class:`CompressTransform` - an ``IngestionPipeline`` step that compresses every node's text
  into the store (once, ever) and records the store key and token counts in the node's
  metadata. Node text is left as it is, so retrievers and embeddings still see the text.
* :class:`CompressedNodePostprocessor` - after retrieval, swaps each node's text for a marker
  (``[[cc:<key>.<tag>]]``) naming its compressed entry; the original text moves to
  ``metadata["original_text"]``, hidden from LLM and embedding views.
* :class:`CompressedLLM` - a LlamaIndex ``CustomLLM`` that resolves the markers in its prompt
  into the stored K/V and answers with the unchanged base model (text fallback, with a
  warning, for a marker whose entry is missing).

All three are thin faces over :mod:`compressor_plugin.integrations.core`, shared with the
LangChain integration: the same options, splitting, metadata, empty-text rule,
``from_pretrained``, model name and chat roles. The response synthesizer of
:meth:`CompressedLLM.response_synthesizer` returns source nodes with their text, not their
markers (:func:`source_nodes` does the same for any list of nodes).

Example::

    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.query_engine import RetrieverQueryEngine
    from compressor_plugin.engine import CompressionEngine
    from compressor_plugin.integrations.llama_index import (
        CompressTransform, CompressedNodePostprocessor, CompressedLLM, qa_templates)

    engine = CompressionEngine.from_pretrained("default", store="/data/chunks")
    nodes = IngestionPipeline(transformations=[
        SentenceSplitter(chunk_size=256, chunk_overlap=20, tokenizer=engine_tokenizer(engine)),
        CompressTransform(engine)]).run(documents=docs)
    llm = CompressedLLM(engine, max_new_tokens=32, stop=["\\n"])
    query_engine = RetrieverQueryEngine(
        retriever=my_retriever,                       # any retriever over ``nodes``
        response_synthesizer=llm.response_synthesizer(**qa_templates("chat")),
        node_postprocessors=[CompressedNodePostprocessor(engine)])
    print(query_engine.query("Who won Super Bowl 50?"))

Nothing in the core package imports LlamaIndex; this module is the only place that does.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, Sequence

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.prompts import ChatPromptTemplate, PromptTemplate
from llama_index.core.prompts.base import BasePromptTemplate
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TransformComponent

from ..anchors import DEFAULT_ANCHORS
from ..errors import BrokenMarkerWarning, ContextTooLongError, InvalidOptionError  # noqa: F401  (ContextTooLongError: on_long="error")
from ..generation import GenerationConfig
from ..markers import split_markers
from ..prompts import CHAT_INSTRUCTION
from ..text import has_control_text, literal_ids
from .core import (
    COMPRESSION_METADATA_KEYS,
    DEFAULT_MAX_NEW_TOKENS,
    ORIGINAL_TEXT_KEY,
    RENAMED_OPTIONS,
    SKIPPED_METADATA_KEYS,
    CompressedText,
    CompressionOptions,
    FromPretrained,
    OnLong,
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
    model_name as engine_model_name,
    shown_text,
    stop_list,
    unsupported_content,
    warn_broken_markers,
)

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core.response_synthesizers import BaseSynthesizer

    from ..engine import CompressionEngine, EngineResult

__all__ = [
    "CompressTransform",
    "CompressedNodePostprocessor",
    "CompressedLLM",
    "BrokenMarkerWarning",
    "COMPRESSION_METADATA_KEYS",
    "ORIGINAL_TEXT_KEY",
    "SKIPPED_METADATA_KEYS",
    "engine_tokenizer",
    "marker_aware_tokenizer",
    "qa_templates",
    "source_nodes",
]

logger = logging.getLogger(__name__)

_RENAMED = RENAMED_OPTIONS
#: Other names of the LLM's options (LangChain's ``max_tokens`` is merged as an alias), and the one to use.
_LLM_RENAMED = {"max_output_tokens": "max_new_tokens"}
#: Metadata keys the integration writes, hidden from the LLM and embedding views of a node.
_HIDDEN_KEYS = tuple(dict.fromkeys((*COMPRESSION_METADATA_KEYS, *SKIPPED_METADATA_KEYS)))


# ---------------------------------------------------------------------------------- tokenizers
def engine_tokenizer(engine: "CompressionEngine") -> Callable[[str], list[int]]:
    """The engine's tokenizer as LlamaIndex wants one: ``text -> token ids`` (no special tokens).

    Use it for node parsers (``SentenceSplitter(tokenizer=...)``) so chunk sizes are counted in
    the base model's tokens, the unit of ``engine.max_chunk_tokens``.
    """
    tok = engine.tokenizer

    def encode(text: str) -> list[int]:
        return list(literal_ids(tok, text))

    return encode


def marker_aware_tokenizer(engine: "CompressionEngine") -> Callable[[str], list[int]]:
    """A tokenizer for LlamaIndex's prompt helper that counts each marker as ``k`` tokens.

    A marker string is ~70 characters (40-60 tokens in most tokenizers) but occupies only ``k``
    positions once resolved. With this tokenizer the prompt helper packs chunks by what the
    model really attends to. Text is counted with the base model's tokenizer. The ids returned
    for a marker are placeholders: only the length is meaningful.
    """
    tok = engine.tokenizer
    k = int(engine.compressor.k) + int(getattr(engine, "anchors", 0))  # anchor tokens: at most the budget
    filler = tok.pad_token_id if tok.pad_token_id is not None else 0

    def encode(text: str) -> list[int]:
        ids: list[int] = []
        for piece in split_markers(text or ""):
            if isinstance(piece, str):
                if piece:
                    ids.extend(literal_ids(tok, piece))
            else:
                ids.extend([filler] * k)
        return ids

    return encode


# ---------------------------------------------------------------------------------- shared helpers
def _node_text(node: BaseNode) -> str:
    """A node's own text (no metadata)."""
    try:
        return node.get_content(metadata_mode=MetadataMode.NONE) or ""
    except Exception:  # pragma: no cover - exotic node types without text
        return ""


def _hide(keys: Sequence[str], excluded: Sequence[str]) -> list[str]:
    return list(excluded) + [k for k in keys if k not in excluded]


def _control_keys(engine: "CompressionEngine", metadata: dict[str, Any], excluded: Sequence[str]) -> tuple[str, ...]:
    """Metadata keys in the LLM's view whose ``key: value`` line spells a control token of the model.

    A retrieved node's metadata is untrusted like its text, and LlamaIndex writes the LLM-visible
    keys into the prompt as text. A raw prompt string (``CompressedLLM(is_chat_model=False)``) is
    read with control tokens recognised, so ``<|im_end|>`` there would act as markup: such keys
    are hidden from the LLM view (the value itself is kept, and embeddings still see it).
    """
    shown = [k for k in metadata if k not in excluded]
    bad = tuple(k for k in shown if has_control_text(engine.tokenizer, f"{k}: {metadata[k]}"))
    if bad:
        logger.debug("metadata keys hidden from the LLM view (they spell control tokens): %s", bad[:20])
    return bad


def _check_nodes(nodes: Sequence[BaseNode]) -> None:
    for i, n in enumerate(nodes):
        if not isinstance(n, BaseNode):  # the same check and message as the LangChain face
            raise TypeError(f"node {i} is a {type(n).__name__}, not a llama_index node")


def _compress_nodes(engine: "CompressionEngine", nodes: Sequence[BaseNode],
                    options: CompressionOptions) -> list[Optional[CompressedText]]:
    """The core's compression of the nodes' texts (empty ones: the core's rule and warning)."""
    _check_nodes(nodes)
    return compress_texts(engine, [_node_text(n) for n in nodes], options, [n.node_id for n in nodes])


async def _acompress_nodes(engine: "CompressionEngine", nodes: Sequence[BaseNode],
                           options: CompressionOptions) -> list[Optional[CompressedText]]:
    """:func:`_compress_nodes` with the model off the event loop."""
    _check_nodes(nodes)
    return await acompress_texts(engine, [_node_text(n) for n in nodes], options, [n.node_id for n in nodes])


# ---------------------------------------------------------------------------------- ingestion
class _DocumentOptions(FromPretrained):
    """``from_pretrained``'s option checks of the two node classes: their fields and the shared
    compression options (:func:`~compressor_plugin.integrations.core.compression_options`)."""

    @classmethod
    def _option_names(cls) -> tuple[frozenset[str], dict[str, str]]:
        return frozenset(cls.model_fields), dict(_RENAMED)  # type: ignore[attr-defined]

    @classmethod
    def _check_option_values(cls, options: Any) -> None:
        compression_options(options)


class CompressTransform(_DocumentOptions, TransformComponent):
    """``IngestionPipeline`` step: compress node texts into the store, record keys in metadata.

    Each compressed node gets ``compressed`` (True), ``store_key`` (the first piece's key),
    ``store_keys`` (all pieces' keys), ``compressed_tokens`` (k per piece), ``source_tokens``
    and ``compression_ratio`` in its metadata; a node left as text gets ``compressed`` (False)
    and ``skip_reason`` (``"short"``: the short-chunk rule; ``"empty"``: no text) -- the same
    metadata as the LangChain integration
    (:func:`~compressor_plugin.integrations.core.compression_metadata`). Those keys are
    excluded from the LLM and embedding metadata views. The node text is not changed. For
    nodes without text (empty or whitespace only) the call issues one
    :class:`~compressor_plugin.errors.EmptyDocumentWarning` naming them (the same rule and
    warning as LangChain's classes). A text longer than
    ``engine.max_chunk_tokens`` is split into pieces (the same pieces, so the same keys, as in
    LangChain), truncated, or refused, following ``on_long``.

    The serialised fields are plain settings (checkpoint name, base and compressor
    fingerprints, k, mode, store folder, options), so IngestionPipeline's cache key is stable
    across runs and processes; the engine is a private attribute. A second run with the same
    cache skips this step entirely (the store would make it cheap anyway: every chunk is a hit).

    Args:
        engine: the compression engine (compressor + store).
        checkpoint: a name for the compressor, recorded in the cache key and used to reload the
            engine after unpickling (e.g. in ``num_workers`` pipelines). Default: the engine's
            checkpoint name when known, else ``"custom"``.
        anchors: the engine's anchor token budget per chunk (recorded, so the cache key differs
            per budget; set from the engine).
        batch_size: chunks per encoder forward.
        on_long: ``"split"`` (default), ``"truncate"`` or ``"error"`` (raise
            :class:`~compressor_plugin.errors.ContextTooLongError`).
        show_progress: a progress bar over the chunks being compressed (off by default).

    Raises:
        UnknownOptionError: an option that does not exist.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    checkpoint: str = Field(default="custom", description="compressor checkpoint name or folder")
    base_fingerprint: str = Field(default="", description="fingerprint of the base model")
    compressor_fingerprint: str = Field(default="", description="fingerprint of the compressor weights and config")
    k: int = Field(default=16, description="compressed tokens per chunk")
    mode: str = Field(default="kv", description="'kv' or 'embedding'")
    anchors: int = Field(default=DEFAULT_ANCHORS, ge=0, description="anchor token budget per chunk (0: none)")
    store_dir: str = Field(default="", description="store folder")
    dtype: str = Field(default="", description="the model's dtype (part of every store key; workers load it so)")
    batch_size: int = Field(default=16, ge=1, description="chunks per encoder forward")
    on_long: OnLong = Field(default="split", description="'split', 'truncate' or 'error' for over-long texts")
    # display only: left out of the serialised fields, so it never changes IngestionPipeline's cache key
    show_progress: bool = Field(default=False, exclude=True, description="a progress bar over the chunks being compressed")

    _engine: Optional["CompressionEngine"] = PrivateAttr(default=None)
    _last_stats: dict[str, int] = PrivateAttr(default_factory=dict)

    def __init__(self, engine: Optional["CompressionEngine"] = None, /, **data: Any):
        check_options(type(self).__name__, data, set(type(self).model_fields) | {"engine", "class_name"}, _RENAMED)
        engine = data.pop("engine", engine)
        compression_options(data)
        if engine is not None:
            check_engine(engine)
            comp = engine.compressor
            data.setdefault("checkpoint", getattr(engine, "checkpoint", None) or "custom")
            own = dict(base_fingerprint=comp.base.fingerprint, compressor_fingerprint=comp.fingerprint,
                       k=int(comp.k), mode=str(comp.mode), anchors=int(engine.anchors),
                       store_dir=str(engine.store.directory), dtype=str(comp.base.dtype).replace("torch.", ""))
            for name, value in own.items():  # these describe the engine: a different value cannot apply
                if name in data and data[name] != value:
                    raise InvalidOptionError(
                        f"CompressTransform takes {name} from its engine ({value!r}), not {data[name]!r}: "
                        "build the engine with the setting you want (anchors, dtype or store: "
                        "CompressTransform.from_pretrained(checkpoint, anchors=..., dtype=..., store=...))", option=name)
            data.update(own)
        elif not data.get("compressor_fingerprint"):
            raise TypeError("CompressTransform needs an engine (CompressTransform(engine))")
        data.pop("class_name", None)
        super().__init__(**data)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "CompressTransform"

    @classmethod
    def _from_engine(cls, engine: "CompressionEngine", checkpoint: str | os.PathLike, **kwargs: Any) -> "CompressTransform":
        # the checkpoint is recorded, so num_workers pipelines can reload the engine in their workers
        kwargs.setdefault("checkpoint", str(checkpoint))
        return cls(engine, **kwargs)


    @property
    def engine(self) -> "CompressionEngine":
        """The engine; after unpickling, reloaded from ``checkpoint`` and ``store_dir``."""
        if self._engine is None:
            self._engine = self._reload_engine()
        return self._engine

    @property
    def last_stats(self) -> dict[str, int]:
        """Counts of the last call: ``nodes``, ``compressed_nodes``, ``chunks``, ``hits``, ``compressed``."""
        return dict(self._last_stats)

    def __getstate__(self) -> dict[str, Any]:
        # the engine (model, store handles, locks) never travels; workers reload it from the fields
        engine = self._engine
        self._engine = None
        try:
            return super().__getstate__()
        finally:
            self._engine = engine

    def _reload_engine(self) -> "CompressionEngine":
        from ..engine import CompressionEngine

        if self.checkpoint == "custom":
            raise RuntimeError(
                "this CompressTransform lost its engine (it was copied to another process) and was built from an "
                "engine without a checkpoint name; run the pipeline without num_workers, or build the transform "
                "with CompressTransform.from_pretrained(<checkpoint>) so workers can reload it")
        engine = CompressionEngine.from_pretrained(self.checkpoint, store=self.store_dir or None, anchors=self.anchors,
                                                   dtype=self.dtype or None)
        if engine.compressor.fingerprint != self.compressor_fingerprint:
            raise RuntimeError(f"checkpoint {self.checkpoint!r} no longer matches this transform (compressor "
                               f"fingerprint {engine.compressor.fingerprint} != {self.compressor_fingerprint})")
        return engine

    def _options(self) -> CompressionOptions:
        return CompressionOptions(on_long=self.on_long, batch_size=self.batch_size, show_progress=self.show_progress)

    def _apply(self, nodes: Sequence[BaseNode], results: list[Optional[CompressedText]]) -> None:
        chunks = hits = 0
        for node, res in zip(nodes, results):
            meta = compression_metadata(node.metadata, res, _node_text(node))
            node.metadata.clear()  # in place: the pipeline's node objects carry the metadata on
            node.metadata.update(meta)
            control = _control_keys(self.engine, meta, node.excluded_llm_metadata_keys)
            node.excluded_llm_metadata_keys = _hide(_HIDDEN_KEYS + control, node.excluded_llm_metadata_keys)
            node.excluded_embed_metadata_keys = _hide(_HIDDEN_KEYS, node.excluded_embed_metadata_keys)
            if res is not None:
                chunks += len(res.keys)
                hits += res.hits
        self._last_stats = {"nodes": len(nodes), "compressed_nodes": sum(r is not None for r in results),
                            "chunks": chunks, "hits": hits, "compressed": chunks - hits}

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Compress the text of every node (through the store) and annotate the nodes in place."""
        self._apply(nodes, _compress_nodes(self.engine, nodes, self._options()))
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Async :meth:`__call__`: compression runs in a worker thread, off the event loop."""
        engine = self.engine
        self._apply(nodes, await _acompress_nodes(engine, nodes, self._options()))
        return nodes


# ---------------------------------------------------------------------------------- retrieval
class CompressedNodePostprocessor(_DocumentOptions, BaseNodePostprocessor):
    """Swap retrieved nodes' text for markers of their compressed entries.

    Every returned node is a copy whose text is the marker (or, for a text longer than
    ``engine.max_chunk_tokens`` with ``on_long="split"``, the markers of its pieces, back to
    back). Scores, node ids, relationships and metadata are kept; the original text is stored
    in ``metadata["original_text"]`` and, like the compression keys, hidden from the LLM and
    embedding metadata views. Chunks not in the store yet are compressed on the spot. Nodes
    left as text keep their text and come back as copies with ``compressed=False`` and
    ``skip_reason`` (``"short"``: the short-chunk rule; ``"empty"``: empty or whitespace-only
    text, with one :class:`~compressor_plugin.errors.EmptyDocumentWarning` per call) -- the
    same metadata, rule and warning as LangChain's classes; nodes that hold nothing but
    markers this engine issued pass through unchanged. Any other text is compressed as text, marker-shaped strings
    included: a retrieved node cannot carry a marker into the prompt. The returned nodes hold
    markers: show users :func:`source_nodes` of them (the synthesizer of
    :meth:`CompressedLLM.response_synthesizer` does so for ``response.source_nodes``).

    Args:
        engine: the compression engine (positional or keyword); :class:`CompressedLLM` must
            use the same engine.
        batch_size: chunks per encoder forward for chunks that need compressing.
        on_long: ``"split"`` (default), ``"truncate"`` (keep the first max_chunk_tokens
            tokens) or ``"error"`` (raise :class:`~compressor_plugin.errors.ContextTooLongError`).
        show_progress: a progress bar over the chunks being compressed (off by default).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    batch_size: int = Field(default=16, ge=1)
    on_long: OnLong = Field(default="split")
    show_progress: bool = Field(default=False)

    _engine: "CompressionEngine" = PrivateAttr()

    def __init__(self, engine: Optional["CompressionEngine"] = None, /, **data: Any):
        check_options(type(self).__name__, data, set(type(self).model_fields) | {"engine", "class_name"}, _RENAMED)
        engine = check_engine(data.pop("engine", engine))
        compression_options(data)
        data.pop("class_name", None)
        super().__init__(**data)
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "CompressedNodePostprocessor"

    @property
    def engine(self) -> "CompressionEngine":
        return self._engine

    def _options(self) -> CompressionOptions:
        return CompressionOptions(on_long=self.on_long, batch_size=self.batch_size, show_progress=self.show_progress)

    def _swap(self, nodes: list[NodeWithScore], results: list[Optional[CompressedText]]) -> list[NodeWithScore]:
        out = list(nodes)
        hidden = (ORIGINAL_TEXT_KEY,) + _HIDDEN_KEYS
        for i, (nws, res) in enumerate(zip(nodes, results)):
            node = nws.node
            original = _node_text(node)
            if res is not None and self._engine.own_marker_keys(original) is not None:
                continue  # already this engine's markers
            # the core's metadata, as LangChain's: compressed, or left as text with its skip_reason
            meta = compression_metadata(node.metadata, res, original, original_text=True)
            control = _control_keys(self._engine, meta, node.excluded_llm_metadata_keys)
            copy = node.model_copy(update={
                "metadata": meta,
                "excluded_llm_metadata_keys": _hide(hidden + control, node.excluded_llm_metadata_keys),
                "excluded_embed_metadata_keys": _hide(hidden, node.excluded_embed_metadata_keys),
                "relationships": dict(node.relationships),
            })
            if res is not None:
                copy.set_content(res.marker_text)
            out[i] = NodeWithScore(node=copy, score=nws.score)
        return out

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: Optional[QueryBundle] = None) -> list[NodeWithScore]:
        return self._swap(nodes, _compress_nodes(self._engine, _scored_nodes(nodes), self._options()))

    async def _apostprocess_nodes(self, nodes: list[NodeWithScore],
                                  query_bundle: Optional[QueryBundle] = None) -> list[NodeWithScore]:
        results = await _acompress_nodes(self._engine, _scored_nodes(nodes), self._options())
        return self._swap(nodes, results)


def _scored_nodes(nodes: Sequence[NodeWithScore]) -> list[BaseNode]:
    out = []
    for i, n in enumerate(nodes):
        if not isinstance(n, NodeWithScore):
            raise TypeError(f"node {i} is a {type(n).__name__}, not a llama_index NodeWithScore")
        out.append(n.node)
    return out


def source_nodes(engine: "CompressionEngine", nodes: Sequence[NodeWithScore]) -> list[NodeWithScore]:
    """Nodes as a user should see them: the chunk text in place of this engine's markers.

    A node from :class:`CompressedNodePostprocessor` has its markers as text, which is what
    the prompt needs but not what a user should be shown (a marker is a handle that makes the
    engine read its chunk; see docs/security.md). For each node whose text is nothing but
    markers ``engine`` issued, this returns a copy whose text is ``metadata["original_text"]``
    (score, id, metadata and relationships kept); any other node is returned as it is. The
    synthesizer of :meth:`CompressedLLM.response_synthesizer` applies it to
    ``response.source_nodes``; apply it yourself with another synthesizer or a chat engine.

    Raises:
        TypeError: an item is not a ``NodeWithScore``.
    """
    out: list[NodeWithScore] = []
    for nws, node in zip(nodes, _scored_nodes(nodes)):
        text = shown_text(engine, _node_text(node), node.metadata)
        if text is None:
            out.append(nws)
            continue
        copy = node.model_copy(update={"metadata": dict(node.metadata), "relationships": dict(node.relationships)})
        copy.set_content(text)
        out.append(NodeWithScore(node=copy, score=nws.score))
    return out


def _shows_chunk_text(synth: "BaseSynthesizer", engine: "CompressionEngine") -> "BaseSynthesizer":
    """``synth``, changed so that its responses' ``source_nodes`` are :func:`source_nodes` (text, not markers).

    The prompt is built from the nodes as they are (markers); only the response's list of
    sources, built after the answer, is replaced.
    """
    synthesize, asynthesize = synth.synthesize, synth.asynthesize

    def shown(response: Any) -> Any:
        nodes = getattr(response, "source_nodes", None)
        if nodes:
            response.source_nodes = source_nodes(engine, nodes)
        return response

    @functools.wraps(synthesize)
    def synthesize_shown(*args: Any, **kwargs: Any) -> Any:
        return shown(synthesize(*args, **kwargs))

    @functools.wraps(asynthesize)
    async def asynthesize_shown(*args: Any, **kwargs: Any) -> Any:
        return shown(await asynthesize(*args, **kwargs))

    synth.synthesize = synthesize_shown  # type: ignore[method-assign]
    synth.asynthesize = asynthesize_shown  # type: ignore[method-assign]
    return synth


# ---------------------------------------------------------------------------------- prompts
def qa_templates(layout: Literal["chat", "plain"] = "chat") -> dict[str, BasePromptTemplate]:
    """Response-synthesizer templates in the layouts the compressor is trained on.

    Returns ``text_qa_template``, ``refine_template`` and ``summary_template`` (for
    ``tree_summarize``), ready to pass to ``RetrieverQueryEngine.from_args(**...)``,
    ``get_response_synthesizer(**...)`` or :meth:`CompressedLLM.response_synthesizer`.

    * ``"chat"``: one user message (the model's chat template is applied by the LLM); use with
      ``CompressedLLM(is_chat_model=True)`` (the default).
    * ``"plain"``: ``Context: ...\\nQuestion: ...\\nAnswer:``; use with
      ``CompressedLLM(is_chat_model=False, stop=["\\n"])``.

    Both keep the context placeholder on its own, so markers of consecutive chunks stay back
    to back, as the compressor saw them in training.
    """
    if layout == "chat":
        def chat(text: str) -> ChatPromptTemplate:
            return ChatPromptTemplate(message_templates=[ChatMessage(role=MessageRole.USER, content=text)])

        qa = chat(f"{CHAT_INSTRUCTION}\n\nContext: {{context_str}}\n\nQuestion: {{query_str}}")
        refine = chat(f"{CHAT_INSTRUCTION}\n\nContext: {{context_msg}}\n\nQuestion: {{query_str}}\n\n"
                      "An earlier answer, from other context, was: {existing_answer}\n"
                      "Reply with the better answer.")
        return {"text_qa_template": qa, "refine_template": refine, "summary_template": qa}
    if layout == "plain":
        qa = PromptTemplate("Context: {context_str}\nQuestion: {query_str}\nAnswer:")
        refine = PromptTemplate("Context: {context_msg}\nQuestion: {query_str}\n"
                                "Earlier answer: {existing_answer}\nAnswer:")
        return {"text_qa_template": qa, "refine_template": refine, "summary_template": qa}
    raise ValueError(f"layout must be 'chat' or 'plain', not {layout!r}")


# ---------------------------------------------------------------------------------- LLM
_GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "stop", "seed")


class CompressedLLM(FromPretrained, CustomLLM):
    """A LlamaIndex LLM over the base model that reads compressed chunks from the store.

    Prompts (strings or chat messages) may hold markers made by
    :class:`CompressedNodePostprocessor` or ``engine.mark``; each is replaced by the stored
    K/V at its place. A marker whose context is missing falls back to the chunk text kept in
    the store, with a :class:`~compressor_plugin.errors.MissingChunkWarning`. Only markers
    this engine issued are resolved: a marker typed by a user or carried in a retrieved
    text stays plain text (:class:`~compressor_plugin.errors.UnauthorizedMarkerWarning`).

    ``complete`` sends the prompt as plain text; ``chat`` renders messages with the model's
    chat template. With ``is_chat_model=True`` (default) query engines use ``chat``.

    Token accounting of each call is in ``response.raw`` and ``response.additional_kwargs``
    (``prompt_tokens``, ``completion_tokens``, ``text_tokens``, ``compressed_tokens``,
    ``source_tokens``, ``tokens_saved``, ``resolved_chunks``, ``fallback_chunks``), and in
    :attr:`last_usage`. Streams carry it on a final response with an empty delta.

    Args:
        engine: the compression engine (positional or keyword; the postprocessor's engine).
        max_new_tokens: generation limit (also ``metadata.num_output``); ``max_tokens`` is
            accepted as another name. Any option that does not exist raises
            :class:`~compressor_plugin.errors.UnknownOptionError`.
        temperature, top_p, seed: sampling (``temperature=0``: greedy).
        stop: stop strings (e.g. ``["\\n"]`` for short answers).
        context_window: for LlamaIndex's prompt helper; default the model's position limit.
        is_chat_model: whether query engines should call ``chat`` (chat template) or
            ``complete`` (plain text).
        model_name: reported in ``metadata``; default
            :func:`~compressor_plugin.integrations.core.model_name` (base model + compressor),
            the name LangChain's classes report for the same engine.

    Chat messages may have the roles ``system``, ``user`` and ``assistant`` (``DEVELOPER`` is
    read as system, ``CHATBOT`` and ``MODEL`` as assistant); any other role (``TOOL``,
    ``FUNCTION``, or a free-text role) raises :class:`~compressor_plugin.errors.PromptError`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())

    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, description="maximum tokens to generate")
    temperature: float = Field(default=0.0, ge=0.0, description="sampling temperature (0 = greedy)")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, description="stop strings")
    seed: Optional[int] = Field(default=None)
    context_window: int = Field(default=8192, gt=0, description="context window reported to LlamaIndex")
    is_chat_model: bool = Field(default=True, description="query engines call chat() with the chat template")
    model_name: str = Field(default="", description="model name reported in metadata")

    _engine: "CompressionEngine" = PrivateAttr()
    _last_result: Optional["EngineResult"] = PrivateAttr(default=None)
    _last_usage: Optional[dict[str, Any]] = PrivateAttr(default=None)

    def __init__(self, engine: Optional["CompressionEngine"] = None, /, **data: Any):
        name = type(self).__name__
        merge_alias(name, data, "max_new_tokens", "max_tokens")  # the name LangChain and OpenAI use
        allowed = set(type(self).model_fields) | {"engine", "class_name"}
        check_options(name, data, allowed, _LLM_RENAMED)
        engine = check_engine(data.pop("engine", engine))
        data.pop("class_name", None)
        base = engine.compressor.base
        if data.get("context_window") is None:
            data["context_window"] = int(getattr(base.model.config, "max_position_embeddings", 0) or 8192)
        if not data.get("model_name"):
            data["model_name"] = engine_model_name(engine)
        if data.get("stop") is None:
            data["stop"] = []
        super().__init__(**data)
        self._engine = engine


    @classmethod
    def class_name(cls) -> str:
        return "CompressedLLM"

    @classmethod
    def _option_names(cls) -> tuple[frozenset[str], dict[str, str]]:
        return frozenset(cls.model_fields) | {"max_tokens"}, dict(_LLM_RENAMED)

    @classmethod
    def _check_option_values(cls, options: Any) -> None:
        merged = dict(options)
        merge_alias(cls.__name__, merged, "max_new_tokens", "max_tokens")  # both names, two values
        super()._check_option_values(merged)  # types and bounds of the pydantic fields

    # ------------------------------------------------------------------ properties
    @property
    def engine(self) -> "CompressionEngine":
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           is_chat_model=self.is_chat_model, model_name=self.model_name)

    @property
    def last_result(self) -> Optional["EngineResult"]:
        """The :class:`EngineResult` of the last non-streaming call (None before any, or after a stream)."""
        return self._last_result

    @property
    def last_usage(self) -> Optional[dict[str, Any]]:
        """Token accounting of the last call (streaming included)."""
        return None if self._last_usage is None else dict(self._last_usage)

    @property
    def marker_tokenizer(self) -> Callable[[str], list[int]]:
        """Tokenizer for prompt helpers / ``Settings.tokenizer``: markers count as ``k`` tokens."""
        return marker_aware_tokenizer(self._engine)

    def prompt_helper(self, **kwargs: Any) -> PromptHelper:
        """A :class:`PromptHelper` sized for this LLM that counts markers as ``k`` tokens."""
        kwargs.setdefault("tokenizer", self.marker_tokenizer)
        return PromptHelper.from_llm_metadata(self.metadata, **kwargs)

    def response_synthesizer(self, response_mode: Any = "compact", **kwargs: Any) -> "BaseSynthesizer":
        """``get_response_synthesizer`` with this LLM and :meth:`prompt_helper` (marker-aware counting).

        Its responses' ``source_nodes`` show each compressed node's text, not its markers
        (:func:`source_nodes`): what ``response.source_nodes`` and
        ``response.get_formatted_sources()`` give a user is the chunk text. The prompt is built
        from the markers as before.
        """
        from llama_index.core.response_synthesizers import ResponseMode, get_response_synthesizer

        kwargs.setdefault("prompt_helper", self.prompt_helper())
        synth = get_response_synthesizer(llm=self, response_mode=ResponseMode(response_mode), **kwargs)
        return _shows_chunk_text(synth, self._engine)

    # ------------------------------------------------------------------ helpers
    def _config(self, kwargs: dict[str, Any]) -> GenerationConfig:
        """Generation settings of one call: this LLM's, overridden by the call's options.

        Raises:
            UnknownOptionError: an option this LLM does not take (a typo such as ``max_new_token``).
        """
        kwargs = dict(kwargs)
        check_model_switch(type(self).__name__, self.model_name, kwargs.pop("model", None))  # as LangChain's
        check_options(f"{type(self).__name__} call", kwargs, (*_GEN_KEYS, "max_tokens", "model"))
        opts: dict[str, Any] = {name: getattr(self, name) for name in _GEN_KEYS}
        if kwargs.get("max_tokens") is not None and kwargs.get("max_new_tokens") is None:
            kwargs = {**kwargs, "max_new_tokens": kwargs["max_tokens"]}  # the name LangChain and OpenAI use
        for name in _GEN_KEYS:
            if kwargs.get(name) is not None:
                opts[name] = kwargs[name]
        opts["max_new_tokens"] = check_max_tokens(opts["max_new_tokens"], "max_new_tokens")
        opts["stop"] = tuple(stop_list(opts["stop"]))
        return GenerationConfig(**opts)

    def _prompt(self, prompt: str, formatted: bool) -> str:
        if not isinstance(prompt, str):
            raise TypeError(f"the prompt is a {type(prompt).__name__}, not a string")
        if not formatted and self.completion_to_prompt is not None:
            prompt = self.completion_to_prompt(prompt)
        warn_broken_markers([prompt], stacklevel=4)
        return prompt

    @staticmethod
    def _messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
        """Messages as role/content dicts; roles through the core's rule (:func:`~compressor_plugin.integrations.core.chat_role`).

        Raises:
            PromptError: no messages, an unknown role, or a content block that is not text
                (image, audio, video, document, tool call...; thinking blocks are skipped): the
                same errors, with the same words, as LangChain's ``CompressedChatModel``.
        """
        out = []
        for i, m in enumerate(messages):
            where = f"message {i} ({type(m).__name__})"
            role = chat_role(getattr(m, "role", None), where)
            for block in getattr(m, "blocks", None) or []:
                kind = getattr(block, "block_type", type(block).__name__)
                if kind not in ("text", "thinking"):
                    raise unsupported_content(where, kind)
            out.append({"role": role, "content": m.content or ""})
        check_messages(out)
        warn_broken_markers([m["content"] for m in out], stacklevel=4)
        return out

    def _record(self, result: "EngineResult") -> dict[str, Any]:
        usage: dict[str, Any] = {**result.usage(), "resolved_chunks": result.resolved_chunks,
                                 "fallback_chunks": result.fallback_chunks, "rejected_chunks": result.rejected_chunks}
        self._last_result = result
        self._last_usage = usage
        return usage

    def _stream_end(self, result: "EngineResult") -> tuple["EngineResult", dict[str, Any]]:
        """The finished stream's result and its recorded usage (exact, as for a non-streamed call)."""
        return result, self._record(result)

    def _raw(self, result: "EngineResult", usage: dict[str, Any]) -> dict[str, Any]:
        return {"usage": usage, "finish_reason": result.generation.finish_reason,
                "missing_keys": list(result.missing_keys), "ttft_s": result.generation.ttft_s,
                "total_s": result.generation.total_s}

    # ------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Answer a prompt string (markers resolved from the store, no chat template)."""
        prompt = self._prompt(prompt, formatted)
        result = self._engine.generate(prompt, self._config(kwargs), chat=False)
        usage = self._record(result)
        return CompletionResponse(text=result.text, raw=self._raw(result, usage), additional_kwargs=dict(usage))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream the answer to a prompt string as it is generated."""
        prompt = self._prompt(prompt, formatted)
        cfg = self._config(kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            stream = self._engine.stream_result(prompt, cfg, chat=False)
            for piece in stream:
                text += piece
                yield CompletionResponse(text=text, delta=piece)
            result, usage = self._stream_end(stream.result)
            yield CompletionResponse(text=text, delta="", raw=self._raw(result, usage), additional_kwargs=dict(usage))

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Async :meth:`complete` (generation runs in a worker thread)."""
        prompt = self._prompt(prompt, formatted)
        result = await self._engine.agenerate(prompt, self._config(kwargs), chat=False)
        usage = self._record(result)
        return CompletionResponse(text=result.text, raw=self._raw(result, usage), additional_kwargs=dict(usage))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        """Async streaming: pieces arrive as the model produces them."""
        prompt = self._prompt(prompt, formatted)
        cfg = self._config(kwargs)

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            stream = self._engine.astream_result(prompt, cfg, chat=False)
            async for piece in stream:
                text += piece
                yield CompletionResponse(text=text, delta=piece)
            result, usage = self._stream_end(stream.result)
            yield CompletionResponse(text=text, delta="", raw=self._raw(result, usage), additional_kwargs=dict(usage))

        return gen()

    # ------------------------------------------------------------------ chat
    @staticmethod
    def _chat_response(text: str, delta: Optional[str] = None, raw: Any = None,
                       usage: Optional[dict[str, Any]] = None) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, raw=raw,
                            additional_kwargs=dict(usage or {}))

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer chat messages, rendered with the model's chat template."""
        result = self._engine.generate(self._messages(messages), self._config(kwargs), chat=True)
        usage = self._record(result)
        return self._chat_response(result.text, raw=self._raw(result, usage), usage=usage)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Stream the answer to chat messages."""
        msgs = self._messages(messages)
        cfg = self._config(kwargs)

        def gen() -> ChatResponseGen:
            text = ""
            stream = self._engine.stream_result(msgs, cfg, chat=True)
            for piece in stream:
                text += piece
                yield self._chat_response(text, delta=piece)
            result, usage = self._stream_end(stream.result)
            yield self._chat_response(text, delta="", raw=self._raw(result, usage), usage=usage)

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Async :meth:`chat`."""
        result = await self._engine.agenerate(self._messages(messages), self._config(kwargs), chat=True)
        usage = self._record(result)
        return self._chat_response(result.text, raw=self._raw(result, usage), usage=usage)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        """Async streaming of the answer to chat messages."""
        msgs = self._messages(messages)
        cfg = self._config(kwargs)

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            stream = self._engine.astream_result(msgs, cfg, chat=True)
            async for piece in stream:
                text += piece
                yield self._chat_response(text, delta=piece)
            result, usage = self._stream_end(stream.result)
            yield self._chat_response(text, delta="", raw=self._raw(result, usage), usage=usage)

        return gen()
