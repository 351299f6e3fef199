"""A LangChain app and a LlamaIndex app over one corpus: the same store keys, the same answers.

Both integrations are thin faces over compressor_plugin.integrations.core, so the same
documents must give the same pieces, keys, metadata, options and (greedy) answers.
"""

from __future__ import annotations

import re

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


def test_splitting_hostile_documents_stays_linear(tiny_engine, monkeypatch):
    """A document is untrusted: runs of sentence marks and thousands of tiny sentences split fast."""
    from compressor_plugin.integrations.core import _BOUNDARY_RE, split_text
    from compressor_plugin.store import normalize_text

    # a boundary starts only where a run of marks starts: the same boundaries as without that rule
    for text in ("Yes!! No?? Maybe... \"Quoted.\" (Aside.) End.", "a.b. c", "。。 next\n\nparagraph", "?!.'\") x"):
        simple = [m.end() for m in re.finditer(r"""[.!?。！？]+["'”’)\]]*\s+|\n\s*\n""", text)]
        assert [m.end() for m in _BOUNDARY_RE.finditer(text)] == simple
    # 60,000 dots scanned once (the pattern without the rule took about 30 s on a CPU core)
    assert list(_BOUNDARY_RE.finditer("." * 60000)) == []
    pieces = split_text(tiny_engine, "." * 60000, 64)
    assert "".join(pieces) == "." * 60000 and all(tiny_engine.count_tokens(normalize_text(p)) <= 64 for p in pieces)
    # 3,000 two-token sentences: pieces are packed with O(log n) tokenisations each, not one per sentence
    calls = []
    count = tiny_engine.count_tokens
    monkeypatch.setattr(tiny_engine, "count_tokens", lambda t: calls.append(1) or count(t))
    text = "a! " * 3000
    pieces = split_text(tiny_engine, text, 64)
    assert "".join(pieces) == text
    assert all(count(normalize_text(p)) <= 64 for p in pieces) and len(pieces) >= 3000 * 2 // 64
    assert len(calls) < 3000 // 2  # one per sentence before


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


# ---------------------------------------------------------------------------------- one core, one behaviour
def _text_of(item) -> str:
    if isinstance(item, LCDocument):
        return item.page_content
    return (item.node if isinstance(item, NodeWithScore) else item).text


def _meta_of(item) -> dict:
    return item.metadata if isinstance(item, LCDocument) else (item.node if isinstance(item, NodeWithScore)
                                                               else item).metadata


