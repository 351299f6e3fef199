"""Training questions from any text corpus: detail (cloze) questions on names, numbers and dates.

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
"""

from __future__ import annotations

import random
import re
from typing import Iterable

__all__ = ["cloze_questions", "detail_spans", "CLOZE_PREFIX", "VERIFY_PREFIX", "VERIFY_SUFFIX"]

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
