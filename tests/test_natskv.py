"""The NATS key-value transport against a real `nats-server -js` (tests/natsfixture.py).

Every wait is on an event, or on a subscriber's `until()`, always with a timeout. Nothing sleeps
for a fixed time. Each test gets its own server on a free 127.0.0.1 port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
from collections.abc import Awaitable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from bench.bench_render import build_cluster

from kube2ipvs import natskv
from kube2ipvs.model import ClusterState, VirtualService
from kube2ipvs.natskv import (
    KVPublisher,
    Lease,
    NatsSettings,
    NodeSliceSubscriber,
    StateSubscriber,
    StatusBoard,
    ValueTooLargeError,
    status_key,
)
from kube2ipvs.normalize import normalize
from kube2ipvs.protocol import (
    META_KEY,
    Encoded,
    NodeSlice,
    Write,
    encode_state,
    node_prefix,
    node_service_key,
    plan_writes,
    service_key,
)
from tests.conftest import realistic_state
from tests.natsfixture import NatsServer, make_tls_files, running_nats_server

T = TypeVar("T")
WAIT = 15.0  # generous: a reconnect takes a few reconnect waits on a loaded machine


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with running_nats_server(tmp_path / "nats") as server:
        yield server


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(45):
            return await coro
    return asyncio.run(bounded())


def settings(server: NatsServer, **kw: Any) -> NatsSettings:
    return NatsSettings(servers=(server.url,), reconnect_wait=0.1, connect_timeout=1.0,
                        request_timeout=2.0, **kw)


async def within(awaitable: Awaitable[T], seconds: float = WAIT) -> T:
    return await asyncio.wait_for(awaitable, seconds)


async def publish_state(pub: KVPublisher, state: ClusterState, previous: Encoded | None = None) -> Encoded:
    encoded = encode_state(state)
    await pub.publish(plan_writes(previous, encoded))
    return encoded


def without_one_endpoint(state: ClusterState, vip: str, port: int, node: str) -> ClusterState:
    """`state` one generation later, with `node` serving one ready endpoint less for vip:port."""
    def change(vs: VirtualService) -> VirtualService:
        if (vs.vip, vs.port) != (vip, port):
            return vs
        backends = tuple(dataclasses.replace(b, endpoints=b.endpoints[1:]) if b.node == node else b
                         for b in vs.backends)
        return dataclasses.replace(vs, backends=backends)
    changed = dataclasses.replace(state, generation=state.generation + 1,
                                  services=tuple(change(vs) for vs in state.services))
    assert changed != state
    return changed


def without_node(state: ClusterState, node: str, generation: int) -> ClusterState:
    services = tuple(dataclasses.replace(vs, backends=tuple(b for b in vs.backends if b.node != node))
                     for vs in state.services)
    return dataclasses.replace(state, generation=generation, services=services)


def every_service_changed(state: ClusterState) -> ClusterState:
    """Each service loses its last backend: every `vs.` value with a backend changes."""
    services = tuple(dataclasses.replace(vs, backends=vs.backends[:-1]) for vs in state.services)
    return dataclasses.replace(state, generation=state.generation + 1, services=services)


class LogEvents(logging.Handler):
    """Sets an asyncio event when natskv logs a line containing a given text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._waiting: list[tuple[str, asyncio.Event]] = []
        self._loop = asyncio.get_running_loop()

    def event(self, text: str) -> asyncio.Event:
        event = asyncio.Event()
        self._waiting.append((text, event))
        return event

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for text, event in self._waiting:
            if text in message:
                self._loop.call_soon_threadsafe(event.set)

    def __enter__(self) -> LogEvents:
        logger = logging.getLogger(natskv.__name__)
        logger.addHandler(self)
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *_: object) -> None:
        logger = logging.getLogger(natskv.__name__)
        logger.removeHandler(self)
        logger.setLevel(self._level)


class Collect:
    """Runs an iterator in the background and keeps everything it yields."""

    def __init__(self, iterator: Any) -> None:
        self.items: list[Any] = []
        self._task = asyncio.create_task(self._run(iterator))

    async def _run(self, iterator: Any) -> None:
        async for item in iterator:
            self.items.append(item)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def test_a_late_subscriber_gets_exactly_the_published_state(nats_server: NatsServer) -> None:
    state = realistic_state()

    async def scenario() -> None:
        async with KVPublisher(settings(nats_server)) as pub:
            await publish_state(pub, state)
            async with StateSubscriber(settings(nats_server)) as sub:
                got = await within(anext(sub.states()))
                assert got == state
                assert got.content_hash == state.content_hash
                assert sub.connected
                assert sub.status == "in sync"
                assert sub.last_state_at is not None

    run(scenario())


