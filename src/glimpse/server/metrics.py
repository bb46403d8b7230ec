"""Prometheus metrics for GET /metrics, in the text exposition format (version 0.0.4), written by hand.

Names follow vLLM's (`vllm:` becomes `glimpse:`), so dashboards built for vLLM need only the prefix
changed. Server-side counters and histograms live here and are updated from the event loop only;
engine gauges (running/waiting, KV blocks, state slots, encoder cache) are read from
`LLMEngine.stats()` at scrape time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

PREFIX = "glimpse:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. TTFT on a CPU tiny model is milliseconds, on the real model up to tens of seconds (long videos).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0)  # fmt: skip
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0)  # fmt: skip


# LLMEngine.stats() key -> (metric name, type, help). Keys not listed are exported as gauges by name.
ENGINE_STATS = {
    "num_requests_running": ("num_requests_running", "gauge", "Sequences running in the engine."),
    "num_requests_waiting": ("num_requests_waiting", "gauge", "Sequences waiting to be scheduled."),
    "kv_blocks_used": ("kv_blocks_used", "gauge", "KV blocks in use (prefix-cached ones included)."),
    "kv_blocks_active": ("kv_blocks_active", "gauge", "KV blocks held by live sequences (0 when idle)."),
    "kv_blocks_total": ("kv_blocks_total", "gauge", "KV blocks in the pool."),
    "state_slots_used": ("state_slots_used", "gauge", "Mamba state slots in use (snapshots included)."),
    "state_slots_active": ("state_slots_active", "gauge", "State slots held by live sequences."),
    "state_slots_total": ("state_slots_total", "gauge", "Mamba state slots in the pool."),
    "num_preemptions": ("num_preemptions_total", "counter", "Sequences preempted for lack of memory."),
    "forward_tokens": ("forward_tokens_total", "counter", "Tokens run through the model."),
    "prefix_cache_queries": ("prefix_cache_queries_total", "counter", "Prefix cache lookups."),
    "prefix_cache_query_tokens": ("prefix_cache_query_tokens_total", "counter", "Prompt tokens looked up."),
    "prefix_cache_hit_tokens": ("prefix_cache_hit_tokens_total", "counter", "Prompt tokens found cached."),
    "prefix_cache_blocks": ("prefix_cache_blocks", "gauge", "KV blocks kept by the prefix cache."),
    "prefix_cache_snapshots": (
        "prefix_cache_snapshots",
        "gauge",
        "State snapshots kept by the prefix cache.",
    ),
    "encoder_cache_hits": ("encoder_cache_hits_total", "counter", "Vision encodings served from the cache."),
    "encoder_cache_misses": ("encoder_cache_misses_total", "counter", "Vision encodings computed."),
    "encoder_cache_bytes": ("encoder_cache_bytes", "gauge", "Bytes held by the encoder cache."),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: Mapping[str, str]) -> list[str]:
        out, running = [], 0
        for upper, n in zip(self.buckets, self.counts):
            running += n
            out.append(f"{name}_bucket{_labels({**labels, 'le': _number(float(upper))})} {running}")
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_number(self.total)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class ServerMetrics:
    """Counters of one server process; `render()` is the /metrics body."""

    def __init__(self, model_name: str, engine_stats: Callable[[], Mapping[str, float]] | None = None,
                 is_idle: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.model_name = model_name
        self._engine_stats = engine_stats
        self._is_idle = is_idle
        self.http_requests: dict[tuple[str, str, int], int] = {}  # (method, path, status) -> count
        self.finished: dict[str, int] = {}  # finish_reason -> requests
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generation_tokens = 0
        self.video_tokens_total = 0
        self.video_tokens_kept = 0
        self.images = 0
        self.videos = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    # Updates (event loop only) ------------------------------------------------------------------------
    def record_http(self, method: str, path: str, status: int) -> None:
        key = (method, path, status)
        self.http_requests[key] = self.http_requests.get(key, 0) + 1

    def record_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def record_request(
        self,
        *,
        prompt_tokens: int,
        generation_tokens: int,
        finish_reasons: Iterable[str | None],
        e2e_seconds: float,
        cached_tokens: int = 0,
        video_tokens: Mapping[str, int] | None = None,
        media: Iterable[Mapping] = (),
    ) -> None:
        """One engine request done (finished or aborted): its token counts and latency."""
        self.prompt_tokens += prompt_tokens
        self.cached_prompt_tokens += cached_tokens
        self.generation_tokens += generation_tokens
        for reason in finish_reasons:
            key = reason or "abort"
            self.finished[key] = self.finished.get(key, 0) + 1
        self.e2e.observe(e2e_seconds)
        if video_tokens:
            self.video_tokens_total += int(video_tokens.get("total", 0))
            self.video_tokens_kept += int(video_tokens.get("kept", 0))
        for item in media:
            if item.get("type") == "image":
                self.images += 1
            elif item.get("type") == "video":
                self.videos += 1

    # Exposition -----------------------------------------------------------------------------------------
    def render(self) -> str:
        out: list[str] = []
        model = {"model_name": self.model_name}

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            out.append(f"# HELP {PREFIX}{name} {help_text}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            out.extend(samples)

        def one(
            name: str, kind: str, help_text: str, value: float, labels: Mapping[str, str] = model
        ) -> None:
            family(name, kind, help_text, [f"{PREFIX}{name}{_labels(labels)} {_number(value)}"])

        stats = dict(self._engine_stats() if self._engine_stats else {})
        if stats.get("kv_blocks_total"):
            usage = stats.get("kv_blocks_used", 0) / stats["kv_blocks_total"]
            one("kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (1 = full).", usage)
        for key, (name, kind, help_text) in ENGINE_STATS.items():
            if key in stats:
                one(name, kind, help_text, stats.pop(key))
        for key, value in sorted(stats.items()):  # stats the engine grew since this table was written
            if isinstance(value, int | float) and key.replace("_", "").isalnum():
                one(key, "gauge", f"Engine statistic {key}.", value)
        if self._is_idle is not None:
            one("engine_idle", "gauge", "1 when no request is in flight and every block and slot is free.",
                1 if self._is_idle() else 0)  # fmt: skip

        family("http_requests_total", "counter", "HTTP requests answered, by route and status.", [
            f"{PREFIX}http_requests_total{_labels({'method': m, 'path': p, 'status': str(s)})} {n}"
            for (m, p, s), n in sorted(self.http_requests.items())
        ])  # fmt: skip
        family("request_success_total", "counter", "Generated sequences finished, by finish reason.", [
            f"{PREFIX}request_success_total{_labels({**model, 'finished_reason': r})} {n}"
            for r, n in sorted(self.finished.items())
        ])  # fmt: skip
        one("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", self.prompt_tokens)
        one("prompt_tokens_cached_total", "counter", "Prompt tokens served from the prefix cache.",
            self.cached_prompt_tokens)  # fmt: skip
        one("generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens)
        one("video_tokens_total", "counter", "Video tokens before EVS pruning.", self.video_tokens_total)
        one(
            "video_tokens_kept_total",
            "counter",
            "Video tokens kept after EVS pruning.",
            self.video_tokens_kept,
        )
        one("images_total", "counter", "Images (PDF pages included) in finished requests.", self.images)
        one("videos_total", "counter", "Videos in finished requests.", self.videos)
        family("time_to_first_token_seconds", "histogram", "Time from arrival to the first generated token.",
               self.ttft.lines(f"{PREFIX}time_to_first_token_seconds", model))  # fmt: skip
        family("e2e_request_latency_seconds", "histogram", "Time from arrival to the last generated token.",
               self.e2e.lines(f"{PREFIX}e2e_request_latency_seconds", model))  # fmt: skip
        return "\n".join(out) + "\n"


def parse_text(text: str) -> dict[str, float]:
    """`{"name{labels}": value}` of an exposition (tests and tools); comments skipped."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        values[key] = float(value)
    return values


__all__ = ["ServerMetrics", "Histogram", "CONTENT_TYPE", "PREFIX", "parse_text"]
