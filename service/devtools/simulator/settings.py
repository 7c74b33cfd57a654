"""Knobs of the Deep-Image API simulator.

`SimulatorSettings` is a frozen dataclass: every run-time change (``POST /_sim/settings``)
builds a new instance with `apply_overrides`, so a handler that took a snapshot keeps seeing one
consistent set of values for the whole request.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

KnobKind = Literal["float", "int", "bool", "str?", "int?", "float?", "keys"]

# The type of every knob, used to check overrides arriving as JSON and to build CLI flags.
# Kept explicit (rather than read from annotations) so a new field cannot silently slip through
# unchecked: `_check_kinds_cover_fields` fails at import if one is missing.
KNOB_KINDS: dict[str, KnobKind] = {
    "api_keys": "keys",
    "latency": "float",
    "processing_time": "float",
    "failure_rate": "float",
    "upstream_error_rate": "float",
    "rate_limit_rate": "float",
    "concurrency_limit": "int",
    "process_result_wait": "float",
    "callback_delay": "float",
    "callback_timeout": "float",
    "duplicate_callback_rate": "float",
    "lost_callback_rate": "float",
    "timeout_rate": "float",
    "timeout_seconds": "float",
    "send_failure_callbacks": "bool",
    "account_webhook_url": "str?",
    "max_pixels_side": "int",
    "public_url": "str?",
    "result_ttl": "float?",
    "result_padding_bytes": "int",
    "credits": "int",
    "max_jobs": "int",
    "seed": "int?",
    "fetch_inputs": "bool",
    "no_more_requests": "bool",
}

_RATES = (
    "failure_rate",
    "upstream_error_rate",
    "rate_limit_rate",
    "duplicate_callback_rate",
    "lost_callback_rate",
    "timeout_rate",
)
_NON_NEGATIVE = (
    "latency",
    "processing_time",
    "process_result_wait",
    "callback_delay",
    "timeout_seconds",
    "concurrency_limit",
    "result_padding_bytes",
    "credits",
)
_POSITIVE = ("callback_timeout", "max_pixels_side", "max_jobs")


@dataclass(frozen=True)
class SimulatorSettings:
    """Every behaviour knob of the simulator; defaults suit fast tests."""

    api_keys: frozenset[str] = frozenset({"sim-key"})
    # Seconds added before answering every /rest_api/* call.
    latency: float = 0.0
    # Seconds from submission to completion (received for the first quarter, then in_progress).
    processing_time: float = 0.2
    # Fraction of jobs that fail at the end of processing (500 with status "failed").
    failure_rate: float = 0.0
    # Fraction of process calls answered 500/502/503 {"code", "message"} (not a job failure).
    upstream_error_rate: float = 0.0
    # Fraction of process calls answered 429 TOO_MANY_REQUESTS at random.
    rate_limit_rate: float = 0.0
    # Active (not yet finished) jobs allowed per API key before 429.
    concurrency_limit: int = 100
    # How long /process_result waits for completion (the docs say about 25 s).
    process_result_wait: float = 25.0
    # Seconds between completion and the webhook POST.
    callback_delay: float = 0.0
    # Timeout of each webhook POST.
    callback_timeout: float = 10.0
    # Fraction of webhooks delivered twice.
    duplicate_callback_rate: float = 0.0
    # Fraction of webhooks never sent (the result can still be polled).
    lost_callback_rate: float = 0.0
    # Fraction of POST /rest_api/process and GET /rest_api/result/<job> calls whose answer is
    # held back `timeout_seconds` (the call itself is handled normally: a held process call
    # has created its job), so a client with a shorter read timeout sees a timeout.
    timeout_rate: float = 0.0
    # How long a call drawn by timeout_rate is held before its answer goes out.
    timeout_seconds: float = 5.0
    # Whether failed jobs also fire the webhook (the docs only describe "complete").
    send_failure_callbacks: bool = False
    # Account-level webhook (set up by Deep-Image staff in reality); used when a request has none.
    account_webhook_url: str | None = None
    # Output side limit behind "Image cannot be upscaled above W x H pixels limit."
    max_pixels_side: int = 8192
    # Base of result URLs; None = the URL the request came in on.
    public_url: str | None = None
    # Seconds a result image stays downloadable after completion; None = forever.
    result_ttl: float | None = None
    # Zero bytes appended after the encoded image, to make results bigger for benchmarks.
    result_padding_bytes: int = 0
    # Credits per API key; one is used per completed job (failed jobs cost nothing).
    credits: int = 1_000_000
    # Finished jobs kept in memory; the oldest finished ones are forgotten beyond this.
    max_jobs: int = 10_000
    # Seed of the simulator's own random.Random; None = unpredictable.
    seed: int | None = None
    # Download http(s) input images at submission, as Deep-Image does; one that cannot be
    # downloaded as an image is refused with 400 "Unidentified image" (service/devtools/simulator/
    # fetch.py). Off by default: the seed examples name public URLs unreachable here.
    fetch_inputs: bool = False
    # The account's requests are used up: every process, process_result and result call of a
    # known key is answered Deep-Image's documented 403 "No more requests are available. Next
    # requests available DATE" (DATE invented: the first of next month, UTC) until it is off.
    no_more_requests: bool = False

    def __post_init__(self) -> None:
        # Callers may hand in a set or a list; store a frozenset so the instance stays hashable.
        if not isinstance(self.api_keys, frozenset):
            object.__setattr__(self, "api_keys", frozenset(self.api_keys))
        problems = _problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    def public_knobs(self) -> dict[str, Any]:
        """The knobs as a JSON-ready dict, with the API keys left out."""
        knobs = dataclasses.asdict(self)
        del knobs["api_keys"]
        knobs["api_keys_count"] = len(self.api_keys)
        return knobs


def _problems(settings: SimulatorSettings) -> list[str]:
    problems: list[str] = []
    if not settings.api_keys or not all(isinstance(k, str) and k for k in settings.api_keys):
        problems.append("api_keys must be a non-empty set of non-empty strings")
    for name in _RATES:
        value = getattr(settings, name)
        if not 0.0 <= value <= 1.0:
            problems.append(f"{name} must be between 0 and 1")
    for name in _NON_NEGATIVE:
        if getattr(settings, name) < 0:
            problems.append(f"{name} must not be negative")
    for name in _POSITIVE:
        if getattr(settings, name) <= 0:
            problems.append(f"{name} must be positive")
    if settings.result_ttl is not None and settings.result_ttl < 0:
        problems.append("result_ttl must not be negative")
    for name in ("public_url", "account_webhook_url"):
        value = getattr(settings, name)
        if value is not None and not value.startswith(("http://", "https://")):
            problems.append(f"{name} must be an http(s) URL")
    for name, kind in KNOB_KINDS.items():
        value = getattr(settings, name)
        if kind in ("float", "float?") and isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{name} must be finite")
    return problems


def _coerce(name: str, kind: KnobKind, value: Any) -> Any:
    """Check one JSON override value against its knob kind and return it as stored."""
    if kind.endswith("?") and value is None:
        return None
    base = kind.rstrip("?")
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be a number")
        return float(value)
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer")
        return value
    if base == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false")
        return value
    if base == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string or null")
        return value
    # "keys": a list of strings.
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a list of strings")
    return frozenset(value)


def apply_overrides(settings: SimulatorSettings, overrides: Mapping[str, Any]) -> SimulatorSettings:
    """Return a copy of ``settings`` with JSON-typed overrides applied (ValueError if invalid)."""
    unknown = sorted(set(overrides) - set(KNOB_KINDS))
    if unknown:
        raise ValueError(f"unknown knob(s): {', '.join(unknown)}")
    changes = {name: _coerce(name, KNOB_KINDS[name], value) for name, value in overrides.items()}
    return dataclasses.replace(settings, **changes)


def knob_names() -> Iterable[str]:
    """Names of all knobs, in declaration order."""
    return [f.name for f in dataclasses.fields(SimulatorSettings)]


def _check_kinds_cover_fields() -> None:
    missing = set(knob_names()) ^ set(KNOB_KINDS)
    if missing:
        raise RuntimeError(f"KNOB_KINDS out of sync with SimulatorSettings: {sorted(missing)}")


_check_kinds_cover_fields()
