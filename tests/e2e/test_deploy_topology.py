"""docker-compose.yml's topology as local processes: a real Redis (password, append-only), one decode
and two prefill replicas, each started with the command and environment compose gives its service.

Only what a container has and a local process cannot is replaced: the Redis host (`redis:6379` ->
this Redis), the bind address (loopback), the HTTP port (a free one; the healthcheck's port in
compose) and the adapters volume (a folder both prefills share, as they share the volume).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from kv_transfer.redis_keys import GROUP, RedisKeys
from tests.processes import ServeProcess
from tests.redis_fixture import RedisServer, running_redis
from tests.unit.test_deploy_manifests import load_compose, random_secrets, service_env

APP_SERVICES = ("decode", "prefill-a", "prefill-b")
PREFILLS = ("prefill-a", "prefill-b")
# what this test changes in a service's compose environment; every other variable is passed as is
LOCALISED = {"PRAD_REDIS_URL", "PRAD_STORE_REDIS_URL", "PRAD_HOST", "PRAD_PORT", "PRAD_ADAPTERS", "PRAD_STORE"}
BODIES = [{"task": task, "prompt": prompt, "max_new_tokens": 8}
          for task in ("base", "pa-task", "lora-task") for prompt in ("The capital of France is", "Once upon a time")]


def _redis_config(command: list[str]) -> dict[str, str]:
    """`redis-server --name value ...` from the compose file, as CONFIG SET pairs."""
    assert command[0] == "redis-server"
    flags = command[1:]
    return {flags[i].removeprefix("--"): flags[i + 1] for i in range(0, len(flags), 2)}


def _configure_redis(server: RedisServer, config: dict[str, str]) -> redis.Redis:
    """Apply compose's redis-server flags to the running test server; requirepass last."""
    client = redis.Redis(host="127.0.0.1", port=server.port)
    for name, value in config.items():
        if name != "requirepass":
            client.config_set(name, value)
    client.config_set("requirepass", config["requirepass"])
    return redis.Redis(host="127.0.0.1", port=server.port, password=config["requirepass"])


def _local_env(compose_env: dict[str, str], redis_port: int, http_port: int, adapters: Path) -> dict[str, str]:
    env = dict(compose_env)
    assert "@redis:6379/" in env["PRAD_REDIS_URL"], env["PRAD_REDIS_URL"]
    env["PRAD_REDIS_URL"] = env["PRAD_REDIS_URL"].replace("@redis:6379/", f"@127.0.0.1:{redis_port}/")
    env["PRAD_HOST"] = "127.0.0.1"
    env["PRAD_PORT"] = str(http_port)
    if "PRAD_STORE_REDIS_URL" in env:
        env["PRAD_STORE_REDIS_URL"] = env["PRAD_STORE_REDIS_URL"].replace("@redis:6379/", f"@127.0.0.1:{redis_port}/")
    if "PRAD_STORE" in env:  # the compose store lives on the adapters volume: keep it there
        env["PRAD_STORE"] = env["PRAD_STORE"].replace(compose_env["PRAD_ADAPTERS"], str(adapters))
    if "PRAD_ADAPTERS" in env:
        env["PRAD_ADAPTERS"] = str(adapters)
    assert {k for k in env if env[k] != compose_env.get(k)} <= LOCALISED
    return env


def _process(name: str, service: dict[str, Any], redis_port: int, adapters: Path, log_dir: Path) -> ServeProcess:
    command = service["command"]
    assert command[0] == "serve"
    process = ServeProcess(command[1:], log_dir, name)
    # ServeProcess adds --port (the same port as PRAD_PORT below), --threads 1, --device cpu and
    # --dtype float32 (exact greedy tokens); the environment is compose's, not this test's.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PRAD_") or k == "PRAD_CACHE_DIR"}
    process.env = {**inherited, "OMP_WAIT_POLICY": "PASSIVE",
                   **_local_env(service_env(service), redis_port, process.port, adapters)}
    return process


