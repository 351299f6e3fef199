"""Anchors: a chunk's most salient exact spans, kept as token ids beside its compressed K/V.

k compressed tokens carry the topic of a chunk well and its exact names, numbers and dates
poorly: the decoder then answers from its prior (``1980`` for 1962). An *anchored* context
keeps, besides its k slots, a short budget of token ids that spell the chunk's salient spans
verbatim; the decoder reads them as ordinary text right after the slots::

    [k compressed slots] Key terms: Marta Ilvane; born in 1962; 652 people; kessari

The spans are chosen by a heuristic (no model runs), deterministically:

* dates (``16 September 1869``, ``May 2003``), years, numbers and amounts with the unit word
  that follows them (``652 people``, ``$3.5 million``, ``40%``), optionally with the
  ``left_context`` words before them (``born in 1962``) so the decoder can tell which number
  answers which question;
* capitalised names of two or more words (``Marta Ilvane``, ``Seilgrad Society``), and single
  capitalised words that are not the first word of a sentence;
* rare or invented words: words the tokenizer splits into many pieces for their length
  (``zyrdyfeirk``);
* quoted terms (``"the long winter"``).

Spans are ranked by kind, deduplicated, and as many as fit the budget (lead-in and separators
included, counted with the tokenizer itself) are kept, in text order; a span is never cut.

Anchor tokens are prompt tokens: an anchored chunk takes ``k + len(anchor_ids)`` positions,
and every compression ratio this package reports counts them.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from .text import _literal_backend, literal_ids, respell, respell_table

__all__ = ["select_anchors", "question_line", "with_anchors", "anchors_for_ids", "attach_anchors", "question_anchors", "share_budget", "relevance", "anchor_spans", "anchored_fingerprint", "check_budget",
           "check_window_share", "LEAD_IN", "SEPARATOR", "MAX_ANCHOR_TOKENS", "DEFAULT_LEFT_CONTEXT",
           "DEFAULT_ANCHORS", "DEFAULT_WINDOW_SHARE", "MIN_WINDOW_TOKENS"]

#: Text before the spans (dropped when the budget is too small to pay for it).
LEAD_IN = "\nKey terms: "
#: Between two spans.
SEPARATOR = "; "
#: Largest anchor budget (and the longest ``anchor_ids`` a stored context may carry).
MAX_ANCHOR_TOKENS = 512
#: Words kept before a number or date (``born in 1962``); see :func:`select_anchors`. 2 measured
#: better than 0 on invented facts (docs/benchmarks.md, "Anchors: exact spans beside the K/V").
DEFAULT_LEFT_CONTEXT = 2
#: Anchor budget of the engine, the LangChain/LlamaIndex faces and ``cache build`` unless told
#: otherwise. On the H200 (docs/benchmarks.md, "Anchors on the H200") 32 anchor tokens beside the
#: 16 slots lifted SQuAD dev F1 from 0.173 to 0.235 and invented-facts EM from 0.007 to 0.200;
#: a chunk then takes up to 48 positions instead of 16. Pass ``anchors=0`` for the K/V alone.
DEFAULT_ANCHORS = 32

#: Share of a question-anchor budget that the question's best sentence may take verbatim
#: (:func:`select_anchors`); 0 keeps spans only. On the H200 (docs/benchmarks.md, "Question
#: anchors: a sentence window") 0.5 raised kv-k16's kept exact match (questions the full text answers right and the
#: compressed chunk too) from 0.64 to 0.73 and its mean agreement from 0.343 to 0.354 over 13 QA
#: sets, and invented-facts EM from 0.553 to 0.687 (full text 0.633).
DEFAULT_WINDOW_SHARE = 0.5

#: Fewest tokens a sentence window may take (:func:`select_anchors`): with less room, spans only.
MIN_WINDOW_TOKENS = 12

_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December|"
           "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec")
_NUM = r"[$£€¥]?\d+(?:[.,:]\d+)*(?:%|st|nd|rd|th)?"
_DATE_RE = re.compile(
    rf"\b(?:\d{{1,2}}\s+(?:{_MONTHS})\.?(?:,?\s+\d{{3,4}})?|(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?"
    rf"(?:,?\s+\d{{3,4}})?|(?:{_MONTHS})\s+\d{{4}})\b")
_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUM}(?:\s+(?:million|billion|thousand|hundred|percent|per cent))?"
                        r"(?:\s+(?P<unit>[a-z][a-z-]{1,20}))?")
_QUOTED_RE = re.compile(r"[\"\u201c\u00ab]([^\"\u201d\u00bb\n]{2,60})[\"\u201d\u00bb]")
_CAP_WORD = r"[A-Z][\w'\u2019-]*"
_NAME_RE = re.compile(rf"\b{_CAP_WORD}(?:\s+(?:(?:of|the|de|del|da|van|von|der|la|le|du|al|bin)\s+)*{_CAP_WORD})*")
_WORD_RE = re.compile(r"\b[^\W\d_][^\W\d_'-]{3,}\b")
#: Unit words that are not units (a number followed by them keeps no unit).
_NOT_UNITS = frozenset("and or the a an to of in on at by for with from as is was were are be been that which "
                       "who when where while after before but if than then".split())

#: Left context stops before these words (``and employed 652 people`` -> ``employed 652 people``).
_CLAUSE_WORDS = frozenset("and or but which who whom whose that while when where".split())

# rank of each kind of span: higher is kept first
_RANK = {"date": 6, "number": 5, "quoted": 4, "name": 4, "rare": 3, "capital": 2}


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    kind: str
    score: float

    def overlaps(self, other: "_Span") -> bool:
        return self.start < other.end and other.start < self.end


def check_budget(budget: Any) -> int:
    """``budget`` as an int in ``[0, MAX_ANCHOR_TOKENS]``.

    Raises:
        ValueError: not an integer, or out of range.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= MAX_ANCHOR_TOKENS:
        raise ValueError(f"anchors is a token budget between 0 and {MAX_ANCHOR_TOKENS}, not {budget!r}")
    return budget


