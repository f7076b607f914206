"""Evaluation: greedy answers through the serving runners, scored with the task's metric.

The prediction is the first non-empty line of the generated text (skip_special_tokens, stripped):
no target in ../shared/data holds a newline, and the untuned base model rarely stops on its own.
For BLEU/ROUGE tasks, examples with the same input are merged into one with every target as a
reference (E2E lists each input once per reference).

`first_line` and `eval_examples` load no torch (the model imports are deferred), so `prad eval --server`
(training/remote_eval.py) reuses them cheaply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from training.batching import sorted_batches
from training.data import Example, Tokenizer, fit_input, group_by_input
from training.metrics import score
from training.tasks import ACCURACY, TaskSpec, format_prompt

if TYPE_CHECKING:
    from prad.adapters import Adapter
    from prad.model import Model


@dataclass
class EvalResult:
    task: str
    metric: str
    scores: dict[str, float]  # the metric's scores, 0-100 (accuracy also gives num_correct)
    examples: list[Example]
    predictions: list[str]
    wall_s: float

    def to_json(self, num_shown: int = 5) -> dict[str, Any]:
        shown = [{"input": ex.input, "prediction": pred, "references": list(ex.references)}
                 for ex, pred in zip(self.examples[:num_shown], self.predictions, strict=False)]
        return {"task": self.task, "metric": self.metric, "scores": self.scores,
                "num_examples": len(self.examples), "wall_s": round(self.wall_s, 2), "examples": shown}


def eval_examples(examples: list[Example], metric: str) -> list[Example]:
    """Generation metrics score each distinct input once, against all its references."""
    return list(examples) if metric == ACCURACY else group_by_input(examples)


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def generate_answers(model: Model, tokenizer: Tokenizer, adapter: Adapter | None, examples: list[Example],
                     template: str, max_new_tokens: int, batch_size: int, max_prompt_tokens: int | None = None,
                     side: str = "right") -> list[str]:
    """Greedy answer per example (first line of the decoded output), batched by prompt length."""
    from training.decoding import greedy_generate  # torch: imported only when decoding locally

    prompts = [tokenizer(format_prompt(template, fit_input(tokenizer, template, ex.input, max_prompt_tokens, side)))
               .input_ids for ex in examples]
    answers = [""] * len(examples)
    for rows in sorted_batches([len(p) for p in prompts], batch_size):
        outputs = greedy_generate(model, adapter, [prompts[i] for i in rows], max_new_tokens)
        for i, ids in zip(rows, outputs, strict=True):
            answers[i] = first_line(tokenizer.decode(ids, skip_special_tokens=True))
    return answers


def evaluate(model: Model, tokenizer: Tokenizer, adapter: Adapter | None, examples: list[Example],
             spec: TaskSpec, max_new_tokens: int, batch_size: int, max_prompt_tokens: int | None = None,
             side: str = "right") -> EvalResult:
    """Score `examples` (already merged by eval_examples) with spec's template and metric."""
    start_s = time.perf_counter()
    predictions = generate_answers(model, tokenizer, adapter, examples, spec.template, max_new_tokens,
                                   batch_size, max_prompt_tokens, side)
    scores = score(spec.metric, predictions, [ex.target for ex in examples], [ex.references for ex in examples])
    return EvalResult(spec.name, spec.metric, scores, examples, predictions, time.perf_counter() - start_s)
