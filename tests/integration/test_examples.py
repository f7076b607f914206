"""The example adapters `make serve` serves (examples/adapters): they load against the real default
model (so a drift of its fingerprint fails here, not in front of a new user), they are served, and
they do their task on held-out examples from ../shared/data's dev splits."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from launcher.roles import build_app
from launcher.settings import ServeSettings
from prad.adapters import load_adapter
from prad.reference import reference_generate
from tests.helpers import running_server
from training.tasks import format_prompt

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "adapters"
TASKS = ("sst2", "e2e", "multi30k")


@pytest.fixture(scope="module")
def url(smollm2):
    settings = ServeSettings(adapters=EXAMPLES, dtype="float32", device="cpu", max_seq_len=256)
    with running_server(build_app(settings, smollm2)) as base_url:
        yield base_url


def _answer(url: str, task: str, text: str, max_new_tokens: int) -> dict:
    resp = httpx.post(url + "/generate", json={"task": task, "input": text, "max_new_tokens": max_new_tokens},
                      timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize("task", TASKS)
def test_example_adapter_loads_against_the_default_model(task: str, smollm2) -> None:
    adapter = load_adapter(EXAMPLES / task, smollm2.config, smollm2.fingerprint)  # refuses a foreign fingerprint
    assert adapter.config.variant == "prad-pa" and adapter.config.prompt_template
    meta = adapter.config.metadata
    assert meta["task"] == task and meta["best"]["scores"] and meta["num_steps"] > 0


def test_make_serve_lists_the_examples(url: str) -> None:
    tasks = {t["task"] for t in httpx.get(url + "/tasks", timeout=10).json()["tasks"]}
    assert set(TASKS) <= tasks


def test_sst2_classifies_obvious_reviews(url: str) -> None:
    reviews = {"a moving , beautifully acted and often very funny film .": "positive",
               "an utterly tedious , clumsy mess with nothing to say .": "negative",
               "one of the most delightful movies of the year .": "positive",
               "the plot is boring and the jokes fall flat .": "negative"}
    for review, label in reviews.items():
        assert _answer(url, "sst2", review, 3)["text"].strip().lower().startswith(label), review


def test_e2e_describes_the_restaurant_it_is_given(url: str) -> None:
    got = _answer(url, "e2e", "name[The Punter], eatType[pub], food[Italian], area[riverside]", 48)["text"]
    assert "The Punter" in got and sum(v in got for v in ("pub", "Italian", "riverside")) >= 2, got


def test_multi30k_translates_into_english(url: str) -> None:
    """A weak translator (BLEU ~16, docs/training.md), but it answers in English about the right subject."""
    got = _answer(url, "multi30k", "Ein Mann fährt mit dem Fahrrad.", 24)["text"].lower()
    words = set(got.replace(".", " ").split())
    assert "man" in words and not words & {"ein", "mann", "mit", "dem", "fährt"}, got


def test_example_served_output_equals_reference(url: str, smollm2) -> None:
    adapter = load_adapter(EXAMPLES / "e2e", smollm2.config, smollm2.fingerprint)
    text = "name[Blue Spice], eatType[coffee shop], area[city centre]"
    got = _answer(url, "e2e", text, 12)
    prompt_ids = smollm2.tokenizer(format_prompt(adapter.config.prompt_template, text)).input_ids
    assert got["token_ids"] == reference_generate(smollm2.model, adapter, prompt_ids, 12)


def test_example_configs_are_plain_json_with_no_local_paths() -> None:
    for task in TASKS:
        config = json.loads((EXAMPLES / task / "adapter_config.json").read_text())
        assert "/tmp/" not in json.dumps(config), task
