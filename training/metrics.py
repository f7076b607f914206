"""Task metrics on generated text: accuracy (classification), sacreBLEU (generation), ROUGE (summaries).

Every score is in [0, 100]. Classification compares labels after `normalize_label`: first non-empty
line, lower-cased, whitespace collapsed, punctuation stripped from each word's ends; a prediction is
correct when its first words are the gold label's words ("Positive." and "positive, clearly" both
match "positive"). BLEU is corpus-level sacreBLEU (13a tokenizer) with every reference of an example;
ROUGE-1/2/L are mean F1 (rouge-score, Porter stemmer), each example scored against its best reference.
"""

from __future__ import annotations

import string
from typing import Any

from training.tasks import ACCURACY, BLEU, ROUGE

_EDGE_PUNCTUATION = string.punctuation + "“”‘’«»"


def normalize_label(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    words = (lines[0] if lines else "").lower().split()
    return " ".join(w for w in (word.strip(_EDGE_PUNCTUATION) for word in words) if w)


def label_matches(prediction: str, gold: str) -> bool:
    gold_words = normalize_label(gold).split()
    return bool(gold_words) and normalize_label(prediction).split()[: len(gold_words)] == gold_words


def accuracy(predictions: list[str], golds: list[str]) -> dict[str, float]:
    _same_length(predictions, golds)
    num_correct = sum(label_matches(p, g) for p, g in zip(predictions, golds, strict=True))
    return {"accuracy": 100.0 * num_correct / max(1, len(golds)), "num_correct": float(num_correct)}


def bleu(predictions: list[str], references: list[tuple[str, ...]]) -> dict[str, float]:
    """Corpus sacreBLEU; examples may have different numbers of references."""
    from sacrebleu.metrics import BLEU as SacreBLEU

    _same_length(predictions, references)
    num_streams = max(len(refs) for refs in references)
    # sacreBLEU takes one stream per reference slot; None marks a missing reference.
    streams: list[Any] = [[refs[k] if k < len(refs) else None for refs in references] for k in range(num_streams)]
    return {"bleu": SacreBLEU().corpus_score(predictions, streams).score}


def rouge(predictions: list[str], references: list[tuple[str, ...]]) -> dict[str, float]:
    from rouge_score.rouge_scorer import RougeScorer

    _same_length(predictions, references)
    types = ("rouge1", "rouge2", "rougeL")
    scorer = RougeScorer(list(types), use_stemmer=True)
    totals = dict.fromkeys(types, 0.0)
    for prediction, refs in zip(predictions, references, strict=True):
        best = scorer.score_multi(list(refs), prediction)
        for t in types:
            totals[t] += best[t].fmeasure
    return {t: 100.0 * totals[t] / max(1, len(predictions)) for t in types}


PRIMARY_SCORE = {ACCURACY: "accuracy", BLEU: "bleu", ROUGE: "rougeL"}


def score(metric: str, predictions: list[str], targets: list[str],
          references: list[tuple[str, ...]]) -> dict[str, float]:
    """The task metric's scores; PRIMARY_SCORE[metric] names the one checkpoints are selected by."""
    if metric == ACCURACY:
        return accuracy(predictions, targets)
    if metric == BLEU:
        return bleu(predictions, references)
    if metric == ROUGE:
        return rouge(predictions, references)
    raise ValueError(f"unknown metric {metric!r}")


def _same_length(predictions: list[str], golds: list) -> None:
    if len(predictions) != len(golds) or not golds:
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold examples (need equal, > 0)")
