"""Versioned adapters and hot swap: admin API, CLI, swaps under load, and swaps seen across nodes."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from launcher.roles import build_app
from launcher.settings import ServeSettings
from prad.adapters import load_adapter
from prad.reference import reference_generate
from tests.helpers import running_server, write_adapter
from tests.processes import ServeProcess
from tests.redis_fixture import running_redis

TOKEN = "admin-secret"
PROMPT = "My favourite food is"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def versions_dir(smollm2, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("versions")
    for i in range(3):
        write_adapter(root, f"v{i}", "prad-lora", smollm2.config, smollm2.fingerprint, 300 + i, 0.4)
    return root


@pytest.fixture(scope="module")
def admin_server(smollm2, tmp_path_factory, versions_dir: Path):
    seed = tmp_path_factory.mktemp("seed")
    write_adapter(seed, "swap", "prad-pa", smollm2.config, smollm2.fingerprint, 7, 0.5)
    settings = ServeSettings(adapters=seed, dtype="float32", device="cpu", max_seq_len=256, admin_token=TOKEN,
                             store=tmp_path_factory.mktemp("store"), max_adapter_bytes=4 << 20)
    with running_server(build_app(settings, smollm2)) as url:
        yield url


def _push(url: str, task: str, folder: Path, activate: bool = False, headers: dict | None = None) -> httpx.Response:
    files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "weights": ("adapter.safetensors", (folder / "adapter.safetensors").read_bytes())}
    return httpx.post(f"{url}/admin/adapters/{task}/versions", files=files, data={"activate": str(activate).lower()},
                      headers=AUTH if headers is None else headers, timeout=60)


def _expected(smollm2, folder: Path | None) -> list[int]:
    adapter = None if folder is None else load_adapter(folder, smollm2.config, smollm2.fingerprint)
    return reference_generate(smollm2.model, adapter, smollm2.tokenizer(PROMPT).input_ids, 8)


def _wait_served(responses: list[httpx.Response], version: str, timeout_s: float = 30.0) -> None:
    """Keep the version active until the load has been served by it at least once."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if any(r.status_code == 200 and r.json()["adapter_version"] == version for r in list(responses)):
            return
        time.sleep(0.1)
    raise AssertionError(f"version {version} never served within {timeout_s}s")


def test_swaps_under_load_lose_nothing_and_each_response_matches_its_version(admin_server: str, smollm2,
                                                                             versions_dir: Path) -> None:
    url = admin_server
    initial = httpx.get(url + "/tasks").json()["tasks"]
    seeded_version = next(t["adapter_version"] for t in initial if t["task"] == "swap")
    expected = [_expected(smollm2, versions_dir / f"v{i}") for i in range(3)]
    expected_by_version: dict[str, list[int]] = {}
    stop = threading.Event()
    responses: list[httpx.Response] = []

    def load() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                responses.append(client.post(url + "/generate", json={"task": "swap", "prompt": PROMPT,
                                                                      "max_new_tokens": 8}))

    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(load)
        pushed = []
        for i in range(3):
            r = _push(url, "swap", versions_dir / f"v{i}")
            assert r.status_code == 201, r.text
            version = r.json()["version"]
            expected_by_version[version] = expected[i]
            pushed.append(version)
            r = httpx.post(f"{url}/admin/adapters/swap/activate", json={"version": version}, headers=AUTH)
            assert r.status_code == 200, r.text
            _wait_served(responses, version)
        r = httpx.post(f"{url}/admin/adapters/swap/rollback", headers=AUTH)
        assert r.status_code == 200 and r.json()["version"] == pushed[1]
        time.sleep(1.0)
        stop.set()
    failed = [r.text for r in responses if r.status_code != 200]
    assert responses and not failed, failed
    served = {r.json()["adapter_version"] for r in responses}
    assert set(pushed) <= served
    for r in responses:
        body = r.json()
        if body["adapter_version"] == seeded_version:
            continue  # the seed's tokens are checked by the invariant tests
        assert body["token_ids"] == expected_by_version[body["adapter_version"]], body["adapter_version"]
    listing = httpx.get(url + "/admin/adapters", headers=AUTH).json()["tasks"]
    swap = next(t for t in listing if t["task"] == "swap")
    assert swap["active_version"] == pushed[1] and len(swap["versions"]) == 4
    metrics = httpx.get(url + "/metrics").text
    swaps = [line for line in metrics.splitlines() if line.startswith('prad:adapter_hot_swaps_total{task="swap"}')]
    assert swaps == ['prad:adapter_hot_swaps_total{task="swap"} 4.0'], swaps