def test_empty_texts_the_same_rule_and_warning_in_both(tiny_engine):
    """Empty and whitespace-only chunks: every class passes them through uncompressed and warns
    once per call, with the same EmptyDocumentWarning and the same words (core.warn_empty_texts)."""
    import asyncio
    import warnings

    from compressor_plugin.errors import EmptyDocumentWarning

    real = "The Groot Amber pear ripens in late October and is pressed into a dry perry by the brewers of Veltmoor."
    given = [("blank", ""), ("real", real), ("spaces", " \n\t ")]

    def docs():
        return [LCDocument(text, id=name) for name, text in given]

    def nodes():
        return [TextNode(text=text, id_=name) for name, text in given]

    def scored():
        return [NodeWithScore(node=n, score=1.0) for n in nodes()]

    calls = {
        "langchain transformer": lambda: lc.CompressedDocumentTransformer(tiny_engine).transform_documents(docs()),
        "langchain transformer, async": lambda: asyncio.run(
            lc.CompressedDocumentTransformer(tiny_engine).atransform_documents(docs())),
        "langchain compressor": lambda: lc.CompressedDocumentCompressor(tiny_engine).compress_documents(docs(), "q"),
        "langchain compressor, async": lambda: asyncio.run(
            lc.CompressedDocumentCompressor(tiny_engine).acompress_documents(docs(), "q")),
        "llama_index transform": lambda: li.CompressTransform(tiny_engine)(nodes()),
        "llama_index transform, async": lambda: asyncio.run(li.CompressTransform(tiny_engine).acall(nodes())),
        "llama_index postprocessor": lambda: li.CompressedNodePostprocessor(tiny_engine).postprocess_nodes(scored()),
        "llama_index postprocessor, async": lambda: asyncio.run(
            li.CompressedNodePostprocessor(tiny_engine).apostprocess_nodes(scored())),
    }
    expected = "2 of 3 documents have no text; they are passed through uncompressed"
    for name, call in calls.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = call()
        assert [str(w.message) for w in caught if issubclass(w.category, EmptyDocumentWarning)] == [expected], name
        (w,) = [w for w in caught if issubclass(w.category, EmptyDocumentWarning)]
        assert (w.message.positions, w.message.document_ids) == ([0, 2], ["blank", "spaces"]), name
        assert [_text_of(o) for o in (out[0], out[2])] == ["", " \n\t "], name  # passed through as they were
        assert "store_key" not in _meta_of(out[0]) and "store_key" not in _meta_of(out[2]), name
        assert "store_key" in _meta_of(out[1]), name  # the document with text is compressed as usual

    # one empty document: the same single-document sentence from both faces
    with pytest.warns(EmptyDocumentWarning) as lc_warning:
        lc.CompressedDocumentTransformer(tiny_engine).transform_documents([LCDocument(" ", id="x")])
    with pytest.warns(EmptyDocumentWarning) as li_warning:
        li.CompressedNodePostprocessor(tiny_engine).postprocess_nodes([NodeWithScore(node=TextNode(text=" ", id_="x"))])
    assert [str(w.message) for w in lc_warning] == [str(w.message) for w in li_warning] == [
        "1 of 1 documents has no text; it is passed through uncompressed"]
    assert lc_warning[0].message.document_ids == li_warning[0].message.document_ids == ["x"]
    # document ids are untrusted: calls with ever new ids give one warning text (Python's warning
    # registry keeps an entry per text, for the life of the process)
    texts = set()
    for i in range(50):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lc.CompressedDocumentTransformer(tiny_engine).transform_documents([LCDocument(" ", id=f"doc-{i}")])
        texts.update(str(w.message) for w in caught)
    assert len(texts) == 1
    # no empty text, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyDocumentWarning)
        lc.CompressedDocumentTransformer(tiny_engine).transform_documents([LCDocument(real)])
        li.CompressTransform(tiny_engine)([TextNode(text=real)])


def test_one_model_name_and_identity_for_one_engine_in_both(tiny_engine):
    from compressor_plugin.integrations import core

    comp = tiny_engine.compressor
    name = core.model_name(tiny_engine)
    assert name == f"{comp.base.name}+{comp.mode}-k{comp.k}-{comp.fingerprint[:8]}"
    chat, llm, li_llm = lc.CompressedChatModel(tiny_engine), lc.CompressedLLM(tiny_engine), li.CompressedLLM(tiny_engine)
    assert chat.model_name == llm.model_name == li_llm.model_name == li_llm.metadata.model_name == name
    identity = core.model_identity(tiny_engine)
    assert identity["model_name"] == name and identity["compressor"] == comp.fingerprint
    assert identity["base_model"] == comp.base.name and identity["k"] == comp.k and identity["anchors"] == 0
    for model in (chat, llm):
        params = model._identifying_params
        assert {key: params[key] for key in identity} == identity
        assert model._get_ls_params()["ls_model_name"] == name
    assert chat.invoke("Hi", max_tokens=1).response_metadata["model_name"] == name
    assert llm.generate(["Hi"], max_tokens=1).llm_output["model_name"] == name
    # a name given by the user is what both report
    assert lc.CompressedChatModel(tiny_engine, model_name="mine").model_name == "mine"
    assert li.CompressedLLM(tiny_engine, model_name="mine").metadata.model_name == "mine"


_FACES = (lc.CompressedDocumentTransformer, lc.CompressedDocumentCompressor, lc.CompressedChatModel, lc.CompressedLLM,
          li.CompressTransform, li.CompressedNodePostprocessor, li.CompressedLLM)


def test_every_class_has_the_same_from_pretrained():
    import inspect

    from compressor_plugin.integrations.core import load_engine

    want = [(p.name, p.default, p.kind) for p in inspect.signature(load_engine).parameters.values()]
    for cls in _FACES:
        params = list(inspect.signature(cls.from_pretrained).parameters.values())
        assert params[-1].kind is inspect.Parameter.VAR_KEYWORD, cls  # the class's own options
        assert [(p.name, p.default, p.kind) for p in params[:-1]] == want, cls
        assert cls.from_pretrained.__doc__ and "load_engine" in cls.from_pretrained.__doc__, cls


