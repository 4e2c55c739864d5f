"""The front's Prometheus metrics, with `prometheus_client`: what the front measures itself
(HTTP status counts, time to first token, inter-token and end-to-end latency, as clients
see them) and, read from every engine at each scrape, what the engines count (tokens,
steps, queue, running sequences, KV use, prefix-cache hits, per-expert load).

Every name starts with `gptoss_`; an engine's series carry `engine="i"` (its index behind
the front). Each front replica keeps its own histograms and counters (Prometheus sums
replicas); the engines' series are the same from every replica."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "gptoss_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class FrontMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.http_requests = Counter(
            PREFIX + "http_requests",
            "HTTP requests answered, by route and status code",
            ["route", "code"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "From the request's arrival at the front to its first reply event",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "A finished reply's time after its first event, over its other completion tokens",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "From the request's arrival at the front to its finished reply",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            PREFIX + "rejected_requests",
            "Requests refused before reaching an engine, by reason",
            ["reason"],
            registry=self.registry,
        )
        self._engines = _EngineCollector()
        self.registry.register(self._engines)

    def observe_reply(self, started: float, first: float | None, done: float, tokens: int) -> None:
        if first is not None:
            self.ttft.observe(first - started)
            if tokens > 1:
                self.inter_token.observe((done - first) / (tokens - 1))
        self.e2e.observe(done - started)

    def render(self, engines: list[dict[str, Any]]) -> bytes:
        """The exposition text, with `engines` (each engine's `stats`, `layout`,
        `expert_load` and `outstanding`) as read for this scrape."""
        self._engines.engines = engines
        try:
            return generate_latest(self.registry)
        finally:
            self._engines.engines = []


class _EngineCollector:
    """The engines' own counts, as read at a scrape (nothing is kept between scrapes)."""

    def __init__(self) -> None:
        self.engines: list[dict[str, Any]] = []

    def collect(self) -> Iterator[Metric]:
        def family(kind: type, name: str, doc: str, labels: list[str]) -> Any:
            return kind(PREFIX + name, doc, labels=["engine", *labels])

        counters = {
            "requests": ("requests", "Requests the engine took"),
            "generated_tokens": ("generated_tokens", "Tokens sampled"),
            "prefill_tokens": ("prefill_tokens", "Prompt tokens computed"),
            "preemptions": ("preemptions", "Sequences preempted for KV blocks"),
            "steps": ("steps", "Engine steps"),
            "drafts_proposed": ("spec_decode_draft_tokens", "Draft tokens proposed"),
            "drafts_accepted": ("spec_decode_accepted_tokens", "Draft tokens accepted"),
            "drafted_steps": ("spec_decode_drafted_decodes", "Decodes that verified drafts"),
        }
        out = {k: family(CounterMetricFamily, n, d, []) for k, (n, d) in counters.items()}
        step_s = family(CounterMetricFamily, "step_seconds", "Seconds in steps", [])
        phase_s = family(CounterMetricFamily, "phase_seconds", "Seconds per step phase", ["phase"])
        waiting = family(GaugeMetricFamily, "queue_depth", "Requests waiting for a slot", [])
        running = family(GaugeMetricFamily, "running_sequences", "Sequences decoding", [])
        outstanding = family(
            GaugeMetricFamily, "front_outstanding_requests", "This front's requests in it", []
        )
        kv = family(
            GaugeMetricFamily, "kv_blocks_used_ratio", "KV blocks in use", ["shard", "kind"]
        )
        cache = {
            key: family(CounterMetricFamily, name, doc, ["shard"])
            for key, name, doc in (
                ("queried_tokens", "prefix_cache_queried_tokens", "Prompt tokens looked up"),
                ("hit_tokens", "prefix_cache_hit_tokens", "Prompt tokens found cached"),
                ("evictions", "prefix_cache_evictions", "Cached blocks evicted"),
            )
        }
        cached = family(
            GaugeMetricFamily,
            "prefix_cache_blocks",
            "Blocks holding cached prefixes",
            ["shard", "kind"],
        )
        experts = family(
            CounterMetricFamily, "expert_tokens", "Rows routed to each expert", ["layer", "expert"]
        )
        for i, engine in enumerate(self.engines):
            e, s, layout = str(i), engine["stats"], engine["layout"]
            for key, metric in out.items():
                metric.add_metric([e], s[key])
            step_s.add_metric([e], s["seconds"].get("step", 0.0))
            for phase, sec in sorted(s["seconds"].items()):
                if phase != "step":
                    phase_s.add_metric([e, phase], sec)
            waiting.add_metric([e], s["waiting"])
            running.add_metric([e], sum(s["running"]))
            outstanding.add_metric([e], engine["outstanding"])
            for shard, (full, sliding) in enumerate(s["free_blocks"]):
                for kind, free, total in (
                    ("full", full, layout["full_blocks"]),
                    ("sliding", sliding, layout["sliding_blocks"]),
                ):
                    kv.add_metric([e, str(shard), kind], 1 - free / total if total else 0.0)
            for shard, stats in enumerate(s["prefix_cache"]):
                for key, metric in cache.items():
                    metric.add_metric([e, str(shard)], stats[key])
                for kind in ("full", "sliding"):
                    cached.add_metric([e, str(shard), kind], stats[f"cached_{kind}_blocks"])
            for layer, row in enumerate(engine["expert_load"]):
                for expert, n in enumerate(row):
                    experts.add_metric([e, str(layer), str(expert)], n)
        yield from out.values()
        yield from (step_s, phase_s, waiting, running, outstanding, kv)
        yield from cache.values()
        yield from (cached, experts)
