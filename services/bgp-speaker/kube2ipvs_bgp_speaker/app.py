"""The bgp-speaker loop: cluster state + the local director's readiness -> routes in gobgpd.

One event loop, four tasks (`run()`, a TaskGroup; cancelling it stops them all):

    states     each new complete cluster state from NATS (the newest wins) -> kick
    director   the local director's readiness, read every `readiness_interval` -> kick on a change
               of what it allows (ready or not, which VIPs)
    peers      gobgpd's WatchEvent stream: peer session states for /metrics and /healthz; when the
               stream breaks (gobgpd stopped or restarted) -> full resync as soon as it answers
    reconcile  on a kick, every `resync_interval`, and sooner with backoff after a failure

A reconcile, in order:

    setup   (first time, on resyncs, after gobgpd was lost) BGP started with our global
            settings and our peers added or updated (or, without them, gobgpd.conf's checked)
    routes  desired = one route per VIP that has a real server and that the director reports
            serving, all routes none when the director is unhealthy, stale or gone;
            plan(desired, held) applied: announcements, then withdrawals of owned prefixes

What gobgpd holds is read (ListPath) on the first reconcile, on resyncs and after any failure;
on the path of a change it is taken to hold what the last successful apply left, so a new VIP
costs one AddPath. Nothing is touched before the first cluster state and the first answer
about the director ("nothing known" is not "withdraw everything"). While NATS is away, the
last state and the last verdict stay in force, so the announcements stay as they are.

Ownership: the prefixes of configured VIPs and every prefix this process announced; other
paths in gobgpd (an operator's, the peers') are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kube2ipvs.backoff import Backoff
from kube2ipvs.model import ClusterState
from kube2ipvs.statusserver import (
    ConfigRequestError,
    ConfigResponse,
    Health,
    SubscriberStatus,
    json_response,
    source_detail,
    text_response,
)
from kube2ipvs_bgp_speaker.errors import (
    ApplyError,
    GobgpError,
    GobgpNotFoundError,
    GobgpNotStartedError,
    GobgpUnavailableError,
)
from kube2ipvs_bgp_speaker.plan import (
    AddPeer,
    Announce,
    DirectorVerdict,
    GlobalSpec,
    PeerEvent,
    PeerOp,
    PeerSpec,
    PeerStatus,
    Route,
    RouteOp,
    RouteSettings,
    Withdraw,
    apply_route_ops,
    configured_prefixes,
    desired_routes,
    director_verdict,
    plan_peers,
    plan_routes,
    route_sort_key,
    with_graceful_shutdown,
)

log = logging.getLogger("kube2ipvs.bgp-speaker")

FORMATS: Final = ("bgp", "desired", "json")
ESTABLISHED: Final = "established"


class Gobgpd(Protocol):
    """gobgpd's API as the speaker uses it (gobgp.GobgpClient; a strict fake in fake.py)."""

    async def wait_ready(self, timeout: float) -> bool: ...

    async def get_global(self) -> GlobalSpec | None: ...

    async def start(self, spec: GlobalSpec) -> None: ...

    async def list_peers(self) -> list[PeerStatus]: ...

    async def add_peer(self, peer: PeerSpec) -> None: ...

    async def update_peer(self, peer: PeerSpec) -> None: ...

    async def delete_peer(self, address: str) -> None: ...

    def watch_peers(self) -> AsyncIterator[PeerEvent]: ...

    async def list_routes(self) -> tuple[Route, ...]: ...

    async def apply(self, ops: Sequence[RouteOp]) -> None: ...


class StateSource(SubscriberStatus, Protocol):
    @property
    def connected(self) -> bool: ...

    def states(self) -> AsyncIterator[ClusterState]: ...


class DirectorReadiness(Protocol):
    """The local director's readiness document (natskv.StatusBoard), None when there is none.
    Raises when it cannot be read (NATS away). A source that can also `watch()` (the document
    now, then each new one as the director puts it) is followed instead of polled."""

    async def read(self) -> Mapping[str, Any] | None: ...


STALE_CHECK_SECONDS: Final = 1.0  # a followed readiness is judged again this often (it can go stale)


