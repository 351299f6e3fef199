"""Answer-quality metrics for evaluating compressed-prompt QA / generation.

* SQuAD v1.1 style :func:`exact_match` / :func:`f1_score` over
  :func:`normalize_answer`-ed text, with :func:`max_over_golds` for
  multi-reference questions and :func:`squad_scores` as a convenience.
* :func:`rouge_l` (from ``rouge-score``) and sentence-level :func:`bleu` (from
  ``sacrebleu``), the implementations published figures are computed with
  (both in the ``eval`` extra).
* Small helpers: :func:`aggregate` (means over result rows),
  :func:`length_bucket` (bucket labels for context lengths) and
  :func:`first_line_answer` (post-processing of generated short answers).
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Sequence

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


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:  # pragma: no cover - declared in the eval extra
        raise ImportError("ROUGE-L needs the rouge-score package: pip install 'compressor-plugin[eval]'") from exc
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


@functools.lru_cache(maxsize=8)
def _bleu_metric(max_n: int, smooth: bool) -> Any:
    try:
        from sacrebleu.metrics import BLEU
    except ImportError as exc:  # pragma: no cover - declared in the eval extra
        raise ImportError("BLEU needs the sacrebleu package: pip install 'compressor-plugin[eval]'") from exc
    return BLEU(max_ngram_order=max_n, smooth_method="exp" if smooth else "none", effective_order=True)


def rouge_l(prediction: str, reference: str) -> dict[str, float]:
    """Sentence-level ROUGE-L F/precision/recall, as Google's ``rouge-score`` computes it.

    ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)``: lowercased,
    non-alphanumeric characters as separators, no stemming -- the settings most published
    ROUGE-L figures (and Hugging Face ``evaluate``'s default) use. Text with no scorable
    token on either side scores 0.0.

    Returns:
        ``{"precision": float, "recall": float, "f": float}``.
    """
    score = _rouge_l_scorer().score(reference, prediction)["rougeL"]
    return {"precision": float(score.precision), "recall": float(score.recall), "f": float(score.fmeasure)}


def bleu(prediction: str, reference: str, max_n: int = 4, smooth: bool = True) -> float:
    """Sentence-level BLEU against one reference, from ``sacrebleu``, scaled to 0..1.

    sacreBLEU's standard settings (``13a`` tokenisation, case-sensitive), so figures compare
    with published ones; ``smooth=True`` uses its default ``exp`` smoothing for sentence BLEU,
    ``smooth=False`` none. ``max_n`` is the highest n-gram order (orders the prediction is too
    short for are left out). An empty prediction or reference scores 0.0.

    Raises:
        ValueError: if ``max_n < 1``.
    """
    if max_n < 1:
        raise ValueError(f"bleu: max_n must be >= 1, got {max_n}")
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_bleu_metric(int(max_n), bool(smooth)).sentence_score(prediction, [reference]).score) / 100.0


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
