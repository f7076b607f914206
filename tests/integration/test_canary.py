"""Canary and A/B traffic splits between adapter versions of a task, through real HTTP: sticky routing
keys on every node, ramps and aborts under load that lose nothing, each response equal to its stated
version's reference output, pinning, refused splits, unloadable versions, per-version metrics."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from launcher.roles import build_app
from launcher.settings import ServeSettings
from prad.adapters import load_adapter
from prad.adapters.io import content_version
from prad.reference import reference_generate
from tests.helpers import running_server, write_adapter

TOKEN = "admin-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "The weather today is"
MAX_NEW = 3
TASK = "canary"


def _version_of(folder: Path) -> str:
    return content_version((folder / "adapter_config.json").read_bytes(), (folder / "adapter.safetensors").read_bytes())


@pytest.fixture(scope="module")
def versions(smollm2, tmp_path_factory) -> dict[str, Path]:
    """Two versions of the task (the first seeded and active), and one made for another model."""
    root = tmp_path_factory.mktemp("canary-versions")
    folders = {name: write_adapter(root, name, "prad-lora", smollm2.config, smollm2.fingerprint, seed, 0.5)
               for name, seed in (("old", 11), ("new", 12))}
    folders["foreign"] = write_adapter(root, "foreign", "prad-lora", smollm2.config, "another-model", 13, 0.5)
    return folders


@pytest.fixture(scope="module")
def expected(smollm2, versions: dict[str, Path]) -> dict[str, list[int]]:
    """Reference tokens of PROMPT under each servable version, keyed by content version."""
    ids = smollm2.tokenizer(PROMPT).input_ids
    out = {}
    for name in ("old", "new"):
        adapter = load_adapter(versions[name], smollm2.config, smollm2.fingerprint)
        out[_version_of(versions[name])] = reference_generate(smollm2.model, adapter, ids, MAX_NEW)
    assert len(set(map(tuple, out.values()))) == 2, "the two versions must answer differently"
    return out


@pytest.fixture(scope="module")
def nodes(smollm2, tmp_path_factory, versions: dict[str, Path]):
    """Two front doors over one shared store folder (as two prefill nodes would be), the old version active."""
    seed, store = tmp_path_factory.mktemp("canary-seed"), tmp_path_factory.mktemp("canary-store")
    write_adapter(seed, TASK, "prad-lora", smollm2.config, smollm2.fingerprint, 11, 0.5)
    with ExitStack() as stack:
        urls = []
        for _ in range(2):
            settings = ServeSettings(adapters=seed, dtype="float32", device="cpu", max_seq_len=128, admin_token=TOKEN,
                                     store=store, adapter_poll_s=0.2, max_batch_size=16)
            app = build_app(settings, smollm2)
            urls.append(stack.enter_context(running_server(app)))
        store = app.state.store
        store.activate(TASK, store.put(TASK, *_files(versions["old"])))  # whatever the seed made, "old" serves
        store.put(TASK, *_files(versions["new"]))
        store.put(TASK, *_files(versions["foreign"]))  # bypasses the upload's checks on purpose
        for url in urls:
            _wait_routing(url, None, active=_version_of(versions["old"]))
        yield urls


def _files(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "adapter_config.json").read_bytes(), (folder / "adapter.safetensors").read_bytes()


def _split(url: str, weights: dict[str, int] | None) -> httpx.Response:
    if weights is None:
        return httpx.delete(f"{url}/admin/adapters/{TASK}/split", headers=AUTH)
    return httpx.put(f"{url}/admin/adapters/{TASK}/split", json={"weights": weights}, headers=AUTH)


def _generate(client: httpx.Client, url: str, key: str | None = None, **body) -> httpx.Response:
    headers = {"X-PrAd-Routing-Key": key} if key else {}
    return client.post(f"{url}/generate", json={"task": TASK, "prompt": PROMPT, "max_new_tokens": MAX_NEW, **body},
                       headers=headers, timeout=120)


def _wait_routing(url: str, weights: dict[str, int] | None, active: str | None = None,
                  timeout_s: float = 10.0) -> None:
    """Until the node at `url` routes by `weights` (and `active`): its view follows the store by
    notification or poll."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        here = httpx.get(f"{url}/admin/adapters/{TASK}", headers=AUTH).json()["routing_here"]
        if here["split"] == weights and active in (None, here["active_version"]):
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} never routed by split {weights} (active {active})")


