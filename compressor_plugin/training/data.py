"""Training data: JSONL corpora and QA files, tokenised once, batched by length."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..prompts import fewshot_examples
from ..text import literal_ids


@dataclass
class RegenSample:
    """A text to compress and regenerate."""

    ids: list[int]


@dataclass
class QASample:
    """A context to compress and a question whose answer the decoder must produce."""

    ids: list[int]
    context: str
    question: str
    answer: str
    teacher: str | None = None  # the frozen model's own answer from the full text (sequence-level distillation)


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL file (blank lines skipped). Raises ValueError naming the bad line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc})") from exc
            except RecursionError:
                raise ValueError(f"{path}:{n}: not valid JSON (nested too deeply)") from None
            if limit is not None and len(rows) >= limit:
                break
    return rows


def _texts(rows: list[dict[str, Any]], path: str | Path) -> list[str]:
    if rows and "text" in rows[0]:
        return [r["text"] for r in rows if r.get("text", "").strip()]
    if rows and "context" in rows[0]:
        seen, out = set(), []
        for r in rows:
            c = r["context"]
            if c.strip() and c not in seen:
                seen.add(c)
                out.append(c)
        return out
    raise ValueError(f"{path}: rows need a 'text' (corpus) or 'context' (QA) field")


def _tokenize(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of corpus and context texts, read literally as at answer time (a ``<|im_end|>`` in a
    document stays the ordinary tokens that spell it: :func:`~compressor_plugin.text.literal_ids`)."""
    out: list[list[int]] = []
    for s in range(0, len(texts), 1024):
        out.extend(literal_ids(tokenizer, list(texts[s:s + 1024])))
    return out


def load_regen(paths: Sequence[str | Path], tokenizer: Any, *, max_tokens: int, min_tokens: int = 8,
               limit: int | None = None) -> list[RegenSample]:
    """Texts from corpus (``text``) or QA (``context``) files, cut to ``max_tokens`` tokens."""
    texts: list[str] = []
    for p in paths:
        texts.extend(_texts(read_jsonl(p, limit), p))
    ids = _tokenize(tokenizer, texts)
    return [RegenSample(i[:max_tokens]) for i in ids if len(i) >= min_tokens]


def load_qa(paths: Sequence[str | Path], tokenizer: Any, *, max_tokens: int, limit: int | None = None) -> list[QASample]:
    """QA rows (context, question, answers[0]); contexts over ``max_tokens`` tokens are skipped.

    A row with ``"teacher_answer": true`` holds the frozen model's own full-text answer; it is
    also the sample's ``teacher`` target, so it is not generated again.

    The contexts of the fixed few-shot examples are excluded, so they never leak into training.
    """
    banned = {e["context"] for e in fewshot_examples()}
    rows = []
    for p in paths:
        for r in read_jsonl(p, limit):
            if r.get("context") and r.get("question") and r.get("answers") and r["context"] not in banned:
                rows.append(r)
    uniq = sorted({r["context"] for r in rows})
    ids = dict(zip(uniq, _tokenize(tokenizer, uniq)))
    out = []
    for r in rows:
        cid = ids[r["context"]]
        if 0 < len(cid) <= max_tokens:
            answer = str(r["answers"][0])
            # the answer is the frozen model's own from the full text (train-questions --kind written)
            teacher = answer if r.get("teacher_answer") is True else None
            out.append(QASample(cid, r["context"], r["question"], answer, teacher))
    return out


def load_mix(paths: Sequence[str | Path], tokenizer: Any, *, max_tokens: int, max_qa_tokens: int,
             limit: int | None = None, cloze_per_text: int = 0, seed: int = 0, verify_share: float = 0.0
             ) -> tuple[list[RegenSample], list[QASample], list[QASample]]:
    """Corpus texts and QA samples from a mix of files, told apart by their rows.

    Corpus files (rows with ``text``) give regeneration/continuation texts, cut to ``max_tokens``;
    QA files (rows with ``context`` and ``question``) give QA samples, and their contexts are corpus
    texts too. With ``cloze_per_text`` > 0, every corpus text of a corpus file also gives up to that
    many cloze questions on its names, numbers and dates (:mod:`.questions`), of which a share
    ``verify_share`` are asked as yes/no checks.

    Returns ``(corpus, qa, cloze)``.
    """
    from .questions import cloze_rows

    texts: list[str] = []
    cloze_source: list[str] = []
    qa_paths: list[str | Path] = []
    for p in paths:
        rows = read_jsonl(p, limit)
        if rows and "question" in rows[0]:
            qa_paths.append(p)
        else:
            cloze_source.extend(_texts(rows, p))
        texts.extend(_texts(rows, p))
    texts = list(dict.fromkeys(texts))
    corpus = [RegenSample(i[:max_tokens]) for i in _tokenize(tokenizer, texts) if len(i) >= 8]
    qa = load_qa(qa_paths, tokenizer, max_tokens=max_qa_tokens, limit=limit) if qa_paths else []
    if cloze_per_text > 0 and cloze_source:
        # questions about the part of each text that fits the encoder (the rest would be unanswerable)
        cut = [tokenizer.decode(i[:max_qa_tokens]) if len(i) > max_qa_tokens else t
               for t, i in zip(cloze_source, _tokenize(tokenizer, cloze_source))]
        rows = cloze_rows(cut, seed=seed, per_text=cloze_per_text, verify_share=verify_share)
        uniq = list(dict.fromkeys(r["context"] for r in rows))
        ids = dict(zip(uniq, _tokenize(tokenizer, uniq)))
        cloze = [QASample(ids[r["context"]], r["context"], r["question"], r["answers"][0])
                 for r in rows if 0 < len(ids[r["context"]]) <= max_qa_tokens]
    else:
        cloze = []
    return corpus, qa, cloze


def length_batches(samples: Sequence[Any], batch_size: int, *, seed: int, epoch: int,
                   rank: int = 0, world: int = 1, pool: int = 32) -> list[list[int]]:
    """Index batches: shuffled, then sorted by length inside pools of ``pool`` batches.

    Deterministic in (seed, epoch); with ``world > 1`` each rank gets every world-th batch.
    """
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(samples)))
    rng.shuffle(order)
    batches = []
    span = batch_size * pool
    for s in range(0, len(order), span):
        block = sorted(order[s:s + span], key=lambda i: len(samples[i].ids))
        batches.extend(block[j:j + batch_size] for j in range(0, len(block), batch_size))
    batches = [b for b in batches if len(b) == batch_size] or batches
    rng.shuffle(batches)
    n = len(batches) - len(batches) % world if world > 1 else len(batches)
    return batches[rank:n:world]


def batch_stream(samples: Sequence[Any], batch_size: int, *, seed: int, start_step: int = 0,
                 rank: int = 0, world: int = 1) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, batch) stream that can restart at a given step."""
    step, epoch = 0, 0
    while True:
        batches = length_batches(samples, batch_size, seed=seed, epoch=epoch, rank=rank, world=world)
        if not batches:
            raise ValueError("no training batches: the data set is empty")
        for b in batches:
            if step >= start_step:
                yield epoch, b
            step += 1
        epoch += 1
