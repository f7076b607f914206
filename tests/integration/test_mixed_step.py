"""A decode step computing prompt chunks in its own pass (prad/cpu_decode/mixed.py) gives what the two
separate paths give: the plain decode step's logits and KV for the decode rows, the prefill runner's KV
and logits for the chunks (fp32; only the order of sums inside matmuls differs)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from decode_service.runner import DecodeRunner
from prefill_service.runner import ChunkInput, PrefillRunner
from tests.helpers import random_adapter

TOL = {"atol": 2e-4, "rtol": 1e-4}


def _decode_rows(smollm2, prompts: list[str]) -> tuple[DecodeRunner, DecodeRunner, list[int], list[int]]:
    """Two decode runners with the same rows (one for each path), and the rows' next tokens and positions."""
    prefill = PrefillRunner(smollm2.model)
    runners = [DecodeRunner(smollm2.model, 8, 256, "off") for _ in range(2)]
    tokens, positions = [], []
    for row, text in enumerate(prompts):
        ids = smollm2.tokenizer(text).input_ids
        out = prefill.run([ChunkInput(ids, 0, None, None)])[0]
        for runner in runners:
            runner.ensure_capacity(len(ids) + 8)
            runner.insert(row, out.kv)
        tokens.append(int(out.logits.argmax()))
        positions.append(len(ids))
    return runners[0], runners[1], tokens, positions


def test_mixed_step_equals_a_decode_step_and_a_prefill_pass(smollm2) -> None:
    mixed_runner, plain_runner, tokens, positions = _decode_rows(
        smollm2, ["The capital of France is", "Once upon a time, in a land far away,", "def fib(n):"])
    assert mixed_runner.can_mix
    prefill = PrefillRunner(smollm2.model)
    c = smollm2.config
    adapters = [random_adapter("prad-pa", c, smollm2.fingerprint, 1, 0.3), None,
                random_adapter("prad-lora", c, smollm2.fingerprint, 2, 0.3)]
    long_ids = smollm2.tokenizer("A prompt long enough to be cut into two chunks, the second of which rides in "
                                 "the decode step together with two other prompts of other tasks.").input_ids
    first = prefill.run([ChunkInput(long_ids[:10], 0, adapters[0], None)])[0]
    chunks = [ChunkInput(long_ids[10:], 10, adapters[0], first.kv),  # a continuation: its past KV comes along
              ChunkInput(smollm2.tokenizer("Hello there").input_ids, 0, None, None),
              ChunkInput(smollm2.tokenizer("Translate: ein Haus").input_ids, 0, adapters[2], None)]
    computed = prefill.prompt_chunks(chunks)
    logits, chunk_logits = mixed_runner.decode_mixed(tokens, positions, computed)
    got = prefill.chunk_outputs(chunks, computed, chunk_logits)

    expected_logits = plain_runner.decode(tokens, positions)
    torch.testing.assert_close(logits, expected_logits, **TOL)
    assert torch.equal(logits.argmax(-1), expected_logits.argmax(-1))
    rows = len(tokens)
    for cache in ("k", "v"):  # the decode rows' new K/V went into their slots
        torch.testing.assert_close(getattr(mixed_runner.cache, cache)[:, :rows], getattr(plain_runner.cache, cache)
                                   [:, :rows], **TOL)
    for chunk, out in zip(chunks, got, strict=True):
        alone = prefill.run([chunk])[0]
        torch.testing.assert_close(out.kv, alone.kv, **TOL)
        torch.testing.assert_close(out.logits, alone.logits, **TOL)
        assert int(out.logits.argmax()) == int(alone.logits.argmax())


def _serve_mixed(smollm2, adapters_dir, budget: int = 24):
    from launcher.embedded import build_embedded_app
    from launcher.settings import ServeSettings

    settings = ServeSettings(adapters=adapters_dir, dtype="float32", device="cpu", max_seq_len=512,
                             mixed_prefill_tokens=budget)
    return build_embedded_app(settings, smollm2)


