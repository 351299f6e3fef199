"""Training questions from any text corpus: detail (cloze) questions on names, numbers and dates,
and questions the frozen model writes itself, answered by itself from the full text.

QA data is the scarce resource (SQuAD's training subset has about 9k questions), and what a
compressed chunk most often loses is the exact detail: a name, a number, a year. This module
writes questions whose answer is such a span of the text, for any corpus row:

    sentence:  "The survey covered 1,284 galaxies observed by the Hubble Space Telescope."
    question:  "Fill in the blank: The survey covered ____ galaxies observed by the Hubble Space Telescope."
    answer:    "1,284"

Spans are found with plain patterns (no model, no download): numbers with their unit or
percent sign, years and dates, and runs of capitalised words that do not start a sentence.
The decoder is trained to answer them from the compressed chunk (and, with distillation, to
match the frozen model's answer from the full text), so the compressor learns to carry the
detail that questions ask about.

A share of the detail questions (``verify_share``) can be asked as yes/no checks instead: the
sentence as the text has it (answer ``yes``), or with its detail swapped for another one of the
same kind (a year for a year, a name for a name) from the same text, or a number with one digit
changed (answer ``no``):

    question:  "Is this statement true according to the text? "The survey covered 1,248 galaxies
               observed by the Hubble Space Telescope." Answer yes or no."
    answer:    "no"

These keep label answers (``yes`` / ``no``, as in PubMedQA) in training, and a ``no`` can only be
told from a ``yes`` by the exact detail.

**Written questions** (:func:`write_questions`, ``compressor-plugin train-questions --kind
written``): the frozen base model continues the 3-shot QA layout (three solved SQuAD examples,
then ``Context: <text>`` and ``Question:``) with a question of its own (sampled, so several per
text differ; asked in its chat layout instead, the 135M default model mostly wrote
exclamations), and then answers it from the full text in that layout (greedy), as
:func:`~compressor_plugin.training.trainer.add_teacher_answers` does. The answer is the model's own, not a gold one: training a compressor on these rows is
sequence-level distillation aimed at agreement with the full-text answer, on as many questions
as the corpus has texts. Rows are marked ``"teacher_answer": true`` so training does not
generate their answers again. The corpus text goes into the prompt literally (a ``<|im_end|>``
in a document stays the ordinary tokens that spell it).
"""

from __future__ import annotations

import random
import re
from typing import Any, Iterable, Sequence

__all__ = ["cloze_questions", "cloze_rows", "detail_spans", "parse_question", "write_questions",
           "full_text_answers", "write_question_file", "CLOZE_PREFIX", "VERIFY_PREFIX", "VERIFY_SUFFIX"]

CLOZE_PREFIX = "Fill in the blank: "
BLANK = "____"
VERIFY_PREFIX = "Is this statement true according to the text? "
VERIFY_SUFFIX = " Answer yes or no."

_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December")
_SPAN_PATTERNS = [
    # dates: "12 March 1998", "March 12, 1998", "March 1998"
    re.compile(rf"\b(?:\d{{1,2}} (?:{_MONTHS}) \d{{3,4}}|(?:{_MONTHS}) \d{{1,2}}, \d{{3,4}}|(?:{_MONTHS}) \d{{4}})\b"),
    # numbers with an optional decimal part, unit-like word or percent
    re.compile(r"(?<![\w.])\d(?:[\d,]*\d)?(?:\.\d+)?(?:\s?%| percent| per cent)?(?![\w])"),
    # runs of capitalised words (names, places, organisations), optionally joined by of/the/de
    re.compile(r"\b[A-Z][a-zA-Z\-']+(?:\s+(?:of|the|de|van|von|da)?\s*[A-Z][a-zA-Z\-']+)*"),
]
_SENTENCE = re.compile(r"[^.!?]+[.!?]")
_STOP_CAPS = {"The", "A", "An", "In", "On", "At", "It", "This", "These", "That", "We", "Our", "Its", "As",
              "For", "By", "With", "From", "However", "Here", "There", "They", "He", "She", "His", "Her", "When",
              "While", "After", "Before", "If", "But", "And", "Or", "To", "Of", "I"}


def _sentences(text: str) -> list[tuple[int, str]]:
    """(start offset, sentence) pairs of a text."""
    return [(m.start(), m.group(0)) for m in _SENTENCE.finditer(text)]


