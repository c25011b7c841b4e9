"""Prometheus metrics of the server, in their own registry (several apps can live in one process).

Latencies are measured in the engine thread when a step's outputs come out, so a slow client does
not inflate them: time to first token from the request's arrival at the server, inter-token latency
between successive tokens of a request, end-to-end latency from arrival to the last token.
Queue sizes are read at scrape time. The prefix-cache hit rate is cached prompt tokens (taken from
the prefix cache or a session instead of prefilled) over all prompt tokens since start; the two
counters are exported too, so a dashboard can take the rate over any window.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0)

PREFIX = "fast_xlstm"


class ServerMetrics:
    """The server's metrics; `observe_*` are called by the engine thread (prometheus-client is
    thread-safe), `render()` by the `/metrics` route."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Time between successive tokens of a request.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of requests that reached their "
                                     "first token (cached or prefilled).", registry=r)
        self.cached_tokens = Counter(f"{PREFIX}_prompt_tokens_cached", "Prompt tokens taken from the prefix "
                                     "cache or a session instead of prefilled.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens.", registry=r)
        self.finished = Counter(f"{PREFIX}_requests_finished", "Engine requests that ended, by finish reason "
                                "(stop, length, abort).", ["finish_reason"], registry=r)
        self.hit_rate = Gauge(f"{PREFIX}_prefix_cache_hit_rate", "Cached prompt tokens / prompt tokens since start.",
                              registry=r)
        self.hit_rate.set_function(self._hit_rate)
        self._prompt_total = self._cached_total = 0  # the hit rate's terms (written by the engine thread only)
        self._state: Callable[[], dict[str, int]] = dict
        for key, name, doc in (
                ("running", "num_requests_running", "Requests holding a state slot (prefilling or decoding)."),
                ("waiting", "num_requests_waiting", "Requests queued for a state slot."),
                ("free_slots", "num_free_state_slots", "State slots free."),
                ("slots", "num_state_slots", "State slots in the pool (--max-num-seqs)."),
                ("tracked", "num_requests_tracked", "Requests the HTTP front streams (= running + waiting).")):
            Gauge(f"{PREFIX}_{name}", doc, registry=r).set_function(lambda key=key: self._state().get(key, 0))
        self._stats: Callable[[], dict[str, float]] = dict
        for key, name, doc in (
                ("steps", "engine_steps", "Engine steps run since start."),
                ("step_time", "engine_step_seconds", "Seconds the engine thread spent in steps since start "
                 "(its busy time: compare with wall time to see whether the engine or the front is the bottleneck)."),
                ("prefill_time", "engine_prefill_seconds", "Seconds of those spent in prefill forwards."),
                ("decode_time", "engine_decode_seconds", "Seconds of those spent in decode steps."),
                ("mixed_steps", "engine_mixed_steps", "Steps whose decode rode in the prefill forward (--mixed-steps).")):
            Gauge(f"{PREFIX}_{name}", doc, registry=r).set_function(lambda key=key: self._stats().get(key, 0))

    def bind_engine_state(self, state: Callable[[], dict[str, int]],
                          stats: Callable[[], dict[str, float]] | None = None) -> None:
        """Where the queue-size gauges (and the engine time gauges) read from at scrape time."""
        self._state = state
        if stats is not None:
            self._stats = stats

    def _hit_rate(self) -> float:
        return self._cached_total / self._prompt_total if self._prompt_total else 0.0

    # ---- called by the engine thread -------------------------------------------------------------
    def observe_first_token(self, ttft: float, prompt_tokens: int, cached_tokens: int) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self._prompt_total += prompt_tokens
        self._cached_total += cached_tokens

    def observe_inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_generated(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)

    def observe_finished(self, finish_reason: str | None, e2e: float | None) -> None:
        self.finished.labels(finish_reason=finish_reason or "unknown").inc()
        if e2e is not None:
            self.e2e.observe(e2e)

    # ---- exposition -------------------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
