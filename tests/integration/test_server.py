"""The embedded server over real HTTP, real SmolLM2 weights, fp32."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from prad.adapters import load_adapter
from prad.reference import reference_generate
from tests.conftest import TASKS

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
           "List three colours:"]


def gen(url: str, **body) -> dict:
    r = httpx.post(url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def reference(smollm2, adapters_dir: Path, task: str, prompt: str, n: int) -> list[int]:
    adapter = None if task == "base" else load_adapter(adapters_dir / task, smollm2.config, smollm2.fingerprint)
    return reference_generate(smollm2.model, adapter, smollm2.tokenizer(prompt).input_ids, n)


@pytest.mark.parametrize("task", ["base", "pa-task", "sa-task", "lora-task"])
def test_server_tokens_equal_reference(server: str, smollm2, adapters_dir: Path, task: str) -> None:
    """The invariant: adapted prefill -> KV handoff -> adapter-free decode == one masked forward per step."""
    for prompt in PROMPTS:
        got = gen(server, task=task, prompt=prompt, max_new_tokens=12)
        assert got["token_ids"] == reference(smollm2, adapters_dir, task, prompt, 12), (task, prompt)
        assert got["adapter_version"] == ("base" if task == "base" else
                                          load_adapter(adapters_dir / task, smollm2.config,
                                                       smollm2.fingerprint).version)


def test_identity_adapter_gives_base_tokens_and_random_ones_differ(server: str) -> None:
    for prompt in PROMPTS:
        base = gen(server, task="base", prompt=prompt, max_new_tokens=10)["token_ids"]
        assert gen(server, task="zero-task", prompt=prompt, max_new_tokens=10)["token_ids"] == base
    differs = {t: any(gen(server, task=t, prompt=p, max_new_tokens=10)["token_ids"]
                      != gen(server, task="base", prompt=p, max_new_tokens=10)["token_ids"] for p in PROMPTS)
               for t in ("pa-task", "sa-task", "lora-task")}
    assert all(differs.values()), differs


def test_cli_reference_equals_server(server: str, adapters_dir: Path) -> None:
    prompt = PROMPTS[1]
    command = [sys.executable, "-m", "launcher.cli", "generate", "--adapter", str(adapters_dir / "lora-task"),
               "--prompt", prompt, "--max-new-tokens", "8", "--reference", "--dtype", "float32", "--device", "cpu"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    got = gen(server, task="lora-task", prompt=prompt, max_new_tokens=8)
    assert got["token_ids"] == ref["token_ids"] and got["text"] == ref["text"]


def test_concurrent_mixed_tasks_equal_alone(server: str) -> None:
    """32 concurrent greedy requests over 8 tasks + base, different lengths and budgets, == served alone."""
    tasks = [f"t{i}" for i in range(8)] + ["base"]
    bodies = [{"task": tasks[i % len(tasks)], "prompt": PROMPTS[i % 3] + " " * (i % 4) + "x" * (i % 5),
               "max_new_tokens": 4 + (i * 7) % 13} for i in range(32)]
    alone = [gen(server, **b)["token_ids"] for b in bodies]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda b: gen(server, **b)["token_ids"], bodies))
    assert together == alone


def test_stream_concatenates_to_non_stream_text(server: str) -> None:
    body = {"task": "sa-task", "prompt": PROMPTS[1], "max_new_tokens": 20}
    whole = gen(server, **body)
    events = []
    with httpx.stream("POST", server + "/generate", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert len(events) > 2
    assert "".join(e["text"] for e in events) == whole["text"]
    assert [t for e in events for t in e["token_ids"]] == whole["token_ids"]
    final = events[-1]
    assert final["finish_reason"] == whole["finish_reason"]
    assert final["adapter_version"] == whole["adapter_version"]
    assert final["usage"] == whole["usage"]


def test_stop_string_excluded(server: str) -> None:
    full = gen(server, task="base", prompt=PROMPTS[0], max_new_tokens=16)
    assert "\n" in full["text"]
    stopped = gen(server, task="base", prompt=PROMPTS[0], max_new_tokens=16, stop=["\n"])
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == full["text"].split("\n")[0]


def test_seeded_sampling_reproducible_whatever_the_batch(server: str) -> None:
    body = {"task": "t1", "prompt": PROMPTS[1], "max_new_tokens": 12, "temperature": 0.9, "top_p": 0.9,
            "top_k": 50, "seed": 1234}
    alone = gen(server, **body)["token_ids"]
    others = [{"task": "t2", "prompt": PROMPTS[0], "max_new_tokens": 12, "temperature": 1.0}] * 5
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda b: gen(server, **b)["token_ids"], [body, *others]))
    assert results[0] == alone
    assert gen(server, **{**body, "seed": 99})["token_ids"] != alone


def test_input_uses_prompt_template(server: str) -> None:
    via_input = gen(server, task="pa-task", input="What is 2+2?", max_new_tokens=6)
    via_prompt = gen(server, task="pa-task", prompt="Question: What is 2+2?\nAnswer:", max_new_tokens=6)
    assert via_input["token_ids"] == via_prompt["token_ids"]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"task": "nope", "prompt": "hi"}, 404, "unknown task 'nope'"),
    ({"task": "base", "prompt": "hi", "temperature": -1}, 422, "temperature"),
    ({"task": "base", "prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"task": "base"}, 422, "exactly one of 'prompt' or 'input'"),
    ({"task": "base", "prompt": "hi", "bogus": 1}, 422, "bogus"),
    ({"task": "base", "prompt": "hello " * 600}, 413, "context limit"),
    ({"task": "base", "prompt": "hi", "max_new_tokens": 4000}, 413, "max_new_tokens (4000)"),
])
def test_bad_requests(server: str, body: dict, status: int, needle: str) -> None:
    r = httpx.post(server + "/generate", json=body, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.text


def test_tasks_health_ready(server: str) -> None:
    tasks = httpx.get(server + "/tasks").json()["tasks"]
    assert {t["task"] for t in tasks} >= {"base", *TASKS}
    assert httpx.get(server + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server + "/readyz").json()["ready"] is True