def detail_spans(sentence: str) -> list[tuple[int, int]]:
    """(start, end) offsets of names, numbers and dates in one sentence (no overlaps).

    A capitalised run that starts the sentence is skipped (sentence case, not a name) unless it
    has two or more words; common function words alone are never a span.
    """
    lead = len(sentence) - len(sentence.lstrip())
    taken: list[tuple[int, int]] = []
    for pat in _SPAN_PATTERNS:
        for m in pat.finditer(sentence):
            s, e = m.start(), m.end()
            word = m.group(0).strip()
            if not word or word in _STOP_CAPS or len(word) < 2 and not word.isdigit():
                continue
            if word[0].isupper() and s == lead and " " not in word:
                continue
            if any(s < te and ts < e for ts, te in taken):
                continue
            taken.append((s, e))
    return sorted(taken)


def _kind(span: str) -> str:
    """The kind of a detail span: date, year, percent, number or name (swaps stay within a kind)."""
    if not any(c.isdigit() for c in span):
        return "name"
    if re.search(rf"\b(?:{_MONTHS})\b", span):
        return "date"
    if re.search(r"%|\bper ?cent\b", span):
        return "percent"
    return "year" if re.fullmatch(r"1\d{3}|20\d{2}", span) else "number"


def _changed_number(span: str, rng: random.Random) -> str:
    """``span`` with one of its digits replaced by another digit (a leading digit never becomes 0)."""
    places = [i for i, c in enumerate(span) if c.isdigit()]
    i = rng.choice(places)
    lead = i == places[0] and len(places) > 1
    digits = [d for d in "0123456789" if d != span[i] and not (lead and d == "0")]
    return span[:i] + rng.choice(digits) + span[i + 1:]


def _false_detail(span: str, sentence: str, others: list[str], rng: random.Random) -> str | None:
    """A different detail of the same kind as ``span`` and not already in ``sentence``: another one
    from the text, or (half the time for numbers, and when the text has no other) a changed number."""
    kind = _kind(span)
    same_kind = [o for o in others if o != span and o not in sentence and _kind(o) == kind]
    if kind != "name" and (not same_kind or rng.random() < 0.5):
        return _changed_number(span, rng)
    return rng.choice(same_kind) if same_kind else None


def cloze_questions(text: str, rng: random.Random, *, max_questions: int = 2,
                    min_sentence_chars: int = 30, max_sentence_chars: int = 300,
                    verify_share: float = 0.0) -> list[tuple[str, str]]:
    """Up to ``max_questions`` (question, answer) pairs, each from a different sentence of ``text``.

    A cloze question's answer is always an exact span of ``text``; the question is its sentence
    with the span blanked out, after :data:`CLOZE_PREFIX`. With probability ``verify_share`` a
    question is a yes/no check instead (see the module docstring): half of those state the
    sentence as it is (``yes``), half with the detail swapped (``no``) for another of its kind
    (date, year, percent, number, name) that the sentence does not already hold, or for the same
    number with one digit changed; a name with nothing to swap in is asked as ``yes``.
    """
    if not 0.0 <= verify_share <= 1.0:
        raise ValueError(f"verify_share must be in [0, 1], got {verify_share}")
    candidates = []
    for _, sent in _sentences(text):
        sent = sent.strip()
        if not min_sentence_chars <= len(sent) <= max_sentence_chars:
            continue
        spans = detail_spans(sent)
        if spans:
            candidates.append((sent, spans))
    rng.shuffle(candidates)
    details = [sent[s:e].strip() for sent, spans in candidates for s, e in spans] if verify_share > 0 else []
    out = []
    for sent, spans in candidates[:max_questions]:
        s, e = rng.choice(spans)
        answer = sent[s:e].strip()
        if verify_share > 0 and rng.random() < verify_share:
            swap = _false_detail(answer, sent, details, rng) if rng.random() < 0.5 else None
            stated = sent if swap is None else sent[:s] + sent[s:e].replace(answer, swap) + sent[e:]
            out.append((f'{VERIFY_PREFIX}"{stated}"{VERIFY_SUFFIX}', "yes" if swap is None else "no"))
            continue
        question = CLOZE_PREFIX + sent[:s] + BLANK + sent[e:]
        out.append((question, answer))
    return out


def cloze_rows(texts: Iterable[str], *, seed: int = 0, per_text: int = 2,
               verify_share: float = 0.0) -> list[dict[str, object]]:
    """QA rows (``context``, ``question``, ``answers``) of detail questions for many texts
    (cloze questions, and yes/no checks with probability ``verify_share``)."""
    rng = random.Random(seed)
    rows = []
    for text in texts:
        for q, a in cloze_questions(text, rng, max_questions=per_text, verify_share=verify_share):
            rows.append({"context": text, "question": q, "answers": [a]})
    return rows


# ------------------------------------------------------------------------------ written questions