@dataclass(frozen=True, slots=True)
class SpeakerSettings:
    routes: RouteSettings = field(default_factory=RouteSettings)
    bgp: GlobalSpec | None = None  # None: gobgpd's own configuration (gobgpd.conf) starts BGP
    peers: tuple[PeerSpec, ...] = ()
    resync_interval: float = 10.0
    readiness_interval: float = 0.1
    director_stale: float = 30.0  # a readiness older than this counts as a stopped director
    graceful_shutdown: bool = False  # re-announce with GRACEFUL_SHUTDOWN (65535:0) before withdrawing
    shutdown_delay: float = 0.0  # wait this long between that and the withdrawal
    retry_min: float = 0.1
    retry_max: float = 2.0


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        p = "kube2ipvs_bgp_speaker_"
        self.peers = Gauge(p + "peers", "BGP peers in gobgpd by session state", ["state"], registry=registry)
        self.peer_up = Gauge(p + "peer_established", "1 while the session with this peer is established",
                             ["peer"], registry=registry)
        self.routes_desired = Gauge(p + "routes_desired", "Routes the speaker wants announced", registry=registry)
        self.routes_announced = Gauge(p + "routes_announced", "Owned routes gobgpd holds (as of the last reconcile)",
                                      registry=registry)
        self.director_ready = Gauge(p + "director_ready", "1 while the local director allows announcing",
                                    registry=registry)
        self.gobgpd_up = Gauge(p + "gobgpd_up", "1 while gobgpd's API answers", registry=registry)
        self.reconciles = Counter(p + "reconciles_total", "Reconciles, by trigger", ["trigger"], registry=registry)
        self.reconcile_seconds = Histogram(p + "reconcile_seconds", "Time of a reconcile",
                                           buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10), registry=registry)
        self.changes = Counter(p + "changes_total", "Changes made in gobgpd, by kind", ["op"], registry=registry)
        self.drift_repairs = Counter(p + "drift_repairs_total", "Route changes a resync made although nothing "
                                     "we follow changed (a path deleted or changed by hand, a gobgpd restart)",
                                     registry=registry)
        self.errors = Counter(p + "errors_total", "gobgpd calls that failed, by kind", ["kind"], registry=registry)