def test_keyed_requests_stick_to_one_version_on_every_node(nodes, versions, expected) -> None:
    old, new = _version_of(versions["old"]), _version_of(versions["new"])
    assert _split(nodes[0], {old: 50, new: 50}).status_code == 200
    for url in nodes:
        _wait_routing(url, {old: 50, new: 50})
    seen: dict[str, set[str]] = {}
    with httpx.Client() as client:
        for i in range(12):
            key = f"user-{i}"
            for url in (nodes[0], nodes[1], nodes[0]):
                r = _generate(client, url, key)
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["token_ids"] == expected[body["adapter_version"]]
                seen.setdefault(key, set()).add(body["adapter_version"])
    assert all(len(v) == 1 for v in seen.values()), seen  # one version per key, whichever node answers
    assert {next(iter(v)) for v in seen.values()} == {old, new}  # both versions serve some keys
    assert _split(nodes[0], None).status_code == 200


def test_a_ramp_and_an_abort_under_load_lose_nothing(nodes, versions, expected) -> None:
    old, new = _version_of(versions["old"]), _version_of(versions["new"])
    stop = threading.Event()
    results: list[tuple[int, dict]] = []

    def load(worker: int) -> None:
        with httpx.Client() as client:
            i = 0
            while not stop.is_set():
                r = _generate(client, nodes[i % 2], f"w{worker}-{i % 7}")
                results.append((r.status_code, r.json()))
                i += 1

    with ThreadPoolExecutor(3) as pool:
        for w in range(3):
            pool.submit(load, w)
        try:
            for weights in ({old: 90, new: 10}, {old: 50, new: 50}, None):  # ramp, then abort the canary
                assert _split(nodes[0], weights).status_code == 200
                time.sleep(1.5)
        finally:
            stop.set()  # the load threads end even when an assertion fails
    assert len(results) > 10
    for status, body in results:
        assert status == 200, body
        assert body["token_ids"] == expected[body["adapter_version"]]
    served = Counter(body["adapter_version"] for _, body in results)
    assert set(served) == {old, new}, served


def test_activating_a_version_ends_the_split_atomically(nodes, versions) -> None:
    old, new = _version_of(versions["old"]), _version_of(versions["new"])
    assert _split(nodes[0], {old: 10, new: 90}).status_code == 200
    r = httpx.post(f"{nodes[0]}/admin/adapters/{TASK}/activate", json={"version": new}, headers=AUTH)
    assert r.status_code == 200, r.text
    _wait_routing(nodes[1], None, active=new)
    with httpx.Client() as client:
        assert {_generate(client, nodes[1], f"k{i}").json()["adapter_version"] for i in range(4)} == {new}
    assert httpx.post(f"{nodes[0]}/admin/adapters/{TASK}/activate", json={"version": old},
                      headers=AUTH).status_code == 200


def test_invalid_splits_are_refused_and_change_nothing(nodes, versions, smollm2, tmp_path) -> None:
    old, new = _version_of(versions["old"]), _version_of(versions["new"])
    assert _split(nodes[0], {old: 70, new: 30}).status_code == 200
    cases = [({old: 60, new: 30}, 400, "100"), ({old: 100}, 400, "at least"),
             ({old: 50, "0123456789abcdef": 50}, 404, "no version"), ({old: 50, "NOT-A-VERSION": 50}, 400, "")]
    for weights, status, words in cases:
        r = _split(nodes[0], weights)
        assert r.status_code == status and words in r.text, (weights, r.status_code, r.text)
    booleans = httpx.put(f"{nodes[0]}/admin/adapters/{TASK}/split", json={"weights": {old: True, new: 99}},
                         headers=AUTH)
    assert booleans.status_code == 422  # booleans are not weights
    folder = write_adapter(tmp_path, "elsewhere", "prad-lora", smollm2.config, smollm2.fingerprint, 14, 0.5)
    files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "weights": ("adapter.safetensors", (folder / "adapter.safetensors").read_bytes())}
    pushed = httpx.post(f"{nodes[0]}/admin/adapters/elsewhere/versions", files=files, headers=AUTH, timeout=60)
    assert pushed.status_code == 201, pushed.text
    r = _split(nodes[0], {old: 50, pushed.json()["version"]: 50})  # another task's version
    assert r.status_code == 404 and "no version" in r.text, r.text
    assert httpx.get(f"{nodes[0]}/admin/adapters/{TASK}", headers=AUTH).json()["split"] == {old: 70, new: 30}
    r = httpx.delete(f"{nodes[0]}/admin/adapters/{TASK}/versions/{new}", headers=AUTH)
    assert r.status_code == 409 and "split" in r.text  # a version in a live split cannot be deleted
    assert _split(nodes[0], None).status_code == 200