_LEAD = re.compile(r"^(?:question\s*\d*\s*[:.)-]\s*|q\s*\d*\s*[:.)-]\s*|\d+\s*[.)]\s*|[-*#>\s\"'`]+)+", re.IGNORECASE)


def parse_question(text: str, *, min_words: int = 3, max_words: int = 30) -> str | None:
    """The question in a model's reply: its first line, without a ``Question:`` label, numbering or
    quotes, up to and including the first ``?``; None when there is no such question of
    ``min_words`` to ``max_words`` words."""
    for line in text.splitlines():
        line = _LEAD.sub("", line.strip())
        if line:
            break
    else:
        return None
    end = line.find("?")
    if end < 0:
        return None
    q = line[:end + 1].strip().strip("\"'`*").strip()
    if not q.endswith("?"):
        q += "?"
    words = len(q.split())
    return q if min_words <= words <= max_words else None


def _literal(tokenizer: Any, text: str) -> Any:
    """``text`` as a prompt segment of literal token ids (markup in it stays plain text)."""
    from ..generation import TokenIds
    from ..text import literal_ids

    return TokenIds(literal_ids(tokenizer, text))


def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def write_questions(base: Any, texts: Sequence[str], *, per_text: int = 2, attempts: int = 2, batch_size: int = 64,
                    max_new_tokens: int = 48, temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
                    progress: bool = False) -> list[dict[str, str]]:
    """Questions the frozen model writes about each text (rows ``context``, ``question``).

    The model continues the 3-shot QA layout after ``Context: <text>`` and ``Question:``, every
    part read literally. Each text is asked ``per_text * attempts`` times with sampling (``temperature``, ``top_p``;
    seeded per batch, so a run is repeatable on one machine); the first ``per_text`` distinct
    questions that :func:`parse_question` accepts are kept. ``base`` is a
    :class:`~compressor_plugin.models.BaseModel` (its model is used unchanged).
    """
    from ..generation import Generator
    from ..prompts import fewshot_prefix

    if per_text < 1 or attempts < 1 or batch_size < 1:
        raise ValueError("per_text, attempts and batch_size must be at least 1")
    gen = Generator(base)
    lead, cue = _literal(base.tokenizer, fewshot_prefix() + "Context: "), _literal(base.tokenizer, "\nQuestion:")
    asks = [t for t in texts for _ in range(per_text * attempts)]
    found: dict[int, list[str]] = {}
    done = 0
    from tqdm.auto import tqdm

    with tqdm(total=len(asks), desc="writing questions", unit="q", disable=not progress) as bar:
        for b, chunk in enumerate(_batches(asks, batch_size)):
            prompts = [[lead, _literal(base.tokenizer, t), cue] for t in chunk]
            results = gen.generate_batch(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_p=top_p, seed=seed * 1_000_003 + b, stop=["\n"])
            for i, res in enumerate(results):
                q = parse_question(res.text)
                pos = (done + i) // (per_text * attempts)
                kept = found.setdefault(pos, [])
                if q is not None and len(kept) < per_text and q.lower() not in (k.lower() for k in kept):
                    kept.append(q)
            done += len(chunk)
            bar.update(len(chunk))
    return [{"context": texts[pos], "question": q} for pos in sorted(found) for q in found[pos]]