def test_a_one_endpoint_change_writes_one_service_one_node_slice_and_the_manifest(
        nats_server: NatsServer) -> None:
    before = realistic_state()
    after = without_one_endpoint(before, "192.0.2.11", 443, "node-b")

    async def scenario() -> None:
        async with KVPublisher(settings(nats_server)) as pub, StateSubscriber(settings(nats_server)) as sub:
            full = encode_state(before)
            full_bytes = await pub.publish(plan_writes(None, full))
            await within(sub.until(lambda s: s == before))

            delta = encode_state(after)
            writes = plan_writes(full, delta)
            assert [w.key for w in writes] == [node_service_key("node-b", "192.0.2.11", 443, "tcp"),
                                               service_key("192.0.2.11", 443, "tcp"), META_KEY]
            written = await pub.publish(writes)
            assert written == sum(len(delta.values[w.key]) for w in writes)
            assert written < full_bytes / 3
            got = await within(sub.until(lambda s: s.generation == after.generation))
            assert got == after
            assert got.content_hash == after.content_hash

    run(scenario())


def test_a_one_endpoint_change_at_a_hundred_services_costs_a_small_share_of_the_full_state(
        nats_server: NatsServer) -> None:
    cluster = build_cluster(0.01, 1)  # 100 VIP:ports, 10 nodes, 1,000 endpoints
    before = normalize(cluster.nodes, cluster.services, cluster.slices, cluster.config)
    vs = next(vs for vs in before.services if any(b.weight > 1 for b in vs.backends))
    node = next(b.node for b in vs.backends if b.weight > 1)
    after = without_one_endpoint(before, vs.vip, vs.port, node)

    async def scenario() -> None:
        async with KVPublisher(settings(nats_server)) as pub:
            full = await publish_state(pub, before)
            full_bytes = sum(len(v) for v in full.values.values())
            writes = plan_writes(full, encode_state(after))
            written = await pub.publish(writes)
            assert len(writes) == 3
            assert written * 100 < full_bytes, (written, full_bytes)

    run(scenario())


def test_a_subscriber_never_hands_over_a_partial_state_while_values_trickle_in(nats_server: NatsServer) -> None:
    first = realistic_state()
    second = every_service_changed(first)
    third = without_one_endpoint(second, "192.0.2.10", 80, "node-a")

    async def scenario() -> None:
        async with KVPublisher(settings(nats_server)) as pub, StateSubscriber(settings(nats_server)) as sub:
            encoded = await publish_state(pub, first)
            await within(sub.until(lambda s: s == first))
            seen = Collect(sub.states())
            # One write at a time, each acknowledged before the next, in plan order...
            new = encode_state(second)
            for w in plan_writes(encoded, new):
                await pub.publish([w])
            await within(sub.until(lambda s: s == second))
            # ...and in the worst order: the manifest before the values it names.
            writes = plan_writes(new, encode_state(third))
            assert writes[-1].key == META_KEY
            assert len(writes) > 1
            for w in [writes[-1], *writes[:-1]]:
                await pub.publish([w])
            await within(sub.until(lambda s: s == third))
            await seen.stop()
            assert seen.items, "the subscriber handed nothing over"
            for state in seen.items:
                assert state in (first, second, third)
                assert state.content_hash in (first.content_hash, second.content_hash, third.content_hash)
            assert seen.items[-1] == third

    run(scenario())


def test_a_slow_consumer_is_handed_only_the_newest_state_after_a_burst(nats_server: NatsServer) -> None:
    base = realistic_state()
    states = [dataclasses.replace(base, generation=g, vips=base.vips[: 1 + g % len(base.vips)])
              for g in range(1, 11)]

    async def scenario() -> None:
        async with KVPublisher(settings(nats_server)) as pub, StateSubscriber(settings(nats_server)) as sub:
            stream = sub.states()
            encoded = await publish_state(pub, base)
            assert await within(anext(stream)) == base
            for state in states:  # nobody reads the stream meanwhile
                encoded = await publish_state(pub, state, encoded)
            await within(sub.until(lambda s: s.generation == states[-1].generation))
            assert await within(anext(stream)) == states[-1]
            with pytest.raises(TimeoutError):  # nothing older is left to hand over
                await asyncio.wait_for(anext(stream), 0.3)

    run(scenario())