def check_window_share(share: Any) -> float:
    """``share`` as a float in ``[0, 1]`` (see :func:`select_anchors`).

    Raises:
        ValueError: not a number, or out of range.
    """
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"window_share is a share of the anchor budget between 0 and 1, not {share!r}")
    return float(share)


def anchored_fingerprint(compressor_fingerprint: str, budget: int) -> str:
    """The compressor fingerprint recorded in (and keyed for) contexts made with an anchor budget.

    ``budget == 0`` keeps the plain fingerprint, so entries made without anchors keep their
    keys; any other budget gives a different fingerprint, hence a different store key, so
    entries with and without anchors (or with different budgets) never mix.
    """
    budget = check_budget(budget)
    return compressor_fingerprint if budget == 0 else f"{compressor_fingerprint}+a{budget}"


def _sentence_start(text: str, i: int) -> bool:
    """Whether position ``i`` opens the text or a sentence (after ``.!?:;`` or a line break).

    Walks back over the whitespace before ``i`` only, so it costs no more than that run:
    scanning the whole prefix for every candidate would be quadratic in the chunk's length.
    """
    j = i
    while j > 0 and text[j - 1].isspace():
        if text[j - 1] == "\n":
            return True
        j -= 1
    return j == 0 or text[j - 1] in ".!?:;"


_PIECE_CACHE: "weakref.WeakKeyDictionary[Any, tuple[int, dict[str, int]]]" = weakref.WeakKeyDictionary()
_PIECE_CACHE_WORDS = 200_000  # words remembered per tokenizer; the memory is cleared when full
_PIECE_CACHE_WORD_CHARS = 32  # longer words are counted but not remembered (about 30 MB at most)


def _piece_counts(tokenizer: Any, words: set[str]) -> dict[str, int]:
    """Tokens of each word read after a space: words met before (in any chunk) from memory, the
    others from one batched tokenizer call.

    The memory belongs to the tokenizer object and is dropped when its vocabulary size changes
    (``add_tokens``), so the counts are always the tokenizer's own.
    """
    try:
        size, known = _PIECE_CACHE.get(tokenizer, (-1, {}))
    except TypeError:  # a tokenizer that cannot be weakly referenced: count every time
        size, known = -1, None
    vocab = len(tokenizer)
    if known is None or size != vocab or len(known) > _PIECE_CACHE_WORDS:
        known = {} if known is not None else None
    new = sorted(w for w in words if known is None or w not in known)
    counts = dict(zip(new, map(len, literal_ids(tokenizer, [" " + w for w in new])))) if new else {}
    if known is None:
        return counts
    known.update((w, n) for w, n in counts.items() if len(w) <= _PIECE_CACHE_WORD_CHARS)
    _PIECE_CACHE[tokenizer] = (vocab, known)
    return {w: counts[w] if w in counts else known[w] for w in words}


_LEFT_WORD = re.compile(r"([^\W\d_][\w'-]*)\s+$")
_WORD_RUN = re.compile(r"[\w'-]*\s*")
_LEFT_WINDOW = 64  # characters searched before a span; the whole prefix only when one run fills them


def _with_left_context(text: str, start: int, words: int) -> int:
    """Move ``start`` left over up to ``words`` words of the same sentence (not across punctuation)."""
    for _ in range(words):
        lo = max(0, start - _LEFT_WINDOW)
        m = _LEFT_WORD.search(text, lo, start)
        # a match (or the run that failed to match) touching the window's edge may begin before it
        if lo > 0 and _WORD_RUN.fullmatch(text, lo, m.start() if m is not None else start):
            m = _LEFT_WORD.search(text, 0, start)
        if m is None or m.group(1).lower() in _CLAUSE_WORDS:
            break
        start = m.start(1)
    return start


