"""Built-in tasks: the prompt template each one is trained and served with, and its metric.

A template holds `{input}` once and ends right before the answer; the target follows after
TARGET_PREFIX (a single space), so an answer starts with a word-initial token (" positive"), exactly
what greedy decoding produces after the prompt. The template is saved in the adapter's config, so the
server formats `"input"` requests the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

ACCURACY = "accuracy"
BLEU = "bleu"
ROUGE = "rouge"
METRICS = (ACCURACY, BLEU, ROUGE)
TARGET_PREFIX = " "


@dataclass(frozen=True)
class TaskSpec:
    name: str  # task id, usually the data folder's name
    template: str  # prompt template with one "{input}"
    metric: str  # one of METRICS
    max_new_tokens: int  # default generation budget when evaluating


_CLASSIFY_TOKENS = 8
DEFAULT_GENERATE_TOKENS = 64

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("sst2", "Review: {input}\nSentiment (positive or negative):", ACCURACY, _CLASSIFY_TOKENS),
    TaskSpec("mr_pattern", "Review: {input}\nSentiment (positive or negative):", ACCURACY, _CLASSIFY_TOKENS),
    TaskSpec("sick", "{input}\nRelation (entailment, neutral or contradiction):", ACCURACY, _CLASSIFY_TOKENS),
    TaskSpec("agnews", "Article: {input}\nTopic (World, Sports, Business or Sci/Tech):", ACCURACY,
             _CLASSIFY_TOKENS),
    TaskSpec("e2e", "Restaurant attributes: {input}\nDescription:", BLEU, 64),
    TaskSpec("webnlg", "Triples: {input}\nText:", BLEU, 64),
    TaskSpec("multi30k", "German: {input}\nEnglish:", BLEU, 64),
    TaskSpec("iwslt14", "German: {input}\nEnglish:", BLEU, 64),
    TaskSpec("aeslc", "Email: {input}\nSubject line:", ROUGE, 32),
)}


def resolve_task(name: str | None, template: str | None = None, metric: str | None = None) -> TaskSpec:
    """The built-in spec for `name`, with `template`/`metric` overriding it; unknown tasks need both."""
    known = TASKS.get(name or "")
    if known is not None:
        spec = TaskSpec(known.name, template or known.template, metric or known.metric, known.max_new_tokens)
    elif template is None or metric is None:
        raise ValueError(f"task {name!r} has no built-in template/metric (built-in: {sorted(TASKS)}); "
                         f"pass --template and --metric")
    else:
        spec = TaskSpec(name or "custom", template, metric, DEFAULT_GENERATE_TOKENS)
    check_template(spec.template)
    if spec.metric not in METRICS:
        raise ValueError(f"metric {spec.metric!r}: expected one of {list(METRICS)}")
    return spec


def check_template(template: str) -> str:
    if template.count("{input}") != 1:
        raise ValueError(f"template {template!r} must contain '{{input}}' exactly once")
    return template


def format_prompt(template: str, text: str) -> str:
    """Exactly what the server does with an "input" request (PrefillService.prepare)."""
    return template.replace("{input}", text)