def test_every_class_builds_from_the_shipped_default_checkpoint(shipped_compressor, tmp_path, monkeypatch):
    """``cls.from_pretrained("default", ...)`` for every class, through CompressionEngine.from_pretrained;
    the checkpoint load itself gives the session's shipped compressor (the model loads once per run)."""
    from pathlib import Path

    loads: list[tuple[str, dict]] = []

    def session_compressor(path="default", **kwargs):
        loads.append((str(path), kwargs))
        return shipped_compressor

    monkeypatch.setattr(Compressor, "from_pretrained", staticmethod(session_compressor))
    options = {lc.CompressedDocumentTransformer: {"batch_size": 4}, lc.CompressedDocumentCompressor: {"batch_size": 4},
               lc.CompressedChatModel: {"max_tokens": 4}, lc.CompressedLLM: {"max_tokens": 4},
               li.CompressTransform: {"batch_size": 4}, li.CompressedNodePostprocessor: {"batch_size": 4},
               li.CompressedLLM: {"max_new_tokens": 4}}
    assert set(options) == set(_FACES)
    secret = b"p" * 32
    store = tmp_path / "store"
    engines = []
    for cls, opts in options.items():
        built = cls.from_pretrained("default", store=store, device="cpu", anchors=0, question_anchors=False,
                                    marker_secret=secret, window_share=0.25, **opts)
        assert type(built) is cls
        engine = built.engine
        assert engine.compressor is shipped_compressor and engine.checkpoint == "default"
        assert engine.anchors == 0 and engine.question_anchors is False and engine.window_share == 0.25
        assert Path(engine.store.directory).resolve() == store.resolve()
        for key, value in opts.items():
            option = built.options if isinstance(built, lc.CompressedDocumentTransformer) else built
            assert getattr(option, key) == value, (cls, key)
        with pytest.raises(UnknownOptionError):
            cls.from_pretrained("default", store=store, device="cpu", anchors=0, bogus_option=1)
        engines.append(engine)
    assert [path for path, _ in loads] == ["default"] * len(options)  # the bad option was refused before a load
    assert all(kwargs["device"] == "cpu" for _, kwargs in loads)
    # one secret and one store: a marker issued through one class is read through every other
    (marker,) = engines[0].mark([CORPUS[0][1]])
    assert all(e.own_marker_keys(marker) is not None for e in engines)
    assert li.CompressTransform.from_pretrained("default", store=store, device="cpu", anchors=0).checkpoint == "default"
    for e in engines:
        e.store.close()


def _fixed_retriever(docs: list[LCDocument]):
    """A LangChain retriever that returns copies of ``docs`` for any query."""
    from langchain_core.retrievers import BaseRetriever

    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager=None):
            return [d.model_copy() for d in docs]

    return Fixed()