def test_a_late_node_gets_its_whole_slice_then_an_empty_slice_when_its_keys_are_deleted(
        nats_server: NatsServer) -> None:
    state = realistic_state()
    mine = state.for_node("node-a")
    assert len(mine) > 5  # enough keys for a replay handed over in pieces to show
    emptied = without_node(state, "node-a", state.generation + 1)

    async def scenario() -> None:
        async with KVPublisher(settings(nats_server)) as pub:
            encoded = await publish_state(pub, state)
            async with NodeSliceSubscriber(settings(nats_server), "node-a") as node_a:
                slices = node_a.slices()
                got = await within(anext(slices))
                assert got.node == "node-a"
                assert got.services == mine
                assert got.vips == ("192.0.2.10", "192.0.2.11", "192.0.2.12", "2001:db8::10")

                writes = plan_writes(encoded, encode_state(emptied))
                deleted = [w.key for w in writes if w.value is None]
                assert len(deleted) == len(mine)
                assert all(key.startswith(node_prefix("node-a")) for key in deleted)
                await pub.publish(writes)
                assert await within(node_a.until(lambda s: not s.services)) == NodeSlice("node-a", (), ())

    run(scenario())


def test_a_late_node_with_hundreds_of_services_gets_them_in_one_hand_over(nats_server: NatsServer) -> None:
    base = realistic_state()
    web = next(vs for vs in base.services if vs.port == 80 and vs.vip == "192.0.2.10")
    many = tuple(dataclasses.replace(web, port=port) for port in range(10000, 10600))
    state = dataclasses.replace(base, services=tuple(sorted(many, key=VirtualService.sort_key)))

    async def scenario() -> None:
        async with KVPublisher(settings(nats_server)) as pub:
            await publish_state(pub, state)
            async with NodeSliceSubscriber(settings(nats_server), "node-a") as node_a:
                first = await within(anext(node_a.slices()))
                assert len(first.services) == len(many)
                assert first.services == state.for_node("node-a")

    run(scenario())


def test_a_node_without_services_gets_an_empty_slice_once_a_state_is_published(nats_server: NatsServer) -> None:
    state = realistic_state()

    async def scenario() -> None:
        with LogEvents() as logs:
            bucket_missing = logs.event("event=bucket_missing")
            async with NodeSliceSubscriber(settings(nats_server), "node-z", absent_recheck=0.05) as node_z:
                # No bucket yet: that is "nothing known", not "no services".
                await within(bucket_missing.wait())
                assert node_z.latest is None
                async with KVPublisher(settings(nats_server)) as pub:
                    await publish_state(pub, state)
                    assert await within(anext(node_z.slices())) == NodeSlice("node-z", (), ())

    run(scenario())


def test_a_node_whose_bucket_is_missing_is_handed_its_real_slice_first(nats_server: NatsServer) -> None:
    state = realistic_state()

    async def scenario() -> None:
        with LogEvents() as logs:
            bucket_missing = logs.event("event=bucket_missing")
            async with NodeSliceSubscriber(settings(nats_server), "node-a", absent_recheck=0.05) as node_a:
                await within(bucket_missing.wait())
                async with KVPublisher(settings(nats_server)) as pub:
                    await publish_state(pub, state)
                    # Even when the subscriber binds while the first publish is under way.
                    first = await within(anext(node_a.slices()))
                    assert first.services == state.for_node("node-a")

    run(scenario())


def test_consumers_and_publisher_started_before_the_server_come_up_with_it(nats_server: NatsServer) -> None:
    state = realistic_state()
    nats_server.stop()

    async def scenario() -> None:
        with LogEvents() as logs:
            refused = logs.event("event=nats_error")
            async with StateSubscriber(settings(nats_server)) as sub:
                publisher = KVPublisher(settings(nats_server))
                starting = asyncio.create_task(publisher.start())
                await within(refused.wait())
                assert not sub.connected
                assert sub.status == "nats disconnected"
                assert not starting.done()
                nats_server.start()
                await within(starting)
                try:
                    await publish_state(publisher, state)
                    assert await within(anext(sub.states())) == state
                finally:
                    await publisher.close()

    run(scenario())


