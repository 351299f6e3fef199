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
"""

from __future__ import annotations

import random
import re
from typing import Iterable

__all__ = ["cloze_questions", "detail_spans", "CLOZE_PREFIX"]

CLOZE_PREFIX = "Fill in the blank: "
BLANK = "____"

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


def cloze_questions(text: str, rng: random.Random, *, max_questions: int = 2,
                    min_sentence_chars: int = 30, max_sentence_chars: int = 300) -> list[tuple[str, str]]:
    """Up to ``max_questions`` (question, answer) pairs, each from a different sentence of ``text``.

    The answer is always an exact span of ``text``; the question is its sentence with the span
    blanked out, after :data:`CLOZE_PREFIX`.
    """
    candidates = []
    for _, sent in _sentences(text):
        sent = sent.strip()
        if not min_sentence_chars <= len(sent) <= max_sentence_chars:
            continue
        spans = detail_spans(sent)
        if spans:
            candidates.append((sent, spans))
    rng.shuffle(candidates)
    out = []
    for sent, spans in candidates[:max_questions]:
        s, e = rng.choice(spans)
        answer = sent[s:e].strip()
        question = CLOZE_PREFIX + sent[:s] + BLANK + sent[e:]
        out.append((question, answer))
    return out


def cloze_rows(texts: Iterable[str], *, seed: int = 0, per_text: int = 2) -> list[dict[str, object]]:
    """QA rows (``context``, ``question``, ``answers``) of cloze questions for many texts."""
    rng = random.Random(seed)
    rows = []
    for text in texts:
        for q, a in cloze_questions(text, rng, max_questions=per_text):
            rows.append({"context": text, "question": q, "answers": [a]})
    return rows
