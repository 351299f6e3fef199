"""Answer-quality metrics for evaluating compressed-prompt QA / generation.

Pure Python, no third-party dependencies.

* SQuAD v1.1 style :func:`exact_match` / :func:`f1_score` over
  :func:`normalize_answer`-ed text, with :func:`max_over_golds` for
  multi-reference questions and :func:`squad_scores` as a convenience.
* :func:`rouge_l` (LCS-based precision / recall / F1) and sentence-level
  :func:`bleu` over lowercased whitespace tokens.
* Small helpers: :func:`aggregate` (means over result rows),
  :func:`length_bucket` (bucket labels for context lengths) and
  :func:`first_line_answer` (post-processing of generated short answers).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Callable, Iterable, Mapping, Sequence

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1_score",
    "max_over_golds",
    "squad_scores",
    "rouge_l",
    "bleu",
    "aggregate",
    "length_bucket",
    "first_line_answer",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


# --------------------------------------------------------------------------
# SQuAD-style metrics
# --------------------------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Normalise an answer string as in the official SQuAD v1.1 evaluation.

    Steps, in the official order: lowercase, remove ASCII punctuation
    (``string.punctuation``), remove the articles ``a``/``an``/``the`` as
    whole words, and collapse runs of whitespace to single spaces (with
    leading/trailing whitespace removed).

    >>> normalize_answer("The  Cat, sat!")
    'cat sat'
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def _squad_tokens(s: str) -> list[str]:
    return normalize_answer(s).split()


def exact_match(prediction: str, gold: str) -> float:
    """Return 1.0 if the normalised prediction equals the normalised gold, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 between normalised prediction and gold (SQuAD style).

    Tokens are the whitespace-split output of :func:`normalize_answer`;
    overlap is the multiset (bag-of-tokens) intersection.  If both sides
    normalise to no tokens the score is 1.0; if exactly one side is empty
    it is 0.0.
    """
    pred_tokens = _squad_tokens(prediction)
    gold_tokens = _squad_tokens(gold)
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2.0 * precision * recall / (precision + recall)


def max_over_golds(
    metric: Callable[[str, str], float],
    prediction: str,
    golds: Sequence[str],
) -> float:
    """Best score of ``metric(prediction, gold)`` over all gold answers.

    A bare ``str`` passed as ``golds`` is treated as a single gold answer
    (rather than being iterated character by character).

    Raises:
        ValueError: if ``golds`` is empty.
    """
    if isinstance(golds, str):
        golds = [golds]
    if len(golds) == 0:
        raise ValueError("max_over_golds: golds is empty; need at least one gold answer")
    return max(metric(prediction, gold) for gold in golds)


def squad_scores(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """SQuAD EM and F1 of ``prediction`` against the best-matching gold.

    Returns:
        ``{"em": float, "f1": float}``, each maximised independently over
        ``golds``.

    Raises:
        ValueError: if ``golds`` is empty.
    """
    return {
        "em": max_over_golds(exact_match, prediction, golds),
        "f1": max_over_golds(f1_score, prediction, golds),
    }


# --------------------------------------------------------------------------
# ROUGE-L and BLEU
# --------------------------------------------------------------------------


def _simple_tokens(s: str) -> list[str]:
    """Lowercase and split on whitespace (tokenisation for ROUGE-L / BLEU)."""
    return s.lower().split()


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a)*len(b)) time and
    O(min(len(a), len(b))) memory (two DP rows over the shorter sequence)."""
    if len(a) < len(b):
        a, b = b, a  # make b the shorter one: rows have len(b) + 1 cells
    if not b:
        return 0
    prev = [0] * (len(b) + 1)
    cur = [0] * (len(b) + 1)
    for x in a:
        for j, y in enumerate(b, start=1):
            if x == y:
                cur[j] = prev[j - 1] + 1
            else:
                cur[j] = prev[j] if prev[j] >= cur[j - 1] else cur[j - 1]
        prev, cur = cur, prev
    return prev[len(b)]


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    """Sentence-level ROUGE-L (LCS-based) with beta = 1.

    Tokens are lowercased whitespace tokens.  With ``L = LCS(pred, ref)``:
    ``precision = L / len(pred)``, ``recall = L / len(ref)`` and
    ``f = 2 * P * R / (P + R)`` (0.0 when ``L == 0``).

    If both texts are empty all three values are 1.0; if only one is empty
    they are all 0.0.

    Returns:
        ``{"precision": float, "recall": float, "f": float}``.
    """
    pred = _simple_tokens(prediction)
    ref = _simple_tokens(reference)
    if not pred or not ref:
        v = 1.0 if (not pred and not ref) else 0.0
        return {"precision": v, "recall": v, "f": v}
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f": 0.0}
    precision = lcs / len(pred)
    recall = lcs / len(ref)
    f = 2.0 * precision * recall / (precision + recall)
    return {"precision": precision, "recall": recall, "f": f}


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(prediction: str, reference: str, max_n: int = 4, smooth: bool = True) -> float:
    """Sentence-level BLEU against a single reference.

    Lowercased whitespace tokens; clipped (modified) n-gram precisions
    ``p_1 .. p_max_n`` combined by a uniform-weight geometric mean, times the
    brevity penalty ``BP = 1`` if ``c > r`` else ``exp(1 - r / c)`` (``c`` and
    ``r`` are the prediction and reference lengths).

    With ``smooth=True`` the add-one smoothing of Lin & Och (2004) is used:
    for ``n > 1`` both the matched and the total n-gram counts get +1
    (``p_n = (m_n + 1) / (t_n + 1)``); ``p_1`` is never smoothed, so a
    prediction with no unigram in common with the reference still scores 0.
    Without smoothing, any zero precision (including an order with no
    n-grams because the prediction is shorter than ``n``) gives 0.0.

    An empty prediction or an empty reference scores 0.0.

    Raises:
        ValueError: if ``max_n < 1``.
    """
    if max_n < 1:
        raise ValueError(f"bleu: max_n must be >= 1, got {max_n}")
    pred = _simple_tokens(prediction)
    ref = _simple_tokens(reference)
    if not pred or not ref:
        return 0.0

    log_precision_sum = 0.0
    for n in range(1, max_n + 1):
        pred_counts = _ngram_counts(pred, n)
        ref_counts = _ngram_counts(ref, n)
        matches = sum((pred_counts & ref_counts).values())
        total = max(len(pred) - n + 1, 0)
        if smooth and n > 1:
            matches += 1
            total += 1
        if matches == 0 or total == 0:
            return 0.0
        log_precision_sum += math.log(matches / total)

    c, r = len(pred), len(ref)
    brevity_penalty = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity_penalty * math.exp(log_precision_sum / max_n)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def aggregate(rows: Sequence[Mapping[str, float]], keys: Iterable[str]) -> dict[str, float]:
    """Mean of each of ``keys`` over ``rows``, plus ``"n"`` (the row count).

    Every row must contain every key (``KeyError`` otherwise).  With no
    rows, each mean is ``float("nan")`` and ``n`` is 0.  A bare ``str`` for
    ``keys`` is treated as a single key.

    >>> aggregate([{"em": 1.0}, {"em": 0.0}], ["em"])
    {'em': 0.5, 'n': 2}
    """
    if isinstance(keys, str):
        keys = [keys]
    keys = list(keys)
    n = len(rows)
    out: dict[str, float] = {}
    for key in keys:
        if n == 0:
            out[key] = float("nan")
        else:
            out[key] = sum(float(row[key]) for row in rows) / n
    out["n"] = n
    return out


