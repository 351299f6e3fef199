"""Tests of the LangChain integration on the real default model.

Plumbing tests run with whatever compressor is available (the shipped default one, or an
untrained k=16 one until it ships); answer-correctness tests need the shipped checkpoint.
Long-document handling uses a tiny random model with a 64-token chunk limit.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate

from compressor_plugin.compressor import Compressor, CompressorConfig, shipped_checkpoints
from compressor_plugin.engine import CompressionEngine
from compressor_plugin.integrations.core import model_name
from compressor_plugin.integrations.langchain import (
    CompressedChatModel,
    CompressedDocumentCompressor,
    CompressedDocumentTransformer,
    CompressedLLM,
    EmptyDocumentWarning,
)
from compressor_plugin.markers import MARKER_RE, MissingChunkWarning
from compressor_plugin.store import ContextStore, normalize_text

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "docs_small.jsonl"
SHIPPED = "kv-k16" in shipped_checkpoints()
K = 16
MARKER_ONLY = re.compile(r"\[\[cc:[0-9a-f]{64}\.[0-9a-f]{32}\]\]")

PROMPT = ChatPromptTemplate.from_messages([
    ("system", "Answer the question using the context."),
    ("human", "Context: {context}\n\nQuestion: {question}"),
])


def format_docs(docs: list[Document]) -> str:
    return "\n\n".join(d.page_content for d in docs)


def _rows() -> list[dict]:
    with FIXTURE.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _example() -> ModuleType:
    name = "langchain_rag_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "langchain_rag.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# ---------------------------------------------------------------------------------- fixtures
def _engine_for(store: ContextStore) -> CompressionEngine:
    if SHIPPED:
        return CompressionEngine.from_pretrained("default", store=store, device="cpu", anchors=0)
    from compressor_plugin.models import load_base_model

    return CompressionEngine(Compressor(load_base_model(device="cpu"), CompressorConfig(k=K)), store, anchors=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> CompressionEngine:
    """The real default model with the default (or an untrained k=16) compressor, loaded once."""
    store = ContextStore(tmp_path_factory.mktemp("lc-store"))
    yield _engine_for(store)
    store.close()


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> CompressionEngine:
    """A tiny random model with a 64-token chunk limit: long-document handling without long compute."""
    from compressor_plugin.models import tiny_random_llama

    comp = Compressor(tiny_random_llama(seed=1), CompressorConfig(k=4, lora_r=4, max_length=64))
    store = ContextStore(tmp_path_factory.mktemp("lc-tiny"))
    yield CompressionEngine(comp, store, anchors=0)
    store.close()


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    """Three real SQuAD contexts with ids and unusual metadata (nested dicts, None values)."""
    rows = _rows()[:3]
    return [Document(page_content=r["text"], id=r["id"],
                     metadata={"title": r["title"], "none": None, "nested": {"a": {"b": [1, None, "x"]}, "c": None},
                               "score": 0.5})
            for r in rows]


@pytest.fixture(scope="module")
def compressed(engine: CompressionEngine, docs: list[Document]) -> list[Document]:
    return CompressedDocumentTransformer(engine).transform_documents(docs)


# ---------------------------------------------------------------------------------- documents
def test_transformer_marks_documents_keeping_metadata_and_ids(engine, docs, compressed):
    assert len(compressed) == len(docs)
    for doc, out in zip(docs, compressed):
        assert out is not doc and out.id == doc.id
        meta = out.metadata
        key = meta["store_key"]
        assert out.page_content == engine.marker(key) and MARKER_ONLY.fullmatch(out.page_content)
        assert meta["store_keys"] == [key]
        assert key == engine.store.key_for(doc.page_content, engine.compressor)
        assert engine.store.get(key) is not None
        assert engine.store.get_text(key) == normalize_text(doc.page_content)
        for name, value in doc.metadata.items():
            assert meta[name] == value  # nested dicts and None values survive
        assert meta["compressed"] is True
        assert meta["original_text"] == doc.page_content
        assert meta["compressed_tokens"] == K
        assert meta["source_tokens"] == engine.count_tokens(normalize_text(doc.page_content))
        assert meta["compression_ratio"] == pytest.approx(meta["source_tokens"] / K)
        # the inputs are untouched
        assert "compressed" not in doc.metadata and not MARKER_RE.search(doc.page_content)
    # compressing again hits the store and gives the same markers; compressed documents pass through
    again = CompressedDocumentTransformer(engine).transform_documents(docs)
    assert [d.page_content for d in again] == [d.page_content for d in compressed]
    twice = CompressedDocumentTransformer(engine).transform_documents(compressed)
    assert all(a is b for a, b in zip(twice, compressed))


def test_empty_documents_pass_through_with_a_warning(engine, docs, compressed):
    before = len(engine.store)
    inputs = [Document("", id="empty", metadata={"x": 1}), docs[0], Document(" \n\t ", metadata={"y": None})]
    with pytest.warns(EmptyDocumentWarning, match="no text"):
        out = CompressedDocumentTransformer(engine).transform_documents(inputs)
    assert out[0].page_content == "" and out[0].id == "empty"
    assert out[0].metadata == {"x": 1, "compressed": False, "skip_reason": "empty"}
    assert out[2].page_content == " \n\t " and out[2].metadata == {"y": None, "compressed": False,
                                                                    "skip_reason": "empty"}
    assert out[1].page_content == compressed[0].page_content
    assert len(engine.store) == before
    with pytest.warns(EmptyDocumentWarning):
        [only] = CompressedDocumentTransformer(engine).transform_documents([Document("")])
    assert only.metadata["compressed"] is False


def _long_text(engine: CompressionEngine, tokens: int) -> str:
    text = ""
    for row in _rows():
        text = (text + " " + row["text"]).strip()
        if engine.count_tokens(text) > tokens:
            return text
    raise AssertionError("fixture too small")


def test_long_documents_split_into_back_to_back_markers(tiny_engine):
    limit = tiny_engine.max_chunk_tokens
    text = _long_text(tiny_engine, 3 * limit + 10)
    n = tiny_engine.count_tokens(normalize_text(text))
    doc = Document(text, id="long", metadata={"k": "v"})
    out = CompressedDocumentTransformer(tiny_engine).transform_documents([doc])
    assert len(out) == 1 and out[0].id == "long"
    meta = out[0].metadata
    keys = meta["store_keys"]
    assert math.ceil(n / limit) <= len(keys) <= 2 * math.ceil(n / limit)  # packed sentences, at most the limit each
    assert meta["store_key"] == keys[0]
    assert out[0].page_content == "".join(tiny_engine.marker(k) for k in keys)  # back to back: one document
    pieces = [tiny_engine.store.get_text(k) for k in keys]
    assert all(tiny_engine.count_tokens(p) <= limit for p in pieces)
    assert "".join(pieces).replace(" ", "") == normalize_text(text).replace(" ", "")  # nothing lost or repeated
    assert meta["compressed_tokens"] == tiny_engine.compressor.k * len(keys)
    assert meta["source_tokens"] == sum(tiny_engine.count_tokens(p) for p in pieces)
    assert meta["original_text"] == text and meta["k"] == "v"
    # the markers resolve to one context each, with no text between them
    res = tiny_engine.resolve("Context: " + out[0].page_content + "\nQuestion: ?")
    assert res.resolved == len(keys) and res.fallbacks == 0
    assert len(res.segments) == len(keys) + 2


def test_long_documents_truncate_or_error(tiny_engine):
    limit = tiny_engine.max_chunk_tokens
    text = _long_text(tiny_engine, limit + 20)
    doc = Document(text, id="long2")
    out = CompressedDocumentTransformer(tiny_engine, on_long="truncate").transform_documents([doc])[0]
    assert len(out.metadata["store_keys"]) == 1 and out.metadata["truncated"] is True
    assert out.metadata["source_tokens"] == limit
    assert out.metadata["compressed_tokens"] == tiny_engine.compressor.k
    with pytest.raises(ValueError, match=r"document 'long2' has \d+ tokens, more than .* limit of 64"):
        CompressedDocumentTransformer(tiny_engine, on_long="error").transform_documents([Document("short"), doc])
    with pytest.raises(ValueError, match="on_long"):
        CompressedDocumentTransformer(tiny_engine, on_long="drop")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="CompressionEngine"):
        CompressedDocumentTransformer(object())  # type: ignore[arg-type]


def test_document_compressor_in_contextual_compression_retriever(engine, docs, compressed):
    classic = pytest.importorskip("langchain_classic.retrievers")
    from langchain_classic.retrievers.document_compressors import DocumentCompressorPipeline

    ex = _example()
    retriever = ex.BM25Retriever(documents=docs, k=2)
    question = "Which NFL team represented the AFC at Super Bowl 50?"
    expected = [d.id for d in retriever.invoke(question)]
    assert expected[0] == "Super_Bowl_50#0"
    ccr = classic.ContextualCompressionRetriever(base_compressor=CompressedDocumentCompressor(engine=engine),
                                                 base_retriever=retriever)
    got = ccr.invoke(question)
    assert [d.id for d in got] == expected
    by_id = {d.id: d for d in compressed}
    assert [d.page_content for d in got] == [by_id[i].page_content for i in expected]
    assert all(d.metadata["compressed"] is True for d in got)
    pipeline = DocumentCompressorPipeline(transformers=[CompressedDocumentCompressor(engine=engine)])
    assert [d.page_content for d in pipeline.compress_documents(docs, "q")] == [d.page_content for d in compressed]


# ---------------------------------------------------------------------------------- prompts and chat model
def _text_tokens(engine: CompressionEngine, rendered: str) -> int:
    """Text tokens of a rendered prompt once its markers are taken out (whitespace between markers dropped)."""
    parts = MARKER_ONLY.split(rendered)
    total = 0
    for i, part in enumerate(parts):
        if 0 < i < len(parts) - 1 and not part.strip():
            continue
        total += len(engine.tokenizer(part, add_special_tokens=False)["input_ids"]) if part else 0  # template markup parsed
    return total


def test_markers_survive_prompt_template_and_document_formatting(engine, compressed):
    messages = PROMPT.format_messages(context=format_docs(compressed[:2]), question="Who won?")
    keys = [d.metadata["store_key"] for d in compressed[:2]]
    assert [m.group(1) for m in MARKER_RE.finditer(messages[1].content)] == keys
    chat = [{"role": "system", "content": messages[0].content}, {"role": "user", "content": messages[1].content}]
    res = engine.resolve(chat)
    assert res.resolved == 2 and res.fallbacks == 0
    assert not any(isinstance(s, str) and "[[cc:" in s for s in res.segments)


def test_chat_model_usage_metadata_is_consistent(engine, compressed):
    llm = CompressedChatModel(engine=engine, max_tokens=6)
    inputs = {"context": format_docs(compressed[:2]), "question": "Which team won Super Bowl 50?"}
    msg = (PROMPT | llm).invoke(inputs)
    assert isinstance(msg, AIMessage) and isinstance(msg.content, str) and msg.content
    rm, usage = msg.response_metadata, msg.usage_metadata
    markers = len(MARKER_RE.findall(inputs["context"]))
    assert rm["compressed_tokens"] == K * markers == K * 2
    assert rm["resolved_chunks"] == 2 and rm["fallback_chunks"] == 0
    assert rm["source_tokens"] == sum(d.metadata["source_tokens"] for d in compressed[:2])
    assert rm["tokens_saved"] == rm["source_tokens"] - rm["compressed_tokens"]
    assert rm["model_name"] == model_name(engine) and rm["model_name"].startswith(engine.compressor.base.name + "+")
    assert rm["finish_reason"] in ("stop", "length")
    assert usage["input_tokens"] == rm["text_tokens"] + rm["compressed_tokens"]
    assert 1 <= usage["output_tokens"] <= 6
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    rendered = engine.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer the question using the context."},
         {"role": "user", "content": f"Context: {inputs['context']}\n\nQuestion: {inputs['question']}"}],
        tokenize=False, add_generation_prompt=True)
    assert rm["text_tokens"] == _text_tokens(engine, rendered)
    # the same prompt with the documents as text costs about tokens_saved more positions
    plain = (PROMPT | CompressedChatModel(engine=engine, max_tokens=1)).invoke(
        {"context": "\n\n".join(d.metadata["original_text"] for d in compressed[:2]), "question": inputs["question"]})
    assert plain.response_metadata["compressed_tokens"] == 0
    assert abs(plain.usage_metadata["input_tokens"] - usage["input_tokens"] - rm["tokens_saved"]) <= 8


def test_stream_yields_several_chunks_matching_invoke(engine, compressed):
    llm = CompressedChatModel(engine=engine, max_tokens=8)
    messages = [HumanMessage(f"Context: {compressed[0].page_content}\n\nQuestion: What is this text about?")]
    full = llm.invoke(messages)
    chunks = list(llm.stream(messages))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert len([c for c in chunks if c.content]) > 1
    assert "".join(c.content for c in chunks) == full.content
    assert chunks[-1].chunk_position == "last"
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert merged.usage_metadata["input_tokens"] == full.usage_metadata["input_tokens"]
    # the stream's usage is the generation's own accounting, as for invoke
    assert merged.usage_metadata["output_tokens"] == full.usage_metadata["output_tokens"]
    assert merged.response_metadata["finish_reason"] == full.response_metadata["finish_reason"]
    assert merged.response_metadata["compressed_tokens"] == K
    assert merged.response_metadata["model_name"] == full.response_metadata["model_name"]


@pytest.mark.asyncio
async def test_async_transform_ainvoke_and_astream(engine, docs, compressed):
    out = await CompressedDocumentTransformer(engine).atransform_documents(docs)
    assert [d.page_content for d in out] == [d.page_content for d in compressed]
    extra = Document(_rows()[3]["text"], id="async-doc")
    runnable = CompressedDocumentTransformer(engine).as_runnable()
    [new] = await runnable.ainvoke([extra])
    assert new.id == "async-doc" and new.metadata["store_key"] in engine.store
    llm = CompressedChatModel(engine=engine, max_tokens=6)
    inputs = {"context": format_docs([compressed[0], new]), "question": "What is this about?"}
    msg = await (PROMPT | llm).ainvoke(inputs)
    assert msg.content and msg.response_metadata["compressed_tokens"] == 2 * K
    chunks = [c async for c in (PROMPT | llm).astream(inputs)]
    assert len([c for c in chunks if c.content]) > 1
    assert "".join(c.content for c in chunks) == msg.content
    assert chunks[-1].usage_metadata["input_tokens"] == msg.usage_metadata["input_tokens"]


def test_missing_entry_falls_back_to_text(engine, docs, tmp_path):
    # A store too small for two contexts: writing the second evicts the first, whose text stays
    # (texts are kept apart, under their own limit). diskcache may cull several least recently
    # used entries at once, so the second is written again if it went too.
    per_context = engine.store.get(engine.store.key_for(docs[0].page_content, engine.compressor)).nbytes
    store = ContextStore(tmp_path / "small", size_limit=int(per_context * 1.5), text_size_limit=2**24)
    small = CompressionEngine(engine.compressor, store, anchors=0)
    first = CompressedDocumentTransformer(small).transform_documents(docs[:1])[0]
    second = CompressedDocumentTransformer(small).transform_documents(docs[1:2])[0]
    k1, k2 = first.metadata["store_key"], second.metadata["store_key"]
    if store.get(k2) is None:
        CompressedDocumentTransformer(small).transform_documents(docs[1:2])
    assert store.get(k1) is None and store.get_text(k1) is not None and store.get(k2) is not None
    llm = CompressedChatModel(engine=small, max_tokens=3)
    messages = [HumanMessage(f"Context: {first.page_content}\n\n{second.page_content}\n\nQuestion: Who played?")]
    with pytest.warns(MissingChunkWarning, match="missing from the store; using its text"):
        msg = llm.invoke(messages)
    rm = msg.response_metadata
    assert rm["fallback_chunks"] == 1 and rm["resolved_chunks"] == 1 and rm["compressed_tokens"] == K
    assert rm["text_tokens"] > engine.count_tokens(normalize_text(docs[0].page_content))
    with pytest.warns(MissingChunkWarning) as caught:
        last = list(llm.stream(messages))[-1]
    # the prompt is resolved once per stream: one fallback, one warning
    assert sum(issubclass(w.category, MissingChunkWarning) for w in caught) == 1
    assert last.response_metadata["fallback_chunks"] == 1
    assert last.usage_metadata["input_tokens"] == msg.usage_metadata["input_tokens"]
    # with the text gone too there is nothing to fall back on: a clear error
    store.delete(k1)
    with pytest.raises(KeyError, match="not in the store and its text is unknown"):
        llm.invoke(messages)
    store.close()


def test_stop_sequences_max_tokens_and_sampling(engine):
    llm = CompressedChatModel(engine=engine, max_tokens=10)
    question = "What is the capital of France?"
    full = llm.invoke(question).content
    assert len(full) > 8
    stop = full[4:7]
    expected = full[:full.find(stop)]
    got = llm.invoke(question, stop=[stop])
    assert got.content == expected and got.response_metadata["finish_reason"] == "stop"
    assert CompressedChatModel(engine=engine, max_tokens=10, stop=[stop]).invoke(question).content == expected
    short = llm.bind(max_tokens=2).invoke(question)
    assert short.usage_metadata["output_tokens"] <= 2 and full.startswith(short.content)
    sampled = [llm.invoke(question, temperature=1.0, seed=7, max_tokens=4).content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_unsupported_features_fail_clearly(engine):
    llm = CompressedChatModel(engine=engine)
    with pytest.raises(NotImplementedError, match="tool calling"):
        llm.bind_tools([])
    with pytest.raises(NotImplementedError, match="structured output"):
        llm.with_structured_output({"title": "x", "type": "object", "properties": {}})
    image = HumanMessage(content=[{"type": "text", "text": "what is this?"},
                                  {"type": "image", "url": "https://example.com/a.png"}])
    with pytest.raises(ValueError, match="only text content"):
        llm.invoke([image])
    with pytest.raises(NotImplementedError, match="tool calling"):
        llm.invoke([SystemMessage("s"), ToolMessage("3", tool_call_id="1")])
    with pytest.raises(TypeError, match="has no option 'frequency_penalty'"):
        llm.invoke("hi", frequency_penalty=1.0)
    with pytest.raises(ValueError, match="cannot switch to model"):
        llm.invoke("hi", model="another-model")
    with pytest.raises(ValueError):
        CompressedChatModel(engine=engine, max_tokens=0)
    with pytest.raises(ValueError):
        CompressedChatModel(engine="not an engine")


def test_llm_completion_batch_and_stream(engine, compressed):
    llm = CompressedLLM(engine=engine, max_tokens=5, chat_template=True)
    prompts = [f"Context: {d.page_content}\n\nQuestion: What is this text about?" for d in compressed[:2]]
    result = llm.generate(prompts)  # one batched decode
    assert len(result.generations) == 2
    for gens in result.generations:
        info = gens[0].generation_info
        assert info["compressed_tokens"] == K and info["fallback_chunks"] == 0
        assert info["usage"]["prompt_tokens"] == info["text_tokens"] + K
        assert 1 <= info["usage"]["completion_tokens"] <= 5
    total = result.llm_output["token_usage"]
    assert total["prompt_tokens"] == sum(g[0].generation_info["usage"]["prompt_tokens"] for g in result.generations)
    single = llm.invoke(prompts[0])
    assert isinstance(single, str) and single
    pieces = list(llm.stream(prompts[0]))
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == single
    # as plain text (no chat template) the prompt is shorter by the template's turns
    plain = CompressedLLM(engine=engine, max_tokens=2).generate(prompts[:1]).generations[0][0].generation_info
    assert plain["compressed_tokens"] == K
    assert plain["usage"]["prompt_tokens"] < result.generations[0][0].generation_info["usage"]["prompt_tokens"]


# ---------------------------------------------------------------------------------- the example chain
def test_example_chain_runs_on_compressed_documents(engine):
    ex = _example()
    docs = ex.load_documents()
    assert len(docs) == ex.N_DOCS and all(d.page_content for d in docs)
    retriever = ex.BM25Retriever(documents=docs, k=2)
    question, _ = ex.DEFAULT_QUESTIONS[0]
    source = next(r["id"] for r in _rows() if any(qa["question"] == question for qa in r["qa"]))
    assert retriever.invoke(question)[0].id == source
    compressed_chain, _ = ex.build_chains(engine, retriever, max_new_tokens=4)
    answer, usage, info, _ = ex.ask(compressed_chain, question)
    assert isinstance(answer, str)
    assert info["compressed_tokens"] == 2 * K and info["fallback_chunks"] == 0
    assert usage["input_tokens"] == info["text_tokens"] + 2 * K


@pytest.mark.skipif(not SHIPPED, reason="needs the shipped default compressor checkpoint (kv-k16)")
def test_example_chain_answers_known_questions(engine):
    ex = _example()
    retriever = ex.BM25Retriever(documents=ex.load_documents(), k=2)
    compressed_chain, _ = ex.build_chains(engine, retriever)
    hits = 0
    for question, golds in ex.DEFAULT_QUESTIONS:
        answer = compressed_chain.invoke(question)
        hits += any(g.lower() in answer.lower() for g in golds)
    assert hits >= 2


def test_from_pretrained_passes_dtype(tmp_path):
    import torch

    llm = CompressedChatModel.from_pretrained(store=tmp_path / "store", device="cpu", dtype="bfloat16", max_tokens=2)
    assert llm.engine.compressor.base.dtype == torch.bfloat16 and llm.max_tokens == 2
    llm.engine.store.close()


def test_short_documents_stay_text_with_the_core_metadata(engine):
    """A document short enough to stay text (the short-chunk rule) is recorded as LlamaIndex's
    classes record it: compressed=False and skip_reason="short" (core.skipped_metadata)."""
    from compressor_plugin.integrations.core import skipped_metadata

    short = "Paris, 1889."
    assert engine.count_tokens(short) <= engine.keep_text_tokens
    before = len(engine.store)
    for out in (CompressedDocumentTransformer(engine).transform_documents([Document(short, id="s", metadata={"x": 1})]),
                CompressedDocumentCompressor(engine).compress_documents([Document(short, id="s", metadata={"x": 1})],
                                                                        "q")):
        assert out[0].page_content == short and out[0].id == "s"
        assert out[0].metadata == {"x": 1, "compressed": False, "skip_reason": "short"}
        assert {k: out[0].metadata[k] for k in skipped_metadata(short)} == skipped_metadata(short)
    assert len(engine.store) == before  # nothing was compressed or stored


def test_from_pretrained_checks_options_before_loading(monkeypatch):
    """A misspelt option is refused before any model loads, with the closest valid name."""
    from compressor_plugin.errors import UnknownOptionError
    from compressor_plugin.integrations import core

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(core, "load_engine", no_load)
    monkeypatch.setattr(CompressionEngine, "from_pretrained", staticmethod(no_load))
    with pytest.raises(UnknownOptionError, match="CompressedChatModel.from_pretrained has no option 'max_token'; "
                                                 "did you mean 'max_tokens'"):
        CompressedChatModel.from_pretrained(store="unused", max_token=8)
    with pytest.raises(UnknownOptionError, match="did you mean 'batch_size'"):
        CompressedDocumentTransformer.from_pretrained(batchsize=8)