def _metric(text: str, name: str, **labels: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def _generate(url: str, bodies: list[dict[str, Any]], key: str | None = None) -> list[dict[str, Any]]:
    headers = {"authorization": f"Bearer {key}"} if key else {}

    def post(body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(url + "/generate", json=body, timeout=120, headers=headers)
        assert r.status_code == 200, r.text
        return dict(r.json())

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(post, bodies))


@pytest.fixture
def topology(adapters_dir: Path, tmp_path: Path) -> Iterator[tuple[dict[str, ServeProcess], redis.Redis]]:
    values = random_secrets()
    services = load_compose(variables=values)["services"]
    with running_redis(tmp_path / "redis") as server, ExitStack() as stack:
        client = _configure_redis(server, _redis_config(services["redis"]["command"]))
        stack.callback(client.close)
        processes = {name: _process(name, services[name], server.port, adapters_dir, tmp_path)
                     for name in APP_SERVICES}
        for process in processes.values():
            stack.callback(process.stop)
        # compose orders decode before the prefills; here all start at once, and every one
        # waits for its own /readyz (a prefill is ready only once a decode replica is alive)
        starts: list[Callable[[], ServeProcess]] = [p.start for p in processes.values()]
        with ThreadPoolExecutor(len(starts)) as pool:
            for future in [pool.submit(start) for start in starts]:
                future.result()
        yield processes, client


def test_compose_topology_serves_through_both_prefills(topology: tuple[dict[str, ServeProcess], redis.Redis],
                                                       server: str) -> None:
    processes, client = topology
    env = {name: p.env for name, p in processes.items()}

    # Redis is the compose one: password required, append-only on
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=client.connection_pool.connection_kwargs["port"]).ping()
    assert client.config_get("appendonly") == {"appendonly": "yes"}

    # every process is up, and says so
    for name, process in processes.items():
        assert httpx.get(process.url + "/healthz").status_code == 200, name
        ready = httpx.get(process.url + "/readyz")
        assert ready.status_code == 200, f"{name}: {ready.text}"

    # the same greedy requests through both front doors at once: identical tokens and adapter versions,
    # and the same tokens as the embedded server (in-process transport) gives
    with ThreadPoolExecutor(2) as pool:
        outputs = pool.map(lambda n: _generate(processes[n].url, BODIES, env[n]["PRAD_API_KEY"]), PREFILLS)
        results = dict(zip(PREFILLS, outputs, strict=True))
    expected = _generate(server, BODIES)
    for a, b, want, body in zip(results["prefill-a"], results["prefill-b"], expected, BODIES, strict=True):
        assert a["token_ids"] and a["token_ids"] == b["token_ids"] == want["token_ids"], body
        assert a["adapter_version"] == b["adapter_version"] == want["adapter_version"], body
    tokens = {(b["task"], b["prompt"]): r["token_ids"] for b, r in zip(BODIES, results["prefill-a"], strict=True)}
    assert any(tokens[("pa-task", p)] != tokens[("base", p)] for p in {b["prompt"] for b in BODIES}), \
        "the adapters on the shared folder changed nothing"

    # streaming through Redis gives the same tokens
    with httpx.stream("POST", processes["prefill-b"].url + "/generate", json={**BODIES[1], "stream": True},
                      timeout=120, headers={"authorization": f"Bearer {env['prefill-b']['PRAD_API_KEY']}"}) as r:
        streamed = [t for line in r.iter_lines() if line.startswith("data: ")
                    for t in json.loads(line.removeprefix("data: "))["token_ids"]]
    assert streamed == results["prefill-b"][1]["token_ids"]

    # the compose API key guards /generate, /tasks and /v1/* on each front door
    for name in PREFILLS:
        url, key = processes[name].url, env[name]["PRAD_API_KEY"]
        assert httpx.get(url + "/v1/models").status_code == 401, name
        assert httpx.post(url + "/generate", json=BODIES[0]).status_code == 401, name
        assert httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200, name

    # metrics on every process: each prefill handed its own KV over Redis and counted its requests
    for name in PREFILLS:
        text = httpx.get(processes[name].url + "/metrics").text
        assert _metric(text, "prad:kv_transfer_bytes_total", transport="redis") > 0, name
        assert _metric(text, "prad:request_success_total") >= len(BODIES), name
    decode_metrics = httpx.get(processes["decode"].url + "/metrics").text
    assert "prad:num_requests_running" in decode_metrics and "prad:kv_cache_usage_perc" in decode_metrics
    assert httpx.get(processes["decode"].url + "/readyz").json()["num_running"] == 0

    # the names deploy/README.md documents: stream `prad:jobs`, consumer group `prad-decode`
    groups = client.xinfo_groups(RedisKeys(env["decode"]["PRAD_REDIS_PREFIX"]).jobs)
    assert [g["name"].decode() for g in groups] == [GROUP] and groups[0]["consumers"] >= 1
    for name, process in processes.items():
        assert httpx.get(process.url + "/readyz").status_code == 200, name
