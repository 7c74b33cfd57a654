"""Deep-Image.ai REST client: `POST /rest_api/process` and `GET /rest_api/result/{job}`.

Every failure is classified once, here:
- `TransientUpstreamError`: 429, 5xx that is not a job failure, timeouts, connection errors,
  and the 403 Deep-Image documents for an account out of requests ("No more requests are
  available. Next requests available DATE": a quota that comes back, not a refused key). The
  caller retries with backoff.
- `PermanentUpstreamError`: 400, every other 401/403, 404 and other 4xx, job failures (HTTP
  500 with `status: "failed"`), and answers that break the protocol. `error_code` and
  `message` go into the generation's `error`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any
from urllib.parse import quote

import requests

from service.domain import ErrorCode
from service.errors import TransientError
from service.logs import redact
from service.metrics import UPSTREAM_LATENCY
from service.text import escape_unstorable, has_unstorable

MAX_MESSAGE_CHARS = 500
# The longest job id kept (generations.upstream_job); a callback's longer one is refused too.
MAX_JOB_ID = 100
# The largest limit or count a 429's message is believed to state.
MAX_STATED_COUNT = 100_000
_LIMIT = re.compile(r"rate limit is (\d+)", re.IGNORECASE)
_ACTIVE = re.compile(r"currently processing (\d+)", re.IGNORECASE)
# The 403 of an account whose requests have run out, told from the other 403s (a missing key
# header, the legacy application header) by its documented message; the docs add when the
# requests come back ("Next requests available DATE"), which stays in the message.
_NO_MORE_REQUESTS = re.compile(r"no more requests are available", re.IGNORECASE)
_NO_USER = re.compile(r"no user found for provided token", re.IGNORECASE)


class DeepImageError(Exception):
    """Base of the errors this client raises."""

    def __init__(self, message: str, *, http_status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status


class TransientUpstreamError(DeepImageError, TransientError):
    """May succeed when tried again later."""


class UpstreamBusy(TransientUpstreamError):
    """429: the account has as many jobs processing as its plan allows (or so Deep-Image says).

    `limit` and `active` are read from the documented message ("Your rate limit is N and you
    are currently processing M images") when it has them.
    """

    def __init__(self, message: str, *, limit: int | None, active: int | None) -> None:
        super().__init__(message, http_status=429)
        self.limit = limit
        self.active = active


class UpstreamQuotaExhausted(TransientUpstreamError):
    """403 "No more requests are available": the account has used up its requests for now.

    Not a refused key: the requests come back at a date Deep-Image states ("Next requests
    available DATE", kept in the message).
    """


class PermanentUpstreamError(DeepImageError):
    """Will fail the same way again; `error_code` says which way."""

    def __init__(self, message: str, *, error_code: ErrorCode, http_status: int | None) -> None:
        super().__init__(message, http_status=http_status)
        self.error_code = error_code


@dataclasses.dataclass(frozen=True)
class UpstreamJob:
    """A `ProcessResult`: the job id, its status and (when complete) the result URL."""

    job: str
    status: str | None
    result_url: str | None

    @property
    def finished(self) -> bool:
        """Whether the job is over at Deep-Image: `complete`, or no status but a result URL
        (`status` is optional in Deep-Image's OpenAPI description; only `job` is required)."""
        return self.status == "complete" or (self.status is None and self.result_url is not None)


def upstream_session(base_url: str) -> requests.Session:
    """A pooled session for one fixed base URL, with the environment's settings read once.

    With `trust_env` on, requests reads the proxy variables, NO_PROXY, REQUESTS_CA_BUNDLE and
    ~/.netrc again on every request: a walk over the whole environment, about 1 ms of CPU
    per call, which every intake paid. The base URL does not change, so its proxy (if any)
    and CA bundle are settled here; .netrc credentials are never used (the API key travels
    in its own header).
    """
    session = requests.Session()
    session.proxies.update(requests.utils.get_environ_proxies(base_url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False
    return session


class DeepImageClient:
    """Talks to one Deep-Image base URL with one API key over one pooled session."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: tuple[float, float] = (5.0, 30.0),
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or upstream_session(self.base_url)
        # Every call's headers: the session's defaults (User-Agent, keep-alive...) and ours.
        self._headers = {
            **self.session.headers,
            "x-api-key": api_key,
            "accept": "application/json",
        }

    def process(self, payload: dict[str, Any]) -> UpstreamJob:
        """Schedule a job (`POST /rest_api/process`)."""
        return self._measured(
            "process", "POST", "/rest_api/process", payload, ErrorCode.UPSTREAM_AUTH
        )

    def result(self, job: str) -> UpstreamJob:
        """Poll a job (`GET /rest_api/result/{job}`)."""
        return self._measured(
            "result",
            "GET",
            f"/rest_api/result/{quote(job, safe='')}",
            None,
            ErrorCode.UPSTREAM_NOT_FOUND,
        )

    def _measured(
        self,
        operation: str,
        method: str,
        path: str,
        payload: dict[str, Any] | None,
        not_found: ErrorCode,
    ) -> UpstreamJob:
        started = time.perf_counter()
        outcome = "ok"
        try:
            return self._call(method, path, payload, not_found=not_found)
        except TransientUpstreamError:
            outcome = "transient"
            raise
        except PermanentUpstreamError:
            outcome = "permanent"
            raise
        finally:
            UPSTREAM_LATENCY.labels(operation, outcome).observe(time.perf_counter() - started)

    def close(self) -> None:
        self.session.close()

    def _call(
        self, method: str, path: str, payload: dict[str, Any] | None, *, not_found: ErrorCode
    ) -> UpstreamJob:
        url = self.base_url + path
        try:
            response = self.session.get_adapter(url).send(
                self._prepared(method, url, payload),
                timeout=self.timeout,
                proxies=self.session.proxies,
                verify=True if self.session.verify is None else self.session.verify,
                cert=self.session.cert,
                stream=False,
            )
            response.content  # noqa: B018 - the body read here, where its errors are caught
        except requests.Timeout as exc:
            raise TransientUpstreamError(f"Deep-Image timed out: {type(exc).__name__}") from None
        except requests.RequestException as exc:
            raise TransientUpstreamError(f"Deep-Image unreachable: {type(exc).__name__}") from None
        with response:
            return _interpret(response, not_found)

    def _prepared(
        self, method: str, url: str, payload: dict[str, Any] | None
    ) -> requests.PreparedRequest:
        """The request as `Session.request` would prepare it, less what this client never
        uses: cookies, auth, hooks and redirects (`_call` sends it with the session's
        transport adapter, its pooled connections, without following a redirect). Merging
        the session's cookie jar, hooks and settings into every call cost 5 % of an intake's
        instructions (bench/intake_cost.py)."""
        prepared = requests.PreparedRequest()
        prepared.prepare_method(method)
        prepared.prepare_url(url, None)
        prepared.prepare_headers(self._headers)
        prepared.prepare_body(None, None, payload)
        return prepared


def _interpret(response: requests.Response, not_found: ErrorCode) -> UpstreamJob:
    status = response.status_code
    body = _json_object(response)
    message = _message(body, status)
    if 200 <= status < 300:
        job = body.get("job") if body else None
        if not isinstance(job, str) or not job:
            raise PermanentUpstreamError(
                f"Deep-Image answered {status} without a job id",
                error_code=ErrorCode.UPSTREAM_PROTOCOL,
                http_status=status,
            )
        if len(job) > MAX_JOB_ID or has_unstorable(job):
            # Stored, it would fail every write of the submit's outcome, and the submit would
            # be sent again after each: a paid job each time.
            raise PermanentUpstreamError(
                f"Deep-Image answered {status} with a job id genrelay cannot store "
                f"(over {MAX_JOB_ID} characters, or a NUL)",
                error_code=ErrorCode.UPSTREAM_PROTOCOL,
                http_status=status,
            )
        assert body is not None
        job_status = body.get("status")
        if job_status == "failed":
            # Documented as a 500; said with a 2xx it means the same, and a poll taking it for
            # a job still running would wait for the generation's timeout.
            failed = message if body.get("message") else "Deep-Image reported the job failed"
            raise PermanentUpstreamError(
                failed, error_code=ErrorCode.UPSTREAM_JOB_FAILED, http_status=status
            )
        result_url = body.get("result_url")
        return UpstreamJob(
            job=job,
            status=job_status if isinstance(job_status, str) else None,
            result_url=result_url if isinstance(result_url, str) and result_url else None,
        )
    if status == 500 and body is not None and body.get("status") == "failed":
        raise PermanentUpstreamError(
            message, error_code=ErrorCode.UPSTREAM_JOB_FAILED, http_status=status
        )
    if status == 429:
        limit, active = _LIMIT.search(message), _ACTIVE.search(message)
        raise UpstreamBusy(
            message,
            limit=_plausible(limit),
            active=_plausible(active),
        )
    if status >= 500:
        raise TransientUpstreamError(message, http_status=status)
    if status == 403 and _NO_MORE_REQUESTS.search(message):
        raise UpstreamQuotaExhausted(message, http_status=403)
    if status in (401, 403):
        raise PermanentUpstreamError(
            message, error_code=ErrorCode.UPSTREAM_AUTH, http_status=status
        )
    if status == 404:
        # Deep-Image's answer to an unknown API key is a 404 too, on every call.
        code = ErrorCode.UPSTREAM_AUTH if _NO_USER.search(message) else not_found
        raise PermanentUpstreamError(message, error_code=code, http_status=status)
    if 400 <= status < 500:
        raise PermanentUpstreamError(
            message, error_code=ErrorCode.UPSTREAM_REJECTED, http_status=status
        )
    raise PermanentUpstreamError(
        f"Deep-Image answered unexpected HTTP {status}",
        error_code=ErrorCode.UPSTREAM_PROTOCOL,
        http_status=status,
    )


def _plausible(count: re.Match[str] | None) -> int | None:
    """A count a 429 states (its limit, its jobs in flight), or None past MAX_STATED_COUNT:
    no account has that many, and the database's integer could not hold some."""
    if count is None:
        return None
    value = int(count.group(1))
    return value if value <= MAX_STATED_COUNT else None


def _json_object(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _message(body: dict[str, Any] | None, status: int) -> str:
    raw = body.get("message") if body else None
    if isinstance(raw, str) and raw.strip():
        # Shown to the tenant and stored: a URL it quotes (the signed URL of a gs:// input, the
        # callback URL) loses its query and callback token.
        # A NUL or a lone surrogate in it could not be stored: the submit's outcome would
        # never be written, and the submit sent again after each lease.
        return escape_unstorable(redact(raw.strip()))[:MAX_MESSAGE_CHARS]
    return f"Deep-Image answered HTTP {status}"
