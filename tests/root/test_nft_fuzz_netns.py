"""Generated nft texts load: `nft -c -f -` in a throw-away network namespace accepts every table,
delta and transaction the renderers make from the fuzzed input of tests/test_fuzz_properties.py
(odd and hostile Kubernetes objects, arbitrary valid configs, mutated bucket values).

Covered: the realserver's full table (`render_nft`, with and without masquerading) and its deltas
(`render_nft_delta`, checked against the old table loaded for real), the table the realserver
builds from a bucket value (`desired_state`), and the director's nftables dataplane: the whole
table (`render_table`), its load in chunks (`render_load`, loaded for real in order) and the
element transaction from one state to the next (`change`, checked against the old table).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from kube2ipvs.protocol import NodeSlice
from kube2ipvs.render.nft import render_nft
from kube2ipvs.render.nftdelta import render_nft_delta
from kube2ipvs_director.dsr import change, layout_of, render_load, render_table
from kube2ipvs_director.plan import ObservedService, ServiceId
from kube2ipvs_realserver.plan import Settings, desired_state
from tests.root.conftest import Lab, Netns, skip_reason
from tests.test_fuzz_properties import CLUSTERS, DSR, NODE_NAMES, Cluster, bucket_values, decoded, dsr_services

pytestmark = pytest.mark.root

# A few dozen examples: each costs several nft runs (about 20 ms each) in the namespace.
LOADS = settings(max_examples=50, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
EXEMPT = ["10.0.0.0/8", "2001:db8:1::/64"]


@pytest.fixture(scope="module")
def ns() -> Iterator[Netns]:
    """One namespace for every example: `nft -c` changes nothing, and every real load replaces
    the table whole first. `eth0` (one end of a veth pair) is the dataplane's interface."""
    if (reason := skip_reason(("ip", "nft"))) is not None:
        pytest.skip(reason)
    lab = Lab()
    try:
        created = lab.netns("nft-fuzz")
        created.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
        created.ip("link", "set", "eth0", "up")
        yield created
    finally:
        lab.close()


def check(ns: Netns, text: str) -> None:
    """`nft -c -f -`: the kernel parses and validates the whole transaction, and commits nothing."""
    done = subprocess.run(["ip", "netns", "exec", ns.name, "nft", "-c", "-f", "-"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, f"nft -c refused it: {done.stderr.strip()[:2000]}\n{text[:4000]}"


@LOADS
@given(CLUSTERS)
def test_every_realserver_table_of_odd_input_passes_nft_check(ns: Netns, cluster: Cluster) -> None:
    state = cluster.state()
    texts = {render_nft(state.for_node(name), masquerade_exempt=exempt)
             for name in NODE_NAMES for exempt in (None, EXEMPT)}
    for text in texts:
        check(ns, text)


@LOADS
@given(CLUSTERS, CLUSTERS)
def test_every_realserver_delta_between_odd_inputs_passes_nft_check_on_the_old_table(
    ns: Netns, a: Cluster, b: Cluster
) -> None:
    before, after = a.state(), b.state()
    for name in NODE_NAMES[:2]:
        delta = render_nft_delta(before.for_node(name), after.for_node(name))
        if delta:
            ns.nft(render_nft(before.for_node(name)))
            check(ns, delta)


@LOADS
@given(bucket_values())
def test_the_table_a_realserver_builds_from_any_accepted_bucket_value_passes_nft_check(ns: Netns, value: bytes) -> None:
    vs = decoded(value)
    if isinstance(vs, str):
        return  # refused: nothing to load
    check(ns, desired_state(NodeSlice("node-a", (vs.vip,), (vs,)), Settings()).nft)


@LOADS
@given(CLUSTERS, CLUSTERS)
def test_every_director_dataplane_table_load_and_change_of_odd_input_passes_nft(
    ns: Netns, a: Cluster, b: Cluster
) -> None:
    old = layout_of(dsr_services(a.state()), DSR.table_size)
    check(ns, render_table(old, DSR))
    if f"table netdev {DSR.table}" in ns.exec("nft", "list", "tables"):
        ns.exec("nft", "delete", "table", "netdev", DSR.table)
    for chunk in render_load(old, DSR, chunk=200):
        ns.nft(chunk)  # loaded for real: each chunk builds on the ones before it
    new = {s.id: s for s in dsr_services(b.state())}
    updates: dict[ServiceId, ObservedService | None] = {sid: new.get(sid) for sid in old.services.keys() | new.keys()}
    text = change(old, updates, DSR).text
    if text:
        check(ns, text)
