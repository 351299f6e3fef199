"""Hand-computed tests for compressor_plugin.evaluation.metrics (ROUGE-L and BLEU: rouge-score and sacreBLEU)."""

from __future__ import annotations

import math

import pytest

from compressor_plugin.evaluation.metrics import (
    aggregate,
    bleu,
    exact_match,
    f1_score,
    first_line_answer,
    length_bucket,
    max_over_golds,
    normalize_answer,
    rouge_l,
    squad_scores,
)


# ---------------------------------------------------------------- SQuAD


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The  Cat, sat!", "cat sat"),
        ("An apple a day", "apple day"),
        ("  the   THE  ", ""),
        ("theater", "theater"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("rock-n-roll", "rocknroll"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match() -> None:
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("a cat", "the cat.") == 1.0
    assert exact_match("cats", "cat") == 0.0
    assert exact_match("", "") == 1.0


def test_f1_known_pairs() -> None:
    # "big cat" vs "big dog": 1 common token, P = R = 1/2
    assert f1_score("the big cat", "a big dog") == pytest.approx(0.5)
    # pred 3 tokens, gold 1 token, 1 common: P=1/3, R=1 -> F1 = 2*(1/3)/(4/3) = 1/2
    assert f1_score("paris in france", "Paris") == pytest.approx(0.5)
    # pred 1, gold 4, 1 common: P=1, R=1/4 -> 2/5
    assert f1_score("Einstein", "Albert Einstein the physicist was") == pytest.approx(
        2 * 1 * 0.25 / 1.25
    )
    # multiset overlap is clipped:
    # pred [x, x, y], gold [x, z]: common = min(2,1)+0 = 1 -> P=1/3, R=1/2 -> F1 = 2/5
    assert f1_score("x x y", "x z") == pytest.approx(0.4)
    assert f1_score("Cat.", "the cat") == 1.0
    assert f1_score("dog", "cat") == 0.0


def test_f1_empty_cases() -> None:
    assert f1_score("", "") == 1.0
    assert f1_score("the", "a!") == 1.0  # both normalise to empty
    assert f1_score("", "cat") == 0.0
    assert f1_score("cat", "") == 0.0


def test_max_over_golds_and_squad_scores() -> None:
    golds = ["a big dog", "the big cat sat", "Big Cat"]
    assert max_over_golds(exact_match, "the big cat", golds) == 1.0
    assert max_over_golds(f1_score, "big cat", ["big dog", "big cat sat"]) == pytest.approx(
        0.8  # vs "big cat sat": P=1, R=2/3 -> 0.8; vs "big dog": 0.5
    )
    scores = squad_scores("big cat", ["big dog", "big cat sat"])
    assert scores == {"em": 0.0, "f1": pytest.approx(0.8)}
    assert squad_scores("Big cat!", ["dog", "the big cat"]) == {"em": 1.0, "f1": 1.0}
    # a bare string is one gold, not a sequence of characters
    assert max_over_golds(exact_match, "cat", "cat") == 1.0


def test_empty_golds_raises() -> None:
    with pytest.raises(ValueError, match="golds"):
        max_over_golds(f1_score, "x", [])
    with pytest.raises(ValueError):
        squad_scores("x", [])


# ---------------------------------------------------------------- ROUGE-L


def test_rouge_l_hand_computed() -> None:
    # LCS = "the cat on the mat" (5); pred 6 tokens, ref 7 tokens
    r = rouge_l("The cat sat on the mat", "the cat was on the mat today")
    assert r["precision"] == pytest.approx(5 / 6)
    assert r["recall"] == pytest.approx(5 / 7)
    assert r["f"] == pytest.approx(10 / 13)  # 2*L/(m+n)


def test_rouge_l_order_matters_and_symmetry() -> None:
    # LCS of [a b c d] and [b a d c] is 2 (e.g. "a c" / "b d")
    r = rouge_l("a b c d", "b a d c")
    assert r == {"precision": 0.5, "recall": 0.5, "f": 0.5}
    # swapping arguments swaps precision/recall (exercises the min-memory swap)
    r1 = rouge_l("x a y b z c", "a b c")
    r2 = rouge_l("a b c", "x a y b z c")
    assert r1["precision"] == pytest.approx(0.5) and r1["recall"] == 1.0
    assert r2["precision"] == 1.0 and r2["recall"] == pytest.approx(0.5)
    assert r1["f"] == pytest.approx(r2["f"]) == pytest.approx(2 / 3)


def test_rouge_l_edge_cases() -> None:
    assert rouge_l("", "") == {"precision": 0.0, "recall": 0.0, "f": 0.0}  # as rouge-score scores it
    assert rouge_l("", "cat") == {"precision": 0.0, "recall": 0.0, "f": 0.0}
    assert rouge_l("cat", "  ") == {"precision": 0.0, "recall": 0.0, "f": 0.0}
    assert rouge_l("dog", "cat") == {"precision": 0.0, "recall": 0.0, "f": 0.0}
    assert rouge_l("Same words here", "same WORDS here")["f"] == 1.0


def test_rouge_l_tokenises_as_rouge_score_does() -> None:
    # punctuation separates tokens and is not scored; no stemming
    assert rouge_l("cat,dog.", "cat dog")["f"] == 1.0
    assert rouge_l("Paris (France)", "paris france")["f"] == 1.0
    assert rouge_l("cats", "cat")["f"] == 0.0


def test_rouge_l_long_inputs() -> None:
    a = " ".join(f"w{i}" for i in range(1000))
    b = " ".join(f"w{i}" for i in range(0, 1000, 2))  # subsequence of a, 500 tokens
    r = rouge_l(a, b)
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == 1.0


# ---------------------------------------------------------------- BLEU


def test_bleu_identical_is_one() -> None:
    s = "the quick brown fox jumps over the lazy dog"
    assert bleu(s, s) == pytest.approx(1.0)
    assert bleu(s, s, smooth=False) == pytest.approx(1.0)


def test_bleu_disjoint() -> None:
    assert bleu("alpha beta gamma delta", "one two three four") < 0.1
    assert bleu("alpha beta gamma delta", "one two three four", smooth=False) == 0.0


def test_bleu_empty() -> None:
    assert bleu("", "the cat") == 0.0
    assert bleu("the cat", "") == 0.0
    assert bleu("", "") == 0.0


def test_bleu_brevity_penalty() -> None:
    # prediction is a 6-token prefix of a 9-token reference: all p_n = 1
    ref = "the quick brown fox jumps over the lazy dog"
    pred = "the quick brown fox jumps over"
    expected = math.exp(1 - 9 / 6)
    assert bleu(pred, ref) == pytest.approx(expected)
    assert bleu(pred, ref, smooth=False) == pytest.approx(expected)
    # a longer prediction gets no brevity penalty: ref is a prefix of pred
    # p1 = 6/9, p2 = 5/8, p3 = 4/7, p4 = 3/6 (unsmoothed)
    long_expected = (6 / 9 * 5 / 8 * 4 / 7 * 3 / 6) ** 0.25
    assert bleu(ref, pred, smooth=False) == pytest.approx(long_expected)


def test_bleu_smoothing_hand_computed() -> None:
    # pred [a b c d e], ref [a b x d e], c = r = 5 -> BP = 1
    # sacreBLEU "exp" smoothing: the i-th zero precision becomes 1 / (2**i * total)
    # p1 = 4/5; p2 = 2/4; p3 = 0/3 -> 1/(2*3); p4 = 0/2 -> 1/(4*2)
    expected = (4 / 5 * 2 / 4 * 1 / 6 * 1 / 8) ** 0.25
    assert bleu("a b c d e", "a b x d e") == pytest.approx(expected)
    assert bleu("a b c d e", "a b x d e", smooth=False) == 0.0
    # unsmoothed with max_n=2: sqrt(4/5 * 2/4)
    assert bleu("a b c d e", "a b x d e", max_n=2, smooth=False) == pytest.approx(
        math.sqrt(0.4)
    )


def test_bleu_short_prediction() -> None:
    # a 2-token prediction has no 3/4-grams: those orders are left out (effective order);
    # p1 = p2 = 1, BP = exp(1 - 3/2)
    assert bleu("the cat", "the cat sat") == pytest.approx(math.exp(-0.5))
    assert bleu("the cat", "the cat sat", smooth=False) == pytest.approx(math.exp(-0.5))


def test_bleu_is_case_sensitive_and_tokenises_punctuation() -> None:
    # sacreBLEU's standard 13a tokenisation splits punctuation off; case matters
    assert bleu("the cat sat on the mat.", "the cat sat on the mat .") == pytest.approx(1.0)
    assert bleu("The Cat sat on the mat", "the cat sat on the mat") < 0.7


def test_bleu_clipping() -> None:
    # "the the the the" vs "the cat": clipped unigram precision 1/4, max_n=1, BP=1
    assert bleu("the the the the", "the cat", max_n=1) == pytest.approx(0.25)


def test_bleu_bad_max_n() -> None:
    with pytest.raises(ValueError):
        bleu("a", "a", max_n=0)


# ---------------------------------------------------------------- helpers


def test_aggregate() -> None:
    rows = [{"em": 1.0, "f1": 1.0}, {"em": 0.0, "f1": 0.5}, {"em": 0.0, "f1": 0.0}]
    out = aggregate(rows, ["em", "f1"])
    assert out["em"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(0.5)
    assert out["n"] == 3
    assert aggregate(rows, "em") == {"em": pytest.approx(1 / 3), "n": 3}
    empty = aggregate([], ["em"])
    assert empty["n"] == 0 and math.isnan(empty["em"])
    with pytest.raises(KeyError):
        aggregate(rows, ["rouge"])


@pytest.mark.parametrize(
    "n, label",
    [
        (0, "<=96"),
        (96, "<=96"),
        (97, "<=192"),
        (192, "<=192"),
        (193, "<=288"),
        (288, "<=288"),
        (384, "<=384"),
        (385, "<=512"),
        (512, "<=512"),
        (513, ">512"),
        (10_000, ">512"),
    ],
)
def test_length_bucket_default_edges(n: int, label: str) -> None:
    assert length_bucket(n) == label


def test_length_bucket_custom_and_invalid() -> None:
    assert length_bucket(10, edges=(10, 20)) == "<=10"
    assert length_bucket(21, edges=(10, 20)) == ">20"
    with pytest.raises(ValueError):
        length_bucket(5, edges=())
    with pytest.raises(ValueError):
        length_bucket(5, edges=(20, 10))
    with pytest.raises(ValueError):
        length_bucket(-1)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Paris", "Paris"),
        ("  Paris.  ", "Paris"),
        ('"Paris."\nBecause it is the capital.', "Paris"),
        ('"Paris".', "Paris"),
        ("\n\n Albert Einstein\nHe was a physicist.", "Albert Einstein"),
        ("“Marie Curie”", "Marie Curie"),
        ("'1969'", "1969"),
        ("the Smiths'", "the Smiths'"),  # lone apostrophe kept
        ("3.14", "3.14"),  # inner period kept
        ("", ""),
        ("   \n  ", ""),
        ("Paris\r\nFrance", "Paris"),
    ],
)
def test_first_line_answer(raw: str, expected: str) -> None:
    assert first_line_answer(raw) == expected