def anchor_spans(text: str, tokenizer: Any, *, left_context: int = DEFAULT_LEFT_CONTEXT) -> list[tuple[int, int, str]]:
    """Candidate salient spans of ``text`` as ``(start, end, kind)``, best first (ties in text order).

    Overlapping candidates are resolved in favour of the better one; spans whose text
    repeats an earlier kept span (case-insensitive) are dropped.
    """
    cands: list[_Span] = []
    for m in _DATE_RE.finditer(text):
        cands.append(_Span(_with_left_context(text, m.start(), left_context), m.end(), "date", _RANK["date"]))
    for m in _NUMBER_RE.finditer(text):
        end = m.end()
        unit = m.group("unit")
        if unit is not None and (unit in _NOT_UNITS or unit.endswith(("ed", "ly"))):  # not a unit: "32 sailed"
            end = m.start("unit")
            while end > m.start() and text[end - 1].isspace():
                end -= 1
        cands.append(_Span(_with_left_context(text, m.start(), left_context), end, "number", _RANK["number"]))
    for m in _QUOTED_RE.finditer(text):
        cands.append(_Span(m.start(1), m.end(1), "quoted", _RANK["quoted"]))
    names = list(_NAME_RE.finditer(text))
    words = [m.group(0) for m in _WORD_RE.finditer(text)]
    pieces = _piece_counts(tokenizer, {m.group(0).split()[0] for m in names}
                           | {w for w in words if not w[0].isupper()})
    for m in names:
        words = m.group(0).split()
        start = m.start()
        if len(words) == 1:
            word = words[0]
            # a capitalised word at a sentence start is usually a common word ("After", "The")
            if _sentence_start(text, start) and pieces[word] < 3:
                continue
            cands.append(_Span(start, m.end(), "capital", _RANK["capital"] + 0.1 * pieces[word]))
        else:
            if _sentence_start(text, start) and pieces[words[0]] < 2:
                # "The Droupyr river" -> keep "Droupyr", drop the sentence-initial common word
                gap = re.compile(r"\s+").search(text, start)
                start = gap.end() if gap is not None else start
            cands.append(_Span(start, m.end(), "name", _RANK["name"]))
    for m in _WORD_RE.finditer(text):
        word = m.group(0)
        if word[0].isupper():
            continue  # names are handled above
        n = pieces[word]
        # invented or rare: split into many pieces for its length
        if n >= 3 and len(word) / n < 4.0:
            cands.append(_Span(m.start(), m.end(), "rare", _RANK["rare"] + 0.1 * n))
    cands.sort(key=lambda s: (-s.score, s.start, -(s.end - s.start)))
    kept: list[_Span] = []
    seen: set[str] = set()
    for s in cands:
        piece = text[s.start:s.end].strip()
        key = " ".join(piece.lower().split())
        # a span inside a kept one says nothing new ("1836" beside "23 November 1836")
        if not piece or any(f" {key} " in f" {other} " for other in seen) or any(s.overlaps(o) for o in kept):
            continue
        kept.append(s)
        seen.add(key)
    return [(s.start, s.end, s.kind) for s in kept]


_QUESTION_STOP = frozenset(
    "the and for from with what which who whom whose when where why how did does was were are has have had that "
    "this these those its into than then their his her they she him them there been being about after before "
    "many much name named called long year years time question answer context".split())
_SENTENCE_END = re.compile(r"[.!?;](?=\s)|\n")


#: Irregular past forms mapped to the form a question asks with ("Who leads X?" / "led by").
_IRREGULAR = {"led": "lead", "won": "win", "held": "hold", "began": "begin", "begun": "begin", "built": "build",
              "made": "make", "sold": "sell", "bought": "buy", "taught": "teach", "wrote": "write",
              "written": "write", "ran": "run", "gave": "give", "given": "give", "took": "take", "taken": "take",
              "became": "become", "brought": "bring", "left": "leave", "met": "meet", "paid": "pay",
              "kept": "keep", "grew": "grow", "grown": "grow", "drew": "draw", "drawn": "draw", "flew": "fly",
              "flown": "fly", "rose": "rise", "risen": "rise", "fell": "fall", "fallen": "fall", "knew": "know",
              "known": "know", "chose": "choose", "chosen": "choose", "spoke": "speak", "spoken": "speak",
              "sang": "sing", "sung": "sing", "fought": "fight", "caught": "catch", "thought": "think",
              "sent": "send", "spent": "spend", "lost": "lose", "told": "tell", "said": "say", "sat": "sit",
              "stood": "stand", "struck": "strike", "died": "die", "lived": "live", "moved": "move"}


def _stem(word: str) -> str:
    """A crude stem for question matching: irregular past forms mapped, then ``-ing``/``-ed``/``-es``/``-s``
    cut (keeping 3 letters), then the first 5 characters: ``sailed`` and ``sail``, ``opening`` and ``open``,
    ``led`` and ``leads`` meet."""
    word = _IRREGULAR.get(word, word)
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not word.endswith("ss"):
            word = word[:-len(suffix)]
            break
    return word[:5]


def _stems(text: str) -> set[str]:
    """Content words of ``text`` for question matching: lower case, 3+ letters, stemmed (:func:`_stem`)."""
    return {_stem(w) for w in re.findall(r"[^\W_]{3,}", text.lower()) if w not in _QUESTION_STOP}


