"""`prad eval --server` (training/remote_eval.py): adapter versions scored through /generate, with an
httpx.MockTransport standing in for the server (no model, no sockets, no processes)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher.cli import build_parser
from training import remote_eval as rv
from training.data import Example
from training.evaluate import eval_examples
from training.metrics import score

V1, V2 = "0123456789abcdef", "fedcba9876543210"
SERVER = "http://prad.test:8000"
EXAMPLES = [Example("great film", "positive", ("positive",)), Example("awful plot", "negative", ("negative",)),
            Example("loved it", "positive", ("positive",)), Example("boring", "negative", ("negative",))]
# V1 answers everything "positive" (2/4 right); V2 answers each label, as the first of several lines (4/4).
ANSWERS = {V1: {ex.input: " Positive" for ex in EXAMPLES},
           V2: {ex.input: f" {ex.target}.\nBecause reasons" for ex in EXAMPLES}}
NO_WAIT = rv.RetryPolicy(backoff_s=0.0, max_backoff_s=0.0)


class FakeServer:
    """Answers /generate from ANSWERS; `script` (a list of status codes) overrides the first responses."""

    def __init__(self, script: list[int] | None = None, answer_as: str | None = None) -> None:
        self.requests: list[tuple[dict[str, Any], httpx.Headers]] = []
        self.script, self.answer_as, self.lock = list(script or []), answer_as, threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        with self.lock:
            self.requests.append((body, request.headers))
            status = self.script.pop(0) if self.script else 200
        assert request.url.path == "/generate"
        if status != 200:
            return httpx.Response(status, json={"detail": f"scripted {status}"})
        version = body["adapter_version"]
        if version not in ANSWERS:
            return httpx.Response(404, json={"detail": f"task 'sst2' has no version {version}"})
        text = ANSWERS[version][body["input"]]
        return httpx.Response(200, json={"request_id": "r", "task": body["task"], "text": text,
                                         "adapter_version": self.answer_as or version, "finish_reason": "length",
                                         "token_ids": [1, 2], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self))


def _compare(server: FakeServer, versions: list[str], **kw: Any) -> list[rv.VersionResult]:
    return rv.compare_versions(server.client(), SERVER, "sst2", versions, EXAMPLES, "accuracy", 8,
                               policy=NO_WAIT, show_progress=False, **kw)


def test_two_versions_score_differently_and_exactly_like_local_scoring() -> None:
    server = FakeServer()
    r1, r2 = _compare(server, [V1, V2], concurrency=3)
    assert (r1.version, r2.version) == (V1, V2)
    assert r1.scores == {"accuracy": 50.0, "num_correct": 2.0}
    assert r2.scores == {"accuracy": 100.0, "num_correct": 4.0}
    assert r2.predictions == ["positive.", "negative.", "positive.", "negative."]  # first_line, in example order
    targets, references = [e.target for e in EXAMPLES], [e.references for e in EXAMPLES]
    assert r2.scores == score("accuracy", r2.predictions, targets, references)
    assert (r1.num_examples, r1.num_errors) == (4, 0)
    summary = rv.comparison_json("sst2", "accuracy", "dev.jsonl", [r1, r2])
    assert summary["versions"][V2] == {"scores": r2.scores, "num_examples": 4, "wall_s": round(r2.wall_s, 2),
                                       "num_errors": 0}
    table = rv.format_table("accuracy", [r1, r2]).splitlines()
    assert table[0].split() == ["version", "accuracy", "num_correct", "d_accuracy", "n", "errors", "wall_s"]
    assert table[2].split()[:6] == [V2, "100.00", "4", "+50.00", "4", "0"]
    assert len({len(line) for line in table}) == 1  # aligned


def test_requests_are_greedy_pinned_and_carry_the_credentials() -> None:
    server = FakeServer()
    _compare(server, [V1], headers=rv.auth_headers("key-1", "admin-1"))
    assert len(server.requests) == 4
    for body, headers in server.requests:
        assert body == {"task": "sst2", "input": body["input"], "adapter_version": V1, "max_new_tokens": 8,
                        "temperature": 0.0}
        assert headers["x-prad-admin-token"] == "admin-1"
        assert headers["authorization"] == "Bearer key-1"
    assert sorted(b["input"] for b, _ in server.requests) == sorted(e.input for e in EXAMPLES)
    server = FakeServer()
    _compare(server, [V1], headers=rv.auth_headers(None, None))
    assert all("x-prad-admin-token" not in h and "authorization" not in h for _, h in server.requests)


def test_every_version_is_probed_before_any_is_scored() -> None:
    server = FakeServer()
    _compare(server, [V1, V2])
    assert [b["adapter_version"] for b, _ in server.requests[:2]] == [V1, V2]


def test_busy_and_unavailable_are_retried_then_bounded() -> None:
    slept: list[float] = []
    server = FakeServer(script=[429, 503, 429])
    (result,) = _compare(server, [V2], sleep=slept.append)
    assert result.scores["accuracy"] == 100.0 and result.num_errors == 0
    assert len(server.requests) == 4 + 3 and len(slept) == 3
    # Past its retry budget a busy example fails alone: empty prediction, counted, others still scored.
    policy = rv.RetryPolicy(busy_retries=2, backoff_s=0.0, max_backoff_s=0.0)
    server = FakeServer(script=[200, 429, 429, 429])
    (result,) = rv.compare_versions(server.client(), SERVER, "sst2", [V2], EXAMPLES, "accuracy", 8, policy=policy,
                                    concurrency=1, show_progress=False, sleep=slept.append)
    assert result.num_errors == 1 and result.scores["num_correct"] == 3.0
    assert result.predictions[1] == "" and "HTTP 429" in (result.errors[1] or "")


def test_other_client_errors_fail_only_that_example() -> None:
    server = FakeServer(script=[200, 422])
    (result,) = _compare(server, [V2], concurrency=1)
    assert result.num_errors == 1 and result.scores["num_correct"] == 3.0
    assert rv.example_rows(EXAMPLES, [result])[1]["errors"] == {V2: "HTTP 422: scripted 422"}


@pytest.mark.parametrize(("status", "message"), [(404, "unknown task or version"),
                                                 (403, "--allow-version-pinning"), (401, "API key")])
def test_refusal_on_the_first_request_stops_with_a_clear_error(status: int, message: str) -> None:
    server = FakeServer(script=[status])
    with pytest.raises(rv.RemoteEvalError, match=message):
        _compare(server, [V1, V2])
    assert len(server.requests) == 1


def test_unknown_second_version_stops_before_scoring_the_first() -> None:
    server = FakeServer()
    with pytest.raises(rv.RemoteEvalError, match=f"HTTP 404.*has no version {'1' * 16}"):
        _compare(server, [V1, "1" * 16])
    assert len(server.requests) == 2


def test_an_answer_from_another_version_is_an_error() -> None:
    with pytest.raises(rv.RemoteEvalError, match=f"asked for version {V1} but the server answered with '{V2}'"):
        _compare(FakeServer(answer_as=V2), [V1])


def test_a_version_whose_every_request_failed_is_an_error() -> None:
    with pytest.raises(rv.RemoteEvalError, match="all 4 requests failed"):
        _compare(FakeServer(script=[400] * 4), [V1])


def test_unreachable_server_is_a_clear_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = httpx.Client(transport=httpx.MockTransport(refuse))
    with pytest.raises(rv.RemoteEvalError, match="cannot reach"):
        rv.compare_versions(client, SERVER, "sst2", [V1], EXAMPLES, "accuracy", 8, policy=NO_WAIT,
                            show_progress=False)


def test_version_parsing() -> None:
    assert rv.parse_versions(f"{V1},{V2}") == [V1, V2]
    for bad in ("base", "0123456789ABCDEF", "0123456789abcde", f"{V1},", "0123456789abcdef0"):
        with pytest.raises(ValueError, match="16 lower-case hex"):
            rv.parse_versions(bad)
    with pytest.raises(ValueError, match="listed twice"):
        rv.parse_versions(f"{V1},{V1}")


def test_generation_tasks_group_like_local_eval() -> None:
    spec = rv.remote_task_spec("e2e")
    assert (spec.metric, spec.max_new_tokens) == ("bleu", 64)
    grouped = eval_examples([Example("a", "x", ("x",)), Example("a", "y", ("y",))], spec.metric)
    assert grouped == [Example("a", "x", ("x", "y"))]
    with pytest.raises(ValueError, match="--metric"):
        rv.remote_task_spec("my_task")
    assert rv.remote_task_spec("my_task", "rouge").metric == "rouge"


# ---- the CLI --------------------------------------------------------------------------------------


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps({"input": e.input, "target": e.target}) + "\n" for e in EXAMPLES))
    return path


def _eval_args(*argv: str) -> Any:
    return build_parser().parse_args(["eval", *argv])


def test_cli_refuses_bad_combinations(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _eval_args("--server", SERVER, "--task", "sst2", "--data", str(data))
    with pytest.raises(ValueError, match="--server needs --versions"):
        args.func(args)
    for argv in (["--server", SERVER, "--task", "sst2", "--data", str(data), "--versions", f"{V1},base"],
                 ["--adapter", "base", "--server", SERVER, "--data", str(data)],
                 ["--data", str(data), "--task", "sst2"]):
        with pytest.raises(SystemExit):
            _eval_args(*argv)
    assert "16 lower-case hex" in capsys.readouterr().err
    args = _eval_args("--server", SERVER, "--task", "sst2", "--data", str(data), "--versions", V1,
                      "--max-input-tokens", "64")
    with pytest.raises(ValueError, match="--max-input-tokens: not used with --server"):
        args.func(args)
    args = _eval_args("--server", SERVER, "--task", "sst2", "--data", str(data), "--versions", V1, "--concurrency", "0")
    with pytest.raises(ValueError, match="--concurrency 0"):
        args.func(args)
    args = _eval_args("--adapter", "base", "--data", str(data), "--versions", V1)
    with pytest.raises(ValueError, match="--versions: not used with --adapter"):
        args.func(args)


def _fake_client(server: FakeServer) -> Callable[..., httpx.Client]:
    return lambda *a, **kw: server.client()


def test_cli_compares_versions(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    server = FakeServer()
    monkeypatch.setattr(rv, "make_client", _fake_client(server))
    (tmp_path / "admin").write_text("admin-2\n")
    monkeypatch.setenv("PRAD_API_KEY", "key-2")
    out = tmp_path / "results.json"
    args = _eval_args("--server", SERVER + "/", "--task", "sst2", "--data", str(data), "--versions", f"{V1},{V2}",
                      "--admin-token-file", str(tmp_path / "admin"), "--out", str(out), "--no-progress",
                      "--num-shown", "1")
    assert args.func(args) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out)
    assert (line["task"], line["metric"], line["data"]) == ("sst2", "accuracy", str(data))
    assert line["versions"][V1]["scores"]["accuracy"] == 50.0 and line["versions"][V2]["scores"]["accuracy"] == 100.0
    assert line["versions"][V2]["num_examples"] == 4 and line["versions"][V2]["num_errors"] == 0
    assert len(line["examples"]) == 1
    assert captured.err.splitlines()[0].split()[0] == "version" and V2 in captured.err
    saved = json.loads(out.read_text())
    assert len(saved["examples"]) == 4 and saved["examples"][0]["predictions"] == {V1: "Positive", V2: "positive."}
    _, headers = server.requests[0]
    assert (headers["x-prad-admin-token"], headers["authorization"]) == ("admin-2", "Bearer key-2")


def test_cli_reports_a_refused_pin(data: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(rv, "make_client", _fake_client(FakeServer(script=[403])))
    monkeypatch.delenv("PRAD_ADMIN_TOKEN", raising=False)
    args = _eval_args("--server", SERVER, "--task", "sst2", "--data", str(data), "--versions", V1, "--no-progress")
    assert args.func(args) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "pinning not allowed" in captured.err
