"""Attack metrics against hand-computed cases."""

from __future__ import annotations

import pytest

from securefed.attacks.metrics import score_bag, score_texts, token_accuracy


def test_identical_batch_scores_one_in_any_order():
    refs = ["the plot is thin", "a warm and funny film"]
    s = score_texts(list(reversed(refs)), refs)  # Hungarian matching undoes the order
    assert (s.rouge1, s.rouge2, s.rougeL, s.token_accuracy, s.exact_match) == (1.0, 1.0, 1.0, 1.0, 1.0)


def test_rouge_by_hand():
    # ref: "the cat sat down" (4 unigrams, 3 bigrams); pred: "the cat ran" (3 unigrams, 2 bigrams)
    # ROUGE-1: overlap 2 -> P 2/3, R 2/4, F = 2PR/(P+R) = 4/7
    # ROUGE-2: overlap 1 ("the cat") -> P 1/2, R 1/3, F = 2/5
    # ROUGE-L: LCS "the cat" = 2 -> same as ROUGE-1 here, 4/7
    # token accuracy: positions 0,1 match of 4 reference words -> 0.5
    s = score_texts(["the cat ran"], ["the cat sat down"])
    assert s.rouge1 == pytest.approx(4 / 7)
    assert s.rouge2 == pytest.approx(2 / 5)
    assert s.rougeL == pytest.approx(4 / 7)
    assert s.token_accuracy == pytest.approx(0.5)
    assert s.exact_match == 0.0


def test_missing_reconstructions_score_zero_for_their_references():
    refs = ["one two three", "four five six"]
    s = score_texts(["four five six"], refs)
    assert s.rouge1 == pytest.approx(0.5) and s.exact_match == pytest.approx(0.5)
    assert s.n_references == 2 and s.n_predictions == 1
    empty = score_texts([], refs)
    assert empty.rouge1 == 0.0 and empty.exact_match == 0.0


def test_hungarian_picks_the_best_assignment_not_the_first():
    refs = ["alpha beta gamma", "alpha beta delta"]
    preds = ["alpha beta delta", "alpha beta gamma"]
    assert score_texts(preds, refs).exact_match == 1.0


def test_surplus_predictions_do_not_raise_the_average():
    refs = ["red green blue"]
    s = score_texts(["red green blue", "junk words here"], refs)
    assert s.rouge1 == 1.0 and s.n_predictions == 2


def test_token_accuracy_by_position():
    assert token_accuracy([1, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.75)
    assert token_accuracy([2, 3, 4], [1, 2, 3]) == 0.0  # shifted by one: nothing in place
    assert token_accuracy([], []) == 1.0


def test_token_accuracy_with_a_tokenizer_callable():
    s = score_texts(["ab cd"], ["ab ce"], tokenize=lambda t: list(t.replace(" ", "")))
    assert s.token_accuracy == pytest.approx(3 / 4)


def test_bag_scores():
    got = score_bag([1, 2, 9], [[1, 2, 2], [3]])
    # reference multiset {1, 2, 2, 3}; bag {1, 2, 9}: overlap 2
    assert got["precision"] == pytest.approx(2 / 3)
    assert got["recall"] == pytest.approx(2 / 4)
    assert got["distinct_recall"] == pytest.approx(2 / 3)
