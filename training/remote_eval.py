"""`prad eval --server`: score adapter versions of one task through a live server, side by side.

Each example's input goes to `POST {server}/generate` pinned to one adapter version
(`{"task", "input", "adapter_version", "max_new_tokens", "temperature": 0.0}`); the server formats it
with that version's prompt template. Scoring is exactly local `prad eval`'s: the prediction is
`first_line(text)`, examples are grouped by `eval_examples` and scored by `training.metrics.score`.

Failures: 429 (busy) and 503 / transport errors are retried with bounded exponential backoff; any
other failure fails that example only (scored as an empty prediction, counted in `num_errors`). Some
failures stop the whole comparison (RemoteEvalError), since scoring on would give garbage: a
401/403/404 or an unreachable server on a version's first request (sent alone, for every version,
before anything else is scored), a response pinned to another version, or every request of a version
failing.

Pure parts (request bodies, headers, response checks, scoring, table, JSON) are separate from the
I/O (`request_answer`, `compare_versions`), which takes an injectable `httpx.Client`.
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from training.data import Example
from training.evaluate import first_line
from training.metrics import PRIMARY_SCORE, score
from training.tasks import TASKS, TaskSpec, resolve_task

VERSION_PATTERN = re.compile(r"[0-9a-f]{16}")
ADMIN_TOKEN_HEADER = "X-PrAd-Admin-Token"
API_KEY_ENV = "PRAD_API_KEY"
ADMIN_TOKEN_ENV = "PRAD_ADMIN_TOKEN"
DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT_S = 120.0
BUSY = 429
UNAVAILABLE = 503
# Statuses that, on a version's first request, mean every request would fail the same way.
FATAL_ON_FIRST = {
    401: "missing or invalid API key (pass --api-key-file or set PRAD_API_KEY)",
    403: "version pinning not allowed: start the server with --allow-version-pinning, or pass the admin token "
         "(--admin-token-file or PRAD_ADMIN_TOKEN)",
    404: "unknown task or version",
}

Sleep = Callable[[float], None]


class RemoteEvalError(RuntimeError):
    """Stop the comparison: the server cannot give meaningful answers for a version."""


class ExampleFailed(Exception):
    """This example only: it is scored as an empty prediction and counted in num_errors."""


@dataclass(frozen=True)
class RetryPolicy:
    busy_retries: int = 8  # 429: queue full
    unavailable_retries: int = 3  # 503, connection errors, timeouts
    backoff_s: float = 0.5  # first wait; doubles per retry (with jitter) up to max_backoff_s
    max_backoff_s: float = 8.0

    def delay(self, retry: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number `retry` (0-based); a numeric Retry-After wins, capped."""
        if retry_after is not None:
            try:
                return min(self.max_backoff_s, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return min(self.max_backoff_s, self.backoff_s * 2**retry) * (0.5 + 0.5 * random.random())


# ---- pure: arguments, requests, responses --------------------------------------------------------


def parse_versions(text: str) -> list[str]:
    """Comma-separated 16-hex content versions, in order; 'base', blanks and repeats are refused."""
    versions = [v.strip() for v in text.split(",")]
    bad = [v for v in versions if not VERSION_PATTERN.fullmatch(v)]
    if bad:
        raise ValueError(f"bad version(s) {', '.join(repr(v) for v in bad)}: expected comma-separated adapter "
                         f"versions of 16 lower-case hex digits (as `prad adapters list` shows them)")
    repeated = sorted({v for v in versions if versions.count(v) > 1})
    if repeated:
        raise ValueError(f"version(s) listed twice: {', '.join(repeated)}")
    return versions


def remote_task_spec(task: str, metric: str | None = None) -> TaskSpec:
    """The task's metric and default max_new_tokens; its template is unused (the server applies each
    version's own). A task that is not built in needs `metric`."""
    if task in TASKS:
        return resolve_task(task, None, metric)
    if metric is None:
        raise ValueError(f"task {task!r} is not built in (built-in: {sorted(TASKS)}): pass --metric")
    return resolve_task(task, "{input}", metric)


def read_secret(path: Path | None, env_var: str) -> str | None:
    """The stripped contents of `path`, else the environment variable, else None."""
    if path is None:
        return os.environ.get(env_var) or None
    secret = Path(path).read_text().strip()
    if not secret:
        raise ValueError(f"{path}: empty secret file")
    return secret


def auth_headers(api_key: str | None, admin_token: str | None) -> dict[str, str]:
    headers = {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if admin_token:
        headers[ADMIN_TOKEN_HEADER] = admin_token
    return headers


def generate_url(server: str) -> str:
    if not server.startswith(("http://", "https://")):
        raise ValueError(f"--server {server!r}: expected an http(s) URL, e.g. http://127.0.0.1:8000")
    return server.rstrip("/") + "/generate"


def generate_body(task: str, text: str, version: str, max_new_tokens: int) -> dict[str, Any]:
    """Greedy generation of `text` formatted with `version`'s template (the server formats "input")."""
    return {"task": task, "input": text, "adapter_version": version, "max_new_tokens": max_new_tokens,
            "temperature": 0.0}


def answer_text(version: str, body: Any) -> str:
    """The generated text of a 200 response; a response from another version (or none) stops everything."""
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        raise RemoteEvalError(f"version {version}: unexpected /generate response {str(body)[:200]!r}")
    answered = body.get("adapter_version")
    if answered != version:
        raise RemoteEvalError(f"asked for version {version} but the server answered with {answered!r}: "
                              f"it did not pin the version (is this server too old for adapter_version?)")
    return body["text"]


def error_detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return str(detail)[:300]


# ---- I/O: one request, with retries --------------------------------------------------------------


def request_answer(client: httpx.Client, url: str, body: dict[str, Any], headers: Mapping[str, str],
                   policy: RetryPolicy, first: bool = False, sleep: Sleep = time.sleep) -> str:
    """The generated text for one request. Raises ExampleFailed (this example only) or RemoteEvalError
    (stop: a fatal status or an unreachable server on a version's `first` request, or a version mismatch)."""
    version = body["adapter_version"]
    busy = unavailable = 0
    while True:
        try:
            response = client.post(url, json=body, headers=dict(headers))
        except httpx.TransportError as e:
            problem = f"{type(e).__name__}: {e}"
            if unavailable < policy.unavailable_retries:
                sleep(policy.delay(unavailable))
                unavailable += 1
                continue
            if first:
                raise RemoteEvalError(f"cannot reach {url} ({problem})") from e
            raise ExampleFailed(problem) from e
        status = response.status_code
        if status == 200:
            return answer_text(version, response.json())
        if status == BUSY and busy < policy.busy_retries:
            sleep(policy.delay(busy, response.headers.get("retry-after")))
            busy += 1
            continue
        if status == UNAVAILABLE and unavailable < policy.unavailable_retries:
            sleep(policy.delay(unavailable, response.headers.get("retry-after")))
            unavailable += 1
            continue
        if first and status in FATAL_ON_FIRST:
            raise RemoteEvalError(f"task {body['task']!r} version {version}: HTTP {status}, "
                                  f"{FATAL_ON_FIRST[status]} ({error_detail(response)})")
        raise ExampleFailed(f"HTTP {status}: {error_detail(response)}")


# ---- results -------------------------------------------------------------------------------------


@dataclass
class VersionResult:
    version: str
    scores: dict[str, float]
    predictions: list[str]  # first_line of each answer; "" where the request failed
    errors: list[str | None]  # why each failed example failed, None where it was answered
    wall_s: float

    @property
    def num_examples(self) -> int:
        return len(self.predictions)

    @property
    def num_errors(self) -> int:
        return sum(e is not None for e in self.errors)

    def summary(self) -> dict[str, Any]:
        return {"scores": self.scores, "num_examples": self.num_examples, "wall_s": round(self.wall_s, 2),
                "num_errors": self.num_errors}


def score_predictions(metric: str, examples: Sequence[Example], predictions: list[str]) -> dict[str, float]:
    """Exactly local `prad eval`'s scoring of the same predictions."""
    return score(metric, predictions, [ex.target for ex in examples], [ex.references for ex in examples])


def comparison_json(task: str, metric: str, data: str, results: Sequence[VersionResult]) -> dict[str, Any]:
    return {"task": task, "metric": metric, "data": data, "versions": {r.version: r.summary() for r in results}}


def example_rows(examples: Sequence[Example], results: Sequence[VersionResult],
                 limit: int | None = None) -> list[dict[str, Any]]:
    """Per example: input, references, each version's prediction (and errors, where any)."""
    rows = []
    for i, ex in enumerate(examples[:limit]):
        row: dict[str, Any] = {"input": ex.input, "references": list(ex.references),
                               "predictions": {r.version: r.predictions[i] for r in results}}
        errors = {r.version: r.errors[i] for r in results if r.errors[i] is not None}
        if errors:
            row["errors"] = errors
        rows.append(row)
    return rows


def format_table(metric: str, results: Sequence[VersionResult]) -> str:
    """Aligned text table: version, the metric's scores, the primary score's change from the first
    version (with two or more), n, errors, wall seconds."""
    keys = list(results[0].scores) if results else []
    primary = PRIMARY_SCORE.get(metric, keys[0] if keys else "")
    delta = len(results) > 1 and primary in keys
    header = ["version", *keys, *([f"d_{primary}"] if delta else []), "n", "errors", "wall_s"]
    rows = [header]
    for r in results:
        cells = [f"{r.scores[k]:.0f}" if k.startswith("num_") else f"{r.scores[k]:.2f}" for k in keys]
        if delta:
            cells.append(f"{r.scores[primary] - results[0].scores[primary]:+.2f}")
        rows.append([r.version, *cells, str(r.num_examples), str(r.num_errors), f"{r.wall_s:.1f}"])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in rows)


# ---- I/O: whole versions -------------------------------------------------------------------------


def make_client(timeout_s: float = DEFAULT_TIMEOUT_S, concurrency: int = DEFAULT_CONCURRENCY) -> httpx.Client:
    """A client for the comparison: per-request read timeout `timeout_s`, one connection per worker."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)), limits=limits)


def _timed_first(client: httpx.Client, url: str, body: dict[str, Any], headers: Mapping[str, str],
                 policy: RetryPolicy, sleep: Sleep) -> tuple[str | None, str | None, float]:
    """(text, error, seconds) of a version's first request; fatal problems raise RemoteEvalError."""
    start_s = time.perf_counter()
    try:
        text: str | None = request_answer(client, url, body, headers, policy, first=True, sleep=sleep)
        error = None
    except ExampleFailed as e:
        text, error = None, str(e)
    return text, error, time.perf_counter() - start_s


def compare_versions(client: httpx.Client, server: str, task: str, versions: Sequence[str],
                     examples: Sequence[Example], metric: str, max_new_tokens: int,
                     headers: Mapping[str, str] | None = None, concurrency: int = DEFAULT_CONCURRENCY,
                     policy: RetryPolicy | None = None, show_progress: bool = True,
                     sleep: Sleep = time.sleep) -> list[VersionResult]:
    """Score every version on `examples` (already merged by eval_examples), in the order given.

    Every version's first example is sent first, one at a time, so a typo'd version or a server that
    refuses pinning stops the run before minutes are spent on the others."""
    if not examples:
        raise ValueError("no examples to evaluate")
    if concurrency < 1:
        raise ValueError(f"--concurrency {concurrency}: expected >= 1")
    url, policy, headers = generate_url(server), policy or RetryPolicy(), dict(headers or {})
    bodies = {v: [generate_body(task, ex.input, v, max_new_tokens) for ex in examples] for v in versions}
    firsts = {v: _timed_first(client, url, bodies[v][0], headers, policy, sleep) for v in versions}
    results = []
    for version in versions:
        text, error, first_s = firsts[version]
        texts: list[str | None] = [text, *[None] * (len(examples) - 1)]
        errors: list[str | None] = [error, *[None] * (len(examples) - 1)]
        start_s = time.perf_counter()
        with tqdm(total=len(examples), initial=1, desc=version, unit="ex", disable=not show_progress,
                  file=sys.stderr) as bar, ThreadPoolExecutor(max_workers=concurrency) as pool:
            futures = {pool.submit(request_answer, client, url, bodies[version][i], headers, policy, False, sleep): i
                       for i in range(1, len(examples))}
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        texts[i] = future.result()
                    except ExampleFailed as e:
                        errors[i] = str(e)
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        wall_s = first_s + time.perf_counter() - start_s
        if all(e is not None for e in errors):
            raise RemoteEvalError(f"version {version}: all {len(examples)} requests failed (first: {errors[0]})")
        predictions = [first_line(t) if t is not None else "" for t in texts]
        results.append(VersionResult(version, score_predictions(metric, examples, predictions), predictions,
                                     errors, wall_s))
    return results