def test_admin_auth_and_bad_uploads_leave_active_version(admin_server: str, smollm2, tmp_path,
                                                         versions_dir: Path) -> None:
    url = admin_server
    assert httpx.get(url + "/admin/adapters").status_code == 401
    assert httpx.get(url + "/admin/adapters", headers={"Authorization": "Bearer nope"}).status_code == 403
    before = httpx.get(url + "/admin/adapters", headers=AUTH).json()

    foreign = write_adapter(tmp_path, "foreign", "prad-pa", smollm2.config, "other-model", 1, 0.3)
    r = _push(url, "swap", foreign)
    assert r.status_code == 400 and "made for model fingerprint 'other-model'" in r.text

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((versions_dir / "v0" / "adapter_config.json").read_bytes())
    (pickled / "adapter.safetensors").write_bytes(pickle.dumps({"w": [1.0] * 10}))
    r = _push(url, "swap", pickled)
    assert r.status_code == 400 and "not a valid safetensors file" in r.text

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    (broken / "adapter.safetensors").write_bytes((versions_dir / "v0" / "adapter.safetensors").read_bytes())
    r = _push(url, "swap", broken)
    assert r.status_code == 400 and "not valid JSON" in r.text

    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_bytes((versions_dir / "v0" / "adapter_config.json").read_bytes())
    (big / "adapter.safetensors").write_bytes(b"\0" * (5 << 20))
    r = _push(url, "swap", big)
    assert r.status_code == 413

    r = _push(url, "Bad Task!", versions_dir / "v0")
    assert r.status_code in (400, 404, 422)
    assert httpx.get(url + "/admin/adapters", headers=AUTH).json() == before


def test_admin_routes_absent_without_token(server: str) -> None:
    assert httpx.get(server + "/admin/adapters", headers=AUTH).status_code == 404


def test_cli_push_activate_rollback_list(admin_server: str, versions_dir: Path) -> None:
    def prad(*args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "launcher.cli", "adapters", *args, "--server", admin_server,
                              "--token", TOKEN], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    pushed = prad("push", "--task", "cli-task", str(versions_dir / "v2"))
    assert pushed["task"] == "cli-task" and len(pushed["version"]) == 16
    prad("activate", "--task", "cli-task", "--version", pushed["version"])
    second = prad("push", "--task", "cli-task", str(versions_dir / "v1"))
    prad("activate", "--task", "cli-task", "--version", second["version"])
    assert prad("rollback", "--task", "cli-task")["version"] == pushed["version"]
    listing = {t["task"]: t for t in prad("list")["tasks"]}
    assert listing["cli-task"]["active_version"] == pushed["version"]


def test_two_nodes_on_redis_see_an_activation_within_a_second(versions_dir: Path, tmp_path) -> None:
    with running_redis(tmp_path / "redis") as rs, ExitStack() as stack:
        shared = tmp_path / "shared-store"
        nodes = []
        for i in range(2):
            node = ServeProcess(["--store", str(shared), "--store-redis-url", rs.url, "--admin-token", TOKEN],
                                tmp_path, f"node{i}")
            stack.callback(node.stop)
            nodes.append(node.start())
        r = _push(nodes[0].url, "shared", versions_dir / "v0", activate=True)
        assert r.status_code == 201, r.text
        first = r.json()["version"]
        r = _push(nodes[0].url, "shared", versions_dir / "v1")
        second = r.json()["version"]
        deadline = time.time() + 10
        while time.time() < deadline:  # node1 learns of the new task
            r = httpx.post(nodes[1].url + "/generate", json={"task": "shared", "prompt": PROMPT, "max_new_tokens": 1})
            if r.status_code == 200 and r.json()["adapter_version"] == first:
                break
            time.sleep(0.1)
        assert httpx.post(f"{nodes[0].url}/admin/adapters/shared/activate", json={"version": second},
                          headers=AUTH).status_code == 200
        activated = time.time()
        seen_s = None
        while time.time() - activated < 5:
            r = httpx.post(nodes[1].url + "/generate", json={"task": "shared", "prompt": PROMPT, "max_new_tokens": 1})
            if r.json()["adapter_version"] == second:
                seen_s = time.time() - activated
                break
        assert seen_s is not None and seen_s <= 1.0, seen_s
