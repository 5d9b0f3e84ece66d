"""NATS JetStream key-value transport for the cluster-state protocol (docs/protocol.md).

The only module of kube2ipvs that imports `nats`; every encoding decision lives in the pure
`kube2ipvs.protocol`. Five roles:

- `KVPublisher` (watcher): creates or binds the bucket, writes `protocol.plan_writes` batches in
  their order, and reads the whole bucket back so a restarted or new leader publishes only
  differences.
- `StateSubscriber` (director, bgp-speaker): watches `state.>` and `vs.>`, hands over complete
  `ClusterState`s only, newest first.
- `NodeSliceSubscriber` (realserver): watches its own node's keys (`node.<node>.>`) only.
- `StatusBoard` (director, bgp-speaker): small expiring status documents in a bucket of their
  own, so a bgp-speaker announces only what the director on its host has applied.
- `Lease` (ARP directors): an exclusive lease that expires unless renewed: one active director.

Concurrency. Each object owns one nats-py connection. nats-py runs its reader, flusher and pinger
tasks, plus one task per subscription, in the caller's event loop, and calls our
disconnect/reconnect callbacks from those tasks. A subscriber runs one supervisor task (`start()`).
The supervisor (re)connects, binds the bucket, starts one pump task per watched key pattern, and
feeds what the pumps queue into its assembler, yielding to the loop every few hundred values so
pings and health checks are answered during a full resync. The consumer iterates
`states()`/`slices()`; these wait on an event and always take the newest value (level-triggered:
a slow consumer skips intermediate states). `until()` waits for a state that satisfies a test.
`KVPublisher.publish` runs up to `_WINDOW` writes of one ordering batch concurrently.

Cancellation. `close()` cancels the supervisor, which stops its pumps and watches; then it closes
the connection, and the iterators end. Cancelling `publish()` stops between writes or during one.
Values already acknowledged stay. The manifest is written only after every write before it was
acknowledged, so consumers keep the previous state until the caller publishes again.

Failures. Startup never fails because the server is not up yet: `connect` retries forever. While
NATS is away, subscribers hand over nothing, so consumers keep the kernel as it is. After a
reconnect they watch again from scratch and resync. Transient write errors are retried with
backoff until the write succeeds or the caller cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import json
import logging
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Self, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType

from kube2ipvs.backoff import Backoff
from kube2ipvs.model import ClusterState
from kube2ipvs.protocol import (
    META_KEY,
    SERVICE_PREFIX,
    Assembler,
    Encoded,
    NodeSlice,
    NodeSliceAssembler,
    Write,
    encoded_from_values,
    node_prefix,
)

log = logging.getLogger(__name__)

DEFAULT_BUCKET: Final = "kube2ipvs"
# Writes of one ordering batch in flight at once: enough to hide the ack round trip (~0.25 ms
# here) without queueing megabytes in the client's pending buffer.
_WINDOW: Final = 64
# Batches at least this large are first sent pipelined (publish_async), see _pipelined_puts.
_PIPELINE_MIN: Final = 256
_PIPELINE_CHUNK: Final = 4096  # puts in flight at once on the pipelined path
# The server removes a watch consumer this long after its subscriber went away. We watch again
# after every reconnect, so the abandoned consumers must not pile up on the server.
_WATCH_INACTIVE_SECONDS: Final = 60.0
_KV_DELETE_OPS: Final = frozenset({"DEL", "PURGE"})
# JetStream API error codes (nats-server/server/errors.json).
_ERR_JS_UNAVAILABLE: Final = 10008
_ERR_MESSAGE_TOO_LARGE: Final = 10054
_ERR_STREAM_NAME_IN_USE: Final = 10058
_HTTP_UNAVAILABLE: Final = 503
_YIELD_EVERY: Final = 256


class KVError(Exception):
    """A permanent NATS or bucket error: retrying the same request will not help."""


class ValueTooLargeError(KVError):
    """A value exceeds the largest message the server accepts (max_payload, 1 MiB by default)."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        super().__init__(
            f"value of {key!r} is {size} bytes; the NATS server accepts at most {limit} "
            "(its max_payload: raise it in the server configuration, up to 64 MiB)"
        )
        self.key = key
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class NatsSettings:
    """How to reach NATS. Secrets stay out of repr; `describe()` is safe to show in /config."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    bucket: str = DEFAULT_BUCKET
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds_file: str | None = None  # nkeys + JWT (.creds file); needs the `nkeys` package
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None  # client certificate, for servers that verify clients
    tls_key_file: str | None = None
    tls_hostname: str | None = None  # the name to verify when a server URL holds an address
    name: str = "kube2ipvs"  # connection name shown by the server's monitoring
    connect_timeout: float = 2.0
    reconnect_wait: float = 1.0
    request_timeout: float = 5.0

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file or any(s.startswith("tls://") for s in self.servers))

    def describe(self) -> dict[str, object]:
        auth = "creds" if self.creds_file else "token" if self.token else "user" if self.user else "none"
        return {
            "servers": list(self.servers), "bucket": self.bucket, "name": self.name, "auth": auth,
            "user": self.user, "creds_file": self.creds_file, "tls": self.tls_enabled,
            "tls_ca_file": self.tls_ca_file, "tls_cert_file": self.tls_cert_file,
        }


def tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    """Verifies the server against `tls_ca_file` (the system CAs when unset); None without TLS."""
    if not settings.tls_enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca_file)
    if settings.tls_cert_file:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


async def connect(
    settings: NatsSettings,
    *,
    on_disconnect: Callable[[], None] | None = None,
    on_reconnect: Callable[[], None] | None = None,
) -> Client:
    """Connect, waiting as long as it takes for a server. The client then reconnects forever.

    The callbacks run in nats-py's reader task, so they must not block (set a flag or an event).
    Raises only for settings that can never work: unreadable TLS files, or a creds file
    without the `nkeys` package.
    """
    if settings.creds_file and importlib.util.find_spec("nkeys") is None:
        raise KVError("a NATS creds file is set but the `nkeys` package is not installed "
                      "(pip install 'nats-py[nkeys]')")
    failures = 0

    async def errored(exc: Exception) -> None:
        nonlocal failures
        failures += 1
        # nats-py reports every failed attempt. While a server stays down that is one report
        # per reconnect wait, so only the first of a streak is logged as a warning.
        log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                "event=nats_error error=%r failures=%d", exc, failures)

    async def disconnected() -> None:
        if client.is_closed:  # our own close(), not a lost server
            return
        log.warning("event=nats_disconnected")
        if on_disconnect is not None:
            on_disconnect()

    async def reconnected() -> None:
        nonlocal failures
        failures = 0
        log.info("event=nats_reconnected server=%s", _server(client))
        if on_reconnect is not None:
            on_reconnect()

    options: dict[str, Any] = {
        "servers": list(settings.servers), "name": settings.name,
        "connect_timeout": settings.connect_timeout, "reconnect_time_wait": settings.reconnect_wait,
        # -1: nats-py retries forever, both the first connection and every reconnection.
        "max_reconnect_attempts": -1, "allow_reconnect": True,
        "error_cb": errored, "disconnected_cb": disconnected, "reconnected_cb": reconnected,
        "user": settings.user, "password": settings.password, "token": settings.token,
        "user_credentials": settings.creds_file,
        "tls": tls_context(settings), "tls_hostname": settings.tls_hostname,
    }
    client = Client()
    try:
        await client.connect(**{k: v for k, v in options.items() if v is not None})
    except BaseException:
        # Cancelled while waiting for a server (a shutdown before NATS came up): leave no
        # half-open transport or client task behind.
        with contextlib.suppress(Exception):
            await client.close()
        raise
    failures = 0
    log.info("event=nats_connected server=%s", _server(client))
    return client


def _server(client: Client) -> str:
    url = client.connected_url
    return url.netloc.rpartition("@")[2] if url is not None else "?"  # never log credentials


def _is_transient(exc: BaseException) -> bool:
    """Worth retrying: the server is away or restarting, or JetStream is not ready yet."""
    if isinstance(exc, nats.js.errors.ServerError):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        return exc.err_code == _ERR_JS_UNAVAILABLE or exc.code == _HTTP_UNAVAILABLE
    return isinstance(exc, (
        asyncio.TimeoutError, OSError, nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError,
        nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
        nats.errors.StaleConnectionError,
    ))


R = TypeVar("R")


async def _retrying(what: str, call: Callable[[], Awaitable[R]]) -> R:
    backoff = Backoff(initial=0.1, maximum=5.0)
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            attempt += 1
            delay = backoff.next()
            log.log(logging.WARNING if attempt == 1 else logging.DEBUG,
                    "event=retry op=%r error=%r attempt=%d delay=%.2f", what, exc, attempt, delay)
            await asyncio.sleep(delay)


class _Link:
    """One connection and the state every role reports on /healthz."""

    def __init__(self, settings: NatsSettings) -> None:
        self.settings = settings
        self.client: Client | None = None
        self.disconnected_since: float | None = time.time()  # not connected yet

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.is_connected

    async def open(self, on_reconnect: Callable[[], None] | None = None) -> None:
        def disconnected() -> None:
            self.disconnected_since = time.time()

        def reconnected() -> None:
            self.disconnected_since = None
            if on_reconnect is not None:
                on_reconnect()

        self.client = await connect(self.settings, on_disconnect=disconnected, on_reconnect=reconnected)
        self.disconnected_since = None

    def jetstream(self) -> Any:
        assert self.client is not None, "open() first"
        return self.client.jetstream(timeout=self.settings.request_timeout)

    async def close(self) -> None:
        if self.client is not None and not self.client.is_closed:
            with contextlib.suppress(Exception):
                await self.client.close()


# ---------------------------------------------------------------------------------------------
# Publisher (watcher)


class KVPublisher:
    """Writes the cluster state into the bucket. One per watcher replica; only the leader writes.

    After a reconnect (`on_reconnect`), or on becoming leader, call `published()` and plan the
    next writes against what it returns. The bucket may hold less than this process last wrote
    (a server that lost its store) or more (another leader wrote after it).
    """

    def __init__(self, settings: NatsSettings, *, on_reconnect: Callable[[], None] | None = None) -> None:
        self._link = _Link(settings)
        self._on_reconnect = on_reconnect
        self._kv: Any = None

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def disconnected_since(self) -> float | None:
        return self._link.disconnected_since

    @property
    def max_value_size(self) -> int:
        """The largest value the connected server accepts (its max_payload)."""
        assert self._link.client is not None, "start() first"
        return int(self._link.client.max_payload)

    async def start(self) -> None:
        """Connect (waiting for the server as long as it takes), then create or bind the bucket."""
        await self._link.open(self._on_reconnect)
        await self.ensure_bucket()

    async def close(self) -> None:
        await self._link.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def ensure_bucket(self) -> None:
        """Bind the bucket, or create it (file storage, history 1) when it does not exist."""
        self._kv = await _retrying("ensure_bucket", self._bind_or_create)

    async def _bind_or_create(self) -> Any:
        js = self._link.jetstream()
        bucket = self._link.settings.bucket
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        else:
            status = await kv.status()
            if status.stream_info.config.storage != StorageType.FILE:
                log.warning("event=bucket_not_file_storage bucket=%s reason=%r", bucket,
                            "its contents do not survive a server restart")
            return kv
        config = KeyValueConfig(
            bucket=bucket, history=1, storage=StorageType.FILE,
            # -1: no limit of the bucket's own; the server's max_payload (1 MiB by default) applies.
            max_value_size=-1,
            description="kube2ipvs cluster state (docs/protocol.md)",
        )
        try:
            kv = await js.create_key_value(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code != _ERR_STREAM_NAME_IN_USE:
                raise
            return await js.key_value(bucket)  # another replica created it a moment ago
        log.info("event=bucket_created bucket=%s", bucket)
        return kv

    async def publish(self, writes: Sequence[Write]) -> int:
        """Apply `writes` in order; return the value bytes written (deletions count 0).

        Writes between two manifest writes are independent keys, so they go concurrently. Each
        such batch is acknowledged before the next one starts, so `plan_writes`' order (values,
        deletions, then the manifest) holds on the server. When a value exceeds the server's
        limit, raises ValueTooLargeError before writing anything.
        """
        if not writes:
            return 0
        limit = self.max_value_size
        for w in writes:
            if w.value is not None and len(w.value) > limit:
                raise ValueTooLargeError(w.key, len(w.value), limit)
        for whole in _batches(writes):
            batch = whole
            if len(whole) >= _PIPELINE_MIN and await self._pipelined_puts(whole):
                batch = [w for w in whole if w.value is None]  # only the deletions are left
            if not batch:
                continue
            jobs = iter(batch)
            try:
                async with asyncio.TaskGroup() as tg:
                    for _ in range(min(_WINDOW, len(batch))):
                        tg.create_task(self._drain(jobs))
            except ExceptionGroup as group:
                raise group.exceptions[0] from None
        return sum(len(w.value) for w in writes if w.value is not None)

    async def _pipelined_puts(self, batch: Sequence[Write]) -> bool:
        """Send every put of `batch` without waiting for each acknowledgement, then await them all.

        One acknowledged put at a time (even 64 in flight) is bound by the client's per-request
        work at ~8,000 puts/s; an initial publish at 10,000 services is ~100,000 puts. Returns
        False on any error, and the caller writes the batch the careful way (puts are idempotent).
        """
        if self._kv is None:
            return False
        js = self._link.jetstream()
        prefix = f"$KV.{self._link.settings.bucket}."
        puts = [w for w in batch if w.value is not None]
        # In chunks, so that a first publish at 10,000 services (~110,000 puts) does not hold
        # every future and acknowledgement at once; a chunk's wait costs one round trip.
        for start in range(0, len(puts), _PIPELINE_CHUNK):
            futures: list[asyncio.Future[Any]] = []
            try:
                for w in puts[start:start + _PIPELINE_CHUNK]:
                    futures.append(await js.publish_async(prefix + w.key, w.value))
                acks = await asyncio.wait_for(asyncio.gather(*futures), self._link.settings.request_timeout * 4)
            except Exception as exc:  # any failure: fall back to the per-write path, which classifies errors
                for f in futures:
                    f.cancel()
                log.debug("event=pipelined_put_failed error=%r (falling back to acknowledged puts)", exc)
                return False
            if not all(getattr(ack, "stream", None) for ack in acks):
                return False
            del futures, acks
        return True

    async def _drain(self, jobs: Iterator[Write]) -> None:
        for w in jobs:  # shared by the workers of one batch: each write is taken once
            await _retrying(f"write {w.key}", functools.partial(self._write, w))

    async def _write(self, w: Write) -> None:
        if self._kv is None:
            self._kv = await self._bind_or_create()
        try:
            if w.value is None:
                await self._kv.delete(w.key)
            else:
                await self._kv.put(w.key, w.value)
        except nats.js.errors.NoStreamResponseError:
            # No stream listens on the key's subject: the server lost the bucket (a fresh store).
            # Create it again on the next attempt. The caller republishes the whole state after
            # the reconnect.
            self._kv = None
            raise
        except nats.js.errors.InvalidKeyError:
            raise KVError(f"{w.key!r} is not a valid key-value key") from None
        except nats.errors.MaxPayloadError:
            raise ValueTooLargeError(w.key, len(w.value or b""), self.max_value_size) from None
        except nats.js.errors.APIError as exc:
            if exc.err_code == _ERR_MESSAGE_TOO_LARGE:
                raise ValueTooLargeError(w.key, len(w.value or b""), self.max_value_size) from None
            raise

    async def read_all(self) -> dict[str, bytes]:
        """The current value of every key; deleted keys are left out."""
        return await _retrying("read_all", self._read_all)

    async def _read_all(self) -> dict[str, bytes]:
        # Bind again every time: this is what runs after a reconnect, when the server may have
        # lost the bucket with its store (an empty bucket is created then, and {} returned).
        self._kv = await self._bind_or_create()
        watcher = await self._kv.watchall(inactive_threshold=_WATCH_INACTIVE_SECONDS)
        values: dict[str, bytes] = {}
        seen = False
        try:
            while True:
                # A last-value-per-key watch replays the bucket. Silence for a whole request
                # timeout means the server went away (a transient error: read again).
                entry = await watcher.updates(timeout=self._link.settings.request_timeout)
                if entry is None:
                    # nats-py's "replay done" marker. It overtakes entries the server already
                    # sent but the client has not processed yet, so it proves only an empty bucket.
                    if not seen and (await self._kv.status()).values == 0:
                        return values
                    continue
                seen = True
                if entry.operation in _KV_DELETE_OPS:
                    values.pop(entry.key, None)
                else:
                    values[entry.key] = bytes(entry.value)
                if entry.delta == 0:  # nothing left to deliver: the snapshot is complete
                    return values
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def published(self) -> Encoded | None:
        """What the bucket holds, as `plan_writes`' `previous`. None for an empty bucket."""
        values = await self.read_all()
        return encoded_from_values(values) if values else None