LONG = ("Every prompt that arrives while others are decoding rides in their decode steps, a few dozen tokens "
        "at a time, so no stream waits for a whole prefill pass. ") * 2


def _run_under_decode(app, url: str, bodies: list[dict]) -> list[dict]:
    """Send `bodies` at once while a long streamed request keeps decode busy; their JSON answers."""
    import httpx

    decode = app.state.engines["decode"]
    keep_busy = {"task": "base", "prompt": "Count slowly:", "max_new_tokens": 160, "ignore_eos": True,
                 "stream": True}
    with httpx.stream("POST", url + "/generate", json=keep_busy, timeout=300) as r:
        lines = r.iter_lines()  # kept: a dropped iterator closes the stream, which aborts the request
        for _ in zip(lines, range(6), strict=False):  # decoding is under way
            pass
        assert decode.is_decoding()
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda b: httpx.post(url + "/generate", json=b, timeout=300), bodies))
        assert decode.is_decoding()  # it was decoding the whole time
    assert [a.status_code for a in answers] == [200] * len(bodies), [a.text for a in answers]
    return [a.json() for a in answers]


def test_role_all_mixes_prompts_into_decode_steps_with_exact_tokens(smollm2, tmp_path) -> None:
    from prad.adapters import load_adapter
    from prad.reference import reference_generate
    from tests.helpers import running_server, write_adapter

    write_adapter(tmp_path, "pa", "prad-pa", smollm2.config, smollm2.fingerprint, 11, 0.3)
    write_adapter(tmp_path, "lora", "prad-lora", smollm2.config, smollm2.fingerprint, 12, 0.3)
    app = _serve_mixed(smollm2, tmp_path)
    decode = app.state.engines["decode"]
    mixed_calls = []
    decode_mixed = decode.runner.decode_mixed

    def spy(ids, positions, chunks):
        mixed_calls.append(sum(len(t) for t in chunks.token_ids))
        return decode_mixed(ids, positions, chunks)

    decode.runner.decode_mixed = spy
    bodies = [{"task": task, "prompt": LONG[:60 + 37 * i], "max_new_tokens": 5}
              for i, task in enumerate(["pa", "lora", "base", "pa"])]
    with running_server(app) as url:
        answers = _run_under_decode(app, url, bodies)
    assert mixed_calls and max(mixed_calls) <= 24  # the prompts went with decode steps, 24 tokens at most
    for body, answer in zip(bodies, answers, strict=True):
        adapter = None if body["task"] == "base" else load_adapter(tmp_path / body["task"], smollm2.config,
                                                                    smollm2.fingerprint)
        ids = smollm2.tokenizer(body["prompt"]).input_ids
        assert answer["token_ids"] == reference_generate(smollm2.model, adapter, ids, 5), body["task"]


def test_a_failing_mixed_step_loses_no_decode_row_and_no_prompt(smollm2, tmp_path) -> None:
    """The mixed pass raises once: the decode rows are stepped alone and the prompt chunks go back to the
    prefill engine, which retries them alone; every answer is still complete and exact."""
    from prad.reference import reference_generate
    from tests.helpers import running_server

    app = _serve_mixed(smollm2, tmp_path)
    decode = app.state.engines["decode"]
    decode_mixed, failures = decode.runner.decode_mixed, {"left": 1}

    def failing(ids, positions, chunks):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected failure of a mixed step")
        return decode_mixed(ids, positions, chunks)

    decode.runner.decode_mixed = failing
    bodies = [{"task": "base", "prompt": LONG[:80 + 25 * i], "max_new_tokens": 4} for i in range(3)]
    with running_server(app) as url:
        answers = _run_under_decode(app, url, bodies)
    assert failures["left"] == 0
    for body, answer in zip(bodies, answers, strict=True):
        ids = smollm2.tokenizer(body["prompt"]).input_ids
        assert answer["token_ids"] == reference_generate(smollm2.model, None, ids, 4)