def full_text_answers(base: Any, questions: Sequence[str], contexts: Sequence[str], *, batch_size: int = 64,
                      max_new_tokens: int = 24, progress: bool = False, compressor: Any = None) -> list[str]:
    """The frozen model's greedy answer to each question from its full context, in the best
    full-text layout (3-shot), first line only (:func:`~compressor_plugin.evaluation.metrics.first_line_answer`).
    Questions and contexts are read literally: text that spells ``<|im_end|>`` stays text.

    ``compressor``, when given, is the one the run trains; text-only prompts run on the
    unchanged model either way.
    """
    from ..evaluation.metrics import first_line_answer
    from ..generation import Generator
    from ..prompts import qa_prompt

    if len(questions) != len(contexts):
        raise ValueError("one context per question")
    gen = Generator(base, compressor)
    answers: list[str] = []
    from tqdm.auto import tqdm

    pairs = list(zip(questions, contexts))
    for chunk in tqdm(list(_batches(pairs, batch_size)), desc="full-text answers", unit="batch",
                      disable=not progress):
        prompts = [[s if not isinstance(s, str) else _literal(base.tokenizer, s)
                    for s in qa_prompt("fewshot", q, base.tokenizer).segments([c])] for q, c in chunk]
        answers.extend(first_line_answer(r.text) for r in gen.generate_batch(
            prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"]))
    return answers


def write_question_file(inputs: Sequence[str], output: str, *, kind: str = "written", base: Any = None,
                        tokenizer: Any = None, per_text: int = 2, attempts: int = 2, verify_share: float = 0.0, max_tokens: int = 192,
                        limit: int | None = None, batch_size: int = 64, block: int = 1024,
                        temperature: float = 0.8, seed: int = 0, span_answers: bool = True,
                        progress: bool = True) -> dict[str, Any]:
    """Write training QA rows about the texts of ``inputs`` to ``output`` (JSONL, appended).

    Texts come from corpus rows (``text``) or QA rows (their ``context``), are cut to their first
    ``max_tokens`` tokens (what training compresses; questions about the rest could not be
    answered) and handled in blocks of ``block`` texts, each appended when done: a run stopped
    part-way is resumed by running it again (texts handled before, listed by digest in
    ``<output>.done``, are skipped, whether or not they gave a row).

    ``kind`` is ``"written"`` (:func:`write_questions` + :func:`full_text_answers`; needs
    ``base``; rows with an empty answer are dropped, and with ``span_answers`` (the default)
    also rows whose answer is not words of the text: the 135M default model writes many
    questions its text does not answer, and answers them from its prior) or ``"cloze"``
    (:func:`cloze_rows`, no model; ``tokenizer`` cuts the texts). Returns counts and seconds.
    """
    import hashlib
    import json
    import os
    import time
    from pathlib import Path

    from .data import _texts, _tokenize, read_jsonl

    if kind not in ("written", "cloze"):
        raise ValueError(f"kind must be 'written' or 'cloze', not {kind!r}")
    if kind == "written" and base is None:
        raise ValueError("written questions need the base model (base=)")
    tokenizer = tokenizer if tokenizer is not None else getattr(base, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("give the base model or its tokenizer (tokenizer=): texts are cut by token count")
    if max_tokens < 8 or block < 1:
        raise ValueError("max_tokens must be at least 8 and block at least 1")
    t0 = time.perf_counter()
    texts: list[str] = []
    for path in inputs:
        texts.extend(_texts(read_jsonl(path), path))
    texts = list(dict.fromkeys(texts))[:limit]
    out = Path(output)
    # texts already handled, kept or not: their digests, one per line, beside the output
    done_file = out.with_name(out.name + ".done")

    def digest(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    done: set[str] = set()
    if out.is_file():
        done = {digest(r["context"]) for r in read_jsonl(out) if isinstance(r.get("context"), str)}
    if done_file.is_file():
        done.update(line.strip() for line in done_file.read_text(encoding="utf-8").splitlines() if line.strip())
    stats = {"texts": len(texts), "already_done": 0, "questions": 0, "rows": 0, "dropped": 0, "not_in_text": 0}
    rng = random.Random(seed)
    from tqdm.auto import tqdm

    with tqdm(total=len(texts), desc=f"{kind} questions", unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), block):
            part = texts[start:start + block]
            ids = _tokenize(tokenizer, part)
            cut = [tokenizer.decode(i[:max_tokens]) if len(i) > max_tokens else t for t, i in zip(part, ids)]
            todo = [c for c in dict.fromkeys(cut) if c.strip() and digest(c) not in done]
            stats["already_done"] += len(part) - len(todo)
            if kind == "cloze":
                rows = [dict(r, source="cloze") for r in cloze_rows(todo, seed=rng.randrange(1 << 30),
                                                                      per_text=per_text, verify_share=verify_share)]
                stats["questions"] += len(rows)
            else:
                asked = write_questions(base, todo, per_text=per_text, attempts=attempts, batch_size=batch_size,
                                        temperature=temperature, seed=seed * 7919 + start)
                answers = full_text_answers(base, [r["question"] for r in asked], [r["context"] for r in asked],
                                            batch_size=batch_size)
                stats["questions"] += len(asked)
                answered = [(r, a) for r, a in zip(asked, answers) if a.strip()]
                stats["dropped"] += len(asked) - len(answered)
                if span_answers:  # grounded questions only: the answer is words of the text
                    grounded = [(r, a) for r, a in answered if a.lower() in r["context"].lower()]
                    stats["not_in_text"] += len(answered) - len(grounded)
                    answered = grounded
                rows = [{"context": r["context"], "question": r["question"], "answers": [a], "teacher_answer": True,
                         "source": "written"} for r, a in answered]
            if rows:
                with open(out, "a", encoding="utf-8") as f:
                    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                    f.flush()
                    os.fsync(f.fileno())
            with open(done_file, "a", encoding="utf-8") as f:
                f.write("".join(digest(c) + "\n" for c in todo))
            done.update(digest(c) for c in todo)
            stats["rows"] += len(rows)
            bar.update(len(part))
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    stats["output"] = str(out)
    return stats