#: The span kinds that answer each kind of question (see :func:`_wanted_kinds`).
_WANTED = (
    (re.compile(r"\b(?:who|whom|whose)\b"), ("name", "capital")),
    (re.compile(r"\b(?:when|what (?:year|date|day|month|century)|which (?:year|date|day|month|century)|"
                r"in what year|since when)\b"), ("date", "number")),
    (re.compile(r"\bhow (?:many|much|long|old|far|high|tall|large|big|deep|wide|heavy|often|fast)\b|"
                r"\bwhat (?:percentage|percent|number|amount|temperature|size|population)\b"), ("number", "date")),
    (re.compile(r"\bwhere\b"), ("name", "capital")),
    # "which port", "what company": after the patterns above ("what year" is a date), a named thing;
    # not "which is older, A or B?", whose answer is a name the question spells
    (re.compile(r"(?s)^(?!.*\bor\b).*?\b(?:which|what) "
                r"(?!(?:is|are|was|were|do|does|did|has|have|had|can|could|would|will|should)\b)[a-z]+"),
     ("name", "capital")),
)


def question_line(text: str) -> str:
    """The part of a prompt's text that asks: the line that holds its last ``?``, up to it
    (``Question: Who ...?`` in ``\nQuestion: Who ...?\nAnswer:``); all of ``text`` without a ``?``."""
    end = text.rfind("?")
    if end < 0:
        return text
    return text[text.rfind("\n", 0, end) + 1:end + 1]


def _wanted_kinds(question: str) -> tuple[str, ...]:
    """The span kinds a question's answer is likely to be: ``("name", "capital")`` for *who*,
    *where* and *which* / *what* + a noun (*which port*, *what company*; not in a question that
    offers a choice, *A or B*), dates and numbers for
    *when* / *what year*, numbers for *how many* / *how much*; ``()`` otherwise (*what is*, *why*).

    Only the question's line is read (:func:`question_line`), so a prompt template's own words
    around it (an instruction with an *or*, ``Answer:``) do not change the kind.
    """
    q = question_line(question).lower()
    for pattern, kinds in _WANTED:
        if pattern.search(q):
            return kinds
    return ()


@functools.lru_cache(maxsize=256)
def _sentences(text: str) -> tuple[list[int], list[tuple[int, int]], list[frozenset[str]]]:
    """Sentence ends, sentence bounds and each sentence's content-word stems (:func:`_stems`).

    Kept for the last texts seen: a prompt's chunks are asked about by :func:`relevance`,
    :func:`_by_question` and the sentence window in turn, and a stored chunk by many questions.
    Callers must not modify the lists.
    """
    cuts = [m.end() for m in _SENTENCE_END.finditer(text)]
    bounds = list(zip([0] + cuts, cuts + [len(text)]))
    return cuts, bounds, [frozenset(_stems(text[a:b])) for a, b in bounds]


def _sentence_overlap(text: str, q: set[str]) -> tuple[list[int], list[tuple[int, int]], list[float]]:
    """Sentence ends, sentence bounds, and each sentence's overlap with the question stems ``q``.

    A shared word counts ``1 / (sentences of the chunk that hold it)`` (see :func:`_by_question`).
    """
    cuts, bounds, words = _sentences(text)
    held: dict[str, int] = {}  # sentences that hold each word
    for w in words:
        for stem in w & q:
            held[stem] = held.get(stem, 0) + 1
    overlap = [round(sum(1.0 / held[stem] for stem in w & q), 9) for w in words]  # rounded: exact ties tie
    return cuts, bounds, overlap


_TOKEN_RE = re.compile(r"\S+")


