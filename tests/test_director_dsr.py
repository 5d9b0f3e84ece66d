"""The nftables dataplane's pure part (kube2ipvs_director.dsr): the layout of services, Maglev
tables and real servers, and the element transactions between layouts, checked against a strict
in-memory stand-in of the kernel's maps (a delete of a missing element or an add over an
existing one fails, as the kernel's do). The real kernel: tests/root/test_dsr_netns.py."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kube2ipvs.lbconfig import Family
from kube2ipvs.maglev import maglev_table
from kube2ipvs_director.dsr import (
    DsrError,
    DsrSettings,
    Layout,
    adopt,
    change,
    element_count,
    layout_of,
    render_load,
    render_table,
    table_key,
)
from kube2ipvs_director.plan import ObservedDest, ObservedService, ServiceId

SETTINGS = DsrSettings("eth0", table_size=13)
_LINE = re.compile(r"^(add|delete) element netdev (\S+) (\S+) \{ (.*) \}$")


def svc(vip: str, port: int, *nodes: tuple[str, int], protocol: str = "tcp") -> ObservedService:
    family: Family = 6 if ":" in vip else 4
    sid = ServiceId(vip, family, port, "udp" if protocol == "udp" else "tcp")
    return ObservedService(sid, "mh", (1, 2), dests=tuple(ObservedDest(a, port, "g", w) for a, w in nodes))


class Kernel:
    """The maps of the table, strict about what the kernel refuses."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[str, str]] = {}

    def run(self, text: str, table: str = SETTINGS.table) -> None:
        for line in text.splitlines():
            match = _LINE.match(line)
            if match is None:
                continue  # the table's definition
            verb, name, map_name, items = match.groups()
            assert name == table
            elements = self.maps.setdefault(map_name, {})
            for item in items.split(", "):
                if verb == "delete":
                    assert item in elements, f"delete of a missing element {map_name} {item}"
                    del elements[item]
                else:
                    key, value = item.split(" : ")
                    assert key not in elements, f"add over an existing element {map_name} {key}"
                    elements[key] = value

    @classmethod
    def loaded(cls, layout: Layout) -> Kernel:
        kernel = cls()
        kernel.run(render_table(layout, SETTINGS))
        return kernel

    def forward(self, sid: ServiceId, slot: int) -> str | None:
        """The node a flow hashing to `slot` goes to, as the rules would look it up."""
        fam = "6" if sid.family == 6 else "4"
        tid = self.maps.get(f"svc{fam}", {}).get(f"{sid.vip} . {sid.protocol} . {sid.port}")
        if tid is None:
            return None
        return self.maps.get(f"slots{fam}", {}).get(f"{tid} . {slot}")


def loaded_maps(layout: Layout) -> dict[str, dict[str, str]]:
    return {k: v for k, v in Kernel.loaded(layout).maps.items() if v}


def test_settings_refuse_what_the_rules_cannot_hold() -> None:
    with pytest.raises(ValueError, match="not a prime"):
        DsrSettings("eth0", table_size=250)
    with pytest.raises(ValueError, match="interface"):
        DsrSettings('eth0" accept')
    with pytest.raises(ValueError, match="seed"):
        DsrSettings("eth0", seed=2**32)


def test_services_with_the_same_nodes_and_weights_share_one_table() -> None:
    a = svc("192.0.2.1", 80, ("10.0.0.1", 2), ("10.0.0.2", 1))
    b = svc("192.0.2.1", 443, ("10.0.0.2", 1), ("10.0.0.1", 2))
    c = svc("192.0.2.2", 80, ("10.0.0.1", 1), ("10.0.0.2", 1))
    layout = layout_of([a, b, c], 13)
    assert layout.table_of[a.id] == layout.table_of[b.id] != layout.table_of[c.id]
    assert len(layout.tables) == 2
    assert element_count(layout) == 3 + 6 + 2 * (13 + 1)  # services, real servers, slots and checks
    kernel = Kernel.loaded(layout)
    want = maglev_table({"10.0.0.1": 2, "10.0.0.2": 1}, 13)
    assert [kernel.forward(a.id, i) for i in range(13)] == list(want)
    assert [kernel.forward(b.id, i) for i in range(13)] == list(want)


def test_a_service_without_a_live_real_server_has_no_table_and_drops() -> None:
    draining = svc("192.0.2.1", 80, ("10.0.0.1", 0))
    layout = layout_of([draining], 13)
    assert layout.tables == {}
    kernel = Kernel.loaded(layout)
    assert kernel.maps["svc4"] == {"192.0.2.1 . tcp . 80": "0"}  # chain dsr4 finds no slot: drop
    assert kernel.maps["dests4"] == {"192.0.2.1 . tcp . 80 . 10.0.0.1": "0"}
    assert kernel.forward(draining.id, 0) is None


