"""bench/kv_wire_quality.py end to end on a tiny workload with the real model and example adapters: its
JSON and plot, native as its own reference, and its decode loop giving `prad eval`'s tokens (so the
agreement it reports is measured against what evaluation and the server answer)."""

from __future__ import annotations

import json
from typing import cast

import torch

from bench import kv_wire_quality as kq
from prad.adapters import load_adapter
from training.data import Tokenizer, load_eval_examples, subset
from training.decoding import greedy_generate
from training.tasks import resolve_task


def test_kv_wire_quality_bench_smoke(tmp_path) -> None:
    kq.main(["--tasks", "sst2,e2e", "--examples", "3", "--max-new-tokens", "3", "--batch-size", "2",
             "--threads", str(torch.get_num_threads()), "--out", str(tmp_path)])
    out = json.loads((tmp_path / "kv_wire_quality.json").read_text())
    rows = {(r["task"], r["kv_wire_format"]): r for r in out["results"]}
    assert set(rows) == {(t, f) for t in ("sst2", "e2e") for f in ("native", "bfloat16", "int8")}
    for (_, fmt), r in rows.items():
        assert r["num_examples"] == 3 and 0 <= r["exact"] <= r["prefix"] <= 1
        assert r["wire_bytes_per_token"] == {"native": 46_080, "bfloat16": 23_040, "int8": 12_240}[fmt]
        if fmt == "native":
            assert (r["exact"], r["answers"], r["score_change"], r["kv_rel_rms_error"]) == (1.0, 1.0, 0.0, 0.0)
        else:
            assert 0 < r["kv_rel_rms_error"] < 0.05
    assert out["bytes_per_token"]["bfloat16"] == {"native": 23_040, "bfloat16": 23_040, "int8": 12_240}
    assert (tmp_path / "kv_wire_quality.png").stat().st_size > 0


def test_bench_decode_gives_the_eval_paths_tokens(smollm2) -> None:
    """Native KV through the bench's wire trip and decode loop == training.decoding.greedy_generate (what
    `prad eval` runs), rows finishing at different steps included."""
    adapter = load_adapter(kq.EXAMPLE_ADAPTERS / "e2e", smollm2.config, smollm2.fingerprint)
    spec = resolve_task("e2e", adapter.config.prompt_template)
    examples = subset(load_eval_examples(kq.DATA / "e2e"), 4)
    prompts = kq.task_prompts(smollm2, adapter, spec, examples)
    expected = greedy_generate(smollm2.model, adapter, prompts, 24)
    assert len({len(ids) for ids in expected}) > 1 or any(ids[-1] in smollm2.config.eos_token_ids for ids in expected)
    from prefill_service.runner import ChunkInput, PrefillRunner

    prefilled = PrefillRunner(smollm2.model).run([ChunkInput(p, 0, adapter, None) for p in prompts])
    kvs = [kq.wire_round_trip(out.kv, p, "native", smollm2.fingerprint)[0] for out, p in zip(prefilled, prompts,
                                                                                              strict=True)]
    got = kq.greedy_decode(smollm2.model, kvs, [int(out.logits.argmax()) for out in prefilled], 24,
                           set(smollm2.config.eos_token_ids))
    assert got == expected
    assert cast(Tokenizer, smollm2.tokenizer).decode(got[0], skip_special_tokens=True).strip()