def _sentence_window(text: str, spans: list[tuple[int, int, str]], question: str, tokenizer: Any,
                     budget: int, share: float) -> tuple[int, int] | None:
    """The question's best sentence (or the best part of it that fits) as one span.

    The window may take ``share`` of what ``budget`` leaves after :data:`LEAD_IN`, and is not
    used when that is under :data:`MIN_WINDOW_TOKENS` (a chunk with a small share of a
    prompt's budget keeps spans only). The sentence that shares the most words with
    ``question`` (as :func:`_by_question` ranks them; between equal ones, the first that holds a
    span of the kind asked for) is kept whole when it fits. A longer one is cut to the window of
    whole words that fits and holds, in this order: a span of the kind the question asks for (a name for *who*); the most
    question words; the most spans of that kind; the most other spans the question does not
    spell. A window never cuts a span (``23 November | 1836``). ``None`` when no sentence
    shares a word with the question or no window fits.
    """
    q = _stems(question)
    if not q:
        return None
    cuts, bounds, overlap = _sentence_overlap(text, q)
    wanted = _wanted_kinds(question)
    answers = set()  # sentences holding a span of the kind asked for that the question does not spell
    for s, e, k in spans:
        if k in wanted and not _stems(text[s:e]) <= q:
            answers.add(min(bisect.bisect_right(cuts, s), len(bounds) - 1))
    # the best match; between equal matches, one that holds a possible answer ("The team is coached by
    # Mulkol Keimsis" over "Kykimouth Athletic is a football club" for "Who coaches Kykimouth Athletic?")
    best = max(range(len(bounds)), key=lambda i: (overlap[i], i in answers, -i))
    if overlap[best] <= 0:
        return None
    a, b = bounds[best]
    words = [(m.start(), m.end()) for m in _TOKEN_RE.finditer(text, a, b)]
    if not words:
        return None
    lead = len(literal_ids(tokenizer, LEAD_IN))
    budget = min(budget, lead + int((budget - lead) * share))
    room = budget - lead
    if room < MIN_WINDOW_TOKENS:  # a few words cut from a sentence tell less than the spans they push out
        return None
    whole = (words[0][0], words[-1][1])
    if len(literal_ids(tokenizer, LEAD_IN + " ".join(text[whole[0]:whole[1]].split()))) <= budget:
        return whole
    inside = [(s, e, k) for s, e, k in spans if a <= s and e <= b]
    cut_ok_start = [not any(s < ws < e for s, e, _ in inside) for ws, _ in words]
    cut_ok_end = [not any(s < we < e for s, e, _ in inside) for _, we in words]
    cost = list(map(len, literal_ids(tokenizer, [" " + text[s:e] for s, e in words])))
    # spans that tell something new (the question does not spell them), and whether each is of the kind asked
    news = [(s, e, k in wanted) for s, e, k in inside if not _stems(text[s:e]) <= q]
    # per question word this sentence holds (so a long, untrusted prompt costs nothing more here), how
    # many of the sentence's first n words hold it: the shared words of a window in O(words asked)
    asked = sorted(q & _sentences(text)[2][best])
    seen = [[0] * (len(words) + 1) for _ in asked]
    for n, (s, e) in enumerate(words):
        own = _stems(text[s:e])
        for row, stem in zip(seen, asked):
            row[n + 1] = row[n] + (stem in own)
    best_window: tuple[tuple[int, int, int, int, int], int, int] | None = None
    for i in range(len(words)):
        if not cut_ok_start[i]:
            continue
        total, j = 0, i - 1
        while j + 1 < len(words) and total + cost[j + 1] <= room:
            j += 1
            total += cost[j]
        while j >= i and not cut_ok_end[j]:
            j -= 1
        if j < i:
            continue
        ws, we = words[i][0], words[j][1]
        shared = sum(row[j + 1] > row[i] for row in seen)
        held = [kind for s, e, kind in news if ws <= s and e <= we]
        nw = sum(held)
        key = (min(nw, 1), shared, nw, len(held), -i)
        if best_window is None or key > best_window[0]:
            best_window = (key, i, j)
    if best_window is None:
        return None
    _, i, j = best_window
    while j >= i:  # the per-word count is an estimate: shrink until the rendered text fits
        ws, we = words[i][0], words[j][1]
        if cut_ok_end[j] and len(literal_ids(tokenizer, LEAD_IN + " ".join(text[ws:we].split()))) <= budget:
            return ws, we
        j -= 1
    return None


def _by_question(text: str, spans: list[tuple[int, int, str]], question: str) -> list[tuple[int, int, str]]:
    """``spans`` reordered: those whose sentence shares the most words with ``question`` first.

    Words are matched by a crude stem (:func:`_stem`: ``sailed`` meets ``sail``, ``led`` meets
    ``leads``).
    A shared word counts ``1 / (sentences of the chunk that hold it)``: the chunk's subject
    (``Zaslyrkmere Athletic`` in every sentence) tells its sentences apart less than the word
    only one of them holds (``coached`` for "Who coaches Zaslyrkmere Athletic?"). Within a
    sentence, a span that shares a word with the question and adds one comes first (``employed
    652 people`` for "How many people did it employ?"), and a span the question already spells
    (``AFC`` for "Which team represented the AFC?") last: it tells the model nothing new; and
    before the others, a span of the kind the question asks for (:func:`_wanted_kinds`: a name
    for *who*, a date or number for *when*, a number for *how many*). Ties keep the salience
    order of :func:`anchor_spans`.
    """
    q = _stems(question)
    if not q:
        return spans
    wanted = _wanted_kinds(question)
    cuts, bounds, overlap = _sentence_overlap(text, q)

    def score(j: int) -> tuple[float, int, int, int]:
        start, end, kind = spans[j]
        i = min(bisect.bisect_right(cuts, start), len(bounds) - 1)
        own = _stems(text[start:end])
        # within a sentence: spans it spells last (they tell the model nothing new); before them,
        # spans of the kind the question asks for (a name for "who", a number for "how many"),
        # then spans that share a word with the question and add one ("employed 652 people" for
        # "how many people did it employ?"), then the others
        spelled = bool(own) and own <= q
        tier = 2 if spelled else 0 if own & q else 1
        return -overlap[i], int(spelled or kind not in wanted), tier, j

    order = sorted(range(len(spans)), key=score)
    return [spans[j] for j in order]


def has_question_words(text: str) -> bool:
    """Whether ``text`` holds a word that question anchors can match (not only ``Question: Answer:``)."""
    return bool(_stems(text))


def relevance(text: str, question: str) -> int:
    """How well ``text`` matches ``question``: the most question words one of its sentences shares."""
    q = _stems(question)
    if not q:
        return 0
    return max(len(q & words) for words in _sentences(text)[2])