def test_pinning_needs_permission_and_names_the_version(nodes, versions, expected) -> None:
    new = _version_of(versions["new"])
    with httpx.Client() as client:
        r = _generate(client, nodes[0], adapter_version=new)
        assert r.status_code == 403 and "pinning" in r.text
        admin = {"X-PrAd-Admin-Token": TOKEN}
        r = client.post(f"{nodes[0]}/generate", headers=admin, timeout=120,
                        json={"task": TASK, "prompt": PROMPT, "max_new_tokens": MAX_NEW, "adapter_version": new})
        assert r.status_code == 200 and r.json()["adapter_version"] == new and r.json()["token_ids"] == expected[new]
        r = client.post(f"{nodes[0]}/generate", headers=admin, timeout=120,
                        json={"task": TASK, "prompt": PROMPT, "adapter_version": "0123456789abcdef"})
        assert r.status_code == 404
        r = client.post(f"{nodes[0]}/v1/completions", headers={"X-PrAd-Admin-Token": "wrong"}, timeout=120,
                        json={"model": TASK, "prompt": PROMPT, "max_tokens": MAX_NEW, "user": "u1"})
        assert r.status_code == 200 and r.json()["system_fingerprint"] in expected


def test_an_unloadable_version_in_the_split_is_skipped_and_reported(nodes, versions, expected) -> None:
    old, foreign = _version_of(versions["old"]), _version_of(versions["foreign"])
    assert _split(nodes[0], {old: 50, foreign: 50}).status_code == 200
    with httpx.Client() as client:
        bodies = [_generate(client, nodes[0], f"u{i}").json() for i in range(8)]
    assert all(b["adapter_version"] == old and b["token_ids"] == expected[old] for b in bodies), bodies
    shown = httpx.get(f"{nodes[0]}/admin/adapters/{TASK}", headers=AUTH).json()
    assert foreign in shown["unloadable_here"] and "another-model" in shown["unloadable_here"][foreign]
    assert shown["served_here"][old]["requests"] >= 8
    metrics = httpx.get(f"{nodes[0]}/metrics").text
    assert f'prad:version_load_failures_total{{task="{TASK}",version="{foreign}"}} 1.0' in metrics
    assert f'prad:version_requests_total{{task="{TASK}",version="{old}"}}' in metrics
    assert _split(nodes[0], None).status_code == 200


def test_the_cli_splits_shows_and_ends(nodes, versions) -> None:
    import subprocess
    import sys

    old, new = _version_of(versions["old"]), _version_of(versions["new"])
    base = [sys.executable, "-m", "launcher.cli", "adapters"]
    common = ["--server", nodes[0], "--token", TOKEN]
    run = subprocess.run([*base, "split", *common, TASK, f"{old}=80", f"{new}=20"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    shown = subprocess.run([*base, "show", *common, TASK], capture_output=True, text=True, timeout=60)
    assert f'"{new}": 20' in shown.stdout, shown.stdout
    bad = subprocess.run([*base, "split", *common, TASK, f"{old}=80", f"{new}=30"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "100" in bad.stderr
    end = subprocess.run([*base, "split", *common, "--end", TASK], capture_output=True, text=True, timeout=60)
    assert end.returncode == 0, end.stderr
