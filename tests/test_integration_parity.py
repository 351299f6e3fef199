"""A LangChain app and a LlamaIndex app over one corpus: the same store keys, the same answers.

Both integrations are thin faces over compressor_plugin.integrations.core, so the same
documents must give the same pieces, keys, metadata, options and (greedy) answers.
"""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from langchain_core.documents import Document as LCDocument  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnableLambda, RunnablePassthrough  # noqa: E402
from llama_index.core import Document as LIDocument  # noqa: E402
from llama_index.core.query_engine import RetrieverQueryEngine  # noqa: E402
from llama_index.core.retrievers import BaseRetriever  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402

from compressor_plugin.compressor import Compressor, CompressorConfig, shipped_checkpoints  # noqa: E402
from compressor_plugin.engine import CompressionEngine  # noqa: E402
from compressor_plugin.errors import (  # noqa: E402
    ContextTooLongError,
    InvalidOptionError,
    UnknownOptionError,
)
from compressor_plugin.integrations import langchain as lc  # noqa: E402
from compressor_plugin.integrations import llama_index as li  # noqa: E402
from compressor_plugin.prompts import CHAT_INSTRUCTION  # noqa: E402
from compressor_plugin.store import ContextStore  # noqa: E402

SHIPPED = "kv-k16" in shipped_checkpoints()

#: Invented paragraphs: no model has seen these facts.
CORPUS = [
    ("orchard", "The Veltmoor orchard was planted in 1893 by the brewer Anselm Groot. It grows a pale pear "
                "called the Groot Amber, which ripens in late October and is pressed into a dry perry."),
    ("ferry", "The ferry between Quill Harbour and the island of Saint Ondine leaves at 7:40 every morning. "
              "Its captain, Marisol Venn, has crossed the strait more than nine thousand times."),
    ("observatory", "The Hallorin observatory sits on a ridge 2,140 metres above sea level. Its main telescope, "
                    "named Bright Wren, has a mirror 3.1 metres wide and was first used in 1987."),
]
QUESTIONS = ["Who planted the Veltmoor orchard?", "What is the name of the main telescope of the Hallorin observatory?"]


@pytest.fixture(scope="module")
def engine(shipped_compressor, tmp_path_factory: pytest.TempPathFactory) -> CompressionEngine:
    store = ContextStore(tmp_path_factory.mktemp("parity"))
    yield CompressionEngine(shipped_compressor, store, anchors=0)
    store.close()


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> CompressionEngine:
    from compressor_plugin.models import tiny_random_llama

    comp = Compressor(tiny_random_llama(seed=1), CompressorConfig(k=4, lora_r=4, max_length=64))
    store = ContextStore(tmp_path_factory.mktemp("parity-tiny"))
    yield CompressionEngine(comp, store, anchors=0)
    store.close()


class _AllNodes(BaseRetriever):
    """Returns every node, in corpus order (the retrieval step is not what is compared)."""

    def __init__(self, nodes: list[TextNode]):
        super().__init__()
        self._nodes = nodes

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [NodeWithScore(node=n.model_copy(), score=1.0) for n in self._nodes]


def _langchain_app(engine: CompressionEngine, docs: list[LCDocument]):
    prompt = ChatPromptTemplate.from_messages([("human", f"{CHAT_INSTRUCTION}\n\nContext: {{context}}\n\n"
                                                         "Question: {question}")])
    compress = lc.CompressedDocumentTransformer(engine).as_runnable()
    retrieve = RunnableLambda(lambda _question: docs)
    return ({"context": retrieve | compress | (lambda ds: "\n\n".join(d.page_content for d in ds)),
             "question": RunnablePassthrough()}
            | prompt | lc.CompressedChatModel(engine, max_tokens=16, temperature=0.0))


def _llama_index_app(engine: CompressionEngine, nodes: list[TextNode]) -> tuple[RetrieverQueryEngine, li.CompressedLLM]:
    llm = li.CompressedLLM(engine, max_new_tokens=16, temperature=0.0)
    app = RetrieverQueryEngine(retriever=_AllNodes(nodes),
                               response_synthesizer=llm.response_synthesizer(**li.qa_templates("chat")),
                               node_postprocessors=[li.CompressedNodePostprocessor(engine)])
    return app, llm


def test_both_apps_give_the_same_keys_and_answers(engine):
    lc_docs = [LCDocument(text, id=name) for name, text in CORPUS]
    li_docs = [LIDocument(text=text, id_=name) for name, text in CORPUS]
    nodes = li.CompressTransform(engine)([TextNode(text=d.text, id_=d.id_) for d in li_docs])
    lc_out = lc.CompressedDocumentTransformer(engine).transform_documents(lc_docs)
    for node, doc in zip(nodes, lc_out):
        for name in ("compressed", "store_key", "store_keys", "compressed_tokens", "source_tokens",
                     "compression_ratio"):
            assert node.metadata[name] == doc.metadata[name], name

    lc_app = _langchain_app(engine, lc_docs)
    li_app, li_llm = _llama_index_app(engine, nodes)
    for question in QUESTIONS:
        lc_msg = lc_app.invoke(question)
        li_resp = li_app.query(question)
        assert lc_msg.response_metadata["resolved_chunks"] == len(CORPUS)
        usage = li_llm.last_usage
        assert usage["resolved_chunks"] == len(CORPUS) and usage["rejected_chunks"] == 0
        assert usage["prompt_tokens"] == lc_msg.usage_metadata["input_tokens"]  # the very same prompt
        assert str(li_resp).strip() == lc_msg.content.strip()
        assert lc_msg.content.strip()


