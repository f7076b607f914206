"""OpenAI-compatible API through the official `openai` client, Prometheus metrics, JSON logs."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from launcher.embedded import build_embedded_app
from launcher.logs import JsonFormatter
from launcher.settings import ServeSettings
from tests.helpers import running_server, write_adapter

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def served(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("oa")
    for i, task in enumerate(["alpha", "beta", "gamma", "delta"]):
        write_adapter(root, task, ("prad-lora", "prad-pa")[i % 2], smollm2.config, smollm2.fingerprint, 50 + i, 0.3)
    settings = ServeSettings(adapters=root, dtype="float32", device="cpu", max_seq_len=512, api_key=API_KEY,
                             max_task_labels=2)
    with running_server(build_embedded_app(settings, smollm2)) as url:
        yield url


def _generate(url: str, **body) -> dict:
    r = httpx.post(url + "/generate", json=body, timeout=120, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def _client(url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.parametrize("task", ["alpha", "beta"])
def test_completions_equal_generate(served: str, task: str) -> None:
    client = _client(served)
    prompt = "The three primary colours are"
    ref = _generate(served, task=task, prompt=prompt, max_new_tokens=12)
    done = client.completions.create(model=task, prompt=prompt, max_tokens=12, temperature=0)
    assert done.choices[0].text == ref["text"]
    assert done.choices[0].finish_reason == ref["finish_reason"]
    assert done.usage.completion_tokens == ref["usage"]["completion_tokens"]
    pieces = client.completions.create(model=task, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    chunks = list(pieces)
    assert "".join(c.choices[0].text for c in chunks) == ref["text"]
    assert chunks[-1].choices[0].finish_reason == ref["finish_reason"]


@pytest.mark.parametrize("task", ["alpha", "base"])
def test_chat_equals_generate_with_chat_template(served: str, smollm2, task: str) -> None:
    client = _client(served)
    messages = [{"role": "user", "content": "Name a fruit that is yellow."}]
    prompt = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ref = _generate(served, task=task, prompt=prompt, max_new_tokens=16)
    done = client.chat.completions.create(model=task, messages=messages, max_tokens=16, temperature=0)
    assert done.choices[0].message.content == ref["text"]
    assert done.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=task, messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == ref["text"]


def test_models_errors_and_api_key(served: str) -> None:
    client = _client(served)
    assert {m.id for m in client.models.list()} == {"base", "alpha", "beta", "gamma", "delta"}
    with pytest.raises(openai.NotFoundError, match="unknown task 'nope'"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="alpha", prompt="hi", max_tokens=2, temperature=5)
    with pytest.raises(openai.AuthenticationError):
        _client(served, key="wrong").models.list()
    r = httpx.get(served + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    for path, call in (("/generate", httpx.post), ("/tasks", httpx.get)):
        kwargs = {"json": {"task": "base", "prompt": "hi"}} if call is httpx.post else {}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = call(served + path, headers=headers, timeout=30, **kwargs)
            assert r.status_code == 401 and "API key" in r.json()["detail"], (path, headers)
    assert httpx.get(served + "/healthz").status_code == 200  # probes and metrics stay open
    assert httpx.get(served + "/metrics").status_code == 200


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_what_was_sent_and_cap_task_labels(served: str) -> None:
    before = _samples(served)
    for task in ("alpha", "beta", "gamma", "delta", "base"):
        _generate(served, task=task, prompt="Hello there", max_new_tokens=5, ignore_eos=True)
    _generate(served, task="gamma", prompt="Hello there", max_new_tokens=3, ignore_eos=True)
    assert httpx.post(served + "/generate", json={"task": "nope", "prompt": "x"}, headers=AUTH).status_code == 404
    after = _samples(served)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    # max_task_labels=2: alpha and beta (first seen) keep their labels, gamma and delta fold into other.
    assert delta("prad:request_success_total", task="alpha", finish_reason="length") == 1
    assert delta("prad:request_success_total", task="other", finish_reason="length") == 3
    assert delta("prad:request_success_total", task="base", finish_reason="length") == 1
    assert delta("prad:generation_tokens_total", task="other") == 5 + 5 + 3
    assert delta("prad:time_to_first_token_seconds_count", task="other") == 3
    assert delta("prad:e2e_request_latency_seconds_count", task="beta") == 1
    assert delta("prad:request_queue_time_seconds_count", task="other") == 3
    assert delta("prad:request_prefill_time_seconds_count", task="alpha") == 1
    assert delta("prad:inter_token_latency_seconds_count", task="alpha") == 4
    assert delta("prad:request_errors_total", task="unknown", kind="unknown_task") == 1
    assert delta("prad:kv_transfer_bytes_total", transport="inproc") > 0
    labels = {dict(k[1]).get("task") for k in after if k[0].startswith("prad:")} - {None}
    assert labels <= {"alpha", "beta", "base", "other", "unknown", "invalid"}, labels
    assert ("prad:num_requests_running", ()) in after and ("prad:kv_cache_usage_perc", ()) in after


def test_json_log_line_carries_request_fields(served: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="prad.requests"):
        body = _generate(served, task="alpha", prompt="Hi", max_new_tokens=2)
    records = [r for r in caplog.records if getattr(r, "request_id", None) == body["request_id"]]
    assert records, "no request log line"
    line = JsonFormatter().format(records[0])
    assert f'"request_id": "{body["request_id"]}"' in line
    assert '"task": "alpha"' in line and f'"adapter_version": "{body["adapter_version"]}"' in line
