"""Ship batches of ``LokiEntry`` to Grafana Loki's push API (the I/O half of the Loki sink).

The pure half lives in ``_loki_proto`` (encoders, ``Batcher``, ``classify_status``, ``Backoff``)
and is re-exported here, so ``fluentforward.sinks.loki`` is the one import for callers.

How the pipeline drives it::

    batcher = sink.batcher()
    for entry in entries_from_spool:
        for batch in batcher.add(entry, now=trio.current_time()):
            outcomes = await sink.push_with_retry(batch)       # returns when nothing is left to retry
    ...                                                       # and batcher.due(now) on a timer
    for outcome in outcomes:
        if outcome.verdict is not Verdict.DELIVERED:          # PARTIAL or REJECTED
            dead_letter(outcome.batch, outcome.message)       # the valid part of a 400 is stored
    # only now advance the spool's delivery cursor past these entries

(``pipeline.Shipper`` cuts its batches per round instead, and pre-encoded: ``PushBuffer.batches``
gives ``EncodedBatch`` values, whose protobuf body is joined from bytes; a JSON sink decodes them.
Every method here takes either kind of batch.)

``push`` is one attempt and never raises for Loki's or the network's sake: it returns a
``PushOutcome``. ``push_with_retry`` loops: RETRY (429, 5xx but 501, timeouts, connection errors)
with jittered exponential backoff and no attempt limit; AUTH (401/403) keeps the data, sets
``auth_failed`` (for readiness) and retries slowly; SPLIT (413, or a 429 that persists) resends
in halves. Cancel it with a trio cancel scope to stop (at shutdown): the batch then stays in the
spool and is resent later, which is harmless because Loki drops identical (stream, timestamp,
line) entries.

Invariants: requests are bounded in number (``concurrency``), in time (``timeout_s``) and in what
is read back (``MAX_ERROR_BODY_BYTES``); one request carries one tenant's entries; no request
follows a redirect.
"""

from __future__ import annotations

import base64
import contextlib
import random
import re
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, cast

import attrs
import httpx
import structlog
import trio

from fluentforward import __version__
from fluentforward.errors import ConfigError
from fluentforward.sinks._loki_proto import (
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_MAX_BACKOFF_S,
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MIN_BACKOFF_S,
    AnyBatch,
    Backoff,
    Batch,
    Batcher,
    EncodedBatch,
    EncodedEntry,
    EncodedPush,
    PushBuffer,
    PushOutcome,
    Verdict,
    classify_status,
    encode_push_json,
    encode_push_protobuf,
    entry_size,
    render_selector,
)

# The pure half's names are re-exported: this module is the one import for callers.
__all__ = [
    "DEFAULT_BATCH_WAIT_S",
    "DEFAULT_MAX_BACKOFF_S",
    "DEFAULT_MAX_BATCH_BYTES",
    "DEFAULT_MIN_BACKOFF_S",
    "PUSH_PATH",
    "AnyBatch",
    "Backoff",
    "Batch",
    "Batcher",
    "EncodedBatch",
    "EncodedEntry",
    "EncodedPush",
    "LokiSettings",
    "LokiSink",
    "PushBuffer",
    "PushOutcome",
    "Verdict",
    "classify_status",
    "encode_push_json",
    "encode_push_protobuf",
    "entry_size",
    "push_url",
    "render_selector",
]

log = structlog.get_logger("fluentforward.sinks.loki")

PUSH_PATH = "/loki/api/v1/push"

# Promtail's and Alloy's request timeout: a 1 MiB push that takes longer is stuck, not slow.
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
# Requests in flight at once. Loki orders nothing across requests, so more only adds load.
DEFAULT_CONCURRENCY = 4
# Loki's error bodies are one line naming streams and reasons; a 400 for a big batch can list many
# entries. The first 16 KiB say what went wrong; the rest is not read (nor held in memory).
MAX_ERROR_BODY_BYTES = 16 * 1024
# A batch that is 429'd this many times in a row is split: Loki answers 429 on every attempt to a
# request larger than the tenant burst (LOKI.md A6), so waiting alone would never succeed.
SPLIT_AFTER_RATE_LIMITS = 3
# Auth failures wait for an operator, not for Loki: retry every 10 s at first, up to 5 min.
AUTH_MIN_BACKOFF_S = 10.0
AUTH_MAX_BACKOFF_S = 300.0
# Loki's tenant ID rules (docs/sources/operations/multi-tenancy.md, "Restrictions").
_TENANT_RE = re.compile(r"[A-Za-z0-9!._*'()-]{1,150}")
# These describe the body; the sink sets them itself.
_RESERVED_HEADERS = frozenset({"content-type", "content-encoding", "content-length", "host"})


