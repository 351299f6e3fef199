"""Offline caching: compress a corpus once, then answer questions from the cache.

Step 1 builds a store from a folder of documents with ``build_cache`` (the Python form of
``compressor-plugin cache build``): documents are split into token-bounded chunks, every chunk
is compressed once, and a chunk map records which document span each store key stands for.

Step 2 answers a question: a small keyword retriever picks chunks from the chunk map, their
markers (``[[cc:<key>]]``) go into the prompt, and ``CompressionEngine`` puts each chunk's
stored K/V at its marker's place. Nothing is compressed at question time.

Run::

    python examples/offline_cache.py
    python examples/offline_cache.py --input my_docs/ --question "..." --store /tmp/my-store
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("compressor_plugin") is None:  # run from a source checkout without installing
    sys.path.insert(0, str(REPO))

from compressor_plugin.caching import build_cache, read_chunk_map
from compressor_plugin.compressor import Compressor
from compressor_plugin.demo import DEMO_FILE
from compressor_plugin.engine import CompressionEngine
from compressor_plugin.store import ContextStore

def write_demo_corpus(folder: Path) -> None:
    """The bundled demo corpus (twelve SQuAD v1.1 dev paragraphs, CC BY-SA 4.0): one file per article."""
    data = json.loads(DEMO_FILE.read_text(encoding="utf-8"))
    articles: dict[str, list[str]] = {}
    for doc in data["documents"]:
        articles.setdefault(doc["title"], []).append(doc["text"])
    for title, paragraphs in articles.items():
        (folder / f"{title.replace(' ', '_')}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")


_STOP = frozenset("a an and are as at by did do does for from how in is it of on or the to was were what when "
                  "where which who why with".split())


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP]


def load_compressor() -> Compressor:
    """The shipped default compressor (kv-k16) on its base model."""
    return Compressor.from_pretrained("default", device="cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="JSONL file, .txt/.md file or folder (default: a small demo corpus)")
    parser.add_argument("--store", help="store folder (default: a temporary folder)")
    parser.add_argument("--question", default="In what year was Nikola Tesla born?")
    parser.add_argument("--chunk-tokens", type=int, default=128, help="small, so the demo articles split")
    parser.add_argument("--top", type=int, default=2, help="chunks put into the prompt")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="offline-cache-"))
    source = Path(args.input) if args.input else work / "docs"
    if not args.input:
        source.mkdir()
        write_demo_corpus(source)
    store = ContextStore(args.store or work / "store")
    chunk_map = work / "chunks.jsonl"
    compressor = load_compressor()

    # 1. Build the cache (run it again and nothing is recompressed).
    summary = build_cache(source, store, compressor, chunk_tokens=args.chunk_tokens, map_path=chunk_map,
                          progress=False)
    print(summary.format())

    # 2. Retrieve chunks by keyword overlap with the question, using the chunk map.
    rows = read_chunk_map(chunk_map)
    q = Counter(words(args.question))
    scored = []
    for row in rows:
        # a chunk too short to gain from compression was kept as text (its row has "key": null)
        text = row["text"] if row["key"] is None else store.get_text(row["key"]) or ""
        overlap = sum(min(n, Counter(words(text))[w]) for w, n in q.items())
        scored.append((overlap, row))
    top = [row for score, row in sorted(scored, key=lambda sr: -sr[0])[: args.top] if score > 0] or [rows[0]]
    engine = CompressionEngine(compressor, store)
    for row in top:
        shown = "kept as text" if row["key"] is None else engine.marker(row["key"])[:20] + "...]]"
        print(f"retrieved {row['source']} chunk {row['chunk']} (chars {row['start']}-{row['end']}, "
              f"{row['n_tokens']} tokens) -> {shown}")

    # 3. Answer from the cached K/V: the markers (valid in this engine only) stand in for the chunks' text;
    #    a chunk kept as text goes in as it is.
    context = "".join(row["text"] + "\n" if row["key"] is None else engine.marker(row["key"]) for row in top)
    prompt = f"Context: {context}\nQuestion: {args.question}\nAnswer:"
    result = engine.generate(prompt, max_new_tokens=24, stop=["\n"])
    print(f"\nQ: {args.question}\nA: {result.text.strip()}")
    print(f"usage: {result.usage()}  (chunks from the cache: {result.resolved_chunks}, "
          f"text fallbacks: {result.fallback_chunks})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