def test_closing_a_subscriber_still_waiting_for_the_server_leaves_no_task_behind(nats_server: NatsServer) -> None:
    nats_server.stop()

    async def scenario() -> None:
        with LogEvents() as logs:
            refused = logs.event("event=nats_error")
            sub = StateSubscriber(settings(nats_server))
            await sub.start()
            await within(refused.wait())
            await sub.close()
            assert asyncio.all_tasks() == {asyncio.current_task()}
            assert [s async for s in sub.states()] == []  # the iterator ends

    run(scenario())


def test_after_a_server_restart_the_publisher_finishes_and_consumers_converge_on_the_newest_state(
        nats_server: NatsServer) -> None:
    first = realistic_state()
    second = without_one_endpoint(first, "192.0.2.10", 80, "node-a")

    async def scenario() -> None:
        reconnected = asyncio.Event()
        async with KVPublisher(settings(nats_server), on_reconnect=reconnected.set) as pub, \
                StateSubscriber(settings(nats_server)) as sub, \
                NodeSliceSubscriber(settings(nats_server), "node-a") as node_a:
            node_slices = Collect(node_a.slices())
            encoded = await publish_state(pub, first)
            await within(sub.until(lambda s: s == first))
            await within(node_a.until(lambda s: s.services == first.for_node("node-a")))

            nats_server.stop()
            publishing = asyncio.create_task(publish_state(pub, second, encoded))  # retries meanwhile
            nats_server.start()
            await within(reconnected.wait())
            await within(publishing)

            # What a watcher does after a reconnect: plan against what the bucket really holds.
            published = await pub.published()
            assert published is not None
            assert plan_writes(published, encode_state(second)) == []
            assert await pub.read_all() == dict(encode_state(second).values)

            got = await within(sub.until(lambda s: s.generation == second.generation))
            assert got == second
            await within(node_a.until(lambda s: s.services == second.for_node("node-a")))
            await node_slices.stop()
            # The outage was never taken for "no services".
            assert [s.services for s in node_slices.items] == [first.for_node("node-a"), second.for_node("node-a")]

    run(scenario())


def test_after_the_server_lost_its_store_the_publisher_republishes_and_consumers_resync(
        nats_server: NatsServer) -> None:
    first = realistic_state()
    second = without_one_endpoint(first, "192.0.2.11", 443, "node-b")

    async def scenario() -> None:
        reconnected = asyncio.Event()
        async with KVPublisher(settings(nats_server), on_reconnect=reconnected.set) as pub, \
                StateSubscriber(settings(nats_server)) as sub, \
                NodeSliceSubscriber(settings(nats_server), "node-b") as node_b:
            node_slices = Collect(node_b.slices())
            await publish_state(pub, first)
            await within(sub.until(lambda s: s == first))
            await within(node_b.until(lambda s: s.services == first.for_node("node-b")))

            nats_server.restart(wipe=True)
            await within(reconnected.wait())
            assert await pub.published() is None  # an empty bucket again
            # Consumers hold on to what they had while the bucket is gone.
            assert sub.latest == first
            assert node_b.latest is not None
            assert node_b.latest.services == first.for_node("node-b")

            encoded = await publish_state(pub, first, None)
            await publish_state(pub, second, encoded)
            assert await within(sub.until(lambda s: s.generation == second.generation)) == second
            await within(node_b.until(lambda s: s.services == second.for_node("node-b")))
            await node_slices.stop()
            assert [s.services for s in node_slices.items] == [first.for_node("node-b"), second.for_node("node-b")]

    run(scenario())


def test_a_value_larger_than_the_servers_max_payload_is_rejected_before_anything_is_written(
        nats_server: NatsServer) -> None:
    async def scenario() -> None:
        async with KVPublisher(settings(nats_server)) as pub:
            limit = pub.max_value_size
            assert limit == 1024 * 1024  # nats-server's default max_payload
            writes = [Write("vs.small", b"{}"), Write("vs.huge", b"x" * (limit + 1)), Write(META_KEY, b"{}")]
            with pytest.raises(ValueTooLargeError, match=r"'vs.huge' is 1048577 bytes.*at most 1048576"):
                await pub.publish(writes)
            assert await pub.read_all() == {}
            # The limit itself is accepted.
            assert await pub.publish([Write("vs.edge", b"x" * limit)]) == limit

    run(scenario())