def _batches(writes: Sequence[Write]) -> list[list[Write]]:
    """Split at every manifest write, and wherever a key repeats, so order across them holds."""
    batches: list[list[Write]] = []
    current: list[Write] = []
    keys: set[str] = set()  # of `current`: a set, since an initial publish has ~100,000 writes
    for w in writes:
        if current and (w.key == META_KEY or w.key in keys or current[-1].key == META_KEY):
            batches.append(current)
            current = []
            keys = set()
        current.append(w)
        keys.add(w.key)
    if current:
        batches.append(current)
    return batches


# ---------------------------------------------------------------------------------------------
# Subscribers


class _Resync:
    """Queued by the reconnect callback: the supervisor drops its watches and starts over."""


class _Replayed:
    """Queued by a pump for nats-py's "replay done" marker (None).

    The marker can overtake entries that are already on their way, so it proves the replay
    complete only when nothing matches the watch. Otherwise the entry with nothing pending does.
    """


class _Ended:
    """Queued by a pump whose watch stopped without being asked to."""


_Update = tuple[str, bytes | None, int]  # key, value (None: deleted), entries still pending
_Item = _Update | _Resync | _Replayed | _Ended
T = TypeVar("T")


class _WatchEndedError(Exception):
    pass


class _Subscriber(Generic[T]):
    """What both subscribers share: connection, bucket binding, re-watching, hand-over."""

    _kind = "subscriber"

    def __init__(self, settings: NatsSettings) -> None:
        self._link = _Link(settings)
        self._task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._newer = asyncio.Event()  # a value other than the last one handed over is waiting
        self._retry_now = asyncio.Event()
        self._latest: T | None = None
        self._handed: T | None = None
        self._offered = asyncio.Event()  # replaced after each offer: wakes every `until()`
        self._closed = False
        self._status = "connecting"
        self._updated_at: float | None = None
        self._rejected: Mapping[str, str] = {}

    @property
    def rejected(self) -> Mapping[str, str]:
        """The keys whose current value was refused, and why (`event=value_rejected`): what
        this consumer does not apply until the watcher writes them again."""
        return self._rejected

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def disconnected_since(self) -> float | None:
        """Wall-clock time the connection was lost (or the subscriber created); None while connected."""
        return self._link.disconnected_since

    @property
    def status(self) -> str:
        """One line for /healthz: `in sync`, `waiting for bucket ...`, `syncing: ...`."""
        return self._status if self.connected else "nats disconnected"

    async def start(self) -> None:
        """Start the supervisor task. Returns at once: the server may not be up yet."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"nats-{self._kind}")

    async def close(self) -> None:
        self._closed = True
        self._newer.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._link.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _newest(self) -> AsyncIterator[T]:
        while True:
            await self._newer.wait()
            self._newer.clear()
            if self._closed:
                return
            latest = self._latest
            if latest is None or self._same(latest, self._handed):
                continue
            self._handed = latest
            yield latest

    async def until(self, predicate: Callable[[T], bool]) -> T:
        """The first value (the current one included) for which `predicate` holds."""
        while True:
            offered = self._offered
            if self._latest is not None and predicate(self._latest):
                return self._latest
            await offered.wait()

    def _offer(self, value: T) -> None:
        self._status = "in sync"
        self._updated_at = time.time()
        self._latest = value
        self._offered.set()
        self._offered = asyncio.Event()
        if not self._same(value, self._handed):
            self._newer.set()

    def _same(self, value: T, other: T | None) -> bool:
        return value == other

    async def _supervise(self) -> None:
        def reconnected() -> None:
            if self._queue is not None:
                self._queue.put_nowait(_Resync())
            self._retry_now.set()

        try:
            await self._link.open(reconnected)
        except Exception as exc:  # settings that can never work: say so on /healthz, hand over nothing
            log.exception("event=nats_settings_rejected")
            self._status = f"nats settings rejected: {exc}"
            return
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            try:
                await self._session()
                backoff.reset()
                continue
            except nats.js.errors.BucketNotFoundError:
                self._status = f"waiting for bucket {self._link.settings.bucket!r} (nothing published yet)"
                log.info("event=bucket_missing bucket=%s", self._link.settings.bucket)
            except _WatchEndedError:
                self._status = "watch ended; watching again"
                log.warning("event=watch_ended")
            except Exception as exc:
                if _is_transient(exc):
                    log.warning("event=watch_failed error=%r", exc)
                else:  # a bug, or a server answer we do not understand: keep trying, say so
                    log.exception("event=watch_failed")
                self._status = f"watch failed: {exc!r}"
            # The backoff, cut short when the connection comes back meanwhile.
            self._retry_now.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry_now.wait(), backoff.next())

    async def _session(self) -> None:
        js = self._link.jetstream()
        kv = await js.key_value(self._link.settings.bucket)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._queue = queue
        watchers: list[Any] = []
        pumps: list[asyncio.Task[None]] = []
        try:
            for pattern in self._patterns():
                watcher = await kv.watch(pattern, inactive_threshold=_WATCH_INACTIVE_SECONDS)
                watchers.append(watcher)
                pumps.append(asyncio.create_task(_pump(watcher, queue), name=f"nats-watch {pattern}"))
            self._status = "syncing"
            await self._consume(queue, kv)
        finally:
            self._queue = None
            for pump in pumps:
                pump.cancel()
            for watcher in watchers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(watcher.stop(), 1.0)
            await asyncio.gather(*pumps, return_exceptions=True)

    def _patterns(self) -> Sequence[str]:
        raise NotImplementedError

    async def _consume(self, queue: asyncio.Queue[_Item], kv: Any) -> None:
        """Apply queued updates until a resync is due (return) or the watch breaks (raise)."""
        raise NotImplementedError


async def _pump(watcher: Any, queue: asyncio.Queue[_Item]) -> None:
    async for entry in watcher:
        if entry is None:
            queue.put_nowait(_Replayed())
        elif entry.operation in _KV_DELETE_OPS:
            queue.put_nowait((entry.key, None, entry.delta or 0))
        else:
            queue.put_nowait((entry.key, bytes(entry.value), entry.delta or 0))
    queue.put_nowait(_Ended())


async def _burst(queue: asyncio.Queue[_Item], timeout: float | None = None) -> list[_Item]:
    """Everything queued, so a burst is applied at once and judged once. [] on timeout."""
    try:
        items = [await asyncio.wait_for(queue.get(), timeout)]
    except TimeoutError:
        return []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


class StateSubscriber(_Subscriber[ClusterState]):
    """Complete cluster states, for directors and bgp-speakers.

        async with StateSubscriber(settings) as sub:
            async for state in sub.states():   # complete states only; a slow loop gets the newest
                ...

    A state is handed over once its manifest and values whose hash equals the manifest's are in;
    never a partial one. After a reconnect the bucket is read again from scratch. A state
    equal to the one handed over last is not handed over again.
    """

    _kind = "state-subscriber"

    def states(self) -> AsyncIterator[ClusterState]:
        """The newest complete state each time one arrives. Ends when the subscriber is closed."""
        return self._newest()

    @property
    def latest(self) -> ClusterState | None:
        return self._latest

    @property
    def last_state_at(self) -> float | None:
        """Wall-clock time a complete state was last assembled (a new one, or confirmed by a resync)."""
        return self._updated_at

    def _same(self, value: ClusterState, other: ClusterState | None) -> bool:
        # Comparing two states field by field takes ~70 ms at 10,000 services; the hash covers
        # every service and VIP, and the generation and node list cover the rest.
        return other is not None and (value.generation, value.content_hash, value.nodes) == \
            (other.generation, other.content_hash, other.nodes)

    def _patterns(self) -> Sequence[str]:
        # Two watches, because nats-server 2.9 allows one filter subject per consumer, and `>`
        # would also bring every node slice (more than twice the bytes). The assembler needs
        # no order between the two watches.
        return ("state.>", f"{SERVICE_PREFIX}>")

    async def _consume(self, queue: asyncio.Queue[_Item], kv: Any) -> None:
        assembler = Assembler()
        # The newest manifest has not been assembled yet. Assembling sorts and hashes every
        # service, so it is tried only while this is set and the assembler's cheap
        # completeness check passes, not after every value.
        pending = False
        while True:
            for n, item in enumerate(await _burst(queue), 1):
                if n % _YIELD_EVERY == 0:
                    # Decoding a value takes ~0.2 ms; a full resync is 10,000 of them.
                    await asyncio.sleep(0)
                if isinstance(item, _Resync):
                    log.info("event=resync reason=reconnected")
                    return
                if isinstance(item, _Ended):
                    raise _WatchEndedError
                if isinstance(item, _Replayed):
                    continue  # completeness comes from the manifest, not from the watch
                key, value, _pending = item
                assembler.update(key, value)
                if key in assembler.problems:
                    log.error("event=value_rejected key=%s error=%s", key, assembler.problems[key])
                pending = pending or key == META_KEY
            if assembler.problems or self._rejected:  # (a copy: /healthz reads it between bursts)
                self._rejected = dict(assembler.problems)
            if not pending:
                continue
            missing = assembler.missing()
            if missing:
                self._status = f"syncing: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
                continue
            state = assembler.complete()  # sorts and hashes every service: ~20 ms at 10,000
            if state is None:
                self._status = "syncing: values do not match the manifest's hash yet"
                continue
            pending = False
            log.info("event=state_complete generation=%d hash=%s services=%d",
                     state.generation, state.content_hash, len(state.services))
            self._offer(state)


class NodeSliceSubscriber(_Subscriber[NodeSlice]):
    """One node's slice, for its realserver. Only the node's own `node.<node>.>` keys are watched.

    Each key is one complete service, so once a state is published, every change is handed over
    as it comes. The initial replay is handed over whole, and only when the bucket holds a
    manifest: before that, a publish into an empty bucket is still under way. A node without
    keys then has an empty slice (no services). A missing bucket, a bucket that holds no
    manifest, or a lost connection hands over nothing: the realserver keeps the kernel as it is.
    """

    _kind = "node-slice-subscriber"

    def __init__(self, settings: NatsSettings, node: str, *, absent_recheck: float = 2.0) -> None:
        super().__init__(settings)
        self.node = node
        self._absent_recheck = absent_recheck

    def slices(self) -> AsyncIterator[NodeSlice]:
        """The node's newest slice each time it changes. Ends when the subscriber is closed."""
        return self._newest()

    @property
    def latest(self) -> NodeSlice | None:
        return self._latest

    @property
    def last_slice_at(self) -> float | None:
        return self._updated_at

    def _patterns(self) -> Sequence[str]:
        return (node_prefix(self.node) + ">",)

    async def _consume(self, queue: asyncio.Queue[_Item], kv: Any) -> None:
        assembler = NodeSliceAssembler(self.node)
        pattern = node_prefix(self.node) + ">"
        replayed = False  # every value the bucket held for this node when the watch began is in
        # The bucket holds a manifest. Until it does, the first publish (or a republish into a
        # server that lost its store) is still under way: handing over the node's keys seen so
        # far would remove services that are merely not written yet.
        published = False
        while True:
            items = await _burst(queue, self._absent_recheck if replayed and not published else None)
            for n, item in enumerate(items, 1):
                if n % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                if isinstance(item, _Resync):
                    log.info("event=resync reason=reconnected node=%s", self.node)
                    return
                if isinstance(item, _Ended):
                    raise _WatchEndedError
                if isinstance(item, _Replayed):
                    replayed = replayed or not await self._any_key(pattern)
                    continue
                key, value, pending = item
                replayed = replayed or pending == 0
                assembler.update(key, value)
                if key in assembler.problems:  # the assembler leaves the service out
                    log.error("event=value_rejected key=%s error=%s", key, assembler.problems[key])
            if assembler.problems or self._rejected:  # (a copy: /healthz reads it between bursts)
                self._rejected = dict(assembler.problems)
            if not replayed:
                continue
            if not published:
                published = await _exists(kv, META_KEY)
                if not published:
                    self._status = "waiting for the first published state"
                    continue
            self._offer(assembler.slice())
            if assembler.problems:
                self._status = f"{len(assembler.problems)} values rejected: {min(assembler.problems)}"

    async def _any_key(self, pattern: str) -> bool:
        bucket = self._link.settings.bucket
        # Counts per subject, only for this node's keys: a few hundred entries at most.
        info = await self._link.jetstream().stream_info(f"KV_{bucket}", subjects_filter=f"$KV.{bucket}.{pattern}")
        return bool(info.state.subjects)