def test_a_change_on_a_table_of_its_own_rewrites_only_the_slots_that_move() -> None:
    before = layout_of([svc("192.0.2.1", 80, ("10.0.0.1", 1), ("10.0.0.2", 1), ("10.0.0.3", 1))], 13)
    new = svc("192.0.2.1", 80, ("10.0.0.1", 1), ("10.0.0.2", 1))
    done = change(before, {new.id: new}, SETTINGS)
    old_slots = maglev_table({"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1}, 13)
    new_slots = maglev_table({"10.0.0.1": 1, "10.0.0.2": 1}, 13)
    moved = sum(a != b for a, b in zip(old_slots, new_slots, strict=True))
    assert done.elements == 2 * moved + 1 + 2  # each moved slot: delete + add; a real server; the check
    assert "svc4" not in done.text  # same table id
    kernel = Kernel.loaded(before)
    kernel.run(done.text)
    assert kernel.maps == Kernel.loaded(done.layout).maps


def test_a_change_on_a_shared_table_gives_the_service_its_own_and_leaves_the_others() -> None:
    a = svc("192.0.2.1", 80, ("10.0.0.1", 1), ("10.0.0.2", 1))
    b = svc("192.0.2.1", 443, ("10.0.0.1", 1), ("10.0.0.2", 1))
    before = layout_of([a, b], 13)
    a2 = svc("192.0.2.1", 80, ("10.0.0.1", 1), ("10.0.0.2", 3))
    done = change(before, {a.id: a2}, SETTINGS)
    assert done.layout.table_of[b.id] == before.table_of[b.id]
    assert done.layout.table_of[a.id] != before.table_of[a.id]
    kernel = Kernel.loaded(before)
    kernel.run(done.text)
    assert kernel.maps == Kernel.loaded(done.layout).maps
    # And back: a joins b's table again, its own table goes.
    back = change(done.layout, {a.id: a}, SETTINGS)
    kernel.run(back.text)
    assert len(back.layout.tables) == 1
    assert {k: v for k, v in kernel.maps.items() if v} == loaded_maps(back.layout)


def test_nothing_changes_for_the_same_state() -> None:
    a = svc("2001:db8::1", 53, ("2001:db8:1::1", 1), protocol="udp")
    layout = layout_of([a], 13)
    assert change(layout, {a.id: a}, SETTINGS).text == ""


@pytest.mark.parametrize(("dest", "message"), [
    (ObservedDest("10.0.0.1", 80, "i", 1), "direct routing only"),
    (ObservedDest("10.0.0.1", 8080, "g", 1), "keeps the service's port"),
    (ObservedDest("2001:db8::1", 80, "g", 1), "not of the VIP's family"),
])
def test_what_cannot_be_forwarded_is_refused_with_the_service_named(dest: ObservedDest, message: str) -> None:
    bad = ObservedService(ServiceId("192.0.2.1", 4, 80, "tcp"), "mh", dests=(dest,))
    with pytest.raises(DsrError, match=message) as caught:
        change(Layout(), {bad.id: bad}, SETTINGS)
    assert caught.value.service == bad.id


def test_more_live_nodes_than_slots_are_refused() -> None:
    many = svc("192.0.2.1", 80, *((f"10.0.0.{i}", 1) for i in range(1, 15)))
    with pytest.raises(DsrError, match="do not fit a Maglev table of 13 slots"):
        layout_of([many], 13)


def test_the_rules_carry_the_table_size_seed_and_interface() -> None:
    text = render_table(Layout(), DsrSettings("bond0", table_size=251, seed=7))
    assert 'hook ingress device "bond0"' in text
    assert "jhash ip saddr . th sport mod 251 seed 0x7 map @slots4 device \"bond0\"" in text
    assert "jhash ip6 saddr . th sport mod 251 seed 0x7 map @slots6 device \"bond0\"" in text
    assert text.startswith("add table netdev kube2ipvs_dsr\ndelete table netdev kube2ipvs_dsr\n")


NODES = [f"10.0.0.{i}" for i in range(1, 6)]
NODES6 = [f"2001:db8:1::{i}" for i in range(1, 4)]
# Both families: a table id freed by one family's service and taken by the other's in the same
# change once sent the old slots' deletes to the wrong map (found by the root lane's nft fuzzing).
VIPS = [("192.0.2.1", 80), ("192.0.2.1", 443), ("192.0.2.2", 80), ("192.0.2.3", 53), ("2001:db8::1", 80),
        ("2001:db8::2", 53)]


@st.composite
def states(draw: st.DrawFn) -> dict[ServiceId, ObservedService]:
    out = {}
    for vip, port in VIPS:
        if draw(st.booleans()):
            nodes = draw(st.lists(st.sampled_from(NODES6 if ":" in vip else NODES), unique=True, max_size=4))
            weights = [draw(st.integers(0, 3)) for _ in nodes]
            s = svc(vip, port, *zip(nodes, weights, strict=True))
            out[s.id] = s
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(states(), min_size=1, max_size=6))
def test_any_sequence_of_changes_leaves_the_kernel_as_a_full_load_of_the_last_state(
    sequence: Sequence[Mapping[ServiceId, ObservedService]],
) -> None:
    layout = Layout()
    kernel = Kernel.loaded(layout)
    for target in sequence:
        updates = {sid: target.get(sid) for sid in layout.services.keys() | target.keys()}
        done = change(layout, updates, SETTINGS)
        kernel.run(done.text)
        layout = done.layout
        assert {k: v for k, v in kernel.maps.items() if v} == loaded_maps(layout)
        for sid, s in target.items():  # every service forwards by the Maglev table of its live nodes
            key = table_key(s)
            want = list(maglev_table(dict(key[1]), 13)) if key else [None] * 13
            assert [kernel.forward(sid, i) for i in range(13)] == want
        used = set(layout.table_of.values())
        assert used == set(layout.tables)  # no table without a user, no user without its table
        assert {layout.tables[t].key: t for t in used} == layout.by_key


def checks_of(kernel: Kernel) -> dict[int, int]:
    return {int(k): int(v) for k, v in kernel.maps.get("tables", {}).items()}


def table_ids_of(kernel: Kernel) -> dict[ServiceId, int]:
    out = {}
    for fam, family in (("4", 4), ("6", 6)):
        for key, tid in kernel.maps.get(f"svc{fam}", {}).items():
            vip, proto, port = key.split(" . ")
            out[ServiceId(vip, family, int(port), "udp" if proto == "udp" else "tcp")] = int(tid)  # type: ignore[arg-type]
    return out


THREE = [svc("192.0.2.1", 80, ("10.0.0.1", 2), ("10.0.0.2", 1)),
         svc("192.0.2.1", 443, ("10.0.0.1", 2), ("10.0.0.2", 1)),
         svc("2001:db8::1", 53, ("2001:db8:1::1", 1), protocol="udp"),
         svc("192.0.2.2", 80, ("10.0.0.3", 0))]


def test_a_load_in_chunks_holds_what_one_transaction_holds_and_hooks_in_last() -> None:
    layout = layout_of(THREE, 13)
    chunks = list(render_load(layout, SETTINGS, chunk=10))
    assert len(chunks) > 3
    assert all("hook ingress" not in c for c in chunks[:-1])
    assert "hook ingress" in chunks[-1]
    kernel = Kernel()
    for text in chunks:
        kernel.run(text)
    assert kernel.maps == Kernel.loaded(layout).maps


def test_a_restarted_director_adopts_the_tables_it_would_write() -> None:
    layout = layout_of(THREE, 13)
    kernel = Kernel.loaded(layout)
    services = {s.id: s for s in THREE}
    adopted = adopt(services, table_ids_of(kernel), checks_of(kernel), SETTINGS)
    assert adopted is not None
    assert adopted.table_of == layout.table_of
    assert {t: x.slots for t, x in adopted.tables.items()} == {t: x.slots for t, x in layout.tables.items()}
    # With another table size or seed, or nodes that differ from what the tables were made for: no.
    assert adopt(services, table_ids_of(kernel), checks_of(kernel), DsrSettings("eth0", table_size=17)) is None
    assert adopt(services, table_ids_of(kernel), checks_of(kernel), DsrSettings("eth0", table_size=13, seed=1)) \
        is None
    changed = {**services, THREE[0].id: svc("192.0.2.1", 80, ("10.0.0.1", 2))}
    assert adopt(changed, table_ids_of(kernel), checks_of(kernel), SETTINGS) is None
    # A table no service uses any more is not adopted either: a full load cleans it up.
    fewer = {sid: s for sid, s in services.items() if sid.family == 4}
    ids = {sid: t for sid, t in table_ids_of(kernel).items() if sid.family == 4}
    assert adopt(fewer, ids, checks_of(kernel), SETTINGS) is None
