"""Bounded queues (429), broken adapters, and the decode service's independence from adapter code."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx

from launcher.embedded import build_embedded_app
from launcher.settings import ServeSettings
from tests.helpers import running_server, write_adapter


def test_queue_full_gives_429_and_nothing_hangs(smollm2, tmp_path) -> None:
    settings = ServeSettings(dtype="float32", device="cpu", max_batch_size=1, max_waiting=1, max_seq_len=256)
    with running_server(build_embedded_app(settings, smollm2)) as url:
        body = {"task": "base", "prompt": "Count: one, two,", "max_new_tokens": 40, "ignore_eos": True}
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda _: httpx.post(url + "/generate", json=body, timeout=120), range(8)))
        codes = sorted(r.status_code for r in statuses)
        assert 429 in codes and 200 in codes, codes
        assert all(c in (200, 429) for c in codes), codes
        assert "busy" in next(r for r in statuses if r.status_code == 429).text
        # and the server still serves afterwards
        assert httpx.post(url + "/generate", json=body, timeout=120).status_code == 200


def test_broken_adapter_not_served_others_are(smollm2, tmp_path) -> None:
    write_adapter(tmp_path, "good", "prad-pa", smollm2.config, smollm2.fingerprint, 0, 0.3)
    write_adapter(tmp_path, "foreign", "prad-pa", smollm2.config, "another-model", 0, 0.3)
    settings = ServeSettings(adapters=tmp_path, dtype="float32", device="cpu", max_seq_len=256)
    with running_server(build_embedded_app(settings, smollm2)) as url:
        r = httpx.post(url + "/generate", json={"task": "foreign", "prompt": "hi", "max_new_tokens": 2})
        assert r.status_code == 503 and "made for model fingerprint 'another-model'" in r.text
        ok = httpx.post(url + "/generate", json={"task": "good", "prompt": "hi", "max_new_tokens": 2}, timeout=60)
        assert ok.status_code == 200
        listed = {t["task"]: t for t in httpx.get(url + "/tasks").json()["tasks"]}
        assert "error" in listed["foreign"] and "error" not in listed["good"]


def test_decode_service_imports_no_adapter_code() -> None:
    code = ("import sys, pkgutil, importlib, decode_service\n"
            "for m in pkgutil.walk_packages(decode_service.__path__, 'decode_service.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = sorted(n for n in sys.modules if n.startswith(('prad.adapters', 'adapters_store')))\n"
            "print(bad); assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