def length_bucket(n_tokens: int, edges: Sequence[int] = (96, 192, 288, 384, 512)) -> str:
    """Label of the length bucket that ``n_tokens`` falls into.

    Buckets are right-closed: ``n <= edges[0]`` -> ``"<=96"``,
    ``edges[i-1] < n <= edges[i]`` -> ``"<={edges[i]}"`` and
    ``n > edges[-1]`` -> ``">512"`` (for the default edges).

    Raises:
        ValueError: if ``edges`` is empty or not strictly increasing, or if
            ``n_tokens`` is negative.
    """
    if not edges:
        raise ValueError("length_bucket: edges must be non-empty")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"length_bucket: edges must be strictly increasing, got {tuple(edges)}")
    if n_tokens < 0:
        raise ValueError(f"length_bucket: n_tokens must be >= 0, got {n_tokens}")
    for edge in edges:
        if n_tokens <= edge:
            return f"<={edge}"
    return f">{edges[-1]}"


_DOUBLE_QUOTES = "\"“”„«»`"
_SINGLE_QUOTE_PAIRS = (("'", "'"), ("‘", "’"))


def _strip_quotes(s: str) -> str:
    s = s.strip().strip(_DOUBLE_QUOTES).strip()
    for left, right in _SINGLE_QUOTE_PAIRS:
        # single quotes only as a matching pair, so "the Smiths'" keeps its apostrophe
        if len(s) >= 2 and s.startswith(left) and s.endswith(right):
            s = s[1:-1].strip()
    return s


def first_line_answer(text: str) -> str:
    """Post-process a generated answer for extractive QA scoring.

    Strips whitespace, keeps only the first line, strips surrounding quotes
    (double / curly / guillemet quotes; single quotes only when they enclose
    the whole answer) and removes one trailing period, e.g.
    ``'  "Paris."\\nBecause ...'`` -> ``'Paris'``.
    """
    s = text.strip()
    if not s:
        return ""
    s = s.splitlines()[0]
    s = _strip_quotes(s)
    if s.endswith("."):
        s = s[:-1].rstrip()
        s = _strip_quotes(s)  # handles '"Paris".'
    return s
