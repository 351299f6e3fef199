"""Answer-aware question writing, probed: does telling the model the answer make its questions grounded?

For the first 16 arXiv validation abstracts (cut to 192 tokens), up to 4 names, numbers and dates
of each (the detail spans of training/questions.py) are given as the answer, in a 3-shot layout
of ``Context / Answer / Question`` built from the fixed few-shot examples; the model writes the
question greedily, then answers it from the full text as ``train-questions`` does. Prints how many
questions parse, how many of the model's answers are words of the text, and how many equal the
span it was asked about. CPU, about 5 minutes:

    python scripts/probe_answer_aware_questions.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import json
import random
import time

from compressor_plugin.generation import Generator, TokenIds
from compressor_plugin.models import load_base_model
from compressor_plugin.prompts import fewshot_examples
from compressor_plugin.text import literal_ids
from compressor_plugin.training.questions import _sentences, detail_spans, full_text_answers, parse_question

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arxiv_abstracts_val.jsonl"


def main() -> None:
    base = load_base_model(device="cpu")
    tok = base.tokenizer
    gen = Generator(base)

    def literal(text: str) -> TokenIds:
        return TokenIds(literal_ids(tok, text))

    prefix = "".join(f"Context: {e['context']}\nAnswer: {e['answer']}\nQuestion: {e['question']}\n\n"
                     for e in fewshot_examples())
    rows = [json.loads(line) for line in open(DATA, encoding="utf-8")][:16]
    texts = [tok.decode(literal_ids(tok, r["text"])[:192]) for r in rows]
    rng = random.Random(0)
    asks = []
    for t in texts:
        spans = list(dict.fromkeys(sent[s:e].strip() for _, sent in _sentences(t) for s, e in detail_spans(sent)))
        rng.shuffle(spans)
        asks.extend((t, a) for a in spans[:4])
    print(len(asks), "asks")
    t0 = time.time()
    prompts = [[literal(prefix + "Context: "), literal(t), literal(f"\nAnswer: {a}\nQuestion:")] for t, a in asks]
    replies = gen.generate_batch(prompts, max_new_tokens=40, temperature=0.0, stop=["\n"])
    parsed = [(parse_question(r.text), t, a) for r, (t, a) in zip(replies, asks)]
    ok = [(q, t, a) for q, t, a in parsed if q]
    answers = full_text_answers(base, [q for q, _, _ in ok], [t for _, t, _ in ok], batch_size=16)
    grounded = [(q, a, x) for (q, t, a), x in zip(ok, answers) if x.strip() and x.lower() in t.lower()]
    same = [g for g in grounded if g[1].lower() in g[2].lower()]
    print("parsed", len(ok), "grounded", len(grounded), "answer == span asked about", len(same),
          round(time.time() - t0, 1), "s")
    for q, a, x in grounded[:10]:
        print(repr(q), "| span", repr(a), "| answer", repr(x))


if __name__ == "__main__":
    main()
