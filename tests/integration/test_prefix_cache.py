"""The prefix cache through the real server: a prompt that shares a task's template with an earlier one
reuses its KV (the hit ending inside the template) and still gets exactly the tokens of a full masked
forward, for every PrAd variant; another version of the task never reuses it."""

from __future__ import annotations

import re

import httpx
import pytest

from launcher.roles import build_app
from launcher.settings import ServeSettings
from prad.adapters import load_adapter
from prad.reference import reference_generate
from tests.helpers import running_server, write_adapter

TEMPLATE = ("You are a careful assistant. Read the review below and answer with one word, positive or "
            "negative, and nothing else.\nReview: {input}\nSentiment:")
INPUTS = ["A warm, funny and moving film.", "Dull, slow and far too long.", "I would watch it again tomorrow."]
VARIANTS = ("prad-pa", "prad-sa", "prad-lora")
MAX_NEW = 4


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-adapters")
    for i, variant in enumerate(VARIANTS):
        write_adapter(root, variant, variant, smollm2.config, smollm2.fingerprint, 40 + i, 0.4, template=TEMPLATE)
    settings = ServeSettings(adapters=root, dtype="float32", device="cpu", max_seq_len=256, admin_token="t",
                             prefix_cache_block_tokens=8, store=tmp_path_factory.mktemp("prefix-store"))
    app = build_app(settings, smollm2)
    with running_server(app) as url:
        yield url, app, root


def _hit_tokens(url: str, task: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf'prad:prefix_cache_hit_tokens_total{{task="{task}"}} ([0-9.e+]+)', text)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_prefixes_give_the_tokens_of_a_full_forward(server, smollm2, variant: str) -> None:
    url, _, root = server
    adapter = load_adapter(root / variant, smollm2.config, smollm2.fingerprint)
    template_ids = smollm2.tokenizer(TEMPLATE.split("{input}")[0]).input_ids
    assert len(template_ids) % 8 != 0  # so a hit of whole 8-token blocks ends inside the template
    before = _hit_tokens(url, variant)
    for text in INPUTS:
        r = httpx.post(f"{url}/generate", json={"task": variant, "input": text, "max_new_tokens": MAX_NEW,
                                                "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text
        ids = smollm2.tokenizer(TEMPLATE.replace("{input}", text)).input_ids
        assert r.json()["token_ids"] == reference_generate(smollm2.model, adapter, ids, MAX_NEW, ignore_eos=True)
    saved = _hit_tokens(url, variant) - before
    assert saved >= 2 * (len(template_ids) // 8) * 8  # the 2nd and 3rd prompts reused the template's blocks


def test_another_version_of_the_task_misses(server, smollm2, tmp_path) -> None:
    url, app, _ = server
    folder = write_adapter(tmp_path, "v2", "prad-pa", smollm2.config, smollm2.fingerprint, 99, 0.4, template=TEMPLATE)
    auth = {"Authorization": "Bearer t"}
    files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "weights": ("adapter.safetensors", (folder / "adapter.safetensors").read_bytes())}
    r = httpx.post(f"{url}/admin/adapters/prad-pa/versions", files=files, data={"activate": "true"}, headers=auth,
                   timeout=60)
    assert r.status_code == 201, r.text
    cache = app.state.engines["prefill"].prefix_cache
    before = cache.stats.hit_tokens
    httpx.post(f"{url}/generate", json={"task": "prad-pa", "input": INPUTS[0], "max_new_tokens": 1}, timeout=120)
    assert cache.stats.hit_tokens == before  # the old version's cached template is not the new one's
    r = httpx.post(f"{url}/generate", json={"task": "prad-pa", "input": INPUTS[1], "max_new_tokens": MAX_NEW,
                                           "ignore_eos": True}, timeout=120)
    adapter = load_adapter(folder, smollm2.config, smollm2.fingerprint)
    ids = smollm2.tokenizer(TEMPLATE.replace("{input}", INPUTS[1])).input_ids
    assert r.json()["token_ids"] == reference_generate(smollm2.model, adapter, ids, MAX_NEW, ignore_eos=True)
    assert cache.stats.hit_tokens > before  # hit on the new version's own first prompt, not the old one's
    n, _ = cache.lookup(r.json()["adapter_version"], ids)
    assert n > 0