def test_sources_show_chunk_text_not_markers_in_both(tiny_engine):
    """Sources returned next to an answer show the chunk text; the prompt still gets the markers."""
    import asyncio

    from compressor_plugin.markers import MARKER_START

    question = "Who planted the orchard?"
    texts = [text for _, text in CORPUS]
    # LlamaIndex: the query engine's response.source_nodes, sync, async and streamed
    nodes = [TextNode(text=text, id_=name) for name, text in CORPUS]
    llm = li.CompressedLLM(tiny_engine, max_new_tokens=2)

    def app(streaming: bool) -> RetrieverQueryEngine:
        synth = llm.response_synthesizer(streaming=streaming, **li.qa_templates("chat"))
        return RetrieverQueryEngine(retriever=_AllNodes(nodes), response_synthesizer=synth,
                                    node_postprocessors=[li.CompressedNodePostprocessor(tiny_engine)])

    def check(response) -> None:
        assert [s.node.text for s in response.source_nodes] == texts
        assert [s.node.node_id for s in response.source_nodes] == [name for name, _ in CORPUS]
        assert all(s.node.metadata["compressed"] for s in response.source_nodes)  # still the compressed nodes
        assert MARKER_START not in response.get_formatted_sources(length=10_000)

    plain = app(streaming=False)
    for response in (plain.query(question), asyncio.run(plain.aquery(question))):
        check(response)
        assert llm.last_usage["resolved_chunks"] == len(nodes)  # the prompt was built from the markers
    streamed = app(streaming=True).query(question)
    check(streamed)
    "".join(streamed.response_gen)
    assert llm.last_usage["resolved_chunks"] == len(nodes)

    # LangChain: a retrieval chain over a ContextualCompressionRetriever returns the marked
    # documents as its "context"; source_documents gives them back with their text
    from langchain_classic.chains import create_retrieval_chain
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain
    from langchain_classic.retrievers import ContextualCompressionRetriever

    retriever = ContextualCompressionRetriever(base_compressor=lc.CompressedDocumentCompressor(tiny_engine),
                                               base_retriever=_fixed_retriever([LCDocument(t, id=n) for n, t in CORPUS]))
    prompt = ChatPromptTemplate.from_messages([("human", "Context: {context}\n\nQuestion: {input}")])
    model = lc.CompressedChatModel(tiny_engine, max_tokens=2)
    result = create_retrieval_chain(retriever, create_stuff_documents_chain(model, prompt)).invoke({"input": question})
    assert all(tiny_engine.own_marker_keys(d.page_content) for d in result["context"])  # what the prompt needs
    shown = lc.source_documents(tiny_engine, result["context"])
    assert [d.page_content for d in shown] == texts
    assert [d.id for d in shown] == [name for name, _ in CORPUS]
    assert [d.metadata for d in shown] == [d.metadata for d in result["context"]]
    # both faces show the same text for the same chunks
    li_shown = li.source_nodes(tiny_engine, li.CompressedNodePostprocessor(tiny_engine).postprocess_nodes(
        [NodeWithScore(node=n.model_copy(), score=1.0) for n in nodes]))
    assert [n.node.text for n in li_shown] == [d.page_content for d in shown]


def test_source_text_only_for_this_engines_markers(tiny_engine):
    """A document or node that claims an original text but does not hold this engine's markers is shown as it is."""
    (marker,) = tiny_engine.mark([CORPUS[0][1]])
    assert tiny_engine.own_marker_keys(marker) is not None
    forged = marker[:-10] + ("01234567" if marker[-10:-2] != "01234567" else "76543210") + "]]"  # another tag
    claims = {"original_text": "text the document's author chose", "compressed": True}
    docs = [LCDocument(forged, metadata=claims), LCDocument("plain text", metadata=claims),
            LCDocument(marker, metadata={})]  # this engine's marker, but no original text to show
    assert all(a is b for a, b in zip(lc.source_documents(tiny_engine, docs), docs))
    nodes = [NodeWithScore(node=TextNode(text=d.page_content, metadata=dict(d.metadata)), score=0.5) for d in docs]
    assert all(a is b for a, b in zip(li.source_nodes(tiny_engine, nodes), nodes))
    with pytest.raises(TypeError, match="document 0 is a str"):
        lc.source_documents(tiny_engine, ["not a document"])
    with pytest.raises(TypeError, match="node 0 is a str"):
        li.source_nodes(tiny_engine, ["not a node"])


