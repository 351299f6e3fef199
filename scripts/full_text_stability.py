"""How often the model agrees with its own full-text answer when the prompt changes in ways that should not matter.

``eval qa`` scores a compressed chunk by ``agreement``: the F1 of its answer against the same
model's answer from the full text in the 3-shot layout. This script puts the full text itself
through that measure: the same questions and paragraphs, the same 3-shot layout, with the
three solved examples of the prefix in another order (the cyclic shifts 1-2-0 and 2-0-1). The
answers that change show how much of the disagreement a compressed chunk meets is the reader's
own instability; an agreement target above this level asks the compressed chunk to be steadier
than the text.

    python scripts/full_text_stability.py --data ../shared/data/squad1.1_dev.jsonl --limit 300 \\
        --device cuda --batch-size 64 --out stability-squad.json

Prints one table row per prompt (F1, EM, agreement F1 / EM with the reference order, kept EM:
the share of the questions the reference answers right that stay right) and writes JSON with
every answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ORDERS = ((0, 1, 2), (1, 2, 0), (2, 0, 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="QA JSONL (context, question, answers)")
    ap.add_argument("--limit", type=int, default=300, help="questions (the seeded sample eval qa takes; default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunks", type=int, default=1, help="paragraphs per question (gold among seeded distractors)")
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()

    from compressor_plugin.evaluation.data import is_label_task, load_qa
    from compressor_plugin.evaluation.qa import agreement, answer_all, score_rows, summarize
    from compressor_plugin.generation import Generator
    from compressor_plugin.models import load_base_model
    from compressor_plugin.prompts import QAPrompt, fewshot_examples, qa_prompt

    examples = load_qa(args.data, limit=args.limit, seed=args.seed, chunks=args.chunks)
    base = load_base_model(device=args.device)
    gen, tok = Generator(base), base.tokenizer
    shots = fewshot_examples()
    label_task = is_label_task(examples)
    stop = qa_prompt("fewshot", "q", tok).stop
    results: dict[str, dict] = {}
    reference = None
    for order in ORDERS:
        prefix = "".join(f"Context: {shots[i]['context']}\nQuestion: {shots[i]['question']}\nAnswer: {shots[i]['answer']}\n\n"
                         for i in order)
        name = "fewshot-" + "".join(map(str, order))
        t0 = time.perf_counter()
        prompts = []
        for ex in examples:
            plain = qa_prompt("fewshot", ex.question, tok)
            p = QAPrompt(prefix + "Context: ", plain.after, plain.target_prefix, plain.target_suffix, plain.stop)
            if order == ORDERS[0]:  # the reference order is exactly eval qa's `full` prompt
                assert p.segments(list(ex.contexts)) == plain.segments(list(ex.contexts))
            prompts.append(p.segments(list(ex.contexts)))
        res = answer_all(gen, prompts, stop=stop, batch_size=args.batch_size, progress=False)
        rows = score_rows(examples, res, source_tokens=[0] * len(examples), context_tokens=[0] * len(examples),
                          label_task=label_task)
        summary = summarize(rows, time.perf_counter() - t0)
        summary.pop("_rows")
        reference = rows if reference is None else reference
        summary.update(agreement(rows, reference))
        summary["answers"] = [{"id": r["id"], "prediction": r["prediction"], "em": r["em"]} for r in rows]
        results[name] = summary
    print("| prompt | F1 | EM | agreement F1 | agreement EM | kept EM |")
    print("|---|---|---|---|---|---|")
    for name, s in results.items():
        print(f"| {name} | {s['f1']:.3f} | {s['em']:.3f} | {s['agreement_f1']:.3f} | {s['agreement_em']:.3f} | "
              f"{s.get('kept_em', float('nan')):.3f} |")
    Path(args.out).write_text(json.dumps({"data": args.data, "n": len(examples), "seed": args.seed, "chunks": args.chunks,
                                          "systems": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
