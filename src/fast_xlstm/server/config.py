"""Settings of the HTTP layer (the engine's own settings live on `LLMEngine`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    """What the server accepts.

    Args:
        model_names: names clients may pass as `model`; the first is the one `/v1/models` lists first.
        api_key: when set, `/v1/*` needs `Authorization: Bearer <api_key>` (401 otherwise).
            `/health` and `/metrics` stay open for probes and scrapers.
        max_model_len: most prompt + generated tokens of one request. A recurrent model has no
            context window (its state has a fixed size), so this only bounds the work one request
            may ask for; prompts longer than it, or `max_tokens` beyond what is left, get a 400.
        default_max_tokens: generated tokens when a chat request gives no `max_tokens` (completions
            default to 16, as OpenAI's do). Capped by what `max_model_len` leaves.
        max_request_bytes: larger request bodies get a 413.
        max_n: the most choices (`n`) per request.
    """

    model_names: list[str] = field(default_factory=lambda: ["xlstm-tiny"])
    api_key: str | None = None
    max_model_len: int = 1_000_000
    default_max_tokens: int = 4096
    max_request_bytes: int = 16 * 1024 * 1024
    max_n: int = 128

    def __post_init__(self) -> None:
        if not self.model_names or not all(isinstance(n, str) and n for n in self.model_names):
            raise ValueError(f"model_names must be non-empty strings, got {self.model_names!r}")
        for name in ("max_model_len", "default_max_tokens", "max_request_bytes", "max_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must be non-empty when given")
