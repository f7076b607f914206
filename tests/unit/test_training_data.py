"""Training data: tasks and templates, JSONL reading, dev carving, truncation, encoding, batch plans."""

from __future__ import annotations

import itertools
import json
import random
from types import SimpleNamespace

import pytest

from training.batching import batch_stream, bucketed_batches, num_batches_per_epoch, sorted_batches
from training.data import (
    Example,
    carve_dev,
    encode,
    fit_input,
    group_by_input,
    load_eval_examples,
    load_splits,
    read_jsonl,
    subset,
)
from training.loop import linear_schedule
from training.tasks import TASKS, format_prompt, resolve_task

EOS = 0


class CharTokenizer:
    """One token per character (ids = code points); enough to test token budgets exactly."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[ord(c) for c in text])

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in token_ids)


def _write(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_builtin_tasks_and_overrides() -> None:
    assert set(TASKS) == {"sst2", "sick", "agnews", "e2e", "webnlg", "multi30k", "iwslt14", "aeslc", "mr_pattern"}
    assert resolve_task("sst2").metric == "accuracy" and resolve_task("aeslc").metric == "rouge"
    assert resolve_task("e2e", template="MR: {input} =>").template == "MR: {input} =>"
    assert resolve_task("mine", "Q: {input}\nA:", "bleu").metric == "bleu"
    with pytest.raises(ValueError, match="no built-in template"):
        resolve_task("mine")
    with pytest.raises(ValueError, match="exactly once"):
        resolve_task("sst2", template="no placeholder")
    assert format_prompt("Review: {input}\nSentiment:", "fine") == "Review: fine\nSentiment:"


def test_read_jsonl_keeps_references_and_names_bad_lines(tmp_path) -> None:
    _write(tmp_path / "a.jsonl", [{"input": "x", "target": "y", "references": ["y", "z"]},
                                  {"input": "u", "target": "v"}])
    assert read_jsonl(tmp_path / "a.jsonl") == [Example("x", "y", ("y", "z")), Example("u", "v", ("v",))]
    (tmp_path / "bad.jsonl").write_text('{"input": "x", "target": "y"}\n{"input": "no target"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_group_by_input_merges_targets_as_references() -> None:
    rows = [Example("a", "t1", ("t1",)), Example("b", "u", ("u",)), Example("a", "t2", ("t2",)),
            Example("a", "t1", ("t1",))]
    assert group_by_input(rows) == [Example("a", "t1", ("t1", "t2")), Example("b", "u", ("u",))]


def test_carved_dev_never_shares_an_input_with_train(tmp_path) -> None:
    rows = [{"input": f"in{i // 3}", "target": f"out{i}"} for i in range(300)]  # 100 inputs x 3 targets
    _write(tmp_path / "train.jsonl", rows)
    train, dev = load_splits(tmp_path)
    assert len({ex.input for ex in dev}) == 10 and len(train) + len(dev) == 300
    assert not {ex.input for ex in dev} & {ex.input for ex in train}
    assert load_eval_examples(tmp_path) == dev == carve_dev(read_jsonl(tmp_path / "train.jsonl"))[1]
    _write(tmp_path / "dev.jsonl", rows[:4])
    assert len(load_splits(tmp_path)[1]) == 4


def test_subset_is_seeded_and_stable() -> None:
    rows = [Example(str(i), "t", ("t",)) for i in range(50)]
    assert subset(rows, 10) == subset(rows, 10) != subset(rows, 10, seed=1)
    assert subset(rows, 10)[:5] == subset(rows, 5) and subset(rows, None) == rows


@pytest.mark.parametrize("side", ["right", "left"])
def test_fit_input_cuts_the_input_and_keeps_the_template(side: str) -> None:
    tok, template = CharTokenizer(), "In: {input}\nOut:"
    text = fit_input(tok, template, "abcdefghij", 15, side)
    assert text == ("abcdef" if side == "right" else "efghij")
    assert len(format_prompt(template, text)) == 15
    assert fit_input(tok, template, "abc", 15, side) == "abc"
    with pytest.raises(ValueError, match="alone exceeds"):
        fit_input(tok, template, "abc", 5, side)


def test_encode_adds_prefix_and_eos_and_truncates_targets() -> None:
    tok, template = CharTokenizer(), "{input}:"
    ex = Example("hello", "yes", ("yes",))
    enc = encode(tok, template, ex, EOS, max_prompt_tokens=4, max_target_tokens=8)
    assert enc.prompt_ids == [ord(c) for c in "hel:"]
    assert enc.target_ids == [ord(c) for c in " yes"] + [EOS]
    cut = encode(tok, template, ex, EOS, max_prompt_tokens=None, max_target_tokens=3)
    assert cut.target_ids == [ord(c) for c in " ye"]  # cut short: no EOS taught


def test_bucketed_batches_cover_every_index_once_with_similar_lengths() -> None:
    lengths = [random.Random(i).randint(5, 300) for i in range(1000)]
    batches = bucketed_batches(lengths, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(1 <= len(b) <= 8 for b in batches) and len(batches) == num_batches_per_epoch(1000, 8)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 15  # random batches would spread ~230 tokens
    assert bucketed_batches(lengths, 8, random.Random(0)) == batches


def test_batch_stream_reshuffles_each_epoch_and_sorted_batches_are_longest_first() -> None:
    lengths = list(range(10))
    stream = batch_stream(lengths, 3, seed=0)
    first, second = [next(stream) for _ in range(4)], [next(stream) for _ in range(4)]
    assert sorted(i for b in first for i in b) == sorted(i for b in second for i in b) == lengths
    assert first != second
    assert sorted_batches([3, 9, 1, 5], 2) == [[1, 3], [0, 2]]


def test_linear_schedule_warms_up_then_decays_to_zero() -> None:
    factor = linear_schedule(100, 0.1)
    values = [factor(s) for s in range(100)]
    assert values[0] > 0 and values[9] < 1 and values[10] == 1.0
    assert all(a <= b for a, b in itertools.pairwise(values[:11]))
    assert all(a >= b for a, b in itertools.pairwise(values[10:])) and values[-1] == pytest.approx(1 / 90)


def test_smoothed_is_a_trailing_mean() -> None:
    from training.plots import smoothed

    assert smoothed([4.0, 2.0, 0.0, 2.0], 2) == [4.0, 3.0, 1.0, 1.0]
    assert smoothed([1.0, 3.0], 5) == [1.0, 2.0]
    assert smoothed([], 3) == []