# ---------------------------------------------------------------------------------- skipped chunks, options, messages
def test_chunks_left_as_text_get_the_same_metadata_in_both(tiny_engine):
    """Empty and short chunks stay text; every document class records the same keys and values
    for them (core.compression_metadata / core.skipped_metadata), sync and async."""
    import asyncio
    import warnings

    from llama_index.core.schema import MetadataMode

    from compressor_plugin.integrations import core

    long_text = "The Groot Amber pear ripens in late October and is pressed into a dry perry by the brewers of Veltmoor."
    short = "Paris, 1889."
    assert tiny_engine.count_tokens(short) <= tiny_engine.keep_text_tokens < tiny_engine.count_tokens(long_text)
    # "truncated" and "store_key" are left from an earlier run: stale, so removed from a chunk left as text
    given = [("blank", " "), ("short", short), ("long", long_text)]
    stale = {"title": "t", "store_key": "0" * 64, "truncated": True}

    def docs():
        return [LCDocument(text, id=name, metadata=dict(stale)) for name, text in given]

    def nodes():
        return [TextNode(text=text, id_=name, metadata=dict(stale)) for name, text in given]

    def scored():
        return [NodeWithScore(node=n, score=1.0) for n in nodes()]

    def in_place(call):
        ns = nodes()
        call(ns)
        return ns

    faces = {
        "langchain transformer": lambda: lc.CompressedDocumentTransformer(tiny_engine).transform_documents(docs()),
        "langchain transformer, async": lambda: asyncio.run(
            lc.CompressedDocumentTransformer(tiny_engine).atransform_documents(docs())),
        "langchain compressor": lambda: lc.CompressedDocumentCompressor(tiny_engine).compress_documents(docs(), "q"),
        "langchain compressor, async": lambda: asyncio.run(
            lc.CompressedDocumentCompressor(tiny_engine).acompress_documents(docs(), "q")),
        "llama_index postprocessor": lambda: li.CompressedNodePostprocessor(tiny_engine).postprocess_nodes(scored()),
        "llama_index postprocessor, async": lambda: asyncio.run(
            li.CompressedNodePostprocessor(tiny_engine).apostprocess_nodes(scored())),
        "llama_index transform": lambda: in_place(li.CompressTransform(tiny_engine)),
        "llama_index transform, async": lambda: in_place(lambda ns: asyncio.run(li.CompressTransform(tiny_engine).acall(ns))),
    }
    want = {"blank": {"title": "t", "compressed": False, "skip_reason": "empty"},
            "short": {"title": "t", "compressed": False, "skip_reason": "short"}}
    assert core.skipped_metadata(" ") == {"compressed": False, "skip_reason": "empty"}
    assert core.skipped_metadata(short) == {"compressed": False, "skip_reason": "short"}
    compressed_meta = []
    for face, call in faces.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = call()
        for (name, text), item in zip(given, out):
            meta = dict(_meta_of(item))
            if name in want:
                assert _text_of(item) == text, (face, name)  # left as text
                assert meta == want[name], (face, name, meta)
            else:
                assert meta["compressed"] is True and "skip_reason" not in meta and "truncated" not in meta, face
                meta.pop(li.ORIGINAL_TEXT_KEY, None)  # only where the text became markers
                compressed_meta.append(meta)
        if face.startswith("llama_index"):  # the keys stay out of what embeddings and the LLM read
            node = out[1].node if isinstance(out[1], NodeWithScore) else out[1]
            for mode in (MetadataMode.LLM, MetadataMode.EMBED):
                view = node.get_content(metadata_mode=mode)
                assert "skip_reason" not in view and "compressed" not in view and short in view, (face, mode)
    assert all(m == compressed_meta[0] for m in compressed_meta)  # the compressed chunk: the same metadata too


def test_from_pretrained_refuses_bad_options_before_loading_a_model(monkeypatch):
    """A misspelt or unknown option of any class's from_pretrained fails at once, naming the
    option and the closest valid one; nothing is loaded. Valid options reach the loader."""
    from compressor_plugin.integrations import core

    loads = []

    def no_load(*args, **kwargs):
        loads.append(args)
        raise RuntimeError("the loader was called")

    monkeypatch.setattr(core, "load_engine", no_load)
    monkeypatch.setattr(CompressionEngine, "from_pretrained", staticmethod(no_load))
    monkeypatch.setattr(Compressor, "from_pretrained", staticmethod(no_load))
    typos = {lc.CompressedDocumentTransformer: ("batchsize", "batch_size"),
             lc.CompressedDocumentCompressor: ("show_progres", "show_progress"),
             lc.CompressedChatModel: ("temprature", "temperature"), lc.CompressedLLM: ("chat_templat", "chat_template"),
             li.CompressTransform: ("on_lon", "on_long"), li.CompressedNodePostprocessor: ("batch_sise", "batch_size"),
             li.CompressedLLM: ("max_new_token", "max_new_tokens")}
    assert set(typos) == set(_FACES)
    for cls, (typo, right) in typos.items():
        with pytest.raises(UnknownOptionError, match=rf"{cls.__name__}\.from_pretrained has no option '{typo}'; "
                                                     rf"did you mean '{right}'\?") as err:
            cls.from_pretrained("default", **{typo: 1})
        assert err.value.option == typo
        with pytest.raises(UnknownOptionError, match="did you mean 'device'"):  # a loader argument, misspelt
            cls.from_pretrained("default", devcie="cpu")
        with pytest.raises(UnknownOptionError, match="loads its own engine") as err:
            cls.from_pretrained("default", engine=object())
        assert err.value.option == "engine"
        with pytest.raises(RuntimeError, match="the loader was called"):  # a valid option goes through
            cls.from_pretrained("default", **{right: _valid_value(right)})
    for cls in (lc.CompressedDocumentTransformer, lc.CompressedDocumentCompressor, li.CompressTransform,
                li.CompressedNodePostprocessor):
        with pytest.raises(InvalidOptionError, match="on_long must be one of") as err:
            cls.from_pretrained("default", on_long="drop")
        assert err.value.option == "on_long"
        with pytest.raises(UnknownOptionError, match="use 'on_long'"):
            cls.from_pretrained("default", long_text="split")
    for cls in (lc.CompressedChatModel, lc.CompressedLLM, li.CompressedLLM):
        with pytest.raises(InvalidOptionError, match="give one"):
            cls.from_pretrained("default", max_tokens=8, max_new_tokens=9)
        # the fields' bounds too, under either name, before the model loads
        for bad in ({"max_tokens": 0}, {"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": 1.5},
                    {"temperature": "hot"}):
            with pytest.raises(InvalidOptionError, match=r"from_pretrained: .* is refused") as err:
                cls.from_pretrained("default", **bad)
            given = next(iter(bad))  # the token limit is reported under the class's own name for it
            assert err.value.option in ({"max_tokens", "max_new_tokens"} if "tokens" in given else {given})
    assert len(loads) == len(_FACES)  # only the valid calls reached the loader


