"""Prometheus metrics, vLLM-style names under a `prad:` prefix, one registry per service instance.

Per-task labels stay bounded: the first `max_task_labels` tasks seen keep their own label, every
later one is counted under `other` (`base`, `unknown` and `invalid` always keep their own). The
per-version families (`prad:version_*`, for comparing the versions of a task during a canary) are
bounded the same way: per task label, the first `max_version_labels` versions keep their own label.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.samples import Sample

OTHER_TASK = "other"
# Labels outside the cap: no adapter, requests naming no known task, requests that failed validation.
RESERVED_TASKS = frozenset({"base", "unknown", "invalid"})
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class TaskLabels:
    """Maps task ids to a bounded set of label values (thread-safe)."""

    def __init__(self, max_task_labels: int) -> None:
        if max_task_labels < 1:
            raise ValueError(f"max_task_labels must be >= 1, got {max_task_labels}")
        self.max_task_labels = max_task_labels
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, task: str) -> str:
        if task in RESERVED_TASKS:
            return task
        with self._lock:
            if task in self._seen:
                return task
            if len(self._seen) < self.max_task_labels:
                self._seen.add(task)
                return task
        return OTHER_TASK


class VersionLabels:
    """Maps (task label, version) to a bounded set of version label values (thread-safe)."""

    def __init__(self, max_version_labels: int) -> None:
        self.max_version_labels = max_version_labels
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, task_label: str, version: str) -> str:
        if task_label == OTHER_TASK:
            return OTHER_TASK
        with self._lock:
            seen = self._seen.setdefault(task_label, set())
            if version in seen:
                return version
            if len(seen) < self.max_version_labels:
                seen.add(version)
                return version
        return OTHER_TASK


class VersionSeries:
    """The labelled children of the per-version families for one (task, version), looked up once."""

    def __init__(self, metrics: Metrics, task: str, version: str) -> None:
        task_label = metrics.task(task)
        labels = (task_label, metrics.version(task_label, version))
        self.labels = labels
        self.requests = metrics.version_requests.labels(*labels)
        self.ttft_s = metrics.version_ttft_s.labels(*labels)
        self.itl_s = metrics.version_itl_s.labels(*labels)
        self.generation_tokens = metrics.version_generation_tokens.labels(*labels)
        self._outcomes = metrics.version_outcomes

    def outcome(self, outcome: str) -> None:
        """A finished request: its finish reason, or error:<kind>."""
        self._outcomes.labels(*self.labels, outcome).inc()


class Metrics:
    def __init__(self, max_task_labels: int = 100, max_version_labels: int = 8) -> None:
        self.registry = CollectorRegistry()
        self.task = TaskLabels(max_task_labels)
        self.version = VersionLabels(max_version_labels)
        r = self.registry

        def hist(name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"prad:{name}", doc, labels, buckets=buckets, registry=r)

        self.ttft_s = hist("time_to_first_token_seconds", "Arrival to first token", ("task",), LATENCY_BUCKETS_S)
        self.itl_s = hist("inter_token_latency_seconds", "Gap between output tokens", ("task",), ITL_BUCKETS_S)
        self.e2e_s = hist("e2e_request_latency_seconds", "Arrival to last token", ("task",), LATENCY_BUCKETS_S)
        self.queue_s = hist("request_queue_time_seconds", "Arrival to first prefill step", ("task",),
                            LATENCY_BUCKETS_S)
        self.prefill_s = hist("request_prefill_time_seconds", "First prefill step to KV handoff", ("task",),
                              LATENCY_BUCKETS_S)
        self.num_running = Gauge("prad:num_requests_running", "Requests in the decode batch", registry=r)
        self.num_waiting = Gauge("prad:num_requests_waiting", "Requests queued", ("service",), registry=r)
        self.batch_size = Gauge("prad:decode_batch_size", "Rows in the latest decode step", registry=r)
        self.kv_usage = Gauge("prad:kv_cache_usage_perc", "Reserved share of the decode KV budget (0-1)",
                              registry=r)
        self.prompt_tokens = Counter("prad:prompt_tokens", "Prompt tokens prefilled", ("task",), registry=r)
        self.generation_tokens = Counter("prad:generation_tokens", "Tokens generated", ("task",), registry=r)
        self.request_success = Counter("prad:request_success", "Finished requests", ("task", "finish_reason"),
                                       registry=r)
        self.request_errors = Counter("prad:request_errors", "Failed requests", ("task", "kind"), registry=r)
        self.kv_transfer_bytes = Counter("prad:kv_transfer_bytes", "KV bytes handed to decode", ("transport",),
                                         registry=r)
        self.kv_transfer_s = Histogram("prad:kv_transfer_latency_seconds", "Time prefill spends handing a request "
                                       "over after its last pass (a streamed handoff: its trailer)", ("transport",),
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.kv_transfer_failures = Counter("prad:kv_transfer_failures", "Failed handoffs", ("transport", "reason"),
                                            registry=r)
        self.adapter_cache = Counter("prad:adapter_cache_events", "Adapter cache hits, misses, loads, evictions",
                                     ("task", "event"), registry=r)
        self.step_failures = Counter("prad:engine_step_failures", "Engine steps over several requests that "
                                     "raised (prefill retries them alone; decode fails them)", ("service",), registry=r)
        self.row_failures = Counter("prad:request_row_failures", "Requests failed alone inside an engine step "
                                    "(their own pass, sampling, detokenizing, delivering)", ("service",), registry=r)
        self.adapter_swaps = Counter("prad:adapter_hot_swaps", "Active adapter version changes", ("task",),
                                     registry=r)
        self.prefix_hit_tokens = Counter("prad:prefix_cache_hit_tokens", "Prompt tokens whose KV came from the "
                                         "prefix cache (prefill they saved)", ("task",), registry=r)
        self.prefix_lookup_tokens = Counter("prad:prefix_cache_lookup_tokens", "Prompt tokens looked up in the "
                                            "prefix cache (hit rate = hit / lookup)", ("task",), registry=r)
        self.prefix_cache_bytes = Gauge("prad:prefix_cache_bytes", "Bytes of prompt KV held by the prefix cache",
                                        registry=r)
        version = ("task", "version")
        self.version_requests = Counter("prad:version_requests", "Requests routed to an adapter version", version,
                                        registry=r)
        self.version_outcomes = Counter("prad:version_request_outcomes", "Finished requests per adapter version: "
                                        "finish reason, or error:<kind>", (*version, "outcome"), registry=r)
        self.version_ttft_s = hist("version_time_to_first_token_seconds", "Arrival to first token, per adapter "
                                   "version", version, LATENCY_BUCKETS_S)
        self.version_itl_s = hist("version_inter_token_latency_seconds", "Gap between output tokens, per adapter "
                                  "version", version, ITL_BUCKETS_S)
        self.version_generation_tokens = Counter("prad:version_generation_tokens", "Tokens generated, per adapter "
                                                 "version", version, registry=r)
        self.version_load_failures = Counter("prad:version_load_failures", "Adapter versions of a split this node "
                                             "could not load (their traffic went to the others)", version,
                                             registry=r)

    def version_counts(self, task: str) -> dict[str, dict[str, Any]]:
        """This process's requests per adapter version of `task`, and how they ended (admin view)."""
        label = self.task(task)
        counts: dict[str, dict[str, Any]] = {}
        for sample in _samples(self.version_requests):
            if sample.labels["task"] == label:
                counts.setdefault(sample.labels["version"], {"requests": 0, "outcomes": {}})["requests"] = \
                    int(sample.value)
        for sample in _samples(self.version_outcomes):
            if sample.labels["task"] == label:
                entry = counts.setdefault(sample.labels["version"], {"requests": 0, "outcomes": {}})
                entry["outcomes"][sample.labels["outcome"]] = int(sample.value)
        return counts

    def adapter_event(self, event: str, task: str) -> None:
        self.adapter_cache.labels(self.task(task), event).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _samples(counter: Counter) -> list[Sample]:
    """A counter's `_total` samples (not `_created`)."""
    return [s for metric in counter.collect() for s in metric.samples if s.name.endswith("_total")]
