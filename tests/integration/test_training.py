"""`prad train` on a tiny SST-2 slice with the real SmolLM2 (fp32): the loss falls, the checkpoint is in
the server's format, and the server's answers to "input" requests == the reference generation."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from launcher.cli import build_parser
from launcher.roles import build_app
from launcher.settings import ServeSettings
from launcher.train_cli import cmd_eval, cmd_train
from prad.adapters import load_adapter
from prad.reference import reference_generate
from tests.helpers import running_server
from training.data import encode, read_jsonl
from training.evaluate import first_line, generate_answers
from training.loop import mean_loss
from training.objective import Objective
from training.run import TrainArgs, run_training
from training.tasks import TASKS, format_prompt

SST2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"
TASK = "sst2-pa"
TEMPLATE = TASKS["sst2"].template
HAND_MADE = [("a gorgeous , witty , seductive movie", "positive"), ("the plot is nothing but boilerplate", "negative"),
             ("an utterly charming and hilarious film", "positive"), ("it 's a bore from start to finish", "negative")]


def _slice(folder: Path, split: str, num: int) -> None:
    """The first lines of the real split, or hand-made examples when ../shared/data is absent."""
    src = SST2 / f"{split}.jsonl"
    if src.is_file():
        with src.open() as f:
            lines = [next(f) for _ in range(num)]
    else:
        lines = [json.dumps({"input": x, "target": y}) + "\n" for x, y in (HAND_MADE * num)[:num]]
    (folder / f"{split}.jsonl").write_text("".join(lines))


@pytest.fixture(scope="module")
def trained(smollm2, tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("training")
    data = root / "sst2"
    data.mkdir()
    _slice(data, "train", 8)
    _slice(data, "dev", 2)
    args = TrainArgs(data=data, out=root / "adapters" / TASK, variant="prad-pa", rank=8, lr=1e-2, batch_size=4,
                     max_input_tokens=40, max_target_tokens=3, steps=4, eval_samples=2, show_progress=False)
    return data, root / "adapters", run_training(args, smollm2)


def test_a_few_steps_lower_the_loss_and_save_in_server_format(trained, smollm2) -> None:
    data, adapters, summary = trained
    adapter = load_adapter(adapters / TASK, smollm2.config, smollm2.fingerprint)
    assert adapter.version == summary["version"] and adapter.config.variant == "prad-pa"
    assert adapter.config.prompt_template == TEMPLATE
    meta = adapter.config.metadata
    assert meta["task"] == "sst2" and meta["training"]["lr"] == 1e-2 and meta["num_steps"] == 4
    assert meta["best"]["step"] == 4 and "accuracy" in meta["best"]["scores"] and meta["train_wall_s"] > 0
    examples = [encode(smollm2.tokenizer, TEMPLATE, ex, 2, 40, 3) for ex in read_jsonl(data / "train.jsonl")]
    objective = Objective(smollm2.model)
    before, after = mean_loss(objective, None, examples, 8), mean_loss(objective, adapter, examples, 8)
    assert after < 0.5 * before, (before, after)
    record = json.loads((adapters / TASK / "training_log.json").read_text())
    assert len(record["losses"]) == 4 and record["primary_score"] == "accuracy"
    assert [h["step"] for h in record["history"]] == [4] and "accuracy" in record["history"][0]["scores"]
    assert (adapters / TASK / "training.png").stat().st_size > 0 and len(summary["record"]) == 2


def test_served_answers_equal_reference_and_eval(trained, smollm2) -> None:
    data, adapters, _ = trained
    adapter = load_adapter(adapters / TASK, smollm2.config, smollm2.fingerprint)
    inputs = [ex.input for ex in read_jsonl(data / "dev.jsonl")]
    settings = ServeSettings(adapters=adapters, dtype="float32", device="cpu", max_seq_len=256)
    with running_server(build_app(settings, smollm2)) as url:
        served = [httpx.post(url + "/generate", json={"task": TASK, "input": x, "max_new_tokens": 4}, timeout=120)
                  .json() for x in inputs]
        completion = httpx.post(url + "/v1/completions", json={"model": TASK, "input": inputs[0], "max_tokens": 4,
                                                                "temperature": 0}, timeout=120)
        both = httpx.post(url + "/v1/completions", json={"model": TASK, "input": "x", "prompt": "y"}, timeout=120)
    base = []
    for x, got in zip(inputs, served, strict=True):
        prompt_ids = smollm2.tokenizer(format_prompt(TEMPLATE, x)).input_ids
        assert got["token_ids"] == reference_generate(smollm2.model, adapter, prompt_ids, 4)
        base.append(reference_generate(smollm2.model, None, prompt_ids, 4))
    assert [got["token_ids"] for got in served] != base  # the trained adapter changed the answers
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"] == served[0]["text"]
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    answers = generate_answers(smollm2.model, smollm2.tokenizer, adapter, read_jsonl(data / "dev.jsonl"), TEMPLATE, 4,
                               batch_size=2)
    assert answers == [first_line(got["text"]) for got in served]


def test_cli_wires_train_and_eval() -> None:
    train = build_parser().parse_args(
        ["train", "--data", "d", "--out", "o", "--variant", "lora", "--rank", "4", "--lr", "1e-3", "--epochs", "1",
         "--batch-size", "8", "--max-input-tokens", "64", "--max-target-tokens", "8", "--dtype", "bfloat16"])
    assert train.func is cmd_train and train.epochs == 1.0 and train.steps is None
    evaluation = build_parser().parse_args(["eval", "--adapter", "base", "--data", "f.jsonl", "--task", "sst2"])
    assert evaluation.func is cmd_eval and evaluation.max_samples is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--variant", "prad-pa", "--rank", "4",
                                   "--lr", "1e-3", "--epochs", "1", "--steps", "3", "--batch-size", "8",
                                   "--max-input-tokens", "64", "--max-target-tokens", "8"])
