"""How often the answer to a question is among the question anchors the engine would choose for its chunk.

No model runs: for each QA row (``context``, ``question``, ``answers``), the chunk's question anchors
(:func:`compressor_plugin.anchors.question_anchors`, one chunk, the given budget) are decoded with
the default model's tokenizer, and a row counts when one of its gold answers (case-insensitive) is
a substring of them. Rows are the first ``--limit`` of each file after a seeded shuffle.

    python scripts/anchor_recall.py ../shared/data/squad1.1_dev.jsonl invented.jsonl
    python scripts/anchor_recall.py --without stem ...   # ablation: words matched by their first 5 letters
    python scripts/anchor_recall.py --without kind ...   # ablation: no preference for the kind asked for
    python scripts/anchor_recall.py --without stem --without kind ...   # the selection before both
    python scripts/anchor_recall.py --without names ...   # "which port" / "what company" not read as asking for a name
    python scripts/anchor_recall.py --window-share 0 ...   # spans only, no sentence window

A proxy for what question anchors can carry; whether the model then answers from them is what
``compressor-plugin eval qa --question-anchors`` measures.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="QA JSONL files")
    ap.add_argument("--budget", type=int, default=32, help="anchor tokens per chunk (default 32)")
    ap.add_argument("--limit", type=int, default=300, help="rows per file (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--without", choices=("stem", "kind", "names"), action="append", default=[],
                    help="ablation (repeatable): match words by their first 5 letters (stem), drop the "
                         "answer-kind preference (kind); both: the selection before either; names: "
                         "'which' / 'what' + a noun no longer asks for a name")
    ap.add_argument("--window-share", type=float, default=None,
                    help="share of the budget the question's best sentence may take verbatim (default: the engine's)")
    args = ap.parse_args()

    import compressor_plugin.anchors as anchors
    from compressor_plugin.models import ensure_default_model, load_tokenizer

    if "names" in args.without:
        anchors._WANTED = tuple(rule for rule in anchors._WANTED if not "(?:which|what) " in rule[0].pattern)
    if "kind" in args.without:
        anchors._wanted_kinds = lambda question: ()
    if "stem" in args.without:
        anchors._stems = lambda text: {w[:5] for w in re.findall(r"[^\W_]{3,}", text.lower())
                                       if w not in anchors._QUESTION_STOP}
    tok = load_tokenizer(ensure_default_model())
    print(f"| file | rows | answer in {args.budget} question anchors |\n|---|---|---|")
    for f in args.files:
        rows = [json.loads(line) for line in open(f, encoding="utf-8") if line.strip()]
        random.Random(args.seed).shuffle(rows)
        rows = [r for r in rows if r.get("answers")][:args.limit]
        hit = 0
        for r in rows:
            share = anchors.DEFAULT_WINDOW_SHARE if args.window_share is None else args.window_share
            ids = anchors.question_anchors([(r["context"], None)], tok, args.budget, r["question"], window_share=share)[0]
            text = tok.decode(ids).lower()
            hit += any(g.strip().lower() in text for g in r["answers"] if g.strip())
        print(f"| {Path(f).name} | {len(rows)} | {hit / max(1, len(rows)):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
