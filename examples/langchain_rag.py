"""Compressed RAG with LangChain: BM25 retrieval -> compressed documents -> local model.

The chain is an ordinary LCEL RAG chain with two changes: retrieved documents go through
``CompressedDocumentTransformer`` (each becomes a marker naming its compressed K/V in the
store), and the model is ``CompressedChatModel`` (it puts the stored K/V at each marker's
place). For comparison the same model answers from the documents as plain text.

The documents are real SQuAD v1.1 dev contexts (CC BY-SA 4.0): read from the shared data
folder next to the repository when it is there, else from ``tests/fixtures/docs_small.jsonl``.

Run::

    python examples/langchain_rag.py
    python examples/langchain_rag.py --question "What is the capitol of Kenya?" --top-k 1 --store /tmp/chunks
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

# On a CPU shared with other work, OpenMP threads that spin while waiting slow torch down many
# times over; sleeping waiters cost nothing measurable here. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnablePassthrough
from pydantic import PrivateAttr

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("compressor_plugin") is None:  # run from a source checkout without installing
    sys.path.insert(0, str(REPO))

from compressor_plugin.engine import CompressionEngine
from compressor_plugin.integrations.langchain import CompressedChatModel, CompressedDocumentTransformer
from compressor_plugin.prompts import CHAT_INSTRUCTION

SHARED_SQUAD = REPO.parent / "shared" / "data" / "squad1.1_dev.jsonl"
FIXTURE = REPO / "tests" / "fixtures" / "docs_small.jsonl"
N_DOCS = 30  # the first context of each of the first 30 SQuAD dev articles

#: Questions about the document set, with their SQuAD gold answers.
DEFAULT_QUESTIONS: list[tuple[str, list[str]]] = [
    ("What do we call the empire that Genghis Khan founded?", ["the Mongol Empire", "Mongol Empire"]),
    ("The word imperialism has it's origins in which ancient language?", ["Latin"]),
    ("In what country is Normandy located?", ["France"]),
]

_STOPWORDS = frozenset(
    "a an and are as at be by did do does for from has have how in is it its of on or the this to was "
    "were what when where which who whom why with".split())


# ---------------------------------------------------------------------------- documents
def load_documents(n: int = N_DOCS) -> list[Document]:
    """The first context of each of the first ``n`` SQuAD dev articles, as documents."""
    if SHARED_SQUAD.is_file():
        docs: list[Document] = []
        titles: set[str] = set()
        with SHARED_SQUAD.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if row["title"] in titles:
                    continue
                titles.add(row["title"])
                docs.append(Document(page_content=row["context"], id=row["context_id"],
                                     metadata={"title": row["title"], "source": "squad1.1-dev"}))
                if len(docs) == n:
                    break
        return docs
    with FIXTURE.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:n]
    return [Document(page_content=r["text"], id=r["id"], metadata={"title": r["title"], "source": r["source"]})
            for r in rows]


def _terms(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.lower()) if w not in _STOPWORDS]


class BM25Retriever(BaseRetriever):
    """A small BM25 retriever over in-memory documents (``rank_bm25.BM25Okapi``)."""

    documents: list[Document]
    k: int = 2
    _bm25: Any = PrivateAttr(default=None)

    def model_post_init(self, __context: Any) -> None:
        from rank_bm25 import BM25Okapi

        self._bm25 = BM25Okapi([_terms(d.page_content) for d in self.documents])

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        scores = self._bm25.get_scores(_terms(query))
        best = sorted(range(len(scores)), key=lambda i: -scores[i])[: self.k]
        return [self.documents[i] for i in best]


# ---------------------------------------------------------------------------- model
def load_engine(checkpoint: str = "default", store: str | None = None) -> CompressionEngine:
    """The engine for ``checkpoint`` (a shipped name or a folder) over ``store``."""
    return CompressionEngine.from_pretrained(checkpoint, store=store)


def format_docs(docs: Sequence[Document]) -> str:
    return "\n\n".join(d.page_content for d in docs)


PROMPT = ChatPromptTemplate.from_messages(
    [("human", CHAT_INSTRUCTION + "\n\nContext: {context}\n\nQuestion: {question}")])


def build_chains(engine: CompressionEngine, retriever: BaseRetriever,
                 max_new_tokens: int = 24) -> tuple[Runnable, Runnable]:
    """The compressed RAG chain and the same chain with the documents as text."""
    llm = CompressedChatModel(engine, max_tokens=max_new_tokens, stop=["\n"])
    compress = CompressedDocumentTransformer(engine).as_runnable()
    compressed = ({"context": retriever | compress | format_docs, "question": RunnablePassthrough()}
                  | PROMPT | llm | StrOutputParser())
    plain = ({"context": retriever | format_docs, "question": RunnablePassthrough()}
             | PROMPT | llm | StrOutputParser())
    return compressed, plain


class UsageRecorder(BaseCallbackHandler):
    """Keeps the usage and compression counts of the last chat model call."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] = {}
        self.info: dict[str, Any] = {}

    def on_llm_end(self, response: Any, **kwargs: Any) -> None:
        message = response.generations[0][0].message
        self.usage = dict(message.usage_metadata or {})
        self.info = dict(message.response_metadata)


def ask(chain: Runnable, question: str) -> tuple[str, dict[str, Any], dict[str, Any], float]:
    """Answer with a chain; returns the answer, usage, compression counts and seconds taken."""
    rec = UsageRecorder()
    t0 = time.perf_counter()
    answer = chain.invoke(question, config={"callbacks": [rec]})
    return answer.strip(), rec.usage, rec.info, time.perf_counter() - t0


# ---------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--question", action="append", help="a question (repeatable); default: three built-in ones")
    parser.add_argument("--top-k", type=int, default=2, help="documents retrieved per question (default 2)")
    parser.add_argument("--store", default=None, help="store folder (default: the user cache store)")
    parser.add_argument("--checkpoint", default="default", help="compressor checkpoint name or folder")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit (default 24)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")

    t0 = time.perf_counter()
    engine = load_engine(args.checkpoint, args.store)
    docs = load_documents()
    retriever = BM25Retriever(documents=docs, k=args.top_k)
    compressed, plain = build_chains(engine, retriever, args.max_new_tokens)
    print(f"model {engine.compressor.base.name}, compressor k={engine.compressor.k}, {len(docs)} documents, "
          f"store {engine.store.directory} (loaded in {time.perf_counter() - t0:.1f}s)\n")

    golds = dict(DEFAULT_QUESTIONS)
    for question in args.question or [q for q, _ in DEFAULT_QUESTIONS]:
        answer, usage, info, secs = ask(compressed, question)
        p_answer, p_usage, _, p_secs = ask(plain, question)
        print(f"Q: {question}")
        if question in golds:
            print(f"   gold:         {' | '.join(golds[question])}")
        print(f"   compressed:   {answer!r}  ({secs:.1f}s)")
        print(f"                 prompt {usage.get('input_tokens')} positions = {info.get('text_tokens')} text + "
              f"{info.get('compressed_tokens')} compressed tokens standing for {info.get('source_tokens')}; "
              f"saved {info.get('tokens_saved')} tokens; {info.get('fallback_chunks')} fallbacks")
        print(f"   uncompressed: {p_answer!r}  ({p_secs:.1f}s)")
        print(f"                 prompt {p_usage.get('input_tokens')} tokens")
        ratio = p_usage.get("input_tokens", 0) / max(1, usage.get("input_tokens", 0))
        print(f"   prompt {math.floor(ratio * 10) / 10}x shorter with compression\n")
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