def share_budget(relevances: Sequence[int], budget: int) -> list[int]:
    """Split ``budget`` tokens per chunk across the chunks of one prompt by their relevance.

    Every chunk keeps half its budget; the other halves are pooled and shared in proportion
    to the square of each chunk's :func:`relevance` (equally when no chunk matches the
    question), so the chunk that answers gets most of the pool. The total stays
    ``budget * len(relevances)``, each share at most :data:`MAX_ANCHOR_TOKENS`.
    """
    budget = check_budget(budget)
    n = len(relevances)
    if n <= 1 or budget == 0:
        return [budget] * n
    floor = budget // 2
    pool = (budget - floor) * n
    weights = [max(int(r), 0) ** 2 for r in relevances]
    if not any(weights):
        weights = [1] * n
    total = sum(weights)
    shares = [min(floor + pool * w // total, MAX_ANCHOR_TOKENS) for w in weights]
    best = max(range(n), key=lambda i: (weights[i], -i))  # rounding leftovers to the best match
    shares[best] = min(shares[best] + budget * n - sum(shares), MAX_ANCHOR_TOKENS)
    return shares


def question_anchors(chunks: Sequence[tuple[str, list[tuple[int, int, str]] | None]], tokenizer: Any, budget: int,
                     question: str, *, share: bool = True,
                     window_share: float = DEFAULT_WINDOW_SHARE) -> list[list[int]]:
    """Anchor ids for each chunk of one prompt, chosen for ``question``.

    Args:
        chunks: ``(text, spans)`` per chunk, in prompt order (``spans`` from
            :func:`anchor_spans`, or ``None`` to compute them).
        budget: anchor tokens per chunk.
        share: split the prompt's ``budget * len(chunks)`` tokens by relevance
            (:func:`share_budget`): the chunk that matches the question can hold more of its
            spans, the others fewer. ``False``: every chunk gets ``budget``.
        window_share: the share of each chunk's budget its best sentence may take verbatim
            (:func:`select_anchors`).
    """
    budgets = share_budget([relevance(t, question) for t, _ in chunks], budget) if share else [budget] * len(chunks)
    return [select_anchors(t, tokenizer, b, question=question, spans=sp, window_share=window_share)
            for (t, sp), b in zip(chunks, budgets)]


def select_anchors(text: str, tokenizer: Any, budget: int, *, left_context: int = DEFAULT_LEFT_CONTEXT,
                   question: str | None = None, spans: list[tuple[int, int, str]] | None = None,
                   window_share: float = DEFAULT_WINDOW_SHARE) -> list[int]:
    """Token ids of the salient exact spans of ``text``, at most ``budget`` of them.

    Pure and deterministic: the same text, tokenizer and budget always give the same ids.
    Spans are taken best first (dates, numbers with their unit, quoted terms and names, rare
    words, other capitalised words) while the rendered anchor text (:data:`LEAD_IN`, the
    spans in text order joined by :data:`SEPARATOR`) still fits ``budget`` tokens; a span
    that does not fit is skipped whole, never cut. When the lead-in does not leave room for a
    span it is dropped.

    Args:
        text: the chunk.
        tokenizer: the base model's tokenizer (the ids are for its vocabulary).
        budget: most tokens to return; 0 returns ``[]``.
        left_context: words of the sentence kept before each number or date
            (``born in 1962`` with 2).
        question: when given, the spans of the sentences that share the most words with it
            are taken first (*question anchors*: the same budget spent on what this question
            is about); spans the question already spells come after the others of their sentence.
        spans: ``anchor_spans(text, tokenizer, left_context=...)`` when the caller has them
            (they depend on the text only, so a chunk asked about many times computes them once).
        window_share: with ``question``, the share of the budget (after the lead-in) that the
            question's best sentence may take verbatim, before the spans (a *sentence window*:
            the decoder reads which name or number answers, not only a list of them); a
            sentence too long for it is cut to its best window of whole words. ``0``: spans
            only. See :data:`DEFAULT_WINDOW_SHARE`.

    Raises:
        ValueError: ``budget`` is not an integer in ``[0, MAX_ANCHOR_TOKENS]``.
    """
    budget = check_budget(budget)
    window_share = check_window_share(window_share)
    if budget == 0 or not text.strip():
        return []

    def encode(s: str) -> list[int]:
        return literal_ids(tokenizer, s)  # a chunk's "<|im_end|>" stays text

    if spans is None:
        spans = anchor_spans(text, tokenizer, left_context=left_context)
    if question:
        spans = _by_question(text, spans, question)
        window = _sentence_window(text, spans, question, tokenizer, budget, window_share) if window_share else None
        if window is not None:
            ws, we = window
            spans = [(ws, we, "sentence")] + [sp for sp in spans if not (ws <= sp[0] and sp[1] <= we)]
    for lead in (LEAD_IN, " "):  # the lead-in, or a bare space when it leaves no room
        chosen: list[tuple[int, int]] = []
        ids: list[int] = []
        for start, end, _ in spans:
            trial = sorted(chosen + [(start, end)])
            trial_ids = encode(lead + SEPARATOR.join(" ".join(text[a:b].split()) for a, b in trial))
            if len(trial_ids) <= budget:
                chosen, ids = trial, trial_ids
        if chosen:
            return ids
    return []


def anchors_for_ids(rows: Sequence[Sequence[int]], tokenizer: Any, budget: int, *,
                    left_context: int = DEFAULT_LEFT_CONTEXT) -> list[list[int]]:
    """Anchor ids of each chunk given as its token ids, chosen from its decoded text.

    What :func:`with_anchors` attaches to a context of those ids; pure, so it can run in another
    process (``cache build`` does, beside the encoder).
    """
    budget = check_budget(budget)
    if budget == 0:
        return [[] for _ in rows]
    return [select_anchors(tokenizer.decode(list(r)), tokenizer, budget, left_context=left_context) for r in rows]


def attach_anchors(ctx: Any, chosen: Sequence[int], budget: int) -> Any:
    """A copy of ``ctx`` with anchor ids ``chosen`` (from :func:`anchors_for_ids`) for a budget.

    The copy records :func:`anchored_fingerprint` as its compressor fingerprint (hence its own
    store key). A budget of 0 returns ``ctx`` unchanged.
    """
    import dataclasses

    import torch

    budget = check_budget(budget)
    if budget == 0:
        return ctx
    if len(chosen) > budget:
        raise ValueError(f"{len(chosen)} anchor ids for a budget of {budget}")
    return dataclasses.replace(
        ctx, compressor_fingerprint=anchored_fingerprint(ctx.compressor_fingerprint, budget),
        anchor_ids=torch.tensor(list(chosen), dtype=torch.long) if len(chosen) else None)


def with_anchors(ctx: Any, ids: Any, tokenizer: Any, budget: int, *,
                 left_context: int = DEFAULT_LEFT_CONTEXT) -> Any:
    """A copy of a :class:`~compressor_plugin.context.CompressedContext` with the anchors of its chunk.

    ``ids`` are the chunk's token ids (what was compressed): the spans are chosen from their
    decoded text, so a truncated chunk anchors only what it kept. The copy records
    :func:`anchored_fingerprint` as its compressor fingerprint (hence its own store key). A
    budget of 0 returns ``ctx`` unchanged.
    """
    budget = check_budget(budget)
    if budget == 0:
        return ctx
    return attach_anchors(ctx, anchors_for_ids([ids], tokenizer, budget, left_context=left_context)[0], budget)


# ------------------------------------------------------------------------------ worker processes
_POOL_TOKENIZER: Any = None
_POOL_SPANS: dict[str, list[tuple[int, int, str]]] = {}  # a worker's spans per text (questions about one chunk repeat)
_POOL_SPANS_LIMIT = 10_000  # texts (a few KB each with their spans)


class _LiteralTokenizer:
    """What an anchor worker needs of a stock fast tokenizer, without importing transformers (or
    torch): its Rust pipeline, read from JSON in the worker with only ``tokenizers``.

    The pipeline reads special-token strings as plain text and never pads or truncates, as the
    private copy behind :func:`~compressor_plugin.text.literal_ids` does, so a text such as
    ``<|im_end|>`` gives the ordinary tokens that spell it; calling it in any other way than
    ``literal_ids`` does is refused. ``decode`` is the Rust tokenizer's, which is the wrapper's
    own when the wrapper does no clean-up of spaces (:func:`_worker_tokenizer` checks).
    """

    def __init__(self, pipeline: str, size: int, respelled: dict[int, tuple[int, ...]] | None = None):
        self.pipeline = pipeline  # the JSON is what is pickled; the Rust tokenizer is built on first use
        self.size = size
        self.respelled = dict(respelled or {})  # control ids literal text still reaches -> their spelling

    @functools.cached_property
    def _rust(self) -> Any:
        from tokenizers import Tokenizer

        rust = Tokenizer.from_str(self.pipeline)
        rust.encode_special_tokens = True
        rust.no_padding()
        rust.no_truncation()
        return rust

    def __getstate__(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "size": self.size, "respelled": self.respelled}

    def __len__(self) -> int:
        return self.size

    def __call__(self, text: str | list[str], *, add_special_tokens: bool = True,
                 split_special_tokens: bool = False) -> dict[str, Any]:
        if add_special_tokens or not split_special_tokens:
            raise ValueError("an anchor worker's tokenizer reads text literally only (see literal_ids)")
        batch = [text] if isinstance(text, str) else list(text)
        ids = [e.ids for e in self._rust.encode_batch(batch, add_special_tokens=False)] if batch else []
        if self.respelled and any(not self.respelled.keys().isdisjoint(row) for row in ids):
            ids = [respell(row, self.respelled)[0] for row in ids]  # as literal_ids does
        return {"input_ids": ids[0] if isinstance(text, str) else ids}

    def decode(self, ids: Sequence[int]) -> str:
        return self._rust.decode(list(ids), skip_special_tokens=False)


@functools.lru_cache(maxsize=None)
def _stock_decode(kind: type) -> bool:
    """Whether tokenizers of class ``kind`` decode as Hugging Face's fast tokenizer does: the Rust
    tokenizer's decode, then a clean-up of spaces where switched on."""
    from transformers import PreTrainedTokenizerFast

    return kind.decode is PreTrainedTokenizerFast.decode and kind._decode is PreTrainedTokenizerFast._decode


def _worker_tokenizer(tokenizer: Any) -> Any:
    """What :class:`AnchorPool` sends its workers for ``tokenizer``.

    A :class:`_LiteralTokenizer` where it gives the same ids and texts: a stock fast tokenizer
    whose literal copy exists (:func:`~compressor_plugin.text.literal_ids` then reads text with
    that copy in this process too) and whose decoding cleans up no spaces. Otherwise the
    tokenizer itself, which the workers unpickle with transformers (seconds per worker).
    """
    own = _literal_backend(tokenizer)
    if own is None or getattr(tokenizer, "clean_up_tokenization_spaces", True) or not _stock_decode(type(tokenizer)):
        return tokenizer
    return _LiteralTokenizer(own.to_str(), len(tokenizer), respell_table(tokenizer))


def _init_pool_worker(tokenizer: Any) -> None:
    global _POOL_TOKENIZER
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker
    torch = sys.modules.get("torch")  # loaded only where unpickling the tokenizer needed it
    if torch is not None:
        torch.set_num_threads(1)
    _POOL_TOKENIZER = tokenizer


def _pool_ids_task(rows: list[list[int]], budget: int, left_context: int) -> list[list[int]]:
    return anchors_for_ids(rows, _POOL_TOKENIZER, budget, left_context=left_context)


def _pool_question_task(tasks: list[tuple[str, str, int]], window_share: float) -> list[list[int]]:
    out = []
    for text, question, budget in tasks:
        spans = _POOL_SPANS.get(text)
        if spans is None:
            if len(_POOL_SPANS) >= _POOL_SPANS_LIMIT:
                _POOL_SPANS.clear()
            spans = _POOL_SPANS[text] = anchor_spans(text, _POOL_TOKENIZER)
        out.append(select_anchors(text, _POOL_TOKENIZER, budget, question=question, spans=spans,
                                  window_share=window_share))
    return out


class AnchorPool:
    """Worker processes that choose anchors: the same ids as the calling process, on more cores.

    Choosing anchors is tokenizer and regular-expression work that holds the GIL (about 1-3 ms
    per chunk), so one process caps ``cache build`` at a few hundred chunks/s and an anchored
    training step at a few hundred rows/s. The workers start with ``spawn`` (no fork of a
    process that holds CUDA state and threads) and each gets a copy of the tokenizer: for a stock
    fast tokenizer, its Rust pipeline alone, so a worker imports ``tokenizers`` but neither torch
    nor transformers (first result 0.3 s after the pool is made on a 2-core CPU machine, against
    2.4-2.6 s with them: ``scripts/anchor_pool_startup.py``). Like any
    ``spawn`` pool (a DataLoader's ``num_workers``), it needs scripts to guard their entry point
    with ``if __name__ == "__main__":``. Use it as a context manager or call :meth:`close`.

    Args:
        tokenizer: the base model's tokenizer.
        workers: processes to start (at least 1).
    """

    def __init__(self, tokenizer: Any, workers: int):
        import concurrent.futures as cf
        import multiprocessing as mp

        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"an anchor pool needs at least 1 worker, not {workers!r}")
        self.workers = workers
        self._pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                            initializer=_init_pool_worker, initargs=(_worker_tokenizer(tokenizer),))

    def submit_ids(self, rows: Sequence[Sequence[int]], budget: int, *,
                   left_context: int = DEFAULT_LEFT_CONTEXT) -> list[Any]:
        """Start :func:`anchors_for_ids` on ``rows`` (chunks as token ids), split across the workers;
        :meth:`result` gives the ids in row order."""
        budget = check_budget(budget)
        rows = [list(r) for r in rows]
        step = max(1, -(-len(rows) // self.workers))
        return [self._pool.submit(_pool_ids_task, rows[i: i + step], budget, left_context)
                for i in range(0, len(rows), step)]

    @staticmethod
    def result(futures: Sequence[Any]) -> list[list[int]]:
        """The anchors of rows submitted with :meth:`submit_ids`, in row order."""
        return [ids for fut in futures for ids in fut.result()]

    def question_anchors(self, tasks: Sequence[tuple[str, str, int]], *,
                         window_share: float = DEFAULT_WINDOW_SHARE) -> list[list[int]]:
        """:func:`select_anchors` of each ``(text, question, budget)``, in order; waits for them.

        A text always goes to the same worker, which keeps its spans, so later questions about
        it cost only the choice.
        """
        import zlib

        window_share = check_window_share(window_share)
        tasks = [(str(t), str(q), check_budget(b)) for t, q, b in tasks]
        parts: list[list[int]] = [[] for _ in range(self.workers)]
        for i, (text, _, _) in enumerate(tasks):
            parts[zlib.crc32(text.encode("utf-8", "surrogatepass")) % self.workers].append(i)
        futures = [(idx, self._pool.submit(_pool_question_task, [tasks[i] for i in idx], window_share))
                   for idx in parts if idx]
        out: list[list[int]] = [[] for _ in tasks]
        for idx, fut in futures:
            for i, ids in zip(idx, fut.result()):
                out[i] = ids
        return out

    def close(self) -> None:
        """Stop the workers (work not started is dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "AnchorPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