def test_long_documents_split_into_the_same_keys(tiny_engine):
    sentence = "The Groot Amber pear ripens in late October and is pressed into a dry perry. "
    text = sentence * 12 + "Anselm Groot planted the orchard in 1893 beside the old brewery wall."
    assert tiny_engine.count_tokens(text) > 3 * tiny_engine.max_chunk_tokens
    lc_doc = lc.CompressedDocumentTransformer(tiny_engine).transform_documents([LCDocument(text, id="long")])[0]
    [node] = li.CompressTransform(tiny_engine)([TextNode(text=text, id_="long")])
    [post] = li.CompressedNodePostprocessor(tiny_engine).postprocess_nodes(
        [NodeWithScore(node=TextNode(text=text, id_="long"), score=1.0)])
    keys = lc_doc.metadata["store_keys"]
    assert len(keys) >= 3 and keys[0] == lc_doc.metadata["store_key"]
    assert node.metadata["store_keys"] == keys == post.node.metadata["store_keys"]
    assert post.node.text == lc_doc.page_content  # the same markers, back to back
    # pieces end at sentence ends where the limit allows
    texts = [tiny_engine.store.get_text(k) for k in keys]
    assert sum(t.endswith(".") for t in texts) >= len(texts) - 1


def test_the_same_options_and_errors_in_both(tiny_engine):
    text = "A sentence about pears. " * 40
    for make in (lambda **kw: lc.CompressedDocumentTransformer(tiny_engine, **kw),
                 lambda **kw: lc.CompressedDocumentCompressor(tiny_engine, **kw),
                 lambda **kw: li.CompressTransform(tiny_engine, **kw),
                 lambda **kw: li.CompressedNodePostprocessor(tiny_engine, **kw)):
        with pytest.raises(InvalidOptionError) as bad:
            make(on_long="drop")
        assert bad.value.option == "on_long"
        with pytest.raises(UnknownOptionError, match="use 'on_long'") as unknown:
            make(long_text="split")
        assert unknown.value.option == "long_text"
        with pytest.raises(UnknownOptionError, match="did you mean 'batch_size'"):
            make(batchsize=4)
        make(on_long="error", batch_size=2, show_progress=False)
    with pytest.raises(ContextTooLongError) as lc_err:
        lc.CompressedDocumentTransformer(tiny_engine, on_long="error").transform_documents([LCDocument(text, id="d")])
    with pytest.raises(ContextTooLongError) as li_err:
        li.CompressTransform(tiny_engine, on_long="error")([TextNode(text=text, id_="d")])
    assert str(lc_err.value) == str(li_err.value) and lc_err.value.document_id == li_err.value.document_id == "d"

    # engine positionally or by keyword; max_tokens / max_new_tokens under either name; typos refused
    for cls, field in ((lc.CompressedChatModel, "max_tokens"), (lc.CompressedLLM, "max_tokens"),
                       (li.CompressedLLM, "max_new_tokens")):
        for kwargs in ({"max_tokens": 8}, {"max_new_tokens": 8}):
            assert getattr(cls(tiny_engine, **kwargs), field) == 8
            assert getattr(cls(engine=tiny_engine, **kwargs), field) == 8
        with pytest.raises(UnknownOptionError, match="did you mean 'temperature'"):
            cls(tiny_engine, temprature=0.5)
        with pytest.raises(InvalidOptionError):
            cls(tiny_engine, max_tokens=8, max_new_tokens=9)
    assert lc.CompressedChatModel(tiny_engine).max_tokens == li.CompressedLLM(tiny_engine).max_new_tokens


def test_show_progress_draws_a_bar_only_when_asked(tiny_engine, capsys):
    texts = [f"Progress test sentence number {i} about the ferry to Saint Ondine." for i in range(3)]
    lc.CompressedDocumentTransformer(tiny_engine).transform_documents([LCDocument(texts[0])])
    assert "chunk" not in capsys.readouterr().err
    lc.CompressedDocumentTransformer(tiny_engine, show_progress=True).transform_documents([LCDocument(texts[1])])
    assert "chunk" in capsys.readouterr().err
    li.CompressTransform(tiny_engine, show_progress=True)([TextNode(text=texts[2])])
    assert "chunk" in capsys.readouterr().err


def test_engine_by_keyword_everywhere(tiny_engine):
    for cls in (lc.CompressedDocumentTransformer, lc.CompressedDocumentCompressor, li.CompressTransform,
                li.CompressedNodePostprocessor):
        assert cls(engine=tiny_engine).engine is tiny_engine
        assert cls(tiny_engine).engine is tiny_engine
    with pytest.raises(TypeError, match="CompressionEngine"):
        li.CompressedNodePostprocessor("not an engine")