class SpeakerApp:
    def __init__(
        self,
        gobgp: Gobgpd,
        *,
        source: StateSource | None = None,
        director: DirectorReadiness | None = None,
        settings: SpeakerSettings | None = None,
        registry: CollectorRegistry | None = None,
        describe: Mapping[str, Any] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.gobgp = gobgp
        self._source = source
        self._director = director
        self.settings = settings or SpeakerSettings()
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self._describe = dict(describe or {})
        self._wall = wall_clock
        self.state: ClusterState | None = None
        self.verdict: DirectorVerdict | None = None  # None: not known yet
        self.director_doc: Mapping[str, Any] | None = None
        self.desired: tuple[Route, ...] = ()
        self.held: tuple[Route, ...] | None = None  # gobgpd's local host routes; None: read them
        self.announced: frozenset[str] = frozenset()  # prefixes this process announced and still owns
        self.peers: dict[str, str] = {}  # address -> session state
        self.gobgpd_error: str | None = None  # gobgpd unreachable (or lost) since the last failure
        self.apply_error: str | None = None
        self.setup_problem: str | None = None  # e.g. gobgpd runs another AS than we are configured with
        self.readiness_error: str | None = None
        self.last_ops: list[str] = []
        self.last_reconcile_at: float | None = None
        self._needs_setup = True
        # What the last successful route plan was made from: the same inputs and yet changes
        # to make means someone else changed gobgpd (drift).
        self._planned_for: tuple[ClusterState, bool, frozenset[str]] | None = None
        self._configured: tuple[ClusterState | None, frozenset[str]] = (None, frozenset())
        self._kick = asyncio.Event()
        self.reconciled = asyncio.Event()  # set after every reconcile (tests and benchmarks wait on it)

    # -- inputs ---------------------------------------------------------------------------

    def offer(self, state: ClusterState) -> None:
        self.state = state
        self._kick.set()

    def judge_director(self, doc: Mapping[str, Any] | None, *, fresh: bool = True) -> None:
        """Decide from the director's readiness `doc`; `fresh`: just read (else the last one,
        judged again as time passes).

        No document after one was seen is no news, not a stop: a readiness expires (TTL) only
        after it went stale anyway, and a nats-server restart hands back an empty board until the
        director publishes again. The last document stands and goes stale by its own time."""
        if doc is None and self.director_doc is not None:
            doc = self.director_doc
        self.director_doc = doc
        if fresh:
            self.readiness_error = None
        verdict = director_verdict(doc, now=self._wall(), stale_after=self.settings.director_stale)
        before = self.verdict
        self.verdict = verdict
        self.metrics.director_ready.set(1 if verdict.ready else 0)
        if before is None or (before.ready, before.vips) != (verdict.ready, verdict.vips):
            log.info("event=director ready=%s vips=%d reason=%r", verdict.ready, len(verdict.vips), verdict.reason)
            self._kick.set()

    def peer_state(self, address: str, state: str) -> None:
        if self.peers.get(address) != state:
            log.info("event=peer peer=%s state=%s", address, state)
        self.peers[address] = state
        self._peer_metrics()

    def gobgpd_lost(self, why: str) -> None:
        """gobgpd went away or restarted: everything is pushed again once it answers."""
        if self.gobgpd_error is None:
            log.warning("event=gobgpd_lost error=%s", why)
        self.gobgpd_error = why
        self.metrics.gobgpd_up.set(0)
        self.peers = {}  # unknown until the event stream tells again
        self.metrics.peer_up.clear()
        self._peer_metrics()
        self._needs_setup = True
        self.held = None
        self._kick.set()

    # -- running --------------------------------------------------------------------------

    async def run(self) -> None:
        """Runs until cancelled."""
        async with asyncio.TaskGroup() as tg:
            if self._source is not None:
                tg.create_task(self._consume(), name="states")
            if self._director is not None:
                tg.create_task(self._poll_director(), name="director")
            tg.create_task(self._watch_peers(), name="peers")
            tg.create_task(self._loop(), name="reconcile")

    async def _consume(self) -> None:
        assert self._source is not None
        async for state in self._source.states():
            log.info("event=state generation=%d services=%d vips=%d", state.generation, len(state.services),
                     len(state.vips))
            self.offer(state)
        log.error("event=bug reason=state-stream-ended")

    async def _poll_director(self) -> None:
        assert self._director is not None
        watch = getattr(self._director, "watch", None)
        if watch is not None:
            await self._follow_director(watch)
            return
        while True:
            try:
                doc = await self._director.read()
            except Exception as exc:  # NATS away: the last verdict stays in force
                if self.readiness_error is None:
                    log.warning("event=readiness_unread error=%s", exc)
                self.readiness_error = f"{type(exc).__name__}: {exc}"
            else:
                self.judge_director(doc)
            await asyncio.sleep(self.settings.readiness_interval)

    async def _follow_director(self, watch: Callable[[], AsyncIterator[Mapping[str, Any] | None]]) -> None:
        """Each readiness as the director puts it (no polling: an announcement follows within
        the watch's latency), the last one judged again every STALE_CHECK_SECONDS (a director
        that stopped publishing goes stale); after a broken watch, watch again."""
        async def rejudge() -> None:
            while True:
                await asyncio.sleep(STALE_CHECK_SECONDS)
                if self.verdict is not None:
                    self.judge_director(self.director_doc, fresh=False)

        stale = asyncio.create_task(rejudge(), name="director-stale")
        try:
            while True:
                try:
                    async for doc in watch():
                        self.judge_director(doc)
                    why = "ConnectionError: the readiness watch ended"
                except Exception as exc:  # NATS away: the last verdict stays in force
                    why = f"{type(exc).__name__}: {exc}"
                if self.readiness_error is None:
                    log.warning("event=readiness_unread error=%s", why)
                self.readiness_error = why
                await asyncio.sleep(self.settings.readiness_interval)
        finally:
            stale.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stale

    async def _watch_peers(self) -> None:
        backoff = Backoff(initial=self.settings.retry_min, maximum=self.settings.retry_max)
        while True:
            try:
                async for event in self.gobgp.watch_peers():
                    backoff.reset()
                    self.peer_state(event.address, event.state)
                reason = "gobgpd ended the peer event stream"
            except GobgpUnavailableError as exc:
                reason = str(exc)
            except GobgpError as exc:  # gobgpd is there but refused the watch: try again later
                log.warning("event=peer_watch_refused error=%s", exc)
                await asyncio.sleep(backoff.next())
                continue
            self.gobgpd_lost(reason)
            await self.gobgp.wait_ready(backoff.next())
            await asyncio.sleep(self.settings.retry_min)  # never a tight loop on a stream that ends at once

    async def _loop(self) -> None:
        backoff = Backoff(initial=self.settings.retry_min, maximum=self.settings.retry_max)
        resync_at = 0.0
        at_once = True  # while gobgpd is away: try again the moment its channel reconnects
        while True:
            failing = self.apply_error is not None or self.gobgpd_error is not None
            wait = backoff.next() if failing else max(0.0, resync_at - time.monotonic())
            if failing and self.gobgpd_error is not None and at_once:
                # Once per outage: should gobgpd accept connections yet fail the calls, the
                # next tries wait out the backoff instead of spinning.
                at_once = not await self.gobgp.wait_ready(wait)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), wait)
            resync = time.monotonic() >= resync_at
            self._kick.clear()
            await self.reconcile_once(resync=resync)
            if resync:
                resync_at = time.monotonic() + self.settings.resync_interval
            if self.apply_error is None and self.gobgpd_error is None:
                backoff.reset()
                at_once = True

    # -- reconciling ----------------------------------------------------------------------

    async def reconcile_once(self, *, resync: bool = False) -> list[str]:
        """Set up gobgpd when needed, then plan and apply the routes; the changes made."""
        done: list[str] = []
        self.metrics.reconciles.labels("resync" if resync else "change").inc()
        started = time.perf_counter()
        try:
            if self._needs_setup or resync:
                await self._setup(done)
            await self._routes(done, full=resync)
        except GobgpError as exc:
            self._failed(exc)
        else:
            if self.gobgpd_error is not None:
                log.info("event=gobgpd_back")
            self.gobgpd_error = None
            self.apply_error = None
            self.metrics.gobgpd_up.set(1)
        self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        self.last_ops = done
        self.last_reconcile_at = self._wall()
        for op in done:
            self.metrics.changes.labels(op.split(" ", 1)[0]).inc()
            log.info("event=gobgpd_changed op=%s", op)
        self.reconciled.set()
        return done

    def _failed(self, exc: GobgpError) -> None:
        self.metrics.errors.labels(exc.kind).inc()
        self.held = None  # read it again before planning
        if isinstance(exc, GobgpUnavailableError) or (isinstance(exc, ApplyError) and
                                                      isinstance(exc.cause, GobgpUnavailableError)):
            self.gobgpd_lost(str(exc))
            return
        if isinstance(exc, GobgpNotStartedError) or (isinstance(exc, ApplyError) and
                                                     isinstance(exc.cause, GobgpNotStartedError)):
            self._needs_setup = True  # gobgpd restarted between two calls: start it again
        self.apply_error = str(exc)
        log.warning("event=apply_failed kind=%s error=%s", exc.kind, exc)

    async def _setup(self, done: list[str]) -> None:
        """BGP started with our global settings, our peers there with their configuration."""
        current = await self.gobgp.get_global()
        wanted = self.settings.bgp
        problem = None
        if current is None:
            if wanted is None:
                raise GobgpNotStartedError("GetBgp", "gobgpd has not started BGP: no --local-as given, and "
                                           "gobgpd runs without a configuration file that starts it")
            await self.gobgp.start(wanted)
            done.append(f"StartBgp as={wanted.asn} router-id={wanted.router_id}")
        elif wanted is not None and (current.asn, current.router_id) != (wanted.asn, wanted.router_id):
            problem = (f"gobgpd runs AS {current.asn} router-id {current.router_id}, configured AS {wanted.asn} "
                       f"router-id {wanted.router_id} (another configuration started it; restart gobgpd)")
        if problem != self.setup_problem and problem is not None:
            log.error("event=setup_conflict error=%s", problem)
        self.setup_problem = problem
        if self.settings.peers:
            held = {p.spec.address: p.spec for p in await self.gobgp.list_peers()}
            for op in plan_peers(self.settings.peers, held):
                await self._peer_op(op)
                done.append(str(op))
        self._needs_setup = False

    async def _peer_op(self, op: PeerOp) -> None:
        if isinstance(op, AddPeer):
            await self.gobgp.add_peer(op.peer)
        else:
            await self.gobgp.update_peer(op.peer)

    async def _routes(self, done: list[str], *, full: bool) -> None:
        state, verdict = self.state, self.verdict
        if state is None or verdict is None:
            return  # nothing known yet: touch nothing
        self.desired = desired_routes(state, verdict, self.settings.routes)
        self.metrics.routes_desired.set(len(self.desired))
        if self.held is None or full:
            self.held = await self.gobgp.list_routes()
        ops = plan_routes(self.desired, self.held, owned=self.owned())
        try:
            if ops:
                await self.gobgp.apply(ops)
        except ApplyError as exc:
            self._took([op for op in exc.applied if isinstance(op, Announce | Withdraw)], done)
            raise
        self._took(ops, done)
        last = self._planned_for
        if ops and last is not None and last[0] is state and last[1:] == (verdict.ready, verdict.vips):
            self.metrics.drift_repairs.inc(len(ops))
        self._planned_for = (state, verdict.ready, verdict.vips)

    def _took(self, ops: Sequence[RouteOp], done: list[str]) -> None:
        if self.held is not None:
            self.held = apply_route_ops(self.held, ops)
        announced = set(self.announced)
        for op in ops:
            done.append(str(op))
            if isinstance(op, Announce):
                announced.add(op.route.prefix)
            else:
                announced.discard(op.route.prefix)
        self.announced = frozenset(announced)
        self.metrics.routes_announced.set(len(self.in_force()))

    def owned(self) -> frozenset[str]:
        """The prefixes of configured VIPs (computed once per state) and those we announced."""
        if self._configured[0] is not self.state:
            self._configured = (self.state, configured_prefixes(self.state) if self.state else frozenset())
        return self._configured[1] | self.announced

    def in_force(self) -> tuple[Route, ...]:
        """Owned routes gobgpd holds, as of the last reconcile."""
        if self.held is None:
            return ()
        owned = self.owned()
        return tuple(r for r in self.held if r.prefix in owned)

    def _peer_metrics(self) -> None:
        self.metrics.peers.clear()
        counts: dict[str, int] = {}
        for state in self.peers.values():
            counts[state] = counts.get(state, 0) + 1
        for state, n in counts.items():
            self.metrics.peers.labels(state).set(n)
        for address, state in self.peers.items():
            self.metrics.peer_up.labels(address).set(1 if state == ESTABLISHED else 0)

    # -- stopping -------------------------------------------------------------------------

    async def withdraw_all(self) -> list[str]:
        """On shutdown: every owned route withdrawn, after a GRACEFUL_SHUTDOWN round when set."""
        done: list[str] = []
        owned = self.owned()
        if not owned:
            return done  # nothing we could have announced
        try:
            routes = self.in_force() if self.held is not None else tuple(
                r for r in await self.gobgp.list_routes() if r.prefix in owned)
            if not routes:
                return done
            if self.settings.graceful_shutdown:
                await self.gobgp.apply([Announce(with_graceful_shutdown(r)) for r in routes])
                done += [f"GracefulShutdown {r.prefix}" for r in routes]
                log.info("event=graceful_shutdown routes=%d delay=%g", len(routes), self.settings.shutdown_delay)
                await asyncio.sleep(self.settings.shutdown_delay)
            withdrawals: list[RouteOp] = [Withdraw(r) for r in routes]
            await self.gobgp.apply(withdrawals)
            self._took(withdrawals, done)
            if not self.settings.graceful_shutdown and self.settings.shutdown_delay:
                # A planned drain: the routers move the traffic before this host stops serving it.
                await asyncio.sleep(self.settings.shutdown_delay)
        except GobgpError as exc:
            log.warning("event=withdraw_failed error=%s", exc)
        return done

    # -- status ---------------------------------------------------------------------------

    def health(self) -> Health:
        established = sorted(a for a, s in self.peers.items() if s == ESTABLISHED)
        in_force = self.in_force()
        detail: dict[str, Any] = {
            "nats_connected": self._source.connected if self._source is not None else None,
            **source_detail(self._source),
            "generation": self.state.generation if self.state else None,
            "gobgpd_reachable": self.gobgpd_error is None,
            "peers": dict(sorted(self.peers.items())),
            "peers_established": len(established),
            "routes_desired": len(self.desired),
            "routes_announced": len(in_force),
            "director": None if self.verdict is None else (self.verdict.reason or "ready"),
            "last_error": self.gobgpd_error or self.apply_error or self.setup_problem or self.readiness_error,
            "last_reconcile_at": self.last_reconcile_at,
        }
        if self.gobgpd_error is not None:
            return Health(False, f"gobgpd unreachable: {self.gobgpd_error}", detail)
        if self.state is None:
            return Health(False, "no cluster state received yet", detail)
        if self.verdict is None:
            return Health(False, "the local director's readiness was not read yet", detail)
        if self.apply_error is not None:
            return Health(False, f"last apply failed: {self.apply_error}", detail)
        if self.setup_problem is not None:
            return Health(False, self.setup_problem, detail)
        if {r.prefix: r for r in in_force} != {r.prefix: r for r in self.desired}:
            return Health(False, f"{len(in_force)} routes announced, {len(self.desired)} desired", detail)
        if self.peers and not established:
            return Health(False, "no BGP peer established", detail)
        return Health(True, "", detail)

    def config(self, query: Mapping[str, str]) -> ConfigResponse:
        fmt = query.get("format")
        if fmt is None or fmt == "json":
            return json_response({
                "role": "bgp-speaker",
                "settings": self._describe,
                "generation": self.state.generation if self.state else None,
                "content_hash": self.state.content_hash if self.state else None,
                "director": dict(self.director_doc) if self.director_doc is not None else None,
                "peers": [p.describe() | {"state": self.peers.get(p.address, "unknown")}
                          for p in self.settings.peers] or None,
                "routes": [r.line() for r in self.in_force()],
                "desired": [r.line() for r in self.desired],
                "apply_error": self.apply_error,
                "formats": list(FORMATS),
            })
        if fmt not in FORMATS:
            raise ConfigRequestError(f"format must be one of {', '.join(FORMATS)}")
        if fmt == "bgp" and self.held is None:
            return text_response("not reconciled yet\n", 503)
        routes = self.in_force() if fmt == "bgp" else self.desired
        lines = [r.line() for r in sorted(routes, key=route_sort_key)]
        return text_response("\n".join(lines) + ("\n" if lines else ""))