def push_url(url: str) -> str:
    """The push endpoint for a configured Loki URL.

    Args:
        url: a base URL (``http://loki:3100``, with or without a trailing ``/``), which gets
            ``/loki/api/v1/push`` appended, or a URL with a path (a gateway), used as given.

    Returns:
        The URL to POST to.

    Raises:
        ConfigError: the URL is not http(s) or has no host.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"loki url {url!r}: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"loki url {url!r}: expected http:// or https:// with a host")
    if parsed.path in ("", "/"):
        return str(parsed.copy_with(path=PUSH_PATH))
    return url


def _optional_path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def _header_pairs(value: Mapping[str, str] | tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple((str(k), str(v)) for k, v in items)


@attrs.frozen(kw_only=True)
class LokiSettings:
    """How to reach Loki.

    Attributes:
        url: base URL (``/loki/api/v1/push`` is appended) or full push URL (see ``push_url``).
        format: ``protobuf`` (snappy-compressed, Loki's default) or ``json`` (gzip-compressed).
        tenant: X-Scope-OrgID for entries without their own tenant; None sends no header.
        username, password: HTTP basic auth.
        bearer_token, bearer_token_file: ``Authorization: Bearer``; the file is read at start
            and again after a 401 (rotated tokens).
        headers: extra request headers (not Content-Type/-Encoding/-Length or Host).
        ca_file: CA bundle to verify Loki's certificate (default: the system store).
        cert_file, key_file: client certificate for mutual TLS (key may be inside cert_file).
        insecure_skip_verify: do not verify Loki's certificate (testing only).
        timeout_s, connect_timeout_s: per-request and connect timeouts.
        max_batch_bytes, batch_wait_s: batch limits (see ``Batcher``).
        concurrency: requests in flight at once.
        min_backoff_s, max_backoff_s: retry backoff bounds.
    """

    url: str
    format: Literal["protobuf", "json"] = "protobuf"
    tenant: str | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)  # secrets stay out of logs
    bearer_token: str | None = attrs.field(default=None, repr=False)
    bearer_token_file: Path | None = attrs.field(default=None, converter=_optional_path)
    headers: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_header_pairs)
    ca_file: Path | None = attrs.field(default=None, converter=_optional_path)
    cert_file: Path | None = attrs.field(default=None, converter=_optional_path)
    key_file: Path | None = attrs.field(default=None, converter=_optional_path)
    insecure_skip_verify: bool = False
    timeout_s: float = DEFAULT_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    batch_wait_s: float = DEFAULT_BATCH_WAIT_S
    concurrency: int = DEFAULT_CONCURRENCY
    min_backoff_s: float = DEFAULT_MIN_BACKOFF_S
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S

    def __attrs_post_init__(self) -> None:
        push_url(self.url)  # raises ConfigError
        if self.format not in ("protobuf", "json"):
            raise ConfigError(f"loki format {self.format!r}: expected protobuf or json")
        if self.tenant is not None and not _TENANT_RE.fullmatch(self.tenant):
            raise ConfigError(f"loki tenant {self.tenant!r}: 1-150 of A-Z a-z 0-9 !-_.*'()")
        if (self.username is None) != (self.password is None):
            raise ConfigError("loki basic auth needs both a username and a password")
        schemes = [self.username is not None, self.bearer_token is not None]
        schemes.append(self.bearer_token_file is not None)
        if sum(schemes) > 1:
            raise ConfigError("loki auth: set at most one of basic auth, bearer token, token file")
        for name, _ in self.headers:
            if name.lower() in _RESERVED_HEADERS:
                raise ConfigError(f"loki header {name!r} is set by the sink itself")
            if name.lower() == "authorization" and any(schemes):
                raise ConfigError("loki header Authorization conflicts with the auth settings")
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("loki key_file needs cert_file")
        positive = {
            "timeout_s": self.timeout_s,
            "connect_timeout_s": self.connect_timeout_s,
            "max_batch_bytes": self.max_batch_bytes,
            "concurrency": self.concurrency,
            "min_backoff_s": self.min_backoff_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"loki {name} must be > 0, got {value}")
        if self.batch_wait_s < 0 or self.max_backoff_s < self.min_backoff_s:
            raise ConfigError("loki batch_wait_s must be >= 0 and max_backoff_s >= min_backoff_s")


def _ssl_context(settings: LokiSettings) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(
            cafile=None if settings.ca_file is None else str(settings.ca_file)
        )
        if settings.cert_file is not None:
            key = None if settings.key_file is None else str(settings.key_file)
            context.load_cert_chain(str(settings.cert_file), key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"loki TLS files: {exc}") from exc
    if settings.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"loki bearer_token_file {str(path)!r}: {exc}") from exc
    if not token:
        raise ConfigError(f"loki bearer_token_file {str(path)!r} is empty")
    return token


def _base_headers(settings: LokiSettings, token: str | None) -> dict[str, str]:
    headers = {"User-Agent": f"fluentforward/{__version__}"}
    if settings.username is not None and settings.password is not None:
        secret = base64.b64encode(f"{settings.username}:{settings.password}".encode()).decode()
        headers["Authorization"] = f"Basic {secret}"
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    headers.update(settings.headers)
    return headers


class _OneChunk:
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _OneChunk:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


class _Body(httpx.AsyncByteStream):
    """A request body sent as one chunk.

    httpx's own byte stream iterates with an async generator; when Loki drops the connection while
    the body is being sent, that generator is abandoned and trio reports it (ResourceWarning) at
    garbage collection. A plain iterator has nothing to finalize.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _OneChunk(self._body)


async def _read_message(response: httpx.Response) -> str:
    """Loki's error text, one line, at most MAX_ERROR_BODY_BYTES read."""
    chunks: list[bytes] = []
    size = 0
    try:
        # aclosing: leaving the loop early must close the generator here, not at garbage collection.
        body = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())  # it is one
        async with contextlib.aclosing(body):
            async for chunk in body:
                chunks.append(chunk)
                size += len(chunk)
                if size >= MAX_ERROR_BODY_BYTES:
                    break
    except httpx.HTTPError as exc:
        chunks.append(f" (body unreadable: {type(exc).__name__})".encode())
    text = b"".join(chunks)[:MAX_ERROR_BODY_BYTES].decode("utf-8", "replace")
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text + " ..." if size > MAX_ERROR_BODY_BYTES else text


