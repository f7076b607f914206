"""Task data: JSON Lines examples, train/dev splits, and their encoding into prompt + target tokens.

Encoding conventions (docs/training.md):
* prompt = template(input) tokenized exactly as the server tokenizes a request (`tokenizer(text)`);
  target = TARGET_PREFIX + target tokenized without special tokens, then EOS.
* `max_prompt_tokens` caps the whole templated prompt. The *input text* is cut (from the right by
  default: its beginning is kept; `side="left"` keeps its end) and the prompt re-tokenized, so the
  template's answer cue always survives and the ids are what the server would produce for that text.
* `max_target_tokens` caps target + EOS; a target cut short loses its EOS (we never teach the model
  to stop mid-answer).
* Tasks without a dev file get one carved from train: whole groups of equal inputs (E2E repeats
  each input with several targets), so no dev input is ever trained on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from training.tasks import TARGET_PREFIX, format_prompt

SPLIT_SEED = 0  # fixed, so `prad train` and `prad eval` agree on carved dev sets and dev subsets
MAX_CARVED_DEV = 500
TRUNCATION_SIDES = ("right", "left")


class Tokenizer(Protocol):
    """The slice of a transformers tokenizer we use."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> Any: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclass(frozen=True)
class Example:
    input: str
    target: str
    references: tuple[str, ...]  # every acceptable output (target first); (target,) when the file has none


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: list[int]  # templated prompt: the adapter applies here (PrAd)
    target_ids: list[int]  # answer tokens, then EOS unless truncated: the loss applies here

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def read_jsonl(path: Path) -> list[Example]:
    """Examples with `input` and `target` (and optional `references`); bad lines raise naming the line."""
    examples = []
    with Path(path).open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                target = str(raw["target"])
                refs = tuple(str(r) for r in raw.get("references") or ()) or (target,)
                examples.append(Example(str(raw["input"]), target, refs))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with 'input' and 'target' ({e})") from e
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def group_by_input(examples: list[Example]) -> list[Example]:
    """One example per distinct input, its references the union of all its targets/references."""
    groups: dict[str, list[str]] = {}
    targets: dict[str, str] = {}
    for ex in examples:
        refs = groups.setdefault(ex.input, [])
        targets.setdefault(ex.input, ex.target)
        for ref in (ex.target, *ex.references):
            if ref not in refs:
                refs.append(ref)
    return [Example(text, targets[text], tuple(refs)) for text, refs in groups.items()]


def carve_dev(examples: list[Example], seed: int = SPLIT_SEED) -> tuple[list[Example], list[Example]]:
    """(train, dev): dev = min(500, 10%) of the distinct inputs, every example of an input on one side."""
    inputs = sorted({ex.input for ex in examples})
    random.Random(seed).shuffle(inputs)
    dev_inputs = set(inputs[: min(MAX_CARVED_DEV, max(1, len(inputs) // 10))])
    train = [ex for ex in examples if ex.input not in dev_inputs]
    return train, [ex for ex in examples if ex.input in dev_inputs]


def load_splits(data: Path) -> tuple[list[Example], list[Example]]:
    """(train, dev) from a task folder: train.jsonl + dev.jsonl, or dev carved from train."""
    data = Path(data)
    if not (data / "train.jsonl").is_file():
        raise ValueError(f"--data {data}: expected a folder with train.jsonl (and optionally dev.jsonl)")
    train = read_jsonl(data / "train.jsonl")
    if (data / "dev.jsonl").is_file():
        return train, read_jsonl(data / "dev.jsonl")
    return carve_dev(train)


def load_eval_examples(data: Path) -> list[Example]:
    """A JSONL file as is, or a task folder's dev split (the same one `prad train` uses)."""
    data = Path(data)
    return load_splits(data)[1] if data.is_dir() else read_jsonl(data)


def subset(examples: list[Example], num: int | None, seed: int = SPLIT_SEED) -> list[Example]:
    """A seeded random `num` of the examples (all when num is None or larger), in a fixed order."""
    if num is None or num >= len(examples):
        return list(examples)
    picked = list(examples)
    random.Random(seed).shuffle(picked)
    return picked[:num]


def fit_input(tokenizer: Tokenizer, template: str, text: str, max_prompt_tokens: int | None,
              side: str = "right") -> str:
    """`text` cut (from `side`) until the templated prompt has at most max_prompt_tokens tokens."""
    if max_prompt_tokens is None:
        return text
    overflow = len(tokenizer(format_prompt(template, text)).input_ids) - max_prompt_tokens
    if overflow <= 0:
        return text
    if len(tokenizer(format_prompt(template, "")).input_ids) > max_prompt_tokens:
        raise ValueError(f"template {template!r} alone exceeds {max_prompt_tokens} prompt tokens")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    # Re-tokenizing the joined prompt can merge tokens differently: cut, check, repeat.
    while overflow > 0:
        keep = max(0, len(ids) - overflow)
        ids = ids[:keep] if side == "right" else ids[len(ids) - keep:]
        text = tokenizer.decode(ids)
        overflow = len(tokenizer(format_prompt(template, text)).input_ids) - max_prompt_tokens
        if keep == 0:
            break
    return text


def encode(tokenizer: Tokenizer, template: str, example: Example, eos_id: int, max_prompt_tokens: int | None,
           max_target_tokens: int | None, side: str = "right") -> EncodedExample:
    text = fit_input(tokenizer, template, example.input, max_prompt_tokens, side)
    prompt_ids = list(tokenizer(format_prompt(template, text)).input_ids)
    target_ids = [*tokenizer(TARGET_PREFIX + example.target, add_special_tokens=False).input_ids, eos_id]
    if max_target_tokens is not None:
        target_ids = target_ids[:max_target_tokens]
    if not prompt_ids or not target_ids:
        raise ValueError(f"example {example.input[:40]!r}: empty prompt or target after encoding")
    return EncodedExample(prompt_ids, target_ids)
