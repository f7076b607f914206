"""Evaluation metrics on hand-made examples: label accuracy, BLEU with multiple references, ROUGE."""

from __future__ import annotations

import math

import pytest

from training.evaluate import first_line
from training.metrics import accuracy, bleu, label_matches, normalize_label, rouge, score


def test_label_normalisation_and_matching() -> None:
    assert normalize_label("  Positive.\nThe review is glowing") == "positive"
    assert normalize_label('"Sci/Tech"') == "sci/tech"
    assert label_matches(" positive, clearly", "positive")
    assert label_matches("Sci/Tech news", "Sci/Tech")
    assert not label_matches("positively", "positive")
    assert not label_matches("negative", "positive")
    assert not label_matches("", "positive")
    assert first_line("\n  entailment \nneutral") == "entailment"


def test_accuracy_counts_matches() -> None:
    got = accuracy(["positive", "Negative.", "neutral", "sports"], ["positive", "negative", "positive", "Sports"])
    assert got == {"accuracy": 75.0, "num_correct": 3.0}
    with pytest.raises(ValueError, match="3 predictions for 2"):
        accuracy(["a", "b", "c"], ["a", "b"])


def test_bleu_perfect_and_uses_every_reference() -> None:
    hyps = ["the cat sat on the mat today", "a dog runs in the green park"]
    assert bleu(hyps, [(hyps[0],), (hyps[1],)])["bleu"] == pytest.approx(100.0)
    # The second hypothesis matches only its second reference: with both references it is perfect
    # again; with the first reference alone it is not.
    multi = [(hyps[0],), ("one dog is running through a park", hyps[1])]
    assert bleu(hyps, multi)["bleu"] == pytest.approx(100.0)
    single = bleu(hyps, [(hyps[0],), (multi[1][0],)])["bleu"]
    assert 0 < single < 90


def test_bleu_hand_computed_brevity_penalty() -> None:
    hyp = ["the quick brown fox jumps"]
    ref = [("the quick brown fox jumps over",)]
    # every n-gram precision is 1 (5/5, 4/4, 3/3, 2/2); 5 tokens vs 6: brevity penalty exp(1 - 6/5)
    assert bleu(hyp, ref)["bleu"] == pytest.approx(100 * math.exp(1 - 6 / 5), abs=1e-6)


def test_rouge_hand_computed_and_best_reference() -> None:
    got = rouge(["the cat sat"], [("the cat sat on the mat",)])
    # unigrams: P 3/3, R 3/6 -> F 2/3; bigrams: P 2/2, R 2/5 -> F 4/7; LCS 3 -> as unigrams
    assert got["rouge1"] == pytest.approx(200 / 3)
    assert got["rouge2"] == pytest.approx(400 / 7)
    assert got["rougeL"] == pytest.approx(200 / 3)
    best = rouge(["the cat sat"], [("a dog ran", "the cat sat")])
    assert best == {"rouge1": pytest.approx(100.0), "rouge2": pytest.approx(100.0), "rougeL": pytest.approx(100.0)}


def test_score_dispatches_by_metric() -> None:
    assert score("accuracy", ["yes"], ["yes"], [("yes",)])["accuracy"] == 100.0
    assert set(score("rouge", ["a b"], ["a b"], [("a b",)])) == {"rouge1", "rouge2", "rougeL"}
    with pytest.raises(ValueError, match="unknown metric"):
        score("f1", ["a"], ["a"], [("a",)])