def test_the_core_imports_neither_framework():
    import subprocess
    import sys

    code = ("import sys, compressor_plugin.integrations.core as core; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('langchain_core', 'llama_index')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_call_options_the_same_in_both(tiny_engine):
    """A typo in a call option is refused by both LLMs; one stop string is one stop string."""
    lc_llm, li_llm = lc.CompressedLLM(tiny_engine, max_tokens=2), li.CompressedLLM(tiny_engine, max_new_tokens=2)
    with pytest.raises(UnknownOptionError, match="did you mean 'max_new_tokens'") as a:
        li_llm.complete("Hi", max_new_token=1)
    with pytest.raises(UnknownOptionError, match="did you mean 'max_new_tokens'") as b:
        lc_llm.invoke("Hi", max_new_token=1)
    assert a.value.option == b.value.option == "max_new_token"
    assert li_llm._config({"stop": "Tower"}).stop == ("Tower",)
    assert lc._Settings.build(lc_llm, "Tower", {})["stop"] == ["Tower"]
    assert lc._Settings.build(lc_llm, None, {})["stop"] == []
    with pytest.raises(InvalidOptionError):
        li_llm._config({"stop": ["ok", 3]})
    li_llm.complete("Hi", max_tokens=1, stop="\n")  # the OpenAI / LangChain name and a string stop work


def test_langchain_llm_streaming_flag_sends_tokens_to_callbacks(tiny_engine):
    import asyncio

    from langchain_core.callbacks import BaseCallbackHandler

    class Tokens(BaseCallbackHandler):
        def __init__(self):
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs) -> None:
            self.tokens.append(token)

    for streaming in (False, True):
        seen = Tokens()
        llm = lc.CompressedLLM(tiny_engine, max_tokens=4, streaming=streaming, callbacks=[seen])
        text = llm.invoke("Tell me about pears.")
        result = llm.generate(["Tell me about pears."])
        assert result.llm_output["token_usage"]["completion_tokens"] >= 1
        assert (len(seen.tokens) > 0) == streaming
        if streaming:
            assert "".join(seen.tokens[: len(seen.tokens) // 2]) == text  # invoke, then generate: the same pieces
            seen.tokens.clear()
            assert asyncio.run(llm.ainvoke("Tell me about pears.")) == text and "".join(seen.tokens) == text


def test_compress_transform_refuses_settings_its_engine_does_not_have_and_keeps_its_dtype(tiny_engine):
    import pickle

    with pytest.raises(InvalidOptionError, match="anchors from its engine") as bad:
        li.CompressTransform(tiny_engine, anchors=tiny_engine.anchors + 5)
    assert bad.value.option == "anchors"
    t = li.CompressTransform(tiny_engine, anchors=tiny_engine.anchors)  # the engine's own value is fine
    assert t.dtype == "float32"
    copy = pickle.loads(pickle.dumps(t))  # what IngestionPipeline(num_workers=...) sends to a worker
    assert copy.dtype == "float32" and copy.store_dir == t.store_dir and copy._engine is None


def test_wrong_types_are_the_same_type_error_in_both(tiny_engine):
    with pytest.raises(TypeError, match="document 0 is a NoneType"):
        lc.CompressedDocumentTransformer(tiny_engine).transform_documents([None])
    with pytest.raises(TypeError, match="node 0 is a NoneType"):
        li.CompressTransform(tiny_engine)([None])
    with pytest.raises(TypeError, match="node 0 is a NoneType"):
        li.CompressedNodePostprocessor(tiny_engine).postprocess_nodes([None])
    for bad in (None, 123):
        with pytest.raises(TypeError, match="not a string"):
            li.CompressedLLM(tiny_engine).complete(bad)


def test_token_limits_and_cut_markers_the_same_in_both(tiny_engine):
    from compressor_plugin.errors import BrokenMarkerWarning

    lc_llm, li_llm = lc.CompressedLLM(tiny_engine, max_tokens=2), li.CompressedLLM(tiny_engine, max_new_tokens=2)
    for call in (lambda: lc_llm.invoke("Hi", max_tokens=0), lambda: li_llm.complete("Hi", max_new_tokens=0)):
        with pytest.raises(InvalidOptionError, match="at least 1"):
            call()
    for make in (lambda: lc.CompressedChatModel(tiny_engine, max_tokens=0),
                 lambda: li.CompressedLLM(tiny_engine, max_new_tokens=0)):
        with pytest.raises(Exception):  # pydantic's validation of the field (ge=1) in both
            make()
    (marker,) = tiny_engine.mark(["Pears ripen in late October in the Veltmoor orchard, and they are pressed. " * 3])
    cut = f"Context: {marker[: len(marker) // 2]}\nQuestion: When?\nAnswer:"
    for call in (lambda: lc_llm.invoke(cut), lambda: lc.CompressedChatModel(tiny_engine, max_tokens=2).invoke(cut),
                 lambda: li_llm.complete(cut)):
        with pytest.warns(BrokenMarkerWarning):
            call()