async def _exists(kv: Any, key: str) -> bool:
    try:
        await kv.get(key)
    except nats.js.errors.KeyNotFoundError:  # also raised for a deleted key
        return False
    return True


__all__ = [
    "DEFAULT_BUCKET",
    "KVError",
    "KVPublisher",
    "NatsSettings",
    "NodeSliceSubscriber",
    "StateSubscriber",
    "ValueTooLargeError",
    "connect",
    "tls_context",
]


# ---------------------------------------------------------------------------------------------
# Status (director readiness for the bgp-speaker on the same host)

STATUS_BUCKET: Final = "kube2ipvs-status"
# A status not refreshed for this long is gone from the bucket: a director that died stops
# counting as ready without anyone deleting its key. Directors refresh on every reconcile
# (every resync interval, 10 s by default).
STATUS_TTL_SECONDS: Final = 30.0


class _ExpiringBucket:
    """A connection and a memory-storage KV bucket whose values expire `ttl` seconds after they
    were written, created by whichever process comes first (StatusBoard, Lease)."""

    _description = "kube2ipvs"

    def __init__(self, settings: NatsSettings, bucket: str, ttl: float) -> None:
        self._link = _Link(settings)
        self._bucket = bucket
        self.ttl = ttl
        self._kv: Any = None

    @property
    def connected(self) -> bool:
        return self._link.connected

    async def start(self) -> None:
        await self._link.open()
        self._kv = await _retrying(f"bucket {self._bucket}", self._bind_or_create)

    async def close(self) -> None:
        await self._link.close()

    async def _kv_call(self, call: Callable[[Any], Awaitable[R]]) -> R:
        """`call(kv)`. A memory-storage bucket does not survive a nats-server restart: when the
        call finds it gone, it is created again (or bound, if another process was first) and the
        call made once more, so readiness and leases come back with the server."""
        if self._kv is None:
            raise KVError(f"bucket {self._bucket} not started")
        try:
            return await call(self._kv)
        except Exception as exc:
            if not _bucket_gone(exc):
                raise
            log.warning("event=bucket_recreated bucket=%s reason=%r", self._bucket, str(exc))
            self._kv = await self._bind_or_create()
            return await call(self._kv)

    async def _bind_or_create(self) -> Any:
        js = self._link.jetstream()
        try:
            return await js.key_value(self._bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        config = KeyValueConfig(bucket=self._bucket, history=1, storage=StorageType.MEMORY, ttl=self.ttl,
                                description=self._description)
        try:
            return await js.create_key_value(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code != _ERR_STREAM_NAME_IN_USE:
                raise
            return await js.key_value(self._bucket)


def _bucket_gone(exc: BaseException) -> bool:
    """The stream behind a bucket is not there (not: a key is not there)."""
    if isinstance(exc, nats.js.errors.KeyNotFoundError | nats.js.errors.KeyDeletedError):
        return False
    return isinstance(exc, nats.js.errors.NoStreamResponseError | nats.js.errors.NotFoundError)


def _document(value: bytes | None) -> dict[str, Any] | None:
    """A status document: a JSON object, else None."""
    if not value:
        return None
    try:
        doc = json.loads(value)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def status_key(role: str, host: str) -> str:
    """`director.node-1_example_com`: one key per role and host (dots are NATS token separators)."""
    return f"{role}.{host.replace('.', '_')}"


class StatusBoard(_ExpiringBucket):
    """Small JSON status documents in their own bucket (memory storage, values expire after
    `ttl` seconds): a director publishes what it has applied and whether it is healthy; the
    bgp-speaker on the same host reads it before announcing anything.

        board = StatusBoard(settings); await board.start()
        await board.put("director", host, {...})
        doc = await board.get("director", host)   # None when absent or expired
    """

    _description = "kube2ipvs role status (director readiness)"

    def __init__(self, settings: NatsSettings, *, bucket: str = STATUS_BUCKET,
                 ttl: float = STATUS_TTL_SECONDS) -> None:
        super().__init__(settings, bucket, ttl)

    async def put(self, role: str, host: str, doc: Mapping[str, object]) -> None:
        """Publish once; raises when NATS is away (the caller publishes again next time)."""
        value = json.dumps(doc, sort_keys=True).encode()
        await self._kv_call(lambda kv: kv.put(status_key(role, host), value))

    async def get(self, role: str, host: str) -> dict[str, Any] | None:
        try:
            entry = await self._kv_call(lambda kv: kv.get(status_key(role, host)))
        except nats.js.errors.KeyNotFoundError:
            return None
        return _document(entry.value)

    async def watch(self, role: str, host: str) -> AsyncGenerator[dict[str, Any] | None, None]:
        """The document now (None when there is none), then each new one as it is put (None when
        deleted or not a JSON object). Ends or raises when the connection goes: watch again."""
        watcher = await self._kv_call(lambda kv: kv.watch(status_key(role, host)))
        try:
            seen = False
            async for entry in watcher:
                if entry is None:  # what the bucket held when the watch began has been delivered
                    if not seen:
                        yield None
                    seen = True
                    continue
                seen = True
                yield _document(entry.value) if entry.operation is None else None
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def documents(self) -> dict[str, dict[str, Any]]:
        """Every live document, by key (`director.dir1`), in one pass over the bucket (the
        watcher's status page). Values that are not JSON objects are left out."""
        if self._kv is None:
            raise KVError("status board not started")
        watcher = await self._kv.watchall(ignore_deletes=True)
        out: dict[str, dict[str, Any]] = {}
        try:
            async for entry in watcher:
                if entry is None:  # the end of what the bucket held when the watch began
                    break
                try:
                    doc = json.loads(entry.value or b"")
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    out[entry.key] = doc
        finally:
            await watcher.stop()
        return out


# ---------------------------------------------------------------------------------------------
# Lease (one active ARP director)

LEASE_BUCKET: Final = "kube2ipvs-leases"


class Lease(_ExpiringBucket):
    """An exclusive, expiring lease in a KV bucket whose values live `ttl` seconds: `hold()`
    acquires it when free (compare-and-set on "absent") or renews it when ours (compare-and-set
    on our last revision). A holder that stops renewing loses it `ttl` seconds after its last
    renewal, when the server expires the value; nobody else can take it before that. The caller
    must treat itself as holding only while its last successful `hold()` is younger than `ttl`
    (a holder cut off from NATS cannot know whether another took over after the expiry).
    """

    _description = "kube2ipvs leases (one active ARP director)"

    def __init__(self, settings: NatsSettings, name: str, holder: str, *, ttl: float = 1.5,
                 bucket: str = LEASE_BUCKET) -> None:
        super().__init__(settings, bucket, ttl)
        self.name, self.holder = name, holder
        self._revision: int | None = None

    async def hold(self) -> bool:
        """Acquire or renew; True when we hold the lease now. Raises when NATS is away."""
        value = self.holder.encode()
        if self._revision is not None:
            revision = self._revision
            try:
                self._revision = await self._kv_call(lambda kv: kv.update(self.name, value, last=revision))
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                self._revision = None  # expired and taken, or expired: try to take it again below
        try:
            self._revision = await self._kv_call(lambda kv: kv.create(self.name, value))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # someone else holds it
        return True

    async def release(self) -> None:
        """Give the lease up at once (a planned stop), so a standby need not wait for the expiry."""
        if self._kv is None or self._revision is None:
            return
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            await self._kv.delete(self.name, last=self._revision)
        self._revision = None

    async def current_holder(self) -> str | None:
        try:
            entry = await self._kv_call(lambda kv: kv.get(self.name))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return entry.value.decode() if entry.value else None