async def round_trip(server_settings: NatsSettings) -> ClusterState:
    """Publish the realistic state with these settings and read it back through a subscriber."""
    async with KVPublisher(server_settings) as pub, StateSubscriber(server_settings) as sub:
        await publish_state(pub, realistic_state())
        return await within(anext(sub.states()))


def test_user_and_password_are_passed_to_the_server(tmp_path: Path) -> None:
    with running_nats_server(tmp_path / "nats", ["--user", "kube2ipvs", "--pass", "s3cret"]) as server:
        async def scenario() -> None:
            assert await round_trip(settings(server, user="kube2ipvs", password="s3cret")) == realistic_state()
            with LogEvents() as logs:
                refused = logs.event("Authorization Violation")
                wrong = StateSubscriber(settings(server, user="kube2ipvs", password="wrong"))
                await wrong.start()
                try:
                    await within(refused.wait())
                    assert not wrong.connected
                    assert wrong.latest is None
                finally:
                    await wrong.close()

        run(scenario())


def test_a_token_is_passed_to_the_server(tmp_path: Path) -> None:
    with running_nats_server(tmp_path / "nats", ["--auth", "t0ken"]) as server:
        assert run(round_trip(settings(server, token="t0ken"))) == realistic_state()


def test_tls_verifies_the_server_against_the_ca_and_presents_the_client_certificate(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    args = ["--tlsverify", "--tlscert", str(tls.server_cert), "--tlskey", str(tls.server_key),
            "--tlscacert", str(tls.ca)]
    with running_nats_server(tmp_path / "nats", args) as server:
        secured = settings(server, tls_ca_file=str(tls.ca), tls_cert_file=str(tls.client_cert),
                           tls_key_file=str(tls.client_key))
        assert run(round_trip(secured)) == realistic_state()

        async def without_client_certificate() -> None:
            with LogEvents() as logs:
                failed = logs.event("event=nats_error")
                anonymous = StateSubscriber(settings(server, tls_ca_file=str(tls.ca)))
                await anonymous.start()
                try:
                    await within(failed.wait())
                    assert not anonymous.connected
                finally:
                    await anonymous.close()

        run(without_client_certificate())


def test_writes_are_batched_so_every_value_is_acknowledged_before_the_manifest() -> None:
    writes = [Write("node.a", b"1"), Write("vs.b", b"2"), Write("vs.c", None), Write(META_KEY, b"m"),
              Write("vs.b", b"3"), Write("vs.b", b"4")]
    assert natskv._batches(writes) == [writes[:3], [writes[3]], [writes[4]], [writes[5]]]


def test_settings_keep_secrets_out_of_repr_and_describe() -> None:
    s = NatsSettings(user="lb", password="hunter2", token="t0ken")
    assert "hunter2" not in repr(s)
    assert "t0ken" not in repr(s)
    assert "hunter2" not in str(s.describe())
    assert s.describe()["auth"] == "token"
    assert natskv.tls_context(s) is None
    assert natskv.tls_context(NatsSettings(servers=("tls://127.0.0.1:4222",))) is not None


def test_a_creds_file_without_the_nkeys_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def no_nkeys(name: str, *args: Any) -> Any:
        return None if name == "nkeys" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", no_nkeys)
    with pytest.raises(natskv.KVError, match="nkeys"):
        run(natskv.connect(NatsSettings(creds_file="/nonexistent.creds")))



@pytest.mark.parametrize("chunk", [4096, 64])  # one chunk; sixteen of them
def test_a_large_batch_of_puts_is_pipelined_and_lands_whole(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    monkeypatch.setattr(natskv, "_PIPELINE_CHUNK", chunk)
    careful: list[str] = []
    original = KVPublisher._write

    async def counting_write(self: KVPublisher, w: Write) -> None:
        careful.append(w.key)
        await original(self, w)

    monkeypatch.setattr(KVPublisher, "_write", counting_write)
    writes = [Write(f"node.n{i % 7}.192-0-2-1.{i + 1}.tcp", b'{"i":%d}' % i) for i in range(1000)]
    writes += [Write("node.n0.192-0-2-1.1.tcp", None), Write("state.meta", b"{}")]

    async def scenario() -> None:
        async with KVPublisher(settings(nats_server)) as pub:
            written = await pub.publish(writes)
            values = await pub.read_all()
        assert written == sum(len(w.value or b"") for w in writes)
        assert len(values) == 1000  # 1000 puts, one deleted again, the manifest
        assert "node.n0.192-0-2-1.1.tcp" not in values
        assert values["node.n5.192-0-2-1.1000.tcp"] == b'{"i":999}'  # 999 % 7 == 5
        # Only the deletion and the manifest went the one-by-one acknowledged way.
        assert careful == ["node.n0.192-0-2-1.1.tcp", "state.meta"]

    run(scenario())


# ---------------------------------------------------------------------------------------------
# StatusBoard: director readiness, expiring when not refreshed


def test_a_status_put_is_read_back_and_expires_when_not_refreshed(nats_server: NatsServer) -> None:
    async def scenario() -> None:
        writer = StatusBoard(settings(nats_server), bucket="k2i-status-test", ttl=1.0)
        reader = StatusBoard(settings(nats_server), bucket="k2i-status-test", ttl=1.0)
        await writer.start()
        await reader.start()
        try:
            assert await reader.get("director", "node-1.example.com") is None
            await writer.put("director", "node-1.example.com", {"healthy": True, "generation": 7})
            assert await reader.get("director", "node-1.example.com") == {"healthy": True, "generation": 7}
            assert await reader.get("director", "node-2") is None
            await asyncio.sleep(1.6)  # the TTL passes without a refresh: a dead director is not ready
            assert await reader.get("director", "node-1.example.com") is None
        finally:
            await writer.close()
            await reader.close()

    run(scenario())


def test_a_status_watch_gives_the_document_now_then_each_new_one(nats_server: NatsServer) -> None:
    async def scenario() -> None:
        writer = StatusBoard(settings(nats_server), bucket="k2i-status-watch", ttl=30.0)
        reader = StatusBoard(settings(nats_server), bucket="k2i-status-watch", ttl=30.0)
        await writer.start()
        await reader.start()
        seen: list[dict[str, Any] | None] = []
        try:
            watch = reader.watch("director", "dir1")
            seen.append(await within(anext(watch)))  # nothing there yet
            await writer.put("director", "dir1", {"healthy": True, "generation": 1})
            await writer.put("director", "dir2", {"healthy": True, "generation": 9})  # another key: not seen
            await writer.put("director", "dir1", {"healthy": False, "generation": 2})
            seen.append(await within(anext(watch)))
            seen.append(await within(anext(watch)))
            await watch.aclose()
        finally:
            await writer.close()
            await reader.close()
        assert seen == [None, {"healthy": True, "generation": 1}, {"healthy": False, "generation": 2}]

    run(scenario())


def test_status_keys_are_one_token_per_host() -> None:
    assert status_key("director", "node-1.example.com") == "director.node-1_example_com"


# ---------------------------------------------------------------------------------------------
# Lease: one holder at a time; taken over only after it expired or was released


def test_a_lease_has_one_holder_until_it_expires_or_is_released(nats_server: NatsServer) -> None:
    async def scenario() -> None:
        a = Lease(settings(nats_server), "arp", "dir-a", ttl=1.0, bucket="k2i-lease-test")
        b = Lease(settings(nats_server), "arp", "dir-b", ttl=1.0, bucket="k2i-lease-test")
        await a.start()
        await b.start()
        try:
            assert await a.hold()
            assert not await b.hold()
            assert await a.hold()  # renewed
            assert await b.current_holder() == "dir-a"
            await asyncio.sleep(0.6)
            assert await a.hold()  # renewed before the expiry: still ours
            await asyncio.sleep(0.6)
            assert not await b.hold()  # 1.2 s after the first hold, but only 0.6 s after the renewal
            await asyncio.sleep(1.6)  # a stops renewing: its value expires
            assert await b.hold()
            assert not await a.hold()  # its compare-and-set fails: b took it
            await b.release()
            assert await a.hold()  # released: no need to wait for an expiry
        finally:
            await a.close()
            await b.close()

    run(scenario())
