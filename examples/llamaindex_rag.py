"""Compressed RAG with LlamaIndex: BM25 retrieval, compressed chunks, a local model.

    python examples/llamaindex_rag.py
    python examples/llamaindex_rag.py --question "Who won Super Bowl 50?" --store /tmp/chunks

What it does:

1. loads a small document set: one SQuAD v1.1 dev paragraph per Wikipedia article (from
   ``../shared/data`` next to the repository when present, else the bundled test fixture);
2. ingests it with ``IngestionPipeline([SentenceSplitter, CompressTransform])`` into a
   docstore: every chunk is compressed once into the on-disk store (a second run finds them
   all there);
3. retrieves with BM25 (``llama-index-retrievers-bm25``; no embedding model, nothing from a hub);
4. answers with a ``RetrieverQueryEngine`` whose ``CompressedNodePostprocessor`` turns the
   retrieved chunks into markers and whose ``CompressedLLM`` reads their stored K/V;
5. answers again with the same model and the full chunk text (no postprocessor), to compare.

Needs ``pip install compressor-plugin[llama-index] llama-index-retrievers-bm25``.
Runs on CPU in well under a minute for three questions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# On a CPU shared with other work, OpenMP threads that spin while waiting slow torch down many
# times over; sleeping waiters cost nothing measurable here. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout without installing

SHARED_SQUAD = ROOT.parent / "shared" / "data" / "squad1.1_dev.jsonl"
FIXTURE = ROOT / "tests" / "fixtures" / "docs_small.jsonl"

#: Questions asked when none are given (their paragraphs are in both document sources).
DEFAULT_QUESTIONS = [
    ("Which NFL team represented the AFC at Super Bowl 50?", ["Denver Broncos"]),
    ("What do we call the empire that Genghis Khan founded?", ["the Mongol Empire", "Mongol Empire"]),
    ("The word imperialism has it's origins in which ancient language?", ["Latin"]),
]


def load_documents(max_docs: int = 20) -> tuple[list[dict[str, Any]], str]:
    """One paragraph per article: ``[{"id", "title", "text"}]`` and where they came from."""
    if SHARED_SQUAD.is_file():
        docs: dict[str, dict[str, Any]] = {}
        titles: set[str] = set()
        with SHARED_SQUAD.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                cid = row["context_id"]
                if cid in docs:
                    continue
                words = len(row["context"].split())
                if row["title"] in titles or not 60 <= words <= 170 or len(docs) >= max_docs:
                    continue
                titles.add(row["title"])
                docs[cid] = {"id": cid, "title": row["title"].replace("_", " "), "text": row["context"]}
        return list(docs.values()), str(SHARED_SQUAD)
    with FIXTURE.open(encoding="utf-8") as f:  # the same paragraphs, bundled with the tests
        rows = [json.loads(line) for line in f][:max_docs]
    return [{"id": r["id"], "title": r["title"].replace("_", " "), "text": r["text"]} for r in rows], str(FIXTURE)


def load_engine(checkpoint: str, store: str | None) -> tuple[Any, str]:
    """The compression engine for ``checkpoint`` (a shipped name or a folder) and its name."""
    from compressor_plugin.engine import CompressionEngine

    return CompressionEngine.from_pretrained(checkpoint, store=store, device="cpu"), checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--question", action="append", help="a question (repeatable); default: three built-in ones")
    ap.add_argument("--store", default=None, help="store folder (default: the user cache store)")
    ap.add_argument("--checkpoint", default="default", help="compressor checkpoint name or folder (default kv-k16)")
    ap.add_argument("--top-k", type=int, default=3, help="chunks retrieved per question")
    ap.add_argument("--max-docs", type=int, default=20, help="paragraphs to index")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--response-mode", default="compact", help="compact, refine, tree_summarize, simple_summarize")
    ap.add_argument("--no-baseline", action="store_true", help="skip the uncompressed comparison")
    args = ap.parse_args(argv)

    from llama_index.core import Document
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.storage.docstore import SimpleDocumentStore
    from llama_index.retrievers.bm25 import BM25Retriever

    from compressor_plugin.integrations.llama_index import (
        CompressedLLM,
        CompressedNodePostprocessor,
        CompressTransform,
        engine_tokenizer,
        qa_templates,
    )

    t0 = time.perf_counter()
    rows, source = load_documents(args.max_docs)
    engine, ckpt_name = load_engine(args.checkpoint, args.store)
    print(f"model + compressor ({ckpt_name}) loaded in {time.perf_counter() - t0:.1f}s; store: {engine.store.directory}")

    # 1. ingestion: split, compress every chunk into the store, keep the nodes in a docstore
    docs = [Document(text=r["text"], id_=r["id"], metadata={"title": r["title"]},
                     excluded_llm_metadata_keys=["title"]) for r in rows]
    transform = CompressTransform(engine, checkpoint=ckpt_name)
    pipeline = IngestionPipeline(
        transformations=[SentenceSplitter(chunk_size=256, chunk_overlap=16, tokenizer=engine_tokenizer(engine)),
                         transform])
    t1 = time.perf_counter()
    nodes = pipeline.run(documents=docs)
    docstore = SimpleDocumentStore()  # the chunks (with their compression metadata) for the retriever
    docstore.add_documents(nodes)
    s = transform.last_stats
    print(f"ingested {len(docs)} paragraphs from {source} -> {len(nodes)} chunks in {time.perf_counter() - t1:.1f}s "
          f"({s.get('compressed', 0)} compressed now, {s.get('hits', 0)} already in the store)")

    # 2. retrieval (BM25 over the docstore) and the two query engines
    retriever = BM25Retriever.from_defaults(docstore=docstore, similarity_top_k=args.top_k)
    llm = CompressedLLM(engine, max_new_tokens=args.max_new_tokens, stop=["\n"])
    templates = qa_templates("chat")
    compressed_qe = RetrieverQueryEngine(
        retriever=retriever,
        response_synthesizer=llm.response_synthesizer(args.response_mode, **templates),
        node_postprocessors=[CompressedNodePostprocessor(engine)])
    baseline_qe = RetrieverQueryEngine(retriever=retriever,
                                       response_synthesizer=llm.response_synthesizer(args.response_mode, **templates))

    questions = [(q, []) for q in args.question] if args.question else DEFAULT_QUESTIONS
    saved_total = 0
    for question, golds in questions:
        t2 = time.perf_counter()
        response = compressed_qe.query(question)
        usage = llm.last_usage or {}
        dt = time.perf_counter() - t2
        saved_total += int(usage.get("tokens_saved", 0))
        print(f"\nQ: {question}" + (f"   (gold: {golds[0]})" if golds else ""))
        print(f"  compressed answer : {str(response).strip()!r}  [{dt:.1f}s]")
        print(f"  sources           : " + ", ".join(
            f"{n.node.node_id[:8]}({n.node.metadata.get('title', '?')}) score={n.score:.2f}" for n in response.source_nodes))
        print(f"  prompt tokens     : {usage.get('prompt_tokens')} (of which {usage.get('compressed_tokens')} compressed "
              f"for {usage.get('source_tokens')} source tokens; saved {usage.get('tokens_saved')}; "
              f"{usage.get('resolved_chunks')} chunks resolved, {usage.get('fallback_chunks')} fell back to text)")
        if not args.no_baseline:
            t3 = time.perf_counter()
            full = baseline_qe.query(question)
            full_usage = llm.last_usage or {}
            print(f"  uncompressed      : {str(full).strip()!r}  [{time.perf_counter() - t3:.1f}s, "
                  f"{full_usage.get('prompt_tokens')} prompt tokens]")
    print(f"\ntotal prompt tokens saved: {saved_total}; wall time {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