async def cleanup(gobgp: Gobgpd, peers: Sequence[PeerSpec]) -> list[str]:
    """`--cleanup`: withdraw every host route (/32, /128) gobgpd originated, and delete the
    peers we are configured with. Run it against the gobgpd the speaker drives only."""
    done: list[str] = []
    routes = await gobgp.list_routes()
    ops: list[RouteOp] = [Withdraw(r) for r in sorted(routes, key=route_sort_key)]
    if ops:
        await gobgp.apply(ops)
        done += [str(op) for op in ops]
    for peer in peers:
        try:
            await gobgp.delete_peer(peer.address)
        except GobgpNotFoundError:
            continue
        done.append(f"DeletePeer {peer.address}")
    return done


def describe_settings(settings: SpeakerSettings, **extra: Any) -> dict[str, Any]:
    r = settings.routes
    return {
        "bgp": None if settings.bgp is None else {"asn": settings.bgp.asn, "router_id": settings.bgp.router_id,
                                                  "listen_port": settings.bgp.listen_port},
        "peers_from": "speaker" if settings.peers else "gobgpd.conf",
        "nexthop": r.nexthop or "self", "nexthop6": r.nexthop6 or "self", "communities": list(r.communities),
        "local_pref": r.local_pref, "med": r.med, "resync_interval": settings.resync_interval,
        "readiness_interval": settings.readiness_interval, "director_stale": settings.director_stale,
        "graceful_shutdown": settings.graceful_shutdown, "shutdown_delay": settings.shutdown_delay,
        **extra,
    }