class LokiSink:
    """Sends ``Batch`` values to Loki's push endpoint over one ``httpx.AsyncClient``.

    Use as ``async with LokiSink(settings) as sink:`` (or call ``aclose``). A client passed in
    (tests: one with a mock transport) is used as is and not closed by the sink.

    Raises:
        ConfigError: from the constructor, when TLS files or the token file cannot be read.
    """

    def __init__(self, settings: LokiSettings, *, client: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._url = push_url(settings.url)
        self._encode = encode_push_json if settings.format == "json" else encode_push_protobuf
        self._protobuf = settings.format == "protobuf"
        self._token = settings.bearer_token
        if settings.bearer_token_file is not None:
            self._token = _read_token(settings.bearer_token_file)
        self._headers = _base_headers(settings, self._token)
        self._limiter = trio.CapacityLimiter(settings.concurrency)
        self._auth_failed = False
        self._owns_client = client is None
        if client is None:
            client = httpx.AsyncClient(
                verify=_ssl_context(settings) if self._url.startswith("https:") else True,
                timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
                limits=httpx.Limits(
                    max_connections=settings.concurrency,
                    max_keepalive_connections=settings.concurrency,
                ),
                follow_redirects=False,
                # Proxies and CA bundles come from our settings, not from the environment.
                trust_env=False,
            )
        self._client = client

    @property
    def url(self) -> str:
        """The push endpoint."""
        return self._url

    @property
    def format(self) -> str:
        """The body format, ``protobuf`` or ``json``: only protobuf takes ``EncodedBatch`` as is."""
        return self._settings.format

    @property
    def auth_failed(self) -> bool:
        """True from a 401/403 until Loki accepts a request again: report not ready."""
        return self._auth_failed

    def batcher(self) -> Batcher:
        """A ``Batcher`` sized by the settings."""
        return Batcher(max_bytes=self._settings.max_batch_bytes, max_wait_s=self._settings.batch_wait_s)

    async def aclose(self) -> None:
        """Close the HTTP client if the sink created it."""
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def push(self, batch: AnyBatch) -> PushOutcome:
        """Send one batch in one request (one tenant) and classify the answer.

        Args:
            batch: the entries; ``batch.tenant`` (or the settings' tenant) is the X-Scope-OrgID.

        Returns:
            The outcome, with Loki's error text for anything but a 2xx. Network failures and
            timeouts are RETRY outcomes with ``status`` None, not exceptions.
        """
        headers = dict(self._headers)
        tenant = batch.tenant if batch.tenant is not None else self._settings.tenant
        if tenant is not None:
            if not _TENANT_RE.fullmatch(tenant):
                # Loki would answer 401 forever (or httpx refuse the header): never retryable.
                message = f"invalid tenant {tenant!r}: 1-150 of A-Z a-z 0-9 !-_.*'()"
                return PushOutcome(verdict=Verdict.REJECTED, batch=batch, status=None, message=message)
            headers["X-Scope-OrgID"] = tenant
        if self._protobuf and isinstance(batch, EncodedBatch):
            encoded = batch.encode_protobuf()
        else:
            encoded = self._encode(batch.entries)
        headers.update(encoded.headers)
        request = self._client.build_request("POST", self._url, content=encoded.body, headers=headers)
        request.stream = _Body(encoded.body)  # same bytes, same Content-Length; see _Body
        async with self._limiter:
            try:
                response = await self._client.send(request, stream=True)
                try:
                    status = response.status_code
                    message = await _read_message(response)
                finally:
                    await response.aclose()
            except httpx.TimeoutException as exc:
                return PushOutcome(
                    verdict=Verdict.RETRY, batch=batch, status=None, message=f"timeout ({type(exc).__name__})"
                )
            except httpx.HTTPError as exc:
                text = f"{type(exc).__name__}: {exc}".rstrip(": ")
                return PushOutcome(verdict=Verdict.RETRY, batch=batch, status=None, message=text)
        verdict = classify_status(status)
        if verdict is Verdict.AUTH:
            self._auth_failed = True
            if status == 401:
                await self._reload_token()
        else:
            self._auth_failed = False  # an answer from past the auth layer
        return PushOutcome(verdict=verdict, batch=batch, status=status, message=message)

    async def push_with_retry(
        self,
        batch: AnyBatch,
        *,
        sleep: Callable[[float], Awaitable[object]] = trio.sleep,
        rand: Callable[[], float] = random.random,
        on_retry: Callable[[PushOutcome, float], object] | None = None,
    ) -> list[PushOutcome]:
        """Push a batch until nothing is left to retry.

        Args:
            batch: the entries to deliver.
            sleep: awaited between attempts (tests pass a recorder).
            rand: the backoff's random source.
            on_retry: called with each outcome that will be retried and the delay before it
                (readiness, metrics); retries are also logged as ``loki_push_retry``.

        Returns:
            The final outcome of every piece sent, in order: one, or more if the batch was split.
            Each is DELIVERED, PARTIAL (400: dead-letter, the valid part is stored) or REJECTED
            (dead-letter); a 413 on a single entry is REJECTED.
        """
        backoff = Backoff(min_s=self._settings.min_backoff_s, max_s=self._settings.max_backoff_s, rand=rand)
        auth_backoff = Backoff(min_s=AUTH_MIN_BACKOFF_S, max_s=AUTH_MAX_BACKOFF_S, rand=rand)
        finals: list[PushOutcome] = []
        pending = [batch]  # a stack: the next piece to send is last
        while pending:
            piece = pending.pop()
            rate_limited = 0
            while True:
                outcome = await self.push(piece)
                verdict = outcome.verdict
                if verdict in (Verdict.DELIVERED, Verdict.PARTIAL, Verdict.REJECTED):
                    finals.append(outcome)
                    backoff.reset()
                    auth_backoff.reset()
                    break
                rate_limited = rate_limited + 1 if outcome.status == 429 else 0
                if verdict is Verdict.SPLIT or rate_limited >= SPLIT_AFTER_RATE_LIMITS:
                    halves = piece.split()
                    if halves is not None:
                        log.warning("loki_push_split", status=outcome.status, entries=piece.count)
                        pending.extend(reversed(halves))
                        break
                    if verdict is Verdict.SPLIT:  # one entry too large for Loki's body limit
                        finals.append(attrs.evolve(outcome, verdict=Verdict.REJECTED))
                        break
                delay = (auth_backoff if verdict is Verdict.AUTH else backoff).next_delay()
                log.warning(
                    "loki_push_retry",
                    verdict=verdict.value,
                    status=outcome.status,
                    error=outcome.message,
                    delay_s=round(delay, 3),
                )
                if on_retry is not None:
                    on_retry(outcome, delay)
                await sleep(delay)
        return finals

    async def _reload_token(self) -> None:
        path = self._settings.bearer_token_file
        if path is None:
            return
        try:
            token = (await trio.Path(path).read_text(encoding="utf-8")).strip()
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("loki_token_reload_failed", path=str(path), error=str(exc))
            return
        if token and token != self._token:
            self._token = token
            self._headers = _base_headers(self._settings, token)
            log.info("loki_token_reloaded", path=str(path))
