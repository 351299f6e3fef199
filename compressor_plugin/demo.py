"""The demo: a small RAG run answered from compressed, cached chunks and from full text.

Twelve SQuAD v1.1 dev paragraphs (six Wikipedia articles, CC BY-SA 4.0) ship with the
package. The demo compresses them into the store (a second run finds them all there), then
for each question retrieves the top paragraphs with a small BM25 and answers twice with the
same frozen model: from the paragraphs' compressed K/V, and from their full text in the
strongest text prompt (few-shot). It prints both answers, prompt tokens and timings.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

DEMO_FILE = Path(__file__).parent / "data" / "demo_squad.json"
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the of in on at to for is was were what who when where which how did do does and or by "
                  "with from as its it that this be are".split())


def _words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


class BM25:
    """A small Okapi BM25 ranker over a fixed list of texts (k1=1.5, b=0.75)."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.docs = [Counter(_words(t)) for t in texts]
        self.lens = [sum(d.values()) for d in self.docs]
        self.avg = sum(self.lens) / max(len(self.lens), 1)
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}
        self.k1, self.b = k1, b

    def top(self, query: str, n: int) -> list[int]:
        """Indices of the ``n`` best texts for the query, best first."""
        q = _words(query)
        scores = []
        for i, (d, ln) in enumerate(zip(self.docs, self.lens)):
            s = 0.0
            for w in q:
                f = d.get(w, 0)
                if f:
                    s += self.idf[w] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * ln / self.avg))
            scores.append((s, -i))
        return [-i for _, i in sorted(scores, reverse=True)[:n]]


@dataclass
class DemoRow:
    question: str
    gold: list[str]
    retrieved: list[str]
    compressed_answer: str
    compressed_prompt_tokens: int
    compressed_seconds: float
    full_answer: str
    full_prompt_tokens: int
    full_seconds: float


def load_demo() -> dict[str, Any]:
    return json.loads(DEMO_FILE.read_text())


def run_demo(engine: Any, *, questions: int = 4, top_k: int = 2, full_layout: str = "fewshot",
             compressed_layout: str = "plain", max_new_tokens: int = 16) -> dict[str, Any]:
    """Compress the bundled paragraphs through the store, then answer questions both ways."""
    from .evaluation.metrics import first_line_answer, squad_scores
    from .prompts import qa_prompt

    data = load_demo()
    docs = data["documents"]
    t0 = time.perf_counter()
    results = engine.compress([d["text"] for d in docs])
    compress_s = time.perf_counter() - t0
    hits = sum(r.hit for r in results)
    bm25 = BM25([d["title"] + " " + d["text"] for d in docs])
    rows: list[DemoRow] = []
    gen = engine.generator
    for q in data["questions"][:questions]:
        idx = bm25.top(q["question"], top_k)
        texts = [docs[i]["text"] for i in idx]
        pc = qa_prompt(compressed_layout, q["question"], engine.tokenizer)
        # the user's path: a prompt holding the chunks' markers, resolved by the engine (store
        # lookups, and anchors chosen for this question from each chunk's stored text)
        marked = pc.before + "".join(engine.marker(results[i].key) for i in idx) + pc.after
        t1 = time.perf_counter()
        rc = engine.generate(marked, max_new_tokens=max_new_tokens, stop=list(pc.stop), chat=False)
        rc_s = time.perf_counter() - t1
        pf = qa_prompt(full_layout, q["question"], engine.tokenizer)
        rf = gen.generate(pf.segments(texts), max_new_tokens=max_new_tokens, stop=list(pf.stop))
        rows.append(DemoRow(q["question"], q["answers"], [docs[i]["id"] for i in idx],
                            first_line_answer(rc.text), rc.generation.prompt_tokens, rc_s,
                            first_line_answer(rf.text), rf.prompt_tokens, rf.total_s))
    score = lambda attr: sum(squad_scores(getattr(r, attr), r.gold)["f1"] for r in rows) / max(len(rows), 1)  # noqa: E731
    return {
        "documents": len(docs), "store_hits": hits, "compressed_now": len(docs) - hits, "compress_seconds": compress_s,
        "k": engine.compressor.k, "mode": engine.compressor.mode,
        "source_tokens": sum(r.context.source_tokens for r in results),
        "anchors": engine.anchors, "compressed_positions": sum(r.context.positions for r in results),
        "rows": [r.__dict__ for r in rows],
        "f1_compressed": score("compressed_answer"), "f1_full": score("full_answer"),
        "layouts": {"compressed": compressed_layout, "full": full_layout},
    }


def format_report(rep: dict[str, Any], checkpoint: str, store_dir: str) -> str:
    """Human-readable demo output."""
    lines = [
        f"Compressor: {checkpoint} ({rep['mode']}, k={rep['k']}, up to {rep['anchors']} anchor tokens per chunk); "
        f"store: {store_dir}",
        f"Documents: {rep['documents']} paragraphs, {rep['source_tokens']} tokens -> "
        f"{rep['compressed_positions']} prompt positions ({rep['documents'] * rep['k']} compressed tokens + "
        f"{rep['compressed_positions'] - rep['documents'] * rep['k']} anchor tokens); {rep['compressed_now']} compressed now, "
        f"{rep['store_hits']} already in the store ({rep['compress_seconds']:.2f} s)",
        "",
    ]
    saved = 0
    for i, r in enumerate(rep["rows"], 1):
        lines += [
            f"Q{i}: {r['question']}   (gold: {r['gold'][0]}; retrieved: {', '.join(r['retrieved'])})",
            f"  compressed : {r['compressed_answer']!r:40} prompt {r['compressed_prompt_tokens']:4d} tokens, {r['compressed_seconds']:.2f} s",
            f"  full text  : {r['full_answer']!r:40} prompt {r['full_prompt_tokens']:4d} tokens, {r['full_seconds']:.2f} s",
        ]
        saved += r["full_prompt_tokens"] - r["compressed_prompt_tokens"]
    n = max(len(rep["rows"]), 1)
    lines += ["", f"Mean prompt tokens: compressed {sum(r['compressed_prompt_tokens'] for r in rep['rows']) / n:.0f}, "
                  f"full text {sum(r['full_prompt_tokens'] for r in rep['rows']) / n:.0f} "
                  f"({saved} tokens saved over {len(rep['rows'])} questions)",
              f"SQuAD F1 on these questions: compressed {rep['f1_compressed']:.2f}, full text {rep['f1_full']:.2f} "
              "(a handful of questions; docs/benchmarks.md has the measured averages)"]
    return "\n".join(lines)