def _valid_value(option: str):
    return {"batch_size": 4, "show_progress": False, "temperature": 0.0, "chat_template": True, "on_long": "split",
            "max_new_tokens": 4}[option]


def test_message_errors_the_same_in_both(tiny_engine):
    """No messages, a non-text content block and another model's name: the same error type and
    words from LangChain's chat model and LlamaIndex's CompressedLLM."""
    from langchain_core.messages import HumanMessage
    from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock, ThinkingBlock

    from compressor_plugin.errors import PromptError

    lc_chat, li_llm = lc.CompressedChatModel(tiny_engine, max_tokens=1), li.CompressedLLM(tiny_engine, max_new_tokens=1)
    with pytest.raises(PromptError) as a:
        lc_chat.invoke([])
    with pytest.raises(PromptError) as b:
        li_llm.chat([])
    assert str(a.value) == str(b.value) == "no messages to answer"

    image = "http://example.com/pear.png"
    with pytest.raises(PromptError, match="holds a 'image_url' content block; only text content is supported"):
        lc_chat.invoke([HumanMessage(content=[{"type": "text", "text": "Hi"},
                                              {"type": "image_url", "image_url": {"url": image}}])])
    with pytest.raises(PromptError, match="holds a 'image' content block; only text content is supported"):
        li_llm.chat([ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text="Hi"), ImageBlock(url=image)])])
    # thinking blocks are skipped by both; text blocks are read
    li_llm.chat([ChatMessage(role=MessageRole.USER, blocks=[ThinkingBlock(content="hmm"), TextBlock(text="Hi")])])
    lc_chat.invoke([HumanMessage(content=[{"type": "reasoning", "reasoning": "hmm"}, {"type": "text", "text": "Hi"}])])

    with pytest.raises(InvalidOptionError, match="cannot switch to model 'other'") as a:
        lc_chat.invoke("Hi", model="other")
    with pytest.raises(InvalidOptionError, match="cannot switch to model 'other'") as b:
        li_llm.complete("Hi", model="other")
    assert a.value.option == b.value.option == "model"
    li_llm.complete("Hi", model=li_llm.model_name)  # its own name is fine, as in LangChain
    lc_chat.invoke("Hi", model=lc_chat.model_name)


def test_empty_text_warning_is_not_repeated_in_the_log(tiny_engine, caplog):
    """One EmptyDocumentWarning per call, and no INFO log record on top of it (library code stays quiet)."""
    import logging

    from compressor_plugin.errors import EmptyDocumentWarning

    with caplog.at_level(logging.INFO, logger="compressor_plugin"):
        with pytest.warns(EmptyDocumentWarning):
            lc.CompressedDocumentTransformer(tiny_engine).transform_documents([LCDocument(" ")])
        with pytest.warns(EmptyDocumentWarning):
            li.CompressedNodePostprocessor(tiny_engine).postprocess_nodes([NodeWithScore(node=TextNode(text=" "))])
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], [r.getMessage() for r in caplog.records]
